//! Integration tests of libumm_agent.so: real programs run with the agent preloaded, against no
//! manager or a fake one (a UnixListener thread speaking the protocol).
//!
//! The tests need the built cdylib, which `cargo test` alone does not build: they run
//! `cargo build -p umm-agent` once (same profile and target dir) and take the library next to
//! the test executable, or UMM_AGENT_LIB if set.
//! Target programs: /bin/true and `mapper.c`, compiled with `cc` into each test's temp dir.
//!
//! Timeouts here are upper bounds that keep a broken agent from hanging the suite, never
//! assertions about speed.

use std::collections::BTreeSet;
use std::ffi::c_int;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use umm::protocol::{
    decode, Message, NackCode, HELLO_FORKED, HELLO_HAS_UFFD, HELLO_REQUIRE, HELLO_WANT_GRANT,
};
use umm::uffd::{Features, Uffd};

/// Upper bound for anything a test waits on.
const BOUND: Duration = Duration::from_secs(60);

/// Reply timeout given to the agent where a test expects it to time out.
const SHORT_TIMEOUT_MS: &str = "300";

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The agent library, freshly built. `cargo test` does not build the library of a
/// cdylib-only package, so this runs `cargo build -p umm-agent` once, with the profile and
/// target directory of this test executable (`<target>/<profile>/deps/agent-HASH`).
/// UMM_AGENT_LIB=/path/to/libumm_agent.so skips the build.
fn agent_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Some(p) = std::env::var_os("UMM_AGENT_LIB") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "UMM_AGENT_LIB={} is not a file", p.display());
            return p;
        }
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable in <target>/<profile>/deps");
        if let (Some(cargo), Some(target_dir), Some(profile)) = (
            std::env::var_os("CARGO"),
            profile_dir.parent(),
            profile_dir.file_name().and_then(|p| p.to_str()),
        ) {
            let mut build = Command::new(cargo);
            build
                .args(["build", "-p", "umm-agent", "--manifest-path"])
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                .arg("--target-dir")
                .arg(target_dir);
            match profile {
                "debug" => {}
                "release" => {
                    build.arg("--release");
                }
                other => {
                    build.args(["--profile", other]);
                }
            }
            let out = build.output().expect("run cargo build -p umm-agent");
            assert!(
                out.status.success(),
                "cargo build -p umm-agent failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let candidates = [
            profile_dir.join("libumm_agent.so"),
            profile_dir.join("deps/libumm_agent.so"),
        ];
        for c in &candidates {
            if c.is_file() {
                return c.clone();
            }
        }
        panic!(
            "libumm_agent.so not found at {} or {}. Build it with `cargo build -p umm-agent` \
             (same CARGO_TARGET_DIR and profile as the tests), or set \
             UMM_AGENT_LIB=/path/to/libumm_agent.so",
            candidates[0].display(),
            candidates[1].display()
        );
    })
    .clone()
}

/// A directory removed with everything in it when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "umm-agent-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&p).expect("create temp dir");
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compile tests/mapper.c into `dir`.
fn mapper(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mapper.c");
    let out = dir.join("mapper");
    let r = Command::new("cc")
        .args(["-O1", "-Wall", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `cc` to build the target program: {e}"));
    assert!(
        r.status.success(),
        "cc {} failed: {}",
        src.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

/// `prog args` with the agent preloaded and no UMM_* variables from the test's environment.
fn agent_cmd(prog: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args)
        .env("LD_PRELOAD", agent_lib())
        .env_remove("UMM_SOCKET")
        .env_remove("UMM_REQUIRE")
        .env_remove("UMM_AGENT_QUIET")
        .env_remove("UMM_TIMEOUT_MS");
    c
}

struct Run {
    pid: u32,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    /// The one stderr line, or a panic showing everything.
    fn one_line(&self) -> &str {
        let lines = self.stderr_lines();
        assert_eq!(lines.len(), 1, "expected one stderr line: {self:?}");
        assert!(lines[0].starts_with("umm-agent: pid "), "{self:?}");
        lines[0]
    }

    /// "map ADDR LEN" lines of mapper.
    fn maps(&self) -> Vec<(u64, u64)> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("map "))
            .map(|l| {
                let (a, n) = l.split_once(' ').expect("map ADDR LEN");
                let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).expect("address");
                (a, n.parse().expect("length"))
            })
            .collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} {}\n--- stdout\n{}--- stderr\n{}---",
            self.pid, self.status, self.stdout, self.stderr
        )
    }
}

