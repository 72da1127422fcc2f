//! Delivery status notifications: the bounce message sent to the original sender when
//! recipients fail permanently (RFC 3464 `multipart/report; report-type=delivery-status`,
//! RFC 6522), and an RFC 5322 date formatter.
//!
//! Owns: the text of the bounce, built from plain values ([`BounceInput`]) into bytes with CRLF
//! line endings, lines of at most 998 octets and a boundary that occurs nowhere in the content.
//! Everything that came from the network (recipients, remote replies, original headers) is
//! sanitised so that it can neither inject header lines nor break the MIME structure.
//!
//! Must not touch: sockets, files, the spool or the clock (the caller passes `now`). Deciding
//! *whether* to bounce (never for a null reverse-path), queuing the bounce with a null
//! `MAIL FROM:<>`, and dot-stuffing it on the wire are the caller's business.

use std::time::{SystemTime, UNIX_EPOCH};

use memchr::memmem;

/// Longest line allowed by RFC 5322 section 2.1.1, without CRLF.
const MAX_LINE: usize = 998;
/// Lines are folded or wrapped at this width when there is whitespace to do it.
const SOFT_LINE: usize = 78;
/// Words longer than this are split; leaves room for a prefix within [`MAX_LINE`].
const WORD_CHUNK: usize = 900;
/// Bound on each value taken from the input (recipient, diagnostic, host names).
const MAX_VALUE: usize = 2_000;
/// Bound on the original headers returned, so the bounce stays small.
const MAX_ORIGINAL_HEADERS: usize = 64 * 1024;
/// Bound on the recipients listed (the rest are summarised in one line).
const MAX_RECIPIENTS: usize = 1_000;

/// One recipient that could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecipient {
    /// The recipient address as given in `RCPT TO`, without angle brackets.
    pub recipient: String,
    /// RFC 3463 enhanced status code, e.g. `5.1.1`; anything malformed is reported as `5.0.0`.
    pub status: String,
    /// RFC 3464 diagnostic, e.g. `smtp; 550 5.1.1 no such user`; `smtp; ` is prepended when
    /// there is no type. Empty means none.
    pub diagnostic: String,
    /// Host name of the MTA that rejected the recipient, if one did.
    pub remote_mta: Option<String>,
}

/// Everything a bounce is built from.
#[derive(Debug, Clone, Copy)]
pub struct BounceInput<'a> {
    /// Host name of this relay; the bounce comes from `MAILER-DAEMON@` this host.
    pub reporting_mta: &'a str,
    /// Reverse-path of the original message; the bounce goes to it. Must not be empty (never
    /// bounce a bounce); an empty sender yields `To: undisclosed-recipients:;`.
    pub original_sender: &'a str,
    /// The relay's queue identifier of the original message.
    pub original_queue_id: &'a str,
    /// When the original message was accepted.
    pub arrival_date: SystemTime,
    /// The recipients that failed.
    pub failed: &'a [FailedRecipient],
    /// The full original message (headers and body, CRLF lines); only its header section is
    /// returned.
    pub original_message: &'a [u8],
    /// The current time, for the `Date` header.
    pub now: SystemTime,
}

