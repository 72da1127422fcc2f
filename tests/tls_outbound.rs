//! End-to-end: STARTTLS (RFC 3207) from the relay to the nodes' servers (issue 5, "STARTTLS
//! outbound"). Opportunistic by default: used whenever the node's server offers it, without
//! checking the certificate (RFC 7435; a node's self-signed, expired or misnamed certificate must
//! not stop its mail). A node with `require_tls = true` gets nothing over plaintext.
//!
//! The TLS-capable server is a [`FaultServer`] (std::net + a rustls `ServerConfig` with a
//! certificate rcgen makes at test time): it offers STARTTLS, performs the handshake, insists on
//! a new EHLO afterwards, and records for each message whether it came over TLS and its bytes.
mod common;
use common::*;

use std::time::Duration;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn relay_with(dns: &Dns, port: u16, delivery: &str, nodes: &[(&str, bool)]) -> Relay {
    let mut rest = delivery_toml(dns, port, delivery);
    for (name, require_tls) in nodes {
        rest.push_str(&format!("[[node]]\nname = \"{name}\"\n"));
        if *require_tls {
            rest.push_str("require_tls = true\n");
        }
    }
    Relay::start("shards = 2", "", &rest)
}

/// A message that names itself, `lines` lines long, with lines that need dot-stuffing.
fn body(tag: &str, lines: usize) -> Vec<u8> {
    let mut b = format!("From: a@client.test\r\nX-Test-Id: {tag}\r\nSubject: tls {tag}\r\n\r\n").into_bytes();
    for i in 0..lines {
        let lead = match i % 5 {
            0 => ".",
            1 => "..",
            _ => "",
        };
        b.extend_from_slice(format!("{lead}{tag} {i:06} {}\r\n", "t".repeat(90)).as_bytes());
    }
    b.extend_from_slice(b".\r\nlast line without a line end");
    b
}

fn submit(relay: &Relay, rcpt: &str, body: &[u8]) -> String {
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.send_mail("a@client.test", &[rcpt], body);
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.cmd("QUIT");
    queue_id(&r)
}

fn etrn_253(relay: &Relay, node: &str, n: usize) {
    let (r, took) = timed_etrn(relay, node);
    assert_eq!(r, format!("253 2.0.0 OK, {n} pending messages for node {node} started"));
    assert!(took < Duration::from_millis(100), "ETRN {node} took {took:?}");
}

/// The relay's `Received:` header (ending at the first line end not followed by a tab) and the
/// rest of a transaction's data.
fn split_received(raw: &[u8]) -> (&[u8], &[u8]) {
    assert!(raw.starts_with(b"Received: "), "{}", String::from_utf8_lossy(raw));
    let mut i = 0;
    loop {
        let nl = memchr::memchr(b'\n', &raw[i..])
            .map(|p| i + p + 1)
            .expect("end of Received");
        i = nl;
        if raw.get(i) != Some(&b'\t') {
            return (&raw[..i], &raw[i..]);
        }
    }
}

/// Asserts that `txn` is message `tag` (made with [`body`] and `lines`), sent over TLS, byte
/// for byte (on the wire: dot-stuffed, with CRLF added to the unterminated last line).
fn assert_tls_exact(txn: &FaultTxn, tag: &str, lines: usize) {
    assert!(
        txn.tls,
        "{tag} was sent in plaintext although the server offered STARTTLS"
    );
    assert!(txn.tls_version.is_some());
    let (received, rest) = split_received(&txn.raw_data);
    let received = String::from_utf8_lossy(received);
    assert!(received.contains("by relay.test (etrn-relay)"), "{received}");
    assert!(
        rest == dot_stuff(&body(tag, lines)).as_slice(),
        "{tag}: the message changed on its way through TLS"
    );
}

fn txn_tag(t: &FaultTxn) -> String {
    header_value(split_received(&t.raw_data).1, "X-Test-Id").expect("X-Test-Id")
}

fn tls_script(cfg: std::sync::Arc<rustls::ServerConfig>) -> FaultScript {
    FaultScript {
        starttls: StartTls::On(cfg),
        ..FaultScript::default()
    }
}

