//! The equivalence contract, tested: for input in event-time order, the rows a windowed
//! detector emits while streaming, batch by batch, are the rows the same SQL returns when run
//! once over the whole input (DataFusion, the detector's unsplit plan). Generated logs (skewed
//! actors, bursts across thresholds, ties, gaps of exactly one window) and the real CloudTrail
//! logs, for every supported shape; plus restart/resume, late events and the naive evaluator.
//!
//! `RAMPART_DIFF_EVENTS=1000000 cargo test --release --workspace --lib differential` runs the
//! large comparison on a million events (CI runs it on fewer).

use std::path::{Path, PathBuf};

use rampart_core::{Decision, SourcePosition};

use crate::decide::Trigger;
use crate::drivers::replay::replay_collect;
use crate::input::decode::Decoded;
use crate::pipeline::{Evaluator, Pipeline, StateChoice};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The detectors the harness checks, as files (`differential/detectors/*.sql`): sliding windows
/// of every supported aggregate and key shape (`filtered`: aggregates with FILTER (WHERE ...);
/// `sequence-case`: CASE inside sum and max, the time of the last failure before a delete;
/// frames that look ahead: `absence`, a delete with no put within 5 minutes after it, `around`,
/// failures from a minute before to 15 minutes after, `next-delete`, the time of the first
/// delete within 2 minutes after a failed read), and grouped windows (whose ids start with `g-`:
/// they select only their group key, because a streaming group fires with the values at the
/// moment HAVING first holds while the batch query reports the bucket's final values).
///
/// `failures-many` and `spread-wide` have the same windows as `failures` and `spread` with other
/// thresholds and names; `failures-longer` and `spread-short` keep the same rows with longer
/// and shorter frames: each three share one window state.
fn detector_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/windows/differential/detectors");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("the differential detectors")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 19, "the differential detectors in {}", dir.display());
    files
}

/// The ids of the differential detectors (their file names).
fn detector_ids() -> Vec<String> {
    detector_files()
        .iter()
        .map(|p| p.file_stem().expect("name").to_string_lossy().into_owned())
        .collect()
}

/// A pipeline of the detectors above over a simple event shape.
fn window_pipeline(dir: &Path, batch_size: usize, lateness: &str) -> PathBuf {
    window_pipeline_with(dir, batch_size, lateness, None)
}

/// [`window_pipeline`] with a window state cache of `cache_mb` (0: every batch checkpoints
/// and evicts every key, so keys come back from disk each time).
fn window_pipeline_with(dir: &Path, batch_size: usize, lateness: &str, cache_mb: Option<usize>) -> PathBuf {
    let p = dir.join(format!("windows-{batch_size}"));
    let cache = cache_mb
        .map(|mb| format!("cache_mb = {mb}\n"))
        .unwrap_or_default();
    std::fs::create_dir_all(p.join("detectors")).expect("mkdir");
    std::fs::write(
        p.join("pipeline.toml"),
        format!(
            "name = \"windows\"\n[source]\nbatch_size = {batch_size}\n[mapping]\nevent_time = \"t\"\n\
             actor = \"a\"\naction = \"x\"\norigin = \"ip\"\noutcome = \"o\"\n[state]\nallowed_lateness = \"{lateness}\"\n{cache}"
        ),
    )
    .expect("write");
    for file in detector_files() {
        std::fs::copy(&file, p.join("detectors").join(file.file_name().expect("name"))).expect("copy");
    }
    p
}

