//! Lazy restore end to end (issue 4): `richstate build` → `umm snapshot` → `umm restore` with
//! `richstate restore` as the restorer (tests/targets/richstate.c, the reference restorer).
//!
//! The target builds a rich memory state at fixed addresses (a dense 8 MiB region, a sparse
//! 64 MiB one, a 1 GiB MAP_NORESERVE one with a few pages touched, a read-only page of pointers
//! into the others), whose contents are a function of the seed and the address. The restorer
//! maps the same regions empty, hands them to the manager with `umm_restore_handoff` (the C API
//! of libumm_agent.so), and verifies every page in random order while it forks, mremaps,
//! MADV_DONTNEEDs and munmaps. Each test checks what the restorer saw (its `OK richstate` line,
//! or that it never printed one, nor a `FAIL`) and what the manager did (the counters of its
//! report): a restorer without umm finds only zeros, and its verification fails.
//!
//! Every process is started as its own process group and killed by id at the end (`Proc`); all
//! waits are bounded; nothing is asserted about how long things take, except that a rate-bound
//! fill cannot be faster than its bound.

mod common;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use umm::image::{Image, Manifest};

const SEED: &str = "0x5eed";
const LIMIT: Duration = Duration::from_secs(120);

// The regions of tests/targets/richstate.c.
const A_START: u64 = 0x3000_0000_0000;
const A_LEN: u64 = 8 * MIB;
const B_START: u64 = 0x3000_1000_0000;
const B_LEN: u64 = 64 * MIB;
const C_START: u64 = 0x3001_0000_0000;
const C_LEN: u64 = 1024 * MIB;
const D_START: u64 = 0x3002_0000_0000;
const D_LEN: u64 = 64 * 1024;
const REGIONS: [(u64, u64, u32); 4] = [
    (A_START, A_LEN, 3),
    (B_START, B_LEN, 3),
    (C_START, C_LEN, 3),
    (D_START, D_LEN, 1),
];

fn richstate() -> PathBuf {
    target("richstate")
}

/// An image of `richstate build SEED` written by `umm snapshot`.
struct Built {
    img: PathBuf,
    /// Pages with data, as the builder counted them.
    data_pages: u64,
    manifest: Manifest,
}

fn thp_always() -> bool {
    fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.contains("[always]"))
        .unwrap_or(false)
}

/// Run `richstate build`, snapshot its regions with `umm snapshot PID -o DIR --range ...`, kill
/// the builder, and check the image: exactly the four regions, and the builder's data pages.
fn build_image(dir: &TestDir, name: &str) -> Built {
    let mut b = Command::new(richstate());
    b.args(["build", SEED]).current_dir(dir.path());
    let mut builder = Proc::spawn(dir, &format!("{name}-build"), b);
    let ready = poll_until(3000, Duration::from_millis(10), || {
        builder.stdout().contains("\nRANGES ") || builder.try_wait().is_some()
    });
    let out = builder.stdout();
    assert!(
        ready && out.contains("\nRANGES "),
        "the builder never became ready\n{}",
        builder.context()
    );
    let mut pid = 0;
    let mut data_pages = 0;
    let mut ranges = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("READY ") {
            for kv in rest.split_whitespace() {
                match kv.split_once('=') {
                    Some(("pid", v)) => pid = v.parse().expect("pid"),
                    Some(("data_pages", v)) => data_pages = v.parse().expect("data_pages"),
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("RANGES ") {
            ranges = rest.split_whitespace().map(str::to_string).collect();
        }
    }
    assert!(
        pid > 0 && data_pages > 0 && ranges.len() == 8,
        "bad READY/RANGES\n{out}"
    );
    let img = dir.join(name);
    let mut s = Command::new(umm_bin());
    s.arg("snapshot")
        .arg(pid.to_string())
        .arg("-o")
        .arg(&img)
        .args(&ranges)
        .current_dir(dir.path());
    let mut snap = Proc::spawn(dir, &format!("{name}-snapshot"), s);
    let st = snap.wait_bounded(LIMIT);
    assert!(
        st.success(),
        "umm snapshot: {}\n{}",
        describe(&st),
        snap.context()
    );
    snap.assert_group_gone();
    builder.kill();
    let image = Image::open(&img).unwrap_or_else(|e| panic!("the snapshot does not open: {e}"));
    let manifest = image.manifest().clone();
    let got: Vec<(u64, u64, u32)> = manifest
        .regions
        .iter()
        .map(|r| (r.start, r.len, r.prot))
        .collect();
    assert_eq!(got, REGIONS, "the image's regions");
    assert!(
        manifest.data_len >= data_pages * PAGE,
        "the image has {} bytes of data, the builder wrote {data_pages} pages",
        manifest.data_len
    );
    if !thp_always() {
        assert_eq!(
            manifest.data_len,
            data_pages * PAGE,
            "the image holds exactly the pages the builder wrote"
        );
    }
    Built {
        img,
        data_pages,
        manifest,
    }
}

/// Where the data of the page at `addr` is in pages.img, if the image has data for it.
fn data_offset(m: &Manifest, addr: u64) -> Option<u64> {
    let r = m
        .regions
        .iter()
        .find(|r| addr >= r.start && addr < r.start + r.len)?;
    let off = addr - r.start;
    r.runs
        .iter()
        .find(|run| off >= run.offset && off < run.offset + run.len)
        .map(|run| run.data_offset + (off - run.offset))
}

/// `richstate restore SEED IMG`.
fn restorer_argv(img: &Path) -> Vec<OsString> {
    vec![
        richstate().into(),
        "restore".into(),
        SEED.into(),
        img.into(),
    ]
}

/// The environment of a restorer (and of the umm restore that runs it): the agent to dlopen,
/// never UMM_SOCKET (the agent's constructor would try a track-mode handoff), plus `env`.
fn restorer_env(c: &mut Command, env: &[(&str, &str)]) {
    c.env("UMM_AGENT", agent_lib())
        .env_remove("UMM_SOCKET")
        .env_remove("LD_PRELOAD")
        .envs(env.iter().copied());
}

/// `umm restore --image IMG --report R ARGS -- richstate restore SEED IMG` (argv), and R.
fn restore_argv(dir: &TestDir, label: &str, img: &Path, args: &[&str]) -> (Vec<OsString>, PathBuf) {
    let report = dir.join(format!("{label}.report.json"));
    let _ = fs::remove_file(&report);
    let mut v: Vec<OsString> = vec![
        umm_bin().into(),
        "restore".into(),
        "--image".into(),
        img.into(),
        "--report".into(),
        report.clone().into(),
    ];
    v.extend(args.iter().map(OsString::from));
    v.push("--".into());
    v.extend(restorer_argv(img));
    (v, report)
}

fn command(argv: &[OsString], dir: &TestDir, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]).current_dir(dir.path());
    restorer_env(&mut c, env);
    c
}

