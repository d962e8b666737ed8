// Private channels on a standby: the primary's RLS policies decide, with the same answers.
'use strict'
const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const { PRIMARY, STANDBYS, client, join, waitFor, closeAll, topic, jwt, sql, untilHeard } = require('./helpers')

after(closeAll)

before(async () => {
  await sql(PRIMARY, `
    DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE policyname = 'mn_js_read') THEN
        CREATE POLICY mn_js_read ON realtime.messages FOR SELECT TO authenticated
          USING (realtime.topic() LIKE 'ok-%');
        CREATE POLICY mn_js_write ON realtime.messages FOR INSERT TO authenticated
          WITH CHECK (realtime.topic() LIKE 'ok-%');
      END IF;
    END $$`)
  // Checks may be answered by the primary, but a standby that has not replayed the policies
  // yet must not be what makes this test pass or fail.
  for (const node of STANDBYS) {
    await waitFor(async () => (await sql(node, "SELECT 1 FROM pg_policies WHERE policyname = 'mn_js_write'")).rowCount === 1,
      undefined, `the policies on ${node.name}`)
  }
})

const privateChannel = (node, key, room) => client(node, { key }).channel(room, { config: { private: true, broadcast: { ack: true } } })

test('a standby answers private joins as the primary does', async () => {
  const alice = jwt({ role: 'authenticated', sub: 'alice' })
  const cases = [
    [alice, topic('ok-'), true],
    [alice, topic('no-'), false],
    [jwt({ role: 'anon' }), topic('ok-'), false],
    [jwt({ role: 'no_such_role' }), topic('ok-'), false],
  ]
  for (const [key, room, allowed] of cases) {
    const onPrimary = await join(privateChannel(PRIMARY, key, room))
    const onStandby = await join(privateChannel(STANDBYS[0], key, room))
    assert.equal(onPrimary.error === null, allowed, `on the primary, ${room}: ${onPrimary.error}`)
    assert.equal(onStandby.error, onPrimary.error, `${room}: the standby answers as the primary`)
  }
})

test('a private channel on a standby receives and sends what the policies allow', async () => {
  const room = topic('ok-')
  const alice = jwt({ role: 'authenticated', sub: 'alice' })
  const onStandby = []
  const reader = await join(privateChannel(STANDBYS[0], alice, room).on('broadcast', { event: '*' }, (m) => onStandby.push(m)))
  assert.equal(reader.error, null)
  await sql(PRIMARY, `SELECT realtime.send('{"from": "primary"}', 'db', $1, true)`, [room])
  await waitFor(() => onStandby.some((m) => m.event === 'db'), undefined, 'the private message on the standby')

  const onPrimary = []
  const watcher = await join(privateChannel(PRIMARY, jwt({ role: 'service_role' }), room).on('broadcast', { event: '*' }, (m) => onPrimary.push(m)))
  assert.equal(watcher.error, null)
  await untilHeard(async (n) => {
    assert.equal(await reader.channel.send({ type: 'broadcast', event: 'probe', payload: { n } }), 'ok')
  }, [onPrimary], 'a private broadcast from the standby')
})
