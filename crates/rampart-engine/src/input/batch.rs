//! What decoding produces: Arrow micro-batches of canonical events with each row's source
//! position ([`EventBatch`], built by [`BatchBuilder`] from mapped records) and the records that
//! could not be used ([`DeadLetter`]).

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringArray, StringBuilder,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder, UInt64Array, UInt64Builder,
};
use datafusion::arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use datafusion::arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use rampart_core::{ColumnType, EventSchema, SourcePosition};

use crate::input::decode::ChunkPool;
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

    /// The buffer that held the raw texts, for the next batch to be built in (see
    /// [`BatchBuilder`]), when nothing else holds it any more (no clone of the batch or of its
    /// raw column is alive, and the batch was not filtered).
    pub fn into_raw_buffer(self) -> Option<Vec<u8>> {
        let raw = self.batch.column(self.batch.num_columns() - 2).to_data();
        drop(self);
        let values = raw.buffers().get(1)?.clone();
        drop(raw);
        values.into_vec::<u8>().ok()
    }
}

/// Accumulates mapped events into Arrow column builders.
pub(crate) struct BatchBuilder {
    schema: EventSchema,
    capacity: usize,
    time: TimestampMicrosecondBuilder,
    actor: StringBuilder,
    action: StringBuilder,
    optional: [StringBuilder; 4],
    extras: Vec<ExtraBuilder>,
    /// The raw texts and where each ends, built into buffers that come back from dropped
    /// batches ([`EventBatch::into_raw_buffer`]) when the driver gives them to `raw_pool`: a
    /// fresh buffer of a batch's size (most of its bytes) costs the kernel's zeroing of every
    /// page, then copies as it grows.
    raw: Vec<u8>,
    raw_ends: Vec<i32>,
    raw_pool: ChunkPool,
    row: UInt64Builder,
    positions: Vec<SourcePosition>,
    /// The row id the next event gets (the decoder numbers rows in input order).
    pub(crate) next_row: u64,
}

enum ExtraBuilder {
    String(StringBuilder),
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
                ColumnType::String => ExtraBuilder::String(StringBuilder::new()),
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
            actor: StringBuilder::new(),
            action: StringBuilder::new(),
            optional: Default::default(),
            extras,
            raw: Vec::new(),
            raw_ends: vec![0],
            raw_pool: ChunkPool::default(),
            row: UInt64Builder::new(),
            positions: Vec::with_capacity(capacity),
            next_row: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.positions.len()
    }

    /// Builds the raw texts in buffers taken from `pool` (see [`Self::raw`]).
    pub(crate) fn recycling_raw(&mut self, pool: ChunkPool) {
        self.raw_pool = pool;
    }

    /// Bytes of raw records held (most of a batch's memory).
    pub(crate) fn bytes(&self) -> usize {
        self.raw.len()
    }

    pub(crate) fn push(&mut self, event: MappedEvent, raw: &str, position: SourcePosition) {
        self.time.append_value(event.event_time);
        self.actor.append_value(&event.actor);
        self.action.append_value(&event.action);
        for (b, v) in self.optional.iter_mut().zip(&event.optional) {
            b.append_option(v.as_deref());
        }
        for (b, v) in self.extras.iter_mut().zip(event.extras) {
            match (b, v) {
                (ExtraBuilder::String(b), ExtraValue::String(s)) => b.append_value(s),
                (ExtraBuilder::Int(b), ExtraValue::Int(i)) => b.append_value(i),
                (ExtraBuilder::Float(b), ExtraValue::Float(f)) => b.append_value(f),
                (ExtraBuilder::Bool(b), ExtraValue::Bool(x)) => b.append_value(x),
                (ExtraBuilder::Timestamp(b), ExtraValue::Timestamp(t)) => b.append_value(t),
                (ExtraBuilder::String(b), _) => b.append_null(),
                (ExtraBuilder::Int(b), _) => b.append_null(),
                (ExtraBuilder::Float(b), _) => b.append_null(),
                (ExtraBuilder::Bool(b), _) => b.append_null(),
                (ExtraBuilder::Timestamp(b), _) => b.append_null(),
            }
        }
        self.raw.extend_from_slice(raw.as_bytes());
        let end =
            i32::try_from(self.raw.len()).expect("a batch's raw texts stay under 2 GiB (max_batch_bytes)");
        self.raw_ends.push(end);
        self.row.append_value(self.next_row + self.positions.len() as u64);
        self.positions.push(position);
    }

    pub(crate) fn finish(&mut self) -> Option<EventBatch> {
        if self.positions.is_empty() {
            return None;
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.actor.finish()),
            Arc::new(self.action.finish()),
        ];
        columns.extend(self.optional.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.extend(self.extras.iter_mut().map(|b| -> ArrayRef {
            match b {
                ExtraBuilder::String(b) => Arc::new(b.finish()),
                ExtraBuilder::Int(b) => Arc::new(b.finish()),
                ExtraBuilder::Float(b) => Arc::new(b.finish()),
                ExtraBuilder::Bool(b) => Arc::new(b.finish()),
                ExtraBuilder::Timestamp(b) => Arc::new(b.finish()),
            }
        }));
        // The raw text is most of a batch's bytes: the next one starts in a buffer at least as
        // large as this one, so it does not grow by copying.
        let next = self.raw_pool.take(self.raw.len());
        let values = Buffer::from_vec(std::mem::replace(&mut self.raw, next));
        let ends = std::mem::replace(&mut self.raw_ends, Vec::with_capacity(self.capacity + 1));
        self.raw_ends.push(0);
        let raw = StringArray::try_new(OffsetBuffer::new(ScalarBuffer::from(ends)), values, None)
            .expect("raw texts are pushed as text");
        columns.push(Arc::new(raw));
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
