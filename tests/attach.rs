//! `umm attach PID` / `umm detach PID`: a running program, started without the agent, is
//! managed and let go again, any number of times, without noticing anything but the manager's
//! faults: its memory always verifies, no signal is lost, a thread blocked in `read` gets its
//! bytes, and a statically linked program works too. Refusals are one clear line and exit 1.

mod common;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The attachee's shared state file (tests/targets/attachee.c).
const RECEIVED: u64 = 0;
const ROUNDS: u64 = 1;
const REGION: u64 = 2;
const STOP: u64 = 3;
const READING: u64 = 4;

struct Attachee {
    proc: Proc,
    state: PathBuf,
}

impl Attachee {
    fn start(dir: &TestDir, label: &str, exe: &Path, reader: bool) -> Attachee {
        let state = dir.join(format!("{label}.state"));
        Attachee::start_in(dir, label, &state, Command::new(exe), reader)
    }

    /// An attachee running as uid/gid 65534, its state file in a directory of its own.
    fn start_unprivileged(dir: &TestDir, label: &str) -> Attachee {
        let home = dir.join(label);
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
        let mut cmd = Command::new(target("attachee"));
        cmd.uid(65534).gid(65534);
        Attachee::start_in(dir, label, &home.join("state"), cmd, false)
    }

    fn start_in(
        dir: &TestDir,
        label: &str,
        state: &Path,
        mut cmd: Command,
        reader: bool,
    ) -> Attachee {
        let state = state.to_path_buf();
        cmd.arg(&state);
        if reader {
            cmd.arg("reader");
        }
        let proc = Proc::spawn(dir, label, cmd);
        let a = Attachee { proc, state };
        let started = poll_until(1000, Duration::from_millis(10), || {
            a.word(ROUNDS) > 2 && (!reader || a.word(READING) == 1)
        });
        assert!(started, "attachee did not start\n{}", a.proc.context());
        a
    }

    fn pid(&self) -> i32 {
        self.proc.pid
    }

    fn word(&self, i: u64) -> u64 {
        word(&self.state, i)
    }

    fn set_stop(&self) {
        set_stop(&self.state);
    }

    fn wait_rounds(&self, n: u64, what: &str) {
        wait_rounds(&self.state, n, what);
    }

    fn registered(&self) -> bool {
        registered(self.pid(), &self.state)
    }

    /// Stop it (the stop flag), and return its OK line.
    fn finish(mut self) -> OkLine {
        self.set_stop();
        self.proc.wait_success("attachee", Duration::from_secs(60));
        OkLine::find(&self.proc.stdout(), "attachee")
            .unwrap_or_else(|| panic!("no OK line\n{}", self.proc.context()))
    }
}

