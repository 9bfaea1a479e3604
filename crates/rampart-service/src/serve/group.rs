//! Scale-out (`[kafka] state_partitions`): many instances in one consumer group, as in Kafka
//! Streams. Kafka is the only thing the instances share:
//!
//! - **Repartition.** Each instance forwards the input records of the input partitions the
//!   group gives it to the internal topic `<group>-repartition`, to the partition of the
//!   record's actor (Kafka's murmur2 of the actor, modulo `state_partitions`), unchanged, with
//!   their input position in headers (`rampart.topic`, `rampart.partition`, `rampart.offset`),
//!   so decisions keep the ids one instance gives them. After each round it tells every
//!   repartition partition how far each of its input partitions went in event time (a
//!   **mark**: an empty record with the `rampart.mark` header), so that an instance whose
//!   state partition gets no record of an input partition for a while still knows where it
//!   stands (Flink's watermarks across a shuffle).
//! - **State partitions.** The repartition topic's partitions are the window state's: the
//!   group gives each to one instance, which runs the whole pipeline on it (per-event and
//!   windowed detectors, the guard: every event of an actor meets in one place) in a
//!   processing loop of its own ([`super::Service`] with a [`Task`]): its own state
//!   directory (`<state dir>/partition-N`), restored from the changelog topic's partition N
//!   before it starts, its records consumed from the offset committed after its last
//!   checkpoint (records read again are skipped by their input offsets).
//! - **Rebalancing.** The cooperative-sticky assignor moves partitions one by one. A state
//!   partition given to this instance is paused on the group's consumer (its loop has a
//!   consumer of its own) and its loop started; a revoked one is checkpointed and its loop
//!   stopped before the partition is released. A revoked input partition is released after
//!   what was forwarded from it is on the broker and its offset committed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rampart_core::{SourcePosition, kafka_source};
use rampart_engine::input::decode::{Decoded, Decoder};
use rampart_engine::pipeline::config::KafkaConfig;
use rampart_engine::{Evaluator, Pipeline, StateChoice};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::{Instance, Parts, Service, follow_tables, restore_partition};
use crate::http::{AdminCommand, AdminRequest};
use crate::kafka::{self, ConsumerCallbacks, ProducerCallbacks};
use crate::metrics::{Health, Metrics};
use crate::{RunOptions, RunSummary, ServiceError};

/// The header that makes a repartition record a mark.
const MARK_HEADER: &str = "rampart.mark";
/// How often the forwarding side tells its progress (when it changed).
const MARK_EVERY: Duration = Duration::from_millis(50);
/// How often the forwarding side tells its progress even when it did not change: a state
/// partition that hears nothing of an input partition for [`MARK_STALE`] counts it as behind
/// (its forwarding instance may be gone, with records left), so never quiet.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(500);
/// See [`KEEPALIVE_EVERY`].
pub(super) const MARK_STALE: Duration = Duration::from_secs(2);
/// How often the forwarding side commits what the broker acknowledged.
const COMMIT_EVERY: Duration = Duration::from_millis(500);

/// What an instance forwarding an input partition tells every state partition after a
/// round: how far that input partition went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Mark {
    /// The input partition (`kafka:TOPIC/PARTITION`).
    pub(crate) source: String,
    /// Its newest event time forwarded (µs).
    pub(crate) newest: i64,
    /// The next offset to forward (-1: none forwarded yet).
    pub(crate) next_offset: i64,
    /// Whether it forwarded records since its last mark.
    pub(crate) gave_records: bool,
    /// Whether it has records the forwarding instance has not read yet.
    pub(crate) behind: bool,
}

/// A record of the repartition topic.
pub(super) enum Forwarded {
    Mark(Mark),
    /// An input record, at its input position (topic, partition, offset).
    Record((String, i32, i64)),
}

