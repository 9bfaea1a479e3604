//! What stands between decisions and enforcement: the [`guard`] (suppression of repeats, the
//! blast-radius fail-safe, operator revocations), the tamper-evident [`audit`] log, and the
//! shadow-against-enforce [`compare`] report.

pub mod audit;
pub mod compare;
pub mod guard;
