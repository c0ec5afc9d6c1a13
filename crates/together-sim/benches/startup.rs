//! How long the simulator takes to start listening, and to shut down.
//!
//! `cargo bench -p together-sim --bench startup`

#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use together_sim::{Sim, SimConfig};

fn startup(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    c.bench_function("start_then_shutdown", |b| {
        b.to_async(&runtime).iter(|| async {
            let sim = Sim::start(SimConfig::default()).await.unwrap();
            sim.shutdown().await;
        })
    });
    c.bench_function("start_serve_one_request_then_shutdown", |b| {
        b.to_async(&runtime).iter(|| async {
            let sim = Sim::start(SimConfig::default()).await.unwrap();
            let mut stream = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
            let request = b"GET /v1/models HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer k\r\nconnection: close\r\n\r\n";
            tokio::io::AsyncWriteExt::write_all(&mut stream, request).await.unwrap();
            let mut response = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response).await.unwrap();
            assert!(response.starts_with(b"HTTP/1.1 200"));
            sim.shutdown().await;
        })
    });
}

criterion_group!(benches, startup);
criterion_main!(benches);
