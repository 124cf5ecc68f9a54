//! The six figures of issue 5. Each one measures umm and its baselines in the same run,
//! interleaved repetition by repetition (so drift hits both alike), and returns a [`Figure`].
//! A run that fails leaves an error on its row (the table shows it), never a made-up number.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use serde_json::Value;

use crate::model::{quantile, Figure, Row, Target};
use crate::procs::{command, run_ok, Background, Output};
use crate::svg::{self, Panel, Series};
use crate::{Ctx, ImageInfo, GIB, IMAGE_ADDR, IMAGE_SEED, KIB, MIB};

pub fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

pub fn hex(v: u64) -> String {
    format!("{v:#x}")
}

pub(crate) fn size_label(b: u64) -> String {
    if b >= GIB && b % GIB == 0 {
        format!("{} GiB", b / GIB)
    } else if b >= MIB && b % MIB == 0 {
        format!("{} MiB", b / MIB)
    } else {
        format!("{} KiB", b / KIB)
    }
}

pub fn load_report(p: &Path) -> Result<Value, String> {
    let t = fs::read_to_string(p).map_err(|e| format!("report {}: {e}", p.display()))?;
    serde_json::from_str(&t).map_err(|e| format!("report {}: {e}", p.display()))
}

pub fn field(v: &Value, path: &str) -> Option<f64> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
}

