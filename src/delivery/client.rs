//! The outbound SMTP connection: connect, greeting, EHLO/HELO, mail transactions (pipelined
//! per RFC 2920 when offered), dot-stuffed body streaming, RSET and QUIT.
//!
//! Owns: [`SmtpClient`] and its configuration, message, outcome and error types. Must not
//! touch DNS, the spool, the queue or the server-side `smtp` module; it never resolves host
//! names and never retries (the caller decides what a deferral means).
//!
//! Every read and write runs under the RFC 5321 section 4.5.3.2 timeout of its phase. Nothing
//! received from the network can panic: malformed replies become [`ClientError::Protocol`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use glommio::net::TcpStream;

use crate::tls::MaybeTls;
use glommio::timer::Timer;
use memchr::memchr;

use super::reply::{Reply, ReplyBuilder, MAX_REPLY_LINE};
use super::stuffing::DotStuffer;

/// Size of the reply read buffer (must exceed [`MAX_REPLY_LINE`] plus a line ending).
const READ_BUF: usize = 8 * 1024;
/// Target size of one body write.
const BODY_CHUNK: usize = 64 * 1024;
/// Upper bound on the QUIT exchange, whatever the configured timeouts.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest timeout actually armed (a saturated `Duration::MAX` would overflow `Instant`).
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest address accepted in MAIL FROM / RCPT TO (RFC 5321 4.5.3.1.3 says 256 for a path).
const MAX_ADDRESS: usize = 1000;

/// The rustls client configuration for STARTTLS towards nodes (compared by identity).
#[derive(Clone)]
pub struct TlsClient(pub std::sync::Arc<rustls::ClientConfig>);

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

/// Timeouts and identity of the outbound client.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// The name sent in EHLO/HELO (our own host name).
    pub helo_name: String,
    /// STARTTLS when the server offers it (None: never).
    pub tls: Option<TlsClient>,
    /// Refuse to send anything without TLS: a server that does not offer STARTTLS, or whose
    /// handshake fails, gives [`ClientError::TlsRequired`].
    pub require_tls: bool,
    /// Limit on establishing the TCP connection.
    pub connect_timeout: Duration,
    /// Wait for the 220 greeting (RFC 5321: 5 minutes). Also used for EHLO/HELO.
    pub greeting_timeout: Duration,
    /// Wait for the reply to MAIL FROM (RFC 5321: 5 minutes). Also used for RSET.
    pub mail_timeout: Duration,
    /// Wait for the reply to each RCPT TO (RFC 5321: 5 minutes).
    pub rcpt_timeout: Duration,
    /// Wait for the 354 reply to DATA (RFC 5321: 2 minutes).
    pub data_init_timeout: Duration,
    /// Limit on each write of body data (RFC 5321: 3 minutes).
    pub data_block_timeout: Duration,
    /// Wait for the final reply after the terminating dot (RFC 5321: 10 minutes).
    pub data_end_timeout: Duration,
}

impl ClientConfig {
    /// The RFC 5321 section 4.5.3.2 defaults, with a 30 second connect timeout.
    pub fn rfc5321(helo_name: String) -> Self {
        const MIN: u64 = 60;
        ClientConfig {
            helo_name,
            tls: None,
            require_tls: false,
            connect_timeout: Duration::from_secs(30),
            greeting_timeout: Duration::from_secs(5 * MIN),
            mail_timeout: Duration::from_secs(5 * MIN),
            rcpt_timeout: Duration::from_secs(5 * MIN),
            data_init_timeout: Duration::from_secs(2 * MIN),
            data_block_timeout: Duration::from_secs(3 * MIN),
            data_end_timeout: Duration::from_secs(10 * MIN),
        }
    }

    /// Multiplies every timeout by `factor` (tests use small factors). A negative, NaN or
    /// infinite factor leaves the configuration unchanged; overflow saturates.
    pub fn scaled(self, factor: f64) -> Self {
        if !factor.is_finite() || factor < 0.0 {
            return self;
        }
        let s = |d: Duration| Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX);
        ClientConfig {
            connect_timeout: s(self.connect_timeout),
            greeting_timeout: s(self.greeting_timeout),
            mail_timeout: s(self.mail_timeout),
            rcpt_timeout: s(self.rcpt_timeout),
            data_init_timeout: s(self.data_init_timeout),
            data_block_timeout: s(self.data_block_timeout),
            data_end_timeout: s(self.data_end_timeout),
            helo_name: self.helo_name,
            tls: self.tls,
            require_tls: self.require_tls,
        }
    }
}

