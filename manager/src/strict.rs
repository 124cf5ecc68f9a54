//! `umm attach --strict`: a ptrace syscall tracer that has new memory registered before the
//! program can touch it.
//!
//! Without an agent, nothing reports a new mapping (DESIGN.md): the statm watch and rescans
//! find it a little later, after the program may have touched it. In strict mode a tracer
//! thread keeps every thread of the process (and of the children it forks) under
//! `PTRACE_SEIZE` and resumes them with `PTRACE_SYSCALL`. At the syscall-exit stop of a
//! successful private anonymous `mmap`, a growing `brk` or an `mremap` (the thread has not
//! returned to user space yet), it asks the loop to register the new range — the agent's
//! Register path — waits for the loop's ack, and only then resumes the thread.
//!
//! Why ptrace and not seccomp (RET_TRACE / USER_NOTIF): a seccomp filter stays after the
//! supervisor is gone, and the traced calls would fail with ENOSYS; ptrace leaves nothing
//! behind when the tracer detaches or dies (the kernel detaches its tracees): fail-open.
//!
//! Rules: the loop never waits for the tracer (requests come through a channel and an eventfd
//! in the loop's poll set); the tracer never touches a uffd; its wait for an ack is bounded
//! (a pid the loop does not know is acked at once; a stuck loop times out and the rescan
//! catches the range). Signal-delivery-stops are resumed with their signal, group-stops are
//! left stopped with `PTRACE_LISTEN` (SIGSTOP/SIGCONT keep working), an exec ends tracing of
//! that process (its uffd is gone). On stop, or on an error of its own, the tracer detaches
//! every thread (an error is reported to the loop, which goes on without strict mode).
//!
//! Tracee stops wake the tracer through SIGCHLD on a signalfd: SIGCHLD must be blocked in
//! every thread of umm (see [`block_sigchld`]). `umm daemon` runs one tracer per strictly
//! attached process; SIGCHLD is process-wide and coalesced, so the tracer that reads it
//! passes the wake-up on to the others ([`SigchldFanout`]), and each waits only for its own
//! tracees (`__WNOTHREAD`: another thread's tracees are not its to resume).

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::ptrace::{self, Event as PtraceEvent, Options};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use umm::sys::proc;

/// How long a thread stopped at a mapping call waits for the loop's ack before it is resumed
/// anyway (the rescan then catches the range). The loop answers in microseconds; this only
/// bounds a stuck loop.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long every thread gets to stop for the detach.
const DETACH_TIMEOUT: Duration = Duration::from_secs(3);
/// Rounds of "list the threads, seize the new ones" before giving up.
const SEIZE_ROUNDS: usize = 1000;
/// waitpid flags: every tracee (threads too), and only this thread's (another tracer
/// thread's tracees, or an attach helper's, are not ours to reap).
const OWN_TRACEES: WaitPidFlag = WaitPidFlag::__WALL.union(WaitPidFlag::__WNOTHREAD);

/// What the tracer asks of the loop.
#[derive(Debug)]
pub(crate) enum ToLoop {
    /// Register the servable parts of `range` in process `pid`'s space, then ack `seq`.
    /// `fresh`: a new mapping (mmap, brk growth), so whatever the model remembers there is
    /// stale (see [`Manager::register_traced`]); an mremap's result is not fresh.
    Register {
        seq: u64,
        pid: u32,
        range: Range<u64>,
        fresh: bool,
    },
    /// Process `parent` forked `child` (traced from its first instruction).
    Forked { parent: u32, child: u32 },
    /// Every thread is traced now; what was mapped before is left for one rescan.
    Ready,
    /// The tracer gave up and detached everything.
    Failed(String),
    /// No traced thread is left (the process exited or exec'd): the tracer thread ends.
    Ended,
}

/// The loop's handle on the tracer thread.
pub(crate) struct StrictTracer {
    pid: u32,
    requests: Receiver<ToLoop>,
    acks: Sender<u64>,
    /// Readable when requests wait (in the loop's poll set).
    wake: Arc<EventFd>,
    /// Written to stop the tracer's poll; `stop_tx` dropped ends its ack waits.
    stop: Arc<EventFd>,
    stop_tx: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The wake-up eventfds of every running tracer of this process. SIGCHLD says "some tracee
/// of this process stopped", once for many stops; whichever tracer reads it wakes the others.
struct SigchldFanout;

static TRACER_WAKERS: Mutex<Vec<Arc<EventFd>>> = Mutex::new(Vec::new());

impl SigchldFanout {
    fn join(wake: &Arc<EventFd>) {
        TRACER_WAKERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(wake.clone());
    }

