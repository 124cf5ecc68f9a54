//! A real CRIU end to end against `umm lazy-pages` (issue 7): the memtest workload
//! (tests/fixtures/criu-4.2-memtest/memtest.c) is dumped with `criu dump`, then restored with
//! `criu restore --lazy-pages -d` while `umm lazy-pages` serves its memory, with forks and
//! MADV_DONTNEED during the fill.
//!
//! Remote mode: `criu dump --lazy-pages --port P` in one network and PID namespace keeps the
//! lazy memory and serves it; `criu restore --lazy-pages` with `umm lazy-pages --page-server`
//! in another network namespace (joined by a veth pair) fetches it over CRIU's page-server
//! protocol. The restored tree gets its own PID namespace from CRIU (the dump was of one),
//! so its pids do not clash with the dumped tasks, which live until the transfer ends.
//!
//! Needs CRIU >= 4.0 (`$UMM_CRIU`, else `criu` on PATH). The test is #[ignore] and run by
//! `make criu-e2e-test` (part of `make test`), which prints a SKIPPED line, counted as
//! skipped, never as passed, when there is no such CRIU.

mod common;
#[path = "fixtures/criu-4.2-memtest/memtest_log.rs"]
#[allow(dead_code)] // `started` and `verify_ms` serve the benchmark
mod memtest_log;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::netns::Veth;
use common::*;
use memtest_log::{filled_pid, parse_pass};
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

    /// SIGKILL them all; they must be gone (bounded wait).
    fn kill_and_wait(&self) {
        self.kill_all();
        let gone = poll_until(1000, Duration::from_millis(10), || self.all_gone());
        assert!(gone, "restored memtest processes survived SIGKILL");
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
    run_to_success(dir, label, cmd, log);
}

/// Run `cmd` (a criu command) to its end; its failure fails the test with the tail of `log`.
fn run_to_success(dir: &TestDir, label: &str, cmd: Command, log: &Path) {
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

/// The restored tasks `log_pids` (pids as memtest logs them) go on verifying in memtest's log
/// after byte `before_restore`: each logs passes with bad=0, and nothing logs a mismatch (main
/// area, scratch refill, zeros after DONTNEED) or a failed grandchild. Returns `ctx` with the
/// log's tail, for the caller's further checks.
fn assert_log_verifying(
    log_path: &Path,
    before_restore: usize,
    log_pids: &[i32],
    ctx: &str,
) -> String {
    let after = || fs::read_to_string(log_path).unwrap_or_default()[before_restore..].to_string();
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
            || log_pids
                .iter()
                .all(|&p| passes_of(&a, p) >= PASSES_AFTER_RESTORE)
    });
    let a = after();
    let ctx = format!(
        "--- memtest log after the restore ---\n{}\n{ctx}",
        tail(&a, 40)
    );
    assert!(verified, "the restored tasks stopped logging\n{ctx}");
    assert!(!a.contains("MISMATCH") && !a.contains("FAILED"), "{ctx}");
    for p in a.lines().filter_map(parse_pass) {
        assert_eq!(p.bad, 0, "pid {}\n{ctx}", p.pid);
    }
    ctx
}

/// umm's summary lines of the tasks `pids` (image pids): each says "restore complete", and
/// pages were served both by faults and by the fill. Returns the lines.
fn assert_served_by_faults_and_fill(umm_stderr: &str, pids: &[u32], ctx: &str) -> Vec<String> {
    let sums = summaries(umm_stderr);
    let lines: Vec<String> = pids
        .iter()
        .map(|pid| {
            let (line, _, _) = sums
                .get(pid)
                .unwrap_or_else(|| panic!("no summary line for pid {pid}\n{ctx}"));
            assert!(line.contains("restore complete"), "{line}\n{ctx}");
            line.clone()
        })
        .collect();
    let faulted: u64 = sums.values().map(|s| s.1).sum();
    let filled: u64 = sums.values().map(|s| s.2).sum();
    assert!(faulted > 0, "no page served by a fault\n{ctx}");
    assert!(filled > 0, "no page served by the fill\n{ctx}");
    lines
}

