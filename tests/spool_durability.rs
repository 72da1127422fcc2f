//! End-to-end: nothing acknowledged is ever lost (issue: relay core, spool). Every test kills
//! the real server with SIGKILL (no clean-up at all) and starts a new one on the same spool.
//!
//! Needs dnsmasq and Postfix's smtp-sink (queue runs to a node on 127.0.0.2), and root for the
//! tmpfs of the disk-full test; each fails loudly without them.
mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SINK_IP: &str = "127.0.0.2";

fn node_config(names: &[&str]) -> String {
    names.iter().map(|n| format!("[[node]]\nname = \"{n}\"\n")).collect()
}

/// A message whose body says which one it is.
fn body(tag: &str, lines: usize) -> Vec<u8> {
    let mut b = format!("Subject: message {tag}\r\nX-Test-Id: {tag}\r\n\r\n").into_bytes();
    for i in 0..lines {
        b.extend_from_slice(format!("{tag} line {i:04} {}\r\n", "x".repeat(80)).as_bytes());
    }
    b
}

/// Sends one message on a fresh connection; returns the final reply.
fn send_one(relay: &Relay, rcpts: &[&str], tag: &str, lines: usize) -> String {
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    c.send_mail("a@client.test", rcpts, &body(tag, lines))
}

/// `ETRN <node>` on a fresh connection; returns the reply.
fn etrn(relay: &Relay, node: &str) -> String {
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    c.cmd(&format!("ETRN {node}"))
}

/// The X-Test-Id of every message the sink received, with how often it came.
fn sink_ids(sink: &Sink) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in sink.messages() {
        let text = String::from_utf8_lossy(&f);
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Test-Id: "))
            .unwrap_or_else(|| panic!("message without X-Test-Id: {text}"))
            .trim()
            .to_owned();
        *m.entry(id).or_default() += 1;
    }
    m
}

fn wait_sink(sink: &Sink, n: usize) {
    wait_for(&format!("{n} messages at the sink"), Duration::from_secs(30), || {
        sink.count() >= n
    });
    // Anything more would be a duplicate: give it a moment to show up.
    std::thread::sleep(Duration::from_millis(200));
}

fn wait_queue_empty(relay: &Relay, nodes: &[&str]) {
    wait_for("delivery states on disk", Duration::from_secs(10), || {
        nodes.iter().all(|n| relay.queued_for(n) == 0)
    });
}

