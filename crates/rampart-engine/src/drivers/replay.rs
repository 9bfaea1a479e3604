//! Replay: files through a pipeline as fast as the machine allows. Decoding runs on its own
//! thread, feeding micro-batches to the detectors on the calling thread.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use rampart_core::{Decision, Mode, Verdict};

use crate::input::decode::{BatchPool, DeadLetter, DeadLetterKind, Decoded, Framed};
use crate::pipeline::{DetectorFailure, Output, Pipeline};
use rampart_state::StateError;

/// Where replay output goes.
pub trait ReplaySink {
    /// One decision.
    fn decision(&mut self, decision: &Decision) -> io::Result<()>;
    /// One dead letter.
    fn dead_letter(&mut self, letter: &DeadLetter) -> io::Result<()>;
    /// Input bytes consumed since the last call.
    fn progress(&mut self, _bytes: u64) {}
}

/// Errors that stop a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// An input file could not be read.
    #[error("cannot read {path}: {source}")]
    Input {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: io::Error,
    },
    /// Writing decisions or dead letters failed.
    #[error("cannot write output: {0}")]
    Output(#[source] io::Error),
    /// The window state could not be written.
    #[error(transparent)]
    State(#[from] StateError),
}

/// What a replay saw and did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Events decoded and evaluated.
    pub events: u64,
    /// Records sent to the dead letters as malformed.
    pub bad_records: u64,
    /// Events older than the allowed lateness (dead letters marked `late`).
    pub late_records: u64,
    /// Events and dead letters skipped because a persistent state had already consumed them.
    pub resumed_after: u64,
    /// Decisions per (detector, verdict, mode).
    pub decisions: BTreeMap<(String, Verdict, Mode), u64>,
    /// Detector run-time failures per detector.
    pub detector_errors: BTreeMap<String, u64>,
    /// Repeat decisions suppressed, per detector.
    pub suppressed: BTreeMap<String, u64>,
    /// Detectors the blast-radius fail-safe put in shadow: (detector, event time, reason).
    pub fail_safe: Vec<(String, String, String)>,
    /// Events per actor (for the busiest actors; exact up to [`HeavyHitters::CAPACITY`] actors).
    pub actor_events: HeavyHitters,
    /// Decisions per actor (likewise).
    pub actor_decisions: HeavyHitters,
    /// Decisions per hour of event time (`YYYY-MM-DDTHH`).
    pub timeline: BTreeMap<String, u64>,
    /// Earliest and latest event time seen, in microseconds since the epoch.
    pub time_range: Option<(i64, i64)>,
    /// Input bytes read.
    pub bytes: u64,
    /// Wall-clock duration.
    pub elapsed: Duration,
}

impl Summary {
    /// Total decisions.
    pub fn total_decisions(&self) -> u64 {
        self.decisions.values().sum()
    }

    /// Events per second of wall-clock time.
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `n` actors with most decisions, then most events, most first (ties by name).
    pub fn busiest_actors(&self, n: usize) -> Vec<(&str, u64, u64)> {
        let mut actors: Vec<&str> = self
            .actor_events
            .counts
            .keys()
            .chain(self.actor_decisions.counts.keys())
            .map(String::as_str)
            .collect();
        actors.sort_unstable();
        actors.dedup();
        let mut v: Vec<_> = actors
            .into_iter()
            .map(|a| (a, self.actor_events.get(a), self.actor_decisions.get(a)))
            .collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }
}

/// Counts per key in bounded memory (Misra-Gries): exact while at most [`Self::CAPACITY`] keys
/// are seen; beyond that, every key with more than 1/CAPACITY of the total is kept, its count
/// short by at most total/CAPACITY. A replay over millions of actors keeps its summary small.
#[derive(Debug, Default, Clone)]
pub struct HeavyHitters {
    counts: HashMap<String, u64>,
}

impl HeavyHitters {
    /// Keys tracked at most.
    pub const CAPACITY: usize = 4096;

