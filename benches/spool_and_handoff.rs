//! Criterion benchmarks of the spool commit path and the cross-shard hand-off.
//!
//! - `spool_commit`: 1 KiB records committed through `SpoolWriter` (write + fdatasync before
//!   `Ok`) on a glommio executor, with 1, 16 and 64 concurrent committers. Messages/s grows with
//!   the committers because one fdatasync covers every record that arrived meanwhile (group
//!   commit): the batching is the ratio between the rows. Uses a temporary directory on the
//!   same file system as the target dir (not tmpfs), so the syncs are real.
//! - `cross_shard_handoff`: `Inbox` reserve + send from one thread, receive on another, in
//!   messages/s (the path every message accepted on one shard for another shard's node takes).

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etrn_relay::runtime::{Inbox, ShardMsg};
use etrn_relay::spool::record::RecordBuilder;
use etrn_relay::spool::{SegmentId, SegmentTable, SpoolWriter};

fn record(i: u64) -> Vec<u8> {
    let mut b = RecordBuilder::new(i, 0, b"a@client.test", &[b"x@node1.test"], 1024);
    b.data_mut().extend(std::iter::repeat_n(b'x', 1022));
    b.data_mut().extend_from_slice(b"\r\n");
    b.finish(false)
}

fn spool_commit(c: &mut Criterion) {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tempfile::tempdir_in(&base).expect("temp dir next to the target dir");
    let seg_dir = dir.path().to_owned();
    let ex = glommio::LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("executor");
    let writer = ex.run({
        let seg_dir = seg_dir.clone();
        async move {
            SpoolWriter::start(
                seg_dir.clone(),
                0,
                32 << 20,
                std::time::Duration::ZERO,
                Rc::new(SegmentTable::new(seg_dir)),
            )
        }
    });
    let mut g = c.benchmark_group("spool_commit");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for committers in [1usize, 16, 64] {
        g.throughput(Throughput::Elements(committers as u64));
        g.bench_with_input(
            BenchmarkId::new("1KiB fsynced, concurrent committers", committers),
            &committers,
            |b, &n| {
                b.iter_custom(|iters| {
                    let writer = writer.clone();
                    ex.run(async move {
                        let t0 = Instant::now();
                        for it in 0..iters {
                            let tasks: Vec<_> = (0..n)
                                .map(|k| {
                                    let w = writer.clone();
                                    glommio::spawn_local(async move {
                                        w.commit(record(it * 1000 + k as u64), 1, None).await.expect("commit")
                                    })
                                })
                                .collect();
                            for t in tasks {
                                t.await;
                            }
                        }
                        t0.elapsed()
                    })
                })
            },
        );
    }
    g.finish();
    ex.run(async move { writer.close().await });
}

fn cross_shard_handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_shard_handoff");
    const N: u64 = 100_000;
    g.throughput(Throughput::Elements(N));
    g.bench_function("Inbox reserve+send, receive on another thread", |b| {
        b.iter(|| {
            let (tx, rx) = Inbox::new(4096);
            let consumer = std::thread::spawn(move || {
                futures_lite::future::block_on(async move {
                    let mut n = 0;
                    while n < N {
                        rx.recv().await.expect("message");
                        n += 1;
                    }
                })
            });
            let mut sent = 0;
            while sent < N {
                if tx
                    .try_send(ShardMsg::PartsDone {
                        seg: SegmentId(sent),
                        parts: 1,
                    })
                    .is_ok()
                {
                    sent += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
            consumer.join().expect("consumer");
        })
    });
    g.finish();
}

criterion_group!(benches, spool_commit, cross_shard_handoff);
criterion_main!(benches);
