//! A physical optimizer rule that evaluates the cheap parts of a filter first.
//!
//! DataFusion evaluates `a AND b` left to right and only evaluates `b` on the rows where `a`
//! held, but it keeps conjuncts in the order the query (and filter pushdown) wrote them. A
//! detector written as `SELECT ... FROM (SELECT json_get_str(raw, ...) AS x ... WHERE action =
//! 'X') WHERE x <> ...` ends up, once physical filter pushdown has merged the two filters, as
//! `x <> ... AND action = 'X'`: the JSON of every event is
//! parsed before the cheap test that rejects almost all of them. Reordering conjuncts by a
//! rough cost keeps detectors fast however an analyst orders their conditions. (SQL gives no
//! guarantee on the evaluation order of `AND`, so the answer is unchanged.)
//!
//! DataFusion only narrows `b` to the rows where `a` held when `a` has no nulls; a conjunct that
//! can be null (`json_get_str(raw, ...) = 'x'` is null wherever the field is absent) made every
//! conjunct after it run on the whole batch: a suite of 200 generated CloudTrail rules spent
//! most of its time parsing the JSON of events whose action no rule asked for. A filter keeps a
//! row only where its predicate is true, so null and false are the same to it: every conjunct
//! but the last that can be null is read as `c IS NOT DISTINCT FROM true` (true stays true,
//! false and null become false), which is never null.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, LikeExpr, lit};
use datafusion::physical_expr::utils::{conjunction, split_conjunction};
use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};

/// Orders the conjuncts of every `FilterExec` from cheap to expensive (stable for equal
/// costs). It runs after DataFusion's own rules, once filter pushdown has merged the filters
/// of nested queries.
#[derive(Debug, Default)]
pub struct CheapPredicatesFirst;

impl PhysicalOptimizerRule for CheapPredicatesFirst {
    fn name(&self) -> &str {
        "rampart_cheap_predicates_first"
    }

    fn schema_check(&self) -> bool {
        true
    }

    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(filter) = node.downcast_ref::<FilterExec>() else {
                return Ok(Transformed::no(node));
            };
            let conjuncts = split_conjunction(filter.predicate());
            let mut ordered: Vec<(u64, Arc<dyn PhysicalExpr>)> =
                conjuncts.iter().map(|e| (cost(e), Arc::clone(e))).collect();
            ordered.sort_by_key(|(c, _)| *c);
            let schema = filter.input().schema();
            let last = ordered.len().saturating_sub(1);
            let ordered: Vec<Arc<dyn PhysicalExpr>> = ordered
                .into_iter()
                .enumerate()
                .map(|(i, (_, e))| {
                    if i < last && !is_true_test(&e) && e.nullable(&schema)? {
                        return Ok(
                            Arc::new(BinaryExpr::new(e, Operator::IsNotDistinctFrom, lit(true)))
                                as Arc<dyn PhysicalExpr>,
                        );
                    }
                    Ok(e)
                })
                .collect::<Result<_>>()?;
            let unchanged = ordered
                .iter()
                .zip(&conjuncts)
                .all(|(new, old)| Arc::ptr_eq(new, old));
            if unchanged {
                return Ok(Transformed::no(node));
            }
            let predicate = conjunction(ordered);
            let rebuilt = FilterExecBuilder::from(filter)
                .with_predicate(predicate)
                .build()?;
            Ok(Transformed::yes(Arc::new(rebuilt) as Arc<dyn ExecutionPlan>))
        })
        .map(|t| t.data)
    }
}

/// Whether `expr` is an `IS NOT DISTINCT FROM` (never null whatever its operands; this rule's
/// own form is `c IS NOT DISTINCT FROM true`).
fn is_true_test(expr: &Arc<dyn PhysicalExpr>) -> bool {
    expr.downcast_ref::<BinaryExpr>()
        .is_some_and(|b| *b.op() == Operator::IsNotDistinctFrom)
}

