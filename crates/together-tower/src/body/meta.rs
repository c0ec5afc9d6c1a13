use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};

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
            model: fields.model.map(Arc::from),
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
    model: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    max_completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    input: Option<InputCount>,
}

/// A field of the wrong type is "not given", not a reason to drop the other fields.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Maybe<T> {
        Value(T),
        Other(IgnoredAny),
    }
    Ok(match Maybe::<T>::deserialize(deserializer)? {
        Maybe::Value(value) => Some(value),
        Maybe::Other(_) => None,
    })
}

/// The number of inputs, counted without keeping them.
struct InputCount(u64);

impl<'de> Deserialize<'de> for InputCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Count;

        impl<'de> Visitor<'de> for Count {
            type Value = InputCount;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of inputs")
            }

            fn visit_str<E>(self, _: &str) -> Result<InputCount, E> {
                Ok(InputCount(1))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<InputCount, A::Error> {
                let mut count = 0;
                while items.next_element::<IgnoredAny>()?.is_some() {
                    count += 1;
                }
                Ok(InputCount(count))
            }
        }

        deserializer.deserialize_any(Count)
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