    /// Counts one occurrence of `key`.
    pub fn add(&mut self, key: &str) {
        if let Some(n) = self.counts.get_mut(key) {
            *n += 1;
            return;
        }
        if self.counts.len() < Self::CAPACITY {
            self.counts.insert(key.to_string(), 1);
            return;
        }
        // Full: this key and every tracked one lose one occurrence.
        self.counts.retain(|_, n| {
            *n -= 1;
            *n > 0
        });
    }

    /// The count of `key` (0 if not tracked).
    pub fn get(&self, key: &str) -> u64 {
        self.counts.get(key).copied().unwrap_or(0)
    }
}

/// Expands directories to the files inside them (sorted, not recursive) and checks that every
/// input exists before anything runs. `-` (standard input) is kept as it is.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, ReplayError> {
    let mut files = Vec::new();
    for input in inputs {
        if input.as_os_str() == crate::input::decode::STDIN {
            files.push(input.clone());
            continue;
        }
        let meta = std::fs::metadata(input).map_err(|source| ReplayError::Input {
            path: input.clone(),
            source,
        })?;
        if meta.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|source| ReplayError::Input {
                    path: input.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

/// Threads that decode JSON lines in parallel (framing and detectors have a thread each).
const DECODE_THREADS: usize = 2;

/// Replays `inputs` (files or directories) through `pipeline`.
///
/// One thread reads and frames the inputs, [`DECODE_THREADS`] threads decode chunks of JSON
/// lines into batches, and the calling thread puts the results back in input order (renumbering
/// rows) and runs the detectors. Output is the same as a sequential run.
pub fn replay(
    pipeline: &Pipeline,
    inputs: &[PathBuf],
    sink: &mut dyn ReplaySink,
) -> Result<Summary, ReplayError> {
    replay_with(pipeline, inputs, sink, !pipeline.is_persistent())
}

/// [`replay`], saying whether the input ends here (`end_of_input`: window rows still waiting
/// for the watermark are decided at the end) or continues in a later run with the same
/// persistent state (they stay waiting, in the state).
pub fn replay_with(
    pipeline: &Pipeline,
    inputs: &[PathBuf],
    sink: &mut dyn ReplaySink,
    end_of_input: bool,
) -> Result<Summary, ReplayError> {
    let files = expand_inputs(inputs)?;
    let started = Instant::now();
    let mut summary = Summary::default();
    // A chunk per decoding thread in each channel: when the detectors are the bottleneck,
    // deeper queues only hold more decoded batches in memory.
    let (work_tx, work_rx) = mpsc::sync_channel::<(u64, Framed)>(DECODE_THREADS);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::sync_channel::<(u64, Read)>(DECODE_THREADS);

    let mut framing = pipeline.decoder().chunking(pipeline.config.input.batch_size);
    let pool = framing.chunk_pool();
    let batch_pool = BatchPool::default();
    std::thread::scope(|scope| {
        let framer = named(
            scope,
            "rampart-frame".into(),
            move || -> Result<(), ReplayError> {
                let decoder = &mut framing;
                let mut seq = 0;
                let mut send = |d: Framed| {
                    // Receivers only hang up when output failed; that error is reported there.
                    let _ = work_tx.send((seq, d));
                    seq += 1;
                };
                for file in &files {
                    decoder
                        .frame_file(file, &mut send)
                        .map_err(|source| ReplayError::Input {
                            path: file.clone(),
                            source,
                        })?;
                }
                decoder.flush(&mut |d| send(Framed::Decoded(d)));
                Ok(())
            },
        );
        for i in 0..DECODE_THREADS {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            let pool = pool.clone();
            let batch_pool = batch_pool.clone();
            named(scope, format!("rampart-decode-{i}"), move || {
                let mut decoder = pipeline.decoder().recycling(batch_pool);
                loop {
                    let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((seq, item)) = next else { break };
                    let out = match item {
                        Framed::Lines(chunk) => {
                            let mut decoded = Vec::new();
                            decoder.decode_chunk(&chunk, &mut |d| decoded.push(d));
                            pool.give(chunk.data);
                            Read::Decoded(decoded)
                        }
                        Framed::Decoded(d) => Read::Decoded(vec![d]),
                        Framed::Progress(bytes) => Read::Progress(bytes),
                    };
                    // After a failed output keep draining, so that the framer never blocks.
                    let _ = done_tx.send((seq, out));
                }
            });
        }
        drop(done_tx);
        let consumed = consume_in_order(pipeline, &done_rx, sink, &mut summary, end_of_input, &batch_pool);
        drop(done_rx);
        let framed = framer.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        consumed.and(framed)
    })?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Spawns a named scoped thread (names show in `top -H` and profiles).
fn named<'scope, 'env, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    name: String,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, f)
        .expect("the OS can start a thread")
}

/// What one framed item became once decoded: records, or input bytes read.
enum Read {
    Decoded(Vec<Decoded>),
    Progress(u64),
}

/// Takes decoded chunks as the decoding threads finish them and processes them in input order.
/// With a persistent state, what it had consumed is skipped ([`Pipeline::admit`]), checkpoints
/// are written as the replay goes and at the end, and (unless `end_of_input`) rows waiting for
/// the watermark stay waiting for the next run.
fn consume_in_order(
    pipeline: &Pipeline,
    rx: &mpsc::Receiver<(u64, Read)>,
    sink: &mut dyn ReplaySink,
    summary: &mut Summary,
    end_of_input: bool,
    batch_pool: &BatchPool,
) -> Result<(), ReplayError> {
    let mut pending: BTreeMap<u64, Read> = BTreeMap::new();
    let mut next_seq = 0;
    let mut out = Recorder { sink, summary };
    for (seq, read) in rx {
        pending.insert(seq, read);
        while let Some(read) = pending.remove(&next_seq) {
            next_seq += 1;
            match read {
                Read::Progress(bytes) => {
                    out.summary.bytes += bytes;
                    out.sink.progress(bytes);
                }
                Read::Decoded(items) => {
                    for item in items {
                        consume(pipeline, item, &mut out, batch_pool)?;
                    }
                }
            }
        }
    }
    if !pipeline.is_persistent() {
        return pipeline.finish().emit(&mut out);
    }
    if end_of_input {
        pipeline.decide_waiting().emit(&mut out)?;
    }
    pipeline.checkpoint().map_err(ReplayError::State)
}

/// Admits and evaluates one decoded item; a batch's text buffers go back to `batch_pool` for
/// the decoding threads to build the next batches in.
fn consume(
    pipeline: &Pipeline,
    item: Decoded,
    out: &mut Recorder<'_>,
    batch_pool: &BatchPool,
) -> Result<(), ReplayError> {
    match item {
        Decoded::DeadLetter(letter) => {
            if !pipeline.admit_dead_letter(&letter) {
                out.summary.resumed_after += 1;
                return Ok(());
            }
            out.summary.bad_records += 1;
            out.sink.dead_letter(&letter).map_err(ReplayError::Output)?;
        }
        Decoded::Batch(events) => {
            let decoded = events.batch.num_rows();
            let Some(events) = pipeline.admit(events) else {
                out.summary.resumed_after += decoded as u64;
                return Ok(());
            };
            let summary = &mut *out.summary;
            let n = events.batch.num_rows();
            summary.resumed_after += (decoded - n) as u64;
            summary.events += n as u64;
            for i in 0..n {
                let t = events.event_time(i);
                summary.time_range = Some(match summary.time_range {
                    None => (t, t),
                    Some((lo, hi)) => (lo.min(t), hi.max(t)),
                });
                summary.actor_events.add(events.actor(i));
            }
            pipeline.evaluate(&events).emit(out)?;
            batch_pool.give(events);
            if pipeline.wants_checkpoint() {
                pipeline.checkpoint_behind().map_err(ReplayError::State)?;
            }
        }
    }
    Ok(())
}

/// Replay's output: counts what goes by in the summary and writes it to the sink.
struct Recorder<'a> {
    sink: &'a mut dyn ReplaySink,
    summary: &'a mut Summary,
}

