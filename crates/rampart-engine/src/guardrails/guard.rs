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
//!
//! Scale-out: each state partition has a guard of its own, over its own keys. Joined to its
//! group ([`Guard::join_group`]), it tells the others of its route what the limit needs to hold
//! for the whole deployment ([`GuardNote`]: each block counted, its active actors, a trip),
//! counts theirs with its own, and follows a trip wherever it happened: every state partition
//! goes to shadow and revokes its own keys' blocks of that minute, and the one that speaks for
//! the detector publishes the one alert.
//!
//! A group's count limit holds exactly, not only as fast as notes travel: the limit is dealt
//! out as shares, one per state partition, that add up to it (an escrow, as in the
//! demarcation protocol). A state partition blocks at once within its share of distinct keys
//! per minute; a block past it is held (checkpointed with the rest) and the others are asked
//! for some of theirs ([`GuardNote::Ask`]). Each answers with what it can spare
//! ([`GuardNote::Give`]), lowering its own share first, so the shares never add up to more
//! than the limit. The held blocks go out as the share grows; when a whole round of answers
//! gives nothing, every other state partition is at its share and the held block would pass
//! the limit: the fail-safe trips and they go out as shadow.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use rampart_core::decision::DECISION_SCHEMA_VERSION;
use rampart_core::time::{format_micros, parse_rfc3339_micros};
use rampart_core::{Decision, DecisionId, DetectorRef, Mode, Severity, SourcePosition, Verdict};
use rampart_sql::{BlastRadius, CompiledDetector};

use crate::decide::Pending;
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

/// Why a detector fell back to shadow, or was disabled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    /// Event time of the block that went past the limit (of the batch, when disabled).
    pub at: String,
    /// The alert's reason.
    pub reason: String,
    /// Disabled (not run at all) for taking longer than `[detectors] max_batch_time` on a
    /// batch, rather than put in shadow by the blast radius.
    #[serde(default)]
    pub disabled: bool,
}

/// The tag on the alert of a detector disabled for its time (with [`FAIL_SAFE_TAG`]).
pub const DISABLED_TAG: &str = "disabled";

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
    /// Scale-out: this state partition's share of the group's count limit.
    #[serde(default)]
    escrow: Option<Escrow>,
    /// `quiet_until` size after the last prune (prunes when it doubles).
    #[serde(skip)]
    pruned_at: usize,
}

/// Scale-out: one state partition's share of a detector's count limit (see the module's
/// documentation).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Escrow {
    /// The limit the shares divide (a changed limit deals them afresh).
    limit: usize,
    /// Distinct keys this state partition may block within a minute without asking.
    share: usize,
    /// Blocks past the share, waiting for the others' answers, oldest first.
    held: VecDeque<Decision>,
    /// The last round of asking; whether it is under way, who answered it, what they gave.
    round: u64,
    asking: bool,
    answered: BTreeSet<String>,
    given: usize,
    /// Per state partition that asked: the last round answered and what it was given.
    answers: BTreeMap<String, (u64, usize)>,
    /// When the round's Ask was last sent (never, after a restart).
    #[serde(skip)]
    asked_at: Option<std::time::Instant>,
}

/// A round's Ask unanswered this long is sent again (an answer lost to a crash before it was
/// sent; the others answer a round again with what they gave).
const ASK_AGAIN: std::time::Duration = std::time::Duration::from_secs(5);

impl Escrow {
    fn new(limit: usize, share: usize) -> Self {
        Self {
            limit,
            share,
            ..Self::default()
        }
    }

    /// The round's Ask for the distinct keys held, from the first held block's time on
    /// (noting when it was sent); `None` with nothing held.
    fn ask_note(&mut self, detector: &str) -> Option<GuardNote> {
        let time = parse_rfc3339_micros(&self.held.front()?.event_time).unwrap_or(i64::MIN);
        self.asked_at = Some(std::time::Instant::now());
        Some(GuardNote::Ask {
            detector: detector.to_string(),
            round: self.round,
            need: self.need(),
            time,
        })
    }

    /// The round's Ask again, when it is under way and was not sent since the restart or
    /// for [`ASK_AGAIN`].
    fn ask_again(&mut self, detector: &str) -> Option<GuardNote> {
        let due = self.asked_at.is_none_or(|at| at.elapsed() >= ASK_AGAIN);
        if !self.asking || !due {
            return None;
        }
        self.ask_note(detector)
    }

    /// Distinct keys held.
    fn need(&self) -> usize {
        self.held
            .iter()
            .map(|d| d.key.as_str())
            .collect::<HashSet<_>>()
            .len()
    }
}

/// Scale-out: what one state partition's guard tells the other state partitions of its
/// route, so that a blast-radius limit holds for the whole group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "note", rename_all = "snake_case")]
pub enum GuardNote {
    /// An enforcing block (or review hold) counted toward its detector's limit.
    Blocked {
        /// The detector's id.
        detector: String,
        /// Its event time (µs).
        time: i64,
        /// The key blocked.
        key: String,
    },
    /// The detector's fail-safe tripped there.
    Tripped {
        /// The detector.
        detector: DetectorRef,
        /// Event time (µs) of the block that went past the limit.
        time: i64,
        /// Why, as the tripping state partition put it.
        trip: Trip,
        /// Where the block that went past the limit came from.
        source: SourcePosition,
        /// The fail-safe's alert, for the state partition that speaks for the detector to
        /// publish (absent when the sender is that one: it published it).
        alert: Option<Box<Decision>>,
    },
    /// A block there passes its share of the detector's limit: it asks the others for some of
    /// theirs.
    Ask {
        /// The detector's id.
        detector: String,
        /// The round of asking (an Ask read again after a restart gets the same answer).
        round: u64,
        /// Distinct keys it holds.
        need: usize,
        /// The held block's event time (µs): what the others count their minute back from.
        time: i64,
    },
    /// The answer to an Ask: how much of its share the sender gave up (it lowered its own).
    Give {
        /// The detector's id.
        detector: String,
        /// The asking state partition.
        to: String,
        /// The round answered.
        round: u64,
        /// Distinct keys per minute given.
        amount: usize,
    },
    /// The distinct actors active there in a minute of event time.
    Active {
        /// The minute (event time, µs / 60 s).
        minute: i64,
        /// Distinct actors seen in it so far.
        count: usize,
    },
}

/// Scale-out: what a guard knows of its group.
#[derive(Debug, Default)]
struct GroupView {
    /// Detectors whose fail-safe alert this state partition publishes.
    speaks_for: HashSet<String>,
    /// Notes for the others, oldest first.
    outbox: Vec<GuardNote>,
    /// Per detector: the other state partitions' blocks (event time, key).
    remote: HashMap<String, VecDeque<(i64, String)>>,
    /// Per other state partition: its active actors (minute, count).
    active: HashMap<String, (i64, usize)>,
    /// The active actors this one last told (minute, count).
    told_active: (i64, usize),
    /// This state partition's name (as the others' notes name their sender), its index and
    /// how many state partitions the group has.
    me: String,
    index: usize,
    partitions: usize,
}

