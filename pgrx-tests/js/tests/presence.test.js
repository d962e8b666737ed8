// Presence from supabase-js: track, untrack, sync/join/leave events, several metas per key.
'use strict'
const { test, after } = require('node:test')
const assert = require('node:assert/strict')
const { client, subscribe, waitFor, closeAll, topic } = require('./helpers')

after(closeAll)

/** A channel with presence enabled that records its events. */
function member(room, key) {
  const events = { sync: 0, join: [], leave: [] }
  const config = { presence: { enabled: true } }
  if (key) config.presence.key = key
  const channel = client().channel(room, { config })
  channel
    .on('presence', { event: 'sync' }, () => events.sync++)
    .on('presence', { event: 'join' }, (e) => events.join.push(e))
    .on('presence', { event: 'leave' }, (e) => events.leave.push(e))
  return { channel, events }
}

const metas = (channel, key) => channel.presenceState()[key] || []

test('two clients see each other; join, sync and leave fire', async () => {
  const room = topic('presence')
  const a = member(room, 'alice')
  const b = member(room, 'bob')
  await subscribe(a.channel)
  await subscribe(b.channel)
  assert.equal(await a.channel.track({ name: 'Alice' }), 'ok')
  assert.equal(await b.channel.track({ name: 'Bob' }), 'ok')
  await waitFor(() => metas(a.channel, 'bob').length === 1 && metas(b.channel, 'alice').length === 1, 10000, 'mutual presence')
  assert.equal(metas(a.channel, 'bob')[0].name, 'Bob')
  assert.equal(metas(b.channel, 'alice')[0].name, 'Alice')
  assert.ok(a.events.sync > 0, 'sync fired')
  assert.ok(a.events.join.some((e) => e.key === 'bob'), 'join fired for bob')

  await b.channel.unsubscribe()
  await waitFor(() => metas(a.channel, 'bob').length === 0, 10000, 'bob to leave')
  assert.ok(a.events.leave.some((e) => e.key === 'bob'), 'leave fired for bob')
})

test('an update replaces the meta instead of adding one', async () => {
  const room = topic('presence-update')
  const a = member(room, 'watcher')
  const b = member(room, 'mover')
  await subscribe(a.channel)
  await subscribe(b.channel)
  await b.channel.track({ x: 1 })
  await waitFor(() => metas(a.channel, 'mover')[0]?.x === 1, 10000, 'first meta')
  await b.channel.track({ x: 2 })
  await waitFor(() => metas(a.channel, 'mover')[0]?.x === 2, 10000, 'updated meta')
  assert.equal(metas(a.channel, 'mover').length, 1, 'one meta after an update')
})

test('one key from two connections gives two metas; untrack removes one', async () => {
  const room = topic('presence-multi')
  const watcher = member(room, 'watcher')
  const phone = member(room, 'carol')
  const laptop = member(room, 'carol')
  for (const m of [watcher, phone, laptop]) await subscribe(m.channel)
  await phone.channel.track({ device: 'phone' })
  await laptop.channel.track({ device: 'laptop' })
  await waitFor(() => metas(watcher.channel, 'carol').length === 2, 10000, 'two metas for carol')
  assert.deepEqual(metas(watcher.channel, 'carol').map((m) => m.device).sort(), ['laptop', 'phone'])
  assert.equal(await phone.channel.untrack(), 'ok')
  await waitFor(() => metas(watcher.channel, 'carol').length === 1, 10000, 'one meta left')
  assert.equal(metas(watcher.channel, 'carol')[0].device, 'laptop')
})

test('a late joiner gets the whole state; a closed socket leaves', async () => {
  const room = topic('presence-late')
  const early = member(room, 'early')
  await subscribe(early.channel)
  await early.channel.track({ here: true })
  const goner = member(room, 'goner')
  await subscribe(goner.channel)
  await goner.channel.track({ here: true })
  const late = member(room, 'late')
  await subscribe(late.channel)
  await waitFor(() => metas(late.channel, 'early').length === 1 && metas(late.channel, 'goner').length === 1, 10000, 'the state on join')
  // Close the goner's whole socket, not just the channel.
  goner.channel.socket.disconnect()
  await waitFor(() => metas(late.channel, 'goner').length === 0, 10000, 'the closed socket to leave')
  assert.equal(metas(late.channel, 'early').length, 1)
})

test('without a key, each join gets its own', async () => {
  const room = topic('presence-nokey')
  const a = member(room)
  const b = member(room)
  await subscribe(a.channel)
  await subscribe(b.channel)
  await a.channel.track({ who: 'a' })
  await b.channel.track({ who: 'b' })
  await waitFor(() => Object.keys(a.channel.presenceState()).length === 2, 10000, 'two keys')
  const keys = Object.keys(a.channel.presenceState())
  assert.notEqual(keys[0], keys[1])
})

// Presence shared with SQL: realtime.presence / track / untrack / occupancy.

const { sql, pgClient } = require('./helpers')

const sqlMembers = async (room) =>
  (await sql('SELECT key, payload, origin, connection_id, expires_at FROM realtime.presence($1) ORDER BY key', [room])).rows

