//! The cache of keys over the state store: a key's entry is loaded on first use (its rows, or
//! for incremental windows its chunks rebuilt into frames and accumulators), written back by a
//! checkpoint when changed, and evicted, least recently used first, past the memory budget.
//! Each key the state knows has a number ([`Keys`]) while it is cached or an index of waiting
//! keys names it; a slot freed by a key is reused by the next (the slots do not shrink: there
//! are at most as many as keys were cached or waiting at once).

use rampart_state::codec::{
    FIRED_CHUNK, FRAME_CHUNK, INCREMENTAL, PENDING_CHUNK, chunk_key, chunk_prefix, expires_at, row_key,
    set_header, split_chunk_key,
};
use rampart_state::{Commit, StateError, StateStore};
use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};
use std::hash::BuildHasher;

use super::rerun::{PendingRow, Rerun};
use super::{Bounds, Kept, KeyedState};
use crate::windows::frames::{KeyAgg, heap};

/// A key's number in its state's [`Keys`]: what the indexes of keys with rows waiting hold.
pub(super) type KeyId = u32;

/// In which index of waiting keys a key is ([`Keys::indexed`]).
#[derive(Debug, Clone, Copy)]
pub(super) enum Waits {
    /// `due`: rows not decided yet.
    Due = 1,
    /// `early`: rows to look at for the detectors deciding at once.
    Early = 2,
}

/// The keys a window state knows, each with a number: those cached (with their [`Entry`]) and
/// those an index of waiting keys names while they are evicted (without). The indexes hold
/// numbers rather than copies of the keys, and deciding a key's rows reaches it by its number,
/// without hashing or comparing its bytes. A number is reused once its key has neither an
/// entry nor a place in an index.
#[derive(Default)]
pub(super) struct Keys {
    slots: Vec<Slot>,
    /// Numbers of empty slots.
    free: Vec<KeyId>,
    /// The numbers of the keys, by the hash of their bytes.
    table: hashbrown::HashTable<KeyId>,
    /// Keys with an entry.
    cached: usize,
}

struct Slot {
    key: Box<[u8]>,
    entry: Option<Entry>,
    /// The indexes it is in ([`Waits`], bits).
    indexed: u8,
}

fn hash_of(key: &[u8]) -> u64 {
    FxBuildHasher.hash_one(key)
}

impl Keys {
    /// Bytes per key besides its heap: its slot, and its number in the table (at hashbrown's
    /// load factor, with its control byte).
    pub(super) const SLOT_BYTES: usize =
        std::mem::size_of::<Slot>() + (std::mem::size_of::<KeyId>() + 1) * 8 / 7;

    /// `key`'s number, if the state knows it.
    pub(super) fn id(&self, key: &[u8]) -> Option<KeyId> {
        self.table
            .find(hash_of(key), |&id| &*self.slots[id as usize].key == key)
            .copied()
    }