/// A whole `umm restore -- richstate restore` run, bounded; nothing of it may be left behind.
fn umm_restore(
    dir: &TestDir,
    label: &str,
    img: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> UmmRun {
    let (argv, report_path) = restore_argv(dir, label, img, args);
    UmmRun::finish(
        Proc::spawn(dir, label, command(&argv, dir, env)),
        &report_path,
    )
}

/// The checks every successful restore passes: exit 0, one handoff, nothing killed or failed,
/// and the restorer's OK line (returned).
fn assert_restored(run: &UmmRun) -> OkLine {
    run.assert_success();
    let ok = run.ok_line("richstate");
    assert!(
        !run.stdout.contains("FAIL richstate"),
        "a process printed FAIL\n{}",
        run.context()
    );
    run.assert_eq("restore.handoffs", 1, "one restorer handed over");
    run.assert_eq("restore.killed", 0, "nothing had to be stopped");
    assert!(
        run.report.get("restore.failed").is_some_and(Value::is_null),
        "restore.failed is set\n{}",
        run.context()
    );
    // Every data page the restorer verified (with the right non-zero contents) was copied
    // into its address space by the manager: nothing else could put it there.
    run.assert_ge(
        "pages_served",
        ok.u64("pages"),
        "each data page the restorer verified was installed by the manager",
    );
    ok
}

fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

// ----- 1 ------------------------------------------------------------------------------------

#[test]
fn snapshot_then_lazy_restore_verifies_every_page_under_fork_mremap_dontneed_munmap() {
    restore_storm("restore-storm", "1");
}

/// The same with the second copier (`--fill-threads 2`) on: it pairs pieces only in turns
/// without faults, so whether it meets the storms depends on timing; what it copies is
/// checked by `a_second_copier_fills_a_quiet_restore_by_default`.
#[test]
fn a_second_copier_meets_fork_mremap_dontneed_munmap_and_no_page_is_wrong() {
    restore_storm("restore-storm-2", "2");
}

/// The restorer touches nothing (RICHSTATE_WATCH): every turn is quiet, so by default (two
/// or more CPUs: `--fill-threads` defaults to 2) the fill goes in pairs of pieces, one copied
/// by the second copier; the restorer then verifies every page. (The image offers only a few
/// pairs: the loop's grace before it takes a piece back is made long, so a copier woken late
/// because another test holds the other CPU still copies them; the take-back has its own
/// test.)
#[test]
fn a_second_copier_fills_a_quiet_restore_by_default() {
    require_root_and_uffd();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "this test needs two CPUs (the second copier's default), this process may use {cpus}"
    );
    let ok_run = quiet_restore(
        "restore-copier",
        &[],
        &[("UMM_TEST_COPIER_TAKE_BACK_GRACE_US", "5000000")],
    );
    // (Pieces pair only inside one run of image data, so not half of it: 4 of 23.7 MiB seen.)
    ok_run.assert_ge(
        "restore.second_copier_bytes",
        1 << 20,
        "the second copier copied part of it",
    );
}

/// `--fill-threads 1`: the loop alone fills the same quiet restore.
#[test]
fn fill_threads_1_keeps_the_fill_on_the_loop() {
    require_root_and_uffd();
    let run = quiet_restore("restore-copier-1", &["--fill-threads", "1"], &[]);
    run.assert_eq("restore.second_copier_bytes", 0, "no second copier");
}

/// A copier that gets no CPU (a test hook makes it wait 50 ms before it looks at a piece): the
/// loop takes its pieces back and copies them itself, and every page is still right.
#[test]
fn pieces_a_stalled_copier_has_not_started_are_taken_back_and_every_page_is_right() {
    require_root_and_uffd();
    let run = quiet_restore(
        "restore-copier-stalled",
        &["--fill-threads", "2"],
        &[("UMM_TEST_COPIER_CLAIM_DELAY_US", "50000")],
    );
    run.assert_ge(
        "restore.second_copier_taken_back",
        1,
        "the loop took pieces back from the stalled copier",
    );
}

/// A restore whose restorer touches nothing, verified page by page, all of it filled in the
/// background.
fn quiet_restore(name: &str, args: &[&str], env: &[(&str, &str)]) -> UmmRun {
    let dir = TestDir::new(name);
    let built = build_image(&dir, "img");
    let run = umm_restore(
        &dir,
        "restore",
        &built.img,
        args,
        &[
            &[("RICHSTATE_WATCH", format!("{A_START:#x}").as_str())],
            env,
        ]
        .concat(),
    );
    let ok = assert_restored(&run);
    let data_len = built.manifest.data_len;
    assert_eq!(ok.u64("pages"), data_len / PAGE, "{}", run.context());
    run.assert_eq(
        "restore.background_bytes",
        data_len,
        "every byte came through the background fill",
    );
    run
}

