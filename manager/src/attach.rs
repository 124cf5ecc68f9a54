//! `umm attach PID` and `umm detach PID`: manage a process that is already running, without
//! the agent.
//!
//! Attach: the process is frozen with ptrace, made to call `userfaultfd(O_CLOEXEC|O_NONBLOCK)`
//! ([`umm::sys::inject`]), the new fd is copied out with `pidfd_getfd`, closed in the process,
//! and the process is released with its registers exactly as they were. From there the fd
//! takes the agent's path: mm check, UFFDIO_API with the non-cooperative events, registration
//! from its maps, rescans. All of that happens before the loop serves anything (foreground)
//! or on a helper thread (`umm daemon`): the loop never waits on a stopped process.
//!
//! A process that may not open a userfaultfd itself (not root, `vm.unprivileged_userfaultfd=0`)
//! gets EPERM. Without `--grant-device` (the daemon's, or `umm attach --grant-device`) it is
//! refused; with it, the process is handed a `/dev/userfaultfd` fd ([`Injector::give_fd`]:
//! an injected socketpair and recvmsg), made to call `ioctl(USERFAULTFD_IOC_NEW)` on it, and
//! both fds are closed in it again: it keeps no grant after the attach.
//!
//! Detach: every registered range of the process, and of the children it forked since the
//! attach (their uffds exist only in the manager), is unregistered and the uffds are closed:
//! the processes go on with plain memory. A foreground attach detaches on SIGINT/SIGTERM or a
//! `detach PID` request on its `--serve-control` socket, and ends when the process exits (or
//! execs: a new program has a new mm that nobody hands over).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::Signal;

use umm::layout::Layout;
use umm::sys::inject::{self, Injector};
use umm::sys::ptrace::Frozen;
use umm::sys::{fd as sysfd, proc, process};
use umm::uffd::abi::USERFAULTFD_IOC_NEW;
use umm::uffd::{Features, Uffd};

use crate::manager::{self, event_for, Manager, Policy, Shutdown};
use crate::slab::{Id, Token};
use crate::space::{FaultAround, Origin, Space};
use crate::CommonArgs;

/// How long every thread of the target gets to stop.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Args, Debug)]
pub struct AttachArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The process to manage.
    pid: u32,
    /// Do not serve here: ask the manager behind this control socket (`umm daemon`'s) to
    /// attach.
    #[arg(long, value_name = "SOCK")]
    control: Option<PathBuf>,
    /// Answer `stat` and `detach PID` on this unix socket while attached (root and umm's own
    /// uid only).
    #[arg(long, value_name = "PATH", conflicts_with = "control")]
    serve_control: Option<PathBuf>,
    /// If the process may not open a userfaultfd itself (not root, with
    /// vm.unprivileged_userfaultfd=0), hand it a /dev/userfaultfd fd for the attach (it is
    /// closed in the process again at once). A grant, as for `umm daemon --grant-device`.
    #[arg(long, conflicts_with = "control")]
    grant_device: bool,
    /// Leave the process's writable data segments as they are (by default they are replaced
    /// with anonymous copies, so that they can be registered: coverage).
    #[arg(long, conflicts_with = "control")]
    no_copy_data: bool,
    /// Trace the process's mapping calls (ptrace, every thread and forked child) and register
    /// each new private anonymous mapping, brk growth and mremap before the call returns:
    /// coverage from the first touch, at the cost of a stop per system call. With
    /// --control, the daemon runs the tracer.
    #[arg(long)]
    strict: bool,
    /// No summary on stderr.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args, Debug)]
pub struct DetachArgs {
    /// The process to let go of.
    pid: u32,
    /// The control socket of the manager that holds it (`umm daemon`'s, or `umm attach
    /// --serve-control`).
    #[arg(long, value_name = "SOCK", default_value = "/run/umm/umm.sock.ctl")]
    control: PathBuf,
}

pub fn main(args: AttachArgs) -> i32 {
    match attach(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umm: {e}");
            1
        }
    }
}

pub fn detach_main(args: DetachArgs) -> i32 {
    match crate::stat_cmd::ask(&args.control, &format!("detach {}", args.pid)) {
        Ok(answer) => {
            eprint!("umm: {answer}");
            0
        }
        Err(e) => {
            eprintln!("umm: {e}");
            1
        }
    }
}

