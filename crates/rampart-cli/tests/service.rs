//! `rampart run` against a real Kafka-protocol broker (Tansu) on loopback, started here: events
//! in, decisions and dead letters out, the enforcement client, a SIGKILL in the middle of a
//! stream, and a broker that stops answering for 30 s under load.
//!
//! The broker comes from `scripts/setup.sh` (`~/.cache/rampart/bin/tansu`, or `RAMPART_TANSU`).
//! These tests fail, never skip, when it cannot start.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

mod common;

use common::root;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The Tansu binary `scripts/setup.sh` installs (or `RAMPART_TANSU`).
fn tansu() -> PathBuf {
    std::env::var_os("RAMPART_TANSU").map_or_else(
        || PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/rampart/bin/tansu"),
        PathBuf::from,
    )
}

/// Replaces `from` with `to` in a file of a test pipeline (which must contain it).
fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replace(from, to)).expect("write");
}

/// A Tansu broker (in-memory storage) on a free loopback port, killed when dropped.
struct Broker {
    child: Child,
    port: u16,
}

impl Broker {
    fn start() -> Self {
        let tansu = tansu();
        assert!(
            tansu.is_file(),
            "the Tansu broker is not installed at {}: run scripts/setup.sh",
            tansu.display()
        );
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tansu.display()));
        let broker = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the broker did not listen on {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn create_topic(&self, name: &str) {
        self.create_topic_with(name, 1);
    }

    fn create_topic_with(&self, name: &str, partitions: u32) {
        let tansu = tansu();
        let out = Command::new(tansu)
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
                "--broker",
            ])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .output()
            .expect("tansu topic create runs");
        assert!(
            out.status.success(),
            "cannot create topic {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGSTOP / SIGCONT: the broker stops answering (connections stay open, requests hang),
    /// keeping its in-memory log.
    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {signal} failed");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn producer(broker: &Broker) -> ThreadedProducer<DefaultProducerContext> {
    lingering_producer(broker, 5)
}

/// A producer that waits up to `linger_ms` to fill a record batch.
fn lingering_producer(broker: &Broker, linger_ms: u32) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("message.timeout.ms", "0")
        .set("linger.ms", linger_ms.to_string())
        .create()
        .expect("a producer")
}

fn produce(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, payload: &[u8]) {
    produce_to(producer, topic, None, payload);
}

/// Produces one message with headers to `topic` and waits until the broker has it.
fn produce_with_headers(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) {
    let mut owned = rdkafka::message::OwnedHeaders::new();
    for (key, value) in headers {
        owned = owned.insert(rdkafka::message::Header {
            key,
            value: Some(*value),
        });
    }
    let record = BaseRecord::<(), [u8]>::to(topic).payload(payload).headers(owned);
    producer.send(record).map_err(|(e, _)| e).expect("send");
    producer.flush(Duration::from_secs(10)).expect("flush");
}