fn restore_storm(name: &str, fill_threads: &str) -> UmmRun {
    require_root_and_uffd();
    let dir = TestDir::new(name);
    let built = build_image(&dir, "img");
    // A bound on the background fill (64 MB/s: the restorer's ~22 MiB take at least a third
    // of a second) keeps its regions registered while the storms run, a few ms after the
    // handoff: each storm must raise a uffd event. Faults are served at full speed.
    let run = umm_restore(
        &dir,
        "restore",
        &built.img,
        &["--fill-rate", "64000000", "--fill-threads", fill_threads],
        &[],
    );
    let ok = assert_restored(&run);
    let children = ok.u64("children");
    let grandchildren = ok.u64("grandchildren");
    assert_eq!((children, grandchildren), (6, 4), "{}", run.context());
    assert!(
        ok.u64("pages") * 10 >= built.data_pages * 9,
        "the restorer verified {} data pages of {}\n{}",
        ok.u64("pages"),
        built.data_pages,
        run.context()
    );
    assert!(
        ok.u64("zero_after_dontneed") > 0,
        "no page with data was checked after MADV_DONTNEED\n{}",
        run.context()
    );
    // The storms met a restore in progress (the region was still registered after each).
    assert_eq!(ok.u64("forks_under_uffd"), children, "{}", run.context());
    for key in [
        "remaps_under_uffd",
        "removes_under_uffd",
        "unmaps_under_uffd",
    ] {
        assert!(
            ok.u64(key) >= 1,
            "{key} = 0: the storm ran after the restore completed\n{}",
            run.context()
        );
    }
    run.assert_ge(
        "restore.completed",
        1,
        "the restorer's address space completed",
    );
    run.assert_ge("processes", 1 + children + grandchildren, "the whole tree");
    run.assert_ge(
        "events.fork",
        children + grandchildren,
        "every fork of a process being restored is a FORK event",
    );
    // The children were forked before anything was filled: what they verified came into
    // their own address spaces (every obligation still open in the parent is theirs too).
    run.assert_ge(
        "fork_pages_served",
        1,
        "pages served into the forked children",
    );
    run.assert_ge("events.remap", ok.u64("remaps_under_uffd"), "the mremap");
    run.assert_ge(
        "events.remove",
        ok.u64("removes_under_uffd"),
        "the MADV_DONTNEEDs",
    );
    run.assert_ge("events.unmap", ok.u64("unmaps_under_uffd"), "the munmaps");
    run.assert_ge("faults", 1, "the restorer's reads fault");
    run.assert_eq("spaces_live", 0, "everything closed at the end");
    run
}

// ----- 2 ------------------------------------------------------------------------------------

#[test]
fn restore_with_no_background_serves_faults_only() {
    require_root_and_uffd();
    let dir = TestDir::new("restore-nobg");
    let built = build_image(&dir, "img");
    let run = umm_restore(
        &dir,
        "restore",
        &built.img,
        &["--no-background"],
        &[("RICHSTATE_CHILDREN", "2")],
    );
    let ok = assert_restored(&run);
    run.assert_eq(
        "restore.background_bytes",
        0,
        "--no-background copies nothing in the background",
    );
    // Pages only arrive through faults (a fault is answered with up to 2 MiB around it).
    let faults = run.counter("faults");
    assert!(
        faults >= 1 && faults * 512 >= ok.u64("pages"),
        "{faults} faults cannot have brought {} pages\n{}",
        ok.u64("pages"),
        run.context()
    );
    // The restorer touched every data page: faults alone completed its restore.
    run.assert_ge("restore.completed", 1, "faults alone complete a restore");
    assert!(
        run.report.opt_f64("restore.first_fault_ms").is_some(),
        "faults were served, restore.first_fault_ms is null\n{}",
        run.context()
    );
}

/// The restorer touches nothing (RICHSTATE_WATCH): it watches its pagemap until the manager
/// has filled every data page, waits for its regions to be unregistered, then verifies them as
/// plain memory. So the background fill alone completed the restore, at its rate bound.
#[test]
fn restore_with_a_fill_rate_still_completes() {
    require_root_and_uffd();
    let dir = TestDir::new("restore-rate");
    let built = build_image(&dir, "img");
    let rate: u64 = 16_000_000;
    let run = umm_restore(
        &dir,
        "restore",
        &built.img,
        // One copier: the order is watched page by page (two fill pieces 2 MiB apart at once).
        &["--fill-rate", &rate.to_string(), "--fill-threads", "1"],
        &[("RICHSTATE_WATCH", &format!("{A_START:#x}"))],
    );
    let ok = assert_restored(&run);
    let data_len = built.manifest.data_len;
    assert_eq!(ok.u64("pages"), data_len / PAGE, "{}", run.context());
    run.assert_eq("restore.completed", 1, "the restore completed");
    run.assert_eq(
        "restore.background_bytes",
        data_len,
        "every byte of the image came through the background fill",
    );
    // Address order without a prefetch file: A's first page is in the first slice filled
    // (the contrast of prefetch_order_from_a_trace_is_used).
    let first = field(&run.stdout, "first_poll").expect("WATCH first_poll");
    let a0 = run
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("WATCH page={A_START:#x} ")))
        .and_then(|l| field(l, "poll"))
        .expect("WATCH line of A's first page");
    assert_eq!(
        a0,
        first,
        "the fill in address order starts with A's first page\n{}",
        run.context()
    );
    // A token bucket starting empty cannot pass data_len bytes faster than data_len / rate.
    let ms = run.counter("restore.complete_ms");
    let floor = data_len * 1000 / rate;
    assert!(
        ms * 10 >= floor * 9,
        "the restore completed in {ms} ms, under the {floor} ms the rate bound allows\n{}",
        run.context()
    );
}