/// A rough cost: parsing JSON and regular expressions dominate, other functions come next,
/// comparisons of columns and literals are nearly free.
fn cost(expr: &Arc<dyn PhysicalExpr>) -> u64 {
    let mut total = 1;
    let _ = expr.apply(|e| {
        if let Some(f) = e.downcast_ref::<ScalarFunctionExpr>() {
            let name = f.name();
            total += if name.starts_with("json_") || name.starts_with("regexp_") {
                100
            } else {
                10
            };
        } else if e.downcast_ref::<LikeExpr>().is_some() {
            total += 5;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    total
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use datafusion::arrow::array::{RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array};
    use rampart_core::{ColumnType, EventSchema};

    use crate::DetectorEngine;

    #[test]
    fn conjuncts_that_can_be_null_do_not_make_the_next_ones_read_every_row() {
        let schema = EventSchema::new(vec![]);
        let engine = DetectorEngine::new(&schema, 64 << 20).expect("engine");
        let sql = "-- id: t\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}}\n\
            SELECT actor FROM events WHERE action = 'Share' \
              AND json_get_str(raw, 'kind') = 'launch' AND json_get_str(raw, 'with') = 'all'";
        let detector = engine.compile(Path::new("t.sql"), sql).expect("compiles");
        let plan = detector.explain();
        let filter = plan.lines().find(|l| l.contains("FilterExec")).expect("a filter");
        assert!(
            filter.contains("(json_get_str(raw@2, kind) = launch) IS NOT DISTINCT FROM true AND"),
            "the JSON test that can be null is read as never null: {plan}"
        );
        assert!(
            !filter.contains("all IS NOT DISTINCT FROM"),
            "the last one is left as it is: {plan}"
        );
        // Twenty rows, a few of them `Share`: the field absent, null, another value, both set.
        let mut rows = vec![("Get", "{}"); 20];
        rows[3] = ("Share", r#"{"with": "all"}"#);
        rows[7] = ("Share", r#"{"kind": null, "with": "all"}"#);
        rows[11] = ("Share", r#"{"kind": "launch", "with": "some"}"#);
        rows[15] = ("Share", r#"{"kind": "launch", "with": "all"}"#);
        rows[19] = ("Share", r#"{"kind": "launch"}"#);
        let n = rows.len();
        let none = || Arc::new(StringArray::from(vec![None::<&str>; n])) as _;
        let batch = RecordBatch::try_new(
            Arc::clone(schema.arrow()),
            vec![
                Arc::new(TimestampMicrosecondArray::from(vec![0; n]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["alice"; n])),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                none(),
                none(),
                none(),
                none(),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(UInt64Array::from_iter_values(0..n as u64)),
            ],
        )
        .expect("batch");
        let result = engine
            .run(&[&detector], batch)
            .into_iter()
            .next()
            .expect("one result");
        let kept: Vec<u64> = result
            .0
            .expect("runs")
            .iter()
            .flat_map(|b| {
                let ids = b
                    .column(detector.row_id_index)
                    .as_any()
                    .downcast_ref::<UInt64Array>();
                ids.expect("row ids").values().to_vec()
            })
            .collect();
        assert_eq!(kept, vec![15]);
    }

    #[test]
    fn json_and_function_predicates_run_after_cheap_ones() {
        let engine = DetectorEngine::new(
            &EventSchema::new(vec![("event_source".into(), ColumnType::String)]),
            64 << 20,
        )
        .expect("engine");
        let sql = "-- id: t\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}}\n\
            SELECT actor, target FROM (\n\
              SELECT actor, json_get_str(raw, 'requestParameters', 'userName') AS target\n\
              FROM events WHERE event_source = 'iam.amazonaws.com' AND action = 'CreateAccessKey')\n\
            WHERE target IS NOT NULL AND target <> reverse(actor)";
        let detector = engine.compile(Path::new("t.sql"), sql).expect("compiles");
        let plan = detector.explain();
        let filter = plan.lines().find(|l| l.contains("FilterExec")).expect("a filter");
        let cheap = filter.find("event_source").expect("event_source test");
        let json = filter.find("json_get_str").expect("json test");
        assert!(cheap < json, "{plan}");
    }
}
