//! The event loop: one thread owns every uffd, every socket and every layout.
//!
//! Each turn (the seed's rules, DESIGN.md "Event loop rules"):
//! 1. wait for readiness; accept peers, read their messages, note readable uffds;
//! 2. drain every readable uffd completely, applying layout events in order (FORK creates the
//!    child's space at once, and it is drained in the same turn);
//! 3. serve faults, oldest first (parked ones from earlier turns first);
//! 4. a bounded slice of background work (none in track mode: zeros need no prefetch).

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use umm::layout::LayoutEvent;
use umm::source::Zeros;
use umm::sys::proc;
use umm::uffd::{Event, UnknownEvent};

use crate::peers::Peer;
use crate::slab::{Id, Slab, Token};
use crate::space::{Origin, Space};
use crate::stats::Stats;
use crate::trace::{Record, Trace};

/// Who may hand over a process.
#[derive(Clone, Debug)]
pub enum Policy {
    /// `umm run`: only descendants of this manager (the command's tree), whatever their uid.
    Tree,
    /// `umm daemon`: peers with one of these uids (the daemon's own uid and root always).
    Uids(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub policy: Policy,
    /// Give a `/dev/userfaultfd` fd to agents that cannot open a uffd themselves.
    pub grant_device: bool,
    pub fault_around_min: u64,
    pub fault_around_max: u64,
    pub rescan_interval: Duration,
    pub coverage_interval: Duration,
    pub handshake_timeout: Duration,
    pub trace: Option<PathBuf>,
    /// After activity, poll without sleeping this long: a sleeping loop costs a wake-up per
    /// fault, most of a fault's round trip.
    pub spin: Duration,
    /// `umm restore`: the image served and how.
    pub restore: Option<crate::restore::RestoreConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::Uids(vec![]),
            grant_device: false,
            fault_around_min: umm::PAGE_SIZE,
            fault_around_max: 2 << 20,
            rescan_interval: Duration::from_millis(100),
            coverage_interval: Duration::from_millis(250),
            handshake_timeout: Duration::from_secs(10),
            trace: None,
            spin: Duration::ZERO,
            restore: None,
        }
    }
}

/// A fault read from a uffd and not yet answered.
#[derive(Clone, Copy, Debug)]
pub struct PendingFault {
    pub space: Id,
    pub addr: u64,
    pub write: bool,
    pub tid: u32,
    pub read_at: Instant,
    /// Since when copies for this fault have failed other than with EAGAIN.
    pub failing_since: Option<Instant>,
    /// A failing fault is not tried again before this (backoff).
    pub retry_at: Option<Instant>,
}

/// Why the loop stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// `umm run`: the command exited with this wait status mapped to an exit code.
    CommandExited(i32),
    /// A signal asked the daemon to stop.
    Signal(i32),
    /// `umm restore`: every restored address space is complete or gone (and the command, if
    /// any, exited with this status).
    RestoreDone(Option<i32>),
    /// `umm attach`: the process exited, exec'd, or was detached.
    AttachEnded,
}

const TICK: Duration = Duration::from_millis(50);
/// How long a parked fault waits before it is decided again.
const PARK_RETRY: Duration = Duration::from_millis(1);
/// Copies failing with unexpected errors (ENOMEM under a memory limit, ...) are retried, with
/// backoff, this long; then the space is given up (track mode: its uffd is closed and the
/// kernel serves it as normal memory; a restore: its process is stopped).
pub const HARD_FAILURE_WINDOW: Duration = Duration::from_secs(5);
/// How long a space may be unable to take its forked children's uffds (EMFILE) before the
/// manager gives up on it.
const FD_EXHAUSTION_LIMIT: Duration = Duration::from_secs(1);

