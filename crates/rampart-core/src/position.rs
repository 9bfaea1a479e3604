//! Where an event came from: a file and line in replay, a topic/partition/offset in service mode.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The source position of one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SourcePosition {
    /// A record read from a file; `line` is 1-based and points at the record's first line.
    File {
        /// The path as it was given to Rampart.
        file: Arc<str>,
        /// 1-based line number.
        line: u64,
    },
    /// A record consumed from Kafka.
    Kafka {
        /// Topic name.
        topic: Arc<str>,
        /// Partition number.
        partition: i32,
        /// Offset within the partition.
        offset: i64,
    },
}

impl SourcePosition {
    /// The name of the source this record belongs to, as input progress and event time know
    /// it: the file's path, or [`kafka_source`] of its partition.
    pub fn source(&self) -> Cow<'_, str> {
        match self {
            Self::File { file, .. } => Cow::Borrowed(file),
            Self::Kafka { topic, partition, .. } => Cow::Owned(kafka_source(topic, *partition)),
        }
    }

    /// Whether `other` is of the same source (cheaper than comparing [`Self::source`]).
    pub fn same_source(&self, other: &SourcePosition) -> bool {
        match (self, other) {
            (Self::File { file: a, .. }, Self::File { file: b, .. }) => a == b,
            (
                Self::Kafka {
                    topic: a,
                    partition: p,
                    ..
                },
                Self::Kafka {
                    topic: b,
                    partition: q,
                    ..
                },
            ) => p == q && a == b,
            _ => false,
        }
    }
}

/// The name of a Kafka partition as a source: `kafka:TOPIC/PARTITION`.
pub fn kafka_source(topic: &str, partition: i32) -> String {
    format!("kafka:{topic}/{partition}")
}

/// The topic and partition of a source named by [`kafka_source`] (`None` for a file).
pub fn parse_kafka_source(source: &str) -> Option<(String, i32)> {
    let rest = source.strip_prefix("kafka:")?;
    let (topic, partition) = rest.rsplit_once('/')?;
    Some((topic.to_string(), partition.parse().ok()?))
}

impl fmt::Display for SourcePosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { file, line } => write!(f, "{file}:{line}"),
            Self::Kafka {
                topic,
                partition,
                offset,
            } => write!(f, "{topic}/{partition}@{offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_source_names_round_trip_and_files_are_not_kafka_sources() {
        assert_eq!(
            parse_kafka_source(&kafka_source("cloud/trail", 3)),
            Some(("cloud/trail".to_string(), 3))
        );
        assert_eq!(parse_kafka_source("data/x.json"), None);
        let at = |offset| SourcePosition::Kafka {
            topic: Arc::from("t"),
            partition: 2,
            offset,
        };
        assert_eq!(at(5).source(), "kafka:t/2");
        assert!(at(5).same_source(&at(9)));
        let file = SourcePosition::File {
            file: Arc::from("a.json"),
            line: 3,
        };
        assert_eq!(file.source(), "a.json");
        assert!(!file.same_source(&at(1)));
    }
}
