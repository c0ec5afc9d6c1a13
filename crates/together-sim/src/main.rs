//! `together-sim`: serves the simulated Together API until Ctrl-C.

use clap::Parser;
use together_sim::{Args, Sim};

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    // A binary a person starts listens on a known port unless told otherwise.
    if args.listen.is_none() && args.config.is_none() {
        args.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
    }
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("together-sim: {error}");
            std::process::exit(2);
        }
    };
    let sim = match Sim::start(config).await {
        Ok(sim) => sim,
        Err(error) => {
            eprintln!("together-sim: cannot start: {error}");
            std::process::exit(1);
        }
    };
    println!(
        "together-sim listening on {} (stats at {}/sim/stats)",
        sim.url(),
        sim.url()
    );
    let _ = tokio::signal::ctrl_c().await;
    sim.shutdown().await;
}
