// A Node worker that also asks the master for its app's port in made-up ways, as a buggy or
// hostile worker could: one 600-byte address, then 20 different ones. ODD_KEYS=after asks
// after its real server listens (its connections must still come under the real key);
// ODD_KEYS=before asks first, so the first key it holds is one it has no server for.
'use strict';
const http = require('http');

const port = Number(process.env.PORT);
let seq = 100000;
function ask(address) {
  process.send({ cmd: 'NODE_CLUSTER', act: 'queryServer', address, port, addressType: 4, fd: -1, seq: seq++ });
}
function askOddly() {
  ask('x'.repeat(600));
  for (let i = 0; i < 20; i++) ask('odd-' + i);
}

if (process.env.ODD_KEYS === 'before') ask('odd-first');
const server = http.createServer((req, res) => {
  const body = JSON.stringify({ pid: process.pid });
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), connection: 'close' });
  res.end(body);
});
server.listen(port, () => {
  if (process.env.ODD_KEYS === 'after') askOddly();
});
