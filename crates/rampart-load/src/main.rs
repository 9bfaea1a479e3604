//! `rampart-load`: load tools for Rampart's Kafka path.
//!
//! - `feed`: sends records from files (JSON lines, JSON arrays, CloudTrail files) to a topic,
//!   one record per message, optionally at a fixed rate.
//! - `passthrough`: consumes one topic and produces every message unchanged to another: the
//!   broker-only ceiling that Rampart's latency is compared with.
//! - `latency`: open-loop load at fixed rates. Background events come from a JSON-lines file
//!   and every N-th event is a probe (a record some per-event detector blocks) whose actor
//!   carries its sequence number. Each event's *intended* send time is fixed by the schedule
//!   (event i at i / rate), and a probe's latency is measured from that intended time to the
//!   moment its decision (or passed-through copy) is consumed, so a sender that falls behind
//!   shows up in the tail instead of hiding it (no coordinated omission).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "rampart-load", version)]
struct Cli {
    /// Bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092", global = true)]
    brokers: String,
    /// librdkafka properties for every client, `name=value` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE", global = true)]
    properties: Vec<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send records from files to a topic, one message per record.
    Feed {
        /// The topic.
        #[arg(long)]
        topic: String,
        /// Records per second (default: as fast as the broker takes them).
        #[arg(long)]
        rate: Option<f64>,
        /// Give each message the time in this top-level field of its record (RFC 3339) as its
        /// Kafka timestamp, instead of the time it is sent.
        #[arg(long, value_name = "FIELD")]
        timestamp: Option<String>,
        /// JSON-lines, JSON-array or CloudTrail ({"Records": [...]}) files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Copy every message of one topic to another, unchanged (the broker-only ceiling).
    Passthrough {
        /// Topic to read.
        #[arg(long)]
        from: String,
        /// Topic to write.
        #[arg(long)]
        to: String,
    },
    /// Print a topic's messages (from its beginning), one per line, until it has been quiet
    /// for `--idle` seconds.
    Tail {
        /// The topic.
        #[arg(long)]
        topic: String,
        /// Seconds without a message before stopping.
        #[arg(long, default_value_t = 5.0)]
        idle: f64,
    },
    /// Open-loop end-to-end latency at fixed rates, measured from each event's intended send
    /// time to its decision consumed.
    Latency {
        /// Topic events are sent to.
        #[arg(long)]
        input: String,
        /// Topic decisions (or passed-through copies) are read from.
        #[arg(long)]
        output: String,
        /// Background records, JSON lines (their `eventTime` is set to the send time).
        #[arg(long)]
        background: PathBuf,
        /// The probe record, JSON: its `userIdentity.arn` becomes `.../probe-<n>`.
        #[arg(long)]
        probe: PathBuf,
        /// Every this many events one is a probe.
        #[arg(long, default_value_t = 100)]
        probe_every: u64,
        /// Background events are spread over this many actors.
        #[arg(long, default_value_t = 1_000_000)]
        actors: u64,
        /// Rates to measure, events per second, in order.
        #[arg(long, value_delimiter = ',', required = true)]
        rates: Vec<f64>,
        /// Seconds of load per rate.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Seconds at the start of each rate not counted.
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// A name for the system measured (printed in the table).
        #[arg(long, default_value = "rampart")]
        label: String,
    },
}

/// `--set` properties, applied to every client this process creates.
static PROPERTIES: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

fn configure(mut config: ClientConfig) -> ClientConfig {
    for (k, v) in PROPERTIES.get().into_iter().flatten() {
        config.set(k, v);
    }
    config
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut properties = Vec::new();
    for p in &cli.properties {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--set {p}: expected NAME=VALUE"))?;
        properties.push((k.to_string(), v.to_string()));
    }
    PROPERTIES.set(properties).expect("set once");
    match cli.command {
        Cmd::Feed {
            topic,
            rate,
            timestamp,
            files,
        } => feed(&cli.brokers, &topic, rate, timestamp.as_deref(), &files),
        Cmd::Passthrough { from, to } => passthrough(&cli.brokers, &from, &to),
        Cmd::Tail { topic, idle } => tail(&cli.brokers, &topic, Duration::from_secs_f64(idle)),
        Cmd::Latency {
            input,
            output,
            background,
            probe,
            probe_every,
            actors,
            rates,
            duration,
            warmup,
            label,
        } => {
            let load = Load::new(&background, &probe, probe_every, actors)?;
            println!(
                "| system | target ev/s | sent ev/s | probes | received | p50 ms | p99 ms | p99.9 ms | max ms |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            // Probe actors are new at every rate: a repeat would be a repeat block, which the
            // guard suppresses.
            let mut first_probe = 0;
            for rate in rates {
                let r = measure(
                    &cli.brokers,
                    &input,
                    &output,
                    &load,
                    (rate, first_probe),
                    duration,
                    warmup,
                )?;
                first_probe += (rate * duration as f64) as u64 / load.probe_every + 1;
                println!(
                    "| {label} | {rate:.0} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    r.sent_rate,
                    r.expected,
                    r.received,
                    r.quantile(0.5),
                    r.quantile(0.99),
                    r.quantile(0.999),
                    r.quantile(1.0)
                );
                // Let any backlog drain before the next rate.
                std::thread::sleep(Duration::from_secs(3));
            }
            Ok(())
        }
    }
}

fn producer(brokers: &str) -> Result<ThreadedProducer<DefaultProducerContext>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "1")
        .set("acks", "1")
        .set("message.timeout.ms", "0")
        .set("queue.buffering.max.messages", "1000000");
    configure(config).create().context("cannot create a producer")
}

