//! A state store's changelog: every checkpoint's entries, then a marker, appended to a log
//! that outlives the store's disk (a compacted Kafka topic partition, written by the service),
//! so that a store can be rebuilt from the log alone and a store that lost its last
//! checkpoints can catch up from the log's tail. The local store becomes a cache of the log.
//!
//! The log's records are keyed by the store's keys, each prefixed by its column family's tag
//! ([`ROWS_TAG`], [`CHUNKS_TAG`], [`META_TAG`]); a value of `None` (a tombstone) deletes the
//! key. A checkpoint's entries are followed by a [`Marker`] under [`MARKER_KEY`]: entries
//! after the last marker belong to a checkpoint that was never finished, and are not applied.
//!
//! Rebuilding ([`Restore`]) applies each checkpoint's entries in one write, with the log
//! position after its marker ([`Logged`]), and leaves out window values that expired before
//! the marker's bound. Entries of an unfinished checkpoint at the log's end are returned, so
//! the caller can write their keys' restored values after them and seal the log again.
//! In a compacted log every entry before the last marker is then either part of a finished
//! checkpoint or superseded by a later one.

use serde::{Deserialize, Serialize};

use crate::codec::expires_at;
use crate::store::{StateError, StateStore};

/// Tag of a `rows` key in the log.
pub const ROWS_TAG: u8 = b'r';
/// Tag of a `chunks` key in the log.
pub const CHUNKS_TAG: u8 = b'c';
/// Tag of a `meta` key in the log.
pub const META_TAG: u8 = b'm';
/// The key of checkpoint markers (one key: a compacted log keeps the last).
pub const MARKER_KEY: &[u8] = b"#checkpoint";
/// The metadata entry recording where the local store stands in its log (never logged).
pub const LOGGED_META: &str = "changelog";

/// Ends one checkpoint's entries in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The checkpoint's number in this log (counting from 1).
    pub checkpoint: u64,
    /// Entries the checkpoint wrote before this marker.
    pub entries: u64,
    /// Window values expiring before this event time (µs) are of no use any more.
    pub expired_before: i64,
}

/// Where a local store stands in its log: it holds every checkpoint before `next_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    /// The log (a Kafka topic).
    pub topic: String,
    /// The log's partition.
    pub partition: i32,
    /// The log position after the last marker the store holds.
    pub next_offset: i64,
    /// That marker's checkpoint number.
    pub checkpoint: u64,
}

/// Where a checkpoint's entries go besides the local store.
pub trait ChangelogWriter {
    /// Appends one entry: a tagged key, and its value (`None`: deleted).
    fn entry(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String>;

    /// Appends `marker` after the entries and waits until the log holds all of them; returns
    /// where the log stands after the marker.
    fn commit(&mut self, marker: &Marker) -> Result<Logged, String>;
}

/// Whether a log record's key is a checkpoint marker.
pub fn is_marker(key: &[u8]) -> bool {
    key == MARKER_KEY
}

/// Rebuilds a store from its log, record by record in log order ([`StateStore::restore`]).
pub struct Restore<'a> {
    store: &'a StateStore,
    /// Entries since the last marker.
    pending: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Entries written to the store.
    pub applied: u64,
    /// Expired window values left out.
    pub skipped: u64,
    /// The last marker applied.
    pub last: Option<Marker>,
}

impl<'a> Restore<'a> {
    pub(crate) fn new(store: &'a StateStore) -> Self {
        Self {
            store,
            pending: Vec::new(),
            applied: 0,
            skipped: 0,
            last: None,
        }
    }

    /// One entry of the log (not a marker): held until its checkpoint's marker comes.
    pub fn entry(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), StateError> {
        if key
            .first()
            .is_none_or(|t| ![ROWS_TAG, CHUNKS_TAG, META_TAG].contains(t))
        {
            return Err(self.store.corrupt(
                "changelog entry",
                format!("unknown key {:?}", String::from_utf8_lossy(key)),
            ));
        }
        self.pending.push((key.to_vec(), value.map(<[u8]>::to_vec)));
        Ok(())
    }