/// Read a file through (into the page cache).
pub(crate) fn warm(p: &Path) {
    if let Ok(mut f) = fs::File::open(p) {
        let mut buf = vec![0u8; 4 * MIB as usize];
        while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Drop a (clean) file's pages from the page cache.
fn drop_cache(p: &Path) -> Result<(), String> {
    let f = fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| format!("posix_fadvise {}: {e}", p.display()))
}

/// Latencies written by a program (ns, one per line), in µs, sorted.
pub fn latencies(p: &Path) -> Result<Vec<f64>, String> {
    let t = fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut v: Vec<f64> = t
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|ns| ns / 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    let _ = fs::remove_file(p);
    Ok(v)
}

fn need(o: &Output, key: &str) -> Result<f64, String> {
    o.result(key)
        .ok_or_else(|| format!("no {key}= in the RESULT line: {}", o.describe()))
}

/// Build the image of figures 1, 3 and 4: `bench_image build` fills a region at a fixed
/// address with a function of (seed, address); `umm snapshot --kill` writes it.
pub fn build_image(ctx: &mut Ctx) -> Result<(), String> {
    let dir = ctx.work.join("image");
    ctx.image = Some(build_image_at(ctx, &dir, ctx.image_len)?);
    Ok(())
}

/// The image of a `bench_image build` region of `len` bytes, snapshotted into `dir`.
pub fn build_image_at(ctx: &Ctx, dir: &Path, len: u64) -> Result<ImageInfo, String> {
    let dir = dir.to_path_buf();
    let mut b = Background::spawn(
        &ctx.work,
        "image-build",
        command(&[
            s(ctx.prog("bench_image").display()),
            s("build"),
            hex(IMAGE_ADDR),
            hex(len),
            s(IMAGE_SEED),
        ]),
    )?;
    let line = b.wait_line("READY", ctx.limit)?;
    let pid = line
        .strip_prefix("READY pid=")
        .ok_or_else(|| format!("bad line {line}"))?
        .to_string();
    let mut snap = std::process::Command::new(&ctx.umm);
    snap.args(["snapshot", "--quiet", "--kill", "-o"])
        .arg(&dir)
        .arg("--range")
        .arg(format!("{:x}-{:x}", IMAGE_ADDR, IMAGE_ADDR + len))
        .arg(&pid);
    run_ok(&ctx.work, "snapshot", snap, ctx.limit)?;
    drop(b);
    let m: Value = serde_json::from_str(
        &fs::read_to_string(dir.join("manifest.json")).map_err(|e| format!("manifest: {e}"))?,
    )
    .map_err(|e| format!("manifest: {e}"))?;
    let parse = |v: &Value| {
        v.as_str()
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
    };
    let regions = m["regions"].as_array().cloned().unwrap_or_default();
    let run = regions
        .first()
        .and_then(|r| r["runs"].as_array())
        .and_then(|runs| runs.first())
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ok = regions.len() == 1
        && parse(&regions[0]["start"]) == Some(IMAGE_ADDR)
        && parse(&regions[0]["len"]) == Some(len)
        && run.len() == 3
        && parse(&run[0]) == Some(0)
        && parse(&run[1]) == Some(len);
    if !ok {
        return Err(format!(
            "the image is not one dense region of {len} bytes: {m}"
        ));
    }
    Ok(ImageInfo {
        dir,
        len,
        data_off: parse(&run[2]).unwrap_or(0),
    })
}

fn image(ctx: &Ctx, f: &mut Figure) -> Option<ImageInfo> {
    let img = ctx.image.clone();
    if img.is_none() {
        f.error("image", "-", "no image (see the build error above)".into());
    }
    img
}

// ---- figure 1 ---------------------------------------------------------------------------

const DEFAULT_FILL: &str = "umm restore, default chunk (adapts 256 KiB-2 MiB)";

pub fn fig1(ctx: &mut Ctx) -> Figure {
    let mut f = Figure::new(
        1,
        "Background fill throughput: umm restore vs the ceiling (minimal in-process UFFDIO_COPY \
         from the same mmap'd image, same chunk size), hot page cache",
    );
    let Some(img) = image(ctx, &mut f) else {
        return f;
    };
    f.note(format!(
        "image {} ({} pages); GB = 1e9 bytes; throughput = image size / (handoff returned -> last \
         page present, seen by the restorer in its pagemap)",
        size_label(img.len),
        img.len / 4096
    ));
    f.note(
        "umm adapts its chunk between min(256 KiB, max) and max(256 KiB, max): with \
         --fill-chunk-max below 256 KiB and no faults it grows to 256 KiB; the ceiling is one \
         thread; umm's default chunk row pairs pieces with a second copier where umm may use \
         two CPUs (--fill-threads 1: the loop alone; a --fill-chunk-max below 2 MiB: one thread)",
    );
    let chunks: Vec<u64> = if ctx.quick {
        vec![64 * KIB, 2 * MIB]
    } else {
        vec![4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 2 * MIB]
    };
    warm(&img.pages());
    let gbs = |us: f64| img.len as f64 / us / 1000.0;
    let report = ctx.work.join("fig1.report.json");
    let reps = if ctx.quick { 1 } else { ctx.reps.max(5) };
    for rep in 0.. {
        if !ctx.rep_ok(rep, reps) {
            break;
        }
        for &c in &chunks {
            let ceil_name = format!("ceiling, chunk {}", size_label(c));
            let ceil = ceiling_cmd(ctx, &img, c, "file", None);
            warm(&img.pages());
            match run_ok(&ctx.work, "ceiling", ceil, ctx.limit).and_then(|o| need(&o, "fill_us")) {
                Ok(us) => f.push(&ceil_name, "GB/s", gbs(us)),
                Err(e) => f.error(&ceil_name, "GB/s", e),
            }
            let (name, args) = if c == 2 * MIB {
                (DEFAULT_FILL.to_string(), vec![])
            } else {
                (
                    format!("umm restore, --fill-chunk-max {}", size_label(c)),
                    vec![s("--fill-chunk-max"), s(c)],
                )
            };
            f.row(&name, || {
                let r = Row::new("", "GB/s").vs(&ceil_name);
                if c == 2 * MIB {
                    r.target(Target::at_least(0.90))
                } else {
                    r
                }
            });
            let cmd = ctx.umm_restore(&report, &args, &fill_argv(ctx, &img, None));
            warm(&img.pages());
            let got = run_ok(&ctx.work, "umm-restore-fill", cmd, ctx.limit).and_then(|o| {
                let rep = load_report(&report)?;
                Ok((need(&o, "fill_us")?, rep))
            });
            match got {
                Ok((us, rep)) => {
                    f.push(&name, "GB/s", gbs(us));
                    if c == 2 * MIB {
                        if let Some(ms) = field(&rep, "restore.complete_ms") {
                            f.push(
                                "umm restore default: handoff -> complete (report)",
                                "ms",
                                ms,
                            );
                        }
                        if let Some(rss) = field(&rep, "manager_peak_rss_bytes") {
                            ctx.restore_rss.push((rss, img.len as f64));
                            f.push(
                                "umm restore default: manager peak RSS",
                                "MiB",
                                rss / MIB as f64,
                            );
                        }
                    }
                }
                Err(e) => f.error(&name, "GB/s", e),
            }
        }
        // One copier: the default pairs pieces with a second copier where umm may use two
        // CPUs (the restorer touches nothing, so every turn is quiet); this is the loop alone,
        // like the ceiling.
        let one = "umm restore, default chunk, --fill-threads 1";
        f.row(one, || Row::new("", "GB/s").vs("ceiling, chunk 2 MiB"));
        let args = [s("--fill-threads"), s(1)];
        let cmd = ctx.umm_restore(&report, &args, &fill_argv(ctx, &img, None));
        warm(&img.pages());
        match run_ok(&ctx.work, "umm-restore-fill-1", cmd, ctx.limit)
            .and_then(|o| need(&o, "fill_us"))
        {
            Ok(us) => f.push(one, "GB/s", gbs(us)),
            Err(e) => f.error(one, "GB/s", e),
        }
        let pop = "ceiling, chunk 2 MiB, source pre-faulted (MAP_POPULATE)";
        let cmd = ceiling_cmd(ctx, &img, 2 * MIB, "populate", None);
        warm(&img.pages());
        match run_ok(&ctx.work, "ceiling-populate", cmd, ctx.limit)
            .and_then(|o| need(&o, "fill_us"))
        {
            Ok(us) => f.push(pop, "GB/s", gbs(us)),
            Err(e) => f.error(pop, "GB/s", e),
        }
    }
    // One more of each, watched over time, for the chart.
    let pages = (img.len / 4096) as f64;
    let prog = ctx.work.join("fill-progress.txt");
    let cmd = ctx.umm_restore(&report, &[], &fill_argv(ctx, &img, Some(&prog)));
    warm(&img.pages());
    if run_ok(&ctx.work, "umm-restore-progress", cmd, ctx.limit).is_ok() {
        ctx.chart
            .fill
            .push((DEFAULT_FILL.into(), progress(&prog, pages)));
    }
    let cmd = ceiling_cmd(ctx, &img, 2 * MIB, "file", Some(&prog));
    warm(&img.pages());
    if run_ok(&ctx.work, "ceiling-progress", cmd, ctx.limit).is_ok() {
        ctx.chart
            .fill
            .push(("ceiling, chunk 2 MiB".into(), progress(&prog, pages)));
    }
    let _ = fs::remove_file(&report);
    f
}

/// The minimal in-process handler (bench_ceiling) copying the image in `chunk`-byte copies;
/// `mode` is how its source is mapped ("file", "populate"); with `progress`, it records the
/// fill over time there.
fn ceiling_cmd(
    ctx: &Ctx,
    img: &ImageInfo,
    chunk: u64,
    mode: &str,
    progress: Option<&Path>,
) -> Command {
    let mut argv = vec![
        s(ctx.prog("bench_ceiling").display()),
        s(img.pages().display()),
        s(img.data_off),
        hex(IMAGE_ADDR),
        s(img.len),
        s(IMAGE_SEED),
        s(chunk),
        s(mode),
    ];
    if let Some(p) = progress {
        argv.push(s(p.display()));
    }
    command(&argv)
}

fn fill_argv(ctx: &Ctx, img: &ImageInfo, progress: Option<&Path>) -> Vec<String> {
    let mut v = vec![
        s(ctx.prog("bench_image").display()),
        s("fill"),
        hex(IMAGE_ADDR),
        hex(img.len),
        s(IMAGE_SEED),
        s(img.dir.display()),
    ];
    if let Some(p) = progress {
        v.push(s(p.display()));
    }
    v
}

/// "t_us pages" lines → (ms, fraction).
fn progress(p: &Path, pages: f64) -> Vec<(f64, f64)> {
    let v = fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(|x| x.parse::<f64>().ok());
            Some((it.next()?? / 1000.0, 100.0 * it.next()?? / pages))
        })
        .collect();
    let _ = fs::remove_file(p);
    v
}

