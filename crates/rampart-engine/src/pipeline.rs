//! A loaded pipeline: its validated config, its event schema, and the detectors that passed the
//! sandbox and planning. Detectors that were refused are kept as problems; the rest run.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use datafusion::arrow::array::{TimestampMicrosecondArray, UInt64Array};
use datafusion::arrow::compute::max;
use datafusion::arrow::record_batch::RecordBatch;
use rampart_core::{Decision, EventSchema, Problem};
use rampart_sql::{CompiledDetector, DetectorEngine, Shape, WindowSplit};

use crate::config::PipelineConfig;
use crate::decide::{DecisionMaker, Trigger};
use crate::decode::{Decoder, EventBatch};

/// Errors that stop a pipeline from loading at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `pipeline.toml` is missing or invalid.
    #[error("{}", problems_text(.0))]
    Config(Vec<Problem>),
    /// The SQL engine could not start.
    #[error(transparent)]
    Engine(#[from] rampart_sql::Error),
}

fn problems_text(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A pipeline ready to decode and evaluate events.
pub struct Pipeline {
    /// The pipeline directory.
    pub dir: PathBuf,
    /// Its validated configuration.
    pub config: PipelineConfig,
    /// The `events` table schema.
    pub schema: EventSchema,
    /// Detectors that loaded: per-event ones, then sliding-window ones, each in file-name order.
    pub detectors: Vec<CompiledDetector>,
    /// Detectors that were refused, with file, line and reason.
    pub problems: Vec<Problem>,
    engine: DetectorEngine,
    decisions: DecisionMaker,
    /// How many of `detectors` are per-event (the rest are sliding windows).
    per_event: usize,
    windows: Mutex<WindowState>,
}

/// What sliding-window detectors need between batches: per detector, the rows of its query
/// below the window (only those that passed its filters, only the columns it uses), the events
/// that produced them, and the newest event time seen (the horizon).
///
/// Each batch, a window detector's window part runs over its kept rows plus the batch's, and
/// the result rows whose event time became final are decided: times before the new horizon
/// that were not final before. Rows at the horizon itself wait, because events with the same
/// time may still arrive and belong to their frame (`RANGE ... CURRENT ROW` includes peers).
/// So for input in event-time order every row is decided once, with the value the same SQL
/// gives over the whole input. An event older than the horizon (out of order) is decided at
/// once against what was kept so far. Rows are dropped once older than the horizon minus the
/// longest window and the allowed lateness.
#[derive(Default)]
struct WindowState {
    kept: Vec<VecDeque<RecordBatch>>,
    /// Per detector: whether rows arrived, or rows wait at the horizon. Without either,
    /// rerunning its window cannot decide anything new, so it is skipped.
    dirty: Vec<bool>,
    triggers: BTreeMap<u64, Trigger>,
    horizon: Option<i64>,
}

/// What one batch produced.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// Decisions in input order (for one event, in detector order).
    pub decisions: Vec<Decision>,
    /// Detectors that failed on this batch at run time, with the error.
    pub errors: Vec<(String, String)>,
}

