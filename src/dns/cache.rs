//! The per-shard answer cache (pure: the caller passes the current time).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use super::wire::Outcome;

/// Entries kept before expired ones are swept and, if still full, the cache is emptied.
pub(crate) const DEFAULT_CAPACITY: usize = 10_000;

/// Answers by `(normalized name, record type)`, each until its TTL runs out. Only
/// [`Outcome`]s are stored: temporary failures never are.
#[derive(Debug)]
pub(crate) struct Cache {
    map: HashMap<(String, RecordType), (Instant, Outcome)>,
    capacity: usize,
}

impl Cache {
    /// An empty cache holding at most `capacity` entries.
    pub(crate) fn new(capacity: usize) -> Cache {
        Cache {
            map: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The unexpired answer for `(name, rtype)` at time `now`.
    pub(crate) fn get(&self, name: &str, rtype: RecordType, now: Instant) -> Option<Outcome> {
        // Looking up by `(String, RecordType)` needs an owned key; names are short.
        let (expires, outcome) = self.map.get(&(name.to_owned(), rtype))?;
        (now < *expires).then(|| outcome.clone())
    }

    /// Stores `outcome` for `ttl` seconds from `now`; a TTL of 0 stores nothing.
    pub(crate) fn insert(&mut self, name: &str, rtype: RecordType, outcome: Outcome, ttl: u32, now: Instant) {
        if ttl == 0 {
            return;
        }
        if self.map.len() >= self.capacity {
            self.map.retain(|_, (expires, _)| now < *expires);
            if self.map.len() >= self.capacity {
                self.map.clear();
            }
        }
        let expires = now + Duration::from_secs(u64::from(ttl));
        self.map.insert((name.to_owned(), rtype), (expires, outcome));
    }

    /// Number of entries, expired ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honours_ttl() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        c.insert("a.example", RecordType::MX, Outcome::NoData, 30, t0);
        assert_eq!(
            c.get("a.example", RecordType::MX, t0 + Duration::from_secs(29)),
            Some(Outcome::NoData)
        );
        assert_eq!(c.get("a.example", RecordType::MX, t0 + Duration::from_secs(30)), None);
        assert_eq!(c.get("a.example", RecordType::A, t0), None);
        assert_eq!(c.get("b.example", RecordType::MX, t0), None);
    }

    #[test]
    fn zero_ttl_not_stored() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        c.insert("a", RecordType::A, Outcome::NxDomain, 0, t0);
        assert_eq!(c.len(), 0);
        assert_eq!(c.get("a", RecordType::A, t0), None);
    }

    #[test]
    fn bounded() {
        let mut c = Cache::new(3);
        let t0 = Instant::now();
        c.insert("old", RecordType::A, Outcome::NoData, 1, t0);
        c.insert("b", RecordType::A, Outcome::NoData, 100, t0);
        c.insert("c", RecordType::A, Outcome::NoData, 100, t0);
        let t1 = t0 + Duration::from_secs(2);
        c.insert("d", RecordType::A, Outcome::NoData, 100, t1);
        assert_eq!(c.len(), 3, "the expired entry was swept");
        assert!(c.get("b", RecordType::A, t1).is_some());
        c.insert("e", RecordType::A, Outcome::NoData, 100, t1);
        assert!(c.len() <= 3);
        assert!(c.get("e", RecordType::A, t1).is_some());
    }
}
