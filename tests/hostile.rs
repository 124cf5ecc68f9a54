//! Hostile and unlucky peers of `umm daemon` (issue 6): a uffd made in another process,
//! uids the socket must not admit, the `/dev/userfaultfd` grant both ways, oversized,
//! truncated and never-finished frames (many at once), socket directories anyone could
//! write to, and a memory cgroup limit hit while the manager fills memory.
//!
//! Each test checks the daemon's log line and report counters for the refusal, that nothing
//! was registered or served for the bad peer, and that a real target is still served
//! (its OK line and the daemon's counters).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use common::wire::*;
use common::*;

const LIMIT: Duration = Duration::from_secs(180);
/// How long a bad peer may stay connected before we call it "not dropped" (the handshake
/// deadline is 10 s; this only turns a hang into a failure).
const DROP_WAIT: Duration = Duration::from_secs(40);

/// umm::protocol::MAX_FRAME: the largest frame a daemon (not a restore) accepts.
const MAX_FRAME: usize = umm::protocol::MAX_FRAME;

/// `umm daemon --socket SOCK --report REPORT EXTRA...` (for a start that must fail).
fn daemon_command(dir: &TestDir, sock: &Path, report: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(umm_bin());
    cmd.arg("daemon")
        .arg("--socket")
        .arg(sock)
        .arg("--report")
        .arg(report)
        .args(extra)
        .env("RUST_LOG", "info")
        .current_dir(dir.path());
    cmd
}

/// Run a target to completion; it must exit 0 and print its OK line.
fn run_to_ok(dir: &TestDir, label: &str, name: &str, cmd: Command) -> (OkLine, Proc) {
    let mut p = Proc::spawn(dir, label, cmd);
    let st = p.wait_bounded(LIMIT);
    assert!(
        st.success(),
        "{label}: {} (UMM_REQUIRE=1: exit 1 = not managed)\n{}",
        describe(&st),
        p.context()
    );
    p.assert_group_gone();
    let ok = OkLine::find(&p.stdout(), name)
        .unwrap_or_else(|| panic!("no OK line from {label}\n{}", p.context()));
    (ok, p)
}

fn assert_all_registered(ok: &OkLine, p: &Proc) {
    let (k, n) = ok.registered();
    assert!(
        n > 0 && k == n,
        "{}: {k}/{n} regions registered\n{}",
        p.label,
        p.context()
    );
}

/// What the daemon answers a bad peer until it drops the connection (read within
/// DROP_WAIT). Returns the Nack's (code, reason) if it sent one; anything else fails.
fn read_until_dropped(s: UnixStream, what: &str) -> Option<(u16, String)> {
    let got = read_until_closed(s, what);
    if got.len() < 12 {
        return None;
    }
    let kind = u16::from_le_bytes([got[6], got[7]]);
    assert_eq!(kind, KIND_NACK, "{what}: answered with kind {kind:#06x}");
    let code = u16::from_le_bytes([got[8], got[9]]);
    let len = u16::from_le_bytes([got[10], got[11]]) as usize;
    let reason = String::from_utf8_lossy(&got[12..(12 + len).min(got.len())]).into_owned();
    Some((code, reason))
}

/// A process of ours that is killed (with its group) and reaped on drop.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }
}

/// A userfaultfd made by another process (a fresh python: its own mm and ASLR layout), sent
/// to us over a socketpair. The process lives until `keep` is dropped.
fn foreign_uffd() -> (OwnedFd, Helper, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let child = Command::new(PYTHON)
        .arg("-c")
        .arg(
            "import ctypes, os, socket\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)\n\
             assert fd >= 0, ctypes.get_errno()\n\
             s = socket.socket(fileno=0)\n\
             socket.send_fds(s, [b'u'], [fd])\n\
             s.recv(1)\n",
        )
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .process_group(0)
        .spawn()
        .expect("spawn python");
    let helper = Helper(child);
    ours.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 4];
    let got = umm::sys::socket::recv_with_fds_blocking(ours.as_fd(), &mut buf)
        .expect("receive the uffd from python");
    assert_eq!(got.fds.len(), 1, "python sent no fd");
    let fd = got.fds.into_iter().next().expect("one fd");
    assert!(umm::sys::fd::is_userfaultfd(fd.as_fd()));
    (fd, helper, ours)
}

