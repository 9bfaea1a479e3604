//! Incremental sliding-window aggregates of one key: the rows of its frames (event time and
//! the aggregates' arguments only), and one accumulator per aggregate and frame length
//! ([`Layout`]) that rows enter (when a decided row's time reaches them) and leave (when they
//! fall out of its frame), in time order.
//!
//! The accumulators follow DataFusion's sliding window accumulators, so the values equal the
//! batch query's: counts and distinct counts exactly, integer sums with the same wrapping,
//! min/max by a monotonic queue, averages as `sum / count` in `f64` (DataFusion too adds rows
//! entering the frame before removing those leaving it).

//!
//! [`accumulators`] holds the values and accumulators; [`stored`] how a key's frames are
//! written to and read from the state store.

mod accumulators;
mod args;
mod stored;

use std::collections::VecDeque;
use std::sync::Arc;

use datafusion::arrow::row::Rows;
use rampart_sql::WindowAggregate;

use accumulators::Acc;
pub use accumulators::{Val, heap};
use args::Args;

/// One frame chunk entry: the row's time, its order among rows of equal time in the chunk, and
/// its arguments ([`KeyAgg::load`] reads them back).
pub(super) fn push_frame_entry(
    out: &mut Vec<u8>,
    time: i64,
    ord: u64,
    args: impl IntoIterator<Item = impl std::borrow::Borrow<Val>>,
) {
    out.extend_from_slice(&time.to_le_bytes());
    out.extend_from_slice(&ord.to_le_bytes());
    for v in args {
        v.borrow().encode(out);
    }
}

/// Makes room in a list that is usually short (most keys hold a row or two): its first
/// allocation holds one element rather than the four a first push reserves.
pub(super) fn reserve_small<T>(list: &mut Vec<T>) {
    if list.capacity() == 0 {
        list.reserve_exact(1);
    }
}

/// Makes room for one more row in a key's column (frame times, argument values): exactly one
/// for the first (most keys of a wide log hold one row), then a quarter more each time it is
/// full. (A `VecDeque` doubles: a long frame's columns held up to twice its rows, about 1.5x
/// on average, and on dense logs the frames are most of the window state.)
pub(super) fn room_for_row<T>(column: &mut VecDeque<T>) {
    if column.len() == column.capacity() {
        let more = match column.len() {
            0 => 1,
            n => (n / 4).max(4),
        };
        column.reserve_exact(more);
    }
}

pub(super) fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

/// Frame chunks a key keeps before they are rewritten as one (bounds the reads of a key
/// coming back from disk, and each row is rewritten about once per this many saves).
pub(super) const MAX_FRAME_CHUNKS: usize = 32;

/// What a window state's keys keep and count: per row, one argument per aggregate of the
/// window (its `slots`, the same for every detector reading the state); per key, one
/// accumulator per aggregate and frame length (detectors whose windows differ only in their
/// frames' lengths share the rows and arguments, each reading its own accumulators).
#[derive(Debug, Clone)]
pub struct Layout {
    /// One per accumulator: its aggregate, with its frame.
    pub aggregates: Vec<WindowAggregate>,
    /// For each accumulator, the argument (slot) it reads.
    slot: Vec<usize>,
    /// Arguments per row.
    stride: usize,
}

impl Layout {
    /// The accumulators of one window's aggregates, each reading its own argument.
    pub fn new(aggregates: &[WindowAggregate]) -> Self {
        Self {
            aggregates: aggregates.to_vec(),
            slot: (0..aggregates.len()).collect(),
            stride: aggregates.len(),
        }
    }

    /// Adds another window's aggregates (the same functions of the same arguments, in the same
    /// order, as the first's; frames of any length): an accumulator for each frame not kept
    /// yet. Returns the accumulator each of its aggregates reads, in order.
    pub fn add(&mut self, aggregates: &[WindowAggregate]) -> Vec<usize> {
        debug_assert_eq!(aggregates.len(), self.stride, "a window with other arguments");
        aggregates
            .iter()
            .enumerate()
            .map(|(slot, a)| {
                let same = |k: &usize| {
                    let b = &self.aggregates[*k];
                    self.slot[*k] == slot && b.length == a.length && b.following == a.following
                };
                match (0..self.aggregates.len()).find(same) {
                    Some(k) => k,
                    None => {
                        self.aggregates.push(a.clone());
                        self.slot.push(slot);
                        self.aggregates.len() - 1
                    }
                }
            })
            .collect()
    }

