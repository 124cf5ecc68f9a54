//! `umm daemon --socket PATH`: the same loop, long-running, for any process that opts in.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::signal::Signal;

use umm::sys::fd as sysfd;

use crate::manager::{self, Manager, Policy};
use crate::stats::Report;
use crate::DaemonArgs;

pub fn write_report(path: &Path, report: &Report) {
    let json = serde_json::to_string_pretty(report).expect("report serializes");
    if let Err(e) = std::fs::write(path, json + "\n") {
        eprintln!("umm: cannot write the report to {}: {e}", path.display());
    }
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

/// Bind the socket: create its directory (0700, or 0711 when other uids may connect) if missing, refuse a live socket, replace a
/// stale one.
pub(crate) fn bind(path: &Path, open_to_all: bool) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            // Other uids need to traverse the directory to reach a socket open to them.
            let mode = if open_to_all { 0o711 } else { 0o700 };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        }
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
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let mode = if open_to_all { 0o666 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(listener)
}

fn daemon(args: DaemonArgs) -> Result<i32, String> {
    if let Err(e) = sysfd::raise_fd_limit() {
        log::warn!("cannot raise the fd limit: {e}");
    }
    let listener = bind(&args.socket, !args.allow_uid.is_empty())?;
    let signals = manager::signal_fd(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP])
        .map_err(|e| format!("signalfd: {e}"))?;
    let cfg = args
        .common
        .config(Policy::Uids(args.allow_uid.clone()), args.grant_device);
    let mut mgr =
        Manager::new(listener, cfg, Some(signals)).map_err(|e| format!("cannot start: {e}"))?;
    log::info!("listening on {}", args.socket.display());
    let result = mgr.run();
    let live = mgr.live_spaces();
    mgr.finish();
    let _ = std::fs::remove_file(&args.socket);
    let report = mgr.stats().report(live, None);
    if let Some(path) = &args.common.report {
        write_report(path, &report);
    }
    match result {
        Ok(_) => Ok(0),
        Err(e) => Err(format!("event loop failed: {e}")),
    }
}
