//! End-to-end: ETRN (RFC 1985) against the real binary, with a real DNS server (dnsmasq),
//! real receiving servers (Postfix's smtp-sink, and a scripted server that records the wire
//! bytes) on 127.0.0.x addresses. Issue 3.
//!
//! Every test starts its own relay, DNS server and sinks; the sinks of one test share one
//! delivery port ([`reserve_port`]) on different loopback addresses.
mod common;
use common::*;

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The zone every test uses (each test only touches the names it configures as nodes).
fn zone() -> Vec<String> {
    let mut z = mx_zone(&[
        ("node1.test", &[(10, "mx.node1.test", "127.0.0.2")]),
        ("node2.test", &[(10, "mx.node2.test", "127.0.0.3")]),
        ("origin.test", &[(10, "mx.origin.test", "127.0.0.3")]),
        ("a.grp.test", &[(10, "mx.a.grp.test", "127.0.0.4")]),
        ("b.grp.test", &[(10, "mx.b.grp.test", "127.0.0.5")]),
        ("q1.test", &[(10, "mx.q1.test", "127.0.0.6")]),
        ("q2.test", &[(10, "mx.q2.test", "127.0.0.7")]),
        ("other.test", &[(10, "mx.other.test", "127.0.0.8")]),
        (
            "failover.test",
            &[
                (10, "mxa.failover.test", "127.0.0.10"),
                (20, "mxb.failover.test", "127.0.0.11"),
            ],
        ),
        (
            "ownmx.test",
            &[
                (3, "better.ownmx.test", "127.0.0.13"),
                (5, "relay.test", "127.0.0.12"),
                (10, "worse.ownmx.test", "127.0.0.14"),
            ],
        ),
        ("plain.test", &[(10, "mx.plain.test", "127.0.0.8")]),
        ("md5.test", &[(10, "mx.md5.test", "127.0.0.8")]),
        ("nullmx.test", &[(0, ".", "")]),
    ]);
    z.sort();
    z.dedup();
    z
}

fn node(name: &str, extra: &str) -> String {
    format!("[[node]]\nname = \"{name}\"\n{extra}\n")
}

/// A relay with 2 shards (so ETRN crosses shards for half the nodes), the test DNS and port.
fn relay(dns: &Dns, port: u16, smtp_extra: &str, delivery_extra: &str, nodes: &[String]) -> Relay {
    let rest = format!("{}{}", delivery_toml(dns, port, delivery_extra), nodes.concat());
    Relay::start("shards = 2", smtp_extra, &rest)
}

/// One message over its own connection; returns the queue id.
fn submit(relay: &Relay, from: &str, rcpts: &[&str], body: &[u8]) -> String {
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.send_mail(from, rcpts, body);
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.cmd("QUIT");
    queue_id(&r)
}

/// `n` messages to `rcpt`, each with a unique `X-Test-Id: <tag>-<i>`, over `conns` parallel
/// connections.
fn submit_many(relay: &Relay, rcpt: &str, tag: &str, n: usize, conns: usize) {
    std::thread::scope(|s| {
        for k in 0..conns {
            s.spawn(move || {
                let mut c = relay.client();
                assert!(c.cmd("EHLO client.test").starts_with("250"));
                for i in (k..n).step_by(conns) {
                    let body = format!(
                        "From: a@client.test\r\nX-Test-Id: {tag}-{i}\r\nMessage-ID: <{tag}-{i}@client.test>\r\nSubject: {tag} {i}\r\n\r\nbody {i}\r\n"
                    );
                    let r = c.send_mail("a@client.test", &[rcpt], body.as_bytes());
                    assert!(r.starts_with("250 2.0.0"), "{r}");
                }
                c.cmd("QUIT");
            });
        }
    });
}

/// EHLO + ETRN on a fresh connection; the ETRN reply.
fn etrn(relay: &Relay, arg: &str) -> String {
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.cmd(&format!("ETRN {arg}"));
    c.cmd("QUIT");
    r
}

/// Number of finished queue runs of `node` in the log.
fn runs_finished(relay: &Relay, node: &str) -> usize {
    relay.log_lines_with(&["queue run finished", &format!("node={node}")])
}

fn wait_runs_finished(relay: &Relay, node: &str, n: usize) {
    let deadline = Instant::now() + secs(20);
    while Instant::now() < deadline {
        if runs_finished(relay, node) >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("queue run {n} of {node} did not finish; log:\n{}", relay.log());
}

fn wait_count(what: &str, relay: &Relay, want: usize, count: impl Fn() -> usize) {
    let deadline = Instant::now() + secs(20);
    while Instant::now() < deadline {
        if count() >= want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: got {} of {want}; log:\n{}", count(), relay.log());
}

/// X-Test-Id values of the messages a sink saved.
fn test_ids(sink: &Sink) -> Vec<String> {
    sink.complete_messages()
        .iter()
        .filter_map(|f| header_value(&sink_message(f).1, "X-Test-Id"))
        .collect()
}

/// Splits a delivered message (LF or CRLF line ends) into our Received header and the rest,
/// asserting the header's exact form.
fn strip_our_received<'a>(msg: &'a [u8], qid: &str, for_rcpt: Option<&str>, eol: &str) -> &'a [u8] {
    let text = String::from_utf8_lossy(msg);
    let mut want =
        format!("Received: from client.test ([127.0.0.1]){eol}\tby relay.test (etrn-relay) with ESMTP id {qid}");
    if let Some(r) = for_rcpt {
        want.push_str(&format!("{eol}\tfor <{r}>"));
    }
    want.push_str("; ");
    assert!(
        text.starts_with(&want),
        "expected our Received header\n{want}\n--- got ---\n{text}"
    );
    // The header ends at the first line end not followed by a tab.
    let mut i = 0;
    loop {
        let nl = memchr::memchr(b'\n', &msg[i..])
            .map(|p| i + p + 1)
            .expect("end of Received");
        i = nl;
        if msg.get(i) != Some(&b'\t') {
            return &msg[i..];
        }
    }
}

// ---- 1. byte-exact delivery ------------------------------------------------------------------

