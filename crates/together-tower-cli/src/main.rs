//! `together-tower`: bench the stack against Together or its simulator, or embed a file.

use clap::{Parser, Subcommand};
use together_tower_cli::bench::{self, BenchArgs};
use together_tower_cli::embed::{self, EmbedArgs};
use together_tower_cli::{CliError, plot};

/// Run a real workload through together-tower's stack, against Together or, by default, an
/// embedded simulator (no network, no key).
#[derive(Debug, Parser)]
#[command(name = "together-tower", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a workload through the stack and report goodput, 429s, retries and latency.
    Bench(BenchArgs),
    /// Embed a file, one text per line, into JSON lines; resumes an interrupted run.
    Embed(EmbedArgs),
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => run_bench(&args).await,
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
