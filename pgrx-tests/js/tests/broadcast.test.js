'use strict'
const { test, after } = require('node:test')
const assert = require('node:assert/strict')
const { client, subscribe, waitFor, sleep, closeAll, topic, jwt, WS_URL } = require('./helpers')

after(closeAll)

test('broadcast between two clients, sender excluded by default', async () => {
  const room = topic('room')
  const got = []
  const mine = []
  const receiver = await subscribe(client().channel(room).on('broadcast', { event: 'msg' }, (m) => got.push(m)))
  const sender = await subscribe(client().channel(room).on('broadcast', { event: 'msg' }, (m) => mine.push(m)))
  assert.equal(await sender.send({ type: 'broadcast', event: 'msg', payload: { text: 'hi' } }), 'ok')
  await waitFor(() => got.length === 1, 10000, 'the broadcast')
  assert.equal(got[0].event, 'msg')
  assert.deepEqual(got[0].payload, { text: 'hi' })
  await sleep(200)
  assert.equal(mine.length, 0, 'self is false by default')
  void receiver
})

test('self and ack', async () => {
  const room = topic('self-ack')
  const mine = []
  const ch = await subscribe(
    client()
      .channel(room, { config: { broadcast: { self: true, ack: true } } })
      .on('broadcast', { event: '*' }, (m) => mine.push(m)),
  )
  assert.equal(await ch.send({ type: 'broadcast', event: 'echo', payload: { n: 1 } }), 'ok')
  await waitFor(() => mine.length === 1, 10000, 'the echo')
  assert.deepEqual(mine[0].payload, { n: 1 })
})

test('event filters are honoured', async () => {
  const room = topic('filters')
  const a = []
  const all = []
  await subscribe(
    client()
      .channel(room)
      .on('broadcast', { event: 'a' }, (m) => a.push(m))
      .on('broadcast', { event: '*' }, (m) => all.push(m)),
  )
  const sender = await subscribe(client().channel(room))
  await sender.send({ type: 'broadcast', event: 'a', payload: {} })
  await sender.send({ type: 'broadcast', event: 'b', payload: {} })
  await waitFor(() => all.length === 2, 10000, 'both events')
  assert.equal(a.length, 1)
  assert.deepEqual(all.map((m) => m.event), ['a', 'b'])
})

test('200 messages arrive complete and in order', async () => {
  const room = topic('order')
  const got = []
  await subscribe(client().channel(room).on('broadcast', { event: 'n' }, (m) => got.push(m.payload.i)))
  const sender = await subscribe(client().channel(room))
  for (let i = 0; i < 200; i++) sender.send({ type: 'broadcast', event: 'n', payload: { i } })
  await waitFor(() => got.length === 200, 20000, '200 messages')
  assert.deepEqual(got, Array.from({ length: 200 }, (_, i) => i))
})

test('REST batch endpoint (send before joining) and httpSend', async () => {
  const room = topic('rest')
  const got = []
  await subscribe(client().channel(room).on('broadcast', { event: '*' }, (m) => got.push(m)))
  const response = await fetch(`${WS_URL}/realtime/v1/api/broadcast`, {
    method: 'POST',
    headers: { apikey: jwt(), 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ topic: room, event: 'batch', payload: { via: 'rest' } }] }),
  })
  assert.equal(response.status, 202)
  const sender = client().channel(room)
  const result = await sender.httpSend('single', { via: 'httpSend' })
  assert.equal(result.success, true, JSON.stringify(result))
  await waitFor(() => got.length === 2, 10000, 'two REST messages')
  const byEvent = Object.fromEntries(got.map((m) => [m.event, m.payload]))
  assert.deepEqual(byEvent.batch, { via: 'rest' })
  assert.deepEqual(byEvent.single, { via: 'httpSend' })
})

test('a vsn 1.0.0 client talks to a 2.0.0 client', async () => {
  const room = topic('v1')
  const got1 = []
  const got2 = []
  const v1 = await subscribe(client({ vsn: '1.0.0' }).channel(room).on('broadcast', { event: '*' }, (m) => got1.push(m)))
  const v2 = await subscribe(client().channel(room).on('broadcast', { event: '*' }, (m) => got2.push(m)))
  await v1.send({ type: 'broadcast', event: 'from-v1', payload: { a: 1 } })
  await v2.send({ type: 'broadcast', event: 'from-v2', payload: { b: 2 } })
  await waitFor(() => got1.length === 1 && got2.length === 1, 10000, 'cross-version delivery')
  assert.deepEqual(got2[0].payload, { a: 1 })
  assert.deepEqual(got1[0].payload, { b: 2 })
})

test('a bad and an expired token are refused', async () => {
  const room = topic('tokens')
  const bad = client({ key: jwt({}, 'not-the-secret-not-the-secret-not-the') })
  await assert.rejects(
    Promise.race([
      subscribe(bad.channel(room)),
      new Promise((_, reject) => setTimeout(() => reject(new Error('not joined')), 3000)),
    ]),
  )
  const now = Math.floor(Date.now() / 1000)
  const expired = client({ key: jwt({ exp: now - 60 }) })
  await assert.rejects(
    Promise.race([
      subscribe(expired.channel(room)),
      new Promise((_, reject) => setTimeout(() => reject(new Error('not joined')), 3000)),
    ]),
  )
  // A good token on the same server still works.
  await subscribe(client().channel(room))
})
