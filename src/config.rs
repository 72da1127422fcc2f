//! Configuration: the TOML file (or the built-in default), parsed once into valid types.
//!
//! This module owns the names of every configuration key and their validation. It does no I/O
//! beyond reading the file it is given, and nothing else in the crate parses configuration text.
//! Errors name the key (and, where the TOML parser knows it, the line) so an operator can fix
//! the file without guessing.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration error, with enough context to fix the file. `main` exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named on the command line.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// TOML syntax error or a key with the wrong type or an unknown key.
    #[error("{0}")]
    Syntax(String),
    /// A value that parsed but makes no sense.
    #[error("{}invalid value for `{key}`: {reason}", location.as_deref().map(|l| format!("{l}: ")).unwrap_or_default())]
    Invalid {
        /// The dotted key path, e.g. `node[2].name`.
        key: String,
        /// What is wrong with it.
        reason: String,
        /// `file: line N` (or `line N`) where the key is, when known.
        location: Option<String>,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
        location: None,
    }
}

/// A node's name: a lower-cased, dot-separated domain name without a trailing dot.
///
/// Constructed only by [`NodeName::parse`], so every `NodeName` in the program is valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    /// Parses a domain name (RFC 5321 `Domain`): labels of letters, digits and hyphens, not
    /// starting or ending with a hyphen, at most 63 octets each and 255 in total.
    pub fn parse(s: &str) -> Option<NodeName> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() || s.len() > 255 {
            return None;
        }
        for label in s.split('.') {
            let b = label.as_bytes();
            if b.is_empty() || b.len() > 63 {
                return None;
            }
            if b[0] == b'-' || b[b.len() - 1] == b'-' {
                return None;
            }
            if !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') {
                return None;
            }
        }
        Some(NodeName(s.to_ascii_lowercase()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How ETRN for a node must be authenticated, and therefore where its mail may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may ETRN; mail goes only to the node's MX hosts.
    None,
    /// AUTH PLAIN/LOGIN as the node's user; mail goes to `static_ip` (or MX as fallback).
    Plain,
    /// AUTH CRAM-MD5; mail goes to the address the authenticated ETRN came from (or MX).
    Md5,
}

/// Where the relay's executors run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// One executor pinned to each core: for a machine the relay owns.
    Pinned,
    /// Executors float: for a machine shared with other work (load generators included).
    Unbound,
}

/// One configured node: a mail server the relay holds mail for.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's domain; RCPT is accepted for it (and subdomains when `subdomains`).
    pub name: NodeName,
    /// Accept mail for subdomains of `name` too.
    pub subdomains: bool,
    /// Optional queue name for `ETRN #queue`.
    pub queue: Option<String>,
    /// Authentication required for ETRN.
    pub auth: AuthMode,
    /// User name for AUTH.
    pub user: Option<String>,
    /// Password for AUTH (plain or the CRAM-MD5 shared secret).
    pub password: Option<String>,
    /// Static delivery address for `auth = "plain"`.
    pub static_ip: Option<IpAddr>,
    /// Try delivery on our own at this interval (None: wait for ETRN).
    pub retry_interval: Option<Duration>,
    /// Refuse to deliver without TLS (used by the TLS issue).
    pub require_tls: bool,
}

/// SMTP server limits and listeners.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// Listen addresses; every shard accepts on each (SO_REUSEPORT).
    pub listen: Vec<SocketAddr>,
    /// Largest message accepted, in octets (SIZE and actual size).
    pub max_message_size: usize,
    /// Recipients per message.
    pub max_recipients: usize,
    /// Concurrent connections over all shards.
    pub max_connections: usize,
    /// Idle/command timeout.
    pub timeout: Duration,
    /// Longest command line including CRLF.
    pub max_command_line: usize,
    /// Longest text line in DATA including CRLF.
    pub max_text_line: usize,
    /// Offer AUTH PLAIN/LOGIN without TLS.
    pub allow_plaintext_auth: bool,
    /// Bytes of DATA held in memory per shard before new transactions get 452.
    pub max_inflight_bytes: usize,
}

/// DNS settings.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Nameservers; empty means /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// Per-attempt timeout.
    pub timeout: Duration,
}

