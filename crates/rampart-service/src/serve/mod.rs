//! The processing loop of service mode, split by role: [`source`] (polling, decoding,
//! admitting and the per-event detectors; event time per partition), [`sink`] (decisions and
//! dead letters to Kafka, the audit log), [`admin`] (operators' commands, reloads) and
//! [`checkpoint`] (window work and checkpoints with the offsets they reflect).

mod admin;
mod checkpoint;
mod decoding;
mod enforcement;
mod group;
mod sink;
mod source;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use rampart_core::parse_kafka_source;
use rampart_enforce::signing::Signer;
use rampart_engine::guardrails::audit::{self, AuditLog};
use rampart_engine::pipeline::config::KafkaConfig;
use rampart_engine::pipeline::tables::TableSource;
use rampart_engine::{EventBatch, Pipeline, StateChoice};

/// Window work waiting its turn, in the order consumed.
pub(super) enum Work {
    /// A batch the windows have not seen.
    Batch(EventBatch),
    /// What the scale-out instances forwarding the input told of their partitions, after the
    /// batches before it (see [`group`]).
    Marks(Vec<group::Mark>),
}
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{Producer, ThreadedProducer};

use crate::auth::Tokens;
use crate::changelog::KafkaChangelog;
use crate::http::{self, AdminRequest};
use crate::kafka::{self, ConsumerCallbacks, ProducerCallbacks, StoredOffsets};
use crate::metrics::{Health, Metrics};
use crate::{RunOptions, RunSummary, ServiceError, tables, watch};

/// Batches of window work done per round of the loop while catching up after a checkpoint.
const WINDOW_BATCHES_PER_ROUND: usize = 4;
/// Batches waiting for window work beyond which consuming stops until they are done.
const MAX_WINDOW_BACKLOG: usize = 256;

/// Runs the pipeline as a service until `options.stop` is raised. Returns after the batch in
/// flight is decided, its decisions acknowledged and a final checkpoint written.
pub fn run(pipeline: Pipeline, options: RunOptions) -> Result<RunSummary, ServiceError> {
    let kafka = pipeline.config.kafka.clone().ok_or_else(|| {
        ServiceError::Config(format!(
            "{} has no [kafka] section: say which topics to consume and where decisions go (see docs/operations.md)",
            pipeline.dir.join("pipeline.toml").display()
        ))
    })?;
    if !pipeline.is_persistent() {
        return Err(ServiceError::Config(
            "service mode needs a persistent window state (it stores the source offsets with it)".into(),
        ));
    }
    let instance = Instance::start(&pipeline, &options)?;
    if let Some(partitions) = kafka.state_partitions {
        return group::run(pipeline, options, &kafka, partitions, instance);
    }
    let Instance {
        metrics,
        health,
        endpoint,
        admin,
        signer,
    } = instance;
    let (consumer_config, producer_config) = kafka::client_configs(&kafka, &options.env);
    let tables = follow_tables(&pipeline, &kafka, &consumer_config, &producer_config)?;
    let changelog = restore_state(
        &pipeline,
        &kafka,
        &consumer_config,
        &producer_config,
        (&options.stop, &health, &metrics),
    )?;
    if let Some(topic) = &kafka.enforcement_topic {
        ensure_enforcement_topic(topic, 1, &producer_config)?;
    }
    let enforcement = open_enforcement(&pipeline, &kafka, 1, Some(0), &consumer_config)?;
    // Each input partition's next offset, as stored with the window state.
    let committed: BTreeMap<String, i64> = pipeline
        .progress()
        .into_iter()
        .filter_map(|(source, p)| Some((source, p.next_offset?)))
        .collect();
    let offsets = stored_offsets(&committed);
    let behind: Arc<Mutex<BTreeMap<String, bool>>> = Arc::default();
    let producer: ThreadedProducer<ProducerCallbacks> = producer_config
        .create_with_context(ProducerCallbacks::new(Arc::clone(&health)))
        .map_err(ServiceError::client("producer"))?;
    let consumer: BaseConsumer<ConsumerCallbacks> = consumer_config
        .create_with_context(ConsumerCallbacks {
            offsets: Arc::clone(&offsets),
            health: Arc::clone(&health),
            metrics: Arc::clone(&metrics),
            behind: Arc::clone(&behind),
        })
        .map_err(ServiceError::client("consumer"))?;
    let inputs: Vec<&str> = kafka.input_topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&inputs)
        .map_err(|e| ServiceError::Broker(format!("cannot subscribe to {}: {e}", inputs.join(", "))))?;
    health.set_not_ready(None);
    tracing::info!(
        pipeline = %pipeline.config.name,
        inputs = %inputs.join(", "),
        decisions = %kafka.decisions_topic,
        dead_letters = %kafka.dead_letter_topic,
        "running"
    );
    let mut service = Service::new(Parts {
        pipeline,
        kafka: &kafka,
        consumer,
        producer,
        offsets,
        behind,
        committed,
        metrics,
        health,
        signer,
        admin,
        tables,
        changelog,
        enforcement,
        task: None,
        options: &options,
    })?;
    service.refresh_notes();
    let result = service.serve();
    drop(endpoint);
    result.map(|()| service.summary)
}

