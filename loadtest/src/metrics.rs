//! What the main thread does while the executors work: sample the ledger's counters every
//! 100 ms (the throughput timeline of the chart), print the live progress line on stderr, and
//! turn histograms into the percentile summaries of the report.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::pool::Shared;

/// One sample of the counters.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    /// Seconds since the run's epoch.
    pub t: f64,
    /// Messages acknowledged so far.
    pub acked: u64,
    /// Octets acknowledged so far.
    pub acked_bytes: u64,
    /// Acknowledged messages delivered to the sinks so far.
    pub delivered: u64,
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistSummary {
    /// Stable key (`txn_latency`, `etrn_reply`, ...).
    pub key: String,
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
    /// (x, ms) points of the percentile curve, x = -log10(1 - q) for the chart.
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

impl HistSummary {
    /// Summarizes a histogram of microseconds.
    pub fn of(key: &str, h: &Histogram<u64>) -> HistSummary {
        let ms = |us: u64| us as f64 / 1000.0;
        let curve = if h.is_empty() {
            Vec::new()
        } else {
            (0..=80)
                .map(|i| {
                    let x = f64::from(i) * 0.05;
                    let q = 1.0 - 10f64.powf(-x);
                    (x, ms(h.value_at_quantile(q)).max(0.001))
                })
                .collect()
        };
        HistSummary {
            key: key.to_owned(),
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            curve,
        }
    }
}

/// Samples the counters and prints progress.
pub struct Monitor<'a> {
    sh: &'a Shared,
    label: String,
    /// Samples so far.
    pub timeline: Vec<Sample>,
    last_sample: Instant,
    last_print: Instant,
    tty: bool,
    quiet: bool,
    /// What the run is doing (shown in the progress line).
    pub phase: &'static str,
    /// The spawned relay's process, watched for an early exit.
    pub relay_pid: Option<u32>,
    /// Set when the watched relay process is gone.
    pub relay_gone: bool,
}

/// Whether process `pid` has exited (gone, or a zombie waiting to be reaped).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // state is the first field after the parenthesized command name
        Ok(s) => s
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

impl<'a> Monitor<'a> {
    /// A monitor for a run.
    pub fn new(sh: &'a Shared, label: &str, quiet: bool) -> Monitor<'a> {
        let now = Instant::now();
        Monitor {
            sh,
            label: label.to_owned(),
            timeline: Vec::new(),
            last_sample: now - Duration::from_secs(1),
            last_print: now,
            tty: std::io::stderr().is_terminal(),
            quiet,
            phase: "start",
            relay_pid: None,
            relay_gone: false,
        }
    }

    fn sample_now(&mut self) {
        let l = &self.sh.ledger;
        self.timeline.push(Sample {
            t: l.epoch.elapsed().as_secs_f64(),
            acked: l.acked.load(Relaxed),
            acked_bytes: l.acked_bytes.load(Relaxed),
            delivered: l.delivered_to_dialup(),
        });
    }

    /// Takes a sample if 100 ms passed, prints progress if a second passed.
    pub fn tick(&mut self) {
        if self.last_sample.elapsed() >= Duration::from_millis(100) {
            self.last_sample = Instant::now();
            self.sample_now();
        }
        if self.last_print.elapsed() >= Duration::from_secs(1) {
            self.last_print = Instant::now();
            self.print();
            if let Some(pid) = self.relay_pid {
                if !self.relay_gone && process_gone(pid) {
                    self.relay_gone = true;
                    // let the sessions give up instead of retrying against nothing
                    self.sh.ledger.stop_submit.store(true, Relaxed);
                }
            }
        }
    }

    /// Rate of a counter over the last second of samples.
    fn rate(&self, f: impl Fn(&Sample) -> u64) -> f64 {
        let Some(last) = self.timeline.last() else { return 0.0 };
        let first = self
            .timeline
            .iter()
            .rev()
            .find(|s| last.t - s.t >= 1.0)
            .or(self.timeline.first())
            .copied()
            .unwrap_or(*last);
        if last.t - first.t <= 0.0 {
            return 0.0;
        }
        (f(last) - f(&first)) as f64 / (last.t - first.t)
    }

    fn print(&self) {
        if self.quiet {
            return;
        }
        let l = &self.sh.ledger;
        let (p50, p99) = {
            let h = l.hists.lock().unwrap_or_else(|e| e.into_inner());
            (
                h.txn.value_at_quantile(0.5) as f64 / 1000.0,
                h.txn.value_at_quantile(0.99) as f64 / 1000.0,
            )
        };
        let line = format!(
            "[{}] {:<7} {:6.1}s | acked {}/{} {:.0}/s txn p50 {:.2} p99 {:.2} ms | delivered {}/{} {:.0}/s | rej {} err {}",
            self.label,
            self.phase,
            l.epoch.elapsed().as_secs_f64(),
            l.acked.load(Relaxed),
            l.total,
            self.rate(|s| s.acked),
            p50,
            p99,
            l.delivered_to_dialup(),
            l.expected_deliveries(),
            self.rate(|s| s.delivered),
            l.rejected.load(Relaxed),
            l.errors.load(Relaxed),
        );
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(e, "{line}");
        }
        let _ = e.flush();
    }

