//! The DATA state machine: finds the `CRLF.CRLF` terminator, removes dot-stuffing, and checks
//! the message while it streams, without ever stopping early.
//!
//! Pure: bytes in, unstuffed bytes appended to a caller's buffer, a verdict at the end. It never
//! ends DATA on anything but `<CRLF>.<CRLF>` (the SMTP smuggling class of bug needs a server that
//! accepts `<LF>.<LF>` or `<CR>.<CR>`), and it keeps consuming after a problem so the connection
//! stays in sync: the verdict is given once the real terminator has arrived.
//!
//! Policy (like Postfix's `smtpd_forbid_bare_newline = normalize`'s stricter sibling): a bare LF
//! or bare CR anywhere in the message rejects it (550 5.5.2 in the session), as do NUL octets and
//! text lines longer than the limit. The bytes of a rejected message are discarded.
//!
//! Speed: the byte-level state machine (`feed_scalar`) is the definition of all of the above.
//! On x86-64 with AVX2 or AVX-512BW, and a line limit of at least 64, `feed` first tries a fast
//! path that classifies 64-octet blocks with SIMD (`classify`, where all the unsafe code is)
//! and takes whole the blocks in which the state machine would only append and count: plain
//! text with CRLF line ends. Dot-stuffed lines are cut out there too; the terminator, bare CR
//! or LF, NUL, a limit reached and everything after an error go through the state machine,
//! which gives the same result however its input is split, so the verdict cannot change.

/// What was wrong with a message; reported after the terminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// More octets than the size limit.
    TooBig,
    /// A line longer than the text-line limit.
    LineTooLong,
    /// A LF not preceded by CR, or a CR not followed by LF.
    BareNewline,
    /// A NUL octet.
    Nul,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line.
    LineStart,
    /// Inside a line.
    Text,
    /// Saw CR inside a line.
    Cr,
    /// Saw '.' at line start.
    Dot,
    /// Saw ".\r" at line start.
    DotCr,
}

mod classify;

use classify::{BlockRule, Masks, Simd, BLOCK};

/// Streams one message's DATA. Create one per DATA command.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    max_size: usize,
    max_line: usize,
    line_len: usize,
    size: usize,
    error: Option<DataError>,
    eight_bit: bool,
}

/// Result of feeding bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// All input consumed; the terminator has not arrived.
    NeedMore,
    /// The terminator ended at this many bytes into the input; the rest belongs to the next
    /// command (pipelining).
    Done(usize),
}

impl DataReceiver {
    /// `max_size`: largest accepted message in octets (unstuffed). `max_line`: longest text line
    /// including its CRLF.
    pub fn new(max_size: usize, max_line: usize) -> DataReceiver {
        DataReceiver {
            state: State::LineStart,
            max_size,
            max_line,
            line_len: 0,
            size: 0,
            error: None,
            eight_bit: false,
        }
    }

    /// The first problem found, if any (final once `feed` returned `Done`).
    pub fn error(&self) -> Option<DataError> {
        self.error
    }

    /// Octets of message content seen (unstuffed), including any not kept after an error.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether any octet had the high bit set.
    pub fn saw_eight_bit(&self) -> bool {
        self.eight_bit
    }

