//! Between the detectors and the decisions topic: suppression of repeats, the blast-radius
//! fail-safe, and revocations.
//!
//! Everything here runs on event time, so a replay and the live service make the same
//! choices for the same input:
//!
//! - While a detector's block (or review hold) for a key is active, the detector's repeats for
//!   that key are suppressed; an alert suppresses repeats for the detector's `dedup_for`.
//!   Suppressed decisions are counted, never published.
//! - An enforcing block or review detector that blocks more distinct keys within one minute
//!   than its blast-radius limit allows is presumed broken: that decision and every later one
//!   of the detector are published as shadow, the keys it blocked in that minute get a revoke
//!   decision, and one alert explains why. It stays in shadow until an operator re-arms it.
//! - An operator's revocation lifts a block and clears the suppression, so the next match
//!   blocks again.
//!
//! The guard's state is checkpointed with the window state.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use rampart_core::decision::DECISION_SCHEMA_VERSION;
use rampart_core::time::{format_micros, parse_rfc3339_micros};
use rampart_core::{Decision, DecisionId, DetectorRef, Mode, Severity, SourcePosition, Verdict};
use rampart_sql::{BlastRadius, CompiledDetector};

use crate::input::decode::EventBatch;

const MINUTE: i64 = 60_000_000;

/// The tag on decisions the fail-safe turned into shadow, and on its alert.
pub const FAIL_SAFE_TAG: &str = "fail-safe";

/// A detector's guard settings.
#[derive(Debug, Clone, Copy)]
struct Policy {
    /// Microseconds a repeat alert is suppressed (0: never).
    dedup_for: i64,
    blast: BlastRadius,
}

/// Why a detector fell back to shadow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    /// Event time of the block that went past the limit.
    pub at: String,
    /// The alert's reason.
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecentBlock {
    time: i64,
    key: String,
    actor: String,
}

/// One detector's guard state.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DetectorGuard {
    /// Per key: the event time (µs) until which repeats are suppressed.
    quiet_until: HashMap<String, i64>,
    /// Per key: the event time (µs) of the decision that suppresses repeats. An event older than
    /// it (from a partition read behind another) is not its repeat. (Absent in checkpoints
    /// written before it: then every event before `quiet_until` is.)
    #[serde(default)]
    quiet_since: HashMap<String, i64>,
    /// Keys blocked within the last minute of event time, oldest first.
    recent: VecDeque<RecentBlock>,
    tripped: Option<Trip>,
    /// `quiet_until` size after the last prune (prunes when it doubles).
    #[serde(skip)]
    pruned_at: usize,
}

/// Distinct actors per minute of event time (hashed), for the blast radius's share limit.
#[derive(Debug, Default)]
struct ActiveActors {
    minute: i64,
    current: HashSet<u64>,
    previous: usize,
    /// Actors of `minute` counted before a restart (the set itself is not checkpointed).
    floor: usize,
}

impl ActiveActors {
    fn observe(&mut self, events: &EventBatch) {
        for i in 0..events.batch.num_rows() {
            let minute = events.event_time(i).div_euclid(MINUTE);
            if minute > self.minute {
                self.previous = if minute == self.minute + 1 {
                    self.current.len().max(self.floor)
                } else {
                    0
                };
                self.current.clear();
                self.floor = 0;
                self.minute = minute;
            }
            let mut h = rustc_hash::FxHasher::default();
            events.actor(i).hash(&mut h);
            self.current.insert(h.finish());
        }
    }

    /// Actors active in the current minute or the one before, whichever saw more.
    fn count(&self) -> usize {
        self.current.len().max(self.floor).max(self.previous)
    }
}

/// The guard state that is checkpointed.
#[derive(Debug, Default, Deserialize)]
struct Stored {
    detectors: BTreeMap<String, DetectorGuard>,
    /// The active actors' minute, its count so far and the previous minute's count.
    #[serde(default)]
    active: (i64, usize, usize),
}

/// [`Stored`] as written.
#[derive(Serialize)]
struct StoredRef<'a> {
    detectors: &'a BTreeMap<String, DetectorGuard>,
    active: (i64, usize, usize),
}

/// Suppression, blast radius and revocation for one pipeline's decisions.
#[derive(Debug)]
pub struct Guard {
    pipeline: String,
    policies: HashMap<String, Policy>,
    stored: Stored,
    active: ActiveActors,
    /// Suppressed decisions per detector since the process started.
    suppressed: BTreeMap<String, u64>,
}

impl Guard {
    /// A guard for `detectors`, with the pipeline's defaults for what they leave unset.
    pub fn new(
        pipeline: &str,
        detectors: &[CompiledDetector],
        default_dedup: std::time::Duration,
        default_blast: BlastRadius,
    ) -> Self {
        let policies = detectors
            .iter()
            .map(|d| {
                let dedup = d.meta.dedup_for.unwrap_or(default_dedup);
                let policy = Policy {
                    dedup_for: i64::try_from(dedup.as_micros()).unwrap_or(i64::MAX),
                    blast: d.meta.blast_radius.unwrap_or(default_blast),
                };
                (d.meta.id.clone(), policy)
            })
            .collect();
        Self {
            pipeline: pipeline.to_string(),
            policies,
            stored: Stored::default(),
            active: ActiveActors::default(),
            suppressed: BTreeMap::new(),
        }
    }

