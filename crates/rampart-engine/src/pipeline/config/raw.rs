//! `pipeline.toml` exactly as written (serde, unknown keys refused with their line). Values a
//! validation may refuse keep their place in the file ([`Spanned`]) so that a problem names
//! the line of the value itself. Defaults live in [`super::defaults`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// A text value with its place in the file.
pub(super) type Text = Spanned<String>;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPipeline {
    /// Pipeline name: appears in every decision.
    pub name: String,
    /// What the pipeline watches.
    #[serde(default)]
    pub description: Option<String>,
    /// Where records come from and how they are framed.
    #[serde(default)]
    pub source: RawSource,
    /// Raw JSON to canonical columns.
    pub mapping: RawMapping,
    /// Extra typed columns, by name.
    #[serde(default)]
    pub columns: BTreeMap<Text, Spanned<RawField>>,
    /// Decision defaults.
    #[serde(default)]
    pub decisions: RawDecisions,
    /// Window state settings.
    #[serde(default)]
    pub state: RawState,
    /// What one detector may cost.
    #[serde(default)]
    pub detectors: RawDetectors,
    /// Service mode: where events come from and decisions go (`rampart run`).
    #[serde(default)]
    pub kafka: Option<RawKafka>,
    /// Service mode: the HTTP endpoint, checkpoints, event time across partitions.
    #[serde(default)]
    pub service: RawService,
    /// The hash-chained audit log of decisions and rule changes.
    #[serde(default)]
    pub audit: RawAudit,
    /// Reference tables from compacted Kafka topics (files in `tables/` need no entry).
    #[serde(default)]
    pub tables: BTreeMap<Text, RawTopicTable>,
}

/// `[detectors]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDetectors {
    /// MiB of memory one run of a detector's query may reserve (sorts, joins, windows).
    pub memory_mb: Option<Spanned<usize>>,
    /// A detector that takes longer than this on one batch is disabled.
    pub max_batch_time: Option<Text>,
}

/// `[source]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    /// auto | json-lines | json-array | cloudtrail.
    pub format: Option<Text>,
    /// Records larger than this go to the dead letters.
    pub max_record_bytes: Option<usize>,
    /// Events per micro-batch.
    pub batch_size: Option<Spanned<usize>>,
    /// A micro-batch closes once its records take this many bytes.
    pub max_batch_bytes: Option<Spanned<usize>>,
    /// Whole-document files (JSON array, CloudTrail) larger than this are refused.
    pub max_document_bytes: Option<Spanned<usize>>,
    /// Gzip input expanding more than this many times is refused as a bomb (0: no limit).
    pub max_gzip_ratio: Option<u64>,
}

/// `[mapping]`: the canonical columns.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMapping {
    pub event_time: Spanned<RawField>,
    pub actor: Spanned<RawField>,
    pub action: Spanned<RawField>,
    pub tenant: Option<Spanned<RawField>>,
    pub resource: Option<Spanned<RawField>>,
    pub origin: Option<Spanned<RawField>>,
    pub outcome: Option<Spanned<RawField>>,
}

/// `[decisions]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDecisions {
    /// How long a block lasts when the detector gives no `block_for`.
    pub default_block_for: Option<Text>,
    /// How long a repeat alert or review of a detector for one key is suppressed.
    pub dedup_for: Option<Text>,
    /// The blast-radius fail-safe for enforcing block detectors.
    #[serde(default)]
    pub blast_radius: RawBlastRadius,
}

/// `[decisions.blast_radius]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBlastRadius {
    /// `false` turns the fail-safe off for every detector.
    pub enabled: Option<bool>,
    /// Distinct keys one detector may block within a minute of event time.
    pub max_keys_per_minute: Option<usize>,
    /// Share (0..1] of the actors active in that minute one detector may block.
    pub max_share: Option<Spanned<f64>>,
    /// Blocked keys below which `max_share` does not apply.
    pub min_keys: Option<usize>,
}

/// `[state]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    /// Directory of the window state, relative to the pipeline directory.
    pub dir: Option<PathBuf>,
    /// How late (in event time) an event may arrive and still be counted.
    pub allowed_lateness: Option<Text>,
    /// MiB of window state kept in memory (hot keys); the rest is read from RocksDB.
    pub cache_mb: Option<usize>,
}