    fn fail(&mut self, e: DataError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Appends `bytes` to the output unless an error was already found (then nothing more is
    /// kept, so a huge rejected message costs no memory).
    ///
    /// When `bytes` crosses both limits, the one crossed at the earlier octet is reported, so
    /// the verdict does not depend on how the input was split into reads.
    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        if self.error.is_none() {
            let line_room = self.max_line.saturating_sub(self.line_len);
            let size_room = self.max_size.saturating_sub(self.size);
            if bytes.len() > line_room.min(size_room) {
                self.fail(if line_room <= size_room {
                    DataError::LineTooLong
                } else {
                    DataError::TooBig
                });
            }
        }
        self.size += bytes.len();
        self.line_len += bytes.len();
        if self.error.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    /// Emits a run of text: `bytes[..text]` is content, the rest (at most one octet) the CR or
    /// LF that ended the run. A NUL is reported at its own position relative to a line or size
    /// limit crossed in the same run.
    fn emit_text(&mut self, out: &mut Vec<u8>, bytes: &[u8], text: usize, checks: Checks) {
        let content = &bytes[..text];
        if checks.eight_bit && !self.eight_bit && has_high_bit(content) {
            self.eight_bit = true;
        }
        if !checks.nul {
            self.emit(out, bytes);
            return;
        }
        match memchr::memchr(0, content) {
            None => self.emit(out, bytes),
            Some(k) => {
                self.emit(out, &bytes[..k]);
                self.fail(DataError::Nul);
                self.emit(out, &bytes[k..]);
            }
        }
    }

    /// Consumes `input`, appending unstuffed content (CRLF line endings) to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        // The fast path needs every line inside one block to fit the line limit.
        let simd = if self.max_line >= BLOCK { Simd::detect() } else { None };
        self.feed_with(simd, input, out)
    }

    /// [`DataReceiver::feed`] with the fast path on the given instruction set, or none.
    ///
    /// The scalar state machine ([`DataReceiver::feed_scalar`]) is the definition; the fast
    /// path only takes 64-octet blocks in which nothing can happen but plain text and CRLF
    /// line ends (see [`CleanBlocks`]), appending them as they are and updating the state
    /// exactly as the state machine would. Every other block goes through the state machine,
    /// and since that gives the same result however its input is split, cutting the input at
    /// block edges changes nothing.
    fn feed_with(&mut self, simd: Option<Simd>, input: &[u8], out: &mut Vec<u8>) -> Feed {
        let Some(simd) = simd else {
            return self.feed_scalar(input, out);
        };
        let mut i = 0;
        while i < input.len() {
            if self.error.is_some() {
                // Nothing is kept any more; the state machine finds the terminator.
                return match self.feed_scalar(&input[i..], out) {
                    Feed::Done(n) => Feed::Done(i + n),
                    Feed::NeedMore => Feed::NeedMore,
                };
            }
            let at_text = matches!(self.state, State::LineStart | State::Text);
            if at_text {
                i += self.take_clean_blocks(simd, &input[i..], out);
            }
            // The state machine takes the block the fast path refused (or the tail shorter than
            // a block); in state Cr, Dot or DotCr one octet at a time, as one or two settle it.
            let step = if matches!(self.state, State::LineStart | State::Text) {
                BLOCK
            } else {
                1
            };
            let end = input.len().min(i + step);
            if let Feed::Done(n) = self.feed_scalar(&input[i..end], out) {
                return Feed::Done(i + n);
            }
            i = end;
        }
        Feed::NeedMore
    }

    /// The fast path: takes the clean blocks at the start of `input` (state LineStart or Text,
    /// no error yet), appends them to `out` and returns how many octets it took.
    ///
    /// A block refused only because a line in it is dot-stuffed is taken up to that line's
    /// dot, the dot is dropped (as the state machine drops it: the line goes on in state Text,
    /// the dot not counted toward its length) and the fast path goes on after it, unaligned.
    fn take_clean_blocks(&mut self, simd: Simd, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        loop {
            // At LineStart the state machine sets line_len to 0 before the line's first octet.
            let line_start = self.state == State::LineStart;
            let line_len = if line_start { 0 } else { self.line_len };
            let mut rule = CleanBlocks::new(self.max_line, line_len, line_start);
            // Without an error, size <= max_size; a clean block is 64 octets of content.
            let max_blocks = self.max_size.saturating_sub(self.size) / BLOCK;
            let run = classify::take_blocks(simd, &input[i..], max_blocks, &mut rule, out);
            if run.len > 0 {
                self.size += run.len;
                self.eight_bit |= run.eight_bit;
                (self.state, self.line_len) = rule.state();
                i += run.len;
            }
            let Some(dot) = run.refused.and_then(|m| rule.stuffed_dot(m)) else {
                return i;
            };
            // ".\r" is the terminator or a bare CR: the state machine's business, as is a dot
            // whose next octet is not here yet.
            if input.get(i + dot + 1).is_none_or(|&b| b == b'\r') {
                return i;
            }
            // The refused block was offered, so a whole block still fits the size limit.
            let text = &input[i..i + dot];
            out.extend_from_slice(text);
            self.size += dot;
            self.eight_bit |= has_high_bit(text);
            self.state = State::Text;
            self.line_len = 0;
            i += dot + 1;
        }
    }

    /// The state machine, the definition of what [`DataReceiver::feed`] does.
    fn feed_scalar(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        // One vectorised pass over the whole input decides whether the per-line NUL and 8-bit
        // checks are needed at all (almost never for NUL; for 8-bit only until the first one).
        let checks = Checks {
            nul: memchr::memchr(0, input).is_some(),
            eight_bit: !self.eight_bit && has_high_bit(input),
        };
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::LineStart => {
                    self.line_len = 0;
                    if input[i] == b'.' {
                        self.state = State::Dot;
                        // Counted only if ".\r" turns out to be content (a bare CR); a
                        // transparency dot is not (RFC 5321 4.5.3.1.6): Dot -> Text resets it.
                        self.line_len = 1;
                        i += 1;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        self.state = State::DotCr;
                        i += 1;
                    } else {
                        // Dot-stuffed line: the dot is removed, the rest is text.
                        self.line_len = 0;
                        self.state = State::Text;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        self.state = State::LineStart;
                        return Feed::Done(i + 1);
                    }
                    // ".\r" then not LF: a bare CR. Keep the CR as content, re-examine the byte.
                    self.fail(DataError::BareNewline);
                    self.emit(out, b"\r");
                    self.state = State::Text;
                }
                State::Cr => {
                    if input[i] == b'\n' {
                        self.emit(out, b"\n");
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        self.fail(DataError::BareNewline);
                        self.state = State::Text;
                    }
                }
                State::Text => {
                    let rest = &input[i..];
                    match memchr::memchr2(b'\r', b'\n', rest) {
                        None => {
                            self.emit_text(out, rest, rest.len(), checks);
                            i = input.len();
                        }
                        Some(j) if rest[j] == b'\r' && rest.get(j + 1) == Some(&b'\n') => {
                            // The common case: a whole line ending in CRLF, in one step.
                            self.emit_text(out, &rest[..j + 2], j, checks);
                            i += j + 2;
                            self.state = State::LineStart;
                        }
                        Some(j) => {
                            self.emit_text(out, &rest[..=j], j, checks);
                            i += j + 1;
                            if rest[j] == b'\n' {
                                // A bare LF does not start a line: only CRLF does, so
                                // "<LF>.<CR><LF>" can never end the message here.
                                self.fail(DataError::BareNewline);
                                self.line_len = 0;
                            } else {
                                self.state = State::Cr;
                            }
                        }
                    }
                }
            }
        }
        Feed::NeedMore
    }
}

