//! Service mode: consume the pipeline's input topics as a consumer group, decide on
//! micro-batches, publish decisions keyed by actor and bad records to the dead-letter topic,
//! and checkpoint the window state with the source offsets it reflects, in one RocksDB write,
//! after the broker has acknowledged every decision before it.
//!
//! The processing loop is one thread: poll → decode → evaluate → produce, with a checkpoint
//! every `[service] checkpoint_interval`. The HTTP endpoint and librdkafka's threads are the
//! only others.

pub mod http;
pub mod kafka;
pub mod metrics;
pub mod tables;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rampart_core::{Decision, Mode};
use rampart_engine::guardrails::audit::{self, AuditLog};
use rampart_engine::input::decode::Decoded;
use rampart_engine::pipeline::Evaluation;
use rampart_engine::{DeadLetter, DeadLetterKind, Evaluator, EventBatch, Pipeline, Progress};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::http::{AdminCommand, AdminRequest};
use crate::kafka::{ConsumerCallbacks, ProducerCallbacks, StoredOffsets};
use crate::metrics::{DecisionLabels, DetectorLabels, Health, Metrics, PartitionLabels, now_ms};

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
    fn client(what: &'static str) -> impl Fn(KafkaError) -> Self {
        move |source| Self::Client { what, source }
    }

    /// A write to the audit log at `path` failed.
    fn audit(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.display().to_string();
        move |source| Self::Audit { path, source }
    }
}

/// How to run.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// The HTTP endpoint's address, instead of `[service] listen`.
    pub listen: Option<String>,
    /// Environment variables (`RAMPART_KAFKA_*` are read).
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

/// How often the pipeline directory is looked at for changes.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A reload to do: who asked, how, and where the answer goes.
struct Reload {
    who: String,
    via: &'static str,
    reply: Option<mpsc::Sender<(u16, String)>>,
}

/// Batches of window work done per round of the loop while catching up after a checkpoint.
const WINDOW_BATCHES_PER_ROUND: usize = 4;
/// Batches waiting for window work beyond which consuming stops until they are done.
const MAX_WINDOW_BACKLOG: usize = 256;

/// One record sent to the dead-letter topic, with the original bytes.
struct Letter {
    letter: DeadLetter,
    payload: Vec<u8>,
    key: Option<Vec<u8>>,
}

/// What one round of polling gathered.
#[derive(Default)]
struct Gathered {
    batches: Vec<EventBatch>,
    letters: Vec<Letter>,
    /// Kafka timestamps (ms) of the messages, for the end-to-end latency.
    timestamps: Vec<i64>,
    messages: usize,
}

/// Consumed since the last checkpoint, per (topic, partition).
#[derive(Default, Clone, Copy)]
struct Consumed {
    events: u64,
    dead_letters: u64,
    next_offset: i64,
}

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
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    health.beat();
    health.set_not_ready(Some("starting".into()));
    let listen = options
        .listen
        .as_deref()
        .unwrap_or(&pipeline.config.service.listen);
    let (admin_sender, admin) = mpsc::channel();
    let endpoint = http::Endpoint::start(listen, Arc::clone(&metrics), Arc::clone(&health), admin_sender)
        .map_err(ServiceError::Http)?;
    tracing::info!(address = %endpoint.address, "serving /metrics, /healthz and /readyz");

    let (consumer_config, producer_config) = kafka::client_configs(&kafka, &options.env);
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
            rampart_engine::pipeline::tables::TableSource::Topic { topic, .. } => Some((t.name, topic)),
            rampart_engine::pipeline::tables::TableSource::File(_) => None,
        })
        .collect();
    topics.extend(table_topics.iter().map(|(_, topic)| topic.as_str()));
    kafka::ensure_topics(&producer_config, &topics, kafka.create_topics, kafka.partitions)?;
    let mut followers = Vec::new();
    for (name, topic) in &table_topics {
        followers.push(tables::TableFollower::start(name, topic, &consumer_config)?);
    }

    let progress = pipeline.progress();
    let offsets: StoredOffsets = Arc::default();
    {
        let mut o = offsets.lock().unwrap_or_else(|p| p.into_inner());
        for (source, p) in &progress {
            if let (Some((topic, partition)), Some(next)) = (parse_source(source), p.next_offset) {
                o.insert((topic, partition), next);
            }
        }
        if !o.is_empty() {
            tracing::info!(
                partitions = o.len(),
                "resuming from the offsets stored with the window state"
            );
        }
    }
    let behind: Arc<std::sync::Mutex<BTreeMap<String, bool>>> = Arc::default();
    let producer_callbacks = ProducerCallbacks::new(Arc::clone(&health));
    let producer: ThreadedProducer<ProducerCallbacks> = producer_config
        .create_with_context(producer_callbacks)
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

    let audit = match &pipeline.config.audit_path {
        None => None,
        Some(path) => {
            let log =
                AuditLog::open_recording(path, &pipeline.rule_versions(), &audit::local_user(), "start")
                    .map_err(ServiceError::audit(path))?;
            metrics.audit_entries.set(log.entries() as i64);
            Some(log)
        }
    };
    let next_row = pipeline.next_row();
    let decoder = pipeline.decoder();
    pipeline.set_live(idleness(&pipeline));
    let watched = watch::Fingerprint::of(&pipeline.dir);
    let mut service = Service {
        pipeline: Arc::new(pipeline),
        kafka: &kafka,
        consumer,
        producer,
        metrics,
        health,
        offsets,
        stop: options.stop,
        until_idle: options.until_idle,
        until_end: options.until_end,
        progress,
        consumed: BTreeMap::new(),
        next_row,
        next_seq: 0,
        summary: RunSummary::default(),
        topics: BTreeMap::new(),
        decoder,
        warned_detectors: Vec::new(),
        admin,
        audit,
        reload: options.reload,
        watch: options.watch.then_some((watched, Instant::now())),
        reload_note: None,
        tables: followers,
        behind,
        assignments_seen: u64::MAX,
        paused: BTreeSet::new(),
        behind_told: BTreeMap::new(),
        last_tick: Instant::now(),
        last_event_time_note: None,
    };
    service.refresh_notes();
    let result = service.serve();
    drop(endpoint);
    result.map(|()| service.summary)
}

