//! End-to-end: the SMTP server over real sockets (issue: relay core).
mod common;
use common::*;

const NODES: &str = "[[node]]\nname = \"node1.test\"\n[[node]]\nname = \"node2.test\"\nsubdomains = true\n";

#[test]
fn full_transaction_is_acknowledged_with_queue_id() {
    let relay = Relay::start("shards = 2", "", NODES);
    let mut c = relay.client();
    let ehlo = c.cmd("EHLO client.test");
    for ext in ["PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES", "ETRN"] {
        assert!(ehlo.contains(ext), "{ext} not in {ehlo}");
    }
    let r = c.send_mail("a@client.test", &["x@node1.test"], b"Subject: t\r\n\r\nhello\r\n");
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let qid = queue_id(&r);
    assert_eq!(qid.len(), 16);
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 relay.test closing connection");
    wait_for("log line with queue id", std::time::Duration::from_secs(5), || {
        relay.log().contains(&qid)
    });
    assert_eq!(relay.queued_for("node1.test"), 1);
}

#[test]
fn pipelined_batch_in_one_write_gets_replies_in_order() {
    let relay = Relay::start("shards = 2", "", NODES);
    let mut c = relay.client();
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<x@node1.test>\r\nRCPT TO:<y@elsewhere.test>\r\nRCPT TO:<z@sub.node2.test>\r\nDATA\r\n");
    assert!(c.read_reply().starts_with("250-relay.test"));
    assert!(c.read_reply().starts_with("250 2.1.0"));
    assert!(c.read_reply().starts_with("250 2.1.5"));
    assert!(c.read_reply().starts_with("550 5.7.1"));
    assert!(c.read_reply().starts_with("250 2.1.5"));
    assert!(c.read_reply().starts_with("354"));
    c.send(
        b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<q@node1.test>\r\nDATA\r\nx\r\n.\r\nNOOP\r\nQUIT\r\n",
    );
    assert!(c.read_reply().starts_with("250 2.0.0 Ok: queued as"));
    assert!(c.read_reply().starts_with("250 2.1.0"));
    assert!(c.read_reply().starts_with("250 2.1.5"));
    assert!(c.read_reply().starts_with("354"));
    assert!(c.read_reply().starts_with("250 2.0.0 Ok: queued as"));
    assert!(c.read_reply().starts_with("250 2.0.0 Ok"));
    assert!(c.read_reply().starts_with("221"));
    assert_eq!(relay.queued_for("node1.test"), 2);
    assert_eq!(relay.queued_for("node2.test"), 1);
}
