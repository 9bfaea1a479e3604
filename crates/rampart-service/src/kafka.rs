//! The Kafka clients: their configuration (defaults, `pipeline.toml`, environment), the topic
//! check at start, and the callbacks that seek to the offsets stored with the window state,
//! count delivery failures and feed health and lag metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rampart_engine::pipeline::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::ServiceError;
use crate::metrics::{Health, Metrics, PartitionLabels};

/// Environment variables `RAMPART_KAFKA_<NAME>` set librdkafka property `<name>` (lowercase,
/// `_` read as `.`) for both clients, e.g. `RAMPART_KAFKA_SASL_PASSWORD` sets `sasl.password`;
/// `RAMPART_KAFKA_BROKERS` replaces `kafka.brokers`.
const ENV_PREFIX: &str = "RAMPART_KAFKA_";

/// The next offset to consume per (topic, partition), as stored with the window state.
pub type StoredOffsets = Arc<Mutex<BTreeMap<(String, i32), i64>>>;

/// The start and end of a partition as the consumer's last fetch from it saw them (its log
/// start offset and high watermark), kept by librdkafka with no request to the broker; `None`
/// before a fetch answered (or for a partition the client does not know).
pub fn fetched_bounds<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives; `topic` is a NUL-terminated
    // string that outlives the call; librdkafka only writes the two offsets, under the
    // partition's lock, and keeps no pointer to any argument. (rdkafka wraps
    // `rd_kafka_query_watermark_offsets` as `fetch_watermarks`, a request to the broker, but not
    // this local read.)
    #[allow(unsafe_code)]
    let error = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &raw mut low,
            &raw mut high,
        )
    };
    // (librdkafka's invalid offset, -1001, until a fetch answers.)
    (error == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low.max(0), high))
}

/// The `[kafka]` settings a reload cannot change (the clients and subscriptions use them).
pub fn identity(kafka: &KafkaConfig) -> String {
    format!(
        "{} {} {:?} {} {} {} {:?} {:?} {:?}",
        kafka.brokers,
        kafka.group,
        kafka.input_topics,
        kafka.decisions_topic,
        kafka.shadow_topic,
        kafka.dead_letter_topic,
        kafka.changelog_topic,
        kafka.consumer,
        kafka.producer
    )
}

/// The client configurations: Rampart's defaults, then `[kafka.properties]` and
/// `[kafka.consumer]` / `[kafka.producer]`, then the environment.
pub fn client_configs(kafka: &KafkaConfig, env: &[(String, String)]) -> (ClientConfig, ClientConfig) {
    let brokers = env
        .iter()
        .find(|(k, _)| k == "RAMPART_KAFKA_BROKERS")
        .map_or(kafka.brokers.as_str(), |(_, v)| v.as_str());
    let from_env: Vec<(String, String)> = env
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(ENV_PREFIX)?;
            (name != "BROKERS").then(|| (name.to_ascii_lowercase().replace('_', "."), v.clone()))
        })
        .collect();

    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", brokers)
        .set("group.id", &kafka.group)
        // Offsets live in the state store; Kafka gets them at each checkpoint for lag tools.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Joins a group in seconds rather than tens of seconds on small brokers.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "5")
        // Once its queue is full (`queued.max.messages.kbytes`), librdkafka waits this long
        // before fetching again (1 s by default): a loop draining a backlog faster than that
        // found the queue empty and waited idle for most of each second (measured:
        // benchmarks/README.md, "Throughput per core").
        .set("fetch.queue.backoff.ms", "10")
        // (Each partition's lag tells the event-time clock whether a silent partition is idle
        // or still has records to give, and `--until-end` when the input is consumed.)
        .set("statistics.interval.ms", "250");
    let mut producer = ClientConfig::new();
    producer
        .set("bootstrap.servers", brokers)
        // Never give up on a decision: an unreachable broker holds it (and the input) back.
        .set("message.timeout.ms", "0")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in &kafka.consumer {
        consumer.set(k, v);
    }
    for (k, v) in &kafka.producer {
        producer.set(k, v);
    }
    for (k, v) in &from_env {
        consumer.set(k, v);
        producer.set(k, v);
    }
    (consumer, producer)
}