/// Progress lines: a restore lasting about 3 s (--fill-rate, a restorer that touches nothing
/// until the fill is done) prints at least one plain progress line on its non-terminal stderr
/// (a line every 2 s), and the same with --quiet prints none; both restores are verified. The
/// --trace of a restorer that faults is drawn by `umm report --svg`: fill progress, heat map
/// and latency histogram all have marks.
#[test]
fn restore_progress_lines_unless_quiet_and_its_trace_drawn_as_svg() {
    require_root_and_uffd();
    let dir = TestDir::new("restore-progress");
    let built = build_image(&dir, "img");
    let data_len = built.manifest.data_len;
    let rate = (data_len / 3).max(1 << 20).to_string();
    let trace = dir.join("restore.trace.jsonl");
    let trace_arg = trace.to_str().expect("utf-8 path");
    let progress_lines = |run: &UmmRun| -> Vec<String> {
        run.stderr
            .lines()
            .filter(|l| l.starts_with("restore: ") && l.contains("% ") && l.contains(" ETA "))
            .map(str::to_string)
            .collect()
    };
    let watch = [("RICHSTATE_WATCH", format!("{A_START:#x}"))];
    let watch: Vec<(&str, &str)> = watch.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = umm_restore(&dir, "loud", &built.img, &["--fill-rate", &rate], &watch);
    assert_restored(&run);
    run.assert_eq("restore.completed", 1, "the restore completed");
    let lines = progress_lines(&run);
    assert!(
        !lines.is_empty(),
        "no progress line from a 3 s restore\n{}",
        run.context()
    );
    let pct: u64 = lines[0]["restore: ".len()..]
        .split('%')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(999);
    assert!(pct <= 100, "a percentage: {}", lines[0]);

    let quiet = umm_restore(
        &dir,
        "quiet",
        &built.img,
        &["--fill-rate", &rate, "-q"],
        &watch,
    );
    assert_restored(&quiet);
    assert!(
        !quiet.stderr.lines().any(|l| l.starts_with("restore:")),
        "--quiet printed progress\n{}",
        quiet.context()
    );

    let traced = umm_restore(
        &dir,
        "traced",
        &built.img,
        &["--fill-rate", "64000000", "--trace", trace_arg],
        &[],
    );
    assert_restored(&traced);

    let marks = report_svg(&dir, &trace, &dir.join("restore.svg"));
    assert!(
        marks.fill_lines == 1 && marks.heat_cells >= 1 && marks.latency_bars >= 1,
        "{marks:?}"
    );
}

// ----- 3 ------------------------------------------------------------------------------------

/// A restore with --trace records its fault order; a restore with --prefetch of that trace
/// fills those pages first. The second restorer watches its pagemap (touching nothing), so the
/// order it sees is the background fill's own: the trace's first data page arrives in the very
/// first slice, and A's first page (first in address order) does not.
#[test]
fn prefetch_order_from_a_trace_is_used() {
    require_root_and_uffd();
    let dir = TestDir::new("restore-prefetch");
    let built = build_image(&dir, "img");
    let trace = dir.join("first.trace.jsonl");
    let trace_arg = trace.to_str().expect("utf-8 path");
    // (A bounded fill, so the restorer faults on its data pages rather than find them
    // filled: the trace needs a fault order, and an unbounded fill with two copiers could
    // get ahead of it.)
    let first = umm_restore(
        &dir,
        "traced",
        &built.img,
        &["--trace", trace_arg, "--fill-rate", "64000000"],
        &[("RICHSTATE_CHILDREN", "2")],
    );
    let ok1 = assert_restored(&first);
    first.assert_ge("restore.completed", 1, "the first restore completed");

    // The fault order, as --prefetch reads it: the data pages, in order, first occurrence.
    let text = fs::read_to_string(&trace).expect("read the trace");
    let mut order: Vec<u64> = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("a trace line is JSON");
        if v["kind"] == "fault" {
            let page = v["start"].as_u64().expect("fault start") & !(PAGE - 1);
            if data_offset(&built.manifest, page).is_some() && !order.contains(&page) {
                order.push(page);
            }
        }
    }
    assert!(
        order.len() > 100,
        "the trace has only {} faults on data pages\n{}",
        order.len(),
        first.context()
    );
    let head = order[0];
    let a0_rank = order.iter().position(|&p| p == A_START);

    let run = umm_restore(
        &dir,
        "prefetched",
        &built.img,
        // One copier: the order is watched page by page (two fill pieces 2 MiB apart at once).
        &[
            "--prefetch",
            trace_arg,
            "--fill-rate",
            "16000000",
            "--fill-threads",
            "1",
        ],
        &[("RICHSTATE_WATCH", &format!("{head:#x},{A_START:#x}"))],
    );
    let ok2 = assert_restored(&run);
    assert_eq!(
        ok2.u64("pages"),
        built.manifest.data_len / PAGE,
        "{}",
        run.context()
    );
    assert!(ok1.u64("pages") > 0);
    run.assert_eq("restore.completed", 1, "the restore completed");
    run.assert_eq(
        "restore.background_bytes",
        built.manifest.data_len,
        "the background fill brought everything",
    );
    let poll_of = |addr: u64| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(&format!("WATCH page={addr:#x} ")))
            .and_then(|l| field(l, "poll"))
            .unwrap_or_else(|| panic!("no WATCH line for {addr:#x}\n{}", run.context()))
    };
    let first_poll = field(&run.stdout, "first_poll").expect("first_poll");
    assert_eq!(
        poll_of(head),
        first_poll,
        "the trace's first data page {head:#x} is in the first slice filled\n{}",
        run.context()
    );
    // Unless the trace itself has A's first page near its head, address order would have
    // brought it first; with the prefetch order it comes later.
    if head != A_START && !matches!(a0_rank, Some(r) if r <= 16) {
        let a0: u64 = poll_of(A_START).parse().expect("poll number");
        let f: u64 = first_poll.parse().expect("poll number");
        assert!(
            a0 > f,
            "A's first page (rank {a0_rank:?} in the trace) was filled in the first slice: \
             the prefetch order was not used\n{}",
            run.context()
        );
    }
}

// ----- 4 ------------------------------------------------------------------------------------

/// A restorer started directly (not by umm) against a serving `umm restore --socket`.
fn spawn_restorer(
    dir: &TestDir,
    label: &str,
    img: &Path,
    socket: &Path,
    env: &[(&str, &str)],
) -> Proc {
    let mut c = command(&restorer_argv(img), dir, env);
    c.env("UMM_RESTORE_SOCKET", socket);
    Proc::spawn(dir, label, c)
}

/// Is the main thread of `pid` blocked in epoll_wait (the manager's loop, idle)?
fn waiting_in_epoll(pid: i32) -> bool {
    let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    if wchan.contains("epoll") {
        return true;
    }
    // Without kernel symbols: the syscall it is blocked in (x86-64 epoll_wait, epoll_pwait,
    // epoll_pwait2; aarch64 epoll_pwait, epoll_pwait2).
    let sys = fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let nr = sys.split_whitespace().next().unwrap_or("");
    if cfg!(target_arch = "x86_64") {
        ["232", "281", "441"].contains(&nr)
    } else {
        ["22", "441"].contains(&nr)
    }
}

