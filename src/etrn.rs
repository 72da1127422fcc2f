//! ETRN (RFC 1985): argument forms, the access rules of protected queues, routing to the
//! owning shard, and the RFC 1985 replies. The queue run itself is in [`crate::queue_run`].
//!
//! The connection's shard resolves `node`, `@domain` or `#queue` to configured nodes, checks
//! authentication, and sends one request per owning shard (one-way, with a reply channel the
//! owner answers with `try_send`, so the owner never waits on the requester). The owner counts
//! what is queued at that moment, starts a run or joins the one going, and answers at once.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{AuthLimiter, Mechanism, RateLimiter};
use crate::config::{AuthMode, Config, NodeName};
use crate::queue::NodeIdx;
use crate::runtime::{ShardCtx, ShardMsg};
use crate::smtp::reply::Reply;
use crate::smtp::session::Session;

/// A request to the owning shard: count and start runs for these nodes.
#[derive(Debug)]
pub struct EtrnRequest {
    /// Nodes owned by the receiving shard.
    pub nodes: Vec<NodeIdx>,
    /// The address the ETRN came from (delivery target of `md5` nodes).
    pub client_ip: IpAddr,
    /// Whether the client authenticated with CRAM-MD5 as the node (per node, same order).
    pub md5_authenticated: Vec<bool>,
    /// Where the owner sends the counts (same order as `nodes`).
    pub reply: async_channel::Sender<Vec<usize>>,
}

/// ETRN and AUTH abuse limits. One set per running relay, shared by all its shards: each
/// new connection lands on a shard chosen by the kernel (SO_REUSEPORT), so per-shard limits
/// would let an address get around a lock-out (and multiply its guesses and its ETRN rate)
/// just by reconnecting. The mutex is taken only for an ETRN or an AUTH verdict, never on the
/// mail path.
#[derive(Clone)]
pub struct EtrnState {
    shared: Arc<SharedLimits>,
}

struct SharedLimits {
    etrn_rate: Mutex<RateLimiter>,
    /// Addresses that keep flooding past the rate limit: growing delays, then a lock-out.
    etrn_abuse: Mutex<AuthLimiter>,
    auth_failures: Mutex<AuthLimiter>,
}

/// Locks a limiter; a panic elsewhere while it was held leaves it usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for EtrnState {
    fn default() -> Self {
        Self::new()
    }
}

impl EtrnState {
    /// A new set of limits. The runtime creates one and gives every shard a clone.
    pub fn new() -> EtrnState {
        EtrnState {
            shared: Arc::new(SharedLimits {
                etrn_rate: Mutex::new(RateLimiter::new(20, 2.0)),
                // Five refusals within a minute lock the address out of ETRN for five minutes;
                // until then each refusal is answered after 0.1, 0.2, 0.4, 0.8, 1.6 s.
                etrn_abuse: Mutex::new(
                    AuthLimiter::new(5, Duration::from_secs(60), Duration::from_secs(300))
                        .with_delays(Duration::from_millis(100), Duration::from_millis(1600)),
                ),
                auth_failures: Mutex::new(AuthLimiter::new(5, Duration::from_secs(900), Duration::from_secs(900))),
            }),
        }
    }

    /// Takes one ETRN token for `ip`; false when the address is over its rate.
    fn etrn_allowed(&self, ip: IpAddr) -> bool {
        lock(&self.shared.etrn_rate).check(ip, Instant::now())
    }

    /// Records an ETRN refused for flooding; returns the delay before the refusal is sent.
    fn etrn_refused(&self, ip: IpAddr) -> Duration {
        lock(&self.shared.etrn_abuse).record_failure(ip, Instant::now())
    }

    /// Remaining ETRN lock-out of an address that kept flooding.
    pub fn etrn_locked_out(&self, ip: IpAddr) -> Option<Duration> {
        lock(&self.shared.etrn_abuse).is_locked_out(ip, Instant::now())
    }

    /// Remaining lock-out of an address after repeated AUTH failures.
    pub fn auth_locked_out(&self, ip: IpAddr) -> Option<Duration> {
        lock(&self.shared.auth_failures).is_locked_out(ip, Instant::now())
    }

    /// Records a failed AUTH; returns the delay to wait before answering.
    pub fn auth_failure(&self, ip: IpAddr) -> Duration {
        lock(&self.shared.auth_failures).record_failure(ip, Instant::now())
    }

    /// Records a successful AUTH.
    pub fn auth_success(&self, ip: IpAddr) {
        lock(&self.shared.auth_failures).record_success(ip);
    }
}

/// What an ETRN argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `ETRN node`
    Node(NodeName),
    /// `ETRN @domain`: the domain's node and every node below it.
    Domain(NodeName),
    /// `ETRN #queue`
    Queue(String),
}

