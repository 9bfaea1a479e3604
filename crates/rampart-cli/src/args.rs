//! The command line: commands, arguments and their help (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Rampart: action-level guardrails on event streams. Detectors are SQL files; decisions
/// (block, alert, review) carry their reason.
#[derive(Parser)]
#[command(name = "rampart", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// Signing keys for decisions.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
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
        /// Run as one instance of a group sharing the windows' work, the window state split in
        /// N state partitions, instead of `[kafka] state_partitions` (every instance of the
        /// group the same N; docs/operations.md, "Scaling out").
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=4096))]
        state_partitions: Option<i32>,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Make a new Ed25519 key pair: `ID.key.pem` (the private key, PKCS#8, readable by its
    /// owner only) for `[service] signing_key`, and `ID.pub.pem` (the public key, SPKI) for
    /// the enforcement points. Refuses to overwrite a key.
    #[command(after_help = "Example:
  rampart keys generate --id decisions-2026-12 --dir /etc/rampart/keys")]
    Generate {
        /// The key's id, published with each signature (letters, digits, `.`, `_`, `-`).
        #[arg(long)]
        id: String,
        /// Where to write the two files.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Check every entry's hash and its link to the one before: any edited, removed or
    /// reordered entry is reported with its line (exit 1). Prints the entry count and the head
    /// hash; keep the head elsewhere to detect entries cut off the end.
    #[command(after_help = "Example:\n  rampart audit verify pipelines/cloudtrail/audit.log")]
    Verify {
        /// The audit log.
        file: PathBuf,
    },
}
