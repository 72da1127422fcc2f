//! Smoke runs of `etrn-loadtest`: each scenario briefly against a relay it spawns itself (the
//! workspace's `etrn-relay` binary, built here if it is missing or stale), with the integrity
//! check; `--compare` against a second target; and a deliberately faulty target (drops,
//! damages or duplicates a message) that must make the harness report it and exit non-zero.
//! The loopback guard is checked too. Needs dnsmasq (apt-get install dnsmasq-base).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The runs share two cores; one at a time keeps each well under its time budget.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn loadtest_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_etrn-loadtest"))
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Whether a binary is older than any file its cargo dep-info (`<bin>.d`) lists.
fn stale(bin: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(bin) else { return true };
    let Ok(built) = meta.modified() else { return true };
    let Ok(dep) = std::fs::read_to_string(bin.with_extension("d")) else {
        return false;
    };
    let deps = dep.split_once(": ").map_or("", |(_, d)| d);
    deps.split_whitespace()
        .filter_map(|p| std::fs::metadata(p).ok()?.modified().ok())
        .any(|m| m > built)
}

/// The relay binary: `ETRN_RELAY_BIN`, else `etrn-relay` beside this test's `etrn-loadtest`
/// (the workspace target dir), built with `cargo build -p etrn-relay` when missing or stale.
fn relay_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("ETRN_RELAY_BIN") {
            let p = PathBuf::from(p);
            assert!(p.exists(), "ETRN_RELAY_BIN={} does not exist", p.display());
            return p;
        }
        let lt = loadtest_bin();
        let profile_dir = lt.parent().unwrap().to_path_buf();
        let bin = profile_dir.join("etrn-relay");
        if !bin.exists() || stale(&bin) {
            let target_dir = profile_dir.parent().unwrap().to_path_buf();
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "etrn-relay", "--manifest-path"])
                .arg(workspace_dir().join("Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target_dir);
            if release {
                cmd.arg("--release");
            }
            let out = cmd.output().expect("run cargo build -p etrn-relay");
            assert!(
                out.status.success(),
                "cargo build -p etrn-relay failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(bin.exists(), "no relay binary at {}", bin.display());
        bin
    })
    .clone()
}

fn require_dnsmasq() {
    let found = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
        .iter()
        .any(|p| Path::new(p).exists());
    assert!(
        found,
        "dnsmasq is missing: apt-get install dnsmasq-base (or scripts/install-test-deps.sh)"
    );
}

struct Run {
    out: Output,
    report: serde_json::Value,
    markdown: String,
    took: Duration,
    _dir: tempfile::TempDir,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    fn run(&self, i: usize) -> &serde_json::Value {
        &self.report["runs"][i]
    }
    fn figure(&self, i: usize, key: &str) -> Option<f64> {
        self.run(i)["figures"].as_array()?.iter().find(|f| f["key"] == key)?["value"].as_f64()
    }
    fn integrity(&self, i: usize, field: &str) -> u64 {
        self.run(i)["integrity"][field]
            .as_u64()
            .unwrap_or_else(|| panic!("no integrity.{field} in run {i}: {}", self.run(i)["integrity"]))
    }
    fn hist_count(&self, i: usize, key: &str) -> u64 {
        self.run(i)["hists"]
            .as_array()
            .and_then(|a| a.iter().find(|h| h["key"] == key))
            .and_then(|h| h["count"].as_u64())
            .unwrap_or(0)
    }
    fn explain(&self) -> String {
        format!(
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code(),
            self.stdout(),
            self.stderr()
        )
    }
}

/// Runs the harness with `args` plus a temporary report directory; reads the report back.
fn loadtest(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(loadtest_bin());
    cmd.args(args).arg("--report-dir").arg(dir.path()).arg("-q");
    if args.contains(&"--spawn-relay") {
        cmd.arg("--relay-bin").arg(relay_bin());
    }
    let t0 = Instant::now();
    let out = cmd.output().expect("run etrn-loadtest");
    let took = t0.elapsed();
    let sub = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir());
    let (report, markdown) = match &sub {
        Some(d) => {
            for f in ["report.md", "report.json", "chart.svg"] {
                assert!(d.join(f).exists(), "{f} missing in {}", d.display());
            }
            let svg = std::fs::read_to_string(d.join("chart.svg")).unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            (
                serde_json::from_slice(&std::fs::read(d.join("report.json")).unwrap()).unwrap(),
                std::fs::read_to_string(d.join("report.md")).unwrap(),
            )
        }
        None => (serde_json::Value::Null, String::new()),
    };
    Run {
        out,
        report,
        markdown,
        took,
        _dir: dir,
    }
}

