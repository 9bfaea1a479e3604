//! What decoding produces: Arrow micro-batches of canonical events with each row's source
//! position ([`EventBatch`], built by [`BatchBuilder`] from mapped records) and the records that
//! could not be used ([`DeadLetter`]).

use std::sync::{Arc, Mutex};

use datafusion::arrow::array::builder::NullBufferBuilder;
use datafusion::arrow::array::{
    Array, ArrayData, ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringArray,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder, UInt64Array, UInt64Builder,
};
use datafusion::arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use rampart_core::{ColumnType, EventSchema, SourcePosition};

use crate::input::mapping::{ExtraValue, MappedEvent};

/// Why a record went to the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterKind {
    /// Not JSON, not an object, missing or mistyped fields, too large.
    Malformed,
    /// Older than the allowed lateness.
    Late,
}

/// A record Rampart could not use, with the reason and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// malformed or late.
    pub kind: DeadLetterKind,
    /// What was wrong.
    pub error: String,
    /// Where the record came from.
    pub source: SourcePosition,
    /// The record's text (cut at the record size limit).
    pub record: String,
    /// Whether `record` was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// A micro-batch of canonical events with the source position of each row.
#[derive(Debug, Clone)]
pub struct EventBatch {
    /// The events, in the pipeline's event schema.
    pub batch: RecordBatch,
    /// Source position of each row.
    pub positions: Vec<SourcePosition>,
    /// Row id of the first row; row `i` has id `first_row + i`.
    pub first_row: u64,
}

impl EventBatch {
    /// Column `column`'s value at `row` as text, null as the empty text (routing keys).
    pub fn text_at(&self, column: usize, row: usize) -> String {
        let values = self.batch.column(column);
        if values.is_null(row) {
            return String::new();
        }
        if let Some(strings) = values.as_any().downcast_ref::<StringArray>() {
            return strings.value(row).to_string();
        }
        datafusion::arrow::util::display::array_value_to_string(values, row).unwrap_or_default()
    }

    /// Gives the rows the ids `first_row..`, for batches decoded out of order on other threads.
    pub fn renumber(&mut self, first_row: u64) {
        if self.first_row == first_row {
            return;
        }
        let n = self.batch.num_rows() as u64;
        let mut columns = self.batch.columns().to_vec();
        if let Some(ids) = columns.last_mut() {
            *ids = Arc::new(UInt64Array::from_iter_values(first_row..first_row + n));
        }
        self.batch = RecordBatch::try_new(self.batch.schema(), columns).expect("same schema, same length");
        self.first_row = first_row;
    }

    /// The rows where `keep` is true (renumber afterwards).
    pub fn retain(self, keep: &[bool]) -> Self {
        let mask = datafusion::arrow::array::BooleanArray::from(keep.to_vec());
        let batch = datafusion::arrow::compute::filter_record_batch(&self.batch, &mask)
            .expect("mask has the batch's length");
        let positions = self
            .positions
            .into_iter()
            .zip(keep)
            .filter_map(|(p, k)| k.then_some(p))
            .collect();
        Self {
            batch,
            positions,
            first_row: u64::MAX,
        }
    }

    /// Index of the row with `row_id`, if it is in this batch.
    pub fn index_of(&self, row_id: u64) -> Option<usize> {
        let i = usize::try_from(row_id.checked_sub(self.first_row)?).ok()?;
        (i < self.batch.num_rows()).then_some(i)
    }

    fn strings(&self, column: usize) -> &StringArray {
        self.batch
            .column(column)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("canonical string column")
    }

    /// Event time of row `i`, in microseconds.
    pub fn event_time(&self, i: usize) -> i64 {
        let times = self
            .batch
            .column(0)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>();
        times.expect("canonical event_time column").value(i)
    }

    /// Actor of row `i`.
    pub fn actor(&self, i: usize) -> &str {
        self.strings(1).value(i)
    }

    /// Action of row `i`.
    pub fn action(&self, i: usize) -> &str {
        self.strings(2).value(i)
    }

    /// Raw JSON text of row `i`.
    pub fn raw(&self, i: usize) -> &str {
        self.strings(self.batch.num_columns() - 2).value(i)
    }