    /// `key`'s number, given one if it has none.
    pub(super) fn intern(&mut self, key: &[u8]) -> KeyId {
        if let Some(id) = self.id(key) {
            return id;
        }
        let slot = Slot {
            key: key.into(),
            entry: None,
            indexed: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                KeyId::try_from(self.slots.len() - 1).expect("fewer than 2^32 keys in one state")
            }
        };
        let slots = &self.slots;
        self.table
            .insert_unique(hash_of(key), id, |&id| hash_of(&slots[id as usize].key));
        id
    }

    /// The bytes of key `id`.
    pub(super) fn key(&self, id: KeyId) -> &[u8] {
        &self.slots[id as usize].key
    }

    /// The entry of key `id`, if cached.
    pub(super) fn at(&self, id: KeyId) -> Option<&Entry> {
        self.slots[id as usize].entry.as_ref()
    }

    /// The entry of key `id`, if cached.
    pub(super) fn at_mut(&mut self, id: KeyId) -> Option<&mut Entry> {
        self.slots[id as usize].entry.as_mut()
    }

    /// `key`'s entry, if cached.
    pub(super) fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.id(key).and_then(|id| self.at(id))
    }

    /// Caches `entry` for key `id` (which has none).
    fn put(&mut self, id: KeyId, entry: Entry) {
        let slot = &mut self.slots[id as usize];
        debug_assert!(slot.entry.is_none(), "a key cached twice");
        slot.entry = Some(entry);
        self.cached += 1;
    }

    /// Takes key `id`'s entry out of the cache; the key is forgotten unless an index names it.
    fn take(&mut self, id: KeyId) -> Option<Entry> {
        let entry = self.slots[id as usize].entry.take();
        if entry.is_some() {
            self.cached -= 1;
            self.release(id);
        }
        entry
    }

    /// Notes whether key `id` is in index `waits`; a key neither cached nor in an index is
    /// forgotten.
    pub(super) fn indexed(&mut self, id: KeyId, waits: Waits, is: bool) {
        let slot = &mut self.slots[id as usize];
        if is {
            slot.indexed |= waits as u8;
        } else {
            slot.indexed &= !(waits as u8);
            self.release(id);
        }
    }

    /// Forgets key `id` if it has neither an entry nor a place in an index (its number is
    /// then free).
    pub(super) fn release(&mut self, id: KeyId) {
        let slot = &mut self.slots[id as usize];
        if slot.entry.is_some() || slot.indexed != 0 {
            return;
        }
        let key = std::mem::take(&mut slot.key);
        if let Ok(found) = self.table.find_entry(hash_of(&key), |&other| other == id) {
            found.remove();
        }
        self.free.push(id);
    }

    /// The cached keys with their entries.
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.slots
            .iter()
            .filter_map(|s| Some((&*s.key, s.entry.as_ref()?)))
    }

    /// The cached keys with their entries, and their numbers.
    fn iter_mut(&mut self) -> impl Iterator<Item = (KeyId, &[u8], &mut Entry)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(id, s)| Some((id as KeyId, &*s.key, s.entry.as_mut()?)))
    }

    /// The cached keys.
    #[cfg(test)]
    pub(super) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.iter().map(|(k, _)| k)
    }

    /// How many keys are cached.
    pub(super) fn len(&self) -> usize {
        self.cached
    }

    /// Gives back the table's room beyond what its keys need.
    fn shrink_to_fit(&mut self) {
        let slots = &self.slots;
        self.table.shrink_to_fit(|&id| hash_of(&slots[id as usize].key));
    }
}

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

    /// Heap bytes: its key's slot and number ([`Keys::SLOT_BYTES`]), the boxed key, the value,
    /// the aggregates, and for a key with rows waiting its places in `due` and `early` (B-tree
    /// slots of a time and a number).
    pub(super) fn bytes(&self, key: &[u8]) -> usize {
        let due = match &self.agg {
            Some(a) if !a.pending.is_empty() => 2 * std::mem::size_of::<(i64, KeyId)>(),
            _ => 0,
        };
        Keys::SLOT_BYTES
            + heap(key.len())
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
            let mut oldest: FxHashMap<KeyId, i64> = FxHashMap::default();
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
                    let o = oldest.entry(self.cache.intern(key)).or_insert(t);
                    *o = (*o).min(t);
                }
            }
            for (id, t) in oldest {
                self.due.insert((t, id));
                self.cache.indexed(id, Waits::Due, true);
                if self.at_once != 0 {
                    self.early.insert((t, id));
                    self.cache.indexed(id, Waits::Early, true);
                }
            }
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

    /// `key`'s entry, read from the store if it is not cached.
    pub(super) fn entry(&mut self, store: &StateStore, key: &[u8]) -> Result<&mut Entry, StateError> {
        let id = self.cache.intern(key);
        self.entry_at(store, id)
    }

    /// Key `id`'s entry, read from the store if it is not cached.
    pub(super) fn entry_at(&mut self, store: &StateStore, id: KeyId) -> Result<&mut Entry, StateError> {
        if self.cache.at(id).is_none() {
            let key = self.cache.key(id);
            if !self.deleted.is_empty() && (self.deleted.contains(key) || !store.writing()) {
                // Deleted by a write that may still be running: read the store after it.
                if let Err(e) = store.settle() {
                    self.cache.release(id);
                    return Err(e);
                }
                self.deleted = FxHashSet::default();
            }
            let mut entry = match self.load(store, key) {
                Ok(entry) => entry,
                Err(e) => {
                    // (A key given a number for this read, and named by no index, is forgotten.)
                    self.cache.release(id);
                    return Err(e);
                }
            };
            self.cache_bytes += entry.count(key);
            self.cache.put(id, entry);
        }
        let entry = self.cache.at_mut(id).expect("cached above");
        entry.used = self.tick;
        Ok(entry)
    }

    /// Reads `key`'s entry from the store.
    fn load(&self, store: &StateStore, key: &[u8]) -> Result<Entry, StateError> {
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
        Ok(Entry {
            value,
            dirty: false,
            agg,
            used: 0,
            counted: 0,
        })
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
        for (id, key, entry) in self.cache.iter_mut() {
            let gone = expires_at(&entry.value) < now || entry.agg.as_ref().is_some_and(|a| a.is_empty());
            let save = gone || (entry.dirty && saving == Saving::Changed);
            if save {
                saver.save(key, entry, gone, commit);
            }
            if gone {
                expired.push(id);
            } else if save {
                // (Saving changed its bytes.)
                bytes += entry.count(key);
            } else {
                bytes += entry.count_since(key, since);
            }
        }
        self.counted_tick = self.tick;
        self.deleted.clear();
        for id in expired {
            self.deleted.insert(self.cache.key(id).into());
            self.cache.take(id);
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
            .map(|(_, key, entry)| entry.count_since(key, since))
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
        let mut candidates: Vec<(EvictionOrder, usize, KeyId)> = self
            .cache
            .iter_mut()
            .filter(|(_, _, e)| (!e.dirty || spill.is_some()) && e.used < recent)
            .map(|(id, _, e)| {
                let waiting = e.agg.as_ref().is_some_and(|a| !a.pending.is_empty());
                ((waiting, e.used), e.counted as usize, id)
            })
            .collect();
        candidates.sort_unstable_by_key(|(order, _, _)| *order);
        let excess = self.cache_bytes - (budget - budget / 8);
        let mut freed = 0;
        let mut drop = Vec::new();
        for (_, bytes, id) in candidates {
            if freed >= excess {
                break;
            }
            freed += bytes;
            drop.push(id);
        }
        let horizon = self.horizon();
        let saver = spill.as_ref().map(|(bounds, _)| Saver {
            tag: &self.tag,
            decided_until: self.decided_until,
            horizon,
            lateness: bounds.lateness,
        });
        for id in drop {
            // (Copied before the entry goes: a key no index names is forgotten with it.)
            let key: Option<Box<[u8]>> = saver.as_ref().map(|_| self.cache.key(id).into());
            let Some(mut entry) = self.cache.take(id) else {
                continue;
            };
            if let (Some(saver), Some((_, commit)), Some(key)) = (&saver, spill.as_mut(), key)
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

#[cfg(test)]
mod tests {
    use super::{Entry, Keys, Waits};

    fn entry() -> Entry {
        Entry {
            value: Vec::new(),
            dirty: false,
            agg: None,
            used: 0,
            counted: 0,
        }
    }

    #[test]
    fn a_key_keeps_its_number_while_cached_or_waiting_and_is_forgotten_after() {
        let mut keys = Keys::default();
        let alice = keys.intern(b"alice");
        let bob = keys.intern(b"bob");
        assert_ne!(alice, bob);
        assert_eq!(keys.intern(b"alice"), alice, "one number per key");
        assert_eq!(keys.key(bob), b"bob");
        keys.put(alice, entry());
        keys.put(bob, entry());
        assert_eq!(keys.len(), 2);

        // Evicted while a row waits: alice keeps her number, without an entry.
        keys.indexed(alice, Waits::Due, true);
        assert!(keys.take(alice).is_some());
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.id(b"alice"), Some(alice));
        assert!(keys.get(b"alice").is_none());
        // Out of one index, still in the other: kept.
        keys.indexed(alice, Waits::Early, true);
        keys.indexed(alice, Waits::Due, false);
        assert_eq!(keys.id(b"alice"), Some(alice));
        // In none, and not cached: forgotten, her number free for the next key.
        keys.indexed(alice, Waits::Early, false);
        assert_eq!(keys.id(b"alice"), None);
        let carol = keys.intern(b"carol");
        assert_eq!(carol, alice, "the number is reused");
        assert_eq!(keys.id(b"carol"), Some(carol));

        // A cached key in no index is forgotten when it leaves the cache.
        assert!(keys.take(bob).is_some());
        assert_eq!(keys.id(b"bob"), None);
        assert_eq!(keys.len(), 0);
        // Forgetting a key with neither does nothing to the others.
        keys.release(carol);
        assert_eq!(keys.id(b"carol"), None);
        assert_eq!(keys.iter().count(), 0);
    }
}
