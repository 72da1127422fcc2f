//! Shared fixtures for the end-to-end tests: start the real `etrn-relay` binary on a free
//! loopback port with a temporary spool, speak SMTP to it over real sockets, start real peers
//! (dnsmasq, Postfix's smtp-sink). A missing peer tool is a test failure with the install
//! command, never a silent skip.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free UDP+TCP port on 127.0.0.1 for a DNS server.
pub fn free_dns_port() -> u16 {
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = u.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// Path of a required external tool, or a failing test that says how to install it.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/bin",
        "/usr/local/sbin",
    ] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("required test tool `{name}` is missing: apt-get install {package} (or run .ci/install-test-deps.sh)");
}

/// A running relay process, killed on drop.
pub struct Relay {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

/// The relay binary built by cargo for this test run.
pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_etrn-relay"))
}

impl Relay {
    /// Starts a relay with `extra` appended to a base config (hostname relay.test, spool in a
    /// temp dir, listen on a free port). `extra` may contain `[smtp]` etc. sections: the base
    /// has only top-level keys plus `[smtp] listen`, so use `smtp_extra` for [smtp] keys.
    pub fn start(top: &str, smtp_extra: &str, rest: &str) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, top, smtp_extra, rest)
    }

    /// Like [`Relay::start`] with an existing directory (restarts reuse the spool).
    pub fn start_in(dir: tempfile::TempDir, top: &str, smtp_extra: &str, rest: &str) -> Relay {
        let port = free_port();
        let spool = dir.path().join("spool");
        // `top` may set its own segment size (a TOML key may appear only once).
        let segment_size = if top.contains("spool_segment_size") {
            ""
        } else {
            "spool_segment_size = 1048576\n"
        };
        let config = format!(
            "hostname = \"relay.test\"\nspool_dir = \"{}\"\n{segment_size}{top}\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{smtp_extra}\n{rest}\n",
            spool.display()
        );
        let config_path = dir.path().join("relay.toml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join(format!("relay-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(relay_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("ETRN_RELAY_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etrn-relay");
        let mut r = Relay {
            child: Some(child),
            port,
            dir,
            config_path,
            log_path,
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("relay exited during start-up ({status}); log:\n{}", self.log());
                }
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                // Every shard listens with SO_REUSEPORT; make sure the greeting works.
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut b = [0u8; 3];
                if s.read_exact(&mut b).is_ok() && &b == b"220" {
                    let _ = s.write_all(b"QUIT\r\n");
                    // give the other shards a moment to finish binding
                    std::thread::sleep(Duration::from_millis(100));
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("relay did not start listening; log:\n{}", self.log());
    }

    /// The relay's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Connects and reads the greeting.
    pub fn client(&self) -> SmtpClient {
        let mut c = SmtpClient::connect(self.addr());
        let g = c.read_reply();
        assert!(g.starts_with("220"), "greeting: {g}");
        c
    }

    /// SIGKILL (no clean-up at all) and wait.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// Stops this relay and returns its directory for a restart.
    pub fn into_dir(mut self) -> tempfile::TempDir {
        self.kill9();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Runs `etrn-relay queue` on this relay's config and returns its stdout.
    pub fn queue_listing(&self) -> String {
        let out = Command::new(relay_bin())
            .args(["queue", "--config"])
            .arg(&self.config_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "queue command failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Number of messages the `queue` listing shows for a node.
    pub fn queued_for(&self, node: &str) -> usize {
        self.queue_listing()
            .lines()
            .find(|l| l.split_whitespace().next() == Some(node))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reads one (possibly multi-line) SMTP reply from `r`; lines joined with '\n'. Empty on EOF
/// or error.
pub fn read_reply_from(r: &mut impl BufRead) -> String {
    let mut all = Vec::new();
    loop {
        let mut l = String::new();
        match r.read_line(&mut l) {
            Ok(0) | Err(_) => return all.join("\n"),
            Ok(_) => {}
        }
        let line = l.trim_end_matches(['\r', '\n']).to_owned();
        let more = line.as_bytes().get(3) == Some(&b'-');
        all.push(line);
        if !more {
            return all.join("\n");
        }
    }
}

/// A minimal blocking SMTP client for tests: raw bytes in, raw replies out.
pub struct SmtpClient {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl SmtpClient {
    pub fn connect(addr: SocketAddr) -> SmtpClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        SmtpClient { stream, reader }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends one command line (CRLF added) and returns the full reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    /// Reads one (possibly multi-line) reply; lines joined with '\n'. Empty on EOF.
    pub fn read_reply(&mut self) -> String {
        read_reply_from(&mut self.reader)
    }

    /// Reads until EOF (the server closed), returning what came.
    pub fn read_to_end(&mut self) -> String {
        let mut s = String::new();
        let _ = self.reader.read_to_string(&mut s);
        s
    }

    /// MAIL, RCPTs, DATA with `body` (dot-stuffed here), returns the final reply.
    pub fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> String {
        send_mail_via(self, from, rcpts, body)
    }
}

/// What a test client speaks, plain or inside TLS: enough for [`send_mail_via`].
pub trait SmtpTalk {
    /// Sends one command line and returns the full reply.
    fn cmd(&mut self, line: &str) -> String;
    /// Sends raw bytes.
    fn send(&mut self, bytes: &[u8]);
    /// Reads one (possibly multi-line) reply.
    fn read_reply(&mut self) -> String;
}

impl SmtpTalk for SmtpClient {
    fn cmd(&mut self, line: &str) -> String {
        SmtpClient::cmd(self, line)
    }
    fn send(&mut self, bytes: &[u8]) {
        SmtpClient::send(self, bytes)
    }
    fn read_reply(&mut self) -> String {
        SmtpClient::read_reply(self)
    }
}

impl SmtpTalk for TlsSmtpClient {
    fn cmd(&mut self, line: &str) -> String {
        TlsSmtpClient::cmd(self, line)
    }
    fn send(&mut self, bytes: &[u8]) {
        TlsSmtpClient::send(self, bytes)
    }
    fn read_reply(&mut self) -> String {
        TlsSmtpClient::read_reply(self)
    }
}

/// MAIL, RCPTs (each must get 250), DATA (354), the dot-stuffed `body` and the terminator;
/// returns the final reply.
pub fn send_mail_via(c: &mut impl SmtpTalk, from: &str, rcpts: &[&str], body: &[u8]) -> String {
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    assert!(r.starts_with("250"), "MAIL: {r}");
    for t in rcpts {
        let r = c.cmd(&format!("RCPT TO:<{t}>"));
        assert!(r.starts_with("250"), "RCPT {t}: {r}");
    }
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "DATA: {r}");
    c.send(&dot_stuff(body));
    c.send(b".\r\n");
    c.read_reply()
}

/// Dot-stuffs a CRLF message and makes sure it ends with CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Extracts the queue id from `250 2.0.0 Ok: queued as ID`.
pub fn queue_id(reply: &str) -> String {
    reply.rsplit(' ').next().unwrap().to_owned()
}

/// Waits until `f` is true or panics with `what`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A dnsmasq serving the given `--mx-host`/`--host-record` style arguments for `*.test`.
pub struct Dns {
    child: Child,
    pub port: u16,
}

impl Dns {
    /// `records`: dnsmasq arguments such as `--mx-host=node1.test,mx.node1.test,10`.
    pub fn start(records: &[String]) -> Dns {
        let bin = require_tool("dnsmasq", "dnsmasq-base");
        for _ in 0..5 {
            let port = free_dns_port();
            let mut cmd = Command::new(&bin);
            cmd.args([
                "--keep-in-foreground",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--local=/test/",
                "--local-ttl=1",
                "--pid-file=",
                "--log-facility=-",
            ])
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            if unsafe { libc::geteuid() } == 0 {
                cmd.arg("--user=root");
            }
            let mut child = cmd.spawn().expect("start dnsmasq");
            std::thread::sleep(Duration::from_millis(300));
            if child.try_wait().unwrap().is_none() {
                return Dns { child, port };
            }
        }
        panic!("dnsmasq would not start");
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Postfix's smtp-sink on an address, saving every message to a directory.
pub struct Sink {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Sink {
    /// Starts `smtp-sink` on `ip:port`. `extra` are extra smtp-sink options (e.g. `-Q` to answer
    /// 4xx, or `-R` ...). Messages land in `dir` as one file each.
    pub fn start(ip: &str, port: u16, extra: &[&str]) -> Sink {
        let bin = require_tool("smtp-sink", "postfix");
        let dir = tempfile::tempdir().unwrap();
        let mut perm = std::fs::metadata(dir.path()).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o777);
        std::fs::set_permissions(dir.path(), perm).unwrap();
        let mut cmd = Command::new(bin);
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        cmd.arg("-d").arg(format!("{}/%M.", dir.path().display()));
        cmd.args(extra);
        cmd.arg(format!("{ip}:{port}")).arg("64");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("start smtp-sink");
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        wait_for("smtp-sink to listen", Duration::from_secs(10), || {
            TcpStream::connect(addr).is_ok()
        });
        Sink { child, addr, dir }
    }

    /// Messages received so far (file contents).
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut v: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        v.sort();
        v.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The message part of a file saved by smtp-sink -d (after its X-* envelope lines and its own
/// Received header).
pub fn sink_body(file: &[u8]) -> &[u8] {
    // smtp-sink writes X-Client-Addr etc., then "Received: ... by smtp-sink ...;\n\tdate\n",
    // then the message as received, with LF line ends preserved as CRLF? (it stores CRLF).
    let text = file;
    let marker = b"(smtp-sink) with";
    let pos = memchr::memmem::find(text, marker).expect("smtp-sink Received header");
    // skip to the end of the Received header: the next line that does not start with a tab
    let mut i = pos;
    loop {
        let nl = memchr::memchr(b'\n', &text[i..])
            .map(|p| i + p + 1)
            .unwrap_or(text.len());
        i = nl;
        if i >= text.len() || text[i] != b'\t' {
            break;
        }
    }
    &text[i..]
}

// ---- additions for the core and durability tests ------------------------------------------

impl SmtpClient {
    /// Sets the read timeout of the socket (the BufReader shares it).
    pub fn set_read_timeout(&self, d: Duration) {
        self.stream.set_read_timeout(Some(d)).unwrap();
    }

    /// Exactly one `read()` on the socket (no reply was buffered before): what one server
    /// write (or several that arrived meanwhile) delivered.
    pub fn read_once(&mut self) -> String {
        assert!(self.reader.buffer().is_empty(), "read_once with data already buffered");
        let n = match self.reader.fill_buf() {
            Ok(b) => b.len(),
            Err(e) => panic!("read: {e}"),
        };
        let s = String::from_utf8_lossy(&self.reader.buffer()[..n]).into_owned();
        self.reader.consume(n);
        s
    }

    /// Data-carrying TCP segments received on this connection so far (Linux `TCP_INFO`
    /// `tcpi_data_segs_in`): tells how many writes the server needed for a batch of replies.
    pub fn data_segments_in(&self) -> u32 {
        use std::os::fd::AsRawFd;
        // SAFETY: getsockopt into a zeroed tcp_info of the size we pass.
        unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let rc = libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            );
            assert_eq!(rc, 0, "getsockopt(TCP_INFO): {}", std::io::Error::last_os_error());
            info.tcpi_data_segs_in
        }
    }

    /// Reads until EOF and returns what came and how long it took; panics if the server did
    /// not close within `within`.
    pub fn read_until_closed(&mut self, within: Duration) -> (String, Duration) {
        let t0 = Instant::now();
        self.set_read_timeout(within);
        let mut s = Vec::new();
        match self.reader.read_to_end(&mut s) {
            Ok(_) => (String::from_utf8_lossy(&s).into_owned(), t0.elapsed()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                (String::from_utf8_lossy(&s).into_owned(), t0.elapsed())
            }
            Err(e) => panic!(
                "server did not close the connection within {within:?} ({e}); got {:?}",
                String::from_utf8_lossy(&s)
            ),
        }
    }

    /// Sends `MAIL`, `RCPT`s, `DATA` pipelined in one write, then the raw `data` (which must
    /// include the terminator), and returns the replies to MAIL, each RCPT, DATA and the final.
    pub fn send_raw_mail(&mut self, from: &str, rcpts: &[&str], data: &[u8]) -> Vec<String> {
        let mut cmds = format!("MAIL FROM:<{from}>\r\n");
        for r in rcpts {
            cmds.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        cmds.push_str("DATA\r\n");
        self.send(cmds.as_bytes());
        let mut replies: Vec<String> = (0..rcpts.len() + 2).map(|_| self.read_reply()).collect();
        assert!(replies.last().unwrap().starts_with("354"), "{replies:?}");
        self.send(data);
        replies.push(self.read_reply());
        replies
    }
}

impl Relay {
    /// `<dir>/spool`.
    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// The segment files now in the spool.
    pub fn segment_files(&self) -> Vec<PathBuf> {
        segment_files(&self.spool_dir())
    }

    /// Runs the relay binary with `args` and `--config <this relay's config>`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(relay_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .unwrap()
    }

    /// Files the relay process holds open although they were deleted (their disk space is not
    /// given back while they are open), from /proc/<pid>/fd.
    pub fn open_deleted_files(&self) -> Vec<String> {
        let Some(c) = self.child.as_ref() else {
            return Vec::new();
        };
        std::fs::read_dir(format!("/proc/{}/fd", c.id()))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .map(|p| p.display().to_string())
                    .filter(|p| p.ends_with(" (deleted)"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True once the process has exited (it should not have).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_some(),
            None => true,
        }
    }
}

/// Segment files (`*.seg`) in `spool/segments`, sorted.
pub fn segment_files(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(spool.join("segments"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// One record found in a segment file by [`spooled_records`].
#[derive(Debug, Clone)]
pub struct SpooledRecord {
    pub path: PathBuf,
    /// Offset of the record in the file.
    pub offset: usize,
    pub total_len: usize,
    pub queue_id: String,
    pub sender: Vec<u8>,
    pub recipients: Vec<Vec<u8>>,
    pub states: Vec<u8>,
    /// Offset of the message data in the file.
    pub data_at: usize,
    pub data: Vec<u8>,
}

/// Every intact record in the spool's segment files, parsed with the relay's own record
/// format (stops at the zero tail of each preallocated segment).
pub fn spooled_records(spool: &Path) -> Vec<SpooledRecord> {
    use etrn_relay::spool::record;
    let mut out = Vec::new();
    for path in segment_files(spool) {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let mut off = 0;
        while off + record::HEADER_LEN <= bytes.len() {
            match record::parse(&bytes[off..]) {
                Ok(v) => {
                    out.push(SpooledRecord {
                        path: path.clone(),
                        offset: off,
                        total_len: v.total_len,
                        queue_id: etrn_relay::spool::queue_id(v.msg_id),
                        sender: v.sender.to_vec(),
                        recipients: v.recipients.iter().map(|r| r.to_vec()).collect(),
                        states: v.states.to_vec(),
                        data_at: off + v.data_offset,
                        data: v.data.to_vec(),
                    });
                    off += v.total_len;
                }
                Err(_) => break,
            }
        }
    }
    out
}

/// Runs a command, killing it (and failing) if it does not exit within `limit`.
pub fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "command did not exit within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A node's mail server for queue-run tests: dnsmasq serving `MX node -> mx.node -> ip` for
/// each node, and one smtp-sink on `ip` that takes the mail of all of them.
pub struct NodeServers {
    pub dns: Dns,
    pub sink: Sink,
}

impl NodeServers {
    /// Every node in `nodes` gets `MX 10 mx.<node>` with address `ip` (a loopback address
    /// other than 127.0.0.1, so the sink's port cannot clash with anything on 127.0.0.1).
    pub fn start(nodes: &[&str], ip: &str) -> NodeServers {
        let mut records = Vec::new();
        for n in nodes {
            records.push(format!("--mx-host={n},mx.{n},10"));
            records.push(format!("--host-record=mx.{n},{ip}"));
        }
        let dns = Dns::start(&records);
        let port = free_port();
        let sink = Sink::start(ip, port, &[]);
        NodeServers { dns, sink }
    }

    /// The `[dns]` and `[delivery]` sections that point the relay at these servers.
    pub fn config(&self) -> String {
        format!(
            "[dns]\nnameservers = [\"127.0.0.1:{}\"]\n[delivery]\nport = {}\n",
            self.dns.port,
            self.sink.addr.port()
        )
    }
}

// ---- additions for the ETRN end-to-end tests (tests/etrn.rs, tests/etrn_clients.rs) ----------

/// A port for the delivery targets of one test (every sink of the test listens on
/// `127.0.0.x:<port>`). The port stays bound on 127.0.0.1 for the life of the test process, so
/// no other test of the process (nor the relay's own `free_port`) can get the same number and
/// talk to this test's sinks.
pub fn reserve_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    std::mem::forget(l);
    p
}

/// A TCP connection to `dst` made from the local address `src` (e.g. 127.0.0.9): std cannot
/// bind before connecting, so this goes through libc.
pub fn connect_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else { panic!("IPv4 only") };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd); // closes the fd on every early return
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sin(src, 0);
        let rc = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind {src}: {}", std::io::Error::last_os_error());
        let remote = sin(*dst.ip(), dst.port());
        let rc = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect {dst} from {src}: {}", std::io::Error::last_os_error());
        stream
    }
}

impl SmtpClient {
    /// Wraps an already connected stream (see [`connect_from`]); does not read the greeting.
    pub fn from_stream(stream: TcpStream) -> SmtpClient {
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        SmtpClient { stream, reader }
    }
}

impl Relay {
    /// Lines of the relay log that contain every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

/// Splits a file saved by smtp-sink into (the sink's envelope records, the message as the
/// sink received it). The sink stores LF line ends and adds one empty line at the end; this
/// returns the message with that final empty line removed, still with LF line ends.
pub fn sink_message(file: &[u8]) -> (String, Vec<u8>) {
    let body = sink_body(file);
    let head_len = file.len() - body.len();
    let envelope = String::from_utf8_lossy(&file[..head_len]).into_owned();
    let msg = body
        .strip_suffix(b"\n")
        .expect("smtp-sink ends each dump with an empty line");
    (envelope, msg.to_vec())
}

/// CRLF -> LF, the way smtp-sink stores a message.
pub fn crlf_to_lf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Value of the first header field `name` (case-insensitive) of a message, if any.
pub fn header_value(msg: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(msg);
    let prefix = format!("{}:", name.to_ascii_lowercase());
    for line in text.lines() {
        if line.trim_end_matches('\r').is_empty() {
            return None;
        }
        if line.to_ascii_lowercase().starts_with(&prefix) {
            return Some(line[prefix.len()..].trim().to_owned());
        }
    }
    None
}

/// One mail transaction seen by a [`ScriptedServer`].
#[derive(Debug, Clone)]
pub struct ScriptedTxn {
    /// The MAIL command's arguments (after `MAIL FROM:`).
    pub mail: String,
    /// RCPT addresses the server accepted.
    pub rcpts: Vec<String>,
    /// The DATA bytes exactly as they crossed the wire, still dot-stuffed, without the
    /// terminating `.\r\n`.
    pub raw_data: Vec<u8>,
}

/// How a [`ScriptedServer`] answers.
#[derive(Debug, Clone)]
pub struct Script {
    /// Extra EHLO keywords (default PIPELINING, 8BITMIME, SIZE 10000000).
    pub ehlo_keywords: Vec<String>,
    /// Reply to every RCPT (default `250 2.1.5 Ok`).
    pub rcpt_reply: String,
    /// Reply after the end of DATA (default `250 2.0.0 Ok`).
    pub data_end_reply: String,
    /// Sleep before answering the end of DATA (a slow server).
    pub data_end_delay: Duration,
    /// Sessions served at once; a connection beyond them gets `421` and is closed.
    pub max_sessions: Option<usize>,
    /// A connection beyond `max_sessions` gets no greeting at all and stays open until the
    /// client gives up (a server or firewall that drops the extra session silently).
    pub ignore_extra_sessions: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            ehlo_keywords: vec!["PIPELINING".into(), "8BITMIME".into(), "SIZE 10000000".into()],
            rcpt_reply: "250 2.1.5 Ok".into(),
            data_end_reply: "250 2.0.0 Ok".into(),
            data_end_delay: Duration::ZERO,
            max_sessions: None,
            ignore_extra_sessions: false,
        }
    }
}

/// A tiny scripted SMTP server (std::net, one thread per connection) that records every
/// transaction byte for byte. Stops accepting on drop.
pub struct ScriptedServer {
    pub addr: SocketAddr,
    txns: std::sync::Arc<std::sync::Mutex<Vec<ScriptedTxn>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sessions: std::sync::Arc<SessionCount>,
}

/// Sessions of a [`ScriptedServer`]: open now, most at once, turned away with 421.
#[derive(Default)]
struct SessionCount {
    open: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicUsize,
    /// For each session served, in order: transactions completed when it was accepted.
    opened_after: std::sync::Mutex<Vec<usize>>,
}

impl ScriptedServer {
    pub fn start(ip: &str, port: u16, script: Script) -> ScriptedServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind((ip, port)).unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
        let addr = listener.local_addr().unwrap();
        let txns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(SessionCount::default());
        let (t, s, n) = (txns.clone(), stop.clone(), sessions.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let open = n.open.fetch_add(1, Ordering::SeqCst) + 1;
                if script.max_sessions.is_some_and(|m| open > m) {
                    n.open.fetch_sub(1, Ordering::SeqCst);
                    n.refused.fetch_add(1, Ordering::SeqCst);
                    if script.ignore_extra_sessions {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut conn, &mut std::io::sink());
                        });
                    } else {
                        let _ = conn.write_all(b"421 4.7.0 scripted.test Too many sessions, try later\r\n");
                    }
                    continue;
                }
                n.peak.fetch_max(open, Ordering::SeqCst);
                n.opened_after.lock().unwrap().push(t.lock().unwrap().len());
                let (t, script, n) = (t.clone(), script.clone(), n.clone());
                std::thread::spawn(move || {
                    let _ = serve_scripted(conn, &script, &t);
                    n.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        ScriptedServer {
            addr,
            txns,
            stop,
            sessions,
        }
    }

    /// Most sessions served at once.
    pub fn peak_sessions(&self) -> usize {
        self.sessions.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// For each session served, in the order accepted: how many transactions had completed.
    pub fn sessions_opened_after(&self) -> Vec<usize> {
        self.sessions.opened_after.lock().unwrap().clone()
    }

    /// Connections turned away (`Script::max_sessions`): with 421, or ignored.
    pub fn refused_sessions(&self) -> usize {
        self.sessions.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Transactions completed with a 2xx after DATA.
    pub fn txns(&self) -> Vec<ScriptedTxn> {
        self.txns.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.txns.lock().unwrap().len()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

fn serve_scripted(conn: TcpStream, script: &Script, txns: &std::sync::Mutex<Vec<ScriptedTxn>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    w.write_all(b"220 scripted.test ESMTP\r\n")?;
    let mut mail: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            let mut reply = String::from("250-scripted.test\r\n");
            for (i, k) in script.ehlo_keywords.iter().enumerate() {
                let sep = if i + 1 == script.ehlo_keywords.len() { ' ' } else { '-' };
                reply.push_str(&format!("250{sep}{k}\r\n"));
            }
            if script.ehlo_keywords.is_empty() {
                reply = "250 scripted.test\r\n".into();
            }
            w.write_all(reply.as_bytes())?;
        } else if upper.starts_with("HELO") {
            w.write_all(b"250 scripted.test\r\n")?;
        } else if upper.starts_with("MAIL FROM:") {
            mail = Some(text["MAIL FROM:".len()..].to_owned());
            rcpts.clear();
            w.write_all(b"250 2.1.0 Ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            let reply = &script.rcpt_reply;
            if reply.starts_with('2') {
                rcpts.push(text["RCPT TO:".len()..].trim_matches(['<', '>']).to_owned());
            }
            w.write_all(format!("{reply}\r\n").as_bytes())?;
        } else if upper == "DATA" {
            if mail.is_none() || rcpts.is_empty() {
                w.write_all(b"554 5.5.1 No valid recipients\r\n")?;
                continue;
            }
            w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
            let mut raw = Vec::new();
            loop {
                let mut l = Vec::new();
                if r.read_until(b'\n', &mut l)? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                raw.extend_from_slice(&l);
            }
            std::thread::sleep(script.data_end_delay);
            if script.data_end_reply.starts_with('2') {
                txns.lock().unwrap().push(ScriptedTxn {
                    mail: mail.take().unwrap_or_default(),
                    rcpts: std::mem::take(&mut rcpts),
                    raw_data: raw,
                });
            }
            mail = None;
            rcpts.clear();
            w.write_all(format!("{}\r\n", script.data_end_reply).as_bytes())?;
        } else if upper == "RSET" {
            mail = None;
            rcpts.clear();
            w.write_all(b"250 2.0.0 Ok\r\n")?;
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else if upper == "NOOP" {
            w.write_all(b"250 2.0.0 Ok\r\n")?;
        } else {
            w.write_all(b"502 5.5.2 Command not implemented\r\n")?;
        }
    }
}

/// MX records of one domain for [`mx_zone`]: `(domain, [(preference, host, host's IPv4)])`.
pub type MxRecords<'a> = (&'a str, &'a [(u16, &'a str, &'a str)]);

/// The dnsmasq arguments of `--mx-host`/`--host-record` pairs (an empty IP adds no A record).
pub fn mx_zone(entries: &[MxRecords]) -> Vec<String> {
    let mut v = Vec::new();
    for (domain, mxs) in entries {
        for (pref, host, ip) in mxs.iter() {
            v.push(format!("--mx-host={domain},{host},{pref}"));
            if !ip.is_empty() {
                v.push(format!("--host-record={host},{ip}"));
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// `[dns]` and `[delivery]` sections pointing at a test DNS server and delivery port.
pub fn delivery_toml(dns: &Dns, port: u16, extra_delivery: &str) -> String {
    format!(
        "[dns]\nnameservers = [\"127.0.0.1:{}\"]\ntimeout_secs = 1\n[delivery]\nport = {port}\ntimeout_scale = 0.01\n{extra_delivery}\n",
        dns.port
    )
}

impl Sink {
    /// Messages smtp-sink has finished writing. It creates the dump file when the transaction
    /// starts and writes it through a buffer, so a file that is still being written can be
    /// empty or cut short; a finished one has the sink's Received header and ends with the
    /// empty line the sink appends.
    pub fn complete_messages(&self) -> Vec<Vec<u8>> {
        self.messages()
            .into_iter()
            .filter(|f| f.ends_with(b"\n\n") && memchr::memmem::find(f, b"(smtp-sink) with").is_some())
            .collect()
    }

    pub fn complete_count(&self) -> usize {
        self.complete_messages().len()
    }
}

// ---- additions for the fault and outbound-TLS tests (tests/downstream_faults.rs,
// tests/tls_outbound.rs, tests/crash_loop.rs) ---------------------------------------------------

/// Where a [`FaultServer`] stops answering. It keeps the connection open and reads (and
/// discards) whatever comes until the client gives up and closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Accepts the TCP connection but never sends the 220 greeting.
    Greeting,
    /// Never answers the EHLO.
    Ehlo,
    /// Never answers MAIL FROM.
    Mail,
    /// Reads the whole message and the final dot, then never answers.
    DataEnd,
}

/// What a [`FaultServer`] does with STARTTLS (RFC 3207).
#[derive(Clone)]
pub enum StartTls {
    /// Not offered (EHLO has no STARTTLS; the command gets 502).
    Off,
    /// Offered: `220`, then a real rustls handshake with this configuration.
    On(std::sync::Arc<rustls::ServerConfig>),
    /// Offered: `220` followed, in the same write, by these plaintext bytes (a response
    /// injection: a client must discard them), then a real handshake.
    Inject(std::sync::Arc<rustls::ServerConfig>, Vec<u8>),
    /// Offered: `220`, then plaintext garbage instead of a TLS handshake, then close.
    Garbage,
    /// Offered, but the command is refused with this reply (e.g. `454 4.7.0 TLS not available`).
    Refuse(String),
}

/// How a [`FaultServer`] behaves; cloned for every new connection, so [`FaultServer::set`]
/// changes the behaviour of the next connection.
#[derive(Clone)]
pub struct FaultScript {
    /// The greeting line (e.g. `421 4.3.2 busy` to refuse the session).
    pub greeting: String,
    /// EHLO keywords besides STARTTLS (default PIPELINING, 8BITMIME, SIZE 10000000).
    pub ehlo_keywords: Vec<String>,
    pub starttls: StartTls,
    /// Reply to MAIL FROM (default `250 2.1.0 Ok`).
    pub mail_reply: String,
    /// Reply to every RCPT TO after an accepted MAIL (default `250 2.1.5 Ok`).
    pub rcpt_reply: String,
    /// Reply after the final dot (default `250 2.0.0 Ok`).
    pub data_end_reply: String,
    /// Sleep before every reply, the greeting included (a slow server).
    pub reply_delay: Duration,
    /// Close the connection (shutdown both ways) once this many octets of DATA have arrived.
    pub drop_in_data_after: Option<usize>,
    pub stall: Option<Stall>,
}

impl Default for FaultScript {
    fn default() -> Self {
        FaultScript {
            greeting: "220 fault.test ESMTP".into(),
            ehlo_keywords: vec!["PIPELINING".into(), "8BITMIME".into(), "SIZE 10000000".into()],
            starttls: StartTls::Off,
            mail_reply: "250 2.1.0 Ok".into(),
            rcpt_reply: "250 2.1.5 Ok".into(),
            data_end_reply: "250 2.0.0 Ok".into(),
            reply_delay: Duration::ZERO,
            drop_in_data_after: None,
            stall: None,
        }
    }
}

/// One transaction a [`FaultServer`] accepted (2xx after the final dot).
#[derive(Debug, Clone)]
pub struct FaultTxn {
    /// The MAIL command's arguments (after `MAIL FROM:`).
    pub mail: String,
    /// Accepted RCPT addresses.
    pub rcpts: Vec<String>,
    /// DATA as it crossed the wire (still dot-stuffed), without the final `.\r\n`.
    pub raw_data: Vec<u8>,
    /// The transaction ran inside TLS.
    pub tls: bool,
    /// The TLS session's negotiated protocol version, if any (e.g. `TLSv1_3`).
    pub tls_version: Option<String>,
    /// When the final dot was read (just before the 2xx reply was sent).
    pub at: Instant,
}

/// A scripted SMTP server for fault tests (std::net, a thread per connection): slow replies,
/// stalls, dropped connections, refusals at any stage, and STARTTLS (real, refused, garbage,
/// with injected plaintext). It records accepted transactions and an event log
/// (`connect`, `stall <stage>`, `closed by client after stall`, `dropped in data`,
/// `tls ok`, `tls failed: ...`, `plaintext pipelined after STARTTLS`,
/// `mail without EHLO after TLS`, `starttls`, `garbage sent`). Stops accepting on drop.
pub struct FaultServer {
    pub addr: SocketAddr,
    script: std::sync::Arc<std::sync::Mutex<FaultScript>>,
    txns: std::sync::Arc<std::sync::Mutex<Vec<FaultTxn>>>,
    events: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultServer {
    /// Listens on `ip:port` (retrying the bind for a few seconds, so a test can take over the
    /// address of a server it just stopped).
    pub fn start(ip: &str, port: u16, script: FaultScript) -> FaultServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind((ip, port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("bind {ip}:{port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let addr = listener.local_addr().unwrap();
        let server = FaultServer {
            addr,
            script: Arc::new(Mutex::new(script)),
            txns: Arc::new(Mutex::new(Vec::new())),
            events: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (script, txns, events, stop) = (
            server.script.clone(),
            server.txns.clone(),
            server.events.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = script.lock().unwrap().clone();
                let (t, e) = (txns.clone(), events.clone());
                e.lock().unwrap().push("connect".into());
                std::thread::spawn(move || {
                    if let Err(err) = serve_fault(conn, &s, &t, &e) {
                        e.lock().unwrap().push(format!("io error: {err}"));
                    }
                });
            }
        });
        server
    }

    /// Changes the behaviour for connections accepted from now on.
    pub fn set(&self, script: FaultScript) {
        *self.script.lock().unwrap() = script;
    }

    pub fn txns(&self) -> Vec<FaultTxn> {
        self.txns.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.txns.lock().unwrap().len()
    }

    pub fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    /// Number of events that start with `prefix`.
    pub fn events_with(&self, prefix: &str) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with(prefix))
            .count()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop so the listener closes
    }
}

/// A [`FaultServer`] connection: plaintext, or TLS after STARTTLS.
enum FaultIo {
    Plain(BufReader<TcpStream>),
    Tls(Box<BufReader<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>>),
}

impl FaultIo {
    fn read_line(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            FaultIo::Plain(r) => r.read_until(b'\n', buf),
            FaultIo::Tls(r) => r.read_until(b'\n', buf),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            FaultIo::Plain(r) => r.get_mut().write_all(bytes),
            FaultIo::Tls(r) => {
                let s = r.get_mut();
                s.write_all(bytes)?;
                s.flush()
            }
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            FaultIo::Plain(r) => r.get_ref(),
            FaultIo::Tls(r) => &r.get_ref().sock,
        }
    }

    fn tls_version(&self) -> Option<String> {
        match self {
            FaultIo::Plain(_) => None,
            FaultIo::Tls(r) => r.get_ref().conn.protocol_version().map(|v| format!("{v:?}")),
        }
    }
}

fn serve_fault(
    conn: TcpStream,
    script: &FaultScript,
    txns: &std::sync::Mutex<Vec<FaultTxn>>,
    events: &std::sync::Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let event = |e: String| events.lock().unwrap().push(e);
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    // Replies go out one write each: without this, Nagle holds the second reply to a pipelined
    // batch until the client's delayed ACK (40 ms a transaction).
    conn.set_nodelay(true)?;
    let mut io = FaultIo::Plain(BufReader::new(conn));
    // Stalled: read and discard until the client closes (or 30 s pass).
    let stall = |io: &mut FaultIo, stage: Stall| -> std::io::Result<()> {
        event(format!("stall {stage:?}"));
        let t0 = Instant::now();
        let mut sink = Vec::new();
        loop {
            sink.clear();
            match io.read_line(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        event(format!(
            "closed by client after stall ({} ms)",
            t0.elapsed().as_millis()
        ));
        Ok(())
    };
    let reply = |io: &mut FaultIo, text: &str| -> std::io::Result<()> {
        std::thread::sleep(script.reply_delay);
        io.write(format!("{text}\r\n").as_bytes())
    };
    if script.stall == Some(Stall::Greeting) {
        return stall(&mut io, Stall::Greeting);
    }
    reply(&mut io, &script.greeting)?;
    let mut tls = false;
    let mut ehlo_seen = false;
    let mut mail: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let mut line = Vec::new();
        if io.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            if script.stall == Some(Stall::Ehlo) {
                return stall(&mut io, Stall::Ehlo);
            }
            ehlo_seen = true;
            let mut keywords = script.ehlo_keywords.clone();
            if !tls && !matches!(script.starttls, StartTls::Off) {
                keywords.push("STARTTLS".into());
            }
            let mut r = String::from("250");
            r.push(if keywords.is_empty() { ' ' } else { '-' });
            r.push_str("fault.test");
            for (i, k) in keywords.iter().enumerate() {
                let sep = if i + 1 == keywords.len() { ' ' } else { '-' };
                r.push_str(&format!("\r\n250{sep}{k}"));
            }
            reply(&mut io, &r)?;
        } else if upper.starts_with("HELO") {
            ehlo_seen = true;
            reply(&mut io, "250 fault.test")?;
        } else if upper == "STARTTLS" {
            event("starttls".into());
            let cfg = match (&script.starttls, tls) {
                (StartTls::Off, _) | (_, true) => {
                    reply(&mut io, "502 5.5.1 Not offered")?;
                    continue;
                }
                (StartTls::Refuse(r), _) => {
                    reply(&mut io, r)?;
                    continue;
                }
                (StartTls::Garbage, _) => {
                    reply(&mut io, "220 2.0.0 Ready to start TLS")?;
                    // Take the ClientHello, answer it with something that is not TLS, and
                    // give the client time to read that before the connection goes.
                    let mut hello = [0u8; 4096];
                    let _ = io.tcp().set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = (&mut io.tcp()).read(&mut hello);
                    io.write(b"this is not a TLS handshake\r\n")?;
                    event("garbage sent".into());
                    std::thread::sleep(Duration::from_millis(300));
                    let _ = io.tcp().shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
                (StartTls::On(c), _) => {
                    reply(&mut io, "220 2.0.0 Ready to start TLS")?;
                    c.clone()
                }
                (StartTls::Inject(c, bytes), _) => {
                    let mut w = b"220 2.0.0 Ready to start TLS\r\n".to_vec();
                    w.extend_from_slice(bytes);
                    std::thread::sleep(script.reply_delay);
                    io.write(&w)?;
                    c.clone()
                }
            };
            let FaultIo::Plain(reader) = io else { unreachable!() };
            if !reader.buffer().is_empty() {
                event("plaintext pipelined after STARTTLS".into());
            }
            let mut sock = reader.into_inner();
            let mut conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut sock) {
                    event(format!("tls failed: {e}"));
                    return Ok(());
                }
            }
            event("tls ok".into());
            io = FaultIo::Tls(Box::new(BufReader::new(rustls::StreamOwned::new(conn, sock))));
            tls = true;
            // RFC 3207 4.2: the client must forget everything and start with EHLO again.
            ehlo_seen = false;
            mail = None;
            rcpts.clear();
        } else if upper.starts_with("MAIL FROM:") {
            if script.stall == Some(Stall::Mail) {
                return stall(&mut io, Stall::Mail);
            }
            if !ehlo_seen {
                if tls {
                    event("mail without EHLO after TLS".into());
                }
                reply(&mut io, "503 5.5.1 Send EHLO first")?;
                continue;
            }
            rcpts.clear();
            if script.mail_reply.starts_with('2') {
                mail = Some(text["MAIL FROM:".len()..].to_owned());
            }
            reply(&mut io, &script.mail_reply)?;
        } else if upper.starts_with("RCPT TO:") {
            if mail.is_none() {
                reply(&mut io, "503 5.5.1 Need MAIL first")?;
                continue;
            }
            if script.rcpt_reply.starts_with('2') {
                rcpts.push(text["RCPT TO:".len()..].trim_matches(['<', '>']).to_owned());
            }
            reply(&mut io, &script.rcpt_reply)?;
        } else if upper == "DATA" {
            if mail.is_none() || rcpts.is_empty() {
                reply(&mut io, "554 5.5.1 No valid recipients")?;
                continue;
            }
            reply(&mut io, "354 End data with <CR><LF>.<CR><LF>")?;
            let mut raw = Vec::new();
            loop {
                let mut l = Vec::new();
                if io.read_line(&mut l)? == 0 {
                    event("client closed in data".into());
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                raw.extend_from_slice(&l);
                if script.drop_in_data_after.is_some_and(|n| raw.len() >= n) {
                    event(format!("dropped in data after {} octets", raw.len()));
                    let _ = io.tcp().shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
            }
            if script.stall == Some(Stall::DataEnd) {
                return stall(&mut io, Stall::DataEnd);
            }
            if script.data_end_reply.starts_with('2') {
                txns.lock().unwrap().push(FaultTxn {
                    mail: mail.take().unwrap_or_default(),
                    rcpts: std::mem::take(&mut rcpts),
                    raw_data: raw,
                    tls,
                    tls_version: io.tls_version(),
                    at: Instant::now(),
                });
            }
            mail = None;
            rcpts.clear();
            reply(&mut io, &script.data_end_reply)?;
        } else if upper == "RSET" {
            mail = None;
            rcpts.clear();
            reply(&mut io, "250 2.0.0 Ok")?;
        } else if upper == "NOOP" {
            reply(&mut io, "250 2.0.0 Ok")?;
        } else if upper == "QUIT" {
            reply(&mut io, "221 2.0.0 Bye")?;
            return Ok(());
        } else {
            reply(&mut io, "502 5.5.2 Command not implemented")?;
        }
    }
}

/// A rustls server configuration with a self-signed certificate made now by rcgen for
/// `names`; with `expired`, valid only in the year 2000 (a client that verified it would fail).
pub fn test_tls_server_config(names: &[&str], expired: bool) -> std::sync::Arc<rustls::ServerConfig> {
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2000, 12, 31);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let key_der =
        rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()));
    let cfg =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .unwrap();
    std::sync::Arc::new(cfg)
}

/// `EHLO` + `ETRN <arg>` on a fresh connection: the reply and how long the ETRN command took
/// (from sending it to the complete reply).
pub fn timed_etrn(relay: &Relay, arg: &str) -> (String, Duration) {
    let mut c = relay.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let t0 = Instant::now();
    let r = c.cmd(&format!("ETRN {arg}"));
    let took = t0.elapsed();
    c.cmd("QUIT");
    (r, took)
}

/// Waits until the log has `n` lines with `queue run finished` for `node`; panics with the log.
pub fn wait_run_finished(relay: &Relay, node: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if relay.log_lines_with(&["queue run finished", &format!("node={node}")]) >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "queue run {n} of {node} did not finish within {within:?}; log:\n{}",
        relay.log()
    );
}

// ---- additions for the hardening tests (tests/hardening_input.rs, starttls.rs, shutdown.rs) ---

impl SmtpClient {
    /// The plain socket, for a TLS upgrade after `220` to STARTTLS. Panics if the reader had
    /// already buffered bytes past the last reply (they would be lost).
    pub fn into_stream(self) -> TcpStream {
        assert!(
            self.reader.buffer().is_empty(),
            "bytes buffered beyond the last reply: {:?}",
            String::from_utf8_lossy(self.reader.buffer())
        );
        self.stream
    }

    /// Bytes read from the socket but not yet returned as a reply.
    pub fn buffered(&self) -> &[u8] {
        self.reader.buffer()
    }

    /// Reads `n` replies.
    pub fn read_replies(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.read_reply()).collect()
    }
}

impl Relay {
    /// The relay's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay running").id()
    }

    /// Sends a signal without waiting for anything.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our own child.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit and returns its status; panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("relay running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            if Instant::now() > deadline {
                panic!("relay did not exit within {within:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A `/proc/<pid>/status` field in KiB (e.g. `VmRSS`, `VmHWM`).
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
    }

    /// Open file descriptors of the relay process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Raises this process's RLIMIT_NOFILE soft limit to at least `want` (up to the hard limit);
/// processes started afterwards (the relay) inherit it. Returns the new soft limit.
pub fn raise_nofile_limit(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit on a zeroed struct of the right type.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &r),
                0,
                "setrlimit: {}",
                std::io::Error::last_os_error()
            );
        }
        r.rlim_cur
    }
}

/// Like [`connect_from`], but an error instead of a panic (for a peer that may be down).
pub fn try_connect_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a fresh socket owned by the TcpStream at once; sockaddr_in of the size passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sin(src, 0);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(*dst.ip(), dst.port());
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

impl SmtpClient {
    /// Reads one (possibly multi-line) reply as raw bytes, CRLFs included (for replies that
    /// might not be UTF-8). Empty on EOF.
    pub fn read_reply_bytes(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let start = all.len();
            match self.reader.read_until(b'\n', &mut all) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            if all.get(start + 3) != Some(&b'-') {
                return all;
            }
        }
    }
}

/// A self-signed certificate for `relay.test` written to `dir` as `cert.pem`/`key.pem`;
/// returns the `[tls]` section that configures it and the certificate (DER) for clients.
pub fn test_certificate(dir: &Path) -> (String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["relay.test".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (
        format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display()),
        ck.cert.der().to_vec(),
    )
}

/// A rustls client configuration that trusts exactly `cert_der`.
pub fn tls_client_config(cert_der: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .unwrap();
    let cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    std::sync::Arc::new(cfg)
}

/// An SMTP client inside TLS (after STARTTLS), blocking, over std sockets.
pub struct TlsSmtpClient {
    reader: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl TlsSmtpClient {
    /// Runs the TLS handshake as `relay.test` on a socket whose STARTTLS got `220`.
    pub fn handshake(stream: TcpStream, cert_der: &[u8]) -> std::io::Result<TlsSmtpClient> {
        let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
        let conn = rustls::ClientConnection::new(tls_client_config(cert_der), name).map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, stream);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(TlsSmtpClient {
            reader: BufReader::new(tls),
        })
    }

    /// The TLS connection (protocol version, cipher suite...).
    pub fn connection(&self) -> &rustls::ClientConnection {
        &self.reader.get_ref().conn
    }

    pub fn set_read_timeout(&self, d: Duration) {
        self.reader.get_ref().sock.set_read_timeout(Some(d)).unwrap();
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let s = self.reader.get_mut();
        s.write_all(bytes).unwrap();
        s.flush().unwrap();
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    /// One (possibly multi-line) reply, lines joined with '\n'; empty on EOF or error.
    pub fn read_reply(&mut self) -> String {
        read_reply_from(&mut self.reader)
    }

    /// Reads until the server ends the connection (close_notify, EOF or reset) and returns
    /// what came and how long it took; panics after `within`.
    pub fn read_until_closed(&mut self, within: Duration) -> (String, Duration) {
        let t0 = Instant::now();
        self.set_read_timeout(within);
        let mut s = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => s.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    break
                }
                Err(e) => panic!(
                    "server did not close the TLS connection within {within:?} ({e}); got {:?}",
                    String::from_utf8_lossy(&s)
                ),
            }
        }
        (String::from_utf8_lossy(&s).into_owned(), t0.elapsed())
    }

    /// MAIL, RCPTs, DATA with `body` (dot-stuffed here); returns the final reply.
    pub fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> String {
        send_mail_via(self, from, rcpts, body)
    }
}

impl SmtpClient {
    /// EHLO, STARTTLS (expects 220) and the TLS handshake.
    pub fn starttls(mut self, cert_der: &[u8]) -> TlsSmtpClient {
        let r = self.cmd("EHLO client.test");
        assert!(r.contains("STARTTLS"), "STARTTLS not offered: {r}");
        let r = self.cmd("STARTTLS");
        assert_eq!(r, "220 2.0.0 Ready to start TLS");
        TlsSmtpClient::handshake(self.into_stream(), cert_der).expect("TLS handshake")
    }
}
