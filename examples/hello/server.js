// A plain Node HTTP server: nothing in it knows about processes.
// `processes run -i 4 -- node examples/hello/server.js` runs it as a cluster, because the
// master speaks Node's own cluster protocol; `node examples/hello/server.js` still runs it
// alone.
const http = require('http');

const port = Number(process.env.PORT || 3000);
http
  .createServer((req, res) => {
    res.end(`hello from pid ${process.pid}\n`);
  })
  .listen(port, () => {
    console.log(`listening on ${port}`);
  });