impl GroupView {
    /// This state partition's first share of a count limit (the limit dealt out evenly, the
    /// remainder to the first ones).
    fn share_of(&self, limit: usize) -> usize {
        let n = self.partitions.max(1);
        limit / n + usize::from(self.index < limit % n)
    }
}

/// A block that would pass a detector's blast-radius limit: how many distinct keys, among how
/// many active actors, against which limit.
struct OverLimit {
    blocked: usize,
    active: usize,
    per_minute: usize,
    share: Option<f64>,
    /// The limit passed, in words.
    limit: String,
}

impl DetectorGuard {
    /// Whether blocking `key` at `t` passes `blast` (distinct keys blocked within the minute of
    /// event time before it, here and in `remote` (the rest of a group), against a count and
    /// a share of the `active` actors; in a group, against the share only: the count limit is
    /// the escrow's).
    fn over_limit(
        &mut self,
        blast: BlastRadius,
        key: &str,
        t: i64,
        active: usize,
        remote: Option<&mut VecDeque<(i64, String)>>,
    ) -> Option<OverLimit> {
        let BlastRadius::Limit {
            per_minute,
            share,
            min_keys,
        } = blast
        else {
            return None;
        };
        self.recent.retain(|b| b.time > t - MINUTE);
        let mut keys: Vec<&str> = self.recent.iter().map(|b| b.key.as_str()).collect();
        // (In a group the count limit is held by the shares: see `Escrow`.)
        let in_group = remote.is_some();
        if let Some(remote) = remote {
            remote.retain(|(time, _)| *time > t - MINUTE);
            keys.extend(remote.iter().map(|(_, k)| k.as_str()));
        }
        keys.push(key);
        keys.sort_unstable();
        keys.dedup();
        let blocked = keys.len();
        let over_count = blocked > per_minute && !in_group;
        let over_share = share.filter(|s| blocked >= min_keys && blocked as f64 > s * active.max(1) as f64);
        if !over_count && over_share.is_none() {
            return None;
        }
        let limit = match over_share {
            Some(s) if !over_count => {
                format!("{:.0}% of the {active} actors active in that minute", s * 100.0)
            }
            _ => format!("{per_minute} per minute"),
        };
        Some(OverLimit {
            blocked,
            active,
            per_minute,
            share,
            limit,
        })
    }

    /// Trips the fail-safe on `d` (the block past the limit, at `t`): the detector goes to
    /// shadow until re-armed; returns the alert and the revocations of the minute's blocks.
    fn trip(&mut self, pipeline: &str, d: &Decision, t: i64, over: &OverLimit) -> Vec<Decision> {
        let OverLimit {
            blocked,
            active,
            per_minute,
            share,
            limit,
        } = over;
        let reason = format!(
            "blast-radius fail-safe: detector `{}` would have blocked {blocked} distinct keys within \
             one minute of event time (limit: {limit}); it now runs in shadow, its blocks of that \
             minute are revoked, until an operator re-arms it",
            d.detector.id
        );
        self.tripped = Some(Trip {
            at: d.event_time.clone(),
            reason: reason.clone(),
            disabled: false,
        });
        tracing::warn!(detector = %d.detector.id, blocked, active, "{reason}");
        let mut evidence = Map::new();
        evidence.insert("blocked_keys".into(), (*blocked).into());
        evidence.insert("limit_per_minute".into(), (*per_minute).into());
        evidence.insert("active_actors".into(), (*active).into());
        if let Some(s) = share {
            evidence.insert("limit_share".into(), Value::from(*s));
        }
        let mut out = vec![Decision {
            decision_id: DecisionId::new()
                .part(pipeline)
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
        }];
        out.extend(self.revoke_minute(pipeline, &d.detector, t, &d.source, &d.processed_at));
        out
    }

    /// The revoke decisions of the keys blocked within the minute of event time before `t`
    /// (each key once), as a trip lifts them; forgets those blocks.
    fn revoke_minute(
        &mut self,
        pipeline: &str,
        detector: &DetectorRef,
        t: i64,
        source: &SourcePosition,
        processed_at: &str,
    ) -> Vec<Decision> {
        let mut revoked = HashSet::new();
        std::mem::take(&mut self.recent)
            .into_iter()
            .filter(|b| b.time > t - MINUTE && revoked.insert(b.key.clone()))
            .map(|b| {
                revocation(
                    pipeline,
                    detector.clone(),
                    &b.actor,
                    &b.key,
                    format!("{} (fail-safe tripped)", detector.id),
                    t,
                    source.clone(),
                    processed_at,
                )
            })
            .collect()
    }

    /// Distinct keys blocked within the minute of event time before `t`.
    fn blocked_keys(&self, t: i64) -> HashSet<&str> {
        self.recent
            .iter()
            .filter(|b| b.time > t - MINUTE)
            .map(|b| b.key.as_str())
            .collect()
    }

    /// Counts the block `d` (at `t`) toward the minute; returns the note that tells the group,
    /// when its key is new here (the others count a key once a minute).
    fn count_block(&mut self, d: &Decision, t: i64) -> Option<GuardNote> {
        let new_key = !self.recent.iter().any(|b| b.key == d.key);
        self.recent.push_back(RecentBlock {
            time: t,
            key: d.key.clone(),
            actor: d.actor.clone(),
        });
        new_key.then(|| GuardNote::Blocked {
            detector: d.detector.id.clone(),
            time: t,
            key: d.key.clone(),
        })
    }

    /// Scale-out: this state partition's share of `limit`, dealt as `share` the first time
    /// and whenever the limit changed (a reload); what is held stays held.
    fn deal(&mut self, limit: usize, share: usize) -> &mut Escrow {
        if self.escrow.as_ref().is_none_or(|e| e.limit != limit) {
            let held = self.escrow.take().map(|e| e.held).unwrap_or_default();
            self.escrow = Some(Escrow {
                held,
                ..Escrow::new(limit, share)
            });
        }
        self.escrow.as_mut().expect("dealt")
    }

    /// Scale-out: whether blocking `key` at `t` would pass this state partition's share, or
    /// must wait behind blocks held already (a key blocked within the minute counts once).
    fn past_share(&self, key: &str, t: i64) -> bool {
        let Some(e) = &self.escrow else {
            return false;
        };
        let keys = self.blocked_keys(t);
        !keys.contains(key) && (!e.held.is_empty() || keys.len() >= e.share)
    }

