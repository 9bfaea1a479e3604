//! Reference tables from compacted Kafka topics: one background consumer per table reads the
//! topic from its beginning and keeps the latest JSON object per message key (a message without
//! a value deletes its key). The processing loop puts a new version into the pipeline between
//! two micro-batches.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{Map, Value};

use crate::ServiceError;

/// The rows of one topic table and a version that changes with them.
#[derive(Debug, Default)]
struct Rows {
    version: u64,
    by_key: BTreeMap<Vec<u8>, Map<String, Value>>,
}

/// Follows one table topic on a background thread; stops when dropped.
pub struct TableFollower {
    /// The table name.
    pub name: String,
    rows: Arc<Mutex<Rows>>,
    /// The version last put into the pipeline.
    applied: u64,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TableFollower {
    /// Starts reading `topic` (every partition, from the beginning) with `config` (the
    /// service's consumer settings; no group membership).
    pub fn start(name: &str, topic: &str, config: &ClientConfig) -> Result<Self, ServiceError> {
        let mut config = config.clone();
        config
            .set("group.id", format!("rampart-table-{name}"))
            .set("enable.auto.commit", "false");
        let consumer: BaseConsumer = config.create().map_err(ServiceError::client("table consumer"))?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| {
                ServiceError::Broker(format!("cannot read the metadata of table topic {topic}: {e}"))
            })?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(ServiceError::Broker(format!(
                "table `{name}`: topic {topic} does not exist (create it, or set kafka.create_topics)"
            )));
        }
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| ServiceError::Broker(e.to_string()))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| ServiceError::Broker(e.to_string()))?;
        let rows = Arc::new(Mutex::new(Rows::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (rows, stop, name, topic) = (
                Arc::clone(&rows),
                Arc::clone(&stop),
                name.to_string(),
                topic.to_string(),
            );
            std::thread::Builder::new()
                .name(format!("rampart-table-{name}"))
                .spawn(move || follow(&consumer, &rows, &stop, &name, &topic))
                .map_err(|e| ServiceError::Broker(format!("cannot start a thread: {e}")))?
        };
        Ok(Self {
            name: name.to_string(),
            rows,
            applied: 0,
            stop,
            thread: Some(thread),
        })
    }

    /// Puts the table's rows into `pipeline` if they changed since the last time.
    pub fn apply(&mut self, pipeline: &rampart_engine::Pipeline) {
        let rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        if rows.version == self.applied {
            return;
        }
        pipeline.set_table_rows(&self.name, rows.by_key.values());
        tracing::info!(table = %self.name, rows = rows.by_key.len(), "reference table refreshed");
        self.applied = rows.version;
    }

    /// Makes the next [`Self::apply`] put the rows in again (a reloaded pipeline).
    pub fn reapply(&mut self) {
        self.applied = u64::MAX;
    }
}

impl Drop for TableFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn follow(consumer: &BaseConsumer, rows: &Mutex<Rows>, stop: &AtomicBool, name: &str, topic: &str) {
    while !stop.load(Ordering::Relaxed) {
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(e)) => {
                tracing::warn!(table = %name, %topic, error = %e, "reading a table topic");
                continue;
            }
            Some(Ok(m)) => m,
        };
        let Some(key) = message.key() else {
            tracing::warn!(table = %name, %topic, offset = message.offset(), "table message without a key: ignored");
            continue;
        };
        let mut rows = rows.lock().unwrap_or_else(|p| p.into_inner());
        match message.payload() {
            None => {
                rows.by_key.remove(key);
            }
            Some(payload) => match serde_json::from_slice::<Value>(payload) {
                Ok(Value::Object(row)) => {
                    rows.by_key.insert(key.to_vec(), row);
                }
                _ => {
                    tracing::warn!(table = %name, %topic, offset = message.offset(), "table message is not a JSON object: ignored");
                    continue;
                }
            },
        }
        rows.version += 1;
    }
}
