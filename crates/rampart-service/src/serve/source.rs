//! The source side of the loop: polling a micro-batch, decoding its messages, admitting the
//! batches into the pipeline and running the per-event detectors at once; and keeping the
//! pipeline's event time in step with the consumer's partitions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rampart_core::parse_kafka_source;
use rampart_engine::pipeline::EventTime;
use rampart_engine::{DeadLetter, EventBatch};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::Service;
use super::decoding::Polled;
use super::group::Step;
use crate::ServiceError;
use crate::metrics::{PartitionLabels, now_ms};

/// One record sent to the dead-letter topic, with the original bytes.
pub(super) struct Letter {
    pub(super) letter: DeadLetter,
    pub(super) payload: Vec<u8>,
    pub(super) key: Option<Vec<u8>>,
}

/// What one round of polling gathered.
#[derive(Default)]
pub(super) struct Gathered {
    pub(super) batches: Vec<EventBatch>,
    pub(super) letters: Vec<Letter>,
    /// Kafka timestamps (ms) of the messages, for the end-to-end latency.
    pub(super) timestamps: Vec<i64>,
    pub(super) messages: usize,
    /// Scale-out: what the instances forwarding the input told, after these batches.
    pub(super) marks: Vec<super::group::Mark>,
    /// Scale-out: operators' commands for this state partition.
    pub(super) commands: Vec<super::group::GroupCommand>,
    /// Scale-out: what the route's other state partitions' guards told.
    pub(super) guard_notes: Vec<super::group::GuardTold>,
}

