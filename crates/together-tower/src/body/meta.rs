use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What [`BufferBodyLayer`](super::BufferBodyLayer) read from a JSON request body, as a request
/// extension: the fields later layers decide by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestMeta {
    /// `model`, if the body names one. Shared, as the layers below keep it (a bucket, a
    /// fallback, the model check) and cloning it costs no allocation.
    pub model: Option<Arc<str>>,
    /// The most tokens the answer may hold, if set: `max_tokens` (Together's and OpenAI's
    /// older name) or `max_completion_tokens` (OpenAI's newer one, which async-openai
    /// sends), the larger if both are given, since estimates are settled later and one too
    /// high costs less than one too low.
    pub max_tokens: Option<u64>,
    /// How many inputs `input` holds: the length of an array, or 1 for a single string.
    pub input_count: Option<u64>,
    /// The body's length in bytes, for estimating the prompt's tokens.
    pub body_bytes: u64,
}

impl RequestMeta {
    /// Reads the fields from a JSON object; `None` if the body is not a JSON object, or not one
    /// serde_json can read (it refuses numbers beyond `f64`'s range, such as `1e400`). A field
    /// of the wrong type counts as not given.
    pub fn from_json(body: &[u8]) -> Option<Self> {
        let first = body.iter().find(|byte| !byte.is_ascii_whitespace())?;
        if *first != b'{' {
            return None;
        }
        let fields: Fields = serde_json::from_slice(body).ok()?;
        Some(Self {
            model: fields.model,
            max_tokens: fields.max_tokens.max(fields.max_completion_tokens),
            input_count: fields.input.map(|InputCount(count)| count),
            body_bytes: body.len() as u64,
        })
    }
}

/// The few fields we read; serde skips the rest without building it.
#[derive(Deserialize)]
struct Fields {
    #[serde(default, deserialize_with = "lenient")]
    model: Option<Arc<str>>,
    #[serde(default, deserialize_with = "lenient")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    max_completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    input: Option<InputCount>,
}

/// A field of the wrong type is "not given", not a reason to drop the other fields.
///
/// Read in one pass by a visitor that skips any other type whole: serde's untagged enums
/// would buffer every value first, and that cost more than the rest of the parse.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Lenient,
{
    deserializer.deserialize_any(LenientVisitor(PhantomData))
}

/// A field's type, as read from the JSON types it accepts; every other JSON type is skipped.
trait Lenient: Sized {
    /// What `expecting` says.
    const EXPECTING: &'static str;

    fn from_str(_: &str) -> Option<Self> {
        None
    }

    fn from_u64(_: u64) -> Option<Self> {
        None
    }

    /// An array: skipped unless the type counts its items.
    fn from_seq<'de, A: SeqAccess<'de>>(mut items: A) -> Result<Option<Self>, A::Error> {
        while items.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl Lenient for Arc<str> {
    const EXPECTING: &'static str = "a string";

    fn from_str(text: &str) -> Option<Self> {
        Some(Arc::from(text))
    }
}

impl Lenient for u64 {
    const EXPECTING: &'static str = "a count";

    fn from_u64(count: u64) -> Option<Self> {
        Some(count)
    }
}

/// The number of inputs, counted without keeping them: an array's length, or 1 for a string.
struct InputCount(u64);

impl Lenient for InputCount {
    const EXPECTING: &'static str = "a string or an array of inputs";

    fn from_str(_: &str) -> Option<Self> {
        Some(InputCount(1))
    }

    fn from_seq<'de, A: SeqAccess<'de>>(mut items: A) -> Result<Option<Self>, A::Error> {
        let mut count = 0;
        while items.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(Some(InputCount(count)))
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Lenient> Visitor<'de> for LenientVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_str<E>(self, text: &str) -> Result<Option<T>, E> {
        Ok(T::from_str(text))
    }

    fn visit_u64<E>(self, number: u64) -> Result<Option<T>, E> {
        Ok(T::from_u64(number))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, items: A) -> Result<Option<T>, A::Error> {
        T::from_seq(items)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Option<T>, A::Error> {
        while entries.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_max_tokens_and_counts_inputs() {
        let chat = br#"{"model":"meta-llama/Llama-3","messages":[{"role":"user","content":"hi"}],"max_tokens":64}"#;
        let meta = RequestMeta::from_json(chat).unwrap();
        assert_eq!(meta.model.as_deref(), Some("meta-llama/Llama-3"));
        assert_eq!(meta.max_tokens, Some(64));
        assert_eq!(meta.input_count, None);

        let newer = br#"{"model":"m","max_completion_tokens":300}"#;
        assert_eq!(RequestMeta::from_json(newer).unwrap().max_tokens, Some(300));
        let both = br#"{"max_completion_tokens":30,"max_tokens":200}"#;
        assert_eq!(RequestMeta::from_json(both).unwrap().max_tokens, Some(200));

        let embeddings = br#" {"input":["a","b",{"x":[1,2]}],"model":"m"}"#;
        assert_eq!(
            RequestMeta::from_json(embeddings).unwrap().input_count,
            Some(3)
        );
        let single = br#"{"input":"one text"}"#;
        assert_eq!(RequestMeta::from_json(single).unwrap().input_count, Some(1));
    }

    #[test]
    fn wrong_types_are_not_given_and_non_objects_are_none() {
        let odd = br#"{"model":42,"max_tokens":"many","input":["a"]}"#;
        let meta = RequestMeta::from_json(odd).unwrap();
        assert_eq!(
            (meta.model, meta.max_tokens, meta.input_count),
            (None, None, Some(1))
        );
        let odd_input = br#"{"model":"m","input":{"not":"a list"}}"#;
        let meta = RequestMeta::from_json(odd_input).unwrap();
        assert_eq!((meta.model.as_deref(), meta.input_count), (Some("m"), None));
        let others =
            br#"{"model":["m"],"max_tokens":-5,"max_completion_tokens":64.0,"input":null,"x":1}"#;
        let meta = RequestMeta::from_json(others).unwrap();
        assert_eq!(
            (meta.model, meta.max_tokens, meta.input_count),
            (None, None, None)
        );
        let after_skips =
            br#"{"x":{"a":[1,{"b":2}]},"stream":true,"model":"m\u00e9","max_tokens":7}"#;
        let meta = RequestMeta::from_json(after_skips).unwrap();
        assert_eq!(
            (meta.model.as_deref(), meta.max_tokens),
            (Some("m\u{e9}"), Some(7))
        );
        assert_eq!(RequestMeta::from_json(b"[1,2]"), None);
        assert_eq!(RequestMeta::from_json(b"not json"), None);
        assert_eq!(RequestMeta::from_json(b"{\"model\":"), None);
        assert_eq!(RequestMeta::from_json(b""), None);
        assert_eq!(
            RequestMeta::from_json(b"{}"),
            Some(RequestMeta {
                body_bytes: 2,
                ..RequestMeta::default()
            })
        );
    }
}
