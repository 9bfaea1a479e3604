//! The `rampart` command: check, test and replay pipelines.

use std::fs::File;
use std::io::{self, BufRead, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use rampart_core::Decision;
use rampart_engine::drivers::replay::{ReplaySink, expand_inputs};
use rampart_engine::drivers::testing::run_tests;
use rampart_engine::guardrails::audit::{self, AuditLog};
use rampart_engine::guardrails::compare::Comparison;
use rampart_engine::{DeadLetter, Evaluator, Pipeline, StateChoice, Summary};

/// Window state is millions of small allocations made and freed on several threads; glibc's
/// allocator fragments under it (resident memory) and spent about a third of a large-state
/// replay in malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, the same index in its v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS at once rather than after mimalloc's default second:
/// batches, write batches and evicted window keys are freed in bursts, and holding each burst
/// for a second raised a W2 replay's peak RSS from about 270 to 410 MiB at the same CPU time
/// (measured, benchmarks/README.md). `MIMALLOC_PURGE_DELAY` in the environment still decides.
fn purge_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator linked in; mimalloc reads its
        // options atomically, from any thread, and accepts any value for this one.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

/// Rampart: action-level guardrails on event streams. Detectors are SQL files; decisions
/// (block, alert, review) carry their reason.
#[derive(Parser)]
#[command(name = "rampart", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a pipeline: its pipeline.toml and every detector.
    ///
    /// Prints each problem as file:line: reason and exits non-zero if there is any.
    #[command(
        after_help = "Example:\n  rampart check pipelines/cloudtrail\n  rampart check pipelines/cloudtrail --explain"
    )]
    Check {
        /// The pipeline directory (holds pipeline.toml and detectors/).
        pipeline: PathBuf,
        /// Also print each detector's shape and physical plan.
        #[arg(long)]
        explain: bool,
    },
    /// Run a pipeline's detector test cases (tests/*.toml).
    ///
    /// Each case feeds events in and compares the decisions that come out (detector, verdict,
    /// actor) with the expected ones. Exits non-zero if any case fails.
    #[command(after_help = "Example:\n  rampart test pipelines/cloudtrail")]
    Test {
        /// The pipeline directory.
        pipeline: PathBuf,
        /// Print every case, not only failures.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Replay log files through a pipeline and write its decisions as JSON lines.
    ///
    /// Inputs are JSON lines, JSON arrays or CloudTrail files ({"Records": [...]}), optionally
    /// gzip-compressed; a directory means every file in it. Records that cannot be decoded go
    /// to the dead letters with the error and their file and line. A summary is printed to
    /// stderr at the end.
    #[command(
        after_help = "Example:\n  rampart replay pipelines/cloudtrail \\\n      --input data/cloudtrail/stratus-detonation-logs/ \\\n      --output decisions.jsonl --dead-letters bad.jsonl\n  zcat trail-*.json.gz | rampart replay pipelines/cloudtrail --input -"
    )]
    Replay {
        /// The pipeline directory.
        pipeline: PathBuf,
        /// Input files or directories; `-` reads standard input.
        #[arg(short, long = "input", required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        /// Write decisions here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Write dead letters (JSON lines) here; by default they go to stderr.
        #[arg(long)]
        dead_letters: Option<PathBuf>,
        /// No progress bar and no summary.
        #[arg(short, long)]
        quiet: bool,
        /// Keep the window state and input progress in this RocksDB directory (by default the
        /// pipeline's `[state] dir`), and resume from it: records an earlier run consumed are
        /// skipped, and window rows at the newest event time wait for the next run instead of
        /// being decided at the end. Without it the state is temporary and the input complete.
        #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "DIR")]
        state: Option<PathBuf>,
        /// Window evaluator: `keyed` (per-key state, the default) or `naive` (re-runs every
        /// window over all kept rows each batch; a baseline for benchmarks).
        #[arg(long, default_value = "keyed", value_parser = ["keyed", "naive"])]
        evaluator: String,
        /// Print the window state's size (keys in memory, bytes on disk) in the summary.
        #[arg(long)]
        state_stats: bool,
        /// With --state: the input ends here, so window rows still waiting for the watermark
        /// are decided now instead of by the next run.
        #[arg(long = "final", requires = "state")]
        end_of_input: bool,
        /// After the summary, report shadow against enforce per detector: the actors each
        /// shadow detector would have blocked, how many of them enforcing detectors did block,
        /// the rest, first and last times.
        #[arg(long)]
        compare: bool,
        /// Append every decision and the rule versions to this hash-chained audit log.
        #[arg(long, value_name = "FILE")]
        audit: Option<PathBuf>,
    },
    /// Report shadow against enforce over decision files (JSON lines, e.g. written by replay
    /// or read from the decisions topic).
    #[command(after_help = "Example:\n  rampart compare decisions.jsonl")]
    Compare {
        /// Decision files; `-` reads standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run a pipeline as a service on Kafka (its `[kafka]` section).
    ///
    /// Consumes the input topics as a consumer group, decides on micro-batches, publishes
    /// decisions (JSON, keyed by actor) and bad or late records (original bytes, reason and
    /// topic/partition/offset in headers), and checkpoints the window state together with the
    /// source offsets. SIGTERM or Ctrl-C: finish the batch in flight, wait for the broker's
    /// acknowledgements, checkpoint, exit 0 (a second signal stops without waiting).
    /// `RAMPART_KAFKA_<NAME>` environment variables set librdkafka property <name> (`_` as `.`).
    #[command(
        after_help = "Example:\n  rampart run pipelines/cloudtrail\n  RAMPART_KAFKA_BROKERS=kafka:9092 RAMPART_KAFKA_SECURITY_PROTOCOL=SASL_SSL rampart run pipelines/cloudtrail"
    )]
    Run {
        /// The pipeline directory.
        pipeline: PathBuf,
        /// Bootstrap servers, instead of `[kafka] brokers` (and `RAMPART_KAFKA_BROKERS`).
        #[arg(long)]
        brokers: Option<String>,
        /// Address of /metrics, /healthz and /readyz, instead of `[service] listen`.
        #[arg(long)]
        listen: Option<String>,
        /// The window state and offsets directory, instead of `[state] dir`.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Stop cleanly once no message has come for this long (e.g. `5s`): drain a topic's
        /// backlog and exit.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        until_idle: Option<std::time::Duration>,
        /// Stop cleanly once every assigned partition is consumed to its end (its high
        /// watermark when checked): replay a finished topic and exit.
        #[arg(long)]
        until_end: bool,
        /// Do not reload when a file of the pipeline directory changes (SIGHUP and
        /// POST /admin/reload still reload).
        #[arg(long)]
        no_watch: bool,
        /// Append the audit log here, instead of `[audit] path` (e.g. on a persistent volume).
        #[arg(long, value_name = "FILE")]
        audit: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every entry's hash and its link to the one before: any edited, removed or
    /// reordered entry is reported with its line (exit 1). Prints the entry count and the head
    /// hash; keep the head elsewhere to detect entries cut off the end.
    #[command(after_help = "Example:\n  rampart audit verify pipelines/cloudtrail/audit.log")]
    Verify {
        /// The audit log.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    purge_freed_memory_promptly();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAMPART_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { pipeline, explain } => check(&pipeline, explain),
        Command::Test { pipeline, verbose } => test(&pipeline, verbose),
        Command::Replay {
            pipeline,
            inputs,
            output,
            dead_letters,
            quiet,
            state,
            evaluator,
            state_stats,
            end_of_input,
            compare,
            audit,
        } => replay(
            &pipeline,
            &inputs,
            Outputs {
                decisions: output.as_deref(),
                dead_letters: dead_letters.as_deref(),
                quiet,
                state_stats,
                end_of_input,
                compare,
                audit: audit.as_deref(),
            },
            state,
            &evaluator,
        ),
        Command::Run {
            pipeline,
            brokers,
            listen,
            state,
            until_idle,
            until_end,
            no_watch,
            audit,
        } => run(
            &pipeline,
            rampart_service::RunOptions {
                listen,
                until_idle,
                until_end,
                watch: !no_watch,
                ..Default::default()
            },
            brokers,
            state,
            audit,
        ),
        Command::Compare { files } => compare(&files),
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => audit_verify(&file),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(
    dir: &Path,
    mut options: rampart_service::RunOptions,
    brokers: Option<String>,
    state: Option<PathBuf>,
    audit: Option<PathBuf>,
) -> Result<ExitCode> {
    use std::sync::Arc;
    let config = load_config(dir)?;
    let state_dir = state.unwrap_or(config.state_dir);
    let mut pipeline = Pipeline::load_with(dir, StateChoice::Persistent(state_dir), Evaluator::Keyed)
        .with_context(|| format!("cannot load pipeline {}", dir.display()))?;
    for p in &pipeline.problems {
        eprintln!("warning: detector refused, the others run: {p}");
    }
    if audit.is_some() {
        pipeline.config.audit_path = audit;
    }
    // First signal: finish the batch in flight, checkpoint, stop. Second: stop waiting for the
    // broker (the last checkpoint stands). Third: exit at once.
    // SIGHUP: reload the pipeline directory.
    let stop = Arc::clone(&options.stop);
    let reload = Arc::clone(&options.reload);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])?;
    let counter = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("rampart-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == signal_hook::consts::SIGHUP {
                    eprintln!("rampart: SIGHUP received; reloading the pipeline");
                    reload.store(true, std::sync::atomic::Ordering::SeqCst);
                    continue;
                }
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                eprintln!("rampart: signal {signal} received ({n}); stopping");
                if n >= 3 {
                    std::process::exit(130);
                }
            }
        })?;
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("RAMPART_KAFKA_"))
        .collect();
    if let Some(b) = brokers {
        env.retain(|(k, _)| k != "RAMPART_KAFKA_BROKERS");
        env.push(("RAMPART_KAFKA_BROKERS".into(), b));
    }
    options.env = env;
    let summary = rampart_service::run(pipeline, options)?;
    eprintln!(
        "stopped: {} events, {} decisions, {} bad records, {} late records, {} checkpoints",
        summary.events, summary.decisions, summary.bad_records, summary.late_records, summary.checkpoints
    );
    Ok(ExitCode::SUCCESS)
}

