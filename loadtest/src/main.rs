//! `etrn-loadtest`: the load-testing harness of etrn-relay, usable against any SMTP server.
//!
//! ```text
//! etrn-loadtest <accept|flush|mixed|scale> (--target ADDR | --spawn-relay [--relay-bin PATH])
//!     [--sessions S] [--messages M] [--size L] [--nodes N] [--dialup D]
//!     [--auth none|plain|cram-md5] [--cores GEN[:RELAY]] [--compare ADDR] [--report-dir DIR]
//! ```
//!
//! `S` sessions pipeline `M` messages of `L` octets to `N` nodes (`nodeK.test`); `D` of the
//! nodes are simulated dial-up nodes, each a receiving SMTP server on its own loopback address
//! (127.0.x.y) plus an ETRN client. Every message carries an id and a checksum, and every
//! acknowledged message must arrive exactly once and intact, or the run fails (exit 1).
//!
//! Modules:
//! - [`net`]: node names and addresses, the loopback guard, connecting from a source address.
//! - [`msg`]: building messages with id and checksum; verifying them at the sinks.
//! - [`proto`]: the SMTP client connection, replies, AUTH PLAIN / CRAM-MD5.
//! - [`ledger`]: shared flags and counters (acknowledged, received, duplicates, damage) and
//!   the histograms.
//! - [`pool`]: the glommio executors and the commands the main thread sends them.
//! - [`generator`]: the pipelining submitting sessions.
//! - [`sink`]: the dial-up nodes' receiving servers.
//! - [`etrn`]: dial-ins (ETRN with optional AUTH), the `mixed` dial loop, ETRN probes.
//! - [`relay`]: `--spawn-relay`: the relay's config, process, restart and memory; dnsmasq.
//! - [`scenario`]: the four scenarios.
//! - [`metrics`]: sampling, the progress line, percentile summaries.
//! - [`report`]: report.md, report.json, chart.svg; ratios for `--compare`.

mod etrn;
mod generator;
mod ledger;
mod metrics;
mod msg;
mod net;
mod pool;
mod proto;
mod relay;
mod report;
mod scenario;
mod sink;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;

use crate::pool::{Cores, RunCfg};
use crate::proto::AuthMech;
use crate::relay::{DnsStub, RelayOpts, SpawnedRelay};
use crate::report::{Report, RunResult};
use crate::scenario::{Plan, Scenario, Target};