/// The fast path's rule ([`BlockRule`]): a block is clean, and taken as it is, when the state
/// machine would do nothing with it but append it and count it. That is when every LF follows a
/// CR and every CR precedes an LF (across the block edge too), no line starts with '.' (neither
/// dot-stuffing nor the terminator), there is no NUL, and the line running into the block, if
/// it ends there, still fits the limit. A line wholly inside a block is shorter than 64 octets,
/// and the fast path is only used when `max_line >= 64`, so it always fits; the size limit is
/// checked by the caller, which offers only as many blocks as fit.
///
/// A block without LF is refused once the line would reach the limit by its end (not only
/// beyond it): such a line cannot end in time, and the state machine reports it.
#[derive(Clone, Copy)]
struct CleanBlocks {
    max_line: usize,
    /// The current line's length so far, as the state machine counts it (CR and LF included,
    /// a stuffed dot not).
    line_len: usize,
    /// The previous block's CR mask (only bit 63 matters: a CR at the end of the last block
    /// taken needs an LF at the start of this one). 0 before the first block.
    prev_cr: u64,
    /// The previous block's LF mask (bit 63: this block starts a line). Before the first block,
    /// bit 63 is set when the state is LineStart.
    prev_lf: u64,
}

impl CleanBlocks {
    fn new(max_line: usize, line_len: usize, line_start: bool) -> CleanBlocks {
        CleanBlocks {
            max_line,
            line_len,
            prev_cr: 0,
            prev_lf: u64::from(line_start) << 63,
        }
    }

    /// For a block this rule refused (with its state from before the block): the offset of
    /// the first dot at a line start, if everything before it is clean (no bare CR or LF, no
    /// NUL, the line running into the block fits).
    fn stuffed_dot(&self, m: Masks) -> Option<usize> {
        let bare = m.lf ^ (m.cr << 1 | self.prev_cr >> 63);
        let starts = m.lf << 1 | self.prev_lf >> 63;
        let dots = m.dot & starts;
        if dots == 0 {
            return None;
        }
        let dot = dots.trailing_zeros();
        let before = (1u64 << dot) - 1;
        // A dot after offset 0 is preceded by the LF that ends the line running in (or one
        // after it).
        let run_in_fits = dot == 0 || self.line_len + (m.lf.trailing_zeros() as usize) < self.max_line;
        ((bare | m.nul) & before == 0 && run_in_fits).then_some(dot as usize)
    }

    /// The state the state machine would be in after the blocks taken: (state, line_len).
    fn state(&self) -> (State, usize) {
        let state = if self.prev_cr >> 63 != 0 {
            State::Cr
        } else if self.prev_lf >> 63 != 0 {
            State::LineStart
        } else {
            State::Text
        };
        (state, self.line_len)
    }
}

impl BlockRule for CleanBlocks {
    #[inline(always)]
    fn take(&mut self, m: Masks) -> bool {
        // Where a CR is, an LF must be one octet later, and nowhere else.
        let bare = m.lf ^ (m.cr << 1 | self.prev_cr >> 63);
        let starts = m.lf << 1 | self.prev_lf >> 63;
        // The current line ends at the first LF (offset 64: not in this block); with that LF
        // it is `reach + 1` octets long.
        let reach = self.line_len + m.lf.trailing_zeros() as usize;
        if bare | (m.dot & starts) | m.nul != 0 || reach >= self.max_line {
            return false;
        }
        // No LF: 64 more octets of the same line. Else the last line starts after the last LF
        // and has `leading_zeros` octets so far (< 64 <= max_line).
        self.line_len = if m.lf == 0 {
            self.line_len + BLOCK
        } else {
            m.lf.leading_zeros() as usize
        };
        self.prev_cr = m.cr;
        self.prev_lf = m.lf;
        true
    }
}

