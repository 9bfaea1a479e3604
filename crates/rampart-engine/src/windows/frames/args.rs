//! A key's frame arguments ([`Args`]): one column per argument of the window's aggregates, each
//! typed by the values it holds, instead of a 24-byte [`Val`] per row and argument. A
//! `count(*)`'s column holds no value at all (its rows' arguments are all NULL), an integer
//! column 1, 2, 4 or 8 bytes a row (the narrowest width that holds its values), a float column
//! 8 (and a null mark only once a NULL came), a text column 16.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Val;
use super::accumulators::{heap, text_bytes};
use super::room_for_row;

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
        room_for_row(&mut self.values);
        self.values.insert(at, v.unwrap_or_default());
        match (&mut self.nulls, v) {
            (Some(nulls), _) => {
                room_for_row(nulls);
                nulls.insert(at, v.is_none());
            }
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
        self.values.reserve_exact(n);
    }

    /// The same values in a wider type.
    fn widen<U: Copy + From<T>>(&mut self) -> Typed<U> {
        let mut values = VecDeque::new();
        values.reserve_exact(self.values.capacity());
        values.extend(self.values.iter().map(|&v| U::from(v)));
        Typed {
            values,
            nulls: self.nulls.take(),
        }
    }

    fn bytes(&self) -> usize {
        heap(self.values.capacity() * std::mem::size_of::<T>())
            + self.nulls.as_ref().map_or(0, |n| {
                heap(std::mem::size_of::<VecDeque<bool>>()) + heap(n.capacity())
            })
    }
}

/// Integers stored at the narrowest of four widths that holds every value the column got
/// (a 0/1 flag or a small count takes a byte a row instead of 8), widened when a larger one
/// comes. `A`..`D` are the 1-, 2-, 4- and 8-byte types, `D` the one values are given in.
#[derive(Debug, Clone)]
pub(super) enum Narrow<A, B, C, D> {
    W1(Typed<A>),
    W2(Typed<B>),
    W4(Typed<C>),
    W8(Typed<D>),
}

/// Signed integers (`i64` values).
pub(super) type Ints = Narrow<i8, i16, i32, i64>;
/// Unsigned integers (`u64` values).
pub(super) type UInts = Narrow<u8, u16, u32, u64>;

impl<A, B, C, D> Narrow<A, B, C, D>
where
    A: Copy + Default + TryFrom<D>,
    B: Copy + Default + TryFrom<D> + From<A>,
    C: Copy + Default + TryFrom<D> + From<B>,
    D: Copy + Default + From<C>,
{
    /// `n` NULLs (at the narrowest width).
    fn nulls(n: usize) -> Self {
        Narrow::W1(Typed::nulls(n))
    }

    fn len(&self) -> usize {
        match self {
            Narrow::W1(t) => t.values.len(),
            Narrow::W2(t) => t.values.len(),
            Narrow::W4(t) => t.values.len(),
            Narrow::W8(t) => t.values.len(),
        }
    }

    fn get(&self, i: usize) -> Option<D> {
        match self {
            Narrow::W1(t) => t.get(i).map(|v| D::from(C::from(B::from(v)))),
            Narrow::W2(t) => t.get(i).map(|v| D::from(C::from(v))),
            Narrow::W4(t) => t.get(i).map(D::from),
            Narrow::W8(t) => t.get(i),
        }
    }

    fn insert(&mut self, at: usize, v: Option<D>) {
        loop {
            match self {
                Narrow::W1(t) => match v.map(A::try_from) {
                    None => return t.insert(at, None),
                    Some(Ok(x)) => return t.insert(at, Some(x)),
                    Some(Err(_)) => *self = Narrow::W2(t.widen()),
                },
                Narrow::W2(t) => match v.map(B::try_from) {
                    None => return t.insert(at, None),
                    Some(Ok(x)) => return t.insert(at, Some(x)),
                    Some(Err(_)) => *self = Narrow::W4(t.widen()),
                },
                Narrow::W4(t) => match v.map(C::try_from) {
                    None => return t.insert(at, None),
                    Some(Ok(x)) => return t.insert(at, Some(x)),
                    Some(Err(_)) => *self = Narrow::W8(t.widen()),
                },
                Narrow::W8(t) => return t.insert(at, v),
            }
        }
    }

    fn pop_front(&mut self) {
        match self {
            Narrow::W1(t) => t.pop_front(),
            Narrow::W2(t) => t.pop_front(),
            Narrow::W4(t) => t.pop_front(),
            Narrow::W8(t) => t.pop_front(),
        }
    }

    /// Empty, back at the narrowest width.
    fn clear(&mut self) {
        *self = Narrow::W1(Typed::default());
    }

    fn reserve(&mut self, n: usize) {
        match self {
            Narrow::W1(t) => t.reserve(n),
            Narrow::W2(t) => t.reserve(n),
            Narrow::W4(t) => t.reserve(n),
            Narrow::W8(t) => t.reserve(n),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Narrow::W1(t) => t.bytes(),
            Narrow::W2(t) => t.bytes(),
            Narrow::W4(t) => t.bytes(),
            Narrow::W8(t) => t.bytes(),
        }
    }
}