/// Run to completion (killed and a panic past BOUND), collecting its output.
fn run(cmd: &mut Command) -> Run {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn target program");
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("target program {pid} still running after {BOUND:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        pid,
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

// ---- SCM_RIGHTS for the fake manager -------------------------------------------------------

#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

/// recvmsg: bytes into `buf`, fds appended to `fds`. 0 at EOF.
fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut cbuf = CmsgBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is an empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: msg points at live buffers of the sizes it states.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote well-formed cmsghdrs into cbuf; each SCM_RIGHTS payload holds
    // fds newly installed in this process and owned by nobody else.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const c_int;
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..n {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(r as usize)
}

/// Send one message, with `fd` attached when given.
fn send_msg(sock: &UnixStream, m: &Message, fd: Option<RawFd>) {
    let bytes = m.encode();
    let mut cbuf = CmsgBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is an empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE computes a size; cbuf has room for one fd and is aligned, so
        // CMSG_FIRSTHDR is non-null and the writes stay inside cbuf.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut c_int, fd);
        }
    }
    // SAFETY: msg points at live buffers; the frame is small enough to go in one call.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(r, bytes.len() as isize, "fake manager: sendmsg failed");
}

// ---- the fake manager ------------------------------------------------------------------------

#[derive(Clone)]
enum OnHello {
    /// Never answer.
    Silent,
    /// Answer with this message.
    Reply(Message),
    /// Answer a WANT_GRANT Hello with a `/dev/userfaultfd` fd, any other with Ack.
    Grant,
}

#[derive(Clone, Copy, PartialEq)]
enum OnRegister {
    Ack,
    Silent,
    /// Ack, but the first Register of the handoff connection only after this long.
    AckFirstAfter(Duration),
}

/// What an fd received by the fake manager was.
#[derive(Debug)]
struct FdSeen {
    is_uffd: bool,
    what: String,
    /// For a uffd: whether this side's UFFDIO_API (with EVENT_FORK when root) succeeded,
    /// i.e. the agent left the handshake to the manager.
    api: Option<Result<(), String>>,
}

/// What one connection to the fake manager carried. The first connection's log holds the later
/// ones (forked children's channels) in `later`, in the order they were accepted.
#[derive(Debug, Default)]
struct Log {
    /// SO_PEERCRED pid of the connecting process.
    peer_pid: u32,
    hello: Option<(u32, u32, String)>,
    hello_fds: Vec<FdSeen>,
    granted: bool,
    handoff_fds: Vec<FdSeen>,
    registers: Vec<(u64, u64)>,
    other: Vec<String>,
    later: Vec<Log>,
}

impl Log {
    /// The later connection from `pid`, which must be there exactly once.
    fn channel_of(&self, pid: u32) -> &Log {
        let found: Vec<&Log> = self.later.iter().filter(|l| l.peer_pid == pid).collect();
        assert_eq!(found.len(), 1, "one connection from pid {pid}: {self:#?}");
        found[0]
    }
}

/// How the fake manager answers.
#[derive(Clone)]
struct Behaviour {
    on_hello: OnHello,
    on_register: OnRegister,
    /// The reply to a Hello with HELLO_FORKED.
    on_forked: Message,
}

struct Fake {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Log>>,
}

impl Fake {
    /// Listen at `dir/umm.sock` and serve every connection on a thread of its own; a forked
    /// child's Hello is acked.
    fn start(dir: &Path, on_hello: OnHello, on_register: OnRegister) -> Fake {
        let on_forked = Message::Ack {
            registered_bytes: 0,
        };
        Fake::start_with(
            dir,
            Behaviour {
                on_hello,
                on_register,
                on_forked,
            },
        )
    }

