//! Checkpoints of the window state: when one is due, and what it writes (the windows' changed
//! keys, the rows still waiting, the clock, the guard and the input it holds) in one atomic
//! write to the state store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use rampart_state::changelog::ChangelogWriter;
use rampart_state::{Commit, StateError, StateStore};

use super::event_time::bounds_of;
use super::windowed::SharedState;
use super::{Input, Pipeline};
use crate::windows::keyed::{Bounds, Saving};

/// The clock and row numbering, as persisted.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredClock {
    /// Newest event time of any source.
    pub(super) newest: i64,
    pub(super) next_row: u64,
    /// Every window row older than this was decided: the watermark (`i64::MIN` before any
    /// source let it move). Absent from checkpoints written before it was kept: theirs was
    /// the newest time's.
    #[serde(default)]
    pub(super) decided_until: Option<i64>,
    /// Each source's newest event time, by name (a Kafka partition's is its progress key).
    #[serde(default)]
    pub(super) sources: BTreeMap<String, i64>,
}

/// How a checkpoint reaches the store.
enum Write<'a> {
    /// Written before the checkpoint returns.
    Now,
    /// Written on a thread of its own ([`StateStore::write_behind`]).
    Behind,
    /// To the changelog first, then the store ([`StateStore::write_logged`]).
    Logged(&'a mut dyn ChangelogWriter),
    /// The same on a thread of its own ([`StateStore::write_logged_behind`]).
    LoggedBehind(Arc<Mutex<dyn ChangelogWriter + Send>>),
}

/// Window state figures (see [`Pipeline::state_stats`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct StateStats {
    /// Keys held in memory.
    pub cached_keys: usize,
    /// Approximate bytes of those keys.
    pub cached_bytes: usize,
    /// Sliding-window rows waiting for later events.
    pub waiting_rows: usize,
    /// Bytes of the state directory on disk.
    pub disk_bytes: u64,
    /// Bytes of memory the state store holds beside the cached keys (memtables, SST readers,
    /// block cache).
    pub store_memory_bytes: u64,
}

/// The changes (estimated) past which a checkpoint is written, or an eighth of the cache's
/// budget when that is larger: its write batch is built in memory and copied into a memtable,
/// twice this much resident at its peak.
const CHECKPOINT_WRITE_BYTES: usize = 32 << 20;

impl Pipeline {
    /// Whether enough has changed since the last checkpoint that one should be written (the
    /// caller knows the input progress to write with it).
    pub fn wants_checkpoint(&self) -> bool {
        let mut windows = self.lock();
        let budget = self.config.state_cache_bytes;
        let limit = budget.max(windows.in_use + budget / 8);
        let mut cached: usize = windows.keyed.iter().map(|w| w.state.cache_bytes()).sum();
        if cached > limit {
            // The count between checkpoints only grows (rows that left are not taken off):
            // a checkpoint for the cache's sake only when the exact count says so.
            windows.keyed.iter_mut().for_each(|w| w.state.recount());
            cached = windows.keyed.iter().map(|w| w.state.cache_bytes()).sum();
        }
        if !self.is_persistent() {
            // A temporary state writes keys only when they leave memory (see
            // `Saving::Evicted`): a checkpoint only when they have to.
            return cached > limit;
        }
        let unsaved: usize = windows.keyed.iter().map(|w| w.state.unsaved_bytes()).sum();
        // Past the budget; or, when the keys in use alone exceed it (eviction kept them), past
        // those by an eighth of the budget, so that a large working set is not written and
        // evicted after every batch. Or when the checkpoint's write batch, built in memory and
        // then copied whole into a memtable, would pass CHECKPOINT_WRITE_BYTES, or an eighth of
        // a larger budget (at 1M new actors a checkpoint forced by the cache alone wrote about
        // 50 MB; smaller ones cost a dense log, whose hot keys write a chunk each time,
        // throughput: an eighth of a small budget made them too small).
        let write_batch = CHECKPOINT_WRITE_BYTES.max(budget / 8);
        windows.since_checkpoint >= 1 << 18 || unsaved > write_batch || cached > limit
    }

    /// Writes the window state changed since the last checkpoint, the rows still waiting, the
    /// clock and the input it holds in one atomic write, then trims the in-memory cache.
    pub fn checkpoint(&self) -> Result<(), StateError> {
        let guard = self.guard_snapshot();
        self.checkpoint_with(&self.input_for_checkpoint(), guard)
    }