fn attach(args: AttachArgs) -> Result<i32, String> {
    if let Some(ctl) = &args.control {
        let strict = if args.strict { "--strict " } else { "" };
        let answer = crate::stat_cmd::ask(ctl, &format!("attach {strict}{}", args.pid))?;
        eprint!("umm: {answer}");
        return Ok(0);
    }
    let pid = args.pid;
    check_attachable(pid)?;
    crate::preflight::can_serve()?;
    if let Err(e) = sysfd::raise_fd_limit() {
        log::warn!("cannot raise the fd limit: {e}");
    }
    // Blocked before any thread exists (the coverage sampler), so every thread inherits it.
    let signals = manager::signal_fd(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP])
        .map_err(|e| format!("signalfd: {e}"))?;
    // Always: an `attach --strict PID` may come through --serve-control too.
    crate::strict::block_sigchld()?;
    let opts = AttachOptions {
        grant: args.grant_device,
        copy_data: !args.no_copy_data,
    };
    let uffd = open_uffd_in(pid, opts)?;
    // Nobody connects to this socket: the loop needs a listener, agents are not expected.
    let rt = crate::run::RuntimeDir::create()?;
    let listener = UnixListener::bind(&rt.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", rt.socket.display()))?;
    std::fs::set_permissions(&rt.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", rt.socket.display()))?;
    let cfg = args.common.config(Policy::Uids(vec![]), args.grant_device);
    let mut mgr = Manager::new(listener, cfg, Some(signals))
        .map_err(|e| format!("cannot start the manager: {e}"))?;
    mgr.sigchld_blocked = true;
    let (control, _control_file) = crate::control::open(args.serve_control.as_deref(), None)?;
    if let Some(c) = control {
        mgr.attach_control(c)
            .map_err(|e| format!("cannot serve the control socket: {e}"))?;
    }
    if args.strict {
        // Fail-open: without the tracer the attach still works, with rescans.
        match mgr.start_strict(pid) {
            Ok(()) => log::info!("pid {pid}: strict mode: tracing its mapping calls"),
            Err(e) => log::warn!("pid {pid}: no strict mode: {e}"),
        }
    }
    let (_, registered) = mgr.adopt_attached(pid, uffd)?;
    log::info!(
        "pid {pid}: attached, {} registered",
        crate::stats::human_bytes(registered)
    );
    mgr.attached = Some(pid);
    let shutdown = mgr.run().map_err(|e| format!("event loop failed: {e}"))?;
    match shutdown {
        Shutdown::Signal(sig) => log::info!("signal {sig}: detaching from pid {pid}"),
        _ => log::info!("pid {pid}: gone or detached"),
    }
    mgr.detach_all();
    let live = mgr.live_spaces();
    mgr.finish();
    let report = mgr.stats().report(live, None);
    if let Some(path) = &args.common.report {
        crate::daemon::write_report(path, &report);
    }
    if !args.quiet {
        eprintln!("{}", report.summary());
    }
    Ok(0)
}

/// The refusals that need no ptrace: one line each, saying why.
pub fn check_attachable(pid: u32) -> Result<(), String> {
    umm::sys::ptrace::check_target(pid).map_err(|e| e.to_string())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // Field 9 (flags), counted after the command name in parentheses.
    let flags: u64 = stat
        .rfind(')')
        .and_then(|at| stat[at + 1..].split_whitespace().nth(6)?.parse().ok())
        .unwrap_or(0);
    const PF_KTHREAD: u64 = 0x0020_0000;
    if flags & PF_KTHREAD != 0 {
        return Err(format!(
            "pid {pid} is a kernel thread: it has no user memory to manage"
        ));
    }
    let tracer = proc::status_field(pid, "TracerPid")
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    if let Some(&t) = tracer.first().filter(|&&t| t != 0) {
        return Err(format!(
            "pid {pid} is already traced by pid {t} ({}): a process has one tracer at a time",
            proc::exe(t as u32)
        ));
    }
    check_yama(pid)?;
    check_seccomp(pid)?;
    let flags = proc::vm_flags(pid).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            format!(
                "no privilege to attach to pid {pid} (cannot read its smaps): run umm as root \
                 or as its owner with CAP_SYS_PTRACE"
            )
        } else {
            format!("cannot read /proc/{pid}/smaps: {e}")
        }
    })?;
    if flags.values().any(|f| f.iter().any(|f| f == "um")) {
        return Err(format!(
            "pid {pid} already has memory registered with a userfaultfd (managed by umm or \
             another userfaultfd user): refusing to attach twice"
        ));
    }
    Ok(())
}

