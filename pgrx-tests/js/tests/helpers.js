// Shared by the supabase-js tests. The cluster is started by pgrx-tests/tests/supabase_js.rs,
// which passes its coordinates in the environment.
'use strict'
const common = require('../common')

const env = (name) => common.env(name, 'cargo test -p realtime-integration-tests')
const WS_URL = env('PG_REALTIME_HTTP_URL')
const PG_URL = env('PG_REALTIME_PG_URL')
const SECRET = env('PG_REALTIME_JWT_SECRET')

/** An HS256 token signed with the cluster's secret. */
const jwt = (claims = {}, secret = SECRET) => common.sign(claims, secret)

function client({ key = jwt(), vsn } = {}) {
  return common.openClient(WS_URL, key, vsn ? { vsn } : undefined)
}

const sql = (text, params = []) => common.sql(PG_URL, text, params)
const pgClient = () => common.pgClient(PG_URL)
const { subscribe, waitFor, sleep, closeAll, topic } = common

module.exports = { WS_URL, SECRET, jwt, client, subscribe, waitFor, sleep, sql, pgClient, closeAll, topic }
