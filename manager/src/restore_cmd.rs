//! `umm restore --image DIR [--socket PATH] [-- CMD]`: a manager serving lazy restores of one
//! image, with a fail-stop keeper and (by default) a cgroup holding the restored processes.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nix::sys::signal::Signal;

use umm::image::Image;
use umm::sys::{fd as sysfd, process};

use crate::keeper::Keeper;
use crate::manager::{self, Manager, Policy, Shutdown};
use crate::net_source::NetClient;
use crate::restore::RestoreConfig;
use crate::run::RuntimeDir;
use crate::RestoreArgs;

/// Smallest background chunk.
const CHUNK_MIN: u64 = 256 * 1024;

pub fn main(args: RestoreArgs) -> i32 {
    match restore(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umm: {e}");
            1
        }
    }
}

/// The addresses of a recorded fault order: every `"kind":"fault"` line's `start`, in order.
fn read_prefetch(path: &Path) -> Result<Vec<u64>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the prefetch file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a trace line: {e}", path.display(), n + 1))?;
        if v["kind"] == "fault" {
            if let Some(start) = v["start"].as_u64() {
                out.push(umm::page_floor(start));
            }
        }
    }
    Ok(out)
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid systems), from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// A cgroup for the restored processes: a child of umm's own (cgroup v2), so that fail-stop
/// can kill everything in it, children the manager never heard of included.
struct RestoreCgroup {
    dir: PathBuf,
}