impl Forwarded {
    /// Reads a repartition record's headers (a record without them stands at its own position).
    pub(super) fn of(message: &BorrowedMessage<'_>) -> Self {
        let mut at = (None, None, None);
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                let value = header.value.map(String::from_utf8_lossy);
                match (header.key, value) {
                    (MARK_HEADER, _) => {
                        if let Some(mark) = message
                            .payload()
                            .and_then(|p| serde_json::from_slice::<Mark>(p).ok())
                        {
                            return Self::Mark(mark);
                        }
                    }
                    ("rampart.topic", Some(v)) => at.0 = Some(v.into_owned()),
                    ("rampart.partition", Some(v)) => at.1 = v.parse().ok(),
                    ("rampart.offset", Some(v)) => at.2 = v.parse().ok(),
                    _ => {}
                }
            }
        }
        match at {
            (Some(topic), Some(partition), Some(offset)) => Self::Record((topic, partition, offset)),
            _ => Self::Record((message.topic().to_string(), message.partition(), message.offset())),
        }
    }
}

/// What a processing loop owning one state partition knows of it.
pub(crate) struct Task {
    /// The repartition topic.
    pub(super) topic: String,
    /// The state partition.
    pub(super) partition: i32,
    /// Every input partition (the event-time clock's sources).
    pub(super) sources: Vec<String>,
    /// Whether the clock was told of them.
    pub(super) tracked: bool,
    /// Per input partition, whether its forwarding instance last said it is behind, and when
    /// that was applied.
    pub(super) marked_behind: BTreeMap<String, (bool, Instant)>,
    /// Offsets of the repartition topic to commit, for the group member owning it.
    pub(super) commits: mpsc::Sender<TopicPartitionList>,
}

/// Kafka's default partitioner's hash (murmur2 as in `org.apache.kafka.common.utils.Utils`):
/// the state partition of a key is `murmur2(key) & 0x7fffffff` modulo the partition count,
/// as the Java client's default partitioner places a keyed record.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The state partition of an actor.
pub fn state_partition(actor: &str, partitions: i32) -> i32 {
    (murmur2(actor.as_bytes()) & 0x7fff_ffff) % partitions
}

/// What every processing loop of this instance shares.
struct Shared {
    dir: PathBuf,
    state_dir: PathBuf,
    audit_path: Option<PathBuf>,
    kafka: KafkaConfig,
    repartition: String,
    changelog: String,
    consumer_config: ClientConfig,
    producer_config: ClientConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    signer: Option<rampart_enforce::signing::Signer>,
    sources: Vec<String>,
    commits: Mutex<mpsc::Sender<TopicPartitionList>>,
    env: Vec<(String, String)>,
    watch: bool,
    /// State partitions being restored: the instance is ready when none is.
    restoring: AtomicUsize,
}

/// A running processing loop.
struct Worker {
    stop: Arc<AtomicUsize>,
    reload: Arc<AtomicBool>,
    admin: mpsc::Sender<AdminRequest>,
    thread: JoinHandle<Result<RunSummary, ServiceError>>,
}

/// The group consumer's callbacks: start and stop processing loops, release input partitions.
struct Group {
    shared: Arc<Shared>,
    workers: Mutex<BTreeMap<i32, Worker>>,
    front: Arc<Mutex<Front>>,
    /// What stopped loops did, and the first failure.
    done: Mutex<(RunSummary, Option<ServiceError>)>,
    behind: Mutex<BTreeMap<String, bool>>,
    /// Raised once the instance stops: partitions assigned while leaving the group are not
    /// taken up.
    stopping: AtomicBool,
}

impl ClientContext for Group {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        kafka::client_log("group consumer", level, facility, message);
    }

    fn stats(&self, statistics: Statistics) {
        kafka::note_statistics(&statistics, &self.shared.metrics, &self.behind);
    }
}

