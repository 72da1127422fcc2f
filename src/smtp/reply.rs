//! SMTP replies: a code, an RFC 3463 enhanced status code and text, and their encoding.
//!
//! Owns the wire format of replies only; which reply to send is the session's business.

use std::borrow::Cow;

/// One SMTP reply. Every reply the server sends carries an enhanced status code (RFC 2034).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code such as `2.0.0`; empty for the greeting and EHLO lines.
    pub enhanced: &'static str,
    /// Text; several lines separated by `\n` become a multi-line reply.
    pub text: Cow<'static, str>,
}

impl Reply {
    /// A reply with static text.
    pub const fn new(code: u16, enhanced: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
        }
    }

    /// A reply with computed text.
    pub fn owned(code: u16, enhanced: &'static str, text: String) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Owned(text),
        }
    }

    /// True for 4xx and 5xx.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Appends the wire form (`250-...` continuation lines, `250 ...` last line) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { b'-' } else { b' ' };
            out.extend_from_slice(itoa3(self.code).as_slice());
            out.push(sep);
            if !self.enhanced.is_empty() {
                out.extend_from_slice(self.enhanced.as_bytes());
                out.push(b' ');
            }
            // Never let a CR or LF inside the text break the framing, and never echo a
            // client's control or 8-bit octets (an EHLO name with NUL or ESC, say): RFC 5321
            // reply text is HT and printable ASCII.
            for c in line.chars() {
                match c {
                    '\r' => {}
                    '\t' | ' '..='~' => out.push(c as u8),
                    _ => out.push(b'?'),
                }
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.text.len() + 16);
        self.encode_into(&mut v);
        v
    }
}

fn itoa3(code: u16) -> [u8; 3] {
    let c = code.min(999);
    [
        b'0' + (c / 100) as u8,
        b'0' + (c / 10 % 10) as u8,
        b'0' + (c % 10) as u8,
    ]
}

/// Replies used in more than one place.
pub mod common {
    use super::Reply;
    /// 250 2.0.0 Ok
    pub const OK: Reply = Reply::new(250, "2.0.0", "Ok");
    /// Commands out of order.
    pub const BAD_SEQUENCE: Reply = Reply::new(503, "5.5.1", "Bad sequence of commands");
    /// Unknown verb.
    pub const UNKNOWN: Reply = Reply::new(500, "5.5.2", "Command not recognized");
    /// Argument syntax.
    pub const SYNTAX_PARAMS: Reply = Reply::new(501, "5.5.4", "Syntax error in parameters or arguments");
    /// Command line over the limit.
    pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.6", "Line too long");
    /// Idle too long.
    pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout exceeded, closing connection");
    /// Too many connections.
    pub const TOO_MANY_CONNECTIONS: Reply = Reply::new(421, "4.7.0", "Too many connections, try again later");
    /// Spool write failed (disk full, I/O error).
    pub const STORAGE: Reply = Reply::new(452, "4.3.1", "Insufficient system storage, try again later");
    /// Shutting down.
    pub const SHUTDOWN: Reply = Reply::new(421, "4.3.2", "Service shutting down, closing connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line() {
        assert_eq!(common::OK.to_bytes(), b"250 2.0.0 Ok\r\n");
        let r = Reply::owned(250, "", "relay.test\nPIPELINING\nETRN".into());
        assert_eq!(r.to_bytes(), b"250-relay.test\r\n250-PIPELINING\r\n250 ETRN\r\n");
        let r = Reply::owned(550, "5.7.1", "bad\rtext".into());
        assert_eq!(r.to_bytes(), b"550 5.7.1 badtext\r\n");
        let r = Reply::owned(250, "", "Hello a\0b\u{1b}[31mc\u{7f}\u{e9}\u{fffd}\td".into());
        assert_eq!(r.to_bytes(), b"250 Hello a?b?[31mc???\td\r\n");
    }
}
