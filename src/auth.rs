//! SASL authentication for ETRN's protected queues (RFC 4954 `AUTH`, RFC 4616 PLAIN, the
//! LOGIN mechanism, RFC 2195 CRAM-MD5), and the limiters that slow down password guessing
//! ([`AuthLimiter`]) and ETRN floods ([`RateLimiter`]).
//!
//! Owns: the server-side exchanges as pure state machines fed one client line at a time
//! ([`ServerExchange`]), the credentials they produce and their constant-time verification,
//! the client-side responses used by the `flush` command, and the per-address failure and rate
//! bookkeeping.
//!
//! Must not touch: sockets, files, timers or configuration. The SMTP session sends the
//! challenges, looks up the expected password, sleeps for the delay [`AuthLimiter`] asks for
//! and chooses the final `235`/`535` reply. The limiters never read the clock: every call takes
//! an explicit `now`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::Md5;

type HmacMd5 = Hmac<Md5>;

/// Decodes client responses; accepts them with or without `=` padding.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Longest base64 client response accepted (RFC 4954 section 4 allows 12288 octets).
const MAX_RESPONSE_LEN: usize = 12_288;

/// Base64 of `Username:`, the first LOGIN challenge.
const LOGIN_USER_CHALLENGE: &str = "VXNlcm5hbWU6";
/// Base64 of `Password:`, the second LOGIN challenge.
const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

const BAD_BASE64: &str = "Cannot Base64-decode client response";

/// A SASL mechanism the relay speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// RFC 4616 PLAIN: `authzid NUL user NUL password` in one response.
    Plain,
    /// LOGIN: user name and password in two responses.
    Login,
    /// RFC 2195 CRAM-MD5: HMAC-MD5 of a server challenge, keyed with the password.
    CramMd5,
}

impl Mechanism {
    /// Every mechanism, strongest first (the order to advertise in EHLO).
    pub const ALL: [Mechanism; 3] = [Mechanism::CramMd5, Mechanism::Plain, Mechanism::Login];

    /// Parses a mechanism name from the `AUTH` command, ignoring ASCII case.
    pub fn parse(name: &[u8]) -> Option<Mechanism> {
        Mechanism::ALL
            .into_iter()
            .find(|m| m.name().as_bytes().eq_ignore_ascii_case(name))
    }

    /// The registered (upper-case) name, e.g. `CRAM-MD5`.
    pub fn name(&self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::CramMd5 => "CRAM-MD5",
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an exchange ended without credentials.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The client answered a challenge with `*` (RFC 4954 section 4).
    #[error("authentication cancelled by the client")]
    Cancelled,
    /// The response could not be decoded or parsed; the text says what was wrong and is safe
    /// to send to the client.
    #[error("malformed authentication response: {0}")]
    Malformed(&'static str),
}

impl AuthError {
    /// The SMTP reply for this error: code, enhanced status code and text.
    pub fn reply_code(&self) -> (u16, &'static str, &'static str) {
        match self {
            AuthError::Cancelled => (501, "5.0.0", "Authentication cancelled"),
            AuthError::Malformed(text) => (501, "5.5.2", text),
        }
    }
}

/// What the session does after feeding the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send `334 ` followed by this base64 text (possibly empty), then feed the next line.
    Challenge(String),
    /// The exchange is complete; verify these credentials, then answer `235` or `535`.
    Done(Credentials),
    /// The exchange failed; answer with [`AuthError::reply_code`].
    Failed(AuthError),
}

/// Credentials produced by a completed exchange. They are only a claim until
/// [`Credentials::verify`] accepts them.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// From PLAIN or LOGIN (LOGIN has an empty `authzid`).
    Plain {
        /// Authorization identity; empty when the client did not ask to act as someone else.
        authzid: String,
        /// Authentication identity.
        user: String,
        /// Clear-text password.
        password: String,
    },
    /// From CRAM-MD5.
    CramMd5 {
        /// Authentication identity.
        user: String,
        /// The client's HMAC-MD5 digest, 32 lower-case hex digits.
        digest_hex: String,
        /// The challenge the digest was computed over (not base64), e.g. `<1.2@host>`.
        challenge: String,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Plain { authzid, user, .. } => f
                .debug_struct("Plain")
                .field("authzid", authzid)
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::CramMd5 {
                user,
                digest_hex,
                challenge,
            } => f
                .debug_struct("CramMd5")
                .field("user", user)
                .field("digest_hex", digest_hex)
                .field("challenge", challenge)
                .finish(),
        }
    }
}

impl Credentials {
    /// The authentication identity the client claims.
    pub fn user(&self) -> &str {
        match self {
            Credentials::Plain { user, .. } | Credentials::CramMd5 { user, .. } => user,
        }
    }

    /// True when the credentials prove knowledge of `password` for `expected_user`.
    ///
    /// Comparisons of secrets run in time independent of where they differ. For PLAIN a
    /// non-empty `authzid` must equal the user (the relay does not support proxy
    /// authorization). For CRAM-MD5 the digest is recomputed as HMAC-MD5(password, challenge).
    pub fn verify(&self, expected_user: &str, password: &str) -> bool {
        match self {
            Credentials::Plain {
                authzid,
                user,
                password: given,
            } => {
                let user_ok = ct_eq(user.as_bytes(), expected_user.as_bytes());
                let password_ok = ct_eq(given.as_bytes(), password.as_bytes());
                let authz_ok = authzid.is_empty() || authzid == user;
                user_ok & password_ok & authz_ok
            }
            Credentials::CramMd5 {
                user,
                digest_hex,
                challenge,
            } => {
                let user_ok = ct_eq(user.as_bytes(), expected_user.as_bytes());
                let Some(digest) = hex16(digest_hex.as_bytes()) else {
                    return false;
                };
                let Ok(mut mac) = HmacMd5::new_from_slice(password.as_bytes()) else {
                    return false;
                };
                mac.update(challenge.as_bytes());
                // `verify_slice` compares in constant time.
                let digest_ok = mac.verify_slice(&digest).is_ok();
                user_ok & digest_ok
            }
        }
    }
}

