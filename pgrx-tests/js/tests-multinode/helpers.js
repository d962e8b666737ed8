// Shared by the multi-node supabase-js tests. The primary and its standbys are started by
// pgrx-tests/tests/multinode.rs, which passes them in PG_REALTIME_NODES as a JSON array of
// {name, http, pg}, the primary first.
'use strict'
const common = require('../common')

const env = (name) => common.env(name, 'cargo test -p realtime-integration-tests --test multinode')
const NODES = JSON.parse(env('PG_REALTIME_NODES'))
const SECRET = env('PG_REALTIME_JWT_SECRET')
const [PRIMARY, ...STANDBYS] = NODES
if (STANDBYS.length < 2) throw new Error('PG_REALTIME_NODES must list a primary and at least two standbys')

/** Cross-node effects go through replication: generous, and never a speed limit. */
const WAIT = 30000

/** An HS256 token signed with the nodes' secret. */
const jwt = (claims = {}) => common.sign(claims, SECRET)

/** A supabase-js client of one node. */
const client = (node, { key = jwt() } = {}) => common.openClient(node.http, key)

const waitFor = (predicate, ms = WAIT, what = 'condition') => common.waitFor(predicate, ms, what)
/** Runs one statement on a node (a standby takes reads only). */
const sql = (node, text, params = []) => common.sql(node.pg, text, params)
const pgClient = (node) => common.pgClient(node.pg)
const { join, subscribe, sleep, closeAll, topic } = common

/**
 * Calls sendProbe(n) until every inbox holds a message with event 'probe'. A subscription on
 * one node need not be known to the others at the instant its join is answered; what must
 * hold is that once a message got through, none after it is lost.
 */
async function untilHeard(sendProbe, inboxes, what) {
  const heard = () => inboxes.every((inbox) => inbox.some((m) => m.event === 'probe'))
  const deadline = Date.now() + WAIT
  for (let n = 0; !heard(); n++) {
    if (Date.now() > deadline) throw new Error(`no probe got through: ${what}`)
    await sendProbe(n)
    await sleep(300)
  }
}

module.exports = { NODES, PRIMARY, STANDBYS, WAIT, jwt, client, join, subscribe, waitFor, sleep, sql, pgClient, untilHeard, closeAll, topic }
