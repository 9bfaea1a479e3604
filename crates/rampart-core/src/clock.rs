//! Event time across input sources: each source (a Kafka partition, or the single stream of a
//! file replay) keeps its own newest event time, and the pipeline's watermark is the minimum of
//! the sources' watermarks (newest time minus the allowed lateness), as in Flink and Arroyo. A
//! source read ahead of another never makes the other's events late.
//!
//! Why this rule and not Kafka Streams' (process the buffered record with the lowest timestamp
//! among the partitions' heads, waiting up to `max.task.idle.ms` for an empty partition): that
//! one needs every partition's records buffered before any is processed, and orders records
//! across partitions, which librdkafka's per-partition fetches (a megabyte of one partition,
//! then of the next) make expensive. The minimum of watermarks lets each batch be processed as
//! it comes: rows wait in the window state (which already waits for the watermark) instead of
//! records waiting in front of it, and a partition far ahead is paused, not buffered.
//!
//! Two times come out of it:
//! - the **watermark**: rows older than it have every row of their frames (later records older
//!   than it are late), so they are decided exactly;
//! - **complete before**: rows older than it have all their peers (every row of the same time)
//!   if each source delivers its records in event-time order, so a condition that only becomes
//!   true can be decided on them without waiting for the lateness.
//!
//! A live service adds processing time ([`Idleness`]): a source with no records for a while
//! stops holding the watermark (until it gets records again), and a stream with no records at
//! all for a moment counts as complete up to its newest time (a burst followed by silence is
//! decided). A replay has neither: its answer depends on its input only.

use std::time::{Duration, Instant};

use crate::position::SourcePosition;

/// The processing-time rules of a live service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idleness {
    /// A source with no record for this long stops holding the watermark, unless it is paused
    /// or known to have records not yet consumed.
    pub idle_after: Duration,
    /// When no source has given a record for this long (none paused or known to have more),
    /// the stream went quiet: every row that has arrived has all its peers.
    pub quiet_after: Duration,
}

/// One source's event-time progress.
#[derive(Debug, Clone)]
pub struct SourceTime {
    /// The source: `kafka:TOPIC/PARTITION`, or [`FILES`] for a replay of files.
    pub name: String,
    /// Newest event time seen (µs); `i64::MIN` before any.
    pub newest: i64,
    /// Records of it found late.
    pub late: u64,
    /// Paused by the service (it runs ahead): neither idle nor quiet.
    pub paused: bool,
    /// Known to have records not yet consumed (consumer lag), or not known yet to have none (a
    /// live source starts so, until its consumer's lag is first told): neither idle nor quiet.
    pub behind: bool,
    /// Idle as of the last [`EventClock::advance`]: it does not hold the watermark.
    pub idle: bool,
    /// When it last gave a record (or was added), in processing time; `None` in a replay.
    last_record: Option<Instant>,
}

impl SourceTime {
    fn new(name: String, now: Option<Instant>) -> Self {
        Self {
            name,
            newest: i64::MIN,
            late: 0,
            paused: false,
            // A live source's lag is unknown until told: it may have a backlog.
            behind: now.is_some(),
            idle: false,
            last_record: now,
        }
    }

    /// The source's own watermark.
    pub fn watermark(&self, lateness: i64) -> i64 {
        self.newest.saturating_sub(lateness)
    }

    fn silent_for(&self, now: Option<Instant>, period: Duration) -> bool {
        match (now, self.last_record) {
            (Some(now), Some(last)) => !self.paused && !self.behind && now.duration_since(last) >= period,
            _ => false,
        }
    }
}

/// The name of the one source of a replay of files (files are one stream, in input order).
pub const FILES: &str = "files";

/// The event-time clock of a pipeline.
#[derive(Debug, Clone)]
pub struct EventClock {
    lateness: i64,
    idleness: Option<Idleness>,
    sources: Vec<SourceTime>,
    watermark: i64,
    complete: i64,
    /// Processing time of the current round (live only).
    now: Option<Instant>,
    /// The last Kafka source looked up: (topic, partition, index).
    last_lookup: Option<(std::sync::Arc<str>, i32, usize)>,
    /// The live input ended (see [`Self::end_input`]), and no record came since.
    ended: bool,
}

/// Why a record is late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Late {
    /// Its source's newest event time before it (µs).
    pub source_newest: i64,
    /// The pipeline's watermark (µs).
    pub watermark: i64,
}

