//! ETRN clients (RFC 1985): a dial-up node coming online connects from its own address, says
//! EHLO, authenticates when asked (AUTH PLAIN or CRAM-MD5 as user `nodeN`), and sends
//! `ETRN nodeN.test`. The time from the ETRN write to its reply goes into a histogram.
//!
//! Also here: the dial-in loop of the `mixed` scenario, and the probes that keep asking ETRN
//! on persistent connections while a flush runs, to measure the reply latency under load.
//! The probes run on a thread of their own ([`ProbeThread`]), at real-time priority where the
//! system allows it: on the executors they would be timed by threads that also run the sinks
//! taking the flush, and a probe would count their wait for a CPU as the server's latency.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ledger::Hists;
use crate::net::{connect_from, connect_from_blocking, node_ip, node_name, probe_ip};
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

/// What the probe thread measured.
pub struct ProbeResult {
    /// Replies that were not 2xx (or sessions that failed).
    pub bad: u64,
    /// One of them.
    pub sample: Option<String>,
    /// The scheduling the thread got: `SCHED_FIFO`, `nice -10` or `normal`.
    pub priority: &'static str,
}

/// The ETRN probes of a flush on a plain thread: blocking sockets, one ETRN at a time, each
/// probe `j` asking from `probe_ip(j)` every `every` for the nodes in turn, until the
/// ledger's `stop_probe`. Reply times go into the shared probe histogram.
pub struct ProbeThread {
    handle: std::thread::JoinHandle<ProbeResult>,
}

impl ProbeThread {
    /// Starts the thread, pinned to `cpus` when given (the generator's CPUs).
    pub fn start(
        sh: Arc<Shared>,
        ids: Vec<usize>,
        nodes: Vec<usize>,
        every: Duration,
        cpus: Option<Vec<usize>>,
    ) -> ProbeThread {
        let handle = std::thread::Builder::new()
            .name("etrn-probes".into())
            .spawn(move || {
                if let Some(cpus) = &cpus {
                    pin_this_thread(cpus);
                }
                let priority = raise_this_thread();
                let (bad, sample) = run_probes(&sh, &ids, &nodes, every);
                ProbeResult { bad, sample, priority }
            })
            .expect("spawn the probe thread");
        ProbeThread { handle }
    }

    /// Waits for the thread (after `stop_probe` was set).
    pub fn join(self) -> ProbeResult {
        self.handle.join().unwrap_or(ProbeResult {
            bad: 1,
            sample: Some("the probe thread panicked".into()),
            priority: "normal",
        })
    }
}

fn pin_this_thread(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t filled with CPU_SET, passed with its size, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// SCHED_FIFO (priority 1) if permitted, else nice -10 if permitted, else nothing.
fn raise_this_thread() -> &'static str {
    // SAFETY: plain scheduler calls on the calling thread (pid 0 / PRIO_PROCESS of its tid).
    unsafe {
        let param = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 {
            return "SCHED_FIFO";
        }
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, -10) == 0 {
            return "nice -10";
        }
    }
    "normal"
}

/// A blocking SMTP client connection of the probe thread.
struct BlockingConn {
    out: std::net::TcpStream,
    inp: std::io::BufReader<std::net::TcpStream>,
}

impl BlockingConn {
    fn open(sh: &Shared, src: IpAddr, helo: &str) -> Result<BlockingConn, String> {
        let dst: SocketAddr = sh.cfg.target;
        let out = connect_from_blocking(src, dst, sh.cfg.io_timeout).map_err(|e| format!("connect from {src}: {e}"))?;
        out.set_read_timeout(Some(sh.cfg.io_timeout))
            .map_err(|e| e.to_string())?;
        out.set_write_timeout(Some(sh.cfg.io_timeout))
            .map_err(|e| e.to_string())?;
        let inp = std::io::BufReader::new(out.try_clone().map_err(|e| e.to_string())?);
        let mut c = BlockingConn { out, inp };
        let g = c.reply().map_err(|e| format!("greeting: {e}"))?;
        if g.code != 220 {
            return Err(format!("greeting: {}", g.line()));
        }
        let r = c.cmd(&format!("EHLO {helo}")).map_err(|e| format!("EHLO: {e}"))?;
        if r.code != 250 {
            return Err(format!("EHLO: {}", r.line()));
        }
        Ok(c)
    }

    /// Reads one complete reply (parsed by [`Reply::add_line`], as [`Conn`] does).
    fn reply(&mut self) -> std::io::Result<Reply> {
        use std::io::BufRead;
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if self.inp.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
            let l = line.strip_suffix('\n').unwrap_or(&line);
            if let Some(reply) = Reply::add_line(&mut text, l.strip_suffix('\r').unwrap_or(l))? {
                return Ok(reply);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> std::io::Result<Reply> {
        use std::io::Write;
        self.out.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }
}

fn run_probes(sh: &Shared, ids: &[usize], nodes: &[usize], every: Duration) -> (u64, Option<String>) {
    let (mut bad, mut sample) = (0u64, None::<String>);
    let mut conns = Vec::new();
    let start = Instant::now();
    for &j in ids {
        match BlockingConn::open(sh, IpAddr::V4(probe_ip(j)), &format!("probe{j}.client.test")) {
            // start at a random point of the interval so the probes do not ask in lock-step
            Ok(c) => conns.push((c, start + every.mul_f64(fastrand::f64()), j)),
            Err(e) => {
                bad += 1;
                sample.get_or_insert(e);
            }
        }
    }
    while !sh.ledger.stop_probe.load(Relaxed) && !nodes.is_empty() && !conns.is_empty() {
        let (i, due) = conns
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.1))
            .min_by_key(|(_, due)| *due)
            .expect("not empty");
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(20)));
            continue;
        }
        let (c, next, turn) = &mut conns[i];
        let k = nodes[*turn % nodes.len()];
        *turn += 1;
        let t = Instant::now();
        match c.cmd(&format!("ETRN {}", node_name(k))) {
            Ok(r) => {
                let us = t.elapsed().as_micros() as u64;
                Hists::record(&mut sh.ledger.hists.lock().unwrap_or_else(|e| e.into_inner()).probe, us);
                if !r.ok() {
                    bad += 1;
                    sample.get_or_insert_with(|| r.line());
                }
                *next = t + every;
            }
            Err(e) => {
                bad += 1;
                sample.get_or_insert(e.to_string());
                conns.swap_remove(i);
            }
        }
    }
    for (c, _, _) in &mut conns {
        let _ = c.cmd("QUIT");
    }
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