/// Mappings of `pid` registered with a userfaultfd (`um` in VmFlags).
fn registered_vmas(pid: u32) -> usize {
    fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "um"))
        .count()
}

#[test]
fn a_uffd_made_in_another_process_is_refused_and_others_are_still_served() {
    require_root_and_uffd();
    let dir = TestDir::new("hostile-foreign");
    let d = UmmDaemon::start_with(&dir, "daemon", dir.join("umm.sock"), &[]);

    let (fd, helper, _keep) = foreign_uffd();
    let helper_pid = helper.0.id();
    let s = d.connect(DROP_WAIT);
    let f = frame(
        VERSION,
        KIND_HELLO,
        &hello(std::process::id(), HELLO_HAS_UFFD, "/bin/foreign-uffd"),
    );
    let n = umm::sys::socket::send_with_fds_blocking(s.as_fd(), &f, &[fd.as_fd()])
        .expect("send Hello with the foreign uffd");
    assert_eq!(n, f.len());
    drop(fd);
    let nack = read_until_dropped(s, "a foreign uffd");
    let (code, reason) = nack.expect("the daemon answers a refused peer with a Nack");
    assert_eq!(code, NACK_BAD_FD, "{reason}");
    assert!(reason.contains("another process"), "{reason}");
    assert_eq!(
        registered_vmas(helper_pid),
        0,
        "nothing of the process that made the uffd was registered"
    );

    // Everyone else is still served.
    let (ok, p) = run_to_ok(
        &dir,
        "registered",
        "registered",
        d.served(target("registered"), &[]),
    );
    assert_all_registered(&ok, &p);
    drop(helper);

    let (report, log) = d.stop_with_log();
    let ctx = format!(
        "{}\n--- daemon log ---\n{}",
        report.pretty(),
        tail(&log, 30)
    );
    let me = std::process::id();
    assert!(
        log.lines().any(|l| l.contains(&format!("peer pid {me} "))
            && l.contains("refused")
            && l.contains("made in another process")),
        "one log line names the peer and why it was refused\n{ctx}"
    );
    assert_eq!(report.u64("refused"), 1, "{ctx}");
    assert_eq!(report.u64("handoffs"), 1, "only the real target\n{ctx}");
    assert!(
        report.u64("pages_served") >= ok.u64("min_served"),
        "the real target was served\n{ctx}"
    );
}

const SETPRIV: [&str; 2] = ["setpriv", "--clear-groups"];

/// `setpriv` as `uid` (gid the same), with `caps` ambient (e.g. "+dac_override"), running
/// `exe args` with the agent preloaded for `socket` if given (not into setpriv itself, which
/// runs as root), and `UMM_REQUIRE=1` if `require`.
fn as_uid(
    uid: u32,
    caps: Option<&str>,
    agent: Option<(&Path, bool)>,
    exe: &Path,
    args: &[&str],
) -> Command {
    let mut c = Command::new(SETPRIV[0]);
    c.arg(SETPRIV[1])
        .arg("--reuid")
        .arg(uid.to_string())
        .arg("--regid")
        .arg(uid.to_string());
    if let Some(caps) = caps {
        c.args(["--inh-caps", caps, "--ambient-caps", caps]);
    }
    if let Some((socket, require)) = agent {
        c.arg("/usr/bin/env")
            .arg(format!("LD_PRELOAD={}", agent_lib().display()))
            .arg(format!("UMM_SOCKET={}", socket.display()));
        if require {
            c.arg("UMM_REQUIRE=1");
        }
    }
    c.arg(exe).args(args);
    c
}

