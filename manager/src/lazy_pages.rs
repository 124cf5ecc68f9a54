//! `umm lazy-pages -D DIR`: a drop-in for `criu lazy-pages` (local mode, issue 7).
//!
//! CRIU's side (criu/uffd.c, CRIU 4.x): `criu restore --lazy-pages` connects to
//! `lazy-pages.socket` in its work directory and, for each restored task, sends an `int` pid
//! (native endian) then, unless the pid is negative (a zombie), the task's uffd by SCM_RIGHTS
//! attached to one dummy byte. When the whole tree is restored it sends the `u32` 0x52535446
//! ("RSTF"). Each uffd has been through UFFDIO_API (EVENT_FORK/REMAP/UNMAP/REMOVE); the lazy
//! private anonymous VMAs are registered (MISSING) only later, by CRIU's restorer, after it
//! moved them to their addresses (criu/pie/restorer.c, vma_remap); the task then closes its own
//! copy. By RSTF every task is past that point (CRIU sends it after the tasks' last stage).
//!
//! So here: no UFFDIO_API (it succeeds only once per uffd) and no mm check (its probe would
//! unregister a page of a registered VMA). Each task becomes a restore space of the manager,
//! its layout built from its lazy runs, its pages copied from the mmap'd `pages-N.img`; the
//! restore machinery does the rest (faults first, fork/remap/remove/unmap, the keeper's
//! fail-stop, UNREGISTER then close at completion). The background fill begins at the handoff,
//! but until RSTF a task's VMAs may not all be registered yet: the fill copies into those that
//! are, takes ENOENT as "not registered yet" (moves on, comes back a millisecond later) rather
//! than "nothing to fill", and no task is completed before RSTF (a task completed too early
//! would leave its later faults unanswered).
//!
//! `--page-server --address A --port P` (CRIU's remote mode, after `criu dump --lazy-pages
//! --port P`): the images directory holds the dump's metadata; the lazy pages stay with the
//! dump side and are fetched over TCP from the handoff on (`crate::page_server`).

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::Signal;

use umm::criu::ImageDir;
use umm::layout::{Layout, PageState};
use umm::sys::{fd as sysfd, proc, socket};
use umm::uffd::Uffd;
use umm::PAGE_SIZE;

use crate::keeper::Keeper;
use crate::manager::{self, event_for, Manager, Policy};
use crate::page_server::{PageServerClient, RemoteStore};
use crate::page_source::PageSource;
use crate::restore::{RestoreConfig, RestoreState};
use crate::slab::{Id, Token};
use crate::space::{FaultAround, Origin, Space};

/// The socket's name in the work directory (CRIU's `LAZY_PAGES_SOCK_NAME`).
pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// "ReSTore Finished" (CRIU's `LAZY_PAGES_RESTORE_FINISHED`).
pub const RESTORE_FINISHED: u32 = 0x5253_5446;

/// Smallest background chunk (as `umm restore`).
const CHUNK_MIN: u64 = 256 * 1024;
/// Reads of the handoff connection per loop turn.
const READS_PER_TURN: usize = 16;

#[derive(Args, Debug)]
pub struct LazyPagesArgs {
    /// The CRIU images directory (`criu dump -D`).
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: PathBuf,
    /// Where lazy-pages.socket is created (CRIU's work directory; default: the images
    /// directory).
    #[arg(short = 'W', long = "work-dir", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Log to FILE instead of stderr (relative to the work directory, as CRIU does).
    #[arg(short = 'o', long = "log-file", value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// More log detail (-v: info, -vv and more: debug), unless RUST_LOG says otherwise.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Write a JSON report of what was served to FILE at the end.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Serve faults only: no background fill.
    #[arg(long)]
    pub no_background: bool,
    /// Bound the background fill to this many bytes per second.
    #[arg(long, value_name = "BYTES_PER_S")]
    pub fill_rate: Option<u64>,
    /// Threads copying the background fill while no fault waits: 1 (the loop) or 2 (the
    /// loop and a second copier) [default: 2 when the manager may run on two or more CPUs,
    /// else 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=2))]
    pub fill_threads: Option<u8>,
    /// Fetch the lazy pages from CRIU's page server (`criu dump --lazy-pages --port P`)
    /// instead of the images' pages files.
    #[arg(long, requires = "port")]
    pub page_server: bool,
    /// The page server's address (with --page-server).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub address: String,
    /// The page server's TCP port (with --page-server).
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
}

