//! The channel protocol as the master speaks it: Node's cluster acts, handle passing with
//! Node's one-in-flight rule, and handing accepted connections to workers.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::channel::SharedFd;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use serde_json::Value;

use tracing::{debug, info, warn};

use super::*;

impl Master {
    // ---- the channel protocol -----------------------------------------------------------

    pub(super) fn on_message(&mut self, id: WorkerId, msg: FromWorker, fd: Option<OwnedFd>) {
        let Some(io) = self.io.get(&id) else {
            if let Some(fd) = fd {
                unix::close_later(fd);
            }
            return;
        };
        let app = io.app;
        // Acknowledgements, replies and load reports are the hot path and change no plan.
        if !matches!(
            msg,
            FromWorker::HandleAck
                | FromWorker::HandleNack
                | FromWorker::Reply { .. }
                | FromWorker::Metrics(_)
                | FromWorker::Pong { .. }
        ) {
            self.dirty = true;
        }
        match msg {
            FromWorker::HandleAck => self.on_handle_ack(id),
            FromWorker::HandleNack => self.on_handle_nack(id),
            FromWorker::Handle { .. } => {
                // We have no use for handles a worker sends, but it waits for our answer:
                // an ACK when the fd came, a NACK (as Node would) when it did not.
                let answer = if fd.is_some() {
                    node::handle_ack()
                } else {
                    node::handle_nack()
                };
                if let Some(fd) = fd {
                    unix::close_later(fd);
                }
                self.send_raw(id, answer, None);
            }
            FromWorker::Online { .. } => {
                if let Some(io) = self.io.get_mut(&id) {
                    io.online = true;
                }
            }
            FromWorker::QueryServer(q) => self.on_query_server(id, q),
            FromWorker::Listening { .. } => {
                let slot = self.pools[app].workers.get(&id).map(|w| w.slot);
                if let Some(s) = slot.and_then(|n| self.pools[app].slots.get_mut(&n)) {
                    s.listened = true;
                }
                self.mark_ready(app, id, Instant::now(), "listening")
            }
            FromWorker::Ready => {
                if let Some(io) = self.io.get_mut(&id) {
                    io.said_ready = true;
                }
                self.mark_ready(app, id, Instant::now(), "said ready");
                self.dispatch_app(app);
            }
            FromWorker::Close { key, .. } => {
                // Only the worker's own listeners: another app's may share the key.
                if let Some(io) = self.io.get_mut(&id) {
                    io.keys.retain(|_, keys| {
                        keys.retain(|k| *k != key);
                        !keys.is_empty()
                    });
                }
            }
            FromWorker::ExitedAfterDisconnect { seq } => {
                self.send_plain(id, |s| node::ack(seq, s));
            }
            FromWorker::Reply { ack, accepted } => self.on_reply(id, ack, accepted),
            FromWorker::Metrics(report) => self.on_load_report(id, &report),
            FromWorker::Pong { id: ping } => self.on_pong(id, ping),
            FromWorker::OtherCluster { act, .. } => debug!("cluster message {act:?} ignored"),
            FromWorker::OtherInternal(cmd) => debug!("internal message {cmd} ignored"),
            FromWorker::User { head, bytes } if head.len() == bytes => {
                debug!("[{}] message: {head}", self.pools[app].spec.name)
            }
            FromWorker::User { head, bytes } => debug!(
                "[{}] message ({bytes} bytes): {head}…",
                self.pools[app].spec.name
            ),
        }
    }

