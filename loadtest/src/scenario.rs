//! The four scenarios, driven from the main thread against one target:
//!
//! - `accept`: submit everything (the target holds it), then, as the integrity check, ETRN
//!   every dial-up node and wait until the sinks have it all.
//! - `flush`: submit everything, then ETRN every dial-up node at once while probes keep asking
//!   ETRN on other connections; measure the flush rate, the ETRN replies, and ETRN to last
//!   delivery per node.
//! - `mixed`: steady (rate-limited) submission while every dial-up node dials in and issues
//!   ETRN at random intervals; then a final ETRN round drains everything.
//! - `scale`: submit a large queue over many nodes; with `--spawn-relay` measure the relay's
//!   memory per queued message, restart it and time the recovery, then check the recovered
//!   counts by ETRN and deliver the dial-up nodes' mail.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::etrn::{Outcome, ProbeResult, ProbeThread};
use crate::ledger::{Hists, Ledger};
use crate::metrics::{HistSummary, Monitor};
use crate::net::node_name;
use crate::pool::{Cmd, Cores, Event, Pool, RunCfg, Shared};
use crate::relay::SpawnedRelay;
use crate::report::RunResult;

/// After a flush stalls, how long to wait for dial-ins still running to report.
const ETRN_DONE_GRACE: Duration = Duration::from_secs(2);

/// The scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Submit only; the target holds the mail (then a verification flush).
    Accept,
    /// Queue, then ETRN every node until every sink has everything.
    Flush,
    /// Steady submission with nodes dialing in and issuing ETRN at random intervals.
    Mixed,
    /// A large queue over many nodes: memory per queued message and restart-recovery time.
    Scale,
}

impl Scenario {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Accept => "accept",
            Scenario::Flush => "flush",
            Scenario::Mixed => "mixed",
            Scenario::Scale => "scale",
        }
    }
}

/// Everything a scenario needs besides the target.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Which scenario.
    pub scenario: Scenario,
    /// Messages in total.
    pub messages: u64,
    /// Nodes the messages are spread over.
    pub nodes: usize,
    /// Nodes with a sink and an ETRN client.
    pub dialup: usize,
    /// Settings shared with the executors (target filled in per run).
    pub run: RunCfg,
    /// Generator executors.
    pub cores: Cores,
    /// Mean interval between a node's dial-ins (`mixed`).
    pub etrn_interval: Duration,
    /// ETRN probe connections during a flush (0: none).
    pub probes: usize,
    /// Interval of each probe.
    pub probe_interval: Duration,
    /// Longest wait for deliveries.
    pub drain_timeout: Duration,
    /// Give up waiting when nothing arrives for this long.
    pub stall_timeout: Duration,
    /// Run the verification flush after `accept`.
    pub verify: bool,
    /// Pause between the end of submission and the flush ETRNs.
    pub settle: Duration,
    /// No progress line.
    pub quiet: bool,
}

/// One target of a run.
pub struct Target<'a> {
    /// Name in the report.
    pub label: String,
    /// SMTP address.
    pub addr: SocketAddr,
    /// The relay when the harness started it.
    pub relay: Option<&'a mut SpawnedRelay>,
}

/// What the target's EHLO says.
struct Ehlo {
    etrn: bool,
    pipelining: bool,
    banner: String,
}

/// Blocking EHLO from the main thread, before the executors start talking.
fn probe_ehlo(addr: SocketAddr, timeout: Duration) -> Result<Ehlo, String> {
    let s =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut read_reply = || -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).map_err(|e| e.to_string())? == 0 {
                return Err("connection closed".into());
            }
            let l = l.trim_end().to_string();
            let more = l.as_bytes().get(3) == Some(&b'-');
            lines.push(l);
            if !more {
                return Ok(lines);
            }
        }
    };
    let g = read_reply()?;
    if !g[0].starts_with("220") {
        return Err(format!("{addr} greets with `{}`", g[0]));
    }
    w.write_all(b"EHLO loadgen.client.test\r\n")
        .map_err(|e| e.to_string())?;
    let e = read_reply()?;
    let _ = w.write_all(b"QUIT\r\n");
    let has = |k: &str| {
        e.iter().skip(1).any(|l| {
            l.get(4..)
                .and_then(|x| x.split_whitespace().next())
                .is_some_and(|w| w.eq_ignore_ascii_case(k))
        })
    };
    Ok(Ehlo {
        etrn: has("ETRN"),
        pipelining: has("PIPELINING"),
        banner: g[0].clone(),
    })
}