    /// Scale-out: the held blocks the share now allows, oldest first, counted as blocks (the
    /// notes that tell the group go to `outbox`).
    fn release(&mut self, outbox: &mut Vec<GuardNote>) -> Vec<Decision> {
        let mut out = Vec::new();
        while let Some(e) = &self.escrow {
            let Some(d) = e.held.front() else {
                break;
            };
            let t = parse_rfc3339_micros(&d.event_time).unwrap_or(i64::MIN);
            let keys = self.blocked_keys(t);
            if !keys.contains(d.key.as_str()) && keys.len() >= e.share {
                break;
            }
            let d = self
                .escrow
                .as_mut()
                .and_then(|e| e.held.pop_front())
                .expect("a held block");
            outbox.extend(self.count_block(&d, t));
            out.push(d);
        }
        out
    }

    /// Scale-out: asks the group for share for the held blocks, unless a round is under way.
    fn ask(&mut self, detector: &str, outbox: &mut Vec<GuardNote>) {
        let Some(e) = &mut self.escrow else {
            return;
        };
        if e.held.is_empty() || e.asking {
            return;
        }
        e.round += 1;
        e.asking = true;
        e.answered.clear();
        e.given = 0;
        tracing::info!(
            detector,
            need = e.need(),
            share = e.share,
            round = e.round,
            "blocks past this state partition's share of the blast-radius limit held: asking the group"
        );
        outbox.extend(e.ask_note(detector));
    }

    /// Scale-out: the answer to `from`'s Ask (what of the share it can spare, given `need`
    /// and the minute before `time`); the same answer when the Ask is read again.
    fn answer(&mut self, from: &str, round: u64, need: usize, time: i64) -> Option<usize> {
        let now = self.recent.back().map_or(time, |b| b.time.max(time));
        let used = self.blocked_keys(now).len();
        let tripped = self.tripped.is_some();
        let e = self.escrow.as_mut()?;
        match e.answers.get(from) {
            Some((r, amount)) if *r == round => return Some(*amount),
            Some((r, _)) if *r > round => return None,
            _ => {}
        }
        let amount = if tripped || !e.held.is_empty() {
            0
        } else {
            need.min(e.share.saturating_sub(used))
        };
        e.share -= amount;
        e.answers.insert(from.to_string(), (round, amount));
        Some(amount)
    }

    /// The held blocks, as shadow: the fail-safe tripped.
    fn shadow_held(&mut self) -> Vec<Decision> {
        let Some(e) = &mut self.escrow else {
            return Vec::new();
        };
        e.asking = false;
        e.held
            .drain(..)
            .map(|mut d| {
                d.mode = Mode::Shadow;
                d.tags.push(FAIL_SAFE_TAG.into());
                d
            })
            .collect()
    }

    /// Suppresses repeats for `key` from `t` until `until`; prunes expired keys when the map
    /// has doubled since the last prune.
    fn quiet(&mut self, key: &str, t: i64, until: i64) {
        self.quiet_until.insert(key.to_string(), until);
        self.quiet_since.insert(key.to_string(), t);
        if self.quiet_until.len() >= 2 * self.pruned_at.max(1024) {
            self.quiet_until.retain(|_, until| *until > t);
            let kept = &self.quiet_until;
            self.quiet_since.retain(|key, _| kept.contains_key(key));
            self.pruned_at = self.quiet_until.len();
        }
    }
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
    /// Scale-out: the rest of the group, once joined.
    group: Option<GroupView>,
}

impl Guard {
    /// A guard for `detectors`, with the pipeline's defaults for what they leave unset.
    pub fn new(
        pipeline: &str,
        detectors: &[CompiledDetector],
        default_dedup: std::time::Duration,
        default_blast: BlastRadius,
    ) -> Self {
        Self::with_policies(
            pipeline,
            detectors.iter().map(|d| {
                (
                    d.meta.id.clone(),
                    d.meta.dedup_for.unwrap_or(default_dedup),
                    d.meta.blast_radius.unwrap_or(default_blast),
                )
            }),
        )
    }

    /// A guard for detectors given as (id, repeat suppression, blast radius).
    fn with_policies(
        pipeline: &str,
        policies: impl IntoIterator<Item = (String, std::time::Duration, BlastRadius)>,
    ) -> Self {
        let policies = policies
            .into_iter()
            .map(|(id, dedup, blast)| {
                let policy = Policy {
                    dedup_for: rampart_core::time::micros(dedup),
                    blast,
                };
                (id, policy)
            })
            .collect();
        Self {
            pipeline: pipeline.to_string(),
            policies,
            stored: Stored::default(),
            active: ActiveActors::default(),
            suppressed: BTreeMap::new(),
            group: None,
        }
    }

    /// Scale-out: this guard holds one state partition's keys of a group. From now on its
    /// blast-radius limits count the blocks and active actors the others tell
    /// ([`Self::note`]), it gathers what to tell them ([`Self::take_notes`]), and of the
    /// fail-safe alerts it publishes those of `speaks_for` only (each detector's alert comes
    /// from one state partition of the group).
    ///
    /// `me` names this state partition as the others' notes name their sender, `index` is its
    /// number of the group's `partitions` (each count limit is dealt out as shares among them).
    pub fn join_group(
        &mut self,
        speaks_for: impl IntoIterator<Item = String>,
        me: &str,
        index: usize,
        partitions: usize,
    ) {
        self.group = Some(GroupView {
            speaks_for: speaks_for.into_iter().collect(),
            me: me.to_string(),
            index,
            partitions,
            ..GroupView::default()
        });
    }

    /// Scale-out: what to tell the other state partitions since the last call (the blocks
    /// counted, a trip, and the active actors when a share limit needs them and they changed).
    pub fn take_notes(&mut self) -> Vec<GuardNote> {
        let shares = self
            .policies
            .values()
            .any(|p| matches!(p.blast, BlastRadius::Limit { share: Some(_), .. }));
        let Some(group) = &mut self.group else {
            return Vec::new();
        };
        let active = (
            self.active.minute,
            self.active.current.len().max(self.active.floor),
        );
        if shares && active != group.told_active {
            group.told_active = active;
            group.outbox.push(GuardNote::Active {
                minute: active.0,
                count: active.1,
            });
        }
        for (id, g) in &mut self.stored.detectors {
            if let Some(note) = g.escrow.as_mut().and_then(|e| e.ask_again(id)) {
                group.outbox.push(note);
            }
        }
        std::mem::take(&mut group.outbox)
    }

