//! The metadata header of a detector file: leading `-- key: value` comment lines.
//!
//! Keeping metadata in SQL comments means the same file runs unchanged in any SQL tool. A
//! comment line whose text starts with a lowercase word and a colon is metadata; a line
//! starting with `--` and at least two more spaces continues the previous value; any other
//! comment is free text. The header ends at the first line that is not a comment.

use std::path::Path;
use std::time::Duration;

use rampart_core::{Mode, Problem, Severity, Verdict};

/// Metadata keys a detector may set, with what each is for (shown when a key is unknown).
pub const KEYS: [(&str, &str); 11] = [
    ("id", "unique detector id"),
    ("verdict", "block | alert | review"),
    ("severity", "info | low | medium | high | critical"),
    ("reason", "text with {{column}} placeholders"),
    ("mode", "enforce (default) | shadow"),
    ("block_for", "how long a block or a review hold lasts, e.g. 1h"),
    (
        "dedup_for",
        "how long a repeat alert or review for the same key is suppressed, e.g. 10m (0s: never)",
    ),
    (
        "blast_radius",
        "off | N per minute[, P%]: past it the detector falls back to shadow",
    ),
    ("guidance", "the safe path forward for the refused user"),
    ("tags", "comma-separated labels"),
    ("description", "what the detector is for"),
];

/// Validated detector metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorMeta {
    /// Unique id within the pipeline.
    pub id: String,
    /// block, alert or review.
    pub verdict: Verdict,
    /// How bad a match is.
    pub severity: Severity,
    /// The reason text, with `{{column}}` placeholders.
    pub reason: ReasonTemplate,
    /// enforce or shadow.
    pub mode: Mode,
    /// How long a block (or a review hold) lasts; `None` takes the pipeline's default.
    pub block_for: Option<Duration>,
    /// How long a repeat alert or review for the same key is suppressed; `None` takes the
    /// pipeline's default.
    pub dedup_for: Option<Duration>,
    /// The blast-radius limit; `None` takes the pipeline's default.
    pub blast_radius: Option<BlastRadius>,
    /// Guidance for the refused user.
    pub guidance: Option<String>,
    /// Labels.
    pub tags: Vec<String>,
    /// Free description.
    pub description: Option<String>,
}

/// How many distinct keys an enforcing block detector may block before it is presumed broken
/// and falls back to shadow (the blast-radius fail-safe).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BlastRadius {
    /// No limit.
    Off,
    /// A limit over one minute of event time.
    Limit {
        /// Distinct keys blocked within one minute.
        per_minute: usize,
        /// Share (0..1] of the actors active in that minute, applied once `min_keys` are
        /// blocked; `None`: no share limit.
        share: Option<f64>,
        /// Blocked keys below which the share limit does not apply (tiny streams).
        min_keys: usize,
    },
}

impl BlastRadius {
    /// Parses `off` or `N per minute[, P%]` (the share applies from 10 blocked keys).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "off" {
            return Ok(Self::Off);
        }
        let bad = || {
            format!("blast_radius `{text}` is not `off` or `N per minute[, P%]` (e.g. `20 per minute, 5%`)")
        };
        let (count, share) = match text.split_once(',') {
            Some((c, s)) => (c.trim(), Some(s.trim())),
            None => (text, None),
        };
        let per_minute = count
            .strip_suffix("per minute")
            .and_then(|n| n.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(bad)?;
        let share = match share {
            None => None,
            Some(s) => Some(
                s.strip_suffix('%')
                    .and_then(|p| p.trim().parse::<f64>().ok())
                    .filter(|p| *p > 0.0 && *p <= 100.0)
                    .ok_or_else(bad)?
                    / 100.0,
            ),
        };
        Ok(Self::Limit {
            per_minute,
            share,
            min_keys: 10,
        })
    }
}

/// A reason template: literal text and `{{column}}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasonTemplate {
    parts: Vec<ReasonPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ReasonPart {
    Text(String),
    Column(String),
}

impl ReasonTemplate {
    /// Parses `text`; an unclosed or empty `{{` is an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(ReasonPart::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed `{{{{` in reason at `{}`", &rest[open..]))?;
            let name = after[..close].trim();
            if name.is_empty() {
                return Err("empty `{{}}` placeholder in reason".into());
            }
            parts.push(ReasonPart::Column(name.to_string()));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(ReasonPart::Text(rest.to_string()));
        }
        Ok(Self { parts })
    }

    /// The column names the template refers to.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            ReasonPart::Column(c) => Some(c.as_str()),
            ReasonPart::Text(_) => None,
        })
    }

    /// Renders the template, asking `value` for each placeholder.
    pub fn render(&self, mut value: impl FnMut(&str) -> String) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                ReasonPart::Text(t) => out.push_str(t),
                ReasonPart::Column(c) => out.push_str(&value(c)),
            }
        }
        out
    }
}