/// Outbound delivery settings.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// TCP port of the nodes' SMTP servers.
    pub port: u16,
    /// Most parallel connections per node during a queue run.
    pub connections_per_node: usize,
    /// Connections a queue run starts with (slow start up to `connections_per_node`).
    pub initial_connections: usize,
    /// Messages older than this bounce.
    pub max_age: Duration,
    /// Multiply the RFC 5321 client timeouts by this (tests use small values).
    pub timeout_scale: f64,
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our name: EHLO, Received headers, own-MX detection.
    pub hostname: String,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Size of each preallocated spool segment file.
    pub spool_segment_size: u64,
    /// Longest a spool sync waits for transactions still open on its shard to commit into it
    /// (zero: never waits).
    pub spool_commit_delay: Duration,
    /// Number of executors (already resolved: never 0).
    pub shards: usize,
    /// Executor placement.
    pub placement: Placement,
    /// SMTP server settings.
    pub smtp: SmtpConfig,
    /// DNS settings.
    pub dns: DnsConfig,
    /// Delivery settings.
    pub delivery: DeliveryConfig,
    /// Configured nodes (possibly none: then the relay accepts nothing).
    pub nodes: Vec<NodeConfig>,
    /// Certificate and key for inbound STARTTLS (None: STARTTLS not offered).
    pub tls: Option<TlsFiles>,
    /// Node index by name: RCPT checks, recovery and the queue listing look domains up here,
    /// so their cost does not grow with the number of nodes.
    node_by_name: std::collections::HashMap<String, usize>,
}

/// PEM files for the server side of STARTTLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

// ---- raw (serde) layer: exactly the file's shape, unknown keys rejected -------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Option<String>,
    spool_dir: Option<PathBuf>,
    spool_segment_size: Option<u64>,
    spool_commit_delay_us: Option<u64>,
    shards: Option<usize>,
    placement: Option<Placement>,
    #[serde(default)]
    smtp: RawSmtp,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    node: Vec<RawNode>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    listen: Option<Vec<String>>,
    max_message_size: Option<usize>,
    max_recipients: Option<usize>,
    max_connections: Option<usize>,
    timeout_secs: Option<f64>,
    max_command_line: Option<usize>,
    max_text_line: Option<usize>,
    allow_plaintext_auth: Option<bool>,
    max_inflight_bytes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    nameservers: Option<Vec<String>>,
    timeout_secs: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    port: Option<u16>,
    connections_per_node: Option<usize>,
    initial_connections: Option<usize>,
    max_age: Option<String>,
    timeout_scale: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    #[serde(default)]
    subdomains: bool,
    queue: Option<String>,
    auth: Option<AuthMode>,
    user: Option<String>,
    password: Option<String>,
    static_ip: Option<String>,
    retry_interval: Option<String>,
    #[serde(default)]
    require_tls: bool,
}

/// Parses a duration like `30m`, `5d`, `90s`, `2h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return None,
    };
    let secs = n * mult;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn secs(key: &str, v: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(invalid(key, "must be a positive number of seconds"))
    }
}

fn parse_addr(key: &str, s: &str, default_port: Option<u16>) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let (Some(p), Ok(ip)) = (default_port, s.parse::<IpAddr>()) {
        return Ok(SocketAddr::new(ip, p));
    }
    Err(invalid(
        key,
        format!("`{s}` is not an address like 127.0.0.1:2525 or [::1]:2525"),
    ))
}

