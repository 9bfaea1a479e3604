//! Where an event is decoded: input framing (JSON lines, arrays, CloudTrail files, gzip),
//! the mapping of a record's JSON onto the canonical columns, and the Arrow micro-batches and
//! dead letters that come out.

pub mod batch;
pub mod decode;
pub mod mapping;
