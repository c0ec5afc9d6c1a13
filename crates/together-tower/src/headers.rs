//! Reading the server's rate-limit and retry hints from response headers.
//!
//! These parsers read what comes off the network, so they are strict about syntax, never panic,
//! and never return a delay longer than [`MAX_HINT`]: a hint that does not parse is `None`, a
//! hint in the past is zero, and an absurdly long one is clamped. Callers clamp further to their
//! own configured maximum.
//!
//! Names and formats follow what Together documents (`x-ratelimit-*`, `x-tokenlimit-*`), plus
//! `Retry-After` (seconds or an HTTP-date) and `retry-after-ms`, which other providers send.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};

/// The longest delay any parser here returns: one day.
pub const MAX_HINT: Duration = Duration::from_secs(24 * 60 * 60);

/// `retry-after-ms`: milliseconds to wait, as OpenAI sends it.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `x-ratelimit-limit`: requests allowed per period.
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `x-ratelimit-remaining`: requests left in the current period.
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `x-ratelimit-remaining-dynamic`: requests left under Together's dynamic limit.
pub const X_RATELIMIT_REMAINING_DYNAMIC: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-dynamic");
/// `x-ratelimit-reset`: seconds until the limit resets (Together: "the suggested retry interval").
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
/// `x-ratelimit-limit-dynamic`: requests allowed per second under Together's dynamic limit.
pub const X_RATELIMIT_LIMIT_DYNAMIC: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-dynamic");
/// `x-tokenlimit-limit`: tokens allowed per period.
pub const X_TOKENLIMIT_LIMIT: HeaderName = HeaderName::from_static("x-tokenlimit-limit");
/// `x-tokenlimit-limit-dynamic`: tokens allowed per second under Together's dynamic limit.
pub const X_TOKENLIMIT_LIMIT_DYNAMIC: HeaderName =
    HeaderName::from_static("x-tokenlimit-limit-dynamic");
/// `x-tokenlimit-remaining-dynamic`: tokens left under Together's dynamic limit.
pub const X_TOKENLIMIT_REMAINING_DYNAMIC: HeaderName =
    HeaderName::from_static("x-tokenlimit-remaining-dynamic");
/// `x-tokenlimit-remaining`: tokens left in the current period.
pub const X_TOKENLIMIT_REMAINING: HeaderName = HeaderName::from_static("x-tokenlimit-remaining");

/// A `x-ratelimit-reset` above this many seconds is read as a Unix timestamp, not an interval:
/// no interval is 30 years long, and some servers send the reset time itself.
const UNIX_TIMESTAMP_THRESHOLD: f64 = 1.0e9;

/// How long the server's answer says to wait before trying again, from every hint it carries.
/// The retry layer and the limiter both decide by this one function.
///
/// The most precise hint wins: `retry-after-ms`, then `x-ratelimit-reset` when `Retry-After`
/// merely rounds it up to whole seconds (`Retry-After: 1` with `x-ratelimit-reset: 0.005` means
/// 5 ms), then `Retry-After`, then `x-ratelimit-reset` alone.
pub fn retry_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = retry_after_ms(headers) {
        return Some(ms);
    }
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|value| parse_retry_after(value.as_bytes(), now));
    let reset = ratelimit_reset(headers, now);
    match (retry_after, reset) {
        // Retry-After counts whole seconds (or names a whole second): a reset within the
        // second below it is the same hint, told precisely. (A reset printed as 0.000 with
        // Retry-After 1 is a wait of under a millisecond, rounded both ways.)
        (Some(retry_after), Some(reset))
            if reset <= retry_after && retry_after - reset <= Duration::from_secs(1) =>
        {
            Some(reset)
        }
        (Some(retry_after), _) => Some(retry_after),
        (None, reset) => reset,
    }
}

/// The server's hint if it is precise: `retry-after-ms`, or a hint told to a fraction of a
/// second (`x-ratelimit-reset: 0.35`, `Retry-After: 0.2`). A whole-second `Retry-After` (or
/// reset) alone is `None`: proxies and gateways send one by rote (nginx: whatever its config
/// says, typically 1) when their own bucket would take the next request a few milliseconds
/// later, so it is an upper bound for the request it answers, not a measurement of the limit.
pub fn precise_retry_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = retry_after_ms(headers) {
        return Some(ms);
    }
    let fractional = |name: &HeaderName| {
        headers
            .get(name)
            .and_then(|value| parse_decimal(value.as_bytes()))
            .is_some_and(|seconds| seconds.fract() != 0.0)
    };
    if fractional(&X_RATELIMIT_RESET) || fractional(&RETRY_AFTER) {
        return retry_hint(headers, now);
    }
    None
}

