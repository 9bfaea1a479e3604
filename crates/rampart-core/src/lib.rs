//! Rampart's shared vocabulary: canonical event columns, source positions, decisions and their
//! ids, time formatting. No IO lives here.

pub mod clock;
pub mod decision;
pub mod event;
pub mod position;
pub mod problem;
pub mod time;

pub use clock::{EventClock, Idleness};
pub use decision::{Decision, DecisionId, DetectorRef, Mode, Severity, Verdict};
pub use event::{ColumnType, EventSchema};
pub use position::{SourcePosition, kafka_source, parse_kafka_source};
pub use problem::Problem;
