//! Figure 8: post-copy over the network (issue 9). `umm restore --source tcp://` of a 256 MiB
//! image from `umm page-server` across a veth pair between two network namespaces, at RTT 0
//! (no relay), 1 ms and 10 ms (tests/targets/delay_relay.py: this kernel has no netem), and on
//! links where the link is the bottleneck (the veth rate-limited by `tc tbf`: 1 Gbit/s and
//! 200 Mbit/s at RTT 0, 1 Gbit/s at 10 ms), against raw TCP on the same path in the same run
//! (benches/targets/tcp_blast.py). An unlimited veth on 2 vCPUs measures CPU, not a link.
//!
//! Per link and repetition: raw TCP throughput; a `fill` restore (nothing touched: background
//! throughput, and the restore's wall time, every page verified by the restorer); a `touch`
//! restore (random missing pages read while the background runs: fault latency p50/p99, and
//! the background throughput under those faults). SKIPPED (a note, no rows) when the
//! namespaces cannot be set up.

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::figures::{self, field, hex, latencies, load_report, pcts, s};
use crate::model::{Figure, Row, Target};
use crate::procs::{run, run_ok, Background, Output};
use crate::{Ctx, ImageInfo, IMAGE_ADDR, IMAGE_SEED, MIB};

/// A subnet of its own (tests/net.rs uses 10.199.0.0/24).
const SERVER_IP: &str = "10.198.0.1";
const CLIENT_IP: &str = "10.198.0.2";
const PAGE_PORT: u16 = 7511;
const BLAST_PORT: u16 = 7521;
/// One path: its RTT (by the relay) and its rate limit (tbf on both ends of the veth).
#[derive(Clone, Copy)]
struct Link {
    rtt_ms: f64,
    /// `tc tbf` rate and burst, or None: the bare veth.
    rate: Option<(&'static str, &'static str)>,
    label: &'static str,
}

const LINKS: [Link; 6] = [
    Link {
        rtt_ms: 0.0,
        rate: None,
        label: "RTT 0 ms",
    },
    Link {
        rtt_ms: 1.0,
        rate: None,
        label: "RTT 1 ms",
    },
    Link {
        rtt_ms: 10.0,
        rate: None,
        label: "RTT 10 ms",
    },
    Link {
        rtt_ms: 0.0,
        rate: Some(("1gbit", "1mb")),
        label: "1 Gbit/s link, RTT 0",
    },
    Link {
        rtt_ms: 0.0,
        rate: Some(("200mbit", "256kb")),
        label: "200 Mbit/s link, RTT 0",
    },
    Link {
        rtt_ms: 10.0,
        rate: Some(("1gbit", "1mb")),
        label: "1 Gbit/s link, RTT 10 ms",
    },
];
const KEY: &str = "umm-bench figure 8 pre-shared key";

#[path = "../../tests/common/netns.rs"]
mod netns;
use netns::Veth;

/// Two network namespaces joined by a veth pair; deleted on drop.
struct NetPair {
    veth: Veth,
}

impl NetPair {
    fn new() -> Result<NetPair, String> {
        let tag = format!("b{}", std::process::id());
        let cidrs = (format!("{SERVER_IP}/24"), format!("{CLIENT_IP}/24"));
        Ok(NetPair {
            veth: Veth::new(&tag, (&cidrs.0, &cidrs.1))?,
        })
    }