/// Word `i` of an attachee's state file (0 until it exists).
fn word(state: &Path, i: u64) -> u64 {
    let Ok(f) = std::fs::File::open(state) else {
        return 0;
    };
    let mut b = [0u8; 8];
    match f.read_at(&mut b, i * 8) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

/// Set the stop word of a state file: the program ends after its round.
fn set_stop(state: &Path) {
    let f = OpenOptions::new().write(true).open(state).unwrap();
    f.write_all_at(&1u64.to_ne_bytes(), STOP * 8).unwrap();
}

/// Wait (bounded) for `n` more completed rounds: the program makes progress.
fn wait_rounds(state: &Path, n: u64, what: &str) {
    let from = word(state, ROUNDS);
    let ok = poll_until(2000, Duration::from_millis(5), || {
        word(state, ROUNDS) >= from + n
    });
    assert!(ok, "{what}: the attachee made no progress");
}

/// Whether the attachee's churned region is registered with a userfaultfd (the kernel's `um`
/// flag in its smaps).
fn registered(pid: i32, state: &Path) -> bool {
    let flags = umm::sys::proc::vm_flags(pid as u32).unwrap_or_default();
    flags
        .get(&word(state, REGION))
        .is_some_and(|f| f.iter().any(|f| f == "um"))
}

/// Sends SIGUSR1 one at a time, each only once the previous one was counted (standard signals
/// sent while one is pending merge, which would be no fault of umm's).
struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Sender {
    fn start(pid: i32, state: PathBuf) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s2, n2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let received = || {
                let mut b = [0u8; 8];
                std::fs::File::open(&state)
                    .and_then(|f| f.read_exact_at(&mut b, RECEIVED * 8))
                    .map(|_| u64::from_ne_bytes(b))
                    .unwrap_or(0)
            };
            while !s2.load(Ordering::SeqCst) {
                kill(Pid::from_raw(pid), Signal::SIGUSR1).map_err(|e| e.to_string())?;
                let n = n2.fetch_add(1, Ordering::SeqCst) + 1;
                // Bounded: a signal not counted in 20 s is lost.
                if !poll_until(40_000, Duration::from_micros(500), || received() >= n) {
                    return Err(format!(
                        "signal {n} never arrived (received {})",
                        received()
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        });
        Sender {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// Stop sending; the number sent.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let r = self.thread.take().unwrap().join().expect("sender thread");
        if let Err(e) = r {
            panic!("signal sender: {e}");
        }
        self.sent.load(Ordering::SeqCst)
    }
}

/// One control request, the whole answer.
fn ask(ctl: &Path, request: &str) -> String {
    let mut s = UnixStream::connect(ctl).unwrap_or_else(|e| panic!("{}: {e}", ctl.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `attach PID` through a control socket must answer ok (`what` and `context` explain a failure).
fn ask_attach(ctl: &Path, pid: i32, what: &str, context: impl Fn() -> String) {
    let answer = ask(ctl, &format!("attach {pid}"));
    assert!(
        answer.starts_with(&format!("ok attached pid {pid}")),
        "{what}: {answer}\n{}",
        context()
    );
}

/// `detach PID` through a control socket must answer ok.
fn ask_detach(ctl: &Path, pid: i32, what: &str) {
    let answer = ask(ctl, &format!("detach {pid}"));
    assert!(
        answer.starts_with(&format!("ok detached pid {pid}")),
        "{what}: {answer}"
    );
}

/// The attach's report: it served faults, at least `min_pages` pages.
fn assert_served(report: &Path, min_pages: u64) -> Report {
    let r = Report::load(report).unwrap();
    assert!(r.u64("faults") > 0, "{}", r.pretty());
    assert!(r.u64("pages_served") >= min_pages, "{}", r.pretty());
    r
}

fn wait_registered(a: &Attachee, umm: &mut Proc) {
    let ok = poll_until(2000, Duration::from_millis(5), || {
        a.registered() || umm.try_wait().is_some()
    });
    assert!(
        ok && a.registered(),
        "the attachee's region never got registered\n{}\n{}",
        umm.context(),
        a.proc.context()
    );
}

#[test]
fn attach_detach_100_times_through_the_daemon_loses_no_memory_or_signal() {
    require_root_and_uffd();
    let dir = TestDir::new("attach_100");
    let mut d = UmmDaemon::start(&dir);
    let ctl = dir.join("umm.sock.ctl");
    let a = Attachee::start(&dir, "attachee", &target("attachee"), false);
    let sender = Sender::start(a.pid(), a.state.clone());
    let pid = a.pid();
    for i in 0..100 {
        ask_attach(&ctl, pid, &format!("cycle {i}"), || d.proc.context());
        assert!(a.registered(), "cycle {i}: attached but not registered");
        if i == 0 {
            // Twice is refused, clearly; the first attach stays.
            let again = ask(&ctl, &format!("attach {pid}"));
            assert!(
                again.starts_with("error: ") && again.contains("already"),
                "{again}"
            );
            assert!(a.registered());
        }
        // At least one whole round (MADV_DONTNEED, zero check, fill, verify) while attached.
        a.wait_rounds(2, &format!("cycle {i}, attached"));
        ask_detach(&ctl, pid, &format!("cycle {i}"));
        assert!(!a.registered(), "cycle {i}: detached but still registered");
        a.wait_rounds(1, &format!("cycle {i}, detached"));
    }
    let again = ask(&ctl, &format!("detach {pid}"));
    assert!(
        again.starts_with("error: ") && again.contains("not managed"),
        "{again}"
    );
    let sent = sender.finish();
    d.assert_fds_back("100 attach/detach cycles");
    let ok = a.finish();
    assert!(sent > 0, "no signal was sent");
    assert_eq!(ok.u64("usr1"), sent, "signals sent and received differ");
    let report = d.stop();
    assert_eq!(report.u64("processes"), 100, "{}", report.pretty());
    // Every cycle ran a round on registered memory: its zero check faulted after a REMOVE.
    assert!(report.u64("faults") >= 100, "{}", report.pretty());
    assert!(
        report.u64("pages_served") >= 100 * 64,
        "{}",
        report.pretty()
    );
    assert!(report.u64("events.remove") >= 100, "{}", report.pretty());
}

/// `umm run --control` answers `attach PID` too. Its loop reaps its children on SIGCHLD; a
/// wait for any child of the whole process took the ptrace stops of the attach helper's
/// tracee, and every such attach failed ("did not stop within 3.0 s").
#[test]
fn attach_through_the_control_socket_of_umm_run() {
    require_root_and_uffd();
    let dir = TestDir::new("attach_run_ctl");
    let ctl = dir.join("run.ctl");
    let report = dir.join("run.json");
    let mut cmd = Command::new(umm_bin());
    cmd.arg("run")
        .arg("--control")
        .arg(&ctl)
        .arg("--report")
        .arg(&report)
        .args(["--", "sleep", "600"])
        .env("RUST_LOG", "info");
    let mut run = Proc::spawn(&dir, "run", cmd);
    let up = poll_until(600, Duration::from_millis(50), || {
        ctl.exists() || run.try_wait().is_some()
    });
    assert!(up && run.try_wait().is_none(), "{}", run.context());
    let a = Attachee::start(&dir, "attachee", &target("attachee"), false);
    let pid = a.pid();
    ask_attach(&ctl, pid, "umm run", || run.context());
    assert!(a.registered(), "attached but not registered");
    a.wait_rounds(2, "attached through umm run");
    ask_detach(&ctl, pid, "umm run");
    assert!(!a.registered(), "detached but still registered");
    a.wait_rounds(1, "detached");
    a.finish();
    // SIGTERM goes on to the command; umm run ends with it and writes its report.
    run.signal(Signal::SIGTERM);
    run.wait_bounded(Duration::from_secs(60));
    assert!(report.exists(), "no report\n{}", run.context());
    assert_served(&report, 64);
}

#[test]
fn foreground_attach_of_a_static_binary_detaches_on_sigterm() {
    require_root_and_uffd();
    let dir = TestDir::new("attach_static");
    let exe = dir.join("attachee-static");
    let src = target_source("attachee.c");
    let out = Command::new("cc")
        .args(["-static", "-O2", "-pthread", "-Wall", "-I"])
        .arg(src.parent().unwrap())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc -static failed (libc6-dev's libc.a?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = Attachee::start(&dir, "attachee", &exe, false);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", a.pid())).unwrap();
    assert!(!maps.contains("ld-linux"), "not a static binary:\n{maps}");
    let (mut umm, report) = spawn_umm_attach(&dir, "attach", a.pid(), &[]);
    wait_registered(&a, &mut umm);
    a.wait_rounds(3, "attached");
    end_attach(&mut umm);
    assert!(!a.registered(), "still registered after the detach");
    assert!(
        umm.stderr().contains("umm: 1 processes"),
        "{}",
        umm.context()
    );
    a.wait_rounds(3, "detached");
    a.finish();
    assert_served(&report, 64);
}

#[test]
fn a_thread_blocked_in_read_gets_its_bytes_and_attach_ends_with_the_process() {
    require_root_and_uffd();
    let dir = TestDir::new("attach_read");
    let state = dir.join("reader.state");
    let stdout = std::fs::File::create(dir.join("reader.stdout")).unwrap();
    let mut child = Command::new(target("attachee"))
        .arg(&state)
        .arg("reader")
        .stdin(Stdio::piped())
        .stdout(stdout)
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let reading = poll_until(2000, Duration::from_millis(5), || {
        word(&state, READING) == 1
            && std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                .is_ok_and(|w| w.contains("pipe_read"))
    });
    assert!(reading, "the main thread never blocked in read(2)");
    let registered = || registered(pid, &state);
    // First attach: interrupts the read, detached by SIGTERM.
    let (mut umm1, _) = spawn_umm_attach(&dir, "attach1", pid, &[]);
    assert!(
        poll_until(2000, Duration::from_millis(5), registered),
        "{}",
        umm1.context()
    );
    wait_rounds(&state, 4, "first attach");
    end_attach(&mut umm1);
    assert!(!registered());
    // Second attach: the bytes arrive while attached; the process exits and the attach ends
    // by itself.
    let (mut umm2, report) = spawn_umm_attach(&dir, "attach2", pid, &[]);
    assert!(
        poll_until(2000, Duration::from_millis(5), registered),
        "{}",
        umm2.context()
    );
    wait_rounds(&state, 4, "second attach");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"0123456789abcdef")
        .unwrap();
    umm2.wait_success("umm attach", Duration::from_secs(60));
    let status = child.wait().unwrap();
    let out = std::fs::read_to_string(dir.join("reader.stdout")).unwrap();
    assert!(status.success(), "attachee: {status:?}\n{out}");
    let ok = OkLine::find(&out, "attachee").unwrap_or_else(|| panic!("no OK line: {out}"));
    assert_eq!(ok.str("input"), "0123456789abcdef");
    assert_served(&report, 64);
}

fn refused(dir: &TestDir, label: &str, mut cmd: Command) -> String {
    let mut p = Proc::spawn(dir, label, {
        cmd.env("RUST_LOG", "warn");
        cmd
    });
    let st = p.wait_bounded(Duration::from_secs(30));
    let err = p.stderr();
    assert_eq!(
        st.code(),
        Some(1),
        "{label}: {}\n{}",
        describe(&st),
        p.context()
    );
    assert_eq!(err.lines().count(), 1, "{label}: not one line:\n{err}");
    assert!(err.starts_with("umm: "), "{label}: {err}");
    err
}

fn attach_cmd(pid: i32) -> Command {
    let mut c = Command::new(umm_bin());
    c.arg("attach").arg(pid.to_string());
    c
}

#[test]
fn refusals_are_one_clear_line() {
    require_root_and_uffd();
    let dir = TestDir::new("attach_refusals");
    // No such process.
    let mut missing = 4_194_000;
    while Path::new(&format!("/proc/{missing}")).exists() {
        missing += 1;
    }
    let e = refused(&dir, "missing", attach_cmd(missing));
    assert!(e.contains(&format!("no process with pid {missing}")), "{e}");
    // A kernel thread (kthreadd).
    let e = refused(&dir, "kthread", attach_cmd(2));
    assert!(e.contains("kernel thread"), "{e}");
    let a = Attachee::start(&dir, "attachee", &target("attachee"), false);
    // Another tracer holds it.
    {
        let frozen =
            umm::sys::ptrace::Frozen::freeze(a.pid() as u32, Duration::from_secs(10)).unwrap();
        let e = refused(&dir, "traced", attach_cmd(a.pid()));
        assert!(e.contains("already traced by pid"), "{e}");
        frozen.resume().unwrap();
    }
    // An unprivileged caller.
    let mut cmd = attach_cmd(a.pid());
    cmd.uid(65534).gid(65534);
    let e = refused(&dir, "unprivileged", cmd);
    assert!(
        e.contains(&a.pid().to_string()) || e.contains("uid 65534"),
        "{e}"
    );
    // A process under seccomp: an injected call could kill it.
    let mut sc = Proc::spawn(&dir, "seccomped", Command::new(target("seccomped")));
    let ready = poll_until(500, Duration::from_millis(10), || {
        sc.stdout().contains("READY")
    });
    assert!(ready, "{}", sc.context());
    let e = refused(&dir, "seccomp", attach_cmd(sc.pid));
    assert!(e.contains("seccomp"), "{e}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", sc.pid)).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    sc.kill();
    // None of this touched it.
    let status = std::fs::read_to_string(format!("/proc/{}/status", a.pid())).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    assert!(!a.registered());
    a.wait_rounds(2, "after the refusals");
    a.finish();
}

/// The fds of a process that would betray a leftover of the grant path: the device, a uffd,
/// a socket.
fn grant_leftovers(pid: i32) -> Vec<String> {
    fd_list(pid)
        .into_iter()
        .filter(|f| f.contains("userfaultfd") || f.contains("socket:"))
        .collect()
}

#[test]
fn an_unprivileged_process_is_attached_with_the_grant_and_refused_without() {
    require_root_and_uffd();
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap();
    assert_eq!(
        sysctl.trim(),
        "0",
        "this test needs vm.unprivileged_userfaultfd=0 (else uid 65534 needs no grant)"
    );
    let dir = TestDir::new("attach_unprivileged");
    let a = Attachee::start_unprivileged(&dir, "nobody");
    let pid = a.pid();
    let fds_before = fd_list(pid);
    // Without the grant: one line, naming the way out; nothing left behind in it.
    let e = refused(&dir, "no-grant", attach_cmd(pid));
    assert!(
        e.contains(&format!("pid {pid}")) && e.contains("EPERM") && e.contains("--grant-device"),
        "{e}"
    );
    assert!(!a.registered());
    assert_eq!(
        fd_list(pid),
        fds_before,
        "the refused attach left fds in it"
    );
    // With the grant: served, and it keeps neither the device nor a socket nor a uffd.
    let (mut umm, report) = spawn_umm_attach(&dir, "grant", pid, &["--grant-device"]);
    wait_registered(&a, &mut umm);
    assert!(
        grant_leftovers(pid).is_empty(),
        "fds left in the attached process: {:?}\n{}",
        fd_list(pid),
        umm.context()
    );
    assert_eq!(fd_list(pid), fds_before, "the attach changed its fds");
    a.wait_rounds(3, "attached with the grant");
    end_attach(&mut umm);
    assert!(
        umm.stderr()
            .contains("made one from a granted /dev/userfaultfd"),
        "{}",
        umm.context()
    );
    assert!(!a.registered(), "still registered after the detach");
    let r = assert_served(&report, 64);
    assert_eq!(r.u64("processes"), 1, "{}", r.pretty());
    // The daemon's --grant-device applies to its attach requests too.
    let mut d = UmmDaemon::start_with(&dir, "daemon", dir.join("umm.sock"), &["--grant-device"]);
    let ctl = dir.join("umm.sock.ctl");
    ask_attach(&ctl, pid, "daemon --grant-device", || d.proc.context());
    assert!(a.registered());
    a.wait_rounds(3, "attached by the daemon");
    ask_detach(&ctl, pid, "daemon --grant-device");
    assert!(!a.registered());
    a.wait_rounds(1, "detached from the daemon");
    d.assert_fds_back("a granted attach and its detach");
    let report = d.stop();
    assert!(report.u64("faults") > 0, "{}", report.pretty());
    assert_eq!(fd_list(pid), fds_before, "attach/detach changed its fds");
    // Its own verification: every round's memory checked out (an OK line, exit 0).
    let ok = a.finish();
    assert!(ok.u64("rounds") > 0);
}

/// A Go program (its own runtime: no glibc malloc, goroutines on threads it creates itself,
/// memory from its own mmaps) attached while goroutines touch memory, detached, and checked.
#[test]
fn a_go_program_is_attached_served_and_detached() {
    require_root_and_uffd();
    if Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        println!("SKIPPED: a_go_program_is_attached_served_and_detached: no `go` (apt-get install golang-go)");
        return;
    }
    let dir = TestDir::new("attach_go");
    let src = dir.join("churn.go");
    std::fs::write(&src, GO_CHURN).unwrap();
    let exe = dir.join("churn");
    let out = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .env("GOCACHE", dir.join("gocache"))
        .env("HOME", dir.path())
        .output()
        .expect("run go build");
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = dir.join("go.state");
    let mut cmd = Command::new(&exe);
    cmd.arg(&state);
    let mut p = Proc::spawn(&dir, "churn", cmd);
    assert!(
        poll_until(1000, Duration::from_millis(10), || word(&state, ROUNDS) > 2),
        "the Go program did not start\n{}",
        p.context()
    );
    let (mut umm, report) = spawn_umm_attach(&dir, "attach", p.pid, &[]);
    wait_attach_registered(p.pid, &mut umm, "nothing of the Go program got registered");
    wait_rounds(&state, 20, "attached Go program");
    end_attach(&mut umm);
    assert!(
        !any_uffd_registered(p.pid),
        "still registered after the detach"
    );
    wait_rounds(&state, 5, "detached Go program");
    set_stop(&state);
    p.wait_success("Go program", Duration::from_secs(60));
    let ok = OkLine::find(&p.stdout(), "gochurn")
        .unwrap_or_else(|| panic!("no OK line\n{}", p.context()));
    assert!(ok.u64("rounds") >= 25);
    assert_served(&report, 256);
}

/// 8 goroutines; each round every one fills a fresh 4 MiB slice (new memory from the Go heap,
/// released to the kernel by debug.FreeOSMemory every few rounds so that it faults again) with
/// a pattern and verifies it. Words of the state file as for the attachee: [1] rounds, [3] stop.
const GO_CHURN: &str = r#"package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"syscall"
	"unsafe"
)

func main() {
	f, err := os.OpenFile(os.Args[1], os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		panic(err)
	}
	if err := f.Truncate(4096); err != nil {
		panic(err)
	}
	st, err := syscall.Mmap(int(f.Fd()), 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		panic(err)
	}
	word := func(i int) *uint64 { return (*uint64)(unsafe.Pointer(&st[i*8])) }
	var sum uint64
	rounds := uint64(0)
	for *word(3) == 0 {
		var wg sync.WaitGroup
		sums := make([]uint64, 8)
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				buf := make([]uint64, 512*1024)
				seed := rounds*8 + uint64(g) + 1
				for i := range buf {
					buf[i] = seed*0x9e3779b97f4a7c15 + uint64(i)
				}
				var s uint64
				for i := range buf {
					if buf[i] != seed*0x9e3779b97f4a7c15+uint64(i) {
						fmt.Printf("FAIL gochurn: round %d goroutine %d word %d\n", rounds, g, i)
						os.Exit(1)
					}
					s += buf[i]
				}
				sums[g] = s
			}(g)
		}
		wg.Wait()
		for _, s := range sums {
			sum = sum*31 + s
		}
		rounds++
		if rounds%4 == 0 {
			debug.FreeOSMemory()
		}
		*word(1) = rounds
	}
	fmt.Printf("OK gochurn checksum=%016x rounds=%d\n", sum, rounds)
}
"#;

// ----- umm attach --strict ----------------------------------------------------------------
//
// A ptrace syscall tracer (a thread of umm) keeps every thread of the process traced and has
// new private anonymous mappings registered at the mapping call's return.

/// The tracer of `pid` (TracerPid: the tracing thread's id), 0 if none.
fn tracer_of(pid: i32) -> u32 {
    umm::sys::proc::status_field(pid as u32, "TracerPid")
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(0) as u32
}

/// Wait (bounded) until `pid` is traced by umm's strict-mode tracer: a thread of umm other
/// than its main thread (which is the tracer only for the attach's injection).
fn wait_traced_by(pid: i32, umm: &mut Proc) {
    let umm_pid = umm.pid as u32;
    // Traced by umm's tracer thread, and registered: the tracer seizes the process before the
    // attach registers its memory, and a fork before that is no FORK event.
    let ok = poll_until(2000, Duration::from_millis(5), || {
        let t = tracer_of(pid);
        (t != 0
            && t != umm_pid
            && umm::sys::proc::tgid_of(t).ok() == Some(umm_pid)
            && umm.stderr().contains(&format!("pid {pid}: attached")))
            || umm.try_wait().is_some()
    });
    assert!(
        ok && umm.try_wait().is_none(),
        "pid {pid} never got traced by umm (TracerPid {})\n{}",
        tracer_of(pid),
        umm.context()
    );
}

/// SIGTERM a foreground attach and check it ended well.
fn end_attach(umm: &mut Proc) {
    umm.signal(Signal::SIGTERM);
    umm.wait_success("umm attach", Duration::from_secs(60));
}

#[test]
fn strict_attach_detach_20_times_loses_no_memory_or_signal_and_leaves_no_tracer() {
    require_root_and_uffd();
    let dir = TestDir::new("strict_20");
    let a = Attachee::start(&dir, "attachee", &target("attachee"), false);
    let sender = Sender::start(a.pid(), a.state.clone());
    let mut served = 0;
    for i in 0..20 {
        let (mut umm, report) =
            spawn_umm_attach(&dir, &format!("attach{i}"), a.pid(), &["--strict"]);
        wait_registered(&a, &mut umm);
        wait_traced_by(a.pid(), &mut umm);
        a.wait_rounds(2, "strictly attached");
        end_attach(&mut umm);
        assert_eq!(tracer_of(a.pid()), 0, "still traced after detach {i}");
        assert!(!a.registered(), "still registered after detach {i}");
        a.wait_rounds(2, "detached");
        served += Report::load(&report).unwrap().u64("pages_served");
    }
    let sent = sender.finish();
    let ok = a.finish();
    assert_eq!(ok.u64("usr1"), sent, "signals sent = received");
    assert!(sent >= 20, "the sender ran ({sent} signals)");
    // Every round MADV_DONTNEEDs a slice and refills it: faults the manager served.
    assert!(
        served >= 20 * 64,
        "pages served over the 20 attaches: {served}"
    );
}

#[test]
fn sigstop_and_sigcont_work_on_a_strictly_attached_process() {
    require_root_and_uffd();
    let dir = TestDir::new("strict_stop");
    let a = Attachee::start(&dir, "attachee", &target("attachee"), false);
    let (mut umm, report) = spawn_umm_attach(&dir, "attach", a.pid(), &["--strict"]);
    wait_registered(&a, &mut umm);
    wait_traced_by(a.pid(), &mut umm);
    a.wait_rounds(2, "strictly attached");
    kill(Pid::from_raw(a.pid()), Signal::SIGSTOP).unwrap();
    // Group-stopped: 'T', or 't' for a traced thread that stays stopped (PTRACE_LISTEN).
    let stopped = poll_until(2000, Duration::from_millis(5), || {
        matches!(umm::sys::proc::task_state(a.pid() as u32), Ok('T' | 't'))
    });
    assert!(stopped, "SIGSTOP did not stop it\n{}", umm.context());
    let at = a.word(ROUNDS);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.word(ROUNDS), at, "it ran on while stopped");
    kill(Pid::from_raw(a.pid()), Signal::SIGCONT).unwrap();
    a.wait_rounds(3, "after SIGCONT");
    // Stopped again, then detached while stopped: it stays stopped, and continues on SIGCONT.
    kill(Pid::from_raw(a.pid()), Signal::SIGSTOP).unwrap();
    assert!(poll_until(2000, Duration::from_millis(5), || {
        matches!(umm::sys::proc::task_state(a.pid() as u32), Ok('T' | 't'))
    }));
    end_attach(&mut umm);
    assert_eq!(tracer_of(a.pid()), 0, "still traced after the detach");
    kill(Pid::from_raw(a.pid()), Signal::SIGCONT).unwrap();
    a.wait_rounds(3, "detached, after SIGCONT");
    a.finish();
    let r = Report::load(&report).unwrap();
    assert!(r.u64("pages_served") >= 64, "{}", r.pretty());
}