    fn start_with(dir: &Path, behaviour: Behaviour) -> Fake {
        let socket = dir.join("umm.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake manager");
        // Anyone may connect (the grant test's target runs as another user).
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || serve(listener, &stop2, behaviour));
        Fake {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    /// The log, once the agent's side has closed (call after the target exited).
    fn finish(mut self) -> Log {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("fake manager panicked")
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn describe(fd: &OwnedFd) -> FdSeen {
    let is_uffd = umm::sys::fd::is_userfaultfd(fd.as_fd());
    let api = is_uffd.then(|| {
        let uffd = Uffd::from_owned(fd.try_clone().expect("dup"));
        let wanted = if is_root() {
            Features::EVENT_FORK
        } else {
            Features(0)
        };
        uffd.api(wanted).map(|_| ()).map_err(|e| e.to_string())
    });
    FdSeen {
        is_uffd,
        what: umm::sys::fd::describe(fd.as_fd()),
        api,
    }
}

/// Accept connections until told to stop, each served on a thread; the log of the first with
/// the others in `later`.
fn serve(listener: UnixListener, stop: &AtomicBool, behaviour: Behaviour) -> Log {
    let start = Instant::now();
    let mut conns = Vec::new();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let b = behaviour.clone();
                conns.push(std::thread::spawn(move || serve_one(s, &b)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) || start.elapsed() > BOUND {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("fake manager: accept: {e}"),
        }
    }
    let mut logs: Vec<Log> = conns
        .into_iter()
        .map(|t| t.join().expect("fake manager connection panicked"))
        .collect();
    if logs.is_empty() {
        return Log::default();
    }
    let mut first = logs.remove(0);
    first.later = logs;
    first
}

fn serve_one(stream: UnixStream, behaviour: &Behaviour) -> Log {
    let mut log = Log {
        peer_pid: umm::sys::socket::peer_cred(&stream)
            .expect("SO_PEERCRED")
            .pid,
        ..Log::default()
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(BOUND)).unwrap();
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Every complete frame in the buffer first.
        while let Some((m, used)) = decode(&buf).expect("fake manager: agent sent a bad frame") {
            buf.drain(..used);
            let got: Vec<OwnedFd> = std::mem::take(&mut fds);
            match m {
                Message::Hello { pid, flags, exe } => {
                    log.hello = Some((pid, flags, exe));
                    log.hello_fds = got.iter().map(describe).collect();
                    if flags & HELLO_FORKED != 0 {
                        send_msg(&stream, &behaviour.on_forked, None);
                        continue;
                    }
                    match &behaviour.on_hello {
                        OnHello::Silent => {}
                        OnHello::Reply(r) => send_msg(&stream, r, None),
                        OnHello::Grant if flags & HELLO_WANT_GRANT != 0 => {
                            let dev =
                                umm::uffd::Uffd::open_device().expect("open /dev/userfaultfd");
                            send_msg(&stream, &Message::Grant, Some(dev.as_raw_fd()));
                            log.granted = true;
                        }
                        OnHello::Grant => send_msg(
                            &stream,
                            &Message::Ack {
                                registered_bytes: 0,
                            },
                            None,
                        ),
                    }
                }
                Message::Handoff => {
                    log.handoff_fds = got.iter().map(describe).collect();
                    let ok = log.handoff_fds.len() == 1 && log.handoff_fds[0].is_uffd;
                    let reply = if ok {
                        Message::Ack {
                            registered_bytes: 0,
                        }
                    } else {
                        Message::Nack {
                            code: NackCode::BadFd,
                            reason: "Handoff without a userfaultfd".into(),
                        }
                    };
                    send_msg(&stream, &reply, None);
                }
                Message::Register { start, len } => {
                    log.registers.push((start, len));
                    if let OnRegister::AckFirstAfter(delay) = behaviour.on_register {
                        let forked = log.hello.as_ref().is_some_and(|h| h.1 & HELLO_FORKED != 0);
                        if log.registers.len() == 1 && !forked {
                            std::thread::sleep(delay);
                        }
                    }
                    if behaviour.on_register != OnRegister::Silent {
                        send_msg(
                            &stream,
                            &Message::Ack {
                                registered_bytes: len,
                            },
                            None,
                        );
                    }
                }
                other => log.other.push(format!("{other:?}")),
            }
        }
        match recv_with_fds(&stream, &mut chunk, &mut fds) {
            Ok(0) => return log,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("fake manager: recvmsg: {e}"),
        }
    }
}

// ---- (a) no UMM_SOCKET -------------------------------------------------------------------

#[test]
fn without_umm_socket_the_agent_does_nothing() {
    let dir = TempDir::new("unset");
    let prog = mapper(dir.path());
    for r in [
        run(&mut agent_cmd(Path::new("/bin/true"), &[])),
        run(&mut agent_cmd(&prog, &["map", "1048576"])),
        run(agent_cmd(&prog, &["fds"]).env("UMM_SOCKET", "")),
    ] {
        assert!(r.status.success(), "{r:?}");
        assert_eq!(r.stderr, "", "{r:?}");
    }
    let r = run(&mut agent_cmd(&prog, &["fds"]));
    assert!(
        !r.stdout.contains("socket:"),
        "no connection expected: {r:?}"
    );
    assert!(!r.stdout.contains("userfaultfd"), "no uffd expected: {r:?}");
}

// ---- (b), (c) no manager at the path -----------------------------------------------------

#[test]
fn missing_manager_warns_once_and_runs_unmanaged() {
    let dir = TempDir::new("missing");
    let sock = dir.path().join("nobody-listens.sock");
    let r = run(agent_cmd(Path::new("/bin/true"), &[]).env("UMM_SOCKET", &sock));
    assert!(r.status.success(), "{r:?}");
    let line = r.one_line();
    assert!(
        line.starts_with(&format!("umm-agent: pid {}: ", r.pid)),
        "{line}"
    );
    assert!(
        line.contains(&format!("no manager at {}", sock.display())),
        "{line}"
    );
    assert!(line.contains("No such file or directory"), "{line}");
    assert!(line.ends_with("; running unmanaged"), "{line}");
}

#[test]
fn refused_connection_names_the_reason() {
    let dir = TempDir::new("refused");
    let sock = dir.path().join("stale.sock");
    // A socket file nobody listens on any more.
    drop(UnixListener::bind(&sock).unwrap());
    let r = run(agent_cmd(Path::new("/bin/true"), &[]).env("UMM_SOCKET", &sock));
    assert!(r.status.success(), "{r:?}");
    assert!(
        r.one_line()
            .contains("(Connection refused); running unmanaged"),
        "{r:?}"
    );
}

#[test]
fn quiet_suppresses_the_warning() {
    let dir = TempDir::new("quiet");
    let r = run(agent_cmd(Path::new("/bin/true"), &[])
        .env("UMM_SOCKET", dir.path().join("none.sock"))
        .env("UMM_AGENT_QUIET", "1"));
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
}

#[test]
fn required_manager_missing_exits_1_with_one_line() {
    let dir = TempDir::new("require");
    let sock = dir.path().join("none.sock");
    for quiet in ["0", "1"] {
        let r = run(agent_cmd(Path::new("/bin/true"), &[])
            .env("UMM_SOCKET", &sock)
            .env("UMM_REQUIRE", "1")
            .env("UMM_AGENT_QUIET", quiet));
        assert_eq!(r.status.code(), Some(1), "{r:?}");
        let line = r.one_line();
        assert!(
            line.starts_with(&format!(
                "umm-agent: pid {}: manager required (UMM_REQUIRE=1) but no manager at {}",
                r.pid,
                sock.display()
            )),
            "{line}"
        );
    }
}

// ---- (d) a manager that never answers ----------------------------------------------------

#[test]
fn silent_manager_times_out_and_the_program_runs() {
    let dir = TempDir::new("silent");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), OnHello::Silent, OnRegister::Ack);
    let r = run(agent_cmd(&prog, &["map", "65536"])
        .env("UMM_SOCKET", &fake.socket)
        .env("UMM_TIMEOUT_MS", SHORT_TIMEOUT_MS));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert!(r.stdout.ends_with("done\n"), "{r:?}");
    let line = r.one_line();
    assert!(line.contains("no reply within 300 ms"), "{line}");
    assert!(line.ends_with("; running unmanaged"), "{line}");
    assert!(log.hello.is_some(), "the Hello was sent: {log:?}");
    assert!(
        log.registers.is_empty(),
        "nothing registered without a handoff: {log:?}"
    );
}

