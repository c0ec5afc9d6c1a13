//! Everything that reads input from the network or from a user's configuration, fed arbitrary
//! bytes and near-misses of valid input: the header parsers, the quota file parser, the request
//! metadata reader, the classifier and the key reader. Each must answer (a value, `None` or a
//! typed error) without panicking, within its documented bounds.
//!
//! Property tests with a fixed number of cases each (`CASES`), so CI spends a bounded time here;
//! raise `PROPTEST_CASES` to search longer.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request};
use proptest::prelude::*;
use together_tower::body::RequestMeta;
use together_tower::classify::{Classify, EndpointClass, TogetherClassifier, classify_path};
use together_tower::headers::{self, MAX_HINT};
use together_tower::key::{KeyHasher, bearer_token, hide_credentials};
#[cfg(feature = "toml")]
use together_tower::quota::{MAX_GROUPS, QuotaTable};

const CASES: u32 = 2_000;

fn config() -> ProptestConfig {
    common::config(CASES)
}

/// Header values as a server might send them: numbers, near-numbers, dates, garbage.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        "[0-9]{0,25}(\\.[0-9]{0,12})?".prop_map(String::into_bytes),
        "[-+ ]?[0-9eE.,_]{0,20}(s|ms| seconds)?".prop_map(String::into_bytes),
        "(Mon|Tue|Sun), [0-9]{1,2} (Jan|Feb|Dec) [0-9]{1,5} [0-9:]{0,8} GMT"
            .prop_map(String::into_bytes),
    ]
}

