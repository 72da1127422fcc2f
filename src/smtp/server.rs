//! The socket edge of the SMTP server: the accept loop, one task per connection, the read
//! buffer, pipelining, limits and timeouts, and the hand-off of finished messages to the spool
//! and to the owning shards.
//!
//! Reading: one buffer per connection; commands are found with `memchr` and handed to the
//! session as slices of that buffer (no per-command allocation). Replies are appended to an
//! output buffer that is written only when no complete command is left in the input, so a
//! pipelined batch gets its replies in one write (RFC 2920).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::data::{count_received_headers, DataError, DataReceiver, Feed};
use super::reply::{common, Reply};
use super::session::{Action, Session};
use crate::queue::{NodeIdx, QueueEntry};
use crate::runtime::ShardCtx;
use crate::spool::{self, record::RecordBuilder, SpoolError};
use crate::tls::MaybeTls;

/// A message arriving with more `Received:` headers than this is a loop (RFC 5321 6.3).
pub const MAX_RECEIVED: usize = 50;

/// Accepts connections on one listener forever.
pub async fn accept_loop(ctx: Rc<ShardCtx>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let n = ctx.connections.fetch_add(1, Ordering::AcqRel) + 1;
                let ctx = ctx.clone();
                glommio::spawn_local(async move {
                    let _guard = ConnGuard::new(ctx.clone());
                    if n > ctx.cfg.smtp.max_connections {
                        let mut s = stream;
                        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                        let _ = s.write_all(&common::TOO_MANY_CONNECTIONS.to_bytes()).await;
                        let _ = s.close().await;
                        return;
                    }
                    let peer = stream
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    if let Err(e) = Connection::new(ctx, stream, peer).run().await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                })
                .detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(shard = ctx.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Idle/command timeouts without a timer per read: each connection keeps a deadline, and one
/// sweeper per shard shuts down the read side of connections past it, which ends their pending
/// read. (A linked io_uring timeout on every read cost about a tenth of the relay's CPU time.)
#[derive(Default)]
pub struct IdleRegistry {
    next: Cell<u64>,
    conns: RefCell<HashMap<u64, Rc<IdleWatch>>>,
}

/// One connection's deadline.
pub struct IdleWatch {
    deadline: Cell<Instant>,
    fd: RawFd,
    fired: Cell<u8>,
    /// Receiving DATA: a shutdown lets the message finish (the normal timeout still applies).
    in_data: Cell<bool>,
}

impl IdleWatch {
    fn extend(&self, timeout: Duration) {
        self.deadline.set(Instant::now() + timeout);
    }
    fn timed_out(&self) -> bool {
        self.fired.get() > 0
    }
}

impl IdleRegistry {
    fn register(&self, fd: RawFd, timeout: Duration) -> (u64, Rc<IdleWatch>) {
        let id = self.next.get();
        self.next.set(id + 1);
        let w = Rc::new(IdleWatch {
            deadline: Cell::new(Instant::now() + timeout),
            fd,
            fired: Cell::new(0),
            in_data: Cell::new(false),
        });
        self.conns.borrow_mut().insert(id, w.clone());
        (id, w)
    }

    fn unregister(&self, id: u64) {
        self.conns.borrow_mut().remove(&id);
    }

    /// Shuts down connections past their deadline: first the read side (the connection then
    /// answers 421 and closes), and both sides if it is still there a sweep later (a client
    /// that does not read its replies).
    pub fn sweep(&self, now: Instant) {
        for w in self.conns.borrow().values() {
            if now >= w.deadline.get() {
                let how = if w.fired.get() == 0 {
                    libc::SHUT_RD
                } else {
                    libc::SHUT_RDWR
                };
                w.fired.set(w.fired.get().saturating_add(1));
                // SAFETY: plain syscall on an fd that is open while registered (unregistered
                // before the stream is dropped); shutdown does not block.
                unsafe {
                    libc::shutdown(w.fd, how);
                }
            }
        }
    }

    /// Shutdown: every connection waiting for a command is woken now (it answers 421); those
    /// receiving DATA finish their message first.
    pub fn expire_all(&self) {
        let now = Instant::now();
        for w in self.conns.borrow().values() {
            if !w.in_data.get() {
                w.deadline.set(now);
            }
        }
        self.sweep(now);
    }

    /// Number of connections watched.
    pub fn len(&self) -> usize {
        self.conns.borrow().len()
    }

    /// True when no connection is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs the shard's idle sweeper forever.
pub async fn sweep_loop(ctx: Rc<ShardCtx>) {
    let every = (ctx.cfg.smtp.timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        glommio::timer::sleep(every).await;
        ctx.idle.sweep(Instant::now());
    }
}

struct ConnGuard(Rc<ShardCtx>);
impl ConnGuard {
    fn new(ctx: Rc<ShardCtx>) -> ConnGuard {
        ctx.local_connections.set(ctx.local_connections.get() + 1);
        ConnGuard(ctx)
    }
}
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.local_connections.set(self.0.local_connections.get() - 1);
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error (including timeouts).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The result of looking for the next command line in the buffer.
enum NextLine {
    /// `buf[start..end]` is a line (CRLF removed); `next` is where the following data starts.
    Line {
        start: usize,
        end: usize,
        next: usize,
        bare_lf: bool,
    },
    /// The line is longer than the limit; the buffer was cleared up to where scanning stopped.
    TooLong,
    /// No complete line yet.
    Incomplete,
}

/// One client connection.
pub struct Connection {
    ctx: Rc<ShardCtx>,
    stream: MaybeTls<TcpStream>,
    watch_id: u64,
    watch: Rc<IdleWatch>,
    session: Session,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    /// Discarding an overlong line until its LF.
    discarding: bool,
    /// The commit this session has announced to the spool writer (see `SpoolWriter::incoming`).
    announced: Option<spool::Incoming>,
}

/// Read buffer size of a new connection; it grows (up to [`MAX_BUFFER`]) only when a read
/// fills it, so the many short connections of a busy relay stay cheap.
const INITIAL_BUFFER: usize = 4096;
/// Largest read buffer (DATA streaming).
const MAX_BUFFER: usize = 256 * 1024;
/// Replies pending beyond this are written before more commands are parsed. A batch of
/// commands normally gets its replies in one write, but 256 KiB of empty lines or bare LFs
/// would otherwise pile up 5-20 MiB of 500 replies per connection behind a client that does
/// not read them.
const MAX_PENDING_REPLIES: usize = 64 * 1024;

impl Drop for Connection {
    fn drop(&mut self) {
        self.ctx.idle.unregister(self.watch_id);
    }
}

enum Flow {
    Continue,
    /// Flush what is pending, then close.
    Close,
    /// Close without writing (the stream is unusable).
    Abort,
}

impl Connection {
    fn new(ctx: Rc<ShardCtx>, stream: TcpStream, peer: SocketAddr) -> Connection {
        let mut session = Session::new(ctx.cfg.clone(), peer);
        session.starttls_offered = ctx.tls_server.is_some();
        let (watch_id, watch) = ctx.idle.register(stream.as_raw_fd(), ctx.cfg.smtp.timeout);
        // Replies are written whole; no small-write coalescing needed. Failure is harmless.
        let _ = stream.set_nodelay(true);
        Connection {
            ctx,
            stream: MaybeTls::Plain(stream),
            watch_id,
            watch,
            session,
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            out: Vec::with_capacity(4096),
            discarding: false,
            announced: None,
        }
    }

    /// The last reply of a connection whose read timed out: the shutdown's 421 when the relay
    /// is draining (a drain expires every idle timer, so the shutdown is the cause), otherwise
    /// the timeout's own 421.
    fn timeout_reply(&self) -> Reply {
        if self.ctx.draining.get() {
            common::SHUTDOWN
        } else {
            common::TIMEOUT
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.watch.extend(self.ctx.cfg.smtp.timeout);
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more input. Ok(false) on EOF; a `TimedOut` error when the idle sweeper fired.
    async fn fill(&mut self) -> std::io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // A line longer than the buffer (only possible with a raised line limit).
            let grown = (self.buf.len() * 2).min(MAX_BUFFER.max(self.ctx.cfg.smtp.max_command_line * 2));
            self.buf.resize(grown, 0);
        }
        // A command must arrive whole within the timeout: the deadline moves on each read only
        // while no partial command is buffered (or during DATA, which may be long). A client
        // trickling a command byte by byte cannot hold its connection past the timeout.
        if self.start == self.end || self.watch.in_data.get() {
            self.watch.extend(self.ctx.cfg.smtp.timeout);
        }
        let n = match self.stream.read(&mut self.buf[self.end..]).await {
            Ok(n) => n,
            // Inside TLS the sweeper's shutdown shows up as an error (EOF without a TLS
            // close_notify), not as 0: it is still a timeout (or a shutdown), answered with 421.
            Err(_) if self.watch.timed_out() => 0,
            Err(e) => return Err(e),
        };
        if n == 0 && self.watch.timed_out() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.end += n;
        if self.end == self.buf.len() && self.buf.len() < MAX_BUFFER {
            // Busy connection (a big DATA or a long pipeline): read in larger pieces.
            let grown = (self.buf.len() * 4).min(MAX_BUFFER);
            self.buf.resize(grown, 0);
        }
        Ok(n > 0)
    }

    fn next_line(&mut self) -> NextLine {
        let max = self.ctx.cfg.smtp.max_command_line;
        let avail = &self.buf[self.start..self.end];
        match memchr::memchr(b'\n', avail) {
            Some(p) => {
                let bare_lf = p == 0 || avail[p - 1] != b'\r';
                let line_end = if bare_lf { self.start + p } else { self.start + p - 1 };
                let next = self.start + p + 1;
                if self.discarding {
                    self.discarding = false;
                    self.start = next;
                    return NextLine::TooLong;
                }
                if p + 1 > max {
                    self.start = next;
                    return NextLine::TooLong;
                }
                NextLine::Line {
                    start: self.start,
                    end: line_end,
                    next,
                    bare_lf,
                }
            }
            None if avail.len() >= max || self.discarding => {
                // Keep reading until the LF, dropping what we have; answer once, at the end.
                self.discarding = true;
                self.start = self.end;
                NextLine::Incomplete
            }
            None => NextLine::Incomplete,
        }
    }

    async fn run(mut self) -> Result<(), ConnError> {
        self.session.greeting().encode_into(&mut self.out);
        self.flush().await?;
        loop {
            if self.out.len() >= MAX_PENDING_REPLIES {
                self.flush().await?;
            }
            match self.next_line() {
                NextLine::Line {
                    start,
                    end,
                    next,
                    bare_lf,
                } => {
                    self.start = next;
                    if bare_lf {
                        Reply::new(
                            500,
                            "5.5.2",
                            "Syntax error: bare <LF> received, lines must end with <CR><LF>",
                        )
                        .encode_into(&mut self.out);
                        continue;
                    }
                    if self.ctx.draining.get() {
                        common::SHUTDOWN.encode_into(&mut self.out);
                        self.flush().await?;
                        return Ok(());
                    }
                    let action = self.session.handle(&self.buf[start..end]);
                    let flow = self.perform(action).await?;
                    self.announce();
                    if let Flow::Abort = flow {
                        return Ok(());
                    }
                    if let Flow::Close = flow {
                        // Dropping the stream closes it; an explicit shutdown would cost a
                        // syscall that fails anyway when the client closed first after QUIT.
                        // (Checked before draining: the closing reply, a 221 or a timeout's
                        // 421, is the last one; no second 421 after it.)
                        self.flush().await?;
                        return Ok(());
                    }
                    if self.ctx.draining.get() {
                        common::SHUTDOWN.encode_into(&mut self.out);
                        self.flush().await?;
                        return Ok(());
                    }
                }
                NextLine::TooLong => common::LINE_TOO_LONG.encode_into(&mut self.out),
                NextLine::Incomplete => {
                    self.flush().await?;
                    match self.fill().await {
                        Ok(true) => {}
                        Ok(false) => return Ok(()),
                        Err(e) if is_timeout(&e) => {
                            self.out.clear();
                            self.timeout_reply().encode_into(&mut self.out);
                            let _ = self.flush().await;
                            return Ok(());
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }

    /// Keeps the session's announced commit ([`spool::Incoming`]) in step with its
    /// transaction: taken when MAIL opens one, given up when it ends without DATA (RSET,
    /// STARTTLS, a refused DATA). DATA hands it to the commit.
    fn announce(&mut self) {
        match (self.session.in_transaction(), self.announced.is_some()) {
            (true, false) => self.announced = Some(self.ctx.writer.incoming()),
            (false, true) => self.announced = None,
            _ => {}
        }
    }

    async fn perform(&mut self, action: Action) -> Result<Flow, ConnError> {
        match action {
            Action::Reply(r) => r.encode_into(&mut self.out),
            Action::Quit => {
                Reply::owned(221, "2.0.0", format!("{} closing connection", self.ctx.cfg.hostname))
                    .encode_into(&mut self.out);
                return Ok(Flow::Close);
            }
            Action::StartData => return self.receive_data().await,
            Action::Etrn(arg) => {
                let reply = crate::etrn::handle_command(&self.ctx, &self.session, &arg).await;
                reply.encode_into(&mut self.out);
            }
            Action::Auth(mech, initial) => {
                let reply = self.authenticate(&mech, initial.as_deref()).await?;
                reply.encode_into(&mut self.out);
            }
            Action::StartTls => return self.starttls().await,
        }
        Ok(Flow::Continue)
    }

    /// STARTTLS (RFC 3207): 220, then the handshake. Any plaintext the client pipelined after
    /// the command is discarded unread (the command-injection class of bug), and the session
    /// starts over as if the client had just connected (no EHLO, no AUTH, no transaction).
    async fn starttls(&mut self) -> Result<Flow, ConnError> {
        let Some(cfg) = self.ctx.tls_server.clone() else {
            Reply::new(502, "5.5.1", "STARTTLS not offered").encode_into(&mut self.out);
            return Ok(Flow::Continue);
        };
        if self.stream.is_tls() {
            Reply::new(503, "5.5.1", "TLS already active").encode_into(&mut self.out);
            return Ok(Flow::Continue);
        }
        if self.session.in_transaction() {
            Reply::new(503, "5.5.1", "STARTTLS not allowed inside a mail transaction").encode_into(&mut self.out);
            return Ok(Flow::Continue);
        }
        Reply::new(220, "2.0.0", "Ready to start TLS").encode_into(&mut self.out);
        self.flush().await?;
        if self.end > self.start {
            tracing::warn!(
                peer = %self.session.peer(),
                bytes = self.end - self.start,
                "discarding plaintext pipelined after STARTTLS"
            );
        }
        self.start = 0;
        self.end = 0;
        self.watch.extend(self.ctx.cfg.smtp.timeout);
        if let Err(e) = self.stream.accept(cfg).await {
            tracing::info!(peer = %self.session.peer(), error = %e, "TLS handshake failed");
            return Ok(Flow::Abort);
        }
        let mut fresh = Session::new(self.ctx.cfg.clone(), self.session.peer());
        fresh.tls = true;
        fresh.starttls_offered = false;
        self.session = fresh;
        Ok(Flow::Continue)
    }

    /// Reads one line for a multi-step exchange (AUTH). None on EOF or an overlong line.
    async fn read_exchange_line(&mut self) -> Result<Option<Vec<u8>>, ConnError> {
        loop {
            match self.next_line() {
                NextLine::Line { start, end, next, .. } => {
                    self.start = next;
                    return Ok(Some(self.buf[start..end].to_vec()));
                }
                NextLine::TooLong => return Ok(None),
                NextLine::Incomplete => {
                    self.flush().await?;
                    if !self.fill().await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn authenticate(&mut self, mech: &[u8], initial: Option<&[u8]>) -> Result<Reply, ConnError> {
        use crate::auth::{Mechanism, ServerExchange, Step};
        let peer_ip = self.session.peer().ip();
        if let Some(left) = self.ctx.etrn.auth_locked_out(peer_ip) {
            return Ok(Reply::owned(
                454,
                "4.7.0",
                format!(
                    "Too many authentication failures, try again in {} s",
                    left.as_secs() + 1
                ),
            ));
        }
        let Some(m) = Mechanism::parse(mech) else {
            return Ok(Reply::new(504, "5.5.4", "Unrecognized authentication mechanism"));
        };
        if m != Mechanism::CramMd5 && !self.session.plaintext_auth_allowed() {
            return Ok(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        let (mut ex, mut step) = ServerExchange::start(m, initial, &self.ctx.cfg.hostname);
        loop {
            match step {
                Step::Challenge(c) => {
                    self.out.extend_from_slice(b"334 ");
                    self.out.extend_from_slice(c.as_bytes());
                    self.out.extend_from_slice(b"\r\n");
                    let Some(line) = self.read_exchange_line().await? else {
                        return Ok(Reply::new(501, "5.5.2", "Authentication exchange line invalid"));
                    };
                    step = ex.step(&line);
                }
                Step::Failed(e) => {
                    let (code, enh, text) = e.reply_code();
                    return Ok(Reply::new(code, enh, text));
                }
                Step::Done(creds) => {
                    let ok = self.ctx.cfg.nodes.iter().any(|n| {
                        n.user.as_deref() == Some(creds.user())
                            && n.password.as_deref().is_some_and(|p| creds.verify(creds.user(), p))
                    });
                    if ok {
                        self.ctx.etrn.auth_success(peer_ip);
                        tracing::info!(peer = %self.session.peer(), user = creds.user(), mechanism = m.name(), "authenticated");
                        self.session.authenticated = Some(creds.user().to_owned());
                        self.session.auth_mechanism = Some(m);
                        return Ok(Reply::new(235, "2.7.0", "Authentication successful"));
                    }
                    let delay = self.ctx.etrn.auth_failure(peer_ip);
                    tracing::warn!(peer = %self.session.peer(), user = creds.user(), "authentication failed");
                    self.flush().await?;
                    glommio::timer::sleep(delay).await;
                    return Ok(Reply::new(535, "5.7.8", "Authentication credentials invalid"));
                }
            }
        }
    }

    async fn receive_data(&mut self) -> Result<Flow, ConnError> {
        let cfg = self.ctx.cfg.clone();
        let budget = cfg.smtp.max_inflight_bytes;
        if self.ctx.inflight_bytes.get() >= budget {
            self.session.take_transaction();
            common::STORAGE.encode_into(&mut self.out);
            return Ok(Flow::Continue);
        }
        // DATA ends the transaction whatever its outcome: take the envelope now.
        let txn = self
            .session
            .take_transaction()
            .expect("StartData only inside a transaction");
        let msg_id = self.ctx.next_msg_id();
        let qid = spool::queue_id(msg_id);
        let rcpt_refs: Vec<&[u8]> = txn.rcpts.iter().map(|(a, _)| a.as_slice()).collect();
        let hint = txn
            .params
            .size
            .map_or(16 * 1024, |s| s as usize)
            .min(cfg.smtp.max_message_size)
            + 1024;
        let mut rec = RecordBuilder::new(msg_id, spool::unix_now(), &txn.sender, &rcpt_refs, hint);
        self.write_received(rec.data_mut(), &qid, &txn.rcpts);
        let received_len = rec.data().len();
        Reply::new(354, "", "End data with <CR><LF>.<CR><LF>").encode_into(&mut self.out);
        // Taken at MAIL (see `announce`); the commit below gives it back.
        let incoming = self.announced.take().unwrap_or_else(|| self.ctx.writer.incoming());
        self.flush().await?;
        self.watch.in_data.set(true);

        let mut d = DataReceiver::new(cfg.smtp.max_message_size, cfg.smtp.max_text_line);
        let mut held = 0usize; // bytes of this message counted in the shard's in-flight total
        let mut over_budget = false;
        let mut scratch = Vec::new();
        let result = loop {
            let before = rec.data().len();
            let sink = if over_budget { &mut scratch } else { rec.data_mut() };
            let fed = d.feed(&self.buf[self.start..self.end], sink);
            scratch.clear();
            let grown = rec.data().len() - before;
            held += grown;
            self.ctx.inflight_bytes.set(self.ctx.inflight_bytes.get() + grown);
            if !over_budget && self.ctx.inflight_bytes.get() > budget {
                over_budget = true;
            }
            match fed {
                Feed::Done(n) => {
                    self.start += n;
                    break Ok(());
                }
                Feed::NeedMore => {
                    self.start = self.end;
                    match self.fill().await {
                        Ok(true) => {}
                        Ok(false) => break Err(None),
                        Err(e) => break Err(Some(e)),
                    }
                }
            }
        };
        self.watch.in_data.set(false);
        if self.start == self.end && self.buf.len() > INITIAL_BUFFER {
            // The buffer grew for a big DATA: give the memory back while the client idles.
            self.buf = vec![0; INITIAL_BUFFER];
            self.start = 0;
            self.end = 0;
        }
        let release = |ctx: &ShardCtx| ctx.inflight_bytes.set(ctx.inflight_bytes.get() - held);
        match result {
            Ok(()) => {}
            Err(None) => {
                release(&self.ctx);
                tracing::info!(queue_id = %qid, peer = %self.session.peer(), "client disconnected during DATA; message discarded");
                return Ok(Flow::Close);
            }
            Err(Some(e)) => {
                release(&self.ctx);
                if is_timeout(&e) {
                    tracing::info!(queue_id = %qid, peer = %self.session.peer(), "timeout during DATA; message discarded");
                    self.out.clear();
                    self.timeout_reply().encode_into(&mut self.out);
                    return Ok(Flow::Close);
                }
                return Err(e.into());
            }
        }
        let reply = if let Some(err) = d.error() {
            data_error_reply(err, &cfg)
        } else if over_budget {
            common::STORAGE
        } else if count_received_headers(&rec.data()[received_len..]) > MAX_RECEIVED {
            Reply::new(554, "5.4.6", "Too many Received headers: mail loop detected")
        } else {
            let eight_bit = d.saw_eight_bit() || txn.params.eight_bit;
            self.spool(rec.finish(eight_bit), msg_id, &qid, &txn, incoming).await
        };
        release(&self.ctx);
        if reply.is_error() {
            tracing::info!(queue_id = %qid, peer = %self.session.peer(), reply = %reply.text, code = reply.code, "message rejected");
        }
        reply.encode_into(&mut self.out);
        Ok(Flow::Continue)
    }

    fn write_received(&self, out: &mut Vec<u8>, qid: &str, rcpts: &[(Vec<u8>, NodeIdx)]) {
        use std::io::Write;
        let helo: String = self
            .session
            .helo_name()
            .unwrap_or("unknown")
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        let proto = match (self.session.is_esmtp(), self.session.tls) {
            (true, true) => "ESMTPS",
            (true, false) => "ESMTP",
            (false, true) => "SMTPS",
            (false, false) => "SMTP",
        };
        let _ = write!(
            out,
            "Received: from {helo} ([{ip}])\r\n\tby {host} (etrn-relay) with {proto} id {qid}",
            ip = self.session.peer().ip(),
            host = self.ctx.cfg.hostname,
        );
        if let [(rcpt, _)] = rcpts {
            out.extend_from_slice(b"\r\n\tfor <");
            out.extend(rcpt.iter().filter(|c| c.is_ascii_graphic()));
            out.push(b'>');
        }
        let _ = write!(out, "; {}\r\n", crate::dsn::rfc5322_date(SystemTime::now()));
    }

    /// Commits the record and hands its parts to the owning shards. Returns the reply.
    async fn spool(
        &mut self,
        record: Vec<u8>,
        msg_id: u64,
        qid: &str,
        txn: &super::session::Transaction,
        incoming: spool::Incoming,
    ) -> Reply {
        let t0 = Instant::now();
        let mut parts: Vec<(NodeIdx, Vec<u16>)> = Vec::new();
        for (i, (_, node)) in txn.rcpts.iter().enumerate() {
            match parts.iter_mut().find(|(n, _)| n == node) {
                Some((_, v)) => v.push(i as u16),
                None => parts.push((*node, vec![i as u16])),
            }
        }
        // Reserve inbox slots on the owning shards first: a full inbox is a 4xx now, before
        // anything is written, never a lost or blocked hand-off later.
        let owners: Vec<usize> = parts.iter().map(|(n, _)| self.ctx.owner_of(*n)).collect();
        let mut reserved: Vec<usize> = Vec::new();
        for &o in &owners {
            if o == self.ctx.id {
                continue;
            }
            if self.ctx.inboxes[o].reserve(1) {
                reserved.push(o);
            } else {
                for r in reserved {
                    self.ctx.inboxes[r].release(1);
                }
                return Reply::new(451, "4.3.0", "Queue busy, try again later");
            }
        }
        let len = record.len() as u32;
        let arrival = spool::unix_now();
        match self.ctx.writer.commit(record, parts.len(), Some(incoming)).await {
            Ok(loc) => {
                for ((node, rcpts), owner) in parts.into_iter().zip(owners) {
                    let entry = QueueEntry {
                        loc,
                        msg_id,
                        arrival,
                        size: len,
                        rcpts,
                        table_shard: self.ctx.id as u16,
                    };
                    self.ctx.enqueue(owner, node, entry);
                }
                tracing::info!(
                    queue_id = qid,
                    from = %String::from_utf8_lossy(&txn.sender),
                    nrcpt = txn.rcpts.len(),
                    size = len,
                    commit_us = t0.elapsed().as_micros() as u64,
                    "queued"
                );
                Reply::owned(250, "2.0.0", format!("Ok: queued as {qid}"))
            }
            Err(e) => {
                for r in reserved {
                    self.ctx.inboxes[r].release(1);
                }
                tracing::error!(queue_id = qid, error = %e, "spool commit failed; message not accepted");
                match e {
                    SpoolError::Closed => common::SHUTDOWN,
                    _ => common::STORAGE,
                }
            }
        }
    }
}

fn data_error_reply(err: DataError, cfg: &crate::config::Config) -> Reply {
    match err {
        DataError::TooBig => Reply::owned(
            552,
            "5.3.4",
            format!(
                "Message size exceeds fixed maximum message size ({} octets)",
                cfg.smtp.max_message_size
            ),
        ),
        DataError::LineTooLong => Reply::owned(
            550,
            "5.5.6",
            format!(
                "Message has a line longer than {} octets (RFC 5321 4.5.3.1.6)",
                cfg.smtp.max_text_line
            ),
        ),
        DataError::BareNewline => Reply::new(
            550,
            "5.5.2",
            "Message contains a bare <CR> or <LF>; lines must end with <CR><LF> (RFC 5321 2.3.8)",
        ),
        DataError::Nul => Reply::new(550, "5.6.0", "Message contains a NUL octet"),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
}