#[test]
fn delivery_is_byte_exact_dot_stuffing_8bit_and_two_nodes() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let sink = Sink::start("127.0.0.2", port, &[]);
    let wire = ScriptedServer::start("127.0.0.3", port, Script::default());
    let relay = relay(&dns, port, "", "", &[node("node1.test", ""), node("node2.test", "")]);

    // Lines that need dot-stuffing, one that only looks like the end, and a CRLF-less tail.
    let dots: &[u8] = b"From: a@client.test\r\nX-Test-Id: dots\r\nSubject: dots\r\n\r\n.\r\n..\r\n.x\r\n...\r\n. \r\nmid.dle\r\n.\r\nlast";
    let dots_sent = dot_stuff(dots); // what the relay must hand on, unstuffed: dots + CRLF
    let dots_stored = {
        let mut v = dots.to_vec();
        v.extend_from_slice(b"\r\n");
        v
    };
    assert_eq!(dots_sent.len(), dots_stored.len() + 6, "six lines start with a dot");
    let qid_dots = submit(&relay, "a@client.test", &["x@node1.test", "y@node2.test"], dots);

    // 8-bit body, announced with BODY=8BITMIME.
    let utf8 = "From: a@client.test\r\nX-Test-Id: utf8\r\nSubject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln \u{2014} \u{65e5}\u{672c}\u{8a9e} \u{1f600}\r\n.\u{e9}t\u{e9}\r\n\u{ff}\r\n";
    let qid_utf8 = {
        let mut c = relay.client();
        assert!(c.cmd("EHLO client.test").contains("8BITMIME"));
        assert!(c.cmd("MAIL FROM:<a@client.test> BODY=8BITMIME").starts_with("250"));
        assert!(c.cmd("RCPT TO:<x@node1.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<y@node2.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(&dot_stuff(utf8.as_bytes()));
        c.send(b".\r\n");
        let r = c.read_reply();
        assert!(r.starts_with("250 2.0.0"), "{r}");
        queue_id(&r)
    };
    // A plain single-recipient message (our Received header then says `for <x@node1.test>`).
    let single = b"From: a@client.test\r\nX-Test-Id: single\r\n\r\nhello\r\n";
    let qid_single = submit(&relay, "a@client.test", &["x@node1.test"], single);

    // Stored once, owed to both nodes.
    assert_eq!(relay.queued_for("node1.test"), 3);
    assert_eq!(relay.queued_for("node2.test"), 2);

    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 3 pending messages for node node1.test started"
    );
    assert_eq!(
        etrn(&relay, "node2.test"),
        "253 2.0.0 OK, 2 pending messages for node node2.test started"
    );
    wait_count("messages at node1's smtp-sink", &relay, 3, || sink.complete_count());
    wait_count("messages at node2's server", &relay, 2, || wire.count());

    // node1: smtp-sink stores LF line ends; compare after our Received header.
    let mut by_id: HashMap<String, (String, Vec<u8>)> = HashMap::new();
    for f in sink.complete_messages() {
        let (env, msg) = sink_message(&f);
        let id = header_value(strip_prefix_received(&msg), "X-Test-Id").expect("X-Test-Id");
        assert!(by_id.insert(id, (env, msg)).is_none(), "duplicate delivery");
    }
    let (env, msg) = &by_id["dots"];
    assert!(env.contains("X-Mail-Args: <a@client.test>"), "{env}");
    assert!(
        env.contains("X-Rcpt-Args: <x@node1.test>") && !env.contains("node2"),
        "{env}"
    );
    assert_eq!(
        String::from_utf8_lossy(strip_our_received(msg, &qid_dots, None, "\n")),
        String::from_utf8_lossy(&crlf_to_lf(&dots_stored))
    );
    let (env, msg) = &by_id["utf8"];
    assert!(
        env.contains("BODY=8BITMIME"),
        "8-bit mail must be sent with BODY=8BITMIME: {env}"
    );
    assert_eq!(
        strip_our_received(msg, &qid_utf8, None, "\n"),
        &crlf_to_lf(utf8.as_bytes())[..]
    );
    let (env, msg) = &by_id["single"];
    assert!(
        !env.contains("BODY=8BITMIME"),
        "7-bit mail is not announced as 8-bit: {env}"
    );
    assert_eq!(
        strip_our_received(msg, &qid_single, Some("x@node1.test"), "\n"),
        &crlf_to_lf(single)[..]
    );

    // node2: the exact wire bytes, CRLF and dot-stuffing included.
    let txns = wire.txns();
    let t = txns
        .iter()
        .find(|t| t.mail.starts_with("<a@client.test>") && !t.mail.contains("8BIT"))
        .unwrap();
    assert_eq!(t.rcpts, vec!["y@node2.test".to_string()]);
    let rest = strip_our_received(&t.raw_data, &qid_dots, None, "\r\n");
    assert_eq!(
        String::from_utf8_lossy(rest),
        String::from_utf8_lossy(&dots_sent),
        "dot-stuffed on the wire"
    );
    let t = txns
        .iter()
        .find(|t| t.mail.contains("BODY=8BITMIME"))
        .expect("8-bit message with BODY=8BITMIME");
    assert!(t.mail.starts_with("<a@client.test>"), "{}", t.mail);
    let rest = strip_our_received(&t.raw_data, &qid_utf8, None, "\r\n");
    assert_eq!(rest, &dot_stuff(utf8.as_bytes())[..]);

    // Delivered everywhere: nothing left.
    wait_runs_finished(&relay, "node1.test", 1);
    wait_runs_finished(&relay, "node2.test", 1);
    assert_eq!(relay.queued_for("node1.test"), 0);
    assert_eq!(relay.queued_for("node2.test"), 0);
    assert_eq!(sink.count(), 3, "no duplicates");
    assert_eq!(wire.count(), 2, "no duplicates");
}

/// The message after the first header line block that starts with `Received:` (ours).
fn strip_prefix_received(msg: &[u8]) -> &[u8] {
    assert!(msg.starts_with(b"Received: "));
    let mut i = 0;
    loop {
        let nl = memchr::memchr(b'\n', &msg[i..]).map(|p| i + p + 1).unwrap_or(msg.len());
        i = nl;
        if i >= msg.len() || msg[i] != b'\t' {
            return &msg[i..];
        }
    }
}

// ---- 2. replies ----------------------------------------------------------------------------

