//! What `/metrics` shows: counters and gauges in a `prometheus-client` registry, and latency
//! quantiles computed from `hdrhistogram` histograms at each scrape.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram as Buckets, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Detector id.
    pub detector: String,
    /// block, alert or review.
    pub verdict: String,
    /// enforce or shadow.
    pub mode: String,
}

/// Labels of a per-partition gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: String,
}

/// Labels of a detector error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectorLabels {
    /// Detector id.
    pub detector: String,
}

/// Labels of a detector failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Detector id.
    pub detector: String,
    /// Whose the failure is to act on: `input` (the detector's SQL on these events),
    /// `outside` (the disk, RocksDB, memory) or `bug` (Rampart's own).
    pub fault: &'static str,
}

/// Labels of refused admin requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `missing` (no bearer token), `wrong` (not a valid one) or `disabled` (no token is
    /// configured).
    pub reason: &'static str,
}

/// The quantiles exported for each latency histogram.
const QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

/// A latency histogram in microseconds, 1 µs to 1 h at 3 significant digits.
#[derive(Debug)]
pub struct Latency {
    histogram: Mutex<Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            histogram: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
        }
    }
}

impl Latency {
    /// Records one latency, in microseconds (clamped to the histogram's range).
    pub fn record(&self, micros: u64) {
        self.record_n(micros, 1);
    }

    /// Records `count` equal latencies.
    pub fn record_n(&self, micros: u64, count: u64) {
        let mut h = self.histogram.lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record_n(micros.max(1), count);
    }

    /// (quantile, seconds) pairs and the number of samples.
    pub fn quantiles(&self) -> (Vec<(f64, f64)>, u64) {
        let h = self.histogram.lock().unwrap_or_else(|p| p.into_inner());
        let values = QUANTILES
            .iter()
            .map(|&q| (q, h.value_at_quantile(q) as f64 / 1e6))
            .collect();
        (values, h.len())
    }
}

/// Every metric of a running service.
#[derive(Debug)]
pub struct Metrics {
    /// Events consumed and mapped.
    pub events: Counter,
    /// Records that could not be decoded or mapped (to the dead-letter topic).
    pub bad_records: Counter,
    /// Events beyond the allowed lateness (to the dead-letter topic; windows did not count them).
    pub late_records: Counter,
    /// Decisions published, by detector, verdict and mode.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Detector run-time failures on a batch.
    pub detector_errors: Family<FailureLabels, Counter>,
    /// Repeat decisions suppressed (a block still active, an alert within its dedup period).
    pub suppressed: Family<DetectorLabels, Counter>,
    /// 1 for each detector the blast-radius fail-safe put in shadow.
    pub fail_safe: Family<DetectorLabels, Gauge>,
    /// Entries in the audit log.
    pub audit_entries: Gauge,
    /// Admin requests refused for want of a valid token.
    pub admin_refused: Family<RefusalLabels, Counter>,
    /// Events per micro-batch.
    pub batch_events: Buckets,
    /// Checkpoints written (window state and offsets together).
    pub checkpoints: Counter,
    /// Records written to the changelog topic (entries and markers).
    pub changelog_records: Counter,
    /// Changelog records read back to rebuild the window state at start.
    pub restored_records: Counter,
    /// Bytes of those records (keys and values).
    pub restored_bytes: Counter,
    /// Scale-out: state partitions this instance owns (running or restoring).
    pub state_partitions_owned: Gauge,
    /// Scale-out: of those, the ones restoring from their changelog.
    pub state_partitions_restoring: Gauge,
    /// Consumer lag per partition, as librdkafka last reported it.
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    /// Window state on disk, bytes.
    pub state_disk_bytes: Gauge,
    /// Window state in memory (cache), bytes.
    pub state_cached_bytes: Gauge,
    /// Memory the state store (RocksDB) holds beside the cache, bytes.
    pub state_store_memory_bytes: Gauge,
    /// Window rows waiting for the watermark.
    pub state_waiting_rows: Gauge,
    /// Newest event time seen, Unix seconds.
    pub newest_event_time: Gauge,
    /// The pipeline's watermark, Unix seconds.
    pub watermark: Gauge,
    /// Each input partition's own watermark (its newest event time minus the allowed
    /// lateness), Unix seconds.
    pub partition_watermark: Family<PartitionLabels, Gauge>,
    /// Each input partition's event-time lag: wall-clock time minus its newest event time,
    /// seconds.
    pub partition_event_lag: Family<PartitionLabels, Gauge>,
    /// Late records per input partition.
    pub partition_late_records: Family<PartitionLabels, Counter>,
    /// 1 while an input partition is paused because it runs ahead of the watermark.
    pub partition_paused: Family<PartitionLabels, Gauge>,
    /// Window decisions' delay in event time: from the triggering event's time to the
    /// watermark (or, decided at once, the newest event time) that decided it.
    pub decision_delay: Arc<Latency>,
    /// 1 when ready to serve, 0 when not.
    pub ready: Gauge,
    /// Time from a micro-batch being complete to its decisions handed to the producer.
    pub processing: Arc<Latency>,
    /// Time from an event's Kafka timestamp to its batch's decisions handed to the producer.
    pub end_to_end: Arc<Latency>,
    /// Time a checkpoint takes (waiting for the broker's acknowledgements included).
    pub checkpoint: Arc<Latency>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events: Counter::default(),
            bad_records: Counter::default(),
            late_records: Counter::default(),
            decisions: Family::default(),
            detector_errors: Family::default(),
            suppressed: Family::default(),
            fail_safe: Family::default(),
            audit_entries: Gauge::default(),
            admin_refused: Family::default(),
            batch_events: Buckets::new(exponential_buckets(1.0, 4.0, 8)),
            checkpoints: Counter::default(),
            changelog_records: Counter::default(),
            restored_records: Counter::default(),
            restored_bytes: Counter::default(),
            state_partitions_owned: Gauge::default(),
            state_partitions_restoring: Gauge::default(),
            consumer_lag: Family::default(),
            state_disk_bytes: Gauge::default(),
            state_cached_bytes: Gauge::default(),
            state_store_memory_bytes: Gauge::default(),
            state_waiting_rows: Gauge::default(),
            newest_event_time: Gauge::default(),
            watermark: Gauge::default(),
            partition_watermark: Family::default(),
            partition_event_lag: Family::default(),
            partition_late_records: Family::default(),
            partition_paused: Family::default(),
            decision_delay: Arc::default(),
            ready: Gauge::default(),
            processing: Arc::default(),
            end_to_end: Arc::default(),
            checkpoint: Arc::default(),
        }
    }
}