#[test]
fn silent_manager_with_require_exits_1() {
    let dir = TempDir::new("silent-require");
    let fake = Fake::start(dir.path(), OnHello::Silent, OnRegister::Ack);
    let r = run(agent_cmd(Path::new("/bin/true"), &[])
        .env("UMM_SOCKET", &fake.socket)
        .env("UMM_TIMEOUT_MS", SHORT_TIMEOUT_MS)
        .env("UMM_REQUIRE", "1"));
    let log = fake.finish();
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    let line = r.one_line();
    assert!(
        line.contains("manager required (UMM_REQUIRE=1) but"),
        "{line}"
    );
    assert!(line.contains("no reply within 300 ms"), "{line}");
    let (_, flags, _) = log.hello.expect("hello");
    assert_ne!(flags & HELLO_REQUIRE, 0, "Hello says REQUIRE");
}

#[test]
fn listener_that_never_accepts_times_out() {
    let dir = TempDir::new("backlog");
    let sock = dir.path().join("umm.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let r = run(agent_cmd(Path::new("/bin/true"), &[])
        .env("UMM_SOCKET", &sock)
        .env("UMM_TIMEOUT_MS", SHORT_TIMEOUT_MS));
    drop(listener);
    assert!(r.status.success(), "{r:?}");
    assert!(r.one_line().contains("within 300 ms"), "{r:?}");
}

// ---- (e) Ack -----------------------------------------------------------------------------

fn ack() -> OnHello {
    OnHello::Reply(Message::Ack {
        registered_bytes: 1 << 20,
    })
}

