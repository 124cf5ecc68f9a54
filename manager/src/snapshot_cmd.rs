//! `umm snapshot PID -o DIR`: write a memory image of a live process (see `umm::snapshot`).

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use umm::snapshot::{self, After, Options};
use umm::sys::proc;

use crate::abort_signals::AbortSignals;
use crate::progress::Progress;

#[derive(Args, Debug)]
#[command(
    long_about = "Write a memory image (umm-image(5)) of a live process: every thread is \
    stopped with ptrace, the private anonymous memory (heap, stacks, anonymous mappings) is \
    copied — only pages that have contents, holes stay holes — and the process then continues \
    (or is killed, or left stopped). Works on any process the caller may ptrace, managed by \
    umm or not: only pages /proc/PID/pagemap reports present or swapped are read, so no \
    userfaultfd fault is raised in a managed process. On failure the process is released and \
    no partial image is left."
)]
pub struct SnapshotArgs {
    /// The process to snapshot.
    #[arg(value_name = "PID")]
    pid: u32,
    /// The image directory to write (must not exist, or be empty).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Kill the process (SIGKILL) once the image is written and synced.
    #[arg(long, conflicts_with = "leave_stopped")]
    kill: bool,
    /// Leave the process stopped (group-stop, state T; SIGCONT resumes it).
    #[arg(long)]
    leave_stopped: bool,
    /// Only this address range (hexadecimal as in /proc/PID/maps, 0x allowed); repeatable.
    #[arg(long = "range", value_name = "START-END", value_parser = snapshot::parse_range)]
    ranges: Vec<Range<u64>>,
    /// Seconds each thread may take to stop.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    stop_timeout: u64,
    /// No summary on stderr.
    #[arg(short, long)]
    quiet: bool,
}

pub fn main(args: SnapshotArgs) -> i32 {
    // SIGINT/SIGTERM/SIGHUP abort the snapshot cleanly (release the process, remove the
    // partial image) instead of killing umm with the process held.
    let signals = AbortSignals::block();
    let interrupted = || signals.interrupted();
    // The total is an estimate: the anonymous pages resident or swapped now (not known with
    // --range, where the line shows bytes and rate only).
    let estimate = if args.ranges.is_empty() {
        anon_bytes(args.pid)
    } else {
        None
    };
    let progress = std::cell::RefCell::new(Progress::new("snapshot", args.quiet));
    let on_progress = |done: u64| progress.borrow_mut().update(done, estimate);
    let opts = Options {
        pid: args.pid,
        dir: args.output.clone(),
        ranges: args.ranges,
        after: if args.kill {
            After::Kill
        } else if args.leave_stopped {
            After::LeaveStopped
        } else {
            After::Resume
        },
        stop_timeout: Duration::from_secs(args.stop_timeout.max(1)),
        interrupted: Some(&interrupted),
        progress: Some(&on_progress),
    };
    let result = snapshot::snapshot(&opts);
    progress.borrow_mut().finish();
    match result {
        Ok(summary) => {
            if !args.quiet {
                eprintln!("umm: {}", summary.line(&args.output));
            }
            0
        }
        Err(e) => {
            eprintln!("umm: snapshot of pid {} failed: {e}", args.pid);
            match signals.caught() {
                Some(sig) => 128 + sig,
                None => 1,
            }
        }
    }
}

/// Anonymous memory of `pid` resident or swapped (RssAnon + VmSwap), in bytes.
fn anon_bytes(pid: u32) -> Option<u64> {
    let kib = |field| proc::status_field(pid, field).ok()?.first().copied();
    Some((kib("RssAnon")? + kib("VmSwap").unwrap_or(0)) * 1024)
}