/// Which per-run checks a `feed` call needs (decided once per call over the whole input).
#[derive(Debug, Clone, Copy)]
struct Checks {
    nul: bool,
    eight_bit: bool,
}

/// Whether any octet has the high bit set: OR of 8-octet words, which the compiler vectorises
/// (an early-exit byte loop does not).
fn has_high_bit(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    let mut acc = 0u64;
    for w in &mut words {
        acc |= u64::from_ne_bytes(w.try_into().expect("8 octets"));
    }
    let tail = words.remainder().iter().fold(0u8, |a, b| a | b);
    acc & 0x8080_8080_8080_8080 != 0 || tail & 0x80 != 0
}

/// Counts `Received:` header fields in a message's header section (up to the first empty line).
pub fn count_received_headers(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 0; // no header section: everything after the empty line is body
    }
    let headers_end = memchr::memmem::find(message, b"\r\n\r\n").map_or(message.len(), |i| i + 2);
    let headers = &message[..headers_end];
    let mut n = 0;
    let mut start = 0;
    while start < headers.len() {
        let end = memchr::memchr(b'\n', &headers[start..]).map_or(headers.len(), |j| start + j + 1);
        let line = &headers[start..end];
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            n += 1;
        }
        start = end;
    }
    n
}

/// Simple reference implementation used by tests and the fuzz targets to check
/// [`DataReceiver`]: whole input at once, line by line, no cleverness. Returns the unstuffed
/// message and where the terminator ends, or None when there is no `<CRLF>.<CRLF>` yet.
#[doc(hidden)]
pub fn reference_unstuff(input: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let rel = input[pos..].windows(2).position(|w| w == b"\r\n")?;
        let line = &input[pos..pos + rel];
        let next = pos + rel + 2;
        if line == b"." {
            return Some((out, next));
        }
        let line = line.strip_prefix(b".").unwrap_or(line);
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
        pos = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, Option<usize>, Option<DataError>) {
        let mut d = DataReceiver::new(1 << 20, 1000);
        let mut out = Vec::new();
        let mut consumed = 0;
        for c in input.chunks(chunk.max(1)) {
            if let Feed::Done(n) = d.feed(c, &mut out) {
                return (out, Some(consumed + n), d.error());
            }
            consumed += c.len();
        }
        (out, None, d.error())
    }

    #[test]
    fn unstuffs_and_stops_at_terminator() {
        let input = b"Subject: x\r\n\r\n..dot\r\n\r\n..\r\nplain\r\n.\r\nMAIL FROM:<>\r\n";
        for chunk in 1..input.len() {
            let (out, end, err) = run(input, chunk);
            assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\n\r\n.\r\nplain\r\n", "chunk {chunk}");
            assert_eq!(end, Some(input.len() - b"MAIL FROM:<>\r\n".len()));
            assert_eq!(err, None);
        }
    }

    #[test]
    fn empty_message() {
        let (out, end, err) = run(b".\r\n", 1);
        assert!(out.is_empty());
        assert_eq!(end, Some(3));
        assert_eq!(err, None);
    }

    #[test]
    fn smuggling_forms_do_not_terminate() {
        for bad in [
            &b"a\n.\nb\r\n.\r\n"[..],
            b"a\r\n.\nb\r\n.\r\n",
            b"a\n.\r\nb\r\n.\r\n",
            b"a\r.\r\nb\r\n.\r\n",
        ] {
            let (_, end, err) = run(bad, 3);
            assert_eq!(end, Some(bad.len()), "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(err, Some(DataError::BareNewline));
        }
        let (_, end, err) = run(b"x\r\n.\rz\r\n.\r\n", 2);
        assert_eq!(end, Some(11));
        assert_eq!(err, Some(DataError::BareNewline));
    }

    #[test]
    fn limits() {
        let mut d = DataReceiver::new(10, 1000);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"0123456789abc\r\n.\r\n", &mut out), Feed::Done(18));
        assert_eq!(d.error(), Some(DataError::TooBig));
        let mut d = DataReceiver::new(1 << 20, 1000);
        let mut long = vec![b'a'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(d.feed(&long, &mut Vec::new()), Feed::Done(long.len()));
        assert_eq!(d.error(), Some(DataError::LineTooLong));
        let mut ok = vec![b'a'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        let mut d = DataReceiver::new(1 << 20, 1000);
        assert_eq!(d.feed(&ok, &mut Vec::new()), Feed::Done(ok.len()));
        assert_eq!(d.error(), None);
        let mut d = DataReceiver::new(1 << 20, 1000);
        d.feed(b"a\0b\r\n.\r\n", &mut Vec::new());
        assert_eq!(d.error(), Some(DataError::Nul));
        let mut d = DataReceiver::new(1 << 20, 1000);
        d.feed("é\r\n.\r\n".as_bytes(), &mut Vec::new());
        assert!(d.saw_eight_bit());
    }

    #[test]
    fn matches_reference_on_pseudo_random_input() {
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet = b"..\r\n\r\nab.";
        for _ in 0..3000 {
            let len = rng.usize(0..60);
            let mut input: Vec<u8> = (0..len).map(|_| alphabet[rng.usize(0..alphabet.len())]).collect();
            input.extend_from_slice(b"\r\n.\r\n");
            let (out, end, err) = run(&input, rng.usize(1..8));
            if err.is_none() {
                let (rout, rend) = reference_unstuff(&input).expect("reference finds the end");
                assert_eq!((out, end), (rout, Some(rend)), "{:?}", String::from_utf8_lossy(&input));
            }
        }
    }

    #[test]
    fn counts_received() {
        let m = b"Received: a\r\nreceived: b\r\nX: y\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received_headers(m), 2);
        assert_eq!(count_received_headers(b"\r\nReceived: body\r\nReceived: body\r\n"), 0);
        assert_eq!(count_received_headers(b"Received: a\r\nReceived: b\r\n"), 2);
    }
}

