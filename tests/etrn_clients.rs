//! End-to-end: real ETRN clients against the relay (issue 3): fetchmail's ETRN mode, msmtp's
//! `--rmqs` (without AUTH, with AUTH CRAM-MD5 and with AUTH PLAIN) and the relay's own
//! `etrn-relay flush`. A missing client is a failure with the install command, never a skip.
mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn zone() -> Vec<String> {
    mx_zone(&[
        ("node1.test", &[(10, "mx.node1.test", "127.0.0.2")]),
        ("plain.test", &[(10, "mx.plain.test", "127.0.0.8")]),
        ("md5.test", &[(10, "mx.md5.test", "127.0.0.8")]),
    ])
}

fn nodes() -> String {
    "[[node]]\nname = \"node1.test\"\n\
     [[node]]\nname = \"plain.test\"\nauth = \"plain\"\nuser = \"puser\"\npassword = \"ppass\"\nstatic_ip = \"127.0.0.7\"\n\
     [[node]]\nname = \"md5.test\"\nauth = \"md5\"\nuser = \"muser\"\npassword = \"mpass\"\n"
        .to_string()
}

fn relay(dns: &Dns, port: u16) -> Relay {
    Relay::start(
        "shards = 2",
        "allow_plaintext_auth = true",
        &format!("{}{}", delivery_toml(dns, port, ""), nodes()),
    )
}

fn submit(relay: &Relay, rcpt: &str, n: usize) {
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    for i in 0..n {
        let body = format!("X-Test-Id: {rcpt}-{i}\r\nSubject: {i}\r\n\r\nbody\r\n");
        assert!(c
            .send_mail("a@client.test", &[rcpt], body.as_bytes())
            .starts_with("250 2.0.0"));
    }
    c.cmd("QUIT");
}

fn wait_count(what: &str, relay: &Relay, want: usize, count: impl Fn() -> usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if count() >= want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: got {} of {want}; log:\n{}", count(), relay.log());
}

fn wait_run_finished(relay: &Relay, node: &str, n: usize) {
    let node = format!("node={node}");
    wait_count(&format!("queue run {n} of {node}"), relay, n, || {
        relay.log_lines_with(&["queue run finished", &node])
    });
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// fetchmail in ETRN mode with an empty private rc file in its own FETCHMAILHOME.
fn fetchmail(home: &Path, port: u16, domain: &str) -> Output {
    let bin = require_tool("fetchmail", "fetchmail");
    let rc = home.join(".fetchmailrc");
    std::fs::write(&rc, "").unwrap();
    std::fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    Command::new(bin)
        .env("FETCHMAILHOME", home)
        .env("HOME", home)
        .args([
            "-v",
            "--nosyslog",
            "-p",
            "ETRN",
            "-P",
            &port.to_string(),
            "--fetchdomains",
            domain,
            "127.0.0.1",
        ])
        .output()
        .expect("run fetchmail")
}

fn msmtp(port: u16, extra: &[&str]) -> Output {
    let bin = require_tool("msmtp", "msmtp");
    Command::new(bin)
        .arg("--host=127.0.0.1")
        .arg(format!("--port={port}"))
        .args(["--tls=off", "--domain=client.test"])
        .args(extra)
        .output()
        .expect("run msmtp")
}

fn flush(relay: &Relay, args: &[&str]) -> Output {
    Command::new(relay_bin())
        .arg("flush")
        .args(args)
        .args(["--server", &relay.addr().to_string()])
        .output()
        .expect("run etrn-relay flush")
}

#[test]
fn fetchmail_etrn_mode_starts_the_queue() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let sink = Sink::start("127.0.0.2", port, &[]);
    let relay = relay(&dns, port);
    let home = tempfile::tempdir().unwrap();
    submit(&relay, "u@node1.test", 3);

    let out = fetchmail(home.path(), relay.port, "node1.test");
    let text = show(&out);
    assert_eq!(out.status.code(), Some(0), "253 is success for fetchmail: {text}");
    assert!(
        text.contains("253 2.0.0 OK, 3 pending messages for node node1.test started"),
        "{text}"
    );
    wait_count("3 messages at the sink", &relay, 3, || sink.complete_count());
    wait_run_finished(&relay, "node1.test", 1);

    // Empty queue: 251, which fetchmail 6.4 understands ("No messages waiting") and treats as
    // a normal poll (exit 0, not 1 as some documentation says).
    let out = fetchmail(home.path(), relay.port, "node1.test");
    let text = show(&out);
    assert!(
        text.contains("ETRN< 251 2.0.0 OK, no messages waiting for node node1.test"),
        "{text}"
    );
    assert!(text.contains("No messages waiting for node1.test"), "{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");

    // A protected node without authentication (fetchmail's ETRN mode has no AUTH): 459, and
    // fetchmail says so with its AUTHFAIL code 3.
    let out = fetchmail(home.path(), relay.port, "plain.test");
    let text = show(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("459 4.7.1 Node plain.test not allowed"), "{text}");
    assert_eq!(sink.count(), 3);
}

