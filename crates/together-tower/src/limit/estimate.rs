//! Token estimates: what a request is charged against a token budget before it is sent.

use crate::body::RequestMeta;
use crate::classify::EndpointClass;

/// How many tokens a request is expected to cost, before it is sent.
///
/// The default is [`DefaultTokenEstimate`]. A closure `Fn(&TokenRequest<'_>) -> u64` is one too.
pub trait EstimateTokens: Send + Sync + 'static {
    /// The tokens (prompt plus completion) to charge before the request is sent; the charge is
    /// corrected from the answer's `usage` afterwards.
    fn estimate(&self, request: &TokenRequest<'_>) -> u64;
}

impl<F> EstimateTokens for F
where
    F: Fn(&TokenRequest<'_>) -> u64 + Send + Sync + 'static,
{
    fn estimate(&self, request: &TokenRequest<'_>) -> u64 {
        self(request)
    }
}

/// What a token estimate is made from.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TokenRequest<'a> {
    /// The endpoint class.
    pub class: EndpointClass,
    /// What the buffer layer read from the body, if it ran.
    pub meta: Option<&'a RequestMeta>,
    /// The body's length: from the metadata, or else its `content-length`.
    pub body_bytes: Option<u64>,
}

/// The default estimate: the body's bytes over four (a token is about four bytes of English,
/// and JSON's punctuation makes this an overestimate), plus `max_tokens` (or
/// `max_completion_tokens`), or 512 for a chat or completion that sets neither.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultTokenEstimate;

impl DefaultTokenEstimate {
    /// Completion tokens assumed for a chat or completion without `max_tokens`.
    pub const COMPLETION_WITHOUT_MAX_TOKENS: u64 = 512;
}

impl EstimateTokens for DefaultTokenEstimate {
    fn estimate(&self, request: &TokenRequest<'_>) -> u64 {
        let prompt = request.body_bytes.unwrap_or(0).div_ceil(4);
        let completion = match request.meta.and_then(|meta| meta.max_tokens) {
            Some(max_tokens) => max_tokens,
            None if matches!(
                request.class,
                EndpointClass::Chat | EndpointClass::Completions
            ) =>
            {
                Self::COMPLETION_WITHOUT_MAX_TOKENS
            }
            None => 0,
        };
        prompt.saturating_add(completion)
    }
}
