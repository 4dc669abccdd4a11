//! CPU time of the server processes, from `/proc/PID/stat`.
//!
//! A [`CpuSampler`] reads utime + stime (fields 14 and 15, in clock ticks)
//! of a fixed set of processes when it starts and again when it ends; the
//! difference, over every process readable both times, is the CPU the
//! servers spent on the workload (all their threads; not their children).
//! A process that exited (or was not there) is skipped, so a restarted
//! broker is not counted. Linux only: elsewhere no process is readable and
//! the figures are absent.

use std::collections::BTreeMap;
use std::time::Instant;

/// `/proc/PID/comm` of the processes counted when no PIDs are given:
/// a broker, a proxy, or `petrel dev` (the embedded cluster).
pub const SERVER_COMMS: [&str; 3] = ["petrel-broker", "petrel-proxy", "petrel"];

/// utime + stime, in clock ticks, from the text of `/proc/PID/stat`.
///
/// The second field (`comm`, in parentheses) may itself contain spaces and
/// parentheses, so the fields are counted from after the LAST `)`: the
/// third field (state) comes first there, so utime (14) and stime (15) are
/// the 12th and 13th.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// CPU ticks (utime + stime) of process `pid`; `None` when it is gone or
/// unreadable.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&stat)
}

/// Bytes process `pid` caused to be written to storage (`write_bytes` of
/// `/proc/PID/io`); `None` when it is gone or unreadable.
pub fn process_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    parse_io_write_bytes(&io)
}

/// `write_bytes` from the text of `/proc/PID/io`.
pub fn parse_io_write_bytes(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every process on the machine whose `/proc/PID/comm` is one of
/// [`SERVER_COMMS`], except this one.
pub fn find_server_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| SERVER_COMMS.contains(&c.trim_end_matches('\n')))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// CPU consumed by a set of processes between [`CpuSampler::start`] and
/// [`CpuSampler::finish`].
#[derive(Debug, Clone)]
pub struct CpuSampler {
    start: Instant,
    /// PID -> ticks at the start, for the processes readable then.
    ticks: BTreeMap<u32, u64>,
    /// PID -> bytes written to storage at the start.
    written: BTreeMap<u32, u64>,
}

/// What a [`CpuSampler`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUsage {
    /// CPU seconds (user + system) of the processes readable at both ends.
    pub seconds: f64,
    /// Wall-clock seconds between the two snapshots.
    pub wall_seconds: f64,
    /// Processes readable at both ends.
    pub pids: usize,
    /// Bytes the processes caused to be written to storage (`write_bytes`
    /// of `/proc/PID/io`: WAL, SST flushes and compactions), if readable.
    pub disk_write_bytes: Option<u64>,
}

impl CpuUsage {
    /// CPU seconds per wall-clock second (1.0 = one core busy).
    pub fn cores(&self) -> f64 {
        self.seconds / self.wall_seconds.max(1e-9)
    }
}

impl CpuSampler {
    /// Snapshots `pids`, or, when `None`, every server process found by
    /// [`find_server_pids`].
    pub fn start(pids: Option<&[u32]>) -> Self {
        let pids = match pids {
            Some(p) => p.to_vec(),
            None => find_server_pids(),
        };
        let ticks = pids
            .iter()
            .filter_map(|&pid| Some((pid, process_ticks(pid)?)))
            .collect();
        let written = pids
            .iter()
            .filter_map(|&pid| Some((pid, process_write_bytes(pid)?)))
            .collect();
        Self {
            start: Instant::now(),
            ticks,
            written,
        }
    }

    /// Processes readable at the start.
    pub fn pids(&self) -> usize {
        self.ticks.len()
    }

    /// Snapshots again; `None` when no process was readable at both ends.
    pub fn finish(&self) -> Option<CpuUsage> {
        let wall_seconds = self.start.elapsed().as_secs_f64();
        let (mut ticks, mut pids) = (0u64, 0usize);
        for (&pid, &before) in &self.ticks {
            if let Some(now) = process_ticks(pid) {
                ticks += now.saturating_sub(before);
                pids += 1;
            }
        }
        let mut written: Option<u64> = None;
        for (&pid, &before) in &self.written {
            if let Some(now) = process_write_bytes(pid) {
                *written.get_or_insert(0) += now.saturating_sub(before);
            }
        }
        (pids > 0).then(|| CpuUsage {
            seconds: ticks as f64 / clock_ticks_per_sec() as f64,
            wall_seconds,
            pids,
            disk_write_bytes: written,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line (kernel 6.x layout), fields 14/15 = 1234/567.
    const STAT: &str = "4242 (petrel-broker) S 1 4242 4242 0 -1 4194560 25017 0 3 0 \
        1234 567 0 0 20 0 37 0 1062 1715499008 21430 18446744073709551615 1 1 0 0 0 0 0 \
        4096 17610 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn parses_utime_and_stime() {
        assert_eq!(parse_stat_ticks(STAT), Some(1234 + 567));
    }

    #[test]
    fn comm_with_spaces_and_parentheses() {
        let stat = STAT.replace("(petrel-broker)", "(a) b (c) d)");
        assert_eq!(parse_stat_ticks(&stat), Some(1801));
        let stat = STAT.replace("(petrel-broker)", "( ) 1 2 3 4 5 6 7 8 9 10 11 12 )");
        assert_eq!(parse_stat_ticks(&stat), Some(1801));
    }

    #[test]
    fn io_write_bytes_is_parsed() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_io_write_bytes(io), Some(8192));
        assert_eq!(parse_io_write_bytes("rchar: 1\n"), None);
    }

    #[test]
    fn malformed_stat_is_none() {
        assert_eq!(parse_stat_ticks(""), None);
        assert_eq!(parse_stat_ticks("4242 (x"), None);
        assert_eq!(parse_stat_ticks("4242 (x) S 1 2 3"), None);
        assert_eq!(
            parse_stat_ticks(&STAT.replace(" 1234 ", " x ")),
            None,
            "non-numeric utime"
        );
    }

    #[test]
    fn own_process_is_readable_and_never_auto_detected() {
        assert!(process_ticks(std::process::id()).is_some());
        assert!(!find_server_pids().contains(&std::process::id()));
        assert!(clock_ticks_per_sec() > 0);
    }

    #[test]
    fn sampler_counts_readable_processes_only() {
        // u32::MAX is above pid_max: never a process.
        let s = CpuSampler::start(Some(&[std::process::id(), u32::MAX]));
        assert_eq!(s.pids(), 1);
        let u = s.finish().expect("own process readable");
        assert_eq!(u.pids, 1);
        assert!(u.seconds >= 0.0);
        let none = CpuSampler::start(Some(&[u32::MAX]));
        assert_eq!(none.finish(), None);
    }
}
