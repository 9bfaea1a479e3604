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

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::physical_expr::expressions::LikeExpr;
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
            let costs: Vec<u64> = conjuncts.iter().map(|e| cost(e)).collect();
            if costs.is_sorted() {
                return Ok(Transformed::no(node));
            }
            let mut ordered: Vec<(u64, Arc<dyn PhysicalExpr>)> =
                costs.into_iter().zip(conjuncts.into_iter().cloned()).collect();
            ordered.sort_by_key(|(c, _)| *c);
            let predicate = conjunction(ordered.into_iter().map(|(_, e)| e));
            let rebuilt = FilterExecBuilder::from(filter)
                .with_predicate(predicate)
                .build()?;
            Ok(Transformed::yes(Arc::new(rebuilt) as Arc<dyn ExecutionPlan>))
        })
        .map(|t| t.data)
    }
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

    use rampart_core::{ColumnType, EventSchema};

    use crate::DetectorEngine;

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
