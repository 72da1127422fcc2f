//! The report of a run: `report.md` (tables a person reads), `report.json` (every figure, for
//! scripts) and `chart.svg` (throughput over time and the latency distributions, drawn by hand:
//! no plotting crate), written to `reports/<scenario>-<time>/`. With `--compare`, every
//! figure and percentile appears for both targets with the ratio primary/compare.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ledger::Integrity;
use crate::metrics::{rates, HistSummary, Sample};

/// One scalar result.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key.
    pub key: String,
    /// What it is.
    pub label: String,
    /// Unit.
    pub unit: String,
    /// Value.
    pub value: f64,
}

/// The results of one scenario against one target.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Short name (`etrn-relay`, `postfix`, an address).
    pub label: String,
    /// Address driven.
    pub target: String,
    /// Scalar figures.
    pub figures: Vec<Figure>,
    /// Latency histograms.
    pub hists: Vec<HistSummary>,
    /// Integrity (None: not checkable, see notes).
    pub integrity: Option<Integrity>,
    /// Whether the run failed its integrity check.
    pub failed: bool,
    /// Remarks: refusals, ETRN replies, what was not measurable.
    pub notes: Vec<String>,
    /// Counter samples every 100 ms.
    pub timeline: Vec<Sample>,
}

impl RunResult {
    /// An empty result.
    pub fn new(label: &str, target: &str) -> RunResult {
        RunResult {
            label: label.to_owned(),
            target: target.to_owned(),
            figures: Vec::new(),
            hists: Vec::new(),
            integrity: None,
            failed: false,
            notes: Vec::new(),
            timeline: Vec::new(),
        }
    }

    /// Adds a figure.
    pub fn fig(&mut self, key: &str, label: &str, unit: &str, value: f64) {
        self.figures.push(Figure {
            key: key.into(),
            label: label.into(),
            unit: unit.into(),
            value,
        });
    }

    /// A figure's value.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.key == key).map(|f| f.value)
    }

    fn hist(&self, key: &str) -> Option<&HistSummary> {
        self.hists.iter().find(|h| h.key == key)
    }
}

/// Describes a histogram key.
pub fn hist_label(key: &str) -> &'static str {
    match key {
        "txn_latency" => "transaction (MAIL to 250 after DATA)",
        "etrn_reply" => "ETRN reply (dial-in ETRNs)",
        "etrn_reply_during_flush" => "ETRN reply while the flush runs (probes)",
        "etrn_to_last_delivery" => "ETRN to last delivery, per node",
        "end_to_end" => "end to end (submitted to received)",
        _ => "latency",
    }
}

/// A short name of a histogram for the chart's legend.
pub fn short_label(key: &str) -> &'static str {
    match key {
        "txn_latency" => "transaction",
        "etrn_reply" => "ETRN reply",
        "etrn_reply_during_flush" => "ETRN reply (probes)",
        "etrn_to_last_delivery" => "ETRN to last delivery",
        "end_to_end" => "end to end",
        _ => "latency",
    }
}

/// Everything written to the report directory.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// UTC start time, RFC 3339.
    pub started: String,
    /// The command line.
    pub command: String,
    /// Machine description.
    pub machine: String,
    /// Parameters as `key=value`.
    pub parameters: Vec<(String, String)>,
    /// One result per target (the first is the primary, the second the `--compare` target).
    pub runs: Vec<RunResult>,
    /// primary/compare for every figure and percentile both runs have.
    pub ratios: Vec<(String, f64)>,
}

/// Computes primary/compare for every shared figure and histogram percentile.
pub fn ratios(runs: &[RunResult]) -> Vec<(String, f64)> {
    let [a, b] = runs else { return Vec::new() };
    let mut out = Vec::new();
    for f in &a.figures {
        if let Some(v) = b.get(&f.key) {
            if v != 0.0 && v.is_finite() && f.value.is_finite() {
                out.push((f.key.clone(), f.value / v));
            }
        }
    }
    for h in &a.hists {
        if let Some(o) = b.hist(&h.key) {
            if h.count == 0 || o.count == 0 {
                continue;
            }
            for (p, x, y) in [
                ("p50", h.p50, o.p50),
                ("p90", h.p90, o.p90),
                ("p99", h.p99, o.p99),
                ("p99.9", h.p999, o.p999),
                ("max", h.max, o.max),
            ] {
                if y > 0.0 {
                    out.push((format!("{}.{p}", h.key), x / y));
                }
            }
        }
    }
    out
}

