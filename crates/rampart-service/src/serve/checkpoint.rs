//! Window work and checkpoints: the windowed detectors run on the batches the source admitted,
//! a few per round; a checkpoint waits for the broker to acknowledge every message before it,
//! then writes the window state with the input (offsets) it reflects, on its own thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_core::{kafka_source, parse_kafka_source};
use rampart_engine::Pipeline;
use rampart_engine::pipeline::{Input, SourceProgress};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{Service, Work};
use crate::ServiceError;
use crate::changelog::KafkaChangelog;
use crate::kafka::ProducerCallbacks;
use crate::metrics::Health;
use rampart_engine::changelog::ChangelogWriter;

impl Service<'_> {
    /// Runs the windowed detectors on up to `n` batches of `backlog`, oldest first, and
    /// publishes what they decide.
    pub(super) fn work_windows(
        &mut self,
        backlog: &mut VecDeque<Work>,
        n: usize,
    ) -> Result<(), ServiceError> {
        for work in backlog.drain(..n.min(backlog.len())) {
            match work {
                Work::Batch(batch) => self.pipeline.evaluate_windowed(&batch).emit(self)?,
                Work::Marks(marks) => {
                    // After the windows saw the rows before them.
                    let task = self.task.as_mut().expect("marks come to a task");
                    for mark in marks {
                        self.pipeline
                            .note_source(&mark.source, mark.newest, mark.gave_records);
                        task.marked_behind
                            .insert(mark.source, (mark.behind, Instant::now()));
                    }
                }
            }
        }
        Ok(())
    }

    /// A checkpoint of everything consumed, on this thread (when stopping or reloading, with
    /// no checkpoint running and no window work left).
    pub(super) fn checkpoint_now(
        &mut self,
        acks: &ProducerCallbacks,
        stop: &AtomicUsize,
        health: &Health,
    ) -> Result<(), ServiceError> {
        let (input, tpl) = self.input_for_checkpoint();
        let guard = self.pipeline.guard_snapshot();
        self.sync_audit()?;
        let changelog = self.changelog.clone();
        let result = write(
            &self.pipeline,
            changelog.as_ref(),
            false,
            acks,
            self.last_seq(),
            &input,
            guard,
            stop,
            health,
        );
        self.checkpointed(result, &tpl)
    }

    /// The input a checkpoint beginning now writes, and the offsets to commit to the group
    /// after it: those of the partitions consumed since the last checkpoint (not every
    /// partition the state ever held: one since assigned to another member keeps its commit).
    pub(super) fn input_for_checkpoint(&mut self) -> (Input, TopicPartitionList) {
        let mut input = self.pipeline.input_for_checkpoint();
        let mut tpl = TopicPartitionList::new();
        if let Some(task) = &self.task {
            // Scale-out: the state holds the forwarded records consumed so far (the input's
            // own offsets are the forwarding instances' to commit). Their position on the
            // repartition topic is written with the state, and the state partition's next
            // owner resumes from it: the group's committed offset may be ahead of the last
            // checkpoint the changelog holds (a commit that outran a checkpoint the next owner
            // did not restore, an owner the group had already replaced).
            let key = (task.topic.clone(), task.partition);
            let next = self
                .offsets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .copied();
            if let Some(next) = next {
                input.progress.insert(
                    kafka_source(&key.0, key.1),
                    SourceProgress {
                        next_offset: Some(next),
                        ..SourceProgress::default()
                    },
                );
                if let Err(e) = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(next)) {
                    tracing::debug!(error = %e, "offset list");
                }
            }
            return (input, tpl);
        }
        for (source, progress) in &input.progress {
            let Some(next) = progress.next_offset else {
                continue;
            };
            if self.committed.get(source) == Some(&next) {
                continue;
            }
            self.committed.insert(source.clone(), next);
            if let Some((topic, partition)) = parse_kafka_source(source)
                && let Err(e) = tpl.add_partition_offset(&topic, partition, Offset::Offset(next))
            {
                tracing::debug!(error = %e, "offset list");
            }
        }
        (input, tpl)
    }

    /// Waits for the checkpoint running, if any, and takes its result.
    pub(super) fn finish_checkpoint(
        &mut self,
        running: Option<super::Running<'_>>,
    ) -> Result<(), ServiceError> {
        match running {
            Some((handle, tpl)) => self.checkpointed(super::join(handle), &tpl),
            None => Ok(()),
        }
    }

    /// After a checkpoint: commits its offsets to the group (for lag tools; the state store
    /// stays the source of truth) once it is written, and updates the metrics. (A checkpoint
    /// starts only once the one before it is written: that one's offsets are committed first.)
    pub(super) fn checkpointed(
        &mut self,
        result: Result<Duration, ServiceError>,
        tpl: &TopicPartitionList,
    ) -> Result<(), ServiceError> {
        let took = result?;
        if let Some(before) = self.uncommitted.take() {
            self.commit_offsets(&before);
        }
        if self.pipeline.checkpoint_writing() {
            self.uncommitted = Some(tpl.clone());
        } else {
            self.commit_offsets(tpl);
        }
        self.metrics.checkpoints.inc();
        self.summary.checkpoints += 1;
        self.metrics.checkpoint.record(took.as_micros() as u64);
        let stats = self.pipeline.state_stats();
        self.metrics.state_disk_bytes.set(stats.disk_bytes as i64);
        self.metrics.state_cached_bytes.set(stats.cached_bytes as i64);
        self.metrics
            .state_store_memory_bytes
            .set(stats.store_memory_bytes as i64);
        self.metrics.state_waiting_rows.set(stats.waiting_rows as i64);
        if self.health.not_ready().is_some() {
            self.health.set_not_ready(None);
        }
        Ok(())
    }

    /// Commits the offsets of the checkpoint written behind once it is written (a failed write
    /// is the loop's error).
    pub(super) fn commit_written(&mut self) -> Result<(), ServiceError> {
        if self.uncommitted.is_none() || self.pipeline.checkpoint_writing() {
            return Ok(());
        }
        self.pipeline.settle_checkpoint()?;
        if let Some(tpl) = self.uncommitted.take() {
            self.commit_offsets(&tpl);
        }
        Ok(())
    }

    /// Commits `tpl` to the group: the input's offsets, or, in scale-out, the repartition
    /// topic's through the group member owning the partition (this consumer is not one).
    fn commit_offsets(&self, tpl: &TopicPartitionList) {
        if tpl.count() == 0 {
            return;
        }
        if let Some(task) = &self.task {
            let _ = task.commits.send(tpl.clone());
        } else if let Err(e) = self.consumer.commit(tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "group offset commit (informational)");
        }
    }
}

