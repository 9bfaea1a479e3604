//! Decoding inputs into Arrow micro-batches of canonical events: JSON lines, JSON arrays and
//! CloudTrail files (`{"Records": [...]}`), each optionally gzip-compressed. A record that
//! cannot be decoded or mapped becomes a [`DeadLetter`] with its position; decoding carries on.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use flate2::read::MultiGzDecoder;
use serde::Deserialize;
use serde_json::value::RawValue;

use rampart_core::{EventSchema, SourcePosition};

use crate::input::batch::{BatchBuilder, Kept};
pub use crate::input::batch::{BatchPool, DeadLetter, DeadLetterKind, EventBatch};
use crate::input::mapping::{Extractor, Mapping, Spare};
use crate::pipeline::config::{InputFormat, InputLimits};

/// The input name that means standard input.
pub const STDIN: &str = "-";

/// Gzip input is checked against `source.max_gzip_ratio` once it has expanded to this many
/// bytes (small files may compress very well and harmlessly).
pub const GZIP_RATIO_FROM: u64 = 64 << 20;

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

/// Chunk buffers given back by the threads that decoded them, for the framer to cut the next
/// chunks into ([`Kept`]).
#[derive(Debug, Clone, Default)]
pub struct ChunkPool(Kept<Vec<u8>>);

impl ChunkPool {
    /// Gives a decoded chunk's buffer back.
    pub fn give(&self, mut buffer: Vec<u8>) {
        buffer.clear();
        self.0.give(buffer);
    }

    /// An empty buffer of at least `capacity` bytes.
    pub(crate) fn take(&self, capacity: usize) -> Vec<u8> {
        let mut buffer = self.0.take().unwrap_or_default();
        buffer.reserve(capacity);
        buffer
    }
}

/// Turns input files and texts into batches and dead letters.
pub struct Decoder {
    /// When set, JSON lines are not decoded here but handed on in chunks of this many lines.
    chunk_lines: Option<usize>,
    /// The buffers chunks are cut into, given back once decoded (see [`ChunkPool`]).
    pool: ChunkPool,
    extractor: Extractor,
    /// The extractor's lists, kept from one record to the next.
    spare: Spare,
    format: InputFormat,
    limits: InputLimits,
    builder: BatchBuilder,
}

impl Decoder {
    /// A decoder for a pipeline's mapping and schema, within `limits`.
    pub fn new(mapping: Mapping, schema: EventSchema, format: InputFormat, limits: InputLimits) -> Self {
        Self {
            chunk_lines: None,
            pool: ChunkPool::default(),
            builder: BatchBuilder::new(schema, limits.batch_size),
            extractor: Extractor::new(mapping),
            spare: Spare::default(),
            format,
            limits,
        }
    }

    /// Builds batches' text columns in buffers taken from `pool`, where the driver gives back
    /// those of evaluated batches ([`BatchPool::give`]).
    pub fn recycling(mut self, pool: BatchPool) -> Self {
        self.builder.recycling(pool);
        self
    }

    /// Where the decoding threads give back the chunk buffers of this (chunking) decoder once
    /// decoded, for it to cut the next chunks into.
    pub fn chunk_pool(&self) -> ChunkPool {
        self.pool.clone()
    }

    /// The longest line kept whole: a record at the size limit and its line ending. Longer
    /// lines are refused without being held.
    fn line_cap(&self) -> usize {
        self.limits.max_record_bytes.saturating_add(2)
    }

    /// Makes this decoder frame JSON lines into [`Framed::Lines`] chunks of `lines` lines, or
    /// fewer once they take `source.max_batch_bytes` (other formats still decode here), so that
    /// several threads can decode them. With `lines` = the batch size, each chunk decodes into
    /// one batch.
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

    /// Decodes the bytes of a file held in memory (gzip or not), named `name` in positions.
    pub fn decode_bytes(
        &mut self,
        name: &str,
        bytes: &[u8],
        emit: &mut dyn FnMut(Decoded),
    ) -> io::Result<()> {
        self.decoding_here(|d, framed| d.frame_bytes(name, bytes, framed), emit)
    }