/// A short machine description: CPU model, CPUs, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, v)| v.trim().to_string());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(String::new(), |kb| format!(", {:.1} GiB RAM", kb as f64 / 1048576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs ({model}){mem}, Linux {}", kernel.trim())
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Report {
    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# etrn-loadtest: `{}`\n", self.scenario);
        let _ = writeln!(s, "- started: {} (UTC)", self.started);
        let _ = writeln!(s, "- command: `{}`", self.command);
        let _ = writeln!(s, "- machine: {}", self.machine);
        let params: Vec<String> = self.parameters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(s, "- parameters: {}", params.join(", "));
        for r in &self.runs {
            let _ = writeln!(s, "- target `{}`: {}", r.label, r.target);
        }
        let two = self.runs.len() == 2;
        let ratio_of = |k: &str| self.ratios.iter().find(|(x, _)| x == k).map(|(_, v)| *v);
        let _ = writeln!(s, "\n## Figures\n");
        let mut head = "| figure | unit |".to_string();
        let mut rule = "|---|---|".to_string();
        for r in &self.runs {
            head.push_str(&format!(" {} |", r.label));
            rule.push_str("---:|");
        }
        if two {
            head.push_str(" ratio |");
            rule.push_str("---:|");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        let mut keys: Vec<(&str, &str, &str)> = Vec::new();
        for r in &self.runs {
            for f in &r.figures {
                if !keys.iter().any(|(k, _, _)| *k == f.key) {
                    keys.push((&f.key, &f.label, &f.unit));
                }
            }
        }
        for (k, label, unit) in keys {
            let mut row = format!("| {label} | {unit} |");
            for r in &self.runs {
                row.push_str(&format!(" {} |", r.get(k).map_or("-".into(), fmt_num)));
            }
            if two {
                row.push_str(&format!(" {} |", ratio_of(k).map_or("-".into(), |v| format!("{v:.2}"))));
            }
            let _ = writeln!(s, "{row}");
        }
        let _ = writeln!(s, "\n## Latency (ms)\n");
        let _ = writeln!(
            s,
            "| histogram | target | count | mean | p50 | p90 | p99 | p99.9 | max |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut hkeys: Vec<&str> = Vec::new();
        for r in &self.runs {
            for h in &r.hists {
                if !hkeys.contains(&h.key.as_str()) {
                    hkeys.push(&h.key);
                }
            }
        }
        for k in &hkeys {
            for r in &self.runs {
                if let Some(h) = r.hist(k).filter(|h| h.count > 0) {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        hist_label(k),
                        r.label,
                        h.count,
                        fmt_num(h.mean),
                        fmt_num(h.p50),
                        fmt_num(h.p90),
                        fmt_num(h.p99),
                        fmt_num(h.p999),
                        fmt_num(h.max)
                    );
                }
            }
            if two {
                let r = |p: &str| ratio_of(&format!("{k}.{p}")).map_or("-".into(), |v| format!("{v:.2}"));
                if ratio_of(&format!("{k}.p50")).is_some() {
                    let _ = writeln!(
                        s,
                        "| {} | ratio | | | {} | {} | {} | {} | {} |",
                        hist_label(k),
                        r("p50"),
                        r("p90"),
                        r("p99"),
                        r("p99.9"),
                        r("max")
                    );
                }
            }
        }
        let _ = writeln!(s, "\n## Integrity\n");
        let _ = writeln!(
            s,
            "| target | checked | delivered | lost | duplicates | corrupt | misrouted | delivered without ack | unrecognized | other runs | result |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in &self.runs {
            match &r.integrity {
                Some(i) => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        r.label,
                        i.checked,
                        i.delivered,
                        i.lost,
                        i.duplicates,
                        i.corrupt,
                        i.misrouted,
                        i.unacked_delivered,
                        i.unrecognized,
                        i.foreign,
                        if r.failed { "**FAILED**" } else { "ok" }
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "| {} | - | - | - | - | - | - | - | - | - | not checked (see notes) |",
                        r.label
                    );
                }
            }
        }
        for r in &self.runs {
            if !r.notes.is_empty() {
                let _ = writeln!(s, "\n### Notes: {}\n", r.label);
                for n in &r.notes {
                    let _ = writeln!(s, "- {n}");
                }
            }
        }
        let _ = writeln!(s, "\n![throughput and latency](chart.svg)");
        s
    }

    /// Writes report.md, report.json and chart.svg into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json)?;
        std::fs::write(dir.join("chart.svg"), svg(&self.scenario, &self.runs))?;
        Ok(())
    }
}

