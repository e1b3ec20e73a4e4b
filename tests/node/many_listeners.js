// A cluster worker that opens 70 servers on port 0, one after another (each `listen(0)` is a
// new listener for the primary to bind), and prints how many it got and why the others
// failed: `LISTENERS ok=N failed=M codes=…`. Then it serves nothing and stays up.
'use strict';
const net = require('net');

const WANT = 70;
let ok = 0;
const codes = new Set();

function next(i) {
  if (i === WANT) {
    console.log(`LISTENERS ok=${ok} failed=${WANT - ok} codes=${[...codes].sort().join(',')}`);
    return;
  }
  const server = net.createServer((s) => s.end());
  server.once('listening', () => {
    ok++;
    next(i + 1);
  });
  server.once('error', (e) => {
    codes.add(e.code);
    next(i + 1);
  });
  server.listen(0, '127.0.0.1');
}
next(0);
