//! `together-tower embed`: embeds a file, one text per line, into JSON lines, and resumes.
//!
//! The inputs go in requests of `--batch` inputs (split, sent and put back in input order by
//! [`together_tower::embeddings`]). Output lines are `{"index":N,"embedding":[...]}`, in input
//! order, written whole and flushed a batch at a time. Run again on the same output and it checks what is there (every
//! complete line must be the next index; a torn last line from a crash is cut off), then
//! embeds only the rest: nothing is embedded twice, nothing is lost.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use together_sim::{Algorithm, Class};
use together_tower::embeddings::{ChunkError, InOrder, chunks, embed_chunk, request_body};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc};

use crate::CliError;
use crate::client::{Endpoint, Mode, Stack, StackSettings, stack};
use crate::observe::Observations;
use crate::target::{ApiKey, SimLimits, Target, TargetArgs, json_request};

/// Flags of `together-tower embed`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbedArgs {
    /// Where to send, and with which key.
    #[command(flatten)]
    pub target: TargetArgs,
    /// The texts, one a line.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Where to write `{"index":N,"embedding":[...]}` lines; an existing file is resumed.
    #[arg(long, value_name = "FILE.jsonl")]
    pub output: PathBuf,
    /// The embedding model.
    #[arg(long, default_value = "BAAI/bge-large-en-v1.5", value_name = "NAME")]
    pub model: String,
    /// Inputs per request (Together's guidance: 20).
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=2048))]
    pub batch: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4, value_name = "C", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    /// The client's quota for embeddings, requests a minute (Together's default: 300).
    #[arg(long, default_value_t = 300, value_name = "R")]
    pub rpm: u32,
    /// Retries per request at most.
    #[arg(long, default_value_t = 4, value_name = "K")]
    pub max_retries: u32,
}

/// What an embed run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedReport {
    /// Inputs in the file.
    pub inputs: usize,
    /// Inputs the output already held.
    pub resumed_from: usize,
    /// Inputs embedded by this run.
    pub embedded: usize,
}

/// Embeds what the output does not hold yet.
pub async fn run(args: &EmbedArgs) -> Result<EmbedReport, CliError> {
    let text = tokio::fs::read_to_string(&args.input)
        .await
        .map_err(|error| CliError::Io(format!("cannot read {}: {error}", args.input.display())))?;
    let inputs: Vec<String> = text.lines().map(str::to_owned).collect();
    let done = verify_output(&args.output, inputs.len()).await?;
    say_where_it_starts(&args.output, done, inputs.len());
    if done == inputs.len() {
        return Ok(EmbedReport {
            inputs: inputs.len(),
            resumed_from: done,
            embedded: 0,
        });
    }

    let limits = SimLimits::new(Class::Embeddings, args.rpm, Algorithm::Gcra);
    let target = Target::resolve(args.target.base_url.as_deref(), limits).await?;
    let observations = Observations::new();
    let settings = StackSettings {
        mode: Mode::Adaptive,
        endpoint: Endpoint::Embeddings,
        rpm: args.rpm,
        burst: 1,
        tpm: None,
        max_retries: args.max_retries,
        tenant_weights: Vec::new(),
    };
    let (service, _limits) = stack(&settings, &observations, args.target.redis().await?)?;
    let key = args.target.key_or("together-tower-embed");
    let url = format!("{}{}", target.base_url, Endpoint::Embeddings.path());
    let output = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .await
        .map_err(|error| CliError::Io(format!("cannot open {}: {error}", args.output.display())))?;

    let progress = crate::bench::progress_bar((inputs.len() - done) as u64);
    let inputs = Arc::new(inputs);
    let (results, finished) = mpsc::channel::<Batch>(64);
    let batches = Batches {
        service,
        url,
        key,
        model: args.model.clone(),
        inputs: Arc::clone(&inputs),
        from: done,
        batch: args.batch as usize,
    };
    let launcher = tokio::spawn(batches.launch(args.concurrency as usize, results));
    let mut writer = Writer {
        output,
        path: &args.output,
        in_order: InOrder::starting_at(done),
        written: done,
        progress: &progress,
    };
    let outcome = writer.write_all(finished, inputs.len()).await;
    let written = writer.written;
    launcher.abort();
    progress.finish_and_clear();
    if let Some(sim) = target.sim {
        sim.shutdown().await;
    }
    outcome?;
    Ok(EmbedReport {
        inputs: inputs.len(),
        resumed_from: done,
        embedded: written - done,
    })
}

/// Says whether the output already holds every embedding, or the run resumes after `done`.
fn say_where_it_starts(output: &Path, done: usize, total: usize) {
    if done == total {
        eprintln!("{} already holds all {total} embeddings", output.display());
    } else if done > 0 {
        eprintln!(
            "resuming: {} holds inputs 0 to {}",
            output.display(),
            done - 1
        );
    }
}

/// One batch's inputs and what became of them.
type Batch = (Range<usize>, Result<Vec<Vec<f32>>, ChunkError>);

