//! Recognising what kind of detector a query is, from its logical plan, and refusing the
//! shapes that cannot be evaluated on a stream with the same answer as in batch.

use std::fmt;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, Result};
use datafusion::logical_expr::{Expr, LogicalPlan, Projection};

use rampart_core::event::ROW_ID;

/// The supported detector shapes (DESIGN.md, "Detectors").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// `SELECT ... FROM events WHERE ...`: each event is judged on its own.
    PerEvent,
    /// A window function with an `OVER (... ORDER BY event_time RANGE ...)` frame.
    SlidingWindow {
        /// The window expressions, as DataFusion prints them.
        windows: Vec<String>,
    },
    /// `GROUP BY ..., date_bin(...)` with `HAVING`.
    GroupedWindow {
        /// The grouping expressions, as DataFusion prints them.
        groups: Vec<String>,
    },
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PerEvent => f.write_str("per-event"),
            Self::SlidingWindow { windows } => write!(f, "sliding window: {}", windows.join(", ")),
            Self::GroupedWindow { groups } => write!(f, "grouped window: GROUP BY {}", groups.join(", ")),
        }
    }
}

/// Classifies a detector's (unoptimised) logical plan. `Err` carries the reason the shape is
/// refused and what to write instead.
pub fn classify(plan: &LogicalPlan) -> Result<Shape, String> {
    let mut windows = Vec::new();
    let mut groups = None;
    let mut refusal = None;

    plan.apply_with_subqueries(|node| {
        let refuse = match node {
            LogicalPlan::Join(join) if reads_events(&join.left) && reads_events(&join.right) => Some(
                "a join of `events` with itself compares events across the whole stream, which \
                 has no bounded streaming form; use a window function over the key instead",
            ),
            LogicalPlan::Distinct(_) => Some(
                "DISTINCT over a stream never forgets what it has seen; use count(DISTINCT ...) \
                 in a sliding window or a GROUP BY with date_bin(...)",
            ),
            LogicalPlan::Limit(_) => {
                Some("LIMIT has no meaning on an unbounded stream (which rows would be first?); remove it")
            }
            LogicalPlan::RecursiveQuery(_) => Some("recursive queries are not supported in detectors"),
            LogicalPlan::Subquery(sub) if reads_events(&sub.subquery) => Some(
                "a subquery over `events` compares each event with the whole stream; use a window \
                 function over the key instead",
            ),
            LogicalPlan::Window(w) => {
                windows.extend(w.window_expr.iter().map(|e| e.to_string()));
                None
            }
            LogicalPlan::Aggregate(agg) => {
                if agg.group_expr.iter().any(is_date_bin) {
                    groups = Some(agg.group_expr.iter().map(|e| e.to_string()).collect());
                    None
                } else {
                    Some(
                        "an aggregate without a time window grows without bound on a stream; \
                         add date_bin(INTERVAL '1 hour', event_time) to the GROUP BY (a grouped \
                         window) or use a sliding window function",
                    )
                }
            }
            _ => None,
        };
        if let Some(reason) = refuse {
            refusal = Some(reason.to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| e.to_string())?;

    if let Some(reason) = refusal {
        return Err(reason);
    }
    match (windows.is_empty(), groups) {
        (false, Some(_)) => {
            Err("a detector may use window functions or GROUP BY date_bin(...), not both".into())
        }
        (false, None) => Ok(Shape::SlidingWindow { windows }),
        (true, Some(groups)) => Ok(Shape::GroupedWindow { groups }),
        (true, None) => Ok(Shape::PerEvent),
    }
}

fn reads_events(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && scan.table_name.table() == "events"
        {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

fn is_date_bin(expr: &Expr) -> bool {
    let mut found = false;
    let _ = expr.apply(|e| {
        if let Expr::ScalarFunction(f) = e
            && f.name() == "date_bin"
        {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Threads the hidden row-id column through every projection of a per-event plan, so that each
/// result row says which event produced it.
pub fn propagate_row_id(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up(|node| match node {
        LogicalPlan::Projection(p) => {
            let input = p.input.schema();
            let wanted = input.has_column_with_unqualified_name(ROW_ID)
                && !p.schema.has_column_with_unqualified_name(ROW_ID);
            if !wanted {
                return Ok(Transformed::no(LogicalPlan::Projection(p)));
            }
            let (qualifier, _) = input.qualified_field_with_unqualified_name(ROW_ID)?;
            let mut exprs = p.expr.clone();
            exprs.push(Expr::Column(Column::new(qualifier.cloned(), ROW_ID)));
            Ok(Transformed::yes(LogicalPlan::Projection(Projection::try_new(
                exprs, p.input,
            )?)))
        }
        other => Ok(Transformed::yes(other.recompute_schema()?)),
    })
    .map(|t| t.data)
}
