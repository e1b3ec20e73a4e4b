// An https server: under cluster, tls.Server sends its session ticket keys as `data` in
// queryServer and crashes unless the primary echoes them back (NODE-IPC.md §3).
'use strict';
const fs = require('fs');
const https = require('https');

https
  .createServer(
    { key: fs.readFileSync(process.env.TLS_KEY), cert: fs.readFileSync(process.env.TLS_CERT) },
    (req, res) => {
      const body = JSON.stringify({
        pid: process.pid,
        slot: process.env.PROCESSES_WORKER_ID,
        port: req.socket.localPort,
        version: process.version,
        kind: 'https',
      });
      res.writeHead(200, {
        'content-type': 'application/json',
        'content-length': Buffer.byteLength(body),
        connection: 'close',
      });
      res.end(body);
    },
  )
  .listen(Number(process.env.PORT));