/// Makes a signing key pair `ID.key.pem` / `ID.pub.pem` in `dir` with `rampart keys generate`.
fn generate_key(dir: &Path, id: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["keys", "generate", "--id", id, "--dir"])
        .arg(dir)
        .output()
        .expect("rampart runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Produces to `partition` of `topic` (`None`: the partitioner chooses).
fn produce_to(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: Option<i32>,
    payload: &[u8],
) {
    let mut record = BaseRecord::<(), [u8]>::to(topic).payload(payload);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// One consumed message: payload and headers.
struct Consumed {
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
}

/// Reads `topic` (partition 0) from the beginning until `done` says so or `timeout` passes.
fn consume_until(
    broker: &Broker,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "rampart-tests")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !done(&out) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        headers.insert(
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Consumed {
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(e)) => eprintln!("consume {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// Reads all of `topic` that arrives until it has been quiet for `quiet`.
fn drain(broker: &Broker, topic: &str, quiet: Duration) -> Vec<Consumed> {
    let last = std::cell::Cell::new((0usize, Instant::now()));
    consume_until(broker, topic, Duration::from_secs(120), |got| {
        let (n, since) = last.get();
        if got.len() != n {
            last.set((got.len(), Instant::now()));
            return false;
        }
        since.elapsed() >= quiet
    })
}

/// A `rampart run` process.
struct Service {
    child: Child,
    listen: String,
    /// Its stderr (beside the state directory).
    log: PathBuf,
}

impl Service {
    fn start(pipeline: &Path, broker: &Broker, state: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(pipeline, broker, state, extra, &[])
    }

    /// [`Self::start`] with these environment variables set.
    fn start_with_env(
        pipeline: &Path,
        broker: &Broker,
        state: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        let log = state.with_extension("log");
        let stderr = std::fs::File::create(&log).expect("the service's log file");
        let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .arg("run")
            .arg(pipeline)
            .args(["--brokers", &broker.address(), "--listen", &listen, "--state"])
            .arg(state)
            .args(extra)
            .env(
                "RAMPART_LOG",
                std::env::var("RAMPART_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("rampart run starts");
        Self { child, listen, log }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(&self.listen).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
        Some((status, body))
    }

    /// POSTs to `path` (an admin command) with `token` as its bearer token, if any; the
    /// status and body.
    fn post(&self, path: &str, token: Option<&str>) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(&self.listen).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(40))).ok()?;
        let authorization = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            stream,
            "POST {path} HTTP/1.0\r\nHost: x\r\n{authorization}Content-Length: 0\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
        Some((status, body))
    }

    /// The value of a metric line (`name` includes labels), if exposed.
    fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until `/readyz` answers 200.
    fn wait_ready(&self, timeout: Duration) {
        self.wait_for("ready", timeout, |s| {
            s.get("/readyz").is_some_and(|(status, _)| status == 200)
        });
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; {}",
                self.diagnosis()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the service says about itself: readiness, its progress metrics and the end of
    /// its log.
    fn diagnosis(&self) -> String {
        let ready = self
            .get("/readyz")
            .map(|(status, body)| format!("{status} {body}"));
        let metrics = self.get("/metrics").map(|(_, body)| {
            body.lines()
                .filter(|l| {
                    [
                        "rampart_events_total",
                        "rampart_consumer_lag",
                        "rampart_bad_records_total",
                        "rampart_watermark_seconds",
                        "rampart_partition_watermark_seconds",
                        "rampart_partition_paused",
                    ]
                    .iter()
                    .any(|m| l.starts_with(m))
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("/readyz: {ready:?}; metrics: {metrics:?}; the log's end:\n{tail}")
    }

    fn signal(&self, signal: &str) {
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
    }

    /// Waits for the process to exit; returns its status and stderr.
    fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let err = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("rampart run did not exit within {timeout:?}; stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // RAMPART_TEST_LOGS=DIR keeps every service's log there.
        if let Ok(dir) = std::env::var("RAMPART_TEST_LOGS") {
            let name = format!(
                "{}-{}",
                self.child.id(),
                self.log.file_name().unwrap_or_default().to_string_lossy()
            );
            let _ = std::fs::copy(&self.log, Path::new(&dir).join(name));
        }
    }
}

/// Waits until `enforcer` has read what it starts from to its end.
fn wait_caught_up(enforcer: &rampart_enforce::Enforcer, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !enforcer.caught_up() {
        assert!(Instant::now() < deadline, "{what} never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn decisions(messages: &[Consumed]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).expect("a decision is JSON"))
        .collect()
}

/// A copy of the cloudtrail pipeline (its [kafka] section included).
fn cloudtrail_pipeline(dir: &Path) -> PathBuf {
    let dst = common::pipeline_copy("cloudtrail", dir);
    let toml = std::fs::read_to_string(dst.join("pipeline.toml")).expect("pipeline.toml");
    assert!(
        toml.contains("input_topics = [\"cloudtrail\"]")
            && toml.contains("decisions_topic = \"rampart.decisions\""),
        "the cloudtrail pipeline's [kafka] section names the topics this test uses"
    );
    dst
}

/// Every Stratus detonation record, in event-time order: each detonation keeps its own timing
/// and starts 20 s after the previous one, the last one ending about now (so that the blocks
/// they cause are active, not long expired).
fn detonation_records_now() -> Vec<Value> {
    let dir = root().join("data/cloudtrail/stratus-detonation-logs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("detonation logs")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let time = |r: &Value| {
        chrono::DateTime::parse_from_rfc3339(r["eventTime"].as_str().expect("eventTime"))
            .expect("time")
            .with_timezone(&chrono::Utc)
    };
    let now = chrono::Utc::now();
    let mut records = Vec::new();
    for (k, file) in files.iter().enumerate() {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("JSON");
        let mut list = doc
            .get("Records")
            .unwrap_or(&doc)
            .as_array()
            .expect("records")
            .clone();
        list.sort_by_key(time);
        let first = time(&list[0]);
        let start = now - chrono::Duration::seconds(20 * (files.len() - k) as i64 + 120);
        for mut r in list {
            let moved = start + (time(&r) - first);
            r["eventTime"] = Value::String(moved.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            records.push(r);
        }
    }
    records.sort_by_key(time);
    records
}

fn key(d: &Value) -> (String, String, String) {
    (
        d["detector"]["id"].as_str().unwrap_or_default().to_string(),
        d["actor"].as_str().unwrap_or_default().to_string(),
        d["event_time"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn events_in_decisions_and_dead_letters_out_and_enforcement_sees_the_blocks() {
    let broker = Broker::start();
    broker.create_topic("cloudtrail");
    let tmp = tempfile::tempdir().expect("tempdir");
    let pipeline = cloudtrail_pipeline(tmp.path());

    // The same records through `rampart replay` give the expected decisions.
    let records = detonation_records_now();
    let jsonl = tmp.path().join("records.jsonl");
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&jsonl, text).expect("write");
    let replayed = tmp.path().join("replayed.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("replay")
        .arg(&pipeline)
        .arg("--input")
        .arg(&jsonl)
        .arg("--output")
        .arg(&replayed)
        .arg("--state")
        .arg(tmp.path().join("replay-state"))
        .arg("--quiet")
        .output()
        .expect("replay runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected: Vec<Value> = std::fs::read_to_string(&replayed)
        .expect("replayed")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert!(
        expected.len() >= 20,
        "the detonations give decisions ({})",
        expected.len()
    );

    let service = Service::start(&pipeline, &broker, &tmp.path().join("state"), &[]);
    let kafka = producer(&broker);
    let bad: [&[u8]; 2] = [
        b"{\"eventTime\": \"2026-01-01T00:00:00Z\", not json",
        b"\xff\xfe\x00 not UTF-8",
    ];
    let mut bad_offsets = Vec::new();
    let mut offset = 0i64;
    for (i, r) in records.iter().enumerate() {
        if i == 10 || i == 20 {
            produce(&kafka, "cloudtrail", bad[usize::from(i == 20)]);
            bad_offsets.push(offset);
            offset += 1;
        }
        produce(&kafka, "cloudtrail", r.to_string().as_bytes());
        offset += 1;
    }
    kafka.flush(Duration::from_secs(30)).expect("flush");

    let n = records.len() as f64;
    service.wait_for("every event consumed", Duration::from_secs(60), |s| {
        s.metric("rampart_events_total") == Some(n)
    });
    service.wait_ready(Duration::from_secs(10));
    assert_eq!(service.get("/healthz").map(|r| r.0), Some(200));
    assert_eq!(service.metric("rampart_bad_records_total"), Some(2.0));
    // No admin token is configured: admin commands are off, as the log said at start, where
    // it also said that decisions are not signed.
    let (code, body) = service.post("/admin/reload", Some(ALICE)).expect("answers");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("no admin token is configured"), "{body}");
    assert_eq!(
        service.metric(r#"rampart_admin_refused_total{reason="disabled"}"#),
        Some(1.0)
    );
    let log = std::fs::read_to_string(&service.log).expect("the log");
    assert!(log.contains("admin commands are off"), "{log}");
    assert!(log.contains("decisions are not signed"), "{log}");
    assert!(!log.contains('\u{1b}'), "no colour codes in a log file");
    for name in [
        "rampart_decisions_total{detector=\"trail-logging-disabled\",verdict=\"block\",mode=\"enforce\"}",
        "rampart_end_to_end_latency_seconds{quantile=\"0.99\"}",
        "rampart_processing_latency_seconds{quantile=\"0.5\"}",
        "rampart_state_disk_bytes",
        "rampart_batch_events_bucket",
    ] {
        // (The batch's counters are updated as it is processed: wait for it to finish.)
        service.wait_for(name, Duration::from_secs(10), |s| {
            s.get("/metrics").is_some_and(|(_, body)| body.contains(name))
        });
    }

    let got = consume_until(&broker, "rampart.decisions", Duration::from_secs(30), |m| {
        m.len() >= expected.len()
    });
    // Nothing more arrives.
    std::thread::sleep(Duration::from_secs(1));
    let got = decisions(&got);
    let mut want: Vec<_> = expected.iter().map(key).collect();
    let mut have: Vec<_> = got.iter().map(key).collect();
    want.sort();
    have.sort();
    assert_eq!(have, want, "the service decides what replay decides");
    for d in &got {
        assert_eq!(
            d["source"]["topic"], "cloudtrail",
            "decisions name their Kafka source: {d}"
        );
    }

    let letters = consume_until(&broker, "rampart.dead-letters", Duration::from_secs(10), |m| {
        m.len() >= 2
    });
    assert_eq!(letters.len(), 2);
    for (letter, (offset, original)) in letters.iter().zip(bad_offsets.iter().zip(bad)) {
        assert_eq!(letter.payload, original, "the original bytes");
        assert_eq!(letter.headers["rampart.kind"], "malformed");
        assert_eq!(letter.headers["rampart.topic"], "cloudtrail");
        assert_eq!(letter.headers["rampart.partition"], "0");
        assert_eq!(letter.headers["rampart.offset"], offset.to_string());
        assert!(!letter.headers["rampart.error"].is_empty());
    }

    // An enforcement point reading the decisions topic from its beginning sees the blocks,
    // with their expiry.
    let enforcer = rampart_enforce::Enforcer::start(rampart_enforce::Config {
        brokers: broker.address(),
        topic: "rampart.decisions".into(),
        bootstrap: rampart_enforce::Bootstrap::Decisions,
        ..Default::default()
    })
    .expect("the enforcer starts");
    // (The records keep their original spacing, days apart: early detonations' blocks have
    // expired by now, the later ones are active.)
    let expiry = |d: &Value| {
        d["expires_at"]
            .as_str()
            .map(|t| chrono::DateTime::parse_from_rfc3339(t).expect("expires_at"))
    };
    let soon = chrono::Utc::now() + chrono::Duration::minutes(5);
    let active: Vec<&Value> = got
        .iter()
        .filter(|d| d["verdict"] == "block" && d["mode"] == "enforce" && expiry(d).is_some_and(|t| t > soon))
        .collect();
    let block = active.first().expect("an active block decision");
    let actor = block["actor"].as_str().expect("actor");
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        if let Some(b) = enforcer.is_blocked(actor, "AnyAction") {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "the enforcer never saw the block of {actor}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let latest = active
        .iter()
        .filter(|d| d["actor"] == actor)
        .filter_map(|d| expiry(d))
        .max()
        .expect("expiry");
    assert_eq!(seen.expires_at, latest, "the block lasts until the latest expiry");
    assert_eq!(
        enforcer.is_blocked("arn:aws:iam::000000000000:user/nobody", "ListBuckets"),
        None
    );
    wait_caught_up(&enforcer, "the enforcer", Duration::from_secs(20));
    let stats = enforcer.stats();
    assert_eq!(stats.decisions as usize, got.len());
    assert_eq!(
        stats.blocks as usize,
        active.len(),
        "one block per active block decision"
    );
    let expired = got
        .iter()
        .filter(|d| d["verdict"] == "block" && expiry(d).is_some_and(|t| t <= chrono::Utc::now()))
        .count();
    assert_eq!(stats.expired as usize, expired);

    // A gateway started from the enforcement state, reading no old decision (as if the
    // decisions topic's retention had dropped them), refuses the same actors until the same
    // expiry, after reading only what is in force.
    let later = rampart_enforce::Enforcer::start(rampart_enforce::Config {
        brokers: broker.address(),
        topic: "rampart.decisions".into(),
        bootstrap: rampart_enforce::Bootstrap::State("rampart.decisions.enforcement".into()),
        lookback: Duration::ZERO,
        ..Default::default()
    })
    .expect("the enforcer starts");
    wait_caught_up(&later, "the later gateway", Duration::from_secs(20));
    for d in &active {
        let actor = d["actor"].as_str().expect("actor");
        let latest = active
            .iter()
            .filter(|d| d["actor"] == actor)
            .filter_map(|d| expiry(d))
            .max();
        assert_eq!(
            later
                .is_blocked(actor, "AnyAction")
                .map(|b| b.expires_at.fixed_offset()),
            latest,
            "{actor} refused until its latest expiry"
        );
    }
    // What the service wrote to the state: its blocks and holds in force (Tansu does not
    // compact, so a key's older records are read too).
    let in_force = got
        .iter()
        .filter(|d| {
            (d["verdict"] == "block" || d["verdict"] == "review")
                && d["mode"] == "enforce"
                && expiry(d).is_some_and(|t| t > chrono::Utc::now())
        })
        .count();
    let stats = later.stats();
    // (Tansu 0.6 answers "the end of the decisions topic" with the start of its last record
    // batch plus one, so the rest of that batch is read too.)
    assert!(
        (stats.blocks + stats.reviews) as usize == in_force
            && stats.decisions < got.len() as u64
            && stats.expired == 0,
        "only blocks and holds in force were read: {stats:?}, {in_force} in force of {} decisions",
        got.len()
    );

    service.signal("-TERM");
    let (status, stderr) = service.wait(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0: {status}\n{stderr}");
    assert!(stderr.contains("stopped:"), "{stderr}");
}

/// A small pipeline over synthetic events: one per-event block and two windows.
fn synthetic_pipeline(dir: &Path, name: &str, decisions_topic: &str) -> PathBuf {
    synthetic_pipeline_on(dir, name, decisions_topic, "events", "")
}

/// [`synthetic_pipeline`] reading `input` with more `[service]` settings.
fn synthetic_pipeline_on(
    dir: &Path,
    name: &str,
    decisions_topic: &str,
    input: &str,
    service: &str,
) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.join("detectors")).expect("mkdir");
    std::fs::write(
        p.join("pipeline.toml"),
        format!(
            r#"
name = "synthetic"
[source]
batch_size = 512
[mapping]
event_time = "t"
actor = "user"
action = "op"
origin = "ip"
[state]
allowed_lateness = "1s"
# These tests judge the Kafka path: every detector match is published (no repeat suppression
# beyond 1 ms of event time, no blast-radius fail-safe).
[decisions]
default_block_for = "1ms"
dedup_for = "0s"
[decisions.blast_radius]
enabled = false
[kafka]
group = "{name}"
input_topics = ["{input}"]
decisions_topic = "{decisions_topic}"
dead_letter_topic = "{decisions_topic}.dead"
create_topics = true
[service]
checkpoint_interval = "100ms"
{service}
"#
        ),
    )
    .expect("write");
    let detectors = [
        (
            "deletes.sql",
            "-- id: deletes\n-- verdict: block\n-- severity: high\n-- reason: {{actor}} deleted from {{origin}}\n\
             SELECT actor, origin FROM events WHERE action = 'Delete' AND origin = '10.0.0.7'\n",
        ),
        (
            "burst.sql",
            "-- id: burst\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}} made {{n}} calls within 2 seconds\n\
             SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time \
             RANGE BETWEEN INTERVAL '2 seconds' PRECEDING AND CURRENT ROW) AS n FROM events) WHERE n >= 200\n",
        ),
        (
            "origins.sql",
            "-- id: origins\n-- verdict: review\n-- severity: medium\n-- reason: {{actor}} used {{k}} origins within 5 seconds\n\
             SELECT actor, k FROM (SELECT actor, count(DISTINCT origin) OVER (PARTITION BY actor ORDER BY event_time \
             RANGE BETWEEN INTERVAL '5 seconds' PRECEDING AND CURRENT ROW) AS k FROM events) WHERE k >= 8\n",
        ),
    ];
    for (file, sql) in detectors {
        std::fs::write(p.join("detectors").join(file), sql).expect("write");
    }
    p
}

/// Synthetic event `i`: 50 users at about 500 events per second of event time, with a burst of
/// one user every 5 s.
fn synthetic_event(i: u64) -> String {
    synthetic_event_shifted(i, 0)
}

/// [`synthetic_event`] `shift_ms` later (earlier when negative) in event time.
fn synthetic_event_shifted(i: u64, shift_ms: i64) -> String {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 31;
    let ms = i * 2;
    let in_burst = (ms % 5000) < 1000 && i.is_multiple_of(2);
    let user = if in_burst { (ms / 5000) % 50 } else { x % 50 };
    let ops = ["Get", "List", "Put", "Delete"];
    let op = ops[((x >> 8) % 4) as usize];
    // Each user keeps to two origins, but a burst comes from all sixteen.
    let ip = if in_burst {
        (x >> 16) % 16
    } else {
        (user * 3 + (x >> 16) % 2) % 16
    };
    let t = chrono::DateTime::from_timestamp_millis(1_767_225_600_000 + ms as i64 + shift_ms).expect("time");
    format!(
        r#"{{"t":"{}","user":"u{user}","op":"{op}","ip":"10.0.0.{ip}"}}"#,
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

/// Decision id -> decision, and how many ids came more than once.
fn by_id(messages: &[Consumed]) -> (BTreeMap<String, Value>, usize) {
    let mut out = BTreeMap::new();
    let mut repeats = 0;
    for d in decisions(messages) {
        let id = d["decision_id"].as_str().expect("id").to_string();
        if let Some(before) = out.insert(id, d.clone()) {
            repeats += 1;
            assert_eq!(
                before["evidence"], d["evidence"],
                "a re-sent decision is the same decision"
            );
        }
    }
    (out, repeats)
}

/// Same decisions as the uninterrupted reference: none missing, none extra, and the same
/// evidence (a window that counted an event twice would show a different count).
fn assert_same_decisions(run: &BTreeMap<String, Value>, reference: &BTreeMap<String, Value>) {
    let missing: Vec<_> = reference.keys().filter(|k| !run.contains_key(*k)).collect();
    let extra: Vec<_> = run.keys().filter(|k| !reference.contains_key(*k)).collect();
    let by_detector = |ids: &[&String], from: &BTreeMap<String, Value>| {
        let mut counts = BTreeMap::<String, usize>::new();
        for id in ids {
            *counts.entry(from[*id]["detector"]["id"].to_string()).or_default() += 1;
        }
        counts
    };
    assert!(
        missing.is_empty(),
        "{} decisions missing (by detector {:?}; {} extra, by detector {:?}), e.g. {:?}",
        missing.len(),
        by_detector(&missing, reference),
        extra.len(),
        by_detector(&extra, run),
        reference.get(missing[0]).map(|m| (
            m,
            run.values()
                .find(|d| d["evidence"] == m["evidence"] && d["detector"] == m["detector"])
        ))
    );
    assert!(
        extra.is_empty(),
        "{} extra decisions, e.g. {:?}",
        extra.len(),
        run.get(extra[0])
    );
    for (id, d) in reference {
        assert_eq!(run[id]["evidence"], d["evidence"], "decision {id}");
    }
    let verdicts: BTreeSet<&str> = reference.values().filter_map(|d| d["verdict"].as_str()).collect();
    assert_eq!(verdicts.len(), 3, "all three detectors fired: {verdicts:?}");
}

/// The uninterrupted run over the whole `events` topic (its own group, state and decisions
/// topic): decision id -> decision.
fn reference_run(broker: &Broker, dir: &Path, events: u64) -> BTreeMap<String, Value> {
    reference_run_with(broker, dir, events, |_| {})
}

/// [`reference_run`] of the synthetic pipeline as `prepare` changes it.
fn reference_run_with(
    broker: &Broker,
    dir: &Path,
    events: u64,
    prepare: impl Fn(&Path),
) -> BTreeMap<String, Value> {
    let reference = synthetic_pipeline(dir, "reference", "decisions-reference");
    prepare(&reference);
    let (status, stderr) = Service::start(&reference, broker, &dir.join("reference-state"), &["--until-end"])
        .wait(Duration::from_secs(120));
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("stopped: {events} events,")),
        "the reference run consumed the whole topic: {}",
        stderr.lines().last().unwrap_or_default()
    );
    let (decisions, repeats) = by_id(&drain(broker, "decisions-reference", Duration::from_secs(2)));
    assert_eq!(repeats, 0, "an uninterrupted run sends each decision once");
    decisions
}

/// Produces synthetic events on a thread at about `rate` per second until `total`, in
/// batches of up to 200 ms: Tansu's in-memory storage serves a partition of some ten thousand
/// record batches very slowly (a fresh consumer of 120,000 events in batches of 10 got 20,951
/// of them in two minutes; of 60,000 in batches of 10, all in 2.9 s; of 60,000 written at
/// 1,000/s in 200 ms batches, all in 0.2 s), which stalled reference runs over minute-long
/// streams written in 5 ms batches.
fn feed(broker: &Broker, total: u64, rate: u64) -> std::thread::JoinHandle<()> {
    feed_partitions(broker, total, rate, 1)
}

/// [`feed`] round robin over `partitions` partitions of `events` (as a producer keying by
/// event id does).
fn feed_partitions(broker: &Broker, total: u64, rate: u64, partitions: u64) -> std::thread::JoinHandle<()> {
    let kafka = lingering_producer(broker, 200);
    std::thread::spawn(move || {
        let started = Instant::now();
        for i in 0..total {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            let partition = (partitions > 1).then_some((i % partitions) as i32);
            produce_to(&kafka, "events", partition, synthetic_event(i).as_bytes());
        }
        kafka.flush(Duration::from_secs(120)).expect("flush");
    })
}

#[test]
fn a_service_killed_mid_stream_resumes_without_losing_or_double_counting() {
    killed_mid_stream_and_restarted(false);
}

#[test]
fn a_service_killed_mid_stream_is_replaced_on_an_empty_disk_from_the_changelog() {
    killed_mid_stream_and_restarted(true);
}

/// Kills a service a third of the way into a stream (SIGKILL: no last checkpoint), restarts
/// it on the same state directory or, with `new_disk`, on an empty one (the window state then
/// comes from the changelog topic alone), and compares the decisions with an uninterrupted run.
fn killed_mid_stream_and_restarted(new_disk: bool) {
    let broker = Broker::start();
    // Four partitions, events round robin: each partition's watermark and the rows that
    // fired at once are in the checkpoint.
    broker.create_topic_with("events", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 90_000;
    let victim = synthetic_pipeline(tmp.path(), "victim", "decisions");
    let state = tmp.path().join("victim-state");
    let service = Service::start(&victim, &broker, &state, &[]);
    service.wait_ready(Duration::from_secs(30));
    let feeding = feed_partitions(&broker, total, 15_000, 4);
    service.wait_for("a third of the stream", Duration::from_secs(60), |s| {
        s.metric("rampart_events_total")
            .is_some_and(|n| n >= total as f64 / 3.0)
    });
    service.signal("-KILL");
    let (status, _) = service.wait(Duration::from_secs(10));
    assert!(!status.success());
    // Restarted once the whole stream is on the broker, so that `--until-end` stops at its end.
    feeding.join().expect("feeding");
    let state = if new_disk {
        // As if the victim died writing a checkpoint to the changelog: an entry, no marker.
        let kafka = producer(&broker);
        kafka
            .send(
                BaseRecord::to("victim-changelog")
                    .key(&b"rnot-a-window-key"[..])
                    .payload(&b"torn"[..]),
            )
            .map_err(|(e, _)| e)
            .expect("queued");
        kafka.flush(Duration::from_secs(10)).expect("flush");
        tmp.path().join("replacement-state")
    } else {
        state
    };
    let restarted = Service::start(&victim, &broker, &state, &["--until-end"]);
    let (status, stderr) = restarted.wait(Duration::from_secs(120));
    assert!(status.success(), "{stderr}");
    if new_disk {
        let restored = stderr
            .lines()
            .find(|l| l.contains("window state restored from its changelog"))
            .unwrap_or_else(|| panic!("the replacement restored the state from the changelog: {stderr}"));
        eprintln!("{restored}");
        assert!(!restored.contains("records=0 "), "{restored}");
        assert!(
            stderr.contains("the changelog ended with an unfinished checkpoint"),
            "the torn checkpoint was sealed: {stderr}"
        );
    }

    let reference = reference_run(&broker, tmp.path(), total);
    let (run, repeats) = by_id(&drain(&broker, "decisions", Duration::from_secs(2)));
    eprintln!(
        "kill/restart (new disk: {new_disk}): {} decisions, {} re-sent after the restart (at-least-once)",
        run.len(),
        repeats
    );
    assert_same_decisions(&run, &reference);
}

#[test]
fn the_service_rides_out_a_broker_that_stops_answering_for_30_seconds() {
    let broker = Arc::new(Broker::start());
    broker.create_topic("events");
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 120_000;
    let victim = synthetic_pipeline(tmp.path(), "victim", "decisions");
    let service = Service::start(&victim, &broker, &tmp.path().join("victim-state"), &[]);
    service.wait_ready(Duration::from_secs(30));
    let feeding = feed(&broker, total, 2_000);
    std::thread::sleep(Duration::from_secs(5));

    broker.signal("-STOP");
    let outage = Instant::now();
    let saw_not_ready = Arc::new(AtomicBool::new(false));
    while outage.elapsed() < Duration::from_secs(30) {
        if service.get("/readyz").is_some_and(|(status, _)| status == 503) {
            saw_not_ready.store(true, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    broker.signal("-CONT");
    assert!(
        saw_not_ready.load(Ordering::Relaxed),
        "/readyz reported the outage"
    );
    feeding.join().expect("feeding");
    service.wait_for(
        "every event consumed after the outage",
        Duration::from_secs(120),
        |s| s.metric("rampart_events_total") == Some(total as f64),
    );
    service.wait_for("ready again", Duration::from_secs(30), |s| {
        s.get("/readyz").is_some_and(|(status, _)| status == 200)
    });
    service.signal("-TERM");
    let (status, stderr) = service.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");

    let reference = reference_run(&broker, tmp.path(), total);
    let (run, _) = by_id(&drain(&broker, "decisions", Duration::from_secs(2)));
    assert_same_decisions(&run, &reference);
}

#[test]
fn shadow_decisions_go_to_their_own_topic_and_missing_topics_stop_the_start() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tempdir");

    // No input topic and create_topics = false: a clear error naming it, at once.
    let strict = synthetic_pipeline(tmp.path(), "strict", "decisions");
    edit(
        &strict.join("pipeline.toml"),
        "create_topics = true",
        "create_topics = false",
    );
    let (status, stderr) =
        Service::start(&strict, &broker, &tmp.path().join("strict-state"), &[]).wait(Duration::from_secs(30));
    assert!(!status.success());
    assert!(stderr.contains("do not exist on the broker: events"), "{stderr}");

    broker.create_topic("events");
    let shadowed = synthetic_pipeline(tmp.path(), "shadowed", "decisions");
    edit(
        &shadowed.join("pipeline.toml"),
        "decisions_topic = \"decisions\"",
        "decisions_topic = \"decisions\"\nshadow_topic = \"shadow\"",
    );
    edit(
        &shadowed.join("detectors/deletes.sql"),
        "-- verdict: block\n",
        "-- verdict: block\n-- mode: shadow\n",
    );
    let feeding = feed(&broker, 20_000, 20_000);
    feeding.join().expect("feeding");
    let audit = tmp.path().join("elsewhere/audit.log");
    let (status, stderr) = Service::start(
        &shadowed,
        &broker,
        &tmp.path().join("shadowed-state"),
        &["--until-idle", "3s", "--audit", audit.to_str().expect("utf-8")],
    )
    .wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    assert!(
        !shadowed.join("audit.log").exists(),
        "--audit moves the audit log"
    );
    let log = std::fs::read_to_string(&audit).expect("the audit log is where --audit says");
    assert!(log.contains(r#""kind":"decision""#) && log.contains(r#""mode":"shadow""#));

    let shadow = decisions(&drain(&broker, "shadow", Duration::from_secs(2)));
    let enforced = decisions(&drain(&broker, "decisions", Duration::from_secs(2)));
    assert!(!shadow.is_empty(), "the shadow detector fired");
    assert!(
        shadow
            .iter()
            .all(|d| d["mode"] == "shadow" && d["detector"]["id"] == "deletes")
    );
    assert!(!enforced.is_empty(), "the other detectors fired");
    assert!(
        enforced
            .iter()
            .all(|d| d["mode"] == "enforce" && d["detector"]["id"] != "deletes")
    );
}

/// An API-gateway request at `t`.
fn request(t: chrono::DateTime<chrono::Utc>, key: &str, tenant: &str, method: &str, route: &str) -> String {
    serde_json::json!({
        "timestamp": t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "api_key": key, "tenant": tenant, "method": method, "route": route,
        "status": 200, "client_ip": "198.51.100.7", "bytes_out": 1024,
    })
    .to_string()
}

fn waits_for_decision(broker: &Broker, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let got = consume_until(broker, "rampart.decisions", Duration::from_secs(60), |m| {
        m.iter()
            .any(|c| serde_json::from_slice::<Value>(&c.payload).is_ok_and(|d| ok(&d)))
    });
    decisions(&got)
        .into_iter()
        .find(|d| ok(d))
        .unwrap_or_else(|| panic!("no decision on the topic: {what}"))
}

/// Operators' admin tokens in the tests.
const ALICE: &str = "alice-7f3c9a2e51d84b06";
const BOB: &str = "bob-0c81e4d29a7b3f65e";
const CAROL: &str = "carol-5d2a8e07c4b19f3a";

#[test]
fn operators_revoke_rearm_and_reload_a_live_service_whose_tables_follow_their_topic() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = common::pipeline_copy("saas-usage", tmp.path());
    // Operators' tokens, and the key that signs decisions (k1); the enforcer trusts k1 and k2
    // (a rotation under way), not k3.
    let tokens = tmp.path().join("admin-tokens");
    std::fs::write(&tokens, format!("alice {ALICE}\nbob {BOB}\n")).expect("write");
    let keys = tmp.path().join("keys");
    for id in ["k1", "k2", "k3"] {
        generate_key(&keys, id);
    }
    edit(
        &dir.join("pipeline.toml"),
        "[service]\n",
        &format!(
            "[service]\nadmin_tokens = \"{}\"\nsigning_key = \"{}\"\n",
            tokens.display(),
            keys.join("k1.key.pem").display()
        ),
    );
    let service = Service::start(&dir, &broker, &tmp.path().join("state"), &[]);
    service.wait_ready(Duration::from_secs(60));
    let mut verifier = rampart_enforce::signing::Verifier::new();
    for id in ["k1", "k2"] {
        verifier
            .trust_file(id, &keys.join(format!("{id}.pub.pem")))
            .expect("a public key");
    }
    let enforcer = rampart_enforce::Enforcer::start(rampart_enforce::Config {
        brokers: broker.address(),
        topic: "rampart.decisions".into(),
        verify: Some(verifier.clone()),
        ..Default::default()
    })
    .expect("the enforcer starts");
    // A gateway started later, that reads no old decision (no lookback: as if the decisions
    // topic's retention had dropped every message): what is in force comes from the
    // enforcement-state topic alone.
    let later_gateway = || {
        let gateway = rampart_enforce::Enforcer::start(rampart_enforce::Config {
            brokers: broker.address(),
            topic: "rampart.decisions".into(),
            verify: Some(verifier.clone()),
            bootstrap: rampart_enforce::Bootstrap::State("rampart.decisions.enforcement".into()),
            lookback: Duration::ZERO,
            ..Default::default()
        })
        .expect("the enforcer starts");
        service.wait_for("the later gateway to catch up", Duration::from_secs(30), |_| {
            gateway.caught_up()
        });
        gateway
    };
    let producer = producer(&broker);
    let start = chrono::Utc::now() - chrono::Duration::seconds(60);
    let at = |ms: i64| start + chrono::Duration::milliseconds(ms);

    // A free-plan key past its hard limit is blocked once; an operator revokes the block.
    for n in 0..70 {
        produce(
            &producer,
            "gateway.requests",
            request(at(n * 100), "key_globex_1", "globex", "GET", "/v1/search").as_bytes(),
        );
    }
    // Window rows are final once event time is the allowed lateness (30 s) past them.
    produce(
        &producer,
        "gateway.requests",
        request(at(40_000), "key_acme_1", "acme", "GET", "/v1/search").as_bytes(),
    );
    let block = waits_for_decision(&broker, "the hard-limit block", |d| {
        d["detector"]["id"] == "usage-hard-limit" && d["verdict"] == "block"
    });
    assert_eq!(block["actor"], "key_globex_1");
    service.wait_for("the enforcer to see the block", Duration::from_secs(30), |_| {
        enforcer.is_blocked("key_globex_1", "/v1/search").is_some()
    });
    // Without a valid token nothing is done: 401 with no detail, counted.
    let revoke =
        "/admin/revoke?actor=key_globex_1&detector=usage-hard-limit&by=support-desk&reason=support+ticket+42";
    for (token, reason) in [(None, "missing"), (Some("not-a-token-of-anyone-0000"), "wrong")] {
        let (code, body) = service.post(revoke, token).expect("the admin endpoint answers");
        assert_eq!((code, body.as_str()), (401, "unauthorized\n"));
        assert_eq!(
            service.metric(&format!(r#"rampart_admin_refused_total{{reason="{reason}"}}"#)),
            Some(1.0)
        );
    }
    assert!(
        enforcer.is_blocked("key_globex_1", "/v1/search").is_some(),
        "still blocked"
    );
    let later = later_gateway();
    service.wait_for(
        "a gateway started later to refuse the blocked key",
        Duration::from_secs(30),
        |_| later.is_blocked("key_globex_1", "/v1/search").is_some(),
    );
    // (Tansu 0.6 answers "the end of the decisions topic" with the start of its last record
    // batch plus one, so the rest of that batch is read again: repeats, ignored.)
    let stats = later.stats();
    assert_eq!(
        (stats.decisions - stats.duplicates, stats.blocks),
        (1, 1),
        "it read the one block in force, and not the decisions topic: {stats:?}"
    );
    drop(later);
    for path in ["/metrics", "/readyz", "/healthz"] {
        let (_, body) = service.get(path).expect("answers");
        assert!(
            !body.contains(ALICE) && !body.contains(BOB),
            "{path} shows a token"
        );
    }
    let (code, body) = service
        .post(revoke, Some(ALICE))
        .expect("the admin endpoint answers");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""verdict":"revoke""#), "{body}");
    waits_for_decision(&broker, "the revocation", |d| {
        d["verdict"] == "revoke"
            && d["actor"] == "key_globex_1"
            && d["reason"] == "revoked: support ticket 42"
    });
    service.wait_for("the enforcer to lift the block", Duration::from_secs(30), |_| {
        enforcer.is_blocked("key_globex_1", "/v1/search").is_none()
    });
    // The revocation is in the enforcement state too: a gateway started after it lets the key
    // through, though the block's record is still there (until it expires).
    let later = later_gateway();
    service.wait_for(
        "a gateway started after the revocation to see it",
        Duration::from_secs(30),
        |_| later.stats().revocations == 1,
    );
    assert_eq!(later.is_blocked("key_globex_1", "/v1/search"), None);
    assert_eq!(
        later.stats().unsigned,
        0,
        "the state's records carry their signatures"
    );
    drop(later);
    let (code, _) = service
        .post("/admin/revoke?actor=x&detector=nope", Some(BOB))
        .expect("answers");
    assert_eq!(code, 404, "an unknown detector is refused");

    // Decisions forged onto the topic are ignored and counted: unsigned, signed by a key the
    // enforcer does not trust, and the real block altered after signing (same headers). One
    // signed by k2, the next key of the rotation, is enforced; an unsigned revocation of it
    // is not.
    let forged = |id: &str, actor: &str, verdict: &str| {
        serde_json::json!({
            "schema_version": 1, "decision_id": id, "pipeline": "saas-usage",
            "detector": {"id": "usage-hard-limit", "version": "x"}, "verdict": verdict,
            "mode": "enforce", "severity": "high", "actor": actor, "key": actor,
            "actions": ["*"], "reason": "forged", "evidence": {},
            "event_time": chrono::Utc::now().to_rfc3339(),
            "processed_at": chrono::Utc::now().to_rfc3339(),
            "expires_at": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
            "source": {"topic": "gateway.requests", "partition": 0, "offset": 1},
            "guidance": null, "tags": []
        })
        .to_string()
    };
    let signer = |id: &str| {
        rampart_enforce::signing::Signer::read(id, &keys.join(format!("{id}.key.pem"))).expect("a key")
    };
    let unsigned = forged("forged-1", "key_victim_1", "block");
    produce_with_headers(&producer, "rampart.decisions", unsigned.as_bytes(), &[]);
    let untrusted = forged("forged-2", "key_victim_2", "block");
    let k3 = signer("k3").sign(untrusted.as_bytes());
    produce_with_headers(
        &producer,
        "rampart.decisions",
        untrusted.as_bytes(),
        &[("rampart.key_id", "k3"), ("rampart.signature", &k3)],
    );
    let real = consume_until(&broker, "rampart.decisions", Duration::from_secs(30), |m| {
        m.iter()
            .any(|c| String::from_utf8_lossy(&c.payload).contains("usage-hard-limit"))
    })
    .into_iter()
    .find(|c| String::from_utf8_lossy(&c.payload).contains(r#""verdict":"block""#))
    .expect("the real block");
    assert_eq!(real.headers["rampart.key_id"], "k1", "the service signs with k1");
    let altered = String::from_utf8_lossy(&real.payload).replace("key_globex_1", "key_victim_3");
    produce_with_headers(
        &producer,
        "rampart.decisions",
        altered.as_bytes(),
        &[
            ("rampart.key_id", "k1"),
            ("rampart.signature", &real.headers["rampart.signature"]),
        ],
    );
    let rotated = forged("rotated-1", "key_rotated", "block");
    let k2 = signer("k2").sign(rotated.as_bytes());
    produce_with_headers(
        &producer,
        "rampart.decisions",
        rotated.as_bytes(),
        &[("rampart.key_id", "k2"), ("rampart.signature", &k2)],
    );
    let lift = forged("forged-4", "key_rotated", "revoke");
    produce_with_headers(&producer, "rampart.decisions", lift.as_bytes(), &[]);
    service.wait_for(
        "the enforcer to sort the forged decisions out",
        Duration::from_secs(30),
        |_| {
            let stats = enforcer.stats();
            stats.unsigned == 2 && stats.bad_signatures == 2
        },
    );
    assert!(
        enforcer.is_blocked("key_rotated", "/v1/search").is_some(),
        "k2 is trusted"
    );
    for victim in ["key_victim_1", "key_victim_2", "key_victim_3"] {
        assert!(
            enforcer.is_blocked(victim, "/v1/search").is_none(),
            "{victim} is not blocked"
        );
    }

    // Live platform state from a compacted topic: a deploy freeze holds deploys for review.
    let state_record = BaseRecord::to("platform.state")
        .key("deploy-freeze")
        .payload(r#"{"flag":"deploy-freeze","enabled":true}"#);
    producer.send(state_record).map_err(|(e, _)| e).expect("send");
    producer.flush(Duration::from_secs(10)).expect("flush");
    std::thread::sleep(Duration::from_secs(2));
    produce(
        &producer,
        "gateway.requests",
        request(at(41_000), "key_acme_0", "acme", "POST", "/v1/deployments").as_bytes(),
    );
    let hold = waits_for_decision(&broker, "the deploy held for review", |d| {
        d["detector"]["id"] == "deploy-during-freeze"
    });
    assert_eq!(hold["verdict"], "review");
    assert!(hold["expires_at"].is_string(), "a review hold has an expiry");
    service.wait_for("the enforcer to hold deploys", Duration::from_secs(30), |_| {
        matches!(enforcer.check("key_acme_0", "/v1/deployments"), rampart_enforce::Check::Review(ref h)
            if h.guidance.as_deref().is_some_and(|g| g.contains("release manager")))
    });
    assert_eq!(
        enforcer.check("key_acme_0", "/v1/search"),
        rampart_enforce::Check::Allow,
        "only deploys are held"
    );

    // Hot reload: a changed detector is picked up from the file; a broken one is refused and
    // the running version continues.
    let audit = dir.join("audit.log");
    let audit_has = |needle: &str| std::fs::read_to_string(&audit).is_ok_and(|t| t.contains(needle));
    edit(
        &dir.join("detectors/usage-soft-limit.sql"),
        "-- severity: low",
        "-- severity: medium",
    );
    service.wait_for(
        "the changed detector in the audit log",
        Duration::from_secs(30),
        |_| audit_has(r#""what":"usage-soft-limit","change":"changed","old_version""#),
    );
    std::fs::write(
        dir.join("detectors/bad.sql"),
        "-- id: bad\n-- verdict: block\nSELEC nothing\n",
    )
    .expect("write");
    service.wait_for("the refused reload on /readyz", Duration::from_secs(30), |s| {
        s.get("/readyz")
            .is_some_and(|(code, body)| code == 200 && body.contains("refused") && body.contains("bad.sql"))
    });
    assert!(audit_has(r#""action":"reload refused""#));
    std::fs::remove_file(dir.join("detectors/bad.sql")).expect("rm");
    // A changed reference table is reloaded too; SIGHUP and the admin endpoint reload on demand.
    edit(
        &dir.join("tables/plans.csv"),
        "free,40,60,false",
        "free,50,80,false",
    );
    service.wait_for(
        "the changed table in the audit log",
        Duration::from_secs(30),
        |_| audit_has(r#""what":"tables/plans.csv","change":"changed""#),
    );
    service.wait_for(
        "the refusal note cleared by a good reload",
        Duration::from_secs(30),
        |s| {
            s.get("/readyz")
                .is_some_and(|(code, body)| code == 200 && !body.contains("refused"))
        },
    );
    let (code, body) = service
        .post("/admin/reload?by=carol", Some(ALICE))
        .expect("answers");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("reloaded: 6 detector(s)"), "{body}");
    assert!(audit_has(
        r#""action":"reload","changes":0,"via":"reload (admin)","who":"alice from 127.0.0.1:"#
    ));
    // Rotation of the operators' tokens: alice's is withdrawn from the file, carol's added.
    std::fs::write(&tokens, format!("bob {BOB}\ncarol {CAROL}\n")).expect("write");
    let (code, _) = service.post("/admin/reload", Some(ALICE)).expect("answers");
    assert_eq!(code, 401, "a withdrawn token");
    let (code, body) = service.post("/admin/reload", Some(CAROL)).expect("answers");
    assert_eq!(code, 200, "{body}");
    service.signal("-HUP");
    service.wait_for(
        "the SIGHUP reload in the audit log",
        Duration::from_secs(30),
        |_| audit_has(r#""via":"reload (SIGHUP)""#),
    );

    // The blast-radius fail-safe: a detector that would block everyone, added live.
    std::fs::write(
        dir.join("detectors/everyone.sql"),
        "-- id: everyone\n-- verdict: block\n-- severity: high\n-- reason: {{actor}} called {{action}}\n\
         SELECT actor, action FROM events\n",
    )
    .expect("write");
    service.wait_for("the new detector loaded", Duration::from_secs(30), |_| {
        audit_has(r#""what":"everyone","change":"added""#)
    });
    for n in 0..3000 {
        let key = format!("key_umbrella_{}", n % 200);
        produce(
            &producer,
            "gateway.requests",
            request(at(42_000 + n * 5), &key, "umbrella", "GET", "/v1/items").as_bytes(),
        );
    }
    let alert = waits_for_decision(&broker, "the fail-safe alert", |d| {
        d["detector"]["id"] == "everyone" && d["verdict"] == "alert"
    });
    assert!(
        alert["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("blast-radius fail-safe")),
        "{alert}"
    );
    service.wait_for(
        "the fail-safe on /readyz and /metrics",
        Duration::from_secs(30),
        |s| {
            s.get("/readyz")
                .is_some_and(|(_, body)| body.contains("fail-safe: `everyone` runs in shadow"))
                && s.metric(r#"rampart_fail_safe_tripped{detector="everyone"}"#) == Some(1.0)
        },
    );
    service.wait_for(
        "the enforcer to lift the burst's blocks",
        Duration::from_secs(30),
        |_| {
            enforcer
                .blocked_actors()
                .iter()
                .all(|a| !a.starts_with("key_umbrella_"))
        },
    );
    let (code, body) = service
        .post("/admin/rearm?detector=everyone", Some(BOB))
        .expect("answers");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        service.metric(r#"rampart_fail_safe_tripped{detector="everyone"}"#),
        Some(0.0)
    );
    let (code, _) = service
        .post("/admin/rearm?detector=everyone", Some(BOB))
        .expect("answers");
    assert_eq!(code, 409, "nothing left to re-arm");

    service.signal("-TERM");
    let (status, stderr) = service.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let verify = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .expect("rampart runs");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(
        audit_has(
            r#""action":"revoke","actor":"key_globex_1","detector":"usage-hard-limit","from":"127.0.0.1:"#
        ) && audit_has(r#""note":"support-desk","reason":"support ticket 42","who":"alice"}"#),
        "who revoked what: the token's name, the address, their note"
    );
    assert!(
        audit_has(r#""action":"rearm","detector":"everyone","from":"127.0.0.1:"#),
        "re-armed"
    );
    assert!(
        audit_has(r#""note":null,"#) && audit_has(r#""who":"bob"}"#),
        "who re-armed"
    );
}

/// Produces `events` ((partition or `None`, payload)) to `topic` as fast as a lingering
/// producer batches them, and waits until the broker has them all.
/// The test TLS material (`crates/rampart-service/testdata/tls`).
fn tls_file(name: &str) -> PathBuf {
    root().join("crates/rampart-service/testdata/tls").join(name)
}

/// An HTTP/1.0 `request` over TLS to `listen`, trusting only the test CA: the status, the
/// body and the certificate the server presented.
fn https(listen: &str, request: &str) -> Option<(u16, String, Vec<u8>)> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(tls_file("ca.pem")).expect("the test CA") {
        roots.add(cert.expect("a certificate")).expect("a CA certificate");
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let connection = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let socket = TcpStream::connect(listen).ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(40))).ok()?;
    let mut tls = rustls::StreamOwned::new(connection, socket);
    tls.write_all(request.as_bytes()).ok()?;
    let mut bytes = Vec::new();
    // A peer that closes without close_notify ends the read with an error after the answer.
    let _ = tls.read_to_end(&mut bytes);
    let presented = tls.conn.peer_certificates()?.first()?.to_vec();
    let text = String::from_utf8(bytes).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Some((status, body, presented))
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(tls_file(pem))
        .expect("a test certificate")
        .to_vec()
}

#[test]
fn the_endpoint_serves_https_only_and_a_renewed_certificate_without_a_restart() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = common::pipeline_copy("saas-usage", tmp.path());
    let (cert, key) = (tmp.path().join("tls.pem"), tmp.path().join("tls.key"));
    std::fs::copy(tls_file("server1.pem"), &cert).expect("copy");
    std::fs::copy(tls_file("server1.key"), &key).expect("copy");
    edit(
        &dir.join("pipeline.toml"),
        "[service]\n",
        &format!(
            "[service]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let service = Service::start_with_env(
        &dir,
        &broker,
        &tmp.path().join("state"),
        &[],
        &[("RAMPART_ADMIN_TOKEN", ALICE)],
    );
    let get = |path: &str| {
        https(
            &service.listen,
            &format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n"),
        )
    };
    service.wait_for("ready over HTTPS", Duration::from_secs(60), |_| {
        get("/readyz").is_some_and(|(code, _, _)| code == 200)
    });
    let (_, metrics, presented) = get("/metrics").expect("metrics over HTTPS");
    assert!(metrics.contains("rampart_events_total"), "{metrics}");
    assert_eq!(presented, der("server1.pem"));
    // Plain HTTP gets no answer: the port speaks TLS only.
    assert_eq!(service.get("/healthz").map(|(code, _)| code), None);

    // Admin commands over TLS, with and without the token.
    let post = |token: &str| {
        https(
            &service.listen,
            &format!(
                "POST /admin/reload HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
            ),
        )
    };
    assert_eq!(
        post("not-a-token-of-anyone-0000").map(|(code, ..)| code),
        Some(401)
    );
    let (code, body, _) = post(ALICE).expect("the admin endpoint answers");
    assert_eq!(code, 200, "{body}");

    // A renewal that does not go with its key is not served; the old certificate stays.
    std::fs::copy(tls_file("server2.pem"), &cert).expect("copy");
    assert_eq!(
        get("/healthz").map(|(code, _, p)| (code, p)),
        Some((200, der("server1.pem")))
    );
    // With its key, the renewed certificate is served from the next connection on.
    std::fs::copy(tls_file("server2.key"), &key).expect("copy");
    assert_eq!(
        get("/healthz").map(|(code, _, p)| (code, p)),
        Some((200, der("server2.pem")))
    );
    service.signal("-TERM");
    let (status, log) = service.wait(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(
        log.contains("cannot be used: the previous one is still served"),
        "{log}"
    );
    assert!(log.contains("TLS certificate re-read"), "{log}");
}

fn produce_all(broker: &Broker, topic: &str, events: impl Iterator<Item = (Option<i32>, String)>) {
    let kafka = lingering_producer(broker, 50);
    for (partition, payload) in events {
        produce_to(&kafka, topic, partition, payload.as_bytes());
    }
    kafka.flush(Duration::from_secs(120)).expect("flush");
}

/// What decisions say wherever their events came from (decision ids name the source
/// position): (detector, event time, actor, evidence), sorted.
fn contents<'a>(decisions: impl Iterator<Item = &'a Value>) -> Vec<(String, String, String, String)> {
    let mut v: Vec<_> = decisions
        .map(|d| {
            (
                d["detector"]["id"].as_str().unwrap_or_default().to_string(),
                d["event_time"].as_str().unwrap_or_default().to_string(),
                d["actor"].as_str().unwrap_or_default().to_string(),
                d["evidence"].to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Asserts two lists of decision contents are equal, showing the first differences.
fn assert_same_contents(got: &[(String, String, String, String)], want: &[(String, String, String, String)]) {
    let missing: Vec<_> = want.iter().filter(|w| !got.contains(w)).take(5).collect();
    let extra: Vec<_> = got.iter().filter(|g| !want.contains(g)).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && got.len() == want.len(),
        "{} decisions, {} expected; missing {missing:?}; extra {extra:?}",
        got.len(),
        want.len()
    );
}

/// Reads `topic` until it holds `n` messages (Tansu serves a log of many small record batches
/// slowly: a quiet period can end the read early).
fn read_n(broker: &Broker, topic: &str, n: usize) -> Vec<Consumed> {
    let got = consume_until(broker, topic, Duration::from_secs(120), |got| got.len() >= n);
    assert_eq!(got.len(), n, "{topic} holds the {n} messages published");
    got
}

/// The number of decisions a run's last line says it published.
fn published(log: &str) -> usize {
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped:"))
        .unwrap_or_default();
    last.split(" events, ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no decision count in {last}"))
}

/// Runs `pipeline` over its topic with `--until-end`; asserts it consumed `events` with no
/// late record and returns its log.
fn run_to_end(pipeline: &Path, broker: &Broker, state: &Path, events: u64) -> String {
    let (status, stderr) =
        Service::start(pipeline, broker, state, &["--until-end"]).wait(Duration::from_secs(180));
    assert!(status.success(), "{stderr}");
    let last = stderr
        .lines()
        .rev()
        .find(|l| l.contains("stopped:"))
        .unwrap_or_default();
    assert!(last.contains(&format!("stopped: {events} events,")), "{last}");
    assert!(last.contains(" 0 late records"), "no event is late: {last}");
    stderr
}

/// The windows of one service over a topic of four partitions, produced round robin (each
/// partition in event-time order, partitions read a fetch at a time), decide what they decide
/// over the same events on one partition, evidence included, and what a replay of the same
/// events from a file decides: no event is late.
#[test]
fn windows_over_four_partitions_decide_what_one_partition_and_a_replay_do() {
    let broker = Broker::start();
    broker.create_topic("events");
    broker.create_topic_with("events4", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 40_000u64;
    produce_all(&broker, "events", (0..total).map(|i| (None, synthetic_event(i))));
    produce_all(
        &broker,
        "events4",
        (0..total).map(|i| (Some((i % 4) as i32), synthetic_event(i))),
    );
    let service = "quiet_after = \"300ms\"";
    let one = synthetic_pipeline_on(tmp.path(), "one", "decisions-one", "events", service);
    let four = synthetic_pipeline_on(tmp.path(), "four", "decisions-four", "events4", service);
    let log_one = run_to_end(&one, &broker, &tmp.path().join("one-state"), total);
    let log_four = run_to_end(&four, &broker, &tmp.path().join("four-state"), total);
    for log in [&log_one, &log_four] {
        eprintln!(
            "{}",
            log.lines()
                .rev()
                .find(|l| l.contains("stopped:"))
                .unwrap_or_default()
        );
    }
    let (one, repeats) = by_id(&read_n(&broker, "decisions-one", published(&log_one)));
    assert_eq!(repeats, 0);
    let (four, repeats) = by_id(&read_n(&broker, "decisions-four", published(&log_four)));
    assert_eq!(repeats, 0);
    let windowed = |d: &&Value| d["detector"]["id"] != "deletes";
    assert!(one.values().filter(windowed).count() > 100, "the windows fire");
    assert_same_contents(&contents(four.values()), &contents(one.values()));

    // The same events from a file, replayed (the equivalence harness checks replay against
    // one batch query).
    let input = tmp.path().join("events.jsonl");
    let text: String = (0..total).map(|i| synthetic_event(i) + "\n").collect();
    std::fs::write(&input, text).expect("write");
    let output = tmp.path().join("replay.jsonl");
    let replay = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("replay")
        .arg(tmp.path().join("one"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .expect("rampart replay runs");
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let replayed: Vec<Value> = std::fs::read_to_string(&output)
        .expect("replay output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a decision"))
        .collect();
    assert_same_contents(&contents(replayed.iter()), &contents(one.values()));
}

/// A partition that stops getting records mid-stream, and one that never gets any, hold the
/// windows back only until the idle timeout: window decisions come while the stream flows,
/// long before it goes quiet, and no event is late.
#[test]
fn a_stopped_or_empty_partition_stops_holding_the_windows_after_the_idle_timeout() {
    let broker = Broker::start();
    broker.create_topic_with("events5", 5);
    let tmp = tempfile::tempdir().expect("tempdir");
    // Quiet after a minute: only idleness can let the windows decide while events flow.
    let pipeline = synthetic_pipeline_on(
        tmp.path(),
        "idle",
        "decisions",
        "events5",
        "partition_idle_after = \"2s\"\nquiet_after = \"60s\"",
    );
    let service = Service::start(&pipeline, &broker, &tmp.path().join("state"), &[]);
    service.wait_ready(Duration::from_secs(30));
    // 12 s of events at 4,000 per second (24 s of event time): partition 3 gets its share of
    // the first 3 s only, partition 4 none.
    let total = 48_000u64;
    let stop3 = 12_000u64;
    let kafka = lingering_producer(&broker, 100);
    let started = Instant::now();
    let feeding = std::thread::spawn(move || {
        for i in 0..total {
            let due = Duration::from_secs_f64(i as f64 / 4_000.0);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            let partition = if i < stop3 { i % 4 } else { i % 3 };
            produce_to(
                &kafka,
                "events5",
                Some(partition as i32),
                synthetic_event(i).as_bytes(),
            );
        }
        kafka.flush(Duration::from_secs(60)).expect("flush");
    });
    // Partition 3's last event is 24 s of event time in (2 ms per event): without idleness the
    // watermark would stay there (and at nothing while partition 4 holds it). It passes 32 s
    // while the stream flows, minutes before the stream goes quiet.
    let later_ms = 1_767_225_600_000 + 2 * stop3 as i64 + 8_000;
    service.wait_for(
        "the watermark past the idle partitions",
        Duration::from_secs(25),
        |s| {
            s.metric("rampart_watermark_seconds")
                .is_some_and(|w| w * 1000.0 > later_ms as f64)
        },
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(25),
        "decided while the stream flows, not after it went quiet: {elapsed:?}"
    );
    feeding.join().expect("feeding");
    assert_eq!(service.metric("rampart_late_records_total"), Some(0.0));
    let (_, metrics) = service.get("/metrics").expect("metrics");
    assert!(
        metrics.contains("rampart_partition_watermark_seconds{topic=\"events5\",partition=\"0\"}"),
        "per-partition watermarks are exported"
    );
    // The windows decided the events after the idle partitions' last ones.
    service.signal("-TERM");
    let (status, log) = service.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let all = decisions(&read_n(&broker, "decisions", published(&log)));
    let later = chrono::DateTime::from_timestamp_millis(later_ms)
        .expect("time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert!(
        all.iter().any(|d| d["detector"]["id"] == "burst"
            && d["event_time"].as_str().is_some_and(|t| t > later.as_str())),
        "window decisions after the stopped partition's end"
    );
}

/// One partition produced 30 minutes of event time behind the three others: it holds the
/// windows back (rows wait, nothing is late), the partitions ahead are paused while it catches
/// up (so what waits in memory stays bounded), and the decisions are those of the same events
/// on one partition in event-time order.
#[test]
fn a_partition_30_minutes_behind_holds_the_windows_and_catches_up() {
    let broker = Broker::start();
    broker.create_topic("events");
    broker.create_topic_with("events4", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 32_000u64;
    let behind = -30 * 60 * 1000;
    let event = |i: u64| synthetic_event_shifted(i, if i.is_multiple_of(4) { behind } else { 0 });
    produce_all(
        &broker,
        "events4",
        (0..total).map(|i| (Some((i % 4) as i32), event(i))),
    );
    // The reference: the same events, in event-time order, on one partition.
    let mut ordered: Vec<u64> = (0..total).collect();
    ordered.sort_by_key(|i| (!i.is_multiple_of(4), *i));
    produce_all(&broker, "events", ordered.into_iter().map(|i| (None, event(i))));
    let service = "quiet_after = \"300ms\"\npartition_idle_after = \"3s\"\nmax_partition_skew = \"20s\"";
    let one = synthetic_pipeline_on(tmp.path(), "one", "decisions-one", "events", service);
    let four = synthetic_pipeline_on(tmp.path(), "four", "decisions-four", "events4", service);
    let log_one = run_to_end(&one, &broker, &tmp.path().join("one-state"), total);
    let log = run_to_end(&four, &broker, &tmp.path().join("four-state"), total);
    for line in log
        .lines()
        .filter(|l| l.contains("paused") || l.contains("resumed") || l.contains("stopped"))
    {
        eprintln!("{line}");
    }
    assert!(
        log.contains("paused"),
        "the partitions ahead were paused while the one behind caught up"
    );
    let (one, _) = by_id(&read_n(&broker, "decisions-one", published(&log_one)));
    let (four, _) = by_id(&read_n(&broker, "decisions-four", published(&log)));
    assert!(one.len() > 100);
    assert_same_contents(&contents(four.values()), &contents(one.values()));
}

/// Live, on one partition: a threshold burst followed by one event a second later is decided
/// at once (well before the quiet period), and a burst followed by silence within the quiet
/// period (not after the 1 s allowed lateness of event time, which never passes on a silent
/// stream).
#[test]
fn a_live_burst_is_decided_at_once_and_one_followed_by_silence_after_the_quiet_period() {
    let broker = Broker::start();
    broker.create_topic("events");
    let tmp = tempfile::tempdir().expect("tempdir");
    let pipeline = synthetic_pipeline_on(tmp.path(), "live", "decisions", "events", "quiet_after = \"6s\"");
    // The admin token and the signing key from the environment.
    let keys = tmp.path().join("keys");
    generate_key(&keys, "live-1");
    let pem = std::fs::read_to_string(keys.join("live-1.key.pem")).expect("the key");
    let env_token = "env-token-2c9e71b04f3a8d65";
    let service = Service::start_with_env(
        &pipeline,
        &broker,
        &tmp.path().join("state"),
        &[],
        &[
            ("RAMPART_ADMIN_TOKEN", env_token),
            ("RAMPART_SIGNING_KEY", &pem),
            ("RAMPART_SIGNING_KEY_ID", "live-1"),
        ],
    );
    service.wait_ready(Duration::from_secs(30));
    let (code, _) = service
        .post("/admin/rearm?detector=nope", Some(ALICE))
        .expect("answers");
    assert_eq!(code, 401, "only the environment's token is valid");
    let (code, body) = service
        .post("/admin/rearm?detector=nope", Some(env_token))
        .expect("answers");
    assert_eq!(code, 404, "let in, and no such detector: {body}");
    // 250 calls of one user at the same millisecond: their rows have all their peers only
    // once a later time arrives, or the stream goes quiet.
    let burst = |user: &str, at_ms: i64| -> Vec<String> {
        let t = chrono::DateTime::from_timestamp_millis(1_767_225_600_000 + at_ms)
            .expect("time")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        (0..250)
            .map(|_| format!(r#"{{"t":"{t}","user":"{user}","op":"Get","ip":"10.0.0.1"}}"#))
            .collect()
    };
    let later = r#"{"t":"2026-01-01T00:00:01.000Z","user":"someone","op":"Get","ip":"10.0.0.2"}"#;
    let kafka = lingering_producer(&broker, 20);
    for e in burst("burst-then-event", 0)
        .iter()
        .map(String::as_str)
        .chain([later])
    {
        produce(&kafka, "events", e.as_bytes());
    }
    kafka.flush(Duration::from_secs(30)).expect("flush");
    let sent = Instant::now();
    let fired = |user: &'static str| {
        move |got: &[Consumed]| {
            decisions(got)
                .iter()
                .any(|d| d["detector"]["id"] == "burst" && d["actor"] == user)
        }
    };
    let got = consume_until(
        &broker,
        "decisions",
        Duration::from_secs(20),
        fired("burst-then-event"),
    );
    assert!(fired("burst-then-event")(&got), "{}", service.diagnosis());
    let at_once = sent.elapsed();
    assert!(
        at_once < Duration::from_secs(4),
        "decided at once, not after the quiet period: {at_once:?}"
    );
    let first = decisions(&got)
        .into_iter()
        .find(|d| d["detector"]["id"] == "burst")
        .expect("burst");
    assert_eq!(
        first["evidence"]["n"], 250,
        "every peer of its millisecond counts"
    );
    let mut verifier = rampart_enforce::signing::Verifier::new();
    verifier
        .trust_file("live-1", &keys.join("live-1.pub.pem"))
        .expect("the public key");
    for message in &got {
        assert_eq!(message.headers["rampart.key_id"], "live-1");
        let signature = message.headers["rampart.signature"].as_bytes();
        assert_eq!(
            verifier.verify(&message.payload, Some(b"live-1"), Some(signature)),
            Ok(()),
            "signed with the environment's key"
        );
    }

    for e in burst("burst-then-silence", 60_000) {
        produce(&kafka, "events", e.as_bytes());
    }
    kafka.flush(Duration::from_secs(30)).expect("flush");
    let sent = Instant::now();
    let got = consume_until(
        &broker,
        "decisions",
        Duration::from_secs(30),
        fired("burst-then-silence"),
    );
    assert!(fired("burst-then-silence")(&got), "{}", service.diagnosis());
    let after_quiet = sent.elapsed();
    assert!(
        after_quiet >= Duration::from_secs(5) && after_quiet < Duration::from_secs(15),
        "decided once the stream was quiet for 6 s: {after_quiet:?}"
    );
}

/// The synthetic pipeline `name` with its window state in four partitions spread over the
/// group's instances (`[kafka] state_partitions`); partitions go idle only after 5 minutes, so
/// that stopping the instances a few seconds after the stream's end decides what an
/// uninterrupted run does at its end.
fn scale_out_pipeline(dir: &Path, name: &str) -> PathBuf {
    let p = synthetic_pipeline_on(dir, name, "decisions", "events", "partition_idle_after = \"5m\"");
    edit(
        &p.join("pipeline.toml"),
        "create_topics = true",
        "create_topics = true\nstate_partitions = 4",
    );
    with_routed_windows(&p);
    let tokens = dir.join("admin-tokens");
    std::fs::write(&tokens, format!("alice {ALICE}\n")).expect("write");
    edit(
        &p.join("pipeline.toml"),
        "[service]\n",
        &format!("[service]\nadmin_tokens = \"{}\"\n", tokens.display()),
    );
    p
}

/// Adds to a synthetic pipeline two windows not keyed by actor: one per origin (rows routed
/// by origin in a group) and one over every event (all to one place). Both are sliding
/// windows: the rows that fire, and so the decision ids, are the batch query's whatever the
/// order the partitions' events meet in (a grouped window fires at the first event in input
/// order after which HAVING holds, which is not the same event in every run).
fn with_routed_windows(pipeline: &Path) {
    let detectors = [
        (
            "busy_origin.sql",
            "-- id: busy_origin\n-- verdict: alert\n-- severity: low\n-- reason: {{origin}} served {{n}} calls within a second\n\
             SELECT actor, origin, n FROM (SELECT actor, origin, count(*) OVER (PARTITION BY origin ORDER BY event_time \
             RANGE BETWEEN INTERVAL '1 second' PRECEDING AND CURRENT ROW) AS n FROM events) WHERE n >= 50\n",
        ),
        (
            "platform.sql",
            "-- id: platform\n-- verdict: alert\n-- severity: low\n-- reason: {{k}} users called within 100 ms\n\
             SELECT actor, k FROM (SELECT actor, count(DISTINCT actor) OVER (ORDER BY event_time \
             RANGE BETWEEN INTERVAL '100 milliseconds' PRECEDING AND CURRENT ROW) AS k FROM events) WHERE k >= 36\n",
        ),
    ];
    for (file, sql) in detectors {
        std::fs::write(pipeline.join("detectors").join(file), sql).expect("write");
    }
}

/// How many of `decisions` each detector made.
fn per_detector(decisions: &BTreeMap<String, Value>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for d in decisions.values() {
        *out.entry(d["detector"]["id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    out
}

/// Waits until `topic` holds at least `want` distinct decisions and two reads 3 s apart find
/// the same number.
fn wait_for_decisions(
    broker: &Broker,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> (BTreeMap<String, Value>, usize) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let (got, repeats) = by_id(&drain(broker, topic, Duration::from_secs(3)));
        if (got.len() >= want && last == Some(got.len())) || Instant::now() >= deadline {
            return (got, repeats);
        }
        last = Some(got.len());
    }
}

/// Runs three instances of a scale-out pipeline over the `total` events of a four-partition
/// input keyed by event id, until they decided what the `reference` run did; with `kill`, one
/// of them is killed with SIGKILL a third of the way into the stream and replaced by a fresh
/// instance on an empty state directory. Returns the decisions.
fn scale_out_run(
    tmp: &Path,
    broker: &Broker,
    total: u64,
    kill: bool,
) -> (BTreeMap<String, Value>, BTreeMap<String, Value>) {
    let pipeline = scale_out_pipeline(tmp, "group");
    let mut instances: Vec<Service> = (0..3)
        .map(|i| Service::start(&pipeline, broker, &tmp.join(format!("instance-{i}")), &[]))
        .collect();
    for s in &instances {
        s.wait_ready(Duration::from_secs(60));
    }
    // The stream comes while the group runs (six seconds of it), in batches (see `feed`).
    let feeding = feed_partitions(broker, total, total / 6, 4);
    if kill {
        let victim = instances.remove(1);
        let events = |s: &Service| s.metric("rampart_events_total").unwrap_or(0.0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while events(&victim) + instances.iter().map(events).sum::<f64>() < total as f64 / 3.0 {
            assert!(
                Instant::now() < deadline,
                "a third of the stream: {}",
                victim.diagnosis()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        victim.signal("-KILL");
        let (status, _) = victim.wait(Duration::from_secs(10));
        assert!(!status.success());
        instances.push(Service::start(&pipeline, broker, &tmp.join("replacement"), &[]));
    }
    feeding.join().expect("feeding");
    // One instance's decisions over the same topic, read from its start.
    let reference = reference_run_with(broker, tmp, total, with_routed_windows);
    let (decided, repeats) =
        wait_for_decisions(broker, "decisions", reference.len(), Duration::from_secs(180));
    if reference.keys().any(|id| !decided.contains_key(id)) {
        // Decisions missing: suppressed as repeats by a guard, or made and not on the topic?
        for (i, s) in instances.iter().enumerate() {
            let counts: Vec<String> = s
                .get("/metrics")
                .map(|(_, body)| {
                    body.lines()
                        .filter(|l| {
                            l.starts_with("rampart_suppressed") || l.starts_with("rampart_decisions_total")
                        })
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            eprintln!("instance {i}, its metrics: {}", counts.join("; "));
        }
    }
    if !kill {
        // An operator's revocation sent to one instance reaches the instance owning the actor's
        // state partition, wherever it is: one revoke decision per actor, from the group.
        for user in 0..10 {
            let (status, body) = instances[0]
                .post(&format!("/admin/revoke?actor=u{user}&reason=test"), Some(ALICE))
                .expect("an answer");
            assert_eq!(status, 202, "{body}");
            assert!(body.contains("publishes the revoke decision"), "{body}");
        }
        let (status, body) = instances[0]
            .post("/admin/revoke?actor=u1&detector=nonesuch", Some(ALICE))
            .expect("an answer");
        assert_eq!(status, 404, "{body}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let revoked: Vec<String> = decisions(&drain(broker, "decisions", Duration::from_secs(1)))
                .into_iter()
                .filter(|d| d["verdict"] == "revoke")
                .map(|d| d["actor"].as_str().unwrap_or_default().to_string())
                .collect();
            let distinct: BTreeSet<&String> = revoked.iter().collect();
            if distinct.len() == 10 {
                assert_eq!(revoked.len(), 10, "one revoke decision per actor: {revoked:?}");
                break;
            }
            assert!(Instant::now() < deadline, "revoke decisions: {revoked:?}");
        }
    }
    let mut logs = Vec::new();
    for s in instances {
        s.signal("-TERM");
        let (status, stderr) = s.wait(Duration::from_secs(60));
        assert!(status.success(), "{stderr}");
        logs.push(stderr);
    }
    let dead = drain(broker, "decisions.dead", Duration::from_secs(1));
    let mut late: BTreeMap<String, (i64, i64, usize)> = BTreeMap::new();
    for d in &dead {
        let p = d.headers.get("rampart.partition").cloned().unwrap_or_default();
        let o: i64 = d
            .headers
            .get("rampart.offset")
            .and_then(|o| o.parse().ok())
            .unwrap_or(-1);
        let e = late.entry(p).or_insert((i64::MAX, i64::MIN, 0));
        *e = (e.0.min(o), e.1.max(o), e.2 + 1);
    }
    eprintln!("late dead letters by input partition (first offset, last, count): {late:?}");
    if let Some(d) = dead.first() {
        eprintln!("first: {:?}", d.headers.get("rampart.error"));
    }
    if let Ok(dir) = std::env::var("RAMPART_TEST_LOGS") {
        for (i, l) in logs.iter().enumerate() {
            std::fs::write(Path::new(&dir).join(format!("instance-{i}.log")), l).expect("log");
        }
    }
    for l in &logs {
        if let Some(stopped) = l.lines().find(|l| l.starts_with("stopped:")) {
            eprintln!("{stopped}");
        }
    }
    let running: Vec<usize> = logs
        .iter()
        .map(|l| l.matches("state partition running").count())
        .collect();
    assert!(
        running.iter().filter(|n| **n > 0).count() >= 2,
        "the state partitions were spread over the instances: {running:?}"
    );
    let restored: Vec<&str> = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains("window state restored from its changelog"))
        .collect();
    eprintln!(
        "scale-out (kill: {kill}): {} decisions, {repeats} re-sent; state partition loops started per instance: \
         {running:?}; {} restored from the changelog",
        decided.len(),
        restored.len()
    );
    if reference.keys().any(|id| !decided.contains_key(id)) {
        // Decisions missing: were the forwarded records on the broker? (What each state
        // partition's loop took is in the logs: `events=N` before `state partition released`.)
        for topic in [
            "group-repartition",
            "group-repartition-by-origin",
            "group-repartition-single",
        ] {
            let positions: BTreeSet<(String, String)> = drain(broker, topic, Duration::from_secs(3))
                .into_iter()
                .filter_map(|c| {
                    Some((
                        c.headers.get("rampart.partition")?.clone(),
                        c.headers.get("rampart.offset")?.clone(),
                    ))
                })
                .collect();
            eprintln!("{topic}/0 holds {} distinct forwarded records", positions.len());
        }
        for (i, l) in logs.iter().enumerate() {
            let taken: Vec<&str> = l
                .lines()
                .filter(|l| {
                    l.contains("stopped cleanly events=")
                        || l.contains("state partition released")
                        || l.contains("from the gap")
                })
                .collect();
            eprintln!("instance {i}: {}", taken.join("\n"));
        }
    }
    if kill {
        assert!(
            !restored.is_empty(),
            "the killed instance's state partitions were restored elsewhere: {}",
            logs.join("\n---\n")
        );
    }
    (decided, reference)
}

#[test]
fn three_instances_in_one_group_decide_exactly_what_one_instance_does() {
    let broker = Broker::start();
    broker.create_topic_with("events", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (decided, reference) = scale_out_run(tmp.path(), &broker, 60_000, false);
    let counts = per_detector(&reference);
    assert!(
        counts.get("busy_origin").is_some_and(|n| *n > 10) && counts.get("platform").is_some_and(|n| *n > 10),
        "the windows routed by origin and to one place fired: {counts:?}"
    );
    assert_same_decisions(&decided, &reference);
}

#[test]
fn a_group_member_killed_mid_stream_is_replaced_without_losing_or_double_counting() {
    let broker = Broker::start();
    broker.create_topic_with("events", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (decided, reference) = scale_out_run(tmp.path(), &broker, 90_000, true);
    assert_same_decisions(&decided, &reference);
}

/// The events an instance's summary says it consumed (`stopped: N events, ...`).
fn events_consumed(log: &str) -> u64 {
    log.lines()
        .find_map(|l| l.strip_prefix("stopped: ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary in the log: {log}"))
}

#[test]
fn a_group_member_stopped_cleanly_hands_its_partitions_over_without_reprocessing() {
    let broker = Broker::start();
    broker.create_topic_with("events", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 60_000;
    // Windows by actor only, so that the group's instances together consume each event once,
    // and no periodic checkpoint while they run: what the stopped instance consumed is kept
    // only if it checkpoints as it hands its state partitions over; else its successor
    // consumes it again.
    let pipeline = scale_out_pipeline(tmp.path(), "group");
    for routed in ["busy_origin.sql", "platform.sql"] {
        std::fs::remove_file(pipeline.join("detectors").join(routed)).expect("remove");
    }
    edit(
        &pipeline.join("pipeline.toml"),
        "checkpoint_interval = \"100ms\"",
        "checkpoint_interval = \"10m\"",
    );
    // The whole stream waits on the broker (a backlog): the instance is stopped within about
    // a second of its state partitions starting, before every input partition has reached
    // each of them (their watermarks have not moved yet, and must not move on restore).
    feed_partitions(&broker, total, total * 100, 4)
        .join()
        .expect("feeding");
    let instances: Vec<Service> = (0..2)
        .map(|i| Service::start(&pipeline, &broker, &tmp.path().join(format!("instance-{i}")), &[]))
        .collect();
    let events = |s: &Service| s.metric("rampart_events_total").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while instances.iter().map(events).sum::<f64>() < total as f64 / 3.0 {
        assert!(
            Instant::now() < deadline,
            "a third of the stream: {}",
            instances[0].diagnosis()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut instances = instances.into_iter();
    let stopped = instances.next().expect("two instances");
    let survivor = instances.next().expect("two instances");
    stopped.signal("-TERM");
    let (status, stopped_log) = stopped.wait(Duration::from_secs(60));
    assert!(status.success(), "{stopped_log}");
    let reference = reference_run(&broker, tmp.path(), total);
    let (decided, repeats) =
        wait_for_decisions(&broker, "decisions", reference.len(), Duration::from_secs(120));
    survivor.signal("-TERM");
    let (status, survivor_log) = survivor.wait(Duration::from_secs(60));
    assert!(status.success(), "{survivor_log}");
    if let Ok(dir) = std::env::var("RAMPART_TEST_LOGS") {
        let dead = drain(&broker, "decisions.dead", Duration::from_secs(1));
        let lines: Vec<String> = dead.iter().map(|d| format!("{:?}", d.headers)).collect();
        std::fs::write(Path::new(&dir).join("dead.txt"), lines.join("\n")).expect("log");
        std::fs::write(Path::new(&dir).join("stopped.log"), &stopped_log).expect("log");
        std::fs::write(Path::new(&dir).join("survivor.log"), &survivor_log).expect("log");
    }
    let released = stopped_log.matches("state partition released").count();
    let (before, after) = (events_consumed(&stopped_log), events_consumed(&survivor_log));
    eprintln!(
        "clean handover: {released} state partitions released; consumed {before} + {after} of {total} events; \
         {repeats} decisions re-sent"
    );
    assert!(
        released > 0,
        "the stopped instance owned state partitions: {stopped_log}"
    );
    assert!(
        before > 0 && before < total,
        "the instance was stopped mid-stream: {before} events"
    );
    assert_eq!(
        before + after,
        total,
        "nothing the stopped instance consumed was consumed again"
    );
    assert_eq!(
        repeats, 0,
        "nothing decided before the handover was decided again"
    );
    assert_same_decisions(&decided, &reference);
    // One audit log per state partition (here both instances write beside the pipeline),
    // every entry naming the instance that wrote it.
    let mut entries = 0;
    for file in std::fs::read_dir(&pipeline).expect("dir").flatten() {
        let name = file.file_name().to_string_lossy().into_owned();
        if !name.starts_with("audit.partition-") || name.ends_with(".rules") {
            continue;
        }
        for line in std::fs::read_to_string(file.path()).expect("read").lines() {
            entries += 1;
            assert!(line.contains(r#","instance":""#), "{name}: {line}");
        }
    }
    assert!(entries >= decided.len(), "{entries} audit entries");
}

/// Static membership (`RAMPART_INSTANCE_ID`, librdkafka's `group.instance.id`): an instance
/// killed and restarted at once, on its disk, rejoins under the same identity and the group
/// then decides what one instance does. (Apache Kafka gives a static member its partitions back
/// without a rebalance; Tansu 0.6 rebalances, and input partitions may move: the test prints
/// what moved and checks the outcome.) On Tansu the member's partitions may stay unowned for
/// seconds while the stream comes, so the restarted instance starts them on a backlog: this
/// test once lost a decision there (a partition taken over counted as quiet before its lag
/// was known, and a row was decided before its peers from that partition arrived).
#[test]
fn a_static_member_killed_and_restarted_at_once_rejoins_and_loses_nothing() {
    let broker = Broker::start();
    broker.create_topic_with("events", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 12_000;
    let pipeline = scale_out_pipeline(tmp.path(), "static");
    let start = |i: usize| {
        let id = format!("rampart-{i}");
        Service::start_with_env(
            &pipeline,
            &broker,
            &tmp.path().join(format!("instance-{i}")),
            &[],
            &[("RAMPART_INSTANCE_ID", id.as_str())],
        )
    };
    // Every partition a log says was assigned (an incremental assignment may be empty).
    let assigned = |log: &str| -> BTreeSet<String> {
        log.lines()
            .filter(|l| l.contains("partitions assigned"))
            .flat_map(|l| {
                let list = &l[l.find("partitions=[").map_or(l.len(), |i| i + 12)..];
                list.split(['"', ',', ']', ' '])
                    .filter(|p| p.contains('/'))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let first = start(0);
    let second = start(1);
    for s in [&first, &second] {
        s.wait_ready(Duration::from_secs(60));
    }
    // Both hold their share (the group has settled).
    for s in [&first, &second] {
        s.wait_for("its partitions", Duration::from_secs(30), |s| {
            s.metric("rampart_state_partitions_owned")
                .is_some_and(|n| n > 0.0)
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    let before = assigned(&std::fs::read_to_string(&first.log).expect("log"));
    second.signal("-KILL");
    let (_, killed_log) = second.wait(Duration::from_secs(30));
    let held = assigned(&killed_log);
    assert!(!held.is_empty(), "{killed_log}");
    if let Ok(dir) = std::env::var("RAMPART_TEST_LOGS") {
        std::fs::write(Path::new(&dir).join("killed.log"), &killed_log).expect("log");
    }
    let second = start(1);
    second.wait_for("ready again", Duration::from_secs(60), |s| {
        s.get("/readyz").is_some_and(|(status, _)| status == 200)
    });
    feed_partitions(&broker, total, total / 4, 4)
        .join()
        .expect("feeding");
    let reference = reference_run_with(&broker, tmp.path(), total, with_routed_windows);
    let (decided, _) = wait_for_decisions(&broker, "decisions", reference.len(), Duration::from_secs(120));
    let dead = drain(&broker, "decisions.dead", Duration::from_secs(1)).len();
    assert_same_decisions(&decided, &reference);
    assert_eq!(dead, 0, "no event went to the dead letters");
    let after = assigned(&std::fs::read_to_string(&first.log).expect("log"));
    let again = assigned(&std::fs::read_to_string(&second.log).expect("log"));
    eprintln!(
        "static membership: held {held:?}, got back {again:?}; the other instance held {before:?}, then {after:?}"
    );
    assert!(
        again.iter().any(|p| p.starts_with("static-repartition")),
        "the restarted instance runs state partitions again: {again:?}"
    );
    for s in [first, second] {
        s.signal("-TERM");
        let (status, log) = s.wait(Duration::from_secs(60));
        assert!(status.success(), "{log}");
    }
}

/// An instance added while the group works: the running instance gives some of its input and
/// state partitions up mid-stream (finishing and checkpointing what it consumed), the new one
/// restores them and carries on; together they decide exactly what one instance does, with
/// the windows keyed by origin and for the whole platform too.
#[test]
fn an_instance_added_mid_stream_takes_partitions_over_without_losing_a_decision() {
    let broker = Broker::start();
    broker.create_topic_with("events", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 24_000;
    let pipeline = scale_out_pipeline(tmp.path(), "added");
    let start = |i: usize| Service::start(&pipeline, &broker, &tmp.path().join(format!("instance-{i}")), &[]);
    let first = start(0);
    first.wait_ready(Duration::from_secs(60));
    // Eight seconds of stream; the second instance joins a quarter of the way in.
    let feeding = feed_partitions(&broker, total, total / 8, 4);
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.metric("rampart_events_total").unwrap_or(0.0) < total as f64 / 4.0 {
        assert!(
            Instant::now() < deadline,
            "a quarter of the stream: {}",
            first.diagnosis()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = start(1);
    feeding.join().expect("feeding");
    let reference = reference_run_with(&broker, tmp.path(), total, with_routed_windows);
    let (decided, _) = wait_for_decisions(&broker, "decisions", reference.len(), Duration::from_secs(120));
    let late = drain(&broker, "decisions.dead", Duration::from_secs(1)).len();
    assert_same_decisions(&decided, &reference);
    assert_eq!(late, 0, "no event went to the dead letters");
    let mut logs = Vec::new();
    for s in [first, second] {
        s.signal("-TERM");
        let (status, log) = s.wait(Duration::from_secs(60));
        assert!(status.success(), "{log}");
        logs.push(log);
    }
    assert!(
        logs[1].contains("state partition running"),
        "the added instance ran state partitions: {}",
        logs[1]
    );
    assert!(
        logs[0].contains("state partition released"),
        "the first instance gave state partitions up: {}",
        logs[0]
    );
}

/// Marks coming more often than a polling round waits for the next message (here a second
/// forwarder's keepalives every 40 ms, as many input partitions' marks come) must not hold the
/// stream's last rows back: the loop once polled on while marks alone came, and worked them off
/// without letting processing time move the clock, so the rows waiting for the stream to go
/// quiet waited as long as the marks kept their rhythm (a state partition taken over at the
/// end of a stream waited minutes when its forwarder's keepalive marks for input partitions
/// 0-1 and 2-3 fell out of phase: a pair every ~140 ms).
#[test]
fn marks_coming_faster_than_a_polling_round_do_not_hold_the_last_rows_back() {
    let broker = Broker::start();
    broker.create_topic_with("events", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 6_000;
    let pipeline = scale_out_pipeline(tmp.path(), "chatty");
    let service = Service::start(&pipeline, &broker, &tmp.path().join("instance-0"), &[]);
    service.wait_ready(Duration::from_secs(60));
    // A forwarder that tells every state partition, every 40 ms, that the input partitions
    // have nothing waiting (no newer time than the instance's own marks: only the rhythm counts).
    let stop = Arc::new(AtomicBool::new(false));
    let marking = {
        let (stop, kafka) = (Arc::clone(&stop), lingering_producer(&broker, 5));
        std::thread::spawn(move || {
            let places = [
                ("chatty-repartition", 4),
                ("chatty-repartition-by-origin", 4),
                ("chatty-repartition-single", 1),
            ];
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) {
                for source in 0..4 {
                    let mark = format!(
                        r#"{{"source":"kafka:events/{source}","newest":0,"next_offset":-1,"gave_records":false,"behind":false}}"#
                    );
                    for (topic, partitions) in places {
                        for p in 0..partitions {
                            let headers =
                                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                                    key: "rampart.mark",
                                    value: Some("1"),
                                });
                            let record = BaseRecord::<(), [u8]>::to(topic)
                                .partition(p)
                                .payload(mark.as_bytes())
                                .headers(headers);
                            kafka.send(record).map_err(|(e, _)| e).expect("send");
                        }
                    }
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
            kafka.flush(Duration::from_secs(10)).expect("flush");
            sent
        })
    };
    feed_partitions(&broker, total, total / 4, 4)
        .join()
        .expect("feeding");
    let reference = reference_run_with(&broker, tmp.path(), total, with_routed_windows);
    let (decided, _) = wait_for_decisions(&broker, "decisions", reference.len(), Duration::from_secs(60));
    stop.store(true, Ordering::SeqCst);
    let rounds = marking.join().expect("marking");
    assert!(
        rounds > 100,
        "the marks kept coming while the decisions were awaited: {rounds} rounds"
    );
    assert_same_decisions(&decided, &reference);
    service.signal("-TERM");
    let (status, log) = service.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
}

/// A group's blast-radius limit is the deployment's, not each state partition's: 50 actors
/// over four state partitions (about 12 each, far below the limit of 30 alone) trip a detector
/// that blocks everyone once for the whole group: never more than 30 enforced, one alert,
/// every block it enforced revoked, its later blocks in shadow on every instance.
#[test]
fn a_groups_blast_radius_limit_holds_for_the_whole_group_and_trips_once() {
    let broker = Broker::start();
    broker.create_topic_with("events", 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let total = 6_000;
    let pipeline = scale_out_pipeline(tmp.path(), "guarded");
    for file in std::fs::read_dir(pipeline.join("detectors"))
        .expect("dir")
        .flatten()
    {
        std::fs::remove_file(file.path()).expect("remove");
    }
    std::fs::write(
        pipeline.join("detectors/everyone.sql"),
        "-- id: everyone\n-- verdict: block\n-- severity: high\n-- reason: {{actor}} called {{action}}\n\
         SELECT actor, action FROM events\n",
    )
    .expect("write");
    edit(
        &pipeline.join("pipeline.toml"),
        "[decisions.blast_radius]\nenabled = false",
        "[decisions.blast_radius]\nmax_keys_per_minute = 30\nmax_share = 1.0",
    );
    // The group's size from the command line (as the container image runs it).
    edit(&pipeline.join("pipeline.toml"), "state_partitions = 4\n", "");
    let instances: Vec<Service> = (0..2)
        .map(|i| {
            let state = tmp.path().join(format!("instance-{i}"));
            Service::start(&pipeline, &broker, &state, &["--state-partitions", "4"])
        })
        .collect();
    for s in &instances {
        s.wait_ready(Duration::from_secs(60));
    }
    feed_partitions(&broker, total, total / 2, 4)
        .join()
        .expect("feeding");
    let events = |s: &Service| s.metric("rampart_events_total").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while instances.iter().map(events).sum::<f64>() < total as f64 {
        // (Every instance's state: the one short of its share is the one to read.)
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every event consumed:\n{}",
            instances
                .iter()
                .enumerate()
                .map(|(i, s)| format!("instance {i}: {}", s.diagnosis()))
                .collect::<Vec<_>>()
                .join("\n\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for s in &instances {
        s.wait_for("the fail-safe on every instance", Duration::from_secs(30), |s| {
            s.metric(r#"rampart_fail_safe_tripped{detector="everyone"}"#) == Some(1.0)
        });
    }
    let decided: Vec<Value> = drain(&broker, "decisions", Duration::from_secs(3))
        .iter()
        .map(|c| serde_json::from_slice(&c.payload).expect("json"))
        .collect();
    let everyone: Vec<&Value> = decided
        .iter()
        .filter(|d| d["detector"]["id"] == "everyone" || d["key"] == "everyone")
        .collect();
    let alerts: Vec<&&Value> = everyone.iter().filter(|d| d["verdict"] == "alert").collect();
    assert_eq!(alerts.len(), 1, "one alert for the group: {alerts:?}");
    assert!(
        alerts[0]["evidence"]["blocked_keys"]
            .as_u64()
            .is_some_and(|n| n > 30),
        "{}",
        alerts[0]
    );
    let actors = |verdict: &str, mode: &str| -> BTreeSet<String> {
        everyone
            .iter()
            .filter(|d| d["verdict"] == verdict && d["mode"] == mode)
            .map(|d| d["actor"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let enforced = actors("block", "enforce");
    let revoked = actors("revoke", "enforce");
    let shadowed = actors("block", "shadow");
    eprintln!(
        "group blast radius: {} actors blocked before the trip, {} revoked, {} blocked in shadow after it",
        enforced.len(),
        revoked.len(),
        shadowed.len()
    );
    assert!(
        enforced.len() > 12,
        "the group blocked more than any one state partition holds: {enforced:?}"
    );
    assert!(
        enforced.len() <= 30,
        "the group never enforces more blocks than the limit: {} {enforced:?}",
        enforced.len()
    );
    assert!(
        enforced.is_subset(&revoked),
        "every block enforced is revoked: {:?} not",
        enforced.difference(&revoked).collect::<Vec<_>>()
    );
    assert_eq!(
        shadowed.len(),
        50,
        "after the trip, every actor's blocks are shadow"
    );
    for s in instances {
        s.signal("-TERM");
        let (status, log) = s.wait(Duration::from_secs(60));
        assert!(status.success(), "{log}");
    }
}

#[test]
fn a_gateway_reads_the_decisions_of_its_lookback_only_and_the_enforcement_state() {
    let broker = Broker::start();
    broker.create_topic_with("looked.decisions", 2);
    broker.create_topic_with("looked.decisions.enforcement", 1);
    let kafka = lingering_producer(&broker, 50);
    let now = chrono::Utc::now();
    // Three days of decisions, oldest first, each message's timestamp its processed_at (the
    // broker's own lookup by time is checked: Tansu answers offset 0 for any earlier time).
    // Every one a block lasting four days: only those read are in force.
    let total = 6_000;
    let decided_at = |i: i64| {
        now - chrono::Duration::seconds(3 * 86_400 * (total - 1 - i) / total) - chrono::Duration::seconds(1)
    };
    let block = |i: i64| {
        let at = decided_at(i);
        serde_json::json!({
            "schema_version": 1, "decision_id": format!("d{i}"), "pipeline": "p",
            "detector": {"id": "d", "version": "v"}, "verdict": "block", "mode": "enforce",
            "severity": "high", "actor": format!("a{i}"), "key": format!("a{i}"), "actions": ["*"],
            "reason": "test", "evidence": {}, "event_time": at.to_rfc3339(),
            "processed_at": at.to_rfc3339(), "expires_at": (at + chrono::Duration::days(4)).to_rfc3339(),
            "source": {"topic": "t", "partition": 0, "offset": i}, "tags": []
        })
        .to_string()
    };
    for i in 0..total {
        let payload = block(i);
        let record = BaseRecord::<(), [u8]>::to("looked.decisions")
            .partition((i % 2) as i32)
            .payload(payload.as_bytes())
            .timestamp(decided_at(i).timestamp_millis());
        kafka.send(record).map_err(|(e, _)| e).expect("send");
    }
    // One block older than the lookback, kept by the enforcement state.
    let kept = block(0);
    kafka
        .send(BaseRecord::<(), [u8]>::to("looked.decisions.enforcement").payload(kept.as_bytes()))
        .map_err(|(e, _)| e)
        .expect("send");
    kafka.flush(Duration::from_secs(30)).expect("flush");
    let recent = (0..total)
        .filter(|i| decided_at(*i) >= now - chrono::Duration::hours(1))
        .count() as u64;
    let gateway = rampart_enforce::Enforcer::start(rampart_enforce::Config {
        brokers: broker.address(),
        topic: "looked.decisions".into(),
        lookback: Duration::from_secs(3600),
        ..Default::default()
    })
    .expect("the enforcer starts");
    wait_caught_up(&gateway, "the gateway", Duration::from_secs(30));
    let stats = gateway.stats();
    assert_eq!(
        stats.decisions,
        recent + 1,
        "the last hour of decisions ({recent}) and the state's record: {stats:?}"
    );
    assert!(gateway.is_blocked("a0", "X").is_some(), "the state's block");
    assert!(gateway.is_blocked(&format!("a{}", total - 1), "X").is_some());
    assert!(
        gateway.is_blocked(&format!("a{}", total / 2), "X").is_none(),
        "a day-and-a-half-old decision was not read"
    );
}
