//! Raw JSON record to canonical event: paths into the JSON with fallbacks, typed values.
//!
//! Every path a mapping reads goes into one tree; a record is walked once with `jiter`,
//! descending only into the keys on some path and skipping (while validating) the rest, so a
//! large `requestParameters` costs a scan, not an allocation per key.

use std::borrow::Cow;

use jiter::{Jiter, NumberAny, NumberInt, Peek};

use rampart_core::ColumnType;
use rampart_core::time::parse_rfc3339_micros;

/// A dotted path into a JSON object (`userIdentity.arn`); a numeric segment also indexes arrays
/// (`resources.0.ARN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    segments: Vec<String>,
}

impl JsonPath {
    /// Parses `a.b.c`; empty segments are an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let segments: Vec<String> = text.split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!(
                "`{text}` is not a path: write keys separated by dots, e.g. userIdentity.arn"
            ));
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// One mapped field: the first path that is present wins; else the default.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    /// Paths tried in order.
    pub paths: Vec<JsonPath>,
    /// Value when no path is present (string fields only).
    pub default: Option<String>,
}

/// The validated mapping of a pipeline.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Event time: RFC 3339 text, or a number of milliseconds since the epoch.
    pub event_time: FieldSpec,
    /// Actor (required).
    pub actor: FieldSpec,
    /// Action (required).
    pub action: FieldSpec,
    /// tenant, resource, origin, outcome.
    pub optional: [Option<FieldSpec>; 4],
    /// Extra columns: name, field, type.
    pub extras: Vec<(String, FieldSpec, ColumnType)>,
}

/// A typed value of an extra column.
#[derive(Debug, Clone, PartialEq)]
pub enum ExtraValue<'a> {
    /// Absent.
    Null,
    /// Text.
    String(Cow<'a, str>),
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// Microseconds since the epoch.
    Timestamp(i64),
}

/// One event in canonical form; text borrows from the record where it can.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedEvent<'a> {
    /// Microseconds since the epoch, UTC.
    pub event_time: i64,
    /// Actor.
    pub actor: Cow<'a, str>,
    /// Action.
    pub action: Cow<'a, str>,
    /// tenant, resource, origin, outcome.
    pub optional: [Option<Cow<'a, str>>; 4],
    /// Extra column values, in declaration order.
    pub extras: Vec<ExtraValue<'a>>,
}

/// What a path found in one record.
#[derive(Debug, Clone, PartialEq, Default)]
enum Found<'a> {
    /// Absent, or `null`.
    #[default]
    Missing,
    /// Borrowed from the record unless it had escapes.
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// An object or array where a scalar was wanted.
    Container(&'static str),
}

impl Found<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Self::Missing => "null",
            Self::Str(_) => "a string",
            Self::Int(_) | Self::Float(_) => "a number",
            Self::Bool(_) => "a boolean",
            Self::Container(kind) => kind,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: Vec<(String, usize)>,
    slot: Option<usize>,
}

impl Node {
    /// The child named `key`. (Lengths and last bytes first: most of a record's keys are not
    /// asked for, and many have the length of one that is.)
    fn child(&self, key: &str) -> Option<usize> {
        let last = key.as_bytes().last();
        self.children
            .iter()
            .find(|(name, _)| name.len() == key.len() && name.as_bytes().last() == last && name == key)
            .map(|c| c.1)
    }
}

/// Lists a decoder keeps from one record to the next ([`Extractor::map_with`]), empty.
#[derive(Debug, Default)]
pub struct Spare {
    found: Vec<Found<'static>>,
    extras: Vec<ExtraValue<'static>>,
}

impl Spare {
    /// Takes back the extra values' list of an event once its values are used.
    pub fn give_back(&mut self, extras: Vec<ExtraValue<'_>>) {
        self.extras = recycle(extras);
    }
}

/// An empty list in `list`'s allocation, for values of another lifetime. (Collecting an
/// emptied list's iterator into a list of a type of the same size and alignment reuses its
/// allocation; nothing is converted.)
fn recycle<T, U>(mut list: Vec<T>) -> Vec<U> {
    list.clear();
    list.into_iter().map(|_| unreachable!("emptied")).collect()
}

/// A mapping compiled for one-pass extraction: the path tree and, per field, the slots of its
/// paths in order.
#[derive(Debug, Clone)]
pub struct Extractor {
    mapping: Mapping,
    nodes: Vec<Node>,
    slot_count: usize,
    /// Slot of every path of every field, in field order: event_time, actor, action, the four
    /// optional fields, then extras.
    field_slots: Vec<Vec<usize>>,
}

