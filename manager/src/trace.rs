//! `--trace FILE`: one JSON object per line for every fault served and every layout event.
//!
//! Fields: `t_us` (since the manager started), `space` (the manager's number for the address
//! space; reused after its `exit` line), `pid` (0 while unknown), `kind` (`fault`, `fork`,
//! `remap`, `remove`, `unmap`, `register`, `exit`). Faults: `start` (the page), `len` (bytes
//! copied for it, fault-around included; a fault whose first copy stopped short has one line
//! per copy), `write`, `latency_us`. Remap: `start`, `len`, `to`. Remove, unmap, register:
//! `start`, `len`. Fork: `child` (the child's space number). Exit: nothing more. A restore's
//! handoff (`restore`): `to_fill` (bytes its image holds for it). Background fill copies
//! (`fill`): `start`, `len` (one line per copied piece, 256 KiB or more each).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::Instant;

pub struct Trace {
    out: BufWriter<File>,
    epoch: Instant,
    failed: bool,
}

/// One line's variable part.
pub enum Record {
    Fault {
        addr: u64,
        served: u64,
        write: bool,
        latency_us: u64,
    },
    Fork {
        child: usize,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    Register {
        start: u64,
        len: u64,
    },
    Exit,
    Restore {
        to_fill: u64,
    },
    Fill {
        start: u64,
        len: u64,
    },
}

impl Trace {
    pub fn create(path: &Path, epoch: Instant) -> io::Result<Trace> {
        Ok(Trace {
            out: BufWriter::with_capacity(1 << 16, File::create(path)?),
            epoch,
            failed: false,
        })
    }

    pub fn write(&mut self, space: usize, pid: u32, rec: Record) {
        if self.failed {
            return;
        }
        let t = self.epoch.elapsed().as_micros();
        let r = match rec {
            Record::Fault {
                addr,
                served,
                write,
                latency_us,
            } => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"fault","start":{addr},"len":{served},"write":{write},"latency_us":{latency_us}}}"#
            ),
            Record::Fork { child } => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"fork","child":{child}}}"#
            ),
            Record::Remap { from, to, len } => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"remap","start":{from},"len":{len},"to":{to}}}"#
            ),
            Record::Remove { start, end } => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"remove","start":{start},"len":{}}}"#,
                end.saturating_sub(start)
            ),
            Record::Unmap { start, end } => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"unmap","start":{start},"len":{}}}"#,
                end.saturating_sub(start)
            ),
            Record::Register { start, len } => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"register","start":{start},"len":{len}}}"#
            ),
            Record::Restore { to_fill } => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"restore","to_fill":{to_fill}}}"#
            ),
            Record::Fill { start, len } => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"fill","start":{start},"len":{len}}}"#
            ),
            Record::Exit => writeln!(
                self.out,
                r#"{{"t_us":{t},"space":{space},"pid":{pid},"kind":"exit"}}"#
            ),
        };
        if let Err(e) = r {
            log::error!("trace: writing failed ({e}); no further trace lines");
            self.failed = true;
        }
    }

    pub fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            log::error!("trace: flush failed: {e}");
        }
    }
}
