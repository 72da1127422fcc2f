//! The generator's executors: one glommio executor per generator core
//! (`LocalExecutorPoolBuilder`), each running a share of the submitting sessions, a listener on
//! every sink address, and a share of the ETRN clients. The main thread drives them with
//! commands over one channel per executor and hears back over one event channel; it never
//! runs protocol code itself.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement};

use crate::etrn::{self, Outcome};
use crate::generator;
use crate::ledger::{Hists, Ledger};
use crate::msg::BodyPool;
use crate::proto::AuthMech;
use crate::sink;

/// Settings of one run, the same on every executor.
#[derive(Debug, Clone)]
pub struct RunCfg {
    /// The server under test.
    pub target: SocketAddr,
    /// Submitting sessions in total.
    pub sessions: usize,
    /// Message size in octets.
    pub size: usize,
    /// Messages per connection (0: unlimited).
    pub per_conn: usize,
    /// Total submission rate in messages/s (0: as fast as possible).
    pub rate: f64,
    /// Do not pipeline even when the server offers PIPELINING.
    pub no_pipelining: bool,
    /// AUTH for the ETRN clients.
    pub auth: AuthMech,
    /// Password of every node's AUTH user.
    pub password: String,
    /// Port of every sink.
    pub sink_port: u16,
    /// Read/write/connect timeout of every client connection.
    pub io_timeout: Duration,
    /// `Date:` of the messages.
    pub date: String,
}

/// What every executor shares: settings, node names and the ledger.
pub struct Shared {
    /// Settings.
    pub cfg: RunCfg,
    /// The domain of every node.
    pub domains: Vec<String>,
    /// Book-keeping.
    pub ledger: Ledger,
}

/// Per-executor state.
pub struct Local {
    /// Histograms, merged into the ledger's every 200 ms.
    pub hists: RefCell<Hists>,
    /// Body text.
    pub body: BodyPool,
    /// Reusable buffer for building messages.
    pub scratch: RefCell<Vec<u8>>,
    /// Set at shutdown: accept loops and timers end.
    pub stopping: std::cell::Cell<bool>,
    /// File descriptors of the sink listeners and open sink connections, shut down at the end
    /// (glommio does not drop detached tasks when an executor ends, so their sockets would
    /// otherwise stay open, and a later run's SO_REUSEPORT listeners would share the address
    /// with dead ones).
    pub fds: RefCell<std::collections::HashSet<std::os::fd::RawFd>>,
}

impl Local {
    /// Shuts down every registered socket so the tasks that own them finish and close them.
    fn shutdown_sockets(&self) {
        self.stopping.set(true);
        for fd in self.fds.borrow().iter() {
            // SAFETY: shutdown(2) on a descriptor we registered and still own.
            unsafe {
                libc::shutdown(*fd, libc::SHUT_RDWR);
            }
        }
    }
}

/// A command from the main thread to one executor.
#[derive(Debug)]
pub enum Cmd {
    /// Start this many submitting sessions.
    Submit(usize),
    /// Dial in once from each of these nodes (flush start).
    Etrn(Vec<usize>),
    /// Dial in from these nodes at random intervals of this mean until `stop_dial`.
    Dial(Vec<usize>, Duration),
    /// Stop.
    Shutdown,
}

/// What an executor reports.
#[derive(Debug)]
pub enum Event {
    /// Sinks bound (or why not).
    Ready(Result<(), String>),
    /// All sessions of a `Submit` finished.
    SubmitDone,
    /// The dial-ins of an `Etrn`.
    EtrnDone(Vec<Outcome>),
    /// The dial loops ended; the non-2xx outcomes.
    DialDone(Vec<Outcome>),
}

/// The running executors.
pub struct Pool {
    txs: Vec<async_channel::Sender<Cmd>>,
    /// Events from the executors.
    pub events: mpsc::Receiver<Event>,
    handles: Option<glommio::PoolThreadHandles<()>>,
}

/// Where the generator's executors run.
#[derive(Debug, Clone)]
pub enum Cores {
    /// This many executors, not pinned.
    Unbound(usize),
    /// One executor pinned to each of these CPUs.
    Pinned(Vec<usize>),
}

impl Cores {
    /// Number of executors.
    pub fn count(&self) -> usize {
        match self {
            Cores::Unbound(n) => *n,
            Cores::Pinned(c) => c.len(),
        }
    }
}

impl Pool {
    /// Starts the executors and waits until every one has bound its sinks.
    pub fn start(sh: Arc<Shared>, cores: &Cores) -> Result<Pool, String> {
        let n = cores.count().max(1);
        let placement = match cores {
            Cores::Unbound(_) => PoolPlacement::Unbound(n),
            Cores::Pinned(cpus) => {
                let online = CpuSet::online().map_err(|e| format!("cannot read the CPU topology: {e}"))?;
                let mut sets = Vec::new();
                for c in cpus {
                    let set = online.clone().filter(|l| l.cpu == *c);
                    if set.is_empty() {
                        return Err(format!("--cores: CPU {c} is not online"));
                    }
                    sets.push(set);
                }
                PoolPlacement::Custom(sets)
            }
        };
        let (ev_tx, events) = mpsc::channel();
        let mut txs = Vec::new();
        let mut rxs = Vec::new();
        for _ in 0..n {
            let (tx, rx) = async_channel::unbounded();
            txs.push(tx);
            rxs.push(Some(rx));
        }
        let rxs = Arc::new(Mutex::new(rxs));
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let handles = LocalExecutorPoolBuilder::new(placement)
            .name("loadgen")
            .on_all_shards(move || {
                let idx = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let rx = rxs.lock().unwrap_or_else(|e| e.into_inner())[idx]
                    .take()
                    .expect("one receiver per executor");
                worker(sh, rx, ev_tx, idx)
            })
            .map_err(|e| format!("cannot start the generator executors: {e}"))?;
        let mut pool = Pool {
            txs,
            events,
            handles: Some(handles),
        };
        for _ in 0..n {
            match pool.events.recv_timeout(Duration::from_secs(60)) {
                Ok(Event::Ready(Ok(()))) => {}
                Ok(Event::Ready(Err(e))) => {
                    pool.shutdown();
                    return Err(e);
                }
                Ok(other) => return Err(format!("unexpected event during start-up: {other:?}")),
                Err(_) => {
                    pool.shutdown();
                    return Err("the generator executors did not start within 60 s".into());
                }
            }
        }
        Ok(pool)
    }