#[test]
fn replies_251_253_exact_count_and_errors() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let sink = Sink::start("127.0.0.2", port, &[]);
    let relay = relay(&dns, port, "", "", &[node("node1.test", ""), node("node2.test", "")]);

    let ehlo = relay.client().cmd("EHLO client.test");
    assert!(
        ehlo.lines().any(|l| l == "250-ETRN" || l == "250 ETRN"),
        "ETRN advertised: {ehlo}"
    );

    assert_eq!(
        etrn(&relay, "node2.test"),
        "251 2.0.0 OK, no messages waiting for node node2.test"
    );
    submit_many(&relay, "u@node1.test", "seven", 7, 1);
    assert_eq!(relay.queued_for("node1.test"), 7);
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 7 pending messages for node node1.test started"
    );
    wait_count("7 messages at the sink", &relay, 7, || sink.complete_count());
    wait_runs_finished(&relay, "node1.test", 1);
    assert_eq!(
        etrn(&relay, "Node1.Test"),
        "251 2.0.0 OK, no messages waiting for node Node1.Test"
    );
    let ids: BTreeSet<String> = test_ids(&sink).into_iter().collect();
    assert_eq!(ids, (0..7).map(|i| format!("seven-{i}")).collect());

    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.cmd("ETRN unknown.test");
    assert!(r.starts_with("459 4."), "{r}");
    assert!(r.contains("Node unknown.test not allowed"), "{r}");
    let r = c.cmd("ETRN");
    assert!(r.starts_with("500 5.5.2 Syntax error"), "{r}");
    assert!(c
        .cmd("ETRN a.test b.test")
        .starts_with("501 5.5.4 Syntax error in parameters"));
    assert!(c.cmd("ETRN bad_name!").starts_with("501 5.5.4"));
    assert!(c.cmd("ETRN #").starts_with("501 5.5.4"));
    assert!(c.cmd("ETRN @").starts_with("501 5.5.4"));

    // 503 between MAIL and the end of DATA; inside DATA "ETRN" is just text.
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
    assert!(c.cmd("ETRN node1.test").starts_with("503 5.5.1"));
    assert!(c.cmd("RCPT TO:<z@node1.test>").starts_with("250"));
    assert!(c.cmd("ETRN node1.test").starts_with("503 5.5.1"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"X-Test-Id: in-data\r\n\r\nETRN node1.test\r\n.\r\n");
    assert!(c.read_reply().starts_with("250 2.0.0 Ok: queued"));
    // After the transaction ETRN works again, and RSET ends a transaction too.
    assert_eq!(
        c.cmd("ETRN node1.test"),
        "253 2.0.0 OK, 1 pending messages for node node1.test started"
    );
    wait_count("the message with ETRN in its body", &relay, 8, || sink.complete_count());
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
    assert!(c.cmd("ETRN node2.test").starts_with("503 5.5.1"));
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(c.cmd("ETRN node2.test").starts_with("251 2.0.0"));
    c.cmd("QUIT");
    wait_runs_finished(&relay, "node1.test", 2);

    // Pipelined ETRNs in one write are answered in order.
    submit_many(&relay, "u@node2.test", "pipe", 2, 1);
    let mut c = relay.client();
    c.send(b"EHLO client.test\r\nETRN node2.test\r\nETRN unknown.test\r\nETRN\r\nETRN node1.test\r\nETRN x y\r\nNOOP\r\nQUIT\r\n");
    assert!(c.read_reply().starts_with("250-relay.test"));
    assert_eq!(
        c.read_reply(),
        "253 2.0.0 OK, 2 pending messages for node node2.test started"
    );
    assert!(c.read_reply().starts_with("459 "));
    assert!(c.read_reply().starts_with("500 5.5.2"));
    assert_eq!(c.read_reply(), "251 2.0.0 OK, no messages waiting for node node1.test");
    assert!(c.read_reply().starts_with("501 5.5.4"));
    assert!(c.read_reply().starts_with("250 2.0.0"));
    assert!(c.read_reply().starts_with("221"));
}

#[test]
fn etrn_at_domain_and_hash_queue_start_every_node_they_name() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let sinks: Vec<(&str, Sink)> = [
        ("a.grp.test", "127.0.0.4"),
        ("b.grp.test", "127.0.0.5"),
        ("q1.test", "127.0.0.6"),
        ("q2.test", "127.0.0.7"),
        ("other.test", "127.0.0.8"),
    ]
    .into_iter()
    .map(|(n, ip)| (n, Sink::start(ip, port, &[])))
    .collect();
    let relay = relay(
        &dns,
        port,
        "",
        "",
        &[
            node("a.grp.test", ""),
            node("b.grp.test", ""),
            node("q1.test", "queue = \"dialup\""),
            node("q2.test", "queue = \"dialup\""),
            node("other.test", "queue = \"other\""),
        ],
    );
    for (n, _) in &sinks {
        submit_many(&relay, &format!("u@{n}"), n, 3, 1);
    }
    assert_eq!(
        etrn(&relay, "@grp.test"),
        "250 2.0.0 OK, queuing for node @grp.test started"
    );
    assert_eq!(
        etrn(&relay, "#dialup"),
        "250 2.0.0 OK, queuing for node #dialup started"
    );
    for (n, s) in &sinks[..4] {
        wait_count(&format!("mail of {n}"), &relay, 3, || s.complete_count());
        let mut ids = test_ids(s);
        ids.sort();
        assert_eq!(
            ids,
            (0..3).map(|i| format!("{n}-{i}")).collect::<Vec<_>>(),
            "{n} got its own mail"
        );
    }
    // Not named by either: still waiting.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sinks[4].1.count(), 0);
    assert_eq!(relay.queued_for("other.test"), 3);
    // A domain or queue that names no node is 459.
    assert!(etrn(&relay, "@nothing.test").starts_with("459 "));
    assert!(etrn(&relay, "#nothing").starts_with("459 "));
    // `@other.test` names exactly one node and still answers 250 (RFC 1985 for @ and #).
    assert_eq!(
        etrn(&relay, "@other.test"),
        "250 2.0.0 OK, queuing for node @other.test started"
    );
    wait_count("mail of other.test", &relay, 3, || sinks[4].1.complete_count());
}

#[test]
fn etrn_flood_from_one_client_is_rate_limited() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let relay = relay(&dns, port, "", "", &[node("node1.test", "")]);
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let mut batch = String::new();
    for _ in 0..60 {
        batch.push_str("ETRN node1.test\r\n");
    }
    c.send(batch.as_bytes());
    let replies: Vec<String> = (0..60).map(|_| c.read_reply()).collect();
    let ok = replies.iter().filter(|r| r.starts_with("251 2.0.0")).count();
    let limited: Vec<&String> = replies.iter().filter(|r| r.starts_with("458 ")).collect();
    assert_eq!(ok + limited.len(), 60, "{replies:?}");
    assert!(ok >= 1, "the first ETRNs are served: {replies:?}");
    assert!(
        limited.len() >= 20,
        "a flood is limited: {} of 60 refused",
        limited.len()
    );
    assert!(
        limited[0].contains("Unable to queue messages for node node1.test"),
        "{}",
        limited[0]
    );
    // The flood does not break the session.
    assert!(c.cmd("NOOP").starts_with("250"));
    // The refusals came after growing delays, then the address was locked out: a new
    // connection from it is refused at once, with the time left...
    let mut again = relay.client();
    assert!(again.cmd("EHLO client.test").starts_with("250"));
    let t0 = Instant::now();
    let r = again.cmd("ETRN node1.test");
    assert!(r.starts_with("458 4.7.0") && r.contains("try again in"), "{r}");
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "a locked-out address is answered at once"
    );
    assert!(
        limited.iter().any(|r| r.contains("try again in")),
        "the lock-out started during the flood: {limited:?}"
    );
    // ...while another address is served normally.
    let mut other = SmtpClient::from_stream(connect_from("127.0.0.31".parse().unwrap(), relay.addr()));
    assert!(other.read_reply().starts_with("220"));
    assert!(other.cmd("EHLO other.test").starts_with("250"));
    assert_eq!(
        other.cmd("ETRN node1.test"),
        "251 2.0.0 OK, no messages waiting for node node1.test"
    );
}