impl RestoreCgroup {
    fn create() -> Result<RestoreCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("no cgroup v2 hierarchy")?;
        let root = cgroup2_mount().ok_or("no cgroup2 file system is mounted")?;
        let parent = root.join(rel.trim_start_matches('/'));
        if !parent.join("cgroup.procs").exists() {
            return Err(format!("{} is not a cgroup v2 directory", parent.display()));
        }
        let dir = parent.join(format!("umm-restore-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(RestoreCgroup { dir })
    }
}

impl Drop for RestoreCgroup {
    /// Move whatever still runs (completed restores) back to umm's own cgroup, then remove it.
    /// (If umm is killed, its keeper does this.)
    fn drop(&mut self) {
        crate::keeper::remove_cgroup(&self.dir);
    }
}

fn restore(args: RestoreArgs) -> Result<i32, String> {
    crate::preflight::can_serve()?;
    if let Err(e) = sysfd::raise_fd_limit() {
        log::warn!("cannot raise the fd limit: {e}");
    }
    // An image directory, or (--source) a page server: connected, authenticated and its
    // manifest read before anything is handed over.
    let (image, net, image_dir) = match (&args.image, &args.source) {
        (Some(dir), _) => {
            let image = Image::open(dir).map_err(|e| {
                format!(
                    "cannot restore from {}: {e} (--image takes a directory written by umm \
                     snapshot)",
                    dir.display()
                )
            })?;
            if args.verify {
                image.verify_all().map_err(|e| format!("{e}"))?;
            }
            let image_dir =
                std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            (Some(Arc::new(image)), None, image_dir)
        }
        (None, Some(url)) => {
            let client = if url.starts_with("http://") || url.starts_with("https://") {
                if args.key.is_some() {
                    return Err(format!("--key is for tcp:// sources, not {url}"));
                }
                if args.tls_server_name.is_some() {
                    return Err(format!(
                        "--tls-server-name is for tcp:// sources, not {url}"
                    ));
                }
                if args.tls_ca.is_some() && url.starts_with("http://") {
                    return Err(format!(
                        "--tls-ca is for tcp:// and https:// sources, not {url}"
                    ));
                }
                let http = crate::http_source::HttpOptions {
                    ca: args.tls_ca.clone(),
                    header_file: args.http_header_file.clone(),
                };
                NetClient::connect_http(url, &http, !args.no_background)?
            } else {
                if args.http_header_file.is_some() {
                    return Err(format!(
                        "--http-header-file is for http(s):// sources, not {url}"
                    ));
                }
                let key_file = args
                    .key
                    .as_ref()
                    .ok_or("--source tcp:// needs --key FILE")?;
                let key = umm::netproto::Key::from_file(key_file)?;
                let tls = match &args.tls_ca {
                    Some(ca) => {
                        let host = crate::net_tls::host_of(crate::net_source::parse_url(url)?);
                        let name = args.tls_server_name.as_deref().unwrap_or(host);
                        Some(crate::net_tls::ClientTls::new(ca, name)?)
                    }
                    None => None,
                };
                NetClient::connect(url, &key, tls.as_ref(), !args.no_background)?
            };
            (None, Some(client), PathBuf::from(url))
        }
        (None, None) => return Err("--image DIR or --source URL is required".into()),
    };
    let image_dir_for_env = image_dir.clone();
    let prefetch = match &args.prefetch {
        Some(p) => read_prefetch(p)?,
        None => Vec::new(),
    };
    // The socket: given, or private to the command.
    // Kept to the end: dropping it removes the private socket and its directory.
    let mut _runtime = None;
    let (listener, socket_path) = match (&args.socket, args.command.is_empty()) {
        (Some(path), _) => (crate::daemon::bind(path, &args.allow_uid)?, path.clone()),
        (None, false) => {
            let rt = RuntimeDir::create()?;
            let l = std::os::unix::net::UnixListener::bind(&rt.socket)
                .map_err(|e| format!("cannot listen on {}: {e}", rt.socket.display()))?;
            std::fs::set_permissions(
                &rt.socket,
                std::os::unix::fs::PermissionsExt::from_mode(0o666),
            )
            .map_err(|e| format!("chmod {}: {e}", rt.socket.display()))?;
            let path = rt.socket.clone();
            _runtime = Some(rt);
            (l, path)
        }
        (None, true) => return Err("--socket PATH is required without a command".into()),
    };
    let cgroup = if args.no_cgroup {
        None
    } else {
        match RestoreCgroup::create() {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!(
                    "no cgroup for the restored processes ({e}); fail-stop kills them by pid"
                );
                None
            }
        }
    };
    let cgroup_dir = cgroup.as_ref().map(|c| c.dir.clone());
    let keeper =
        Keeper::spawn(cgroup_dir.as_ref()).map_err(|e| format!("cannot start the keeper: {e}"))?;
    let mut signals = vec![Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];
    if !args.command.is_empty() {
        signals.push(Signal::SIGCHLD);
    }
    let signals = manager::signal_fd(&signals).map_err(|e| format!("signalfd: {e}"))?;
    let policy = if args.command.is_empty() {
        Policy::Uids(args.allow_uid.clone())
    } else {
        Policy::Tree
    };
    let mut cfg = args.common.config(policy, false);
    cfg.restore = Some(RestoreConfig {
        image,
        image_dir,
        background: !args.no_background,
        fill_rate: args.fill_rate.filter(|&r| r > 0),
        chunk_min: CHUNK_MIN.min(args.fill_chunk_max),
        chunk_max: args.fill_chunk_max.max(CHUNK_MIN),
        prefetch: Arc::new(prefetch),
        cgroup: cgroup_dir.clone(),
        fill_threads: crate::copier::fill_threads(args.fill_threads),
    });
    let mut mgr =
        Manager::new(listener, cfg, Some(signals)).map_err(|e| format!("cannot start: {e}"))?;
    mgr.restore.keeper = Some(keeper);
    if let Some(client) = net {
        mgr.epoll
            .add(
                client.wake_fd(),
                manager::event_for(crate::slab::Token::PageServer),
            )
            .map_err(|e| format!("epoll: {e}"))?;
        mgr.restore.net = Some(client);
    }
    let (control, _control_file) = crate::control::open(args.control.as_deref(), None)?;
    if let Some(c) = control {
        mgr.attach_control(c)
            .map_err(|e| format!("cannot serve the control socket: {e}"))?;
    }
    mgr.restore.keep_running = args.keep_running;
    mgr.progress = Some(crate::progress::Progress::new("restore", args.quiet));
    if !args.no_background {
        let image = mgr.cfg.restore.as_ref().and_then(|r| r.image.clone());
        if let Some(image) = image {
            match crate::readahead::ReadAhead::start(image) {
                Ok(ra) => mgr.restore.readahead = Some(ra),
                Err(e) => log::warn!("no read-ahead helper ({e}); the fill reads the image itself"),
            }
        }
    }
    if !args.command.is_empty() {
        if let Err(e) = process::become_subreaper() {
            log::warn!("cannot become a subreaper: {e}");
        }
        let mut cmd = Command::new(&args.command[0]);
        // Not UMM_SOCKET: that would make an agent loaded into the restorer (to call
        // umm_restore_handoff) try a track-mode handoff of its own.
        cmd.args(&args.command[1..])
            .env("UMM_RESTORE_SOCKET", &socket_path)
            .env("UMM_RESTORE_IMAGE", &image_dir_for_env);
        let spawned = match &cgroup_dir {
            Some(dir) => {
                let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(|_| "cgroup path with a NUL byte".to_string())?;
                process::spawn_unblocked_in_cgroup(&mut cmd, &procs)
            }
            None => process::spawn_unblocked(&mut cmd),
        };
        match spawned {
            Ok(child) => mgr.command = Some(child.id()),
            Err(e) => return Ok(crate::run::cannot_run(&args.command[0], &e)),
        }
    } else {
        log::info!(
            "serving restores of {} on {}",
            image_dir_for_env.display(),
            socket_path.display()
        );
    }
    let result = mgr.run();
    if let Some(mut p) = mgr.progress.take() {
        p.finish();
    }
    let live = mgr.live_spaces();
    mgr.finish();
    if let Some(k) = mgr.restore.keeper.take() {
        k.finish();
    }
    drop(cgroup);
    let _ = std::fs::remove_file(&socket_path);
    let shutdown = result.map_err(|e| format!("event loop failed: {e}"))?;
    let command_status = match shutdown {
        Shutdown::RestoreDone(status) => status,
        Shutdown::CommandExited(code) => Some(code),
        Shutdown::Signal(_) | Shutdown::AttachEnded => mgr.command_status,
    };
    let failed = mgr.restore.failed.clone();
    let mut report = mgr.stats().report(live, command_status);
    if let Some(client) = mgr.restore.net.take() {
        if let Some(r) = &mut report.restore {
            r.network = Some(client.report());
        }
        // Only a finished restore says Complete (the server may then exit): after a failure
        // the connection just closes.
        if failed.is_none() && client.broken.is_none() && live == 0 {
            if let Err(e) = client.complete() {
                log::warn!("page server: {e}");
            }
        }
    }
    if let Some(r) = &mut report.restore {
        r.failed = failed.clone();
    }
    if let Some(path) = &args.common.report {
        crate::daemon::write_report(path, &report);
    }
    if !args.quiet {
        eprintln!("{}", report.summary());
        if let Some(r) = &report.restore {
            eprintln!(
                "umm: restore: {} handed over, {} complete, {} killed; {} filled in the \
                 background{}",
                r.handoffs,
                r.completed,
                r.killed,
                crate::stats::human_bytes(r.background_bytes),
                failed
                    .as_ref()
                    .map(|f| format!("; STOPPED: {f}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(match (command_status, &failed) {
        (Some(code), None) => code,
        (Some(0), Some(_)) | (None, Some(_)) => 1,
        (Some(code), Some(_)) => code,
        (None, None) => 0,
    })
}