    /// Arguments per row: one per aggregate of the window.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The longest frame (µs).
    fn longest(&self) -> i64 {
        self.aggregates.iter().map(|a| a.length).max().unwrap_or(0)
    }
}

/// A key's chunks as read from the store: (id, value) of each kind, in id order.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct KeyChunks {
    /// Frame chunks.
    pub frame: Vec<(u64, Vec<u8>)>,
    /// Pending chunks.
    pub pending: Vec<(u64, Vec<u8>)>,
    /// Chunks of rows that fired at once.
    pub fired: Vec<(u64, Vec<u8>)>,
}

/// A row's `pre` columns in Arrow's row format: its place among the rows of the batch it came
/// in (converted once for the batch, and shared by its rows until the last of them is decided),
/// or bytes of its own (read back from the store).
#[derive(Debug, Clone)]
pub enum RowBytes {
    /// Row `.1` of a batch's rows, `.2` bytes long (kept: counting a key's bytes does not read
    /// its batch's offsets).
    InBatch(Arc<Rows>, u32, u32),
    /// Its own bytes.
    Own(Box<[u8]>),
}

impl RowBytes {
    /// The row's bytes.
    pub fn get(&self) -> &[u8] {
        match self {
            Self::InBatch(rows, i, _) => rows.row(*i as usize).data(),
            Self::Own(bytes) => bytes,
        }
    }

    /// Heap bytes it stands for: its own, or its share of its batch's (the row and its offset).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Self::InBatch(_, _, len) => *len as usize + std::mem::size_of::<usize>(),
            Self::Own(bytes) => heap(bytes.len()),
        }
    }
}

impl Default for RowBytes {
    fn default() -> Self {
        Self::Own(Box::default())
    }
}

impl From<Box<[u8]>> for RowBytes {
    fn from(bytes: Box<[u8]>) -> Self {
        Self::Own(bytes)
    }
}

/// A row not decided yet.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// Event time (µs).
    pub time: i64,
    /// Row id.
    pub row: u64,
    /// The row's `pre` columns (Arrow row format).
    pub bytes: RowBytes,
    /// The detectors of the state (bit `i`: the `i`-th) whose answer for this row is known:
    /// they fired on it at once, or did not fire on its exact values.
    pub settled: u32,
    /// The detectors that fired on it at once.
    pub fired: u32,
    /// Its window values were computed over its frames, and no row arrived into them since.
    pub evaluated: bool,
    /// Those values, kept for detectors that decide at the watermark.
    pub values: Option<Box<[Val]>>,
}

/// A row to run detectors' conditions on (see [`KeyAgg::decide`]). Its window values, one per
/// accumulator of the [`Layout`], are in the list of values `decide` fills, at the row's place.
#[derive(Debug)]
pub struct Due {
    /// Event time (µs).
    pub time: i64,
    /// Row id.
    pub row: u64,
    /// Its `pre` columns (for a row decided early, not for good: empty, still its pending
    /// row's, [`KeyAgg::pending_bytes`]).
    pub bytes: RowBytes,
    /// The detectors to run on it (bits).
    pub members: u32,
    /// Decided for good (the watermark passed it): it leaves the key.
    pub last: bool,
}

/// A key's rows that fired at once, for the checkpoints.
#[derive(Debug, Clone, Default)]
struct Fired {
    /// Fired since the last save: (time, row id, detector tag).
    log: Vec<(i64, u64, u64)>,
    /// Saved chunks of fired rows: (id, newest event time in it).
    chunks: Vec<(u64, i64)>,
}

impl Fired {
    /// Heap bytes: the box and its lists.
    fn bytes(&self) -> usize {
        heap(std::mem::size_of::<Self>())
            + heap(self.log.capacity() * std::mem::size_of::<(i64, u64, u64)>())
            + heap(self.chunks.capacity() * std::mem::size_of::<(u64, i64)>())
    }
}