// ---- 3. concurrency ------------------------------------------------------------------------

#[test]
fn concurrent_etrns_for_one_node_deliver_every_message_exactly_once() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let sink = Sink::start("127.0.0.2", port, &[]);
    let relay = relay(&dns, port, "", "", &[node("node1.test", "")]);
    submit_many(&relay, "u@node1.test", "m", 200, 4);
    assert_eq!(relay.queued_for("node1.test"), 200);

    let barrier = std::sync::Barrier::new(2);
    let replies: Vec<Vec<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut c = relay.client();
                    assert!(c.cmd("EHLO client.test").starts_with("250"));
                    barrier.wait();
                    let mut v = vec![c.cmd("ETRN node1.test")];
                    // ... and again and again while the run goes.
                    for _ in 0..8 {
                        std::thread::sleep(Duration::from_millis(15));
                        v.push(c.cmd("ETRN node1.test"));
                    }
                    v
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("ETRN replies of the two clients: {replies:#?}");
    let firsts: Vec<&String> = replies.iter().map(|v| &v[0]).collect();
    assert!(
        firsts.contains(&&"253 2.0.0 OK, 200 pending messages for node node1.test started".to_string()),
        "one of the simultaneous ETRNs sees all 200: {firsts:?}"
    );
    for r in replies.iter().flatten() {
        let pending = r
            .strip_prefix("253 2.0.0 OK, ")
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok());
        assert!(
            pending.is_some_and(|n| (1..=200).contains(&n)) || r.starts_with("251 2.0.0") || r.starts_with("458 "),
            "{r}"
        );
    }
    assert!(
        replies
            .iter()
            .flat_map(|v| &v[1..])
            .any(|r| r.starts_with("253 2.0.0 OK, ") && !r.contains(" 200 ")),
        "later ETRNs must have joined the run under way: {replies:?}"
    );
    wait_count("200 messages at the sink", &relay, 200, || sink.complete_count());
    wait_runs_finished(&relay, "node1.test", 1);
    assert_eq!(
        relay.log_lines_with(&["queue run started", "node=node1.test"]),
        1,
        "the ETRNs joined one run"
    );
    std::thread::sleep(Duration::from_millis(300)); // a duplicate would show up by now
    let ids = test_ids(&sink);
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 200, "every message exactly once");
    assert_eq!(distinct.len(), 200, "no message twice");
    let mids: BTreeSet<String> = sink
        .complete_messages()
        .iter()
        .filter_map(|f| header_value(strip_prefix_received(&sink_message(f).1), "Message-ID"))
        .collect();
    assert_eq!(mids.len(), 200);
    assert_eq!(relay.queued_for("node1.test"), 0);
    assert_eq!(
        etrn(&relay, "node1.test"),
        "251 2.0.0 OK, no messages waiting for node node1.test"
    );
}

#[test]
fn mail_arriving_during_a_run_is_delivered_by_that_run() {
    let script = Script {
        data_end_delay: Duration::from_millis(25),
        ..Script::default()
    };
    let (_dns, slow, relay) = node1_at_scripted_server(script, "connections_per_node = 2");
    submit_many(&relay, "u@node1.test", "early", 60, 2);
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 60 pending messages for node node1.test started"
    );
    wait_count("the run under way", &relay, 10, || slow.count());
    assert!(
        slow.count() < 50,
        "the run must still be going for this test to mean anything"
    );
    submit_many(&relay, "u@node1.test", "late", 5, 1);
    // No further ETRN: the run going picks the new mail up.
    wait_count("all 65 messages", &relay, 65, || slow.count());
    wait_runs_finished(&relay, "node1.test", 1);
    assert_eq!(
        relay.log_lines_with(&["queue run started", "node=node1.test"]),
        1,
        "one run only"
    );
    let ids = scripted_test_ids(&slow);
    assert_eq!(ids.len(), 65);
    assert!((0..5).all(|i| ids.contains(&format!("late-{i}"))));
    assert_eq!(slow.count(), 65, "no duplicates");
    assert_eq!(
        etrn(&relay, "node1.test"),
        "251 2.0.0 OK, no messages waiting for node node1.test"
    );
}

/// The `X-Test-Id` of every message a scripted server accepted.
fn scripted_test_ids(server: &ScriptedServer) -> BTreeSet<String> {
    server
        .txns()
        .iter()
        .filter_map(|t| {
            let m = String::from_utf8_lossy(&t.raw_data).into_owned();
            m.lines().find_map(|l| l.strip_prefix("X-Test-Id: ").map(str::to_owned))
        })
        .collect()
}

/// A relay holding mail for node1.test, whose server (127.0.0.2) answers by `script`.
fn node1_at_scripted_server(script: Script, delivery_extra: &str) -> (Dns, ScriptedServer, Relay) {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let server = ScriptedServer::start("127.0.0.2", port, script);
    let relay = relay(&dns, port, "", delivery_extra, &[node("node1.test", "")]);
    (dns, server, relay)
}

/// Queues `n` messages for node1.test, whose server answers by `script`, starts them with one
/// ETRN and waits until the server has them all and the run is over.
fn one_run_to_scripted_server(script: Script, delivery_extra: &str, n: usize) -> (Relay, ScriptedServer) {
    let (_dns, server, relay) = node1_at_scripted_server(script, delivery_extra);
    submit_many(&relay, "u@node1.test", "run", n, 3);
    assert_eq!(
        etrn(&relay, "node1.test"),
        format!("253 2.0.0 OK, {n} pending messages for node node1.test started")
    );
    wait_count("every message", &relay, n, || server.count());
    wait_runs_finished(&relay, "node1.test", 1);
    (relay, server)
}

#[test]
fn a_run_opens_connections_by_slow_start_up_to_the_limit() {
    let script = Script {
        data_end_delay: Duration::from_millis(3),
        ..Script::default()
    };
    let (_relay, server) = one_run_to_scripted_server(script, "initial_connections = 2\nconnections_per_node = 6", 150);
    assert_eq!(
        server.peak_sessions(),
        6,
        "grows to connections_per_node and no further"
    );
    let opened = server.sessions_opened_after();
    assert_eq!(opened.len(), 6, "one session per connection, none dropped: {opened:?}");
    // Two at once; the window grows by one after as many deliveries as it is wide:
    // 3rd after 2, 4th after 2+3, 5th after 2+3+4, 6th after 2+3+4+5.
    assert_eq!(opened[..2], [0, 0], "{opened:?}");
    for (k, at_least) in [(2, 2), (3, 5), (4, 9), (5, 14)] {
        assert!(opened[k] >= at_least, "session {k} opened too early: {opened:?}");
    }
    assert_eq!(
        (scripted_test_ids(&server).len(), server.count()),
        (150, 150),
        "each message once"
    );
}

