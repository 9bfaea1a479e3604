//! The pipeline's windowed side: the window states of all windowed detectors and the clock
//! they share ([`Windows`]), opened from the state store, and one step of evaluation (a batch,
//! a tick of processing time, the end of the input): late events out, the part below each
//! window on the batch, then each state's work on two threads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use datafusion::arrow::array::BooleanArray;
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::record_batch::RecordBatch;
use rampart_core::{EventClock, Problem};
use rampart_sql::{CompiledDetector, StateKind, WindowedDetector};
use rampart_state::StateStore;

use super::checkpoint::StoredClock;
use super::event_time::bounds_of;
use super::intake::Intake;
use super::{Evaluation, Evaluator, Input, LoadError, Pipeline, StateChoice};
use crate::decide::Pending;
use crate::decide::triggers::TriggerStore;
use crate::error::{Error, Result};
use crate::input::decode::{DeadLetter, DeadLetterKind, EventBatch};
use crate::windows::keyed::{Bounds, DecideContext, Decided, KeyedState, SharedTag};
use crate::windows::naive::NaiveWindows;

/// The window state of all windowed detectors, and the clock they share.
pub(super) struct Windows {
    pub(super) store: Option<StateStore>,
    pub(super) keyed: Vec<SharedState>,
    pub(super) naive: NaiveWindows,
    pub(super) clock: EventClock,
    /// Events evaluated since the last checkpoint.
    pub(super) since_checkpoint: usize,
    /// Bytes the cache kept after the last checkpoint that had to evict (keys the latest
    /// batches used stay); 0 when the last checkpoint evicted nothing.
    pub(super) in_use: usize,
    /// Whether the warning that `in_use` exceeds the cache budget was logged.
    pub(super) warned_in_use: bool,
    /// The events behind rows not decided yet.
    pub(super) triggers: TriggerStore,
    /// Bytes the last checkpoint wrote besides the window states (clock, guard, triggers).
    pub(super) meta_bytes: usize,
}

/// The state of one window and the windowed detectors that read it: one detector, or several
/// whose windows keep the same rows ([`rampart_sql::WindowSplit::rows_identity`]).
pub(super) struct SharedState {
    /// Indices of the detectors among the windowed ones, in order.
    pub(super) members: Vec<usize>,
    pub(super) state: KeyedState,
}

impl Windows {
    /// No state yet, no store.
    pub(super) fn empty(lateness: i64) -> Self {
        Self {
            store: None,
            keyed: Vec::new(),
            naive: NaiveWindows::default(),
            clock: EventClock::new(lateness),
            since_checkpoint: 0,
            in_use: 0,
            warned_in_use: false,
            triggers: TriggerStore::default(),
            meta_bytes: 0,
        }
    }
}

/// The windowed detectors (indices, in order) of one window state, and for a state shared by
/// windows keeping the same rows, their rows identity and which state of it this is.
type StateGroup = (Option<(String, usize)>, Vec<usize>);

/// What moves the windows: a batch, processing time alone, or the end of the input.
#[derive(Clone, Copy)]
pub(super) enum Step<'a> {
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

/// What a step brought the windows.
enum Advanced {
    /// A batch's events on time.
    Batch(RecordBatch),
    /// Only time.
    Time,
}

