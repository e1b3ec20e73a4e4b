// A worker that never listens: the master passes each accepted connection as
// `process.on('message', (msg, socket) => …)`, the way child_process.fork() parents send
// sockets. It answers with the envelope it got, so the test can check it.
'use strict';
const net = require('net');

process.on('message', (msg, socket) => {
  if (!socket) return;
  const info = {
    pid: process.pid,
    msg,
    isSocket: socket instanceof net.Socket,
  };
  let buf = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk) => {
    buf += chunk;
    if (!buf.includes('\r\n\r\n')) return;
    const body = JSON.stringify(info);
    socket.end(
      `HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
    );
  });
  socket.on('error', () => {});
});
process.send('ready');