/// One argument's values, row by row.
#[derive(Debug, Clone)]
pub(super) enum Column {
    /// Only NULLs so far: how many.
    Null(usize),
    Int(Ints),
    UInt(UInts),
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
            Column::Int(t) => t.len(),
            Column::UInt(t) => t.len(),
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
            (Column::Null(_), Val::Int(_)) => Column::Int(Narrow::nulls(n)),
            (Column::Null(_), Val::UInt(_)) => Column::UInt(Narrow::nulls(n)),
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
                room_for_row(t);
                t.insert(
                    at,
                    match v {
                        Val::Str(s) => Some(s),
                        _ => None,
                    },
                );
            }
            (Column::Mixed(t, _), v) => {
                room_for_row(t);
                t.insert(at, v);
            }
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
            Column::Text(t) => t.reserve_exact(n),
            Column::Mixed(t, _) => t.reserve_exact(n),
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

    /// A count(*)'s argument takes no memory per row; an integer column the narrowest width
    /// that holds its values, widened (every value kept) when a larger one comes.
    #[test]
    fn a_star_argument_holds_nothing_and_an_integer_column_its_narrowest_width() {
        let mut star = Args::new(1);
        let mut flags = Args::new(1);
        let mut int = Args::new(1);
        for i in 0..1000 {
            star.push([Val::Null]);
            flags.push([Val::Int(i % 2)]);
            int.push([Val::Int(i - 500)]);
        }
        assert_eq!(star.bytes(), 0);
        assert!(flags.bytes() <= heap(1250), "a byte a row: {}", flags.bytes());
        assert!(int.bytes() <= heap(1250 * 2), "two bytes a row: {}", int.bytes());
        assert_eq!(int.get(999, 0), Val::Int(499));
        assert_eq!(int.get(0, 0), Val::Int(-500));
        let mut reference: Vec<Val> = (0..1000).map(|i| Val::Int(i - 500)).collect();
        for (at, v) in [
            (3, Val::Int(70_000)),
            (1000, Val::Int(i64::MIN)),
            (0, Val::Int(i64::MAX)),
            (5, Val::Null),
        ] {
            int.insert(at, [v.clone()]);
            reference.insert(at, v.clone());
            assert_eq!(int.get(at, 0), v);
        }
        let got: Vec<Val> = (0..reference.len()).map(|r| int.get(r, 0)).collect();
        assert_eq!(got, reference);
        let mut unsigned = Args::new(1);
        for v in [0, 255, 256, 65_536, u64::MAX] {
            unsigned.push([Val::UInt(v)]);
        }
        unsigned.push([Val::Null]);
        let got: Vec<Val> = (0..6).map(|r| unsigned.get(r, 0)).collect();
        let mut want: Vec<Val> = [0, 255, 256, 65_536, u64::MAX].map(Val::UInt).into();
        want.push(Val::Null);
        assert_eq!(got, want);
        assert_eq!(unsigned.kind(0), Kind::UInt);
        // Emptied, the column starts again at a byte a row.
        int.clear();
        int.push([Val::Int(1)]);
        assert!(int.bytes() <= heap(1), "{}", int.bytes());
    }
}
