//! Unit tests of one window's keyed state on its own: rows added batch by batch, decided by
//! the bounds the test sets (no pipeline clock), written to and read back from a store.

use std::path::Path;

use rampart_core::Decision;
use rampart_sql::{StateKind, Timing, WindowedDetector};
use rampart_state::StateStore;
use rampart_state::codec::row_key;

use super::{Bounds, DecideContext, KeyedState, Saving, SharedTag};
use crate::decide::triggers::TriggerStore;
use crate::input::decode::{Decoded, EventBatch};
use crate::pipeline::Pipeline;

/// 2026-01-01T00:00:00Z in µs.
const T0: i64 = 1_767_225_600_000_000;
const MINUTE: i64 = 60_000_000;
/// The allowed lateness the states are given (µs).
const LATENESS: i64 = MINUTE;

/// Failed logins per actor over ten minutes: exactly three (decided after the lateness: the
/// count may still rise), or at least three (decided at once).
const EXACTLY_THREE: &str = "-- id: exactly-three\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}}\n\
    SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time \
    RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n FROM events \
    WHERE outcome = 'Failure') WHERE n = 3\n";
const AT_LEAST_THREE: &str = "-- id: at-least-three\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}}\n\
    SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time \
    RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n FROM events \
    WHERE outcome = 'Failure') WHERE n >= 3\n";
/// A window over a window: no incremental form, its rows are re-run.
const NESTED: &str = "-- id: nested\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}}\n\
    SELECT actor, m FROM (SELECT actor, max(n) OVER (PARTITION BY actor ORDER BY event_time \
    RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW) AS m FROM (SELECT actor, \
    event_time, count(*) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN \
    INTERVAL '2 minutes' PRECEDING AND CURRENT ROW) AS n FROM events WHERE outcome = 'Failure')) \
    WHERE m >= 3\n";

/// One detector's window state over its own store, fed and decided by hand.
struct Window {
    pipeline: Pipeline,
    store: StateStore,
    triggers: TriggerStore,
    state: KeyedState,
}

impl Window {
    /// A pipeline of the one detector `sql` over a simple event shape, and its state.
    fn new(dir: &Path, sql: &str) -> Self {
        std::fs::create_dir_all(dir.join("detectors")).expect("mkdir");
        std::fs::write(
            dir.join("pipeline.toml"),
            "name = \"keyed\"\n[mapping]\nevent_time = \"t\"\nactor = \"a\"\naction = \"x\"\n\
             origin = \"ip\"\noutcome = \"o\"\n",
        )
        .expect("write");
        std::fs::write(dir.join("detectors/detector.sql"), sql).expect("write");
        let pipeline = Pipeline::load(dir).expect("loads");
        assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
        let window = pipeline.detectors[0].windowed().expect("a windowed detector");
        let identity = window.split.rows_identity();
        let shared = identity.map(|i| SharedTag::choose(None, &i, 0, &[window]).expect("a tag"));
        let state = KeyedState::new(&[window], shared.as_ref(), LATENESS).expect("state");
        Self {
            pipeline,
            store: StateStore::temporary().expect("store"),
            triggers: TriggerStore::default(),
            state,
        }
    }

