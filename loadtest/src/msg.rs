//! Test messages: how each one carries its identity and a checksum, and how a sink verifies it.
//!
//! A message is ordinary RFC 5322 text with CRLF line ends, 7-bit, at the requested size:
//!
//! ```text
//! From: <loadtest@client.test>            (not covered: a server may rewrite these)
//! To: <user@node3.test>
//! Subject: etrn-loadtest 42
//! Date: ...
//! Message-ID: <...@loadtest.test>
//! X-Loadtest-Sum: 1a2b3c4d 1000           CRC-32 and length of everything after this line
//! X-Loadtest-Id: 00c0ffee00c0ffee-42      run nonce and message id
//! X-Loadtest-Time: 123456789              submission time, ns since the run's epoch
//!
//! body lines (some start with '.', to exercise dot-stuffing)
//! ```
//!
//! Servers prepend `Received:` lines, which the checksum does not cover; everything from the
//! `X-Loadtest-Id` line to the end of the body must arrive byte for byte.

/// Header that carries the checksum.
const SUM: &[u8] = b"X-Loadtest-Sum: ";
/// Header that carries the run nonce and message id.
const ID: &[u8] = b"X-Loadtest-Id: ";
/// Header that carries the submission time.
const TIME: &[u8] = b"X-Loadtest-Time: ";

/// Line length of the body pool, CRLF included.
const LINE: usize = 78;
/// Lines in the body pool.
const POOL_LINES: usize = 509;

/// Pseudo-random printable body lines, shared by every message of an executor; each message
/// starts at a different line, so bodies differ between neighbours.
pub struct BodyPool {
    bytes: Vec<u8>,
}

impl BodyPool {
    /// A pool from `seed`. Every 7th line starts with a '.', some lines end in spaces.
    pub fn new(seed: u64) -> BodyPool {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut bytes = Vec::with_capacity(LINE * POOL_LINES);
        for i in 0..POOL_LINES {
            for j in 0..LINE - 2 {
                let c = if j == 0 && i % 7 == 0 {
                    b'.'
                } else {
                    // printable ASCII without ':' so no body line looks like a header
                    let c = rng.u8(b' '..=b'~');
                    if c == b':' {
                        b';'
                    } else {
                        c
                    }
                };
                bytes.push(c);
            }
            bytes.extend_from_slice(b"\r\n");
        }
        BodyPool { bytes }
    }
}

/// What a message is made of.
pub struct Spec<'a> {
    /// Run nonce (distinguishes this run's mail from stale mail of an earlier run).
    pub nonce: u64,
    /// Message id, unique in the run.
    pub id: u64,
    /// Recipient domain.
    pub rcpt_domain: &'a str,
    /// Submission time in ns since the run's epoch.
    pub t_ns: u64,
    /// Total size in octets (the message grows to at least its headers).
    pub size: usize,
    /// RFC 5322 date for the `Date:` header.
    pub date: &'a str,
}

/// Appends the (unstuffed) message of `spec` to `out`.
pub fn build(spec: &Spec<'_>, pool: &BodyPool, out: &mut Vec<u8>) {
    use std::io::Write;
    let start = out.len();
    let _ = write!(
        out,
        "From: <loadtest@client.test>\r\nTo: <user@{d}>\r\nSubject: etrn-loadtest {id}\r\nDate: {date}\r\n\
         Message-ID: <{n:016x}.{id}@loadtest.test>\r\n",
        d = spec.rcpt_domain,
        id = spec.id,
        date = spec.date,
        n = spec.nonce
    );
    let sum_at = out.len();
    // placeholder of fixed width, filled in below
    out.extend_from_slice(SUM);
    out.extend_from_slice(b"00000000 0000000000\r\n");
    let covered = out.len();
    let _ = write!(
        out,
        "X-Loadtest-Id: {:016x}-{}\r\nX-Loadtest-Time: {}\r\n\r\n",
        spec.nonce, spec.id, spec.t_ns
    );
    let want = spec.size.saturating_sub(out.len() - start);
    let mut line = (spec.id as usize).wrapping_mul(31) % POOL_LINES;
    let mut left = want;
    while left > 0 {
        let l = &pool.bytes[line * LINE..(line + 1) * LINE];
        if left >= LINE {
            out.extend_from_slice(l);
            left -= LINE;
        } else if left >= 3 {
            out.extend_from_slice(&l[..left - 2]);
            out.extend_from_slice(b"\r\n");
            left = 0;
        } else {
            out.extend_from_slice(b"\r\n");
            left = 0;
        }
        line = (line + 1) % POOL_LINES;
    }
    let crc = crc32fast::hash(&out[covered..]);
    let len = out.len() - covered;
    let field = format!("{crc:08x} {len:010}\r\n");
    out[sum_at + SUM.len()..covered].copy_from_slice(field.as_bytes());
}

/// Appends `msg` dot-stuffed (RFC 5321 4.5.2) and the `.` terminator line to `out`.
/// `msg` must end with CRLF.
pub fn dot_stuff_into(msg: &[u8], out: &mut Vec<u8>) {
    out.reserve(msg.len() + 64);
    let mut from = 0;
    if msg.first() == Some(&b'.') {
        out.push(b'.');
    }
    for i in memchr::memmem::find_iter(msg, b"\r\n.") {
        out.extend_from_slice(&msg[from..i + 2]);
        out.push(b'.');
        from = i + 2;
    }
    out.extend_from_slice(&msg[from..]);
    out.extend_from_slice(b".\r\n");
}

/// Removes dot-stuffing from message data (without its terminator line).
pub fn unstuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut from = 0;
    if data.first() == Some(&b'.') {
        from = 1;
    }
    for i in memchr::memmem::find_iter(data, b"\r\n.") {
        out.extend_from_slice(&data[from..i + 2]);
        from = i + 3;
    }
    if from <= data.len() {
        out.extend_from_slice(&data[from..]);
    }
    out
}