impl Extractor {
    /// Builds the path tree of `mapping`.
    pub fn new(mapping: Mapping) -> Self {
        let mut nodes = vec![Node::default()];
        let mut slot_count = 0;
        let specs: Vec<Option<&FieldSpec>> = [
            Some(&mapping.event_time),
            Some(&mapping.actor),
            Some(&mapping.action),
        ]
        .into_iter()
        .chain(mapping.optional.iter().map(Option::as_ref))
        .chain(mapping.extras.iter().map(|(_, spec, _)| Some(spec)))
        .collect();
        let mut field_slots = Vec::new();
        for spec in specs {
            let mut slots = Vec::new();
            for path in spec.map(|s| s.paths.as_slice()).unwrap_or_default() {
                let mut node = 0;
                for seg in &path.segments {
                    node = match nodes[node].children.iter().find(|(k, _)| k == seg) {
                        Some(&(_, child)) => child,
                        None => {
                            nodes.push(Node::default());
                            let child = nodes.len() - 1;
                            nodes[node].children.push((seg.clone(), child));
                            child
                        }
                    };
                }
                let slot = *nodes[node].slot.get_or_insert_with(|| {
                    slot_count += 1;
                    slot_count - 1
                });
                slots.push(slot);
            }
            field_slots.push(slots);
        }
        Self {
            mapping,
            nodes,
            slot_count,
            field_slots,
        }
    }

    /// Parses and maps one record. The error says what is wrong: not JSON, not an object, or
    /// which field is missing or mistyped.
    pub fn map<'a>(&'a self, text: &'a str) -> Result<MappedEvent<'a>, String> {
        self.map_with(text, &mut Spare::default())
    }

    /// [`Self::map`] with the lists of a record before (`spare`): no allocation per record.
    pub fn map_with<'a>(&'a self, text: &'a str, spare: &mut Spare) -> Result<MappedEvent<'a>, String> {
        let mut found: Vec<Found<'a>> = recycle(std::mem::take(&mut spare.found));
        found.resize(self.slot_count, Found::Missing);
        let event = self.find(text, &mut found).and_then(|()| {
            let extras = recycle(std::mem::take(&mut spare.extras));
            self.fields(&found, extras)
        });
        spare.found = recycle(found);
        event
    }

    fn find<'a>(&self, text: &'a str, found: &mut [Found<'a>]) -> Result<(), String> {
        let mut jiter = Jiter::new(text.as_bytes());
        let peek = jiter.peek().map_err(|e| format!("not JSON: {e}"))?;
        if peek != Peek::Object {
            jiter.known_skip(peek).map_err(|e| format!("not JSON: {e}"))?;
            jiter.finish().map_err(|e| format!("not JSON: {e}"))?;
            return Err("the record is not a JSON object".into());
        }
        self.walk(text, &mut jiter, 0, peek, found)
            .map_err(|e| format!("not JSON: {e}"))?;
        jiter.finish().map_err(|e| format!("not JSON: {e}"))
    }

    fn walk<'a>(
        &self,
        text: &'a str,
        j: &mut Jiter,
        node: usize,
        peek: Peek,
        found: &mut [Found<'a>],
    ) -> jiter::JiterResult<()> {
        let node = &self.nodes[node];
        match peek {
            Peek::Object | Peek::Array => {
                if let Some(slot) = node.slot {
                    found[slot] = Found::Container(if peek == Peek::Object {
                        "an object"
                    } else {
                        "an array"
                    });
                }
                if node.children.is_empty() {
                    return j.known_skip(peek);
                }
                if peek == Peek::Object {
                    let mut key = j.known_object()?;
                    while let Some(k) = key {
                        match node.child(k) {
                            Some(child) => {
                                let p = j.peek()?;
                                self.walk(text, j, child, p, found)?;
                            }
                            None => j.next_skip()?,
                        }
                        key = j.next_key()?;
                    }
                } else {
                    let mut index = 0usize;
                    let mut item = j.known_array()?;
                    while let Some(p) = item {
                        let wanted = node.children.iter().find(|(name, _)| name.parse() == Ok(index));
                        match wanted {
                            Some(&(_, child)) => self.walk(text, j, child, p, found)?,
                            None => j.known_skip(p)?,
                        }
                        index += 1;
                        item = j.array_step()?;
                    }
                }
                Ok(())
            }
            _ => {
                let Some(slot) = node.slot else {
                    return j.known_skip(peek);
                };
                found[slot] = match peek {
                    Peek::Null => {
                        j.known_null()?;
                        Found::Missing
                    }
                    Peek::True | Peek::False => Found::Bool(j.known_bool(peek)?),
                    Peek::String => Found::Str(borrow_from(text, j.known_str()?)),
                    _ => match j.known_number(peek)? {
                        NumberAny::Int(NumberInt::Int(i)) => Found::Int(i),
                        NumberAny::Float(f) => Found::Float(f),
                        #[allow(unreachable_patterns)]
                        NumberAny::Int(_) => Found::Float(f64::INFINITY),
                    },
                };
                Ok(())
            }
        }
    }

