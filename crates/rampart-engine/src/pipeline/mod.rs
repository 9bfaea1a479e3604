//! A loaded pipeline: its validated config, its event schema, and the detectors that passed the
//! sandbox and planning. Detectors that were refused are kept as problems; the rest run.

pub mod config;
pub mod tables;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use datafusion::arrow::array::BooleanArray;
use datafusion::arrow::compute::filter_record_batch;
use serde::{Deserialize, Serialize};

use rampart_core::{Decision, EventClock, EventSchema, Idleness, Problem};
use rampart_sql::{CompiledDetector, DetectorEngine, Shape, StateKind};

use crate::decide::DecisionMaker;
use crate::decide::triggers::TriggerStore;
use crate::guardrails::guard::{Guard, Trip};
use crate::input::decode::{DeadLetter, DeadLetterKind, Decoder, EventBatch};
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::tables::{ReferenceTable, TableSource};
use crate::windows::keyed::{Bounds, DecideContext, Decided, KeyedState};
use crate::windows::naive::NaiveWindows;
use rampart_state::{StateError, StateStore};

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
}

/// A change to the event-time clock from outside the pipeline.
enum ClockChange {
    Track(Vec<String>),
    Flags(String, Option<bool>, Option<bool>),
}

/// Input consumed so far, per source (a file path, or topic/partition): events and dead
/// letters, counted separately (each in source order).
pub type Progress = BTreeMap<String, SourceProgress>;

/// How much of one source has been consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceProgress {
    /// Events taken from it.
    pub events: u64,
    /// Records of it sent to the dead letters as malformed.
    pub dead_letters: u64,
    /// For a Kafka partition: the next offset to consume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
}

/// The window state of all windowed detectors, and the clock they share.
struct Windows {
    store: Option<StateStore>,
    keyed: Vec<SharedState>,
    naive: NaiveWindows,
    clock: EventClock,
    next_row: u64,
    progress: Progress,
    /// Events evaluated since the last checkpoint.
    since_checkpoint: usize,
    /// Bytes the cache kept after the last checkpoint that had to evict (keys the latest
    /// batches used stay); 0 when the last checkpoint evicted nothing.
    in_use: usize,
    /// Whether the warning that `in_use` exceeds the cache budget was logged.
    warned_in_use: bool,
    /// The events behind rows not decided yet.
    triggers: TriggerStore,
    /// Bytes the last checkpoint wrote besides the window states (clock, guard, triggers).
    meta_bytes: usize,
}

/// The state of one window and the windowed detectors that read it: one detector, or several
/// whose windows keep the same rows and values ([`rampart_sql::WindowSplit::state_identity`]).
struct SharedState {
    /// Indices of the detectors among the windowed ones, in order.
    members: Vec<usize>,
    state: KeyedState,
}

impl Windows {
    /// No state yet, no store.
    fn empty(lateness: i64) -> Self {
        Self {
            store: None,
            keyed: Vec::new(),
            naive: NaiveWindows::default(),
            clock: EventClock::new(lateness),
            next_row: 0,
            progress: Progress::new(),
            since_checkpoint: 0,
            in_use: 0,
            warned_in_use: false,
            triggers: TriggerStore::default(),
            meta_bytes: 0,
        }
    }
}

/// The clock and row numbering, as persisted.
#[derive(Serialize, Deserialize)]
struct StoredClock {
    /// Newest event time of any source.
    newest: i64,
    next_row: u64,
    /// Every window row older than this was decided: the watermark.
    #[serde(default = "no_time")]
    decided_until: i64,
    /// Each source's newest event time, by name (a Kafka partition's is its progress key).
    #[serde(default)]
    sources: BTreeMap<String, i64>,
}

fn no_time() -> i64 {
    i64::MIN
}

