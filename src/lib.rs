//! # etrn-relay
//!
//! A thread-per-core ESMTP relay that holds mail for intermittently connected mail servers
//! ("nodes") and releases it when a node asks with ETRN (RFC 1985).
//!
//! ## Layout
//! - [`admin`]: the `queue` listing and the `flush` (ETRN client) operator commands.
//! - [`config`]: the TOML configuration, parsed once into valid types (`NodeName`, `SocketAddr`).
//! - [`smtp`]: the protocol layer. Pure parsing and state machines (`line`, `parser`, `data`,
//!   `reply`, `session`) that know nothing of sockets, and `server`, the socket edge.
//! - [`spool`]: durable storage. Append-only segment files with checksummed records, group
//!   commit (one `fdatasync` for every message that arrived meanwhile), in-place delivery state,
//!   recovery scan, reclamation of delivered space.
//! - [`queue`]: `NodeQueue`s, the in-memory index of what each node is owed; no SMTP text, no I/O.
//! - [`runtime`]: one glommio executor per shard, `ShardRouter` (stable hash of node name to
//!   shard), the bounded cross-shard messages.
//! - [`dns`]: MX resolution with hickory-proto over glommio sockets, TTL cache, MX ordering.
//! - [`auth`]: SASL PLAIN/LOGIN/CRAM-MD5 and failure lock-out.
//! - [`etrn`]: ETRN argument forms, protected-queue access rules, routing to the owning shard.
//! - [`queue_run`]: a node's queue streamed to its server over parallel connections.
//! - [`outbound`]: bounces to senders outside every node, delivered to their MX with retries.
//! - [`delivery`]: outbound SMTP client used by queue runs.
//! - [`tls`]: rustls configurations and the plaintext-or-TLS stream used for STARTTLS.
//! - [`dsn`]: RFC 3464 delivery status notifications (bounces).
//!
//! ## Data flow
//! A client connects to any shard (every shard listens on every address with SO_REUSEPORT).
//! The session validates the envelope against the configured nodes (never an open relay),
//! streams DATA through the terminator/dot-unstuffing state machine into memory, and hands the
//! finished record to its shard's `SpoolWriter`. The writer appends all records that arrived
//! while the previous sync was running in one write, calls `fdatasync` once, and only then are
//! the waiting sessions allowed to answer `250`. The record's location is then sent, over a
//! bounded channel with `try_send`, to every shard that owns one of the message's nodes; that
//! shard's `NodeQueue` holds it until ETRN starts a run.
#![warn(missing_docs)]
#![warn(clippy::await_holding_refcell_ref)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod dsn;
pub mod etrn;
pub mod outbound;
pub mod queue;
pub mod queue_run;
pub mod runtime;
pub mod smtp;
pub mod spool;
pub mod tls;