/// One message to hand over.
#[derive(Debug, Clone, Copy)]
pub struct OutboundMessage<'a> {
    /// Envelope sender without angle brackets; `""` for the null sender.
    pub sender: &'a str,
    /// Envelope recipients without angle brackets.
    pub recipients: &'a [&'a str],
    /// The UNSTUFFED message, CRLF line endings, without the terminating dot.
    pub body: &'a [u8],
    /// True when the body has 8-bit content (needs BODY=8BITMIME).
    pub eight_bit: bool,
    /// Message size announced with `SIZE=` and checked against the server's limit.
    pub size: usize,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq)]
pub enum RcptOutcome {
    /// The server accepted responsibility (2xx final reply).
    Delivered(Reply),
    /// Temporary failure (4xx); try again later.
    Deferred(Reply),
    /// Permanent failure (5xx); bounce.
    Failed(Reply),
}

/// Errors that end (or prevent) a session; per-recipient results are [`RcptOutcome`]s.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be established (refused, unreachable, ...).
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// A phase's timeout expired; the payload names the phase (e.g. `"greeting"`).
    #[error("timed out in phase {0}")]
    Timeout(&'static str),
    /// Reading or writing failed, or the server closed the connection.
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// The server said something that is not valid SMTP at this point.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The greeting or EHLO/HELO got a 4xx/5xx reply.
    #[error("rejected by server: {0}")]
    Rejected(Reply),
    /// The node must be reached over TLS and this server cannot provide it. The message
    /// says so ("TLS required: ..."), so the log line of a skipped server explains itself.
    #[error("TLS required: {0}")]
    TlsRequired(String),
}

impl ClientError {
    /// True when no SMTP session was established at all (connection refused, unreachable or
    /// connect timeout): the caller should try the next MX host.
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, ClientError::Connect(_) | ClientError::Timeout("connect"))
    }
}

/// Extensions the server announced in its EHLO reply.
#[derive(Debug, Default, Clone, Copy)]
struct Extensions {
    starttls: bool,
    pipelining: bool,
    eight_bit_mime: bool,
    size_offered: bool,
    max_size: Option<usize>,
}

impl Extensions {
    /// Parses the keyword lines of an EHLO reply (the first line is the server's name).
    fn parse(text: &str) -> Self {
        let mut ext = Extensions::default();
        for line in text.split('\n').skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            if keyword.eq_ignore_ascii_case("STARTTLS") {
                ext.starttls = true;
            } else if keyword.eq_ignore_ascii_case("PIPELINING") {
                ext.pipelining = true;
            } else if keyword.eq_ignore_ascii_case("8BITMIME") {
                ext.eight_bit_mime = true;
            } else if keyword.eq_ignore_ascii_case("SIZE") {
                ext.size_offered = true;
                ext.max_size = words.next().and_then(|n| n.parse::<usize>().ok()).filter(|&n| n > 0);
            }
        }
        ext
    }
}

/// An established SMTP session with one server, reusable for several messages.
pub struct SmtpClient {
    stream: MaybeTls<TcpStream>,
    cfg: ClientConfig,
    ext: Extensions,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// Set while a transaction is in flight and left set when it ended in an unknown state.
    broken: bool,
    /// The server sent 421 (closing); the session cannot be reused.
    closing: bool,
}

/// Runs `fut` under `dur`, turning expiry into [`ClientError::Timeout`].
async fn timed<T>(
    dur: Duration,
    phase: &'static str,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    fut.or(async {
        Timer::new(dur.min(MAX_TIMEOUT)).await;
        Err(ClientError::Timeout(phase))
    })
    .await
}

/// Maps a reply to an outcome: 2xx Delivered, 4xx Deferred, 5xx Failed, else a protocol error.
fn classify(reply: Reply, phase: &str) -> Result<RcptOutcome, ClientError> {
    match reply.code / 100 {
        2 => Ok(RcptOutcome::Delivered(reply)),
        4 => Ok(RcptOutcome::Deferred(reply)),
        5 => Ok(RcptOutcome::Failed(reply)),
        _ => Err(ClientError::Protocol(format!(
            "unexpected reply {} to {phase}",
            reply.code
        ))),
    }
}

