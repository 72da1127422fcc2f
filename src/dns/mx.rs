//! MX ordering and pruning (pure): null MX, own-hostname pruning, preference order with
//! equal preferences shuffled.

use super::DnsError;

/// A host name in the form the resolver compares: ASCII lowercase, no trailing dot.
pub(crate) fn normalize_host(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Orders the MX records of `domain` for delivery.
///
/// `records` holds `(preference, exchange)` with exchanges normalized
/// ([`normalize_host`]); the root name is the empty string. `own` holds the names this
/// relay answers to (any form; normalized here).
///
/// - A single MX whose exchange is the root is a null MX (RFC 7505): [`DnsError::NullMx`].
///   A root exchange among other MX records violates RFC 7505; it is dropped as unusable.
/// - A host listed twice is kept once, with its best preference.
/// - If any exchange is one of `own`, that host and every MX with a preference greater
///   than or equal to its preference are dropped (RFC 5321 5.1), so that we never relay
///   to ourselves. If that leaves nothing, the result is [`DnsError::NoTargets`].
/// - The rest is sorted by preference, and hosts of equal preference are shuffled.
pub(crate) fn order_mx(
    domain: &str,
    records: &[(u16, String)],
    own: &[String],
    rng: &mut fastrand::Rng,
) -> Result<Vec<(u16, String)>, DnsError> {
    if let [(_, exchange)] = records {
        if exchange.is_empty() {
            return Err(DnsError::NullMx(domain.to_owned()));
        }
    }
    let mut hosts: Vec<(u16, String)> = Vec::with_capacity(records.len());
    for (pref, host) in records {
        if host.is_empty() {
            continue;
        }
        match hosts.iter_mut().find(|(_, h)| h == host) {
            Some(existing) => existing.0 = existing.0.min(*pref),
            None => hosts.push((*pref, host.clone())),
        }
    }
    if hosts.is_empty() {
        return Err(DnsError::NoTargets(format!("{domain}: no usable MX host")));
    }
    let own_best = hosts
        .iter()
        .filter(|(_, h)| own.iter().any(|o| normalize_host(o) == *h))
        .map(|(p, _)| *p)
        .min();
    if let Some(limit) = own_best {
        hosts.retain(|(p, _)| *p < limit);
        if hosts.is_empty() {
            return Err(DnsError::NoTargets(format!(
                "{domain}: this host is the best MX (preference {limit}); mail would loop"
            )));
        }
    }
    rng.shuffle(&mut hosts);
    hosts.sort_by_key(|(p, _)| *p); // stable: equal preferences stay shuffled
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(list: &[(u16, &str)]) -> Vec<(u16, String)> {
        list.iter().map(|(p, h)| (*p, h.to_string())).collect()
    }

    #[test]
    fn sorts_by_preference() {
        let mut rng = fastrand::Rng::with_seed(1);
        let got = order_mx("d", &recs(&[(30, "c"), (10, "a"), (20, "b")]), &[], &mut rng).unwrap();
        assert_eq!(got, recs(&[(10, "a"), (20, "b"), (30, "c")]));
    }

    #[test]
    fn shuffles_equal_preferences() {
        let input = recs(&[(20, "x"), (10, "b1"), (10, "b2"), (10, "b3"), (30, "z")]);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let got = order_mx("d", &input, &[], &mut rng).unwrap();
            let prefs: Vec<u16> = got.iter().map(|(p, _)| *p).collect();
            assert_eq!(prefs, vec![10, 10, 10, 20, 30]);
            assert_eq!(got[3].1, "x");
            assert_eq!(got[4].1, "z");
            firsts.insert(got[0].1.clone());
        }
        assert_eq!(firsts.len(), 3, "every equal-preference host comes first sometimes");
    }

    #[test]
    fn null_mx() {
        let mut rng = fastrand::Rng::with_seed(1);
        let err = order_mx("n.example", &recs(&[(0, "")]), &[], &mut rng).unwrap_err();
        assert!(matches!(err, DnsError::NullMx(ref d) if d == "n.example"));
        assert!(err.is_permanent());
        // A root exchange among real hosts is not a null MX; it is dropped.
        let got = order_mx("d", &recs(&[(0, ""), (10, "a")]), &[], &mut rng).unwrap();
        assert_eq!(got, recs(&[(10, "a")]));
    }

    #[test]
    fn prunes_own_host_and_worse() {
        let mut rng = fastrand::Rng::with_seed(1);
        let input = recs(&[(10, "a"), (20, "me.example"), (20, "b"), (30, "c"), (5, "z")]);
        let own = vec!["ME.Example.".to_string()];
        let got = order_mx("d", &input, &own, &mut rng).unwrap();
        assert_eq!(got, recs(&[(5, "z"), (10, "a")]));
    }

    #[test]
    fn own_host_best_gives_no_targets() {
        let mut rng = fastrand::Rng::with_seed(1);
        let input = recs(&[(10, "me"), (20, "b")]);
        let err = order_mx("d", &input, &["me".into()], &mut rng).unwrap_err();
        assert!(matches!(err, DnsError::NoTargets(_)));
        assert!(err.is_permanent());
    }

    #[test]
    fn duplicates_keep_best_preference() {
        let mut rng = fastrand::Rng::with_seed(1);
        let got = order_mx("d", &recs(&[(20, "a"), (10, "a"), (15, "b")]), &[], &mut rng).unwrap();
        assert_eq!(got, recs(&[(10, "a"), (15, "b")]));
    }

    #[test]
    fn normalizes() {
        assert_eq!(normalize_host("MX.Example.ORG."), "mx.example.org");
        assert_eq!(normalize_host("."), "");
    }
}
