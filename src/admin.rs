//! Operator commands that run outside the server: `queue` (a read-only listing of the spool,
//! safe while the server runs) and `flush` (ETRN to a running relay, with optional AUTH).
//!
//! These use blocking std I/O: they run in the CLI process, never on an executor.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::config::Config;

/// Prints one line per node: messages, bytes, age of the oldest.
pub fn print_queue(cfg: &Config, out: &mut dyn Write) -> std::io::Result<()> {
    let seg_dir = cfg.spool_dir.join("segments");
    if !seg_dir.exists() {
        writeln!(
            out,
            "spool {} is empty (no segments directory)",
            cfg.spool_dir.display()
        )?;
        return Ok(());
    }
    let scan = crate::spool::scan(&seg_dir, &crate::runtime::node_classifier(cfg))?;
    let now = crate::spool::unix_now();
    // node -> (messages, bytes, oldest arrival)
    let mut rows: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for m in &scan.messages {
        let mut nodes: Vec<String> = m
            .pending
            .iter()
            .map(|(_, class)| cfg.nodes[*class as usize].name.to_string())
            .chain(m.unclassified.iter().map(|(_, r)| {
                let d = r.rsplit_once('@').map_or("", |(_, d)| d);
                if m.null_sender {
                    format!("(bounces to {d})")
                } else {
                    format!("(unconfigured: {d})")
                }
            }))
            .collect();
        nodes.sort();
        nodes.dedup();
        for n in nodes {
            let e = rows.entry(n).or_insert((0, 0, u64::MAX));
            e.0 += 1;
            e.1 += m.data_len;
            e.2 = e.2.min(m.arrival);
        }
    }
    writeln!(
        out,
        "{:<40} {:>10} {:>14} {:>12}",
        "NODE", "MESSAGES", "BYTES", "OLDEST"
    )?;
    for n in &cfg.nodes {
        rows.entry(n.name.to_string()).or_insert((0, 0, u64::MAX));
    }
    let (mut tm, mut tb) = (0, 0);
    for (node, (msgs, bytes, oldest)) in &rows {
        let age = if *msgs == 0 {
            "-".to_string()
        } else {
            human_age(now.saturating_sub(*oldest))
        };
        writeln!(out, "{node:<40} {msgs:>10} {bytes:>14} {age:>12}")?;
        tm += msgs;
        tb += bytes;
    }
    writeln!(out, "{:<40} {:>10} {:>14}", "total", tm, tb)?;
    if scan.corrupt_records > 0 {
        writeln!(out, "({} damaged record(s) skipped)", scan.corrupt_records)?;
    }
    Ok(())
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Errors of the `flush` command.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Network error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server said no before ETRN.
    #[error("server refused: {0}")]
    Refused(String),
}

struct Line<'a> {
    r: BufReader<&'a TcpStream>,
}

impl Line<'_> {
    /// Reads a whole (possibly multi-line) reply; returns the last line.
    fn reply(&mut self) -> std::io::Result<String> {
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            let done = l.as_bytes().get(3) != Some(&b'-');
            if done {
                return Ok(l.trim_end().to_owned());
            }
        }
    }
}

/// Speaks EHLO, optional AUTH, ETRN to `server` and returns the ETRN reply line.
pub fn flush(
    server: &str,
    node: &str,
    user: Option<&str>,
    password: Option<&str>,
    mech: &str,
) -> Result<String, FlushError> {
    let s = TcpStream::connect(server)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = &s;
    let mut r = Line { r: BufReader::new(&s) };
    let greet = r.reply()?;
    if !greet.starts_with("220") {
        return Err(FlushError::Refused(greet));
    }
    writeln!(w, "EHLO {}\r", crate::config::Config::builtin_default().hostname)?;
    let ehlo = r.reply()?;
    if !ehlo.starts_with("250") {
        return Err(FlushError::Refused(ehlo));
    }
    if let (Some(u), Some(p)) = (user, password) {
        match mech.to_ascii_lowercase().as_str() {
            "plain" => {
                write!(w, "AUTH PLAIN {}\r\n", crate::auth::client_plain(u, p))?;
            }
            "cram-md5" => {
                write!(w, "AUTH CRAM-MD5\r\n")?;
                let ch = r.reply()?;
                let b64 = ch.strip_prefix("334 ").ok_or_else(|| FlushError::Refused(ch.clone()))?;
                let resp = crate::auth::client_cram_md5(u, p, b64.as_bytes())
                    .ok_or_else(|| FlushError::Refused(ch.clone()))?;
                write!(w, "{resp}\r\n")?;
            }
            other => {
                return Err(FlushError::Refused(format!(
                    "unknown mechanism {other} (plain or cram-md5)"
                )))
            }
        }
        let a = r.reply()?;
        if !a.starts_with("235") {
            return Err(FlushError::Refused(a));
        }
    }
    write!(w, "ETRN {node}\r\n")?;
    let reply = r.reply()?;
    let _ = write!(w, "QUIT\r\n");
    Ok(reply)
}