/// Copy targets where any uid can run them; returns their paths.
fn public_targets(dir: &TestDir, names: &[&str]) -> Vec<PathBuf> {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod bin");
    names
        .iter()
        .map(|n| {
            let dst = bin.join(n);
            fs::copy(target(n), &dst).expect("copy target");
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod");
            dst
        })
        .collect()
}

fn unprivileged_userfaultfd_is_off() {
    let v = fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    assert_eq!(
        v.trim(),
        "0",
        "these tests need vm.unprivileged_userfaultfd=0 (an unprivileged target must not be \
         able to make its own uffd)"
    );
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn acl_users(p: &Path) -> Vec<(u32, u16)> {
    match umm::sys::acl::get_access_acl(p) {
        Ok(v) => umm::sys::acl::AccessAcl::decode_users(&v).expect("an ACL"),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => vec![],
        Err(e) => panic!("getxattr {}: {e}", p.display()),
    }
}

/// Lines of a target's stderr that the agent wrote.
fn agent_lines(p: &Proc) -> Vec<String> {
    p.stderr()
        .lines()
        .filter(|l| l.contains("umm"))
        .map(str::to_string)
        .collect()
}

/// Python, on a connection to the daemon as stdin: make a uffd (user-mode-only: an
/// unprivileged process can), hand it over in a Hello, print the reply.
const INHERITED_PEER: &str = "\
import ctypes, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK | 1)
assert fd >= 0, ctypes.get_errno()
s = socket.socket(fileno=0)
exe = b'/inherited'
hello = struct.pack('<HHIIH', 1, 1, os.getpid(), 1, len(exe)) + exe
socket.send_fds(s, [struct.pack('<I', len(hello)) + hello], [fd])
s.settimeout(60)
r = b''
while True:
    b = s.recv(4096)
    if not b:
        break
    r += b
kind, code, n = struct.unpack('<HHH', r[6:12])
print('NACK' if kind == 0x102 else hex(kind), 'code=%d' % code, r[12:12 + n].decode())
";

#[test]
fn allow_uid_admits_exactly_that_uid_and_peercred_refuses_the_rest() {
    require_root_and_uffd();
    unprivileged_userfaultfd_is_off();
    let dir = TestDir::new("hostile-uids");
    let exes = public_targets(&dir, &["forkstorm"]);
    let sock = dir.join("run/umm.sock");
    let d = UmmDaemon::start_with(
        &dir,
        "daemon",
        sock.clone(),
        &["--allow-uid", "65534", "--grant-device"],
    );
    // Owner only, plus exactly uid 65534 (search on the directory, read-write on the socket).
    let run_dir = dir.join("run");
    assert_eq!(mode(&run_dir) & 0o707, 0o700, "directory mode");
    assert_eq!(acl_users(&run_dir), vec![(65534, 1)], "directory ACL");
    assert_eq!(mode(&sock) & 0o707, 0o600, "socket mode");
    assert_eq!(acl_users(&sock), vec![(65534, 6)], "socket ACL");

    // Native run for the checksum.
    let args = ["32", "8"];
    let (native, _) = run_to_ok(
        &dir,
        "native",
        "forkstorm",
        as_uid(65534, None, None, &exes[0], &args),
    );

    // uid 65534 is admitted and, with the grant, served.
    let c = as_uid(65534, None, Some((&sock, true)), &exes[0], &args);
    let (ok, p) = run_to_ok(&dir, "uid-65534", "forkstorm", c);
    assert_eq!(ok.u64("uid"), 65534);
    assert_eq!(ok.checksum(), native.checksum());
    assert_all_registered(&ok, &p);

    // uid 65533 cannot even connect: it runs unmanaged, with the agent's one warning line.
    let c = as_uid(65533, None, Some((&sock, false)), &exes[0], &args);
    let (ok_other, p) = run_to_ok(&dir, "uid-65533", "forkstorm", c);
    assert_eq!(ok_other.u64("uid"), 65533);
    assert_eq!(ok_other.checksum(), native.checksum());
    assert_eq!(ok_other.registered().0, 0, "uid 65533 was not managed");
    let lines = agent_lines(&p);
    assert!(
        lines.len() == 1
            && lines[0].contains("Permission denied")
            && lines[0].contains("running unmanaged"),
        "one warning line saying why: {lines:?}"
    );

    // uid 65533 past the file permissions (CAP_DAC_OVERRIDE): SO_PEERCRED refuses it.
    let c = as_uid(
        65533,
        Some("+dac_override"),
        Some((&sock, true)),
        &exes[0],
        &args,
    );
    let mut p = Proc::spawn(&dir, "uid-65533-dac", c);
    let st = p.wait_bounded(LIMIT);
    p.assert_group_gone();
    assert_eq!(
        st.code(),
        Some(1),
        "the agent (UMM_REQUIRE=1) exits 1 when refused\n{}",
        p.context()
    );
    assert!(
        p.stderr().contains("uid 65533 is not allowed"),
        "the agent says why\n{}",
        p.context()
    );

    // uid 65533 with a connection root made (an inherited connected fd): SO_PEERCRED names
    // root, so the uid check passes, but the uffd it hands over (UFFD_USER_MODE_ONLY, all
    // it can make) is not the connector's: refused.
    let conn = UnixStream::connect(&sock).expect("connect as root");
    let mut c = as_uid(
        65533,
        None,
        None,
        Path::new(PYTHON),
        &["-c", INHERITED_PEER],
    );
    c.stdin(Stdio::from(OwnedFd::from(conn)))
        .stdout(Stdio::piped())
        .process_group(0);
    let mut helper = Helper(c.spawn().expect("spawn python as uid 65533"));
    let mut reply = String::new();
    helper
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut reply)
        .expect("read python's output");
    assert!(
        reply.contains("NACK code=3") && reply.contains("another process"),
        "the uffd of the process holding an inherited connection is refused: {reply}"
    );
    drop(helper);

    let (report, log) = d.stop_with_log();
    let ctx = format!(
        "{}\n--- daemon log ---\n{}",
        report.pretty(),
        tail(&log, 30)
    );
    assert!(
        log.lines()
            .any(|l| l.contains("uid 65533") && l.contains("refused: uid 65533 is not allowed")),
        "the daemon logs the refusal\n{ctx}"
    );
    assert_eq!(report.u64("refused"), 2, "{ctx}");
    let forks = ok.u64("children") + ok.u64("grandchildren");
    assert_eq!(report.u64("handoffs"), 1, "uid 65534's target alone\n{ctx}");
    assert!(report.u64("events.fork") >= forks, "{ctx}");
    assert!(
        report.u64("pages_served") >= ok.u64("min_served"),
        "uid 65534's memory was served by the daemon\n{ctx}"
    );
}

