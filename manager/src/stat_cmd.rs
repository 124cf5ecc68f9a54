//! `umm stat`: ask a running manager's control socket for its live status and show it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::stats::human_bytes;

#[derive(Args, Debug)]
pub struct StatArgs {
    /// The daemon's agent socket; its control socket is this path with `.ctl` appended.
    #[arg(long, value_name = "PATH", default_value = "/run/umm/umm.sock")]
    socket: PathBuf,
    /// The control socket itself (`--control` of umm daemon, run or restore).
    #[arg(long, value_name = "PATH", conflicts_with = "socket")]
    control: Option<PathBuf>,
    /// Print the raw JSON answer instead of a table.
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds (default 1) until interrupted, with rates between samples.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
}

const TIMEOUT: Duration = Duration::from_secs(5);

/// One request, the whole answer (the manager closes the connection after it).
pub fn ask(path: &std::path::Path, request: &str) -> Result<String, String> {
    let ctx = |e: std::io::Error| format!("control socket {}: {e}", path.display());
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot connect to the control socket {}: {e}; is a manager running with it \
             (umm daemon, or --control)? Pass --socket or --control",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(ctx)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(ctx)?;
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(ctx)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(ctx)?;
    if let Some(err) = out.strip_prefix("error: ") {
        return Err(format!("{}: {}", path.display(), err.trim_end()));
    }
    if out.is_empty() {
        return Err(format!(
            "{}: the manager closed the connection",
            path.display()
        ));
    }
    Ok(out)
}

pub fn main(args: StatArgs) -> i32 {
    match stat(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("umm: {e}");
            1
        }
    }
}

fn stat(args: StatArgs) -> Result<(), String> {
    let path = args
        .control
        .clone()
        .unwrap_or_else(|| crate::daemon::default_control_path(&args.socket));
    let Some(every) = args.watch else {
        let text = ask(&path, "stat")?;
        if args.json {
            print!("{text}");
        } else {
            print!("{}", table(&parse(&text)?, None));
        }
        return Ok(());
    };
    let every = Duration::from_secs_f64(every.clamp(0.1, 3600.0));
    let clear = std::io::IsTerminal::is_terminal(&std::io::stdout()) && !args.json;
    let mut previous: Option<Value> = None;
    loop {
        let text = ask(&path, "stat")?;
        if args.json {
            print!("{text}");
        } else {
            let now = parse(&text)?;
            if clear {
                print!("\x1b[H\x1b[2J");
            }
            println!("{}", table(&now, previous.as_ref()));
            previous = Some(now);
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(every);
    }
}

fn parse(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("the manager's answer is not JSON: {e}"))
}

fn num(v: &Value, path: &str) -> f64 {
    v.pointer(path).and_then(Value::as_f64).unwrap_or(0.0)
}

fn opt_us(v: &Value, path: &str) -> String {
    v.pointer(path)
        .and_then(Value::as_u64)
        .map_or("-".to_string(), |n| format!("{n} µs"))
}

/// A readable table; with an earlier sample, rates are computed between the two.
pub fn table(now: &Value, before: Option<&Value>) -> String {
    let bytes = |p: &str| human_bytes(num(now, p) as u64);
    let rate = |p: &str, fallback: &str| -> f64 {
        match before {
            Some(b) => {
                let dt = num(now, "/sampled_at") - num(b, "/sampled_at");
                if dt > 0.0 {
                    (num(now, p) - num(b, p)).max(0.0) / dt
                } else {
                    0.0
                }
            }
            None => num(now, fallback),
        }
    };
    let window = if before.is_some() {
        "since the last sample"
    } else {
        "last second"
    };
    let mut t = String::new();
    let mut row = |k: &str, v: String| t.push_str(&format!("{k:<22} {v}\n"));
    row(
        "manager",
        format!(
            "pid {}, up {:.0} s",
            num(now, "/pid"),
            num(now, "/uptime_s")
        ),
    );
    row(
        "processes",
        format!(
            "{} live ({} address spaces), {} managed in all",
            num(now, "/live_processes"),
            num(now, "/address_spaces"),
            num(now, "/report/processes")
        ),
    );
    row(
        "memory",
        format!(
            "{} registered, {} resident, {} pending, {} zero",
            bytes("/memory/registered"),
            bytes("/memory/resident"),
            bytes("/memory/pending"),
            bytes("/memory/zero")
        ),
    );
    row(
        "faults",
        format!(
            "{} ({:.0}/s {window})",
            num(now, "/report/faults"),
            rate("/report/faults", "/rates/faults_per_s")
        ),
    );
    row(
        "served",
        format!(
            "{} pages, {} ({}/s {window})",
            num(now, "/report/pages_served"),
            bytes("/report/bytes_served"),
            human_bytes(rate("/report/bytes_served", "/rates/served_bytes_per_s") as u64)
        ),
    );
    row(
        "fault latency",
        format!(
            "p50 {}, p90 {}, p99 {}, max {}",
            opt_us(now, "/report/fault_latency_us/p50"),
            opt_us(now, "/fault_latency_p90_us"),
            opt_us(now, "/report/fault_latency_us/p99"),
            opt_us(now, "/report/fault_latency_us/max")
        ),
    );
    row(
        "events",
        format!(
            "{} fork, {} remap, {} remove, {} unmap, {} unknown",
            num(now, "/report/events/fork"),
            num(now, "/report/events/remap"),
            num(now, "/report/events/remove"),
            num(now, "/report/events/unmap"),
            num(now, "/report/events/unknown")
        ),
    );
    if now.get("restore_progress").is_some() {
        row(
            "restore",
            format!(
                "{:.1} % done, {} pending, background {} ({}/s {window})",
                100.0 * num(now, "/restore_progress/done"),
                bytes("/restore_progress/memory/pending"),
                bytes("/report/restore/background_bytes"),
                human_bytes(rate(
                    "/report/restore/background_bytes",
                    "/restore_progress/background_bytes_per_s"
                ) as u64)
            ),
        );
    }
    row(
        "errors",
        format!(
            "{} refused, {} protocol errors, {} abandoned, {} control refused",
            num(now, "/report/refused"),
            num(now, "/report/protocol_errors"),
            num(now, "/report/abandoned"),
            num(now, "/control_refused")
        ),
    );
    t
}