// ---- figure 2 ---------------------------------------------------------------------------

/// p50, p99, max of sorted µs latencies.
pub fn pcts(v: &[f64]) -> Option<(f64, f64, f64)> {
    Some((quantile(v, 0.5)?, quantile(v, 0.99)?, *v.last()?))
}

pub fn fig2(ctx: &mut Ctx) -> Figure {
    let mut f = Figure::new(
        2,
        "Fault service latency (one page per fault, random order, timed in the faulting \
         program): umm run vs the minimal handler vs the kernel",
    );
    let (region_pages, touches) = if ctx.quick {
        (4096u64, 2048u64)
    } else {
        (262_144, 16_384)
    };
    f.note(format!(
        "{touches} first touches (writes) of distinct random pages of a {} region; umm with \
         --fault-around-max 4096 (one page per fault); minimal handler = an in-process thread \
         blocked in poll(2), read(2) of one uffd_msg, UFFDIO_COPY of one zero page; \
         in a child process = the same loop in a forked child on the inherited uffd (an address \
         space switch per wake-up, as for umm)",
        size_label(region_pages * 4096)
    ));
    f.note(
        "2 CPUs = unpinned (handler and faulting thread usually on different vCPUs: each fault \
         pays two cross-CPU wake-ups of a halted vCPU, which a VM makes slow and noisy); \
         1 CPU = everything pinned to CPU 1 with taskset (wake-ups are local context switches)",
    );
    let pin_ok = Command::new("taskset").arg("-V").output().is_ok();
    struct Variant {
        name: String,
        umm_args: Option<Vec<String>>,
        mode: &'static str,
        pinned: bool,
        baseline: Option<&'static str>,
        target: bool,
    }
    const H2: &str = "minimal handler, 2 CPUs";
    const H1: &str = "minimal handler, 1 CPU";
    // The same handler in another process: what any out-of-process manager pays at least.
    const P2: &str = "minimal handler in a child process, 2 CPUs";
    const P1: &str = "minimal handler in a child process, 1 CPU";
    let window = || vec![s("--fault-around-max"), s(4096)];
    let mut variants = vec![
        Variant {
            name: "kernel first touch (no uffd)".into(),
            umm_args: None,
            mode: "plain",
            pinned: false,
            baseline: None,
            target: false,
        },
        Variant {
            name: H2.into(),
            umm_args: None,
            mode: "handler",
            pinned: false,
            baseline: None,
            target: false,
        },
        Variant {
            name: P2.into(),
            umm_args: None,
            mode: "handler-proc",
            pinned: false,
            baseline: Some(H2),
            target: false,
        },
        Variant {
            name: "umm run, 2 CPUs".into(),
            umm_args: Some(window()),
            mode: "plain",
            pinned: false,
            baseline: Some(H2),
            target: true,
        },
    ];
    let spins: &[u64] = if ctx.quick { &[50] } else { &[10, 50, 200] };
    for &n in spins {
        let mut a = window();
        a.extend([s("--spin-us"), s(n)]);
        variants.push(Variant {
            name: format!("umm run --spin-us {n}, 2 CPUs"),
            umm_args: Some(a),
            mode: "plain",
            pinned: false,
            baseline: Some(H2),
            target: false,
        });
    }
    if pin_ok {
        variants.push(Variant {
            name: H1.into(),
            umm_args: None,
            mode: "handler",
            pinned: true,
            baseline: None,
            target: false,
        });
        variants.push(Variant {
            name: P1.into(),
            umm_args: None,
            mode: "handler-proc",
            pinned: true,
            baseline: Some(H1),
            target: false,
        });
        variants.push(Variant {
            name: "umm run, 1 CPU".into(),
            umm_args: Some(window()),
            mode: "plain",
            pinned: true,
            baseline: Some(H1),
            target: true,
        });
    } else {
        f.note("taskset not found: no 1-CPU rows");
    }
    for v in &variants {
        for (m, is_p50) in [("p50", true), ("p99", false), ("max", false)] {
            f.row(&format!("{}: {m}", v.name), || {
                let r = Row::new("", "µs");
                let Some(b) = v.baseline else { return r };
                let r = r.vs(format!("{b}: {m}"));
                if is_p50 && v.target {
                    r.target(Target::at_most(1.2))
                } else {
                    r
                }
            });
        }
    }
    let reps = if ctx.quick { 1 } else { ctx.reps.max(5) };
    let mut pooled: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let report = ctx.work.join("fig2.report.json");
    for rep in 0.. {
        if !ctx.rep_ok(rep, reps) {
            break;
        }
        for (i, v) in variants.iter().enumerate() {
            let out = ctx.work.join("lat.txt");
            let argv = vec![
                s(ctx.prog("bench_fault").display()),
                s("lat"),
                s(v.mode),
                s(region_pages),
                s(touches),
                s(out.display()),
            ];
            let cmd = match &v.umm_args {
                None => command(&argv),
                Some(a) => ctx.umm_run(&report, a, &argv),
            };
            let cmd = if v.pinned { pinned(cmd) } else { cmd };
            let got = run_ok(&ctx.work, "fault-lat", cmd, ctx.limit).and_then(|o| {
                if v.umm_args.is_some() {
                    let served = field(&load_report(&report)?, "pages_served").unwrap_or(0.0);
                    if o.result("registered") != Some(1.0) || served < touches as f64 {
                        return Err(format!(
                            "umm did not serve the region (registered={:?}, pages_served={served})",
                            o.result("registered")
                        ));
                    }
                }
                latencies(&out)
            });
            let name = &v.name;
            match got.and_then(|l| pcts(&l).map(|p| (l, p)).ok_or("no samples".into())) {
                Ok((l, (p50, p99, max))) => {
                    f.push(&format!("{name}: p50"), "µs", p50);
                    f.push(&format!("{name}: p99"), "µs", p99);
                    f.push(&format!("{name}: max"), "µs", max);
                    pooled[i].extend(l);
                }
                Err(e) => f.error(&format!("{name}: p50"), "µs", e),
            }
        }
    }
    for (v, mut l) in variants.into_iter().zip(pooled) {
        l.sort_by(f64::total_cmp);
        ctx.chart.fault_lat.push((v.name, l));
    }
    let _ = fs::remove_file(&report);
    f
}

