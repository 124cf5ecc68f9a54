//! `umm snapshot PID -o DIR` against live targets (tests/targets/sparse.c).
//!
//! The target maps a 64 GiB MAP_NORESERVE region and a few small ones at fixed addresses,
//! writes about 10 MiB of words that are a function of their address (`pattern(SEED, a / 8)`)
//! in scattered runs, prints the runs, and waits for a go-file; then it checks its own memory
//! and exits 0. Each test checks the image against the runs the target printed: the same
//! populated pages, the same bytes, holes everywhere else, and an image about the size of the
//! data (not of the 64 GiB region); and checks what became of the target (continued, killed,
//! left stopped), never leaving it traced.

mod common;

use std::fs;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use umm::image::{Image, Manifest};

const LIMIT: Duration = Duration::from_secs(120);
const SEED: u64 = 0x5eed;
const BIG: u64 = 0x6000_0000_0000;
const BIG_LEN: u64 = 64 << 30;
const SMALL: u64 = 0x6100_0000_0000;
const PROT: u64 = 0x6100_0020_0000;
const RES: u64 = 0x6100_0040_0000;
const EMPTY: u64 = 0x6100_0060_0000;
/// The target's fixed regions lie in [FIXED_LO, FIXED_HI) (threads mode adds X below and Y
/// above).
const FIXED_LO: u64 = 0x5f00_0000_0000;
const FIXED_HI: u64 = 0x6300_0000_0000;

// The generator of tests/targets/umm_check.h.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn pattern(seed: u64, idx: u64) -> u64 {
    mix64(seed.wrapping_mul(0x100_0000_01B3) ^ mix64(idx)) | 1
}

fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

/// Sort and merge page ranges.
fn merged(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

fn clip(v: &[Range<u64>], to: &Range<u64>) -> Vec<Range<u64>> {
    v.iter()
        .map(|r| r.start.max(to.start)..r.end.min(to.end))
        .filter(|r| r.start < r.end)
        .collect()
}

fn bytes_of(v: &[Range<u64>]) -> u64 {
    v.iter().map(|r| r.end - r.start).sum()
}

/// A running sparse target, its go-file and what it printed.
struct Target {
    proc: Proc,
    go: PathBuf,
    /// The pid to snapshot (under `umm run`, the target, not umm).
    pid: i32,
    /// What the target wrote, merged.
    written: Vec<Range<u64>>,
    /// `--threads`: (count, X, Y).
    threads: Option<(u64, u64, u64)>,
}

impl Target {
    fn spawn(dir: &TestDir, label: &str, args: &[&str]) -> Target {
        let mut c = Command::new(target("sparse"));
        let go = dir.join(format!("{label}.go"));
        c.args(args).arg(&go).current_dir(dir.path());
        Target::start(Proc::spawn(dir, label, c), go)
    }

    /// Under `umm run`.
    fn spawn_managed(dir: &TestDir, label: &str) -> (Target, PathBuf) {
        let go = dir.join(format!("{label}.go"));
        let sparse = target("sparse");
        let cmd = [sparse.as_os_str(), go.as_os_str()];
        let (c, report) = umm_run_command(dir, label, &cmd);
        (Target::start(Proc::spawn(dir, label, c), go), report)
    }

    fn start(mut proc: Proc, go: PathBuf) -> Target {
        let ready = poll_until(3000, Duration::from_millis(10), || {
            proc.stdout().contains("READY pid=") || proc.try_wait().is_some()
        });
        let out = proc.stdout();
        assert!(
            ready && out.contains("READY pid="),
            "the target never became ready\n{}",
            proc.context()
        );
        let mut pid = 0;
        let mut written = Vec::new();
        let mut threads = None;
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["RUN", a, l] => {
                    let (a, l) = (parse_hex(a), parse_hex(l));
                    written.push(a..a + l);
                }
                ["THREADS", n, x, y] => {
                    threads = Some((n.parse().unwrap(), parse_hex(x), parse_hex(y)));
                }
                ["READY", p] => pid = p.trim_start_matches("pid=").parse().unwrap(),
                _ => {}
            }
        }
        assert!(pid > 0, "no pid in READY line\n{}", proc.context());
        Target {
            proc,
            go,
            pid,
            written: merged(written),
            threads,
        }
    }

    /// Let it check its memory and finish; it must exit 0 with its OK line.
    fn finish(mut self) {
        fs::write(&self.go, b"go").expect("write go-file");
        let st = self.proc.wait_bounded(LIMIT);
        assert!(
            st.success(),
            "target: {}\n{}",
            describe(&st),
            self.proc.context()
        );
        assert!(
            self.proc.stdout().contains("OK sparse "),
            "no OK line\n{}",
            self.proc.context()
        );
        self.proc.assert_group_gone();
    }

    /// Not traced, and running (not stopped) unless `stopped`.
    fn assert_released(&self, stopped: bool) {
        let tracer =
            umm::sys::proc::status_field(self.pid as u32, "TracerPid").expect("TracerPid")[0];
        assert_eq!(tracer, 0, "pid {} is still traced", self.pid);
        for t in tasks(self.pid) {
            let st = umm::sys::proc::task_state(t).unwrap_or('?');
            if stopped {
                assert_eq!(st, 'T', "thread {t} of pid {} is not stopped", self.pid);
            } else {
                assert!(
                    st != 'T' && st != 't',
                    "thread {t} of pid {} is left stopped ({st})",
                    self.pid
                );
            }
        }
    }
}

