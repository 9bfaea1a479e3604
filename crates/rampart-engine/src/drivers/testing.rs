//! `rampart test`: detector test cases as data files (`tests/*.toml` in the pipeline):
//! events in, the decisions expected out (or none).
//!
//! ```toml
//! [[case]]
//! name = "stopping a trail is blocked"
//! input = "../../../data/cloudtrail/stratus-detonation-logs/aws.defense-evasion.cloudtrail-stop.json"
//! detectors = ["cloudtrail-logging-stopped"]     # optional: only judge these detectors
//! expect = [{ detector = "cloudtrail-logging-stopped", verdict = "block", actor = "arn:..." }]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use rampart_core::{Decision, Problem, Verdict};

use crate::input::decode::{DeadLetter, Decoded};
use crate::pipeline::{DetectorFailure, Evaluator, Output, Pipeline, StateChoice};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// The cases of this file.
    case: Vec<RawCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    /// Shown in the report.
    name: String,
    /// Event files, relative to the test file.
    #[serde(default)]
    input: Inputs,
    /// Inline events, one JSON object per line.
    #[serde(default)]
    events: Option<String>,
    /// Only decisions of these detectors are judged (default: all).
    #[serde(default)]
    detectors: Option<Vec<String>>,
    /// Judge the decisions as published: repeats suppressed, the blast-radius fail-safe
    /// applied. Default `false`: every match of the detectors is judged.
    #[serde(default)]
    published: bool,
    /// The decisions expected; an empty list means "nothing fires".
    expect: Vec<Expected>,
    /// Inline events only: after this many of them the window state is checkpointed to disk
    /// and the rest go to a pipeline loaded afresh on it, as to a restarted service (rows
    /// waiting for later events, such as a pending absence, must survive).
    #[serde(default)]
    restart_after: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Inputs {
    #[default]
    None,
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    detector: String,
    verdict: String,
    actor: String,
    /// How many such decisions (default 1).
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The test file.
    pub file: PathBuf,
    /// The case name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// What differed (empty when passed).
    pub details: Vec<String>,
    /// Decisions judged.
    pub decisions: usize,
}

/// Runs every case of every `tests/*.toml` of the pipeline. Problems are test files that could
/// not be read or understood.
pub fn run_tests(pipeline: &Pipeline) -> (Vec<CaseResult>, Vec<Problem>) {
    let mut results = Vec::new();
    let mut problems = Vec::new();
    let dir = pipeline.dir.join("tests");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) => {
            problems.push(Problem::in_file(&dir, format!("cannot list test files: {e}")));
            return (results, problems);
        }
    };
    files.sort();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem::in_file(&file, format!("cannot read: {e}")));
                continue;
            }
        };
        match run_test_file(pipeline, &file, &text) {
            Ok(ran) => results.extend(ran),
            Err(problem) => problems.push(problem),
        }
    }
    (results, problems)
}

/// Runs the cases of one test file, `text` read from `file` (input paths are relative to its
/// directory); a file that does not parse is one problem, with its line.
pub fn run_test_file(pipeline: &Pipeline, file: &Path, text: &str) -> Result<Vec<CaseResult>, Problem> {
    let parsed: TestFile = toml::from_str(text).map_err(|e| Problem {
        file: file.to_path_buf(),
        line: e.span().map(|s| text[..s.start].matches('\n').count() + 1),
        message: e.message().to_string(),
    })?;
    Ok(parsed
        .case
        .into_iter()
        .map(|case| run_case(pipeline, file, case))
        .collect())
}

fn run_case(pipeline: &Pipeline, file: &Path, case: RawCase) -> CaseResult {
    let mut details = Vec::new();
    let base = file.parent().unwrap_or(Path::new("."));
    let known = |id: &str| pipeline.detectors.iter().any(|d| d.meta.id == id);
    let refused = |id: &str| {
        pipeline
            .problems
            .iter()
            .any(|p| p.file.file_stem().is_some_and(|s| s == id))
    };
    for id in case
        .detectors
        .iter()
        .flatten()
        .chain(case.expect.iter().map(|e| &e.detector))
    {
        if !known(id) {
            let why = if refused(id) {
                "it was refused at load (see `rampart check`)"
            } else {
                "no such detector in this pipeline"
            };
            details.push(format!("detector `{id}` is not loaded: {why}"));
        }
    }

    let mut expected: BTreeMap<(String, Verdict, String), usize> = BTreeMap::new();
    for e in &case.expect {
        match e.verdict.parse::<Verdict>() {
            Ok(v) => {
                *expected
                    .entry((e.detector.clone(), v, e.actor.clone()))
                    .or_default() += e.count
            }
            Err(err) => details.push(err),
        }
    }

    let decisions = match evaluate_case(pipeline, base, &case) {
        Ok(d) => d,
        Err(e) => {
            details.push(e);
            Vec::new()
        }
    };
    let judged: Vec<&Decision> = decisions
        .iter()
        .filter(|d| {
            case.detectors
                .as_ref()
                .is_none_or(|only| only.contains(&d.detector.id))
        })
        .collect();
    let mut got: BTreeMap<(String, Verdict, String), usize> = BTreeMap::new();
    for d in &judged {
        *got.entry((d.detector.id.clone(), d.verdict, d.actor.clone()))
            .or_default() += 1;
    }
    for (key, want) in &expected {
        let have = got.get(key).copied().unwrap_or(0);
        if have != *want {
            details.push(format!(
                "expected {want} × {} {} for {}, got {have}",
                key.0, key.1, key.2
            ));
        }
    }
    for (key, have) in &got {
        if !expected.contains_key(key) {
            details.push(format!("unexpected {have} × {} {} for {}", key.0, key.1, key.2));
        }
    }
    CaseResult {
        file: file.to_path_buf(),
        name: case.name,
        passed: details.is_empty(),
        details,
        decisions: judged.len(),
    }
}

