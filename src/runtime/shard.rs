//! One shard: its context (spool writer, segment accounting, the node queues it owns), its
//! inbox loop and its listeners.
//!
//! Everything in [`ShardCtx`] is touched only from this shard's executor thread, except the
//! `Arc`s shared with other shards (configuration, inboxes, the global connection counter).
//! `RefCell` borrows are kept inside synchronous sections.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use super::{Inbox, InboxReceiver, ShardInit, ShardMsg, ShardRouter};
use crate::config::Config;
use crate::queue::{NodeIdx, QueueEntry, ShardQueues};
use crate::spool::{SegmentFiles, SegmentId, SegmentTable, SpoolWriter};

/// Per-shard state, shared by the shard's tasks through an `Rc`.
pub struct ShardCtx {
    /// This shard's index.
    pub id: usize,
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Node-to-shard map.
    pub router: ShardRouter,
    /// Every shard's inbox (including ours).
    pub inboxes: Arc<Vec<Inbox>>,
    /// Our appender.
    pub writer: SpoolWriter,
    /// Live-part accounting of the segments this shard is responsible for.
    pub table: Rc<SegmentTable>,
    /// Read/state handles for segments (any shard's).
    pub files: Rc<SegmentFiles>,
    /// The node queues this shard owns.
    pub queues: RefCell<ShardQueues>,
    /// Open connections over all shards.
    pub connections: Arc<AtomicUsize>,
    /// DATA bytes held in memory on this shard right now.
    pub inflight_bytes: Cell<usize>,
    /// Cross-shard messages that found the target inbox full; retried by a timer.
    backlog: RefCell<Vec<(usize, ShardMsg)>>,
    /// Parts finished here in segments other shards account for: `(shard, segment, parts)`,
    /// sent by the backlog timer as one message per segment, so a queue run costs the other
    /// shard a wake-up per tick rather than one per delivered message.
    done_elsewhere: RefCell<Vec<(usize, SegmentId, usize)>>,
    /// Parts for nodes other shards own, per owning shard, waiting for this pass of the
    /// executor to end (see [`ShardCtx::enqueue`]); each holds an inbox slot.
    outbox: RefCell<Vec<Vec<(NodeIdx, QueueEntry)>>>,
    /// A task that sends `outbox` is already spawned.
    outbox_due: Cell<bool>,
    /// Per-shard ETRN and AUTH abuse limits.
    pub etrn: crate::etrn::EtrnState,
    /// Queue runs in progress on this shard.
    pub runs: crate::queue_run::Runs,
    /// MX resolver with this shard's cache.
    pub resolver: crate::dns::Resolver,
    ids: RefCell<crate::spool::IdGen>,
    /// Bounces being delivered to senders outside every node.
    pub outbound: crate::outbound::OutboundBounces,
    /// Task queue of the SMTP sessions and the cross-shard inbox: latency matters (an ETRN is
    /// answered at once even while this shard streams a queue out).
    pub control_tq: glommio::TaskQueueHandle,
    /// Task queue of queue runs and bounce deliveries: throughput work, fewer shares.
    pub bulk_tq: glommio::TaskQueueHandle,
    /// Idle deadlines of this shard's connections.
    pub idle: crate::smtp::server::IdleRegistry,
    /// Inbound STARTTLS configuration (None: not offered).
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// Outbound STARTTLS configuration.
    pub tls_client: crate::delivery::TlsClient,
    /// Set on SIGTERM: new commands get 421, open transactions finish.
    pub draining: Cell<bool>,
    /// Connections open on this shard.
    pub local_connections: Cell<usize>,
}

/// What every shard of one relay shares (cloned into each executor at start-up).
#[derive(Clone)]
pub struct SharedParts {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Node-to-shard map.
    pub router: ShardRouter,
    /// Every shard's inbox.
    pub inboxes: Arc<Vec<Inbox>>,
    /// The spool's segment directory.
    pub seg_dir: PathBuf,
    /// Open connections over all shards.
    pub connections: Arc<AtomicUsize>,
    /// ETRN/AUTH abuse limits.
    pub etrn: crate::etrn::EtrnState,
    /// Inbound STARTTLS configuration, when `[tls]` is configured.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// Outbound (opportunistic) STARTTLS configuration.
    pub tls_client: crate::delivery::TlsClient,
}

