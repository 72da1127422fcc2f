//! End-to-end: receiving servers and DNS servers that misbehave (issue 5, "Downstream faults").
//! A node's server that drops the connection in the middle of DATA, stalls past the timeouts,
//! answers slowly, refuses the session with 421, or rejects MAIL with 5xx; a DNS server that
//! never answers or answers SERVFAIL. Each test checks the outcome (defer, next MX, bounce),
//! that ETRN still answers at once, and that nothing is lost: the queue count on disk and the
//! arrivals at a healthy server afterwards, exactly once and byte for byte.
//!
//! Receiving servers are [`FaultServer`]s / [`ScriptedServer`]s on 127.0.0.x behind dnsmasq MX
//! records; the DNS faults come from a tiny UDP responder in this file.
mod common;
use common::*;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// "Immediately" for an ETRN reply (the queue run goes on in the background).
const ETRN_FAST: Duration = Duration::from_millis(100);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn node(name: &str) -> String {
    format!("[[node]]\nname = \"{name}\"\n")
}

fn relay_with(top: &str, dns_port: u16, dns_timeout: &str, port: u16, delivery: &str, nodes: &[&str]) -> Relay {
    let rest = format!(
        "[dns]\nnameservers = [\"127.0.0.1:{dns_port}\"]\ntimeout_secs = {dns_timeout}\n[delivery]\nport = {port}\n{delivery}\n{}",
        nodes.iter().map(|n| node(n)).collect::<String>()
    );
    Relay::start(top, "", &rest)
}

/// A message whose body names it, `lines` lines long; some lines start with a dot.
fn body(tag: &str, lines: usize) -> Vec<u8> {
    let mut b = format!("From: a@client.test\r\nX-Test-Id: {tag}\r\nSubject: fault {tag}\r\n\r\n").into_bytes();
    for i in 0..lines {
        let dot = if i % 7 == 0 { "." } else { "" };
        b.extend_from_slice(format!("{dot}{tag} line {i:05} {}\r\n", "y".repeat(70)).as_bytes());
    }
    b
}

fn submit(relay: &Relay, from: &str, rcpt: &str, body: &[u8]) -> String {
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.send_mail(from, &[rcpt], body);
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.cmd("QUIT");
    queue_id(&r)
}

/// Asserts a fast `253 ... <n> pending` reply to ETRN.
fn etrn_253(relay: &Relay, node: &str, n: usize) {
    let (r, took) = timed_etrn(relay, node);
    assert_eq!(r, format!("253 2.0.0 OK, {n} pending messages for node {node} started"));
    assert!(took < ETRN_FAST, "ETRN {node} took {took:?}");
}

/// The X-Test-Id of a transaction's data.
fn txn_id(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.lines()
        .find_map(|l| l.strip_prefix("X-Test-Id: "))
        .unwrap_or_else(|| panic!("no X-Test-Id in {text}"))
        .trim()
        .to_owned()
}

/// Checks that the server received exactly the messages `tags` (made with [`body`] and
/// `lines`), each once, byte for byte after our Received header, dot-stuffed on the wire.
fn assert_exact(raws: &[Vec<u8>], tags: &[String], lines: usize) {
    let got: Vec<String> = raws.iter().map(|r| txn_id(r)).collect();
    let unique: BTreeSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicates: {got:?}");
    assert_eq!(unique, tags.iter().collect::<BTreeSet<_>>());
    for raw in raws {
        let id = txn_id(raw);
        assert!(
            raw.starts_with(b"Received: from client.test"),
            "{}",
            String::from_utf8_lossy(raw)
        );
        let want = dot_stuff(&body(&id, lines));
        assert!(raw.ends_with(&want), "{id}: body changed on the way");
    }
}

fn fault_raws(s: &FaultServer) -> Vec<Vec<u8>> {
    s.txns().into_iter().map(|t| t.raw_data).collect()
}

// ---- the receiving server drops the connection in the middle of DATA ---------------------------

