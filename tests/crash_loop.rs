//! End-to-end crash safety (issue 5, "Crash safety"): client threads submit mail without
//! pause while the relay is killed with SIGKILL at random moments, several times, and
//! restarted on the same spool each time; queue runs are started now and then during the load,
//! so deliveries are cut off by the kills too. At the end every node is ETRNed and the node
//! servers' arrivals are compared with what the relay acknowledged:
//!
//! - every message that got `250` arrived (at-least-once: zero lost), byte for byte;
//! - duplicates are counted and printed; each must be explained by a kill: a message whose
//!   final dot was sent but whose `250` never came (the client sent it again), or a delivery that
//!   the node's server had accepted shortly before a kill (the relay had not yet recorded it);
//! - a message that arrived without ever being acknowledged is reported, not counted as lost.
//!
//! The random schedule comes from a seed (printed; `CRASH_LOOP_SEED=<n>` replays it);
//! `CRASH_LOOP_KEEP_LOGS=<dir>` copies the logs of every relay incarnation there.
mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: [&str; 3] = ["c1.crash.test", "c2.crash.test", "c3.crash.test"];
const SERVER_IP: &str = "127.0.0.2";
const CLIENTS: usize = 4;
const CONNECTIONS_PER_NODE: usize = 2;

/// FNV-1a, to derive a message's size from its id.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// The message with id `id` (its size, 1 to 8 kB, also follows from the id). No line starts
/// with a dot, so it crosses the wire unchanged.
fn body(id: &str) -> Vec<u8> {
    let mut b = format!("From: load@client.test\r\nX-Test-Id: {id}\r\nSubject: crash loop {id}\r\n\r\n").into_bytes();
    let lines = 10 + (fnv(id) % 70) as usize;
    for i in 0..lines {
        b.extend_from_slice(
            format!(
                "{id} line {i:03} {:016x} {}\r\n",
                fnv(&format!("{id}/{i}")),
                "z".repeat(64)
            )
            .as_bytes(),
        );
    }
    b
}

/// How one submission ended.
enum Submit {
    /// `250` after the final dot: the relay owns the message.
    Acked(String),
    /// A reply other than 250 (the relay refused it; nothing stored).
    Refused(String),
    /// The connection failed before the final dot was sent: nothing can have been stored.
    FailedBeforeDot,
    /// The final dot was sent but no reply came (the relay died): it may have been stored.
    FailedAfterDot,
}

/// A minimal SMTP submission client that never panics on network errors.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    fn open(port: u16) -> std::io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        let mut c = Client {
            w: s.try_clone()?,
            r: BufReader::new(s),
        };
        let g = c.reply()?;
        if !g.starts_with("220") {
            return Err(std::io::Error::other(format!("greeting {g}")));
        }
        let e = c.cmd("EHLO load.client.test")?;
        if !e.starts_with("250") {
            return Err(std::io::Error::other(format!("EHLO {e}")));
        }
        Ok(c)
    }

    fn reply(&mut self) -> std::io::Result<String> {
        let mut all = String::new();
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let more = l.as_bytes().get(3) == Some(&b'-');
            all.push_str(&l);
            if !more {
                return Ok(all.trim_end().to_owned());
            }
        }
    }

    fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    fn submit(&mut self, id: &str, rcpts: &[String]) -> Submit {
        let before = |c: &mut Client| -> std::io::Result<Option<String>> {
            let r = c.cmd("MAIL FROM:<load@client.test>")?;
            if !r.starts_with("250") {
                return Ok(Some(r));
            }
            for t in rcpts {
                let r = c.cmd(&format!("RCPT TO:<{t}>"))?;
                if !r.starts_with("250") {
                    c.cmd("RSET")?;
                    return Ok(Some(r));
                }
            }
            let r = c.cmd("DATA")?;
            if !r.starts_with("354") {
                return Ok(Some(r));
            }
            let mut data = body(id);
            data.extend_from_slice(b".\r\n");
            c.w.write_all(&data)?;
            Ok(None)
        };
        match before(self) {
            Err(_) => Submit::FailedBeforeDot,
            Ok(Some(r)) => Submit::Refused(r),
            Ok(None) => match self.reply() {
                Ok(r) if r.starts_with("250 2.0.0 Ok: queued as ") => Submit::Acked(queue_id(&r)),
                Ok(r) => Submit::Refused(r),
                Err(_) => Submit::FailedAfterDot,
            },
        }
    }
}

