//! Fixed-capacity dedup ring: remembers the seq first assigned to each recent key, so a
//! resent message (the server keys it by channel, sender and client id) gets its original
//! seq back instead of a new one. When full, the entry inserted longest ago is forgotten
//! (FIFO by first insertion; lookups do not refresh an entry's age).
//!
//! Memory: each entry holds its key once, shared between the map and the insertion-order
//! queue through an `Arc<[u8]>`, so live memory is at most `capacity` keys of at most
//! `max_key_len` bytes plus a constant per entry. Nothing proportional to `capacity` is
//! allocated up front: the map and queue grow as entries arrive (amortised O(1), as for any
//! `HashMap`), so a ring sized generously for a busy server costs little while it is quiet.
//! Once full they stop growing: every insert evicts exactly one entry.
//!
//! Hashing is std's SipHash with a random per-process key: client ids come from the
//! network, and a keyed hash keeps a client from choosing colliding keys.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;

use crate::error::Error;

/// A map from byte keys to the u64 seq first assigned to them, holding at most `capacity`
/// entries and evicting the oldest insertion when a new key arrives while full.
#[derive(Debug)]
pub struct DedupRing {
    seqs: HashMap<Arc<[u8]>, u64>,
    /// Keys in insertion order, oldest at the front; always the same set as `seqs`' keys.
    order: VecDeque<Arc<[u8]>>,
    capacity: NonZeroUsize,
    max_key_len: usize,
}

impl DedupRing {
    /// Key length limit when the caller names none: an encoded (channel, sender, client id)
    /// triple is far shorter, and 256 bytes keeps a full ring's keys within capacity × 256.
    pub const DEFAULT_MAX_KEY_LEN: usize = 256;

