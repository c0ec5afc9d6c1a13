//! The `together-tower` command end to end: in-process, and as a process against the
//! simulator on loopback.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use together_sim::{Class, ClassLimits, Sim, SimConfig, parse_stats};
use together_tower_cli::bench::{self, BenchArgs};
use together_tower_cli::client::{Endpoint, Mode};
use together_tower_cli::shares::parse_tenants;
use together_tower_cli::target::TargetArgs;

/// One test at a time: the benches measure 429s against a real clock, and the tests that start
/// processes beside them on two cores make a request late enough to bunch with the next.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bench_args(requests: u64, rpm: u32, concurrency: u64, mode: Mode) -> BenchArgs {
    BenchArgs {
        target: TargetArgs::default(),
        endpoint: Endpoint::Chat,
        model: None,
        requests,
        concurrency,
        rpm,
        burst: 1,
        tpm: None,
        max_tokens: 16,
        max_retries: 4,
        mode,
        json: false,
        plot: None,
        sim_algorithm: together_sim::Algorithm::Gcra,
        sim_rpm: None,
        sim_tpm: None,
        sim_hints: together_sim::Hints::All,
        sim_over_limit_status: 429,
        sim_changes: Vec::new(),
        sim_503_share: 0.0,
        sim_earned_base_rpm: None,
        stream: false,
        tenants: None,
        interactive_share: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_the_quota_by_weight_and_interactive_requests_go_first() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let args = BenchArgs {
        tenants: Some(parse_tenants("a:1,b:1,c:2").unwrap()),
        interactive_share: Some(0.1),
        ..bench_args(400, 6_000, 16, Mode::Adaptive)
    };
    let (report, timeline) = bench::run(&args).await.unwrap();
    // This test is about the shares. A request made late by a busy machine can bunch with
    // the next into a 429, which the retry layer absorbs; `limited_bench_uses_the_quota_
    // without_a_429` is the test about 429s, and runs alone.
    assert_eq!(report.failed, 0, "{report:?}");
    // The plot draws each tenant's answers.
    let plotted: usize = timeline
        .tenants
        .iter()
        .map(|(_, answers)| answers.len())
        .sum();
    assert_eq!((timeline.tenants.len(), plotted as u64), (3, report.ok));
    let json = serde_json::to_value(&report).unwrap();
    let shares: Vec<f64> = json["tenants"]
        .as_array()
        .expect("a tenants array")
        .iter()
        .map(|tenant| tenant["share"].as_f64().unwrap())
        .collect();
    // Each tenant offers enough to keep the quota busy; c, weighted 2, gets half.
    for (share, expected) in shares.iter().zip([0.25, 0.25, 0.5]) {
        assert!((share - expected).abs() <= 0.05, "{shares:?}");
    }
    let priorities = json["priorities"].as_array().expect("a priorities array");
    let p50 = |name: &str| {
        priorities
            .iter()
            .find(|priority| priority["name"] == name)
            .and_then(|priority| priority["p50_ms"].as_f64())
            .unwrap()
    };
    assert!(
        p50("interactive") * 5.0 < p50("background"),
        "{priorities:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_503s_are_retried_and_the_rate_changes_are_reported_by_reason() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let args = BenchArgs {
        sim_503_share: 0.1,
        ..bench_args(200, 6_000, 16, Mode::Adaptive)
    };
    let (report, timeline) = bench::run(&args).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.refused_503 > 0, "{report:?}");
    let changes = report
        .rate_changes
        .expect("the adaptive stack reports its changes");
    // A trial can only be undone once it started; the plot marks each change.
    assert!(changes.unavailable_503 >= changes.noise_503, "{changes:?}");
    let marked = |reason: &str| {
        timeline
            .rate_changes
            .iter()
            .filter(|(_, why)| *why == reason)
            .count() as u64
    };
    assert!(marked("503 trial") <= changes.unavailable_503);
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["rate_changes"]["noise_503"].is_u64(), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_bench_reports_first_tokens_and_tokens_a_second() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let args = BenchArgs {
        stream: true,
        ..bench_args(40, 6_000, 8, Mode::Adaptive)
    };
    let (report, _) = bench::run(&args).await.unwrap();
    assert_eq!((report.ok, report.failed), (40, 0), "{report:?}");
    let (p50, p99) = (report.first_token_p50_ms, report.first_token_p99_ms);
    let (p50, p99) = (p50.expect("a p50"), p99.expect("a p99"));
    // The first token comes before the answer ends, and the streams carried tokens.
    assert!(p50 <= p99 && p50 <= report.p50_ms, "{report:?}");
    assert!(
        report.completion_tokens_per_second.unwrap() > 0.0,
        "{report:?}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["first_token_p50_ms"].is_f64(), "{json}");

    let plain = bench::run(&bench_args(5, 6_000, 1, Mode::Adaptive))
        .await
        .unwrap()
        .0;
    assert_eq!(plain.first_token_p50_ms, None);
    let embeddings = BenchArgs {
        stream: true,
        endpoint: Endpoint::Embeddings,
        ..bench_args(5, 6_000, 1, Mode::Adaptive)
    };
    assert!(matches!(
        bench::run(&embeddings).await,
        Err(together_tower_cli::CliError::Usage(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_is_spent_on_what_streams_used_not_on_their_max_tokens() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // 500 tokens a second, each request charged about 250 until its `usage` says 22: a budget
    // that kept the estimates would serve 2 a second, 44 tokens, under a tenth of the limit.
    let args = BenchArgs {
        stream: true,
        tpm: Some(30_000),
        max_tokens: 200,
        ..bench_args(80, 12_000, 16, Mode::Adaptive)
    };
    let (report, _) = bench::run(&args).await.unwrap();
    assert_eq!((report.ok, report.server_429), (80, 0), "{report:?}");
    assert_eq!(report.quota_tpm, Some(30_000));
    assert_eq!(report.server_tokens, Some(80 * 22), "{report:?}");
    let share = report
        .server_token_share
        .expect("the simulator limits tokens");
    assert!(share > 0.5 && share <= 1.0, "{report:?}");
    assert!(bench::table(&report).contains("server tokens"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earned_rate_is_measured_against_an_ideal_client() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let args = BenchArgs {
        sim_earned_base_rpm: Some(1_200),
        ..bench_args(60, 2_400, 8, Mode::Adaptive)
    };
    let (report, _) = bench::run(&args).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    let ideal = report.ideal_s.expect("an earned rate has an ideal client");
    assert!(ideal > 1.0 && ideal < report.elapsed_s * 2.0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_bench_uses_the_quota_without_a_429() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (report, timeline) = bench::run(&bench_args(40, 6_000, 8, Mode::Adaptive))
        .await
        .unwrap();
    assert_eq!(
        (report.ok, report.failed, report.server_429, report.retries),
        (40, 0, 0, 0)
    );
    assert_eq!(timeline.attempts.len(), 40);
    assert!(report.quota_share > 0.9, "{report:?}");
    // The table speaks the flags' words, not Rust's names.
    let table = bench::table(&report);
    assert!(
        table.contains("to chat through the adaptive stack") && table.contains("(gcra)"),
        "{table}"
    );
    assert!(report.p50_ms <= report.p99_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_only_bench_walks_into_429s_and_retries() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (report, _) = bench::run(&bench_args(20, 600, 16, Mode::RetryOnly))
        .await
        .unwrap();
    assert!(report.server_429 > 0, "{report:?}");
    assert!(report.retries > 0, "{report:?}");
    assert_eq!(report.ok + report.failed, 20);
}

fn together_tower(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_together-tower"))
        .args(args)
        .env_remove("TOGETHER_BASE_URL")
        .env_remove("TOGETHER_API_KEY")
        .output()
        .unwrap()
}

#[test]
fn json_is_one_object_on_the_last_line_and_the_plot_is_drawn() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let dir = scratch("json");
    let plot = dir.join("bench.svg");
    let output = together_tower(&[
        "bench",
        "--requests",
        "12",
        "--rpm",
        "6000",
        "--json",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for field in [
        "requests",
        "ok",
        "failed",
        "server_429",
        "retries",
        "elapsed_s",
        "achieved_rpm",
        "quota_rpm",
        "p50_ms",
        "p99_ms",
    ] {
        assert!(last.get(field).is_some(), "no {field} in {last}");
    }
    assert_eq!(
        (
            last["requests"].as_u64(),
            last["ok"].as_u64(),
            last["server_429"].as_u64()
        ),
        (Some(12), Some(12), Some(0))
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("quota (6000/min)"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("started the embedded simulator"));
}

#[test]
fn bad_flags_and_an_unreachable_url_fail_with_one_line() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let bad = together_tower(&["bench", "--requests", "many"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--requests"));
    let zero_burst = together_tower(&["bench", "--burst", "0"]);
    assert_eq!(zero_burst.status.code(), Some(2));
    let too_bursty = together_tower(&["bench", "--rpm", "10", "--burst", "11"]);
    assert_eq!(too_bursty.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&too_bursty.stderr).contains("burst 11"));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = together_tower(&[
        "bench",
        "--base-url",
        &format!("http://{closed}"),
        "--api-key",
        "tgp_v1_secret",
    ]);
    assert_eq!(unreachable.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach") && !stderr.contains("tgp_v1_secret"),
        "{stderr}"
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("together-tower-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_inputs(dir: &Path, count: usize) -> PathBuf {
    let input = dir.join("input.txt");
    let lines: Vec<String> = (0..count)
        .map(|i| format!("text number {i} to embed"))
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    input
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn embed_writes_every_input_in_order() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let dir = scratch("embed");
    let input = write_inputs(&dir, 45);
    let output = dir.join("out.jsonl");
    let args = [
        "embed",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--batch",
        "10",
        "--rpm",
        "60000",
    ];
    let run = together_tower(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let written = lines(&output);
    assert_eq!(written.len(), 45);
    assert!(
        written
            .iter()
            .enumerate()
            .all(|(i, line)| line["index"] == i
                && line["embedding"].as_array().is_some_and(|v| v.len() == 32))
    );
    // Run again: nothing left to do, nothing written twice.
    let again = together_tower(&args);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds all 45"));
    assert_eq!(lines(&output).len(), 45);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_embed_resumes_to_the_same_output_as_an_uninterrupted_one() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = scratch("resume");
    let input = write_inputs(&dir, 60);
    // A slow server, so the run can be killed part-way.
    let mut config = SimConfig::default();
    config.faults.latency_ms = 40;
    config.limits = [(Class::Embeddings, ClassLimits::rpm(60_000))].into();
    let sim = Sim::start(config).await.unwrap();
    let embed = |output: &Path| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_together-tower"));
        command
            .args([
                "embed",
                "--base-url",
                &sim.url(),
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
            ])
            .args(["--batch", "4", "--concurrency", "1", "--rpm", "60000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    };

    let whole = dir.join("whole.jsonl");
    assert!(embed(&whole).status().unwrap().success());

    let resumed = dir.join("resumed.jsonl");
    let mut child = embed(&resumed).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&resumed).map_or(0, |text| text.lines().count()) < 12 {
        assert!(Instant::now() < deadline, "the run wrote nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = lines(&resumed).len();
    assert!((12..60).contains(&partial), "killed after {partial} lines");
    // As if the crash came in the middle of a write: the first half of the next line.
    let next_line = std::fs::read_to_string(&whole)
        .unwrap()
        .lines()
        .nth(partial)
        .unwrap()
        .to_owned();
    let mut torn = std::fs::read(&resumed).unwrap();
    torn.extend_from_slice(&next_line.as_bytes()[..next_line.len() / 2]);
    std::fs::write(&resumed, torn).unwrap();

    let finish = embed(&resumed).output().unwrap();
    assert!(
        finish.status.success(),
        "{}",
        String::from_utf8_lossy(&finish.stderr)
    );
    let stderr = String::from_utf8_lossy(&finish.stderr);
    assert!(
        stderr.contains("torn last line") && stderr.contains("resuming"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&resumed).unwrap(),
        std::fs::read(&whole).unwrap()
    );

    // The server saw each batch once, but for the ones in flight when the run was killed.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client
        .get(format!("{}/sim/stats", sim.url()).parse().unwrap())
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let stats = parse_stats(&body).unwrap();
    let batches = stats.classes["embeddings"].ok;
    assert!(
        (30..=31).contains(&batches),
        "{batches} batches for 2 runs of 15"
    );
    sim.shutdown().await;
}

#[test]
fn embed_never_cuts_a_file_that_is_not_its_own_output() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let dir = scratch("not-ours");
    let input = write_inputs(&dir, 3);
    let files: [(&str, &[u8]); 4] = [
        ("precious.txt", b"precious"),
        ("config.json", b"{\"listen\": \"127.0.0.1:8080\"}"),
        ("data.bin", b"\x7fELF\x02\x01\x01\x00\xff\xfe"),
        (
            "almost.jsonl",
            b"{\"index\":0,\"embedding\":[0.5]}\nmy notes",
        ),
    ];
    for (name, contents) in files {
        let output = dir.join(name);
        std::fs::write(&output, contents).unwrap();
        let run = together_tower(&[
            "embed",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("is not this input's embed output"),
            "{name}: {stderr}"
        );
        assert_eq!(
            std::fs::read(&output).unwrap(),
            contents,
            "{name} was changed"
        );
    }
}

#[test]
fn embed_refuses_an_output_that_is_not_its_own() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let dir = scratch("foreign");
    let input = write_inputs(&dir, 5);
    let output = dir.join("notes.jsonl");
    std::fs::write(&output, "{\"title\":\"my notes\"}\n").unwrap();
    let run = together_tower(&[
        "embed",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("is not this input's embed output"));
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "{\"title\":\"my notes\"}\n"
    );
}
