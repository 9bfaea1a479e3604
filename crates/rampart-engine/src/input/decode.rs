//! Decoding inputs into Arrow micro-batches of canonical events: JSON lines, JSON arrays and
//! CloudTrail files (`{"Records": [...]}`), each optionally gzip-compressed. A record that
//! cannot be decoded or mapped becomes a [`DeadLetter`] with its position; decoding carries on.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringArray, StringBuilder,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder, UInt64Array, UInt64Builder,
};
use datafusion::arrow::record_batch::RecordBatch;
use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use rampart_core::{ColumnType, EventSchema, SourcePosition};

use crate::input::mapping::{ExtraValue, Extractor, MappedEvent, Mapping};
use crate::pipeline::config::InputFormat;

/// The input name that means standard input.
pub const STDIN: &str = "-";

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
}

/// Raw JSON lines cut from an input, for decoding on another thread
/// ([`Decoder::decode_chunk`]).
#[derive(Debug)]
pub struct LineChunk {
    /// The input's name.
    pub name: Arc<str>,
    /// Line number of the first line in `data`.
    pub first_line: u64,
    /// Whole lines, each ending with `\n` (but maybe the last).
    pub data: Vec<u8>,
}

/// What decoding hands on, in input order.
#[derive(Debug)]
pub enum Decoded {
    /// Undecoded lines (only from a decoder made with [`Decoder::chunking`]).
    Lines(LineChunk),
    /// A full (or final) batch of events.
    Batch(EventBatch),
    /// A record that could not be used.
    DeadLetter(DeadLetter),
    /// Bytes of input consumed since the last report (for progress).
    Progress(u64),
}

/// Turns input files and texts into batches and dead letters.
pub struct Decoder {
    /// When set, JSON lines are not decoded here but handed on in chunks of this many lines.
    chunk_lines: Option<usize>,
    extractor: Extractor,
    format: InputFormat,
    max_record_bytes: usize,
    batch_size: usize,
    builder: BatchBuilder,
}

impl Decoder {
    /// A decoder for a pipeline's mapping and schema.
    pub fn new(
        mapping: Mapping,
        schema: EventSchema,
        format: InputFormat,
        max_record_bytes: usize,
        batch_size: usize,
    ) -> Self {
        Self {
            chunk_lines: None,
            builder: BatchBuilder::new(schema, batch_size),
            extractor: Extractor::new(mapping),
            format,
            max_record_bytes,
            batch_size,
        }
    }

    /// Makes this decoder frame JSON lines into [`Decoded::Lines`] chunks of `lines` lines
    /// (other formats still decode here), so that several threads can decode them. With
    /// `lines` = the batch size, each chunk decodes into one full batch.
    pub fn chunking(mut self, lines: usize) -> Self {
        self.chunk_lines = Some(lines.max(1));
        self
    }

    /// Decodes a chunk of JSON lines cut by a chunking decoder; row ids restart at 0 for each
    /// chunk (the consumer renumbers, see [`EventBatch::renumber`]).
    pub fn decode_chunk(&mut self, chunk: &LineChunk, emit: &mut dyn FnMut(Decoded)) {
        let data = chunk.data.strip_suffix(b"\n").unwrap_or(&chunk.data);
        let ends = memchr::memchr_iter(b'\n', data).chain(std::iter::once(data.len()));
        let mut start = 0;
        for (line, end) in (chunk.first_line..).zip(ends) {
            self.line(emit, &chunk.name, line, &data[start..end]);
            start = end + 1;
        }
        self.flush(emit);
        self.builder.next_row = 0;
    }

    /// Decodes one file (gzip or not). IO errors on the file itself are returned; everything
    /// wrong with its content becomes dead letters.
    /// The path `-` is standard input (named `<stdin>` in positions).
    pub fn decode_file(&mut self, path: &Path, emit: &mut dyn FnMut(Decoded)) -> io::Result<()> {
        if path == Path::new(STDIN) {
            let stdin = BufReader::with_capacity(1 << 18, io::stdin().lock());
            return self.decode_stream(Arc::from("<stdin>"), stdin, emit);
        }
        let file = BufReader::with_capacity(1 << 18, File::open(path)?);
        self.decode_stream(Arc::from(path.display().to_string()), file, emit)
    }