/// `conns` connections at once, each sending `per_conn` messages of `lines` lines to
/// x@node1.test, tagged `tag(connection, message)`; every one must get a 250. Returns (tag,
/// queue id) pairs.
fn send_concurrently(
    relay: &Relay,
    conns: usize,
    per_conn: usize,
    lines: usize,
    tag: impl Fn(usize, usize) -> String + Sync,
) -> Vec<(String, String)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|t| {
                let tag = &tag;
                s.spawn(move || {
                    let mut c = relay.client();
                    assert!(c.cmd("EHLO client.test").starts_with("250"));
                    (0..per_conn)
                        .map(|i| {
                            let tag = tag(t, i);
                            let r = c.send_mail("a@client.test", &["x@node1.test"], &body(&tag, lines));
                            assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{tag}: {r}");
                            let qid = queue_id(&r);
                            (tag, qid)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn acknowledged_mail_survives_kill9_and_is_delivered_exactly_once() {
    let servers = NodeServers::start(&["node1.test"], SINK_IP);
    let rest = format!("{}{}", servers.config(), node_config(&["node1.test"]));
    let relay = Relay::start("shards = 2", "", &rest);
    // 50 messages over 5 concurrent connections (group commit), each acknowledged with 250.
    let ids: Vec<String> = send_concurrently(&relay, 5, 10, 20, |t, i| format!("m{}", t * 10 + i))
        .into_iter()
        .map(|(_, qid)| qid)
        .collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 50, "queue ids are unique");
    let dir = relay.into_dir(); // SIGKILL
    let relay = Relay::start_in(dir, "shards = 2", "", &rest);
    assert_eq!(relay.queued_for("node1.test"), 50);
    assert!(relay.log().contains("messages=50"), "{}", relay.log());
    let stored: BTreeSet<String> = spooled_records(&relay.spool_dir())
        .into_iter()
        .map(|r| r.queue_id)
        .collect();
    assert_eq!(
        stored,
        ids.iter().cloned().collect(),
        "exactly the acknowledged queue ids are stored"
    );
    let old_segments = relay.segment_files();
    assert!(!old_segments.is_empty());

    let r = etrn(&relay, "node1.test");
    assert_eq!(r, "253 2.0.0 OK, 50 pending messages for node node1.test started");
    wait_sink(&servers.sink, 50);
    let got = sink_ids(&servers.sink);
    assert_eq!(got.len(), 50, "{got:?}");
    assert!(got.values().all(|n| *n == 1), "duplicates: {got:?}");
    wait_queue_empty(&relay, &["node1.test"]);
    // The recovered segments are reclaimed once their mail is delivered.
    wait_for("recovered segments removed", Duration::from_secs(10), || {
        old_segments.iter().all(|p| !p.exists())
    });
    wait_for("removed segments closed", Duration::from_secs(10), || {
        relay.open_deleted_files().is_empty()
    });
    // Delivered stays delivered across another SIGKILL.
    let dir = relay.into_dir();
    let relay = Relay::start_in(dir, "shards = 2", "", &rest);
    assert_eq!(relay.queued_for("node1.test"), 0);
    assert_eq!(
        etrn(&relay, "node1.test"),
        "251 2.0.0 OK, no messages waiting for node node1.test"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(servers.sink.count(), 50);
}

#[test]
fn shard_count_changes_between_restarts_lose_nothing() {
    let nodes = ["node1.test", "node2.test", "node3.test", "node4.test"];
    let servers = NodeServers::start(&nodes, SINK_IP);
    let rest = format!("{}{}", servers.config(), node_config(&nodes));
    let relay = Relay::start("shards = 1", "", &rest);
    for n in &nodes {
        for i in 0..2 {
            let r = send_one(&relay, &[&format!("x@{n}")], &format!("{n}-a{i}"), 5);
            assert!(r.starts_with("250 2.0.0"), "{r}");
        }
    }
    let r = send_one(&relay, &["x@node1.test", "y@node3.test"], "multi", 5);
    assert!(r.starts_with("250 2.0.0"), "{r}");

    // 1 -> 2 shards: every queue is found, and each is in its owning shard's memory (the ETRN
    // count comes from the owner's queue, not from the files).
    let relay = Relay::start_in(relay.into_dir(), "shards = 2", "", &rest);
    for (n, want) in nodes.iter().zip([3, 2, 3, 2]) {
        assert_eq!(relay.queued_for(n), want, "{n}");
    }
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 3 pending messages for node node1.test started"
    );
    assert_eq!(
        etrn(&relay, "node2.test"),
        "253 2.0.0 OK, 2 pending messages for node node2.test started"
    );
    wait_sink(&servers.sink, 5);
    wait_queue_empty(&relay, &["node1.test", "node2.test"]);
    for n in &nodes {
        let r = send_one(&relay, &[&format!("x@{n}")], &format!("{n}-b"), 5);
        assert!(r.starts_with("250 2.0.0"), "{r}");
    }

    // 2 -> 1 shard: the rest, including the node3 half of the two-node message.
    let relay = Relay::start_in(relay.into_dir(), "shards = 1", "", &rest);
    for (n, want) in nodes.iter().zip([1, 1, 4, 3]) {
        assert_eq!(relay.queued_for(n), want, "{n}");
        let r = etrn(&relay, n);
        assert_eq!(r, format!("253 2.0.0 OK, {want} pending messages for node {n} started"));
    }
    wait_sink(&servers.sink, 14);
    let got = sink_ids(&servers.sink);
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for n in &nodes {
        want.insert(format!("{n}-a0"), 1);
        want.insert(format!("{n}-a1"), 1);
        want.insert(format!("{n}-b"), 1);
    }
    want.insert("multi".into(), 2); // once to each node
    assert_eq!(got, want);
    wait_queue_empty(&relay, &nodes);
}

/// Five messages for node1 on a one-shard relay; returns the relay and the queue ids in order.
fn five_messages(rest: &str) -> (Relay, Vec<String>) {
    let relay = Relay::start("shards = 1", "", rest);
    let mut ids = Vec::new();
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    for i in 0..5 {
        let r = c.send_mail("a@client.test", &["x@node1.test"], &body(&format!("m{i}"), 30));
        assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
        ids.push(queue_id(&r));
    }
    (relay, ids)
}

fn record_of<'a>(recs: &'a [SpooledRecord], qid: &str) -> &'a SpooledRecord {
    recs.iter().find(|r| r.queue_id == qid).expect("record in the spool")
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at as u64)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn corrupt_record_is_skipped_with_a_log_line_and_the_rest_is_delivered() {
    let servers = NodeServers::start(&["node1.test"], SINK_IP);
    let rest = format!("{}{}", servers.config(), node_config(&["node1.test"]));
    let (relay, ids) = five_messages(&rest);
    let dir = relay.into_dir();
    let spool = dir.path().join("spool");
    let recs = spooled_records(&spool);
    assert_eq!(recs.len(), 5);
    // Flip bytes in the middle of the third message's data.
    let r = record_of(&recs, &ids[2]);
    let mid = r.data_at + r.data.len() / 2;
    let flipped: Vec<u8> = r.data[r.data.len() / 2..r.data.len() / 2 + 4]
        .iter()
        .map(|b| b ^ 0x5a)
        .collect();
    patch(&r.path, mid, &flipped);
    // And one octet of the first message's envelope (its recipient): the header checksum
    // fails, so its length cannot be trusted and the scan must find the next record itself.
    let r = record_of(&recs, &ids[0]);
    let at = r.data_at - r.recipients.len() - 3;
    patch(&r.path, at, b"#");

    let relay = Relay::start_in(dir, "shards = 1", "", &rest);
    let log = relay.log();
    assert!(log.contains("skipping spool record with bad data checksum"), "{log}");
    assert!(log.contains("skipping damaged spool bytes"), "{log}");
    assert!(log.contains("corrupt_records=2"), "{log}");
    assert_eq!(relay.queued_for("node1.test"), 3);
    assert!(relay.queue_listing().contains("(2 damaged record(s) skipped)"));
    // The server works and the three good messages are delivered, the damaged ones are not.
    assert_eq!(
        etrn(&relay, "node1.test"),
        "253 2.0.0 OK, 3 pending messages for node node1.test started"
    );
    wait_sink(&servers.sink, 3);
    let got: Vec<String> = sink_ids(&servers.sink).into_keys().collect();
    assert_eq!(got, ["m1", "m3", "m4"]);
    let r = send_one(&relay, &["x@node1.test"], "after", 3);
    assert!(r.starts_with("250 2.0.0"), "{r}");
}

#[test]
fn torn_and_truncated_segment_tails_are_skipped() {
    let rest = node_config(&["node1.test"]);
    let (relay, ids) = five_messages(&rest);
    let dir = relay.into_dir();
    let spool = dir.path().join("spool");
    let recs = spooled_records(&spool);
    // Torn write in the preallocated file: the second half of the last record never made it.
    let last = record_of(&recs, &ids[4]);
    let half = last.offset + last.total_len / 2;
    patch(&last.path, half, &vec![0u8; last.offset + last.total_len - half]);
    let relay = Relay::start_in(dir, "shards = 1", "", &rest);
    assert!(relay.log().contains("corrupt_records=1"), "{}", relay.log());
    assert_eq!(relay.queued_for("node1.test"), 4);

    // Truncated file: cut in the middle of (now) the last intact record.
    let dir = relay.into_dir();
    let fourth = record_of(&recs, &ids[3]);
    let f = std::fs::OpenOptions::new().write(true).open(&fourth.path).unwrap();
    f.set_len((fourth.offset + fourth.total_len / 2) as u64).unwrap();
    drop(f);
    let relay = Relay::start_in(dir, "shards = 1", "", &rest);
    assert!(relay.log().contains("skipping damaged spool bytes"), "{}", relay.log());
    assert_eq!(relay.queued_for("node1.test"), 3);
    let left: BTreeSet<String> = spooled_records(&relay.spool_dir())
        .into_iter()
        .map(|r| r.queue_id)
        .collect();
    assert_eq!(left, ids[..3].iter().cloned().collect());
    // New mail goes to a new segment; old and new are both there after another SIGKILL.
    let r = send_one(&relay, &["x@node1.test"], "new", 3);
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let relay = Relay::start_in(relay.into_dir(), "shards = 1", "", &rest);
    assert_eq!(relay.queued_for("node1.test"), 4);
}

#[test]
fn second_server_on_the_same_spool_refuses_to_start() {
    let rest = node_config(&["node1.test"]);
    let relay = Relay::start("shards = 1", "", &rest);
    let config = std::fs::read_to_string(&relay.config_path).unwrap();
    let other_port = free_port();
    let config = config.replace(&format!("127.0.0.1:{}", relay.port), &format!("127.0.0.1:{other_port}"));
    let path = relay.dir.path().join("second.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(relay_bin());
    cmd.args(["serve", "--config"]).arg(&path);
    let out = output_within(cmd, Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second server started: {err}");
    assert!(err.contains("locked"), "{err}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other_port)).is_err(),
        "second server listens"
    );
    // The first one is undisturbed.
    let r = send_one(&relay, &["x@node1.test"], "still", 2);
    assert!(r.starts_with("250 2.0.0"), "{r}");
}

#[test]
fn delivered_segments_are_removed() {
    let servers = NodeServers::start(&["node1.test"], SINK_IP);
    let rest = format!("{}{}", servers.config(), node_config(&["node1.test"]));
    // Two shards, a connection per message: both shards write segments, and the node's owner
    // delivers (and reports back) mail that the other shard stored.
    let top = "shards = 2\nspool_segment_size = 65536";
    let relay = Relay::start(top, "", &rest);
    for round in 0..2 {
        // About 9 kB each: 40 messages fill six 64 kB segments.
        for i in 0..40 {
            let r = send_one(&relay, &["x@node1.test"], &format!("r{round}m{i}"), 90);
            assert!(r.starts_with("250 2.0.0"), "{r}");
        }
        let segs = relay.segment_files();
        assert!(segs.len() >= 6, "segments did not rotate: {segs:?}");
        // A segment id's low octet is the shard that wrote it.
        let writers: BTreeSet<String> = segs
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy()[14..].to_owned())
            .collect();
        assert_eq!(writers.len(), 2, "both shards stored mail: {segs:?}");
        let r = etrn(&relay, "node1.test");
        assert_eq!(r, "253 2.0.0 OK, 40 pending messages for node node1.test started");
        wait_sink(&servers.sink, 40 * (round + 1));
        wait_for("only the active segments left", Duration::from_secs(10), || {
            relay.segment_files().len() <= 2
        });
        let left = relay.segment_files();
        assert!(left.iter().all(|p| segs.contains(p)), "{left:?} {segs:?}");
        // Removed files are closed too, or their space would not come back.
        wait_for("removed segments closed", Duration::from_secs(10), || {
            relay.open_deleted_files().is_empty()
        });
    }
    let got = sink_ids(&servers.sink);
    assert_eq!(got.len(), 80);
    assert!(got.values().all(|n| *n == 1));
    // After a restart the fully delivered active segments are dead and go too.
    let relay = Relay::start_in(relay.into_dir(), top, "", &rest);
    assert_eq!(relay.segment_files(), Vec::<PathBuf>::new());
    assert_eq!(relay.queued_for("node1.test"), 0);
}

/// A tmpfs mounted for one test, unmounted (lazily, so a still-running process cannot keep it)
/// when the test ends however it ends; then `cleanup` is removed.
struct TmpfsMount {
    path: PathBuf,
    cleanup: PathBuf,
}

impl TmpfsMount {
    fn mount(path: &Path, size: &str, cleanup: &Path) -> TmpfsMount {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (root with CAP_SYS_ADMIN): `mount -t tmpfs -o size={size} tmpfs {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        TmpfsMount {
            path: path.to_owned(),
            cleanup: cleanup.to_owned(),
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir_all(&self.cleanup);
    }
}

#[test]
fn disk_full_is_a_4xx_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let cleanup = dir.path().to_owned();
    let _mount = TmpfsMount::mount(&spool, "2m", &cleanup);
    // Leave room for a few 64 kB segments only.
    let filler = spool.join("filler");
    std::fs::write(&filler, vec![1u8; 1600 << 10]).unwrap();
    let top = "shards = 1\nspool_segment_size = 65536";
    let rest = node_config(&["node1.test"]);
    let relay = Relay::start_in(dir, top, "", &rest);
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..300 {
        let r = c.send_mail("a@client.test", &["x@node1.test"], &body(&format!("m{i}"), 60));
        if r.starts_with("250 2.0.0 Ok: queued as ") {
            accepted.push(queue_id(&r));
        } else {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("the 2 MB tmpfs never filled up");
    assert!(refused.starts_with("452 4.3.1 "), "{refused}");
    assert!(
        accepted.len() >= 5,
        "only {} accepted before the disk was full",
        accepted.len()
    );
    // The server stays up: this connection and a new one work; more mail is still refused.
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    let r = send_one(&relay, &["x@node1.test"], "still-full", 60);
    assert!(r.starts_with("452 4.3.1 "), "{r}");
    assert_eq!(relay.queued_for("node1.test"), accepted.len());
    assert!(relay.log().contains("spool file system full"), "{}", relay.log());

    // SIGKILL and restart on the same (still mounted, still full) spool: all acknowledged mail
    // is there, intact.
    let relay = Relay::start_in(relay.into_dir(), top, "", &rest);
    assert_eq!(relay.queued_for("node1.test"), accepted.len());
    let recs = spooled_records(&relay.spool_dir());
    let stored: BTreeSet<String> = recs.iter().map(|r| r.queue_id.clone()).collect();
    assert_eq!(stored, accepted.iter().cloned().collect::<BTreeSet<_>>());
    for (i, qid) in accepted.iter().enumerate() {
        let data = String::from_utf8_lossy(&record_of(&recs, qid).data).into_owned();
        assert!(data.contains(&format!("X-Test-Id: m{i}\r\n")), "{qid}");
    }
    let r = send_one(&relay, &["x@node1.test"], "full-after-restart", 60);
    assert!(r.starts_with("452 4.3.1 "), "{r}");
    // Space comes back: mail is accepted again.
    std::fs::remove_file(&filler).unwrap();
    let r = send_one(&relay, &["x@node1.test"], "after", 60);
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    assert_eq!(relay.queued_for("node1.test"), accepted.len() + 1);
    drop(relay);
}

#[test]
fn failed_writes_on_a_full_disk_leave_no_dead_segment_behind() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let cleanup = dir.path().to_owned();
    let _mount = TmpfsMount::mount(&spool, "2m", &cleanup);
    std::fs::write(spool.join("filler"), vec![1u8; 1700 << 10]).unwrap();
    let top = "shards = 1\nspool_segment_size = 65536";
    let rest = node_config(&["node1.test"]);
    let relay = Relay::start_in(dir, top, "", &rest);
    // Messages bigger than a segment, several finishing at once: they share a group commit, so
    // a record whose write fails can be in a segment that another record's rotation sealed.
    let mut accepted = 0;
    let mut refused = 0;
    for round in 0..8 {
        let replies: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|t| {
                    let relay = &relay;
                    s.spawn(move || send_one(relay, &["x@node1.test"], &format!("r{round}t{t}"), 900))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &replies {
            if r.starts_with("250 2.0.0") {
                accepted += 1;
            } else {
                assert!(r.starts_with("452 4.3.1 "), "{r}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the disk never filled up");
    assert_eq!(relay.queued_for("node1.test"), accepted);
    // Every segment but the active one holds mail that is still to be delivered.
    let recs = spooled_records(&relay.spool_dir());
    let segs = relay.segment_files();
    let empty: Vec<&PathBuf> = segs.iter().filter(|p| !recs.iter().any(|r| &r.path == *p)).collect();
    assert!(
        empty.len() <= 1,
        "segments with nothing to deliver kept: {empty:?} of {segs:?}"
    );
}

/// The logical 4 KiB blocks of `path` that `filefrag -v` (FIEMAP, e2fsprogs) reports as written,
/// i.e. neither a hole nor an `unwritten` (fallocated, never written) extent.
fn written_blocks(path: &Path) -> BTreeSet<u64> {
    let out = Command::new("filefrag")
        .arg("-v")
        .arg("-b4096")
        .arg(path)
        .output()
        .expect("filefrag (e2fsprogs) is needed: apt-get install e2fsprogs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("logical_offset"),
        "filefrag -v failed (the spool must be on a file system with FIEMAP, such as ext4): {text}"
    );
    let mut written = BTreeSet::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once(':') else {
            continue;
        };
        let Some((logical, _)) = rest.split_once(':') else {
            continue;
        };
        let Some((a, b)) = logical.split_once("..") else {
            continue;
        };
        let (Ok(a), Ok(b)) = (a.trim().parse::<u64>(), b.trim().parse::<u64>()) else {
            continue;
        };
        if !line.contains("unwritten") {
            written.extend(a..=b);
        }
    }
    written
}

#[test]
fn zero_fill_ahead_writes_blocks_before_appends_and_never_touches_a_record() {
    // 1 MiB segments: the writer keeps 128 KiB of room, then zero-fills 256 KiB chunks up to
    // 512 KiB ahead of the append position (spool::writer::ZeroFill).
    let top = "shards = 1\nspool_segment_size = 1048576";
    let rest = node_config(&["node1.test"]);
    let relay = Relay::start(top, "", &rest);
    // 8 connections at once (batches of several records, each followed by a fill) x 40
    // messages of about 4.5 KB: about 1.4 MB, so the spool rotates to a second segment.
    let ids = send_concurrently(&relay, 8, 40, 50, |t, i| format!("z{t}-{i}"));
    let segs = relay.segment_files();
    assert!(segs.len() >= 2, "expected a rotation: {segs:?}");
    // In the segment being appended to, blocks past the last record are already written (with
    // zeros): without the fill every block after the append position is still `unwritten`.
    let recs = spooled_records(&relay.spool_dir());
    let active = segs.iter().max().unwrap().clone();
    let end = recs
        .iter()
        .filter(|r| r.path == active)
        .map(|r| r.offset + r.total_len)
        .max()
        .expect("records in the active segment") as u64;
    let first_after = end.div_ceil(4096) + 1;
    wait_for(
        "zero-filled blocks ahead of the append position",
        Duration::from_secs(10),
        || written_blocks(&active).range(first_after..).count() >= 64,
    );
    // SIGKILL and restart: every acknowledged message is stored intact (the records' checksums
    // are verified by the scan), so no zeros landed on a record.
    let relay = Relay::start_in(relay.into_dir(), top, "", &rest);
    assert_eq!(relay.queued_for("node1.test"), ids.len());
    let recs = spooled_records(&relay.spool_dir());
    for (tag, qid) in &ids {
        let data = String::from_utf8_lossy(&record_of(&recs, qid).data).into_owned();
        assert!(data.contains(&format!("X-Test-Id: {tag}\r\n")), "{qid}");
        assert!(data.contains(&format!("{tag} line 0049 ")), "{qid} truncated");
    }
}
