//! Keyed window state of one windowed detector, and how its rows are decided.
//!
//! Per key (the window's PARTITION BY, or the GROUP BY with its `date_bin` bucket) the state
//! holds the rows of the detector's query below the window: only the rows that passed its
//! filters, only the columns it uses, in event-time order, encoded with Arrow's row format.
//! Hot keys live in a bounded cache; the rest is in RocksDB ([`StateStore`]).
//!
//! Sliding windows: each row is decided once, when the watermark passes it (every row of its
//! frames has arrived), over that key's rows within reach of it, so the value it sees is the
//! one the same SQL gives in batch over the whole input. Detectors whose condition only
//! becomes true as rows enter the frame ([`rampart_sql::Timing::AtOnce`]) also look at a row
//! as soon as every row of its own time has arrived (for input in event-time order per source:
//! once each source has a later time): if the condition holds on what has arrived, it holds
//! over the whole input too, and the row fires then, once. Rows that do not fire yet wait for
//! the watermark, and are looked at again if a row arrives into their frames meanwhile.
//!
//! Grouped windows: a group fires once, at the first event after which its HAVING holds (found
//! by evaluating prefixes of the batch's new rows), and then keeps no rows until its bucket
//! has passed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, TimestampMicrosecondArray, UInt64Array};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use serde::{Deserialize, Serialize};

use rampart_core::Decision;
use rampart_sql::{CompiledDetector, DetectorEngine, StateKind, WindowAggregate, WindowSplit};

use crate::decide::DecisionMaker;
use crate::decide::triggers::TriggerStore;
use crate::windows::incremental::{Due, KeyAgg, KeyChunks, Val, heap};
use rampart_state::codec::{
    FIRED, FIRED_CHUNK, FRAME_CHUNK, INCREMENTAL, PENDING_CHUNK, ROW_HEADER, StoredRow, chunk_key,
    chunk_prefix, expires_at, flags, push_row, row_key, rows_of, set_header, split_chunk_key,
};
use rampart_state::{Commit, StateError, StateStore};
use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};

/// Where event time stands for deciding window rows (see [`rampart_core::EventClock`]).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Rows older than this have all the rows of their frames: they are decided for good.
    pub watermark: i64,
    /// Rows older than this have all their peers (in-order input): detectors whose condition
    /// only becomes true decide them at once.
    pub complete: i64,
    /// The allowed lateness (µs).
    pub lateness: i64,
}

impl Bounds {
    /// The time a key's expiry (newest row + reach + lateness) is compared with: a key that
    /// expired before it has no row any undecided row's frame reaches.
    pub fn expiry_now(&self) -> i64 {
        self.watermark.saturating_add(self.lateness)
    }
}

struct Entry {
    /// The stored value (rows, or a fired group's header); for incremental detectors only
    /// the header, the rest being `agg`.
    value: Vec<u8>,
    dirty: bool,
    /// Incremental sliding windows: the key's frames and accumulators.
    /// (Boxed: the cache's slots stay small, and keep their capacity after evictions.)
    agg: Option<Box<KeyAgg>>,
    /// When it was last used ([`KeyedState::tick`]): eviction drops the least recent first.
    used: u64,
}