/// Checks that the topics exist, creating the missing ones when `create` is set.
pub fn ensure_topics(
    config: &ClientConfig,
    topics: &[&str],
    create: bool,
    partitions: i32,
) -> Result<(), ServiceError> {
    let admin: AdminClient<_> = config.create().map_err(ServiceError::client("admin"))?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(15))
        .map_err(|e| ServiceError::Broker(format!("cannot read the broker's metadata: {e}")))?;
    let existing: Vec<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name())
        .collect();
    let mut missing: Vec<&str> = topics.iter().copied().filter(|t| !existing.contains(t)).collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !create {
        return Err(ServiceError::Config(format!(
            "these topics do not exist on the broker: {}. Create them, or set `create_topics = true` under [kafka]",
            missing.join(", ")
        )));
    }
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let results = futures::executor::block_on(admin.create_topics(&new, &options))
        .map_err(|e| ServiceError::Broker(format!("cannot create topics: {e}")))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions, "created topic"),
            Err((topic, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(%topic, "topic created meanwhile");
            }
            Err((topic, code)) => {
                return Err(ServiceError::Broker(format!(
                    "cannot create topic {topic}: {code}"
                )));
            }
        }
    }
    Ok(())
}

/// Topic settings of the window state's changelog: compacted (the last value per state key);
/// records younger than a day are never compacted away, so that a checkpoint left unfinished
/// by a killed instance cannot make compaction drop the values it was replacing before
/// another instance restores the state and seals it; records as large as the producer sends.
pub fn changelog_topic_settings() -> Vec<(&'static str, String)> {
    vec![
        ("cleanup.policy", "compact".into()),
        ("min.compaction.lag.ms", "86400000".into()),
        (
            "max.message.bytes",
            crate::changelog::MAX_RECORD_BYTES.to_string(),
        ),
    ]
}

/// Makes sure a topic Rampart keeps for itself exists, creating it with `partitions` and
/// `settings` (whatever `create_topics` says: nobody else creates it). Returns its partition
/// count.
pub fn ensure_internal_topic(
    config: &ClientConfig,
    topic: &str,
    partitions: i32,
    settings: &[(&str, String)],
) -> Result<usize, ServiceError> {
    let admin: AdminClient<_> = config.create().map_err(ServiceError::client("admin"))?;
    let metadata = admin
        .inner()
        // (All topics: asking for one may create it with the broker's defaults.)
        .fetch_metadata(None, Duration::from_secs(15))
        .map_err(|e| ServiceError::Broker(format!("cannot read the broker's metadata: {e}")))?;
    if let Some(existing) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    {
        return Ok(existing.partitions().len());
    }
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (name, value) in settings {
        new = new.set(name, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let results = futures::executor::block_on(admin.create_topics([&new], &options))
        .map_err(|e| ServiceError::Broker(format!("cannot create topic {topic}: {e}")))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions, "created internal topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(ServiceError::Broker(format!(
                    "cannot create topic {topic}: {code}"
                )));
            }
        }
    }
    Ok(partitions as usize)
}

/// The partitions of `topics` as event-time sources (`kafka:TOPIC/PARTITION`).
pub fn partitions_of(config: &ClientConfig, topics: &[String]) -> Result<Vec<String>, ServiceError> {
    let admin: AdminClient<_> = config.create().map_err(ServiceError::client("admin"))?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(15))
        .map_err(|e| ServiceError::Broker(format!("cannot read the broker's metadata: {e}")))?;
    let mut out = Vec::new();
    for topic in topics {
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && !t.partitions().is_empty())
            .ok_or_else(|| ServiceError::Broker(format!("topic {topic} has no partitions")))?;
        out.extend(
            t.partitions()
                .iter()
                .map(|p| rampart_core::kafka_source(topic, p.id())),
        );
    }
    Ok(out)
}

