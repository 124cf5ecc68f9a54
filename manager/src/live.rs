//! What the control socket answers: a live snapshot (`stat`, JSON) and the same numbers in
//! the Prometheus text exposition format 0.0.4 (`metrics`). Both reuse the report's counters.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::manager::Manager;
use crate::stats::{Histogram, Report};

/// Bytes of the managed address spaces by page state.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct MemoryBytes {
    pub registered: u64,
    /// Present: served, or touched before registration.
    pub resident: u64,
    /// Missing: not served yet (a restore's still to fill).
    pub pending: u64,
    /// Zero-on-refault (removed) and not touched since.
    pub zero: u64,
}

impl MemoryBytes {
    fn add(&mut self, layout: &umm::layout::Layout) {
        let (missing, zero, present) = layout.bytes_by_state();
        self.registered += layout.registered_bytes();
        self.resident += present;
        self.pending += missing;
        self.zero += zero;
    }
}

#[derive(Serialize, Debug)]
pub struct RestoreProgress {
    /// The restoring address spaces' memory.
    pub memory: MemoryBytes,
    /// Share of their registered bytes not pending any more (0..=1).
    pub done: f64,
    pub background_bytes_per_s: f64,
}

#[derive(Serialize, Debug)]
pub struct Rates {
    /// Over the last second or so.
    pub faults_per_s: f64,
    pub served_bytes_per_s: f64,
    pub background_bytes_per_s: f64,
}

/// The `stat` answer.
#[derive(Serialize, Debug)]
pub struct Snapshot {
    pub pid: u32,
    pub uptime_s: f64,
    /// Seconds since the Unix epoch.
    pub sampled_at: f64,
    pub address_spaces: usize,
    /// Distinct live processes with a known pid.
    pub live_processes: usize,
    pub memory: MemoryBytes,
    pub rates: Rates,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_progress: Option<RestoreProgress>,
    pub fault_latency_p90_us: Option<u64>,
    pub control_refused: u64,
    /// The counters of the `--report` JSON, so far.
    pub report: Report,
}

impl Manager {
    pub(crate) fn live_snapshot(&mut self) -> Snapshot {
        self.collect_coverage();
        let mut memory = MemoryBytes::default();
        let mut restoring = MemoryBytes::default();
        let mut pids: Vec<u32> = Vec::new();
        for (_, s) in self.spaces.iter() {
            memory.add(&s.layout);
            if s.restore.is_some() {
                restoring.add(&s.layout);
            }
            pids.extend(s.pid);
        }
        pids.sort_unstable();
        pids.dedup();
        let (uptime, refused, rates) = match &self.control {
            Some(c) => (c.started.elapsed().as_secs_f64(), c.refused, c.rates),
            None => (0.0, 0, Default::default()),
        };
        let report = self.stats.report(self.spaces.len(), self.command_status);
        Snapshot {
            pid: self.own_pid,
            uptime_s: uptime,
            sampled_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            address_spaces: self.spaces.len(),
            live_processes: pids.len(),
            memory,
            rates: Rates {
                faults_per_s: rates.faults_per_s,
                served_bytes_per_s: rates.served_bytes_per_s,
                background_bytes_per_s: rates.background_bytes_per_s,
            },
            restore_progress: (self.stats.restores > 0).then(|| RestoreProgress {
                memory: restoring,
                done: if restoring.registered == 0 {
                    1.0
                } else {
                    1.0 - restoring.pending as f64 / restoring.registered as f64
                },
                background_bytes_per_s: rates.background_bytes_per_s,
            }),
            fault_latency_p90_us: self.stats.latency_us.quantile(0.9),
            control_refused: refused,
            report,
        }
    }