/// SIGKILL a process group, give its members (bounded) time to finish dying, then check that
/// none is left, in D state or at all.
fn kill_group(p: &mut Proc) {
    p.kill();
    let pgid = p.pid;
    poll_until(500, Duration::from_millis(10), || {
        group_members(pgid).iter().all(|m| m.1 == 'Z')
    });
    p.assert_group_gone();
}

/// Wait (bounded) until `p` printed `needle`; false if it exited first or never did.
fn wait_for_output(p: &mut Proc, needle: &str, limit: Duration) -> bool {
    let tries = (limit.as_millis() / 2).max(1) as u32;
    poll_until(tries, Duration::from_millis(2), || {
        p.stdout().contains(needle) || p.try_wait().is_some()
    }) && p.stdout().contains(needle)
}

/// A `umm restore --socket S --image IMG [--keep-running]` without a command.
fn spawn_server(dir: &TestDir, img: &Path, extra: &[&str]) -> (Proc, PathBuf, PathBuf) {
    let socket = dir.join("restore.sock");
    let report = dir.join("server.report.json");
    let mut c = Command::new(umm_bin());
    c.arg("restore")
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(img)
        .arg("--report")
        .arg(&report)
        .args(extra)
        .current_dir(dir.path());
    let mut server = Proc::spawn(dir, "server", c);
    let up = poll_until(2000, Duration::from_millis(5), || {
        socket.exists() || server.try_wait().is_some()
    });
    assert!(
        up && socket.exists(),
        "umm restore never listened\n{}",
        server.context()
    );
    (server, socket, report)
}

#[test]
fn killing_restored_targets_at_random_moments_leaves_the_manager_serving_others() {
    require_root_and_uffd();
    // `make soak` raises it (UMM_CHAOS_ITERATIONS, as for the track-mode kills of chaos.rs)
    let iterations = env_count("UMM_CHAOS_ITERATIONS", 110);
    let dir = TestDir::new("restore-kills");
    let built = build_image(&dir, "img");
    // The rate bound keeps every restore mid-fill for a while (~1.4 s for the whole image).
    let (mut server, socket, report) = spawn_server(
        &dir,
        &built.img,
        &["--keep-running", "--fill-rate", "16000000"],
    );
    let mgr = server.pid;
    // Its fds once it is set up (listener, keeper, signals, timer...) and waiting for work.
    let idle = poll_until(2000, Duration::from_millis(5), || waiting_in_epoll(mgr));
    assert!(
        idle,
        "umm restore never waited in its loop\n{}",
        server.context()
    );
    let baseline = fd_count(mgr);

    // The long-running restore: verifies (slowly) again and again until told to stop.
    let until = dir.join("long.until");
    let until_s = until.to_str().expect("utf-8 path").to_string();
    let mut long = spawn_restorer(
        &dir,
        "long",
        &built.img,
        &socket,
        &[
            ("RICHSTATE_UNTIL", &until_s),
            ("RICHSTATE_SLOW_US", "100"),
            ("RICHSTATE_CHILDREN", "2"),
        ],
    );
    assert!(
        wait_for_output(&mut long, "HANDED", Duration::from_secs(30)),
        "the long-running restorer did not hand over\n{}\n{}",
        long.context(),
        server.context()
    );

    let mut handed = 1u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut moments = [0usize; 5];
    for i in 0..iterations {
        let children = (i % 4).to_string();
        let mut victim = spawn_restorer(
            &dir,
            &format!("victim{i}"),
            &built.img,
            &socket,
            &[("RICHSTATE_CHILDREN", &children)],
        );
        let r = next();
        let kind = (r % 5) as usize;
        let jitter = Duration::from_micros((r >> 8) % 8000);
        match kind {
            // before (or during) the handoff: right away, or after a few ms
            0 => {}
            1 => std::thread::sleep(jitter),
            // just after the handoff, mid-fill, while the children run
            _ => {
                let handed_over = wait_for_output(&mut victim, "HANDED", Duration::from_secs(30));
                assert!(
                    handed_over || victim.try_wait().is_none(),
                    "victim {i} exited before its handoff\n{}",
                    victim.context()
                );
                match kind {
                    2 => {}
                    3 => std::thread::sleep(jitter),
                    _ => std::thread::sleep(Duration::from_millis(10) + jitter * 4),
                }
            }
        }
        moments[kind] += 1;
        assert!(
            victim.try_wait().is_none(),
            "victim {i} exited before it was killed\n{}\n{}",
            victim.context(),
            server.context()
        );
        kill_group(&mut victim);
        let out = victim.stdout();
        assert!(
            !out.contains("FAIL richstate"),
            "victim {i} saw wrong memory\n{}",
            victim.context()
        );
        if out.contains("HANDED") {
            handed += 1;
        }
        assert!(
            server.try_wait().is_none(),
            "the manager died after victim {i} was killed\n{}",
            server.context()
        );
    }
    eprintln!(
        "killed {iterations} restorers ({handed} after their handoff, the long one included); \
         moments (at once, after a few ms, at the handoff, mid-fill, children running): \
         {moments:?}"
    );
    assert!(
        handed > 40 && moments.iter().all(|&m| m > 5),
        "the kills did not spread over the moments: {handed} handed over, {moments:?}"
    );

    // The long-running restore was served throughout and finishes right.
    assert!(
        long.try_wait().is_none(),
        "the long-running restorer died\n{}",
        long.context()
    );
    fs::write(&until, b"stop").expect("write the until file");
    let st = long.wait_bounded(LIMIT);
    assert!(
        st.success(),
        "the long-running restorer: {}\n{}\n{}",
        describe(&st),
        long.context(),
        server.context()
    );
    long.assert_group_gone();
    let ok = OkLine::find(&long.stdout(), "richstate")
        .unwrap_or_else(|| panic!("no OK line\n{}", long.context()));
    assert!(ok.u64("pages") > 0);

    // Everything of the dead restores is freed: the manager's fds are back to where they were
    // (exits are noticed by pidfd or by the once-a-second probe).
    let freed = poll_until(300, Duration::from_millis(50), || fd_count(mgr) <= baseline);
    assert!(
        freed,
        "the manager holds {} fds, {baseline} before the restores: {:#?}",
        fd_count(mgr),
        fd_list(mgr)
    );
    assert_group_no_d_state(mgr, "the manager's group after the random kills");

    server.signal(Signal::SIGTERM);
    let st = server.wait_bounded(Duration::from_secs(30));
    assert!(
        st.success(),
        "umm restore after SIGTERM: {}\n{}",
        describe(&st),
        server.context()
    );
    server.assert_group_gone();
    let rep = Report::load(&report).unwrap_or_else(|e| panic!("{e}\n{}", server.context()));
    rep.check_shape();
    let handoffs = rep.u64("restore.handoffs");
    assert!(
        handoffs >= handed,
        "report restore.handoffs = {handoffs}, but {handed} restorers printed HANDED\n{}",
        rep.pretty()
    );
    assert!(
        rep.u64("restore.completed") >= 1,
        "the long-running restore completed\n{}",
        rep.pretty()
    );
    assert_eq!(
        rep.u64("restore.killed"),
        0,
        "the manager stopped nothing itself\n{}",
        rep.pretty()
    );
    assert_eq!(rep.u64("spaces_live"), 0, "{}", rep.pretty());
    assert!(
        rep.get("restore.failed").is_some_and(Value::is_null),
        "{}",
        rep.pretty()
    );
}