    /// The first present path of field `index`, with the path.
    fn first<'f, 'a>(
        &self,
        found: &'f [Found<'a>],
        index: usize,
        spec: &'f FieldSpec,
    ) -> Option<(&'f Found<'a>, &'f JsonPath)> {
        self.field_slots[index]
            .iter()
            .zip(&spec.paths)
            .map(|(slot, path)| (&found[*slot], path))
            .find(|(f, _)| **f != Found::Missing)
    }

    fn string<'a>(
        &self,
        found: &[Found<'a>],
        index: usize,
        spec: &'a FieldSpec,
    ) -> Result<Option<Cow<'a, str>>, String> {
        match self.first(found, index, spec) {
            Some((Found::Str(s), _)) => Ok(Some(s.clone())),
            Some((other, path)) => Err(wrong_type(path, "a string", other)),
            None => Ok(spec.default.as_deref().map(Cow::Borrowed)),
        }
    }

    fn fields<'a>(
        &'a self,
        found: &[Found<'a>],
        mut extras: Vec<ExtraValue<'a>>,
    ) -> Result<MappedEvent<'a>, String> {
        let m = &self.mapping;
        let event_time = match self.first(found, 0, &m.event_time) {
            Some((v, path)) => timestamp(v, path)?,
            None => {
                return Err(format!(
                    "missing event time (looked at {})",
                    describe(&m.event_time)
                ));
            }
        };
        let actor = self
            .string(found, 1, &m.actor)?
            .ok_or_else(|| format!("missing actor (looked at {})", describe(&m.actor)))?;
        let action = self
            .string(found, 2, &m.action)?
            .ok_or_else(|| format!("missing action (looked at {})", describe(&m.action)))?;
        let mut optional: [Option<Cow<'a, str>>; 4] = Default::default();
        for (i, (slot, spec)) in optional.iter_mut().zip(&m.optional).enumerate() {
            if let Some(spec) = spec {
                *slot = self.string(found, 3 + i, spec)?;
            }
        }
        for (i, (_, spec, ty)) in m.extras.iter().enumerate() {
            extras.push(self.extra(found, 7 + i, spec, *ty)?);
        }
        Ok(MappedEvent {
            event_time,
            actor,
            action,
            optional,
            extras,
        })
    }

    fn extra<'a>(
        &self,
        found: &[Found<'a>],
        index: usize,
        spec: &'a FieldSpec,
        ty: ColumnType,
    ) -> Result<ExtraValue<'a>, String> {
        if ty == ColumnType::String {
            return Ok(self
                .string(found, index, spec)?
                .map_or(ExtraValue::Null, ExtraValue::String));
        }
        let Some((v, path)) = self.first(found, index, spec) else {
            return Ok(ExtraValue::Null);
        };
        match (ty, v) {
            (ColumnType::Int, Found::Int(i)) => Ok(ExtraValue::Int(*i)),
            (ColumnType::Float, Found::Int(i)) => Ok(ExtraValue::Float(*i as f64)),
            (ColumnType::Float, Found::Float(f)) => Ok(ExtraValue::Float(*f)),
            (ColumnType::Bool, Found::Bool(b)) => Ok(ExtraValue::Bool(*b)),
            (ColumnType::Timestamp, v) => timestamp(v, path).map(ExtraValue::Timestamp),
            (ColumnType::Int, v) => Err(wrong_type(path, "an integer", v)),
            (ColumnType::Float, v) => Err(wrong_type(path, "a number", v)),
            (ColumnType::Bool, v) => Err(wrong_type(path, "a boolean", v)),
            (ColumnType::String, _) => unreachable!("handled above"),
        }
    }
}

/// The string as a slice of the record when jiter returned one (no escapes), else a copy.
fn borrow_from<'a>(text: &'a str, s: &str) -> Cow<'a, str> {
    let start = (s.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
    match text.get(start..start.wrapping_add(s.len())) {
        Some(slice) if slice.as_ptr() == s.as_ptr() => Cow::Borrowed(slice),
        _ => Cow::Owned(s.to_string()),
    }
}