/// Builds the complete bounce message: header section, empty line and the three-part
/// `multipart/report` body (human-readable `text/plain`, `message/delivery-status`,
/// `text/rfc822-headers` with the original header section only). CRLF line endings, every
/// line at most 998 octets, no terminating `.` line.
pub fn build_bounce(input: &BounceInput) -> Vec<u8> {
    let mta = clean(input.reporting_mta);
    let mta = if mta.is_empty() {
        "localhost".to_owned()
    } else {
        mta.replace(' ', "")
    };
    let notification = notification_part(input, &mta);
    let report = delivery_status_part(input, &mta);
    let headers = original_headers(input.original_message);
    let boundary = choose_boundary(&[&notification, &report, &headers], || fastrand::u64(..));

    let eight_bit = |b: &[u8]| !b.is_ascii();
    let mut out = Vec::with_capacity(notification.len() + report.len() + headers.len() + 1024);
    push_field(&mut out, "From", &format!("Mail Delivery System <MAILER-DAEMON@{mta}>"));
    let sender = strip_brackets(&clean(input.original_sender)).replace(' ', "");
    if sender.is_empty() {
        push_field(&mut out, "To", "undisclosed-recipients:;");
    } else {
        push_field(&mut out, "To", &format!("<{sender}>"));
    }
    push_field(&mut out, "Subject", "Undelivered Mail Returned to Sender");
    push_field(&mut out, "Date", &rfc5322_date(input.now));
    let id_time = unix_seconds(input.now);
    push_field(
        &mut out,
        "Message-ID",
        &format!("<{id_time}.{:016x}.bounce@{mta}>", fastrand::u64(..)),
    );
    push_field(&mut out, "Auto-Submitted", "auto-replied");
    push_field(&mut out, "MIME-Version", "1.0");
    push_field(
        &mut out,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    let any_8bit = eight_bit(&out) || eight_bit(&notification) || eight_bit(&headers);
    let cte = if any_8bit { "8bit" } else { "7bit" };
    push_field(&mut out, "Content-Transfer-Encoding", cte);
    out.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n");

    let text_charset = if eight_bit(&notification) { "utf-8" } else { "us-ascii" };
    let parts: [(&str, String, &[u8]); 3] = [
        (
            "Notification",
            format!("text/plain; charset={text_charset}"),
            &notification,
        ),
        ("Delivery report", "message/delivery-status".to_owned(), &report),
        (
            "Undelivered Message Headers",
            "text/rfc822-headers".to_owned(),
            &headers,
        ),
    ];
    for (description, content_type, body) in parts {
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\n");
        push_field(&mut out, "Content-Description", description);
        push_field(&mut out, "Content-Type", &content_type);
        if eight_bit(body) {
            push_field(&mut out, "Content-Transfer-Encoding", "8bit");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
    }
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    out
}

/// Formats `t` as an RFC 5322 date in UTC, e.g. `Thu, 01 Jan 1970 00:00:00 +0000`.
/// Times before 1970 are supported.
pub fn rfc5322_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = unix_seconds(t);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday; `rem_euclid` keeps the index in 0..7.
    let weekday = DAYS[(days + 4).rem_euclid(7) as usize];
    let month = MONTHS[(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {month} {year:04} {:02}:{:02}:{:02} +0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Whole seconds since the Unix epoch, rounded down, saturating at the `i64` range.
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            let floor = i64::from(d.subsec_nanos() > 0);
            whole.saturating_neg().saturating_sub(floor)
        }
    }
}

/// Proleptic Gregorian (year, month 1..=12, day 1..=31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Picks a boundary that occurs in none of `parts`. `random` supplies candidates; a counter
/// makes every attempt distinct even if it does not.
fn choose_boundary(parts: &[&[u8]], mut random: impl FnMut() -> u64) -> String {
    let mut attempt: u64 = 0;
    loop {
        // "=_" cannot occur in base64 or quoted-printable text.
        let b = format!("=_etrn-relay_{:016x}_{attempt}", random());
        if parts.iter().all(|p| memmem::find(p, b.as_bytes()).is_none()) {
            return b;
        }
        attempt += 1;
    }
}

/// Control characters (CR, LF, TAB, NUL, DEL, C1) become spaces, runs of spaces collapse,
/// the ends are trimmed, and the result is cut at [`MAX_VALUE`] bytes.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_VALUE + 3));
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() + c.len_utf8() > MAX_VALUE {
            out.push_str("...");
            break;
        }
        out.push(c);
    }
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out
}

fn strip_brackets(s: &str) -> &str {
    s.strip_prefix('<').and_then(|s| s.strip_suffix('>')).unwrap_or(s)
}

/// Splits `text` at spaces into words, and words longer than [`WORD_CHUNK`] bytes into
/// pieces at character boundaries.
fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for mut w in text.split(' ').filter(|w| !w.is_empty()) {
        while w.len() > WORD_CHUNK {
            let mut cut = WORD_CHUNK;
            while !w.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push(&w[..cut]);
            w = &w[cut..];
        }
        out.push(w);
    }
    out
}

