//! Incremental sliding windows: rows enter their key's frames ([`KeyAgg`]) and accumulators
//! as they arrive; a row is decided when the watermark passes it, or at once for members whose
//! condition only becomes true as rows enter the frame, and each member's plan above the
//! window runs on the decided rows with their window values.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray};
use datafusion::arrow::compute::filter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::DataFusionError;
use rampart_sql::{CompiledDetector, IncrementalPlan, WindowCondition, WindowSplit, WindowedDetector};
use rampart_state::StateStore;
use rampart_state::codec::{INCREMENTAL, set_header};
use rustc_hash::FxHashMap;

use super::cache::{KeyId, Keys, Waits};
use super::{DecideContext, Decided, JudgedRows, Kept, KeyedState};
use crate::decide::{DecisionMaker, Pending};
use crate::error::{Error, Result};
use crate::windows::frames::{Due, Layout, RowBytes, Val};

impl KeyedState {
    /// Incremental sliding windows: adds a batch's rows to their keys' frames.
    pub(super) fn add_incremental(
        &mut self,
        layout: &Layout,
        split: &WindowSplit,
        store: &StateStore,
        pre: &[RecordBatch],
    ) -> Result<()> {
        let horizon = self.horizon();
        let tag_len = self.tag.len();
        let at_once = self.at_once;
        for batch in pre {
            let n = batch.num_rows();
            if n == 0 {
                continue;
            }
            let keys = self.keys_of(split, batch)?;
            // One argument per slot: the first member's aggregates (every member has the same).
            let mut args = layout.aggregates[..layout.stride()]
                .iter()
                .map(|a| match &a.argument {
                    Some(arg) => arg
                        .evaluate(batch)
                        .and_then(|v| v.into_array(n))
                        .map_err(Error::from)
                        .and_then(|a| Val::column(&a)),
                    None => Ok(vec![Val::Null; n]),
                })
                .collect::<Result<Vec<_>>>()?;
            let (rows, times, ids) = self.batch_rows(split, batch)?;
            // (Shared by the batch's rows until the last of them is decided: converted once, not
            // copied row by row.)
            let rows = Arc::new(rows);
            // One cache lookup per key and batch: the rows grouped by key, in order.
            let groups = group_by_key(keys.as_ref(), times, n);
            // (One row's arguments at a time, taken into its key's columns.)
            let mut values: Vec<Val> = Vec::with_capacity(args.len());
            // A row's share of its key's buffers (time, arguments: at most 16 bytes each in
            // their typed columns, pending entry, fresh entry), with the slack of their growth.
            let row_bytes = (8 + layout.stride() * 16 + 32 + 16) * 3 / 2;
            for (key, indices) in groups.iter() {
                // Counted as rows arrive; checkpoints recount exactly.
                let mut added = 0;
                let id = self.cache.intern(key);
                let entry = self.entry_at(store, id)?;
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
                for &i in indices {
                    values.clear();
                    values.extend(args.iter_mut().map(|a| std::mem::take(&mut a[i])));
                    let row_len = rows.row(i).as_ref().len();
                    let bytes = RowBytes::InBatch(Arc::clone(&rows), i as u32, row_len as u32);
                    added +=
                        row_bytes + bytes.heap_bytes() + values.iter().map(Val::heap_bytes).sum::<usize>();
                    // ...and per row its time, order and arguments in the one, its time, id
                    // and `pre` columns in the other.
                    unsaved += 16 + layout.stride() * 9 + 20 + row_len;
                    agg.insert(layout, times.value(i), ids.value(i), &mut values, bytes);
                }
                let oldest = agg.oldest_pending();
                let early = (at_once != 0).then(|| agg.oldest_unsettled(at_once)).flatten();
                let newest = agg.newest().unwrap_or(i64::MIN);
                set_header(&mut entry.value, newest.saturating_add(horizon), INCREMENTAL);
                entry.dirty = true;
                self.cache_bytes += added;
                self.unsaved_bytes += unsaved;
                reindex(
                    &mut self.due,
                    &mut self.cache,
                    Waits::Due,
                    id,
                    oldest_before,
                    oldest,
                );
                reindex(
                    &mut self.early,
                    &mut self.cache,
                    Waits::Early,
                    id,
                    early_before,
                    early,
                );
            }
        }
        Ok(())
    }

