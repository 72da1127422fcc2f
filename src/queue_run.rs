//! Queue runs: streaming a node's queue to the node's own server after ETRN (or on the node's
//! `retry_interval`).
//!
//! A run owns nothing durable: it pops parts from the shard's `NodeQueue`, reads each record
//! from the spool, hands it to [`crate::delivery::SmtpClient`] over parallel connections,
//! writes each recipient's final state into the record, and gives deferred parts back to the
//! queue when the run ends. A part is never in the queue and in a worker at once, so concurrent
//! ETRNs cannot deliver it twice.
//!
//! How many connections: Postfix's slow start. A run opens `delivery.initial_connections`,
//! adds one each time as many messages as there are connections went through, up to
//! `delivery.connections_per_node`, and gives one up when a connection breaks or the server
//! turns a new one away while others are delivering ([`ConcurrencyWindow`]). A node that takes
//! only a few sessions at a time gets that many, and its mail is not left behind for it.
//!
//! Where mail goes (the protected-queue rules): `auth = "none"`: the node's MX hosts only;
//! `plain`: `static_ip` first when set, then the MX hosts; `md5`: the address the
//! authenticated ETRN came from, then the MX hosts.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::AuthMode;
use crate::delivery::{ClientConfig, OutboundMessage, RcptOutcome, SmtpClient};
use crate::dsn::{build_bounce, BounceInput, FailedRecipient};
use crate::queue::{NodeIdx, QueueEntry};
use crate::runtime::ShardCtx;
use crate::spool::record::{self, RcptState, RecordBuilder};
use crate::spool::{self, SegmentId};

/// The runs going on one shard.
#[derive(Default)]
pub struct Runs {
    active: RefCell<HashMap<NodeIdx, Rc<Run>>>,
}

struct Run {
    node: NodeIdx,
    dynamic_ip: Cell<Option<IpAddr>>,
    targets: RefCell<Vec<SocketAddr>>,
    workers: Cell<usize>,
    /// Workers holding a live connection to the node's server.
    connected: Cell<usize>,
    window: Cell<ConcurrencyWindow>,
    in_flight: Cell<usize>,
    deferred: RefCell<Vec<QueueEntry>>,
    touched: RefCell<HashSet<SegmentId>>,
    delivered: Cell<usize>,
    /// Set once `finish` has handed the deferred parts back and unregistered the run.
    closed: Cell<bool>,
}

/// Parts of `node` being delivered right now.
pub fn in_flight(ctx: &ShardCtx, node: NodeIdx) -> usize {
    ctx.runs.active.borrow().get(&node).map_or(0, |r| r.in_flight.get())
}

/// Starts a run for `node`, or lets the one going pick up new work.
pub fn start_or_join(ctx: &Rc<ShardCtx>, node: NodeIdx, dynamic_ip: Option<IpAddr>) {
    let existing = ctx.runs.active.borrow().get(&node).cloned();
    if let Some(run) = existing {
        if let Some(ip) = dynamic_ip {
            run.dynamic_ip.set(Some(ip));
            // A CRAM-MD5 ETRN joining a run that a timer or another client started: the
            // client's address becomes the first target for the connections opened from now on.
            let target = SocketAddr::new(ip, ctx.cfg.delivery.port);
            let mut targets = run.targets.borrow_mut();
            if !targets.is_empty() && targets.first() != Some(&target) {
                targets.retain(|t| *t != target);
                targets.insert(0, target);
            }
        }
        add_workers(ctx, &run);
        return;
    }
    let run = Rc::new(Run {
        node,
        dynamic_ip: Cell::new(dynamic_ip),
        targets: RefCell::new(Vec::new()),
        workers: Cell::new(0),
        connected: Cell::new(0),
        window: Cell::new(ConcurrencyWindow::new(
            ctx.cfg.delivery.initial_connections,
            ctx.cfg.delivery.connections_per_node,
        )),
        in_flight: Cell::new(0),
        deferred: RefCell::new(Vec::new()),
        touched: RefCell::new(HashSet::new()),
        delivered: Cell::new(0),
        closed: Cell::new(false),
    });
    ctx.runs.active.borrow_mut().insert(node, run.clone());
    let c = ctx.clone();
    ctx.spawn_bulk(async move { begin(c, run).await });
}

