//! What compiling a detector gives: [`CompiledDetector`] (its metadata, shape and physical
//! plan) and, for a windowed detector, its plan cut at the window ([`WindowSplit`]) with the
//! [`Strategy`] its state follows.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;

use crate::events_table::BatchSlot;
use crate::metadata::DetectorMeta;
use crate::shape::{Shape, Timing};

/// A detector that passed the sandbox and was planned.
#[derive(Debug)]
pub struct CompiledDetector {
    /// Its metadata.
    pub meta: DetectorMeta,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Content hash of the file.
    pub version: String,
    /// What kind of query it is.
    pub shape: Shape,
    /// Columns of its result rows (including the hidden row id).
    pub output_schema: SchemaRef,
    /// Index of the hidden row id in `output_schema`.
    pub row_id_index: usize,
    pub(crate) plan: Arc<dyn ExecutionPlan>,
    pub(crate) needs_reset: bool,
    /// For a sliding window: the plan split at the window.
    pub(crate) split: Option<WindowSplit>,
}

/// A windowed detector's plan cut at its state: `pre` is the per-event part below the window
/// (filters, projections) and runs on each new batch; `post` is the window (or the grouping)
/// and everything above it, and runs over the rows kept for the keys a batch touched. So only
/// the rows and columns the window needs are kept between batches, per key.
#[derive(Debug)]
pub struct WindowSplit {
    pub(crate) pre: Arc<dyn ExecutionPlan>,
    pub(crate) post: Arc<dyn ExecutionPlan>,
    pub(crate) post_slot: BatchSlot,
    /// The schema `post` reads (positional column names).
    pub(crate) post_input: SchemaRef,
    /// The schema of `pre`'s output (the rows kept in state).
    pub pre_schema: SchemaRef,
    /// How the window keeps and decides its rows.
    pub strategy: Strategy,
    /// The key, evaluated over `pre`'s output: the PARTITION BY expressions of the windows, or
    /// the GROUP BY expressions (the `date_bin` bucket included).
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// How far back in event time a row can matter to a later one: the sum of the window
    /// lengths (windows over windows reach back through each other), or the bucket length.
    pub reach: Duration,
    /// Column of `pre`'s output holding the event time.
    pub time_index: usize,
    /// Column of `pre`'s output holding the hidden row id.
    pub row_index: usize,
    /// When rows are decided: at once, or when the watermark passes them (and why).
    pub timing: Timing,
}

/// How a window keeps and decides its rows.
#[derive(Debug)]
pub enum Strategy {
    /// A single sliding window whose aggregates Rampart maintains as rows enter and leave its
    /// frames.
    Incremental(IncrementalPlan),
    /// A sliding window re-run over its key's rows when a row is due (aggregates or shapes
    /// Rampart does not maintain itself).
    Rerun,
    /// A grouped window: each group (key and bucket) fires once, when its HAVING first holds.
    Grouped,
}

/// A windowed detector with its window: what the window state works with.
#[derive(Debug, Clone, Copy)]
pub struct WindowedDetector<'a> {
    /// The detector.
    pub detector: &'a CompiledDetector,
    /// Its plan cut at the window.
    pub split: &'a WindowSplit,
}

/// A sliding-window detector evaluated incrementally: Rampart keeps each aggregate per key as
/// rows enter and leave its frame, and runs only the part of the query *above* the window
/// (`above`) on the decided rows with their window values.
#[derive(Debug)]
pub struct IncrementalPlan {
    pub(crate) above: Arc<dyn ExecutionPlan>,
    pub(crate) above_slot: BatchSlot,
    /// What `above` reads: `pre`'s columns, then one column per aggregate.
    pub above_input: SchemaRef,
    /// The window's aggregates, in column order.
    pub aggregates: Vec<WindowAggregate>,
    /// What every row `above` returns meets, on the window's values alone (see
    /// [`WindowCondition`]); `None`: no such condition (every decided row is judged).
    pub condition: Option<WindowCondition>,
}

/// The conditions above a sliding window that read nothing but its values (`count(*) OVER
/// (...) > 100`), taken through the projections between: a row whose values fail them cannot
/// be in the result of the plan above, so it need not be judged (most rows of a threshold
/// detector). Found only when nothing but projections, filters, aliases and sorts lies between
/// the window and the result.
#[derive(Debug)]
pub struct WindowCondition {
    /// The conditions, joined by AND, over `input`.
    pub expr: Arc<dyn PhysicalExpr>,
    /// One column per aggregate of the window, in order (the values of [`IncrementalPlan::aggregates`]).
    pub input: SchemaRef,
}

