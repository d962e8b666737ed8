// The usual do-it-yourself realtime setup, as a benchmark peer for pg_realtime: one Postgres
// connection LISTENs on every channel a client asked for, and each NOTIFY payload is written
// as-is to every WebSocket subscribed to that channel.
//
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres PORT=8099 node server.js
//   client: ws://127.0.0.1:8099/<channel>
'use strict';
const { Client } = require('pg');
const { WebSocketServer } = require('ws');

const port = Number(process.env.PORT || 8099);
const rooms = new Map(); // channel -> Set<WebSocket>

async function main() {
  const pg = new Client({ connectionString: process.env.DATABASE_URL });
  await pg.connect();
  pg.on('notification', ({ channel, payload }) => {
    const room = rooms.get(channel);
    if (room) for (const ws of room) ws.send(payload);
  });
  pg.on('error', (e) => {
    console.error('postgres:', e.message);
    process.exit(1);
  });

  const wss = new WebSocketServer({ port, host: '127.0.0.1' });
  wss.on('connection', async (ws, req) => {
    const channel = new URL(req.url, 'http://localhost').pathname.slice(1);
    // Channel names go into LISTEN unquoted: allow only plain identifiers.
    if (!/^[a-z_][a-z0-9_]{0,62}$/.test(channel)) {
      ws.close(1008, 'bad channel');
      return;
    }
    let room = rooms.get(channel);
    if (!room) {
      room = new Set();
      rooms.set(channel, room);
      await pg.query(`LISTEN ${channel}`);
    }
    room.add(ws);
    ws.on('close', () => room.delete(ws));
    ws.on('error', () => room.delete(ws));
  });
  wss.on('listening', () => console.log(`notify-bridge listening on ${port}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
