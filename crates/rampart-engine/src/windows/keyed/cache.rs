//! The cache of keys over the state store: a key's entry is loaded on first use (its rows, or
//! for incremental windows its chunks rebuilt into frames and accumulators), written back by a
//! checkpoint when changed, and evicted, least recently used first, past the memory budget.

use rampart_state::codec::{
    FIRED_CHUNK, FRAME_CHUNK, INCREMENTAL, PENDING_CHUNK, chunk_key, chunk_prefix, expires_at, row_key,
    set_header, split_chunk_key,
};
use rampart_state::{Commit, StateError, StateStore};
use rustc_hash::{FxHashMap, FxHashSet};

use super::rerun::{PendingRow, Rerun};
use super::{Bounds, Kept, KeyedState};
use crate::windows::frames::{KeyAgg, heap};

pub(super) struct Entry {
    /// The stored value (rows, or a fired group's header); for incremental detectors only
    /// the header, the rest being `agg`.
    pub(super) value: Vec<u8>,
    pub(super) dirty: bool,
    /// Incremental sliding windows: the key's frames and accumulators.
    /// (Boxed: the cache's slots stay small, and keep their capacity after evictions.)
    pub(super) agg: Option<Box<KeyAgg>>,
    /// When it was last used ([`KeyedState::tick`]): eviction drops the least recent first.
    pub(super) used: u64,
    /// Its [`Self::bytes`] when last counted (loaded, checkpointed, recounted), up to 4 GiB.
    pub(super) counted: u32,
}

impl Entry {
    /// Counts its bytes again ([`Self::bytes`]), keeping them in `counted`.
    pub(super) fn count(&mut self, key: &[u8]) -> usize {
        let bytes = self.bytes(key);
        self.counted = u32::try_from(bytes).unwrap_or(u32::MAX);
        bytes
    }

    /// Its bytes: counted again if it may have changed since the count at batch `since`
    /// (used: every change goes through [`KeyedState::entry`] or marks it used), else as
    /// counted then. (Not every dirty key: a temporary state's keys stay dirty until evicted.)
    pub(super) fn count_since(&mut self, key: &[u8], since: u64) -> usize {
        if self.used >= since {
            self.count(key)
        } else {
            self.counted as usize
        }
    }

    /// Heap bytes: the cache slot (at hashbrown's load factor), the boxed key, the value, the
    /// aggregates, and for a key with rows waiting its entry in `due` (a B-tree slot and a
    /// copy of the key).
    pub(super) fn bytes(&self, key: &[u8]) -> usize {
        let slot = (std::mem::size_of::<(Box<[u8]>, Entry)>() + 1) * 8 / 7;
        let due = match &self.agg {
            Some(a) if !a.pending.is_empty() => heap(key.len()) + 2 * std::mem::size_of::<(i64, Box<[u8]>)>(),
            _ => 0,
        };
        slot + heap(key.len())
            + heap(self.value.capacity())
            + self.agg.as_ref().map_or(0, |a| a.bytes())
            + due
    }
}

/// The order keys are evicted in: those with no row waiting first, then least recently used.
type EvictionOrder = (bool, u64);

/// Eviction keeps the keys used by this many of the latest batches.
const RECENT_BATCHES: u64 = 2;

impl KeyedState {
    pub(super) fn pending_meta_key(&self) -> String {
        format!(
            "pending/{}",
            String::from_utf8_lossy(&self.tag[..self.tag.len() - 1])
        )
    }

    /// Restores the rows that were waiting when the state was last written (for incremental
    /// windows: the keys with pending rows not older than `watermark`, less how far the frames
    /// look ahead).
    pub fn restore(&mut self, store: &StateStore, watermark: i64) -> Result<(), StateError> {
        if matches!(self.kept, Kept::Frames(_)) {
            let decided_until = watermark.saturating_sub(self.following);
            self.decided_until = decided_until;
            let mut prefix = self.tag.clone();
            prefix.push(PENDING_CHUNK);
            let mut oldest: FxHashMap<Box<[u8]>, i64> = FxHashMap::default();
            for (chunk_key, value) in store.chunks(&prefix)? {
                let corrupt = || {
                    store.corrupt(
                        format_args!("pending rows chunk {}", hex::encode(&chunk_key)),
                        "does not decode",
                    )
                };
                let (key, _) = split_chunk_key(&self.tag, PENDING_CHUNK, &chunk_key).ok_or_else(corrupt)?;
                let rows = KeyAgg::pending_rows(&value).ok_or_else(corrupt)?;
                if let Some(t) = rows.iter().map(|r| r.0).filter(|t| *t >= decided_until).min() {
                    let o = oldest.entry(key.into()).or_insert(t);
                    *o = (*o).min(t);
                }
            }
            if self.at_once != 0 {
                self.early.extend(oldest.iter().map(|(k, t)| (*t, k.clone())));
            }
            self.due.extend(oldest.into_iter().map(|(k, t)| (t, k)));
            return Ok(());
        }
        let key = self.pending_meta_key();
        let Some(rows) = store.meta_json::<Vec<PendingRow>>(&key)? else {
            return Ok(());
        };
        for p in rows {
            let key = hex::decode(&p.key).unwrap_or_default().into_boxed_slice();
            self.pending.insert(
                (p.time, p.row),
                Rerun {
                    key,
                    fired: p.fired,
                    settled: p.fired,
                },
            );
        }
        Ok(())
    }

