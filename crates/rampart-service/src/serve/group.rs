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
//! - **Routes.** A window's rows must meet where its key's state is. Windows keyed by actor
//!   (and the per-event detectors, and the guard) run on `<group>-repartition`, partitioned by
//!   actor; a window keyed by another column of `events` and not by actor (a source address,
//!   a tenant) gets `<group>-repartition-by-COLUMN`, partitioned by that column; a window
//!   keyed by no column of `events` (a platform-wide count) gets `<group>-repartition-single`,
//!   one partition. Each route has its changelog topic (`<changelog>`, `<changelog>-by-COLUMN`,
//!   `<changelog>-single`), and every input record goes to each route.
//! - **State partitions.** The repartition topics' partitions are the window state's: the
//!   group gives each to one instance, which runs its route's part of the pipeline on it in a
//!   processing loop of its own ([`super::Service`] with a [`Task`]): its own state directory
//!   (`<state dir>/partition-N`, `by-COLUMN-partition-N`, `single-partition-0`), restored from
//!   the changelog topic's partition N before it starts, its records consumed from the offset
//!   committed after its last checkpoint (records read again are skipped by their input
//!   offsets). Dead letters and the event counts come from the actor's route only.
//! - **Operators' commands.** A revocation or a re-arming sent to any instance is written to
//!   the repartition topics as a command record, to the partitions whose loops hold what it
//!   changes (the actor's, for a revocation on the actor's route; every partition of the
//!   other routes): whichever instance owns them carries it out, now or after a rebalance.
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
use rampart_engine::guardrails::guard::GuardNote;
use rampart_engine::input::decode::{Decoded, Decoder};
use rampart_engine::pipeline::config::KafkaConfig;
use rampart_engine::{Evaluator, Pipeline, Route, StateChoice};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::source::intern;
use super::{Instance, Parts, Service, follow_tables, restore_partition};
use crate::http::{AdminCommand, AdminRequest, Operator};
use crate::kafka::{self, ConsumerCallbacks, ProducerCallbacks};
use crate::metrics::{Health, Metrics};
use crate::{RunOptions, RunSummary, ServiceError};

/// The header that makes a repartition record a mark.
const MARK_HEADER: &str = "rampart.mark";
/// The header that makes a repartition record an operator's command.
const COMMAND_HEADER: &str = "rampart.command";
/// The header that makes a repartition record what a state partition's guard tells the
/// others of its route (blast-radius counts, a trip).
const GUARD_HEADER: &str = "rampart.guard";
/// How often the forwarding side tells its progress (when it changed).
const MARK_EVERY: Duration = Duration::from_millis(50);
/// How often the forwarding side tells its progress even when it did not change, and how
/// long a state partition that heard nothing of an input partition since counts it as behind
/// (its forwarding instance may be stopped, in a rebalance or gone, with records left), for a
/// pipeline whose stream counts as quiet after `quiet_after`: well within it, so that an input
/// partition whose forwarder stopped counts as behind before its silence could make the stream
/// quiet (rows would then be decided at once without the records still to come).
pub(super) fn mark_timing(quiet_after: Duration) -> (Duration, Duration) {
    let keepalive = (quiet_after / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let stale = (quiet_after * 3 / 4).clamp(2 * keepalive, Duration::from_secs(2));
    (keepalive, stale)
}
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

/// An operator's command, carried to the state partitions it concerns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupCommand {
    pub(crate) command: AdminCommand,
    pub(crate) operator: Operator,
    /// Whether this state partition publishes the revoke decision (one of those a
    /// revocation goes to does; the others lift their repeat suppression only).
    pub(crate) publish: bool,
}

/// What a state partition's guard told the others of its route.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GuardTold {
    /// The state partition that told it.
    pub(crate) from: i32,
    pub(crate) note: GuardNote,
}

