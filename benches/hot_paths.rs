//! Criterion benchmarks of the CPU hot paths (pure code only; no sockets, no disk).
//!
//! - `parse_command`: a realistic mix of SMTP command lines, in commands/s.
//! - `data_scan`: the DATA terminator search + dot-unstuffing state machine over a 1 MiB
//!   message, beside a plain `memchr::memmem` search for "\r\n.\r\n" over the same bytes (the
//!   baseline: the least any DATA scanner must do). Reported in bytes/s; the ratio of the two
//!   is the figure to watch.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use etrn_relay::smtp::data::{DataReceiver, Feed};
use etrn_relay::smtp::parser::parse_command;

fn commands(c: &mut Criterion) {
    let lines: [&[u8]; 8] = [
        b"EHLO client.example.test",
        b"MAIL FROM:<sender@client.example.test> SIZE=1024 BODY=8BITMIME",
        b"RCPT TO:<user@node1.test>",
        b"RCPT TO:<@hop.test:other@node2.test>",
        b"DATA",
        b"RSET",
        b"ETRN node1.test",
        b"QUIT",
    ];
    let mut g = c.benchmark_group("parse_command");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("mix of 8", |b| {
        b.iter(|| {
            for l in &lines {
                black_box(parse_command(black_box(l)).ok());
            }
        })
    });
    g.finish();
}

fn message(size: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(size + 8);
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor\r\n";
    let mut i = 0;
    while m.len() < size {
        if i % 50 == 0 {
            m.extend_from_slice(b"..a dot-stuffed line\r\n");
        }
        m.extend_from_slice(line);
        i += 1;
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn data_scan(c: &mut Criterion) {
    let msg = message(1 << 20);
    let mut g = c.benchmark_group("data_scan");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("baseline memmem CRLF.CRLF", |b| {
        let finder = memchr::memmem::Finder::new(b"\r\n.\r\n");
        b.iter(|| black_box(finder.find(black_box(&msg))))
    });
    let mut out = Vec::with_capacity(msg.len());
    g.bench_function("DataReceiver unstuff+checks, 64 KiB reads", |b| {
        b.iter(|| {
            out.clear();
            let mut d = DataReceiver::new(usize::MAX, 1000);
            for chunk in msg.chunks(64 * 1024) {
                if let Feed::Done(n) = d.feed(chunk, &mut out) {
                    black_box(n);
                    break;
                }
            }
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, commands, data_scan);
criterion_main!(benches);