impl ShardCtx {
    /// Builds the context of shard `id` and loads its recovered queues.
    pub fn new(id: usize, shared: SharedParts, init: ShardInit) -> Rc<ShardCtx> {
        let SharedParts {
            cfg,
            router,
            inboxes,
            seg_dir,
            connections,
            etrn,
            tls_server,
            tls_client,
        } = shared;
        let table = Rc::new(SegmentTable::new(seg_dir.clone()));
        for (seg, parts) in init.segments {
            table.add_parts(seg, parts, true);
        }
        let mut queues = ShardQueues::default();
        for (node, entry) in init.entries {
            queues.get_mut(node).push(entry);
        }
        let writer = SpoolWriter::start(
            seg_dir.clone(),
            id,
            cfg.spool_segment_size,
            cfg.spool_commit_delay,
            table.clone(),
        );
        let shard_count = inboxes.len();
        let ctx = Rc::new(ShardCtx {
            id,
            etrn,
            runs: Default::default(),
            resolver: crate::dns::Resolver::new(crate::dns::ResolverConfig {
                nameservers: cfg.dns.nameservers.clone(),
                timeout: cfg.dns.timeout,
                attempts: 2,
                own_hostnames: vec![cfg.hostname.clone()],
            }),
            ids: RefCell::new(crate::spool::IdGen::new(id)),
            outbound: Default::default(),
            control_tq: glommio::executor().create_task_queue(
                glommio::Shares::Static(1000),
                glommio::Latency::Matters(Duration::from_millis(1)),
                "control",
            ),
            bulk_tq: glommio::executor().create_task_queue(
                glommio::Shares::Static(250),
                glommio::Latency::NotImportant,
                "delivery",
            ),
            idle: Default::default(),
            tls_server,
            tls_client,
            draining: Cell::new(false),
            local_connections: Cell::new(0),
            cfg,
            router,
            inboxes,
            writer,
            table,
            files: Rc::new(SegmentFiles::new(seg_dir)),
            queues: RefCell::new(queues),
            connections,
            inflight_bytes: Cell::new(0),
            backlog: RefCell::new(Vec::new()),
            done_elsewhere: RefCell::new(Vec::new()),
            outbox: RefCell::new((0..shard_count).map(|_| Vec::new()).collect()),
            outbox_due: Cell::new(false),
        });
        for (entry, domain) in init.outbound {
            crate::outbound::enqueue(&ctx, entry, domain);
        }
        // The recovered lists were consumed into the queues; return their pages.
        // SAFETY: mi_collect only releases this thread's own free pages.
        unsafe { libmimalloc_sys::mi_collect(true) };
        ctx
    }

    /// Spawns throughput work (queue runs, bounce deliveries) into the bulk task queue.
    pub fn spawn_bulk(&self, fut: impl std::future::Future<Output = ()> + 'static) {
        match glommio::spawn_local_into(fut, self.bulk_tq) {
            Ok(t) => {
                t.detach();
            }
            Err(e) => tracing::error!(error = %e, "cannot spawn into the delivery task queue"),
        }
    }

    /// Spawns latency-sensitive work (sessions, inbox) into the control task queue.
    pub fn spawn_control<T: 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + 'static,
    ) -> Option<glommio::task::JoinHandle<T>> {
        match glommio::spawn_local_into(fut, self.control_tq) {
            Ok(t) => Some(t.detach()),
            Err(e) => {
                tracing::error!(error = %e, "cannot spawn into the control task queue");
                None
            }
        }
    }

    /// A new message id (queue id).
    pub fn next_msg_id(&self) -> u64 {
        self.ids.borrow_mut().next_id()
    }

    /// The shard owning a node's queue.
    pub fn owner_of(&self, node: NodeIdx) -> usize {
        self.router.shard_for(&self.cfg.nodes[node.0 as usize].name)
    }

    /// Adds a part to a local node queue. A run going for the node takes it without being
    /// told: its workers pop until the queue is empty, and `finish` looks again before closing.
    pub fn enqueue_local(&self, node: NodeIdx, entry: QueueEntry) {
        self.queues.borrow_mut().get_mut(node).push(entry);
    }

    /// Adds a newly spooled part to its node's queue. For a node another shard owns, the
    /// caller has taken one slot of that shard's inbox ([`Inbox::reserve`]) for it. Such parts
    /// are gathered and sent by a task spawned behind the tasks already runnable here, so the
    /// sessions answered by one spool commit hand their parts over in one inbox message: one
    /// cross-thread wake-up of the owner per batch instead of one per message (measured on two
    /// shards: the per-message wake-up cost about a quarter of the accept rate).
    pub fn enqueue(self: &Rc<Self>, owner: usize, node: NodeIdx, entry: QueueEntry) {
        if owner == self.id {
            self.enqueue_local(node, entry);
            return;
        }
        self.outbox.borrow_mut()[owner].push((node, entry));
        if self.outbox_due.replace(true) {
            return;
        }
        let me = self.clone();
        let send = async move {
            me.outbox_due.set(false);
            let batches: Vec<_> = me.outbox.borrow_mut().iter_mut().map(std::mem::take).collect();
            for (shard, parts) in batches.into_iter().enumerate().filter(|(_, p)| !p.is_empty()) {
                // One slot per part was reserved; the batch uses one of them.
                me.inboxes[shard].release(parts.len() - 1);
                me.inboxes[shard].send_reserved(ShardMsg::Enqueue(parts));
            }
        };
        if self.spawn_control(send).is_none() {
            // Only at executor shutdown; the parts are spooled and recovery queues them.
            self.outbox_due.set(false);
        }
    }

    /// Reports a finished part to the shard accounting for its segment (batched when that is
    /// another shard); never blocks.
    pub fn part_done(self: &Rc<Self>, table_shard: usize, seg: SegmentId) {
        if table_shard == self.id {
            self.parts_done_here(seg, 1);
            return;
        }
        let mut done = self.done_elsewhere.borrow_mut();
        match done.iter_mut().find(|(s, g, _)| *s == table_shard && *g == seg) {
            Some((_, _, n)) => *n += 1,
            None => done.push((table_shard, seg, 1)),
        }
    }

    /// Counts finished parts of a segment this shard accounts for; removes the segment when
    /// none is left.
    fn parts_done_here(self: &Rc<Self>, seg: SegmentId, parts: usize) {
        if self.table.parts_done(seg, parts) {
            // Every shard that read from the segment holds a handle; a removed file keeps
            // its disk space until the last one is closed.
            self.files.forget(seg);
            for shard in (0..self.inboxes.len()).filter(|s| *s != self.id) {
                self.send_or_backlog(shard, ShardMsg::SegmentRemoved(seg));
            }
            let me = self.clone();
            glommio::spawn_local(async move {
                me.table.remove(seg).await;
            })
            .detach();
        }
    }

    /// Sends the finished parts counted by [`ShardCtx::part_done`] to the shards that account
    /// for their segments.
    fn send_done_elsewhere(&self) {
        let done = std::mem::take(&mut *self.done_elsewhere.borrow_mut());
        for (shard, seg, parts) in done {
            self.send_or_backlog(shard, ShardMsg::PartsDone { seg, parts });
        }
    }

    /// Sends to another shard; if its inbox is full, keeps the message for the retry timer.
    pub fn send_or_backlog(&self, shard: usize, msg: ShardMsg) {
        if let Err(msg) = self.inboxes[shard].try_send(msg) {
            self.backlog.borrow_mut().push((shard, msg));
        }
    }

    fn retry_backlog(&self) {
        let pending = std::mem::take(&mut *self.backlog.borrow_mut());
        for (shard, msg) in pending {
            self.send_or_backlog(shard, msg);
        }
    }
}

