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
        let config = format!(
            "hostname = \"relay.test\"\nspool_dir = \"{}\"\nspool_segment_size = 1048576\n{top}\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{smtp_extra}\n{rest}\n",
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
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        dir
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
        let mut all = Vec::new();
        loop {
            let mut l = String::new();
            match self.reader.read_line(&mut l) {
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

    /// Reads until EOF (the server closed), returning what came.
    pub fn read_to_end(&mut self) -> String {
        let mut s = String::new();
        let _ = self.reader.read_to_string(&mut s);
        s
    }

    /// EHLO, MAIL, RCPTs, DATA with `body` (dot-stuffed here), returns the final reply.
    pub fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "MAIL: {r}");
        for t in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert!(r.starts_with("250"), "RCPT {t}: {r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send(&dot_stuff(body));
        self.send(b".\r\n");
        self.read_reply()
    }
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
