//! Window state on disk: the RocksDB store ([`StateStore`], [`Commit`]), the byte layout of
//! the values and keys it holds ([`codec`]), and the changelog that lets a store be rebuilt
//! elsewhere ([`changelog`]). No DataFusion here: what a window keeps is bytes
//! to this crate; what the bytes mean beyond the layout is the engine's.

pub mod changelog;
pub mod codec;
mod store;

pub use store::{Commit, Entries, StateError, StateStore};
