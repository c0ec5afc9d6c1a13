//! Reading answers about jobs: which calls are answered with jobs, and the ids and states
//! those answers show.

use http::Method;
use serde::Deserialize;

/// What an answer said about one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobSeen {
    pub(crate) id: String,
    pub(crate) ended: bool,
}

/// Whether a job status is final. Fine-tunes say `completed`, `cancelled`, `error`, `failed`;
/// batches the same in capitals, and `EXPIRED`.
fn ended(status: &str) -> bool {
    [
        "completed",
        "cancelled",
        "canceled",
        "error",
        "failed",
        "expired",
        "user_error",
    ]
    .iter()
    .any(|end| status.eq_ignore_ascii_case(end))
}

/// One job in an answer: `{"id": ..., "status": ...}`, or the same inside `"job"` (as batch
/// creates answer).
#[derive(Deserialize)]
struct JobJson {
    id: Option<String>,
    status: Option<String>,
    job: Option<Box<JobJson>>,
}

impl JobJson {
    fn seen(self) -> Option<JobSeen> {
        if let Some(job) = self.job {
            return job.seen();
        }
        Some(JobSeen {
            ended: self.status.as_deref().is_some_and(ended),
            id: self.id?,
        })
    }
}

#[derive(Deserialize)]
struct ListJson {
    data: Vec<JobJson>,
}

/// Whether a request under `/fine-tunes` or `/batches` is answered with jobs: the list
/// (`GET`), one job (`GET .../{id}`), or a cancel (`POST .../{id}/cancel`). Events and
/// deletes are not.
pub(crate) fn reads_jobs(method: &Method, path: &str) -> bool {
    let mut segments = path.split('/').filter(|segment| !segment.is_empty());
    if !segments.any(|segment| segment == "fine-tunes" || segment == "batches") {
        return false;
    }
    let rest: Vec<&str> = segments.take(3).collect();
    match rest.as_slice() {
        [] | [_] => method == Method::GET,
        [_, "cancel"] => method == Method::POST,
        _ => false,
    }
}

/// The id of the job a create answer describes.
pub(crate) fn created_id(body: &[u8]) -> Option<String> {
    let job: JobJson = serde_json::from_slice(body).ok()?;
    job.seen().map(|seen| seen.id)
}

/// The jobs a read answer describes, and whether it was a whole list. Entries without an id
/// or a status (events, say) are skipped.
pub(crate) fn read_jobs(body: &[u8]) -> Option<(Vec<JobSeen>, bool)> {
    if let Ok(list) = serde_json::from_slice::<ListJson>(body) {
        let jobs = list
            .data
            .into_iter()
            .filter(|job| job.status.is_some())
            .filter_map(JobJson::seen)
            .collect();
        return Some((jobs, true));
    }
    let job: JobJson = serde_json::from_slice(body).ok()?;
    job.status.as_ref()?;
    Some((vec![job.seen()?], false))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn job_answers_of_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = created_id(&bytes);
            let _ = read_jobs(&bytes);
        }

        #[test]
        fn any_path_is_judged_without_panic(path in "\\PC{0,64}") {
            let _ = reads_jobs(&Method::GET, &path);
        }
    }

    fn seen(id: &str, ended: bool) -> JobSeen {
        JobSeen {
            id: id.into(),
            ended,
        }
    }

    #[test]
    fn reads_of_jobs_are_told_from_other_calls() {
        assert!(reads_jobs(&Method::GET, "/v1/fine-tunes"));
        assert!(reads_jobs(&Method::GET, "/v1/fine-tunes/ft-1"));
        assert!(reads_jobs(&Method::POST, "/v1/fine-tunes/ft-1/cancel"));
        assert!(reads_jobs(&Method::GET, "/together/v1/batches/b-1/"));
        assert!(!reads_jobs(&Method::POST, "/v1/fine-tunes"));
        assert!(!reads_jobs(&Method::GET, "/v1/fine-tunes/ft-1/events"));
        assert!(!reads_jobs(&Method::DELETE, "/v1/fine-tunes/ft-1"));
        assert!(!reads_jobs(&Method::GET, "/v1/chat/completions"));
    }

    #[test]
    fn answers_are_read_for_their_jobs() {
        assert_eq!(
            created_id(br#"{"id":"ft-1","status":"pending"}"#),
            Some("ft-1".into())
        );
        assert_eq!(
            created_id(br#"{"job":{"id":"batch-1","status":"VALIDATING"},"warning":null}"#),
            Some("batch-1".into())
        );
        assert_eq!(created_id(b"not json"), None);
        assert_eq!(
            read_jobs(br#"{"id":"ft-1","status":"completed"}"#),
            Some((vec![seen("ft-1", true)], false))
        );
        assert_eq!(
            read_jobs(br#"{"id":"b","status":"IN_PROGRESS"}"#),
            Some((vec![seen("b", false)], false))
        );
        let list = br#"{"object":"list","data":[{"id":"a","status":"running"},{"id":"b","status":"CANCELLED"},{"message":"an event"}]}"#;
        assert_eq!(
            read_jobs(list),
            Some((vec![seen("a", false), seen("b", true)], true))
        );
        // An answer without a status says nothing about a job's state.
        assert_eq!(read_jobs(br#"{"id":"ft-1","deleted":true}"#), None);
        for garbage in [&b""[..], b"[1,2]", b"{\"data\":7}", b"\xff\xfe"] {
            assert_eq!(read_jobs(garbage), None);
        }
    }
}