/// `taskset -c 1 CMD` (CPU 0 if there is only one): the command and all it starts on one CPU.
fn pinned(cmd: Command) -> Command {
    let cpu = if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        "1"
    } else {
        "0"
    };
    let mut c = Command::new("taskset");
    c.args(["-c", cpu])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => {
                c.env(k, v);
            }
            None => {
                c.env_remove(k);
            }
        }
    }
    c
}

// ---- figure 3 ---------------------------------------------------------------------------

pub fn fig3(ctx: &mut Ctx) -> Figure {
    let mut f = Figure::new(
        3,
        "Fault latency while the background fill runs at full speed vs idle (umm restore, \
         restorer reading random missing pages, one page per fault)",
    );
    let Some(img) = image(ctx, &mut f) else {
        return f;
    };
    let idle_n: u64 = if ctx.quick { 500 } else { 20_000 };
    f.note(format!(
        "image {}; idle = --no-background, {idle_n} faults; during fill = default fill, timing \
         every fault until the fill reaches the end of the region; both --fault-around-max 4096",
        size_label(img.len)
    ));
    // The tiny quick image fills in milliseconds: slow the fill there so faults meet it.
    let busy_extra: Vec<String> = if ctx.quick {
        f.note("--quick: the fill is rate-bound (--fill-rate 64 MiB/s) to meet some faults");
        vec![s("--fill-rate"), s(64 * MIB)]
    } else {
        vec![]
    };
    const IDLE: &str = "idle (--no-background): p50";
    f.row(IDLE, || Row::new("", "µs"));
    f.row("idle (--no-background): p99", || Row::new("", "µs"));
    f.row("during fill: p50", || Row::new("", "µs").vs(IDLE));
    f.row("during fill: p99", || {
        Row::new("", "µs").vs(IDLE).target(Target::at_most(3.0))
    });
    f.row("during fill: max", || Row::new("", "µs").vs(IDLE));
    f.row("during fill: faults timed", || Row::new("", "faults"));
    for who in ["idle (--no-background)", "during fill"] {
        for m in ["p50", "p99"] {
            let name = format!("{who}: manager-side {m} (report)");
            f.row(&name, || Row::new("", "µs"));
        }
    }
    f.note(
        "manager-side = the report's fault_latency_us: from the manager reading the fault to its \
         answer; the rest of the restorer's time is the wake-ups (and queueing before the read)",
    );
    let report = ctx.work.join("fig3.report.json");
    let mut pooled = [Vec::new(), Vec::new()];
    let reps = if ctx.quick { 1 } else { ctx.reps.max(5) };
    for rep in 0.. {
        if !ctx.rep_ok(rep, reps) {
            break;
        }
        for busy in [false, true] {
            let out = ctx.work.join("restore-lat.txt");
            let argv = vec![
                s(ctx.prog("bench_image").display()),
                s("touch"),
                hex(IMAGE_ADDR),
                hex(img.len),
                s(IMAGE_SEED),
                s(img.dir.display()),
                s(if busy { 10_000_000 } else { idle_n }),
                s(out.display()),
            ];
            let mut args = vec![s("--fault-around-max"), s(4096)];
            if busy {
                args.extend(busy_extra.iter().cloned());
            } else {
                args.push(s("--no-background"));
            }
            let cmd = ctx.umm_restore(&report, &args, &argv);
            warm(&img.pages());
            let got = run_ok(&ctx.work, "restore-touch", cmd, ctx.limit).and_then(|o| {
                if busy && o.result("fill_done") != Some(1.0) {
                    return Err(format!("the fill never finished: {}", o.describe()));
                }
                Ok((latencies(&out)?, load_report(&report)?))
            });
            let label = if busy {
                "during fill"
            } else {
                "idle (--no-background)"
            };
            let got = got.and_then(|(v, r)| {
                pcts(&v)
                    .map(|p| (v, p, r))
                    .ok_or_else(|| "no faults timed".to_string())
            });
            match got {
                Ok((v, (p50, p99, max), r)) => {
                    for m in ["p50", "p99"] {
                        if let Some(x) = field(&r, &format!("fault_latency_us.{m}")) {
                            f.push(&format!("{label}: manager-side {m} (report)"), "µs", x);
                        }
                    }
                    f.push(&format!("{label}: p50"), "µs", p50);
                    f.push(&format!("{label}: p99"), "µs", p99);
                    if busy {
                        f.push("during fill: max", "µs", max);
                        f.push("during fill: faults timed", "faults", v.len() as f64);
                    }
                    pooled[busy as usize].extend(v);
                }
                Err(e) => f.error(&format!("{label}: p50"), "µs", e),
            }
        }
    }
    let [mut idle, mut busy] = pooled;
    idle.sort_by(f64::total_cmp);
    busy.sort_by(f64::total_cmp);
    ctx.chart
        .restore_lat
        .push(("umm restore, idle (--no-background)".into(), idle));
    ctx.chart
        .restore_lat
        .push(("umm restore, during background fill".into(), busy));
    let _ = fs::remove_file(&report);
    f
}

