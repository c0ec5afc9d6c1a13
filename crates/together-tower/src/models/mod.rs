//! The model check: a 404 for an unknown model becomes a typed error naming the closest
//! known models.
//!
//! Together answers 404 `model_not_found` to a request naming a model it does not serve, and
//! its guidance is to look at `GET /v1/models`. [`ModelCheck`] does that for the caller: on a
//! 404 that may be about the model, it fetches the list through the same stack (so the call
//! waits its turn and is retried like any other), caches it for a time to live (10 min by
//! default), and if the model is not on it, answers [`ModelNotFound`] with the closest ids.
//! Answers other than 404 pass untouched, and cost no call: the happy path never asks for
//! the list. A 404 for a model that is listed (or when the list cannot be had) reaches the
//! caller unchanged.
//!
//! # When a 404 is checked
//!
//! The 404's body is the caller's and is not read, so the rule is by what the request and the
//! answer's headers say. A 404 is checked when all of these hold:
//! - the request's body named a `model`;
//! - its method and path are one of Together's model endpoints (chat, completions,
//!   embeddings, rerank, images, audio; see [`classify_path`](crate::classify::classify_path)): a 404 to any other path is
//!   about the path;
//! - the answer is JSON (`content-type: application/json`), as Together's errors are: a
//!   proxy's or a web server's page about a missing path is not.
//!
//! The list is then asked of the same server, with the request's own credentials (the headers
//! marked sensitive), so nothing goes anywhere the request did not already go.
//!
//! # What a failing list costs
//!
//! One fetch serves every 404 that comes while it runs. It is bounded by a timeout (5 s by
//! default, [`ModelCheckLayer::fetch_timeout`]); a failure (an error, a status other than 2xx,
//! a body that is not a models list, or the timeout) is remembered for a while (30 s,
//! [`ModelCheckLayer::failure_ttl`]), and every 404 meanwhile is handed back as it came,
//! without another fetch.
//!
//! Suggestions are bounded work: a name longer than [`MAX_NAME_CHARS`] gets none, longer ids
//! are not suggested, and at most the first [`MAX_CANDIDATES`] ids of the list are scored,
//! with an early stop once a candidate cannot beat the three best. In a gateway the end user
//! picks the name; one 404 cost at most 0.37 ms of CPU in the `model_check` bench.
//!
//! [`TogetherLayer`](crate::TogetherLayer) puts it between the body buffer (which reads the
//! request's `model`) and the retry layer.

mod error;
pub(crate) mod future;
mod layer;
mod list;
mod service;
mod suggest;
#[cfg(test)]
mod tests;

pub use self::error::ModelNotFound;
pub use self::future::ResponseFuture;
pub use self::layer::ModelCheckLayer;
pub use self::service::ModelCheck;
pub use self::suggest::{MAX_CANDIDATES, MAX_NAME_CHARS};
