//! MX resolution for the outbound delivery of queued mail.
//!
//! This module owns everything between a recipient domain and the list of hosts (with
//! addresses) that delivery should try, best first:
//! - building DNS queries and reading answers with `hickory-proto` (wire format only; no
//!   hickory resolver),
//! - sending them to the configured nameservers (or those of `/etc/resolv.conf`) over
//!   glommio's own UDP sockets, retrying over TCP when an answer is truncated, with a
//!   timeout per attempt and retries across servers,
//! - the MX rules of RFC 5321 section 5.1 (preference order, equal preferences shuffled,
//!   implicit MX, never relaying to ourselves), null MX (RFC 7505) and CNAME following,
//! - a per-shard cache of answers that honours TTLs (RFC 2308 for negative answers).
//!
//! It must not touch anything else: no SMTP, no spool or queue state, no configuration
//! parsing, and never the system's blocking resolver (`getaddrinfo`, `ToSocketAddrs` with a
//! host name), which would stall the shard's executor. Each shard builds its own
//! [`Resolver`]; it is `Send` but not `Sync` (build it anywhere, then use it from one
//! thread).
//!
//! The pure parts live in submodules: `resolv_conf` (nameserver lines), `mx` (ordering and
//! pruning), `wire` (queries and response interpretation) and `cache`; `transport` holds
//! the socket code.

mod cache;
mod mx;
mod resolv_conf;
mod transport;
mod wire;

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

pub use resolv_conf::nameservers_from_resolv_conf;

use cache::Cache;
use wire::{Data, Outcome, MAX_CNAME_DEPTH};

/// Where nameservers are read from when none are configured.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// How a [`Resolver`] reaches DNS and which names are this relay's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Recursive nameservers to ask, in order. When empty, the `nameserver` lines of
    /// `/etc/resolv.conf` are used (port 53), and if there are none, `127.0.0.1:53`.
    pub nameservers: Vec<SocketAddr>,
    /// Bound on one attempt against one server (the TCP retry of a truncated answer gets
    /// the same bound again). Default 2 s.
    pub timeout: Duration,
    /// Rounds over all nameservers before giving up (0 counts as 1). Default 2.
    pub attempts: u32,
    /// Names this relay is known by. An MX host equal to one of them (case-insensitive,
    /// trailing dot ignored) is dropped together with every MX of equal or worse
    /// preference, so that mail is never relayed to ourselves.
    pub own_hostnames: Vec<String>,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            own_hostnames: Vec::new(),
        }
    }
}

/// One host to deliver to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxTarget {
    /// The MX host name (ASCII, lowercase, no trailing dot); for an implicit MX, the domain.
    pub host: String,
    /// The MX preference (lower is better); 0 for an implicit MX.
    pub preference: u16,
    /// The host's addresses, IPv4 first, then IPv6; never empty.
    pub addrs: Vec<IpAddr>,
}

/// Why no delivery targets could be found for a domain.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Timeout, SERVFAIL, REFUSED, network error, or a CNAME chain longer than allowed:
    /// try again later (the message stays queued).
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
    /// NXDOMAIN for the domain (or the domain is not a valid name): permanent.
    #[error("no such domain: {0}")]
    NoSuchDomain(String),
    /// The domain publishes a null MX (RFC 7505, a single MX with exchange "."): it
    /// accepts no mail. Permanent.
    #[error("domain {0} accepts no mail (null MX)")]
    NullMx(String),
    /// There is nothing to deliver to: every usable MX is this relay itself (it would be
    /// a mail loop), or no MX host has an address, or there is no MX and the domain itself
    /// has no address. Treated as permanent, as RFC 5321 5.1 and common MTAs do (Postfix
    /// bounces these with 5.4.4). Whenever a temporary failure could explain the missing
    /// addresses, [`DnsError::Temporary`] is returned instead.
    #[error("no delivery target: {0}")]
    NoTargets(String),
}

impl DnsError {
    /// Whether the failure is permanent (bounce) rather than temporary (defer and retry).
    /// Only [`DnsError::Temporary`] is not.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DnsError::Temporary(_))
    }
}

/// MX resolver for one shard: nameservers, own names and a TTL cache.
///
/// Not `Sync` (the cache is a `RefCell`); share it inside a shard with `Rc`. Every method
/// takes `&self`.
#[derive(Debug)]
pub struct Resolver {
    nameservers: Vec<SocketAddr>,
    timeout: Duration,
    attempts: u32,
    own_hostnames: Vec<String>,
    cache: RefCell<Cache>,
}

