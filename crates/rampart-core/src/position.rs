//! Where an event came from: a file and line in replay, a topic/partition/offset in service mode.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

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