impl ConsumerContext for Group {
    /// Before partitions go: state partitions are checkpointed and their loops stopped, input
    /// partitions' forwarded records acknowledged and their offsets committed.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let mut inputs = Vec::new();
        for e in tpl.elements() {
            if e.topic() == self.shared.repartition {
                self.stop_worker(e.partition(), 1);
            } else {
                inputs.push((e.topic().to_string(), e.partition()));
            }
        }
        if !inputs.is_empty() {
            let mut front = self.front.lock().unwrap_or_else(|p| p.into_inner());
            front.release(consumer, &inputs);
        }
        tracing::info!(partitions = tpl.count(), "partitions revoked");
    }

    /// After partitions come: state partitions are paused here (their loops consume them)
    /// and their loops started; input partitions are forwarded from their committed offset.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else {
            return;
        };
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut paused = TopicPartitionList::new();
        let mut names = Vec::new();
        for e in tpl.elements() {
            names.push(format!("{}/{}", e.topic(), e.partition()));
            if e.topic() == self.shared.repartition {
                paused.add_partition(e.topic(), e.partition());
                self.start_worker(e.partition());
            } else {
                let mut front = self.front.lock().unwrap_or_else(|p| p.into_inner());
                front.own(e.topic(), e.partition());
            }
        }
        if paused.count() > 0
            && let Err(e) = consumer.pause(&paused)
        {
            tracing::error!(error = %e, "cannot pause the state partitions on the group consumer");
        }
        tracing::info!(partitions = ?names, "partitions assigned");
        self.shared.health.assigned.store(
            self.workers.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            Ordering::Relaxed,
        );
    }
}

impl Group {
    fn start_worker(&self, partition: i32) {
        let stop = Arc::new(AtomicUsize::new(0));
        let reload = Arc::new(AtomicBool::new(false));
        let (admin, requests) = mpsc::channel();
        let shared = Arc::clone(&self.shared);
        let (worker_stop, worker_reload) = (Arc::clone(&stop), Arc::clone(&reload));
        let thread = std::thread::Builder::new()
            .name(format!("rampart-p{partition}"))
            .spawn(move || {
                let result = run_worker(&shared, partition, worker_stop, worker_reload, requests);
                if let Err(e) = &result {
                    tracing::error!(partition, error = %e, "the state partition's loop stopped");
                }
                result
            })
            .expect("a thread");
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).insert(
            partition,
            Worker {
                stop,
                reload,
                admin,
                thread,
            },
        );
    }

    /// Stops a state partition's loop (`signal` as the stop count: 1 checkpoints first) and
    /// waits for it.
    fn stop_worker(&self, partition: i32, signal: usize) {
        let worker = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&partition);
        if let Some(worker) = worker {
            worker.stop.fetch_max(signal, Ordering::SeqCst);
            self.joined(worker.thread.join());
            tracing::info!(partition, "state partition released");
        }
    }

    fn joined(&self, result: std::thread::Result<Result<RunSummary, ServiceError>>) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(Ok(summary)) => {
                done.0.events += summary.events;
                done.0.decisions += summary.decisions;
                done.0.bad_records += summary.bad_records;
                done.0.late_records += summary.late_records;
                done.0.checkpoints += summary.checkpoints;
            }
            Ok(Err(e)) => {
                done.1.get_or_insert(e);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Joins the loops that ended by themselves (a failure).
    fn reap(&self) {
        let ended: Vec<i32> = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, w)| w.thread.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            self.stop_worker(p, 1);
        }
    }

    /// Hands an operator's command to the loops that can carry it out, and answers with
    /// theirs: a revocation to the one owning the actor's state partition (if this instance
    /// owns it), anything else to every loop.
    fn dispatch(&self, request: AdminRequest) {
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let targets: Vec<&Worker> = match &request.command {
            AdminCommand::Revoke { actor, .. } => {
                let p = state_partition(actor, self.shared.partitions());
                match workers.get(&p) {
                    Some(w) => vec![w],
                    None => {
                        let _ = request.reply.send((
                            409,
                            format!(
                                "{actor}'s state partition ({p}) is owned by another instance of the group: \
                                 send the revocation to that instance\n"
                            ),
                        ));
                        return;
                    }
                }
            }
            _ => workers.values().collect(),
        };
        if targets.is_empty() {
            let _ = request.reply.send((
                503,
                "no state partition is assigned to this instance yet\n".into(),
            ));
            return;
        }
        let mut answers = Vec::new();
        for w in &targets {
            let (reply, answer) = mpsc::channel();
            let sent = w.admin.send(AdminRequest {
                command: request.command.clone(),
                operator: request.operator.clone(),
                reply,
            });
            if sent.is_ok() {
                answers.push(answer);
            }
        }
        drop(workers);
        let reply = request.reply;
        // (Answered on a thread: the loops answer between their rounds.)
        std::thread::spawn(move || {
            let mut status = 200;
            let mut body = String::new();
            for answer in answers {
                let (s, b) = answer
                    .recv_timeout(Duration::from_secs(60))
                    .unwrap_or((504, "a state partition's loop did not answer\n".into()));
                if status < 300 {
                    status = s;
                }
                if body.is_empty() || s >= 300 {
                    body = b;
                }
            }
            let _ = reply.send((status, body));
        });
    }
}

