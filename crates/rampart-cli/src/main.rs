//! The `rampart` command: check, test and replay pipelines.

mod args;
mod replay;

use args::{AuditCommand, Cli, Command, KeysCommand};
use replay::{Outputs, replay};

use std::fs::File;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use rampart_core::Decision;
use rampart_engine::drivers::testing::run_tests;
use rampart_engine::guardrails::compare::Comparison;
use rampart_engine::{Evaluator, Pipeline, StateChoice};

/// Window state is millions of small allocations made and freed on several threads; glibc's
/// allocator fragments under it (resident memory) and spent about a third of a large-state
/// replay in malloc and free. (The C and C++ libraries linked in allocate through mimalloc too:
/// `libmimalloc-sys`'s `override` feature, see the workspace's Cargo.toml.)
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

fn main() -> ExitCode {
    purge_freed_memory_promptly();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAMPART_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(io::stderr)
        // Colour codes only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()) && std::env::var_os("NO_COLOR").is_none())
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
            state_partitions,
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
            state_partitions,
        ),
        Command::Compare { files } => compare(&files),
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => audit_verify(&file),
        Command::Keys {
            command: KeysCommand::Generate { id, dir },
        } => generate_key(&id, &dir),
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
    state_partitions: Option<i32>,
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
    if let (Some(n), Some(kafka)) = (state_partitions, pipeline.config.kafka.as_mut()) {
        if kafka.changelog_topic.is_none() {
            anyhow::bail!(
                "--state-partitions needs the changelog ([kafka] changelog = false is set): a partition's state moves between instances through it"
            );
        }
        kafka.state_partitions = Some(n);
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
        .filter(|(k, _)| {
            k.starts_with("RAMPART_KAFKA_")
                || [
                    "RAMPART_ADMIN_TOKEN",
                    "RAMPART_SIGNING_KEY",
                    "RAMPART_SIGNING_KEY_ID",
                ]
                .contains(&k.as_str())
        })
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
            if let Some(condition) = d.split().and_then(|s| s.incremental()?.condition.as_ref()) {
                println!(
                    "judges only the rows whose window values meet: {}\n",
                    condition.expr
                );
            }
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
                "one window state for {} (same rows and key; each its own frame length and condition)",
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
                (rampart_engine::Timing::LooksAhead(following), _) => {
                    let delay = humantime::format_duration(*following + pipeline.config.allowed_lateness);
                    format!(
                        "decides {delay} after each event (its frame looks {} ahead, plus the allowed \
                         lateness, {lateness})",
                        humantime::format_duration(*following)
                    )
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

fn generate_key(id: &str, dir: &Path) -> Result<ExitCode> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let signer = rampart_enforce::signing::Signer::from_seed(id, &seed)?;
    seed.fill(0);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let private = dir.join(format!("{id}.key.pem"));
    let public = dir.join(format!("{id}.pub.pem"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&private)
        .with_context(|| format!("cannot create {} (it is never overwritten)", private.display()))?;
    file.write_all(signer.private_pem()?.as_bytes())?;
    std::fs::write(&public, signer.public_pem()?)
        .with_context(|| format!("cannot write {}", public.display()))?;
    println!(
        "private key: {} (for [service] signing_key, signing_key_id = \"{id}\")",
        private.display()
    );
    println!("public key:  {} (for the enforcement points)", public.display());
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
