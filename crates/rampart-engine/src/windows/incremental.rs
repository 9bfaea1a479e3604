//! Incremental sliding-window aggregates of one key: the rows of its frames (event time and
//! the aggregates' arguments only), and one accumulator per aggregate that rows enter (when a
//! decided row's time reaches them) and leave (when they fall out of its frame), in time order.
//!
//! The accumulators follow DataFusion's sliding window accumulators, so the values equal the
//! batch query's: counts and distinct counts exactly, integer sums with the same wrapping,
//! min/max by a monotonic queue, averages as `sum / count` in `f64` (DataFusion too adds rows
//! entering the frame before removing those leaving it).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Int64Array, StringArray, UInt64Array, new_null_array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use rampart_sql::{AggregateKind, WindowAggregate};
use rustc_hash::FxHashSet;

use rampart_state::Commit;
use rampart_state::codec::{FIRED_CHUNK, FRAME_CHUNK, PENDING_CHUNK};

/// One argument value.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Val {
    /// SQL NULL.
    #[default]
    Null,
    /// Signed integers.
    Int(i64),
    /// Unsigned integers.
    UInt(u64),
    /// Floats.
    Float(f64),
    /// Text.
    Str(Arc<str>),
}

impl Eq for Val {}

impl Val {
    /// Heap bytes of the value (text: its share of the allocation it shares with other values
    /// of the same text).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Val::Str(s) => heap(16 + s.len()) / Arc::strong_count(s),
            _ => 0,
        }
    }

    /// A text value sharing its allocation with an equal one in `texts` (added there if none
    /// is): rows repeat a handful of texts (actions, regions, user names), one allocation each
    /// rather than one per row.
    fn text(text: &str, texts: &mut FxHashSet<Arc<str>>) -> Val {
        Val::Str(match texts.get(text) {
            Some(t) => Arc::clone(t),
            None => {
                let t: Arc<str> = text.into();
                texts.insert(Arc::clone(&t));
                t
            }
        })
    }
}

/// The bytes an allocation of `size` bytes takes: allocators round up to size classes (about
/// an eighth apart, at least 16 bytes).
pub fn heap(size: usize) -> usize {
    if size == 0 {
        0
    } else {
        (size + size / 8).next_multiple_of(16)
    }
}

impl std::hash::Hash for Val {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            Val::Null => 0u8.hash(state),
            Val::Int(v) => v.hash(state),
            Val::UInt(v) => v.hash(state),
            Val::Float(v) => v.to_bits().hash(state),
            Val::Str(s) => s.hash(state),
        }
    }
}

impl Val {
    fn cmp_same(&self, other: &Val) -> std::cmp::Ordering {
        use std::cmp::Ordering::Equal;
        match (self, other) {
            (Val::Int(a), Val::Int(b)) => a.cmp(b),
            (Val::UInt(a), Val::UInt(b)) => a.cmp(b),
            (Val::Float(a), Val::Float(b)) => a.total_cmp(b),
            (Val::Str(a), Val::Str(b)) => a.cmp(b),
            _ => Equal,
        }
    }