impl Shared {
    fn partitions(&self) -> i32 {
        self.kafka.state_partitions.unwrap_or(1)
    }
}

/// One state partition's processing loop, until its stop count is raised.
fn run_worker(
    shared: &Shared,
    partition: i32,
    stop: Arc<AtomicUsize>,
    reload: Arc<AtomicBool>,
    admin: mpsc::Receiver<AdminRequest>,
) -> Result<RunSummary, ServiceError> {
    let state = shared.state_dir.join(format!("partition-{partition}"));
    let mut pipeline = Pipeline::load_with(&shared.dir, StateChoice::Persistent(state), Evaluator::Keyed)
        .map_err(|e| {
            ServiceError::Config(format!(
                "cannot load the pipeline for state partition {partition}: {e}"
            ))
        })?;
    pipeline.config.audit_path = shared.audit_path.as_ref().map(|path| {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let ext = path
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        path.with_file_name(format!("{stem}.partition-{partition}{ext}"))
    });
    let (metrics, health) = (&shared.metrics, &shared.health);
    shared.restoring.fetch_add(1, Ordering::SeqCst);
    let changelog = restore_partition(
        &pipeline,
        &shared.changelog,
        partition,
        &shared.consumer_config,
        &shared.producer_config,
        (&stop, health, metrics),
    );
    if shared.restoring.fetch_sub(1, Ordering::SeqCst) == 1 {
        health.set_not_ready(None);
    }
    let changelog = changelog?;
    let tables = follow_tables(
        &pipeline,
        &shared.kafka,
        &shared.consumer_config,
        &shared.producer_config,
    )?;
    let offsets: kafka::StoredOffsets = Arc::default();
    let behind: Arc<Mutex<BTreeMap<String, bool>>> = Arc::default();
    let producer: ThreadedProducer<ProducerCallbacks> = shared
        .producer_config
        .create_with_context(ProducerCallbacks::new(Arc::clone(health)))
        .map_err(ServiceError::client("producer"))?;
    let consumer: BaseConsumer<ConsumerCallbacks> = shared
        .consumer_config
        .create_with_context(ConsumerCallbacks {
            offsets: Arc::clone(&offsets),
            health: Arc::clone(health),
            metrics: Arc::clone(metrics),
            behind: Arc::clone(&behind),
        })
        .map_err(ServiceError::client("consumer"))?;
    // From the offset committed after the last checkpoint (records before the state's own
    // position are skipped by their input offsets).
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&shared.repartition, partition, Offset::Stored)
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| {
            ServiceError::Broker(format!("cannot consume {}/{partition}: {e}", shared.repartition))
        })?;
    let options = RunOptions {
        listen: None,
        env: shared.env.clone(),
        stop,
        until_idle: None,
        until_end: false,
        reload,
        watch: shared.watch,
    };
    let task = super::group::Task {
        topic: shared.repartition.clone(),
        partition,
        sources: shared.sources.clone(),
        tracked: false,
        marked_behind: BTreeMap::new(),
        commits: shared.commits.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    };
    tracing::info!(partition, "state partition running");
    let mut service = Service::new(Parts {
        pipeline,
        kafka: &shared.kafka,
        consumer,
        producer,
        offsets,
        behind,
        committed: BTreeMap::new(),
        metrics: Arc::clone(metrics),
        health: Arc::clone(health),
        signer: shared.signer.clone(),
        admin,
        tables,
        changelog,
        task: Some(task),
        options: &options,
    })?;
    service.serve()?;
    Ok(service.summary)
}

