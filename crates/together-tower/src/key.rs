//! API keys: found, fingerprinted, and kept out of every print.
//!
//! A key never travels through this crate in the clear. As a request enters any layer, the
//! headers that carry credentials are marked sensitive ([`hide_credentials`]), so `Debug`
//! prints of the request, by this crate, tower, hyper or a log line, show `Sensitive` instead.
//! [`KeyHasher`] turns the key into an [`ApiKeyId`], a keyed 64-bit hash, and only that
//! reaches buckets, logs, metrics and errors.
//!
//! # Example
//!
//! ```
//! use http::HeaderMap;
//! use together_tower::key::{KeyHasher, bearer_token, hide_credentials};
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("authorization", "Bearer my-secret-key".parse().unwrap());
//! hide_credentials(&mut headers);
//! assert!(!format!("{headers:?}").contains("my-secret-key"));
//!
//! let id = KeyHasher::new().fingerprint(bearer_token(&headers).unwrap());
//! assert!(!id.to_string().contains("my-secret-key"));
//! ```

use std::fmt;

use http::HeaderMap;
#[cfg(test)]
use http::Request;
use http::header::{AUTHORIZATION, COOKIE, HeaderName, PROXY_AUTHORIZATION};
use siphasher::sip::SipHasher13;

/// The headers that carry credentials in the clients this crate sits under: `Authorization`
/// (Together's bearer token), `Proxy-Authorization`, `Cookie`, and the `X-Api-Key` and
/// `Api-Key` headers some gateways use.
pub const CREDENTIAL_HEADERS: [HeaderName; 5] = [
    AUTHORIZATION,
    PROXY_AUTHORIZATION,
    COOKIE,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// Marks each header of [`CREDENTIAL_HEADERS`] sensitive: `Debug` then prints `Sensitive`
/// instead of its value, and HTTP/2 encoders keep it out of their compression tables.
pub fn hide_credentials(headers: &mut HeaderMap) {
    // One pass over a request's few headers costs less than a lookup per name.
    for (name, value) in headers.iter_mut() {
        if !value.is_sensitive() && CREDENTIAL_HEADERS.contains(name) {
            value.set_sensitive(true);
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is a non-empty one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    // A request has a handful of headers: comparing their names costs less than hashing
    // this one to look it up. The first value counts, as `HeaderMap::get` would give it.
    let value = headers
        .iter()
        .find(|(name, _)| **name == AUTHORIZATION)?
        .1
        .as_bytes();
    let scheme = value.get(..7)?;
    if scheme != b"Bearer " && !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// A fingerprint of an API key: a keyed 64-bit hash of it.
///
/// Buckets, log lines, metric labels and Redis keys name a caller by this, never by
/// the key itself. Its `Display` and `Debug` print 16 hex digits. Two keys share a
/// fingerprint (and so a bucket) with odds of about 3 in 100 million among a million keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiKeyId(u64);

impl ApiKeyId {
    /// The id shared by every request that carries no key.
    pub const ANONYMOUS: ApiKeyId = ApiKeyId(0);

    /// The fingerprint as a number.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == ApiKeyId::ANONYMOUS {
            f.write_str("anonymous")
        } else {
            write!(f, "{:016x}", self.0)
        }
    }
}

impl fmt::Debug for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyId({self})")
    }
}

/// Turns API keys into [`ApiKeyId`]s with SipHash-1-3 (64-bit output) under a 128-bit secret.
///
/// Processes that share a quota (through a shared backend) must use the same secret, so that
/// one key maps to one id everywhere. The default secret is a fixed, public constant: the
/// fingerprint is then still one-way (API keys are long random strings), but anyone can
/// recompute it from a key they already hold. Set a secret of your own with
/// [`KeyHasher::with_secret`] to prevent even that.
#[derive(Clone)]
pub struct KeyHasher {
    hasher: SipHasher13,
}

impl KeyHasher {
    const DEFAULT_SECRET: [u8; 16] = *b"together-tower/1";

    /// A hasher with the default, public secret.
    pub fn new() -> Self {
        Self::with_secret(Self::DEFAULT_SECRET)
    }

    /// A hasher with a secret of your own.
    pub fn with_secret(secret: [u8; 16]) -> Self {
        Self {
            hasher: SipHasher13::new_with_key(&secret),
        }
    }

    /// The fingerprint of one key. The empty key is [`ApiKeyId::ANONYMOUS`].
    pub fn fingerprint(&self, key: &[u8]) -> ApiKeyId {
        if key.is_empty() {
            return ApiKeyId::ANONYMOUS;
        }
        // Zero is reserved for the anonymous id; a real key hashing to it moves by one.
        ApiKeyId(self.hasher.hash(key).max(1))
    }
}

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret stays out of Debug output.
        f.debug_struct("KeyHasher").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::TogetherClassifier;

    #[test]
    fn bearer_tokens_are_found_case_insensitively_and_trimmed() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some(&b"abc"[..]));
        headers.insert(AUTHORIZATION, "bearer   abc  ".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some(&b"abc"[..]));
        headers.insert(AUTHORIZATION, "Bearer    ".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
        headers.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
        headers.insert(AUTHORIZATION, "Bear".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }

    #[test]
    fn fingerprints_are_stable_keyed_and_never_show_the_key() {
        let key = b"fake-example-key-for-tests";
        let hasher = KeyHasher::new();
        let id = hasher.fingerprint(key);
        assert_eq!(id, KeyHasher::new().fingerprint(key));
        assert_ne!(id, hasher.fingerprint(b"another key"));
        assert_ne!(id, KeyHasher::with_secret([7; 16]).fingerprint(key));
        assert_ne!(id, ApiKeyId::ANONYMOUS);
        assert_eq!(hasher.fingerprint(b""), ApiKeyId::ANONYMOUS);

        let shown = format!("{id} {id:?} {hasher:?}");
        assert!(!shown.contains("example-key"), "{shown}");
        assert_eq!(id.to_string().len(), 16);
        assert_eq!(ApiKeyId::ANONYMOUS.to_string(), "anonymous");
    }

    #[test]
    fn requests_without_a_key_are_anonymous() {
        let hasher = KeyHasher::new();
        let without = Request::post("/v1/chat/completions").body(()).unwrap();
        assert_eq!(
            hasher.fingerprint_request(&TogetherClassifier, &without),
            ApiKeyId::ANONYMOUS
        );
        let with = Request::post("/v1/chat/completions")
            .header(AUTHORIZATION, "Bearer k")
            .body(())
            .unwrap();
        assert_eq!(
            hasher.fingerprint_request(&TogetherClassifier, &with),
            hasher.fingerprint(b"k")
        );
    }

    #[test]
    fn credential_headers_print_as_sensitive_and_others_do_not() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, "Bearer secret-a".parse().unwrap());
        headers.insert("x-api-key", "secret-b".parse().unwrap());
        headers.append(COOKIE, "session=secret-c".parse().unwrap());
        headers.append(COOKIE, "other=secret-d".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        hide_credentials(&mut headers);
        let printed = format!("{headers:?}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("application/json"), "{printed}");
        // Still sent as they were.
        assert_eq!(headers[AUTHORIZATION], "Bearer secret-a");
    }
}
