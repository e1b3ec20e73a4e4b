// A UDP echo server: `bind(PORT)` in a cluster worker always asks the primary for a shared
// handle (dgram.Native). Each datagram is answered with "<pid> <the datagram>".
'use strict';
const dgram = require('dgram');

const sock = dgram.createSocket('udp4');
sock.on('message', (msg, rinfo) => {
  sock.send(`${process.pid} ${msg}`, rinfo.port, rinfo.address);
});
sock.bind(Number(process.env.PORT));
