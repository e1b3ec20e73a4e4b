// A cluster HTTP server that takes its time: it calls listen(PORT) only after
// LISTEN_DELAY_MS, the way an app that loads its config or warms a cache first does.
'use strict';
const http = require('http');

setTimeout(() => {
  http
    .createServer((req, res) => {
      const body = JSON.stringify({ pid: process.pid, slot: process.env.PROCESSES_WORKER_ID });
      res.writeHead(200, {
        'content-type': 'application/json',
        'content-length': Buffer.byteLength(body),
        connection: 'close',
      });
      res.end(body);
    })
    .listen(Number(process.env.PORT));
}, Number(process.env.LISTEN_DELAY_MS));