fn describe(spec: &FieldSpec) -> String {
    spec.paths
        .iter()
        .map(JsonPath::as_str)
        .collect::<Vec<_>>()
        .join(" | ")
}

fn wrong_type(path: &JsonPath, expected: &str, found: &Found) -> String {
    format!(
        "wrong type at `{}`: expected {expected}, found {}",
        path.as_str(),
        found.kind()
    )
}

fn timestamp(v: &Found, path: &JsonPath) -> Result<i64, String> {
    match v {
        Found::Str(s) => parse_rfc3339_micros(s).ok_or_else(|| {
            format!(
                "`{}` = {s:?} is not an RFC 3339 timestamp (nor a UTC date and time)",
                path.as_str()
            )
        }),
        Found::Int(ms) => ms
            .checked_mul(1000)
            .ok_or_else(|| format!("`{}` = {ms} is not a timestamp in milliseconds", path.as_str())),
        other => Err(wrong_type(
            path,
            "an RFC 3339 string or epoch milliseconds",
            other,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(paths: &[&str]) -> FieldSpec {
        FieldSpec {
            paths: paths.iter().map(|p| JsonPath::parse(p).expect("path")).collect(),
            default: None,
        }
    }

    fn extractor() -> Extractor {
        Extractor::new(Mapping {
            event_time: spec(&["eventTime"]),
            actor: spec(&["userIdentity.arn", "userIdentity.principalId"]),
            action: spec(&["eventName"]),
            optional: [
                None,
                Some(spec(&["resources.1.ARN"])),
                Some(spec(&["sourceIPAddress"])),
                None,
            ],
            extras: vec![(
                "port".into(),
                spec(&["requestParameters.fromPort"]),
                ColumnType::Int,
            )],
        })
    }

    #[test]
    fn falls_back_to_the_next_path_and_indexes_arrays() {
        let x = extractor();
        let e = x
            .map(
                r#"{"eventTime": "2024-07-31T13:06:24Z", "eventName": "X", "big": {"a": [1, {"b": null}]},
                   "userIdentity": {"principalId": "AIDA1", "arn": null},
                   "resources": [{"ARN": "first"}, {"ARN": "second"}], "requestParameters": {"fromPort": 22}}"#,
            )
            .expect("maps");
        assert_eq!(e.actor, "AIDA1");
        assert_eq!(e.optional[1].as_deref(), Some("second"));
        assert_eq!(e.optional[2], None);
        assert_eq!(e.extras[0], ExtraValue::Int(22));
    }

    #[test]
    fn missing_and_mistyped_fields_are_explained() {
        let x = extractor();
        let ok = r#""eventTime": "2024-07-31T13:06:24Z", "eventName": "X""#;
        assert_eq!(
            x.map(&format!("{{{ok}}}")).unwrap_err(),
            "missing actor (looked at userIdentity.arn | userIdentity.principalId)"
        );
        let bad_port =
            format!(r#"{{{ok}, "userIdentity": {{"arn": "a"}}, "requestParameters": {{"fromPort": "22"}}}}"#);
        assert_eq!(
            x.map(&bad_port).unwrap_err(),
            "wrong type at `requestParameters.fromPort`: expected an integer, found a string"
        );
        let object_actor = format!(r#"{{{ok}, "userIdentity": {{"arn": {{"x": 1}}}}}}"#);
        assert_eq!(
            x.map(&object_actor).unwrap_err(),
            "wrong type at `userIdentity.arn`: expected a string, found an object"
        );
        let bad_time = r#"{"eventTime": "yesterday", "eventName": "X", "userIdentity": {"arn": "a"}}"#;
        assert!(x.map(bad_time).unwrap_err().contains("not an RFC 3339 timestamp"));
    }

    #[test]
    fn invalid_json_anywhere_is_refused_even_in_skipped_parts() {
        let x = extractor();
        let skipped_garbage = r#"{"eventTime": "2024-07-31T13:06:24Z", "eventName": "X", "userIdentity": {"arn": "a"}, "other": [1, }"#;
        assert!(x.map(skipped_garbage).unwrap_err().starts_with("not JSON"));
        let trailing =
            r#"{"eventTime": "2024-07-31T13:06:24Z", "eventName": "X", "userIdentity": {"arn": "a"}} x"#;
        assert!(x.map(trailing).unwrap_err().starts_with("not JSON"));
        assert_eq!(x.map("[1, 2]").unwrap_err(), "the record is not a JSON object");
    }
}
