//! Raw JSON record to canonical event: paths into the JSON with fallbacks, typed values.

use serde_json::Value;

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

    /// Follows the path; `null` counts as absent.
    pub fn lookup<'v>(&self, mut value: &'v Value) -> Option<&'v Value> {
        for seg in &self.segments {
            value = match value {
                Value::Object(map) => map.get(seg)?,
                Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        (!value.is_null()).then_some(value)
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

impl FieldSpec {
    fn find<'v>(&self, record: &'v Value) -> Option<(&'v Value, &JsonPath)> {
        self.paths.iter().find_map(|p| p.lookup(record).map(|v| (v, p)))
    }

    fn describe(&self) -> String {
        let paths: Vec<&str> = self.paths.iter().map(JsonPath::as_str).collect();
        paths.join(" | ")
    }

    fn string(&self, record: &Value) -> Result<Option<String>, String> {
        match self.find(record) {
            Some((Value::String(s), _)) => Ok(Some(s.clone())),
            Some((other, path)) => Err(wrong_type(path, "a string", other)),
            None => Ok(self.default.clone()),
        }
    }
}

fn wrong_type(path: &JsonPath, expected: &str, found: &Value) -> String {
    let kind = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!(
        "wrong type at `{}`: expected {expected}, found {kind}",
        path.as_str()
    )
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
pub enum ExtraValue {
    /// Absent.
    Null,
    /// Text.
    String(String),
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// Microseconds since the epoch.
    Timestamp(i64),
}

/// One event in canonical form.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedEvent {
    /// Microseconds since the epoch, UTC.
    pub event_time: i64,
    /// Actor.
    pub actor: String,
    /// Action.
    pub action: String,
    /// tenant, resource, origin, outcome.
    pub optional: [Option<String>; 4],
    /// Extra column values, in declaration order.
    pub extras: Vec<ExtraValue>,
}

impl Mapping {
    /// Maps one parsed record. The error says which field is missing or mistyped.
    pub fn map(&self, record: &Value) -> Result<MappedEvent, String> {
        if !record.is_object() {
            return Err("the record is not a JSON object".into());
        }
        let event_time = match self.event_time.find(record) {
            Some((v, path)) => timestamp(v, path)?,
            None => {
                return Err(format!(
                    "missing event time (looked at {})",
                    self.event_time.describe()
                ));
            }
        };
        let actor = self
            .actor
            .string(record)?
            .ok_or_else(|| format!("missing actor (looked at {})", self.actor.describe()))?;
        let action = self
            .action
            .string(record)?
            .ok_or_else(|| format!("missing action (looked at {})", self.action.describe()))?;
        let mut optional: [Option<String>; 4] = Default::default();
        for (slot, spec) in optional.iter_mut().zip(&self.optional) {
            if let Some(spec) = spec {
                *slot = spec.string(record)?;
            }
        }
        let extras = self
            .extras
            .iter()
            .map(|(_, spec, ty)| extra(spec, *ty, record))
            .collect::<Result<_, _>>()?;
        Ok(MappedEvent {
            event_time,
            actor,
            action,
            optional,
            extras,
        })
    }
}

fn timestamp(v: &Value, path: &JsonPath) -> Result<i64, String> {
    match v {
        Value::String(s) => parse_rfc3339_micros(s).ok_or_else(|| {
            format!(
                "`{}` = {s:?} is not an RFC 3339 timestamp (nor a UTC date and time)",
                path.as_str()
            )
        }),
        Value::Number(n) => n
            .as_i64()
            .and_then(|ms| ms.checked_mul(1000))
            .ok_or_else(|| format!("`{}` = {n} is not a timestamp in milliseconds", path.as_str())),
        other => Err(wrong_type(
            path,
            "an RFC 3339 string or epoch milliseconds",
            other,
        )),
    }
}

fn extra(spec: &FieldSpec, ty: ColumnType, record: &Value) -> Result<ExtraValue, String> {
    if ty == ColumnType::String {
        return Ok(spec.string(record)?.map_or(ExtraValue::Null, ExtraValue::String));
    }
    let Some((v, path)) = spec.find(record) else {
        return Ok(ExtraValue::Null);
    };
    match ty {
        ColumnType::Int => v
            .as_i64()
            .map(ExtraValue::Int)
            .ok_or_else(|| wrong_type(path, "an integer", v)),
        ColumnType::Float => v
            .as_f64()
            .map(ExtraValue::Float)
            .ok_or_else(|| wrong_type(path, "a number", v)),
        ColumnType::Bool => v
            .as_bool()
            .map(ExtraValue::Bool)
            .ok_or_else(|| wrong_type(path, "a boolean", v)),
        ColumnType::Timestamp => timestamp(v, path).map(ExtraValue::Timestamp),
        ColumnType::String => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(paths: &[&str]) -> FieldSpec {
        FieldSpec {
            paths: paths.iter().map(|p| JsonPath::parse(p).expect("path")).collect(),
            default: None,
        }
    }

    fn mapping() -> Mapping {
        Mapping {
            event_time: spec(&["eventTime"]),
            actor: spec(&["userIdentity.arn", "userIdentity.principalId"]),
            action: spec(&["eventName"]),
            optional: [None, None, Some(spec(&["sourceIPAddress"])), None],
            extras: vec![(
                "port".into(),
                spec(&["requestParameters.fromPort"]),
                ColumnType::Int,
            )],
        }
    }

    #[test]
    fn falls_back_to_the_next_path() {
        let record = json!({"eventTime": "2024-07-31T13:06:24Z", "eventName": "X",
            "userIdentity": {"principalId": "AIDA1", "arn": null}, "requestParameters": {"fromPort": 22}});
        let e = mapping().map(&record).expect("maps");
        assert_eq!(e.actor, "AIDA1");
        assert_eq!(e.optional[2], None);
        assert_eq!(e.extras, [ExtraValue::Int(22)]);
    }

    #[test]
    fn missing_and_mistyped_fields_are_explained() {
        let m = mapping();
        let no_actor = json!({"eventTime": "2024-07-31T13:06:24Z", "eventName": "X"});
        assert_eq!(
            m.map(&no_actor).unwrap_err(),
            "missing actor (looked at userIdentity.arn | userIdentity.principalId)"
        );
        let bad_port = json!({"eventTime": "2024-07-31T13:06:24Z", "eventName": "X",
            "userIdentity": {"arn": "a"}, "requestParameters": {"fromPort": "22"}});
        assert_eq!(
            m.map(&bad_port).unwrap_err(),
            "wrong type at `requestParameters.fromPort`: expected an integer, found a string"
        );
        let bad_time = json!({"eventTime": "yesterday", "eventName": "X", "userIdentity": {"arn": "a"}});
        assert!(
            m.map(&bad_time)
                .unwrap_err()
                .contains("not an RFC 3339 timestamp")
        );
    }
}