#[test]
fn a_forked_child_under_strict_mode_gets_its_new_mappings_registered() {
    require_root_and_uffd();
    let dir = TestDir::new("strict_fork");
    let fifo = dir.join("gate");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut cmd = Command::new(target("forkmap"));
    cmd.arg(&fifo);
    let mut p = Proc::spawn(&dir, "forkmap", cmd);
    let (mut umm, report) = spawn_umm_attach(&dir, "attach", p.pid, &["--strict"]);
    wait_traced_by(p.pid, &mut umm);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .and_then(|mut f| f.write_all(b"go"))
        .expect("open the gate");
    p.wait_success("forkmap", Duration::from_secs(60));
    umm.wait_success("umm attach", Duration::from_secs(60));
    let ok = OkLine::find(&p.stdout(), "forkmap")
        .unwrap_or_else(|| panic!("no OK line\n{}", p.context()));
    assert_eq!(ok.checksum(), "8e5992bbca693c46", "{}", p.context());
    assert_eq!(ok.u64("parent_registered"), 1, "{}", umm.context());
    assert_eq!(ok.u64("child_registered"), 1, "{}", umm.context());
    let r = Report::load(&report).unwrap();
    assert!(r.u64("events.fork") >= 1, "{}", r.pretty());
    assert!(r.u64("strict_registers") >= 2, "{}", r.pretty());
    // Both 16 MiB mappings were registered before their first touch: every page is served.
    assert!(r.u64("pages_served") >= 2 * 4096, "{}", r.pretty());
}

