//! The enforcement client: an enforcement point (gateway, proxy, provisioning service) embeds
//! an [`Enforcer`], which follows Rampart's decisions topic on a background thread and keeps
//! the active blocks in memory, so that [`Enforcer::is_blocked`] answers from memory, never
//! waiting on the network.
//!
//! What it follows is the decision contract (docs/decisions.md): a `block` refuses every action
//! of its actor until `expires_at`; `shadow` decisions are never enforced; a decision seen
//! twice (same `decision_id`, e.g. re-sent after a restart) is applied once; a `revoke` lifts
//! the blocks and holds of its actor (from its detector, or `*`: every one) decided at or
//! before it (`processed_at`), so that decisions may be read in any order. With
//! [`Config::verify`] set, only decisions signed by a trusted key are applied ([`signing`]).
//!
//! At start it reads the **enforcement state** (the compacted topic `<topic>.enforcement`
//! that the service keeps: every block and hold in force, and the revocations that lift them)
//! and only the last [`Config::lookback`] of the decisions topic, instead of the whole topic:
//! a week of decisions is millions of messages, and a block older than the topic's retention
//! would be lost. [`Enforcer::caught_up`] says when both have been read to their end.
//!
//! ```no_run
//! let enforcer = rampart_enforce::Enforcer::start(rampart_enforce::Config {
//!     brokers: "127.0.0.1:9092".into(),
//!     topic: "rampart.decisions".into(),
//!     ..Default::default()
//! })?;
//! if let Some(block) = enforcer.is_blocked("arn:aws:iam::123456789012:user/mallory", "CreateAccessKey") {
//!     println!("refused: {} ({})", block.reason, block.guidance.as_deref().unwrap_or(""));
//! }
//! # Ok::<(), rampart_enforce::Error>(())
//! ```

pub mod signing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Deserialize;

use signing::{KEY_ID_HEADER, SIGNATURE_HEADER, Unverified, Verifier};

/// Why the enforcer could not start.
#[derive(Debug)]
pub enum Error {
    /// The Kafka consumer could not be created or assigned.
    Kafka(KafkaError),
    /// The decisions topic was not found in time.
    NoTopic(String),
    /// The enforcement-state topic named by [`Bootstrap::State`] does not exist.
    NoStateTopic(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kafka(e) => write!(f, "Kafka: {e}"),
            Self::NoTopic(t) => write!(f, "the decisions topic `{t}` does not exist on the broker"),
            Self::NoStateTopic(t) => write!(
                f,
                "the enforcement-state topic `{t}` does not exist on the broker (the service creates it: \
                 `[kafka] enforcement_topic`)"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<KafkaError> for Error {
    fn from(e: KafkaError) -> Self {
        Self::Kafka(e)
    }
}

/// Where the decisions are.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bootstrap servers.
    pub brokers: String,
    /// The decisions topic.
    pub topic: String,
    /// Extra librdkafka properties (TLS, SASL, ...).
    pub properties: Vec<(String, String)>,
    /// How long to wait for the topic to exist at start.
    pub topic_timeout: Duration,
    /// Verify decisions against these public keys: unsigned or badly signed ones (revocations
    /// included) are ignored and counted. `None`: every decision on the topic is believed, so
    /// anyone who can write to it can block or free anyone.
    pub verify: Option<Verifier>,
    /// Where what is in force at start comes from.
    pub bootstrap: Bootstrap,
    /// With an enforcement-state topic: how far back the decisions topic is read at start
    /// (what the service decided but had not yet written to the state topic).
    pub lookback: Duration,
}

/// Where an enforcer learns what is in force when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// The enforcement-state topic `<topic>.enforcement` if it exists, else the whole
    /// decisions topic.
    Auto,
    /// This enforcement-state topic (it must exist), then the decisions topic's last
    /// [`Config::lookback`].
    State(String),
    /// The whole decisions topic, from its beginning.
    Decisions,
}

/// The enforcement-state topic's default name for a decisions topic.
pub fn state_topic_of(decisions_topic: &str) -> String {
    format!("{decisions_topic}.enforcement")
}

impl Default for Config {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "rampart.decisions".into(),
            properties: Vec::new(),
            topic_timeout: Duration::from_secs(30),
            verify: None,
            bootstrap: Bootstrap::Auto,
            lookback: Duration::from_secs(600),
        }
    }
}

