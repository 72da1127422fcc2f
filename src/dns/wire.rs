//! DNS messages (pure): building queries, checking that a response answers our query, and
//! interpreting it (CNAME chains inside one response, glue, TTLs, negative TTLs).

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::mx::normalize_host;
use super::DnsError;

/// Most CNAME links followed for one lookup, within a response and across queries.
pub(crate) const MAX_CNAME_DEPTH: usize = 8;
/// Longest time a positive answer is cached, in seconds.
pub(crate) const POSITIVE_TTL_CAP: u32 = 3600;
/// Longest time a negative answer (NXDOMAIN, no data) is cached, in seconds.
pub(crate) const NEGATIVE_TTL_CAP: u32 = 60;

/// One record of the type asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Data {
    /// An MX record: preference and normalized exchange (root = empty string).
    Mx(u16, String),
    /// An A or AAAA record.
    Addr(IpAddr),
}

/// What one response says about `(name, type)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The records of the type asked for (after in-response CNAMEs), and for MX the
    /// addresses of the exchanges found in the additional section.
    Records {
        /// The records.
        data: Vec<Data>,
        /// `(normalized host, address)` from the additional section, MX only.
        glue: Vec<(String, IpAddr)>,
    },
    /// The name is an alias whose target's records were not in the response: ask again
    /// for this (normalized) name.
    Alias(String),
    /// The name exists but has no record of that type.
    NoData,
    /// The name does not exist.
    NxDomain,
}

/// An [`Outcome`] and how long it may be cached, in seconds (0: not at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Interpreted {
    /// What the response says.
    pub(crate) outcome: Outcome,
    /// Seconds it may be cached.
    pub(crate) ttl: u32,
}

/// The normalized form of a wire name: ASCII (punycode) lowercase, no trailing dot.
pub(crate) fn name_key(name: &Name) -> String {
    if name.is_root() {
        return String::new();
    }
    normalize_host(&name.to_ascii())
}

/// Normalizes a domain given by the caller (UTF-8 allowed: converted to punycode).
pub(crate) fn domain_key(domain: &str) -> Result<String, String> {
    let trimmed = domain.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("empty domain".to_owned());
    }
    // ASCII names are taken as they are (IDNA rules would reject e.g. underscores).
    let name = if trimmed.is_ascii() {
        Name::from_ascii(trimmed)
    } else {
        Name::from_utf8(trimmed)
    }
    .map_err(|e| format!("invalid domain {domain:?}: {e}"))?;
    let key = name_key(&name);
    if key.is_empty() {
        return Err("empty domain".to_owned());
    }
    Ok(key)
}

/// The fully qualified wire name for a normalized key.
pub(crate) fn key_name(key: &str) -> Result<Name, DnsError> {
    Name::from_ascii(format!("{key}.")).map_err(|e| DnsError::NoSuchDomain(format!("{key}: invalid name: {e}")))
}

/// Encodes a recursive query for `(name, rtype)` with message id `id`.
pub(crate) fn build_query(id: u16, name: &Name, rtype: RecordType) -> Result<Vec<u8>, DnsError> {
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    let mut q = Query::query(name.clone(), rtype);
    q.set_query_class(DNSClass::IN);
    msg.add_query(q);
    msg.to_vec()
        .map_err(|e| DnsError::NoSuchDomain(format!("{name}: cannot encode query: {e}")))
}

/// Decodes `bytes` and checks that it is the response to our query: a response, same id,
/// opcode QUERY, and the same single question. An error response (neither NOERROR nor
/// NXDOMAIN) may come without a question section. `Err` carries why it does not match.
pub(crate) fn parse_response(bytes: &[u8], id: u16, name: &Name, rtype: RecordType) -> Result<Message, String> {
    let msg = Message::from_vec(bytes).map_err(|e| format!("malformed response: {e}"))?;
    if msg.message_type() != MessageType::Response {
        return Err("not a response".to_owned());
    }
    if msg.id() != id {
        return Err(format!("id {} != {}", msg.id(), id));
    }
    if msg.op_code() != OpCode::Query {
        return Err("wrong opcode".to_owned());
    }
    match msg.queries() {
        [q] if q.query_type() == rtype && q.query_class() == DNSClass::IN && name_key(q.name()) == name_key(name) => {
            Ok(msg)
        }
        [] if !matches!(msg.response_code(), ResponseCode::NoError | ResponseCode::NXDomain) => Ok(msg),
        _ => Err("question does not match".to_owned()),
    }
}

