//! Readers for the load figures the master samples each tick: a worker's main-thread CPU
//! time and RSS, the host's CPU and memory, and cgroup v2 limits.
//!
//! Nothing here decides anything. The readers keep their `/proc` files open and re-read
//! them with one `pread` each, so a tick costs one syscall per worker plus a handful for
//! the host: linear in the number of workers and small. Parsing goes through `procfs`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use procfs::FromRead;

/// CPU time and memory of one worker's main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSample {
    /// utime + stime of the main (event-loop) thread, in clock ticks.
    pub cpu_ticks: u64,
    /// The process's resident set size, bytes.
    pub rss_bytes: u64,
}

/// `/proc/PID/task/PID/stat`, kept open.
#[derive(Debug)]
pub struct TaskStat {
    file: File,
    buf: Vec<u8>,
}

impl TaskStat {
    pub fn open(pid: i32) -> io::Result<TaskStat> {
        Self::open_path(&format!("/proc/{pid}/task/{pid}/stat"))
    }

    /// The whole process (every thread), for the master's own figures.
    pub fn process(pid: i32) -> io::Result<TaskStat> {
        Self::open_path(&format!("/proc/{pid}/stat"))
    }

    fn open_path(path: &str) -> io::Result<TaskStat> {
        Ok(TaskStat {
            file: File::open(path)?,
            buf: vec![0; 1024],
        })
    }

    pub fn read(&mut self) -> io::Result<TaskSample> {
        let n = self.file.read_at(&mut self.buf, 0)?;
        let stat = procfs::process::Stat::from_read(&self.buf[..n]).map_err(io::Error::other)?;
        Ok(TaskSample {
            cpu_ticks: stat.utime + stat.stime,
            rss_bytes: stat.rss * page_size(),
        })
    }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as u64 } else { 4096 }
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as u64 } else { 100 }
}

/// Busy fraction from successive CPU-time readings: Δcpu / Δwall. Pure.
#[derive(Debug, Clone, Default)]
pub struct BusyMeter {
    last: Option<(Instant, u64)>,
}

impl BusyMeter {
    /// Records a reading; returns the busy fraction since the previous one (capped at 1:
    /// one thread cannot be more than fully busy, whatever the tick rounding says).
    pub fn update(&mut self, now: Instant, cpu_ticks: u64, ticks_per_second: u64) -> Option<f64> {
        let prev = self.last.replace((now, cpu_ticks));
        let (t0, c0) = prev?;
        let wall = now.saturating_duration_since(t0).as_secs_f64();
        if wall <= 0.0 {
            return None;
        }
        let cpu = cpu_ticks.saturating_sub(c0) as f64 / ticks_per_second as f64;
        Some((cpu / wall).clamp(0.0, 1.0))
    }
}

/// What the machine (or the master's cgroup) offers this tick.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSample {
    /// Effective CPUs: the cgroup quota where set, else the CPUs this process may run on.
    pub cpus: f64,
    /// Host CPU busy fraction since the last sample.
    pub cpu_busy: Option<f64>,
    /// Memory still usable: cgroup `memory.max − memory.current` where set, else
    /// `MemAvailable`.
    pub mem_headroom: Option<u64>,
    /// Which figure bounds memory: `"cgroup"` or `"host"`.
    pub mem_source: &'static str,
    pub cpu_source: &'static str,
}

/// Host figures, with files kept open.
#[derive(Debug)]
pub struct Host {
    stat: Option<File>,
    meminfo: Option<File>,
    cgroup: Option<PathBuf>,
    last_cpu: Option<(u64, u64)>,
    buf: Vec<u8>,
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    pub fn new() -> Host {
        Host {
            stat: File::open("/proc/stat").ok(),
            meminfo: File::open("/proc/meminfo").ok(),
            cgroup: own_cgroup_dir(),
            last_cpu: None,
            buf: vec![0; 64 * 1024],
        }
    }