    fn detector(&self) -> WindowedDetector<'_> {
        self.pipeline.detectors[0].windowed().expect("windowed")
    }

    /// A batch of events, each `(actor, minutes after T0, outcome)`, numbered by the pipeline.
    fn batch(&self, events: &[(&str, i64, &str)]) -> EventBatch {
        let text: String = events
            .iter()
            .map(|(actor, minutes, outcome)| {
                let t = rampart_core::time::format_micros(T0 + minutes * MINUTE);
                format!("{{\"t\":\"{t}\",\"a\":\"{actor}\",\"x\":\"Login\",\"ip\":\"10.0.0.1\",\"o\":\"{outcome}\"}}\n")
            })
            .collect();
        let mut batches = Vec::new();
        let mut decoder = self.pipeline.decoder();
        let mut emit = |d: Decoded| match d {
            Decoded::Batch(b) => batches.push(b),
            Decoded::DeadLetter(letter) => panic!("{}", letter.error),
        };
        decoder.decode_text("events", &text, &mut emit).expect("decodes");
        decoder.flush(&mut emit);
        assert_eq!(batches.len(), 1);
        self.pipeline.admit(batches.remove(0)).expect("admitted")
    }

    /// Adds `events` (the watermark before them at `before` minutes), then decides with the
    /// watermark and the complete time at the given minutes after T0.
    fn step(
        &mut self,
        events: &[(&str, i64, &str)],
        before: i64,
        watermark: i64,
        complete: i64,
    ) -> Vec<Decision> {
        let batch = self.batch(events);
        self.triggers.push(&batch);
        let window = self.pipeline.detectors[0].windowed().expect("windowed");
        let pre = self
            .pipeline
            .engine()
            .run_pre(window.split, batch.batch.clone())
            .expect("the part below the window runs");
        let touched = self
            .state
            .add(window.split, &self.store, T0 + before * MINUTE, &pre)
            .expect("rows added");
        let bounds = Self::bounds(watermark, complete);
        self.decide(Some(&batch), bounds, false, touched)
    }

    fn bounds(watermark: i64, complete: i64) -> Bounds {
        Bounds {
            watermark: T0 + watermark * MINUTE,
            complete: T0 + complete * MINUTE,
            lateness: LATENESS,
        }
    }

    fn decide(
        &mut self,
        events: Option<&EventBatch>,
        bounds: Bounds,
        all: bool,
        touched: super::Touched,
    ) -> Vec<Decision> {
        let window = self.pipeline.detectors[0].windowed().expect("windowed");
        let ctx = DecideContext {
            bounds,
            events,
            engine: self.pipeline.engine(),
            store: &self.store,
            triggers: &self.triggers,
        };
        let results = match window.split.kind() {
            StateKind::Sliding => self.state.decide_sliding(&[window], &ctx, all),
            StateKind::Grouped => vec![self.state.decide_grouped(window, &ctx, touched)],
        };
        let mut decided: Vec<(u64, Decision)> = results
            .into_iter()
            .flat_map(|r| r.expect("decided"))
            .map(|(row, p)| {
                (
                    row,
                    p.decision(self.pipeline.decision_maker(), "2026-01-02T00:00:00Z"),
                )
            })
            .collect();
        decided.sort_by_key(|(row, _)| *row);
        decided.into_iter().map(|(_, d)| d).collect()
    }

    /// Only time moves: decides with the watermark and complete time at `minutes`.
    fn tick(&mut self, minutes: i64) -> Vec<Decision> {
        self.decide(None, Self::bounds(minutes, minutes), false, Vec::new())
    }

    /// Writes the changed keys and waiting rows as a checkpoint at `watermark` minutes would,
    /// then empties the cache (every key is read back from the store on its next use). With
    /// [`Saving::Evicted`] (a temporary state), the keys are written as they are evicted.
    fn checkpoint_and_evict(&mut self, watermark: i64, saving: Saving) {
        let bounds = Self::bounds(watermark, watermark);
        let mut commit = self.store.commit(0);
        self.state.checkpoint(bounds, &mut commit, saving);
        match saving {
            Saving::Changed => {
                self.store.write(commit).expect("written");
                self.state.evict(0, None);
            }
            Saving::Evicted => {
                self.state.evict(0, Some((bounds, &mut commit)));
                self.store.write(commit).expect("written");
            }
        }
        assert_eq!(self.state.cached_keys(), 0, "every key was evicted");
    }
}

fn evidence(decisions: &[Decision]) -> Vec<(String, String)> {
    decisions
        .iter()
        .map(|d| (d.actor.clone(), serde_json::to_string(&d.evidence).expect("JSON")))
        .collect()
}

#[test]
fn a_row_waits_for_the_watermark_when_its_count_may_still_change_and_is_decided_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut w = Window::new(tmp.path(), EXACTLY_THREE);
    assert!(
        w.detector().split.incremental().is_some(),
        "count is kept incrementally"
    );
    assert!(matches!(w.detector().split.timing, Timing::AfterLateness(_)));
    let got = w.step(
        &[
            ("alice", 0, "Failure"),
            ("bob", 0, "Failure"),
            ("alice", 1, "Failure"),
            ("alice", 2, "Success"),
            ("alice", 3, "Failure"),
        ],
        -1,
        -1,
        4,
    );
    assert!(got.is_empty(), "nothing is final before the watermark: {got:?}");
    assert_eq!(w.state.waiting(), 2, "alice's and bob's rows wait");
    // The watermark passes alice's third failure: it is decided with n = 3.
    let got = w.tick(4);
    assert_eq!(evidence(&got).len(), 1, "{got:?}");
    assert_eq!(got[0].actor, "alice");
    assert_eq!(got[0].evidence["n"], 3);
    // A fourth failure within ten minutes makes n = 4 for it: nothing fires again.
    assert!(w.step(&[("alice", 5, "Failure")], 4, 20, 20).is_empty());
    assert!(w.tick(60).is_empty(), "decided once");
    assert_eq!(w.state.waiting(), 0);
}

