//! The window state's changelog on Kafka: every checkpoint also goes to a compacted topic
//! (entries keyed by state key, then a marker; see `rampart_state::changelog`), written
//! before the local RocksDB write, so that the local state directory is a cache of the topic.
//! At start the state directory catches up from the topic: a directory that holds the last
//! checkpoint reads nothing, one that missed the last checkpoints reads the topic's tail since
//! its own, and an empty one (a new disk, a new machine) is rebuilt from the topic alone.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_engine::StateStore;
use rampart_engine::changelog::{ChangelogWriter, LOGGED_META, Logged, MARKER_KEY, Marker, is_marker};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::ServiceError;
use crate::metrics::{Health, Metrics};

/// The largest record the changelog producer sends (a hot key's window rows are one value).
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// Writes checkpoints to one partition of the changelog topic.
pub struct KafkaChangelog {
    producer: BaseProducer<Deliveries>,
    topic: String,
    partition: i32,
    stop: Arc<AtomicUsize>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The changelog producer's deliveries: how many are outstanding, the first failure, and the
/// offset of the last marker.
#[derive(Default)]
struct Deliveries {
    in_flight: AtomicUsize,
    failed: Mutex<Option<String>>,
    marker_offset: AtomicI64,
}

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::client_log("changelog producer", level, facility, message);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(message) if message.key() == Some(MARKER_KEY) => {
                self.marker_offset.store(message.offset(), Ordering::SeqCst);
            }
            Ok(_) => {}
            Err((e, message)) => {
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.get_or_insert_with(|| format!("{e} (topic {})", message.topic()));
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl KafkaChangelog {
    /// A writer to `topic`'s `partition`, with the service's producer settings and larger
    /// batches; it gives up waiting for the broker only on a second stop signal.
    pub fn new(
        producer_config: &ClientConfig,
        topic: &str,
        partition: i32,
        stop: Arc<AtomicUsize>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServiceError> {
        let mut config = producer_config.clone();
        config
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.max.bytes", MAX_RECORD_BYTES.to_string());
        let producer = config
            .create_with_context(Deliveries::default())
            .map_err(ServiceError::client("changelog producer"))?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            partition,
            stop,
            health,
            metrics,
        })
    }

    fn send(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        loop {
            let mut record = BaseRecord::<[u8], [u8]>::to(&self.topic)
                .partition(self.partition)
                .key(key);
            if let Some(value) = value {
                record = record.payload(value);
            }
            self.producer.context().in_flight.fetch_add(1, Ordering::SeqCst);
            match self.producer.send(record) {
                Ok(()) => {
                    self.metrics.changelog_records.inc();
                    return Ok(());
                }
                Err((e, _)) => {
                    self.producer.context().in_flight.fetch_sub(1, Ordering::SeqCst);
                    if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                        return Err(format!("cannot write to {}: {e}", self.topic));
                    }
                    self.producer.poll(Duration::from_millis(10));
                    self.interrupted()?;
                }
            }
        }
    }

    /// Waits until the broker acknowledged every record sent (or one failed).
    fn settle(&mut self) -> Result<(), String> {
        let started = Instant::now();
        while self.producer.context().in_flight.load(Ordering::SeqCst) > 0 {
            self.producer.poll(Duration::from_millis(5));
            self.interrupted()?;
            self.health.beat();
            if started.elapsed() > Duration::from_secs(1) {
                self.health.set_not_ready(Some(format!(
                    "waiting for the broker to acknowledge the window state's changelog ({} s)",
                    started.elapsed().as_secs()
                )));
            }
        }
        match self
            .producer
            .context()
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => Err(format!("the changelog {} refused a record: {e}", self.topic)),
            None => Ok(()),
        }
    }

    fn interrupted(&self) -> Result<(), String> {
        if self.stop.load(Ordering::Relaxed) >= 2 {
            return Err("interrupted while waiting for the broker".into());
        }
        Ok(())
    }
}

impl ChangelogWriter for KafkaChangelog {
    fn entry(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        self.send(key, value)
    }