// ---- figure 4 ---------------------------------------------------------------------------

pub fn fig4(ctx: &mut Ctx) -> Figure {
    let mut f = Figure::new(
        4,
        "Lazy restore under three access patterns: time from the start of the restore to the \
         first touch served and to the last touch, vs eager restore and the kernel's file mmap",
    );
    let Some(img) = image(ctx, &mut f) else {
        return f;
    };
    f.note(format!(
        "image {}; seq = every page in address order, rand = every page in random order, hot = \
         a random 5 % of the pages read 20 times; each touch reads and checks one word",
        size_label(img.len)
    ));
    f.note(
        "eager = read(2) of pages.img into the region, then the pattern; mmap = MAP_PRIVATE of \
         pages.img at the address (hot: page cache warm; cold: posix_fadvise DONTNEED first); \
         prefetch = umm restore --prefetch of a --trace recorded in an earlier run of the same \
         pattern",
    );
    let pats = ["seq", "rand", "hot"];
    let report = ctx.work.join("fig4.report.json");
    let pattern_argv = |mode: &str, pat: &str| {
        vec![
            s(ctx.prog("bench_image").display()),
            s("pattern"),
            s(mode),
            s(pat),
            hex(IMAGE_ADDR),
            hex(img.len),
            s(IMAGE_SEED),
            s(img.dir.display()),
            s(img.data_off),
        ]
    };
    // The traces the prefetch rows replay.
    let mut traces: Vec<Option<PathBuf>> = Vec::new();
    warm(&img.pages());
    for pat in pats {
        let t = ctx.work.join(format!("trace-{pat}.jsonl"));
        let cmd = ctx.umm_restore(
            &report,
            &[s("--trace"), s(t.display())],
            &pattern_argv("lazy", pat),
        );
        match run_ok(&ctx.work, "record-trace", cmd, ctx.limit) {
            Ok(_) => traces.push(Some(t)),
            Err(e) => {
                f.error(&format!("{pat}: umm lazy + prefetch: first touch"), "ms", e);
                traces.push(None);
            }
        }
    }
    let modes = [
        "eager",
        "mmap, hot cache",
        "umm lazy",
        "umm lazy + prefetch",
        "mmap, cold cache",
    ];
    for pat in pats {
        for mode in modes {
            for metric in ["first touch", "done"] {
                let name = format!("{pat}: {mode}: {metric}");
                f.row(&name, || {
                    let r = Row::new("", "ms");
                    if mode == "eager" {
                        r
                    } else {
                        r.vs(format!("{pat}: eager: {metric}"))
                    }
                });
            }
        }
    }
    for rep in 0.. {
        if !ctx.rep_ok(rep, ctx.reps) {
            break;
        }
        for (pi, pat) in pats.iter().enumerate() {
            for mode in modes {
                let cmd = match mode {
                    "eager" => {
                        warm(&img.pages());
                        command(&pattern_argv("eager", pat))
                    }
                    "mmap, hot cache" => {
                        warm(&img.pages());
                        command(&pattern_argv("mmap", pat))
                    }
                    "mmap, cold cache" => {
                        if let Err(e) = drop_cache(&img.pages()) {
                            f.error(&format!("{pat}: {mode}: first touch"), "ms", e);
                            continue;
                        }
                        command(&pattern_argv("mmap", pat))
                    }
                    "umm lazy" => {
                        warm(&img.pages());
                        ctx.umm_restore(&report, &[], &pattern_argv("lazy", pat))
                    }
                    _ => match &traces[pi] {
                        Some(t) => {
                            warm(&img.pages());
                            ctx.umm_restore(
                                &report,
                                &[s("--prefetch"), s(t.display())],
                                &pattern_argv("lazy", pat),
                            )
                        }
                        None => continue,
                    },
                };
                let got = run_ok(&ctx.work, "pattern", cmd, ctx.limit)
                    .and_then(|o| Ok((need(&o, "first_us")?, need(&o, "done_us")?)));
                match got {
                    Ok((first, done)) => {
                        f.push(&format!("{pat}: {mode}: first touch"), "ms", first / 1000.0);
                        f.push(&format!("{pat}: {mode}: done"), "ms", done / 1000.0);
                    }
                    Err(e) => f.error(&format!("{pat}: {mode}: first touch"), "ms", e),
                }
            }
        }
    }
    // leave the cache warm for whoever comes next
    warm(&img.pages());
    for t in traces.into_iter().flatten() {
        let _ = fs::remove_file(t);
    }
    let _ = fs::remove_file(&report);
    f
}

