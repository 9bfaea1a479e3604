//! A key's frame arguments ([`Args`]): one column per argument of the window's aggregates, each
//! typed by the values it holds, instead of a 24-byte [`Val`] per row and argument. A
//! `count(*)`'s column holds no value at all (its rows' arguments are all NULL), an integer
//! or float column 8 bytes a row (and a null mark only once a NULL came), a text column 16.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Val;
use super::accumulators::{heap, text_bytes};

/// The type a column's values have, which decides the result type of a sum or an average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// No value but NULL yet (always for `count(*)`).
    Null,
    Int,
    UInt,
    Float,
    Text,
}

/// Fixed-width values and, once a NULL came, which rows are NULL.
#[derive(Debug, Clone, Default)]
pub(super) struct Typed<T> {
    values: VecDeque<T>,
    /// `None` while no row is NULL; otherwise one flag per value. (Boxed: 8 bytes in the
    /// key instead of 32, and most columns never hold a NULL.)
    #[allow(clippy::box_collection)]
    nulls: Option<Box<VecDeque<bool>>>,
}

impl<T: Copy + Default> Typed<T> {
    /// `n` NULLs.
    fn nulls(n: usize) -> Self {
        let mut values = VecDeque::new();
        values.resize(n, T::default());
        let mut nulls = VecDeque::new();
        nulls.resize(n, true);
        Self {
            values,
            nulls: (n > 0).then(|| Box::new(nulls)),
        }
    }

    fn get(&self, i: usize) -> Option<T> {
        match &self.nulls {
            Some(nulls) if nulls[i] => None,
            _ => Some(self.values[i]),
        }
    }

    fn insert(&mut self, at: usize, v: Option<T>) {
        if self.values.is_empty() {
            self.values.reserve_exact(1);
        }
        self.values.insert(at, v.unwrap_or_default());
        match (&mut self.nulls, v) {
            (Some(nulls), _) => nulls.insert(at, v.is_none()),
            (None, Some(_)) => {}
            (None, None) => {
                let mut nulls: VecDeque<bool> = std::iter::repeat_n(false, self.values.len()).collect();
                nulls[at] = true;
                self.nulls = Some(Box::new(nulls));
            }
        }
    }

    fn pop_front(&mut self) {
        self.values.pop_front();
        if let Some(nulls) = &mut self.nulls {
            nulls.pop_front();
        }
    }

    fn clear(&mut self) {
        self.values = VecDeque::new();
        self.nulls = None;
    }

    fn reserve(&mut self, n: usize) {
        self.values.reserve(n);
    }

    fn bytes(&self) -> usize {
        heap(self.values.capacity() * std::mem::size_of::<T>())
            + self.nulls.as_ref().map_or(0, |n| {
                heap(std::mem::size_of::<VecDeque<bool>>()) + heap(n.capacity())
            })
    }
}

/// One argument's values, row by row.
#[derive(Debug, Clone)]
pub(super) enum Column {
    /// Only NULLs so far: how many.
    Null(usize),
    Int(Typed<i64>),
    UInt(Typed<u64>),
    Float(Typed<f64>),
    /// Texts (each shared with the equal texts of its batch and of the key's distinct counts).
    Text(VecDeque<Option<Arc<str>>>),
    /// Values of more than one type (a plan gives each argument one type: not expected), as
    /// they came, with the type of the first.
    Mixed(VecDeque<Val>, Kind),
}

impl Column {
    fn kind(&self) -> Kind {
        match self {
            Column::Null(_) => Kind::Null,
            Column::Int(_) => Kind::Int,
            Column::UInt(_) => Kind::UInt,
            Column::Float(_) => Kind::Float,
            Column::Text(_) => Kind::Text,
            Column::Mixed(_, kind) => *kind,
        }
    }

    fn len(&self) -> usize {
        match self {
            Column::Null(n) => *n,
            Column::Int(t) => t.values.len(),
            Column::UInt(t) => t.values.len(),
            Column::Float(t) => t.values.len(),
            Column::Text(t) => t.len(),
            Column::Mixed(t, _) => t.len(),
        }
    }

    fn get(&self, i: usize) -> Val {
        match self {
            Column::Null(_) => Val::Null,
            Column::Int(t) => t.get(i).map_or(Val::Null, Val::Int),
            Column::UInt(t) => t.get(i).map_or(Val::Null, Val::UInt),
            Column::Float(t) => t.get(i).map_or(Val::Null, Val::Float),
            Column::Text(t) => t[i].clone().map_or(Val::Null, Val::Str),
            Column::Mixed(t, _) => t[i].clone(),
        }
    }

