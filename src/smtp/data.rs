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
    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.size += bytes.len();
        self.line_len += bytes.len();
        if self.line_len > self.max_line {
            self.fail(DataError::LineTooLong);
        }
        if self.size > self.max_size {
            self.fail(DataError::TooBig);
        }
        if self.error.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    /// Consumes `input`, appending unstuffed content (CRLF line endings) to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::LineStart => {
                    self.line_len = 0;
                    if input[i] == b'.' {
                        self.state = State::Dot;
                        self.line_len = 1; // the stuffed dot counts toward the line limit
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
                            self.check_content(rest);
                            self.emit(out, rest);
                            i = input.len();
                        }
                        Some(j) => {
                            self.check_content(&rest[..j]);
                            self.emit(out, &rest[..=j]);
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

    fn check_content(&mut self, text: &[u8]) {
        if !self.eight_bit && text.iter().any(|b| *b >= 0x80) {
            self.eight_bit = true;
        }
        if memchr::memchr(0, text).is_some() {
            self.fail(DataError::Nul);
        }
    }
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

/// Simple reference implementation used by tests to check [`DataReceiver`]: whole input at
/// once, line by line, no cleverness.
#[cfg(test)]
pub(crate) fn reference_unstuff(input: &[u8]) -> Option<(Vec<u8>, usize)> {
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