fn tasks(pid: i32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The result of one `umm snapshot`.
struct SnapRun {
    status: ExitStatus,
    stderr: String,
}

fn snapshot_cmd(dir: &TestDir, label: &str, mut c: Command) -> SnapRun {
    c.current_dir(dir.path());
    let mut p = Proc::spawn(dir, label, c);
    let status = p.wait_bounded(LIMIT);
    p.assert_group_gone();
    SnapRun {
        status,
        stderr: p.stderr(),
    }
}

fn snapshot(dir: &TestDir, label: &str, pid: i32, out: &Path, extra: &[&str]) -> SnapRun {
    let mut c = Command::new(umm_bin());
    c.arg("snapshot")
        .arg(pid.to_string())
        .arg("-o")
        .arg(out)
        .args(extra);
    snapshot_cmd(dir, label, c)
}

fn assert_ok(r: &SnapRun, what: &str) {
    assert!(
        r.status.success(),
        "{what}: umm snapshot {}\n{}",
        describe(&r.status),
        r.stderr
    );
}

fn assert_failed(r: &SnapRun, what: &str, needle: &str) {
    assert!(
        !r.status.success(),
        "{what}: umm snapshot should fail\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(needle),
        "{what}: stderr should say {needle:?}:\n{}",
        r.stderr
    );
}

/// The image's populated ranges (absolute) inside `range`.
fn image_runs(m: &Manifest, range: &Range<u64>) -> Vec<Range<u64>> {
    let mut v = Vec::new();
    for r in &m.regions {
        for run in &r.runs {
            let a = r.start + run.offset;
            v.push(a..a + run.len);
        }
    }
    merged(clip(&v, range))
}

/// Open the image and check it against what the target wrote: inside the target's fixed
/// area, every written page has data and it is the target's pattern, and every other page is
/// a hole — or, for a managed target (`managed`), may be a page the manager installed around a
/// fault (fault-around), which must then hold zeros. The expected regions exist with their
/// protections and flags; the data file is about the size of the written data. Returns the
/// image.
fn check_image(img: &Path, t: &Target, managed: bool) -> Image {
    let image = Image::open(img).unwrap_or_else(|e| panic!("Image::open({}): {e}", img.display()));
    image
        .verify_all()
        .unwrap_or_else(|e| panic!("verify_all: {e}"));
    let m = image.manifest().clone();
    assert_eq!(m.source_pid, t.pid as u32);
    let fixed = FIXED_LO..FIXED_HI;
    let mut want = t.written.clone();
    if let Some((n, x, y)) = t.threads {
        want.push(x..x + n * PAGE);
        want.push(y..y + n * PAGE);
    }
    let want = merged(clip(&want, &fixed));
    let got = image_runs(&m, &fixed);
    if managed {
        for w in &want {
            assert!(
                got.iter().any(|g| g.start <= w.start && w.end <= g.end),
                "written pages {w:x?} are not all in the image"
            );
        }
    } else {
        assert_eq!(
            got, want,
            "the image's populated pages differ from what the target wrote"
        );
    }
    let written = |a: u64| want.iter().any(|w| w.contains(&a));
    // Every byte of data in the fixed area is the target's pattern (or zero around a fault).
    for r in m.regions.iter().filter(|r| fixed.contains(&r.start)) {
        for run in &r.runs {
            let data = image
                .data(run.data_offset, run.len)
                .unwrap_or_else(|e| panic!("image data: {e}"));
            let base = r.start + run.offset;
            if t.threads.is_some_and(|(_, x, y)| base == x || base == y) {
                continue; // counters, checked by the threads test
            }
            for (i, w) in data.chunks_exact(8).enumerate() {
                let a = base + 8 * i as u64;
                let v = u64::from_ne_bytes(w.try_into().unwrap());
                if written(a) {
                    assert_eq!(v, pattern(SEED, a / 8), "image word at {a:#x}");
                } else {
                    assert_eq!(v, 0, "image word at {a:#x}, a page nobody wrote");
                }
            }
        }
    }
    // The regions and their attributes.
    let region = |start: u64| {
        m.regions
            .iter()
            .find(|r| r.start == start)
            .unwrap_or_else(|| panic!("no region at {start:#x}: {:?}", starts(&m)))
    };
    let big = region(BIG);
    assert_eq!(big.len, BIG_LEN);
    assert_eq!(big.prot, 3);
    for f in ["private", "anonymous", "noreserve"] {
        assert!(big.flags.iter().any(|x| x == f), "{:?}", big.flags);
    }
    assert_eq!(region(SMALL).len, 1 << 20);
    assert_eq!(region(PROT).len, 8 * PAGE);
    let none = region(PROT + 8 * PAGE);
    assert_eq!((none.len, none.prot), (8 * PAGE, 0));
    assert!(none.flags.iter().any(|f| f == "reservation"));
    // (Under umm, fault-around may have populated its neighbours too, with zeros.)
    assert!(
        none.data_bytes() == PAGE || (managed && none.data_bytes() >= PAGE),
        "the populated PROT_NONE page is in the image: {} bytes",
        none.data_bytes()
    );
    let res = region(RES);
    assert_eq!((res.len, res.prot, res.data_bytes()), (1 << 20, 0, 0));
    let empty = region(EMPTY);
    assert_eq!((empty.len, empty.prot, empty.data_bytes()), (1 << 20, 3, 0));
    // Size: the written data plus a little of everything else (stack, heap, libc's anonymous
    // pages, the agent's under umm) — nowhere near 64 GiB.
    let written = bytes_of(&want);
    let slack = if managed { written + 4 * MIB } else { 4 * MIB };
    assert!(
        m.data_len >= written && m.data_len <= written + slack,
        "data_len {} for {} written bytes",
        m.data_len,
        written
    );
    let sum: u64 = m.regions.iter().map(|r| r.data_bytes()).sum();
    assert_eq!(sum, m.data_len);
    image
}

/// The populated pages of the target's fixed area, from its page tables (to show that taking
/// a snapshot populates nothing: no page is faulted in, no userfaultfd fault raised).
fn populated_pages(pid: i32) -> Vec<Range<u64>> {
    let pm = umm::sys::proc::PageMap::open(pid as u32).expect("open pagemap");
    let mut out = Vec::new();
    for m in umm::sys::proc::read_maps(pid as u32).expect("maps") {
        if m.start >= FIXED_LO
            && m.end <= FIXED_HI
            && !pm
                .populated_by_scan(m.range(), &mut out)
                .expect("PAGEMAP_SCAN")
        {
            pm.populated_by_entries(m.range(), &mut out)
                .expect("pagemap");
        }
    }
    merged(out)
}

fn starts(m: &Manifest) -> Vec<String> {
    m.regions
        .iter()
        .map(|r| format!("{:#x}", r.start))
        .collect()
}

#[test]
fn snapshot_of_a_running_target_has_its_data_and_holes_and_it_continues() {
    require_root_and_uffd();
    let dir = TestDir::new("snap-resume");
    let t = Target::spawn(&dir, "sparse", &[]);
    let img = dir.join("img");
    let before = populated_pages(t.pid);
    let r = snapshot(&dir, "snap", t.pid, &img, &[]);
    assert_ok(&r, "snapshot");
    assert_eq!(
        populated_pages(t.pid),
        before,
        "the snapshot populated pages of the target"
    );
    assert!(
        r.stderr.contains("snapshot of pid")
            && r.stderr.contains("regions")
            && r.stderr.contains("holes"),
        "summary line:\n{}",
        r.stderr
    );
    t.assert_released(false);
    let image = check_image(&img, &t, false);
    let written = bytes_of(&t.written);
    assert!(
        written > 10 * MIB && written < 12 * MIB,
        "the target wrote {written} bytes"
    );
    drop(image);
    t.finish();
}

#[test]
fn snapshot_with_kill_kills_after_the_image_is_complete() {
    require_root_and_uffd();
    let dir = TestDir::new("snap-kill");
    let mut t = Target::spawn(&dir, "sparse", &[]);
    let img = dir.join("img");
    let r = snapshot(&dir, "snap", t.pid, &img, &["--kill", "--quiet"]);
    assert_ok(&r, "snapshot --kill");
    assert!(
        r.stderr.trim().is_empty(),
        "--quiet prints nothing:\n{}",
        r.stderr
    );
    check_image(&img, &t, false);
    let st = t.proc.wait_bounded(LIMIT);
    assert_eq!(
        st.signal(),
        Some(Signal::SIGKILL as i32),
        "target: {}",
        describe(&st)
    );
    assert!(!t.proc.stdout().contains("OK sparse"));
    t.proc.assert_group_gone();
}

#[test]
fn snapshot_with_leave_stopped_leaves_it_in_group_stop() {
    require_root_and_uffd();
    let dir = TestDir::new("snap-stopped");
    let t = Target::spawn(&dir, "sparse", &[]);
    let img = dir.join("img");
    let r = snapshot(&dir, "snap", t.pid, &img, &["--leave-stopped"]);
    assert_ok(&r, "snapshot --leave-stopped");
    let stopped = poll_until(500, Duration::from_millis(10), || {
        tasks(t.pid)
            .iter()
            .all(|&tid| umm::sys::proc::task_state(tid).ok() == Some('T'))
    });
    assert!(
        stopped,
        "pid {} is not in state T: {:?}",
        t.pid,
        umm::sys::proc::task_state(t.pid as u32)
    );
    t.assert_released(true);
    check_image(&img, &t, false);
    // Still stopped when told to go: it only goes on after SIGCONT.
    fs::write(&t.go, b"go").expect("go-file");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(umm::sys::proc::task_state(t.pid as u32).ok(), Some('T'));
    t.proc.signal(Signal::SIGCONT);
    t.finish();
}

#[test]
fn snapshot_of_a_multithreaded_target_stops_every_thread() {
    require_root_and_uffd();
    let dir = TestDir::new("snap-threads");
    let t = Target::spawn(&dir, "sparse", &["--threads", "2"]);
    let (n, x, y) = t.threads.expect("THREADS line");
    for round in 0..3 {
        let img = dir.join(format!("img{round}"));
        let r = snapshot(&dir, &format!("snap{round}"), t.pid, &img, &[]);
        assert_ok(&r, "snapshot of the threaded target");
        t.assert_released(false);
        let image = check_image(&img, &t, false);
        let m = image.manifest();
        // x[t] is stored before y[t]: with every thread stopped while the image was taken
        // (X is copied long before Y), x - y is 0 or 1. A running thread would be far ahead
        // in Y.
        let word = |addr: u64| -> u64 {
            let r = m
                .regions
                .iter()
                .find(|r| r.range().contains(&addr))
                .unwrap_or_else(|| panic!("no region holds {addr:#x}"));
            let run = r
                .runs
                .iter()
                .find(|run| (r.start + run.offset..r.start + run.offset + run.len).contains(&addr))
                .unwrap_or_else(|| panic!("{addr:#x} is a hole in the image"));
            let off = run.data_offset + (addr - r.start - run.offset);
            let d = image.data(off, 8).expect("image data");
            u64::from_ne_bytes(d.try_into().unwrap())
        };
        for i in 0..n {
            let (xv, yv) = (word(x + i * PAGE), word(y + i * PAGE));
            assert!(
                xv > 0 && (xv == yv || xv == yv + 1),
                "thread {i}: x = {xv}, y = {yv} in the image: not a consistent stop"
            );
        }
        assert!(
            r.stderr.contains("threads stopped"),
            "summary counts threads:\n{}",
            r.stderr
        );
    }
    t.finish();
}

#[test]
fn snapshot_of_a_process_managed_by_umm_run() {
    require_root_and_uffd();
    let dir = TestDir::new("snap-managed");
    let (t, report) = Target::spawn_managed(&dir, "managed");
    assert_ne!(t.pid, t.proc.pid, "the pid is the target's, not umm's");
    let flags = umm::sys::proc::vm_flags(t.pid as u32).expect("smaps");
    assert!(
        flags.get(&BIG).is_some_and(|f| f.iter().any(|x| x == "um")),
        "the 64 GiB region is registered with the manager's userfaultfd: {:?}",
        flags.get(&BIG)
    );
    let img = dir.join("img");
    let before = populated_pages(t.pid);
    let r = snapshot(&dir, "snap", t.pid, &img, &[]);
    assert_ok(&r, "snapshot of a managed process");
    assert_eq!(
        populated_pages(t.pid),
        before,
        "the snapshot faulted pages of the managed target in"
    );
    t.assert_released(false);
    check_image(&img, &t, true);
    let written_pages = bytes_of(&t.written) / PAGE;
    t.finish();
    let rep = Report::load(&report).expect("report");
    rep.check_shape();
    assert!(
        rep.u64("pages_served") >= written_pages,
        "the manager served the target's pages:\n{}",
        rep.pretty()
    );
}

#[test]
fn snapshot_of_ranges_clips_regions() {
    require_root_and_uffd();
    let dir = TestDir::new("snap-range");
    let t = Target::spawn(&dir, "sparse", &[]);
    let img = dir.join("img");
    let r1 = format!("{:#x}-{:#x}", BIG, BIG + (1 << 30));
    let r2 = format!("{:x}-{:x}", SMALL + (1 << 19), SMALL + (1 << 20) + 0x123);
    let r = snapshot(&dir, "snap", t.pid, &img, &["--range", &r1, "--range", &r2]);
    assert_ok(&r, "snapshot --range");
    let image = Image::open(&img).expect("open");
    let m = image.manifest();
    let got: Vec<(u64, u64)> = m.regions.iter().map(|r| (r.start, r.len)).collect();
    assert_eq!(got, vec![(BIG, 1 << 30), (SMALL + (1 << 19), 1 << 19)]);
    let mut want = clip(&t.written, &(BIG..BIG + (1 << 30)));
    want.extend(clip(&t.written, &(SMALL + (1 << 19)..SMALL + (1 << 20))));
    assert_eq!(image_runs(m, &(0..u64::MAX)), merged(want.clone()));
    assert_eq!(m.data_len, bytes_of(&want));
    t.finish();
}

#[test]
fn snapshot_errors_are_clear_and_leave_nothing_behind() {
    require_root_and_uffd();
    let dir = TestDir::new("snap-errors");

    // A pid that does not exist.
    let pid_max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let missing = (2..pid_max)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid");
    let out = dir.join("missing-img");
    let r = snapshot(&dir, "missing", missing, &out, &[]);
    assert_failed(
        &r,
        "nonexistent pid",
        &format!("no process with pid {missing}"),
    );
    assert!(!out.exists(), "no image directory for a failed snapshot");

    // Itself.
    let out = dir.join("self-img");
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(r#"exec "$0" snapshot $$ -o "$1""#)
        .arg(umm_bin())
        .arg(&out);
    let r = snapshot_cmd(&dir, "self", c);
    assert_failed(&r, "own pid", "itself");
    assert!(!out.exists());

    let t = Target::spawn(&dir, "sparse", &[]);

    // An output directory that is not empty: refused before the target is touched.
    let out = dir.join("full");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("keep"), b"precious").unwrap();
    let r = snapshot(&dir, "nonempty", t.pid, &out, &[]);
    assert_failed(&r, "non-empty output dir", "not empty");
    assert_eq!(fs::read(out.join("keep")).unwrap(), b"precious");
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
    t.assert_released(false);

    // An empty existing directory is fine, and stays if the snapshot fails.
    // Another tracer holds the target (this test): EPERM, said clearly.
    let out = dir.join("empty");
    fs::create_dir_all(&out).unwrap();
    let tpid = nix::unistd::Pid::from_raw(t.pid);
    nix::sys::ptrace::seize(tpid, nix::sys::ptrace::Options::empty()).expect("seize");
    let r = snapshot(&dir, "traced", t.pid, &out, &[]);
    // Detaching needs a stopped tracee: interrupt, wait for the stop, detach.
    nix::sys::ptrace::interrupt(tpid).expect("interrupt");
    nix::sys::wait::waitpid(tpid, Some(nix::sys::wait::WaitPidFlag::__WALL)).expect("wait");
    nix::sys::ptrace::detach(tpid, None).expect("detach");
    assert_failed(
        &r,
        "already traced",
        "(Yama ptrace_scope, another tracer, or no privilege)",
    );
    assert!(r.stderr.contains(&format!("cannot ptrace pid {}", t.pid)));
    assert!(out.is_dir() && fs::read_dir(&out).unwrap().next().is_none());
    t.assert_released(false);

    // Not permitted: an unprivileged caller (uid 65534) and a root target.
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let umm = bin.join("umm");
    fs::copy(umm_bin(), &umm).unwrap();
    fs::set_permissions(&umm, fs::Permissions::from_mode(0o755)).unwrap();
    let open = dir.join("open");
    fs::create_dir_all(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
    let out = open.join("img");
    let mut c = Command::new("setpriv");
    c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&umm)
        .arg("snapshot")
        .arg(t.pid.to_string())
        .arg("-o")
        .arg(&out);
    let r = snapshot_cmd(&dir, "nobody", c);
    assert_failed(
        &r,
        "unprivileged caller",
        &format!("cannot ptrace pid {}", t.pid),
    );
    assert!(!out.exists(), "the partial image is removed");
    t.assert_released(false);

    // A failure midway (the image cannot grow past 1-2 MiB: EFBIG, SIGXFSZ ignored): the target
    // is released and goes on, and the partial image is removed.
    let out = dir.join("efbig");
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(r#"trap '' XFSZ; ulimit -f 2048 && exec "$0" snapshot "$1" -o "$2""#)
        .arg(umm_bin())
        .arg(t.pid.to_string())
        .arg(&out);
    let r = snapshot_cmd(&dir, "efbig", c);
    assert_failed(&r, "file size limit", "failed");
    assert!(!out.exists(), "the partial image is removed");
    t.assert_released(false);

    t.finish();
}
