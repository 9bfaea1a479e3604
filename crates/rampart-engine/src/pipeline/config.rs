//! `pipeline.toml`: the raw form read with serde (unknown keys refused with their line), then
//! validated into [`PipelineConfig`], the only form the rest of the code sees.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

use rampart_core::event::RESERVED_COLUMNS;
use rampart_core::{ColumnType, Problem};

use crate::input::mapping::{FieldSpec, JsonPath, Mapping};

/// The raw file, exactly as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    /// Pipeline name: appears in every decision.
    name: String,
    /// What the pipeline watches.
    #[serde(default)]
    description: Option<String>,
    /// Where records come from and how they are framed.
    #[serde(default)]
    source: RawSource,
    /// Raw JSON to canonical columns.
    mapping: RawMapping,
    /// Extra typed columns, by name.
    #[serde(default)]
    columns: std::collections::BTreeMap<String, RawField>,
    /// Decision defaults.
    #[serde(default)]
    decisions: RawDecisions,
    /// Window state settings.
    #[serde(default)]
    state: RawState,
    /// Service mode: where events come from and decisions go (`rampart run`).
    #[serde(default)]
    kafka: Option<RawKafka>,
    /// Service mode: the HTTP endpoint and checkpoint cadence.
    #[serde(default)]
    service: RawService,
    /// The hash-chained audit log of decisions and rule changes.
    #[serde(default)]
    audit: RawAudit,
    /// Reference tables from compacted Kafka topics (files in `tables/` need no entry).
    #[serde(default)]
    tables: std::collections::BTreeMap<String, RawTopicTable>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    /// Where `rampart run` appends the audit log (relative to the pipeline directory).
    /// Default `audit.log`.
    path: Option<PathBuf>,
    /// `false` turns the audit log off. Default `true`.
    enabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopicTable {
    /// A compacted topic whose messages are JSON objects: the latest message per key is a row.
    topic: String,
    /// Columns and their types (string, int, float, bool).
    columns: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    /// `bootstrap.servers`. Default `127.0.0.1:9092`; `RAMPART_KAFKA_BROKERS` overrides it.
    brokers: Option<String>,
    /// Consumer group id. Default `rampart-<pipeline name>`.
    group: Option<String>,
    /// Topics to consume events from.
    input_topics: Vec<String>,
    /// Where decisions go, keyed by actor.
    decisions_topic: String,
    /// Where shadow decisions go; default: the decisions topic (marked `mode: shadow`).
    shadow_topic: Option<String>,
    /// Where bad and late records go, with the original bytes.
    dead_letter_topic: String,
    /// Create missing topics at start (else a missing topic is a start-up error).
    #[serde(default)]
    create_topics: bool,
    /// Partitions of topics created by `create_topics`. Default 1.
    partitions: Option<i32>,
    /// Longest wait to fill a micro-batch (its size bound is `source.batch_size`). Default 5ms.
    batch_max_wait: Option<String>,
    /// librdkafka properties for both the consumer and the producer.
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    #[serde(default)]
    consumer: std::collections::BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    #[serde(default)]
    producer: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz). Default 127.0.0.1:9464.
    listen: Option<String>,
    /// How often window state and source offsets are checkpointed together. Default 5s (at 1s,
    /// checkpoints took a third of the service's CPU under load; see docs/operations.md).
    checkpoint_interval: Option<String>,
    /// An input partition with no record for this long (and none waiting in it) stops holding
    /// the watermark back, until it gets records again. Default 30s.
    partition_idle_after: Option<String>,
    /// Once no record has come for this long, the newest event time's rows count as complete:
    /// window detectors that decide at once decide them. Default 1s.
    quiet_after: Option<String>,
    /// An input partition whose event time runs ahead of the watermark by more than this is
    /// paused until the others catch up (bounds the rows waiting in memory). Default 5m.
    max_partition_skew: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSource {
    /// auto | json-lines | json-array | cloudtrail.
    format: Option<String>,
    /// Records larger than this go to the dead letters. Default 1 MiB.
    max_record_bytes: Option<usize>,
    /// Events per micro-batch. Default 4096.
    batch_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    event_time: RawField,
    actor: RawField,
    action: RawField,
    tenant: Option<RawField>,
    resource: Option<RawField>,
    origin: Option<RawField>,
    outcome: Option<RawField>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDecisions {
    /// How long a block lasts when the detector gives no `block_for`. Default 1h.
    default_block_for: Option<String>,
    /// How long a repeat alert or review of a detector for one key is suppressed. Default 10m.
    dedup_for: Option<String>,
    /// The blast-radius fail-safe for enforcing block detectors.
    #[serde(default)]
    blast_radius: RawBlastRadius,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBlastRadius {
    /// `false` turns the fail-safe off for every detector. Default `true`.
    enabled: Option<bool>,
    /// Distinct keys one detector may block within a minute of event time. Default 50.
    max_keys_per_minute: Option<usize>,
    /// Share (0..1] of the actors active in that minute one detector may block. Default 0.1.
    max_share: Option<f64>,
    /// Blocked keys below which `max_share` does not apply. Default 10.
    min_keys: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    /// Directory of the window state, relative to the pipeline directory. Default `state`.
    dir: Option<PathBuf>,
    /// How late (in event time) an event may arrive and still be counted. Default 5m.
    allowed_lateness: Option<String>,
    /// MiB of window state kept in memory (hot keys); the rest is read from RocksDB. Default 256.
    cache_mb: Option<usize>,
}

/// A mapping entry: `"a.b"`, `["a.b", "c"]` (fallbacks) or
/// `{ path = ..., default = "...", type = "int" }`.
#[derive(Debug, Default)]
struct RawField {
    paths: Vec<String>,
    default: Option<String>,
    ty: Option<String>,
}

impl<'de> Deserialize<'de> for RawField {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a JSON path string, a list of fallback paths, or a table with `path`, `default`, `type`",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawField, E> {
                Ok(RawField {
                    paths: vec![v.to_string()],
                    ..RawField::default()
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawField, A::Error> {
                let mut paths = Vec::new();
                while let Some(p) = seq.next_element::<String>()? {
                    paths.push(p);
                }
                Ok(RawField {
                    paths,
                    ..RawField::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawField, A::Error> {
                let mut field = RawField::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "path" => field.paths = map.next_value::<OneOrMany>()?.0,
                        "default" => field.default = Some(map.next_value()?),
                        "type" => field.ty = Some(map.next_value()?),
                        other => return Err(de::Error::unknown_field(other, &["path", "default", "type"])),
                    }
                }
                Ok(field)
            }
        }
        d.deserialize_any(V)
    }
}

struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Either::deserialize(d)? {
            Either::One(s) => OneOrMany(vec![s]),
            Either::Many(v) => OneOrMany(v),
        })
    }
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
    /// Record size limit in bytes.
    pub max_record_bytes: usize,
    /// Events per micro-batch.
    pub batch_size: usize,
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
    /// relative directories).
    pub fn parse(path: &Path, text: &str) -> Result<Self, Vec<Problem>> {
        let raw: RawPipeline = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_at(text, s.start));
            vec![Problem {
                file: path.to_path_buf(),
                line,
                message: e.message().to_string(),
            }]
        })?;
        let mut problems = Vec::new();
        let at = |needle: &str| line_of(text, needle);
        let field = |name: &str, raw: &RawField, problems: &mut Vec<Problem>| -> Option<FieldSpec> {
            let line = at(name);
            let problem = |msg: String| Problem {
                file: path.to_path_buf(),
                line,
                message: msg,
            };
            if raw.paths.is_empty() {
                problems.push(problem(format!("`{name}` needs at least one JSON path")));
                return None;
            }
            let mut paths = Vec::new();
            for p in &raw.paths {
                match JsonPath::parse(p) {
                    Ok(jp) => paths.push(jp),
                    Err(e) => problems.push(problem(format!("`{name}`: {e}"))),
                }
            }
            Some(FieldSpec {
                paths,
                default: raw.default.clone(),
            })
        };

        let m = &raw.mapping;
        for (name, f) in [
            ("event_time", Some(&m.event_time)),
            ("actor", Some(&m.actor)),
            ("action", Some(&m.action)),
            ("tenant", m.tenant.as_ref()),
            ("resource", m.resource.as_ref()),
            ("origin", m.origin.as_ref()),
            ("outcome", m.outcome.as_ref()),
        ] {
            if let Some(f) = f
                && f.ty.is_some()
            {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: at(name),
                    message: format!("`mapping.{name}` has a fixed type; `type` is only for [columns]"),
                });
            }
        }
        let event_time = field("event_time", &m.event_time, &mut problems);
        let actor = field("actor", &m.actor, &mut problems);
        let action = field("action", &m.action, &mut problems);
        let optional = [&m.tenant, &m.resource, &m.origin, &m.outcome].map(|f| f.as_ref());
        let names = ["tenant", "resource", "origin", "outcome"];
        let mut optional_specs: [Option<FieldSpec>; 4] = Default::default();
        for (i, f) in optional.iter().enumerate() {
            if let Some(f) = f {
                optional_specs[i] = field(names[i], f, &mut problems);
            }
        }
        let mut extras = Vec::new();
        for (name, f) in &raw.columns {
            let line = at(name);
            let problem = |msg: String| Problem {
                file: path.to_path_buf(),
                line,
                message: msg,
            };
            if RESERVED_COLUMNS.contains(&name.as_str()) {
                problems.push(problem(format!(
                    "column `{name}` is a canonical column; map it under [mapping] instead"
                )));
                continue;
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                || name.starts_with(|c: char| c.is_ascii_digit())
            {
                problems.push(problem(format!("column name `{name}` must be lowercase letters, digits and `_` so that SQL can name it without quotes")));
                continue;
            }
            let ty = match f.ty.as_deref() {
                None => ColumnType::String,
                Some(t) => match ColumnType::parse(t) {
                    Some(ty) => ty,
                    None => {
                        problems.push(problem(format!("column `{name}`: unknown type `{t}` (expected string, int, float, bool, timestamp)")));
                        continue;
                    }
                },
            };
            if f.default.is_some() && ty != ColumnType::String {
                problems.push(problem(format!(
                    "column `{name}`: `default` is only supported on string columns"
                )));
            }
            if let Some(spec) = field(name, f, &mut problems) {
                extras.push((name.clone(), spec, ty));
            }
        }

        let format = match raw.source.format.as_deref() {
            None | Some("auto") => Some(InputFormat::Auto),
            Some("json-lines") => Some(InputFormat::JsonLines),
            Some("json-array") => Some(InputFormat::JsonArray),
            Some("cloudtrail") => Some(InputFormat::CloudTrail),
            Some(other) => {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: at("format"),
                    message: format!(
                        "unknown source format `{other}` (expected auto, json-lines, json-array, cloudtrail)"
                    ),
                });
                None
            }
        };
        let mut duration = |key: &str, value: Option<&str>, default: Duration| match value {
            None => default,
            Some(v) => humantime::parse_duration(v).unwrap_or_else(|e| {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: at(key),
                    message: format!("`{key}` = `{v}` is not a duration ({e}); write e.g. 30s, 5m, 1h"),
                });
                default
            }),
        };
        let default_block_for = duration(
            "default_block_for",
            raw.decisions.default_block_for.as_deref(),
            Duration::from_secs(3600),
        );
        let dedup_for = duration(
            "dedup_for",
            raw.decisions.dedup_for.as_deref(),
            Duration::from_secs(600),
        );
        let allowed_lateness = duration(
            "allowed_lateness",
            raw.state.allowed_lateness.as_deref(),
            Duration::from_secs(300),
        );
        let checkpoint_interval = duration(
            "checkpoint_interval",
            raw.service.checkpoint_interval.as_deref(),
            Duration::from_secs(5),
        );
        let partition_idle_after = duration(
            "partition_idle_after",
            raw.service.partition_idle_after.as_deref(),
            Duration::from_secs(30),
        );
        let quiet_after = duration(
            "quiet_after",
            raw.service.quiet_after.as_deref(),
            Duration::from_secs(1),
        );
        let max_partition_skew = duration(
            "max_partition_skew",
            raw.service.max_partition_skew.as_deref(),
            Duration::from_secs(300),
        );
        let kafka = raw.kafka.map(|k| {
            let batch_max_wait = duration(
                "batch_max_wait",
                k.batch_max_wait.as_deref(),
                Duration::from_millis(5),
            );
            let shared = k.properties.iter().map(|(a, b)| (a.clone(), b.clone()));
            KafkaConfig {
                brokers: k.brokers.unwrap_or_else(|| "127.0.0.1:9092".into()),
                group: k.group.unwrap_or_else(|| format!("rampart-{}", raw.name)),
                shadow_topic: k.shadow_topic.unwrap_or_else(|| k.decisions_topic.clone()),
                input_topics: k.input_topics,
                decisions_topic: k.decisions_topic,
                dead_letter_topic: k.dead_letter_topic,
                create_topics: k.create_topics,
                partitions: k.partitions.unwrap_or(1),
                batch_max_wait,
                consumer: shared.clone().chain(k.consumer).collect(),
                producer: shared.chain(k.producer).collect(),
            }
        });
        let b = &raw.decisions.blast_radius;
        let blast_radius = if b.enabled == Some(false) {
            rampart_sql::BlastRadius::Off
        } else {
            let share = b.max_share.unwrap_or(0.1);
            if !(share > 0.0 && share <= 1.0) {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: at("max_share"),
                    message: format!("`max_share` = {share} must be in (0, 1]"),
                });
            }
            rampart_sql::BlastRadius::Limit {
                per_minute: b.max_keys_per_minute.unwrap_or(50).max(1),
                share: Some(share),
                min_keys: b.min_keys.unwrap_or(10),
            }
        };
        let mut topic_tables = Vec::new();
        for (name, t) in &raw.tables {
            let mut columns = Vec::new();
            for (c, ty) in &t.columns {
                match ColumnType::parse(ty) {
                    Some(ty) => columns.push((c.clone(), ty)),
                    None => problems.push(Problem {
                        file: path.to_path_buf(),
                        line: at(c),
                        message: format!(
                            "table `{name}` column `{c}`: unknown type `{ty}` (expected string, int, float, bool, timestamp)"
                        ),
                    }),
                }
            }
            if columns.is_empty() {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: at(name),
                    message: format!("table `{name}` needs at least one column"),
                });
            }
            topic_tables.push(TopicTable {
                name: name.clone(),
                topic: t.topic.clone(),
                columns,
            });
        }
        if let Some(k) = &kafka {
            if k.input_topics.is_empty() {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: at("input_topics"),
                    message: "`kafka.input_topics` needs at least one topic".into(),
                });
            }
            if k.partitions < 1 {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: at("partitions"),
                    message: "`kafka.partitions` must be at least 1".into(),
                });
            }
        }
        let service = ServiceConfig {
            listen: raw.service.listen.unwrap_or_else(|| "127.0.0.1:9464".into()),
            checkpoint_interval,
            partition_idle_after,
            quiet_after,
            max_partition_skew,
        };
        let batch_size = raw.source.batch_size.unwrap_or(4096);
        if batch_size == 0 {
            problems.push(Problem {
                file: path.to_path_buf(),
                line: at("batch_size"),
                message: "`batch_size` must be at least 1".into(),
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let state_dir = base.join(raw.state.dir.unwrap_or_else(|| PathBuf::from("state")));

        match (event_time, actor, action, format) {
            (Some(event_time), Some(actor), Some(action), Some(format)) if problems.is_empty() => Ok(Self {
                name: raw.name,
                description: raw.description,
                format,
                max_record_bytes: raw.source.max_record_bytes.unwrap_or(1 << 20),
                batch_size,
                mapping: Mapping {
                    event_time,
                    actor,
                    action,
                    optional: optional_specs,
                    extras,
                },
                default_block_for,
                dedup_for,
                blast_radius,
                audit_path: (raw.audit.enabled != Some(false))
                    .then(|| base.join(raw.audit.path.unwrap_or_else(|| PathBuf::from("audit.log")))),
                topic_tables,
                state_dir,
                allowed_lateness,
                state_cache_bytes: raw.state.cache_mb.unwrap_or(256) << 20,
                kafka,
                service,
            }),
            _ => Err(problems),
        }
    }
}

fn line_at(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The first line that defines `key` (`key =` at the start of a line, or `key` in a table
/// header), for problems found after parsing.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            t.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
                || t.strip_prefix("[columns.")
                    .is_some_and(|rest| rest.trim_end_matches(']') == key)
        })
        .map(|i| i + 1)
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
        assert_eq!(c.batch_size, 4096);
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
}