impl Service<'_> {
    /// Where the consumer stands in a partition, as of now: the next offset after what was
    /// consumed (or stored with the state) or the consumer's fetch position, whichever is
    /// further (the fetch position also passes records the application never sees, such as
    /// transaction markers); `None` for a partition neither knows.
    fn positions(&self) -> impl Fn(&str, i32) -> Option<i64> + use<> {
        let fetch_positions = self.consumer.position().ok();
        let consumed = self.offsets.lock().unwrap_or_else(|p| p.into_inner()).clone();
        move |topic, partition| {
            let fetched = fetch_positions
                .as_ref()
                .and_then(|p| p.find_partition(topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                });
            consumed
                .get(&(topic.to_string(), partition))
                .copied()
                .max(fetched)
        }
    }

    /// The assigned partitions not yet consumed up to their high watermark (as the broker lists
    /// it and as the consumer's last fetches saw it), each as `topic/partition position/high`
    /// (empty: at the end). The position is the next offset
    /// after what was consumed (or stored with the state) or the consumer's fetch position,
    /// whichever is further, else the partition's start (`auto.offset.reset = earliest`). An
    /// unreachable broker answers nothing: not at the end.
    pub(super) fn partitions_behind(&self) -> Vec<String> {
        if self.health.assigned.load(Ordering::Relaxed) == 0 {
            return vec!["no partition assigned".to_string()];
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return vec!["no assignment".to_string()];
        };
        let position_in = self.positions();
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
            let position = position_in(topic, partition).unwrap_or(low);
            // (The end the broker lists may be short: some list the start of the last record
            // batch. What the consumer's fetches said, in its statistics, is taken too.)
            let fetches_say_behind = self
                .behind
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&rampart_core::kafka_source(topic, partition))
                .copied()
                == Some(true);
            if position < high {
                behind.push(format!("{topic}/{partition} {position}/{high}"));
            } else if fetches_say_behind {
                behind.push(format!(
                    "{topic}/{partition} {position}, more per the consumer's fetches"
                ));
            }
        }
        behind
    }

    /// Whether every assigned partition is consumed up to the end its last fetch saw (a
    /// fetch answers every few milliseconds once the consumer is at the end: it waits at most
    /// `fetch.wait.max.ms`). No request to the broker; a partition not fetched yet is not at
    /// its end.
    pub(super) fn consumed_to_fetched_end(&self) -> bool {
        if self.health.assigned.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return false;
        };
        let position_in = self.positions();
        !assignment.elements().is_empty()
            && assignment.elements().iter().all(|element| {
                let (topic, partition) = (element.topic(), element.partition());
                let Some((start, end)) = crate::kafka::fetched_bounds(&self.consumer, topic, partition)
                else {
                    return false;
                };
                position_in(topic, partition).unwrap_or(start) >= end
            })
    }

    /// Polls until a micro-batch is full (`source.batch_size` messages or
    /// `source.max_batch_bytes`) or `batch_max_wait` has passed since its first message (a
    /// record, or in a group a mark, command or guard note); returns at once (empty) when
    /// nothing comes for `idle_wait` (100 ms with nothing else to do; none while window work
    /// waits: the loop must not sleep on an empty input). The messages are copied out for
    /// the decoding thread (see [`super::decoding`]); the second value says whether the round
    /// ended full (more is likely waiting in the consumer).
    pub(super) fn poll_round(&mut self, idle_wait: Duration) -> (Polled, bool) {
        let mut out = self.decoding.round();
        let mut deadline: Option<Instant> = None;
        let limits = self.pipeline.config.input;
        let mut full = false;
        loop {
            let timeout = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => idle_wait,
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
            if let Some(task) = self.task.as_mut() {
                // Scale-out: the repartition partition's records one after another, with no gap.
                match task.continuity.check(message.offset(), Instant::now()) {
                    Step::Take => {}
                    Step::Again => continue,
                    Step::Gap { from } => {
                        tracing::info!(
                            topic = %task.topic,
                            partition = task.partition,
                            from,
                            shown = message.offset(),
                            "the broker showed a later record before earlier ones: reading again from the gap"
                        );
                        if let Err(e) = self.consumer.seek(
                            &task.topic,
                            task.partition,
                            Offset::Offset(from),
                            Duration::from_secs(5),
                        ) {
                            tracing::warn!(topic = %task.topic, partition = task.partition, error = %e, "seek");
                        }
                        // (The round ends here; the next one reads from the gap.)
                        break;
                    }
                    Step::Lost { from } => tracing::error!(
                        topic = %task.topic,
                        partition = task.partition,
                        from,
                        to = message.offset() - 1,
                        "records of the repartition partition never came (deleted by retention?): lost"
                    ),
                }
            }
            // Seen by the rebalance callback: a re-assignment resumes after what the window
            // state in memory already holds (or what is being decoded for it).
            self.offsets.lock().unwrap_or_else(|p| p.into_inner()).insert(
                (message.topic().to_string(), message.partition()),
                message.offset() + 1,
            );
            // (Any message starts the round's deadline: marks alone may come more often than
            // the 100 ms a round waits for the next message, and the round must still end.)
            deadline.get_or_insert_with(|| Instant::now() + self.kafka.batch_max_wait);
            let gathered = &mut out.gathered;
            let forwarded = match &self.task {
                Some(_) => match super::group::Forwarded::of(&message) {
                    super::group::Forwarded::Mark(mark) => {
                        gathered.marks.push(mark);
                        continue;
                    }
                    super::group::Forwarded::Command(command) => {
                        gathered.commands.push(command);
                        continue;
                    }
                    super::group::Forwarded::Guard(told) => {
                        gathered.guard_notes.push(told);
                        continue;
                    }
                    super::group::Forwarded::Record(at) => Some(at),
                },
                None => None,
            };
            gathered.messages += 1;
            gathered
                .timestamps
                .push(message.timestamp().to_millis().unwrap_or_else(now_ms));
            // A forwarded record keeps the position it has in the input.
            let (topic, partition, offset) = match forwarded {
                Some((topic, partition, offset)) => (intern(&mut self.topics, &topic), partition, offset),
                None => (
                    intern(&mut self.topics, message.topic()),
                    message.partition(),
                    message.offset(),
                ),
            };
            out.push(
                topic,
                partition,
                offset,
                message.payload().unwrap_or_default(),
                message.key(),
            );
            if out.len() >= limits.batch_size || out.bytes() >= limits.max_batch_bytes {
                full = true;
                break;
            }
        }
        if out.gathered.messages > 0 && self.health.not_ready().is_some_and(|r| r.contains("unreachable")) {
            self.health.set_not_ready(None);
        }
        (out, full)
    }

    /// Admits a gathered micro-batch into the pipeline (numbering its rows, counting its
    /// input), runs the per-event detectors on it and hands their decisions and the dead letters
    /// to the producer; returns the batches for the windowed detectors.
    pub(super) fn process(&mut self, gathered: Gathered) -> Result<Vec<EventBatch>, ServiceError> {
        let complete = Instant::now();
        // (Scale-out: every route reads every record; the actor's sends the dead letters and
        // counts the events.)
        let primary = self.task.as_ref().is_none_or(|t| t.primary);
        for letter in gathered.letters {
            if !self.pipeline.admit_dead_letter(&letter.letter) || !primary {
                continue;
            }
            self.metrics.bad_records.inc();
            self.summary.bad_records += 1;
            self.send_dead_letter(&letter.letter, &letter.payload, letter.key.as_deref())?;
        }
        let mut batches = Vec::with_capacity(gathered.batches.len());
        for batch in gathered.batches {
            let Some(batch) = self.pipeline.admit(batch) else {
                continue;
            };
            let n = batch.batch.num_rows();
            if primary {
                self.metrics.events.inc_by(n as u64);
                self.metrics.batch_events.observe(n as f64);
                self.summary.events += n as u64;
            }
            if let Some(newest) = (0..n).map(|i| batch.event_time(i)).max() {
                let seconds = newest.div_euclid(1_000_000);
                if seconds > self.metrics.newest_event_time.get() {
                    self.metrics.newest_event_time.set(seconds);
                }
            }
            self.pipeline.evaluate_per_event(&batch).emit(self)?;
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

    /// Pauses or resumes one input partition, and tells the clock (a paused partition is
    /// neither idle nor quiet).
    pub(super) fn set_paused(&mut self, topic: &str, partition: i32, pause: bool) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        if pause {
            self.consumer.pause(&tpl)?;
            self.paused.insert((topic.to_string(), partition));
        } else {
            self.consumer.resume(&tpl)?;
            self.paused.remove(&(topic.to_string(), partition));
        }
        let name = rampart_core::kafka_source(topic, partition);
        self.pipeline.set_source_flags(&name, Some(pause), None);
        Ok(())
    }

    /// Keeps the pipeline's event-time clock in step with the consumer: the assigned
    /// partitions, which of them have records not consumed yet; pauses the partitions that run
    /// ahead of the slowest one by more than `max_partition_skew` (resumes them at half that,
    /// or when it goes idle); and exports it all.
    pub(super) fn follow_event_time(&mut self) {
        if self.task.is_some() {
            return self.follow_forwarded_event_time();
        }
        self.follow_assignment();
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
        self.align_partitions(&time);
        self.export_event_time(&time);
    }

    /// Scale-out: the clock's sources are the input's partitions (whose instances tell their
    /// progress through marks); a source counts as behind when its instance says so or when
    /// this loop's own partition has records not consumed yet.
    fn follow_forwarded_event_time(&mut self) {
        let behind_here = {
            let task = self.task.as_ref().expect("a task");
            let name = rampart_core::kafka_source(&task.topic, task.partition);
            self.behind
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .copied()
                // (Unknown until the consumer's first statistics: it may have a backlog.)
                .unwrap_or(true)
        };
        let (_, stale) = super::group::mark_timing(self.pipeline.config.service.quiet_after);
        let task = self.task.as_mut().expect("a task");
        if !task.tracked {
            task.tracked = true;
            self.pipeline.track_sources(&task.sources);
        }
        for name in &task.sources {
            // Unheard of for a while: its forwarding instance may be gone with records left.
            let b = behind_here
                || task
                    .marked_behind
                    .get(name)
                    .is_none_or(|(behind, at)| *behind || at.elapsed() > stale);
            if self.behind_told.get(name) != Some(&b) {
                self.pipeline.set_source_flags(name, None, Some(b));
                self.behind_told.insert(name.clone(), b);
            }
        }
        if let Some(time) = self.pipeline.event_time() {
            self.export_event_time(&time);
        }
    }

    /// After a new assignment, tells the clock which partitions this instance consumes.
    fn follow_assignment(&mut self) {
        let generation = self.health.assignments.load(Ordering::Relaxed);
        if generation == self.assignments_seen {
            return;
        }
        self.assignments_seen = generation;
        let names: Vec<String> = self
            .consumer
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| rampart_core::kafka_source(e.topic(), e.partition()))
                    .collect()
            })
            .unwrap_or_default();
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
        // A partition whose lag the statistics have not told since the assignment may have a
        // backlog: behind (neither idle nor quiet) until they do.
        let known = self.behind.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for name in names.into_iter().filter(|n| !known.contains_key(n)) {
            self.pipeline.set_source_flags(&name, None, Some(true));
            self.behind_told.insert(name, true);
        }
    }

    /// Pauses the partitions whose watermark runs more than `max_partition_skew` ahead of the
    /// slowest partition that holds the watermark and has records (one with none yet becomes
    /// idle instead), and resumes them at half that (Flink's watermark alignment): the rows
    /// waiting for the slowest one stay bounded.
    fn align_partitions(&mut self, time: &EventTime) {
        let skew = rampart_core::time::micros(self.pipeline.config.service.max_partition_skew);
        let holder = time
            .sources
            .iter()
            .filter(|s| s.newest > i64::MIN && !s.idle)
            .min_by_key(|s| s.newest);
        let catching_up = holder.map(|h| h.watermark(time.lateness));
        for source in &time.sources {
            let Some((topic, partition)) = parse_kafka_source(&source.name) else {
                continue;
            };
            let lead = catching_up.map(|floor| source.watermark(time.lateness).saturating_sub(floor));
            let paused = self.paused.contains(&(topic.clone(), partition));
            let pause = match lead {
                Some(lead) if !paused => lead > skew,
                Some(lead) => lead > skew / 2,
                None => false,
            };
            if pause == paused {
                continue;
            }
            match self.set_paused(&topic, partition, pause) {
                Ok(()) => tracing::info!(
                    partition = %source.name,
                    lead_s = lead.unwrap_or_default() / 1_000_000,
                    "{} (event time ahead of the watermark)",
                    if pause { "paused" } else { "resumed" }
                ),
                Err(e) => tracing::warn!(partition = %source.name, error = %e, "cannot pause or resume"),
            }
        }
    }

    /// Event time in the metrics (the watermark; per partition: its watermark, how far its
    /// events lag the wall clock, whether it is paused) and in /readyz (a partition holding
    /// the watermark back).
    fn export_event_time(&mut self, time: &EventTime) {
        let now_s = now_ms() / 1000;
        if time.watermark > i64::MIN {
            self.metrics.watermark.set(time.watermark.div_euclid(1_000_000));
        }
        for source in &time.sources {
            let Some((topic, partition)) = parse_kafka_source(&source.name) else {
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
        let note = time.laggard.as_ref().map(|(name, behind)| {
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
}

/// The shared name of a topic (positions of its events share it).
pub(super) fn intern(topics: &mut BTreeMap<String, Arc<str>>, name: &str) -> Arc<str> {
    if let Some(t) = topics.get(name) {
        return Arc::clone(t);
    }
    let t: Arc<str> = Arc::from(name);
    topics.insert(name.to_string(), Arc::clone(&t));
    t
}