impl Pipeline {
    /// Fresh window state: the persistent store as it was last written, or a new temporary one.
    /// Opens the window state (from the store of a persistent state, or empty) and the input it
    /// holds.
    pub(super) fn open_windows(&self) -> Result<(Windows, Input), LoadError> {
        let lateness = rampart_core::time::micros(self.config.allowed_lateness);
        let mut windows = Windows::empty(lateness);
        let mut input = Input::default();
        let windowed = self.windowed();
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
                // A watermark that had not moved yet (a source not heard of) stays where it
                // was; checkpoints older than `decided_until` had the newest time's.
                let watermark = stored
                    .decided_until
                    .unwrap_or_else(|| stored.newest.saturating_sub(lateness));
                tracing::debug!(watermark, sources = ?stored.sources, "event-time clock restored");
                windows.clock.restore(watermark, stored.sources);
                input.next_row = stored.next_row;
                decided_until = stored.decided_until.unwrap_or(i64::MIN);
                store.advance_clock(watermark.saturating_add(lateness));
            }
            let decided_until = windows.clock.watermark().saturating_sub(self.longest_following());
            windows.triggers.load(store, decided_until)?;
            store.meta_with("guard", |bytes| self.guard().restore(bytes))?;
            if let Some(progress) = store.meta_json("progress")? {
                input.progress = progress;
            }
        }
        // Detectors whose windows keep the same rows share one state (at most 32 per state).
        let mut groups: Vec<StateGroup> = Vec::new();
        // Per rows identity: its latest state's group, and how many states it has before it.
        let mut by_identity: HashMap<String, (usize, usize)> = HashMap::new();
        for (i, w) in windowed.iter().enumerate() {
            let Some(identity) = w.split.rows_identity() else {
                groups.push((None, vec![i]));
                continue;
            };
            match by_identity.get_mut(&identity) {
                Some((g, _)) if groups[*g].1.len() < 32 => groups[*g].1.push(i),
                Some((g, n)) => {
                    *n += 1;
                    *g = groups.len();
                    groups.push((Some((identity, *n)), vec![i]));
                }
                None => {
                    by_identity.insert(identity.clone(), (groups.len(), 0));
                    groups.push((Some((identity, 0)), vec![i]));
                }
            }
        }
        for (identity, members) in groups {
            let readers: Vec<WindowedDetector<'_>> = members.iter().map(|&i| windowed[i]).collect();
            let shared = match &identity {
                Some((identity, n)) => Some(SharedTag::choose(store.as_ref(), identity, *n, &readers)?),
                None => None,
            };
            let first = readers[0];
            let mut keyed = KeyedState::new(&readers, shared.as_ref(), lateness).map_err(|e| {
                LoadError::Config(vec![Problem::at(
                    &first.detector.path,
                    1,
                    format!("cannot keep state for this detector: {e}"),
                )])
            })?;
            if let Some(store) = &store {
                keyed.restore(store, decided_until)?;
            }
            windows.keyed.push(SharedState {
                members,
                state: keyed,
            });
        }
        windows.store = store;
        Ok((windows, input))
    }

    pub(super) fn windowed_decisions<'s>(
        &'s self,
        events: &EventBatch,
        processed_at: &str,
        out: &mut Evaluation,
    ) -> Vec<(u64, Pending<'s>)> {
        let mut decided = Vec::new();
        let mut windows = self.lock();
        windows.since_checkpoint += events.batch.num_rows();
        if self.per_event < self.detectors.len() {
            self.update_clock(&mut windows.clock);
            self.evaluate_windows(&mut windows, Step::Batch(events), processed_at, &mut decided, out);
            self.publish_event_time(&windows.clock);
        }
        decided
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
            drop(windows);
            self.conclude(decided, &processed_at, &mut out);
        }
        out
    }

    /// Forgets the window state and starts again from what a persistent state holds on disk
    /// (or from nothing).
    pub fn reset(&self) {
        self.reset_guarded(self.guarded.load(std::sync::atomic::Ordering::Relaxed));
    }

    /// [`Self::reset`], and from now on decisions pass through the guard or not (see
    /// [`Self::set_guarded`]): a `rampart test` case starts so, as the case says.
    pub fn reset_guarded(&self, guarded: bool) {
        self.set_guarded(guarded);
        if let Err(e) = self.reopen_state() {
            tracing::error!(error = %e, "cannot reopen the window state");
        }
    }

    /// Forgets the window state in memory and the guard's, and reads them again from what a
    /// persistent state holds on disk (or starts from nothing).
    pub fn reopen_state(&self) -> Result<(), LoadError> {
        let mut windows = self.lock();
        self.guard().clear();
        // Close the store before reopening it.
        windows.store = None;
        let (w, input) = self.open_windows()?;
        *windows = w;
        *self.intake() = Intake::resuming(input);
        Ok(())
    }

    /// Late events (beyond the allowed lateness) become dead letters; the others go through the
    /// windowed detectors; then every row that became final is decided. `events` is `None` at
    /// the end of the input.
    fn evaluate_windows<'s>(
        &'s self,
        windows: &mut Windows,
        step: Step<'_>,
        processed_at: &str,
        decided: &mut Vec<(u64, Pending<'s>)>,
        out: &mut Evaluation,
    ) {
        if self.evaluator == Evaluator::Naive {
            self.evaluate_naive(windows, step, processed_at, decided, out);
            return;
        }
        let before = windows.clock.watermark();
        let Some(on_time) = self.advance_clock(windows, step, out) else {
            return;
        };
        let windowed = self.windowed();
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
            triggers,
            engine: &self.engine,
            store,
        };
        // The part below each window runs here, once per shared state (it reads the shared
        // events slot); then the states' work runs on two threads (each state is its own). A
        // state whose detectors are all disabled for their time is skipped; each state's time
        // (both parts) is checked against the budget.
        let skip: Vec<bool> = keyed
            .iter()
            .map(|shared| {
                shared
                    .members
                    .iter()
                    .all(|&i| self.is_disabled(&windowed[i].detector.meta.id))
            })
            .collect();
        let pres: Vec<(
            Result<Vec<datafusion::arrow::record_batch::RecordBatch>>,
            Duration,
        )> = keyed
            .iter()
            .zip(&skip)
            .map(|(shared, skip)| {
                let started = Instant::now();
                let pre = match &on_time {
                    Advanced::Batch(batch) if !skip => {
                        let split = windowed[shared.members[0]].split;
                        self.engine.run_pre(split, batch.clone()).map_err(Error::from)
                    }
                    Advanced::Batch(_) | Advanced::Time => Ok(Vec::new()),
                };
                (pre, started.elapsed())
            })
            .collect();
        type Ran<'s> = (usize, Decided<'s>, Duration);
        let work = |shared: &mut SharedState,
                    (pre, pre_took): (
            Result<Vec<datafusion::arrow::record_batch::RecordBatch>>,
            Duration,
        ),
                    skip: bool|
         -> Vec<Ran<'s>> {
            if skip {
                return Vec::new();
            }
            let started = Instant::now();
            let members: Vec<WindowedDetector<'_>> = shared.members.iter().map(|&i| windowed[i]).collect();
            let first = members[0];
            let results = match pre.and_then(|pre| shared.state.add(first.split, store, before, &pre)) {
                Err(e) => members.iter().map(|_| Err(e.clone())).collect(),
                Ok(touched) => match first.split.kind() {
                    StateKind::Sliding => shared.state.decide_sliding(&members, &ctx, all),
                    StateKind::Grouped => vec![shared.state.decide_grouped(first, &ctx, touched)],
                },
            };
            let took = pre_took + started.elapsed();
            shared
                .members
                .iter()
                .copied()
                .zip(results)
                .map(|(i, result)| (i, result, took))
                .collect()
        };
        let jobs: Vec<_> = keyed.iter_mut().zip(pres).zip(skip).collect();
        let ran = on_two_threads(jobs, |((shared, pre), skip)| work(shared, pre, skip));
        let mut results = Vec::with_capacity(ran.len());
        for (i, result, took) in ran {
            let id = &windowed[i].detector.meta.id;
            self.time_check(id, took, || clock_newest, out);
            // (A disabled member of a state others still run decides nothing.)
            if !self.is_disabled(id) {
                results.push((i, result));
            }
        }
        Self::take_results(
            &windowed,
            results,
            triggers,
            bounds,
            clock_newest,
            all,
            decided,
            out,
        );
        if events.is_some() || matches!(step, Step::Tick) {
            // (Rows whose frames look ahead are decided that long after the watermark.)
            triggers.prune(bounds.watermark.saturating_sub(self.longest_following()));
        }
    }

    /// How far the windowed detectors' frames look ahead, at most (µs): rows are decided up to
    /// the watermark less this.
    fn longest_following(&self) -> i64 {
        self.detectors[self.per_event..]
            .iter()
            .filter_map(|d| d.split().map(|s| s.timing.following()))
            .max()
            .map_or(0, rampart_core::time::micros)
    }

    /// The naive evaluator (a benchmark baseline): every window re-run over all kept rows.
    fn evaluate_naive(
        &self,
        windows: &mut Windows,
        step: Step<'_>,
        processed_at: &str,
        decided: &mut Vec<(u64, Pending<'_>)>,
        out: &mut Evaluation,
    ) {
        let windowed = &self.detectors[self.per_event..];
        let reach = windowed
            .iter()
            .filter_map(|d| d.split().map(|s| s.reach))
            .max()
            .unwrap_or_default()
            + self.config.allowed_lateness;
        let reach = rampart_core::time::micros(reach);
        let mut made = Vec::new();
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
            &mut made,
            &mut out.failures,
        );
        decided.extend(made.into_iter().map(|(row, d)| (row, Pending::Made(Box::new(d)))));
    }

    /// Moves the clock for one step: a batch's late events go to `out` and the rest are what
    /// the windows take; a tick only moves processing-time rules (`None`: nothing changed).
    fn advance_clock(&self, windows: &mut Windows, step: Step<'_>, out: &mut Evaluation) -> Option<Advanced> {
        match step {
            Step::Batch(e) => {
                let (on_time, late) = self.split_late(&mut windows.clock, e);
                out.late = late;
                windows.clock.advance();
                Some(Advanced::Batch(on_time))
            }
            Step::Tick => windows.clock.advance().then_some(Advanced::Time),
            Step::End => Some(Advanced::Time),
        }
    }

    /// The window states' results, in detector order (as without sharing), into `decided`,
    /// with each decision's delay in event time; failures into `out`.
    #[allow(clippy::too_many_arguments)] // (the pieces of one evaluation, borrowed apart)
    fn take_results<'s>(
        windowed: &[WindowedDetector<'s>],
        mut results: Vec<(usize, Decided<'s>)>,
        triggers: &TriggerStore,
        bounds: Bounds,
        clock_newest: i64,
        all: bool,
        decided: &mut Vec<(u64, Pending<'s>)>,
        out: &mut Evaluation,
    ) {
        // In detector order, as without sharing.
        results.sort_by_key(|(i, _)| *i);
        // A row older than the watermark was decided by it; a newer one fired at once, when
        // the newest event time passed its second.
        let at_once_basis = bounds.complete.min(clock_newest);
        for (i, result) in results {
            let detector = windowed[i].detector;
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
                Err(e) => out.failed(&detector.meta.id, e),
            }
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
}

impl Pipeline {
    /// How a scale-out deployment routes each windowed detector's rows (see [`Route`]), in
    /// order.
    pub fn window_routes(&self) -> Vec<(String, Route)> {
        self.windowed()
            .into_iter()
            .map(|w| (w.detector.meta.id.clone(), route_of(w, &self.schema)))
            .collect()
    }

    /// The windowed detectors with their windows, in order (the indices window states name
    /// their members by).
    pub(super) fn windowed(&self) -> Vec<WindowedDetector<'_>> {
        self.detectors[self.per_event..]
            .iter()
            .filter_map(CompiledDetector::windowed)
            .collect()
    }
}

/// Runs `work` on every job, the even ones on this thread and the odd ones on a second
/// (window states are independent of each other), and returns the results of all, even jobs'
/// first.
fn on_two_threads<J: Send, R: Send>(jobs: Vec<J>, work: impl Fn(J) -> Vec<R> + Sync) -> Vec<R> {
    let (mine, theirs): (Vec<_>, Vec<_>) = jobs.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let work = &work;
    std::thread::scope(|scope| {
        let other = (!theirs.is_empty()).then(|| {
            std::thread::Builder::new()
                .name("rampart-windows".into())
                .spawn_scoped(scope, move || {
                    theirs
                        .into_iter()
                        .flat_map(|(_, job)| work(job))
                        .collect::<Vec<_>>()
                })
                .expect("the OS can start a thread")
        });
        let mut results: Vec<_> = mine.into_iter().flat_map(|(_, job)| work(job)).collect();
        if let Some(handle) = other {
            results.extend(handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        results
    })
}

/// How a scale-out deployment gets every row a window needs to one place: partitioned by one
/// column of `events` that the window's key includes (all the rows of a key then meet in one
/// state partition), or all to a single place when the key includes none (a platform-wide
/// count, a key computed from columns).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// By the value of this column of `events`.
    Column(String),
    /// Every row to one state partition.
    Single,
}

impl Route {
    /// Where the per-event detectors and the windows keyed by actor run.
    pub fn actor() -> Self {
        Self::Column(rampart_core::event::ACTOR.to_string())
    }

    /// Whether this is [`Route::actor`].
    pub fn is_actor(&self) -> bool {
        matches!(self, Self::Column(c) if c == rampart_core::event::ACTOR)
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Column(c) => write!(f, "by {c}"),
            Self::Single => f.write_str("single"),
        }
    }
}

/// A window's route: by actor when its key includes the actor, else by the first key that is
/// a column of `events`, else single.
pub(crate) fn route_of(w: WindowedDetector<'_>, schema: &rampart_core::EventSchema) -> Route {
    use datafusion::physical_expr::expressions::Column;
    let pre = &w.split.pre_schema;
    let names: Vec<&str> = w
        .split
        .keys
        .iter()
        .filter_map(|k| k.downcast_ref::<Column>())
        .map(|c| {
            let name = pre.field(c.index()).name().as_str();
            name.strip_prefix("events.").unwrap_or(name)
        })
        .collect();
    if names.contains(&rampart_core::event::ACTOR) {
        return Route::actor();
    }
    names
        .into_iter()
        .find(|n| schema.arrow().index_of(n).is_ok())
        .map_or(Route::Single, |n| Route::Column(n.to_string()))
}
