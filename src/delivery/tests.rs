//! Tests of the outbound client against the scripted fake server in `fake_server`
//! (127.0.0.1 only). Owns nothing outside `delivery`'s tests.

use std::future::Future;

use glommio::LocalExecutorBuilder;

use super::fake_server::{self, Recorded, Script, Stall};
use super::*;

/// Runs `f` on a fresh glommio executor and returns its result.
pub(crate) fn run<T, Fut>(f: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .spawn(f)
        .expect("spawn executor")
        .join()
        .expect("executor thread")
}

/// Test timeouts: 1% of RFC 5321 (greeting 3 s, DATA 1.2 s, end of data 6 s).
fn cfg() -> ClientConfig {
    ClientConfig::rfc5321("client.test".into()).scaled(0.01)
}

const PIPE: &[&str] = &["PIPELINING", "8BITMIME", "SIZE 10000000", "ENHANCEDSTATUSCODES"];
const NO_PIPE: &[&str] = &["8BITMIME", "SIZE 10000000"];

fn ok(code: u16) -> impl Fn(&RcptOutcome) -> bool {
    move |o| matches!(o, RcptOutcome::Delivered(r) if r.code == code)
}

fn codes(outcomes: &[RcptOutcome]) -> Vec<(char, u16)> {
    outcomes
        .iter()
        .map(|o| match o {
            RcptOutcome::Delivered(r) => ('D', r.code),
            RcptOutcome::Deferred(r) => ('T', r.code),
            RcptOutcome::Failed(r) => ('F', r.code),
        })
        .collect()
}

/// Connects, sends one message per body, quits; returns the outcomes and what the server saw.
fn exchange(
    script: Script,
    rcpts: &'static [&'static str],
    bodies: Vec<Vec<u8>>,
    eight_bit: bool,
) -> (Result<Vec<Vec<RcptOutcome>>, String>, Recorded) {
    let (addr, server) = fake_server::start(script);
    let result = run(move || async move {
        let mut c = SmtpClient::connect(addr, &cfg()).await.map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        for body in &bodies {
            let msg = OutboundMessage {
                sender: "sender@origin.test",
                recipients: rcpts,
                body,
                eight_bit,
                size: body.len(),
            };
            all.push(c.send(&msg).await.map_err(|e| e.to_string())?);
        }
        c.quit().await;
        Ok(all)
    });
    (result, server.join().expect("fake server thread"))
}

fn count(rec: &Recorded, verb: &str) -> usize {
    rec.commands.iter().filter(|c| c.starts_with(verb)).count()
}

#[test]
fn dot_stuffing_round_trip_is_byte_exact() {
    let body = b"Subject: dots\r\n\r\n.\r\n..\r\n..x\r\nmid.dle\r\n.\r\nend\r\n".to_vec();
    for ext in [PIPE, NO_PIPE] {
        let (res, rec) = exchange(
            Script::with_extensions(ext),
            &["a@node.test"],
            vec![body.clone()],
            false,
        );
        let res = res.unwrap();
        assert!(ok(250)(&res[0][0]), "{res:?}");
        assert_eq!(
            rec.raw_data[0],
            b"Subject: dots\r\n\r\n..\r\n...\r\n...x\r\nmid.dle\r\n..\r\nend\r\n".to_vec()
        );
        assert_eq!(rec.messages[0], body);
    }
}

#[test]
fn body_without_final_crlf_and_large_body() {
    let mut big = Vec::new();
    for i in 0..40_000u32 {
        if i % 5 == 0 {
            big.extend_from_slice(b".leading dot\r\n");
        }
        big.extend_from_slice(format!("line {i} of a large message\r\n").as_bytes());
    }
    let (res, rec) = exchange(
        Script::with_extensions(PIPE),
        &["a@node.test"],
        vec![b"no newline at end".to_vec(), big.clone()],
        false,
    );
    assert_eq!(res.unwrap().len(), 2);
    assert_eq!(rec.messages[0], b"no newline at end\r\n".to_vec());
    assert_eq!(rec.messages[1], big);
}