/// What an active block does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Refuse every action of the actor.
    Block,
    /// Hold the actor's `actions` for approval (a revoke approves).
    Review,
}

/// What the enforcement point should do with one action.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Let it through.
    Allow,
    /// Refuse it: the block, with its reason, guidance and expiry.
    Block(Block),
    /// Hold it for approval: the hold, with who approves in its guidance.
    Review(Block),
}

/// An active block or review hold, as the enforcement point shows it to the user.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Block or review hold.
    pub kind: Kind,
    /// The actions a review holds (a block covers every action).
    pub actions: Vec<String>,
    /// The decision that set it.
    pub decision_id: String,
    /// The detector that decided.
    pub detector: String,
    /// Why.
    pub reason: String,
    /// The safe path forward, if the detector gives one.
    pub guidance: Option<String>,
    /// When the block ends.
    pub expires_at: DateTime<Utc>,
    /// When it was decided (a revocation lifts what was decided at or before it).
    pub decided_at: DateTime<Utc>,
}

/// Counters of what the enforcer has seen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Decisions read from the topic.
    pub decisions: u64,
    /// Blocks applied.
    pub blocks: u64,
    /// Decisions ignored because their id was already applied.
    pub duplicates: u64,
    /// Shadow decisions (never enforced).
    pub shadow: u64,
    /// Blocks already expired when read.
    pub expired: u64,
    /// Review holds applied.
    pub reviews: u64,
    /// Revocations applied (each lifts the actor's blocks and holds from one or every detector).
    pub revocations: u64,
    /// Blocks and holds not applied because a revocation decided after them was read first.
    pub already_revoked: u64,
    /// Messages that are not decisions.
    pub unreadable: u64,
    /// Messages without a signature, ignored (verification on).
    pub unsigned: u64,
    /// Messages signed by a key not trusted, or whose signature does not match their bytes,
    /// ignored (verification on).
    pub bad_signatures: u64,
}

/// The fields of a decision the enforcer needs.
#[derive(Deserialize)]
struct DecisionView {
    decision_id: String,
    detector: DetectorView,
    verdict: String,
    mode: String,
    actor: String,
    #[serde(default)]
    actions: Vec<String>,
    reason: String,
    expires_at: Option<String>,
    guidance: Option<String>,
    processed_at: String,
}

#[derive(Deserialize)]
struct DetectorView {
    id: String,
}

#[derive(Default)]
struct Blocks {
    by_actor: HashMap<String, Vec<Block>>,
    /// Applied decision ids with their expiry (forgotten once expired).
    seen: HashMap<String, DateTime<Utc>>,
    /// Per actor and detector (`*`: every one), the latest revocation read: a block decided
    /// at or before it is lifted, and not applied when read after it (forgotten after a day).
    revoked: HashMap<(String, String), DateTime<Utc>>,
    stats: Stats,
    /// The keys decisions must be signed with, when verification is on.
    verify: Option<Verifier>,
}

impl Blocks {
    /// Takes a message from the topic: its value and its signature headers' values. With
    /// verification on, a message not signed by a trusted key is counted and ignored.
    fn receive(
        &mut self,
        payload: &[u8],
        key_id: Option<&[u8]>,
        signature: Option<&[u8]>,
        now: DateTime<Utc>,
    ) {
        if let Some(verifier) = &self.verify
            && let Err(why) = verifier.verify(payload, key_id, signature)
        {
            self.stats.decisions += 1;
            match why {
                Unverified::Unsigned => self.stats.unsigned += 1,
                Unverified::UnknownKey(_) | Unverified::BadSignature => self.stats.bad_signatures += 1,
            }
            tracing::warn!(reason = %why, "ignored a message on the decisions topic: {why}");
            return;
        }
        self.apply(payload, now);
    }