impl Pipeline {
    /// Loads `dir/pipeline.toml` and every `dir/detectors/*.sql`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
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
        for path in detector_files(&dir.join("detectors"), &mut problems) {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(Problem::in_file(&path, format!("cannot read: {e}")));
                    continue;
                }
            };
            match engine.compile(&path, &text) {
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
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            schema,
            detectors,
            problems,
            engine,
            decisions,
            per_event,
            windows: Mutex::new(WindowState::default()),
        })
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

    /// Runs every detector on one batch. Decisions come in input order (for one event, in
    /// detector order); sliding-window detectors may decide about events of earlier batches.
    pub fn evaluate(&self, events: &EventBatch) -> Evaluation {
        let mut out = Evaluation::default();
        let processed_at = rampart_core::time::now();
        let per_event = &self.detectors[..self.per_event];
        let results = self.engine.run(per_event, events.batch.clone());
        let mut decided = Vec::new();
        for (detector, result) in per_event.iter().zip(results) {
            match result {
                Ok(batches) => {
                    for b in &batches {
                        decided.extend(self.decisions.decide(detector, b, events, &processed_at));
                    }
                }
                Err(e) => out.errors.push((detector.meta.id.clone(), e.to_string())),
            }
        }
        if self.per_event < self.detectors.len() {
            self.evaluate_windows(Some(events), &processed_at, &mut decided, &mut out.errors);
        }
        out.decisions = in_input_order(decided);
        out
    }

    /// Ends the input: sliding-window rows still waiting at the horizon are final now. Call it
    /// once after the last batch; the window state starts afresh afterwards.
    pub fn finish(&self) -> Evaluation {
        let mut out = Evaluation::default();
        if self.per_event < self.detectors.len() {
            let processed_at = rampart_core::time::now();
            let mut decided = Vec::new();
            self.evaluate_windows(None, &processed_at, &mut decided, &mut out.errors);
            out.decisions = in_input_order(decided);
        }
        self.reset();
        out
    }

    /// Forgets the sliding-window state (retained events and horizon).
    pub fn reset(&self) {
        *self.windows.lock().unwrap_or_else(|p| p.into_inner()) = WindowState::default();
    }

    /// See [`WindowState`]. `events` is `None` at the end of the input.
    fn evaluate_windows(
        &self,
        events: Option<&EventBatch>,
        processed_at: &str,
        decided: &mut Vec<(u64, Decision)>,
        errors: &mut Vec<(String, String)>,
    ) {
        let windows = &self.detectors[self.per_event..];
        let mut guard = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        state.kept.resize_with(windows.len(), VecDeque::new);
        state.dirty.resize(windows.len(), false);
        let previous = state.horizon;
        let first_new_row = events.map_or(u64::MAX, |e| e.first_row);
        let horizon = match events {
            Some(e) => {
                for (k, detector) in windows.iter().enumerate() {
                    let Some(split) = detector.split() else { continue };
                    match self.engine.run_pre(split, e.batch.clone()) {
                        Ok(rows) => {
                            for batch in &rows {
                                let Some(ids) = column::<UInt64Array>(batch, split.row_index) else {
                                    continue;
                                };
                                for row in ids.values().iter() {
                                    if let Some(i) = e.index_of(*row) {
                                        state.triggers.entry(*row).or_insert_with(|| Trigger::of(e, i));
                                    }
                                }
                            }
                            state.dirty[k] |= rows.iter().any(|b| b.num_rows() > 0);
                            state.kept[k].extend(rows);
                        }
                        Err(err) => errors.push((detector.meta.id.clone(), err.to_string())),
                    }
                }
                let newest = column::<TimestampMicrosecondArray>(&e.batch, 0).and_then(max);
                match (previous, newest) {
                    (Some(p), Some(n)) => p.max(n),
                    (Some(p), None) => p,
                    (None, Some(n)) => n,
                    (None, None) => return,
                }
            }
            None => i64::MAX,
        };
        for (k, detector) in windows.iter().enumerate() {
            let Some(split) = detector.split() else { continue };
            if !state.dirty[k] {
                continue;
            }
            // Rows at the horizon wait for later events; until then this detector stays due.
            state.dirty[k] = state.kept[k]
                .iter()
                .any(|b| newest_kept(b, split).is_some_and(|t| t >= horizon));
            let results = match self.engine.run_post(split, state.kept[k].make_contiguous()) {
                Ok(r) => r,
                Err(err) => {
                    errors.push((detector.meta.id.clone(), err.to_string()));
                    continue;
                }
            };
            for result in &results {
                let Some(row_ids) = DecisionMaker::row_ids(detector, result) else {
                    continue;
                };
                for r in 0..result.num_rows() {
                    let row = row_ids.value(r);
                    let Some(trigger) = state.triggers.get(&row) else {
                        continue;
                    };
                    let newly_final = row >= first_new_row || previous.is_none_or(|p| trigger.time >= p);
                    if trigger.time < horizon && newly_final {
                        decided.push((
                            row,
                            self.decisions
                                .decide_row(detector, result, r, trigger, processed_at),
                        ));
                    }
                }
            }
        }
        if events.is_some() {
            state.horizon = Some(horizon);
            let oldest_needed = horizon.saturating_sub(self.window_reach().as_micros() as i64);
            for (k, detector) in windows.iter().enumerate() {
                let Some(split) = detector.split() else { continue };
                let kept = &mut state.kept[k];
                while kept
                    .front()
                    .is_some_and(|b| newest_kept(b, split).is_none_or(|t| t < oldest_needed))
                {
                    kept.pop_front();
                }
            }
            state.triggers.retain(|_, t| t.time >= oldest_needed);
        }
    }

    /// How far back in event time a window detector may still look: the longest window plus the
    /// allowed lateness.
    fn window_reach(&self) -> Duration {
        let longest = self.detectors[self.per_event..]
            .iter()
            .filter_map(|d| match &d.shape {
                Shape::SlidingWindow { windows } => windows.iter().map(|w| w.length).max(),
                _ => None,
            })
            .max()
            .unwrap_or_default();
        longest + self.config.allowed_lateness
    }

    /// How many detector plans were built since load (one per loaded detector: plans are never
    /// rebuilt per batch).
    pub fn plans_built(&self) -> usize {
        self.engine.plans_built()
    }
}