impl Config {
    /// The built-in default: listen on 127.0.0.1:2525, spool `./spool`, no nodes.
    pub fn builtin_default() -> Config {
        Self::from_raw(RawConfig::default()).expect("the built-in default is valid")
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        Self::from_raw(raw).map_err(|e| match e {
            ConfigError::Invalid { key, reason, .. } => ConfigError::Invalid {
                location: key_line(text, &key).map(|n| format!("line {n}")),
                key,
                reason,
            },
            other => other,
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Syntax(s) => ConfigError::Syntax(format!("{}: {s}", path.display())),
            ConfigError::Invalid { key, reason, location } => ConfigError::Invalid {
                location: Some(match location {
                    Some(l) => format!("{}: {l}", path.display()),
                    None => path.display().to_string(),
                }),
                key,
                reason,
            },
            other => other,
        })
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let hostname = raw.hostname.unwrap_or_else(default_hostname);
        if NodeName::parse(&hostname).is_none() {
            return Err(invalid("hostname", format!("`{hostname}` is not a domain name")));
        }
        let spool_segment_size = raw.spool_segment_size.unwrap_or(32 << 20);
        if !((64 << 10)..=(1 << 32)).contains(&spool_segment_size) {
            return Err(invalid("spool_segment_size", "between 65536 and 4294967296 octets"));
        }
        let spool_commit_delay = match raw.spool_commit_delay_us.unwrap_or(500) {
            us @ 0..=100_000 => Duration::from_micros(us),
            _ => return Err(invalid("spool_commit_delay_us", "between 0 and 100000 microseconds")),
        };
        let shards = match raw.shards.unwrap_or(0) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n if n > 256 => return Err(invalid("shards", "at most 256")),
            n => n,
        };
        let s = raw.smtp;
        let listen = s
            .listen
            .unwrap_or_else(|| vec!["127.0.0.1:2525".into()])
            .iter()
            .enumerate()
            .map(|(i, a)| parse_addr(&format!("smtp.listen[{i}]"), a, None))
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() {
            return Err(invalid("smtp.listen", "needs at least one address"));
        }
        let max_message_size = s.max_message_size.unwrap_or(52_428_800);
        if max_message_size < 1024 {
            return Err(invalid("smtp.max_message_size", "at least 1024 octets"));
        }
        let max_recipients = s.max_recipients.unwrap_or(100);
        if !(1..=10_000).contains(&max_recipients) {
            return Err(invalid("smtp.max_recipients", "between 1 and 10000"));
        }
        let max_connections = s.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(invalid("smtp.max_connections", "at least 1"));
        }
        let max_command_line = s.max_command_line.unwrap_or(512);
        if !(512..=65536).contains(&max_command_line) {
            return Err(invalid(
                "smtp.max_command_line",
                "between 512 and 65536 (RFC 5321 4.5.3.1.4)",
            ));
        }
        let max_text_line = s.max_text_line.unwrap_or(1000);
        if !(1000..=1_000_000).contains(&max_text_line) {
            return Err(invalid(
                "smtp.max_text_line",
                "between 1000 and 1000000 (RFC 5321 4.5.3.1.6)",
            ));
        }
        let smtp = SmtpConfig {
            listen,
            max_message_size,
            max_recipients,
            max_connections,
            timeout: secs("smtp.timeout_secs", s.timeout_secs.unwrap_or(300.0))?,
            max_command_line,
            max_text_line,
            allow_plaintext_auth: s.allow_plaintext_auth.unwrap_or(false),
            max_inflight_bytes: s.max_inflight_bytes.unwrap_or(256 << 20),
        };
        let dns = DnsConfig {
            nameservers: raw
                .dns
                .nameservers
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, a)| parse_addr(&format!("dns.nameservers[{i}]"), a, Some(53)))
                .collect::<Result<_, _>>()?,
            timeout: secs("dns.timeout_secs", raw.dns.timeout_secs.unwrap_or(2.0))?,
        };
        let d = raw.delivery;
        // Postfix's defaults: default_destination_concurrency_limit = 20,
        // initial_destination_concurrency = 5.
        let connections_per_node = d.connections_per_node.unwrap_or(20);
        if !(1..=64).contains(&connections_per_node) {
            return Err(invalid("delivery.connections_per_node", "between 1 and 64"));
        }
        let initial_connections = match d.initial_connections {
            None => connections_per_node.min(5),
            Some(n) if (1..=connections_per_node).contains(&n) => n,
            Some(_) => {
                return Err(invalid(
                    "delivery.initial_connections",
                    format!("between 1 and connections_per_node ({connections_per_node})"),
                ))
            }
        };
        let max_age = match d.max_age {
            None => Duration::from_secs(5 * 86400),
            Some(t) => parse_duration(&t)
                .ok_or_else(|| invalid("delivery.max_age", format!("`{t}` is not a duration like 5d")))?,
        };
        let timeout_scale = d.timeout_scale.unwrap_or(1.0);
        if !(timeout_scale.is_finite() && timeout_scale > 0.0) {
            return Err(invalid("delivery.timeout_scale", "must be positive"));
        }
        let delivery = DeliveryConfig {
            port: d.port.unwrap_or(25),
            connections_per_node,
            initial_connections,
            max_age,
            timeout_scale,
        };
        let mut nodes = Vec::with_capacity(raw.node.len());
        let mut seen = HashSet::new();
        for (i, n) in raw.node.into_iter().enumerate() {
            let key = |k: &str| format!("node[{i}].{k}");
            let name = NodeName::parse(&n.name)
                .ok_or_else(|| invalid(key("name"), format!("`{}` is not a domain name", n.name)))?;
            if !seen.insert(name.clone()) {
                return Err(invalid(key("name"), format!("node `{name}` is configured twice")));
            }
            let auth = n.auth.unwrap_or(AuthMode::None);
            if auth != AuthMode::None && (n.user.is_none() || n.password.is_none()) {
                return Err(invalid(key("auth"), "`plain` and `md5` need `user` and `password`"));
            }
            if let Some(q) = &n.queue {
                if q.is_empty() || !q.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)) {
                    return Err(invalid(key("queue"), "letters, digits, '-', '_' and '.' only"));
                }
            }
            let static_ip = match &n.static_ip {
                None => None,
                Some(s) => Some(
                    s.parse::<IpAddr>()
                        .map_err(|_| invalid(key("static_ip"), format!("`{s}` is not an IP address")))?,
                ),
            };
            let retry_interval = match &n.retry_interval {
                None => None,
                Some(t) => Some(
                    parse_duration(t)
                        .filter(|d| *d >= Duration::from_secs(1))
                        .ok_or_else(|| invalid(key("retry_interval"), format!("`{t}` is not a duration like 30m")))?,
                ),
            };
            nodes.push(NodeConfig {
                name,
                subdomains: n.subdomains,
                queue: n.queue,
                auth,
                user: n.user,
                password: n.password,
                static_ip,
                retry_interval,
                require_tls: n.require_tls,
            });
        }
        let node_by_name = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str().to_owned(), i))
            .collect();
        Ok(Config {
            hostname: hostname.trim_end_matches('.').to_ascii_lowercase(),
            spool_dir: raw.spool_dir.unwrap_or_else(|| PathBuf::from("./spool")),
            spool_segment_size,
            spool_commit_delay,
            shards,
            placement: raw.placement.unwrap_or(Placement::Unbound),
            smtp,
            dns,
            delivery,
            nodes,
            node_by_name,
            tls: raw.tls.map(|t| TlsFiles {
                cert: t.cert,
                key: t.key,
            }),
        })
    }

    /// The node that receives mail for `domain`: an exact match, or the closest configured
    /// parent with `subdomains = true`.
    pub fn node_for_domain(&self, domain: &str) -> Option<&NodeConfig> {
        self.node_index_for_domain(domain).map(|i| &self.nodes[i])
    }

    /// Like [`Config::node_for_domain`], as an index into `nodes`.
    pub fn node_index_for_domain(&self, domain: &str) -> Option<usize> {
        let d = domain.trim_end_matches('.');
        if d.len() > 255 {
            return None;
        }
        // Lower-case without allocating (domain names are at most 255 octets).
        let mut buf = [0u8; 255];
        let lower = &mut buf[..d.len()];
        lower.copy_from_slice(d.as_bytes());
        lower.make_ascii_lowercase();
        let Ok(lower) = std::str::from_utf8(lower) else {
            return None;
        };
        if let Some(&i) = self.node_by_name.get(lower) {
            return Some(i);
        }
        // The closest parent that takes subdomains: walk the suffixes, longest first.
        let mut rest = lower;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(&i) = self.node_by_name.get(parent) {
                if self.nodes[i].subdomains {
                    return Some(i);
                }
            }
            rest = parent;
        }
        None
    }
}