    fn apply(&mut self, payload: &[u8], now: DateTime<Utc>) {
        self.stats.decisions += 1;
        let Ok(d) = serde_json::from_slice::<DecisionView>(payload) else {
            self.stats.unreadable += 1;
            return;
        };
        if d.mode != "enforce" {
            self.stats.shadow += 1;
            return;
        }
        let Some(decided_at) = time(&d.processed_at) else {
            self.stats.unreadable += 1;
            return;
        };
        if d.verdict == "revoke" {
            if self
                .seen
                .insert(d.decision_id, now + chrono::Duration::days(1))
                .is_some()
            {
                self.stats.duplicates += 1;
                return;
            }
            self.stats.revocations += 1;
            if let Some(blocks) = self.by_actor.get_mut(&d.actor) {
                blocks.retain(|b| {
                    b.decided_at > decided_at || (d.detector.id != "*" && b.detector != d.detector.id)
                });
            }
            let latest = self.revoked.entry((d.actor, d.detector.id)).or_insert(decided_at);
            *latest = (*latest).max(decided_at);
            return;
        }
        let kind = match d.verdict.as_str() {
            "block" => Kind::Block,
            "review" => Kind::Review,
            _ => return,
        };
        let Some(expires_at) = d.expires_at.as_deref().and_then(time) else {
            self.stats.unreadable += 1;
            return;
        };
        if self.seen.contains_key(&d.decision_id) {
            self.stats.duplicates += 1;
            return;
        }
        if expires_at <= now {
            self.stats.expired += 1;
            return;
        }
        self.seen.insert(d.decision_id.clone(), expires_at);
        let revoked_after = |detector: &str| {
            self.revoked
                .get(&(d.actor.clone(), detector.to_string()))
                .is_some_and(|at| *at >= decided_at)
        };
        if revoked_after(&d.detector.id) || revoked_after("*") {
            self.stats.already_revoked += 1;
            return;
        }
        match kind {
            Kind::Block => self.stats.blocks += 1,
            Kind::Review => self.stats.reviews += 1,
        }
        self.by_actor.entry(d.actor).or_default().push(Block {
            kind,
            actions: d.actions,
            decision_id: d.decision_id,
            detector: d.detector.id,
            reason: d.reason,
            guidance: d.guidance,
            expires_at,
            decided_at,
        });
    }

    fn check(&self, actor: &str, action: &str, now: DateTime<Utc>) -> Check {
        let Some(active) = self.by_actor.get(actor) else {
            return Check::Allow;
        };
        let live = || active.iter().filter(|b| b.expires_at > now);
        if let Some(b) = live()
            .filter(|b| b.kind == Kind::Block)
            .max_by_key(|b| b.expires_at)
        {
            return Check::Block(b.clone());
        }
        match live()
            .filter(|b| b.kind == Kind::Review && b.actions.iter().any(|a| a == action || a == "*"))
            .max_by_key(|b| b.expires_at)
        {
            Some(hold) => Check::Review(hold.clone()),
            None => Check::Allow,
        }
    }

    fn prune(&mut self, now: DateTime<Utc>) {
        self.by_actor.retain(|_, blocks| {
            blocks.retain(|b| b.expires_at > now);
            !blocks.is_empty()
        });
        self.seen.retain(|_, expires_at| *expires_at > now);
        self.revoked.retain(|_, at| *at + chrono::Duration::days(1) > now);
    }
}

/// An RFC 3339 time.
fn time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The enforcer's handling of one message from the topic, without Kafka: for the fuzz targets.
#[doc(hidden)]
pub mod fuzzing {
    use super::{Blocks, Check, Stats, Verifier};
    use chrono::{DateTime, Utc};

    /// Blocks fed by hand.
    #[derive(Default)]
    pub struct Receiver(Blocks);

    impl Receiver {
        /// Verifying against `verify`, if given.
        pub fn new(verify: Option<Verifier>) -> Self {
            Self(Blocks {
                verify,
                ..Blocks::default()
            })
        }