/// A pipeline's validated `pipeline.toml` alone (to find its state directory before loading).
fn load_config(dir: &Path) -> Result<rampart_engine::PipelineConfig> {
    rampart_engine::PipelineConfig::load(&dir.join("pipeline.toml"))
        .map_err(|ps| {
            anyhow::anyhow!(
                "{}",
                ps.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
            )
        })
        .with_context(|| format!("cannot load pipeline {}", dir.display()))
}

fn load(dir: &Path) -> Result<Pipeline> {
    Pipeline::load(dir).with_context(|| format!("cannot load pipeline {}", dir.display()))
}

fn check(dir: &Path, explain: bool) -> Result<ExitCode> {
    let pipeline = load(dir)?;
    if explain {
        for d in &pipeline.detectors {
            println!(
                "{} ({}, {}):\n{}",
                d.meta.id,
                d.path.display(),
                d.shape,
                d.explain()
            );
        }
    }
    for p in &pipeline.problems {
        println!("{p}");
    }
    let mut shapes = std::collections::BTreeMap::<String, usize>::new();
    for d in &pipeline.detectors {
        *shapes.entry(d.shape.to_string()).or_default() += 1;
    }
    let shapes: Vec<String> = shapes.iter().map(|(s, n)| format!("{n} {s}")).collect();
    if pipeline.problems.is_empty() {
        println!(
            "ok: pipeline `{}`: {} detectors ({})",
            pipeline.config.name,
            pipeline.detectors.len(),
            shapes.join(", ")
        );
        for shared in pipeline.shared_window_states() {
            println!(
                "one window state for {} (same rows, key and frame; they differ above the window)",
                shared.join(", ")
            );
        }
        let lateness = humantime::format_duration(pipeline.config.allowed_lateness);
        for d in &pipeline.detectors {
            let Some(split) = d.split() else { continue };
            let when = match (&split.timing, split.kind()) {
                (rampart_engine::Timing::AtOnce, rampart_engine::StateKind::Grouped) => {
                    "decides at once: when its HAVING first holds".to_string()
                }
                (rampart_engine::Timing::AtOnce, rampart_engine::StateKind::Sliding) => format!(
                    "decides at once: as soon as a row's second is complete and the condition holds \
                     (rows that do not fire yet wait for the allowed lateness, {lateness})"
                ),
                (rampart_engine::Timing::AfterLateness(why), _) => {
                    format!("decides after the allowed lateness ({lateness}): {why}")
                }
            };
            println!("{}: {when}", d.meta.id);
        }
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{} problem(s); {} detector(s) loaded, {} refused",
            pipeline.problems.len(),
            pipeline.detectors.len(),
            refused_files(&pipeline)
        );
        Ok(ExitCode::FAILURE)
    }
}