    /// An empty ring holding at most `capacity` keys of at most `max_key_len` bytes each.
    pub fn new(capacity: NonZeroUsize, max_key_len: usize) -> Self {
        Self {
            seqs: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            max_key_len,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity.get()
    }

    pub fn max_key_len(&self) -> usize {
        self.max_key_len
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The seq first assigned to `key`, if it is still held. Does not change the key's age.
    /// A key longer than `max_key_len` can never have been inserted, so it is simply absent.
    pub fn get(&self, key: &[u8]) -> Option<u64> {
        if key.len() > self.max_key_len {
            return None;
        }
        self.seqs.get(key).copied()
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// Records `seq` for `key` unless the key is already held, in which case nothing changes
    /// and the seq it was first given is returned (the first assignment wins). A new key
    /// evicts the oldest entry if the ring is full, and `None` is returned.
    ///
    /// Fails with [`Error::KeyTooLong`] if `key` is longer than `max_key_len`; the ring is
    /// then unchanged.
    pub fn insert(&mut self, key: &[u8], seq: u64) -> Result<Option<u64>, Error> {
        if key.len() > self.max_key_len {
            return Err(Error::KeyTooLong {
                len: key.len(),
                max: self.max_key_len,
            });
        }
        // Look up before allocating: a duplicate (the case this ring exists for) costs one
        // hash and no allocation; a new key costs a second hash to insert.
        if let Some(&first) = self.seqs.get(key) {
            return Ok(Some(first));
        }
        if self.order.len() == self.capacity.get() {
            if let Some(oldest) = self.order.pop_front() {
                self.seqs.remove(&oldest);
            }
        }
        let key: Arc<[u8]> = Arc::from(key);
        self.seqs.insert(Arc::clone(&key), seq);
        self.order.push_back(key);
        Ok(None)
    }

    /// Forgets `key` if it is the oldest entry held, and says whether it was. For a caller
    /// that drops entries from a copy kept in the same insertion order (a journal pruned
    /// oldest first, by age): the ring then forgets them too. Any other key is left alone.
    pub fn forget_oldest(&mut self, key: &[u8]) -> bool {
        if self.order.front().map(|oldest| &**oldest) != Some(key) {
            return false;
        }
        if let Some(oldest) = self.order.pop_front() {
            self.seqs.remove(&oldest);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(capacity: usize) -> DedupRing {
        DedupRing::new(
            NonZeroUsize::new(capacity).unwrap(),
            DedupRing::DEFAULT_MAX_KEY_LEN,
        )
    }

    /// Asserts the ring holds exactly `keys` (each mapped to its index) and nothing else
    /// from `0..=9` as decimal keys.
    fn assert_holds(r: &DedupRing, keys: &[u64]) {
        assert_eq!(r.len(), keys.len());
        for k in 0..10u64 {
            let expected = keys.contains(&k).then_some(k);
            assert_eq!(r.get(k.to_string().as_bytes()), expected, "key {k}");
        }
        assert_eq!(r.seqs.len(), r.order.len());
    }

    #[test]
    fn new_ring_is_empty() {
        let r = ring(3);
        assert!(r.is_empty());
        assert_eq!(r.capacity(), 3);
        assert_eq!(r.max_key_len(), DedupRing::DEFAULT_MAX_KEY_LEN);
        assert_eq!(r.get(b"a"), None);
        assert!(!r.contains(b"a"));
    }

    #[test]
    fn fills_to_capacity_then_evicts_oldest_first() {
        let mut r = ring(3);
        for k in 0..3u64 {
            assert_eq!(r.insert(k.to_string().as_bytes(), k).unwrap(), None);
        }
        assert_holds(&r, &[0, 1, 2]);
        assert_eq!(r.insert(b"3", 3).unwrap(), None);
        assert_holds(&r, &[1, 2, 3]);
        assert_eq!(r.insert(b"4", 4).unwrap(), None);
        assert_holds(&r, &[2, 3, 4]);
    }

    #[test]
    fn duplicate_insert_keeps_first_seq_and_age() {
        let mut r = ring(2);
        assert_eq!(r.insert(b"0", 0).unwrap(), None);
        assert_eq!(r.insert(b"1", 1).unwrap(), None);
        // Re-inserting and reading "0" neither changes its seq nor makes it younger
        // (FIFO, not LRU), so the next new key still evicts it.
        assert_eq!(r.insert(b"0", 99).unwrap(), Some(0));
        assert_eq!(r.get(b"0"), Some(0));
        assert_holds(&r, &[0, 1]);
        assert_eq!(r.insert(b"2", 2).unwrap(), None);
        assert_holds(&r, &[1, 2]);
    }

    #[test]
    fn evicted_key_can_be_inserted_again_with_a_new_seq() {
        let mut r = ring(1);
        assert_eq!(r.insert(b"a", 1).unwrap(), None);
        assert_eq!(r.insert(b"b", 2).unwrap(), None);
        assert_eq!(r.get(b"a"), None);
        assert_eq!(r.insert(b"a", 3).unwrap(), None);
        assert_eq!(r.get(b"a"), Some(3));
        assert_eq!(r.get(b"b"), None);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn capacity_one_always_holds_latest_new_key() {
        let mut r = ring(1);
        for k in 0..10u64 {
            r.insert(k.to_string().as_bytes(), k).unwrap();
            assert_holds(&r, &[k]);
        }
    }

    #[test]
    fn seq_keeps_full_u64_range() {
        let mut r = ring(2);
        r.insert(b"max", u64::MAX).unwrap();
        r.insert(b"zero", 0).unwrap();
        assert_eq!(r.get(b"max"), Some(u64::MAX));
        assert_eq!(r.get(b"zero"), Some(0));
    }

    #[test]
    fn key_length_limit_is_inclusive() {
        let mut r = DedupRing::new(NonZeroUsize::new(4).unwrap(), 8);
        assert_eq!(r.insert(&[7; 8], 1).unwrap(), None);
        assert_eq!(r.get(&[7; 8]), Some(1));
        assert_eq!(r.insert(b"", 2).unwrap(), None);
        assert_eq!(r.get(b""), Some(2));

        let err = r.insert(&[7; 9], 3).unwrap_err();
        assert!(
            matches!(err, Error::KeyTooLong { len: 9, max: 8 }),
            "{err:?}"
        );
        assert_eq!(r.len(), 2, "a rejected key must not change the ring");
        assert_eq!(r.get(&[7; 9]), None);
    }

    #[test]
    fn rejected_key_does_not_evict_when_full() {
        let mut r = DedupRing::new(NonZeroUsize::new(1).unwrap(), 4);
        r.insert(b"keep", 1).unwrap();
        assert!(r.insert(b"toolong", 2).is_err());
        assert_eq!(r.get(b"keep"), Some(1));
    }

    #[test]
    fn forget_oldest_drops_only_the_oldest_entry() {
        let key = |k: u64| k.to_string().into_bytes();
        let mut r = ring(3);
        for k in 1..=3u64 {
            assert_eq!(r.insert(&key(k), k).unwrap(), None);
        }
        assert!(!r.forget_oldest(&key(2))); // held, but not the oldest
        assert!(!r.forget_oldest(&key(9))); // not held
        assert_holds(&r, &[1, 2, 3]);
        assert!(r.forget_oldest(&key(1)));
        assert!(!r.forget_oldest(&key(1))); // gone already
        assert_holds(&r, &[2, 3]);
        // The freed room is used: a new key evicts nothing while below capacity.
        assert_eq!(r.insert(&key(4), 4).unwrap(), None);
        assert_holds(&r, &[2, 3, 4]);
        assert!(r.forget_oldest(&key(2)) && r.forget_oldest(&key(3)));
        assert!(r.forget_oldest(&key(4)));
        assert!(r.is_empty() && !r.forget_oldest(&key(4)));
        assert_holds(&r, &[]);
    }

    #[test]
    fn does_not_grow_past_capacity() {
        let mut r = ring(64);
        for k in 0..10_000u64 {
            r.insert(&k.to_le_bytes(), k).unwrap();
            assert!(r.len() <= 64);
        }
        assert_eq!(r.len(), 64);
        assert_eq!(r.seqs.len(), 64);
        // The oldest survivor is the 64th-most-recent insert.
        assert_eq!(
            r.order.front().map(|k| &k[..]),
            Some(&9_936u64.to_le_bytes()[..])
        );
    }
}
