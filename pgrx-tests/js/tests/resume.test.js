// Gap-free delivery with the stock client: remember the last `meta.offset`, rejoin with it.
// The pattern below is the one the README shows.
'use strict'
const { test, after } = require('node:test')
const assert = require('node:assert/strict')
const { client, waitFor, sleep, sql, closeAll, topic, jwt } = require('./helpers')

after(closeAll)

const serviceKey = () => jwt({ role: 'service_role' })

/**
 * A private channel that resumes after the last message it saw whenever realtime-js joins it
 * again (after a reconnect, too): the join payload holds the same `replay` object, so moving
 * its offset moves every later join. `offset`: where a new channel starts (the join is sent
 * at once when the socket is open). `raw` gets every delivery, `seen` the ones kept.
 */
function resumable(supabase, room, offset) {
  const replay = { since: Date.now() }
  if (offset) replay.offset = offset
  const raw = []
  const seen = []
  const gaps = []
  const channel = supabase.channel(room, { config: { private: true, broadcast: { replay } } })
  channel.on('broadcast', { event: '*' }, (m) => {
    raw.push(m)
    const offset = m.meta && m.meta.offset
    if (offset) {
      if (replay.offset && offset <= replay.offset) return
      replay.offset = offset
    }
    seen.push(m)
  })
  channel.on('system', {}, (s) => {
    if (typeof s.message === 'string' && s.message.startsWith('Replay gap:')) gaps.push(s.message)
  })
  const subscribed = new Promise((resolve, reject) => {
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') resolve()
      else if (status === 'CHANNEL_ERROR' && !seen.length) reject(err || new Error(status))
    })
  })
  return { channel, replay, raw, seen, gaps, subscribed }
}

const send = (room, n) =>
  sql(`SELECT realtime.send(jsonb_build_object('n', $1::int), 'e', $2, true)`, [n, room])

test('database messages carry an offset, in commit order', async () => {
  const room = topic('offsets')
  const r = resumable(client({ key: serviceKey() }), room)
  await r.subscribed
  for (let n = 1; n <= 3; n++) await send(room, n)
  await waitFor(() => r.seen.length === 3, 10000, 'three messages')
  const offsets = r.seen.map((m) => m.meta.offset)
  assert.ok(offsets.every((o) => /^[0-9A-F]{16}-[0-9A-F]{8}$/.test(o)), offsets.join())
  assert.deepEqual([...offsets].sort(), offsets)
  assert.equal(new Set(offsets).size, 3)
  assert.deepEqual(r.seen.map((m) => m.payload.n), [1, 2, 3])
})

test('a subscriber that misses database and persisted messages rejoins with its last offset and gets exactly those, then live ones', async () => {
  const room = topic('missed')
  const supabase = client({ key: serviceKey() })
  const first = resumable(supabase, room)
  await first.subscribed
  await send(room, 0)
  await waitFor(() => first.seen.length === 1, 10000, 'the first message')
  const last = first.replay.offset
  await supabase.removeChannel(first.channel)

  // Missed meanwhile: database messages and client broadcasts stored with `persist`, mixed.
  const sender = client({ key: serviceKey() }).channel(room, {
    config: { private: true, broadcast: { ack: true } },
  })
  await new Promise((resolve, reject) =>
    sender.subscribe((status, err) => (status === 'SUBSCRIBED' ? resolve() : err && reject(err))),
  )
  for (let n = 1; n <= 5; n++) {
    if (n % 2 === 0) {
      const sent = await sender.send({ type: 'broadcast', event: 'e', payload: { n }, persist: true })
      assert.equal(sent, 'ok', `persisted ${n}`)
    } else {
      await send(room, n)
    }
  }
  // A fresh channel that starts from the remembered offset.
  const again = resumable(supabase, room, last)
  await again.subscribed
  await waitFor(() => again.seen.length === 5, 10000, 'the five missed messages')
  assert.deepEqual(again.seen.map((m) => m.payload.n), [1, 2, 3, 4, 5])
  assert.ok(again.seen.every((m) => m.meta.replayed === true))
  await send(room, 6)
  await waitFor(() => again.seen.length === 6, 10000, 'the live message')
  assert.equal(again.seen[5].payload.n, 6)
  assert.equal(again.seen[5].meta.replayed, undefined)
  await sleep(300)
  assert.equal(again.raw.length, 6, 'the server sent nothing twice')
  assert.deepEqual(again.gaps, [])
})

