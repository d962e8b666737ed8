// Shared by the multi-node supabase-js tests. The primary and its standbys are started by
// pgrx-tests/tests/multinode.rs, which passes them in PG_REALTIME_NODES as a JSON array of
// {name, http, pg}, the primary first.
'use strict'
const crypto = require('node:crypto')
const { createClient } = require('@supabase/supabase-js')
const { Client } = require('pg')

const env = (name) => {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: run these tests through cargo test -p realtime-integration-tests --test multinode`)
  return value
}
const NODES = JSON.parse(env('PG_REALTIME_NODES'))
const SECRET = env('PG_REALTIME_JWT_SECRET')
const [PRIMARY, ...STANDBYS] = NODES
if (STANDBYS.length < 2) throw new Error('PG_REALTIME_NODES must list a primary and at least two standbys')

/** Cross-node effects go through replication: generous, and never a speed limit. */
const WAIT = 30000

const b64url = (buf) => Buffer.from(buf).toString('base64url')

/** An HS256 token signed with the nodes' secret. */
function jwt(claims = {}) {
  const now = Math.floor(Date.now() / 1000)
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64url(JSON.stringify({ role: 'anon', iat: now, exp: now + 3600, ...claims }))
  const signature = crypto.createHmac('sha256', SECRET).update(`${header}.${body}`).digest('base64url')
  return `${header}.${body}.${signature}`
}

const clients = []

/** A supabase-js client of one node. */
function client(node, { key = jwt() } = {}) {
  const supabase = createClient(node.http, key, { auth: { persistSession: false, autoRefreshToken: false } })
  clients.push(supabase)
  return supabase
}

/** Subscribes; resolves {channel, error}, error being null once joined or the reason otherwise. */
function join(channel) {
  return new Promise((resolve) => {
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') resolve({ channel, error: null })
      else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT' || status === 'CLOSED') {
        resolve({ channel, error: `${status}: ${err ? err.message : ''}` })
      }
    })
  })
}

/** Subscribes and resolves once joined; rejects with the server's reason otherwise. */
async function subscribe(channel) {
  const { error } = await join(channel)
  if (error) throw new Error(error)
  return channel
}

/** Resolves when predicate() holds (it may be async); rejects after `ms`. */
async function waitFor(predicate, ms = WAIT, what = 'condition') {
  const deadline = Date.now() + ms
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Runs one statement on a node (a standby takes reads only). */
async function sql(node, text, params = []) {
  const c = new Client({ connectionString: node.pg })
  c.on('error', () => {})
  await c.connect()
  try {
    return await c.query(text, params)
  } finally {
    await c.end()
  }
}

async function pgClient(node) {
  const c = new Client({ connectionString: node.pg })
  await c.connect()
  return c
}

/**
 * Calls sendProbe(n) until every inbox holds a message with event 'probe'. A subscription on
 * one node need not be known to the others at the instant its join is answered; what must
 * hold is that once a message got through, none after it is lost.
 */
async function untilHeard(sendProbe, inboxes, what) {
  const heard = () => inboxes.every((inbox) => inbox.some((m) => m.event === 'probe'))
  const deadline = Date.now() + WAIT
  for (let n = 0; !heard(); n++) {
    if (Date.now() > deadline) throw new Error(`no probe got through: ${what}`)
    await sendProbe(n)
    await sleep(300)
  }
}

async function closeAll() {
  for (const supabase of clients.splice(0)) {
    await supabase.removeAllChannels()
    supabase.realtime.disconnect()
  }
}

let counter = 0
/** A topic no other test uses. */
const topic = (name) => `${name}-${process.pid}-${++counter}`

module.exports = { NODES, PRIMARY, STANDBYS, WAIT, jwt, client, join, subscribe, waitFor, sleep, sql, pgClient, untilHeard, closeAll, topic }
