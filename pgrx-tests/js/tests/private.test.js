// Private channels: RLS policies on realtime.messages decide who joins, reads and writes.
// An authorization matrix of roles x policies x actions; every cell asserts delivered or not.
'use strict'
const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const { client, waitFor, sleep, sql, closeAll, topic, jwt } = require('./helpers')

after(closeAll)

// Each policy applies to topics with its own prefix, so the cells do not interfere.
before(async () => {
  await sql('SELECT realtime.setup_api_roles()')
  await sql(`
    DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE policyname = 'test_read') THEN
        CREATE FUNCTION public.test_policy_raises() RETURNS boolean LANGUAGE plpgsql AS
          'BEGIN RAISE EXCEPTION ''policy exploded''; END';
        CREATE POLICY test_read ON realtime.messages FOR SELECT TO authenticated
          USING (realtime.topic() LIKE 'ro-%' OR realtime.topic() LIKE 'rw-%');
        CREATE POLICY test_write ON realtime.messages FOR INSERT TO authenticated
          WITH CHECK (realtime.topic() LIKE 'rw-%');
        CREATE POLICY test_presence_read ON realtime.messages FOR SELECT TO authenticated
          USING (realtime.topic() LIKE 'pres-%' AND extension = 'presence');
        CREATE POLICY test_presence_write ON realtime.messages FOR INSERT TO authenticated
          WITH CHECK (realtime.topic() LIKE 'pres-%' AND extension = 'presence');
        CREATE POLICY test_raises ON realtime.messages FOR SELECT TO authenticated
          USING (realtime.topic() LIKE 'raise-%' AND public.test_policy_raises());
        CREATE POLICY test_own ON realtime.messages FOR SELECT TO authenticated
          USING (realtime.topic() = 'user-' || current_setting('request.jwt.claim.sub', true));
      END IF;
    END $$`)
})

const roles = {
  anon: () => jwt({ role: 'anon' }),
  alice: () => jwt({ role: 'authenticated', sub: 'alice' }),
  bob: () => jwt({ role: 'authenticated', sub: 'bob' }),
  ghost: () => jwt({ role: 'no_such_role' }),
  service: () => jwt({ role: 'service_role' }),
}

/** Joins a private channel; resolves {channel, error}. */
function join(key, room, { presence = false, received = [], presenceSeen = null } = {}) {
  const supabase = client({ key })
  const config = { private: true, broadcast: { ack: true } }
  if (presence) config.presence = { key: `k-${Math.random()}`, enabled: true }
  const channel = supabase.channel(room, { config })
  channel.on('broadcast', { event: '*' }, (m) => received.push(m))
  if (presenceSeen) channel.on('presence', { event: 'sync' }, () => presenceSeen.push(channel.presenceState()))
  return new Promise((resolve) => {
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') resolve({ channel, error: null })
      else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT' || status === 'CLOSED') {
        resolve({ channel, error: `${status}: ${err ? err.message : ''}` })
      }
    })
  })
}

// What each role may do on each kind of topic: [join/read broadcast, send broadcast].
const expected = {
  'none-': { anon: [false, false], alice: [false, false], bob: [false, false], ghost: [false, false], service: [true, true] },
  'ro-': { anon: [false, false], alice: [true, false], bob: [true, false], ghost: [false, false], service: [true, true] },
  'rw-': { anon: [false, false], alice: [true, true], bob: [true, true], ghost: [false, false], service: [true, true] },
  'user-alice': { anon: [false, false], alice: [true, false], bob: [false, false], ghost: [false, false], service: [true, true] },
  'raise-': { anon: [false, false], alice: [false, false], bob: [false, false], ghost: [false, false], service: [true, true] },
}

