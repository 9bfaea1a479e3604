//! Loading detectors (sandbox, planning, shape) and running their plans on micro-batches.
//!
//! Every detector of a pipeline is planned once, at load, against the `events` table whose scan
//! reads a shared [`BatchSlot`]. Running a batch puts it in the slot and executes each plan
//! again: no SQL is parsed or planned per batch ([`DetectorEngine::plans_built`] counts plans).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::default_table_source::provider_as_source;
use datafusion::common::Column;
use datafusion::common::DataFusionError;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::TaskContext;
use datafusion::execution::context::SessionContext;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, Projection, Window};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::{ExecutionPlan, common::collect};
use datafusion::prelude::SessionConfig;
use datafusion::sql::parser::DFParser;
use datafusion::sql::sqlparser::dialect::GenericDialect;

use rampart_core::event::{EVENT_TIME, ROW_ID};
use rampart_core::{EventSchema, Problem};

use crate::events_table::{BatchSlot, EventsTable};
use crate::metadata::parse_header;
use crate::predicate_order::CheapPredicatesFirst;
use crate::sandbox::single_query;
use crate::shape::{Shape, Timing, classify, propagate_row_id, unalias, window_filters_as_case};
use crate::{Error, Result};

mod detector;
mod split;

pub use detector::{
    AggregateKind, CompiledDetector, IncrementalPlan, StateKind, Strategy, WindowAggregate, WindowCondition,
    WindowSplit, WindowedDetector,
};

/// What planning a detector's SQL gives.
struct Planned {
    shape: Shape,
    plan: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    split: Option<WindowSplit>,
}

/// Plans detectors for one pipeline's event schema and runs them on batches.
pub struct DetectorEngine {
    ctx: SessionContext,
    task_ctx: Arc<TaskContext>,
    /// Bytes one run of a plan may reserve (each run gets a memory pool of its own).
    run_memory: usize,
    slot: BatchSlot,
    runtime: tokio::runtime::Runtime,
    plans_built: AtomicUsize,
}

