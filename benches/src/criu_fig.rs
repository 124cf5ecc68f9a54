//! Figure 7 (issue 7): `umm lazy-pages` against `criu lazy-pages`, the same images, the same
//! `criu restore --lazy-pages`, side by side repetition by repetition (the daemon that goes
//! first alternates).
//!
//! The workload is CRIU's fixture program (tests/fixtures/criu-4.2-memtest/memtest.c): a parent
//! with S of memory and a 64 MiB child, each verifying its whole area in a loop. It is dumped
//! once per case with `criu dump`, then restored lazily again and again. Measured: from the
//! start of `criu restore` to the daemon's exit (both daemons exit once every page is in: the
//! time to all-resident), and the restored parent's first verification pass (how long the
//! application's first full sweep took while its memory came in). Three cases per size: the
//! application idle (asleep through the fill: the fill alone), waking (a full verification
//! pass at once, then sleeping: the pass a restore interrupts restarts) and busy (verifying
//! without a pause, forking a short-lived grandchild and dropping a scratch area every pass).
//! umm runs as a user runs it (its defaults: two copiers on this machine) and with one
//! copier.
//!
//! `criu restore` keeps its kernel probes in /run/criu.kdat, only on a tmpfs; where /run is
//! not one (this VM), every restore would probe the kernel again (~40 ms, the same for both
//! daemons), so restores run in a private mount namespace with a tmpfs directory on /run.
//!
//! Needs CRIU >= 4.0: `$UMM_CRIU`, else `criu` on PATH. Without it the figure has no rows and a
//! SKIPPED note.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::model::{Figure, Row, Target};
use crate::procs::{run, run_ok, Background};
use crate::{Ctx, GIB, MIB};

#[path = "../../tests/fixtures/criu-4.2-memtest/memtest_log.rs"]
mod memtest_log;
use memtest_log::{filled_pid, parse_pass};

/// The restored child's area (memtest -c), as in the fixture's dump.
const CHILD_MIB: u64 = 64;

/// The CRIU binary to compare with, if it is version 4 or later.
fn find_criu() -> Result<PathBuf, String> {
    let bin = std::env::var_os("UMM_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("criu"));
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .and_then(|v| v.split('.').next()?.trim().parse::<u32>().ok());
    match major {
        Some(m) if m >= 4 => Ok(bin),
        _ => Err(format!(
            "{} is not CRIU >= 4.0 ({})",
            bin.display(),
            text.trim()
        )),
    }
}

fn build_memtest(ctx: &Ctx) -> Result<PathBuf, String> {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/criu-4.2-memtest/memtest.c");
    let exe = ctx.bin.join("memtest");
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc memtest.c: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(exe)
}

fn is_memtest(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let comm_ok = s.contains("(memtest)");
        let state = s
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim().chars().next());
        comm_ok && state != Some('Z')
    })
}

/// Whether `dir` is on a tmpfs (CRIU keeps its kernel probes in /run only on one: it checks
/// the file's fstatfs).
fn is_tmpfs(dir: &str) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// `criu SUBCOMMAND`, run where CRIU can keep its kernel probes: as is when /run is a tmpfs,
/// else in a private mount namespace with `kdat_dir` (on /dev/shm) bind-mounted on /run.
fn criu_cmd(criu: &Path, kdat_dir: Option<&Path>, subcommand: &str) -> Command {
    match kdat_dir {
        None => {
            let mut c = Command::new(criu);
            c.arg(subcommand);
            c
        }
        Some(dir) => {
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount --bind "$0" /run && exec "$@""#)
                .arg(dir)
                .arg(criu)
                .arg(subcommand);
            c
        }
    }
}

/// Where /run is no tmpfs, a tmpfs directory for CRIU's kernel probes, probed once (`criu
/// check`) so the first measured restore does not pay for them: None when /run is a tmpfs.
fn kdat_dir(ctx: &Ctx, criu: &Path) -> Result<Option<PathBuf>, String> {
    if is_tmpfs("/run") {
        return Ok(None);
    }
    if !is_tmpfs("/dev/shm") {
        return Err(
            "neither /run nor /dev/shm is a tmpfs: CRIU cannot keep its kernel probes".into(),
        );
    }
    let d = PathBuf::from(format!(
        "/dev/shm/umm-bench-criu-run.{}",
        std::process::id()
    ));
    fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    let check = criu_cmd(criu, Some(&d), "check");
    // (`criu check` may report missing optional features: only the cache it leaves matters.)
    let _ = run(&ctx.work, "criu-check", check, ctx.limit);
    if !d.join("criu.kdat").exists() {
        let _ = fs::remove_dir_all(&d);
        return Err(format!("criu check left no criu.kdat in {}", d.display()));
    }
    Ok(Some(d))
}