// ----- 5 ------------------------------------------------------------------------------------

/// The children of `pid` (from /proc/PID/task/*/children).
fn children_of(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("children")) {
                v.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
            }
        }
    }
    v
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The cgroup v2 directory of a process.
fn cgroup_dir(pid: i32) -> Option<PathBuf> {
    let rel = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = rel.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let root = info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    Some(root.join(rel.trim_start_matches('/')))
}

#[test]
fn killing_the_manager_mid_restore_kills_the_restored_tree_and_no_zero_page_is_seen() {
    require_root_and_uffd();
    let dir = TestDir::new("restore-mgrkill");
    let built = build_image(&dir, "img");
    let rounds: [&[&str]; 3] = [
        &["--fill-rate", "2000000"],
        &["--fill-rate", "2000000", "--no-cgroup"],
        &["--no-background"],
    ];
    for (round, args) in rounds.iter().enumerate() {
        let label = format!("round{round}");
        // richstate reap: a subreaper that reports how each process of the tree ended.
        let (inner, _report) = restore_argv(&dir, &label, &built.img, args);
        let mut argv: Vec<OsString> = vec![richstate().into(), "reap".into()];
        argv.extend(inner);
        let c = command(
            &argv,
            &dir,
            &[
                ("RICHSTATE_LOOP", "1"),
                ("RICHSTATE_SLOW_US", "300"),
                ("RICHSTATE_CHILDREN", "3"),
            ],
        );
        let mut reaper = Proc::spawn(&dir, &label, c);
        assert!(
            wait_for_output(&mut reaper, "HANDED", Duration::from_secs(30)),
            "{label}: no handoff\n{}",
            reaper.context()
        );
        let out = reaper.stdout();
        let umm_pid: i32 = out
            .lines()
            .find_map(|l| l.strip_prefix("CHILD pid="))
            .and_then(|v| v.trim().parse().ok())
            .expect("CHILD line");
        let restorer_pid: i32 = out
            .lines()
            .find_map(|l| l.strip_prefix("HANDED pid="))
            .and_then(|v| v.trim().parse().ok())
            .expect("HANDED line");
        // 1 restorer + 3 children + 2 grandchildren, all verifying.
        let reaper_pid = reaper.pid;
        let restored = || -> Vec<i32> {
            group_members(reaper_pid)
                .into_iter()
                .filter(|m| m.0 != reaper_pid && m.2 == "richstate" && m.1 != 'Z')
                .map(|m| m.0)
                .collect()
        };
        let all_up = poll_until(3000, Duration::from_millis(10), || restored().len() >= 6);
        assert!(
            all_up,
            "{label}: the restored tree never had 6 processes: {:?}\n{}",
            restored(),
            reaper.context()
        );
        std::thread::sleep(Duration::from_millis(100 + 150 * round as u64));
        let before = restored();
        let keeper = children_of(umm_pid)
            .into_iter()
            .find(|&c| cmdline(c).contains("__keeper"))
            .unwrap_or_else(|| panic!("{label}: no keeper among umm's children"));
        let cgroup = cgroup_dir(restorer_pid);
        assert!(
            reaper.stdout().lines().all(|l| !l.starts_with("REAPED")),
            "{label}: something ended before the manager was killed\n{}",
            reaper.context()
        );

        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(umm_pid), Signal::SIGKILL);
        // The reaper exits once every process of the tree is gone, the keeper included.
        let st = reaper.wait_bounded(Duration::from_secs(60));
        assert!(
            st.success(),
            "{label}: reaper {}\n{}",
            describe(&st),
            reaper.context()
        );
        reaper.assert_group_gone();
        let out = reaper.stdout();
        assert!(
            !out.contains("FAIL richstate") && !out.contains("OK richstate"),
            "{label}: a restored process saw wrong memory, or finished\n{}",
            reaper.context()
        );
        let mut reaped = std::collections::BTreeMap::new();
        for l in out.lines().filter(|l| l.starts_with("REAPED ")) {
            let pid: i32 = field(l, "pid").and_then(|v| v.parse().ok()).expect("pid");
            reaped.insert(
                pid,
                (
                    field(l, "comm").unwrap_or_default(),
                    field(l, "status").unwrap_or_default(),
                ),
            );
        }
        assert_eq!(
            reaped.get(&umm_pid).map(|r| r.1.as_str()),
            Some("signal:9"),
            "{label}: umm\n{out}"
        );
        assert!(
            reaped.contains_key(&keeper),
            "{label}: the keeper {keeper} did not end\n{out}"
        );
        for pid in &before {
            assert_eq!(
                reaped.get(pid).map(|r| r.1.as_str()),
                Some("signal:9"),
                "{label}: restored process {pid} was not killed by SIGKILL\n{out}"
            );
        }
        for (pid, (comm, status)) in &reaped {
            if comm == "richstate" {
                assert_eq!(
                    status, "signal:9",
                    "{label}: restored process {pid} ended otherwise\n{out}"
                );
            }
        }
        assert!(
            reaper
                .stderr()
                .contains("killing the restored processes so none runs on missing memory"),
            "{label}: the keeper did not say it stopped the restore\n{}",
            reaper.context()
        );
        // The restore's cgroup (when there is one) holds no process any more. umm, killed,
        // could not remove it: do it here.
        if let Some(cg) = cgroup.filter(|c| {
            c.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("umm-restore-"))
        }) {
            let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            assert!(
                procs.trim().is_empty(),
                "{label}: processes left in {}: {procs}",
                cg.display()
            );
            let _ = fs::remove_dir(&cg);
        }
    }
}