// ---- figure 5 ---------------------------------------------------------------------------

/// A deterministic text file of `bytes` bytes of lines "<16 hex digits> <40..80 x's>".
fn write_sort_input(p: &Path, bytes: u64) -> Result<(), String> {
    use std::io::Write;
    let f = fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut w = std::io::BufWriter::with_capacity(MIB as usize, f);
    let mut x: u64 = 0x5eed;
    let mut written = 0u64;
    let pad = [b'x'; 80];
    while written < bytes {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let n = 40 + (z % 41) as usize;
        let line = format!("{z:016x} ");
        w.write_all(line.as_bytes())
            .and_then(|_| w.write_all(&pad[..n]))
            .and_then(|_| w.write_all(b"\n"))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        written += (line.len() + n + 1) as u64;
    }
    w.flush().map_err(|e| format!("{}: {e}", p.display()))
}

/// FNV-1a of a file (to compare outputs with the native run's).
fn file_digest(p: &Path) -> Result<(u64, u64), String> {
    let mut f = fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let (mut h, mut n) = (0xcbf2_9ce4_8422_2325u64, 0u64);
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if k == 0 {
            break;
        }
        n += k as u64;
        for chunk in buf[..k].chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x100_0000_01b3);
        }
    }
    Ok((h, n))
}

pub fn fig5(ctx: &mut Ctx) -> Figure {
    let mut f = Figure::new(
        5,
        "umm run overhead on real programs vs native (wall time), adaptive fault-around window \
         vs one page per fault",
    );
    let thp = fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let (py_n, sort_bytes, touch_bytes) = if ctx.quick {
        (50_000u64, 2 * MIB, 16 * MIB)
    } else {
        (1_000_000, 200 * 1000 * 1000, GIB)
    };
    f.note(format!(
        "same THP setting for all ({}); python3 = {py_n} objects of 200 bytes (~{} MiB); sort = \
         LC_ALL=C sort of a {} MB generated file; touch = a C program writing every page of {} \
         of fresh memory once; \"window 1 page\" = --fault-around-max 4096",
        thp.trim(),
        py_n * 256 / MIB,
        sort_bytes / 1_000_000,
        size_label(touch_bytes)
    ));
    let sort_in = ctx.work.join("sort.in");
    if let Err(e) = write_sort_input(&sort_in, sort_bytes) {
        f.error("sort: native", "ms", e);
    }
    let sort_out = ctx.work.join("sort.out");
    struct Prog {
        name: &'static str,
        argv: Vec<String>,
        env: Vec<(&'static str, &'static str)>,
    }
    let progs = [
        Prog {
            name: "python3 allocations",
            argv: vec![
                s("/usr/bin/python3"),
                s(ctx.prog("alloc.py").display()),
                s(py_n),
            ],
            env: vec![],
        },
        Prog {
            name: "sort",
            argv: vec![
                s("sort"),
                s("-o"),
                s(sort_out.display()),
                s(sort_in.display()),
            ],
            env: vec![("LC_ALL", "C")],
        },
        Prog {
            name: "touch sequential",
            argv: vec![
                s(ctx.prog("bench_fault").display()),
                s("touch"),
                s("seq"),
                s(touch_bytes),
            ],
            env: vec![],
        },
        Prog {
            name: "touch random",
            argv: vec![
                s(ctx.prog("bench_fault").display()),
                s("touch"),
                s("rand"),
                s(touch_bytes),
            ],
            env: vec![],
        },
    ];
    let variants: [(&str, Option<Vec<String>>); 3] = [
        ("native", None),
        ("umm run", Some(vec![])),
        (
            "umm run, window 1 page",
            Some(vec![s("--fault-around-max"), s(4096)]),
        ),
    ];
    for p in &progs {
        for (v, _) in &variants {
            let name = format!("{}: {v}", p.name);
            f.row(&name, || {
                let r = Row::new("", "ms");
                if *v == "native" {
                    r
                } else {
                    r.vs(format!("{}: native", p.name))
                }
            });
        }
    }
    let report = ctx.work.join("fig5.report.json");
    // The native output of each program, to check that umm changes nothing.
    let mut native_out: Vec<Option<String>> = vec![None; progs.len()];
    for rep in 0.. {
        if !ctx.rep_ok(rep, ctx.reps) {
            break;
        }
        for (pi, p) in progs.iter().enumerate() {
            for (v, args) in &variants {
                let name = format!("{}: {v}", p.name);
                let mut cmd = match args {
                    None => command(&p.argv),
                    Some(a) => ctx.umm_run(&report, a, &p.argv),
                };
                cmd.envs(p.env.iter().copied());
                let _ = fs::remove_file(&sort_out);
                let got = run_ok(&ctx.work, "program", cmd, ctx.limit).and_then(|o| {
                    let out = if p.name == "sort" {
                        format!("{:?}", file_digest(&sort_out)?)
                    } else if p.name.starts_with("touch") {
                        o.result_str("pages").unwrap_or_default()
                    } else {
                        o.stdout.clone()
                    };
                    match &native_out[pi] {
                        None if args.is_none() => native_out[pi] = Some(out),
                        Some(n) if *n != out => {
                            return Err(format!("output differs from the native run's: {out}"))
                        }
                        _ => {}
                    }
                    if args.is_some() {
                        let served = field(&load_report(&report)?, "pages_served").unwrap_or(0.0);
                        if served == 0.0 {
                            return Err("umm served no page".into());
                        }
                    }
                    Ok(o.wall.as_secs_f64() * 1000.0)
                });
                match got {
                    Ok(ms) => f.push(&name, "ms", ms),
                    Err(e) => f.error(&name, "ms", e),
                }
            }
        }
    }
    let _ = fs::remove_file(&sort_in);
    let _ = fs::remove_file(&sort_out);
    let _ = fs::remove_file(&report);
    f
}

