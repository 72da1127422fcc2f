//! Command-line parsing: one line of the connection's read buffer into a [`Command`] that
//! borrows from it.
//!
//! Pure and allocation-free: no I/O, no heap, no knowledge of session state. The line given to
//! [`parse_command`] has its CRLF already removed. Verbs are case-insensitive (RFC 5321 2.4).

/// A mailbox `local@domain`, borrowed from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox<'a> {
    /// The whole address as received (without angle brackets).
    pub address: &'a [u8],
    /// The part after the last `@`.
    pub domain: &'a [u8],
}

/// ESMTP parameters of MAIL FROM that we understand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=n` (RFC 1870).
    pub size: Option<u64>,
    /// `BODY=8BITMIME` (RFC 6152).
    pub eight_bit: bool,
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `HELO domain`
    Helo(&'a [u8]),
    /// `EHLO domain`
    Ehlo(&'a [u8]),
    /// `MAIL FROM:<path> params`; `None` is the null sender `<>`.
    Mail(Option<Mailbox<'a>>, MailParams),
    /// `RCPT TO:<path>`
    Rcpt(Mailbox<'a>),
    /// `DATA`
    Data,
    /// `RSET`
    Rset,
    /// `NOOP`
    Noop,
    /// `QUIT`
    Quit,
    /// `VRFY ...`
    Vrfy,
    /// `HELP ...`
    Help,
    /// `ETRN arg`: the raw argument (may be empty).
    Etrn(&'a [u8]),
    /// `AUTH mechanism [initial-response]`
    Auth(&'a [u8], Option<&'a [u8]>),
    /// `STARTTLS`
    StartTls,
}

/// Why a line is not a valid command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Unknown verb: 500 5.5.2.
    Unknown,
    /// Known verb, bad arguments: 501 5.5.4 (with a hint for the reply text).
    Syntax(&'static str),
    /// Unknown MAIL parameter: 555 5.5.4.
    UnknownParam,
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn split_verb(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b' ', line) {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

/// Parses one command line (without CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, ParseError> {
    let (verb, rest) = split_verb(line);
    if verb.len() != 4 && !verb.eq_ignore_ascii_case(b"STARTTLS") {
        return Err(ParseError::Unknown);
    }
    let mut v = [0u8; 8];
    for (d, s) in v.iter_mut().zip(verb) {
        *d = s.to_ascii_uppercase();
    }
    let arg = trim(rest);
    let no_arg = |c: Command<'static>| {
        if arg.is_empty() {
            Ok(c)
        } else {
            Err(ParseError::Syntax("no arguments allowed"))
        }
    };
    match &v[..verb.len()] {
        b"EHLO" | b"HELO" => {
            if arg.is_empty() || memchr::memchr2(b' ', b'\t', arg).is_some() {
                return Err(ParseError::Syntax("EHLO/HELO needs one domain or address literal"));
            }
            Ok(if v[0] == b'E' {
                Command::Ehlo(arg)
            } else {
                Command::Helo(arg)
            })
        }
        b"MAIL" => parse_mail(arg),
        b"RCPT" => parse_rcpt(arg),
        b"DATA" => no_arg(Command::Data),
        b"RSET" => no_arg(Command::Rset),
        b"QUIT" => no_arg(Command::Quit),
        b"NOOP" => Ok(Command::Noop),
        b"VRFY" => Ok(Command::Vrfy),
        b"HELP" => Ok(Command::Help),
        b"ETRN" => Ok(Command::Etrn(arg)),
        b"AUTH" => {
            let (mech, init) = split_verb(arg);
            let init = trim(init);
            if mech.is_empty() || memchr::memchr(b' ', init).is_some() {
                return Err(ParseError::Syntax("AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth(mech, (!init.is_empty()).then_some(init)))
        }
        b"STARTTLS" => no_arg(Command::StartTls),
        _ => Err(ParseError::Unknown),
    }
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)).then(|| &s[prefix.len()..])
}

/// Splits `<path> params` into the path inside the brackets and the parameter text.
fn bracketed(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = trim(s);
    let inner = s.strip_prefix(b"<")?;
    // A quoted local part may contain '>': skip over quoted strings.
    let mut i = 0;
    let mut quoted = false;
    while i < inner.len() {
        match inner[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some((&inner[..i], &inner[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Parses a mailbox (RFC 5321 4.1.2), dropping an obsolete source route `@a,@b:`.
pub fn parse_mailbox(path: &[u8]) -> Option<Mailbox<'_>> {
    let path = if path.first() == Some(&b'@') {
        &path[memchr::memchr(b':', path)? + 1..]
    } else {
        path
    };
    let at = memchr::memrchr(b'@', path)?;
    let (local, domain) = (&path[..at], &path[at + 1..]);
    if local.is_empty() || domain.is_empty() || local.len() > 64 || domain.len() > 255 {
        return None;
    }
    if path
        .iter()
        .any(|&c| c <= b' ' && !(c == b' ' && local.first() == Some(&b'"')) || c == 0x7f)
    {
        return None;
    }
    let domain_ok = if domain[0] == b'[' {
        domain.ends_with(b"]")
    } else {
        domain
            .split(|c| *c == b'.')
            .all(|l| !l.is_empty() && l.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-'))
    };
    domain_ok.then_some(Mailbox { address: path, domain })
}

fn parse_mail(arg: &[u8]) -> Result<Command<'_>, ParseError> {
    let rest = strip_prefix_ci(arg, b"FROM:").ok_or(ParseError::Syntax("MAIL FROM:<address>"))?;
    let (path, params) = bracketed(rest).ok_or(ParseError::Syntax("MAIL FROM:<address>"))?;
    let sender = if path.is_empty() {
        None
    } else {
        Some(parse_mailbox(path).ok_or(ParseError::Syntax("bad sender address"))?)
    };
    let mut p = MailParams::default();
    for param in trim(params).split(|c| *c == b' ').filter(|s| !s.is_empty()) {
        if let Some(n) = strip_prefix_ci(param, b"SIZE=") {
            let n = std::str::from_utf8(n).ok().and_then(|s| s.parse().ok());
            p.size = Some(n.ok_or(ParseError::Syntax("SIZE=<number>"))?);
        } else if let Some(b) = strip_prefix_ci(param, b"BODY=") {
            if b.eq_ignore_ascii_case(b"8BITMIME") {
                p.eight_bit = true;
            } else if !b.eq_ignore_ascii_case(b"7BIT") {
                return Err(ParseError::Syntax("BODY=7BIT or BODY=8BITMIME"));
            }
        } else {
            return Err(ParseError::UnknownParam);
        }
    }
    Ok(Command::Mail(sender, p))
}

fn parse_rcpt(arg: &[u8]) -> Result<Command<'_>, ParseError> {
    let rest = strip_prefix_ci(arg, b"TO:").ok_or(ParseError::Syntax("RCPT TO:<address>"))?;
    let (path, params) = bracketed(rest).ok_or(ParseError::Syntax("RCPT TO:<address>"))?;
    if !trim(params).is_empty() {
        return Err(ParseError::UnknownParam);
    }
    let mb = parse_mailbox(path).ok_or(ParseError::Syntax("bad recipient address"))?;
    Ok(Command::Rcpt(mb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_case_insensitive() {
        assert_eq!(parse_command(b"ehlo client.test"), Ok(Command::Ehlo(b"client.test")));
        assert_eq!(parse_command(b"DATA"), Ok(Command::Data));
        assert_eq!(
            parse_command(b"data x"),
            Err(ParseError::Syntax("no arguments allowed"))
        );
        assert_eq!(parse_command(b"NOOP hello"), Ok(Command::Noop));
        assert_eq!(parse_command(b"XYZZ"), Err(ParseError::Unknown));
        assert_eq!(parse_command(b""), Err(ParseError::Unknown));
        assert_eq!(parse_command(b"\0\0\0\0"), Err(ParseError::Unknown));
        assert_eq!(parse_command(b"starttls"), Ok(Command::StartTls));
        assert_eq!(parse_command(b"ETRN  node1.test "), Ok(Command::Etrn(b"node1.test")));
        assert_eq!(parse_command(b"ETRN"), Ok(Command::Etrn(b"")));
    }

    #[test]
    fn mail_and_params() {
        let c = parse_command(b"MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME").unwrap();
        let Command::Mail(Some(m), p) = c else { panic!() };
        assert_eq!(m.address, b"a@b.test");
        assert_eq!(m.domain, b"b.test");
        assert_eq!(
            p,
            MailParams {
                size: Some(1000),
                eight_bit: true
            }
        );
        assert_eq!(
            parse_command(b"mail from:<>"),
            Ok(Command::Mail(None, MailParams::default()))
        );
        assert_eq!(parse_command(b"MAIL FROM:<a@b> FOO=1"), Err(ParseError::UnknownParam));
        assert!(matches!(parse_command(b"MAIL FROM:a@b"), Err(ParseError::Syntax(_))));
        assert!(matches!(
            parse_command(b"MAIL FROM:<a@b> SIZE=x"),
            Err(ParseError::Syntax(_))
        ));
    }

    #[test]
    fn rcpt_paths() {
        let Ok(Command::Rcpt(m)) = parse_command(b"RCPT TO:<@hop.test:user@node1.test>") else {
            panic!()
        };
        assert_eq!(m.address, b"user@node1.test");
        let Ok(Command::Rcpt(m)) = parse_command(b"RCPT TO:<\"a>b\"@node1.test>") else {
            panic!()
        };
        assert_eq!(m.domain, b"node1.test");
        assert!(parse_command(b"RCPT TO:<user>").is_err());
        assert!(parse_command(b"RCPT TO:<user@bad_domain>").is_err());
        assert!(parse_command(b"RCPT TO:<us\0er@node1.test>").is_err());
        assert!(parse_command(b"RCPT TO:<a@[127.0.0.1]>").is_ok());
    }
}