/// `[kafka]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKafka {
    /// `bootstrap.servers`; `RAMPART_KAFKA_BROKERS` overrides it.
    pub brokers: Option<String>,
    /// Consumer group id (default `rampart-<pipeline name>`).
    pub group: Option<String>,
    /// Topics to consume events from.
    pub input_topics: Spanned<Vec<String>>,
    /// Where decisions go, keyed by actor.
    pub decisions_topic: String,
    /// Where shadow decisions go (default: the decisions topic, marked `mode: shadow`).
    pub shadow_topic: Option<String>,
    /// Where bad and late records go, with the original bytes.
    pub dead_letter_topic: String,
    /// Create missing topics at start (else a missing topic is a start-up error).
    #[serde(default)]
    pub create_topics: bool,
    /// Partitions of topics created by `create_topics`.
    pub partitions: Option<Spanned<i32>>,
    /// Whether checkpoints of the window state also go to a compacted changelog topic, from
    /// which a new instance with an empty disk restores it (default true).
    pub changelog: Option<bool>,
    /// The changelog topic (default `<group>-changelog`), created compacted by Rampart.
    pub changelog_topic: Option<String>,
    /// Whether the blocks and holds in force are also kept in a compacted topic, which
    /// enforcement points start from (default true).
    pub enforcement_state: Option<bool>,
    /// That topic (default `<decisions_topic>.enforcement`), created compacted by Rampart.
    pub enforcement_topic: Option<String>,
    /// Scale-out: the window state is split in this many partitions, spread over the
    /// instances of the group, each event re-keyed by actor through a repartition topic.
    pub state_partitions: Option<Spanned<i32>>,
    /// Longest wait to fill a micro-batch (its size bound is `source.batch_size`).
    pub batch_max_wait: Option<Text>,
    /// librdkafka properties for both the consumer and the producer.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

/// `[service]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz).
    pub listen: Option<String>,
    /// How often window state and source offsets are checkpointed together.
    pub checkpoint_interval: Option<Text>,
    /// An input partition with no record for this long (and none waiting in it) stops holding
    /// the watermark back, until it gets records again.
    pub partition_idle_after: Option<Text>,
    /// Once no record has come for this long, the newest event time's rows count as complete.
    pub quiet_after: Option<Text>,
    /// An input partition whose event time runs ahead of the watermark by more than this is
    /// paused until the others catch up.
    pub max_partition_skew: Option<Text>,
    /// A file of operators' admin tokens, one `NAME TOKEN` per line (relative to the pipeline
    /// directory); re-read when it changes.
    pub admin_tokens: Option<Spanned<PathBuf>>,
    /// The private key (PKCS#8 PEM) that signs published decisions (relative to the pipeline
    /// directory).
    pub signing_key: Option<Spanned<PathBuf>>,
    /// The id published with each signature; by default the key file's name up to its first dot.
    pub signing_key_id: Option<Spanned<String>>,
    /// The HTTP endpoint's certificate chain (PEM, relative to the pipeline directory): with
    /// `tls_key`, the endpoint serves HTTPS only.
    pub tls_certificate: Option<Spanned<PathBuf>>,
    /// The private key of `tls_certificate` (PEM).
    pub tls_key: Option<Spanned<PathBuf>>,
}

/// `[audit]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    /// Where `rampart run` appends the audit log (relative to the pipeline directory).
    pub path: Option<PathBuf>,
    /// `false` turns the audit log off.
    pub enabled: Option<bool>,
}

/// `[tables.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTopicTable {
    /// A compacted topic whose messages are JSON objects: the latest message per key is a row.
    pub topic: String,
    /// Columns and their types (string, int, float, bool, timestamp).
    pub columns: BTreeMap<Text, Text>,
}

/// A mapping entry: `"a.b"`, `["a.b", "c"]` (fallbacks) or
/// `{ path = ..., default = "...", type = "int" }`.
#[derive(Debug, Default)]
pub(super) struct RawField {
    pub paths: Vec<String>,
    pub default: Option<String>,
    pub ty: Option<String>,
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

/// One JSON path or several.
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
