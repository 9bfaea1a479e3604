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

use crate::pipeline::config::PipelineConfig;

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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::parquet::arrow::ArrowWriter;

    use crate::drivers::replay::replay_collect;
    use crate::pipeline::Pipeline;

    /// A pipeline whose detector joins a JSON-lines table and a Parquet table.
    #[test]
    fn json_lines_and_parquet_tables_join_with_events() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("p");
        for sub in ["detectors", "tables"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        std::fs::write(
            dir.join("pipeline.toml"),
            "name = \"t\"\n[mapping]\nevent_time = \"t\"\nactor = \"who\"\naction = \"op\"\n",
        )
        .expect("write");
        std::fs::write(
            dir.join("tables/owners.jsonl"),
            "{\"who\":\"alice\",\"team\":\"payments\"}\n{\"who\":\"bob\",\"team\":\"search\"}\n",
        )
        .expect("write");
        let schema = Arc::new(Schema::new(vec![
            Field::new("team", DataType::Utf8, false),
            Field::new("max_deletes", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec!["payments", "search"])),
                Arc::new(Int64Array::from(vec![0_i64, 5])),
            ],
        )
        .expect("batch");
        let file = std::fs::File::create(dir.join("tables/limits.parquet")).expect("create");
        let mut writer = ArrowWriter::try_new(file, schema, None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        std::fs::write(
            dir.join("detectors/deletes.sql"),
            "-- id: deletes\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}} of {{team}} deleted\n\
             SELECT e.actor, o.team FROM events e JOIN owners o ON e.actor = o.who \
             JOIN limits l ON o.team = l.team WHERE e.action = 'Delete' AND l.max_deletes = 0\n",
        )
        .expect("write");
        let input = tmp.path().join("in.jsonl");
        std::fs::write(
            &input,
            "{\"t\":\"2026-01-01T00:00:00Z\",\"who\":\"alice\",\"op\":\"Delete\"}\n\
             {\"t\":\"2026-01-01T00:00:01Z\",\"who\":\"bob\",\"op\":\"Delete\"}\n\
             {\"t\":\"2026-01-01T00:00:02Z\",\"who\":\"carol\",\"op\":\"Delete\"}\n",
        )
        .expect("write");
        let pipeline = Pipeline::load(&dir).expect("loads");
        assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
        let names: Vec<(String, usize)> = pipeline.tables().into_iter().map(|t| (t.name, t.rows)).collect();
        assert_eq!(names, [("limits".to_string(), 2), ("owners".to_string(), 2)]);
        let (out, _) = replay_collect(&pipeline, &[input.as_path()]).expect("replays");
        let reasons: Vec<&str> = out.decisions.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons, ["alice of payments deleted"]);
        assert!(pipeline.rule_versions().contains_key("tables/limits.parquet"));
    }
}