#[test]
fn a_server_that_limits_sessions_gets_that_many_and_all_its_mail_in_one_run() {
    let script = Script {
        data_end_delay: Duration::from_millis(3),
        max_sessions: Some(3),
        ..Script::default()
    };
    let (relay, server) = one_run_to_scripted_server(script, "initial_connections = 2\nconnections_per_node = 8", 100);
    assert!(server.refused_sessions() >= 1, "the run never tried a 4th connection");
    assert!(server.peak_sessions() <= 3);
    assert_eq!(
        (scripted_test_ids(&server).len(), server.count()),
        (100, 100),
        "each message once"
    );
    assert_eq!(
        relay.log_lines_with(&["queue run finished", "node=node1.test", "delivered=100", "deferred=0"]),
        1,
        "{}",
        relay.log()
    );
    assert_eq!(relay.queued_for("node1.test"), 0);
}

#[test]
fn a_connection_that_times_out_after_the_others_left_does_not_strand_its_part() {
    let script = Script {
        data_end_delay: Duration::from_millis(3),
        max_sessions: Some(2),
        ignore_extra_sessions: true,
        ..Script::default()
    };
    // Greeting timeout 300 s x 0.01 (the tests' timeout_scale) = 3 s: the two sessions the
    // server takes deliver all 60 and leave long before the third connection gives up.
    let (relay, server) = one_run_to_scripted_server(script, "initial_connections = 2\nconnections_per_node = 3", 60);
    assert!(server.refused_sessions() >= 1, "no third connection was tried");
    assert_eq!(
        (scripted_test_ids(&server).len(), server.count()),
        (60, 60),
        "each message once"
    );
    assert_eq!(relay.queued_for("node1.test"), 0);
}

#[test]
fn deferred_recipients_do_not_open_more_connections() {
    let script = Script {
        rcpt_reply: "451 4.3.0 Try again later".into(),
        ..Script::default()
    };
    let (_dns, server, relay) = node1_at_scripted_server(script, "initial_connections = 2\nconnections_per_node = 6");
    submit_many(&relay, "u@node1.test", "soft", 40, 2);
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 40 pending messages for node node1.test started"
    );
    wait_runs_finished(&relay, "node1.test", 1);
    assert_eq!(server.count(), 0);
    assert_eq!(server.peak_sessions(), 2, "the window grows on deliveries only");
    assert_eq!(relay.queued_for("node1.test"), 40, "all kept for the next ETRN");
}

// ---- 4. outcomes ---------------------------------------------------------------------------

#[test]
fn rcpt_4xx_keeps_the_message_queued_until_a_later_etrn_succeeds() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let soft = Sink::start("127.0.0.2", port, &["-r", "RCPT"]);
    let relay = relay(&dns, port, "", "", &[node("node1.test", ""), node("origin.test", "")]);
    let qid = submit(
        &relay,
        "a@origin.test",
        &["x@node1.test", "y@node1.test"],
        b"X-Test-Id: soft\r\n\r\nsoft\r\n",
    );
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 1 pending messages for node node1.test started"
    );
    wait_runs_finished(&relay, "node1.test", 1);
    assert!(
        relay.log_lines_with(&[&qid, "recipient deferred", "code=450"]) >= 2,
        "{}",
        relay.log()
    );
    assert_eq!(soft.count(), 0);
    assert_eq!(relay.queued_for("node1.test"), 1, "4xx: still queued");
    assert_eq!(relay.queued_for("origin.test"), 0, "4xx: no bounce");
    // The next ETRN counts it again.
    drop(soft);
    let healthy = Sink::start("127.0.0.2", port, &[]);
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 1 pending messages for node node1.test started"
    );
    wait_count("the deferred message", &relay, 1, || healthy.complete_count());
    wait_runs_finished(&relay, "node1.test", 2);
    let (env, _) = sink_message(&healthy.complete_messages()[0]);
    assert!(
        env.contains("X-Rcpt-Args: <x@node1.test>") && env.contains("X-Rcpt-Args: <y@node1.test>"),
        "{env}"
    );
    assert_eq!(relay.queued_for("node1.test"), 0);
    assert_eq!(
        etrn(&relay, "node1.test"),
        "251 2.0.0 OK, no messages waiting for node node1.test"
    );
}

#[test]
fn rcpt_5xx_removes_the_message_and_bounces_to_a_node_sender_but_not_to_null_sender() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let hard = Sink::start("127.0.0.2", port, &["-f", "RCPT"]);
    let origin = Sink::start("127.0.0.3", port, &[]);
    let relay = relay(&dns, port, "", "", &[node("node1.test", ""), node("origin.test", "")]);
    let qid = submit(
        &relay,
        "alice@origin.test",
        &["bob@node1.test"],
        b"From: alice@origin.test\r\nSubject: will bounce\r\nX-Test-Id: hard\r\n\r\nbody\r\n",
    );
    let qid_null = submit(
        &relay,
        "",
        &["carol@node1.test"],
        b"Subject: null sender\r\n\r\nbody\r\n",
    );
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 2 pending messages for node node1.test started"
    );
    wait_runs_finished(&relay, "node1.test", 1);
    assert_eq!(hard.count(), 0);
    assert_eq!(relay.queued_for("node1.test"), 0, "5xx: removed");
    assert!(
        relay.log_lines_with(&[&qid_null, "no bounce for the null sender"]) == 1,
        "{}",
        relay.log()
    );
    // Exactly one bounce, for alice, waiting at her node.
    wait_count("the bounce queued", &relay, 1, || relay.queued_for("origin.test"));
    assert_eq!(
        etrn(&relay, "origin.test"),
        "253 2.0.0 OK, 1 pending messages for node origin.test started"
    );
    wait_count("the DSN at origin.test", &relay, 1, || origin.complete_count());
    wait_runs_finished(&relay, "origin.test", 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(origin.count(), 1, "one DSN only (none for the null sender)");
    let (env, dsn) = sink_message(&origin.complete_messages()[0]);
    assert!(env.contains("X-Mail-Args: <>"), "a DSN has the null sender: {env}");
    assert!(env.contains("X-Rcpt-Args: <alice@origin.test>"), "{env}");
    let text = String::from_utf8_lossy(&dsn);
    for want in [
        "multipart/report",
        "report-type=delivery-status",
        "Content-Type: message/delivery-status",
        "Final-Recipient: rfc822; bob@node1.test",
        "Action: failed",
        "Status: 5.3.0",
        "Subject: Undelivered Mail Returned to Sender",
        "Subject: will bounce",
        &qid,
    ] {
        assert!(text.contains(want), "DSN lacks {want:?}:\n{text}");
    }
    assert!(!text.contains("null sender"), "no part of the <> message: {text}");
    assert_eq!(relay.queued_for("origin.test"), 0);
}