struct Driver<'a> {
    plan: &'a Plan,
    sh: Arc<Shared>,
    pool: Pool,
    res: RunResult,
    etrn_to_last: hdrhistogram::Histogram<u64>,
}

/// Runs the plan's scenario against one target.
pub fn run(plan: &Plan, target: Target<'_>) -> Result<RunResult, String> {
    let mut cfg = plan.run.clone();
    cfg.target = target.addr;
    let ehlo = probe_ehlo(target.addr, cfg.io_timeout)?;
    let sh = Arc::new(Shared {
        domains: (0..plan.nodes).map(node_name).collect(),
        ledger: Ledger::new(plan.messages, plan.nodes, plan.dialup),
        cfg,
    });
    let pool = Pool::start(sh.clone(), &plan.cores)?;
    let mut d = Driver {
        plan,
        sh: sh.clone(),
        pool,
        res: RunResult::new(&target.label, &target.addr.to_string()),
        etrn_to_last: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
    };
    d.res.notes.push(format!(
        "target greeting `{}`; PIPELINING {}, ETRN {}",
        ehlo.banner,
        if ehlo.pipelining { "offered" } else { "not offered" },
        if ehlo.etrn { "offered" } else { "not offered" }
    ));
    let mut mon = Monitor::new(&sh, &target.label, plan.quiet);
    mon.relay_pid = target.relay.as_ref().and_then(|r| r.pid());
    let outcome = match plan.scenario {
        Scenario::Accept => d.accept(&mut mon, target.relay, ehlo.etrn),
        Scenario::Flush => d.flush_scenario(&mut mon, ehlo.etrn),
        Scenario::Mixed => d.mixed(&mut mon, ehlo.etrn),
        Scenario::Scale => d.scale(&mut mon, target.relay, ehlo.etrn),
    };
    d.pool.shutdown();
    mon.phase = "done";
    mon.finish();
    if mon.relay_gone {
        return Err("the spawned relay exited during the run (see its log)".into());
    }
    outcome?;
    let mut res = d.res;
    res.timeline = std::mem::take(&mut mon.timeline);
    let l = &sh.ledger;
    let h = l.hists.lock().unwrap_or_else(|e| e.into_inner());
    res.hists.push(HistSummary::of("txn_latency", &h.txn));
    res.hists.push(HistSummary::of("etrn_reply", &h.etrn));
    res.hists.push(HistSummary::of("etrn_reply_during_flush", &h.probe));
    res.hists
        .push(HistSummary::of("etrn_to_last_delivery", &d.etrn_to_last));
    res.hists.push(HistSummary::of("end_to_end", &h.e2e));
    res.hists.retain(|h| h.count > 0);
    let errors = l.errors.load(Relaxed);
    let rejected = l.rejected.load(Relaxed);
    res.fig("errors", "connection errors", "count", errors as f64);
    res.fig("rejected", "transactions refused", "count", rejected as f64);
    let samples = l.samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for s in samples {
        res.notes.push(format!("reply/error sample: {s}"));
    }
    if let Some(i) = &res.integrity {
        if i.failed() {
            res.failed = true;
        }
        if i.lost > 0 {
            res.notes.push(format!(
                "LOST: {} acknowledged messages did not arrive (lost, or still held by the target); some ids: {:?}",
                i.lost, i.lost_sample
            ));
        }
    }
    Ok(res)
}