    /// [`Self::checkpoint`] of `input` ([`Self::input_for_checkpoint`]) with the guard state
    /// taken earlier by [`Self::guard_snapshot`], both from when the checkpoint began.
    pub fn checkpoint_with(&self, input: &Input, guard: Vec<u8>) -> Result<(), StateError> {
        self.checkpoint_to(input, guard, Write::Now)
    }

    /// [`Self::checkpoint`], its write to the store on a thread of its own while evaluation
    /// goes on (replay: the write is about half of a checkpoint's time on the thread that runs
    /// the detectors). The next checkpoint, and anything that reads the store's metadata, waits
    /// for it; a key the checkpoint deleted is read back, and keys are evicted, only after it.
    /// A write that failed is this call's error next time, or the next checkpoint's.
    pub fn checkpoint_behind(&self) -> Result<(), StateError> {
        let guard = self.guard_snapshot();
        self.checkpoint_to(&self.input_for_checkpoint(), guard, Write::Behind)
    }

    /// [`Self::checkpoint_with`], the checkpoint written to `log` first, then to the local
    /// store once the log holds it (see [`rampart_state::changelog`]).
    pub fn checkpoint_logged(
        &self,
        input: &Input,
        guard: Vec<u8>,
        log: &mut dyn ChangelogWriter,
    ) -> Result<(), StateError> {
        self.checkpoint_to(input, guard, Write::Logged(log))
    }

    /// [`Self::checkpoint_with`], its write on a thread of its own (see
    /// [`Self::checkpoint_logged_behind`]).
    pub fn checkpoint_with_behind(&self, input: &Input, guard: Vec<u8>) -> Result<(), StateError> {
        self.checkpoint_to(input, guard, Write::Behind)
    }

    /// Whether a checkpoint written behind is still being written.
    pub fn checkpoint_writing(&self) -> bool {
        self.lock().store.as_ref().is_some_and(StateStore::writing)
    }

    /// Waits until the checkpoint written behind, if any, is written; returns its error.
    pub fn settle_checkpoint(&self) -> Result<(), StateError> {
        match &self.lock().store {
            Some(store) => store.settle(),
            None => Ok(()),
        }
    }

    /// [`Self::checkpoint_logged`], its writes (the changelog, then the local store) on a
    /// thread of its own while evaluation goes on, as [`Self::checkpoint_behind`] writes: the
    /// windows wait only while the checkpoint is encoded. The next checkpoint waits for it; a
    /// write that failed is that checkpoint's error.
    pub fn checkpoint_logged_behind(
        &self,
        input: &Input,
        guard: Vec<u8>,
        log: Arc<Mutex<dyn ChangelogWriter + Send>>,
    ) -> Result<(), StateError> {
        self.checkpoint_to(input, guard, Write::LoggedBehind(log))
    }