/// The report of a restore: at least the two tasks completed (forked grandchildren and a
/// zombie caught at dump time may add to it), none killed, the forks and the DONTNEEDs seen.
fn assert_restore_counters(rep: &Report) {
    assert!(rep.u64("restore.completed") >= 2, "{}", rep.pretty());
    assert_eq!(rep.u64("restore.killed"), 0, "{}", rep.pretty());
    assert!(rep.u64("events.fork") >= 1, "{}", rep.pretty());
    assert!(rep.u64("events.remove") >= 1, "{}", rep.pretty());
}

/// memtest, as the fixture was made, dumped to `DIR/img` with a plain `criu dump` (the tree
/// is killed) and reaped, its pids free again for the restore.
struct Dumped {
    img: PathBuf,
    log_path: PathBuf,
    parent: i32,
    child_pid: i32,
    workload: Workload,
    /// The log's length at the dump: what the restored tasks write comes after.
    before_restore: usize,
}

fn dump_memtest(dir: &TestDir, criu: &Path) -> Dumped {
    let memtest = build_memtest(dir);
    let img = dir.join("img");
    fs::create_dir(&img).unwrap();
    // Its own session (CRIU dumps a whole session), a 16 MiB parent forking grandchildren
    // (-f), a 4 MiB child, both dropping and refilling a scratch area (-r). setsid execs in
    // place: the spawned pid is memtest's.
    let log_path = dir.join("memtest.log");
    let mut child = Command::new("setsid")
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
    run_criu(
        dir,
        "criu-dump",
        criu,
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
        &img.join("dump.log"),
    );
    // Reap memtest. Its pids must be free again for the restore: not even a zombie of its
    // session (pgid = sid = its pid) may be left, or the kernel keeps the pid number in use.
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
    Dumped {
        img,
        log_path,
        parent,
        child_pid,
        workload,
        before_restore,
    }
}

impl Dumped {
    /// `criu restore --lazy-pages -d`: it exits once the tree runs; the tasks keep their pids.
    fn restore(&self, dir: &TestDir, criu: &Path) {
        run_criu(
            dir,
            "criu-restore",
            criu,
            &[
                "restore",
                "-D",
                self.img.to_str().unwrap(),
                "--lazy-pages",
                "-d",
                "-o",
                "restore.log",
                "-v4",
            ],
            &self.img.join("restore.log"),
        );
    }

    /// The restored processes go on verifying ([`assert_log_verifying`]) and still run.
    fn assert_verifying(&self, ctx: &str) {
        let pids = [self.parent, self.child_pid];
        let ctx = assert_log_verifying(&self.log_path, self.before_restore, &pids, ctx);
        for pid in pids {
            assert!(is_memtest(pid), "restored pid {pid} is not running\n{ctx}");
        }
    }

    fn kill(&self) {
        self.workload.kill_and_wait();
    }
}