/// What `criu restore` sends on the connection.
#[derive(Debug)]
pub enum HandoffMsg {
    Task { pid: u32, uffd: OwnedFd },
    Zombie { pid: u32 },
    Finished,
}

/// The byte stream from `criu restore`, cut into messages; fds are queued as they arrive
/// (each comes with the dummy byte that follows its pid).
#[derive(Default)]
pub struct HandoffParser {
    buf: VecDeque<u8>,
    fds: VecDeque<OwnedFd>,
    /// A pid was read; its uffd (and dummy byte) is next.
    pending_pid: Option<u32>,
    finished: bool,
}

impl HandoffParser {
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        self.buf.extend(bytes);
        self.fds.extend(fds);
    }

    /// The next complete message; None: more bytes are needed.
    pub fn next_msg(&mut self) -> Option<Result<HandoffMsg, String>> {
        if self.finished {
            if !self.buf.is_empty() || !self.fds.is_empty() {
                let (n, f) = (self.buf.len(), self.fds.len());
                self.buf.clear();
                self.fds.clear();
                return Some(Err(format!(
                    "{n} byte(s) and {f} fd(s) after the restore-finished mark"
                )));
            }
            return None;
        }
        if let Some(pid) = self.pending_pid {
            self.buf.pop_front()?;
            self.pending_pid = None;
            return Some(match self.fds.pop_front() {
                Some(uffd) => Ok(HandoffMsg::Task { pid, uffd }),
                None => Err(format!("pid {pid} came without its userfaultfd")),
            });
        }
        if self.buf.len() < 4 {
            return None;
        }
        let raw: [u8; 4] = std::array::from_fn(|_| self.buf.pop_front().unwrap_or_default());
        if u32::from_ne_bytes(raw) == RESTORE_FINISHED {
            self.finished = true;
            return Some(Ok(HandoffMsg::Finished));
        }
        let pid = i32::from_ne_bytes(raw);
        Some(match pid {
            0 | i32::MIN => Err(format!("{pid} is not a pid (raw bytes {raw:02x?})")),
            p if p < 0 => Ok(HandoffMsg::Zombie {
                pid: p.unsigned_abs(),
            }),
            p => {
                self.pending_pid = Some(p as u32);
                return self.next_msg();
            }
        })
    }

    /// Bytes or fds received and not yet part of a message.
    pub fn has_partial(&self) -> bool {
        self.pending_pid.is_some() || !self.buf.is_empty()
    }
}

/// One task handed over, for the summary.
pub struct Task {
    pub image_pid: u32,
    pub live_pid: Option<u32>,
    pub space: Id,
    pub lazy_bytes: u64,
    pub started: Instant,
    /// Set when its space closed: (why, bytes served by faults, by the fill, time).
    pub end: Option<(String, u64, u64, Duration)>,
}

/// The handoff connection and what came over it.
pub struct Handoff {
    images: ImageDir,
    conn: Option<UnixStream>,
    /// `criu restore`'s pid (SO_PEERCRED): the restored tasks are its descendants.
    peer_pid: Option<u32>,
    parser: HandoffParser,
    seen: HashSet<u32>,
    rstf: bool,
    pub tasks: Vec<Task>,
    pub zombies: u32,
    /// Why the handoff failed, if it did.
    pub broken: Option<String>,
    /// `--page-server`: where the lazy pages come from.
    pub remote: Option<PageServerClient>,
}

impl Handoff {
    /// CRIU said the tree is restored (or the handoff failed: nothing more will come).
    pub fn finished(&self) -> bool {
        self.rstf || self.broken.is_some()
    }

