//! umm-bench: umm against the hardware ceiling and the kernel, side by side (issue 5).
//!
//! Every figure is measured in one run against baselines measured in the same run: a minimal
//! in-process userfaultfd handler (the ceiling), the kernel's own first touch and file mmap, an
//! eager read of the image, native runs of real programs. The measured programs are the C
//! programs in `benches/targets/`, compiled at run time with `cc -O2 -pthread`; everything is
//! bounded in time and memory and killed by its process group (the pid we started) if it
//! overruns. Output: a table per figure on stdout, `OUT/results.json`, `OUT/chart.svg`.
//!
//! usage: umm-bench [--quick] [--out DIR] [--only 1,2,...] [--reps N]
//!   --quick   tiny sizes, one repetition (seconds): the smoke run of `make test`; it checks that
//!             every figure produced numbers, never how fast anything was.
//! Environment: UMM_BIN, UMM_AGENT (default: umm and libumm_agent.so next to this binary),
//! UMM_BENCH_TARGETS (default: the crate's targets/), TMPDIR (work directory, images included).

mod criu_fig;
mod figures;
mod model;
mod net_fig;
mod procs;
mod svg;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use model::Figure;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

/// The fixed address of the image region (the same in the builder and every restorer).
pub const IMAGE_ADDR: u64 = 0x2000_0000_0000;
pub const IMAGE_SEED: u64 = 42;

/// An image written by `umm snapshot` of `bench_image build`.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub dir: PathBuf,
    pub len: u64,
    /// Where the region's data starts in pages.img.
    pub data_off: u64,
}

impl ImageInfo {
    pub fn pages(&self) -> PathBuf {
        self.dir.join("pages.img")
    }
}

/// What the chart shows, collected while the figures run.
#[derive(Default)]
pub struct ChartData {
    /// Figure 2: latencies (µs) per variant.
    pub fault_lat: Vec<(String, Vec<f64>)>,
    /// Figure 1: (ms, fraction filled) per filler.
    pub fill: Vec<(String, Vec<(f64, f64)>)>,
    /// Figure 3: latencies (µs), idle and during the fill.
    pub restore_lat: Vec<(String, Vec<f64>)>,
}

pub struct Ctx {
    pub quick: bool,
    pub reps: usize,
    pub work: PathBuf,
    pub bin: PathBuf,
    pub umm: PathBuf,
    pub agent: PathBuf,
    pub start: Instant,
    /// Past this, figures stop adding repetitions beyond the first.
    pub deadline: Instant,
    pub limit: Duration,
    pub image: Option<ImageInfo>,
    pub image_len: u64,
    pub chart: ChartData,
    /// Figure 1's restores: (manager peak RSS, bytes restored), for figure 6.
    pub restore_rss: Vec<(f64, f64)>,
}

impl Ctx {
    pub fn prog(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// May a figure run repetition `rep` (0-based) of `want`?
    pub fn rep_ok(&self, rep: usize, want: usize) -> bool {
        rep < want && (rep == 0 || Instant::now() < self.deadline)
    }

    /// `umm run --quiet --report REPORT ARGS -- CMD`.
    pub fn umm_run(&self, report: &Path, args: &[String], cmd: &[String]) -> Command {
        let mut c = Command::new(&self.umm);
        c.arg("run")
            .arg("--quiet")
            .arg("--report")
            .arg(report)
            .arg("--agent")
            .arg(&self.agent)
            .args(args)
            .arg("--")
            .args(cmd)
            .env_remove("LD_PRELOAD")
            .env_remove("UMM_SOCKET");
        c
    }

    /// `umm restore --quiet --image IMG --report REPORT ARGS -- CMD`, the restorer finding the
    /// agent in UMM_AGENT.
    pub fn umm_restore(&self, report: &Path, args: &[String], cmd: &[String]) -> Command {
        let img = &self.image.as_ref().expect("image built").dir;
        let mut c = Command::new(&self.umm);
        c.arg("restore")
            .arg("--quiet")
            .arg("--image")
            .arg(img)
            .arg("--report")
            .arg(report)
            .args(args)
            .arg("--")
            .args(cmd)
            .env("UMM_AGENT", &self.agent)
            .env_remove("LD_PRELOAD")
            .env_remove("UMM_SOCKET");
        c
    }
}

fn usage() -> ! {
    eprintln!("usage: umm-bench [--quick] [--out DIR] [--only 1,2,...] [--reps N]");
    std::process::exit(2);
}

struct Args {
    quick: bool,
    out: PathBuf,
    only: Vec<u32>,
    reps: Option<usize>,
}

fn parse_args() -> Args {
    let mut a = Args {
        quick: false,
        out: PathBuf::from("target/bench"),
        only: (1..=8).collect(),
        reps: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--only" => {
                let v = it.next().unwrap_or_else(|| usage());
                a.only = v
                    .split(',')
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage()))
                    .collect();
            }
            "--reps" => {
                a.reps = Some(
                    it.next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&n| n > 0)
                        .unwrap_or_else(|| usage()),
                )
            }
            "-h" | "--help" => {
                println!(
                    "usage: umm-bench [--quick] [--out DIR] [--only 1,2,...] [--reps N]\n\
                     Benchmarks umm against the ceiling and the kernel; see benches/README.md."
                );
                std::process::exit(0);
            }
            _ => usage(),
        }
    }
    a
}

