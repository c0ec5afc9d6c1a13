//! The simulator under clients that misbehave: slow ones, huge heads, and more connections
//! than it has file descriptors. It sits in CI, so it must shed them, not hang or spin.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use together_sim::{Sim, SimConfig};

/// Starts a simulator whose read timeout is `read_timeout_ms`.
async fn sim_with_read_timeout(read_timeout_ms: u64) -> together_sim::SimHandle {
    let config = SimConfig {
        read_timeout_ms,
        ..SimConfig::default()
    };
    Sim::start(config).await.unwrap()
}

/// Everything the server sends until it closes the connection (or `limit` passes).
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            // A reset also means the server let go of the connection.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                return (received, true);
            }
            Err(_) => return (received, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let sim = sim_with_read_timeout(200).await;
    let addr = sim.addr();
    let closed = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer k\r\n",
            )
            .unwrap();
        // The blank line that ends the head never comes.
        read_until_closed(&mut stream, Duration::from_secs(5)).1
    })
    .await
    .unwrap();
    assert!(closed, "the server kept a stalled connection open for 5 s");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_is_answered_408() {
    let sim = sim_with_read_timeout(200).await;
    let addr = sim.addr();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer k\r\n\
                  content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
            )
            .unwrap();
        read_until_closed(&mut stream, Duration::from_secs(5)).0
    })
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_bound_is_answered_431() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let addr = sim.addr();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let huge = "x".repeat(100 * 1024);
        let head = format!(
            "GET /v1/models HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer k\r\nx-padding: {huge}\r\n\r\n"
        );
        // The server may stop reading and answer before all of it is written.
        let _ = stream.write_all(head.as_bytes());
        read_until_closed(&mut stream, Duration::from_secs(5)).0
    })
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    sim.shutdown().await;
}

/// The simulator binary, run by `sh` with at most `files` open file descriptors.
struct LimitedSim {
    child: Child,
    addr: SocketAddr,
}

impl LimitedSim {
    fn start(files: u32) -> Self {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n {files} && exec \"$0\" --listen 127.0.0.1:0 --read-timeout-ms 60000"
            ))
            .arg(env!("CARGO_BIN_EXE_together-sim"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "together-sim listening on http://127.0.0.1:PORT (stats at ...)"
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    /// CPU time the process has used, user and system, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

impl Drop for LimitedSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get_models(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(
        b"GET /v1/models HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer k\r\nconnection: close\r\n\r\n",
    )?;
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(5));
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[cfg(target_os = "linux")]
#[test]
fn out_of_file_descriptors_the_server_waits_instead_of_spinning_and_recovers() {
    let sim = LimitedSim::start(48);
    assert!(get_models(sim.addr).unwrap().starts_with("HTTP/1.1 200"));
    // More connections than it has descriptors: the rest wait in the listen backlog, and
    // every accept fails with EMFILE until a descriptor is free.
    let hogs: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(sim.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (ticks_before, started) = (sim.cpu_ticks(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let ticks = sim.cpu_ticks() - ticks_before;
    let elapsed = started.elapsed();
    // Clock ticks are 1/100 s on Linux: a spinning accept loop burns about 100 a second.
    assert!(
        ticks <= 20,
        "the server used {ticks} ticks of CPU in {elapsed:?} while out of descriptors"
    );
    drop(hogs);
    // Once descriptors are free again, it serves (within its longest pause of 1 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get_models(sim.addr) {
            Ok(answer) if answer.starts_with("HTTP/1.1 200") => break,
            other => assert!(Instant::now() < deadline, "not serving again: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