/// Appends `first` followed by `text`, wrapped at spaces to [`SOFT_LINE`] where possible;
/// continuation lines start with `indent`. No line exceeds [`MAX_LINE`] as long as the
/// prefixes are short. Ends with CRLF.
fn push_wrapped(out: &mut Vec<u8>, first: &str, indent: &str, text: &str) {
    let mut line_len = first.len();
    let mut at_line_start = true;
    out.extend_from_slice(first.as_bytes());
    for w in words(text) {
        if !at_line_start && line_len + 1 + w.len() > SOFT_LINE {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(indent.as_bytes());
            line_len = indent.len();
            at_line_start = true;
        }
        if !at_line_start {
            out.push(b' ');
            line_len += 1;
        }
        out.extend_from_slice(w.as_bytes());
        line_len += w.len();
        at_line_start = false;
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a header field (RFC 5322 folding: continuation lines start with a space, which
/// stands for the space the fold replaced). `value` must already be clean.
fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    push_wrapped(out, &format!("{name}: "), " ", value);
}

/// The human-readable first part.
fn notification_part(input: &BounceInput, mta: &str) -> Vec<u8> {
    let mut out = Vec::new();
    push_wrapped(&mut out, "", "", &format!("This is the mail system at host {mta}."));
    out.extend_from_slice(b"\r\n");
    push_wrapped(
        &mut out,
        "",
        "",
        "Your message could not be delivered to one or more recipients. \
         The headers of your message are attached below.",
    );
    out.extend_from_slice(b"\r\n");
    let id = clean(input.original_queue_id);
    if !id.is_empty() {
        push_wrapped(&mut out, "", "    ", &format!("Queue ID: {id}"));
    }
    push_wrapped(
        &mut out,
        "",
        "    ",
        &format!("Received: {}", rfc5322_date(input.arrival_date)),
    );
    for r in input.failed.iter().take(MAX_RECIPIENTS) {
        out.extend_from_slice(b"\r\n");
        let rcpt = strip_brackets(&clean(&r.recipient)).to_owned();
        let diagnostic = clean(&r.diagnostic);
        let diagnostic = match diagnostic.split_once(';') {
            Some((ty, rest)) if is_type_token(ty) => rest.trim().to_owned(),
            _ => diagnostic,
        };
        let mut text = format!("<{rcpt}>:");
        if let Some(remote) = r.remote_mta.as_deref().map(clean) {
            if !remote.is_empty() {
                text.push_str(&format!(" host {remote} said:"));
            }
        }
        if diagnostic.is_empty() {
            text.push_str(&format!(" delivery failed (status {}).", status(&r.status)));
        } else {
            text.push(' ');
            text.push_str(&diagnostic);
        }
        push_wrapped(&mut out, "", "    ", &text);
    }
    if input.failed.len() > MAX_RECIPIENTS {
        out.extend_from_slice(b"\r\n");
        push_wrapped(
            &mut out,
            "",
            "",
            &format!("... and {} more recipients.", input.failed.len() - MAX_RECIPIENTS),
        );
    }
    out
}

/// The `message/delivery-status` part (RFC 3464 section 2): per-message fields, then one
/// block per recipient. Pure ASCII: anything else is written as `\x{HEX}` (RFC 6533).
fn delivery_status_part(input: &BounceInput, mta: &str) -> Vec<u8> {
    let mut out = Vec::new();
    push_field(&mut out, "Reporting-MTA", &format!("dns; {}", escape(mta)));
    let id = clean(input.original_queue_id);
    if !id.is_empty() {
        push_field(&mut out, "X-Etrn-Relay-Queue-ID", &escape(&id));
    }
    push_field(&mut out, "Arrival-Date", &rfc5322_date(input.arrival_date));
    for r in input.failed.iter().take(MAX_RECIPIENTS) {
        out.extend_from_slice(b"\r\n");
        let rcpt = strip_brackets(&clean(&r.recipient)).replace(' ', "");
        let final_recipient = if rcpt.is_ascii() {
            format!("rfc822; {rcpt}")
        } else {
            format!("utf-8; {}", utf8_addr_xtext(&rcpt))
        };
        push_field(&mut out, "Final-Recipient", &final_recipient);
        push_field(&mut out, "Action", "failed");
        push_field(&mut out, "Status", status(&r.status));
        if let Some(remote) = r.remote_mta.as_deref().map(clean) {
            if !remote.is_empty() {
                push_field(&mut out, "Remote-MTA", &typed("dns", &escape(&remote)));
            }
        }
        let diagnostic = clean(&r.diagnostic);
        if !diagnostic.is_empty() {
            push_field(&mut out, "Diagnostic-Code", &typed("smtp", &escape(&diagnostic)));
        }
    }
    out
}

/// `value` if it already starts with `type;`, else `default; value`.
fn typed(default: &str, value: &str) -> String {
    match value.split_once(';') {
        Some((ty, _)) if is_type_token(ty) => value.to_owned(),
        _ => format!("{default}; {value}"),
    }
}

/// An RFC 3464 type name such as `smtp`, `dns`, `X-Unix`.
fn is_type_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A syntactically valid RFC 3463 status (`class.subject.detail`), else `5.0.0`.
fn status(s: &str) -> &str {
    let s = s.trim();
    let mut parts = s.split('.');
    let digits =
        |p: Option<&str>| p.is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let class_ok = matches!(parts.clone().next(), Some("2" | "4" | "5"));
    if class_ok && digits(parts.next()) && digits(parts.next()) && digits(parts.next()) && parts.next().is_none() {
        s
    } else {
        "5.0.0"
    }
}

/// Non-ASCII characters as `\x{HEX}` (RFC 6533 EmbeddedUnicodeChar), ASCII unchanged.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
        }
    }
    out
}

