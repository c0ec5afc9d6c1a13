//! Runnable examples of together-tower. Each is a file in `examples/`; run one with
//! `cargo run --release -p together-tower-examples --example NAME`.
//!
//! - `rate_limit`: hyper-util's `Client` behind `RateLimitLayer`, against a local server that
//!   enforces Together's per-second limits, beside the same client without the layer.

/// The README's code, compiled as a doc test so that it stays true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