#[test]
fn pipelined_batch_arrives_in_one_write() {
    let (res, rec) = exchange(
        Script::with_extensions(PIPE),
        &["a@node.test", "b@node.test", "c@node.test"],
        vec![b"hi\r\n".to_vec()],
        true,
    );
    assert!(res.unwrap()[0].iter().all(ok(250)));
    let batch = rec
        .reads
        .iter()
        .find(|r| r.starts_with(b"MAIL FROM"))
        .expect("a read starting with MAIL");
    assert_eq!(
        String::from_utf8_lossy(batch),
        "MAIL FROM:<sender@origin.test> SIZE=4 BODY=8BITMIME\r\n\
         RCPT TO:<a@node.test>\r\nRCPT TO:<b@node.test>\r\nRCPT TO:<c@node.test>\r\nDATA\r\n"
    );
}

#[test]
fn without_pipelining_commands_go_one_by_one() {
    let (res, rec) = exchange(
        Script::with_extensions(&["SIZE"]),
        &["a@node.test", "b@node.test"],
        vec![b"hi\r\n".to_vec()],
        false,
    );
    assert!(res.unwrap()[0].iter().all(ok(250)));
    for verb in ["MAIL", "RCPT", "DATA"] {
        for r in rec.reads.iter().filter(|r| r.starts_with(verb.as_bytes())) {
            assert_eq!(r.iter().filter(|&&b| b == b'\n').count(), 1, "{r:?}");
        }
    }
    assert!(rec
        .commands
        .contains(&"MAIL FROM:<sender@origin.test> SIZE=4".to_string()));
}

#[test]
fn per_recipient_outcomes_mix_250_450_550() {
    for ext in [PIPE, NO_PIPE] {
        let (res, rec) = exchange(
            Script::with_extensions(ext),
            &["ok1@n.test", "defer@n.test", "reject@n.test", "ok2@n.test"],
            vec![b"hi\r\n".to_vec()],
            false,
        );
        let res = res.unwrap();
        assert_eq!(codes(&res[0]), vec![('D', 250), ('T', 450), ('F', 550), ('D', 250)]);
        match &res[0][1] {
            RcptOutcome::Deferred(r) => assert_eq!(r.text, "4.2.1 mailbox busy, try later"),
            o => panic!("{o:?}"),
        }
        assert_eq!(rec.messages.len(), 1);
        assert_eq!(count(&rec, "RSET"), 0);
    }
}

#[test]
fn final_reply_applies_to_accepted_recipients_only() {
    let mut script = Script::with_extensions(PIPE);
    script.final_replies.push_back("554 5.7.1 content rejected".into());
    let (res, _) = exchange(
        script,
        &["ok@n.test", "defer@n.test", "ok2@n.test"],
        vec![b"hi\r\n".to_vec(), b"again\r\n".to_vec()],
        false,
    );
    let res = res.unwrap();
    assert_eq!(codes(&res[0]), vec![('F', 554), ('T', 450), ('F', 554)]);
    assert_eq!(codes(&res[1]), vec![('D', 250), ('T', 450), ('D', 250)]);
}

#[test]
fn mail_rejected_451_defers_all_then_session_is_reusable() {
    for ext in [PIPE, NO_PIPE] {
        let mut script = Script::with_extensions(ext);
        script.mail_replies.push_back("451 4.3.0 try again".into());
        let (res, rec) = exchange(
            script,
            &["a@n.test", "reject@n.test"],
            vec![b"first\r\n".to_vec(), b"second\r\n".to_vec()],
            false,
        );
        let res = res.unwrap();
        assert_eq!(codes(&res[0]), vec![('T', 451), ('T', 451)]);
        assert_eq!(codes(&res[1]), vec![('D', 250), ('F', 550)]);
        assert_eq!(rec.messages, vec![b"second\r\n".to_vec()]);
    }
}