/// A checkpoint: waits until the broker acknowledged every message numbered `through` or
/// lower (every decision and dead letter of the batches the window state holds), then writes
/// the window state with `input` (the offsets it reflects) to the changelog, if any, and then
/// in one RocksDB write. Gives up waiting only on a second stop signal. With `behind`, the
/// writes run on a thread of their own once the state is encoded, while the windows go on
/// (the next checkpoint, or stopping, waits for them; a failed write is that one's error).
/// Returns how long it took (with `behind`: until encoded).
#[allow(clippy::too_many_arguments)]
pub(super) fn write(
    pipeline: &Pipeline,
    changelog: Option<&Arc<Mutex<KafkaChangelog>>>,
    behind: bool,
    acks: &ProducerCallbacks,
    through: Option<usize>,
    input: &Input,
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
    if let Some(error) = acks.failure() {
        return Err(ServiceError::Delivery(error));
    }
    match (changelog, behind) {
        (Some(log), true) => {
            let log: Arc<Mutex<dyn ChangelogWriter + Send>> = log.clone();
            pipeline.checkpoint_logged_behind(input, guard, log)?;
        }
        (Some(log), false) => {
            // (A write behind takes the log on its own thread: it must be done before the log
            // is taken here, or the checkpoint waiting for it would wait on this lock.)
            pipeline.settle_checkpoint()?;
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            pipeline.checkpoint_logged(input, guard, &mut *log)?;
        }
        (None, true) => pipeline.checkpoint_with_behind(input, guard)?,
        (None, false) => pipeline.checkpoint_with(input, guard)?,
    }
    Ok(started.elapsed())
}