impl Driver<'_> {
    fn ledger(&self) -> &Ledger {
        &self.sh.ledger
    }

    /// Waits for `n` events matching `want`, ticking the monitor; other events are handled by
    /// `other`. Gives up at `deadline`.
    fn wait_events(
        &mut self,
        mon: &mut Monitor<'_>,
        n: usize,
        deadline: Instant,
        mut on: impl FnMut(Event) -> bool,
    ) -> bool {
        let mut got = 0;
        while got < n {
            if Instant::now() > deadline || mon.relay_gone {
                return false;
            }
            match self.pool.events.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => {
                    if on(ev) {
                        got += 1;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => return false,
            }
            mon.tick();
        }
        true
    }

    /// Submits every message with the plan's sessions; returns the wall time.
    fn submit(&mut self, mon: &mut Monitor<'_>) -> Duration {
        mon.phase = "submit";
        let n = self.pool.size();
        let sessions = self.plan.run.sessions;
        let t0 = Instant::now();
        for i in 0..n {
            let share = sessions / n + usize::from(i < sessions % n);
            self.pool.send(i, Cmd::Submit(share));
        }
        let far = Instant::now() + Duration::from_secs(365 * 86400);
        self.wait_events(mon, n, far, |e| matches!(e, Event::SubmitDone));
        let took = t0.elapsed();
        let l = self.ledger();
        let acked = l.acked.load(Relaxed);
        let bytes = l.acked_bytes.load(Relaxed);
        let secs = took.as_secs_f64().max(1e-9);
        self.res.fig("acked", "messages acknowledged", "count", acked as f64);
        self.res.fig("accept_duration_s", "submission wall time", "s", secs);
        self.res
            .fig("accept_msgs_per_s", "accept rate", "msg/s", acked as f64 / secs);
        self.res.fig(
            "accept_mb_per_s",
            "accept rate (message octets)",
            "MB/s",
            bytes as f64 / secs / 1e6,
        );
        took
    }

    /// ETRNs every dial-up node (from its own address), waits until every acknowledged message
    /// of theirs arrived (or the drain timeout / a stall), records the flush figures.
    /// `check_counts`: compare `253 <n> pending` with what was acknowledged for the node.
    fn flush(&mut self, mon: &mut Monitor<'_>, probes: bool, check_counts: bool, prefix: &str) {
        mon.phase = "flush";
        let what = match prefix {
            "verify_" => "verification flush: ",
            "final_" => "final flush: ",
            _ => "",
        };
        let plan = self.plan;
        let dialup = plan.dialup;
        if dialup == 0 {
            return;
        }
        let before = self.ledger().delivered_to_dialup();
        let t_start = self.ledger().now_ns();
        let nodes: Vec<usize> = (0..dialup).collect();
        let n = self.pool.size();
        for (i, share) in self.pool.split(&nodes).into_iter().enumerate() {
            self.pool.send(i, Cmd::Etrn(share));
        }
        let probing = probes && plan.probes > 0;
        let mut probe_thread = None;
        if probing {
            self.ledger().stop_probe.store(false, Relaxed);
            let busy: Vec<usize> = (0..dialup)
                .filter(|k| self.ledger().acked_per_node[*k].load(Relaxed) > 0)
                .collect();
            let ids: Vec<usize> = (0..plan.probes).collect();
            let cpus = match &plan.cores {
                Cores::Pinned(c) => Some(c.clone()),
                Cores::Unbound(_) => None,
            };
            probe_thread = Some(ProbeThread::start(
                self.sh.clone(),
                ids,
                busy,
                plan.probe_interval,
                cpus,
            ));
        }
        let deadline = Instant::now() + plan.drain_timeout;
        let mut outcomes: Vec<Outcome> = Vec::new();
        let mut etrn_done = 0;
        let mut last_progress = (self.ledger().delivered_to_dialup(), Instant::now());
        let mut stalled = false;
        loop {
            if let Ok(Event::EtrnDone(o)) = self.pool.events.recv_timeout(Duration::from_millis(20)) {
                outcomes.extend(o);
                etrn_done += 1;
            }
            mon.tick();
            let l = self.ledger();
            let delivered = l.delivered_to_dialup();
            if delivered != last_progress.0 {
                last_progress = (delivered, Instant::now());
            }
            if etrn_done == n && delivered >= l.expected_deliveries() {
                break;
            }
            if mon.relay_gone {
                stalled = true;
                break;
            }
            if Instant::now() > deadline {
                self.res.notes.push(format!(
                    "{what}flush: gave up after the drain timeout ({:?})",
                    plan.drain_timeout
                ));
                stalled = true;
                break;
            }
            if etrn_done == n && last_progress.1.elapsed() > plan.stall_timeout {
                self.res.notes.push(format!(
                    "{what}flush: nothing arrived for {:?}; stopped waiting",
                    plan.stall_timeout
                ));
                stalled = true;
                break;
            }
        }
        if stalled && etrn_done < n {
            // The relay went away or stopped delivering while some dial-ins were still
            // running: they end on their own timeouts, and their outcomes (the 4xx/5xx or
            // connection errors that explain the stall) belong in the report.
            let until = Instant::now() + ETRN_DONE_GRACE;
            while etrn_done < n {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if let Ok(Event::EtrnDone(o)) = self.pool.events.recv_timeout(left) {
                    outcomes.extend(o);
                    etrn_done += 1;
                }
            }
            if etrn_done < n {
                self.res.notes.push(format!(
                    "{what}flush: {} of {n} executors had not finished their dial-ins {:?} after the stall",
                    n - etrn_done,
                    ETRN_DONE_GRACE
                ));
            }
        }
        if let Some(t) = probe_thread {
            self.ledger().stop_probe.store(true, Relaxed);
            let ProbeResult { bad, sample, priority } = t.join();
            self.res.notes.push(format!(
                "{what}ETRN probes: timed on a thread of their own ({priority})"
            ));
            if bad > 0 {
                self.res.notes.push(format!(
                    "{what}flush: {bad} probe ETRNs were not answered 2xx (e.g. `{}`)",
                    sample.unwrap_or_default()
                ));
            }
        }
        let sh = self.sh.clone();
        let l = &sh.ledger;
        let delivered = l.delivered_to_dialup() - before;
        let mut t_last = t_start;
        for k in 0..dialup {
            let acked = l.acked_per_node[k].load(Relaxed);
            let last = l.last_recv_ns[k].load(Relaxed);
            let sent = l.etrn_ns[k].load(Relaxed);
            if acked == 0 || sent == u64::MAX {
                continue;
            }
            t_last = t_last.max(last);
            if l.node_complete(k) && last >= sent {
                Hists::record(&mut self.etrn_to_last, (last - sent) / 1000);
            }
        }
        let secs = (t_last.saturating_sub(t_start)) as f64 / 1e9;
        let mut refused = 0;
        let mut mismatches = 0;
        for o in &outcomes {
            if !(200..300).contains(&o.code) {
                refused += 1;
                if refused <= 5 {
                    self.res.notes.push(format!(
                        "{what}ETRN for {} answered `{} {}`",
                        node_name(o.node),
                        o.code,
                        o.text.lines().next().unwrap_or("")
                    ));
                }
            } else if check_counts {
                if let Some(p) = o.pending_count() {
                    let acked = l.acked_per_node[o.node].load(Relaxed);
                    if p != acked {
                        mismatches += 1;
                        if mismatches <= 5 {
                            self.res.notes.push(format!(
                                "{what}ETRN for {} reported {p} pending, {acked} were acknowledged",
                                node_name(o.node)
                            ));
                        }
                    }
                }
            }
        }
        if let Some(o) = outcomes.iter().find(|o| (200..300).contains(&o.code)) {
            self.res.notes.push(format!(
                "{what}ETRN reply example: `{} {}`",
                o.code,
                o.text.lines().next().unwrap_or("")
            ));
        }
        let key = |k: &str| format!("{prefix}{k}");
        let lab = |l: &str| format!("{what}{l}");
        if refused > 0 {
            self.res
                .fig(&key("etrn_refused"), &lab("ETRNs refused"), "count", refused as f64);
        }
        if check_counts {
            self.res.fig(
                &key("etrn_count_mismatches"),
                &lab("ETRN pending counts differing from acknowledged"),
                "nodes",
                mismatches as f64,
            );
        }
        self.res.fig(
            &key("flush_delivered"),
            &lab("delivered after the ETRNs"),
            "count",
            delivered as f64,
        );
        if secs > 0.0 && delivered > 0 && !stalled {
            self.res
                .fig(&key("flush_duration_s"), &lab("first ETRN to last delivery"), "s", secs);
            self.res.fig(
                &key("flush_msgs_per_s"),
                &lab("flush rate (after ETRN)"),
                "msg/s",
                delivered as f64 / secs,
            );
        }
    }

    fn integrity(&mut self, check_delivery: bool) {
        self.res.integrity = Some(self.ledger().integrity(check_delivery));
    }

    fn held_check(&mut self, relay: &Option<&mut SpawnedRelay>) {
        let Some(r) = relay else { return };
        let acked = self.ledger().acked.load(Relaxed);
        match r.queued_total() {
            Ok(held) => {
                self.res
                    .fig("held_listed", "messages the relay lists as held", "count", held as f64);
                if held < acked {
                    self.res.failed = true;
                    self.res.notes.push(format!(
                        "LOSS: `etrn-relay queue` lists {held} messages, {acked} were acknowledged"
                    ));
                }
            }
            Err(e) => self.res.notes.push(format!("`etrn-relay queue` failed: {e}")),
        }
    }

    fn accept(&mut self, mon: &mut Monitor<'_>, relay: Option<&mut SpawnedRelay>, etrn: bool) -> Result<(), String> {
        self.submit(mon);
        self.held_check(&relay);
        if !self.plan.verify {
            self.res
                .notes
                .push("integrity: delivery not verified (--no-verify)".into());
            self.integrity(false);
        } else if self.plan.dialup == 0 {
            self.res
                .notes
                .push("integrity: delivery not verified (no dial-up nodes)".into());
            self.integrity(false);
        } else if !etrn {
            self.res.notes.push(
                "integrity: delivery not verified: the target does not offer ETRN (a sink that stores nothing?)".into(),
            );
            self.res.integrity = None;
        } else {
            self.flush(mon, false, true, "verify_");
            self.integrity(true);
        }
        Ok(())
    }

    fn flush_scenario(&mut self, mon: &mut Monitor<'_>, etrn: bool) -> Result<(), String> {
        if !etrn {
            return Err("the flush scenario needs a target that offers ETRN".into());
        }
        self.submit(mon);
        // let the target finish handing the last messages to its queues (Postfix's ETRN
        // flushes only mail that already reached its deferred queue)
        std::thread::sleep(self.plan.settle);
        let probes = self.sh.cfg.auth == crate::proto::AuthMech::None;
        if !probes && self.plan.probes > 0 {
            self.res
                .notes
                .push("no ETRN probes: protected queues answer unauthenticated ETRN with 459".into());
        }
        self.flush(mon, probes, true, "");
        self.integrity(true);
        Ok(())
    }

    fn mixed(&mut self, mon: &mut Monitor<'_>, etrn: bool) -> Result<(), String> {
        if !etrn {
            return Err("the mixed scenario needs a target that offers ETRN".into());
        }
        let n = self.pool.size();
        let nodes: Vec<usize> = (0..self.plan.dialup).collect();
        self.ledger().stop_dial.store(false, Relaxed);
        for (i, share) in self.pool.split(&nodes).into_iter().enumerate() {
            self.pool.send(i, Cmd::Dial(share, self.plan.etrn_interval));
        }
        self.submit(mon);
        self.ledger().stop_dial.store(true, Relaxed);
        mon.phase = "dial-in";
        let mut bad = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        self.wait_events(mon, n, deadline, |e| match e {
            Event::DialDone(b) => {
                bad.extend(b);
                true
            }
            _ => false,
        });
        for o in bad.iter().take(5) {
            self.res.notes.push(format!(
                "dial-in ETRN for {} answered `{} {}`",
                node_name(o.node),
                o.code,
                o.text.lines().next().unwrap_or("")
            ));
        }
        let during = self.ledger().delivered_to_dialup();
        self.res.fig(
            "delivered_during_submission",
            "delivered while submitting",
            "count",
            during as f64,
        );
        self.flush(mon, false, false, "final_");
        self.integrity(true);
        Ok(())
    }

    fn scale(&mut self, mon: &mut Monitor<'_>, mut relay: Option<&mut SpawnedRelay>, etrn: bool) -> Result<(), String> {
        let mib = |b: u64| b as f64 / 1048576.0;
        let rss0 = relay.as_ref().and_then(|r| r.rss());
        self.submit(mon);
        std::thread::sleep(Duration::from_secs(1));
        let acked = self.ledger().acked.load(Relaxed).max(1);
        match relay.as_mut() {
            None => self.res.notes.push(
                "memory and recovery not measured: they need --spawn-relay (the harness must own the process)".into(),
            ),
            Some(r) => {
                let rss1 = r.rss();
                if let (Some((a0, anon0)), Some((a1, anon1))) = (rss0, rss1) {
                    self.res.fig("rss_empty_mib", "relay RSS, empty queue", "MiB", mib(a0));
                    self.res
                        .fig("rss_loaded_mib", "relay RSS after submission", "MiB", mib(a1));
                    self.res.fig(
                        "bytes_per_msg_loaded",
                        "RSS growth per queued message (after submission)",
                        "bytes",
                        a1.saturating_sub(a0) as f64 / acked as f64,
                    );
                    self.res.fig(
                        "anon_bytes_per_msg_loaded",
                        "anonymous RSS growth per queued message (after submission)",
                        "bytes",
                        anon1.saturating_sub(anon0) as f64 / acked as f64,
                    );
                }
                mon.phase = "restart";
                mon.tick();
                let down = r.stop();
                self.res.fig(
                    "shutdown_s",
                    "relay shutdown (SIGTERM to exit)",
                    "s",
                    down.as_secs_f64(),
                );
                let up = r.restart()?;
                mon.relay_pid = r.pid();
                self.res.fig(
                    "recovery_s",
                    "restart to first 220 (recovery scan)",
                    "s",
                    up.as_secs_f64(),
                );
                self.res.fig(
                    "recovery_msgs_per_s",
                    "recovery rate",
                    "msg/s",
                    acked as f64 / up.as_secs_f64().max(1e-9),
                );
                std::thread::sleep(Duration::from_secs(1));
                if let (Some((a0, anon0)), Some((a2, anon2))) = (rss0, r.rss()) {
                    self.res
                        .fig("rss_recovered_mib", "relay RSS after recovery", "MiB", mib(a2));
                    self.res.fig(
                        "bytes_per_msg_recovered",
                        "RSS growth per queued message (after recovery)",
                        "bytes",
                        a2.saturating_sub(a0) as f64 / acked as f64,
                    );
                    self.res.fig(
                        "anon_bytes_per_msg_recovered",
                        "anonymous RSS growth per queued message (after recovery)",
                        "bytes",
                        anon2.saturating_sub(anon0) as f64 / acked as f64,
                    );
                }
            }
        }
        self.held_check(&relay);
        if etrn && self.plan.dialup > 0 {
            self.flush(mon, false, true, "");
            self.integrity(true);
        } else {
            self.integrity(false);
        }
        Ok(())
    }
}
