// An HTTP server whose event loop can be wedged on purpose: on SIGUSR2 it writes
// STUCK_FILE (so the test knows) and then spins forever, never reading its channel again.
// On SIGUSR1 it does the same but spins only while STUCK_FILE exists: the test deletes it
// to let the loop run again.
'use strict';
const fs = require('fs');
const http = require('http');

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

process.on('SIGUSR2', () => {
  fs.writeFileSync(process.env.STUCK_FILE, String(process.pid));
  for (;;) {
    // A worker stuck in synchronous code: no I/O, no timers, no IPC.
  }
});

process.on('SIGUSR1', () => {
  fs.writeFileSync(process.env.STUCK_FILE, String(process.pid));
  while (fs.existsSync(process.env.STUCK_FILE)) {
    // Stuck until the test lets go: no timers, no IPC, only this file's check.
  }
});
