//! `etrn_relay::dns` against a real `dnsmasq` on 127.0.0.1 (ephemeral port, local zone
//! `test.` only, no upstream): MX order and shuffle, implicit MX, NXDOMAIN, own-hostname
//! pruning, null MX, CNAME, TCP retry of truncated answers, the cache, and timeouts.
//!
//! Needs `dnsmasq` (Debian: `apt-get install dnsmasq-base`); fails loudly without it.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etrn_relay::dns::{DnsError, MxTarget, Resolver, ResolverConfig};

/// A running dnsmasq, killed on drop.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The dnsmasq binary, searched in PATH and the sbin directories.
fn dnsmasq_binary() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("dnsmasq"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "dnsmasq is not installed; this test needs it. \
                 Install it with: apt-get install dnsmasq-base"
            )
        })
}

/// The zone served: every record the tests rely on.
fn zone_args() -> Vec<String> {
    let mut a: Vec<String> = [
        // multi.test: one best, three equal, one worst.
        "--mx-host=multi.test,mx1.test,10",
        "--mx-host=multi.test,mx2a.test,20",
        "--mx-host=multi.test,mx2b.test,20",
        "--mx-host=multi.test,mx2c.test,20",
        "--mx-host=multi.test,mx3.test,30",
        "--host-record=mx1.test,127.0.0.2",
        "--host-record=mx2a.test,127.0.0.3,::3",
        "--host-record=mx2b.test,127.0.0.4",
        "--host-record=mx2c.test,127.0.0.5",
        "--host-record=mx3.test,127.0.0.6",
        // plain.test: no MX, addresses only (implicit MX).
        "--host-record=plain.test,127.0.0.9,::9",
        // own.test: we are relay.test at preference 20.
        "--mx-host=own.test,better.test,10",
        "--mx-host=own.test,relay.test,20",
        "--mx-host=own.test,worse.test,30",
        "--host-record=better.test,127.0.0.10",
        "--host-record=relay.test,127.0.0.11",
        "--host-record=worse.test,127.0.0.12",
        // ownbest.test: we are the best MX.
        "--mx-host=ownbest.test,relay.test,10",
        "--mx-host=ownbest.test,worse.test,20",
        // nullmx.test: RFC 7505.
        "--mx-host=nullmx.test,.,0",
        // alias.test -> multi.test; alias2.test -> plain.test (implicit MX through CNAME).
        "--cname=alias.test,multi.test",
        "--cname=alias2.test,plain.test",
        // noaddr.test: the only MX host has no address.
        "--mx-host=noaddr.test,ghost.test,10",
        // partial.test: the best MX host has no address, the second does.
        "--mx-host=partial.test,ghost.test,10",
        "--mx-host=partial.test,mx3.test,20",
    ]
    .map(String::from)
    .to_vec();
    // big.test: 40 MX records, too big for 512 bytes of UDP: truncated, then TCP.
    for i in 1..=40 {
        a.push(format!("--mx-host=big.test,mail-exchanger-{i}.big.test,{i}"));
        a.push(format!("--host-record=mail-exchanger-{i}.big.test,127.0.1.{i}"));
    }
    a
}

impl Dnsmasq {
    /// Starts dnsmasq on a free loopback port and waits until it accepts TCP.
    fn start() -> Dnsmasq {
        let bin = dnsmasq_binary();
        for _ in 0..10 {
            let port = {
                let udp = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
                let port = udp.local_addr().unwrap().port();
                // dnsmasq also listens on TCP on the same port.
                if TcpListener::bind(("127.0.0.1", port)).is_err() {
                    continue;
                }
                port
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let child = Command::new(&bin)
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    &format!("--port={port}"),
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--local=/test/",
                    "--local-ttl=300",
                    "--user=root",
                    "--pid-file=",
                    "--log-facility=-",
                ])
                .args(zone_args())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {bin:?} ({e}); install it with: apt-get install dnsmasq-base"));
            let mut d = Dnsmasq { child, addr };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = d.child.try_wait() {
                    eprintln!("dnsmasq on port {port} exited with {status}; retrying");
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return d;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(d);
        }
        panic!("could not start dnsmasq on a free loopback port");
    }

    fn resolver(&self, own: &[&str]) -> Resolver {
        Resolver::new(ResolverConfig {
            nameservers: vec![self.addr],
            timeout: Duration::from_secs(2),
            attempts: 2,
            own_hostnames: own.iter().map(|s| s.to_string()).collect(),
        })
    }
}

/// Runs `f` on a fresh glommio executor.
fn run<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .spawn(f)
        .expect("start executor")
        .join()
        .expect("executor thread");
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn hosts(targets: &[MxTarget]) -> Vec<&str> {
    targets.iter().map(|t| t.host.as_str()).collect()
}