    fn leave(wake: &Arc<EventFd>) {
        TRACER_WAKERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|w| !Arc::ptr_eq(w, wake));
    }

    /// Wake every tracer but the caller (it drains its own stops next).
    fn wake_others(me: &Arc<EventFd>) {
        for w in TRACER_WAKERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|w| !Arc::ptr_eq(w, me))
        {
            let _ = w.write(1);
        }
    }
}

/// Block SIGCHLD in the calling thread, before any other thread is started (they inherit the
/// mask): the tracer learns of tracee stops from a signalfd, and a thread that does not
/// block SIGCHLD would swallow the signal.
pub(crate) fn block_sigchld() -> Result<(), String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block()
        .map_err(|e| format!("cannot block SIGCHLD: {e}"))
}

impl StrictTracer {
    /// Start tracing process `pid` (not traced by anyone: the attach's injection is over).
    pub(crate) fn start(pid: u32) -> Result<StrictTracer, String> {
        let efd = || {
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(|e| format!("eventfd: {e}"))
        };
        let (wake, stop) = (efd()?, efd()?);
        let (req_tx, req_rx) = crossbeam_channel::unbounded();
        let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let link = Link {
            requests: req_tx,
            wake: wake.clone(),
            acks: ack_rx,
            stop: stop.clone(),
            stopping: stop_rx,
        };
        let thread = std::thread::Builder::new()
            .name(format!("umm-strict-{pid}"))
            .spawn(move || trace_main(pid, link))
            .map_err(|e| format!("cannot start the strict-mode tracer: {e}"))?;
        Ok(StrictTracer {
            pid,
            requests: req_rx,
            acks: ack_tx,
            wake,
            stop,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// The requests waiting (consumes the wake-up first, so none is missed).
    pub(crate) fn take_requests(&self) -> Vec<ToLoop> {
        let _ = self.wake.read();
        self.requests.try_iter().collect()
    }

    /// Wait (bounded) until every thread is traced: its first message. Before the attach
    /// registers anything, so that no mapping falls between the registration and the seize.
    fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        match self.requests.recv_timeout(timeout) {
            Ok(ToLoop::Ready) => Ok(()),
            Ok(ToLoop::Failed(why)) => Err(why),
            Ok(other) => Err(format!("unexpected first message {other:?}")),
            Err(_) => Err(format!("not every thread traced within {timeout:?}")),
        }
    }

    pub(crate) fn ack(&self, seq: u64) {
        let _ = self.acks.send(seq);
    }

    /// Detach every traced thread and end the tracer (bounded by its detach timeout).
    pub(crate) fn stop(mut self) {
        self.stop_tx = None;
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("pid {}: the strict-mode tracer panicked", self.pid);
            }
        }
    }
}

impl Drop for StrictTracer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_tx = None;
            let _ = self.stop.write(1);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The tracer's ends of the channels.
struct Link {
    requests: Sender<ToLoop>,
    wake: Arc<EventFd>,
    acks: Receiver<u64>,
    stop: Arc<EventFd>,
    /// Disconnected when the loop asks the tracer to stop.
    stopping: Receiver<()>,
}

impl Link {
    fn send(&self, msg: ToLoop) -> bool {
        let sent = self.requests.send(msg).is_ok();
        let _ = self.wake.write(1);
        sent
    }
}

/// One traced thread.
#[derive(Clone, Copy, Debug)]
struct Task {
    /// The process it belongs to.
    tgid: u32,
    /// The process whose address space it runs in (a vfork child runs in its parent's).
    mm: u32,
}

/// The tracer's state.
struct Tracer {
    pid: u32,
    link: Link,
    /// Written by another tracer that read a SIGCHLD (it may have been for our tracees).
    chld_wake: Arc<EventFd>,
    tasks: HashMap<u32, Task>,
    /// Per traced process: its program break as last seen (brk growth registers from there).
    brk: HashMap<u32, u64>,
    seq: u64,
    registers: u64,
    ack_timeouts: u64,
}