/// Starts the `retry_interval` timers of the nodes this shard owns.
pub fn start_retry_timers(ctx: &Rc<ShardCtx>) {
    for (i, n) in ctx.cfg.nodes.iter().enumerate() {
        let node = NodeIdx(i as u32);
        let Some(every) = n.retry_interval else { continue };
        if ctx.owner_of(node) != ctx.id {
            continue;
        }
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(every).await;
                let queued = ctx.queues.borrow().get(node).map_or(0, |q| q.len());
                if queued > 0 {
                    tracing::info!(node = %ctx.cfg.nodes[node.0 as usize].name, queued, "retry interval: starting a queue run");
                    start_or_join(&ctx, node, None);
                }
            }
        })
        .detach();
    }
}

fn add_workers(ctx: &Rc<ShardCtx>, run: &Rc<Run>) {
    if run.targets.borrow().is_empty() {
        return; // still resolving; `begin` starts the workers
    }
    let queued = ctx.queues.borrow().get(run.node).map_or(0, |q| q.len());
    let want = run.window.get().limit().min(queued + run.workers.get());
    while run.workers.get() < want {
        run.workers.set(run.workers.get() + 1);
        let (c, run) = (ctx.clone(), run.clone());
        ctx.spawn_bulk(async move { worker(c, run).await });
    }
}

async fn resolve_targets(ctx: &ShardCtx, run: &Run) -> Result<Vec<SocketAddr>, crate::dns::DnsError> {
    let n = &ctx.cfg.nodes[run.node.0 as usize];
    let port = ctx.cfg.delivery.port;
    let mut targets = Vec::new();
    match n.auth {
        AuthMode::Plain => targets.extend(n.static_ip.map(|ip| SocketAddr::new(ip, port))),
        AuthMode::Md5 => targets.extend(run.dynamic_ip.get().map(|ip| SocketAddr::new(ip, port))),
        AuthMode::None => {}
    }
    match ctx.resolver.mx_targets(n.name.as_str()).await {
        Ok(mx) => {
            for t in mx {
                for a in t.addrs {
                    let sa = SocketAddr::new(a, port);
                    if !targets.contains(&sa) {
                        targets.push(sa);
                    }
                }
            }
        }
        Err(e) if targets.is_empty() => return Err(e),
        Err(e) => tracing::info!(node = %n.name, error = %e, "MX lookup failed; using the configured address only"),
    }
    Ok(targets)
}

async fn begin(ctx: Rc<ShardCtx>, run: Rc<Run>) {
    let name = ctx.cfg.nodes[run.node.0 as usize].name.clone();
    match resolve_targets(&ctx, &run).await {
        Ok(t) if !t.is_empty() => {
            tracing::info!(node = %name, targets = ?t, "queue run started");
            *run.targets.borrow_mut() = t;
            add_workers(&ctx, &run);
            if run.workers.get() == 0 {
                finish(&ctx, &run).await;
            }
        }
        Ok(_) => {
            tracing::warn!(node = %name, "no delivery target; mail stays queued");
            finish(&ctx, &run).await;
        }
        Err(crate::dns::DnsError::NullMx(d)) => {
            tracing::warn!(node = %name, "null MX: the node accepts no mail; bouncing its queue");
            let reason = format!("Domain {d} accepts no mail (null MX, RFC 7505)");
            while let Some(entry) = pop(&ctx, run.node) {
                fail_all(&ctx, &run, entry, "5.1.10", &reason).await;
            }
            finish(&ctx, &run).await;
        }
        Err(e) => {
            tracing::warn!(node = %name, error = %e, "cannot resolve the node's servers; mail stays queued");
            finish(&ctx, &run).await;
        }
    }
}

fn pop(ctx: &ShardCtx, node: NodeIdx) -> Option<QueueEntry> {
    ctx.queues.borrow_mut().get_mut(node).pop()
}

fn client_config(ctx: &ShardCtx, node: NodeIdx) -> ClientConfig {
    let mut cc = ClientConfig::rfc5321(ctx.cfg.hostname.clone()).scaled(ctx.cfg.delivery.timeout_scale);
    cc.tls = Some(ctx.tls_client.clone());
    cc.require_tls = ctx.cfg.nodes[node.0 as usize].require_tls;
    cc
}