fn retry_after_ms(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER_MS)
        .and_then(|value| parse_decimal(value.as_bytes()))
        .map(|ms| clamp_seconds(ms / 1_000.0))
}

/// How long the server asks the client to wait: `retry-after-ms` if present and valid, else
/// `Retry-After` (seconds, fractional allowed, or an HTTP-date relative to `now`).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    retry_after_ms(headers).or_else(|| {
        headers
            .get(RETRY_AFTER)
            .and_then(|value| parse_retry_after(value.as_bytes(), now))
    })
}

/// Parses one `Retry-After` value: non-negative seconds (`"2"`, `"1.5"`) or an HTTP-date.
/// A date in the past means no wait.
pub fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
    if let Some(seconds) = parse_decimal(value) {
        return Some(clamp_seconds(seconds));
    }
    let text = std::str::from_utf8(value).ok()?.trim();
    let date = httpdate::parse_http_date(text).ok()?;
    Some(
        date.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_HINT),
    )
}

/// How long until the request limit resets, from `x-ratelimit-reset`.
///
/// Together sends an interval in seconds; a value too large to be an interval is read as a
/// Unix timestamp and measured from `now`.
pub fn ratelimit_reset(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    reset_seconds(
        parse_decimal(headers.get(X_RATELIMIT_RESET)?.as_bytes())?,
        now,
    )
}

