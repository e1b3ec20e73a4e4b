// Trivial HTTP server for benches/http.sh: answers every request with "hi\n".
// Listens on process.env.PORT. Runs unchanged alone, under `processes`, under Node's
// cluster module (benches/app/cluster.js) and under PM2.
const http = require('http');

const port = Number(process.env.PORT || 3000);
http
  .createServer((req, res) => {
    res.end('hi\n');
  })
  .listen(port);