/// Property tests: any message a client can send (dot-stuffed, CRLF lines) comes out exactly as
/// it went in whatever the read boundaries; one broken rule anywhere gives exactly its error and
/// DATA still ends at the real `<CRLF>.<CRLF>` (never at a smuggled one); the limits hold to
/// the octet.
#[cfg(test)]
mod properties {
    use super::*;

    const CASES: usize = 5_000;

    fn line(rng: &mut fastrand::Rng, max: usize) -> Vec<u8> {
        let len = rng.usize(0..=max);
        let mut v: Vec<u8> = (0..len)
            .map(|_| match rng.u8(0..10) {
                0 => b'.',
                1 => rng.u8(0x80..),
                _ => rng.u8(0x20..0x7f),
            })
            .collect();
        if len > 0 && rng.u8(0..4) == 0 {
            v[0] = b'.';
        }
        v
    }

    /// Joins the lines with CRLF and dot-stuffs the way a client does: a '.' at the start of
    /// every line, i.e. after every CRLF (also one a line of a test case carries inside it).
    fn stuff(content_lines: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        let mut content = Vec::new();
        for l in content_lines {
            content.extend_from_slice(l);
            content.extend_from_slice(b"\r\n");
        }
        let mut wire = Vec::with_capacity(content.len() + 8);
        for (i, &c) in content.iter().enumerate() {
            if c == b'.' && (i == 0 || content[..i].ends_with(b"\r\n")) {
                wire.push(b'.');
            }
            wire.push(c);
        }
        wire.extend_from_slice(b".\r\n");
        (content, wire)
    }

    fn feed_split(rng: &mut fastrand::Rng, d: &mut DataReceiver, wire: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut pos = 0;
        while pos < wire.len() {
            let end = (pos + rng.usize(1..=64)).min(wire.len());
            if let Feed::Done(n) = d.feed(&wire[pos..end], out) {
                return Some(pos + n);
            }
            pos = end;
        }
        None
    }

    #[test]
    fn any_stuffed_message_round_trips_whatever_the_reads() {
        let mut rng = fastrand::Rng::with_seed(6152);
        for _ in 0..CASES {
            let max_line = rng.usize(3..120);
            let lines: Vec<Vec<u8>> = (0..rng.usize(0..20)).map(|_| line(&mut rng, max_line - 2)).collect();
            let (content, mut wire) = stuff(&lines);
            let end = wire.len();
            wire.extend_from_slice(b"MAIL FROM:<>\r\n.\r\n");
            let mut d = DataReceiver::new(content.len(), max_line);
            let mut out = Vec::new();
            let done = feed_split(&mut rng, &mut d, &wire, &mut out);
            assert_eq!(done, Some(end), "{:?}", String::from_utf8_lossy(&wire));
            assert_eq!(d.error(), None, "{:?}", String::from_utf8_lossy(&wire));
            assert_eq!(out, content);
            assert_eq!(d.size(), content.len());
            assert_eq!(d.saw_eight_bit(), content.iter().any(|b| *b >= 0x80));
            assert_eq!(reference_unstuff(&wire), Some((content, end)));
        }
    }

