//! Integration tests: real masters, real workers, real sockets. One binary, one module
//! per area; `common` is the harness.

mod autoscale;
mod common;
mod config_errors;
mod deploy;
mod etcd;
mod fuzz;
mod metrics;
mod node;
mod operations;
mod probes;
mod reliability;
mod security;
mod supervisor;
mod systemd;