async fn connect(ctx: &ShardCtx, run: &Run) -> Option<SmtpClient> {
    let targets = run.targets.borrow().clone();
    let cc = client_config(ctx, run.node);
    for addr in targets {
        match SmtpClient::connect(addr, &cc).await {
            Ok(c) => return Some(c),
            Err(e) => tracing::info!(%addr, error = %e, "cannot use this server; trying the next"),
        }
    }
    None
}

async fn worker(ctx: Rc<ShardCtx>, run: Rc<Run>) {
    let mut client: Option<SmtpClient> = None;
    let max_age = ctx.cfg.delivery.max_age.as_secs();
    loop {
        if run.workers.get() > run.window.get().limit() {
            break; // the window shrank: this connection is one too many
        }
        let Some(entry) = pop(&ctx, run.node) else { break };
        run.in_flight.set(run.in_flight.get() + 1);
        let now = spool::unix_now();
        if now.saturating_sub(entry.arrival) > max_age {
            fail_all(
                &ctx,
                &run,
                entry,
                "4.4.7",
                "Message expired: not collected by the node within the maximum queue age",
            )
            .await;
            run.in_flight.set(run.in_flight.get() - 1);
            continue;
        }
        let mut server_works = false;
        if client.is_none() {
            let delivered_at_connect = run.delivered.get();
            client = connect(&ctx, &run).await;
            if client.is_some() {
                run.connected.set(run.connected.get() + 1);
            }
            // Other connections are delivering, or did while this one tried (they may have
            // emptied the queue and left during a long connect timeout).
            server_works = run.connected.get() > 0 || run.delivered.get() > delivered_at_connect;
        }
        let Some(c) = client.as_mut() else {
            run.in_flight.set(run.in_flight.get() - 1);
            if server_works {
                // The server works but turned this connection away (a session limit, a 421,
                // a connection it never answered): the connections it takes deliver this part
                // (`finish` starts one if the others are gone); try fewer from now on.
                run.window_failure();
                ctx.queues.borrow_mut().get_mut(run.node).push_front(entry);
            } else {
                run.deferred.borrow_mut().push(entry);
            }
            break;
        };
        let delivered_before = run.delivered.get();
        let ok = deliver_one(&ctx, &run, c, entry).await;
        run.in_flight.set(run.in_flight.get() - 1);
        if ok {
            // Only a delivery earns the window credit: a part that was deferred (a 421 to MAIL,
            // every recipient 4xx) or could not be read says nothing about more connections.
            if run.delivered.get() > delivered_before && run.window_success() {
                add_workers(&ctx, &run);
            }
        } else {
            client = None; // connection is broken; reconnect for the next message
            run.connected.set(run.connected.get() - 1);
            run.window_failure();
        }
        // Socket writes and page-cache reads often complete without suspending, so a worker
        // could stream many messages without ever giving the latency-sensitive queue (sessions,
        // ETRN) a turn; let it in whenever the scheduler asks.
        glommio::yield_if_needed().await;
    }
    // Counted out before the QUIT exchange, so the others see the right number at once (the
    // window check above) and only one worker retires per step the window shrinks.
    run.workers.set(run.workers.get() - 1);
    let last = run.workers.get() == 0;
    if let Some(c) = client {
        run.connected.set(run.connected.get() - 1);
        c.quit().await;
    }
    if last && run.workers.get() == 0 {
        finish(&ctx, &run).await;
    }
}

impl Run {
    /// Counts a delivery in the window; true when it just grew.
    fn window_success(&self) -> bool {
        let mut w = self.window.get();
        let grew = w.success();
        self.window.set(w);
        grew
    }

    /// Counts a failed or refused connection in the window.
    fn window_failure(&self) {
        let mut w = self.window.get();
        w.failure();
        self.window.set(w);
    }
}

/// The number of connections a run may have open: starts at `initial`, grows by one after
/// `limit` successful deliveries (so doubling takes about as many messages as connections, like
/// Postfix's `1/concurrency` positive feedback), shrinks by one on each failure, and stays
/// within `1..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConcurrencyWindow {
    limit: usize,
    max: usize,
    credit: usize,
}