    /// The buffers of the batch's text columns, for later batches to be built in (see
    /// [`BatchPool`]): each one that nothing else holds any more (no clone of the batch or of
    /// that column alive, the batch not filtered); the others come back empty.
    pub fn into_text_buffers(self) -> TextBuffers {
        let texts: Vec<ArrayData> = self
            .batch
            .columns()
            .iter()
            .filter(|c| c.data_type() == &DataType::Utf8)
            .map(|c| c.to_data())
            .collect();
        drop(self);
        let buffers = texts
            .into_iter()
            .map(|data| {
                let [ends, values] = data.buffers() else {
                    return TextBuffer::default();
                };
                let (ends, values) = (ends.clone(), values.clone());
                drop(data);
                TextBuffer {
                    values: values.into_vec().unwrap_or_default(),
                    ends: ends.into_vec().unwrap_or_default(),
                }
            })
            .collect();
        TextBuffers(buffers)
    }
}

/// One text column's vectors: its values and where each ends.
#[derive(Debug, Default)]
struct TextBuffer {
    values: Vec<u8>,
    ends: Vec<i32>,
}

/// The text columns' vectors of a dropped batch, in the order of the event schema's text
/// columns ([`EventBatch::into_text_buffers`]).
#[derive(Debug, Default)]
pub struct TextBuffers(Vec<TextBuffer>);

#[cfg(test)]
impl TextBuffers {
    /// Each column's values.
    pub(crate) fn values(&self) -> Vec<&[u8]> {
        self.0.iter().map(|b| b.values.as_slice()).collect()
    }
}

/// Buffers given back for reuse, shared by the threads that give them and the one that takes
/// them: at most [`Kept::MAX`] (about the buffers in flight between them); the others are freed.
#[derive(Debug)]
pub(crate) struct Kept<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Kept<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T> Kept<T> {
    const MAX: usize = 8;

    pub(crate) fn give(&self, item: T) {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < Self::MAX {
            kept.push(item);
        }
    }

    pub(crate) fn take(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }
}

/// Where the driver gives back evaluated batches' text buffers for the decoding threads to build
/// the next batches in ([`Kept`]). Text is most of a batch's bytes (the raw records above all):
/// built in fresh vectors, every batch cost the kernel's zeroing of each page (memory freed is
/// given back to the OS at once, see the allocator's set-up in `main.rs`) and copies as the
/// vectors grew.
#[derive(Debug, Clone, Default)]
pub struct BatchPool(Kept<TextBuffers>);

impl BatchPool {
    /// Gives an evaluated batch's text buffers back.
    pub fn give(&self, batch: EventBatch) {
        self.0.give(batch.into_text_buffers());
    }

    fn take(&self) -> TextBuffers {
        self.0.take().unwrap_or_default()
    }
}

/// A text column built in vectors that can come back from dropped batches.
#[derive(Debug)]
struct TextColumn {
    values: Vec<u8>,
    ends: Vec<i32>,
    nulls: NullBufferBuilder,
}

impl Default for TextColumn {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            ends: vec![0],
            nulls: NullBufferBuilder::new(0),
        }
    }
}

impl TextColumn {
    fn push(&mut self, value: Option<&str>) {
        match value {
            Some(text) => {
                self.values.extend_from_slice(text.as_bytes());
                self.nulls.append_non_null();
            }
            None => self.nulls.append_null(),
        }
        let end = i32::try_from(self.values.len())
            .expect("a batch's texts stay under 2 GiB (its raw records do: max_batch_bytes)");
        self.ends.push(end);
    }

    /// The column built so far; the next one is built in `next` (from a dropped batch, or
    /// fresh), made at least a quarter larger than this one so that it rarely grows by copying.
    fn finish(&mut self, mut next: TextBuffer) -> StringArray {
        next.values.clear();
        next.values.reserve(self.values.len() + self.values.len() / 4);
        next.ends.clear();
        next.ends.reserve(self.ends.len());
        next.ends.push(0);
        let values = std::mem::replace(&mut self.values, next.values);
        let ends = std::mem::replace(&mut self.ends, next.ends);
        StringArray::try_new(
            OffsetBuffer::new(ScalarBuffer::from(ends)),
            Buffer::from_vec(values),
            self.nulls.finish(),
        )
        .expect("texts are pushed whole, their ends in order")
    }
}

/// Accumulates mapped events into Arrow columns; the text columns are built in vectors that
/// come back from dropped batches when the driver gives them to the pool ([`BatchPool`]).
pub(crate) struct BatchBuilder {
    schema: EventSchema,
    capacity: usize,
    time: TimestampMicrosecondBuilder,
    actor: TextColumn,
    action: TextColumn,
    optional: [TextColumn; 4],
    extras: Vec<ExtraBuilder>,
    raw: TextColumn,
    pool: BatchPool,
    row: UInt64Builder,
    positions: Vec<SourcePosition>,
    /// The row id the next event gets (the decoder numbers rows in input order).
    pub(crate) next_row: u64,
}