#[test]
fn msmtp_rmqs_without_auth() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let sink = Sink::start("127.0.0.2", port, &[]);
    let relay = relay(&dns, port);
    submit(&relay, "u@node1.test", 2);
    let out = msmtp(relay.port, &["--auth=off", "--rmqs=node1.test"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_count("2 messages at the sink", &relay, 2, || sink.complete_count());
    wait_run_finished(&relay, "node1.test", 1);

    // Empty queue (251) is still a success for msmtp; a protected node without AUTH is not.
    let out = msmtp(relay.port, &["--auth=off", "--rmqs=node1.test"]);
    assert!(out.status.success(), "{}", show(&out));
    submit(&relay, "u@md5.test", 1);
    let out = msmtp(relay.port, &["--auth=off", "--rmqs=md5.test"]);
    assert!(!out.status.success(), "459 must fail: {}", show(&out));
    assert!(show(&out).contains("459"), "{}", show(&out));
}

#[test]
fn msmtp_rmqs_with_cram_md5_delivers_to_the_client_address() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let dynamic = Sink::start("127.0.0.9", port, &[]);
    let mx = Sink::start("127.0.0.8", port, &[]);
    let relay = relay(&dns, port);
    submit(&relay, "u@md5.test", 3);
    let out = msmtp(
        relay.port,
        &[
            "--source-ip=127.0.0.9",
            "--auth=cram-md5",
            "--user=muser",
            "--passwordeval=echo mpass",
            "--rmqs=md5.test",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    wait_count("3 messages at the ETRN client's address", &relay, 3, || {
        dynamic.complete_count()
    });
    wait_run_finished(&relay, "md5.test", 1);
    assert_eq!(mx.count(), 0);
    assert_eq!(
        relay.log_lines_with(&["authenticated", "CRAM-MD5", "muser"]),
        1,
        "{}",
        relay.log()
    );

    // A wrong password fails (535) and starts nothing.
    submit(&relay, "u@md5.test", 1);
    let out = msmtp(
        relay.port,
        &[
            "--source-ip=127.0.0.9",
            "--auth=cram-md5",
            "--user=muser",
            "--passwordeval=echo nope",
            "--rmqs=md5.test",
        ],
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(show(&out).contains("535"), "{}", show(&out));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dynamic.count(), 3);
    assert_eq!(relay.queued_for("md5.test"), 1);
}

#[test]
fn msmtp_rmqs_with_auth_plain_delivers_to_the_static_ip() {
    let dns = Dns::start(&zone());
    let port = reserve_port();
    let static_sink = Sink::start("127.0.0.7", port, &[]);
    let mx = Sink::start("127.0.0.8", port, &[]);
    let relay = relay(&dns, port);
    submit(&relay, "u@plain.test", 2);
    let out = msmtp(
        relay.port,
        &[
            "--auth=plain",
            "--user=puser",
            "--passwordeval=echo ppass",
            "--rmqs=plain.test",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    wait_count("2 messages at the static IP", &relay, 2, || {
        static_sink.complete_count()
    });
    wait_run_finished(&relay, "plain.test", 1);
    assert_eq!(mx.count(), 0);
    assert_eq!(
        relay.log_lines_with(&["authenticated", "PLAIN", "puser"]),
        1,
        "{}",
        relay.log()
    );
}

#[test]
fn flush_command_prints_the_etrn_reply() {
    let dns = Dns::start(&zone());
    // The md5 node's mail goes to the flush command's own address, 127.0.0.1: this test's
    // sinks use a port that is free on 127.0.0.1 too.
    let port = free_port();
    let local = Sink::start("127.0.0.1", port, &[]);
    let sink = Sink::start("127.0.0.2", port, &[]);
    let static_sink = Sink::start("127.0.0.7", port, &[]);
    let relay = relay(&dns, port);
    submit(&relay, "u@node1.test", 2);
    submit(&relay, "u@plain.test", 1);
    submit(&relay, "u@md5.test", 1);

    let out = flush(&relay, &["node1.test"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "253 2.0.0 OK, 2 pending messages for node node1.test started\n"
    );
    wait_count("node1's mail", &relay, 2, || sink.complete_count());
    wait_run_finished(&relay, "node1.test", 1);
    let out = flush(&relay, &["node1.test"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "251 2.0.0 OK, no messages waiting for node node1.test\n"
    );

    // Protected nodes: refused without credentials (exit 1, the 459 printed) ...
    let out = flush(&relay, &["plain.test"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("459 4.7.1 Node plain.test not allowed"),
        "{}",
        show(&out)
    );
    // ... started with them.
    let out = flush(
        &relay,
        &[
            "plain.test",
            "--user",
            "puser",
            "--password",
            "ppass",
            "--mech",
            "plain",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "253 2.0.0 OK, 1 pending messages for node plain.test started\n"
    );
    wait_count("plain.test's mail at its static IP", &relay, 1, || {
        static_sink.complete_count()
    });

    let out = flush(
        &relay,
        &["md5.test", "--user", "muser", "--password", "mpass", "--mech", "plain"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "PLAIN is not enough for an md5 node: {}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("459 "),
        "{}",
        show(&out)
    );
    let out = flush(&relay, &["md5.test", "--user", "muser", "--password", "mpass"]);
    assert!(
        out.status.success(),
        "cram-md5 is the default mechanism: {}",
        show(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "253 2.0.0 OK, 1 pending messages for node md5.test started\n"
    );
    wait_count("md5.test's mail at the flush command's address", &relay, 1, || {
        local.complete_count()
    });

    // A wrong password: an error on stderr naming the 535, exit 1.
    let out = flush(&relay, &["md5.test", "--user", "muser", "--password", "bad"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("535 5.7.8"),
        "{}",
        show(&out)
    );
}