#[test]
fn without_grant_device_an_unprivileged_target_runs_on_plain_memory() {
    require_root_and_uffd();
    unprivileged_userfaultfd_is_off();
    let dir = TestDir::new("hostile-nogrant");
    let exes = public_targets(&dir, &["forkstorm"]);
    let sock = dir.join("run/umm.sock");
    let d = UmmDaemon::start_with(&dir, "daemon", sock.clone(), &["--allow-uid", "65534"]);
    let args = ["32", "8"];
    let (native, _) = run_to_ok(
        &dir,
        "native",
        "forkstorm",
        as_uid(65534, None, None, &exes[0], &args),
    );
    let c = as_uid(65534, None, Some((&sock, false)), &exes[0], &args);
    let (ok, p) = run_to_ok(&dir, "uid-65534", "forkstorm", c);
    assert_eq!(ok.checksum(), native.checksum());
    assert_eq!(ok.registered().0, 0, "not managed without the grant");
    let lines = agent_lines(&p);
    assert!(
        lines.len() == 1 && lines[0].contains("--grant-device") && lines[0].contains("unmanaged"),
        "one line says it runs unmanaged, and why: {lines:?}"
    );
    let (report, log) = d.stop_with_log();
    let ctx = format!(
        "{}\n--- daemon log ---\n{}",
        report.pretty(),
        tail(&log, 30)
    );
    assert_eq!(
        report.u64("refused"),
        1,
        "the grant request was refused\n{ctx}"
    );
    assert_eq!(report.u64("handoffs"), 0, "{ctx}");
    assert_eq!(report.u64("pages_served"), 0, "{ctx}");
}

