'use strict'
const { test, after } = require('node:test')
const assert = require('node:assert/strict')
const { client, subscribe, waitFor, sleep, closeAll, topic, sql, pgClient } = require('./helpers')

after(closeAll)

test('realtime.send reaches subscribers after commit, with meta.id', async () => {
  const room = topic('db')
  const got = []
  await subscribe(client().channel(room).on('broadcast', { event: '*' }, (m) => got.push(m)))
  const c = await pgClient()
  try {
    await c.query('BEGIN')
    await c.query(`SELECT realtime.send('{"text":"hi"}', 'new', $1, false)`, [room])
    await sleep(300)
    assert.equal(got.length, 0, 'nothing before commit')
    await c.query('COMMIT')
  } finally {
    await c.end()
  }
  await waitFor(() => got.length === 1, 10000, 'the committed message')
  assert.equal(got[0].event, 'new')
  assert.equal(got[0].payload.text, 'hi')
  assert.equal(got[0].meta.id, got[0].payload.id)
})

test('a row trigger calling realtime.send reaches a subscriber', async () => {
  const room = topic('changes')
  const got = []
  await subscribe(client().channel(room).on('broadcast', { event: 'INSERT' }, (m) => got.push(m)))
  await sql(`CREATE TABLE IF NOT EXISTS public.js_notes (id serial PRIMARY KEY, room text, body text)`)
  await sql(`CREATE OR REPLACE FUNCTION public.js_notes_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM realtime.send(jsonb_build_object('record', to_jsonb(NEW), 'operation', TG_OP), TG_OP, NEW.room, false);
      RETURN NULL;
    END $$`)
  await sql(`CREATE OR REPLACE TRIGGER js_notes_changed AFTER INSERT ON public.js_notes
             FOR EACH ROW EXECUTE FUNCTION public.js_notes_changed()`)
  await sql(`INSERT INTO public.js_notes (room, body) VALUES ($1, 'hello')`, [room])
  await waitFor(() => got.length === 1, 10000, 'the trigger message')
  assert.equal(got[0].payload.record.body, 'hello')
  assert.equal(got[0].payload.operation, 'INSERT')
})

test('binary payloads from send_binary arrive as bytes', async () => {
  const room = topic('binary')
  const got = []
  await subscribe(client().channel(room).on('broadcast', { event: 'blob' }, (m) => got.push(m)))
  await sql(`SELECT realtime.send_binary('\\x0001ff'::bytea, 'blob', $1, false)`, [room])
  await waitFor(() => got.length === 1, 10000, 'the binary message')
  assert.deepEqual([...new Uint8Array(got[0].payload)], [0, 1, 255])
})

test('a worker killed with SIGKILL comes back and clients reconnect and receive', async () => {
  const room = topic('crash')
  const got = []
  await subscribe(client().channel(room).on('broadcast', { event: '*' }, (m) => got.push(m)))
  const { rows } = await sql(`SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_realtime'`)
  assert.equal(rows.length, 1)
  process.kill(rows[0].pid, 'SIGKILL')
  // The database recovers, the worker restarts, phoenix.js reconnects and rejoins by itself;
  // keep sending until a message gets through.
  const deadline = Date.now() + 90000
  while (got.length === 0 && Date.now() < deadline) {
    try {
      await sql(`SELECT realtime.send('{"after":"crash"}', 'back', $1, false)`, [room])
    } catch (e) {
      // the database is still recovering
    }
    await sleep(500)
  }
  assert.ok(got.length > 0, 'a message after the crash')
  assert.equal(got[0].payload.after, 'crash')
})
