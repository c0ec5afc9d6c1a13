//! A simulated Together AI API: the endpoints, the limits, the failures, on your machine.
//!
//! `together-sim` answers Together's OpenAI-shaped endpoints (chat, completions, embeddings,
//! images, rerank, models, fine-tunes, batches), enforces per-key, per-class (and optionally
//! per-model) limits in requests and tokens with GCRA, fixed windows or sliding windows,
//! injects 503s and latency, and reports what it saw at `GET /sim/stats`. Tests, examples,
//! benchmarks and the CLI of together-tower use it as the independent judge of a client; it
//! never depends on together-tower.
//!
//! ```
//! use together_sim::{Sim, SimConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let sim = Sim::start(SimConfig::default()).await?;
//! println!("Together on {}", sim.url());
//! sim.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Endpoints
//! - `POST /v1/chat/completions`, `/v1/completions`: a short deterministic reply and `usage`;
//!   with `"stream": true`, server-sent events in Together's format, a word a chunk, `usage`
//!   on the finish chunk, then `data: [DONE]`, paced by [`StreamSettings`].
//! - `POST /v1/embeddings`: one deterministic unit vector per input, in order.
//! - `POST /v1/images/generations`, `/v1/rerank`; `GET /v1/models`.
//! - `POST /v1/fine-tunes` and `/v1/batches` create jobs that run for a configured time; one
//!   beyond the concurrent limit is answered 409. `GET` lists them or shows one; `POST
//!   .../{id}/cancel` cancels.
//! - 401 without a bearer key, 400 for a body that is not a JSON object, 404
//!   `model_not_found` for an unknown model, 429 with `Retry-After` over a limit, and the
//!   `x-ratelimit-*` / `x-tokenlimit-*` headers on every answer of a limited class.
//! - With `earned` set, Together's dynamic limits: a key may send about twice its recent
//!   successful rate, between a base and a cap ([`earned`]).
//! - Control: `GET /sim/stats`, `POST /sim/reset`, `GET` and `POST /sim/limits` (change limits
//!   at run time: `{"chat": {"rpm": 300, "tpm": 90000}}`).

pub mod config;
pub mod earned;
pub mod meter;

mod api;
mod server;
mod state;
mod stream;

pub use self::config::{
    Args, Class, ClassLimits, ConfigError, Faults, Hints, JobSettings, LimitChange, SimConfig,
    StreamSettings,
};
pub use self::meter::Algorithm;
pub use self::server::{Sim, SimHandle, parse_stats};
pub use self::state::{Counters, Stats, key_label};

/// The README's code, compiled as a doc test so that it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