/// One server-side SASL exchange, driven by the SMTP session one client line at a time.
#[derive(Debug)]
pub struct ServerExchange {
    mech: Mechanism,
    state: State,
}

#[derive(Debug)]
enum State {
    PlainResponse,
    LoginUser,
    LoginPassword { user: String },
    CramResponse { challenge: String },
    Finished,
}

impl ServerExchange {
    /// Starts an exchange for `AUTH <mech> [initial]`.
    ///
    /// `initial` is the initial response (RFC 4954), already trimmed; `None`, an empty slice
    /// and `=` all mean "no credentials yet", so PLAIN answers with an empty challenge and
    /// LOGIN asks for the user name. LOGIN accepts the user name as initial response.
    /// CRAM-MD5 is server-first, so an initial response fails with a 501 error. `hostname`
    /// goes into the CRAM-MD5 challenge.
    pub fn start(mech: Mechanism, initial: Option<&[u8]>, hostname: &str) -> (ServerExchange, Step) {
        let initial = initial.map(<[u8]>::trim_ascii).filter(|r| !r.is_empty() && *r != b"=");
        let mut ex = ServerExchange {
            mech,
            state: State::Finished,
        };
        let step = match (mech, initial) {
            (Mechanism::Plain, None) => {
                ex.state = State::PlainResponse;
                Step::Challenge(String::new())
            }
            (Mechanism::Plain, Some(resp)) => ex.feed(State::PlainResponse, resp),
            (Mechanism::Login, None) => {
                ex.state = State::LoginUser;
                Step::Challenge(LOGIN_USER_CHALLENGE.to_owned())
            }
            (Mechanism::Login, Some(resp)) => ex.feed(State::LoginUser, resp),
            (Mechanism::CramMd5, None) => {
                let challenge = cram_challenge(fastrand::u64(..), unix_now(), hostname);
                let b64 = STANDARD.encode(&challenge);
                ex.state = State::CramResponse { challenge };
                Step::Challenge(b64)
            }
            (Mechanism::CramMd5, Some(_)) => {
                Step::Failed(AuthError::Malformed("CRAM-MD5 does not take an initial response"))
            }
        };
        (ex, step)
    }

    /// Feeds one client line (without CRLF). `*` cancels the exchange. Once the exchange
    /// has returned [`Step::Done`] or [`Step::Failed`], every further line fails.
    pub fn step(&mut self, line: &[u8]) -> Step {
        let state = std::mem::replace(&mut self.state, State::Finished);
        if matches!(state, State::Finished) {
            return Step::Failed(AuthError::Malformed("Authentication exchange already ended"));
        }
        self.feed(state, line.trim_ascii())
    }

    /// The mechanism this exchange runs.
    pub fn mechanism(&self) -> Mechanism {
        self.mech
    }

    /// True once the exchange has produced credentials or failed.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// Handles one response in `state`; leaves `self.state` at the next state.
    fn feed(&mut self, state: State, line: &[u8]) -> Step {
        self.state = State::Finished;
        if line == b"*" {
            return Step::Failed(AuthError::Cancelled);
        }
        let decoded = match decode_response(line) {
            Ok(d) => d,
            Err(e) => return Step::Failed(e),
        };
        let result = match state {
            State::PlainResponse => parse_plain(&decoded).map(Step::Done),
            State::LoginUser => utf8(decoded, "User name is not UTF-8")
                .and_then(|user| non_empty(user, "Empty user name"))
                .map(|user| {
                    self.state = State::LoginPassword { user };
                    Step::Challenge(LOGIN_PASSWORD_CHALLENGE.to_owned())
                }),
            State::LoginPassword { user } => utf8(decoded, "Password is not UTF-8")
                .and_then(|password| non_empty(password, "Empty password"))
                .map(|password| {
                    Step::Done(Credentials::Plain {
                        authzid: String::new(),
                        user,
                        password,
                    })
                }),
            State::CramResponse { challenge } => parse_cram(&decoded, challenge).map(Step::Done),
            State::Finished => Err(AuthError::Malformed("Authentication exchange already ended")),
        };
        result.unwrap_or_else(Step::Failed)
    }
}

fn decode_response(line: &[u8]) -> Result<Vec<u8>, AuthError> {
    if line.len() > MAX_RESPONSE_LEN {
        return Err(AuthError::Malformed("Response too long"));
    }
    if line == b"=" {
        return Ok(Vec::new());
    }
    LENIENT_B64.decode(line).map_err(|_| AuthError::Malformed(BAD_BASE64))
}

fn utf8(bytes: Vec<u8>, what: &'static str) -> Result<String, AuthError> {
    String::from_utf8(bytes).map_err(|_| AuthError::Malformed(what))
}

fn non_empty(s: String, what: &'static str) -> Result<String, AuthError> {
    if s.is_empty() {
        Err(AuthError::Malformed(what))
    } else {
        Ok(s)
    }
}

/// Parses the RFC 4616 message `authzid NUL authcid NUL passwd`.
fn parse_plain(msg: &[u8]) -> Result<Credentials, AuthError> {
    const SHAPE: &str = "PLAIN response must be authzid NUL user NUL password";
    let mut parts = msg.split(|&b| b == 0);
    let (Some(authzid), Some(user), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(SHAPE));
    };
    let authzid = utf8(authzid.to_vec(), "PLAIN authzid is not UTF-8")?;
    let user = utf8(user.to_vec(), "PLAIN user name is not UTF-8").and_then(|u| non_empty(u, "Empty user name"))?;
    let password =
        utf8(password.to_vec(), "PLAIN password is not UTF-8").and_then(|p| non_empty(p, "Empty password"))?;
    Ok(Credentials::Plain {
        authzid,
        user,
        password,
    })
}