        /// Takes one message: its value and signature headers.
        pub fn receive(
            &mut self,
            payload: &[u8],
            key_id: Option<&[u8]>,
            signature: Option<&[u8]>,
            now: DateTime<Utc>,
        ) {
            self.0.receive(payload, key_id, signature, now);
        }

        /// What `actor` doing `action` meets at `now`.
        pub fn check(&self, actor: &str, action: &str, now: DateTime<Utc>) -> Check {
            self.0.check(actor, action, now)
        }

        /// Forgets what expired by `now`.
        pub fn prune(&mut self, now: DateTime<Utc>) {
            self.0.prune(now);
        }

        /// The counters.
        pub fn stats(&self) -> Stats {
            self.0.stats
        }
    }
}

/// Follows the decisions topic and answers whether an actor is blocked.
pub struct Enforcer {
    blocks: Arc<RwLock<Blocks>>,
    stop: Arc<AtomicBool>,
    caught_up: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Enforcer {
    /// Starts following `config.topic`, on a background thread: from the enforcement-state
    /// topic and the decisions topic's last `lookback` (see [`Bootstrap`]), or from the
    /// decisions topic's beginning (every partition; blocks already expired are skipped).
    pub fn start(config: Config) -> Result<Self, Error> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            // Every enforcement point reads every decision: no group membership, no commits.
            .set("group.id", "rampart-enforce")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            // (Not librdkafka's 1 s pause once its queue is full: catching up would idle.)
            .set("fetch.queue.backoff.ms", "10");
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        let consumer: BaseConsumer = client.create()?;
        let partitions = wait_for_partitions(&consumer, &config.topic, config.topic_timeout)?;
        let state = match &config.bootstrap {
            Bootstrap::Decisions => None,
            Bootstrap::State(topic) => Some((
                topic.clone(),
                wait_for_partitions(&consumer, topic, config.topic_timeout)
                    .map_err(|_| Error::NoStateTopic(topic.clone()))?,
            )),
            Bootstrap::Auto => {
                let topic = state_topic_of(&config.topic);
                existing_partitions(&consumer, &topic).map(|p| (topic, p))
            }
        };
        let mut starts = Starts::default();
        match &state {
            Some((state_topic, state_partitions)) => {
                for p in state_partitions {
                    starts.add(&consumer, state_topic, *p, Offset::Beginning)?;
                }
                for (p, offset) in
                    offsets_since(&client, &consumer, &config.topic, &partitions, config.lookback)
                {
                    starts.add(&consumer, &config.topic, p, offset)?;
                }
                tracing::info!(
                    state = %state_topic,
                    decisions = %config.topic,
                    lookback = ?config.lookback,
                    "bootstrapping from the enforcement state"
                );
            }
            None => {
                for p in &partitions {
                    starts.add(&consumer, &config.topic, *p, Offset::Beginning)?;
                }
                tracing::info!(decisions = %config.topic, "reading the whole decisions topic");
            }
        }
        consumer.assign(&starts.assignment()?)?;
        let blocks = Arc::new(RwLock::new(Blocks {
            verify: config.verify,
            ..Blocks::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let caught_up = Arc::new(AtomicU64::new(0));
        let thread = {
            let (blocks, stop, caught_up) = (Arc::clone(&blocks), Arc::clone(&stop), Arc::clone(&caught_up));
            std::thread::Builder::new()
                .name("rampart-enforce".into())
                .spawn(move || follow(&consumer, &starts, &blocks, &stop, &caught_up))
                .expect("the OS can start a thread")
        };
        Ok(Self {
            blocks,
            stop,
            caught_up,
            thread: Some(thread),
        })
    }

    /// The active block refusing `actor`, if any (a block covers every action of its actor;
    /// review holds are not blocks: see [`Self::check`]). Never waits on the network.
    pub fn is_blocked(&self, actor: &str, action: &str) -> Option<Block> {
        match self.check(actor, action) {
            Check::Block(b) => Some(b),
            Check::Allow | Check::Review(_) => None,
        }
    }

    /// What to do with `actor` doing `action`: refuse it (an active block, the one lasting
    /// longest), hold it for approval (an active review hold on this action or `*`), or let it
    /// through. Never waits on the network.
    pub fn check(&self, actor: &str, action: &str) -> Check {
        let blocks = self.blocks.read().unwrap_or_else(|p| p.into_inner());
        blocks.check(actor, action, Utc::now())
    }

    /// Actors blocked right now.
    pub fn blocked_actors(&self) -> Vec<String> {
        let now = Utc::now();
        let blocks = self.blocks.read().unwrap_or_else(|p| p.into_inner());
        let mut actors: Vec<String> = blocks
            .by_actor
            .iter()
            .filter(|(_, bs)| bs.iter().any(|b| b.kind == Kind::Block && b.expires_at > now))
            .map(|(a, _)| a.clone())
            .collect();
        actors.sort();
        actors
    }

    /// What has been read so far.
    pub fn stats(&self) -> Stats {
        self.blocks.read().unwrap_or_else(|p| p.into_inner()).stats
    }

    /// Whether the enforcer has read up to the end of the topic at least once since it started
    /// (before that, an actor blocked by an old decision may still look allowed).
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed) > 0
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_for_partitions(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Vec<i32>, Error> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(m) => {
                if let Some(t) = m.topics().iter().find(|t| t.name() == topic)
                    && t.error().is_none()
                    && !t.partitions().is_empty()
                {
                    return Ok(t.partitions().iter().map(|p| p.id()).collect());
                }
            }
            Err(e) => tracing::debug!(error = %e, "metadata"),
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::NoTopic(topic.to_string()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The partitions of `topic` if it exists (asking for every topic's metadata: asking for one
/// may create it with the broker's defaults).
fn existing_partitions(consumer: &BaseConsumer, topic: &str) -> Option<Vec<i32>> {
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).ok()?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())?;
    Some(t.partitions().iter().map(|p| p.id()).collect())
}

/// Per partition of `topic`, the offset of its first message of the last `lookback` (its end
/// when there is none, or when `lookback` is zero; its beginning when the broker cannot say).
///
/// The broker's answer (ListOffsets by time) is checked: when the message at the offset it
/// gives is older than the time asked, the offset is searched for by bisection over the
/// messages' own timestamps. Tansu 0.6 needs it: it answers offset 0 for any time before its
/// append time, whatever the messages' timestamps.
fn offsets_since(
    client: &ClientConfig,
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    lookback: Duration,
) -> Vec<(i32, Offset)> {
    if lookback.is_zero() {
        return partitions.iter().map(|p| (*p, Offset::End)).collect();
    }
    let since = chrono::Duration::from_std(lookback)
        .ok()
        .and_then(|back| Utc::now().checked_sub_signed(back))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
        .timestamp_millis();
    let mut times = TopicPartitionList::new();
    for p in partitions {
        let _ = times.add_partition_offset(topic, *p, Offset::Offset(since));
    }
    let answered = match consumer.offsets_for_times(times, Duration::from_secs(10)) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "the broker cannot find offsets by time: reading the whole decisions topic");
            return partitions.iter().map(|p| (*p, Offset::Beginning)).collect();
        }
    };
    // Per partition: where the broker's answer is checked and, if wrong, searched for.
    let mut searches = Vec::new();
    let mut offsets = Vec::new();
    for e in answered.elements() {
        match (
            e.offset(),
            consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(10)),
        ) {
            (Offset::Offset(o), Ok((low, high))) if o >= 0 => searches.push(Search {
                partition: e.partition(),
                low: o.max(low),
                high,
            }),
            (Offset::Offset(o), Err(_)) if o >= 0 => offsets.push((e.partition(), Offset::Offset(o))),
            _ => offsets.push((e.partition(), Offset::End)),
        }
    }
    // (On a consumer of its own: what it fetched is not read as decisions.)
    match client.create::<BaseConsumer>() {
        Ok(probe) => bisect_by_time(&probe, topic, &mut searches, since),
        Err(e) => tracing::warn!(error = %e, "cannot check the broker's offsets by time"),
    }
    offsets.extend(searches.iter().map(|s| (s.partition, Offset::Offset(s.low))));
    offsets
}