#[test]
fn a_row_whose_condition_can_only_become_true_fires_at_once_and_not_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut w = Window::new(tmp.path(), AT_LEAST_THREE);
    assert_eq!(w.detector().split.timing, Timing::AtOnce);
    // Every row up to minute 2 has arrived (complete), the watermark is far behind.
    let got = w.step(
        &[
            ("alice", 0, "Failure"),
            ("alice", 1, "Failure"),
            ("alice", 2, "Failure"),
        ],
        -30,
        -30,
        3,
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].evidence["n"], 3);
    // When the watermark passes the row, it has fired already.
    let got = w.tick(10);
    assert!(got.is_empty(), "{got:?}");
}

/// Feeds the same batches to two states of `sql`; the second checkpoints and empties its
/// cache after every batch. Both decide the same, evidence included.
fn same_decisions_from_the_store(sql: &str, saving: Saving) {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cached = Window::new(&tmp.path().join("cached"), sql);
    let mut stored = Window::new(&tmp.path().join("stored"), sql);
    let actors = ["alice", "bob", "carol"];
    let mut cached_out = Vec::new();
    let mut stored_out = Vec::new();
    for b in 0..12_i64 {
        // Each batch: a few failures per actor over two minutes, in time order.
        let events: Vec<(&str, i64, &str)> = (0..6)
            .map(|i| {
                let actor = actors[((b + i) % 3) as usize];
                let outcome = if (b * 7 + i) % 5 == 0 {
                    "Success"
                } else {
                    "Failure"
                };
                (actor, 2 * b, outcome)
            })
            .collect();
        let (before, watermark) = (2 * b - 2, 2 * b - 1);
        cached_out.extend(cached.step(&events, before, watermark, 2 * b));
        stored_out.extend(stored.step(&events, before, watermark, 2 * b));
        stored.checkpoint_and_evict(watermark, saving);
    }
    cached_out.extend(cached.tick(120));
    stored_out.extend(stored.tick(120));
    assert!(!cached_out.is_empty(), "the input fires");
    assert_eq!(evidence(&cached_out), evidence(&stored_out));
}

#[test]
fn an_incremental_window_read_back_from_the_store_decides_as_the_cached_one() {
    for saving in [Saving::Changed, Saving::Evicted] {
        same_decisions_from_the_store(EXACTLY_THREE, saving);
        same_decisions_from_the_store(AT_LEAST_THREE, saving);
    }
}

#[test]
fn a_temporary_state_writes_a_changed_key_only_when_it_evicts_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut w = Window::new(tmp.path(), EXACTLY_THREE);
    w.step(&[("alice", 0, "Failure"), ("alice", 1, "Failure")], -1, 0, 0);
    let bounds = Window::bounds(0, 0);
    let chunks = |w: &Window| w.store.chunks(&w.state.tag).expect("chunks").len();
    let mut commit = w.store.commit(0);
    w.state.checkpoint(bounds, &mut commit, Saving::Evicted);
    w.store.write(commit).expect("written");
    assert_eq!(chunks(&w), 0, "a checkpoint writes no key of a temporary state");
    assert_eq!(w.state.cached_keys(), 1, "alice stays in memory, changed");
    let mut commit = w.store.commit(0);
    w.state.evict(0, Some((bounds, &mut commit)));
    w.store.write(commit).expect("written");
    assert_eq!(w.state.cached_keys(), 0, "alice was evicted");
    assert!(chunks(&w) > 0, "and written as she left");
    // Her third failure counts the two read back.
    let got = w.step(&[("alice", 2, "Failure")], 1, 30, 30);
    assert_eq!(evidence(&got).len(), 1, "{got:?}");
    assert_eq!(got[0].evidence["n"], 3);
}

#[test]
fn a_rerun_window_read_back_from_the_store_decides_as_the_cached_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    assert!(
        Window::new(tmp.path(), NESTED)
            .detector()
            .split
            .incremental()
            .is_none(),
        "a window over a window is re-run"
    );
    same_decisions_from_the_store(NESTED, Saving::Changed);
    same_decisions_from_the_store(NESTED, Saving::Evicted);
}