    pub(super) fn entry(&mut self, store: &StateStore, key: &[u8]) -> Result<&mut Entry, StateError> {
        if !self.cache.contains_key(key) {
            if !self.deleted.is_empty() && (self.deleted.contains(key) || !store.writing()) {
                // Deleted by a write that may still be running: read the store after it.
                store.settle()?;
                self.deleted = FxHashSet::default();
            }
            let (value, agg) = match &self.kept {
                Kept::Frames(layout) => {
                    let chunks = |kind| -> Result<Vec<(u64, Vec<u8>)>, StateError> {
                        Ok(store
                            .key_chunks(&chunk_prefix(&self.tag, kind, key))?
                            .into_iter()
                            .filter_map(|(k, v)| Some((split_chunk_key(&self.tag, kind, &k)?.1, v)))
                            .collect())
                    };
                    let corrupt = || {
                        store.corrupt(
                            format_args!("window state of key {}", hex::encode(key)),
                            "does not decode",
                        )
                    };
                    let mut agg = KeyAgg::load_frames(layout, &chunks(FRAME_CHUNK)?, self.decided_until)
                        .ok_or_else(corrupt)?;
                    if agg.newest_stored().is_some_and(|t| t >= self.decided_until) {
                        let fired = if self.at_once != 0 {
                            chunks(FIRED_CHUNK)?
                        } else {
                            Vec::new()
                        };
                        agg.load_undecided(&chunks(PENDING_CHUNK)?, &fired, &self.tags, self.decided_until)
                            .ok_or_else(corrupt)?;
                    }
                    let mut value = Vec::new();
                    let expires = agg
                        .newest()
                        .map_or(i64::MIN, |n| n.saturating_add(self.horizon()));
                    set_header(&mut value, expires, INCREMENTAL);
                    (value, Some(Box::new(agg)))
                }
                Kept::Rows => (store.get(&row_key(&self.tag, key))?.unwrap_or_default(), None),
            };
            let mut entry = Entry {
                value,
                dirty: false,
                agg,
                used: 0,
                counted: 0,
            };
            self.cache_bytes += entry.count(key);
            self.cache.insert(key.into(), entry);
        }
        let entry = self.cache.get_mut(key).expect("inserted above");
        entry.used = self.tick;
        Ok(entry)
    }

    /// Adds the changed keys (with [`Saving::Evicted`]: none, they are written when evicted)
    /// and the waiting rows to `commit`; expired keys are deleted.
    pub fn checkpoint(&mut self, bounds: Bounds, commit: &mut Commit<'_>, saving: Saving) {
        self.unsaved_bytes = 0;
        let now = bounds.expiry_now();
        let mut expired = Vec::new();
        let mut bytes = 0;
        let saver = Saver {
            tag: &self.tag,
            decided_until: self.decided_until,
            horizon: self.horizon(),
            lateness: bounds.lateness,
        };
        let since = self.counted_tick;
        for (key, entry) in &mut self.cache {
            let gone = expires_at(&entry.value) < now || entry.agg.as_ref().is_some_and(|a| a.is_empty());
            let save = gone || (entry.dirty && saving == Saving::Changed);
            if save {
                saver.save(key, entry, gone, commit);
            }
            if gone {
                expired.push(key.clone());
            } else if save {
                // (Saving changed its bytes.)
                bytes += entry.count(key);
            } else {
                bytes += entry.count_since(key, since);
            }
        }
        self.counted_tick = self.tick;
        self.deleted.clear();
        for key in expired {
            self.cache.remove(&key);
            self.deleted.insert(key);
        }
        self.cache_bytes = bytes;
        if matches!(self.kept, Kept::Frames(_)) {
            if let Some(registry) = &self.registry {
                commit.meta(registry, Some(&self.tag[..self.tag.len() - 1]));
            }
            // (Their pending rows are in their keys' chunks.)
            return;
        }
        let pending: Vec<PendingRow> = self
            .pending
            .iter()
            .map(|((time, row), waiting)| PendingRow {
                time: *time,
                row: *row,
                key: hex::encode(&waiting.key),
                fired: waiting.fired,
            })
            .collect();
        commit.meta(
            &self.pending_meta_key(),
            Some(&serde_json::to_vec(&pending).expect("pending rows serialise")),
        );
    }

