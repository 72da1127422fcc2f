//! SMTP client plumbing shared by the submitting sessions and the ETRN clients: a connection
//! with its own read buffer that returns whole (multi-line) replies, and the SASL responses
//! for AUTH PLAIN and CRAM-MD5.

use std::io;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

/// One SMTP reply: the code of its last line and all its lines' text joined with '\n'.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Three-digit code.
    pub code: u16,
    /// Text after the code on every line, joined with '\n'.
    pub text: String,
}

impl Reply {
    /// True for 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The first line as `code text`, for error reports.
    pub fn line(&self) -> String {
        format!("{} {}", self.code, self.text.lines().next().unwrap_or(""))
    }

    /// Adds one reply line (without its line end) to the text gathered so far; returns the
    /// reply when this was its last line. The one parser of reply lines, for the async
    /// [`Conn`] and for blocking clients.
    pub fn add_line(text: &mut String, line: &str) -> io::Result<Option<Reply>> {
        let b = line.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed reply line `{line}`"),
            ));
        }
        let code: u16 = line[..3].parse().unwrap_or(0);
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(line.get(4..).unwrap_or(""));
        if b.get(3) == Some(&b'-') {
            return Ok(None);
        }
        Ok(Some(Reply {
            code,
            text: std::mem::take(text),
        }))
    }

    /// Whether an EHLO reply advertises `keyword` (case-insensitive, first word of a line).
    pub fn has_ext(&self, keyword: &str) -> bool {
        self.text.lines().skip(1).any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
        })
    }
}

/// An SMTP client connection with a read buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    /// Wraps a connected stream; every read waits at most `timeout`.
    pub fn new(stream: TcpStream, timeout: Duration) -> io::Result<Conn> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        })
    }

    /// Connects to `addr` within `timeout`.
    pub async fn connect(addr: std::net::SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(io::Error::from)?;
        Conn::new(s, timeout)
    }

    /// Writes all of `b`.
    pub async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.stream.write_all(b).await
    }

    /// Reads one line (without its CRLF or LF); `UnexpectedEof` when the server closed.
    async fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
                let line = &self.buf[self.start..self.start + i];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let s = String::from_utf8_lossy(line).into_owned();
                self.start += i + 1;
                return Ok(s);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                if self.buf.len() >= 1 << 20 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "reply line too long"));
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
            self.end += n;
        }
    }

    /// Reads one complete reply.
    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        let mut text = String::new();
        loop {
            let line = self.read_line().await?;
            if let Some(reply) = Reply::add_line(&mut text, &line)? {
                return Ok(reply);
            }
        }
    }

    /// Sends one command line (CRLF added) and reads the reply.
    pub async fn cmd(&mut self, line: &str) -> io::Result<Reply> {
        let mut b = Vec::with_capacity(line.len() + 2);
        b.extend_from_slice(line.as_bytes());
        b.extend_from_slice(b"\r\n");
        self.write_all(&b).await?;
        self.read_reply().await
    }

    /// Sends QUIT and reads the reply, ignoring errors (the server may just close).
    pub async fn quit(mut self) {
        if self.write_all(b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply().await;
        }
        let _ = self.stream.close().await;
    }
}

/// The SASL mechanism an ETRN client authenticates with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMech {
    /// No AUTH.
    None,
    /// AUTH PLAIN (RFC 4616).
    Plain,
    /// AUTH CRAM-MD5 (RFC 2195).
    CramMd5,
}

/// The initial response of AUTH PLAIN: base64 of `\0user\0password`.
pub fn plain_response(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// The CRAM-MD5 answer to a base64 challenge: base64 of `user hex(HMAC-MD5(password, challenge))`.
pub fn cram_md5_response(user: &str, password: &str, challenge_b64: &str) -> Option<String> {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let challenge = b64.decode(challenge_b64.trim()).ok()?;
    let mut mac = Hmac::<md5::Md5>::new_from_slice(password.as_bytes()).ok()?;
    mac.update(&challenge);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Some(b64.encode(format!("{user} {hex}")))
}

/// Authenticates on an open, EHLO'd connection. Err carries the server's reply.
pub async fn authenticate(
    conn: &mut Conn,
    mech: AuthMech,
    user: &str,
    password: &str,
) -> io::Result<Result<(), Reply>> {
    match mech {
        AuthMech::None => Ok(Ok(())),
        AuthMech::Plain => {
            let r = conn
                .cmd(&format!("AUTH PLAIN {}", plain_response(user, password)))
                .await?;
            Ok(if r.code == 235 { Ok(()) } else { Err(r) })
        }
        AuthMech::CramMd5 => {
            let r = conn.cmd("AUTH CRAM-MD5").await?;
            if r.code != 334 {
                return Ok(Err(r));
            }
            let Some(answer) = cram_md5_response(user, password, &r.text) else {
                let _ = conn.cmd("*").await?;
                return Ok(Err(r));
            };
            let r = conn.cmd(&answer).await?;
            Ok(if r.code == 235 { Ok(()) } else { Err(r) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cram_md5_rfc2195_example() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let challenge = b64.encode("<1896.697170952@postoffice.reston.mci.net>");
        let r = cram_md5_response("tim", "tanstaaftanstaaf", &challenge).unwrap();
        assert_eq!(
            String::from_utf8(b64.decode(r).unwrap()).unwrap(),
            "tim b913a602c7eda7a495b4e6e7334d3890"
        );
        assert_eq!(plain_response("u", "p"), b64.encode("\0u\0p"));
    }

    #[test]
    fn ehlo_reply_parsing() {
        let r = Reply {
            code: 250,
            text: "relay.test Hello\nPIPELINING\nSIZE 100\nAUTH CRAM-MD5 plain\nETRN".into(),
        };
        assert!(r.has_ext("pipelining") && r.has_ext("ETRN") && !r.has_ext("relay.test"));
        assert!(r.ok());
        assert_eq!(r.line(), "250 relay.test Hello");
    }
}