pub struct Manager {
    pub(crate) epoll: Epoll,
    pub(crate) listener: UnixListener,
    timer: TimerFd,
    /// The timer runs at this faster interval (see [`Manager::set_tick`]).
    fast_tick: Option<Duration>,
    signals: Option<SignalFd>,
    pub(crate) peers: Slab<Peer>,
    pub(crate) spaces: Slab<Space>,
    pub(crate) faults: VecDeque<PendingFault>,
    pub(crate) parked: Vec<PendingFault>,
    pub(crate) to_drain: Vec<Id>,
    event_buf: Vec<Result<Event, UnknownEvent>>,
    pub(crate) zeros: Zeros,
    /// Bytes of the image (at most) mapped in the manager since the last drop (restore).
    pub(crate) image_mapped: std::cell::Cell<u64>,
    /// Runs `plan` chose to fill beside a fault's own run (reused buffer).
    pub(crate) extra_fill: Vec<umm::layout::Run>,
    pub(crate) stats: Stats,
    pub(crate) trace: Option<Trace>,
    pub(crate) cfg: Config,
    pub(crate) own_pid: u32,
    pub(crate) own_pidns: Option<u64>,
    pub(crate) shutdown: Option<Shutdown>,
    /// `umm run`/`umm restore -- CMD`: the command's pid, reaped by this loop, and its exit
    /// status once it exited.
    pub(crate) command: Option<u32>,
    pub(crate) command_status: Option<i32>,
    /// `umm attach` (foreground): the process attached to; the loop ends when it is gone.
    pub(crate) attached: Option<u32>,
    /// It was detached (a `detach` request).
    pub(crate) detached: bool,
    /// `umm attach --strict` (`attach --strict PID` of the control socket): one syscall
    /// tracer per strictly attached process.
    pub(crate) strict: Vec<crate::strict::StrictTracer>,
    /// SIGCHLD was blocked before umm's first thread: strict mode can be started.
    pub(crate) sigchld_blocked: bool,
    /// `umm daemon`: attach requests whose injection runs on a helper thread.
    pub(crate) attaching: Vec<crate::attach::PendingAttach>,
    /// The coverage helper thread (None if it could not start).
    pub(crate) coverage: Option<crate::coverage::CoverageSampler>,
    /// Lazy-restore state (keeper, background fill, fail-stop).
    pub(crate) restore: crate::restore::RestoreBook,
    /// `umm lazy-pages`: CRIU's handoff connection and the tasks it handed over.
    pub(crate) criu: Option<crate::lazy_pages::Handoff>,
    /// `--control` / `--metrics`: live status answered from this loop.
    pub(crate) control: Option<crate::control::Control>,
    /// `umm restore`: the fill's progress on stderr, updated each tick.
    pub(crate) progress: Option<crate::progress::Progress>,
    last_probe: Instant,
    last_full_probe: Instant,
    /// A new process is sampled on the next tick, so short-lived ones are measured too.
    handoffs_at_last_coverage: u64,
    /// accept(2) ran out of fds: the listener is out of the poll set until the next tick.
    listener_paused: bool,
    listener_paused_since: Option<Instant>,
}