fn assert_clean(r: &Run, expected: u64) {
    assert_eq!(r.code(), 0, "{}", r.explain());
    assert_eq!(r.integrity(0, "checked"), expected, "{}", r.markdown);
    assert_eq!(r.integrity(0, "delivered"), expected, "{}", r.markdown);
    for f in ["lost", "duplicates", "corrupt", "misrouted", "unrecognized"] {
        assert_eq!(r.integrity(0, f), 0, "{f}: {}", r.markdown);
    }
    assert!(r.took < Duration::from_secs(20), "took {:?}", r.took);
}

#[test]
fn accept_scenario_holds_then_verifies_every_message() {
    require_dnsmasq();
    let _g = serial();
    let r = loadtest(&["accept", "--spawn-relay", "-s", "4", "-m", "300", "-n", "3"]);
    assert_clean(&r, 300);
    assert_eq!(r.figure(0, "acked"), Some(300.0));
    assert_eq!(r.figure(0, "held_listed"), Some(300.0), "{}", r.markdown);
    assert_eq!(r.figure(0, "verify_etrn_count_mismatches"), Some(0.0), "{}", r.markdown);
    assert!(r.figure(0, "accept_msgs_per_s").unwrap() > 0.0);
    assert_eq!(r.hist_count(0, "txn_latency"), 300);
    assert_eq!(r.hist_count(0, "etrn_reply"), 3);
    assert!(r.stdout().contains("## Integrity"), "{}", r.stdout());
}

#[test]
fn flush_scenario_with_probes() {
    require_dnsmasq();
    let _g = serial();
    let r = loadtest(&[
        "flush",
        "--spawn-relay",
        "-s",
        "4",
        "-m",
        "2000",
        "-n",
        "2",
        "--probes",
        "20",
        "--probe-interval-ms",
        "20",
    ]);
    assert_clean(&r, 2000);
    assert!(r.figure(0, "flush_msgs_per_s").is_some(), "{}", r.markdown);
    assert_eq!(r.figure(0, "etrn_count_mismatches"), Some(0.0));
    assert_eq!(r.hist_count(0, "etrn_to_last_delivery"), 2);
    assert_eq!(r.hist_count(0, "end_to_end"), 2000);
    // The probes ran on their own thread and every ETRN they sent got a 2xx.
    assert!(
        r.markdown.contains("ETRN probes: timed on a thread of their own"),
        "{}",
        r.markdown
    );
    assert!(r.hist_count(0, "etrn_reply_during_flush") > 0, "{}", r.markdown);
    assert!(!r.markdown.contains("probe ETRNs were not answered"), "{}", r.markdown);
}

#[test]
fn flush_with_cram_md5_and_plain_auth() {
    require_dnsmasq();
    let _g = serial();
    for mech in ["cram-md5", "plain"] {
        let r = loadtest(&[
            "flush",
            "--spawn-relay",
            "-s",
            "2",
            "-m",
            "200",
            "-n",
            "2",
            "--auth",
            mech,
        ]);
        assert_clean(&r, 200);
        assert!(r.markdown.contains("no ETRN probes"), "{}", r.markdown);
    }
}

#[test]
fn mixed_scenario_delivers_while_submitting() {
    require_dnsmasq();
    let _g = serial();
    let r = loadtest(&[
        "mixed",
        "--spawn-relay",
        "-s",
        "4",
        "-m",
        "600",
        "-n",
        "3",
        "--rate",
        "600",
        "--etrn-interval",
        "0.2",
    ]);
    assert_clean(&r, 600);
    assert!(
        r.figure(0, "delivered_during_submission").unwrap() > 0.0,
        "{}",
        r.markdown
    );
    assert!(r.hist_count(0, "etrn_reply") > 3, "{}", r.markdown);
}

#[test]
fn scale_scenario_measures_memory_and_recovery() {
    require_dnsmasq();
    let _g = serial();
    let r = loadtest(&[
        "scale",
        "--spawn-relay",
        "-s",
        "4",
        "-m",
        "3000",
        "-n",
        "300",
        "-d",
        "3",
    ]);
    assert_clean(&r, 30);
    for k in [
        "recovery_s",
        "bytes_per_msg_loaded",
        "bytes_per_msg_recovered",
        "rss_empty_mib",
    ] {
        assert!(r.figure(0, k).is_some(), "{k} missing: {}", r.markdown);
    }
    assert_eq!(r.figure(0, "held_listed"), Some(3000.0));
    assert_eq!(r.figure(0, "etrn_count_mismatches"), Some(0.0), "{}", r.markdown);
}