/// Parses the argument. Err is the reply (500 for none, 501 for bad syntax).
pub fn parse_target(arg: &[u8]) -> Result<Target, Reply> {
    if arg.is_empty() {
        return Err(Reply::new(
            500,
            "5.5.2",
            "Syntax error: ETRN needs a node, @domain or #queue",
        ));
    }
    let bad = || Reply::new(501, "5.5.4", "Syntax error in parameters");
    let s = std::str::from_utf8(arg).map_err(|_| bad())?;
    if s.contains([' ', '\t']) {
        return Err(bad());
    }
    if let Some(q) = s.strip_prefix('#') {
        if q.is_empty() || !q.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)) {
            return Err(bad());
        }
        return Ok(Target::Queue(q.to_owned()));
    }
    if let Some(d) = s.strip_prefix('@') {
        return NodeName::parse(d).map(Target::Domain).ok_or_else(bad);
    }
    NodeName::parse(s).map(Target::Node).ok_or_else(bad)
}

/// Configured nodes a target names.
pub fn resolve_target(cfg: &Config, t: &Target) -> Vec<NodeIdx> {
    let idx = |i: usize| NodeIdx(i as u32);
    match t {
        Target::Node(n) => cfg
            .nodes
            .iter()
            .position(|c| &c.name == n)
            .map(idx)
            .into_iter()
            .collect(),
        Target::Domain(d) => cfg
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                let name = c.name.as_str();
                name == d.as_str()
                    || (name.len() > d.as_str().len()
                        && name.ends_with(d.as_str())
                        && name.as_bytes()[name.len() - d.as_str().len() - 1] == b'.')
            })
            .map(|(i, _)| idx(i))
            .collect(),
        Target::Queue(q) => cfg
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.queue.as_deref() == Some(q.as_str()))
            .map(|(i, _)| idx(i))
            .collect(),
    }
}

/// Whether this session may start `node`'s queue; Err is the reason for 459.
pub fn check_access(cfg: &Config, session: &Session, node: NodeIdx) -> Result<(), &'static str> {
    let n = &cfg.nodes[node.0 as usize];
    let user_ok = || {
        session
            .authenticated
            .as_deref()
            .is_some_and(|u| Some(u) == n.user.as_deref())
    };
    match n.auth {
        AuthMode::None => Ok(()),
        AuthMode::Plain if user_ok() => Ok(()),
        AuthMode::Md5 if user_ok() && session.auth_mechanism == Some(Mechanism::CramMd5) => Ok(()),
        AuthMode::Md5 if user_ok() => Err("CRAM-MD5 authentication required"),
        _ => Err("authentication required"),
    }
}

/// Handles `ETRN arg` on the connection's shard and returns the reply, at once.
pub async fn handle_command(ctx: &Rc<ShardCtx>, session: &Session, arg: &[u8]) -> Reply {
    let label = String::from_utf8_lossy(arg)
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect::<String>();
    let target = match parse_target(arg) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let ip = session.peer().ip();
    if let Some(left) = ctx.etrn.etrn_locked_out(ip) {
        return Reply::owned(
            458,
            "4.7.0",
            format!(
                "Unable to queue messages for node {label}: too many ETRN requests, try again in {} s",
                left.as_secs() + 1
            ),
        );
    }
    if !ctx.etrn.etrn_allowed(ip) {
        let delay = ctx.etrn.etrn_refused(ip);
        glommio::timer::sleep(delay).await;
        return Reply::owned(
            458,
            "4.7.0",
            format!("Unable to queue messages for node {label}: too many ETRN requests, slow down"),
        );
    }
    let nodes = resolve_target(&ctx.cfg, &target);
    if nodes.is_empty() {
        return Reply::owned(
            459,
            "4.1.2",
            format!("Node {label} not allowed: not a node this relay holds mail for"),
        );
    }
    let mut allowed = Vec::new();
    let mut refusal = None;
    for n in nodes {
        match check_access(&ctx.cfg, session, n) {
            Ok(()) => allowed.push(n),
            Err(why) => refusal = Some(why),
        }
    }
    if allowed.is_empty() {
        return Reply::owned(
            459,
            "4.7.1",
            format!("Node {label} not allowed: {}", refusal.unwrap_or("refused")),
        );
    }
    let single = matches!(target, Target::Node(_)) && allowed.len() == 1;
    let md5 = |n: NodeIdx| ctx.cfg.nodes[n.0 as usize].auth == AuthMode::Md5;
    // One request per owning shard.
    let mut by_shard: Vec<(usize, Vec<NodeIdx>)> = Vec::new();
    for n in allowed {
        let o = ctx.owner_of(n);
        match by_shard.iter_mut().find(|(s, _)| *s == o) {
            Some((_, v)) => v.push(n),
            None => by_shard.push((o, vec![n])),
        }
    }
    let mut total = 0usize;
    for (shard, nodes) in by_shard {
        let (tx, rx) = async_channel::bounded(1);
        let req = EtrnRequest {
            md5_authenticated: nodes.iter().map(|n| md5(*n)).collect(),
            nodes,
            client_ip: session.peer().ip(),
            reply: tx,
        };
        if shard == ctx.id {
            handle_request(ctx, req);
        } else if ctx.inboxes[shard].try_send(ShardMsg::Etrn(req)).is_err() {
            return Reply::owned(
                458,
                "4.3.0",
                format!("Unable to queue messages for node {label}: relay busy"),
            );
        }
        match rx.recv().await {
            Ok(counts) => total += counts.iter().sum::<usize>(),
            Err(_) => return Reply::owned(458, "4.3.0", format!("Unable to queue messages for node {label}")),
        }
    }
    tracing::info!(peer = %session.peer(), target = %label, pending = total, "ETRN");
    if !single {
        Reply::owned(250, "2.0.0", format!("OK, queuing for node {label} started"))
    } else if total == 0 {
        Reply::owned(251, "2.0.0", format!("OK, no messages waiting for node {label}"))
    } else {
        Reply::owned(
            253,
            "2.0.0",
            format!("OK, {total} pending messages for node {label} started"),
        )
    }
}