impl ConcurrencyWindow {
    fn new(initial: usize, max: usize) -> Self {
        let max = max.max(1);
        ConcurrencyWindow {
            limit: initial.clamp(1, max),
            max,
            credit: 0,
        }
    }

    fn limit(self) -> usize {
        self.limit
    }

    /// Counts one delivery; true when the window just grew.
    fn success(&mut self) -> bool {
        if self.limit == self.max {
            return false;
        }
        self.credit += 1;
        if self.credit < self.limit {
            return false;
        }
        self.credit = 0;
        self.limit += 1;
        true
    }

    fn failure(&mut self) {
        self.credit = 0;
        self.limit = self.limit.saturating_sub(1).max(1);
    }
}

/// Delivers one part. Returns false when the connection should be dropped.
async fn deliver_one(ctx: &Rc<ShardCtx>, run: &Run, client: &mut SmtpClient, mut entry: QueueEntry) -> bool {
    let qid = spool::queue_id(entry.msg_id);
    let bytes = match ctx.files.read(entry.loc).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(queue_id = %qid, error = %e, "cannot read spooled message; left queued");
            run.deferred.borrow_mut().push(entry);
            return true;
        }
    };
    let view = match record::parse(&bytes) {
        Ok(v) => v,
        Err(e) => {
            // Undeliverable and skipped by recovery too: let its segment go.
            tracing::error!(queue_id = %qid, error = %e, "spooled message is damaged; dropped from the queue");
            ctx.part_done(entry.table_shard as usize, entry.loc.segment);
            return true;
        }
    };
    let sender = String::from_utf8_lossy(view.sender).into_owned();
    let rcpts = recipients_of(&view, &entry.rcpts);
    let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let msg = OutboundMessage {
        sender: &sender,
        recipients: &rcpt_refs,
        body: view.data,
        eight_bit: view.eight_bit,
        size: view.data.len(),
    };
    let outcomes = match client.send(&msg).await {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(queue_id = %qid, error = %e, "delivery attempt failed; deferred");
            run.deferred.borrow_mut().push(entry);
            return false;
        }
    };
    let mut updates = Vec::new();
    let mut failed = Vec::new();
    let mut failed_idx = Vec::new();
    let mut still = Vec::new();
    for (k, (idx, out)) in entry.rcpts.iter().zip(&outcomes).enumerate() {
        match out {
            RcptOutcome::Delivered(_) => updates.push((*idx, RcptState::Delivered)),
            RcptOutcome::Failed(r) => {
                failed_idx.push(*idx);
                failed.push(FailedRecipient {
                    recipient: rcpts[k].clone(),
                    status: enhanced_of(r.code, &r.text),
                    diagnostic: format!("smtp; {} {}", r.code, r.text.replace('\n', " ")),
                    remote_mta: None,
                });
                tracing::info!(queue_id = %qid, code = r.code, "recipient failed permanently");
            }
            RcptOutcome::Deferred(r) => {
                tracing::info!(queue_id = %qid, code = r.code, "recipient deferred");
                still.push(*idx);
            }
        }
    }
    if !failed.is_empty() {
        if queue_bounce(ctx, &view, &qid, failed).await {
            updates.extend(failed_idx.iter().map(|i| (*i, RcptState::Failed)));
        } else {
            // No bounce could be spooled: keep the recipients; the next run tries again and
            // bounces then. Never a failure without its DSN.
            still.extend(failed_idx);
        }
    }
    if let Err(e) = ctx.files.set_states(entry.loc, view.state_offset, &updates).await {
        tracing::error!(queue_id = %qid, error = %e, "cannot record delivery state; may be delivered again after a restart");
    }
    run.touched.borrow_mut().insert(entry.loc.segment);
    let delivered = updates.iter().filter(|(_, s)| *s == RcptState::Delivered).count();
    if delivered > 0 {
        run.delivered.set(run.delivered.get() + 1);
        tracing::info!(queue_id = %qid, delivered, "delivered");
    }
    if still.is_empty() {
        ctx.part_done(entry.table_shard as usize, entry.loc.segment);
    } else {
        entry.rcpts = still;
        run.deferred.borrow_mut().push(entry);
    }
    true
}