impl EventClock {
    /// A clock with no source yet, for `lateness` µs of allowed lateness, in event time only.
    pub fn new(lateness: i64) -> Self {
        Self {
            lateness,
            idleness: None,
            sources: Vec::new(),
            watermark: i64::MIN,
            complete: i64::MIN,
            now: None,
            last_lookup: None,
            ended: false,
        }
    }

    /// Follows processing time too (a live service): idle and quiet sources.
    pub fn set_idleness(&mut self, idleness: Idleness, now: Instant) {
        self.idleness = Some(idleness);
        self.now = Some(now);
        for s in &mut self.sources {
            s.last_record.get_or_insert(now);
        }
    }

    /// The allowed lateness (µs).
    pub fn lateness(&self) -> i64 {
        self.lateness
    }

    /// Sets the processing time of this round (ignored unless live).
    pub fn set_now(&mut self, now: Instant) {
        if self.idleness.is_some() {
            self.now = Some(now);
        }
    }

    /// The pipeline's watermark (µs): every row older than it has all the rows of its frames.
    /// It never goes back.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Rows older than this (µs) have every row of their own time, given sources in event-time
    /// order; never before the watermark. `i64::MAX` when every source is quiet.
    pub fn complete_before(&self) -> i64 {
        self.complete
    }

    /// Newest event time of any source (µs).
    pub fn newest(&self) -> i64 {
        self.sources.iter().map(|s| s.newest).max().unwrap_or(i64::MIN)
    }

    /// The sources, in the order they were added.
    pub fn sources(&self) -> &[SourceTime] {
        &self.sources
    }

    /// Sets a source's paused or behind flags (`None` leaves one as it is).
    pub fn set_flags(&mut self, name: &str, paused: Option<bool>, behind: Option<bool>) {
        if let Some(s) = self.sources.iter_mut().find(|s| s.name == name) {
            if let Some(p) = paused {
                s.paused = p;
            }
            if let Some(b) = behind {
                s.behind = b;
            }
        }
    }

    /// The sources this instance consumes, by name: new ones hold the watermark from now on
    /// (until their first record, or until idle); sources not listed are dropped.
    pub fn track(&mut self, names: &[String]) {
        let before = self.sources.len();
        self.sources.retain(|s| names.contains(&s.name));
        for name in names {
            if !self.sources.iter().any(|s| &s.name == name) {
                self.sources.push(SourceTime::new(name.clone(), self.now));
            }
        }
        if self.sources.len() != before || !names.is_empty() {
            self.last_lookup = None;
        }
    }

    /// What a source reached, told by whoever reads it (a scale-out instance forwarding its
    /// partition's records: most of them go to other instances): its newest event time, and
    /// whether it gave records since it last told (which counts as a record for idleness).
    /// Unlike [`Self::observe`], nothing is late.
    pub fn note(&mut self, name: &str, newest: i64, gave_records: bool) {
        let now = self.now;
        let i = self.index_of(name);
        let s = &mut self.sources[i];
        s.newest = s.newest.max(newest);
        if gave_records && now.is_some() {
            s.last_record = now;
        }
    }

    /// The live input ended: a service stopping at the end of its partitions (`--until-end`)
    /// knows from the broker that no record is left, so the stream counts as quiet at once, as
    /// it would after `quiet_after` without a record (the watermark does not move). A record
    /// observed afterwards undoes it.
    pub fn end_input(&mut self) {
        self.ended = true;
    }

    /// Restores the watermark and the sources' newest times of a checkpoint.
    pub fn restore(&mut self, watermark: i64, sources: impl IntoIterator<Item = (String, i64)>) {
        self.watermark = self.watermark.max(watermark);
        self.complete = self.complete.max(self.watermark);
        for (name, newest) in sources {
            let i = self.index_of(&name);
            self.sources[i].newest = self.sources[i].newest.max(newest);
        }
    }

    fn index_of(&mut self, name: &str) -> usize {
        match self.sources.iter().position(|s| s.name == name) {
            Some(i) => i,
            None => {
                self.sources.push(SourceTime::new(name.to_string(), self.now));
                self.sources.len() - 1
            }
        }
    }

    /// The source a record at `position` belongs to (added if new).
    pub fn source_of(&mut self, position: &SourcePosition) -> usize {
        match position {
            SourcePosition::File { .. } => self.index_of(FILES),
            SourcePosition::Kafka { topic, partition, .. } => {
                if let Some((t, p, i)) = &self.last_lookup
                    && std::sync::Arc::ptr_eq(t, topic)
                    && p == partition
                {
                    return *i;
                }
                let i = self.index_of(&crate::position::kafka_source(topic, *partition));
                self.last_lookup = Some((std::sync::Arc::clone(topic), *partition, i));
                i
            }
        }
    }

