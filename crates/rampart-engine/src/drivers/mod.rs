//! Drivers of the pipeline outside the service: [`replay`] of files (`rampart replay`) and
//! detector test cases ([`testing`], `rampart test`).

pub mod replay;
pub mod testing;