#[test]
fn killing_umm_while_strict_leaves_the_target_running_with_its_memory() {
    require_root_and_uffd();
    let dir = TestDir::new("strict_kill");
    let a = Attachee::start(&dir, "attachee", &target("attachee"), false);
    let sender = Sender::start(a.pid(), a.state.clone());
    let (mut umm, _report) = spawn_umm_attach(&dir, "attach", a.pid(), &["--strict"]);
    wait_registered(&a, &mut umm);
    wait_traced_by(a.pid(), &mut umm);
    a.wait_rounds(3, "strictly attached");
    umm.signal(Signal::SIGKILL);
    let st = umm.wait_bounded(Duration::from_secs(60));
    assert!(!st.success(), "umm was killed: {}", describe(&st));
    // The kernel detaches the tracees of a dead tracer and closes its uffds.
    assert!(
        poll_until(2000, Duration::from_millis(5), || tracer_of(a.pid()) == 0),
        "still traced after umm died"
    );
    assert!(
        poll_until(2000, Duration::from_millis(5), || !a.registered()),
        "still registered after umm died"
    );
    a.wait_rounds(5, "after umm died");
    let sent = sender.finish();
    let ok = a.finish();
    assert_eq!(ok.u64("usr1"), sent, "signals sent = received");
}

