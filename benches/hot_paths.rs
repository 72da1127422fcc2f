//! Criterion benchmarks of the CPU hot paths (pure code only; no sockets, no disk).
//!
//! - `parse_command`: a realistic mix of SMTP command lines, in commands/s.
//! - `data_scan`: `DataReceiver` (terminator search, dot-unstuffing, the bare CR/LF, NUL,
//!   line-length, size and 8-bit checks, and the copy of the content into the output buffer)
//!   over a 1 MiB message of 80-octet ASCII lines with a dot-stuffed line every 50, fed in
//!   64 KiB reads, beside a plain `memchr::memmem` search for "\r\n.\r\n" over the same bytes
//!   (the baseline: the least any DATA scanner must do). Reported in bytes/s; the ratio of the
//!   two is the figure to watch. Two extra `DataReceiver` data points: the same text without
//!   stuffed lines, and 8-bit (UTF-8) text.
//!
//!   On x86-64 with AVX2 or AVX-512BW this measures `DataReceiver`'s SIMD fast path, which
//!   takes clean 64-octet blocks whole (and the part of a block before a stuffed line's dot);
//!   the terminator's block goes through its scalar state machine.

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

/// About `size` octets of copies of `line`, with a dot-stuffed line before every 50th when
/// `stuffed`, then the terminator.
fn message_of(size: usize, line: &[u8], stuffed: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(size + 8);
    let mut i = 0;
    while m.len() < size {
        if stuffed && i % 50 == 0 {
            m.extend_from_slice(b"..a dot-stuffed line\r\n");
        }
        m.extend_from_slice(line);
        i += 1;
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// The line of the ASCII messages.
const LOREM: &[u8] = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor\r\n";

/// The headline message: plain ASCII text with a dot-stuffed line every 50 lines.
fn message(size: usize) -> Vec<u8> {
    message_of(size, LOREM, true)
}

/// Feeds `msg` in 64 KiB reads, as the server would, and returns the output length.
fn receive(msg: &[u8], out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut d = DataReceiver::new(usize::MAX, 1000);
    for chunk in msg.chunks(64 * 1024) {
        if let Feed::Done(n) = d.feed(chunk, out) {
            black_box(n);
            break;
        }
    }
    out.len()
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
        b.iter(|| black_box(receive(black_box(&msg), &mut out)))
    });
    // Extra data points (same size within a line, same reads): no dot-stuffed lines at all, and
    // 8-bit (UTF-8) text.
    let plain = message_of(msg.len() - 3, LOREM, false);
    g.bench_function("DataReceiver, no stuffed lines", |b| {
        b.iter(|| black_box(receive(black_box(&plain), &mut out)))
    });
    let eight_bit = message_of(
        msg.len() - 3,
        "Größe, Übermaß, café, naïve, résumé, smörgåsbord, façade, à la carte\r\n".as_bytes(),
        true,
    );
    g.bench_function("DataReceiver, 8-bit text", |b| {
        b.iter(|| black_box(receive(black_box(&eight_bit), &mut out)))
    });
    g.finish();
}

criterion_group!(benches, commands, data_scan);
criterion_main!(benches);
