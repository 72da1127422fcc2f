//! The SMTP session state machine (RFC 5321): one command line in, one [`Action`] out.
//!
//! Owns command ordering, the envelope, the recipient limit and the relay policy (a recipient
//! is accepted only for a configured node's domain). It knows no sockets, does no I/O and never
//! awaits; [`crate::smtp::server`] performs the actions it asks for (DATA streaming, spooling,
//! ETRN, AUTH).

use std::net::SocketAddr;
use std::sync::Arc;

use super::parser::{parse_command, Command, MailParams, ParseError};
use super::reply::{common, Reply};
use crate::config::Config;
use crate::queue::NodeIdx;

/// The envelope of the transaction in progress.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    /// Sender (empty for `<>`).
    pub sender: Vec<u8>,
    /// MAIL parameters.
    pub params: MailParams,
    /// Accepted recipients and the node each belongs to.
    pub rcpts: Vec<(Vec<u8>, NodeIdx)>,
}

/// What the server must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this reply.
    Reply(Reply),
    /// DATA accepted by the state machine: the server checks resources, sends 354 and streams.
    StartData,
    /// Send 221 and close.
    Quit,
    /// ETRN outside a transaction, with its raw argument (see [`crate::etrn`]).
    Etrn(Vec<u8>),
    /// AUTH mechanism and initial response.
    Auth(Vec<u8>, Option<Vec<u8>>),
    /// STARTTLS requested.
    StartTls,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<Config>,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    txn: Option<Transaction>,
    /// The node user authenticated with AUTH, if any.
    pub authenticated: Option<String>,
    /// The mechanism used for `authenticated`.
    pub auth_mechanism: Option<crate::auth::Mechanism>,
    /// Whether the connection is protected by TLS (AUTH PLAIN/LOGIN policy).
    pub tls: bool,
    /// Whether EHLO advertises STARTTLS (a certificate is configured and TLS is not active).
    pub starttls_offered: bool,
}

impl Session {
    /// A new session for a client at `peer`.
    pub fn new(cfg: Arc<Config>, peer: SocketAddr) -> Session {
        Session {
            cfg,
            peer,
            helo: None,
            esmtp: false,
            txn: None,
            authenticated: None,
            auth_mechanism: None,
            tls: false,
            starttls_offered: false,
        }
    }