fn refused_files(pipeline: &Pipeline) -> usize {
    let mut files: Vec<&Path> = pipeline.problems.iter().map(|p| p.file.as_path()).collect();
    files.sort();
    files.dedup();
    files.len()
}

fn test(dir: &Path, verbose: bool) -> Result<ExitCode> {
    let pipeline = load(dir)?;
    for p in &pipeline.problems {
        eprintln!("warning: detector refused: {p}");
    }
    let (results, problems) = run_tests(&pipeline);
    for p in &problems {
        println!("ERROR {p}");
    }
    let rel = |f: &Path| f.strip_prefix(dir).unwrap_or(f).display().to_string();
    for r in &results {
        if r.passed && !verbose {
            continue;
        }
        let status = if r.passed { "PASS" } else { "FAIL" };
        println!(
            "{status}  {}: {} ({} decision(s))",
            rel(&r.file),
            r.name,
            r.decisions
        );
        for d in &r.details {
            println!("      {d}");
        }
    }
    let passed = results.iter().filter(|r| r.passed).count();
    let failed = results.len() - passed;
    println!("{}", "-".repeat(80));
    println!("PASS: {passed}/{}", results.len());
    if failed > 0 {
        println!("FAIL: {failed}/{}", results.len());
    }
    println!("{passed} passed, {failed} failed");
    let ok = failed == 0 && problems.is_empty() && !results.is_empty();
    if results.is_empty() {
        println!("no test cases found in {}", dir.join("tests").display());
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn compare(files: &[PathBuf]) -> Result<ExitCode> {
    let mut comparison = Comparison::default();
    for path in files {
        let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(io::stdin().lock())
        } else {
            Box::new(io::BufReader::new(
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
            ))
        };
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let d: Decision = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a decision", path.display(), i + 1))?;
            comparison.add(&d);
        }
    }
    print!("{}", comparison.report());
    Ok(ExitCode::SUCCESS)
}

fn audit_verify(path: &Path) -> Result<ExitCode> {
    match rampart_engine::guardrails::audit::verify(path)
        .with_context(|| format!("cannot read {}", path.display()))?
    {
        Ok(v) => {
            println!("ok: {} entries, head {}", v.entries, v.head);
            Ok(ExitCode::SUCCESS)
        }
        Err(broken) => {
            println!("broken: {broken}");
            Ok(ExitCode::FAILURE)
        }
    }
}

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
struct Outputs<'a> {
    decisions: Option<&'a Path>,
    dead_letters: Option<&'a Path>,
    quiet: bool,
    state_stats: bool,
    end_of_input: bool,
    compare: bool,
    audit: Option<&'a Path>,
}

fn replay(
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
                "window state: {} keys in memory ({:.1} MiB), {} rows waiting, {:.1} MB on disk",
                stats.cached_keys,
                stats.cached_bytes as f64 / (1 << 20) as f64,
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
            writeln!(
                err,
                "fail-safe:   `{detector}` fell back to shadow at {at}: {reason}"
            )?;
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