impl Entry {
    /// Heap bytes: the cache slot (at hashbrown's load factor), the boxed key, the value, the
    /// aggregates, and for a key with rows waiting its entry in `due` (a B-tree slot and a
    /// copy of the key).
    fn bytes(&self, key: &[u8]) -> usize {
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

/// A row waiting to be decided (or, for incremental windows, a key with such rows and the
/// oldest one's time), as persisted across restarts.
#[derive(Serialize, Deserialize)]
struct PendingRow {
    time: i64,
    row: u64,
    key: String,
    /// The detector fired on it at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    fired: bool,
}

/// A row of a re-run window waiting to be decided.
struct Rerun {
    key: Box<[u8]>,
    /// The detector fired on it at once.
    fired: bool,
    /// Its answer is known from rows that are all its frames' (no row arrived into them since
    /// it was looked at).
    settled: bool,
}

/// The state of one window: one windowed detector's, or that of several with the same window
/// (see [`WindowSplit::state_identity`]).
pub struct KeyedState {
    /// Store key prefix: for an incremental sliding window, a hash of its state's identity (so
    /// detectors with the same window share it, and a detector whose window changed starts
    /// afresh); otherwise the detector's id and version (so a changed detector starts afresh).
    tag: Vec<u8>,
    key_converter: Option<RowConverter>,
    row_converter: RowConverter,
    cache: FxHashMap<Box<[u8]>, Entry>,
    cache_bytes: usize,
    /// Sliding windows re-run per key: rows not yet decided, by (time, row id), with their key.
    pending: BTreeMap<(i64, u64), Rerun>,
    /// Sliding windows re-run per key: per key with rows looked at before the watermark, the
    /// newest of them (a row arriving at or before it changes their frames).
    looked_at: FxHashMap<Box<[u8]>, i64>,
    /// Incremental sliding windows: the keys with rows not decided yet, by their oldest.
    due: BTreeSet<(i64, Box<[u8]>)>,
    /// Incremental sliding windows with detectors deciding at once: the keys with rows to look
    /// at, by the oldest.
    early: BTreeSet<(i64, Box<[u8]>)>,
    /// The detectors reading this state, by stable tag (their bit is their position).
    tags: Vec<u64>,
    /// The detectors (bits) that decide at once.
    at_once: u32,
    /// Incremental sliding windows: the aggregates (see [`crate::windows::incremental`]).
    aggregates: Option<Vec<WindowAggregate>>,
    /// Incremental sliding windows: every row older than this was decided.
    decided_until: i64,
    /// The windows' reach (µs).
    reach: i64,
    /// The pipeline's allowed lateness (µs).
    lateness: i64,
    /// Counts batches, to know which cached keys were used recently.
    tick: u64,
    /// About how many bytes the next checkpoint writes (see [`Self::unsaved_bytes`]).
    unsaved_bytes: usize,
}

/// Rows to judge: the keys, each row with its key's index, and the rows' columns (`pre`'s, then
/// the window values).
type JudgedRows = (Vec<Box<[u8]>>, Vec<(usize, Due)>, Vec<ArrayRef>);

/// Rows of one batch for one key.
type NewRows = Vec<(i64, u64, Vec<u8>)>;

/// Eviction keeps the keys used by this many of the latest batches.
const RECENT_BATCHES: u64 = 2;

/// One detector's decisions on a batch, with the rows they are for, or why it failed.
pub type Decided = Result<Vec<(u64, Decision)>, String>;

/// Keys that got rows in a batch, with how many.
pub type Touched = Vec<(Box<[u8]>, usize)>;

impl KeyedState {
    /// Empty state for `detector` (windowed); `identity` is its split's
    /// [`WindowSplit::state_identity`], computed once by the caller.
    pub fn new(
        detector: &CompiledDetector,
        split: &WindowSplit,
        identity: Option<&str>,
        lateness: i64,
    ) -> Result<Self, String> {
        let fields = |types: Vec<datafusion::arrow::datatypes::DataType>| {
            types.into_iter().map(SortField::new).collect::<Vec<_>>()
        };
        let key_types = split
            .keys
            .iter()
            .map(|k| k.data_type(&split.pre_schema))
            .collect::<datafusion::common::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let key_converter = if key_types.is_empty() {
            None
        } else {
            Some(RowConverter::new(fields(key_types)).map_err(|e| e.to_string())?)
        };
        let row_types = split
            .pre_schema
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let row_converter = RowConverter::new(fields(row_types)).map_err(|e| e.to_string())?;
        let mut tag = match identity {
            // Shared by detectors with the same window (see `state_identity`).
            Some(identity) => format!(
                "window/{}",
                &hex::encode(Sha256::digest(identity.as_bytes()))[..32]
            ),
            None => format!("{}@{}", detector.meta.id, detector.version),
        }
        .into_bytes();
        tag.push(0);
        Ok(Self {
            tag,
            key_converter,
            row_converter,
            cache: FxHashMap::default(),
            cache_bytes: 0,
            pending: BTreeMap::new(),
            looked_at: FxHashMap::default(),
            due: BTreeSet::new(),
            early: BTreeSet::new(),
            tags: Vec::new(),
            at_once: 0,
            aggregates: split.incremental.as_ref().map(|i| i.aggregates.clone()),
            decided_until: i64::MIN,
            reach: micros(split.reach),
            lateness,
            tick: 0,
            unsaved_bytes: 0,
        })
    }

    /// The detectors reading this state, in order: their stable tags (see [`detector_tag`]) and
    /// whether each decides at once. At most 32.
    pub fn set_members(&mut self, members: &[&CompiledDetector]) {
        self.tags = members.iter().map(|d| detector_tag(d)).collect();
        self.at_once = members
            .iter()
            .enumerate()
            .filter(|(_, d)| d.split().is_some_and(|s| s.timing == rampart_sql::Timing::AtOnce))
            .fold(0, |bits, (i, _)| bits | 1 << i);
    }

    fn all_members(&self) -> u32 {
        (1u64 << self.tags.len().max(1)).wrapping_sub(1) as u32
    }

    /// How long after its newest row a key's rows may still be in a frame (µs): the windows'
    /// reach plus the allowed lateness.
    fn horizon(&self) -> i64 {
        self.reach.saturating_add(self.lateness)
    }

    fn pending_meta_key(&self) -> String {
        format!(
            "pending/{}",
            String::from_utf8_lossy(&self.tag[..self.tag.len() - 1])
        )
    }

    /// Restores the rows that were waiting when the state was last written (for incremental
    /// windows: the keys with pending rows not older than `decided_until`).
    pub fn restore(&mut self, store: &StateStore, decided_until: i64) -> Result<(), StateError> {
        if self.aggregates.is_some() {
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

    fn entry(&mut self, store: &StateStore, key: &[u8]) -> Result<&mut Entry, StateError> {
        if !self.cache.contains_key(key) {
            let (value, agg) = match &self.aggregates {
                Some(aggregates) => {
                    let chunks = |kind| -> Result<Vec<(u64, Vec<u8>)>, StateError> {
                        Ok(store
                            .key_chunks(&chunk_prefix(&self.tag, kind, key))?
                            .into_iter()
                            .filter_map(|(k, v)| Some((split_chunk_key(&self.tag, kind, &k)?.1, v)))
                            .collect())
                    };
                    let frame = chunks(FRAME_CHUNK)?;
                    // Pending rows are frame rows too: with none as new as `decided_until`,
                    // there are none to read.
                    let newest = frame.iter().map(|(_, v)| expires_at(v)).max().unwrap_or(i64::MIN);
                    let undecided = newest.saturating_sub(self.horizon()) >= self.decided_until;
                    let stored = if undecided {
                        KeyChunks {
                            frame,
                            pending: chunks(PENDING_CHUNK)?,
                            fired: if self.at_once != 0 {
                                chunks(FIRED_CHUNK)?
                            } else {
                                Vec::new()
                            },
                        }
                    } else {
                        KeyChunks {
                            frame,
                            ..KeyChunks::default()
                        }
                    };
                    let agg = KeyAgg::load(aggregates, &stored, &self.tags, self.decided_until).ok_or_else(
                        || {
                            store.corrupt(
                                format_args!("window state of key {}", hex::encode(key)),
                                "does not decode",
                            )
                        },
                    )?;
                    let mut value = Vec::new();
                    let expires = agg
                        .newest()
                        .map_or(i64::MIN, |n| n.saturating_add(self.horizon()));
                    set_header(&mut value, expires, INCREMENTAL);
                    (value, Some(Box::new(agg)))
                }
                None => (store.get(&row_key(&self.tag, key))?.unwrap_or_default(), None),
            };
            let entry = Entry {
                value,
                dirty: false,
                agg,
                used: 0,
            };
            self.cache_bytes += entry.bytes(key);
            self.cache.insert(key.into(), entry);
        }
        let entry = self.cache.get_mut(key).expect("inserted above");
        entry.used = self.tick;
        Ok(entry)
    }

    /// Incremental sliding windows: adds a batch's rows to their keys' frames.
    fn add_incremental(
        &mut self,
        split: &WindowSplit,
        store: &StateStore,
        pre: &[RecordBatch],
    ) -> Result<(), String> {
        let aggregates = self.aggregates.clone().unwrap_or_default();
        let horizon = self.horizon();
        let tag_len = self.tag.len();
        let at_once = self.at_once;
        for batch in pre {
            let n = batch.num_rows();
            if n == 0 {
                continue;
            }
            let keys = self.keys_of(split, batch)?;
            let mut args = aggregates
                .iter()
                .map(|a| match &a.argument {
                    Some(arg) => arg
                        .evaluate(batch)
                        .and_then(|v| v.into_array(n))
                        .map_err(|e| e.to_string())
                        .and_then(|a| Val::column(&a)),
                    None => Ok(vec![Val::Null; n]),
                })
                .collect::<Result<Vec<_>, String>>()?;
            let rows = self
                .row_converter
                .convert_columns(batch.columns())
                .map_err(|e| e.to_string())?;
            let times = column::<TimestampMicrosecondArray>(batch, split.time_index)?;
            let ids = column::<UInt64Array>(batch, split.row_index)?;
            // One cache lookup per key and batch.
            let mut by_key: FxHashMap<&[u8], Vec<usize>> = FxHashMap::default();
            for i in (0..n).filter(|i| !times.is_null(*i)) {
                let key: &[u8] = keys.as_ref().map_or(&[], |k| k.row(i).data());
                by_key.entry(key).or_default().push(i);
            }
            // A row's share of its key's buffers (time, values, pending entry, fresh entry),
            // with the slack of their growth.
            let row_bytes = (8 + aggregates.len() * std::mem::size_of::<Val>() + 32 + 16) * 3 / 2;
            for (key, indices) in by_key {
                // Counted as rows arrive; checkpoints recount exactly.
                let mut added = 0;
                let entry = self.entry(store, key).map_err(|e| e.to_string())?;
                let agg = entry.agg.as_mut().expect("incremental entries have aggregates");
                let oldest_before = agg.oldest_pending();
                let early_before = (at_once != 0).then(|| agg.oldest_unsettled(at_once)).flatten();
                // Written at the next checkpoint: a frame and a pending chunk (each a store
                // key of the tag, the key and an id, and RocksDB's own framing)...
                let mut unsaved = if entry.dirty {
                    0
                } else {
                    2 * (tag_len + key.len() + 32)
                };
                for i in indices {
                    let values: Vec<Val> = args
                        .iter_mut()
                        .map(|a| std::mem::replace(&mut a[i], Val::Null))
                        .collect();
                    let row = rows.row(i);
                    added += row_bytes
                        + heap(row.as_ref().len())
                        + values.iter().map(Val::heap_bytes).sum::<usize>();
                    // ...and per row its time, order and arguments in the one, its time, id
                    // and `pre` columns in the other.
                    unsaved += 16 + aggregates.len() * 9 + 20 + row.as_ref().len();
                    agg.insert(times.value(i), ids.value(i), values, row.as_ref().into());
                }
                let oldest = agg.oldest_pending();
                let early = (at_once != 0).then(|| agg.oldest_unsettled(at_once)).flatten();
                let newest = agg.newest().unwrap_or(i64::MIN);
                set_header(&mut entry.value, newest.saturating_add(horizon), INCREMENTAL);
                entry.dirty = true;
                self.cache_bytes += added;
                self.unsaved_bytes += unsaved;
                reindex(&mut self.due, key, oldest_before, oldest);
                reindex(&mut self.early, key, early_before, early);
            }
        }
        Ok(())
    }

    fn keys_of(
        &self,
        split: &WindowSplit,
        batch: &RecordBatch,
    ) -> Result<Option<datafusion::arrow::row::Rows>, String> {
        let Some(converter) = &self.key_converter else {
            return Ok(None);
        };
        let n = batch.num_rows();
        let columns = split
            .keys
            .iter()
            .map(|k| k.evaluate(batch).and_then(|v| v.into_array(n)))
            .collect::<datafusion::common::Result<Vec<ArrayRef>>>()
            .map_err(|e| e.to_string())?;
        converter
            .convert_columns(&columns)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// Incremental sliding windows: decides the rows older than the watermark (all at the end
    /// of the input) for good, and looks at the rows older than the completeness bound for the
    /// members that decide at once; key by key, in time order, moving each key's frames
    /// forward, then runs each member detector's part above the window over the rows it has to
    /// judge (one result per member).
    fn decide_incremental(
        &mut self,
        members: &[&CompiledDetector],
        ctx: &DecideContext<'_>,
        all: bool,
    ) -> Vec<Decided> {
        let watermark = (!all).then_some(ctx.bounds.watermark);
        let first = members.first().and_then(|d| d.split()?.incremental.as_ref());
        let aggregates = first.map_or(&[][..], |plan| &plan.aggregates);
        let decided = match self.decide_due(aggregates, ctx, watermark) {
            Ok(Some(judged)) => members
                .iter()
                .enumerate()
                .map(|(m, detector)| self.run_member(detector, 1 << m, &judged, ctx))
                .collect(),
            Ok(None) => members.iter().map(|_| Ok(Vec::new())).collect(),
            Err(e) => members.iter().map(|_| Err(e.clone())).collect(),
        };
        // Only now: keys read back from disk while deciding had their rows up to the old
        // limit decided, no further. (Deciding everything at the end of the input leaves
        // it: on disk those rows stay pending, and a later run decides them again, with the
        // same ids.)
        if let Some(limit) = watermark {
            self.decided_until = self.decided_until.max(limit);
        }
        decided
    }

    /// One member's part above the window over the rows it has to judge (`bit` set in their
    /// `members`); rows it fires on before the watermark are marked fired in their keys.
    fn run_member(
        &mut self,
        detector: &CompiledDetector,
        bit: u32,
        (keys, due, columns): &JudgedRows,
        ctx: &DecideContext<'_>,
    ) -> Decided {
        let wanted: Vec<bool> = due.iter().map(|(_, d)| d.members & bit != 0).collect();
        if !wanted.contains(&true) {
            return Ok(Vec::new());
        }
        let split = detector.split().expect("windowed detectors have a split");
        let plan = split.incremental.as_ref().expect("incremental detector");
        // (The members' window columns may be named differently.)
        let mut rows = RecordBatch::try_new(Arc::clone(&plan.above_input), columns.to_vec())
            .map_err(|e| e.to_string())?;
        if wanted.contains(&false) {
            let mask = datafusion::arrow::array::BooleanArray::from(wanted);
            rows =
                datafusion::arrow::compute::filter_record_batch(&rows, &mask).map_err(|e| e.to_string())?;
        }
        let results = ctx.engine.run_above(plan, rows).map_err(|e| e.to_string())?;
        let decided = self.decisions_for(detector, &results, |_| true, ctx);
        // Rows that fired before the watermark: once only. (Most batches fire on none.)
        if decided.is_empty() {
            return Ok(decided);
        }
        let early: HashMap<u64, &(usize, Due)> = due
            .iter()
            .filter(|(_, d)| !d.last && d.members & bit != 0)
            .map(|entry| (entry.1.row, entry))
            .collect();
        if !early.is_empty() {
            let tag = self
                .tags
                .get(bit.trailing_zeros() as usize)
                .copied()
                .unwrap_or_default();
            for (row, _) in &decided {
                if let Some((k, d)) = early.get(row)
                    && let Some(entry) = self.cache.get_mut(&keys[*k])
                    && let Some(agg) = entry.agg.as_mut()
                {
                    agg.mark_fired(d.time, d.row, bit, tag);
                    entry.dirty = true;
                }
            }
        }
        Ok(decided)
    }

    /// [`Self::decide_incremental`] for the keys with rows older than the watermark or, for the
    /// members that decide at once, older than the completeness bound: the rows to judge (with
    /// their key's index in `due_keys`), and their columns (`pre`'s, then the window values);
    /// `None`: no row to judge. `aggregates` are the window's (every member has the same).
    fn decide_due(
        &mut self,
        aggregates: &[WindowAggregate],
        ctx: &DecideContext<'_>,
        watermark: Option<i64>,
    ) -> Result<Option<JudgedRows>, String> {
        let at_once = if watermark.is_some() { self.at_once } else { 0 };
        let complete = ctx.bounds.complete;
        // The keys taken out of each index (they go back in with their new times).
        let mut taken: FxHashMap<Box<[u8]>, (bool, bool)> = FxHashMap::default();
        match watermark {
            Some(limit) => {
                let later = self.due.split_off(&(limit, Box::from([])));
                for (_, k) in std::mem::replace(&mut self.due, later) {
                    taken.entry(k).or_default().0 = true;
                }
                if at_once != 0 {
                    let later = self.early.split_off(&(complete, Box::from([])));
                    for (_, k) in std::mem::replace(&mut self.early, later) {
                        taken.entry(k).or_default().1 = true;
                    }
                }
            }
            None => {
                self.early.clear();
                for (_, k) in std::mem::take(&mut self.due) {
                    taken.entry(k).or_default().0 = true;
                }
            }
        }
        if taken.is_empty() {
            return Ok(None);
        }
        let (members, hold) = (self.all_members(), self.all_members() & !self.at_once != 0);
        let mut due: Vec<(usize, Due)> = Vec::new();
        let mut due_keys = Vec::with_capacity(taken.len());
        for (k, (key, (from_due, from_early))) in taken.into_iter().enumerate() {
            let entry = self.entry(ctx.store, &key).map_err(|e| e.to_string())?;
            let agg = entry.agg.as_mut().expect("incremental entries have aggregates");
            let before = (agg.oldest_pending(), agg.oldest_unsettled(at_once));
            let rows = agg.decide(aggregates, watermark, complete, members, at_once, hold);
            let after = (
                agg.oldest_pending(),
                (at_once != 0).then(|| agg.oldest_unsettled(at_once)).flatten(),
            );
            entry.dirty = true;
            due.extend(rows.into_iter().map(|d| (k, d)));
            // A key taken out of an index goes back at its new time; one still in it moves.
            for (index, taken_out, before, after) in [
                (&mut self.due, from_due, before.0, after.0),
                (&mut self.early, from_early, before.1, after.1),
            ] {
                if taken_out {
                    if let Some(t) = after {
                        index.insert((t, key.clone()));
                    }
                } else {
                    reindex(index, &key, before, after);
                }
            }
            due_keys.push(key);
        }
        if due.is_empty() {
            return Ok(None);
        }
        let parser = self.row_converter.parser();
        let mut columns = self
            .row_converter
            .convert_rows(due.iter().map(|(_, d)| parser.parse(&d.bytes)))
            .map_err(|e| e.to_string())?;
        for (i, a) in aggregates.iter().enumerate() {
            let values: Vec<Val> = due
                .iter()
                .map(|(_, d)| d.values.get(i).cloned().unwrap_or_default())
                .collect();
            columns.push(Val::array(&values, &a.output)?);
        }
        Ok(Some((due_keys, due, columns)))
    }

    /// Decisions for the result rows `wanted` accepts.
    fn decisions_for(
        &self,
        detector: &CompiledDetector,
        results: &[RecordBatch],
        wanted: impl Fn(u64) -> bool,
        ctx: &DecideContext<'_>,
    ) -> Vec<(u64, Decision)> {
        let mut out = Vec::new();
        for result in results {
            let Some(ids) = DecisionMaker::row_ids(detector, result) else {
                continue;
            };
            for r in 0..result.num_rows() {
                let row = ids.value(r);
                if !wanted(row) {
                    continue;
                }
                let Some(trigger) = ctx.triggers.get(row) else {
                    continue;
                };
                out.push((
                    row,
                    ctx.decisions
                        .decide_row(detector, result, r, &trigger, ctx.processed_at),
                ));
            }
        }
        out
    }

    /// Adds the rows `pre` produced for a batch. Returns the keys that got rows,
    /// with how many (grouped windows decide those keys).
    /// `before` is the watermark before the batch: rows no frame still due can reach are
    /// dropped.
    pub fn add(
        &mut self,
        split: &WindowSplit,
        store: &StateStore,
        before: i64,
        pre: &[RecordBatch],
    ) -> Result<Touched, String> {
        self.tick += 1;
        if self.aggregates.is_some() {
            self.add_incremental(split, store, pre)?;
            return Ok(Vec::new());
        }
        let mut by_key: HashMap<Box<[u8]>, NewRows> = HashMap::new();
        for batch in pre {
            let n = batch.num_rows();
            if n == 0 {
                continue;
            }
            let keys = self.keys_of(split, batch)?;
            let rows = self
                .row_converter
                .convert_columns(batch.columns())
                .map_err(|e| e.to_string())?;
            let times = column::<TimestampMicrosecondArray>(batch, split.time_index)?;
            let ids = column::<UInt64Array>(batch, split.row_index)?;
            for i in 0..n {
                if times.is_null(i) {
                    continue;
                }
                let key: Box<[u8]> = keys
                    .as_ref()
                    .map_or_else(|| Box::from([]), |k| k.row(i).as_ref().into());
                by_key.entry(key).or_default().push((
                    times.value(i),
                    ids.value(i),
                    rows.row(i).as_ref().to_vec(),
                ));
            }
        }
        let keep_from = before.saturating_sub(micros(split.reach));
        let horizon = self.horizon();
        let mut touched = Vec::with_capacity(by_key.len());
        for (key, mut new) in by_key {
            new.sort_by_key(|(t, r, _)| (*t, *r));
            if split.kind == StateKind::Sliding {
                // A row at or before one looked at already changes its frames: look again.
                if let (Some(&seen), Some((first, _, _))) = (self.looked_at.get(&key), new.first())
                    && *first <= seen
                {
                    for (_, waiting) in self.pending.range_mut((*first, 0)..) {
                        if waiting.key == key && !waiting.fired {
                            waiting.settled = false;
                        }
                    }
                }
                for (t, r, _) in &new {
                    self.pending.insert(
                        (*t, *r),
                        Rerun {
                            key: key.clone(),
                            fired: false,
                            settled: false,
                        },
                    );
                }
            }
            let entry = self.entry(store, &key).map_err(|e| e.to_string())?;
            if flags(&entry.value) & FIRED != 0 {
                continue;
            }
            let before = entry.value.capacity();
            let mut merged = Vec::with_capacity(
                entry.value.len() + new.iter().map(|n| n.2.len() + ROW_HEADER).sum::<usize>(),
            );
            set_header(&mut merged, 0, 0);
            let mut old = rows_of(&entry.value)
                .filter(|r| split.kind == StateKind::Grouped || r.time >= keep_from)
                .peekable();
            let mut fresh = new.iter().peekable();
            loop {
                let take_old = match (old.peek(), fresh.peek()) {
                    (Some(o), Some(f)) => (o.time, o.row) <= (f.0, f.1),
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                if take_old {
                    push_row(&mut merged, old.next().expect("peeked"));
                } else {
                    let (time, row, bytes) = fresh.next().expect("peeked");
                    push_row(
                        &mut merged,
                        StoredRow {
                            time: *time,
                            row: *row,
                            bytes,
                        },
                    );
                }
            }
            drop(old);
            let newest = rows_of(&merged).last().map_or(i64::MIN, |r| r.time);
            set_header(&mut merged, newest.saturating_add(horizon), 0);
            entry.value = merged;
            entry.dirty = true;
            let after = entry.value.capacity();
            // (A dirty key is written whole; counted again if it changes again.)
            let unsaved = entry.value.len() + key.len() + 32;
            self.cache_bytes = (self.cache_bytes + after).saturating_sub(before);
            self.unsaved_bytes += unsaved;
            touched.push((key, new.len()));
        }
        Ok(touched)
    }

    /// Sliding windows: decides every waiting row older than the watermark (all of them when
    /// `all`, at the end of the input).
    /// One result per member detector (`members` share this state: only incremental windows
    /// have more than one, see [`WindowSplit::state_identity`]).
    pub fn decide_sliding(
        &mut self,
        members: &[&CompiledDetector],
        ctx: &DecideContext<'_>,
        all: bool,
    ) -> Vec<Decided> {
        if self.aggregates.is_some() {
            return self.decide_incremental(members, ctx, all);
        }
        debug_assert_eq!(members.len(), 1, "a re-run window's state is its detector's own");
        members
            .iter()
            .map(|detector| {
                let split = detector.split().expect("windowed detectors have a split");
                self.decide_rerun(detector, split, ctx, all)
            })
            .collect()
    }

    /// [`Self::decide_sliding`] for a window re-run over its key's rows: the rows older than
    /// the watermark for good, and, for a detector that decides at once, the rows older than
    /// the completeness bound not looked at yet.
    fn decide_rerun(
        &mut self,
        detector: &CompiledDetector,
        split: &WindowSplit,
        ctx: &DecideContext<'_>,
        all: bool,
    ) -> Decided {
        let at_once = !all && split.timing == rampart_sql::Timing::AtOnce;
        let mut due = if all {
            std::mem::take(&mut self.pending)
        } else {
            let later = self.pending.split_off(&(ctx.bounds.watermark, 0));
            std::mem::replace(&mut self.pending, later)
        };
        // What fired at once is decided; at once, a settled row's answer is known.
        due.retain(|_, r| !(r.fired || at_once && r.settled));
        let early: Vec<(i64, u64)> = if at_once {
            self.pending
                .range(..(ctx.bounds.complete, 0))
                .filter(|(_, r)| !r.settled)
                .map(|(k, _)| *k)
                .collect()
        } else {
            Vec::new()
        };
        if !all {
            self.looked_at.retain(|_, seen| *seen >= ctx.bounds.watermark);
        }
        if due.is_empty() && early.is_empty() {
            return Ok(Vec::new());
        }
        // Per key: the time span of its rows to judge.
        let mut spans: HashMap<Box<[u8]>, (i64, i64)> = HashMap::new();
        let judged = due
            .iter()
            .map(|(k, r)| (*k, &r.key))
            .chain(early.iter().map(|k| (*k, &self.pending[k].key)));
        for ((t, _), key) in judged {
            let span = spans.entry(key.clone()).or_insert((t, t));
            span.0 = span.0.min(t);
            span.1 = span.1.max(t);
        }
        let keys: Vec<_> = spans.into_iter().collect();
        for (key, _) in &keys {
            self.entry(ctx.store, key).map_err(|e| e.to_string())?;
        }
        let reach = micros(split.reach);
        let parser = self.row_converter.parser();
        let mut input = Vec::new();
        for (key, (from, to)) in &keys {
            let entry = self.cache.get(key).expect("loaded above");
            input.extend(
                rows_of(&entry.value)
                    .filter(|r| r.time >= from.saturating_sub(reach) && r.time <= *to)
                    .map(|r| parser.parse(r.bytes)),
            );
        }
        let judged_rows: HashSet<u64> = due.keys().chain(&early).map(|(_, r)| *r).collect();
        let decided = self.run(detector, split, &input, |row| judged_rows.contains(&row), ctx)?;
        drop(input);
        if !early.is_empty() {
            let fired: HashSet<u64> = decided.iter().map(|(row, _)| *row).collect();
            for k in &early {
                let Some(waiting) = self.pending.get_mut(k) else {
                    continue;
                };
                waiting.settled = true;
                waiting.fired = fired.contains(&k.1);
                let seen = self.looked_at.entry(waiting.key.clone()).or_insert(k.0);
                *seen = (*seen).max(k.0);
            }
        }
        Ok(decided)
    }

    /// Runs the window part over `input` rows and decides the result rows `wanted` accepts.
    fn run(
        &self,
        detector: &CompiledDetector,
        split: &WindowSplit,
        input: &[datafusion::arrow::row::Row<'_>],
        wanted: impl Fn(u64) -> bool,
        ctx: &DecideContext<'_>,
    ) -> Result<Vec<(u64, Decision)>, String> {
        let results = self.post(ctx.engine, split, input)?;
        Ok(self.decisions_for(detector, &results, wanted, ctx))
    }

    fn post(
        &self,
        engine: &DetectorEngine,
        split: &WindowSplit,
        input: &[datafusion::arrow::row::Row<'_>],
    ) -> Result<Vec<RecordBatch>, String> {
        if input.is_empty() {
            return Ok(Vec::new());
        }
        let columns = self
            .row_converter
            .convert_rows(input.iter().copied())
            .map_err(|e| e.to_string())?;
        let batch =
            RecordBatch::try_new(Arc::clone(&split.pre_schema), columns).map_err(|e| e.to_string())?;
        engine.run_post(split, &[batch]).map_err(|e| e.to_string())
    }

    /// Grouped windows: fires the groups in `touched` whose HAVING now holds, each at the first
    /// of this batch's events after which it holds, and marks them fired.
    pub fn decide_grouped(
        &mut self,
        detector: &CompiledDetector,
        split: &WindowSplit,
        ctx: &DecideContext<'_>,
        touched: Touched,
    ) -> Decided {
        let Some(events) = ctx.events else {
            return Ok(Vec::new());
        };
        let parser = self.row_converter.parser();
        // The newest row of each touched group: the row id its result row carries.
        let mut group_of_row: HashMap<u64, usize> = HashMap::new();
        let mut input = Vec::new();
        for (g, (key, _)) in touched.iter().enumerate() {
            let Some(entry) = self.cache.get(key) else {
                continue;
            };
            if flags(&entry.value) & FIRED != 0 {
                continue;
            }
            let mut newest = None;
            for r in rows_of(&entry.value) {
                input.push(parser.parse(r.bytes));
                newest = newest.max(Some(r.row));
            }
            if let Some(row) = newest {
                group_of_row.insert(row, g);
            }
        }
        let results = self.post(ctx.engine, split, &input)?;
        let mut satisfied: Vec<usize> = Vec::new();
        for result in &results {
            let Some(ids) = DecisionMaker::row_ids(detector, result) else {
                continue;
            };
            satisfied.extend((0..result.num_rows()).filter_map(|r| group_of_row.get(&ids.value(r)).copied()));
        }
        satisfied.sort_unstable();
        satisfied.dedup();
        let mut out = Vec::new();
        for &g in &satisfied {
            let entry = self.cache.get(&touched[g].0).expect("touched keys are cached");
            let mut by_arrival: Vec<StoredRow<'_>> = rows_of(&entry.value).collect();
            by_arrival.sort_by_key(|r| r.row);
            let new = by_arrival
                .iter()
                .filter(|r| events.index_of(r.row).is_some())
                .count();
            let old = by_arrival.len() - new;
            let prefix = |n: usize| -> Vec<_> {
                by_arrival[..old + n]
                    .iter()
                    .map(|r| parser.parse(r.bytes))
                    .collect()
            };
            // The smallest prefix of this batch's rows (in input order) after which HAVING
            // holds: it holds with all of them, so search 1..=new.
            let (mut lo, mut hi) = (1, new.max(1));
            while lo < hi {
                let mid = (lo + hi) / 2;
                let fires = self
                    .post(ctx.engine, split, &prefix(mid))?
                    .iter()
                    .any(|b| b.num_rows() > 0);
                if fires {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            let last = by_arrival[old + lo - 1].row;
            out.extend(self.run(detector, split, &prefix(lo), |row| row == last, ctx)?);
        }
        // Fired groups keep only their header (the expiry) until the bucket has passed.
        for g in satisfied {
            let entry = self.entry(ctx.store, &touched[g].0).map_err(|e| e.to_string())?;
            let expires = expires_at(&entry.value);
            let before = entry.value.capacity();
            entry.value = Vec::new();
            set_header(&mut entry.value, expires, FIRED);
            entry.dirty = true;
            self.cache_bytes = self.cache_bytes.saturating_sub(before);
        }
        Ok(out)
    }

    /// Adds the changed keys and the waiting rows to `commit`; expired keys are deleted.
    pub fn checkpoint(&mut self, bounds: Bounds, commit: &mut Commit<'_>) {
        self.unsaved_bytes = 0;
        let now = bounds.expiry_now();
        let mut expired = Vec::new();
        let mut bytes = 0;
        let horizon = self.horizon();
        for (key, entry) in &mut self.cache {
            let gone = expires_at(&entry.value) < now || entry.agg.as_ref().is_some_and(|a| a.is_empty());
            if let Some(agg) = &mut entry.agg {
                if entry.dirty || gone {
                    if gone {
                        agg.clear();
                    }
                    let tag = &self.tag;
                    let chunk_key = |kind: u8, id: u64| chunk_key(tag, kind, key, id);
                    agg.save(chunk_key, self.decided_until, horizon, bounds.lateness, commit);
                    entry.dirty = false;
                }
            } else if entry.dirty {
                commit.row(
                    &row_key(&self.tag, key),
                    (!gone).then_some(entry.value.as_slice()),
                );
                entry.dirty = false;
            }
            if gone {
                expired.push(key.clone());
            } else {
                bytes += entry.bytes(key);
            }
        }
        for key in expired {
            self.cache.remove(&key);
        }
        self.cache_bytes = bytes;
        if self.aggregates.is_some() {
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

    /// Drops clean cached keys until the cache holds at most `budget` bytes.
    /// Least recently used first, down to half the budget (so that eviction is rare). Keys the
    /// last [`RECENT_BATCHES`] batches used stay (evicting them would read them back at once),
    /// unless `budget` is 0 (no cache: every key is read back each time).
    pub fn evict(&mut self, budget: usize) {
        if self.cache_bytes <= budget {
            return;
        }
        let recent = if budget == 0 {
            u64::MAX
        } else {
            self.tick.saturating_sub(RECENT_BATCHES - 1)
        };
        let mut clean: Vec<(u64, usize, &Box<[u8]>)> = self
            .cache
            .iter()
            .filter(|(_, e)| !e.dirty && e.used < recent)
            .map(|(k, e)| (e.used, e.bytes(k), k))
            .collect();
        clean.sort_unstable_by_key(|(used, _, _)| *used);
        let excess = self.cache_bytes - budget / 2;
        let mut freed = 0;
        let mut drop = Vec::new();
        for (_, bytes, key) in clean {
            if freed >= excess {
                break;
            }
            freed += bytes;
            drop.push(key.clone());
        }
        for key in drop {
            self.cache.remove(&key);
        }
        self.cache.shrink_to_fit();
        self.cache_bytes = self.cache_bytes.saturating_sub(freed);
    }

    /// About how many bytes the next checkpoint writes for the rows added since the last one
    /// (an estimate of the write batch it builds, which is held in memory until written).
    pub fn unsaved_bytes(&self) -> usize {
        self.unsaved_bytes
    }

    /// Approximate bytes of cached keys.
    pub fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }

    /// Keys cached in memory.
    pub fn cached_keys(&self) -> usize {
        self.cache.len()
    }

    /// Rows waiting to be decided (for incremental windows: keys with such rows).
    pub fn waiting(&self) -> usize {
        self.pending.len() + self.due.len()
    }
}

/// What deciding needs besides the state.
pub struct DecideContext<'a> {
    /// Where event time stands after the batch.
    pub bounds: Bounds,
    /// The batch being evaluated (`None` at the end of the input).
    pub events: Option<&'a crate::input::decode::EventBatch>,
    /// Decision maker of the pipeline.
    pub decisions: &'a DecisionMaker,
    /// Processing time stamp.
    pub processed_at: &'a str,
    /// Runs the detectors' plans.
    pub engine: &'a DetectorEngine,
    /// The window state on disk.
    pub store: &'a StateStore,
    /// The events behind rows not decided yet.
    pub triggers: &'a TriggerStore,
}

/// Moves `key`'s entry in `index` from time `before` to `after` (either may be none).
fn reindex(index: &mut BTreeSet<(i64, Box<[u8]>)>, key: &[u8], before: Option<i64>, after: Option<i64>) {
    if before == after {
        return;
    }
    if let Some(t) = before {
        index.remove(&(t, Box::from(key)));
    }
    if let Some(t) = after {
        index.insert((t, Box::from(key)));
    }
}

/// A detector version's stable tag: which detector fired on a row at once, as stored.
pub fn detector_tag(detector: &CompiledDetector) -> u64 {
    let digest = Sha256::digest(format!("{}@{}", detector.meta.id, detector.version).as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn column<T: 'static>(batch: &RecordBatch, index: usize) -> Result<&T, String> {
    batch
        .columns()
        .get(index)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            format!("internal: column {index} of the rows under the window has an unexpected type")
        })
}