#[test]
fn ack_hands_the_uffd_off_and_the_agent_keeps_only_the_socket() {
    let dir = TempDir::new("ack");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    let r = run(agent_cmd(&prog, &["fds"]).env("UMM_SOCKET", &fake.socket));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    let (pid, flags, exe) = log.hello.as_ref().expect("a Hello");
    assert_eq!(*pid, r.pid, "Hello names the target's pid");
    assert_eq!(
        Path::new(exe),
        prog.canonicalize().unwrap(),
        "Hello names the exe"
    );
    assert_eq!(flags & HELLO_REQUIRE, 0);
    if flags & HELLO_HAS_UFFD != 0 {
        assert_eq!(log.hello_fds.len(), 1, "one fd with the Hello: {log:?}");
        let fd = &log.hello_fds[0];
        assert!(
            fd.is_uffd,
            "the Hello's fd is {}, not a userfaultfd",
            fd.what
        );
    } else {
        assert!(!is_root(), "root can always open a userfaultfd: {log:?}");
        assert_eq!(flags & HELLO_WANT_GRANT, HELLO_WANT_GRANT);
        assert!(log.hello_fds.is_empty());
    }
    if is_root() {
        assert_ne!(flags & HELLO_HAS_UFFD, 0, "{log:?}");
    }
    // After the handoff the target holds its connection and no userfaultfd of its own.
    let fds: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("fd ")).collect();
    assert_eq!(
        fds.iter().filter(|l| l.contains("socket:")).count(),
        1,
        "{r:?}"
    );
    assert!(!r.stdout.contains("userfaultfd"), "{r:?}");
}

#[test]
fn require_flag_reaches_the_manager_and_ack_satisfies_it() {
    let dir = TempDir::new("ack-require");
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    let r = run(agent_cmd(Path::new("/bin/true"), &[])
        .env("UMM_SOCKET", &fake.socket)
        .env("UMM_REQUIRE", "1"));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    let (_, flags, _) = log.hello.expect("hello");
    assert_ne!(flags & HELLO_REQUIRE, 0);
}

#[test]
fn the_socket_does_not_survive_exec() {
    let dir = TempDir::new("exec");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    // The program drops UMM_SOCKET and execs itself: the new image has no agent connection,
    // so any socket it holds would be the old one leaking through exec.
    let r = run(agent_cmd(&prog, &["exec-fds"]).env("UMM_SOCKET", &fake.socket));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    assert!(log.hello.is_some());
    assert!(r.stdout.contains("done"), "{r:?}");
    assert!(!r.stdout.contains("socket:"), "{r:?}");
    assert!(!r.stdout.contains("userfaultfd"), "{r:?}");
}

// ---- (f) Nack ----------------------------------------------------------------------------

#[test]
fn nack_warns_with_its_reason() {
    let dir = TempDir::new("nack");
    let nack = OnHello::Reply(Message::Nack {
        code: NackCode::Denied,
        reason: "uid 1000 may not\nattach".into(),
    });
    let fake = Fake::start(dir.path(), nack.clone(), OnRegister::Ack);
    let r = run(agent_cmd(Path::new("/bin/true"), &[]).env("UMM_SOCKET", &fake.socket));
    drop(fake);
    assert!(r.status.success(), "{r:?}");
    let line = r.one_line();
    assert!(line.contains("uid 1000 may not attach"), "{line}");
    assert!(line.contains("denied"), "{line}");
    assert!(line.ends_with("; running unmanaged"), "{line}");

    let fake = Fake::start(dir.path(), nack, OnRegister::Ack);
    let r = run(agent_cmd(Path::new("/bin/true"), &[])
        .env("UMM_SOCKET", &fake.socket)
        .env("UMM_REQUIRE", "1"));
    drop(fake);
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    let line = r.one_line();
    assert!(
        line.contains("manager required (UMM_REQUIRE=1) but"),
        "{line}"
    );
    assert!(line.contains("uid 1000 may not attach"), "{line}");
}

#[test]
fn an_unexpected_reply_is_a_failure() {
    let dir = TempDir::new("unexpected");
    let fake = Fake::start(
        dir.path(),
        OnHello::Reply(Message::Register { start: 0, len: 0 }),
        OnRegister::Ack,
    );
    let r = run(agent_cmd(Path::new("/bin/true"), &[]).env("UMM_SOCKET", &fake.socket));
    drop(fake);
    assert!(r.status.success(), "{r:?}");
    assert!(r.one_line().contains("unexpected Register reply"), "{r:?}");
}

// ---- (g) Register --------------------------------------------------------------------------

#[test]
fn new_anonymous_mappings_are_registered() {
    let dir = TempDir::new("register");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    let r = run(agent_cmd(&prog, &["map", "1048576"]).env("UMM_SOCKET", &fake.socket));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    let maps = r.maps();
    assert_eq!(maps.len(), 3, "{r:?}");
    assert!(log.registers.contains(&(maps[0].0, 1 << 20)), "{log:?}");
    // Exactly the private anonymous writable / PROT_NONE mappings and the mremap result, in
    // order: no shared, read-only or file mappings, nothing for the in-place shrink.
    assert_eq!(log.registers, maps, "{log:?}\n{r:?}");
    assert!(log.other.is_empty(), "{log:?}");
}

