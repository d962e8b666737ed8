//! Counters, latency histograms and samples of a process's memory and CPU.

use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Microseconds since the epoch: the clock senders stamp into payloads and receivers read.
/// Senders and receivers run on the same machine, so the clocks agree.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The measurement window, in send timestamps. Messages sent before it (warm-up) or after it
/// are received but not counted, so start-up and shutdown effects stay out of the figures.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start_us: u64,
    pub end_us: u64,
}

impl Window {
    pub fn contains(&self, t_us: u64) -> bool {
        (self.start_us..self.end_us).contains(&t_us)
    }

    pub fn secs(&self) -> f64 {
        (self.end_us.saturating_sub(self.start_us)) as f64 / 1e6
    }
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits; `saturating_record` clamps outliers.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

/// What one receiving task saw.
pub struct Recorder {
    pub latency: Histogram<u64>,
    /// Messages whose send stamp lies in the window.
    pub in_window: u64,
    /// All stamped messages, warm-up included.
    pub received: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: histogram(),
            in_window: 0,
            received: 0,
            errors: 0,
            error_samples: Vec::new(),
        }
    }
}

impl Recorder {
    pub fn stamp(&mut self, t_us: u64, window: &Window) {
        self.received += 1;
        if window.contains(t_us) {
            self.in_window += 1;
            self.latency
                .saturating_record(now_us().saturating_sub(t_us).max(1));
        }
    }

    pub fn error(&mut self, what: impl Into<String>) {
        self.errors += 1;
        // A handful of examples is enough to diagnose; thousands would drown the report.
        if self.error_samples.len() < 5 {
            self.error_samples.push(what.into());
        }
    }

    pub fn merge(&mut self, other: Recorder) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.in_window += other.in_window;
        self.received += other.received;
        self.errors += other.errors;
        for e in other.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(e);
            }
        }
    }
}

/// p50/p95/p99/p99.9/max in microseconds.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p95_us": h.value_at_quantile(0.95),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": h.mean().round(),
    })
}

/// One reading of /proc/<pid>: resident memory and CPU time consumed so far.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub cpu_ticks: u64,
    pub at_us: u64,
}

/// The watched process (if any) and this generator, read at the same moment.
pub fn sample_worker_and_self(worker: Option<i32>) -> (Option<ProcSample>, Option<ProcSample>) {
    (worker.and_then(sample), sample(std::process::id() as i32))
}

pub fn sample(pid: i32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after its closing parenthesis are
    // fixed. utime and stime are fields 14 and 15, i.e. 12th and 13th after the parenthesis.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ProcSample {
        rss_kib,
        cpu_ticks: utime + stime,
        at_us: now_us(),
    })
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// RSS before/after and CPU use between two samples (100 % = one core busy).
pub fn proc_delta_json(before: Option<ProcSample>, after: Option<ProcSample>) -> Value {
    match (before, after) {
        (Some(b), Some(a)) => {
            let secs = (a.at_us.saturating_sub(b.at_us)) as f64 / 1e6;
            let cpu_secs = (a.cpu_ticks.saturating_sub(b.cpu_ticks)) as f64 / ticks_per_sec();
            json!({
                "rss_before_kib": b.rss_kib,
                "rss_after_kib": a.rss_kib,
                "cpu_seconds": round2(cpu_secs),
                "cpu_percent": if secs > 0.0 { round2(100.0 * cpu_secs / secs) } else { 0.0 },
            })
        }
        _ => json!(null),
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// CPU time the process spent per counted event (e.g. per delivery), in microseconds: a cost
/// that depends far less on the machine's other load than throughput does.
pub fn cpu_us_per(before: Option<ProcSample>, after: Option<ProcSample>, events: u64) -> Value {
    match (before, after) {
        (Some(b), Some(a)) if events > 0 => {
            let cpu_us = (a.cpu_ticks.saturating_sub(b.cpu_ticks)) as f64 / ticks_per_sec() * 1e6;
            json!(round2(cpu_us / events as f64))
        }
        _ => json!(null),
    }
}