/// The search for a partition's first message at or after a time: it is in `low..=high`
/// (`high`: the partition's end, or a message known to be at or after the time).
struct Search {
    partition: i32,
    low: i64,
    high: i64,
}

/// Narrows each search to its answer (`low == high`): first the message at `low` (the
/// broker's answer) is looked at, and when it is older than `since` (milliseconds) the rest
/// is bisected over the messages' timestamps (assumed in time order, as the service's
/// decisions are). All partitions are probed together, one message each per round; a probe
/// that gets no message ends its search at `low` (reading more, never less).
fn bisect_by_time(consumer: &BaseConsumer, topic: &str, searches: &mut [Search], since: i64) {
    let mut first = true;
    loop {
        let probes: Vec<(i32, i64)> = searches
            .iter()
            .filter(|s| s.low < s.high)
            .map(|s| {
                (
                    s.partition,
                    if first {
                        s.low
                    } else {
                        s.low + (s.high - s.low) / 2
                    },
                )
            })
            .collect();
        if probes.is_empty() {
            return;
        }
        let seen = probe(consumer, topic, &probes, false);
        // In the first round: the partitions whose broker answer is older than `since`.
        let mut wrong = Vec::new();
        for (partition, at) in probes {
            let Some(s) = searches.iter_mut().find(|s| s.partition == partition) else {
                continue;
            };
            match seen.get(&partition).and_then(|m| m.first()) {
                // Older: the first message wanted is after it.
                Some((offset, Some(time))) if *time < since => {
                    s.low = (offset + 1).min(s.high);
                    if first {
                        wrong.push((partition, (s.high - 1).max(*offset)));
                    }
                }
                // The first message from `at` on is recent enough (or has no time): reading
                // from `at` reads it first.
                Some(_) => s.high = at,
                None => s.high = s.low,
            }
        }
        if std::mem::take(&mut first) && !wrong.is_empty() {
            // Where the broker's answer was wrong, its end may be too: the end from the
            // partition's last record batch (Tansu 0.6 gives that batch's first offset plus one).
            for (partition, messages) in probe(consumer, topic, &wrong, true) {
                if let (Some(s), Some((offset, _))) = (
                    searches.iter_mut().find(|s| s.partition == partition),
                    messages.last(),
                ) {
                    s.high = s.high.max(offset + 1);
                }
            }
        }
    }
}