/// Events in event-time order: actors skewed towards a few busy ones (more actors for longer
/// logs), bursts of failures, many events per second (ties), gaps of exactly 2, 5, 10 or 15
/// minutes (window boundaries).
fn generated_events(n: usize, seed: u64) -> String {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let actors = (n / 400).max(12) as f64;
    let mut t: i64 = 1_722_470_400; // 2024-08-01T00:00:00Z
    let mut out = String::with_capacity(n * 120);
    // Every 500 events an "edge" actor starts failing: 4 failures, then a 5th exactly 15
    // minutes after the first (inside `failures`' frame: RANGE includes its start), and a 6th
    // 15 minutes and 1 second after the second one (the first has just left).
    let mut edge: Option<(i64, u64, usize)> = None;
    for i in 0..n {
        let mut step = match next() % 60 {
            0 => 900,
            1 => 600,
            2 => 300,
            3 => 120,
            k if k < 35 => 0,
            _ => 1,
        };
        let mut edge_event = None;
        if i % 500 == 250 && edge.is_none() {
            edge = Some((t + step, i as u64, 0));
        }
        if let Some((start, id, done)) = edge {
            let due = match done {
                0..=3 => Some(start + 60 * done as i64),
                4 => Some(start + 900),
                5 => Some(start + 60 + 901),
                _ => None,
            };
            match due {
                Some(due) if t + step >= due => {
                    step = due - t;
                    edge_event = Some(id);
                    edge = Some((start, id, done + 1));
                }
                Some(_) => {}
                None => edge = None,
            }
        }
        t += step.max(0);
        let u = (next() % 1_000_000) as f64 / 1_000_000.0;
        let actor = match edge_event {
            Some(id) => format!("edge-{id}"),
            None => format!("user-{}", (actors * u * u * u) as u64),
        };
        let burst = (i / 40) % 7 == 3;
        let outcome = if edge_event.is_some() || burst || next() % 5 == 0 {
            "Failure"
        } else {
            "Success"
        };
        let action = ["Get", "List", "Put", "Delete", "Describe"][(next() % 5) as usize];
        let ip = format!("10.0.{}.{}", actor.len() % 3, next() % 6);
        let bytes = next() % 10_000;
        let team = ["red", "blue", "green"][(next() % 3) as usize];
        let time = rampart_core::time::format_micros(t * 1_000_000);
        out.push_str(&format!(
            "{{\"t\":\"{time}\",\"a\":\"{actor}\",\"x\":\"{action}\",\"ip\":\"{ip}\",\"o\":\"{outcome}\",\"bytes\":{bytes},\"team\":\"{team}\"}}\n"
        ));
    }
    out
}

type Row = (String, u64, String);

/// The first few rows only in `want` and only in `got` (as multisets; both sorted).
fn differences<T: Ord + Clone>(want: &[T], got: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut i, mut j) = (0, 0);
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    while (i < want.len() || j < got.len()) && missing.len() + extra.len() < 6 {
        match (want.get(i), got.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                missing.push(a.clone());
                i += 1;
            }
            (Some(_), Some(b)) | (None, Some(b)) => {
                extra.push(b.clone());
                j += 1;
            }
            (Some(a), None) => {
                missing.push(a.clone());
                i += 1;
            }
            (None, None) => break,
        }
    }
    (missing, extra)
}