    /// A marker, the log position after it being `logged`: writes the entries since the last
    /// marker in one write, with `logged`, leaving out window values already expired.
    pub fn marker(&mut self, marker: Marker, logged: &Logged) -> Result<(), StateError> {
        let bytes: usize = self
            .pending
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 16)
            .sum();
        let mut commit = self.store.commit(bytes + 256);
        for (key, value) in self.pending.drain(..) {
            let (tag, key) = (key[0], &key[1..]);
            let value = value.as_deref();
            if tag != META_TAG && value.is_some_and(|v| expires_at(v) < marker.expired_before) {
                // Expired: not needed, and a delete in case an earlier checkpoint put it.
                self.skipped += 1;
                commit.tagged(tag, key, None);
                continue;
            }
            self.applied += 1;
            commit.tagged(tag, key, value);
        }
        let logged = serde_json::to_vec(logged).expect("serialises");
        commit.meta(LOGGED_META, Some(&logged));
        self.store.write(commit)?;
        self.last = Some(marker);
        Ok(())
    }

    /// The keys of entries after the last marker (an unfinished checkpoint), in log order,
    /// each once.
    pub fn unfinished(self) -> Vec<Vec<u8>> {
        let mut seen = std::collections::HashSet::new();
        self.pending
            .into_iter()
            .filter_map(|(key, _)| seen.insert(key.clone()).then_some(key))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{FRAME_CHUNK, chunk_key, row_key, set_header};
    use crate::store::Commit;
    use std::sync::{Arc, Mutex};

    fn value(expires: i64, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        set_header(&mut v, expires, 0);
        v.extend_from_slice(body);
        v
    }

    /// A log in memory: what a writer appended, in order.
    #[derive(Default)]
    struct Log(Vec<(Vec<u8>, Option<Vec<u8>>)>);

    impl ChangelogWriter for Log {
        fn entry(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
            self.0.push((key.to_vec(), value.map(<[u8]>::to_vec)));
            Ok(())
        }

        fn commit(&mut self, marker: &Marker) -> Result<Logged, String> {
            self.0.push((
                MARKER_KEY.to_vec(),
                Some(serde_json::to_vec(marker).expect("json")),
            ));
            Ok(Logged {
                topic: "log".into(),
                partition: 0,
                next_offset: self.0.len() as i64,
                checkpoint: marker.checkpoint,
            })
        }
    }

    /// Replays `log` into `store`; returns the unfinished keys.
    fn replay(store: &StateStore, log: &[(Vec<u8>, Option<Vec<u8>>)]) -> (Vec<Vec<u8>>, u64, u64) {
        let mut restore = store.restore();
        for (offset, (key, value)) in log.iter().enumerate() {
            if is_marker(key) {
                let marker: Marker =
                    serde_json::from_slice(value.as_deref().expect("value")).expect("marker");
                let logged = Logged {
                    topic: "log".into(),
                    partition: 0,
                    next_offset: offset as i64 + 1,
                    checkpoint: marker.checkpoint,
                };
                restore.marker(marker, &logged).expect("applies");
            } else {
                restore.entry(key, value.as_deref()).expect("entry");
            }
        }
        let (applied, skipped) = (restore.applied, restore.skipped);
        (restore.unfinished(), applied, skipped)
    }

    #[test]
    fn a_store_rebuilt_from_its_log_holds_its_finished_checkpoints_only() {
        let original = StateStore::temporary().expect("opens");
        let mut log = Log::default();
        let alice = row_key(b"d\0", b"alice");
        let bob = row_key(b"d\0", b"bob");
        let chunk = chunk_key(b"d\0", FRAME_CHUNK, b"alice", 1);
        // Checkpoint 1: alice, bob, a chunk, metadata.
        let mut commit = original.commit(0);
        commit.row(&alice, Some(&value(100, b"a1")));
        commit.row(&bob, Some(&value(15, b"b1")));
        commit.chunk(&chunk, Some(&value(100, b"c1")));
        commit.meta("progress", Some(b"1"));
        let logged = original.write_logged(commit, &mut log, 10).expect("writes");
        assert_eq!(logged.checkpoint, 1);
        // Checkpoint 2: alice changes, the chunk is deleted; bob expired before its bound.
        let mut commit = original.commit(0);
        commit.row(&alice, Some(&value(100, b"a2")));
        commit.chunk(&chunk, None);
        commit.meta("progress", Some(b"2"));
        original.write_logged(commit, &mut log, 20).expect("writes");
        // Compaction keeps the last marker only.
        let first_marker = log.0.iter().position(|(k, _)| is_marker(k)).expect("marker");
        log.0.remove(first_marker);
        // Checkpoint 3 dies half-way: one entry, no marker.
        log.0
            .push(([&[ROWS_TAG][..], &alice].concat(), Some(value(100, b"a3"))));

        let rebuilt = StateStore::temporary().expect("opens");
        let (unfinished, applied, skipped) = replay(&rebuilt, &log.0);
        assert_eq!(skipped, 1, "bob expired before checkpoint 2's bound");
        assert_eq!(applied, 6);
        assert_eq!(unfinished, vec![[&[ROWS_TAG][..], &alice].concat()]);
        assert_eq!(rebuilt.get(&alice).expect("reads"), Some(value(100, b"a2")));
        assert_eq!(rebuilt.get(&bob).expect("reads"), None);
        assert!(
            rebuilt.chunks(b"").expect("reads").is_empty(),
            "the deleted chunk is gone"
        );
        assert_eq!(rebuilt.meta("progress").expect("reads"), Some(b"2".to_vec()));
        let logged: Logged = rebuilt.meta_json(LOGGED_META).expect("reads").expect("present");
        assert_eq!((logged.next_offset, logged.checkpoint), (8, 2));
        // Every entry the rebuilt store holds is what the original holds (the `changelog`
        // entry aside: it says where each stands in the log).
        let entries = |store: &StateStore| {
            let mut all = Vec::new();
            store
                .for_each_entry(|k, v| {
                    all.push((k.to_vec(), v.to_vec()));
                    Ok(())
                })
                .expect("scans");
            all
        };
        let mut want = entries(&original);
        want.retain(|(k, _)| k != &[&[ROWS_TAG][..], &bob].concat());
        assert_eq!(entries(&rebuilt), want);
    }

    /// Checkpoint `n` of a key's row and chunk (the chunk deleted after the first).
    fn checkpoint_n<'s>(store: &'s StateStore, n: u8) -> Commit<'s> {
        let mut commit = store.commit(0);
        commit.row(&row_key(b"d\0", b"alice"), Some(&value(100, &[b'a', n])));
        let chunk = chunk_key(b"d\0", FRAME_CHUNK, b"alice", 1);
        commit.chunk(&chunk, (n == 1).then(|| value(100, b"c")).as_deref());
        commit.meta("progress", Some(&[n]));
        commit
    }

    #[test]
    fn a_thread_that_finds_no_write_running_reads_what_the_write_behind_wrote() {
        // Two threads of one pipeline (its window states run on two): one waits for the
        // write, the other asks whether one is running, then reads. It must not be told "no"
        // before the write is in the store.
        struct Slow(Log);
        impl ChangelogWriter for Slow {
            fn entry(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
                self.0.entry(key, value)
            }
            fn commit(&mut self, marker: &Marker) -> Result<Logged, String> {
                std::thread::sleep(std::time::Duration::from_millis(300));
                self.0.commit(marker)
            }
        }
        let alice = row_key(b"d\0", b"alice");
        for asks in ["writing", "settle"] {
            let store = StateStore::temporary().expect("opens");
            store
                .write_logged_behind(
                    checkpoint_n(&store, 1),
                    Arc::new(Mutex::new(Slow(Log::default()))),
                    10,
                )
                .expect("starts");
            let started = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    started.wait();
                    store.settle().expect("written");
                });
                started.wait();
                // (Long enough for the other thread to be waiting for the write.)
                std::thread::sleep(std::time::Duration::from_millis(50));
                if asks == "writing" {
                    while store.writing() {
                        std::thread::yield_now();
                    }
                } else {
                    store
                        .settle()
                        .expect("nothing to report: the other thread had it");
                }
                assert!(
                    store.get(&alice).expect("reads").is_some(),
                    "{asks}: the store read before the write was in it"
                );
            });
        }
    }

    #[test]
    fn a_checkpoint_logged_behind_logs_and_stores_what_one_logged_at_once_does() {
        let alice = row_key(b"d\0", b"alice");
        let chunk = chunk_key(b"d\0", FRAME_CHUNK, b"alice", 1);
        let at_once = StateStore::temporary().expect("opens");
        let mut log = Log::default();
        for n in 1..=2 {
            at_once
                .write_logged(checkpoint_n(&at_once, n), &mut log, 10 * i64::from(n))
                .expect("writes");
        }
        let behind = StateStore::temporary().expect("opens");
        let shared = Arc::new(Mutex::new(Log::default()));
        for n in 1..=2 {
            // (The second waits for the first.)
            behind
                .write_logged_behind(checkpoint_n(&behind, n), shared.clone(), 10 * i64::from(n))
                .expect("starts");
        }
        behind.settle().expect("written");
        assert_eq!(shared.lock().expect("log").0, log.0);
        for key in [&alice, &chunk] {
            assert_eq!(behind.get(key).expect("reads"), at_once.get(key).expect("reads"));
        }
        assert_eq!(behind.meta("progress").expect("reads"), Some(vec![2]));
        let logged =
            |store: &StateStore| -> Logged { store.meta_json(LOGGED_META).expect("reads").expect("present") };
        assert_eq!(logged(&behind).checkpoint, 2);
        assert_eq!(logged(&behind).next_offset, logged(&at_once).next_offset);

        // A log that refuses: the store keeps the checkpoint before, and the error is the
        // next one's (or settling's).
        struct Refusing;
        impl ChangelogWriter for Refusing {
            fn entry(&mut self, _: &[u8], _: Option<&[u8]>) -> Result<(), String> {
                Err("the broker is gone".into())
            }
            fn commit(&mut self, _: &Marker) -> Result<Logged, String> {
                unreachable!("no entry was written")
            }
        }
        behind
            .write_logged_behind(checkpoint_n(&behind, 3), Arc::new(Mutex::new(Refusing)), 30)
            .expect("starts");
        let error = behind.settle().expect_err("the write failed");
        assert!(error.to_string().contains("the broker is gone"), "{error}");
        assert_eq!(behind.meta("progress").expect("reads"), Some(vec![2]));
    }

    #[test]
    fn an_unknown_entry_is_refused_and_keys_the_compaction_filter_dropped_are_told() {
        let store = StateStore::temporary().expect("opens");
        let mut restore = store.restore();
        let error = restore.entry(b"zzz", None).expect_err("unknown tag");
        assert!(error.to_string().contains("unknown key"), "{error}");

        store.log_expired(true);
        let mut commit = store.commit(0);
        commit.row(b"old", Some(&value(10, b"")));
        commit.row(b"new", Some(&value(30, b"")));
        store.write(commit).expect("writes");
        store.advance_clock(20);
        store.compact().expect("compacts");
        assert_eq!(
            store.take_expired().expect("reads"),
            vec![[&[ROWS_TAG][..], b"old"].concat()]
        );
        assert!(store.take_expired().expect("reads").is_empty(), "told once");
    }
}
