//! The canonical event table that every detector reads as `events`.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Event time, UTC, microsecond precision. Drives every window.
pub const EVENT_TIME: &str = "event_time";
/// Who did it: a user, role, API key or service.
pub const ACTOR: &str = "actor";
/// What they did (e.g. CloudTrail `eventName`).
pub const ACTION: &str = "action";
/// Optional: the customer or account the action belongs to.
pub const TENANT: &str = "tenant";
/// Optional: what the action touched.
pub const RESOURCE: &str = "resource";
/// Optional: where it came from (IP address or host).
pub const ORIGIN: &str = "origin";
/// Optional: how it ended (`Success`, `Failure`, an error code...).
pub const OUTCOME: &str = "outcome";
/// The original record, as JSON text, for `json_get_*` functions.
pub const RAW: &str = "raw";
/// Hidden column: the ordinal of the event in its ingest run. Rampart threads it through
/// per-event detector plans to know which event triggered a result row; it never appears in
/// decisions.
pub const ROW_ID: &str = "_rampart_row";

/// The optional canonical text columns, in schema order.
pub const OPTIONAL_COLUMNS: [&str; 4] = [TENANT, RESOURCE, ORIGIN, OUTCOME];

/// Names a pipeline may not use for its own extra columns.
pub const RESERVED_COLUMNS: [&str; 9] = [
    EVENT_TIME, ACTOR, ACTION, TENANT, RESOURCE, ORIGIN, OUTCOME, RAW, ROW_ID,
];

/// The type of a pipeline-declared extra column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// UTF-8 text.
    String,
    /// 64-bit signed integer.
    Int,
    /// 64-bit float.
    Float,
    /// Boolean.
    Bool,
    /// Timestamp, UTC, microseconds.
    Timestamp,
}

impl ColumnType {
    /// Parses the name used in `pipeline.toml`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "string" => Self::String,
            "int" => Self::Int,
            "float" => Self::Float,
            "bool" => Self::Bool,
            "timestamp" => Self::Timestamp,
            _ => return None,
        })
    }

    /// The Arrow type this column is stored as.
    pub fn data_type(self) -> DataType {
        match self {
            Self::String => DataType::Utf8,
            Self::Int => DataType::Int64,
            Self::Float => DataType::Float64,
            Self::Bool => DataType::Boolean,
            Self::Timestamp => timestamp_type(),
        }
    }
}

/// The Arrow type of `event_time` and timestamp columns.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The schema of the `events` table of one pipeline: canonical columns, then the pipeline's
/// extra columns in declaration order, then `raw` and the hidden row id.
#[derive(Debug, Clone)]
pub struct EventSchema {
    schema: SchemaRef,
    extras: Vec<(String, ColumnType)>,
}

impl EventSchema {
    /// Builds the schema for a pipeline that declares `extras`.
    pub fn new(extras: Vec<(String, ColumnType)>) -> Self {
        let mut fields = vec![
            Field::new(EVENT_TIME, timestamp_type(), false),
            Field::new(ACTOR, DataType::Utf8, false),
            Field::new(ACTION, DataType::Utf8, false),
        ];
        fields.extend(
            OPTIONAL_COLUMNS
                .iter()
                .map(|c| Field::new(*c, DataType::Utf8, true)),
        );
        fields.extend(
            extras
                .iter()
                .map(|(name, ty)| Field::new(name, ty.data_type(), true)),
        );
        fields.push(Field::new(RAW, DataType::Utf8, false));
        fields.push(Field::new(ROW_ID, DataType::UInt64, false));
        Self {
            schema: Arc::new(Schema::new(fields)),
            extras,
        }
    }

    /// The Arrow schema.
    pub fn arrow(&self) -> &SchemaRef {
        &self.schema
    }

    /// The pipeline's extra columns.
    pub fn extras(&self) -> &[(String, ColumnType)] {
        &self.extras
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_orders_canonical_then_extras_then_raw() {
        let s = EventSchema::new(vec![("region".into(), ColumnType::String)]);
        let names: Vec<_> = s.arrow().fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "event_time",
                "actor",
                "action",
                "tenant",
                "resource",
                "origin",
                "outcome",
                "region",
                "raw",
                "_rampart_row"
            ]
        );
    }
}