impl Manager {
    pub fn new(
        listener: UnixListener,
        cfg: Config,
        signals: Option<SignalFd>,
    ) -> io::Result<Manager> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
        )?;
        timer.set(
            Expiration::Interval(TimeSpec::from_duration(TICK)),
            TimerSetTimeFlags::empty(),
        )?;
        epoll.add(&listener, event_for(Token::Listener))?;
        epoll.add(&timer, event_for(Token::Timer))?;
        if let Some(s) = &signals {
            epoll.add(s, event_for(Token::Signals))?;
        }
        let started = Instant::now();
        let cfg_coverage_interval = cfg.coverage_interval;
        let trace = match &cfg.trace {
            Some(p) => Some(Trace::create(p, started).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot create trace file {}: {e}", p.display()),
                )
            })?),
            None => None,
        };
        Ok(Manager {
            epoll,
            listener,
            timer,
            fast_tick: None,
            signals,
            peers: Slab::default(),
            spaces: Slab::default(),
            faults: VecDeque::new(),
            parked: Vec::new(),
            to_drain: Vec::new(),
            event_buf: Vec::with_capacity(umm::uffd::READ_BATCH),
            zeros: Zeros::new(),
            extra_fill: Vec::new(),
            image_mapped: std::cell::Cell::new(0),
            stats: Stats::default(),
            trace,
            cfg,
            own_pid: std::process::id(),
            own_pidns: proc::pid_namespace("self").ok(),
            shutdown: None,
            command: None,
            command_status: None,
            attached: None,
            detached: false,
            strict: Vec::new(),
            sigchld_blocked: false,
            attaching: Vec::new(),
            restore: Default::default(),
            criu: None,
            control: None,
            progress: None,
            coverage: crate::coverage::CoverageSampler::start(cfg_coverage_interval)
                .map_err(|e| log::warn!("no coverage sampling: {e}"))
                .ok(),
            last_probe: started,
            last_full_probe: started,
            handoffs_at_last_coverage: 0,
            listener_paused: false,
            listener_paused_since: None,
        })
    }

    /// Run until a shutdown reason is set.
    pub fn run(&mut self) -> io::Result<Shutdown> {
        let mut events = vec![EpollEvent::empty(); 256];
        let mut last_activity = Instant::now();
        let mut background = false;
        loop {
            if let Some(s) = self.shutdown {
                self.let_attaches_finish();
                return Ok(s);
            }
            let spinning =
                self.cfg.spin > Duration::ZERO && last_activity.elapsed() < self.cfg.spin;
            let timeout = if spinning || (background && self.restore.next_allowed.is_none()) {
                EpollTimeout::ZERO
            } else if !self.parked.is_empty() {
                EpollTimeout::try_from(PARK_RETRY).unwrap_or(EpollTimeout::ZERO)
            } else if let Some(at) = self.restore.next_allowed.filter(|_| background) {
                let wait = at.saturating_duration_since(Instant::now());
                EpollTimeout::try_from(wait).unwrap_or(EpollTimeout::ZERO)
            } else {
                EpollTimeout::NONE
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(io::Error::from(e)),
            };
            if n > 0 {
                last_activity = Instant::now();
            } else if spinning {
                std::hint::spin_loop();
            }
            for ev in &events[..n] {
                self.dispatch(ev.data());
            }
            self.drain_readable();
            let faults = !self.faults.is_empty() || !self.parked.is_empty();
            self.serve_faults();
            background = self.background_slice(faults);
            // What faults and the fill asked of a page server this turn.
            self.pump_page_server();
            self.pump_net_source();
            self.check_done();
        }
    }

    /// Whether the loop's work is over: the command exited (`umm run`), or the restore is
    /// finished and the command, if any, exited (`umm restore`).
    fn check_done(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        if self.cfg.restore.is_some() {
            if self.restore.keep_running {
                return; // until a signal
            }
            let restoring = self.spaces.iter().any(|(_, s)| s.restore.is_some());
            let done = match self.command {
                // `umm lazy-pages`: once CRIU said the tree is restored and nothing is
                // unfinished, or everything was stopped.
                _ if self.criu.is_some() => {
                    (self.criu.as_ref().is_some_and(|c| c.finished()) && !restoring)
                        || self.restore.stopped_all
                }
                // With a command: once it exited and nothing it handed over is unfinished
                // (it may have handed nothing over at all).
                Some(_) => self.command_status.is_some() && !restoring,
                // Without: once restores came and none is unfinished, or all were stopped.
                None => (self.stats.restores > 0 && !restoring) || self.restore.stopped_all,
            };
            if done {
                self.shutdown = Some(Shutdown::RestoreDone(self.command_status));
            }
        } else if let Some(code) = self.command_status {
            self.shutdown = Some(Shutdown::CommandExited(code));
        } else if let Some(pid) = self.attached {
            if self.detached || !self.spaces.iter().any(|(_, s)| s.pid == Some(pid)) {
                self.shutdown = Some(Shutdown::AttachEnded);
            }
        }
    }

    fn dispatch(&mut self, data: u64) {
        match Token::decode(data) {
            Some(Token::Listener) => self.accept_peers(),
            Some(Token::Timer) => self.on_tick(),
            Some(Token::Signals) => self.on_signals(),
            Some(Token::Peer(t)) => {
                if let Some(id) = self.peers.resolve(t) {
                    self.on_peer_readable(id);
                }
            }
            Some(Token::Uffd(t)) => {
                if let Some(id) = self.spaces.resolve(t) {
                    self.to_drain.push(id);
                }
            }
            Some(Token::Handoff) => self.on_handoff_readable(),
            // A CRIU page server (lazy-pages) or an umm one (restore --source): never both.
            Some(Token::PageServer) if self.restore.net.is_some() => self.on_net_readable(),
            Some(Token::PageServer) => self.on_page_server_readable(),
            Some(Token::Tracer) => self.on_tracer_readable(),
            Some(Token::ControlListener) => self.accept_control(false),
            Some(Token::MetricsListener) => self.accept_control(true),
            Some(Token::ControlConn(t)) => {
                if let Some(id) = self.control.as_ref().and_then(|c| c.resolve(t)) {
                    self.on_control_conn(id);
                }
            }
            Some(Token::Pidfd(t)) => {
                if let Some(id) = self.spaces.resolve(t) {
                    self.on_process_exit(id);
                }
            }
            None => log::warn!("epoll returned an unknown token {data:#x}"),
        }
    }

    // ----- uffd draining and layout events -------------------------------------------------

    /// Step 2: drain every uffd that was reported readable, and every FORK child created
    /// while doing so.
    pub(crate) fn drain_readable(&mut self) {
        while let Some(id) = self.to_drain.pop() {
            self.drain_space(id);
        }
    }

    /// Read everything the space's uffd has, applying events in order.
    pub(crate) fn drain_space(&mut self, id: Id) {
        let mut buf = std::mem::take(&mut self.event_buf);
        buf.clear();
        let res = match self.spaces.get(id) {
            Some(s) if !s.read_blocked => s.uffd.read_events(&mut buf),
            _ => {
                self.event_buf = buf;
                return;
            }
        };
        let now = Instant::now();
        for ev in buf.drain(..) {
            self.apply_event(id, ev, now);
        }
        self.event_buf = buf;
        if res.is_ok() {
            if let Some(s) = self.spaces.get_mut(id) {
                s.fd_exhausted_since = None;
            }
        }
        if let Err(e) = res {
            match e.errno {
                Errno::EMFILE | Errno::ENFILE => self.fd_exhausted(id),
                _ if e.mm_gone() => self.close_space(id, "its address space is gone"),
                _ => self.give_up(id, &format!("{e}")),
            }
        }
    }

    fn apply_event(&mut self, id: Id, ev: Result<Event, UnknownEvent>, now: Instant) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(unknown) => {
                self.stats.unknown_events += 1;
                log::warn!("{}: {unknown}; ignored", self.describe_space(id));
                return;
            }
        };
        let pid = self.spaces.get(id).and_then(|s| s.pid).unwrap_or(0);
        let layout_event = match ev {
            Event::Pagefault {
                addr, write, tid, ..
            } => {
                self.stats.faults += 1;
                if let Some(s) = self.spaces.get_mut(id) {
                    s.faults += 1;
                    s.dirty = true;
                }
                self.faults.push_back(PendingFault {
                    space: id,
                    addr,
                    write,
                    tid,
                    read_at: now,
                    failing_since: None,
                    retry_at: None,
                });
                return;
            }
            Event::Fork { child_uffd } => {
                self.stats.forks += 1;
                if let Some(child) = self.adopt_fork_child(id, child_uffd) {
                    if let Some(t) = &mut self.trace {
                        t.write(
                            id.index as usize,
                            pid,
                            Record::Fork {
                                child: child.index as usize,
                            },
                        );
                    }
                }
                return;
            }
            Event::Remap { from, to, len } => {
                self.stats.remaps += 1;
                if let Some(t) = &mut self.trace {
                    t.write(id.index as usize, pid, Record::Remap { from, to, len });
                }
                LayoutEvent::Remap { from, to, len }
            }
            Event::Remove { start, end } => {
                self.stats.removes += 1;
                if let Some(t) = &mut self.trace {
                    t.write(id.index as usize, pid, Record::Remove { start, end });
                }
                LayoutEvent::Remove { start, end }
            }
            Event::Unmap { start, end } => {
                self.stats.unmaps += 1;
                if let Some(t) = &mut self.trace {
                    t.write(id.index as usize, pid, Record::Unmap { start, end });
                }
                LayoutEvent::Unmap { start, end }
            }
        };
        if let Some(s) = self.spaces.get_mut(id) {
            let before = s.layout.registered_bytes();
            s.layout.apply(layout_event);
            s.dirty = true;
            let after = s.layout.registered_bytes();
            self.stats.registered_delta(before, after);
        }
    }

    /// A FORK event: the child's uffd is in our fd table; its model is the parent's at this
    /// instant (pages missing in the parent are missing in the child too).
    fn adopt_fork_child(&mut self, parent: Id, child_uffd: std::os::fd::OwnedFd) -> Option<Id> {
        let p = self.spaces.get(parent)?;
        let mut child = Space::new(
            umm::uffd::Uffd::from_owned(child_uffd),
            p.layout.clone(),
            Origin::Fork { parent },
            crate::space::FaultAround::new(self.cfg.fault_around_min, self.cfg.fault_around_max),
        );
        child.same_pidns = p.same_pidns;
        child.exe = p.exe.clone();
        child.restore = p.restore.as_ref().map(|r| r.for_child());
        if let (Some(_), Some(ppid)) = (&child.restore, p.pid) {
            forked_layout_exceptions(ppid, &mut child.layout);
        }
        let registered = child.layout.registered_bytes();
        let id = self.spaces.insert(child);
        let space = self.spaces.get(id).expect("just inserted");
        if let Err(e) = self
            .epoll
            .add(space.uffd.as_fd(), event_for(Token::Uffd(id)))
        {
            let why = format!("its forked child cannot be polled: epoll add failed: {e}");
            self.spaces.remove(id);
            if self.spaces.get(parent).is_some_and(|p| p.restore.is_some()) {
                // The child's memory would read zeros: stop the restore.
                self.fail_stop(&format!("{}: {why}", self.describe_space(parent)));
            } else {
                log::error!("{}: {why}", self.describe_space(parent));
            }
            return None;
        }
        self.stats.processes += 1;
        self.stats.registered_delta(0, registered);
        self.keep(id);
        // The child may already be faulting: drain it in this turn.
        self.to_drain.push(id);
        Some(id)
    }

    /// EMFILE/ENFILE while reading: a FORK fd could not be installed and the forking parent
    /// stays blocked until we read again. Free what we can, stop polling this uffd until the
    /// next tick (level-triggered epoll would spin), and retry then. If fds stay exhausted for
    /// [`FD_EXHAUSTION_LIMIT`], give up on this space (fail-open): closing its uffd completes
    /// the pending fork, so the parent never stays stuck.
    fn fd_exhausted(&mut self, id: Id) {
        let now = Instant::now();
        let since = match self.spaces.get_mut(id) {
            Some(s) => *s.fd_exhausted_since.get_or_insert(now),
            None => return,
        };
        if since == now {
            log::warn!(
                "{}: out of file descriptors for a forked child's uffd; closing dead address \
                 spaces and retrying",
                self.describe_space(id)
            );
        }
        self.probe_all();
        if now.duration_since(since) >= FD_EXHAUSTION_LIMIT {
            // Track mode: closing the uffd completes the fork on plain memory. A restore
            // cannot go on without its memory: its process is stopped instead.
            self.give_up(
                id,
                &format!(
                    "still out of file descriptors after {FD_EXHAUSTION_LIMIT:?} for a forked \
                     child's uffd (raise RLIMIT_NOFILE)"
                ),
            );
            return;
        }
        if let Some(s) = self.spaces.get_mut(id) {
            s.read_blocked = true;
            let _ = self.epoll.modify(
                s.uffd.as_fd(),
                &mut EpollEvent::new(EpollFlags::empty(), Token::Uffd(id).encode()),
            );
        }
    }

    // ----- address-space lifetime ----------------------------------------------------------

    pub(crate) fn describe_space(&self, id: Id) -> String {
        self.spaces
            .get(id)
            .map(|s| s.describe(id))
            .unwrap_or_else(|| format!("space {} (closed)", id.index))
    }

    /// Close a space's uffd: the kernel unregisters its ranges and wakes anything blocked, so
    /// the process (if alive) continues on normal memory.
    pub(crate) fn close_space(&mut self, id: Id, why: &str) {
        let Some(space) = self.spaces.remove(id) else {
            return;
        };
        log::debug!("{}: closed ({why})", space.describe(id));
        if let Some(c) = &mut self.criu {
            c.space_closed(id, &space, why);
        }
        let _ = self.epoll.delete(space.uffd.as_fd());
        if let Some(p) = &space.pidfd {
            let _ = self.epoll.delete(p.as_fd());
        }
        if space.restore.is_some() {
            self.unkeep(id);
        }
        self.stats
            .registered_delta(space.layout.registered_bytes(), 0);
        self.stats.spaces_closed += 1;
        if let Some(t) = &mut self.trace {
            t.write(id.index as usize, space.pid.unwrap_or(0), Record::Exit);
        }
    }

    fn on_process_exit(&mut self, id: Id) {
        // The pidfd says the process is gone. Its mm may already be released; either way
        // nothing will fault on this uffd again.
        self.close_space(id, "process exited");
    }

    /// Is the space's mm still alive? `UFFDIO_ZEROPAGE` at address 0 changes nothing: ENOENT
    /// (or EAGAIN while events are pending) while the mm lives, ESRCH once it is gone.
    pub(crate) fn probe(&mut self, id: Id) -> bool {
        let gone = match self.spaces.get(id) {
            Some(s) => matches!(s.uffd.zeropage(0, umm::PAGE_SIZE, true), Err(e) if e.mm_gone()),
            None => return false,
        };
        if gone {
            self.close_space(id, "address space gone (exit or exec)");
        }
        !gone
    }

    pub(crate) fn probe_all(&mut self) {
        for id in self.spaces.ids() {
            self.probe(id);
        }
    }

    // ----- timer ---------------------------------------------------------------------------

    /// accept(2) failed (out of fds): stop polling the listener until the next tick. Logged
    /// once per episode.
    pub(crate) fn pause_listener(&mut self, e: &io::Error) {
        if self.listener_paused_since.is_none() {
            log::warn!("accept failed: {e}; new connections wait until fds are free");
        }
        self.listener_paused_since.get_or_insert_with(Instant::now);
        if !self.listener_paused {
            self.listener_paused = true;
            let _ = self.epoll.modify(
                &self.listener,
                &mut EpollEvent::new(EpollFlags::empty(), Token::Listener.encode()),
            );
        }
    }

    /// The timer's interval: [`TICK`], or `fast` while processes without an agent are
    /// watched for new mappings ([`crate::attach`]).
    pub(crate) fn set_tick(&mut self, fast: Option<Duration>) {
        if fast == self.fast_tick {
            return;
        }
        let every = fast.unwrap_or(TICK);
        match self.timer.set(
            Expiration::Interval(TimeSpec::from_duration(every)),
            TimerSetTimeFlags::empty(),
        ) {
            Ok(()) => self.fast_tick = fast,
            Err(e) => log::warn!("cannot set the loop's timer to {every:?}: {e}"),
        }
    }

    fn on_tick(&mut self) {
        let _ = self.timer.wait(); // non-blocking fd: just consumes the expirations
        let now = Instant::now();
        if let Some(since) = self.listener_paused_since {
            // A quiet second ends the episode; the next failure is logged again.
            if !self.listener_paused && now.duration_since(since) > Duration::from_secs(1) {
                self.listener_paused_since = None;
            }
        }
        if self.listener_paused {
            self.listener_paused = false;
            let _ = self
                .epoll
                .modify(&self.listener, &mut event_for(Token::Listener));
        }
        self.expire_handshakes(now);
        // Spaces whose reads were blocked by fd exhaustion get another chance.
        for id in self.spaces.ids() {
            if let Some(s) = self.spaces.get_mut(id) {
                if s.read_blocked {
                    s.read_blocked = false;
                    let _ = self
                        .epoll
                        .modify(s.uffd.as_fd(), &mut event_for(Token::Uffd(id)));
                    self.to_drain.push(id);
                }
            }
        }
        // Exit detection for spaces without a pidfd (forked children whose pid is not known
        // yet) every 100 ms; every space once a second, for mms an exec replaced while the
        // process lives on (a pidfd only reports exit; an exec'd agent's new handoff and the
        // old agent's socket closing catch most execs at once).
        if now.duration_since(self.last_probe) >= Duration::from_millis(100) {
            let all = now.duration_since(self.last_full_probe) >= Duration::from_secs(1);
            self.last_probe = now;
            if all {
                self.last_full_probe = now;
            }
            for id in self.spaces.ids() {
                let due = all || self.spaces.get(id).is_some_and(|s| s.pidfd.is_none());
                if due {
                    self.probe(id);
                }
            }
        }
        self.watch_agentless(now);
        self.rescan_due(now);
        self.control_tick(now);
        self.attach_tick();
        self.restore_progress_tick();
        let handed_over = self.stats.handoffs != self.handoffs_at_last_coverage;
        self.handoffs_at_last_coverage = self.stats.handoffs;
        self.sample_coverage(handed_over);
        if let Some(t) = &mut self.trace {
            t.flush();
        }
    }

    /// Coverage as DESIGN.md defines it, over every live process with a known pid in track
    /// mode: the helper samples them; the loop only tells it which. Restoring processes are
    /// not sampled: only their image's ranges are registered, by design, and walking their
    /// page tables (smaps) while they fill took ~5% of the manager's CPU in a 1 GiB restore.
    fn sample_coverage(&mut self, now: bool) {
        let Some(sampler) = &self.coverage else {
            return;
        };
        let mut pids: Vec<u32> = self
            .spaces
            .iter()
            .filter(|(_, s)| s.restore.is_none())
            .filter_map(|(_, s)| s.pid)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        sampler.set_pids(pids, now);
    }

    /// The coverage samples so far, into the stats (for the report).
    pub fn collect_coverage(&mut self) {
        if let Some(sampler) = &self.coverage {
            let (last, min, samples) = sampler.result();
            self.stats.coverage_last = last;
            self.stats.coverage_min = min;
            self.stats.coverage_samples = samples;
        }
    }

    // ----- signals -------------------------------------------------------------------------

    fn on_signals(&mut self) {
        loop {
            let info = match self.signals.as_mut().map(|s| s.read_signal()) {
                Some(Ok(Some(info))) => info,
                _ => return,
            };
            let sig = info.ssi_signo as i32;
            match Signal::try_from(sig) {
                Ok(Signal::SIGCHLD) => self.reap_children(),
                Ok(s @ (Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP)) => {
                    if let Some(cmd) = self.command.filter(|_| self.command_status.is_none()) {
                        // Forward what a process sent us. A terminal's signal (SI_KERNEL) already
                        // reached the command in the same foreground process group.
                        if info.ssi_code != libc::SI_KERNEL {
                            log::info!("forwarding {s} to the command (pid {cmd})");
                            let _ =
                                nix::sys::signal::kill(nix::unistd::Pid::from_raw(cmd as i32), s);
                        }
                    } else if s != Signal::SIGHUP {
                        log::info!("{s} received; shutting down");
                        self.shutdown = Some(Shutdown::Signal(sig));
                    }
                }
                _ => {}
            }
        }
    }

    /// Reap every exited child (we are a subreaper, so orphans land here too); when the
    /// command itself exits, stop.
    ///
    /// Only this thread's children (`__WNOTHREAD`; the command and the orphans are the main
    /// thread's, which runs the loop): a wait for any child of the whole process also takes
    /// the ptrace stops of a process an attach helper thread is tracing, and the helper then
    /// waits in vain (every `attach PID` through `umm run --control` failed that way).
    fn reap_children(&mut self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WNOTHREAD)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if Some(pid.as_raw() as u32) == self.command {
                        self.command_status = Some(code);
                    }
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    if Some(pid.as_raw() as u32) == self.command {
                        self.command_status = Some(128 + sig as i32);
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Close every uffd (targets continue on normal memory) and flush the trace. Restores
    /// still unfinished cannot continue without the manager: their processes are stopped
    /// first (fail-stop), never left to read zeros.
    pub fn finish(&mut self) {
        self.collect_coverage();
        self.coverage = None;
        if self.spaces.iter().any(|(_, s)| s.restore.is_some()) {
            self.fail_stop("the manager is stopping before the restore completed");
        }
        for id in self.spaces.ids() {
            self.close_space(id, "manager stopping");
        }
        // After the close, which releases threads waiting for their events to be read: they
        // could not stop for the tracers' detach (see detach_pid).
        self.stop_all_strict();
        for id in self.peers.ids() {
            self.drop_peer(id, None);
        }
        if let Some(t) = &mut self.trace {
            t.flush();
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn live_spaces(&self) -> usize {
        self.spaces.len()
    }
}

/// What a fork does not copy: a MADV_DONTFORK range is not in the child at all, and a
/// MADV_WIPEONFORK range is empty there. A restore must neither fill the first (there is
/// nothing to fill) nor give the second image data (the program relies on it reading zeros).
/// Read from the parent's smaps while it waits for its FORK event to be read.
fn forked_layout_exceptions(parent: u32, layout: &mut umm::layout::Layout) {
    let (Ok(maps), Ok(flags)) = (proc::read_maps(parent), proc::vm_flags(parent)) else {
        return;
    };
    for m in &maps {
        let Some(f) = flags.get(&m.start) else {
            continue;
        };
        if f.iter().any(|f| f == "dc") {
            layout.unregister(m.range());
        } else if f.iter().any(|f| f == "wf") {
            layout.set_state(m.range(), umm::layout::PageState::Zero, None);
        }
    }
}

pub(crate) fn event_for(token: Token) -> EpollEvent {
    EpollEvent::new(EpollFlags::EPOLLIN, token.encode())
}

/// Block the signals the loop reads through a signalfd, and make that signalfd.
pub fn signal_fd(signals: &[Signal]) -> io::Result<SignalFd> {
    let mut set = SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    set.thread_block()?;
    Ok(SignalFd::with_flags(
        &set,
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )?)
}
