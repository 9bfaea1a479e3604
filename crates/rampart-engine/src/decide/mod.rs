//! From a detector's result rows to decisions: reason, evidence, expiry, deterministic id.

pub mod triggers;

use std::time::Duration;

use datafusion::arrow::array::{Array, UInt64Array};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use serde_json::{Map, Value};

use rampart_core::decision::DECISION_SCHEMA_VERSION;
use rampart_core::event::{ACTION, ACTOR, RAW, ROW_ID};
use rampart_core::time::format_micros;
use rampart_core::{Decision, DecisionId, DetectorRef, SourcePosition, Verdict};
use rampart_sql::CompiledDetector;

use crate::input::decode::EventBatch;

/// The event that made a detector fire: what a decision says about it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Trigger {
    /// Event time, microseconds.
    pub time: i64,
    /// Actor.
    pub actor: String,
    /// Action.
    pub action: String,
    /// Where it came from.
    pub position: SourcePosition,
}

impl Trigger {
    /// Row `i` of `events`.
    pub fn of(events: &EventBatch, i: usize) -> Self {
        Self {
            time: events.event_time(i),
            actor: events.actor(i).to_string(),
            action: events.action(i).to_string(),
            position: events.positions[i].clone(),
        }
    }
}

/// A decision before it is written out. The guard drops a repeat of a decision still in force
/// (the same detector and key) by its detector, key and event time alone: a decision for a
/// window's result row is made whole (evidence, reason, id) only for the ones it lets through
/// ([`Self::decision`]); most rows past a threshold repeat one.
pub enum Pending<'d> {
    /// Made already (boxed: most pending decisions are rows').
    Made(Box<Decision>),
    /// A result row's, to make.
    Row(Box<RowDecision<'d>>),
}

/// Result row `r` of a detector's `result`, triggered by `trigger` ([`DecisionMaker::decide_row`]).
pub struct RowDecision<'d> {
    detector: &'d CompiledDetector,
    result: std::sync::Arc<RecordBatch>,
    r: usize,
    trigger: Trigger,
    /// Its decision's key (the actor).
    key: String,
}

impl<'d> Pending<'d> {
    /// The decision for result row `r` of `detector`'s `result` (shared by its rows), triggered
    /// by `trigger`, to make when needed.
    pub fn row(
        detector: &'d CompiledDetector,
        result: &std::sync::Arc<RecordBatch>,
        r: usize,
        trigger: Trigger,
    ) -> Self {
        let key = DecisionMaker::actor_of(result, r).unwrap_or_else(|| trigger.actor.clone());
        Self::Row(Box::new(RowDecision {
            detector,
            result: std::sync::Arc::clone(result),
            r,
            trigger,
            key,
        }))
    }

    /// Its detector's id.
    pub fn detector_id(&self) -> &str {
        match self {
            Self::Made(d) => &d.detector.id,
            Self::Row(row) => &row.detector.meta.id,
        }
    }

    /// Its key (the decision's `key`).
    pub fn key(&self) -> &str {
        match self {
            Self::Made(d) => &d.key,
            Self::Row(row) => &row.key,
        }
    }

    /// Its event time as its decision states it (µs; `None`: not a time that reads back).
    pub fn event_time(&self) -> Option<i64> {
        let text = match self {
            Self::Made(d) => return rampart_core::time::parse_rfc3339_micros(&d.event_time),
            Self::Row(row) => format_micros(row.trigger.time),
        };
        rampart_core::time::parse_rfc3339_micros(&text)
    }

    /// The decision, made if it was not yet.
    pub fn decision(self, maker: &DecisionMaker, processed_at: &str) -> Decision {
        match self {
            Self::Made(d) => *d,
            Self::Row(row) => maker.decide_row(row.detector, &row.result, row.r, &row.trigger, processed_at),
        }
    }
}

/// Turns result rows into decisions for one pipeline.
#[derive(Debug, Clone)]
pub struct DecisionMaker {
    pipeline: String,
    default_block_for: Duration,
}

