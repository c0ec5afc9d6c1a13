//! Which Together endpoint a request is for, and whose key it carries.
//!
//! Every layer of this crate decides by the [`EndpointClass`] of a request (chat, embeddings,
//! fine-tune create, ...) and by the API key it is sent with. [`Classify`] maps a request to
//! its class; [`TogetherClassifier`], the default, knows Together's paths.
//!
//! Where the key is found is the classifier's business too ([`Classify::credential`]); what
//! happens to it is [`crate::key`]'s.
//!
//! # Example
//!
//! ```
//! use http::{Method, Request};
//! use together_tower::classify::{Classify, EndpointClass, TogetherClassifier};
//!
//! let request = Request::builder()
//!     .method(Method::POST)
//!     .uri("https://api.together.xyz/v1/chat/completions")
//!     .body(())
//!     .unwrap();
//! assert_eq!(TogetherClassifier.classify(&request), EndpointClass::Chat);
//! ```

use std::fmt;
use std::str::FromStr;

use http::{HeaderMap, Method, Request};
use tokio::time::Instant;

use crate::key::{self, ApiKeyId, KeyHasher};

/// The kind of Together endpoint a request calls.
///
/// Each variant is one row of Together's endpoint table. Quotas are set per class
/// (see [`crate::quota`]), and the retry layer decides by class whether a call is safe to repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum EndpointClass {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/rerank`.
    Rerank,
    /// `POST /v1/images/generations`.
    Images,
    /// `POST /v1/audio/speech`, `/v1/audio/transcriptions` and `/v1/audio/translations`.
    Audio,
    /// `POST /v1/fine-tunes`: creates a paid job, so it is never blindly repeated.
    FineTuneCreate,
    /// Every other call under `/v1/fine-tunes` (list, get, cancel, events, delete).
    FineTuneOther,
    /// `POST /v1/batches`: creates a paid job, so it is never blindly repeated.
    BatchCreate,
    /// Every other call under `/v1/batches` (list, get, cancel).
    BatchOther,
    /// Calls under `/v1/files`.
    Files,
    /// `GET /v1/models`.
    Models,
    /// Anything else, such as `/v1/endpoints` or `/v1/jobs/{id}`.
    Other,
}

impl EndpointClass {
    /// Every class, in declaration order.
    pub const ALL: [EndpointClass; 13] = [
        EndpointClass::Chat,
        EndpointClass::Completions,
        EndpointClass::Embeddings,
        EndpointClass::Rerank,
        EndpointClass::Images,
        EndpointClass::Audio,
        EndpointClass::FineTuneCreate,
        EndpointClass::FineTuneOther,
        EndpointClass::BatchCreate,
        EndpointClass::BatchOther,
        EndpointClass::Files,
        EndpointClass::Models,
        EndpointClass::Other,
    ];

    /// The class's name as used in quota files and metrics, such as `"chat"` or `"fine-tune-create"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EndpointClass::Chat => "chat",
            EndpointClass::Completions => "completions",
            EndpointClass::Embeddings => "embeddings",
            EndpointClass::Rerank => "rerank",
            EndpointClass::Images => "images",
            EndpointClass::Audio => "audio",
            EndpointClass::FineTuneCreate => "fine-tune-create",
            EndpointClass::FineTuneOther => "fine-tune-other",
            EndpointClass::BatchCreate => "batch-create",
            EndpointClass::BatchOther => "batch-other",
            EndpointClass::Files => "files",
            EndpointClass::Models => "models",
            EndpointClass::Other => "other",
        }
    }

    /// Whether a call of this class creates a paid job (fine-tune create, batch create).
    ///
    /// Such a call may have created the job even when the answer was a 5xx or never came,
    /// so it must not be repeated after one.
    pub const fn creates_job(self) -> bool {
        matches!(
            self,
            EndpointClass::FineTuneCreate | EndpointClass::BatchCreate
        )
    }

    /// A dense index in `0..EndpointClass::ALL.len()`, for tables indexed by class.
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for EndpointClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned when a name is not one of [`EndpointClass::as_str`]'s names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownClass {
    name: String,
}

