// A plain CommonJS HTTP server that knows nothing about processes: it listens on PORT (and
// on PORT2 as well when that is set, and on the unix socket path SOCK when that is set) and
// answers every request with who served it. With
// HOST_SLOT<n> set, the worker in slot n listens on that host (`listen(PORT, HOST)`).
'use strict';
const http = require('http');

function handler(req, res) {
  const body = JSON.stringify({
    pid: process.pid,
    slot: process.env.PROCESSES_WORKER_ID,
    port: req.socket.localPort,
    version: process.version,
    kind: 'cjs',
  });
  res.writeHead(200, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
    connection: 'close',
  });
  res.end(body);
}

const host = process.env['HOST_SLOT' + process.env.PROCESSES_WORKER_ID];
for (const name of ['PORT', 'PORT2']) {
  const port = process.env[name];
  if (port && host) http.createServer(handler).listen(Number(port), host);
  else if (port) http.createServer(handler).listen(Number(port));
}
if (process.env.SOCK) http.createServer(handler).listen(process.env.SOCK);
