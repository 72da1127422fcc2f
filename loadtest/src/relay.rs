//! `--spawn-relay`: everything the harness starts besides its own executors.
//!
//! - [`DnsStub`]: a `dnsmasq` on 127.0.0.1 serving `nodeN.test MX 10 mx.nodeN.test` and
//!   `mx.nodeN.test A 127.0.x.y` for every dial-up node, so the relay's MX lookups lead to the
//!   harness's sinks.
//! - [`SpawnedRelay`]: writes the relay's configuration for the scenario (spool in a temporary
//!   directory, the nodes, `[dns] nameservers` = the stub, `[delivery] port` = the sinks' port),
//!   starts `etrn-relay serve`, optionally pinned to `--cores` CPUs, restarts it (recovery time)
//!   and reads its memory use from `/proc`.
//!
//! Both children get `PR_SET_PDEATHSIG`, so an interrupted harness leaves nothing running.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etrn::user_of;
use crate::net::{node_ip, node_name};
use crate::proto::AuthMech;

/// Path of an external tool in the usual system directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ]
    .iter()
    .map(|d| Path::new(d).join(name))
    .find(|p| p.exists())
}

fn die_with_parent(cmd: &mut Command, cpus: Option<Vec<usize>>) {
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if let Some(cpus) = &cpus {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for c in cpus {
                    libc::CPU_SET(*c, &mut set);
                }
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A DNS query for `name` (type `qtype`), id 0x4c54.
fn dns_query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x4c, 0x54, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// dnsmasq serving the dial-up nodes' MX records.
pub struct DnsStub {
    child: Child,
    /// UDP/TCP port on 127.0.0.1.
    pub port: u16,
}

impl DnsStub {
    /// Starts dnsmasq for nodes `0..dialup` with its configuration file in `dir`.
    pub fn start(dialup: usize, dir: &Path) -> Result<DnsStub, String> {
        let bin = find_tool("dnsmasq").ok_or(
            "dnsmasq is not installed; --spawn-relay needs it as the relay's DNS server: apt-get install dnsmasq-base",
        )?;
        let conf = dir.join("dnsmasq.conf");
        let mut text = String::with_capacity(dialup * 80);
        for k in 0..dialup {
            let n = node_name(k);
            text.push_str(&format!("mx-host={n},mx.{n},10\nhost-record=mx.{n},{}\n", node_ip(k)));
        }
        std::fs::write(&conf, text).map_err(|e| format!("write {}: {e}", conf.display()))?;
        let mut last = String::new();
        for _ in 0..10 {
            let port = free_udp_tcp_port();
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
                "--local-ttl=3600",
                "--pid-file=",
            ])
            .arg(format!("--conf-file={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
            if unsafe { libc::geteuid() } == 0 {
                cmd.arg("--user=root");
            }
            die_with_parent(&mut cmd, None);
            let mut child = cmd.spawn().map_err(|e| format!("start {}: {e}", bin.display()))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let probe = dns_query(if dialup > 0 { "node1.test" } else { "x.test" }, 15);
            while Instant::now() < deadline {
                if let Ok(Some(st)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    last = format!("dnsmasq exited ({st}): {}", err.trim());
                    break;
                }
                let _ = sock.send_to(&probe, ("127.0.0.1", port));
                let mut b = [0u8; 512];
                if let Ok((n, _)) = sock.recv_from(&mut b) {
                    if n >= 12 && b[0] == 0x4c && b[1] == 0x54 {
                        return Ok(DnsStub { child, port });
                    }
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(format!("dnsmasq would not start: {last}"))
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_tcp_port() -> u16 {
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket on loopback");
        let p = u.local_addr().expect("local address").port();
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// How to configure and run the relay.
#[derive(Debug, Clone)]
pub struct RelayOpts {
    /// The `etrn-relay` binary.
    pub bin: PathBuf,
    /// Nodes to configure.
    pub nodes: usize,
    /// Dial-up nodes (with MX records and, for `plain`, `static_ip`).
    pub dialup: usize,
    /// Protected-queue mode of every node.
    pub auth: AuthMech,
    /// Password of every node.
    pub password: String,
    /// Port of the sinks (`[delivery] port`).
    pub sink_port: u16,
    /// The DNS stub's port.
    pub dns_port: u16,
    /// CPUs the relay may run on (its `shards` is then their number).
    pub cpus: Option<Vec<usize>>,
    /// `shards` (0: one per CPU).
    pub shards: usize,
    /// `[smtp] max_connections`.
    pub max_connections: usize,
    /// `ETRN_RELAY_LOG`.
    pub log_level: String,
    /// Extra top-level TOML keys (e.g. `placement = "pinned"`).
    pub extra_top: String,
    /// Extra `[delivery]` keys.
    pub extra_delivery: String,
}

/// The relay started by the harness.
pub struct SpawnedRelay {
    opts: RelayOpts,
    /// Configuration file.
    pub config_path: PathBuf,
    /// Log file (stderr of every start, appended).
    pub log_path: PathBuf,
    /// SMTP address.
    pub addr: SocketAddr,
    child: Option<Child>,
    /// Exit status of the last process stopped (or found dead) by [`SpawnedRelay::stop`].
    pub last_status: Option<std::process::ExitStatus>,
}

impl SpawnedRelay {
    /// Writes the configuration into `dir` and starts the relay; returns it and the start-up
    /// time (spawn to the first 220).
    pub fn start(opts: RelayOpts, dir: &Path) -> Result<(SpawnedRelay, Duration), String> {
        if !opts.bin.exists() {
            return Err(format!(
                "relay binary {} not found: build it with `cargo build --release -p etrn-relay` or pass --relay-bin",
                opts.bin.display()
            ));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let config_path = dir.join("relay.toml");
        std::fs::write(&config_path, config_text(&opts, dir, port)).map_err(|e| e.to_string())?;
        let mut r = SpawnedRelay {
            opts,
            config_path,
            log_path: dir.join("relay.log"),
            addr,
            child: None,
            last_status: None,
        };
        let t = r.launch()?;
        Ok((r, t))
    }

    fn launch(&mut self) -> Result<Duration, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.opts.bin);
        cmd.args(["serve", "--config"])
            .arg(&self.config_path)
            .env("ETRN_RELAY_LOG", &self.opts.log_level)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut cmd, self.opts.cpus.clone());
        let t0 = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.opts.bin.display()))?;
        self.child = Some(child);
        let deadline = t0 + Duration::from_secs(600);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "the relay exited during start-up ({st}); log:\n{}",
                        self.log_tail(30)
                    ));
                }
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut b = [0u8; 3];
                if s.read_exact(&mut b).is_ok() && &b == b"220" {
                    let elapsed = t0.elapsed();
                    let _ = s.write_all(b"QUIT\r\n");
                    // the other shards bind their listeners at about the same time
                    std::thread::sleep(Duration::from_millis(100));
                    return Ok(elapsed);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err("the relay did not answer within 600 s".into())
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then wait (SIGKILL after 60 s). Returns how long the exit took.
    pub fn stop(&mut self) -> Duration {
        let t0 = Instant::now();
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = t0 + Duration::from_secs(60);
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    self.last_status = Some(st);
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    self.last_status = c.wait().ok();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        t0.elapsed()
    }

    /// Stops and starts again on the same spool; returns the time from spawn to the first 220
    /// (the recovery scan runs before the relay listens).
    pub fn restart(&mut self) -> Result<Duration, String> {
        self.stop();
        self.launch()
    }

    /// (VmRSS, RssAnon) in bytes.
    pub fn rss(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map(|v| v * 1024)
        };
        Some((kb("VmRSS:")?, kb("RssAnon:").unwrap_or(0)))
    }

    /// Total messages the relay's own `queue` command lists (read-only spool scan).
    pub fn queued_total(&self) -> Result<u64, String> {
        let out = Command::new(&self.opts.bin)
            .args(["queue", "--config"])
            .arg(&self.config_path)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some("total"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .ok_or_else(|| "no total line in `etrn-relay queue` output".into())
    }

    /// The last `n` lines of the relay's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for SpawnedRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The relay configuration for a scenario.
pub fn config_text(o: &RelayOpts, dir: &Path, port: u16) -> String {
    let auth = match o.auth {
        AuthMech::None => "none",
        AuthMech::Plain => "plain",
        AuthMech::CramMd5 => "md5",
    };
    let mut t = format!(
        "# written by etrn-loadtest\nhostname = \"relay.test\"\nspool_dir = \"{}\"\nshards = {}\n{}\n\
         [smtp]\nlisten = [\"127.0.0.1:{port}\"]\nmax_connections = {}\nallow_plaintext_auth = {}\n\
         [dns]\nnameservers = [\"127.0.0.1:{}\"]\n[delivery]\nport = {}\n{}\n",
        dir.join("spool").display(),
        o.shards,
        o.extra_top,
        o.max_connections,
        o.auth == AuthMech::Plain,
        o.dns_port,
        o.sink_port,
        o.extra_delivery,
    );
    for k in 0..o.nodes {
        t.push_str(&format!("[[node]]\nname = \"{}\"\n", node_name(k)));
        if o.auth != AuthMech::None {
            t.push_str(&format!(
                "auth = \"{auth}\"\nuser = \"{}\"\npassword = \"{}\"\n",
                user_of(k),
                o.password
            ));
            if o.auth == AuthMech::Plain && k < o.dialup {
                t.push_str(&format!("static_ip = \"{}\"\n", node_ip(k)));
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_nodes_dns_and_delivery_port() {
        let o = RelayOpts {
            bin: "/nonexistent".into(),
            nodes: 3,
            dialup: 2,
            auth: AuthMech::Plain,
            password: "pw".into(),
            sink_port: 2626,
            dns_port: 5353,
            cpus: None,
            shards: 1,
            max_connections: 500,
            log_level: "warn".into(),
            extra_top: String::new(),
            extra_delivery: "connections_per_node = 8".into(),
        };
        let t = config_text(&o, Path::new("/tmp/x"), 2525);
        for want in [
            "listen = [\"127.0.0.1:2525\"]",
            "nameservers = [\"127.0.0.1:5353\"]",
            "port = 2626",
            "connections_per_node = 8",
            "allow_plaintext_auth = true",
            "name = \"node3.test\"",
            "static_ip = \"127.0.1.2\"",
            "user = \"node1\"",
        ] {
            assert!(t.contains(want), "{want} missing in\n{t}");
        }
        assert_eq!(t.matches("static_ip").count(), 2);
    }

    #[test]
    fn dns_query_shape() {
        let q = dns_query("node1.test", 15);
        assert_eq!(&q[12..], b"\x05node1\x04test\x00\x00\x0f\x00\x01");
    }
}