#[test]
#[ignore = "needs CRIU >= 4.0: make criu-e2e-test"]
fn criu_restore_lazy_pages_served_by_umm_keeps_memtest_verifying() {
    require_root_and_uffd();
    let criu = criu_bin();
    let dir = TestDir::new("criu-e2e");
    let dumped = dump_memtest(&dir, &criu);
    let img = &dumped.img;
    let report = dir.join("report.json");
    let mut umm_cmd = Command::new(umm_bin());
    umm_cmd
        .args(["lazy-pages", "-D"])
        .arg(img)
        .arg("--report")
        .arg(&report)
        .args(["--fill-rate", &FILL_RATE.to_string()])
        // The second copier on (it pairs pieces only in quiet turns: this memtest faults
        // nearly all the time, so tests/restore.rs checks that it copies).
        .args(["--fill-threads", "2"])
        .env("RUST_LOG", "info");
    let mut umm = Proc::spawn(&dir, "umm", umm_cmd);
    let sock = img.join("lazy-pages.socket");
    let up = poll_until(1000, Duration::from_millis(10), || sock.exists());
    assert!(up, "no {}\n{}", sock.display(), umm.context());
    dumped.restore(&dir, &criu);
    umm.wait_success("umm lazy-pages failed", Duration::from_secs(120));
    dumped.assert_verifying(&umm.context());
    let ctx = umm.context();

    // umm served them: every task handed over completed, both by faults and by the fill.
    let pids = [dumped.parent as u32, dumped.child_pid as u32];
    for line in assert_served_by_faults_and_fill(&umm.stderr(), &pids, &ctx) {
        assert!(line.contains(" lazy pages"), "{line}\n{ctx}");
    }
    let rep = Report::load(&report).unwrap();
    let handoffs = rep.u64("restore.handoffs");
    assert!(handoffs >= 2, "{}", rep.pretty());
    // The two live tasks completed (their summaries say so); a zombie caught at dump time may
    // be handed over too (as -pid, nothing to fill), so completions are not compared with
    // handoffs.
    assert_restore_counters(&rep);
    dumped.kill();
}