#[test]
fn connection_refused_on_the_first_mx_goes_to_the_next() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    // 127.0.0.10 (preference 10) has nobody listening; 127.0.0.11 (20) does.
    let second = Sink::start("127.0.0.11", port, &[]);
    let relay = relay(&dns, port, "", "", &[node("failover.test", "")]);
    submit_many(&relay, "u@failover.test", "fo", 3, 1);
    assert_eq!(
        etrn(&relay, "failover.test"),
        "253 2.0.0 OK, 3 pending messages for node failover.test started"
    );
    wait_count("mail at the second MX", &relay, 3, || second.complete_count());
    wait_runs_finished(&relay, "failover.test", 1);
    assert!(
        relay.log_lines_with(&["127.0.0.10:", "cannot use this server"]) >= 1,
        "{}",
        relay.log()
    );
    assert_eq!(relay.queued_for("failover.test"), 0);
}

#[test]
fn own_mx_and_every_mx_not_strictly_better_are_pruned() {
    // ownmx.test: MX 3 better (127.0.0.13), MX 5 relay.test = us (127.0.0.12), MX 10 worse
    // (127.0.0.14). RFC 5321 5.1: only MX hosts strictly more preferred than ours are used.
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let us = Sink::start("127.0.0.12", port, &[]);
    let worse = Sink::start("127.0.0.14", port, &[]);
    let relay = relay(&dns, port, "", "", &[node("ownmx.test", "")]);
    submit_many(&relay, "u@ownmx.test", "own", 2, 1);
    // The better MX is down: the mail must wait, not go to ourselves or to a worse MX.
    assert_eq!(
        etrn(&relay, "ownmx.test"),
        "253 2.0.0 OK, 2 pending messages for node ownmx.test started"
    );
    wait_runs_finished(&relay, "ownmx.test", 1);
    assert!(
        relay.log_lines_with(&["127.0.0.13:", "cannot use this server"]) >= 1,
        "{}",
        relay.log()
    );
    assert_eq!(
        us.count() + worse.count(),
        0,
        "never to our own MX or one at/after its preference"
    );
    assert_eq!(relay.queued_for("ownmx.test"), 2);
    // Once the better MX is up, it gets the mail.
    let better = Sink::start("127.0.0.13", port, &[]);
    assert_eq!(
        etrn(&relay, "ownmx.test"),
        "253 2.0.0 OK, 2 pending messages for node ownmx.test started"
    );
    wait_count("mail at the better MX", &relay, 2, || better.complete_count());
    wait_runs_finished(&relay, "ownmx.test", 2);
    assert_eq!(us.count() + worse.count(), 0);
    assert_eq!(relay.queued_for("ownmx.test"), 0);
}

// ---- 5. auth modes -------------------------------------------------------------------------

fn auth_nodes() -> Vec<String> {
    vec![
        node("node1.test", "auth = \"none\""),
        node(
            "plain.test",
            "auth = \"plain\"\nuser = \"puser\"\npassword = \"ppass\"\nstatic_ip = \"127.0.0.7\"",
        ),
        node("md5.test", "auth = \"md5\"\nuser = \"muser\"\npassword = \"mpass\""),
    ]
}

fn auth_plain(c: &mut SmtpClient, user: &str, password: &str) -> String {
    c.cmd(&format!(
        "AUTH PLAIN {}",
        etrn_relay::auth::client_plain(user, password)
    ))
}

fn auth_cram(c: &mut SmtpClient, user: &str, password: &str) -> String {
    let ch = c.cmd("AUTH CRAM-MD5");
    let b64 = ch
        .strip_prefix("334 ")
        .unwrap_or_else(|| panic!("CRAM-MD5 challenge: {ch}"));
    let resp = etrn_relay::auth::client_cram_md5(user, password, b64.as_bytes()).unwrap();
    c.cmd(&resp)
}

#[test]
fn auth_none_delivers_to_the_mx() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let mx = Sink::start("127.0.0.2", port, &[]);
    let relay = relay(&dns, port, "allow_plaintext_auth = true", "", &auth_nodes());
    submit_many(&relay, "u@node1.test", "none", 2, 1);
    // Anyone, unauthenticated, from any address.
    let mut c = SmtpClient::from_stream(connect_from(Ipv4Addr::new(127, 0, 0, 9), relay.addr()));
    assert!(c.read_reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert_eq!(
        c.cmd("ETRN node1.test"),
        "253 2.0.0 OK, 2 pending messages for node node1.test started"
    );
    wait_count("mail at node1's MX", &relay, 2, || mx.complete_count());
}

#[test]
fn auth_plain_node_needs_its_user_and_gets_mail_at_its_static_ip() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let static_sink = Sink::start("127.0.0.7", port, &[]);
    let mx = Sink::start("127.0.0.8", port, &[]);
    let relay = relay(&dns, port, "allow_plaintext_auth = true", "", &auth_nodes());
    let ehlo = relay.client().cmd("EHLO client.test");
    let auth_line = ehlo
        .lines()
        .find(|l| l.contains("AUTH"))
        .unwrap_or_else(|| panic!("AUTH advertised: {ehlo}"));
    for m in ["PLAIN", "LOGIN", "CRAM-MD5"] {
        assert!(auth_line.contains(m), "{auth_line}");
    }
    submit_many(&relay, "u@plain.test", "plain", 3, 1);

    let r = etrn(&relay, "plain.test");
    assert!(r.starts_with("459 4.7.1 Node plain.test not allowed"), "{r}");
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    // Another node's user is not this node's user.
    let mut other = relay.client();
    assert!(other.cmd("EHLO client.test").starts_with("250"));
    assert!(auth_cram(&mut other, "muser", "mpass").starts_with("235"));
    assert!(other.cmd("ETRN plain.test").starts_with("459 "));
    assert_eq!(
        auth_plain(&mut c, "puser", "ppass"),
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(
        c.cmd("ETRN plain.test"),
        "253 2.0.0 OK, 3 pending messages for node plain.test started"
    );
    wait_count("mail at the static IP", &relay, 3, || static_sink.complete_count());
    wait_runs_finished(&relay, "plain.test", 1);
    assert_eq!(mx.count(), 0, "the MX gets nothing while the static IP answers");
    assert_eq!(relay.queued_for("plain.test"), 0);

    // Static IP down: the MX is the fallback.
    drop(static_sink);
    submit_many(&relay, "u@plain.test", "fallback", 1, 1);
    assert!(c.cmd("ETRN plain.test").starts_with("253 2.0.0 OK, 1 pending"));
    wait_count("mail at the MX (fallback)", &relay, 1, || mx.complete_count());
}