#[test]
fn socket_directories_anyone_may_write_are_refused_unless_sticky() {
    require_root_and_uffd();
    let dir = TestDir::new("hostile-sockdir");
    let open = dir.join("open");
    fs::create_dir(&open).expect("mkdir");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod 0777");
    let sock = open.join("umm.sock");
    let report = dir.join("refused.json");
    let mut p = Proc::spawn(&dir, "refused", daemon_command(&dir, &sock, &report, &[]));
    let st = p.wait_bounded(Duration::from_secs(60));
    assert!(
        !st.success(),
        "umm daemon accepted a 0777 directory\n{}",
        p.context()
    );
    let err: Vec<String> = p.stderr().lines().map(str::to_string).collect();
    assert!(
        err.len() == 1 && err[0].contains("world-writable without the sticky bit"),
        "one clear line: {err:?}"
    );
    assert!(!sock.exists(), "no socket was created");

    // /tmp-like (sticky): accepted; no --allow-uid: the socket is the owner's alone.
    let sticky = dir.join("sticky");
    fs::create_dir(&sticky).expect("mkdir");
    fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).expect("chmod 1777");
    let d = UmmDaemon::start_with(&dir, "sticky", sticky.join("umm.sock"), &[]);
    assert_eq!(mode(&d.sock), 0o600);
    assert_eq!(acl_users(&d.sock), vec![]);
    d.stop_with_log();

    // A directory umm creates is 0700.
    let d = UmmDaemon::start_with(&dir, "created", dir.join("new/run/umm.sock"), &[]);
    assert_eq!(mode(&dir.join("new/run")), 0o700);
    assert_eq!(mode(&d.sock), 0o600);
    d.stop_with_log();
}