/// The reverse: CRIU's own lazy-pages daemon, in remote mode, fetches the lazy pages of a
/// plain dump from `umm criu-page-server` (CRIU's page-server protocol served by umm).
#[test]
#[ignore = "needs CRIU >= 4.0: make criu-e2e-test"]
fn criu_lazy_pages_fetches_from_umm_criu_page_server() {
    require_root_and_uffd();
    let criu = criu_bin();
    let dir = TestDir::new("criu-e2e-umm-server");
    let dumped = dump_memtest(&dir, &criu);
    let img = &dumped.img;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mut server_cmd = Command::new(umm_bin());
    server_cmd
        .args(["criu-page-server", "-D"])
        .arg(img)
        .args(["--port", &port])
        .env("RUST_LOG", "info");
    let mut server = Proc::spawn(&dir, "umm-criu-page-server", server_cmd);
    let up = poll_until(1000, Duration::from_millis(10), || {
        server.stderr().contains("serving ")
    });
    assert!(
        up,
        "umm criu-page-server did not start\n{}",
        server.context()
    );
    let daemon_log = img.join("lazy-pages.log");
    let mut daemon_cmd = Command::new(&criu);
    daemon_cmd
        .args(["lazy-pages", "--page-server", "--address", "127.0.0.1"])
        .args(["--port", &port, "-D"])
        .arg(img)
        .args(["-o", "lazy-pages.log", "-v4"]);
    let mut daemon = Proc::spawn(&dir, "criu-lazy-pages", daemon_cmd);
    let sock = img.join("lazy-pages.socket");
    let up = poll_until(1000, Duration::from_millis(10), || sock.exists());
    assert!(up, "no {}\n{}", sock.display(), daemon.context());
    dumped.restore(&dir, &criu);
    let dst = daemon.wait_bounded(Duration::from_secs(120));
    let sst = server.wait_bounded(Duration::from_secs(30));
    let ctx = format!(
        "{}\n{}\n--- {} (tail) ---\n{}",
        server.context(),
        daemon.context(),
        daemon_log.display(),
        tail(&fs::read_to_string(&daemon_log).unwrap_or_default(), 30)
    );
    assert!(dst.success(), "criu lazy-pages: {}\n{ctx}", describe(&dst));
    // CRIU's daemon ended the conversation with PS_IOV_CLOSE.
    assert!(
        sst.success(),
        "umm criu-page-server: {}\n{ctx}",
        describe(&sst)
    );
    dumped.assert_verifying(&ctx);
    // Every lazy page the restored tasks have came through umm: the server served at least
    // the two memtest areas (16 + 4 MiB).
    let line = server
        .stderr()
        .lines()
        .find(|l| l.starts_with("umm: criu-page-server: ") && l.contains(" served in "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no summary line\n{ctx}"));
    let pages: u64 = line
        .split(" pages (")
        .next()
        .and_then(|h| h.split_whitespace().last()?.parse().ok())
        .unwrap_or(0);
    assert!(pages >= (16 + 4) * 256, "{line}\n{ctx}");
    dumped.kill();
}

const DUMP_ADDR: &str = "10.77.0.1";
/// The dump side's page-server port (in its own network namespace: nothing else there).
const PS_PORT: &str = "27027";
/// What CRIU's dump-side page server sets its tee pipe to (`PIPE_MAX_SIZE` pages, rounded up
/// by the kernel to a power of two: 4 MiB on x86_64).
const CRIU_TEE_PIPE: u64 = 4 << 20;

/// Two network namespaces joined by a veth pair (`DUMP_ADDR` on the dump side, its
/// "server"), removed on drop.
struct NetPair {
    veth: Veth,
}

impl NetPair {
    fn new() -> NetPair {
        let tag = format!("e2e{}", std::process::id() % 100_000);
        let veth = Veth::new(&tag, (&format!("{DUMP_ADDR}/30"), "10.77.0.2/30"))
            .unwrap_or_else(|e| panic!("cannot set up the namespaces: {e}"));
        NetPair { veth }
    }

    /// The dump side's namespace, and the restore side's.
    fn dump_ns(&self) -> &str {
        &self.veth.server_ns
    }

    fn restore_ns(&self) -> &str {
        &self.veth.client_ns
    }

    /// `program` run in network namespace `ns` (nsenter: no mount namespace, unlike `ip netns
    /// exec`, so CRIU sees the tasks' mounts as its own).
    fn exec(&self, ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Limit what the dump side sends to `rate` (tc tbf on its veth end).
    fn shape_dump_side(&self, rate: &str) {
        let out = Command::new("tc")
            .args([
                "-n",
                self.dump_ns(),
                "qdisc",
                "add",
                "dev",
                &self.veth.devs.0,
            ])
            .args([
                "root", "tbf", "rate", rate, "burst", "32kb", "latency", "10s",
            ])
            .output()
            .expect("cannot run tc");
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `fs.pipe-max-size` raised to at least `CRIU_TEE_PIPE` for the test, restored on drop.
/// CRIU's dump-side page server sizes its tee pipe with F_SETPIPE_SZ and ignores a failure;
/// without CAP_SYS_RESOURCE (this VM's root lacks it) and with the default 1 MiB limit, every
/// page request then fails (`splice: -1: Bad file descriptor`), CRIU's own daemon included.
struct PipeMaxSize {
    old: Option<u64>,
}

const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

impl PipeMaxSize {
    fn at_least(bytes: u64) -> PipeMaxSize {
        let now: u64 = fs::read_to_string(PIPE_MAX_SIZE)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("cannot read {PIPE_MAX_SIZE}"));
        if now >= bytes {
            return PipeMaxSize { old: None };
        }
        fs::write(PIPE_MAX_SIZE, bytes.to_string())
            .unwrap_or_else(|e| panic!("cannot raise {PIPE_MAX_SIZE} to {bytes}: {e}"));
        PipeMaxSize { old: Some(now) }
    }
}

impl Drop for PipeMaxSize {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            let _ = fs::write(PIPE_MAX_SIZE, old.to_string());
        }
    }
}

/// The children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A lazy dump in progress: the dump side serving the memory of memtest (init of its own PID
/// namespace, in the dump network namespace), and a copy of the metadata images it wrote.
/// Everything is killed by pid on drop (the NetPair last: fields drop in order).
struct LazyDump {
    workload: Workload,
    /// `unshare --pid --fork`, memtest's parent outside its namespace.
    _unshare: Proc,
    dump: Proc,
    /// Where memtest logs (its stdout; the restored tasks write to the same file).
    log_path: PathBuf,
    /// The restore side's images: the dump's metadata, copied.
    images: PathBuf,
    net: NetPair,
    _pipe: PipeMaxSize,
}

impl LazyDump {
    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn start(dir: &TestDir, criu: &Path) -> LazyDump {
        let pipe = PipeMaxSize::at_least(CRIU_TEE_PIPE);
        let net = NetPair::new();
        let memtest = build_memtest(dir);
        // memtest as init of a new PID namespace, its own session (CRIU dumps the whole
        // namespace then, and restores it as a new one): 16 MiB parent forking grandchildren,
        // 4 MiB child, both dropping and refilling a scratch area.
        let mut cmd = net.exec(net.dump_ns(), Path::new("unshare"));
        cmd.args(["--pid", "--fork", "setsid"])
            .arg(&memtest)
            .args(["-s", "16", "-c", "4", "-f", "-r", "-i", "200"]);
        let unshare = Proc::spawn(dir, "memtest", cmd);
        let mut workload = Workload { pids: Vec::new() };
        let mut root = None;
        poll_until(3000, Duration::from_millis(10), || {
            root = children(unshare.pid).first().copied();
            root.is_some_and(is_memtest)
        });
        let root = root.unwrap_or_else(|| panic!("memtest did not start\n{}", unshare.context()));
        workload.pids.push(root);
        let log_path = dir.join("memtest.stdout");
        let log = || fs::read_to_string(&log_path).unwrap_or_default();
        let running = poll_until(3000, Duration::from_millis(10), || {
            let l = log();
            l.contains(" parent pid=1 ") && l.contains(" child pid=2 ") && l.contains(" pass=2 ")
        });
        assert!(running, "memtest did not start:\n{}", log());

        let img = dir.join("img");
        fs::create_dir(&img).unwrap();
        let mut cmd = net.exec(net.dump_ns(), criu);
        cmd.args(["dump", "-t", &root.to_string(), "-D"])
            .arg(&img)
            .args(["--lazy-pages", "--address", DUMP_ADDR, "--port", PS_PORT])
            .args(["-o", "dump.log", "-v4"]);
        let mut dump = Proc::spawn(dir, "criu-dump", cmd);
        let dump_log = img.join("dump.log");
        // CRIU says "status-ready" once its page server listens (criu/util.c run_tcp_server).
        let serving = poll_until(6000, Duration::from_millis(10), || {
            dump.try_wait().is_some()
                || fs::read_to_string(&dump_log)
                    .unwrap_or_default()
                    .contains("Running status-ready scripts")
        });
        assert!(
            serving && dump.try_wait().is_none(),
            "criu dump --lazy-pages is not serving\n{}\n--- dump.log ---\n{}",
            dump.context(),
            tail(&fs::read_to_string(&dump_log).unwrap_or_default(), 40)
        );
        // The restore side gets the metadata only (the lazy pages are not in it).
        let images = dir.join("img-restore");
        fs::create_dir(&images).unwrap();
        for e in fs::read_dir(&img).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "dump.log" {
                fs::copy(e.path(), images.join(e.file_name())).unwrap();
            }
        }
        LazyDump {
            workload,
            _unshare: unshare,
            dump,
            log_path,
            images,
            net,
            _pipe: pipe,
        }
    }

    fn dump_log(&self) -> String {
        let path = self.dump_dir().join("dump.log");
        tail(&fs::read_to_string(path).unwrap_or_default(), 30)
    }

    fn dump_dir(&self) -> PathBuf {
        self.images.with_file_name("img")
    }

    /// `umm lazy-pages --page-server` on the restore side, listening for criu restore.
    fn start_umm(&self, dir: &TestDir, extra: &[&str]) -> Proc {
        let mut cmd = self.net.exec(self.net.restore_ns(), &umm_bin());
        cmd.args(["lazy-pages", "--page-server", "--address", DUMP_ADDR])
            .args(["--port", PS_PORT, "-D"])
            .arg(&self.images)
            .args(extra)
            .env("RUST_LOG", "info");
        let mut umm = Proc::spawn(dir, "umm", cmd);
        let sock = self.images.join("lazy-pages.socket");
        let up = poll_until(1000, Duration::from_millis(10), || {
            sock.exists() || umm.try_wait().is_some()
        });
        assert!(
            up && umm.try_wait().is_none(),
            "no {}\n{}",
            sock.display(),
            umm.context()
        );
        umm
    }

    /// `criu restore --lazy-pages -d` on the restore side; Some(the restored root's pid here)
    /// if it succeeded.
    fn restore(&mut self, dir: &TestDir, criu: &Path) -> (Option<i32>, Proc) {
        let pidfile = dir.join("restored.pid");
        let mut cmd = self.net.exec(self.net.restore_ns(), criu);
        cmd.args(["restore", "-D"])
            .arg(&self.images)
            .args([
                "--lazy-pages",
                "-d",
                "-o",
                "restore.log",
                "-v4",
                "--pidfile",
            ])
            .arg(&pidfile);
        let mut p = Proc::spawn(dir, "criu-restore", cmd);
        let st = p.wait_bounded(Duration::from_secs(120));
        let root = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(r) = root {
            // Init of the restored namespace: killing it kills the restored tree.
            self.workload.pids.push(r);
        }
        (root.filter(|_| st.success()), p)
    }

    fn restore_log(&self) -> String {
        tail(
            &fs::read_to_string(self.images.join("restore.log")).unwrap_or_default(),
            30,
        )
    }
}

/// The page-server counters of umm's `--report`: (requests, short replies, pages, bytes).
fn page_server_counters(rep: &Report) -> (u64, u64, u64, u64) {
    (
        rep.u64("restore.page_server.requests"),
        rep.u64("restore.page_server.short_replies"),
        rep.u64("restore.page_server.pages_fetched"),
        rep.u64("restore.page_server.bytes_fetched"),
    )
}

/// The lazy pages in umm's summary line of a task (`... : N lazy pages, ...`).
fn lazy_pages_of(line: &str) -> u64 {
    line.split(" lazy pages")
        .next()
        .and_then(|h| h.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no lazy page count in {line}"))
}

#[test]
#[ignore = "needs CRIU >= 4.0: make criu-e2e-test"]
fn criu_lazy_dump_in_another_netns_serves_umm_lazy_pages_remote() {
    require_root_and_uffd();
    let criu = criu_bin();
    let dir = TestDir::new("criu-e2e-remote");
    let mut lazy = LazyDump::start(&dir, &criu);
    let before_restore = lazy.log().len();

    let report = dir.join("report.json");
    let rate = FILL_RATE.to_string();
    let mut umm = lazy.start_umm(
        &dir,
        &["--report", report.to_str().unwrap(), "--fill-rate", &rate],
    );
    let (root, restore) = lazy.restore(&dir, &criu);
    assert!(
        root.is_some(),
        "criu restore failed\n{}\n--- restore.log ---\n{}\n{}",
        restore.context(),
        lazy.restore_log(),
        umm.context()
    );
    let ust = umm.wait_bounded(Duration::from_secs(120));
    assert!(
        ust.success(),
        "umm lazy-pages failed: {}\n{}\n--- dump.log ---\n{}",
        describe(&ust),
        umm.context(),
        lazy.dump_log()
    );
    // umm said goodbye (PS_IOV_CLOSE): the dump side finished its dump.
    let dst = lazy.dump.wait_bounded(Duration::from_secs(60));
    assert!(
        dst.success(),
        "criu dump failed: {}\n--- dump.log ---\n{}",
        describe(&dst),
        lazy.dump_log()
    );

    // The restored tasks (pids 1 and 2 in their new namespace) go on verifying every word,
    // dropping and refilling, forking: passes with bad=0 and nothing else. The dumped tasks
    // were frozen from the dump on, so what follows is the restored tasks' log.
    let ctx = assert_log_verifying(&lazy.log_path, before_restore, &[1, 2], &umm.context());
    let root = root.unwrap();
    assert!(
        is_memtest(root),
        "restored root {root} is not running\n{ctx}"
    );

    // umm served them, by faults and by the fill, from pages it fetched over TCP: the lazy
    // pages of both tasks, each once. All of them in every run here (the fetch runs ahead of
    // the rate-bound fill); only pages a task dropped before they were asked may be left out,
    // at most the two 4 MiB scratch areas memtest drops (-r).
    let lazy_pages: u64 = assert_served_by_faults_and_fill(&umm.stderr(), &[1, 2], &ctx)
        .iter()
        .map(|line| lazy_pages_of(line))
        .sum();
    let rep = Report::load(&report).unwrap();
    let (requests, _short, pages, bytes) = page_server_counters(&rep);
    assert!(lazy_pages > 1000, "{lazy_pages} lazy pages?\n{ctx}");
    let scratch_pages = 2 * (4 << 20) / 4096;
    assert!(
        pages <= lazy_pages && pages + scratch_pages >= lazy_pages,
        "{pages} pages fetched, {lazy_pages} lazy\n{}\n{ctx}",
        rep.pretty()
    );
    assert_eq!(bytes, pages * 4096, "{}", rep.pretty());
    assert!(requests > 0 && requests <= pages, "{}", rep.pretty());
    assert_restore_counters(&rep);
    let dump_log = fs::read_to_string(lazy.dump_dir().join("dump.log")).unwrap_or_default();
    assert!(
        dump_log.contains("Lazy pages transfer finished successfully"),
        "{}",
        lazy.dump_log()
    );

    lazy.workload.kill_and_wait();
}

#[test]
#[ignore = "needs CRIU >= 4.0: make criu-e2e-test"]
fn losing_the_dump_side_mid_restore_stops_the_restored_tree() {
    require_root_and_uffd();
    let criu = criu_bin();
    let dir = TestDir::new("criu-e2e-remote-lost");
    let mut lazy = LazyDump::start(&dir, &criu);
    // 4 Mbit/s: the ~28 MiB of lazy memory would take about a minute, so the dump side is
    // killed long before the last page left it.
    lazy.net.shape_dump_side("4mbit");
    let before_restore = lazy.log().len();
    let mut umm = lazy.start_umm(&dir, &[]);
    let (root, _restore) = lazy.restore(&dir, &criu);
    let root = root.unwrap_or_else(|| {
        panic!(
            "criu restore failed\n--- restore.log ---\n{}\n{}",
            lazy.restore_log(),
            umm.context()
        )
    });
    lazy.dump.kill();

    // Fail-stop: umm stops, says why, and the restored tree is killed; no restored task ever
    // verified zeros where its data was (a bad=N line or a MISMATCH).
    let ust = umm.wait_bounded(Duration::from_secs(120));
    let ctx = format!(
        "--- memtest log after the restore ---\n{}\n{}",
        tail(&lazy.log()[before_restore..], 40),
        umm.context()
    );
    assert!(!ust.success(), "umm lazy-pages succeeded\n{ctx}");
    let err = umm.stderr();
    assert!(
        err.contains("STOPPED: page server") && err.contains(DUMP_ADDR),
        "{ctx}"
    );
    let rep_killed = err.contains("restore stopped");
    assert!(rep_killed, "no task summary says stopped\n{ctx}");
    let gone = poll_until(1000, Duration::from_millis(10), || !is_memtest(root));
    assert!(gone, "the restored root {root} still runs\n{ctx}");
    let a = lazy.log()[before_restore..].to_string();
    assert!(!a.contains("MISMATCH"), "{ctx}");
    for p in a.lines().filter_map(parse_pass) {
        assert_eq!(p.bad, 0, "pid {} verified bad data\n{ctx}", p.pid);
    }
}