    /// The marker goes only once every entry is acknowledged: whatever the producer's
    /// retries, no entry lands after its checkpoint's marker.
    fn commit(&mut self, marker: &Marker) -> Result<Logged, String> {
        self.settle()?;
        let value = serde_json::to_vec(marker).expect("serialises");
        self.send(MARKER_KEY, Some(&value))?;
        self.settle()?;
        Ok(Logged {
            topic: self.topic.clone(),
            partition: self.partition,
            next_offset: self.producer.context().marker_offset.load(Ordering::SeqCst) + 1,
            checkpoint: marker.checkpoint,
        })
    }
}

/// What a start read from the changelog.
#[derive(Debug, Default)]
pub struct Restored {
    /// Records read.
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Entries written to the local state.
    pub applied: u64,
    /// Expired window values left out.
    pub skipped: u64,
    /// Keys of an unfinished checkpoint written again with their restored values.
    pub repaired: u64,
    /// How long it took.
    pub took: Duration,
}

/// Brings the state directory `dir` up to date with the changelog `log` writes to (see the
/// module documentation): reads the topic from where the directory stands (its beginning for
/// an empty directory) to its end, applying each finished checkpoint. A checkpoint left
/// unfinished at the end (an instance killed while writing it) is not applied; its keys are
/// written again with their restored values and sealed with a marker, so that nothing of it
/// is applied later either. A changelog that is empty while the directory holds state (the
/// first start with a changelog) is filled from the directory.
pub fn restore(
    dir: &Path,
    consumer_config: &ClientConfig,
    log: &mut KafkaChangelog,
    health: &Health,
    metrics: &Metrics,
) -> Result<Restored, ServiceError> {
    let started = Instant::now();
    let store = StateStore::open(dir)?;
    let (topic, partition) = (log.topic.clone(), log.partition);
    let mut config = consumer_config.clone();
    config
        .set("group.id", format!("rampart-restore-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // A position past the topic's end is an error here, not a reason to read it all.
        .set("auto.offset.reset", "error")
        .set("fetch.message.max.bytes", MAX_RECORD_BYTES.to_string())
        .set(
            "receive.message.max.bytes",
            (MAX_RECORD_BYTES + (1 << 20)).to_string(),
        );
    let consumer: BaseConsumer = config
        .create()
        .map_err(ServiceError::client("changelog consumer"))?;
    // (The end the broker lists is only an estimate for progress messages: some brokers list
    // the start of the last record batch. The changelog is read until the consumer reaches
    // its end, as the fetches say.)
    let (low, high) = consumer
        .fetch_watermarks(&topic, partition, Duration::from_secs(15))
        .map_err(|e| ServiceError::Broker(format!("cannot read where the changelog {topic} ends: {e}")))?;
    let truncated = |at: i64| {
        ServiceError::Config(format!(
            "the changelog {topic} ends before the checkpoint the state directory {} holds (offset {at}): \
             the topic was recreated or truncated. Delete the topic to have it written again from the \
             directory, or the directory to restore from the topic",
            dir.display()
        ))
    };
    let local: Option<Logged> = store
        .meta_json::<Logged>(LOGGED_META)?
        .filter(|l| l.topic == topic && l.partition == partition);
    let holds_state = store.meta("progress")?.is_some() || store.meta("clock")?.is_some();
    let from = match &local {
        Some(l) => l.next_offset.max(low),
        None if holds_state && high <= low => {
            let mut restored = seed(&store, log)?;
            restored.took = started.elapsed();
            return Ok(restored);
        }
        None if holds_state => {
            return Err(ServiceError::Config(format!(
                "the state directory {} holds window state its changelog {topic} has no record of, \
                 and the changelog holds another: delete the directory to restore from the topic",
                dir.display()
            )));
        }
        None => low,
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, partition, Offset::Offset(from))
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| ServiceError::Broker(format!("cannot read the changelog {topic}: {e}")))?;
    tracing::info!(%topic, from, to = high, "restoring the window state from its changelog");
    let mut restore = store.restore();
    let mut out = Restored::default();
    let mut last_note = Instant::now();
    let mut last_record = Instant::now();
    loop {
        let message = match consumer.poll(Duration::from_millis(500)) {
            None if last_record.elapsed() > Duration::from_secs(60) => {
                return Err(ServiceError::Broker(format!(
                    "the changelog {topic} gave nothing for a minute at offset {} of {high}",
                    from + out.records as i64
                )));
            }
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                return Err(truncated(from));
            }
            Some(Err(e)) => {
                return Err(ServiceError::Broker(format!(
                    "cannot read the changelog {topic}: {e}"
                )));
            }
            Some(Ok(message)) => message,
        };
        last_record = Instant::now();
        let key = message.key().unwrap_or_default();
        let offset = message.offset();
        out.records += 1;
        out.bytes += (key.len() + message.payload_len()) as u64;
        metrics.restored_records.inc();
        metrics
            .restored_bytes
            .inc_by((key.len() + message.payload_len()) as u64);
        if is_marker(key) {
            let marker: Marker = serde_json::from_slice(message.payload().unwrap_or_default())
                .map_err(|e| store.corrupt(format!("changelog marker at offset {offset}"), e))?;
            let logged = Logged {
                topic: topic.clone(),
                partition,
                next_offset: offset + 1,
                checkpoint: marker.checkpoint,
            };
            restore.marker(marker, &logged)?;
        } else {
            restore.entry(key, message.payload())?;
        }
        if last_note.elapsed() >= Duration::from_secs(1) {
            last_note = Instant::now();
            health.set_not_ready(Some(format!(
                "restoring the window state from {topic}: offset {offset} of {high}"
            )));
        }
    }
    if out.records == 0 {
        tracing::info!(%topic, "the window state holds the changelog's last checkpoint");
    }
    let last = restore.last;
    (out.applied, out.skipped) = (restore.applied, restore.skipped);
    let unfinished = restore.unfinished();
    if !unfinished.is_empty() {
        out.repaired = unfinished.len() as u64;
        for key in &unfinished {
            let value = store.get_tagged(key)?;
            log.entry(key, value.as_deref())
                .map_err(rampart_engine::StateError::Changelog)?;
        }
        let marker = Marker {
            checkpoint: last
                .map(|m| m.checkpoint)
                .or(local.map(|l| l.checkpoint))
                .unwrap_or(0)
                + 1,
            entries: out.repaired,
            expired_before: last.map_or(i64::MIN, |m| m.expired_before),
        };
        let logged = log
            .commit(&marker)
            .map_err(rampart_engine::StateError::Changelog)?;
        write_logged(&store, &logged)?;
        tracing::warn!(
            %topic,
            keys = out.repaired,
            "the changelog ended with an unfinished checkpoint: not applied, its keys written again as restored"
        );
    }
    out.took = started.elapsed();
    tracing::info!(
        %topic,
        records = out.records,
        bytes = out.bytes,
        applied = out.applied,
        expired = out.skipped,
        seconds = out.took.as_secs_f64(),
        records_per_second = (out.records as f64 / out.took.as_secs_f64().max(1e-6)) as u64,
        "window state restored from its changelog"
    );
    Ok(out)
}

/// Fills an empty changelog from the state directory: every entry, then a marker.
fn seed(store: &StateStore, log: &mut KafkaChangelog) -> Result<Restored, ServiceError> {
    let mut out = Restored::default();
    store.for_each_entry(|key, value| {
        out.records += 1;
        out.bytes += (key.len() + value.len()) as u64;
        log.entry(key, Some(value))
    })?;
    let marker = Marker {
        checkpoint: 1,
        entries: out.records,
        expired_before: i64::MIN,
    };
    let logged = log
        .commit(&marker)
        .map_err(rampart_engine::StateError::Changelog)?;
    write_logged(store, &logged)?;
    tracing::info!(
        topic = %logged.topic,
        entries = out.records,
        bytes = out.bytes,
        "the changelog was empty: written from the state directory"
    );
    Ok(out)
}

/// Records in the local store where it stands in its changelog.
fn write_logged(store: &StateStore, logged: &Logged) -> Result<(), ServiceError> {
    let mut commit = store.commit(0);
    commit.meta(
        LOGGED_META,
        Some(&serde_json::to_vec(logged).expect("serialises")),
    );
    store.write(commit)?;
    Ok(())
}