/// What one batch produced.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// Decisions in input order (for one event, in detector order).
    pub decisions: Vec<Decision>,
    /// Detectors that failed on this batch at run time, with the error.
    pub errors: Vec<(String, String)>,
    /// Events older than the allowed lateness: per-event detectors judged them, windows did
    /// not count them.
    pub late: Vec<DeadLetter>,
    /// Decisions suppressed as repeats, per detector.
    pub suppressed: BTreeMap<String, u64>,
    /// For each window decision: how long after its triggering event, in event time, it was
    /// made (µs): to the watermark that decided it, or to the newest event time that made its
    /// second complete when it fired at once.
    pub decision_delays: Vec<i64>,
}

/// Where event time stands (see [`rampart_core::clock`]).
#[derive(Debug, Clone)]
pub struct EventTime {
    /// The watermark (µs).
    pub watermark: i64,
    /// Rows older than this have all their peers (µs; `i64::MAX`: every source is quiet).
    pub complete_before: i64,
    /// The allowed lateness (µs).
    pub lateness: i64,
    /// Each source's progress.
    pub sources: Vec<rampart_core::clock::SourceTime>,
    /// The source holding the watermark back more than the allowed lateness behind the
    /// newest: its name and how far (µs).
    pub laggard: Option<(String, i64)>,
}