enum ExtraBuilder {
    String(TextColumn),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl BatchBuilder {
    pub(crate) fn new(schema: EventSchema, capacity: usize) -> Self {
        let extras = schema
            .extras()
            .iter()
            .map(|(_, ty)| match ty {
                ColumnType::String => ExtraBuilder::String(TextColumn::default()),
                ColumnType::Int => ExtraBuilder::Int(Int64Builder::new()),
                ColumnType::Float => ExtraBuilder::Float(Float64Builder::new()),
                ColumnType::Bool => ExtraBuilder::Bool(BooleanBuilder::new()),
                ColumnType::Timestamp => {
                    ExtraBuilder::Timestamp(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
                }
            })
            .collect();
        Self {
            schema,
            capacity,
            time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            actor: TextColumn::default(),
            action: TextColumn::default(),
            optional: Default::default(),
            extras,
            raw: TextColumn::default(),
            pool: BatchPool::default(),
            row: UInt64Builder::new(),
            positions: Vec::with_capacity(capacity),
            next_row: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.positions.len()
    }

    /// Builds the text columns in buffers taken from `pool` (see [`BatchPool`]).
    pub(crate) fn recycling(&mut self, pool: BatchPool) {
        self.pool = pool;
    }

    /// Bytes of raw records held (most of a batch's memory).
    pub(crate) fn bytes(&self) -> usize {
        self.raw.values.len()
    }

    /// Adds an event (its extra values taken: the list is left empty for the next record).
    pub(crate) fn push(&mut self, event: &mut MappedEvent, raw: &str, position: SourcePosition) {
        self.time.append_value(event.event_time);
        self.actor.push(Some(&event.actor));
        self.action.push(Some(&event.action));
        for (b, v) in self.optional.iter_mut().zip(&event.optional) {
            b.push(v.as_deref());
        }
        for (b, v) in self.extras.iter_mut().zip(event.extras.drain(..)) {
            match (b, v) {
                (ExtraBuilder::String(b), ExtraValue::String(s)) => b.push(Some(&s)),
                (ExtraBuilder::Int(b), ExtraValue::Int(i)) => b.append_value(i),
                (ExtraBuilder::Float(b), ExtraValue::Float(f)) => b.append_value(f),
                (ExtraBuilder::Bool(b), ExtraValue::Bool(x)) => b.append_value(x),
                (ExtraBuilder::Timestamp(b), ExtraValue::Timestamp(t)) => b.append_value(t),
                (ExtraBuilder::String(b), _) => b.push(None),
                (ExtraBuilder::Int(b), _) => b.append_null(),
                (ExtraBuilder::Float(b), _) => b.append_null(),
                (ExtraBuilder::Bool(b), _) => b.append_null(),
                (ExtraBuilder::Timestamp(b), _) => b.append_null(),
            }
        }
        self.raw.push(Some(raw));
        self.row.append_value(self.next_row + self.positions.len() as u64);
        self.positions.push(position);
    }

    pub(crate) fn finish(&mut self) -> Option<EventBatch> {
        if self.positions.is_empty() {
            return None;
        }
        // The text columns in the schema's order, as `into_text_buffers` gives them back.
        let mut next = self.pool.take().0.into_iter();
        let mut text = |column: &mut TextColumn| -> ArrayRef {
            Arc::new(column.finish(next.next().unwrap_or_default()))
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            text(&mut self.actor),
            text(&mut self.action),
        ];
        columns.extend(self.optional.iter_mut().map(&mut text));
        for extra in &mut self.extras {
            columns.push(match extra {
                ExtraBuilder::String(b) => text(b),
                ExtraBuilder::Int(b) => Arc::new(b.finish()),
                ExtraBuilder::Float(b) => Arc::new(b.finish()),
                ExtraBuilder::Bool(b) => Arc::new(b.finish()),
                ExtraBuilder::Timestamp(b) => Arc::new(b.finish()),
            });
        }
        columns.push(text(&mut self.raw));
        columns.push(Arc::new(self.row.finish()));
        let batch = RecordBatch::try_new(Arc::clone(self.schema.arrow()), columns)
            .expect("builders follow the event schema");
        let positions = std::mem::replace(&mut self.positions, Vec::with_capacity(self.capacity));
        let first_row = self.next_row;
        self.next_row += positions.len() as u64;
        Some(EventBatch {
            batch,
            positions,
            first_row,
        })
    }
}