impl Output for Recorder<'_> {
    type Error = ReplayError;

    fn decision(&mut self, d: &Decision) -> Result<(), ReplayError> {
        let summary = &mut *self.summary;
        *summary
            .decisions
            .entry((d.detector.id.clone(), d.verdict, d.mode))
            .or_default() += 1;
        summary.actor_decisions.add(&d.actor);
        *summary
            .timeline
            .entry(d.event_time.get(..13).unwrap_or_default().to_string())
            .or_default() += 1;
        self.sink.decision(d).map_err(ReplayError::Output)
    }

    fn dead_letter(&mut self, letter: &DeadLetter) -> Result<(), ReplayError> {
        // (Malformed records are counted where they are admitted.)
        if letter.kind == DeadLetterKind::Late {
            self.summary.late_records += 1;
        }
        self.sink.dead_letter(letter).map_err(ReplayError::Output)
    }

    fn detector_failed(&mut self, failure: &DetectorFailure) -> Result<(), ReplayError> {
        let n = self
            .summary
            .detector_errors
            .entry(failure.detector.clone())
            .or_default();
        if *n == 0 {
            failure.log();
        }
        *n += 1;
        Ok(())
    }

    fn fail_safe_tripped(&mut self, alert: &Decision) {
        self.summary.fail_safe.push((
            alert.detector.id.clone(),
            alert.event_time.clone(),
            alert.reason.clone(),
        ));
    }

    fn suppressed(&mut self, detector: &str, repeats: u64) {
        *self.summary.suppressed.entry(detector.to_string()).or_default() += repeats;
    }
}