for (const [kind, cells] of Object.entries(expected)) {
  test(`broadcast matrix on ${kind} topics`, async () => {
    const room = kind === 'user-alice' ? 'user-alice' : topic(kind)
    const inbox = {}
    const joined = {}
    for (const [role, [mayRead]] of Object.entries(cells)) {
      inbox[role] = []
      const { channel, error } = await join(roles[role](), room, { received: inbox[role] })
      joined[role] = error ? null : channel
      if (mayRead) assert.equal(error, null, `${role} may join ${kind}`)
      else {
        assert.match(String(error), /Unauthorized/, `${role} may not join ${kind}`)
        if (role === 'ghost') assert.match(error, /no_such_role/, 'the reason names the missing role')
        if (kind === 'raise-' && (role === 'alice' || role === 'bob')) assert.match(error, /policy exploded/, 'the reason carries the policy error')
      }
    }

    // A broadcast from every joined role: delivered only when that role may write, and
    // only to the roles that may read (self is off, so never to the sender itself).
    for (const [role, [, mayWrite]] of Object.entries(cells)) {
      if (!joined[role]) continue
      const status = await joined[role].send({ type: 'broadcast', event: `from-${role}`, payload: { role } })
      assert.equal(status, mayWrite ? 'ok' : 'error', `${role} sending on ${kind}`)
    }
    // A message from the database, sent by the owner (no policy applies to the sender).
    await sql("SELECT realtime.send('{\"db\": true}', 'from-db', $1, true)", [room])

    const readers = Object.keys(cells).filter((r) => cells[r][0])
    const writers = Object.keys(cells).filter((r) => cells[r][1] && joined[r])
    const wanted = (role) => writers.filter((w) => w !== role).length + 1
    await waitFor(() => readers.every((r) => inbox[r].length >= wanted(r)), 10000, `deliveries on ${kind}`)
    await sleep(300)
    for (const role of Object.keys(cells)) {
      const events = inbox[role].map((m) => m.event).sort()
      const want = cells[role][0] ? [...writers.filter((w) => w !== role).map((w) => `from-${w}`), 'from-db'].sort() : []
      assert.deepEqual(events, want, `what ${role} received on ${kind}`)
    }
    for (const role of Object.keys(joined)) if (joined[role]) await joined[role].unsubscribe()
  })
}

// Write rights are checked at the first write, as on Supabase; the writes sent meanwhile wait
// for that answer and keep their order.
test('writes sent right after joining wait for the write check and keep their order', async () => {
  const room = topic('rw-')
  const received = []
  const reader = await join(roles.bob(), room, { received })
  assert.equal(reader.error, null)
  const writer = await join(roles.alice(), room)
  assert.equal(writer.error, null)
  const sends = []
  for (let i = 0; i < 20; i++) sends.push(writer.channel.send({ type: 'broadcast', event: 'seq', payload: { i } }))
  assert.deepEqual(await Promise.all(sends), Array(20).fill('ok'), 'every send acked')
  await waitFor(() => received.length >= 20, 10000, 'all 20 delivered')
  assert.deepEqual(received.map((m) => m.payload.i), [...Array(20).keys()], 'in the order sent')
})

test('a new token is checked for writes again at the next write', async () => {
  const room = topic('rw-')
  const received = []
  const reader = await join(roles.bob(), room, { received })
  assert.equal(reader.error, null)
  const { channel } = await join(roles.alice(), room)
  assert.equal(await channel.send({ type: 'broadcast', event: 'before', payload: {} }), 'ok')
  // A role that may read everything (so the channel stays) and write nothing.
  await sql(`DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'test_reader_only') THEN
        CREATE ROLE test_reader_only NOLOGIN NOINHERIT;
        GRANT USAGE ON SCHEMA realtime TO test_reader_only;
        GRANT SELECT, INSERT ON realtime.messages TO test_reader_only;
        CREATE POLICY test_reader_only_read ON realtime.messages FOR SELECT TO test_reader_only USING (true);
      END IF;
    END $$`)
  await channel.socket.setAuth(jwt({ role: 'test_reader_only', sub: 'alice' }))
  assert.equal(await channel.send({ type: 'broadcast', event: 'after', payload: {} }), 'error',
    'the refreshed token may not write')
  await sleep(300)
  assert.deepEqual(received.map((m) => m.event), ['before'], 'nothing sent after the refresh was delivered')
})

