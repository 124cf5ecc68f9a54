//! `umm daemon --socket PATH`: the same loop, long-running, for any process that opts in.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::signal::Signal;

use nix::sys::stat::{umask, Mode};

use umm::sys::{acl, activation, fd as sysfd};

use crate::manager::{self, Manager, Policy};
use crate::stats::Report;
use crate::DaemonArgs;

pub fn write_report(path: &Path, report: &Report) {
    let json = serde_json::to_string_pretty(report).expect("report serializes");
    if let Err(e) = std::fs::write(path, json + "\n") {
        eprintln!("umm: cannot write the report to {}: {e}", path.display());
    }
}

/// The daemon's control socket when `--control` is not given: beside the agents' socket.
pub fn default_control_path(socket: &Path) -> std::path::PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".ctl");
    p.into()
}

pub fn main(args: DaemonArgs) -> i32 {
    match daemon(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umm: {e}");
            1
        }
    }
}

/// Bind the socket so that exactly the allowed peers can reach it: its directory, if umm
/// creates it, is 0700 and the socket 0600 (owner only); each `--allow-uid` adds a POSIX ACL
/// entry (search on a created directory, read-write on the socket). A directory that anyone
/// may write to without the sticky bit is refused (anyone could replace the socket). A live
/// socket is refused, a stale one replaced. SO_PEERCRED is still checked on every connection.
pub(crate) fn bind(path: &Path, allowed: &[u32]) -> Result<UnixListener, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.exists() {
        let mode = std::fs::metadata(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "refusing socket {}: its directory {} is world-writable without the sticky bit \
                 (mode {:o}), so anyone could replace the socket; use a directory only its \
                 owner can write (umm creates a missing one 0700)",
                path.display(),
                dir.display(),
                mode & 0o7777
            ));
        }
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                format!(
                    "cannot create the directory {} for the socket {}: {e}; choose another \
                     --socket, or create the directory",
                    dir.display(),
                    path.display()
                )
            })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        // Other uids need to traverse the directory to reach the socket.
        admit(dir, allowed, acl::EXECUTE)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{} is in use by another manager; stop it or choose another --socket",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    // Owner-only from the start: no window in which others could connect.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|e| {
        format!(
            "cannot listen on {}: {e}; choose another --socket",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    admit(path, allowed, acl::READ | acl::WRITE)?;
    Ok(listener)
}

/// Give the `allowed` uids `perm` on `path` with an access ACL (nothing to do without any).
fn admit(path: &Path, allowed: &[u32], perm: u16) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    let users: Vec<(u32, u16)> = allowed
        .iter()
        .filter(|&&u| u != me)
        .map(|&u| (u, perm))
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    let owner = if path.is_dir() {
        acl::READ | acl::WRITE | acl::EXECUTE
    } else {
        acl::READ | acl::WRITE
    };
    acl::set_access_acl(path, &acl::AccessAcl { owner, users }).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            "; its file system has no POSIX ACLs: put the socket on one that has (ext4, xfs, \
             tmpfs; mount option acl), or drop --allow-uid and grant access yourself"
        } else {
            ""
        };
        format!(
            "cannot let uid(s) {allowed:?} reach {} (POSIX ACL): {e}{hint}",
            path.display()
        )
    })
}

/// The listening socket: the one systemd passed (socket activation), else `--socket` bound
/// here. The bool says whether umm created the socket file (then it removes it at exit; a
/// passed socket belongs to the service manager: never chmod'ed, ACL'ed or unlinked).
fn listen(args: &DaemonArgs) -> Result<(UnixListener, bool), String> {
    match activation::take_listen_fds()? {
        Some(passed) => {
            let path = passed
                .path
                .as_ref()
                .map_or("an unnamed socket".to_string(), |p| p.display().to_string());
            log::info!("socket activation: listening on {path} (passed by the service manager)");
            if passed.ignored > 0 {
                log::warn!(
                    "socket activation passed {} more sockets; umm listens on the first only",
                    passed.ignored
                );
            }
            if !args.allow_uid.is_empty() {
                log::info!(
                    "socket activation: --allow-uid is checked per connection; who may reach \
                     {path} is up to the .socket unit (SocketMode=, SocketUser=, SocketGroup=)"
                );
            }
            Ok((passed.listener, false))
        }
        None => {
            let listener = bind(&args.socket, &args.allow_uid)?;
            log::info!("listening on {}", args.socket.display());
            Ok((listener, true))
        }
    }
}

fn daemon(args: DaemonArgs) -> Result<i32, String> {
    crate::preflight::can_serve()?;
    if let Err(e) = sysfd::raise_fd_limit() {
        log::warn!("cannot raise the fd limit: {e}");
    }
    // Before any thread starts (they inherit the mask): `attach --strict PID` runs tracers.
    crate::strict::block_sigchld()?;
    let (listener, owns_socket) = listen(&args)?;
    let signals = manager::signal_fd(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP])
        .map_err(|e| format!("signalfd: {e}"))?;
    let cfg = args
        .common
        .config(Policy::Uids(args.allow_uid.clone()), args.grant_device);
    let mut mgr =
        Manager::new(listener, cfg, Some(signals)).map_err(|e| format!("cannot start: {e}"))?;
    mgr.sigchld_blocked = true;
    let control_path = args
        .control
        .clone()
        .unwrap_or_else(|| default_control_path(&args.socket));
    let (control, _control_file) = crate::control::open(Some(&control_path), args.metrics)
        .inspect_err(|_| {
            if owns_socket {
                let _ = std::fs::remove_file(&args.socket);
            }
        })?;
    if let Some(c) = control {
        mgr.attach_control(c)
            .map_err(|e| format!("cannot serve the control socket: {e}"))?;
        log::info!("control socket on {}", control_path.display());
    }

    let result = mgr.run();
    let live = mgr.live_spaces();
    mgr.finish();
    if owns_socket {
        let _ = std::fs::remove_file(&args.socket);
    }
    let report = mgr.stats().report(live, None);
    if let Some(path) = &args.common.report {
        write_report(path, &report);
    }
    match result {
        Ok(_) => Ok(0),
        Err(e) => Err(format!("event loop failed: {e}")),
    }
}