/// On the owning shard: count, start or join runs, answer.
pub fn handle_request(ctx: &Rc<ShardCtx>, req: EtrnRequest) {
    let mut counts = Vec::with_capacity(req.nodes.len());
    for (i, node) in req.nodes.iter().enumerate() {
        let queued = ctx.queues.borrow().get(*node).map_or(0, |q| q.len());
        let in_flight = crate::queue_run::in_flight(ctx, *node);
        counts.push(queued + in_flight);
        let dynamic_ip = req
            .md5_authenticated
            .get(i)
            .copied()
            .unwrap_or(false)
            .then_some(req.client_ip);
        if queued > 0 {
            crate::queue_run::start_or_join(ctx, *node, dynamic_ip);
        }
    }
    let _ = req.reply.try_send(counts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_forms() {
        assert_eq!(parse_target(b"").unwrap_err().code, 500);
        assert_eq!(parse_target(b"a.test b.test").unwrap_err().code, 501);
        assert_eq!(parse_target(b"bad_name").unwrap_err().code, 501);
        assert_eq!(parse_target(b"#").unwrap_err().code, 501);
        assert_eq!(
            parse_target(b"Node1.Test").unwrap(),
            Target::Node(NodeName::parse("node1.test").unwrap())
        );
        assert_eq!(
            parse_target(b"@test").unwrap(),
            Target::Domain(NodeName::parse("test").unwrap())
        );
        assert_eq!(parse_target(b"#dialup").unwrap(), Target::Queue("dialup".into()));
    }

    #[test]
    fn limits_are_shared_by_the_shards_of_one_relay_only() {
        let shard0 = EtrnState::new();
        let (shard1, elsewhere) = (shard0.clone(), EtrnState::new());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..5 {
            shard0.auth_failure(ip);
        }
        assert!(shard0.auth_locked_out(ip).is_some());
        assert!(shard1.auth_locked_out(ip).is_some(), "a lock-out holds on every shard");
        assert!(
            elsewhere.auth_locked_out(ip).is_none(),
            "another relay has its own limits"
        );
        let on_shard0 = (0..25).filter(|_| shard0.etrn_allowed(ip)).count();
        assert_eq!(on_shard0, 20, "burst");
        assert!(!shard1.etrn_allowed(ip), "one ETRN budget for all shards");
    }

    #[test]
    fn targets_resolve_to_nodes() {
        let cfg = Config::from_toml(
            "[[node]]\nname = \"a.test\"\nqueue = \"q\"\n[[node]]\nname = \"b.a.test\"\n[[node]]\nname = \"xa.test\"\nqueue = \"q\"\n",
        )
        .unwrap();
        let n = |s: &str| parse_target(s.as_bytes()).unwrap();
        assert_eq!(resolve_target(&cfg, &n("a.test")), vec![NodeIdx(0)]);
        assert_eq!(resolve_target(&cfg, &n("@a.test")), vec![NodeIdx(0), NodeIdx(1)]);
        assert_eq!(resolve_target(&cfg, &n("@test")).len(), 3);
        assert_eq!(resolve_target(&cfg, &n("#q")), vec![NodeIdx(0), NodeIdx(2)]);
        assert!(resolve_target(&cfg, &n("c.test")).is_empty());
    }
}
