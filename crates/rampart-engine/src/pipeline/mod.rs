//! A loaded pipeline: its validated config, its event schema, and the detectors that passed the
//! sandbox and planning. Detectors that were refused are kept as problems; the rest run.

mod checkpoint;
pub mod config;
mod event_time;
pub mod intake;
pub mod output;
pub mod tables;
mod windowed;

pub use checkpoint::StateStats;
pub use event_time::EventTime;
pub use intake::{Input, Progress, SourceProgress};
pub use output::{DetectorFailure, Evaluation, Output};

use crate::decide::{DecisionMaker, Pending};
use crate::guardrails::guard::{Guard, Trip};
use crate::input::decode::{DeadLetter, Decoder, EventBatch};
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::intake::Intake;
use crate::pipeline::tables::{ReferenceTable, TableSource};
use event_time::{ClockChange, now_micros};
use rampart_core::{Decision, EventSchema, Idleness, Problem};
use rampart_sql::{CompiledDetector, DetectorEngine, Shape};
use rampart_state::StateError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
pub use windowed::Route;
use windowed::Windows;

/// Errors that stop a pipeline from loading at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `pipeline.toml` is missing or invalid.
    #[error("{}", problems_text(.0))]
    Config(Vec<Problem>),
    /// The SQL engine could not start.
    #[error(transparent)]
    Engine(#[from] rampart_sql::Error),
    /// The window state could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
}

fn problems_text(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where a pipeline keeps its window state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StateChoice {
    /// A temporary RocksDB directory, deleted afterwards; the input is complete (replays, tests).
    #[default]
    Temporary,
    /// This directory: the state and input progress survive, and a later run resumes.
    Persistent(PathBuf),
}

/// Which window evaluator runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Evaluator {
    /// Keyed state in RocksDB, each row decided over its key's frame ([`crate::windows::keyed`]).
    #[default]
    Keyed,
    /// Re-runs every window over all kept rows each batch ([`crate::windows::naive`]; benchmarks).
    Naive,
}

/// A pipeline ready to decode and evaluate events.
pub struct Pipeline {
    /// The pipeline directory.
    pub dir: PathBuf,
    /// Its validated configuration.
    pub config: PipelineConfig,
    /// The `events` table schema.
    pub schema: EventSchema,
    /// Detectors that loaded: per-event ones, then windowed ones, each in file-name order.
    pub detectors: Vec<CompiledDetector>,
    /// Detectors that were refused, with file, line and reason.
    pub problems: Vec<Problem>,
    engine: DetectorEngine,
    decisions: DecisionMaker,
    /// How many of `detectors` are per-event (the rest are windowed).
    per_event: usize,
    state_choice: StateChoice,
    evaluator: Evaluator,
    windows: Mutex<Windows>,
    /// Row numbering and input progress (a lock of its own: a checkpoint holds the windows').
    intake: Mutex<Intake>,
    guard: Mutex<Guard>,
    /// Whether decisions pass through the guard (see [`Self::set_guarded`]).
    guarded: std::sync::atomic::AtomicBool,
    /// Reference tables detectors may join.
    tables: Mutex<Vec<ReferenceTable>>,
    /// A live service's processing-time rules for event time ([`Self::set_live`]).
    live: Mutex<Option<Idleness>>,
    /// Changes to the clock from the service (assignment, paused and lagging partitions),
    /// applied by the next evaluation: the service never waits for the window state's lock
    /// (a checkpoint holds it) to tell them.
    clock_inbox: Mutex<Vec<ClockChange>>,
    /// Where event time stood after the last evaluation.
    event_time: Mutex<Option<EventTime>>,
    /// The part of the pipeline loaded ([`Self::load_part`]).
    part: Option<Route>,
}

