//! The SMTP protocol layer.
//!
//! Everything here except [`server`] is pure: byte slices in, decisions out, no sockets and no
//! awaits, so it can be table-tested and fuzzed. [`server`] is the socket edge that feeds bytes
//! to the pure parts and writes their replies.
//!
//! - [`reply`]: `Reply` (code, enhanced status code, text) and its wire encoding.
//! - [`parser`]: one command line (borrowed from the read buffer) into a `Command<'a>`.
//! - [`data`]: the DATA terminator / dot-unstuffing / smuggling-check state machine.
//! - [`session`]: the per-connection SMTP state machine (envelope, limits, relay policy).
//! - `fuzzing` (hidden): the invariants the fuzz targets in `fuzz/` and a stable test check.
//! - [`server`]: accept loop, per-connection task, pipelining, timeouts, spooling hand-off.

pub mod data;
#[doc(hidden)]
pub mod fuzzing;
pub mod parser;
pub mod reply;
pub mod server;
pub mod session;
