// Database messages committed on the primary reach every node, after commit, in one order.
'use strict'
const { test, after } = require('node:test')
const assert = require('node:assert/strict')
const { NODES, PRIMARY, client, subscribe, waitFor, closeAll, topic, pgClient } = require('./helpers')

after(closeAll)

test('realtime.send on the primary: every node, the same order, nothing rolled back', async () => {
  const room = topic('db')
  const inboxes = []
  for (const node of NODES) {
    const inbox = []
    inboxes.push(inbox)
    await subscribe(client(node).channel(room).on('broadcast', { event: '*' }, (m) => inbox.push(m.payload.k)))
  }
  const c = await pgClient(PRIMARY)
  const held = await pgClient(PRIMARY)
  const committed = []
  try {
    // Sent first, committed after the others: it must come after them everywhere.
    await held.query('BEGIN')
    await held.query(`SELECT realtime.send('{"k": "held"}', 'e', $1, false)`, [room])
    for (let i = 0; i < 100; i++) {
      await c.query(`SELECT realtime.send(jsonb_build_object('k', $1::text), 'e', $2, false)`, [`m${i}`, room])
      committed.push(`m${i}`)
      if (i % 10 === 0) {
        await c.query('BEGIN')
        await c.query(`SELECT realtime.send(jsonb_build_object('k', $1::text), 'e', $2, false)`, [`rolled-back-${i}`, room])
        await c.query('ROLLBACK')
      }
    }
    await held.query('COMMIT')
    committed.push('held')
  } finally {
    await c.end()
    await held.end()
  }
  await waitFor(() => inboxes.every((inbox) => inbox.includes('held')), undefined, 'every message on every node')
  for (const [k, inbox] of inboxes.entries()) {
    assert.deepEqual(inbox, committed, `${NODES[k].name}: what was committed, in commit order`)
  }
})