/// What one instance runs besides its processing loops: metrics, health, the HTTP endpoint
/// (operators' commands come out of `admin`), and the key decisions are signed with.
pub(super) struct Instance {
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) endpoint: http::Endpoint,
    pub(super) admin: mpsc::Receiver<AdminRequest>,
    pub(super) signer: Option<Signer>,
}

impl Instance {
    /// Reads the admin tokens and the signing key, and starts the endpoint.
    fn start(pipeline: &Pipeline, options: &RunOptions) -> Result<Self, ServiceError> {
        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(Health::default());
        health.beat();
        health.set_not_ready(Some("starting".into()));
        let listen = options
            .listen
            .as_deref()
            .unwrap_or(&pipeline.config.service.listen);
        let env = |name: &str| {
            options
                .env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let tokens = Tokens::load(
            env("RAMPART_ADMIN_TOKEN"),
            pipeline.config.service.admin_tokens.as_deref(),
        )
        .map_err(ServiceError::Config)?;
        if !tokens.configured() {
            tracing::warn!(
                "admin commands are off: no admin token is configured (RAMPART_ADMIN_TOKEN, or [service] \
                 admin_tokens in pipeline.toml); /admin/* answers 403"
            );
        }
        let signer = signer(
            pipeline,
            env("RAMPART_SIGNING_KEY"),
            env("RAMPART_SIGNING_KEY_ID"),
        )?;
        let (admin_sender, admin) = mpsc::channel();
        let endpoint = http::Endpoint::start(
            listen,
            pipeline.config.service.tls.as_ref(),
            Arc::clone(&metrics),
            Arc::clone(&health),
            admin_sender,
            tokens,
        )
        .map_err(ServiceError::Http)?;
        tracing::info!(
            address = %endpoint.address,
            scheme = endpoint.scheme,
            "serving /metrics, /healthz and /readyz"
        );
        Ok(Self {
            metrics,
            health,
            endpoint,
            admin,
            signer,
        })
    }
}

/// What a processing loop is made of.
pub(super) struct Parts<'a> {
    pub(super) pipeline: Pipeline,
    pub(super) kafka: &'a KafkaConfig,
    pub(super) consumer: BaseConsumer<ConsumerCallbacks>,
    pub(super) producer: ThreadedProducer<ProducerCallbacks>,
    pub(super) offsets: StoredOffsets,
    pub(super) behind: Arc<Mutex<BTreeMap<String, bool>>>,
    pub(super) committed: BTreeMap<String, i64>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) signer: Option<Signer>,
    pub(super) admin: mpsc::Receiver<AdminRequest>,
    pub(super) tables: Vec<tables::TableFollower>,
    pub(super) changelog: Option<Arc<Mutex<KafkaChangelog>>>,
    pub(super) enforcement: Option<enforcement::EnforcementState>,
    pub(super) task: Option<group::Task>,
    pub(super) options: &'a RunOptions,
}