impl UnknownClass {
    /// The name that was not recognised.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for UnknownClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown endpoint class {:?}; expected one of ",
            self.name
        )?;
        for (i, class) in EndpointClass::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(class.as_str())?;
        }
        Ok(())
    }
}

impl std::error::Error for UnknownClass {}

impl FromStr for EndpointClass {
    type Err = UnknownClass;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        EndpointClass::ALL
            .into_iter()
            .find(|class| class.as_str() == name)
            .ok_or_else(|| UnknownClass {
                name: name.to_owned(),
            })
    }
}

/// Maps a request to the [`EndpointClass`] it calls, and finds its API key.
///
/// Implement it when requests reach Together through a gateway with paths of its own, or when
/// the key travels in another header. The default, [`TogetherClassifier`], knows Together's paths
/// and reads `Authorization: Bearer`.
pub trait Classify {
    /// The class of endpoint this request calls.
    fn classify<B>(&self, request: &Request<B>) -> EndpointClass;

    /// The secret that identifies the caller, if any; requests without one share one anonymous
    /// bucket. The bytes are hashed by [`KeyHasher`] at once and never
    /// stored. The default reads `Authorization: Bearer`.
    fn credential<'r, B>(&self, request: &'r Request<B>) -> Option<&'r [u8]> {
        key::bearer_token(request.headers())
    }

    /// Marks every header that carries a credential as sensitive, so that no `Debug` print of
    /// the request (by this crate, tower, hyper or a log line) shows it. Each layer calls this
    /// as a request enters it. The default marks [`key::CREDENTIAL_HEADERS`]; a classifier that
    /// reads its credential from another header marks that one too.
    fn hide_credentials(&self, headers: &mut HeaderMap) {
        key::hide_credentials(headers);
    }
}

/// The class one of this crate's layers found for a request, carried in the request's
/// extensions so that the layers below it neither classify the request again nor hide its
/// credentials again.
///
/// The first layer of this crate that classifies a request (the retry layer, in the whole
/// stack) marks its credentials sensitive, classifies it, and records this; the rate limit
/// layer below uses it as it is. Only this crate's layers make one, so a request that carries
/// one always had its credentials hidden.
///
/// The retry layer also notes here when the request was first sent, from which its
/// `max_elapsed` counts: in one extension rather than two, as each extension costs every
/// request an allocation, and the retry layer's copy of the request another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    class: EndpointClass,
    first_sent: Option<Instant>,
}

impl Classified {
    /// The class recorded.
    pub fn class(&self) -> EndpointClass {
        self.class
    }

    /// The class a layer above recorded, if any.
    pub(crate) fn of<B>(request: &Request<B>) -> Option<EndpointClass> {
        request
            .extensions()
            .get::<Classified>()
            .map(Classified::class)
    }

    /// The request's class: the one recorded above, or else `classifier`'s, once the request's
    /// credentials are hidden. With `record`, a new class is kept for the layers below.
    pub(crate) fn ensure<C: Classify, B>(
        classifier: &C,
        request: &mut Request<B>,
        record: bool,
    ) -> EndpointClass {
        if let Some(class) = Self::of(request) {
            return class;
        }
        classifier.hide_credentials(request.headers_mut());
        let class = classifier.classify(request);
        if record {
            request.extensions_mut().insert(Classified {
                class,
                first_sent: None,
            });
        }
        class
    }

    /// Notes that the request is sent now for the first time, unless a layer above noted it.
    /// Only for a request [`Classified::ensure`] recorded.
    pub(crate) fn note_first_sent<B>(request: &mut Request<B>) {
        if let Some(classified) = request.extensions_mut().get_mut::<Classified>() {
            classified.first_sent.get_or_insert_with(Instant::now);
        }
    }

    /// When the retry layer first sent the request, if it did.
    pub(crate) fn first_sent<B>(request: &Request<B>) -> Option<Instant> {
        request.extensions().get::<Classified>()?.first_sent
    }
}

/// The classifier for Together's own API paths.
///
/// It matches on the method and on the path after its `v1` segment, so a base URL with a
/// prefix of its own (`https://gateway.example/together/v1/...`) classifies the same. A path
/// without a `v1` segment is matched whole. Query strings, trailing slashes and ids in the path
/// are handled; anything unknown is [`EndpointClass::Other`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TogetherClassifier;