    /// Sends a message built with our next `seq`, behind any unacknowledged handle.
    pub(super) fn send_plain(&mut self, id: WorkerId, build: impl FnOnce(u64) -> Value) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let seq = io.seq;
        io.seq += 1;
        let v = build(seq);
        self.send_raw(id, v, None);
    }

    /// Sends a message (with a handle if `fd`), keeping Node's rule that nothing overtakes
    /// an unacknowledged handle. ACKs are exempt: they are never held.
    pub(super) fn send_raw(&mut self, id: WorkerId, value: Value, fd: Option<SharedFd>) {
        let is_ack = value.get("cmd").and_then(Value::as_str) == Some("NODE_HANDLE_ACK");
        let line = Outgoing::json(&value, None).line;
        self.send_line(id, line, fd, is_ack);
    }

    /// [`Master::send_raw`] for a line already serialised (newline included).
    fn send_line(&mut self, id: WorkerId, line: Vec<u8>, fd: Option<SharedFd>, is_ack: bool) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        if io.channel.is_none() {
            return;
        }
        if io.awaiting_ack.is_some() && !is_ack {
            if io.held.len() >= channel::MAX_QUEUED_OUT {
                // It neither acknowledges the handle nor stops asking for replies.
                self.on_channel_closed(id, Some(channel::Violation::NotReading));
                return;
            }
            io.held.push_back((line, fd));
            return;
        }
        match fd {
            Some(fd) => {
                self.outbox.push((
                    id,
                    Outgoing {
                        line: line.clone(),
                        fd: Some(fd.clone()),
                    },
                ));
                io.awaiting_ack = Some(HandleInFlight {
                    line,
                    fd,
                    retries: 0,
                    answered: false,
                });
            }
            None => self.outbox.push((id, Outgoing { line, fd: None })),
        }
    }

    /// Sends what this turn of the loop has for the workers. Held until the turn's end, the
    /// lines go out together once the master has done everything else it can: a worker
    /// woken by its line may take the CPU from the master (which runs `SCHED_BATCH`), and
    /// what the master had left to do would wait for its next slice.
    pub(super) fn flush_outbox(&mut self) {
        let mut outbox = std::mem::take(&mut self.outbox);
        for (id, out) in outbox.drain(..) {
            if let Some(ch) = self.io.get(&id).and_then(|io| io.channel.as_ref()) {
                ch.send(out);
            }
        }
        self.outbox = outbox;
    }

    pub(super) fn on_handle_ack(&mut self, id: WorkerId) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        // An ack with no handle in flight (stray, or repeated) acknowledges nothing: it
        // must not count for the next handle.
        if io.awaiting_ack.take().is_none() {
            return;
        }
        if let Some(c) = io.conn.as_mut() {
            c.acked = true;
            if c.seq.is_none() {
                // A plain connection is done once the worker has it.
                if let Some(c) = io.conn.take() {
                    close_conn(c);
                }
            }
        }
        self.release_held(id);
    }

    /// Sends what waited behind a handle that is settled, up to the next handle, and
    /// lets dispatch use the worker again.
    fn release_held(&mut self, id: WorkerId) {
        while self.io.get(&id).is_some_and(|io| io.awaiting_ack.is_none()) {
            let Some((line, fd)) = self.io.get_mut(&id).and_then(|io| io.held.pop_front()) else {
                break;
            };
            self.send_line(id, line, fd, false);
        }
        let app = self.io.get(&id).map(|io| io.app);
        if let Some(app) = app {
            self.dispatch_app(app);
        }
    }

    pub(super) fn on_handle_nack(&mut self, id: WorkerId) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let Some(h) = io.awaiting_ack.as_mut() else {
            return;
        };
        if h.answered {
            // Its connection was answered for already (and dealt with): nothing to resend.
            io.awaiting_ack = None;
            self.release_held(id);
            return;
        }
        h.retries += 1;
        if h.retries > MAX_HANDLE_RETRANSMISSIONS {
            warn!(
                "worker pid {} refused a handle {} times; giving up on it",
                io.pid, h.retries
            );
            let refused = io.awaiting_ack.take().map(|h| h.fd);
            // Only a connection whose own handle was refused goes to another worker: one
            // the worker acknowledged earlier is its, whatever handle came after.
            let conn = io
                .conn
                .take_if(|c| !c.acked && refused.as_ref().is_some_and(|fd| Arc::ptr_eq(fd, &c.fd)));
            let app = io.app;
            io.refused_at = Some(Instant::now());
            // Its pause's end is a deadline the loop must plan for.
            self.dirty = true;
            if let Some(c) = conn {
                self.refused_conn(app, c);
            }
            self.release_held(id);
            return;
        }
        // Sent again exactly as it was. Node's own sender wraps a retransmission in a
        // second envelope, but a Node child acknowledges every envelope that carries the
        // handle, so that one handle would be acknowledged twice and the second ACK would
        // count for the next handle (`node::node_acks_each_envelope_of_a_handle`).
        let again = Outgoing {
            line: h.line.clone(),
            fd: Some(h.fd.clone()),
        };
        self.outbox.push((id, again));
    }

    pub(super) fn on_reply(&mut self, id: WorkerId, ack: u64, accepted: Option<bool>) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let Some(c) = io.conn.take_if(|c| c.seq == Some(ack)) else {
            return;
        };
        let app = io.app;
        // An answer about the connection shows the worker has its handle, whatever it
        // says of the handle later: a NACK must not send that fd to it again (another
        // worker may have the connection by then). Node acknowledges before it answers.
        // The handle stays in flight until its ACK or NACK, which are matched by order.
        if let Some(h) = io
            .awaiting_ack
            .as_mut()
            .filter(|h| Arc::ptr_eq(&h.fd, &c.fd))
        {
            h.answered = true;
        }
        if accepted == Some(true) {
            io.refused_at = None;
            close_conn(c);
        } else {
            io.refused_at = Some(Instant::now());
            self.dirty = true;
            // The worker would not take it (its server is closing, or it is at
            // maxConnections): someone else gets it.
            self.refused_conn(app, c);
        }
        self.dispatch_app(app);
    }

    /// A connection a worker did not take (`accepted: false`, or its handle refused until
    /// we gave up) goes back to the front of its queue for another worker, unless it has
    /// been refused [`MAX_CONN_REFUSALS`] times: then no worker has a server for it, and
    /// closing it beats passing it round for ever. Logged at the 1st, 2nd, 4th… such.
    fn refused_conn(&mut self, app: usize, c: ConnInFlight) {
        if c.refused + 1 < MAX_CONN_REFUSALS {
            self.listeners[c.listener].queue.push_front(Queued {
                fd: c.fd,
                refused: c.refused + 1,
            });
            return;
        }
        let entry = &mut self.listeners[c.listener];
        entry.closed_refused += 1;
        let n = entry.closed_refused;
        if n.is_power_of_two() {
            warn!(
                "{}: closed a connection its workers refused {MAX_CONN_REFUSALS} times \
                 (no server for it?); {n} so far",
                self.pools[app].spec.name
            );
        }
        crate::metrics::violation(self.pools[app].spec.name.as_str(), "refused_connection");
        close_conn(c);
    }

    /// Counts a listener refused to a worker. Returns what to append to the log line when
    /// this refusal should be logged (the 1st, 2nd, 4th, 8th… of this worker), else `None`.
    fn count_refusal(&mut self, id: WorkerId) -> Option<String> {
        let io = self.io.get_mut(&id)?;
        io.refusals += 1;
        let n = io.refusals;
        n.is_power_of_two().then(|| {
            if n == 1 {
                String::new()
            } else {
                format!(" ({n} refusals to pid {} so far)", io.pid)
            }
        })
    }

    pub(super) fn on_query_server(&mut self, id: WorkerId, q: node::QueryServer) {
        let Some(io) = self.io.get(&id) else { return };
        let app = io.app;
        let key = q.key();
        if !self.pools[app].spec.is_node() {
            // Only Node workers speak the cluster protocol; anyone else asking for
            // listeners is refused (the app's listeners come from its config).
            if let Some(n) = self.count_refusal(id) {
                warn!(
                    "{}: a worker that is not a Node cluster worker asked for a listener; refused{n}",
                    self.pools[app].spec.name
                );
            }
            crate::metrics::violation(self.pools[app].spec.name.as_str(), "query_server");
            self.send_plain(id, |seq| node::reply_error(q.seq, seq, &key, libc::EACCES));
            return;
        }
        let l = match self.listener_for(app, &q, &key) {
            Ok(l) => l,
            Err((errno, why)) => {
                if let Some(n) = self.count_refusal(id) {
                    let what = match (q.address_type, q.address.as_deref()) {
                        (node::AddressType::Pipe, Some(path)) => format!("unix socket {path}"),
                        _ => format!("port {}", q.port),
                    };
                    warn!(
                        "{}: cannot listen for a worker on {what}: {why}{n}",
                        self.pools[app].spec.name,
                    );
                }
                self.send_plain(id, |seq| node::reply_error(q.seq, seq, &key, errno));
                return;
            }
        };
        if self.listeners[l].data.is_null() && !q.data.is_null() {
            self.listeners[l].data = q.data.clone();
        }
        let data = self.listeners[l].data.clone();
        if let Some(io) = self.io.get_mut(&id) {
            let keys = io.keys.entry(l).or_default();
            if !keys.contains(&key) {
                keys.push(key.clone());
            }
            io.queried_any = true;
        }
        if let Some(w) = self.pools[app].workers.get_mut(&id)
            && w.state == WorkerState::Starting
        {
            w.listen_pending = true;
        }
        let entry = &self.listeners[l];
        if entry.passing && !entry.udp {
            let sockname = match entry.listener.local {
                ListenAddr::Tcp(a) => Some(node::sockname(&std::net::SocketAddr::new(
                    a.ip(),
                    if q.port > 0 { q.port as u16 } else { a.port() },
                ))),
                ListenAddr::Unix(_) => None,
            };
            self.send_plain(id, |seq| {
                node::reply_round_robin(q.seq, seq, &key, &data, sockname)
            });
            self.start_accepting(l);
            self.dispatch(l);
        } else {
            let udp = entry.udp;
            let Ok(fd) = entry.listener.fd.try_clone() else {
                return;
            };
            let Some(io) = self.io.get_mut(&id) else {
                return;
            };
            let seq = io.seq;
            io.seq += 1;
            record::handle_pass(
                self.pools[app].spec.name.as_str(),
                io.slot,
                io.pid,
                fd.as_raw_fd(),
                HandleKind::Listener,
            );
            self.send_raw(
                id,
                node::reply_shared(q.seq, seq, &key, &data, udp),
                Some(Arc::new(fd)),
            );
        }
    }

    /// Finds or binds the listener a `queryServer` asks for. An error is the errno for the
    /// worker and why, for the log.
    pub(super) fn listener_for(
        &mut self,
        app: usize,
        q: &node::QueryServer,
        key: &str,
    ) -> Result<usize, (i32, String)> {
        if let Some(i) = self
            .listeners
            .iter()
            .position(|l| l.app == app && l.keys.contains(key))
        {
            return Ok(i);
        }
        // Node checks the port before it asks; anything else would wrap around a u16.
        if q.address_type != node::AddressType::Pipe && !(0..=65535).contains(&q.port) {
            return Err((libc::EINVAL, format!("port {} is out of range", q.port)));
        }
        // A key is kept for the master's life: a worker must not make it hold megabytes.
        if key.len() > MAX_KEY_LEN {
            return Err((
                libc::EINVAL,
                format!(
                    "its address is {} bytes long (at most {MAX_KEY_LEN})",
                    key.len()
                ),
            ));
        }
        // A port the app configured with `listen` is that listener, however it is asked
        // for (`listen(3000)`, `listen(3000, '0.0.0.0')`…), up to a few ways; likewise a
        // unix socket it configured, asked for by its path (`listen(path)`: a relative
        // path is the worker's, so relative to the app's `cwd`).
        let cwd = self.pools[app].spec.cwd.as_deref();
        let configured = self.listeners.iter().position(|l| {
            l.app == app
                && l.configured
                && match (&l.listener.local, q.address.as_deref()) {
                    (ListenAddr::Tcp(a), _) => {
                        q.port > 0 && !q.address_type.is_udp() && a.port() == q.port as u16
                    }
                    (ListenAddr::Unix(p), Some(path)) => {
                        q.address_type == node::AddressType::Pipe && same_path(p, path, cwd)
                    }
                    (ListenAddr::Unix(_), None) => false,
                }
        });
        if let Some(i) = configured {
            if self.listeners[i].keys.len() >= MAX_KEYS_PER_LISTENER {
                return Err((
                    libc::EADDRINUSE,
                    format!(
                        "its workers already asked for this address in {MAX_KEYS_PER_LISTENER} \
                         different ways (addresses or flags), the most an app may"
                    ),
                ));
            }
            self.listeners[i].keys.insert(key.to_string());
            return Ok(i);
        }
        // Each key asked for costs two fds (the listener and the loop's registration of it)
        // for the master's life (it stays bound across restarts); a worker asking for ever
        // more is capped.
        let asked = self
            .listeners
            .iter()
            .filter(|l| l.app == app && !l.configured)
            .count();
        if asked >= MAX_REQUESTED_LISTENERS {
            crate::metrics::violation(self.pools[app].spec.name.as_str(), "too_many_listeners");
            return Err((
                libc::EMFILE,
                format!(
                    "its workers already asked for {MAX_REQUESTED_LISTENERS} listeners, the most \
                     an app may (refused with EMFILE)"
                ),
            ));
        }
        // A unix socket is bound at a path the worker names, with the master's rights: a
        // worker that runs as another user (`user`, the master being root) could have
        // sockets made, or stale ones replaced, where it may not write itself.
        if q.address_type == node::AddressType::Pipe && self.pools[app].spec.user.is_some() {
            return Err((
                libc::EACCES,
                "its workers run as another user, and the master binds a unix socket a worker \
                 names only for workers of its own user: give the path in the app's `listen`"
                    .to_string(),
            ));
        }
        let cwd = self.pools[app].spec.cwd.clone();
        let (fd, local, udp) = bind_for_node(q, cwd.as_deref())
            .map_err(|e| (e.raw_os_error().unwrap_or(libc::EINVAL), e.to_string()))?;
        let passing = self.pools[app].spec.dispatch().passes();
        info!(
            "{}: listening on {local} (asked by a worker)",
            self.pools[app].spec.name
        );
        let unlink = match &local {
            ListenAddr::Unix(path) => Some(path.clone()),
            ListenAddr::Tcp(_) => None,
        };
        let listener = Listener {
            requested: local.clone(),
            local,
            fd,
            unlink,
        };
        let mut entry = ListenerEntry::new(app, listener, false, udp, passing && !udp);
        entry.keys.insert(key.to_string());
        self.listeners.push(entry);
        Ok(self.listeners.len() - 1)
    }

    // ---- passing connections ------------------------------------------------------------

    pub(super) fn start_accepting(&mut self, l: usize) {
        let entry = &mut self.listeners[l];
        if !entry.passing || entry.acceptor.is_some() || entry.udp {
            return;
        }
        let acceptor = entry
            .listener
            .fd
            .try_clone()
            .and_then(|fd| unix::async_fd(fd, tokio::io::Interest::READABLE));
        match acceptor {
            Ok(a) => entry.acceptor = Some(a),
            Err(e) => {
                warn!(
                    "{}: cannot accept on {}: {e}",
                    self.pools[entry.app].spec.name, entry.listener.local
                );
                return;
            }
        }
        self.dispatch(l);
    }

    /// Ready with a listener the loop waits on (`want_accept`) once it can be accepted on.
    pub(super) fn poll_acceptors(&self, cx: &mut std::task::Context<'_>) -> Poll<usize> {
        for (l, entry) in self.listeners.iter().enumerate() {
            let Some(a) = entry.acceptor.as_ref().filter(|_| entry.want_accept) else {
                continue;
            };
            // An error is for `accept4` to report.
            if a.poll_read_ready(cx).is_ready() {
                return Poll::Ready(l);
            }
        }
        Poll::Pending
    }

    /// One new connection from listener `l`'s backlog, if one is there.
    fn accept(&mut self, l: usize) -> Option<OwnedFd> {
        let entry = &mut self.listeners[l];
        if entry.accept_retry_at.is_some() {
            return None;
        }
        let a = entry.acceptor.as_ref()?;
        loop {
            // `try_io` calls `accept4` only while the fd is known readable, and clears
            // that on `EAGAIN`: a listener is not asked twice in a row for nothing.
            match a.try_io(tokio::io::Interest::READABLE, |fd| {
                accept_nonblocking(fd.as_raw_fd())
            }) {
                Ok(fd) => return Some(fd),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    entry.want_accept = true;
                    return None;
                }
                // Gone before we took it, or a signal: the next one.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EINTR)
                    ) => {}
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning, and log the 1st, 2nd,
                    // 4th… failure, not a hundred a second.
                    entry.accept_errors += 1;
                    let n = entry.accept_errors;
                    if n.is_power_of_two() {
                        warn!(
                            "{}: accept failed: {e} ({n} so far; trying again every {})",
                            entry.listener.local,
                            crate::human::duration(ACCEPT_RETRY)
                        );
                    }
                    entry.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                    self.dirty = true;
                    return None;
                }
            }
        }
    }

    pub(super) fn dispatch_app(&mut self, app: usize) {
        // Starting from a different listener each time: a worker that frees up takes from
        // each of its app's listeners in turn, so a busy one cannot starve another.
        let n = self.listeners.len();
        let start = self.dispatch_from % n.max(1);
        self.dispatch_from = start + 1;
        for k in 0..n {
            let l = (start + k) % n;
            if self.listeners[l].app == app {
                self.dispatch(l);
            }
        }
    }

    /// Hands connections of listener `l` to workers while any can take one: first those
    /// queued, then new ones from its backlog.
    pub(super) fn dispatch(&mut self, l: usize) {
        let now = Instant::now();
        let entry = &self.listeners[l];
        if entry.queue.is_empty() && entry.acceptor.is_none() {
            return;
        }
        loop {
            let app = self.listeners[l].app;
            let mode = self.pools[app].spec.dispatch();
            // One list for the master's life: this runs once per connection.
            let mut candidates = std::mem::take(&mut self.candidates);
            candidates.clear();
            candidates.extend(
                self.pools[app]
                    .workers
                    .values()
                    .filter(|w| w.state != WorkerState::Draining)
                    .filter_map(|w| {
                        let io = self.io.get(&w.id)?;
                        io.channel.as_ref()?;
                        let eligible = if io.keys.contains_key(&l) {
                            true
                        } else {
                            // A worker that is no cluster server takes plain connections from
                            // a configured listener once it is ready. A Node worker must have
                            // said so itself (`process.send('ready')`): one that is merely up
                            // for `ready_after` may still be about to `listen()`, and a cluster
                            // server would queue a plain socket message it never reads.
                            self.listeners[l].configured
                                && !io.queried_any
                                && w.state == WorkerState::Ready
                                && (!self.pools[app].spec.is_node() || io.said_ready)
                        };
                        eligible.then_some(Candidate {
                            worker: w.id,
                            in_flight: u32::from(io.conn.is_some() || io.awaiting_ack.is_some()),
                            open: io.load.open,
                            busy: w.busy.unwrap_or(0.0),
                            served: io.served,
                            lag_ms: io.load.lag(now).map_or(0, |l| l.as_millis() as u64),
                            refusing: io.refused_at.is_some_and(|t| {
                                now.saturating_duration_since(t) < dispatch::REFUSAL_PAUSE
                            }),
                        })
                    }),
            );
            let choice = dispatch::choose(mode, &candidates);
            self.candidates = candidates;
            let Some(target) = choice else {
                return;
            };
            let q = match self.listeners[l].queue.pop_front() {
                Some(q) => q,
                None => match self.accept(l) {
                    Some(fd) => Queued {
                        fd: Arc::new(fd),
                        refused: 0,
                    },
                    None => return,
                },
            };
            self.listeners[l].passed += 1;
            self.pass_connection(l, target, q);
        }
    }

    pub(super) fn pass_connection(&mut self, l: usize, id: WorkerId, q: Queued) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        io.passed += 1;
        io.served += 1;
        let (line, seq) = if let Some(key) = io.keys.get(&l).and_then(|k| k.first()) {
            let seq = io.seq;
            io.seq += 1;
            (node::newconn(seq, key), Some(seq))
        } else {
            let value = node::connection(l, &self.listeners[l].listener.local.to_string());
            (Outgoing::json(&value, None).line, None)
        };
        let copy = q.fd.clone();
        io.conn = Some(ConnInFlight {
            listener: l,
            seq,
            fd: q.fd,
            acked: false,
            refused: q.refused,
        });
        record::handle_pass(
            self.pools[self.listeners[l].app].spec.name.as_str(),
            io.slot,
            io.pid,
            copy.as_raw_fd(),
            HandleKind::Connection,
        );
        self.send_line(id, line, Some(copy), false);
    }
}

