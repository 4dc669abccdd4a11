//! The progress line on stderr of `petrel produce` and `petrel consume`,
//! shared by both.

use std::time::Duration;

/// A progress line on stderr every `PROGRESS_EVERY` for commands that run
/// until their input or Ctrl-C ends (produce from stdin, consume without
/// --max): records so far and the recent rate. Only when both stdout and
/// stderr are a terminal and --json is off: piped output and scripts see
/// nothing but records.
pub(super) struct Progress {
    on: bool,
    verb: &'static str,
    start: std::time::Instant,
    last: std::time::Instant,
    last_n: u64,
    n: u64,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    pub(super) fn new(verb: &'static str, wanted: bool, json: bool) -> Self {
        use std::io::IsTerminal;
        let now = std::time::Instant::now();
        Self {
            on: wanted
                && !json
                && std::io::stdout().is_terminal()
                && std::io::stderr().is_terminal(),
            verb,
            start: now,
            last: now,
            last_n: 0,
            n: 0,
        }
    }

    pub(super) fn add(&mut self, k: u64) {
        self.n += k;
        if !self.on || self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        let rate = (self.n - self.last_n) as f64 / self.last.elapsed().as_secs_f64();
        eprintln!("-- {} {} records ({rate:.0}/s)", self.verb, self.n);
        self.last = std::time::Instant::now();
        self.last_n = self.n;
    }

    pub(super) fn finish(&self) {
        if self.on && self.n > 0 {
            let secs = self.start.elapsed().as_secs_f64();
            eprintln!(
                "-- {} {} records in {secs:.1} s ({:.0}/s)",
                self.verb,
                self.n,
                self.n as f64 / secs.max(1e-3)
            );
        }
    }
}