/// How long a shutdown waits for open transactions before it stops anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// Runs a shard until shutdown: the inbox loop, the backlog timer, the idle sweeper and the
/// listeners. On the stop signal it closes the listeners, lets open transactions finish (each
/// connection answers its next command with 421), syncs the spool and returns.
pub async fn serve(
    ctx: Rc<ShardCtx>,
    inbox: InboxReceiver,
    listen: Vec<SocketAddr>,
    stop: crossbeam_channel::Receiver<()>,
) {
    ctx.spawn_control({
        let ctx = ctx.clone();
        async move {
            while let Some(msg) = inbox.recv().await {
                handle_msg(&ctx, msg);
            }
        }
    });
    glommio::spawn_local({
        let ctx = ctx.clone();
        async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(50)).await;
                ctx.send_done_elsewhere();
                ctx.retry_backlog();
            }
        }
    })
    .detach();
    glommio::spawn_local(crate::smtp::server::sweep_loop(ctx.clone())).detach();
    crate::queue_run::start_retry_timers(&ctx);
    crate::outbound::start(&ctx);
    let mut listeners = Vec::new();
    for addr in listen {
        match glommio::net::TcpListener::bind(addr) {
            Ok(l) => {
                tracing::info!(shard = ctx.id, %addr, "listening");
                listeners.extend(ctx.spawn_control(crate::smtp::server::accept_loop(ctx.clone(), l)));
            }
            Err(e) => {
                tracing::error!(shard = ctx.id, %addr, error = %e, "cannot listen");
                std::process::exit(1);
            }
        }
    }
    while stop.try_recv().is_err() {
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
    for l in listeners {
        l.cancel();
    }
    ctx.draining.set(true);
    ctx.idle.expire_all();
    let deadline = std::time::Instant::now() + DRAIN_GRACE;
    while ctx.local_connections.get() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    ctx.writer.close().await;
    tracing::info!(
        shard = ctx.id,
        open_connections = ctx.local_connections.get(),
        "shard stopped"
    );
}

fn handle_msg(ctx: &Rc<ShardCtx>, msg: ShardMsg) {
    match msg {
        ShardMsg::Enqueue(parts) => {
            for (node, entry) in parts {
                ctx.enqueue_local(node, entry);
            }
        }
        ShardMsg::PartsDone { seg, parts } => ctx.parts_done_here(seg, parts),
        ShardMsg::SegmentRemoved(seg) => ctx.files.forget(seg),
        ShardMsg::Etrn(req) => crate::etrn::handle_request(ctx, req),
    }
}