    /// Incremental sliding windows: decides the rows older than the watermark (all at the end
    /// of the input) for good, and looks at the rows older than the completeness bound for the
    /// members that decide at once; key by key, in time order, moving each key's frames
    /// forward, then runs each member detector's part above the window over the rows it has to
    /// judge (one result per member).
    pub(super) fn decide_incremental<'d>(
        &mut self,
        members: &[WindowedDetector<'d>],
        ctx: &DecideContext<'_>,
        all: bool,
    ) -> Vec<Decided<'d>> {
        // (Frames that look ahead: rows up to the watermark less that far have all theirs.)
        let watermark = (!all).then_some(ctx.bounds.watermark.saturating_sub(self.following));
        let Kept::Frames(layout) = &self.kept else {
            return members
                .iter()
                .map(|_| Err(Error::bug("an incremental window without frames")))
                .collect();
        };
        let layout = layout.clone();
        let conditions: Vec<Option<&WindowCondition>> = members
            .iter()
            .map(|m| m.split.incremental().and_then(|plan| plan.condition.as_ref()))
            .collect();
        let decided = match self.decide_due(&layout, ctx, watermark, &conditions) {
            Ok(Some(judged)) => members
                .iter()
                .enumerate()
                .map(|(bit, m)| match m.split.incremental() {
                    Some(plan) => self.run_member(m.detector, plan, bit, &judged, ctx),
                    None => Err(Error::bug(format!(
                        "`{}` reads an incremental window's state without an incremental plan",
                        m.detector.meta.id
                    ))),
                })
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

    /// Member `member`'s part above the window over the rows it has to judge (its bit set in
    /// their `members`), with its own window values; rows it fires on before the watermark
    /// are marked fired in their keys.
    pub(super) fn run_member<'d>(
        &mut self,
        detector: &'d CompiledDetector,
        plan: &IncrementalPlan,
        member: usize,
        (due, columns): &JudgedRows,
        ctx: &DecideContext<'_>,
    ) -> Decided<'d> {
        let bit: u32 = 1 << member;
        let wanted: Vec<bool> = due.iter().map(|(_, d)| d.members & bit != 0).collect();
        if !wanted.contains(&true) {
            return Ok(Vec::new());
        }
        // `pre`'s columns, then the values of the member's accumulators. (The members' window
        // columns may be named differently.)
        let accumulators = &self.readers[member];
        let pre = plan.above_input.fields().len() - accumulators.len();
        let columns: Vec<_> = columns[..pre]
            .iter()
            .chain(accumulators.iter().map(|k| &columns[pre + k]))
            .cloned()
            .collect();
        let mut rows = RecordBatch::try_new(Arc::clone(&plan.above_input), columns)?;
        if wanted.contains(&false) {
            let mask = datafusion::arrow::array::BooleanArray::from(wanted);
            rows = datafusion::arrow::compute::filter_record_batch(&rows, &mask)?;
        }
        let results = ctx.engine.run_above(plan, rows)?;
        let decided = self.decisions_for(detector, &results, |_| true, ctx);
        // Rows that fired before the watermark: once only. (Most batches fire on none.)
        if decided.is_empty() {
            return Ok(decided);
        }
        let early: HashMap<u64, &(KeyId, Due)> = due
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
            let tick = self.tick;
            for (row, _) in &decided {
                if let Some((k, d)) = early.get(row)
                    && let Some(entry) = self.cache.at_mut(*k)
                    && let Some(agg) = entry.agg.as_mut()
                {
                    agg.mark_fired(d.time, d.row, bit, tag);
                    entry.dirty = true;
                    // (Its bytes changed: counted again.)
                    entry.used = tick;
                }
            }
        }
        Ok(decided)
    }

    /// [`Self::decide_incremental`] for the keys with rows older than the watermark or, for the
    /// members that decide at once, older than the completeness bound: the rows to judge (with
    /// their key's index in `due_keys`), and their columns (`pre`'s, then the values of every
    /// accumulator of `layout`); `None`: no row to judge. A member's row whose window values
    /// fail its [`WindowCondition`] (`conditions`, by member) is not judged by it: only the rows
    /// some member may fire on have their `pre` columns decoded and go through the plans above.
    pub(super) fn decide_due(
        &mut self,
        layout: &Layout,
        ctx: &DecideContext<'_>,
        watermark: Option<i64>,
        conditions: &[Option<&WindowCondition>],
    ) -> Result<Option<JudgedRows>> {
        let at_once = if watermark.is_some() { self.at_once } else { 0 };
        let complete = ctx.bounds.complete;
        // The keys taken out of each index (they go back in with their new times), in the
        // order of their numbers, with the indexes they were in (`Waits`, bits).
        let mut taken: Vec<(KeyId, u8)> = Vec::new();
        match watermark {
            Some(limit) => {
                let later = self.due.split_off(&(limit, 0));
                let due = std::mem::replace(&mut self.due, later);
                taken.extend(due.into_iter().map(|(_, k)| (k, Waits::Due as u8)));
                if at_once != 0 {
                    let later = self.early.split_off(&(complete, 0));
                    let early = std::mem::replace(&mut self.early, later);
                    taken.extend(early.into_iter().map(|(_, k)| (k, Waits::Early as u8)));
                }
            }
            None => {
                for (_, k) in std::mem::take(&mut self.early) {
                    self.cache.indexed(k, Waits::Early, false);
                }
                taken.extend(
                    std::mem::take(&mut self.due)
                        .into_iter()
                        .map(|(_, k)| (k, Waits::Due as u8)),
                );
            }
        }
        if taken.is_empty() {
            return Ok(None);
        }
        taken.sort_unstable();
        taken.dedup_by(|later, first| {
            let same = later.0 == first.0;
            if same {
                first.1 |= later.1;
            }
            same
        });
        let (members, hold) = (self.all_members(), self.all_members() & !self.at_once != 0);
        let mut due: Vec<(KeyId, Due)> = Vec::new();
        // Every row's window values, one per accumulator of the layout, in `due`'s order.
        let mut flat: Vec<Val> = Vec::new();
        let mut key_due: Vec<Due> = Vec::new();
        for (id, from) in taken {
            let entry = self.entry_at(ctx.store, id)?;
            let agg = entry.agg.as_mut().expect("incremental entries have aggregates");
            let before = (agg.oldest_pending(), agg.oldest_unsettled(at_once));
            agg.decide(
                layout,
                watermark,
                complete,
                members,
                at_once,
                hold,
                &mut key_due,
                &mut flat,
            );
            let after = (
                agg.oldest_pending(),
                (at_once != 0).then(|| agg.oldest_unsettled(at_once)).flatten(),
            );
            entry.dirty = true;
            due.extend(key_due.drain(..).map(|d| (id, d)));
            // A key taken out of an index goes back at its new time; one still in it moves.
            for (index, waits, before, after) in [
                (&mut self.due, Waits::Due, before.0, after.0),
                (&mut self.early, Waits::Early, before.1, after.1),
            ] {
                if from & waits as u8 != 0 {
                    if let Some(t) = after {
                        index.insert((t, id));
                    }
                    self.cache.indexed(id, waits, after.is_some());
                } else {
                    reindex(index, &mut self.cache, waits, id, before, after);
                }
            }
        }
        if due.is_empty() {
            return Ok(None);
        }
        let stride = layout.aggregates.len();
        debug_assert_eq!(
            flat.len(),
            due.len() * stride,
            "one value per accumulator and row"
        );
        let mut column: Vec<Val> = Vec::with_capacity(due.len());
        let mut values = layout
            .aggregates
            .iter()
            .enumerate()
            .map(|(i, a)| {
                column.clear();
                column.extend(flat.iter_mut().skip(i).step_by(stride).map(std::mem::take));
                Val::array(&column, &a.output)
            })
            .collect::<Result<Vec<_>>>()?;
        if self.screen(&mut due, &values, conditions) {
            let judged = BooleanArray::from_iter(due.iter().map(|(_, d)| Some(d.members != 0)));
            due.retain(|(_, d)| d.members != 0);
            if due.is_empty() {
                return Ok(None);
            }
            values = values
                .iter()
                .map(|v| filter(v, &judged))
                .collect::<std::result::Result<_, _>>()?;
        }
        // Rows decided early are still pending in their keys: their columns are taken from
        // there only now, for the rows some detector judges.
        let mut last_key = None;
        for (k, d) in due.iter_mut().filter(|(_, d)| !d.last) {
            if last_key.map(|(at, _)| at) != Some(*k) {
                last_key = Some((*k, self.cache.at(*k).and_then(|e| e.agg.as_deref())));
            }
            let bytes = last_key
                .and_then(|(_, agg)| agg)
                .and_then(|agg| agg.pending_bytes(d.time, d.row))
                .ok_or_else(|| Error::bug("a row decided early is not pending in its key"))?;
            d.bytes = bytes.clone();
        }
        let parser = self.row_converter.parser();
        let mut columns = self
            .row_converter
            .convert_rows(due.iter().map(|(_, d)| parser.parse(d.bytes.get())))?;
        columns.extend(values);
        Ok(Some((due, columns)))
    }

    /// Takes from each row in `due` the members (bits) whose [`WindowCondition`] its window
    /// values (`values`, one column per accumulator of the layout) fail; whether any row lost
    /// any. A condition that cannot be evaluated takes nothing: the plan above then judges
    /// every row, and says what failed.
    fn screen(
        &self,
        due: &mut [(KeyId, Due)],
        values: &[ArrayRef],
        conditions: &[Option<&WindowCondition>],
    ) -> bool {
        let mut took = false;
        for (member, condition) in conditions.iter().enumerate() {
            let Some(condition) = condition else {
                continue;
            };
            let columns = self.readers[member]
                .iter()
                .map(|&k| Arc::clone(&values[k]))
                .collect();
            let met = RecordBatch::try_new(Arc::clone(&condition.input), columns)
                .map_err(DataFusionError::from)
                .and_then(|batch| condition.expr.evaluate(&batch))
                .and_then(|v| v.into_array(due.len()));
            let Some(met) = met
                .ok()
                .and_then(|a| a.as_any().downcast_ref::<BooleanArray>().cloned())
            else {
                continue;
            };
            let bit: u32 = 1 << member;
            for (i, (_, d)) in due.iter_mut().enumerate() {
                // (NULL fails a filter.)
                if d.members & bit != 0 && !(met.is_valid(i) && met.value(i)) {
                    d.members &= !bit;
                    took = true;
                }
            }
        }
        took
    }

    /// Decisions for the result rows `wanted` accepts.
    pub(super) fn decisions_for<'d>(
        &self,
        detector: &'d CompiledDetector,
        results: &[RecordBatch],
        wanted: impl Fn(u64) -> bool,
        ctx: &DecideContext<'_>,
    ) -> Vec<(u64, Pending<'d>)> {
        let mut out = Vec::new();
        for result in results {
            let Some(ids) = DecisionMaker::row_ids(detector, result) else {
                continue;
            };
            // (Shared by the decisions for its rows, made when the guard lets them through.)
            let mut shared = None;
            for r in 0..result.num_rows() {
                let row = ids.value(r);
                if !wanted(row) {
                    continue;
                }
                let Some(trigger) = ctx.triggers.get(row) else {
                    continue;
                };
                let result = shared.get_or_insert_with(|| Arc::new(result.clone()));
                out.push((row, Pending::row(detector, result, r, trigger)));
            }
        }
        out
    }
}

