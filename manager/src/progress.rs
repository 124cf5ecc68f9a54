//! Progress of `umm restore` and `umm snapshot` on stderr: a bar with rate and ETA on a
//! terminal, a plain line every [`LINE_INTERVAL`] otherwise (logs, CI), nothing with --quiet.
//! The caller updates it from a loop it runs anyway (the manager's tick, the snapshot's copy
//! batches): no thread, and an update is a few arithmetic operations between prints.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain progress line is printed when stderr is not a terminal.
pub const LINE_INTERVAL: Duration = Duration::from_secs(2);

pub struct Progress {
    what: &'static str,
    out: Output,
    started: Instant,
}

enum Output {
    Bar(ProgressBar),
    Lines { last: Instant },
    Off,
}

impl Progress {
    /// `what` names the operation in each line ("restore", "snapshot").
    pub fn new(what: &'static str, quiet: bool) -> Progress {
        let now = Instant::now();
        let out = if quiet {
            Output::Off
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            Output::Bar(bar)
        } else {
            Output::Lines { last: now }
        };
        Progress {
            what,
            out,
            started: now,
        }
    }

    /// `done` bytes of `total` (None: not known, the line shows bytes and rate only).
    pub fn update(&mut self, done: u64, total: Option<u64>) {
        let total = total.map(|t| t.max(done));
        match &mut self.out {
            Output::Off => {}
            Output::Bar(bar) => {
                if bar.length() != total {
                    bar.set_style(bar_style(self.what, total.is_some()));
                    match total {
                        Some(t) => bar.set_length(t),
                        None => bar.unset_length(),
                    }
                }
                bar.set_position(done);
            }
            Output::Lines { last } => {
                let now = Instant::now();
                if now.duration_since(*last) >= LINE_INTERVAL {
                    *last = now;
                    let elapsed = now.duration_since(self.started);
                    eprintln!("{}", line(self.what, done, total, elapsed));
                }
            }
        }
    }

    /// Clear the bar (the caller's summary line follows).
    pub fn finish(&mut self) {
        if let Output::Bar(bar) = &self.out {
            bar.finish_and_clear();
        }
        self.out = Output::Off;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

fn bar_style(what: &str, known_total: bool) -> ProgressStyle {
    let template = if known_total {
        format!(
            "{what}: [{{bar:30}}] {{percent:>3}}% {{binary_bytes}}/{{binary_total_bytes}} \
             {{binary_bytes_per_sec}} ETA {{eta}}"
        )
    } else {
        format!("{what}: {{binary_bytes}} {{binary_bytes_per_sec}} {{elapsed}}")
    };
    ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// "restore: 41% 420.0 MiB/1.0 GiB 380.0 MiB/s ETA 1.6 s" (the average rate since the start).
pub fn line(what: &str, done: u64, total: Option<u64>, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let rate_text = format!("{}/s", umm::human_bytes(rate as u64));
    match total {
        Some(t) if t > 0 => {
            let pct = (done as f64 * 100.0 / t as f64).floor() as u64;
            let eta = if rate > 0.0 {
                format!("{:.1} s", (t - done) as f64 / rate)
            } else {
                "?".to_string()
            };
            format!(
                "{what}: {pct}% {}/{} {rate_text} ETA {eta}",
                umm::human_bytes(done),
                umm::human_bytes(t)
            )
        }
        _ => format!(
            "{what}: {} {rate_text} after {secs:.1} s",
            umm::human_bytes(done)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_percent_rate_and_eta() {
        let l = line(
            "restore",
            420 << 20,
            Some(1 << 30),
            Duration::from_millis(1100),
        );
        assert_eq!(l, "restore: 41% 420.0 MiB/1.0 GiB 381.8 MiB/s ETA 1.6 s");
    }

    #[test]
    fn line_without_total_shows_bytes_and_rate() {
        let l = line("snapshot", 10 << 20, None, Duration::from_secs(2));
        assert_eq!(l, "snapshot: 10.0 MiB 5.0 MiB/s after 2.0 s");
    }

    #[test]
    fn quiet_progress_prints_nothing_and_survives_updates() {
        let mut p = Progress::new("restore", true);
        p.update(5, Some(3));
        p.update(0, None);
        p.finish();
    }
}