    pub fn sample(&mut self) -> HostSample {
        let online = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let quota = self
            .cgroup
            .as_deref()
            .and_then(|d| std::fs::read_to_string(d.join("cpu.max")).ok())
            .and_then(|s| parse_cpu_max(&s));
        let (cpus, cpu_source) = match quota {
            Some(q) if q < online => (q, "cgroup"),
            _ => (online, "host"),
        };
        let cpu_busy = self
            .read(Which::Stat)
            .and_then(|text| parse_proc_stat_cpu(&text));
        let busy_fraction = match (cpu_busy, self.last_cpu) {
            (Some((b1, t1)), Some((b0, t0))) if t1 > t0 => {
                Some(((b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64).clamp(0.0, 1.0))
            }
            _ => None,
        };
        if cpu_busy.is_some() {
            self.last_cpu = cpu_busy;
        }
        let available = self
            .read(Which::Meminfo)
            .and_then(|text| procfs::Meminfo::from_read(text.as_bytes()).ok())
            .and_then(|m| m.mem_available);
        let cgroup_room = self.cgroup.as_deref().and_then(|d| {
            let max = parse_memory_max(&std::fs::read_to_string(d.join("memory.max")).ok()?)?;
            let current: u64 = std::fs::read_to_string(d.join("memory.current"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(max.saturating_sub(current))
        });
        let (mem_headroom, mem_source) = match (cgroup_room, available) {
            (Some(c), Some(h)) if c < h => (Some(c), "cgroup"),
            (Some(c), None) => (Some(c), "cgroup"),
            (_, h) => (h, "host"),
        };
        HostSample {
            cpus,
            cpu_busy: busy_fraction,
            mem_headroom,
            mem_source,
            cpu_source,
        }
    }

    fn read(&mut self, which: Which) -> Option<String> {
        let file = match which {
            Which::Stat => self.stat.as_ref()?,
            Which::Meminfo => self.meminfo.as_ref()?,
        };
        let n = file.read_at(&mut self.buf, 0).ok()?;
        Some(String::from_utf8_lossy(&self.buf[..n]).into_owned())
    }
}

enum Which {
    Stat,
    Meminfo,
}

/// The first line of `/proc/stat` as (busy, total) jiffies; idle and iowait are not busy.
pub fn parse_proc_stat_cpu(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The cgroup v2 directory of this process, if cgroup v2 is mounted where we look.
fn own_cgroup_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// `cpu.max`: `"max 100000"` is no limit; `"50000 100000"` is half a CPU.
pub fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut it = s.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next()?.parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    Some(quota / period)
}

/// `memory.max`: `"max"` is no limit.
pub fn parse_memory_max(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" { None } else { s.parse().ok() }
}

/// The `p`-th percentile (0–100) of some values, nearest-rank. Pure.
pub fn percentile(values: &mut [u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

/// The highest of the values seen in a sliding window of ticks. Pure.
#[derive(Debug, Clone, Default)]
pub struct WindowMax {
    window: std::collections::VecDeque<(Instant, u64)>,
}

impl WindowMax {
    pub fn push(&mut self, now: Instant, v: u64, span: Duration) -> u64 {
        while self
            .window
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > span)
        {
            self.window.pop_front();
        }
        // Values below a newer one can never be the maximum again.
        while self.window.back().is_some_and(|(_, x)| *x <= v) {
            self.window.pop_back();
        }
        self.window.push_back((now, v));
        self.window.front().map_or(v, |(_, x)| *x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_cpu_over_wall() {
        let t0 = Instant::now();
        let mut m = BusyMeter::default();
        assert_eq!(m.update(t0, 100, 100), None);
        let b = m.update(t0 + Duration::from_secs(2), 200, 100).unwrap();
        assert!((b - 0.5).abs() < 1e-9);
        let b = m.update(t0 + Duration::from_secs(3), 400, 100).unwrap();
        assert_eq!(b, 1.0, "capped at one thread");
    }

    #[test]
    fn cgroup_files() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("536870912\n"), Some(512 << 20));
    }

    #[test]
    fn proc_stat() {
        let text = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_proc_stat_cpu(text), Some((150, 1000)));
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&mut v, 95.0), Some(95));
        assert_eq!(percentile(&mut [7], 95.0), Some(7));
        assert_eq!(percentile(&mut [], 95.0), None);
    }

    #[test]
    fn window_max_forgets_old_peaks() {
        let t0 = Instant::now();
        let mut w = WindowMax::default();
        let span = Duration::from_secs(10);
        assert_eq!(w.push(t0, 5, span), 5);
        assert_eq!(w.push(t0 + Duration::from_secs(1), 3, span), 5);
        assert_eq!(w.push(t0 + Duration::from_secs(10), 4, span), 5);
        assert_eq!(w.push(t0 + Duration::from_secs(12), 2, span), 4);
        assert_eq!(w.push(t0 + Duration::from_secs(13), 9, span), 9);
    }

    #[test]
    fn reads_this_process() {
        let mut t = TaskStat::open(std::process::id() as i32).unwrap();
        let s = t.read().unwrap();
        assert!(s.rss_bytes > 0);
        let h = Host::new().sample();
        assert!(h.cpus >= 1.0 || h.cpu_source == "cgroup");
        assert!(h.mem_headroom.unwrap_or(1) > 0);
    }
}