#[test]
fn starttls_is_used_when_offered_byte_exact_whatever_the_certificate_says() {
    let dns = Dns::start(&mx_zone(&[("tls.test", &[(10, "mx.tls.test", "127.0.0.2")])]));
    let port = reserve_port();
    // Self-signed, for another name than the MX host, and expired since 2000: opportunistic
    // TLS encrypts anyway (verifying it would make every handshake fail).
    let cert = test_tls_server_config(&["unrelated.example"], true);
    let server = FaultServer::start("127.0.0.2", port, tls_script(cert));
    let relay = relay_with(&dns, port, "connections_per_node = 1", &[("tls.test", false)]);
    let lines = 2000; // ~200 kB: many TLS records
    for tag in ["tls0", "tls1"] {
        submit(&relay, "x@tls.test", &body(tag, lines));
    }
    etrn_253(&relay, "tls.test", 2);
    wait_for("2 messages over TLS", secs(15), || server.count() >= 2);
    wait_run_finished(&relay, "tls.test", 1, secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let txns = server.txns();
    assert_eq!(txns.len(), 2, "{:?}", server.events());
    for t in &txns {
        assert_tls_exact(t, &txn_tag(t), lines);
    }
    let mut tags: Vec<String> = txns.iter().map(txn_tag).collect();
    tags.sort();
    assert_eq!(tags, ["tls0", "tls1"]);
    // One connection, one STARTTLS, one handshake; EHLO again after it (the server answers MAIL
    // without it with 503); nothing pipelined behind STARTTLS.
    assert_eq!(server.events_with("connect"), 1, "{:?}", server.events());
    assert_eq!(server.events_with("starttls"), 1, "{:?}", server.events());
    assert_eq!(server.events_with("tls ok"), 1, "{:?}", server.events());
    assert_eq!(server.events_with("mail without EHLO after TLS"), 0);
    assert_eq!(server.events_with("plaintext pipelined after STARTTLS"), 0);
    assert!(relay.log().contains("tls=true"), "{}", relay.log());
    wait_for("queue empty on disk", secs(10), || relay.queued_for("tls.test") == 0);
}

#[test]
fn plaintext_injected_after_the_starttls_220_is_discarded() {
    // A man in the middle (or a broken server) appends a reply to the 220. A client that kept
    // it would read it as the answer to its EHLO inside TLS and go out of step.
    let dns = Dns::start(&mx_zone(&[("inject.test", &[(10, "mx.inject.test", "127.0.0.5")])]));
    let port = reserve_port();
    let cert = test_tls_server_config(&["mx.inject.test"], false);
    let server = FaultServer::start(
        "127.0.0.5",
        port,
        FaultScript {
            starttls: StartTls::Inject(cert, b"554 5.7.0 injected before the handshake\r\n".to_vec()),
            ..FaultScript::default()
        },
    );
    let relay = relay_with(&dns, port, "", &[("inject.test", false)]);
    submit(&relay, "x@inject.test", &body("inj0", 50));
    etrn_253(&relay, "inject.test", 1);
    wait_run_finished(&relay, "inject.test", 1, secs(10));
    let txns = server.txns();
    assert_eq!(txns.len(), 1, "events {:?}; log:\n{}", server.events(), relay.log());
    assert_tls_exact(&txns[0], "inj0", 50);
    assert_eq!(relay.queued_for("inject.test"), 0);
}

#[test]
fn failed_handshake_defers_the_mail_of_a_normal_node_without_losing_it() {
    let dns = Dns::start(&mx_zone(&[("broken.test", &[(10, "mx.broken.test", "127.0.0.4")])]));
    let port = reserve_port();
    let server = FaultServer::start(
        "127.0.0.4",
        port,
        FaultScript {
            starttls: StartTls::Garbage,
            ..FaultScript::default()
        },
    );
    let relay = relay_with(&dns, port, "", &[("broken.test", false)]);
    for tag in ["brk0", "brk1"] {
        submit(&relay, "x@broken.test", &body(tag, 40));
    }
    etrn_253(&relay, "broken.test", 2);
    wait_run_finished(&relay, "broken.test", 1, secs(10));
    assert!(server.events_with("garbage sent") >= 1, "{:?}", server.events());
    assert_eq!(server.count(), 0);
    assert!(
        relay.log_lines_with(&["cannot use this server", "TLS handshake with", "failed"]) >= 1,
        "{}",
        relay.log()
    );
    assert_eq!(
        relay.log_lines_with(&["queue run finished", "node=broken.test", "delivered=0", "deferred=2"]),
        1,
        "{}",
        relay.log()
    );
    assert_eq!(relay.queued_for("broken.test"), 2, "deferred, not lost");

    // The server's TLS works again: delivered, over TLS, once each.
    server.set(tls_script(test_tls_server_config(&["mx.broken.test"], false)));
    etrn_253(&relay, "broken.test", 2);
    wait_for("2 messages over TLS", secs(10), || server.count() >= 2);
    wait_run_finished(&relay, "broken.test", 2, secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let txns = server.txns();
    assert_eq!(txns.len(), 2);
    let mut tags: Vec<String> = txns.iter().map(txn_tag).collect();
    tags.sort();
    assert_eq!(tags, ["brk0", "brk1"]);
    for t in &txns {
        assert_tls_exact(t, &txn_tag(t), 40);
    }
    wait_for("queue empty on disk", secs(10), || relay.queued_for("broken.test") == 0);
}

#[test]
fn require_tls_node_gets_nothing_in_plaintext_and_everything_once_its_mx_has_tls() {
    let dns = Dns::start(&mx_zone(&[
        ("secure.test", &[(10, "mx.secure.test", "127.0.0.3")]),
        ("open.test", &[(10, "mx.open.test", "127.0.0.3")]),
    ]));
    let port = reserve_port();
    // 1. The MX is Postfix's smtp-sink, which does not offer STARTTLS.
    let sink = Sink::start("127.0.0.3", port, &[]);
    let relay = relay_with(&dns, port, "", &[("secure.test", true), ("open.test", false)]);
    for tag in ["sec0", "sec1"] {
        submit(&relay, "x@secure.test", &body(tag, 30));
    }
    submit(&relay, "y@open.test", &body("open0", 30));
    etrn_253(&relay, "secure.test", 2);
    etrn_253(&relay, "open.test", 1);
    wait_run_finished(&relay, "secure.test", 1, secs(10));
    wait_run_finished(&relay, "open.test", 1, secs(10));
    wait_for("open.test's message at the sink", secs(10), || {
        sink.complete_count() >= 1
    });
    std::thread::sleep(Duration::from_millis(300));
    // Only the node without require_tls got its mail (in plaintext: the sink has no TLS).
    let got: Vec<String> = sink
        .complete_messages()
        .iter()
        .filter_map(|f| header_value(&sink_message(f).1, "X-Test-Id"))
        .collect();
    assert_eq!(got, ["open0"], "a require_tls node's mail went out in plaintext");
    assert!(
        relay.log_lines_with(&["TLS required: ", "does not offer STARTTLS"]) >= 1,
        "{}",
        relay.log()
    );
    assert_eq!(relay.queued_for("secure.test"), 2);
    assert_eq!(relay.queued_for("open.test"), 0);
    drop(sink);

    // 2. A server that offers STARTTLS but refuses it (454): still nothing for secure.test;
    //    a normal node falls back to plaintext.
    let server = FaultServer::start(
        "127.0.0.3",
        port,
        FaultScript {
            starttls: StartTls::Refuse("454 4.7.0 TLS not available due to local problem".into()),
            ..FaultScript::default()
        },
    );
    submit(&relay, "y@open.test", &body("open1", 30));
    etrn_253(&relay, "secure.test", 2);
    etrn_253(&relay, "open.test", 1);
    wait_run_finished(&relay, "secure.test", 2, secs(10));
    wait_run_finished(&relay, "open.test", 2, secs(10));
    let txns = server.txns();
    assert_eq!(txns.len(), 1, "{txns:?}");
    assert_eq!(txn_tag(&txns[0]), "open1");
    assert!(!txns[0].tls);
    assert!(
        relay.log_lines_with(&["TLS required: ", "refused STARTTLS: 454"]) >= 1,
        "{}",
        relay.log()
    );
    assert_eq!(relay.queued_for("secure.test"), 2);

    // 3. A handshake that fails: still nothing, still queued.
    server.set(FaultScript {
        starttls: StartTls::Garbage,
        ..FaultScript::default()
    });
    etrn_253(&relay, "secure.test", 2);
    wait_run_finished(&relay, "secure.test", 3, secs(10));
    assert!(server.events_with("garbage sent") >= 1);
    assert!(
        relay.log_lines_with(&["TLS required: TLS handshake with", "failed"]) >= 1,
        "{}",
        relay.log()
    );
    assert_eq!(server.count(), 1);
    assert_eq!(relay.queued_for("secure.test"), 2);

    // 4. The MX now has working TLS: both messages, over TLS, once each.
    server.set(tls_script(test_tls_server_config(&["mx.secure.test"], false)));
    etrn_253(&relay, "secure.test", 2);
    wait_for("secure.test's mail over TLS", secs(10), || server.count() >= 3);
    wait_run_finished(&relay, "secure.test", 4, secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let txns = server.txns();
    assert_eq!(txns.len(), 3);
    let mut secure: Vec<&FaultTxn> = txns.iter().filter(|t| txn_tag(t).starts_with("sec")).collect();
    secure.sort_by_key(|t| txn_tag(t));
    assert_eq!(secure.len(), 2);
    assert_tls_exact(secure[0], "sec0", 30);
    assert_tls_exact(secure[1], "sec1", 30);
    wait_for("queue empty on disk", secs(10), || relay.queued_for("secure.test") == 0);
}