#[test]
fn a_key_past_its_windows_and_the_lateness_leaves_the_cache_and_the_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, sql) in [("incremental", EXACTLY_THREE), ("rerun", NESTED)] {
        let mut w = Window::new(&tmp.path().join(name), sql);
        w.step(&[("alice", 0, "Failure"), ("alice", 1, "Failure")], -1, 2, 2);
        let key = w
            .state
            .cache
            .keys()
            .next()
            .map(Box::<[u8]>::from)
            .expect("alice's key is cached");
        let mut commit = w.store.commit(0);
        w.state
            .checkpoint(Window::bounds(2, 2), &mut commit, Saving::Changed);
        w.store.write(commit).expect("written");
        let stored = |w: &Window| {
            w.store.chunks(&w.state.tag).expect("chunks").len()
                + usize::from(w.store.get(&row_key(&w.state.tag, &key)).expect("row").is_some())
        };
        assert!(stored(&w) > 0, "{name}: the key is on disk");
        // Ten minutes of window plus a minute of lateness after alice's last row. (A key
        // written clean before is not deleted: the store stops reading it once its clock,
        // which a checkpoint advances, passes the key's expiry, and compaction drops it.)
        w.tick(12);
        let bounds = Window::bounds(12, 12);
        let mut commit = w.store.commit(0);
        w.state.checkpoint(bounds, &mut commit, Saving::Changed);
        w.store.write(commit).expect("written");
        w.store.advance_clock(bounds.expiry_now());
        assert_eq!(w.state.cached_keys(), 0, "{name}: the expired key left the cache");
        assert_eq!(stored(&w), 0, "{name}: and the store");
    }
}

#[test]
fn a_key_deleted_by_a_checkpoint_written_behind_is_read_back_after_the_write() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut w = Window::new(tmp.path(), EXACTLY_THREE);
    w.step(&[("alice", 0, "Failure"), ("alice", 1, "Failure")], -1, 2, 2);
    let mut commit = w.store.commit(0);
    w.state
        .checkpoint(Window::bounds(2, 2), &mut commit, Saving::Changed);
    w.store.write(commit).expect("written");
    // Past alice's window and the lateness: the next checkpoint deletes her key, behind.
    w.tick(12);
    let bounds = Window::bounds(12, 12);
    let mut commit = w.store.commit(0);
    w.state.checkpoint(bounds, &mut commit, Saving::Changed);
    assert_eq!(w.state.cached_keys(), 0, "alice left the cache");
    assert_eq!(w.state.deleted.len(), 1, "her key is remembered as deleted");
    w.store
        .write_behind(commit, bounds.expiry_now())
        .expect("started");
    // She comes back at once: her key is read from the store once the delete is written, not
    // from the chunks it removes.
    let got = w.step(
        &[
            ("alice", 13, "Failure"),
            ("alice", 14, "Failure"),
            ("alice", 15, "Failure"),
        ],
        12,
        30,
        30,
    );
    assert!(
        w.state.deleted.is_empty() && !w.store.writing(),
        "the write was waited for"
    );
    assert_eq!(evidence(&got).len(), 1, "{got:?}");
    assert_eq!(got[0].evidence["n"], 3);
}

/// A shared state's tag is the one the store's metadata names for its rows identity; one the
/// metadata does not name yet takes over the tag its window had before windows with other
/// frames shared rows, when rows are stored under it (an upgrade keeps them); else a new one.
#[test]
fn a_shared_state_keeps_the_tag_its_rows_are_stored_under() {
    use rampart_state::codec::{FRAME_CHUNK, INCREMENTAL, chunk_key, set_header};
    use sha2::{Digest, Sha256};

    let tmp = tempfile::tempdir().expect("tmp");
    let w = Window::new(tmp.path(), AT_LEAST_THREE);
    let detector = w.detector();
    let rows = detector.split.rows_identity().expect("incremental");
    let choose = |n| SharedTag::choose(Some(&w.store), &rows, n, &[detector]).expect("a tag");
    let fresh = choose(0);
    assert_eq!(
        fresh,
        SharedTag::choose(None, &rows, 0, &[detector]).expect("a tag")
    );
    assert!(fresh.tag.starts_with("window/"), "{fresh:?}");

    let before = detector.split.state_identity().expect("incremental");
    let old = format!("window/{}", &hex::encode(Sha256::digest(before.as_bytes()))[..32]);
    assert_ne!(old, fresh.tag);
    let mut commit = w.store.commit(0);
    let mut value = Vec::new();
    set_header(&mut value, i64::MAX, INCREMENTAL);
    let key = chunk_key(format!("{old}\0").as_bytes(), FRAME_CHUNK, b"alice", 0);
    commit.chunk(&key, Some(&value));
    w.store.write(commit).expect("written");
    let taken = choose(0);
    assert_eq!(taken.tag, old, "rows stored before the upgrade are kept");
    assert_eq!(taken.registry, fresh.registry);
    // The second state of the same rows (past 32 detectors) is another.
    let second = choose(1);
    assert!(second.tag != old && second.tag != fresh.tag && second.registry != fresh.registry);

    // Once the metadata names a tag, it is that one.
    let mut commit = w.store.commit(0);
    commit.meta(&fresh.registry, Some(b"window/named"));
    w.store.write(commit).expect("written");
    assert_eq!(choose(0).tag, "window/named");
}