    fn checkpoint_to(&self, input: &Input, guard: Vec<u8>, write: Write<'_>) -> Result<(), StateError> {
        let mut windows = self.lock();
        let windows = &mut *windows;
        windows.since_checkpoint = 0;
        let Some(store) = &windows.store else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        // The checkpoint before, if still being written, first (the windows forget which keys
        // it deleted).
        store.settle()?;
        // The windows' estimate, an eighth more for what it leaves out (deletions, expired
        // keys), and the metadata as large as last time.
        let unsaved: usize = windows.keyed.iter().map(|w| w.state.unsaved_bytes()).sum();
        let mut commit = store.commit(unsaved + unsaved / 8 + windows.meta_bytes);
        let bounds = bounds_of(&windows.clock);
        let saving = if self.is_persistent() {
            Saving::Changed
        } else {
            Saving::Evicted
        };
        for keyed in &mut windows.keyed {
            keyed.state.checkpoint(bounds, &mut commit, saving);
        }
        // A temporary state's keys are written as they are evicted: before the write.
        let budget = self.config.state_cache_bytes;
        if saving == Saving::Evicted {
            evict(&mut windows.keyed, budget, Some((bounds, &mut commit)));
        }
        let encoded = started.elapsed();
        let window_bytes = commit.bytes();
        let clock = StoredClock {
            newest: windows.clock.newest(),
            next_row: input.next_row,
            // Every batch decides the rows older than the watermark.
            decided_until: Some(windows.clock.watermark()),
            sources: windows
                .clock
                .sources()
                .iter()
                .filter(|s| s.newest > i64::MIN)
                .map(|s| (s.name.clone(), s.newest))
                .collect(),
        };
        commit.meta(
            "clock",
            Some(&serde_json::to_vec(&clock).expect("clock serialises")),
        );
        commit.meta("guard", Some(&guard));
        windows.triggers.save(&mut commit);
        if self.is_persistent() {
            commit.meta(
                "progress",
                Some(&serde_json::to_vec(&input.progress).expect("progress serialises")),
            );
        }
        let rows = commit.len();
        let bytes = commit.bytes();
        windows.meta_bytes = bytes - window_bytes;
        let before_write = started.elapsed();
        let behind = matches!(write, Write::Behind | Write::LoggedBehind(_));
        match write {
            Write::Logged(log) => {
                store.write_logged(commit, log, bounds.expiry_now())?;
            }
            Write::LoggedBehind(log) => store.write_logged_behind(commit, log, bounds.expiry_now())?,
            Write::Now => store.write(commit)?,
            Write::Behind => store.write_behind(commit, bounds.expiry_now())?,
        }
        tracing::debug!(
            rows,
            bytes,
            window_bytes,
            encode_ms = encoded.as_millis() as u64,
            meta_ms = (before_write - encoded).as_millis() as u64,
            write_ms = (started.elapsed() - before_write).as_millis() as u64,
            behind,
            cached = windows.keyed.iter().map(|w| w.state.cache_bytes()).sum::<usize>(),
            store_memory = store.memory_bytes(),
            watermark = clock.decided_until.unwrap_or(i64::MIN),
            sources = ?clock.sources,
            progress = ?input.progress.iter().map(|(s, p)| (s, p.next_offset)).collect::<Vec<_>>(),
            "checkpoint"
        );
        // Only now: a key read back for a row decided in this batch must not look expired (a
        // write behind advances it once written).
        if !behind {
            store.advance_clock(bounds.expiry_now());
        }
        let total: usize = windows.keyed.iter().map(|w| w.state.cache_bytes()).sum();
        windows.in_use = 0;
        if total > budget {
            if saving == Saving::Changed {
                // An evicted key is read back from the store: its latest changes must be there.
                store.settle()?;
                evict(&mut windows.keyed, budget, None);
            }
            windows.in_use = windows.keyed.iter().map(|w| w.state.cache_bytes()).sum();
            if windows.in_use > budget && !windows.warned_in_use {
                windows.warned_in_use = true;
                tracing::warn!(
                    in_use_mib = windows.in_use >> 20,
                    cache_mib = budget >> 20,
                    "the window keys the latest batches used take more memory than [state] cache_mb: \
                     they stay in memory (evicting them would read them back at once); raise cache_mb \
                     to match"
                );
            }
        }
        Ok(())
    }

    /// The windowed detectors that share one window state (same rows, key and aggregates'
    /// arguments; their frames' lengths and what is above the window may differ), by id, one
    /// list per shared state.
    pub fn shared_window_states(&self) -> Vec<Vec<String>> {
        let windowed = &self.detectors[self.per_event..];
        self.lock()
            .keyed
            .iter()
            .filter(|w| w.members.len() > 1)
            .map(|w| w.members.iter().map(|&i| windowed[i].meta.id.clone()).collect())
            .collect()
    }

    /// Window state figures: keys cached in memory, their bytes, rows waiting, bytes on disk.
    pub fn state_stats(&self) -> StateStats {
        let windows = self.lock();
        StateStats {
            cached_keys: windows.keyed.iter().map(|w| w.state.cached_keys()).sum(),
            cached_bytes: windows.keyed.iter().map(|w| w.state.cache_bytes()).sum(),
            waiting_rows: windows.keyed.iter().map(|w| w.state.waiting()).sum(),
            disk_bytes: windows.store.as_ref().map_or(0, StateStore::size_on_disk),
            store_memory_bytes: windows.store.as_ref().map_or(0, StateStore::memory_bytes),
        }
    }

    /// Flushes and compacts the state store (so its size on disk is the steady state).
    pub fn compact_state(&self) -> Result<(), StateError> {
        match &self.lock().store {
            Some(store) => store.compact(),
            None => Ok(()),
        }
    }
}

/// One budget for all window states: nothing is evicted while the total fits, and past it each
/// state gives up its share of the excess (busy states keep more). With `spill`, changed keys
/// are evicted too, written to the commit (see [`Saving::Evicted`]).
fn evict(keyed: &mut [SharedState], budget: usize, mut spill: Option<(Bounds, &mut Commit<'_>)>) {
    let total: usize = keyed.iter().map(|w| w.state.cache_bytes()).sum();
    if total <= budget {
        return;
    }
    for shared in keyed {
        let share = (shared.state.cache_bytes() as u128 * budget as u128 / total as u128) as usize;
        let spill = spill.as_mut().map(|(bounds, commit)| (*bounds, &mut **commit));
        shared.state.evict(share, spill);
    }
}