/// Per partition, the messages (offset, timestamp) fetched from its offset in `at` on: the
/// first one, or (`all`) every one that comes before 100 ms pass without any. At most 5 s.
fn probe(
    consumer: &BaseConsumer,
    topic: &str,
    at: &[(i32, i64)],
    all: bool,
) -> HashMap<i32, Vec<(i64, Option<i64>)>> {
    let mut seen: HashMap<i32, Vec<(i64, Option<i64>)>> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in at {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if consumer.assign(&tpl).is_err() {
        return seen;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                // (Only messages from this round's offsets on.)
                if at.iter().any(|(p, o)| *p == m.partition() && m.offset() >= *o) {
                    let messages = seen.entry(m.partition()).or_default();
                    if all || messages.is_empty() {
                        messages.push((m.offset(), m.timestamp().to_millis()));
                    }
                }
                if !all && seen.len() == at.len() {
                    break;
                }
            }
            Some(Err(_)) => {}
            None if all && seen.len() == at.len() => break,
            None => {}
        }
    }
    seen
}

/// Where the enforcer starts reading each partition, as offsets (so that "read to the end"
/// is known for a partition nothing was read from).
#[derive(Default)]
struct Starts(Vec<(String, i32, i64)>);

impl Starts {
    /// Starts `partition` of `topic` at `offset` (its beginning, its end, or an offset).
    fn add(
        &mut self,
        consumer: &BaseConsumer,
        topic: &str,
        partition: i32,
        offset: Offset,
    ) -> Result<(), Error> {
        let at = match offset {
            Offset::Offset(o) => o,
            Offset::End => {
                consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(10))?
                    .1
            }
            _ => {
                consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(10))?
                    .0
            }
        };
        self.0.push((topic.to_string(), partition, at));
        Ok(())
    }

    fn assignment(&self) -> Result<TopicPartitionList, Error> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, at) in &self.0 {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*at))?;
        }
        Ok(tpl)
    }

    fn of(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0
            .iter()
            .find(|(t, p, _)| t == topic && *p == partition)
            .map(|(_, _, at)| *at)
    }
}