fn trace_main(pid: u32, link: Link) {
    let chld_wake = match EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            link.send(ToLoop::Failed(format!("eventfd: {e}")));
            return;
        }
    };
    SigchldFanout::join(&chld_wake);
    let mut t = Tracer {
        pid,
        link,
        chld_wake,
        tasks: HashMap::new(),
        brk: HashMap::new(),
        seq: 0,
        registers: 0,
        ack_timeouts: 0,
    };
    let result = t.run();
    t.detach_all();
    SigchldFanout::leave(&t.chld_wake);
    match result {
        Ok(()) => {
            log::info!(
                "pid {pid}: strict mode ended ({} ranges registered at their mapping call, {} \
                 ack timeouts)",
                t.registers,
                t.ack_timeouts
            );
            // Unless the loop stopped us: it reaps the tracer then.
            t.link.send(ToLoop::Ended);
        }
        Err(e) => {
            log::warn!("pid {pid}: strict mode off, the attach goes on with rescans: {e}");
            t.link.send(ToLoop::Failed(e));
        }
    }
}

fn is_stop_signal(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU
    )
}

fn tid_pid(tid: u32) -> Pid {
    Pid::from_raw(tid as i32)
}

/// Field 47 of `/proc/PID/stat`: where the heap starts.
fn start_brk(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the command name start at field 3.
    rest.split_whitespace().nth(47 - 3)?.parse().ok()
}

/// Whether a raw syscall return value is `-errno`.
fn is_error(ret: u64) -> bool {
    ret > (-4096i64) as u64
}

