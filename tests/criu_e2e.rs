//! A real CRIU end to end against `umm lazy-pages` (issue 7): the memtest workload
//! (tests/fixtures/criu-4.2-memtest/memtest.c) is dumped with `criu dump`, then restored with
//! `criu restore --lazy-pages -d` while `umm lazy-pages` serves its memory, with forks and
//! MADV_DONTNEED during the fill.
//!
//! Needs CRIU >= 4.0 (`$UMM_CRIU`, else `criu` on PATH). The test is #[ignore] and run by
//! `make criu-e2e-test` (part of `make test`), which prints a SKIPPED line, counted as
//! skipped, never as passed, when there is no such CRIU.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The background fill's rate: slow enough that the restored tasks fault, fork and drop
/// pages while most of their memory is still missing (about 30 MiB lazy: a few seconds).
const FILL_RATE: u64 = 8 << 20;
/// Passes each restored memtest process must log after the restore.
const PASSES_AFTER_RESTORE: usize = 3;

fn criu_bin() -> PathBuf {
    let bin = std::env::var_os("UMM_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("criu"));
    let out = Command::new(&bin).arg("--version").output();
    let ok = out.as_ref().is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .and_then(|v| v.split('.').next()?.trim().parse::<u32>().ok())
            .is_some_and(|major| major >= 4)
    });
    assert!(
        ok,
        "{} is not CRIU >= 4.0 ({out:?}): run this test with `make criu-e2e-test`",
        bin.display()
    );
    bin
}