/// A key's frame rows and accumulators. Rows are in event-time order and numbered by a
/// sequence (`front` is the number of `times[0]`); rows numbered below `added` are in the
/// accumulators, whose frames end at `frame_end`, and aggregate `i`'s frame starts at row
/// `starts[i]`. A row that arrives at or before the newest evaluated time (a straggler within
/// the allowed lateness) makes the rows whose frames it enters be evaluated again, and, at or
/// before `frame_end`, empties the accumulators first.
///
/// On disk a key is the chunks of rows it got between two checkpoints, each written once:
/// frame chunks (time and arguments) and pending chunks (the `pre` columns of rows not decided
/// yet). Everything else follows from the rows and the time up to which rows are decided (see
/// [`KeyAgg::load`]), so a checkpoint writes what arrived, not what the key holds.
#[derive(Debug, Clone)]
pub struct KeyAgg {
    times: VecDeque<i64>,
    /// The rows' arguments, one typed column per argument (see [`Layout`]).
    args: Args,
    front: u64,
    added: u64,
    starts: Box<[u64]>,
    accs: Box<[Acc]>,
    /// Rows not decided yet, by (time, row id).
    pub pending: Vec<Waiting>,
    /// The time the accumulators' frames end at (`i64::MIN`: they hold no row): the newest
    /// evaluated row's time plus `following`.
    frame_end: i64,
    /// How far the frames look ahead of their row (µs; 0: they end at it). A row is then
    /// decided once every row up to its time plus this has arrived.
    following: i64,
    /// The newest time a row was evaluated at: a row arriving at or before it may be in the
    /// frames of rows already evaluated (even after the accumulators were emptied).
    evaluated_to: i64,
    /// Rows that fired at once, kept for the checkpoints (boxed: most keys have none).
    fired: Option<Box<Fired>>,
    /// Rows that arrived since the last save: (time, row id). Not kept while `whole`.
    fresh: Vec<(i64, u64)>,
    /// Every row held is to be written by the next save (one frame chunk and one pending
    /// chunk replacing the others), so `fresh` is not kept: a key with nothing on disk yet (a
    /// new key, or one a temporary state has not evicted: it may never be written), or one
    /// whose rows have all arrived since the last save.
    whole: bool,
    /// Saved chunks: (id, newest event time in it).
    frame_chunks: Vec<(u64, i64)>,
    pending_chunks: Vec<(u64, i64)>,
    next_chunk: u64,
}

impl KeyAgg {
    /// An empty key.
    pub fn new(layout: &Layout) -> Self {
        let aggregates = &layout.aggregates;
        Self {
            times: VecDeque::new(),
            args: Args::new(layout.stride),
            front: 0,
            added: 0,
            starts: vec![0; aggregates.len()].into(),
            accs: aggregates.iter().map(Acc::new).collect(),
            pending: Vec::new(),
            frame_end: i64::MIN,
            following: aggregates.iter().map(|a| a.following).max().unwrap_or(0),
            evaluated_to: i64::MIN,
            fired: None,
            fresh: Vec::new(),
            whole: false,
            frame_chunks: Vec::new(),
            pending_chunks: Vec::new(),
            next_chunk: 0,
        }
    }

    /// Arguments per row.
    fn stride(&self) -> usize {
        self.args.stride()
    }

    /// The newest event time held.
    pub fn newest(&self) -> Option<i64> {
        let frame = self.times.back().copied();
        let pending = self.pending.last().map(|p| p.time);
        frame.max(pending)
    }

    /// Heap bytes, allocation by allocation (with the allocator's rounding): the boxed key
    /// itself, every buffer's capacity, the text values and the pending rows.
    pub fn bytes(&self) -> usize {
        fn buffer<T>(capacity: usize) -> usize {
            heap(capacity * std::mem::size_of::<T>())
        }
        let accs: usize = self
            .accs
            .iter()
            .map(|a| match a {
                Acc::Distinct(values) => values.bytes(),
                Acc::Extreme { queue, .. } => buffer::<(u64, Val)>(queue.capacity()),
                _ => 0,
            })
            .sum();
        heap(std::mem::size_of::<Self>())
            + buffer::<i64>(self.times.capacity())
            + self.args.bytes()
            + buffer::<u64>(self.starts.len())
            + buffer::<Acc>(self.accs.len())
            + accs
            + buffer::<Waiting>(self.pending.capacity())
            + self
                .pending
                .iter()
                .map(|p| p.bytes.heap_bytes() + p.values.as_ref().map_or(0, |v| buffer::<Val>(v.len())))
                .sum::<usize>()
            + self.fired.as_ref().map_or(0, |f| f.bytes())
            + buffer::<(i64, u64)>(self.fresh.capacity())
            + buffer::<(u64, i64)>(self.frame_chunks.capacity() + self.pending_chunks.capacity())
    }