/// Parses the header of a detector file. Returns the metadata or every problem found.
pub fn parse_header(path: &Path, text: &str) -> Result<DetectorMeta, Vec<Problem>> {
    let mut problems = Vec::new();
    let header = Header::read(path, text, &mut problems);
    let id = header.id(&mut problems);
    let verdict = parse_keyword::<Verdict>(path, header.require("verdict", &mut problems), &mut problems);
    let severity = parse_keyword::<Severity>(path, header.require("severity", &mut problems), &mut problems);
    let reason = header.require("reason", &mut problems).and_then(|(line, v)| {
        ReasonTemplate::parse(v)
            .map_err(|e| problems.push(Problem::at(path, line, e)))
            .ok()
    });
    let mode = match header.get("mode") {
        Some(found) => parse_keyword::<Mode>(path, Some(found), &mut problems),
        None => Some(Mode::Enforce),
    };
    let block_for = header.block_for(verdict, &mut problems);
    if let (Some((line, _)), Some(Verdict::Revoke)) = (header.get("verdict"), verdict) {
        problems.push(Problem::at(
            path,
            line,
            "`verdict: revoke` is emitted by Rampart itself (operator revocations, the blast-radius \
             fail-safe); a detector decides block, alert or review",
        ));
    }
    let dedup_for = header
        .get("dedup_for")
        .and_then(|(line, v)| match humantime::parse_duration(v) {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(Problem::at(
                    path,
                    line,
                    format!("dedup_for `{v}` is not a duration ({e}); write e.g. 10m, 1h, or 0s for none"),
                ));
                None
            }
        });
    let blast_radius = header.get("blast_radius").and_then(|(line, v)| {
        BlastRadius::parse(v)
            .map_err(|e| problems.push(Problem::at(path, line, e)))
            .ok()
    });
    let tags = header
        .get("tags")
        .map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let text_of = |key: &str| {
        header
            .get(key)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty())
    };

    match (id, verdict, severity, reason, mode) {
        (Some(id), Some(verdict), Some(severity), Some(reason), Some(mode)) if problems.is_empty() => {
            Ok(DetectorMeta {
                id,
                verdict,
                severity,
                reason,
                mode,
                block_for,
                dedup_for,
                blast_radius,
                guidance: text_of("guidance"),
                tags,
                description: text_of("description"),
            })
        }
        _ => Err(problems),
    }
}

/// The `-- key: value` lines leading a detector file: each known key once, with its line
/// (a value continues on following comment lines indented by three spaces or more).
struct Header<'a> {
    path: &'a Path,
    values: Vec<(&'static str, usize, String)>,
}

impl<'a> Header<'a> {
    /// Reads the leading comment lines; unknown and repeated keys are problems.
    fn read(path: &'a Path, text: &str, problems: &mut Vec<Problem>) -> Self {
        let mut values: Vec<(&'static str, usize, String)> = Vec::new();
        let mut continuing = false;
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continuing = false;
                continue;
            }
            let Some(comment) = trimmed.strip_prefix("--") else {
                break;
            };
            if continuing && comment.starts_with("   ") {
                if let Some((_, _, value)) = values.last_mut() {
                    value.push(' ');
                    value.push_str(comment.trim());
                }
                continue;
            }
            continuing = false;
            let Some((key, value)) = comment.trim().split_once(':') else {
                continue;
            };
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                continue;
            }
            let Some(known) = KEYS.iter().find(|(k, _)| *k == key).map(|(k, _)| *k) else {
                let known: Vec<_> = KEYS.iter().map(|(k, _)| *k).collect();
                problems.push(Problem::at(
                    path,
                    line_no,
                    format!("unknown metadata key `{key}` (known keys: {})", known.join(", ")),
                ));
                continue;
            };
            if let Some((_, first, _)) = values.iter().find(|(k, _, _)| *k == known) {
                problems.push(Problem::at(
                    path,
                    line_no,
                    format!("metadata key `{key}` is set twice (first on line {first})"),
                ));
                continue;
            }
            values.push((known, line_no, value.trim().to_string()));
            continuing = true;
        }
        Self { path, values }
    }

    /// A key's line and value, if set.
    fn get(&self, key: &str) -> Option<(usize, &str)> {
        self.values
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, l, v)| (*l, v.as_str()))
    }

    /// A key that must be set (and not empty).
    fn require(&self, key: &str, problems: &mut Vec<Problem>) -> Option<(usize, &str)> {
        match self.get(key) {
            Some((line, v)) if !v.is_empty() => Some((line, v)),
            _ => {
                problems.push(Problem::at(
                    self.path,
                    1,
                    format!("missing metadata `-- {key}: ...` in the leading comment lines"),
                ));
                None
            }
        }
    }

    /// The detector's id: letters, digits, `-`, `_` and `.`.
    fn id(&self, problems: &mut Vec<Problem>) -> Option<String> {
        let (line, v) = self.require("id", problems)?;
        if v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Some(v.to_string());
        }
        problems.push(Problem::at(
            self.path,
            line,
            format!("detector id `{v}` may only hold letters, digits, `-`, `_` and `.`"),
        ));
        None
    }

    /// `block_for`: a positive duration, for block and review verdicts only.
    fn block_for(&self, verdict: Option<Verdict>, problems: &mut Vec<Problem>) -> Option<Duration> {
        let (line, v) = self.get("block_for")?;
        let duration = match humantime::parse_duration(v) {
            Ok(d) if d.is_zero() => {
                problems.push(Problem::at(self.path, line, "block_for must be longer than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(Problem::at(
                    self.path,
                    line,
                    format!("block_for `{v}` is not a duration ({e}); write e.g. 30m, 1h, 2days"),
                ));
                None
            }
        };
        if let Some(verdict) = verdict
            && !matches!(verdict, Verdict::Block | Verdict::Review)
        {
            problems.push(Problem::at(
                self.path,
                line,
                format!(
                    "block_for only applies to `verdict: block` or `review`, this detector's verdict is `{verdict}`"
                ),
            ));
        }
        duration
    }
}