#[test]
fn mx_order_shuffle_cname_and_tcp() {
    let dns = Dnsmasq::start();
    let resolver = dns.resolver(&[]);
    run(move || async move {
        let mut middle_orders = HashSet::new();
        for _ in 0..60 {
            let t = resolver.mx_targets("Multi.Test.").await.expect("multi.test");
            let prefs: Vec<u16> = t.iter().map(|t| t.preference).collect();
            assert_eq!(prefs, [10, 20, 20, 20, 30]);
            assert_eq!(t[0].host, "mx1.test");
            assert_eq!(t[0].addrs, [ip("127.0.0.2")]);
            assert_eq!(t[4].host, "mx3.test");
            let mut middle: Vec<&str> = hosts(&t[1..4]);
            middle_orders.insert(middle.join(","));
            middle.sort_unstable();
            assert_eq!(middle, ["mx2a.test", "mx2b.test", "mx2c.test"]);
            let a = t.iter().find(|t| t.host == "mx2a.test").unwrap();
            assert_eq!(a.addrs, [ip("127.0.0.3"), ip("::3")], "IPv4 first");
        }
        assert!(
            middle_orders.len() >= 3,
            "equal preferences are shuffled: {middle_orders:?}"
        );

        // CNAME to a domain with MX records.
        let t = resolver.mx_targets("alias.test").await.expect("alias.test");
        assert_eq!(t.len(), 5);
        assert_eq!(t[0].host, "mx1.test");

        // 40 MX records: the UDP answer is truncated, the TCP retry has them all.
        let t = resolver.mx_targets("big.test").await.expect("big.test");
        assert_eq!(t.len(), 40);
        for (i, target) in t.iter().enumerate() {
            let n = i + 1;
            assert_eq!(target.host, format!("mail-exchanger-{n}.big.test"));
            assert_eq!(usize::from(target.preference), n);
            assert_eq!(target.addrs, [ip(&format!("127.0.1.{n}"))]);
        }
    });
}

#[test]
fn implicit_mx_nxdomain_null_mx_and_missing_addresses() {
    let dns = Dnsmasq::start();
    let resolver = dns.resolver(&[]);
    run(move || async move {
        let want = vec![MxTarget {
            host: "plain.test".into(),
            preference: 0,
            addrs: vec![ip("127.0.0.9"), ip("::9")],
        }];
        assert_eq!(resolver.mx_targets("plain.test").await.unwrap(), want);

        // No MX through a CNAME: implicit MX of the domain asked for.
        let t = resolver.mx_targets("alias2.test").await.unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].host, "alias2.test");
        assert_eq!(t[0].preference, 0);
        assert_eq!(t[0].addrs, [ip("127.0.0.9"), ip("::9")]);

        let err = resolver.mx_targets("nonexistent.test").await.unwrap_err();
        assert!(matches!(err, DnsError::NoSuchDomain(_)), "{err}");
        assert!(err.is_permanent());

        let err = resolver.mx_targets("nullmx.test").await.unwrap_err();
        assert!(matches!(err, DnsError::NullMx(ref d) if d == "nullmx.test"), "{err}");
        assert!(err.is_permanent());

        let err = resolver.mx_targets("noaddr.test").await.unwrap_err();
        assert!(matches!(err, DnsError::NoTargets(_)), "{err}");
        assert!(err.is_permanent());

        let t = resolver.mx_targets("partial.test").await.unwrap();
        assert_eq!(hosts(&t), ["mx3.test"]);
        assert_eq!(t[0].preference, 20);
    });
}

#[test]
fn own_hostname_pruning() {
    let dns = Dnsmasq::start();
    let resolver = dns.resolver(&["Relay.Test."]);
    run(move || async move {
        let t = resolver.mx_targets("own.test").await.unwrap();
        assert_eq!(hosts(&t), ["better.test"]);
        assert_eq!(t[0].addrs, [ip("127.0.0.10")]);

        let err = resolver.mx_targets("ownbest.test").await.unwrap_err();
        assert!(matches!(err, DnsError::NoTargets(_)), "{err}");
        assert!(err.is_permanent());

        // Unaffected domains still resolve.
        assert_eq!(resolver.mx_targets("multi.test").await.unwrap().len(), 5);
    });
}

#[test]
fn answers_are_cached_for_their_ttl() {
    let mut dns = Dnsmasq::start();
    let resolver = dns.resolver(&[]);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (stopped_tx, stopped_rx) = std::sync::mpsc::channel::<()>();
    let executor = glommio::LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .spawn(move || async move {
            let first = resolver.mx_targets("multi.test").await.unwrap();
            tx.send(()).unwrap();
            stopped_rx.recv().unwrap();
            // The server is gone; records with a 300 s TTL come from the cache.
            let t0 = Instant::now();
            let again = resolver.mx_targets("multi.test").await.unwrap();
            assert!(t0.elapsed() < Duration::from_secs(1));
            assert_eq!(hosts(&first[..1]), hosts(&again[..1]));
            assert_eq!(again.len(), 5);
            // Unknown names were never cached and the server is gone: temporary.
            let err = resolver.mx_targets("nonexistent.test").await.unwrap_err();
            assert!(matches!(err, DnsError::Temporary(_)), "{err}");
        })
        .unwrap();
    rx.recv().unwrap();
    let _ = dns.child.kill();
    let _ = dns.child.wait();
    stopped_tx.send(()).unwrap();
    executor.join().unwrap();
}

#[test]
fn silent_server_times_out_as_temporary() {
    // A socket that receives queries and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let timeout = Duration::from_millis(300);
    let resolver = Resolver::new(ResolverConfig {
        nameservers: vec![silent.local_addr().unwrap()],
        timeout,
        attempts: 2,
        own_hostnames: vec![],
    });
    run(move || async move {
        let t0 = Instant::now();
        let err = resolver.mx_targets("multi.test").await.unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(err, DnsError::Temporary(_)), "{err}");
        assert!(!err.is_permanent());
        // Two attempts of 300 ms each, and not much more.
        assert!(took >= timeout * 2, "{took:?}");
        assert!(took < timeout * 2 + Duration::from_secs(1), "{took:?}");
    });
    drop(silent);
}
