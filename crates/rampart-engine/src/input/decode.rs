//! Decoding inputs into Arrow micro-batches of canonical events: JSON lines, JSON arrays and
//! CloudTrail files (`{"Records": [...]}`), each optionally gzip-compressed. A record that
//! cannot be decoded or mapped becomes a [`DeadLetter`] with its position; decoding carries on.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use flate2::read::MultiGzDecoder;
use serde::Deserialize;
use serde_json::value::RawValue;

use rampart_core::{EventSchema, SourcePosition};

use crate::input::batch::BatchBuilder;
pub use crate::input::batch::{DeadLetter, DeadLetterKind, EventBatch};
use crate::input::mapping::{Extractor, Mapping};
use crate::pipeline::config::InputFormat;

/// The input name that means standard input.
pub const STDIN: &str = "-";

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

/// What decoding records gives, in input order.
#[derive(Debug)]
pub enum Decoded {
    /// A full (or final) batch of events.
    Batch(EventBatch),
    /// A record that could not be used.
    DeadLetter(DeadLetter),
}

/// What reading an input file gives, in input order ([`Decoder::frame_file`]): decoded records,
/// or, from a decoder made with [`Decoder::chunking`], JSON lines left for other threads to
/// decode ([`Decoder::decode_chunk`]); and how far the input has been read.
#[derive(Debug)]
pub enum Framed {
    /// Undecoded JSON lines.
    Lines(LineChunk),
    /// Records decoded here (formats other than JSON lines, or a decoder that does not chunk).
    Decoded(Decoded),
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

    /// Makes this decoder frame JSON lines into [`Framed::Lines`] chunks of `lines` lines
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

    /// Decodes one file (gzip or not) here, whatever the chunking. IO errors on the file
    /// itself are returned; everything wrong with its content becomes dead letters.
    /// The path `-` is standard input (named `<stdin>` in positions).
    pub fn decode_file(&mut self, path: &Path, emit: &mut dyn FnMut(Decoded)) -> io::Result<()> {
        self.decoding_here(|d, framed| d.frame_file(path, framed), emit)
    }

    /// Decodes text held in memory (test cases), named `name` in positions.
    pub fn decode_text(&mut self, name: &str, text: &str, emit: &mut dyn FnMut(Decoded)) -> io::Result<()> {
        self.decoding_here(|d, framed| d.frame_text(name, text, framed), emit)
    }

    /// Runs `read` with chunking off, handing on only the decoded records.
    fn decoding_here(
        &mut self,
        read: impl FnOnce(&mut Self, &mut dyn FnMut(Framed)) -> io::Result<()>,
        emit: &mut dyn FnMut(Decoded),
    ) -> io::Result<()> {
        let chunking = self.chunk_lines.take();
        let result = read(self, &mut |framed| match framed {
            Framed::Decoded(d) => emit(d),
            Framed::Progress(_) => {}
            Framed::Lines(_) => unreachable!("chunking is off while decoding here"),
        });
        self.chunk_lines = chunking;
        result
    }

    /// Reads one file (gzip or not): JSON lines in chunks if this decoder chunks, everything
    /// else decoded here. IO errors on the file itself are returned; everything wrong with its
    /// content becomes dead letters. The path `-` is standard input (named `<stdin>`).
    pub fn frame_file(&mut self, path: &Path, emit: &mut dyn FnMut(Framed)) -> io::Result<()> {
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
        emit: &mut dyn FnMut(Framed),
    ) -> io::Result<()> {
        let gzip = input.fill_buf()?.starts_with(&[0x1f, 0x8b]);
        let reader: Box<dyn BufRead> = if gzip {
            Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(input)))
        } else {
            Box::new(input)
        };
        self.decode_reader(name, reader, emit)
    }

    /// [`Self::frame_file`] of text held in memory, named `name` in positions.
    pub fn frame_text(&mut self, name: &str, text: &str, emit: &mut dyn FnMut(Framed)) -> io::Result<()> {
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
        emit: &mut dyn FnMut(Framed),
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
        emit(Framed::Progress(bytes.len() as u64));
        let Ok(text) = std::str::from_utf8(&bytes) else {
            self.dead(
                &mut |d| emit(Framed::Decoded(d)),
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
                    self.record(&mut |d| emit(Framed::Decoded(d)), &name, line, raw.get());
                }
            }
            Ok(Document::Single) => {
                self.record(&mut |d| emit(Framed::Decoded(d)), &name, line_no, text.trim())
            }
            Err(_) if self.format == InputFormat::Auto => {
                // Not one JSON document: treat it as JSON lines so good lines still count.
                for (line, text_line) in (line_no..).zip(text.split('\n')) {
                    if !text_line.trim().is_empty() {
                        self.record(
                            &mut |d| emit(Framed::Decoded(d)),
                            &name,
                            line,
                            text_line.trim_end_matches('\r'),
                        );
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
                    &mut |d| emit(Framed::Decoded(d)),
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
        emit: &mut dyn FnMut(Framed),
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
            self.line(&mut |d| emit(Framed::Decoded(d)), name, line_no, &buf);
            if pending >= 1 << 20 {
                emit(Framed::Progress(pending));
                pending = 0;
            }
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            line_no += 1;
        }
        emit(Framed::Progress(pending));
        Ok(())
    }

    fn emit_chunk(&self, emit: &mut dyn FnMut(Framed), name: &Arc<str>, first_line: u64, data: Vec<u8>) {
        emit(Framed::Progress(data.len() as u64));
        emit(Framed::Lines(LineChunk {
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
            .frame_text("input", text, &mut |f| framed.push(f))
            .expect("in memory");
        framer.flush(&mut |d| framed.push(Framed::Decoded(d)));
        let mut worker = decoder(format, 200);
        let mut decoded = Vec::new();
        for item in framed {
            match item {
                Framed::Lines(chunk) => worker.decode_chunk(&chunk, &mut |d| decoded.push(d)),
                Framed::Decoded(d) => decoded.push(d),
                Framed::Progress(_) => {}
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