    pub(crate) fn metrics_text(&mut self) -> String {
        let snap = self.live_snapshot();
        let r = &snap.report;
        let mut m = Exposition::default();
        m.gauge(
            "umm_uptime_seconds",
            "Time since the manager started.",
            snap.uptime_s,
        );
        m.counter(
            "umm_processes_total",
            "Address spaces managed: handed over by agents plus created by fork.",
            r.processes,
        );
        m.counter(
            "umm_handoffs_total",
            "Processes handed over by agents.",
            r.handoffs,
        );
        m.gauge(
            "umm_address_spaces",
            "Address spaces managed now.",
            snap.address_spaces as f64,
        );
        m.family(
            "umm_memory_bytes",
            "gauge",
            "Registered memory of the managed address spaces by page state.",
            &[
                ("state", "registered", snap.memory.registered as f64),
                ("state", "resident", snap.memory.resident as f64),
                ("state", "pending", snap.memory.pending as f64),
                ("state", "zero", snap.memory.zero as f64),
            ],
        );
        m.gauge(
            "umm_registered_peak_bytes",
            "Peak registered memory.",
            r.peak_registered_bytes as f64,
        );
        m.counter(
            "umm_faults_total",
            "Page faults read from the userfaultfds.",
            r.faults,
        );
        m.counter(
            "umm_pages_served_total",
            "Pages served (copied or zeroed).",
            r.pages_served,
        );
        m.counter(
            "umm_fork_pages_served_total",
            "Pages served into forked children's address spaces.",
            r.fork_pages_served,
        );
        m.counter("umm_served_bytes_total", "Bytes served.", r.bytes_served);
        m.counter("umm_copies_total", "UFFDIO_COPY/ZEROPAGE calls.", r.copies);
        m.family(
            "umm_events_total",
            "counter",
            "Non-cooperative userfaultfd events by kind.",
            &[
                ("kind", "fork", r.events.fork as f64),
                ("kind", "remap", r.events.remap as f64),
                ("kind", "remove", r.events.remove as f64),
                ("kind", "unmap", r.events.unmap as f64),
                ("kind", "unknown", r.events.unknown as f64),
            ],
        );
        m.family(
            "umm_copy_retries_total",
            "counter",
            "Copies that met a changed layout, by errno.",
            &[
                ("errno", "EEXIST", r.eexist as f64),
                ("errno", "EAGAIN", r.eagain_retries as f64),
                ("errno", "ENOENT", r.enoent as f64),
            ],
        );
        m.counter("umm_refused_total", "Agent peers refused.", r.refused);
        m.counter(
            "umm_protocol_errors_total",
            "Malformed agent messages.",
            r.protocol_errors,
        );
        m.counter(
            "umm_abandoned_total",
            "Address spaces given up on (uffd closed, fail-open).",
            r.abandoned,
        );
        m.counter(
            "umm_address_spaces_closed_total",
            "Address spaces closed (exit, exec, give-up).",
            r.spaces_closed,
        );
        m.counter(
            "umm_register_requests_total",
            "Registration requests from agents.",
            r.register_requests,
        );
        m.counter("umm_rescans_total", "Rescans of /proc/PID/maps.", r.rescans);
        m.counter(
            "umm_control_refused_total",
            "Control socket connections refused (wrong uid).",
            snap.control_refused,
        );
        if let Some(c) = r.coverage.last {
            m.gauge(
                "umm_coverage_ratio",
                "Share of anonymous memory in registered VMAs (last sample).",
                c,
            );
        }
        m.histogram(
            "umm_fault_latency_seconds",
            "Time from reading a fault to answering it.",
            &self.stats.latency_us,
        );
        if let Some(rs) = &r.restore {
            m.counter(
                "umm_restore_handoffs_total",
                "Restores handed over.",
                rs.handoffs,
            );
            m.counter(
                "umm_restore_completed_total",
                "Restored address spaces completed.",
                rs.completed,
            );
            m.counter(
                "umm_restore_killed_total",
                "Restored address spaces stopped (fail-stop).",
                rs.killed,
            );
            m.counter(
                "umm_background_fill_bytes_total",
                "Bytes filled by the background fill.",
                rs.background_bytes,
            );
        }
        m.text
    }
}

/// The Prometheus text format: HELP and TYPE before each family's samples.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.text, "{name} {v}");
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.text, "{name} {v}");
    }

    fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, &str, f64)]) {
        self.header(name, kind, help);
        for (label, value, v) in samples {
            let _ = writeln!(self.text, "{name}{{{label}=\"{value}\"}} {v}");
        }
    }

    /// Cumulative buckets at powers of two microseconds (exact edges of the log-linear
    /// histogram), 1 µs to 16 s.
    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        for k in 0..=24 {
            let limit_us = 1u64 << k;
            let _ = writeln!(
                self.text,
                "{name}_bucket{{le=\"{}\"}} {}",
                limit_us as f64 / 1e6,
                h.count_below(limit_us)
            );
        }
        let _ = writeln!(self.text, "{name}_bucket{{le=\"+Inf\"}} {}", h.count());
        let _ = writeln!(self.text, "{name}_sum {}", h.sum() as f64 / 1e6);
        let _ = writeln!(self.text, "{name}_count {}", h.count());
    }
}