#[test]
fn connection_dropped_in_data_defers_and_a_later_etrn_delivers_exactly_once() {
    let dns = Dns::start(&mx_zone(&[("drop.test", &[(10, "mx.drop.test", "127.0.0.2")])]));
    let port = reserve_port();
    let server = FaultServer::start(
        "127.0.0.2",
        port,
        FaultScript {
            drop_in_data_after: Some(8 * 1024),
            ..FaultScript::default()
        },
    );
    let relay = relay_with(
        "shards = 2",
        dns.port,
        "1",
        port,
        "timeout_scale = 0.01\nconnections_per_node = 2",
        &["drop.test"],
    );
    let lines = 600; // ~50 kB: the server hangs up while the body is still streaming
    let tags: Vec<String> = (0..3).map(|i| format!("drop{i}")).collect();
    for t in &tags {
        submit(&relay, "a@client.test", "x@drop.test", &body(t, lines));
    }
    etrn_253(&relay, "drop.test", 3);
    wait_run_finished(&relay, "drop.test", 1, secs(15));
    // Each message was tried once in the run, and every try was cut off.
    assert_eq!(server.events_with("dropped in data"), 3, "{:?}", server.events());
    assert_eq!(server.count(), 0);
    assert_eq!(
        relay.log_lines_with(&["delivery attempt failed; deferred"]),
        3,
        "{}",
        relay.log()
    );
    assert_eq!(
        relay.log_lines_with(&["queue run finished", "delivered=0", "deferred=3"]),
        1
    );
    assert_eq!(
        relay.queued_for("drop.test"),
        3,
        "nothing lost, nothing marked delivered"
    );

    // The server is healthy again: the next ETRN delivers each message exactly once.
    server.set(FaultScript::default());
    etrn_253(&relay, "drop.test", 3);
    wait_for("3 messages at the healed server", secs(15), || server.count() >= 3);
    wait_run_finished(&relay, "drop.test", 2, secs(15));
    std::thread::sleep(Duration::from_millis(300));
    assert_exact(&fault_raws(&server), &tags, lines);
    wait_for("queue empty on disk", secs(10), || relay.queued_for("drop.test") == 0);
}

// ---- the receiving server stalls past the timeouts ---------------------------------------------

#[test]
fn stalled_server_is_given_up_on_and_mail_deferred_while_etrn_answers_at_once() {
    let dns = Dns::start(&mx_zone(&[("stall.test", &[(10, "mx.stall.test", "127.0.0.3")])]));
    let port = reserve_port();
    let server = FaultServer::start(
        "127.0.0.3",
        port,
        FaultScript {
            stall: Some(Stall::Greeting),
            ..FaultScript::default()
        },
    );
    // 0.002 x the RFC 5321 timeouts: greeting 0.6 s, end of data 1.2 s.
    let relay = relay_with(
        "shards = 2",
        dns.port,
        "1",
        port,
        "timeout_scale = 0.002",
        &["stall.test"],
    );
    let tags: Vec<String> = (0..2).map(|i| format!("stall{i}")).collect();
    for t in &tags {
        submit(&relay, "a@client.test", "x@stall.test", &body(t, 20));
    }

    // 1. No greeting: the relay waits the greeting timeout, gives up, defers.
    let t0 = Instant::now();
    etrn_253(&relay, "stall.test", 2);
    // While the run waits for a greeting, ETRN for the same node still answers at once.
    std::thread::sleep(Duration::from_millis(200));
    etrn_253(&relay, "stall.test", 2);
    wait_run_finished(&relay, "stall.test", 1, secs(10));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(550),
        "gave up before the greeting timeout: {took:?}"
    );
    assert!(took < secs(5), "{took:?}");
    assert!(relay.log().contains("timed out in phase greeting"), "{}", relay.log());
    assert_eq!(relay.queued_for("stall.test"), 2);
    // The relay closed the stalled connections itself.
    wait_for("relay closes the stalled connections", secs(5), || {
        server.events_with("closed by client after stall") == server.events_with("stall Greeting")
    });
    assert!(server.events_with("stall Greeting") >= 1);

    // 2. The server takes the whole message and never answers the final dot.
    server.set(FaultScript {
        stall: Some(Stall::DataEnd),
        ..FaultScript::default()
    });
    etrn_253(&relay, "stall.test", 2);
    wait_run_finished(&relay, "stall.test", 2, secs(10));
    assert!(relay.log().contains("timed out in phase data end"), "{}", relay.log());
    assert_eq!(server.events_with("stall DataEnd"), 2, "{:?}", server.events());
    assert_eq!(
        relay.queued_for("stall.test"),
        2,
        "an unanswered DATA is not a delivery"
    );

    // 3. Healthy again: delivered, once each.
    server.set(FaultScript::default());
    etrn_253(&relay, "stall.test", 2);
    wait_for("2 messages delivered", secs(10), || server.count() >= 2);
    wait_run_finished(&relay, "stall.test", 3, secs(10));
    std::thread::sleep(Duration::from_millis(200));
    assert_exact(&fault_raws(&server), &tags, 20);
    wait_for("queue empty on disk", secs(10), || relay.queued_for("stall.test") == 0);
}