/// A thread under seccomp (strict or a filter) may be killed, or sent SIGSYS, for a system
/// call umm injects (`userfaultfd` is refused by common container profiles): the target would
/// die of the attach. Every thread is checked (filters are per thread).
fn check_seccomp(pid: u32) -> Result<(), String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("cannot list /proc/{pid}/task: {e}"))?;
    for tid in tasks
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let mode = proc::status_field(tid, "Seccomp")
            .ok()
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        if mode != 0 {
            return Err(format!(
                "pid {pid} (thread {tid}) runs under seccomp ({}): a system call umm injects \
                 could be refused by killing it, so it is not attached",
                if mode == 1 { "strict mode" } else { "a filter" }
            ));
        }
    }
    Ok(())
}

/// Yama's ptrace_scope, if the module is there: 3 forbids attaching at all, 2 needs
/// CAP_SYS_PTRACE, 1 needs it too unless the target descends from us.
fn check_yama(pid: u32) -> Result<(), String> {
    let Ok(scope) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") else {
        return Ok(());
    };
    let scope: u32 = scope.trim().parse().unwrap_or(0);
    let cap_ptrace = has_cap_sys_ptrace();
    let refuse = match scope {
        0 => false,
        1 | 2 if cap_ptrace => false,
        1 => !is_descendant(pid),
        _ => true,
    };
    if refuse {
        return Err(format!(
            "Yama ptrace_scope is {scope} (/proc/sys/kernel/yama/ptrace_scope): attaching to \
             pid {pid} is not allowed{}",
            match scope {
                1 | 2 => "; run umm as root (CAP_SYS_PTRACE)",
                _ => "; scope 3 forbids ptrace attach until reboot",
            }
        ));
    }
    Ok(())
}