impl DetectorEngine {
    /// A sandboxed SQL context whose only table is `events` with `schema`, and whose functions
    /// are DataFusion's built-in scalar, aggregate and window functions plus the JSON functions
    /// of `datafusion-functions-json`. No table functions, no file or URL tables, no catalog.
    /// One run of a plan may reserve `run_memory` bytes (sorts, joins, windows); past it the
    /// run fails: nothing spills to disk.
    pub fn new(schema: &EventSchema, run_memory: usize) -> Result<Self> {
        let mut config = SessionConfig::new()
            .with_target_partitions(1)
            .with_information_schema(false)
            .with_batch_size(8192);
        config.options_mut().sql_parser.collect_spans = true;
        let runtime_env = RuntimeEnvBuilder::new()
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
            .build_arc()?;
        let mut state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime_env)
            .with_scalar_functions(SessionStateDefaults::default_scalar_functions())
            .with_aggregate_functions(SessionStateDefaults::default_aggregate_functions())
            .with_window_functions(SessionStateDefaults::default_window_functions())
            .with_expr_planners(SessionStateDefaults::default_expr_planners())
            .with_physical_optimizer_rule(Arc::new(CheapPredicatesFirst))
            .build();
        datafusion_functions_json::register_all(&mut state)?;
        let ctx = SessionContext::new_with_state(state);
        // These rules move `json_get_*` calls (which declare themselves cheap, for Parquet
        // pushdown) or calls shared by a filter and the projection into a projection *below*
        // the filter, so they parse the raw JSON of every event of every batch instead of the
        // few events that pass the filter: 8x slower on the cloudtrail pipeline.
        for rule in [
            "extract_leaf_expressions",
            "push_down_leaf_projections",
            "common_sub_expression_eliminate",
        ] {
            ctx.remove_optimizer_rule(rule);
        }
        let slot = BatchSlot::default();
        ctx.register_table(
            "events",
            Arc::new(EventsTable::new(Arc::clone(schema.arrow()), slot.clone())),
        )?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(Error::Runtime)?;
        Ok(Self {
            task_ctx: ctx.task_ctx(),
            run_memory,
            ctx,
            slot,
            runtime,
            plans_built: AtomicUsize::new(0),
        })
    }

    /// Registers reference table `name` (detectors may join it with `events`), its rows in
    /// `batches` of `schema`. Returns its slot: put a new version's batches in it to refresh
    /// the table (between two micro-batches, so that a batch sees one version). Register
    /// tables before compiling the detectors that read them.
    pub fn register_table(
        &self,
        name: &str,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<BatchSlot> {
        let slot = BatchSlot::default();
        slot.set_many(batches);
        self.ctx
            .register_table(name, Arc::new(EventsTable::new(schema, slot.clone())))?;
        Ok(slot)
    }

    /// Reads a reference table file: CSV with a header row (`.csv`), JSON lines (`.json`,
    /// `.jsonl`, `.ndjson`) or Parquet (`.parquet`); column types are inferred (strings stay
    /// `Utf8`).
    pub fn read_table_file(&self, path: &Path) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions};
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_string();
        let text = path.to_string_lossy().to_string();
        let ctx = SessionContext::new();
        let frame = self.runtime.block_on(async {
            match ext.as_str() {
                "csv" => ctx.read_csv(&text, CsvReadOptions::new().has_header(true)).await,
                "json" | "jsonl" | "ndjson" => {
                    ctx.read_json(
                        &text,
                        JsonReadOptions::default().file_extension(&format!(".{ext}")),
                    )
                    .await
                }
                "parquet" => {
                    ctx.read_parquet(&text, ParquetReadOptions::default().skip_metadata(true))
                        .await
                }
                other => Err(DataFusionError::Plan(format!(
                    "`.{other}` is not a table format (expected .csv, .json, .jsonl, .ndjson or .parquet)"
                ))),
            }
        })?;
        let batches = self.runtime.block_on(frame.collect())?;
        // Plain Utf8 strings, like the events table, so that joins compare like with like.
        let fields: Vec<Field> = batches
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| Arc::new(Schema::empty()))
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Utf8View | DataType::LargeUtf8 => Field::new(f.name(), DataType::Utf8, true),
                other => Field::new(f.name(), other.clone(), true),
            })
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let batches = batches
            .iter()
            .map(|b| {
                let columns = b
                    .columns()
                    .iter()
                    .zip(schema.fields())
                    .map(|(c, f)| datafusion::arrow::compute::cast(c, f.data_type()))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                RecordBatch::try_new(Arc::clone(&schema), columns)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?;
        Ok((schema, batches))
    }

    /// How many physical plans this engine has built (one per compiled detector).
    pub fn plans_built(&self) -> usize {
        self.plans_built.load(Ordering::Relaxed)
    }

    /// Loads one detector file: metadata, sandbox, planning, shape. Every problem found is
    /// returned with the file and line.
    pub fn compile(&self, path: &Path, text: &str) -> std::result::Result<CompiledDetector, Vec<Problem>> {
        let meta = parse_header(path, text);
        let first_sql_line = text
            .lines()
            .position(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with("--")
            })
            .map_or(1, |i| i + 1);
        let planned = self.plan(path, text, first_sql_line);
        let (
            meta,
            Planned {
                shape,
                plan,
                schema: output_schema,
                split,
            },
        ) = match (meta, planned) {
            (Ok(m), Ok(p)) => (m, p),
            (Err(mut a), Err(b)) => {
                a.push(b);
                return Err(a);
            }
            (Err(a), Ok(_)) => return Err(a),
            (Ok(_), Err(b)) => return Err(vec![b]),
        };
        let columns: Vec<&str> = output_schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|n| *n != ROW_ID)
            .collect();
        let missing: Vec<Problem> = meta
            .reason
            .columns()
            .filter(|c| !columns.contains(c))
            .map(|c| {
                Problem::at(
                    path,
                    line_of(text, "reason:").unwrap_or(1),
                    format!(
                        "reason placeholder {{{{{c}}}}} is not a column of the query's result (columns: {})",
                        columns.join(", ")
                    ),
                )
            })
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        let row_id_index = output_schema.index_of(ROW_ID).map_err(|_| {
            vec![Problem::at(
                path,
                first_sql_line,
                "internal: the result does not carry the event row id; please report this detector",
            )]
        })?;
        // Window plans sort and buffer: give every execution fresh operator state.
        let needs_reset = has_join(&plan) || shape != Shape::PerEvent;
        self.plans_built.fetch_add(1, Ordering::Relaxed);
        Ok(CompiledDetector {
            meta,
            path: path.to_path_buf(),
            version: rampart_core::decision::content_version(text.as_bytes()),
            shape,
            output_schema,
            row_id_index,
            plan,
            needs_reset,
            split,
        })
    }

    fn plan(&self, path: &Path, text: &str, first_sql_line: usize) -> std::result::Result<Planned, Problem> {
        let statements = DFParser::parse_sql_with_dialect(text, &GenericDialect {})
            .map_err(|e| problem_from(path, first_sql_line, "SQL syntax error", &e))?;
        let statement = single_query(path, text, first_sql_line, statements)?;
        let state = self.ctx.state();
        let logical = self
            .runtime
            .block_on(state.statement_to_plan(statement))
            .map_err(|e| problem_from(path, first_sql_line, "the query does not plan", &e))?;
        let logical = window_filters_as_case(logical)
            .map_err(|e| problem_from(path, first_sql_line, "the query does not plan", &e))?;
        let shape = classify(&logical).map_err(|reason| Problem::at(path, first_sql_line, reason))?;
        crate::sandbox::regexes_compile(&logical)
            .map_err(|reason| Problem::at(path, first_sql_line, reason))?;
        let logical = propagate_row_id(logical)
            .map_err(|e| problem_from(path, first_sql_line, "the query does not plan", &e))?;
        let physical = self
            .runtime
            .block_on(state.create_physical_plan(&logical))
            .map_err(|e| problem_from(path, first_sql_line, "the query does not plan", &e))?;
        let schema = physical.schema();
        let split = match &shape {
            Shape::PerEvent => None,
            // Cut the optimised plan: projections pushed below the window keep only the
            // columns the detector uses in its state.
            windowed => Some(
                state
                    .optimize(&logical)
                    .and_then(|optimised| self.split_at_state(&optimised, windowed))
                    .map_err(|e| problem_from(path, first_sql_line, "the window query does not plan", &e))?
                    .map_err(|reason| Problem::at(path, first_sql_line, reason))?,
            ),
        };
        Ok(Planned {
            shape,
            plan: physical,
            schema,
            split,
        })
    }

    /// Runs the part of an incremental window detector above its window over `rows` (`pre`'s
    /// columns and the window values, as [`IncrementalPlan::above_input`]).
    pub fn run_above(&self, plan: &IncrementalPlan, rows: RecordBatch) -> Result<Vec<RecordBatch>> {
        self.execute_over(&plan.above_slot, vec![rows], &plan.above, has_join(&plan.above))
    }

    /// Runs every detector on `batch`; one result per detector, in order, with the time it
    /// took. A detector that fails at run time (a cast of bad data, say) fails alone.
    pub fn run(
        &self,
        detectors: &[&CompiledDetector],
        batch: RecordBatch,
    ) -> Vec<(Result<Vec<RecordBatch>>, std::time::Duration)> {
        self.slot.set(batch);
        let results = detectors
            .iter()
            .map(|d| {
                let started = std::time::Instant::now();
                let result = self.execute(d);
                (result, started.elapsed())
            })
            .collect();
        self.slot.clear();
        results
    }

    /// Runs one detector with `events` = the union of `batches` (a sliding-window detector over
    /// its retained window and the new micro-batch).
    pub fn run_over(
        &self,
        detector: &CompiledDetector,
        batches: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>> {
        self.execute_over(&self.slot, batches, &detector.plan, detector.needs_reset)
    }

    /// Runs the per-event part of a sliding-window detector on a new batch: the rows (and
    /// columns) its window needs.
    pub fn run_pre(&self, split: &WindowSplit, batch: RecordBatch) -> Result<Vec<RecordBatch>> {
        // A join with a reference table below the window rebuilds its hash table every batch.
        self.execute_over(&self.slot, vec![batch], &split.pre, has_join(&split.pre))
    }

    /// Runs the window part of a windowed detector over kept `run_pre` rows.
    pub fn run_post(&self, split: &WindowSplit, retained: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        let batches = retained
            .iter()
            .map(|b| RecordBatch::try_new(Arc::clone(&split.post_input), b.columns().to_vec()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::DataFusion(e.into()))?;
        self.execute_over(&split.post_slot, batches, &split.post, true)
    }

    /// Runs `plan` with `slot` holding `batches`, and empties the slot afterwards.
    fn execute_over(
        &self,
        slot: &BatchSlot,
        batches: Vec<RecordBatch>,
        plan: &Arc<dyn ExecutionPlan>,
        needs_reset: bool,
    ) -> Result<Vec<RecordBatch>> {
        slot.set_many(batches);
        let result = self.execute_plan(plan, needs_reset);
        slot.clear();
        result
    }

    fn execute(&self, d: &CompiledDetector) -> Result<Vec<RecordBatch>> {
        self.execute_plan(&d.plan, d.needs_reset)
    }

    fn execute_plan(&self, plan: &Arc<dyn ExecutionPlan>, needs_reset: bool) -> Result<Vec<RecordBatch>> {
        let plan = if needs_reset {
            reset_plan_states(Arc::clone(plan))?
        } else {
            Arc::clone(plan)
        };
        let stream = plan.execute(0, self.task_for_one_run()?)?;
        let batches = self.runtime.block_on(collect(stream))?;
        Ok(batches.into_iter().filter(|b| b.num_rows() > 0).collect())
    }

    /// A task context whose memory pool is this run's alone: one detector's run cannot take
    /// memory from another's (windows run on two threads).
    fn task_for_one_run(&self) -> Result<Arc<TaskContext>> {
        let base = &self.task_ctx;
        let runtime = RuntimeEnvBuilder::from_runtime_env(base.runtime_env().as_ref())
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(self.run_memory)))
            .build_arc()?;
        // (Plans hold their functions already: the run needs no registry of them.)
        Ok(Arc::new(TaskContext::new(
            None,
            base.session_id(),
            base.session_config().clone(),
            Default::default(),
            Default::default(),
            Default::default(),
            Default::default(),
            runtime,
        )))
    }
}