    #[test]
    fn one_broken_rule_gives_its_error_and_the_real_terminator_still_ends_data() {
        let mut rng = fastrand::Rng::with_seed(3207);
        // Every smuggling form has a bare CR or LF; none may end DATA.
        let bare: [&[u8]; 9] = [
            b"\n",
            b"\r",
            b"\n.\n",
            b"\n.\r\n",
            b"\r.\r",
            b"\r\n.\n",
            b"\r\n.\rX",
            b"\r.\r\n",
            b".\n",
        ];
        for _ in 0..CASES {
            let max_line = rng.usize(8..100);
            let mut lines: Vec<Vec<u8>> = (0..rng.usize(1..12)).map(|_| line(&mut rng, max_line - 2)).collect();
            let victim = rng.usize(0..lines.len());
            let (mut max_size, expected) = match rng.u8(0..5) {
                0 | 1 => {
                    let form = bare[rng.usize(0..bare.len())];
                    let at = rng.usize(0..=lines[victim].len());
                    // Keep the line inside the limit so only the bare newline is wrong.
                    lines[victim].truncate(max_line.saturating_sub(2 + form.len()));
                    let at = at.min(lines[victim].len());
                    lines[victim].splice(at..at, form.iter().copied());
                    (1 << 20, DataError::BareNewline)
                }
                2 => {
                    let at = rng.usize(0..=lines[victim].len().min(max_line - 3));
                    lines[victim].truncate(max_line - 3);
                    lines[victim].insert(at, 0);
                    (1 << 20, DataError::Nul)
                }
                3 => {
                    // One octet over: max_line - 1 octets of text plus CRLF (a leading dot, being
                    // stuffing, does not count).
                    lines[victim] = line(&mut rng, 0);
                    lines[victim].resize(max_line - 1, b'y');
                    (1 << 20, DataError::LineTooLong)
                }
                _ => (usize::MAX, DataError::TooBig),
            };
            let (content, mut wire) = stuff(&lines);
            if expected == DataError::TooBig {
                max_size = content.len() - 1;
            }
            let end = wire.len();
            wire.extend_from_slice(b"RSET\r\n");
            let mut d = DataReceiver::new(max_size, max_line);
            let mut out = Vec::new();
            let done = feed_split(&mut rng, &mut d, &wire, &mut out);
            assert_eq!(done, Some(end), "{expected:?} {:?}", String::from_utf8_lossy(&wire));
            assert_eq!(d.error(), Some(expected), "{:?}", String::from_utf8_lossy(&wire));
            assert!(out.len() <= max_size);
            // The same message with the limit one octet higher (or the line one shorter) is fine.
            if expected == DataError::TooBig {
                let mut d = DataReceiver::new(max_size + 1, max_line);
                assert_eq!(d.feed(&wire, &mut Vec::new()), Feed::Done(end));
                assert_eq!(d.error(), None);
            }
            if expected == DataError::LineTooLong {
                lines[victim].pop();
                let (_, wire) = stuff(&lines);
                let mut d = DataReceiver::new(max_size, max_line);
                assert_eq!(d.feed(&wire, &mut Vec::new()), Feed::Done(wire.len()));
                assert_eq!(d.error(), None, "{:?}", String::from_utf8_lossy(&wire));
            }
        }
    }
}

/// The fast path against the state machine it stands in for, on messages of several KiB (the
/// other tests mostly use short ones): long clean text with stuffed dots, the terminator, bare
/// CR and LF, NUL, 8-bit octets, overlong lines and size limits placed at every offset around
/// 64-octet block edges, fed whole and in random pieces. For each case the outcome with every
/// SIMD implementation this CPU has must be the scalar one's: same end, error, size and 8-bit
/// flag, the same output for a valid message, and for a rejected one never more than the
/// state machine would have kept octet by octet.
#[cfg(test)]
mod fast_path {
    use super::*;
    use crate::smtp::fuzzing::Outcome;

    fn run(
        simd: Option<Simd>,
        input: &[u8],
        max_size: usize,
        max_line: usize,
        mut piece: impl FnMut() -> usize,
    ) -> Outcome {
        let mut d = DataReceiver::new(max_size, max_line);
        let mut out = b"head".to_vec();
        let mut pos = 0;
        let mut done = None;
        while pos < input.len() {
            let end = input.len().min(pos + piece().max(1));
            if let Feed::Done(n) = d.feed_with(simd, &input[pos..end], &mut out) {
                assert!(n >= 1 && n <= end - pos);
                done = Some(pos + n);
                break;
            }
            pos = end;
        }
        assert!(out.starts_with(b"head"), "output before the message was touched");
        Outcome {
            out: out.split_off(4),
            done,
            error: d.error(),
            size: d.size(),
            eight_bit: d.saw_eight_bit(),
        }
    }

