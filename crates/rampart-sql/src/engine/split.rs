//! Cutting a windowed detector's optimised plan where its state is ([`WindowSplit`]): the part
//! below the window runs per batch, the key and reach say what to keep, and a single window of
//! aggregates Rampart maintains also gets the plan above it ([`IncrementalPlan`]).

use std::sync::Arc;

use super::*;

impl DetectorEngine {
    /// Cuts `logical` where its state is: at its lowest window node (sliding windows) or at its
    /// aggregate (grouped windows). The inner `Err` says why the query cannot be cut (it is the
    /// user's query, not a failure).
    pub(super) fn split_at_state(
        &self,
        logical: &LogicalPlan,
        shape: &Shape,
    ) -> datafusion::common::Result<std::result::Result<WindowSplit, String>> {
        let (kind, reach) = match state_kind(shape) {
            Ok(found) => found,
            Err(refused) => return Ok(Err(refused)),
        };
        let Cut {
            input,
            keys: key_exprs,
        } = match lowest_stateful(logical, kind)? {
            Ok(found) => found,
            Err(refused) => return Ok(Err(refused)),
        };
        let input_schema = input.schema();
        let position = |name: &str| input_schema.fields().iter().position(|f| f.name() == name);
        let (Some(time_index), Some(row_index)) = (position(EVENT_TIME), position(ROW_ID)) else {
            return Ok(Err(format!(
                "the rows under the window must keep `{EVENT_TIME}` as it is (not renamed or \
                 computed), so that Rampart can tell when a row's window is complete"
            )));
        };
        let (replacement, post_input, post_slot) = slot_scan("window_input", input_schema)?;
        let post = plan_above(logical, &input, Arc::new(replacement))?;
        let state = self.ctx.state();
        let pre = self.runtime.block_on(state.create_physical_plan(&input))?;
        let keys = key_exprs
            .iter()
            .map(|e| state.create_physical_expr(e.clone(), input_schema))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let post = self.runtime.block_on(state.create_physical_plan(&post))?;
        let (strategy, timing) = match kind {
            StateKind::Sliding => (
                self.incremental_plan(logical, &input)?
                    .map_or(Strategy::Rerun, Strategy::Incremental),
                crate::shape::sliding_timing(logical),
            ),
            StateKind::Grouped => (Strategy::Grouped, Timing::AtOnce),
        };
        Ok(Ok(WindowSplit {
            strategy,
            timing,
            pre_schema: pre.schema(),
            pre,
            post,
            post_slot,
            post_input,
            keys,
            reach,
            time_index,
            row_index,
        }))
    }

