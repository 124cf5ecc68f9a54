//! Harness of umm's integration tests.
//!
//! Every test drives real programs under the real `umm` binary and checks two things (DESIGN.md,
//! "Test programs"): the program's own results (its `OK <name> checksum=...` line, exit status,
//! checksums compared with a native run) and that the manager really served its memory (the
//! counters of the JSON report, with thresholds that cannot be met without umm).
//!
//! Rules kept here: no timed assertions (only hard upper bounds that kill a hung run and fail the
//! test); every spawned process is its own process group and is killed by id when its guard
//! drops; each test gets its own temp dir, removed at the end (set `UMM_KEEP_TEST_DIRS=1` to keep
//! them); after a run, no process of its group may be left behind, in D state or at all.
//!
//! Binaries: `UMM_BIN` / `UMM_AGENT` if set, else `target/release/umm` and
//! `target/release/libumm_agent.so` under the workspace root. `UMM_TEST_TRACE=1` adds
//! `--trace <dir>/<label>.trace.jsonl` to every `umm run` (keep the dir to read it).
#![allow(dead_code)]

pub mod netns;
pub mod tls;
pub mod wire;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The C target programs in `tests/targets/` (each `<name>.c`, sharing `umm_check.h`).
pub const C_TARGETS: &[&str] = &[
    "threads",
    "forkstorm",
    "layoutstorm",
    "samepage",
    "readinto",
    "registered",
    "forkhold",
    "forkmap",
    "outlive",
    "sparse",
    "richstate",
    "verify",
    "storm",
    "forkloop",
    "attachloop",
    "forkmany",
    "execmt",
    "sigstorm",
    "memhog",
    "criu_restorer",
    "mtalloc",
    "attachee",
    "seccomped",
];

/// The real python (the `python3` on PATH may be a pyenv bash shim).
pub const PYTHON: &str = "/usr/bin/python3";

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;

/// The workspace root (the root package is the `umm` library).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn binary(env: &str, rel: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(rel));
    if !path.is_file() {
        panic!(
            "{} not found (override with {env}=PATH): build with `make` first",
            path.display()
        );
    }
    path
}

/// The manager binary.
pub fn umm_bin() -> PathBuf {
    binary("UMM_BIN", "target/release/umm")
}

/// The LD_PRELOAD agent.
pub fn agent_lib() -> PathBuf {
    binary("UMM_AGENT", "target/release/libumm_agent.so")
}

/// Panics (never silently passes) unless the test runs as root on a kernel with
/// `/dev/userfaultfd`, and unless the binaries are built.
pub fn require_root_and_uffd() {
    let euid = nix::unistd::geteuid();
    let dev = Path::new("/dev/userfaultfd").exists();
    if !euid.is_root() || !dev {
        panic!(
            "this test needs root and /dev/userfaultfd (run `make test` as root): euid={euid}, \
             /dev/userfaultfd {}",
            if dev { "present" } else { "missing" }
        );
    }
    umm_bin();
    agent_lib();
}

/// A per-test temp dir, removed on drop unless `UMM_KEEP_TEST_DIRS` is set.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "umm-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod test dir");
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("UMM_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// The path of a compiled C target. All targets are compiled once per test process
/// (`cc -O2 -pthread`) into `target/testbin/<hash of sources and compiler>/`: built in a private
/// directory, then renamed into place atomically, so concurrent test processes never see a
/// half-written binary and an unchanged tree is not rebuilt.
pub fn target(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(build_targets);
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "no target program {name} in {}",
        dir.display()
    );
    path
}

/// A target's source file (for python: `py_alloc.py`).
pub fn target_source(file: &str) -> PathBuf {
    root().join("tests/targets").join(file)
}