/// An `x-ratelimit-reset` value: an interval, or a Unix timestamp measured from `now`.
fn reset_seconds(seconds: f64, now: SystemTime) -> Option<Duration> {
    if seconds < UNIX_TIMESTAMP_THRESHOLD {
        return Some(clamp_seconds(seconds));
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Some(clamp_seconds(seconds - since_epoch.as_secs_f64()))
}

/// Requests left, from `x-ratelimit-remaining` (or its `-dynamic` variant when only that is sent).
pub fn ratelimit_remaining(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(X_RATELIMIT_REMAINING)
        .or_else(|| headers.get(X_RATELIMIT_REMAINING_DYNAMIC))
        .and_then(|value| parse_count(value.as_bytes()))
}

/// The request limit the server states, per second: the lower of `x-ratelimit-limit` and
/// `x-ratelimit-limit-dynamic` (the dynamic limit is the one in force when both are sent).
/// Together documents these per second; this crate reads them so.
pub fn request_limit(headers: &HeaderMap) -> Option<u64> {
    lower(
        count(headers, &X_RATELIMIT_LIMIT),
        count(headers, &X_RATELIMIT_LIMIT_DYNAMIC),
    )
}

/// The token limit the server states, per second: the lower of `x-tokenlimit-limit` and
/// `x-tokenlimit-limit-dynamic`.
pub fn token_limit(headers: &HeaderMap) -> Option<u64> {
    lower(
        count(headers, &X_TOKENLIMIT_LIMIT),
        count(headers, &X_TOKENLIMIT_LIMIT_DYNAMIC),
    )
}

/// Tokens left, from `x-tokenlimit-remaining` (or its `-dynamic` variant).
pub fn token_remaining(headers: &HeaderMap) -> Option<u64> {
    count(headers, &X_TOKENLIMIT_REMAINING)
        .or_else(|| count(headers, &X_TOKENLIMIT_REMAINING_DYNAMIC))
}

fn lower(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A count header such as `x-ratelimit-limit` or `x-tokenlimit-remaining`.
pub fn count(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    parse_count(headers.get(name)?.as_bytes())
}

/// The rate-limit headers of one answer, found in one pass over its headers: cheaper than
/// asking for each by name, since an answer has a dozen headers at most and most have none of
/// these.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RateLimitHeaders<'a> {
    remaining: Option<&'a HeaderValue>,
    remaining_dynamic: Option<&'a HeaderValue>,
    reset: Option<&'a HeaderValue>,
    limit: Option<&'a HeaderValue>,
    limit_dynamic: Option<&'a HeaderValue>,
    token_limit: Option<&'a HeaderValue>,
    token_limit_dynamic: Option<&'a HeaderValue>,
    token_remaining: Option<&'a HeaderValue>,
    token_remaining_dynamic: Option<&'a HeaderValue>,
}

impl<'a> RateLimitHeaders<'a> {
    pub(crate) fn scan(headers: &'a HeaderMap) -> Self {
        let mut found = Self::default();
        if headers.is_empty() {
            return found;
        }
        for (name, value) in headers {
            let name = name.as_str();
            // Every header read here is `x-ratelimit-*` or `x-tokenlimit-*`.
            let Some(rest) = name.strip_prefix("x-") else {
                continue;
            };
            let slot = match rest {
                "ratelimit-remaining" => &mut found.remaining,
                "ratelimit-remaining-dynamic" => &mut found.remaining_dynamic,
                "ratelimit-reset" => &mut found.reset,
                "ratelimit-limit" => &mut found.limit,
                "ratelimit-limit-dynamic" => &mut found.limit_dynamic,
                "tokenlimit-limit" => &mut found.token_limit,
                "tokenlimit-limit-dynamic" => &mut found.token_limit_dynamic,
                "tokenlimit-remaining" => &mut found.token_remaining,
                "tokenlimit-remaining-dynamic" => &mut found.token_remaining_dynamic,
                _ => continue,
            };
            // The first value of a repeated header counts, as `HeaderMap::get` would give it.
            slot.get_or_insert(value);
        }
        found
    }

    /// Whether the answer carries any of them.
    pub(crate) fn any(&self) -> bool {
        [
            self.remaining,
            self.remaining_dynamic,
            self.reset,
            self.limit,
            self.limit_dynamic,
            self.token_limit,
            self.token_limit_dynamic,
            self.token_remaining,
            self.token_remaining_dynamic,
        ]
        .iter()
        .any(Option::is_some)
    }

    fn count(value: Option<&HeaderValue>) -> Option<u64> {
        value.and_then(|value| parse_count(value.as_bytes()))
    }

    /// As [`ratelimit_remaining`].
    pub(crate) fn remaining(&self) -> Option<u64> {
        Self::count(self.remaining.or(self.remaining_dynamic))
    }

    /// As [`ratelimit_reset`].
    pub(crate) fn reset(&self, now: SystemTime) -> Option<Duration> {
        reset_seconds(parse_decimal(self.reset?.as_bytes())?, now)
    }

    /// As [`request_limit`].
    pub(crate) fn request_limit(&self) -> Option<u64> {
        lower(Self::count(self.limit), Self::count(self.limit_dynamic))
    }

    /// As [`token_limit`].
    pub(crate) fn token_limit(&self) -> Option<u64> {
        lower(
            Self::count(self.token_limit),
            Self::count(self.token_limit_dynamic),
        )
    }

    /// As [`token_remaining`].
    pub(crate) fn token_remaining(&self) -> Option<u64> {
        Self::count(self.token_remaining.or(self.token_remaining_dynamic))
    }
}

/// A non-negative count; a fraction is rounded down, an enormous value saturates.
fn parse_count(value: &[u8]) -> Option<u64> {
    // `as` saturates for floats: an enormous count becomes u64::MAX.
    parse_decimal(value).map(|count| count as u64)
}

/// Strict non-negative decimal: digits with at most one dot, surrounding spaces allowed.
/// No sign, no exponent, no `inf` or `NaN`: none of those is a valid header value.
fn parse_decimal(value: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits_only = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) || text.ends_with('.') {
        return None;
    }
    // Digits and one dot always parse; a very long number becomes a large or infinite float.
    text.parse().ok()
}