    /// For a query with one window node whose aggregates Rampart can maintain (count, count
    /// DISTINCT, sum, avg, min, max over integer, float or text arguments, as the types allow):
    /// the plan above the window and the aggregates. `None`: the window part is re-run over
    /// each touched key's rows instead (same answer, more work).
    fn incremental_plan(
        &self,
        logical: &LogicalPlan,
        input: &Arc<LogicalPlan>,
    ) -> datafusion::common::Result<Option<IncrementalPlan>> {
        let mut windows = Vec::new();
        logical.apply(|node| {
            if let LogicalPlan::Window(w) = node {
                windows.push(w.clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let [window] = windows.as_slice() else {
            return Ok(None);
        };
        let state = self.ctx.state();
        let input_schema = input.schema();
        let mut aggregates = Vec::new();
        let offset = input_schema.fields().len();
        for (i, expr) in window.window_expr.iter().enumerate() {
            let Ok(spec) = crate::shape::sliding_window(unalias(expr)) else {
                return Ok(None);
            };
            let Expr::WindowFunction(f) = unalias(expr) else {
                return Ok(None);
            };
            let argument = match f.params.args.as_slice() {
                [] => None,
                [Expr::Literal(v, _)] if spec.function == "count" && !v.is_null() => None,
                [arg] => Some(state.create_physical_expr(arg.clone(), input_schema)?),
                _ => return Ok(None),
            };
            let arg_type = match &argument {
                Some(a) => Some(a.data_type(input_schema.as_arrow())?),
                None => None,
            };
            let numeric = |t: &DataType| t.is_integer() || matches!(t, DataType::Float64 | DataType::Float32);
            let text = |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
            let function = match (spec.function.as_str(), spec.distinct, arg_type.as_ref()) {
                ("count", false, _) => AggregateKind::Count,
                ("count", true, Some(t)) if t.is_integer() || text(t) => AggregateKind::CountDistinct,
                ("sum", false, Some(t)) if numeric(t) => AggregateKind::Sum,
                ("avg", false, Some(t)) if numeric(t) => AggregateKind::Avg,
                ("min", false, Some(t)) if numeric(t) || text(t) => AggregateKind::Min,
                ("max", false, Some(t)) if numeric(t) || text(t) => AggregateKind::Max,
                _ => return Ok(None),
            };
            let output = window.schema.field(offset + i).data_type().clone();
            let supported_output = matches!(
                (function, &output),
                (
                    AggregateKind::Count | AggregateKind::CountDistinct,
                    DataType::Int64
                ) | (AggregateKind::Avg, DataType::Float64)
                    | (
                        AggregateKind::Sum,
                        DataType::Int64 | DataType::UInt64 | DataType::Float64
                    )
                    | (AggregateKind::Min | AggregateKind::Max, _)
            );
            if !supported_output {
                return Ok(None);
            }
            aggregates.push(WindowAggregate {
                function,
                argument,
                length: rampart_core::time::micros(spec.length),
                following: rampart_core::time::micros(spec.following),
                output,
            });
        }
        // The window's output becomes a scan the engine fills; everything above it stays.
        let (replacement, above_input, above_slot) = slot_scan("window_rows", &window.schema)?;
        let above = logical
            .clone()
            .transform_up(|node| match node {
                LogicalPlan::Window(_) => Ok(Transformed::yes(replacement.clone())),
                other => Ok(Transformed::yes(other.recompute_schema()?)),
            })?
            .data;
        let above = self.runtime.block_on(state.create_physical_plan(&above))?;
        let condition = match conditions_down(logical, Vec::new()) {
            Some(found) => window_condition(&state, window, offset, found)?,
            None => None,
        };
        Ok(Some(IncrementalPlan {
            above,
            above_slot,
            above_input,
            aggregates,
            condition,
        }))
    }
}

/// The kind of state a windowed shape keeps and how far back its windows reach; why not, for
/// a shape Rampart cannot keep.
fn state_kind(shape: &Shape) -> std::result::Result<(StateKind, std::time::Duration), String> {
    match shape {
        Shape::SlidingWindow { windows } => {
            let keys: Vec<&Vec<String>> = windows.iter().map(|w| &w.partition_by).collect();
            if keys.windows(2).any(|pair| pair[0] != pair[1]) {
                return Err(format!(
                    "the windows of one detector must be partitioned by the same key (found {}); \
                         write one detector per key",
                    keys.iter()
                        .map(|k| format!("({})", k.join(", ")))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ));
            }
            if windows
                .windows(2)
                .any(|pair| pair[0].following != pair[1].following)
            {
                return Err(
                    "the windows of one detector must look equally far ahead (the same INTERVAL \
                     '...' FOLLOWING, or all CURRENT ROW): its rows are decided once the watermark \
                     passes that far; write one detector per frame end"
                        .into(),
                );
            }
            // Back through each window, and ahead: a key's rows are kept until the rows whose
            // frames look ahead at them are decided.
            let following = windows.first().map(|w| w.following).unwrap_or_default();
            Ok((
                StateKind::Sliding,
                windows.iter().map(|w| w.length).sum::<std::time::Duration>() + following,
            ))
        }
        Shape::GroupedWindow { bucket, .. } => Ok((StateKind::Grouped, *bucket)),
        Shape::PerEvent => Err("a per-event detector keeps no state".into()),
    }
}

/// Where a plan is cut: the input of its lowest stateful node, and that node's keys.
struct Cut {
    /// The plan below the window: its rows are what the state keeps.
    input: Arc<LogicalPlan>,
    /// The window's PARTITION BY, or the GROUP BY.
    keys: Vec<Expr>,
}

/// The lowest stateful node of `logical` (where the rows to keep come out): its input and
/// its keys (the window's PARTITION BY, or the GROUP BY); why not, when there is not exactly one.
fn lowest_stateful(
    logical: &LogicalPlan,
    kind: StateKind,
) -> datafusion::common::Result<std::result::Result<Cut, String>> {
    let mut cuts: Vec<(Arc<LogicalPlan>, Vec<Expr>)> = Vec::new();
    logical.apply(|node| {
        match node {
            LogicalPlan::Window(w) if kind == StateKind::Sliding => {
                let mut nested = false;
                w.input.apply(|n| {
                    nested |= matches!(n, LogicalPlan::Window(_));
                    Ok(if nested {
                        TreeNodeRecursion::Stop
                    } else {
                        TreeNodeRecursion::Continue
                    })
                })?;
                if !nested {
                    let keys = match w.window_expr.first().map(unalias) {
                        Some(Expr::WindowFunction(f)) => f.params.partition_by.clone(),
                        _ => Vec::new(),
                    };
                    cuts.push((Arc::clone(&w.input), keys));
                }
            }
            LogicalPlan::Aggregate(a) if kind == StateKind::Grouped => {
                cuts.push((Arc::clone(&a.input), a.group_expr.clone()));
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let [(input, key_exprs)] = cuts.as_slice() else {
        return Ok(Err(match kind {
            StateKind::Sliding => {
                "windows in several branches of one query (a UNION of windowed \
                                       queries) are not supported; write one detector per window"
            }
            StateKind::Grouped => {
                "a grouped window may have one GROUP BY; write one detector per \
                                       grouping"
            }
        }
        .into()));
    };
    Ok(Ok(Cut {
        input: Arc::clone(input),
        keys: key_exprs.clone(),
    }))
}

/// `logical` with the input of its stateful node replaced by `replacement` (the slot the kept
/// rows are read from): the plan above the window.
fn plan_above(
    logical: &LogicalPlan,
    input: &Arc<LogicalPlan>,
    replacement: Arc<LogicalPlan>,
) -> datafusion::common::Result<LogicalPlan> {
    let is_cut = |child: &Arc<LogicalPlan>| Arc::ptr_eq(child, input) || child.as_ref() == input.as_ref();
    Ok(logical
        .clone()
        .transform_up(|node| match node {
            LogicalPlan::Window(w) if is_cut(&w.input) => Ok(Transformed::yes(LogicalPlan::Window(
                Window::try_new(w.window_expr, Arc::clone(&replacement))?,
            ))),
            LogicalPlan::Aggregate(a) if is_cut(&a.input) => Ok(Transformed::yes(LogicalPlan::Aggregate(
                Aggregate::try_new(Arc::clone(&replacement), a.group_expr, a.aggr_expr)?,
            ))),
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })?
        .data)
}

/// The conditions of the filters between `plan`'s result and its window (with `found`, those
/// above `plan`), each rewritten over the window's output: `None` when anything but
/// projections, filters, aliases and sorts lies on the way (a limit or an aggregate between a
/// filter and the window counts the rows the filter drops; a join may read the window twice).
fn conditions_down(plan: &LogicalPlan, mut found: Vec<Expr>) -> Option<Vec<Expr>> {
    use datafusion::common::DFSchema;
    use datafusion::optimizer::push_down_filter::replace_cols_by_name;
    use std::collections::HashMap;
    // Each of the node's output columns (`schema`, by qualified name) replaced by what it
    // computes from the node's input (`from`, in order), as DataFusion pushes a filter below a
    // projection.
    let rewrite = |found: Vec<Expr>, schema: &DFSchema, from: Vec<Expr>| -> Option<Vec<Expr>> {
        let map: HashMap<String, Expr> = schema.columns().iter().map(Column::flat_name).zip(from).collect();
        found
            .into_iter()
            .map(|e| replace_cols_by_name(e, &map).ok())
            .collect()
    };
    match plan {
        LogicalPlan::Window(_) => Some(found),
        LogicalPlan::Filter(f) => {
            found.push(f.predicate.clone());
            conditions_down(&f.input, found)
        }
        LogicalPlan::Projection(p) => {
            let from = p.expr.iter().map(|e| unalias(e).clone()).collect();
            conditions_down(&p.input, rewrite(found, &p.schema, from)?)
        }
        LogicalPlan::SubqueryAlias(a) => {
            let from = a.input.schema().columns().into_iter().map(Expr::Column).collect();
            conditions_down(&a.input, rewrite(found, &a.schema, from)?)
        }
        LogicalPlan::Sort(s) if s.fetch.is_none() => conditions_down(&s.input, found),
        _ => None,
    }
}

/// The parts (conjuncts) of `found` (conditions over `window`'s output) that read only the
/// window's values, deterministically, as one physical expression over those values.
fn window_condition(
    state: &datafusion::execution::SessionState,
    window: &Window,
    offset: usize,
    found: Vec<Expr>,
) -> datafusion::common::Result<Option<WindowCondition>> {
    use datafusion::common::DFSchema;
    use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
    let values: Vec<(Option<datafusion::common::TableReference>, Arc<Field>)> = window
        .schema
        .iter()
        .skip(offset)
        .map(|(q, f)| (q.cloned(), Arc::clone(f)))
        .collect();
    let columns: std::collections::HashSet<Column> =
        window.schema.columns().into_iter().skip(offset).collect();
    let on_values = |e: &Expr| {
        let refs = e.column_refs();
        !refs.is_empty()
            && refs.iter().all(|c| columns.contains(*c))
            && !e.is_volatile()
            && !e
                .exists(|n| {
                    Ok(matches!(
                        n,
                        Expr::ScalarSubquery(_)
                            | Expr::Exists(_)
                            | Expr::InSubquery(_)
                            | Expr::OuterReferenceColumn(..)
                    ))
                })
                .unwrap_or(true)
    };
    let kept: Vec<Expr> = found
        .into_iter()
        .flat_map(split_conjunction_owned)
        .filter(on_values)
        .collect();
    let Some(condition) = conjunction(kept) else {
        return Ok(None);
    };
    let schema = DFSchema::new_with_metadata(values, Default::default())?;
    // (A condition that does not plan over the values alone is left to the plan above.)
    Ok(state
        .create_physical_expr(condition, &schema)
        .ok()
        .map(|expr| WindowCondition {
            expr,
            input: Arc::clone(schema.inner()),
        }))
}
