//! `rampart replay`: the sink that writes decisions and dead letters (and feeds the progress
//! bar, the comparison and the audit log), and the summary printed at the end.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use rampart_core::Decision;
use rampart_engine::drivers::replay::{ReplaySink, expand_inputs};

use crate::load_config;
use rampart_engine::guardrails::audit::{self, AuditLog};
use rampart_engine::guardrails::compare::Comparison;
use rampart_engine::{DeadLetter, Evaluator, Pipeline, StateChoice, Summary};

struct CliSink {
    decisions: Box<dyn Write>,
    dead_letters: Box<dyn Write>,
    progress: Option<ProgressBar>,
    comparison: Option<Comparison>,
    audit: Option<AuditLog>,
}

impl ReplaySink for CliSink {
    fn decision(&mut self, decision: &Decision) -> io::Result<()> {
        if let Some(c) = &mut self.comparison {
            c.add(decision);
        }
        if let Some(log) = &mut self.audit {
            log.append(audit::Kind::Decision, decision)?;
        }
        serde_json::to_writer(&mut self.decisions, decision)?;
        self.decisions.write_all(b"\n")
    }

    fn dead_letter(&mut self, letter: &DeadLetter) -> io::Result<()> {
        serde_json::to_writer(&mut self.dead_letters, letter)?;
        self.dead_letters.write_all(b"\n")
    }

    fn progress(&mut self, bytes: u64) {
        if let Some(bar) = &self.progress {
            bar.inc(bytes);
        }
    }
}

fn create(path: &Path) -> Result<Box<dyn Write>> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(Box::new(BufWriter::new(file)))
}

/// Where replay output goes and how much it says.
pub(crate) struct Outputs<'a> {
    pub(crate) decisions: Option<&'a Path>,
    pub(crate) dead_letters: Option<&'a Path>,
    pub(crate) quiet: bool,
    pub(crate) state_stats: bool,
    pub(crate) end_of_input: bool,
    pub(crate) compare: bool,
    pub(crate) audit: Option<&'a Path>,
}