fn evaluate_case(pipeline: &Pipeline, base: &Path, case: &RawCase) -> Result<Vec<Decision>, String> {
    if let Some(n) = case.restart_after {
        return evaluate_with_restart(pipeline, case, n);
    }
    let mut decoder = pipeline.decoder();
    let mut batches = Vec::new();
    let mut dead = Vec::new();
    let mut emit = |d: Decoded| match d {
        Decoded::Batch(b) => batches.push(b),
        Decoded::DeadLetter(l) => dead.push(l),
    };
    let inputs: Vec<PathBuf> = match &case.input {
        Inputs::None => Vec::new(),
        Inputs::One(p) => vec![base.join(p)],
        Inputs::Many(ps) => ps.iter().map(|p| base.join(p)).collect(),
    };
    if inputs.is_empty() && case.events.is_none() {
        return Err("the case has neither `input` nor `events`".into());
    }
    for path in &inputs {
        decoder
            .decode_file(path, &mut emit)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    }
    if let Some(events) = &case.events {
        decoder
            .decode_text(&case.name, events, &mut emit)
            .map_err(|e| e.to_string())?;
    }
    decoder.flush(&mut emit);
    if let Some(letter) = dead.first() {
        return Err(format!(
            "{} input record(s) could not be decoded, first at {}: {}",
            dead.len(),
            letter.source,
            letter.error
        ));
    }
    // Each case starts afresh; whether its decisions pass through the guard is the case's.
    pipeline.reset_guarded(case.published);
    let mut out = Collector::default();
    let result = batches
        .into_iter()
        .try_for_each(|b| pipeline.ingest(b, &mut out))
        .and_then(|()| pipeline.finish().emit(&mut out));
    if let Err(failure) = result {
        return Err(format!(
            "detector `{}` failed: {}",
            failure.detector, failure.error
        ));
    }
    Ok(out.decisions)
}

/// A case with `restart_after = n`: its first `n` events into a pipeline whose window state is
/// on disk, a checkpoint, then a pipeline loaded afresh on that state for the rest.
fn evaluate_with_restart(pipeline: &Pipeline, case: &RawCase, n: usize) -> Result<Vec<Decision>, String> {
    let Some(events) = &case.events else {
        return Err("`restart_after` needs the events inline (`events`)".into());
    };
    let lines: Vec<&str> = events.lines().filter(|l| !l.trim().is_empty()).collect();
    if n > lines.len() {
        return Err(format!(
            "restart_after = {n}, but the case has {} events",
            lines.len()
        ));
    }
    let state = tempfile::tempdir().map_err(|e| format!("cannot make a state directory: {e}"))?;
    let mut out = Collector::default();
    // (The second part is another source: a resumed replay skips what it took of the first.)
    let parts = [
        (case.name.clone(), lines[..n].join("\n")),
        (
            format!("{} (after the restart)", case.name),
            lines[n..].join("\n"),
        ),
    ];
    for (i, (source, text)) in parts.iter().enumerate() {
        let run = Pipeline::load_with(
            &pipeline.dir,
            StateChoice::Persistent(state.path().join("state")),
            Evaluator::Keyed,
        )
        .map_err(|e| format!("cannot load the pipeline again: {e}"))?;
        run.set_guarded(case.published);
        let mut batches = Vec::new();
        let mut decoder = run.decoder();
        let mut emit = |d: Decoded| {
            if let Decoded::Batch(b) = d {
                batches.push(b);
            }
        };
        decoder
            .decode_text(source, text, &mut emit)
            .map_err(|e| e.to_string())?;
        decoder.flush(&mut emit);
        let ran = batches.into_iter().try_for_each(|b| run.ingest(b, &mut out));
        let ended = match i {
            0 => ran.and_then(|()| {
                run.checkpoint().map_err(|e| DetectorFailure {
                    detector: "(checkpoint)".into(),
                    error: e.into(),
                })
            }),
            _ => ran.and_then(|()| run.finish().emit(&mut out)),
        };
        if let Err(failure) = ended {
            return Err(format!(
                "detector `{}` failed: {}",
                failure.detector, failure.error
            ));
        }
    }
    Ok(out.decisions)
}

/// A test case's output: its decisions; the first detector failure fails the case.
#[derive(Default)]
struct Collector {
    decisions: Vec<Decision>,
}

impl Output for Collector {
    type Error = DetectorFailure;

    fn decision(&mut self, decision: &Decision) -> Result<(), DetectorFailure> {
        self.decisions.push(decision.clone());
        Ok(())
    }

    fn dead_letter(&mut self, _letter: &DeadLetter) -> Result<(), DetectorFailure> {
        Ok(())
    }

    fn detector_failed(&mut self, failure: &DetectorFailure) -> Result<(), DetectorFailure> {
        Err(failure.clone())
    }
}
