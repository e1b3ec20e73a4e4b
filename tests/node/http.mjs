// The same server as an ES module: `import`, top-level `await`, and no `require`.
import http from 'node:http';
import { once } from 'node:events';

const server = http.createServer((req, res) => {
  const body = JSON.stringify({
    pid: process.pid,
    slot: process.env.PROCESSES_WORKER_ID,
    port: req.socket.localPort,
    version: process.version,
    kind: typeof require === 'undefined' ? 'esm' : 'cjs',
  });
  res.writeHead(200, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
    connection: 'close',
  });
  res.end(body);
});
server.listen(Number(process.env.PORT));
await once(server, 'listening');