impl DecisionMaker {
    /// A decision maker for pipeline `pipeline`.
    pub fn new(pipeline: String, default_block_for: Duration) -> Self {
        Self {
            pipeline,
            default_block_for,
        }
    }

    /// The row ids (hidden `_rampart_row`) of a detector's result rows.
    pub fn row_ids<'r>(detector: &CompiledDetector, result: &'r RecordBatch) -> Option<&'r UInt64Array> {
        result
            .column(detector.row_id_index)
            .as_any()
            .downcast_ref::<UInt64Array>()
    }

    /// The decisions for `result`, rows a per-event `detector` returned for `events`, each with
    /// the row id of its triggering event.
    pub fn decide(
        &self,
        detector: &CompiledDetector,
        result: &RecordBatch,
        events: &EventBatch,
        processed_at: &str,
    ) -> Vec<(u64, Decision)> {
        let Some(row_ids) = Self::row_ids(detector, result) else {
            return Vec::new();
        };
        (0..result.num_rows())
            .filter_map(|r| {
                let row_id = row_ids.value(r);
                let event = events.index_of(row_id)?;
                let trigger = Trigger::of(events, event);
                Some((
                    row_id,
                    self.decide_row(detector, result, r, &trigger, processed_at),
                ))
            })
            .collect()
    }

    /// The actor a decision for result row `r` states, when the result has one: its last
    /// column named so, when that is text ([`Self::decide_row`]'s evidence holds the last of
    /// columns of one name).
    fn actor_of(result: &RecordBatch, r: usize) -> Option<String> {
        let schema = result.schema();
        let c = schema.fields().iter().rposition(|f| f.name() == ACTOR)?;
        match json_value(result.column(c), r) {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The decision for result row `r`, triggered by `trigger`.
    pub fn decide_row(
        &self,
        detector: &CompiledDetector,
        result: &RecordBatch,
        r: usize,
        trigger: &Trigger,
        processed_at: &str,
    ) -> Decision {
        let schema = result.schema();
        let mut evidence = Map::new();
        for (c, field) in schema.fields().iter().enumerate() {
            if field.name() == ROW_ID || field.name() == RAW {
                continue;
            }
            evidence.insert(field.name().clone(), json_value(result.column(c), r));
        }
        let text = |name: &str| match evidence.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let actor = text(ACTOR).unwrap_or_else(|| trigger.actor.clone());
        let action = text(ACTION).unwrap_or_else(|| trigger.action.clone());
        let reason = detector.meta.reason.render(|c| match evidence.get(c) {
            // JSON sub-documents (json_get_json) read better on one line.
            Some(Value::String(s)) if s.contains('\n') => s.split_whitespace().collect::<Vec<_>>().join(" "),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => "(none)".into(),
            Some(v) => v.to_string(),
        });
        let event_time = trigger.time;
        let expires_at = matches!(detector.meta.verdict, Verdict::Block | Verdict::Review).then(|| {
            let block_for = detector.meta.block_for.unwrap_or(self.default_block_for);
            format_micros(event_time.saturating_add(rampart_core::time::micros(block_for)))
        });
        let decision_id = DecisionId::new()
            .part(&self.pipeline)
            .part(&detector.meta.id)
            .part(&detector.version)
            .part(&actor)
            .part(event_time.to_le_bytes())
            .part(trigger.position.to_string())
            .finish();
        Decision {
            schema_version: DECISION_SCHEMA_VERSION,
            decision_id,
            pipeline: self.pipeline.clone(),
            detector: DetectorRef {
                id: detector.meta.id.clone(),
                version: detector.version.clone(),
            },
            verdict: detector.meta.verdict,
            mode: detector.meta.mode,
            severity: detector.meta.severity,
            key: actor.clone(),
            actor,
            actions: vec![action],
            reason,
            evidence,
            event_time: format_micros(event_time),
            processed_at: processed_at.to_string(),
            expires_at,
            source: trigger.position.clone(),
            guidance: detector.meta.guidance.clone(),
            tags: detector.meta.tags.clone(),
        }
    }
}

/// One Arrow value as JSON: numbers and booleans as such, timestamps as RFC 3339, everything
/// else as its text.
fn json_value(array: &dyn Array, row: usize) -> Value {
    let Ok(scalar) = ScalarValue::try_from_array(array, row) else {
        return Value::Null;
    };
    if scalar.is_null() {
        return Value::Null;
    }
    match scalar {
        ScalarValue::Boolean(Some(b)) => Value::Bool(b),
        ScalarValue::Int8(Some(v)) => v.into(),
        ScalarValue::Int16(Some(v)) => v.into(),
        ScalarValue::Int32(Some(v)) => v.into(),
        ScalarValue::Int64(Some(v)) => v.into(),
        ScalarValue::UInt8(Some(v)) => v.into(),
        ScalarValue::UInt16(Some(v)) => v.into(),
        ScalarValue::UInt32(Some(v)) => v.into(),
        ScalarValue::UInt64(Some(v)) => v.into(),
        ScalarValue::Float32(Some(v)) => {
            serde_json::Number::from_f64(f64::from(v)).map_or(Value::Null, Value::Number)
        }
        ScalarValue::Float64(Some(v)) => serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
            Value::String(s)
        }
        ScalarValue::TimestampSecond(Some(v), _) => Value::String(format_micros(v.saturating_mul(1_000_000))),
        ScalarValue::TimestampMillisecond(Some(v), _) => {
            Value::String(format_micros(v.saturating_mul(1_000)))
        }
        ScalarValue::TimestampMicrosecond(Some(v), _) => Value::String(format_micros(v)),
        ScalarValue::TimestampNanosecond(Some(v), _) => Value::String(format_micros(v / 1_000)),
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::input::decode::Decoded;
    use crate::pipeline::Pipeline;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The detector under test.
    fn trail_logging_disabled(pipeline: &Pipeline) -> &CompiledDetector {
        pipeline
            .detectors
            .iter()
            .find(|d| d.meta.id == "trail-logging-disabled")
            .expect("loaded")
    }

    /// The cloudtrail pipeline, the StopLogging detonation admitted as one batch, and the
    /// `trail-logging-disabled` detector's result rows on it.
    fn stop_logging() -> (Pipeline, EventBatch, Vec<RecordBatch>) {
        let pipeline = Pipeline::load(&repo().join("pipelines/cloudtrail")).expect("loads");
        let file =
            repo().join("data/cloudtrail/stratus-detonation-logs/aws.defense-evasion.cloudtrail-stop.json");
        let mut decoder = pipeline.decoder();
        let mut batches = Vec::new();
        let mut emit = |d| {
            if let Decoded::Batch(b) = d {
                batches.push(b);
            }
        };
        decoder.decode_file(&file, &mut emit).expect("reads");
        decoder.flush(&mut emit);
        let events = pipeline.admit(batches.remove(0)).expect("new events");
        let detector = trail_logging_disabled(&pipeline);
        let results = pipeline
            .engine()
            .run(&[detector], events.batch.clone())
            .remove(0)
            .0
            .expect("runs");
        (pipeline, events, results)
    }

    #[test]
    fn a_result_row_becomes_a_decision_with_its_reason_evidence_expiry_and_trigger() {
        let (pipeline, events, results) = stop_logging();
        let detector = trail_logging_disabled(&pipeline);
        let maker = DecisionMaker::new("p".into(), Duration::from_secs(60));
        let decided: Vec<(u64, Decision)> = results
            .iter()
            .flat_map(|r| maker.decide(detector, r, &events, "2026-01-01T00:00:00Z"))
            .collect();
        assert_eq!(decided.len(), 1, "one StopLogging call");
        let (row, d) = &decided[0];
        let i = events
            .index_of(*row)
            .expect("the triggering event is in the batch");
        assert_eq!(events.action(i), "StopLogging");
        assert_eq!((d.verdict, d.actor.as_str()), (Verdict::Block, events.actor(i)));
        assert!(d.reason.contains("called StopLogging on trail"), "{}", d.reason);
        assert!(!d.evidence.contains_key(RAW) && !d.evidence.contains_key(ROW_ID));
        assert!(d.evidence.contains_key("trail"));
        // The detector's own block_for (4h) wins over the pipeline default (60s).
        let expires = d
            .expires_at
            .as_deref()
            .and_then(rampart_core::time::parse_rfc3339_micros);
        assert_eq!(expires, Some(events.event_time(i) + 4 * 3600 * 1_000_000));
        assert_eq!(d.source, events.positions[i]);
        assert_eq!(
            d.guidance
                .as_deref()
                .map(|g| g.starts_with("Trails are only stopped")),
            Some(true)
        );
    }

    #[test]
    fn decision_ids_depend_on_the_pipeline_and_event_not_on_when_they_are_made() {
        let (pipeline, events, results) = stop_logging();
        let detector = trail_logging_disabled(&pipeline);
        let id = |pipeline_name: &str, processed_at: &str| {
            let maker = DecisionMaker::new(pipeline_name.into(), Duration::from_secs(60));
            maker.decide(detector, &results[0], &events, processed_at)[0]
                .1
                .decision_id
                .clone()
        };
        assert_eq!(id("p", "2026-01-01T00:00:00Z"), id("p", "2027-06-01T12:00:00Z"));
        assert_ne!(id("p", "2026-01-01T00:00:00Z"), id("q", "2026-01-01T00:00:00Z"));
    }

    /// What the guard reads of a decision not made yet (detector, key, event time) is what the
    /// decision made from it says, whatever the result's actor column holds.
    #[test]
    fn a_decision_not_made_yet_has_the_detector_key_and_time_of_the_one_made() {
        use std::sync::Arc;

        use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray};
        use datafusion::arrow::datatypes::{Field, Schema};

        let (pipeline, events, results) = stop_logging();
        let detector = trail_logging_disabled(&pipeline);
        let maker = DecisionMaker::new("p".into(), Duration::from_secs(60));
        let row = DecisionMaker::row_ids(detector, &results[0])
            .expect("row ids")
            .value(0);
        let trigger = Trigger::of(&events, events.index_of(row).expect("in the batch"));
        let check = |result: RecordBatch, key: &str| {
            let result = Arc::new(result);
            let pending = Pending::row(detector, &result, 0, trigger.clone());
            let made = maker.decide_row(detector, &result, 0, &trigger, "now");
            assert_eq!(pending.detector_id(), made.detector.id);
            assert_eq!((pending.key(), made.key.as_str()), (key, key));
            assert_eq!(
                pending.event_time(),
                rampart_core::time::parse_rfc3339_micros(&made.event_time)
            );
            let made_later = pending.decision(&maker, "now");
            assert_eq!(made_later.decision_id, made.decision_id);
            assert_eq!(made_later.evidence, made.evidence);
        };
        // The detector's own result: its actor column.
        check(results[0].slice(0, 1), &trigger.actor);
        // Other shapes: no actor column, a null one, one that is not text, two of them.
        let row_ids: ArrayRef = Arc::new(UInt64Array::from(vec![row]));
        let text = |v: Option<&str>| -> ArrayRef { Arc::new(StringArray::from(vec![v])) };
        let batch = |columns: Vec<(&str, ArrayRef)>| {
            let fields: Vec<Field> = columns
                .iter()
                .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
                .collect();
            RecordBatch::try_new(
                Arc::new(Schema::new(fields)),
                columns.into_iter().map(|(_, a)| a).collect(),
            )
            .expect("batch")
        };
        // (The row id column is left out of decisions by its name.)
        let with_row_ids = |mut columns: Vec<(&str, ArrayRef)>| {
            columns.push((ROW_ID, Arc::clone(&row_ids)));
            batch(columns)
        };
        check(
            with_row_ids(vec![("action", text(Some("StopLogging")))]),
            &trigger.actor,
        );
        check(with_row_ids(vec![(ACTOR, text(None))]), &trigger.actor);
        check(
            with_row_ids(vec![(ACTOR, Arc::new(Int64Array::from(vec![7])) as ArrayRef)]),
            &trigger.actor,
        );
        check(
            with_row_ids(vec![(ACTOR, text(Some("first"))), (ACTOR, text(Some("second")))]),
            "second",
        );
    }
}