    /// A record of source `source` at event time `time`: `Err` when it is late (older than its
    /// source's newest time by more than the allowed lateness, or older than the watermark).
    pub fn observe(&mut self, source: usize, time: i64) -> Result<(), Late> {
        self.ended = false;
        let (lateness, watermark, now) = (self.lateness, self.watermark, self.now);
        let s = &mut self.sources[source];
        if now.is_some() {
            s.last_record = now;
        }
        if time < watermark.max(s.watermark(lateness)) {
            s.late += 1;
            return Err(Late {
                source_newest: s.newest,
                watermark,
            });
        }
        s.newest = s.newest.max(time);
        Ok(())
    }

    /// Moves the watermark and the completeness bound forward from the sources' progress (and,
    /// live, their silence). Returns whether either moved.
    pub fn advance(&mut self) -> bool {
        let (lateness, now) = (self.lateness, self.now);
        let idle = |s: &SourceTime| self.idleness.is_some_and(|i| s.silent_for(now, i.idle_after));
        let quiet = |s: &SourceTime| self.idleness.is_some_and(|i| s.silent_for(now, i.quiet_after));
        let holding = self
            .sources
            .iter()
            .filter(|s| !idle(s))
            .map(|s| s.watermark(lateness))
            .min();
        // Every source idle: none holds the others back.
        let candidate = holding.or_else(|| self.sources.iter().map(|s| s.watermark(lateness)).max());
        let watermark = self.watermark.max(candidate.unwrap_or(i64::MIN));
        // A stream gone quiet (no source has given a record for a moment, none known to
        // have more) has all its rows' peers; otherwise the slowest active source's newest.
        let all_quiet = !self.sources.is_empty() && (self.ended || self.sources.iter().all(quiet));
        let complete = if all_quiet {
            i64::MAX
        } else {
            self.sources
                .iter()
                .filter(|s| !idle(s))
                .map(|s| s.newest)
                .min()
                .unwrap_or(if self.sources.is_empty() {
                    i64::MIN
                } else {
                    i64::MAX
                })
        }
        .max(watermark);
        let idle: Vec<bool> = self.sources.iter().map(idle).collect();
        for (s, idle) in self.sources.iter_mut().zip(idle) {
            s.idle = idle;
        }
        let moved = watermark != self.watermark || complete != self.complete;
        self.watermark = watermark;
        self.complete = complete;
        moved
    }

