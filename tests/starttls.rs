//! Inbound STARTTLS (RFC 3207, issue 5): advertised only with a certificate, a full reset after
//! the handshake, plaintext pipelined behind STARTTLS discarded (the command-injection bug
//! class), AUTH PLAIN/LOGIN only inside TLS, failed and stalled handshakes, timeouts inside TLS,
//! and a real client (swaks). The certificate is generated per test with rcgen.
mod common;
use common::*;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

const NODES: &str = "[[node]]\nname = \"node1.test\"\n\
    [[node]]\nname = \"n3.test\"\nauth = \"plain\"\nuser = \"n3\"\npassword = \"secret3\"\n";

/// A relay with a fresh certificate; the certificate's directory must outlive the relay.
fn tls_relay(smtp_extra: &str) -> (Relay, Vec<u8>, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let (tls, der) = test_certificate(certs.path());
    let relay = Relay::start("shards = 2", smtp_extra, &format!("{NODES}{tls}"));
    (relay, der, certs)
}

fn ehlo_lines(reply: &str) -> Vec<&str> {
    reply.lines().map(|l| &l[4..]).collect()
}

fn auth_plain(c: &mut TlsSmtpClient, user: &str, password: &str) -> String {
    c.cmd(&format!(
        "AUTH PLAIN {}",
        etrn_relay::auth::client_plain(user, password)
    ))
}

#[test]
fn starttls_resets_the_session_and_offers_plain_auth_only_inside_tls() {
    let (relay, der, _certs) = tls_relay("");
    let mut c = relay.client();
    let r = c.cmd("EHLO client.test");
    let ext = ehlo_lines(&r);
    assert!(ext.contains(&"STARTTLS"), "{r}");
    assert!(ext.contains(&"AUTH CRAM-MD5"), "only CRAM-MD5 in plaintext: {r}");
    assert!(!r.contains("PLAIN") && !r.contains("LOGIN"), "{r}");
    let r = c.cmd(&format!(
        "AUTH PLAIN {}",
        etrn_relay::auth::client_plain("n3", "secret3")
    ));
    assert!(r.starts_with("538 5.7.11 "), "PLAIN refused in plaintext: {r}");
    // Authenticate with CRAM-MD5 before TLS: this state must not survive the handshake.
    let ch = c.cmd("AUTH CRAM-MD5");
    let resp = etrn_relay::auth::client_cram_md5("n3", "secret3", &ch.as_bytes()[4..]).unwrap();
    assert!(c.cmd(&resp).starts_with("235 2.7.0"));
    assert!(c.cmd("ETRN n3.test").starts_with("251 "), "allowed after AUTH");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let mut t = TlsSmtpClient::handshake(c.into_stream(), &der).expect("handshake");
    assert!(t.connection().protocol_version().is_some());
    // Everything reset: no EHLO, no AUTH.
    let r = t.cmd("MAIL FROM:<a@client.test>");
    assert!(r.starts_with("503 5.5.1 "), "MAIL before EHLO inside TLS: {r}");
    let r = t.cmd("EHLO client.test");
    let ext = ehlo_lines(&r);
    assert!(!ext.contains(&"STARTTLS"), "STARTTLS offered again: {r}");
    assert!(ext.contains(&"AUTH CRAM-MD5 PLAIN LOGIN"), "{r}");
    let r = t.cmd("ETRN n3.test");
    assert!(
        r.starts_with("459 4.7.1 "),
        "the plaintext AUTH must not survive STARTTLS: {r}"
    );
    assert!(t.cmd("STARTTLS").starts_with("503 5.5.1 "), "STARTTLS twice");
    // PLAIN and LOGIN work inside TLS.
    assert!(auth_plain(&mut t, "n3", "secret3").starts_with("235 2.7.0"));
    assert!(t.cmd("ETRN n3.test").starts_with("251 "));
    // A mail transaction; the Received header says ESMTPS.
    let r = t.send_mail(
        "a@client.test",
        &["x@node1.test"],
        b"Subject: over tls\r\n\r\nsecret\r\n",
    );
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let qid = queue_id(&r);
    let recs = spooled_records(&relay.spool_dir());
    let rec = recs.iter().find(|x| x.queue_id == qid).expect("record");
    let data = String::from_utf8_lossy(&rec.data);
    assert!(data.contains(&format!("(etrn-relay) with ESMTPS id {qid}")), "{data}");
    assert!(data.ends_with("Subject: over tls\r\n\r\nsecret\r\n"), "{data}");
    assert_eq!(t.cmd("QUIT"), "221 2.0.0 relay.test closing connection");
    // LOGIN on another TLS connection; a plaintext message says ESMTP (not ESMTPS).
    let mut t = relay.client().starttls(&der);
    t.cmd("EHLO client.test");
    assert!(t.cmd("AUTH LOGIN").starts_with("334 VXNlcm5hbWU6"));
    assert!(t
        .cmd(&etrn_relay::auth::client_login_user("n3"))
        .starts_with("334 UGFzc3dvcmQ6"));
    assert!(t
        .cmd(&etrn_relay::auth::client_login_password("secret3"))
        .starts_with("235 2.7.0"));
    let mut p = relay.client();
    p.cmd("EHLO client.test");
    let r = p.send_mail("a@client.test", &["x@node1.test"], b"Subject: plain\r\n\r\nx\r\n");
    let qid = queue_id(&r);
    let recs = spooled_records(&relay.spool_dir());
    let data = String::from_utf8_lossy(&recs.iter().find(|x| x.queue_id == qid).unwrap().data).into_owned();
    assert!(data.contains(&format!("with ESMTP id {qid}")), "{data}");
    assert_eq!(relay.queued_for("node1.test"), 2);
}