/// The batches to send: the inputs from `from` on, `batch` at a time.
struct Batches {
    service: Stack,
    url: String,
    key: ApiKey,
    model: String,
    inputs: Arc<Vec<String>>,
    from: usize,
    batch: usize,
}

impl Batches {
    /// Sends the batches, at most `concurrency` at once, each result to `results`.
    async fn launch(self, concurrency: usize, results: mpsc::Sender<Batch>) {
        let slots = Arc::new(Semaphore::new(concurrency));
        let done = self.from;
        for range in chunks(self.inputs.len() - done, self.batch) {
            let range = range.start + done..range.end + done;
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            let body = request_body(&self.model, &self.inputs[range.clone()]);
            let request = json_request(&self.url, &self.key, body);
            let (service, results) = (self.service.clone(), results.clone());
            tokio::spawn(async move {
                let embedded = embed_chunk(service, request, range.len()).await;
                let _ = results.send((range, embedded)).await;
                drop(slot);
            });
        }
    }
}

/// Writes batches to the output in input order, as they finish in any order.
struct Writer<'a> {
    output: tokio::fs::File,
    path: &'a Path,
    in_order: InOrder<Vec<f32>>,
    /// Inputs `0..written` are in the output.
    written: usize,
    progress: &'a indicatif::ProgressBar,
}

impl Writer<'_> {
    /// Writes each batch once every batch before it is written, until all `total` are, a
    /// batch fails, or the user interrupts.
    async fn write_all(
        &mut self,
        mut finished: mpsc::Receiver<Batch>,
        total: usize,
    ) -> Result<(), CliError> {
        while self.written < total {
            let received = tokio::select! {
                received = finished.recv() => received,
                _ = tokio::signal::ctrl_c() => return Err(CliError::Failed(format!(
                    "interrupted: {} holds inputs 0 to {}; run again to resume",
                    self.path.display(),
                    self.written.saturating_sub(1)
                ))),
            };
            let Some((range, embedded)) = received else {
                break;
            };
            let vectors = embedded.map_err(|error| {
                CliError::Failed(format!(
                    "the batch of inputs {} to {} failed ({error}); {} holds inputs before {}; run again to resume",
                    range.start,
                    range.end - 1,
                    self.path.display(),
                    self.written
                ))
            })?;
            let ready = self.in_order.push(range.start, vectors);
            self.write(&ready).await?;
        }
        Ok(())
    }

    /// Appends `ready` lines and syncs them, so an interrupted run resumes after them.
    async fn write(&mut self, ready: &[(usize, Vec<f32>)]) -> Result<(), CliError> {
        if ready.is_empty() {
            return Ok(());
        }
        let lines: String = ready
            .iter()
            .map(|(index, vector)| output_line(*index, vector))
            .collect();
        let failed = |error| CliError::Io(format!("cannot write {}: {error}", self.path.display()));
        self.output
            .write_all(lines.as_bytes())
            .await
            .map_err(failed)?;
        self.output.sync_data().await.map_err(failed)?;
        self.progress.inc(ready.len() as u64);
        self.written = self.in_order.next();
        Ok(())
    }
}

/// Checks an existing output and cuts off a torn last line of our own; returns how many
/// inputs it holds. A file that is not provably this command's output is never changed.
async fn verify_output(path: &Path, inputs: usize) -> Result<usize, CliError> {
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => {
            return Err(CliError::Io(format!(
                "cannot read {}: {error}",
                path.display()
            )));
        }
    };
    let existing = ExistingOutput::check(&bytes, inputs)
        .map_err(|problem| CliError::Io(format!("{}: {problem}", path.display())))?;
    if existing.keep < bytes.len() {
        eprintln!(
            "{}: cutting off a torn last line ({} bytes)",
            path.display(),
            bytes.len() - existing.keep
        );
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .map_err(|error| CliError::Io(format!("cannot repair {}: {error}", path.display())))?;
        file.set_len(existing.keep as u64)
            .await
            .map_err(|error| CliError::Io(format!("cannot repair {}: {error}", path.display())))?;
    }
    Ok(existing.lines)
}

/// One output line, as this command writes it.
fn output_line(index: usize, embedding: &[f32]) -> String {
    let embedding = serde_json::to_string(embedding).unwrap_or_else(|_| "[]".into());
    format!("{{\"index\":{index},\"embedding\":{embedding}}}\n")
}

/// What an existing output file holds, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExistingOutput {
    /// Complete lines: the inputs already embedded.
    lines: usize,
    /// How many bytes to keep: all of them, or all but a torn last line of our own.
    keep: usize,
}