test('across a crash of the worker the client reconnects by itself and misses nothing', async () => {
  const room = topic('restart')
  const r = resumable(client({ key: serviceKey() }), room)
  await r.subscribed
  await send(room, 0)
  await waitFor(() => r.seen.length === 1, 10000, 'the first message')

  // SIGKILL: the postmaster resets every backend and starts the worker again at once;
  // realtime-js reconnects within a second and rejoins with the offset it moved along.
  // (A clean restart of the worker keeps its sockets closed for the restart delay, 5 s,
  // which Node 20's WebSocket does not retry after its first refused reconnect; the raw-frame
  // tests cover the clean restart.)
  const workerPid = `SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_realtime'`
  const { rows } = await sql(workerPid)
  assert.equal(rows.length, 1)
  const killed = rows[0].pid
  process.kill(killed, 'SIGKILL')
  // Send only once the cluster answers again with a new worker. A statement that reaches an
  // old backend in the instant before the postmaster stops it can commit into the queue the
  // restart then wipes: the server cannot deliver that message or give it an offset, and a
  // resume across it is told so with a `Replay gap:` (README, "Limits"). That is not what this
  // test is about: it checks that what commits while the client is away is replayed.
  const deadline = Date.now() + 90000
  for (;;) {
    assert.ok(Date.now() < deadline, 'the cluster did not come back with a new worker')
    const now = await sql(workerPid).catch(() => ({ rows: [] }))
    if (now.rows.length === 1 && now.rows[0].pid !== killed) break
    await sleep(50)
  }
  const sent = []
  for (let n = 1; n <= 5 && Date.now() < deadline; ) {
    try {
      await send(room, n)
      sent.push(n)
      n++
    } catch (e) {
      await sleep(200) // the database is still recovering
    }
  }
  assert.deepEqual(sent, [1, 2, 3, 4, 5])
  try {
    await waitFor(() => r.seen.length >= 6, 60000, 'the missed messages after the reconnect')
  } catch (e) {
    // Say what the client got and what the server stored, so that a failure explains itself.
    const { rows } = await sql(
      `SELECT payload->>'n' AS n, commit_lsn::text, commit_index FROM realtime.messages
        WHERE topic = $1 ORDER BY inserted_at`,
      [room],
    )
    const horizon = await sql('SELECT lost_through::text FROM realtime.replay_horizon')
    const got = r.raw.map((m) => [m.payload.n, m.meta && m.meta.offset, m.meta && m.meta.replayed])
    throw new Error(
      `${e.message}; received ${JSON.stringify(got)}, gaps ${JSON.stringify(r.gaps)}, ` +
        `channel state ${r.channel.state}, stored ${JSON.stringify(rows)}, ` +
        `horizon ${JSON.stringify(horizon.rows)}`,
    )
  }
  await send(room, 6)
  await waitFor(() => r.seen.length === 7, 10000, 'the live message')
  assert.deepEqual(r.seen.map((m) => m.payload.n), [0, 1, 2, 3, 4, 5, 6])
  await sleep(300)
  assert.equal(r.raw.length, 7, 'the server sent nothing twice')
  // After a crash the server cannot know whether it stored every offset it delivered, so a
  // resume from before it may be told of a gap; nothing is missing here all the same.
  assert.ok(r.gaps.every((g) => g.startsWith('Replay gap:')))
})