/// Like [`classify`] for failures only: a 2xx is a protocol error here.
fn classify_failure(reply: Reply, phase: &str) -> Result<RcptOutcome, ClientError> {
    match reply.code / 100 {
        4 | 5 => classify(reply, phase),
        _ => Err(ClientError::Protocol(format!(
            "unexpected reply {} to {phase}",
            reply.code
        ))),
    }
}

/// Strips one pair of angle brackets, then checks the address can go on a command line.
fn clean_address(addr: &str) -> Option<&str> {
    let addr = addr.strip_prefix('<').and_then(|a| a.strip_suffix('>')).unwrap_or(addr);
    let ok = addr.len() <= MAX_ADDRESS && !addr.bytes().any(|b| b.is_ascii_control() || b == b'<' || b == b'>');
    ok.then_some(addr)
}

fn helo_name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Gives `reply` (a 421: the server is closing) as a deferral to every recipient still
/// without an outcome.
fn defer_rest(reply: &Reply, to_send: &[(usize, &str)], outcomes: &mut [Option<RcptOutcome>]) {
    settle_rest(&RcptOutcome::Deferred(reply.clone()), to_send, outcomes);
}

/// Gives `outcome` to every recipient of `to_send` still without one.
fn settle_rest(outcome: &RcptOutcome, to_send: &[(usize, &str)], outcomes: &mut [Option<RcptOutcome>]) {
    for &(i, _) in to_send {
        if outcomes[i].is_none() {
            outcomes[i] = Some(outcome.clone());
        }
    }
}

/// The same outcome for every recipient.
fn all(n: usize, outcome: RcptOutcome) -> Vec<RcptOutcome> {
    vec![outcome; n]
}

impl SmtpClient {
    /// Connects to `addr` (never a host name), reads the greeting, sends EHLO (falling back
    /// to HELO when EHLO gets a 5xx) and records the announced extensions.
    pub async fn connect(addr: SocketAddr, cfg: &ClientConfig) -> Result<SmtpClient, ClientError> {
        if !helo_name_ok(&cfg.helo_name) {
            return Err(ClientError::Protocol(format!("invalid HELO name {:?}", cfg.helo_name)));
        }
        let connect = async {
            TcpStream::connect(addr)
                .await
                .map_err(|e| ClientError::Connect(io::Error::from(e)))
        };
        let stream = timed(cfg.connect_timeout, "connect", connect).await?;
        // Latency matters more than segment count for command/reply exchanges; failure to
        // set the option is harmless.
        let _ = stream.set_nodelay(true);
        let mut client = SmtpClient {
            stream: MaybeTls::Plain(stream),
            cfg: cfg.clone(),
            ext: Extensions::default(),
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            broken: false,
            closing: false,
        };

        let greeting = client.read_reply(client.cfg.greeting_timeout, "greeting").await?;
        match greeting.code {
            220 => {}
            400..=599 => {
                client.quit_quietly().await;
                return Err(ClientError::Rejected(greeting));
            }
            c => return Err(ClientError::Protocol(format!("unexpected greeting {c}"))),
        }

        let t = client.cfg.greeting_timeout;
        let ehlo = format!("EHLO {}\r\n", client.cfg.helo_name);
        let reply = client.command(ehlo.as_bytes(), t, "ehlo").await?;
        match reply.code / 100 {
            2 => client.ext = Extensions::parse(&reply.text),
            5 => {
                let helo = format!("HELO {}\r\n", client.cfg.helo_name);
                let reply = client.command(helo.as_bytes(), t, "helo").await?;
                match reply.code / 100 {
                    2 => {}
                    4 | 5 => {
                        client.quit_quietly().await;
                        return Err(ClientError::Rejected(reply));
                    }
                    _ => {
                        return Err(ClientError::Protocol(format!(
                            "unexpected reply {} to HELO",
                            reply.code
                        )))
                    }
                }
            }
            4 => {
                client.quit_quietly().await;
                return Err(ClientError::Rejected(reply));
            }
            _ => {
                return Err(ClientError::Protocol(format!(
                    "unexpected reply {} to EHLO",
                    reply.code
                )))
            }
        }
        client.maybe_starttls(addr).await?;
        tracing::debug!(%addr, ext = ?client.ext, tls = client.stream.is_tls(), "smtp session established");
        Ok(client)
    }

