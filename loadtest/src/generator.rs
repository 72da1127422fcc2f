//! Submitting sessions: each one connects to the target, says EHLO, and sends messages until
//! the run's ids are used up (or `--per-conn` is reached, then it reconnects).
//!
//! With PIPELINING (RFC 2920) a message costs one round trip: the body of message k, its
//! terminator, and MAIL/RCPT/DATA of message k+1 go out in one write, and the replies come back
//! as one batch (250 for k's data, then 250, 250, 354 for k+1). Without it the session speaks
//! lock-step. The transaction latency recorded is from the write that carried MAIL to the 250
//! after the data.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ledger::Hists;
use crate::msg;
use crate::pool::{Local, Shared};
use crate::proto::{Conn, Reply};

/// A message whose DATA was accepted (354) and whose body is not yet acknowledged.
struct Pending {
    id: u64,
    t0: Instant,
    wire: Vec<u8>,
    size: usize,
}

/// Open-loop pacing for `--rate`: one message per `interval` per session, with at most one
/// second of catch-up after a stall.
struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn ready_now(&self) -> bool {
        self.interval.is_none() || Instant::now() >= self.next
    }

    async fn wait(&mut self) {
        let Some(iv) = self.interval else { return };
        let now = Instant::now();
        if self.next > now {
            glommio::timer::sleep(self.next - now).await;
        } else if now - self.next > Duration::from_secs(1) {
            self.next = now - Duration::from_secs(1);
        }
        self.next += iv;
    }
}

enum End {
    /// No more ids (or the per-connection limit was reached: reconnect).
    Finished { more: bool },
    /// The connection failed; `carry` was taken but never sent.
    Failed { carry: Option<u64> },
}

