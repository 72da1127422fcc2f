//! SMTP reply parsing for the outbound client: the [`Reply`] type and the pure, socket-free
//! accumulation of (possibly multi-line) reply lines.
//!
//! Owns: validation of reply lines received from a remote server. Must not touch sockets,
//! timeouts or transaction state (that is `client`'s job).

use std::fmt;

/// Longest reply line accepted (without its line ending); longer lines are a protocol error.
pub(crate) const MAX_REPLY_LINE: usize = 4096;
/// Most lines accepted in one multi-line reply.
const MAX_REPLY_LINES: usize = 256;

/// A complete SMTP reply as received from (or synthesized on behalf of) a server.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The three-digit reply code (200..=599).
    pub code: u16,
    /// The text of every line (after the code and separator), joined with `"\n"`.
    pub text: String,
}

impl Reply {
    /// Builds a reply from a code and text.
    pub(crate) fn new(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            text: text.into(),
        }
    }

    /// True for 2xx replies.
    pub(crate) fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Collects the lines of one reply, checking codes and separators.
#[derive(Debug, Default)]
pub(crate) struct ReplyBuilder {
    code: Option<u16>,
    text: String,
    lines: usize,
}

impl ReplyBuilder {
    /// Feeds one line (line ending already removed). Returns `Ok(Some(reply))` when this was
    /// the last line, `Ok(None)` when more lines follow, `Err(reason)` on malformed input.
    pub(crate) fn push_line(&mut self, line: &[u8]) -> Result<Option<Reply>, String> {
        if line.len() > MAX_REPLY_LINE {
            return Err("reply line too long".into());
        }
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(format!("malformed reply line {:?}", printable(line)));
        }
        if !(b'2'..=b'5').contains(&line[0]) {
            return Err(format!("invalid reply code in {:?}", printable(line)));
        }
        let code = u16::from(line[0] - b'0') * 100 + u16::from(line[1] - b'0') * 10 + u16::from(line[2] - b'0');
        let (last, text) = match line.get(3) {
            None => (true, &[][..]),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(format!("malformed reply line {:?}", printable(line))),
        };
        match self.code {
            Some(c) if c != code => {
                return Err(format!(
                    "reply code changed from {c} to {code} inside a multi-line reply"
                ))
            }
            _ => self.code = Some(code),
        }
        self.lines += 1;
        if self.lines > MAX_REPLY_LINES {
            return Err("multi-line reply has too many lines".into());
        }
        if self.lines > 1 {
            self.text.push('\n');
        }
        self.text.push_str(&String::from_utf8_lossy(text));
        if last {
            let text = std::mem::take(&mut self.text);
            self.code = None;
            self.lines = 0;
            Ok(Some(Reply { code, text }))
        } else {
            Ok(None)
        }
    }
}

/// A short, printable rendering of a (possibly binary) line for error messages.
fn printable(line: &[u8]) -> String {
    let cut = &line[..line.len().min(64)];
    String::from_utf8_lossy(cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&[u8]]) -> Result<Option<Reply>, String> {
        let mut b = ReplyBuilder::default();
        let mut out = None;
        for l in lines {
            out = b.push_line(l)?;
        }
        Ok(out)
    }

    #[test]
    fn single_and_multi_line() {
        assert_eq!(parse(&[b"250 ok"]).unwrap(), Some(Reply::new(250, "ok")));
        assert_eq!(parse(&[b"250"]).unwrap(), Some(Reply::new(250, "")));
        assert_eq!(
            parse(&[b"250-mx.example", b"250-PIPELINING", b"250 SIZE 100"]).unwrap(),
            Some(Reply::new(250, "mx.example\nPIPELINING\nSIZE 100"))
        );
        assert_eq!(parse(&[b"250-a"]).unwrap(), None);
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [&b"hello"[..], b"25", b"2x0 ok", b"250_ok", b"099 x", b"650 x", b""] {
            assert!(parse(&[bad]).is_err(), "{:?}", printable(bad));
        }
        assert!(parse(&[b"250-a", b"251 b"]).is_err());
        let long = vec![b'a'; MAX_REPLY_LINE + 1];
        let mut line = b"250 ".to_vec();
        line.extend_from_slice(&long);
        assert!(parse(&[&line]).is_err());
    }

    #[test]
    fn too_many_lines() {
        let mut b = ReplyBuilder::default();
        let mut err = false;
        for _ in 0..1000 {
            if b.push_line(b"250-x").is_err() {
                err = true;
                break;
            }
        }
        assert!(err);
    }
}