// ---- figure 6 ---------------------------------------------------------------------------

pub fn fig6(ctx: &mut Ctx) -> Figure {
    let mut f = Figure::new(
        6,
        "Scale: manager memory and event cost with many children, many VMAs, a huge sparse \
         registration forked many times (umm run vs native)",
    );
    let max_map: u64 = fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530);
    let (children, vmas, sparse_gib, sparse_forks) = if ctx.quick {
        (20u64, 500u64, 4u64, 5u64)
    } else {
        (1000, 60_000u64.min(max_map.saturating_sub(5000)), 1024, 100)
    };
    f.note(format!(
        "children: {children} forked children alive at once, each writing 4 pages; VMAs: {vmas} \
         one-page mappings (vm.max_map_count = {max_map}, left as it is), each written once; \
         sparse: {} MAP_NORESERVE with one page per GiB written, forked {sparse_forks} times \
         (children alive at once, each writing 16 random pages); RSS fractions = manager peak \
         RSS / the report's peak_registered_bytes",
        size_label(sparse_gib * GIB)
    ));
    let report = ctx.work.join("fig6.report.json");
    let scale = ctx.prog("bench_scale");
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("{children} children"),
            vec![s(scale.display()), s("forks"), s(children)],
        ),
        (
            format!("{vmas} VMAs"),
            vec![s(scale.display()), s("vmas"), s(vmas)],
        ),
        (
            format!(
                "{} sparse x {sparse_forks} forks",
                size_label(sparse_gib * GIB)
            ),
            vec![
                s(scale.display()),
                s("sparse"),
                s(sparse_gib),
                s(sparse_forks),
            ],
        ),
    ];
    for (ci, (case, _)) in cases.iter().enumerate() {
        let metrics: &[(&str, &str)] = if ci == 1 {
            &[("mmap per VMA", "µs"), ("first touch per VMA", "µs")]
        } else {
            &[("fork per child", "µs"), ("total", "ms")]
        };
        for (m, unit) in metrics {
            f.row(&format!("{case}: {m}: native"), || Row::new("", unit));
            f.row(&format!("{case}: {m}: umm run"), || {
                Row::new("", unit).vs(format!("{case}: {m}: native"))
            });
        }
        f.row(&format!("{case}: manager peak RSS"), || Row::new("", "MiB"));
        f.row(&format!("{case}: RSS / registered"), || {
            Row::new("", "fraction")
        });
    }
    for rep in 0.. {
        if !ctx.rep_ok(rep, ctx.reps) {
            break;
        }
        for (ci, (case, argv)) in cases.iter().enumerate() {
            for umm in [false, true] {
                let cmd = if umm {
                    ctx.umm_run(&report, &[], argv)
                } else {
                    command(argv)
                };
                let who = if umm { "umm run" } else { "native" };
                let got = run_ok(&ctx.work, "scale", cmd, ctx.limit).and_then(|o| {
                    let rep = if umm {
                        Some(load_report(&report)?)
                    } else {
                        None
                    };
                    if let Some(r) = &rep {
                        let procs = field(r, "processes").unwrap_or(0.0);
                        let want = match ci {
                            0 => children + 1,
                            2 => sparse_forks + 1,
                            _ => 1,
                        };
                        if procs < want as f64 {
                            return Err(format!(
                                "the manager followed {procs} processes, want {want}"
                            ));
                        }
                        if ci == 1 && o.result_str("registered").as_deref() != Some("1/1") {
                            return Err(format!("the VMAs were not registered: {}", o.describe()));
                        }
                    }
                    Ok((o, rep))
                });
                let (o, rep) = match got {
                    Ok(x) => x,
                    Err(e) => {
                        let m = if ci == 1 {
                            "mmap per VMA"
                        } else {
                            "fork per child"
                        };
                        f.error(&format!("{case}: {m}: {who}"), "µs", e);
                        continue;
                    }
                };
                let r = |k| o.result(k).unwrap_or(f64::NAN);
                if ci == 1 {
                    f.push(
                        &format!("{case}: mmap per VMA: {who}"),
                        "µs",
                        r("mmap_us") / vmas as f64,
                    );
                    f.push(
                        &format!("{case}: first touch per VMA: {who}"),
                        "µs",
                        r("touch_us") / vmas as f64,
                    );
                } else {
                    let n = if ci == 0 { children } else { sparse_forks };
                    f.push(
                        &format!("{case}: fork per child: {who}"),
                        "µs",
                        r("fork_us") / n as f64,
                    );
                    f.push(
                        &format!("{case}: total: {who}"),
                        "ms",
                        r("total_us") / 1000.0,
                    );
                }
                if let Some(rep) = rep {
                    let rss = field(&rep, "manager_peak_rss_bytes").unwrap_or(0.0);
                    let reg = field(&rep, "peak_registered_bytes").unwrap_or(0.0);
                    f.push(
                        &format!("{case}: manager peak RSS"),
                        "MiB",
                        rss / MIB as f64,
                    );
                    if reg > 0.0 {
                        f.push(&format!("{case}: RSS / registered"), "fraction", rss / reg);
                    }
                }
            }
        }
    }
    if !ctx.restore_rss.is_empty() {
        let name = "restore (figure 1, default): manager peak RSS / image size";
        for &(rss, len) in &ctx.restore_rss {
            f.push(name, "fraction", rss / len);
        }
    }
    let _ = fs::remove_file(&report);
    f
}

