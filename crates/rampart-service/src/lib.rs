//! Service mode: consume the pipeline's input topics as a consumer group, decide on
//! micro-batches, publish decisions keyed by actor and bad records to the dead-letter topic,
//! and checkpoint the window state with the source offsets it reflects, in one RocksDB write,
//! after the broker has acknowledged every decision before it.
//!
//! The processing loop ([`serve`]) is one thread: poll → decode → evaluate → produce, with a
//! checkpoint every `[service] checkpoint_interval` on a thread of its own, written to the
//! state's [`changelog`] topic before the local RocksDB. The HTTP endpoint
//! ([`http`]: metrics, health, operators' commands) and librdkafka's threads are the others.

pub mod auth;
pub mod changelog;
pub mod http;
pub mod kafka;
pub mod metrics;
mod serve;
pub mod tables;
pub mod tls;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use rdkafka::error::KafkaError;

pub use serve::run;

/// Why the service stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The pipeline's configuration cannot run as a service.
    #[error("{0}")]
    Config(String),
    /// A Kafka client could not be created.
    #[error("cannot create the Kafka {what}: {source}")]
    Client {
        /// Which client.
        what: &'static str,
        /// librdkafka's reason.
        source: KafkaError,
    },
    /// The broker refused or failed an operation Rampart cannot go on without.
    #[error("{0}")]
    Broker(String),
    /// A decision or dead letter was refused for good by the broker; nothing was checkpointed
    /// after it, so a restart re-processes it.
    #[error(
        "a message could not be delivered ({0}); stopping without a checkpoint so that a restart re-sends it"
    )]
    Delivery(String),
    /// The window state could not be written.
    #[error(transparent)]
    State(#[from] rampart_engine::StateError),
    /// The HTTP endpoint could not start.
    #[error("{0}")]
    Http(String),
    /// Stopped by a second signal while waiting for the broker: nothing after the last
    /// checkpoint was checkpointed (a restart re-processes it).
    #[error("interrupted while waiting for the broker; the last checkpoint stands")]
    Interrupted,
    /// The audit log could not be written.
    #[error("cannot write the audit log {path}: {source}")]
    Audit {
        /// The log.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A reload passed `check` but the pipeline could not be reopened on its state.
    #[error("cannot reopen the pipeline after a reload: {0}")]
    Reload(String),
}

impl ServiceError {
    pub(crate) fn client(what: &'static str) -> impl Fn(KafkaError) -> Self {
        move |source| Self::Client { what, source }
    }

    /// A write to the audit log at `path` failed.
    pub(crate) fn audit(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.display().to_string();
        move |source| Self::Audit { path, source }
    }
}

/// How to run.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// The HTTP endpoint's address, instead of `[service] listen`.
    pub listen: Option<String>,
    /// Environment variables (`RAMPART_KAFKA_*`, `RAMPART_ADMIN_TOKEN`, `RAMPART_SIGNING_KEY`
    /// and `RAMPART_SIGNING_KEY_ID` are read).
    pub env: Vec<(String, String)>,
    /// Signals received: 1 = finish the batch in flight, checkpoint and stop; 2 = stop even
    /// while waiting for the broker.
    pub stop: Arc<AtomicUsize>,
    /// Stop (cleanly, as on SIGTERM) once no message has come for this long: drains a topic's
    /// backlog and exits (replaying history through Kafka, tests).
    pub until_idle: Option<Duration>,
    /// Stop (cleanly, as on SIGTERM) once every assigned partition is consumed to its end (its
    /// high watermark when checked): replays a finished topic and exits, however long the
    /// broker pauses on the way.
    pub until_end: bool,
    /// Raised (e.g. by SIGHUP) to reload the pipeline directory; lowered when done.
    pub reload: Arc<AtomicBool>,
    /// Watch the pipeline directory and reload on a change (default on in the CLI).
    pub watch: bool,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    /// Events consumed.
    pub events: u64,
    /// Malformed records sent to the dead-letter topic.
    pub bad_records: u64,
    /// Late records sent to the dead-letter topic.
    pub late_records: u64,
    /// Decisions published.
    pub decisions: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
}
