// An https client for the tests: N requests to 127.0.0.1:PORT, each on a new TLS
// connection that offers the session ticket from the previous one. Prints one JSON array:
// [{pid, reused}, …]. A ticket issued by one worker is accepted by another only if both
// use the same ticket keys: those that the master echoes to every worker as `data`.
'use strict';
const tls = require('tls');

const [port, n] = process.argv.slice(2).map(Number);

function once(session) {
  return new Promise((resolve, reject) => {
    let next = session;
    const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, session });
    s.on('session', (t) => {
      next = t;
    });
    let reused = false;
    s.once('secureConnect', () => {
      reused = s.isSessionReused();
      s.write('GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n');
    });
    let data = '';
    s.setEncoding('utf8');
    s.on('data', (d) => {
      data += d;
    });
    s.on('error', reject);
    s.on('close', () => {
      const [head, body] = data.split('\r\n\r\n');
      if (!head || !head.startsWith('HTTP/1.1 200')) {
        reject(new Error(`bad response: ${JSON.stringify(data)}`));
        return;
      }
      resolve({ result: { pid: JSON.parse(body).pid, reused }, next });
    });
  });
}

(async () => {
  const results = [];
  let session;
  for (let i = 0; i < n; i++) {
    const r = await once(session);
    results.push(r.result);
    session = r.next;
  }
  console.log(JSON.stringify(results));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