#[test]
fn bad_frames_and_many_slow_peers_never_block_the_loop_and_memory_stays_bounded() {
    require_root_and_uffd();
    let dir = TestDir::new("hostile-frames");
    let mut d = UmmDaemon::start_with(&dir, "daemon", dir.join("umm.sock"), &[]);
    let pid = d.proc.pid;
    let fds_idle = fd_count(pid);

    // An oversized frame: refused as soon as its length is read.
    let mut s = d.connect(DROP_WAIT);
    let mut big = frame(
        VERSION,
        KIND_HELLO,
        &hello(std::process::id(), HELLO_WANT_GRANT, "/bin/big"),
    );
    big[..4].copy_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
    s.write_all(&big).expect("write");
    let nack = read_until_dropped(s, "an oversized frame").expect("a Nack");
    assert!(nack.1.contains("exceeds the maximum"), "{nack:?}");

    // A Restore-sized frame to a daemon that serves no restores: refused the same way.
    let mut s = d.connect(DROP_WAIT);
    let mut restore = frame(VERSION, KIND_RESTORE, &[]);
    restore[..4].copy_from_slice(&60_000u32.to_le_bytes());
    s.write_all(&restore).expect("write");
    let nack = read_until_dropped(s, "a restore frame").expect("a Nack");
    assert!(nack.1.contains("at most"), "{nack:?}");

    // A truncated frame, then close.
    let mut s = d.connect(DROP_WAIT);
    let f = frame(
        VERSION,
        KIND_HELLO,
        &hello(std::process::id(), HELLO_WANT_GRANT, "/bin/truncated"),
    );
    s.write_all(&f[..f.len() - 3]).expect("write");
    drop(s);
    // Every one of them is closed by now (bounded wait: closing is asynchronous).
    let closed = poll_until(400, Duration::from_millis(50), || fd_count(pid) == fds_idle);
    assert!(
        closed,
        "the daemon still holds {} fds after three bad peers, {fds_idle} before\n{}",
        fd_count(pid),
        d.proc.context()
    );

    // Slow-loris peers: each sends all of a maximal frame but its last byte and waits.
    let peers = 120;
    let fds_before = fds_idle;
    let rss_before = rss_kib(d.pid());
    let mut slow: Vec<UnixStream> = Vec::new();
    let mut partial = frame(
        VERSION,
        KIND_HELLO,
        &hello(std::process::id(), HELLO_WANT_GRANT, "/bin/slow"),
    );
    partial[..4].copy_from_slice(&(MAX_FRAME as u32).to_le_bytes());
    partial.resize(MAX_FRAME + 4 - 1, b'x');
    for _ in 0..peers {
        let mut s = d.connect(DROP_WAIT);
        s.write_all(&partial).expect("write a partial frame");
        slow.push(s);
    }
    // The daemon reads what they sent (its fd count shows them all accepted).
    let all_in = poll_until(400, Duration::from_millis(50), || {
        fd_count(pid) >= fds_before + peers
    });
    assert!(all_in, "the daemon never accepted {peers} peers");
    // While they sit there, a real target is served normally.
    let (ok, p) = run_to_ok(
        &dir,
        "registered",
        "registered",
        d.served(target("registered"), &[]),
    );
    assert_all_registered(&ok, &p);
    d.assert_alive("slow peers");
    let rss_with_peers = rss_kib(d.pid());
    // Each peer's buffer holds at most one frame (the read buffer may double it once), plus
    // its bookkeeping; 8 MiB of slack for the served target's model and the allocator.
    let per_peer_kib = (4 * (MAX_FRAME as u64 + 4) + 1024) / 1024;
    let bound = rss_before + peers as u64 * per_peer_kib + 8 * 1024;
    eprintln!("daemon RSS: {rss_before} KiB before, {rss_with_peers} KiB with {peers} slow peers and a served target, bound {bound} KiB");
    assert!(
        rss_with_peers <= bound,
        "daemon RSS {rss_with_peers} KiB with {peers} slow peers, bound {bound} KiB \
         (before: {rss_before} KiB)\n{}",
        d.proc.context()
    );
    // The handshake deadline drops every one of them, with a Nack.
    for s in slow {
        let nack = read_until_dropped(s, "a slow peer").expect("a Nack");
        assert!(nack.1.contains("handshake not finished"), "{nack:?}");
    }

    let (report, log) = d.stop_with_log();
    let ctx = format!(
        "{}\n--- daemon log ---\n{}",
        report.pretty(),
        tail(&log, 20)
    );
    assert!(
        log.contains("exceeds the maximum")
            && (log.contains("disconnected during the handshake") || log.contains("read failed")),
        "log lines for the oversized and the truncated frame\n{ctx}"
    );
    assert_eq!(
        log.matches("handshake not finished").count(),
        peers,
        "one line per slow peer\n{ctx}"
    );
    assert!(
        report.u64("protocol_errors") >= peers as u64 + 3,
        "every bad peer is counted\n{ctx}"
    );
    assert_eq!(report.u64("handoffs"), 1, "{ctx}");
    assert!(report.u64("pages_served") >= ok.u64("min_served"), "{ctx}");
}

/// A cgroup of the v1 `memory` controller (this machine's cgroup v2 has no memory
/// controller), child of this process's own; removed on drop (its processes gone by then).
struct MemCgroup {
    dir: PathBuf,
}