impl ExistingOutput {
    /// Accepts a file only if every complete line is the next `{"index":n,"embedding":[...]}`
    /// and what follows the last newline (if anything) is provably the start of our own next
    /// line. Anything else is someone else's file, and the answer says why.
    fn check(bytes: &[u8], inputs: usize) -> Result<Self, String> {
        let complete = bytes
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(0, |end| end + 1);
        let mut lines = 0;
        for line in bytes[..complete].split(|&byte| byte == b'\n') {
            if line.is_empty() {
                continue;
            }
            let parsed: Option<serde_json::Value> = serde_json::from_slice(line).ok();
            let valid = parsed.as_ref().is_some_and(|value| {
                value["index"].as_u64() == Some(lines as u64) && value["embedding"].is_array()
            });
            if !valid {
                return Err(format!(
                    "is not this input's embed output: line {} is not {{\"index\":{lines},\"embedding\":[...]}}; use another --output",
                    lines + 1
                ));
            }
            lines += 1;
        }
        if lines > inputs {
            return Err(format!(
                "holds {lines} embeddings but the input has only {inputs} lines; use another --output"
            ));
        }
        let tail = &bytes[complete..];
        if !tail.is_empty() && !is_torn_line(tail, lines, lines > 0) {
            return Err(format!(
                "is not this input's embed output: it ends in {} bytes that are not the start of line {}; use another --output",
                tail.len(),
                lines + 1
            ));
        }
        Ok(Self {
            lines,
            keep: complete,
        })
    }
}

/// Whether `tail` is the start of the line for `index` as a crash mid-write leaves it.
///
/// With complete lines of ours before it, any prefix of our line will do. Alone in the file,
/// the tail must carry the whole `{"index":0,"embedding":[` to prove it is ours: a short
/// fragment such as `{` could be anybody's. Lines written by earlier versions, with the keys
/// in the other order, are recognised too.
fn is_torn_line(tail: &[u8], index: usize, after_our_lines: bool) -> bool {
    let heads = [
        (
            format!("{{\"index\":{index},\"embedding\":["),
            "]}".to_owned(),
        ),
        (
            "{\"embedding\":[".to_owned(),
            format!("],\"index\":{index}}}"),
        ),
    ];
    heads.iter().any(|(head, end)| {
        let head = head.as_bytes();
        if tail.len() <= head.len() {
            return after_our_lines && head.starts_with(tail);
        }
        let Some(rest) = tail.strip_prefix(head) else {
            return false;
        };
        // Then numbers, then perhaps the start of the line's end.
        let numbers = rest
            .iter()
            .position(|byte| !matches!(byte, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' | b','))
            .unwrap_or(rest.len());
        end.as_bytes().starts_with(&rest[numbers..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(lines: usize) -> Vec<u8> {
        (0..lines)
            .flat_map(|index| output_line(index, &[0.25, -1e-3]).into_bytes())
            .collect()
    }

    #[test]
    fn files_that_are_not_ours_are_refused_whatever_they_end_with() {
        let foreign: [&[u8]; 6] = [
            b"precious",
            b"{\"listen\": \"127.0.0.1:8080\", \"seed\": 1}",
            b"\x00\x01\x02\xff\xfe binary",
            b"{",
            b"{\"index\":0,\"embedding\":[1,2]}\nprecious",
            b"{\"index\":0,\"embedding\":[1,2]}\n{\"index\":1,\"embedding\":[1]}x",
        ];
        for (i, bytes) in foreign.into_iter().enumerate() {
            let error = ExistingOutput::check(bytes, 10).unwrap_err();
            assert!(
                error.contains("not this input's embed output"),
                "{i}: {error}"
            );
        }
    }

    #[test]
    fn a_torn_line_of_our_own_is_cut_and_complete_lines_kept() {
        let whole = ours(3);
        let next = output_line(3, &[0.5, 0.75]);
        for cut in 1..next.len() - 1 {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(&next.as_bytes()[..cut]);
            assert_eq!(
                ExistingOutput::check(&bytes, 10),
                Ok(ExistingOutput {
                    lines: 3,
                    keep: whole.len()
                }),
                "cut after {cut} bytes"
            );
        }
        // The old key order, as earlier versions wrote it.
        let mut old = whole.clone();
        old.extend_from_slice(b"{\"embedding\":[0.5,0.7");
        assert_eq!(ExistingOutput::check(&old, 10).unwrap().keep, whole.len());
        old.extend_from_slice(b"5],\"index\":3");
        assert_eq!(ExistingOutput::check(&old, 10).unwrap().keep, whole.len());
        // A torn line of the wrong index is not ours.
        let mut wrong = whole.clone();
        wrong.extend_from_slice(b"{\"index\":9,\"embedding\":[0.5");
        assert!(ExistingOutput::check(&wrong, 10).is_err());
        // Alone in the file, a tail is ours only when it carries our whole head.
        assert_eq!(
            ExistingOutput::check(b"{\"index\":0,\"embedding\":[0.1,", 10),
            Ok(ExistingOutput { lines: 0, keep: 0 })
        );
        assert!(ExistingOutput::check(b"{\"index\":0,\"embed", 10).is_err());
    }

    #[test]
    fn complete_outputs_count_their_lines() {
        assert_eq!(
            ExistingOutput::check(&ours(4), 4),
            Ok(ExistingOutput {
                lines: 4,
                keep: ours(4).len()
            })
        );
        assert_eq!(
            ExistingOutput::check(b"", 4),
            Ok(ExistingOutput { lines: 0, keep: 0 })
        );
        assert!(
            ExistingOutput::check(&ours(5), 4)
                .unwrap_err()
                .contains("only 4")
        );
    }
}