#[test]
fn refuses_targets_off_loopback() {
    for t in ["192.0.2.1:25", "10.1.2.3:2525"] {
        let r = loadtest(&["accept", "--target", t, "-m", "1"]);
        assert_eq!(r.code(), 2, "{}", r.explain());
        assert!(r.stderr().contains("--allow-remote"), "{}", r.explain());
    }
    let r = loadtest(&[
        "accept",
        "--target",
        "127.0.0.1:1",
        "--compare",
        "198.51.100.7:25",
        "-m",
        "1",
    ]);
    assert_eq!(r.code(), 2, "{}", r.explain());
}

// ---- a deliberately faulty ETRN relay -----------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    Drop,
    Corrupt,
    Duplicate,
    /// Takes ETRN and never answers it.
    EtrnSilent,
}

type Held = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal store-and-ETRN server on 127.0.0.1: holds every message, and on `ETRN nodeK.test`
/// delivers that node's messages to 127.0.x.y:`sink_port` (the harness's sink), applying
/// `fault` to the first one.
fn fake_relay(fault: Fault, sink_port: u16) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let held: Held = Arc::new(Mutex::new(Vec::new()));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let held = held.clone();
            std::thread::spawn(move || {
                let _ = serve_fake(s, &held, fault, sink_port);
            });
        }
    });
    addr
}

fn node_ip(domain: &str) -> Ipv4Addr {
    let k: usize = domain
        .strip_prefix("node")
        .and_then(|d| d.strip_suffix(".test"))
        .and_then(|n| n.parse().ok())
        .unwrap();
    let k = k - 1;
    Ipv4Addr::new(127, 0, (1 + k / 250) as u8, (1 + k % 250) as u8)
}

fn serve_fake(s: TcpStream, held: &Held, fault: Fault, sink_port: u16) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 fake.test ESMTP\r\n")?;
    let mut domain = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let up = line.to_ascii_uppercase();
        if up.starts_with("EHLO") {
            w.write_all(b"250-fake.test\r\n250-PIPELINING\r\n250 ETRN\r\n")?;
        } else if up.starts_with("RCPT") {
            domain = line
                .trim_end()
                .trim_end_matches('>')
                .rsplit('@')
                .next()
                .unwrap()
                .to_string();
            w.write_all(b"250 ok\r\n")?;
        } else if up.starts_with("DATA") {
            w.write_all(b"354 go\r\n")?;
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                r.read_until(b'\n', &mut l)?;
                if l == b".\r\n" || l.is_empty() {
                    break;
                }
                data.extend_from_slice(l.strip_prefix(b".").unwrap_or(&l));
            }
            held.lock().unwrap().push((domain.clone(), data));
            w.write_all(b"250 queued\r\n")?;
        } else if up.starts_with("ETRN") && fault == Fault::EtrnSilent {
            std::thread::sleep(Duration::from_secs(30));
            return Ok(());
        } else if up.starts_with("ETRN") {
            let node = line[5..].trim().to_string();
            w.write_all(b"250 Queuing started\r\n")?;
            let msgs: Vec<Vec<u8>> = {
                let mut h = held.lock().unwrap();
                let (mine, rest): (Vec<_>, Vec<_>) = h.drain(..).partition(|(d, _)| *d == node);
                *h = rest;
                mine.into_iter().map(|(_, m)| m).collect()
            };
            let dst = SocketAddr::from((node_ip(&node), sink_port));
            std::thread::spawn(move || deliver_fake(dst, &node, msgs, fault));
        } else if up.starts_with("QUIT") {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 ok\r\n")?;
        }
    }
}

fn deliver_fake(dst: SocketAddr, node: &str, msgs: Vec<Vec<u8>>, fault: Fault) {
    let s = TcpStream::connect(dst).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut reply = || {
        let mut l = String::new();
        loop {
            l.clear();
            r.read_line(&mut l).unwrap();
            if l.as_bytes().get(3) != Some(&b'-') {
                return l;
            }
        }
    };
    reply();
    w.write_all(b"EHLO fake.test\r\n").unwrap();
    reply();
    for (i, mut m) in msgs.into_iter().enumerate() {
        let copies = match (i, fault) {
            (0, Fault::Drop) => 0,
            (0, Fault::Duplicate) => 2,
            (0, Fault::Corrupt) => {
                let n = m.len();
                m[n - 10] ^= 0x20;
                1
            }
            _ => 1,
        };
        for _ in 0..copies {
            w.write_all(format!("MAIL FROM:<>\r\nRCPT TO:<user@{node}>\r\nDATA\r\n").as_bytes())
                .unwrap();
            reply();
            reply();
            reply();
            let mut wire = Vec::new();
            for line in m.split_inclusive(|b| *b == b'\n') {
                if line.starts_with(b".") {
                    wire.push(b'.');
                }
                wire.extend_from_slice(line);
            }
            wire.extend_from_slice(b".\r\n");
            w.write_all(&wire).unwrap();
            reply();
        }
    }
    w.write_all(b"QUIT\r\n").unwrap();
    reply();
}