#[test]
fn plaintext_pipelined_after_starttls_is_discarded() {
    let (relay, der, _certs) = tls_relay("");
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").contains("STARTTLS"));
    // The injection: STARTTLS and a MAIL in one write.
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n");
    let first = c.read_once();
    assert_eq!(
        first, "220 2.0.0 Ready to start TLS\r\n",
        "one reply, nothing for the MAIL"
    );
    // Nothing else arrives in plaintext (a 250/503 for the injected MAIL would sit here and
    // also break the handshake below).
    c.stream.set_nonblocking(true).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut b = [0u8; 64];
    match c.stream.read(&mut b) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("plaintext after the 220: {other:?} {:?}", String::from_utf8_lossy(&b)),
    }
    c.stream.set_nonblocking(false).unwrap();
    let mut t = TlsSmtpClient::handshake(c.into_stream(), &der).expect("handshake");
    let r = t.cmd("EHLO client.test");
    assert!(
        r.starts_with("250-relay.test Hello client.test"),
        "the first reply inside TLS must be to our EHLO, not to an injected command: {r}"
    );
    let r = t.cmd("RCPT TO:<x@node1.test>");
    assert!(
        r.starts_with("503 5.5.1 "),
        "the injected MAIL must have been discarded: {r}"
    );
    assert!(t.cmd("MAIL FROM:<good@client.test>").starts_with("250 2.1.0"));
    let r = t.cmd("RCPT TO:<x@node1.test>");
    assert!(r.starts_with("250 2.1.5"), "{r}");
    assert_eq!(t.cmd("RSET"), "250 2.0.0 Ok");
    assert!(
        relay.log_lines_with(&["discarding plaintext pipelined after STARTTLS"]) >= 1,
        "the discard is logged"
    );
    // A whole injected transaction (the classic attack) leaves nothing in the queue.
    let mut c = relay.client();
    c.cmd("EHLO client.test");
    c.send(b"STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<x@node1.test>\r\nDATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.read_once(), "220 2.0.0 Ready to start TLS\r\n");
    let mut t = TlsSmtpClient::handshake(c.into_stream(), &der).expect("handshake");
    let r = t.cmd("EHLO client.test");
    assert!(r.starts_with("250-relay.test Hello client.test"), "{r}");
    assert_eq!(t.cmd("QUIT"), "221 2.0.0 relay.test closing connection");
    assert_eq!(relay.queued_for("node1.test"), 0, "nothing injected was queued");
}

#[test]
fn starttls_inside_a_transaction_or_with_an_argument_is_refused() {
    let (relay, der, _certs) = tls_relay("");
    let mut c = relay.client();
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("250 2.1.0"));
    let r = c.cmd("STARTTLS");
    assert!(r.starts_with("503 5.5.1 "), "inside a transaction: {r}");
    // Still plaintext and still in the transaction.
    assert!(c.cmd("RCPT TO:<x@node1.test>").starts_with("250 2.1.5"));
    assert_eq!(c.cmd("RSET"), "250 2.0.0 Ok");
    let r = c.cmd("STARTTLS now");
    assert!(r.starts_with("501 5.5.4 "), "{r}");
    // After RSET it works.
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let mut t = TlsSmtpClient::handshake(c.into_stream(), &der).expect("handshake");
    assert!(t.cmd("EHLO client.test").starts_with("250-"));
    assert_eq!(t.cmd("NOOP"), "250 2.0.0 Ok");
}

