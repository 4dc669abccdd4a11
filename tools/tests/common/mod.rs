//! Shared by the real-process tests: binaries, ports, and a process group
//! that kills every child by PID when dropped (pass or fail).

#![allow(dead_code)] // each test file uses its own subset

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;

/// A workspace binary. Those of other crates sit beside `petrel` in the
/// target dir (`cargo build --workspace` builds them; scripts/test.sh does).
pub fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_petrel")).with_file_name(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace` first",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Child processes, killed (SIGKILL) and reaped on drop.
#[derive(Default)]
pub struct Procs(pub Vec<Option<Child>>);

impl Procs {
    pub fn push(&mut self, c: Child) -> usize {
        self.0.push(Some(c));
        self.0.len() - 1
    }

    /// SIGKILL one child now and wait for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.0[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for i in 0..self.0.len() {
            self.kill(i);
        }
    }
}