    /// The values of `array` (integers, floats or text), one per row.
    pub fn column(array: &ArrayRef) -> Result<Vec<Val>, String> {
        let t = array.data_type();
        let n = array.len();
        let cast_to = |to: &DataType| cast(array, to).map_err(|e| e.to_string());
        let out = if t.is_signed_integer() {
            let a = cast_to(&DataType::Int64)?;
            let a = a.as_any().downcast_ref::<Int64Array>().expect("cast to Int64");
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Val::Null
                    } else {
                        Val::Int(a.value(i))
                    }
                })
                .collect()
        } else if t.is_unsigned_integer() {
            let a = cast_to(&DataType::UInt64)?;
            let a = a.as_any().downcast_ref::<UInt64Array>().expect("cast to UInt64");
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Val::Null
                    } else {
                        Val::UInt(a.value(i))
                    }
                })
                .collect()
        } else if t.is_floating() {
            let a = cast_to(&DataType::Float64)?;
            let a = a
                .as_any()
                .downcast_ref::<Float64Array>()
                .expect("cast to Float64");
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Val::Null
                    } else {
                        Val::Float(a.value(i))
                    }
                })
                .collect()
        } else {
            let a = cast_to(&DataType::Utf8)?;
            let a = a.as_any().downcast_ref::<StringArray>().expect("cast to Utf8");
            // One allocation per distinct text of the batch, shared by its rows.
            let mut texts = FxHashSet::default();
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        Val::Null
                    } else {
                        Val::text(a.value(i), &mut texts)
                    }
                })
                .collect()
        };
        Ok(out)
    }

    /// A column of `values` with type `to`.
    pub fn array(values: &[Val], to: &DataType) -> Result<ArrayRef, String> {
        let first = values.iter().find(|v| **v != Val::Null);
        let array: ArrayRef = match first {
            None => return Ok(new_null_array(to, values.len())),
            Some(Val::Int(_)) => Arc::new(Int64Array::from_iter(values.iter().map(|v| match v {
                Val::Int(x) => Some(*x),
                _ => None,
            }))),
            Some(Val::UInt(_)) => Arc::new(UInt64Array::from_iter(values.iter().map(|v| match v {
                Val::UInt(x) => Some(*x),
                _ => None,
            }))),
            Some(Val::Float(_)) => Arc::new(Float64Array::from_iter(values.iter().map(|v| match v {
                Val::Float(x) => Some(*x),
                _ => None,
            }))),
            Some(Val::Str(_)) | Some(Val::Null) => {
                Arc::new(StringArray::from_iter(values.iter().map(|v| match v {
                    Val::Str(x) => Some(x.as_ref()),
                    _ => None,
                })))
            }
        };
        if array.data_type() == to {
            Ok(array)
        } else {
            cast(&array, to).map_err(|e| e.to_string())
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Val::Null => out.push(0),
            Val::Int(v) => {
                out.push(1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Val::UInt(v) => {
                out.push(2);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Val::Float(v) => {
                out.push(3);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Val::Str(s) => {
                out.push(4);
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }

    /// Reads back what [`Self::encode`] wrote (texts shared through `texts`).
    fn decode(input: &mut &[u8], texts: &mut FxHashSet<Arc<str>>) -> Option<Val> {
        let (&tag, rest) = input.split_first()?;
        *input = rest;
        Some(match tag {
            0 => Val::Null,
            1 => Val::Int(i64::from_le_bytes(take(input, 8)?.try_into().ok()?)),
            2 => Val::UInt(u64::from_le_bytes(take(input, 8)?.try_into().ok()?)),
            3 => Val::Float(f64::from_le_bytes(take(input, 8)?.try_into().ok()?)),
            4 => {
                let len = u32::from_le_bytes(take(input, 4)?.try_into().ok()?) as usize;
                Val::text(std::str::from_utf8(take(input, len)?).ok()?, texts)
            }
            _ => return None,
        })
    }
}

/// One frame chunk entry: the row's time, its order among rows of equal time in the chunk, and
/// its arguments ([`KeyAgg::load`] reads them back).
fn push_frame_entry<'a>(out: &mut Vec<u8>, time: i64, ord: u64, args: impl Iterator<Item = &'a Val>) {
    out.extend_from_slice(&time.to_le_bytes());
    out.extend_from_slice(&ord.to_le_bytes());
    for v in args {
        v.encode(out);
    }
}

/// Makes room in a list that is usually short (most keys hold a row or two): its first
/// allocation holds one element rather than the four a first push reserves.
fn reserve_small<T>(list: &mut Vec<T>) {
    if list.capacity() == 0 {
        list.reserve_exact(1);
    }
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

/// One aggregate's running state over its current frame.
#[derive(Debug, Clone)]
enum Acc {
    /// count(*) (`star`) or count(x).
    Count {
        star: bool,
        n: i64,
    },
    Distinct(HashMap<Val, u32>),
    Sum {
        int: i64,
        uint: u64,
        float: f64,
        n: i64,
    },
    Avg {
        int: i128,
        float: f64,
        n: i64,
    },
    /// Monotonic queue of (sequence number, value): the front is the frame's min (or max).
    Extreme {
        max: bool,
        queue: VecDeque<(u64, Val)>,
    },
}

impl Acc {
    fn new(a: &WindowAggregate) -> Self {
        match a.function {
            AggregateKind::Count => Acc::Count {
                star: a.argument.is_none(),
                n: 0,
            },
            AggregateKind::CountDistinct => Acc::Distinct(HashMap::new()),
            AggregateKind::Sum => Acc::Sum {
                int: 0,
                uint: 0,
                float: 0.0,
                n: 0,
            },
            AggregateKind::Avg => Acc::Avg {
                int: 0,
                float: 0.0,
                n: 0,
            },
            AggregateKind::Min | AggregateKind::Max => Acc::Extreme {
                max: a.function == AggregateKind::Max,
                queue: VecDeque::new(),
            },
        }
    }

    /// Empty again (a frame of no rows).
    fn reset(&mut self) {
        match self {
            Acc::Count { n, .. } => *n = 0,
            Acc::Distinct(values) => values.clear(),
            Acc::Sum { int, uint, float, n } => {
                (*int, *uint, *float, *n) = (0, 0, 0.0, 0);
            }
            Acc::Avg { int, float, n } => {
                (*int, *float, *n) = (0, 0.0, 0);
            }
            Acc::Extreme { queue, .. } => queue.clear(),
        }
    }

    fn add(&mut self, v: &Val, seq: u64) {
        match self {
            Acc::Distinct(values) => {
                if *v != Val::Null {
                    *values.entry(v.clone()).or_default() += 1;
                }
            }
            Acc::Extreme { max, queue } => {
                if *v == Val::Null {
                    return;
                }
                while queue.back().is_some_and(|(_, b)| {
                    let o = b.cmp_same(v);
                    if *max { o.is_le() } else { o.is_ge() }
                }) {
                    queue.pop_back();
                }
                queue.push_back((seq, v.clone()));
            }
            counter => counter.shift(v, 1),
        }
    }

    fn retract(&mut self, v: &Val, seq: u64) {
        match self {
            Acc::Distinct(values) => {
                if let Some(c) = values.get_mut(v) {
                    *c -= 1;
                    if *c == 0 {
                        values.remove(v);
                    }
                }
            }
            Acc::Extreme { queue, .. } => {
                if queue.front().is_some_and(|(s, _)| *s == seq) {
                    queue.pop_front();
                }
            }
            counter => counter.shift(v, -1),
        }
    }

    /// Count, sum and avg: `v` enters (`sign` 1) or leaves (-1). Integer sums wrap as
    /// DataFusion's do (subtracting is adding the wrapping negation); float negation is exact.
    fn shift(&mut self, v: &Val, sign: i64) {
        match (self, v) {
            (Acc::Count { star, n }, v) if *star || *v != Val::Null => *n += sign,
            (Acc::Sum { int, n, .. }, Val::Int(x)) => {
                *int = int.wrapping_add(x.wrapping_mul(sign));
                *n += sign;
            }
            (Acc::Sum { uint, n, .. }, Val::UInt(x)) => {
                *uint = uint.wrapping_add(if sign > 0 { *x } else { x.wrapping_neg() });
                *n += sign;
            }
            (Acc::Sum { float, n, .. } | Acc::Avg { float, n, .. }, Val::Float(x)) => {
                *float += sign as f64 * x;
                *n += sign;
            }
            (Acc::Avg { int, n, .. }, Val::Int(x)) => {
                *int += i128::from(sign) * i128::from(*x);
                *n += sign;
            }
            (Acc::Avg { int, n, .. }, Val::UInt(x)) => {
                *int += i128::from(sign) * i128::from(*x);
                *n += sign;
            }
            _ => {}
        }
    }

    fn value(&self, kind: &Val) -> Val {
        match self {
            Acc::Count { n, .. } => Val::Int(*n),
            Acc::Distinct(values) => Val::Int(values.len() as i64),
            Acc::Sum { n: 0, .. } | Acc::Avg { n: 0, .. } => Val::Null,
            Acc::Sum { int, uint, float, .. } => match kind {
                Val::UInt(_) => Val::UInt(*uint),
                Val::Float(_) => Val::Float(*float),
                _ => Val::Int(*int),
            },
            Acc::Avg { int, float, n } => match kind {
                Val::Float(_) => Val::Float(*float / *n as f64),
                _ => Val::Float(*int as f64 / *n as f64),
            },
            Acc::Extreme { queue, .. } => queue.front().map_or(Val::Null, |(_, v)| v.clone()),
        }
    }
}

/// Frame chunks a key keeps before they are rewritten as one (bounds the reads of a key
/// coming back from disk, and each row is rewritten about once per this many saves).
const MAX_FRAME_CHUNKS: usize = 32;

/// A key's chunks as read from the store: (id, value) of each kind, in id order.
#[derive(Debug, Default)]
pub struct KeyChunks {
    /// Frame chunks.
    pub frame: Vec<(u64, Vec<u8>)>,
    /// Pending chunks.
    pub pending: Vec<(u64, Vec<u8>)>,
    /// Chunks of rows that fired at once.
    pub fired: Vec<(u64, Vec<u8>)>,
}

/// A row not decided yet.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// Event time (µs).
    pub time: i64,
    /// Row id.
    pub row: u64,
    /// The row's `pre` columns (Arrow row format).
    pub bytes: Box<[u8]>,
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

/// A row to run detectors' conditions on (see [`KeyAgg::decide`]).
#[derive(Debug)]
pub struct Due {
    /// Event time (µs).
    pub time: i64,
    /// Row id.
    pub row: u64,
    /// Its window values.
    pub values: Vec<Val>,
    /// Its `pre` columns.
    pub bytes: Box<[u8]>,
    /// The detectors to run on it (bits).
    pub members: u32,
    /// Decided for good (the watermark passed it): it leaves the key.
    pub last: bool,
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
    /// One value per row and aggregate (row-major).
    args: VecDeque<Val>,
    front: u64,
    added: u64,
    starts: Vec<u64>,
    accs: Vec<Acc>,
    /// The type each aggregate's argument had (Null for count(*)); decides the result kind.
    kinds: Vec<Val>,
    /// Rows not decided yet, by (time, row id).
    pub pending: Vec<Waiting>,
    /// The time the accumulators' frames end at (`i64::MIN`: they hold no row).
    frame_end: i64,
    /// The newest time a row was evaluated at: a row arriving at or before it may be in the
    /// frames of rows already evaluated (even after the accumulators were emptied).
    evaluated_to: i64,
    /// Fired at once since the last save: (time, row id, detector tag).
    fired_log: Vec<(i64, u64, u64)>,
    /// Saved chunks of fired rows: (id, newest event time in it).
    fired_chunks: Vec<(u64, i64)>,
    /// Rows that arrived since the last save: (time, row id).
    fresh: Vec<(i64, u64)>,
    /// Saved chunks: (id, newest event time in it).
    frame_chunks: Vec<(u64, i64)>,
    pending_chunks: Vec<(u64, i64)>,
    next_chunk: u64,
}

impl KeyAgg {
    /// An empty key.
    pub fn new(aggregates: &[WindowAggregate]) -> Self {
        Self {
            times: VecDeque::new(),
            args: VecDeque::new(),
            front: 0,
            added: 0,
            starts: vec![0; aggregates.len()],
            accs: aggregates.iter().map(Acc::new).collect(),
            kinds: vec![Val::Null; aggregates.len()],
            pending: Vec::new(),
            frame_end: i64::MIN,
            evaluated_to: i64::MIN,
            fired_log: Vec::new(),
            fired_chunks: Vec::new(),
            fresh: Vec::new(),
            frame_chunks: Vec::new(),
            pending_chunks: Vec::new(),
            next_chunk: 0,
        }
    }

    fn stride(&self) -> usize {
        self.accs.len()
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
                // hashbrown: buckets (a power of two, 8/7 of the capacity) of entries and
                // one control byte each.
                Acc::Distinct(m) if m.capacity() > 0 => {
                    let buckets = (m.capacity() * 8 / 7).next_power_of_two();
                    heap(buckets * (std::mem::size_of::<(Val, u32)>() + 1) + 16)
                }
                Acc::Extreme { queue, .. } => buffer::<(u64, Val)>(queue.capacity()),
                _ => 0,
            })
            .sum();
        let text: usize = self.args.iter().map(Val::heap_bytes).sum();
        heap(std::mem::size_of::<Self>())
            + buffer::<i64>(self.times.capacity())
            + buffer::<Val>(self.args.capacity())
            + text
            + buffer::<u64>(self.starts.capacity())
            + buffer::<Acc>(self.accs.capacity())
            + accs
            + buffer::<Val>(self.kinds.capacity())
            + buffer::<Waiting>(self.pending.capacity())
            + self
                .pending
                .iter()
                .map(|p| heap(p.bytes.len()) + p.values.as_ref().map_or(0, |v| buffer::<Val>(v.len())))
                .sum::<usize>()
            + buffer::<(i64, u64, u64)>(self.fired_log.capacity())
            + buffer::<(u64, i64)>(self.fired_chunks.capacity())
            + buffer::<(i64, u64)>(self.fresh.capacity())
            + buffer::<(u64, i64)>(self.frame_chunks.capacity() + self.pending_chunks.capacity())
    }

    /// Adds a row that arrived: into the frame rows (after every row already in the
    /// accumulators, so never before a decided row) and into the pending rows. A row at or
    /// before the accumulators' frame end (a straggler) first empties them, and the pending
    /// rows it may count for are to be evaluated again (except for what fired on them).
    pub fn insert(&mut self, time: i64, row: u64, mut args: Vec<Val>, bytes: Box<[u8]>) {
        if time <= self.evaluated_to {
            for p in self.pending.iter_mut().filter(|p| p.time >= time) {
                p.evaluated = false;
                p.values = None;
                p.settled = p.fired;
            }
        }
        if time <= self.frame_end {
            self.rewind();
        }
        for (kind, v) in self.kinds.iter_mut().zip(&args) {
            if *kind == Val::Null && *v != Val::Null {
                *kind = v.clone();
            }
        }
        // A text a distinct count already holds: the row shares its allocation.
        for (acc, v) in self.accs.iter().zip(args.iter_mut()) {
            if let (Acc::Distinct(values), Val::Str(_)) = (acc, &*v)
                && let Some((held, _)) = values.get_key_value(v)
            {
                *v = held.clone();
            }
        }
        if self.times.is_empty() {
            // As `reserve_small`, for the frame rows: one row's time and arguments.
            self.times.reserve_exact(1);
            self.args.reserve_exact(self.stride());
        }
        reserve_small(&mut self.pending);
        reserve_small(&mut self.fresh);
        self.fresh.push((time, row));
        let first_free = (self.added - self.front) as usize;
        let mut at = self.times.len();
        while at > first_free && self.times[at - 1] > time {
            at -= 1;
        }
        self.times.insert(at, time);
        let stride = self.stride();
        for (k, v) in args.into_iter().enumerate() {
            self.args.insert(at * stride + k, v);
        }
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
        for acc in &mut self.accs {
            acc.reset();
        }
        self.added = self.front;
        self.starts.iter_mut().for_each(|s| *s = self.front);
        self.frame_end = i64::MIN;
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
        let at = self.pending.partition_point(|w| (w.time, w.row) < (time, row));
        if let Some(w) = self
            .pending
            .get_mut(at)
            .filter(|w| (w.time, w.row) == (time, row))
        {
            w.fired |= bit;
            w.settled |= bit;
            reserve_small(&mut self.fired_log);
            self.fired_log.push((time, row, tag));
        }
    }

    /// The rows to run detectors on: every pending row older than `watermark` (all with
    /// `None`) for the detectors in `members` not settled on it, for good; and, for the
    /// detectors in `at_once` (bits; those whose condition only becomes true), every other
    /// pending row older than `complete` not settled for them, with its values over the rows
    /// arrived so far. Rows are evaluated in time order (a row's frames move forward); values
    /// are kept on a row for later only when `hold` (some member decides at the watermark).
    /// Rows no frame of a row at or after `watermark` reaches are forgotten.
    pub fn decide(
        &mut self,
        aggregates: &[WindowAggregate],
        watermark: Option<i64>,
        complete: i64,
        members: u32,
        at_once: u32,
        hold: bool,
    ) -> Vec<Due> {
        let last_before = watermark.unwrap_or(i64::MAX);
        let evaluate_before = match watermark {
            None => i64::MAX,
            Some(w) if at_once == 0 => w,
            Some(w) => complete.max(w),
        };
        let longest = aggregates.iter().map(|a| a.length).max().unwrap_or(0);
        let keep_from = watermark.map_or(i64::MIN, |w| w.saturating_sub(longest));
        let mut out = Vec::new();
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
            let values = match held {
                Some(v) if self.pending[i].evaluated => Some(v.into_vec()),
                _ if self.pending[i].evaluated && wanted == 0 => None,
                _ => {
                    if time < self.frame_end {
                        // (Only if a row was left unevaluated behind the frames.)
                        self.rewind();
                    }
                    self.pending[i].evaluated = true;
                    Some(self.values_at(aggregates, time, keep_from))
                }
            };
            let p = &mut self.pending[i];
            if !last {
                p.settled |= wanted;
                if hold {
                    p.values = values.as_ref().map(|v| v.clone().into_boxed_slice());
                }
            }
            if wanted != 0 {
                out.push(Due {
                    time,
                    row: p.row,
                    values: values.unwrap_or_default(),
                    bytes: if last {
                        std::mem::take(&mut p.bytes)
                    } else {
                        p.bytes.clone()
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
        out
    }

    /// Decides the pending rows older than `limit` (all with `None`), in time order, for one
    /// detector deciding at the watermark: their row ids, window values and `pre` columns.
    #[cfg(test)]
    pub fn decide_until(
        &mut self,
        aggregates: &[WindowAggregate],
        limit: Option<i64>,
    ) -> Vec<(u64, Vec<Val>, Box<[u8]>)> {
        self.decide(aggregates, limit, i64::MIN, 1, 0, false)
            .into_iter()
            .map(|d| (d.row, d.values, d.bytes))
            .collect()
    }

    /// Moves every frame to end at `time` (not before the current end) and returns the
    /// aggregates' values. Rows every frame has left and older than `keep_from` are dropped
    /// (rows from `keep_from` on may still be in the frames of a row evaluated again).
    fn values_at(&mut self, aggregates: &[WindowAggregate], time: i64, keep_from: i64) -> Vec<Val> {
        self.frame_end = time;
        self.evaluated_to = self.evaluated_to.max(time);
        let stride = self.stride();
        // Rows at or before `time` enter every frame...
        while ((self.added - self.front) as usize) < self.times.len()
            && self.times[(self.added - self.front) as usize] <= time
        {
            let i = (self.added - self.front) as usize;
            for (k, acc) in self.accs.iter_mut().enumerate() {
                acc.add(&self.args[i * stride + k], self.added);
            }
            self.added += 1;
        }
        // ...then rows older than each frame leave it.
        for (k, acc) in self.accs.iter_mut().enumerate() {
            let from = time.saturating_sub(aggregates[k].length);
            while self.starts[k] < self.added && self.times[(self.starts[k] - self.front) as usize] < from {
                let i = (self.starts[k] - self.front) as usize;
                acc.retract(&self.args[i * stride + k], self.starts[k]);
                self.starts[k] += 1;
            }
        }
        let oldest = self.starts.iter().copied().min().unwrap_or(self.added);
        while self.front < oldest && self.times.front().is_some_and(|t| *t < keep_from) {
            self.times.pop_front();
            for _ in 0..stride {
                self.args.pop_front();
            }
            self.front += 1;
        }
        self.accs
            .iter()
            .zip(&self.kinds)
            .map(|(a, k)| a.value(k))
            .collect()
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
        self.fired_log.clear();
    }

    /// Adds to `out` the chunk writes that bring the key on disk up to date: a frame chunk and
    /// a pending chunk of the rows that arrived since the last save (or, past
    /// [`MAX_FRAME_CHUNKS`], one frame chunk of every row held instead of the others), and
    /// deletes of chunks no frame or pending row needs any more. `chunk_key` names a chunk by
    /// kind and id; rows older than `decided_until` are decided; a frame chunk is of no use
    /// `horizon` µs after its newest row, a pending chunk `lateness` µs after. A key that
    /// holds nothing deletes every chunk.
    pub fn save(
        &mut self,
        chunk_key: impl Fn(u8, u64) -> Vec<u8>,
        decided_until: i64,
        horizon: i64,
        lateness: i64,
        out: &mut Commit<'_>,
    ) {
        let stride = self.stride();
        if self.is_empty() {
            for (id, _) in self.frame_chunks.drain(..) {
                out.chunk(&chunk_key(FRAME_CHUNK, id), None);
            }
            for (id, _) in self.pending_chunks.drain(..) {
                out.chunk(&chunk_key(PENDING_CHUNK, id), None);
            }
            for (id, _) in self.fired_chunks.drain(..) {
                out.chunk(&chunk_key(FIRED_CHUNK, id), None);
            }
            self.fresh = Vec::new();
            self.fired_log = Vec::new();
            return;
        }
        self.fresh.sort_unstable();
        if !self.fresh.is_empty() {
            let id = self.next_chunk;
            self.next_chunk += 1;
            let (entries, newest) = if self.frame_chunks.len() < MAX_FRAME_CHUNKS {
                self.fresh_entries()
            } else {
                // Every row held, in order: `ord` is the position.
                for (old, _) in self.frame_chunks.drain(..) {
                    out.chunk(&chunk_key(FRAME_CHUNK, old), None);
                }
                let mut entries = Vec::new();
                for (i, time) in self.times.iter().enumerate() {
                    push_frame_entry(
                        &mut entries,
                        *time,
                        i as u64,
                        self.args.range(i * stride..(i + 1) * stride),
                    );
                }
                (entries, self.times.back().copied().unwrap_or(i64::MIN))
            };
            // (Empty when every fresh row has left the frames already.)
            if !entries.is_empty() {
                let mut value = newest.saturating_add(horizon).to_le_bytes().to_vec();
                value.extend_from_slice(&entries);
                out.chunk(&chunk_key(FRAME_CHUNK, id), Some(&value));
                reserve_small(&mut self.frame_chunks);
                self.frame_chunks.push((id, newest));
            }
        }
        // Chunks whose rows every frame has left.
        let oldest = self.times.front().copied().unwrap_or(i64::MAX);
        self.frame_chunks.retain(|(id, newest)| {
            let keep = *newest >= oldest;
            if !keep {
                out.chunk(&chunk_key(FRAME_CHUNK, *id), None);
            }
            keep
        });
        if !self.fresh.is_empty() {
            let mut value = Vec::new();
            let mut newest = i64::MIN;
            // (Taken, not drained: the buffer is freed until rows arrive again.)
            for (time, row) in std::mem::take(&mut self.fresh) {
                let at = self.pending.partition_point(|w| (w.time, w.row) < (time, row));
                if let Some(Waiting { bytes, .. }) =
                    self.pending.get(at).filter(|w| (w.time, w.row) == (time, row))
                {
                    value.extend_from_slice(&time.to_le_bytes());
                    value.extend_from_slice(&row.to_le_bytes());
                    value.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    value.extend_from_slice(bytes);
                    newest = newest.max(time);
                }
            }
            if !value.is_empty() {
                let id = self.next_chunk;
                self.next_chunk += 1;
                let mut chunk = newest.saturating_add(lateness).to_le_bytes().to_vec();
                chunk.extend_from_slice(&value);
                out.chunk(&chunk_key(PENDING_CHUNK, id), Some(&chunk));
                reserve_small(&mut self.pending_chunks);
                self.pending_chunks.push((id, newest));
            }
        }
        if !self.fired_log.is_empty() {
            // Each entry: time, row id, the detector's tag.
            let newest = self.fired_log.iter().map(|f| f.0).max().unwrap_or(i64::MIN);
            let mut chunk = newest.saturating_add(lateness).to_le_bytes().to_vec();
            for (time, row, tag) in std::mem::take(&mut self.fired_log) {
                chunk.extend_from_slice(&time.to_le_bytes());
                chunk.extend_from_slice(&row.to_le_bytes());
                chunk.extend_from_slice(&tag.to_le_bytes());
            }
            let id = self.next_chunk;
            self.next_chunk += 1;
            out.chunk(&chunk_key(FIRED_CHUNK, id), Some(&chunk));
            reserve_small(&mut self.fired_chunks);
            self.fired_chunks.push((id, newest));
        }
        // Chunks whose rows are all decided.
        for (kind, chunks) in [
            (PENDING_CHUNK, &mut self.pending_chunks),
            (FIRED_CHUNK, &mut self.fired_chunks),
        ] {
            chunks.retain(|(id, newest)| {
                let keep = *newest >= decided_until;
                if !keep {
                    out.chunk(&chunk_key(kind, *id), None);
                }
                keep
            });
        }
    }

    /// The frame chunk entries of the rows that arrived since the last save (`fresh`, sorted),
    /// and the newest time among them. Rows of equal time are held in arrival order, so the
    /// fresh rows of a time are the last ones of that time; rows every frame has already left
    /// are not needed.
    fn fresh_entries(&self) -> (Vec<u8>, i64) {
        let stride = self.stride();
        let mut entries = Vec::with_capacity(self.fresh.len() * (16 + stride * 9));
        let mut newest = i64::MIN;
        for same in self.fresh.chunk_by(|a, b| a.0 == b.0) {
            let time = same[0].0;
            let end = self.times.partition_point(|t| *t <= time);
            let start = self
                .times
                .partition_point(|t| *t < time)
                .max(end.saturating_sub(same.len()));
            let held = &same[same.len() - (end - start)..];
            for (&(_, row), at) in held.iter().zip(start..end) {
                push_frame_entry(
                    &mut entries,
                    time,
                    row,
                    self.args.range(at * stride..(at + 1) * stride),
                );
                newest = time;
            }
        }
        (entries, newest)
    }

    /// The pending rows of a pending chunk's value (after its expiry): time, row id, bytes.
    pub fn pending_rows(value: &[u8]) -> Option<Vec<(i64, u64, &[u8])>> {
        let mut input = value.get(8..)?;
        let input = &mut input;
        let mut out = Vec::new();
        while !input.is_empty() {
            let time = i64::from_le_bytes(take(input, 8)?.try_into().ok()?);
            let row = u64::from_le_bytes(take(input, 8)?.try_into().ok()?);
            let len = u32::from_le_bytes(take(input, 4)?.try_into().ok()?) as usize;
            out.push((time, row, take(input, len)?));
        }
        Some(out)
    }

    /// Rebuilds a key from its chunks ((id, value) of its frame and pending chunks), given that
    /// every row older than `decided_until` was decided (and so entered the accumulators) and
    /// no other: the frames end at the newest of those rows, rows older than every frame are
    /// dropped, and the pending rows are those not older than `decided_until`. `None` when a
    /// chunk does not decode.
    pub fn load(
        aggregates: &[WindowAggregate],
        chunks: &KeyChunks,
        tags: &[u64],
        decided_until: i64,
    ) -> Option<Self> {
        let (frame, pending) = (&chunks.frame, &chunks.pending);
        let n = aggregates.len();
        let mut agg = Self::new(aggregates);
        // (time, chunk id, order in chunk, where its arguments start in `values`): chunks in
        // id order are in arrival order, so this is the order rows were held in.
        let mut rows: Vec<(i64, u64, u64, usize)> = Vec::new();
        let mut values: Vec<Val> = Vec::new();
        let mut texts = FxHashSet::default();
        for (id, value) in frame {
            let mut input = value.get(8..)?;
            let input = &mut input;
            let mut newest = i64::MIN;
            while !input.is_empty() {
                let time = i64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                let ord = u64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                rows.push((time, *id, ord, values.len()));
                for _ in 0..n {
                    values.push(Val::decode(input, &mut texts)?);
                }
                newest = newest.max(time);
            }
            agg.frame_chunks.push((*id, newest));
            agg.next_chunk = agg.next_chunk.max(id + 1);
        }
        rows.sort_unstable_by_key(|(t, id, ord, _)| (*t, *id, *ord));
        for (k, kind) in agg.kinds.iter_mut().enumerate() {
            if let Some(v) = values.iter().skip(k).step_by(n.max(1)).find(|v| **v != Val::Null) {
                *kind = v.clone();
            }
        }
        let entered = rows.partition_point(|r| r.0 < decided_until);
        let first = match entered.checked_sub(1).map(|last| rows[last].0) {
            // The frames end at the newest decided row: rows older than every frame are gone.
            Some(end) => {
                agg.frame_end = end;
                agg.evaluated_to = end;
                let oldest_start = aggregates
                    .iter()
                    .map(|a| end.saturating_sub(a.length))
                    .min()
                    .unwrap_or(end);
                let first = rows[..entered].partition_point(|r| r.0 < oldest_start);
                for (k, a) in aggregates.iter().enumerate() {
                    let from = end.saturating_sub(a.length);
                    agg.starts[k] = (rows[first..entered].partition_point(|r| r.0 < from)) as u64;
                }
                first
            }
            None => 0,
        };
        agg.added = (entered - first) as u64;
        agg.times.reserve(rows.len() - first);
        agg.args.reserve((rows.len() - first) * n);
        for &(time, _, _, at) in &rows[first..] {
            agg.times.push_back(time);
            agg.args.extend(values[at..at + n].iter_mut().map(std::mem::take));
        }
        for (k, acc) in agg.accs.iter_mut().enumerate() {
            for seq in agg.starts[k]..agg.added {
                acc.add(&agg.args[seq as usize * n + k], seq);
            }
        }
        for (id, value) in pending {
            let mut newest = i64::MIN;
            for (time, row, bytes) in Self::pending_rows(value)? {
                newest = newest.max(time);
                if time >= decided_until {
                    agg.pending.push(Waiting {
                        time,
                        row,
                        bytes: bytes.into(),
                        settled: 0,
                        fired: 0,
                        evaluated: false,
                        values: None,
                    });
                }
            }
            agg.pending_chunks.push((*id, newest));
            agg.next_chunk = agg.next_chunk.max(id + 1);
        }
        agg.pending.sort_unstable_by_key(|w| (w.time, w.row));
        for (id, value) in &chunks.fired {
            let mut input = value.get(8..)?;
            let input = &mut input;
            let mut newest = i64::MIN;
            while !input.is_empty() {
                let time = i64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                let row = u64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                let tag = u64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                newest = newest.max(time);
                // (A detector changed since has another tag: it decides afresh.)
                let Some(bit) = tags.iter().position(|t| *t == tag) else {
                    continue;
                };
                let at = agg.pending.partition_point(|w| (w.time, w.row) < (time, row));
                if let Some(w) = agg.pending.get_mut(at).filter(|w| (w.time, w.row) == (time, row)) {
                    w.fired |= 1 << bit;
                    w.settled |= 1 << bit;
                }
            }
            agg.fired_chunks.push((*id, newest));
            agg.next_chunk = agg.next_chunk.max(id + 1);
        }
        Some(agg)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;
    use datafusion::physical_expr::expressions::Column;

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
            output: DataType::Int64,
        }];
        let mut key = KeyAgg::new(&aggregates);
        key.insert(1, 0, vec![Val::Str("ListUsers".into())], Box::new([]));
        let decided = key.decide_until(&aggregates, Some(2));
        assert_eq!(decided[0].1, vec![Val::Int(1)]);
        key.insert(3, 1, vec![Val::Str("ListUsers".into())], Box::new([]));
        key.insert(4, 2, vec![Val::Str("GetUser".into())], Box::new([]));
        assert!(Arc::ptr_eq(text(&key.args[0]), text(&key.args[1])));
        assert!(!Arc::ptr_eq(text(&key.args[0]), text(&key.args[2])));
        let decided = key.decide_until(&aggregates, None);
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
        let loaded = KeyAgg::load(&aggregates, &chunks, &[], 3).unwrap();
        assert_eq!(loaded.args.len(), 2);
        assert!(Arc::ptr_eq(text(&loaded.args[0]), text(&loaded.args[1])));
    }
}