impl Metrics {
    /// A registry exposing these metrics under the `rampart_` prefix.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("rampart");
        self.register_flow(&mut r);
        self.register_state(&mut r);
        self.register_event_time(&mut r);
        self.register_latencies(&mut r);
        r
    }

    /// What went through: events, bad and late records, decisions, detector failures and the
    /// guard's work.
    fn register_flow(&self, r: &mut Registry) {
        r.register("events", "Events consumed and mapped", self.events.clone());
        r.register(
            "bad_records",
            "Records that could not be decoded or mapped (sent to the dead-letter topic)",
            self.bad_records.clone(),
        );
        r.register(
            "late_records",
            "Events older than the allowed lateness (sent to the dead-letter topic; windows did not count them)",
            self.late_records.clone(),
        );
        r.register(
            "decisions",
            "Decisions published, by detector, verdict and mode",
            self.decisions.clone(),
        );
        r.register(
            "detector_errors",
            "Detector failures on a batch, by detector and fault: input, outside or bug (the detector keeps running on later batches)",
            self.detector_errors.clone(),
        );
        r.register(
            "suppressed_decisions",
            "Repeat decisions suppressed: a block of the detector still active for the key, or an alert within its dedup period",
            self.suppressed.clone(),
        );
        r.register(
            "fail_safe_tripped",
            "1 while the blast-radius fail-safe keeps the detector in shadow (until re-armed)",
            self.fail_safe.clone(),
        );
        r.register(
            "audit_entries",
            "Entries in the hash-chained audit log",
            self.audit_entries.clone(),
        );
        r.register(
            "admin_refused",
            "Admin requests refused: no bearer token (missing), not a valid one (wrong), or no token configured (disabled)",
            self.admin_refused.clone(),
        );
    }

    /// Batches, checkpoints, consumer lag and the window state.
    fn register_state(&self, r: &mut Registry) {
        r.register(
            "batch_events",
            "Events per micro-batch",
            self.batch_events.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints written (window state and source offsets in one write)",
            self.checkpoints.clone(),
        );
        r.register(
            "changelog_records",
            "Records written to the window state's changelog topic (entries and checkpoint markers)",
            self.changelog_records.clone(),
        );
        r.register(
            "restored_records",
            "Changelog records read back to rebuild the window state",
            self.restored_records.clone(),
        );
        r.register(
            "restored_bytes",
            "Bytes of the changelog records read back to rebuild the window state",
            self.restored_bytes.clone(),
        );
        r.register(
            "state_partitions_owned",
            "Scale-out: state partitions this instance owns (their loops running or restoring)",
            self.state_partitions_owned.clone(),
        );
        r.register(
            "state_partitions_restoring",
            "Scale-out: state partitions of this instance restoring their window state from the changelog",
            self.state_partitions_restoring.clone(),
        );
        r.register(
            "consumer_lag_messages",
            "Messages behind the end of each input partition, as librdkafka last reported",
            self.consumer_lag.clone(),
        );
        r.register(
            "state_disk_bytes",
            "Window state on disk",
            self.state_disk_bytes.clone(),
        );
        r.register(
            "state_cached_bytes",
            "Window state held in memory",
            self.state_cached_bytes.clone(),
        );
        r.register(
            "state_store_memory_bytes",
            "Memory the window state store holds beside the cache (memtables, SST readers, block cache)",
            self.state_store_memory_bytes.clone(),
        );
        r.register(
            "state_waiting_rows",
            "Window rows waiting for the watermark",
            self.state_waiting_rows.clone(),
        );
    }

    /// Event time: newest, watermark, per partition.
    fn register_event_time(&self, r: &mut Registry) {
        r.register(
            "newest_event_time_seconds",
            "Newest event time seen (Unix seconds)",
            self.newest_event_time.clone(),
        );
        r.register(
            "watermark_seconds",
            "The pipeline's watermark: the slowest input partition's newest event time minus the allowed lateness (idle partitions excepted), Unix seconds",
            self.watermark.clone(),
        );
        r.register(
            "partition_watermark_seconds",
            "Each input partition's own watermark (newest event time minus the allowed lateness), Unix seconds",
            self.partition_watermark.clone(),
        );
        r.register(
            "partition_event_time_lag_seconds",
            "Wall-clock time minus each input partition's newest event time",
            self.partition_event_lag.clone(),
        );
        r.register(
            "partition_late_records",
            "Late records per input partition (sent to the dead-letter topic)",
            self.partition_late_records.clone(),
        );
        r.register(
            "partition_paused",
            "1 while an input partition is paused because its event time runs ahead of the watermark by more than max_partition_skew",
            self.partition_paused.clone(),
        );
        r.register("ready", "1 when /readyz answers 200", self.ready.clone());
    }

    /// The latency histograms, as quantiles.
    fn register_latencies(&self, r: &mut Registry) {
        for (name, help, latency) in [
            (
                "processing_latency_seconds",
                "From a complete micro-batch to its decisions handed to the producer",
                &self.processing,
            ),
            (
                "end_to_end_latency_seconds",
                "From an event's Kafka timestamp to its decisions handed to the producer",
                &self.end_to_end,
            ),
            (
                "checkpoint_latency_seconds",
                "Time a checkpoint takes, waiting for the broker's acknowledgements included",
                &self.checkpoint,
            ),
            (
                "decision_delay_event_time_seconds",
                "Window decisions: from the triggering event's time to the event time that decided it (the watermark, or the newest event time when decided at once)",
                &self.decision_delay,
            ),
        ] {
            r.register_collector(Box::new(Quantiles {
                name,
                help,
                latency: Arc::clone(latency),
            }));
        }
    }
}