#[test]
fn auth_md5_node_gets_mail_at_the_address_of_the_authenticated_etrn() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let dynamic = Sink::start("127.0.0.9", port, &[]);
    let mx = Sink::start("127.0.0.8", port, &[]);
    let relay = relay(&dns, port, "allow_plaintext_auth = true", "", &auth_nodes());
    submit_many(&relay, "u@md5.test", "md5", 4, 1);

    // Unauthenticated, and authenticated with PLAIN as the right user: both 459.
    let r = etrn(&relay, "md5.test");
    assert!(r.starts_with("459 4.7.1 Node md5.test not allowed"), "{r}");
    let mut p = relay.client();
    assert!(p.cmd("EHLO client.test").starts_with("250"));
    assert!(auth_plain(&mut p, "muser", "mpass").starts_with("235"));
    let r = p.cmd("ETRN md5.test");
    assert!(r.starts_with("459 ") && r.contains("CRAM-MD5"), "{r}");

    let mut c = SmtpClient::from_stream(connect_from(Ipv4Addr::new(127, 0, 0, 9), relay.addr()));
    assert!(c.read_reply().starts_with("220"));
    assert!(c.cmd("EHLO dialup.md5.test").starts_with("250"));
    assert_eq!(
        auth_cram(&mut c, "muser", "mpass"),
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(
        c.cmd("ETRN md5.test"),
        "253 2.0.0 OK, 4 pending messages for node md5.test started"
    );
    wait_count("mail at the ETRN client's address", &relay, 4, || {
        dynamic.complete_count()
    });
    wait_runs_finished(&relay, "md5.test", 1);
    assert_eq!(mx.count(), 0, "nothing to the MX while the dynamic address answers");
    assert_eq!(relay.queued_for("md5.test"), 0);
}

#[test]
fn wrong_password_is_535_after_a_delay_and_repeated_failures_lock_out() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let relay = relay(&dns, port, "allow_plaintext_auth = true", "", &auth_nodes());
    // From an address of its own so no other connection is affected.
    let mut c = SmtpClient::from_stream(connect_from(Ipv4Addr::new(127, 0, 0, 20), relay.addr()));
    assert!(c.read_reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let t0 = Instant::now();
    assert_eq!(
        auth_cram(&mut c, "muser", "wrong"),
        "535 5.7.8 Authentication credentials invalid"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "535 comes after a delay: {:?}",
        t0.elapsed()
    );
    // A wrong password never authenticates: ETRN still refused.
    assert!(c.cmd("ETRN md5.test").starts_with("459 "));
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(auth_plain(&mut c, "puser", "wrong"));
    }
    assert!(replies.iter().all(|r| r.starts_with("535 5.7.8")), "{replies:?}");
    // Now locked out, even with the right password, on this and on new connections.
    let r = c.cmd("AUTH CRAM-MD5");
    assert!(
        r.starts_with("454 4.7.0 Too many authentication failures"),
        "locked out: {r}"
    );
    assert!(c.cmd("ETRN md5.test").starts_with("459 "));
    for _ in 0..4 {
        let mut n = SmtpClient::from_stream(connect_from(Ipv4Addr::new(127, 0, 0, 20), relay.addr()));
        assert!(n.read_reply().starts_with("220"));
        assert!(n.cmd("EHLO client.test").starts_with("250"));
        let r = n.cmd(&format!(
            "AUTH PLAIN {}",
            etrn_relay::auth::client_plain("puser", "ppass")
        ));
        assert!(
            r.starts_with("454 4.7.0"),
            "a new connection from the locked-out address: {r}"
        );
    }
    // Other addresses are not affected.
    let mut ok = relay.client();
    assert!(ok.cmd("EHLO client.test").starts_with("250"));
    assert!(auth_plain(&mut ok, "puser", "ppass").starts_with("235"));
}

#[test]
fn plaintext_auth_is_refused_unless_allowed_but_cram_md5_works() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let relay = relay(&dns, port, "", "", &auth_nodes());
    let mut c = relay.client();
    let ehlo = c.cmd("EHLO client.test");
    let auth_line = ehlo.lines().find(|l| l.contains("AUTH")).expect("AUTH advertised");
    assert!(
        auth_line.contains("CRAM-MD5") && !auth_line.contains("PLAIN"),
        "{auth_line}"
    );
    assert!(auth_plain(&mut c, "puser", "ppass").starts_with("538 5.7.11"));
    assert!(auth_cram(&mut c, "puser", "ppass").starts_with("235"));
    assert!(
        c.cmd("ETRN plain.test").starts_with("251 2.0.0"),
        "CRAM-MD5 as the plain node's user is enough"
    );
}

#[test]
fn eight_bit_mail_to_a_server_without_8bitmime_bounces_with_a_clear_reason() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let seven_bit = Sink::start("127.0.0.2", port, &["-8"]);
    let origin = Sink::start("127.0.0.3", port, &[]);
    let relay = relay(&dns, port, "", "", &[node("node1.test", ""), node("origin.test", "")]);
    submit(
        &relay,
        "alice@origin.test",
        &["bob@node1.test"],
        "Subject: 8bit\r\n\r\nK\u{f6}ln\r\n".as_bytes(),
    );
    submit(
        &relay,
        "alice@origin.test",
        &["bob@node1.test"],
        b"X-Test-Id: ascii\r\n\r\nplain ascii\r\n",
    );
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 2 pending messages for node node1.test started"
    );
    wait_runs_finished(&relay, "node1.test", 1);
    assert_eq!(
        seven_bit.count(),
        1,
        "only the 7-bit message goes to a server without 8BITMIME"
    );
    assert_eq!(test_ids(&seven_bit), vec!["ascii".to_string()]);
    assert_eq!(relay.queued_for("node1.test"), 0);
    assert_eq!(
        etrn(&relay, "origin.test"),
        "253 2.0.0 OK, 1 pending messages for node origin.test started"
    );
    wait_count("the DSN", &relay, 1, || origin.complete_count());
    let text = String::from_utf8_lossy(&origin.complete_messages()[0]).into_owned();
    assert!(text.contains("Status: 5.6.3") && text.contains("8-bit"), "{text}");
}