/// Sends one message, waiting while the producer's queue is full.
fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, payload: &[u8]) -> Result<()> {
    send_at(producer, topic, payload, None)
}

/// Sends one message with this timestamp (milliseconds since the epoch; `None`: now), waiting
/// while the producer's queue is full.
fn send_at(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    payload: &[u8],
    timestamp: Option<i64>,
) -> Result<()> {
    let mut record = BaseRecord::<(), [u8]>::to(topic).payload(payload);
    if let Some(t) = timestamp {
        record = record.timestamp(t);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("cannot send to {topic}: {e}"),
        }
    }
}

/// Every record of a file, as JSON text: a JSON array or CloudTrail file gives its elements,
/// anything else is read as JSON lines.
fn records(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with("{\"Records\"") {
        let doc: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        let list = match doc {
            Value::Array(a) => a,
            Value::Object(mut o) => match o.remove("Records") {
                Some(Value::Array(a)) => a,
                _ => bail!("{} has no Records array", path.display()),
            },
            _ => bail!("{}: not an array of records", path.display()),
        };
        return Ok(list.iter().map(Value::to_string).collect());
    }
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// The time in `field` of a JSON record, in milliseconds since the epoch.
fn time_of(record: &str, field: &str) -> Result<i64> {
    let doc: Value = serde_json::from_str(record).context("a record is not JSON")?;
    let text = doc
        .get(field)
        .and_then(Value::as_str)
        .with_context(|| format!("a record has no text field {field}"))?;
    let time = chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("{field} = {text:?} is not an RFC 3339 time"))?;
    Ok(time.timestamp_millis())
}

fn feed(
    brokers: &str,
    topic: &str,
    rate: Option<f64>,
    timestamp: Option<&str>,
    files: &[PathBuf],
) -> Result<()> {
    let producer = producer(brokers)?;
    let started = Instant::now();
    let mut n = 0u64;
    for file in files {
        for record in records(file)? {
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(n as f64 / rate);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let at = timestamp.map(|field| time_of(&record, field)).transpose()?;
            send_at(&producer, topic, record.as_bytes(), at)?;
            n += 1;
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("the broker did not acknowledge every record")?;
    eprintln!(
        "fed {n} records to {topic} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn consumer(brokers: &str, group: &str) -> Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        // (Not librdkafka's 1 s pause once its queue is full: draining would idle.)
        .set("fetch.queue.backoff.ms", "10");
    configure(config).create().context("cannot create a consumer")
}

/// Assigns every partition of `topic` from its end, and waits until the positions are known
/// (so that nothing sent afterwards is missed).
fn assign_from_end(consumer: &BaseConsumer, topic: &str) -> Result<()> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("no metadata for {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("topic {topic} does not exist");
    }
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    Ok(())
}

fn tail(brokers: &str, topic: &str, idle: Duration) -> Result<()> {
    use std::io::Write;
    let consumer = consumer(brokers, "rampart-load-tail")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("no metadata for {topic}"))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut out = std::io::stdout().lock();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.write_all(m.payload().unwrap_or_default())?;
                out.write_all(b"\n")?;
                out.flush()?;
                last = Instant::now();
            }
            Some(Err(e)) => eprintln!("tail {topic}: {e}"),
            None => {}
        }
    }
    Ok(())
}

fn passthrough(brokers: &str, from: &str, to: &str) -> Result<()> {
    let consumer = consumer(brokers, "rampart-load-passthrough")?;
    assign_from_end(&consumer, from)?;
    let producer = producer(brokers)?;
    eprintln!("passthrough: {from} -> {to}");
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => send(&producer, to, m.payload().unwrap_or_default())?,
            Some(Err(e)) => eprintln!("passthrough: {e}"),
            None => {}
        }
    }
}