/// `reports/<scenario>-<YYYYmmdd-HHMMSS>` under `base`, made unique.
pub fn report_dir(base: &Path, scenario: &str, unix: u64) -> PathBuf {
    let (y, mo, d, h, mi, se) = crate::msg::civil(unix);
    let stem = format!("{scenario}-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{se:02}");
    let mut p = base.join(&stem);
    let mut n = 2;
    while p.exists() {
        p = base.join(format!("{stem}-{n}"));
        n += 1;
    }
    p
}

/// RFC 3339 UTC time.
pub fn rfc3339(unix: u64) -> String {
    let (y, mo, d, h, mi, se) = crate::msg::civil(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{se:02}Z")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A named polyline of the throughput chart: (name, points, dashed, run index).
type Series = (String, Vec<(f64, f64)>, bool, usize);

/// Histogram keys in chart-colour order.
const HIST_KEYS: [&str; 5] = [
    "txn_latency",
    "etrn_reply",
    "etrn_reply_during_flush",
    "etrn_to_last_delivery",
    "end_to_end",
];

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// A "nice" upper bound for an axis.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let e = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * e >= v {
            return m * e;
        }
    }
    10.0 * e
}

/// The chart: throughput over time (top) and latency percentile distributions (bottom).
pub fn svg(scenario: &str, runs: &[RunResult]) -> String {
    let (w, h) = (960.0f64, 720.0f64);
    let (left, right) = (80.0, 270.0);
    let pw = w - left - right;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="16" text-anchor="middle">etrn-loadtest {}: throughput and latency</text>"#,
        w / 2.0,
        esc(scenario)
    );

    // ---- panel 1: throughput
    let (top, ph) = (50.0, 250.0);
    let series: Vec<Series> = runs
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| {
            let rs = rates(&r.timeline);
            let t0 = r.timeline.first().map_or(0.0, |s| s.t);
            let acc: Vec<(f64, f64)> = rs.iter().map(|(t, a, _)| (t - t0, *a)).collect();
            let del: Vec<(f64, f64)> = rs.iter().map(|(t, _, d)| (t - t0, *d)).collect();
            let mut v = vec![(format!("{} accepted/s", r.label), acc, false)];
            if del.iter().any(|(_, d)| *d > 0.0) {
                v.push((format!("{} delivered/s", r.label), del, true));
            }
            v.into_iter().map(move |(n, p, d)| (n, p, d, ri))
        })
        .collect();
    let tmax = nice_max(
        series
            .iter()
            .flat_map(|(_, p, _, _)| p.iter().map(|(t, _)| *t))
            .fold(0.0, f64::max),
    );
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|(_, p, _, _)| p.iter().map(|(_, v)| *v))
            .fold(0.0, f64::max),
    );
    axes(&mut s, (left, top, pw, ph), tmax, ymax, "time (s)", "messages/s");
    for (i, (name, pts, dashed, ri)) in series.iter().enumerate() {
        // one colour per target; delivered dashed
        let c = COLORS[(ri * 3) % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", left + t / tmax * pw, top + ph - v / ymax * ph))
            .collect();
        let dash = if *dashed { r#" stroke-dasharray="6 3""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.8"{dash} points="{}"/>"#,
            path.join(" ")
        );
        legend(&mut s, left + pw + 15.0, top + 10.0 + 18.0 * i as f64, c, *dashed, name);
    }

    // ---- panel 2: latency distribution, log y
    let top2 = 390.0;
    let ph2 = 270.0;
    let curves: Vec<(String, &HistSummary, bool)> = runs
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| {
            r.hists
                .iter()
                .filter(|h| h.count > 0 && !h.curve.is_empty())
                .map(move |h| (format!("{} {}", r.label, short_label(&h.key)), h, ri > 0))
        })
        .collect();
    let vmax = curves
        .iter()
        .flat_map(|(_, h, _)| h.curve.iter().map(|p| p.1))
        .fold(0.001, f64::max);
    let vmin = curves
        .iter()
        .flat_map(|(_, h, _)| h.curve.iter().map(|p| p.1))
        .fold(f64::INFINITY, f64::min)
        .min(vmax);
    let (lo, hi) = (
        vmin.max(0.001).log10().floor(),
        vmax.log10().ceil().max(vmin.max(0.001).log10().floor() + 1.0),
    );
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top2}" width="{pw}" height="{ph2}" fill="none" stroke="#444"/>"##
    );
    for (x, label) in [(0.0, "0%"), (1.0, "90%"), (2.0, "99%"), (3.0, "99.9%"), (4.0, "99.99%")] {
        let px = left + x / 4.0 * pw;
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{top2}" x2="{px:.1}" y2="{}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            top2 + ph2,
            top2 + ph2 + 16.0
        );
    }
    let mut e = lo;
    while e <= hi {
        let py = top2 + ph2 - (e - lo) / (hi - lo) * ph2;
        let v = 10f64.powf(e);
        let label = if v >= 1.0 { format!("{v:.0}") } else { format!("{v}") };
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0
        );
        e += 1.0;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="20" y="{}" transform="rotate(-90 20 {})" text-anchor="middle">latency (ms, log)</text>"#,
        left + pw / 2.0,
        top2 + ph2 + 34.0,
        top2 + ph2 / 2.0,
        top2 + ph2 / 2.0
    );
    for (i, (name, hs, dashed)) in curves.iter().enumerate() {
        // one colour per histogram; the compare target dashed
        let c = COLORS[HIST_KEYS.iter().position(|k| *k == hs.key).unwrap_or(5) % COLORS.len()];
        let dashed = *dashed;
        let path: Vec<String> = hs
            .curve
            .iter()
            .map(|(x, v)| {
                let y = (v.max(0.001).log10() - lo) / (hi - lo);
                format!("{:.1},{:.1}", left + x / 4.0 * pw, top2 + ph2 - y.clamp(0.0, 1.0) * ph2)
            })
            .collect();
        let dash = if dashed { r#" stroke-dasharray="6 3""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.8"{dash} points="{}"/>"#,
            path.join(" ")
        );
        legend(&mut s, left + pw + 15.0, top2 + 10.0 + 18.0 * i as f64, c, dashed, name);
    }
    s.push_str("</svg>\n");
    s
}