fn next_to_exe(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join(name);
    p.is_file().then_some(p)
}

fn find_binary(env: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p.canonicalize().unwrap_or(p))
        } else {
            Err(format!("{env}={} does not exist", p.display()))
        };
    }
    next_to_exe(name).ok_or_else(|| {
        format!("no {name} next to this binary (build with `cargo build --release --workspace`, or set {env})")
    })
}

/// Remove work directories of earlier runs that were killed (their pid is gone).
fn remove_stale_workdirs(base: &Path) {
    let Ok(rd) = std::fs::read_dir(base) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name
            .strip_prefix("umm-bench-")
            .and_then(|s| s.parse::<i32>().ok())
        {
            if !procs::pid_alive(pid) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Compile the C programs of benches/targets into `bin`.
fn compile_targets(bin: &Path) -> Result<(), String> {
    let src = std::env::var_os("UMM_BENCH_TARGETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("targets"));
    std::fs::create_dir_all(bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    for name in ["bench_image", "bench_ceiling", "bench_fault", "bench_scale"] {
        let out = Command::new("cc")
            .args(["-O2", "-pthread", "-Wall", "-o"])
            .arg(bin.join(name))
            .arg(src.join(format!("{name}.c")))
            .arg("-ldl")
            .output()
            .map_err(|e| format!("cannot run cc: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cc {name}.c failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    for script in ["alloc.py", "tcp_blast.py"] {
        std::fs::copy(src.join(script), bin.join(script))
            .map_err(|e| format!("copy {script}: {e}"))?;
    }
    Ok(())
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `MemAvailable` (or another field) of /proc/meminfo, bytes.
pub fn meminfo(field: &str) -> u64 {
    read_trim("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn machine() -> serde_json::Value {
    let thp = read_trim("/sys/kernel/mm/transparent_hugepage/enabled");
    let thp = thp
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        .unwrap_or(thp);
    let cpu = read_trim("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // The tree is shared with others at work: say when the measured sources differ from HEAD.
    let dirty = Command::new("git")
        .args([
            "status",
            "--porcelain",
            "--",
            ":/src",
            ":/manager",
            ":/agent",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .is_some_and(|o| o.status.success() && !o.stdout.is_empty());
    let commit = if dirty && !commit.is_empty() {
        format!("{commit}+dirty")
    } else {
        commit
    };
    serde_json::json!({
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_bytes": meminfo("MemTotal"),
        "thp": thp,
        "cpu": cpu,
        "vm.max_map_count": read_trim("/proc/sys/vm/max_map_count"),
        "umm_commit": commit,
    })
}

/// Bytes available on the file system of `p`.
fn disk_free(p: &Path) -> u64 {
    nix::sys::statvfs::statvfs(p)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0)
}

fn main() {
    procs::install_signal_cleanup();
    let args = parse_args();
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umm-bench: {e}");
            1
        }
    };
    procs::remove_workdir();
    std::process::exit(code);
}

fn run(args: &Args) -> Result<i32, String> {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/userfaultfd").exists() {
        return Err(
            "needs root and /dev/userfaultfd (the manager needs CAP_SYS_PTRACE; the \
                    ceiling's handler opens a userfaultfd)"
                .into(),
        );
    }
    let umm = find_binary("UMM_BIN", "umm")?;
    let agent = find_binary("UMM_AGENT", "libumm_agent.so")?;
    let base = std::env::temp_dir();
    remove_stale_workdirs(&base);
    let work = base.join(format!("umm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    procs::set_workdir(&work);
    let bin = work.join("bin");
    compile_targets(&bin)?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;

    // Sizes: a 1 GiB image where memory and disk allow (the restorer, the page cache and an
    // eager copy hold it at once), else the largest power of two that fits.
    let free_disk = disk_free(&work);
    let avail = meminfo("MemAvailable");
    let mut image_len = if args.quick { 16 * MIB } else { GIB };
    while image_len > 16 * MIB && (image_len * 3 > free_disk || image_len * 5 > avail) {
        image_len /= 2;
    }
    // Taken before anything runs: the binaries were built from the tree as it is now.
    let mach = machine();
    let start = Instant::now();
    let budget = if args.quick {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(12 * 60)
    };
    let mut ctx = Ctx {
        quick: args.quick,
        reps: args.reps.unwrap_or(if args.quick { 1 } else { 3 }),
        work: work.clone(),
        bin,
        umm,
        agent,
        start,
        deadline: start + budget,
        limit: Duration::from_secs(if args.quick { 60 } else { 180 }),
        image: None,
        image_len,
        chart: ChartData::default(),
        restore_rss: Vec::new(),
    };
    eprintln!(
        "umm-bench: work dir {}, image {} MiB, {} free on disk, {} MiB available memory",
        work.display(),
        image_len / MIB,
        free_disk / MIB,
        avail / MIB
    );
    if args.only.iter().any(|f| [1, 3, 4].contains(f)) {
        match figures::build_image(&mut ctx) {
            Ok(()) => {}
            Err(e) => eprintln!("umm-bench: cannot build the image: {e}"),
        }
    }
    let mut figs: Vec<Figure> = Vec::new();
    for &id in &args.only {
        let t = Instant::now();
        eprintln!(
            "umm-bench: figure {id} ({:.0} s elapsed)",
            start.elapsed().as_secs_f64()
        );
        let mut f = match id {
            1 => figures::fig1(&mut ctx),
            2 => figures::fig2(&mut ctx),
            3 => figures::fig3(&mut ctx),
            4 => figures::fig4(&mut ctx),
            5 => figures::fig5(&mut ctx),
            6 => figures::fig6(&mut ctx),
            7 => criu_fig::fig7(&mut ctx),
            8 => net_fig::fig8(&mut ctx),
            _ => continue,
        };
        f.seconds = t.elapsed().as_secs_f64();
        f.finish();
        println!("{}", f.table());
        figs.push(f);
    }
    if let Some(img) = ctx.image.take() {
        let _ = std::fs::remove_dir_all(&img.dir);
    }

    let total = start.elapsed().as_secs_f64();
    let mut summary = String::new();
    for f in &figs {
        for r in &f.rows {
            if let (Some(t), Some(pass)) = (&r.target, r.pass()) {
                summary += &format!(
                    "  figure {}: {}: {:.2}x {} (target {}) — {}\n",
                    f.id,
                    r.name,
                    r.ratio.unwrap_or(f64::NAN),
                    r.baseline.as_deref().unwrap_or(""),
                    t.text(),
                    if pass { "PASS" } else { "MISS" }
                );
            }
        }
    }
    println!(
        "Targets:\n{summary}Machine: kernel {}, {} CPUs, {} MiB, THP {}; umm {}; {:.0} s in all{}",
        mach["kernel"].as_str().unwrap_or(""),
        mach["nproc"],
        mach["memory_bytes"].as_u64().unwrap_or(0) / MIB,
        mach["thp"].as_str().unwrap_or(""),
        mach["umm_commit"].as_str().unwrap_or("?"),
        total,
        if args.quick {
            " (--quick: tiny sizes, numbers not meaningful)"
        } else {
            ""
        }
    );
    let json = serde_json::json!({
        "quick": args.quick,
        "seconds": (total * 10.0).round() / 10.0,
        "machine": mach,
        "figures": figs.iter().map(Figure::json).collect::<Vec<_>>(),
    });
    let results = args.out.join("results.json");
    std::fs::write(
        &results,
        serde_json::to_string_pretty(&json).unwrap_or_default() + "\n",
    )
    .map_err(|e| format!("{}: {e}", results.display()))?;
    let chart = args.out.join("chart.svg");
    std::fs::write(&chart, figures::chart(&ctx, &mach))
        .map_err(|e| format!("{}: {e}", chart.display()))?;
    let text: String = figs.iter().map(|f| f.table() + "\n").collect();
    let _ = std::fs::write(args.out.join("results.txt"), text);
    println!("Wrote {}, {}", results.display(), chart.display());

    let empty: Vec<String> = figs.iter().flat_map(Figure::empty_rows).collect();
    if !empty.is_empty() {
        eprintln!("umm-bench: rows without numbers:");
        for e in &empty {
            eprintln!("  {e}");
        }
        return Ok(1);
    }
    Ok(0)
}
