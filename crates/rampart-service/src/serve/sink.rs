//! The sink side of the loop: the pipeline's output ([`Output`]) to Kafka (decisions keyed
//! by actor to the decisions or shadow topic, dead letters with their reason and position in
//! headers), the audit log, and the metrics of both.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rampart_core::{Decision, Mode};
use rampart_enforce::signing::{KEY_ID_HEADER, SIGNATURE_HEADER};
use rampart_engine::guardrails::audit;
use rampart_engine::pipeline::{DetectorFailure, Output};
use rampart_engine::{DeadLetter, DeadLetterKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};

use super::Service;
use crate::ServiceError;
use crate::metrics::{DecisionLabels, DetectorLabels, FailureLabels, PartitionLabels};

impl Service<'_> {
    /// Publishes one decision, keyed by actor, to the decisions topic (enforcing) or the shadow
    /// topic, and appends it to the audit log; a block, hold or revocation also goes to the
    /// enforcement state.
    pub(super) fn publish_decision(&mut self, decision: &Decision) -> Result<(), ServiceError> {
        let payload = serde_json::to_vec(decision).expect("decisions serialise");
        let topic = match decision.mode {
            Mode::Enforce => &self.kafka.decisions_topic,
            Mode::Shadow => &self.kafka.shadow_topic,
        };
        // The exact bytes published are signed (see rampart_enforce::signing).
        let signature = self
            .signer
            .as_ref()
            .map(|s| (s.id().to_string(), s.sign(&payload)));
        let headers = || {
            let mut headers = OwnedHeaders::new().insert(Header {
                key: "rampart.mode",
                value: Some(decision.mode.to_string().as_str()),
            });
            if let Some((id, signature)) = &signature {
                headers = headers
                    .insert(Header {
                        key: KEY_ID_HEADER,
                        value: Some(id.as_str()),
                    })
                    .insert(Header {
                        key: SIGNATURE_HEADER,
                        value: Some(signature.as_str()),
                    });
            }
            headers
        };
        let record = BaseRecord::with_opaque_to(topic, 0)
            .key(decision.actor.as_bytes())
            .payload(payload.as_slice())
            .headers(headers());
        self.send(record)?;
        if let Some(entry) = self.enforcement.as_mut().and_then(|e| e.entry(decision)) {
            let until = entry.until.as_deref().unwrap_or_default();
            let headers = headers().insert(Header {
                key: super::enforcement::UNTIL_HEADER,
                value: Some(until),
            });
            let topic = self
                .enforcement
                .as_ref()
                .map(|e| e.topic().to_string())
                .unwrap_or_default();
            let record = BaseRecord::with_opaque_to(&topic, 0)
                .key(entry.key.as_slice())
                .partition(entry.partition)
                .payload(payload.as_slice())
                .headers(headers);
            self.send(record)?;
        }
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

    /// Writes the tombstones of the enforcement state's records past their time (every few
    /// seconds; see [`super::enforcement`]).
    pub(super) fn sweep_enforcement(&mut self) -> Result<(), ServiceError> {
        let Some(state) = self.enforcement.as_mut() else {
            return Ok(());
        };
        let tombstones = state.sweep();
        if tombstones.is_empty() {
            return Ok(());
        }
        let topic = state.topic().to_string();
        for entry in tombstones {
            let record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(&topic, 0)
                .key(entry.key.as_slice())
                .partition(entry.partition);
            self.send(record)?;
        }
        Ok(())
    }

    /// Sends the original bytes to the dead-letter topic, the reason and source position in
    /// headers.
    pub(super) fn send_dead_letter(
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
        // Scale-out: each route judges lateness against its own state partition's clock, so
        // a record can be late on one route (its windows do not count it) and not another.
        if let Some(route) = self.task.as_ref().and(self.pipeline.part()) {
            headers = headers.insert(Header {
                key: "rampart.route",
                value: Some(route.to_string().as_str()),
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
    pub(super) fn send<K: rdkafka::message::ToBytes + ?Sized>(
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
    pub(super) fn wait_for_broker(&self, since: Instant, why: &str) -> Result<(), ServiceError> {
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

    /// The sequence number of the last message handed to the producer (`None`: none yet).
    pub(super) fn last_seq(&self) -> Option<usize> {
        (self.next_seq > 0).then_some(self.next_seq)
    }

    pub(super) fn audit_entry(
        &mut self,
        kind: audit::Kind,
        entry: &impl serde::Serialize,
    ) -> Result<(), ServiceError> {
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
    pub(super) fn sync_audit(&mut self) -> Result<(), ServiceError> {
        if let Some(log) = &mut self.audit {
            log.sync().map_err(ServiceError::audit(log.path()))?;
        }
        Ok(())
    }
}

/// The pipeline's output, as the service hands it on.
impl Output for Service<'_> {
    type Error = ServiceError;

    fn decision(&mut self, decision: &Decision) -> Result<(), ServiceError> {
        self.publish_decision(decision)
    }

    /// Late records (malformed ones are sent with their original bytes and key as they are
    /// admitted).
    fn dead_letter(&mut self, letter: &DeadLetter) -> Result<(), ServiceError> {
        if letter.kind == DeadLetterKind::Late {
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
        }
        self.send_dead_letter(letter, letter.record.as_bytes(), None)
    }

    fn detector_failed(&mut self, failure: &DetectorFailure) -> Result<(), ServiceError> {
        let detector = &failure.detector;
        let fault = failure.error.fault();
        self.metrics
            .detector_errors
            .get_or_create(&FailureLabels {
                detector: detector.clone(),
                fault: fault.as_str(),
            })
            .inc();
        if !self.warned_detectors.contains(detector) {
            failure.log();
            self.warned_detectors.push(detector.clone());
        }
        Ok(())
    }

    fn fail_safe_tripped(&mut self, _alert: &Decision) {
        self.tripped = true;
    }

    fn suppressed(&mut self, detector: &str, repeats: u64) {
        self.metrics
            .suppressed
            .get_or_create(&DetectorLabels {
                detector: detector.to_string(),
            })
            .inc_by(repeats);
    }

    fn decision_delay(&mut self, micros: i64) {
        self.metrics
            .decision_delay
            .record(u64::try_from(micros).unwrap_or(0));
    }

    fn end_of_batch(&mut self, decisions: usize) -> Result<(), ServiceError> {
        if std::mem::take(&mut self.tripped) {
            self.refresh_notes();
        }
        if decisions > 0
            && let Some(log) = &mut self.audit
        {
            // To the OS once per batch (on disk at the next checkpoint).
            log.flush().map_err(ServiceError::audit(log.path()))?;
        }
        Ok(())
    }
}