    fn decode_stream<R: BufRead + 'static>(
        &mut self,
        name: Arc<str>,
        mut input: R,
        emit: &mut dyn FnMut(Decoded),
    ) -> io::Result<()> {
        let gzip = input.fill_buf()?.starts_with(&[0x1f, 0x8b]);
        let reader: Box<dyn BufRead> = if gzip {
            Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(input)))
        } else {
            Box::new(input)
        };
        self.decode_reader(name, reader, emit)
    }

    /// Decodes text held in memory (test cases), named `name` in positions.
    pub fn decode_text(&mut self, name: &str, text: &str, emit: &mut dyn FnMut(Decoded)) -> io::Result<()> {
        self.decode_reader(Arc::from(name), Box::new(text.as_bytes()), emit)
    }

    /// Emits the partly filled batch, if any.
    pub fn flush(&mut self, emit: &mut dyn FnMut(Decoded)) {
        if let Some(batch) = self.builder.finish() {
            emit(Decoded::Batch(batch));
        }
    }

    fn decode_reader(
        &mut self,
        name: Arc<str>,
        mut reader: Box<dyn BufRead + '_>,
        emit: &mut dyn FnMut(Decoded),
    ) -> io::Result<()> {
        let mut first = Vec::new();
        let mut line_no = 1;
        // Skip leading blank lines, keeping count, to look at the first real line.
        loop {
            first.clear();
            if reader.read_until(b'\n', &mut first)? == 0 {
                return Ok(());
            }
            if first.iter().any(|b| !b.is_ascii_whitespace()) {
                break;
            }
            line_no += 1;
        }
        let starts_array = first.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
        let first_is_records =
            serde_json::from_slice::<RecordsProbe>(&first).is_ok_and(|p| p.records.is_some());
        let first_is_object =
            !first_is_records && serde_json::from_slice::<serde::de::IgnoredAny>(&first).is_ok();
        let whole_document = match self.format {
            InputFormat::JsonLines => false,
            InputFormat::JsonArray | InputFormat::CloudTrail => true,
            InputFormat::Auto => starts_array || first_is_records || !first_is_object,
        };
        if !whole_document {
            return self.decode_lines(&name, first, line_no, reader, emit);
        }
        let mut bytes = first;
        reader.read_to_end(&mut bytes)?;
        emit(Decoded::Progress(bytes.len() as u64));
        let Ok(text) = std::str::from_utf8(&bytes) else {
            self.dead(
                emit,
                &name,
                line_no,
                "the file is not valid UTF-8".into(),
                &String::from_utf8_lossy(&bytes),
            );
            return Ok(());
        };
        match parse_document(text) {
            Ok(Document::Records(records)) => {
                let mut cursor = LineCursor::new(text, line_no);
                for raw in records {
                    let line = cursor.line_at(raw.get());
                    self.record(emit, &name, line, raw.get());
                }
            }
            Ok(Document::Single) => self.record(emit, &name, line_no, text.trim()),
            Err(_) if self.format == InputFormat::Auto => {
                // Not one JSON document: treat it as JSON lines so good lines still count.
                for (line, text_line) in (line_no..).zip(text.split('\n')) {
                    if !text_line.trim().is_empty() {
                        self.record(emit, &name, line, text_line.trim_end_matches('\r'));
                    }
                }
            }
            Err(e) => {
                let error = format!(
                    "not a valid {} file: {e}",
                    if self.format == InputFormat::CloudTrail {
                        "CloudTrail"
                    } else {
                        "JSON array"
                    }
                );
                self.dead(
                    emit,
                    &name,
                    line_no + e.line().saturating_sub(1) as u64,
                    error,
                    text,
                );
            }
        }
        Ok(())
    }

    fn decode_lines(
        &mut self,
        name: &Arc<str>,
        first: Vec<u8>,
        mut line_no: u64,
        mut reader: Box<dyn BufRead + '_>,
        emit: &mut dyn FnMut(Decoded),
    ) -> io::Result<()> {
        if let Some(lines) = self.chunk_lines {
            // Copy the input block-wise (not line by line) and cut after every `lines`-th
            // newline; the decoding threads split the lines.
            let mut data = first;
            let mut first_line = line_no;
            let (mut scanned, mut newlines) = (0, 0);
            loop {
                let mut cut = None;
                for at in memchr::memchr_iter(b'\n', &data[scanned..]) {
                    newlines += 1;
                    if newlines == lines {
                        cut = Some(scanned + at + 1);
                        break;
                    }
                }
                if let Some(cut) = cut {
                    let rest = data.split_off(cut);
                    let chunk = std::mem::replace(&mut data, rest);
                    self.emit_chunk(emit, name, first_line, chunk);
                    first_line += lines as u64;
                    (scanned, newlines) = (0, 0);
                    continue;
                }
                scanned = data.len();
                let read = {
                    let buf = reader.fill_buf()?;
                    data.extend_from_slice(buf);
                    buf.len()
                };
                reader.consume(read);
                if read == 0 {
                    if !data.is_empty() {
                        self.emit_chunk(emit, name, first_line, data);
                    }
                    return Ok(());
                }
            }
        }
        let mut buf = first;
        let mut pending = 0u64;
        loop {
            pending += buf.len() as u64;
            self.line(emit, name, line_no, &buf);
            if pending >= 1 << 20 {
                emit(Decoded::Progress(pending));
                pending = 0;
            }
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            line_no += 1;
        }
        emit(Decoded::Progress(pending));
        Ok(())
    }

    fn emit_chunk(&self, emit: &mut dyn FnMut(Decoded), name: &Arc<str>, first_line: u64, data: Vec<u8>) {
        emit(Decoded::Progress(data.len() as u64));
        emit(Decoded::Lines(LineChunk {
            name: Arc::clone(name),
            first_line,
            data,
        }));
    }

    fn line(&mut self, emit: &mut dyn FnMut(Decoded), name: &Arc<str>, line_no: u64, raw: &[u8]) {
        let trimmed = trim_line(raw);
        if trimmed.is_empty() {
            return;
        }
        match std::str::from_utf8(trimmed) {
            Ok(text) => self.record(emit, name, line_no, text),
            Err(_) => self.dead(
                emit,
                name,
                line_no,
                "the line is not valid UTF-8".into(),
                &String::from_utf8_lossy(trimmed),
            ),
        }
    }

    fn record(&mut self, emit: &mut dyn FnMut(Decoded), name: &Arc<str>, line: u64, text: &str) {
        let position = SourcePosition::File {
            file: Arc::clone(name),
            line,
        };
        self.record_at(emit, position, text);
    }

    /// Decodes one Kafka message: one JSON record. Anything else (not UTF-8, too large, not a
    /// record the mapping can read) becomes a dead letter at the message's position.
    pub fn decode_message(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        offset: i64,
        payload: &[u8],
        emit: &mut dyn FnMut(Decoded),
    ) {
        let position = SourcePosition::Kafka {
            topic: Arc::clone(topic),
            partition,
            offset,
        };
        match std::str::from_utf8(trim_line(payload)) {
            Ok(text) => self.record_at(emit, position, text),
            Err(_) => self.dead_at(
                emit,
                position,
                "the message is not valid UTF-8".into(),
                &String::from_utf8_lossy(payload),
            ),
        }
    }

    fn record_at(&mut self, emit: &mut dyn FnMut(Decoded), position: SourcePosition, text: &str) {
        if text.len() > self.max_record_bytes {
            let error = format!(
                "the record is {} bytes, over the limit of {} (source.max_record_bytes)",
                text.len(),
                self.max_record_bytes
            );
            return self.dead_at(emit, position, error, text);
        }
        match self.extractor.map(text) {
            Ok(event) => {
                self.builder.push(event, text, position);
                if self.builder.len() >= self.batch_size
                    && let Some(batch) = self.builder.finish()
                {
                    emit(Decoded::Batch(batch));
                }
            }
            Err(error) => self.dead_at(emit, position, error, text),
        }
    }

    fn dead(&self, emit: &mut dyn FnMut(Decoded), name: &Arc<str>, line: u64, error: String, text: &str) {
        let position = SourcePosition::File {
            file: Arc::clone(name),
            line,
        };
        self.dead_at(emit, position, error, text);
    }

    fn dead_at(&self, emit: &mut dyn FnMut(Decoded), source: SourcePosition, error: String, text: &str) {
        let truncated = text.len() > self.max_record_bytes;
        let mut end = text.len().min(self.max_record_bytes);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        emit(Decoded::DeadLetter(DeadLetter {
            kind: DeadLetterKind::Malformed,
            error,
            source,
            record: text[..end].to_string(),
            truncated,
        }));
    }
}

