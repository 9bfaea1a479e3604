//! Validation of `pipeline.toml`, one function per section: each reads its raw section,
//! applies the defaults ([`super::defaults`]) and reports every problem it finds with the line
//! of the value at fault, so that one pass shows the user all of them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use rampart_core::event::RESERVED_COLUMNS;
use rampart_core::{ColumnType, Problem};
use rampart_sql::BlastRadius;

use super::raw::{
    RawAudit, RawDecisions, RawDetectors, RawField, RawKafka, RawMapping, RawService, RawSource, RawState,
    RawTopicTable, Text,
};
use super::{
    DetectorLimits, InputFormat, InputLimits, KafkaConfig, ServiceConfig, TlsFiles, TopicTable, defaults,
};
use crate::input::mapping::{FieldSpec, JsonPath, Mapping};

/// The file being validated and the problems found so far.
pub(super) struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    pub problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        Self {
            path,
            text,
            problems: Vec::new(),
        }
    }

    /// A problem with the value at `span`.
    fn problem(&mut self, span: Range<usize>, message: impl Into<String>) {
        let line = Some(line_at(self.text, span.start));
        self.problems.push(Problem {
            file: self.path.to_path_buf(),
            line,
            message: message.into(),
        });
    }

    /// A duration such as `30s` or `5m`; `default` when absent, and when refused.
    fn duration(&mut self, key: &str, value: Option<&Text>, default: Duration) -> Duration {
        let Some(value) = value else {
            return default;
        };
        humantime::parse_duration(value.get_ref()).unwrap_or_else(|e| {
            let v = value.get_ref();
            self.problem(
                value.span(),
                format!("`{key}` = `{v}` is not a duration ({e}); write e.g. 30s, 5m, 1h"),
            );
            default
        })
    }

    /// A mapping entry's JSON paths (`None` when it has none).
    fn field(&mut self, name: &str, raw: &Spanned<RawField>) -> Option<FieldSpec> {
        let f = raw.get_ref();
        if f.paths.is_empty() {
            self.problem(raw.span(), format!("`{name}` needs at least one JSON path"));
            return None;
        }
        let mut paths = Vec::new();
        for p in &f.paths {
            match JsonPath::parse(p) {
                Ok(jp) => paths.push(jp),
                Err(e) => self.problem(raw.span(), format!("`{name}`: {e}")),
            }
        }
        Some(FieldSpec {
            paths,
            default: f.default.clone(),
        })
    }
}