test('presence-only policy: presence works, broadcast does not', async () => {
  const room = topic('pres-')
  const received = []
  const seen = []
  const a = await join(roles.alice(), room, { presence: true, received, presenceSeen: seen })
  assert.equal(a.error, null, 'presence read lets the join through')
  const b = await join(roles.bob(), room, { presence: true })
  assert.equal(b.error, null)
  assert.equal(await b.channel.track({ who: 'bob' }), 'ok')
  await waitFor(() => seen.some((s) => Object.values(s).flat().some((m) => m.who === 'bob')), 10000, 'bob in alice\'s presence')
  assert.equal(await b.channel.send({ type: 'broadcast', event: 'x', payload: {} }), 'error', 'no broadcast write')
  await sql("SELECT realtime.send('{}', 'db', $1, true)", [room])
  await sleep(500)
  assert.deepEqual(received, [], 'no broadcast read')
})

test('track without presence write is refused', async () => {
  const room = topic('ro-')
  const a = await join(roles.alice(), room, { presence: true })
  assert.equal(a.error, null)
  assert.notEqual(await a.channel.track({ who: 'alice' }), 'ok')
})

test('public and private channels of one name never mix', async () => {
  const room = topic('rw-')
  const priv = []
  const pub = []
  const p = await join(roles.alice(), room, { received: priv })
  assert.equal(p.error, null)
  const publicChannel = client({ key: roles.alice() }).channel(room)
  publicChannel.on('broadcast', { event: '*' }, (m) => pub.push(m))
  await new Promise((resolve) => publicChannel.subscribe((s) => s === 'SUBSCRIBED' && resolve()))
  await sql("SELECT realtime.send('{}', 'to-private', $1, true), realtime.send('{}', 'to-public', $1, false)", [room])
  const sender = await join(roles.bob(), room)
  assert.equal(await sender.channel.send({ type: 'broadcast', event: 'ws-private', payload: {} }), 'ok')
  await waitFor(() => priv.length === 2 && pub.length === 1, 10000, 'one message each side')
  await sleep(300)
  assert.deepEqual(priv.map((m) => m.event).sort(), ['to-private', 'ws-private'])
  assert.deepEqual(pub.map((m) => m.event), ['to-public'])
})

test('REST: private sends need the write policy', async () => {
  const room = topic('ro-')
  const received = []
  const r = await join(roles.bob(), room, { received })
  assert.equal(r.error, null)
  const single = (key, t) =>
    fetch(`${process.env.PG_REALTIME_HTTP_URL}/realtime/v1/api/broadcast/${encodeURIComponent(t)}/events/single?private=true`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ via: 'single' }),
    })
  const batch = (key, t) =>
    fetch(`${process.env.PG_REALTIME_HTTP_URL}/realtime/v1/api/broadcast`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ messages: [{ topic: t, event: 'batch', payload: { t }, private: true }] }),
    })
  // alice can only read ro- topics: the batch endpoint answers 202 (as Supabase) but drops it.
  assert.equal((await batch(roles.alice(), room)).status, 202)
  // service_role bypasses RLS: delivered.
  assert.equal((await batch(roles.service(), room)).status, 202)
  await waitFor(() => received.length === 1, 10000, 'the service_role batch message')
  await sleep(300)
  assert.equal(received.length, 1, 'the unauthorized batch message was dropped')
  // The single endpoint says so: 403 for alice, 202 for service_role.
  const refused = await single(roles.alice(), room)
  assert.equal(refused.status, 403)
  assert.deepEqual(await refused.json(), { message: 'Unauthorized' })
  assert.equal((await single(roles.service(), room)).status, 202)
  await waitFor(() => received.length === 2, 10000, 'the service_role single message')
  assert.deepEqual(received[1].payload, { via: 'single' })
})

