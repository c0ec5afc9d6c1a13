//! Clients to put the stack on, beside hyper-util's, which is a tower service already.
//!
//! | client | how |
//! |---|---|
//! | hyper-util's `Client` | as it is: `ServiceBuilder::new().layer(TogetherLayer::new(limits)).service(client)`, the client built for `BufferedBody<B>` |
//! | reqwest | [`Reqwest`] (feature `reqwest`) |
//! | async-openai | [`async_openai::http_service`] (feature `async-openai`), on [`Reqwest`] |
//! | a tonic `Channel` | [`Tonic`] (feature `tonic`), with refusals as `Status` codes by [`into_status`](crate::limit::error::into_status) |
//! | anything else | any `Service<http::Request<BufferedBody<B>>>`; if it wants a body type of its own, map the request body below the stack, as [`Tonic`] does |
//!
//! TLS is yours to choose: the `reqwest` and `async-openai` features turn on no TLS feature of
//! reqwest or async-openai. Their default features bring rustls with its crypto provider; built
//! without them (plain HTTP to a gateway on your network), `reqwest::Client::new()` works as
//! it is, with no provider to install. `scripts/user-builds` builds and runs both ways.

#[cfg(feature = "async-openai")]
pub mod async_openai;
#[cfg(feature = "reqwest")]
mod reqwest;
#[cfg(feature = "tonic")]
mod tonic;

#[cfg(feature = "reqwest")]
pub use self::reqwest::Reqwest;
#[cfg(feature = "tonic")]
pub use self::tonic::Tonic;