fn parse_keyword<T: std::str::FromStr<Err = String>>(
    path: &Path,
    found: Option<(usize, &str)>,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let (line, value) = found?;
    value
        .parse::<T>()
        .map_err(|e| problems.push(Problem::at(path, line, e)))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DetectorMeta, Vec<String>> {
        parse_header(Path::new("d.sql"), text).map_err(|ps| ps.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn reads_every_key_and_continuations() {
        let meta = parse(
            "-- id: trail-stopped\n-- verdict: block\n-- severity: high\n\
             -- reason: {{actor}} stopped trail {{trail}}\n-- block_for: 1h\n\
             -- guidance: Ask security on-call\n--    to re-arm the trail.\n\
             -- tags: defense-evasion, cloudtrail\n-- A free comment.\nSELECT 1",
        )
        .expect("valid header");
        assert_eq!(meta.id, "trail-stopped");
        assert_eq!(meta.verdict, Verdict::Block);
        assert_eq!(meta.mode, Mode::Enforce);
        assert_eq!(meta.block_for, Some(Duration::from_secs(3600)));
        assert_eq!(
            meta.guidance.as_deref(),
            Some("Ask security on-call to re-arm the trail.")
        );
        assert_eq!(meta.tags, ["defense-evasion", "cloudtrail"]);
        assert_eq!(meta.reason.columns().collect::<Vec<_>>(), ["actor", "trail"]);
        assert_eq!(
            meta.reason.render(|c| c.to_uppercase()),
            "ACTOR stopped trail TRAIL"
        );
    }

    #[test]
    fn reports_unknown_missing_and_bad_values_with_lines() {
        let errs =
            parse("-- id: x\n-- verdcit: block\n-- severity: huge\n-- reason: {{n\nSELECT 1").unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("d.sql:2: unknown metadata key `verdcit`")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("missing metadata `-- verdict")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("d.sql:3: unknown severity `huge`")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("d.sql:4: unclosed")),
            "{errs:?}"
        );
    }

    #[test]
    fn block_for_needs_a_block_verdict() {
        let errs =
            parse("-- id: x\n-- verdict: alert\n-- severity: low\n-- reason: r\n-- block_for: 1h\nSELECT 1")
                .unwrap_err();
        assert!(errs[0].contains("block_for only applies"), "{errs:?}");
    }

    #[test]
    fn blast_radius_and_dedup_parse() {
        let meta = parse(
            "-- id: x\n-- verdict: block\n-- severity: low\n-- reason: r\n\
             -- blast_radius: 20 per minute, 5%\n-- dedup_for: 30m\nSELECT 1",
        )
        .expect("valid");
        assert_eq!(
            meta.blast_radius,
            Some(BlastRadius::Limit {
                per_minute: 20,
                share: Some(0.05),
                min_keys: 10
            })
        );
        assert_eq!(meta.dedup_for, Some(Duration::from_secs(1800)));
        assert_eq!(BlastRadius::parse("off"), Ok(BlastRadius::Off));
        let errs = parse(
            "-- id: x\n-- verdict: revoke\n-- severity: low\n-- reason: r\n-- blast_radius: lots\nSELECT 1",
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("d.sql:2: `verdict: revoke`")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("d.sql:5: blast_radius `lots`")),
            "{errs:?}"
        );
    }
}