    /// Counts the actors of a batch toward the active actors of their minute.
    pub fn observe(&mut self, events: &EventBatch) {
        if self
            .policies
            .values()
            .any(|p| matches!(p.blast, BlastRadius::Limit { share: Some(_), .. }))
        {
            self.active.observe(events);
        }
    }

    /// Passes `decisions` (in input order) through suppression and the blast radius: what
    /// should be published, in order, with the fail-safe's alerts and revocations where it
    /// tripped. Adds the suppressed ones to `suppressed`, per detector.
    pub fn apply(
        &mut self,
        decisions: Vec<Decision>,
        suppressed: &mut BTreeMap<String, u64>,
    ) -> Vec<Decision> {
        let mut out = Vec::with_capacity(decisions.len());
        for mut d in decisions {
            let Some(policy) = self.policies.get(&d.detector.id).copied() else {
                out.push(d);
                continue;
            };
            let Some(t) = parse_rfc3339_micros(&d.event_time) else {
                out.push(d);
                continue;
            };
            let g = self.stored.detectors.entry(d.detector.id.clone()).or_default();
            let since = g.quiet_since.get(&d.key).copied().unwrap_or(i64::MIN);
            if since <= t && g.quiet_until.get(&d.key).is_some_and(|until| *until > t) {
                *suppressed.entry(d.detector.id.clone()).or_default() += 1;
                *self.suppressed.entry(d.detector.id.clone()).or_default() += 1;
                continue;
            }
            let quiet = match d.verdict {
                Verdict::Block | Verdict::Review => d.expires_at.as_deref().and_then(parse_rfc3339_micros),
                Verdict::Alert => (policy.dedup_for > 0).then(|| t.saturating_add(policy.dedup_for)),
                Verdict::Revoke => None,
            };
            let enforcing = d.mode == Mode::Enforce && matches!(d.verdict, Verdict::Block | Verdict::Review);
            if enforcing && g.tripped.is_some() {
                d.mode = Mode::Shadow;
                d.tags.push(FAIL_SAFE_TAG.into());
            } else if enforcing
                && let BlastRadius::Limit {
                    per_minute,
                    share,
                    min_keys,
                } = policy.blast
            {
                g.recent.retain(|b| b.time > t - MINUTE);
                let mut keys: Vec<&str> = g.recent.iter().map(|b| b.key.as_str()).collect();
                keys.push(&d.key);
                keys.sort_unstable();
                keys.dedup();
                let blocked = keys.len();
                let active = self.active.count();
                let over_count = blocked > per_minute;
                let over_share =
                    share.filter(|s| blocked >= min_keys && blocked as f64 > s * active.max(1) as f64);
                if over_count || over_share.is_some() {
                    let limit = match over_share {
                        Some(s) if !over_count => {
                            format!("{:.0}% of the {active} actors active in that minute", s * 100.0)
                        }
                        _ => format!("{per_minute} per minute"),
                    };
                    let reason = format!(
                        "blast-radius fail-safe: detector `{}` would have blocked {blocked} distinct keys within \
                         one minute of event time (limit: {limit}); it now runs in shadow, its blocks of that \
                         minute are revoked, until an operator re-arms it",
                        d.detector.id
                    );
                    g.tripped = Some(Trip {
                        at: d.event_time.clone(),
                        reason: reason.clone(),
                    });
                    tracing::warn!(detector = %d.detector.id, blocked, active, "{reason}");
                    let mut evidence = Map::new();
                    evidence.insert("blocked_keys".into(), blocked.into());
                    evidence.insert("limit_per_minute".into(), per_minute.into());
                    evidence.insert("active_actors".into(), active.into());
                    if let Some(s) = share {
                        evidence.insert("limit_share".into(), Value::from(s));
                    }
                    out.push(Decision {
                        decision_id: DecisionId::new()
                            .part(&self.pipeline)
                            .part("fail-safe")
                            .part(&d.detector.id)
                            .part(&d.detector.version)
                            .part(t.to_le_bytes())
                            .finish(),
                        verdict: Verdict::Alert,
                        mode: Mode::Enforce,
                        severity: Severity::High,
                        actor: "*".into(),
                        key: d.detector.id.clone(),
                        actions: vec!["*".into()],
                        reason,
                        evidence,
                        expires_at: None,
                        guidance: Some(format!(
                            "Compare the detector with recent traffic (`rampart replay --compare`), fix it, then \
                             re-arm it: POST /admin/rearm?detector={}",
                            d.detector.id
                        )),
                        tags: vec![FAIL_SAFE_TAG.into()],
                        ..d.clone()
                    });
                    let mut revoked = HashSet::new();
                    for b in std::mem::take(&mut g.recent) {
                        if revoked.insert(b.key.clone()) {
                            out.push(revocation(
                                &self.pipeline,
                                d.detector.clone(),
                                &b.actor,
                                &b.key,
                                format!("{} (fail-safe tripped)", d.detector.id),
                                t,
                                d.source.clone(),
                                &d.processed_at,
                            ));
                        }
                    }
                    d.mode = Mode::Shadow;
                    d.tags.push(FAIL_SAFE_TAG.into());
                } else {
                    g.recent.push_back(RecentBlock {
                        time: t,
                        key: d.key.clone(),
                        actor: d.actor.clone(),
                    });
                }
            }
            if let Some(until) = quiet {
                g.quiet_until.insert(d.key.clone(), until);
                g.quiet_since.insert(d.key.clone(), t);
                if g.quiet_until.len() >= 2 * g.pruned_at.max(1024) {
                    g.quiet_until.retain(|_, until| *until > t);
                    let kept = &g.quiet_until;
                    g.quiet_since.retain(|key, _| kept.contains_key(key));
                    g.pruned_at = g.quiet_until.len();
                }
            }
            out.push(d);
        }
        out
    }