#[test]
fn unanswered_register_stops_registration_and_the_program_completes() {
    let dir = TempDir::new("register-silent");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), ack(), OnRegister::Silent);
    let r = run(agent_cmd(&prog, &["map", "1048576"])
        .env("UMM_SOCKET", &fake.socket)
        .env("UMM_TIMEOUT_MS", SHORT_TIMEOUT_MS));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert!(r.stdout.ends_with("done\n"), "{r:?}");
    let line = r.one_line();
    assert!(line.contains("Register of ["), "{line}");
    assert!(line.contains("no reply within 300 ms"), "{line}");
    // The first Register went out; after its failure no other was sent.
    assert_eq!(log.registers, vec![r.maps()[0]], "{log:?}\n{r:?}");
}

/// "map-in PID ADDR LEN" lines of mapper's forked descendants, grouped by pid in order.
fn maps_in(r: &Run) -> Vec<(u32, Vec<(u64, u64)>)> {
    let mut by_pid: Vec<(u32, Vec<(u64, u64)>)> = Vec::new();
    for l in r.stdout.lines().filter_map(|l| l.strip_prefix("map-in ")) {
        let mut f = l.split(' ');
        let (Some(pid), Some(a), Some(n)) = (f.next(), f.next(), f.next()) else {
            panic!("map-in PID ADDR LEN: {l}");
        };
        let pid: u32 = pid.parse().expect("pid");
        let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).expect("address");
        let n: u64 = n.parse().expect("length");
        match by_pid.iter_mut().find(|(p, _)| *p == pid) {
            Some((_, v)) => v.push((a, n)),
            None => by_pid.push((pid, vec![(a, n)])),
        }
    }
    by_pid
}

/// The forked Hello of a child: from `pid` itself, FORKED (with REQUIRE when `require`), no fd,
/// the target's exe.
fn assert_forked_hello(log: &Log, pid: u32, require: bool, prog: &Path) {
    let (hello_pid, flags, exe) = log.hello.as_ref().expect("a Hello on the child's channel");
    assert_eq!(*hello_pid, pid, "the Hello names the child: {log:?}");
    let want = HELLO_FORKED | if require { HELLO_REQUIRE } else { 0 };
    assert_eq!(*flags, want, "{log:?}");
    assert!(
        log.hello_fds.is_empty(),
        "no fd with a forked Hello: {log:?}"
    );
    assert_eq!(Path::new(exe), prog.canonicalize().unwrap(), "{log:?}");
}

#[test]
fn forked_children_and_grandchildren_register_on_channels_of_their_own() {
    let dir = TempDir::new("fork");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    let r = run(agent_cmd(&prog, &["fork", "1048576", "2"]).env("UMM_SOCKET", &fake.socket));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    // The parent's connection carries only the parent's mapping: nothing of the children.
    assert_eq!(log.peer_pid, r.pid);
    assert_eq!(log.registers, r.maps(), "{log:?}\n{r:?}");
    assert_eq!(log.registers.len(), 1);
    let children = maps_in(&r);
    assert_eq!(children.len(), 2, "a child and a grandchild: {r:?}");
    assert_eq!(log.later.len(), 2, "one channel each: {log:#?}");
    for (i, (pid, maps)) in children.iter().enumerate() {
        assert_ne!(*pid, r.pid);
        let conn = log.channel_of(*pid);
        assert_forked_hello(conn, *pid, false, &prog);
        // Both mappings of each, in order (the second after its own child used its own
        // channel), with the lengths it mapped.
        let len = (i as u64 + 2) << 20;
        assert_eq!(maps, &vec![(maps[0].0, len), (maps[1].0, len)], "{r:?}");
        assert_eq!(&conn.registers, maps, "pid {pid}: {log:#?}\n{r:?}");
        assert!(conn.other.is_empty(), "{conn:?}");
    }
}

#[test]
fn a_grandchild_closes_its_parents_channel_and_keeps_the_handoff_socket() {
    let dir = TempDir::new("fork-fds");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    let r = run(agent_cmd(&prog, &["fork-fds", "65536"]).env("UMM_SOCKET", &fake.socket));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    assert_eq!(log.later.len(), 2, "{log:#?}");
    // The grandchild holds the handoff socket it inherited (left alone) and its own channel;
    // its parent's channel was closed in it.
    let sockets = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("fd ") && l.contains("socket:"))
        .count();
    assert_eq!(sockets, 2, "{r:?}");
}

