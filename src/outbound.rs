//! Direct delivery of bounces (DSNs) to senders outside the configured nodes.
//!
//! A hold-and-release relay normally delivers only to its nodes, on their ETRN. A bounce for a
//! sender on the open internet has no node to wait for, so it is delivered here like an
//! ordinary MTA would: to the MX hosts of the sender's domain, retried with a growing interval
//! (1, 5, 15, 30 minutes, then every 30 minutes) until `delivery.max_age`, then dropped with an
//! error log (a bounce is never bounced).
//!
//! The bounce is a normal spool record (null sender), so it survives a restart: recovery hands
//! records with the null sender and a recipient outside every node to this module. This module
//! owns only the retry list; the spool, the DNS resolver and the SMTP client are borrowed from
//! the shard.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::delivery::{ClientConfig, OutboundMessage, RcptOutcome, SmtpClient};
use crate::queue::QueueEntry;
use crate::runtime::ShardCtx;
use crate::spool::record::{self, RcptState};
use crate::spool::{self, unix_now};

/// Retry delays after each failed attempt (the last one repeats).
const RETRY_SECS: [u64; 4] = [60, 300, 900, 1800];
/// How often the list is checked for due entries.
const TICK: Duration = Duration::from_millis(500);

struct Pending {
    entry: QueueEntry,
    domain: String,
    next_try: u64,
    attempts: usize,
}

/// The bounces this shard is delivering to the outside.
#[derive(Default)]
pub struct OutboundBounces {
    pending: RefCell<Vec<Pending>>,
}

impl OutboundBounces {
    /// Number of bounces waiting.
    pub fn len(&self) -> usize {
        self.pending.borrow().len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Adds a spooled bounce for `domain`; the first attempt happens at the next tick.
pub fn enqueue(ctx: &ShardCtx, entry: QueueEntry, domain: String) {
    ctx.outbound.pending.borrow_mut().push(Pending {
        entry,
        domain,
        next_try: 0,
        attempts: 0,
    });
}

/// Starts the shard's retry loop.
pub fn start(ctx: &Rc<ShardCtx>) {
    let c = ctx.clone();
    ctx.spawn_bulk(async move {
        let ctx = c;
        loop {
            glommio::timer::sleep(TICK).await;
            let now = unix_now();
            let due: Vec<Pending> = {
                let mut p = ctx.outbound.pending.borrow_mut();
                let (due, later): (Vec<Pending>, Vec<Pending>) = p.drain(..).partition(|e| e.next_try <= now);
                *p = later;
                due
            };
            for mut p in due {
                match attempt(&ctx, &p).await {
                    Attempt::Done => {}
                    Attempt::Retry(why) => {
                        let age = now.saturating_sub(p.entry.arrival);
                        if age > ctx.cfg.delivery.max_age.as_secs() {
                            tracing::error!(queue_id = %spool::queue_id(p.entry.msg_id), domain = %p.domain, reason = %why, "bounce undeliverable until the maximum queue age; dropped");
                            finish(&ctx, &p.entry, RcptState::Failed).await;
                            continue;
                        }
                        let delay = RETRY_SECS[p.attempts.min(RETRY_SECS.len() - 1)];
                        p.attempts += 1;
                        p.next_try = now + delay;
                        tracing::info!(queue_id = %spool::queue_id(p.entry.msg_id), domain = %p.domain, reason = %why, retry_in_s = delay, "bounce deferred");
                        ctx.outbound.pending.borrow_mut().push(p);
                    }
                }
            }
        }
    });
}

enum Attempt {
    Done,
    Retry(String),
}

async fn finish(ctx: &Rc<ShardCtx>, entry: &QueueEntry, state: RcptState) {
    if let Ok(bytes) = ctx.files.read(entry.loc).await {
        if let Ok(view) = record::parse(&bytes) {
            let updates: Vec<(u16, RcptState)> = entry.rcpts.iter().map(|i| (*i, state)).collect();
            let _ = ctx.files.set_states(entry.loc, view.state_offset, &updates).await;
            let _ = ctx.files.sync(entry.loc.segment).await;
        }
    }
    ctx.part_done(entry.table_shard as usize, entry.loc.segment);
}

async fn attempt(ctx: &Rc<ShardCtx>, p: &Pending) -> Attempt {
    let qid = spool::queue_id(p.entry.msg_id);
    let targets = match ctx.resolver.mx_targets(&p.domain).await {
        Ok(t) => t,
        Err(e) if e.is_permanent() => {
            tracing::error!(queue_id = %qid, domain = %p.domain, error = %e, "bounce undeliverable (DNS); dropped");
            finish(ctx, &p.entry, RcptState::Failed).await;
            return Attempt::Done;
        }
        Err(e) => return Attempt::Retry(e.to_string()),
    };
    let bytes = match ctx.files.read(p.entry.loc).await {
        Ok(b) => b,
        Err(e) => return Attempt::Retry(format!("cannot read the spooled bounce: {e}")),
    };
    let view = match record::parse(&bytes) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(queue_id = %qid, error = %e, "spooled bounce is damaged; dropped");
            ctx.part_done(p.entry.table_shard as usize, p.entry.loc.segment);
            return Attempt::Done;
        }
    };
    let rcpts = crate::queue_run::recipients_of(&view, &p.entry.rcpts);
    let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let msg = OutboundMessage {
        sender: "",
        recipients: &rcpt_refs,
        body: view.data,
        eight_bit: view.eight_bit,
        size: view.data.len(),
    };
    let mut cc = ClientConfig::rfc5321(ctx.cfg.hostname.clone()).scaled(ctx.cfg.delivery.timeout_scale);
    cc.tls = Some(ctx.tls_client.clone());
    let mut last = String::from("no MX host reachable");
    for t in targets {
        for ip in &t.addrs {
            let addr = SocketAddr::new(*ip, ctx.cfg.delivery.port);
            let mut client = match SmtpClient::connect(addr, &cc).await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            let outcome = client.send(&msg).await;
            client.quit().await;
            match outcome {
                Ok(outcomes) => match outcomes.first() {
                    Some(RcptOutcome::Delivered(_)) => {
                        tracing::info!(queue_id = %qid, %addr, "bounce delivered");
                        finish(ctx, &p.entry, RcptState::Delivered).await;
                        return Attempt::Done;
                    }
                    Some(RcptOutcome::Failed(r)) => {
                        tracing::error!(queue_id = %qid, %addr, code = r.code, "bounce refused permanently; dropped");
                        finish(ctx, &p.entry, RcptState::Failed).await;
                        return Attempt::Done;
                    }
                    Some(RcptOutcome::Deferred(r)) => return Attempt::Retry(format!("{addr}: {} {}", r.code, r.text)),
                    None => return Attempt::Retry("no outcome".into()),
                },
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
    }
    Attempt::Retry(last)
}
