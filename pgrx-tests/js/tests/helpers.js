// Shared by the supabase-js tests. The cluster is started by pgrx-tests/tests/supabase_js.rs,
// which passes its coordinates in the environment.
'use strict'
const crypto = require('node:crypto')
const { createClient } = require('@supabase/supabase-js')
const { Client } = require('pg')

const env = (name) => {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: run these tests through cargo test -p realtime-integration-tests`)
  return value
}
const WS_URL = env('PG_REALTIME_HTTP_URL')
const PG_URL = env('PG_REALTIME_PG_URL')
const SECRET = env('PG_REALTIME_JWT_SECRET')

const b64url = (buf) => Buffer.from(buf).toString('base64url')

/** An HS256 token signed with the cluster's secret. */
function jwt(claims = {}, secret = SECRET) {
  const now = Math.floor(Date.now() / 1000)
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64url(JSON.stringify({ role: 'anon', iat: now, exp: now + 3600, ...claims }))
  const signature = crypto.createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url')
  return `${header}.${body}.${signature}`
}

const clients = []

function client({ key = jwt(), vsn } = {}) {
  const options = { auth: { persistSession: false, autoRefreshToken: false } }
  if (vsn) options.realtime = { vsn }
  const supabase = createClient(WS_URL, key, options)
  clients.push(supabase)
  return supabase
}

/** Subscribes and resolves once joined; rejects with the server's reason otherwise. */
function subscribe(channel) {
  return new Promise((resolve, reject) => {
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') resolve(channel)
      else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT' || status === 'CLOSED') {
        reject(new Error(`${status}: ${err ? err.message : ''}`))
      }
    })
  })
}

/**
 * Resolves when predicate() holds (it may be async, e.g. a query); rejects after `ms`.
 * Waits for events, never times them.
 */
async function waitFor(predicate, ms = 10000, what = 'condition') {
  const deadline = Date.now() + ms
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function sql(text, params = []) {
  const c = new Client({ connectionString: PG_URL })
  // A connection the server drops (crash recovery) emits 'error' besides rejecting the query;
  // the rejection is what callers handle.
  c.on('error', () => {})
  await c.connect()
  try {
    return await c.query(text, params)
  } finally {
    await c.end()
  }
}

async function pgClient() {
  const c = new Client({ connectionString: PG_URL })
  await c.connect()
  return c
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

module.exports = { WS_URL, SECRET, jwt, client, subscribe, waitFor, sleep, sql, pgClient, closeAll, topic }
