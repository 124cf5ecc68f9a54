//! The keeper: fail-stop for lazy restores (DESIGN.md, "Failure policy").
//!
//! Restored memory exists nowhere but in the image: if the manager dies, a process must never
//! go on reading zero pages where its data belonged. The keeper is a tiny separate process
//! (`umm __keeper`, in its own session, OOM-exempt) that holds a duplicate of every uffd of a
//! restore — forked children's too, as they arrive. While it holds them, a fault on missing
//! memory blocks instead of reading zeros. When its connection to the manager closes with uffds
//! still held, the manager died mid-restore: the keeper kills the restored processes (the
//! restore's cgroup, when there is one, and every pid it was told), then exits.
//!
//! Wire (a SOCK_SEQPACKET pair, one message per packet): `kind:u8 key:u64le pid:u32le`, with
//! one fd attached to HOLD. Kinds: HOLD (keep this uffd), PID (the space `key` belongs to
//! process `pid`), RELEASE (the space completed or is gone: close its uffd).

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use umm::sys::socket;

const HOLD: u8 = 1;
const PID: u8 = 2;
const RELEASE: u8 = 3;
const MSG_LEN: usize = 13;

/// The manager's end.
pub struct Keeper {
    sock: OwnedFd,
    child: Child,
}

impl Keeper {
    /// Start `umm __keeper` (this very binary). `cgroup`: the restore's cgroup directory, which
    /// the keeper kills as a whole.
    pub fn spawn(cgroup: Option<&PathBuf>) -> io::Result<Keeper> {
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // The keeper's end must survive its exec; ours must not leak into other children.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("__keeper")
            .arg("--fd")
            .arg(theirs.as_raw_fd().to_string());
        if let Some(cg) = cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        let child = umm::sys::process::spawn_unblocked(&mut cmd)?;
        drop(theirs);
        // Messages to the keeper must not be lost (a lost RELEASE would make it kill a
        // completed process later), nor block the loop for long: wait up to a second.
        nix::sys::socket::setsockopt(
            &mine,
            nix::sys::socket::sockopt::SendTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )?;
        Ok(Keeper { sock: mine, child })
    }

    fn send(&self, kind: u8, key: u64, pid: u32, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut msg = [0u8; MSG_LEN];
        msg[0] = kind;
        msg[1..9].copy_from_slice(&key.to_le_bytes());
        msg[9..13].copy_from_slice(&pid.to_le_bytes());
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        socket::send_with_fds_blocking(self.sock.as_fd(), &msg, &fds).map(|_| ())
    }

    /// Keep a duplicate of this space's uffd.
    pub fn hold(&self, key: u64, uffd: BorrowedFd<'_>) -> io::Result<()> {
        self.send(HOLD, key, 0, Some(uffd))
    }

    pub fn pid(&self, key: u64, pid: u32) -> io::Result<()> {
        self.send(PID, key, pid, None)
    }

    pub fn release(&self, key: u64) -> io::Result<()> {
        self.send(RELEASE, key, 0, None)
    }

    /// Orderly end: everything was released; close the connection and reap the keeper.
    pub fn finish(mut self) {
        drop(self.sock);
        let _ = self.child.wait();
    }
}

/// `umm __keeper --fd N [--cgroup DIR]`: the keeper process's main. Never returns.
pub fn main(fd: RawFd, cgroup: Option<PathBuf>) -> ! {
    // Out of the manager's session and process group (a signal to the group must not take
    // the keeper with the manager), and never the OOM killer's first choice.
    let _ = nix::unistd::setsid();
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGPIPE,
    ] {
        let _ = umm::sys::process::ignore_signal(sig);
    }
    let sock = match umm::sys::fd::take_inherited(fd) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("umm keeper: no connection to the manager on fd {fd}: {e}");
            std::process::exit(1);
        }
    };
    let mut held: HashMap<u64, OwnedFd> = HashMap::new();
    let mut pids: HashMap<u64, u32> = HashMap::new();
    let mut buf = [0u8; 64];
    loop {
        match socket::recv_with_fds_blocking(sock.as_fd(), &mut buf) {
            Ok(got) if got.len == 0 => break,
            Ok(got) if got.len == MSG_LEN => {
                let key = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
                let pid = u32::from_le_bytes(buf[9..13].try_into().expect("4 bytes"));
                let mut fds = got.fds.into_iter();
                match buf[0] {
                    HOLD => {
                        if let Some(fd) = fds.next() {
                            held.insert(key, fd);
                        }
                    }
                    PID => {
                        pids.insert(key, pid);
                    }
                    RELEASE => {
                        held.remove(&key);
                        pids.remove(&key);
                    }
                    _ => {}
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if !held.is_empty() {
        eprintln!(
            "umm keeper: the manager stopped with {} restored address space(s) unfinished; \
             killing the restored processes so none runs on missing memory",
            held.len()
        );
        let targets: HashSet<u32> = pids.values().copied().collect();
        kill_restored(cgroup.as_ref(), &targets);
    }
    if let Some(cg) = &cgroup {
        remove_cgroup(cg);
    }
    std::process::exit(0);
}

/// Remove the restore's cgroup, moving what still runs in it (completed restores) back to its
/// parent first; killed processes may take a moment to leave it.
pub fn remove_cgroup(dir: &std::path::Path) {
    let Some(parent) = dir.parent() else {
        return;
    };
    for _ in 0..200 {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    eprintln!("umm keeper: cannot remove the cgroup {}", dir.display());
}

/// SIGKILL everything the restore owns: the cgroup as a whole (`cgroup.kill`), then every
/// known pid and their descendants (a restore without a cgroup, or processes outside it).
pub fn kill_restored(cgroup: Option<&PathBuf>, pids: &HashSet<u32>) {
    if let Some(cg) = cgroup {
        if let Err(e) = std::fs::write(cg.join("cgroup.kill"), "1") {
            eprintln!("umm: cannot kill cgroup {}: {e}", cg.display());
        }
    }
    let mut all: Vec<u32> = pids.iter().copied().collect();
    let mut i = 0;
    while i < all.len() {
        if let Ok(kids) = umm::sys::proc::children(all[i]) {
            for k in kids {
                if !all.contains(&k) {
                    all.push(k);
                }
            }
        }
        i += 1;
    }
    for pid in all {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