const HINT_HEADERS: [&str; 12] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset",
    "x-ratelimit-remaining",
    "x-ratelimit-remaining-dynamic",
    "x-ratelimit-limit",
    "x-ratelimit-limit-dynamic",
    "x-tokenlimit-limit",
    "x-tokenlimit-limit-dynamic",
    "x-tokenlimit-remaining",
    "x-tokenlimit-remaining-dynamic",
    "x-should-retry",
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn header_parsers_answer_anything_within_their_bounds(
        values in proptest::collection::vec((0..HINT_HEADERS.len(), header_value()), 0..16),
        now_secs in 0u64..8_000_000_000,
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in values {
            // Bytes that are not a valid header value never reach a parser.
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                map.append(HeaderName::from_static(HINT_HEADERS[name]), value);
            }
        }
        let now = UNIX_EPOCH + Duration::from_secs(now_secs);
        for delay in [
            headers::retry_hint(&map, now),
            headers::retry_after(&map, now),
            headers::ratelimit_reset(&map, now),
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!(delay <= MAX_HINT);
        }
        let _ = (
            headers::ratelimit_remaining(&map),
            headers::request_limit(&map),
            headers::token_limit(&map),
            headers::token_remaining(&map),
        );
        if let Some(value) = map.get("retry-after") {
            prop_assert!(headers::parse_retry_after(value.as_bytes(), now).is_none_or(|d| d <= MAX_HINT));
        }
    }

    #[test]
    fn any_bytes_of_a_retry_after_parse_or_are_none(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let now = SystemTime::now();
        prop_assert!(headers::parse_retry_after(&bytes, now).is_none_or(|delay| delay <= MAX_HINT));
    }

    #[cfg(feature = "toml")]
    #[test]
    fn quota_files_of_any_text_load_or_say_what_is_wrong(text in "\\PC{0,400}") {
        if let Err(error) = QuotaTable::from_toml(&text) {
            // Errors quote excerpts only.
            prop_assert!(error.to_string().len() < 1_000);
        }
    }

    #[cfg(feature = "toml")]
    #[test]
    fn quota_files_near_valid_ones_load_or_say_what_is_wrong(
        preset in prop::option::of("(free|tier-[0-9]|tier-x|)"),
        groups in proptest::collection::vec(
            (
                "[a-z-]{0,12}",
                prop::option::of("[0-9]{0,12}/(s|min|h|day|)"),
                prop::option::of(any::<i64>()),
                prop::option::of("[0-9]{0,9}/(s|min)"),
                prop::option::of(any::<i32>()),
                prop::option::of(any::<bool>()),
            ),
            0..6,
        ),
        classes in proptest::collection::vec(("[a-z-]{0,18}", "[a-z-]{0,12}"), 0..6),
    ) {
        let mut text = String::new();
        if let Some(preset) = preset {
            text.push_str(&format!("preset = \"{preset}\"\n"));
        }
        for (name, rate, burst, tokens, concurrency, per_model) in &groups {
            text.push_str(&format!("[groups.\"{name}\"]\n"));
            if let Some(rate) = rate { text.push_str(&format!("rate = \"{rate}\"\n")); }
            if let Some(burst) = burst { text.push_str(&format!("burst = {burst}\n")); }
            if let Some(tokens) = tokens { text.push_str(&format!("tokens = \"{tokens}\"\n")); }
            if let Some(calls) = concurrency { text.push_str(&format!("concurrency = {calls}\n")); }
            if let Some(per_model) = per_model { text.push_str(&format!("per_model = {per_model}\n")); }
        }
        text.push_str("[classes]\n");
        for (class, group) in &classes {
            text.push_str(&format!("\"{class}\" = \"{group}\"\n"));
        }
        match QuotaTable::from_toml(&text) {
            Ok(table) => prop_assert!(table.groups().count() <= MAX_GROUPS),
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn request_metadata_is_read_from_any_bytes_or_not_at_all(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Some(meta) = RequestMeta::from_json(&bytes) {
            prop_assert_eq!(meta.body_bytes, bytes.len() as u64);
        }
    }

    #[test]
    fn request_metadata_survives_json_of_any_shape(
        model in prop_oneof![Just(None), "\\PC{0,40}".prop_map(Some)],
        max_tokens in prop_oneof![Just("null".to_owned()), any::<i64>().prop_map(|n| n.to_string()), Just("1e400".to_owned()), Just("\"many\"".to_owned())],
        input in prop_oneof![Just("[]".to_owned()), Just("\"one\"".to_owned()), Just("{\"not\":\"a list\"}".to_owned()), (0usize..50).prop_map(|n| format!("[{}]", vec!["\"x\""; n].join(",")))],
        truncate in 0usize..200,
    ) {
        let model = model.map_or("null".to_owned(), |model| serde_json::to_string(&model).unwrap());
        let body = format!("{{\"model\":{model},\"max_tokens\":{max_tokens},\"input\":{input},\"messages\":[]}}");
        let whole = RequestMeta::from_json(body.as_bytes());
        // serde_json refuses numbers beyond f64's range, even where it skips them: such a body
        // is read as not JSON (no metadata, passed on untouched). Every other is read.
        prop_assert_eq!(whole.is_some(), max_tokens != "1e400");
        // Cut anywhere, it is no longer JSON: read as nothing, never a panic.
        let cut = &body.as_bytes()[..truncate.min(body.len())];
        if cut.len() < body.len() {
            prop_assert_eq!(RequestMeta::from_json(cut), None);
        }
    }

    #[test]
    fn any_method_and_path_has_a_class(
        method in "[A-Z]{1,10}",
        path in prop_oneof![
            "\\PC{0,80}",
            "(/[a-z0-9-]{0,12}){0,8}/?",
            "/v1/(chat|fine-tunes|batches|files|models|audio|images)(/[a-z0-9-]{0,12}){0,4}",
        ],
    ) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let class = classify_path(&method, &path);
        prop_assert!(EndpointClass::ALL.contains(&class));
        // A job is only ever created by a POST.
        if class.creates_job() {
            prop_assert_eq!(method, Method::POST);
        }
    }

    #[test]
    fn any_authorization_value_is_read_hidden_and_fingerprinted(
        value in proptest::collection::vec(any::<u8>(), 0..120),
        extra in proptest::collection::vec((0..HINT_HEADERS.len(), header_value()), 0..4),
    ) {
        let Ok(value) = HeaderValue::from_bytes(&value) else {
            return Ok(());
        };
        let mut request = Request::post("/v1/chat/completions").body(()).unwrap();
        request.headers_mut().insert("authorization", value.clone());
        for (name, extra) in extra {
            if let Ok(extra) = HeaderValue::from_bytes(&extra) {
                request.headers_mut().append(HeaderName::from_static(HINT_HEADERS[name]), extra);
            }
        }
        let token = bearer_token(request.headers()).map(<[u8]>::to_vec);
        if let Some(token) = &token {
            prop_assert!(!token.is_empty());
        }
        let id = KeyHasher::new().fingerprint_request(&TogetherClassifier, &request);
        prop_assert_eq!(token.is_none(), id == together_tower::key::ApiKeyId::ANONYMOUS);
        hide_credentials(request.headers_mut());
        prop_assert!(request.headers()["authorization"].is_sensitive());
        prop_assert_eq!(TogetherClassifier.credential(&request).map(<[u8]>::to_vec), token);
    }
}