/// The 1-based line of byte `byte` of `text`.
pub(super) fn line_at(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// `[mapping]` and `[columns]`: the canonical columns' paths and the extra typed columns.
pub(super) fn mapping(
    c: &mut Checker<'_>,
    m: &RawMapping,
    columns: &BTreeMap<Text, Spanned<RawField>>,
) -> Option<Mapping> {
    let optional = [&m.tenant, &m.resource, &m.origin, &m.outcome];
    let named = [
        ("event_time", &m.event_time),
        ("actor", &m.actor),
        ("action", &m.action),
    ]
    .into_iter()
    .map(|(n, f)| (n, Some(f)))
    .chain(
        ["tenant", "resource", "origin", "outcome"]
            .into_iter()
            .zip(optional.map(Option::as_ref)),
    );
    for (name, f) in named {
        if let Some(f) = f
            && f.get_ref().ty.is_some()
        {
            c.problem(
                f.span(),
                format!("`mapping.{name}` has a fixed type; `type` is only for [columns]"),
            );
        }
    }
    let event_time = c.field("event_time", &m.event_time);
    let actor = c.field("actor", &m.actor);
    let action = c.field("action", &m.action);
    let names = ["tenant", "resource", "origin", "outcome"];
    let mut optional_specs: [Option<FieldSpec>; 4] = Default::default();
    for (i, f) in optional.iter().enumerate() {
        if let Some(f) = f {
            optional_specs[i] = c.field(names[i], f);
        }
    }
    let extras = extra_columns(c, columns);
    Some(Mapping {
        event_time: event_time?,
        actor: actor?,
        action: action?,
        optional: optional_specs,
        extras,
    })
}

/// `[columns]`: names SQL can use unquoted, known types, defaults on strings only.
fn extra_columns(
    c: &mut Checker<'_>,
    columns: &BTreeMap<Text, Spanned<RawField>>,
) -> Vec<(String, FieldSpec, ColumnType)> {
    let mut extras = Vec::new();
    for (name, f) in columns {
        let (span, name) = (name.span(), name.get_ref());
        if RESERVED_COLUMNS.contains(&name.as_str()) {
            c.problem(
                span,
                format!("column `{name}` is a canonical column; map it under [mapping] instead"),
            );
            continue;
        }
        if !name
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
            || name.starts_with(|ch: char| ch.is_ascii_digit())
        {
            c.problem(span, format!("column name `{name}` must be lowercase letters, digits and `_` so that SQL can name it without quotes"));
            continue;
        }
        let ty = match f.get_ref().ty.as_deref() {
            None => ColumnType::String,
            Some(t) => match ColumnType::parse(t) {
                Some(ty) => ty,
                None => {
                    c.problem(f.span(), format!("column `{name}`: unknown type `{t}` (expected string, int, float, bool, timestamp)"));
                    continue;
                }
            },
        };
        if f.get_ref().default.is_some() && ty != ColumnType::String {
            c.problem(
                f.span(),
                format!("column `{name}`: `default` is only supported on string columns"),
            );
        }
        if let Some(spec) = c.field(name, f) {
            extras.push((name.clone(), spec, ty));
        }
    }
    extras
}

/// `[source]`: the framing, the record size limit and the batch size.
pub(super) fn source(c: &mut Checker<'_>, s: &RawSource) -> (Option<InputFormat>, InputLimits) {
    let format = match s.format.as_ref().map(|f| (f.span(), f.get_ref().as_str())) {
        None | Some((_, "auto")) => Some(InputFormat::Auto),
        Some((_, "json-lines")) => Some(InputFormat::JsonLines),
        Some((_, "json-array")) => Some(InputFormat::JsonArray),
        Some((_, "cloudtrail")) => Some(InputFormat::CloudTrail),
        Some((span, other)) => {
            c.problem(
                span,
                format!(
                    "unknown source format `{other}` (expected auto, json-lines, json-array, cloudtrail)"
                ),
            );
            None
        }
    };
    let mut at_least_one = |key: &str, value: &Option<Spanned<usize>>, default: usize| match value {
        Some(v) if *v.get_ref() == 0 => {
            c.problem(v.span(), format!("`{key}` must be at least 1"));
            default
        }
        Some(v) => *v.get_ref(),
        None => default,
    };
    let limits = InputLimits {
        max_record_bytes: s.max_record_bytes.unwrap_or(defaults::MAX_RECORD_BYTES),
        batch_size: at_least_one("batch_size", &s.batch_size, defaults::BATCH_SIZE),
        max_batch_bytes: at_least_one("max_batch_bytes", &s.max_batch_bytes, defaults::MAX_BATCH_BYTES),
        max_document_bytes: at_least_one(
            "max_document_bytes",
            &s.max_document_bytes,
            defaults::MAX_DOCUMENT_BYTES,
        ),
        max_gzip_ratio: s.max_gzip_ratio.unwrap_or(defaults::MAX_GZIP_RATIO),
    };
    (format, limits)
}

/// `[decisions]`: the default block duration, the repeat suppression period, the fail-safe.
pub(super) fn decisions(c: &mut Checker<'_>, d: &RawDecisions) -> (Duration, Duration, BlastRadius) {
    let block_for = c.duration(
        "default_block_for",
        d.default_block_for.as_ref(),
        defaults::BLOCK_FOR,
    );
    let dedup_for = c.duration("dedup_for", d.dedup_for.as_ref(), defaults::DEDUP_FOR);
    let b = &d.blast_radius;
    let blast_radius = if b.enabled == Some(false) {
        BlastRadius::Off
    } else {
        let share = b
            .max_share
            .as_ref()
            .map_or(defaults::BLAST_RADIUS_SHARE, |s| *s.get_ref());
        if let Some(s) = &b.max_share
            && !(share > 0.0 && share <= 1.0)
        {
            c.problem(s.span(), format!("`max_share` = {share} must be in (0, 1]"));
        }
        BlastRadius::Limit {
            per_minute: b
                .max_keys_per_minute
                .unwrap_or(defaults::BLAST_RADIUS_KEYS_PER_MINUTE)
                .max(1),
            share: Some(share),
            min_keys: b.min_keys.unwrap_or(defaults::BLAST_RADIUS_MIN_KEYS),
        }
    };
    (block_for, dedup_for, blast_radius)
}

/// `[detectors]`: what one detector may cost.
pub(super) fn detectors(c: &mut Checker<'_>, d: &RawDetectors) -> DetectorLimits {
    let memory_mb = match &d.memory_mb {
        Some(mb) if *mb.get_ref() == 0 => {
            c.problem(mb.span(), "`detectors.memory_mb` must be at least 1");
            defaults::DETECTOR_MEMORY_MB
        }
        Some(mb) => *mb.get_ref(),
        None => defaults::DETECTOR_MEMORY_MB,
    };
    DetectorLimits {
        memory_bytes: memory_mb << 20,
        max_batch_time: c.duration(
            "max_batch_time",
            d.max_batch_time.as_ref(),
            defaults::MAX_BATCH_TIME,
        ),
    }
}

/// `[state]`: the directory (relative to the pipeline's), the allowed lateness, the cache size
/// in bytes.
pub(super) fn state(c: &mut Checker<'_>, s: &RawState, base: &Path) -> (PathBuf, Duration, usize) {
    let dir = base.join(
        s.dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
    );
    let lateness = c.duration(
        "allowed_lateness",
        s.allowed_lateness.as_ref(),
        defaults::ALLOWED_LATENESS,
    );
    (dir, lateness, s.cache_mb.unwrap_or(defaults::CACHE_MB) << 20)
}

/// `[service]`.
pub(super) fn service(c: &mut Checker<'_>, s: &RawService, base: &Path) -> ServiceConfig {
    let signing_key = s.signing_key.as_ref().map(|key| {
        let path = key.get_ref();
        let id = match &s.signing_key_id {
            Some(id) => id.get_ref().clone(),
            None => path
                .file_name()
                .map(|n| n.to_string_lossy())
                .and_then(|n| n.split('.').next().map(str::to_string))
                .unwrap_or_default(),
        };
        (id, base.join(path))
    });
    if let (None, Some(id)) = (&s.signing_key, &s.signing_key_id) {
        c.problem(
            id.span(),
            "`service.signing_key_id` without `service.signing_key`",
        );
    }
    let tls = match (&s.tls_certificate, &s.tls_key) {
        (Some(certificate), Some(key)) => Some(TlsFiles {
            certificate: base.join(certificate.get_ref()),
            key: base.join(key.get_ref()),
        }),
        (Some(one), None) | (None, Some(one)) => {
            c.problem(
                one.span(),
                "`service.tls_certificate` and `service.tls_key` go together: give both, or neither",
            );
            None
        }
        (None, None) => None,
    };
    ServiceConfig {
        listen: s.listen.clone().unwrap_or_else(|| defaults::LISTEN.into()),
        checkpoint_interval: c.duration(
            "checkpoint_interval",
            s.checkpoint_interval.as_ref(),
            defaults::CHECKPOINT_INTERVAL,
        ),
        partition_idle_after: c.duration(
            "partition_idle_after",
            s.partition_idle_after.as_ref(),
            defaults::PARTITION_IDLE_AFTER,
        ),
        quiet_after: c.duration("quiet_after", s.quiet_after.as_ref(), defaults::QUIET_AFTER),
        max_partition_skew: c.duration(
            "max_partition_skew",
            s.max_partition_skew.as_ref(),
            defaults::MAX_PARTITION_SKEW,
        ),
        admin_tokens: s.admin_tokens.as_ref().map(|p| base.join(p.get_ref())),
        signing_key,
        tls,
    }
}

/// `[kafka]`, if present: topics, the group (named after the pipeline by default), client
/// properties layered shared-then-own.
pub(super) fn kafka(c: &mut Checker<'_>, k: RawKafka, pipeline: &str) -> KafkaConfig {
    if k.input_topics.get_ref().is_empty() {
        c.problem(
            k.input_topics.span(),
            "`kafka.input_topics` needs at least one topic",
        );
    }
    let partitions = match &k.partitions {
        Some(p) if *p.get_ref() < 1 => {
            c.problem(p.span(), "`kafka.partitions` must be at least 1");
            defaults::PARTITIONS
        }
        Some(p) => *p.get_ref(),
        None => defaults::PARTITIONS,
    };
    let batch_max_wait = c.duration(
        "batch_max_wait",
        k.batch_max_wait.as_ref(),
        defaults::BATCH_MAX_WAIT,
    );
    let state_partitions = match &k.state_partitions {
        Some(p) if !(1..=4096).contains(p.get_ref()) => {
            c.problem(p.span(), "`kafka.state_partitions` must be between 1 and 4096");
            None
        }
        Some(p) if k.changelog == Some(false) => {
            c.problem(
                p.span(),
                "`kafka.state_partitions` needs the changelog (`changelog = false` is set): a partition's state moves between instances through it",
            );
            None
        }
        Some(p) => Some(*p.get_ref()),
        None => None,
    };
    let shared = k.properties.iter().map(|(a, b)| (a.clone(), b.clone()));
    let group = k.group.unwrap_or_else(|| format!("rampart-{pipeline}"));
    KafkaConfig {
        brokers: k.brokers.unwrap_or_else(|| defaults::BROKERS.into()),
        changelog_topic: k
            .changelog
            .unwrap_or(true)
            .then(|| k.changelog_topic.unwrap_or_else(|| format!("{group}-changelog"))),
        enforcement_topic: k.enforcement_state.unwrap_or(true).then(|| {
            k.enforcement_topic
                .unwrap_or_else(|| format!("{}.enforcement", k.decisions_topic))
        }),
        group,
        state_partitions,
        shadow_topic: k.shadow_topic.unwrap_or_else(|| k.decisions_topic.clone()),
        input_topics: k.input_topics.into_inner(),
        decisions_topic: k.decisions_topic,
        dead_letter_topic: k.dead_letter_topic,
        create_topics: k.create_topics,
        partitions,
        batch_max_wait,
        consumer: shared.clone().chain(k.consumer).collect(),
        producer: shared.chain(k.producer).collect(),
    }
}

/// `[tables.NAME]`: reference tables from compacted topics, with typed columns.
pub(super) fn topic_tables(c: &mut Checker<'_>, tables: &BTreeMap<Text, RawTopicTable>) -> Vec<TopicTable> {
    let mut out = Vec::new();
    for (name, t) in tables {
        let mut columns = Vec::new();
        for (column, ty) in &t.columns {
            match ColumnType::parse(ty.get_ref()) {
                Some(parsed) => columns.push((column.get_ref().clone(), parsed)),
                None => c.problem(
                    ty.span(),
                    format!(
                        "table `{}` column `{}`: unknown type `{}` (expected string, int, float, bool, timestamp)",
                        name.get_ref(),
                        column.get_ref(),
                        ty.get_ref()
                    ),
                ),
            }
        }
        if columns.is_empty() {
            c.problem(
                name.span(),
                format!("table `{}` needs at least one column", name.get_ref()),
            );
        }
        out.push(TopicTable {
            name: name.get_ref().clone(),
            topic: t.topic.clone(),
            columns,
        });
    }
    out
}

/// `[audit]`: where the audit log goes (relative to the pipeline directory), or `None` when
/// it is off.
pub(super) fn audit(a: &RawAudit, base: &Path) -> Option<PathBuf> {
    (a.enabled != Some(false)).then(|| {
        base.join(
            a.path
                .clone()
                .unwrap_or_else(|| PathBuf::from(defaults::AUDIT_PATH)),
        )
    })
}