    /// A space closed: if it is a handed-over task, note how it ended.
    pub fn space_closed(&mut self, id: Id, space: &Space, why: &str) {
        let Some(t) = self
            .tasks
            .iter_mut()
            .find(|t| t.space == id && t.end.is_none())
        else {
            return;
        };
        let served = space.pages_served * PAGE_SIZE;
        let filled = space.restore.as_ref().map_or(0, |r| r.filled);
        t.end = Some((
            why.to_string(),
            served.saturating_sub(filled),
            filled,
            t.started.elapsed(),
        ));
    }
}

pub fn main(args: LazyPagesArgs) -> i32 {
    match lazy_pages(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umm: lazy-pages: {e}");
            1
        }
    }
}

/// The log level `-v` asks for, as a RUST_LOG filter (None: leave the default).
pub fn log_filter(verbose: u8) -> Option<&'static str> {
    match verbose {
        0 => None,
        1 => Some("info"),
        _ => Some("debug"),
    }
}

fn lazy_pages(args: LazyPagesArgs) -> Result<i32, String> {
    crate::preflight::can_serve()?;
    if let Err(e) = sysfd::raise_fd_limit() {
        log::warn!("cannot raise the fd limit: {e}");
    }
    let images = ImageDir::open(&args.images_dir).map_err(|e| e.to_string())?;
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.images_dir.clone());
    if let Some(log) = &args.log_file {
        let path = work_dir.join(log);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
        sysfd::redirect_stderr(file.as_fd())
            .map_err(|e| format!("cannot log to {}: {e}", path.display()))?;
    }
    // Before the handoff, as the dump side is already waiting: a wrong address fails now.
    let remote = match args.port.filter(|_| args.page_server) {
        Some(port) => {
            let addr = if args.address.contains(':') {
                format!("[{}]:{port}", args.address)
            } else {
                format!("{}:{port}", args.address)
            };
            let client =
                PageServerClient::connect(&addr).map_err(|e| format!("page server: {e}"))?;
            log::info!("connected to the page server at {addr}");
            Some(client)
        }
        None => None,
    };
    let socket_path = work_dir.join(SOCKET_NAME);
    // Like CRIU: a stale socket from an earlier run is replaced.
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .map_err(|e| format!("cannot listen on {}: {e}", socket_path.display()))?;
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", socket_path.display()))?;
    log::info!(
        "serving the lazy pages of {} ({} task(s)); waiting for criu restore on {}",
        args.images_dir.display(),
        images.pstree().pids().count(),
        socket_path.display()
    );
    // One connection, as CRIU's daemon: then nobody else can connect.
    let accepted = listener.accept();
    let _ = std::fs::remove_file(&socket_path);
    let (conn, _) = accepted.map_err(|e| format!("accept on {}: {e}", socket_path.display()))?;
    conn.set_nonblocking(true)
        .map_err(|e| format!("handoff socket: {e}"))?;
    let peer_pid = socket::peer_cred(&conn).ok().map(|c| c.pid);
    log::info!("criu restore connected (pid {peer_pid:?})");

    let keeper = Keeper::spawn(None).map_err(|e| format!("cannot start the keeper: {e}"))?;
    let signals = manager::signal_fd(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP])
        .map_err(|e| format!("signalfd: {e}"))?;
    let mut cfg = manager::Config {
        policy: Policy::Uids(vec![]),
        ..manager::Config::default()
    };
    cfg.restore = Some(RestoreConfig {
        image: None,
        image_dir: args.images_dir.clone(),
        background: !args.no_background,
        fill_rate: args.fill_rate.filter(|&r| r > 0),
        chunk_min: CHUNK_MIN,
        chunk_max: 2 << 20,
        prefetch: Arc::new(Vec::new()),
        cgroup: None,
        fill_threads: crate::copier::fill_threads(args.fill_threads),
    });
    let mut mgr =
        Manager::new(listener, cfg, Some(signals)).map_err(|e| format!("cannot start: {e}"))?;
    // The listener is done with (one connection): agents have no business here.
    let _ = mgr.epoll.delete(&mgr.listener);
    mgr.restore.keeper = Some(keeper);
    mgr.epoll
        .add(&conn, event_for(Token::Handoff))
        .map_err(|e| format!("epoll: {e}"))?;
    if let Some(client) = &remote {
        mgr.epoll
            .add(client.wake_fd(), event_for(Token::PageServer))
            .map_err(|e| format!("epoll: {e}"))?;
    }
    mgr.criu = Some(Handoff {
        images,
        conn: Some(conn),
        peer_pid,
        parser: HandoffParser::default(),
        seen: HashSet::new(),
        rstf: false,
        tasks: Vec::new(),
        zombies: 0,
        broken: None,
        remote,
    });
    let result = mgr.run();
    let live = mgr.live_spaces();
    mgr.finish();
    if let Some(k) = mgr.restore.keeper.take() {
        k.finish();
    }
    result.map_err(|e| format!("event loop failed: {e}"))?;
    let mut page_server = None;
    if let Some(mut client) = mgr.criu.as_mut().and_then(|h| h.remote.take()) {
        let broken = mgr.criu.as_ref().is_some_and(|h| h.broken.is_some());
        if !broken {
            // After the close: replies still in flight then are counted too.
            if let Err(e) = client.close() {
                log::warn!("closing the page server connection: {e}");
            }
        }
        let r = client.report();
        eprintln!(
            "umm: lazy-pages: page server {}: {} requests, {} short replies, {} pages fetched, \
             {} bytes fetched",
            r.peer, r.requests, r.short_replies, r.pages_fetched, r.bytes_fetched
        );
        page_server = Some(r);
    }
    let failed = mgr.restore.failed.clone();
    let mut report = mgr.stats().report(live, None);
    if let Some(r) = &mut report.restore {
        r.failed = failed.clone();
        r.page_server = page_server;
    }
    if let Some(path) = &args.report {
        crate::daemon::write_report(path, &report);
    }
    if let Some(h) = &mgr.criu {
        for t in &h.tasks {
            eprintln!("{}", task_summary(t));
        }
        if h.zombies > 0 {
            eprintln!("umm: lazy-pages: {} zombie(s) handed over", h.zombies);
        }
    }
    if let Some(f) = &failed {
        eprintln!("umm: lazy-pages: STOPPED: {f}");
    }
    Ok(if failed.is_some() { 1 } else { 0 })
}