/// Lets go of the master's copy of a connection a worker has had. The worker may have set
/// `SO_LINGER` on its copy and closed it: our close, the last, must not wait for that.
pub(super) fn close_conn(c: ConnInFlight) {
    unix::disarm_linger(c.fd.as_ref());
    drop(c);
}

/// A unix socket path as a worker running in the app's `cwd` means it: relative to that
/// directory (the master's own when the app sets none).
fn worker_path(asked: &std::path::Path, cwd: Option<&std::path::Path>) -> std::path::PathBuf {
    cwd.map_or_else(|| asked.to_path_buf(), |dir| dir.join(asked))
}

/// Whether the unix socket path `asked` (by a worker running in `cwd`) names `bound`.
fn same_path(bound: &std::path::Path, asked: &str, cwd: Option<&std::path::Path>) -> bool {
    let asked = worker_path(std::path::Path::new(asked), cwd);
    if bound == asked {
        return true;
    }
    // The master bound its path from its own directory.
    std::env::current_dir().is_ok_and(|here| here.join(asked) == here.join(bound))
}

/// Binds what a Node worker asked for: `null` means every address (`::`, dual-stack, as
/// Node's own primary does).
fn bind_for_node(
    q: &node::QueryServer,
    cwd: Option<&std::path::Path>,
) -> std::io::Result<(OwnedFd, ListenAddr, bool)> {
    use node::AddressType;
    let port = u16::try_from(q.port.max(0)).unwrap_or(0);
    let fd_and_addr = match q.address_type {
        AddressType::Pipe => {
            let asked = q.address.as_deref().unwrap_or_default();
            let path = worker_path(std::path::Path::new(asked), cwd);
            let fd = sockets::bind_unix(&path)?;
            (fd, ListenAddr::Unix(path), false)
        }
        AddressType::Udp4 | AddressType::Udp6 => {
            let ip: std::net::IpAddr = match q.address.as_deref() {
                Some(a) => a
                    .parse()
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?,
                None if q.address_type == AddressType::Udp6 => {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                }
                None => std::net::Ipv4Addr::UNSPECIFIED.into(),
            };
            let addr = std::net::SocketAddr::new(ip, port);
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::DGRAM.cloexec(),
                None,
            )?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.set_nonblocking(true)?;
            let local = s.local_addr()?.as_socket().unwrap_or(addr);
            (s.into(), ListenAddr::Tcp(local), true)
        }
        AddressType::Tcp4 | AddressType::Tcp6 => {
            let ip: std::net::IpAddr = match q.address.as_deref() {
                Some(a) => a
                    .parse()
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?,
                None => std::net::Ipv6Addr::UNSPECIFIED.into(),
            };
            let fd = match sockets::bind_tcp(std::net::SocketAddr::new(ip, port)) {
                // No IPv6 on this machine: fall back to every IPv4 address.
                Err(e) if q.address.is_none() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    sockets::bind_tcp(std::net::SocketAddr::new(
                        std::net::Ipv4Addr::UNSPECIFIED.into(),
                        port,
                    ))?
                }
                other => other?,
            };
            let local = sockets::local_tcp_addr(&fd)?;
            (fd, ListenAddr::Tcp(local), false)
        }
    };
    spawn::set_nonblocking(&fd_and_addr.0, true)?;
    Ok(fd_and_addr)
}

/// `accept4` with the connection non-blocking (Node needs that) and close-on-exec.
fn accept_nonblocking(fd: i32) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 with null address pointers only returns a new fd or -1.
    let r = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: r is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}