/// The processing loop's state.
struct Service<'a> {
    pipeline: Arc<Pipeline>,
    kafka: &'a rampart_engine::pipeline::config::KafkaConfig,
    consumer: BaseConsumer<ConsumerCallbacks>,
    producer: ThreadedProducer<ProducerCallbacks>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    offsets: StoredOffsets,
    stop: Arc<AtomicUsize>,
    until_idle: Option<Duration>,
    until_end: bool,
    /// Input progress as of the last checkpoint.
    progress: Progress,
    /// Consumed since the last checkpoint.
    consumed: BTreeMap<(Arc<str>, i32), Consumed>,
    next_row: u64,
    /// The sequence number of the last message handed to the producer.
    next_seq: usize,
    summary: RunSummary,
    /// Interned topic names (positions share them).
    topics: BTreeMap<String, Arc<str>>,
    /// Maps messages into event batches (emptied at the end of every round).
    decoder: rampart_engine::input::decode::Decoder,
    /// Detectors whose run-time failure was already logged.
    warned_detectors: Vec<String>,
    /// Operators' commands from the HTTP endpoint.
    admin: mpsc::Receiver<AdminRequest>,
    /// The hash-chained audit log, if configured.
    audit: Option<AuditLog>,
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
    behind: Arc<std::sync::Mutex<BTreeMap<String, bool>>>,
    /// The assignment generation the event-time clock follows.
    assignments_seen: u64,
    /// Input partitions paused because they run ahead of the watermark.
    paused: BTreeSet<(String, i32)>,
    /// What the clock was last told of each partition's records waiting (`behind`).
    behind_told: BTreeMap<String, bool>,
    /// When processing time last moved the windows.
    last_tick: Instant,
    /// What /readyz says about event time (a partition holding the watermark back).
    last_event_time_note: Option<String>,
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