#[test]
fn no_accepted_recipient_sends_no_body_and_resets() {
    for ext in [PIPE, NO_PIPE] {
        let (res, rec) = exchange(
            Script::with_extensions(ext),
            &["reject@n.test", "defer@n.test"],
            vec![b"secret\r\n".to_vec(), b"next\r\n".to_vec()],
            false,
        );
        let res = res.unwrap();
        assert_eq!(codes(&res[0]), vec![('F', 550), ('T', 450)]);
        assert!(!rec.transcript.windows(6).any(|w| w == b"secret"));
        assert!(count(&rec, "RSET") >= 1);
        assert!(rec.messages.is_empty());
    }
}

#[test]
fn pipelined_354_without_recipients_gets_lone_dot() {
    let mut script = Script::with_extensions(PIPE);
    script.data_always_354 = true;
    let (res, rec) = exchange(
        script,
        &["reject@n.test"],
        vec![b"secret\r\n".to_vec(), b"next\r\n".to_vec()],
        false,
    );
    let res = res.unwrap();
    assert_eq!(codes(&res[0]), vec![('F', 550)]);
    assert_eq!(rec.raw_data[0], b"".to_vec());
    assert!(!rec.transcript.windows(6).any(|w| w == b"secret"));
    assert!(rec.transcript.windows(9).any(|w| w == b"DATA\r\n.\r\n"));
    assert_eq!(codes(&res[1]), vec![('F', 550)]);
}