/// One aggregate of a sliding window.
#[derive(Debug, Clone)]
pub struct WindowAggregate {
    /// The function.
    pub function: AggregateKind,
    /// Its argument over `pre`'s output (`None` for `count(*)`).
    pub argument: Option<Arc<dyn PhysicalExpr>>,
    /// The frame length, in microseconds.
    pub length: i64,
    /// How far the frame looks ahead, in microseconds (0: it ends at the current row).
    pub following: i64,
    /// Type of the result column.
    pub output: DataType,
}

/// Aggregates Rampart maintains incrementally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregateKind {
    /// `count(*)` / `count(x)`.
    Count,
    /// `count(DISTINCT x)`.
    CountDistinct,
    /// `sum(x)`.
    Sum,
    /// `avg(x)`.
    Avg,
    /// `min(x)`.
    Min,
    /// `max(x)`.
    Max,
}

/// How a windowed detector uses its kept rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// Each row is decided once, over the rows of its key within its frame.
    Sliding,
    /// Each group (key and bucket) fires once, when its HAVING first holds.
    Grouped,
}

impl CompiledDetector {
    /// For a sliding-window detector, its plan split at the window.
    pub fn split(&self) -> Option<&WindowSplit> {
        self.split.as_ref()
    }

    /// The detector with its window, if it has one.
    pub fn windowed(&self) -> Option<WindowedDetector<'_>> {
        Some(WindowedDetector {
            detector: self,
            split: self.split.as_ref()?,
        })
    }

    /// The physical plan, indented, as `EXPLAIN` would print it.
    pub fn explain(&self) -> String {
        datafusion::physical_plan::displayable(self.plan.as_ref())
            .indent(true)
            .to_string()
    }
}

impl WindowSplit {
    /// Sliding frames or grouped buckets.
    pub fn kind(&self) -> StateKind {
        match self.strategy {
            Strategy::Incremental(_) | Strategy::Rerun => StateKind::Sliding,
            Strategy::Grouped => StateKind::Grouped,
        }
    }

    /// For a single sliding window whose aggregates Rampart maintains itself: how.
    pub fn incremental(&self) -> Option<&IncrementalPlan> {
        match &self.strategy {
            Strategy::Incremental(plan) => Some(plan),
            Strategy::Rerun | Strategy::Grouped => None,
        }
    }

    /// For an incremental sliding window: what its state was made of before windows with other
    /// frames shared rows, as text: [`Self::rows_identity`] with each aggregate's frame length
    /// and the reach. States were stored under a hash of it; a state with no store tag of its
    /// own yet takes over the one its members kept then.
    pub fn state_identity(&self) -> Option<String> {
        self.identity(true)
    }

    /// For an incremental sliding window: the rows its state keeps and how, as text. That is
    /// the plan below the window (the rows kept, with their columns), the key, the aggregates'
    /// functions, arguments and how far they look ahead, but not how far back their frames
    /// reach. Detectors with the same rows identity keep the same rows and arguments; they
    /// differ only in their frame lengths and above the window (their thresholds or outputs).
    /// So they can share one state: one row per event and key, one accumulator per aggregate
    /// and frame length. `None` for state that is a detector's own: grouped windows, and
    /// windows re-run over their rows.
    pub fn rows_identity(&self) -> Option<String> {
        self.identity(false)
    }

    fn identity(&self, frames: bool) -> Option<String> {
        use std::fmt::Write;
        let plan = self.incremental()?;
        let mut s = datafusion::physical_plan::displayable(self.pre.as_ref())
            .indent(true)
            .to_string();
        for f in self.pre_schema.fields() {
            let _ = writeln!(
                s,
                "column {}: {} (nullable: {})",
                f.name(),
                f.data_type(),
                f.is_nullable()
            );
        }
        for k in &self.keys {
            let _ = writeln!(s, "key {k}");
        }
        for a in &plan.aggregates {
            let argument = a
                .argument
                .as_ref()
                .map_or_else(|| "*".to_string(), |e| e.to_string());
            if frames {
                let _ = writeln!(
                    s,
                    "aggregate {:?}({argument}) over {} µs: {}",
                    a.function, a.length, a.output
                );
            } else {
                let _ = writeln!(s, "aggregate {:?}({argument}): {}", a.function, a.output);
            }
            if a.following != 0 {
                // (Only then: the identity of windows ending at the current row is unchanged.)
                let _ = writeln!(s, "following {} µs", a.following);
            }
        }
        if frames {
            let _ = writeln!(
                s,
                "reach {:?}, time column {}, row id column {}",
                self.reach, self.time_index, self.row_index
            );
        } else {
            let _ = writeln!(
                s,
                "time column {}, row id column {}",
                self.time_index, self.row_index
            );
        }
        Some(s)
    }
}