    /// The source holding the watermark back, when its watermark is more than the allowed
    /// lateness behind the newest source's: (its name, how far behind, µs).
    pub fn laggard(&self) -> Option<(&str, i64)> {
        let newest = self.newest();
        let holder = self
            .sources
            .iter()
            .filter(|s| s.watermark(self.lateness) <= self.watermark)
            .min_by_key(|s| s.newest)?;
        let behind = newest.saturating_sub(holder.newest);
        (holder.newest > i64::MIN && behind > self.lateness).then_some((holder.name.as_str(), behind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::kafka_source;
    use std::sync::Arc;

    const MIN: i64 = 60_000_000;

    fn at(topic: &Arc<str>, partition: i32) -> SourcePosition {
        SourcePosition::Kafka {
            topic: Arc::clone(topic),
            partition,
            offset: 0,
        }
    }

    #[test]
    fn the_watermark_is_the_slowest_partitions_and_a_partition_read_ahead_makes_no_one_late() {
        let topic: Arc<str> = "events".into();
        let mut clock = EventClock::new(MIN);
        clock.track(&[kafka_source("events", 0), kafka_source("events", 1)]);
        clock.advance();
        assert_eq!(
            clock.watermark(),
            i64::MIN,
            "an empty partition holds the watermark"
        );
        // Partition 0 is read an hour ahead of partition 1.
        let p0 = clock.source_of(&at(&topic, 0));
        for t in 0..60 {
            clock.observe(p0, t * MIN).expect("in order");
        }
        clock.advance();
        assert_eq!(clock.watermark(), i64::MIN);
        let p1 = clock.source_of(&at(&topic, 1));
        clock
            .observe(p1, 0)
            .expect("partition 1's first event is not late");
        clock.observe(p1, 10 * MIN).expect("in order");
        clock.advance();
        assert_eq!(clock.watermark(), 9 * MIN);
        assert_eq!(clock.complete_before(), 10 * MIN);
        // Late against its own partition's progress, and against the watermark.
        assert_eq!(
            clock.observe(p1, 8 * MIN),
            Err(Late {
                source_newest: 10 * MIN,
                watermark: 9 * MIN
            })
        );
        clock.observe(p1, 9 * MIN + 1).expect("within the lateness");
        assert_eq!(clock.sources()[p1].late, 1);
        assert_eq!(clock.laggard(), Some(("kafka:events/1", 49 * MIN)));
    }

    #[test]
    fn a_replay_of_files_is_one_stream() {
        let mut clock = EventClock::new(MIN);
        let file = |line| SourcePosition::File {
            file: "a.json".into(),
            line,
        };
        let s = clock.source_of(&file(1));
        assert_eq!(clock.source_of(&file(2)), s);
        clock.observe(s, 10 * MIN).expect("first");
        assert!(clock.observe(s, 8 * MIN).is_err());
        clock.advance();
        assert_eq!((clock.watermark(), clock.complete_before()), (9 * MIN, 10 * MIN));
    }

    /// A clock over partitions 0 and 1 of `events` (idle after 30 s, quiet after 1 s) that saw
    /// one record, at 10 minutes, on partition 0: the clock, partition 0's source, its start.
    fn two_partitions_one_at_ten_minutes() -> (EventClock, usize, Instant) {
        let topic: Arc<str> = "events".into();
        let start = Instant::now();
        let mut clock = EventClock::new(MIN);
        clock.set_idleness(
            Idleness {
                idle_after: Duration::from_secs(30),
                quiet_after: Duration::from_secs(1),
            },
            start,
        );
        clock.track(&[kafka_source("events", 0), kafka_source("events", 1)]);
        let p0 = clock.source_of(&at(&topic, 0));
        clock.observe(p0, 10 * MIN).expect("first");
        clock.advance();
        (clock, p0, start)
    }

    #[test]
    fn an_ended_input_counts_as_quiet_at_once_until_a_record_comes() {
        let (mut clock, p0, _) = two_partitions_one_at_ten_minutes();
        assert_eq!(clock.complete_before(), i64::MIN, "partition 1 may have records");
        // The service found both partitions at their end: complete now, without waiting for
        // the quiet period; the watermark does not move.
        clock.end_input();
        clock.advance();
        assert_eq!(clock.complete_before(), i64::MAX);
        assert_eq!(clock.watermark(), i64::MIN);
        // A record after it: the input had not ended.
        clock.observe(p0, 11 * MIN).expect("later");
        clock.advance();
        assert_eq!(
            clock.complete_before(),
            i64::MIN,
            "partition 1 may have records again"
        );
    }

    #[test]
    fn idle_partitions_stop_holding_the_watermark_and_quiet_ones_count_as_complete() {
        let (mut clock, _, start) = two_partitions_one_at_ten_minutes();
        assert_eq!(clock.watermark(), i64::MIN, "partition 1 holds it");
        assert_eq!(clock.complete_before(), i64::MIN);
        // Their lag is not known yet (they may have a backlog): not quiet after the period.
        clock.set_now(start + Duration::from_secs(2));
        clock.advance();
        assert_eq!(
            clock.complete_before(),
            i64::MIN,
            "partition 1 may have records before 10 min"
        );
        // Once told they have nothing waiting, both count as complete after the quiet
        // period, not yet idle.
        for p in 0..2 {
            clock.set_flags(&kafka_source("events", p), None, Some(false));
        }
        clock.advance();
        assert_eq!(clock.complete_before(), i64::MAX);
        assert_eq!(clock.watermark(), i64::MIN);
        // Partition 1 known to be behind is neither.
        clock.set_flags("kafka:events/1", None, Some(true));
        clock.set_now(start + Duration::from_secs(31));
        clock.advance();
        assert_eq!(clock.watermark(), i64::MIN);
        assert_eq!(clock.complete_before(), i64::MIN);
        // Idle: the watermark follows partition 0 (itself idle too: then the newest counts).
        clock.set_flags("kafka:events/1", None, Some(false));
        clock.advance();
        assert_eq!(clock.watermark(), 9 * MIN);
        // Partition 1 wakes up behind the watermark: its old records are late now.
        let p1 = clock.source_of(&at(&"events".into(), 1));
        assert!(clock.observe(p1, 5 * MIN).is_err());
        clock.observe(p1, 9 * MIN).expect("at the watermark");
        clock.advance();
        assert_eq!(clock.watermark(), 9 * MIN, "the watermark never goes back");
    }
}