    /// Whether `v` can be held as it is (NULL always can).
    fn holds(&self, v: &Val) -> bool {
        matches!(
            (self, v),
            (_, Val::Null)
                | (Column::Int(_), Val::Int(_))
                | (Column::UInt(_), Val::UInt(_))
                | (Column::Float(_), Val::Float(_))
                | (Column::Text(_), Val::Str(_))
                | (Column::Mixed(..), _)
        )
    }

    /// The column retyped to hold `v` too: a NULL column takes `v`'s type; a typed one
    /// becomes mixed.
    fn retype(&mut self, v: &Val) {
        let n = self.len();
        *self = match (&*self, v) {
            (Column::Null(_), Val::Int(_)) => Column::Int(Typed::nulls(n)),
            (Column::Null(_), Val::UInt(_)) => Column::UInt(Typed::nulls(n)),
            (Column::Null(_), Val::Float(_)) => Column::Float(Typed::nulls(n)),
            (Column::Null(_), Val::Str(_)) => Column::Text(std::iter::repeat_n(None, n).collect()),
            (typed, _) => Column::Mixed((0..n).map(|i| typed.get(i)).collect(), typed.kind()),
        };
    }

    fn insert(&mut self, at: usize, v: Val) {
        if !self.holds(&v) {
            self.retype(&v);
        }
        match (self, v) {
            (Column::Null(n), _) => *n += 1,
            (Column::Int(t), Val::Int(x)) => t.insert(at, Some(x)),
            (Column::UInt(t), Val::UInt(x)) => t.insert(at, Some(x)),
            (Column::Float(t), Val::Float(x)) => t.insert(at, Some(x)),
            (Column::Int(t), _) => t.insert(at, None),
            (Column::UInt(t), _) => t.insert(at, None),
            (Column::Float(t), _) => t.insert(at, None),
            (Column::Text(t), v) => {
                if t.is_empty() {
                    t.reserve_exact(1);
                }
                t.insert(
                    at,
                    match v {
                        Val::Str(s) => Some(s),
                        _ => None,
                    },
                );
            }
            (Column::Mixed(t, _), v) => t.insert(at, v),
        }
    }

    fn pop_front(&mut self) {
        match self {
            Column::Null(n) => *n = n.saturating_sub(1),
            Column::Int(t) => t.pop_front(),
            Column::UInt(t) => t.pop_front(),
            Column::Float(t) => t.pop_front(),
            Column::Text(t) => {
                t.pop_front();
            }
            Column::Mixed(t, _) => {
                t.pop_front();
            }
        }
    }

    /// Empty, keeping its type.
    fn clear(&mut self) {
        match self {
            Column::Null(n) => *n = 0,
            Column::Int(t) => t.clear(),
            Column::UInt(t) => t.clear(),
            Column::Float(t) => t.clear(),
            Column::Text(t) => *t = VecDeque::new(),
            Column::Mixed(t, _) => *t = VecDeque::new(),
        }
    }

    fn reserve(&mut self, n: usize) {
        match self {
            Column::Null(_) => {}
            Column::Int(t) => t.reserve(n),
            Column::UInt(t) => t.reserve(n),
            Column::Float(t) => t.reserve(n),
            Column::Text(t) => t.reserve(n),
            Column::Mixed(t, _) => t.reserve(n),
        }
    }

    /// Heap bytes, texts counted by their share of the allocations they share.
    fn bytes(&self) -> usize {
        match self {
            Column::Null(_) => 0,
            Column::Int(t) => t.bytes(),
            Column::UInt(t) => t.bytes(),
            Column::Float(t) => t.bytes(),
            Column::Text(t) => {
                heap(t.capacity() * std::mem::size_of::<Option<Arc<str>>>())
                    + t.iter().flatten().map(text_bytes).sum::<usize>()
            }
            Column::Mixed(t, _) => {
                heap(t.capacity() * std::mem::size_of::<Val>()) + t.iter().map(Val::heap_bytes).sum::<usize>()
            }
        }
    }
}

/// A key's frame arguments: `stride` columns of equal length, one row per frame row.
#[derive(Debug, Clone)]
pub(super) struct Args {
    /// The first argument's column (most windows have one argument: no list to allocate).
    first: Column,
    rest: Box<[Column]>,
}

impl Args {
    /// No row, `stride` arguments (at least one: an incremental window has an aggregate).
    pub(super) fn new(stride: usize) -> Self {
        assert!(stride > 0, "a window state without an aggregate");
        Self {
            first: Column::Null(0),
            rest: vec![Column::Null(0); stride.saturating_sub(1)].into(),
        }
    }

    /// Arguments per row.
    pub(super) fn stride(&self) -> usize {
        1 + self.rest.len()
    }