impl<'a> Service<'a> {
    /// A processing loop over `parts`, with the pipeline's audit log opened and its event time
    /// made live.
    pub(super) fn new(parts: Parts<'a>) -> Result<Self, ServiceError> {
        let Parts {
            pipeline,
            kafka,
            consumer,
            producer,
            offsets,
            behind,
            committed,
            metrics,
            health,
            signer,
            admin,
            tables,
            changelog,
            enforcement,
            task,
            options,
        } = parts;
        let audit = open_audit(&pipeline, &metrics, &instance_name(&options.env))?;
        let decoding = decoding::Decoding::start(pipeline.decoder());
        pipeline.set_live(idleness(&pipeline));
        let watched = watch::Fingerprint::of(&pipeline.dir);
        Ok(Self {
            pipeline: Arc::new(pipeline),
            kafka,
            consumer,
            producer,
            metrics,
            health,
            offsets,
            stop: Arc::clone(&options.stop),
            until_idle: options.until_idle,
            until_end: options.until_end,
            next_seq: 0,
            committed,
            summary: RunSummary::default(),
            topics: BTreeMap::new(),
            decoding,
            warned_detectors: Vec::new(),
            signer,
            tripped: false,
            admin,
            audit,
            reload: Arc::clone(&options.reload),
            watch: options.watch.then_some((watched, Instant::now())),
            reload_note: None,
            tables,
            behind,
            assignments_seen: u64::MAX,
            paused: BTreeSet::new(),
            behind_told: BTreeMap::new(),
            last_tick: Instant::now(),
            last_event_time_note: None,
            uncommitted: None,
            changelog,
            enforcement,
            task,
        })
    }
}

/// Makes sure every topic the pipeline uses exists (creating them if so configured), and
/// starts following the reference tables that come from compacted topics.
fn follow_tables(
    pipeline: &Pipeline,
    kafka: &KafkaConfig,
    consumer_config: &rdkafka::ClientConfig,
    producer_config: &rdkafka::ClientConfig,
) -> Result<Vec<tables::TableFollower>, ServiceError> {
    let mut topics: Vec<&str> = kafka.input_topics.iter().map(String::as_str).collect();
    topics.extend([
        kafka.decisions_topic.as_str(),
        kafka.shadow_topic.as_str(),
        kafka.dead_letter_topic.as_str(),
    ]);
    let table_topics: Vec<(String, String)> = pipeline
        .tables()
        .into_iter()
        .filter_map(|t| match t.source {
            TableSource::Topic { topic, .. } => Some((t.name, topic)),
            TableSource::File(_) => None,
        })
        .collect();
    topics.extend(table_topics.iter().map(|(_, topic)| topic.as_str()));
    kafka::ensure_topics(producer_config, &topics, kafka.create_topics, kafka.partitions)?;
    table_topics
        .iter()
        .map(|(name, topic)| tables::TableFollower::start(name, topic, consumer_config))
        .collect()
}

/// With a changelog: brings the state directory up to date with it (see [`crate::changelog`])
/// and reopens the pipeline's state on it; returns the writer checkpoints go through.
fn restore_state(
    pipeline: &Pipeline,
    kafka: &KafkaConfig,
    consumer_config: &rdkafka::ClientConfig,
    producer_config: &rdkafka::ClientConfig,
    shared: (&Arc<AtomicUsize>, &Arc<Health>, &Arc<Metrics>),
) -> Result<Option<Arc<Mutex<KafkaChangelog>>>, ServiceError> {
    let Some(topic) = &kafka.changelog_topic else {
        return Ok(None);
    };
    let partitions =
        kafka::ensure_internal_topic(producer_config, topic, 1, &kafka::changelog_topic_settings())?;
    if partitions != 1 {
        return Err(ServiceError::Config(format!(
            "the changelog {topic} has {partitions} partitions: one instance's window state is written to one \
             (a scale-out changelog has one per state partition: set [kafka] state_partitions, or another changelog_topic)"
        )));
    }
    restore_partition(pipeline, topic, 0, consumer_config, producer_config, shared)
}

/// Brings the pipeline's state directory up to date with `partition` of the changelog `topic`
/// and reopens the pipeline's state on it; returns the writer checkpoints go through.
fn restore_partition(
    pipeline: &Pipeline,
    topic: &str,
    partition: i32,
    consumer_config: &rdkafka::ClientConfig,
    producer_config: &rdkafka::ClientConfig,
    (stop, health, metrics): (&Arc<AtomicUsize>, &Arc<Health>, &Arc<Metrics>),
) -> Result<Option<Arc<Mutex<KafkaChangelog>>>, ServiceError> {
    let StateChoice::Persistent(dir) = pipeline.state_choice() else {
        return Ok(None);
    };
    let mut log = KafkaChangelog::new(
        producer_config,
        topic,
        partition,
        Arc::clone(stop),
        Arc::clone(health),
        Arc::clone(metrics),
    )?;
    health.set_not_ready(Some(format!(
        "restoring the window state from {topic}/{partition}"
    )));
    pipeline.close_state();
    crate::changelog::restore(dir, consumer_config, &mut log, health, metrics)?;
    pipeline.reopen_state().map_err(|e| {
        ServiceError::Config(format!("cannot reopen the window state after restoring it: {e}"))
    })?;
    Ok(Some(Arc::new(Mutex::new(log))))
}