impl Tracer {
    fn run(&mut self) -> Result<(), String> {
        let sigchld = {
            let mut set = SigSet::empty();
            set.add(Signal::SIGCHLD);
            SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
                .map_err(|e| format!("signalfd(SIGCHLD): {e}"))?
        };
        self.seize_all()?;
        self.link.send(ToLoop::Ready);
        loop {
            let (chld, woken, stop) = {
                let mut fds = [
                    PollFd::new(sigchld.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.chld_wake.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.link.stop.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(format!("poll: {e}")),
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]))
            };
            if stop {
                return Ok(());
            }
            if chld || woken {
                // Consume the (coalesced) signals first: a stop after this read raises it again.
                let mut read_any = false;
                while let Ok(Some(_)) = sigchld.read_signal() {
                    read_any = true;
                }
                if read_any {
                    SigchldFanout::wake_others(&self.chld_wake);
                }
                let _ = self.chld_wake.read();
                self.drain_stops()?;
                if self.tasks.is_empty() {
                    log::debug!("pid {}: no traced thread left", self.pid);
                    return Ok(());
                }
            }
        }
    }

    /// Seize every thread of the process (with the tracing options), interrupt it so that it
    /// reports a stop, and again for threads that appeared meanwhile.
    fn seize_all(&mut self) -> Result<(), String> {
        let pid = self.pid;
        let me = nix::unistd::gettid().as_raw() as u64;
        let opts = Options::PTRACE_O_TRACESYSGOOD
            | Options::PTRACE_O_TRACECLONE
            | Options::PTRACE_O_TRACEFORK
            | Options::PTRACE_O_TRACEVFORK
            | Options::PTRACE_O_TRACEEXEC;
        for _ in 0..SEIZE_ROUNDS {
            let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map_err(|e| format!("cannot list /proc/{pid}/task: {e}"))?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|t| !self.tasks.contains_key(t))
                .collect();
            if tids.is_empty() {
                if self.tasks.is_empty() {
                    return Err(format!("pid {pid} has no thread left to trace"));
                }
                return Ok(());
            }
            for tid in tids {
                match ptrace::seize(tid_pid(tid), opts) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => continue,
                    // Already ours: a thread a seized one cloned (auto-attached).
                    Err(Errno::EPERM)
                        if proc::status_field(tid, "TracerPid")
                            .is_ok_and(|t| t.first() == Some(&me)) => {}
                    Err(Errno::EPERM) if proc::status_field(tid, "TracerPid").is_err() => {
                        continue; // exiting
                    }
                    Err(e) => {
                        return Err(format!("PTRACE_SEIZE of thread {tid} of pid {pid}: {e}"))
                    }
                }
                self.tasks.insert(tid, Task { tgid: pid, mm: pid });
                match ptrace::interrupt(tid_pid(tid)) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(e) => {
                        return Err(format!(
                            "PTRACE_INTERRUPT of thread {tid} of pid {pid}: {e}"
                        ))
                    }
                }
            }
        }
        Err(format!(
            "pid {pid} kept creating threads: not all traced after {SEIZE_ROUNDS} rounds"
        ))
    }

    /// Handle every stop that is waiting.
    fn drain_stops(&mut self) -> Result<(), String> {
        loop {
            let status = match waitpid(None, Some(OWN_TRACEES | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return Ok(()),
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    self.tasks.clear();
                    return Ok(());
                }
                Err(e) => return Err(format!("waitpid: {e}")),
            };
            self.on_status(status)?;
        }
    }

    /// The task a stop names; one never seen (a child reporting before its parent's event)
    /// is learned here.
    fn task(&mut self, tid: u32) -> Task {
        *self.tasks.entry(tid).or_insert_with(|| Task {
            tgid: proc::tgid_of(tid).unwrap_or(tid),
            mm: proc::tgid_of(tid).unwrap_or(tid),
        })
    }

    fn resume(&self, tid: u32, sig: Option<Signal>) {
        // ESRCH: it died meanwhile (its exit is reported next).
        if let Err(e) = ptrace::syscall(tid_pid(tid), sig) {
            if e != Errno::ESRCH {
                log::debug!("PTRACE_SYSCALL of thread {tid}: {e}");
            }
        }
    }

    fn on_status(&mut self, status: WaitStatus) -> Result<(), String> {
        match status {
            WaitStatus::PtraceSyscall(p) => {
                let tid = p.as_raw() as u32;
                let task = self.task(tid);
                self.on_syscall_stop(tid, task);
                self.resume(tid, None);
            }
            WaitStatus::PtraceEvent(p, sig, event) => {
                let tid = p.as_raw() as u32;
                let task = self.task(tid);
                self.on_event(tid, task, sig, event);
            }
            // Signal-delivery-stop: deliver it.
            WaitStatus::Stopped(p, sig) => {
                let tid = p.as_raw() as u32;
                self.task(tid);
                self.resume(tid, Some(sig));
            }
            WaitStatus::Exited(p, _) | WaitStatus::Signaled(p, _, _) => {
                let tid = p.as_raw() as u32;
                if let Some(t) = self.tasks.remove(&tid) {
                    if !self.tasks.values().any(|o| o.mm == t.mm) {
                        self.brk.remove(&t.mm);
                    }
                }
            }
            WaitStatus::Continued(_) | WaitStatus::StillAlive => {}
        }
        Ok(())
    }

    fn on_event(&mut self, tid: u32, task: Task, sig: Signal, event: i32) {
        const FORK: i32 = PtraceEvent::PTRACE_EVENT_FORK as i32;
        const VFORK: i32 = PtraceEvent::PTRACE_EVENT_VFORK as i32;
        const CLONE: i32 = PtraceEvent::PTRACE_EVENT_CLONE as i32;
        const EXEC: i32 = PtraceEvent::PTRACE_EVENT_EXEC as i32;
        const STOP: i32 = PtraceEvent::PTRACE_EVENT_STOP as i32;
        match event {
            FORK | VFORK | CLONE => {
                if let Ok(new) = ptrace::getevent(tid_pid(tid)) {
                    let new = new as u32;
                    let born = match event {
                        FORK => Task { tgid: new, mm: new },
                        VFORK => Task {
                            tgid: new,
                            mm: task.mm,
                        },
                        // A thread, or (rarely) a process made by a bare clone.
                        _ => match proc::tgid_of(new).unwrap_or(task.tgid) {
                            t if t == task.tgid => task,
                            t => Task { tgid: t, mm: t },
                        },
                    };
                    self.tasks.insert(new, born);
                    if event == FORK {
                        self.link.send(ToLoop::Forked {
                            parent: task.tgid,
                            child: new,
                        });
                    }
                }
                self.resume(tid, None);
            }
            // A new program: a new mm that nobody manages. Its other threads are gone.
            EXEC => {
                log::info!("pid {}: exec'd; no longer traced", task.tgid);
                let _ = ptrace::detach(tid_pid(tid), None);
                self.tasks.retain(|_, t| t.tgid != task.tgid);
                if task.mm == task.tgid {
                    self.brk.remove(&task.tgid);
                }
            }
            // Group-stop: stay stopped, report when woken (SIGCONT).
            STOP if is_stop_signal(sig) => {
                if let Err(e) = umm::sys::ptrace::listen(tid) {
                    if e != Errno::ESRCH {
                        log::debug!("PTRACE_LISTEN of thread {tid}: {e}");
                    }
                }
            }
            // Our interrupt, a new task's first stop, or the wake-up after a group-stop.
            _ => self.resume(tid, None),
        }
    }

    /// At a syscall-exit stop of a mapping call, have the new range registered.
    fn on_syscall_stop(&mut self, tid: u32, task: Task) {
        let Ok(regs) = ptrace::getregs(tid_pid(tid)) else {
            return;
        };
        // At the entry stop rax holds -ENOSYS; none of these calls returns ENOSYS.
        if regs.rax == (-(libc::ENOSYS as i64)) as u64 || is_error(regs.rax) {
            return;
        }
        let ret = regs.rax;
        let (range, fresh) = match regs.orig_rax as i64 {
            libc::SYS_mmap => {
                let flags = regs.r10 as i32;
                // The low bits are the mapping type (MAP_SHARED_VALIDATE = 3 overlaps both).
                const MAP_TYPE: i32 = 0x0f;
                let private_anonymous = flags & libc::MAP_ANONYMOUS != 0
                    && flags & MAP_TYPE == libc::MAP_PRIVATE
                    && flags & libc::MAP_HUGETLB == 0;
                (
                    private_anonymous.then(|| ret..ret.saturating_add(regs.rsi)),
                    true,
                )
            }
            libc::SYS_mremap => (Some(ret..ret.saturating_add(regs.rdx)), false),
            libc::SYS_brk => (self.brk_growth(task.mm, regs.rdi, ret), true),
            _ => (None, false),
        };
        if let Some(r) = range {
            let r = umm::page_floor(r.start)..umm::page_ceil(r.end);
            if !r.is_empty() {
                self.register(task.mm, r, fresh);
            }
        }
    }

    /// `brk(requested)` returned `now`: the heap part that is new since the last brk seen.
    fn brk_growth(&mut self, tgid: u32, requested: u64, now: u64) -> Option<Range<u64>> {
        let last = match self.brk.get(&tgid) {
            Some(&b) => b,
            None => start_brk(tgid)?,
        };
        self.brk.insert(tgid, now);
        (requested != 0 && now > last).then_some(last..now)
    }

    /// Ask the loop to register `range` of process `tgid`; wait (bounded) for its ack.
    fn register(&mut self, tgid: u32, range: Range<u64>, fresh: bool) {
        self.seq += 1;
        let seq = self.seq;
        if !self.link.send(ToLoop::Register {
            seq,
            pid: tgid,
            range,
            fresh,
        }) {
            return; // the loop is gone
        }
        self.registers += 1;
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            select! {
                recv(self.link.acks) -> got => match got {
                    Ok(s) if s == seq => return,
                    Ok(_) => continue, // a late ack of an earlier request
                    Err(_) => return,
                },
                recv(self.link.stopping) -> _ => return,
                default(left) => {
                    self.ack_timeouts += 1;
                    log::debug!("pid {tgid}: no ack within {ACK_TIMEOUT:?}; the rescan catches the range");
                    return;
                }
            }
        }
    }

    /// Detach every traced thread: interrupt each, and detach it at its next stop (a
    /// signal-delivery-stop hands its signal back; a group-stopped thread stays stopped).
    fn detach_all(&mut self) {
        for &tid in self.tasks.keys() {
            let _ = ptrace::interrupt(tid_pid(tid));
        }
        let deadline = Instant::now() + DETACH_TIMEOUT;
        while !self.tasks.is_empty() && Instant::now() < deadline {
            let status = match waitpid(None, Some(OWN_TRACEES | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(_) => break, // ECHILD: nothing traced is left
            };
            let (tid, sig) = match status {
                WaitStatus::Stopped(p, sig) => (p.as_raw() as u32, Some(sig)),
                WaitStatus::PtraceEvent(p, _, event) => {
                    let tid = p.as_raw() as u32;
                    // A task born now is traced too: take it along.
                    if [
                        PtraceEvent::PTRACE_EVENT_FORK as i32,
                        PtraceEvent::PTRACE_EVENT_VFORK as i32,
                        PtraceEvent::PTRACE_EVENT_CLONE as i32,
                    ]
                    .contains(&event)
                    {
                        if let Ok(new) = ptrace::getevent(p) {
                            let new = new as u32;
                            self.tasks.insert(new, Task { tgid: new, mm: new });
                            let _ = ptrace::interrupt(tid_pid(new));
                        }
                    }
                    (tid, None)
                }
                WaitStatus::PtraceSyscall(p) => (p.as_raw() as u32, None),
                WaitStatus::Exited(p, _) | WaitStatus::Signaled(p, _, _) => {
                    self.tasks.remove(&(p.as_raw() as u32));
                    continue;
                }
                _ => continue,
            };
            if let Err(e) = ptrace::detach(tid_pid(tid), sig) {
                if e != Errno::ESRCH {
                    log::warn!("PTRACE_DETACH of thread {tid}: {e}");
                }
            }
            self.tasks.remove(&tid);
        }
        if !self.tasks.is_empty() {
            log::warn!(
                "pid {}: {} threads did not stop for the detach; the kernel detaches them \
                 when umm exits",
                self.pid,
                self.tasks.len()
            );
        }
    }
}