    /// Ends the progress line (on a terminal) and takes a last sample.
    pub fn finish(&mut self) {
        self.sample_now();
        if self.quiet {
            return;
        }
        self.print();
        if self.tty {
            eprintln!();
        }
    }
}

/// Counts of a timeline turned into rates per bucket: (bucket start s, msgs/s acked, msgs/s
/// delivered). The bucket width makes at most about 100 buckets, at least 100 ms.
pub fn rates(timeline: &[Sample]) -> Vec<(f64, f64, f64)> {
    let (Some(first), Some(last)) = (timeline.first(), timeline.last()) else {
        return Vec::new();
    };
    let span = (last.t - first.t).max(0.1);
    let nice = [
        0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ];
    let width = nice.iter().copied().find(|w| span / w <= 100.0).unwrap_or(600.0);
    let at = |t: f64| -> (f64, f64) {
        // linear interpolation of the cumulative counters at time t
        let i = timeline.partition_point(|s| s.t < t);
        if i == 0 {
            return (timeline[0].acked as f64, timeline[0].delivered as f64);
        }
        if i >= timeline.len() {
            let s = timeline[timeline.len() - 1];
            return (s.acked as f64, s.delivered as f64);
        }
        let (a, b) = (timeline[i - 1], timeline[i]);
        let f = if b.t > a.t { (t - a.t) / (b.t - a.t) } else { 1.0 };
        (
            a.acked as f64 + f * (b.acked as f64 - a.acked as f64),
            a.delivered as f64 + f * (b.delivered as f64 - a.delivered as f64),
        )
    };
    let mut out = Vec::new();
    let mut t = first.t;
    while t < last.t {
        let end = (t + width).min(last.t);
        let (a0, d0) = at(t);
        let (a1, d1) = at(end);
        let w = end - t;
        if w > 1e-9 {
            out.push((t, (a1 - a0) / w, (d1 - d0) / w));
        }
        t += width;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_percentiles() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let s = HistSummary::of("x", &h);
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 5.0).abs() < 0.01, "{}", s.p50);
        assert!((s.p99 - 9.9).abs() < 0.02, "{}", s.p99);
        assert!((s.max - 10.0).abs() < 0.01);
        assert_eq!(s.curve.len(), 81);
        assert!(s.curve.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn process_liveness() {
        assert!(!process_gone(std::process::id()));
        assert!(process_gone(u32::MAX - 7));
    }

    #[test]
    fn rates_from_timeline() {
        let tl: Vec<Sample> = (0u32..=20)
            .map(|i| Sample {
                t: f64::from(i) * 0.1,
                acked: u64::from(i) * 100,
                acked_bytes: 0,
                delivered: 0,
            })
            .collect();
        let r = rates(&tl);
        assert!(!r.is_empty());
        assert!(
            r.iter().all(|(_, a, d)| (*a - 1000.0).abs() < 1e-6 && *d == 0.0),
            "{r:?}"
        );
        assert!(rates(&[]).is_empty());
    }
}
