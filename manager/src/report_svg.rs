//! `umm report TRACE --svg OUT`: three panels drawn by hand from a --trace file (see
//! trace.rs): a fault heat map per process (time × address), a restore's fill progress over
//! time, and the fault-latency histogram. Data marks carry a class (`cell`, `fill`, `bar`) so
//! that tools and tests can find them. Points are binned or downsampled: the file stays small
//! whatever the trace's length.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write;
use std::io::BufRead;

/// Heat-map columns (time bins) and at most this many rows (address bins) per process.
const COLUMNS: usize = 100;
const MAX_ROWS: usize = 48;
/// Processes drawn in the heat map (those with the most faults).
const MAX_PROCESSES: usize = 3;
/// Points of the fill-progress line at most.
const MAX_FILL_POINTS: usize = 300;
/// The address axis counts touched blocks of this size, in address order, leaving out the
/// untouched gaps (a process's heap and stacks are terabytes apart).
const BLOCK: u64 = 2 << 20;

const WIDTH: f64 = 900.0;
const LEFT: f64 = 150.0;
const PLOT_W: f64 = 700.0;

struct Fault {
    t_us: u64,
    pid: u32,
    start: u64,
    len: u64,
    space: u64,
    latency_us: u64,
}

#[derive(Default)]
pub struct TraceData {
    faults: Vec<Fault>,
    /// (t_us, bytes) copied by the background fill.
    fills: Vec<(u64, u64)>,
    /// (space, t_us) of each restore handoff, and the bytes all of them had to fill.
    restores: Vec<(u64, u64)>,
    to_fill: u64,
    end_us: u64,
}

/// Read a trace; a line that is not a trace record is an error naming it.
pub fn read_trace(input: impl BufRead, name: &str) -> Result<TraceData, String> {
    let mut d = TraceData::default();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("{name}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("{name}:{}: not a trace line: {e}", n + 1))?;
        let num = |k: &str| v[k].as_u64().unwrap_or(0);
        let t = num("t_us");
        d.end_us = d.end_us.max(t);
        match v["kind"].as_str() {
            Some("fault") => d.faults.push(Fault {
                t_us: t,
                pid: num("pid") as u32,
                start: num("start"),
                len: num("len"),
                space: num("space"),
                latency_us: num("latency_us"),
            }),
            Some("fill") => d.fills.push((t, num("len"))),
            Some("restore") => {
                d.restores.push((num("space"), t));
                d.to_fill += num("to_fill");
            }
            Some(_) => {}
            None => return Err(format!("{name}:{}: a line without \"kind\"", n + 1)),
        }
    }
    Ok(d)
}

/// The whole picture.
pub fn render(d: &TraceData, title: &str) -> String {
    let mut body = String::new();
    let mut y = 50.0;
    y = heat_map(&mut body, d, y);
    y = fill_progress(&mut body, d, y + 30.0);
    y = latency_histogram(&mut body, d, y + 30.0);
    let h = y + 20.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>
"#,
        WIDTH / 2.0,
        esc(title)
    );
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn seconds(us: u64) -> String {
    format!("{:.2} s", us as f64 / 1e6)
}

fn panel_title(s: &mut String, y: f64, text: &str) {
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{y}" font-size="13" font-weight="bold">{}</text>"#,
        esc(text)
    );
}

fn note(s: &mut String, y: f64, text: &str) -> f64 {
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="{}" fill="#666">{}</text>"##,
        y + 20.0,
        esc(text)
    );
    y + 30.0
}

/// A time axis under a plot at `y`: start, middle and end labels.
fn time_axis(s: &mut String, y: f64, end_us: u64) {
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#333"/>"##,
        LEFT + PLOT_W
    );
    for (frac, anchor) in [(0.0, "start"), (0.5, "middle"), (1.0, "end")] {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="{anchor}">{}</text>"#,
            LEFT + frac * PLOT_W,
            y + 14.0,
            seconds((end_us as f64 * frac) as u64)
        );
    }
}