/// Load generator for SMTP/ETRN relays: submission throughput and latency, ETRN flushes to
/// simulated dial-up nodes, end-to-end integrity. Loopback only unless --allow-remote.
#[derive(Debug, Parser)]
#[command(name = "etrn-loadtest", version)]
struct Args {
    /// accept: submit only (then a verification flush); flush: queue, then ETRN every node;
    /// mixed: steady submission with nodes dialing in at random; scale: a large queue, memory
    /// per queued message and restart-recovery time.
    #[arg(value_enum)]
    scenario: Scenario,
    /// SMTP server to drive (HOST:PORT), e.g. Postfix on 127.0.0.1:2525.
    #[arg(long, conflicts_with = "spawn_relay", required_unless_present = "spawn_relay")]
    target: Option<String>,
    /// Write a relay config for the scenario and start etrn-relay (with a dnsmasq for the
    /// nodes' MX records).
    #[arg(long)]
    spawn_relay: bool,
    /// The etrn-relay binary for --spawn-relay (default: etrn-relay next to this program).
    #[arg(long, requires = "spawn_relay")]
    relay_bin: Option<PathBuf>,
    /// Submitting connections.
    #[arg(long, short = 's', default_value_t = 20)]
    sessions: usize,
    /// Messages in total (default: accept 20000, flush 10000, mixed 20000, scale 1000000).
    #[arg(long, short = 'm')]
    messages: Option<u64>,
    /// Message size in octets (headers included).
    #[arg(long, short = 'l', default_value_t = 1024)]
    size: usize,
    /// Nodes the messages are spread over, nodeK.test (default: 1; mixed 10; scale 10000).
    #[arg(long, short = 'n')]
    nodes: Option<usize>,
    /// Dial-up nodes (sink + ETRN client) among them (default: all nodes; scale 10).
    #[arg(long, short = 'd')]
    dialup: Option<usize>,
    /// AUTH of the ETRN clients (with --spawn-relay also the nodes' protected-queue mode:
    /// plain = auth "plain" with static_ip, cram-md5 = auth "md5").
    #[arg(long, value_enum, default_value = "none")]
    auth: AuthMech,
    /// Password of every node's AUTH user (user nodeK).
    #[arg(long, default_value = "loadtest-secret")]
    password: String,
    /// CPUs: GEN[:RELAY], lists like 0 or 0-1 or 0,2. The generator gets one pinned executor per
    /// GEN CPU; a spawned relay runs on the RELAY CPUs with one shard each.
    #[arg(long)]
    cores: Option<String>,
    /// Generator executors when --cores is not given (default: one per CPU, unpinned).
    #[arg(long)]
    threads: Option<usize>,
    /// Run the same scenario against this second target too and report primary/compare ratios.
    #[arg(long)]
    compare: Option<String>,
    /// Name of the primary target in the report (default: etrn-relay or the address).
    #[arg(long)]
    label: Option<String>,
    /// Name of the compare target in the report (default: its address).
    #[arg(long)]
    compare_label: Option<String>,
    /// Where reports go (a <scenario>-<time> directory is created inside).
    #[arg(long, default_value = "reports")]
    report_dir: PathBuf,
    /// Allow targets outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    allow_remote: bool,
    /// Port of every sink (default: a free one). Fix it when another MTA must be configured to
    /// deliver to the sinks (e.g. Postfix transport `nodeK.test smtp:[127.0.x.y]:PORT`).
    #[arg(long)]
    sink_port: Option<u16>,
    /// Messages per connection (0: unlimited; 1 is what smtp-source does by default).
    #[arg(long, default_value_t = 0)]
    per_conn: usize,
    /// Total submission rate in messages/s (0: as fast as possible; mixed default 1000).
    #[arg(long)]
    rate: Option<f64>,
    /// Never pipeline, even when the server offers PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// Mean seconds between a node's dial-ins in the mixed scenario.
    #[arg(long, default_value_t = 1.0)]
    etrn_interval: f64,
    /// ETRN probe connections while a flush runs (each from its own address, 127.0.254.x).
    #[arg(long, default_value_t = 100)]
    probes: usize,
    /// Milliseconds between one probe's ETRNs (the relay allows 2 ETRN/s per address).
    #[arg(long, default_value_t = 600)]
    probe_interval_ms: u64,
    /// Longest wait for deliveries, in seconds.
    #[arg(long, default_value_t = 600)]
    drain_timeout: u64,
    /// Stop waiting when nothing arrives for this many seconds.
    #[arg(long, default_value_t = 30)]
    stall_timeout: u64,
    /// Client read/write/connect timeout in seconds.
    #[arg(long, default_value_t = 60)]
    io_timeout: u64,
    /// Seconds between the end of submission and the flush ETRNs (flush, accept's
    /// verification). Postfix flushes only mail that already reached its deferred queue.
    #[arg(long, default_value_t = 0.2)]
    settle: f64,
    /// accept: skip the verification flush.
    #[arg(long)]
    no_verify: bool,
    /// ETRN_RELAY_LOG of a spawned relay.
    #[arg(long, default_value = "warn")]
    relay_log: String,
    /// Extra top-level TOML for the spawned relay's config (e.g. 'placement = "pinned"').
    #[arg(long, default_value = "")]
    relay_toml: String,
    /// Extra [delivery] TOML for the spawned relay (e.g. 'connections_per_node = 8').
    #[arg(long, default_value = "")]
    relay_delivery_toml: String,
    /// No progress line.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Keep the spawned relay's directory (config, spool, log) and print where it is.
    #[arg(long)]
    keep: bool,
}

/// Parses a CPU list like `0`, `0-3`, `0,2-3`.
fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim().parse().map_err(|_| format!("bad CPU `{a}` in `{s}`"))?,
            b.trim().parse().map_err(|_| format!("bad CPU `{b}` in `{s}`"))?,
        );
        if a > b {
            return Err(format!("bad CPU range `{part}`"));
        }
        for c in a..=b {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        return Err(format!("empty CPU list `{s}`"));
    }
    Ok(out)
}

/// Parses `--cores GEN[:RELAY]`.
fn parse_cores(s: &str) -> Result<(Vec<usize>, Option<Vec<usize>>), String> {
    match s.split_once(':') {
        Some((g, r)) => Ok((parse_cpus(g)?, Some(parse_cpus(r)?))),
        None => Ok((parse_cpus(s)?, None)),
    }
}

fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn default_relay_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("etrn-relay")))
        .unwrap_or_else(|| PathBuf::from("target/release/etrn-relay"))
}