#[test]
fn without_a_certificate_starttls_is_neither_offered_nor_accepted() {
    let relay = Relay::start("shards = 1", "", NODES);
    let mut c = relay.client();
    let r = c.cmd("EHLO client.test");
    assert!(!r.contains("STARTTLS"), "{r}");
    let r = c.cmd("STARTTLS");
    assert!(r.starts_with("502 5.5.1 "), "{r}");
    // Still a working plaintext session.
    let r = c.send_mail("a@client.test", &["x@node1.test"], b"Subject: s\r\n\r\nx\r\n");
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
}

#[test]
fn failed_or_stalled_handshakes_close_only_that_connection() {
    let (relay, der, _certs) = tls_relay("timeout_secs = 2");
    // Garbage instead of a ClientHello.
    let mut c = relay.client();
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let mut s = c.into_stream();
    s.write_all(b"GET / HTTP/1.0\r\n\r\nEHLO x\r\nMAIL FROM:<a@b.test>\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let closed = loop {
        let mut b = [0u8; 256];
        match s.read(&mut b) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(closed, "connection not closed after a failed handshake");
    assert!(
        !String::from_utf8_lossy(&got).contains("250") && !String::from_utf8_lossy(&got).contains("503"),
        "no SMTP reply in plaintext after a failed handshake: {got:?}"
    );
    // A ClientHello that never comes: the idle timeout still applies.
    let mut c = relay.client();
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let (rest, took) = c.read_until_closed(Duration::from_secs(6));
    assert_eq!(rest, "", "nothing in plaintext");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // A handshake with a client that does not trust the certificate fails on the client side;
    // the server just drops that connection.
    let mut c = relay.client();
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let other = rcgen::generate_simple_self_signed(vec!["relay.test".into()]).unwrap();
    assert!(TlsSmtpClient::handshake(c.into_stream(), other.cert.der()).is_err());
    // The relay goes on serving, in plaintext and over TLS.
    let mut p = relay.client();
    p.cmd("EHLO client.test");
    assert_eq!(p.cmd("NOOP"), "250 2.0.0 Ok");
    let mut t = relay.client().starttls(&der);
    t.cmd("EHLO client.test");
    let r = t.send_mail("a@client.test", &["x@node1.test"], b"Subject: after\r\n\r\nx\r\n");
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    assert!(!relay.log().contains("panicked"));
}

/// The idle timeout inside TLS: `421 4.4.2` (encrypted), then the connection closes, as in
/// plaintext.
#[test]
fn idle_timeout_inside_tls_answers_421() {
    let (relay, der, _certs) = tls_relay("timeout_secs = 1");
    let mut t = relay.client().starttls(&der);
    assert!(t.cmd("EHLO client.test").starts_with("250-"));
    let (rest, took) = t.read_until_closed(Duration::from_secs(5));
    assert_eq!(
        rest, "421 4.4.2 Timeout exceeded, closing connection\r\n",
        "after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn swaks_sends_a_message_over_starttls() {
    let swaks = require_tool("swaks", "swaks libnet-ssleay-perl");
    let (relay, _der, _certs) = tls_relay("");
    let mut cmd = Command::new(swaks);
    cmd.args([
        "--server",
        &format!("127.0.0.1:{}", relay.port),
        "--tls",
        "--ehlo",
        "client.test",
        "-f",
        "a@client.test",
        "-t",
        "x@node1.test",
        "--header",
        "Subject: swaks over tls",
        "--timeout",
        "10",
    ]);
    let out = output_within(cmd, Duration::from_secs(20));
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swaks failed ({}): {transcript}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(transcript.contains("<-  220 2.0.0 Ready to start TLS"), "{transcript}");
    assert!(transcript.contains("=== TLS started with cipher"), "{transcript}");
    assert!(
        transcript.contains("~> MAIL FROM:<a@client.test>"),
        "MAIL went inside TLS: {transcript}"
    );
    assert_eq!(relay.queued_for("node1.test"), 1);
    let recs = spooled_records(&relay.spool_dir());
    assert_eq!(recs.len(), 1);
    let data = String::from_utf8_lossy(&recs[0].data);
    assert!(data.contains("with ESMTPS id"), "{data}");
    assert!(data.contains("Subject: swaks over tls"), "{data}");
}

/// An unreadable certificate is a configuration error: exit 2 with the key named, nothing
/// listening.
#[test]
fn unreadable_certificate_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "spool_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:{}\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.path().join("spool").display(),
            free_port(),
            dir.path().join("missing-cert.pem").display(),
            dir.path().join("missing-key.pem").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(relay_bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert") && err.contains("missing-cert.pem"), "{err}");
}