/// A batch's rows with an event time, grouped by key (`keys`: none for a window without
/// `PARTITION BY`, one group), each group's rows in batch order.
struct Groups<'k> {
    /// Each group's key, in order of first appearance.
    keys: Vec<&'k [u8]>,
    /// The rows, group after group.
    rows: Vec<usize>,
    /// Where each group's rows start in `rows` (and, last, where they end).
    starts: Vec<usize>,
}

impl<'k> Groups<'k> {
    fn iter(&self) -> impl Iterator<Item = (&'k [u8], &[usize])> + '_ {
        self.keys
            .iter()
            .enumerate()
            .map(|(g, key)| (*key, &self.rows[self.starts[g]..self.starts[g + 1]]))
    }
}

/// Groups a batch's `n` rows by key (a counting sort by each key's first appearance: three
/// lists for the batch rather than one per key).
fn group_by_key<'k>(
    keys: Option<&'k datafusion::arrow::row::Rows>,
    times: &datafusion::arrow::array::TimestampMicrosecondArray,
    n: usize,
) -> Groups<'k> {
    let mut index: FxHashMap<&[u8], u32> = FxHashMap::default();
    let mut group_keys: Vec<&[u8]> = Vec::new();
    // Each row's group (`u32::MAX`: no event time, not added).
    let group: Vec<u32> = (0..n)
        .map(|i| {
            if times.is_null(i) {
                return u32::MAX;
            }
            let key: &[u8] = keys.map_or(&[], |k| k.row(i).data());
            *index.entry(key).or_insert_with(|| {
                group_keys.push(key);
                (group_keys.len() - 1) as u32
            })
        })
        .collect();
    let mut starts = vec![0usize; group_keys.len() + 1];
    for &g in group.iter().filter(|g| **g != u32::MAX) {
        starts[g as usize + 1] += 1;
    }
    for g in 0..group_keys.len() {
        starts[g + 1] += starts[g];
    }
    let mut next = starts.clone();
    let mut rows = vec![0usize; starts[group_keys.len()]];
    for (i, &g) in group.iter().enumerate().filter(|(_, g)| **g != u32::MAX) {
        rows[next[g as usize]] = i;
        next[g as usize] += 1;
    }
    Groups {
        keys: group_keys,
        rows,
        starts,
    }
}