#[test]
fn a_child_forked_while_another_thread_registers_is_not_stuck_on_the_lock() {
    let dir = TempDir::new("fork-locked");
    let prog = mapper(dir.path());
    let fake = Fake::start(
        dir.path(),
        ack(),
        OnRegister::AckFirstAfter(Duration::from_millis(1500)),
    );
    // A child that waited for the lock its copy says is held would give up after
    // 2 * 4 s + 1 s with a line on stderr (and skip its Register): no line, and its Register
    // arrived, prove it was not stuck (no timing is asserted).
    let r = run(agent_cmd(&prog, &["fork-locked", "65536"])
        .env("UMM_SOCKET", &fake.socket)
        .env("UMM_TIMEOUT_MS", "4000"));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    // Besides the program's own mappings, the malloc and pthread_create wrappers register
    // what glibc maps itself (thread stacks, arenas): only the program's own are listed.
    assert_includes(&log.registers, &r.maps(), &format!("{log:?}\n{r:?}"));
    let children = maps_in(&r);
    assert_eq!(children.len(), 1, "{r:?}");
    let (pid, maps) = &children[0];
    assert_includes(&log.channel_of(*pid).registers, maps, &format!("{log:#?}"));
}

/// Every range of `want` was registered, each exactly once.
fn assert_includes(got: &[(u64, u64)], want: &[(u64, u64)], context: &str) {
    for w in want {
        let n = got.iter().filter(|g| *g == w).count();
        assert_eq!(n, 1, "{w:x?} registered {n} times: {context}");
    }
}

#[test]
fn a_refused_child_warns_once_and_runs_on() {
    let dir = TempDir::new("fork-nack");
    let prog = mapper(dir.path());
    let fake = Fake::start_with(
        dir.path(),
        Behaviour {
            on_hello: ack(),
            on_register: OnRegister::Ack,
            on_forked: Message::Nack {
                code: NackCode::Other,
                reason: "no address space of that pid".into(),
            },
        },
    );
    // UMM_REQUIRE=1 is about the attach: a refused child runs on.
    let r = run(agent_cmd(&prog, &["fork", "1048576", "2"])
        .env("UMM_SOCKET", &fake.socket)
        .env("UMM_REQUIRE", "1"));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert!(r.stdout.ends_with("done\n"), "{r:?}");
    // The parent's Register requests keep working.
    assert_eq!(log.registers, r.maps(), "{log:?}\n{r:?}");
    assert_eq!(log.registers.len(), 1);
    let children = maps_in(&r);
    assert_eq!(children.len(), 2, "{r:?}");
    // One line per child; the grandchild of a refused child tries afresh.
    let lines = r.stderr_lines();
    assert_eq!(lines.len(), 2, "{r:?}");
    for (pid, maps) in &children {
        assert_eq!(maps.len(), 2, "both mappings succeeded: {r:?}");
        let conn = log.channel_of(*pid);
        assert_forked_hello(conn, *pid, true, &prog);
        assert!(conn.registers.is_empty(), "{conn:?}");
        let prefix = format!("umm-agent: pid {pid}: forked child: no Register channel (manager");
        let mine: Vec<&&str> = lines.iter().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(mine.len(), 1, "{r:?}");
        assert!(
            mine[0].contains("refused: no address space of that pid"),
            "{}",
            mine[0]
        );
        assert!(
            mine[0].ends_with("new mappings are not registered"),
            "{}",
            mine[0]
        );
    }
}

#[test]
fn vfork_children_leave_the_agent_alone() {
    let dir = TempDir::new("vfork");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    let r = run(agent_cmd(&prog, &["vfork", "65536"]).env("UMM_SOCKET", &fake.socket));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    // No vfork child connected or sent anything; the parent's and the forked child's channels
    // carry exactly their own mappings, before and after their vfork children mapped memory.
    assert_eq!(log.registers, r.maps(), "{log:?}\n{r:?}");
    let children = maps_in(&r);
    assert_eq!(children.len(), 1, "{r:?}");
    assert_eq!(
        log.later.len(),
        1,
        "only the forked child connected: {log:#?}"
    );
    let (pid, maps) = &children[0];
    let conn = log.channel_of(*pid);
    assert_forked_hello(conn, *pid, false, &prog);
    assert_eq!(&conn.registers, maps, "{log:#?}\n{r:?}");
}