fn reserved_port() -> u16 {
    // bound on the first node's address: free there, and nothing else of ours uses 127.0.1.1
    let l = TcpListener::bind("127.0.1.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A `flush` of `messages` over 2 sessions, no probes, against a fresh [`fake_relay`] with
/// `fault`, plus `extra` arguments.
fn flush_against_fake(fault: Fault, messages: usize, extra: &[&str]) -> Run {
    let port = reserved_port();
    let addr = fake_relay(fault, port);
    let (addr, port, messages) = (addr.to_string(), port.to_string(), messages.to_string());
    let mut args = vec![
        "flush",
        "--target",
        &addr,
        "--sink-port",
        &port,
        "-s",
        "2",
        "-m",
        &messages,
        "--probes",
        "0",
    ];
    args.extend_from_slice(extra);
    loadtest(&args)
}

#[test]
fn faulty_target_is_reported_and_fails_the_run() {
    let _g = serial();
    for (fault, field) in [
        (Fault::Drop, "lost"),
        (Fault::Corrupt, "corrupt"),
        (Fault::Duplicate, "duplicates"),
    ] {
        let r = flush_against_fake(fault, 50, &["--stall-timeout", "3"]);
        assert_eq!(r.integrity(0, field), 1, "{fault:?}: {}", r.markdown);
        if fault == Fault::Duplicate {
            // a duplicate is reported; the run fails only on loss or damage
            assert_eq!(r.code(), 0, "{}", r.explain());
            assert_eq!(r.integrity(0, "lost"), 0);
        } else {
            assert_eq!(r.code(), 1, "{fault:?}: {}", r.explain());
            assert!(r.markdown.contains("**FAILED**"), "{}", r.markdown);
            assert!(r.stderr().contains("INTEGRITY FAILURE"), "{}", r.explain());
        }
        if fault == Fault::Corrupt {
            // the damaged copy counts as corrupt and its intact copy never arrives
            assert_eq!(r.integrity(0, "lost"), 1);
        }
    }
}

#[test]
fn a_flush_that_gives_up_still_reports_the_etrn_outcomes() {
    // The target takes the mail and never answers ETRN: the flush gives up at the drain
    // timeout (1 s) while the dial-ins still wait for their replies (2 s I/O timeout); their
    // timeouts, the reason nothing arrived, must still reach the report.
    let _g = serial();
    let r = flush_against_fake(Fault::EtrnSilent, 20, &["--drain-timeout", "1", "--io-timeout", "2"]);
    assert_eq!(r.code(), 1, "{}", r.explain());
    assert_eq!(r.integrity(0, "lost"), 20, "{}", r.markdown);
    assert!(r.markdown.contains("gave up after the drain timeout"), "{}", r.markdown);
    assert!(r.markdown.contains("ETRN for node1.test answered"), "{}", r.markdown);
}

#[test]
fn compare_reports_ratios_for_both_targets() {
    require_dnsmasq();
    let _g = serial();
    let port = reserved_port();
    let fake = fake_relay(Fault::None, port);
    let r = loadtest(&[
        "flush",
        "--spawn-relay",
        "--compare",
        &fake.to_string(),
        "--compare-label",
        "fake",
        "--sink-port",
        &port.to_string(),
        "-s",
        "2",
        "-m",
        "200",
        "--probes",
        "0",
    ]);
    assert_eq!(r.code(), 0, "{}", r.explain());
    assert_eq!(r.run(1)["label"], "fake");
    for i in 0..2 {
        assert_eq!(r.integrity(i, "delivered"), 200, "{}", r.markdown);
        assert_eq!(r.integrity(i, "lost"), 0);
    }
    let ratios = r.report["ratios"].as_array().unwrap();
    let has = |k: &str| {
        ratios
            .iter()
            .any(|x| x[0] == k && x[1].as_f64().is_some_and(|v| v > 0.0))
    };
    assert!(
        has("accept_msgs_per_s") && has("flush_msgs_per_s") && has("txn_latency.p99"),
        "{ratios:?}"
    );
    assert!(r.markdown.contains("| ratio |"), "{}", r.markdown);
}

#[test]
fn missing_relay_binary_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(loadtest_bin())
        .args([
            "accept",
            "--spawn-relay",
            "-m",
            "1",
            "-q",
            "--relay-bin",
            "/nonexistent/etrn-relay",
        ])
        .arg("--report-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("relay binary") || err.contains("dnsmasq"), "{err}");
}