    /// Adds a row that arrived: into the frame rows (after every row already in the
    /// accumulators, so never before a decided row) and into the pending rows. A row at or
    /// before the accumulators' frame end (a straggler) first empties them, and the pending
    /// rows it may count for (from its time less `following` on) are to be evaluated again
    /// (except for what fired on them).
    /// (`args` are taken: left null.)
    pub fn insert(&mut self, layout: &Layout, time: i64, row: u64, args: &mut [Val], bytes: RowBytes) {
        let reaches_back_to = time.saturating_sub(self.following);
        if reaches_back_to <= self.evaluated_to {
            for p in self.pending.iter_mut().filter(|p| p.time >= reaches_back_to) {
                p.evaluated = false;
                p.values = None;
                p.settled = p.fired;
            }
        }
        if time <= self.frame_end {
            self.rewind();
        }
        // A text a distinct count already holds: the row shares its allocation.
        for (acc, &slot) in self.accs.iter().zip(&layout.slot) {
            let v = &mut args[slot];
            if let (Acc::Distinct(values), Val::Str(_)) = (acc, &*v)
                && let Some(held) = values.get(v)
            {
                *v = held.clone();
            }
        }
        room_for_row(&mut self.times);
        reserve_small(&mut self.pending);
        // Written whole from here: a key with nothing on disk (every row is new), or one that
        // got more rows since the last save than it holds (writing them all is no more than
        // writing the new ones); the list of new ones is dropped.
        let nothing_on_disk =
            self.fresh.is_empty() && self.frame_chunks.is_empty() && self.pending_chunks.is_empty();
        if !self.whole && (nothing_on_disk || self.fresh.len() >= self.times.len() + 8) {
            self.whole = true;
            self.fresh = Vec::new();
        }
        if !self.whole {
            reserve_small(&mut self.fresh);
            self.fresh.push((time, row));
        }
        let first_free = (self.added - self.front) as usize;
        let mut at = self.times.len();
        while at > first_free && self.times[at - 1] > time {
            at -= 1;
        }
        self.times.insert(at, time);
        self.args.insert(at, args.iter_mut().map(std::mem::take));
        let p = self.pending.partition_point(|w| (w.time, w.row) <= (time, row));
        self.pending.insert(
            p,
            Waiting {
                time,
                row,
                bytes,
                settled: 0,
                fired: 0,
                evaluated: false,
                values: None,
            },
        );
    }

    /// Empties the accumulators: no row has entered them.
    fn rewind(&mut self) {
        for acc in &mut *self.accs {
            acc.reset();
        }
        self.added = self.front;
        self.starts.iter_mut().for_each(|s| *s = self.front);
        self.frame_end = i64::MIN;
    }

    /// Where pending row (`time`, `row`) is in `pending`, if it is pending.
    fn pending_at(&self, time: i64, row: u64) -> Option<usize> {
        let at = self.pending.partition_point(|w| (w.time, w.row) < (time, row));
        self.pending
            .get(at)
            .is_some_and(|w| (w.time, w.row) == (time, row))
            .then_some(at)
    }

    /// The `pre` columns of pending row (`time`, `row`), if it is pending.
    pub fn pending_bytes(&self, time: i64, row: u64) -> Option<&RowBytes> {
        self.pending_at(time, row).map(|at| &self.pending[at].bytes)
    }

    /// The oldest pending time.
    pub fn oldest_pending(&self) -> Option<i64> {
        self.pending.first().map(|p| p.time)
    }

    /// The oldest pending time with work for the detectors in `at_once` (bits): not evaluated
    /// yet, or one of them not settled.
    pub fn oldest_unsettled(&self, at_once: u32) -> Option<i64> {
        self.pending.get(self.first_unsettled(at_once)).map(|p| p.time)
    }

    /// The first pending row with work for the detectors in `at_once`. Such rows are a suffix
    /// of the pending rows: rows are evaluated in time order, rows arriving after the frames'
    /// end come after every evaluated row, and a straggler unsettles every row from its time on.
    fn first_unsettled(&self, at_once: u32) -> usize {
        self.pending
            .partition_point(|p| p.evaluated && at_once & !p.settled == 0)
    }

    /// Notes that detector `bit` (whose stable tag is `tag`) fired at once on pending row
    /// (`time`, `row`): it is not decided again, even after a restart.
    pub fn mark_fired(&mut self, time: i64, row: u64, bit: u32, tag: u64) {
        if let Some(at) = self.pending_at(time, row) {
            let w = &mut self.pending[at];
            w.fired |= bit;
            w.settled |= bit;
            let fired = self.fired.get_or_insert_with(Box::default);
            reserve_small(&mut fired.log);
            fired.log.push((time, row, tag));
        }
    }

