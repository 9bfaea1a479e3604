//! The `events` table: a table provider whose scan reads whatever micro-batch is in the slot
//! at execution time. This is what lets a detector's physical plan be built once at load and
//! executed again for every batch.

use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};

/// The events currently being evaluated (a micro-batch, or for a windowed detector the
/// retained window plus the micro-batch), shared by every detector plan of a pipeline.
#[derive(Debug, Clone, Default)]
pub struct BatchSlot(Arc<Mutex<Vec<RecordBatch>>>);

impl BatchSlot {
    /// Puts `batch` in the slot for the next executions.
    pub fn set(&self, batch: RecordBatch) {
        self.set_many(vec![batch]);
    }

    /// Puts several batches in the slot: the table is their union.
    pub fn set_many(&self, batches: Vec<RecordBatch>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = batches;
    }

    /// Empties the slot.
    pub fn clear(&self) {
        self.set_many(Vec::new());
    }

    fn get(&self) -> Vec<RecordBatch> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Table provider for `events`.
#[derive(Debug)]
pub struct EventsTable {
    schema: SchemaRef,
    slot: BatchSlot,
}

impl EventsTable {
    /// A table of `schema` reading from `slot`.
    pub fn new(schema: SchemaRef, slot: BatchSlot) -> Self {
        Self { schema, slot }
    }
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let projected = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        Ok(Arc::new(SlotExec::new(
            projected,
            projection.cloned(),
            self.slot.clone(),
        )))
    }
}

/// Leaf execution node that yields the slot's batch (projected), once per execution.
#[derive(Debug)]
pub struct SlotExec {
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    slot: BatchSlot,
    properties: Arc<PlanProperties>,
}

impl SlotExec {
    fn new(schema: SchemaRef, projection: Option<Vec<usize>>, slot: BatchSlot) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            schema,
            projection,
            slot,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for SlotExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "SlotExec: events")
    }
}

impl ExecutionPlan for SlotExec {
    fn name(&self) -> &'static str {
        "SlotExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(&self, _partition: usize, _context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let batches = self
            .slot
            .get()
            .into_iter()
            .map(|batch| match &self.projection {
                Some(p) => batch.project(p),
                None => Ok(batch),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::pin(MemoryStream::try_new(
            batches,
            Arc::clone(&self.schema),
            None,
        )?))
    }
}