impl Service<'_> {
    /// The loop: gather a micro-batch, run the per-event detectors and publish at once, then
    /// the windowed detectors, and start a checkpoint every `checkpoint_interval`. A checkpoint
    /// runs on its own thread (waiting for acknowledgements, then the RocksDB write) while this
    /// one goes on consuming and publishing per-event decisions; window work waits for it.
    fn serve(&mut self) -> Result<(), ServiceError> {
        let interval = self.pipeline.config.service.checkpoint_interval;
        let mut last_checkpoint = Instant::now();
        let mut last_message = Instant::now();
        let mut last_end_check = Instant::now();
        let mut last_end_note = Instant::now();
        let mut backlog: VecDeque<EventBatch> = VecDeque::new();
        let acks = Arc::clone(self.producer.context());
        let (stop, health) = (Arc::clone(&self.stop), Arc::clone(&self.health));
        std::thread::scope(|scope| -> Result<(), ServiceError> {
            let mut running: Option<(std::thread::ScopedJoinHandle<'_, _>, TopicPartitionList)> = None;
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
                        if let Some((handle, tpl)) = running.take() {
                            self.checkpointed(join(handle), &tpl)?;
                        }
                        self.work_windows(&mut backlog, usize::MAX)?;
                        self.reload_pipeline(reload, &acks, &stop, &health)?;
                        last_checkpoint = Instant::now();
                        last_message = Instant::now();
                        continue;
                    }
                    if backlog.len() > MAX_WINDOW_BACKLOG && running.is_some() {
                        // Backpressure: a checkpoint holds the windows up; consume no more
                        // (and this is not idleness).
                        std::thread::sleep(Duration::from_millis(5));
                        last_message = Instant::now();
                    } else if !stopping {
                        let gathered = self.gather();
                        if gathered.messages > 0 || self.health.assigned.load(Ordering::Relaxed) == 0 {
                            // (Idle time counts from the assignment: joining the group is not idleness.)
                            last_message = Instant::now();
                        }
                        if gathered.messages > 0 {
                            if self.summary.events == 0 && self.summary.bad_records == 0 {
                                tracing::info!("first message consumed");
                            }
                            backlog.extend(self.process(gathered)?);
                        }
                    }
                    if running.as_ref().is_some_and(|(h, _)| h.is_finished()) {
                        let (handle, tpl) = running.take().expect("a checkpoint is running");
                        self.checkpointed(join(handle), &tpl)?;
                    }
                    self.follow_event_time();
                    // Window work catches up a few batches per round, so that consuming and
                    // per-event decisions do not wait for the whole backlog; a backlog past its
                    // bound is worked off whole (consuming waits: backpressure).
                    if running.is_none() && !backlog.is_empty() {
                        let take = if backlog.len() > MAX_WINDOW_BACKLOG {
                            usize::MAX
                        } else {
                            WINDOW_BATCHES_PER_ROUND
                        };
                        self.work_windows(&mut backlog, take)?;
                        // (Idle time is time with nothing to do.)
                        last_message = Instant::now();
                    } else if running.is_none() && self.last_tick.elapsed() >= TICK_EVERY {
                        // Nothing consumed: processing time alone may make rows certain (a
                        // quiet stream, an idle partition). Not while a checkpoint waits for
                        // the decisions before it.
                        self.last_tick = Instant::now();
                        let evaluation = self.pipeline.tick();
                        self.publish(evaluation)?;
                    }
                    let idle = self.until_idle.is_some_and(|idle| last_message.elapsed() >= idle);
                    // At the end: nothing came for a moment, and the broker's high watermarks
                    // say nothing is left (asked at most twice a second).
                    // (At least the quiet period: the stream's last rows count as complete.)
                    let quiet = self.pipeline.config.service.quiet_after + 2 * TICK_EVERY;
                    let ended = self.until_end
                        && backlog.is_empty()
                        && running.is_none()
                        && last_message.elapsed() >= quiet.max(Duration::from_millis(200))
                        && last_end_check.elapsed() >= Duration::from_millis(500)
                        && {
                            last_end_check = Instant::now();
                            let behind = self.partitions_behind();
                            if !behind.is_empty() && last_end_note.elapsed() >= Duration::from_secs(10) {
                                tracing::info!(events = self.summary.events, ?behind, "not yet at the end");
                                last_end_note = Instant::now();
                            }
                            behind.is_empty()
                        };
                    if stopping || idle || ended {
                        if idle && !stopping {
                            tracing::info!("no message for the idle period");
                        }
                        if ended && !stopping {
                            tracing::info!("every assigned partition consumed to its end");
                            // Nothing is left behind: the stream is quiet, its last rows complete.
                            let names: Vec<String> = {
                                let mut behind = self.behind.lock().unwrap_or_else(|p| p.into_inner());
                                behind.values_mut().for_each(|b| *b = false);
                                behind.keys().cloned().collect()
                            };
                            for name in names {
                                self.pipeline.set_source_flags(&name, None, Some(false));
                            }
                            // (Paused partitions are at their end too: nothing holds the rest.)
                            for (topic, partition) in self.paused.clone() {
                                if let Err(e) = self.set_paused(&topic, partition, false) {
                                    tracing::debug!(partition = %topic, error = %e, "resume at the end");
                                }
                            }
                            let evaluation = self.pipeline.tick();
                            self.publish(evaluation)?;
                        }
                        tracing::info!("stopping: checkpointing what was consumed");
                        if let Some((handle, tpl)) = running.take() {
                            self.checkpointed(join(handle), &tpl)?;
                        }
                        self.work_windows(&mut backlog, usize::MAX)?;
                        self.checkpoint_now(&acks, &stop, &health)?;
                        return Ok(());
                    }
                    // The state must hold every consumed batch: start only with no window work left.
                    if running.is_none()
                        && backlog.is_empty()
                        && !self.consumed.is_empty()
                        && last_checkpoint.elapsed() >= interval
                    {
                        let (progress, tpl) = self.take_consumed();
                        let through = self.last_seq();
                        // The guard state as of the decisions the checkpoint waits for.
                        let guard = self.pipeline.guard_snapshot();
                        self.sync_audit()?;
                        let pipeline = Arc::clone(&self.pipeline);
                        let (acks, stop, health) = (&acks, &stop, &health);
                        let handle = scope.spawn(move || {
                            checkpoint(&pipeline, acks, through, &progress, guard, stop, health)
                        });
                        running = Some((handle, tpl));
                        last_checkpoint = Instant::now();
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

    /// The assigned partitions not yet consumed up to their high watermark, each as
    /// `topic/partition position/high` (empty: at the end). The position is the next offset
    /// after what was consumed (or stored with the state) or the consumer's fetch position,
    /// whichever is further, else the partition's start (`auto.offset.reset = earliest`). An
    /// unreachable broker answers nothing: not at the end.
    fn partitions_behind(&self) -> Vec<String> {
        if self.health.assigned.load(Ordering::Relaxed) == 0 {
            return vec!["no partition assigned".to_string()];
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return vec!["no assignment".to_string()];
        };
        let positions = self.consumer.position().ok();
        let consumed = self.offsets.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut behind = Vec::new();
        for element in assignment.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            let (low, high) = match self
                .consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(5))
            {
                Ok(watermarks) => watermarks,
                Err(error) => {
                    behind.push(format!("{topic}/{partition}: {error}"));
                    continue;
                }
            };
            let fetched = positions
                .as_ref()
                .and_then(|p| p.find_partition(topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                });
            // (The larger: the fetch position also passes records the application never
            // sees, such as transaction markers.)
            let position = consumed
                .get(&(topic.to_string(), partition))
                .copied()
                .max(fetched)
                .unwrap_or(low);
            if position < high {
                behind.push(format!("{topic}/{partition} {position}/{high}"));
            }
        }
        behind
    }

    /// Polls until a micro-batch is full (`source.batch_size` events) or `batch_max_wait` has
    /// passed since its first message; returns at once (empty) when nothing comes for 100 ms.
    fn gather(&mut self) -> Gathered {
        let mut out = Gathered::default();
        let mut deadline: Option<Instant> = None;
        loop {
            let timeout = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_millis(100),
            };
            let polled = self.consumer.poll(timeout);
            let message = match polled {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    if deadline.is_none() {
                        break;
                    }
                    continue;
                }
                Some(Ok(m)) => m,
            };
            deadline.get_or_insert_with(|| Instant::now() + self.kafka.batch_max_wait);
            out.messages += 1;
            let topic = intern(&mut self.topics, message.topic());
            let (partition, offset) = (message.partition(), message.offset());
            out.timestamps
                .push(message.timestamp().to_millis().unwrap_or_else(now_ms));
            let payload = message.payload().unwrap_or_default();
            let key = message.key();
            let mut events = 0;
            let mut letters = 0;
            self.decoder
                .decode_message(&topic, partition, offset, payload, &mut |d| match d {
                    Decoded::Batch(b) => {
                        out.batches.push(b);
                    }
                    Decoded::DeadLetter(letter) => {
                        letters += 1;
                        out.letters.push(Letter {
                            letter,
                            payload: payload.to_vec(),
                            key: key.map(<[u8]>::to_vec),
                        });
                    }
                    Decoded::Lines(_) | Decoded::Progress(_) => {}
                });
            if letters == 0 {
                events = 1;
            }
            let consumed = self.consumed.entry((Arc::clone(&topic), partition)).or_default();
            consumed.events += events;
            consumed.dead_letters += letters;
            consumed.next_offset = offset + 1;
            // Seen by the rebalance callback: a re-assignment resumes after what the window
            // state in memory already holds.
            self.offsets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((topic.to_string(), partition), offset + 1);
            if !out.batches.is_empty() {
                break;
            }
        }
        self.decoder.flush(&mut |d| {
            if let Decoded::Batch(b) = d {
                out.batches.push(b);
            }
        });
        if out.messages > 0 && self.health.not_ready().is_some_and(|r| r.contains("unreachable")) {
            self.health.set_not_ready(None);
        }
        out
    }

    /// Runs the per-event detectors on a gathered micro-batch and hands their decisions and the
    /// dead letters to the producer; returns the batches for the windowed detectors.
    fn process(&mut self, gathered: Gathered) -> Result<Vec<EventBatch>, ServiceError> {
        let complete = Instant::now();
        for letter in gathered.letters {
            self.metrics.bad_records.inc();
            self.summary.bad_records += 1;
            self.dead_letter(&letter.letter, &letter.payload, letter.key.as_deref())?;
        }
        let mut batches = Vec::with_capacity(gathered.batches.len());
        for mut batch in gathered.batches {
            let n = batch.batch.num_rows();
            batch.renumber(self.next_row);
            self.next_row += n as u64;
            self.metrics.events.inc_by(n as u64);
            self.metrics.batch_events.observe(n as f64);
            self.summary.events += n as u64;
            if let Some(newest) = (0..n).map(|i| batch.event_time(i)).max() {
                let seconds = newest.div_euclid(1_000_000);
                if seconds > self.metrics.newest_event_time.get() {
                    self.metrics.newest_event_time.set(seconds);
                }
            }
            let evaluation = self.pipeline.evaluate_per_event(&batch);
            self.publish(evaluation)?;
            batches.push(batch);
        }
        let now = now_ms();
        self.metrics
            .processing
            .record(complete.elapsed().as_micros() as u64);
        for t in gathered.timestamps {
            self.metrics
                .end_to_end
                .record(u64::try_from(now - t).unwrap_or(0).saturating_mul(1000));
        }
        Ok(batches)
    }

    fn publish(&mut self, evaluation: Evaluation) -> Result<(), ServiceError> {
        for (detector, error) in evaluation.errors {
            self.metrics
                .detector_errors
                .get_or_create(&DetectorLabels {
                    detector: detector.clone(),
                })
                .inc();
            if !self.warned_detectors.contains(&detector) {
                tracing::warn!(%detector, %error, "detector failed on a batch; it keeps running on later batches");
                self.warned_detectors.push(detector);
            }
        }
        for letter in &evaluation.late {
            self.metrics.late_records.inc();
            self.summary.late_records += 1;
            if let rampart_core::SourcePosition::Kafka { topic, partition, .. } = &letter.source {
                self.metrics
                    .partition_late_records
                    .get_or_create(&PartitionLabels {
                        topic: topic.to_string(),
                        partition: partition.to_string(),
                    })
                    .inc();
            }
            self.dead_letter(letter, letter.record.as_bytes(), None)?;
        }
        for delay in &evaluation.decision_delays {
            self.metrics
                .decision_delay
                .record(u64::try_from(*delay).unwrap_or(0));
        }
        for (detector, n) in evaluation.suppressed {
            self.metrics
                .suppressed
                .get_or_create(&DetectorLabels { detector })
                .inc_by(n);
        }
        let mut tripped = false;
        for decision in &evaluation.decisions {
            tripped |= decision.verdict == rampart_core::Verdict::Alert
                && decision
                    .tags
                    .iter()
                    .any(|t| t == rampart_engine::guardrails::guard::FAIL_SAFE_TAG);
            self.decision(decision)?;
        }
        if tripped {
            self.refresh_notes();
        }
        if !evaluation.decisions.is_empty()
            && let Some(log) = &mut self.audit
        {
            // To the OS once per batch (on disk at the next checkpoint).
            log.flush().map_err(ServiceError::audit(log.path()))?;
        }
        Ok(())
    }

    /// Carries out the operators' revocations and re-armings; returns a reload to do, asked
    /// for by an operator, SIGHUP or a changed pipeline directory.
    fn take_admin(&mut self) -> Result<Option<Reload>, ServiceError> {
        let mut reload = None;
        while let Ok(request) = self.admin.try_recv() {
            let AdminRequest { command, who, reply } = request;
            let answer = match command {
                AdminCommand::Revoke {
                    actor,
                    detector,
                    reason,
                } => {
                    if let Some(d) = detector.as_deref().filter(|d| !self.knows(d)) {
                        (404, format!("no detector `{d}` in this pipeline\n"))
                    } else {
                        let decision = self.pipeline.revoke(&actor, detector.as_deref(), &reason);
                        self.audit_entry(
                            audit::Kind::Admin,
                            &serde_json::json!({
                                "action": "revoke", "who": who, "actor": actor,
                                "detector": detector, "reason": reason,
                            }),
                        )?;
                        self.decision(&decision)?;
                        tracing::info!(%actor, detector = ?detector, %who, "revoked");
                        let body = serde_json::to_string(&decision).expect("decisions serialise");
                        (200, format!("{body}\n"))
                    }
                }
                AdminCommand::Rearm { detector } => match self.pipeline.rearm(&detector) {
                    Some(trip) => {
                        self.audit_entry(
                            audit::Kind::Admin,
                            &serde_json::json!({
                                "action": "rearm", "who": who, "detector": detector,
                                "tripped_at": trip.at, "trip_reason": trip.reason,
                            }),
                        )?;
                        self.refresh_notes();
                        tracing::info!(%detector, %who, "re-armed after the blast-radius fail-safe");
                        (
                            200,
                            format!(
                                "re-armed `{detector}` (in shadow since {}: {})\n",
                                trip.at, trip.reason
                            ),
                        )
                    }
                    None if self.knows(&detector) => (
                        409,
                        format!("`{detector}` is not in fail-safe shadow; nothing to re-arm\n"),
                    ),
                    None => (404, format!("no detector `{detector}` in this pipeline\n")),
                },
                AdminCommand::Reload => {
                    reload = Some(Reload {
                        who,
                        via: "reload (admin)",
                        reply: Some(reply),
                    });
                    continue;
                }
            };
            let _ = reply.send(answer);
        }
        if reload.is_none() && self.reload.swap(false, Ordering::SeqCst) {
            reload = Some(Reload {
                who: audit::local_user(),
                via: "reload (SIGHUP)",
                reply: None,
            });
        }
        if reload.is_none()
            && let Some((seen, checked)) = &mut self.watch
            && checked.elapsed() >= WATCH_EVERY
        {
            *checked = Instant::now();
            let now = watch::Fingerprint::of(&self.pipeline.dir);
            if now != *seen {
                *seen = now;
                reload = Some(Reload {
                    who: audit::local_user(),
                    via: "reload (file change)",
                    reply: None,
                });
            }
        }
        Ok(reload)
    }

    fn knows(&self, detector: &str) -> bool {
        self.pipeline.detectors.iter().any(|d| d.meta.id == detector)
    }

    /// Reloads the pipeline directory: a version that fails `check` (or changes `[kafka]`) is
    /// refused and the running one continues; otherwise everything consumed is checkpointed
    /// and the pipeline reopened on the same state, where unchanged windows find their state
    /// (it is stored per window, or per detector version for windows that are re-run) and
    /// changed ones start afresh.
    fn reload_pipeline(
        &mut self,
        reload: Reload,
        acks: &ProducerCallbacks,
        stop: &AtomicUsize,
        health: &Health,
    ) -> Result<(), ServiceError> {
        let Reload { who, via, reply } = reload;
        let dir = self.pipeline.dir.clone();
        let refusal = match Pipeline::load(&dir) {
            Err(e) => Some(e.to_string()),
            Ok(p) if !p.problems.is_empty() => Some(
                p.problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Ok(p)
                if p.config.kafka.as_ref().map(kafka::identity)
                    != self.pipeline.config.kafka.as_ref().map(kafka::identity) =>
            {
                Some("the [kafka] section changed: brokers, group and topics take effect on a restart".into())
            }
            Ok(_) => None,
        };
        if let Some(why) = refusal {
            tracing::warn!(%via, %who, reason = %why, "reload refused; the running version continues");
            self.audit_entry(
                audit::Kind::Admin,
                &serde_json::json!({"action": "reload refused", "who": who, "via": via, "reason": why}),
            )?;
            self.reload_note = Some(format!("{via} refused (the running version continues): {why}"));
            self.refresh_notes();
            if let Some(r) = reply {
                let _ = r.send((422, format!("refused, the running version continues: {why}\n")));
            }
            return Ok(());
        }
        self.checkpoint_now(acks, stop, health)?;
        let state = self.pipeline.state_choice().clone();
        self.pipeline.close_state();
        let pipeline = match Pipeline::load_with(&dir, state, Evaluator::Keyed) {
            Ok(p) => p,
            Err(e) => {
                self.pipeline.reset();
                return Err(ServiceError::Reload(e.to_string()));
            }
        };
        pipeline.set_live(idleness(&pipeline));
        self.pipeline = Arc::new(pipeline);
        self.decoder = self.pipeline.decoder();
        // (The new pipeline's clock learns the assignment and the lagging partitions again.)
        self.assignments_seen = u64::MAX;
        self.warned_detectors.clear();
        for table in &mut self.tables {
            table.reapply();
        }
        let changes = match &mut self.audit {
            Some(log) => log
                .record_rules(&self.pipeline.rule_versions(), &who, via)
                .map_err(ServiceError::audit(log.path()))?,
            None => 0,
        };
        self.audit_entry(
            audit::Kind::Admin,
            &serde_json::json!({"action": "reload", "who": who, "via": via, "changes": changes}),
        )?;
        if let Some((seen, _)) = &mut self.watch {
            *seen = watch::Fingerprint::of(&dir);
        }
        self.reload_note = None;
        self.refresh_notes();
        tracing::info!(%via, %who, changes, detectors = self.pipeline.detectors.len(), "pipeline reloaded");
        if let Some(r) = reply {
            let _ = r.send((
                200,
                format!(
                    "reloaded: {} detector(s), {changes} rule change(s) recorded\n",
                    self.pipeline.detectors.len()
                ),
            ));
        }
        Ok(())
    }

    /// Updates what /readyz notes and the fail-safe gauges: detectors in fail-safe shadow,
    /// and the last refused reload until a reload succeeds.
    fn refresh_notes(&mut self) {
        let tripped = self.pipeline.tripped();
        for d in &self.pipeline.detectors {
            let on = tripped.iter().any(|(id, _)| *id == d.meta.id);
            self.metrics
                .fail_safe
                .get_or_create(&DetectorLabels {
                    detector: d.meta.id.clone(),
                })
                .set(i64::from(on));
        }
        let mut notes: Vec<String> = tripped
            .iter()
            .map(|(id, t)| {
                format!(
                    "fail-safe: `{id}` runs in shadow since {} (POST /admin/rearm?detector={id})",
                    t.at
                )
            })
            .collect();
        notes.extend(self.reload_note.clone());
        notes.extend(self.last_event_time_note.clone());
        self.health.set_notes(notes);
    }

    /// Pauses or resumes one input partition, and tells the clock (a paused partition is
    /// neither idle nor quiet).
    fn set_paused(&mut self, topic: &str, partition: i32, pause: bool) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        if pause {
            self.consumer.pause(&tpl)?;
            self.paused.insert((topic.to_string(), partition));
        } else {
            self.consumer.resume(&tpl)?;
            self.paused.remove(&(topic.to_string(), partition));
        }
        let name = rampart_core::clock::kafka_source(topic, partition);
        self.pipeline.set_source_flags(&name, Some(pause), None);
        Ok(())
    }

    /// Keeps the pipeline's event-time clock in step with the consumer: the assigned
    /// partitions, which of them have records not consumed yet; pauses the partitions that run
    /// ahead of the slowest one by more than `max_partition_skew` (resumes them at half that,
    /// or when it goes idle); and exports it all.
    fn follow_event_time(&mut self) {
        let generation = self.health.assignments.load(Ordering::Relaxed);
        if generation != self.assignments_seen {
            self.assignments_seen = generation;
            let assigned: Vec<(String, i32)> = self
                .consumer
                .assignment()
                .map(|tpl| {
                    tpl.elements()
                        .iter()
                        .map(|e| (e.topic().to_string(), e.partition()))
                        .collect()
                })
                .unwrap_or_default();
            let names: Vec<String> = assigned
                .iter()
                .map(|(t, p)| rampart_core::clock::kafka_source(t, *p))
                .collect();
            self.pipeline.track_sources(&names);
            // A new assignment (or a reloaded pipeline's clock) starts unpaused: librdkafka
            // may keep a re-assigned partition paused, so resume what was paused.
            for (topic, partition) in self.paused.clone() {
                if let Err(e) = self.set_paused(&topic, partition, false) {
                    tracing::debug!(partition = %topic, error = %e, "resume after an assignment");
                }
            }
            self.paused.clear();
            self.behind_told.clear();
        }
        // What librdkafka says has records waiting, told to the clock when it changes.
        let behind = self.behind.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (name, b) in behind {
            if self.behind_told.get(&name) != Some(&b) {
                self.pipeline.set_source_flags(&name, None, Some(b));
                self.behind_told.insert(name, b);
            }
        }
        let Some(time) = self.pipeline.event_time() else {
            return;
        };
        let skew =
            i64::try_from(self.pipeline.config.service.max_partition_skew.as_micros()).unwrap_or(i64::MAX);
        // The slowest partition that has records (one with none yet becomes idle instead).
        // The slowest partition that holds the watermark and has records (one with none yet
        // becomes idle instead): the others may run at most `max_partition_skew` ahead of it
        // (Flink's watermark alignment), so that the rows waiting for it stay bounded.
        let holder = time
            .sources
            .iter()
            .filter(|s| s.newest > i64::MIN && !s.idle)
            .min_by_key(|s| s.newest);
        let catching_up = holder.map(|h| h.watermark(time.lateness));
        for source in &time.sources {
            let Some((topic, partition)) = parse_source(&source.name) else {
                continue;
            };
            let lead = catching_up.map(|floor| source.watermark(time.lateness).saturating_sub(floor));
            let key = (topic, partition);
            let paused = self.paused.contains(&key);
            let pause = match lead {
                Some(lead) if !paused => lead > skew,
                Some(lead) => lead > skew / 2,
                None => false,
            };
            if pause == paused {
                continue;
            }
            match self.set_paused(&key.0, key.1, pause) {
                Ok(()) => tracing::info!(
                    partition = %source.name,
                    lead_s = lead.unwrap_or_default() / 1_000_000,
                    "{} (event time ahead of the watermark)",
                    if pause { "paused" } else { "resumed" }
                ),
                Err(e) => tracing::warn!(partition = %source.name, error = %e, "cannot pause or resume"),
            }
        }
        let now_s = now_ms() / 1000;
        if time.watermark > i64::MIN {
            self.metrics.watermark.set(time.watermark.div_euclid(1_000_000));
        }
        for source in &time.sources {
            let Some((topic, partition)) = parse_source(&source.name) else {
                continue;
            };
            let labels = PartitionLabels {
                topic,
                partition: partition.to_string(),
            };
            let paused = self.paused.contains(&(labels.topic.clone(), partition));
            self.metrics
                .partition_paused
                .get_or_create(&labels)
                .set(i64::from(paused));
            if source.newest > i64::MIN {
                let seconds = source.newest.div_euclid(1_000_000);
                self.metrics
                    .partition_watermark
                    .get_or_create(&labels)
                    .set(source.watermark(time.lateness).div_euclid(1_000_000));
                self.metrics
                    .partition_event_lag
                    .get_or_create(&labels)
                    .set(now_s - seconds);
            }
        }
        let note = time.laggard.map(|(name, behind)| {
            format!(
                "event time: {name} holds the watermark back, {} behind the newest partition (its rows wait; {} partition(s) paused)",
                humantime::format_duration(Duration::from_secs(u64::try_from(behind / 1_000_000).unwrap_or(0))),
                self.paused.len()
            )
        });
        if note != self.last_event_time_note {
            self.last_event_time_note = note;
            self.refresh_notes();
        }
    }

    fn audit_entry(&mut self, kind: audit::Kind, entry: &impl serde::Serialize) -> Result<(), ServiceError> {
        if let Some(log) = &mut self.audit {
            log.append(kind, entry)
                .and_then(|()| {
                    if kind == audit::Kind::Decision {
                        Ok(())
                    } else {
                        log.flush()
                    }
                })
                .map_err(ServiceError::audit(log.path()))?;
            self.metrics.audit_entries.set(log.entries() as i64);
        }
        Ok(())
    }

    /// Puts the audit entries written so far on disk (before a checkpoint: every decision the
    /// checkpoint reflects is in the log).
    fn sync_audit(&mut self) -> Result<(), ServiceError> {
        if let Some(log) = &mut self.audit {
            log.sync().map_err(ServiceError::audit(log.path()))?;
        }
        Ok(())
    }

    fn decision(&mut self, decision: &Decision) -> Result<(), ServiceError> {
        let payload = serde_json::to_vec(decision).expect("decisions serialise");
        let topic = match decision.mode {
            Mode::Enforce => &self.kafka.decisions_topic,
            Mode::Shadow => &self.kafka.shadow_topic,
        };
        let headers = OwnedHeaders::new().insert(Header {
            key: "rampart.mode",
            value: Some(decision.mode.to_string().as_str()),
        });
        let record = BaseRecord::with_opaque_to(topic, 0)
            .key(decision.actor.as_bytes())
            .payload(payload.as_slice())
            .headers(headers);
        self.send(record)?;
        self.audit_entry(audit::Kind::Decision, decision)?;
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                detector: decision.detector.id.clone(),
                verdict: decision.verdict.to_string(),
                mode: decision.mode.to_string(),
            })
            .inc();
        self.summary.decisions += 1;
        Ok(())
    }

    /// Sends the original bytes to the dead-letter topic, the reason and source position in
    /// headers.
    fn dead_letter(
        &mut self,
        letter: &DeadLetter,
        payload: &[u8],
        key: Option<&[u8]>,
    ) -> Result<(), ServiceError> {
        let kind = match letter.kind {
            DeadLetterKind::Malformed => "malformed",
            DeadLetterKind::Late => "late",
        };
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "rampart.kind",
                value: Some(kind),
            })
            .insert(Header {
                key: "rampart.error",
                value: Some(letter.error.as_str()),
            })
            .insert(Header {
                key: "rampart.pipeline",
                value: Some(self.pipeline.config.name.as_str()),
            });
        if let rampart_core::SourcePosition::Kafka {
            topic,
            partition,
            offset,
        } = &letter.source
        {
            headers = headers
                .insert(Header {
                    key: "rampart.topic",
                    value: Some(&**topic),
                })
                .insert(Header {
                    key: "rampart.partition",
                    value: Some(partition.to_string().as_str()),
                })
                .insert(Header {
                    key: "rampart.offset",
                    value: Some(offset.to_string().as_str()),
                });
        }
        let mut record = BaseRecord::with_opaque_to(&self.kafka.dead_letter_topic, 0)
            .payload(payload)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.send(record)
    }

    /// Hands one record to the producer; while its queue is full (a slow or unreachable
    /// broker) waits, reporting not ready, without consuming anything more.
    fn send<K: rdkafka::message::ToBytes + ?Sized>(
        &mut self,
        record: BaseRecord<'_, K, [u8], usize>,
    ) -> Result<(), ServiceError> {
        self.next_seq += 1;
        let mut record = record.delivery_opaque(self.next_seq);
        self.producer.context().sending(self.next_seq);
        let started = Instant::now();
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.wait_for_broker(started, "the producer queue is full")?;
                }
                Err((e, _)) => return Err(ServiceError::Broker(format!("cannot send to Kafka: {e}"))),
            }
        }
    }

    /// One step of waiting for the broker: marks the service not ready after a second, and
    /// gives up only on a second stop signal.
    fn wait_for_broker(&self, since: Instant, why: &str) -> Result<(), ServiceError> {
        self.producer.poll(Duration::from_millis(100));
        self.health.beat();
        if since.elapsed() > Duration::from_secs(1) {
            self.health.set_not_ready(Some(format!(
                "waiting for the broker: {why} ({} messages in flight)",
                self.producer.in_flight_count()
            )));
        }
        if self.stop.load(Ordering::Relaxed) >= 2 {
            return Err(ServiceError::Interrupted);
        }
        Ok(())
    }

    /// Runs the windowed detectors on up to `n` batches of `backlog`, oldest first, and
    /// publishes what they decide.
    fn work_windows(&mut self, backlog: &mut VecDeque<EventBatch>, n: usize) -> Result<(), ServiceError> {
        for batch in backlog.drain(..n.min(backlog.len())) {
            let evaluation = self.pipeline.evaluate_windowed(&batch);
            self.publish(evaluation)?;
        }
        Ok(())
    }

    /// A checkpoint of everything consumed, on this thread (when stopping or reloading, with
    /// no checkpoint running and no window work left).
    fn checkpoint_now(
        &mut self,
        acks: &ProducerCallbacks,
        stop: &AtomicUsize,
        health: &Health,
    ) -> Result<(), ServiceError> {
        let (progress, tpl) = self.take_consumed();
        let guard = self.pipeline.guard_snapshot();
        self.sync_audit()?;
        let result = checkpoint(
            &self.pipeline,
            acks,
            self.last_seq(),
            &progress,
            guard,
            stop,
            health,
        );
        self.checkpointed(result, &tpl)
    }

    /// The sequence number of the last message handed to the producer (`None`: none yet).
    fn last_seq(&self) -> Option<usize> {
        (self.next_seq > 0).then_some(self.next_seq)
    }

    /// Moves what was consumed since the last checkpoint into the progress; returns the
    /// progress to write and the offsets to commit to the group afterwards.
    fn take_consumed(&mut self) -> (Progress, TopicPartitionList) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), c) in std::mem::take(&mut self.consumed) {
            let p = self.progress.entry(source_name(&topic, partition)).or_default();
            p.events += c.events;
            p.dead_letters += c.dead_letters;
            p.next_offset = Some(c.next_offset);
            if let Err(e) = tpl.add_partition_offset(&topic, partition, Offset::Offset(c.next_offset)) {
                tracing::debug!(error = %e, "offset list");
            }
        }
        (self.progress.clone(), tpl)
    }

    /// After a checkpoint: commits its offsets to the group (for lag tools; the state store
    /// stays the source of truth) and updates the metrics.
    fn checkpointed(
        &mut self,
        result: Result<Duration, ServiceError>,
        tpl: &TopicPartitionList,
    ) -> Result<(), ServiceError> {
        let took = result?;
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(tpl, CommitMode::Async)
        {
            tracing::debug!(error = %e, "group offset commit (informational)");
        }
        self.metrics.checkpoints.inc();
        self.summary.checkpoints += 1;
        self.metrics.checkpoint.record(took.as_micros() as u64);
        let stats = self.pipeline.state_stats();
        self.metrics.state_disk_bytes.set(stats.disk_bytes as i64);
        self.metrics.state_cached_bytes.set(stats.cached_bytes as i64);
        self.metrics.state_waiting_rows.set(stats.waiting_rows as i64);
        if self.health.not_ready().is_some() {
            self.health.set_not_ready(None);
        }
        Ok(())
    }
}