/// A message template: text with the event time and an actor number to fill in.
struct Template {
    pieces: Vec<Piece>,
}

enum Piece {
    Text(String),
    Time,
    Number,
}

// Placeholders JSON writes unescaped.
const MARK: &str = "@@rampart-load:";
const TIME: &str = "@@rampart-load:time@@";
const NUMBER: &str = "@@rampart-load:number@@";

impl Template {
    /// `record` with its `eventTime` and `userIdentity.arn` (`.../<prefix><n>`) made blanks.
    fn new(mut record: Value, prefix: &str) -> Self {
        record["eventTime"] = Value::String(TIME.into());
        record["userIdentity"]["arn"] =
            Value::String(format!("arn:aws:iam::123456789012:user/{prefix}{NUMBER}"));
        let text = record.to_string();
        let mut pieces = Vec::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(MARK) {
            pieces.push(Piece::Text(rest[..at].to_string()));
            rest = &rest[at..];
            if let Some(r) = rest.strip_prefix(TIME) {
                pieces.push(Piece::Time);
                rest = r;
            } else if let Some(r) = rest.strip_prefix(NUMBER) {
                pieces.push(Piece::Number);
                rest = r;
            } else {
                pieces.push(Piece::Text(MARK.into()));
                rest = &rest[MARK.len()..];
            }
        }
        pieces.push(Piece::Text(rest.to_string()));
        Self { pieces }
    }

    fn fill(&self, time: &str, number: u64, out: &mut String) {
        use std::fmt::Write;
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Time => out.push_str(time),
                Piece::Number => {
                    let _ = write!(out, "{number}");
                }
            }
        }
    }
}

/// The load: background records (each event a different actor among `actors`) and, every
/// `probe_every` events, the probe with its sequence number in its actor.
struct Load {
    background: Vec<Template>,
    probe: Template,
    probe_every: u64,
    actors: u64,
}

impl Load {
    fn new(background: &Path, probe: &Path, probe_every: u64, actors: u64) -> Result<Self> {
        let mut templates = Vec::new();
        let file = std::fs::File::open(background)
            .with_context(|| format!("cannot open {}", background.display()))?;
        for line in std::io::BufReader::new(file).lines().take(20_000) {
            let v: Value = serde_json::from_str(&line?).context("background records are JSON lines")?;
            templates.push(Template::new(v, "bg-"));
        }
        if templates.is_empty() {
            bail!("{} has no records", background.display());
        }
        let p: Value = serde_json::from_str(
            &std::fs::read_to_string(probe).with_context(|| format!("cannot read {}", probe.display()))?,
        )
        .context("the probe is one JSON record")?;
        Ok(Self {
            background: templates,
            probe: Template::new(p, "probe-"),
            probe_every: probe_every.max(1),
            actors: actors.max(1),
        })
    }

    /// Event `i`'s message, with `time` as its event time; probes are numbered from
    /// `first_probe`.
    fn message(&self, i: u64, first_probe: u64, time: &str, out: &mut String) {
        out.clear();
        if i.is_multiple_of(self.probe_every) {
            self.probe.fill(time, first_probe + i / self.probe_every, out);
        } else {
            let template = &self.background[(i as usize) % self.background.len()];
            template.fill(time, i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.actors, out);
        }
    }
}

struct Measured {
    histogram: Histogram<u64>,
    expected: u64,
    received: u64,
    sent_rate: f64,
}

impl Measured {
    fn quantile(&self, q: f64) -> f64 {
        if self.histogram.is_empty() {
            return f64::NAN;
        }
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }
}

/// The sequence number after `probe-` in a message, if any.
fn probe_of(payload: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(payload, b"/probe-")? + 7;
    let digits = payload[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&payload[at..at + digits]).ok()?.parse().ok()
}

fn measure(
    brokers: &str,
    input: &str,
    output: &str,
    load: &Load,
    (rate, first_probe): (f64, u64),
    duration: u64,
    warmup: u64,
) -> Result<Measured> {
    let receiver = consumer(brokers, "rampart-load-latency")?;
    assign_from_end(&receiver, output)?;
    let producer = producer(brokers)?;
    let done = Arc::new(AtomicBool::new(false));
    let schedule = Schedule::new(rate, first_probe, load.probe_every, duration, warmup);
    let Schedule {
        started,
        total,
        expected,
        ..
    } = schedule;

    let measured = std::thread::scope(|scope| -> Result<Measured> {
        let done_r = Arc::clone(&done);
        let receiving = scope.spawn(move || receive_probes(&receiver, &schedule, &done_r));

        let mut message = String::with_capacity(4096);
        for i in 0..total {
            let due = Duration::from_secs_f64(i as f64 / rate);
            let now = started.elapsed();
            if due > now {
                let wait = due - now;
                if wait > Duration::from_micros(200) {
                    std::thread::sleep(wait);
                }
            }
            let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            load.message(i, first_probe, &time, &mut message);
            send(&producer, input, message.as_bytes())?;
        }
        let send_seconds = started.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        let (histogram, received) = receiving.join().expect("receiver thread");
        Ok(Measured {
            histogram,
            expected,
            received,
            sent_rate: total as f64 / send_seconds,
        })
    })?;
    Ok(measured)
}

