//! Test-only scripted SMTP server (std threads, blocking sockets on 127.0.0.1) that records
//! what the outbound client sends.
//!
//! Owns: nothing outside `delivery`'s tests. Must not be used by non-test code.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where the fake server stops answering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Stall {
    /// Answers everything.
    Never,
    /// Accepts but never sends the greeting.
    BeforeGreeting,
    /// Swallows the data but never sends the final reply.
    AfterData,
}

/// What the fake server says.
#[derive(Debug, Clone)]
pub(crate) struct Script {
    /// The greeting, without CRLF.
    pub greeting: String,
    /// EHLO keywords to announce; `None` answers EHLO with 502 (forcing HELO).
    pub extensions: Option<Vec<String>>,
    /// Replies to successive MAIL commands (without CRLF); "250 2.1.0 ok" once exhausted.
    pub mail_replies: VecDeque<String>,
    /// Replies after successive end-of-data dots; "250 2.0.0 queued" once exhausted.
    pub final_replies: VecDeque<String>,
    /// Answer DATA with 354 even when no recipient was accepted.
    pub data_always_354: bool,
    /// Where to stall.
    pub stall: Stall,
}

impl Script {
    /// A well-behaved server announcing `extensions`.
    pub(crate) fn with_extensions(extensions: &[&str]) -> Self {
        Script {
            greeting: "220 fake.test ESMTP".into(),
            extensions: Some(extensions.iter().map(|s| s.to_string()).collect()),
            mail_replies: VecDeque::new(),
            final_replies: VecDeque::new(),
            data_always_354: false,
            stall: Stall::Never,
        }
    }
}

/// What the fake server received.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    /// Every byte received, in order.
    pub transcript: Vec<u8>,
    /// Each `read()` result, in order (shows how the client batched its writes).
    pub reads: Vec<Vec<u8>>,
    /// Each command line received outside DATA (without CRLF).
    pub commands: Vec<String>,
    /// Each message's raw (still stuffed) data section, terminator excluded.
    pub raw_data: Vec<Vec<u8>>,
    /// Each message after unstuffing, as the server would store it.
    pub messages: Vec<Vec<u8>>,
}

/// The reply a fake server gives to RCPT TO, chosen by the recipient's local part:
/// `defer*` gets 450, `reject*` gets 550, anything else 250.
fn rcpt_reply(addr: &str) -> &'static str {
    if addr.starts_with("defer") {
        "450 4.2.1 mailbox busy, try later"
    } else if addr.starts_with("reject") {
        "550 5.1.1 no such user"
    } else {
        "250 2.1.5 ok"
    }
}

/// Starts a server for one connection; join the handle to get what it recorded.
pub(crate) fn start(script: Script) -> (SocketAddr, JoinHandle<Recorded>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let addr = listener.local_addr().expect("local addr");
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        serve(stream, script)
    });
    (addr, handle)
}

fn serve(mut s: TcpStream, mut script: Script) -> Recorded {
    let mut rec = Recorded::default();
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    if script.stall != Stall::BeforeGreeting {
        send(&mut s, &script.greeting);
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut in_data = false;
    let mut data: Vec<u8> = Vec::new();
    let mut mail_ok = false;
    let mut accepted = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return rec,
            Ok(n) => n,
        };
        rec.transcript.extend_from_slice(&buf[..n]);
        rec.reads.push(buf[..n].to_vec());
        if script.stall == Stall::BeforeGreeting {
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = pending.drain(..pos + 2).take(pos).collect();
            if in_data {
                if line == b"." {
                    in_data = false;
                    rec.messages.push(unstuff(&data));
                    rec.raw_data.push(std::mem::take(&mut data));
                    mail_ok = false;
                    accepted = 0;
                    if script.stall == Stall::AfterData {
                        continue;
                    }
                    let r = script
                        .final_replies
                        .pop_front()
                        .unwrap_or_else(|| "250 2.0.0 queued".into());
                    send(&mut s, &r);
                } else {
                    data.extend_from_slice(&line);
                    data.extend_from_slice(b"\r\n");
                }
                continue;
            }
            let cmd = String::from_utf8_lossy(&line).into_owned();
            rec.commands.push(cmd.clone());
            let verb = cmd.get(..4).unwrap_or("").to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" => match &script.extensions {
                    Some(ext) => {
                        let mut lines = vec!["fake.test greets you".to_string()];
                        lines.extend(ext.iter().cloned());
                        let last = lines.len() - 1;
                        let r: Vec<String> = lines
                            .iter()
                            .enumerate()
                            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
                            .collect();
                        send(&mut s, &r.join("\r\n"));
                    }
                    None => send(&mut s, "502 5.5.2 EHLO not implemented"),
                },
                "HELO" => send(&mut s, "250 fake.test"),
                "MAIL" => {
                    let r = script.mail_replies.pop_front().unwrap_or_else(|| "250 2.1.0 ok".into());
                    mail_ok = r.starts_with('2');
                    accepted = 0;
                    send(&mut s, &r);
                }
                "RCPT" => {
                    if !mail_ok {
                        send(&mut s, "503 5.5.1 need MAIL first");
                    } else {
                        let addr = cmd.split('<').nth(1).unwrap_or("");
                        let r = rcpt_reply(addr);
                        if r.starts_with('2') {
                            accepted += 1;
                        }
                        send(&mut s, r);
                    }
                }
                "DATA" => {
                    if (mail_ok && accepted > 0) || script.data_always_354 {
                        in_data = true;
                        send(&mut s, "354 go ahead");
                    } else {
                        send(&mut s, "554 5.5.1 no valid recipients");
                    }
                }
                "RSET" => {
                    mail_ok = false;
                    accepted = 0;
                    send(&mut s, "250 2.0.0 reset");
                }
                "QUIT" => {
                    send(&mut s, "221 2.0.0 bye");
                    return rec;
                }
                _ => send(&mut s, "500 5.5.1 unknown command"),
            }
        }
    }
}

fn send(s: &mut TcpStream, reply: &str) {
    let _ = s.write_all(format!("{reply}\r\n").as_bytes());
}

/// Server-side unstuffing of a data section (terminator already removed).
fn unstuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for line in data.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}