fn main() {
    let args = Args::parse();
    match real_main(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("etrn-loadtest: {e}");
            std::process::exit(2);
        }
    }
}

fn real_main(a: Args) -> Result<i32, String> {
    let sc = a.scenario;
    let messages = a.messages.unwrap_or(match sc {
        Scenario::Accept | Scenario::Mixed => 20_000,
        Scenario::Flush => 10_000,
        Scenario::Scale => 1_000_000,
    });
    let nodes = a.nodes.unwrap_or(match sc {
        Scenario::Accept | Scenario::Flush => 1,
        Scenario::Mixed => 10,
        Scenario::Scale => 10_000,
    });
    if nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    let dialup = a
        .dialup
        .unwrap_or(if sc == Scenario::Scale { 10.min(nodes) } else { nodes });
    if dialup > nodes {
        return Err(format!("--dialup {dialup} is more than --nodes {nodes}"));
    }
    if dialup > net::MAX_DIALUP {
        return Err(format!(
            "at most {} dial-up nodes (one loopback address each)",
            net::MAX_DIALUP
        ));
    }
    if a.sessions == 0 {
        return Err("--sessions must be at least 1".into());
    }
    let target = match &a.target {
        Some(t) => Some(net::check_target(t, a.allow_remote)?),
        None => None,
    };
    let compare = match &a.compare {
        Some(t) => Some(net::check_target(t, a.allow_remote)?),
        None => None,
    };
    let (gen_cpus, relay_cpus) = match &a.cores {
        Some(s) => {
            let (g, r) = parse_cores(s)?;
            (Some(g), r)
        }
        None => (None, None),
    };
    if relay_cpus.is_some() && !a.spawn_relay {
        return Err("--cores GEN:RELAY: the RELAY part needs --spawn-relay".into());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = match gen_cpus {
        Some(c) => Cores::Pinned(c),
        None => Cores::Unbound(a.threads.unwrap_or(cpus).max(1)),
    };
    raise_fd_limit();
    let sink_ips: Vec<std::net::Ipv4Addr> = (0..dialup.min(8)).map(net::node_ip).collect();
    let sink_port = match a.sink_port {
        Some(p) => p,
        None if dialup == 0 => 9, // nothing listens
        None => net::free_port_on(&sink_ips).map_err(|e| format!("no free sink port: {e}"))?,
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let plan = Plan {
        scenario: sc,
        messages,
        nodes,
        dialup,
        run: RunCfg {
            target: target.unwrap_or_else(|| "127.0.0.1:25".parse().expect("literal address")),
            sessions: a.sessions,
            size: a.size,
            per_conn: a.per_conn,
            rate: a.rate.unwrap_or(if sc == Scenario::Mixed { 1000.0 } else { 0.0 }),
            no_pipelining: a.no_pipelining,
            auth: a.auth,
            password: a.password.clone(),
            sink_port,
            io_timeout: Duration::from_secs(a.io_timeout.max(1)),
            date: msg::rfc5322_date(now),
        },
        cores: cores.clone(),
        etrn_interval: Duration::from_secs_f64(a.etrn_interval.max(0.01)),
        probes: a.probes.min(250),
        probe_interval: Duration::from_millis(a.probe_interval_ms.max(1)),
        drain_timeout: Duration::from_secs(a.drain_timeout),
        stall_timeout: Duration::from_secs(a.stall_timeout),
        verify: !a.no_verify,
        settle: Duration::from_secs_f64(a.settle.max(0.0)),
        quiet: a.quiet,
    };

    let mut runs: Vec<RunResult> = Vec::new();
    let mut parameters = vec![
        ("sessions".to_string(), a.sessions.to_string()),
        ("messages".into(), messages.to_string()),
        ("size".into(), a.size.to_string()),
        ("nodes".into(), nodes.to_string()),
        ("dialup".into(), dialup.to_string()),
        ("auth".into(), format!("{:?}", a.auth).to_lowercase()),
        ("generator_executors".into(), cores.count().to_string()),
        ("per_conn".into(), a.per_conn.to_string()),
        ("rate".into(), plan.run.rate.to_string()),
        ("sink_port".into(), sink_port.to_string()),
        ("settle_s".into(), a.settle.to_string()),
    ];
    // ---- primary target
    let workdir = tempfile::Builder::new()
        .prefix("etrn-loadtest-")
        .tempdir()
        .map_err(|e| format!("cannot create a work directory: {e}"))?;
    let mut _dns: Option<DnsStub> = None;
    let mut spawned: Option<SpawnedRelay> = None;
    let primary_addr = if a.spawn_relay {
        let bin = a.relay_bin.clone().unwrap_or_else(default_relay_bin);
        if !bin.exists() {
            return Err(format!(
                "relay binary {} not found: build it with `cargo build --release -p etrn-relay` or pass --relay-bin",
                bin.display()
            ));
        }
        let dns = DnsStub::start(dialup, workdir.path())?;
        let opts = RelayOpts {
            bin,
            nodes,
            dialup,
            auth: a.auth,
            password: a.password.clone(),
            sink_port,
            dns_port: dns.port,
            shards: relay_cpus.as_ref().map_or(0, Vec::len),
            cpus: relay_cpus.clone(),
            max_connections: (a.sessions + dialup + a.probes + 1000).max(10_000),
            log_level: a.relay_log.clone(),
            extra_top: a.relay_toml.clone(),
            extra_delivery: a.relay_delivery_toml.clone(),
        };
        parameters.push(("relay_bin".into(), opts.bin.display().to_string()));
        if let Some(c) = &relay_cpus {
            parameters.push(("relay_cpus".into(), format!("{c:?}")));
        }
        let (r, _) = SpawnedRelay::start(opts, workdir.path())?;
        let addr = r.addr;
        _dns = Some(dns);
        spawned = Some(r);
        addr
    } else {
        target.expect("clap requires --target without --spawn-relay")
    };
    let label = a.label.clone().unwrap_or_else(|| {
        if a.spawn_relay {
            "etrn-relay".into()
        } else {
            primary_addr.to_string()
        }
    });
    let r1 = scenario::run(
        &plan,
        Target {
            label,
            addr: primary_addr,
            relay: spawned.as_mut(),
        },
    );
    if let Some(r) = spawned.as_mut() {
        r.stop();
        let tail = r.log_tail(2000);
        if !tail.is_empty() {
            let _ = std::fs::write(workdir.path().join("relay-log-tail.txt"), &tail);
        }
    }
    let r1 = r1.map_err(|e| match &spawned {
        Some(r) => format!("{e}\nrelay log (last lines):\n{}", r.log_tail(20)),
        None => e,
    })?;
    runs.push(r1);
    drop(spawned);
    drop(_dns);
    // ---- compare target
    if let Some(addr) = compare {
        let label = a.compare_label.clone().unwrap_or_else(|| addr.to_string());
        let r2 = scenario::run(
            &plan,
            Target {
                label,
                addr,
                relay: None,
            },
        )?;
        runs.push(r2);
    }
    let ratios = report::ratios(&runs);
    let rep = Report {
        scenario: sc.name().into(),
        started: report::rfc3339(now),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: report::machine(),
        parameters,
        runs,
        ratios,
    };
    let dir = report::report_dir(&a.report_dir, sc.name(), now);
    rep.write(&dir)
        .map_err(|e| format!("cannot write the report to {}: {e}", dir.display()))?;
    if a.keep {
        let kept = workdir.keep();
        eprintln!("etrn-loadtest: kept the relay's directory {}", kept.display());
    }
    print!("{}", rep.markdown());
    println!("\nreport: {}", dir.display());
    let failed: Vec<&str> = rep.runs.iter().filter(|r| r.failed).map(|r| r.label.as_str()).collect();
    if failed.is_empty() {
        Ok(0)
    } else {
        eprintln!("etrn-loadtest: INTEGRITY FAILURE against {}", failed.join(", "));
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("0").unwrap(), vec![0]);
        assert_eq!(parse_cpus("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpus("2-1").is_err());
        assert!(parse_cpus("x").is_err());
        assert_eq!(parse_cores("0:1").unwrap(), (vec![0], Some(vec![1])));
        assert_eq!(parse_cores("0-1").unwrap(), (vec![0, 1], None));
    }

    #[test]
    fn cli_parses() {
        let a = Args::try_parse_from([
            "etrn-loadtest",
            "flush",
            "--spawn-relay",
            "-s",
            "4",
            "--auth",
            "cram-md5",
        ])
        .unwrap();
        assert_eq!(a.scenario, Scenario::Flush);
        assert_eq!(a.auth, AuthMech::CramMd5);
        assert!(Args::try_parse_from(["etrn-loadtest", "accept"]).is_err());
        assert!(Args::try_parse_from(["etrn-loadtest", "accept", "--target", "x:1", "--spawn-relay"]).is_err());
    }
}