fn trim_line(buf: &[u8]) -> &[u8] {
    let mut end = buf.len();
    while end > 0 && matches!(buf[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    let start = buf[..end]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(end);
    &buf[start..end]
}

#[derive(Deserialize)]
struct RecordsProbe {
    #[serde(rename = "Records")]
    records: Option<serde::de::IgnoredAny>,
}

enum Document<'a> {
    Records(Vec<&'a RawValue>),
    Single,
}

fn parse_document(text: &str) -> Result<Document<'_>, serde_json::Error> {
    #[derive(Deserialize)]
    struct CloudTrailFile<'a> {
        #[serde(borrow, rename = "Records")]
        records: Option<Vec<&'a RawValue>>,
    }
    // RawValue cannot be borrowed through an untagged enum: pick the shape by its first byte.
    if text.trim_start().starts_with('[') {
        return Ok(Document::Records(serde_json::from_str(text)?));
    }
    Ok(match serde_json::from_str::<CloudTrailFile>(text)?.records {
        Some(records) => Document::Records(records),
        None => Document::Single,
    })
}

/// Finds the line of sub-slices of a text, in increasing order, counting newlines once.
struct LineCursor<'a> {
    text: &'a str,
    offset: usize,
    line: u64,
}

impl<'a> LineCursor<'a> {
    fn new(text: &'a str, first_line: u64) -> Self {
        Self {
            text,
            offset: 0,
            line: first_line,
        }
    }

