//! Streaming dot-stuffing (RFC 5321 section 4.5.2) of an unstuffed message body into bounded
//! chunks, followed by the end-of-data terminator.
//!
//! Owns: the transformation only. Must not touch sockets; `client` writes the chunks.
//! The body is never copied whole: each call to [`DotStuffer::fill`] produces roughly one
//! chunk of output.

use memchr::memmem;

/// Produces the dot-stuffed wire form of a body, chunk by chunk.
///
/// A line start is the beginning of the body or any position after a `'\n'` (a bare LF is
/// treated as a line end too, so a lenient receiver can never see an unstuffed `".\r\n"`).
pub(crate) struct DotStuffer<'a> {
    body: &'a [u8],
    pos: usize,
    at_line_start: bool,
    finder: memmem::Finder<'static>,
}

impl<'a> DotStuffer<'a> {
    /// A stuffer over `body` (unstuffed, CRLF line endings, no terminator).
    pub(crate) fn new(body: &'a [u8]) -> Self {
        DotStuffer {
            body,
            pos: 0,
            at_line_start: true,
            finder: memmem::Finder::new(b"\n."),
        }
    }

    /// Appends about `chunk` bytes of stuffed output to `out` (never less than one byte of
    /// progress). Returns true once the whole body and the terminator have been appended.
    pub(crate) fn fill(&mut self, out: &mut Vec<u8>, chunk: usize) -> bool {
        let target = out.len() + chunk.max(1);
        while out.len() < target {
            let rest = &self.body[self.pos..];
            if rest.is_empty() {
                out.extend_from_slice(terminator(self.body));
                return true;
            }
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            let room = target.saturating_sub(out.len()).max(1).min(rest.len());
            // Copy up to (and including) the '\n' of the next "\n." pair, within `room`.
            let window = &rest[..(room + 1).min(rest.len())];
            let take = match self.finder.find(window) {
                Some(p) => p + 1,
                None => room,
            };
            out.extend_from_slice(&rest[..take]);
            self.pos += take;
            self.at_line_start = rest[take - 1] == b'\n';
        }
        false
    }
}

/// The bytes that end the DATA section after `body`.
fn terminator(body: &[u8]) -> &'static [u8] {
    if body.is_empty() || body.ends_with(b"\r\n") {
        b".\r\n"
    } else {
        b"\r\n.\r\n"
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Stuffs `body` with the given chunk size, returning the wire bytes and chunk count.
    fn stuff(body: &[u8], chunk: usize) -> (Vec<u8>, usize) {
        let mut s = DotStuffer::new(body);
        let mut out = Vec::new();
        let mut chunks = 0;
        loop {
            let mut buf = Vec::new();
            let done = s.fill(&mut buf, chunk);
            assert!(!buf.is_empty());
            chunks += 1;
            out.extend_from_slice(&buf);
            if done {
                return (out, chunks);
            }
        }
    }

    /// Reference receiver: CRLF-delimited lines until ".", one leading dot removed.
    pub(crate) fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = wire;
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").expect("terminator present");
            let line = &rest[..end];
            if line == b"." {
                assert_eq!(&rest[end + 2..], b"", "bytes after terminator");
                return out;
            }
            let line = line.strip_prefix(b".").unwrap_or(line);
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
            rest = &rest[end + 2..];
        }
    }

    #[test]
    fn stuffs_line_starts() {
        let body = b".\r\n..\r\n..x\r\nplain\r\n.end\r\n";
        let (wire, _) = stuff(body, 65536);
        assert_eq!(wire, b"..\r\n...\r\n...x\r\nplain\r\n..end\r\n.\r\n".to_vec());
        assert_eq!(unstuff(&wire), body.to_vec());
    }

    #[test]
    fn terminators() {
        assert_eq!(stuff(b"", 10).0, b".\r\n".to_vec());
        assert_eq!(stuff(b"a", 10).0, b"a\r\n.\r\n".to_vec());
        assert_eq!(stuff(b".", 10).0, b"..\r\n.\r\n".to_vec());
        assert_eq!(stuff(b"a\r\n", 10).0, b"a\r\n.\r\n".to_vec());
        // A bare LF still starts a line for stuffing purposes.
        assert_eq!(stuff(b"a\n.\r\n", 10).0, b"a\n..\r\n.\r\n".to_vec());
    }

    #[test]
    fn every_chunk_size_round_trips() {
        let body = b"..\r\n.\r\n\r\n.x.\r\nabc.\r\n.\r\n..\r\n...\r\nno dot\r\n.";
        let (reference, _) = stuff(body, 1 << 20);
        for chunk in 1..=body.len() + 3 {
            let (wire, _) = stuff(body, chunk);
            assert_eq!(wire, reference, "chunk {chunk}");
        }
        let mut expected = body.to_vec();
        expected.extend_from_slice(b"\r\n");
        assert_eq!(unstuff(&reference), expected);
    }

    #[test]
    fn large_body_is_chunked() {
        let mut body = Vec::new();
        for i in 0..20_000 {
            if i % 7 == 0 {
                body.extend_from_slice(b".dotted line\r\n");
            } else {
                body.extend_from_slice(b"an ordinary line of text for the test\r\n");
            }
        }
        let (wire, chunks) = stuff(&body, 64 * 1024);
        assert!(chunks >= wire.len() / (64 * 1024 + 2));
        assert!(chunks <= wire.len() / (64 * 1024) + 1);
        assert_eq!(unstuff(&wire), body);
    }

    #[test]
    fn pseudo_random_bodies_round_trip() {
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet = [b'.', b'.', b'a', b'\r', b'\n'];
        for _ in 0..500 {
            let len = rng.usize(0..60);
            let mut body: Vec<u8> = (0..len).map(|_| alphabet[rng.usize(0..alphabet.len())]).collect();
            // Normalise to CRLF line endings, as the spool guarantees.
            body.retain(|&b| b != b'\r');
            let mut crlf = Vec::new();
            for b in body {
                if b == b'\n' {
                    crlf.extend_from_slice(b"\r\n");
                } else {
                    crlf.push(b);
                }
            }
            let chunk = rng.usize(1..20);
            let (wire, _) = stuff(&crlf, chunk);
            assert_eq!(wire, stuff(&crlf, 1 << 16).0);
            let mut expected = crlf.clone();
            if !expected.is_empty() && !expected.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            assert_eq!(unstuff(&wire), expected);
        }
    }
}