/// Makes sure the enforcement-state topic exists with `partitions` partitions (one per state
/// partition), creating it compacted.
fn ensure_enforcement_topic(
    topic: &str,
    partitions: i32,
    producer_config: &rdkafka::ClientConfig,
) -> Result<(), ServiceError> {
    let found =
        kafka::ensure_internal_topic(producer_config, topic, partitions, &enforcement::topic_settings())?;
    if found != partitions as usize {
        return Err(ServiceError::Config(format!(
            "the enforcement-state topic {topic} has {found} partitions where {partitions} are needed (one per state \
             partition): delete it to have it written again, or set [kafka] enforcement_topic"
        )));
    }
    Ok(())
}

/// The enforcement state this loop writes to (and, for `owned`, follows and sweeps), if the
/// pipeline keeps one.
fn open_enforcement(
    pipeline: &Pipeline,
    kafka: &KafkaConfig,
    partitions: i32,
    owned: Option<i32>,
    consumer_config: &rdkafka::ClientConfig,
) -> Result<Option<enforcement::EnforcementState>, ServiceError> {
    let Some(topic) = &kafka.enforcement_topic else {
        return Ok(None);
    };
    enforcement::EnforcementState::open(
        topic,
        partitions,
        owned,
        pipeline.longest_block_for(),
        consumer_config,
    )
    .map(Some)
}

/// The next offset of each input partition, as stored with the window state: where the
/// consumer resumes when the partition is assigned.
fn stored_offsets(stored: &BTreeMap<String, i64>) -> StoredOffsets {
    let offsets: BTreeMap<(String, i32), i64> = stored
        .iter()
        .filter_map(|(source, next)| Some((parse_kafka_source(source)?, *next)))
        .collect();
    if !offsets.is_empty() {
        tracing::info!(
            partitions = offsets.len(),
            "resuming from the offsets stored with the window state"
        );
    }
    Arc::new(Mutex::new(offsets))
}

/// The key that signs published decisions: `RAMPART_SIGNING_KEY` (PKCS#8 PEM text, with
/// `RAMPART_SIGNING_KEY_ID`), else `[service] signing_key`; `None` (with a warning) if neither.
fn signer(pipeline: &Pipeline, pem: Option<&str>, id: Option<&str>) -> Result<Option<Signer>, ServiceError> {
    let signer = match (
        pem.filter(|p| !p.trim().is_empty()),
        &pipeline.config.service.signing_key,
    ) {
        (Some(pem), _) => {
            let id = id.ok_or_else(|| {
                ServiceError::Config(
                    "RAMPART_SIGNING_KEY needs RAMPART_SIGNING_KEY_ID: the id published with each signature"
                        .into(),
                )
            })?;
            Signer::from_pem(id, pem)
                .map_err(|e| ServiceError::Config(format!("RAMPART_SIGNING_KEY: {e}")))?
        }
        (None, Some((id, path))) => Signer::read(id, path)
            .map_err(|e| ServiceError::Config(format!("[service] signing_key in pipeline.toml: {e}")))?,
        (None, None) => {
            tracing::warn!(
                "decisions are not signed: enforcement points cannot tell them from decisions anyone \
                 with write access to the topic forges (set [service] signing_key or RAMPART_SIGNING_KEY)"
            );
            return Ok(None);
        }
    };
    tracing::info!(key_id = signer.id(), "signing decisions");
    Ok(Some(signer))
}

/// The audit log, if the pipeline has one, with a start entry recording the rules.
fn open_audit(
    pipeline: &Pipeline,
    metrics: &Metrics,
    instance: &str,
) -> Result<Option<AuditLog>, ServiceError> {
    let Some(path) = &pipeline.config.audit_path else {
        return Ok(None);
    };
    let mut log = AuditLog::open(path).map_err(ServiceError::audit(path))?;
    log.set_instance(instance);
    log.record_rules(&pipeline.rule_versions(), &audit::local_user(), "start")
        .map_err(ServiceError::audit(path))?;
    metrics.audit_entries.set(log.entries() as i64);
    Ok(Some(log))
}