    fn line_at(&mut self, part: &str) -> u64 {
        let target = (part.as_ptr() as usize)
            .saturating_sub(self.text.as_ptr() as usize)
            .min(self.text.len());
        if target >= self.offset {
            self.line += self.text.as_bytes()[self.offset..target]
                .iter()
                .filter(|b| **b == b'\n')
                .count() as u64;
            self.offset = target;
        }
        self.line
    }
}

/// Accumulates mapped events into Arrow column builders.
struct BatchBuilder {
    schema: EventSchema,
    capacity: usize,
    time: TimestampMicrosecondBuilder,
    actor: StringBuilder,
    action: StringBuilder,
    optional: [StringBuilder; 4],
    extras: Vec<ExtraBuilder>,
    raw: StringBuilder,
    row: UInt64Builder,
    positions: Vec<SourcePosition>,
    next_row: u64,
}

enum ExtraBuilder {
    String(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl BatchBuilder {
    fn new(schema: EventSchema, capacity: usize) -> Self {
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
            raw: StringBuilder::new(),
            row: UInt64Builder::new(),
            positions: Vec::with_capacity(capacity),
            next_row: 0,
        }
    }

    fn len(&self) -> usize {
        self.positions.len()
    }

    fn push(&mut self, event: MappedEvent, raw: &str, position: SourcePosition) {
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
        self.raw.append_value(raw);
        self.row.append_value(self.next_row + self.positions.len() as u64);
        self.positions.push(position);
    }

    fn finish(&mut self) -> Option<EventBatch> {
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
        let raw = self.raw.finish();
        // The raw text is most of a batch's bytes: size the next builder like this batch so it
        // never grows by copying.
        self.raw = StringBuilder::with_capacity(self.capacity, raw.value_data().len());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::mapping::{FieldSpec, JsonPath};

    fn decoder(format: InputFormat, max: usize) -> Decoder {
        let spec = |p: &str| FieldSpec {
            paths: vec![JsonPath::parse(p).expect("path")],
            default: None,
        };
        let mapping = Mapping {
            event_time: spec("t"),
            actor: spec("a"),
            action: spec("x"),
            optional: Default::default(),
            extras: vec![],
        };
        Decoder::new(mapping, EventSchema::new(vec![]), format, max, 2)
    }

    /// (actor, line) of each event and (line, error) of each dead letter.
    type Outcome = (Vec<(String, u64)>, Vec<(u64, String)>);

    fn run(format: InputFormat, text: &str) -> Outcome {
        run_with(decoder(format, 200), text)
    }

    /// Frames with a chunking decoder, decodes the chunks with another, like replay does.
    fn run_chunked(format: InputFormat, text: &str, lines: usize) -> Outcome {
        let mut framed = Vec::new();
        let mut framer = decoder(format, 200).chunking(lines);
        framer
            .decode_text("input", text, &mut |d| framed.push(d))
            .expect("in memory");
        framer.flush(&mut |d| framed.push(d));
        let mut worker = decoder(format, 200);
        let mut decoded = Vec::new();
        for item in framed {
            match item {
                Decoded::Lines(chunk) => worker.decode_chunk(&chunk, &mut |d| decoded.push(d)),
                other => decoded.push(other),
            }
        }
        collect(decoded)
    }

    fn run_with(mut d: Decoder, text: &str) -> Outcome {
        let mut out = Vec::new();
        d.decode_text("input", text, &mut |o| out.push(o))
            .expect("in memory");
        d.flush(&mut |o| out.push(o));
        collect(out)
    }

    fn collect(items: Vec<Decoded>) -> Outcome {
        let mut events = Vec::new();
        let mut dead = Vec::new();
        for o in items {
            match o {
                Decoded::Batch(b) => {
                    for i in 0..b.batch.num_rows() {
                        let SourcePosition::File { line, .. } = &b.positions[i] else {
                            panic!("file position")
                        };
                        events.push((b.actor(i).to_string(), *line));
                    }
                }
                Decoded::DeadLetter(l) => {
                    let SourcePosition::File { line, .. } = l.source else {
                        panic!("file position")
                    };
                    dead.push((line, l.error));
                }
                Decoded::Progress(_) => {}
                Decoded::Lines(_) => panic!("a chunk was left undecoded"),
            }
        }
        (events, dead)
    }

    #[test]
    fn chunked_decoding_gives_the_same_events_lines_and_dead_letters() {
        let bad = "{not json";
        let text = format!("\n{A}\n\n{B}\n{bad}\n{A}\r\n{B}");
        let sequential = run(InputFormat::Auto, &text);
        assert_eq!(sequential.1.len(), 1);
        for lines in [1, 2, 3, 100] {
            assert_eq!(
                run_chunked(InputFormat::Auto, &text, lines),
                sequential,
                "chunks of {lines} lines"
            );
        }
    }

    const A: &str = r#"{"t": "2024-01-01T00:00:00Z", "a": "alice", "x": "Get"}"#;
    const B: &str = r#"{"t": "2024-01-01T00:00:01Z", "a": "bob", "x": "Put"}"#;

    #[test]
    fn json_lines_keep_line_numbers_across_blank_lines_and_batches() {
        let text = format!("\n{A}\n\n{B}\n{A}\r\n");
        let (events, dead) = run(InputFormat::Auto, &text);
        assert_eq!(
            events,
            [("alice".into(), 2), ("bob".into(), 4), ("alice".into(), 5)]
        );
        assert!(dead.is_empty());
    }

    #[test]
    fn pretty_printed_arrays_and_cloudtrail_files_point_at_each_record() {
        let array = format!("[\n  {A},\n  {B}\n]\n");
        assert_eq!(
            run(InputFormat::Auto, &array).0,
            [("alice".into(), 2), ("bob".into(), 3)]
        );
        let trail = format!("{{\"Records\": [{A},\n{B}]}}");
        assert_eq!(
            run(InputFormat::Auto, &trail).0,
            [("alice".into(), 1), ("bob".into(), 2)]
        );
        let trail = format!("{{\n \"Records\": [\n{A},\n{B}]}}");
        assert_eq!(
            run(InputFormat::CloudTrail, &trail).0,
            [("alice".into(), 3), ("bob".into(), 4)]
        );
    }

    #[test]
    fn a_broken_array_falls_back_to_lines_in_auto_and_is_one_dead_letter_when_declared() {
        let text = format!("[\n{A},\n{B}\n");
        let (events, dead) = run(InputFormat::JsonArray, &text);
        assert!(events.is_empty());
        assert_eq!(dead.len(), 1);
        assert!(dead[0].1.starts_with("not a valid JSON array file"), "{dead:?}");
    }

    #[test]
    fn oversized_and_non_object_records_are_dead_letters() {
        let big = format!(
            r#"{{"t": "2024-01-01T00:00:00Z", "a": "alice", "x": "{}"}}"#,
            "y".repeat(300)
        );
        let (events, dead) = run(InputFormat::JsonLines, &format!("{big}\n[1,2]\n{B}"));
        assert_eq!(events, [("bob".into(), 3)]);
        assert_eq!(dead[0].0, 1);
        assert!(dead[0].1.contains("over the limit of 200"), "{dead:?}");
        assert_eq!(dead[1], (2, "the record is not a JSON object".to_string()));
    }
}