// ---- the receiving server answers slowly ---------------------------------------------------------

#[test]
fn slow_server_gets_every_message_and_other_nodes_etrn_at_once_meanwhile() {
    let dns = Dns::start(&mx_zone(&[
        ("slow.test", &[(10, "mx.slow.test", "127.0.0.4")]),
        ("quick.test", &[(10, "mx.quick.test", "127.0.0.5")]),
    ]));
    let port = reserve_port();
    let slow = FaultServer::start(
        "127.0.0.4",
        port,
        FaultScript {
            reply_delay: Duration::from_millis(200),
            ..FaultScript::default()
        },
    );
    let quick = ScriptedServer::start("127.0.0.5", port, Script::default());
    // One shard: both nodes' queue runs share one executor, so a blocked shard would show.
    let relay = relay_with(
        "shards = 1",
        dns.port,
        "1",
        port,
        "timeout_scale = 0.05",
        &["slow.test", "quick.test"],
    );
    let slow_tags: Vec<String> = (0..6).map(|i| format!("slow{i}")).collect();
    for t in &slow_tags {
        submit(&relay, "a@client.test", "x@slow.test", &body(t, 30));
    }
    for i in 0..2 {
        submit(&relay, "a@client.test", "y@quick.test", &body(&format!("quick{i}"), 30));
    }
    etrn_253(&relay, "slow.test", 6);
    wait_for("the slow server's first connection", secs(5), || {
        slow.events_with("connect") >= 1
    });
    // While the slow run is going, ETRN for the other node answers at once and its mail
    // arrives before the slow node's has.
    for _ in 0..3 {
        assert!(slow.count() < 6);
        let (r, took) = timed_etrn(&relay, "quick.test");
        assert!(r.starts_with("25"), "{r}");
        assert!(took < ETRN_FAST, "ETRN quick.test took {took:?} during the slow run");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for("quick.test's 2 messages", secs(5), || quick.count() >= 2);
    assert!(
        slow.count() < 6,
        "quick.test was served only after the slow run ended ({} of 6 done)",
        slow.count()
    );
    wait_for("all 6 at the slow server", secs(20), || slow.count() >= 6);
    wait_run_finished(&relay, "slow.test", 1, secs(10));
    std::thread::sleep(Duration::from_millis(200));
    assert_exact(&fault_raws(&slow), &slow_tags, 30);
    let quick_raws: Vec<Vec<u8>> = quick.txns().into_iter().map(|t| t.raw_data).collect();
    assert_exact(&quick_raws, &["quick0".to_owned(), "quick1".to_owned()], 30);
    assert_eq!(
        relay.log_lines_with(&["queue run finished", "node=slow.test", "delivered=6", "deferred=0"]),
        1,
        "a slow but working server defers nothing: {}",
        relay.log()
    );
    wait_for("queues empty on disk", secs(10), || {
        relay.queued_for("slow.test") == 0 && relay.queued_for("quick.test") == 0
    });
}

// ---- 421 at the greeting -------------------------------------------------------------------------

#[test]
fn greeting_421_goes_to_the_next_mx_and_defers_when_none_is_left() {
    let dns = Dns::start(&mx_zone(&[(
        "busy.test",
        &[(10, "mxa.busy.test", "127.0.0.6"), (20, "mxb.busy.test", "127.0.0.7")],
    )]));
    let port = reserve_port();
    let busy = FaultScript {
        greeting: "421 4.3.2 Service shutting down, try later".into(),
        ..FaultScript::default()
    };
    let mxa = FaultServer::start("127.0.0.6", port, busy.clone());
    let mxb = FaultServer::start("127.0.0.7", port, FaultScript::default());
    let relay = relay_with(
        "shards = 2",
        dns.port,
        "1",
        port,
        "timeout_scale = 0.01",
        &["busy.test"],
    );
    let tags: Vec<String> = (0..2).map(|i| format!("busy{i}")).collect();
    for t in &tags {
        submit(&relay, "a@client.test", "x@busy.test", &body(t, 20));
    }
    etrn_253(&relay, "busy.test", 2);
    wait_for("2 messages at the second MX", secs(10), || mxb.count() >= 2);
    wait_run_finished(&relay, "busy.test", 1, secs(10));
    assert!(mxa.events_with("connect") >= 1, "the preferred MX was not tried first");
    assert_eq!(mxa.count(), 0);
    assert!(relay.log().contains("rejected by server: 421"), "{}", relay.log());
    assert_exact(&fault_raws(&mxb), &tags, 20);
    wait_for("queue empty on disk", secs(10), || relay.queued_for("busy.test") == 0);

    // Every MX says 421: deferred, kept; once the preferred one recovers it gets the mail.
    mxb.set(busy);
    submit(&relay, "a@client.test", "x@busy.test", &body("busy2", 20));
    etrn_253(&relay, "busy.test", 1);
    wait_run_finished(&relay, "busy.test", 2, secs(10));
    assert_eq!(relay.queued_for("busy.test"), 1);
    assert_eq!(mxa.count() + mxb.count(), 2);
    mxa.set(FaultScript::default());
    etrn_253(&relay, "busy.test", 1);
    wait_for("the message at the recovered MX", secs(10), || mxa.count() >= 1);
    wait_run_finished(&relay, "busy.test", 3, secs(10));
    assert_exact(&fault_raws(&mxa), &["busy2".to_owned()], 20);
    assert_eq!(mxb.count(), 2);
    wait_for("queue empty on disk", secs(10), || relay.queued_for("busy.test") == 0);
}

// ---- 5xx at MAIL ---------------------------------------------------------------------------------

#[test]
fn mail_5xx_bounces_to_a_sender_at_a_node_and_removes_the_message() {
    let dns = Dns::start(&mx_zone(&[
        ("picky.test", &[(10, "mx.picky.test", "127.0.0.8")]),
        ("stepwise.test", &[(10, "mx.stepwise.test", "127.0.0.9")]),
        ("origin.test", &[(10, "mx.origin.test", "127.0.0.10")]),
    ]));
    let port = reserve_port();
    let reject = "550 5.7.1 Sender blocked by local policy";
    // With PIPELINING (MAIL, RCPT, DATA in one write) and without (one command at a time).
    let picky = FaultServer::start(
        "127.0.0.8",
        port,
        FaultScript {
            mail_reply: reject.into(),
            ..FaultScript::default()
        },
    );
    let stepwise = FaultServer::start(
        "127.0.0.9",
        port,
        FaultScript {
            mail_reply: reject.into(),
            ehlo_keywords: vec!["8BITMIME".into()],
            ..FaultScript::default()
        },
    );
    let origin = ScriptedServer::start("127.0.0.10", port, Script::default());
    let relay = relay_with(
        "shards = 2",
        dns.port,
        "1",
        port,
        "timeout_scale = 0.01",
        &["picky.test", "stepwise.test", "origin.test"],
    );
    let q1 = submit(&relay, "alice@origin.test", "x@picky.test", &body("mail5xx-a", 10));
    let q2 = submit(&relay, "bob@origin.test", "y@stepwise.test", &body("mail5xx-b", 10));
    submit(&relay, "carol@outside.test", "z@picky.test", &body("mail5xx-c", 10));
    etrn_253(&relay, "picky.test", 2);
    etrn_253(&relay, "stepwise.test", 1);
    wait_run_finished(&relay, "picky.test", 1, secs(10));
    wait_run_finished(&relay, "stepwise.test", 1, secs(10));
    assert_eq!(picky.count() + stepwise.count(), 0);
    // Removed from the nodes' queues: a 5xx is final.
    assert_eq!(relay.queued_for("picky.test"), 0);
    assert_eq!(relay.queued_for("stepwise.test"), 0);
    assert_eq!(
        relay.log_lines_with(&["recipient failed permanently", "code=550"]),
        3,
        "{}",
        relay.log()
    );
    // Two DSNs wait for origin.test; the one for the sender outside every node goes to that
    // sender's own MX (outside.test has none in this DNS: given up as undeliverable, logged).
    assert_eq!(relay.queued_for("origin.test"), 2);
    assert_eq!(
        relay.log_lines_with(&["bounce queued", "to=carol@outside.test"]),
        1,
        "{}",
        relay.log()
    );
    wait_for("the outside bounce attempt", secs(10), || {
        relay.log_lines_with(&["bounce undeliverable (DNS)", "domain=outside.test"]) == 1
    });
    etrn_253(&relay, "origin.test", 2);
    wait_for("2 bounces at origin.test", secs(10), || origin.count() >= 2);
    std::thread::sleep(Duration::from_millis(200));
    let dsns = origin.txns();
    assert_eq!(dsns.len(), 2);
    for (qid, sender, rcpt, tag) in [
        (&q1, "alice@origin.test", "x@picky.test", "mail5xx-a"),
        (&q2, "bob@origin.test", "y@stepwise.test", "mail5xx-b"),
    ] {
        let dsn = dsns
            .iter()
            .find(|t| t.rcpts == [sender.to_owned()])
            .unwrap_or_else(|| panic!("no bounce to {sender}: {dsns:?}"));
        assert!(dsn.mail.starts_with("<> "), "a DSN has the null sender: {}", dsn.mail);
        let text = String::from_utf8_lossy(&dsn.raw_data);
        assert!(text.contains("multipart/report"), "{text}");
        assert!(text.contains(&format!("Final-Recipient: rfc822; {rcpt}")), "{text}");
        assert!(text.contains("Status: 5.7.1"), "{text}");
        assert!(text.contains("550 5.7.1 Sender blocked by local policy"), "{text}");
        assert!(
            text.contains(qid.as_str()),
            "the DSN names the original queue id: {text}"
        );
        assert!(
            text.contains(&format!("X-Test-Id: {tag}")),
            "the original is returned: {text}"
        );
    }
}

// ---- DNS: a server that never answers, and one that answers SERVFAIL -----------------------------

const DNS_SILENT: u8 = 0;
const DNS_SERVFAIL: u8 = 1;
const DNS_FORWARD: u8 = 2;

/// A UDP DNS responder for 127.0.0.1 that, by mode, never answers, answers every query with
/// SERVFAIL (RCODE 2, id and question copied), or forwards to `upstream` (a working dnsmasq)
/// and relays the answer.
struct FlakyDns {
    port: u16,
    mode: Arc<AtomicU8>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FlakyDns {
    fn start(upstream: u16, mode: u8) -> FlakyDns {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let port = sock.local_addr().unwrap().port();
        let d = FlakyDns {
            port,
            mode: Arc::new(AtomicU8::new(mode)),
            queries: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (m, q, s) = (d.mode.clone(), d.queries.clone(), d.stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                let query = buf[..n].to_vec();
                match m.load(Ordering::SeqCst) {
                    DNS_SERVFAIL => {
                        if let Some(r) = servfail(&query) {
                            let _ = sock.send_to(&r, peer);
                        }
                    }
                    DNS_FORWARD => {
                        let sock = sock.try_clone().unwrap();
                        std::thread::spawn(move || {
                            if let Some(r) = forward(upstream, &query) {
                                let _ = sock.send_to(&r, peer);
                            }
                        });
                    }
                    _ => {} // silent
                }
            }
        });
        d
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for FlakyDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The SERVFAIL answer to `query`, built from its bytes: same id, QR set, opcode and RD kept,
/// RA set, RCODE 2, the question copied, no other records.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut end = 12;
    loop {
        let len = *query.get(end)? as usize;
        end += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None; // no compression in a question we sent ourselves
        }
        end += len;
    }
    end += 4; // QTYPE, QCLASS
    if end > query.len() {
        return None;
    }
    let mut r = query[..end].to_vec();
    r[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD
    r[3] = 0x80 | 0x02; // RA, RCODE = SERVFAIL
    r[4..6].copy_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    r[6..12].fill(0); // ANCOUNT, NSCOUNT, ARCOUNT
    Some(r)
}

fn forward(upstream: u16, query: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.connect(SocketAddr::from(([127, 0, 0, 1], upstream))).ok()?;
    s.send(query).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

#[test]
fn servfail_answer_is_well_formed() {
    // A query for "a.test MX" with id 0xbeef, RD, and an EDNS OPT record in the additional
    // section (which the answer must not copy).
    let mut q = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    q.extend_from_slice(b"\x01a\x04test\x00\x00\x0f\x00\x01");
    q.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);
    let r = servfail(&q).unwrap();
    assert_eq!(&r[..4], &[0xbe, 0xef, 0x81, 0x82]);
    assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&r[12..], b"\x01a\x04test\x00\x00\x0f\x00\x01");
    assert_eq!(servfail(&q[..14]), None);
}

/// DNS fails in `mode`: mail stays queued however often ETRN is sent, and every ETRN answers
/// at once; when DNS works again the same relay delivers it, exactly once.
fn dns_failure_keeps_mail_queued(mode: u8, node_name: &str, ip: &str, log_hint: &str) {
    let good = Dns::start(&mx_zone(&[(node_name, &[(10, &format!("mx.{node_name}"), ip)])]));
    let flaky = FlakyDns::start(good.port, mode);
    let port = reserve_port();
    let server = ScriptedServer::start(ip, port, Script::default());
    let relay = relay_with(
        "shards = 2",
        flaky.port,
        "0.2",
        port,
        "timeout_scale = 0.01",
        &[node_name],
    );
    let tags: Vec<String> = (0..2).map(|i| format!("{node_name}-{i}")).collect();
    for t in &tags {
        submit(&relay, "a@client.test", &format!("x@{node_name}"), &body(t, 10));
    }
    etrn_253(&relay, node_name, 2);
    // Still resolving (two 0.2 s attempts): another ETRN joins and answers at once.
    etrn_253(&relay, node_name, 2);
    wait_run_finished(&relay, node_name, 1, secs(10));
    assert!(flaky.queries() >= 1, "the relay never asked the DNS server");
    let log = relay.log();
    assert!(
        log.contains("cannot resolve the node's servers; mail stays queued"),
        "{log}"
    );
    assert!(log.contains(log_hint), "expected {log_hint:?} in the log:\n{log}");
    assert_eq!(relay.queued_for(node_name), 2);
    assert_eq!(server.count(), 0);
    // Again: still nothing lost, still an immediate answer.
    etrn_253(&relay, node_name, 2);
    wait_run_finished(&relay, node_name, 2, secs(10));
    assert_eq!(relay.queued_for(node_name), 2);

    // DNS recovers (no restart): the failure was not cached, the mail goes out.
    flaky.set(DNS_FORWARD);
    etrn_253(&relay, node_name, 2);
    wait_for("delivery once DNS works", secs(10), || server.count() >= 2);
    wait_run_finished(&relay, node_name, 3, secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let raws: Vec<Vec<u8>> = server.txns().into_iter().map(|t| t.raw_data).collect();
    assert_exact(&raws, &tags, 10);
    wait_for("queue empty on disk", secs(10), || relay.queued_for(node_name) == 0);
}

#[test]
fn dns_server_that_never_answers_keeps_mail_queued_and_etrn_immediate() {
    dns_failure_keeps_mail_queued(DNS_SILENT, "dnsdead.test", "127.0.0.11", "timed out");
}

#[test]
fn dns_servfail_keeps_mail_queued_then_a_working_dns_delivers_it() {
    dns_failure_keeps_mail_queued(DNS_SERVFAIL, "servfail.test", "127.0.0.12", "Server Failure");
}
