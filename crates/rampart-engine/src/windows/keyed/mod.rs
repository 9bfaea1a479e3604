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
//!
//! The strategies are one file each: [`incremental`] sliding windows, sliding windows
//! [`rerun`] over their rows, [`grouped`] windows; the [`cache`] of keys over the store is
//! theirs in common.

mod cache;
mod grouped;
mod incremental;
mod rerun;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::array::{Array, ArrayRef, TimestampMicrosecondArray, UInt64Array};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use rampart_sql::{CompiledDetector, DetectorEngine, WindowSplit, WindowedDetector};
use rampart_state::StateStore;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::decide::Pending;
use crate::decide::triggers::TriggerStore;
use crate::error::{Error, Result};
use crate::windows::frames::{Due, Layout};
pub use cache::Saving;
use cache::{KeyId, Keys};
use rerun::Rerun;
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

/// The state of one window: one windowed detector's, or that of several whose windows keep the
/// same rows (see [`WindowSplit::rows_identity`]).
pub struct KeyedState {
    /// Store key prefix: for an incremental sliding window, its rows identity's (see
    /// [`Self::shared_tag`]; detectors keeping the same rows share it, and a detector whose
    /// rows changed starts afresh); otherwise the detector's id and version (so a changed
    /// detector starts afresh).
    tag: Vec<u8>,
    /// A shared state's entry in the store's metadata that names its tag.
    registry: Option<String>,
    key_converter: Option<RowConverter>,
    row_converter: RowConverter,
    /// The keys cached, and those `due` and `early` name.
    cache: Keys,
    /// The cache's bytes: exact after a checkpoint or [`Self::recount`], an estimate (rows
    /// added counted, rows gone not) in between.
    cache_bytes: usize,
    /// The batch ([`Self::tick`]) at which every key's `Entry::counted` was last brought up to
    /// date: a key not used since (and clean) still has those bytes.
    counted_tick: u64,
    /// Sliding windows re-run per key: rows not yet decided, by (time, row id), with their key.
    pending: BTreeMap<(i64, u64), Rerun>,
    /// Sliding windows re-run per key: per key with rows looked at before the watermark, the
    /// newest of them (a row arriving at or before it changes their frames).
    looked_at: FxHashMap<Box<[u8]>, i64>,
    /// Incremental sliding windows: the keys with rows not decided yet, by their oldest.
    due: BTreeSet<(i64, KeyId)>,
    /// Incremental sliding windows with detectors deciding at once: the keys with rows to look
    /// at, by the oldest.
    early: BTreeSet<(i64, KeyId)>,
    /// The detectors reading this state, by stable tag (their bit is their position).
    tags: Vec<u64>,
    /// The detectors (bits) that decide at once.
    at_once: u32,
    /// What the state keeps per key.
    kept: Kept,
    /// Incremental sliding windows: for each member, the accumulators its aggregates read
    /// (see [`Layout`]), in its window's column order.
    readers: Vec<Vec<usize>>,
    /// Incremental sliding windows: every row older than this was decided.
    decided_until: i64,
    /// The windows' reach (µs).
    reach: i64,
    /// How far the frames look ahead (µs): a row is decided once the watermark passes its
    /// time plus this.
    following: i64,
    /// The pipeline's allowed lateness (µs).
    lateness: i64,
    /// Counts batches, to know which cached keys were used recently.
    tick: u64,
    /// About how many bytes the next checkpoint writes (see [`Self::unsaved_bytes`]).
    unsaved_bytes: usize,
    /// The keys the latest checkpoint deleted (expired, or left with nothing), while its write
    /// may still be running ([`StateStore::write_behind`]): reading one back waits for it.
    deleted: FxHashSet<Box<[u8]>>,
}

/// Where a window state shared by detectors whose windows keep the same rows
/// ([`WindowSplit::rows_identity`]) is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTag {
    /// The prefix of its keys in the store.
    pub tag: String,
    /// The metadata entry that names `tag` for its rows identity (written at checkpoints).
    pub registry: String,
}

