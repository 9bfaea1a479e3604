//! The engine's run-time error, classified by who has to act on it ([`Fault`]): the user whose
//! detector or events it is, the operator of a system outside Rampart, or Rampart's developers.
//!
//! Errors that stop a pipeline from loading are [`crate::LoadError`] (with file and line);
//! this one is for what fails while events are evaluated: a detector on a batch (it keeps
//! running on later batches), the window state on disk.

use datafusion::arrow::error::ArrowError;
use datafusion::common::DataFusionError;
use rampart_state::StateError;

/// Who has to act on an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// The user's input: a detector's SQL failed on these events (a cast, a division by zero,
    /// an overflow, a function's argument, more memory than `[detectors] memory_mb`), or a
    /// value they gave.
    Input,
    /// A system outside Rampart: the disk or RocksDB under the window state, a file.
    Outside,
    /// Rampart itself: one of its own invariants broke. It is a bug to report.
    Bug,
}

impl Fault {
    /// The label used in logs and metrics: `input`, `outside` or `bug`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Outside => "outside",
            Self::Bug => "bug",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error while evaluating events, with its [`Fault`]. Cheap to clone: detectors that share
/// a window state all get the state's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The user's input is wrong (see [`Fault::Input`]).
    #[error("{0}")]
    Input(String),
    /// A system outside Rampart failed (see [`Fault::Outside`]).
    #[error("{0}")]
    Outside(String),
    /// Rampart broke one of its own invariants (see [`Fault::Bug`]).
    #[error("internal error (a bug in Rampart, please report it): {0}")]
    Bug(String),
}

/// Result alias of the engine's evaluation code.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Who has to act on it.
    pub fn fault(&self) -> Fault {
        match self {
            Self::Input(_) => Fault::Input,
            Self::Outside(_) => Fault::Outside,
            Self::Bug(_) => Fault::Bug,
        }
    }

    /// A broken invariant of Rampart's own.
    pub fn bug(what: impl Into<String>) -> Self {
        Self::Bug(what.into())
    }

    fn with_fault(fault: Fault, message: String) -> Self {
        match fault {
            Fault::Input => Self::Input(message),
            Fault::Outside => Self::Outside(message),
            Fault::Bug => Self::Bug(message),
        }
    }
}

/// Whose an Arrow error is: the values' (the detector's SQL on these events), the machine's,
/// or Rampart's (arrays of the wrong shape or type, which its own code builds).
fn arrow_fault(error: &ArrowError) -> Fault {
    match error {
        ArrowError::CastError(_)
        | ArrowError::ParseError(_)
        | ArrowError::ComputeError(_)
        | ArrowError::DivideByZero
        | ArrowError::ArithmeticOverflow(_)
        | ArrowError::CsvError(_)
        | ArrowError::JsonError(_) => Fault::Input,
        ArrowError::MemoryError(_) | ArrowError::IoError(..) | ArrowError::ExternalError(_) => Fault::Outside,
        ArrowError::DictionaryKeyOverflowError
        | ArrowError::RunEndIndexOverflowError
        | ArrowError::OffsetOverflowError(_) => Fault::Outside,
        _ => Fault::Bug,
    }
}

/// Whose a DataFusion error met while running an accepted plan is. Planning errors at run
/// time are Rampart's: the plan was checked when the detector loaded.
fn datafusion_fault(error: &DataFusionError) -> Fault {
    // DataFusion reports a pattern that does not compile (one read from the events or a
    // table: literal ones are refused at load) as an internal error, by its text only.
    if error.to_string().contains("Regular expression did not compile") {
        return Fault::Input;
    }
    match error.find_root() {
        DataFusionError::ArrowError(arrow, _) => arrow_fault(arrow),
        // (A run's memory is the detector's own pool: exhausting it is the detector's doing.)
        DataFusionError::Execution(_) | DataFusionError::SQL(..) | DataFusionError::ResourcesExhausted(_) => {
            Fault::Input
        }
        DataFusionError::IoError(_)
        | DataFusionError::ObjectStore(_)
        | DataFusionError::ParquetError(_)
        | DataFusionError::ExecutionJoin(_)
        | DataFusionError::External(_) => Fault::Outside,
        _ => Fault::Bug,
    }
}

impl From<ArrowError> for Error {
    fn from(error: ArrowError) -> Self {
        Self::with_fault(arrow_fault(&error), error.to_string())
    }
}

impl From<DataFusionError> for Error {
    fn from(error: DataFusionError) -> Self {
        Self::with_fault(datafusion_fault(&error), error.to_string())
    }
}

impl From<rampart_sql::Error> for Error {
    fn from(error: rampart_sql::Error) -> Self {
        match error {
            rampart_sql::Error::DataFusion(e) => e.into(),
            e @ rampart_sql::Error::Runtime(_) => Self::Outside(e.to_string()),
        }
    }
}

impl From<StateError> for Error {
    /// The store's errors are the disk's or RocksDB's; an unreadable value was written by
    /// another version or damaged on disk, which is the operator's to resolve too.
    fn from(error: StateError) -> Self {
        Self::Outside(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detector_dividing_by_zero_is_the_users_and_a_wrong_array_is_rampart_s() {
        let input: Error = DataFusionError::ArrowError(Box::new(ArrowError::DivideByZero), None).into();
        assert_eq!(input.fault(), Fault::Input);
        let wrapped: Error = DataFusionError::Context(
            "while running detector x".into(),
            Box::new(DataFusionError::ArrowError(
                Box::new(ArrowError::CastError("'abc' is not an Int64".into())),
                None,
            )),
        )
        .into();
        assert_eq!(wrapped.fault(), Fault::Input, "the root decides, not the context");
        let bug: Error =
            ArrowError::InvalidArgumentError("column types must match schema types".into()).into();
        assert_eq!(bug.fault(), Fault::Bug);
        assert!(
            bug.to_string().starts_with("internal error (a bug in Rampart"),
            "{bug}"
        );
        let internal: Error = DataFusionError::Internal("unexpected plan".into()).into();
        assert_eq!(internal.fault(), Fault::Bug);
        let pattern: Error = DataFusionError::Internal(
            "failed to call 'regex_match_dyn' Compute error: Regular expression did not compile: CompiledTooBig(10485760)"
                .into(),
        )
        .into();
        assert_eq!(
            pattern.fault(),
            Fault::Input,
            "a pattern from the data is the user's"
        );
    }

    #[test]
    fn the_disk_is_outside_and_a_detector_over_its_memory_is_its_own() {
        let memory: Error = DataFusionError::ResourcesExhausted("memory pool".into()).into();
        assert_eq!(memory.fault(), Fault::Input);
        let disk: Error = StateError::Temp(std::io::Error::other("disk full")).into();
        assert_eq!(disk.fault(), Fault::Outside);
        assert_eq!(disk.fault().as_str(), "outside");
        let runtime: Error = rampart_sql::Error::Runtime(std::io::Error::other("no threads")).into();
        assert_eq!(runtime.fault(), Fault::Outside);
    }
}
