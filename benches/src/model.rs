//! Figures and rows: the numbers, their summaries (median, min, max over repetitions), ratios
//! against a baseline measured in the same run, targets, the text table and the JSON.

use serde_json::{json, Value};

/// How a row's ratio is judged.
#[derive(Clone, Debug)]
pub struct Target {
    /// `true`: the ratio must be at least `value`; `false`: at most.
    pub at_least: bool,
    pub value: f64,
}

impl Target {
    pub fn at_least(value: f64) -> Target {
        Target {
            at_least: true,
            value,
        }
    }

    pub fn at_most(value: f64) -> Target {
        Target {
            at_least: false,
            value,
        }
    }

    pub fn text(&self) -> String {
        format!(
            "{} {:.2}",
            if self.at_least { ">=" } else { "<=" },
            self.value
        )
    }

    pub fn met(&self, ratio: f64) -> bool {
        if self.at_least {
            ratio >= self.value
        } else {
            ratio <= self.value
        }
    }
}

/// One measured quantity: one value per repetition.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub unit: String,
    pub values: Vec<f64>,
    /// The name of the row (same figure) this one is compared with.
    pub baseline: Option<String>,
    /// Filled by [`Figure::finish`]: median / baseline median.
    pub ratio: Option<f64>,
    pub target: Option<Target>,
    /// Runs of this row that failed (with the reason), so a hole in the table says why.
    pub errors: Vec<String>,
}

impl Row {
    pub fn new(name: impl Into<String>, unit: &str) -> Row {
        Row {
            name: name.into(),
            unit: unit.to_string(),
            values: Vec::new(),
            baseline: None,
            ratio: None,
            target: None,
            errors: Vec::new(),
        }
    }

    pub fn vs(mut self, baseline: impl Into<String>) -> Row {
        self.baseline = Some(baseline.into());
        self
    }

    pub fn target(mut self, t: Target) -> Row {
        self.target = Some(t);
        self
    }

    pub fn median(&self) -> Option<f64> {
        median(&self.values)
    }

    pub fn min(&self) -> Option<f64> {
        self.values.iter().copied().reduce(f64::min)
    }

    pub fn max(&self) -> Option<f64> {
        self.values.iter().copied().reduce(f64::max)
    }