impl SharedTag {
    /// The tag of the `n`-th state (more than 32 detectors keep more than one) of the windows of
    /// `members`, whose rows identity is `identity`: the one `store`'s metadata names for it.
    /// A state the metadata does not name yet takes over the tag one of its members' window
    /// was stored under before windows with other frames shared rows (a hash of its
    /// [`WindowSplit::state_identity`]; of those holding chunks, the one reaching furthest
    /// back), so that its rows survive the upgrade; else a new one.
    pub fn choose(
        store: Option<&StateStore>,
        identity: &str,
        n: usize,
        members: &[WindowedDetector<'_>],
    ) -> std::result::Result<Self, rampart_state::StateError> {
        let hash = &hex::encode(Sha256::digest(identity.as_bytes()))[..32];
        let suffix = if n == 0 { String::new() } else { format!("-{n}") };
        let fresh = Self {
            tag: format!("window/{hash}{suffix}"),
            registry: format!("window-tag/{hash}{suffix}"),
        };
        let Some(store) = store else {
            return Ok(fresh);
        };
        if let Some(tag) = store.meta(&fresh.registry)? {
            return Ok(Self {
                tag: String::from_utf8_lossy(&tag).into_owned(),
                ..fresh
            });
        }
        let mut before: Vec<_> = members
            .iter()
            .filter(|_| n == 0)
            .filter_map(|m| Some((m.split.reach, m.split.state_identity()?)))
            .collect();
        before.sort_by_key(|(reach, _)| std::cmp::Reverse(*reach));
        for (_, identity) in before {
            let tag = format!(
                "window/{}",
                &hex::encode(Sha256::digest(identity.as_bytes()))[..32]
            );
            if store.holds_chunks(format!("{tag}\0").as_bytes())? {
                return Ok(Self { tag, ..fresh });
            }
        }
        Ok(fresh)
    }
}

/// What a window state keeps per key.
enum Kept {
    /// Incremental sliding windows: frames and accumulators of these aggregates
    /// ([`crate::windows::frames`]), stored as chunks.
    Frames(Layout),
    /// Sliding windows re-run over their rows, and grouped windows: the rows, one stored value
    /// per key.
    Rows,
}

/// Rows to judge, each with its key's number, and the rows' columns (`pre`'s, then the window
/// values).
type JudgedRows = (Vec<(KeyId, Due)>, Vec<ArrayRef>);

/// Rows of one batch for one key.
type NewRows = Vec<(i64, u64, Vec<u8>)>;

/// One detector's decisions on a batch (made when the guard lets them through), with the rows
/// they are for, or why it failed.
pub type Decided<'d> = Result<Vec<(u64, Pending<'d>)>>;

/// Keys that got rows in a batch, with how many.
pub type Touched = Vec<(Box<[u8]>, usize)>;

impl KeyedState {
    /// Empty state for the windowed detectors `members` (at most 32): one detector, or
    /// several with the same [`WindowSplit::rows_identity`] (incremental sliding windows whose
    /// rows, key and aggregates' arguments are the same; their frames may differ). `tag` names
    /// a shared state in the store (see the pipeline's window states); `None`: the state is its
    /// detector's own, stored under its id and version (so a changed detector starts afresh).
    pub fn new(members: &[WindowedDetector<'_>], shared: Option<&SharedTag>, lateness: i64) -> Result<Self> {
        let Some(&WindowedDetector { detector, split }) = members.first() else {
            return Err(Error::bug("a window state without detectors"));
        };
        let fields = |types: Vec<datafusion::arrow::datatypes::DataType>| {
            types.into_iter().map(SortField::new).collect::<Vec<_>>()
        };
        let key_types = split
            .keys
            .iter()
            .map(|k| k.data_type(&split.pre_schema))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let key_converter = if key_types.is_empty() {
            None
        } else {
            Some(RowConverter::new(fields(key_types))?)
        };
        let row_types = split
            .pre_schema
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let row_converter = RowConverter::new(fields(row_types))?;
        let mut tag = match shared {
            Some(shared) => shared.tag.clone(),
            None => format!("{}@{}", detector.meta.id, detector.version),
        }
        .into_bytes();
        tag.push(0);
        // An accumulator per aggregate and frame of the members; each member reads its own.
        let (kept, readers) = match split.incremental() {
            Some(plan) => {
                let mut layout = Layout::new(&plan.aggregates);
                let readers = members
                    .iter()
                    .map(|m| match m.split.incremental() {
                        Some(plan) => Ok(layout.add(&plan.aggregates)),
                        None => Err(Error::bug(format!(
                            "`{}` shares an incremental window's state without an incremental plan",
                            m.detector.meta.id
                        ))),
                    })
                    .collect::<Result<Vec<_>>>()?;
                (Kept::Frames(layout), readers)
            }
            None => (Kept::Rows, Vec::new()),
        };
        let reach = members.iter().map(|m| m.split.reach).max().unwrap_or_default();
        Ok(Self {
            tag,
            registry: shared.map(|s| s.registry.clone()),
            key_converter,
            row_converter,
            cache: Keys::default(),
            cache_bytes: 0,
            counted_tick: 0,
            pending: BTreeMap::new(),
            looked_at: FxHashMap::default(),
            due: BTreeSet::new(),
            early: BTreeSet::new(),
            tags: members.iter().map(|m| detector_tag(m.detector)).collect(),
            at_once: members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.split.timing == rampart_sql::Timing::AtOnce)
                .fold(0, |bits, (i, _)| bits | 1 << i),
            kept,
            readers,
            decided_until: i64::MIN,
            reach: rampart_core::time::micros(reach),
            following: rampart_core::time::micros(split.timing.following()),
            lateness,
            tick: 0,
            unsaved_bytes: 0,
            deleted: FxHashSet::default(),
        })
    }