/// A scan of a batch slot that shows `schema`'s columns under their own names and qualifiers
/// (the slot's batches have positional names `c0..`, all nullable): a stand-in for a cut-off
/// part of a plan. Returns the plan, the slot's schema and the slot.
fn slot_scan(
    name: &str,
    schema: &datafusion::common::DFSchema,
) -> datafusion::common::Result<(LogicalPlan, SchemaRef, BatchSlot)> {
    let slot_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let slot = BatchSlot::default();
    let provider = Arc::new(EventsTable::new(Arc::clone(&slot_schema), slot.clone()));
    let scan = LogicalPlanBuilder::scan(name, provider_as_source(provider), None)?.build()?;
    let renamed = schema
        .iter()
        .enumerate()
        .map(|(i, (qualifier, field))| {
            Expr::Column(Column::new_unqualified(format!("c{i}")))
                .alias_qualified(qualifier.cloned(), field.name())
        })
        .collect();
    let plan = LogicalPlan::Projection(Projection::try_new(renamed, Arc::new(scan))?);
    Ok((plan, slot_schema, slot))
}

fn has_join(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        if node.name().contains("Join") {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Turns a DataFusion error into a problem at the best line known: the diagnostic's span, the
/// parser's `Line: N`, or the first line of SQL.
fn problem_from(path: &Path, fallback_line: usize, what: &str, err: &DataFusionError) -> Problem {
    let diagnostic_line = err
        .iter()
        .find_map(|e| e.diagnostic())
        .and_then(|d| d.span)
        .map(|s| s.start.line as usize)
        .filter(|l| *l > 0);
    let message = err.message().to_string();
    let parser_line = message
        .rsplit_once("Line: ")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok());
    let line = diagnostic_line.or(parser_line).unwrap_or(fallback_line);
    let message = message.trim_start_matches("sql parser error: ").to_string();
    Problem::at(path, line, format!("{what}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{StringArray, TimestampMicrosecondArray, UInt64Array};
    use rstest::rstest;

    const HEADER: &str = "-- id: t\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}} did it\n";

    fn engine() -> DetectorEngine {
        DetectorEngine::new(&EventSchema::new(vec![]), 64 << 20).expect("engine")
    }

    fn compile(sql: &str) -> std::result::Result<CompiledDetector, Vec<String>> {
        engine()
            .compile(Path::new("t.sql"), &format!("{HEADER}{sql}"))
            .map_err(|ps| ps.iter().map(ToString::to_string).collect())
    }

    #[rstest]
    #[case::count(
        "SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '15 minutes' PRECEDING AND CURRENT ROW) AS n FROM events) WHERE n >= 5",
        "sliding window: count(..) over 15m per events.actor"
    )]
    #[case::distinct_qualify(
        "SELECT actor, origin FROM events QUALIFY count(DISTINCT action) OVER (PARTITION BY actor, origin \
         ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) >= 20",
        "sliding window: count(DISTINCT ..) over 1h per events.actor, events.origin"
    )]
    #[case::grouped(
        "SELECT actor, count(*) AS n FROM events GROUP BY actor, date_bin(INTERVAL '1 hour', event_time) HAVING count(*) > 100",
        "grouped window: 1h buckets per events.actor"
    )]
    #[case::grouped_monotone_having(
        "SELECT actor FROM events GROUP BY actor, date_bin(INTERVAL '1 hour', event_time) \
         HAVING (100 <= count(DISTINCT action) OR min(length(action)) < 2) AND actor LIKE 'arn:%'",
        "grouped window: 1h buckets per events.actor"
    )]
    fn windows_compile_and_say_what_they_keep(#[case] sql: &str, #[case] shape: &str) {
        let detector = compile(sql).expect("compiles");
        assert_eq!(detector.shape.to_string(), shape);
        let split = detector.split().expect("windowed");
        let kept: Vec<&str> = split
            .pre_schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert!(
            !kept.contains(&"raw"),
            "only the columns the window uses are kept: {kept:?}"
        );
    }

    #[test]
    fn frames_that_look_ahead_decide_that_long_after_each_event() {
        for (frame, ahead, shape) in [
            (
                "CURRENT ROW AND INTERVAL '30 minutes' FOLLOWING",
                1800,
                "count(..) over the next 30m per events.actor",
            ),
            (
                "INTERVAL '5 minutes' PRECEDING AND INTERVAL '10 seconds' FOLLOWING",
                10,
                "count(..) over 5m back and 10s ahead per events.actor",
            ),
        ] {
            // An absence: no StartLogging within the frame of a StopLogging.
            let sql = format!(
                "SELECT actor FROM (SELECT actor, action, count(*) FILTER (WHERE action = 'StartLogging') \
                 OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN {frame}) AS restarts \
                 FROM events) WHERE action = 'StopLogging' AND restarts = 0"
            );
            let detector = compile(&sql).expect("compiles");
            let split = detector.split().expect("windowed");
            assert_eq!(
                split.timing,
                Timing::LooksAhead(std::time::Duration::from_secs(ahead)),
                "{frame}"
            );
            assert!(split.incremental().is_some(), "{frame}: kept incrementally");
            assert_eq!(detector.shape.to_string(), format!("sliding window: {shape}"));
        }
    }

    #[rstest]
    #[case::count(
        "SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n FROM events) WHERE n >= 15",
        None
    )]
    #[case::qualify_distinct_and_own_column(
        "SELECT actor FROM events QUALIFY count(DISTINCT action) OVER (PARTITION BY actor \
         ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) >= 20 AND actor LIKE 'arn:%'",
        None
    )]
    #[case::min_below(
        "SELECT actor, m FROM (SELECT actor, min(length(action)) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS m FROM events) WHERE m <= 3 OR actor = 'x'",
        None
    )]
    #[case::sum_of_case(
        "SELECT actor, s FROM (SELECT actor, sum(CASE WHEN outcome = 'Failure' THEN 1 ELSE 0 END) OVER \
         (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS s FROM events) \
         WHERE 10 < s",
        None
    )]
    #[case::time_of_the_last_a_is_known(
        "SELECT actor, last_a FROM (SELECT actor, action, max(CASE WHEN action = 'A' THEN event_time END) OVER \
         (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) \
         AS last_a FROM events) WHERE action = 'B' AND last_a IS NOT NULL",
        None
    )]
    #[case::filtered_count(
        "SELECT actor, n FROM (SELECT actor, count(*) FILTER (WHERE outcome = 'Failure') OVER (PARTITION BY actor \
         ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n FROM events) WHERE n >= 3",
        None
    )]
    #[case::not_null_of_a_computed_value(
        "SELECT actor, d FROM (SELECT actor, CASE WHEN count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) < 3 THEN 1 END AS d FROM events) WHERE d IS NOT NULL",
        Some("could stop holding")
    )]
    #[case::count_below(
        "SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n FROM events) WHERE n < 3",
        Some("`")
    )]
    #[case::average(
        "SELECT actor FROM events QUALIFY avg(length(action)) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) > 20",
        Some("could stop holding")
    )]
    #[case::sum_of_any_sign(
        "SELECT actor FROM events QUALIFY sum(json_get_int(raw, 'bytes')) OVER (PARTITION BY actor \
         ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) > 20",
        Some("could stop holding")
    )]
    #[case::difference(
        "SELECT actor, hi - lo AS d FROM (SELECT actor, max(length(action)) OVER w AS hi, \
         min(length(action)) OVER w AS lo FROM events WINDOW w AS (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW)) WHERE hi - lo > 9",
        Some("could stop holding")
    )]
    #[case::negated(
        "SELECT actor FROM events QUALIFY NOT (count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW) > 3)",
        Some("could stop holding")
    )]
    #[case::nested(
        "SELECT actor, m FROM (SELECT actor, max(n) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW) AS m FROM (SELECT actor, event_time, \
         count(*) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '2 minutes' PRECEDING \
         AND CURRENT ROW) AS n FROM events)) WHERE m >= 6",
        Some("window over another window")
    )]
    fn sliding_windows_decide_at_once_when_their_condition_only_becomes_true(
        #[case] sql: &str,
        #[case] waits_because: Option<&str>,
    ) {
        let detector = compile(sql).expect("compiles");
        let timing = &detector.split().expect("windowed").timing;
        match waits_because {
            None => assert_eq!(timing, &Timing::AtOnce, "{sql}"),
            Some(why) => assert!(
                matches!(timing, Timing::AfterLateness(reason) if reason.contains(why)),
                "{sql}: {timing}"
            ),
        }
    }

    const COUNT_10M: &str = "count(*) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN \
                             INTERVAL '10 minutes' PRECEDING AND CURRENT ROW)";

    /// The conditions above a sliding window on its values alone are found through aliases and
    /// projections; a condition that also reads the row (in an OR) is not one of them.
    #[rstest]
    #[case::threshold(
        "SELECT actor, n FROM (SELECT actor, {c} AS n FROM events) WHERE n > 3",
        Some("> 3")
    )]
    #[case::qualify("SELECT actor FROM events QUALIFY {c} >= 7", Some(">= 7"))]
    #[case::the_window_part_of_an_and(
        "SELECT actor, n FROM (SELECT actor, action, {c} AS n FROM events) WHERE action = 'Delete' AND n >= 5",
        Some(">= 5")
    )]
    #[case::an_or_with_the_row(
        "SELECT actor, n FROM (SELECT actor, action, {c} AS n FROM events) WHERE n >= 5 OR action = 'Delete'",
        None
    )]
    #[case::through_a_subquery_alias(
        "SELECT s.actor FROM (SELECT actor, {c} AS n FROM events) s WHERE s.n > 4",
        Some("> 4")
    )]
    #[case::computed_from_two_values(
        "SELECT actor FROM (SELECT actor, max(length(action)) OVER w AS hi, min(length(action)) OVER w AS lo \
         FROM events WINDOW w AS (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '5 minutes' \
         PRECEDING AND CURRENT ROW)) WHERE hi - lo > 9",
        Some("> 9")
    )]
    #[case::none("SELECT actor, n FROM (SELECT actor, {c} AS n FROM events)", None)]
    fn conditions_on_window_values_alone_are_found(#[case] sql: &str, #[case] contains: Option<&str>) {
        let sql = sql.replace("{c}", COUNT_10M);
        let detector = compile(&sql).expect("compiles");
        let plan = detector
            .split()
            .and_then(WindowSplit::incremental)
            .expect("incremental");
        let found = plan.condition.as_ref().map(|c| c.expr.to_string());
        match (contains, &found) {
            (Some(part), Some(found)) => {
                assert!(found.contains(part), "{sql}: {found}");
                assert!(!found.contains("action@"), "{sql}: reads the row: {found}");
            }
            (None, None) => {}
            _ => panic!("{sql}: found {found:?}, wanted {contains:?}"),
        }
    }

    #[rstest]
    #[case::rows_frame(
        "SELECT actor FROM events QUALIFY count(*) OVER (PARTITION BY actor ORDER BY event_time ROWS BETWEEN 5 PRECEDING AND CURRENT ROW) > 3",
        "ROWS frames count events, not time"
    )]
    #[case::no_time_order(
        "SELECT actor FROM events QUALIFY count(*) OVER (PARTITION BY actor) > 3",
        "has no time order; add ORDER BY event_time"
    )]
    #[case::unbounded_frame(
        "SELECT actor FROM events QUALIFY count(*) OVER (PARTITION BY actor ORDER BY event_time) > 3",
        "is unbounded"
    )]
    #[case::following_without_end(
        "SELECT actor FROM events QUALIFY count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '1 minute' PRECEDING AND UNBOUNDED FOLLOWING) > 3",
        "looks ahead without end"
    )]
    #[case::frames_ending_apart(
        "SELECT actor FROM events QUALIFY count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '1 minute' PRECEDING AND INTERVAL '1 minute' FOLLOWING) > \
         count(*) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '1 minute' \
         PRECEDING AND CURRENT ROW)",
        "must look equally far ahead"
    )]
    #[case::starting_ahead(
        "SELECT actor FROM events QUALIFY count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '1 minute' FOLLOWING AND INTERVAL '2 minutes' FOLLOWING) > 3",
        "start it at INTERVAL '...' PRECEDING, or at CURRENT ROW"
    )]
    #[case::ranking(
        "SELECT actor FROM events QUALIFY row_number() OVER (PARTITION BY actor ORDER BY event_time) = 1",
        "row_number() ranks"
    )]
    #[case::approx_distinct(
        "SELECT actor FROM events QUALIFY approx_distinct(origin) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) > 3",
        "approx_distinct has no sliding-frame form"
    )]
    #[case::months(
        "SELECT actor FROM events QUALIFY count(*) OVER (PARTITION BY actor ORDER BY event_time \
         RANGE BETWEEN INTERVAL '1 month' PRECEDING AND CURRENT ROW) > 3",
        "months have no fixed length"
    )]
    #[case::date_bin_other_column(
        "SELECT actor, count(*) AS n FROM events GROUP BY actor, date_bin(INTERVAL '1 hour', to_timestamp(action)) HAVING count(*) > 1",
        "date_bin must bucket event_time"
    )]
    #[case::having_that_can_stop_holding(
        "SELECT actor, count(*) AS n FROM events GROUP BY actor, date_bin(INTERVAL '1 hour', event_time) HAVING count(*) < 3",
        "could stop holding as more events arrive"
    )]
    #[case::having_average(
        "SELECT actor FROM events GROUP BY actor, date_bin(INTERVAL '1 hour', event_time) HAVING avg(length(action)) > 3",
        "could stop holding as more events arrive"
    )]
    #[case::unbounded_group(
        "SELECT actor, count(*) AS n FROM events GROUP BY actor",
        "an aggregate without a time window"
    )]
    #[case::self_join(
        "SELECT a.actor FROM events a JOIN events b ON a.actor = b.actor",
        "a join of `events` with itself"
    )]
    #[case::recursive(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT actor FROM events, r",
        "recursive"
    )]
    #[case::regex_too_big(
        "SELECT actor FROM events WHERE regexp_like(action, '((a{100}){100}){100}')",
        "compiles to more than 10485760 bytes"
    )]
    #[case::regex_operator_too_big(
        "SELECT actor FROM events WHERE action ~* '((b{100}){100}){100}'",
        "compiles to more than"
    )]
    #[case::regex_broken(
        "SELECT actor, regexp_replace(action, '(unclosed', 'x') AS a FROM events",
        "does not compile: regex parse error"
    )]
    #[case::distinct("SELECT DISTINCT actor FROM events", "DISTINCT over a stream")]
    #[case::limit("SELECT actor FROM events LIMIT 3", "LIMIT has no meaning")]
    #[case::subquery(
        "SELECT actor FROM events WHERE actor IN (SELECT actor FROM events WHERE action = 'x')",
        "subquery over `events`"
    )]
    #[case::syntax(
        "SELECT actor\nFROM events\nWHERE action = = 'x'",
        "t.sql:7: SQL syntax error"
    )]
    #[case::unknown_column(
        "SELECT actor\nFROM events\nWHERE acton = 'x'",
        "t.sql:7: the query does not plan"
    )]
    #[case::missing_placeholder_column(
        "SELECT action FROM events",
        "reason placeholder {{actor}} is not a column"
    )]
    fn shapes_that_cannot_run_per_event_are_refused_with_the_line(#[case] sql: &str, #[case] expected: &str) {
        let errors = compile(sql).expect_err("refused");
        assert!(errors.iter().any(|e| e.contains(expected)), "{errors:#?}");
    }

    #[test]
    fn a_per_event_detector_runs_on_every_batch_without_replanning() {
        let engine = engine();
        let detector = engine
            .compile(
                Path::new("t.sql"),
                &format!(
                    "{HEADER}SELECT actor, upper(action) AS what FROM events WHERE action LIKE 'Delete%'"
                ),
            )
            .expect("compiles");
        assert_eq!(detector.shape, Shape::PerEvent);
        let schema = EventSchema::new(vec![]);
        let batch = |actions: &[&str], first: u64| {
            let n = actions.len();
            let text = |v: &str| std::sync::Arc::new(StringArray::from(vec![v; n])) as _;
            let none = || std::sync::Arc::new(StringArray::from(vec![None::<&str>; n])) as _;
            RecordBatch::try_new(
                Arc::clone(schema.arrow()),
                vec![
                    Arc::new(TimestampMicrosecondArray::from(vec![0; n]).with_timezone("UTC")),
                    text("alice"),
                    Arc::new(StringArray::from(actions.to_vec())),
                    none(),
                    none(),
                    none(),
                    none(),
                    text("{}"),
                    Arc::new(UInt64Array::from((first..first + n as u64).collect::<Vec<_>>())),
                ],
            )
            .expect("batch")
        };
        for (actions, first, expected_rows) in [
            (&["Get", "DeleteBucket", "Put"][..], 0, vec![1]),
            (&["DeleteTrail", "DeleteUser"][..], 3, vec![3, 4]),
        ] {
            let result = engine.run(&[&detector], batch(actions, first));
            let batches = result.into_iter().next().expect("one result").0.expect("runs");
            let rows: Vec<u64> = batches
                .iter()
                .flat_map(|b| {
                    b.column(detector.row_id_index)
                        .as_any()
                        .downcast_ref::<UInt64Array>()
                        .expect("row ids")
                        .values()
                        .to_vec()
                })
                .collect();
            assert_eq!(rows, expected_rows);
        }
        assert_eq!(engine.plans_built(), 1);
    }
}
