//! The input side of the batch loop: which events and dead letters the pipeline has taken, from
//! which source, and the row ids it gave them. One owner for both, so that replay, the service
//! and detector tests number rows and count progress the same way, and a checkpoint writes the
//! progress that matches its window state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use rampart_core::SourcePosition;

use crate::input::decode::{DeadLetter, EventBatch};

/// Input consumed so far, per source (a file path, or [`rampart_core::kafka_source`]): events
/// and dead letters, counted separately (each in source order).
pub type Progress = BTreeMap<String, SourceProgress>;

/// How much of one source has been consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceProgress {
    /// Events taken from it.
    pub events: u64,
    /// Records of it sent to the dead letters as malformed.
    pub dead_letters: u64,
    /// For a Kafka partition: the next offset to consume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
}

/// Where the input stands: the next row id and each source's progress. A checkpoint writes one
/// with the window state that holds exactly these rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Input {
    /// The row id the next event gets (row ids continue across restarts).
    pub next_row: u64,
    /// Per source, what was taken.
    pub progress: Progress,
}

/// The pipeline's intake: [`Input`] as taken so far, and what an earlier run with the same
/// state had already taken, to be skipped.
#[derive(Debug, Default)]
pub(crate) struct Intake {
    input: Input,
    /// What an earlier run took, to skip. Files: the events and dead letters still to skip (a
    /// replay resumed on a persistent state reads its files from the start). Kafka partitions
    /// resume by offset: records below the `next_offset` the earlier run reached are skipped
    /// (within a run, records of a partition may be admitted out of offset order: a dead
    /// letter is admitted before the batch holding the events around it).
    skip: Progress,
    /// Per Kafka partition, the offset after the last event and after the last dead letter
    /// taken in this run: a record below it is one read again (a scale-out state partition
    /// gets an input partition's records again when the instance forwarding them changes).
    /// Apart, because a dead letter is admitted before the batch of the events before it.
    seen: BTreeMap<String, (Option<i64>, Option<i64>)>,
    /// Whether anything was taken since the last [`Intake::for_checkpoint`].
    changed: bool,
}

impl Intake {
    /// An intake resuming after `input` (restored from a checkpoint).
    pub fn resuming(input: Input) -> Self {
        let skip = input.progress.clone();
        Self {
            input,
            skip,
            seen: BTreeMap::new(),
            changed: false,
        }
    }

    pub fn input(&self) -> &Input {
        &self.input
    }

    /// Whether anything was taken since the last checkpoint's snapshot.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// The input a checkpoint starting now writes; later input counts as new.
    pub fn for_checkpoint(&mut self) -> Input {
        self.changed = false;
        self.input.clone()
    }

    /// Takes a decoded batch: drops the events already taken, numbers the rest and counts
    /// them. `None` when nothing is left.
    pub fn admit(&mut self, mut batch: EventBatch) -> Option<EventBatch> {
        let n = batch.positions.len();
        let mut keep = vec![true; n];
        let mut run_start = 0;
        while run_start < n {
            let first = &batch.positions[run_start];
            let run_end = (run_start + 1..n)
                .find(|&i| !batch.positions[i].same_source(first))
                .unwrap_or(n);
            let name = first.source();
            let mut skip = self.skip.get_mut(name.as_ref());
            let resume_at = skip.as_ref().and_then(|s| s.next_offset);
            let mut skip = skip.as_mut().map(|s| &mut s.events);
            let seen = &mut self.seen.entry(name.to_string()).or_default().0;
            let progress = self.input.progress.entry(name.into_owned()).or_default();
            for (i, position) in (run_start..run_end).zip(&batch.positions[run_start..run_end]) {
                keep[i] = take(position, progress, skip.as_deref_mut(), resume_at, seen);
                if keep[i] {
                    progress.events += 1;
                }
            }
            run_start = run_end;
        }
        if keep.iter().any(|k| !k) {
            batch = batch.retain(&keep);
        }
        let rows = batch.batch.num_rows() as u64;
        if rows == 0 {
            return None;
        }
        batch.renumber(self.input.next_row);
        self.input.next_row += rows;
        self.changed = true;
        Some(batch)
    }

    /// Takes a malformed record's dead letter: `false` when an earlier run already sent it.
    pub fn admit_dead_letter(&mut self, letter: &DeadLetter) -> bool {
        let name = letter.source.source();
        let mut skip = self.skip.get_mut(name.as_ref());
        let resume_at = skip.as_ref().and_then(|s| s.next_offset);
        let skip = skip.as_mut().map(|s| &mut s.dead_letters);
        let seen = &mut self.seen.entry(name.to_string()).or_default().1;
        let progress = self.input.progress.entry(name.into_owned()).or_default();
        if !take(&letter.source, progress, skip, resume_at, seen) {
            return false;
        }
        progress.dead_letters += 1;
        self.changed = true;
        true
    }
}