fn build_targets() -> PathBuf {
    let src = root().join("tests/targets");
    let cc = Command::new("cc")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run cc: {e}"));
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    fnv1a(&mut h, &cc.stdout);
    fnv1a(&mut h, b"cc -O2 -pthread -Wall");
    let header = fs::read(src.join("umm_check.h")).expect("read umm_check.h");
    fnv1a(&mut h, &header);
    for name in C_TARGETS {
        fnv1a(&mut h, name.as_bytes());
        let text = fs::read(src.join(format!("{name}.c")))
            .unwrap_or_else(|e| panic!("read {name}.c: {e}"));
        fnv1a(&mut h, &text);
    }
    let base = root().join("target/testbin");
    fs::create_dir_all(&base).expect("create target/testbin");
    let done = base.join(format!("{h:016x}"));
    let complete = |d: &Path| C_TARGETS.iter().all(|n| d.join(n).is_file());
    if complete(&done) {
        return done;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = base.join(format!(".build-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&tmp).expect("create build dir");
    for name in C_TARGETS {
        let out = Command::new("cc")
            .args(["-O2", "-pthread", "-Wall", "-o"])
            .arg(tmp.join(name))
            .arg(src.join(format!("{name}.c")))
            .output()
            .unwrap_or_else(|e| panic!("cannot run cc: {e}"));
        if !out.status.success() {
            let _ = fs::remove_dir_all(&tmp);
            panic!(
                "cc failed for tests/targets/{name}.c:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod build dir");
    match fs::rename(&tmp, &done) {
        Ok(()) => done,
        Err(_) if complete(&done) => {
            // another test process won the race with identical sources
            let _ = fs::remove_dir_all(&tmp);
            done
        }
        Err(e) => panic!("rename {} -> {}: {e}", tmp.display(), done.display()),
    }
}

/// The last `lines` lines of a text (for failure messages).
pub fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    let start = v.len().saturating_sub(lines);
    let mut s = v[start..].join("\n");
    if s.len() > 8000 {
        s = format!("...{}", &s[s.len() - 8000..]);
    }
    s
}

/// One line of `/proc/PID/stat`: (state, pgrp, comm).
pub fn proc_stat(pid: i32) -> Option<(char, i32, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let mut rest = text[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some((state, pgrp, comm))
}

/// Processes (pid, state, comm) whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<(i32, char, String)> {
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((state, pgrp, comm)) = proc_stat(pid) {
                if pgrp == pgid {
                    v.push((pid, state, comm));
                }
            }
        }
    }
    v
}

/// After a process group's leader exited: fail if any member is stuck in D state (sampled a
/// bounded number of times, so a short disk wait does not count), and fail if any member is
/// left alive at all (it is killed first). Zombies waiting for init are ignored.
pub fn assert_group_gone(pgid: i32, what: &str) {
    // Killing is asynchronous (a keeper notices its manager's death, then kills; SIGKILL takes
    // a moment to end a process): wait, bounded, for the group to go.
    let mut left = Vec::new();
    for _ in 0..30 {
        left = group_members(pgid)
            .into_iter()
            .filter(|m| m.1 != 'Z')
            .collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stuck: Vec<_> = left.iter().filter(|m| m.1 == 'D').cloned().collect();
    if !left.is_empty() {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    assert!(
        stuck.is_empty(),
        "{what}: processes left in D state (blocked in the kernel, e.g. on an unread uffd event): {stuck:?}"
    );
    assert!(
        left.is_empty(),
        "{what}: processes left behind after it exited (now killed): {left:?}"
    );
}

/// Number of open fds of a process.
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

/// The fds of a process and what they point to (for failure messages).
pub fn fd_list(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let target = fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    format!("{} -> {target}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Poll `cond` up to `tries` times, `every` apart. Bounded waiting for something asynchronous,
/// not a timing assertion: the caller fails only if it never happens.
pub fn poll_until(tries: u32, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..tries {
        if cond() {
            return true;
        }
        std::thread::sleep(every);
    }
    cond()
}

/// A spawned process (its own process group), output in files of the test dir, killed with its
/// group by id when dropped.
pub struct Proc {
    pub label: String,
    pub pid: i32,
    child: Option<Child>,
    status: Option<ExitStatus>,
    /// The group was found empty after the exit: nothing left to kill on drop (and its id may
    /// be reused by then).
    group_gone: bool,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Proc {
    pub fn spawn(dir: &TestDir, label: &str, mut cmd: Command) -> Proc {
        let stdout_path = dir.join(format!("{label}.stdout"));
        let stderr_path = dir.join(format!("{label}.stderr"));
        let out = fs::File::create(&stdout_path).expect("create stdout file");
        let err = fs::File::create(&stderr_path).expect("create stderr file");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{label}: cannot spawn {cmd:?}: {e}"));
        Proc {
            label: label.to_string(),
            pid: child.id() as i32,
            child: Some(child),
            status: None,
            group_gone: false,
            stdout_path,
            stderr_path,
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.try_wait().expect("try_wait");
            }
        }
        self.status
    }

    /// Wait for exit; past `limit` kill the whole group and fail the test (a hang, not a speed
    /// verdict: limits are far above any sane run time).
    pub fn wait_bounded(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                return st;
            }
            if start.elapsed() > limit {
                self.kill();
                panic!(
                    "{} (pid {}) still running after the hard limit of {limit:?}: killed it (hang?)\n\
                     --- stdout ---\n{}\n--- stderr ---\n{}",
                    self.label,
                    self.pid,
                    tail(&self.stdout(), 40),
                    tail(&self.stderr(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Proc::wait_bounded`], and the exit must be 0 (`what` names it in the failure).
    pub fn wait_success(&mut self, what: &str, limit: Duration) -> ExitStatus {
        let st = self.wait_bounded(limit);
        assert!(
            st.success(),
            "{what}: {}\n{}",
            describe(&st),
            self.context()
        );
        st
    }

    /// After the exit: nothing of the process group may be left, in D state or at all
    /// ([`assert_group_gone`]).
    pub fn assert_group_gone(&mut self) {
        assert!(self.status.is_some(), "{}: still running", self.label);
        assert_group_gone(self.pid, &self.label);
        self.group_gone = true;
    }

    /// A `umm restore` that must be refused before any restorer ran: wait (bounded), then it
    /// failed, printed no HANDED, and its process group is gone. Its stderr.
    pub fn assert_refused_before_handoff(&mut self, limit: Duration) -> String {
        let st = self.wait_bounded(limit);
        self.assert_group_gone();
        assert!(
            !st.success() && !self.stdout().contains("HANDED"),
            "{}: the restore was not refused before a restorer ran\n{}",
            self.label,
            self.context()
        );
        self.stderr()
    }

    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.pid), sig);
        }
    }

    /// SIGKILL the group and the process, and reap it.
    pub fn kill(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        if let Some(child) = self.child.as_mut() {
            if self.status.is_none() {
                let _ = child.kill();
                self.status = child.wait().ok();
            }
        }
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Output for failure messages.
    pub fn context(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.label,
            tail(&self.stdout(), 40),
            self.label,
            tail(&self.stderr(), 60)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // the group id is our child's pid: kill what is left of the tree we started
        if !self.group_gone {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Describe an exit status like a shell would.
pub fn describe(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st:?}"),
    }
}

/// The `OK <name> checksum=<hex> key=value...` line of a target.
#[derive(Debug, Clone)]
pub struct OkLine {
    pub name: String,
    pub fields: BTreeMap<String, String>,
}

impl OkLine {
    /// Find and parse the OK line of `name` in `stdout`; `None` if absent.
    pub fn find(stdout: &str, name: &str) -> Option<OkLine> {
        let prefix = format!("OK {name} ");
        let line = stdout.lines().find(|l| l.starts_with(&prefix))?;
        let fields = line[prefix.len()..]
            .split_whitespace()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Some(OkLine {
            name: name.to_string(),
            fields,
        })
    }

    pub fn str(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("OK line of {} has no {key}=: {:?}", self.name, self.fields))
    }

    pub fn u64(&self, key: &str) -> u64 {
        let v = self.str(key);
        v.parse()
            .unwrap_or_else(|_| panic!("OK line of {}: {key}={v} is not a number", self.name))
    }

    pub fn checksum(&self) -> &str {
        self.str("checksum")
    }

    /// `registered=K/N`: (K, N).
    pub fn registered(&self) -> (u64, u64) {
        let v = self.str("registered");
        let (k, n) = v
            .split_once('/')
            .unwrap_or_else(|| panic!("bad registered={v}"));
        (
            k.parse().expect("registered K"),
            n.parse().expect("registered N"),
        )
    }
}

/// The JSON report of a manager run.
#[derive(Debug, Clone)]
pub struct Report {
    pub json: Value,
}

impl Report {
    pub fn load(path: &Path) -> Result<Report, String> {
        let text = fs::read_to_string(path)
            .map_err(|e| format!("cannot read report {}: {e}", path.display()))?;
        let json = serde_json::from_str(&text)
            .map_err(|e| format!("report {} is not JSON: {e}\n{text}", path.display()))?;
        Ok(Report { json })
    }

    /// A field by dotted path (`events.fork`); `None` if absent.
    pub fn get(&self, path: &str) -> Option<&Value> {
        path.split('.').try_fold(&self.json, |v, k| v.get(k))
    }

    /// A string field by dotted path; empty if absent, null or not a string.
    pub fn str_or_empty(&self, path: &str) -> &str {
        self.get(path).and_then(Value::as_str).unwrap_or_default()
    }

    /// An unsigned counter by dotted path; panics if absent or not a non-negative integer.
    pub fn u64(&self, path: &str) -> u64 {
        let v = self
            .get(path)
            .unwrap_or_else(|| panic!("report has no `{path}`:\n{}", self.pretty()));
        v.as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            })
            .unwrap_or_else(|| panic!("report `{path}` = {v} is not a counter:\n{}", self.pretty()))
    }

    /// A float-or-null field; panics if absent or of another type.
    pub fn opt_f64(&self, path: &str) -> Option<f64> {
        let v = self
            .get(path)
            .unwrap_or_else(|| panic!("report has no `{path}`:\n{}", self.pretty()));
        if v.is_null() {
            None
        } else {
            Some(
                v.as_f64()
                    .unwrap_or_else(|| panic!("report `{path}` = {v} is not a number or null")),
            )
        }
    }

    pub fn pretty(&self) -> String {
        serde_json::to_string_pretty(&self.json).unwrap_or_default()
    }

    /// Invariants every report keeps, whatever ran: all documented fields exist with the right
    /// types, bytes and pages agree, latency percentiles are ordered, coverage is a share.
    pub fn check_shape(&self) {
        for k in [
            "processes",
            "handoffs",
            "faults",
            "pages_served",
            "bytes_served",
            "events.fork",
            "events.remap",
            "events.remove",
            "events.unmap",
            "peak_registered_bytes",
            "refused",
            "protocol_errors",
            "spaces_live",
        ] {
            self.u64(k);
        }
        for k in ["coverage.last", "coverage.min"] {
            if let Some(c) = self.opt_f64(k) {
                assert!(
                    (0.0..=1.0).contains(&c),
                    "report {k} = {c} is not a share in [0, 1]"
                );
            }
        }
        assert!(
            self.u64("bytes_served") >= self.u64("pages_served") * PAGE,
            "bytes_served < pages_served * 4096:\n{}",
            self.pretty()
        );
        let lat: Vec<Option<f64>> = ["p50", "p99", "max"]
            .iter()
            .map(|k| self.opt_f64(&format!("fault_latency_us.{k}")))
            .collect();
        if let [Some(p50), Some(p99), Some(max)] = lat[..] {
            assert!(
                p50 <= p99 && p99 <= max,
                "fault latency percentiles out of order: {lat:?}"
            );
        }
    }
}

/// The result of one `umm run`.
pub struct UmmRun {
    pub label: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub report: Report,
}

impl UmmRun {
    /// Wait (bounded) for `p`, a `umm` command writing its report to `report`, check its
    /// process group is gone, and collect what it left.
    pub fn finish(mut p: Proc, report: &Path) -> UmmRun {
        let status = p.wait_bounded(Duration::from_secs(120));
        p.assert_group_gone();
        let report = Report::load(report).unwrap_or_else(|e| {
            panic!(
                "{}: no report ({e}): {}\n{}",
                p.label,
                describe(&status),
                p.context()
            )
        });
        UmmRun {
            label: p.label.clone(),
            status,
            stdout: p.stdout(),
            stderr: p.stderr(),
            report,
        }
    }

    /// Everything a failure message needs.
    pub fn context(&self) -> String {
        format!(
            "umm run `{}`: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- report ---\n{}",
            self.label,
            describe(&self.status),
            tail(&self.stdout, 40),
            tail(&self.stderr, 60),
            self.report.pretty()
        )
    }

    /// The run and its CMD exited 0; the report agrees, and shows a clean protocol exchange.
    pub fn assert_success(&self) {
        assert!(self.status.success(), "expected exit 0\n{}", self.context());
        self.report.check_shape();
        let rep = self.report.u64("exit_status");
        assert_eq!(rep, 0, "report exit_status\n{}", self.context());
        self.assert_eq(
            "protocol_errors",
            0,
            "the agent and the manager speak the same protocol",
        );
        self.assert_eq("refused", 0, "a target of `umm run` is never refused");
    }

    /// The target's OK line (panics with the full context if missing).
    pub fn ok_line(&self, name: &str) -> OkLine {
        OkLine::find(&self.stdout, name)
            .unwrap_or_else(|| panic!("no `OK {name}` line in stdout\n{}", self.context()))
    }

    pub fn counter(&self, path: &str) -> u64 {
        self.report.u64(path)
    }

    /// `report[path] >= min`, with the reason the threshold proves something.
    pub fn assert_ge(&self, path: &str, min: u64, why: &str) {
        let v = self.report.u64(path);
        assert!(
            v >= min,
            "report {path} = {v}, want >= {min}: {why}\n{}",
            self.context()
        );
    }

    pub fn assert_eq(&self, path: &str, want: u64, why: &str) {
        let v = self.report.u64(path);
        assert!(
            v == want,
            "report {path} = {v}, want {want}: {why}\n{}",
            self.context()
        );
    }

    /// All checks of the target were registered (K == N > 0).
    pub fn assert_all_registered(&self, ok: &OkLine) {
        let (k, n) = ok.registered();
        assert!(
            n > 0 && k == n,
            "{}: only {k} of {n} regions were registered with a userfaultfd (VmFlags `um`)\n{}",
            ok.name,
            self.context()
        );
    }
}

/// Build the `umm run` command line for `cmd`.
pub fn umm_run_command<S: AsRef<OsStr>>(
    dir: &TestDir,
    label: &str,
    cmd: &[S],
) -> (Command, PathBuf) {
    let report = dir.join(format!("{label}.report.json"));
    let _ = fs::remove_file(&report);
    let mut c = Command::new(umm_bin());
    c.arg("run")
        .arg("--report")
        .arg(&report)
        .arg("--agent")
        .arg(agent_lib());
    if std::env::var_os("UMM_TEST_TRACE").is_some() {
        c.arg("--trace")
            .arg(dir.join(format!("{label}.trace.jsonl")));
    }
    c.arg("--").args(cmd).current_dir(dir.path());
    (c, report)
}

/// `umm run --report <dir>/<label>.report.json -- CMD...` with a hard upper bound on run time.
/// Checks that nothing of the run's process group is left behind; parses the report.
pub fn umm_run<S: AsRef<OsStr>>(
    dir: &TestDir,
    label: &str,
    cmd: &[S],
    env: &[(&str, &str)],
    limit: Duration,
) -> UmmRun {
    let (mut c, report_path) = umm_run_command(dir, label, cmd);
    c.envs(env.iter().copied());
    let mut p = Proc::spawn(dir, label, c);
    let status = p.wait_bounded(limit);
    p.assert_group_gone();
    let report = Report::load(&report_path).unwrap_or_else(|e| {
        panic!(
            "umm run `{label}` ({}): {e}\n{}",
            describe(&status),
            p.context()
        )
    });
    UmmRun {
        label: label.to_string(),
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
        report,
    }
}

/// The result of a native run (no umm).
pub struct NativeRun {
    pub label: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl NativeRun {
    pub fn ok_line(&self, name: &str) -> OkLine {
        assert!(
            self.status.success(),
            "native `{}`: {}\n{}\n{}",
            self.label,
            describe(&self.status),
            tail(&self.stdout, 20),
            tail(&self.stderr, 20)
        );
        OkLine::find(&self.stdout, name).unwrap_or_else(|| {
            panic!(
                "native `{}`: no `OK {name}` line\n{}",
                self.label,
                tail(&self.stdout, 20)
            )
        })
    }
}

/// Run `cmd` natively (no umm), bounded like `umm_run`.
pub fn run_native<S: AsRef<OsStr>>(
    dir: &TestDir,
    label: &str,
    cmd: &[S],
    env: &[(&str, &str)],
    limit: Duration,
) -> NativeRun {
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .envs(env.iter().copied())
        .current_dir(dir.path());
    let mut p = Proc::spawn(dir, label, c);
    let status = p.wait_bounded(limit);
    p.assert_group_gone();
    NativeRun {
        label: label.to_string(),
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
    }
}

/// Write `text` to a file in the test dir.
pub fn write_file(dir: &TestDir, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let mut f = fs::File::create(&p).expect("create file");
    f.write_all(data).expect("write file");
    p
}

// ----- chaos helpers ------------------------------------------------------------------------

/// The state letter of every thread of `pid` (`/proc/PID/task/*/stat`): (tid, state). Empty if
/// the process is gone.
pub fn task_states(pid: i32) -> Vec<(i32, char)> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(text) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let state = text
            .rfind(')')
            .and_then(|c| text[c + 1..].split_whitespace().next())
            .and_then(|s| s.chars().next());
        if let Some(state) = state {
            v.push((tid, state));
        }
    }
    v
}

/// No thread of these processes is stuck in D state (uninterruptible sleep: a task blocked on
/// a uffd event nobody reads is D forever). A target that is being served is in D for a moment
/// at every layout event, so a task counts as stuck only if it is D in every sample over ~5 s
/// (50 samples 100 ms apart; stops early once no task has been D throughout). Gone processes
/// are fine.
pub fn assert_no_d_state(pids: &[i32], what: &str) {
    let d_now = || -> Vec<(i32, i32)> {
        pids.iter()
            .flat_map(|&pid| {
                task_states(pid)
                    .into_iter()
                    .filter(|t| t.1 == 'D')
                    .map(move |t| (pid, t.0))
            })
            .collect()
    };
    let mut stuck = d_now();
    for _ in 0..50 {
        if stuck.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = d_now();
        stuck.retain(|t| now.contains(t));
    }
    let detail: Vec<String> = stuck
        .iter()
        .map(|(pid, tid)| {
            let wchan =
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan")).unwrap_or_default();
            let comm =
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            format!("pid {pid} tid {tid} ({}) wchan {wchan}", comm.trim())
        })
        .collect();
    panic!("{what}: tasks stuck in D state for 5 s (blocked in the kernel, e.g. on an unread uffd event): {detail:#?}");
}

/// [`assert_no_d_state`] over every process of a process group.
pub fn assert_group_no_d_state(pgid: i32, what: &str) {
    let pids: Vec<i32> = group_members(pgid).into_iter().map(|m| m.0).collect();
    assert_no_d_state(&pids, what);
}

/// Resident set size of a process in KiB (`VmRSS`), 0 if unknown.
pub fn rss_kib(pid: i32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A count from the environment (`UMM_CHAOS_ITERATIONS`, `UMM_ATTACH_CYCLES`, ...): the soak
/// runs raise them; `make test` uses the defaults.
pub fn env_count(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v} is not a count")),
        Err(_) => default,
    }
}

/// Random points for chaos tests: xorshift64, seeded from `UMM_CHAOS_SEED` or the clock. The
/// seed is printed, so a failing run can be repeated.
pub struct Chaos {
    state: u64,
}

impl Chaos {
    pub fn new(what: &str) -> Chaos {
        let seed = match std::env::var("UMM_CHAOS_SEED") {
            Ok(v) => v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("UMM_CHAOS_SEED={v} is not a number")),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
        };
        eprintln!("{what}: chaos seed {seed} (repeat with UMM_CHAOS_SEED={seed})");
        Chaos { state: seed | 1 }
    }

    pub fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A `umm daemon` of a test (`RUST_LOG=info`, its own process group), with the fd count it
/// settled at after its start.
pub struct UmmDaemon {
    pub proc: Proc,
    pub sock: PathBuf,
    pub report: PathBuf,
    pub baseline_fds: usize,
    baseline_list: Vec<String>,
}

impl UmmDaemon {
    /// `umm daemon --socket <dir>/umm.sock --report <dir>/daemon.json`.
    pub fn start(dir: &TestDir) -> UmmDaemon {
        UmmDaemon::start_with(dir, "daemon", dir.join("umm.sock"), &[])
    }

    /// `umm daemon --socket SOCK --report <dir>/LABEL.json EXTRA...`, once it listens.
    pub fn start_with(dir: &TestDir, label: &str, sock: PathBuf, extra: &[&str]) -> UmmDaemon {
        let report = dir.join(format!("{label}.json"));
        let mut cmd = Command::new(umm_bin());
        cmd.arg("daemon")
            .arg("--socket")
            .arg(&sock)
            .arg("--report")
            .arg(&report)
            .args(extra)
            .env("RUST_LOG", "info")
            .current_dir(dir.path());
        let mut proc = Proc::spawn(dir, label, cmd);
        let up = poll_until(600, Duration::from_millis(50), || {
            sock.exists() || proc.try_wait().is_some()
        });
        assert!(
            up && proc.try_wait().is_none(),
            "umm daemon did not start listening\n{}",
            proc.context()
        );
        // the fd count once it is steady (initialisation may finish after the bind)
        let pid = proc.pid;
        let mut last = fd_count(pid);
        let mut same = 0;
        poll_until(200, Duration::from_millis(50), || {
            let n = fd_count(pid);
            same = if n == last { same + 1 } else { 0 };
            last = n;
            same >= 5
        });
        UmmDaemon {
            baseline_fds: last,
            baseline_list: fd_list(pid),
            proc,
            sock,
            report,
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid
    }

    /// A command that opts in to this daemon and must be managed (`UMM_REQUIRE=1`).
    pub fn served(&self, exe: impl AsRef<OsStr>, args: &[&str]) -> Command {
        let mut c = Command::new(exe);
        c.args(args)
            .env("LD_PRELOAD", agent_lib())
            .env("UMM_SOCKET", &self.sock)
            .env("UMM_REQUIRE", "1");
        c
    }

    pub fn assert_alive(&mut self, after: &str) {
        if let Some(st) = self.proc.try_wait() {
            panic!(
                "umm daemon died after {after} ({})\n{}",
                describe(&st),
                self.proc.context()
            );
        }
    }

    /// The daemon's fd count comes back to its baseline (bounded polling: closing is
    /// asynchronous, exits are noticed by pidfd or by a probe within a second).
    pub fn assert_fds_back(&mut self, after: &str) {
        self.assert_alive(after);
        let pid = self.proc.pid;
        let want = self.baseline_fds;
        if !poll_until(300, Duration::from_millis(50), || fd_count(pid) == want) {
            panic!(
                "after {after}: the daemon holds {} fds, baseline {want} (leaked or never closed)\n\
                 now: {:#?}\nbaseline: {:#?}\n{}",
                fd_count(pid),
                fd_list(pid),
                self.baseline_list,
                self.proc.context()
            );
        }
    }

    /// A raw connection to the daemon's socket, reads bounded by `read_timeout`.
    pub fn connect(&self, read_timeout: Duration) -> UnixStream {
        let s = UnixStream::connect(&self.sock)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.sock.display()));
        s.set_read_timeout(Some(read_timeout))
            .expect("set_read_timeout");
        s
    }

    /// SIGTERM; the daemon exits 0 and writes its report (shape checked).
    pub fn stop(self) -> Report {
        self.stop_with_log().0
    }

    /// As `stop`, with the daemon's standard error (its log).
    pub fn stop_with_log(mut self) -> (Report, String) {
        self.assert_alive("the test");
        self.proc.signal(Signal::SIGTERM);
        let st = self.proc.wait_bounded(Duration::from_secs(60));
        assert!(
            st.success(),
            "umm daemon on SIGTERM: {}\n{}",
            describe(&st),
            self.proc.context()
        );
        self.proc.assert_group_gone();
        let report =
            Report::load(&self.report).unwrap_or_else(|e| panic!("{e}\n{}", self.proc.context()));
        report.check_shape();
        (report, self.proc.stderr())
    }
}

/// Native reference run of C target `name`, then the same command under `umm run`: same
/// checksum, nothing registered natively, everything registered under umm, a handoff, and at
/// least `min_served` pages served. Returns (dir, native OK line, run, OK line).
pub fn native_and_managed(
    test: &str,
    name: &str,
    args: &[&str],
    limit: Duration,
) -> (TestDir, OkLine, UmmRun, OkLine) {
    require_root_and_uffd();
    let dir = TestDir::new(test);
    let exe = target(name);
    let mut cmd = vec![exe.to_string_lossy().into_owned()];
    cmd.extend(args.iter().map(|s| s.to_string()));
    let native = run_native(&dir, &format!("{name}-native"), &cmd, &[], limit).ok_line(name);
    let run = umm_run(&dir, name, &cmd, &[], limit);
    run.assert_success();
    let ok = run.ok_line(name);
    assert_eq!(
        ok.checksum(),
        native.checksum(),
        "{name}: checksum under umm differs from the native run\n{}",
        run.context()
    );
    assert_eq!(
        native.registered().0,
        0,
        "{name}: natively nothing can be registered"
    );
    run.assert_all_registered(&ok);
    run.assert_ge("handoffs", 1, "the target's agent handed its uffd over");
    run.assert_ge(
        "pages_served",
        ok.u64("min_served"),
        "pages first touched while missing in registered regions (min_served) can only have been \
         filled by the manager",
    );
    (dir, native, run, ok)
}

/// Everything a peer of the manager reads until the manager closes the connection; panics if
/// it is still open after the socket's read timeout (`UmmDaemon::connect`).
pub fn read_until_closed(mut s: UnixStream, what: &str) -> Vec<u8> {
    use std::io::{ErrorKind, Read};
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the manager kept the peer connected (got {got:02x?})")
            }
            Err(e) => panic!("{what}: read: {e}"),
        }
    }
}

/// Marks counted in each panel of an SVG of `umm report --svg` (parsed as XML by Python's
/// xml.etree: a malformed file fails here).
#[derive(Debug)]
pub struct SvgMarks {
    pub heat_cells: u64,
    pub fill_lines: u64,
    pub latency_bars: u64,
}

/// `umm report TRACE --svg OUT`, then parse OUT and count its data marks.
pub fn report_svg(dir: &TestDir, trace: &Path, out: &Path) -> SvgMarks {
    let mut c = Command::new(umm_bin());
    c.arg("report").arg(trace).arg("--svg").arg(out);
    let mut p = Proc::spawn(dir, "report-svg", c);
    let st = p.wait_bounded(Duration::from_secs(60));
    assert!(st.success(), "umm report --svg: {}", p.context());
    let script = r#"
import sys, xml.etree.ElementTree as ET
ns = '{http://www.w3.org/2000/svg}'
root = ET.parse(sys.argv[1]).getroot()
assert root.tag == ns + 'svg', root.tag
def count(gid, cls):
    g = [e for e in root.iter(ns + 'g') if e.get('id') == gid]
    assert len(g) == 1, 'panel ' + gid
    return sum(1 for e in g[0].iter() if e.get('class') == cls)
print(count('heatmap', 'cell'), count('fill', 'fill'), count('latency', 'bar'))
"#;
    let o = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(out)
        .output()
        .expect("run /usr/bin/python3");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{} is not a well-formed SVG with the three panels: {}",
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let n: Vec<u64> = text
        .split_whitespace()
        .map(|v| v.parse().expect("a count"))
        .collect();
    SvgMarks {
        heat_cells: n[0],
        fill_lines: n[1],
        latency_bars: n[2],
    }
}

// ----- umm attach ---------------------------------------------------------------------------

/// `umm attach PID EXTRA...` started (RUST_LOG=info), its report to be at `dir/LABEL.json`.
pub fn spawn_umm_attach(dir: &TestDir, label: &str, pid: i32, extra: &[&str]) -> (Proc, PathBuf) {
    let report = dir.join(format!("{label}.json"));
    let mut cmd = Command::new(umm_bin());
    cmd.arg("attach")
        .arg(pid.to_string())
        .args(extra)
        .arg("--report")
        .arg(&report)
        .env("RUST_LOG", "info");
    (Proc::spawn(dir, label, cmd), report)
}

/// Whether any mapping of `pid` is registered with a userfaultfd (the kernel's `um` flag in
/// its smaps).
pub fn any_uffd_registered(pid: i32) -> bool {
    umm::sys::proc::vm_flags(pid as u32)
        .is_ok_and(|f| f.values().any(|f| f.iter().any(|f| f == "um")))
}

/// Wait (bounded) until the running `umm attach` registered some memory of `pid`.
pub fn wait_attach_registered(pid: i32, umm: &mut Proc, what: &str) {
    let ended = poll_until(1000, Duration::from_millis(10), || {
        any_uffd_registered(pid) || umm.try_wait().is_some()
    });
    assert!(
        ended && any_uffd_registered(pid) && umm.try_wait().is_none(),
        "{what}\n{}",
        umm.context()
    );
}

/// The arguments of `umm restore --source URL --report REPORT OPTIONS -- richstate restore
/// SEED URL` (after the program name): richstate restoring its image from a network source.
pub fn richstate_restore_args(
    url: &str,
    report: &Path,
    options: &[std::ffi::OsString],
    seed: &str,
) -> Vec<std::ffi::OsString> {
    let mut argv: Vec<std::ffi::OsString> = vec![
        "restore".into(),
        "--source".into(),
        url.into(),
        "--report".into(),
        report.into(),
    ];
    argv.extend(options.iter().cloned());
    argv.extend([
        "--".into(),
        target("richstate").into(),
        "restore".into(),
        seed.into(),
        url.into(),
    ]);
    argv
}

/// Everything a stopped restore of richstate must show: the restorer tree killed after it
/// handed over (no OK line: it did not finish; no FAIL line: it never saw wrong or zero
/// memory), the reason in the report.
pub fn assert_restore_stopped(run: &UmmRun, reason: &str) {
    assert!(
        !run.status.success(),
        "umm restore succeeded\n{}",
        run.context()
    );
    assert!(
        !run.stdout.contains("OK richstate") && !run.stdout.contains("FAIL richstate"),
        "a restored process finished, or saw wrong memory\n{}",
        run.context()
    );
    assert!(
        run.stdout.contains("HANDED"),
        "the restorer never handed over\n{}",
        run.context()
    );
    run.assert_ge("restore.killed", 1, "the restored tree was stopped");
    let failed = run.report.str_or_empty("restore.failed");
    assert!(
        failed.contains(reason),
        "restore.failed = {failed:?}, want it to mention {reason:?}\n{}",
        run.context()
    );
}

/// A restore of the richstate image (`data_pages` of data) from a network source that ended
/// well: its OK line, at least 90 % of the data pages verified, nothing stopped, the verified
/// pages installed by umm, the whole image fetched `how` (the report's `restore.network`).
pub fn assert_network_restore_verified(run: &UmmRun, data_pages: u64, how: &str) -> OkLine {
    run.assert_success();
    let ok = run.ok_line("richstate");
    assert!(
        ok.u64("pages") * 10 >= data_pages * 9,
        "the restorer verified {} data pages of {data_pages}\n{}",
        ok.u64("pages"),
        run.context()
    );
    run.assert_eq("restore.killed", 0, "nothing had to be stopped");
    run.assert_ge("pages_served", ok.u64("pages"), "pages installed by umm");
    run.assert_ge("restore.network.bytes_fetched", data_pages * PAGE, how);
    ok
}

/// `richstate build SEED` snapshotted by `umm snapshot` into `img` (its four regions); the
/// builder is killed after. Returns the data pages the builder counted.
pub fn snapshot_richstate(dir: &TestDir, seed: &str, img: &Path) -> u64 {
    let limit = Duration::from_secs(120);
    let mut b = Command::new(target("richstate"));
    b.args(["build", seed]).current_dir(dir.path());
    let mut builder = Proc::spawn(dir, "build", b);
    let ready = poll_until(3000, Duration::from_millis(10), || {
        builder.stdout().contains("\nRANGES ") || builder.try_wait().is_some()
    });
    let out = builder.stdout();
    assert!(
        ready,
        "the builder never became ready\n{}",
        builder.context()
    );
    let field = |key: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix("READY "))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            })
            .unwrap_or_default()
            .to_string()
    };
    let data_pages: u64 = field("data_pages").parse().expect("data_pages");
    let ranges: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("RANGES "))
        .expect("RANGES")
        .split_whitespace()
        .collect();
    let mut s = Command::new(umm_bin());
    s.arg("snapshot")
        .arg(field("pid"))
        .arg("-o")
        .arg(img)
        .args(&ranges);
    let mut snap = Proc::spawn(dir, "snapshot", s);
    let st = snap.wait_bounded(limit);
    assert!(
        st.success(),
        "umm snapshot: {}\n{}",
        describe(&st),
        snap.context()
    );
    snap.assert_group_gone();
    builder.kill();
    data_pages
}