impl Classify for TogetherClassifier {
    fn classify<B>(&self, request: &Request<B>) -> EndpointClass {
        classify_path(request.method(), request.uri().path())
    }
}

// A request's fingerprint needs the classifier to find its credential. It is defined here, not
// beside `KeyHasher`, so that the key module, which classifying uses, needs nothing of it.
impl KeyHasher {
    /// The fingerprint of a request's credential, as found by `classifier`.
    pub fn fingerprint_request<C: Classify, B>(
        &self,
        classifier: &C,
        request: &Request<B>,
    ) -> ApiKeyId {
        classifier
            .credential(request)
            .map_or(ApiKeyId::ANONYMOUS, |key| self.fingerprint(key))
    }
}

/// Classifies a method and a path as Together's API would route them.
pub fn classify_path(method: &Method, path: &str) -> EndpointClass {
    let tail = after_version(path).trim_end_matches('/');
    let post = *method == Method::POST;
    // The paths without ids, as clients send them: one string comparison each.
    let exact = match (tail, post) {
        ("chat/completions", true) => Some(EndpointClass::Chat),
        ("completions", true) => Some(EndpointClass::Completions),
        ("embeddings", true) => Some(EndpointClass::Embeddings),
        ("rerank", true) => Some(EndpointClass::Rerank),
        ("images/generations", true) => Some(EndpointClass::Images),
        ("fine-tunes", true) => Some(EndpointClass::FineTuneCreate),
        ("batches", true) => Some(EndpointClass::BatchCreate),
        _ => None,
    };
    exact.unwrap_or_else(|| classify_segments(method, tail))
}

/// Classifies by path segments: paths with ids, and paths with doubled slashes.
fn classify_segments(method: &Method, path: &str) -> EndpointClass {
    // Up to four non-empty segments: no exact pattern is longer than three, so a fourth only
    // says "longer than any exact pattern", and prefix patterns need just the first.
    let mut segments = [""; 4];
    let mut count = 0;
    for segment in path.split('/').filter(|segment| !segment.is_empty()) {
        if count == segments.len() {
            break;
        }
        segments[count] = segment;
        count += 1;
    }
    let post = *method == Method::POST;
    match (&segments[..count], post) {
        (["chat", "completions"], true) => EndpointClass::Chat,
        (["completions"], true) => EndpointClass::Completions,
        (["embeddings"], true) => EndpointClass::Embeddings,
        (["rerank"], true) => EndpointClass::Rerank,
        (["images", "generations"], true) => EndpointClass::Images,
        (["audio", "speech" | "transcriptions" | "translations"], true) => EndpointClass::Audio,
        (["fine-tunes"], true) => EndpointClass::FineTuneCreate,
        (["fine-tunes", ..], _) => EndpointClass::FineTuneOther,
        (["batches"], true) => EndpointClass::BatchCreate,
        (["batches", ..], _) => EndpointClass::BatchOther,
        (["files", ..], _) => EndpointClass::Files,
        (["models", ..], false) if *method == Method::GET => EndpointClass::Models,
        _ => EndpointClass::Other,
    }
}