fn follow(
    consumer: &BaseConsumer,
    starts: &Starts,
    blocks: &RwLock<Blocks>,
    stop: &AtomicBool,
    caught_up: &AtomicU64,
) {
    let mut last_prune = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                if caught_up.load(Ordering::Relaxed) == 0 && at_end(consumer, starts) {
                    caught_up.store(1, Ordering::Relaxed);
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "reading decisions"),
            // (A tombstone on the enforcement-state topic only lets compaction forget an expired
            // entry: nothing to apply.)
            Some(Ok(m)) if m.payload().is_none() => {}
            Some(Ok(m)) => {
                let payload = m.payload().unwrap_or_default();
                let header = |name: &str| {
                    m.headers()
                        .and_then(|h| h.iter().find(|h| h.key == name))
                        .and_then(|h| h.value)
                };
                blocks.write().unwrap_or_else(|p| p.into_inner()).receive(
                    payload,
                    header(KEY_ID_HEADER),
                    header(SIGNATURE_HEADER),
                    Utc::now(),
                );
            }
        }
        if last_prune.elapsed() > Duration::from_secs(10) {
            blocks
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .prune(Utc::now());
            last_prune = std::time::Instant::now();
        }
    }
}

/// Whether every assigned partition has been read to its end (asked when a poll found
/// nothing waiting: Tansu 0.6 answers "the end" with the start of the partition's last record
/// batch plus one, which a consumer is past only once it received that whole batch).
fn at_end(consumer: &BaseConsumer, starts: &Starts) -> bool {
    let Ok(position) = consumer.position() else {
        return false;
    };
    position.elements().iter().all(|e| {
        let Ok((_, high)) = consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(1))
        else {
            return false;
        };
        // (Nothing read from a partition yet: where it started.)
        match e.offset() {
            Offset::Offset(o) => o >= high,
            _ => starts.of(e.topic(), e.partition()).is_some_and(|at| at >= high),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(id: &str, verdict: &str, mode: &str, expires_at: &str) -> Vec<u8> {
        serde_json::json!({
            "schema_version": 1, "decision_id": id, "pipeline": "p",
            "detector": {"id": "d", "version": "v"}, "verdict": verdict, "mode": mode,
            "severity": "high", "actor": "mallory", "key": "mallory", "actions": ["X"],
            "reason": "because", "evidence": {}, "event_time": "2026-01-01T00:00:00Z",
            "processed_at": "2026-01-01T00:00:00Z", "expires_at": expires_at,
            "source": {"topic": "t", "partition": 0, "offset": 1},
            "guidance": "ask security", "tags": []
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn applies_blocks_once_and_ignores_shadow_and_expired() {
        let now = DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        let mut b = Blocks::default();
        b.apply(&decision("a", "block", "enforce", "2026-06-01T01:00:00Z"), now);
        b.apply(&decision("a", "block", "enforce", "2026-06-01T01:00:00Z"), now);
        b.apply(&decision("s", "block", "shadow", "2026-06-01T01:00:00Z"), now);
        b.apply(&decision("e", "block", "enforce", "2026-05-31T23:00:00Z"), now);
        b.apply(&decision("al", "alert", "enforce", "2026-06-01T01:00:00Z"), now);
        b.apply(b"not json", now);
        assert_eq!(b.by_actor["mallory"].len(), 1);
        assert_eq!(b.by_actor["mallory"][0].guidance.as_deref(), Some("ask security"));
        assert_eq!(
            b.stats,
            Stats {
                decisions: 6,
                blocks: 1,
                duplicates: 1,
                shadow: 1,
                expired: 1,
                unreadable: 1,
                ..Stats::default()
            }
        );
        let later = DateTime::parse_from_rfc3339("2026-06-01T02:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        b.prune(later);
        assert!(b.by_actor.is_empty() && b.seen.is_empty());
    }

    #[test]
    fn reviews_hold_their_actions_and_revocations_lift_blocks_and_holds() {
        let now = DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        let mut b = Blocks::default();
        b.apply(&decision("r", "review", "enforce", "2026-06-01T01:00:00Z"), now);
        assert!(
            matches!(b.check("mallory", "X", now), Check::Review(h) if h.guidance.as_deref() == Some("ask security"))
        );
        assert_eq!(
            b.check("mallory", "Y", now),
            Check::Allow,
            "a hold covers its actions only"
        );
        b.apply(&decision("b", "block", "enforce", "2026-06-01T01:00:00Z"), now);
        assert!(
            matches!(b.check("mallory", "Y", now), Check::Block(_)),
            "a block covers every action"
        );
        let mut revoke: serde_json::Value =
            serde_json::from_slice(&decision("v", "revoke", "enforce", "2026-06-01T01:00:00Z"))
                .expect("json");
        revoke["detector"]["id"] = "other".into();
        b.apply(revoke.to_string().as_bytes(), now);
        assert!(
            matches!(b.check("mallory", "Y", now), Check::Block(_)),
            "another detector's revoke"
        );
        revoke["decision_id"] = "w".into();
        revoke["detector"]["id"] = "d".into();
        b.apply(revoke.to_string().as_bytes(), now);
        b.apply(revoke.to_string().as_bytes(), now);
        assert_eq!(b.check("mallory", "X", now), Check::Allow);
        assert_eq!(b.stats.revocations, 2);
        assert_eq!(b.stats.duplicates, 1);
        assert_eq!(b.stats.reviews, 1);
    }

    #[test]
    fn with_verification_on_only_decisions_signed_by_a_trusted_key_are_applied() {
        use signing::Signer;
        let now = DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        let (k1, k2) = (
            Signer::from_seed("k1", &[1; 32]).expect("key"),
            Signer::from_seed("k2", &[2; 32]).expect("key"),
        );
        let mut verifier = Verifier::new();
        verifier
            .trust_pem("k1", &k1.public_pem().expect("pem"))
            .expect("trusted");
        let mut b = Blocks {
            verify: Some(verifier),
            ..Blocks::default()
        };
        let block = decision("b", "block", "enforce", "2026-06-01T01:00:00Z");
        // Unsigned, signed by an untrusted key, altered after signing: ignored.
        b.receive(&block, None, None, now);
        let by_k2 = k2.sign(&block);
        b.receive(&block, Some(b"k2"), Some(by_k2.as_bytes()), now);
        let by_k1 = k1.sign(&block);
        let mut altered = block.clone();
        let at = altered.len() - 3;
        altered[at] = b'X';
        b.receive(&altered, Some(b"k1"), Some(by_k1.as_bytes()), now);
        let revoke = decision("v", "revoke", "enforce", "2026-06-01T01:00:00Z");
        b.receive(&revoke, None, None, now);
        assert_eq!(b.check("mallory", "X", now), Check::Allow);
        assert_eq!((b.stats.unsigned, b.stats.bad_signatures), (2, 2));
        assert_eq!(b.stats.decisions, 4);
        // Signed by k1: applied; an unsigned revocation does not lift it.
        b.receive(&block, Some(b"k1"), Some(by_k1.as_bytes()), now);
        b.receive(&revoke, None, None, now);
        assert!(matches!(b.check("mallory", "X", now), Check::Block(_)));
        assert_eq!(b.stats.unsigned, 3);
        // A signed revocation lifts it.
        let signed = k1.sign(&revoke);
        b.receive(&revoke, Some(b"k1"), Some(signed.as_bytes()), now);
        assert_eq!(b.check("mallory", "X", now), Check::Allow);
    }
}