/// The forwarding side: input records to the repartition topic, marks, input offsets.
struct Front {
    decoder: Decoder,
    producer: ThreadedProducer<ProducerCallbacks>,
    repartition: String,
    partitions: i32,
    /// Per owned input partition.
    sources: BTreeMap<(String, i32), Forwarding>,
    next_seq: usize,
    last_marks: Instant,
    last_commit: Instant,
    topics: BTreeMap<String, Arc<str>>,
}

/// Where forwarding one input partition stands.
#[derive(Default)]
struct Forwarding {
    /// The next offset to forward.
    next_offset: Option<i64>,
    newest: i64,
    /// The sequence number of the last record forwarded.
    last_seq: Option<usize>,
    /// The last mark sent: (newest, next offset, behind), and when.
    told: Option<(i64, Option<i64>, bool)>,
    told_at: Option<Instant>,
    committed: Option<i64>,
}

impl Front {
    fn own(&mut self, topic: &str, partition: i32) {
        self.sources
            .entry((topic.to_string(), partition))
            .or_insert(Forwarding {
                newest: i64::MIN,
                ..Forwarding::default()
            });
    }

    /// Forwards a round of input records: each to its actor's state partition (a record
    /// that does not decode to its partition's own number modulo the count: its state
    /// partition sends the dead letter), in input order.
    fn forward(&mut self, messages: &[OwnedMessage]) -> Result<(), ServiceError> {
        let mut routes: BTreeMap<(i32, i64), (i32, String, i64)> = BTreeMap::new();
        let partitions = self.partitions;
        let mut decoded = |d: Decoded| {
            if let Decoded::Batch(batch) = d {
                for (i, position) in batch.positions.iter().enumerate() {
                    if let SourcePosition::Kafka {
                        partition, offset, ..
                    } = position
                    {
                        let actor = batch.actor(i);
                        routes.entry((*partition, *offset)).or_insert((
                            state_partition(actor, partitions),
                            actor.to_string(),
                            batch.event_time(i),
                        ));
                    }
                }
            }
        };
        for m in messages {
            let topic = intern(&mut self.topics, m.topic());
            self.decoder.decode_message(
                &topic,
                m.partition(),
                m.offset(),
                m.payload().unwrap_or_default(),
                &mut decoded,
            );
        }
        self.decoder.flush(&mut decoded);
        let repartition = self.repartition.clone();
        for m in messages {
            let route = routes.get(&(m.partition(), m.offset()));
            let target = route.map_or(m.partition().rem_euclid(self.partitions), |r| r.0);
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "rampart.topic",
                    value: Some(m.topic()),
                })
                .insert(Header {
                    key: "rampart.partition",
                    value: Some(m.partition().to_string().as_str()),
                })
                .insert(Header {
                    key: "rampart.offset",
                    value: Some(m.offset().to_string().as_str()),
                });
            let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(&repartition, 0)
                .partition(target)
                .payload(m.payload().unwrap_or_default())
                .headers(headers);
            if let Some(r) = route {
                record = record.key(r.1.as_bytes());
            }
            if let Some(t) = m.timestamp().to_millis() {
                record = record.timestamp(t);
            }
            let seq = self.send(record)?;
            let source = self
                .sources
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(Forwarding {
                    newest: i64::MIN,
                    ..Forwarding::default()
                });
            source.next_offset = Some(m.offset() + 1);
            source.last_seq = Some(seq);
            if let Some(r) = route {
                source.newest = source.newest.max(r.2);
            }
        }
        Ok(())
    }

    fn send(&mut self, record: BaseRecord<'_, [u8], [u8], usize>) -> Result<usize, ServiceError> {
        self.next_seq += 1;
        let seq = self.next_seq;
        let mut record = record.delivery_opaque(seq);
        self.producer.context().sending(seq);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(seq),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    return Err(ServiceError::Broker(format!(
                        "cannot forward to {}: {e}",
                        self.repartition
                    )));
                }
            }
        }
    }

    /// Every `MARK_EVERY`: tells every state partition how far each owned input partition
    /// went, for those whose progress changed. Every `COMMIT_EVERY`: commits the input
    /// offsets whose forwarded records the broker has.
    fn tick(
        &mut self,
        consumer: &BaseConsumer<Group>,
        behind: &BTreeMap<String, bool>,
    ) -> Result<(), ServiceError> {
        if self.last_marks.elapsed() >= MARK_EVERY {
            self.last_marks = Instant::now();
            let mut marks = Vec::new();
            for ((topic, partition), f) in &mut self.sources {
                let name = kafka_source(topic, *partition);
                let b = behind.get(&name).copied().unwrap_or(false);
                let now = (f.newest, f.next_offset, b);
                let fresh = f.told_at.is_some_and(|t| t.elapsed() < KEEPALIVE_EVERY);
                if f.told == Some(now) && fresh {
                    continue;
                }
                marks.push(Mark {
                    source: name,
                    newest: f.newest,
                    next_offset: f.next_offset.unwrap_or(-1),
                    gave_records: f.told.is_none_or(|t| t.1 != f.next_offset),
                    behind: b,
                });
                f.told = Some(now);
                f.told_at = Some(Instant::now());
            }
            let repartition = self.repartition.clone();
            for mark in marks {
                let payload = serde_json::to_vec(&mark).expect("serialises");
                for p in 0..self.partitions {
                    let record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(&repartition, 0)
                        .partition(p)
                        .payload(payload.as_slice())
                        .headers(OwnedHeaders::new().insert(Header {
                            key: MARK_HEADER,
                            value: Some("1"),
                        }));
                    self.send(record)?;
                }
            }
        }
        if self.last_commit.elapsed() >= COMMIT_EVERY {
            self.last_commit = Instant::now();
            let tpl = self.settled();
            if tpl.count() > 0
                && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
            {
                tracing::debug!(error = %e, "input offset commit");
            }
        }
        Ok(())
    }

    /// The input offsets whose forwarded records the broker acknowledged, not yet committed.
    fn settled(&mut self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), f) in &mut self.sources {
            if let (Some(next), Some(seq)) = (f.next_offset, f.last_seq)
                && f.committed != Some(next)
                && self.producer.context().settled_through(seq)
                && tpl
                    .add_partition_offset(topic, *partition, Offset::Offset(next))
                    .is_ok()
            {
                f.committed = Some(next);
            }
        }
        tpl
    }

    /// Before input partitions go: what was forwarded from them is acknowledged and their
    /// offsets committed.
    fn release(&mut self, consumer: &BaseConsumer<Group>, partitions: &[(String, i32)]) {
        if let Err(e) = self.producer.flush(Duration::from_secs(30)) {
            tracing::warn!(error = %e, "forwarded records not all acknowledged before a revocation");
        }
        let tpl = self.settled();
        if tpl.count() > 0
            && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "input offset commit before a revocation");
        }
        for key in partitions {
            self.sources.remove(key);
        }
    }
}