// ----- the loop's side --------------------------------------------------------------------

use crate::manager::{event_for, Manager};
use crate::slab::{Id, Token};
use crate::space::Origin;

impl Manager {
    /// Start strict mode for process `pid` and wait until every thread is traced (call it
    /// before its space is adopted: the adoption's registration then misses nothing). The
    /// wait is on the loop (bounded by the detach timeout; a seize takes milliseconds).
    /// SIGCHLD must have been blocked before umm started its first thread.
    pub(crate) fn start_strict(&mut self, pid: u32) -> Result<(), String> {
        if !self.sigchld_blocked {
            return Err("this manager did not block SIGCHLD at its start: no strict mode".into());
        }
        if self.strict.iter().any(|t| t.pid() == pid) {
            return Err(format!("pid {pid} is traced strictly already"));
        }
        let tracer = StrictTracer::start(pid)?;
        tracer.wait_ready(DETACH_TIMEOUT)?;
        self.epoll
            .add(tracer.wake_fd(), event_for(Token::Tracer))
            .map_err(|e| format!("epoll add of the tracer's eventfd: {e}"))?;
        self.strict.push(tracer);
        Ok(())
    }

    /// End strict mode for process `pid` (detach every thread it traces), if it is on.
    pub(crate) fn stop_strict(&mut self, pid: u32) {
        if let Some(at) = self.strict.iter().position(|t| t.pid() == pid) {
            let t = self.strict.swap_remove(at);
            let _ = self.epoll.delete(t.wake_fd());
            t.stop();
        }
    }