/// The name this instance gives itself in its audit log: `RAMPART_INSTANCE_ID` (its static
/// group membership too), else the host's name (a container's or pod's).
pub(crate) fn instance_name(env: &[(String, String)]) -> String {
    env.iter()
        .find(|(k, v)| k == "RAMPART_INSTANCE_ID" && !v.is_empty())
        .map(|(_, v)| v.clone())
        .unwrap_or_else(audit::host_name)
}

/// The processing loop's state.
struct Service<'a> {
    pipeline: Arc<Pipeline>,
    kafka: &'a KafkaConfig,
    consumer: BaseConsumer<ConsumerCallbacks>,
    producer: ThreadedProducer<ProducerCallbacks>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    offsets: StoredOffsets,
    stop: Arc<AtomicUsize>,
    until_idle: Option<Duration>,
    until_end: bool,
    /// The sequence number of the last message handed to the producer.
    next_seq: usize,
    /// Per input partition (by source name), the next offset last committed to the group, or
    /// stored with the state at start.
    committed: BTreeMap<String, i64>,
    summary: RunSummary,
    /// Interned topic names (positions share them).
    topics: BTreeMap<String, Arc<str>>,
    /// Maps messages into event batches, on a thread of its own.
    decoding: decoding::Decoding,
    /// Detectors whose run-time failure was already logged.
    warned_detectors: Vec<String>,
    /// Whether the batch being published tripped the blast-radius fail-safe.
    tripped: bool,
    /// Operators' commands from the HTTP endpoint.
    admin: mpsc::Receiver<AdminRequest>,
    /// The hash-chained audit log, if configured.
    audit: Option<AuditLog>,
    /// Signs every decision published, if a key is configured.
    signer: Option<Signer>,
    /// Raised to reload the pipeline (SIGHUP).
    reload: Arc<AtomicBool>,
    /// The pipeline directory as last loaded, and when it was last looked at (`None`: no
    /// watching).
    watch: Option<(watch::Fingerprint, Instant)>,
    /// Why the last reload was refused (until one succeeds), for /readyz.
    reload_note: Option<String>,
    /// Reference tables followed from compacted topics.
    tables: Vec<tables::TableFollower>,
    /// Per input partition, whether librdkafka last reported records not yet consumed.
    behind: Arc<Mutex<BTreeMap<String, bool>>>,
    /// The assignment generation the event-time clock follows.
    assignments_seen: u64,
    /// Input partitions paused because they run ahead of the watermark.
    paused: BTreeSet<(String, i32)>,
    /// What the clock was last told of each partition's records waiting (`behind`).
    behind_told: BTreeMap<String, bool>,
    /// When processing time last moved the windows.
    last_tick: Instant,
    /// Where checkpoints go before the local state, if the pipeline has a changelog.
    changelog: Option<Arc<Mutex<KafkaChangelog>>>,
    /// The blocks and holds in force, for enforcement points starting up, if kept.
    enforcement: Option<enforcement::EnforcementState>,
    /// Scale-out: the state partition this loop owns (`None`: the whole input).
    task: Option<group::Task>,
    /// What /readyz says about event time (a partition holding the watermark back).
    last_event_time_note: Option<String>,
    /// The offsets of the checkpoint being written behind, committed to the group once it is
    /// written (see [`Self::checkpointed`]).
    uncommitted: Option<TopicPartitionList>,
}

/// How often, with nothing else to do, processing time moves the windows (idle and quiet
/// partitions).
const TICK_EVERY: Duration = Duration::from_millis(50);

/// The processing-time rules of the pipeline's event time.
fn idleness(pipeline: &Pipeline) -> rampart_core::Idleness {
    rampart_core::Idleness {
        idle_after: pipeline.config.service.partition_idle_after,
        quiet_after: pipeline.config.service.quiet_after,
    }
}

