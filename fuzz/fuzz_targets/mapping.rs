//! The event mapping, structure-aware: arbitrary JSON records (objects nested with the keys
//! the mapping reads, and others), mapped with fallbacks, defaults and typed columns; and any
//! text as a JSON path. Never a panic.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rampart_engine::input::mapping::{Extractor, JsonPath};
use serde_json::{Map, Value};

#[derive(Arbitrary, Debug)]
enum Key {
    T,
    Time,
    Iso,
    Ts,
    User,
    Arn,
    Name,
    A,
    X,
    Org,
    Ip,
    Result,
    Error,
    Code,
    N,
    S,
    Admin,
    Seen,
    Tags,
    Other(String),
}

impl Key {
    fn name(&self) -> &str {
        match self {
            Self::T => "t",
            Self::Time => "time",
            Self::Iso => "iso",
            Self::Ts => "ts",
            Self::User => "user",
            Self::Arn => "arn",
            Self::Name => "name",
            Self::A => "a",
            Self::X => "x",
            Self::Org => "org",
            Self::Ip => "ip",
            Self::Result => "result",
            Self::Error => "error",
            Self::Code => "code",
            Self::N => "n",
            Self::S => "s",
            Self::Admin => "admin",
            Self::Seen => "seen",
            Self::Tags => "tags",
            Self::Other(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Time(u32, bool),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

impl Json {
    fn value(&self, depth: usize) -> Value {
        match self {
            _ if depth > 40 => Value::Null,
            Self::Null => Value::Null,
            Self::Bool(b) => Value::Bool(*b),
            Self::Int(i) => Value::from(*i),
            Self::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Self::Text(s) => Value::String(s.clone()),
            // RFC 3339 text or epoch milliseconds, as event times come.
            Self::Time(secs, text) if *text => {
                Value::String(format!("2026-01-{:02}T{:02}:00:00Z", secs % 28 + 1, secs % 24))
            }
            Self::Time(secs, _) => Value::from(u64::from(*secs) * 1000),
            Self::Array(items) => Value::Array(items.iter().map(|j| j.value(depth + 1)).collect()),
            Self::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.name().to_string(), v.value(depth + 1)))
                    .collect::<Map<_, _>>(),
            ),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    record: Json,
    path: String,
    raw: Option<String>,
}

fn extractor() -> &'static Extractor {
    static EXTRACTOR: std::sync::OnceLock<Extractor> = std::sync::OnceLock::new();
    EXTRACTOR.get_or_init(|| Extractor::new(common::config().0.mapping.clone()))
}

fuzz_target!(|input: Input| {
    let extractor = extractor();
    let text = input
        .raw
        .clone()
        .unwrap_or_else(|| input.record.value(0).to_string());
    // (Either a mapped event or the reason it is not: both are fine; a panic is not.)
    let _ = extractor.map(&text);
    if let Ok(path) = JsonPath::parse(&input.path) {
        assert!(!path.as_str().is_empty());
    }
});