test('a token refresh that loses permission ends the channel', async () => {
  const room = 'user-alice'
  const { channel, error } = await join(roles.alice(), room)
  assert.equal(error, null)
  const system = []
  channel.on('system', {}, (m) => system.push(m))
  // Bob's token: valid, but the policy lets only alice read user-alice.
  await channel.socket.setAuth(roles.bob())
  await waitFor(() => system.length > 0, 10000, 'the system message')
  assert.match(JSON.stringify(system), /no longer have permission/)
  await waitFor(() => channel.state === 'closed' || channel.state === 'errored', 10000, 'the channel to close')
})

test('a token that expires while joined ends the channel', async () => {
  const room = topic('rw-')
  const now = Math.floor(Date.now() / 1000)
  const { channel, error } = await join(jwt({ role: 'authenticated', sub: 'alice', exp: now + 2 }), room)
  assert.equal(error, null)
  const system = []
  channel.on('system', {}, (m) => system.push(m))
  await waitFor(() => system.length > 0, 10000, 'the expiry system message')
  assert.match(JSON.stringify(system), /Token has expired/)
})

test('injection-shaped topics and claims are inert', async () => {
  const room = "rw-'); DROP TABLE realtime.messages; --"
  const { error } = await join(jwt({ role: 'authenticated', sub: "x'; DROP TABLE realtime.messages; --" }), room)
  assert.equal(error, null)
  const evil = await join(jwt({ role: "authenticated'; DROP TABLE realtime.messages; --" }), topic('rw-'))
  assert.match(String(evil.error), /Unauthorized/)
  const { rows } = await sql("SELECT to_regclass('realtime.messages') IS NOT NULL AS present")
  assert.equal(rows[0].present, true)
})

test('replay: stored messages since a time, oldest first, limited, never twice', async () => {
  const room = topic('rw-')
  const since = Date.now() - 1000
  for (let i = 1; i <= 5; i++) await sql("SELECT realtime.send(jsonb_build_object('n', $2::int), 'old', $1, true)", [room, i])
  // A public message of the same topic is not replayed to the private channel.
  await sql("SELECT realtime.send('{\"n\": 99}', 'old', $1, false)", [room])
  const received = []
  const supabase = client({ key: roles.alice() })
  const channel = supabase.channel(room, { config: { private: true, broadcast: { replay: { since, limit: 3 } } } })
  channel.on('broadcast', { event: '*' }, (m) => received.push(m))
  await new Promise((resolve, reject) =>
    channel.subscribe((status, err) => (status === 'SUBSCRIBED' ? resolve() : status !== 'CLOSED' && err && reject(err))),
  )
  await waitFor(() => received.length === 3, 10000, 'three replayed messages')
  assert.deepEqual(received.map((m) => m.payload.n), [3, 4, 5], 'the newest three, oldest first')
  assert.ok(received.every((m) => m.meta && m.meta.replayed === true && m.meta.id === m.payload.id))
  await sql("SELECT realtime.send('{\"n\": 6}', 'new', $1, true)", [room])
  await waitFor(() => received.length === 4, 10000, 'the live message')
  await sleep(300)
  assert.deepEqual(received.map((m) => m.payload.n), [3, 4, 5, 6])
  assert.equal(received[3].meta.replayed, undefined, 'live messages are not marked replayed')

  // Replay on a public channel is refused with Supabase's reason.
  const refused = await new Promise((resolve) => {
    const ch = client({ key: roles.alice() }).channel(topic('rw-'))
    ch.params.config.broadcast.replay = { since, limit: 1 }
    ch.subscribe((status, err) => status !== 'SUBSCRIBED' && err && resolve(err.message))
  })
  assert.match(refused, /Replay is not allowed for public channels/)
})