/// Where a task's lazy pages come from, for the log.
fn h_source(h: &Option<Handoff>, pages: &std::path::Path) -> String {
    match h.as_ref().and_then(|h| h.remote.as_ref()) {
        Some(c) => format!("the page server at {}", c.peer()),
        None => pages.display().to_string(),
    }
}

/// `umm: lazy-pages: pid 26975 (pid 4242 here): restore complete: 5131 lazy pages, 12 by
/// faults, 5119 by the fill, in 0.412 s`.
fn task_summary(t: &Task) -> String {
    let pages = t.lazy_bytes / PAGE_SIZE;
    let here = t
        .live_pid
        .filter(|&l| l != t.image_pid)
        .map(|l| format!(" (pid {l} here)"))
        .unwrap_or_default();
    match &t.end {
        Some((why, faulted, filled, took)) => format!(
            "umm: lazy-pages: pid {}{here}: {why}: {pages} lazy pages, {} by faults, {} by the \
             fill, in {:.3} s",
            t.image_pid,
            faulted / PAGE_SIZE,
            filled / PAGE_SIZE,
            took.as_secs_f64()
        ),
        None => format!(
            "umm: lazy-pages: pid {}{here}: unfinished ({pages} lazy pages)",
            t.image_pid
        ),
    }
}