    /// Checks one input: the scalar outcome (the same for every split) against the fast path's
    /// with every SIMD implementation, whole, in random pieces around the block size, in
    /// random pieces of up to a few hundred octets and in small pieces.
    fn check(rng: &mut fastrand::Rng, input: &[u8], max_size: usize, max_line: usize) {
        let want = run(None, input, max_size, max_line, || usize::MAX / 2);
        // Everything the state machine keeps before it finds an error, octet by octet: what
        // any split keeps is a prefix of this.
        let kept_bytewise = if want.error.is_some() {
            run(None, input, max_size, max_line, || 1).out
        } else {
            want.out.clone()
        };
        for simd in Simd::available() {
            for split in 0..4 {
                let seed = rng.u64(..);
                let mut r = fastrand::Rng::with_seed(seed);
                let got = match split {
                    0 => run(Some(simd), input, max_size, max_line, || usize::MAX / 2),
                    1 => run(Some(simd), input, max_size, max_line, || {
                        [63, 64, 65, 127, 128, 129, 191][r.usize(0..7)]
                    }),
                    2 => run(Some(simd), input, max_size, max_line, || r.usize(1..=400)),
                    _ => run(Some(simd), input, max_size, max_line, || r.usize(1..=9)),
                };
                let what = || {
                    format!(
                        "{simd:?}, split {split} seed {seed}, limits {max_size}/{max_line}, input {:?}",
                        String::from_utf8_lossy(input)
                    )
                };
                assert_eq!(
                    (got.done, got.error, got.size, got.eight_bit),
                    (want.done, want.error, want.size, want.eight_bit),
                    "{}",
                    what()
                );
                if want.error.is_none() {
                    assert!(got.out == want.out, "output differs: {}", what());
                } else {
                    assert!(kept_bytewise.starts_with(&got.out), "kept too much: {}", what());
                }
                assert!(got.out.len() <= max_size);
            }
        }
    }

    /// About `len` octets of valid dot-stuffed CRLF lines (no terminator): text with dots
    /// inside lines, 8-bit octets when `eight_bit`, a stuffed line now and then, line lengths
    /// up to `max_line` (CRLF included).
    fn clean_wire(rng: &mut fastrand::Rng, len: usize, max_line: usize, eight_bit: bool) -> Vec<u8> {
        let mut wire = Vec::with_capacity(len + max_line);
        while wire.len() < len {
            let n = match rng.u8(0..8) {
                0 => rng.usize(0..8),
                1 => max_line - 2,
                _ => rng.usize(0..=max_line - 2),
            };
            let start = wire.len();
            wire.extend((0..n).map(|_| match rng.u8(0..40) {
                0..=2 => b'.',
                3 if eight_bit => rng.u8(0x80..),
                4 => b'\t',
                _ => rng.u8(0x20..0x7f),
            }));
            if n > 0 && rng.u8(0..12) == 0 {
                wire[start] = b'.';
            }
            if wire.get(start) == Some(&b'.') {
                wire.insert(start, b'.');
            }
            wire.extend_from_slice(b"\r\n");
        }
        wire
    }

    /// What follows the terminator: the next commands, and octets that must not count (8-bit,
    /// NUL, bare LF, more than a block of them).
    const AFTER: &[u8] =
        b"QUIT\r\n\xff\x00\n.\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n";

    /// Ends a test message with `ending` (the terminator, or the rest of it) and the pipelined
    /// bytes that must stay unread.
    fn end_data(wire: &mut Vec<u8>, ending: &[u8]) {
        wire.extend_from_slice(ending);
        wire.extend_from_slice(AFTER);
    }

