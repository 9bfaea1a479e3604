//! Decisions: what Rampart tells enforcement points, as described by
//! `schemas/decision.schema.json`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::position::SourcePosition;

/// The version of the decision schema this code writes.
pub const DECISION_SCHEMA_VERSION: u32 = 1;

/// What the enforcement point should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Refuse the actor's actions until `expires_at`.
    Block,
    /// Let the action through; tell a human.
    Alert,
    /// Hold the action for approval until `expires_at` (or until a revoke approves it).
    Review,
    /// Lift the actor's active blocks and holds from `detector` (`*`: from every detector).
    /// Rampart emits these itself: on an operator's revocation, and when a detector's
    /// blast-radius fail-safe trips.
    Revoke,
}

/// Whether a decision is meant to be enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Enforcement points act on it.
    Enforce,
    /// Recorded and published, ignored by enforcement points.
    Shadow,
}

/// How bad it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For the record.
    Info,
    /// Worth a look.
    Low,
    /// Worth a look today.
    Medium,
    /// Worth a look now.
    High,
    /// Wake someone up.
    Critical,
}

macro_rules! keyword_enum {
    ($ty:ty, $what:literal, $($text:literal => $variant:expr),+) => {
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.trim() {
                    $($text => Ok($variant),)+
                    other => Err(format!(
                        concat!("unknown ", $what, " `{}` (expected one of: {})"),
                        other,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let text = match self { $(v if *v == $variant => $text,)+ _ => unreachable!() };
                f.write_str(text)
            }
        }
    };
}

keyword_enum!(Verdict, "verdict", "block" => Verdict::Block, "alert" => Verdict::Alert, "review" => Verdict::Review,
    "revoke" => Verdict::Revoke);
keyword_enum!(Mode, "mode", "enforce" => Mode::Enforce, "shadow" => Mode::Shadow);
keyword_enum!(Severity, "severity", "info" => Severity::Info, "low" => Severity::Low,
    "medium" => Severity::Medium, "high" => Severity::High, "critical" => Severity::Critical);

/// The detector that produced a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetectorRef {
    /// The detector's `id` metadata.
    pub id: String,
    /// A hash of the detector file's content: changes whenever the file changes.
    pub version: String,
}

/// One decision, as published to the decisions topic or written by `replay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Version of the decision schema.
    pub schema_version: u32,
    /// Deterministic id: the same detector version and triggering event give the same id.
    pub decision_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Detector id and version.
    pub detector: DetectorRef,
    /// block, alert or review.
    pub verdict: Verdict,
    /// enforce or shadow.
    pub mode: Mode,
    /// info .. critical.
    pub severity: Severity,
    /// The actor the decision is about.
    pub actor: String,
    /// The key the detector evaluated on (the actor for per-event rules, the partition key of a
    /// window otherwise).
    pub key: String,
    /// The action(s) the decision covers.
    pub actions: Vec<String>,
    /// The detector's reason template, rendered with the result row.
    pub reason: String,
    /// The values that fired: the detector's result row (without `raw`).
    pub evidence: serde_json::Map<String, serde_json::Value>,
    /// Event time of the triggering event, RFC 3339 UTC.
    pub event_time: String,
    /// When Rampart produced the decision, RFC 3339 UTC (not part of the id).
    pub processed_at: String,
    /// For blocks: when the block ends (event time + the detector's `block_for`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expires_at: Option<String>,
    /// Where the triggering event came from.
    pub source: SourcePosition,
    /// The safe path forward for the refused user, if the detector gives one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guidance: Option<String>,
    /// The detector's tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Builder for deterministic decision ids: a SHA-256 over length-prefixed parts, truncated to
/// 128 bits, hex encoded.
#[derive(Default)]
pub struct DecisionId(Sha256);

impl DecisionId {
    /// Starts an id.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one part. Parts are length-prefixed so that ("ab","c") and ("a","bc") differ.
    pub fn part(mut self, bytes: impl AsRef<[u8]>) -> Self {
        let bytes = bytes.as_ref();
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// The id as 32 lowercase hex digits.
    pub fn finish(self) -> String {
        let digest = self.0.finalize();
        hex::encode(&digest[..16])
    }
}

/// A short content hash used as a detector's version: 12 hex digits of SHA-256.
pub fn content_version(content: &[u8]) -> String {
    let digest = Sha256::digest(content);
    hex::encode(&digest[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_length_prefixed() {
        let a = DecisionId::new().part("ab").part("c").finish();
        let b = DecisionId::new().part("ab").part("c").finish();
        let c = DecisionId::new().part("a").part("bc").finish();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn keywords_parse_and_display() {
        assert_eq!("block".parse::<Verdict>(), Ok(Verdict::Block));
        assert_eq!(Severity::Critical.to_string(), "critical");
        let err = "maybe".parse::<Mode>().unwrap_err();
        assert!(err.contains("enforce, shadow"), "{err}");
    }
}