    /// The rows to run detectors on: every pending row older than `watermark` (all with
    /// `None`) for the detectors in `members` not settled on it, for good; and, for the
    /// detectors in `at_once` (bits; those whose condition only becomes true), every other
    /// pending row older than `complete` not settled for them, with its values over the rows
    /// arrived so far. Rows are evaluated in time order (a row's frames move forward); values
    /// are kept on a row for later only when `hold` (some member decides at the watermark).
    /// Rows no frame of a row at or after `watermark` reaches are forgotten. The rows go to
    /// `out`, their window values to the end of `values` (one per accumulator, in the rows'
    /// order): no allocation per row or key.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &mut self,
        layout: &Layout,
        watermark: Option<i64>,
        complete: i64,
        members: u32,
        at_once: u32,
        hold: bool,
        out: &mut Vec<Due>,
        values: &mut Vec<Val>,
    ) {
        let last_before = watermark.unwrap_or(i64::MAX);
        let evaluate_before = match watermark {
            None => i64::MAX,
            Some(w) if at_once == 0 => w,
            Some(w) => complete.max(w),
        };
        let keep_from = watermark.map_or(i64::MIN, |w| w.saturating_sub(layout.longest()));
        // The rows decided for good, then those with work for the detectors deciding at once
        // (the settled ones between need nothing), in time order.
        let decided = self.pending.partition_point(|p| p.time < last_before);
        let open = self.first_unsettled(at_once).max(decided);
        let judged = self
            .pending
            .partition_point(|p| p.time < evaluate_before)
            .max(open);
        for i in (0..decided).chain(open..judged) {
            let time = self.pending[i].time;
            let last = i < decided;
            let wanted = if last { members } else { at_once } & !self.pending[i].settled;
            let held = self.pending[i].values.take();
            let start = values.len();
            let has_values = match held {
                Some(v) if self.pending[i].evaluated => {
                    values.extend(v.into_vec());
                    true
                }
                _ if self.pending[i].evaluated && wanted == 0 => false,
                _ => {
                    if time.saturating_add(self.following) < self.frame_end {
                        // (Only if a row was left unevaluated behind the frames.)
                        self.rewind();
                    }
                    self.pending[i].evaluated = true;
                    self.values_at(layout, time, keep_from, values);
                    true
                }
            };
            let p = &mut self.pending[i];
            if !last {
                p.settled |= wanted;
                if hold && has_values {
                    p.values = Some(values[start..].into());
                }
            }
            if wanted == 0 {
                values.truncate(start);
            } else {
                out.push(Due {
                    time,
                    row: p.row,
                    // (A row decided early stays pending: its columns are read from it only if
                    // a detector is to judge it, see `pending_bytes`.)
                    bytes: if last {
                        std::mem::take(&mut p.bytes)
                    } else {
                        RowBytes::default()
                    },
                    members: wanted,
                    last,
                });
            }
        }
        self.pending.drain(..decided);
        if self.pending.is_empty() {
            // (Freed: most keys wait for nothing most of the time.)
            self.pending = Vec::new();
        }
    }

    /// Decides the pending rows older than `limit` (all with `None`), in time order, for one
    /// detector deciding at the watermark: their row ids, window values and `pre` columns.
    #[cfg(test)]
    pub fn decide_until(&mut self, layout: &Layout, limit: Option<i64>) -> Vec<(u64, Vec<Val>, Box<[u8]>)> {
        let (mut due, mut values) = (Vec::new(), Vec::new());
        self.decide(layout, limit, i64::MIN, 1, 0, false, &mut due, &mut values);
        let n = layout.aggregates.len();
        due.into_iter()
            .enumerate()
            .map(|(i, d)| (d.row, values[i * n..(i + 1) * n].to_vec(), d.bytes.get().into()))
            .collect()
    }

    /// Moves every frame to end at `time` plus `following` (not before the current end) and
    /// adds the aggregates' values for the row at `time` to `out`. Rows every frame has left and
    /// older than `keep_from` are dropped (rows from `keep_from` on may still be in the frames
    /// of a row evaluated again).
    fn values_at(&mut self, layout: &Layout, time: i64, keep_from: i64, out: &mut Vec<Val>) {
        let end = time.saturating_add(self.following);
        self.frame_end = end;
        self.evaluated_to = self.evaluated_to.max(time);
        // Rows at or before the frames' end enter every frame...
        while ((self.added - self.front) as usize) < self.times.len()
            && self.times[(self.added - self.front) as usize] <= end
        {
            let i = (self.added - self.front) as usize;
            for (acc, &slot) in self.accs.iter_mut().zip(&layout.slot) {
                acc.add(&self.args.get(i, slot), self.added);
            }
            self.added += 1;
        }
        // ...then rows older than each frame leave it.
        for (k, acc) in self.accs.iter_mut().enumerate() {
            let from = time.saturating_sub(layout.aggregates[k].length);
            let slot = layout.slot[k];
            while self.starts[k] < self.added && self.times[(self.starts[k] - self.front) as usize] < from {
                let i = (self.starts[k] - self.front) as usize;
                acc.retract(&self.args.get(i, slot), self.starts[k]);
                self.starts[k] += 1;
            }
        }
        let oldest = self.starts.iter().copied().min().unwrap_or(self.added);
        while self.front < oldest && self.times.front().is_some_and(|t| *t < keep_from) {
            self.times.pop_front();
            self.args.pop_front();
            self.front += 1;
        }
        out.extend(
            self.accs
                .iter()
                .zip(&layout.slot)
                .map(|(a, &slot)| a.value(self.args.kind(slot))),
        );
    }

    /// Whether the key holds nothing (its frames moved past every row).
    pub fn is_empty(&self) -> bool {
        self.times.is_empty() && self.pending.is_empty()
    }

    /// Drops every row (the key is forgotten; [`Self::save`] then deletes its chunks).
    pub fn clear(&mut self) {
        self.times.clear();
        self.args.clear();
        self.pending.clear();
        if let Some(fired) = &mut self.fired {
            fired.log.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, StringArray};
    use datafusion::arrow::datatypes::DataType;
    use datafusion::physical_expr::expressions::Column;
    use rampart_sql::AggregateKind;

    use super::*;

    fn text(v: &Val) -> &Arc<str> {
        match v {
            Val::Str(s) => s,
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn rows_share_the_allocation_of_equal_texts() {
        // Within a batch.
        let array: ArrayRef = Arc::new(StringArray::from(vec![
            Some("ListUsers"),
            None,
            Some("ListUsers"),
            Some("GetUser"),
        ]));
        let column = Val::column(&array).unwrap();
        assert_eq!(column[1], Val::Null);
        assert!(Arc::ptr_eq(text(&column[0]), text(&column[2])));
        assert!(!Arc::ptr_eq(text(&column[0]), text(&column[3])));
        assert_eq!(&**text(&column[3]), "GetUser");

        // Across batches: a row shares the text its key's distinct count holds.
        let aggregates = [WindowAggregate {
            function: AggregateKind::CountDistinct,
            argument: Some(Arc::new(Column::new("action", 0))),
            length: 60_000_000,
            following: 0,
            output: DataType::Int64,
        }];
        let layout = Layout::new(&aggregates);
        let mut key = KeyAgg::new(&layout);
        key.insert(
            &layout,
            1,
            0,
            &mut [Val::Str("ListUsers".into())],
            Box::<[u8]>::default().into(),
        );
        let decided = key.decide_until(&layout, Some(2));
        assert_eq!(decided[0].1, vec![Val::Int(1)]);
        key.insert(
            &layout,
            3,
            1,
            &mut [Val::Str("ListUsers".into())],
            Box::<[u8]>::default().into(),
        );
        key.insert(
            &layout,
            4,
            2,
            &mut [Val::Str("GetUser".into())],
            Box::<[u8]>::default().into(),
        );
        let held = |key: &KeyAgg, row: usize| key.args.get(row, 0);
        assert!(Arc::ptr_eq(text(&held(&key, 0)), text(&held(&key, 1))));
        assert!(!Arc::ptr_eq(text(&held(&key, 0)), text(&held(&key, 2))));
        let decided = key.decide_until(&layout, None);
        let counts: Vec<_> = decided.into_iter().map(|(_, v, _)| v).collect();
        assert_eq!(counts, vec![vec![Val::Int(1)], vec![Val::Int(2)]]);

        // Read back from a saved chunk.
        let mut chunk = i64::MAX.to_le_bytes().to_vec();
        push_frame_entry(&mut chunk, 1, 0, [Val::Str("ListUsers".into())].iter());
        push_frame_entry(&mut chunk, 2, 1, [Val::Str("ListUsers".into())].iter());
        let chunks = KeyChunks {
            frame: vec![(0, chunk)],
            ..KeyChunks::default()
        };
        let loaded = KeyAgg::load(&layout, &chunks, &[], 3).unwrap();
        assert_eq!(loaded.times.len(), 2);
        assert!(Arc::ptr_eq(text(&held(&loaded, 0)), text(&held(&loaded, 1))));
    }
}