/// Panel 1: per process, faults binned by time (columns) and touched address block (rows);
/// darker: more faults.
fn heat_map(s: &mut String, d: &TraceData, mut y: f64) -> f64 {
    let _ = writeln!(s, r#"<g id="heatmap">"#);
    panel_title(
        s,
        y,
        "Faults: address × time, per process (darker: more faults)",
    );
    y += 10.0;
    let mut by_pid: BTreeMap<u32, Vec<&Fault>> = BTreeMap::new();
    for f in &d.faults {
        by_pid.entry(f.pid).or_default().push(f);
    }
    if by_pid.is_empty() {
        y = note(s, y, "no faults in this trace");
        s.push_str("</g>\n");
        return y;
    }
    let mut pids: Vec<(u32, Vec<&Fault>)> = by_pid.into_iter().collect();
    pids.sort_by_key(|(_, f)| std::cmp::Reverse(f.len()));
    let end = d.end_us.max(1) as f64;
    let cell_w = PLOT_W / COLUMNS as f64;
    for (pid, faults) in pids.iter().take(MAX_PROCESSES) {
        let blocks: Vec<u64> = faults
            .iter()
            .map(|f| f.start / BLOCK)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let rows = blocks.len().min(MAX_ROWS);
        let per_row = blocks.len().div_ceil(rows);
        let row_of = |addr: u64| {
            let i = blocks.partition_point(|&b| b < addr / BLOCK);
            (i / per_row).min(rows - 1)
        };
        let mut grid = vec![0u32; rows * COLUMNS];
        for f in faults {
            let col = ((f.t_us as f64 / end * COLUMNS as f64) as usize).min(COLUMNS - 1);
            grid[row_of(f.start) * COLUMNS + col] += 1;
        }
        let max = grid.iter().copied().max().unwrap_or(1).max(1) as f64;
        let cell_h = (160.0 / rows as f64).clamp(3.0, 12.0);
        let label = if *pid == 0 {
            "pid ?".to_string()
        } else {
            format!("pid {pid}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{label}: {} faults</text>"#,
            LEFT - 8.0,
            y + 12.0,
            faults.len()
        );
        // Row labels: the lowest and highest block addresses.
        let plot_h = cell_h * rows as f64;
        for (row_y, addr) in [
            (y + plot_h, blocks[0]),
            (y + 10.0, blocks[blocks.len() - 1]),
        ] {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{row_y}" text-anchor="end" fill="#555">{:#x}</text>"##,
                LEFT - 8.0,
                addr * BLOCK
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y}" width="{PLOT_W}" height="{plot_h}" fill="#f4f4f4"/>"##
        );
        for (i, &n) in grid.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let (row, col) = (i / COLUMNS, i % COLUMNS);
            // Log scale: a single fault stays visible next to thousands.
            let level = 0.25 + 0.75 * ((n as f64).ln_1p() / max.ln_1p());
            let _ = writeln!(
                s,
                r##"<rect class="cell" x="{:.1}" y="{:.1}" width="{:.1}" height="{cell_h:.1}" fill="#b2182b" fill-opacity="{level:.2}"/>"##,
                LEFT + col as f64 * cell_w,
                y + plot_h - (row + 1) as f64 * cell_h,
                cell_w
            );
        }
        y += plot_h + 4.0;
        time_axis(s, y, d.end_us);
        y += 30.0;
    }
    if pids.len() > MAX_PROCESSES {
        y = note(
            s,
            y - 20.0,
            &format!("(and {} more processes)", pids.len() - MAX_PROCESSES),
        );
    }
    s.push_str("</g>\n");
    y
}

/// Panel 2: the share of a restore's bytes in place over time (faults of restored spaces and
/// the background fill).
fn fill_progress(s: &mut String, d: &TraceData, mut y: f64) -> f64 {
    let _ = writeln!(s, r#"<g id="fill">"#);
    panel_title(
        s,
        y,
        "Restore fill progress (faults and background fill, % of the image's bytes)",
    );
    y += 10.0;
    if d.to_fill == 0 {
        y = note(s, y, "no restore in this trace");
        s.push_str("</g>\n");
        return y;
    }
    // A space's faults count from its restore handoff on (space numbers are reused).
    let restored: HashSet<u64> = d.restores.iter().map(|&(space, _)| space).collect();
    let first = d.restores.iter().map(|&(_, t)| t).min().unwrap_or(0);
    let mut events: Vec<(u64, u64)> = d.fills.clone();
    events.extend(
        d.faults
            .iter()
            .filter(|f| restored.contains(&f.space) && f.t_us >= first)
            .map(|f| (f.t_us, f.len)),
    );
    events.sort_unstable();
    let plot_h = 150.0;
    let end = d.end_us.max(1) as f64;
    let step = events.len().div_ceil(MAX_FILL_POINTS).max(1);
    let mut done = 0u64;
    let mut points = vec![(first, 0.0)];
    for (i, &(t, len)) in events.iter().enumerate() {
        done += len;
        if i % step == step - 1 || i + 1 == events.len() {
            points.push((t, (done as f64 / d.to_fill as f64).min(1.0) * 100.0));
        }
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{y}" width="{PLOT_W}" height="{plot_h}" fill="#f4f4f4"/>"##
    );
    for pct in [0, 50, 100] {
        let gy = y + plot_h * (1.0 - pct as f64 / 100.0);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{pct}%</text><line x1="{LEFT}" y1="{gy}" x2="{}" y2="{gy}" stroke="#ddd"/>"##,
            LEFT - 8.0,
            gy + 4.0,
            LEFT + PLOT_W
        );
    }
    let mut path = String::new();
    for (t, pct) in &points {
        let _ = write!(
            path,
            "{:.1},{:.1} ",
            LEFT + *t as f64 / end * PLOT_W,
            y + plot_h * (1.0 - pct / 100.0)
        );
    }
    let _ = writeln!(
        s,
        r##"<polyline class="fill" points="{}" fill="none" stroke="#2166ac" stroke-width="2"/>"##,
        path.trim_end()
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end">{} restore(s), {} to fill</text>"#,
        LEFT - 8.0,
        y + plot_h / 2.0 + 18.0,
        d.restores.len(),
        umm::human_bytes(d.to_fill)
    );
    y += plot_h + 4.0;
    time_axis(s, y, d.end_us);
    s.push_str("</g>\n");
    y + 20.0
}