/// The 1-based line of a dotted key (`smtp.max_recipients`, `node[2].auth`, `shards`, or a
/// list element `smtp.listen[1]`) in TOML text written in the usual one-key-per-line style.
fn key_line(text: &str, dotted: &str) -> Option<usize> {
    let (section, leaf) = match dotted.rsplit_once('.') {
        Some((s, l)) => (s, l),
        None => ("", dotted),
    };
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    // `node[2]` -> the third `[[node]]` table.
    let (table, index) = match section.split_once('[') {
        Some((t, rest)) => (t, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (section, None),
    };
    let mut current = String::new();
    let mut seen = 0usize;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            current = name.trim().to_owned();
            if current == table {
                seen += 1;
            }
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name.trim().to_owned();
            continue;
        }
        let in_place = current == table && index.is_none_or(|n| seen == n + 1);
        let key = line.split('=').next().unwrap_or("").trim();
        if in_place && line.contains('=') && key == leaf {
            return Some(i + 1);
        }
    }
    None
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| NodeName::parse(h).is_some() && h.contains('.'))
        .unwrap_or_else(|| "localhost.localdomain".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_loopback_and_empty() {
        let c = Config::builtin_default();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert!(c.nodes.is_empty());
        assert_eq!(c.smtp.max_recipients, 100);
        assert!(c.shards >= 1);
    }

    /// `etrn-relay.example.toml` says it shows every key with its default: every setting it
    /// shares with the built-in default (all but the name, the node and its TLS files) must
    /// parse to the same value, so a changed default cannot leave the example behind.
    #[test]
    fn the_example_file_shows_the_defaults() {
        let text = include_str!("../etrn-relay.example.toml");
        let example = Config::from_toml(text).expect("the example file is valid");
        let default = Config::builtin_default();
        let shown = |c: &Config| {
            format!(
                "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
                c.spool_dir,
                c.spool_segment_size,
                c.spool_commit_delay,
                c.shards,
                c.placement,
                c.smtp,
                c.dns,
                c.delivery,
                c.tls.is_some()
            )
        };
        assert_eq!(shown(&example), shown(&default));
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = Config::from_toml("hostname = \"a.b\"\n[smtp]\nmax_recipients = \"x\"\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("max_recipients") && s.contains("line 3"), "{s}");
        let e = Config::from_toml("[smtp]\nbogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::from_toml("[[node]]\nname = \"bad_name\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node[0].name"), "{e}");
        let e = Config::from_toml("[[node]]\nname = \"a.test\"\nauth = \"md5\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node[0].auth"), "{e}");
    }

    #[test]
    fn node_lookup_respects_subdomains() {
        let c = Config::from_toml(
            "[[node]]\nname = \"n1.test\"\n[[node]]\nname = \"n2.test\"\nsubdomains = true\n[[node]]\nname = \"deep.n2.test\"\n",
        )
        .unwrap();
        assert_eq!(c.node_for_domain("N1.test").unwrap().name.as_str(), "n1.test");
        assert!(c.node_for_domain("x.n1.test").is_none());
        assert_eq!(c.node_for_domain("x.n2.test").unwrap().name.as_str(), "n2.test");
        assert_eq!(c.node_for_domain("a.deep.n2.test").unwrap().name.as_str(), "n2.test");
        assert_eq!(c.node_for_domain("deep.n2.test").unwrap().name.as_str(), "deep.n2.test");
        assert!(c.node_for_domain("xn2.test").is_none());
        assert!(c.node_for_domain("other.test").is_none());
    }

    #[test]
    fn delivery_concurrency_defaults_and_bounds() {
        for (toml, want, why) in [
            ("", (5, 20), "Postfix's defaults"),
            ("connections_per_node = 2", (2, 2), "initial follows a smaller limit"),
            ("initial_connections = 1", (1, 20), "initial alone"),
        ] {
            let d = Config::from_toml(&format!("[delivery]\n{toml}\n")).unwrap().delivery;
            assert_eq!((d.initial_connections, d.connections_per_node), want, "{why}");
        }
        for bad in [
            "initial_connections = 0",
            "initial_connections = 21",
            "connections_per_node = 0",
        ] {
            let e = Config::from_toml(&format!("[delivery]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad.split(' ').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("5d"), Some(Duration::from_secs(432000)));
        assert_eq!(parse_duration("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("3w"), None);
    }
}