/// Wait (bounded) until `pid` is traced by a thread of the daemon `daemon` (its tracer
/// thread for `attach --strict`, not the main thread).
fn wait_traced_by_daemon(pid: i32, daemon: &UmmDaemon) {
    let daemon_pid = daemon.proc.pid as u32;
    let ok = poll_until(2000, Duration::from_millis(5), || {
        let t = tracer_of(pid);
        t != 0 && t != daemon_pid && umm::sys::proc::tgid_of(t).ok() == Some(daemon_pid)
    });
    assert!(
        ok,
        "pid {pid} is not traced by a thread of the daemon (TracerPid {})\n{}",
        tracer_of(pid),
        daemon.proc.context()
    );
}

/// `attach --strict PID` through the daemon's control socket: the tracer is a thread of the
/// daemon, one per process, two at once (SIGCHLD is process-wide: a tracer that took it
/// must wake the other); a forked child's new mapping is registered before its first touch
/// (the program checks that itself); `detach PID` ends the tracing; the daemon's shutdown
/// detaches a strictly attached process cleanly, and it runs on with its memory and signals.
#[test]
fn strict_attach_through_the_daemon_traces_until_detach_and_shutdown() {
    require_root_and_uffd();
    let dir = TestDir::new("strict_daemon");
    let d = UmmDaemon::start(&dir);
    let ctl = dir.join("umm.sock.ctl");
    let strict_attach = |pid: i32, what: &str| {
        let answer = ask(&ctl, &format!("attach --strict {pid}"));
        assert!(
            answer.starts_with(&format!("ok attached pid {pid} (strict)")),
            "{what}: {answer}\n{}",
            d.proc.context()
        );
        wait_traced_by_daemon(pid, &d);
    };

    // A program behind a gate (its mappings after the attach, in the parent and a forked
    // child) and a long-running one, both strictly attached.
    let fifo = dir.join("gate");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut cmd = Command::new(target("forkmap"));
    cmd.arg(&fifo);
    let mut p = Proc::spawn(&dir, "forkmap", cmd);
    strict_attach(p.pid, "forkmap");
    let a = Attachee::start(&dir, "attachee", &target("attachee"), false);
    let sender = Sender::start(a.pid(), a.state.clone());
    let pid = a.pid();
    strict_attach(pid, "attachee");
    assert!(a.registered(), "attached but not registered");
    a.wait_rounds(2, "strictly attached");
    OpenOptions::new()
        .write(true)
        .open(&fifo)
        .and_then(|mut f| f.write_all(b"go"))
        .expect("open the gate");
    p.wait_success("forkmap", Duration::from_secs(60));
    let ok = OkLine::find(&p.stdout(), "forkmap")
        .unwrap_or_else(|| panic!("no OK line\n{}", p.context()));
    assert_eq!(ok.checksum(), "8e5992bbca693c46", "{}", p.context());
    assert_eq!(ok.u64("parent_registered"), 1, "{}", d.proc.context());
    assert_eq!(ok.u64("child_registered"), 1, "{}", d.proc.context());
    a.wait_rounds(2, "strictly attached, beside forkmap");

    // Detach (no tracer left), strict attach again, then the daemon stops with it attached.
    ask_detach(&ctl, pid, "strict detach");
    assert_eq!(tracer_of(pid), 0, "still traced after the detach");
    assert!(!a.registered(), "still registered after the detach");
    a.wait_rounds(2, "detached");
    strict_attach(pid, "attachee again");
    a.wait_rounds(2, "strictly attached again");
    let (report, log) = d.stop_with_log();
    // A thread waiting for its MADV_DONTNEED event to be read cannot stop for the tracer's
    // detach: the uffd must be closed first (it was not: 1 detach in ~15 waited out the
    // tracer's timeout).
    assert!(
        !log.contains("did not stop for the detach"),
        "a traced thread did not stop for the detach:\n{log}"
    );
    assert_eq!(tracer_of(pid), 0, "still traced after the daemon stopped");
    assert!(!a.registered(), "still registered after the daemon stopped");
    a.wait_rounds(3, "after the daemon stopped");
    let sent = sender.finish();
    let ok = a.finish();
    assert_eq!(ok.u64("usr1"), sent, "signals sent = received");
    // forkmap's two 16 MiB mappings (parent, child) at least, registered at their mmap.
    assert!(report.u64("strict_registers") >= 2, "{}", report.pretty());
    assert!(report.u64("events.fork") >= 1, "{}", report.pretty());
    assert!(
        report.u64("pages_served") >= 2 * 4096,
        "both 16 MiB mappings served: {}",
        report.pretty()
    );
}