/// One submitting session: connections until the ids run out.
pub async fn session(sh: Arc<Shared>, local: Rc<Local>, idx: usize) {
    let interval = (sh.cfg.rate > 0.0).then(|| Duration::from_secs_f64(sh.cfg.sessions as f64 / sh.cfg.rate));
    // spread the sessions' first messages over one interval
    let offset = interval.map_or(Duration::ZERO, |iv| iv.mul_f64((idx % 1000) as f64 / 1000.0));
    let mut pacer = Pacer {
        interval,
        next: Instant::now() + offset,
    };
    let mut carry: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        let first = match carry.take() {
            Some(id) => id,
            None => {
                pacer.wait().await;
                match sh.ledger.take_id() {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        match connection(&sh, &local, first, &mut pacer).await {
            End::Finished { more } => {
                failures = 0;
                if !more {
                    return;
                }
            }
            End::Failed { carry: c } => {
                if sh.ledger.stop_submit.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                carry = c;
                failures += 1;
                if failures >= 100 {
                    sh.ledger
                        .sample(&format!("session {idx} gave up after 100 consecutive failures"));
                    return;
                }
                glommio::timer::sleep(Duration::from_millis(20 * u64::from(failures.min(25)))).await;
            }
        }
    }
}

fn fail(sh: &Shared, what: &str, e: impl std::fmt::Display) {
    sh.ledger.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    sh.ledger.sample(&format!("{what}: {e}"));
}

fn envelope(out: &mut Vec<u8>, domain: &str) {
    out.extend_from_slice(b"MAIL FROM:<loadtest@client.test>\r\nRCPT TO:<user@");
    out.extend_from_slice(domain.as_bytes());
    out.extend_from_slice(b">\r\nDATA\r\n");
}

/// Builds message `id` (dot-stuffed, with terminator) into a fresh buffer; returns it and the
/// message size.
fn wire_of(sh: &Shared, local: &Local, id: u64, domain: &str) -> (Vec<u8>, usize) {
    let mut m = local.scratch.take();
    m.clear();
    msg::build(
        &msg::Spec {
            nonce: sh.ledger.nonce,
            id,
            rcpt_domain: domain,
            t_ns: sh.ledger.now_ns(),
            size: sh.cfg.size,
            date: &sh.cfg.date,
        },
        &local.body,
        &mut m,
    );
    let mut wire = Vec::with_capacity(m.len() + 64);
    msg::dot_stuff_into(&m, &mut wire);
    let size = m.len();
    local.scratch.replace(m);
    (wire, size)
}

async fn connection(sh: &Shared, local: &Local, first: u64, pacer: &mut Pacer) -> End {
    let cfg = &sh.cfg;
    let ledger = &sh.ledger;
    let mut c = match Conn::connect(cfg.target, cfg.io_timeout).await {
        Ok(c) => c,
        Err(e) => {
            fail(sh, "connect", e);
            return End::Failed { carry: Some(first) };
        }
    };
    match c.read_reply().await {
        Ok(r) if r.code == 220 => {}
        Ok(r) => {
            ledger.sample(&format!("greeting: {}", r.line()));
            fail(sh, "greeting", r.line());
            c.quit().await;
            return End::Failed { carry: Some(first) };
        }
        Err(e) => {
            fail(sh, "greeting", e);
            return End::Failed { carry: Some(first) };
        }
    }
    let ehlo = match c.cmd("EHLO loadgen.client.test").await {
        Ok(r) if r.code == 250 => r,
        Ok(_) => match c.cmd("HELO loadgen.client.test").await {
            Ok(r) if r.code == 250 => Reply {
                code: 250,
                text: String::new(),
            },
            Ok(r) => {
                fail(sh, "HELO", r.line());
                return End::Failed { carry: Some(first) };
            }
            Err(e) => {
                fail(sh, "HELO", e);
                return End::Failed { carry: Some(first) };
            }
        },
        Err(e) => {
            fail(sh, "EHLO", e);
            return End::Failed { carry: Some(first) };
        }
    };
    let pipelining = ehlo.has_ext("PIPELINING") && !cfg.no_pipelining;
    let result = if pipelining {
        pipelined(sh, local, &mut c, first, pacer).await
    } else {
        lockstep(sh, local, &mut c, first, pacer).await
    };
    if matches!(result, End::Finished { .. }) {
        c.quit().await;
    }
    result
}

fn record_latency(local: &Local, t0: Instant) {
    let us = t0.elapsed().as_micros() as u64;
    Hists::record(&mut local.hists.borrow_mut().txn, us);
}

/// Takes the next id if the connection may carry another message.
async fn next_id(sh: &Shared, sent: usize, pacer: &mut Pacer, may_wait: bool) -> Option<u64> {
    let per_conn = sh.cfg.per_conn;
    if per_conn != 0 && sent >= per_conn {
        return None;
    }
    if !may_wait && !pacer.ready_now() {
        return None;
    }
    pacer.wait().await;
    sh.ledger.take_id()
}

async fn pipelined(sh: &Shared, local: &Local, c: &mut Conn, first: u64, pacer: &mut Pacer) -> End {
    let ledger = &sh.ledger;
    let mut pending: Option<Pending> = None;
    let mut env = Some(first);
    let mut sent = 0usize;
    let mut out = Vec::with_capacity(sh.cfg.size * 2 + 256);
    loop {
        if env.is_none() && sent > 0 {
            // piggyback the next envelope on the pending body only if it needs no waiting
            env = next_id(sh, sent, pacer, pending.is_none()).await;
        }
        if pending.is_none() && env.is_none() {
            let per_conn = sh.cfg.per_conn;
            return End::Finished {
                more: per_conn != 0 && sent >= per_conn,
            };
        }
        out.clear();
        if let Some(p) = &pending {
            out.extend_from_slice(&p.wire);
        }
        let mut next: Option<(u64, Vec<u8>, usize)> = None;
        if let Some(id) = env.take() {
            let domain = &sh.domains[ledger.node_of(id)];
            envelope(&mut out, domain);
            let (wire, size) = wire_of(sh, local, id, domain);
            next = Some((id, wire, size));
            sent += 1;
            ledger.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let t = Instant::now();
        if let Err(e) = c.write_all(&out).await {
            fail(sh, "write", e);
            return End::Failed { carry: None };
        }
        if let Some(p) = pending.take() {
            match c.read_reply().await {
                Ok(r) if r.ok() => {
                    record_latency(local, p.t0);
                    ledger.ack(p.id, p.size);
                }
                Ok(r) => ledger.reject(&format!("after data: {}", r.line())),
                Err(e) => {
                    fail(sh, "reply to data", e);
                    return End::Failed { carry: None };
                }
            }
        }
        if let Some((id, wire, size)) = next {
            let mut bad: Option<String> = None;
            let mut got354 = false;
            for (i, what) in ["MAIL", "RCPT", "DATA"].iter().enumerate() {
                match c.read_reply().await {
                    Ok(r) if i < 2 && r.ok() => {}
                    Ok(r) if i == 2 && r.code == 354 => got354 = true,
                    Ok(r) => {
                        if bad.is_none() {
                            bad = Some(format!("{what}: {}", r.line()));
                        }
                        if r.code == 421 {
                            ledger.reject(bad.as_deref().unwrap_or(""));
                            return End::Failed { carry: None };
                        }
                    }
                    Err(e) => {
                        fail(sh, &format!("reply to {what}"), e);
                        return End::Failed { carry: None };
                    }
                }
            }
            match (got354, bad) {
                (true, None) => pending = Some(Pending { id, t0: t, wire, size }),
                (false, Some(b)) => ledger.reject(&b),
                // 354 after a refused MAIL or RCPT (or no 354 and no refusal): out of sync
                (_, b) => {
                    fail(
                        sh,
                        "protocol",
                        b.unwrap_or_else(|| "DATA neither accepted nor refused".into()),
                    );
                    return End::Failed { carry: None };
                }
            }
        }
    }
}

async fn lockstep(sh: &Shared, local: &Local, c: &mut Conn, first: u64, pacer: &mut Pacer) -> End {
    let ledger = &sh.ledger;
    let mut id = first;
    let mut sent = 0usize;
    loop {
        let domain = &sh.domains[ledger.node_of(id)];
        sent += 1;
        ledger.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t0 = Instant::now();
        let steps = [
            "MAIL FROM:<loadtest@client.test>".to_string(),
            format!("RCPT TO:<user@{domain}>"),
            "DATA".to_string(),
        ];
        let mut refused = None;
        for (i, s) in steps.iter().enumerate() {
            match c.cmd(s).await {
                Ok(r) if (i < 2 && r.ok()) || (i == 2 && r.code == 354) => {}
                Ok(r) => {
                    refused = Some(r);
                    break;
                }
                Err(e) => {
                    fail(sh, s.split(':').next().unwrap_or(s), e);
                    return End::Failed { carry: None };
                }
            }
        }
        match refused {
            Some(r) => {
                ledger.reject(&r.line());
                if r.code == 421 {
                    return End::Failed { carry: None };
                }
                let _ = c.cmd("RSET").await;
            }
            None => {
                let (wire, size) = wire_of(sh, local, id, domain);
                if let Err(e) = c.write_all(&wire).await {
                    fail(sh, "write", e);
                    return End::Failed { carry: None };
                }
                match c.read_reply().await {
                    Ok(r) if r.ok() => {
                        record_latency(local, t0);
                        ledger.ack(id, size);
                    }
                    Ok(r) => ledger.reject(&format!("after data: {}", r.line())),
                    Err(e) => {
                        fail(sh, "reply to data", e);
                        return End::Failed { carry: None };
                    }
                }
            }
        }
        match next_id(sh, sent, pacer, true).await {
            Some(n) => id = n,
            None => {
                let per_conn = sh.cfg.per_conn;
                return End::Finished {
                    more: per_conn != 0 && sent >= per_conn,
                };
            }
        }
    }
}