    /// The greeting.
    pub fn greeting(&self) -> Reply {
        Reply::owned(220, "", format!("{} ESMTP etrn-relay", self.cfg.hostname))
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The name the client gave in EHLO/HELO.
    pub fn helo_name(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// EHLO rather than HELO.
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }

    /// True between MAIL and the end of DATA.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// The transaction, if any.
    pub fn transaction(&self) -> Option<&Transaction> {
        self.txn.as_ref()
    }

    /// Ends the transaction (after DATA, whatever its outcome) and returns the envelope.
    pub fn take_transaction(&mut self) -> Option<Transaction> {
        self.txn.take()
    }

    /// Whether AUTH PLAIN/LOGIN may be offered on this connection.
    pub fn plaintext_auth_allowed(&self) -> bool {
        self.tls || self.cfg.smtp.allow_plaintext_auth
    }

    fn ehlo_reply(&self) -> Reply {
        let mut t = format!(
            "{} Hello {}\nPIPELINING\nSIZE {}\n8BITMIME\nENHANCEDSTATUSCODES\nETRN",
            self.cfg.hostname,
            self.helo.as_deref().unwrap_or(""),
            self.cfg.smtp.max_message_size
        );
        if self.starttls_offered && !self.tls {
            t.push_str("\nSTARTTLS");
        }
        if self.plaintext_auth_allowed() {
            t.push_str("\nAUTH CRAM-MD5 PLAIN LOGIN");
        } else {
            t.push_str("\nAUTH CRAM-MD5");
        }
        t.push_str("\nHELP");
        Reply::owned(250, "", t)
    }

    /// Handles one command line (without CRLF).
    pub fn handle(&mut self, line: &[u8]) -> Action {
        let cmd = match parse_command(line) {
            Ok(c) => c,
            Err(ParseError::Unknown) => return Action::Reply(common::UNKNOWN),
            Err(ParseError::UnknownParam) => {
                return Action::Reply(Reply::new(555, "5.5.4", "Unsupported MAIL/RCPT parameter"))
            }
            Err(ParseError::Syntax(hint)) => {
                return Action::Reply(Reply::owned(501, "5.5.4", format!("Syntax error: {hint}")))
            }
        };
        match cmd {
            Command::Ehlo(name) | Command::Helo(name) => {
                self.esmtp = matches!(cmd, Command::Ehlo(_));
                self.helo = Some(String::from_utf8_lossy(name).into_owned());
                self.txn = None;
                if self.esmtp {
                    Action::Reply(self.ehlo_reply())
                } else {
                    Action::Reply(Reply::owned(
                        250,
                        "",
                        format!("{} Hello {}", self.cfg.hostname, String::from_utf8_lossy(name)),
                    ))
                }
            }
            Command::Mail(sender, params) => {
                if self.helo.is_none() {
                    return Action::Reply(Reply::new(503, "5.5.1", "Send EHLO/HELO first"));
                }
                if self.txn.is_some() {
                    return Action::Reply(Reply::new(503, "5.5.1", "Nested MAIL command"));
                }
                if params.size.is_some_and(|s| s > self.cfg.smtp.max_message_size as u64) {
                    return Action::Reply(Reply::new(
                        552,
                        "5.3.4",
                        "Message size exceeds fixed maximum message size",
                    ));
                }
                self.txn = Some(Transaction {
                    sender: sender.map(|m| m.address.to_vec()).unwrap_or_default(),
                    params,
                    rcpts: Vec::new(),
                });
                Action::Reply(Reply::new(250, "2.1.0", "Sender ok"))
            }
            Command::Rcpt(mb) => {
                let max = self.cfg.smtp.max_recipients;
                let Some(txn) = self.txn.as_mut() else {
                    return Action::Reply(Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
                };
                if txn.rcpts.len() >= max {
                    return Action::Reply(Reply::new(452, "4.5.3", "Too many recipients"));
                }
                let domain = String::from_utf8_lossy(mb.domain);
                match self.cfg.node_index_for_domain(&domain) {
                    // `user@evil.test@node.test`: an unquoted local part with an '@' in it is
                    // not RFC 5321 syntax, and a lax server behind the node could read the
                    // other domain in it and relay there. Not taken for our nodes.
                    Some(_) if unquoted_at(mb.address, mb.domain) => Action::Reply(Reply::new(
                        553,
                        "5.1.3",
                        "Bad recipient address syntax: '@' in an unquoted local part",
                    )),
                    Some(i) => {
                        txn.rcpts.push((mb.address.to_vec(), NodeIdx(i as u32)));
                        Action::Reply(Reply::new(250, "2.1.5", "Recipient ok"))
                    }
                    None => Action::Reply(Reply::new(
                        550,
                        "5.7.1",
                        "Relaying denied: not a domain this relay holds mail for",
                    )),
                }
            }
            Command::Data => match &self.txn {
                None => Action::Reply(Reply::new(503, "5.5.1", "Need MAIL before DATA")),
                Some(t) if t.rcpts.is_empty() => Action::Reply(Reply::new(554, "5.5.1", "No valid recipients")),
                Some(_) => Action::StartData,
            },
            Command::Rset => {
                self.txn = None;
                Action::Reply(common::OK)
            }
            Command::Noop => Action::Reply(common::OK),
            Command::Quit => Action::Quit,
            Command::Vrfy => Action::Reply(Reply::new(
                252,
                "2.5.2",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Help => Action::Reply(Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP ETRN AUTH; see RFC 5321 and RFC 1985",
            )),
            Command::Etrn(arg) => {
                if self.txn.is_some() {
                    Action::Reply(Reply::new(503, "5.5.1", "ETRN not allowed inside a mail transaction"))
                } else {
                    Action::Etrn(arg.to_vec())
                }
            }
            Command::Auth(mech, init) => {
                if self.helo.is_none() || !self.esmtp {
                    Action::Reply(Reply::new(503, "5.5.1", "Send EHLO first"))
                } else if self.txn.is_some() {
                    Action::Reply(Reply::new(503, "5.5.1", "AUTH not allowed inside a mail transaction"))
                } else if self.authenticated.is_some() {
                    Action::Reply(Reply::new(503, "5.5.1", "Already authenticated"))
                } else {
                    Action::Auth(mech.to_vec(), init.map(<[u8]>::to_vec))
                }
            }
            Command::StartTls => Action::StartTls,
        }
    }
}

/// Whether the local part of `address` (everything before `@domain`) is unquoted and has an `@`.
fn unquoted_at(address: &[u8], domain: &[u8]) -> bool {
    let local = &address[..address.len() - domain.len() - 1];
    local.first() != Some(&b'"') && memchr::memchr(b'@', local).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        let cfg = Config::from_toml(
            "hostname = \"relay.test\"\n[smtp]\nmax_recipients = 2\nmax_message_size = 10000\n[[node]]\nname = \"node1.test\"\n[[node]]\nname = \"node2.test\"\nsubdomains = true\n",
        )
        .unwrap();
        Session::new(Arc::new(cfg), "127.0.0.1:1".parse().unwrap())
    }

    fn code(a: Action) -> u16 {
        match a {
            Action::Reply(r) => r.code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ordering_and_relay_policy() {
        let mut s = session();
        assert_eq!(code(s.handle(b"MAIL FROM:<a@b.test>")), 503);
        assert_eq!(code(s.handle(b"EHLO c.test")), 250);
        assert_eq!(code(s.handle(b"RCPT TO:<x@node1.test>")), 503);
        assert_eq!(code(s.handle(b"DATA")), 503);
        assert_eq!(code(s.handle(b"MAIL FROM:<a@b.test> SIZE=20000")), 552);
        assert_eq!(code(s.handle(b"MAIL FROM:<>")), 250);
        assert_eq!(code(s.handle(b"MAIL FROM:<>")), 503);
        assert_eq!(code(s.handle(b"DATA")), 554);
        assert_eq!(code(s.handle(b"RCPT TO:<x@elsewhere.test>")), 550);
        assert_eq!(code(s.handle(b"RCPT TO:<x@sub.node1.test>")), 550);
        assert_eq!(code(s.handle(b"RCPT TO:<x@evil.test@node1.test>")), 553);
        assert_eq!(code(s.handle(b"RCPT TO:<@a.test:x@evil.test@node1.test>")), 553);
        assert_eq!(code(s.handle(b"RCPT TO:<x@node1.test@evil.test>")), 550);
        assert_eq!(code(s.handle(b"RCPT TO:<x@NODE1.test>")), 250);
        assert_eq!(code(s.handle(b"RCPT TO:<x@a.node2.test>")), 250);
        assert_eq!(code(s.handle(b"RCPT TO:<y@node1.test>")), 452);
        assert_eq!(code(s.handle(b"ETRN node1.test")), 503);
        assert_eq!(s.handle(b"DATA"), Action::StartData);
        let t = s.take_transaction().unwrap();
        assert_eq!(t.rcpts[0].1, NodeIdx(0));
        assert_eq!(t.rcpts[1].1, NodeIdx(1));
        assert_eq!(s.handle(b"ETRN node1.test"), Action::Etrn(b"node1.test".to_vec()));
        assert_eq!(code(s.handle(b"FOO")), 500);
        assert_eq!(code(s.handle(b"VRFY x")), 252);
        assert_eq!(s.handle(b"quit"), Action::Quit);
    }

    #[test]
    fn ehlo_advertises_extensions() {
        let mut s = session();
        let Action::Reply(r) = s.handle(b"EHLO c.test") else {
            panic!()
        };
        for ext in [
            "PIPELINING",
            "SIZE 10000",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "ETRN",
            "AUTH CRAM-MD5",
        ] {
            assert!(r.text.contains(ext), "{ext} missing in {}", r.text);
        }
        assert!(!r.text.contains("PLAIN"), "PLAIN only with TLS or allow_plaintext_auth");
    }
}
