//! Rewriting the `model` of a JSON request body, and nothing else.

/// `json` with the string value of its top-level `"model"` replaced by `model`, every other
/// byte as it was; `None` if `json` is not an object whose `model` is a string.
///
/// A byte-level edit rather than a parse and a new serialisation: the rest of the body (key
/// order, number spelling, whitespace) reaches the server exactly as the caller wrote it.
pub(crate) fn replace_model(json: &[u8], model: &str) -> Option<Vec<u8>> {
    let (start, end) = model_value_span(json)?;
    let value = serde_json::to_vec(model).ok()?;
    let mut out = Vec::with_capacity(json.len() - (end - start) + value.len());
    out.extend_from_slice(&json[..start]);
    out.extend_from_slice(&value);
    out.extend_from_slice(&json[end..]);
    Some(out)
}

/// Where the top-level `"model"` string value lies (quotes included), if it is a string.
fn model_value_span(json: &[u8]) -> Option<(usize, usize)> {
    let mut at = skip_space(json, 0);
    if json.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    loop {
        at = skip_space(json, at);
        match json.get(at)? {
            b'}' => return None,
            b',' => {
                at += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = string_end(json, at)?;
        let is_model = &json[at..key_end] == b"\"model\"";
        at = skip_space(json, key_end);
        if json.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(json, at + 1);
        let value_end = value_end(json, at)?;
        if is_model {
            // The last `model` wins when a key repeats, as serde reads it; none repeats in
            // practice, and a non-string model is not ours to change.
            return (json.get(at) == Some(&b'"')).then_some((at, value_end));
        }
        at = value_end;
    }
}

fn skip_space(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The index just past the string starting at `at` (a `"`).
fn string_end(json: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        match json.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The index just past the value starting at `at`: a string, or anything else up to the
/// next `,` or `}` at its own depth.
fn value_end(json: &[u8], at: usize) -> Option<usize> {
    if json.get(at)? == &b'"' {
        return string_end(json, at);
    }
    let mut depth = 0usize;
    let mut i = at;
    loop {
        match json.get(i)? {
            b'"' => {
                i = string_end(json, i)?;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth == 0 => return Some(i),
            b'}' | b']' => depth -= 1,
            b',' if depth == 0 => return Some(i),
            _ => {}
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn replaced(json: &str, model: &str) -> Option<String> {
        replace_model(json.as_bytes(), model).map(|bytes| String::from_utf8(bytes).unwrap())
    }

    #[test]
    fn only_the_models_value_changes() {
        let body = r#"{ "messages": [{"role": "user", "content": "say \"model\": {x}"}],
            "model" :  "big/X", "max_tokens": 1.50e1, "extra": {"model": "inner"} }"#;
        let expected = body.replace(r#""big/X""#, r#""small/Y""#);
        assert_eq!(replaced(body, "small/Y"), Some(expected));
        assert_eq!(
            replaced(r#"{"model":"a"}"#, "with \"quotes\""),
            Some(r#"{"model":"with \"quotes\""}"#.into())
        );
    }

    #[test]
    fn bodies_without_a_string_model_are_left_alone() {
        for body in [
            "",
            "[]",
            r#"{"models":"x"}"#,
            r#"{"model":7}"#,
            r#"{"inner":{"model":"x"}}"#,
            r#"{"model":"unterminated"#,
            r#"{"model" "x"}"#,
        ] {
            assert_eq!(replaced(body, "y"), None, "{body}");
        }
    }

    proptest! {
        #[test]
        fn the_result_is_the_same_json_with_another_model(
            model in "\\PC{0,20}",
            other in "\\PC{0,20}",
            max_tokens in proptest::option::of(0u64..100_000),
        ) {
            let mut object = serde_json::json!({"model": model, "messages": [{"content": other}]});
            if let Some(max_tokens) = max_tokens {
                object["max_tokens"] = max_tokens.into();
            }
            let body = serde_json::to_vec(&object).unwrap();
            let out = replace_model(&body, "fallback/model").unwrap();
            let mut expected = object.clone();
            expected["model"] = "fallback/model".into();
            prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap(), expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = replace_model(&bytes, "m");
        }
    }
}