    /// Opportunistic STARTTLS (RFC 3207) after EHLO; with `require_tls`, mandatory.
    async fn maybe_starttls(&mut self, addr: SocketAddr) -> Result<(), ClientError> {
        let Some(tls) = self.cfg.tls.clone() else {
            return if self.cfg.require_tls {
                Err(ClientError::TlsRequired("no TLS client configuration".into()))
            } else {
                Ok(())
            };
        };
        if !self.ext.starttls {
            if self.cfg.require_tls {
                self.quit_quietly().await;
                return Err(ClientError::TlsRequired(format!("{addr} does not offer STARTTLS")));
            }
            return Ok(());
        }
        let t = self.cfg.greeting_timeout;
        let reply = self.command(b"STARTTLS\r\n", t, "starttls").await?;
        if reply.code != 220 {
            if self.cfg.require_tls {
                self.quit_quietly().await;
                return Err(ClientError::TlsRequired(format!("{addr} refused STARTTLS: {reply}")));
            }
            return Ok(());
        }
        // Anything the server sent before the handshake is not part of the TLS session.
        self.rstart = 0;
        self.rend = 0;
        let name = addr.ip().to_string();
        let stream = &mut self.stream;
        let handshake = async move { stream.connect(tls.0, &name).await.map_err(ClientError::Io) };
        if let Err(e) = timed(t, "tls handshake", handshake).await {
            self.broken = true;
            return Err(match e {
                _ if self.cfg.require_tls => ClientError::TlsRequired(format!("TLS handshake with {addr} failed: {e}")),
                // Say in the log line that it was the handshake (rustls errors do not).
                ClientError::Io(io) => ClientError::Io(io::Error::new(
                    io.kind(),
                    format!("TLS handshake with {addr} failed: {io}"),
                )),
                e => e,
            });
        }
        // RFC 3207 4.2: forget what the server said before; ask again.
        let ehlo = format!("EHLO {}\r\n", self.cfg.helo_name);
        let reply = self.command(ehlo.as_bytes(), t, "ehlo").await?;
        if reply.code / 100 != 2 {
            self.quit_quietly().await;
            return Err(ClientError::Rejected(reply));
        }
        self.ext = Extensions::parse(&reply.text);
        Ok(())
    }

    /// True when the session is encrypted.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// True when the server announced PIPELINING (RFC 2920).
    pub fn supports_pipelining(&self) -> bool {
        self.ext.pipelining
    }

    /// True when the server announced 8BITMIME (RFC 6152).
    pub fn supports_8bitmime(&self) -> bool {
        self.ext.eight_bit_mime
    }

    /// The server's declared maximum message size (RFC 1870), if it declared a non-zero one.
    pub fn max_size(&self) -> Option<usize> {
        self.ext.max_size
    }