/// When things last happened, for the loop's time-based choices.
struct Timers {
    last_checkpoint: Instant,
    /// The last message consumed (or the last moment there was something else to do).
    last_message: Instant,
    last_end_check: Instant,
    last_end_note: Instant,
    /// The consumer's statistics reports counted when a check first found every partition at
    /// its end, and the last message then (see [`Service::at_end`]).
    end_seen: Option<(u64, Instant)>,
    /// Whether a message was consumed yet (logged once).
    consumed: bool,
}

impl Timers {
    fn now() -> Self {
        let now = Instant::now();
        Self {
            last_checkpoint: now,
            last_message: now,
            last_end_check: now,
            last_end_note: now,
            end_seen: None,
            consumed: false,
        }
    }
}

/// A checkpoint running on its own thread, and the offsets to commit to the group after it.
type Running<'scope> = (
    std::thread::ScopedJoinHandle<'scope, Result<Duration, ServiceError>>,
    TopicPartitionList,
);

impl Service<'_> {
    /// The loop: gather a micro-batch, run the per-event detectors and publish at once, then
    /// the windowed detectors, and start a checkpoint every `checkpoint_interval`. A checkpoint
    /// runs on its own thread (waiting for acknowledgements, then the RocksDB write) while this
    /// one goes on consuming and publishing per-event decisions; window work waits for it.
    fn serve(&mut self) -> Result<(), ServiceError> {
        let interval = self.pipeline.config.service.checkpoint_interval;
        let mut timers = Timers::now();
        let mut backlog: VecDeque<Work> = VecDeque::new();
        let acks = Arc::clone(self.producer.context());
        let (stop, health) = (Arc::clone(&self.stop), Arc::clone(&self.health));
        // Scale-out: a state partition's clock knows every input partition before the first
        // mark is applied (a mark of one input partition must not move the watermark on its
        // own), and its guard counts with the group's.
        self.join_group();
        std::thread::scope(|scope| -> Result<(), ServiceError> {
            let mut running: Option<Running<'_>> = None;
            let mut body = || -> Result<(), ServiceError> {
                loop {
                    let stopping = self.stop.load(Ordering::Relaxed) > 0;
                    self.health.beat();
                    // Between two batches: each sees one version of every table.
                    for table in &mut self.tables {
                        table.apply(&self.pipeline);
                    }
                    if let Some(reload) = self.take_admin()? {
                        // A reload starts from a state that holds everything consumed.
                        self.take_decoded(&mut backlog, &mut timers, 0)?;
                        self.finish_checkpoint(running.take())?;
                        self.work_windows(&mut backlog, usize::MAX)?;
                        self.reload_pipeline(reload, &acks, &stop, &health)?;
                        timers.last_checkpoint = Instant::now();
                        timers.last_message = Instant::now();
                        continue;
                    }
                    let checkpoint_due = running.is_none() && timers.last_checkpoint.elapsed() >= interval;
                    self.consume_round(
                        stopping,
                        running.is_some(),
                        checkpoint_due,
                        &mut backlog,
                        &mut timers,
                    )?;
                    if running.as_ref().is_some_and(|(h, _)| h.is_finished()) {
                        self.finish_checkpoint(running.take())?;
                    }
                    if running.is_none() {
                        self.commit_written()?;
                    }
                    self.follow_event_time();
                    if running.is_none() {
                        self.window_round(&mut backlog, &mut timers)?;
                    }
                    self.tell_guard_notes()?;
                    let idle = self
                        .until_idle
                        .is_some_and(|idle| timers.last_message.elapsed() >= idle);
                    let ended = self.until_end
                        && backlog.is_empty()
                        && self.decoding.in_flight() == 0
                        && running.is_none()
                        && self.at_end(&mut timers);
                    if stopping || idle || ended {
                        if idle && !stopping {
                            tracing::info!("no message for the idle period");
                        }
                        if ended && !stopping {
                            self.end_of_input(timers.last_message.elapsed())?;
                        }
                        tracing::info!("stopping: checkpointing what was consumed");
                        self.take_decoded(&mut backlog, &mut timers, 0)?;
                        self.finish_checkpoint(running.take())?;
                        self.work_windows(&mut backlog, usize::MAX)?;
                        self.checkpoint_now(&acks, &stop, &health)?;
                        return Ok(());
                    }
                    // The state must hold every consumed batch: start only with no window work
                    // left and nothing being decoded.
                    if running.is_none()
                        && backlog.is_empty()
                        && self.decoding.in_flight() == 0
                        && self.pipeline.has_new_input()
                        && timers.last_checkpoint.elapsed() >= interval
                    {
                        let (input, tpl) = self.input_for_checkpoint();
                        let through = self.last_seq();
                        // The guard state as of the decisions the checkpoint waits for.
                        let guard = self.pipeline.guard_snapshot();
                        self.sync_audit()?;
                        let pipeline = Arc::clone(&self.pipeline);
                        let changelog = self.changelog.clone();
                        let (acks, stop, health) = (&acks, &stop, &health);
                        let handle = scope.spawn(move || {
                            checkpoint::write(
                                &pipeline,
                                changelog.as_ref(),
                                true,
                                acks,
                                through,
                                &input,
                                guard,
                                stop,
                                health,
                            )
                        });
                        running = Some((handle, tpl));
                        timers.last_checkpoint = Instant::now();
                    }
                }
            };
            let result = body();
            if result.is_err() {
                // A checkpoint still waiting for the broker must not hold the exit up.
                stop.fetch_max(2, Ordering::SeqCst);
            }
            result
        })?;
        self.consumer.unsubscribe();
        tracing::info!(
            events = self.summary.events,
            decisions = self.summary.decisions,
            "stopped cleanly"
        );
        Ok(())
    }

    /// Consumes a micro-batch, unless stopping, or unless the window backlog is past its bound
    /// while a checkpoint holds the windows up (backpressure: consume no more). Its messages
    /// are decoded on the decoding thread: while draining a backlog (the round ended full and
    /// no checkpoint is due) the round before is taken, so that decoding runs a round ahead of
    /// the detectors; otherwise this round is taken at once (a live stream's latency does not
    /// wait for the next round, and a checkpoint due finds nothing in flight).
    fn consume_round(
        &mut self,
        stopping: bool,
        checkpointing: bool,
        checkpoint_due: bool,
        backlog: &mut VecDeque<Work>,
        timers: &mut Timers,
    ) -> Result<(), ServiceError> {
        if backlog.len() > MAX_WINDOW_BACKLOG && checkpointing {
            // (Not idleness.)
            std::thread::sleep(Duration::from_millis(5));
            timers.last_message = Instant::now();
            return Ok(());
        }
        if stopping {
            return Ok(());
        }
        // (With window work this round, an empty input must not hold it up: the loop would
        // work off a backlog 4 window batches per 100 ms once the input is consumed.)
        let idle_wait = if backlog.is_empty() || checkpointing {
            Duration::from_millis(100)
        } else {
            Duration::ZERO
        };
        let (polled, full) = self.poll_round(idle_wait);
        if polled.gathered.messages > 0 || self.health.assigned.load(Ordering::Relaxed) == 0 {
            // (Idle time counts from the assignment: joining the group is not idleness.)
            timers.last_message = Instant::now();
        }
        self.decoding.send(polled);
        let ahead = usize::from(full && !checkpoint_due);
        self.take_decoded(backlog, timers, ahead)?;
        // (Blocks expire with nothing consumed too.)
        self.sweep_enforcement()
    }

    /// Takes decoded rounds, oldest first, until at most `ahead` are in flight: admits their
    /// batches and runs the per-event detectors (windows get them through `backlog`), and
    /// applies what came with them.
    fn take_decoded(
        &mut self,
        backlog: &mut VecDeque<Work>,
        timers: &mut Timers,
        ahead: usize,
    ) -> Result<(), ServiceError> {
        while self.decoding.in_flight() > ahead {
            let Some(mut gathered) = self.decoding.take() else {
                break;
            };
            if gathered.messages > 0 && !timers.consumed {
                timers.consumed = true;
                tracing::info!("first message consumed");
            }
            let marks = std::mem::take(&mut gathered.marks);
            let commands = std::mem::take(&mut gathered.commands);
            let notes = std::mem::take(&mut gathered.guard_notes);
            for told in notes {
                self.heard_guard(told)?;
            }
            backlog.extend(self.process(gathered)?.into_iter().map(Work::Batch));
            for command in commands {
                self.group_command(command)?;
            }
            if !marks.is_empty() {
                backlog.push_back(Work::Marks(marks));
            }
        }
        Ok(())
    }

    /// With no checkpoint running: window work catches up a few batches per round, so that
    /// consuming and per-event decisions do not wait for the whole backlog (a backlog past its
    /// bound is worked off whole: consuming waits); with no batch left, processing time alone
    /// may make rows certain (a quiet stream, an idle partition).
    fn window_round(
        &mut self,
        backlog: &mut VecDeque<Work>,
        timers: &mut Timers,
    ) -> Result<(), ServiceError> {
        let had_work = !backlog.is_empty();
        if had_work {
            let take = if backlog.len() > MAX_WINDOW_BACKLOG {
                usize::MAX
            } else {
                WINDOW_BATCHES_PER_ROUND
            };
            self.work_windows(backlog, take)?;
            // (Idle time is time with nothing to do.)
            timers.last_message = Instant::now();
        }
        // A state partition's loop ticks also once its backlog is worked off in the same round:
        // marks alone evaluate nothing, and they may come in every round (the clock then took
        // neither them nor its processing time). One instance ticks only in a round with no
        // window work (ticking after it too measured slower: results/latency-2026-12-06-marks-tick.md).
        if backlog.is_empty() && (!had_work || self.task.is_some()) && self.last_tick.elapsed() >= TICK_EVERY
        {
            self.last_tick = Instant::now();
            self.pipeline.tick().emit(self)?;
        }
        Ok(())
    }

    /// Whether every assigned partition is consumed to its end: at once when every partition
    /// is consumed up to the end its last fetch saw ([`Self::consumed_to_fetched_end`]);
    /// otherwise once nothing came for a moment (200 ms), the broker's high watermarks say
    /// nothing is left (asked at most twice a second), and so does a report of the consumer's
    /// fetches made since. (It need not wait for the quiet period: [`Self::end_of_input`]
    /// makes the stream quiet.)
    fn at_end(&mut self, timers: &mut Timers) -> bool {
        if self.consumed_to_fetched_end() {
            return true;
        }
        if timers.last_message.elapsed() < Duration::from_millis(200) {
            return false;
        }
        // The end the broker lists may be short (the start of its last record batch), and the
        // consumer's fetches, which say more, are reported a few times a second: an end counts
        // only when a report that came after the watermarks agreed, with no message since,
        // agrees too.
        let reports = self.health.statistics.load(Ordering::Acquire);
        let confirming = matches!(timers.end_seen,
            Some((seen, last)) if last == timers.last_message && reports > seen);
        if !confirming && timers.last_end_check.elapsed() < Duration::from_millis(500) {
            return false;
        }
        timers.last_end_check = Instant::now();
        let behind = self.partitions_behind();
        if !behind.is_empty() {
            if timers.last_end_note.elapsed() >= Duration::from_secs(10) {
                tracing::info!(events = self.summary.events, ?behind, "not yet at the end");
                timers.last_end_note = Instant::now();
            }
            timers.end_seen = None;
            return false;
        }
        if confirming {
            return true;
        }
        timers.end_seen = Some((reports, timers.last_message));
        false
    }

    /// At the end of the input (`--until-end`): nothing is left behind, so the stream is
    /// quiet and its last rows complete now, as they would be after the quiet period with no
    /// record; paused partitions are at their end too.
    fn end_of_input(&mut self, idle: Duration) -> Result<(), ServiceError> {
        // (Idle: since the last message or the last window work, see `Timers::last_message`.)
        tracing::info!(
            idle_ms = idle.as_millis(),
            "every assigned partition consumed to its end"
        );
        // Every assigned partition, told or not by the statistics (one never told counts as
        // behind until then).
        let mut names: BTreeSet<String> = self
            .consumer
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| rampart_core::kafka_source(e.topic(), e.partition()))
                    .collect()
            })
            .unwrap_or_default();
        {
            let mut behind = self.behind.lock().unwrap_or_else(|p| p.into_inner());
            behind.values_mut().for_each(|b| *b = false);
            names.extend(behind.keys().cloned());
        }
        for name in names {
            self.pipeline.set_source_flags(&name, None, Some(false));
        }
        for (topic, partition) in self.paused.clone() {
            if let Err(e) = self.set_paused(&topic, partition, false) {
                tracing::debug!(partition = %topic, error = %e, "resume at the end");
            }
        }
        self.pipeline.input_ended();
        self.pipeline.tick().emit(self)
    }
}

/// Waits for a checkpoint thread (its panic is this thread's panic).
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}
