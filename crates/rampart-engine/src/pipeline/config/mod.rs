//! `pipeline.toml`: read as written ([`raw`], serde; unknown keys refused with their line),
//! then validated section by section ([`sections`]) into [`PipelineConfig`], the only form
//! the rest of the code sees. Defaults are named in [`defaults`], in one place.

mod raw;
mod sections;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_core::{ColumnType, Problem};

use crate::input::mapping::Mapping;
use raw::RawPipeline;
use sections::Checker;

/// The value of every setting `pipeline.toml` leaves out.
pub mod defaults {
    use std::time::Duration;

    /// `[source] max_record_bytes`: larger records go to the dead letters.
    pub const MAX_RECORD_BYTES: usize = 1 << 20;
    /// `[source] batch_size`: events per micro-batch.
    pub const BATCH_SIZE: usize = 4096;
    /// `[source] max_batch_bytes`: a micro-batch closes once its records take this many bytes.
    pub const MAX_BATCH_BYTES: usize = 32 << 20;
    /// `[source] max_document_bytes`: a larger whole-document file (JSON array, CloudTrail) is
    /// refused.
    pub const MAX_DOCUMENT_BYTES: usize = 1 << 30;
    /// `[source] max_gzip_ratio`: gzip input that expands more than this many times (once past
    /// [`crate::input::decode::GZIP_RATIO_FROM`] bytes) is refused as a bomb.
    pub const MAX_GZIP_RATIO: u64 = 200;
    /// `[decisions] default_block_for`: a block's duration when the detector gives none.
    pub const BLOCK_FOR: Duration = Duration::from_secs(3600);
    /// `[decisions] dedup_for`: how long a repeat alert or review is suppressed.
    pub const DEDUP_FOR: Duration = Duration::from_secs(600);
    /// `[decisions.blast_radius] max_keys_per_minute`.
    pub const BLAST_RADIUS_KEYS_PER_MINUTE: usize = 50;
    /// `[decisions.blast_radius] max_share` of the actors active in that minute.
    pub const BLAST_RADIUS_SHARE: f64 = 0.1;
    /// `[decisions.blast_radius] min_keys`: blocked keys below which the share does not apply.
    pub const BLAST_RADIUS_MIN_KEYS: usize = 10;
    /// `[detectors] memory_mb`: MiB one run of a detector's query may reserve.
    pub const DETECTOR_MEMORY_MB: usize = 512;
    /// `[detectors] max_batch_time`: a detector slower than this on one batch is disabled.
    pub const MAX_BATCH_TIME: Duration = Duration::from_secs(5);
    /// `[state] dir`, relative to the pipeline directory.
    pub const STATE_DIR: &str = "state";
    /// `[state] allowed_lateness` in event time.
    pub const ALLOWED_LATENESS: Duration = Duration::from_secs(300);
    /// `[state] cache_mb`: MiB of window state kept in memory (at 96, a log of 1M new actors
    /// keeps the state's share of memory within 256 MiB, and a dense log's working set fits).
    pub const CACHE_MB: usize = 96;
    /// `[kafka] brokers`.
    pub const BROKERS: &str = "127.0.0.1:9092";
    /// `[kafka] partitions` of topics Rampart creates.
    pub const PARTITIONS: i32 = 1;
    /// `[kafka] batch_max_wait`: the longest wait to fill a micro-batch.
    pub const BATCH_MAX_WAIT: Duration = Duration::from_millis(5);
    /// `[service] listen`: the HTTP endpoint.
    pub const LISTEN: &str = "127.0.0.1:9464";
    /// `[service] checkpoint_interval` (at 1s, checkpoints took a third of the service's CPU
    /// under load; see docs/operations.md).
    pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
    /// `[service] partition_idle_after`.
    pub const PARTITION_IDLE_AFTER: Duration = Duration::from_secs(30);
    /// `[service] quiet_after`.
    pub const QUIET_AFTER: Duration = Duration::from_secs(1);
    /// `[service] max_partition_skew`.
    pub const MAX_PARTITION_SKEW: Duration = Duration::from_secs(300);
    /// `[audit] path`, relative to the pipeline directory.
    pub const AUDIT_PATH: &str = "audit.log";
}

/// How the records of an input are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// Look at the content: `[` is a JSON array, `{"Records": [...]}` CloudTrail, else lines.
    Auto,
    /// One JSON object per line.
    JsonLines,
    /// One JSON array of objects.
    JsonArray,
    /// A CloudTrail file: `{"Records": [...]}`.
    CloudTrail,
}