/// Panel 3: fault latencies in power-of-two bins (µs), as % of faults.
fn latency_histogram(s: &mut String, d: &TraceData, mut y: f64) -> f64 {
    let _ = writeln!(s, r#"<g id="latency">"#);
    panel_title(s, y, "Fault latency (µs, power-of-two bins; % of faults)");
    y += 10.0;
    if d.faults.is_empty() {
        y = note(s, y, "no faults in this trace");
        s.push_str("</g>\n");
        return y;
    }
    let bin = |us: u64| (64 - us.leading_zeros()) as usize; // 0, 1, 2-3, 4-7, ...
    let mut counts = [0u64; 65];
    for f in &d.faults {
        counts[bin(f.latency_us)] += 1;
    }
    let lo = counts.iter().position(|&c| c > 0).unwrap_or(0);
    let hi = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
    let n = d.faults.len() as f64;
    let max = counts.iter().copied().max().unwrap_or(1) as f64 / n;
    let plot_h = 150.0;
    let bar_w = PLOT_W / (hi - lo + 1) as f64;
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{y}" width="{PLOT_W}" height="{plot_h}" fill="#f4f4f4"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end">{:.0}%</text>"#,
        LEFT - 8.0,
        y + 10.0,
        max * 100.0
    );
    for (i, &c) in counts.iter().enumerate().take(hi + 1).skip(lo) {
        let x = LEFT + (i - lo) as f64 * bar_w;
        let frac = c as f64 / n;
        let h = plot_h * frac / max;
        let label = if i == 0 { 0 } else { 1u64 << (i - 1) };
        if c > 0 {
            let _ = writeln!(
                s,
                r##"<rect class="bar" x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#4d9221"><title>{label} µs and up: {c} faults ({:.1}%)</title></rect>"##,
                x + 1.0,
                y + plot_h - h,
                (bar_w - 2.0).max(1.0),
                frac * 100.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            x + bar_w / 2.0,
            y + plot_h + 14.0
        );
    }
    s.push_str("</g>\n");
    y + plot_h + 20.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = r#"{"t_us":10,"space":0,"pid":7,"kind":"restore","to_fill":8192}
{"t_us":20,"space":0,"pid":7,"kind":"fault","start":4096,"len":4096,"write":false,"latency_us":3}
{"t_us":30,"space":0,"pid":7,"kind":"fill","start":8192,"len":4096}
{"t_us":40,"space":0,"pid":7,"kind":"exit"}
"#;

    #[test]
    fn a_restore_trace_has_marks_in_every_panel() {
        let d = read_trace(TRACE.as_bytes(), "t").unwrap();
        assert_eq!(d.to_fill, 8192);
        let svg = render(&d, "t <1>");
        assert!(svg.contains(r#"class="cell""#));
        assert!(svg.contains(r#"class="fill""#));
        assert!(svg.contains(r#"class="bar""#));
        assert!(svg.contains("t &lt;1&gt;"));
        // The fill ends at 100%: the fault and the fill piece are the whole image.
        assert!(svg.contains("100%"));
    }

    #[test]
    fn an_empty_trace_draws_notes_and_a_bad_line_is_an_error() {
        let svg = render(&read_trace("".as_bytes(), "t").unwrap(), "t");
        assert!(svg.contains("no faults in this trace"));
        assert!(!svg.contains(r#"class="cell""#));
        let e = read_trace("{\"t_us\":1}\nnot json\n".as_bytes(), "t.jsonl")
            .err()
            .unwrap();
        assert!(e.starts_with("t.jsonl:1:"), "{e}");
    }
}
