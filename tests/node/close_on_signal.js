// An HTTP server on a port the master picks (`listen(0)`): workers of two apps running it
// ask with the same key text (`null:0:4:undefined:0`). With LISTEN_AFTER (a path) it
// listens only once that file exists, so a test can order two apps' requests. On SIGUSR2
// it closes its server (Node sends the master `close` for its key), then sends the
// master a message of its own: the master reads the channel in order, so once it logs
// that message it has handled the `close`. The process stays up after the close.
'use strict';
const fs = require('fs');
const http = require('http');

const server = http.createServer((req, res) => {
  const body = JSON.stringify({
    pid: process.pid,
    slot: process.env.PROCESSES_WORKER_ID,
    app: process.env.PROCESSES_APP,
  });
  res.writeHead(200, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
    connection: 'close',
  });
  res.end(body);
});

function listen() {
  server.listen(0);
}

const gate = process.env.LISTEN_AFTER;
if (gate) {
  const poll = setInterval(() => {
    if (fs.existsSync(gate)) {
      clearInterval(poll);
      listen();
    }
  }, 20);
} else {
  listen();
}

process.on('SIGUSR2', () => {
  server.close();
  process.send({ closed: process.env.PROCESSES_APP + ':' + process.env.PROCESSES_WORKER_ID });
});

// Alive without a server until the master stops it.
setInterval(() => {}, 1 << 30);
