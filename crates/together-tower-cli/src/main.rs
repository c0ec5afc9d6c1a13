//! `together-tower`: bench the stack against Together or its simulator, or embed a file.

use clap::{Parser, Subcommand};
use together_tower_cli::bench::{self, BenchArgs};
use together_tower_cli::embed::{self, EmbedArgs};
use together_tower_cli::proxy::{self, ProxyArgs};
use together_tower_cli::{CliError, plot};

/// Run a real workload through together-tower's stack, against Together or, by default, an
/// embedded simulator (no network, no key).
#[derive(Debug, Parser)]
#[command(name = "together-tower", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The least severe events written to stderr: error, warn, info, debug or trace. At warn
    /// (the default) that is what needs a look, such as Redis not answering; info adds the
    /// retries, the pauses and Redis answering again.
    #[arg(
        long,
        global = true,
        default_value = "warn",
        env = "TOGETHER_TOWER_LOG"
    )]
    log: tracing::Level,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a workload through the stack and report goodput, 429s, retries and latency.
    Bench(BenchArgs),
    /// Embed a file, one text per line, into JSON lines; resumes an interrupted run.
    Embed(EmbedArgs),
    /// Serve an OpenAI-compatible proxy: `/v1/*` forwarded through the stack, so programs in
    /// any language share one paced quota.
    Proxy(ProxyArgs),
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_writer(std::io::stderr);
    match &cli.command {
        Command::Proxy(args) if args.log_json => logs.json().init(),
        _ => logs.init(),
    }
    let result = match cli.command {
        Command::Bench(args) => run_bench(&args).await,
        Command::Proxy(args) => proxy::run(&args).await,
        Command::Embed(args) => embed::run(&args).await.map(|report| {
            println!(
                "embedded {} of {} inputs (resumed from {})",
                report.embedded, report.inputs, report.resumed_from
            );
        }),
    };
    if let Err(error) = result {
        eprintln!("together-tower: {error}");
        std::process::exit(error.exit_code());
    }
}

async fn run_bench(args: &BenchArgs) -> Result<(), CliError> {
    let (report, timeline) = bench::run(args).await?;
    print!("{}", bench::table(&report));
    if let Some(path) = &args.plot {
        plot::draw(path, &timeline, report.quota_rpm)?;
        eprintln!("wrote {}", path.display());
    }
    if args.json {
        let line =
            serde_json::to_string(&report).map_err(|error| CliError::Setup(error.to_string()))?;
        println!("{line}");
    }
    Ok(())
}
