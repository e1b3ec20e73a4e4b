//! `processes`: a cluster master for server applications.
//!
//! One master per machine starts and supervises pools of worker processes, binds their
//! listening sockets itself and hands them — or each accepted connection — to workers by
//! passing the file descriptor, and speaks Node's cluster protocol so that an unmodified
//! `node server.js` runs as a cluster. The modules follow the parts of `DESIGN.md`:
//!
//! * [`config`], [`cli`]: flags and `processes.toml` into validated [`config::AppSpec`]s;
//! * [`master`]: the one event loop that owns all state;
//! * [`pool`], [`backoff`], [`dispatch`]: the pure decisions;
//! * [`spawn`], [`unix`]: fork/exec and process-group signals;
//! * [`channel`], [`node`]: the socketpair per worker and Node's protocol on it;
//! * [`sockets`]: listeners; [`notify`]: sd_notify; [`output`]: worker stdout/stderr;
//! * [`control`]: the control socket.

pub mod backoff;
pub mod channel;
pub mod cli;
pub mod config;
pub mod control;
pub mod controller;
pub mod dispatch;
pub mod errors;
pub mod human;
pub mod master;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod output;
pub mod pool;
pub mod probes;
pub mod reaper;
pub mod registry;
pub mod sampler;
pub mod sockets;
pub mod spawn;
pub mod top;
pub mod unix;
pub mod worker;
