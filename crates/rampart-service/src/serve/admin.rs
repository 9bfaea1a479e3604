//! Operators' commands between two rounds of the loop (revoke, re-arm, reload; from the HTTP
//! endpoint, SIGHUP or a changed pipeline directory), and the notes /readyz shows.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rampart_core::Decision;
use rampart_engine::guardrails::audit;
use rampart_engine::guardrails::guard::Trip;
use rampart_engine::{Evaluator, Pipeline};

use super::group::GroupCommand;
use super::{Service, idleness};
use crate::http::{AdminCommand, AdminRequest, Operator};
use crate::kafka::{self, ProducerCallbacks};
use crate::metrics::{DetectorLabels, Health};
use crate::{ServiceError, watch};

/// How often the pipeline directory is looked at for changes.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A reload to do: who asked, how, and where the answer goes.
pub(super) struct Reload {
    who: String,
    via: &'static str,
    reply: Option<mpsc::Sender<(u16, String)>>,
}

impl Service<'_> {
    /// Carries out the operators' revocations and re-armings; returns a reload to do, asked
    /// for by an operator, SIGHUP or a changed pipeline directory.
    pub(super) fn take_admin(&mut self) -> Result<Option<Reload>, ServiceError> {
        let mut reload = None;
        while let Ok(request) = self.admin.try_recv() {
            let AdminRequest {
                command,
                operator,
                reply,
            } = request;
            let who = operator.to_string();
            let answer = match command {
                AdminCommand::Revoke {
                    actor,
                    detector,
                    reason,
                } => {
                    if let Some(d) = detector.as_deref().filter(|d| !self.knows(d)) {
                        (404, format!("no detector `{d}` in this pipeline\n"))
                    } else {
                        let decision = self.revoke(&actor, detector.as_deref(), &reason, &operator, true)?;
                        let body = serde_json::to_string(&decision).expect("decisions serialise");
                        (200, format!("{body}\n"))
                    }
                }
                AdminCommand::Rearm { detector } => match self.rearm(&detector, &operator)? {
                    Some(trip) => (
                        200,
                        format!(
                            "re-armed `{detector}` (in shadow since {}: {})\n",
                            trip.at, trip.reason
                        ),
                    ),
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

    /// Lifts `actor`'s blocks and holds (from `detector`, or all), and publishes the revoke
    /// decision when `publish` (a scale-out state partition that only held repeat
    /// suppression for the actor does not).
    fn revoke(
        &mut self,
        actor: &str,
        detector: Option<&str>,
        reason: &str,
        operator: &Operator,
        publish: bool,
    ) -> Result<Decision, ServiceError> {
        let decision = self.pipeline.revoke(actor, detector, reason);
        let mut entry = serde_json::json!({
            "action": "revoke", "who": operator.name, "from": operator.from,
            "note": operator.note, "actor": actor, "detector": detector, "reason": reason,
        });
        if !publish {
            // (Scale-out: the actor's state partition publishes the revoke decision.)
            entry["published"] = false.into();
        }
        self.audit_entry(audit::Kind::Admin, &entry)?;
        if publish {
            self.publish_decision(&decision)?;
        }
        tracing::info!(%actor, detector = ?detector, who = %operator, publish, "revoked");
        Ok(decision)
    }

    /// Takes `detector` out of the fail-safe's shadow, if it is in it.
    fn rearm(&mut self, detector: &str, operator: &Operator) -> Result<Option<Trip>, ServiceError> {
        let Some(trip) = self.pipeline.rearm(detector) else {
            return Ok(None);
        };
        self.audit_entry(
            audit::Kind::Admin,
            &serde_json::json!({
                "action": "rearm", "who": operator.name, "from": operator.from,
                "note": operator.note, "detector": detector,
                "tripped_at": trip.at, "trip_reason": trip.reason,
            }),
        )?;
        self.refresh_notes();
        tracing::info!(%detector, who = %operator, "re-armed after the blast-radius fail-safe");
        Ok(Some(trip))
    }

    /// Scale-out: carries out an operator's command that came through the repartition topic
    /// (sent to any instance of the group, see `group.rs`).
    pub(super) fn group_command(&mut self, command: GroupCommand) -> Result<(), ServiceError> {
        let GroupCommand {
            command,
            operator,
            publish,
        } = command;
        match command {
            AdminCommand::Revoke {
                actor,
                detector,
                reason,
            } => {
                if detector.as_deref().is_none_or(|d| self.knows(d)) {
                    self.revoke(&actor, detector.as_deref(), &reason, &operator, publish)?;
                }
            }
            AdminCommand::Rearm { detector } => {
                self.rearm(&detector, &operator)?;
            }
            AdminCommand::Reload => {}
        }
        Ok(())
    }

    pub(super) fn knows(&self, detector: &str) -> bool {
        self.pipeline.detectors.iter().any(|d| d.meta.id == detector)
    }

    /// Reloads the pipeline directory: a version that fails `check` (or changes `[kafka]`) is
    /// refused and the running one continues; otherwise everything consumed is checkpointed
    /// and the pipeline reopened on the same state, where unchanged windows find their state
    /// (it is stored per window, or per detector version for windows that are re-run) and
    /// changed ones start afresh.
    pub(super) fn reload_pipeline(
        &mut self,
        reload: Reload,
        acks: &ProducerCallbacks,
        stop: &AtomicUsize,
        health: &Health,
    ) -> Result<(), ServiceError> {
        let Reload { who, via, reply } = reload;
        let dir = self.pipeline.dir.clone();
        // The files as they are before they are read: one changed while this reload runs is
        // seen by the next look (taken after loading, the version loaded would own it).
        let files = watch::Fingerprint::of(&dir);
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
            Ok(p) if self.new_route(&p).is_some() => self.new_route(&p),
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
        let part = self.pipeline.part().cloned();
        let pipeline = match Pipeline::load_part(&dir, state, Evaluator::Keyed, part) {
            Ok(p) => p,
            Err(e) => {
                self.pipeline.reset();
                return Err(ServiceError::Reload(e.to_string()));
            }
        };
        pipeline.set_live(idleness(&pipeline));
        self.pipeline = Arc::new(pipeline);
        self.decoding.replace(self.pipeline.decoder());
        self.join_group();
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
            *seen = files;
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

    /// Scale-out: why a new version of the pipeline cannot run in this group (a window that
    /// would need a route the group does not have: its repartition topic, made at start).
    fn new_route(&self, pipeline: &Pipeline) -> Option<String> {
        let routes = &self.task.as_ref()?.routes;
        let new: Vec<String> = pipeline
            .window_routes()
            .into_iter()
            .filter(|(_, r)| !routes.contains(r))
            .map(|(id, r)| format!("`{id}` (routed {r})"))
            .collect();
        (!new.is_empty()).then(|| {
            format!(
                "the window of {} needs a route this group was not started with: restart the instances to create it",
                new.join(", ")
            )
        })
    }

    /// Updates what /readyz notes and the fail-safe gauges: detectors in fail-safe shadow,
    /// and the last refused reload until a reload succeeds.
    pub(super) fn refresh_notes(&mut self) {
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
                let what = if t.disabled {
                    "is disabled (over its time budget)"
                } else {
                    "runs in shadow"
                };
                format!(
                    "fail-safe: `{id}` {what} since {} (POST /admin/rearm?detector={id})",
                    t.at
                )
            })
            .collect();
        notes.extend(self.reload_note.clone());
        notes.extend(self.last_event_time_note.clone());
        self.health.set_notes(notes);
    }
}
