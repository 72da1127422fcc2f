//! SIGTERM (issue 5): listeners close, connections waiting for a command get `421 4.3.2`
//! (plaintext and TLS alike), a DATA in progress is finished and answered and then gets the
//! 421, a DATA that stalls is cut off by the timeout with the 421, the spool is synced and the
//! process exits 0; what was acknowledged is there after a restart, what was not is not.
mod common;
use common::*;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const NODES: &str = "[[node]]\nname = \"node1.test\"\n";
const SHUTDOWN: &str = "421 4.3.2 Service shutting down, closing connection\r\n";

/// MAIL, RCPT, DATA, then the first part of a message; the client stays inside DATA.
fn start_data(c: &mut SmtpClient, part: &[u8]) {
    c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@node1.test>\r\nDATA\r\n");
    let r = c.read_replies(3);
    assert!(r[2].starts_with("354 "), "{r:?}");
    c.send(part);
}

fn ehlo(c: &mut SmtpClient) {
    assert!(c.cmd("EHLO client.test").starts_with("250-relay.test"));
}

/// New connections after the listeners closed: refused, or closed at once without a greeting.
fn assert_not_accepting(relay: &Relay) {
    for _ in 0..5 {
        match TcpStream::connect(relay.addr()) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut b = [0u8; 64];
                match s.read(&mut b) {
                    Ok(0) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    other => panic!(
                        "a new connection after SIGTERM was served: {other:?} {:?}",
                        String::from_utf8_lossy(&b)
                    ),
                }
            }
        }
    }
}

#[test]
fn sigterm_finishes_data_in_flight_sends_421_to_the_others_and_exits_0() {
    let certs = tempfile::tempdir().unwrap();
    let (tls, der) = test_certificate(certs.path());
    let rest = format!("{NODES}{tls}");
    let mut relay = Relay::start("shards = 2", "", &rest);
    // A client in the middle of DATA.
    let mut data = relay.client();
    ehlo(&mut data);
    start_data(&mut data, b"Subject: in flight\r\n\r\nfirst half\r\n");
    // Idle ones after EHLO, in plaintext and inside TLS.
    let mut idle = relay.client();
    ehlo(&mut idle);
    let mut idle_tls = relay.client().starttls(&der);
    assert!(idle_tls.cmd("EHLO client.test").starts_with("250-"));
    std::thread::sleep(Duration::from_millis(200));

    relay.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let (got, took) = idle.read_until_closed(Duration::from_secs(5));
    assert_eq!(got, SHUTDOWN, "idle client after {took:?}");
    let (got, _) = idle_tls.read_until_closed(Duration::from_secs(5));
    assert_eq!(got, SHUTDOWN, "idle TLS client");
    // Every shard polls for the signal within 100 ms; then nothing new is accepted.
    std::thread::sleep(Duration::from_millis(300));
    assert_not_accepting(&relay);
    assert!(!relay.has_exited(), "the relay waits for the DATA in flight");

    // The DATA client finishes its message (with a command pipelined behind it): 250 for the
    // message, then 421 instead of an answer to the NOOP.
    data.send(b"second half\r\n.\r\nNOOP\r\n");
    let r = data.read_reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let qid = queue_id(&r);
    let (got, _) = data.read_until_closed(Duration::from_secs(5));
    assert_eq!(got, SHUTDOWN);

    let status = relay.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}; log:\n{}", relay.log());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let log = relay.log();
    assert_eq!(log.matches("shard stopped").count(), 2, "{log}");
    assert!(!log.contains("open_connections=1"), "{log}");

    // After a restart the finished message is in the spool, whole.
    let dir = relay.into_dir();
    let relay = Relay::start_in(dir, "shards = 2", "", &rest);
    assert_eq!(relay.queued_for("node1.test"), 1);
    let recs = spooled_records(&relay.spool_dir());
    let rec = recs
        .iter()
        .find(|r| r.queue_id == qid)
        .expect("the acknowledged message");
    assert!(rec
        .data
        .ends_with(b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"));
}

#[test]
fn sigterm_with_a_stalled_data_cuts_it_off_at_the_timeout_and_keeps_only_acknowledged_mail() {
    let mut relay = Relay::start("shards = 1", "timeout_secs = 2", NODES);
    let mut c = relay.client();
    ehlo(&mut c);
    let r = c.send_mail(
        "a@client.test",
        &["x@node1.test"],
        b"Subject: acknowledged\r\n\r\nx\r\n",
    );
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let qid = queue_id(&r);
    // A second message stalls half way.
    start_data(&mut c, b"Subject: never finished\r\n\r\nhalf\r\n");
    std::thread::sleep(Duration::from_millis(500));
    relay.signal(libc::SIGTERM);
    let t0 = Instant::now();
    // The DATA is not interrupted by the shutdown itself, only by the idle timeout.
    let (got, took) = c.read_until_closed(Duration::from_secs(6));
    assert_eq!(got, SHUTDOWN, "after {took:?}");
    assert!(
        took >= Duration::from_millis(1000),
        "cut off before the timeout: {took:?}"
    );
    let status = relay.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let dir = relay.into_dir();
    let relay = Relay::start_in(dir, "shards = 1", "timeout_secs = 2", NODES);
    assert_eq!(relay.queued_for("node1.test"), 1, "only the acknowledged message");
    let recs = spooled_records(&relay.spool_dir());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].queue_id, qid);
}

#[test]
fn sigterm_with_no_clients_exits_0_at_once_and_sigint_too() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut relay = Relay::start("shards = 2", "", NODES);
        let t0 = Instant::now();
        relay.signal(sig);
        let status = relay.wait_exit(Duration::from_secs(3));
        assert!(status.success(), "signal {sig}: exit status {status}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "signal {sig}: took {:?}",
            t0.elapsed()
        );
    }
}