    /// [`Self::frame_file`] of a file's bytes held in memory, named `name` in positions.
    pub fn frame_bytes(&mut self, name: &str, bytes: &[u8], emit: &mut dyn FnMut(Framed)) -> io::Result<()> {
        self.decode_stream(Arc::from(name), bytes, emit)
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

    fn decode_stream<R: BufRead>(
        &mut self,
        name: Arc<str>,
        mut input: R,
        emit: &mut dyn FnMut(Framed),
    ) -> io::Result<()> {
        let gzip = input.fill_buf()?.starts_with(&[0x1f, 0x8b]);
        if !gzip {
            return self.decode_reader(Arc::clone(&name), Box::new(input), emit);
        }
        let refused = Rc::new(RefCell::new(None));
        let guard = GzipGuard::new(input, self.limits.max_gzip_ratio, Rc::clone(&refused));
        self.decode_reader(
            Arc::clone(&name),
            Box::new(BufReader::with_capacity(1 << 16, guard)),
            emit,
        )?;
        if let Some(Cut { line, reason }) = refused.take() {
            self.dead(&mut |d| emit(Framed::Decoded(d)), &name, line, reason, "");
        }
        Ok(())
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
        // Skip leading blank lines, keeping count, to look at the first real line (which may
        // be a whole document: CloudTrail files are one line).
        let document_cap = self.limits.max_document_bytes.saturating_add(1);
        let first_taken = loop {
            first.clear();
            let taken = read_line_capped(&mut reader, &mut first, document_cap, Taken::default())?;
            if taken.bytes == 0 {
                return Ok(());
            }
            if first.iter().any(|b| !b.is_ascii_whitespace()) {
                break taken;
            }
            line_no += 1;
        };
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
            return self.decode_lines(&name, (first, first_taken), line_no, reader, emit);
        }
        let mut bytes = first;
        let room = document_cap.saturating_sub(bytes.len()) as u64;
        reader.take(room).read_to_end(&mut bytes)?;
        emit(Framed::Progress(bytes.len() as u64));
        if bytes.len() > self.limits.max_document_bytes {
            let error = format!(
                "the file is one JSON document of more than {} bytes (source.max_document_bytes): \
                 refused; split it, or write it as JSON lines",
                self.limits.max_document_bytes
            );
            let start = &bytes[..bytes.len().min(self.limits.max_record_bytes)];
            self.dead(
                &mut |d| emit(Framed::Decoded(d)),
                &name,
                line_no,
                error,
                &String::from_utf8_lossy(start),
            );
            return Ok(());
        }
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

    /// Decodes JSON lines from the first line, `first` (what was kept of it, and what it took),
    /// on.
    fn decode_lines(
        &mut self,
        name: &Arc<str>,
        first: (Vec<u8>, Taken),
        line_no: u64,
        reader: Box<dyn BufRead + '_>,
        emit: &mut dyn FnMut(Framed),
    ) -> io::Result<()> {
        match self.chunk_lines {
            Some(lines) => self.chunk_lines_of(name, first, line_no, reader, lines, emit),
            None => self.decode_lines_here(name, first, line_no, reader, emit),
        }
    }

    /// Copies the input block-wise (not line by line) and cuts it after every `lines`-th
    /// newline, or sooner once a chunk takes `source.max_batch_bytes`; the decoding threads
    /// split the lines. A line longer than any record may be is refused here, without being
    /// held whole.
    fn chunk_lines_of(
        &mut self,
        name: &Arc<str>,
        first: (Vec<u8>, Taken),
        line_no: u64,
        mut reader: Box<dyn BufRead + '_>,
        lines: usize,
        emit: &mut dyn FnMut(Framed),
    ) -> io::Result<()> {
        let (cap, max_chunk) = (self.line_cap(), self.limits.max_batch_bytes);
        let (mut data, taken) = first;
        let mut first_line = line_no;
        if taken.bytes > data.len() {
            // Longer than a whole document, and read through already.
            self.frame_cut_short(emit, name, first_line, std::mem::take(&mut data), taken);
            first_line += 1;
        }
        // Where scanning for newlines resumes, newlines counted since the last cut, where the
        // current (unfinished) line starts.
        let (mut scanned, mut newlines, mut line_start) = (0, 0, 0);
        loop {
            let mut cut = None;
            for at in memchr::memchr_iter(b'\n', &data[scanned..]) {
                newlines += 1;
                line_start = scanned + at + 1;
                if newlines == lines || line_start >= max_chunk {
                    cut = Some(line_start);
                    break;
                }
            }
            if let Some(cut) = cut {
                // The rest goes on in a buffer as large as a chunk, one given back if any: a
                // chunk is megabytes, and a fresh one grows by copies into pages the kernel
                // zeroes first.
                let mut rest = self.pool.take(data.capacity());
                rest.extend_from_slice(&data[cut..]);
                data.truncate(cut);
                let chunk = std::mem::replace(&mut data, rest);
                self.emit_chunk(emit, name, first_line, chunk);
                first_line += newlines as u64;
                (scanned, newlines, line_start) = (0, 0, 0);
                continue;
            }
            scanned = data.len();
            if data.len() - line_start > cap {
                // The complete lines before it go on; the long line becomes a dead letter.
                let long = data.split_off(line_start);
                if !data.is_empty() {
                    self.emit_chunk(emit, name, first_line, std::mem::take(&mut data));
                    first_line += newlines as u64;
                }
                let (kept, taken) = skip_line(long, cap, &mut reader)?;
                self.frame_cut_short(emit, name, first_line, kept, taken);
                first_line += 1;
                (scanned, newlines, line_start) = (0, 0, 0);
                continue;
            }
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

    /// Decodes JSON lines here, one at a time; a line longer than any record may be is
    /// refused without being held whole.
    fn decode_lines_here(
        &mut self,
        name: &Arc<str>,
        first: (Vec<u8>, Taken),
        mut line_no: u64,
        mut reader: Box<dyn BufRead + '_>,
        emit: &mut dyn FnMut(Framed),
    ) -> io::Result<()> {
        let cap = self.line_cap();
        let (mut buf, mut taken) = first;
        let mut pending = 0u64;
        loop {
            pending += taken.bytes as u64;
            // A line cut short holds its whole record when the record fits (the rest was line
            // ending).
            if taken.record_size() > self.limits.max_record_bytes {
                self.refuse_long_line(
                    &mut |d| emit(Framed::Decoded(d)),
                    name,
                    line_no,
                    &buf,
                    taken.record_size(),
                );
            } else {
                self.line(&mut |d| emit(Framed::Decoded(d)), name, line_no, &buf);
            }
            if pending >= 1 << 20 {
                emit(Framed::Progress(pending));
                pending = 0;
            }
            buf.clear();
            taken = read_line_capped(&mut reader, &mut buf, cap, Taken::default())?;
            if taken.bytes == 0 {
                break;
            }
            line_no += 1;
        }
        emit(Framed::Progress(pending));
        Ok(())
    }

    /// The dead letter of a line whose record is `length` bytes (see [`record_size`]), of which
    /// `kept` were kept: over `source.max_record_bytes`.
    fn refuse_long_line(
        &self,
        emit: &mut dyn FnMut(Decoded),
        name: &Arc<str>,
        line: u64,
        kept: &[u8],
        length: usize,
    ) {
        let error = format!(
            "the record is {length} bytes, over the limit of {} (source.max_record_bytes)",
            self.limits.max_record_bytes
        );
        self.dead(emit, name, line, error, &String::from_utf8_lossy(trim_line(kept)));
    }

    /// A line read through past what was kept of it, `kept`: refused when its record is over
    /// the limit, else (long only for its line ending, the record all in `kept`) a chunk of its
    /// own.
    fn frame_cut_short(
        &self,
        emit: &mut dyn FnMut(Framed),
        name: &Arc<str>,
        line: u64,
        mut kept: Vec<u8>,
        taken: Taken,
    ) {
        let size = taken.record_size();
        if size > self.limits.max_record_bytes {
            emit(Framed::Progress(taken.bytes as u64));
            self.refuse_long_line(&mut |d| emit(Framed::Decoded(d)), name, line, &kept, size);
        } else {
            kept.push(b'\n');
            // The chunk counts its own bytes as progress; the rest of the line's bytes here.
            emit(Framed::Progress(taken.bytes.saturating_sub(kept.len()) as u64));
            self.emit_chunk(emit, name, line, kept);
        }
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
        // The size first, as when the line is read through without being held: a line over
        // the limit is refused for its size whatever it holds.
        let size = record_size(raw);
        if size > self.limits.max_record_bytes {
            return self.refuse_long_line(emit, name, line_no, trimmed, size);
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
        if text.len() > self.limits.max_record_bytes {
            let error = format!(
                "the record is {} bytes, over the limit of {} (source.max_record_bytes)",
                text.len(),
                self.limits.max_record_bytes
            );
            return self.dead_at(emit, position, error, text);
        }
        match self.extractor.map_with(text, &mut self.spare) {
            Ok(mut event) => {
                self.builder.push(&mut event, text, position);
                self.spare.give_back(event.extras);
                if (self.builder.len() >= self.limits.batch_size
                    || self.builder.bytes() >= self.limits.max_batch_bytes)
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
        let truncated = text.len() > self.limits.max_record_bytes;
        let mut end = text.len().min(self.limits.max_record_bytes);
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

/// What a line took of the input: its bytes, its `\n` included (0 at the end of the input),
/// the line-ending bytes (`\r`, `\n`) it ends with, and whether it is blank. Counted piece by
/// piece, so that a line read through without being held has the size of one held whole,
/// wherever the pieces were cut.
#[derive(Debug, Clone, Copy)]
struct Taken {
    bytes: usize,
    trailing: usize,
    /// Whether every byte so far is whitespace.
    blank: bool,
}

impl Default for Taken {
    fn default() -> Self {
        Self {
            bytes: 0,
            trailing: 0,
            blank: true,
        }
    }
}

impl Taken {
    /// The size of its record, as [`record_size`] counts a line held whole: 0 for a blank line.
    fn record_size(self) -> usize {
        if self.blank {
            return 0;
        }
        self.bytes - self.trailing
    }

    /// Counts `piece`, read after what was taken so far.
    fn add(&mut self, piece: &[u8]) {
        self.blank &= piece.iter().all(u8::is_ascii_whitespace);
        let ending = piece.len() - without_ending(piece).len();
        self.trailing = if ending == piece.len() {
            self.trailing + ending
        } else {
            ending
        };
        self.bytes += piece.len();
    }
}

/// Reads the rest of a line (through its `\n`) into `buf`, keeping at most `cap` bytes of it
/// in all; `taken` is what the line took before.
fn read_line_capped(
    reader: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    cap: usize,
    mut taken: Taken,
) -> io::Result<Taken> {
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(taken);
        }
        let (used, done) = match memchr::memchr(b'\n', available) {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&available[..used.min(room)]);
        taken.add(&available[..used]);
        reader.consume(used);
        if done {
            return Ok(taken);
        }
    }
}

/// The rest of a line begun with `start` (no newline in it yet), read and dropped through its
/// `\n`: its first `cap` bytes, and what it took in the input (its `\n` included).
fn skip_line(mut start: Vec<u8>, cap: usize, reader: &mut dyn BufRead) -> io::Result<(Vec<u8>, Taken)> {
    let mut taken = Taken::default();
    taken.add(&start);
    start.truncate(cap);
    let taken = read_line_capped(reader, &mut start, cap, taken)?;
    Ok((start, taken))
}

/// Where gzip input was cut, and why: a decompression bomb, or corrupt compressed data.
#[derive(Debug)]
struct Cut {
    /// The line it was cut in.
    line: u64,
    /// Why, for the dead letter.
    reason: String,
}

/// A reader of compressed bytes that counts them.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Decompresses gzip input, and ends it (recording a [`Cut`]) once it has expanded past
/// [`GZIP_RATIO_FROM`] bytes and more than `ratio` times the compressed bytes read, or where
/// the compressed data is corrupt (what was decompressed before is decoded).
struct GzipGuard<R: Read> {
    inner: MultiGzDecoder<Counted<R>>,
    compressed: Rc<Cell<u64>>,
    expanded: u64,
    newlines: u64,
    ratio: u64,
    refused: Rc<RefCell<Option<Cut>>>,
}

impl<R: Read> GzipGuard<R> {
    fn new(input: R, ratio: u64, refused: Rc<RefCell<Option<Cut>>>) -> Self {
        let compressed = Rc::new(Cell::new(0));
        Self {
            inner: MultiGzDecoder::new(Counted {
                inner: input,
                count: Rc::clone(&compressed),
            }),
            compressed,
            expanded: 0,
            newlines: 0,
            ratio,
            refused,
        }
    }

    fn cut(&self, reason: String) {
        *self.refused.borrow_mut() = Some(Cut {
            line: self.newlines + 1,
            reason,
        });
    }
}

impl<R: Read> Read for GzipGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.refused.borrow().is_some() {
            return Ok(0);
        }
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            // The data, not the device: what came before is decoded, the rest is refused.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ) =>
            {
                self.cut(format!(
                    "the gzip data is corrupt after {} decompressed bytes ({e}): the rest of the file is not read",
                    self.expanded
                ));
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        self.expanded += n as u64;
        self.newlines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        let compressed = self.compressed.get();
        if self.ratio > 0
            && self.expanded > GZIP_RATIO_FROM
            && self.expanded > compressed.saturating_mul(self.ratio)
        {
            self.cut(format!(
                "gzip input expanded {} bytes from {compressed} compressed, more than {} times \
                 (source.max_gzip_ratio): refused as a decompression bomb from here on",
                self.expanded, self.ratio
            ));
            return Ok(0);
        }
        Ok(n)
    }
}

/// `buf` without the line-ending bytes (`\r`, `\n`) it ends with.
fn without_ending(buf: &[u8]) -> &[u8] {
    let end = buf.len()
        - buf
            .iter()
            .rev()
            .take_while(|b| matches!(b, b'\n' | b'\r'))
            .count();
    &buf[..end]
}

/// The size a line's record counts against `source.max_record_bytes`: the line without its
/// line ending (whitespace before the record included, so that a line's size is known from
/// its bytes, before the record in it is found), 0 for a blank line.
fn record_size(line: &[u8]) -> usize {
    if line.iter().all(u8::is_ascii_whitespace) {
        return 0;
    }
    without_ending(line).len()
}

/// The record in a line: without the whitespace before it and the line ending after it.
fn trim_line(buf: &[u8]) -> &[u8] {
    let line = without_ending(buf);
    let start = line
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(line.len());
    &line[start..]
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
        limited(
            format,
            InputLimits {
                max_record_bytes: max,
                batch_size: 2,
                ..InputLimits::default()
            },
        )
    }

    /// A decoder of the `t`, `a`, `x` records within `limits`.
    fn limited(format: InputFormat, limits: InputLimits) -> Decoder {
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
        Decoder::new(mapping, EventSchema::new(vec![]), format, limits)
    }

    /// (actor, line) of each event and (line, error) of each dead letter.
    type Outcome = (Vec<(String, u64)>, Vec<(u64, String)>);

    fn run(format: InputFormat, text: &str) -> Outcome {
        run_with(decoder(format, 200), text)
    }

    /// Frames with a chunking decoder, decodes the chunks with another, like replay does.
    fn run_chunked(format: InputFormat, text: &str, lines: usize) -> Outcome {
        run_chunked_bytes(format, text.as_bytes(), lines)
    }

    /// [`run_chunked`] of a file's bytes (gzip or not).
    fn run_chunked_bytes(format: InputFormat, bytes: &[u8], lines: usize) -> Outcome {
        let mut framed = Vec::new();
        let mut framer = decoder(format, 200).chunking(lines);
        framer
            .frame_bytes("input", bytes, &mut |f| framed.push(f))
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

    #[test]
    fn an_evaluated_batchs_text_buffers_come_back_for_the_next_batches() {
        let pool = BatchPool::default();
        let mut d = decoder(InputFormat::JsonLines, 200).recycling(pool.clone());
        let record = |i: usize| format!(r#"{{"t": "2024-07-31T13:06:2{i}Z", "a": "actor-{i}", "x": "X"}}"#);
        let text: String = (0..6).map(|i| record(i) + "\n").collect();
        let mut batches = Vec::new();
        let mut keep = |o| {
            if let Decoded::Batch(b) = o {
                batches.push(b);
            }
        };
        d.decode_text("input", &text, &mut keep).expect("in memory");
        d.flush(&mut keep);
        assert_eq!(batches.len(), 3, "two records a batch");
        let raws: Vec<String> = batches
            .iter()
            .flat_map(|b| (0..2).map(|i| b.raw(i).to_string()))
            .collect();
        assert_eq!(raws, (0..6).map(record).collect::<Vec<_>>());
        let raw_column = batches[0].batch.num_columns() - 2;

        // A column still held elsewhere keeps its buffers; the batch's others come back.
        let held = Arc::clone(batches[0].batch.column(1));
        let first = batches.remove(0).into_text_buffers();
        let values = first.values();
        assert_eq!(values.len(), 7, "actor, action, the four optional fields, raw");
        assert_eq!(values[0], b"", "the actor column is held");
        assert_eq!(values[1], b"XX");
        assert_eq!(values[6], (record(0) + &record(1)).as_bytes());
        drop(held);

        // The buffers given back are those the next batches are built in.
        let second = batches.remove(0);
        let at = [1, 2, raw_column].map(|c| second.batch.column(c).to_data().buffers()[1].as_ptr());
        pool.give(second);
        let mut next = Vec::new();
        d.decode_text("more", &text, &mut |o| {
            if let Decoded::Batch(b) = o {
                next.push(b);
            }
        })
        .expect("in memory");
        let built_in = next
            .iter()
            .any(|b| [1, 2, raw_column].map(|c| b.batch.column(c).to_data().buffers()[1].as_ptr()) == at);
        assert!(built_in, "a later batch is built in the buffers given back");
        let raws: Vec<String> = next
            .iter()
            .flat_map(|b| (0..2).map(|i| b.raw(i).to_string()))
            .collect();
        assert_eq!(raws, (0..6).map(record).collect::<Vec<_>>());
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

    #[test]
    fn a_line_longer_than_any_record_is_refused_without_being_held_and_the_rest_decoded() {
        let long = format!(
            r#"{{"t": "2024-01-01T00:00:00Z", "a": "mallory", "x": "{}"}}"#,
            "z".repeat(3 << 20)
        );
        for text in [format!("{A}\n{long}\n{B}\n"), format!("{A}\n{B}\n{long}")] {
            let sequential = run(InputFormat::Auto, &text);
            assert_eq!(sequential.0.len(), 2, "{:?}", sequential.0);
            assert_eq!(sequential.1.len(), 1);
            let (line, error) = &sequential.1[0];
            assert_eq!(*line, if text.ends_with('\n') { 2 } else { 3 });
            assert_eq!(
                *error,
                format!(
                    "the record is {} bytes, over the limit of 200 (source.max_record_bytes)",
                    long.len()
                )
            );
            for lines in [1, 2, 100] {
                assert_eq!(
                    run_chunked(InputFormat::Auto, &text, lines),
                    sequential,
                    "chunks of {lines} lines"
                );
            }
        }
    }

    #[test]
    fn a_micro_batch_closes_at_its_byte_bound_before_its_record_count() {
        let limits = InputLimits {
            max_record_bytes: 10_000,
            batch_size: 1000,
            max_batch_bytes: 2_000,
            ..InputLimits::default()
        };
        let line = |i: usize| {
            format!(
                r#"{{"t": "2024-01-01T00:00:00Z", "a": "user-{i}", "x": "{}"}}"#,
                "p".repeat(550)
            )
        };
        let text: String = (0..10).map(|i| format!("{}\n", line(i))).collect();
        let sizes = |items: Vec<Decoded>| -> Vec<usize> {
            items
                .into_iter()
                .map(|d| match d {
                    Decoded::Batch(b) => b.batch.num_rows(),
                    Decoded::DeadLetter(l) => panic!("{}", l.error),
                })
                .collect()
        };
        let mut here = Vec::new();
        let mut d = limited(InputFormat::Auto, limits);
        d.decode_text("input", &text, &mut |o| here.push(o))
            .expect("in memory");
        d.flush(&mut |o| here.push(o));
        assert_eq!(
            sizes(here),
            [4, 4, 2],
            "each batch stops at the record crossing 2,000 bytes"
        );
        // Replay's framing cuts its chunks at the same bound.
        let mut framed = Vec::new();
        limited(InputFormat::Auto, limits)
            .chunking(1000)
            .frame_text("input", &text, &mut |f| framed.push(f))
            .expect("in memory");
        let chunks: Vec<usize> = framed
            .iter()
            .filter_map(|f| match f {
                Framed::Lines(c) => Some(c.data.iter().filter(|b| **b == b'\n').count()),
                _ => None,
            })
            .collect();
        assert_eq!(chunks, [4, 4, 2]);
    }

    #[test]
    fn a_document_over_its_limit_and_a_deeply_nested_record_are_refused_with_the_reason() {
        let limits = InputLimits {
            max_document_bytes: 1_000,
            ..InputLimits::default()
        };
        let records: Vec<&str> = (0..20).map(|i| if i % 2 == 0 { A } else { B }).collect();
        let big = format!("[{}]", records.join(",\n"));
        let (events, dead) = run_with(limited(InputFormat::Auto, limits), &big);
        assert!(events.is_empty());
        assert_eq!(dead.len(), 1);
        assert!(
            dead[0]
                .1
                .starts_with("the file is one JSON document of more than 1000 bytes"),
            "{dead:?}"
        );
        let small = format!("[{A},\n{B}]");
        assert_eq!(run_with(limited(InputFormat::Auto, limits), &small).0.len(), 2);
        // 10,000 levels of nesting: one clear dead letter, the next line decoded.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let (events, dead) = run_with(
            limited(InputFormat::JsonLines, InputLimits::default()),
            &format!("{deep}\n{B}\n"),
        );
        assert_eq!(events, [("bob".into(), 2)]);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, 1);
        assert!(dead[0].1.contains("recursion limit"), "{dead:?}");
    }

    #[test]
    fn a_gzip_bomb_is_cut_with_the_reason_and_the_next_input_is_decoded() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tmp");
        let gz = |name: &str, lines: usize, line: &str| {
            let path = dir.path().join(name);
            let mut out = flate2::write::GzEncoder::new(
                File::create(&path).expect("create"),
                flate2::Compression::best(),
            );
            for _ in 0..lines {
                out.write_all(line.as_bytes()).expect("write");
                out.write_all(b"\n").expect("write");
            }
            out.finish().expect("gzip");
            path
        };
        // 1 KiB records, 96 MiB of them: some 100 KB compressed, a ratio near 1,000.
        let record = format!(
            r#"{{"t": "2024-01-01T00:00:00Z", "a": "bomb", "x": "{}"}}"#,
            "b".repeat(970)
        );
        let bomb = gz("bomb.json.gz", 96 << 10, &record);
        let fine = gz("fine.json.gz", 1000, A);
        let limits = InputLimits {
            max_record_bytes: 4096,
            ..InputLimits::default()
        };
        let mut out = Vec::new();
        let mut d = limited(InputFormat::Auto, limits);
        for path in [&bomb, &fine] {
            d.decode_file(path, &mut |o| out.push(o)).expect("read");
        }
        d.flush(&mut |o| out.push(o));
        let (events, dead) = collect(out);
        let bombs = events.iter().filter(|(a, _)| a == "bomb").count();
        let lines = (GZIP_RATIO_FROM / 1024) as usize;
        assert!(
            (lines - 100..lines + 100).contains(&bombs),
            "cut near 64 MiB: {bombs} records"
        );
        assert_eq!(
            events.iter().filter(|(a, _)| a == "alice").count(),
            1000,
            "the next file is decoded"
        );
        let reason = &dead.last().expect("the refusal").1;
        assert!(
            reason.contains("refused as a decompression bomb") && reason.contains("more than 200 times"),
            "{reason}"
        );
        assert!(
            dead.len() <= 2,
            "at most the record cut in the middle, and the refusal: {dead:?}"
        );
    }

    /// Found by the `decode` fuzz target: a line over the size limit that was also not UTF-8
    /// was refused for its size when read line by line, for its encoding when read in chunks.
    #[test]
    fn a_long_line_that_is_not_utf8_is_refused_for_its_size_either_way() {
        let mut bytes = format!("{A}\n{{\"x\": \"{}", "z".repeat(300)).into_bytes();
        bytes.push(0xff);
        bytes.extend_from_slice(b"\"}\n");
        bytes.extend_from_slice(format!("{B}\n").as_bytes());
        let mut here = Vec::new();
        let mut d = decoder(InputFormat::Auto, 200);
        d.decode_bytes("input", &bytes, &mut |o| here.push(o))
            .expect("in memory");
        d.flush(&mut |o| here.push(o));
        let (events, dead) = collect(here);
        assert_eq!(events.len(), 2);
        assert_eq!(dead.len(), 1);
        assert!(dead[0].1.contains("over the limit of 200"), "{dead:?}");
        assert_eq!(run_chunked_bytes(InputFormat::Auto, &bytes, 10), (events, dead));
    }

    /// Found by the `decode` fuzz target: a piece of a long line that began with a space was
    /// counted as if the space ended the line, so the size in the dead letter depended on where
    /// the gzip reader's buffer happened to cut the line.
    #[test]
    fn a_line_read_in_pieces_has_its_record_size_wherever_the_pieces_are_cut() {
        for line in [
            &b"{\"a\": \"x y\", \"b\": \" \"}\n"[..],
            b"   {\"a\": 1}  \r\r\n",
            b"\t{\"a\": \"\r\"}\r",
            b" \t \r\n",
            b"{\"a\": 1}",
        ] {
            let expected = record_size(line);
            for capacity in 1..=line.len() {
                let mut reader = io::BufReader::with_capacity(capacity, line);
                let mut kept = Vec::new();
                let taken = read_line_capped(&mut reader, &mut kept, 4, Taken::default()).unwrap();
                let shown = String::from_utf8_lossy(line);
                assert_eq!(taken.bytes, line.len(), "{shown:?} in pieces of {capacity}");
                assert_eq!(taken.record_size(), expected, "{shown:?} in pieces of {capacity}");
            }
        }
    }

    /// Found by the `decode` fuzz target: a line longer than the longest line kept only for
    /// whitespace around its record was refused read line by line, for a size within the limit.
    #[test]
    fn whitespace_counts_in_a_line_s_size_and_a_long_line_ending_is_not_part_of_it() {
        let fits = format!(
            r#"{{"t": "2024-01-01T00:00:00Z", "a": "bob", "x": "{}"}}"#,
            "z".repeat(140)
        );
        let pad = " ".repeat(200 - fits.len());
        let text = format!(
            "{A}\n{pad}{fits}\n{pad} {fits}\n{fits}{}\n{}\n{A}\n",
            "\r".repeat(300),
            " ".repeat(500)
        );
        let here = run(InputFormat::JsonLines, &text);
        assert_eq!(
            here,
            (
                vec![
                    ("alice".into(), 1),
                    ("bob".into(), 2),
                    ("bob".into(), 4),
                    ("alice".into(), 6)
                ],
                vec![(
                    3,
                    "the record is 201 bytes, over the limit of 200 (source.max_record_bytes)".into()
                )]
            )
        );
        for lines in [1, 2, 5] {
            assert_eq!(
                run_chunked(InputFormat::JsonLines, &text, lines),
                here,
                "chunks of {lines}"
            );
        }
    }

    /// Found by the `decode` fuzz target: the size of a line over the limit ending in `\r\n`
    /// counted its `\r` when read line by line, not when read in chunks.
    #[test]
    fn a_long_line_ending_in_cr_lf_has_the_same_size_either_way() {
        let long = format!(
            r#"{{"t": "2024-01-01T00:00:00Z", "a": "x", "x": "{}"}}"#,
            "z".repeat(300)
        );
        for ending in ["\r\n", "\r\r\n", "\r"] {
            let text = format!("{A}\n{long}{ending}");
            let here = run(InputFormat::Auto, &text);
            assert_eq!(
                here.1,
                [(
                    2,
                    format!(
                        "the record is {} bytes, over the limit of 200 (source.max_record_bytes)",
                        long.len()
                    )
                )],
                "{ending:?}"
            );
            assert_eq!(run_chunked(InputFormat::Auto, &text, 5), here, "{ending:?}");
        }
    }

    /// Found by the `decode` fuzz target: a gzip stream whose data or checksum is corrupt made
    /// the whole replay fail. Now what decompressed before is decoded, one dead letter says
    /// why the rest is not, and the next input is read.
    #[test]
    fn corrupt_gzip_data_is_a_dead_letter_and_the_next_input_is_decoded() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for _ in 0..3 {
            writeln!(gz, "{A}").expect("write");
        }
        let mut bytes = gz.finish().expect("gzip");
        // The CRC-32 in the trailer: the data decompresses, the check fails at the end.
        let crc = bytes.len() - 8;
        bytes[crc] ^= 0xff;
        let mut broken = bytes.clone();
        // And a stream cut in the middle.
        broken.truncate(bytes.len() / 2);
        for (input, events_before) in [(&bytes, 3), (&broken, 0)] {
            let mut out = Vec::new();
            let mut d = decoder(InputFormat::Auto, 200);
            d.decode_bytes("bad.json.gz", input, &mut |o| out.push(o))
                .expect("no error: a dead letter");
            d.decode_text("next", B, &mut |o| out.push(o)).expect("in memory");
            d.flush(&mut |o| out.push(o));
            let (events, dead) = collect(out);
            assert_eq!(
                events.iter().filter(|(a, _)| a == "alice").count(),
                events_before,
                "{events:?}"
            );
            assert_eq!(
                events.iter().filter(|(a, _)| a == "bob").count(),
                1,
                "the next input"
            );
            assert!(
                dead.iter()
                    .any(|(_, e)| e.starts_with("the gzip data is corrupt")),
                "{dead:?}"
            );
        }
    }
}