    /// Sends one message and returns one outcome per recipient, in order.
    ///
    /// Message-level failures (MAIL rejected, DATA rejected, the final reply after the data)
    /// apply to every recipient that was accepted. A message larger than the server's SIZE
    /// fails with a synthetic `552 5.3.4`, and 8-bit content to a server without 8BITMIME
    /// with a synthetic `554 5.6.3`, without sending anything. An address that cannot be put
    /// on a command line (control characters, angle brackets, too long) fails with a
    /// synthetic `501`.
    ///
    /// An `Err` means the session is in an unknown state: drop the client and defer every
    /// recipient. After an `Ok`, the client is reusable unless the server announced it is
    /// closing (421) or the cleanup RSET failed; the next `send` then returns an error.
    pub async fn send(&mut self, msg: &OutboundMessage<'_>) -> Result<Vec<RcptOutcome>, ClientError> {
        if self.broken || self.closing {
            return Err(ClientError::Protocol(
                "session is no longer usable after an earlier error".into(),
            ));
        }
        let n = msg.recipients.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(max) = self.ext.max_size {
            if msg.size > max {
                return Ok(all(
                    n,
                    RcptOutcome::Failed(Reply::new(
                        552,
                        format!(
                            "5.3.4 Message size {} exceeds the receiving server's limit of {max}",
                            msg.size
                        ),
                    )),
                ));
            }
        }
        if msg.eight_bit && !self.ext.eight_bit_mime {
            return Ok(all(
                n,
                RcptOutcome::Failed(Reply::new(
                    554,
                    "5.6.3 8-bit content not supported by the receiving server",
                )),
            ));
        }
        let Some(sender) = clean_address(msg.sender) else {
            return Ok(all(
                n,
                RcptOutcome::Failed(Reply::new(501, "5.1.7 Invalid sender address")),
            ));
        };
        // None: to be sent; Some: already decided.
        let mut outcomes: Vec<Option<RcptOutcome>> = Vec::with_capacity(n);
        let mut to_send: Vec<(usize, &str)> = Vec::with_capacity(n);
        for (i, r) in msg.recipients.iter().enumerate() {
            match clean_address(r).filter(|a| !a.is_empty()) {
                Some(a) => {
                    outcomes.push(None);
                    to_send.push((i, a));
                }
                None => outcomes.push(Some(RcptOutcome::Failed(Reply::new(
                    501,
                    "5.1.3 Invalid recipient address",
                )))),
            }
        }
        if to_send.is_empty() {
            return Ok(outcomes.into_iter().flatten().collect());
        }

        let mut mail = format!("MAIL FROM:<{sender}>");
        if self.ext.size_offered {
            mail.push_str(&format!(" SIZE={}", msg.size));
        }
        if msg.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        mail.push_str("\r\n");

        self.broken = true;
        let needs_rset = if self.ext.pipelining {
            self.transact_pipelined(&mail, &to_send, msg.body, &mut outcomes)
                .await?
        } else {
            self.transact_stepwise(&mail, &to_send, msg.body, &mut outcomes).await?
        };
        let clean = if needs_rset && !self.closing {
            let t = self.cfg.mail_timeout;
            match self.command(b"RSET\r\n", t, "rset").await {
                Ok(r) if r.is_positive() => true,
                Ok(r) => {
                    tracing::debug!(reply = %r, "RSET refused; dropping session");
                    false
                }
                Err(e) => {
                    tracing::debug!(error = %e, "RSET failed; dropping session");
                    false
                }
            }
        } else {
            true
        };
        self.broken = !clean;

        let mut result = Vec::with_capacity(n);
        for o in outcomes {
            match o {
                Some(o) => result.push(o),
                None => return Err(ClientError::Protocol("internal: recipient left without outcome".into())),
            }
        }
        Ok(result)
    }