/// The part of `path` after its first `v1` segment, or all of it when it has none.
fn after_version(path: &str) -> &str {
    // Together's own paths start with `/v1/`; check that first, as a search costs more.
    if let Some(rest) = path.strip_prefix("/v1/") {
        return rest;
    }
    let mut offset = 0;
    for segment in path.split('/') {
        offset += segment.len() + 1;
        if segment == "v1" {
            return path.get(offset..).unwrap_or("");
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(method: Method, path: &str) -> EndpointClass {
        classify_path(&method, path)
    }

    #[test]
    fn every_documented_path_has_its_class() {
        use EndpointClass::*;
        let cases = [
            (Method::POST, "/v1/chat/completions", Chat),
            (Method::POST, "/v1/completions", Completions),
            (Method::POST, "/v1/embeddings", Embeddings),
            (Method::POST, "/v1/rerank", Rerank),
            (Method::POST, "/v1/images/generations", Images),
            (Method::POST, "/v1/audio/speech", Audio),
            (Method::POST, "/v1/audio/transcriptions", Audio),
            (Method::POST, "/v1/audio/translations", Audio),
            (Method::POST, "/v1/fine-tunes", FineTuneCreate),
            (Method::GET, "/v1/fine-tunes", FineTuneOther),
            (Method::GET, "/v1/fine-tunes/ft-123", FineTuneOther),
            (Method::DELETE, "/v1/fine-tunes/ft-123", FineTuneOther),
            (Method::POST, "/v1/fine-tunes/ft-123/cancel", FineTuneOther),
            (Method::GET, "/v1/fine-tunes/ft-123/events", FineTuneOther),
            (
                Method::GET,
                "/v1/fine-tunes/ft-123/events/page/2",
                FineTuneOther,
            ),
            (Method::POST, "/v1/batches", BatchCreate),
            (Method::GET, "/v1/batches", BatchOther),
            (Method::GET, "/v1/batches/b-1", BatchOther),
            (Method::POST, "/v1/batches/b-1/cancel", BatchOther),
            (Method::GET, "/v1/files", Files),
            (Method::POST, "/v1/files", Files),
            (Method::GET, "/v1/files/file-1", Files),
            (Method::DELETE, "/v1/files/file-1", Files),
            (Method::GET, "/v1/files/file-1/content", Files),
            (Method::GET, "/v1/models", Models),
            (Method::GET, "/v1/endpoints", Other),
            (Method::GET, "/v1/jobs/job-1", Other),
        ];
        for (method, path, expected) in cases {
            assert_eq!(class(method.clone(), path), expected, "{method} {path}");
        }
    }

    #[test]
    fn trailing_slashes_prefixes_and_bare_paths_classify_the_same() {
        assert_eq!(
            class(Method::POST, "/v1/chat/completions/"),
            EndpointClass::Chat
        );
        assert_eq!(
            class(Method::POST, "/v1//chat//completions"),
            EndpointClass::Chat
        );
        assert_eq!(
            class(Method::POST, "/together/v1/embeddings"),
            EndpointClass::Embeddings
        );
        assert_eq!(
            class(Method::POST, "/chat/completions"),
            EndpointClass::Chat
        );
        assert_eq!(
            class(Method::POST, "/v1/fine-tunes/"),
            EndpointClass::FineTuneCreate
        );
        assert_eq!(class(Method::GET, "/v1"), EndpointClass::Other);
        assert_eq!(class(Method::GET, "/"), EndpointClass::Other);
        assert_eq!(class(Method::GET, ""), EndpointClass::Other);
    }

    #[test]
    fn query_strings_do_not_change_the_class() {
        let request = Request::post("https://api.together.xyz/v1/embeddings?debug=1&x=/v1/models")
            .body(())
            .unwrap();
        assert_eq!(
            TogetherClassifier.classify(&request),
            EndpointClass::Embeddings
        );
    }

    #[test]
    fn wrong_methods_and_unknown_paths_are_other() {
        assert_eq!(
            class(Method::GET, "/v1/chat/completions"),
            EndpointClass::Other
        );
        assert_eq!(
            class(Method::POST, "/v1/chat/completions/extra"),
            EndpointClass::Other
        );
        assert_eq!(class(Method::POST, "/v1/models"), EndpointClass::Other);
        assert_eq!(
            class(Method::POST, "/v2/chat/completions"),
            EndpointClass::Other
        );
    }

    #[test]
    fn class_names_round_trip_and_unknown_names_list_the_valid_ones() {
        for class in EndpointClass::ALL {
            assert_eq!(class.as_str().parse::<EndpointClass>(), Ok(class));
            assert_eq!(EndpointClass::ALL[class.index()], class);
        }
        let error = "chats".parse::<EndpointClass>().unwrap_err();
        assert_eq!(error.name(), "chats");
        let message = error.to_string();
        assert!(message.contains("\"chats\""), "{message}");
        assert!(message.contains("fine-tune-create"), "{message}");
    }

    #[test]
    fn only_job_creating_classes_create_jobs() {
        let creating: Vec<_> = EndpointClass::ALL
            .into_iter()
            .filter(|c| c.creates_job())
            .collect();
        assert_eq!(
            creating,
            [EndpointClass::FineTuneCreate, EndpointClass::BatchCreate]
        );
    }
}