    /// Limit both ends of the veth to `rate` (tbf), or lift the limit (None).
    fn set_rate(&self, rate: Option<(&str, &str)>) -> Result<(), String> {
        for (ns, dev) in self.veth.ends() {
            let mut argv = vec!["-n", ns, "qdisc"];
            match rate {
                Some((rate, burst)) => argv.extend([
                    "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "latency",
                    "100ms",
                ]),
                None => argv.extend(["del", "dev", dev, "root"]),
            }
            let out = Command::new("tc")
                .args(&argv)
                .output()
                .map_err(|e| format!("cannot run `tc` (iproute2): {e}"))?;
            // Deleting the default qdisc fails harmlessly.
            if !out.status.success() && rate.is_some() {
                return Err(format!(
                    "tc {}: {}",
                    argv.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    fn cmd<S: AsRef<std::ffi::OsStr>>(ns: &str, argv: &[S]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}")).arg("--").args(argv);
        c
    }
}

/// A server in the server namespace, behind the delay relay when the RTT is not 0: the
/// address it listens on, and the relay's argv (None: no relay).
fn listen_at(port: u16, rtt_ms: f64, relay: &Path) -> (String, u16, Option<Vec<String>>) {
    if rtt_ms == 0.0 {
        return (SERVER_IP.into(), port, None);
    }
    let argv = vec![
        s("/usr/bin/python3"),
        s(relay.display()),
        s(SERVER_IP),
        s(port),
        s("127.0.0.1"),
        s(port + 1),
        s(rtt_ms / 2.0),
    ];
    ("127.0.0.1".into(), port + 1, Some(argv))
}

/// Everything of one RTT running in the server namespace, stopped on drop.
struct Servers {
    _procs: Vec<Background>,
}

fn start_servers(
    ctx: &Ctx,
    net: &NetPair,
    img: &ImageInfo,
    key: &Path,
    rtt_ms: f64,
) -> Result<Servers, String> {
    let relay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/targets/delay_relay.py");
    let mut procs = Vec::new();
    let (host, port, relay_argv) = listen_at(PAGE_PORT, rtt_ms, &relay);
    // Its banner goes to stderr: through sh into the captured stdout.
    let script = format!(
        "exec {} page-server --image {} --listen {host}:{port} --key {} --keep-serving 2>&1",
        ctx.umm.display(),
        img.dir.display(),
        key.display()
    );
    let mut ps = Background::spawn(
        &ctx.work,
        "page-server",
        NetPair::cmd(&net.veth.server_ns, &["sh", "-c", &script]),
    )?;
    ps.wait_line("umm: page-server: serving", ctx.limit)?;
    procs.push(ps);
    let (bhost, bport, brelay) = listen_at(BLAST_PORT, rtt_ms, &relay);
    let blast = ctx.prog("tcp_blast.py");
    let mut b = Background::spawn(
        &ctx.work,
        "tcp-blast",
        NetPair::cmd(
            &net.veth.server_ns,
            &[
                s("/usr/bin/python3"),
                s(blast.display()),
                s("serve"),
                bhost,
                s(bport),
                s(img.len),
            ],
        ),
    )?;
    b.wait_line("BLAST READY", ctx.limit)?;
    procs.push(b);
    for (i, argv) in [relay_argv, brelay].into_iter().flatten().enumerate() {
        let mut r = Background::spawn(
            &ctx.work,
            &format!("relay{i}"),
            NetPair::cmd(&net.veth.server_ns, &argv),
        )?;
        r.wait_line("RELAY READY", ctx.limit)?;
        procs.push(r);
    }
    Ok(Servers { _procs: procs })
}

/// `umm restore --source tcp://… -- bench_image MODE …` in the client namespace.
/// `umm_args` go before `--`; "IMG" in `tail` becomes the source URL.
fn restore_cmd(
    ctx: &Ctx,
    net: &NetPair,
    key: &Path,
    report: &Path,
    umm_args: &[&str],
    tail: &[String],
) -> Command {
    let url = format!("tcp://{SERVER_IP}:{PAGE_PORT}");
    let mut argv: Vec<OsString> = vec![
        ctx.umm.clone().into(),
        "restore".into(),
        "--quiet".into(),
        "--source".into(),
        url.clone().into(),
        "--key".into(),
        key.into(),
        "--report".into(),
        report.into(),
    ];
    argv.extend(umm_args.iter().map(OsString::from));
    argv.extend(["--".into(), ctx.prog("bench_image").into()]);
    argv.extend(
        tail.iter()
            .map(|a| OsString::from(if a == "IMG" { &url } else { a })),
    );
    let mut c = NetPair::cmd(&net.veth.client_ns, &argv);
    c.env("UMM_AGENT", &ctx.agent)
        .env_remove("LD_PRELOAD")
        .env_remove("UMM_SOCKET");
    c
}

fn gbps(bytes: u64, us: f64) -> f64 {
    bytes as f64 / us / 1000.0
}

fn name(link: &Link, what: &str) -> String {
    format!("{}: {what}", link.label)
}

const RAW: &str = "raw TCP (tcp_blast.py)";
const IDLE: &str = "background, nothing touched";
const BUSY: &str = "background while the restorer faults";

pub fn fig8(ctx: &mut Ctx) -> Figure {
    let mut f = Figure::new(
        8,
        "Post-copy over the network: umm restore --source tcp:// from umm page-server over a \
         veth pair between two network namespaces (RTT by delay_relay.py), vs raw TCP on the \
         same path in the same run",
    );
    let net = match NetPair::new() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("umm-bench: figure 8 SKIPPED: cannot set up two network namespaces: {e}");
            f.note(format!(
                "SKIPPED: cannot set up two network namespaces: {e}"
            ));
            return f;
        }
    };
    let len = if ctx.quick { 16 * MIB } else { 256 * MIB };
    let img = match figures::build_image_at(ctx, &ctx.work.join("net-image"), len) {
        Ok(i) => i,
        Err(e) => {
            f.error("image", "-", e);
            return f;
        }
    };
    let key = ctx.work.join("fig8.key");
    if let Err(e) = fs::write(&key, KEY) {
        f.error("key", "-", format!("{}: {e}", key.display()));
        return f;
    }
    f.note(format!(
        "image {}; RTT 0 = the bare veth; 1 and 10 ms through delay_relay.py (a Python asyncio \
         relay: it also caps the throughput, for raw TCP and umm alike); the \"N link\" rows \
         rate-limit the veth with tc tbf (both ends): there the link, not the CPU, is the \
         bottleneck, as on a real network; fault latencies timed \
         in the restorer (bench_image touch, one page per fault: --fault-around-max 4096), \
         random missing pages until the background reaches the end",
        figures::size_label(len)
    ));
    for link in &LINKS {
        let rtt = link;
        f.row(&name(rtt, RAW), || Row::new("", "GB/s"));
        f.row(&name(rtt, IDLE), || {
            Row::new("", "GB/s")
                .vs(name(rtt, RAW))
                .target(Target::at_least(0.9))
        });
        f.row(&name(rtt, BUSY), || {
            Row::new("", "GB/s")
                .vs(name(rtt, IDLE))
                .target(Target::at_least(0.7))
        });
        f.row(&name(rtt, "restore wall time, every page verified"), || {
            Row::new("", "ms")
        });
        f.row(&name(rtt, "fault p50 during the background"), || {
            Row::new("", "µs")
        });
        f.row(&name(rtt, "fault p99 during the background"), || {
            Row::new("", "µs")
        });
        f.row(&name(rtt, "bytes fetched / image (report)"), || {
            Row::new("", "x")
        });
    }
    // About 3 minutes in all: repetitions stop adding after this.
    let budget = Instant::now() + Duration::from_secs(if ctx.quick { 30 } else { 150 });
    let reps = if ctx.quick { 1 } else { ctx.reps };
    for rep in 0..reps {
        if rep > 0 && (Instant::now() > budget || !ctx.rep_ok(rep, reps)) {
            break;
        }
        for link in &LINKS {
            let done = net
                .set_rate(link.rate)
                .and_then(|()| one_rtt(ctx, &mut f, &net, &img, &key, link));
            if let Err(e) = done {
                f.error(&name(link, IDLE), "GB/s", e);
            }
        }
        let _ = net.set_rate(None);
    }
    let _ = fs::remove_dir_all(&img.dir);
    f
}

/// One repetition at one RTT: raw TCP, a fill restore, a touch restore.
fn one_rtt(
    ctx: &Ctx,
    f: &mut Figure,
    net: &NetPair,
    img: &ImageInfo,
    key: &Path,
    rtt: &Link,
) -> Result<(), String> {
    let _servers = start_servers(ctx, net, img, key, rtt.rtt_ms)?;
    figures::warm(&img.pages());
    let blast = run_ok(
        &ctx.work,
        "tcp-blast-get",
        NetPair::cmd(
            &net.veth.client_ns,
            &[
                s("/usr/bin/python3"),
                s(ctx.prog("tcp_blast.py").display()),
                s("get"),
                s(SERVER_IP),
                s(BLAST_PORT),
                s(img.len),
            ],
        ),
        ctx.limit,
    )?;
    let raw_us = blast
        .result("us")
        .ok_or_else(|| format!("no us= from tcp_blast: {}", blast.describe()))?;
    f.push(&name(rtt, RAW), "GB/s", gbps(img.len, raw_us));

    let report = ctx.work.join("fig8.report.json");
    let fill = vec![
        s("fill"),
        hex(IMAGE_ADDR),
        hex(img.len),
        s(IMAGE_SEED),
        s("IMG"),
    ];
    let out = run_ok(
        &ctx.work,
        "net-fill",
        restore_cmd(ctx, net, key, &report, &[], &fill),
        ctx.limit,
    )?;
    let r = load_report(&report)?;
    let complete = complete_ms(&out, &r)?;
    f.push(&name(rtt, IDLE), "GB/s", gbps(img.len, complete * 1000.0));
    f.push(
        &name(rtt, "restore wall time, every page verified"),
        "ms",
        out.wall.as_secs_f64() * 1000.0,
    );
    if let Some(b) = field(&r, "restore.network.bytes_fetched") {
        f.push(
            &name(rtt, "bytes fetched / image (report)"),
            "x",
            b / img.len as f64,
        );
    }

    let lat = ctx.work.join("fig8-lat.txt");
    let touch = vec![
        s("touch"),
        hex(IMAGE_ADDR),
        hex(img.len),
        s(IMAGE_SEED),
        s("IMG"),
        s(10_000_000),
        s(lat.display()),
    ];
    // One page per fault: the latency of a fault, not of a window.
    let one_page = ["--fault-around-max", "4096"];
    let cmd = restore_cmd(ctx, net, key, &report, &one_page, &touch);
    let out = run(&ctx.work, "net-touch", cmd, ctx.limit)?;
    if !out.ok() || out.result("fill_done") != Some(1.0) {
        return Err(format!("touch restore: {}", out.describe()));
    }
    let r = load_report(&report)?;
    let busy = complete_ms(&out, &r)?;
    f.push(&name(rtt, BUSY), "GB/s", gbps(img.len, busy * 1000.0));
    let v = latencies(&lat)?;
    let (p50, p99, _) = pcts(&v).ok_or("no faults timed")?;
    f.push(&name(rtt, "fault p50 during the background"), "µs", p50);
    f.push(&name(rtt, "fault p99 during the background"), "µs", p99);
    let _ = fs::remove_file(&report);
    Ok(())
}

/// Handoff → restore complete (the report's `restore.complete_ms`).
fn complete_ms(out: &Output, r: &serde_json::Value) -> Result<f64, String> {
    field(r, "restore.complete_ms")
        .filter(|&ms| ms > 0.0)
        .ok_or_else(|| format!("no restore.complete_ms in the report: {}", out.describe()))
}