/// What a sink found in a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Checksum and length match.
    Intact {
        /// Run nonce.
        nonce: u64,
        /// Message id.
        id: u64,
        /// Submission time (ns since the run's epoch).
        t_ns: u64,
    },
    /// The id could be read but the covered bytes differ.
    Corrupt {
        /// Run nonce.
        nonce: u64,
        /// Message id.
        id: u64,
    },
    /// No readable checksum or id: not one of ours, or damaged beyond recognition.
    Unrecognized,
}

fn header_value<'a>(msg: &'a [u8], name: &[u8]) -> Option<(usize, &'a [u8])> {
    let at = if msg.starts_with(name) {
        0
    } else {
        let mut pat = b"\r\n".to_vec();
        pat.extend_from_slice(name);
        memchr::memmem::find(msg, &pat)? + 2
    };
    let v = at + name.len();
    let end = v + memchr::memmem::find(&msg[v..], b"\r\n")?;
    Some((end + 2, &msg[v..end]))
}

fn parse_id(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (n, id) = s.split_once('-')?;
    Some((u64::from_str_radix(n, 16).ok()?, id.parse().ok()?))
}

/// Checks an unstuffed received message.
pub fn verify(msg: &[u8]) -> Verdict {
    let Some((covered, sum)) = header_value(msg, SUM) else {
        return Verdict::Unrecognized;
    };
    let id_of = |m: &[u8]| header_value(m, ID).and_then(|(_, v)| parse_id(v));
    let parsed = std::str::from_utf8(sum).ok().and_then(|s| {
        let (c, l) = s.split_once(' ')?;
        Some((u32::from_str_radix(c, 16).ok()?, l.parse::<usize>().ok()?))
    });
    let body = &msg[covered..];
    let Some((nonce, id)) = id_of(body) else {
        return Verdict::Unrecognized;
    };
    match parsed {
        Some((crc, len)) if len == body.len() && crc == crc32fast::hash(body) => {
            let t_ns = header_value(body, TIME)
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0);
            Verdict::Intact { nonce, id, t_ns }
        }
        _ => Verdict::Corrupt { nonce, id },
    }
}

/// An RFC 5322 date (UTC) for `unix` seconds.
pub fn rfc5322_date(unix: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(unix);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][((unix / 86400) % 7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][m as usize - 1];
    format!("{wd}, {d:02} {mon} {y} {hh:02}:{mm:02}:{ss:02} +0000")
}

/// (year, month, day, hour, minute, second) in UTC for `unix` seconds (Howard Hinnant's
/// days-to-civil algorithm).
pub fn civil(unix: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (secs / 3600) as u32,
        ((secs % 3600) / 60) as u32,
        (secs % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(id: u64, size: usize) -> Vec<u8> {
        let pool = BodyPool::new(7);
        let mut m = Vec::new();
        build(
            &Spec {
                nonce: 0xabc,
                id,
                rcpt_domain: "node1.test",
                t_ns: 99,
                size,
                date: "Thu, 01 Jan 1970 00:00:00 +0000",
            },
            &pool,
            &mut m,
        );
        m
    }

    #[test]
    fn built_message_has_size_and_verifies() {
        for size in [0, 100, 400, 1024, 1025, 1026, 4096, 100_000] {
            let m = make(42, size);
            assert!(m.len() >= size.min(m.len()));
            if size > 400 {
                assert_eq!(m.len(), size, "size {size}");
            }
            assert!(m.ends_with(b"\r\n"));
            assert!(m
                .iter()
                .enumerate()
                .all(|(i, &b)| b != b'\n' || (i > 0 && m[i - 1] == b'\r')));
            assert_eq!(
                verify(&m),
                Verdict::Intact {
                    nonce: 0xabc,
                    id: 42,
                    t_ns: 99
                }
            );
        }
    }

    #[test]
    fn stuffing_round_trip_and_prefix_headers_ignored() {
        let m = make(7, 4096);
        assert!(
            memchr::memmem::find(&m, b"\r\n.").is_some(),
            "pool exercises dot-stuffing"
        );
        let mut wire = Vec::new();
        dot_stuff_into(&m, &mut wire);
        assert!(wire.ends_with(b"\r\n.\r\n"));
        assert!(memchr::memmem::find(&wire[..wire.len() - 3], b"\r\n.\r\n").is_none());
        let data = &wire[..wire.len() - 3];
        let back = unstuff(data);
        assert_eq!(back, m);
        let mut relayed = b"Received: from x by y; date\r\n\tcontinued\r\n".to_vec();
        relayed.extend_from_slice(&back);
        assert!(matches!(verify(&relayed), Verdict::Intact { id: 7, .. }));
        assert_eq!(unstuff(b"..a\r\n..b\r\n"), b".a\r\n.b\r\n");
        let mut w = Vec::new();
        dot_stuff_into(b".x\r\n", &mut w);
        assert_eq!(w, b"..x\r\n.\r\n");
    }

    #[test]
    fn corruption_detected() {
        let m = make(9, 1024);
        for pos in [m.len() - 5, m.len() / 2, m.len() - 200] {
            let mut c = m.clone();
            c[pos] ^= 0x01;
            assert_eq!(verify(&c), Verdict::Corrupt { nonce: 0xabc, id: 9 }, "flip at {pos}");
        }
        let mut short = m.clone();
        short.truncate(m.len() - 10);
        assert!(matches!(verify(&short), Verdict::Corrupt { .. }));
        assert_eq!(verify(b"Subject: hi\r\n\r\nbody\r\n"), Verdict::Unrecognized);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 +0000");
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
    }
}