    /// Number of executors.
    pub fn size(&self) -> usize {
        self.txs.len()
    }

    /// Sends a command to executor `i`.
    pub fn send(&self, i: usize, cmd: Cmd) {
        let _ = self.txs[i].try_send(cmd);
    }

    /// Splits `items` round-robin over the executors; returns the share of each.
    pub fn split<T: Clone>(&self, items: &[T]) -> Vec<Vec<T>> {
        let n = self.size();
        let mut shares = vec![Vec::new(); n];
        for (i, it) in items.iter().enumerate() {
            shares[i % n].push(it.clone());
        }
        shares
    }

    /// Stops every executor and waits for them.
    pub fn shutdown(&mut self) {
        for tx in &self.txs {
            let _ = tx.try_send(Cmd::Shutdown);
        }
        if let Some(h) = self.handles.take() {
            let _ = h.join_all();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a task of the ETRN task queue returns.
enum EtrnTaskOut {
    /// One dial-in.
    One(Outcome),
    /// A dial loop's non-2xx outcomes.
    Many(Vec<Outcome>),
}

async fn worker(sh: Arc<Shared>, rx: async_channel::Receiver<Cmd>, ev: mpsc::Sender<Event>, idx: usize) {
    let local = Rc::new(Local {
        hists: RefCell::new(Hists::default()),
        body: BodyPool::new(sh.ledger.nonce ^ idx as u64),
        scratch: RefCell::new(Vec::new()),
        stopping: std::cell::Cell::new(false),
        fds: RefCell::new(std::collections::HashSet::new()),
    });
    if let Err(e) = sink::start(&sh, &local) {
        let _ = ev.send(Event::Ready(Err(e.to_string())));
        return;
    }
    let _ = ev.send(Event::Ready(Ok(())));
    // ETRN clients and probes measure reply latency: they run in their own task queue, which
    // the scheduler prefers to the sessions and sinks, so the measurement is of the server and
    // not of this executor's backlog.
    let etrn_tq = glommio::executor().create_task_queue(
        glommio::Shares::Static(1000),
        glommio::Latency::Matters(Duration::from_micros(500)),
        "etrn",
    );
    let spawn_etrn = move |f: std::pin::Pin<Box<dyn std::future::Future<Output = EtrnTaskOut>>>| {
        glommio::spawn_local_into(f, etrn_tq).expect("the etrn task queue exists")
    };
    {
        let (sh, local) = (sh.clone(), local.clone());
        glommio::spawn_local(async move {
            while !local.stopping.get() {
                glommio::timer::sleep(Duration::from_millis(200)).await;
                local.hists.borrow_mut().merge_into(&sh.ledger.hists);
            }
        })
        .detach();
    }
    let mut session_no = idx;
    while let Ok(cmd) = rx.recv().await {
        let (sh2, local2, ev2) = (sh.clone(), local.clone(), ev.clone());
        match cmd {
            Cmd::Submit(n) => {
                let tasks: Vec<_> = (0..n)
                    .map(|_| {
                        session_no += 1;
                        glommio::spawn_local(generator::session(sh.clone(), local.clone(), session_no))
                    })
                    .collect();
                glommio::spawn_local(async move {
                    for t in tasks {
                        t.await;
                    }
                    let _ = ev2.send(Event::SubmitDone);
                })
                .detach();
            }
            Cmd::Etrn(nodes) => {
                let tasks: Vec<_> = nodes
                    .into_iter()
                    .map(|k| {
                        let (sh, local) = (sh.clone(), local.clone());
                        spawn_etrn(Box::pin(async move {
                            EtrnTaskOut::One(etrn::dial_in(&sh, &local, k, true).await)
                        }))
                    })
                    .collect();
                glommio::spawn_local(async move {
                    let mut out = Vec::new();
                    for t in tasks {
                        if let EtrnTaskOut::One(o) = t.await {
                            out.push(o);
                        }
                    }
                    let _ = ev2.send(Event::EtrnDone(out));
                })
                .detach();
            }
            Cmd::Dial(nodes, mean) => {
                let tasks: Vec<_> = nodes
                    .into_iter()
                    .map(|k| {
                        let (sh, local) = (sh2.clone(), local2.clone());
                        spawn_etrn(Box::pin(async move {
                            EtrnTaskOut::Many(etrn::dial_loop(sh, local, k, mean).await)
                        }))
                    })
                    .collect();
                glommio::spawn_local(async move {
                    let mut bad = Vec::new();
                    for t in tasks {
                        if let EtrnTaskOut::Many(b) = t.await {
                            bad.extend(b);
                        }
                    }
                    let _ = ev2.send(Event::DialDone(bad));
                })
                .detach();
            }
            Cmd::Shutdown => break,
        }
    }
    local.shutdown_sockets();
    // let the accept loops and connections see the shutdown and close their sockets
    for _ in 0..100 {
        if local.fds.borrow().is_empty() {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    local.hists.borrow_mut().merge_into(&sh.ledger.hists);
}