    /// RFC 2920: MAIL, every RCPT and DATA in one write, then the replies in order.
    /// Returns whether an RSET is needed to clear a half-open transaction.
    async fn transact_pipelined(
        &mut self,
        mail: &str,
        to_send: &[(usize, &str)],
        body: &[u8],
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Result<bool, ClientError> {
        let mut batch = String::with_capacity(mail.len() + to_send.len() * 64 + 6);
        batch.push_str(mail);
        for (_, rcpt) in to_send {
            batch.push_str("RCPT TO:<");
            batch.push_str(rcpt);
            batch.push_str(">\r\n");
        }
        batch.push_str("DATA\r\n");
        self.write(batch.as_bytes(), self.cfg.mail_timeout, "mail").await?;

        let mail_reply = self.read_reply(self.cfg.mail_timeout, "mail").await?;
        if self.closing {
            // 421: the server hangs up; no further replies will come.
            defer_rest(&mail_reply, to_send, outcomes);
            return Ok(false);
        }
        let mail_ok = mail_reply.is_positive();
        let mut accepted = 0usize;
        for &(i, _) in to_send {
            let reply = self.read_reply(self.cfg.rcpt_timeout, "rcpt").await?;
            if self.closing {
                defer_rest(&reply, to_send, outcomes);
                return Ok(false);
            }
            if !mail_ok {
                // The server answers 503 (no MAIL); the MAIL reply is the real reason.
                continue;
            }
            if reply.is_positive() {
                accepted += 1;
            } else {
                outcomes[i] = Some(classify_failure(reply, "RCPT")?);
            }
        }
        if !mail_ok {
            let o = classify_failure(mail_reply, "MAIL")?;
            for &(i, _) in to_send {
                outcomes[i] = Some(o.clone());
            }
        }
        let data_reply = self.read_reply(self.cfg.data_init_timeout, "data").await?;
        if data_reply.code == 354 {
            if accepted > 0 {
                self.send_body(body, to_send, outcomes).await?;
            } else {
                // Nobody to deliver to but the server wants data anyway: end it empty and
                // ignore the result.
                self.write(b".\r\n", self.cfg.data_block_timeout, "data block").await?;
                let _ = self.read_reply(self.cfg.data_end_timeout, "data end").await?;
            }
            return Ok(false);
        }
        if accepted > 0 {
            settle_rest(&classify_failure(data_reply, "DATA")?, to_send, outcomes);
        }
        Ok(mail_ok)
    }

    /// Without PIPELINING: one command, one reply. Returns whether an RSET is needed.
    async fn transact_stepwise(
        &mut self,
        mail: &str,
        to_send: &[(usize, &str)],
        body: &[u8],
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Result<bool, ClientError> {
        let mail_reply = self.command(mail.as_bytes(), self.cfg.mail_timeout, "mail").await?;
        if !mail_reply.is_positive() {
            let o = classify_failure(mail_reply, "MAIL")?;
            for &(i, _) in to_send {
                outcomes[i] = Some(o.clone());
            }
            return Ok(false);
        }
        let mut accepted = 0usize;
        for &(i, rcpt) in to_send {
            let cmd = format!("RCPT TO:<{rcpt}>\r\n");
            let reply = self.command(cmd.as_bytes(), self.cfg.rcpt_timeout, "rcpt").await?;
            if self.closing {
                defer_rest(&reply, to_send, outcomes);
                return Ok(false);
            }
            if reply.is_positive() {
                accepted += 1;
            } else {
                outcomes[i] = Some(classify_failure(reply, "RCPT")?);
            }
        }
        if accepted == 0 {
            return Ok(true);
        }
        let data_reply = self.command(b"DATA\r\n", self.cfg.data_init_timeout, "data").await?;
        if data_reply.code == 354 {
            self.send_body(body, to_send, outcomes).await?;
            return Ok(false);
        }
        settle_rest(&classify_failure(data_reply, "DATA")?, to_send, outcomes);
        Ok(true)
    }

    /// Streams the dot-stuffed body and terminator in large chunks, reads the final reply
    /// and applies it to every recipient still without an outcome.
    async fn send_body(
        &mut self,
        body: &[u8],
        to_send: &[(usize, &str)],
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Result<(), ClientError> {
        let mut stuffer = DotStuffer::new(body);
        let mut buf = Vec::with_capacity(BODY_CHUNK.min(body.len() + 8) + 8);
        loop {
            buf.clear();
            let done = stuffer.fill(&mut buf, BODY_CHUNK);
            self.write(&buf, self.cfg.data_block_timeout, "data block").await?;
            if done {
                break;
            }
        }
        let reply = self.read_reply(self.cfg.data_end_timeout, "data end").await?;
        settle_rest(&classify(reply, "end of data")?, to_send, outcomes);
        Ok(())
    }

    /// Ends the session politely: QUIT and its reply, errors ignored.
    pub async fn quit(mut self) {
        if self.broken || self.closing {
            return;
        }
        let t = self.cfg.mail_timeout.min(QUIT_TIMEOUT);
        if let Err(e) = self.command(b"QUIT\r\n", t, "quit").await {
            tracing::debug!(error = %e, "QUIT failed");
        }
        let _ = self.stream.close().await;
    }

    /// Sends QUIT without waiting for a reply (after a rejected greeting or EHLO).
    async fn quit_quietly(&mut self) {
        let t = self.cfg.mail_timeout.min(QUIT_TIMEOUT);
        let _ = self.write(b"QUIT\r\n", t, "quit").await;
    }

    /// Writes one command and reads its reply, both under `dur`.
    async fn command(&mut self, cmd: &[u8], dur: Duration, phase: &'static str) -> Result<Reply, ClientError> {
        self.write(cmd, dur, phase).await?;
        self.read_reply(dur, phase).await
    }

    /// Writes all of `data` under `dur`.
    async fn write(&mut self, data: &[u8], dur: Duration, phase: &'static str) -> Result<(), ClientError> {
        let stream = &mut self.stream;
        timed(dur, phase, async move {
            stream.write_all(data).await.map_err(ClientError::Io)?;
            stream.flush().await.map_err(ClientError::Io)
        })
        .await
    }

    /// Reads one complete (possibly multi-line) reply under `dur`.
    async fn read_reply(&mut self, dur: Duration, phase: &'static str) -> Result<Reply, ClientError> {
        let reply = timed(dur, phase, self.read_reply_untimed()).await?;
        if reply.code == 421 {
            self.closing = true;
        }
        Ok(reply)
    }

    async fn read_reply_untimed(&mut self) -> Result<Reply, ClientError> {
        let mut builder = ReplyBuilder::default();
        loop {
            let (start, end) = self.read_line().await?;
            if let Some(reply) = builder
                .push_line(&self.rbuf[start..end])
                .map_err(ClientError::Protocol)?
            {
                return Ok(reply);
            }
        }
    }

    /// Returns the byte range (in `rbuf`) of the next line, without its CRLF or LF.
    async fn read_line(&mut self) -> Result<(usize, usize), ClientError> {
        loop {
            let avail = &self.rbuf[self.rstart..self.rend];
            if let Some(i) = memchr(b'\n', avail) {
                let start = self.rstart;
                let mut end = start + i;
                self.rstart = end + 1;
                if end > start && self.rbuf[end - 1] == b'\r' {
                    end -= 1;
                }
                if end - start > MAX_REPLY_LINE {
                    return Err(ClientError::Protocol("reply line too long".into()));
                }
                return Ok((start, end));
            }
            if avail.len() > MAX_REPLY_LINE + 1 {
                return Err(ClientError::Protocol("reply line too long".into()));
            }
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let n = self
                .stream
                .read(&mut self.rbuf[self.rend..])
                .await
                .map_err(ClientError::Io)?;
            if n == 0 {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
            self.rend += n;
        }
    }
}

impl std::fmt::Debug for SmtpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpClient")
            .field("ext", &self.ext)
            .field("broken", &self.broken)
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn extensions_parse() {
        let e = Extensions::parse("mx.example\nPIPELINING\nsize 1000\n8bitmime\nSTARTTLS");
        assert!(e.pipelining && e.eight_bit_mime && e.size_offered);
        assert_eq!(e.max_size, Some(1000));
        let e = Extensions::parse("mx.example\nSIZE\nPIPELINING");
        assert!(e.size_offered);
        assert_eq!(e.max_size, None);
        let e = Extensions::parse("PIPELINING");
        assert!(!e.pipelining, "first line is the server name");
        let e = Extensions::parse("x\nSIZE 0\nSIZE_X");
        assert_eq!(e.max_size, None);
    }

    #[test]
    fn addresses() {
        assert_eq!(clean_address(""), Some(""));
        assert_eq!(clean_address("<a@b>"), Some("a@b"));
        assert_eq!(clean_address("a@b"), Some("a@b"));
        assert_eq!(clean_address("a@b\r\nRCPT TO:<x@y>"), None);
        assert_eq!(clean_address("a<@b"), None);
        assert_eq!(clean_address(&"a".repeat(2000)), None);
    }

    #[test]
    fn scaling() {
        let c = ClientConfig::rfc5321("h".into());
        assert_eq!(c.greeting_timeout, Duration::from_secs(300));
        assert_eq!(c.data_end_timeout, Duration::from_secs(600));
        let s = c.clone().scaled(0.01);
        assert_eq!(s.greeting_timeout, Duration::from_secs(3));
        assert_eq!(s.connect_timeout, Duration::from_millis(300));
        assert_eq!(c.clone().scaled(f64::NAN), c);
        assert_eq!(c.clone().scaled(-1.0), c);
        assert_eq!(c.clone().scaled(1e300).mail_timeout, Duration::MAX);
    }

    #[test]
    fn connect_failure_classification() {
        let refused = ClientError::Connect(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(refused.is_connect_failure());
        assert!(ClientError::Timeout("connect").is_connect_failure());
        assert!(!ClientError::Timeout("greeting").is_connect_failure());
        assert!(!ClientError::Rejected(Reply::new(554, "no")).is_connect_failure());
    }
}