// ----- 6 ------------------------------------------------------------------------------------

fn copy_image(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for f in ["manifest.json", "pages.img", "checksums.bin"] {
        fs::copy(from.join(f), to.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

#[test]
fn a_flipped_byte_in_the_image_stops_the_restore() {
    require_root_and_uffd();
    let dir = TestDir::new("restore-flip");
    let built = build_image(&dir, "img");
    let bad = dir.join("flipped");
    copy_image(&built.img, &bad);
    // A byte of D's first page: the restorer reads every page of D, and never zaps it.
    let off = data_offset(&built.manifest, D_START).expect("D has data") + 100;
    let mut data = fs::read(bad.join("pages.img")).expect("read pages.img");
    data[off as usize] ^= 0x40;
    fs::write(bad.join("pages.img"), &data).expect("write pages.img");
    drop(data);

    let run = umm_restore(&dir, "restore", &bad, &[], &[("RICHSTATE_CHILDREN", "3")]);
    assert!(
        run.stdout.contains("HANDED"),
        "the restorer did not hand over\n{}",
        run.context()
    );
    assert!(
        !run.stdout.contains("OK richstate") && !run.stdout.contains("FAIL richstate"),
        "the restorer ran on: it must be stopped before it sees the chunk\n{}",
        run.context()
    );
    // umm restore exits with the command's status: 128 + SIGKILL.
    assert_eq!(
        run.status.code(),
        Some(137),
        "the restorer is killed and umm restore fails with it\n{}",
        run.context()
    );
    run.report.check_shape();
    run.assert_ge("restore.killed", 1, "the restore was stopped");
    let failed = run.report.str_or_empty("restore.failed");
    assert!(
        failed.contains("corrupt") && failed.contains("pages.img") && failed.contains("chunk"),
        "restore.failed = {failed:?} does not name the corrupt chunk\n{}",
        run.context()
    );
    assert!(
        run.stderr.contains("corrupt"),
        "umm restore says nothing about the corrupt chunk\n{}",
        run.context()
    );
}

// ----- 7 ------------------------------------------------------------------------------------

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("manifest.json");
    let mut v: Value = serde_json::from_str(&fs::read_to_string(&path).expect("read manifest"))
        .expect("manifest is JSON");
    edit(&mut v);
    fs::write(&path, serde_json::to_string(&v).expect("JSON")).expect("write manifest");
}

#[test]
fn corrupt_images_are_refused_with_clear_errors() {
    require_root_and_uffd();
    let dir = TestDir::new("restore-corrupt");
    let built = build_image(&dir, "img");
    type Mutation = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Mutation, &str, &[&str])> = vec![
        (
            "truncated",
            Box::new(|d: &Path| {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("pages.img"))
                    .expect("open");
                let len = f.metadata().expect("stat").len();
                f.set_len(len - 3 * PAGE).expect("truncate");
            }),
            "pages.img",
            &["truncated"],
        ),
        (
            "overlap",
            Box::new(|d: &Path| {
                edit_manifest(d, |v| {
                    v["regions"][0]["len"] = format!("{:#x}", B_START - A_START + MIB).into();
                })
            }),
            "manifest.json",
            &["overlap"],
        ),
        (
            "checksums-short",
            Box::new(|d: &Path| {
                let p = d.join("checksums.bin");
                let b = fs::read(&p).expect("read");
                fs::write(&p, &b[..b.len() - 4]).expect("write");
            }),
            "checksums.bin",
            &[],
        ),
        (
            "checksums-magic",
            Box::new(|d: &Path| {
                let p = d.join("checksums.bin");
                let mut b = fs::read(&p).expect("read");
                b[..8].copy_from_slice(b"NOTACSUM");
                fs::write(&p, &b).expect("write");
            }),
            "checksums.bin",
            &[],
        ),
        (
            "huge-region",
            Box::new(|d: &Path| {
                edit_manifest(d, |v| {
                    v["regions"][2]["len"] = "0xfffffffffffff000".into();
                })
            }),
            "manifest.json",
            &[],
        ),
        (
            "huge-data-len",
            Box::new(|d: &Path| {
                edit_manifest(d, |v| {
                    v["data_len"] = (1u64 << 62).into();
                })
            }),
            "",
            &[],
        ),
        (
            "no-manifest",
            Box::new(|d: &Path| fs::remove_file(d.join("manifest.json")).expect("rm")),
            "manifest.json",
            &[],
        ),
    ];
    for (name, mutate, file, words) in cases {
        let img = dir.join(format!("bad-{name}"));
        copy_image(&built.img, &img);
        mutate(&img);
        let socket = dir.join(format!("{name}.sock"));
        let mut c = Command::new(umm_bin());
        c.arg("restore")
            .arg("--image")
            .arg(&img)
            .arg("--socket")
            .arg(&socket)
            .env("RUST_BACKTRACE", "1")
            .current_dir(dir.path());
        let mut p = Proc::spawn(&dir, name, c);
        let st = p.wait_bounded(Duration::from_secs(30));
        p.assert_group_gone();
        let err = p.stderr();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            !st.success() && st.code().is_some(),
            "{name}: umm restore {} on a corrupt image\n{}",
            describe(&st),
            p.context()
        );
        assert_eq!(
            lines.len(),
            1,
            "{name}: want a one-line error\n{}",
            p.context()
        );
        let line = lines[0];
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{name}: a panic\n{}",
            p.context()
        );
        let named = if file.is_empty() {
            line.contains("manifest.json") || line.contains("pages.img")
        } else {
            line.contains(file)
        };
        assert!(
            named && line.starts_with("umm: "),
            "{name}: the error does not name {file:?}: {line}"
        );
        for w in words {
            assert!(
                line.to_lowercase().contains(w),
                "{name}: the error does not say {w:?}: {line}"
            );
        }
        assert!(
            !socket.exists(),
            "{name}: umm restore listened on a corrupt image"
        );
    }
}

