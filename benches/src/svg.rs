//! The chart, written by hand: stacked panels of line plots (latency histograms on a log axis,
//! fill progress over time). No dependencies.

use std::fmt::Write;

pub const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

const WIDTH: f64 = 960.0;
const PANEL_H: f64 = 330.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// One line of a panel: label, colour, points (x, y) in data units, and optional vertical
/// markers (x, label) drawn dashed in the same colour.
pub struct Series {
    pub label: String,
    pub color: String,
    pub points: Vec<(f64, f64)>,
    pub markers: Vec<(f64, String)>,
}

pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// log10 x axis (latencies).
    pub log_x: bool,
    pub series: Vec<Series>,
}

/// A latency histogram as a line: fraction of samples (in %) per log bin (4 bins per power of
/// two, from 0.5 µs up), plotted at each bin's geometric centre. Values in µs.
pub fn histogram_points(values_us: &[f64]) -> Vec<(f64, f64)> {
    if values_us.is_empty() {
        return Vec::new();
    }
    const PER_OCTAVE: f64 = 4.0;
    let lo = 0.5f64;
    let bin = |v: f64| -> usize {
        if v <= lo {
            0
        } else {
            ((v / lo).log2() * PER_OCTAVE).floor() as usize
        }
    };
    let nbins = values_us.iter().map(|&v| bin(v)).max().unwrap_or(0) + 1;
    let mut counts = vec![0u64; nbins];
    for &v in values_us {
        counts[bin(v)] += 1;
    }
    let n = values_us.len() as f64;
    let first = counts.iter().position(|&c| c > 0).unwrap_or(0);
    counts
        .iter()
        .enumerate()
        .skip(first)
        .map(|(i, &c)| {
            let centre = lo * 2f64.powf((i as f64 + 0.5) / PER_OCTAVE);
            (centre, 100.0 * c as f64 / n)
        })
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// "Nice" tick values covering [lo, hi] (about 6 of them).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 7.0)
        .unwrap_or(10.0 * mag);
    let mut v = Vec::new();
    let mut t = (lo / step).ceil() * step;
    while t <= hi + step * 1e-9 {
        v.push(t);
        t += step;
    }
    v
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 10_000.0 || (v.fract() == 0.0 && v.abs() >= 1.0) {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn panel(svg: &mut String, p: &Panel, y0: f64) {
    let pw = WIDTH - LEFT - RIGHT;
    let ph = PANEL_H - TOP - BOTTOM;
    let pts = || p.series.iter().flat_map(|s| s.points.iter());
    let xs: Vec<f64> = pts()
        .map(|&(x, _)| x)
        .filter(|x| !p.log_x || *x > 0.0)
        .collect();
    let (mut xmin, mut xmax) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    if !xmin.is_finite() {
        (xmin, xmax) = (0.0, 1.0);
    }
    let ymax = pts().map(|&(_, y)| y).fold(0.0, f64::max).max(1e-9) * 1.08;
    let (fx, xt): (Box<dyn Fn(f64) -> f64>, Vec<f64>) = if p.log_x {
        let (a, b) = (
            xmin.max(1e-3).log10().floor(),
            xmax.max(1e-3)
                .log10()
                .ceil()
                .max(xmin.log10().floor() + 1.0),
        );
        let f = move |x: f64| LEFT + (x.max(1e-9).log10() - a) / (b - a) * pw;
        let t = (a as i32..=b as i32).map(|e| 10f64.powi(e)).collect();
        (Box::new(f), t)
    } else {
        let (a, b) = (xmin.min(0.0), if xmax > xmin { xmax } else { xmin + 1.0 });
        let f = move |x: f64| LEFT + (x - a) / (b - a) * pw;
        (Box::new(f), ticks(a, b))
    };
    let fy = |y: f64| y0 + TOP + ph - y / ymax * ph;
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        LEFT,
        y0 + 24.0,
        esc(&p.title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##,
        y0 + TOP
    );
    for t in xt {
        let x = fx(t);
        if !(LEFT - 0.5..=LEFT + pw + 0.5).contains(&x) {
            continue;
        }
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"##,
            y0 + TOP,
            y0 + TOP + ph,
            y0 + TOP + ph + 15.0,
            tick_label(t)
        );
    }
    for t in ticks(0.0, ymax) {
        let y = fy(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            tick_label(t)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        y0 + PANEL_H - 12.0,
        esc(&p.x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        y0 + TOP + ph / 2.0,
        y0 + TOP + ph / 2.0,
        esc(&p.y_label)
    );
    for (i, s) in p.series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, _)| !p.log_x || *x > 0.0)
            .map(|&(x, y)| format!("{:.1},{:.1}", fx(x), fy(y)))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                s.color,
                path.join(" ")
            );
        }
        for (x, label) in &s.markers {
            let px = fx(*x);
            if !(LEFT..=LEFT + pw).contains(&px) {
                continue;
            }
            let _ = writeln!(
                svg,
                r#"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="{}" stroke-dasharray="4 3"/><title>{}</title>"#,
                y0 + TOP,
                y0 + TOP + ph,
                s.color,
                esc(label)
            );
        }
        let ly = y0 + TOP + 14.0 + i as f64 * 34.0;
        let lx = LEFT + pw + 14.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            lx + 18.0,
            s.color,
            lx + 24.0,
            ly + 4.0,
            esc(&s.label)
        );
        if let Some((_, m)) = s.markers.first() {
            let _ = writeln!(
                svg,
                r##"<text x="{}" y="{}" font-size="11" fill="#555">{}</text>"##,
                lx + 24.0,
                ly + 18.0,
                esc(m)
            );
        }
    }
}

/// The whole chart: panels stacked vertically, with a caption line at the top.
pub fn chart(caption: &str, panels: &[Panel]) -> String {
    let h = 30.0 + PANEL_H * panels.len() as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="20" font-size="12" fill="#333">{}</text>"##,
        esc(caption)
    );
    for (i, p) in panels.iter().enumerate() {
        panel(&mut svg, p, 30.0 + i as f64 * PANEL_H);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_sums_to_100_percent() {
        let v: Vec<f64> = (1..=1000).map(|i| i as f64 / 10.0).collect();
        let h = histogram_points(&v);
        let sum: f64 = h.iter().map(|p| p.1).sum();
        assert!((sum - 100.0).abs() < 1e-6, "{sum}");
        assert!(h.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(histogram_points(&[]).is_empty());
    }

    #[test]
    fn chart_is_well_formed() {
        let p = Panel {
            title: "a <b>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: true,
            series: vec![Series {
                label: "s".into(),
                color: COLORS[0].into(),
                points: histogram_points(&[1.0, 2.0, 30.0]),
                markers: vec![(2.0, "p50 2 µs".into())],
            }],
        };
        let q = Panel {
            title: "empty".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: false,
            series: Vec::new(),
        };
        let s = chart("c", &[p, q]);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("a &lt;b&gt;"));
        assert_eq!(s.matches("<polyline").count(), 1);
    }
}
