//! `umm run -- CMD`: a private socket, the command started with the agent preloaded, the
//! loop until the command exits, then the report.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;

use umm::sys::{fd as sysfd, process};

use crate::manager::{self, Manager, Policy, Shutdown};
use crate::RunArgs;

/// A private directory for the socket, removed on drop.
pub(crate) struct RuntimeDir {
    dir: PathBuf,
    pub(crate) socket: PathBuf,
}

impl RuntimeDir {
    /// `$TMPDIR/umm-run.XXXXXX`, mode 0711: the command's processes may switch to any uid and
    /// must still reach the socket, so others can traverse the directory but not list it. The
    /// socket's name is 128 random bits; each connection is also checked to come from the
    /// command's tree.
    pub(crate) fn create() -> Result<RuntimeDir, String> {
        let base = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let dir = nix::unistd::mkdtemp(&base.join("umm-run.XXXXXX")).map_err(|e| {
            format!(
                "cannot create a runtime directory in {}: {e}",
                base.display()
            )
        })?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        let mut rnd = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut rnd))
            .map_err(|e| format!("/dev/urandom: {e}"))?;
        let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let socket = dir.join(format!("{name}.sock"));
        Ok(RuntimeDir { dir, socket })
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The agent: `--agent`, `$UMM_AGENT`, next to this binary, or `../lib/umm/` from it.
fn find_agent(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = explicit.or_else(|| std::env::var_os("UMM_AGENT").map(PathBuf::from)) {
        return if p.is_file() {
            Ok(std::fs::canonicalize(&p).unwrap_or(p))
        } else {
            Err(format!("agent {} does not exist", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate umm itself: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join("libumm_agent.so"),
        dir.join("../lib/umm/libumm_agent.so"),
    ];
    for c in &candidates {
        if c.is_file() {
            return Ok(std::fs::canonicalize(c).unwrap_or_else(|_| c.clone()));
        }
    }
    Err(format!(
        "cannot find libumm_agent.so (looked at {} and {}); pass --agent PATH or set UMM_AGENT",
        candidates[0].display(),
        candidates[1].display()
    ))
}

/// The command could not be started: say so, and exit like a shell would (127: not found,
/// 126: found but not runnable).
pub(crate) fn cannot_run(cmd: &std::ffi::OsStr, e: &std::io::Error) -> i32 {
    eprintln!("umm: cannot run {}: {e}", cmd.to_string_lossy());
    if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

pub fn main(args: RunArgs) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umm: {e}");
            1
        }
    }
}

fn run(args: RunArgs) -> Result<i32, String> {
    crate::preflight::can_serve()?;
    let agent = find_agent(args.agent.clone())?;
    if let Err(e) = sysfd::raise_fd_limit() {
        log::warn!("cannot raise the fd limit: {e}");
    }
    let rt = RuntimeDir::create()?;
    let listener = UnixListener::bind(&rt.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", rt.socket.display()))?;
    std::fs::set_permissions(&rt.socket, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("chmod {}: {e}", rt.socket.display()))?;
    // Signals go through the loop's signalfd; block them before the command exists so none is
    // lost, and let the command start with an empty mask.
    let signals = manager::signal_fd(&[
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
    ])
    .map_err(|e| format!("signalfd: {e}"))?;
    if let Err(e) = process::become_subreaper() {
        log::warn!(
            "cannot become a subreaper ({e}); orphaned processes of the command will be refused"
        );
    }
    let is_root = nix::unistd::geteuid().is_root();
    let cfg = args.common.config(Policy::Tree, is_root && !args.no_grant);
    let mut mgr = Manager::new(listener, cfg, Some(signals))
        .map_err(|e| format!("cannot start the manager: {e}"))?;
    let (control, _control_file) = crate::control::open(args.control.as_deref(), None)?;
    if let Some(c) = control {
        mgr.attach_control(c)
            .map_err(|e| format!("cannot serve the control socket: {e}"))?;
    }

    let mut preload = OsString::from(agent.as_os_str());
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .env("LD_PRELOAD", preload)
        .env("UMM_SOCKET", &rt.socket);
    let child = match process::spawn_unblocked(&mut cmd) {
        Ok(c) => c,
        Err(e) => return Ok(cannot_run(&args.command[0], &e)),
    };
    mgr.command = Some(child.id());
    // The child is reaped by the loop (waitpid), not through `child`.
    drop(child);

    let shutdown = mgr.run().map_err(|e| format!("event loop failed: {e}"))?;
    let code = match shutdown {
        Shutdown::CommandExited(code) => code,
        Shutdown::Signal(sig) => 128 + sig,
        Shutdown::RestoreDone(code) => code.unwrap_or(0),
        Shutdown::AttachEnded => 0,
    };
    let live = mgr.live_spaces();
    mgr.finish();
    let report = mgr.stats().report(live, Some(code));
    if let Some(path) = &args.common.report {
        crate::daemon::write_report(path, &report);
    }
    if !args.quiet {
        eprintln!("{}", report.summary());
    }
    Ok(code)
}