/// The consumer's callbacks.
pub struct ConsumerCallbacks {
    /// Offsets stored with the window state, sought to on every assignment.
    pub offsets: StoredOffsets,
    /// Readiness and assignment.
    pub health: Arc<Health>,
    /// Lag gauges.
    pub metrics: Arc<Metrics>,
    /// Per partition (`kafka:TOPIC/PARTITION`): whether librdkafka last reported records not
    /// yet handed to the application.
    pub behind: Arc<Mutex<std::collections::BTreeMap<String, bool>>>,
}

impl ClientContext for ConsumerCallbacks {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        client_log("consumer", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&self.health, "consumer", &error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        note_statistics(&statistics, &self.metrics, &self.behind);
        self.health
            .statistics
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

/// A consumer's statistics: each partition's lag to the metrics, and (per
/// `kafka:TOPIC/PARTITION`) whether it has records not yet handed to the application.
pub fn note_statistics(statistics: &Statistics, metrics: &Metrics, behind: &Mutex<BTreeMap<String, bool>>) {
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            if *partition < 0 || !p.desired {
                continue;
            }
            let labels = PartitionLabels {
                topic: topic.clone(),
                partition: partition.to_string(),
            };
            metrics
                .consumer_lag
                .get_or_create(&labels)
                .set(p.consumer_lag.max(0));
            // The next offset the application takes, else where fetching stands.
            let position = if p.app_offset >= 0 {
                p.app_offset
            } else {
                p.next_offset.max(p.lo_offset)
            };
            let end = if p.ls_offset >= 0 {
                p.ls_offset
            } else {
                p.hi_offset
            };
            if end >= 0 && position >= 0 {
                behind
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(rampart_core::kafka_source(topic, *partition), end > position);
            }
        }
    }
}

impl ConsumerContext for ConsumerCallbacks {
    /// On assignment, starts each partition at the offset stored with the window state (the
    /// group's committed offset is only a fallback for partitions never consumed here).
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let stored = self.offsets.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for mut elem in tpl.elements() {
                    if let Some(next) = stored.get(&(elem.topic().to_string(), elem.partition()))
                        && let Err(e) = elem.set_offset(Offset::Offset(*next))
                    {
                        tracing::error!(error = %e, "cannot set a start offset");
                    }
                }
                let assigned: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset()))
                    .collect();
                tracing::info!(partitions = ?assigned, "partitions assigned");
                // What the statistics said of them under an earlier assignment is stale (the
                // clock counts a partition as behind until they speak again).
                {
                    let mut behind = self.behind.lock().unwrap_or_else(|p| p.into_inner());
                    for e in tpl.elements() {
                        behind.remove(&rampart_core::kafka_source(e.topic(), e.partition()));
                    }
                }
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "cannot take the assignment");
                }
                self.health.assigned.store(tpl.count() as u64, Ordering::Relaxed);
                self.health.assignments.fetch_add(1, Ordering::Relaxed);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "cannot drop the assignment");
                }
                self.health.assigned.store(0, Ordering::Relaxed);
                self.health.assignments.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                let _ = consumer.unassign();
                self.health.assigned.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// The producer's callbacks: every message carries a sequence number, and the numbers not yet
/// acknowledged are tracked, so that a checkpoint can wait for exactly the messages produced
/// before it while production goes on. Failed deliveries are counted (with
/// `message.timeout.ms = 0` librdkafka retries transient errors forever, so a failure here is
/// permanent).
#[derive(Default)]
pub struct ProducerCallbacks {
    /// Sequence numbers handed to the producer and not yet acknowledged (or failed).
    in_flight: Mutex<std::collections::BTreeSet<usize>>,
    /// Deliveries that failed for good.
    pub failed: AtomicU64,
    /// The last failure.
    pub last_error: Mutex<Option<String>>,
    /// Readiness.
    pub health: Arc<Health>,
}