/// memtest, compiled into the test's directory.
fn build_memtest(dir: &TestDir) -> PathBuf {
    let exe = dir.join("memtest");
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg(root().join("tests/fixtures/criu-4.2-memtest/memtest.c"))
        .output()
        .expect("cannot run cc");
    assert!(
        out.status.success(),
        "cc memtest.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// One log line of memtest: `<epoch> <tag> pid=<pid> pass=<n> ... bad=<n>`.
struct Pass {
    pid: i32,
    bad: u64,
}

fn parse_pass(line: &str) -> Option<Pass> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    field("pass=")?;
    Some(Pass {
        pid: i32::try_from(field("pid=")?).ok()?,
        bad: field("bad=")?,
    })
}

/// The pid in memtest's `<tag> pid=N filled` line.
fn filled_pid(log: &str, tag: &str) -> Option<i32> {
    log.lines()
        .find(|l| l.contains(&format!(" {tag} pid=")) && l.contains(" filled "))
        .and_then(|l| {
            l.split(" pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

fn is_memtest(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _, comm)| comm == "memtest" && state != 'Z')
}

/// The memtest processes this test started (and CRIU restored under the same pids): killed by
/// pid when dropped, if they still are memtest.
struct Workload {
    pids: Vec<i32>,
}

impl Workload {
    fn kill_all(&self) {
        for &pid in &self.pids {
            if is_memtest(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    fn all_gone(&self) -> bool {
        self.pids.iter().all(|&p| !is_memtest(p))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn run_criu(dir: &TestDir, label: &str, criu: &Path, args: &[&str], log: &Path) {
    let mut cmd = Command::new(criu);
    cmd.args(args);
    let mut p = Proc::spawn(dir, label, cmd);
    let st = p.wait_bounded(Duration::from_secs(120));
    assert!(
        st.success(),
        "criu {label} failed: {}\n{}\n--- {} (tail) ---\n{}",
        describe(&st),
        p.context(),
        log.display(),
        tail(&fs::read_to_string(log).unwrap_or_default(), 40)
    );
}

/// umm's summary line of each task: image pid -> (line, faulted pages, filled pages).
fn summaries(stderr: &str) -> BTreeMap<u32, (String, u64, u64)> {
    let mut out = BTreeMap::new();
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix("umm: lazy-pages: pid ") else {
            continue;
        };
        let Some(pid) = rest.split([' ', ':']).next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let num = |before: &str| -> u64 {
            line.split(before)
                .next()
                .and_then(|h| h.split_whitespace().last()?.parse().ok())
                .unwrap_or(0)
        };
        out.insert(
            pid,
            (line.to_string(), num(" by faults"), num(" by the fill")),
        );
    }
    out
}

#[test]
#[ignore = "needs CRIU >= 4.0: make criu-e2e-test"]
fn criu_restore_lazy_pages_served_by_umm_keeps_memtest_verifying() {
    require_root_and_uffd();
    let criu = criu_bin();
    let dir = TestDir::new("criu-e2e");
    let memtest = build_memtest(&dir);
    let img = dir.join("img");
    fs::create_dir(&img).unwrap();

    // The workload, as the fixture was made: its own session (CRIU dumps a whole session), a
    // 16 MiB parent forking grandchildren (-f), a 4 MiB child, both dropping and refilling a
    // scratch area (-r). setsid execs in place: the spawned pid is memtest's.
    let log_path = dir.join("memtest.log");
    let child = Command::new("setsid")
        .arg(&memtest)
        .args(["-s", "16", "-c", "4", "-f", "-r", "-i", "200"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log_path).unwrap())
        .stderr(fs::File::create(dir.join("memtest.stderr")).unwrap())
        .spawn()
        .expect("spawn setsid memtest");
    let mut workload = Workload {
        pids: vec![child.id() as i32],
    };
    let log = || fs::read_to_string(&log_path).unwrap_or_default();
    let running = poll_until(3000, Duration::from_millis(10), || {
        let l = log();
        l.contains(" parent pid=") && l.contains(" child pid=") && l.contains(" pass=2 ")
    });
    assert!(running, "memtest did not start:\n{}", log());
    let parent = filled_pid(&log(), "parent").unwrap();
    let child_pid = filled_pid(&log(), "child").unwrap();
    assert_eq!(parent, child.id() as i32, "setsid forked:\n{}", log());
    workload.pids.push(child_pid);

    // A plain dump to images (the tree is killed), then a lazy restore.
    let dump_log = img.join("dump.log");
    run_criu(
        &dir,
        "criu-dump",
        &criu,
        &[
            "dump",
            "-t",
            &parent.to_string(),
            "-D",
            img.to_str().unwrap(),
            "-o",
            "dump.log",
            "-v4",
        ],
        &dump_log,
    );
    // Reap memtest. Its pids must be free again for the restore: not even a zombie of its
    // session (pgid = sid = its pid) may be left, or the kernel keeps the pid number in use.
    let mut child = child;
    let _ = child.wait();
    let freed = poll_until(3000, Duration::from_millis(10), || {
        group_members(parent).is_empty() && !Path::new(&format!("/proc/{child_pid}")).exists()
    });
    assert!(
        freed,
        "memtest's processes still there after the dump: {:?}",
        group_members(parent)
    );
    let before_restore = log().len();

    let report = dir.join("report.json");
    let mut umm_cmd = Command::new(umm_bin());
    umm_cmd
        .args(["lazy-pages", "-D"])
        .arg(&img)
        .arg("--report")
        .arg(&report)
        .args(["--fill-rate", &FILL_RATE.to_string()])
        .env("RUST_LOG", "info");
    let mut umm = Proc::spawn(&dir, "umm", umm_cmd);
    let sock = img.join("lazy-pages.socket");
    let up = poll_until(1000, Duration::from_millis(10), || sock.exists());
    assert!(up, "no {}\n{}", sock.display(), umm.context());

    // Detached (-d): criu restore exits once the tree runs; the tasks keep their pids.
    run_criu(
        &dir,
        "criu-restore",
        &criu,
        &[
            "restore",
            "-D",
            img.to_str().unwrap(),
            "--lazy-pages",
            "-d",
            "-o",
            "restore.log",
            "-v4",
        ],
        &img.join("restore.log"),
    );
    let ust = umm.wait_bounded(Duration::from_secs(120));
    assert!(
        ust.success(),
        "umm lazy-pages failed: {}\n{}",
        describe(&ust),
        umm.context()
    );

    // The restored processes go on verifying: each logs passes with bad=0, and nothing logs a
    // mismatch (main area, scratch refill, zeros after DONTNEED) or a failed grandchild.
    let after = || log()[before_restore..].to_string();
    let passes_of = |text: &str, pid: i32| {
        text.lines()
            .filter_map(parse_pass)
            .filter(|p| p.pid == pid)
            .count()
    };
    let verified = poll_until(3000, Duration::from_millis(20), || {
        let a = after();
        a.contains("MISMATCH")
            || a.contains("FAILED")
            || [parent, child_pid]
                .iter()
                .all(|&p| passes_of(&a, p) >= PASSES_AFTER_RESTORE)
    });
    let a = after();
    let ctx = format!(
        "--- memtest log after the restore ---\n{}\n{}",
        tail(&a, 40),
        umm.context()
    );
    assert!(verified, "the restored tasks stopped logging\n{ctx}");
    assert!(!a.contains("MISMATCH") && !a.contains("FAILED"), "{ctx}");
    for p in a.lines().filter_map(parse_pass) {
        assert_eq!(p.bad, 0, "pid {}\n{ctx}", p.pid);
    }
    for pid in [parent, child_pid] {
        assert!(is_memtest(pid), "restored pid {pid} is not running\n{ctx}");
    }

    // umm served them: every task handed over completed, both by faults and by the fill.
    let sums = summaries(&umm.stderr());
    for pid in [parent as u32, child_pid as u32] {
        let (line, _, _) = sums
            .get(&pid)
            .unwrap_or_else(|| panic!("no summary line for pid {pid}\n{ctx}"));
        assert!(line.contains("restore complete"), "{line}\n{ctx}");
        assert!(line.contains(" lazy pages"), "{line}\n{ctx}");
    }
    let faulted: u64 = sums.values().map(|s| s.1).sum();
    let filled: u64 = sums.values().map(|s| s.2).sum();
    assert!(faulted > 0, "no page served by a fault\n{ctx}");
    assert!(filled > 0, "no page served by the fill\n{ctx}");
    let rep = Report::load(&report).unwrap();
    let handoffs = rep.u64("restore.handoffs");
    assert!(handoffs >= 2, "{}", rep.pretty());
    // The two live tasks completed (their summaries say so); a zombie caught at dump time may
    // be handed over too (as -pid, nothing to fill), so completions are not compared with
    // handoffs.
    assert!(rep.u64("restore.completed") >= 2, "{}", rep.pretty());
    assert_eq!(rep.u64("restore.killed"), 0, "{}", rep.pretty());
    assert!(rep.u64("events.fork") >= 1, "{}", rep.pretty());
    assert!(rep.u64("events.remove") >= 1, "{}", rep.pretty());

    workload.kill_all();
    let gone = poll_until(1000, Duration::from_millis(10), || workload.all_gone());
    assert!(gone, "restored memtest processes survived SIGKILL");
}
