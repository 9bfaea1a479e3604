//! Recognising what kind of detector a query is, from its logical plan, and refusing the
//! shapes that cannot be evaluated on a stream with the same answer as in batch.

use std::fmt;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, IntervalUnit};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, Result, ScalarValue};
use datafusion::functions_aggregate::expr_fn::max;
use datafusion::logical_expr::{
    Aggregate, Expr, LogicalPlan, Projection, WindowFrameBound, WindowFrameUnits, WindowFunctionDefinition,
    when,
};

use rampart_core::event::{EVENT_TIME, ROW_ID};

/// The supported detector shapes (DESIGN.md, "Detectors").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// `SELECT ... FROM events WHERE ...`: each event is judged on its own.
    PerEvent,
    /// Aggregates over `OVER (PARTITION BY ... ORDER BY event_time RANGE BETWEEN INTERVAL ...
    /// PRECEDING AND CURRENT ROW)` frames.
    SlidingWindow {
        /// One entry per window expression.
        windows: Vec<SlidingWindow>,
    },
    /// `GROUP BY ..., date_bin(INTERVAL ..., event_time)` with `HAVING`.
    GroupedWindow {
        /// Length of the time buckets.
        bucket: Duration,
        /// The other grouping expressions (the key), as DataFusion prints them.
        keys: Vec<String>,
    },
}

/// One sliding-window aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlidingWindow {
    /// `count`, `sum`, `min`, `max` or `avg`.
    pub function: String,
    /// `count(DISTINCT ...)`.
    pub distinct: bool,
    /// The partition key expressions (empty: one window over all events).
    pub partition_by: Vec<String>,
    /// How far back the frame reaches from each event.
    pub length: Duration,
    /// How far ahead it reaches (`INTERVAL '30 minutes' FOLLOWING`; zero for `CURRENT ROW`):
    /// an event is decided once the watermark passes its time plus this.
    pub following: Duration,
}