/// Exports a latency histogram as `NAME{quantile="q"}` gauges and `NAME_count`.
#[derive(Debug)]
struct Quantiles {
    name: &'static str,
    help: &'static str,
    latency: Arc<Latency>,
}

impl Collector for Quantiles {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (values, count) = self.latency.quantiles();
        let mut family = encoder.encode_descriptor(self.name, self.help, None, MetricType::Gauge)?;
        for (q, seconds) in values {
            let labels = [("quantile", if q >= 1.0 { "1".to_string() } else { q.to_string() })];
            family.encode_family(&labels)?.encode_gauge(&seconds)?;
        }
        let counter = prometheus_client::metrics::counter::ConstCounter::new(count);
        let name = format!("{}_samples", self.name);
        let encoder = encoder.encode_descriptor(&name, "Samples recorded", None, counter.metric_type())?;
        counter.encode(encoder)
    }
}

/// What `/readyz` and `/healthz` answer.
#[derive(Debug, Default)]
pub struct Health {
    /// Why the service is not ready (empty when it is).
    not_ready: Mutex<Option<String>>,
    /// When the processing loop last went round (Unix ms).
    pub heartbeat_ms: AtomicI64,
    /// Partitions assigned to this instance.
    pub assigned: AtomicU64,
    /// Counts assignments and revocations (the loop re-reads the assignment when it changes).
    pub assignments: AtomicU64,
    /// Counts the consumer's statistics reports (`--until-end` trusts an end only once a
    /// report came after the last message: see `Service::at_end`).
    pub statistics: AtomicU64,
    /// Notes shown by /readyz whether ready or not (detectors in fail-safe shadow, a refused
    /// reload).
    notes: Mutex<Vec<String>>,
}

impl Health {
    /// Marks the service ready (`None`) or not, with the reason.
    pub fn set_not_ready(&self, reason: Option<String>) {
        let mut r = self.not_ready.lock().unwrap_or_else(|p| p.into_inner());
        if *r != reason {
            match &reason {
                Some(why) => tracing::warn!(reason = %why, "not ready"),
                None => tracing::info!("ready"),
            }
            *r = reason;
        }
    }

    /// Replaces the notes /readyz shows.
    pub fn set_notes(&self, notes: Vec<String>) {
        *self.notes.lock().unwrap_or_else(|p| p.into_inner()) = notes;
    }

    /// The notes /readyz shows.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Why the service is not ready, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        self.not_ready.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notes that the processing loop is alive.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