#[test]
fn size_exceeded_fails_without_sending() {
    let (addr, server) = fake_server::start(Script::with_extensions(&["PIPELINING", "SIZE 100"]));
    let res = run(move || async move {
        let mut c = SmtpClient::connect(addr, &cfg()).await.unwrap();
        assert_eq!(c.max_size(), Some(100));
        let body = vec![b'x'; 200];
        let msg = OutboundMessage {
            sender: "",
            recipients: &["a@n.test", "b@n.test"],
            body: &body,
            eight_bit: false,
            size: 200,
        };
        let o = c.send(&msg).await.unwrap();
        c.quit().await;
        o
    });
    let rec = server.join().unwrap();
    assert_eq!(codes(&res), vec![('F', 552), ('F', 552)]);
    match &res[0] {
        RcptOutcome::Failed(r) => assert!(r.text.starts_with("5.3.4 "), "{r:?}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(count(&rec, "MAIL"), 0);
}

#[test]
fn eight_bit_to_server_without_8bitmime_fails_without_sending() {
    let (res, rec) = exchange(
        Script::with_extensions(&["PIPELINING"]),
        &["a@n.test"],
        vec!["caf\u{e9}\r\n".as_bytes().to_vec()],
        true,
    );
    let res = res.unwrap();
    assert_eq!(
        res[0],
        vec![RcptOutcome::Failed(Reply::new(
            554,
            "5.6.3 8-bit content not supported by the receiving server"
        ))]
    );
    assert_eq!(count(&rec, "MAIL"), 0);
}

#[test]
fn null_sender_and_bad_addresses() {
    let (addr, server) = fake_server::start(Script::with_extensions(PIPE));
    let res = run(move || async move {
        let mut c = SmtpClient::connect(addr, &cfg()).await.unwrap();
        let msg = OutboundMessage {
            sender: "",
            recipients: &["a@n.test", "evil@n.test>\r\nRSET", ""],
            body: b"bounce\r\n",
            eight_bit: false,
            size: 8,
        };
        let o = c.send(&msg).await.unwrap();
        c.quit().await;
        o
    });
    let rec = server.join().unwrap();
    assert_eq!(codes(&res), vec![('D', 250), ('F', 501), ('F', 501)]);
    assert!(rec.commands.contains(&"MAIL FROM:<> SIZE=8".to_string()));
    assert_eq!(count(&rec, "RCPT"), 1);
    assert_eq!(count(&rec, "RSET"), 0);
}

#[test]
fn helo_fallback_when_ehlo_is_refused() {
    let mut script = Script::with_extensions(&[]);
    script.extensions = None;
    let (addr, server) = fake_server::start(script);
    let res = run(move || async move {
        let mut c = SmtpClient::connect(addr, &cfg()).await.unwrap();
        assert!(!c.supports_pipelining());
        assert!(!c.supports_8bitmime());
        assert_eq!(c.max_size(), None);
        let msg = OutboundMessage {
            sender: "s@o.test",
            recipients: &["a@n.test"],
            body: b"hi\r\n",
            eight_bit: false,
            size: 4,
        };
        let o = c.send(&msg).await.unwrap();
        c.quit().await;
        o
    });
    let rec = server.join().unwrap();
    assert!(ok(250)(&res[0]));
    assert_eq!(rec.commands[0], "EHLO client.test");
    assert_eq!(rec.commands[1], "HELO client.test");
    assert_eq!(rec.commands[2], "MAIL FROM:<s@o.test>");
}

#[test]
fn extensions_are_recorded() {
    let (addr, server) = fake_server::start(Script::with_extensions(PIPE));
    run(move || async move {
        let c = SmtpClient::connect(addr, &cfg()).await.unwrap();
        assert!(c.supports_pipelining());
        assert!(c.supports_8bitmime());
        assert_eq!(c.max_size(), Some(10_000_000));
        c.quit().await;
    });
    let rec = server.join().unwrap();
    assert_eq!(rec.commands, vec!["EHLO client.test", "QUIT"]);
}

#[test]
fn connection_refused_is_a_connect_failure() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = run(move || async move { SmtpClient::connect(addr, &cfg()).await.unwrap_err() });
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
    assert!(err.is_connect_failure());
}

#[test]
fn stalled_greeting_times_out() {
    let mut script = Script::with_extensions(PIPE);
    script.stall = Stall::BeforeGreeting;
    let (addr, server) = fake_server::start(script);
    let start = std::time::Instant::now();
    let err = run(move || async move {
        let cfg = ClientConfig {
            greeting_timeout: std::time::Duration::from_millis(300),
            ..cfg()
        };
        SmtpClient::connect(addr, &cfg).await.unwrap_err()
    });
    assert!(matches!(err, ClientError::Timeout("greeting")), "{err:?}");
    assert!(!err.is_connect_failure());
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    server.join().unwrap();
}

#[test]
fn stall_after_data_times_out_and_session_is_dead() {
    let mut script = Script::with_extensions(PIPE);
    script.stall = Stall::AfterData;
    let (addr, server) = fake_server::start(script);
    let (first, second) = run(move || async move {
        let cfg = ClientConfig {
            data_end_timeout: std::time::Duration::from_millis(300),
            ..cfg()
        };
        let mut c = SmtpClient::connect(addr, &cfg).await.unwrap();
        let msg = OutboundMessage {
            sender: "s@o.test",
            recipients: &["a@n.test"],
            body: b"hi\r\n",
            eight_bit: false,
            size: 4,
        };
        let first = c.send(&msg).await.unwrap_err();
        let second = c.send(&msg).await.unwrap_err();
        c.quit().await;
        (first, second)
    });
    assert!(matches!(first, ClientError::Timeout("data end")), "{first:?}");
    assert!(matches!(second, ClientError::Protocol(_)), "{second:?}");
    let rec = server.join().unwrap();
    assert_eq!(rec.messages.len(), 1);
    assert_eq!(count(&rec, "QUIT"), 0);
}

#[test]
fn two_messages_over_one_connection() {
    for ext in [PIPE, NO_PIPE] {
        let (res, rec) = exchange(
            Script::with_extensions(ext),
            &["a@n.test", "b@n.test"],
            vec![b"one\r\n".to_vec(), b"two\r\n".to_vec()],
            false,
        );
        let res = res.unwrap();
        assert!(res.iter().flatten().all(ok(250)));
        assert_eq!(rec.messages, vec![b"one\r\n".to_vec(), b"two\r\n".to_vec()]);
        assert_eq!(count(&rec, "MAIL"), 2);
        assert_eq!(count(&rec, "EHLO"), 1);
        assert_eq!(count(&rec, "RSET"), 0);
        assert_eq!(rec.commands.last().map(String::as_str), Some("QUIT"));
    }
}

#[test]
fn rejected_greeting_and_ehlo() {
    let mut script = Script::with_extensions(PIPE);
    script.greeting = "554-go away\r\n554 really".into();
    let (res, rec) = exchange(script, &["a@n.test"], vec![], false);
    let err = res.unwrap_err();
    assert!(err.contains("554"), "{err}");
    assert_eq!(rec.commands, vec!["QUIT"]);

    let (addr, server) = fake_server::start(Script {
        greeting: "421 4.3.2 busy".into(),
        ..Script::with_extensions(PIPE)
    });
    let err = run(move || async move { SmtpClient::connect(addr, &cfg()).await.unwrap_err() });
    match err {
        ClientError::Rejected(r) => assert_eq!(r, Reply::new(421, "4.3.2 busy")),
        e => panic!("{e:?}"),
    }
    server.join().unwrap();
}

#[test]
fn garbage_and_overlong_replies_are_protocol_errors() {
    for greeting in [
        "hello, I am not SMTP".to_string(),
        format!("220 {}", "x".repeat(5000)),
        "220-multi\r\n250 code changed".to_string(),
        "\0\0\0".to_string(),
    ] {
        let (addr, server) = fake_server::start(Script {
            greeting,
            ..Script::with_extensions(PIPE)
        });
        let err = run(move || async move { SmtpClient::connect(addr, &cfg()).await.unwrap_err() });
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
        drop(server.join());
    }
}

#[test]
fn server_closing_mid_reply_is_an_io_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"220-partial\r\n").unwrap();
    });
    let err = run(move || async move { SmtpClient::connect(addr, &cfg()).await.unwrap_err() });
    assert!(matches!(err, ClientError::Io(_)), "{err:?}");
    t.join().unwrap();
}