/// Whether this process has CAP_SYS_PTRACE (bit 19 of CapEff, in hex, in /proc/self/status).
fn has_cap_sys_ptrace() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
            u64::from_str_radix(hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

fn is_descendant(pid: u32) -> bool {
    let me = std::process::id();
    let mut at = pid;
    for _ in 0..4096 {
        if at == me {
            return true;
        }
        match proc::parent_pid(at) {
            Ok(p) if p > 1 => at = p,
            _ => return false,
        }
    }
    false
}

/// Freeze `pid`, make it open a uffd, take a copy, close its own, release it. With `grant`,
/// a process that may not open one itself gets a `/dev/userfaultfd` fd for the moment.
pub fn open_uffd_in(pid: u32, opts: AttachOptions) -> Result<OwnedFd, String> {
    let mut frozen = Frozen::freeze(pid, FREEZE_TIMEOUT).map_err(|e| e.to_string())?;
    let got = inject_userfaultfd(&mut frozen, opts);
    let released = frozen.resume();
    let fd = got?;
    released.map_err(|e| format!("releasing pid {pid}: {e}"))?;
    Ok(fd)
}

const UFFD_FLAGS: u64 = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;

/// Writable private file mappings larger than this are not copied (a program's own private
/// mapping of a big file, not a data segment).
const MAX_DATA_COPY: u64 = 16 << 20;

/// What the attach does to the process besides making its uffd.
#[derive(Clone, Copy, Debug)]
pub struct AttachOptions {
    /// Hand it `/dev/userfaultfd` if it may not open a uffd itself.
    pub grant: bool,
    /// Replace its writable data segments with anonymous copies (see [`copy_data_segments`]).
    pub copy_data: bool,
}

/// The writable data of the executable and its libraries (`.data`, `.bss` pages in the file's
/// last page) are private *file* mappings: pages written there count as anonymous memory
/// (smaps `Anonymous:`) but no uffd can register them (EINVAL). In a freshly started program
/// they are most of its anonymous memory (python: 1.2 MiB of 3.4 MiB), so coverage would stay
/// low. As the agent does at start, each is replaced with an anonymous copy (all threads are
/// stopped: no write is lost). So is each RELRO part (read-only after relocation, so all
/// anonymous pages too: 0.6 MiB of an idle redis's 4 MiB): the read-only mapping of a file
/// that ends where that file's writable data begins; its copy stays read-only and is
/// registered by [`Manager::register_read_only_copies`]. `/proc/PID/maps` shows the copies
/// without their file name afterwards; a detach does not turn them back. Returns the bytes
/// copied.
fn copy_data_segments(inj: &mut Injector<'_>) -> u64 {
    let pid = inj.pid();
    let Ok(maps) = proc::read_maps(pid) else {
        return 0;
    };
    // Data of loaded objects only (files also mapped executable): a file the program mapped
    // privately itself keeps its file semantics (and may reach past the end of the file).
    let loaded: std::collections::HashSet<&str> = maps
        .iter()
        .filter(|m| m.exec)
        .map(|m| m.path.as_str())
        .collect();
    let file_private = |m: &proc::MapEntry| {
        !m.exec
            && !m.shared
            && m.inode != 0
            && m.path.starts_with('/')
            && loaded.contains(m.path.as_str())
            && m.len() <= MAX_DATA_COPY
    };
    let data = |m: &proc::MapEntry| m.read && m.write && file_private(m);
    let relro = |i: usize| {
        let m = &maps[i];
        m.read
            && !m.write
            && file_private(m)
            && maps
                .get(i + 1)
                .is_some_and(|n| n.start == m.end && n.inode == m.inode && data(n))
    };
    let mut copied = 0;
    for (i, m) in maps.iter().enumerate() {
        let prot = if data(m) {
            libc::PROT_READ | libc::PROT_WRITE
        } else if relro(i) {
            libc::PROT_READ
        } else {
            continue;
        };
        match inj.replace_with_anonymous(m.start, m.end, prot) {
            Ok(()) => copied += m.len(),
            Err(e) => log::info!(
                "pid {pid}: data segment {:#x}-{:#x} of {} stays a file mapping: {e}",
                m.start,
                m.end,
                m.path
            ),
        }
    }
    copied
}

fn inject_userfaultfd(frozen: &mut Frozen, opts: AttachOptions) -> Result<OwnedFd, String> {
    let pid = frozen.pid();
    let pidfd = process::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    let ctx = |e: inject::InjectError| format!("pid {pid}: {e}");
    let mut inj = Injector::new(frozen).map_err(ctx)?;
    let mut made = inj
        .syscall(libc::SYS_userfaultfd, [UFFD_FLAGS, 0, 0, 0, 0, 0])
        .map_err(ctx)?;
    if made == -(libc::EPERM as i64) {
        if !opts.grant {
            return Err(format!(
                "pid {pid} may not open a userfaultfd itself (userfaultfd: EPERM; \
                 vm.unprivileged_userfaultfd=0 and it lacks CAP_SYS_PTRACE): attach with \
                 --grant-device (umm daemon: start it with --grant-device) to hand it \
                 /dev/userfaultfd for the attach"
            ));
        }
        made = uffd_from_granted_device(&mut inj, pidfd.as_fd())?;
    }
    if made < 0 {
        return Err(format!(
            "pid {pid}: its userfaultfd(2) failed: {}",
            std::io::Error::from_raw_os_error(-made as i32)
        ));
    }
    let in_target = made as i32;
    let taken = inject::pidfd_getfd(pidfd.as_fd(), in_target)
        .map_err(|e| format!("pidfd_getfd(pid {pid}, fd {in_target}): {e}"));
    // Its copy goes whatever happened: the process must not keep a uffd it does not know of.
    inj.close_in_target(in_target);
    let taken = taken?;
    if opts.copy_data {
        let copied = copy_data_segments(&mut inj);
        log::debug!("pid {pid}: {copied} bytes of data segments made anonymous");
    }
    inj.finish().map_err(ctx)?;
    Ok(taken)
}

/// The grant path: hand the target a `/dev/userfaultfd` fd, make it call
/// `ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC|O_NONBLOCK)` (the kernel checked permissions
/// when we opened the device; the ioctl checks none), close the device fd in it again.
/// Returns the ioctl's raw result (the new uffd's number in the target, or `-errno`).
fn uffd_from_granted_device(inj: &mut Injector<'_>, pidfd: BorrowedFd<'_>) -> Result<i64, String> {
    let pid = inj.pid();
    let dev = Uffd::open_device()
        .map_err(|e| format!("cannot open /dev/userfaultfd to grant pid {pid}: {e}"))?;
    let dev_in_target = inj
        .give_fd(pidfd, dev.as_fd())
        .map_err(|e| format!("handing /dev/userfaultfd to pid {pid}: {e}"))?;
    let made = inj.syscall(
        libc::SYS_ioctl,
        [
            dev_in_target as u64,
            USERFAULTFD_IOC_NEW,
            UFFD_FLAGS,
            0,
            0,
            0,
        ],
    );
    // The grant lasts only for this call: the process keeps no device fd.
    inj.close_in_target(dev_in_target);
    let made = made.map_err(|e| format!("pid {pid}: {e}"))?;
    if made < 0 {
        return Err(format!(
            "pid {pid}: ioctl(USERFAULTFD_IOC_NEW) on the granted /dev/userfaultfd failed: {}",
            std::io::Error::from_raw_os_error(-made as i32)
        ));
    }
    log::info!(
        "pid {pid}: cannot open a userfaultfd itself; made one from a granted /dev/userfaultfd"
    );
    Ok(made)
}

impl Manager {
    /// Take an attached process's uffd (fresh, made in it by [`open_uffd_in`]): check it is of
    /// the process's mm, enable the events, register its memory, watch it. Returns the space
    /// and the bytes registered.
    pub(crate) fn adopt_attached(&mut self, pid: u32, fd: OwnedFd) -> Result<(Id, u64), String> {
        if !sysfd::is_userfaultfd(fd.as_fd()) {
            return Err(format!(
                "pid {pid}: the fd taken from it is {}, not a userfaultfd",
                sysfd::describe(fd.as_fd())
            ));
        }
        let uffd = Uffd::from_owned(fd);
        uffd.api(Features::NON_COOPERATIVE)
            .map_err(|e| format!("pid {pid}: {e}"))?;
        crate::mm_check::check_uffd_mm(&uffd, pid).map_err(|e| format!("pid {pid}: {e}"))?;
        let mut space = Space::new(
            uffd,
            Layout::new(),
            Origin::Attach,
            FaultAround::new(self.cfg.fault_around_min, self.cfg.fault_around_max),
        );
        space.same_pidns = proc::pid_namespace(&pid.to_string()).ok() == self.own_pidns;
        space.exe = proc::exe(pid);
        let sid = self.spaces.insert(space);
        self.set_pid(sid, pid);
        let registered = self.rescan(sid) + self.register_read_only_copies(sid, pid);
        let Some(s) = self.spaces.get(sid) else {
            return Err(format!("pid {pid} exited (or exec'd) during the attach"));
        };
        if let Err(e) = self.epoll.add(s.uffd.as_fd(), event_for(Token::Uffd(sid))) {
            self.close_space(sid, "epoll add failed");
            return Err(format!("pid {pid}: epoll: {e}"));
        }
        self.stats.handoffs += 1;
        self.stats.processes += 1;
        self.to_drain.push(sid);
        Ok((sid, registered))
    }

    /// The read-only private anonymous mappings of a freshly attached process (the RELRO
    /// copies of [`copy_data_segments`]; a rescan registers writable memory only): their pages
    /// are all there, registering them only makes coverage count them. Returns bytes added.
    fn register_read_only_copies(&mut self, id: Id, pid: u32) -> u64 {
        let Ok(maps) = proc::read_maps(pid) else {
            return 0;
        };
        maps.iter()
            .filter(|m| m.is_private_anonymous() && m.read && !m.write && !m.exec)
            .map(|m| self.register_range(id, m.range(), true))
            .sum()
    }

    /// Let go of `pid` and of the children it forked while managed: unregister every range,
    /// close the uffds. Returns how many address spaces were let go.
    pub(crate) fn detach_pid(&mut self, pid: u32) -> usize {
        let ids: Vec<Id> = self.spaces.ids();
        let mut mine: Vec<Id> = ids
            .iter()
            .copied()
            .filter(|&id| self.spaces.get(id).is_some_and(|s| s.pid == Some(pid)))
            .collect();
        // Forked descendants (FORK spaces whose parent chain leads to one of ours).
        let mut grew = true;
        while grew {
            grew = false;
            for &id in &ids {
                if mine.contains(&id) {
                    continue;
                }
                if let Some(Origin::Fork { parent }) = self.spaces.get(id).map(|s| s.origin) {
                    if mine.contains(&parent) {
                        mine.push(id);
                        grew = true;
                    }
                }
            }
        }
        for &id in &mine {
            self.unregister_all(id);
            self.close_space(id, "detached");
        }
        // After the close: a traced thread waiting for its event to be read (a munmap or
        // MADV_DONTNEED waits killably, so it cannot stop for the tracer's detach) is
        // released by the close, not by this loop, which waits for the tracer meanwhile.
        self.stop_strict(pid);
        if self.attached == Some(pid) && !mine.is_empty() {
            self.detached = true;
        }
        mine.len()
    }

    /// Detach every space (the end of a foreground attach).
    pub(crate) fn detach_all(&mut self) {
        for id in self.spaces.ids() {
            self.unregister_all(id);
            self.close_space(id, "detached");
        }
        // After the close (see detach_pid).
        self.stop_all_strict();
    }

    /// Unregister every registered range of a space, so that nothing of it is left waiting on
    /// a uffd (closing it would do the same; this says so explicitly and logs failures).
    fn unregister_all(&mut self, id: Id) {
        let Some(s) = self.spaces.get(id) else {
            return;
        };
        for vma in s.layout.vmas() {
            if let Err(e) = s.uffd.unregister(vma.start, vma.end - vma.start) {
                if !e.mm_gone() {
                    log::debug!("{}: {e}", s.describe(id));
                }
            }
        }
    }
}

/// How often the loop checks processes managed without an agent for new mappings.
pub const WATCH_TICK: Duration = Duration::from_millis(2);

impl Manager {
    /// Whether a space has no agent in it: attached, or forked (at any depth) from one that
    /// was. Nothing there reports new mappings.
    fn agentless(&self, id: Id) -> bool {
        let mut at = id;
        for _ in 0..64 {
            match self.spaces.get(at).map(|s| s.origin) {
                Some(Origin::Attach) => return true,
                Some(Origin::Fork { parent }) => at = parent,
                _ => return false,
            }
        }
        false
    }

    /// New mappings raise no event and an attached process has no agent to report them, so
    /// they are registered only by a rescan. Every [`WATCH_TICK`] the size of each such
    /// process's address space is read (`/proc/PID/statm`, O(1), a few µs); when it changed,
    /// the process is rescanned at once, unless its rescans cost more than a tenth of the
    /// time since the last one (huge maps). The regular rescans stay as the net for what
    /// keeps the size (a MAP_FIXED over an old mapping).
    pub(crate) fn watch_agentless(&mut self, now: std::time::Instant) {
        let mut any = false;
        for id in self.spaces.ids() {
            // A tracer registers its new mappings at their call; the regular rescans stay
            // the net.
            if !self.agentless(id) || self.strictly_traced(id) {
                continue;
            }
            any = true;
            let Some(s) = self.spaces.get(id) else {
                continue;
            };
            let (Some(pid), None) = (s.pid, &s.restore) else {
                continue;
            };
            if !s.same_pidns || now.duration_since(s.last_rescan) < s.rescan_cost * 10 {
                continue;
            }
            let seen = s.watched_vm_size;
            let Ok(size) = proc::vm_size_pages(pid) else {
                continue;
            };
            if size != seen {
                // Events first: a range unmapped by one thread and mapped again by another
                // is still "registered" in the model until its UNMAP is read, and the
                // rescan would skip it (see Manager::register_traced).
                self.drain_space(id);
                self.rescan(id);
                if let Some(s) = self.spaces.get_mut(id) {
                    // The size read before the rescan: whatever came after is seen next time.
                    s.watched_vm_size = size;
                }
            }
        }
        self.set_tick(any.then_some(WATCH_TICK));
    }
}

/// An attach request of the control socket whose injection runs on a helper thread.
pub struct PendingAttach {
    conn: Id,
    pid: u32,
    /// `attach --strict PID`: trace its mapping calls once the uffd is in.
    strict: bool,
    result: std::sync::mpsc::Receiver<Result<OwnedFd, String>>,
}

impl Manager {
    /// An `attach [--strict] PID` request: check it here (fast, /proc reads), then freeze and
    /// inject on a helper thread, which becomes the process's tracer for that while. The
    /// answer is sent when it is done ([`Manager::attach_tick`]).
    pub(crate) fn start_attach(&mut self, conn: Id, pid: u32, strict: bool) -> Result<(), String> {
        if pid == self.own_pid {
            return Err("the manager does not manage itself".into());
        }
        if strict && !self.sigchld_blocked {
            return Err(
                "strict mode needs umm daemon or umm attach (this manager cannot trace)".into(),
            );
        }
        if self.attaching.iter().any(|a| a.pid == pid) {
            return Err(format!("pid {pid} is being attached already"));
        }
        check_attachable(pid)?;
        let opts = AttachOptions {
            grant: self.cfg.grant_device,
            copy_data: true,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        crate::helper_thread::spawn(format!("umm-attach-{pid}"), move || {
            let _ = tx.send(open_uffd_in(pid, opts));
        })
        .map_err(|e| format!("cannot start the attach helper: {e}"))?;
        self.attaching.push(PendingAttach {
            conn,
            pid,
            strict,
            result: rx,
        });
        Ok(())
    }

    /// At shutdown: wait (bounded) for attach helpers still injecting. Exiting mid-injection
    /// would leave the target with its code word patched and its registers changed (the
    /// kernel detaches it when its tracer dies): it would crash. What they bring is dropped
    /// unregistered; the process runs on as it was.
    pub(crate) fn let_attaches_finish(&mut self) {
        let limit = umm::sys::inject::SYSCALL_LIMIT + Duration::from_secs(5);
        for a in self.attaching.drain(..) {
            match a.result.recv_timeout(limit) {
                Ok(Ok(_uffd)) => log::info!("pid {}: attach finished at shutdown; let go", a.pid),
                Ok(Err(e)) => log::info!("pid {}: attach failed at shutdown: {e}", a.pid),
                Err(_) => log::warn!("pid {}: the attach helper did not finish in time", a.pid),
            }
        }
    }

    /// Take the uffds of finished attach helpers and answer their requests (each tick).
    pub(crate) fn attach_tick(&mut self) {
        let mut i = 0;
        while i < self.attaching.len() {
            let got = match self.attaching[i].result.try_recv() {
                Ok(r) => r,
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    i += 1;
                    continue;
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    Err("the attach helper died".to_string())
                }
            };
            let a = self.attaching.swap_remove(i);
            // Strict: every thread traced before the adoption registers (as in the
            // foreground); fail-open, the attach goes on with rescans.
            let strict = match (&got, a.strict) {
                (Ok(_), true) => match self.start_strict(a.pid) {
                    Ok(()) => " (strict)".to_string(),
                    Err(e) => {
                        log::warn!("pid {}: no strict mode: {e}", a.pid);
                        format!(" (no strict mode: {e})")
                    }
                },
                _ => String::new(),
            };
            let answer = match got.and_then(|fd| self.adopt_attached(a.pid, fd)) {
                Ok((_, registered)) => {
                    let bytes = crate::stats::human_bytes(registered);
                    log::info!("pid {}: attached{strict}, {bytes} registered", a.pid);
                    format!("ok attached pid {}{strict}: {bytes} registered\n", a.pid)
                }
                Err(e) => {
                    log::warn!("attach: {e}");
                    self.stop_strict(a.pid);
                    format!("error: {e}\n")
                }
            };
            self.answer_later(a.conn, answer.into_bytes());
        }
    }
}