fn pid_free(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// The last lines of a CRIU log, for an error message.
fn log_tail(p: &Path) -> String {
    let text = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Poll `ok` every 10 ms for up to `limit`.
fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    ok()
}

/// The memtest processes dumped (and restored under the same pids): killed by pid, only while
/// they still are memtest, when dropped.
struct Workload {
    pids: Vec<i32>,
}

impl Workload {
    fn kill_all(&self) {
        for &pid in &self.pids {
            if is_memtest(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// Kill them and wait until their pids are free again (the next restore needs them).
    fn stop(&self) -> Result<(), String> {
        self.kill_all();
        if wait_for(Duration::from_secs(30), || {
            self.pids.iter().all(|&p| pid_free(p))
        }) {
            Ok(())
        } else {
            Err(format!("memtest pids {:?} not freed", self.pids))
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// One case: a dumped workload and its images.
struct Case {
    dir: PathBuf,
    img: PathBuf,
    log: PathBuf,
    workload: Workload,
    parent: i32,
    size: u64,
}

impl Case {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Start memtest (its own session: CRIU dumps a session), let it fill and verify twice,
    /// dump it (which ends it), and wait until its pids are free.
    fn dump(
        ctx: &Ctx,
        criu: &Path,
        memtest: &Path,
        name: &str,
        size: u64,
        flags: &[&str],
    ) -> Result<Case, String> {
        let dir = ctx.work.join(name);
        let img = dir.join("img");
        fs::create_dir_all(&img).map_err(|e| format!("{}: {e}", img.display()))?;
        let log = dir.join("memtest.log");
        let out = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        // setsid execs in place (we are not a group leader): the spawned pid is memtest's.
        let mut child = Command::new("setsid")
            .arg(memtest)
            .args([
                "-s",
                &(size / MIB).to_string(),
                "-c",
                &CHILD_MIB.to_string(),
            ])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("setsid memtest: {e}"))?;
        let mut case = Case {
            dir,
            img,
            log,
            workload: Workload {
                pids: vec![child.id() as i32],
            },
            parent: child.id() as i32,
            size,
        };
        // Dumped right after the parent's second pass: with a pause between passes (idle,
        // waking) the parent has just begun it, so an idle restore finds it asleep.
        let parent = case.parent;
        let started = wait_for(Duration::from_secs(60), || {
            let l = case.log();
            l.contains(" child pid=")
                && l.lines()
                    .filter_map(parse_pass)
                    .filter(|p| p.pid == parent)
                    .count()
                    >= 2
        });
        if !started {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("memtest did not start: {}", case.log()));
        }
        if let Some(c) = filled_pid(&case.log(), "child") {
            case.workload.pids.push(c);
        }
        let mut dump = Command::new(criu);
        dump.arg("dump")
            .arg("-t")
            .arg(case.parent.to_string())
            .arg("-D")
            .arg(&case.img)
            .args(["-o", "dump.log"]);
        let dumped = run_ok(&case.dir, "criu-dump", dump, ctx.limit);
        let _ = child.wait();
        dumped.map_err(|e| format!("criu dump: {e}"))?;
        case.workload.stop()?;
        // CRIU restores the log as the open file it was, and checks its size: each restore
        // starts from the log as it was at the dump.
        fs::copy(&case.log, case.log.with_extension("dumped"))
            .map_err(|e| format!("{}: {e}", case.log.display()))?;
        Ok(case)
    }

    /// Restore once, served by `daemon`: (ms to all-resident, ms of the parent's first full
    /// verification pass after the restore began).
    fn restore(
        &self,
        ctx: &Ctx,
        criu: &Path,
        kdat_dir: Option<&Path>,
        daemon: Daemon,
    ) -> Result<(f64, f64), String> {
        let sock = self.img.join("lazy-pages.socket");
        let _ = fs::remove_file(&sock);
        let report = self.dir.join("umm-report.json");
        let cmd = match daemon {
            Daemon::Umm | Daemon::UmmOneCopier => {
                let mut c = Command::new(&ctx.umm);
                c.args(["lazy-pages", "-D"])
                    .arg(&self.img)
                    .arg("--report")
                    .arg(&report)
                    .env("RUST_LOG", "warn");
                if daemon == Daemon::UmmOneCopier {
                    c.args(["--fill-threads", "1"]);
                }
                c
            }
            Daemon::Criu => {
                let mut c = Command::new(criu);
                c.args(["lazy-pages", "-D"])
                    .arg(&self.img)
                    .args(["-o", "lazy-pages.log"]);
                c
            }
        };
        let mut d = Background::spawn(&self.dir, daemon.name(), cmd)?;
        if !wait_for(Duration::from_secs(20), || sock.exists()) {
            return Err(format!("{}: no {}", daemon.name(), sock.display()));
        }
        fs::copy(self.log.with_extension("dumped"), &self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let before = self.log().len();
        // The images are read from the page cache by both daemons (this VM reclaims cold
        // page cache: whoever went first after a pause would pay the disk otherwise).
        for e in fs::read_dir(&self.img).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("pages-") {
                crate::figures::warm(&e.path());
            }
        }
        let wall0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let t0 = Instant::now();
        let mut restore = criu_cmd(criu, kdat_dir, "restore");
        restore
            .arg("-D")
            .arg(&self.img)
            .args(["--lazy-pages", "-d", "-o", "restore.log"]);
        let restored = run(&self.dir, "criu-restore", restore, ctx.limit);
        let exit = d.wait_exit(ctx.limit);
        let resident = t0.elapsed();
        let result = (|| {
            let r = restored?;
            if !r.ok() {
                return Err(format!(
                    "criu restore: {}; restore.log ends: {}",
                    r.describe(),
                    log_tail(&self.img.join("restore.log"))
                ));
            }
            let st = exit?;
            if !st.success() {
                return Err(format!("{} lazy-pages exited with {st}", daemon.name()));
            }
            // The restored tasks go on verifying: two passes each, every one bad=0, and the
            // parent one pass that began after the restore did (the pass it was in at the
            // dump spans the time between dump and restore).
            let after = || self.log().get(before..).unwrap_or_default().to_string();
            let first_full = |a: &str| {
                a.lines()
                    .filter_map(parse_pass)
                    .find(|p| p.pid == self.parent && p.started >= wall0)
            };
            let passes = |a: &str, pid: i32| {
                a.lines()
                    .filter_map(parse_pass)
                    .filter(|p| p.pid == pid)
                    .count()
            };
            let verified = wait_for(Duration::from_secs(60), || {
                let a = after();
                a.contains("MISMATCH")
                    || a.contains("FAILED")
                    || (self.workload.pids.iter().all(|&p| passes(&a, p) >= 2)
                        && first_full(&a).is_some())
            });
            let a = after();
            if !verified || a.contains("MISMATCH") || a.contains("FAILED") {
                return Err(format!("restored memtest did not verify: {a}"));
            }
            if let Some(p) = a.lines().filter_map(parse_pass).find(|p| p.bad != 0) {
                return Err(format!("pid {}: bad={} after the restore", p.pid, p.bad));
            }
            let first = first_full(&a).ok_or("no full pass of the parent")?;
            if daemon != Daemon::Criu {
                self.check_umm_report(&report)?;
            }
            Ok((resident.as_secs_f64() * 1e3, first.verify_ms))
        })();
        drop(d);
        self.workload.stop()?;
        result
    }

    /// umm served the restore: every task's lazy pages came from it (faults or the fill).
    fn check_umm_report(&self, report: &Path) -> Result<(), String> {
        let text = fs::read_to_string(report).map_err(|e| format!("umm report: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("umm report: {e}"))?;
        let num = |path: &str| {
            path.split('.')
                .try_fold(&v, |v, k| v.get(k))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        if num("restore.completed") < 2 || num("restore.killed") != 0 {
            return Err(format!("umm did not complete both tasks: {text}"));
        }
        // The two memtest areas are lazy (private anonymous, written before the dump).
        let expected = self.size + CHILD_MIB * MIB;
        let served = num("pages_served") * 4096;
        if served < expected {
            return Err(format!(
                "umm served {served} bytes, the images hold {expected} lazy: {text}"
            ));
        }
        Ok(())
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Daemon {
    /// umm as a user runs it (its defaults).
    Umm,
    /// umm with `--fill-threads 1` (no second copier).
    UmmOneCopier,
    Criu,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Daemon::Umm => "umm",
            Daemon::UmmOneCopier => "umm-fill-threads-1",
            Daemon::Criu => "criu",
        }
    }
}

pub fn fig7(ctx: &mut Ctx) -> Figure {
    let mut f = Figure::new(
        7,
        "umm lazy-pages vs criu lazy-pages: the same images restored by criu restore \
         --lazy-pages (time from its start to the daemon's exit = all pages resident; the \
         restored parent's first verification pass)",
    );
    let criu = match find_criu() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("umm-bench: figure 7 SKIPPED: {e} (set UMM_CRIU=/path/to/criu)");
            f.note(format!("SKIPPED: {e}"));
            return f;
        }
    };
    let memtest = match build_memtest(ctx) {
        Ok(m) => m,
        Err(e) => {
            f.error("memtest", "", e);
            return f;
        }
    };
    let sizes: Vec<u64> = if ctx.quick {
        vec![16 * MIB]
    } else {
        [256 * MIB, GIB]
            .into_iter()
            .filter(|&s| (s + CHILD_MIB * MIB) * 4 < crate::meminfo("MemAvailable"))
            .collect()
    };
    // (name, memtest flags, target for criu's time / umm's): 1.5× faster when the fill has
    // the machine; while the restored program competes for the CPUs (2 here) or faults hard,
    // not slower than criu (no collapse).
    let cases: &[(&str, &[&str], f64)] = if ctx.quick {
        &[("busy", &["-i", "0", "-f", "-r"], 1.0)]
    } else {
        &[
            ("idle", &["-i", "1000", "-w"], 1.5),
            ("waking", &["-i", "1000"], 1.0),
            ("busy", &["-i", "0", "-f", "-r"], 1.0),
        ]
    };
    // Kept across this figure's restores, as /run/criu.kdat would be.
    let kdat_dir = match kdat_dir(ctx, &criu) {
        Ok(d) => d,
        Err(e) => {
            f.error("criu kernel probes", "", e);
            return f;
        }
    };
    let _remove_kdat_dir = kdat_dir.clone().map(RemoveDir);
    f.note(format!(
        "criu: {}; memtest parent of the size shown + a {CHILD_MIB} MiB child; idle = \
         `-i 1000 -w` (asleep through the fill: the fill alone), waking = `-i 1000` (one full \
         verification pass at once, then asleep), busy = `-i 0 -f -r` (verifying without \
         pause, a fork and a MADV_DONTNEED every pass); umm = its defaults (a second copier \
         where it may use two CPUs); ratio = criu's time / umm's (umm's speed-up); criu \
         restore {}",
        criu.display(),
        if kdat_dir.is_some() {
            "in a mount namespace with a tmpfs on /run (this machine's /run is no tmpfs: \
             CRIU could not keep its kernel probes)"
        } else {
            "as is (/run is a tmpfs)"
        }
    ));
    for &size in &sizes {
        for &(case_name, flags, target) in cases {
            let label = format!("{} {case_name}", crate::figures::size_label(size));
            let umm_row = format!("{label}: umm, to all-resident");
            let criu_row = format!("{label}: criu, to all-resident");
            f.row(&umm_row, || Row::new("", "ms"));
            f.row(&criu_row, || {
                Row::new("", "ms")
                    .vs(umm_row.clone())
                    .target(Target::at_least(target))
            });
            // One copier, against umm's defaults (above 1: the second copier helped).
            let one_row = format!("{label}: umm --fill-threads 1, to all-resident");
            f.row(&one_row, || Row::new("", "ms").vs(umm_row.clone()));
            let umm_pass = format!("{label}: umm, first full verify pass");
            let criu_pass = format!("{label}: criu, first full verify pass");
            f.row(&umm_pass, || Row::new("", "ms"));
            f.row(&criu_pass, || Row::new("", "ms").vs(umm_pass.clone()));
            let case = match Case::dump(
                ctx,
                &criu,
                &memtest,
                &format!("criu-{}-{case_name}", size / MIB),
                size,
                flags,
            ) {
                Ok(c) => c,
                Err(e) => {
                    f.error(&umm_row, "ms", e);
                    continue;
                }
            };
            for rep in 0.. {
                if !ctx.rep_ok(rep, ctx.reps) {
                    break;
                }
                // Rotate who goes first: page cache and drift hit all alike.
                let mut order = [Daemon::Umm, Daemon::Criu, Daemon::UmmOneCopier];
                order.rotate_left(rep % 3);
                for d in order {
                    let (row, pass_row) = match d {
                        Daemon::Umm => (&umm_row, Some(&umm_pass)),
                        Daemon::UmmOneCopier => (&one_row, None),
                        Daemon::Criu => (&criu_row, Some(&criu_pass)),
                    };
                    match case.restore(ctx, &criu, kdat_dir.as_deref(), d) {
                        Ok((resident_ms, pass_ms)) => {
                            f.push(row, "ms", resident_ms);
                            if let Some(pass_row) = pass_row {
                                f.push(pass_row, "ms", pass_ms);
                            }
                        }
                        Err(e) => f.error(row, "ms", e),
                    }
                }
            }
        }
    }
    f
}

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