#[test]
fn reply_421_defers_everything_and_ends_the_session() {
    for ext in [PIPE, NO_PIPE] {
        let mut script = Script::with_extensions(ext);
        script.mail_replies.push_back("421 4.3.2 shutting down".into());
        let (addr, server) = fake_server::start(script);
        let (first, second) = run(move || async move {
            let mut c = SmtpClient::connect(addr, &cfg()).await.unwrap();
            let msg = OutboundMessage {
                sender: "s@o.test",
                recipients: &["a@n.test", "reject@n.test"],
                body: b"hi\r\n",
                eight_bit: false,
                size: 4,
            };
            let first = c.send(&msg).await.unwrap();
            let second = c.send(&msg).await.unwrap_err();
            c.quit().await;
            (first, second)
        });
        assert_eq!(codes(&first), vec![('T', 421), ('T', 421)]);
        assert!(matches!(second, ClientError::Protocol(_)), "{second:?}");
        let rec = server.join().unwrap();
        assert_eq!(count(&rec, "MAIL"), 1);
        assert_eq!(count(&rec, "RSET") + count(&rec, "QUIT"), 0);
    }
}

#[test]
fn saturated_timeouts_do_not_panic() {
    let (addr, server) = fake_server::start(Script::with_extensions(PIPE));
    let res = run(move || async move {
        let cfg = ClientConfig::rfc5321("client.test".into()).scaled(1e300);
        assert_eq!(cfg.data_end_timeout, std::time::Duration::MAX);
        let mut c = SmtpClient::connect(addr, &cfg).await.unwrap();
        let msg = OutboundMessage {
            sender: "s@o.test",
            recipients: &["a@n.test"],
            body: b"hi\r\n",
            eight_bit: false,
            size: 4,
        };
        let o = c.send(&msg).await.unwrap();
        c.quit().await;
        o
    });
    assert!(ok(250)(&res[0]));
    server.join().unwrap();
}