    /// Counts the cached keys' bytes again, exactly. (Between checkpoints the count only
    /// grows, by an estimate per row added; rows leaving the frames or decided are not taken
    /// off until a checkpoint recounts.) Only the keys used or changed since the last count are
    /// counted again; the others still have the bytes counted then.
    pub fn recount(&mut self) {
        let since = self.counted_tick;
        self.cache_bytes = self
            .cache
            .iter_mut()
            .map(|(key, entry)| entry.count_since(key, since))
            .sum();
        self.counted_tick = self.tick;
    }

    /// Drops clean cached keys until the cache holds at most `budget` bytes; with `spill`
    /// (a temporary state, whose keys are written only when they leave memory: see
    /// [`Saving::Evicted`]), changed keys too, each written to the commit first (and read back
    /// only after its write, as a deleted key is).
    /// Keys with no row waiting for the watermark first (a key with one will be read back when
    /// the row is due: on a log of many short-lived keys, those are the working set, and the
    /// others are done with), least recently used first within each; down to seven eighths of
    /// the budget (so that eviction is not needed again at once, while a working set just above
    /// the budget keeps most of its keys: evicting to half of it made dense logs read their hot
    /// keys back). Keys the last [`RECENT_BATCHES`] batches used stay (evicting them would read
    /// them back at once), unless `budget` is 0 (no cache: every key is read back each time).
    pub fn evict(&mut self, budget: usize, mut spill: Option<(Bounds, &mut Commit<'_>)>) {
        if self.cache_bytes <= budget {
            return;
        }
        let recent = if budget == 0 {
            u64::MAX
        } else {
            self.tick.saturating_sub(RECENT_BATCHES - 1)
        };
        // (Whether a row waits, when last used), its bytes, the key.
        let mut candidates: Vec<(EvictionOrder, usize, &Box<[u8]>)> = self
            .cache
            .iter()
            .filter(|(_, e)| (!e.dirty || spill.is_some()) && e.used < recent)
            .map(|(k, e)| {
                let waiting = e.agg.as_ref().is_some_and(|a| !a.pending.is_empty());
                ((waiting, e.used), e.counted as usize, k)
            })
            .collect();
        candidates.sort_unstable_by_key(|(order, _, _)| *order);
        let excess = self.cache_bytes - (budget - budget / 8);
        let mut freed = 0;
        let mut drop = Vec::new();
        for (_, bytes, key) in candidates {
            if freed >= excess {
                break;
            }
            freed += bytes;
            drop.push(key.clone());
        }
        let horizon = self.horizon();
        let saver = spill.as_ref().map(|(bounds, _)| Saver {
            tag: &self.tag,
            decided_until: self.decided_until,
            horizon,
            lateness: bounds.lateness,
        });
        for key in drop {
            let Some(mut entry) = self.cache.remove(&key) else {
                continue;
            };
            if let (Some(saver), Some((_, commit))) = (&saver, spill.as_mut())
                && entry.dirty
            {
                saver.save(&key, &mut entry, false, commit);
                self.deleted.insert(key);
            }
        }
        self.cache.shrink_to_fit();
        self.cache_bytes = self.cache_bytes.saturating_sub(freed);
    }
}

/// Which cached keys a checkpoint writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saving {
    /// Every changed key: a persistent state, which is what a restart reads.
    Changed,
    /// Only keys that leave memory (evicted, see [`KeyedState::evict`], or expired): a
    /// temporary state (a replay without `--state`), which nothing reads but the keys evicted
    /// to it. A dense log whose keys fit in the cache then writes nothing.
    Evicted,
}

/// Writes one state's keys to a commit.
struct Saver<'a> {
    tag: &'a [u8],
    decided_until: i64,
    horizon: i64,
    lateness: i64,
}

impl Saver<'_> {
    /// Adds what brings `key` on disk up to date to `commit`; a key `gone` deletes what it
    /// has stored.
    fn save(&self, key: &[u8], entry: &mut Entry, gone: bool, commit: &mut Commit<'_>) {
        match &mut entry.agg {
            Some(agg) => {
                if gone {
                    agg.clear();
                }
                let chunk_key = |kind: u8, id: u64| chunk_key(self.tag, kind, key, id);
                agg.save(chunk_key, self.decided_until, self.horizon, self.lateness, commit);
            }
            None => commit.row(&row_key(self.tag, key), (!gone).then_some(entry.value.as_slice())),
        }
        entry.dirty = false;
    }
}