fn enhanced_of(code: u16, text: &str) -> String {
    let first = text.split_whitespace().next().unwrap_or("");
    let ok = first.split('.').count() == 3
        && first
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        first.to_owned()
    } else {
        format!("{}.0.0", code / 100)
    }
}

async fn fail_all(ctx: &Rc<ShardCtx>, run: &Run, entry: QueueEntry, status: &str, reason: &str) {
    let qid = spool::queue_id(entry.msg_id);
    let Ok(bytes) = ctx.files.read(entry.loc).await else {
        run.deferred.borrow_mut().push(entry);
        return;
    };
    let Ok(view) = record::parse(&bytes) else {
        tracing::error!(queue_id = %qid, "spooled message is damaged; dropped from the queue");
        ctx.part_done(entry.table_shard as usize, entry.loc.segment);
        return;
    };
    let failed: Vec<FailedRecipient> = entry
        .rcpts
        .iter()
        .filter_map(|i| view.recipients.get(*i as usize))
        .map(|r| FailedRecipient {
            recipient: String::from_utf8_lossy(r).into_owned(),
            status: status.to_owned(),
            diagnostic: format!("x-etrn-relay; {reason}"),
            remote_mta: None,
        })
        .collect();
    tracing::info!(queue_id = %qid, reason, "bouncing");
    if !queue_bounce(ctx, &view, &qid, failed).await {
        run.deferred.borrow_mut().push(entry);
        return;
    }
    let updates: Vec<(u16, RcptState)> = entry.rcpts.iter().map(|i| (*i, RcptState::Failed)).collect();
    let _ = ctx.files.set_states(entry.loc, view.state_offset, &updates).await;
    run.touched.borrow_mut().insert(entry.loc.segment);
    ctx.part_done(entry.table_shard as usize, entry.loc.segment);
}

/// The addresses of the given recipients of a record.
pub(crate) fn recipients_of(view: &record::RecordView<'_>, idx: &[u16]) -> Vec<String> {
    idx.iter()
        .filter_map(|i| view.recipients.get(*i as usize))
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect()
}

/// Builds the DSN and spools it like any accepted message (null sender): to the sender's node
/// queue when the sender is at a node, else to [`crate::outbound`], which delivers it to the
/// sender's MX. Returns true when the failure is accounted for (bounce spooled, or the sender is
/// `<>` and gets none); false when the bounce could not be spooled, so the caller keeps the
/// recipients pending rather than lose the DSN.
async fn queue_bounce(
    ctx: &Rc<ShardCtx>,
    view: &record::RecordView<'_>,
    qid: &str,
    failed: Vec<FailedRecipient>,
) -> bool {
    if view.sender.is_empty() {
        tracing::info!(queue_id = qid, "no bounce for the null sender");
        return true;
    }
    let sender = String::from_utf8_lossy(view.sender).into_owned();
    let domain = sender.rsplit_once('@').map_or("", |(_, d)| d).to_ascii_lowercase();
    let node = ctx.cfg.node_index_for_domain(&domain).map(|i| NodeIdx(i as u32));
    let body = build_bounce(&BounceInput {
        reporting_mta: &ctx.cfg.hostname,
        original_sender: &sender,
        original_queue_id: qid,
        arrival_date: UNIX_EPOCH + Duration::from_secs(view.arrival),
        failed: &failed,
        original_message: view.data,
        now: SystemTime::now(),
    });
    let msg_id = ctx.next_msg_id();
    let mut b = RecordBuilder::new(msg_id, spool::unix_now(), b"", &[sender.as_bytes()], body.len());
    b.data_mut().extend_from_slice(&body);
    let rec = b.finish(false);
    let len = rec.len() as u32;
    let owner = node.map_or(ctx.id, |n| ctx.owner_of(n));
    if owner != ctx.id && !ctx.inboxes[owner].reserve(1) {
        tracing::warn!(
            queue_id = qid,
            "bounce not spooled yet: owning shard busy; the failure is retried"
        );
        return false;
    }
    match ctx.writer.commit(rec, 1, None).await {
        Ok(loc) => {
            let entry = QueueEntry {
                loc,
                msg_id,
                arrival: spool::unix_now(),
                size: len,
                rcpts: vec![0],
                table_shard: ctx.id as u16,
            };
            let bounce_id = spool::queue_id(msg_id);
            match node {
                Some(node) => ctx.enqueue(owner, node, entry),
                None => crate::outbound::enqueue(ctx, entry, domain),
            }
            tracing::info!(queue_id = qid, bounce_id = %bounce_id, to = %sender, "bounce queued");
            true
        }
        Err(e) => {
            if owner != ctx.id {
                ctx.inboxes[owner].release(1);
            }
            tracing::error!(queue_id = qid, error = %e, "bounce could not be spooled; the failure is retried");
            false
        }
    }
}