test('a socket-tracked member appears in realtime.presence() and leaves with its socket', async () => {
  const room = topic('sql-sees-sockets')
  const a = member(room, 'alice')
  await subscribe(a.channel)
  await a.channel.track({ status: 'online' })
  let rows = []
  await waitFor(async () => (rows = await sqlMembers(room)).length === 1, 10000, 'the member in SQL')
  assert.equal(rows.length, 1, 'the socket member is visible from SQL')
  assert.equal(rows[0].key, 'alice')
  assert.deepEqual(rows[0].payload, { status: 'online' })
  assert.equal(rows[0].origin, 'socket')
  assert.notEqual(rows[0].connection_id, null)
  const occ = (await sql('SELECT * FROM realtime.occupancy($1)', [room])).rows[0]
  assert.equal(Number(occ.keys), 1)
  assert.equal(Number(occ.connections), 1)

  a.channel.socket.disconnect()
  await waitFor(async () => (await sqlMembers(room)).length === 0, 10000, 'the member to leave SQL')
  assert.deepEqual(await sqlMembers(room), [], 'gone once the socket closed')
})

test('realtime.track from SQL reaches clients after commit; untrack removes it; rollback is never seen', async () => {
  const room = topic('sql-track')
  const w = member(room, 'watcher')
  await subscribe(w.channel)

  // A rolled-back track.
  const c = await pgClient()
  c.on('error', () => {})
  await c.query('BEGIN')
  await c.query("SELECT realtime.track($1, 'ghost', '{\"x\": 1}')", [room])
  await c.query('ROLLBACK')
  // A committed one.
  await sql("SELECT realtime.track($1, 'job-1', '{\"kind\": \"worker\"}')", [room])
  await waitFor(() => metas(w.channel, 'job-1').length === 1, 10000, 'the SQL member')
  assert.equal(metas(w.channel, 'job-1')[0].kind, 'worker')
  assert.equal(metas(w.channel, 'ghost').length, 0, 'the rolled-back track was never seen')
  assert.ok(w.events.join.some((e) => e.key === 'job-1'), 'a join event fired')

  // Tracking again updates the meta.
  await sql("SELECT realtime.track($1, 'job-1', '{\"kind\": \"busy\"}')", [room])
  await waitFor(() => metas(w.channel, 'job-1')[0]?.kind === 'busy', 10000, 'the updated meta')
  assert.equal(metas(w.channel, 'job-1').length, 1)

  // A late joiner gets it in presence_state.
  const late = member(room, 'late')
  await subscribe(late.channel)
  await waitFor(() => metas(late.channel, 'job-1').length === 1, 10000, 'the SQL member for a late joiner')

  const rows = await sqlMembers(room)
  assert.deepEqual(rows.map((r) => [r.key, r.origin]), [['job-1', 'sql']])

  const removed = (await sql("SELECT realtime.untrack($1, 'job-1') AS removed", [room])).rows[0].removed
  assert.equal(removed, true)
  await waitFor(() => metas(w.channel, 'job-1').length === 0, 10000, 'the SQL member to leave')
  assert.ok(w.events.leave.some((e) => e.key === 'job-1'), 'a leave event fired')
  await c.end()
})

test('a ttl entry expires by itself', async () => {
  const room = topic('sql-ttl')
  const w = member(room, 'watcher')
  await subscribe(w.channel)
  await sql("SELECT realtime.track($1, 'brief', '{}', false, interval '1 second')", [room])
  await waitFor(() => metas(w.channel, 'brief').length === 1, 10000, 'the ttl member')
  const [row] = await sqlMembers(room)
  assert.notEqual(row.expires_at, null)
  await waitFor(() => metas(w.channel, 'brief').length === 0, 15000, 'the ttl member to expire')
  assert.deepEqual(await sqlMembers(room), [])
})

test('occupancy counts keys and connections across sockets and SQL', async () => {
  const room = topic('occupancy')
  const a = member(room, 'same')
  const b = member(room, 'same')
  await subscribe(a.channel)
  await subscribe(b.channel)
  await a.channel.track({ d: 1 })
  await b.channel.track({ d: 2 })
  await sql("SELECT realtime.track($1, 'sql-key', '{}')", [room])
  let occ
  const occupancy = async () => (occ = (await sql('SELECT keys, connections FROM realtime.occupancy($1)', [room])).rows[0])
  await waitFor(async () => Number((await occupancy()).connections) === 2, 10000, 'two connections')
  assert.deepEqual([Number(occ.keys), Number(occ.connections)], [2, 2])
  await sql("SELECT realtime.untrack($1, 'sql-key')", [room])
})

test('thirty members joining at once all converge (diffs are coalesced, nothing lost)', async () => {
  const room = topic('crowd')
  const members = Array.from({ length: 30 }, (_, i) => member(room, `m${i}`))
  await Promise.all(members.map((m) => subscribe(m.channel)))
  await Promise.all(members.map((m, i) => m.channel.track({ i })))
  await waitFor(() => members.every((m) => Object.keys(m.channel.presenceState()).length === 30), 20000, 'everyone sees everyone')
  // Half leave at once.
  await Promise.all(members.slice(0, 15).map((m) => m.channel.untrack()))
  await waitFor(() => members.slice(15).every((m) => Object.keys(m.channel.presenceState()).length === 15), 20000, 'the leaves')
})

test('more presence calls than the per-channel limit close the channel', async () => {
  const room = topic('presence-limit')
  const m = member(room, 'chatty')
  const system = []
  m.channel.on('system', {}, (s) => system.push(s))
  await subscribe(m.channel)
  for (let i = 0; i < 5; i++) assert.equal(await m.channel.track({ i }), 'ok', `call ${i + 1} is within the limit`)
  void m.channel.track({ i: 6 })
  await waitFor(() => system.length > 0, 10000, 'the rate-limit system message')
  assert.match(JSON.stringify(system), /Client presence rate limit exceeded/)
})
