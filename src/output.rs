//! Worker stdout and stderr: read line by line, prefixed `[app:slot]`, written to the
//! master's own stdout and stderr.
//!
//! The event loop never touches worker output. Each stream has a reader task that splits
//! lines (cutting any line longer than [`MAX_LINE`]) and hands them to one writer thread
//! through a bounded queue. When the queue is full — a worker writing faster than the
//! master's stdout drains — the line is dropped and counted, and the count is written out
//! as soon as there is room again, so a flood costs bounded memory, never blocks the
//! master, and is never silent.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use tokio::io::AsyncReadExt;

/// Longest line kept whole; longer ones are cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;
/// Lines buffered between the readers and the writer thread.
pub const QUEUE_LINES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

struct Line {
    stream: Stream,
    bytes: Vec<u8>,
}

/// The shared writer: cheap to clone, one per master.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Line>,
    runtime: tokio::runtime::Handle,
    dropped_total: Arc<AtomicU64>,
}

impl Sink {
    /// Starts the writer thread.
    /// Starts the writer thread; readers run on `runtime`.
    pub fn start(runtime: tokio::runtime::Handle) -> Sink {
        let (tx, rx) = sync_channel::<Line>(QUEUE_LINES);
        std::thread::Builder::new()
            .name("processes-output".into())
            .spawn(move || {
                // Not locked for the thread's life: the master's own log lines share stderr.
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
                let mut err = std::io::BufWriter::with_capacity(16 * 1024, std::io::stderr());
                while let Ok(first) = rx.recv() {
                    let mut next = Some(first);
                    // Write everything queued, then flush once.
                    while let Some(line) = next {
                        let w: &mut dyn Write = match line.stream {
                            Stream::Stdout => &mut out,
                            Stream::Stderr => &mut err,
                        };
                        // A closed stdout must not stop the master; drop quietly.
                        let _ = w.write_all(&line.bytes);
                        next = rx.try_recv().ok();
                    }
                    let _ = out.flush();
                    let _ = err.flush();
                }
            })
            .expect("cannot start the output thread");
        Sink {
            tx,
            runtime,
            dropped_total: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Lines dropped so far across all workers.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Forwards one worker stream until it closes.
    pub fn forward(&self, prefix: String, stream: Stream, fd: OwnedFd) {
        let sink = self.clone();
        self.runtime.spawn(async move {
            let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
                return;
            };
            let mut reader = LineSplitter::new(prefix, stream);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => reader.push(&buf[..n], &sink),
                }
            }
            reader.finish(&sink);
        });
    }

    fn send(&self, stream: Stream, bytes: Vec<u8>, dropped: &mut u64) {
        if *dropped > 0 {
            // Say how much was lost before the next line that makes it through.
            let note = format!(
                "[processes] {dropped} lines dropped: output faster than the master can write\n"
            );
            match self.tx.try_send(Line {
                stream,
                bytes: note.into_bytes(),
            }) {
                Ok(()) => *dropped = 0,
                Err(_) => {
                    *dropped += 1;
                    self.dropped_total.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        match self.tx.try_send(Line { stream, bytes }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                *dropped += 1;
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Splits a byte stream into prefixed lines.
struct LineSplitter {
    prefix: String,
    stream: Stream,
    partial: Vec<u8>,
    dropped: u64,
}

impl LineSplitter {
    fn new(prefix: String, stream: Stream) -> Self {
        LineSplitter {
            prefix,
            stream,
            partial: Vec::new(),
            dropped: 0,
        }
    }

    fn emit(&mut self, body: &[u8], sink: &Sink) {
        let mut line = Vec::with_capacity(self.prefix.len() + body.len() + 2);
        line.extend_from_slice(self.prefix.as_bytes());
        line.push(b' ');
        line.extend_from_slice(body);
        line.push(b'\n');
        sink.send(self.stream, line, &mut self.dropped);
    }

    fn push(&mut self, mut data: &[u8], sink: &Sink) {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                self.emit_capped(&data[..nl], sink);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(&data[..nl]);
                self.emit_capped(&whole, sink);
            }
            data = &data[nl + 1..];
        }
        self.partial.extend_from_slice(data);
        while self.partial.len() >= MAX_LINE {
            let rest = self.partial.split_off(MAX_LINE);
            let piece = std::mem::replace(&mut self.partial, rest);
            self.emit(&piece, sink);
        }
    }

    fn emit_capped(&mut self, body: &[u8], sink: &Sink) {
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        for piece in body.chunks(MAX_LINE) {
            self.emit(piece, sink);
        }
        if body.is_empty() {
            self.emit(b"", sink);
        }
    }

    fn finish(&mut self, sink: &Sink) {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.emit(&last, sink);
        }
    }
}