/// Parses the RFC 2195 response `user SP digest`.
fn parse_cram(msg: &[u8], challenge: String) -> Result<Credentials, AuthError> {
    const SHAPE: &str = "CRAM-MD5 response must be user SP 32 hex digits";
    let text = std::str::from_utf8(msg).map_err(|_| AuthError::Malformed(SHAPE))?;
    let (user, digest) = text.rsplit_once(' ').ok_or(AuthError::Malformed(SHAPE))?;
    if user.is_empty() || digest.len() != 32 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Malformed(SHAPE));
    }
    Ok(Credentials::CramMd5 {
        user: user.to_owned(),
        digest_hex: digest.to_ascii_lowercase(),
        challenge,
    })
}

/// The RFC 2195 challenge `<random.timestamp@hostname>`.
fn cram_challenge(random: u64, timestamp: u64, hostname: &str) -> String {
    let host: String = hostname
        .chars()
        .filter(|c| !c.is_control() && !c.is_whitespace() && *c != '<' && *c != '>')
        .collect();
    let host = if host.is_empty() { "localhost" } else { &host };
    format!("<{random}.{timestamp}@{host}>")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Compares without an early exit; the running time depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex16(hex: &[u8]) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn hmac_md5_hex(key: &[u8], data: &[u8]) -> Option<String> {
    let mut mac = HmacMd5::new_from_slice(key).ok()?;
    mac.update(data);
    Some(to_hex(&mac.finalize().into_bytes()))
}

/// Client side: the base64 PLAIN initial response for `AUTH PLAIN <response>` (empty authzid).
pub fn client_plain(user: &str, password: &str) -> String {
    let mut msg = Vec::with_capacity(user.len() + password.len() + 2);
    msg.push(0);
    msg.extend_from_slice(user.as_bytes());
    msg.push(0);
    msg.extend_from_slice(password.as_bytes());
    STANDARD.encode(msg)
}

/// Client side: the base64 CRAM-MD5 response to the server's base64 challenge (the text after
/// `334 `). `None` when the challenge is not valid base64.
pub fn client_cram_md5(user: &str, password: &str, challenge_b64: &[u8]) -> Option<String> {
    let challenge = LENIENT_B64.decode(challenge_b64.trim_ascii()).ok()?;
    let digest = hmac_md5_hex(password.as_bytes(), &challenge)?;
    Some(STANDARD.encode(format!("{user} {digest}")))
}

/// Client side: the base64 LOGIN answer to the `Username:` challenge.
pub fn client_login_user(user: &str) -> String {
    STANDARD.encode(user)
}

/// Client side: the base64 LOGIN answer to the `Password:` challenge.
pub fn client_login_password(password: &str) -> String {
    STANDARD.encode(password)
}

/// Default bound on the number of addresses a limiter remembers.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

/// The address limiters key on: IPv4 addresses as they are (IPv4-mapped IPv6 included),
/// IPv6 addresses by their /64 network, since one client usually controls a whole /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Removes the oldest eighth of `map` (by `last_seen`), at least one entry, so that the
/// eviction cost is amortised over many insertions.
fn evict_oldest<V>(map: &mut HashMap<IpAddr, V>, max_entries: usize, last_seen: fn(&V) -> Instant) {
    let mut by_age: Vec<(Instant, IpAddr)> = map.iter().map(|(k, v)| (last_seen(v), *k)).collect();
    if by_age.is_empty() {
        return;
    }
    let batch = (max_entries / 8).clamp(1, by_age.len());
    by_age.select_nth_unstable_by_key(batch - 1, |e| e.0);
    for (_, key) in &by_age[..batch] {
        map.remove(key);
    }
}

#[derive(Debug, Clone, Copy)]
struct FailureEntry {
    window_start: Instant,
    failures: u32,
    locked_since: Option<Instant>,
    last_seen: Instant,
}

/// Tracks failed authentications per client address: a growing delay before each `535`, and
/// a lock-out after too many failures within a window. Pure: time is always passed in.
///
/// IPv6 clients are tracked per /64. Memory is bounded: when full, expired entries are
/// dropped first, then the least recently seen ones.
#[derive(Debug)]
pub struct AuthLimiter {
    max_failures: u32,
    window: Duration,
    lockout: Duration,
    base_delay: Duration,
    max_delay: Duration,
    max_entries: usize,
    entries: HashMap<IpAddr, FailureEntry>,
}

impl AuthLimiter {
    /// Locks an address out for `lockout` once it has failed `max_failures` times within
    /// `window` (counted from its first failure in the window). `max_failures == 0` never
    /// locks out. Delays start at 1 s, double per failure and stop growing at 8 s.
    pub fn new(max_failures: u32, window: Duration, lockout: Duration) -> AuthLimiter {
        AuthLimiter {
            max_failures,
            window,
            lockout,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            max_entries: DEFAULT_MAX_ENTRIES,
            entries: HashMap::new(),
        }
    }

    /// Replaces the delay schedule: `base` for the first failure, doubling up to `max`.
    pub fn with_delays(mut self, base: Duration, max: Duration) -> AuthLimiter {
        self.base_delay = base;
        self.max_delay = max;
        self
    }

    /// Bounds the number of remembered addresses (at least 1; default
    /// [`DEFAULT_MAX_ENTRIES`]).
    pub fn with_max_entries(mut self, max_entries: usize) -> AuthLimiter {
        self.max_entries = max_entries.max(1);
        self
    }

    /// Records a failed authentication and returns how long to wait before answering `535`.
    /// Failures while already locked out return the maximum delay and do not extend the
    /// lock-out.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) -> Duration {
        let key = client_key(ip);
        if !self.entries.contains_key(&key) && self.entries.len() >= self.max_entries {
            self.make_room(now);
        }
        let fresh = FailureEntry {
            window_start: now,
            failures: 0,
            locked_since: None,
            last_seen: now,
        };
        let e = self.entries.entry(key).or_insert(fresh);
        if let Some(since) = e.locked_since {
            if now.saturating_duration_since(since) < self.lockout {
                e.last_seen = e.last_seen.max(now);
                return self.max_delay;
            }
            *e = fresh;
        }
        if now.saturating_duration_since(e.window_start) >= self.window {
            e.window_start = now;
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_seen = e.last_seen.max(now);
        if self.max_failures > 0 && e.failures >= self.max_failures {
            e.locked_since = Some(now);
        }
        let doublings = e.failures.saturating_sub(1).min(31);
        self.base_delay.saturating_mul(1u32 << doublings).min(self.max_delay)
    }

    /// Records a successful authentication: forgets the address's failures. An active
    /// lock-out is not lifted (the session must not accept AUTH while locked out anyway).
    pub fn record_success(&mut self, ip: IpAddr) {
        let key = client_key(ip);
        match self.entries.get_mut(&key) {
            Some(e) if e.locked_since.is_some() => e.failures = 0,
            Some(_) => {
                self.entries.remove(&key);
            }
            None => {}
        }
    }

    /// If the address is locked out at `now`, how long the lock-out still lasts.
    pub fn is_locked_out(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let since = self.entries.get(&client_key(ip))?.locked_since?;
        let elapsed = now.saturating_duration_since(since);
        (elapsed < self.lockout).then(|| self.lockout - elapsed)
    }

    /// Number of addresses (or IPv6 /64 networks) currently remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn make_room(&mut self, now: Instant) {
        let (window, lockout) = (self.window, self.lockout);
        self.entries.retain(|_, e| match e.locked_since {
            Some(since) if now.saturating_duration_since(since) < lockout => true,
            _ => e.failures > 0 && now.saturating_duration_since(e.window_start) < window,
        });
        if self.entries.len() >= self.max_entries {
            evict_oldest(&mut self.entries, self.max_entries, |e| e.last_seen);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A token bucket per client address (IPv6 per /64), e.g. against ETRN floods: each address
/// may make `burst` requests at once and then `per_second` on average. Pure: time is always
/// passed in. Memory is bounded like [`AuthLimiter`]'s.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    max_entries: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    /// A limiter allowing bursts of `burst` requests, refilled at `per_second` tokens per
    /// second. A negative or non-finite rate means no refill; `burst == 0` denies everything.
    pub fn new(burst: u32, per_second: f64) -> RateLimiter {
        let per_second = if per_second.is_finite() && per_second > 0.0 {
            per_second
        } else {
            0.0
        };
        RateLimiter {
            burst: f64::from(burst),
            per_second,
            max_entries: DEFAULT_MAX_ENTRIES,
            buckets: HashMap::new(),
        }
    }

    /// Bounds the number of remembered addresses (at least 1; default
    /// [`DEFAULT_MAX_ENTRIES`]).
    pub fn with_max_entries(mut self, max_entries: usize) -> RateLimiter {
        self.max_entries = max_entries.max(1);
        self
    }

    /// Takes one token for `ip` at `now`; false when the address is over its rate.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = client_key(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_entries {
            self.make_room(now);
        }
        let (burst, rate) = (self.burst, self.per_second);
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        if now > b.updated {
            let elapsed = now.duration_since(b.updated).as_secs_f64();
            b.tokens = (b.tokens + elapsed * rate).min(burst);
            b.updated = now;
        }
        // The tolerance absorbs rounding from summing many small refills.
        if b.tokens >= 1.0 - 1e-9 {
            b.tokens = (b.tokens - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// Number of addresses (or IPv6 /64 networks) currently remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn make_room(&mut self, now: Instant) {
        let (burst, rate) = (self.burst, self.per_second);
        // A bucket that has refilled completely is indistinguishable from a new one.
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
        if self.buckets.len() >= self.max_entries {
            evict_oldest(&mut self.buckets, self.max_entries, |b| b.updated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn b64(s: &[u8]) -> String {
        STANDARD.encode(s)
    }

    fn done(step: Step) -> Credentials {
        match step {
            Step::Done(c) => c,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn challenge(step: Step) -> String {
        match step {
            Step::Challenge(c) => c,
            other => panic!("expected Challenge, got {other:?}"),
        }
    }

    fn failed(step: Step) -> AuthError {
        match step {
            Step::Failed(e) => e,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    const RFC2195_CHALLENGE: &str = "<1896.697170952@postoffice.reston.mci.net>";
    const RFC2195_DIGEST: &str = "b913a602c7eda7a495b4e6e7334d3890";

    #[test]
    fn mechanism_parse_and_name() {
        assert_eq!(Mechanism::parse(b"plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::parse(b"LoGiN"), Some(Mechanism::Login));
        assert_eq!(Mechanism::parse(b"cram-md5"), Some(Mechanism::CramMd5));
        assert_eq!(Mechanism::parse(b"CRAM-MD5 "), None);
        assert_eq!(Mechanism::parse(b"DIGEST-MD5"), None);
        assert_eq!(Mechanism::parse(b""), None);
        assert_eq!(Mechanism::parse(b"\xff\xfe"), None);
        for m in Mechanism::ALL {
            assert_eq!(Mechanism::parse(m.name().as_bytes()), Some(m));
            assert_eq!(m.to_string(), m.name());
        }
    }

    #[test]
    fn plain_with_initial_response() {
        let init = b64(b"\0tim\0secret");
        let (ex, step) = ServerExchange::start(Mechanism::Plain, Some(init.as_bytes()), "h");
        let c = done(step);
        assert!(ex.is_finished());
        assert_eq!(c.user(), "tim");
        assert!(c.verify("tim", "secret"));
        assert!(!c.verify("tim", "secreT"));
        assert!(!c.verify("tim", "secret2"));
        assert!(!c.verify("tim", "secre"));
        assert!(!c.verify("tom", "secret"));
        assert!(!c.verify("", ""));
    }

    #[test]
    fn plain_without_initial_response_sends_empty_challenge() {
        for init in [None, Some(&b""[..]), Some(&b"="[..]), Some(&b"  "[..])] {
            let (mut ex, step) = ServerExchange::start(Mechanism::Plain, init, "h");
            assert_eq!(challenge(step), "");
            assert!(!ex.is_finished());
            let c = done(ex.step(client_plain("u", "p").as_bytes()));
            assert!(c.verify("u", "p"));
            assert!(ex.is_finished());
        }
    }

    #[test]
    fn plain_authzid() {
        let same = b64(b"u\0u\0p");
        let c = done(ServerExchange::start(Mechanism::Plain, Some(same.as_bytes()), "h").1);
        assert!(c.verify("u", "p"));
        let other = b64(b"admin\0u\0p");
        let c = done(ServerExchange::start(Mechanism::Plain, Some(other.as_bytes()), "h").1);
        assert_eq!(c.user(), "u");
        assert!(!c.verify("u", "p"), "proxy authorization is not supported");
    }

    #[test]
    fn plain_malformed() {
        for msg in [
            &b"no-nuls"[..],
            b"\0user",
            b"\0\0pass",
            b"\0user\0",
            b"a\0b\0c\0d",
            b"\0\xff\0pass",
            b"\0user\0\xc3",
        ] {
            let init = b64(msg);
            let (_, step) = ServerExchange::start(Mechanism::Plain, Some(init.as_bytes()), "h");
            let e = failed(step);
            assert!(matches!(e, AuthError::Malformed(_)), "{msg:?}");
            assert_eq!(e.reply_code().0, 501);
            assert_eq!(e.reply_code().1, "5.5.2");
        }
    }

    #[test]
    fn bad_base64_is_501_552() {
        let (_, step) = ServerExchange::start(Mechanism::Plain, Some(b"!!!not base64"), "h");
        let e = failed(step);
        assert_eq!(e, AuthError::Malformed(BAD_BASE64));
        assert_eq!(e.reply_code(), (501, "5.5.2", BAD_BASE64));

        let (mut ex, _) = ServerExchange::start(Mechanism::Login, None, "h");
        assert_eq!(failed(ex.step(b"dXNlcg=x")), AuthError::Malformed(BAD_BASE64));
    }

    #[test]
    fn unpadded_base64_accepted() {
        let padded = b64(b"\0ab\0c");
        let unpadded = padded.trim_end_matches('=');
        assert_ne!(padded, unpadded);
        let (_, step) = ServerExchange::start(Mechanism::Plain, Some(unpadded.as_bytes()), "h");
        assert!(done(step).verify("ab", "c"));
    }

    #[test]
    fn too_long_response_rejected() {
        let long = vec![b'A'; MAX_RESPONSE_LEN + 4];
        let (mut ex, _) = ServerExchange::start(Mechanism::Plain, None, "h");
        assert_eq!(failed(ex.step(&long)), AuthError::Malformed("Response too long"));
    }

    #[test]
    fn cancel_at_every_stage() {
        let (mut ex, _) = ServerExchange::start(Mechanism::Plain, None, "h");
        let e = failed(ex.step(b"*"));
        assert_eq!(e, AuthError::Cancelled);
        assert_eq!(e.reply_code().0, 501);
        assert_eq!(e.reply_code().1, "5.0.0");

        let (mut ex, _) = ServerExchange::start(Mechanism::Login, None, "h");
        assert_eq!(failed(ex.step(b"*")), AuthError::Cancelled);

        let (mut ex, _) = ServerExchange::start(Mechanism::Login, None, "h");
        challenge(ex.step(client_login_user("u").as_bytes()));
        assert_eq!(failed(ex.step(b" * ")), AuthError::Cancelled);

        let (mut ex, _) = ServerExchange::start(Mechanism::CramMd5, None, "h");
        assert_eq!(failed(ex.step(b"*")), AuthError::Cancelled);
        assert!(ex.is_finished());
    }

    #[test]
    fn steps_after_end_fail() {
        let (mut ex, _) = ServerExchange::start(Mechanism::Plain, None, "h");
        done(ex.step(client_plain("u", "p").as_bytes()));
        assert!(matches!(
            failed(ex.step(client_plain("u", "p").as_bytes())),
            AuthError::Malformed(_)
        ));
        let (mut ex, _) = ServerExchange::start(Mechanism::Plain, None, "h");
        failed(ex.step(b"*"));
        assert!(matches!(failed(ex.step(b"*")), AuthError::Malformed(_)));
    }

    #[test]
    fn login_exchange() {
        let (mut ex, step) = ServerExchange::start(Mechanism::Login, None, "h");
        assert_eq!(ex.mechanism(), Mechanism::Login);
        let c1 = challenge(step);
        assert_eq!(STANDARD.decode(&c1).unwrap(), b"Username:");
        let c2 = challenge(ex.step(client_login_user("tim").as_bytes()));
        assert_eq!(STANDARD.decode(&c2).unwrap(), b"Password:");
        let c = done(ex.step(client_login_password("pw d").as_bytes()));
        assert_eq!(
            c,
            Credentials::Plain {
                authzid: String::new(),
                user: "tim".into(),
                password: "pw d".into()
            }
        );
        assert!(c.verify("tim", "pw d"));
        assert!(!c.verify("tim", "pw"));
    }

    #[test]
    fn login_with_initial_user() {
        let init = client_login_user("tim");
        let (mut ex, step) = ServerExchange::start(Mechanism::Login, Some(init.as_bytes()), "h");
        assert_eq!(challenge(step), LOGIN_PASSWORD_CHALLENGE);
        assert!(done(ex.step(client_login_password("x").as_bytes())).verify("tim", "x"));
    }

    #[test]
    fn login_rejects_empty_and_non_utf8() {
        let (mut ex, _) = ServerExchange::start(Mechanism::Login, None, "h");
        assert!(matches!(failed(ex.step(b"")), AuthError::Malformed(_)));
        let (mut ex, _) = ServerExchange::start(Mechanism::Login, None, "h");
        assert!(matches!(
            failed(ex.step(b64(b"\xff").as_bytes())),
            AuthError::Malformed(_)
        ));
        let (mut ex, _) = ServerExchange::start(Mechanism::Login, None, "h");
        challenge(ex.step(client_login_user("u").as_bytes()));
        assert!(matches!(failed(ex.step(b"=")), AuthError::Malformed(_)));
    }

    #[test]
    fn cram_md5_rfc2195_client_vector() {
        let chal = b64(RFC2195_CHALLENGE.as_bytes());
        let resp = client_cram_md5("tim", "tanstaaftanstaaf", chal.as_bytes()).unwrap();
        let decoded = STANDARD.decode(&resp).unwrap();
        assert_eq!(decoded, format!("tim {RFC2195_DIGEST}").as_bytes());
        // The RFC's own base64 of the response.
        assert_eq!(resp, "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw");
        assert_eq!(client_cram_md5("tim", "x", b"!!"), None);
    }

    #[test]
    fn cram_md5_rfc2195_server_verify() {
        let c = Credentials::CramMd5 {
            user: "tim".into(),
            digest_hex: RFC2195_DIGEST.into(),
            challenge: RFC2195_CHALLENGE.into(),
        };
        assert!(c.verify("tim", "tanstaaftanstaaf"));
        assert!(!c.verify("tim", "tanstaaftanstaaF"));
        assert!(!c.verify("tom", "tanstaaftanstaaf"));
        let bad = Credentials::CramMd5 {
            user: "tim".into(),
            digest_hex: "zz".into(),
            challenge: RFC2195_CHALLENGE.into(),
        };
        assert!(!bad.verify("tim", "tanstaaftanstaaf"));
    }

    #[test]
    fn cram_md5_full_exchange() {
        let (mut ex, step) = ServerExchange::start(Mechanism::CramMd5, None, "mx.example");
        let chal_b64 = challenge(step);
        let chal = String::from_utf8(STANDARD.decode(&chal_b64).unwrap()).unwrap();
        assert!(chal.starts_with('<') && chal.ends_with("@mx.example>"), "{chal}");
        let inner = &chal[1..chal.len() - "@mx.example>".len()];
        let (random, ts) = inner.split_once('.').unwrap();
        assert!(random.parse::<u64>().is_ok() && ts.parse::<u64>().is_ok(), "{chal}");

        let resp = client_cram_md5("node1", "s3cret", chal_b64.as_bytes()).unwrap();
        let c = done(ex.step(resp.as_bytes()));
        assert_eq!(c.user(), "node1");
        match &c {
            Credentials::CramMd5 { challenge, .. } => assert_eq!(challenge, &chal),
            other => panic!("{other:?}"),
        }
        assert!(c.verify("node1", "s3cret"));
        assert!(!c.verify("node1", "s3cret "));
    }

    #[test]
    fn cram_md5_challenges_differ() {
        let a = challenge(ServerExchange::start(Mechanism::CramMd5, None, "h").1);
        let b = challenge(ServerExchange::start(Mechanism::CramMd5, None, "h").1);
        assert_ne!(a, b);
    }

    #[test]
    fn cram_md5_uppercase_digest_accepted() {
        let (mut ex, step) = ServerExchange::start(Mechanism::CramMd5, None, "h");
        let chal = STANDARD.decode(challenge(step)).unwrap();
        let hex = hmac_md5_hex(b"pw", &chal).unwrap().to_ascii_uppercase();
        let c = done(ex.step(b64(format!("user name {hex}").as_bytes()).as_bytes()));
        assert_eq!(c.user(), "user name");
        assert!(c.verify("user name", "pw"));
    }

    #[test]
    fn cram_md5_malformed() {
        for resp in [
            &b"tim"[..],
            b"tim b913a602",
            b" b913a602c7eda7a495b4e6e7334d3890",
            b"tim b913a602c7eda7a495b4e6e7334d389g",
            b"tim b913a602c7eda7a495b4e6e7334d38900",
            b"\xff b913a602c7eda7a495b4e6e7334d3890",
        ] {
            let (mut ex, _) = ServerExchange::start(Mechanism::CramMd5, None, "h");
            let e = failed(ex.step(b64(resp).as_bytes()));
            assert!(matches!(e, AuthError::Malformed(_)), "{resp:?}");
        }
    }

    #[test]
    fn cram_md5_rejects_initial_response() {
        let (ex, step) = ServerExchange::start(Mechanism::CramMd5, Some(b"dGlt"), "h");
        assert_eq!(failed(step).reply_code().0, 501);
        assert!(ex.is_finished());
    }

    #[test]
    fn cram_challenge_format() {
        assert_eq!(
            cram_challenge(1896, 697170952, "postoffice.reston.mci.net"),
            RFC2195_CHALLENGE
        );
        assert_eq!(cram_challenge(1, 2, "a b<c>\r\n"), "<1.2@abc>");
        assert_eq!(cram_challenge(1, 2, ""), "<1.2@localhost>");
    }

    #[test]
    fn client_plain_format() {
        assert_eq!(STANDARD.decode(client_plain("u", "p")).unwrap(), b"\0u\0p");
        assert_eq!(client_login_user("tim"), "dGlt");
        assert_eq!(client_login_password(""), "");
    }

    #[test]
    fn debug_redacts_password() {
        let c = Credentials::Plain {
            authzid: String::new(),
            user: "u".into(),
            password: "hunter2".into(),
        };
        let s = format!("{:?}", Step::Done(c));
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn ct_eq_and_hex() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"ab\0", b"ab"));
        assert_eq!(
            hex16(b"000102030405060708090a0b0c0d0E0F"),
            Some(core::array::from_fn(|i| i as u8))
        );
        assert_eq!(hex16(b"00"), None);
        assert_eq!(to_hex(&[0x00, 0xab, 0xff]), "00abff");
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn limiter() -> AuthLimiter {
        AuthLimiter::new(5, secs(900), secs(900))
    }

    #[test]
    fn auth_delays_grow_and_cap() {
        let t0 = Instant::now();
        let mut l = AuthLimiter::new(100, secs(900), secs(900));
        let delays: Vec<u64> = (0..7)
            .map(|i| l.record_failure(v4(1), t0 + secs(i)).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8, 8]);
        // Another address is independent.
        assert_eq!(l.record_failure(v4(2), t0), secs(1));
        // Many failures never overflow.
        for i in 0..100 {
            l.record_failure(v4(3), t0 + Duration::from_millis(i));
        }
        assert_eq!(l.record_failure(v4(3), t0 + secs(1)), secs(8));
    }

    #[test]
    fn auth_custom_delays() {
        let t0 = Instant::now();
        let mut l = limiter().with_delays(Duration::from_millis(100), Duration::from_millis(250));
        assert_eq!(l.record_failure(v4(1), t0), Duration::from_millis(100));
        assert_eq!(l.record_failure(v4(1), t0), Duration::from_millis(200));
        assert_eq!(l.record_failure(v4(1), t0), Duration::from_millis(250));
    }

    #[test]
    fn auth_lockout_after_max_failures_in_window() {
        let t0 = Instant::now();
        let mut l = limiter();
        for i in 0..4 {
            l.record_failure(v4(1), t0 + secs(60 * i));
            assert_eq!(l.is_locked_out(v4(1), t0 + secs(60 * i)), None);
        }
        let t5 = t0 + secs(240);
        l.record_failure(v4(1), t5);
        assert_eq!(l.is_locked_out(v4(1), t5), Some(secs(900)));
        assert_eq!(l.is_locked_out(v4(1), t5 + secs(100)), Some(secs(800)));
        assert_eq!(l.is_locked_out(v4(2), t5), None);
        // Failing while locked out returns the maximum delay and does not extend the lock.
        assert_eq!(l.record_failure(v4(1), t5 + secs(10)), secs(8));
        assert_eq!(l.is_locked_out(v4(1), t5 + secs(899)), Some(secs(1)));
        assert_eq!(l.is_locked_out(v4(1), t5 + secs(900)), None);
        // After the lock-out the count starts again.
        assert_eq!(l.record_failure(v4(1), t5 + secs(901)), secs(1));
        assert_eq!(l.is_locked_out(v4(1), t5 + secs(901)), None);
    }

    #[test]
    fn auth_window_expiry_resets_count() {
        let t0 = Instant::now();
        let mut l = limiter();
        for _ in 0..4 {
            l.record_failure(v4(1), t0);
        }
        // The fifth failure comes after the window: no lock-out, delay starts over.
        assert_eq!(l.record_failure(v4(1), t0 + secs(900)), secs(1));
        assert_eq!(l.is_locked_out(v4(1), t0 + secs(900)), None);
        for i in 1..4 {
            l.record_failure(v4(1), t0 + secs(900 + i));
        }
        assert_eq!(l.is_locked_out(v4(1), t0 + secs(904)), None);
        l.record_failure(v4(1), t0 + secs(905));
        assert!(l.is_locked_out(v4(1), t0 + secs(905)).is_some());
    }

    #[test]
    fn auth_success_clears_failures_but_not_lockout() {
        let t0 = Instant::now();
        let mut l = limiter();
        for _ in 0..4 {
            l.record_failure(v4(1), t0);
        }
        l.record_success(v4(1));
        assert!(l.is_empty());
        assert_eq!(l.record_failure(v4(1), t0), secs(1));
        for _ in 0..4 {
            l.record_failure(v4(1), t0);
        }
        assert!(l.is_locked_out(v4(1), t0).is_some());
        l.record_success(v4(1));
        assert_eq!(l.is_locked_out(v4(1), t0 + secs(1)), Some(secs(899)));
        l.record_success(v4(9)); // unknown address: no-op
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn auth_zero_max_failures_never_locks() {
        let t0 = Instant::now();
        let mut l = AuthLimiter::new(0, secs(900), secs(900));
        for _ in 0..50 {
            l.record_failure(v4(1), t0);
        }
        assert_eq!(l.is_locked_out(v4(1), t0), None);
    }

    #[test]
    fn auth_time_going_backwards_is_harmless() {
        let t0 = Instant::now() + secs(1000);
        let mut l = limiter();
        l.record_failure(v4(1), t0);
        l.record_failure(v4(1), t0 - secs(500));
        assert_eq!(l.is_locked_out(v4(1), t0 - secs(999)), None);
    }

    #[test]
    fn ipv6_keyed_per_64_and_mapped_v4() {
        let t0 = Instant::now();
        let mut l = AuthLimiter::new(2, secs(900), secs(900));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.record_failure(a, t0);
        l.record_failure(b, t0);
        assert!(l.is_locked_out(a, t0).is_some());
        assert!(l.is_locked_out(b, t0).is_some());
        assert!(l.is_locked_out(c, t0).is_none());

        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        l.record_failure(mapped, t0);
        l.record_failure(v4(7), t0);
        assert!(l.is_locked_out(v4(7), t0).is_some());
        assert!(l.is_locked_out(mapped, t0).is_some());
    }

    #[test]
    fn auth_memory_bounded_evicts_expired_then_oldest() {
        let t0 = Instant::now();
        let mut l = limiter().with_max_entries(16);
        for i in 0..16u8 {
            l.record_failure(v4(i), t0 + secs(u64::from(i)));
        }
        assert_eq!(l.len(), 16);
        // All still live: the oldest eighth (2 entries) goes.
        l.record_failure(v4(100), t0 + secs(20));
        assert_eq!(l.len(), 15);
        assert_eq!(l.record_failure(v4(0), t0 + secs(21)), secs(1), "evicted");
        assert_eq!(l.len(), 16);
        assert_eq!(l.record_failure(v4(5), t0 + secs(22)), secs(2), "kept");

        // Much later every window has expired: all are purged at once.
        for _ in 0..5 {
            l.record_failure(v4(200), t0 + secs(100));
        }
        assert_eq!(l.len(), 15);
        let later = t0 + secs(2000);
        l.record_failure(v4(201), later);
        assert_eq!(l.len(), 16);
        l.record_failure(v4(202), later);
        assert_eq!(l.len(), 2, "expired entries purged, only the new ones remain");

        // Stress: never exceeds the bound.
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(i));
            l.record_failure(ip, later + Duration::from_millis(u64::from(i)));
            assert!(l.len() <= 16);
        }
    }

    #[test]
    fn auth_default_bound() {
        let t0 = Instant::now();
        let mut l = limiter();
        for i in 0..(DEFAULT_MAX_ENTRIES as u32 + 500) {
            l.record_failure(IpAddr::V4(Ipv4Addr::from(i)), t0 + Duration::from_micros(u64::from(i)));
        }
        assert!(l.len() <= DEFAULT_MAX_ENTRIES);
    }

    #[test]
    fn locked_out_entries_survive_purge_of_expired() {
        let t0 = Instant::now();
        let mut l = AuthLimiter::new(2, secs(10), secs(1000)).with_max_entries(4);
        l.record_failure(v4(1), t0);
        l.record_failure(v4(1), t0); // locked out until t0+1000
        for i in 2..5 {
            l.record_failure(v4(i), t0);
        }
        // At t0+100 the windows of 2..4 are expired, the lock of 1 is not.
        l.record_failure(v4(50), t0 + secs(100));
        assert_eq!(l.len(), 2);
        assert!(l.is_locked_out(v4(1), t0 + secs(100)).is_some());
    }

    #[test]
    fn rate_limiter_burst_then_refill() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(3, 1.0);
        assert!(r.check(v4(1), t0));
        assert!(r.check(v4(1), t0));
        assert!(r.check(v4(1), t0));
        assert!(!r.check(v4(1), t0));
        assert!(!r.check(v4(1), t0 + Duration::from_millis(999)));
        assert!(r.check(v4(1), t0 + secs(1)));
        assert!(!r.check(v4(1), t0 + secs(1)));
        // Refill never exceeds the burst.
        let t = t0 + secs(3600);
        assert_eq!((0..10).filter(|_| r.check(v4(1), t)).count(), 3);
        // Other addresses are independent.
        assert!(r.check(v4(2), t0));
    }

    #[test]
    fn rate_limiter_fractional_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1, 0.5);
        assert!(r.check(v4(1), t0));
        assert!(!r.check(v4(1), t0 + secs(1)));
        assert!(r.check(v4(1), t0 + secs(2)));
        assert!(!r.check(v4(1), t0 + secs(3)));
        assert!(r.check(v4(1), t0 + secs(4)));
    }

    #[test]
    fn rate_limiter_denied_requests_do_not_consume() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1, 1.0);
        assert!(r.check(v4(1), t0));
        for ms in (100..1000).step_by(100) {
            assert!(!r.check(v4(1), t0 + Duration::from_millis(ms)));
        }
        assert!(r.check(v4(1), t0 + secs(1)));
    }

    #[test]
    fn rate_limiter_degenerate_parameters() {
        let t0 = Instant::now();
        let mut zero_burst = RateLimiter::new(0, 10.0);
        assert!(!zero_burst.check(v4(1), t0));
        assert!(!zero_burst.check(v4(1), t0 + secs(100)));
        for rate in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
            let mut r = RateLimiter::new(1, rate);
            assert!(r.check(v4(1), t0));
            assert!(!r.check(v4(1), t0 + secs(1_000_000)), "{rate}");
        }
    }

    #[test]
    fn rate_limiter_time_going_backwards() {
        let t0 = Instant::now() + secs(100);
        let mut r = RateLimiter::new(1, 1.0);
        assert!(r.check(v4(1), t0));
        assert!(!r.check(v4(1), t0 - secs(50)));
        assert!(r.check(v4(1), t0 + secs(1)));
    }

    #[test]
    fn rate_limiter_memory_bounded() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2, 1.0).with_max_entries(8);
        for i in 0..8u8 {
            assert!(r.check(v4(i), t0));
        }
        assert_eq!(r.len(), 8);
        // Full, nothing refilled yet: exactly one of the oldest goes (ties included).
        assert!(r.check(v4(50), t0 + Duration::from_millis(10)));
        assert_eq!(r.len(), 8);
        // After a full refill every old bucket is dropped as equivalent to a new one.
        assert!(r.check(v4(60), t0 + secs(10)));
        assert_eq!(r.len(), 1);
        for i in 0..5_000u32 {
            r.check(IpAddr::V4(Ipv4Addr::from(i)), t0 + secs(10));
            assert!(r.len() <= 8);
        }
        assert!(!r.is_empty());
    }
}
