//! ETRN clients (RFC 1985): a dial-up node coming online connects from its own address, says
//! EHLO, authenticates when asked (AUTH PLAIN or CRAM-MD5 as user `nodeN`), and sends
//! `ETRN nodeN.test`. The time from the ETRN write to its reply goes into a histogram.
//!
//! Also here: the dial-in loop of the `mixed` scenario, and the probes that keep asking ETRN
//! on persistent connections while a flush runs, to measure the reply latency under load.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ledger::Hists;
use crate::net::{connect_from, node_ip, node_name, probe_ip};
use crate::pool::{Local, Shared};
use crate::proto::{authenticate, AuthMech, Conn, Reply};

/// The outcome of one ETRN for a node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// Node index.
    pub node: usize,
    /// Reply code (0 when the session failed before the ETRN reply).
    pub code: u16,
    /// Reply text or the error.
    pub text: String,
}

impl Outcome {
    /// The pending count of a `253 ... <n> pending messages ...` reply.
    pub fn pending_count(&self) -> Option<u64> {
        if self.code != 253 {
            return None;
        }
        let w: Vec<&str> = self.text.split_whitespace().collect();
        w.iter()
            .position(|x| *x == "pending")
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| w[i].parse().ok())
    }
}

/// The AUTH user of node `k`.
pub fn user_of(k: usize) -> String {
    format!("node{}", k + 1)
}

async fn open(sh: &Shared, src: IpAddr, helo: &str) -> Result<Conn, String> {
    let dst: SocketAddr = sh.cfg.target;
    let stream = connect_from(src, dst, sh.cfg.io_timeout).map_err(|e| format!("connect from {src}: {e}"))?;
    let mut c = Conn::new(stream, sh.cfg.io_timeout).map_err(|e| e.to_string())?;
    let g = c.read_reply().await.map_err(|e| format!("greeting: {e}"))?;
    if g.code != 220 {
        return Err(format!("greeting: {}", g.line()));
    }
    let r = c.cmd(&format!("EHLO {helo}")).await.map_err(|e| format!("EHLO: {e}"))?;
    if r.code != 250 {
        return Err(format!("EHLO: {}", r.line()));
    }
    Ok(c)
}

/// One dial-in of node `k`: connect from its address, AUTH if configured, ETRN, QUIT.
/// With `flush_start`, the ETRN's send time is recorded as the node's flush start.
pub async fn dial_in(sh: &Shared, local: &Local, k: usize, flush_start: bool) -> Outcome {
    let fail = |text: String| Outcome { node: k, code: 0, text };
    let name = node_name(k);
    let mut c = match open(sh, IpAddr::V4(node_ip(k)), &name).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if sh.cfg.auth != AuthMech::None {
        match authenticate(&mut c, sh.cfg.auth, &user_of(k), &sh.cfg.password).await {
            Ok(Ok(())) => {}
            Ok(Err(r)) => return fail(format!("AUTH: {}", r.line())),
            Err(e) => return fail(format!("AUTH: {e}")),
        }
    }
    let t = Instant::now();
    if flush_start {
        sh.ledger.etrn_ns[k].fetch_min(sh.ledger.now_ns(), Relaxed);
    }
    let r: Reply = match c.cmd(&format!("ETRN {name}")).await {
        Ok(r) => r,
        Err(e) => return fail(format!("ETRN: {e}")),
    };
    Hists::record(&mut local.hists.borrow_mut().etrn, t.elapsed().as_micros() as u64);
    c.quit().await;
    Outcome {
        node: k,
        code: r.code,
        text: r.text,
    }
}

/// The `mixed` scenario's node `k`: dial in at random intervals (uniform in 0..2*mean) until
/// told to stop. Returns the outcomes that were not 2xx.
pub async fn dial_loop(sh: Arc<Shared>, local: std::rc::Rc<Local>, k: usize, mean: Duration) -> Vec<Outcome> {
    let mut bad = Vec::new();
    loop {
        let wait = mean.mul_f64(2.0 * fastrand::f64());
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if sh.ledger.stop_dial.load(Relaxed) {
                return bad;
            }
            glommio::timer::sleep((until - Instant::now()).min(Duration::from_millis(50))).await;
        }
        if sh.ledger.stop_dial.load(Relaxed) {
            return bad;
        }
        let o = dial_in(&sh, &local, k, false).await;
        if !(200..300).contains(&o.code) && bad.len() < 10 {
            bad.push(o);
        }
    }
}

/// Probe `j`: one connection from `probe_ip(j)` asking `ETRN` for the nodes in turn every
/// `every` until told to stop. Replies go into the probe histogram. Returns the number of
/// replies that were not 2xx, and a sample of them.
pub async fn probe(
    sh: Arc<Shared>,
    local: std::rc::Rc<Local>,
    j: usize,
    nodes: Vec<usize>,
    every: Duration,
) -> (u64, Option<String>) {
    let mut c = match open(&sh, IpAddr::V4(probe_ip(j)), &format!("probe{j}.client.test")).await {
        Ok(c) => c,
        Err(e) => return (1, Some(e)),
    };
    let (mut bad, mut sample) = (0u64, None);
    // start at a random point of the interval so the probes do not ask in lock-step
    glommio::timer::sleep(every.mul_f64(fastrand::f64())).await;
    let mut i = j;
    while !sh.ledger.stop_probe.load(Relaxed) && !nodes.is_empty() {
        let k = nodes[i % nodes.len()];
        i += 1;
        let t = Instant::now();
        match c.cmd(&format!("ETRN {}", node_name(k))).await {
            Ok(r) => {
                Hists::record(&mut local.hists.borrow_mut().probe, t.elapsed().as_micros() as u64);
                if !r.ok() {
                    bad += 1;
                    sample.get_or_insert_with(|| r.line());
                }
            }
            Err(e) => {
                bad += 1;
                sample.get_or_insert_with(|| e.to_string());
                return (bad, sample);
            }
        }
        let next = t + every;
        let now = Instant::now();
        if next > now {
            glommio::timer::sleep(next - now).await;
        }
    }
    c.quit().await;
    (bad, sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_count_parsing() {
        let o = |code, text: &str| Outcome {
            node: 0,
            code,
            text: text.into(),
        };
        assert_eq!(
            o(253, "2.0.0 OK, 12 pending messages for node node1.test started").pending_count(),
            Some(12)
        );
        assert_eq!(o(250, "Queuing started").pending_count(), None);
        assert_eq!(o(253, "OK").pending_count(), None);
        assert_eq!(user_of(0), "node1");
    }
}