/// Whether a record at `position` is new: a Kafka record at or past the offset an earlier run
/// reached (`resume_at`) and past the last record of its kind this run took (`seen`, which
/// it moves, as it moves the partition's next offset), or a file record past the `skip` count
/// still to skip (which it then lowers).
fn take(
    position: &SourcePosition,
    progress: &mut SourceProgress,
    skip: Option<&mut u64>,
    resume_at: Option<i64>,
    seen: &mut Option<i64>,
) -> bool {
    match position {
        SourcePosition::Kafka { offset, .. } => {
            if resume_at.max(*seen).is_some_and(|at| *offset < at) {
                return false;
            }
            *seen = Some(offset + 1);
            progress.next_offset = Some(progress.next_offset.map_or(offset + 1, |n| n.max(offset + 1)));
            true
        }
        SourcePosition::File { .. } => match skip {
            Some(left) if *left > 0 => {
                *left -= 1;
                false
            }
            _ => true,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Array, UInt64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;

    use super::*;
    use crate::input::decode::DeadLetterKind;

    fn batch(positions: Vec<SourcePosition>) -> EventBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("row", DataType::UInt64, false)]));
        let ids = UInt64Array::from_iter_values(0..positions.len() as u64);
        EventBatch {
            batch: RecordBatch::try_new(schema, vec![Arc::new(ids)]).expect("batch"),
            positions,
            first_row: 0,
        }
    }

    fn file(line: u64) -> SourcePosition {
        SourcePosition::File {
            file: Arc::from("a.json"),
            line,
        }
    }

    fn kafka(partition: i32, offset: i64) -> SourcePosition {
        SourcePosition::Kafka {
            topic: Arc::from("t"),
            partition,
            offset,
        }
    }

    fn ids(batch: &EventBatch) -> Vec<u64> {
        let column = batch.batch.column(batch.batch.num_columns() - 1);
        let ids = column.as_any().downcast_ref::<UInt64Array>().expect("ids");
        ids.values().to_vec()
    }

    fn letter(source: SourcePosition) -> DeadLetter {
        DeadLetter {
            kind: DeadLetterKind::Malformed,
            error: "bad".into(),
            source,
            record: "{".into(),
            truncated: false,
        }
    }

    #[test]
    fn rows_are_numbered_in_admission_order_and_progress_counts_each_source() {
        let mut intake = Intake::default();
        let a = intake
            .admit(batch(vec![kafka(0, 5), kafka(1, 0), kafka(0, 6)]))
            .expect("new");
        assert_eq!((a.first_row, ids(&a)), (0, vec![0, 1, 2]));
        let b = intake.admit(batch(vec![file(1), file(2)])).expect("new");
        assert_eq!((b.first_row, ids(&b)), (3, vec![3, 4]));
        assert!(intake.admit_dead_letter(&letter(kafka(1, 1))));
        let input = intake.for_checkpoint();
        assert_eq!(input.next_row, 5);
        let p = &input.progress;
        assert_eq!((p["kafka:t/0"].events, p["kafka:t/0"].next_offset), (2, Some(7)));
        assert_eq!((p["kafka:t/1"].events, p["kafka:t/1"].dead_letters), (1, 1));
        assert_eq!(p["kafka:t/1"].next_offset, Some(2));
        assert_eq!((p["a.json"].events, p["a.json"].next_offset), (2, None));
        assert!(!intake.changed(), "a checkpoint's snapshot takes the change");
        // Within a run, a partition's records may come out of offset order (a dead letter is
        // admitted before the batch around it): none is lost, the next offset is the highest.
        assert!(intake.admit_dead_letter(&letter(kafka(2, 10))));
        let around = intake.admit(batch(vec![kafka(2, 9), kafka(2, 11)])).expect("new");
        assert_eq!(around.batch.num_rows(), 2);
        assert_eq!(intake.input().progress["kafka:t/2"].next_offset, Some(12));
        // Records read again within the run (a scale-out state partition whose input partition
        // changed forwarder) are skipped, events and dead letters alike.
        assert!(intake.admit(batch(vec![kafka(2, 9), kafka(2, 11)])).is_none());
        assert!(!intake.admit_dead_letter(&letter(kafka(2, 10))));
        let next = intake
            .admit(batch(vec![kafka(2, 11), kafka(2, 12)]))
            .expect("one is new");
        assert_eq!(next.positions, vec![kafka(2, 12)]);
    }

    #[test]
    fn a_resumed_intake_skips_what_the_earlier_run_took_and_numbers_on() {
        let mut first = Intake::default();
        first.admit(batch(vec![file(1), file(2), kafka(0, 0), kafka(0, 1)]));
        first.admit_dead_letter(&letter(file(3)));
        let mut intake = Intake::resuming(first.for_checkpoint());
        // The file is read again from the start; the partition is re-delivered from offset 1.
        assert!(!intake.admit_dead_letter(&letter(file(3))), "sent already");
        let again = intake
            .admit(batch(vec![file(1), kafka(0, 1), file(2), file(4), kafka(0, 2)]))
            .expect("two are new");
        assert_eq!(again.positions, vec![file(4), kafka(0, 2)]);
        assert_eq!(ids(&again), vec![4, 5]);
        assert!(
            intake.admit(batch(vec![kafka(0, 0)])).is_none(),
            "below the next offset"
        );
        assert!(
            intake.admit_dead_letter(&letter(file(9))),
            "past the skipped ones"
        );
        let p = &intake.input().progress;
        assert_eq!((p["a.json"].events, p["a.json"].dead_letters), (3, 2));
        assert_eq!((p["kafka:t/0"].events, p["kafka:t/0"].next_offset), (3, Some(3)));
    }
}