/// The program closes every fd >= 3 (the agent's socket among them) and opens a file 8 times,
/// so the agent's number now names the program's file. The next Register fails (one line)
/// and the agent must not close that number: every read of the file succeeds.
fn closed_socket_run(tag: &str, args: &[&str]) -> (Run, Log) {
    let dir = TempDir::new(tag);
    let prog = mapper(dir.path());
    let file = dir.path().join("data.txt");
    std::fs::write(&file, "kept-by-the-program\n").unwrap();
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    let mut full = vec!["closefds", file.to_str().unwrap()];
    full.extend_from_slice(args);
    let r = run(agent_cmd(&prog, &full).env("UMM_SOCKET", &fake.socket));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    let reads: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("read "))
        .collect();
    let want: Vec<String> = (0..8)
        .map(|i| format!("read {i} kept-by-the-program"))
        .collect();
    assert_eq!(reads, want, "{r:?}");
    let line = r.one_line();
    assert!(
        line.contains("failed (the program closed or replaced the manager socket)"),
        "{line}"
    );
    (r, log)
}

#[test]
fn a_program_that_reuses_the_socket_number_keeps_its_file() {
    let (r, log) = closed_socket_run("closefds", &[]);
    assert!(r
        .one_line()
        .starts_with(&format!("umm-agent: pid {}: Register of [", r.pid)));
    assert!(log.registers.is_empty(), "{log:?}");
}

#[test]
fn a_child_that_reuses_its_channel_number_keeps_its_file() {
    let (r, log) = closed_socket_run("closefds-child", &["child"]);
    let children = maps_in(&r);
    assert_eq!(children.len(), 1, "{r:?}");
    let (pid, maps) = &children[0];
    assert!(
        r.one_line()
            .starts_with(&format!("umm-agent: pid {pid}: Register of [")),
        "{r:?}"
    );
    // The child's first mapping went out on its channel; after the program took the number,
    // nothing more. The parent's Register requests were not disturbed.
    let conn = log.channel_of(*pid);
    assert_eq!(conn.registers, vec![maps[0]], "{log:#?}");
    assert_eq!(log.registers, r.maps(), "{log:?}\n{r:?}");
    assert_eq!(log.registers.len(), 1);
}

#[test]
fn threads_register_concurrently() {
    let dir = TempDir::new("threads");
    let prog = mapper(dir.path());
    let fake = Fake::start(dir.path(), ack(), OnRegister::Ack);
    let r = run(agent_cmd(&prog, &["threads", "16"]).env("UMM_SOCKET", &fake.socket));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    let want: BTreeSet<(u64, u64)> = r.maps().into_iter().collect();
    assert_eq!(want.len(), 16, "{r:?}");
    // The threads' own mappings all arrive, each once; so do their stacks (glibc maps them
    // with its internal mmap; the agent's pthread_create registers them): 16 more at least.
    let mine: Vec<(u64, u64)> = want.iter().copied().collect();
    assert_includes(&log.registers, &mine, &format!("{log:?}"));
    assert!(
        log.registers.len() >= 2 * 16,
        "no thread stacks registered: {log:?}"
    );
}

// ---- the grant -----------------------------------------------------------------------------

#[test]
fn unprivileged_target_gets_a_grant_and_hands_off_a_new_uffd() {
    if !is_root() || !Path::new("/dev/userfaultfd").exists() {
        eprintln!("skipped: needs root (to run the target as nobody) and /dev/userfaultfd");
        return;
    }
    let dir = TempDir::new("grant");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let prog = mapper(dir.path());
    // The target user may not be able to read the build directory.
    let lib = dir.path().join("libumm_agent.so");
    std::fs::copy(agent_lib(), &lib).unwrap();
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = Fake::start(dir.path(), OnHello::Grant, OnRegister::Ack);
    let r = run(agent_cmd(&prog, &["fds"])
        .env("LD_PRELOAD", &lib)
        .env("UMM_SOCKET", &fake.socket)
        .uid(65534)
        .gid(65534));
    let log = fake.finish();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    let (pid, flags, _) = log.hello.as_ref().expect("a Hello");
    assert_eq!(*pid, r.pid);
    if flags & HELLO_WANT_GRANT != 0 {
        // vm.unprivileged_userfaultfd=0: the agent asked, got the device, made a uffd.
        assert!(log.hello_fds.is_empty(), "{log:?}");
        assert!(log.granted);
        assert_eq!(log.handoff_fds.len(), 1, "{log:?}");
        assert!(log.handoff_fds[0].is_uffd, "{log:?}");
        assert_eq!(log.handoff_fds[0].api, Some(Ok(())), "{log:?}");
    } else {
        eprintln!("note: unprivileged userfaultfd is allowed here; no grant was needed");
    }
    // Neither the device nor a uffd is left in the target.
    assert!(!r.stdout.contains("userfaultfd"), "{r:?}");
}
