//! The enforcement state on Kafka: a compacted topic (`[kafka] enforcement_topic`, default
//! `<decisions topic>.enforcement`) holding every block and review hold in force and the
//! revocations that lift them, so that an enforcement point starting up reads what is in force
//! instead of the whole decisions topic (`rampart_enforce::Bootstrap`), and a block that
//! outlives the decisions topic's retention is not lost.
//!
//! - **Records**: the decision exactly as published (its bytes and its signature headers, so
//!   enforcement points verify it as they verify the decisions topic), keyed
//!   `b ACTOR DETECTOR` for a block or hold and `r ACTOR DETECTOR` for a revocation (detector
//!   `*`: every one; the parts separated by NUL). Compaction keeps the last of each: the newest
//!   block of a detector for an actor, and the newest revocation; the enforcement point lifts
//!   a block decided at or before a revocation whatever the order it reads them in. The header
//!   `rampart.until` says until when a record matters: a block's expiry; a revocation's time
//!   plus the longest block the pipeline gives (no block it lifts outlives that).
//! - **Partitions**: the actor's state partition (Kafka's murmur2 of the actor, as the
//!   repartition topic), so that the instance owning an actor's state partition owns its
//!   records; one partition for one instance.
//! - **Expiry**: the owner of a partition reads it at start and follows it, and writes a
//!   tombstone for each record past its `until` (compaction then forgets it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rampart_core::{Decision, Verdict};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::ServiceError;

/// The header with the time until which a record matters (RFC 3339).
pub const UNTIL_HEADER: &str = "rampart.until";

/// How often the owner of a partition looks for records past their time.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Topic settings of the enforcement state: compacted; tombstones kept a day, so that an
/// enforcement point reading slowly still sees them.
pub fn topic_settings() -> Vec<(&'static str, String)> {
    vec![
        ("cleanup.policy", "compact".into()),
        ("delete.retention.ms", "86400000".into()),
    ]
}

/// One processing loop's view of the enforcement-state topic.
pub struct EnforcementState {
    topic: String,
    partitions: i32,
    /// The longest block the pipeline gives.
    longest_block: chrono::Duration,
    /// The partition this loop owns (its actors' records), if any.
    owned: Option<Owned>,
}

/// The records of the owned partition, followed.
struct Owned {
    partition: i32,
    consumer: BaseConsumer,
    /// Per record key: until when it matters.
    until: HashMap<Vec<u8>, DateTime<Utc>>,
    last_sweep: Instant,
}

/// A record to write to the enforcement-state topic.
pub struct Entry {
    pub partition: i32,
    pub key: Vec<u8>,
    /// RFC 3339; `None` for a tombstone.
    pub until: Option<String>,
}