/// A record of the repartition topic.
pub(super) enum Forwarded {
    Mark(Mark),
    Command(GroupCommand),
    Guard(GuardTold),
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
                    (GUARD_HEADER, _) => {
                        if let Some(told) = message
                            .payload()
                            .and_then(|p| serde_json::from_slice::<GuardTold>(p).ok())
                        {
                            return Self::Guard(told);
                        }
                    }
                    (COMMAND_HEADER, _) => {
                        if let Some(command) = message
                            .payload()
                            .and_then(|p| serde_json::from_slice::<GroupCommand>(p).ok())
                        {
                            return Self::Command(command);
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
    /// The route's state partitions.
    pub(super) partitions: i32,
    /// The detectors whose blast-radius alert this state partition publishes (each
    /// detector's comes from the state partition of its id in the detector's route).
    pub(super) speaks_for: Vec<String>,
    /// Whether this is the actor's route: the one that sends dead letters and counts events
    /// (every route reads every record).
    pub(super) primary: bool,
    /// The group's routes (a reload may not need another).
    pub(super) routes: Vec<Route>,
    /// Every input partition (the event-time clock's sources).
    pub(super) sources: Vec<String>,
    /// Whether the clock was told of them.
    pub(super) tracked: bool,
    /// Per input partition, whether its forwarding instance last said it is behind, and when
    /// that was applied.
    pub(super) marked_behind: BTreeMap<String, (bool, Instant)>,
    /// Offsets of the repartition topic to commit, for the group member owning it.
    pub(super) commits: mpsc::Sender<TopicPartitionList>,
    /// Whether the repartition partition's records come without a gap.
    pub(super) continuity: Continuity,
}

/// How long a state partition's loop reads a gap of its repartition partition again before
/// it takes the records after it (the ones in the gap are then lost: deleted by retention).
const GAP_PATIENCE: Duration = Duration::from_secs(10);

/// The offsets of a state partition's repartition partition, as its loop reads them. They
/// follow one another: the topic is written by idempotent producers without transactions and
/// never compacted, so there is no control record and no compacted-away offset between two
/// records. A record past the next offset means the broker showed a later batch before an
/// earlier one, and a consumer that took it would never see the earlier one. (Tansu 0.6, the
/// local broker, moves a partition's high watermark before it has stored the batch, so with
/// several instances writing to one partition a fetch may find the batch written second while
/// the first is still being stored.) The loop reads from the gap again instead, until the
/// records come or, after [`GAP_PATIENCE`], takes them as deleted.
#[derive(Debug, Default)]
pub(crate) struct Continuity {
    /// The offset the next record must have (`None`: not known yet).
    next: Option<i64>,
    /// A gap being read again: its first offset, since when.
    gap: Option<(i64, Instant)>,
}

/// What to do with a record of the repartition partition (see [`Continuity::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The next record: take it.
    Take,
    /// A record taken already (the consumer went back to a gap): skip it.
    Again,
    /// A record past a gap: read again from `from`.
    Gap { from: i64 },
    /// A record past a gap that did not fill in time: take it; the records from `from` to
    /// before it are lost.
    Lost { from: i64 },
}

impl Continuity {
    /// Reading from `start` (`None`: the group's committed offset, not known here).
    pub(crate) fn from(start: Option<i64>) -> Self {
        Self {
            next: start,
            gap: None,
        }
    }

    /// Checks the record at `offset`, read at `now`.
    pub(crate) fn check(&mut self, offset: i64, now: Instant) -> Step {
        match self.next {
            Some(next) if offset < next => return Step::Again,
            Some(next) if offset > next => {
                let since = match self.gap {
                    Some((from, since)) if from == next => since,
                    _ => {
                        self.gap = Some((next, now));
                        now
                    }
                };
                if now.duration_since(since) < GAP_PATIENCE {
                    return Step::Gap { from: next };
                }
                self.gap = None;
                self.next = Some(offset + 1);
                return Step::Lost { from: next };
            }
            _ => {}
        }
        self.gap = None;
        self.next = Some(offset + 1);
        Step::Take
    }
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

/// One route's topics and where its state partitions keep their state.
#[derive(Debug, Clone)]
struct Family {
    route: Route,
    /// `<group>-repartition[-by-COLUMN | -single]`.
    repartition: String,
    /// `<changelog>[-by-COLUMN | -single]`.
    changelog: String,
    /// State partitions (1 for [`Route::Single`]).
    partitions: i32,
    /// What the route's state directories and audit logs are named with: `partition-N`,
    /// `by-COLUMN-partition-N`, `single-partition-N`.
    prefix: String,
    /// The routing column's index in decoded batches (`None`: single).
    column: Option<usize>,
}

impl Family {
    fn new(route: Route, kafka: &KafkaConfig, changelog: &str, partitions: i32, pipeline: &Pipeline) -> Self {
        let (suffix, prefix, column) = match &route {
            Route::Column(c) if route.is_actor() => (String::new(), String::new(), Some(c)),
            Route::Column(c) => {
                let safe: String = c
                    .chars()
                    .map(|ch| {
                        if ch.is_ascii_alphanumeric() || ch == '_' {
                            ch
                        } else {
                            '_'
                        }
                    })
                    .collect();
                (format!("-by-{safe}"), format!("by-{safe}-"), Some(c))
            }
            Route::Single => ("-single".into(), "single-".into(), None),
        };
        Self {
            repartition: format!("{}-repartition{suffix}", kafka.group),
            changelog: format!("{changelog}{suffix}"),
            partitions: if route == Route::Single { 1 } else { partitions },
            prefix,
            column: column.and_then(|c| pipeline.schema.arrow().index_of(c).ok()),
            route,
        }
    }