/// A checkpoint: waits until the broker acknowledged every message numbered `through` or
/// lower (every decision and dead letter of the batches the window state holds), then writes
/// the window state with `progress` (the offsets it reflects) in one RocksDB write. Gives up
/// waiting only on a second stop signal. Returns how long it took.
fn checkpoint(
    pipeline: &Pipeline,
    acks: &ProducerCallbacks,
    through: Option<usize>,
    progress: &Progress,
    guard: Vec<u8>,
    stop: &AtomicUsize,
    health: &Health,
) -> Result<Duration, ServiceError> {
    let started = Instant::now();
    while let Some(seq) = through
        && !acks.settled_through(seq)
    {
        if started.elapsed() > Duration::from_secs(1) {
            health.set_not_ready(Some(format!(
                "waiting for the broker to acknowledge decisions ({} s)",
                started.elapsed().as_secs()
            )));
        }
        if stop.load(Ordering::Relaxed) >= 2 {
            return Err(ServiceError::Interrupted);
        }
        health.beat();
        std::thread::sleep(Duration::from_millis(1));
    }
    if acks.failed.load(Ordering::Relaxed) > 0 {
        let error = acks
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        return Err(ServiceError::Delivery(error));
    }
    pipeline.checkpoint_with(progress, guard)?;
    Ok(started.elapsed())
}

/// Waits for a checkpoint thread (its panic is this thread's panic).
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The shared name of a topic (positions of its events share it).
fn intern(topics: &mut BTreeMap<String, Arc<str>>, name: &str) -> Arc<str> {
    if let Some(t) = topics.get(name) {
        return Arc::clone(t);
    }
    let t: Arc<str> = Arc::from(name);
    topics.insert(name.to_string(), Arc::clone(&t));
    t
}

/// The progress key of a Kafka partition.
fn source_name(topic: &str, partition: i32) -> String {
    format!("kafka:{topic}/{partition}")
}

fn parse_source(source: &str) -> Option<(String, i32)> {
    let rest = source.strip_prefix("kafka:")?;
    let (topic, partition) = rest.rsplit_once('/')?;
    Some((topic.to_string(), partition.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_keys_round_trip() {
        assert_eq!(
            parse_source(&source_name("cloud/trail", 3)),
            Some(("cloud/trail".to_string(), 3))
        );
        assert_eq!(parse_source("data/x.json"), None);
    }
}