    /// End every tracer (detach, shutdown).
    pub(crate) fn stop_all_strict(&mut self) {
        for t in std::mem::take(&mut self.strict) {
            let _ = self.epoll.delete(t.wake_fd());
            t.stop();
        }
    }

    /// Whether space `id` belongs to a strictly traced process (the attached one or a child
    /// it forked): its new mappings are registered at their call.
    pub(crate) fn strictly_traced(&self, id: Id) -> bool {
        let mut at = id;
        for _ in 0..64 {
            let Some(s) = self.spaces.get(at) else {
                return false;
            };
            match s.origin {
                Origin::Attach => {
                    return s
                        .pid
                        .is_some_and(|p| self.strict.iter().any(|t| t.pid() == p))
                }
                Origin::Fork { parent } => at = parent,
                _ => return false,
            }
        }
        false
    }

    /// The tracers' requests (they share one token): each applied at once, a Register
    /// acked when done.
    pub(crate) fn on_tracer_readable(&mut self) {
        let pids: Vec<u32> = self.strict.iter().map(|t| t.pid()).collect();
        for tracer_pid in pids {
            self.serve_tracer(tracer_pid);
        }
    }

    fn serve_tracer(&mut self, tracer_pid: u32) {
        let Some(tracer) = self.strict.iter().find(|t| t.pid() == tracer_pid) else {
            return;
        };
        for msg in tracer.take_requests() {
            match msg {
                ToLoop::Register {
                    seq,
                    pid,
                    range,
                    fresh,
                } => {
                    if let Some(id) = self.space_for_traced(pid) {
                        self.stats.strict_registers += 1;
                        let added = self.register_traced(id, range.clone(), fresh);
                        log::debug!(
                            "pid {pid}: strict register {:#x}-{:#x}: {added} bytes new",
                            range.start,
                            range.end
                        );
                    }
                    if let Some(t) = self.strict.iter().find(|t| t.pid() == tracer_pid) {
                        t.ack(seq);
                    }
                }
                ToLoop::Forked { parent, child } => {
                    if self.space_for_traced(child).is_none() {
                        log::debug!(
                            "pid {parent} forked pid {child}: its space is not known yet (the \
                             first fault or the rescan names it)"
                        );
                    }
                }
                ToLoop::Ready => {
                    // Mapped between the attach's own registration and the seize.
                    for id in self.spaces.ids() {
                        if self
                            .spaces
                            .get(id)
                            .is_some_and(|s| s.pid == Some(tracer_pid))
                        {
                            self.rescan(id);
                        }
                    }
                }
                ToLoop::Ended => {
                    log::debug!("pid {tracer_pid}: nothing left to trace");
                    self.stop_strict(tracer_pid);
                    return;
                }
                ToLoop::Failed(why) => {
                    log::warn!(
                        "pid {tracer_pid}: strict mode ended: {why}; new mappings are found by \
                         rescans"
                    );
                    self.stop_strict(tracer_pid);
                    return;
                }
            }
        }
    }