impl fmt::Display for SlidingWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let distinct = if self.distinct { "DISTINCT " } else { "" };
        match (self.length.is_zero(), self.following.is_zero()) {
            (true, false) => write!(
                f,
                "{}({distinct}..) over the next {}",
                self.function,
                humantime::format_duration(self.following)
            )?,
            (false, false) => write!(
                f,
                "{}({distinct}..) over {} back and {} ahead",
                self.function,
                humantime::format_duration(self.length),
                humantime::format_duration(self.following)
            )?,
            _ => write!(
                f,
                "{}({distinct}..) over {}",
                self.function,
                humantime::format_duration(self.length)
            )?,
        }
        match self.partition_by.as_slice() {
            [] => f.write_str(" over all events"),
            keys => write!(f, " per {}", keys.join(", ")),
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PerEvent => f.write_str("per-event"),
            Self::SlidingWindow { windows } => {
                let windows: Vec<String> = windows.iter().map(ToString::to_string).collect();
                write!(f, "sliding window: {}", windows.join("; "))
            }
            Self::GroupedWindow { bucket, keys } => {
                write!(
                    f,
                    "grouped window: {} buckets",
                    humantime::format_duration(*bucket)
                )?;
                if !keys.is_empty() {
                    write!(f, " per {}", keys.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

/// Aggregates that Rampart can maintain over a sliding RANGE frame (the ones DataFusion also
/// evaluates over sliding frames in batch, so that both answers can be compared).
const SLIDING_AGGREGATES: [&str; 5] = ["count", "sum", "min", "max", "avg"];

/// Checks one window expression; `Err` says why it cannot be evaluated incrementally and what
/// to write instead.
pub fn sliding_window(expr: &Expr) -> Result<SlidingWindow, String> {
    let Expr::WindowFunction(w) = expr else {
        return Err(format!("`{expr}` is not a window function"));
    };
    let name = w.fun.name().to_string();
    let params = &w.params;
    if matches!(w.fun, WindowFunctionDefinition::WindowUDF(_)) {
        return Err(format!(
            "the window function {name}() ranks or looks at neighbouring rows, which depends on \
             events not yet seen; use an aggregate (count, sum, min, max, avg) over a RANGE frame"
        ));
    }
    if name == "approx_distinct" {
        return Err(
            "approx_distinct has no sliding-frame form (DataFusion cannot check it in batch \
                    either); use count(DISTINCT ...) in the window, or approx_distinct in a GROUP BY \
                    with date_bin(...)"
                .into(),
        );
    }
    if !SLIDING_AGGREGATES.contains(&name.as_str()) {
        return Err(format!(
            "{name}() is not supported in a sliding window (supported: {}, count(DISTINCT ...))",
            SLIDING_AGGREGATES.join(", ")
        ));
    }
    if params.filter.is_some() {
        return Err(format!(
            "{name}(...) FILTER (WHERE ...) in a window is not supported; move the condition to the query's WHERE"
        ));
    }
    let ordered_by_time = matches!(params.order_by.as_slice(),
        [sort] if sort.asc && matches!(&sort.expr, Expr::Column(c) if c.name == EVENT_TIME));
    if params.order_by.is_empty() {
        return Err(format!(
            "the window of {name}() has no time order; add ORDER BY event_time RANGE BETWEEN \
             INTERVAL '10 minutes' PRECEDING AND CURRENT ROW"
        ));
    }
    if !ordered_by_time {
        return Err(format!(
            "the window of {name}() must be ordered by event_time ascending, alone (ORDER BY event_time)"
        ));
    }
    let frame = &params.window_frame;
    if frame.units != WindowFrameUnits::Range {
        return Err(format!(
            "{} frames count events, not time; use RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW",
            frame.units
        ));
    }
    let following = match &frame.end_bound {
        WindowFrameBound::CurrentRow => Duration::ZERO,
        WindowFrameBound::Following(v) if v.is_null() => {
            return Err(format!(
                "the frame of {name}() looks ahead without end (UNBOUNDED FOLLOWING): no event \
                 could be decided before the input ends; bound it, e.g. RANGE BETWEEN CURRENT ROW \
                 AND INTERVAL '30 minutes' FOLLOWING"
            ));
        }
        WindowFrameBound::Following(v) => interval(v)?,
        other => {
            return Err(format!(
                "the frame of {name}() ends at `{other}`; end it at CURRENT ROW or at INTERVAL '...' FOLLOWING"
            ));
        }
    };
    let length = match &frame.start_bound {
        WindowFrameBound::Preceding(v) if v.is_null() => {
            return Err(format!(
                "the frame of {name}() is unbounded (UNBOUNDED PRECEDING, also the default with \
                 ORDER BY): it would keep every event forever; bound it, e.g. RANGE BETWEEN \
                 INTERVAL '15 minutes' PRECEDING AND CURRENT ROW"
            ));
        }
        WindowFrameBound::Preceding(v) => interval(v)?,
        WindowFrameBound::CurrentRow if !following.is_zero() => Duration::ZERO,
        other => {
            return Err(format!(
                "the frame of {name}() starts at `{other}`; start it at INTERVAL '...' PRECEDING, or \
                 at CURRENT ROW when it ends at INTERVAL '...' FOLLOWING"
            ));
        }
    };
    Ok(SlidingWindow {
        function: name,
        distinct: params.distinct,
        partition_by: params.partition_by.iter().map(ToString::to_string).collect(),
        length,
        following,
    })
}

/// `expr` without its aliases.
pub fn unalias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

/// An interval literal as a duration; months (of varying length) are refused.
fn interval(v: &ScalarValue) -> Result<Duration, String> {
    let nanos: i128 = match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => {
            i128::from(i.days) * 86_400_000_000_000 + i128::from(i.nanoseconds)
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            i128::from(i.days) * 86_400_000_000_000 + i128::from(i.milliseconds) * 1_000_000
        }
        // The SQL planner keeps a RANGE frame's `INTERVAL '15 minutes'` as text until the
        // order-by type is known; cast it the way DataFusion will.
        ScalarValue::Utf8(Some(_)) => {
            let unit = DataType::Interval(IntervalUnit::MonthDayNano);
            return match v.cast_to(&unit) {
                Ok(cast) if !cast.is_null() => interval(&cast),
                _ => Err(format!(
                    "the window length `{v}` is not an interval, e.g. INTERVAL '15 minutes'"
                )),
            };
        }
        ScalarValue::IntervalMonthDayNano(Some(_)) | ScalarValue::IntervalYearMonth(Some(_)) => {
            return Err(
                "months have no fixed length; write the window in days, e.g. INTERVAL '30 days'".into(),
            );
        }
        other => {
            return Err(format!(
                "the window length `{other}` must be an INTERVAL, e.g. INTERVAL '15 minutes'"
            ));
        }
    };
    u64::try_from(nanos)
        .ok()
        .filter(|n| *n > 0)
        .map(Duration::from_nanos)
        .ok_or_else(|| "the window length must be positive".into())
}

/// The bucket of `date_bin(INTERVAL, event_time[, origin])`, if `expr` is one.
fn date_bin_bucket(expr: &Expr) -> Option<Result<Duration, String>> {
    let mut found = None;
    let _ = expr.apply(|e| {
        if let Expr::ScalarFunction(f) = e
            && f.name() == "date_bin"
        {
            found = Some(match f.args.as_slice() {
                [Expr::Literal(stride, _), Expr::Column(c), ..] if c.name == EVENT_TIME => interval(stride),
                [_, Expr::Column(c), ..] if c.name == EVENT_TIME => {
                    Err("date_bin's bucket must be a literal INTERVAL, e.g. date_bin(INTERVAL '1 hour', event_time)".into())
                }
                _ => Err("date_bin must bucket event_time: date_bin(INTERVAL '1 hour', event_time)".into()),
            });
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
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
                for expr in &w.window_expr {
                    match sliding_window(unalias(expr)) {
                        Ok(spec) => windows.push(spec),
                        Err(reason) => {
                            refusal = Some(reason);
                            return Ok(TreeNodeRecursion::Stop);
                        }
                    }
                }
                None
            }
            LogicalPlan::Filter(f) => match f.input.as_ref() {
                LogicalPlan::Aggregate(agg) => {
                    if let Err(reason) = having_only_becomes_true(&f.predicate, agg) {
                        refusal = Some(reason);
                        return Ok(TreeNodeRecursion::Stop);
                    }
                    None
                }
                _ => None,
            },
            LogicalPlan::Aggregate(agg) => {
                let buckets: Vec<_> = agg.group_expr.iter().filter_map(date_bin_bucket).collect();
                match buckets.as_slice() {
                    [Ok(bucket)] => {
                        let keys = agg
                            .group_expr
                            .iter()
                            .filter(|e| date_bin_bucket(e).is_none())
                            .map(ToString::to_string)
                            .collect();
                        groups = Some((*bucket, keys));
                        None
                    }
                    [Err(reason)] => {
                        refusal = Some(reason.clone());
                        return Ok(TreeNodeRecursion::Stop);
                    }
                    [] => Some(
                        "an aggregate without a time window grows without bound on a stream; \
                         add date_bin(INTERVAL '1 hour', event_time) to the GROUP BY (a grouped \
                         window) or use a sliding window function",
                    ),
                    _ => Some("GROUP BY may hold one date_bin(...) time bucket"),
                }
            }
            _ => None,
        };
        if let Some(reason) = refuse {
            refusal = Some(reason.to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        if refusal.is_some() {
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
        (true, Some((bucket, keys))) => Ok(Shape::GroupedWindow { bucket, keys }),
        (true, None) => Ok(Shape::PerEvent),
    }
}

/// A grouped window fires as soon as its HAVING holds, so HAVING may only use conditions that,
/// once true, stay true as events arrive: increasing aggregates (count, count DISTINCT,
/// approx_distinct, sum, max) above a constant, min below one, and conditions on the group key.
fn having_only_becomes_true(
    predicate: &Expr,
    agg: &datafusion::logical_expr::Aggregate,
) -> Result<(), String> {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    let outputs = agg.schema.fields();
    let offset = agg.group_expr.len();
    let function_of = |e: &Expr| -> Option<String> {
        let mut e = unalias(e);
        while let Expr::Cast(c) = e {
            e = unalias(&c.expr);
        }
        let Expr::Column(c) = e else { return None };
        let i = outputs.iter().position(|f| f.name() == &c.name)?;
        let aggregate = agg.aggr_expr.get(i.checked_sub(offset)?)?;
        match unalias(aggregate) {
            Expr::AggregateFunction(f) => Some(f.func.name().to_string()),
            _ => Some(String::new()),
        }
    };
    let uses_aggregate = |e: &Expr| e.exists(|n| Ok(function_of(n).is_some())).unwrap_or(true);
    let refuse = |e: &Expr| {
        Err(format!(
            "HAVING `{e}` could stop holding as more events arrive, but a grouped window fires as \
             soon as HAVING holds; use conditions that only become true: count(...), sum(...) of \
             non-negative values, max(...) or approx_distinct(...) > or >= a constant, min(...) < \
             or <= a constant"
        ))
    };
    match predicate {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And | Operator::Or,
            right,
        }) => {
            having_only_becomes_true(left, agg)?;
            having_only_becomes_true(right, agg)
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (function, op, other) = match (function_of(left), function_of(right)) {
                (Some(f), None) => (f, *op, right.as_ref()),
                (None, Some(f)) => match op.swap() {
                    Some(swapped) => (f, swapped, left.as_ref()),
                    None => return refuse(predicate),
                },
                (None, None) if !uses_aggregate(predicate) => return Ok(()),
                _ => return refuse(predicate),
            };
            if uses_aggregate(other) {
                return refuse(predicate);
            }
            let increasing = matches!(function.as_str(), "count" | "sum" | "max" | "approx_distinct");
            let fine = match op {
                Operator::Gt | Operator::GtEq => increasing,
                Operator::Lt | Operator::LtEq => function == "min",
                _ => false,
            };
            if fine { Ok(()) } else { refuse(predicate) }
        }
        other if !uses_aggregate(other) => Ok(()),
        other => refuse(other),
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

/// Rewrites `agg(x) FILTER (WHERE c) OVER (...)` as `agg(CASE WHEN c THEN x END) OVER (...)`,
/// named as written: the same value for every aggregate a sliding window keeps (each ignores
/// NULLs; `count(*) FILTER (WHERE c)` counts the rows where `c` holds, as
/// `count(CASE WHEN c THEN 1 END)` does), in a form both the incremental windows and
/// DataFusion's batch evaluation take.
pub fn window_filters_as_case(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up(|node| {
        let rewritten = node.map_expressions(|expr| {
            expr.transform_up(|e| match e {
                Expr::WindowFunction(mut w) if w.params.filter.is_some() => {
                    let name = Expr::WindowFunction(w.clone()).schema_name().to_string();
                    let condition = *w.params.filter.take().expect("a filter");
                    w.params.args = w
                        .params
                        .args
                        .into_iter()
                        .map(|arg| when(condition.clone(), arg).end())
                        .collect::<Result<_>>()?;
                    Ok(Transformed::new(
                        Expr::WindowFunction(w).alias(name),
                        true,
                        TreeNodeRecursion::Jump,
                    ))
                }
                other => Ok(Transformed::no(other)),
            })
        })?;
        if rewritten.transformed {
            Ok(Transformed::yes(rewritten.data.recompute_schema()?))
        } else {
            Ok(rewritten)
        }
    })
    .map(|t| t.data)
}

/// Threads the hidden row-id column through every projection of a plan, so that each result
/// row says which event produced it. A grouped window's aggregate carries the newest row of the
/// group (`max`): the event that made the group fire.
pub fn propagate_row_id(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up(|node| match node {
        LogicalPlan::Aggregate(a)
            if a.input.schema().has_column_with_unqualified_name(ROW_ID)
                && !a.schema.has_column_with_unqualified_name(ROW_ID) =>
        {
            let (qualifier, _) = a.input.schema().qualified_field_with_unqualified_name(ROW_ID)?;
            let mut aggr = a.aggr_expr.clone();
            aggr.push(max(Expr::Column(Column::new(qualifier.cloned(), ROW_ID))).alias(ROW_ID));
            Ok(Transformed::yes(LogicalPlan::Aggregate(Aggregate::try_new(
                a.input,
                a.group_expr,
                aggr,
            )?)))
        }
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

/// When a windowed detector's rows are decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timing {
    /// As soon as the answer is certain: a grouped window when its HAVING first holds; a
    /// sliding-window row once every row of its second has arrived and its condition holds
    /// (conditions that only become true as rows enter the frame), else at the watermark.
    AtOnce,
    /// When the watermark passes the row (the allowed lateness after it), for the reason given:
    /// the condition could stop holding as more rows enter the frame.
    AfterLateness(String),
    /// When the watermark passes the row's time plus this: its frame looks ahead (`INTERVAL
    /// '...' FOLLOWING`), so only then has every row of it arrived. An absence ("no B within
    /// 30 minutes after A") is decided then.
    LooksAhead(Duration),
}

impl Timing {
    /// How long after a row's event time the watermark must be for the row to be decided for
    /// good, beyond the allowed lateness (zero unless its frame looks ahead).
    pub fn following(&self) -> Duration {
        match self {
            Self::LooksAhead(d) => *d,
            _ => Duration::ZERO,
        }
    }
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AtOnce => f.write_str("decides at once"),
            Self::AfterLateness(why) => write!(f, "decides after the allowed lateness: {why}"),
            Self::LooksAhead(d) => write!(
                f,
                "decides {} plus the allowed lateness after each event: its frame looks ahead",
                humantime::format_duration(*d)
            ),
        }
    }
}

/// How a window column's value moves as rows enter its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Growth {
    /// Never falls: count, count DISTINCT, max, sum of non-negative values.
    Rises,
    /// Never rises: min.
    Falls,
    /// Either way (avg, sum of any sign, anything computed from a window value).
    Either,
}

/// When a sliding-window detector (its optimised logical plan) can decide its rows: at once
/// when every condition above its window only becomes true as rows enter the frame (the same
/// rule as a grouped window's HAVING), so that a row that fires on the rows arrived so far also
/// fires over the whole input.
pub fn sliding_timing(plan: &LogicalPlan) -> Timing {
    let mut following = Duration::ZERO;
    let _ = plan.apply(|node| {
        if let LogicalPlan::Window(w) = node {
            for expr in &w.window_expr {
                if let Ok(spec) = sliding_window(unalias(expr)) {
                    following = following.max(spec.following);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if !following.is_zero() {
        return Timing::LooksAhead(following);
    }
    match window_columns(plan) {
        Ok(_) => Timing::AtOnce,
        Err(why) => Timing::AfterLateness(why),
    }
}

/// The window values among `plan`'s output columns (by name), with how each moves; `Err` when a
/// condition on them could stop holding.
fn window_columns(plan: &LogicalPlan) -> Result<std::collections::HashMap<String, Growth>, String> {
    use std::collections::HashMap;
    match plan {
        LogicalPlan::Window(w) => {
            if w.input
                .exists(|n| Ok(matches!(n, LogicalPlan::Window(_))))
                .unwrap_or(true)
            {
                return Err("a window over another window's values".into());
            }
            let offset = w.input.schema().fields().len();
            let mut out = HashMap::new();
            for (i, expr) in w.window_expr.iter().enumerate() {
                let spec = sliding_window(unalias(expr))?;
                let argument = match unalias(expr) {
                    Expr::WindowFunction(f) => f.params.args.first(),
                    _ => None,
                };
                let growth = match (spec.function.as_str(), spec.distinct) {
                    ("count", _) | ("max", false) => Growth::Rises,
                    ("min", false) => Growth::Falls,
                    ("sum", false) if argument.is_some_and(|a| non_negative(a, w.input.schema())) => {
                        Growth::Rises
                    }
                    _ => Growth::Either,
                };
                out.insert(w.schema.field(offset + i).name().clone(), growth);
            }
            Ok(out)
        }
        LogicalPlan::Projection(p) => {
            let below = window_columns(&p.input)?;
            Ok(p.expr
                .iter()
                .zip(p.schema.fields())
                .filter_map(|(e, field)| Some((field.name().clone(), column_growth(e, &below)?)))
                .collect())
        }
        LogicalPlan::Filter(f) => {
            let below = window_columns(&f.input)?;
            only_becomes_true(&f.predicate, &below)?;
            Ok(below)
        }
        LogicalPlan::SubqueryAlias(a) => window_columns(&a.input),
        LogicalPlan::Sort(s) if s.fetch.is_none() => window_columns(&s.input),
        LogicalPlan::Join(j) => {
            let mut columns = window_columns(&j.left)?;
            columns.extend(window_columns(&j.right)?);
            let conditions = j.on.iter().flat_map(|(l, r)| [l, r]).chain(j.filter.as_ref());
            for c in conditions {
                if column_growth(c, &columns).is_some() {
                    return Err(format!("the join condition `{c}` uses a window value"));
                }
            }
            Ok(columns)
        }
        other => {
            let above_window = other
                .exists(|n| Ok(matches!(n, LogicalPlan::Window(_))))
                .unwrap_or(true);
            if above_window {
                Err(format!("{} above the window", other.display()))
            } else {
                Ok(HashMap::new())
            }
        }
    }
}

/// How `expr` moves with the window values in `columns`: `None` if it uses none of them.
fn column_growth(expr: &Expr, columns: &std::collections::HashMap<String, Growth>) -> Option<Growth> {
    let mut e = unalias(expr);
    while let Expr::Cast(c) = e {
        e = unalias(&c.expr);
    }
    if let Expr::Column(c) = e
        && let Some(g) = columns.get(&c.name)
    {
        return Some(*g);
    }
    expr.exists(|n| Ok(matches!(n, Expr::Column(c) if columns.contains_key(&c.name))))
        .unwrap_or(true)
        .then_some(Growth::Either)
}

/// Whether `predicate`, once true for a row, stays true as more rows enter its frames: window
/// values that rise compared `>`/`>=` with something else, values that fall `<`/`<=`, either
/// `IS NOT NULL` (the time of the last A before this B: `max(CASE ... THEN event_time END)`),
/// joined by AND and OR, and conditions on the row's own columns.
fn only_becomes_true(
    predicate: &Expr,
    columns: &std::collections::HashMap<String, Growth>,
) -> Result<(), String> {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    let refuse = |e: &Expr| Err(format!("`{e}` could stop holding as more rows enter the frame"));
    match unalias(predicate) {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And | Operator::Or,
            right,
        }) => {
            only_becomes_true(left, columns)?;
            only_becomes_true(right, columns)
        }
        e @ Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (growth, op) = match (column_growth(left, columns), column_growth(right, columns)) {
                (None, None) => return Ok(()),
                (Some(g), None) => (g, *op),
                (None, Some(g)) => match op.swap() {
                    Some(swapped) => (g, swapped),
                    None => return refuse(e),
                },
                (Some(_), Some(_)) => return refuse(e),
            };
            match (growth, op) {
                (Growth::Rises, Operator::Gt | Operator::GtEq)
                | (Growth::Falls, Operator::Lt | Operator::LtEq) => Ok(()),
                _ => refuse(e),
            }
        }
        // An aggregate that rises or falls (count, max, min, a sum of non-negative values) is
        // NULL only while no value has entered its frame: once not NULL, it stays so.
        Expr::IsNotNull(inner)
            if matches!(column_growth(inner, columns), Some(Growth::Rises | Growth::Falls)) =>
        {
            Ok(())
        }
        other if column_growth(other, columns).is_none() => Ok(()),
        other => refuse(other),
    }
}

/// Whether `expr` is never negative, from its type or its form (non-negative literals, CASE of
/// non-negative branches, lengths, abs, sums and products of such).
fn non_negative(expr: &Expr, schema: &datafusion::common::DFSchema) -> bool {
    use datafusion::logical_expr::{BinaryExpr, ExprSchemable, Operator};
    if expr.get_type(schema).is_ok_and(|t| t.is_unsigned_integer()) {
        return true;
    }
    match unalias(expr) {
        Expr::Literal(v, _) => {
            v.is_null()
                || ScalarValue::new_zero(&v.data_type())
                    .ok()
                    .and_then(|zero| v.partial_cmp(&zero))
                    .is_some_and(|o| o.is_ge())
        }
        Expr::Cast(c) => non_negative(&c.expr, schema),
        Expr::TryCast(c) => non_negative(&c.expr, schema),
        Expr::Case(case) => {
            case.when_then_expr
                .iter()
                .all(|(_, then)| non_negative(then, schema))
                && case.else_expr.as_ref().is_none_or(|e| non_negative(e, schema))
        }
        Expr::ScalarFunction(f) => matches!(
            f.name(),
            "abs" | "length" | "char_length" | "character_length" | "octet_length" | "bit_length"
        ),
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Plus | Operator::Multiply,
            right,
        }) => non_negative(left, schema) && non_negative(right, schema),
        _ => false,
    }
}