/// Negative-caching TTL (RFC 2308): the SOA in the authority section bounds it by the
/// smaller of its own TTL and its MINIMUM field; without a SOA, not cached.
fn negative_ttl(msg: &Message) -> u32 {
    msg.name_servers()
        .iter()
        .find_map(|r| match r.data() {
            Some(RData::SOA(soa)) => Some(r.ttl().min(soa.minimum())),
            _ => None,
        })
        .unwrap_or(0)
        .min(NEGATIVE_TTL_CAP)
}

/// Reads what a validated response says about `(qname, qtype)` (`qname` normalized).
///
/// SERVFAIL, REFUSED and every other error code are [`DnsError::Temporary`]. CNAMEs in the
/// answer section are followed (at most [`MAX_CNAME_DEPTH`]); a chain that ends without
/// data in a NOERROR response gives [`Outcome::Alias`] so the caller asks for the target.
pub(crate) fn interpret(msg: &Message, qname: &str, qtype: RecordType) -> Result<Interpreted, DnsError> {
    match msg.response_code() {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => {
            return Ok(Interpreted {
                outcome: Outcome::NxDomain,
                ttl: negative_ttl(msg),
            })
        }
        rc => return Err(DnsError::Temporary(format!("{qname} {qtype}: server answered {rc}"))),
    }
    let answers = msg.answers();
    let mut current = qname.to_owned();
    let mut ttl = POSITIVE_TTL_CAP;
    let mut data: Vec<Data> = Vec::new();
    for _ in 0..=MAX_CNAME_DEPTH {
        let owned = |r: &&Record| name_key(r.name()) == current;
        for r in answers.iter().filter(owned) {
            let d = match (qtype, r.data()) {
                (RecordType::MX, Some(RData::MX(mx))) => Data::Mx(mx.preference(), name_key(mx.exchange())),
                (RecordType::A, Some(RData::A(a))) => Data::Addr(IpAddr::V4(a.0)),
                (RecordType::AAAA, Some(RData::AAAA(a))) => Data::Addr(IpAddr::V6(a.0)),
                _ => continue,
            };
            ttl = ttl.min(r.ttl());
            if !data.contains(&d) {
                data.push(d);
            }
        }
        if !data.is_empty() {
            break;
        }
        let cname = answers.iter().filter(owned).find_map(|r| match r.data() {
            Some(RData::CNAME(c)) => Some((r.ttl(), name_key(&c.0))),
            _ => None,
        });
        match cname {
            Some((cttl, target)) => {
                ttl = ttl.min(cttl);
                current = target;
            }
            None => break,
        }
    }
    if data.is_empty() {
        if current != qname {
            return Ok(Interpreted {
                outcome: Outcome::Alias(current),
                ttl,
            });
        }
        return Ok(Interpreted {
            outcome: Outcome::NoData,
            ttl: negative_ttl(msg),
        });
    }
    let mut glue = Vec::new();
    if qtype == RecordType::MX {
        for r in msg.additionals() {
            let addr = match r.data() {
                Some(RData::A(a)) => IpAddr::V4(a.0),
                Some(RData::AAAA(a)) => IpAddr::V6(a.0),
                _ => continue,
            };
            let host = name_key(r.name());
            let wanted = data.iter().any(|d| matches!(d, Data::Mx(_, h) if *h == host));
            if wanted && !glue.contains(&(host.clone(), addr)) {
                ttl = ttl.min(r.ttl());
                glue.push((host, addr));
            }
        }
    }
    Ok(Interpreted {
        outcome: Outcome::Records { data, glue },
        ttl,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA};

    pub(crate) fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    /// A response to `(qname, qtype)` with id `id`.
    pub(crate) fn response(id: u16, qname: &str, qtype: RecordType, rc: ResponseCode) -> Message {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_response_code(rc);
        m.add_query(Query::query(n(qname), qtype));
        m
    }

    pub(crate) fn mx(owner: &str, ttl: u32, pref: u16, exch: &str) -> Record {
        Record::from_rdata(n(owner), ttl, RData::MX(MX::new(pref, n(exch))))
    }

    pub(crate) fn a(owner: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(n(owner), ttl, RData::A(A(ip.parse().unwrap())))
    }

    fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(n(owner), ttl, RData::AAAA(AAAA(ip.parse().unwrap())))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(n(owner), ttl, RData::CNAME(CNAME(n(target))))
    }

    fn soa(owner: &str, ttl: u32, minimum: u32) -> Record {
        let s = SOA::new(n("ns.x."), n("h.x."), 1, 2, 3, 4, minimum);
        Record::from_rdata(n(owner), ttl, RData::SOA(s))
    }

    #[test]
    fn query_round_trip_and_validation() {
        let name = n("Example.ORG.");
        let q = build_query(0x1234, &name, RecordType::MX).unwrap();
        let parsed = Message::from_vec(&q).unwrap();
        assert_eq!(parsed.id(), 0x1234);
        assert!(parsed.recursion_desired());
        assert_eq!(parsed.queries().len(), 1);

        let r = response(0x1234, "example.org.", RecordType::MX, ResponseCode::NoError);
        let bytes = r.to_vec().unwrap();
        assert!(parse_response(&bytes, 0x1234, &name, RecordType::MX).is_ok());
        assert!(parse_response(&bytes, 0x1235, &name, RecordType::MX).is_err());
        assert!(parse_response(&bytes, 0x1234, &name, RecordType::A).is_err());
        assert!(parse_response(&bytes, 0x1234, &n("other.org."), RecordType::MX).is_err());
        assert!(parse_response(&q, 0x1234, &name, RecordType::MX).is_err(), "a query");
        assert!(parse_response(&[1, 2, 3], 0x1234, &name, RecordType::MX).is_err());
        assert!(parse_response(&[], 0x1234, &name, RecordType::MX).is_err());

        // SERVFAIL without a question section is accepted; NOERROR without one is not.
        let mut sf = Message::new();
        sf.set_id(9)
            .set_message_type(MessageType::Response)
            .set_response_code(ResponseCode::ServFail);
        let bytes = sf.to_vec().unwrap();
        assert!(parse_response(&bytes, 9, &name, RecordType::MX).is_ok());
        sf.set_response_code(ResponseCode::NoError);
        let bytes = sf.to_vec().unwrap();
        assert!(parse_response(&bytes, 9, &name, RecordType::MX).is_err());
    }

    #[test]
    fn interprets_mx_with_glue() {
        let mut r = response(1, "d.example.", RecordType::MX, ResponseCode::NoError);
        r.add_answer(mx("d.example.", 300, 10, "MX1.d.example."));
        r.add_answer(mx("d.example.", 200, 20, "mx2.d.example."));
        r.add_additional(a("mx1.d.example.", 100, "192.0.2.1"));
        r.add_additional(aaaa("mx1.d.example.", 100, "2001:db8::1"));
        r.add_additional(a("unrelated.example.", 5, "192.0.2.9"));
        let got = interpret(&r, "d.example", RecordType::MX).unwrap();
        assert_eq!(got.ttl, 100);
        assert_eq!(
            got.outcome,
            Outcome::Records {
                data: vec![
                    Data::Mx(10, "mx1.d.example".into()),
                    Data::Mx(20, "mx2.d.example".into())
                ],
                glue: vec![
                    ("mx1.d.example".into(), "192.0.2.1".parse().unwrap()),
                    ("mx1.d.example".into(), "2001:db8::1".parse().unwrap()),
                ],
            }
        );
    }

    #[test]
    fn interprets_null_mx() {
        let mut r = response(1, "n.example.", RecordType::MX, ResponseCode::NoError);
        r.add_answer(mx("n.example.", 300, 0, "."));
        let got = interpret(&r, "n.example", RecordType::MX).unwrap();
        assert_eq!(
            got.outcome,
            Outcome::Records {
                data: vec![Data::Mx(0, String::new())],
                glue: vec![]
            }
        );
    }

    #[test]
    fn ttl_is_capped() {
        let mut r = response(1, "h.example.", RecordType::A, ResponseCode::NoError);
        r.add_answer(a("h.example.", 86400 * 7, "192.0.2.1"));
        let got = interpret(&r, "h.example", RecordType::A).unwrap();
        assert_eq!(got.ttl, POSITIVE_TTL_CAP);
    }

    #[test]
    fn follows_cname_chain_in_response() {
        let mut r = response(1, "alias.example.", RecordType::A, ResponseCode::NoError);
        r.add_answer(cname("alias.example.", 50, "mid.example."));
        r.add_answer(cname("mid.example.", 500, "real.example."));
        r.add_answer(a("real.example.", 600, "192.0.2.7"));
        r.add_answer(a("elsewhere.example.", 600, "192.0.2.8"));
        let got = interpret(&r, "alias.example", RecordType::A).unwrap();
        assert_eq!(got.ttl, 50);
        assert_eq!(
            got.outcome,
            Outcome::Records {
                data: vec![Data::Addr("192.0.2.7".parse().unwrap())],
                glue: vec![]
            }
        );
    }

    #[test]
    fn cname_without_data_is_alias() {
        let mut r = response(1, "alias.example.", RecordType::MX, ResponseCode::NoError);
        r.add_answer(cname("alias.example.", 30, "Real.Example."));
        let got = interpret(&r, "alias.example", RecordType::MX).unwrap();
        assert_eq!(got.outcome, Outcome::Alias("real.example".into()));
        assert_eq!(got.ttl, 30);
    }

    #[test]
    fn cname_loop_is_bounded() {
        let mut r = response(1, "a.example.", RecordType::A, ResponseCode::NoError);
        r.add_answer(cname("a.example.", 30, "b.example."));
        r.add_answer(cname("b.example.", 30, "a.example."));
        let got = interpret(&r, "a.example", RecordType::A).unwrap();
        assert!(matches!(got.outcome, Outcome::Alias(_)));
    }

    #[test]
    fn negative_answers() {
        let mut r = response(1, "x.example.", RecordType::MX, ResponseCode::NXDomain);
        let got = interpret(&r, "x.example", RecordType::MX).unwrap();
        assert_eq!(
            got,
            Interpreted {
                outcome: Outcome::NxDomain,
                ttl: 0
            }
        );
        r.add_name_server(soa("example.", 3600, 30));
        let got = interpret(&r, "x.example", RecordType::MX).unwrap();
        assert_eq!(
            got,
            Interpreted {
                outcome: Outcome::NxDomain,
                ttl: 30
            }
        );

        let mut r = response(1, "x.example.", RecordType::MX, ResponseCode::NoError);
        r.add_name_server(soa("example.", 3600, 7200));
        let got = interpret(&r, "x.example", RecordType::MX).unwrap();
        assert_eq!(
            got,
            Interpreted {
                outcome: Outcome::NoData,
                ttl: NEGATIVE_TTL_CAP
            }
        );

        // Records of another type for the name: still no data.
        let mut r = response(1, "x.example.", RecordType::MX, ResponseCode::NoError);
        r.add_answer(a("x.example.", 60, "192.0.2.1"));
        let got = interpret(&r, "x.example", RecordType::MX).unwrap();
        assert_eq!(got.outcome, Outcome::NoData);
    }

    #[test]
    fn error_codes_are_temporary() {
        for rc in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
            ResponseCode::NotImp,
        ] {
            let r = response(1, "x.example.", RecordType::MX, rc);
            let err = interpret(&r, "x.example", RecordType::MX).unwrap_err();
            assert!(matches!(err, DnsError::Temporary(_)), "{rc}");
            assert!(!err.is_permanent());
        }
    }

    #[test]
    fn domain_keys() {
        assert_eq!(domain_key("Example.ORG.").unwrap(), "example.org");
        assert_eq!(domain_key("bücher.example").unwrap(), "xn--bcher-kva.example");
        assert_eq!(domain_key("A_b.example").unwrap(), "a_b.example");
        assert!(domain_key("[192.0.2.1]").is_err());
        assert!(domain_key("a b.example").is_err());
        assert!(domain_key("").is_err());
        assert!(domain_key(".").is_err());
        assert!(domain_key(&"a".repeat(300)).is_err());
        assert_eq!(name_key(&n(".")), "");
        assert_eq!(key_name("a.b").unwrap(), n("a.b."));
    }
}
