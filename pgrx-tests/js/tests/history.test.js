// Persisted broadcasts: send({..., persist}) and httpSend(..., { persist }) store the message in
// realtime.messages when the INSERT policies allow extension = 'persistence'; it is delivered
// once, after commit, with meta.id.
'use strict'
const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const { client, subscribe, waitFor, sleep, sql, closeAll, topic, jwt } = require('./helpers')

after(closeAll)

// Topics of this file start with `pjs-`: authenticated and anon read and broadcast there;
// only authenticated may store.
before(async () => {
  await sql('SELECT realtime.setup_api_roles()')
  await sql(`
    DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE policyname = 'pjs_read') THEN
        CREATE POLICY pjs_read ON realtime.messages FOR SELECT TO anon, authenticated
          USING (realtime.topic() LIKE 'pjs-%');
        CREATE POLICY pjs_write ON realtime.messages FOR INSERT TO anon, authenticated
          WITH CHECK (realtime.topic() LIKE 'pjs-%' AND extension = 'broadcast');
        CREATE POLICY pjs_store ON realtime.messages FOR INSERT TO authenticated
          WITH CHECK (realtime.topic() LIKE 'pjs-%' AND extension = 'persistence');
      END IF;
    END $$`)
})

const member = () => jwt({ role: 'authenticated', sub: 'member' })

/** A private channel on `room` whose broadcasts land in `inbox`. */
async function joined(key, room, broadcast = { ack: true }, inbox = []) {
  const channel = client({ key }).channel(room, { config: { private: true, broadcast } })
  channel.on('broadcast', { event: '*' }, (m) => inbox.push(m))
  await subscribe(channel)
  return channel
}

async function row(id) {
  const { rows } = await sql(
    `SELECT topic, extension, event, payload, private,
            extract(epoch FROM expires_at - inserted_at)::int AS ttl
       FROM realtime.messages WHERE id = $1::uuid`,
    [id],
  )
  return rows[0]
}

test('a persisted send is stored and delivered once, with meta.id, not to its sender', async () => {
  const room = topic('pjs-stored')
  const sent = []
  const got = []
  const sender = await joined(member(), room, { ack: true }, sent)
  await joined(member(), room, {}, got)
  const status = await sender.send({ type: 'broadcast', event: 'note', payload: { n: 1 }, persist: true })
  assert.equal(status, 'ok')
  await waitFor(() => got.length === 1, 10000, 'the stored message')
  assert.equal(got[0].event, 'note')
  assert.deepEqual(got[0].payload, { n: 1 })
  const id = got[0].meta && got[0].meta.id
  assert.match(String(id), /^[0-9a-f-]{36}$/, 'meta.id is the row id')
  const stored = await row(id)
  assert.deepEqual(
    { topic: stored.topic, extension: stored.extension, event: stored.event, payload: stored.payload, private: stored.private },
    { topic: room, extension: 'broadcast', event: 'note', payload: { n: 1 }, private: true },
  )
  assert.equal(stored.ttl, null, 'no ttl, no expiry')
  await sleep(500)
  assert.equal(got.length, 1, 'delivered once')
  assert.equal(sent.length, 0, 'broadcast.self is off')
})

test('with broadcast.self the sender receives its persisted message once', async () => {
  const room = topic('pjs-self')
  const sent = []
  const sender = await joined(member(), room, { ack: true, self: true }, sent)
  assert.equal(await sender.send({ type: 'broadcast', event: 'note', payload: { n: 2 }, persist: true }), 'ok')
  await waitFor(() => sent.length === 1, 10000, 'its own stored message')
  assert.ok(sent[0].meta.id)
  await sleep(500)
  assert.equal(sent.length, 1)
})

test('a ttl is stored as expires_at', async () => {
  const room = topic('pjs-ttl')
  const got = []
  const sender = await joined(member(), room)
  await joined(member(), room, {}, got)
  assert.equal(await sender.send({ type: 'broadcast', event: 'note', payload: {}, persist: { ttl: 120 } }), 'ok')
  await waitFor(() => got.length === 1, 10000, 'the stored message')
  assert.equal((await row(got[0].meta.id)).ttl, 120)
})

test('without the persistence policy a persisted send is refused, not delivered, not stored', async () => {
  const room = topic('pjs-denied')
  const got = []
  const sender = await joined(jwt({ role: 'anon' }), room)
  await joined(member(), room, {}, got)
  const status = await sender.send({ type: 'broadcast', event: 'note', payload: { n: 3 }, persist: true })
  // realtime-js resolves a refused persisted send with the server's reason.
  assert.equal(status, `Unauthorized: You do not have permissions to store messages on this Channel topic: ${room}`)
  await sleep(500)
  assert.equal(got.length, 0, 'nothing delivered')
  const { rows } = await sql('SELECT count(*)::int AS n FROM realtime.messages WHERE topic = $1 AND event IS NOT NULL', [room])
  assert.equal(rows[0].n, 0, 'nothing stored')
  // The same channel still broadcasts without persist.
  assert.equal(await sender.send({ type: 'broadcast', event: 'live', payload: { n: 4 } }), 'ok')
  await waitFor(() => got.length === 1, 10000, 'the live message')
  assert.equal(got[0].event, 'live')
})

test('httpSend with persist stores the message and it is delivered once', async () => {
  const room = topic('pjs-rest')
  const got = []
  const reader = await joined(member(), room, {}, got)
  const sender = client({ key: member() }).channel(room, { config: { private: true } })
  const result = await sender.httpSend('note', { via: 'rest' }, { persist: { ttl: 60 } })
  assert.deepEqual(result, { success: true })
  await waitFor(() => got.length === 1, 10000, 'the stored message')
  assert.deepEqual(got[0].payload, { via: 'rest' })
  const stored = await row(got[0].meta.id)
  assert.equal(stored.topic, room)
  assert.equal(stored.ttl, 60)
  await sleep(500)
  assert.equal(got.length, 1)
  assert.ok(reader)
})