/// What the client threads saw.
#[derive(Default)]
struct Ledger {
    /// id -> its recipients, for every message ever attempted.
    attempted: BTreeMap<String, Vec<String>>,
    /// id -> queue id, for every message acknowledged with 250.
    acked: BTreeMap<String, String>,
    /// Ids whose final dot was sent without a reply coming back (in flight at a kill).
    in_flight: BTreeSet<String>,
    /// Replies other than 250 (id, reply).
    refused: Vec<(String, String)>,
}

struct Shared {
    port: AtomicU16,
    stop: AtomicBool,
    ledger: Mutex<Ledger>,
    etrns: AtomicUsize,
}

fn client_thread(shared: &Shared, t: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (t as u64 + 1).wrapping_mul(0x9e3779b97f4a7c15));
    let mut seq = 0usize;
    let mut retry: Option<(String, Vec<String>)> = None;
    let mut conn: Option<Client> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match Client::open(shared.port.load(Ordering::SeqCst)) {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        // A message not acknowledged is sent again (as any MTA would): same id.
        let (id, rcpts) = retry.take().unwrap_or_else(|| {
            seq += 1;
            let first = rng.usize(..NODES.len());
            let mut r = vec![format!("u{t}@{}", NODES[first])];
            if rng.u8(..4) == 0 {
                r.push(format!("v{t}@{}", NODES[(first + 1) % NODES.len()]));
            }
            (format!("t{t}-{seq:05}"), r)
        });
        shared
            .ledger
            .lock()
            .unwrap()
            .attempted
            .insert(id.clone(), rcpts.clone());
        let c = conn.as_mut().unwrap();
        match c.submit(&id, &rcpts) {
            Submit::Acked(qid) => {
                shared.ledger.lock().unwrap().acked.insert(id, qid);
            }
            Submit::Refused(r) => {
                let closing = r.starts_with("421");
                shared.ledger.lock().unwrap().refused.push((id.clone(), r));
                retry = Some((id, rcpts));
                if closing {
                    conn = None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Submit::FailedBeforeDot => {
                conn = None;
                retry = Some((id, rcpts));
            }
            Submit::FailedAfterDot => {
                shared.ledger.lock().unwrap().in_flight.insert(id.clone());
                conn = None;
                retry = Some((id, rcpts));
            }
        }
    }
}

/// ETRN for one node from the loopback address `src` (each source address has its own ETRN
/// rate limit); the reply, or None when the relay is not there.
fn etrn_from(src: Ipv4Addr, port: u16, node: &str) -> Option<String> {
    let stream = try_connect_from(src, SocketAddr::from(([127, 0, 0, 1], port))).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut c = Client {
        w: stream.try_clone().ok()?,
        r: BufReader::new(stream),
    };
    if !c.reply().ok()?.starts_with("220") {
        return None;
    }
    c.cmd("EHLO etrn.client.test").ok()?;
    let r = c.cmd(&format!("ETRN {node}")).ok()?;
    let _ = c.cmd("QUIT");
    Some(r)
}

/// Starts queue runs now and then during the load, so that kills also cut deliveries.
fn etrn_thread(shared: &Shared, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xe7e7);
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.u64(300..700)));
        let node = NODES[rng.usize(..NODES.len())];
        if let Some(r) = etrn_from(Ipv4Addr::new(127, 0, 0, 51), shared.port.load(Ordering::SeqCst), node) {
            if r.starts_with("25") {
                shared.etrns.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// The queue id in our Received header (`... with ESMTP id <qid>; date`).
fn received_id(raw: &[u8]) -> String {
    let head = String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned();
    let rest = head.split("ESMTP id ").nth(1).expect("our Received header");
    rest.split([';', ' ', '\r', '\n']).next().unwrap().to_owned()
}

/// The X-Test-Id of a delivered message and the node it went to.
fn arrival_key(t: &FaultTxn) -> (String, String) {
    let text = String::from_utf8_lossy(&t.raw_data);
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("X-Test-Id: "))
        .unwrap_or_else(|| panic!("delivered message without X-Test-Id: {text}"))
        .trim()
        .to_owned();
    assert_eq!(t.rcpts.len(), 1, "one recipient per node in this test: {:?}", t.rcpts);
    let node = t.rcpts[0].rsplit_once('@').unwrap().1.to_owned();
    (id, node)
}

#[test]
fn sigkill_loop_under_load_loses_no_acknowledged_message() {
    let seed: u64 = std::env::var("CRASH_LOOP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    println!("crash loop seed {seed} (CRASH_LOOP_SEED={seed} replays the schedule)");
    let mut rng = fastrand::Rng::with_seed(seed);

    let zone: Vec<(String, String)> = NODES.iter().map(|n| (n.to_string(), format!("mx.{n}"))).collect();
    let mx: Vec<[(u16, &str, &str); 1]> = zone.iter().map(|(_, h)| [(10, h.as_str(), SERVER_IP)]).collect();
    let entries: Vec<MxRecords> = zone.iter().zip(&mx).map(|((n, _), m)| (n.as_str(), &m[..])).collect();
    let dns = Dns::start(&mx_zone(&entries));
    let port = reserve_port();
    let server = FaultServer::start(SERVER_IP, port, FaultScript::default());
    // Small segments: rotations (new file, directory fsync) happen during the load too.
    let top = "shards = 2\nspool_segment_size = 131072";
    let mut rest = delivery_toml(&dns, port, &format!("connections_per_node = {CONNECTIONS_PER_NODE}"));
    for n in NODES {
        rest.push_str(&format!("[[node]]\nname = \"{n}\"\n"));
    }
    let mut relay = Relay::start(top, "", &rest);

    let shared = Arc::new(Shared {
        port: AtomicU16::new(relay.port),
        stop: AtomicBool::new(false),
        ledger: Mutex::new(Ledger::default()),
        etrns: AtomicUsize::new(0),
    });
    let mut threads = Vec::new();
    for t in 0..CLIENTS {
        let s = shared.clone();
        threads.push(std::thread::spawn(move || client_thread(&s, t, seed)));
    }
    {
        let s = shared.clone();
        threads.push(std::thread::spawn(move || etrn_thread(&s, seed)));
    }

    let kills = rng.usize(3..=5);
    // (just before, just after) each SIGKILL: the relay may still work in between.
    let mut kill_windows = Vec::new();
    let mut acked_at_kill = Vec::new();
    let t0 = Instant::now();
    for k in 0..kills {
        let before = shared.ledger.lock().unwrap().acked.len();
        std::thread::sleep(Duration::from_millis(rng.u64(400..1500)));
        let acked = shared.ledger.lock().unwrap().acked.len();
        let before_kill = Instant::now();
        let dir = relay.into_dir(); // SIGKILL
        kill_windows.push((before_kill, Instant::now()));
        println!(
            "kill {} at {:?}: {} acknowledged so far ({} since the last start), {} delivered",
            k + 1,
            t0.elapsed(),
            acked,
            acked - before,
            server.count()
        );
        acked_at_kill.push(acked - before);
        relay = Relay::start_in(dir, top, "", &rest);
        shared.port.store(relay.port, Ordering::SeqCst);
    }
    // Some more load on the last incarnation, then stop the clients.
    std::thread::sleep(Duration::from_millis(500));
    shared.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let ledger = std::mem::take(&mut *shared.ledger.lock().unwrap());
    assert!(
        acked_at_kill.iter().all(|n| *n >= 5),
        "every relay incarnation must be under load when it is killed: {acked_at_kill:?}"
    );
    let in_flight_deliveries = server.count();

    // Drain: ETRN every node until everything acknowledged has arrived.
    let expected: BTreeSet<(String, String)> = ledger
        .acked
        .keys()
        .flat_map(|id| {
            ledger.attempted[id]
                .iter()
                .map(move |r| (id.clone(), r.rsplit_once('@').unwrap().1.to_owned()))
        })
        .collect();
    let arrived = || -> BTreeSet<(String, String)> { server.txns().iter().map(arrival_key).collect() };
    let drain_start = Instant::now();
    let deadline = drain_start + Duration::from_secs(40);
    for round in 0u8.. {
        // A new source address each round keeps clear of the per-address ETRN rate limit.
        let src = Ipv4Addr::new(127, 0, 1, round);
        for n in NODES {
            let r = etrn_from(src, relay.port, n).expect("ETRN after the load");
            assert!(r.starts_with("25"), "ETRN {n}: {r}");
        }
        let missing: Vec<(String, String)> = expected.difference(&arrived()).cloned().collect();
        if missing.is_empty() {
            break;
        }
        // Nothing left to deliver on disk, yet messages are missing: they are lost.
        let queues_empty = NODES.iter().all(|n| relay.queued_for(n) == 0);
        assert!(
            !(queues_empty && round >= 2),
            "{} acknowledged messages are neither delivered nor queued (lost): {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages never arrived; log:\n{}",
            missing.len(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("crash loop: drained in {:?}", drain_start.elapsed());
    wait_for("every node's queue empty on disk", Duration::from_secs(15), || {
        NODES.iter().all(|n| relay.queued_for(n) == 0)
    });
    std::thread::sleep(Duration::from_millis(300)); // a late duplicate would show up now

    if let Ok(d) = std::env::var("CRASH_LOOP_KEEP_LOGS") {
        for e in std::fs::read_dir(relay.dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                std::fs::copy(e.path(), std::path::Path::new(&d).join(e.file_name())).unwrap();
            }
        }
    }
    // ---- the verdict ----
    let txns = server.txns();
    let mut count: BTreeMap<(String, String), Vec<Instant>> = BTreeMap::new();
    for t in &txns {
        count.entry(arrival_key(t)).or_default().push(t.at);
        let (id, _) = arrival_key(t);
        assert!(
            ledger.attempted.contains_key(&id),
            "delivered a message no client ever sent: {id}"
        );
        assert!(
            t.raw_data.starts_with(b"Received: from load.client.test") && t.raw_data.ends_with(&body(&id)),
            "{id} arrived damaged"
        );
    }
    for (id, node) in count.keys() {
        assert!(
            ledger.attempted[id].iter().any(|r| r.ends_with(&format!("@{node}"))),
            "{id} went to {node}, which is not one of its recipients' nodes"
        );
    }
    let lost: Vec<&(String, String)> = expected.iter().filter(|k| !count.contains_key(*k)).collect();
    let unacked_arrived: BTreeSet<&String> = count
        .keys()
        .map(|(id, _)| id)
        .filter(|id| !ledger.acked.contains_key(*id))
        .collect();
    let duplicates: Vec<(&(String, String), usize)> = count
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, v)| (k, v.len()))
        .collect();
    println!(
        "crash loop: {kills} kills, {} messages attempted, {} acknowledged ({} deliveries expected), {} in flight at a kill, {} refused replies, {} mid-load ETRNs, {} deliveries before the drain",
        ledger.attempted.len(),
        ledger.acked.len(),
        expected.len(),
        ledger.in_flight.len(),
        ledger.refused.len(),
        shared.etrns.load(Ordering::SeqCst),
        in_flight_deliveries,
    );
    println!(
        "crash loop: {} deliveries, lost {}, duplicates {} {:?}, arrived without a 250: {} {:?}",
        txns.len(),
        lost.len(),
        duplicates.len(),
        duplicates,
        unacked_arrived.len(),
        unacked_arrived
    );
    assert!(lost.is_empty(), "acknowledged but never delivered: {lost:?}");
    assert!(
        ledger.acked.len() >= 100,
        "too little load to mean anything: {}",
        ledger.acked.len()
    );
    assert!(
        shared.etrns.load(Ordering::SeqCst) >= 3,
        "queue runs were not started during the load"
    );
    // Each client has at most one message in flight when the relay dies.
    assert!(
        ledger.in_flight.len() <= kills * CLIENTS,
        "{} messages in flight at {kills} kills with {CLIENTS} clients",
        ledger.in_flight.len()
    );
    // Every duplicate is explained by a kill. Two records of one message (different queue
    // ids): the client sent it again after a kill took the 250 of the first. One record
    // delivered twice: the node's server took it just before a kill, before the relay had
    // recorded the delivery (every arrival but the last must fall in a kill's window).
    let (mut resubmitted, mut redelivered) = (0, 0);
    let mut cut_per_kill = vec![0usize; kills];
    for ((id, node), n) in &duplicates {
        let mut by_qid: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
        for t in txns.iter().filter(|t| arrival_key(t) == (id.clone(), node.clone())) {
            by_qid.entry(received_id(&t.raw_data)).or_default().push(t.at);
        }
        for v in by_qid.values_mut() {
            v.sort();
        }
        let detail = || {
            let rel: BTreeMap<&String, Vec<Duration>> = by_qid
                .iter()
                .map(|(q, v)| (q, v.iter().map(|a| a.duration_since(t0)).collect()))
                .collect();
            let kills: Vec<(Duration, Duration)> = kill_windows
                .iter()
                .map(|(a, b)| (a.duration_since(t0), b.duration_since(t0)))
                .collect();
            format!("{id} arrived {n} times at {node}: queue id -> arrivals {rel:?}; kills {kills:?}; in flight at a kill: {}", ledger.in_flight.contains(id))
        };
        if by_qid.len() > 1 {
            resubmitted += 1;
            assert!(
                ledger.in_flight.contains(id),
                "stored twice but never in flight: {}",
                detail()
            );
        }
        for ats in by_qid.values().filter(|v| v.len() > 1) {
            redelivered += 1;
            for at in &ats[..ats.len() - 1] {
                // The first kill that ends after this arrival must have cut it short: it came
                // at most a second (a generous bound for a loaded machine; normally well under
                // a millisecond) before the kill.
                let k = kill_windows.iter().position(|(_, end)| *at <= *end);
                let cut = k.filter(|k| kill_windows[*k].0.saturating_duration_since(*at) < Duration::from_secs(1));
                let Some(k) = cut else {
                    panic!("delivered again although no kill cut the delivery: {}", detail());
                };
                cut_per_kill[k] += 1;
            }
        }
        println!("duplicate: {}", detail());
    }
    println!("crash loop: duplicates from a re-sent submission {resubmitted}, redelivered after a kill {redelivered} (deliveries cut per kill {cut_per_kill:?})");
    // A connection has at most one message between the node's 250 and the relay's state
    // write, so a kill can cut at most that many deliveries.
    assert!(
        cut_per_kill.iter().all(|n| *n <= NODES.len() * CONNECTIONS_PER_NODE),
        "more deliveries cut by one kill than connections: {cut_per_kill:?}"
    );
    let bound = kills * (2 * CLIENTS + NODES.len() * CONNECTIONS_PER_NODE);
    assert!(
        duplicates.len() <= bound,
        "{} duplicates for {kills} kills (at most {bound} can be in flight)",
        duplicates.len()
    );
    // Anything that arrived without a 250 was in flight at a kill (or the last attempt when
    // the clients stopped): it counts as neither lost nor acknowledged.
    for id in &unacked_arrived {
        assert!(
            ledger.in_flight.contains(*id),
            "{id} arrived, was never acknowledged nor in flight"
        );
    }
}
