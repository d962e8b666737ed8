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
