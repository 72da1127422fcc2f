//! The executor never sleeps while it has runnable tasks (a guard on the vendored glommio's
//! run loop, `third_party/glommio/PATCHES.md`, patch 7).
//!
//! Two tasks in a task queue whose latency matters (as a shard's sessions and ETRN are) pass a
//! token back and forth through local channels, so one of them is always runnable and the
//! executor never has a reason to sleep. The latency queue makes the executor keep a short
//! preemption timer armed, whose completions land in its latency ring at any moment. One that
//! landed between the reactor's poll and the scheduler's preemption check used to make the
//! scheduler run nothing, and the executor then went to sleep with both tasks still queued,
//! for good: nothing else was going to wake it. Here that shows as the ping-pong stopping.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel;
use glommio::{Latency, LocalExecutorBuilder, Shares};

#[test]
fn runnable_tasks_keep_running_while_preemption_timers_fire() {
    let (progress, watch) = mpsc::channel::<u64>();
    let run_for = Duration::from_secs(3);
    let worker = std::thread::spawn(move || {
        let ex = LocalExecutorBuilder::default().make().expect("executor");
        ex.run(async move {
            let tq = glommio::executor().create_task_queue(
                Shares::Static(1000),
                Latency::Matters(Duration::from_micros(50)),
                "ping-pong",
            );
            let (to_b, from_a) = local_channel::new_bounded::<u64>(1);
            let (to_a, from_b) = local_channel::new_bounded::<u64>(1);
            let b = glommio::spawn_local_into(
                async move {
                    while let Some(n) = from_a.recv().await {
                        if to_a.send(n + 1).await.is_err() {
                            break;
                        }
                    }
                },
                tq,
            )
            .expect("spawn b");
            let a = glommio::spawn_local_into(
                async move {
                    let start = Instant::now();
                    let mut n = 0u64;
                    while start.elapsed() < run_for {
                        to_b.send(n).await.expect("b is there");
                        n = from_b.recv().await.expect("b answers");
                        if n.is_multiple_of(1024) {
                            let _ = progress.send(n);
                        }
                    }
                    drop(to_b);
                    n
                },
                tq,
            )
            .expect("spawn a");
            let n = a.await;
            b.await;
            n
        })
    });
    let mut last = 0;
    loop {
        match watch.recv_timeout(Duration::from_secs(5)) {
            Ok(n) => last = n,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "the executor stopped running its runnable tasks after {last} round trips \
                 (asleep with work queued)"
            ),
        }
    }
    let total = worker.join().expect("executor thread");
    assert!(total > 10_000, "only {total} round trips in {run_for:?}");
}