/// The live process (in this manager's pid namespace) that is task `image_pid` of the
/// images: a descendant of `criu restore` whose pid in its own namespace is `image_pid` (CRIU
/// restores the dumped pids, in a new pid namespace or in ours).
fn live_pid(image_pid: u32, peer: Option<u32>) -> Option<u32> {
    let peer = peer?;
    let mut queue = vec![peer];
    let mut i = 0;
    // Bounded: a restored tree plus CRIU's helpers.
    while i < queue.len() && queue.len() < 65_536 {
        let pid = queue[i];
        i += 1;
        if pid != peer && proc::innermost_pid(pid).ok() == Some(image_pid) {
            return Some(pid);
        }
        if let Ok(kids) = proc::children(pid) {
            queue.extend(kids);
        }
    }
    None
}

impl Manager {
    /// The handoff connection is readable: read what is there and act on every complete
    /// message. A protocol violation or a connection closed before RSTF fails the restore.
    pub(crate) fn on_handoff_readable(&mut self) {
        let mut chunk = [0u8; 4096];
        for _ in 0..READS_PER_TURN {
            let Some(h) = &mut self.criu else { return };
            let Some(conn) = &h.conn else { return };
            let got = match socket::recv_with_fds(conn.as_fd(), &mut chunk) {
                Ok(g) => g,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.handoff_failed(&format!("reading the handoff: {e}")),
            };
            if got.len == 0 {
                let h = self.criu.as_mut().expect("checked above");
                if let Some(conn) = h.conn.take() {
                    let _ = self.epoll.delete(&conn);
                }
                if !h.rstf {
                    let partial = if h.parser.has_partial() {
                        " in the middle of a message"
                    } else {
                        ""
                    };
                    return self.handoff_failed(&format!(
                        "criu restore closed the connection{partial} before the \
                         restore-finished mark (RSTF): the restore failed"
                    ));
                }
                log::debug!("criu restore closed the handoff connection");
                return;
            }
            if got.truncated {
                return self.handoff_failed("more fds in one message than a handoff has");
            }
            h.parser.push(&chunk[..got.len], got.fds);
            loop {
                let Some(h) = &mut self.criu else { return };
                let Some(msg) = h.parser.next_msg() else {
                    break;
                };
                let r = match msg {
                    Ok(HandoffMsg::Task { pid, uffd }) => self.criu_task(pid, uffd),
                    Ok(HandoffMsg::Zombie { pid }) => self.criu_zombie(pid),
                    Ok(HandoffMsg::Finished) => {
                        h.rstf = true;
                        log::info!(
                            "criu restore finished restoring the tree ({} task(s) handed over)",
                            h.tasks.len()
                        );
                        self.release_held_tasks();
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    return self.handoff_failed(&e);
                }
            }
        }
    }

    /// RSTF: every task's lazy VMAs are registered now: ENOENT means "nothing there" from now
    /// on; complete the tasks with nothing missing.
    fn release_held_tasks(&mut self) {
        let Some(h) = &self.criu else { return };
        let ids: Vec<Id> = h
            .tasks
            .iter()
            .filter(|t| t.end.is_none())
            .map(|t| t.space)
            .collect();
        for id in ids {
            if let Some(s) = self.spaces.get_mut(id) {
                if let Some(r) = s.restore.as_mut() {
                    r.awaiting_registration = false;
                }
                s.retry_at = None;
            }
            self.complete(id);
        }
    }

    /// Replies from the page server: take them, wake what waited for them. A failed
    /// connection stops the restore (its missing pages must not read as zeros).
    pub(crate) fn on_page_server_readable(&mut self) {
        let Some(client) = self.criu.as_mut().and_then(|h| h.remote.as_mut()) else {
            return;
        };
        let peer = client.peer().to_string();
        match client.on_readable() {
            Ok(0) => {}
            Ok(_) => {
                // The fill waits on spaces with a retry time; faults are parked and retried
                // every turn.
                for id in self.spaces.ids() {
                    if let Some(s) = self.spaces.get_mut(id).filter(|s| {
                        s.restore
                            .as_ref()
                            .is_some_and(|r| matches!(r.source, PageSource::Remote(_)))
                    }) {
                        s.retry_at = None;
                    }
                }
            }
            Err(e) => {
                if let Some(h) = &mut self.criu {
                    h.broken
                        .get_or_insert_with(|| format!("page server {peer}: {e}"));
                    if let Some(c) = h.remote.as_ref() {
                        let _ = self.epoll.delete(c.wake_fd());
                    }
                }
                self.fail_stop(&format!("page server {peer}: {e}"));
            }
        }
    }

    /// Hand the page server what faults and the fill asked for this turn.
    pub(crate) fn pump_page_server(&mut self) {
        if let Some(client) = self.criu.as_mut().and_then(|h| h.remote.as_mut()) {
            client.pump();
        }
    }

    /// The handoff cannot go on: say why, drop the connection, stop what was handed over.
    fn handoff_failed(&mut self, why: &str) {
        let Some(h) = &mut self.criu else { return };
        if h.broken.is_some() {
            return;
        }
        h.broken = Some(why.to_string());
        if let Some(conn) = h.conn.take() {
            let _ = self.epoll.delete(&conn);
        }
        self.fail_stop(&format!("lazy-pages handoff: {why}"));
    }

    /// A pid must be in the tree, and handed over once.
    fn criu_check_pid(&mut self, pid: u32) -> Result<(), String> {
        let h = self.criu.as_mut().ok_or("no handoff")?;
        if h.images.pstree().get(pid).is_none() {
            return Err(format!(
                "pid {pid} is not in the images' process tree ({})",
                h.images.path().join("pstree.img").display()
            ));
        }
        if !h.seen.insert(pid) {
            return Err(format!("pid {pid} was handed over twice"));
        }
        Ok(())
    }

    fn criu_zombie(&mut self, pid: u32) -> Result<(), String> {
        self.criu_check_pid(pid)?;
        log::info!("pid {pid}: a zombie (nothing to serve)");
        if let Some(h) = &mut self.criu {
            h.zombies += 1;
        }
        Ok(())
    }

    /// Task `pid` handed over its uffd: make it a restore space filled from its pages file.
    fn criu_task(&mut self, pid: u32, uffd: OwnedFd) -> Result<(), String> {
        self.criu_check_pid(pid)?;
        if !sysfd::is_userfaultfd(uffd.as_fd()) {
            return Err(format!(
                "pid {pid}: the fd sent is {}, not a userfaultfd",
                sysfd::describe(uffd.as_fd())
            ));
        }
        let h = self.criu.as_mut().ok_or("no handoff")?;
        let mem = if h.remote.is_some() {
            h.images.task_memory_remote(pid)
        } else {
            h.images.task_memory(pid)
        }
        .map_err(|e| format!("pid {pid}: {e}"))?;
        let source = match &mut h.remote {
            Some(client) => {
                let store = Rc::new(RefCell::new(RemoteStore::new(pid, &mem.lazy_runs)));
                client.add_store(store.clone());
                PageSource::Remote(store)
            }
            None => PageSource::Criu(Arc::new(
                mem.open_pages().map_err(|e| format!("pid {pid}: {e}"))?,
            )),
        };
        let live = live_pid(pid, h.peer_pid);
        // The kernel's registration is CRIU's: the VMAs holding lazy pages. The model
        // registers the same VMAs, zero (or present already) but for the lazy runs.
        let mut layout = Layout::new();
        let mut vmas: Vec<usize> = mem.lazy_runs.iter().map(|r| r.vma).collect();
        vmas.dedup();
        for &v in &vmas {
            layout.register(mem.mm.vmas[v].range(), PageState::Zero, None);
        }
        for run in &mem.lazy_runs {
            layout.set_state(run.range(), PageState::Missing, Some(run.pages_offset));
        }
        let lazy = mem.lazy_bytes();
        let registered = layout.registered_bytes();
        let mut space = Space::new(
            Uffd::from_owned(uffd),
            layout,
            Origin::Handoff,
            FaultAround::new(self.cfg.fault_around_min, self.cfg.fault_around_max),
        );
        space.same_pidns = live.is_some_and(|l| {
            proc::pid_namespace(&l.to_string()).ok() == self.own_pidns && l == pid
        });
        let mut restore = RestoreState::new(source, &[]);
        restore.awaiting_registration = true;
        space.restore = Some(restore);
        let id = self.spaces.insert(space);
        match live {
            Some(l) => self.set_pid(id, l),
            None => log::warn!(
                "pid {pid}: no descendant of criu restore has this pid; if umm dies, the \
                 keeper cannot stop this task (its faults then block instead)"
            ),
        }
        let s = self.spaces.get(id).expect("just inserted");
        if let Err(e) = self.epoll.add(s.uffd.as_fd(), event_for(Token::Uffd(id))) {
            self.spaces.remove(id);
            return Err(format!("pid {pid}: epoll: {e}"));
        }
        self.keep(id);
        self.stats.registered_delta(0, registered);
        self.stats.restores += 1;
        self.stats.handoffs += 1;
        self.stats.processes += 1;
        log::info!(
            "pid {pid} (pid {} here): {} lazy in {} VMA(s), from {}",
            live.map_or("unknown".to_string(), |l| l.to_string()),
            crate::stats::human_bytes(lazy),
            vmas.len(),
            h_source(&self.criu, &mem.pages_path)
        );
        if let Some(h) = &mut self.criu {
            h.tasks.push(Task {
                image_pid: pid,
                live_pid: live,
                space: id,
                lazy_bytes: lazy,
                started: Instant::now(),
                end: None,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        let (r, _w) = nix::unistd::pipe().unwrap();
        r
    }

    #[test]
    fn handoff_stream_cut_anywhere_gives_the_same_messages() {
        let mut bytes = Vec::new();
        bytes.extend(26975i32.to_ne_bytes());
        bytes.push(b'*');
        bytes.extend((-26977i32).to_ne_bytes());
        bytes.extend(RESTORE_FINISHED.to_ne_bytes());
        for cut in 0..bytes.len() {
            // The fd travels with the dummy byte (byte 4), in whichever part holds it.
            let (first_fds, second_fds) = if cut > 4 {
                (vec![fd()], Vec::new())
            } else {
                (Vec::new(), vec![fd()])
            };
            let mut p = HandoffParser::default();
            let mut out = Vec::new();
            for (part, fds) in [(&bytes[..cut], first_fds), (&bytes[cut..], second_fds)] {
                p.push(part, fds);
                while let Some(m) = p.next_msg() {
                    out.push(m.unwrap_or_else(|e| panic!("cut {cut}: {e}")));
                }
            }
            assert!(
                matches!(out[0], HandoffMsg::Task { pid: 26975, .. }),
                "cut {cut}"
            );
            assert!(
                matches!(out[1], HandoffMsg::Zombie { pid: 26977 }),
                "cut {cut}"
            );
            assert!(matches!(out[2], HandoffMsg::Finished), "cut {cut}");
            assert_eq!(out.len(), 3);
        }
    }

    #[test]
    fn a_pid_without_its_fd_is_an_error() {
        let mut p = HandoffParser::default();
        let mut bytes = 26975i32.to_ne_bytes().to_vec();
        bytes.push(b'*');
        p.push(&bytes, Vec::new());
        let e = p.next_msg().unwrap().unwrap_err();
        assert!(e.contains("without its userfaultfd"), "{e}");
    }

    #[test]
    fn garbage_and_trailing_data_are_errors() {
        let mut p = HandoffParser::default();
        p.push(&0i32.to_ne_bytes(), Vec::new());
        assert!(p.next_msg().unwrap().is_err());
        let mut p = HandoffParser::default();
        let mut bytes = RESTORE_FINISHED.to_ne_bytes().to_vec();
        bytes.push(1);
        p.push(&bytes, Vec::new());
        assert!(matches!(p.next_msg(), Some(Ok(HandoffMsg::Finished))));
        assert!(p.next_msg().unwrap().is_err());
    }
}
