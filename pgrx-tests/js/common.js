// What the single-node (tests/) and multi-node (tests-multinode/) supabase-js suites share.
// Nothing here reads the environment: each suite's helpers.js does, and passes it in.
'use strict'
const crypto = require('node:crypto')
const { createClient } = require('@supabase/supabase-js')
const { Client } = require('pg')

/** Reads a variable the Rust test that runs the suite sets. */
function env(name, runner) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: run these tests through ${runner}`)
  return value
}

const b64url = (buf) => Buffer.from(buf).toString('base64url')

/** An HS256 token for `claims` (role anon, valid for an hour, unless claims say otherwise). */
function sign(claims, secret) {
  const now = Math.floor(Date.now() / 1000)
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64url(JSON.stringify({ role: 'anon', iat: now, exp: now + 3600, ...claims }))
  const signature = crypto.createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url')
  return `${header}.${body}.${signature}`
}

const clients = []

/** A supabase-js client of `url`, closed by closeAll(). */
function openClient(url, key, realtime) {
  const options = { auth: { persistSession: false, autoRefreshToken: false } }
  if (realtime) options.realtime = realtime
  const supabase = createClient(url, key, options)
  clients.push(supabase)
  return supabase
}

async function closeAll() {
  for (const supabase of clients.splice(0)) {
    await supabase.removeAllChannels()
    supabase.realtime.disconnect()
  }
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

/** Runs one statement on its own connection. */
async function sql(connectionString, text, params = []) {
  const c = new Client({ connectionString })
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

async function pgClient(connectionString) {
  const c = new Client({ connectionString })
  await c.connect()
  return c
}

let counter = 0
/** A topic no other test uses. */
const topic = (name) => `${name}-${process.pid}-${++counter}`

module.exports = { env, sign, openClient, closeAll, join, subscribe, waitFor, sleep, sql, pgClient, topic }