pub(crate) fn replay(
    dir: &Path,
    inputs: &[PathBuf],
    out: Outputs<'_>,
    state: Option<PathBuf>,
    evaluator: &str,
) -> Result<ExitCode> {
    let Outputs {
        decisions: output,
        dead_letters: dead,
        quiet,
        state_stats,
        end_of_input,
        compare,
        audit,
    } = out;
    let config = load_config(dir)?;
    let state_choice = match state {
        None => StateChoice::Temporary,
        Some(p) if p.as_os_str().is_empty() => StateChoice::Persistent(config.state_dir.clone()),
        Some(p) => StateChoice::Persistent(p),
    };
    let evaluator = if evaluator == "naive" {
        Evaluator::Naive
    } else {
        Evaluator::Keyed
    };
    let pipeline = Pipeline::load_with(dir, state_choice, evaluator)
        .with_context(|| format!("cannot load pipeline {}", dir.display()))?;
    for p in &pipeline.problems {
        eprintln!("warning: detector refused, the others run: {p}");
    }
    let files = expand_inputs(inputs)?;
    let progress = (!quiet && io::stderr().is_terminal()).then(|| {
        let total: u64 = files
            .iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum();
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut sink = CliSink {
        decisions: match output {
            Some(p) => create(p)?,
            None => Box::new(BufWriter::new(io::stdout().lock())),
        },
        dead_letters: match dead {
            Some(p) => create(p)?,
            None => Box::new(io::stderr()),
        },
        progress,
        comparison: compare.then(Comparison::default),
        audit: match audit {
            None => None,
            Some(path) => Some(
                AuditLog::open_recording(path, &pipeline.rule_versions(), &audit::local_user(), "replay")
                    .with_context(|| format!("cannot open or write audit log {}", path.display()))?,
            ),
        },
    };
    let end_of_input = end_of_input || !pipeline.is_persistent();
    let summary = rampart_engine::drivers::replay::replay_with(&pipeline, &files, &mut sink, end_of_input)?;
    sink.decisions.flush().context("cannot write decisions")?;
    sink.dead_letters.flush().context("cannot write dead letters")?;
    if let Some(log) = &mut sink.audit {
        log.sync().context("cannot write the audit log")?;
    }
    if let Some(bar) = &sink.progress {
        bar.finish_and_clear();
    }
    if let Some(c) = &sink.comparison {
        eprint!("{}", c.report());
    }
    if !quiet {
        print_summary(&pipeline, files.len(), &summary);
        if state_stats {
            pipeline.compact_state()?;
            let stats = pipeline.state_stats();
            eprintln!(
                "window state: {} keys in memory ({:.1} MiB, and {:.1} MiB in the store), {} rows waiting, {:.1} MB on disk",
                stats.cached_keys,
                stats.cached_bytes as f64 / (1 << 20) as f64,
                stats.store_memory_bytes as f64 / (1 << 20) as f64,
                stats.waiting_rows,
                stats.disk_bytes as f64 / 1e6
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(pipeline: &Pipeline, files: usize, s: &Summary) {
    let mut err = io::stderr().lock();
    let _ = (|| -> io::Result<()> {
        writeln!(err, "\n== replay summary: pipeline `{}` ==", pipeline.config.name)?;
        writeln!(
            err,
            "events:      {} from {files} file(s), {:.1} MB in {:.2}s ({:.0} events/s)",
            s.events,
            s.bytes as f64 / 1e6,
            s.elapsed.as_secs_f64(),
            s.events_per_second()
        )?;
        writeln!(err, "bad records: {}", s.bad_records)?;
        if s.late_records > 0 {
            writeln!(
                err,
                "late:        {} (older than the allowed lateness; not counted in windows)",
                s.late_records
            )?;
        }
        if s.resumed_after > 0 {
            writeln!(
                err,
                "resumed:     skipped {} records an earlier run with this state consumed",
                s.resumed_after
            )?;
        }
        if let Some((lo, hi)) = s.time_range {
            use rampart_core::time::format_micros;
            writeln!(err, "event time:  {} .. {}", format_micros(lo), format_micros(hi))?;
        }
        writeln!(err, "decisions:   {}", s.total_decisions())?;
        for ((detector, verdict, mode), n) in &s.decisions {
            writeln!(err, "  {detector:<44} {verdict:<7} {mode:<8} {n}")?;
        }
        let suppressed: u64 = s.suppressed.values().sum();
        if suppressed > 0 {
            writeln!(
                err,
                "suppressed:  {suppressed} repeat decision(s) (a block still active, or an alert within its dedup period)"
            )?;
            for (detector, n) in &s.suppressed {
                writeln!(err, "  {detector:<44} {n}")?;
            }
        }
        for (detector, at, reason) in &s.fail_safe {
            // (The reason says which: the blast radius puts it in shadow, the time budget
            // disables it.)
            let what = if reason.starts_with("time budget") {
                "was disabled"
            } else {
                "fell back to shadow"
            };
            writeln!(err, "fail-safe:   `{detector}` {what} at {at}: {reason}")?;
        }
        for (detector, n) in &s.detector_errors {
            writeln!(
                err,
                "  detector `{detector}` failed on {n} batch(es); see the log"
            )?;
        }
        let busiest = s.busiest_actors(5);
        if !busiest.is_empty() {
            writeln!(err, "busiest actors (by decisions, then events):")?;
            for (actor, events, decisions) in busiest {
                writeln!(err, "  {actor:<60} {events:>8} events {decisions:>5} decisions")?;
            }
        }
        if !s.timeline.is_empty() {
            writeln!(err, "timeline (decisions per hour of event time):")?;
            for (hour, n) in &s.timeline {
                writeln!(err, "  {hour}:00Z  {n:>5}  {}", "#".repeat((*n).min(60) as usize))?;
            }
        }
        Ok(())
    })();
}