    pub fn pass(&self) -> Option<bool> {
        Some(self.target.as_ref()?.met(self.ratio?))
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The value at quantile `q` of sorted `s` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[derive(Clone, Debug)]
pub struct Figure {
    pub id: u32,
    pub title: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// Seconds the figure took.
    pub seconds: f64,
}

impl Figure {
    pub fn new(id: u32, title: &str) -> Figure {
        Figure {
            id,
            title: title.to_string(),
            rows: Vec::new(),
            notes: Vec::new(),
            seconds: 0.0,
        }
    }

    /// The row called `name`, created from `make` the first time.
    pub fn row(&mut self, name: &str, make: impl FnOnce() -> Row) -> &mut Row {
        if let Some(i) = self.rows.iter().position(|r| r.name == name) {
            return &mut self.rows[i];
        }
        let mut r = make();
        r.name = name.to_string();
        self.rows.push(r);
        self.rows.last_mut().expect("just pushed")
    }

    /// Record `v` in row `name` (created with `unit` if new).
    pub fn push(&mut self, name: &str, unit: &str, v: f64) {
        self.row(name, || Row::new(name, unit)).values.push(v);
    }

    pub fn error(&mut self, name: &str, unit: &str, e: String) {
        eprintln!("umm-bench: figure {}: {name}: {e}", self.id);
        self.row(name, || Row::new(name, unit)).errors.push(e);
    }

    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Compute each row's ratio against its baseline's median.
    pub fn finish(&mut self) {
        let medians: Vec<(String, Option<f64>)> = self
            .rows
            .iter()
            .map(|r| (r.name.clone(), r.median()))
            .collect();
        for r in &mut self.rows {
            r.ratio = None;
            let Some(b) = &r.baseline else { continue };
            let base = medians.iter().find(|(n, _)| n == b).and_then(|(_, m)| *m);
            if let (Some(m), Some(b)) = (r.median(), base) {
                if b != 0.0 {
                    r.ratio = Some(m / b);
                }
            }
        }
    }

    /// Rows without a single value (what the smoke run checks).
    pub fn empty_rows(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| r.values.is_empty())
            .map(|r| {
                format!(
                    "figure {}: {}: no numbers ({})",
                    self.id,
                    r.name,
                    r.errors.first().map(String::as_str).unwrap_or("no run")
                )
            })
            .collect()
    }

    pub fn table(&self) -> String {
        let mut out = format!("Figure {}: {}\n", self.id, self.title);
        let name_w = self
            .rows
            .iter()
            .map(|r| r.name.chars().count())
            .max()
            .unwrap_or(4)
            .max(4);
        out += &format!(
            "  {:<name_w$}  {:>10} {:>10} {:>10}  {:<6} {:>2}  {:>7}  {:<9} {}\n",
            "row", "median", "min", "max", "unit", "n", "ratio", "target", "vs"
        );
        for r in &self.rows {
            let f = |v: Option<f64>| v.map(fmt_num).unwrap_or_else(|| "-".into());
            let verdict = match (r.target.as_ref(), r.pass()) {
                (Some(t), Some(true)) => format!("{} PASS", t.text()),
                (Some(t), Some(false)) => format!("{} MISS", t.text()),
                (Some(t), None) => format!("{} ?", t.text()),
                _ => String::new(),
            };
            out += &format!(
                "  {:<name_w$}  {:>10} {:>10} {:>10}  {:<6} {:>2}  {:>7}  {:<9} {}\n",
                r.name,
                f(r.median()),
                f(r.min()),
                f(r.max()),
                r.unit,
                r.values.len(),
                r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default(),
                verdict,
                r.baseline.as_deref().unwrap_or("")
            );
            if r.values.is_empty() {
                if let Some(e) = r.errors.first() {
                    out += &format!("  {:<name_w$}  ! {e}\n", "");
                }
            }
        }
        for n in &self.notes {
            out += &format!("  note: {n}\n");
        }
        out
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "median": r.median(),
                    "min": r.min(),
                    "max": r.max(),
                    "unit": r.unit,
                    "n": r.values.len(),
                    "values": r.values,
                    "baseline": r.baseline,
                    "ratio": r.ratio,
                    "target": r.target.as_ref().map(|t| t.text()),
                    "pass": r.pass(),
                    "errors": r.errors,
                })
            })
            .collect();
        json!({
            "id": self.id,
            "title": self.title,
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "rows": rows,
            "notes": self.notes,
        })
    }
}

/// Three significant digits, no exponent for the ranges we print.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&s, 0.5), Some(50.0));
        assert_eq!(quantile(&s, 0.99), Some(99.0));
        assert_eq!(quantile(&s, 1.0), Some(100.0));
    }

    #[test]
    fn ratios_and_targets() {
        let mut f = Figure::new(1, "t");
        f.push("base", "GB/s", 2.0);
        f.push("base", "GB/s", 8.0);
        f.push("base", "GB/s", 4.0);
        f.row("x", || {
            Row::new("x", "GB/s")
                .vs("base")
                .target(Target::at_least(0.9))
        })
        .values
        .push(3.0);
        f.finish();
        let x = &f.rows[1];
        assert_eq!(x.ratio, Some(0.75));
        assert_eq!(x.pass(), Some(false));
        assert!(f.table().contains("MISS"));
        assert!(f.empty_rows().is_empty());
        f.error("y", "ms", "boom".into());
        assert_eq!(f.empty_rows().len(), 1);
        let j = f.json();
        assert_eq!(j["rows"][1]["ratio"], json!(0.75));
    }
}