    fn column(&self, slot: usize) -> &Column {
        if slot == 0 {
            &self.first
        } else {
            &self.rest[slot - 1]
        }
    }

    fn columns_mut(&mut self) -> impl Iterator<Item = &mut Column> {
        std::iter::once(&mut self.first).chain(self.rest.iter_mut())
    }

    /// Argument `slot` of row `row` (a text shares its allocation).
    pub(super) fn get(&self, row: usize, slot: usize) -> Val {
        self.column(slot).get(row)
    }

    /// The type of argument `slot`'s values.
    pub(super) fn kind(&self, slot: usize) -> Kind {
        self.column(slot).kind()
    }

    /// The arguments of row `row`, in order.
    pub(super) fn row(&self, row: usize) -> impl Iterator<Item = Val> + '_ {
        std::iter::once(&self.first)
            .chain(self.rest.iter())
            .map(move |c| c.get(row))
    }

    /// Inserts a row at `at` (its arguments in order).
    pub(super) fn insert(&mut self, at: usize, values: impl IntoIterator<Item = Val>) {
        for (column, v) in self.columns_mut().zip(values) {
            column.insert(at, v);
        }
    }

    /// Adds a row after the others.
    pub(super) fn push(&mut self, values: impl IntoIterator<Item = Val>) {
        let at = self.first.len();
        self.insert(at, values);
    }

    /// Drops the first row.
    pub(super) fn pop_front(&mut self) {
        self.columns_mut().for_each(Column::pop_front);
    }

    /// Drops every row (the columns keep their types).
    pub(super) fn clear(&mut self) {
        self.columns_mut().for_each(Column::clear);
    }

    /// Room for `n` more rows.
    pub(super) fn reserve(&mut self, n: usize) {
        self.columns_mut().for_each(|c| c.reserve(n));
    }

    /// Heap bytes of the columns (the first column is inline).
    pub(super) fn bytes(&self) -> usize {
        heap(self.rest.len() * std::mem::size_of::<Column>())
            + std::iter::once(&self.first)
                .chain(self.rest.iter())
                .map(Column::bytes)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows inserted anywhere, NULLs among typed values, a type change: every row reads back
    /// as it was given.
    #[test]
    fn columns_give_back_every_value_as_inserted() {
        let mut args = Args::new(3);
        let mut reference: VecDeque<Vec<Val>> = VecDeque::new();
        let rows = [
            vec![Val::Null, Val::Null, Val::Null],
            vec![Val::Null, Val::Int(3), Val::Str("a".into())],
            vec![Val::Null, Val::Null, Val::Null],
            vec![Val::Null, Val::Int(-7), Val::Str("b".into())],
            vec![Val::Null, Val::Float(1.5), Val::Null],
            vec![Val::Null, Val::Int(9), Val::Str("a".into())],
        ];
        for (i, row) in rows.iter().enumerate() {
            // Alternately at the end and one before it (a straggler).
            let at = if i % 2 == 0 {
                reference.len()
            } else {
                reference.len().saturating_sub(1)
            };
            args.insert(at, row.clone());
            reference.insert(at, row.clone());
            for (r, expected) in reference.iter().enumerate() {
                assert_eq!(args.row(r).collect::<Vec<_>>(), *expected, "row {r} after {i}");
            }
        }
        assert_eq!(args.kind(0), Kind::Null);
        assert_eq!(args.kind(1), Kind::Int, "mixed keeps the first type");
        assert_eq!(args.kind(2), Kind::Text);
        args.pop_front();
        reference.pop_front();
        args.push(vec![Val::Null, Val::Int(1), Val::Null]);
        reference.push_back(vec![Val::Null, Val::Int(1), Val::Null]);
        for (r, expected) in reference.iter().enumerate() {
            assert_eq!(args.row(r).collect::<Vec<_>>(), *expected);
        }
        args.clear();
        assert_eq!(args.kind(2), Kind::Text);
        args.push(vec![Val::Null, Val::Int(2), Val::Str("c".into())]);
        assert_eq!(
            args.row(0).collect::<Vec<_>>(),
            vec![Val::Null, Val::Int(2), Val::Str("c".into())]
        );
    }

    /// A count(*)'s argument takes no memory per row; an integer 8 bytes.
    #[test]
    fn a_star_argument_holds_nothing_and_an_integer_eight_bytes() {
        let mut star = Args::new(1);
        let mut int = Args::new(1);
        for i in 0..1000 {
            star.push([Val::Null]);
            int.push([Val::Int(i)]);
        }
        assert_eq!(star.bytes(), 0);
        assert!(int.bytes() <= heap(1024 * 8), "{}", int.bytes());
        assert_eq!(int.get(999, 0), Val::Int(999));
    }
}
