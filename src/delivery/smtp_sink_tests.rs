//! Real-peer test: the outbound client against Postfix's `smtp-sink` on 127.0.0.1.
//!
//! Owns nothing outside `delivery`'s tests. Fails loudly when `smtp-sink` is missing (the
//! machine must have Postfix installed: `apt-get install postfix`). The sink is started on an
//! ephemeral port and killed when the test ends, even if it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tests::run;
use super::*;

/// Kills and reaps the sink when dropped.
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_smtp_sink() -> PathBuf {
    let candidates = std::iter::once(PathBuf::from("/usr/sbin/smtp-sink")).chain(
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("smtp-sink"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "smtp-sink not found (needed for the real-peer delivery test): \
         apt-get install postfix"
    );
}

/// Starts `smtp-sink -u nobody -c 127.0.0.1:PORT 64` (plus `-d` to dump each message into
/// `dump_dir`) and waits until it accepts connections.
fn start_sink(dump_dir: &Path) -> (Sink, std::net::SocketAddr) {
    let bin = find_smtp_sink();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("ephemeral port");
        l.local_addr().expect("local addr").port()
    };
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = Command::new(bin);
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        cmd.args(["-u", "nobody"]);
    }
    cmd.arg("-d")
        .arg(dump_dir.join("msg."))
        .arg("-c")
        .arg(format!("127.0.0.1:{port}"))
        .arg("64")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let sink = Sink(cmd.spawn().expect("spawn smtp-sink"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return (sink, addr);
        }
        assert!(Instant::now() < deadline, "smtp-sink did not start listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The message part of an `smtp-sink -d` dump: everything after its own `Received:` header
/// (which is followed by tab-indented continuation lines). Line endings are LF in the dump.
fn dumped_body(dump: &str) -> String {
    let mut lines = dump.split('\n');
    for l in lines.by_ref() {
        if l.starts_with("Received:") {
            break;
        }
    }
    let rest: Vec<&str> = lines.skip_while(|l| l.starts_with('\t')).collect();
    rest.join("\n")
}

#[test]
fn real_smtp_sink_peer() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod dump dir");
    }
    let (sink, addr) = start_sink(dir.path());

    let bodies: Vec<Vec<u8>> = vec![
        b"Subject: one\r\n\r\n.\r\n..\r\n..x\r\nplain\r\n".to_vec(),
        "Subject: two\r\n\r\ncaf\u{e9} .\r\n.caf\u{e9}\r\n".as_bytes().to_vec(),
    ];
    let sent = bodies.clone();
    let outcomes = run(move || async move {
        let cfg = ClientConfig::rfc5321("client.test".into()).scaled(0.02);
        let mut c = SmtpClient::connect(addr, &cfg).await.expect("connect to smtp-sink");
        assert!(c.supports_pipelining());
        assert!(c.supports_8bitmime());
        let mut all = Vec::new();
        for (i, body) in sent.iter().enumerate() {
            let msg = OutboundMessage {
                sender: if i == 0 { "" } else { "sender@origin.test" },
                recipients: &["a@node.test", "b@node.test", "c@node.test"],
                body,
                eight_bit: i == 1,
                size: body.len(),
            };
            all.push(c.send(&msg).await.expect("send to smtp-sink"));
        }
        c.quit().await;
        all
    });
    for per_msg in &outcomes {
        assert_eq!(per_msg.len(), 3);
        for o in per_msg {
            assert!(matches!(o, RcptOutcome::Delivered(r) if r.code == 250), "{o:?}");
        }
    }

    // Each transaction is dumped to its own file; wait briefly for both.
    let deadline = Instant::now() + Duration::from_secs(5);
    let dumps = loop {
        let mut dumps: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read dump dir")
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .collect();
        if dumps.len() >= 2 || Instant::now() > deadline {
            dumps.sort_by_key(|d| !d.contains("Subject: one"));
            break dumps;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(sink);
    assert_eq!(dumps.len(), 2, "{dumps:?}");
    // smtp-sink announces no SIZE, so no SIZE= parameter is sent.
    assert!(dumps[0].contains("X-Mail-Args: <>\n"), "{}", dumps[0]);
    assert!(
        dumps[1].contains("X-Mail-Args: <sender@origin.test> BODY=8BITMIME\n"),
        "{}",
        dumps[1]
    );
    for (dump, body) in dumps.iter().zip(&bodies) {
        let expected = String::from_utf8(body.clone())
            .expect("utf-8 body")
            .replace("\r\n", "\n");
        let got = dumped_body(dump);
        assert!(
            got.starts_with(&expected),
            "dumped body differs:\n{got:?}\nexpected:\n{expected:?}"
        );
        assert_eq!(got[expected.len()..].trim_matches('\n'), "", "{got:?}");
    }
}
