//! Counters, the fault-latency histogram, and the JSON report.

use serde::Serialize;

/// A log-linear latency histogram in microseconds: 8 sub-buckets per power of two, so any
/// percentile is within 12.5 % of the truth, in constant memory.
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum: u64,
    max: u64,
}

const SUB: u32 = 8;
const SUB_BITS: u32 = 3;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; (64 * SUB) as usize],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn bucket_of(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // >= SUB_BITS
        let sub = (v >> (exp - SUB_BITS)) & (SUB as u64 - 1);
        ((exp - SUB_BITS + 1) * SUB) as usize + sub as usize
    }

    /// The largest value that falls into bucket `b` (reports round up, never flatter).
    fn bucket_high(b: usize) -> u64 {
        let b = b as u64;
        if b < SUB as u64 {
            return b;
        }
        let exp = b / SUB as u64 + SUB_BITS as u64 - 1;
        let sub = b % SUB as u64;
        let low = (1u64 << exp) | (sub << (exp - SUB_BITS as u64));
        low + (1u64 << (exp - SUB_BITS as u64)) - 1
    }

    pub fn record(&mut self, v: u64) {
        self.buckets[Self::bucket_of(v)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
        self.max = self.max.max(v);
    }

    /// The sum of every recorded value (for a Prometheus histogram's `_sum`).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// How many recorded values are below `limit`. Exact when `limit` is a power of two (a
    /// bucket edge: buckets never straddle one).
    pub fn count_below(&self, limit: u64) -> u64 {
        self.buckets
            .iter()
            .enumerate()
            .take_while(|&(b, _)| Self::bucket_high(b) < limit)
            .map(|(_, &n)| n)
            .sum()
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1), None when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Self::bucket_high(b).min(self.max));
            }
        }
        Some(self.max)
    }
}

/// Everything the manager counts. One instance per manager.
#[derive(Debug, Default)]
pub struct Stats {
    /// Address spaces managed: handed over by agents plus created by FORK.
    pub processes: u64,
    pub handoffs: u64,
    pub faults: u64,
    pub pages_served: u64,
    /// Of those, pages served into forked children's address spaces (through uffds only FORK
    /// events gave the manager).
    pub fork_pages_served: u64,
    pub bytes_served: u64,
    pub copies: u64,
    /// Faults whose page was already there (another thread's fault, or a stale model).
    pub eexist: u64,
    /// Copies that met EAGAIN (layout changing) and were decided again after reading events.
    pub eagain_retries: u64,
    /// Copies that met ENOENT (VMA split or gone).
    pub enoent: u64,
    pub forks: u64,
    pub remaps: u64,
    pub removes: u64,
    pub unmaps: u64,
    pub unknown_events: u64,
    /// Peers refused (not allowed, bad fd, setup failed).
    pub refused: u64,
    pub protocol_errors: u64,
    /// Address spaces given up on with their uffd closed (fail-open).
    pub abandoned: u64,
    pub spaces_closed: u64,
    pub registered_now: u64,
    pub peak_registered_bytes: u64,
    pub register_requests: u64,
    /// `umm attach --strict`: ranges the syscall tracer had registered before the mapping
    /// call returned.
    pub strict_registers: u64,
    pub rescans: u64,
    pub latency_us: Histogram,
    pub coverage_last: Option<f64>,
    pub coverage_min: Option<f64>,
    pub coverage_samples: u64,
    /// Lazy restore: handoffs, address spaces completed and killed (fail-stop), bytes filled
    /// in the background, the earliest time from a handoff to its first fault served, and the
    /// longest time from a handoff to its completion.
    pub restores: u64,
    pub restore_completed: u64,
    pub restore_killed: u64,
    pub background_bytes: u64,
    pub second_copier_bytes: u64,
    pub second_copier_taken_back: u64,
    /// Bytes the restores handed over so far had to fill from the image (at their handoff).
    pub restore_to_fill: u64,
    pub restore_first_fault_ms: Option<f64>,
    pub restore_complete_ms: u64,
}