/// A linear plot frame at (left, top, width, height) with 5 grid lines each way.
fn axes(s: &mut String, frame: (f64, f64, f64, f64), xmax: f64, ymax: f64, xl: &str, yl: &str) {
    let (left, top, pw, ph) = frame;
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let px = left + f * pw;
        let py = top + ph - f * ph;
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 16.0,
            fmt_num(f * xmax)
        );
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0,
            fmt_num(f * ymax)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{xl}</text><text x="20" y="{}" transform="rotate(-90 20 {})" text-anchor="middle">{yl}</text>"#,
        left + pw / 2.0,
        top + ph + 34.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
}

fn legend(s: &mut String, x: f64, y: f64, color: &str, dashed: bool, name: &str) {
    let dash = if dashed { r#" stroke-dasharray="6 3""# } else { "" };
    let _ = writeln!(
        s,
        r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
        x + 24.0,
        x + 30.0,
        y + 4.0,
        esc(name)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, rate: f64) -> RunResult {
        let mut r = RunResult::new(label, "127.0.0.1:1");
        r.fig("accept_msgs_per_s", "accept rate", "msg/s", rate);
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in 1..100u64 {
            h.record(v * 100).unwrap();
        }
        r.hists.push(HistSummary::of("txn_latency", &h));
        r.timeline = (0u32..30)
            .map(|i| Sample {
                t: f64::from(i) * 0.1,
                acked: u64::from(i) * 50,
                acked_bytes: 0,
                delivered: u64::from(i) * 10,
            })
            .collect();
        r.integrity = Some(Integrity::default());
        r
    }

    #[test]
    fn ratios_and_outputs() {
        let runs = vec![run("relay", 5000.0), run("postfix <x>", 500.0)];
        let ra = ratios(&runs);
        assert_eq!(ra[0], ("accept_msgs_per_s".to_string(), 10.0));
        assert!(ra
            .iter()
            .any(|(k, v)| k == "txn_latency.p99" && (*v - 1.0).abs() < 1e-9));
        let rep = Report {
            scenario: "accept".into(),
            started: rfc3339(0),
            command: "etrn-loadtest accept".into(),
            machine: machine(),
            parameters: vec![("sessions".into(), "20".into())],
            runs,
            ratios: ra,
        };
        let md = rep.markdown();
        assert!(md.contains("| accept rate | msg/s | 5000 | 500 | 10.00 |"), "{md}");
        let svg = svg("accept", &rep.runs);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("postfix &lt;x&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 6);
        let dir = tempfile::tempdir().unwrap();
        let d = report_dir(dir.path(), "accept", 0);
        assert!(d.ends_with("accept-19700101-000000"));
        rep.write(&d).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("report.json")).unwrap()).unwrap();
        assert_eq!(json["runs"][0]["figures"][0]["value"], 5000.0);
        assert!(d.join("chart.svg").exists() && d.join("report.md").exists());
    }
}