impl MemCgroup {
    fn new(name: &str) -> MemCgroup {
        let own = fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .unwrap_or_else(|| {
                panic!("no cgroup v1 memory controller for this process (/proc/self/cgroup: {own})")
            });
        let base = PathBuf::from("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
        let dir = base.join(format!("umm-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        MemCgroup { dir }
    }

    fn write(&self, file: &str, value: &str) {
        fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {}/{file}: {e}", self.dir.display()));
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("could not remove the cgroup {}", self.dir.display());
    }
}

#[test]
fn memory_cgroup_limit_during_a_fill_gives_up_and_fails_open_in_track_mode() {
    require_root_and_uffd();
    let dir = TestDir::new("hostile-memcg");
    let hog = target("memhog");
    let argv = [hog.to_string_lossy().into_owned(), "64".to_string()];
    let native = run_native(&dir, "native", &argv, &[], LIMIT).ok_line("memhog");
    // memhog reads 64 MiB of fresh memory (each read fault reaches the manager without a
    // charge), then writes it. Its cgroup allows 24 MiB and has the OOM killer off, so the
    // manager's UFFDIO_COPY, charged to the target's cgroup, fails with ENOMEM. (With the OOM
    // killer on, the kernel kills the target during the copy instead: exit 137, seen here.)
    let cg = MemCgroup::new("track");
    cg.write("memory.limit_in_bytes", &(24 * MIB).to_string());
    cg.write("memory.oom_control", "1");
    let script = format!(
        "echo $$ > '{}' && exec '{}' 64",
        cg.procs().display(),
        hog.display()
    );
    let (mut c, report_path) = umm_run_command(&dir, "run", &["/bin/sh", "-c", &script]);
    c.env("RUST_LOG", "info");
    let mut p = Proc::spawn(&dir, "run", c);
    let gave_up = poll_until(1200, Duration::from_millis(100), || {
        p.stderr().contains("giving up on this address space") || p.try_wait().is_some()
    });
    assert!(
        gave_up && p.try_wait().is_none(),
        "the manager never gave up on the failing copies\n{}",
        p.context()
    );
    let log = p.stderr();
    assert!(
        log.contains("ENOMEM") && log.contains("will retry"),
        "the copies failed with ENOMEM and were retried\n{}",
        p.context()
    );
    // Fail-open: the uffd is closed; the target goes on with normal memory: its reads get
    // the kernel's zero page, its writes wait for memory (as they would without umm) until
    // the cgroup lets them.
    cg.write("memory.limit_in_bytes", "-1");
    cg.write("memory.oom_control", "0");
    let st = p.wait_bounded(LIMIT);
    p.assert_group_gone();
    assert!(st.success(), "umm run: {}\n{}", describe(&st), p.context());
    let ok = OkLine::find(&p.stdout(), "memhog")
        .unwrap_or_else(|| panic!("no OK line\n{}", p.context()));
    assert_eq!(ok.checksum(), native.checksum(), "the data is intact");
    assert_eq!(
        ok.registered(),
        (1, 1),
        "the memory was registered at first"
    );
    let report = Report::load(&report_path).expect("report");
    let ctx = format!("{}\n{}", report.pretty(), p.context());
    assert_eq!(report.u64("abandoned"), 1, "{ctx}");
    assert!(
        report.u64("pages_served") >= 1024,
        "served until the limit\n{ctx}"
    );
    assert!(
        report.u64("pages_served") < ok.u64("min_served"),
        "not everything was served by umm: it gave up\n{ctx}"
    );
}

/// An image of `richstate build SEED` by `umm snapshot`.
fn richstate_image(dir: &TestDir) -> PathBuf {
    let img = dir.join("img");
    snapshot_richstate(dir, SEED, &img);
    img
}

const SEED: &str = "0x5eed";

#[test]
fn memory_cgroup_limit_during_a_restore_stops_the_restore_and_no_zero_page_is_seen() {
    require_root_and_uffd();
    let dir = TestDir::new("hostile-memcg-restore");
    let img = richstate_image(&dir);
    // The restorer and its children live in a cgroup far too small for the image's data,
    // with the OOM killer off: the manager's copies (faults and background fill) fail with
    // ENOMEM. Restore mode must stop the process (fail-stop), never hand out zero pages.
    // On a loaded machine the restorer can fail under the limit on its own first (its own
    // allocations and the kernel's writes into its missing pages are charged before the
    // manager sees a fault): such an attempt (checked for wrong pages all the same) proves
    // nothing about the manager's ENOMEM path and is repeated, a few times at most.
    for attempt in 1..=4 {
        if memcg_restore_attempt(&dir, &img, attempt) {
            return;
        }
        eprintln!("attempt {attempt}: no copy met the limit (the restorer failed first); again");
    }
    panic!("in 4 attempts no copy of the manager met the 8 MiB limit");
}

/// One restore under the 8 MiB limit; false if no copy of the manager failed with ENOMEM.
fn memcg_restore_attempt(dir: &TestDir, img: &Path, attempt: u32) -> bool {
    let cg = MemCgroup::new(&format!("restore{attempt}"));
    cg.write("memory.limit_in_bytes", &(8 * MIB).to_string());
    cg.write("memory.oom_control", "1");
    let script = format!(
        "echo $$ > '{}' && exec '{}' restore {SEED} '{}'",
        cg.procs().display(),
        target("richstate").display(),
        img.display()
    );
    let report = dir.join(format!("restore{attempt}.json"));
    let mut c = Command::new(umm_bin());
    c.arg("restore")
        .arg("--image")
        .arg(img)
        .arg("--report")
        .arg(&report)
        .args(["--", "/bin/sh", "-c", &script])
        .env("UMM_AGENT", agent_lib())
        .env("RUST_LOG", "info")
        .env_remove("UMM_SOCKET")
        .env_remove("LD_PRELOAD")
        .current_dir(dir.path());
    let mut p = Proc::spawn(dir, &format!("restore{attempt}"), c);
    let st = p.wait_bounded(LIMIT);
    p.assert_group_gone();
    // Let the (killed) restorer's cgroup go before it is removed.
    cg.write("memory.oom_control", "0");
    let out = p.stdout();
    assert!(
        !st.success(),
        "umm restore succeeded under an 8 MiB limit\n{}",
        p.context()
    );
    // The restorer's own system calls may fail under its limit (ENOMEM; EFAULT when the
    // kernel writes into a missing page: the charge comes before the fault reaches the
    // manager); what must never happen is a page that reads anything but its data.
    let wrong: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.contains("zero page where data belonged")
                || l.contains("wrong data")
                || l.contains("stale or foreign data")
        })
        .collect();
    assert!(
        !out.contains("OK richstate") && wrong.is_empty(),
        "the restorer was stopped before it could finish or see a wrong page: {wrong:?}\n{}",
        p.context()
    );
    let log = p.stderr();
    if !log.contains("ENOMEM") {
        // No copy of the manager's met the limit: the restorer failed on its own first.
        return false;
    }
    assert!(
        log.contains("ENOMEM")
            && (log.contains("killing it: it cannot run without its memory")
                || log.contains("stopping the restore: the restored processes are killed")),
        "the copies failed with ENOMEM, then the restore was stopped\n{}",
        p.context()
    );
    let report = Report::load(&report).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    let ctx = format!("{}\n{}", report.pretty(), p.context());
    assert!(report.u64("abandoned") >= 1, "{ctx}");
    assert!(report.u64("restore.killed") >= 1, "{ctx}");
    assert!(
        report.get("restore.failed").is_some_and(|v| v.is_string()),
        "{ctx}"
    );
    true
}