/// The shared name of a topic.
fn intern(topics: &mut BTreeMap<String, Arc<str>>, name: &str) -> Arc<str> {
    if let Some(t) = topics.get(name) {
        return Arc::clone(t);
    }
    let t: Arc<str> = Arc::from(name);
    topics.insert(name.to_string(), Arc::clone(&t));
    t
}

/// Runs this instance as one member of the group (see the module documentation) until
/// `options.stop` is raised.
pub(super) fn run(
    pipeline: Pipeline,
    options: RunOptions,
    kafka: &KafkaConfig,
    partitions: i32,
    instance: Instance,
) -> Result<RunSummary, ServiceError> {
    if options.until_end || options.until_idle.is_some() {
        return Err(ServiceError::Config(
            "--until-end and --until-idle stop one instance, not a group: with [kafka] state_partitions, \
             stop the instances with SIGTERM"
                .into(),
        ));
    }
    let keyed_otherwise = pipeline.windows_not_keyed_by(rampart_core::event::ACTOR);
    if !keyed_otherwise.is_empty() {
        let list: Vec<String> = keyed_otherwise
            .iter()
            .map(|(id, key)| format!("{id} (keyed by {key})"))
            .collect();
        return Err(ServiceError::Config(format!(
            "with [kafka] state_partitions the window state is partitioned by actor, and these windowed \
             detectors are keyed otherwise: {}. Key them by actor, or run without state_partitions",
            list.join(", ")
        )));
    }
    let StateChoice::Persistent(state_dir) = pipeline.state_choice().clone() else {
        return Err(ServiceError::Config(
            "service mode needs a persistent window state".into(),
        ));
    };
    let Instance {
        metrics,
        health,
        endpoint,
        admin,
        signer,
    } = instance;
    let (consumer_config, producer_config) = kafka::client_configs(kafka, &options.env);
    let mut topics: Vec<&str> = kafka.input_topics.iter().map(String::as_str).collect();
    topics.extend([
        kafka.decisions_topic.as_str(),
        kafka.shadow_topic.as_str(),
        kafka.dead_letter_topic.as_str(),
    ]);
    kafka::ensure_topics(&producer_config, &topics, kafka.create_topics, kafka.partitions)?;
    let repartition = format!("{}-repartition", kafka.group);
    let changelog = kafka
        .changelog_topic
        .clone()
        .ok_or_else(|| ServiceError::Config("[kafka] state_partitions needs the changelog".into()))?;
    for (topic, settings) in [
        (&repartition, Vec::new()),
        (&changelog, kafka::changelog_topic_settings()),
    ] {
        let found = kafka::ensure_internal_topic(&producer_config, topic, partitions, &settings)?;
        if found != partitions as usize {
            return Err(ServiceError::Config(format!(
                "{topic} has {found} partitions and [kafka] state_partitions is {partitions}: the state \
                 partitions are fixed once chosen (delete the group's internal topics and state to start the \
                 windows afresh with another count)"
            )));
        }
    }
    let sources = kafka::partitions_of(&producer_config, &kafka.input_topics)?;
    let (commits_sender, commits) = mpsc::channel();
    let shared = Arc::new(Shared {
        dir: pipeline.dir.clone(),
        state_dir,
        audit_path: pipeline.config.audit_path.clone(),
        kafka: kafka.clone(),
        repartition: repartition.clone(),
        changelog,
        consumer_config: consumer_config.clone(),
        producer_config: producer_config.clone(),
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
        signer,
        sources,
        commits: Mutex::new(commits_sender),
        env: options.env.clone(),
        watch: options.watch,
        restoring: AtomicUsize::new(0),
    });
    let mut forward_config = producer_config.clone();
    // Records and the marks after them must land in the order sent, retries or not: a mark
    // ahead of its records would make them late.
    forward_config
        .set("linger.ms", "5")
        .set("enable.idempotence", "true");
    let front = Front {
        decoder: pipeline.decoder(),
        producer: forward_config
            .create_with_context(ProducerCallbacks::new(Arc::clone(&health)))
            .map_err(ServiceError::client("forwarding producer"))?,
        repartition: repartition.clone(),
        partitions,
        sources: BTreeMap::new(),
        next_seq: 0,
        last_marks: Instant::now(),
        last_commit: Instant::now(),
        topics: BTreeMap::new(),
    };
    // The loops load their own pipelines.
    drop(pipeline);
    let mut group_config = consumer_config;
    group_config.set("partition.assignment.strategy", "cooperative-sticky");
    if let Some((_, id)) = options.env.iter().find(|(k, _)| k == "RAMPART_INSTANCE_ID") {
        // Static membership: a restart within the session timeout keeps its partitions.
        group_config.set("group.instance.id", id);
    }
    let group = Group {
        shared: Arc::clone(&shared),
        workers: Mutex::new(BTreeMap::new()),
        front: Arc::new(Mutex::new(front)),
        done: Mutex::new((RunSummary::default(), None)),
        behind: Mutex::new(BTreeMap::new()),
        stopping: AtomicBool::new(false),
    };
    let consumer: BaseConsumer<Group> = group_config
        .create_with_context(group)
        .map_err(ServiceError::client("group consumer"))?;
    let mut subscription: Vec<&str> = kafka.input_topics.iter().map(String::as_str).collect();
    subscription.push(&repartition);
    consumer
        .subscribe(&subscription)
        .map_err(|e| ServiceError::Broker(format!("cannot subscribe to {}: {e}", subscription.join(", "))))?;
    health.set_not_ready(None);
    tracing::info!(
        inputs = %kafka.input_topics.join(", "),
        %repartition,
        state_partitions = partitions,
        "running as a member of group {}",
        kafka.group
    );
    let result = coordinate(&consumer, &options, &admin, &commits, &repartition);
    consumer.context().stopping.store(true, Ordering::SeqCst);
    // Stop the loops (a checkpoint each), then release the input.
    let signal = options.stop.load(Ordering::SeqCst).max(1);
    let owned: Vec<i32> = consumer
        .context()
        .workers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .copied()
        .collect();
    for p in owned {
        consumer.context().stop_worker(p, signal);
    }
    {
        let mut front = consumer.context().front.lock().unwrap_or_else(|p| p.into_inner());
        let all: Vec<(String, i32)> = front.sources.keys().cloned().collect();
        front.release(&consumer, &all);
    }
    while let Ok(tpl) = commits.try_recv() {
        let _ = consumer.commit(&tpl, CommitMode::Sync);
    }
    consumer.unsubscribe();
    drop(endpoint);
    let (summary, failed) =
        std::mem::take(&mut *consumer.context().done.lock().unwrap_or_else(|p| p.into_inner()));
    result?;
    if let Some(e) = failed {
        return Err(e);
    }
    tracing::info!(
        events = summary.events,
        decisions = summary.decisions,
        "stopped cleanly"
    );
    Ok(summary)
}