/// Decisions sorted by the row id of their triggering event; for one event, detector order
/// (the sort is stable).
fn in_input_order(mut decided: Vec<(u64, Decision)>) -> Vec<Decision> {
    decided.sort_by_key(|(row, _)| *row);
    decided.into_iter().map(|(_, d)| d).collect()
}

/// The newest event time among rows kept for a window detector.
fn newest_kept(batch: &RecordBatch, split: &WindowSplit) -> Option<i64> {
    column::<TimestampMicrosecondArray>(batch, split.time_index).and_then(max)
}

fn column<T: 'static>(batch: &RecordBatch, index: usize) -> Option<&T> {
    batch.columns().get(index)?.as_any().downcast_ref::<T>()
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
    use crate::replay::replay_collect;

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

    const WINDOW_DETECTORS: [(&str, &str); 4] = [
        (
            "failures",
            "SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time \
             RANGE BETWEEN INTERVAL '15 minutes' PRECEDING AND CURRENT ROW) AS n \
             FROM events WHERE outcome = 'Failure') WHERE n >= 5",
        ),
        (
            "spread",
            "SELECT origin, actor, d FROM (SELECT origin, actor, count(DISTINCT action) OVER (PARTITION BY origin \
             ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS d FROM events) \
             WHERE d >= 4",
        ),
        (
            "volume",
            "SELECT actor, origin, action FROM events \
             QUALIFY sum(json_get_int(raw, 'bytes')) OVER (PARTITION BY actor, origin ORDER BY event_time \
             RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) > 40000",
        ),
        (
            "range",
            "SELECT actor, hi - lo AS spread, m FROM (SELECT actor, \
             max(json_get_int(raw, 'bytes')) OVER w AS hi, min(json_get_int(raw, 'bytes')) OVER w AS lo, \
             avg(json_get_int(raw, 'bytes')) OVER w AS m FROM events \
             WINDOW w AS (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW)) \
             WHERE hi - lo > 9000",
        ),
    ];

    /// A pipeline of sliding-window detectors over a simple event shape.
    fn window_pipeline(dir: &Path) -> PathBuf {
        let p = dir.join("windows");
        std::fs::create_dir_all(p.join("detectors")).expect("mkdir");
        std::fs::write(
            p.join("pipeline.toml"),
            "name = \"windows\"\n[mapping]\nevent_time = \"t\"\nactor = \"a\"\naction = \"x\"\norigin = \"ip\"\noutcome = \"o\"\n",
        )
        .expect("write");
        for (id, sql) in WINDOW_DETECTORS {
            let text = format!(
                "-- id: {id}\n-- verdict: alert\n-- severity: low\n-- reason: {{{{actor}}}}\n{sql}\n"
            );
            std::fs::write(p.join("detectors").join(format!("{id}.sql")), text).expect("write");
        }
        p
    }

    /// Events in event-time order: skewed actors, bursts of failures, many events per second
    /// (ties), events exactly one window length apart.
    fn generated_events(n: usize, seed: u64) -> String {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        let mut t: i64 = 1_722_470_400; // 2024-08-01T00:00:00Z
        let mut out = String::new();
        for i in 0..n {
            // Mostly several events per second; sometimes exactly 5, 10 or 15 minutes later.
            t += match next() % 50 {
                0 => 900,
                1 => 600,
                2 => 300,
                k if k < 30 => 0,
                _ => 1,
            };
            let actor = ((next() % 1000) as f64).sqrt() as u64 % 12;
            let burst = (i / 40) % 7 == 3;
            let outcome = if burst || next() % 5 == 0 {
                "Failure"
            } else {
                "Success"
            };
            let action = ["Get", "List", "Put", "Delete", "Describe"][(next() % 5) as usize];
            let ip = format!("10.0.0.{}", next() % 6);
            let bytes = next() % 10_000;
            let time = rampart_core::time::format_micros(t * 1_000_000);
            out.push_str(&format!(
                "{{\"t\":\"{time}\",\"a\":\"user-{actor}\",\"x\":\"{action}\",\"ip\":\"{ip}\",\"o\":\"{outcome}\",\"bytes\":{bytes}}}\n"
            ));
        }
        out
    }

    /// (detector, line, evidence) of every decision.
    fn rows_of(decisions: &[Decision]) -> Vec<(String, u64, String)> {
        let mut rows: Vec<_> = decisions
            .iter()
            .map(|d| {
                let rampart_core::SourcePosition::File { line, .. } = &d.source else {
                    panic!("file position")
                };
                (
                    d.detector.id.clone(),
                    *line,
                    serde_json::to_string(&d.evidence).expect("json"),
                )
            })
            .collect();
        rows.sort();
        rows
    }

    /// The same SQL run once over the whole input, as an analyst would in batch.
    fn batch_rows(pipeline: &Pipeline, input: &Path) -> Vec<(String, u64, String)> {
        let mut decoder = pipeline.decoder();
        let mut batches = Vec::new();
        let mut emit = |d: crate::decode::Decoded| {
            if let crate::decode::Decoded::Batch(b) = d {
                batches.push(b);
            }
        };
        decoder.decode_file(input, &mut emit).expect("decodes");
        decoder.flush(&mut emit);
        let all: Vec<_> = batches.iter().map(|b| b.batch.clone()).collect();
        let mut decisions = Vec::new();
        for detector in &pipeline.detectors {
            for result in pipeline
                .engine
                .run_over(detector, all.clone())
                .expect("batch query runs")
            {
                let ids = DecisionMaker::row_ids(detector, &result).expect("row ids");
                for r in 0..result.num_rows() {
                    let row = ids.value(r);
                    let batch = batches.iter().find(|b| b.index_of(row).is_some()).expect("row");
                    let trigger = Trigger::of(batch, batch.index_of(row).expect("row"));
                    decisions.push(
                        pipeline
                            .decisions
                            .decide_row(detector, &result, r, &trigger, "now"),
                    );
                }
            }
        }
        rows_of(&decisions)
    }

    #[test]
    fn sliding_windows_stream_to_the_same_rows_as_one_batch_query() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = window_pipeline(tmp.path());
        let input = tmp.path().join("events.jsonl");
        std::fs::write(&input, generated_events(6000, 7)).expect("write");
        let mut expected = None;
        for batch_size in [4096, 500, 37, 3] {
            let toml = std::fs::read_to_string(dir.join("pipeline.toml")).expect("read");
            let toml = format!(
                "{}[source]\nbatch_size = {batch_size}\n",
                toml.split("[source]").next().unwrap_or_default()
            );
            std::fs::write(dir.join("pipeline.toml"), toml).expect("write");
            let pipeline = Pipeline::load(&dir).expect("loads");
            assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
            assert_eq!(pipeline.detectors.len(), 4);
            let want = expected
                .get_or_insert_with(|| batch_rows(&pipeline, &input))
                .clone();
            for (id, _) in WINDOW_DETECTORS {
                assert!(
                    want.iter().filter(|r| r.0 == id).count() > 20,
                    "{id} fires often enough to be a test"
                );
            }
            let (out, _) = replay_collect(&pipeline, &[input.as_path()]).expect("replays");
            let got = rows_of(&out.decisions);
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(3).collect();
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).take(3).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "batch size {batch_size}: missing {missing:?}, extra {extra:?}"
            );
            assert_eq!(got.len(), want.len());
        }
    }

    #[test]
    fn plans_are_built_once_per_detector_however_many_batches_run() {
        let tmp = tempfile::tempdir().expect("tmp");
        let logs = repo().join("data/cloudtrail/stratus-detonation-logs");
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
            let mut ids: Vec<String> = out.decisions.iter().map(|d| d.decision_id.clone()).collect();
            ids.sort();
            ids_by_batch_size.push(ids);
        }
        assert_eq!(ids_by_batch_size[0].len(), 23);
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