impl ClientContext for ProducerCallbacks {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        client_log("producer", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&self.health, "producer", &error, reason);
    }
}

impl ProducerCallbacks {
    /// Callbacks that report outages to `health`.
    pub fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            ..Self::default()
        }
    }

    /// Notes that message `seq` is about to be handed to the producer.
    pub fn sending(&self, seq: usize) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq);
    }

    /// The last delivery failure, once any delivery failed for good (`None` before).
    pub fn failure(&self) -> Option<String> {
        (self.failed.load(Ordering::Relaxed) > 0).then(|| {
            self.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default()
        })
    }

    /// Whether every message numbered `seq` or lower has been acknowledged (or has failed).
    pub fn settled_through(&self, seq: usize) -> bool {
        let in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        in_flight.first().is_none_or(|first| *first > seq)
    }
}

impl ProducerContext for ProducerCallbacks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&seq);
        if let Err((e, message)) = result {
            use rdkafka::message::Message;
            let error = format!("{e} (topic {})", message.topic());
            tracing::error!(%error, "a message could not be delivered");
            self.failed.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        }
    }
}

/// librdkafka's own log lines, as `tracing` events with the target `librdkafka` (its
/// informational lines, such as each disconnection, at debug level).
pub(crate) fn client_log(client: &str, level: RDKafkaLogLevel, facility: &str, message: &str) {
    use RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "librdkafka", client, facility, "{message}")
        }
        L::Warning => tracing::warn!(target: "librdkafka", client, facility, "{message}"),
        L::Notice => tracing::info!(target: "librdkafka", client, facility, "{message}"),
        L::Info | L::Debug => tracing::debug!(target: "librdkafka", client, facility, "{message}"),
    }
}

/// Logs a client's error; one that means the broker cannot be reached makes the service not
/// ready (until messages or acknowledgements flow again).
fn client_error(health: &Health, client: &str, error: &KafkaError, reason: &str) {
    tracing::warn!(%error, reason, client, "Kafka client error");
    if is_outage(error) {
        health.set_not_ready(Some(format!("the broker is unreachable ({reason})")));
    }
}

/// Whether a client error means the broker cannot be reached.
fn is_outage(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(C::AllBrokersDown | C::BrokerTransportFailure | C::Resolve | C::BrokerNotAvailable)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_engine::PipelineConfig;

    #[test]
    fn environment_overrides_the_file_and_sets_any_property() {
        let text = r#"
name = "p"
[mapping]
event_time = "t"
actor = "a"
action = "x"
[kafka]
brokers = "file:9092"
input_topics = ["in"]
decisions_topic = "d"
dead_letter_topic = "dl"
[kafka.consumer]
"fetch.wait.max.ms" = "50"
"#;
        let config = PipelineConfig::parse(std::path::Path::new("pipeline.toml"), text).expect("valid");
        let kafka = config.kafka.expect("kafka");
        let env = vec![
            ("RAMPART_KAFKA_BROKERS".to_string(), "env:9093".to_string()),
            ("RAMPART_KAFKA_SASL_PASSWORD".to_string(), "secret".to_string()),
            ("RAMPART_KAFKA_FETCH_WAIT_MAX_MS".to_string(), "20".to_string()),
        ];
        let (consumer, producer) = client_configs(&kafka, &env);
        assert_eq!(consumer.get("bootstrap.servers"), Some("env:9093"));
        assert_eq!(producer.get("bootstrap.servers"), Some("env:9093"));
        assert_eq!(consumer.get("sasl.password"), Some("secret"));
        assert_eq!(producer.get("sasl.password"), Some("secret"));
        assert_eq!(
            consumer.get("fetch.wait.max.ms"),
            Some("20"),
            "the environment comes last"
        );
        assert_eq!(consumer.get("group.id"), Some("rampart-p"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(producer.get("message.timeout.ms"), Some("0"));
    }
}
