//! Sliding windows without an incremental form, re-run over their rows: a key's rows below
//! the window are kept in time order (Arrow's row format, [`rampart_state::codec`]'s layout);
//! each waiting row is decided, when the watermark passes it, by running the detector's part
//! above the state over the key's rows within reach of it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::Array;
use datafusion::arrow::record_batch::RecordBatch;
use rampart_sql::{CompiledDetector, DetectorEngine, StateKind, WindowSplit};
use rampart_state::StateStore;
use rampart_state::codec::{FIRED, ROW_HEADER, StoredRow, flags, push_row, rows_of, set_header};
use serde::{Deserialize, Serialize};

use super::{DecideContext, Decided, KeyedState, NewRows, Touched};
use crate::decide::Pending;
use crate::error::{Error, Result};

/// A row waiting to be decided (or, for incremental windows, a key with such rows and the
/// oldest one's time), as persisted across restarts.
#[derive(Serialize, Deserialize)]
pub(super) struct PendingRow {
    pub(super) time: i64,
    pub(super) row: u64,
    pub(super) key: String,
    /// The detector fired on it at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) fired: bool,
}

/// A row of a re-run window waiting to be decided.
pub(super) struct Rerun {
    pub(super) key: Box<[u8]>,
    /// The detector fired on it at once.
    pub(super) fired: bool,
    /// Its answer is known from rows that are all its frames' (no row arrived into them since
    /// it was looked at).
    pub(super) settled: bool,
}

impl KeyedState {
    /// A batch's rows below the window by key: (time, row id, Arrow row bytes) each; rows
    /// without an event time are left out.
    fn rows_by_key(&self, split: &WindowSplit, pre: &[RecordBatch]) -> Result<HashMap<Box<[u8]>, NewRows>> {
        let mut by_key: HashMap<Box<[u8]>, NewRows> = HashMap::new();
        for batch in pre {
            let n = batch.num_rows();
            if n == 0 {
                continue;
            }
            let keys = self.keys_of(split, batch)?;
            let (rows, times, ids) = self.batch_rows(split, batch)?;
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
        Ok(by_key)
    }

    /// Sliding windows re-run over their rows, and grouped windows: adds a batch's rows to
    /// their keys' stored rows (time order), dropping those out of reach of `before`; returns
    /// the keys touched with their number of new rows.
    pub(super) fn add_rows(
        &mut self,
        split: &WindowSplit,
        store: &StateStore,
        before: i64,
        pre: &[RecordBatch],
    ) -> Result<Touched> {
        let by_key = self.rows_by_key(split, pre)?;
        let keep_from = before.saturating_sub(rampart_core::time::micros(split.reach));
        let horizon = self.horizon();
        let mut touched = Vec::with_capacity(by_key.len());
        for (key, mut new) in by_key {
            new.sort_by_key(|(t, r, _)| (*t, *r));
            if split.kind() == StateKind::Sliding {
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
            let entry = self.entry(store, &key)?;
            if flags(&entry.value) & FIRED != 0 {
                continue;
            }
            let before = entry.value.capacity();
            let mut merged = Vec::with_capacity(
                entry.value.len() + new.iter().map(|n| n.2.len() + ROW_HEADER).sum::<usize>(),
            );
            set_header(&mut merged, 0, 0);
            let mut old = rows_of(&entry.value)
                .filter(|r| split.kind() == StateKind::Grouped || r.time >= keep_from)
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

    /// [`Self::decide_sliding`] for a window re-run over its key's rows: the rows older than
    /// the watermark for good, and, for a detector that decides at once, the rows older than
    /// the completeness bound not looked at yet.
    pub(super) fn decide_rerun<'d>(
        &mut self,
        detector: &'d CompiledDetector,
        split: &WindowSplit,
        ctx: &DecideContext<'_>,
        all: bool,
    ) -> Decided<'d> {
        let at_once = !all && split.timing == rampart_sql::Timing::AtOnce;
        let mut due = if all {
            std::mem::take(&mut self.pending)
        } else {
            // (Frames that look ahead: rows up to the watermark less that far have all theirs.)
            let limit = ctx.bounds.watermark.saturating_sub(self.following);
            let later = self.pending.split_off(&(limit, 0));
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
            self.entry(ctx.store, key)?;
        }
        let reach = rampart_core::time::micros(split.reach);
        let parser = self.row_converter.parser();
        let mut input = Vec::new();
        for (key, (from, to)) in &keys {
            let entry = self.cache.get(key).expect("loaded above");
            input.extend(
                rows_of(&entry.value)
                    .filter(|r| {
                        r.time >= from.saturating_sub(reach) && r.time <= to.saturating_add(self.following)
                    })
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
    pub(super) fn run<'d>(
        &self,
        detector: &'d CompiledDetector,
        split: &WindowSplit,
        input: &[datafusion::arrow::row::Row<'_>],
        wanted: impl Fn(u64) -> bool,
        ctx: &DecideContext<'_>,
    ) -> Result<Vec<(u64, Pending<'d>)>> {
        let results = self.post(ctx.engine, split, input)?;
        Ok(self.decisions_for(detector, &results, wanted, ctx))
    }

    pub(super) fn post(
        &self,
        engine: &DetectorEngine,
        split: &WindowSplit,
        input: &[datafusion::arrow::row::Row<'_>],
    ) -> Result<Vec<RecordBatch>> {
        if input.is_empty() {
            return Ok(Vec::new());
        }
        let columns = self.row_converter.convert_rows(input.iter().copied())?;
        let batch = RecordBatch::try_new(Arc::clone(&split.pre_schema), columns)?;
        engine.run_post(split, &[batch]).map_err(Error::from)
    }
}
