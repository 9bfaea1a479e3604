//! The output side of the batch loop: what one evaluation produced ([`Evaluation`]) and where
//! it goes ([`Output`]: replay's sink, the service's Kafka producer, the test collector), handed
//! over in one order by [`Evaluation::emit`].

use std::collections::BTreeMap;

use rampart_core::{Decision, Verdict};

use crate::error::{Error, Fault};
use crate::guardrails::guard::FAIL_SAFE_TAG;
use crate::input::decode::DeadLetter;

/// A detector that failed on a batch at run time (it keeps running on later batches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectorFailure {
    /// The detector's id.
    pub detector: String,
    /// What went wrong, and whose it is to act on ([`Error::fault`]).
    pub error: Error,
}

impl DetectorFailure {
    /// Logs the failure: a warning when it is the detector's (its SQL on these events), an
    /// error when the disk, memory or Rampart itself failed it.
    pub fn log(&self) {
        let (detector, error, fault) = (&self.detector, &self.error, self.error.fault());
        match fault {
            Fault::Input => tracing::warn!(
                %detector, %error, %fault,
                "detector failed on a batch; it keeps running on later batches"
            ),
            Fault::Outside | Fault::Bug => tracing::error!(
                %detector, %error, %fault,
                "detector failed on a batch; it keeps running on later batches"
            ),
        }
    }
}

/// What one batch produced.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// Decisions in input order (for one event, in detector order).
    pub decisions: Vec<Decision>,
    /// Detectors that failed on this batch at run time.
    pub failures: Vec<DetectorFailure>,
    /// Events older than the allowed lateness: per-event detectors judged them, windows did
    /// not count them.
    pub late: Vec<DeadLetter>,
    /// Decisions suppressed as repeats, per detector.
    pub suppressed: BTreeMap<String, u64>,
    /// For each window decision: how long after its triggering event, in event time, it was
    /// made (µs): to the watermark that decided it, or to the newest event time that made its
    /// second complete when it fired at once.
    pub decision_delays: Vec<i64>,
    /// Detectors that took longer than `[detectors] max_batch_time` on this batch (they are
    /// disabled as the evaluation ends).
    pub(crate) slow: Vec<Slow>,
}

/// A detector over its time budget on a batch.
#[derive(Debug)]
pub(crate) struct Slow {
    /// The detector's id.
    pub detector: String,
    /// How long it took (for a shared window state: the state's work).
    pub took: std::time::Duration,
    /// The batch's newest event time (µs).
    pub at: i64,
}

impl Evaluation {
    /// Records a detector's failure.
    pub(crate) fn failed(&mut self, detector: &str, error: impl Into<Error>) {
        self.failures.push(DetectorFailure {
            detector: detector.to_string(),
            error: error.into(),
        });
    }

    /// Hands everything to `out`, in this order: failures, late dead letters, decision delays,
    /// suppression counts, decisions (the fail-safe's alerts announced first), then the end of
    /// the batch.
    pub fn emit<O: Output + ?Sized>(self, out: &mut O) -> Result<(), O::Error> {
        for failure in &self.failures {
            out.detector_failed(failure)?;
        }
        for letter in &self.late {
            out.dead_letter(letter)?;
        }
        for delay in &self.decision_delays {
            out.decision_delay(*delay);
        }
        for (detector, repeats) in &self.suppressed {
            out.suppressed(detector, *repeats);
        }
        for decision in &self.decisions {
            if is_fail_safe_alert(decision) {
                out.fail_safe_tripped(decision);
            }
            out.decision(decision)?;
        }
        out.end_of_batch(self.decisions.len())
    }
}

/// Whether `decision` is the alert of the blast-radius fail-safe putting a detector in shadow.
pub fn is_fail_safe_alert(decision: &Decision) -> bool {
    decision.verdict == Verdict::Alert && decision.tags.iter().any(|t| t == FAIL_SAFE_TAG)
}

/// Where the batch loop's results go. Only decisions and dead letters must be taken; the rest
/// is for counting.
pub trait Output {
    /// Why handing something over failed (it stops the loop).
    type Error;

    /// One decision, in input order.
    fn decision(&mut self, decision: &Decision) -> Result<(), Self::Error>;

    /// One dead letter: a malformed record (from decoding) or a late one (from the windows).
    fn dead_letter(&mut self, letter: &DeadLetter) -> Result<(), Self::Error>;

    /// A detector failed on the batch.
    fn detector_failed(&mut self, failure: &DetectorFailure) -> Result<(), Self::Error> {
        let _ = failure;
        Ok(())
    }

    /// The blast-radius fail-safe put a detector in shadow (`alert` follows as a decision).
    fn fail_safe_tripped(&mut self, alert: &Decision) {
        let _ = alert;
    }

    /// `repeats` decisions of `detector` were suppressed.
    fn suppressed(&mut self, detector: &str, repeats: u64) {
        let _ = (detector, repeats);
    }

    /// A window decision was made this long (µs of event time) after its event.
    fn decision_delay(&mut self, micros: i64) {
        let _ = micros;
    }

    /// The evaluation is handed over (`decisions` of them).
    fn end_of_batch(&mut self, decisions: usize) -> Result<(), Self::Error> {
        let _ = decisions;
        Ok(())
    }
}
