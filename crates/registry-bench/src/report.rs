//! Measurements: histograms, ratios, one JSON line per measurement and the Markdown table.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies of one side, in nanoseconds.
pub struct Lat {
    hist: Histogram<u64>,
}

impl Default for Lat {
    fn default() -> Self {
        Lat::new()
    }
}

impl Lat {
    /// An empty histogram from 1 ns to 1 hour, 3 significant digits.
    pub fn new() -> Lat {
        Lat {
            hist: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .unwrap_or_else(|e| panic!("histogram bounds: {e}")),
        }
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(ns);
    }

    /// The summary in `unit`.
    pub fn summary(&self, unit: Unit) -> Summary {
        let f = unit.per_ns();
        Summary {
            n: self.hist.len(),
            p50: self.hist.value_at_quantile(0.5) as f64 * f,
            p99: self.hist.value_at_quantile(0.99) as f64 * f,
            mean: self.hist.mean() * f,
            max: self.hist.max() as f64 * f,
        }
    }
}

/// The unit a measurement is shown in.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Bytes.
    Bytes,
    /// A count.
    Count,
}

impl Unit {
    fn per_ns(self) -> f64 {
        match self {
            Unit::Us => 1e-3,
            Unit::Ms => 1e-6,
            Unit::Bytes | Unit::Count => 1.0,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Unit::Us => "µs",
            Unit::Ms => "ms",
            Unit::Bytes => "B",
            Unit::Count => "",
        }
    }
}

/// p50, p99, mean and max of one side.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    /// Samples.
    pub n: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// One value (a memory size, a count): every statistic equals it.
    pub fn single(v: f64) -> Summary {
        Summary {
            n: 1,
            p50: v,
            p99: v,
            mean: v,
            max: v,
        }
    }

    /// Percentiles of signed samples (nearest rank), e.g. a paired difference.
    pub fn of_signed(values: &[f64]) -> Summary {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Summary {
            n: v.len() as u64,
            p50: at(0.5),
            p99: at(0.99),
            mean: if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            },
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// One measurement: ours against raw (when there is a raw side).
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// `zookeeper` or `etcd`.
    pub backend: &'static str,
    /// The workload (`register`, `notify`, ...).
    pub workload: &'static str,
    /// What is measured within the workload.
    pub metric: String,
    /// Unit of the summaries.
    pub unit: Unit,
    /// The size of the workload (entries, subscriptions, ...).
    pub size: u64,
    /// How the sides were run (ABAB block size, paired, iterations).
    pub method: String,
    /// Ours.
    pub ours: Summary,
    /// The raw client doing the minimal operations; `None` when there is no raw counterpart.
    pub raw: Option<Summary>,
    /// ours / raw at p50.
    pub ratio_p50: Option<f64>,
    /// ours / raw at p99.
    pub ratio_p99: Option<f64>,
    /// The target for this measurement, if any.
    pub target: Option<String>,
    /// Whether the target is met (`None`: no target).
    pub meets: Option<bool>,
    /// Anything a reader must know to read the numbers.
    pub note: String,
    /// Set when the measurement could not be made: what went wrong (the numbers are then
    /// zero and mean nothing).
    pub error: Option<String>,
}