impl Resolver {
    /// Builds a resolver. With no configured nameservers this reads `/etc/resolv.conf`
    /// with blocking `std::fs` (construction happens once per shard at start-up).
    pub fn new(cfg: ResolverConfig) -> Resolver {
        let mut nameservers = cfg.nameservers;
        if nameservers.is_empty() {
            match std::fs::read_to_string(RESOLV_CONF) {
                Ok(text) => nameservers = nameservers_from_resolv_conf(&text),
                Err(e) => tracing::warn!(error = %e, "cannot read {RESOLV_CONF}"),
            }
            if nameservers.is_empty() {
                nameservers.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53));
            }
        }
        Resolver {
            nameservers,
            timeout: cfg.timeout,
            attempts: cfg.attempts.max(1),
            own_hostnames: cfg
                .own_hostnames
                .iter()
                .map(|h| mx::normalize_host(h))
                .filter(|h| !h.is_empty())
                .collect(),
            cache: RefCell::new(Cache::new(cache::DEFAULT_CAPACITY)),
        }
    }

    /// The nameservers this resolver asks, in order.
    pub fn nameservers(&self) -> &[SocketAddr] {
        &self.nameservers
    }

    /// Delivery targets for `domain`, best first.
    ///
    /// MX hosts are sorted by preference, equal preferences in random order; hosts that
    /// are this relay (see [`ResolverConfig::own_hostnames`]) and everything at or after
    /// their preference are dropped; each host comes with its A then AAAA addresses (from
    /// the answer's additional section when present, else looked up), and hosts without
    /// an address are left out. Without MX records the domain itself is the single target
    /// with preference 0 (implicit MX). CNAMEs are followed up to 8 links.
    pub async fn mx_targets(&self, domain: &str) -> Result<Vec<MxTarget>, DnsError> {
        let domain = wire::domain_key(domain).map_err(DnsError::NoSuchDomain)?;
        match self.lookup(&domain, RecordType::MX).await? {
            Outcome::NxDomain => Err(DnsError::NoSuchDomain(domain)),
            Outcome::NoData | Outcome::Alias(_) => self.implicit_mx(domain).await,
            Outcome::Records { data, glue } => {
                let records: Vec<(u16, String)> = data
                    .into_iter()
                    .filter_map(|d| match d {
                        Data::Mx(p, h) => Some((p, h)),
                        Data::Addr(_) => None,
                    })
                    .collect();
                let mut rng = fastrand::Rng::new();
                let hosts = mx::order_mx(&domain, &records, &self.own_hostnames, &mut rng)?;
                self.resolve_hosts(&domain, hosts, &glue).await
            }
        }
    }

    /// RFC 5321 5.1: no MX, so the domain's own addresses, as preference 0.
    async fn implicit_mx(&self, domain: String) -> Result<Vec<MxTarget>, DnsError> {
        if self.own_hostnames.contains(&domain) {
            return Err(DnsError::NoTargets(format!(
                "{domain}: no MX and the domain is this host; mail would loop"
            )));
        }
        let addrs = self.host_addrs(&domain).await?;
        if addrs.is_empty() {
            return Err(DnsError::NoTargets(format!("{domain}: no MX record and no address")));
        }
        Ok(vec![MxTarget {
            host: domain,
            preference: 0,
            addrs,
        }])
    }

    /// Addresses for each ordered MX host; hosts without any are left out.
    async fn resolve_hosts(
        &self,
        domain: &str,
        hosts: Vec<(u16, String)>,
        glue: &[(String, IpAddr)],
    ) -> Result<Vec<MxTarget>, DnsError> {
        let mut targets = Vec::with_capacity(hosts.len());
        let mut temporary: Option<DnsError> = None;
        for (preference, host) in hosts {
            let mut addrs: Vec<IpAddr> = glue.iter().filter(|(h, _)| *h == host).map(|(_, a)| *a).collect();
            if addrs.is_empty() {
                match self.host_addrs(&host).await {
                    Ok(a) => addrs = a,
                    Err(e) => {
                        tracing::debug!(%domain, %host, error = %e, "MX host lookup failed");
                        temporary = Some(e);
                    }
                }
            }
            addrs.sort_by_key(|a| a.is_ipv6()); // stable: IPv4 first, order kept
            if !addrs.is_empty() {
                targets.push(MxTarget {
                    host,
                    preference,
                    addrs,
                });
            }
        }
        if targets.is_empty() {
            return Err(
                temporary.unwrap_or_else(|| DnsError::NoTargets(format!("{domain}: no MX host has an address")))
            );
        }
        Ok(targets)
    }

    /// A then AAAA addresses of `host` (queried together). Empty when the name does not
    /// exist or has none; [`DnsError::Temporary`] only when a lookup failed temporarily
    /// and the other found nothing.
    async fn host_addrs(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let (v4, v6) =
            futures_lite::future::zip(self.lookup(host, RecordType::A), self.lookup(host, RecordType::AAAA)).await;
        let mut addrs = Vec::new();
        let mut temporary = None;
        for result in [v4, v6] {
            match result {
                Ok(Outcome::Records { data, .. }) => {
                    addrs.extend(data.into_iter().filter_map(|d| match d {
                        Data::Addr(a) => Some(a),
                        Data::Mx(..) => None,
                    }));
                }
                Ok(_) => {}
                Err(e @ DnsError::Temporary(_)) => temporary = Some(e),
                Err(_) => {}
            }
        }
        match temporary {
            Some(e) if addrs.is_empty() => Err(e),
            _ => Ok(addrs),
        }
    }

    /// The answer for `(name, rtype)`, following CNAMEs across queries (at most
    /// [`MAX_CNAME_DEPTH`] hops). Never returns [`Outcome::Alias`].
    async fn lookup(&self, name: &str, rtype: RecordType) -> Result<Outcome, DnsError> {
        let mut current = name.to_owned();
        for _ in 0..=MAX_CNAME_DEPTH {
            match self.query_cached(&current, rtype).await? {
                Outcome::Alias(target) => current = target,
                other => return Ok(other),
            }
        }
        Err(DnsError::Temporary(format!(
            "{name} {rtype}: CNAME chain longer than {MAX_CNAME_DEPTH}"
        )))
    }

    /// One query, answered from the cache when possible. Temporary failures are never
    /// cached.
    async fn query_cached(&self, name: &str, rtype: RecordType) -> Result<Outcome, DnsError> {
        let cached = self.cache.borrow().get(name, rtype, Instant::now());
        if let Some(outcome) = cached {
            return Ok(outcome);
        }
        let qname = wire::key_name(name)?;
        let msg = transport::exchange(&self.nameservers, self.timeout, self.attempts, &qname, rtype).await?;
        let interpreted = wire::interpret(&msg, name, rtype)?;
        self.cache.borrow_mut().insert(
            name,
            rtype,
            interpreted.outcome.clone(),
            interpreted.ttl,
            Instant::now(),
        );
        Ok(interpreted.outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::tests::{a, mx, response};
    use glommio::net::UdpSocket;
    use hickory_proto::op::{Message, ResponseCode};
    use std::rc::Rc;

    #[test]
    fn permanence() {
        assert!(!DnsError::Temporary("x".into()).is_permanent());
        assert!(DnsError::NoSuchDomain("x".into()).is_permanent());
        assert!(DnsError::NullMx("x".into()).is_permanent());
        assert!(DnsError::NoTargets("x".into()).is_permanent());
    }

    #[test]
    fn config_defaults() {
        let c = ResolverConfig::default();
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.attempts, 2);
        assert!(c.nameservers.is_empty());
        // Empty nameservers: read from resolv.conf, never left empty.
        let r = Resolver::new(c);
        assert!(!r.nameservers().is_empty());
    }

    /// A fake nameserver answering from `answer(qname, qtype)`; counts the queries.
    fn fake_server(
        answer: impl Fn(&str, RecordType, u16) -> Message + 'static,
    ) -> (SocketAddr, Rc<std::cell::Cell<u32>>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let count = Rc::new(std::cell::Cell::new(0));
        let c = count.clone();
        glommio::spawn_local(async move {
            let mut buf = vec![0u8; 512];
            loop {
                let Ok((len, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let q = Message::from_vec(&buf[..len]).unwrap();
                let query = &q.queries()[0];
                c.set(c.get() + 1);
                let r = answer(&query.name().to_ascii(), query.query_type(), q.id());
                let _ = sock.send_to(&r.to_vec().unwrap(), peer).await;
            }
        })
        .detach();
        (addr, count)
    }

    #[test]
    fn null_mx_and_cache_over_fake_server() {
        glommio::LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .spawn(|| async {
                let (addr, count) = fake_server(|qname, qtype, id| {
                    let mut r = response(id, qname, qtype, ResponseCode::NoError);
                    match (qname, qtype) {
                        ("null.example.", RecordType::MX) => {
                            r.add_answer(mx(qname, 300, 0, "."));
                        }
                        ("d.example.", RecordType::MX) => {
                            r.add_answer(mx(qname, 300, 10, "mx.d.example."));
                        }
                        ("mx.d.example.", RecordType::A) => {
                            r.add_answer(a(qname, 300, "192.0.2.10"));
                        }
                        _ => {}
                    }
                    r
                });
                let resolver = Resolver::new(ResolverConfig {
                    nameservers: vec![addr],
                    timeout: Duration::from_millis(500),
                    ..ResolverConfig::default()
                });
                let err = resolver.mx_targets("NULL.example.").await.unwrap_err();
                assert!(matches!(err, DnsError::NullMx(ref d) if d == "null.example"));

                let want = vec![MxTarget {
                    host: "mx.d.example".into(),
                    preference: 10,
                    addrs: vec!["192.0.2.10".parse().unwrap()],
                }];
                assert_eq!(resolver.mx_targets("d.example").await.unwrap(), want);
                let queries = count.get();
                assert_eq!(queries, 4, "null MX, d MX, mx A, mx AAAA");
                // Second time from the cache (MX, A, and the negative AAAA has no SOA so
                // it is asked again).
                assert_eq!(resolver.mx_targets("d.example").await.unwrap(), want);
                assert_eq!(count.get(), queries + 1);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
