//! Event time as the pipeline keeps it ([`rampart_core::EventClock`] inside the windows):
//! the processing-time rules a live service sets, the sources it tells of (through an inbox,
//! so that it never waits for the lock a checkpoint holds), and a snapshot of where event time
//! stands ([`EventTime`]) after each evaluation.

use rampart_core::{EventClock, Idleness};

use super::Pipeline;
use crate::windows::keyed::Bounds;

/// A change to the event-time clock from outside the pipeline.
pub(super) enum ClockChange {
    Track(Vec<String>),
    Flags(String, Option<bool>, Option<bool>),
    Note(String, i64, bool),
    Ended,
}

/// Where event time stands (see [`rampart_core::clock`]).
#[derive(Debug, Clone)]
pub struct EventTime {
    /// The watermark (µs).
    pub watermark: i64,
    /// Rows older than this have all their peers (µs; `i64::MAX`: every source is quiet).
    pub complete_before: i64,
    /// The allowed lateness (µs).
    pub lateness: i64,
    /// Each source's progress.
    pub sources: Vec<rampart_core::clock::SourceTime>,
    /// The source holding the watermark back more than the allowed lateness behind the
    /// newest: its name and how far (µs).
    pub laggard: Option<(String, i64)>,
}

impl Pipeline {
    /// Makes the pipeline's event time follow processing time too, as a live service's must:
    /// a source with no records for `idleness.idle_after` stops holding the watermark, one
    /// quiet for `idleness.quiet_after` counts as complete (see [`rampart_core::clock`]).
    /// Replays never do (their answer depends on their input only).
    pub fn set_live(&self, idleness: Idleness) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(idleness);
        self.lock()
            .clock
            .set_idleness(idleness, std::time::Instant::now());
    }

    /// The sources (Kafka partitions, by progress key) this instance consumes: new ones hold
    /// the watermark until their first record or until idle; others are forgotten. Takes
    /// effect at the next evaluation.
    pub fn track_sources(&self, names: &[String]) {
        self.post(ClockChange::Track(names.to_vec()));
    }

    /// Marks a source paused (it runs ahead) and/or behind (records not consumed yet): neither
    /// counts as idle or quiet. Takes effect at the next evaluation.
    pub fn set_source_flags(&self, name: &str, paused: Option<bool>, behind: Option<bool>) {
        self.post(ClockChange::Flags(name.to_string(), paused, behind));
    }

    /// What a source reached, told by the instance that reads it (see
    /// [`rampart_core::EventClock::note`]). Takes effect at the next evaluation: tell it after
    /// the windows evaluated the rows of the source that came before it.
    pub fn note_source(&self, name: &str, newest: i64, gave_records: bool) {
        self.post(ClockChange::Note(name.to_string(), newest, gave_records));
    }

    /// The live input ended: no record is left on any source (see
    /// [`rampart_core::EventClock::end_input`]). Takes effect at the next evaluation.
    pub fn input_ended(&self) {
        self.post(ClockChange::Ended);
    }

    pub(super) fn post(&self, change: ClockChange) {
        self.clock_inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(change);
    }

    /// Applies what the service told the clock, sets its processing time, and afterwards
    /// (see [`Self::publish_event_time`]) says where it stands.
    pub(super) fn update_clock(&self, clock: &mut EventClock) {
        let changes = std::mem::take(&mut *self.clock_inbox.lock().unwrap_or_else(|p| p.into_inner()));
        clock.set_now(std::time::Instant::now());
        for change in changes {
            match change {
                ClockChange::Track(names) => clock.track(&names),
                ClockChange::Flags(name, paused, behind) => clock.set_flags(&name, paused, behind),
                ClockChange::Note(name, newest, gave) => clock.note(&name, newest, gave),
                ClockChange::Ended => clock.end_input(),
            }
        }
    }

    pub(super) fn publish_event_time(&self, clock: &EventClock) {
        *self.event_time.lock().unwrap_or_else(|p| p.into_inner()) = Some(EventTime {
            watermark: clock.watermark(),
            complete_before: clock.complete_before(),
            lateness: clock.lateness(),
            sources: clock.sources().to_vec(),
            laggard: clock.laggard().map(|(name, behind)| (name.to_string(), behind)),
        });
    }

    /// Where event time stood after the last evaluation (never waits for the window state).
    pub fn event_time(&self) -> Option<EventTime> {
        self.event_time.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub(super) fn bounds_of(clock: &EventClock) -> Bounds {
    Bounds {
        watermark: clock.watermark(),
        complete: clock.complete_before(),
        lateness: clock.lateness(),
    }
}

pub(super) fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, rampart_core::time::micros)
}