    fn all_members(&self) -> u32 {
        (1u64 << self.tags.len().max(1)).wrapping_sub(1) as u32
    }

    /// How long after its newest row a key's rows may still be in a frame (µs): the windows'
    /// reach plus the allowed lateness.
    fn horizon(&self) -> i64 {
        self.reach.saturating_add(self.lateness)
    }

    fn keys_of(
        &self,
        split: &WindowSplit,
        batch: &RecordBatch,
    ) -> Result<Option<datafusion::arrow::row::Rows>> {
        let Some(converter) = &self.key_converter else {
            return Ok(None);
        };
        let n = batch.num_rows();
        let columns = split
            .keys
            .iter()
            .map(|k| k.evaluate(batch).and_then(|v| v.into_array(n)))
            .collect::<datafusion::common::Result<Vec<ArrayRef>>>()?;
        converter.convert_columns(&columns).map(Some).map_err(Error::from)
    }

    /// A batch's rows below the window in Arrow's row format, with their event times and row
    /// ids.
    fn batch_rows<'b>(
        &self,
        split: &WindowSplit,
        batch: &'b RecordBatch,
    ) -> Result<(Rows, &'b TimestampMicrosecondArray, &'b UInt64Array)> {
        let rows = self.row_converter.convert_columns(batch.columns())?;
        let times = column::<TimestampMicrosecondArray>(batch, split.time_index)?;
        let ids = column::<UInt64Array>(batch, split.row_index)?;
        Ok((rows, times, ids))
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
    ) -> Result<Touched> {
        self.tick += 1;
        match &self.kept {
            Kept::Frames(layout) => {
                let layout = layout.clone();
                self.add_incremental(&layout, split, store, pre)?;
                Ok(Vec::new())
            }
            Kept::Rows => self.add_rows(split, store, before, pre),
        }
    }

    /// Sliding windows: decides every waiting row older than the watermark (all of them when
    /// `all`, at the end of the input).
    /// One result per member detector (`members` share this state: only incremental windows
    /// have more than one, see [`WindowSplit::state_identity`]).
    pub fn decide_sliding<'d>(
        &mut self,
        members: &[WindowedDetector<'d>],
        ctx: &DecideContext<'_>,
        all: bool,
    ) -> Vec<Decided<'d>> {
        match self.kept {
            Kept::Frames(_) => self.decide_incremental(members, ctx, all),
            Kept::Rows => {
                debug_assert_eq!(members.len(), 1, "a re-run window's state is its detector's own");
                members
                    .iter()
                    .map(|m| self.decide_rerun(m.detector, m.split, ctx, all))
                    .collect()
            }
        }
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
    /// Runs the detectors' plans.
    pub engine: &'a DetectorEngine,
    /// The window state on disk.
    pub store: &'a StateStore,
    /// The events behind rows not decided yet.
    pub triggers: &'a TriggerStore,
}

/// A detector version's stable tag: which detector fired on a row at once, as stored.
pub fn detector_tag(detector: &CompiledDetector) -> u64 {
    let digest = Sha256::digest(format!("{}@{}", detector.meta.id, detector.version).as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

pub(crate) fn column<T: 'static>(batch: &RecordBatch, index: usize) -> Result<&T> {
    batch
        .columns()
        .get(index)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            Error::bug(format!(
                "column {index} of the rows under the window has an unexpected type"
            ))
        })
}
