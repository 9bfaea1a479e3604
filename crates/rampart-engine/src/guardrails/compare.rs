//! Shadow against enforce: what each shadow detector would have done, set beside what the
//! enforcing detectors did on the same input (`rampart replay --compare`, `rampart compare`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use rampart_core::time::{format_micros, parse_rfc3339_micros};
use rampart_core::{Decision, Mode, Verdict};

/// One actor's decisions from one detector.
#[derive(Debug, Clone, Copy)]
struct Seen {
    first: i64,
    last: i64,
    count: u64,
}

/// One detector's decisions, by mode.
#[derive(Debug, Default)]
struct Side {
    verdicts: BTreeSet<Verdict>,
    /// Actors the detector blocked or held (block, review), per mode.
    actors: BTreeMap<Mode, BTreeMap<String, Seen>>,
    /// Alerts, per mode.
    alerts: BTreeMap<Mode, u64>,
}

/// Accumulates decisions, then reports shadow against enforce per detector.
#[derive(Debug, Default)]
pub struct Comparison {
    detectors: BTreeMap<String, Side>,
}

impl Comparison {
    /// Counts one decision (revocations are not counted).
    pub fn add(&mut self, d: &Decision) {
        if d.verdict == Verdict::Revoke {
            return;
        }
        let t = parse_rfc3339_micros(&d.event_time).unwrap_or_default();
        let side = self.detectors.entry(d.detector.id.clone()).or_default();
        side.verdicts.insert(d.verdict);
        if d.verdict == Verdict::Alert {
            *side.alerts.entry(d.mode).or_default() += 1;
            return;
        }
        side.actors
            .entry(d.mode)
            .or_default()
            .entry(d.actor.clone())
            .and_modify(|s| {
                s.first = s.first.min(t);
                s.last = s.last.max(t);
                s.count += 1;
            })
            .or_insert(Seen {
                first: t,
                last: t,
                count: 1,
            });
    }

    /// Actors blocked or held in enforce mode, by any detector, with the detectors.
    fn enforced(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (id, side) in &self.detectors {
            for actor in side
                .actors
                .get(&Mode::Enforce)
                .into_iter()
                .flat_map(BTreeMap::keys)
            {
                out.entry(actor).or_default().push(id);
            }
        }
        out
    }

    /// The report, as text: per detector with shadow decisions, the actors it would have
    /// blocked, how many of them enforcing detectors did block (and which), the rest, and the
    /// first and last times; then a line per enforcing detector.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let enforced = self.enforced();
        let shadow: Vec<_> = self
            .detectors
            .iter()
            .filter(|(_, s)| s.actors.contains_key(&Mode::Shadow) || s.alerts.contains_key(&Mode::Shadow))
            .collect();
        let _ = writeln!(out, "== shadow against enforce ==");
        if shadow.is_empty() {
            let _ = writeln!(out, "no shadow decisions in this input");
        }
        for (id, side) in shadow {
            let verdicts: Vec<String> = side.verdicts.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "shadow `{id}` ({}):", verdicts.join(", "));
            if let Some(alerts) = side.alerts.get(&Mode::Shadow) {
                let _ = writeln!(out, "  would have alerted {alerts} time(s)");
            }
            let Some(actors) = side.actors.get(&Mode::Shadow) else {
                continue;
            };
            let decisions: u64 = actors.values().map(|s| s.count).sum();
            let (first, last) = span(actors);
            let _ = writeln!(
                out,
                "  would have blocked or held {} actor(s) ({decisions} decision(s)), {} .. {}",
                actors.len(),
                format_micros(first),
                format_micros(last)
            );
            let (both, only): (Vec<_>, Vec<_>) = actors
                .iter()
                .partition(|(a, _)| enforced.contains_key(a.as_str()));
            let mut by_detector: BTreeMap<&str, usize> = BTreeMap::new();
            for (actor, _) in &both {
                for d in &enforced[actor.as_str()] {
                    *by_detector.entry(d).or_default() += 1;
                }
            }
            let overlap: Vec<String> = by_detector.iter().map(|(d, n)| format!("{d} {n}")).collect();
            let _ = writeln!(
                out,
                "  also enforced on: {} actor(s){}",
                both.len(),
                if overlap.is_empty() {
                    String::new()
                } else {
                    format!(" (by {})", overlap.join(", "))
                }
            );
            let _ = writeln!(out, "  only in shadow:   {} actor(s)", only.len());
            for (actor, s) in only.iter().take(10) {
                let _ = writeln!(
                    out,
                    "    {actor}  {} decision(s), {} .. {}",
                    s.count,
                    format_micros(s.first),
                    format_micros(s.last)
                );
            }
            if only.len() > 10 {
                let _ = writeln!(out, "    ... and {} more", only.len() - 10);
            }
        }
        let enforcing: Vec<_> = self
            .detectors
            .iter()
            .filter_map(|(id, s)| s.actors.get(&Mode::Enforce).map(|a| (id, a)))
            .collect();
        if !enforcing.is_empty() {
            let _ = writeln!(out, "enforced (block, review):");
            for (id, actors) in enforcing {
                let (first, last) = span(actors);
                let _ = writeln!(
                    out,
                    "  {id:<44} {} actor(s), {} .. {}",
                    actors.len(),
                    format_micros(first),
                    format_micros(last)
                );
            }
        }
        out
    }
}

/// The first and last times over `actors`.
fn span(actors: &BTreeMap<String, Seen>) -> (i64, i64) {
    let first = actors.values().map(|s| s.first).min().unwrap_or_default();
    let last = actors.values().map(|s| s.last).max().unwrap_or_default();
    (first, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(detector: &str, mode: Mode, verdict: Verdict, actor: &str, time: &str) -> Decision {
        serde_json::from_value(serde_json::json!({
            "schema_version": 1, "decision_id": "0", "pipeline": "p",
            "detector": {"id": detector, "version": "v"}, "verdict": verdict, "mode": mode,
            "severity": "high", "actor": actor, "key": actor, "actions": ["a"], "reason": "r",
            "evidence": {}, "event_time": time, "processed_at": time,
            "source": {"file": "f", "line": 1}, "tags": []
        }))
        .expect("a decision")
    }

    #[test]
    fn shadow_actors_are_split_by_what_enforce_did() {
        let mut c = Comparison::default();
        let t1 = "2024-07-31T10:00:00Z";
        let t2 = "2024-07-31T11:00:00Z";
        c.add(&decision("new", Mode::Shadow, Verdict::Block, "alice", t1));
        c.add(&decision("new", Mode::Shadow, Verdict::Block, "alice", t2));
        c.add(&decision("new", Mode::Shadow, Verdict::Block, "bob", t2));
        c.add(&decision("old", Mode::Enforce, Verdict::Block, "alice", t1));
        c.add(&decision("old", Mode::Enforce, Verdict::Block, "carol", t1));
        let report = c.report();
        assert!(report.contains("shadow `new` (block):"), "{report}");
        assert!(
            report.contains("would have blocked or held 2 actor(s) (3 decision(s)), 2024-07-31T10:00:00Z .. 2024-07-31T11:00:00Z"),
            "{report}"
        );
        assert!(
            report.contains("also enforced on: 1 actor(s) (by old 1)"),
            "{report}"
        );
        assert!(
            report.contains("only in shadow:   1 actor(s)\n    bob  1 decision(s)"),
            "{report}"
        );
        assert!(report.contains("old"), "{report}");
    }
}