    /// Register `range`, which a traced thread just mapped (it waits at its syscall-exit
    /// stop). The model may be behind the kernel: one thread's munmap frees a range before
    /// its UNMAP event is queued and read (the munmap waits for the read only after it has
    /// released the mmap lock), so another thread's mmap can get the same addresses while
    /// the model still holds the old, registered range, and registering "what the model
    /// lacks" would do nothing (seen with glibc's arenas: one thread trims the second half
    /// of its 128 MiB reservation, the next one maps its arena there at once). So: read
    /// the events already queued, and for a fresh mapping forget what the model says of the
    /// range (nothing of an older mapping survives there). An UNMAP read later for the old
    /// range only makes the model forget it again: faults there are adopted, the kernel
    /// keeps the registration, the rescan puts it back in the model.
    fn register_traced(&mut self, id: Id, range: Range<u64>, fresh: bool) -> u64 {
        self.drain_space(id);
        if fresh {
            if let Some(s) = self.spaces.get_mut(id) {
                let before = s.layout.registered_bytes();
                s.layout.unregister(range.clone());
                s.refused
                    .retain(|r| r.end <= range.start || r.start >= range.end);
                let after = s.layout.registered_bytes();
                self.stats.registered_delta(before, after);
            }
        }
        self.register_servable(id, range)
    }

    /// The space of traced process `pid`: the one with that pid, or else the one forked child
    /// of its parent's space whose pid is not known yet (learned here).
    fn space_for_traced(&mut self, pid: u32) -> Option<Id> {
        let known = self
            .spaces
            .iter()
            .filter(|(_, s)| s.pid == Some(pid))
            .map(|(id, _)| id)
            .last();
        if known.is_some() {
            return known;
        }
        let ppid = proc::parent_pid(pid).ok()?;
        let parent = self
            .spaces
            .iter()
            .find(|(_, s)| s.pid == Some(ppid))
            .map(|(id, _)| id)?;
        let unnamed: Vec<Id> = self
            .spaces
            .iter()
            .filter(|(_, s)| s.pid.is_none() && s.origin == Origin::Fork { parent })
            .map(|(id, _)| id)
            .collect();
        // Two children forked at once cannot be told apart: wait for their first faults.
        let [child] = unnamed[..] else {
            return None;
        };
        self.set_pid(child, pid);
        Some(child)
    }
}