// ----- 8 ------------------------------------------------------------------------------------

#[test]
fn restore_of_regions_not_in_the_image_or_touched_before_handoff_is_refused() {
    require_root_and_uffd();
    let dir = TestDir::new("restore-refuse");
    let built = build_image(&dir, "img");
    let (mut server, socket, report) = spawn_server(&dir, &built.img, &[]);

    // Regions that are not the image's: refused, with the reason, by umm_restore_handoff.
    let cases = [
        ("extra", "is not a region of the image"),
        ("len", "does not match the image's region"),
        ("unmapped", "is not mapped as private anonymous memory"),
    ];
    for (bogus, why) in cases {
        let mut p = spawn_restorer(
            &dir,
            &format!("bogus-{bogus}"),
            &built.img,
            &socket,
            &[("RICHSTATE_BOGUS", bogus)],
        );
        let st = p.wait_bounded(LIMIT);
        p.assert_group_gone();
        assert_eq!(
            st.code(),
            Some(3),
            "{bogus}: the restorer's handoff must fail\n{}",
            p.context()
        );
        let out = p.stdout();
        let line = out
            .lines()
            .find(|l| l.starts_with("HANDOFF FAILED: "))
            .unwrap_or_else(|| panic!("{bogus}: no HANDOFF FAILED line\n{}", p.context()));
        assert!(
            line.contains("refused") && line.contains(why),
            "{bogus}: unclear error: {line}"
        );
        assert!(!out.contains("HANDED"), "{bogus}: {out}");
        assert!(server.try_wait().is_none(), "the manager died");
    }
    // The manager goes on serving: a good restorer after them.
    let mut good = spawn_restorer(
        &dir,
        "good",
        &built.img,
        &socket,
        &[("RICHSTATE_CHILDREN", "1")],
    );
    let st = good.wait_bounded(LIMIT);
    assert!(st.success(), "{}\n{}", good.context(), server.context());
    good.assert_group_gone();
    assert!(OkLine::find(&good.stdout(), "richstate").is_some());
    // It completed, so the server (no --keep-running) exits by itself.
    let st = server.wait_bounded(LIMIT);
    assert!(st.success(), "{}", server.context());
    server.assert_group_gone();
    let rep = Report::load(&report).unwrap_or_else(|e| panic!("{e}\n{}", server.context()));
    assert!(
        rep.u64("refused") >= 3,
        "report refused < 3\n{}",
        rep.pretty()
    );
    assert_eq!(rep.u64("restore.handoffs"), 1, "{}", rep.pretty());
    assert_eq!(rep.u64("restore.killed"), 0, "{}", rep.pretty());

    // The same refusal under `umm restore -- CMD`: the command fails, and so does umm
    // restore, with its status, although nothing was handed over.
    let run = umm_restore(
        &dir,
        "refused-cmd",
        &built.img,
        &[],
        &[("RICHSTATE_BOGUS", "extra")],
    );
    assert_eq!(run.status.code(), Some(3), "{}", run.context());
    assert!(run.stdout.contains("HANDOFF FAILED"), "{}", run.context());
    run.assert_ge("refused", 1, "the handoff was refused");
    run.assert_eq("handoffs", 0, "nothing was handed over");

    // A page with data written before the handoff: that process never runs on with it,
    // whether the background fill would meet the page first (A's page 2), a fault whose
    // fault-around window starts on it (in B's last run, which the rate-bound fill reaches
    // last), or nothing at all (no background fill).
    let variants: [(&str, &[&str], &str); 3] = [
        ("touched", &[], "1"),
        ("touched-fault", &["--fill-rate", "16000000"], "late-fault"),
        ("touched-nobg", &["--no-background"], "1"),
    ];
    for (label, args, how) in variants {
        let run = umm_restore(
            &dir,
            label,
            &built.img,
            args,
            &[("RICHSTATE_TOUCH_BEFORE", how)],
        );
        assert_touched_restorer_stopped(&run);
    }
}

/// A restorer that wrote a data page before its handoff never goes on with that page (it would
/// print "SURVIVED", then FAIL): its handoff is refused (the manager finds the page populated),
/// or, failing that, it is killed once the manager meets the page.
fn assert_touched_restorer_stopped(run: &UmmRun) {
    assert!(
        !run.stdout.contains("SURVIVED")
            && !run.stdout.contains("FAIL richstate")
            && !run.stdout.contains("OK richstate"),
        "the restorer went on with a page it had written itself, not the image's\n{}",
        run.context()
    );
    if let Some(line) = run
        .stdout
        .lines()
        .find(|l| l.starts_with("HANDOFF FAILED: "))
    {
        assert!(
            line.contains("refused") && line.contains("touched before the handoff"),
            "unclear refusal: {line}"
        );
        assert_eq!(
            run.status.code(),
            Some(3),
            "umm restore exits with the refused restorer's status\n{}",
            run.context()
        );
        run.assert_ge("refused", 1, "the handoff was refused");
        run.assert_eq("handoffs", 0, "nothing was handed over");
        return;
    }
    assert_eq!(
        run.status.code(),
        Some(137),
        "the restorer is killed\n{}",
        run.context()
    );
    run.assert_ge("restore.killed", 1, "the restore was stopped");
    let failed = run.report.str_or_empty("restore.failed");
    assert!(
        failed.contains("populated before the manager could fill it"),
        "restore.failed = {failed:?}\n{}",
        run.context()
    );
}