/// Seconds as a `Duration`, negative values as zero, anything over [`MAX_HINT`] as `MAX_HINT`.
fn clamp_seconds(seconds: f64) -> Duration {
    if seconds.is_nan() || seconds <= 0.0 {
        return Duration::ZERO;
    }
    if seconds >= MAX_HINT.as_secs_f64() {
        return MAX_HINT;
    }
    Duration::from_secs_f64(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert((*name).clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn retry_after_reads_seconds_fractions_and_dates() {
        let at = |value| parse_retry_after(value, now());
        assert_eq!(at(b"2"), Some(Duration::from_secs(2)));
        assert_eq!(at(b" 1.5 "), Some(Duration::from_millis(1_500)));
        assert_eq!(at(b"0"), Some(Duration::ZERO));
        let in_ten = httpdate::fmt_http_date(now() + Duration::from_secs(10));
        assert_eq!(at(in_ten.as_bytes()), Some(Duration::from_secs(10)));
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(10));
        assert_eq!(at(past.as_bytes()), Some(Duration::ZERO));
    }

    #[test]
    fn garbage_is_none_and_absurd_values_are_clamped() {
        let at = |value| parse_retry_after(value, now());
        for garbage in [
            &b""[..],
            b"-1",
            b"+1",
            b"1e3",
            b"inf",
            b"NaN",
            b"1.",
            b".5",
            b"1.2.3",
            b"soon",
            b"\xff",
        ] {
            assert_eq!(at(garbage), None, "{:?}", String::from_utf8_lossy(garbage));
        }
        assert_eq!(at(b"99999999999999999999999"), Some(MAX_HINT));
        let enormous = "9".repeat(400);
        assert_eq!(at(enormous.as_bytes()), Some(MAX_HINT));
        let far = httpdate::fmt_http_date(now() + Duration::from_secs(400 * 24 * 3_600));
        assert_eq!(at(far.as_bytes()), Some(MAX_HINT));
    }

    #[test]
    fn retry_after_ms_comes_first_unless_it_is_invalid() {
        let both = headers(&[(&RETRY_AFTER_MS, "250"), (&RETRY_AFTER, "3")]);
        assert_eq!(retry_after(&both, now()), Some(Duration::from_millis(250)));
        let bad_ms = headers(&[(&RETRY_AFTER_MS, "-5"), (&RETRY_AFTER, "3")]);
        assert_eq!(retry_after(&bad_ms, now()), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&HeaderMap::new(), now()), None);
    }

    #[test]
    fn the_precise_hint_wins() {
        let hint = |pairs: &[(&HeaderName, &str)]| retry_hint(&headers(pairs), now());
        // Retry-After rounds the reset up to a whole second: the reset is meant.
        assert_eq!(
            hint(&[(&RETRY_AFTER, "1"), (&X_RATELIMIT_RESET, "0.005")]),
            Some(Duration::from_millis(5))
        );
        assert_eq!(
            hint(&[(&RETRY_AFTER, "3"), (&X_RATELIMIT_RESET, "2.5")]),
            Some(Duration::from_millis(2_500))
        );
        assert_eq!(
            hint(&[(&RETRY_AFTER, "1"), (&X_RATELIMIT_RESET, "0.000")]),
            Some(Duration::ZERO)
        );
        // A reset that is not the same hint does not override Retry-After.
        assert_eq!(
            hint(&[(&RETRY_AFTER, "3"), (&X_RATELIMIT_RESET, "0.5")]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            hint(&[(&RETRY_AFTER, "1"), (&X_RATELIMIT_RESET, "7")]),
            Some(Duration::from_secs(1))
        );
        // retry-after-ms is precise already.
        assert_eq!(
            hint(&[
                (&RETRY_AFTER_MS, "40"),
                (&RETRY_AFTER, "1"),
                (&X_RATELIMIT_RESET, "0.005")
            ]),
            Some(Duration::from_millis(40))
        );
        assert_eq!(
            hint(&[(&X_RATELIMIT_RESET, "0.25")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(hint(&[]), None);
    }

    #[test]
    fn stated_limits_take_the_lower_of_the_plain_and_dynamic_headers() {
        let both = headers(&[
            (&X_RATELIMIT_LIMIT, "100"),
            (&X_RATELIMIT_LIMIT_DYNAMIC, "40"),
        ]);
        assert_eq!(request_limit(&both), Some(40));
        let dynamic = headers(&[(&X_TOKENLIMIT_LIMIT_DYNAMIC, "3000")]);
        assert_eq!(token_limit(&dynamic), Some(3_000));
        assert_eq!(request_limit(&dynamic), None);
        let remaining = headers(&[(&X_TOKENLIMIT_REMAINING_DYNAMIC, "0")]);
        assert_eq!(token_remaining(&remaining), Some(0));
    }

    #[test]
    fn reset_is_an_interval_or_a_timestamp() {
        let interval = headers(&[(&X_RATELIMIT_RESET, "0.25")]);
        assert_eq!(
            ratelimit_reset(&interval, now()),
            Some(Duration::from_millis(250))
        );
        let stamp = headers(&[(&X_RATELIMIT_RESET, "1700000007")]);
        assert_eq!(ratelimit_reset(&stamp, now()), Some(Duration::from_secs(7)));
        let old_stamp = headers(&[(&X_RATELIMIT_RESET, "1600000000")]);
        assert_eq!(ratelimit_reset(&old_stamp, now()), Some(Duration::ZERO));
        assert_eq!(
            ratelimit_reset(&headers(&[(&X_RATELIMIT_RESET, "later")]), now()),
            None
        );
    }

    #[test]
    fn remaining_prefers_the_plain_header_and_reads_counts() {
        let plain = headers(&[
            (&X_RATELIMIT_REMAINING, "0"),
            (&X_RATELIMIT_REMAINING_DYNAMIC, "5"),
        ]);
        assert_eq!(ratelimit_remaining(&plain), Some(0));
        let dynamic = headers(&[(&X_RATELIMIT_REMAINING_DYNAMIC, "5")]);
        assert_eq!(ratelimit_remaining(&dynamic), Some(5));
        let fraction = headers(&[(&X_TOKENLIMIT_REMAINING, "2999.7")]);
        assert_eq!(count(&fraction, &X_TOKENLIMIT_REMAINING), Some(2_999));
        assert_eq!(
            ratelimit_remaining(&headers(&[(&X_RATELIMIT_REMAINING, "-1")])),
            None
        );
        let huge = headers(&[(&X_RATELIMIT_LIMIT, "123456789012345678901234567890")]);
        assert_eq!(count(&huge, &X_RATELIMIT_LIMIT), Some(u64::MAX));
    }

    #[test]
    fn one_pass_reads_what_the_lookups_by_name_read() {
        let map = headers(&[
            (&X_RATELIMIT_REMAINING_DYNAMIC, "7"),
            (&X_RATELIMIT_RESET, "0.25"),
            (&X_RATELIMIT_LIMIT, "100"),
            (&X_RATELIMIT_LIMIT_DYNAMIC, "40"),
            (&X_TOKENLIMIT_LIMIT, "3000"),
            (&X_TOKENLIMIT_REMAINING, "0"),
        ]);
        let scanned = RateLimitHeaders::scan(&map);
        assert!(scanned.any());
        assert_eq!(scanned.remaining(), ratelimit_remaining(&map));
        assert_eq!(scanned.reset(now()), ratelimit_reset(&map, now()));
        assert_eq!(scanned.request_limit(), request_limit(&map));
        assert_eq!(scanned.token_limit(), token_limit(&map));
        assert_eq!(scanned.token_remaining(), token_remaining(&map));
        assert!(!RateLimitHeaders::scan(&HeaderMap::new()).any());
    }

    proptest! {
        #[test]
        fn retry_after_never_panics_and_never_exceeds_the_cap(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(delay) = parse_retry_after(&bytes, now()) {
                prop_assert!(delay <= MAX_HINT);
            }
        }

        #[test]
        fn numeric_retry_after_is_exact_up_to_the_cap(seconds in 0u64..10_000_000, millis in 0u32..1_000) {
            let text = format!("{seconds}.{millis:03}");
            let delay = parse_retry_after(text.as_bytes(), now()).unwrap();
            let expected = Duration::from_secs(seconds) + Duration::from_millis(millis.into());
            let expected = expected.min(MAX_HINT);
            prop_assert!(delay.abs_diff(expected) < Duration::from_micros(1), "{delay:?} vs {expected:?}");
        }

        #[test]
        fn header_maps_of_any_text_parse_without_panic(
            ms in "\\PC{0,24}", seconds in "\\PC{0,24}", reset in "\\PC{0,24}", remaining in "\\PC{0,24}",
            now_secs in 0u64..4_000_000_000,
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in [(&RETRY_AFTER_MS, &ms), (&RETRY_AFTER, &seconds), (&X_RATELIMIT_RESET, &reset), (&X_RATELIMIT_REMAINING, &remaining)] {
                if let Ok(value) = HeaderValue::from_str(value) {
                    map.insert(name.clone(), value);
                }
            }
            let now = UNIX_EPOCH + Duration::from_secs(now_secs);
            prop_assert!(retry_after(&map, now).is_none_or(|delay| delay <= MAX_HINT));
            prop_assert!(retry_hint(&map, now).is_none_or(|delay| delay <= MAX_HINT));
            prop_assert!(ratelimit_reset(&map, now).is_none_or(|delay| delay <= MAX_HINT));
            let _ = ratelimit_remaining(&map);
        }
    }
}