impl Pipeline {
    /// Loads `dir/pipeline.toml` and every `dir/detectors/*.sql`, with throwaway window state.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        Self::load_with(dir, StateChoice::Temporary, Evaluator::Keyed)
    }

    /// Loads a pipeline with the given window state and evaluator.
    pub fn load_with(dir: &Path, state_choice: StateChoice, evaluator: Evaluator) -> Result<Self, LoadError> {
        let config_path = dir.join("pipeline.toml");
        if !config_path.is_file() {
            return Err(LoadError::Config(vec![Problem::in_file(
                &config_path,
                "no pipeline.toml here: a pipeline is a directory with pipeline.toml and detectors/*.sql",
            )]));
        }
        let config = PipelineConfig::load(&config_path).map_err(LoadError::Config)?;
        let extras = config
            .mapping
            .extras
            .iter()
            .map(|(n, _, t)| (n.clone(), *t))
            .collect();
        let schema = EventSchema::new(extras);
        let engine = DetectorEngine::new(&schema)?;
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
            guard: Mutex::new(guard),
            guarded: std::sync::atomic::AtomicBool::new(true),
            tables: Mutex::new(tables),
            live: Mutex::new(None),
            clock_inbox: Mutex::new(Vec::new()),
            event_time: Mutex::new(None),
        };
        let windows = pipeline.open_windows()?;
        *pipeline.windows.get_mut().unwrap_or_else(|p| p.into_inner()) = windows;
        Ok(pipeline)
    }

    /// Fresh window state: the persistent store as it was last written, or a new temporary one.
    fn open_windows(&self) -> Result<Windows, LoadError> {
        let lateness = i64::try_from(self.config.allowed_lateness.as_micros()).unwrap_or(i64::MAX);
        let mut windows = Windows::empty(lateness);
        let windowed = &self.detectors[self.per_event..];
        let store = match &self.state_choice {
            StateChoice::Persistent(dir) => Some(StateStore::open(dir)?),
            StateChoice::Temporary if !windowed.is_empty() && self.evaluator == Evaluator::Keyed => {
                Some(StateStore::temporary()?)
            }
            StateChoice::Temporary => None,
        };
        if let Some(idleness) = *self.live.lock().unwrap_or_else(|p| p.into_inner()) {
            windows.clock.set_idleness(idleness, std::time::Instant::now());
        }
        let mut decided_until = i64::MIN;
        if let Some(store) = &store {
            if let Some(stored) = store.meta_json::<StoredClock>("clock")? {
                // (Checkpoints older than `decided_until` had the newest time's watermark.)
                let watermark = if stored.decided_until > i64::MIN {
                    stored.decided_until
                } else {
                    stored.newest.saturating_sub(lateness)
                };
                windows.clock.restore(watermark, stored.sources);
                windows.next_row = stored.next_row;
                decided_until = stored.decided_until;
                store.advance_clock(watermark.saturating_add(lateness));
            }
            windows.triggers.load(store, windows.clock.watermark())?;
            store.meta_with("guard", |bytes| self.guard().restore(bytes))?;
            if let Some(progress) = store.meta_json("progress")? {
                windows.progress = progress;
            }
        }
        // Detectors with the same window identity share one state (at most 32 per state).
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_identity: HashMap<String, usize> = HashMap::new();
        for (i, detector) in windowed.iter().enumerate() {
            let split = detector.split().expect("windowed detectors have a split");
            match split.state_identity() {
                Some(identity) => match by_identity.get(&identity) {
                    Some(&g) if groups[g].len() < 32 => groups[g].push(i),
                    _ => {
                        by_identity.insert(identity, groups.len());
                        groups.push(vec![i]);
                    }
                },
                None => groups.push(vec![i]),
            }
        }
        for members in groups {
            let detector = &windowed[members[0]];
            let split = detector.split().expect("windowed detectors have a split");
            let identity = split.state_identity();
            let mut keyed = KeyedState::new(detector, split, identity.as_deref(), lateness).map_err(|e| {
                LoadError::Config(vec![Problem::at(
                    &detector.path,
                    1,
                    format!("cannot keep state for this detector: {e}"),
                )])
            })?;
            let compiled: Vec<&CompiledDetector> = members.iter().map(|&i| &windowed[i]).collect();
            keyed.set_members(&compiled);
            if let Some(store) = &store {
                keyed.restore(store, decided_until)?;
            }
            windows.keyed.push(SharedState {
                members,
                state: keyed,
            });
        }
        windows.store = store;
        Ok(windows)
    }

    /// A decoder for this pipeline's inputs.
    pub fn decoder(&self) -> Decoder {
        Decoder::new(
            self.config.mapping.clone(),
            self.schema.clone(),
            self.config.format,
            self.config.max_record_bytes,
            self.config.batch_size,
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

    /// The row id the next event must get (row ids continue across restarts).
    pub fn next_row(&self) -> u64 {
        self.lock().next_row
    }

    /// Input consumed as of the last checkpoint of a persistent state (empty otherwise).
    pub fn progress(&self) -> Progress {
        self.lock().progress.clone()
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
    fn evaluation(&self, decide: impl FnOnce(&str, &mut Evaluation) -> Vec<(u64, Decision)>) -> Evaluation {
        let processed_at = rampart_core::time::now();
        let mut out = Evaluation::default();
        let decided = decide(&processed_at, &mut out);
        out.decisions = self.guarded(in_input_order(decided), &mut out.suppressed);
        out
    }

    fn guarded(&self, decisions: Vec<Decision>, suppressed: &mut BTreeMap<String, u64>) -> Vec<Decision> {
        if self.guarded.load(std::sync::atomic::Ordering::Relaxed) {
            self.guard().apply(decisions, suppressed)
        } else {
            decisions
        }
    }

    fn per_event_decisions(
        &self,
        events: &EventBatch,
        processed_at: &str,
        out: &mut Evaluation,
    ) -> Vec<(u64, Decision)> {
        let per_event = &self.detectors[..self.per_event];
        self.guard().observe(events);
        let results = self.engine.run(per_event, events.batch.clone());
        let mut decided = Vec::new();
        for (detector, result) in per_event.iter().zip(results) {
            match result {
                Ok(batches) => {
                    for b in &batches {
                        decided.extend(self.decisions.decide(detector, b, events, processed_at));
                    }
                }
                Err(e) => out.errors.push((detector.meta.id.clone(), e.to_string())),
            }
        }
        decided
    }

    fn windowed_decisions(
        &self,
        events: &EventBatch,
        processed_at: &str,
        out: &mut Evaluation,
    ) -> Vec<(u64, Decision)> {
        let mut decided = Vec::new();
        let mut windows = self.lock();
        windows.next_row = windows
            .next_row
            .max(events.first_row + events.batch.num_rows() as u64);
        windows.since_checkpoint += events.batch.num_rows();
        if self.per_event < self.detectors.len() {
            self.update_clock(&mut windows.clock);
            self.evaluate_windows(&mut windows, Step::Batch(events), processed_at, &mut decided, out);
            self.publish_event_time(&windows.clock);
        }
        decided
    }

    /// Makes the pipeline's event time follow processing time too, as a live service's must:
    /// a source with no records for `idleness.idle_after` stops holding the watermark, one
    /// quiet for `idleness.quiet_after` counts as complete (see [`rampart_core::clock`]).
    /// Replays never do (their answer depends on their input only).
    pub fn set_live(&self, idleness: Idleness) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(idleness);
        self.lock()
            .clock
            .set_idleness(idleness, std::time::Instant::now());
    }

    /// The sources (Kafka partitions, by progress key) this instance consumes: new ones hold
    /// the watermark until their first record or until idle; others are forgotten. Takes
    /// effect at the next evaluation.
    pub fn track_sources(&self, names: &[String]) {
        self.post(ClockChange::Track(names.to_vec()));
    }

    /// Marks a source paused (it runs ahead) and/or behind (records not consumed yet): neither
    /// counts as idle or quiet. Takes effect at the next evaluation.
    pub fn set_source_flags(&self, name: &str, paused: Option<bool>, behind: Option<bool>) {
        self.post(ClockChange::Flags(name.to_string(), paused, behind));
    }

    fn post(&self, change: ClockChange) {
        self.clock_inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(change);
    }

    /// Applies what the service told the clock, sets its processing time, and afterwards
    /// (see [`Self::publish_event_time`]) says where it stands.
    fn update_clock(&self, clock: &mut EventClock) {
        let changes = std::mem::take(&mut *self.clock_inbox.lock().unwrap_or_else(|p| p.into_inner()));
        clock.set_now(std::time::Instant::now());
        for change in changes {
            match change {
                ClockChange::Track(names) => clock.track(&names),
                ClockChange::Flags(name, paused, behind) => clock.set_flags(&name, paused, behind),
            }
        }
    }

    fn publish_event_time(&self, clock: &EventClock) {
        *self.event_time.lock().unwrap_or_else(|p| p.into_inner()) = Some(EventTime {
            watermark: clock.watermark(),
            complete_before: clock.complete_before(),
            lateness: clock.lateness(),
            sources: clock.sources().to_vec(),
            laggard: clock.laggard().map(|(name, behind)| (name.to_string(), behind)),
        });
    }

    /// With no new events: lets processing time move event time (idle and quiet sources) and
    /// decides what became certain.
    pub fn tick(&self) -> Evaluation {
        self.evaluation(|processed_at, out| {
            let mut decided = Vec::new();
            let mut windows = self.lock();
            self.update_clock(&mut windows.clock);
            if self.per_event < self.detectors.len() {
                self.evaluate_windows(&mut windows, Step::Tick, processed_at, &mut decided, out);
            } else {
                windows.clock.advance();
            }
            self.publish_event_time(&windows.clock);
            decided
        })
    }

    /// Where event time stood after the last evaluation (never waits for the window state).
    pub fn event_time(&self) -> Option<EventTime> {
        self.event_time.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends the input: sliding-window rows still waiting for later events are final now. Call
    /// it once after the last batch; the window state starts afresh afterwards. (A persistent
    /// state is not finished: its waiting rows wait for the next run; see [`Self::checkpoint`].)
    pub fn finish(&self) -> Evaluation {
        let out = self.decide_waiting();
        self.reset();
        out
    }

    /// Decides every sliding-window row still waiting for the watermark, as if the input ended
    /// here (the state is kept; with a persistent state, checkpoint afterwards).
    pub fn decide_waiting(&self) -> Evaluation {
        let mut out = Evaluation::default();
        if self.per_event < self.detectors.len() {
            let processed_at = rampart_core::time::now();
            let mut decided = Vec::new();
            let mut windows = self.lock();
            self.evaluate_windows(&mut windows, Step::End, &processed_at, &mut decided, &mut out);
            out.decisions = self.guarded(in_input_order(decided), &mut out.suppressed);
        }
        out
    }

    /// Forgets the window state and starts again from what a persistent state holds on disk
    /// (or from nothing).
    pub fn reset(&self) {
        let mut windows = self.lock();
        self.guard().clear();
        // Close the store before reopening it.
        windows.store = None;
        match self.open_windows() {
            Ok(w) => *windows = w,
            Err(e) => tracing::error!(error = %e, "cannot reopen the window state"),
        }
    }

    /// Whether enough has changed since the last checkpoint that one should be written (the
    /// caller knows the input progress to write with it).
    pub fn wants_checkpoint(&self) -> bool {
        let windows = self.lock();
        let cached: usize = windows.keyed.iter().map(|w| w.state.cache_bytes()).sum();
        let unsaved: usize = windows.keyed.iter().map(|w| w.state.unsaved_bytes()).sum();
        // Past the budget; or, when the keys in use alone exceed it (eviction kept them), past
        // those by an eighth of the budget, so that a large working set is not written and
        // evicted after every batch. Or when the checkpoint's write batch, built in memory and
        // then copied whole into a memtable, would pass an eighth of the budget (at 1M new
        // actors a checkpoint forced by the cache alone wrote about 50 MB; more frequent ones
        // cost a dense workload, whose hot keys write a chunk each time, some throughput).
        let budget = self.config.state_cache_bytes;
        windows.since_checkpoint >= 1 << 18
            || unsaved > budget / 8
            || cached > budget.max(windows.in_use + budget / 8)
    }

    /// Writes the window state changed since the last checkpoint, the rows still waiting, the
    /// clock and `progress` in one atomic write, then trims the in-memory cache.
    pub fn checkpoint(&self, progress: &Progress) -> Result<(), StateError> {
        self.checkpoint_with(progress, self.guard_snapshot())
    }

    /// [`Self::checkpoint`] with the guard state taken earlier by [`Self::guard_snapshot`].
    pub fn checkpoint_with(&self, progress: &Progress, guard: Vec<u8>) -> Result<(), StateError> {
        let mut windows = self.lock();
        let windows = &mut *windows;
        windows.since_checkpoint = 0;
        let Some(store) = &windows.store else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        // The windows' estimate, an eighth more for what it leaves out (deletions, expired
        // keys), and the metadata as large as last time.
        let unsaved: usize = windows.keyed.iter().map(|w| w.state.unsaved_bytes()).sum();
        let mut commit = store.commit(unsaved + unsaved / 8 + windows.meta_bytes);
        let bounds = bounds_of(&windows.clock);
        for keyed in &mut windows.keyed {
            keyed.state.checkpoint(bounds, &mut commit);
        }
        let encoded = started.elapsed();
        let window_bytes = commit.bytes();
        let clock = StoredClock {
            newest: windows.clock.newest(),
            next_row: windows.next_row,
            // Every batch decides the rows older than the watermark.
            decided_until: windows.clock.watermark(),
            sources: windows
                .clock
                .sources()
                .iter()
                .filter(|s| s.newest > i64::MIN)
                .map(|s| (s.name.clone(), s.newest))
                .collect(),
        };
        commit.meta(
            "clock",
            Some(&serde_json::to_vec(&clock).expect("clock serialises")),
        );
        commit.meta("guard", Some(&guard));
        windows.triggers.save(&mut commit);
        if self.is_persistent() {
            commit.meta(
                "progress",
                Some(&serde_json::to_vec(progress).expect("progress serialises")),
            );
            windows.progress = progress.clone();
        }
        let rows = commit.len();
        let bytes = commit.bytes();
        windows.meta_bytes = bytes - window_bytes;
        let before_write = started.elapsed();
        store.write(commit)?;
        tracing::debug!(
            rows,
            bytes,
            window_bytes,
            encode_ms = encoded.as_millis() as u64,
            meta_ms = (before_write - encoded).as_millis() as u64,
            write_ms = (started.elapsed() - before_write).as_millis() as u64,
            "checkpoint"
        );
        // Only now: a key read back for a row decided in this batch must not look expired.
        store.advance_clock(bounds.expiry_now());
        // One budget for all window states: nothing is evicted while the total fits, and past
        // it each state gives up its share of the excess (busy states keep more).
        let budget = self.config.state_cache_bytes;
        let total: usize = windows.keyed.iter().map(|w| w.state.cache_bytes()).sum();
        windows.in_use = 0;
        if total > budget {
            for keyed in &mut windows.keyed {
                let share = (keyed.state.cache_bytes() as u128 * budget as u128 / total as u128) as usize;
                keyed.state.evict(share);
            }
            windows.in_use = windows.keyed.iter().map(|w| w.state.cache_bytes()).sum();
            if windows.in_use > budget && !windows.warned_in_use {
                windows.warned_in_use = true;
                tracing::warn!(
                    in_use_mib = windows.in_use >> 20,
                    cache_mib = budget >> 20,
                    "the window keys the latest batches used take more memory than [state] cache_mb: \
                     they stay in memory (evicting them would read them back at once); raise cache_mb \
                     to match"
                );
            }
        }
        Ok(())
    }

    /// The windowed detectors that share one window state (same rows, key, aggregates and
    /// frames; they differ above the window), by id, one list per shared state.
    pub fn shared_window_states(&self) -> Vec<Vec<String>> {
        let windowed = &self.detectors[self.per_event..];
        self.lock()
            .keyed
            .iter()
            .filter(|w| w.members.len() > 1)
            .map(|w| w.members.iter().map(|&i| windowed[i].meta.id.clone()).collect())
            .collect()
    }

    /// Window state figures: keys cached in memory, their bytes, rows waiting, bytes on disk.
    pub fn state_stats(&self) -> StateStats {
        let windows = self.lock();
        StateStats {
            cached_keys: windows.keyed.iter().map(|w| w.state.cached_keys()).sum(),
            cached_bytes: windows.keyed.iter().map(|w| w.state.cache_bytes()).sum(),
            waiting_rows: windows.keyed.iter().map(|w| w.state.waiting()).sum(),
            disk_bytes: windows.store.as_ref().map_or(0, StateStore::size_on_disk),
        }
    }

    /// Flushes and compacts the state store (so its size on disk is the steady state).
    pub fn compact_state(&self) -> Result<(), StateError> {
        match &self.lock().store {
            Some(store) => store.compact(),
            None => Ok(()),
        }
    }

    /// Late events (beyond the allowed lateness) become dead letters; the others go through the
    /// windowed detectors; then every row that became final is decided. `events` is `None` at
    /// the end of the input.
    fn evaluate_windows(
        &self,
        windows: &mut Windows,
        step: Step<'_>,
        processed_at: &str,
        decided: &mut Vec<(u64, Decision)>,
        out: &mut Evaluation,
    ) {
        let windowed = &self.detectors[self.per_event..];
        if self.evaluator == Evaluator::Naive {
            let reach = windowed
                .iter()
                .filter_map(|d| d.split().map(|s| s.reach))
                .max()
                .unwrap_or_default()
                + self.config.allowed_lateness;
            let reach = i64::try_from(reach.as_micros()).unwrap_or(i64::MAX);
            windows.naive.evaluate(
                &self.engine,
                windowed,
                &self.decisions,
                match step {
                    Step::Batch(e) => Some(e),
                    Step::Tick => return,
                    Step::End => None,
                },
                reach,
                processed_at,
                decided,
                &mut out.errors,
            );
            return;
        }
        let before = windows.clock.watermark();
        let on_time = match step {
            Step::Batch(e) => {
                let (on_time, late) = self.split_late(&mut windows.clock, e);
                out.late = late;
                windows.clock.advance();
                Some(on_time)
            }
            Step::Tick => {
                if !windows.clock.advance() {
                    return;
                }
                None
            }
            Step::End => None,
        };
        let events = step.events();
        let all = matches!(step, Step::End);
        let bounds = bounds_of(&windows.clock);
        if let Some(e) = events {
            windows.triggers.push(e);
        }
        let clock_newest = windows.clock.newest();
        let Windows {
            store,
            keyed,
            triggers,
            ..
        } = windows;
        let Some(store) = store.as_ref() else { return };
        let ctx = DecideContext {
            bounds,
            events,
            decisions: &self.decisions,
            processed_at,
            triggers,
            engine: &self.engine,
            store,
        };
        // The part below each window runs here, once per shared state (it reads the shared
        // events slot); then the states' work runs on two threads (each state is its own).
        let pres: Vec<Result<Vec<datafusion::arrow::record_batch::RecordBatch>, String>> = keyed
            .iter()
            .map(|shared| match &on_time {
                Some(batch) => {
                    let split = windowed[shared.members[0]]
                        .split()
                        .expect("windowed detectors have a split");
                    self.engine
                        .run_pre(split, batch.clone())
                        .map_err(|e| e.to_string())
                }
                None => Ok(Vec::new()),
            })
            .collect();
        let work = |shared: &mut SharedState,
                    pre: Result<Vec<datafusion::arrow::record_batch::RecordBatch>, String>|
         -> Vec<(usize, Decided)> {
            let members: Vec<&CompiledDetector> = shared.members.iter().map(|&i| &windowed[i]).collect();
            let split = members[0].split().expect("windowed detectors have a split");
            let results = match pre.and_then(|pre| shared.state.add(split, store, before, &pre)) {
                Err(e) => members.iter().map(|_| Err(e.clone())).collect(),
                Ok(touched) => match split.kind {
                    StateKind::Sliding => shared.state.decide_sliding(&members, &ctx, all),
                    StateKind::Grouped => {
                        vec![shared.state.decide_grouped(members[0], split, &ctx, touched)]
                    }
                },
            };
            shared.members.iter().copied().zip(results).collect()
        };
        let jobs: Vec<_> = keyed.iter_mut().zip(pres).enumerate().collect();
        let (mine, theirs): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|(i, _)| i % 2 == 0);
        let work = &work;
        let mut results = std::thread::scope(|scope| {
            let other = (!theirs.is_empty()).then(|| {
                std::thread::Builder::new()
                    .name("rampart-windows".into())
                    .spawn_scoped(scope, move || {
                        theirs
                            .into_iter()
                            .flat_map(|(_, (shared, pre))| work(shared, pre))
                            .collect::<Vec<_>>()
                    })
                    .expect("the OS can start a thread")
            });
            let mut results: Vec<_> = mine
                .into_iter()
                .flat_map(|(_, (shared, pre))| work(shared, pre))
                .collect();
            if let Some(handle) = other {
                results.extend(handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            results
        });
        // In detector order, as without sharing.
        results.sort_by_key(|(i, _)| *i);
        // A row older than the watermark was decided by it; a newer one fired at once, when
        // the newest event time passed its second.
        let at_once_basis = bounds.complete.min(clock_newest);
        for (i, result) in results {
            let detector = &windowed[i];
            match result {
                Ok(d) => {
                    for (row, _) in &d {
                        if let Some(time) = triggers.get(*row).map(|t| t.time) {
                            let basis = if all {
                                clock_newest
                            } else if time < bounds.watermark {
                                bounds.watermark
                            } else {
                                at_once_basis
                            };
                            out.decision_delays.push(basis.saturating_sub(time).max(0));
                        }
                    }
                    decided.extend(d);
                }
                Err(e) => out.errors.push((detector.meta.id.clone(), e)),
            }
        }
        if events.is_some() || matches!(step, Step::Tick) {
            triggers.prune(bounds.watermark);
        }
    }

    /// Splits a batch into the events windows may count and the late ones (older than their
    /// source's newest time before them minus the allowed lateness, or than the watermark),
    /// and moves each source's newest time.
    fn split_late(
        &self,
        clock: &mut EventClock,
        events: &EventBatch,
    ) -> (datafusion::arrow::record_batch::RecordBatch, Vec<DeadLetter>) {
        let n = events.batch.num_rows();
        let mut keep = Vec::with_capacity(n);
        let mut late = Vec::new();
        for i in 0..n {
            let t = events.event_time(i);
            let source = clock.source_of(&events.positions[i]);
            match clock.observe(source, t) {
                Ok(()) => keep.push(true),
                Err(why) => {
                    keep.push(false);
                    let lateness = humantime::format_duration(self.config.allowed_lateness);
                    let lateness_us = clock.lateness();
                    let error = if why.source_newest.saturating_sub(lateness_us) >= why.watermark {
                        format!(
                            "event time {} is more than the allowed lateness ({lateness}) behind the newest \
                             event time of its source {}, {}: windows do not count it (per-event detectors \
                             did judge it)",
                            rampart_core::time::format_micros(t),
                            clock.sources()[source].name,
                            rampart_core::time::format_micros(why.source_newest),
                        )
                    } else {
                        format!(
                            "event time {} is behind the watermark {} (the slowest source's newest event \
                             time minus the allowed lateness, {lateness}; or a source that was idle): the \
                             windows' rows before it are decided, so windows do not count it (per-event \
                             detectors did judge it)",
                            rampart_core::time::format_micros(t),
                            rampart_core::time::format_micros(why.watermark),
                        )
                    };
                    late.push(DeadLetter {
                        kind: DeadLetterKind::Late,
                        error,
                        source: events.positions[i].clone(),
                        record: events.raw(i).to_string(),
                        truncated: false,
                    });
                }
            }
        }
        if late.is_empty() {
            return (events.batch.clone(), late);
        }
        let mask = BooleanArray::from(keep);
        let batch = filter_record_batch(&events.batch, &mask).expect("mask has the batch's length");
        (batch, late)
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

/// What moves the windows: a batch, processing time alone, or the end of the input.
#[derive(Clone, Copy)]
enum Step<'a> {
    Batch(&'a EventBatch),
    Tick,
    End,
}

impl<'a> Step<'a> {
    /// The batch, if this step brings one.
    fn events(self) -> Option<&'a EventBatch> {
        match self {
            Step::Batch(e) => Some(e),
            Step::Tick | Step::End => None,
        }
    }
}

fn bounds_of(clock: &EventClock) -> Bounds {
    Bounds {
        watermark: clock.watermark(),
        complete: clock.complete_before(),
        lateness: clock.lateness(),
    }
}

/// Window state figures (see [`Pipeline::state_stats`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct StateStats {
    /// Keys held in memory.
    pub cached_keys: usize,
    /// Approximate bytes of those keys.
    pub cached_bytes: usize,
    /// Sliding-window rows waiting for later events.
    pub waiting_rows: usize,
    /// Bytes of the state directory on disk.
    pub disk_bytes: u64,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Decisions sorted by the row id of their triggering event; for one event, detector order
/// (the sort is stable).
fn in_input_order(mut decided: Vec<(u64, Decision)>) -> Vec<Decision> {
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
            let per_event = out
                .decisions
                .iter()
                .filter(|d| {
                    pipeline
                        .detectors
                        .iter()
                        .any(|p| p.meta.id == d.detector.id && p.split().is_none())
                })
                .count();
            assert_eq!(per_event, 23, "every detonation caught once");
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
}
