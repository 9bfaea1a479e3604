//! Reference tables detectors join with `events`: entitlements and plan quotas, allow-lists,
//! live platform state. Files in the pipeline's `tables/` (CSV with a header, JSON lines,
//! Parquet; the file name is the table name) are read at load and re-read by a reload; tables
//! from compacted Kafka topics (`[tables.NAME]`) start empty and are refreshed by the service
//! between two micro-batches, so a batch always sees one version.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::TimestampMicrosecondBuilder;
use datafusion::arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};

use rampart_core::{ColumnType, Problem};
use rampart_sql::DetectorEngine;
use rampart_sql::events_table::BatchSlot;

use crate::config::PipelineConfig;

/// Where a reference table's rows come from.
#[derive(Debug, Clone)]
pub enum TableSource {
    /// A file in `tables/`.
    File(PathBuf),
    /// A compacted topic: the latest JSON object per message key is a row.
    Topic {
        /// The topic.
        topic: String,
        /// Its columns.
        columns: Vec<(String, ColumnType)>,
    },
}

/// One registered reference table.
#[derive(Debug, Clone)]
pub struct ReferenceTable {
    /// The name detectors use.
    pub name: String,
    /// Where its rows come from.
    pub source: TableSource,
    /// Rows in the current version.
    pub rows: usize,
    schema: SchemaRef,
    slot: BatchSlot,
}

impl ReferenceTable {
    /// Replaces the table's rows with `rows` (JSON objects; missing or mistyped fields are
    /// null). Only for topic tables (file tables change by reloading the pipeline).
    pub fn set_rows<'a>(&mut self, rows: impl Iterator<Item = &'a Map<String, Value>>) {
        let TableSource::Topic { columns, .. } = &self.source else {
            return;
        };
        let rows: Vec<&Map<String, Value>> = rows.collect();
        let arrays: Vec<ArrayRef> = columns
            .iter()
            .map(|(name, ty)| column(rows.iter().map(|r| r.get(name)), *ty))
            .collect();
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), arrays).expect("columns match the schema");
        self.rows = batch.num_rows();
        self.slot.set(batch);
    }
}

fn column<'a>(values: impl Iterator<Item = Option<&'a Value>>, ty: ColumnType) -> ArrayRef {
    match ty {
        ColumnType::String => {
            let mut b = StringBuilder::new();
            for v in values {
                match v {
                    Some(Value::String(s)) => b.append_value(s),
                    Some(Value::Null) | None => b.append_null(),
                    Some(other) => b.append_value(other.to_string()),
                }
            }
            Arc::new(b.finish())
        }
        ColumnType::Int => {
            let mut b = Int64Builder::new();
            for v in values {
                b.append_option(v.and_then(Value::as_i64));
            }
            Arc::new(b.finish())
        }
        ColumnType::Float => {
            let mut b = Float64Builder::new();
            for v in values {
                b.append_option(v.and_then(Value::as_f64));
            }
            Arc::new(b.finish())
        }
        ColumnType::Bool => {
            let mut b = BooleanBuilder::new();
            for v in values {
                b.append_option(v.and_then(Value::as_bool));
            }
            Arc::new(b.finish())
        }
        ColumnType::Timestamp => {
            let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
            for v in values {
                b.append_option(
                    v.and_then(Value::as_str)
                        .and_then(rampart_core::time::parse_rfc3339_micros),
                );
            }
            Arc::new(b.finish())
        }
    }
}

/// Registers the pipeline's reference tables with `engine`: every file of `dir/tables/` and
/// every `[tables.NAME]` topic table. A table that cannot be read is a problem (detectors that
/// join it are then refused by planning).
pub fn register(
    engine: &DetectorEngine,
    dir: &Path,
    config: &PipelineConfig,
    problems: &mut Vec<Problem>,
) -> Vec<ReferenceTable> {
    let mut tables = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tables"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for path in files {
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else {
            continue;
        };
        if let Err(why) = valid_name(&name, &tables) {
            problems.push(Problem::in_file(&path, why));
            continue;
        }
        let registered = engine.read_table_file(&path).and_then(|(schema, batches)| {
            let rows = batches.iter().map(RecordBatch::num_rows).sum();
            let slot = engine.register_table(&name, Arc::clone(&schema), batches)?;
            Ok((schema, slot, rows))
        });
        match registered {
            Ok((schema, slot, rows)) => tables.push(ReferenceTable {
                name,
                source: TableSource::File(path),
                rows,
                schema,
                slot,
            }),
            Err(e) => problems.push(Problem::in_file(&path, format!("cannot read the table: {e}"))),
        }
    }
    for t in &config.topic_tables {
        let config_path = dir.join("pipeline.toml");
        if let Err(why) = valid_name(&t.name, &tables) {
            problems.push(Problem::in_file(&config_path, why));
            continue;
        }
        let schema: SchemaRef = Arc::new(Schema::new(
            t.columns
                .iter()
                .map(|(n, ty)| Field::new(n, ty.data_type(), true))
                .collect::<Vec<_>>(),
        ));
        match engine.register_table(&t.name, Arc::clone(&schema), Vec::new()) {
            Ok(slot) => tables.push(ReferenceTable {
                name: t.name.clone(),
                source: TableSource::Topic {
                    topic: t.topic.clone(),
                    columns: t.columns.clone(),
                },
                rows: 0,
                schema,
                slot,
            }),
            Err(e) => problems.push(Problem::in_file(&config_path, format!("table `{}`: {e}", t.name))),
        }
    }
    tables
}

fn valid_name(name: &str, tables: &[ReferenceTable]) -> Result<(), String> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Err(format!(
            "table name `{name}` (the file name without extension) must be lowercase letters, digits and `_`"
        ));
    }
    if name == "events" {
        return Err("a reference table cannot be called `events`".into());
    }
    if tables.iter().any(|t| t.name == name) {
        return Err(format!("there are two tables called `{name}`"));
    }
    Ok(())
}