/// (detector, line, evidence) of every decision; grouped windows by (detector, evidence).
fn rows_of(decisions: &[Decision]) -> Vec<Row> {
    let mut rows: Vec<_> = decisions
        .iter()
        .map(|d| {
            let line = match &d.source {
                SourcePosition::File { line, .. } if !d.detector.id.starts_with("g-") => *line,
                _ => 0,
            };
            (
                d.detector.id.clone(),
                line,
                serde_json::to_string(&d.evidence).expect("json"),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// Every windowed detector's whole SQL run once over the whole input, as an analyst would.
fn batch_rows(pipeline: &Pipeline, input: &Path) -> Vec<Row> {
    let mut decoder = pipeline.decoder();
    let mut batches = Vec::new();
    let mut emit = |d: Decoded| {
        if let Decoded::Batch(b) = d {
            batches.push(b);
        }
    };
    decoder.decode_file(input, &mut emit).expect("decodes");
    decoder.flush(&mut emit);
    let all: Vec<_> = batches.iter().map(|b| b.batch.clone()).collect();
    let mut decisions = Vec::new();
    for detector in pipeline.detectors.iter().filter(|d| d.split().is_some()) {
        for result in pipeline
            .engine()
            .run_over(detector, all.clone())
            .expect("batch query runs")
        {
            let ids = crate::decide::DecisionMaker::row_ids(detector, &result).expect("row ids");
            for r in 0..result.num_rows() {
                let row = ids.value(r);
                let batch = batches.iter().find(|b| b.index_of(row).is_some()).expect("row");
                let trigger = Trigger::of(batch, batch.index_of(row).expect("row"));
                decisions.push(
                    pipeline
                        .decision_maker()
                        .decide_row(detector, &result, r, &trigger, "now"),
                );
            }
        }
    }
    rows_of(&decisions)
}

/// Streams `input` through the pipeline at each batch size and compares with one batch query.
fn assert_stream_equals_batch(dir: &Path, input: &Path, batch_sizes: &[usize], min_rows: usize) {
    assert_stream_equals_batch_with(dir, input, batch_sizes, min_rows, ("0s", None))
}

fn assert_stream_equals_batch_with(
    dir: &Path,
    input: &Path,
    batch_sizes: &[usize],
    min_rows: usize,
    (lateness, cache_mb): (&str, Option<usize>),
) {
    let mut expected: Option<Vec<Row>> = None;
    for &batch_size in batch_sizes {
        let pipeline =
            Pipeline::load(&window_pipeline_with(dir, batch_size, lateness, cache_mb)).expect("loads");
        pipeline.set_guarded(false);
        if expected.is_none() {
            // The planted edge cases: a 5th failure exactly one window after the first fires.
            let text = std::fs::read_to_string(input).expect("read");
            assert!(text.contains("edge-"), "the log has edge actors");
        }
        assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
        assert_eq!(pipeline.detectors.len(), detector_ids().len());
        let incremental: Vec<&str> = pipeline
            .detectors
            .iter()
            .filter(|d| d.split().is_some_and(|s| s.incremental().is_some()))
            .map(|d| d.meta.id.as_str())
            .collect();
        assert_eq!(
            incremental,
            [
                "absence",
                "around",
                "by-json-key",
                "failures-longer",
                "failures-many",
                "failures-or-delete",
                "failures",
                "filtered",
                "range",
                "spread-short",
                "spread-wide",
                "spread",
                "volume"
            ],
            "every single sliding window is maintained incrementally (sequence-case's max and \
             next-delete's min of a timestamp are re-run over their key's rows)"
        );
        let want = expected
            .get_or_insert_with(|| batch_rows(&pipeline, input))
            .clone();
        for id in detector_ids() {
            let n = want.iter().filter(|r| r.0 == id).count();
            assert!(n >= min_rows, "{id} fires {n} times: too rarely to be a test");
        }
        assert!(
            want.iter()
                .any(|r| r.0 == "failures" && r.2.contains("edge-") && r.2.contains("\"n\":5")),
            "an edge actor's 5th failure, exactly 15 minutes after its 1st, fires"
        );
        let (out, summary) = replay_collect(&pipeline, &[input]).expect("replays");
        assert_eq!(
            summary.late_records, 0,
            "input in event-time order has no late events"
        );
        let got = rows_of(&out.decisions);
        let (missing, extra) = differences(&want, &got);
        assert!(
            missing.is_empty() && extra.is_empty(),
            "batch size {batch_size}: missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(
            got.len(),
            want.len(),
            "batch size {batch_size}: same number of rows"
        );
    }
}

#[test]
fn windows_stream_to_the_same_rows_as_one_batch_query() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("events.jsonl");
    std::fs::write(&input, generated_events(6000, 7)).expect("write");
    assert_stream_equals_batch(tmp.path(), &input, &[4096, 500, 37, 3], 5);
}

/// Detectors whose windows keep the same rows (rows, key, aggregates' functions and
/// arguments; frames of any length) keep one state between them; the differential tests above
/// check that each still decides its own rows, with its own frame.
#[test]
fn detectors_whose_windows_keep_the_same_rows_share_a_state() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pipeline = Pipeline::load(&window_pipeline(tmp.path(), 4096, "0s")).expect("loads");
    assert_eq!(
        pipeline.shared_window_states(),
        vec![
            // (In file name order: `-` sorts before `.`.)
            vec![
                "failures-longer".to_string(),
                "failures-many".to_string(),
                "failures".to_string()
            ],
            vec![
                "spread-short".to_string(),
                "spread-wide".to_string(),
                "spread".to_string()
            ],
        ]
    );
}

/// With no cache, every batch writes its keys' new rows as chunks and drops every key from
/// memory: each batch reads its keys back from disk (with the rows still waiting for the
/// allowed lateness; busy keys rewrite their chunks as one), and still decides what the batch
/// query returns.
#[test]
fn windows_read_back_from_disk_every_batch_decide_the_same_rows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("events.jsonl");
    std::fs::write(&input, generated_events(6000, 5)).expect("write");
    assert_stream_equals_batch_with(tmp.path(), &input, &[61], 5, ("2m", Some(0)));
}

/// `RAMPART_DIFF_EVENTS` events (default 50 000; the documented full run uses 1 000 000).
#[test]
fn differential_on_a_large_generated_log() {
    let n = std::env::var("RAMPART_DIFF_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("events.jsonl");
    std::fs::write(&input, generated_events(n, 11)).expect("write");
    assert_stream_equals_batch(tmp.path(), &input, &[4096, 999], 20);
}

/// Every CloudTrail record of the real logs in `data/`, sorted by event time, through the
/// cloudtrail pipeline's windowed detectors.
#[test]
fn differential_on_the_real_cloudtrail_logs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = repo().join("pipelines/cloudtrail");
    let pipeline = Pipeline::load(&dir).expect("loads");
    pipeline.set_guarded(false);
    let windowed = pipeline.detectors.iter().filter(|d| d.split().is_some()).count();
    assert!(
        windowed >= 6,
        "the cloudtrail pipeline has its threshold detectors"
    );
    let mut records: Vec<(i64, String)> = Vec::new();
    let mut decoder = pipeline.decoder();
    let mut emit = |d: Decoded| {
        if let Decoded::Batch(b) = d {
            for i in 0..b.batch.num_rows() {
                records.push((b.event_time(i), b.raw(i).to_string()));
            }
        }
    };
    for file in
        crate::drivers::replay::expand_inputs(&[repo().join("data/cloudtrail/stratus-detonation-logs")])
            .expect("inputs")
    {
        decoder.decode_file(&file, &mut emit).expect("decodes");
    }
    decoder.flush(&mut emit);
    assert_eq!(records.len(), 310, "every record of the detonation logs");
    records.sort_by_key(|(t, _)| *t);
    let input = tmp.path().join("sorted.jsonl");
    // One record per line (the files are pretty-printed).
    let text: String = records
        .iter()
        .map(|(_, raw)| {
            let value: serde_json::Value = serde_json::from_str(raw).expect("raw is JSON");
            format!("{value}\n")
        })
        .collect();
    std::fs::write(&input, text).expect("write");
    let want = batch_rows(&pipeline, &input);
    assert!(want.len() >= 5, "the detonations cross some thresholds: {want:?}");
    let (out, _) = replay_collect(&pipeline, &[input.as_path()]).expect("replays");
    let windowed_ids: Vec<&str> = pipeline
        .detectors
        .iter()
        .filter(|d| d.split().is_some())
        .map(|d| d.meta.id.as_str())
        .collect();
    let got: Vec<Row> = rows_of(&out.decisions)
        .into_iter()
        .filter(|r| windowed_ids.contains(&r.0.as_str()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn the_naive_evaluator_decides_the_same_sliding_rows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("events.jsonl");
    std::fs::write(&input, generated_events(3000, 5)).expect("write");
    let dir = window_pipeline(tmp.path(), 256, "0s");
    let keyed = Pipeline::load(&dir).expect("loads");
    let naive = Pipeline::load_with(&dir, StateChoice::Temporary, Evaluator::Naive).expect("loads");
    keyed.set_guarded(false);
    naive.set_guarded(false);
    assert_eq!(
        naive.problems.len(),
        3,
        "grouped windows are refused by the naive evaluator"
    );
    let sliding = |p: &Pipeline| {
        let (out, _) = replay_collect(p, &[input.as_path()]).expect("replays");
        rows_of(&out.decisions)
            .into_iter()
            .filter(|r| !r.0.starts_with("g-"))
            .collect::<Vec<_>>()
    };
    let want = sliding(&keyed);
    assert!(want.len() > 50);
    assert_eq!(sliding(&naive), want);
}

/// What a decision says, without where its input file was: (detector, line if wanted, event
/// time, evidence).
fn content(decisions: &[Decision], with_line: bool) -> Vec<(String, u64, String, String)> {
    let mut v: Vec<_> = decisions
        .iter()
        .map(|d| {
            let line = match &d.source {
                SourcePosition::File { line, .. } if with_line => *line,
                _ => 0,
            };
            (
                d.detector.id.clone(),
                line,
                d.event_time.clone(),
                serde_json::to_string(&d.evidence).expect("json"),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_replay_stopped_and_resumed_decides_what_an_uninterrupted_one_does() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = window_pipeline(tmp.path(), 97, "30s");
    let run = |state: &str, inputs: &[&Path]| {
        let pipeline = Pipeline::load_with(
            &dir,
            StateChoice::Persistent(tmp.path().join(state)),
            Evaluator::Keyed,
        )
        .expect("loads");
        replay_collect(&pipeline, inputs).expect("replays")
    };
    let text = generated_events(5000, 3);
    let lines: Vec<&str> = text.lines().collect();
    let whole = tmp.path().join("whole.jsonl");
    std::fs::write(&whole, &text).expect("write");
    let (uninterrupted, _) = run("state-whole", &[whole.as_path()]);
    let want = content(&uninterrupted.decisions, true);
    assert!(want.len() > 100);
    for (k, cut) in [1, 1234, 2500, 4999].into_iter().enumerate() {
        // The same file, stopped after `cut` records and run again once it has grown: the
        // second run skips what the first consumed.
        let growing = tmp.path().join(format!("growing-{k}.jsonl"));
        std::fs::write(&growing, lines[..cut].join("\n") + "\n").expect("write");
        let state = format!("state-{k}");
        let (first, _) = run(&state, &[growing.as_path()]);
        std::fs::write(&growing, &text).expect("write");
        let (second, summary) = run(&state, &[growing.as_path()]);
        assert_eq!(
            summary.resumed_after, cut as u64,
            "skips what the first run consumed"
        );
        assert_eq!(summary.events, (5000 - cut) as u64);
        let mut got = first.decisions;
        got.extend(second.decisions);
        let got = content(&got, true);
        let (missing, extra) = differences(&want, &got);
        assert!(
            missing.is_empty() && extra.is_empty(),
            "stopped after {cut} records: missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(got, want, "stopped after {cut} records");
    }
    // Resumed with the rest of the input in another file: the same decisions.
    let first = tmp.path().join("first.jsonl");
    let rest = tmp.path().join("rest.jsonl");
    std::fs::write(&first, lines[..2000].join("\n") + "\n").expect("write");
    std::fs::write(&rest, lines[2000..].join("\n") + "\n").expect("write");
    let (a, _) = run("state-split", &[first.as_path()]);
    let (b, _) = run("state-split", &[rest.as_path()]);
    let mut split = a.decisions;
    split.extend(b.decisions);
    assert_eq!(content(&split, false), content(&uninterrupted.decisions, false));
}

/// A detector whose window keeps the rows another's keeps, with a longer frame, added when a
/// replay resumes: it joins that state. The detector already there keeps its rows (it decides
/// what an uninterrupted run decides), and the new one counts the rows the state kept before
/// it came (those of the old frame and the lateness).
#[test]
fn a_detector_with_another_frame_added_on_resuming_joins_the_state_of_its_rows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = window_pipeline(tmp.path(), 97, "30s");
    let detectors = dir.join("detectors");
    let longer = std::fs::read(detectors.join("failures-longer.sql")).expect("read");
    for entry in std::fs::read_dir(&detectors).expect("dir") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|n| n != "failures.sql") {
            std::fs::remove_file(path).expect("remove");
        }
    }
    let run = |state: &str, events: &[(&str, i64)]| {
        let input = tmp.path().join(format!("{state}-{}.jsonl", events.len()));
        let text: String = events
            .iter()
            .map(|(actor, minute)| {
                let time = rampart_core::time::format_micros((1_767_225_600 + minute * 60) * 1_000_000);
                format!("{{\"t\":\"{time}\",\"a\":\"{actor}\",\"x\":\"Get\",\"ip\":\"10.0.0.1\",\"o\":\"Failure\"}}\n")
            })
            .collect();
        std::fs::write(&input, text).expect("write");
        let pipeline = Pipeline::load_with(
            &dir,
            StateChoice::Persistent(tmp.path().join(state)),
            Evaluator::Keyed,
        )
        .expect("loads");
        pipeline.set_guarded(false);
        let decisions = replay_collect(&pipeline, &[input.as_path()])
            .expect("replays")
            .0
            .decisions;
        decisions
            .iter()
            .map(|d| {
                (
                    d.detector.id.clone(),
                    d.event_time.clone(),
                    d.evidence["n"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    // Alice fails at minutes 0 to 4; the pipeline restarts with `failures-longer` (20 minutes,
    // at least 6) added; she fails again at minute 16. (Bob's failures complete minutes 4 and
    // 16: input that may grow is decided as far as a later time has come.)
    let before = [
        ("alice", 0),
        ("alice", 1),
        ("alice", 2),
        ("alice", 3),
        ("alice", 4),
        ("bob", 5),
    ];
    let after = [("alice", 16), ("bob", 17)];
    let first = run("state", &before);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!((first[0].0.as_str(), first[0].2.clone()), ("failures", 5.into()));
    std::fs::write(detectors.join("failures-longer.sql"), &longer).expect("write");
    let mut second = run("state", &after);
    second.sort_by(|a, b| a.0.cmp(&b.0));
    let at_16 = rampart_core::time::format_micros((1_767_225_600 + 16 * 60) * 1_000_000);
    assert_eq!(
        second,
        [
            // Minutes 1 to 4 and 16: the state kept its rows.
            ("failures".to_string(), at_16.clone(), 5.into()),
            // Minutes 0 to 4 and 16: it counts the rows kept before it came.
            ("failures-longer".to_string(), at_16, 6.into()),
        ]
    );
}

#[test]
fn late_events_are_dead_letters_that_windows_do_not_count() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = window_pipeline(tmp.path(), 2, "1m");
    let input = tmp.path().join("late.jsonl");
    let event = |t: &str, a: &str| {
        format!(
            "{{\"t\":\"2024-08-01T{t}Z\",\"a\":\"{a}\",\"x\":\"Get\",\"ip\":\"10.0.0.1\",\"o\":\"Failure\",\"bytes\":1}}\n"
        )
    };
    // Four failures for alice; a fifth 3 minutes in the past is late (lateness 1m), one 30 s
    // in the past is not: it makes the fifth and fires.
    let text = [
        event("10:00:00", "alice"),
        event("10:01:00", "alice"),
        event("10:02:00", "alice"),
        event("10:05:00", "alice"),
        event("10:02:00", "alice"),
        event("10:04:30", "alice"),
        event("10:06:00", "bob"),
    ]
    .concat();
    std::fs::write(&input, text).expect("write");
    let pipeline = Pipeline::load(&dir).expect("loads");
    pipeline.set_guarded(false);
    let (out, summary) = replay_collect(&pipeline, &[input.as_path()]).expect("replays");
    assert_eq!(summary.late_records, 1);
    assert_eq!(out.dead_letters.len(), 1);
    let letter = &out.dead_letters[0];
    assert_eq!(letter.kind, crate::input::decode::DeadLetterKind::Late);
    assert!(letter.source.to_string().ends_with(":5"), "{}", letter.source);
    assert!(letter.error.contains("allowed lateness (1m)"), "{}", letter.error);
    let failures: Vec<_> = out
        .decisions
        .iter()
        .filter(|d| d.detector.id == "failures")
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].evidence["n"], 5);
    // The row at 10:05 (line 4) is decided once 10:06 arrives, and its frame counts the
    // out-of-order 10:04:30 event (line 6), which arrived within the lateness.
    assert!(
        failures[0].source.to_string().ends_with(":4"),
        "{}",
        failures[0].source
    );
}

/// Events out of event-time order within the allowed lateness (each up to a minute behind the
/// newest, lateness 2 minutes): the rows that fire are exactly the batch query's, and a row
/// decided at the watermark has the batch values (one that fired at once may have missed a
/// straggler that arrived after it: its evidence is what was known then).
#[test]
fn out_of_order_within_the_lateness_fires_exactly_the_batch_rows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let text = generated_events(6000, 13);
    // Each event is delayed by a pseudo-random 0..60 s and the log sorted by arrival.
    let mut lines: Vec<(i64, usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let t = line
                .split("\"t\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("time");
            let t = humantime::parse_rfc3339(t)
                .expect("rfc3339")
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs() as i64;
            let delay = (i as i64).wrapping_mul(2_654_435_761) % 61;
            (t + delay, i, line)
        })
        .collect();
    lines.sort();
    let shuffled: String = lines.iter().map(|(_, _, l)| format!("{l}\n")).collect();
    let input = tmp.path().join("shuffled.jsonl");
    std::fs::write(&input, &shuffled).expect("write");
    for batch_size in [4096, 97] {
        let pipeline = Pipeline::load(&window_pipeline(tmp.path(), batch_size, "2m")).expect("loads");
        pipeline.set_guarded(false);
        let want = batch_rows(&pipeline, &input);
        let (out, summary) = replay_collect(&pipeline, &[input.as_path()]).expect("replays");
        assert_eq!(summary.late_records, 0, "every event is within the lateness");
        let got = rows_of(&out.decisions);
        let fired = |rows: &[Row]| {
            let mut v: Vec<(String, u64)> = rows.iter().map(|r| (r.0.clone(), r.1)).collect();
            v.sort();
            v
        };
        let (missing, extra) = differences(&fired(&want), &fired(&got));
        assert!(
            missing.is_empty() && extra.is_empty(),
            "batch size {batch_size}: missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(fired(&got), fired(&want));
        assert!(want.len() > 100, "enough rows fire to be a test: {}", want.len());
        // Detectors deciding at the watermark (the non-monotone ones) see the batch values.
        for id in ["range", "volume", "nested"] {
            let of = |rows: &[Row]| rows.iter().filter(|r| r.0 == id).cloned().collect::<Vec<_>>();
            assert_eq!(of(&got), of(&want), "{id} decides at the watermark: batch values");
        }
    }
}

/// The detectors' timing as `rampart check` reports it: thresholds that only become true
/// decide at once, others after the lateness.
#[test]
fn threshold_windows_decide_at_once_others_after_the_lateness() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pipeline = Pipeline::load(&window_pipeline(tmp.path(), 64, "2m")).expect("loads");
    let timing: Vec<(&str, bool)> = pipeline
        .detectors
        .iter()
        .filter_map(|d| {
            Some((
                d.meta.id.as_str(),
                d.split()?.timing == rampart_sql::Timing::AtOnce,
            ))
        })
        .collect();
    assert_eq!(
        timing,
        [
            ("absence", false),
            ("around", false),
            ("by-json-key", true),
            ("failures-longer", true),
            ("failures-many", true),
            ("failures-or-delete", true),
            ("failures", true),
            ("filtered", false),
            ("g-actors-per-origin", true),
            ("g-approx", true),
            ("g-failures", true),
            ("nested", false),
            ("next-delete", false),
            ("range", false),
            ("sequence-case", false),
            ("spread-short", true),
            ("spread-wide", true),
            ("spread", true),
            ("volume", false),
        ]
    );
}

/// A CloudTrail event of `actor` calling `action` at `t` (seconds after 2026-01-01T00:00:00Z),
/// denied or not.
fn cloudtrail_event(t: i64, actor: &str, action: &str, denied: bool) -> String {
    let time = rampart_core::time::format_micros((1_767_225_600 + t) * 1_000_000);
    let error = if denied {
        r#","errorCode":"Client.UnauthorizedOperation""#
    } else {
        ""
    };
    format!(
        r#"{{"eventTime":"{time}","eventName":"{action}","eventSource":"ec2.amazonaws.com","userIdentity":{{"type":"IAMUser","arn":"{actor}"}},"sourceIPAddress":"198.51.100.7","recipientAccountId":"111122223333"{error}}}"#
    )
}

/// 30 denied DescribeInstances calls within 30 seconds, then one unrelated event a minute
/// later, replayed with a persistent state (so the input does not count as finished): the
/// threshold (15 within 10 minutes) is decided at once, not after the 5-minute lateness.
#[test]
fn a_threshold_burst_is_decided_at_once_not_after_the_lateness() {
    let tmp = tempfile::tempdir().expect("tmp");
    let actor = "arn:aws:iam::111122223333:user/mallory";
    let mut lines: Vec<String> = (0..30)
        .map(|i| cloudtrail_event(i, actor, "DescribeInstances", true))
        .collect();
    lines.push(cloudtrail_event(
        90,
        "arn:aws:iam::111122223333:user/alice",
        "ListBuckets",
        false,
    ));
    let input = tmp.path().join("burst.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").expect("write");
    let pipeline = Pipeline::load_with(
        &repo().join("pipelines/cloudtrail"),
        StateChoice::Persistent(tmp.path().join("state")),
        Evaluator::Keyed,
    )
    .expect("loads");
    assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
    let (out, _) = replay_collect(&pipeline, &[input.as_path()]).expect("replays");
    let recon: Vec<&Decision> = out
        .decisions
        .iter()
        .filter(|d| d.detector.id == "recon-denied-calls")
        .collect();
    assert_eq!(recon.len(), 1, "decided at once (repeats suppressed): {recon:?}");
    assert_eq!(recon[0].evidence["n"], 15, "the 15th call crosses the threshold");
    assert!(
        recon[0].source.to_string().ends_with(":15"),
        "{}",
        recon[0].source
    );
}

/// The same events as four Kafka partitions (round robin), read one whole partition after
/// the other, give the sliding-window decisions (ids and evidence) of the same events read in
/// their original order, and the same grouped-window groups: a partition read ahead makes no
/// other's events late, and rows wait for the slowest partition.
#[test]
fn partitions_read_one_after_the_other_decide_what_the_interleaved_stream_does() {
    use std::sync::Arc;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = window_pipeline(tmp.path(), 256, "1m");
    let text = generated_events(4000, 17);
    let topic: Arc<str> = "events".into();
    // One batch per event, with its partition and offset: partition i % 4, offset i / 4.
    let decode = |pipeline: &Pipeline| -> Vec<((i32, i64), crate::EventBatch)> {
        let mut decoder = pipeline.decoder();
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let at = ((i % 4) as i32, (i / 4) as i64);
            let mut emit = |d: Decoded| {
                if let Decoded::Batch(b) = d {
                    out.push((at, b));
                }
            };
            decoder.decode_message(&topic, at.0, at.1, line.as_bytes(), &mut emit);
            decoder.flush(&mut emit);
        }
        out
    };
    // `stop_at`: the chunk before which the run checkpoints and a new one resumes from its
    // state.
    let run = |state: &str, by_partition: bool, stop_at: Option<usize>| -> Vec<(String, String)> {
        let open = || {
            let pipeline = Pipeline::load_with(
                &dir,
                StateChoice::Persistent(tmp.path().join(state)),
                Evaluator::Keyed,
            )
            .expect("loads");
            pipeline.set_guarded(false);
            let names: Vec<String> = (0..4).map(|p| rampart_core::kafka_source("events", p)).collect();
            pipeline.track_sources(&names);
            pipeline
        };
        let mut pipeline = open();
        let mut events = decode(&pipeline);
        if by_partition {
            events.sort_by_key(|(at, _)| *at);
        }
        let mut decisions = Vec::new();
        let mut late = 0;
        for (i, chunk) in events.chunks(50).enumerate() {
            if stop_at == Some(i) {
                pipeline.checkpoint().expect("checkpoint");
                drop(pipeline);
                pipeline = open();
            }
            let batch = pipeline
                .admit(concat(chunk.iter().map(|(_, e)| e)))
                .expect("every event is new");
            let out = pipeline.evaluate(&batch);
            late += out.late.len();
            decisions.extend(out.decisions);
        }
        decisions.extend(pipeline.decide_waiting().decisions);
        assert_eq!(late, 0, "no event is late");
        // A grouped window fires at the event (in arrival order) after which its HAVING
        // holds, which depends on how partitions interleave: the same groups fire, with their
        // key and bucket as evidence.
        let mut v: Vec<(String, String)> = decisions
            .iter()
            .map(|d| {
                let id = if d.detector.id.starts_with("g-") {
                    d.detector.id.clone()
                } else {
                    d.decision_id.clone()
                };
                (id, serde_json::to_string(&d.evidence).expect("json"))
            })
            .collect();
        v.sort();
        v
    };
    let interleaved = run("interleaved", false, None);
    assert!(interleaved.len() > 50, "{}", interleaved.len());
    let by_partition = run("by-partition", true, None);
    let (missing, extra) = differences(&interleaved, &by_partition);
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(by_partition, interleaved);
    // Stopped and resumed while partitions 2 and 3 have given nothing (the watermark has not
    // moved): the resumed run's watermark has not either, and their events are not late.
    let resumed = run("by-partition-resumed", true, Some(30));
    assert_eq!(resumed, interleaved);
}

/// One batch of the rows of `batches`.
fn concat<'a>(batches: impl Iterator<Item = &'a crate::EventBatch>) -> crate::EventBatch {
    let batches: Vec<&crate::EventBatch> = batches.collect();
    let schema = batches[0].batch.schema();
    let batch = datafusion::arrow::compute::concat_batches(&schema, batches.iter().map(|b| &b.batch))
        .expect("same schema");
    crate::EventBatch {
        batch,
        positions: batches.iter().flat_map(|b| b.positions.iter().cloned()).collect(),
        first_row: u64::MAX,
    }
}