/// Past the budget, keys with no row waiting for the watermark go first (a key with one is
/// read back when the row is due), even when more recently used; keys the latest two
/// batches used stay.
#[test]
fn eviction_drops_keys_with_no_row_waiting_before_keys_with_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut w = Window::new(tmp.path(), EXACTLY_THREE);
    // Alice's row waits (minute 10, watermark 0); bob's (minute 1) is decided by minute 5,
    // which reads bob's key after alice's was last used.
    w.step(&[("alice", 10, "Failure")], -1, 0, 0);
    w.step(&[("bob", 1, "Failure")], 0, 0, 0);
    assert!(w.tick(5).is_empty());
    assert_eq!(w.state.waiting(), 1, "alice's row waits");
    // Two more batches: alice's and bob's keys are no longer the latest batches'.
    w.step(&[("carol", 6, "Failure")], 5, 5, 5);
    w.step(&[("dave", 6, "Failure")], 5, 5, 5);
    let mut commit = w.store.commit(0);
    w.state
        .checkpoint(Window::bounds(5, 5), &mut commit, Saving::Changed);
    w.store.write(commit).expect("written");
    let cached = |w: &Window, actor: &str| {
        w.state
            .cache
            .keys()
            .any(|k| String::from_utf8_lossy(k).contains(actor))
    };
    assert!(["alice", "bob", "carol", "dave"].iter().all(|a| cached(&w, a)));
    // A budget a little under what is cached: one key has to go.
    let budget = w.state.cache_bytes() - 1;
    w.state.evict(budget, None);
    assert_eq!(w.state.cached_keys(), 3, "one key was enough");
    assert!(!cached(&w, "bob"), "bob's key, with no row waiting, went first");
    assert!(cached(&w, "alice"), "alice's key, with a row waiting, stays");
    assert!(
        cached(&w, "carol") && cached(&w, "dave"),
        "the latest batches' keys stay"
    );
    // Her row is still decided when due, her key read back from the store.
    w.state.evict(0, None);
    assert_eq!(w.state.cached_keys(), 0);
    assert!(w.tick(12).is_empty(), "one failure is not three");
    assert_eq!(w.state.waiting(), 0);
}

/// The cache's count, kept per key and brought up to date only for the keys used or changed
/// since the last count, equals a full count after every checkpoint and recount.
#[test]
fn the_cache_count_equals_a_full_count_after_checkpoints_and_recounts() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, sql) in [("incremental", EXACTLY_THREE), ("rerun", NESTED)] {
        let mut w = Window::new(&tmp.path().join(name), sql);
        let full = |w: &Window| -> usize { w.state.cache.iter().map(|(k, e)| e.bytes(k)).sum() };
        for minute in 0..12 {
            let actors = ["alice", "bob", "carol"];
            let events: Vec<(&str, i64, &str)> = actors
                .iter()
                .take(1 + minute as usize % 3)
                .map(|a| (*a, minute, "Failure"))
                .collect();
            w.step(&events, minute - 1, minute - 1, minute);
            if minute % 2 == 0 {
                w.state.recount();
                assert_eq!(
                    w.state.cache_bytes(),
                    full(&w),
                    "{name}: recount at minute {minute}"
                );
            }
            if minute % 3 == 0 {
                let mut commit = w.store.commit(0);
                w.state
                    .checkpoint(Window::bounds(minute, minute), &mut commit, Saving::Changed);
                w.store.write(commit).expect("written");
                assert_eq!(
                    w.state.cache_bytes(),
                    full(&w),
                    "{name}: checkpoint at minute {minute}"
                );
            }
        }
    }
}