/// Service mode on Kafka, validated (`[kafka]` in `pipeline.toml`).
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group id.
    pub group: String,
    /// Topics events are consumed from.
    pub input_topics: Vec<String>,
    /// Topic decisions are published to, keyed by actor.
    pub decisions_topic: String,
    /// Topic shadow decisions are published to.
    pub shadow_topic: String,
    /// Topic bad and late records are published to.
    pub dead_letter_topic: String,
    /// Whether missing topics are created at start.
    pub create_topics: bool,
    /// Partitions of created topics.
    pub partitions: i32,
    /// The compacted topic checkpoints of the window state also go to (`None`: off).
    pub changelog_topic: Option<String>,
    /// The compacted topic of the blocks and holds in force, which enforcement points start
    /// from (`None`: off).
    pub enforcement_topic: Option<String>,
    /// Scale-out (`Some`): the window state's partitions, which are the partitions of the
    /// repartition topic events are re-keyed through by actor.
    pub state_partitions: Option<i32>,
    /// Longest wait to fill a micro-batch.
    pub batch_max_wait: Duration,
    /// librdkafka properties for the consumer (shared ones included).
    pub consumer: Vec<(String, String)>,
    /// librdkafka properties for the producer (shared ones included).
    pub producer: Vec<(String, String)>,
}

/// A reference table kept from a compacted Kafka topic (`[tables.NAME]`).
#[derive(Debug, Clone)]
pub struct TopicTable {
    /// Table name in detector SQL.
    pub name: String,
    /// The topic: JSON object values, the latest per message key is a row (a null value
    /// deletes it).
    pub topic: String,
    /// Columns and types.
    pub columns: Vec<(String, ColumnType)>,
}

/// Service mode settings (`[service]`).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Address of the HTTP endpoint.
    pub listen: String,
    /// How often state and offsets are checkpointed.
    pub checkpoint_interval: Duration,
    /// A partition with no record for this long stops holding the watermark.
    pub partition_idle_after: Duration,
    /// No record for this long: the newest event time's rows count as complete.
    pub quiet_after: Duration,
    /// A partition ahead of the watermark by more than this (event time) is paused.
    pub max_partition_skew: Duration,
    /// The file of operators' admin tokens, if any (`RAMPART_ADMIN_TOKEN` adds one).
    pub admin_tokens: Option<PathBuf>,
    /// The key that signs published decisions, with its id, if any (`RAMPART_SIGNING_KEY`
    /// overrides it).
    pub signing_key: Option<(String, PathBuf)>,
    /// The HTTP endpoint's TLS certificate and key, if it serves HTTPS.
    pub tls: Option<TlsFiles>,
}

/// The PEM files the HTTP endpoint serves TLS with (`[service] tls_certificate`, `tls_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, the server's certificate first.
    pub certificate: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How much input one record, micro-batch, document or compressed file may take (`[source]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Larger records go to the dead letters.
    pub max_record_bytes: usize,
    /// Events per micro-batch.
    pub batch_size: usize,
    /// A micro-batch closes once its records take this many bytes (even short of `batch_size`).
    pub max_batch_bytes: usize,
    /// A whole-document file (JSON array, CloudTrail) larger than this is refused.
    pub max_document_bytes: usize,
    /// Gzip input expanding more than this many times is refused as a bomb (0: no limit).
    pub max_gzip_ratio: u64,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_record_bytes: defaults::MAX_RECORD_BYTES,
            batch_size: defaults::BATCH_SIZE,
            max_batch_bytes: defaults::MAX_BATCH_BYTES,
            max_document_bytes: defaults::MAX_DOCUMENT_BYTES,
            max_gzip_ratio: defaults::MAX_GZIP_RATIO,
        }
    }
}

/// What one detector may cost (`[detectors]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorLimits {
    /// Bytes one run of a detector's query may reserve (sorts, joins, windows): past it the
    /// run fails and the detector is reported; nothing spills to disk.
    pub memory_bytes: usize,
    /// A detector that takes longer than this on one batch is disabled until re-armed.
    pub max_batch_time: Duration,
}

impl Default for DetectorLimits {
    fn default() -> Self {
        Self {
            memory_bytes: defaults::DETECTOR_MEMORY_MB << 20,
            max_batch_time: defaults::MAX_BATCH_TIME,
        }
    }
}

/// A validated pipeline configuration.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Pipeline name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Framing of file inputs.
    pub format: InputFormat,
    /// How much a record, a micro-batch, a document, a compressed file may take.
    pub input: InputLimits,
    /// What one detector may cost.
    pub detector_limits: DetectorLimits,
    /// Raw JSON to canonical columns.
    pub mapping: Mapping,
    /// Default block duration.
    pub default_block_for: Duration,
    /// Default suppression of repeat alerts and reviews per detector and key.
    pub dedup_for: Duration,
    /// Default blast-radius limit of enforcing block detectors.
    pub blast_radius: rampart_sql::BlastRadius,
    /// Where `rampart run` appends the audit log; `None`: no audit log.
    pub audit_path: Option<PathBuf>,
    /// Reference tables read from compacted Kafka topics.
    pub topic_tables: Vec<TopicTable>,
    /// Window state directory (absolute, or relative to the working directory).
    pub state_dir: PathBuf,
    /// Allowed lateness in event time.
    pub allowed_lateness: Duration,
    /// Bytes of window state kept in memory.
    pub state_cache_bytes: usize,
    /// Service mode on Kafka, if configured.
    pub kafka: Option<KafkaConfig>,
    /// Service mode settings.
    pub service: ServiceConfig,
}

