//! A Rust worker for `processes`: takes connections passed by the master (round-robin or
//! least-loaded mode) or accepts on inherited listeners (shared mode), and answers each
//! HTTP request with a line naming its slot and pid.
//!
//! ```text
//! cargo build --release --examples
//! target/release/processes run -i 4 --listen 127.0.0.1:8080 --dispatch round-robin \
//!     -- target/release/examples/rust_worker
//! curl http://127.0.0.1:8080/
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;

fn main() -> std::io::Result<()> {
    let slot = processes::worker::slot().unwrap_or(0);
    // Shared mode: accept on the inherited sockets ourselves.
    for fd in processes::worker::listen_fds() {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(false)?;
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || serve(stream, slot));
            }
        });
    }
    processes::worker::ready()?;
    // Pass mode: connections arrive over the channel. When the master closes it, we exit.
    let mut channel = processes::worker::Channel::from_env().expect("run me under processes");
    while let Some(conn) = channel.next_connection()? {
        let stream = conn.into_tcp_stream();
        std::thread::spawn(move || serve(stream, slot));
    }
    Ok(())
}

fn serve(mut stream: TcpStream, slot: u32) {
    let mut buf = [0u8; 8192];
    let mut head = Vec::new();
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.drain(..end + 4);
            let body = format!("hello from slot {slot}, pid {}\n", std::process::id());
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }
}
