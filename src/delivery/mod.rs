//! Outbound SMTP client used by queue runs to hand spooled mail to a node's server.
//!
//! Owns: the client side of SMTP (RFC 5321) over `glommio::net::TcpStream`: greeting,
//! EHLO/HELO negotiation (PIPELINING RFC 2920, 8BITMIME RFC 6152, SIZE RFC 1870), the mail
//! transaction with per-recipient outcomes, dot-stuffed body streaming, reply parsing and the
//! RFC 5321 section 4.5.3.2 timeouts.
//!
//! Must not touch: MX resolution (`dns`), the spool, the queue or the server side (`smtp`).
//! It receives an already resolved `SocketAddr` and an already unstuffed body, and reports
//! per-recipient outcomes; retry policy, DSNs and spool state belong to the caller.
//!
//! Submodules: `client` (the connection and transaction logic), `reply` (reply-line parsing),
//! `stuffing` (the streaming dot-stuffer).

mod client;
mod reply;
mod stuffing;

#[cfg(test)]
mod fake_server;
#[cfg(test)]
mod smtp_sink_tests;
#[cfg(test)]
mod tests;

pub use client::{ClientConfig, ClientError, OutboundMessage, RcptOutcome, SmtpClient, TlsClient};
pub use reply::Reply;