impl EnforcementState {
    /// The state of `topic` (of `partitions` partitions) for a loop that owns `owned` (the
    /// actor's state partition it runs; `None`: it only writes, as the loops of other routes
    /// do), read up to its end.
    pub fn open(
        topic: &str,
        partitions: i32,
        owned: Option<i32>,
        longest_block: Duration,
        consumer_config: &ClientConfig,
    ) -> Result<Self, ServiceError> {
        let owned = match owned {
            Some(partition) => Some(Owned::read(topic, partition, consumer_config)?),
            None => None,
        };
        Ok(Self {
            topic: topic.to_string(),
            partitions,
            longest_block: chrono::Duration::from_std(longest_block).unwrap_or(chrono::Duration::MAX),
            owned,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The record a published decision becomes, if it is one the enforcement points need
    /// at start: an enforced block or hold not yet expired, or a revocation.
    pub fn entry(&mut self, decision: &Decision) -> Option<Entry> {
        if decision.mode != rampart_core::Mode::Enforce {
            return None;
        }
        let (kind, until) = match decision.verdict {
            Verdict::Block | Verdict::Review => ("b", time(decision.expires_at.as_deref()?)?),
            Verdict::Revoke => {
                let at = time(&decision.processed_at)?
                    .max(time(&decision.event_time).unwrap_or(DateTime::<Utc>::MIN_UTC));
                (
                    "r",
                    at.checked_add_signed(self.longest_block)
                        .unwrap_or(DateTime::<Utc>::MAX_UTC),
                )
            }
            Verdict::Alert => return None,
        };
        if until <= Utc::now() {
            return None;
        }
        let key = [kind, &decision.actor, &decision.detector.id]
            .join("\0")
            .into_bytes();
        let partition = super::group::state_partition(&decision.actor, self.partitions);
        if let Some(owned) = self.owned.as_mut().filter(|o| o.partition == partition) {
            match owned.until.get(&key) {
                // A longer block of the same detector is in force: keep its record.
                Some(known) if kind == "b" && *known >= until => return None,
                _ => {
                    owned.until.insert(key.clone(), until);
                }
            }
        }
        Some(Entry {
            partition,
            key,
            until: Some(until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        })
    }

    /// Every few seconds: the tombstones of the owned partition's records past their time
    /// (after reading what other loops wrote to it since).
    pub fn sweep(&mut self) -> Vec<Entry> {
        let Some(owned) = self.owned.as_mut() else {
            return Vec::new();
        };
        if owned.last_sweep.elapsed() < SWEEP_EVERY {
            return Vec::new();
        }
        owned.last_sweep = Instant::now();
        owned.follow(Duration::ZERO);
        let now = Utc::now();
        let expired: Vec<Vec<u8>> = owned
            .until
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(key, _)| key.clone())
            .collect();
        expired
            .into_iter()
            .map(|key| {
                owned.until.remove(&key);
                Entry {
                    partition: owned.partition,
                    key,
                    until: None,
                }
            })
            .collect()
    }
}

impl Owned {
    /// Reads `partition` of `topic` to its end.
    fn read(topic: &str, partition: i32, consumer_config: &ClientConfig) -> Result<Self, ServiceError> {
        let consumer: BaseConsumer = consumer_config
            .clone()
            .set("enable.auto.commit", "false")
            .create()
            .map_err(ServiceError::client("enforcement-state consumer"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(ServiceError::client("enforcement-state consumer"))?;
        consumer
            .assign(&tpl)
            .map_err(ServiceError::client("enforcement-state consumer"))?;
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(15))
            .map_err(|e| ServiceError::Broker(format!("cannot read the end of {topic}/{partition}: {e}")))?;
        let mut owned = Self {
            partition,
            consumer,
            until: HashMap::new(),
            last_sweep: Instant::now(),
        };
        let started = Instant::now();
        let mut next = 0;
        while next < high {
            match owned.follow(Duration::from_millis(200)) {
                Some(at) => next = at,
                None if started.elapsed() > Duration::from_secs(120) => {
                    return Err(ServiceError::Broker(format!(
                        "{topic}/{partition} was not read to its end ({next} of {high}) in two minutes"
                    )));
                }
                None => {}
            }
        }
        tracing::info!(
            topic,
            partition,
            records = owned.until.len(),
            seconds = started.elapsed().as_secs_f64(),
            "enforcement state read"
        );
        Ok(owned)
    }

    /// Takes what was written to the partition since the last call (waiting at most `wait`
    /// for the first record); returns the next offset, if anything was read.
    fn follow(&mut self, wait: Duration) -> Option<i64> {
        let mut next = None;
        let mut timeout = wait;
        while let Some(Ok(m)) = self.consumer.poll(timeout) {
            timeout = Duration::ZERO;
            next = Some(m.offset() + 1);
            let Some(key) = m.key() else { continue };
            let until = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == UNTIL_HEADER))
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(time);
            match (m.payload(), until) {
                (Some(_), Some(until)) => {
                    let known = self.until.entry(key.to_vec()).or_insert(until);
                    *known = (*known).max(until);
                }
                _ => {
                    self.until.remove(key);
                }
            }
        }
        next
    }
}

/// An RFC 3339 time.
fn time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}