#[test]
fn mail_older_than_max_age_bounces_instead_of_being_delivered() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let sink = Sink::start("127.0.0.2", port, &[]);
    let origin = Sink::start("127.0.0.3", port, &[]);
    let relay = relay(
        &dns,
        port,
        "",
        "max_age = \"1s\"",
        &[node("node1.test", ""), node("origin.test", "")],
    );
    submit(
        &relay,
        "alice@origin.test",
        &["bob@node1.test"],
        b"Subject: old\r\n\r\nold\r\n",
    );
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 1 pending messages for node node1.test started"
    );
    wait_runs_finished(&relay, "node1.test", 1);
    assert_eq!(sink.count(), 0, "expired mail is not delivered");
    assert_eq!(relay.queued_for("node1.test"), 0);
    assert_eq!(
        etrn(&relay, "origin.test"),
        "253 2.0.0 OK, 1 pending messages for node origin.test started"
    );
    wait_count("the DSN", &relay, 1, || origin.complete_count());
    let text = String::from_utf8_lossy(&origin.complete_messages()[0]).into_owned();
    assert!(
        text.contains("Final-Recipient: rfc822; bob@node1.test") && text.contains("Status: 4.4.7"),
        "{text}"
    );
}

#[test]
fn null_mx_bounces_and_a_dns_failure_keeps_mail_queued() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let origin = Sink::start("127.0.0.3", port, &[]);
    let relay = relay(
        &dns,
        port,
        "",
        "",
        &[
            node("nullmx.test", ""),
            node("nxdomain.test", ""),
            node("origin.test", ""),
        ],
    );
    submit(
        &relay,
        "alice@origin.test",
        &["bob@nullmx.test"],
        b"Subject: null mx\r\n\r\nx\r\n",
    );
    submit(
        &relay,
        "alice@origin.test",
        &["carol@nxdomain.test"],
        b"Subject: no dns\r\n\r\nx\r\n",
    );
    // NXDOMAIN for a configured node: deferred (never lost, never bounced).
    assert_eq!(
        etrn(&relay, "nxdomain.test"),
        "253 2.0.0 OK, 1 pending messages for node nxdomain.test started"
    );
    wait_runs_finished(&relay, "nxdomain.test", 1);
    assert_eq!(relay.queued_for("nxdomain.test"), 1);
    // Null MX (RFC 7505): the domain takes no mail, so its queue bounces with 5.1.10.
    assert_eq!(
        etrn(&relay, "nullmx.test"),
        "253 2.0.0 OK, 1 pending messages for node nullmx.test started"
    );
    wait_runs_finished(&relay, "nullmx.test", 1);
    assert_eq!(relay.queued_for("nullmx.test"), 0);
    assert_eq!(
        etrn(&relay, "origin.test"),
        "253 2.0.0 OK, 1 pending messages for node origin.test started"
    );
    wait_count("the DSN", &relay, 1, || origin.complete_count());
    let text = String::from_utf8_lossy(&origin.complete_messages()[0]).into_owned();
    assert!(
        text.contains("Final-Recipient: rfc822; bob@nullmx.test") && text.contains("Status: 5.1.10"),
        "{text}"
    );
    assert!(!text.contains("carol@nxdomain.test"), "{text}");
}

/// A 5xx for a message whose sender is outside every node: the DSN is spooled and delivered to
/// the sender's own MX (no node will ever ETRN for it). While that MX is down it waits; it
/// survives a SIGKILL and is delivered after the restart.
#[test]
fn bounce_to_an_outside_sender_goes_to_its_mx_and_survives_a_restart() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let _hard = Sink::start("127.0.0.2", port, &["-f", "RCPT"]);
    let rest = format!("{}{}", delivery_toml(&dns, port, ""), node("node1.test", ""));
    let mut relay = Relay::start("shards = 2", "", &rest);
    let qid = submit(
        &relay,
        "alice@other.test",
        &["bob@node1.test"],
        b"From: alice@other.test\r\nSubject: to the outside\r\n\r\nbody\r\n",
    );
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 1 pending messages for node node1.test started"
    );
    wait_runs_finished(&relay, "node1.test", 1);
    assert_eq!(relay.queued_for("node1.test"), 0, "5xx: removed from the node's queue");
    // other.test's MX (127.0.0.8) is not listening yet: the bounce waits in the spool.
    wait_count("a deferred bounce attempt", &relay, 1, || {
        relay.log_lines_with(&["bounce deferred", "domain=other.test"])
    });
    assert!(relay.log_lines_with(&[&qid, "bounce queued"]) == 1, "{}", relay.log());
    assert_eq!(bounces_listed(&relay), 1, "{}", relay.queue_listing());
    relay.kill9();
    let dir = relay.into_dir();
    let outside = Sink::start("127.0.0.8", port, &[]);
    let relay = Relay::start_in(dir, "shards = 2", "", &rest);
    wait_count("the DSN at other.test's MX", &relay, 1, || outside.complete_count());
    let (env, dsn) = sink_message(&outside.complete_messages()[0]);
    assert!(env.contains("X-Mail-Args: <>"), "{env}");
    assert!(env.contains("X-Rcpt-Args: <alice@other.test>"), "{env}");
    let text = String::from_utf8_lossy(&dsn);
    assert!(text.contains("Final-Recipient: rfc822; bob@node1.test"), "{text}");
    assert!(text.contains(&qid), "{text}");
    wait_count("the bounce marked delivered", &relay, 1, || {
        relay.log_lines_with(&["bounce delivered"])
    });
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(outside.count(), 1, "delivered once");
    assert_eq!(bounces_listed(&relay), 0, "{}", relay.queue_listing());
}

/// The message count of the `queue` listing's "(bounces to other.test)" row (0 when absent).
fn bounces_listed(relay: &Relay) -> usize {
    relay
        .queue_listing()
        .lines()
        .find_map(|l| l.strip_prefix("(bounces to other.test)"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `retry_interval` on a node: the relay delivers on its own, without any ETRN.
#[test]
fn retry_interval_delivers_without_etrn() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let sink = Sink::start("127.0.0.2", port, &[]);
    let relay = relay(
        &dns,
        port,
        "",
        "",
        &[node("node1.test", "retry_interval = \"1s\""), node("node2.test", "")],
    );
    submit(
        &relay,
        "a@client.test",
        &["x@node1.test"],
        b"Subject: by timer\r\n\r\nbody\r\n",
    );
    submit(
        &relay,
        "a@client.test",
        &["y@node2.test"],
        b"Subject: waits for ETRN\r\n\r\nbody\r\n",
    );
    wait_count("the timer's delivery", &relay, 1, || sink.complete_count());
    assert!(relay.log_lines_with(&["retry interval: starting a queue run", "node=node1.test"]) >= 1);
    assert_eq!(relay.queued_for("node1.test"), 0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        relay.queued_for("node2.test"),
        1,
        "a node without retry_interval waits for its ETRN"
    );
    assert_eq!(relay.log_lines_with(&["queue run started", "node=node2.test"]), 0);
    assert_eq!(sink.count(), 1);
}
