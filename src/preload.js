'use strict';
// Injected into Node workers by `processes` (NODE_OPTIONS=--require <this file>); the app
// is not changed. Every PROCESSES_SAMPLE_MS it reports, over the IPC channel, the event
// loop's utilization, its delay percentiles and the connections its servers hold open, and
// it answers the master's pings from the event loop. Its messages are internal (`NODE_`
// prefix), so the app's own `process.on('message')` handlers never see them, and nothing
// here keeps the process alive: the timer is unref'd and the internal listener does not
// ref the channel.
(function processesPreload() {
  if (typeof process.send !== 'function') return; // no channel: not under processes
  const perf = require('perf_hooks');
  const net = require('net');

  const interval = Math.max(50, Number(process.env.PROCESSES_SAMPLE_MS) || 1000);
  const resolution = 10; // ms; monitorEventLoopDelay records whole timer intervals
  let histogram = null;
  try {
    histogram = perf.monitorEventLoopDelay({ resolution });
    histogram.enable();
  } catch (_) {
    histogram = null;
  }

  // Open connections, for least-loaded dispatch: the sum over this process's servers of
  // net.Server's own count (`_connections`, which Node's cluster worker also reads for
  // maxConnections), taken at each report. Servers are noted when they listen, so a
  // connection costs nothing here. (Counting 'connection' events meant wrapping
  // net.Server's emit: every event of every server, 'request' included, went through the
  // wrapper, about 90 ns more per event in a micro-benchmark, plus a 'close' listener per
  // connection.)
  const servers = new Set();
  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function patchedListen() {
    servers.add(this);
    return listen.apply(this, arguments);
  };
  function openConnections() {
    let n = 0;
    for (const s of servers) {
      const c = s._connections > 0 ? s._connections : 0;
      if (c === 0 && !s.listening) servers.delete(s); // closed; a new listen() adds it back
      n += c;
    }
    return n;
  }

  function send(msg) {
    try {
      if (process.connected) process.send(msg);
    } catch (_) {
      // The channel closed under us; the master knows.
    }
  }

  let last = perf.performance.eventLoopUtilization();
  const timer = setInterval(() => {
    const now = perf.performance.eventLoopUtilization();
    const delta = perf.performance.eventLoopUtilization(now, last);
    last = now;
    const msg = { cmd: 'NODE_PROCESSES_METRICS', elu: delta.utilization, open: openConnections() };
    if (histogram) {
      // Each sample is a whole interval between timer ticks; lag is what exceeds it.
      const lag = (ns) => Math.max(0, ns / 1e6 - resolution);
      msg.lag_p50_ms = lag(histogram.percentile(50));
      msg.lag_p99_ms = lag(histogram.percentile(99));
      msg.lag_max_ms = lag(histogram.max);
      histogram.reset();
    }
    send(msg);
  }, interval);
  timer.unref();

  process.on('internalMessage', (msg) => {
    if (msg && msg.cmd === 'NODE_PROCESSES_PING') {
      send({ cmd: 'NODE_PROCESSES_PONG', id: msg.id });
    }
  });
})();