async fn finish(ctx: &Rc<ShardCtx>, run: &Rc<Run>) {
    loop {
        if run.closed.get() {
            return; // another call (from a worker that joined while we synced) closed it
        }
        // Mail that arrived after the workers drained the queue: keep going.
        let queued = ctx.queues.borrow().get(run.node).map_or(0, |q| q.len());
        let reachable = !run.targets.borrow().is_empty() && run.deferred.borrow().is_empty();
        if queued > 0 && reachable {
            add_workers(ctx, run);
            if run.workers.get() > 0 {
                return;
            }
        }
        let touched: Vec<SegmentId> = run.touched.borrow_mut().drain().collect();
        if touched.is_empty() {
            break;
        }
        for seg in touched {
            let _ = ctx.files.sync(seg).await;
        }
        // The run is still registered while we sync: an ETRN may have joined it (new
        // workers) or mail may have arrived. Look again; only the code below, which does
        // not yield, may close the run.
        if run.workers.get() > 0 {
            return;
        }
    }
    run.closed.set(true);
    let deferred = std::mem::take(&mut *run.deferred.borrow_mut());
    let n_deferred = deferred.len();
    {
        let mut qs = ctx.queues.borrow_mut();
        let q = qs.get_mut(run.node);
        for e in deferred {
            q.push(e);
        }
    }
    {
        let mut active = ctx.runs.active.borrow_mut();
        if active.get(&run.node).is_some_and(|r| Rc::ptr_eq(r, run)) {
            active.remove(&run.node);
        }
    }
    if ctx.runs.active.borrow().is_empty() {
        ctx.files.close_all();
    }
    tracing::info!(
        node = %ctx.cfg.nodes[run.node.0 as usize].name,
        delivered = run.delivered.get(),
        deferred = n_deferred,
        "queue run finished"
    );
}

#[cfg(test)]
mod tests {
    use super::ConcurrencyWindow;

    #[test]
    fn window_starts_at_initial_within_bounds() {
        assert_eq!(ConcurrencyWindow::new(5, 20).limit(), 5);
        assert_eq!(ConcurrencyWindow::new(9, 4).limit(), 4);
        assert_eq!(ConcurrencyWindow::new(0, 4).limit(), 1);
    }

    #[test]
    fn window_grows_by_one_per_window_of_successes_up_to_max() {
        let mut w = ConcurrencyWindow::new(2, 4);
        let grew: Vec<bool> = (0..12).map(|_| w.success()).collect();
        // 2 successes at 2, then 3 at 3, then stays at 4.
        assert_eq!(
            grew,
            [false, true, false, false, true, false, false, false, false, false, false, false]
        );
        assert_eq!(w.limit(), 4);
    }

    #[test]
    fn window_shrinks_on_failure_never_below_one_and_restarts_its_count() {
        let mut w = ConcurrencyWindow::new(3, 8);
        assert!(!w.success() && !w.success());
        w.failure();
        assert_eq!(w.limit(), 2);
        assert!(!w.success(), "the successes before the failure no longer count");
        assert!(w.success());
        assert_eq!(w.limit(), 3);
        for _ in 0..5 {
            w.failure();
        }
        assert_eq!(w.limit(), 1);
        assert!(w.success(), "one success grows a window of one");
        assert_eq!(w.limit(), 2);
    }
}
