// Presence across nodes: tracked on one node, seen in presenceState() and realtime.presence()
// on every node; untracked, gone everywhere.
'use strict'
const { test, after } = require('node:test')
const assert = require('node:assert/strict')
const { NODES, STANDBYS, client, subscribe, waitFor, closeAll, topic, sql } = require('./helpers')

after(closeAll)

const metas = (channel, key) => channel.presenceState()[key] || []

/** The socket members realtime.presence(room) lists on a node ([] while it errors). */
async function sqlKeys(node, room) {
  try {
    const { rows } = await sql(node, "SELECT key FROM realtime.presence($1) WHERE origin = 'socket'", [room])
    return rows.map((r) => r.key)
  } catch {
    return []
  }
}

test('track on a standby: presenceState() on the primary and the other standby has it', async () => {
  const room = topic('presence')
  const [a, c] = STANDBYS
  const b = NODES[0]
  const watchers = []
  for (const [node, key] of [[b, 'watcher-b'], [c, 'watcher-c']]) {
    const channel = client(node).channel(room, { config: { presence: { key, enabled: true } } })
    await subscribe(channel)
    assert.equal(await channel.track({ at: node.name }), 'ok')
    watchers.push(channel)
  }
  const alice = client(a).channel(room, { config: { presence: { key: 'alice', enabled: true } } })
  await subscribe(alice)
  assert.equal(await alice.track({ name: 'Alice' }), 'ok')

  for (const [k, w] of watchers.entries()) {
    await waitFor(() => metas(w, 'alice').length === 1, undefined, `alice in presenceState() on ${[b, c][k].name}`)
    assert.equal(metas(w, 'alice')[0].name, 'Alice')
  }
  await waitFor(() => metas(alice, 'watcher-b').length === 1 && metas(alice, 'watcher-c').length === 1, undefined, 'the other nodes\' members on the standby')
  for (const node of NODES) {
    await waitFor(async () => (await sqlKeys(node, room)).includes('alice'), undefined, `alice in realtime.presence() on ${node.name}`)
  }

  assert.equal(await alice.untrack(), 'ok')
  for (const [k, w] of watchers.entries()) {
    await waitFor(() => metas(w, 'alice').length === 0, undefined, `alice gone on ${[b, c][k].name}`)
  }
  for (const node of NODES) {
    await waitFor(async () => !(await sqlKeys(node, room)).includes('alice'), undefined, `alice gone from realtime.presence() on ${node.name}`)
  }
})