impl PipelineConfig {
    /// The `events` table's schema: the canonical columns and the `[columns]` extras.
    pub fn event_schema(&self) -> rampart_core::EventSchema {
        let extras = self
            .mapping
            .extras
            .iter()
            .map(|(name, _, ty)| (name.clone(), *ty))
            .collect();
        rampart_core::EventSchema::new(extras)
    }

    /// Reads and validates `pipeline.toml` at `path`.
    pub fn load(path: &Path) -> Result<Self, Vec<Problem>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Problem::in_file(
                path,
                format!("cannot read the pipeline file: {e}"),
            )]
        })?;
        Self::parse(path, &text)
    }

    /// Validates the text of a `pipeline.toml` (`path` is used in problems and to resolve
    /// relative directories). Every problem is reported, each with its line.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Vec<Problem>> {
        let raw: RawPipeline = toml::from_str(text).map_err(|e| {
            vec![Problem {
                file: path.to_path_buf(),
                line: e.span().map(|s| sections::line_at(text, s.start)),
                message: e.message().to_string(),
            }]
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut c = Checker::new(path, text);
        let mapping = sections::mapping(&mut c, &raw.mapping, &raw.columns);
        let (format, input) = sections::source(&mut c, &raw.source);
        let detector_limits = sections::detectors(&mut c, &raw.detectors);
        let (default_block_for, dedup_for, blast_radius) = sections::decisions(&mut c, &raw.decisions);
        let (state_dir, allowed_lateness, state_cache_bytes) = sections::state(&mut c, &raw.state, base);
        let service = sections::service(&mut c, &raw.service, base);
        let kafka = raw.kafka.map(|k| sections::kafka(&mut c, k, &raw.name));
        let topic_tables = sections::topic_tables(&mut c, &raw.tables);
        let audit_path = sections::audit(&raw.audit, base);
        match (mapping, format) {
            (Some(mapping), Some(format)) if c.problems.is_empty() => Ok(Self {
                name: raw.name,
                description: raw.description,
                format,
                input,
                detector_limits,
                mapping,
                default_block_for,
                dedup_for,
                blast_radius,
                audit_path,
                topic_tables,
                state_dir,
                allowed_lateness,
                state_cache_bytes,
                kafka,
                service,
            }),
            _ => Err(c.problems),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[mapping]
event_time = "eventTime"
actor = ["userIdentity.arn", "userIdentity.principalId"]
action = "eventName"
outcome = { path = ["responseElements.ConsoleLogin", "errorCode"], default = "Success" }
[columns]
from_port = { path = "requestParameters.fromPort", type = "int" }
region = "awsRegion"
"#;

    #[test]
    fn reads_fallbacks_defaults_and_typed_columns() {
        let c = PipelineConfig::parse(Path::new("p/pipeline.toml"), GOOD).expect("valid");
        assert_eq!(c.mapping.actor.paths.len(), 2);
        assert_eq!(
            c.mapping.optional[3].as_ref().and_then(|f| f.default.as_deref()),
            Some("Success")
        );
        assert_eq!(c.mapping.extras[0].0, "from_port");
        assert_eq!(c.mapping.extras[0].2, ColumnType::Int);
        assert_eq!(c.state_dir, Path::new("p/state"));
        assert_eq!(c.input.batch_size, 4096);
    }

    #[test]
    fn unknown_keys_name_the_file_and_line() {
        let text = GOOD.replace("action = \"eventName\"", "action = \"eventName\"\nactr = \"x\"");
        let errs = PipelineConfig::parse(Path::new("pipeline.toml"), &text).unwrap_err();
        let msg = errs[0].to_string();
        assert!(msg.starts_with("pipeline.toml:7: unknown field `actr`"), "{msg}");

        let text = GOOD.replace("type = \"int\"", "typ = \"int\"");
        let msg = PipelineConfig::parse(Path::new("pipeline.toml"), &text).unwrap_err()[0].to_string();
        assert!(msg.starts_with("pipeline.toml:9: unknown field `typ`"), "{msg}");
    }

    #[test]
    fn bad_values_are_reported_together() {
        let text = GOOD.replace("type = \"int\"", "type = \"integer\"").replace(
            "name = \"t\"",
            "name = \"t\"\n[state]\nallowed_lateness = \"soon\"",
        );
        let errs: Vec<String> = PipelineConfig::parse(Path::new("pipeline.toml"), &text)
            .unwrap_err()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert!(
            errs.iter().any(|e| e.contains("unknown type `integer`")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("pipeline.toml:4: `allowed_lateness`")),
            "{errs:?}"
        );
    }

    #[test]
    fn kafka_section_defaults_and_property_layers() {
        let text = format!(
            "{GOOD}\n[kafka]\ninput_topics = [\"ct\"]\ndecisions_topic = \"d\"\ndead_letter_topic = \"dl\"\n\
             [kafka.properties]\n\"security.protocol\" = \"SSL\"\n[kafka.producer]\n\"linger.ms\" = \"7\"\n"
        );
        let c = PipelineConfig::parse(Path::new("pipeline.toml"), &text).expect("valid");
        let k = c.kafka.expect("kafka");
        assert_eq!(k.group, "rampart-t");
        assert_eq!(
            k.shadow_topic, "d",
            "shadow decisions default to the decisions topic"
        );
        assert_eq!(k.batch_max_wait, Duration::from_millis(5));
        assert_eq!(
            k.consumer,
            vec![("security.protocol".to_string(), "SSL".to_string())]
        );
        assert_eq!(k.producer.len(), 2);
        assert_eq!(c.service.checkpoint_interval, Duration::from_secs(5));

        let text = format!(
            "{GOOD}\n[kafka]\ninput_topics = []\ndecisions_topic = \"d\"\ndead_letter_topic = \"dl\"\n"
        );
        let errs = PipelineConfig::parse(Path::new("pipeline.toml"), &text).unwrap_err();
        assert!(
            errs[0].to_string().contains("needs at least one topic"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_problem_names_the_line_of_its_own_value_when_keys_repeat_across_sections() {
        // A column named like a [service] key, and `enabled` in two sections: each problem
        // points at the value at fault, not at the first line with the same key.
        let text = GOOD.replace(
            "region = \"awsRegion\"",
            "region = \"awsRegion\"\nquiet_after = \"detail.quiet\"\n[audit]\nenabled = true",
        ) + "[decisions.blast_radius]\nenabled = true\nmax_share = 2.0\n[service]\nquiet_after = \"never\"\n";
        let errs: Vec<String> = PipelineConfig::parse(Path::new("pipeline.toml"), &text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).expect("in text") + 1;
        let quiet = line_of("\"never\"");
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("pipeline.toml:{quiet}: `quiet_after`"))),
            "{errs:?}"
        );
        let share = line_of("max_share");
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("pipeline.toml:{share}: `max_share`"))),
            "{errs:?}"
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn defaults_apply_when_sections_are_left_out() {
        let c = PipelineConfig::parse(Path::new("p/pipeline.toml"), GOOD).expect("valid");
        assert_eq!(c.input, InputLimits::default());
        assert_eq!(c.detector_limits, DetectorLimits::default());
        assert_eq!(c.default_block_for, defaults::BLOCK_FOR);
        assert_eq!(c.dedup_for, defaults::DEDUP_FOR);
        assert_eq!(c.allowed_lateness, defaults::ALLOWED_LATENESS);
        assert_eq!(c.state_cache_bytes, defaults::CACHE_MB << 20);
        assert_eq!(c.service.listen, defaults::LISTEN);
        assert_eq!(c.service.max_partition_skew, defaults::MAX_PARTITION_SKEW);
        assert_eq!(c.audit_path.as_deref(), Some(Path::new("p/audit.log")));
        assert!(c.kafka.is_none());
    }
}