/// RFC 6533 `utf-8-addr-xtext`: like [`escape`], and `+`, `=`, `\` encoded too.
fn utf8_addr_xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_graphic() && !matches!(c, '+' | '=' | '\\') {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
        }
    }
    out
}

/// The header section of `message` (up to the first empty line), with CRLF line endings,
/// lone CR and NUL replaced by spaces, lines over [`MAX_LINE`] folded, and cut at a field
/// boundary after [`MAX_ORIGINAL_HEADERS`] bytes.
fn original_headers(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut field: Vec<u8> = Vec::new();
    for raw in message.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break;
        }
        let continuation = matches!(line[0], b' ' | b'\t');
        if !continuation && !field.is_empty() {
            if out.len() + field.len() > MAX_ORIGINAL_HEADERS {
                return out;
            }
            out.append(&mut field);
        }
        push_header_line(&mut field, line);
    }
    if out.len() + field.len() <= MAX_ORIGINAL_HEADERS {
        out.append(&mut field);
    }
    out
}

/// Appends one original header line, folded into lines of at most [`MAX_LINE`] octets:
/// before whitespace where there is some, otherwise at a UTF-8 boundary with a space
/// inserted (so the continuation is still a valid folded line).
fn push_header_line(out: &mut Vec<u8>, line: &[u8]) {
    let clean = |b: &u8| if matches!(*b, b'\r' | 0) { b' ' } else { *b };
    let mut rest = line;
    let mut inserted_space = false;
    loop {
        let budget = MAX_LINE - usize::from(inserted_space);
        if rest.len() <= budget {
            out.extend(rest.iter().map(clean));
            out.extend_from_slice(b"\r\n");
            return;
        }
        // Never cut at 0: a continuation line starts with whitespace.
        let cut = match rest[1..=WORD_CHUNK].iter().rposition(|b| matches!(*b, b' ' | b'\t')) {
            Some(p) => {
                inserted_space = false;
                p + 1
            }
            None => {
                inserted_space = true;
                let mut cut = WORD_CHUNK;
                while cut > 1 && rest[cut] & 0xC0 == 0x80 {
                    cut -= 1;
                }
                cut
            }
        };
        out.extend(rest[..cut].iter().map(clean));
        out.extend_from_slice(if inserted_space { &b"\r\n "[..] } else { b"\r\n" });
        rest = &rest[cut..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn rcpt(r: &str, status: &str, diag: &str, remote: Option<&str>) -> FailedRecipient {
        FailedRecipient {
            recipient: r.into(),
            status: status.into(),
            diagnostic: diag.into(),
            remote_mta: remote.map(Into::into),
        }
    }

    const ORIGINAL: &[u8] = b"Received: from a.example by relay\r\n\tid 42\r\n\
From: alice@sender.example\r\nTo: bob@node.example\r\nSubject: hello\r\n\
\r\nSECRET BODY LINE\r\nmore body\r\n";

    fn input<'a>(failed: &'a [FailedRecipient], original: &'a [u8]) -> BounceInput<'a> {
        BounceInput {
            reporting_mta: "relay.example",
            original_sender: "alice@sender.example",
            original_queue_id: "Q123",
            arrival_date: at(1_700_000_000),
            failed,
            original_message: original,
            now: at(1_700_003_600),
        }
    }

    struct Parsed {
        headers: String,
        parts: Vec<(String, Vec<u8>)>,
    }

    /// A deliberately strict multipart parser: CRLF only, exactly one closing delimiter.
    fn parse(msg: &[u8]) -> Parsed {
        let text = std::str::from_utf8(msg).expect("utf-8");
        assert!(!text.contains('\0'));
        // CRLF only, no bare CR or LF.
        for (i, b) in msg.iter().enumerate() {
            if *b == b'\n' {
                assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
            }
            if *b == b'\r' {
                assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        for line in text.split("\r\n") {
            assert!(line.len() <= MAX_LINE, "line of {} octets", line.len());
        }
        assert!(msg.ends_with(b"\r\n"));
        let (headers, body) = text.split_once("\r\n\r\n").expect("header/body separator");
        let unfolded = headers.replace("\r\n ", " ").replace("\r\n\t", "\t");
        let ct = unfolded
            .lines()
            .find(|l| l.starts_with("Content-Type:"))
            .expect("content-type");
        assert!(ct.contains("multipart/report"), "{ct}");
        assert!(ct.contains("report-type=delivery-status"), "{ct}");
        let b = ct.split("boundary=\"").nth(1).unwrap().split('"').next().unwrap();
        let delim = format!("\r\n--{b}");
        let body = format!("\r\n{body}");
        let mut chunks: Vec<&str> = body.split(delim.as_str()).collect();
        assert_eq!(chunks.remove(0).trim(), "This is a MIME-encapsulated message.");
        let last = chunks.pop().unwrap();
        assert_eq!(last, "--\r\n", "closing delimiter ends the message");
        let parts = chunks
            .into_iter()
            .map(|c| {
                let c = c.strip_prefix("\r\n").expect("CRLF after delimiter");
                let (h, b) = c.split_once("\r\n\r\n").expect("part header separator");
                (h.to_owned(), b.as_bytes().to_vec())
            })
            .collect();
        Parsed {
            headers: unfolded,
            parts,
        }
    }

    fn header<'a>(p: &'a Parsed, name: &str) -> &'a str {
        p.headers
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn structure() {
        let failed = [
            rcpt(
                "bob@node.example",
                "5.1.1",
                "smtp; 550 5.1.1 no such user",
                Some("mx.node.example"),
            ),
            rcpt("carol@node.example", "5.4.7", "", None),
        ];
        let msg = build_bounce(&input(&failed, ORIGINAL));
        let p = parse(&msg);
        assert_eq!(header(&p, "To"), "<alice@sender.example>");
        assert!(header(&p, "From").contains("<MAILER-DAEMON@relay.example>"));
        assert_eq!(header(&p, "Subject"), "Undelivered Mail Returned to Sender");
        assert_eq!(header(&p, "Auto-Submitted"), "auto-replied");
        assert_eq!(header(&p, "MIME-Version"), "1.0");
        assert_eq!(header(&p, "Date"), "Tue, 14 Nov 2023 23:13:20 +0000");
        assert_eq!(header(&p, "Content-Transfer-Encoding"), "7bit");
        let mid = header(&p, "Message-ID");
        assert!(mid.starts_with('<') && mid.ends_with("@relay.example>"), "{mid}");

        assert_eq!(p.parts.len(), 3);
        assert!(p.parts[0].0.contains("Content-Type: text/plain; charset=us-ascii"));
        assert!(p.parts[1].0.contains("Content-Type: message/delivery-status"));
        assert!(p.parts[2].0.contains("Content-Type: text/rfc822-headers"));

        let human = String::from_utf8(p.parts[0].1.clone()).unwrap();
        assert!(human.contains("relay.example"));
        assert!(human.contains("<bob@node.example>: host mx.node.example said: 550 5.1.1"));
        assert!(human.contains("<carol@node.example>: delivery failed (status 5.4.7)."));
        assert!(human.contains("Q123"));

        let report = String::from_utf8(p.parts[1].1.clone()).unwrap();
        let blocks: Vec<&str> = report.trim_end().split("\r\n\r\n").collect();
        assert_eq!(blocks.len(), 3, "{report}");
        assert!(blocks[0].contains("Reporting-MTA: dns; relay.example\r\n"));
        assert!(blocks[0].contains("Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000"));
        assert!(blocks[0].contains("X-Etrn-Relay-Queue-ID: Q123"));
        assert_eq!(
            blocks[1],
            "Final-Recipient: rfc822; bob@node.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\
             Remote-MTA: dns; mx.node.example\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user"
        );
        assert_eq!(
            blocks[2],
            "Final-Recipient: rfc822; carol@node.example\r\nAction: failed\r\nStatus: 5.4.7"
        );
    }

    #[test]
    fn only_original_headers_are_returned() {
        let failed = [rcpt("bob@node.example", "5.1.1", "x", None)];
        let msg = build_bounce(&input(&failed, ORIGINAL));
        assert!(memmem::find(&msg, b"SECRET BODY").is_none());
        let p = parse(&msg);
        assert_eq!(
            p.parts[2].1,
            b"Received: from a.example by relay\r\n\tid 42\r\nFrom: alice@sender.example\r\n\
To: bob@node.example\r\nSubject: hello\r\n"
        );
    }

    #[test]
    fn header_extraction_edge_cases() {
        assert_eq!(original_headers(b""), b"");
        assert_eq!(original_headers(b"\r\nbody only\r\n"), b"");
        assert_eq!(original_headers(b"A: 1\r\nB: 2"), b"A: 1\r\nB: 2\r\n");
        // Bare LF, stray CR and NUL are normalised.
        assert_eq!(original_headers(b"A: 1\nB: x\ry\0z\n\nbody"), b"A: 1\r\nB: x y z\r\n");
        assert_eq!(original_headers(b"A: 1\r\r\n\r\n"), b"A: 1 \r\n");
    }

    #[test]
    fn original_headers_capped_at_field_boundary() {
        let mut m = Vec::new();
        for i in 0..5_000 {
            m.extend_from_slice(format!("X-H-{i}: value\r\n\tcontinued\r\n").as_bytes());
        }
        m.extend_from_slice(b"\r\nbody");
        let h = original_headers(&m);
        assert!(h.len() <= MAX_ORIGINAL_HEADERS);
        assert!(h.len() > MAX_ORIGINAL_HEADERS - 100);
        assert!(h.ends_with(b"\tcontinued\r\n"), "cut between fields");
    }

    fn assert_lines_ok(bytes: &[u8]) {
        for line in bytes.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(line.len() <= MAX_LINE, "line of {} octets", line.len());
            assert!(!line.contains(&b'\r'));
        }
    }

    #[test]
    fn long_header_lines_are_folded() {
        // Long line with spaces: folded before whitespace, unfolding restores it exactly.
        let words: Vec<String> = (0..600).map(|i| format!("w{i}")).collect();
        let line = format!("References: {}", words.join(" "));
        let h = original_headers(format!("{line}\r\nX: y\r\n\r\n").as_bytes());
        assert_lines_ok(&h);
        let text = String::from_utf8(h).unwrap();
        let unfolded = text.replace("\r\n ", " ");
        assert_eq!(unfolded, format!("{line}\r\nX: y\r\n"));

        // One 5000-octet word with multi-byte characters: split at UTF-8 boundaries, every
        // continuation starts with whitespace.
        let long = format!("X-Long:{}", "é".repeat(2_500));
        let h = original_headers(long.as_bytes());
        assert_lines_ok(&h);
        let text = String::from_utf8(h).expect("still valid UTF-8");
        let lines: Vec<&str> = text.trim_end().split("\r\n").collect();
        assert!(lines.len() >= 6);
        assert!(lines[1..].iter().all(|l| l.starts_with(' ')));
        assert_eq!(text.replace("\r\n ", "").trim_end(), long);

        // A long continuation line (starting with whitespace) and invalid UTF-8.
        let mut m = b"A: b\r\n".to_vec();
        m.push(b'\t');
        m.extend(std::iter::repeat_n(0x80u8, 3_000));
        m.extend_from_slice(b"\r\n\r\n");
        let h = original_headers(&m);
        assert_lines_ok(&h);
        assert!(h.len() >= 3_000);

        // Whitespace exactly at position 0 only: no infinite loop.
        let mut m = vec![b' '];
        m.extend(std::iter::repeat_n(b'x', 2_000));
        assert_lines_ok(&original_headers(&m));
    }

    #[test]
    fn long_and_hostile_values_are_safe() {
        let failed = [
            rcpt(
                "evil@x\r\nBcc: victim@example\r\n",
                "5.1.1",
                &format!("smtp; 550 {}", "y ".repeat(3_000)),
                Some("mx\r\n\r\n--inject"),
            ),
            rcpt(&"a".repeat(5_000), "bogus", &"z".repeat(5_000), None),
        ];
        let mut inp = input(&failed, ORIGINAL);
        inp.original_sender = "<alice@sender.example>\r\nX-Injected: 1";
        inp.original_queue_id = "q\r\nX-Bad: 1";
        let msg = build_bounce(&inp);
        let p = parse(&msg);
        let text = String::from_utf8(msg.clone()).unwrap();
        for bad in ["\r\nBcc:", "\r\nX-Injected:", "\r\nX-Bad:", "\r\n--inject"] {
            assert!(!text.contains(bad), "{bad:?} injected");
        }
        let report = String::from_utf8(p.parts[1].1.clone()).unwrap();
        assert!(report.contains("Status: 5.0.0"), "malformed status replaced");
        let unfolded = report.replace("\r\n ", " ");
        let diag = unfolded
            .lines()
            .find(|l| l.starts_with("Diagnostic-Code: smtp; 550 y y"))
            .unwrap();
        assert!(diag.ends_with("..."), "long values truncated");
        assert!(diag.len() < MAX_VALUE + 40);
    }

    #[test]
    fn non_ascii_is_escaped_in_report_and_flagged_8bit() {
        let failed = [rcpt("jörg@node.example", "5.1.1", "smtp; 550 unknown user jörg", None)];
        let original = "Subject: grüße\r\n\r\nbody".as_bytes();
        let msg = build_bounce(&input(&failed, original));
        let p = parse(&msg);
        assert_eq!(header(&p, "Content-Transfer-Encoding"), "8bit");
        assert!(p.parts[0].0.contains("charset=utf-8"));
        assert!(p.parts[0].0.contains("Content-Transfer-Encoding: 8bit"));
        let report = std::str::from_utf8(&p.parts[1].1).unwrap();
        assert!(report.is_ascii());
        assert!(report.contains("Final-Recipient: utf-8; j\\x{F6}rg@node.example"));
        assert!(report.contains("Diagnostic-Code: smtp; 550 unknown user j\\x{F6}rg"));
        assert_eq!(p.parts[2].1, "Subject: grüße\r\n".as_bytes());
        assert_eq!(utf8_addr_xtext("a+b=c\\d"), "a\\x{2B}b\\x{3D}c\\x{5C}d");
    }

    #[test]
    fn diagnostic_and_remote_mta_typing() {
        assert_eq!(typed("smtp", "550 no"), "smtp; 550 no");
        assert_eq!(typed("smtp", "X-Unix; exit 1"), "X-Unix; exit 1");
        assert_eq!(typed("smtp", "550 a;b"), "smtp; 550 a;b");
        assert_eq!(typed("dns", "mx.example"), "dns; mx.example");
        assert_eq!(status("5.1.1"), "5.1.1");
        assert_eq!(status("4.4.7"), "4.4.7");
        assert_eq!(status(" 5.7.123 "), "5.7.123");
        for bad in ["", "5", "5.1", "5.1.1.1", "6.1.1", "5.1234.1", "5.a.1", "55.1.1"] {
            assert_eq!(status(bad), "5.0.0", "{bad:?}");
        }
    }

    #[test]
    fn empty_sender_and_mta_do_not_break_the_message() {
        let failed = [rcpt("b@n", "5.1.1", "x", None)];
        let mut inp = input(&failed, b"");
        inp.original_sender = "";
        inp.reporting_mta = "";
        let p = parse(&build_bounce(&inp));
        assert_eq!(header(&p, "To"), "undisclosed-recipients:;");
        assert!(header(&p, "From").contains("MAILER-DAEMON@localhost"));
        assert!(p.parts[2].1.is_empty());
    }

    #[test]
    fn no_recipients_and_many_recipients() {
        let p = parse(&build_bounce(&input(&[], ORIGINAL)));
        assert_eq!(p.parts.len(), 3);
        let many: Vec<FailedRecipient> = (0..MAX_RECIPIENTS + 5)
            .map(|i| rcpt(&format!("u{i}@n"), "5.1.1", "smtp; 550 no", None))
            .collect();
        let p = parse(&build_bounce(&input(&many, ORIGINAL)));
        let report = std::str::from_utf8(&p.parts[1].1).unwrap();
        assert_eq!(report.matches("Final-Recipient:").count(), MAX_RECIPIENTS);
        let human = std::str::from_utf8(&p.parts[0].1).unwrap();
        assert!(human.contains("and 5 more recipients"));
    }

    #[test]
    fn boundary_avoids_content() {
        let mut zeros = || 0u64;
        let b0 = choose_boundary(&[b"nothing"], &mut zeros);
        assert_eq!(b0, "=_etrn-relay_0000000000000000_0");
        let content = b"x =_etrn-relay_0000000000000000_0 and =_etrn-relay_0000000000000000_1";
        let b = choose_boundary(&[b"a", content], &mut zeros);
        assert_eq!(b, "=_etrn-relay_0000000000000000_2");
        // A substring match counts too ("_1" is a prefix of "_10").
        let b = choose_boundary(&[b"=_etrn-relay_0000000000000000_10"], &mut zeros);
        assert_eq!(b, "=_etrn-relay_0000000000000000_0");
        let b = choose_boundary(
            &[b"=_etrn-relay_0000000000000000_0 =_etrn-relay_0000000000000000_1"],
            &mut zeros,
        );
        assert_eq!(b, "=_etrn-relay_0000000000000000_2");
    }

    #[test]
    fn boundary_absent_from_generated_parts() {
        let failed = [rcpt("b@n", "5.1.1", "x", None)];
        let msg = build_bounce(&input(&failed, ORIGINAL));
        let p = parse(&msg);
        let ct = header(&p, "Content-Type");
        let b = ct.split("boundary=\"").nth(1).unwrap().trim_end_matches('"');
        // Exactly three part delimiters plus the closing one.
        assert_eq!(memmem::find_iter(&msg, b.as_bytes()).count(), 5);
    }

    #[test]
    fn wrapping_never_exceeds_limit() {
        let mut out = Vec::new();
        push_field(&mut out, "Diagnostic-Code", &"q".repeat(10_000));
        push_wrapped(&mut out, "", "    ", &"é".repeat(3_000));
        push_wrapped(&mut out, "", "    ", "short text");
        assert_lines_ok(&out);
        let mut out = Vec::new();
        let text = "word ".repeat(100);
        push_field(&mut out, "X", text.trim());
        let s = String::from_utf8(out).unwrap();
        assert!(s.lines().all(|l| l.len() <= SOFT_LINE));
        assert_eq!(s.replace("\r\n ", " "), format!("X: {}\r\n", text.trim()));
    }

    #[test]
    fn clean_values() {
        assert_eq!(clean("  a\r\n\tb  c \u{7f}\u{85}d "), "a b c d");
        assert_eq!(clean(""), "");
        let long = clean(&"é".repeat(MAX_VALUE));
        assert!(long.len() <= MAX_VALUE + 3 && long.ends_with("..."));
        assert_eq!(strip_brackets("<a@b>"), "a@b");
        assert_eq!(strip_brackets("a@b"), "a@b");
    }

    #[test]
    fn rfc5322_dates() {
        assert_eq!(rfc5322_date(at(0)), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(at(1_700_000_000)), "Tue, 14 Nov 2023 22:13:20 +0000");
        assert_eq!(rfc5322_date(at(951_782_400)), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(rfc5322_date(at(951_868_799)), "Tue, 29 Feb 2000 23:59:59 +0000");
        assert_eq!(rfc5322_date(at(951_868_800)), "Wed, 01 Mar 2000 00:00:00 +0000");
        assert_eq!(rfc5322_date(at(4_107_456_000)), "Sun, 28 Feb 2100 00:00:00 +0000");
        assert_eq!(rfc5322_date(at(4_107_542_400)), "Mon, 01 Mar 2100 00:00:00 +0000");
        assert_eq!(rfc5322_date(at(2_147_483_647)), "Tue, 19 Jan 2038 03:14:07 +0000");
        assert_eq!(rfc5322_date(at(1_234_567_890)), "Fri, 13 Feb 2009 23:31:30 +0000");
        assert_eq!(rfc5322_date(at(253_402_300_799)), "Fri, 31 Dec 9999 23:59:59 +0000");
        // Sub-second parts are dropped.
        let t = at(1_700_000_000) + Duration::from_millis(999);
        assert_eq!(rfc5322_date(t), "Tue, 14 Nov 2023 22:13:20 +0000");
        // Before the epoch, rounding down.
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc5322_date(before), "Wed, 31 Dec 1969 23:59:59 +0000");
        let before = UNIX_EPOCH - Duration::from_millis(1);
        assert_eq!(rfc5322_date(before), "Wed, 31 Dec 1969 23:59:59 +0000");
        let before = UNIX_EPOCH - Duration::from_secs(86_400 * 365);
        assert_eq!(rfc5322_date(before), "Wed, 01 Jan 1969 00:00:00 +0000");
    }

    #[test]
    fn civil_from_days_roundtrip_consistency() {
        // Consecutive days advance by exactly one calendar day.
        let mut prev = civil_from_days(-800_000);
        for d in -799_999..800_000 {
            let cur = civil_from_days(d);
            let (y, m, day) = prev;
            let next_ok = cur == (y, m, day + 1)
                || (cur == (y, m + 1, 1) && day >= 28)
                || (cur == (y + 1, 1, 1) && m == 12 && day == 31);
            assert!(next_ok, "{prev:?} -> {cur:?}");
            prev = cur;
        }
    }
}
