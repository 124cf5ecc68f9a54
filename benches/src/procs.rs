//! Running the measured programs: each one its own process group, bounded in time, killed by
//! its group id (the pid of the child we started) if it overruns or if the bench is
//! interrupted; output in files of the work directory.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::Pid;

/// Process groups we started and that may still have members.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// The work directory to remove if the bench is interrupted.
static WORKDIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Block SIGINT/SIGTERM/SIGHUP in this (the main) thread, before any other thread exists, and
/// handle them on a thread of their own: kill every process group we started, remove the work
/// directory, exit 130. (Children do not inherit the blocked mask: std resets it before exec.)
pub fn install_signal_cleanup() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("umm-bench: {sig:?}: stopping what it started and cleaning up");
            kill_all();
            remove_workdir();
            std::process::exit(130);
        }
    });
}

pub fn set_workdir(p: &Path) {
    *WORKDIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.to_path_buf());
}

pub fn remove_workdir() {
    if let Some(p) = WORKDIR.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = fs::remove_dir_all(p);
    }
}

fn kill_all() {
    for g in LIVE.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
}

fn forget(pgid: i32) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&g| g != pgid);
}

/// What one run gave.
pub struct Output {
    pub label: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to exit (measured by a thread blocked in wait).
    pub wall: Duration,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// `key=value` of the program's `RESULT` line, as a number.
    pub fn result(&self, key: &str) -> Option<f64> {
        let line = self.stdout.lines().find(|l| l.starts_with("RESULT "))?;
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.split('/').next()?.parse().ok())
    }

    /// A `key=value` of the RESULT line as text.
    pub fn result_str(&self, key: &str) -> Option<String> {
        let line = self.stdout.lines().find(|l| l.starts_with("RESULT "))?;
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }

    /// A one-paragraph description for error messages.
    pub fn describe(&self) -> String {
        let st = match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (_, Some(s)) => format!("signal {s}"),
            _ => format!("{:?}", self.status),
        };
        format!(
            "{} ({st}): stdout: {} stderr: {}",
            self.label,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let t = lines[lines.len().saturating_sub(4)..].join(" | ");
    if t.len() > 600 {
        format!("...{}", &t[t.len() - 600..])
    } else {
        t
    }
}

/// Run `cmd` (its own process group, stdin from /dev/null, output to files under `dir`),
/// killing its group after `limit`. Err when it could not start or overran.
pub fn run(dir: &Path, label: &str, mut cmd: Command, limit: Duration) -> Result<Output, String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let safe: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let out_path = dir.join(format!("{n:04}-{safe}.stdout"));
    let err_path = dir.join(format!("{n:04}-{safe}.stderr"));
    let out = fs::File::create(&out_path).map_err(|e| format!("{label}: {e}"))?;
    let err = fs::File::create(&err_path).map_err(|e| format!("{label}: {e}"))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{label}: cannot start {:?}: {e}", cmd.get_program()))?;
    let pgid = child.id() as i32;
    live.push(pgid);
    drop(live);
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let st = child.wait();
        let _ = tx.send((st, start.elapsed()));
    });
    let got = rx.recv_timeout(limit);
    // Whatever is left of the group we started (the program's own children) goes too.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let (status, wall) = match got {
        Ok((Ok(st), wall)) => (st, wall),
        Ok((Err(e), _)) => {
            forget(pgid);
            return Err(format!("{label}: wait: {e}"));
        }
        Err(_) => {
            let _ = waiter.join();
            forget(pgid);
            return Err(format!(
                "{label}: still running after {limit:?}: killed its process group {pgid}"
            ));
        }
    };
    let _ = waiter.join();
    forget(pgid);
    let o = Output {
        label: label.to_string(),
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        wall,
    };
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    Ok(o)
}

/// Like [`run`], and the program must exit 0.
pub fn run_ok(dir: &Path, label: &str, cmd: Command, limit: Duration) -> Result<Output, String> {
    let o = run(dir, label, cmd, limit)?;
    if o.ok() {
        Ok(o)
    } else {
        Err(o.describe())
    }
}

/// A command from an argv.
pub fn command<S: AsRef<OsStr>>(argv: &[S]) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// Is a process with this pid alive (for removing stale work directories)?
pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A program left running in the background (its own process group), killed with its group
/// when dropped.
pub struct Background {
    child: std::process::Child,
    pgid: i32,
    out_path: PathBuf,
}

impl Background {
    pub fn spawn(dir: &Path, label: &str, mut cmd: Command) -> Result<Background, String> {
        let out_path = dir.join(format!("{label}.bg.stdout"));
        let out = fs::File::create(&out_path).map_err(|e| format!("{label}: {e}"))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd
            .spawn()
            .map_err(|e| format!("{label}: cannot start {:?}: {e}", cmd.get_program()))?;
        let pgid = child.id() as i32;
        live.push(pgid);
        Ok(Background {
            child,
            pgid,
            out_path,
        })
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out_path).unwrap_or_default()
    }

    /// Wait (bounded, looking every millisecond) for the program to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok(st),
                Ok(None) if start.elapsed() > limit => {
                    return Err(format!("still running after {limit:?}"))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(format!("wait: {e}")),
            }
        }
    }

    /// Wait (bounded) for a line starting with `prefix`; Err if the program exits first.
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.stdout().lines().find(|l| l.starts_with(prefix)) {
                return Ok(l.to_string());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "exited ({st}) before `{prefix}`: {}",
                    self.stdout()
                ));
            }
            if start.elapsed() > limit {
                return Err(format!("no `{prefix}` after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        forget(self.pgid);
        let _ = fs::remove_file(&self.out_path);
    }
}