impl Pipeline {
    /// Loads `dir/pipeline.toml` and every `dir/detectors/*.sql`, with throwaway window state.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        Self::load_with(dir, StateChoice::Temporary, Evaluator::Keyed)
    }

    /// Loads a pipeline with the given window state and evaluator.
    pub fn load_with(dir: &Path, state_choice: StateChoice, evaluator: Evaluator) -> Result<Self, LoadError> {
        Self::load_part(dir, state_choice, evaluator, None)
    }

    /// Loads the part of a pipeline that one scale-out state partition of `route` runs (all
    /// of it for `None`): the windowed detectors of that route, and the per-event ones with
    /// the actor's.
    pub fn load_part(
        dir: &Path,
        state_choice: StateChoice,
        evaluator: Evaluator,
        part: Option<Route>,
    ) -> Result<Self, LoadError> {
        let config_path = dir.join("pipeline.toml");
        if !config_path.is_file() {
            return Err(LoadError::Config(vec![Problem::in_file(
                &config_path,
                "no pipeline.toml here: a pipeline is a directory with pipeline.toml and detectors/*.sql",
            )]));
        }
        let config = PipelineConfig::load(&config_path).map_err(LoadError::Config)?;
        let schema = config.event_schema();
        let engine = DetectorEngine::new(&schema, config.detector_limits.memory_bytes)?;
        let mut detectors: Vec<CompiledDetector> = Vec::new();
        let mut problems = Vec::new();
        let tables = crate::pipeline::tables::register(&engine, dir, &config, &mut problems);
        for path in detector_files(&dir.join("detectors"), &mut problems) {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(Problem::in_file(&path, format!("cannot read: {e}")));
                    continue;
                }
            };
            match engine.compile(&path, &text) {
                Ok(d) if evaluator == Evaluator::Naive && matches!(d.shape, Shape::GroupedWindow { .. }) => {
                    problems.push(Problem::at(
                        &path,
                        1,
                        "the naive evaluator (a benchmark baseline) runs sliding windows only",
                    ));
                }
                Ok(d) => match detectors.iter().find(|o| o.meta.id == d.meta.id) {
                    Some(other) => problems.push(Problem::at(
                        &path,
                        1,
                        format!(
                            "detector id `{}` is already used by {}",
                            d.meta.id,
                            other.path.display()
                        ),
                    )),
                    None => detectors.push(d),
                },
                Err(ps) => problems.extend(ps),
            }
        }
        let decisions = DecisionMaker::new(config.name.clone(), config.default_block_for);
        // Stable: per-event detectors first, each group in file-name order.
        detectors.sort_by_key(|d| d.shape != Shape::PerEvent);
        if let Some(route) = &part {
            detectors.retain(|d| match d.windowed() {
                Some(w) => windowed::route_of(w, &schema) == *route,
                None => route.is_actor(),
            });
        }
        let per_event = detectors.iter().filter(|d| d.shape == Shape::PerEvent).count();
        let guard = Guard::new(&config.name, &detectors, config.dedup_for, config.blast_radius);
        let mut pipeline = Self {
            dir: dir.to_path_buf(),
            config,
            schema,
            detectors,
            problems,
            engine,
            decisions,
            per_event,
            state_choice,
            evaluator,
            windows: Mutex::new(Windows::empty(0)),
            intake: Mutex::new(Intake::default()),
            guard: Mutex::new(guard),
            guarded: std::sync::atomic::AtomicBool::new(true),
            tables: Mutex::new(tables),
            live: Mutex::new(None),
            clock_inbox: Mutex::new(Vec::new()),
            event_time: Mutex::new(None),
            part,
        };
        let (windows, input) = pipeline.open_windows()?;
        *pipeline.windows.get_mut().unwrap_or_else(|p| p.into_inner()) = windows;
        *pipeline.intake.get_mut().unwrap_or_else(|p| p.into_inner()) = Intake::resuming(input);
        Ok(pipeline)
    }

    /// The part of the pipeline this is (`None`: all of it), see [`Self::load_part`].
    pub fn part(&self) -> Option<&Route> {
        self.part.as_ref()
    }

    /// A decoder for this pipeline's inputs.
    pub fn decoder(&self) -> Decoder {
        Decoder::new(
            self.config.mapping.clone(),
            self.schema.clone(),
            self.config.format,
            self.config.input,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, Guard> {
        self.guard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An operator's revocation of `actor`'s blocks and holds from `detector` (all detectors
    /// when `None`), at processing time: the repeat suppression for the actor is cleared, and
    /// the returned revoke decision is for the caller to publish.
    pub fn revoke(&self, actor: &str, detector: Option<&str>, reason: &str) -> Decision {
        let now = now_micros();
        self.guard().revoke(actor, detector, reason, now)
    }

    /// Scale-out: this pipeline holds state partition `index` (named `me`) of a group of
    /// `partitions`; its guard speaks for `speaks_for`'s fail-safe alerts (see
    /// [`crate::guardrails::guard::Guard::join_group`]).
    pub fn join_guard_group(&self, speaks_for: Vec<String>, me: &str, index: usize, partitions: usize) {
        self.guard().join_group(speaks_for, me, index, partitions);
    }

    /// Scale-out: what the guard has to tell the group's other state partitions.
    pub fn take_guard_notes(&self) -> Vec<crate::guardrails::guard::GuardNote> {
        self.guard().take_notes()
    }

    /// Scale-out: what another state partition's guard told; returns decisions to publish (a
    /// trip there: revocations here, and the alert if this one speaks for the detector).
    pub fn guard_note(&self, from: &str, note: crate::guardrails::guard::GuardNote) -> Vec<Decision> {
        if !self.is_guarded() {
            return Vec::new();
        }
        self.guard().note(from, note)
    }

    /// The longest a block or review hold of this pipeline lasts (a detector's `block_for`, or
    /// `[decisions] default_block_for`).
    pub fn longest_block_for(&self) -> std::time::Duration {
        self.detectors
            .iter()
            .filter_map(|d| d.meta.block_for)
            .chain([self.config.default_block_for])
            .max()
            .unwrap_or_default()
    }

    /// What the audit log tracks as rules, name → version: every loaded detector (by id), and
    /// `pipeline.toml`.
    pub fn rule_versions(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = self
            .detectors
            .iter()
            .map(|d| (d.meta.id.clone(), d.version.clone()))
            .collect();
        if let Ok(bytes) = std::fs::read(self.dir.join("pipeline.toml")) {
            out.insert(
                "pipeline.toml".into(),
                rampart_core::decision::content_version(&bytes),
            );
        }
        for t in self.tables() {
            if let TableSource::File(path) = &t.source
                && let Ok(bytes) = std::fs::read(path)
            {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                out.insert(
                    format!("tables/{name}"),
                    rampart_core::decision::content_version(&bytes),
                );
            }
        }
        out
    }

    /// The reference tables, as of now.
    pub fn tables(&self) -> Vec<ReferenceTable> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the rows of topic table `name` (JSON objects); call between two batches.
    pub fn set_table_rows<'a>(
        &self,
        name: &str,
        rows: impl Iterator<Item = &'a serde_json::Map<String, serde_json::Value>>,
    ) {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tables.iter_mut().find(|t| t.name == name) {
            t.set_rows(rows);
        }
    }

    /// Whether decisions pass through the guard ([`crate::guardrails::guard`]: repeat suppression and the
    /// blast-radius fail-safe), as they do by default. Off, every detector match becomes a
    /// decision: detector tests and the equivalence harness judge the detectors themselves.
    pub fn set_guarded(&self, guarded: bool) {
        self.guarded.store(guarded, std::sync::atomic::Ordering::Relaxed);
    }

    /// Re-arms a detector the blast-radius fail-safe put in shadow; `None` if it was not.
    pub fn rearm(&self, detector: &str) -> Option<Trip> {
        self.guard().rearm(detector)
    }

    /// Detectors the blast-radius fail-safe put in shadow, with why.
    pub fn tripped(&self) -> Vec<(String, Trip)> {
        self.guard().tripped()
    }

    /// Suppressed repeat decisions per detector since load.
    pub fn suppressed(&self) -> BTreeMap<String, u64> {
        self.guard().suppressed().clone()
    }

    /// The guard's state (suppression, fail-safe) as of now, for a later
    /// [`Self::checkpoint_with`]: take it when the decisions it reflects are the ones whose
    /// delivery the checkpoint waits for.
    pub fn guard_snapshot(&self) -> Vec<u8> {
        self.guard().snapshot()
    }

    fn intake(&self) -> std::sync::MutexGuard<'_, Intake> {
        self.intake.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Input taken so far, per source (restored from the last checkpoint of a persistent
    /// state).
    pub fn progress(&self) -> Progress {
        self.intake().input().progress.clone()
    }

    /// Takes a decoded batch into the pipeline: drops the events an earlier run with this
    /// state already took (a file replayed again; a Kafka record below its partition's next
    /// offset), gives the rest their row ids and counts them in the input progress. `None`
    /// when nothing is left. Evaluate what it returns, batches in the order they were admitted.
    pub fn admit(&self, batch: EventBatch) -> Option<EventBatch> {
        self.intake().admit(batch)
    }

    /// Takes a malformed record's dead letter into the input progress: `false` when an
    /// earlier run with this state already sent it (then it must not be sent again).
    pub fn admit_dead_letter(&self, letter: &DeadLetter) -> bool {
        self.intake().admit_dead_letter(letter)
    }

    /// The batch loop's step: admits `batch`, runs every detector on it and hands the results
    /// to `out`.
    pub fn ingest<O: Output + ?Sized>(&self, batch: EventBatch, out: &mut O) -> Result<(), O::Error> {
        match self.admit(batch) {
            Some(batch) => self.evaluate(&batch).emit(out),
            None => Ok(()),
        }
    }

    /// Whether input was taken since the last checkpoint began.
    pub fn has_new_input(&self) -> bool {
        self.intake().changed()
    }

    /// The input as of now, for a checkpoint that begins now ([`Self::checkpoint_with`]): the
    /// window state must hold every batch admitted so far when it is written.
    pub fn input_for_checkpoint(&self) -> Input {
        self.intake().for_checkpoint()
    }

    /// Where the window state lives.
    pub fn state_choice(&self) -> &StateChoice {
        &self.state_choice
    }

    /// Closes the window state store (after a checkpoint), so that another pipeline can open
    /// it; [`Self::reset`] reopens it.
    pub fn close_state(&self) {
        self.lock().store = None;
    }

    /// Whether the state persists across runs (and so should be checkpointed, not finished).
    pub fn is_persistent(&self) -> bool {
        matches!(self.state_choice, StateChoice::Persistent(_))
    }

    /// Runs every detector on one batch. Decisions come in input order (for one event, in
    /// detector order); sliding-window detectors may decide about events of earlier batches.
    pub fn evaluate(&self, events: &EventBatch) -> Evaluation {
        self.evaluation(|processed_at, out| {
            let mut decided = self.per_event_decisions(events, processed_at, out);
            decided.extend(self.windowed_decisions(events, processed_at, out));
            decided
        })
    }

    /// The per-event detectors alone on one batch (they need no window state, so service mode
    /// publishes their decisions before the windows run). Call [`Self::evaluate_windowed`]
    /// with the same batch afterwards, batches in input order.
    pub fn evaluate_per_event(&self, events: &EventBatch) -> Evaluation {
        self.evaluation(|processed_at, out| self.per_event_decisions(events, processed_at, out))
    }

    /// The windowed detectors on one batch (after [`Self::evaluate_per_event`]): window state,
    /// late events, rows decided by the watermark.
    pub fn evaluate_windowed(&self, events: &EventBatch) -> Evaluation {
        self.evaluation(|processed_at, out| self.windowed_decisions(events, processed_at, out))
    }

    /// An evaluation whose decisions `decide` makes (given the processing time), in input order.
    fn evaluation<'s>(
        &'s self,
        decide: impl FnOnce(&str, &mut Evaluation) -> Vec<(u64, Pending<'s>)>,
    ) -> Evaluation {
        let processed_at = rampart_core::time::now();
        let mut out = Evaluation::default();
        let decided = decide(&processed_at, &mut out);
        self.conclude(decided, &processed_at, &mut out);
        out
    }

    /// Ends an evaluation: its decisions in input order through the guard, then the alerts of
    /// detectors disabled for their time on it.
    pub(super) fn conclude(
        &self,
        decided: Vec<(u64, Pending<'_>)>,
        processed_at: &str,
        out: &mut Evaluation,
    ) {
        let make = |p: Pending<'_>| p.decision(&self.decisions, processed_at);
        if !self.is_guarded() {
            out.decisions = in_input_order(decided).into_iter().map(make).collect();
            return;
        }
        let mut guard = self.guard();
        out.decisions = guard.apply_pending(in_input_order(decided), make, &mut out.suppressed);
        let limit = self.config.detector_limits.max_batch_time;
        for slow in std::mem::take(&mut out.slow) {
            let Some(detector) = self.detectors.iter().find(|d| d.meta.id == slow.detector) else {
                continue;
            };
            out.decisions
                .extend(guard.disable(detector, slow.took, limit, slow.at, processed_at));
        }
    }

    /// Whether decisions pass through the guard (and slow detectors are disabled).
    fn is_guarded(&self) -> bool {
        self.guarded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `detector` is disabled for its time (only when guarded).
    pub(super) fn is_disabled(&self, detector: &str) -> bool {
        self.is_guarded() && self.guard().is_disabled(detector)
    }

    /// Notes `detector` as slow on this batch if `took` is over its time budget (only when
    /// guarded: detector tests and the equivalence harness judge the detectors themselves).
    /// `at` gives the batch's newest event time, asked for only then.
    pub(super) fn time_check(
        &self,
        detector: &str,
        took: std::time::Duration,
        at: impl FnOnce() -> i64,
        out: &mut Evaluation,
    ) {
        if self.is_guarded() && took > self.config.detector_limits.max_batch_time {
            out.slow.push(output::Slow {
                detector: detector.to_string(),
                took,
                at: at(),
            });
        }
    }

    fn per_event_decisions(
        &self,
        events: &EventBatch,
        processed_at: &str,
        out: &mut Evaluation,
    ) -> Vec<(u64, Pending<'static>)> {
        self.guard().observe(events);
        let per_event: Vec<&CompiledDetector> = self.detectors[..self.per_event]
            .iter()
            .filter(|d| !self.is_disabled(&d.meta.id))
            .collect();
        let results = self.engine.run(&per_event, events.batch.clone());
        let newest = || {
            (0..events.batch.num_rows())
                .map(|i| events.event_time(i))
                .max()
                .unwrap_or(i64::MIN)
        };
        let mut decided = Vec::new();
        for (detector, (result, took)) in per_event.iter().zip(results) {
            self.time_check(&detector.meta.id, took, newest, out);
            match result {
                Ok(batches) => {
                    for b in &batches {
                        decided.extend(
                            self.decisions
                                .decide(detector, b, events, processed_at)
                                .into_iter()
                                .map(|(row, d)| (row, Pending::Made(Box::new(d)))),
                        );
                    }
                }
                Err(e) => out.failed(&detector.meta.id, e),
            }
        }
        decided
    }

    /// The SQL engine (tests run whole plans as the batch oracle).
    #[cfg(test)]
    pub(crate) fn engine(&self) -> &DetectorEngine {
        &self.engine
    }

    /// The decision maker (tests).
    #[cfg(test)]
    pub(crate) fn decision_maker(&self) -> &DecisionMaker {
        &self.decisions
    }

    /// How many detector plans were built since load (one per loaded detector: plans are never
    /// rebuilt per batch).
    pub fn plans_built(&self) -> usize {
        self.engine.plans_built()
    }
}

/// Decisions sorted by the row id of their triggering event; for one event, detector order
/// (the sort is stable).
fn in_input_order<T>(mut decided: Vec<(u64, T)>) -> Vec<T> {
    decided.sort_by_key(|(row, _)| *row);
    decided.into_iter().map(|(_, d)| d).collect()
}

fn detector_files(dir: &Path, problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem::in_file(dir, format!("cannot list detectors: {e}")));
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::replay::replay_collect;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// A copy of the cloudtrail pipeline with `batch_size` changed.
    fn with_batch_size(dir: &Path, batch_size: usize) -> PathBuf {
        let src = repo().join("pipelines/cloudtrail");
        let dst = dir.join(format!("cloudtrail-{batch_size}"));
        std::fs::create_dir_all(dst.join("detectors")).expect("mkdir");
        let toml = std::fs::read_to_string(src.join("pipeline.toml")).expect("read");
        std::fs::write(
            dst.join("pipeline.toml"),
            toml.replace("batch_size = 4096", &format!("batch_size = {batch_size}")),
        )
        .expect("write");
        for e in std::fs::read_dir(src.join("detectors")).expect("ls") {
            let p = e.expect("entry").path();
            std::fs::copy(&p, dst.join("detectors").join(p.file_name().expect("name"))).expect("copy");
        }
        dst
    }

    /// What the batch loop hands over, kept.
    #[derive(Default)]
    struct Kept {
        decisions: Vec<Decision>,
        failures: Vec<DetectorFailure>,
        batches: usize,
    }
    impl Output for Kept {
        type Error = std::convert::Infallible;
        fn decision(&mut self, decision: &Decision) -> Result<(), Self::Error> {
            self.decisions.push(decision.clone());
            Ok(())
        }
        fn dead_letter(&mut self, _: &DeadLetter) -> Result<(), Self::Error> {
            Ok(())
        }
        fn detector_failed(&mut self, failure: &DetectorFailure) -> Result<(), Self::Error> {
            self.failures.push(failure.clone());
            Ok(())
        }
        fn end_of_batch(&mut self, _: usize) -> Result<(), Self::Error> {
            self.batches += 1;
            Ok(())
        }
    }

    /// The detonation logs through `pipeline`'s batch loop.
    fn ingest_detonations(pipeline: &Pipeline) -> Kept {
        let mut decoder = pipeline.decoder();
        let mut out = Kept::default();
        let mut emit = |d: crate::input::decode::Decoded| {
            if let crate::input::decode::Decoded::Batch(b) = d {
                let Ok(()) = pipeline.ingest(b, &mut out);
            }
        };
        let logs = repo().join("data/cloudtrail/stratus-detonation-logs");
        for file in crate::drivers::replay::expand_inputs(&[logs]).expect("inputs") {
            decoder.decode_file(&file, &mut emit).expect("decodes");
        }
        decoder.flush(&mut emit);
        out
    }

    /// How many of `decisions` per-event detectors made.
    fn per_event(pipeline: &Pipeline, decisions: &[Decision]) -> usize {
        decisions
            .iter()
            .filter(|d| {
                pipeline
                    .detectors
                    .iter()
                    .any(|p| p.meta.id == d.detector.id && p.split().is_none())
            })
            .count()
    }

    /// The detonation logs' records in event-time order, one per line, in `dir`.
    fn sorted_detonations(dir: &Path) -> PathBuf {
        let pipeline = Pipeline::load(&repo().join("pipelines/cloudtrail")).expect("loads");
        let mut decoder = pipeline.decoder();
        let mut records: Vec<(i64, String)> = Vec::new();
        let mut emit = |d: crate::input::decode::Decoded| {
            if let crate::input::decode::Decoded::Batch(b) = d {
                for i in 0..b.batch.num_rows() {
                    let value: serde_json::Value = serde_json::from_str(b.raw(i)).expect("raw is JSON");
                    records.push((b.event_time(i), value.to_string()));
                }
            }
        };
        let logs = repo().join("data/cloudtrail/stratus-detonation-logs");
        for file in crate::drivers::replay::expand_inputs(&[logs]).expect("inputs") {
            decoder.decode_file(&file, &mut emit).expect("decodes");
        }
        decoder.flush(&mut emit);
        records.sort();
        let path = dir.join("sorted.jsonl");
        let text: String = records.iter().map(|(_, r)| format!("{r}\n")).collect();
        std::fs::write(&path, text).expect("write");
        path
    }

    /// (Batching does not change decisions for input in event-time order: with events out of
    /// order, a window decision made at once has the evidence known when it fired, which
    /// depends on where batches end; see docs/operations.md.)
    #[test]
    fn plans_are_built_once_per_detector_however_many_batches_run() {
        let tmp = tempfile::tempdir().expect("tmp");
        let logs = sorted_detonations(tmp.path());
        let mut ids_by_batch_size = Vec::new();
        for batch_size in [4096, 7, 1] {
            let pipeline = Pipeline::load(&with_batch_size(tmp.path(), batch_size)).expect("loads");
            assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
            let (out, summary) = replay_collect(&pipeline, &[logs.as_path()]).expect("replays");
            assert_eq!(summary.events, 310);
            assert_eq!(
                pipeline.plans_built(),
                pipeline.detectors.len(),
                "no plan is built per batch"
            );
            assert_eq!(
                per_event(&pipeline, &out.decisions),
                23,
                "every detonation caught once"
            );
            let mut ids: Vec<String> = out.decisions.iter().map(|d| d.decision_id.clone()).collect();
            ids.sort();
            ids_by_batch_size.push(ids);
        }
        assert!(ids_by_batch_size[0].len() > 23, "threshold detectors fire too");
        assert_eq!(
            ids_by_batch_size[0], ids_by_batch_size[1],
            "batching does not change decisions"
        );
        assert_eq!(
            ids_by_batch_size[0], ids_by_batch_size[2],
            "batching does not change decisions"
        );
    }

    /// A detector whose SQL fails on some events at run time is reported as the user's
    /// failure, batch after batch, while the others decide as before.
    #[test]
    fn a_detector_failing_on_the_events_is_the_users_fault_and_the_rest_keep_deciding() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = with_batch_size(tmp.path(), 64);
        std::fs::write(
            dir.join("detectors/zz-casts-the-action.sql"),
            "-- id: casts-the-action\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}}\n\
             SELECT actor, action FROM events WHERE CAST(action AS BIGINT) > 0\n",
        )
        .expect("write");
        let pipeline = Pipeline::load(&dir).expect("loads");
        assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
        let out = ingest_detonations(&pipeline);
        assert!(out.batches > 1, "{} batches", out.batches);
        assert_eq!(
            out.failures.len(),
            out.batches,
            "it fails on every batch and runs again on the next"
        );
        for failure in &out.failures {
            assert_eq!(failure.detector, "casts-the-action");
            assert_eq!(failure.error.fault(), crate::Fault::Input, "{}", failure.error);
            assert!(
                failure.error.to_string().contains("Cannot cast"),
                "{}",
                failure.error
            );
        }
        assert_eq!(
            per_event(&pipeline, &out.decisions),
            23,
            "the other detectors caught every detonation"
        );
    }

    /// A detector over its memory fails alone, batch after batch; one over its time on a batch
    /// is disabled (an alert says so) and not run again until re-armed; the others decide as
    /// before.
    #[test]
    fn a_detector_over_its_memory_fails_alone_and_one_over_its_time_is_disabled() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = with_batch_size(tmp.path(), 64);
        let toml = std::fs::read_to_string(dir.join("pipeline.toml")).expect("read");
        std::fs::write(
            dir.join("pipeline.toml"),
            toml.replace(
                "[source]",
                "[detectors]\nmemory_mb = 1\nmax_batch_time = \"300ms\"\n\n[source]",
            ),
        )
        .expect("write");
        std::fs::create_dir_all(dir.join("tables")).expect("mkdir");
        let words = |n: usize| -> String {
            std::iter::once("word".to_string())
                .chain((0..n).map(|i| format!("word-{i}-x")))
                .collect::<Vec<_>>()
                .join("\n")
        };
        std::fs::write(dir.join("tables/many.csv"), words(200_000)).expect("write");
        std::fs::write(dir.join("tables/some.csv"), words(20_000)).expect("write");
        let detector = |id: &str, sql: &str| {
            std::fs::write(
                dir.join(format!("detectors/{id}.sql")),
                format!(
                    "-- id: {id}\n-- verdict: alert\n-- severity: low\n-- reason: {{{{actor}}}}\n{sql}\n"
                ),
            )
            .expect("write")
        };
        // A hash join building its table from 200,000 rows: more than 1 MiB.
        detector(
            "zz-memory",
            "SELECT e.actor, w.word FROM many w JOIN events e ON e.action = w.word",
        );
        // Every event against 20,000 words by edit distance over the record's first 200
        // characters: 2.3 s per batch of 64 here, eight times the limit. (A substring search,
        // lowercased or not, took 130-300 ms: as long as the limit, and the test failed now
        // and then.)
        detector(
            "zz-slow",
            "SELECT e.actor, w.word FROM events e JOIN some w ON levenshtein(substr(e.raw, 1, 200), w.word) < 8",
        );
        let pipeline = Pipeline::load(&dir).expect("loads");
        assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
        let out = ingest_detonations(&pipeline);
        assert!(out.batches > 2, "{} batches", out.batches);
        assert_eq!(out.failures.len(), out.batches, "{:?}", out.failures);
        for failure in &out.failures {
            assert_eq!(failure.detector, "zz-memory");
            assert_eq!(failure.error.fault(), crate::Fault::Input);
            assert!(
                failure.error.to_string().contains("Resources exhausted"),
                "{}",
                failure.error
            );
        }
        let alerts: Vec<&Decision> = out
            .decisions
            .iter()
            .filter(|d| d.detector.id == "zz-slow" && d.tags.iter().any(|t| t == "disabled"))
            .collect();
        assert_eq!(alerts.len(), 1, "disabled once");
        assert!(
            alerts[0]
                .reason
                .starts_with("time budget: detector `zz-slow` took"),
            "{}",
            alerts[0].reason
        );
        assert_eq!(
            per_event(&pipeline, &out.decisions)
                - out
                    .decisions
                    .iter()
                    .filter(|d| d.detector.id.starts_with("zz-"))
                    .count(),
            23,
            "the other detectors caught every detonation"
        );
        let tripped = pipeline.tripped();
        assert!(
            tripped.iter().any(|(id, t)| id == "zz-slow" && t.disabled),
            "{tripped:?}"
        );
        assert!(pipeline.rearm("zz-slow").is_some_and(|t| t.disabled));
        assert!(!pipeline.is_disabled("zz-slow"), "re-armed, it runs again");
    }
}