impl Measurement {
    /// A measurement of ours against raw; ratios are computed here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: &'static str,
        workload: &'static str,
        metric: impl Into<String>,
        unit: Unit,
        size: u64,
        method: impl Into<String>,
        ours: Summary,
        raw: Option<Summary>,
    ) -> Measurement {
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        Measurement {
            backend,
            workload,
            metric: metric.into(),
            unit,
            size,
            method: method.into(),
            ratio_p50: raw.and_then(|r| ratio(ours.p50, r.p50)),
            ratio_p99: raw.and_then(|r| ratio(ours.p99, r.p99)),
            ours,
            raw,
            target: None,
            meets: None,
            note: String::new(),
            error: None,
        }
    }

    /// A measurement that could not be made, and why. It counts as a missed target
    /// (`works`), and the run exits with an error after writing its report.
    pub fn failed(
        backend: &'static str,
        workload: &'static str,
        metric: impl Into<String>,
        size: u64,
        method: impl Into<String>,
        error: impl Into<String>,
    ) -> Measurement {
        let none = Summary {
            n: 0,
            p50: 0.0,
            p99: 0.0,
            mean: 0.0,
            max: 0.0,
        };
        let mut m = Measurement::new(
            backend,
            workload,
            metric,
            Unit::Count,
            size,
            method,
            none,
            None,
        )
        .target("works", false);
        m.error = Some(error.into());
        m
    }

    /// Sets the target text and whether it is met.
    pub fn target(mut self, text: &str, meets: bool) -> Measurement {
        self.target = Some(text.to_owned());
        self.meets = Some(meets);
        self
    }

    /// Sets the note.
    pub fn note(mut self, note: impl Into<String>) -> Measurement {
        self.note = note.into();
        self
    }

    /// One line for the console.
    pub fn console_line(&self) -> String {
        if let Some(e) = &self.error {
            return format!(
                "{:<9} {:<16} {:<34} FAILED: {e}",
                self.backend, self.workload, self.metric
            );
        }
        let u = self.unit.label();
        let mut s = format!(
            "{:<9} {:<16} {:<34} ours p50 {:>10} p99 {:>10}",
            self.backend,
            self.workload,
            self.metric,
            fmt_num(self.ours.p50, u),
            fmt_num(self.ours.p99, u)
        );
        if let Some(r) = &self.raw {
            let _ = write!(
                s,
                " | raw p50 {:>10} p99 {:>10} | ratio p50 {} p99 {}",
                fmt_num(r.p50, u),
                fmt_num(r.p99, u),
                fmt_ratio(self.ratio_p50),
                fmt_ratio(self.ratio_p99)
            );
        }
        if let (Some(t), Some(m)) = (&self.target, self.meets) {
            let _ = write!(s, " | target {t}: {}", if m { "met" } else { "MISSED" });
        }
        s
    }
}

fn fmt_num(v: f64, unit: &str) -> String {
    let n = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        n
    } else {
        format!("{n} {unit}")
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×"))
        .unwrap_or_else(|| "–".to_owned())
}

/// Appends every measurement as one JSON line to `path` (with the run's id and settings).
pub fn write_jsonl(
    path: &Path,
    run: &serde_json::Value,
    all: &[Measurement],
) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    for m in all {
        let mut v = serde_json::to_value(m)?;
        if let (Some(obj), Some(run)) = (v.as_object_mut(), run.as_object()) {
            for (k, val) in run {
                obj.insert(k.clone(), val.clone());
            }
        }
        writeln!(f, "{}", serde_json::to_string(&v)?)?;
    }
    Ok(())
}

/// The Markdown table of a run.
pub fn markdown(header: &str, all: &[Measurement]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{header}\n");
    let _ = writeln!(
        s,
        "| backend | workload | metric | size | method | ours p50 | ours p99 | raw p50 | raw p99 | ratio p50 | ratio p99 | target | met |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for m in all {
        if m.error.is_some() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | **failed** (see notes) | | | | | | {} | **no** |",
                m.backend,
                m.workload,
                m.metric,
                m.size,
                m.method,
                m.target.as_deref().unwrap_or("")
            );
            continue;
        }
        let u = m.unit.label();
        let (rp50, rp99) = match &m.raw {
            Some(r) => (fmt_num(r.p50, u), fmt_num(r.p99, u)),
            None => ("–".to_owned(), "–".to_owned()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.backend,
            m.workload,
            m.metric,
            m.size,
            m.method,
            fmt_num(m.ours.p50, u),
            fmt_num(m.ours.p99, u),
            rp50,
            rp99,
            fmt_ratio(m.ratio_p50),
            fmt_ratio(m.ratio_p99),
            m.target.as_deref().unwrap_or(""),
            match m.meets {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        );
    }
    let notes: Vec<&Measurement> = all
        .iter()
        .filter(|m| !m.note.is_empty() || m.error.is_some())
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for m in notes {
            match (&m.error, m.note.is_empty()) {
                (Some(e), true) => {
                    let _ = writeln!(
                        s,
                        "- {} {} {}: FAILED: {e}",
                        m.backend, m.workload, m.metric
                    );
                }
                (Some(e), false) => {
                    let _ = writeln!(
                        s,
                        "- {} {} {}: FAILED: {e} ({})",
                        m.backend, m.workload, m.metric, m.note
                    );
                }
                (None, _) => {
                    let _ = writeln!(s, "- {} {} {}: {}", m.backend, m.workload, m.metric, m.note);
                }
            }
        }
    }
    s
}