/// Moves key `id`'s place in `index` (`waits`, of `keys`) from time `before` to `after`
/// (either may be none).
fn reindex(
    index: &mut BTreeSet<(i64, KeyId)>,
    keys: &mut Keys,
    waits: Waits,
    id: KeyId,
    before: Option<i64>,
    after: Option<i64>,
) {
    if before == after {
        return;
    }
    if let Some(t) = before {
        index.remove(&(t, id));
    }
    if let Some(t) = after {
        index.insert((t, id));
    }
    keys.indexed(id, waits, after.is_some());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, StringArray, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::DataType;
    use datafusion::arrow::row::{RowConverter, SortField};

    use super::group_by_key;

    #[test]
    fn rows_are_grouped_by_key_in_order_without_the_ones_with_no_time() {
        let actors: ArrayRef = Arc::new(StringArray::from(vec!["b", "a", "b", "c", "a", "b"]));
        let times = TimestampMicrosecondArray::from(vec![Some(1), Some(2), None, Some(4), Some(5), Some(6)]);
        let converter = RowConverter::new(vec![SortField::new(DataType::Utf8)]).unwrap();
        let keys = converter.convert_columns(&[actors]).unwrap();
        let groups = group_by_key(Some(&keys), &times, 6);
        let got: Vec<(Vec<u8>, Vec<usize>)> = groups
            .iter()
            .map(|(k, rows)| (k.to_vec(), rows.to_vec()))
            .collect();
        let key = |i: usize| keys.row(i).data().to_vec();
        assert_eq!(
            got,
            vec![(key(0), vec![0, 5]), (key(1), vec![1, 4]), (key(3), vec![3])]
        );

        // No `PARTITION BY`: one group of every row with a time.
        let groups = group_by_key(None, &times, 6);
        let got: Vec<Vec<usize>> = groups.iter().map(|(_, rows)| rows.to_vec()).collect();
        assert_eq!(got, vec![vec![0, 1, 3, 4, 5]]);
        // Nothing with a time: no group.
        let none = TimestampMicrosecondArray::from(vec![None, None]);
        assert_eq!(group_by_key(None, &none, 2).iter().count(), 0);
    }
}