/// When each event is due and which of them are probes to time.
#[derive(Clone, Copy)]
struct Schedule {
    /// When sending started.
    started: Instant,
    /// Events per second.
    rate: f64,
    /// The sequence number of the first probe.
    first_probe: u64,
    /// Every this many events is a probe.
    probe_every: u64,
    /// Events sent before timing starts.
    warmup_events: u64,
    /// Events to send.
    total: u64,
    /// Probes timed (after the warm-up).
    expected: u64,
}

impl Schedule {
    /// `duration` seconds at `rate` events per second, starting now; the first `warmup`
    /// seconds are not timed.
    fn new(rate: f64, first_probe: u64, probe_every: u64, duration: u64, warmup: u64) -> Self {
        let total = (rate * duration as f64) as u64;
        let warmup_events = (rate * warmup as f64) as u64;
        Self {
            started: Instant::now(),
            rate,
            first_probe,
            probe_every,
            warmup_events,
            total,
            expected: (warmup_events.div_ceil(probe_every)..total.div_ceil(probe_every)).count() as u64,
        }
    }
}

/// Receives the decisions on the probes until every timed one arrived, or 10 s after `done`
/// (the last send) without one: the latencies from each probe's intended send time, and how
/// many arrived.
fn receive_probes(receiver: &BaseConsumer, schedule: &Schedule, done: &AtomicBool) -> (Histogram<u64>, u64) {
    let Schedule {
        started,
        rate,
        first_probe,
        probe_every,
        warmup_events,
        total,
        expected,
    } = *schedule;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let mut seen = std::collections::HashSet::new();
    let mut quiet_since: Option<Instant> = None;
    // The worst latency per second of intended send time (printed to stderr: where a
    // tail comes from).
    let mut worst: Vec<u64> = Vec::new();
    loop {
        match receiver.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                let now = started.elapsed();
                let Some(seq) = m
                    .payload()
                    .and_then(probe_of)
                    .and_then(|s| s.checked_sub(first_probe))
                else {
                    continue;
                };
                let i = seq * probe_every;
                if i < warmup_events || i >= total || !seen.insert(seq) {
                    continue;
                }
                let intended = Duration::from_secs_f64(i as f64 / rate);
                let latency = now.saturating_sub(intended).as_micros() as u64;
                histogram.saturating_record(latency.max(1));
                let second = intended.as_secs() as usize;
                if worst.len() <= second {
                    worst.resize(second + 1, 0);
                }
                worst[second] = worst[second].max(latency);
                quiet_since = None;
            }
            Some(Err(e)) => eprintln!("latency receiver: {e}"),
            None => {}
        }
        if seen.len() as u64 >= expected {
            break;
        }
        if done.load(Ordering::Relaxed) {
            // After the last send, wait up to 10 s for the rest.
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
    }
    let worst: Vec<String> = worst.iter().map(|us| format!("{}", us / 1000)).collect();
    eprintln!("worst latency (ms) per second of sending: {}", worst.join(" "));
    (histogram, seen.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_time_and_actor() {
        let record = serde_json::json!({"eventName": "StopLogging", "eventTime": "old",
            "userIdentity": {"arn": "old", "type": "IAMUser"}});
        let template = Template::new(record, "probe-");
        let mut out = String::new();
        template.fill("2026-11-22T20:00:00.000001Z", 42, &mut out);
        let v: Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(v["eventTime"], "2026-11-22T20:00:00.000001Z");
        assert_eq!(
            v["userIdentity"]["arn"],
            "arn:aws:iam::123456789012:user/probe-42"
        );
        assert_eq!(probe_of(out.as_bytes()), Some(42));
    }

    #[test]
    fn finds_probe_numbers() {
        assert_eq!(
            probe_of(br#"{"actor":"arn:aws:iam::1:user/probe-42","x":1}"#),
            Some(42)
        );
        assert_eq!(probe_of(b"nothing here"), None);
    }
}
