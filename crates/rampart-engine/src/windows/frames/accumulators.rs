//! The values window aggregates take ([`Val`]: one argument, with its encoding in stored
//! chunks) and their accumulators ([`Acc`]), which follow DataFusion's sliding window
//! accumulators so that the values equal the batch query's: counts and distinct counts
//! exactly, integer sums with the same wrapping, min/max by a monotonic queue, averages as
//! `sum / count` in `f64`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Int64Array, StringArray, UInt64Array, new_null_array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use rampart_sql::{AggregateKind, WindowAggregate};
use rustc_hash::FxHashSet;

use super::args::Kind;
use super::take;
use crate::error::{Error, Result};

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
            Val::Str(s) => text_bytes(s),
            _ => 0,
        }
    }

    /// A text value sharing its allocation with an equal one in `texts` (added there if none
    /// is): rows repeat a handful of texts (actions, regions, user names), one allocation each
    /// rather than one per row.
    pub(super) fn text(text: &str, texts: &mut FxHashSet<Arc<str>>) -> Val {
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

/// A text's share of the allocation it shares with the other values of the same text.
pub(super) fn text_bytes(s: &Arc<str>) -> usize {
    heap(16 + s.len()) / Arc::strong_count(s)
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
    pub(super) fn cmp_same(&self, other: &Val) -> std::cmp::Ordering {
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
    pub fn column(array: &ArrayRef) -> Result<Vec<Val>> {
        let t = array.data_type();
        let n = array.len();
        let cast_to = |to: &DataType| cast(array, to).map_err(Error::from);
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
    pub fn array(values: &[Val], to: &DataType) -> Result<ArrayRef> {
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
            cast(&array, to).map_err(Error::from)
        }
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
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
    pub(super) fn decode(input: &mut &[u8], texts: &mut FxHashSet<Arc<str>>) -> Option<Val> {
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

/// A distinct count's values in its frame, each with how many rows hold it: a short list
/// while there are few (most keys see one or two values: a list of one takes a sixth of the
/// memory of the smallest hash table), a hash table past [`Distinct::FEW`].
#[derive(Debug, Clone)]
pub(super) enum Distinct {
    Few(Vec<(Val, u32)>),
    Many(HashMap<Val, u32>),
}

impl Default for Distinct {
    fn default() -> Self {
        Distinct::Few(Vec::new())
    }
}

impl Distinct {
    /// Values kept in a list at most.
    const FEW: usize = 8;

    /// How many distinct values.
    pub(super) fn len(&self) -> usize {
        match self {
            Distinct::Few(list) => list.len(),
            Distinct::Many(map) => map.len(),
        }
    }

    /// The value held equal to `v`, if any (a text shares its allocation).
    pub(super) fn get(&self, v: &Val) -> Option<&Val> {
        match self {
            Distinct::Few(list) => list.iter().find(|(held, _)| held == v).map(|(held, _)| held),
            Distinct::Many(map) => map.get_key_value(v).map(|(held, _)| held),
        }
    }

    fn add(&mut self, v: &Val) {
        match self {
            Distinct::Few(list) => match list.iter().position(|(held, _)| held == v) {
                Some(at) => list[at].1 += 1,
                None if list.len() < Self::FEW => {
                    super::reserve_small(list);
                    list.push((v.clone(), 1));
                }
                None => {
                    let mut map: HashMap<Val, u32> = std::mem::take(list).into_iter().collect();
                    map.insert(v.clone(), 1);
                    *self = Distinct::Many(map);
                }
            },
            Distinct::Many(map) => *map.entry(v.clone()).or_default() += 1,
        }
    }

    fn retract(&mut self, v: &Val) {
        match self {
            Distinct::Few(list) => {
                if let Some(at) = list.iter().position(|(held, _)| held == v) {
                    list[at].1 -= 1;
                    if list[at].1 == 0 {
                        list.swap_remove(at);
                    }
                }
            }
            Distinct::Many(map) => {
                if let Some(c) = map.get_mut(v) {
                    *c -= 1;
                    if *c == 0 {
                        map.remove(v);
                    }
                }
            }
        }
    }

    fn clear(&mut self) {
        *self = Distinct::default();
    }

    /// Heap bytes (with the allocator's rounding).
    pub(super) fn bytes(&self) -> usize {
        match self {
            Distinct::Few(list) => heap(list.capacity() * std::mem::size_of::<(Val, u32)>()),
            // hashbrown: buckets (a power of two, 8/7 of the capacity) of entries and one
            // control byte each.
            Distinct::Many(map) if map.capacity() > 0 => {
                let buckets = (map.capacity() * 8 / 7).next_power_of_two();
                heap(buckets * (std::mem::size_of::<(Val, u32)>() + 1) + 16)
            }
            Distinct::Many(_) => 0,
        }
    }
}

/// One aggregate's running state over its current frame.
#[derive(Debug, Clone)]
pub(super) enum Acc {
    /// count(*) (`star`) or count(x).
    Count {
        star: bool,
        n: i64,
    },
    Distinct(Distinct),
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
    pub(super) fn new(a: &WindowAggregate) -> Self {
        match a.function {
            AggregateKind::Count => Acc::Count {
                star: a.argument.is_none(),
                n: 0,
            },
            AggregateKind::CountDistinct => Acc::Distinct(Distinct::default()),
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
    pub(super) fn reset(&mut self) {
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

    pub(super) fn add(&mut self, v: &Val, seq: u64) {
        match self {
            Acc::Distinct(values) => {
                if *v != Val::Null {
                    values.add(v);
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

    pub(super) fn retract(&mut self, v: &Val, seq: u64) {
        match self {
            Acc::Distinct(values) => values.retract(v),
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
    pub(super) fn shift(&mut self, v: &Val, sign: i64) {
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

    /// The aggregate's value; `kind` is its argument's type (a sum of integers is an integer).
    pub(super) fn value(&self, kind: Kind) -> Val {
        match self {
            Acc::Count { n, .. } => Val::Int(*n),
            Acc::Distinct(values) => Val::Int(values.len() as i64),
            Acc::Sum { n: 0, .. } | Acc::Avg { n: 0, .. } => Val::Null,
            Acc::Sum { int, uint, float, .. } => match kind {
                Kind::UInt => Val::UInt(*uint),
                Kind::Float => Val::Float(*float),
                Kind::Null | Kind::Int | Kind::Text => Val::Int(*int),
            },
            Acc::Avg { int, float, n } => match kind {
                Kind::Float => Val::Float(*float / *n as f64),
                Kind::Null | Kind::Int | Kind::UInt | Kind::Text => Val::Float(*int as f64 / *n as f64),
            },
            Acc::Extreme { queue, .. } => queue.front().map_or(Val::Null, |(_, v)| v.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct count as a list and past [`Distinct::FEW`] values as a hash table counts
    /// what a plain map of value to rows counts, through both forms and back.
    #[test]
    fn a_distinct_count_matches_a_map_through_its_list_and_table_forms() {
        let mut distinct = Distinct::default();
        let mut reference: HashMap<Val, u32> = HashMap::new();
        // A frame of values entering and leaving (a pseudo-random walk over 20 texts and
        // integers, so that the count rises past the list's bound and falls back under it).
        let value = |i: u64| match i % 3 {
            0 => Val::Int((i % 20) as i64),
            _ => Val::Str(format!("action-{}", i % 20).into()),
        };
        let mut frame = std::collections::VecDeque::new();
        let mut state = 7u64;
        let mut most = 0;
        for step in 0..5_000u64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Three adds to a retract for 500 steps, then the other way round.
            let grow = (step / 500) % 2 == 0;
            let mostly = !(state >> 33).is_multiple_of(4);
            if frame.is_empty() || mostly == grow {
                let v = value(state >> 40);
                distinct.add(&v);
                *reference.entry(v.clone()).or_default() += 1;
                frame.push_back(v);
            } else {
                let v = frame.pop_front().expect("not empty");
                distinct.retract(&v);
                let n = reference.get_mut(&v).expect("held");
                *n -= 1;
                if *n == 0 {
                    reference.remove(&v);
                }
            }
            assert_eq!(distinct.len(), reference.len(), "step {step}");
            most = most.max(distinct.len());
            if let Some(v) = frame.back() {
                assert_eq!(distinct.get(v), Some(v));
            }
        }
        assert!(most > Distinct::FEW, "the table form was not reached");
        assert!(matches!(distinct, Distinct::Many(_)));
        distinct.clear();
        assert_eq!(distinct.len(), 0);
        assert!(matches!(distinct, Distinct::Few(_)));
    }
}