// ---- the chart --------------------------------------------------------------------------

pub fn chart(ctx: &Ctx, mach: &Value) -> String {
    let hist_series = |data: &[(String, Vec<f64>)]| -> Vec<Series> {
        data.iter()
            .enumerate()
            .filter(|(_, (_, v))| !v.is_empty())
            .map(|(i, (label, v))| {
                let p50 = quantile(v, 0.5).unwrap_or(0.0);
                let p99 = quantile(v, 0.99).unwrap_or(0.0);
                Series {
                    label: label.clone(),
                    color: svg::COLORS[i % svg::COLORS.len()].into(),
                    points: svg::histogram_points(v),
                    markers: vec![(
                        p50,
                        format!("p50 {p50:.1} µs, p99 {p99:.1} µs, n {}", v.len()),
                    )],
                }
            })
            .collect()
    };
    // The kernel, the minimal handler, umm run and the best spin setting.
    let fault: Vec<(String, Vec<f64>)> = {
        let mut v: Vec<(String, Vec<f64>)> = ctx
            .chart
            .fault_lat
            .iter()
            .filter(|(n, _)| !n.contains("--spin-us"))
            .cloned()
            .collect();
        if let Some(best) = ctx
            .chart
            .fault_lat
            .iter()
            .filter(|(n, v)| n.contains("--spin-us") && !v.is_empty())
            .min_by(|a, b| {
                let m = |x: &Vec<f64>| quantile(x, 0.5).unwrap_or(f64::MAX);
                m(&a.1).total_cmp(&m(&b.1))
            })
        {
            v.push(best.clone());
        }
        v
    };
    let panels = vec![
        Panel {
            title: "Figure 2: fault service latency, one page per fault (dashed: p50)".into(),
            x_label: "latency of one first touch, µs (log scale)".into(),
            y_label: "% of faults per bin (4 bins per octave)".into(),
            log_x: true,
            series: hist_series(&fault),
        },
        Panel {
            title: "Figure 1: fill progress of a restore (background fill, nothing touched)".into(),
            x_label: "ms since the handoff returned (umm) / since the first copy (ceiling)".into(),
            y_label: "% of the image's pages present".into(),
            log_x: false,
            series: ctx
                .chart
                .fill
                .iter()
                .enumerate()
                .map(|(i, (label, pts))| Series {
                    label: label.clone(),
                    color: svg::COLORS[i % svg::COLORS.len()].into(),
                    points: pts.clone(),
                    markers: pts
                        .last()
                        .map(|p| (p.0, format!("100 % at {:.0} ms", p.0)))
                        .into_iter()
                        .collect(),
                })
                .collect(),
        },
        Panel {
            title: "Figure 3: umm restore fault latency, idle vs during the background fill".into(),
            x_label: "latency of one first touch, µs (log scale)".into(),
            y_label: "% of faults per bin".into(),
            log_x: true,
            series: hist_series(&ctx.chart.restore_lat),
        },
    ];
    let caption = format!(
        "umm-bench{}: kernel {}, {} CPUs, {} MiB, THP {}",
        if ctx.quick {
            " --quick (tiny sizes)"
        } else {
            ""
        },
        mach["kernel"].as_str().unwrap_or(""),
        mach["nproc"],
        mach["memory_bytes"].as_u64().unwrap_or(0) / MIB,
        mach["thp"].as_str().unwrap_or("")
    );
    svg::chart(&caption, &panels)
}