/// Convenience for tests and tools: replay and collect everything in memory.
#[derive(Debug, Default)]
pub struct Collect {
    /// Decisions, in output order.
    pub decisions: Vec<Decision>,
    /// Dead letters, in input order.
    pub dead_letters: Vec<DeadLetter>,
}

impl ReplaySink for Collect {
    fn decision(&mut self, decision: &Decision) -> io::Result<()> {
        self.decisions.push(decision.clone());
        Ok(())
    }

    fn dead_letter(&mut self, letter: &DeadLetter) -> io::Result<()> {
        self.dead_letters.push(letter.clone());
        Ok(())
    }
}

/// Replays `inputs` and collects the output.
pub fn replay_collect(pipeline: &Pipeline, inputs: &[&Path]) -> Result<(Collect, Summary), ReplayError> {
    let mut out = Collect::default();
    let inputs: Vec<PathBuf> = inputs.iter().map(|p| p.to_path_buf()).collect();
    let summary = replay(pipeline, &inputs, &mut out)?;
    Ok((out, summary))
}

#[cfg(test)]
mod tests {
    use super::HeavyHitters;

    #[test]
    fn heavy_hitters_are_exact_up_to_capacity_and_keep_the_busiest_beyond() {
        let mut h = HeavyHitters::default();
        for i in 0..HeavyHitters::CAPACITY {
            h.add(&format!("actor-{i}"));
        }
        h.add("actor-7");
        assert_eq!(h.get("actor-7"), 2);
        assert_eq!(h.get("actor-8"), 1);
        // A million one-off actors and one busy one (a tenth of the events).
        let mut h = HeavyHitters::default();
        for i in 0..1_000_000u32 {
            h.add(&format!("one-off-{i}"));
            if i % 9 == 0 {
                h.add("busy");
            }
        }
        let busy = h.get("busy");
        let total = 1_000_000 + 1_000_000 / 9 + 1;
        assert!(
            busy <= 111_112 && busy + total / HeavyHitters::CAPACITY as u64 >= 111_112,
            "{busy}"
        );
        assert!(h.counts.len() <= HeavyHitters::CAPACITY);
    }
}