    /// An operator's revocation of `actor`'s blocks and holds from `detector` (every detector
    /// when `None`): clears their suppression and returns the decision to publish.
    pub fn revoke(&mut self, actor: &str, detector: Option<&str>, reason: &str, now: i64) -> Decision {
        for (id, g) in &mut self.stored.detectors {
            if detector.is_none_or(|d| d == id) {
                g.quiet_until.remove(actor);
                g.quiet_since.remove(actor);
            }
        }
        revocation(
            &self.pipeline,
            DetectorRef {
                id: detector.unwrap_or("*").to_string(),
                version: "operator".into(),
            },
            actor,
            actor,
            reason.to_string(),
            now,
            SourcePosition::File {
                file: "operator".into(),
                line: 1,
            },
            &format_micros(now),
        )
    }

    /// Re-arms a detector the fail-safe put in shadow. Returns the trip it clears, or `None`
    /// when the detector was not tripped.
    pub fn rearm(&mut self, detector: &str) -> Option<Trip> {
        let g = self.stored.detectors.get_mut(detector)?;
        g.recent.clear();
        g.tripped.take()
    }

    /// Detectors the fail-safe put in shadow, with why.
    pub fn tripped(&self) -> Vec<(String, Trip)> {
        self.stored
            .detectors
            .iter()
            .filter_map(|(id, g)| g.tripped.clone().map(|t| (id.clone(), t)))
            .collect()
    }

    /// Whether `detector` exists in this pipeline.
    pub fn knows(&self, detector: &str) -> bool {
        self.policies.contains_key(detector)
    }

    /// Suppressed decisions per detector since start.
    pub fn suppressed(&self) -> &BTreeMap<String, u64> {
        &self.suppressed
    }

    /// The state to checkpoint.
    pub fn snapshot(&self) -> Vec<u8> {
        let a = &self.active;
        serde_json::to_vec(&StoredRef {
            detectors: &self.stored.detectors,
            active: (a.minute, a.current.len().max(a.floor), a.previous),
        })
        .expect("guard state serialises")
    }

    /// Restores checkpointed state (detectors no longer in the pipeline are dropped).
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), serde_json::Error> {
        let mut stored: Stored = serde_json::from_slice(bytes)?;
        stored.detectors.retain(|id, _| self.policies.contains_key(id));
        let (minute, floor, previous) = stored.active;
        self.active = ActiveActors {
            minute,
            current: HashSet::new(),
            previous,
            floor,
        };
        self.stored = stored;
        Ok(())
    }

    /// Forgets everything (a replay's temporary state starting over).
    pub fn clear(&mut self) {
        self.stored = Stored::default();
        self.active = ActiveActors::default();
    }
}

/// A revoke decision lifting `actor`'s blocks from `detector`.
#[allow(clippy::too_many_arguments)]
fn revocation(
    pipeline: &str,
    detector: DetectorRef,
    actor: &str,
    key: &str,
    why: String,
    time: i64,
    source: SourcePosition,
    processed_at: &str,
) -> Decision {
    Decision {
        schema_version: DECISION_SCHEMA_VERSION,
        decision_id: DecisionId::new()
            .part(pipeline)
            .part("revoke")
            .part(&detector.id)
            .part(actor)
            .part(time.to_le_bytes())
            .finish(),
        pipeline: pipeline.to_string(),
        verdict: Verdict::Revoke,
        mode: Mode::Enforce,
        severity: Severity::Info,
        actor: actor.to_string(),
        key: key.to_string(),
        actions: vec!["*".into()],
        reason: format!("revoked: {why}"),
        evidence: Map::new(),
        event_time: format_micros(time),
        processed_at: processed_at.to_string(),
        expires_at: None,
        source,
        guidance: None,
        tags: Vec::new(),
        detector,
    }
}