/// The group member's loop: poll (rebalances happen here), forward input records, mark,
/// commit the state partitions' offsets, hand operators' commands on.
fn coordinate(
    consumer: &BaseConsumer<Group>,
    options: &RunOptions,
    admin: &mpsc::Receiver<AdminRequest>,
    commits: &mpsc::Receiver<TopicPartitionList>,
    repartition: &str,
) -> Result<(), ServiceError> {
    let group = consumer.context();
    let mut round: Vec<OwnedMessage> = Vec::new();
    loop {
        group.shared.health.beat();
        if options.stop.load(Ordering::Relaxed) > 0 {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_millis(5);
        while round.len() < 2048 {
            let timeout = if round.is_empty() {
                Duration::from_millis(20)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "group consumer error");
                    break;
                }
                // (State partitions are paused here: a record fetched before the pause is
                // its loop's to consume.)
                Some(Ok(m)) if m.topic() == repartition => {}
                Some(Ok(m)) => round.push(m.detach()),
            }
        }
        let behind = group.behind.lock().unwrap_or_else(|p| p.into_inner()).clone();
        {
            let mut front = group.front.lock().unwrap_or_else(|p| p.into_inner());
            if !round.is_empty() {
                front.forward(&round)?;
                round.clear();
            }
            front.tick(consumer, &behind)?;
        }
        while let Ok(tpl) = commits.try_recv() {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "state partition offset commit");
            }
        }
        while let Ok(request) = admin.try_recv() {
            group.dispatch(request);
        }
        if options.reload.swap(false, Ordering::SeqCst) {
            for w in group.workers.lock().unwrap_or_else(|p| p.into_inner()).values() {
                w.reload.store(true, Ordering::SeqCst);
            }
        }
        group.reap();
        if let Some(e) = group.done.lock().unwrap_or_else(|p| p.into_inner()).1.take() {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_the_java_clients_hash() {
        // org.apache.kafka.common.utils.UtilsTest.testMurmur2
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58_897_971
        );
        assert_eq!(murmur2(b"abc"), 479_470_107);
        assert_eq!(state_partition("foobar", 7), (-790_332_482i32 & 0x7fff_ffff) % 7);
    }
}
