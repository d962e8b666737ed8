// Client broadcasts cross nodes: sent on one node, received on every other, in order.
'use strict'
const { test, after } = require('node:test')
const assert = require('node:assert/strict')
const { NODES, STANDBYS, client, subscribe, waitFor, sleep, untilHeard, closeAll, topic } = require('./helpers')

after(closeAll)

for (const sender of NODES) {
  test(`channel.send on ${sender.name} reaches the other nodes`, async () => {
    const room = topic(`from-${sender.name}`)
    const others = NODES.filter((n) => n !== sender)
    const inboxes = []
    for (const node of others) {
      const inbox = []
      inboxes.push(inbox)
      await subscribe(client(node).channel(room).on('broadcast', { event: '*' }, (m) => inbox.push(m)))
    }
    const mine = []
    const channel = await subscribe(
      client(sender)
        .channel(room, { config: { broadcast: { self: false, ack: true } } })
        .on('broadcast', { event: '*' }, (m) => mine.push(m)),
    )
    await untilHeard((n) => channel.send({ type: 'broadcast', event: 'probe', payload: { n } }), inboxes, `from ${sender.name}`)
    const acks = []
    for (let i = 0; i < 20; i++) acks.push(channel.send({ type: 'broadcast', event: 'n', payload: { i } }))
    assert.deepEqual(await Promise.all(acks), Array(20).fill('ok'), 'every send acknowledged')
    const numbered = (inbox) => inbox.filter((m) => m.event === 'n').map((m) => m.payload.i)
    await waitFor(() => inboxes.every((inbox) => numbered(inbox).length >= 20), undefined, 'all 20 on every other node')
    for (const [k, inbox] of inboxes.entries()) {
      assert.deepEqual(numbered(inbox), [...Array(20).keys()], `${others[k].name}: all, in order`)
    }
    await sleep(300)
    assert.deepEqual(mine, [], 'self is false: nothing comes back to the sender')
  })
}

test('httpSend to a standby reaches the primary and the other standby', async () => {
  const room = topic('rest')
  const [first, second] = STANDBYS
  const inboxes = [[], []]
  await subscribe(client(NODES[0]).channel(room).on('broadcast', { event: '*' }, (m) => inboxes[0].push(m)))
  await subscribe(client(second).channel(room).on('broadcast', { event: '*' }, (m) => inboxes[1].push(m)))
  const sender = client(first).channel(room)
  const send = async (event, payload) => {
    const result = await sender.httpSend(event, payload)
    assert.equal(result.success, true, JSON.stringify(result))
  }
  await untilHeard((n) => send('probe', { n }), inboxes, 'httpSend to a standby')
  for (let i = 0; i < 5; i++) await send('n', { i })
  const numbered = (inbox) => inbox.filter((m) => m.event === 'n').map((m) => m.payload.i)
  await waitFor(() => inboxes.every((inbox) => numbered(inbox).length >= 5), undefined, 'the REST messages')
  for (const inbox of inboxes) assert.deepEqual(numbered(inbox), [0, 1, 2, 3, 4])
})