    /// The state partition of a routing value.
    fn partition_of(&self, value: &str) -> i32 {
        state_partition(value, self.partitions)
    }
}

/// What every processing loop of this instance shares.
struct Shared {
    dir: PathBuf,
    state_dir: PathBuf,
    audit_path: Option<PathBuf>,
    kafka: KafkaConfig,
    /// The routes, the actor's first.
    families: Vec<Family>,
    /// Each detector's route (index in `families`).
    detector_families: BTreeMap<String, usize>,
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
    /// Per (route, state partition).
    workers: Mutex<BTreeMap<(usize, i32), Worker>>,
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
            if let Some(f) = self.shared.family_of(e.topic()) {
                self.stop_worker((f, e.partition()), 1);
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
            if let Some(f) = self.shared.family_of(e.topic()) {
                paused.add_partition(e.topic(), e.partition());
                self.start_worker((f, e.partition()));
            } else {
                // What the statistics said of it under an earlier assignment is stale.
                self.behind
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&rampart_core::kafka_source(e.topic(), e.partition()));
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
        let owned = self.workers.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.shared.health.assigned.store(owned as u64, Ordering::Relaxed);
        self.shared.metrics.state_partitions_owned.set(owned as i64);
    }
}

impl Group {
    fn start_worker(&self, at: (usize, i32)) {
        let (family, partition) = at;
        let stop = Arc::new(AtomicUsize::new(0));
        let reload = Arc::new(AtomicBool::new(false));
        let (admin, requests) = mpsc::channel();
        let shared = Arc::clone(&self.shared);
        let (worker_stop, worker_reload) = (Arc::clone(&stop), Arc::clone(&reload));
        let thread = std::thread::Builder::new()
            .name(format!("rampart-{}p{partition}", shared.families[family].prefix))
            .spawn(move || {
                let result = run_worker(&shared, at, worker_stop, worker_reload, requests);
                if let Err(e) = &result {
                    tracing::error!(partition, error = %e, "the state partition's loop stopped");
                }
                result
            })
            .expect("a thread");
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).insert(
            at,
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
    fn stop_worker(&self, at: (usize, i32), signal: usize) {
        let worker = self.workers.lock().unwrap_or_else(|p| p.into_inner()).remove(&at);
        if let Some(worker) = worker {
            worker.stop.fetch_max(signal, Ordering::SeqCst);
            self.joined(worker.thread.join());
            let topic = &self.shared.families[at.0].repartition;
            tracing::info!(%topic, partition = at.1, "state partition released");
            let owned = self.workers.lock().unwrap_or_else(|p| p.into_inner()).len();
            self.shared.metrics.state_partitions_owned.set(owned as i64);
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
        let ended: Vec<(usize, i32)> = self
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

    /// Carries out an operator's command: a revocation or a re-arming is written to the
    /// state partitions it concerns, whichever instance owns them (answered once the broker
    /// has it); a reload is for this instance's loops (each instance reads its own pipeline
    /// directory), answered with theirs.
    fn dispatch(&self, request: AdminRequest) {
        let shared = &self.shared;
        let detector = match &request.command {
            AdminCommand::Revoke { detector, .. } => detector.clone(),
            AdminCommand::Rearm { detector } => Some(detector.clone()),
            AdminCommand::Reload => None,
        };
        if let Some(d) = &detector
            && !shared.detector_families.contains_key(d)
        {
            let _ = request
                .reply
                .send((404, format!("no detector `{d}` in this pipeline\n")));
            return;
        }
        if !matches!(request.command, AdminCommand::Reload) {
            let answer = self.send_command(&request.command, &request.operator, detector.as_deref());
            let _ = request.reply.send(answer);
            return;
        }
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if workers.is_empty() {
            let _ = request.reply.send((
                503,
                "no state partition is assigned to this instance yet\n".into(),
            ));
            return;
        }
        let mut answers = Vec::new();
        for w in workers.values() {
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

    /// Writes a revocation or a re-arming to the state partitions whose loops hold what it
    /// changes: a revocation to the actor's partition of the actor's route and to every
    /// partition of the other routes that have the detector (their repeat suppression), one
    /// of them publishing the revoke decision; a re-arming to every partition of the
    /// detector's route (each keeps its own fail-safe). Returns the answer for the operator.
    fn send_command(
        &self,
        command: &AdminCommand,
        operator: &Operator,
        detector: Option<&str>,
    ) -> (u16, String) {
        let shared = &self.shared;
        let families: Vec<usize> = match detector {
            Some(d) => vec![shared.detector_families[d]],
            None => (0..shared.families.len()).collect(),
        };
        let actor = match command {
            AdminCommand::Revoke { actor, .. } => Some(actor.as_str()),
            _ => None,
        };
        let mut targets: Vec<(usize, i32, bool)> = Vec::new();
        for f in families {
            let family = &shared.families[f];
            match actor {
                Some(actor) if family.route.is_actor() => {
                    targets.push((f, family.partition_of(actor), false))
                }
                _ => targets.extend((0..family.partitions).map(|p| (f, p, false))),
            }
        }
        // One of them publishes the revocation: the actor's own partition of the first route.
        if let (Some(actor), Some(first)) = (actor, targets.first().map(|t| t.0)) {
            let p = shared.families[first].partition_of(actor);
            if let Some(t) = targets.iter_mut().find(|t| t.0 == first && t.1 == p) {
                t.2 = true;
            }
        }
        let mut front = self.front.lock().unwrap_or_else(|p| p.into_inner());
        for &(f, partition, publish) in &targets {
            let payload = serde_json::to_vec(&GroupCommand {
                command: command.clone(),
                operator: operator.clone(),
                publish,
            })
            .expect("serialises");
            let record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(&shared.families[f].repartition, 0)
                .partition(partition)
                .payload(payload.as_slice())
                .headers(OwnedHeaders::new().insert(Header {
                    key: COMMAND_HEADER,
                    value: Some("1"),
                }));
            if let Err(e) = front.send(record) {
                return (503, format!("cannot send the command to the group: {e}\n"));
            }
        }
        if let Err(e) = front.producer.flush(Duration::from_secs(10)) {
            return (
                503,
                format!(
                    "the broker did not acknowledge the command within 10 s ({e}); it may still be carried out\n"
                ),
            );
        }
        let places: Vec<String> = targets
            .iter()
            .map(|(f, p, publish)| {
                let topic = &shared.families[*f].repartition;
                if *publish {
                    format!("{topic}/{p} (publishes the revoke decision)")
                } else {
                    format!("{topic}/{p}")
                }
            })
            .collect();
        tracing::info!(%operator, ?command, to = ?places, "operator's command sent to the group");
        (
            202,
            format!(
                "accepted: sent to the state partitions {}; the instances owning them carry it out (see their audit logs)\n",
                places.join(", ")
            ),
        )
    }
}

impl Shared {
    /// The route whose repartition topic this is.
    fn family_of(&self, topic: &str) -> Option<usize> {
        self.families.iter().position(|f| f.repartition == topic)
    }
}

/// One state partition's processing loop, until its stop count is raised.
fn run_worker(
    shared: &Shared,
    (family, partition): (usize, i32),
    stop: Arc<AtomicUsize>,
    reload: Arc<AtomicBool>,
    admin: mpsc::Receiver<AdminRequest>,
) -> Result<RunSummary, ServiceError> {
    let route = &shared.families[family];
    let name = format!("{}partition-{partition}", route.prefix);
    let state = shared.state_dir.join(&name);
    let mut pipeline = Pipeline::load_part(
        &shared.dir,
        StateChoice::Persistent(state),
        Evaluator::Keyed,
        Some(route.route.clone()),
    )
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
        path.with_file_name(format!("{stem}.{name}{ext}"))
    });
    let (metrics, health) = (&shared.metrics, &shared.health);
    metrics
        .state_partitions_restoring
        .set(shared.restoring.fetch_add(1, Ordering::SeqCst) as i64 + 1);
    let changelog = restore_partition(
        &pipeline,
        &route.changelog,
        partition,
        &shared.consumer_config,
        &shared.producer_config,
        (&stop, health, metrics),
    );
    let left = shared.restoring.fetch_sub(1, Ordering::SeqCst) - 1;
    metrics.state_partitions_restoring.set(left as i64);
    if left == 0 {
        health.set_not_ready(None);
    }
    let changelog = changelog?;
    // The actor's route owns the enforcement state of its actors; the others only write.
    let enforcement = super::open_enforcement(
        &pipeline,
        &shared.kafka,
        shared.families[0].partitions,
        (family == 0).then_some(partition),
        &shared.consumer_config,
    )?;
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
    // From the position the restored checkpoint holds, so that state and position always
    // come from one checkpoint: the group's committed offset may be ahead of it (an owner
    // the group had replaced went on committing; a commit sent at a revocation lands after
    // the next owner restored). Records the state already holds are skipped by their input
    // offsets. A state written before positions were kept: the committed offset.
    let start = pipeline
        .progress()
        .get(&rampart_core::kafka_source(&route.repartition, partition))
        .and_then(|p| p.next_offset)
        .map_or(Offset::Stored, Offset::Offset);
    if let Offset::Offset(at) = start {
        let mut asked = TopicPartitionList::new();
        let _ = asked.add_partition(&route.repartition, partition);
        let committed = consumer
            .committed_offsets(asked, Duration::from_secs(5))
            .ok()
            .and_then(|c| c.elements().first().map(|e| e.offset()));
        match committed {
            Some(Offset::Offset(c)) if c > at => tracing::warn!(
                topic = %route.repartition,
                partition,
                committed = c,
                restored = at,
                "the group's committed offset is ahead of the restored checkpoint: resuming from the checkpoint"
            ),
            _ => {
                tracing::info!(topic = %route.repartition, partition, restored = at, "state partition resumes")
            }
        }
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&route.repartition, partition, start)
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| {
            ServiceError::Broker(format!("cannot consume {}/{partition}: {e}", route.repartition))
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
    let speaks_for = shared
        .detector_families
        .iter()
        .filter(|(id, f)| **f == family && route.partition_of(id) == partition)
        .map(|(id, _)| id.clone())
        .collect();
    let task = super::group::Task {
        topic: route.repartition.clone(),
        partition,
        partitions: route.partitions,
        speaks_for,
        primary: family == 0,
        routes: shared.families.iter().map(|f| f.route.clone()).collect(),
        sources: shared.sources.clone(),
        tracked: false,
        marked_behind: BTreeMap::new(),
        commits: shared.commits.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        continuity: Continuity::from(match start {
            Offset::Offset(at) => Some(at),
            _ => None,
        }),
    };
    tracing::info!(topic = %route.repartition, partition, "state partition running");
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
        enforcement,
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
    families: Vec<Family>,
    /// Per owned input partition.
    sources: BTreeMap<(String, i32), Forwarding>,
    next_seq: usize,
    last_marks: Instant,
    last_commit: Instant,
    topics: BTreeMap<String, Arc<str>>,
    /// See [`mark_timing`].
    keepalive: Duration,
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

    /// Forwards a round of input records: each to every route, to the state partition of its
    /// value of the route's column (a record that does not decode goes to the actor's route
    /// only, to its input partition's number modulo the count: that state partition sends
    /// the dead letter), in input order.
    fn forward(&mut self, messages: &[OwnedMessage]) -> Result<(), ServiceError> {
        // A round gathers over several polls: records of an input partition revoked in a later
        // poll are its next owner's to forward (from the offset committed at the release),
        // not this instance's.
        let owned: Vec<&OwnedMessage> = messages
            .iter()
            .filter(|m| self.sources.contains_key(&(m.topic().to_string(), m.partition())))
            .collect();
        if owned.len() < messages.len() {
            tracing::debug!(
                dropped = messages.len() - owned.len(),
                "records of revoked input partitions left to their next owner"
            );
        }
        // Per input record: its state partition and routing value on each route, its event time.
        type Routed = (Vec<(i32, String)>, i64);
        let mut routes: BTreeMap<(Arc<str>, i32, i64), Routed> = BTreeMap::new();
        let families = &self.families;
        let mut decoded = |d: Decoded| {
            if let Decoded::Batch(batch) = d {
                for (i, position) in batch.positions.iter().enumerate() {
                    if let SourcePosition::Kafka {
                        topic,
                        partition,
                        offset,
                    } = position
                    {
                        let places = families
                            .iter()
                            .map(|f| {
                                let value = match f.column {
                                    Some(1) => batch.actor(i).to_string(),
                                    Some(c) => batch.text_at(c, i),
                                    None => String::new(),
                                };
                                (f.partition_of(&value), value)
                            })
                            .collect();
                        routes
                            .entry((Arc::clone(topic), *partition, *offset))
                            .or_insert((places, batch.event_time(i)));
                    }
                }
            }
        };
        for m in &owned {
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
        for m in &owned {
            let topic = intern(&mut self.topics, m.topic());
            let route = routes.get(&(topic, m.partition(), m.offset()));
            let mut seq = None;
            for (f, family) in self.families.iter().enumerate() {
                let (target, key) = match route {
                    Some((places, _)) => (places[f].0, Some(places[f].1.as_bytes())),
                    None if f == 0 => (m.partition().rem_euclid(family.partitions), None),
                    None => continue,
                };
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
                let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(&family.repartition, 0)
                    .partition(target)
                    .payload(m.payload().unwrap_or_default())
                    .headers(headers);
                if let Some(key) = key {
                    record = record.key(key);
                }
                if let Some(t) = m.timestamp().to_millis() {
                    record = record.timestamp(t);
                }
                seq = Some(send(&self.producer, &mut self.next_seq, record)?);
            }
            let Some(source) = self.sources.get_mut(&(m.topic().to_string(), m.partition())) else {
                continue;
            };
            source.next_offset = Some(m.offset() + 1);
            source.last_seq = seq.or(source.last_seq);
            if let Some((_, time)) = route {
                source.newest = source.newest.max(*time);
            }
        }
        Ok(())
    }

    fn send(&mut self, record: BaseRecord<'_, [u8], [u8], usize>) -> Result<usize, ServiceError> {
        send(&self.producer, &mut self.next_seq, record)
    }
}

/// Sends a record to a repartition topic, waiting while the producer's queue is full;
/// returns its sequence number (acknowledgements are tracked by it).
fn send(
    producer: &ThreadedProducer<ProducerCallbacks>,
    next_seq: &mut usize,
    record: BaseRecord<'_, [u8], [u8], usize>,
) -> Result<usize, ServiceError> {
    *next_seq += 1;
    let seq = *next_seq;
    let mut record = record.delivery_opaque(seq);
    producer.context().sending(seq);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(seq),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => {
                return Err(ServiceError::Broker(format!(
                    "cannot forward to a repartition topic: {e}"
                )));
            }
        }
    }
}

impl Front {
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
                // (Unknown until the consumer's first statistics: it may have a backlog.)
                let b = behind.get(&name).copied().unwrap_or(true);
                let now = (f.newest, f.next_offset, b);
                let fresh = f.told_at.is_some_and(|t| t.elapsed() < self.keepalive);
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
            let places: Vec<(String, i32)> = self
                .families
                .iter()
                .flat_map(|f| (0..f.partitions).map(|p| (f.repartition.clone(), p)))
                .collect();
            for mark in marks {
                let payload = serde_json::to_vec(&mark).expect("serialises");
                for (topic, p) in &places {
                    let record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, 0)
                        .partition(*p)
                        .payload(payload.as_slice())
                        .headers(OwnedHeaders::new().insert(Header {
                            key: MARK_HEADER,
                            value: Some("1"),
                        }));
                    self.send(record)?;
                }
            }
        }
        if let Some(e) = self.delivery_failure() {
            return Err(e);
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

    /// A forwarded record the broker refused: its input offset must never be committed (the
    /// instance stops; its input partitions are forwarded again from the last commit).
    fn delivery_failure(&self) -> Option<ServiceError> {
        let error = self.producer.context().failure()?;
        Some(ServiceError::Delivery(format!(
            "a record forwarded to a repartition topic: {error}"
        )))
    }

    /// The input offsets whose forwarded records the broker acknowledged, not yet committed
    /// (none once a forwarded record failed: acknowledged or failed look alike).
    fn settled(&mut self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        if self.delivery_failure().is_some() {
            return tpl;
        }
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
    let changelog = kafka
        .changelog_topic
        .clone()
        .ok_or_else(|| ServiceError::Config("[kafka] state_partitions needs the changelog".into()))?;
    if let Some(topic) = &kafka.enforcement_topic {
        super::ensure_enforcement_topic(topic, partitions, &producer_config)?;
    }
    let routes = pipeline.window_routes();
    let mut families = vec![Family::new(
        Route::actor(),
        kafka,
        &changelog,
        partitions,
        &pipeline,
    )];
    let mut detector_families = BTreeMap::new();
    for d in &pipeline.detectors {
        detector_families.insert(d.meta.id.clone(), 0);
    }
    for (id, route) in routes {
        let f = match families.iter().position(|f| f.route == route) {
            Some(f) => f,
            None => {
                families.push(Family::new(route, kafka, &changelog, partitions, &pipeline));
                families.len() - 1
            }
        };
        detector_families.insert(id, f);
    }
    for family in &families {
        for (topic, settings) in [
            (&family.repartition, Vec::new()),
            (&family.changelog, kafka::changelog_topic_settings()),
        ] {
            let found = kafka::ensure_internal_topic(&producer_config, topic, family.partitions, &settings)?;
            if found != family.partitions as usize {
                return Err(ServiceError::Config(format!(
                    "{topic} has {found} partitions and [kafka] state_partitions is {partitions}: the state \
                     partitions are fixed once chosen (delete the group's internal topics and state to start the \
                     windows afresh with another count)"
                )));
            }
        }
        if family.route == Route::Single {
            tracing::warn!(
                topic = %family.repartition,
                "windows keyed by no column of `events` see every event: one instance runs them all"
            );
        }
    }
    let sources = kafka::partitions_of(&producer_config, &kafka.input_topics)?;
    let (commits_sender, commits) = mpsc::channel();
    let shared = Arc::new(Shared {
        dir: pipeline.dir.clone(),
        state_dir,
        audit_path: pipeline.config.audit_path.clone(),
        kafka: kafka.clone(),
        families: families.clone(),
        detector_families,
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
        families: families.clone(),
        sources: BTreeMap::new(),
        next_seq: 0,
        last_marks: Instant::now(),
        last_commit: Instant::now(),
        topics: BTreeMap::new(),
        keepalive: mark_timing(pipeline.config.service.quiet_after).0,
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
    subscription.extend(families.iter().map(|f| f.repartition.as_str()));
    consumer
        .subscribe(&subscription)
        .map_err(|e| ServiceError::Broker(format!("cannot subscribe to {}: {e}", subscription.join(", "))))?;
    health.set_not_ready(None);
    tracing::info!(
        inputs = %kafka.input_topics.join(", "),
        routes = ?families.iter().map(|f| (f.repartition.as_str(), f.route.to_string())).collect::<Vec<_>>(),
        state_partitions = partitions,
        "running as a member of group {}",
        kafka.group
    );
    let result = coordinate(&consumer, &options, &admin, &commits);
    consumer.context().stopping.store(true, Ordering::SeqCst);
    // Stop the loops (a checkpoint each), then release the input.
    let signal = options.stop.load(Ordering::SeqCst).max(1);
    let owned: Vec<(usize, i32)> = consumer
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
    // The revocation that follows is served here, not while the consumer closes: a cooperative
    // consumer closed with a revocation or an assignment pending can wait on the group
    // coordinator far past the stop (an instance stopped right after a rebalance once did not
    // exit within a minute).
    let leaving = Instant::now();
    while consumer.assignment().is_ok_and(|a| a.count() > 0) && leaving.elapsed() < Duration::from_secs(10) {
        let _ = consumer.poll(Duration::from_millis(50));
    }
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
                Some(Ok(m)) if group.shared.family_of(m.topic()).is_some() => {}
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

impl Service<'_> {
    /// Scale-out: the pipeline's clock follows every input partition and its guard joins the
    /// group (at start and after a reload).
    pub(super) fn join_group(&mut self) {
        let Some(task) = self.task.as_mut() else {
            return;
        };
        task.tracked = false;
        // (Named as `heard_guard` names the sender of a note.)
        let me = format!("{}/{}", task.topic, task.partition);
        let (index, partitions) = (task.partition.max(0) as usize, task.partitions.max(1) as usize);
        self.pipeline
            .join_guard_group(task.speaks_for.clone(), &me, index, partitions);
        self.follow_event_time();
    }

    /// Scale-out: sends what the guard has to tell to the route's other state partitions.
    pub(super) fn tell_guard_notes(&mut self) -> Result<(), ServiceError> {
        let Some(task) = &self.task else {
            return Ok(());
        };
        let (topic, me, partitions) = (task.topic.clone(), task.partition, task.partitions);
        let notes = self.pipeline.take_guard_notes();
        if notes.iter().any(|n| matches!(n, GuardNote::Tripped { .. })) {
            // (Tripped here: /readyz and the metrics say so, whichever publishes the alert.)
            self.refresh_notes();
        }
        for note in notes {
            let payload = serde_json::to_vec(&GuardTold { from: me, note }).expect("serialises");
            for p in (0..partitions).filter(|p| *p != me) {
                let record = BaseRecord::<(), [u8], usize>::with_opaque_to(&topic, 0)
                    .partition(p)
                    .payload(payload.as_slice())
                    .headers(OwnedHeaders::new().insert(Header {
                        key: GUARD_HEADER,
                        value: Some("1"),
                    }));
                self.send(record)?;
            }
        }
        Ok(())
    }

    /// Scale-out: what another state partition's guard told: publishes what follows from it
    /// here (a trip there: this one's revocations, and the alert if it speaks for the detector).
    pub(super) fn heard_guard(&mut self, told: GuardTold) -> Result<(), ServiceError> {
        let from = match &self.task {
            Some(task) => format!("{}/{}", task.topic, told.from),
            None => return Ok(()),
        };
        let decisions = self.pipeline.guard_note(&from, told.note);
        if decisions.is_empty() {
            return Ok(());
        }
        for decision in &decisions {
            self.publish_decision(decision)?;
        }
        if let Some(log) = &mut self.audit {
            log.flush().map_err(ServiceError::audit(log.path()))?;
        }
        self.refresh_notes();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_in_the_repartition_partition_is_read_again_until_it_fills_or_expires() {
        let t0 = Instant::now();
        let mut c = Continuity::from(Some(10));
        assert_eq!(c.check(10, t0), Step::Take);
        assert_eq!(c.check(11, t0), Step::Take);
        // The broker showed 15 before 12-14 were stored: read from 12 again.
        assert_eq!(c.check(15, t0), Step::Gap { from: 12 });
        assert_eq!(c.check(16, t0 + Duration::from_millis(5)), Step::Gap { from: 12 });
        // Once they come, reading goes on; what was read before the gap is skipped.
        assert_eq!(c.check(11, t0 + Duration::from_millis(10)), Step::Again);
        for o in 12..=16 {
            assert_eq!(c.check(o, t0 + Duration::from_millis(10)), Step::Take);
        }
        // A gap that never fills (deleted by retention) is taken as lost after the patience,
        // counted from when it was first found.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(c.check(20, t1), Step::Gap { from: 17 });
        assert_eq!(c.check(20, t1 + GAP_PATIENCE / 2), Step::Gap { from: 17 });
        assert_eq!(c.check(20, t1 + GAP_PATIENCE), Step::Lost { from: 17 });
        assert_eq!(c.check(21, t1 + GAP_PATIENCE), Step::Take);
        // Another gap starts its own patience.
        let t2 = t1 + GAP_PATIENCE * 2;
        assert_eq!(c.check(30, t2), Step::Gap { from: 22 });
        // Not knowing where reading starts, the first record sets it.
        let mut c = Continuity::from(None);
        assert_eq!(c.check(7, t0), Step::Take);
        assert_eq!(c.check(9, t0), Step::Gap { from: 8 });
    }

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