    /// Offsets at and around the first few block edges, and a few anywhere.
    fn offsets(rng: &mut fastrand::Rng, len: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (1..=5)
            .flat_map(|k| (k * BLOCK - 2)..=(k * BLOCK + 2))
            .chain((0..4).map(|_| rng.usize(0..len)))
            .chain([0, 1, 2])
            .filter(|&o| o < len)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn valid_long_messages_round_trip() {
        let mut rng = fastrand::Rng::with_seed(0xfa57);
        for i in 0..150 {
            let max_line = [64, 65, 80, 100, 998, 1000][i % 6];
            let len = rng.usize(1000..8000);
            let mut wire = clean_wire(&mut rng, len, max_line, i % 3 == 0);
            let (content, _) = reference_unstuff(&[&wire[..], b".\r\n"].concat()).expect("terminated");
            wire.extend_from_slice(b".\r\n");
            let end = wire.len();
            wire.extend_from_slice(AFTER);
            // The default path (the fast one on this CPU, if it has AVX2) gives the reference's
            // output, exactly at the limits.
            let mut d = DataReceiver::new(content.len(), max_line);
            let mut out = Vec::new();
            assert_eq!(d.feed(&wire, &mut out), Feed::Done(end));
            assert_eq!((d.error(), d.size()), (None, content.len()));
            assert!(out == content);
            check(&mut rng, &wire, content.len(), max_line);
            // The same message, cut before its terminator.
            let cut = rng.usize(0..content.len());
            check(&mut rng, &wire[..cut], usize::MAX, max_line);
        }
    }

    #[test]
    fn one_defect_at_every_offset_around_block_edges() {
        const DEFECTS: &[&[u8]] = &[
            b".",
            b"..",
            b"\r",
            b"\n",
            b"\0",
            b"\xff",
            b"\r\n",
            b"\r\n.",
            b"\r\n..",
            b".\r\n",
            b"\r\n.\r\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b".\r",
            b".\rx",
        ];
        let mut rng = fastrand::Rng::with_seed(0xdefec7);
        for (i, max_line) in [64, 81, 1000].into_iter().enumerate() {
            let base = clean_wire(&mut rng, 1200, max_line, i == 1);
            for o in offsets(&mut rng, base.len()) {
                for defect in DEFECTS {
                    let mut input = base.clone();
                    if rng.bool() {
                        input.splice(o..o, defect.iter().copied());
                    } else {
                        let end = input.len().min(o + defect.len());
                        input.splice(o..end, defect.iter().copied());
                    }
                    end_data(&mut input, b"\r\n.\r\n");
                    check(&mut rng, &input, 1 << 20, max_line);
                }
            }
        }
    }

    #[test]
    fn one_eight_bit_octet_anywhere() {
        // Many dot-stuffed lines, so the octet is often in text the fast path takes up to a
        // stuffed dot; the 8-bit flag must be exactly "is there one".
        let mut rng = fastrand::Rng::with_seed(0x8b17);
        for max_line in [64, 1000] {
            let mut base = Vec::new();
            while base.len() < 900 {
                if rng.u8(0..3) == 0 {
                    base.extend_from_slice(b"..");
                }
                let n = rng.usize(0..max_line - 3);
                base.extend((0..n).map(|_| rng.u8(0x20..0x7f)));
                base.extend_from_slice(b"\r\n");
            }
            end_data(&mut base, b".\r\n");
            for o in 0..base.len() - AFTER.len() - 3 {
                if matches!(base[o], b'\r' | b'\n' | b'.') {
                    continue;
                }
                let mut input = base.clone();
                input[o] = 0xe9;
                check(&mut rng, &input, 1 << 20, max_line);
            }
        }
    }

    #[test]
    fn size_limit_at_every_octet_around_block_edges() {
        let mut rng = fastrand::Rng::with_seed(0x512e);
        for (max_line, eight_bit) in [(64, false), (1000, true)] {
            let mut wire = clean_wire(&mut rng, 1500, max_line, eight_bit);
            end_data(&mut wire, b".\r\n");
            let (content, _) = reference_unstuff(&wire).expect("terminated");
            let n = content.len();
            for max_size in (0..140).chain(500..640).chain(n - 70..n + 3) {
                check(&mut rng, &wire, max_size, max_line);
            }
        }
    }

    #[test]
    fn line_limit_around_block_edges() {
        let mut rng = fastrand::Rng::with_seed(0x11e);
        for _ in 0..400 {
            let max_line = rng.usize(64..200);
            // Lines at or just under the limit, one of them (the victim) one octet over or
            // exactly at it, after a first line that moves everything by 0..64 octets.
            let mut wire = vec![b'p'; rng.usize(0..64)];
            wire.extend_from_slice(b"\r\n");
            let lines = rng.usize(2..30);
            let victim = rng.usize(0..lines);
            for l in 0..lines {
                let len = if l == victim {
                    max_line - 2 + rng.usize(0..=1)
                } else {
                    max_line - 2 - rng.usize(0..4)
                };
                let at = wire.len();
                wire.extend((0..len).map(|_| rng.u8(0x21..0x7f)));
                if wire[at] == b'.' {
                    wire[at] = b'x';
                }
                if rng.u8(0..6) == 0 {
                    // A stuffed dot does not count toward the line.
                    wire.insert(at, b'.');
                    wire.insert(at, b'.');
                }
                wire.extend_from_slice(b"\r\n");
            }
            end_data(&mut wire, b".\r\n");
            check(&mut rng, &wire, 1 << 20, max_line);
        }
    }

    #[test]
    fn long_messages_with_random_defects_and_limits() {
        let mut rng = fastrand::Rng::with_seed(0x4a4d);
        const PIECES: &[&[u8]] = &[b"\r", b"\n", b"\0", b"\xc3\xa9", b"\r\n.", b"\r\n.\r\n", b".", b"\r\n"];
        for _ in 0..300 {
            let max_line = [64, 66, 79, 128, 1000][rng.usize(0..5)];
            let (len, eight_bit) = (rng.usize(500..5000), rng.bool());
            let mut wire = clean_wire(&mut rng, len, max_line, eight_bit);
            for _ in 0..rng.usize(0..3) {
                let at = rng.usize(0..wire.len());
                wire.splice(at..at, PIECES[rng.usize(0..PIECES.len())].iter().copied());
            }
            if rng.u8(0..4) == 0 {
                // A line too long somewhere.
                let at = rng.usize(0..wire.len());
                wire.splice(at..at, std::iter::repeat_n(b'L', max_line));
            }
            end_data(&mut wire, b"\r\n.\r\n");
            let max_size = if rng.bool() {
                usize::MAX
            } else {
                rng.usize(0..wire.len())
            };
            check(&mut rng, &wire, max_size, max_line);
        }
    }
}