    /// Scale-out: what state partition `from` told. A trip there puts the detector in shadow
    /// here too; returns the revocations of this state partition's blocks of that minute and,
    /// when this one speaks for the detector, the fail-safe's alert, to publish.
    pub fn note(&mut self, from: &str, note: GuardNote) -> Vec<Decision> {
        let Some(group) = &mut self.group else {
            return Vec::new();
        };
        match note {
            GuardNote::Blocked { detector, time, key } => {
                if self.policies.contains_key(&detector) {
                    let remote = group.remote.entry(detector).or_default();
                    // (Bounded: what no block of this one's can count any more goes.)
                    remote.retain(|(t, _)| *t > time - 2 * MINUTE);
                    remote.push_back((time, key));
                }
                Vec::new()
            }
            GuardNote::Active { minute, count } => {
                group.active.insert(from.to_string(), (minute, count));
                Vec::new()
            }
            GuardNote::Ask {
                detector,
                round,
                need,
                time,
            } => {
                // (Every Ask is answered, with nothing when there is nothing to give: the
                // asking one waits for every answer.)
                let mut amount = Some(0);
                if let Some(Policy {
                    blast: BlastRadius::Limit { per_minute, .. },
                    ..
                }) = self.policies.get(&detector)
                {
                    let g = self.stored.detectors.entry(detector.clone()).or_default();
                    g.deal(*per_minute, group.share_of(*per_minute));
                    amount = g.answer(from, round, need, time);
                }
                if let Some(amount) = amount {
                    group.outbox.push(GuardNote::Give {
                        detector,
                        to: from.to_string(),
                        round,
                        amount,
                    });
                }
                Vec::new()
            }
            GuardNote::Give {
                detector,
                to,
                round,
                amount,
            } => {
                if to != group.me {
                    return Vec::new();
                }
                let Some(g) = self.stored.detectors.get_mut(&detector) else {
                    return Vec::new();
                };
                let Some(e) = &mut g.escrow else {
                    return Vec::new();
                };
                // (An answer read again after a restart counts once.)
                if round != e.round || !e.answered.insert(from.to_string()) {
                    return Vec::new();
                }
                e.share += amount;
                e.given += amount;
                settle(&self.pipeline, &detector, g, group, &self.active)
            }
            GuardNote::Tripped {
                detector,
                time,
                trip,
                source,
                alert,
            } => {
                if !self.policies.contains_key(&detector.id) {
                    return Vec::new();
                }
                group.remote.remove(&detector.id);
                let g = self.stored.detectors.entry(detector.id.clone()).or_default();
                if g.tripped.is_some() {
                    // Tripped here too (or told before): its alert and revocations are out.
                    return Vec::new();
                }
                tracing::warn!(detector = %detector.id, from, "blast-radius fail-safe tripped elsewhere in the group: in shadow here too");
                g.tripped = Some(trip);
                let mut out: Vec<Decision> = Vec::new();
                if group.speaks_for.contains(&detector.id)
                    && let Some(alert) = alert
                {
                    out.push(*alert);
                }
                let processed_at = rampart_core::time::now();
                out.extend(g.revoke_minute(&self.pipeline, &detector, time, &source, &processed_at));
                out.extend(g.shadow_held());
                out
            }
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

    /// [`Self::apply_pending`] of decisions made already.
    #[cfg(test)]
    pub fn apply(
        &mut self,
        decisions: Vec<Decision>,
        suppressed: &mut BTreeMap<String, u64>,
    ) -> Vec<Decision> {
        let pending = decisions
            .into_iter()
            .map(|d| Pending::Made(Box::new(d)))
            .collect();
        self.apply_pending(
            pending,
            |p| match p {
                Pending::Made(d) => *d,
                Pending::Row(_) => unreachable!("made above"),
            },
            suppressed,
        )
    }

    /// Passes `decisions` (in input order) through suppression and the blast radius: what
    /// should be published, in order, with the fail-safe's alerts and revocations where it
    /// tripped. Adds the suppressed ones to `suppressed`, per detector. `make` makes the
    /// decisions not made yet that are not suppressed (suppression reads only a decision's
    /// detector, key and event time).
    pub fn apply_pending<'d>(
        &mut self,
        decisions: Vec<Pending<'d>>,
        mut make: impl FnMut(Pending<'d>) -> Decision,
        suppressed: &mut BTreeMap<String, u64>,
    ) -> Vec<Decision> {
        let mut out = Vec::with_capacity(decisions.len());
        for p in decisions {
            let Some(policy) = self.policies.get(p.detector_id()).copied() else {
                out.push(make(p));
                continue;
            };
            let Some(t) = p.event_time() else {
                out.push(make(p));
                continue;
            };
            let g = self
                .stored
                .detectors
                .entry(p.detector_id().to_string())
                .or_default();
            let since = g.quiet_since.get(p.key()).copied().unwrap_or(i64::MIN);
            if since <= t && g.quiet_until.get(p.key()).is_some_and(|until| *until > t) {
                *suppressed.entry(p.detector_id().to_string()).or_default() += 1;
                *self.suppressed.entry(p.detector_id().to_string()).or_default() += 1;
                continue;
            }
            let mut d = make(p);
            let quiet = match d.verdict {
                Verdict::Block | Verdict::Review => d.expires_at.as_deref().and_then(parse_rfc3339_micros),
                Verdict::Alert => (policy.dedup_for > 0).then(|| t.saturating_add(policy.dedup_for)),
                Verdict::Revoke => None,
            };
            let enforcing = d.mode == Mode::Enforce && matches!(d.verdict, Verdict::Block | Verdict::Review);
            if enforcing && g.tripped.as_ref().is_some_and(|t| !t.disabled) {
                d.mode = Mode::Shadow;
                d.tags.push(FAIL_SAFE_TAG.into());
            } else if enforcing && let BlastRadius::Limit { per_minute, .. } = policy.blast {
                let mut active = self.active.count();
                let mut remote = None;
                if let Some(group) = &mut self.group {
                    active = group_active(&self.active, group, t);
                    remote = Some(group.remote.entry(d.detector.id.clone()).or_default());
                }
                if let Some(over) = g.over_limit(policy.blast, &d.key, t, active, remote) {
                    out.extend(trip_told(&self.pipeline, g, self.group.as_mut(), &d, t, &over));
                    out.extend(g.shadow_held());
                    d.mode = Mode::Shadow;
                    d.tags.push(FAIL_SAFE_TAG.into());
                } else if let Some(group) = &mut self.group {
                    g.deal(per_minute, group.share_of(per_minute));
                    out.extend(g.release(&mut group.outbox));
                    if g.past_share(&d.key, t) {
                        // Held until the group has share to spare, or the fail-safe trips.
                        if let Some(until) = quiet {
                            g.quiet(&d.key, t, until);
                        }
                        let detector = d.detector.id.clone();
                        g.escrow.as_mut().expect("dealt").held.push_back(d);
                        g.ask(&detector, &mut group.outbox);
                        out.extend(settle(&self.pipeline, &detector, g, group, &self.active));
                        continue;
                    }
                    group.outbox.extend(g.count_block(&d, t));
                } else {
                    g.count_block(&d, t);
                }
            }
            if let Some(until) = quiet {
                g.quiet(&d.key, t, until);
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
                // (A block held for the group's share is lifted before it goes out.)
                if let Some(e) = &mut g.escrow {
                    e.held.retain(|d| d.actor != actor);
                }
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

    /// Re-arms a detector the fail-safe put in shadow or disabled. Returns the trip it clears,
    /// or `None` when the detector was neither.
    pub fn rearm(&mut self, detector: &str) -> Option<Trip> {
        if let Some(group) = &mut self.group {
            group.remote.remove(detector);
        }
        let g = self.stored.detectors.get_mut(detector)?;
        g.recent.clear();
        g.tripped.take()
    }

    /// Disables `detector` (it is not run until re-armed) for taking `took` on a batch, over
    /// `limit`; `batch_time` is the batch's newest event time (µs). Returns the alert to
    /// publish, or `None` if it was disabled already.
    pub fn disable(
        &mut self,
        detector: &CompiledDetector,
        took: std::time::Duration,
        limit: std::time::Duration,
        batch_time: i64,
        processed_at: &str,
    ) -> Option<Decision> {
        let g = self.stored.detectors.entry(detector.meta.id.clone()).or_default();
        if g.tripped.as_ref().is_some_and(|t| t.disabled) {
            return None;
        }
        let id = &detector.meta.id;
        let reason = format!(
            "time budget: detector `{id}` took {:.1} s on one batch (limit: {}, [detectors] \
             max_batch_time); it is disabled, not run on later batches, until an operator re-arms it",
            took.as_secs_f64(),
            humantime::format_duration(limit)
        );
        tracing::error!(detector = %id, took_ms = took.as_millis() as u64, "{reason}");
        let at = format_micros(batch_time);
        g.tripped = Some(Trip {
            at: at.clone(),
            reason: reason.clone(),
            disabled: true,
        });
        let mut evidence = Map::new();
        evidence.insert("took_ms".into(), (took.as_millis() as u64).into());
        evidence.insert("limit_ms".into(), (limit.as_millis() as u64).into());
        Some(Decision {
            schema_version: DECISION_SCHEMA_VERSION,
            decision_id: DecisionId::new()
                .part(&self.pipeline)
                .part("disabled")
                .part(id)
                .part(&detector.version)
                .part(batch_time.to_le_bytes())
                .finish(),
            pipeline: self.pipeline.clone(),
            detector: DetectorRef {
                id: id.clone(),
                version: detector.version.clone(),
            },
            verdict: Verdict::Alert,
            mode: Mode::Enforce,
            severity: Severity::High,
            actor: "*".into(),
            key: id.clone(),
            actions: vec!["*".into()],
            reason,
            evidence,
            event_time: at,
            processed_at: processed_at.to_string(),
            expires_at: None,
            source: SourcePosition::File {
                file: "rampart".into(),
                line: 1,
            },
            guidance: Some(format!(
                "Make the detector cheaper (`rampart check --explain` shows its plan), then re-arm it: \
                 POST /admin/rearm?detector={id}"
            )),
            tags: vec![FAIL_SAFE_TAG.into(), DISABLED_TAG.into()],
        })
    }

    /// Whether `detector` is disabled for its time (not run).
    pub fn is_disabled(&self, detector: &str) -> bool {
        self.stored
            .detectors
            .get(detector)
            .and_then(|g| g.tripped.as_ref())
            .is_some_and(|t| t.disabled)
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

/// The actors active in the minute of `t` or the one before, here and (a group's state
/// partitions hold distinct actors) in the rest of the group.
fn group_active(active: &ActiveActors, group: &GroupView, t: i64) -> usize {
    let minute = t.div_euclid(MINUTE);
    active.count()
        + group
            .active
            .values()
            .filter(|(m, _)| *m >= minute.saturating_sub(1))
            .map(|(_, c)| c)
            .sum::<usize>()
}

/// Trips `g`'s fail-safe on `d` (at `t`): the alert and the revocations of the minute's blocks;
/// in a group, the others are told, and the alert comes from the state partition that speaks
/// for the detector.
fn trip_told(
    pipeline: &str,
    g: &mut DetectorGuard,
    group: Option<&mut GroupView>,
    d: &Decision,
    t: i64,
    over: &OverLimit,
) -> Vec<Decision> {
    let mut decided = g.trip(pipeline, d, t, over);
    if let Some(group) = group {
        let alert = decided.remove(0);
        let speaks = group.speaks_for.contains(&d.detector.id);
        group.outbox.push(GuardNote::Tripped {
            detector: d.detector.clone(),
            time: t,
            trip: g.tripped.clone().expect("just tripped"),
            source: d.source.clone(),
            alert: (!speaks).then(|| Box::new(alert.clone())),
        });
        if speaks {
            decided.insert(0, alert);
        }
    }
    decided
}

/// Scale-out: after an answer (or an Ask nobody is there to answer), releases what `g`'s share
/// allows; when the round is over with blocks still held, asks again if it was given some, and
/// otherwise trips: every other state partition is at its share, so the first held block
/// passes the group's limit.
fn settle(
    pipeline: &str,
    detector: &str,
    g: &mut DetectorGuard,
    group: &mut GroupView,
    actors: &ActiveActors,
) -> Vec<Decision> {
    let mut out = g.release(&mut group.outbox);
    let peers = group.partitions.saturating_sub(1);
    let (limit, first, given) = {
        let Some(e) = &mut g.escrow else {
            return out;
        };
        if !e.asking || e.answered.len() < peers {
            return out;
        }
        e.asking = false;
        let Some(first) = e.held.front().cloned() else {
            return out;
        };
        (e.limit, first, e.given)
    };
    if given > 0 {
        g.ask(detector, &mut group.outbox);
        return out;
    }
    let t = parse_rfc3339_micros(&first.event_time).unwrap_or(i64::MIN);
    let mut keys: HashSet<String> = g.blocked_keys(t).into_iter().map(str::to_string).collect();
    if let Some(e) = &g.escrow {
        keys.extend(e.held.iter().map(|d| d.key.clone()));
    }
    if let Some(remote) = group.remote.get(detector) {
        keys.extend(
            remote
                .iter()
                .filter(|(time, _)| *time > t - MINUTE)
                .map(|(_, k)| k.clone()),
        );
    }
    let over = OverLimit {
        blocked: keys.len(),
        active: group_active(actors, group, t),
        per_minute: limit,
        share: None,
        limit: format!("{limit} per minute"),
    };
    out.extend(trip_told(pipeline, g, Some(group), &first, t, &over));
    out.extend(g.shadow_held());
    out
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rampart_core::time::format_micros;

    use super::*;

    const SECOND: i64 = 1_000_000;

    fn guard(blast: BlastRadius) -> Guard {
        Guard::with_policies("p", [("d".to_string(), Duration::from_secs(600), blast)])
    }

    fn decision(verdict: Verdict, key: &str, t: i64) -> Decision {
        Decision {
            schema_version: DECISION_SCHEMA_VERSION,
            decision_id: format!("{key}@{t}"),
            pipeline: "p".into(),
            detector: DetectorRef {
                id: "d".into(),
                version: "v1".into(),
            },
            verdict,
            mode: Mode::Enforce,
            severity: Severity::High,
            actor: key.into(),
            key: key.into(),
            actions: vec!["*".into()],
            reason: "r".into(),
            evidence: Map::new(),
            event_time: format_micros(t),
            processed_at: format_micros(0),
            expires_at: (verdict == Verdict::Block).then(|| format_micros(t + 3600 * SECOND)),
            source: SourcePosition::File {
                file: Arc::from("f"),
                line: 1,
            },
            guidance: None,
            tags: Vec::new(),
        }
    }

    fn apply(g: &mut Guard, decisions: Vec<Decision>) -> (Vec<Decision>, u64) {
        let mut suppressed = BTreeMap::new();
        let out = g.apply(decisions, &mut suppressed);
        (out, suppressed.get("d").copied().unwrap_or(0))
    }

    #[test]
    fn repeats_are_suppressed_for_their_period_and_an_older_event_is_not_a_repeat() {
        let mut g = guard(BlastRadius::Off);
        let t = 1_000 * SECOND;
        let (out, n) = apply(
            &mut g,
            vec![
                decision(Verdict::Alert, "a", t),
                decision(Verdict::Alert, "a", t + 599 * SECOND),
                decision(Verdict::Alert, "b", t + SECOND),
                // From a partition read behind: older than the alert that suppresses `a`.
                decision(Verdict::Alert, "a", t - SECOND),
            ],
        );
        assert_eq!(n, 1, "one repeat within the 10 minutes");
        let keys: Vec<&str> = out.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "a"]);
        let (out, n) = apply(&mut g, vec![decision(Verdict::Alert, "a", t + 600 * SECOND)]);
        assert_eq!((out.len(), n), (1, 0), "the period has passed");
    }

    #[test]
    fn a_block_suppresses_repeats_until_it_expires_and_a_revocation_lifts_that() {
        let mut g = guard(BlastRadius::Off);
        let t = 5_000 * SECOND;
        let (out, n) = apply(
            &mut g,
            vec![
                decision(Verdict::Block, "a", t),
                decision(Verdict::Block, "a", t + 3599 * SECOND),
            ],
        );
        assert_eq!((out.len(), n), (1, 1));
        let revocation = g.revoke("a", Some("d"), "false positive", t + 10 * SECOND);
        assert_eq!(revocation.verdict, Verdict::Revoke);
        let (out, n) = apply(&mut g, vec![decision(Verdict::Block, "a", t + 20 * SECOND)]);
        assert_eq!((out.len(), n), (1, 0), "blocked again after the revocation");
        assert_eq!(g.suppressed()["d"], 1);
    }

    #[test]
    fn blocking_too_many_keys_in_a_minute_trips_the_fail_safe_until_re_armed() {
        let limit = BlastRadius::Limit {
            per_minute: 3,
            share: None,
            min_keys: 0,
        };
        let mut g = guard(limit);
        let t = 60_000 * SECOND;
        let blocks = (0..4)
            .map(|i| decision(Verdict::Block, &format!("k{i}"), t + i * SECOND))
            .collect();
        let (out, _) = apply(&mut g, blocks);
        let enforced: Vec<&str> = out
            .iter()
            .filter(|d| d.verdict == Verdict::Block && d.mode == Mode::Enforce)
            .map(|d| d.key.as_str())
            .collect();
        assert_eq!(enforced, ["k0", "k1", "k2"], "the fourth passes the limit");
        let alert = out
            .iter()
            .find(|d| d.verdict == Verdict::Alert)
            .expect("the fail-safe's alert");
        assert_eq!(alert.tags, [FAIL_SAFE_TAG]);
        assert_eq!(alert.evidence["blocked_keys"], 4);
        let revoked: Vec<&str> = out
            .iter()
            .filter(|d| d.verdict == Verdict::Revoke)
            .map(|d| d.key.as_str())
            .collect();
        assert_eq!(revoked, ["k0", "k1", "k2"], "the minute's blocks are revoked");
        let fourth = out.last().expect("the fourth block");
        assert_eq!((fourth.key.as_str(), fourth.mode), ("k3", Mode::Shadow));
        assert_eq!(g.tripped().len(), 1);

        let (out, _) = apply(&mut g, vec![decision(Verdict::Block, "k9", t + 120 * SECOND)]);
        assert_eq!(out[0].mode, Mode::Shadow, "in shadow until re-armed");
        assert!(g.rearm("d").is_some());
        assert!(g.rearm("d").is_none(), "re-armed once");
        let (out, _) = apply(&mut g, vec![decision(Verdict::Block, "k8", t + 180 * SECOND)]);
        assert_eq!(out[0].mode, Mode::Enforce);
    }

    #[test]
    fn the_guard_state_survives_a_snapshot_and_restore() {
        let mut g = guard(BlastRadius::Off);
        let t = 9_000 * SECOND;
        apply(&mut g, vec![decision(Verdict::Alert, "a", t)]);
        let snapshot = g.snapshot();
        let mut restored = guard(BlastRadius::Off);
        restored.restore(&snapshot).expect("restores");
        let (out, n) = apply(&mut restored, vec![decision(Verdict::Alert, "a", t + SECOND)]);
        assert_eq!((out.len(), n), (0, 1), "still a repeat after the restart");
    }

    /// Delivers every note `from` has to `to` (through JSON, as the repartition topic carries
    /// them); returns what `to` publishes.
    fn tell(from: &mut Guard, name: &str, to: &mut Guard) -> Vec<Decision> {
        let mut out = Vec::new();
        for note in from.take_notes() {
            let wire: GuardNote =
                serde_json::from_slice(&serde_json::to_vec(&note).expect("json")).expect("json");
            out.extend(to.note(name, wire));
        }
        out
    }

    /// Two state partitions of one route under `limit`: `a` (index 0) speaks for detector
    /// `d`, `b` (index 1) does not.
    fn group_of_two(limit: BlastRadius) -> (Guard, Guard) {
        let (mut a, mut b) = (guard(limit), guard(limit));
        a.join_group(["d".to_string()], "a", 0, 2);
        b.join_group([], "b", 1, 2);
        (a, b)
    }

    #[test]
    fn a_groups_state_partitions_hold_one_limit_and_trip_once() {
        let limit = BlastRadius::Limit {
            per_minute: 3,
            share: None,
            min_keys: 0,
        };
        // Two state partitions of one route: `a` speaks for the detector, `b` does not. The
        // limit of 3 is dealt as shares of 2 and 1.
        let (mut a, mut b) = group_of_two(limit);
        let t = 60_000 * SECOND;
        let (out, _) = apply(
            &mut a,
            vec![
                decision(Verdict::Block, "k0", t),
                decision(Verdict::Block, "k1", t + SECOND),
            ],
        );
        assert!(out.iter().all(|d| d.mode == Mode::Enforce));
        assert!(tell(&mut a, "a", &mut b).is_empty());
        // `b` blocks the third key of the group's minute; the fourth is past its share: held,
        // and `a` asked.
        let (out, _) = apply(&mut b, vec![decision(Verdict::Block, "k2", t + 2 * SECOND)]);
        assert_eq!(out[0].mode, Mode::Enforce);
        let (out, _) = apply(&mut b, vec![decision(Verdict::Block, "k3", t + 3 * SECOND)]);
        assert!(out.is_empty(), "held: {out:?}");
        assert!(tell(&mut b, "b", &mut a).is_empty());
        // `a` has nothing to spare: the fourth passes the group's limit, and `b` trips.
        let out = tell(&mut a, "a", &mut b);
        assert!(
            out.iter().all(|d| d.verdict != Verdict::Alert),
            "the alert is the speaking partition's: {out:?}"
        );
        let revoked: Vec<&str> = out
            .iter()
            .filter(|d| d.verdict == Verdict::Revoke)
            .map(|d| d.key.as_str())
            .collect();
        assert_eq!(revoked, ["k2"], "b revokes its own blocks of the minute");
        assert_eq!(
            out.last().map(|d| (d.key.as_str(), d.mode)),
            Some(("k3", Mode::Shadow))
        );
        // `a` hears of the trip: its blocks of the minute are revoked, the one alert comes from
        // it, and it is in shadow too.
        let published = tell(&mut b, "b", &mut a);
        let alerts: Vec<&Decision> = published.iter().filter(|d| d.verdict == Verdict::Alert).collect();
        assert_eq!(alerts.len(), 1, "{published:?}");
        assert_eq!(alerts[0].evidence["blocked_keys"], 4);
        assert_eq!(alerts[0].tags, [FAIL_SAFE_TAG]);
        let mut revoked: Vec<&str> = published
            .iter()
            .filter(|d| d.verdict == Verdict::Revoke)
            .map(|d| d.key.as_str())
            .collect();
        revoked.sort_unstable();
        assert_eq!(revoked, ["k0", "k1"]);
        let (out, _) = apply(&mut a, vec![decision(Verdict::Block, "k4", t + 4 * SECOND)]);
        assert_eq!(out[0].mode, Mode::Shadow, "in shadow across the group");
        // Told again (a note read twice after a restart): nothing more.
        assert!(tell(&mut b, "b", &mut a).is_empty());
        assert!(a.rearm("d").is_some() && b.rearm("d").is_some());
        let (out, _) = apply(&mut a, vec![decision(Verdict::Block, "k5", t + 200 * SECOND)]);
        assert_eq!(out[0].mode, Mode::Enforce, "re-armed in every state partition");
    }

    #[test]
    fn a_block_past_its_share_waits_for_the_groups_spare_share_and_never_passes_the_limit() {
        let limit = BlastRadius::Limit {
            per_minute: 4,
            share: None,
            min_keys: 0,
        };
        // Shares of 2 and 2.
        let (mut a, mut b) = group_of_two(limit);
        let t = 60_000 * SECOND;
        let keys = |out: &[Decision], verdict: Verdict, mode: Mode| -> Vec<String> {
            out.iter()
                .filter(|d| d.verdict == verdict && d.mode == mode)
                .map(|d| d.key.clone())
                .collect()
        };
        let (out, _) = apply(
            &mut a,
            (0..3)
                .map(|i| decision(Verdict::Block, &format!("k{i}"), t + i * SECOND))
                .collect(),
        );
        assert_eq!(
            keys(&out, Verdict::Block, Mode::Enforce),
            ["k0", "k1"],
            "k2 is held"
        );
        // A repeat of a key blocked within the minute does not wait (it is suppressed).
        let (out, n) = apply(&mut a, vec![decision(Verdict::Block, "k1", t + 3 * SECOND)]);
        assert_eq!((out.len(), n), (0, 1));
        for note in a.take_notes() {
            if matches!(note, GuardNote::Blocked { .. }) {
                assert!(b.note("a", note).is_empty());
            }
        }
        // The held block survives a checkpoint, and its Ask is sent again.
        let mut restored = guard(limit);
        restored.join_group(["d".to_string()], "a", 0, 2);
        restored.restore(&a.snapshot()).expect("restores");
        let mut a = restored;
        // `b` reads the Ask twice (after a restart of its own): it gives once.
        let asks = a.take_notes();
        assert!(
            matches!(asks.as_slice(), [GuardNote::Ask { need: 1, .. }]),
            "{asks:?}"
        );
        for note in asks.iter().chain(&asks) {
            assert!(b.note("a", note.clone()).is_empty());
        }
        let gives = b.take_notes();
        assert_eq!(gives.len(), 2);
        let mut released = Vec::new();
        for note in gives {
            released.extend(a.note("b", note));
        }
        assert_eq!(keys(&released, Verdict::Block, Mode::Enforce), ["k2"]);
        assert_eq!(released.len(), 1);
        // `b` gave one of its two: it blocks one key at once, then holds.
        let (out, _) = apply(
            &mut b,
            vec![
                decision(Verdict::Block, "k3", t + 4 * SECOND),
                decision(Verdict::Block, "k4", t + 5 * SECOND),
            ],
        );
        assert_eq!(keys(&out, Verdict::Block, Mode::Enforce), ["k3"]);
        assert_eq!(out.len(), 1, "k4 held: {out:?}");
        // `a` holds three of its share of three: nothing to give; `b` trips with four blocked,
        // the limit, never five.
        assert!(tell(&mut b, "b", &mut a).is_empty());
        let out = tell(&mut a, "a", &mut b);
        assert_eq!(keys(&out, Verdict::Revoke, Mode::Enforce), ["k3"]);
        assert_eq!(keys(&out, Verdict::Block, Mode::Shadow), ["k4"]);
        let out = tell(&mut b, "b", &mut a);
        let alert = out.iter().find(|d| d.verdict == Verdict::Alert).expect("alert");
        assert_eq!(alert.evidence["blocked_keys"], 5);
        let mut revoked = keys(&out, Verdict::Revoke, Mode::Enforce);
        revoked.sort_unstable();
        assert_eq!(revoked, ["k0", "k1", "k2"]);
        // Minutes later it is still in shadow: tripped until re-armed.
        let (out, _) = apply(&mut b, vec![decision(Verdict::Block, "k9", t + 200 * SECOND)]);
        assert_eq!(out[0].mode, Mode::Shadow, "tripped until re-armed");
    }

    #[test]
    fn an_operators_revocation_lifts_a_held_block_before_it_goes_out() {
        let limit = BlastRadius::Limit {
            per_minute: 2,
            share: None,
            min_keys: 0,
        };
        let (mut a, mut b) = group_of_two(limit);
        let t = 60_000 * SECOND;
        let (out, _) = apply(
            &mut a,
            vec![
                decision(Verdict::Block, "k0", t),
                decision(Verdict::Block, "k1", t + SECOND),
            ],
        );
        assert_eq!(out.len(), 1, "k1 held: {out:?}");
        a.revoke("k1", Some("d"), "false positive", t + 2 * SECOND);
        assert!(tell(&mut a, "a", &mut b).is_empty());
        assert!(
            tell(&mut b, "b", &mut a).is_empty(),
            "b gave, but k1 is no longer held"
        );
        let (out, _) = apply(&mut a, vec![decision(Verdict::Block, "k1", t + 3 * SECOND)]);
        assert_eq!(
            out.iter().map(|d| (d.key.as_str(), d.mode)).collect::<Vec<_>>(),
            [("k1", Mode::Enforce)],
            "blocked again after the revocation, within the share given"
        );
    }

    /// Delivers every note of every guard to every other, until none has more to tell;
    /// returns what each published.
    fn exchange(guards: &mut [Guard]) -> Vec<Vec<Decision>> {
        let mut out = vec![Vec::new(); guards.len()];
        loop {
            let notes: Vec<Vec<GuardNote>> = guards.iter_mut().map(Guard::take_notes).collect();
            if notes.iter().all(Vec::is_empty) {
                return out;
            }
            for (from, notes) in notes.into_iter().enumerate() {
                for note in notes {
                    for (to, g) in guards.iter_mut().enumerate().filter(|(to, _)| *to != from) {
                        out[to].extend(g.note(&format!("p{from}"), note.clone()));
                    }
                }
            }
        }
    }

    #[test]
    fn a_burst_over_four_state_partitions_blocks_no_more_than_the_limit_and_a_burst_within_it_is_not_held_back()
     {
        for (actors, trips) in [(50, true), (30, false), (29, false)] {
            let limit = BlastRadius::Limit {
                per_minute: 30,
                share: None,
                min_keys: 0,
            };
            let mut guards: Vec<Guard> = (0..4)
                .map(|i| {
                    let mut g = guard(limit);
                    let speaks = (i == 2).then(|| "d".to_string());
                    g.join_group(speaks, &format!("p{i}"), i, 4);
                    g
                })
                .collect();
            let t = 60_000 * SECOND;
            // Unevenly: half the actors on one state partition, the rest spread.
            let mut published: Vec<Decision> = Vec::new();
            let mut batches = vec![Vec::new(); 4];
            for k in 0..actors {
                let at = if k % 2 == 0 { 0 } else { 1 + (k as usize / 2) % 3 };
                batches[at].push(decision(Verdict::Block, &format!("k{k}"), t + k * 1000));
            }
            for (g, batch) in guards.iter_mut().zip(batches) {
                published.extend(apply(g, batch).0);
            }
            published.extend(exchange(&mut guards).into_iter().flatten());
            let enforced: BTreeSet<&str> = published
                .iter()
                .filter(|d| d.verdict == Verdict::Block && d.mode == Mode::Enforce)
                .map(|d| d.key.as_str())
                .collect();
            let alerts = published.iter().filter(|d| d.verdict == Verdict::Alert).count();
            let shadow = published
                .iter()
                .filter(|d| d.verdict == Verdict::Block && d.mode == Mode::Shadow)
                .count();
            assert!(enforced.len() <= 30, "{actors}: {} enforced", enforced.len());
            if trips {
                assert_eq!(alerts, 1, "{actors}: {published:?}");
                assert_eq!(
                    enforced.len() + shadow,
                    actors as usize,
                    "{actors}: every block published"
                );
                let revoked = published.iter().filter(|d| d.verdict == Verdict::Revoke).count();
                assert_eq!(revoked, enforced.len(), "{actors}: every enforced block revoked");
            } else {
                assert_eq!((alerts, shadow), (0, 0), "{actors}: {published:?}");
                assert_eq!(enforced.len(), actors as usize, "{actors}: every block enforced");
            }
        }
    }

    #[test]
    fn a_group_shares_its_active_actors_for_a_share_limit() {
        // At most half the active actors within a minute, from two keys on.
        let limit = BlastRadius::Limit {
            per_minute: 1000,
            share: Some(0.5),
            min_keys: 2,
        };
        let (mut a, mut b) = group_of_two(limit);
        let t = 60_000 * SECOND;
        // `b` saw ten actors this minute; `a` two. Alone, `a`'s two blocks would be all of its
        // actors; with the group's twelve they are a sixth.
        b.observe(&actors(&(0..10).map(|i| format!("b{i}")).collect::<Vec<_>>(), t));
        a.observe(&actors(&["k0".to_string(), "k1".to_string()], t));
        assert!(tell(&mut b, "b", &mut a).is_empty());
        let (out, _) = apply(
            &mut a,
            vec![
                decision(Verdict::Block, "k0", t),
                decision(Verdict::Block, "k1", t + SECOND),
            ],
        );
        assert!(
            out.iter()
                .all(|d| d.mode == Mode::Enforce && d.verdict == Verdict::Block),
            "{out:?}"
        );
    }

    /// A batch of one event per actor at `t` (the event time and actor columns only).
    fn actors(names: &[String], t: i64) -> EventBatch {
        use datafusion::arrow::array::{StringArray, TimestampMicrosecondArray};
        use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
        use datafusion::arrow::record_batch::RecordBatch;
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("actor", DataType::Utf8, false),
        ]));
        let times = TimestampMicrosecondArray::from(vec![t; names.len()]);
        let actors = StringArray::from_iter_values(names);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(times), Arc::new(actors)]).expect("batch");
        EventBatch {
            batch,
            positions: Vec::new(),
            first_row: 0,
        }
    }
}
