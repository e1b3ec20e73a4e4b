//! The least CPU a dispatcher can spend on each connection it passes by fd, with no event
//! loop, no JSON and no bookkeeping: only the syscalls the job needs, on this machine.
//!
//! A client thread opens TCP connections to a listener (at most 32 outstanding, like
//! `wrk -c32`); the "master" — this program's main thread — accepts each one, sends its
//! fd over an AF_UNIX socketpair to a "worker" thread and closes its own copy; the worker
//! receives the fd, closes it and acknowledges with one byte. Two ways to wait:
//!
//! * `ack-each`: the master reads the worker's ack before it passes the next connection,
//!   as a master keeping one handle in flight per worker must when it has one worker.
//! * `pipelined`: the master never waits for acks (it reads them in batches), but still
//!   waits in `accept4` whenever the client has not connected yet.
//! * `queued`: the client connects 1 000 at a time and only then does the master accept,
//!   pass and close them, timed batch by batch: the cost of `accept4` +
//!   `sendmsg(SCM_RIGHTS)` + `close` alone, with (almost) nothing to wait for.
//!
//! It prints the master thread's CPU time (user + system, from `getrusage(RUSAGE_THREAD)`)
//! and voluntary context switches per connection, median over the rounds.
//!
//! Usage: cargo bench --bench fd_pass_floor [-- CONNECTIONS ROUNDS]   (default 20000 5)

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, accept4, recvmsg, sendmsg,
};

const OUTSTANDING: usize = 32;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    AckEach,
    Pipelined,
    Queued,
}

const BATCH: usize = 1000;

struct Round {
    cpu_us_per_conn: f64,
    cs_per_conn: f64,
    conns_per_s: f64,
}

fn thread_usage() -> (Duration, i64) {
    let u = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    (
        t(u.user_time()) + t(u.system_time()),
        u.voluntary_context_switches(),
    )
}

fn round(mode: Mode, n: usize) -> Round {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let (master_end, worker_end) = UnixStream::pair().expect("socketpair");
    let listener = {
        // A backlog that holds a whole batch of queued connections.
        let s = socket2::Socket::from(listener);
        s.listen(4096).expect("listen");
        TcpListener::from(s)
    };
    let (tokens_tx, tokens_rx) =
        mpsc::sync_channel::<()>(if mode == Mode::Queued { n } else { OUTSTANDING });
    for _ in 0..OUTSTANDING {
        tokens_tx.send(()).unwrap();
    }
    let (batch_tx, batch_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();

    let client = std::thread::spawn(move || {
        if mode == Mode::Queued {
            for _ in 0..n.div_ceil(BATCH) {
                let held: Vec<TcpStream> = (0..BATCH)
                    .map(|_| TcpStream::connect(addr).expect("connect"))
                    .collect();
                batch_tx.send(()).unwrap();
                done_rx.recv().unwrap();
                drop(held);
            }
            return;
        }
        for _ in 0..n {
            tokens_rx.recv().unwrap();
            drop(TcpStream::connect(addr).expect("connect"));
        }
    });
    let n = if mode == Mode::Queued {
        n.div_ceil(BATCH) * BATCH
    } else {
        n
    };
    let worker = std::thread::spawn(move || {
        let mut worker_end = worker_end;
        let fd = worker_end.as_raw_fd();
        for _ in 0..n {
            let mut byte = [0u8; 1];
            let mut iov = [IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!(RawFd);
            let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                .expect("recvmsg");
            for c in msg.cmsgs().expect("cmsgs") {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for f in fds {
                        // SAFETY: the fd was just received and nothing else owns it.
                        drop(unsafe { OwnedFd::from_raw_fd(f) });
                    }
                }
            }
            worker_end.write_all(b"a").expect("ack");
            let _ = tokens_tx.try_send(());
        }
    });

    let mut master_end = master_end;
    let (mut cpu, mut cs, mut wall) = (Duration::ZERO, 0i64, Duration::ZERO);
    let (mut cpu0, mut cs0) = thread_usage();
    let mut t0 = Instant::now();
    let mut acks_due = 0usize;
    let mut acks = [0u8; 256];
    for i in 0..n {
        if mode == Mode::Queued && i % BATCH == 0 {
            // Time only the passing: wait (untimed) until the client has queued a batch.
            if i > 0 {
                done_tx.send(()).unwrap();
            }
            let (c, v) = thread_usage();
            (cpu, cs, wall) = (cpu + (c - cpu0), cs + (v - cs0), wall + t0.elapsed());
            batch_rx.recv().unwrap();
            (cpu0, cs0) = thread_usage();
            t0 = Instant::now();
        }
        let conn = accept4(
            listener.as_raw_fd(),
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .expect("accept4");
        // SAFETY: accept4 returned a fresh fd that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(conn) };
        let fds = [conn.as_raw_fd()];
        sendmsg::<()>(
            master_end.as_raw_fd(),
            &[IoSlice::new(b"c")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        drop(conn);
        acks_due += 1;
        if mode == Mode::AckEach || acks_due >= acks.len() {
            while acks_due > 0 {
                let got = master_end.read(&mut acks[..acks_due]).expect("read acks");
                acks_due -= got;
            }
        }
    }
    while acks_due > 0 {
        acks_due -= master_end.read(&mut acks[..acks_due]).expect("read acks");
    }
    let (c, v) = thread_usage();
    (cpu, cs, wall) = (cpu + (c - cpu0), cs + (v - cs0), wall + t0.elapsed());
    if mode == Mode::Queued {
        done_tx.send(()).unwrap();
    }
    client.join().unwrap();
    worker.join().unwrap();
    Round {
        cpu_us_per_conn: cpu.as_secs_f64() * 1e6 / n as f64,
        cs_per_conn: cs as f64 / n as f64,
        conns_per_s: n as f64 / wall.as_secs_f64(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    println!(
        "fd passing floor: {n} connections x {rounds} rounds, {OUTSTANDING} outstanding, on {} CPUs",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!(
        "| master waits | CPU µs per connection | voluntary context switches per connection | connections/s |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for (mode, name) in [
        (Mode::AckEach, "for each ack (one in flight)"),
        (Mode::Pipelined, "never for acks (read in batches)"),
        (Mode::Queued, "for nothing (connections already queued)"),
    ] {
        let rs: Vec<Round> = (0..rounds).map(|_| round(mode, n)).collect();
        println!(
            "| {name} | {:.1} | {:.2} | {:.0} |",
            median(rs.iter().map(|r| r.cpu_us_per_conn).collect()),
            median(rs.iter().map(|r| r.cs_per_conn).collect()),
            median(rs.iter().map(|r| r.conns_per_s).collect()),
        );
    }
}
