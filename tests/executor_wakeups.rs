//! The executor keeps running runnable tasks whatever its preemption timers do (a guard on
//! the vendored glommio's scheduler, `third_party/glommio/PATCHES.md`, patch 7).
//!
//! Two tasks in a task queue whose latency matters (as a shard's sessions and ETRN are) pass a
//! token back and forth through local channels, so one of them is always runnable and the
//! executor never has a reason to sleep. The latency queue makes the executor keep a short
//! preemption timer armed, whose completions land in its latency ring at any moment. One that
//! landed between the reactor's poll and the scheduler's preemption check used to make the
//! scheduler run nothing, and the executor then went to sleep with both tasks still queued,
//! for good: nothing else was going to wake it. With a latency of a microsecond or less the
//! timer has always fired by the time of that check, so a fix that only went round again
//! instead of sleeping would spin without running a task. Either shows as the ping-pong
//! stopping.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel;
use glommio::{Latency, LocalExecutorBuilder, Shares};

enum Report {
    Progress(u64),
    Done(u64),
}

/// Round trips of the ping-pong in `run_for`, or a panic if no progress is reported for 5 s.
fn ping_pong(latency: Duration, run_for: Duration) -> u64 {
    let (report, watch) = mpsc::channel::<Report>();
    let worker = std::thread::spawn(move || {
        let progress = report.clone();
        let ex = LocalExecutorBuilder::default().make().expect("executor");
        let total = ex.run(async move {
            let tq =
                glommio::executor().create_task_queue(Shares::Static(1000), Latency::Matters(latency), "ping-pong");
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
                        if n.is_multiple_of(256) {
                            let _ = progress.send(Report::Progress(n));
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
        });
        let _ = report.send(Report::Done(total));
    });
    let mut last = 0;
    loop {
        match watch.recv_timeout(Duration::from_secs(5)) {
            Ok(Report::Progress(n)) => last = n,
            Ok(Report::Done(total)) => {
                worker.join().expect("executor thread");
                return total;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the executor thread died"),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "with a {latency:?} latency queue the executor stopped running its runnable \
                 tasks after {last} round trips"
            ),
        }
    }
}

#[test]
fn runnable_tasks_keep_running_while_preemption_timers_fire() {
    let total = ping_pong(Duration::from_micros(50), Duration::from_secs(2));
    assert!(total > 10_000, "only {total} round trips");
}

#[test]
fn runnable_tasks_keep_running_when_the_preemption_timer_is_always_due() {
    let total = ping_pong(Duration::from_micros(1), Duration::from_secs(2));
    assert!(total > 10_000, "only {total} round trips");
}