impl Stats {
    pub fn registered_delta(&mut self, before: u64, after: u64) {
        self.registered_now = (self.registered_now + after).saturating_sub(before);
        self.peak_registered_bytes = self.peak_registered_bytes.max(self.registered_now);
    }

    pub fn report(&self, spaces_live: usize, exit_status: Option<i32>) -> Report {
        Report {
            restore: (self.restores > 0).then(|| RestoreReport {
                handoffs: self.restores,
                completed: self.restore_completed,
                killed: self.restore_killed,
                background_bytes: self.background_bytes,
                second_copier_bytes: self.second_copier_bytes,
                second_copier_taken_back: self.second_copier_taken_back,
                first_fault_ms: self.restore_first_fault_ms,
                complete_ms: (self.restore_completed > 0).then_some(self.restore_complete_ms),
                failed: None,
                page_server: None,
                network: None,
            }),
            processes: self.processes,
            handoffs: self.handoffs,
            faults: self.faults,
            pages_served: self.pages_served,
            fork_pages_served: self.fork_pages_served,
            bytes_served: self.bytes_served,
            copies: self.copies,
            coverage: CoverageReport {
                last: self.coverage_last,
                min: self.coverage_min,
                samples: self.coverage_samples,
            },
            events: EventCounts {
                fork: self.forks,
                remap: self.remaps,
                remove: self.removes,
                unmap: self.unmaps,
                unknown: self.unknown_events,
            },
            fault_latency_us: Latency {
                p50: self.latency_us.quantile(0.5),
                p99: self.latency_us.quantile(0.99),
                max: (self.latency_us.count() > 0).then_some(self.latency_us.max()),
            },
            peak_registered_bytes: self.peak_registered_bytes,
            eexist: self.eexist,
            eagain_retries: self.eagain_retries,
            enoent: self.enoent,
            refused: self.refused,
            protocol_errors: self.protocol_errors,
            abandoned: self.abandoned,
            register_requests: self.register_requests,
            strict_registers: self.strict_registers,
            rescans: self.rescans,
            spaces_closed: self.spaces_closed,
            spaces_live,
            exit_status,
            manager_peak_rss_bytes: umm::sys::proc::status_field(std::process::id(), "VmHWM")
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(0)
                * 1024,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct CoverageReport {
    pub last: Option<f64>,
    pub min: Option<f64>,
    pub samples: u64,
}

#[derive(Serialize, Debug)]
pub struct EventCounts {
    pub fork: u64,
    pub remap: u64,
    pub remove: u64,
    pub unmap: u64,
    pub unknown: u64,
}

#[derive(Serialize, Debug)]
pub struct Latency {
    pub p50: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
}

#[derive(Serialize, Debug)]
pub struct RestoreReport {
    pub handoffs: u64,
    pub completed: u64,
    pub killed: u64,
    pub background_bytes: u64,
    /// Of those, bytes the second copier copied (`--fill-threads`, 2 by default on two or
    /// more CPUs).
    pub second_copier_bytes: u64,
    /// Pieces handed to the second copier that the loop took back (the copier had not
    /// started them 200 µs after the loop was done with its own): the loop copies them.
    pub second_copier_taken_back: u64,
    pub first_fault_ms: Option<f64>,
    pub complete_ms: Option<u64>,
    /// Why the restore was stopped (fail-stop), if it was.
    pub failed: Option<String>,
    /// `umm lazy-pages --page-server`: the conversation with CRIU's page server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_server: Option<PageServerReport>,
    /// `--source tcp://`: what came over the network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetReport>,
}

/// What `umm lazy-pages --page-server` fetched (every reply read, in pages and bytes).
#[derive(Serialize, Debug)]
pub struct PageServerReport {
    pub peer: String,
    pub requests: u64,
    /// Replies with fewer pages than asked (the rest asked again).
    pub short_replies: u64,
    pub pages_fetched: u64,
    pub bytes_fetched: u64,
}

/// What a restore fetched from a page server.
#[derive(Serialize, Debug)]
pub struct NetReport {
    pub source: String,
    /// Get requests sent, and how many of them were urgent (a fault waited).
    pub requests: u64,
    pub urgent_requests: u64,
    /// Verified data received.
    pub bytes_fetched: u64,
    /// Faults' requests went on a second, urgent-only connection (false: the server offers
    /// none, or it could not be made).
    pub urgent_connection: bool,
    /// Requests sent and verified bytes received on the urgent connection.
    pub urgent_connection_requests: u64,
    pub urgent_connection_bytes: u64,
    /// Whether the transport was TLS (tcp:// with --tls-ca, or https://).
    pub tls: bool,
}

/// The `--report` JSON.
#[derive(Serialize, Debug)]
pub struct Report {
    pub processes: u64,
    pub handoffs: u64,
    pub faults: u64,
    pub pages_served: u64,
    pub fork_pages_served: u64,
    pub bytes_served: u64,
    pub copies: u64,
    pub coverage: CoverageReport,
    pub events: EventCounts,
    pub fault_latency_us: Latency,
    pub peak_registered_bytes: u64,
    pub eexist: u64,
    pub eagain_retries: u64,
    pub enoent: u64,
    pub refused: u64,
    pub protocol_errors: u64,
    pub abandoned: u64,
    pub register_requests: u64,
    pub strict_registers: u64,
    pub rescans: u64,
    pub spaces_closed: u64,
    pub spaces_live: usize,
    pub exit_status: Option<i32>,
    /// The manager's own peak resident memory (VmHWM), bytes.
    pub manager_peak_rss_bytes: u64,
    /// Present for `umm restore`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreReport>,
}

impl Report {
    /// The human summary printed on stderr at the end of `umm run`.
    pub fn summary(&self) -> String {
        let cov = match (self.coverage.last, self.coverage.min) {
            (Some(l), Some(m)) => format!("coverage {l:.2} (min {m:.2})"),
            _ => "coverage not sampled".to_string(),
        };
        let lat = match (self.fault_latency_us.p50, self.fault_latency_us.p99) {
            (Some(p50), Some(p99)) => format!(
                "fault latency p50 {p50} µs, p99 {p99} µs, max {} µs",
                self.fault_latency_us.max.unwrap_or(0)
            ),
            _ => "no faults timed".to_string(),
        };
        format!(
            "umm: {} processes ({} handed over), {} faults, {} pages ({}) served; \
             events: {} fork, {} remap, {} remove, {} unmap; {cov}; {lat}",
            self.processes,
            self.handoffs,
            self.faults,
            self.pages_served,
            human_bytes(self.bytes_served),
            self.events.fork,
            self.events.remap,
            self.events.remove,
            self.events.unmap,
        )
    }
}

pub use umm::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_within_an_eighth() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v);
        }
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        assert!((500..=563).contains(&p50), "{p50}");
        assert!((990..=1000).contains(&p99), "{p99}");
        assert_eq!(h.max(), 1000);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn histogram_buckets_cover_every_value() {
        for v in [0u64, 1, 7, 8, 9, 15, 16, 17, 1 << 20, u64::MAX / 2] {
            let b = Histogram::bucket_of(v);
            assert!(Histogram::bucket_high(b) >= v, "{v}");
            if b > 0 {
                assert!(Histogram::bucket_high(b - 1) < v, "{v}");
            }
        }
    }

    #[test]
    fn count_below_a_power_of_two_is_exact() {
        let mut h = Histogram::default();
        for v in [0u64, 1, 3, 4, 7, 8, 15, 16, 17, 1000, 1023, 1024, 5000] {
            h.record(v);
        }
        for k in 0..16 {
            let limit = 1u64 << k;
            let want = [0u64, 1, 3, 4, 7, 8, 15, 16, 17, 1000, 1023, 1024, 5000]
                .iter()
                .filter(|&&v| v < limit)
                .count() as u64;
            assert_eq!(h.count_below(limit), want, "below {limit}");
        }
        assert_eq!(h.sum(), 8118);
    }

    #[test]
    fn registered_bytes_peak_tracks_the_maximum() {
        let mut s = Stats::default();
        s.registered_delta(0, 100);
        s.registered_delta(0, 50);
        s.registered_delta(150, 20);
        assert_eq!(s.registered_now, 20);
        assert_eq!(s.peak_registered_bytes, 150);
    }
}
