//! `ambit-bench`: the traffic tools of `cargo xtask bench`, run inside the
//! test bed's pods. Servers: a TCP echo server and an HTTP/1.1 keep-alive
//! server (hyper) for wrk. Clients: request/response latency on one
//! persistent connection, and new-connection rate with a 1-byte exchange.
//! Clients print one JSON object. A plain TCP relay stands for the least any
//! user-space proxy pair costs: no TLS, no HTTP/2, no policy. And a SPIFFE
//! Workload API client (the `spiffe` crate's), for the end-to-end tests.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::Full;
use hyper::{Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo every byte back, on every connection.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Answer every HTTP/1.1 request with a small body, keeping connections alive.
    Http {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Relay each connection accepted on LISTEN to TO, byte for byte
    /// (`--forward LISTEN=TO`, repeated).
    Relay {
        #[arg(long = "forward", value_parser = parse_forward, required = true)]
        forwards: Vec<(SocketAddr, SocketAddr)>,
    },
    /// Round trips of `size`-byte messages on one connection; prints percentiles in microseconds.
    Pingpong {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5000)]
        count: usize,
    },
    /// New connections per second, each sending and receiving one byte.
    Connrate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Opens COUNT connections to an echo server (one byte each way), holds
    /// them for SECONDS, then checks each still echoes. Prints a JSON line
    /// when all are open and another at the end.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: u64,
    },
    /// CONNECTIONS HTTP/1.1 keep-alive connections, each sending a request
    /// every INTERVAL_MS for SECONDS and checking every response body.
    Keepalive {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// On every connection: write BYTES of a counting pattern at once
    /// (the server speaks first) while checking the client's pattern, then
    /// close. Prints a JSON line per connection.
    SequenceServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Connects and writes BYTES of the pattern at once, half-closes, and
    /// checks the server's pattern to its end; prints a JSON line. Fails on
    /// the first byte out of place.
    SequenceClient {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Accepts one connection with a receive buffer of RCVBUF bytes, reads
    /// nothing for HOLD_MS, then reads to the end checking the pattern;
    /// prints the bytes read.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        rcvbuf: usize,
        #[arg(long)]
        hold_ms: u64,
    },
    /// Connects with a send buffer of SNDBUF bytes and writes the pattern
    /// without blocking for SECONDS; prints how many bytes the kernel took,
    /// then closes.
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        sndbuf: usize,
        #[arg(long)]
        seconds: u64,
    },
    /// rustls record throughput in memory on one core (seal and open), per
    /// crypto provider built in (ring; aws-lc-rs with feature `aws-lc`)
    /// and AES-GCM suite; prints a JSON line per pair.
    TlsThroughput {
        #[arg(long, default_value_t = 1024)]
        megabytes: usize,
    },
    /// Fetch this process's X.509-SVID from the SPIFFE Workload API at
    /// SOCKET; print its SPIFFE ID, serial and bundles' trust domains.
    WorkloadSvid {
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

/// The HTTP server's answer to every request.
const HTTP_BODY: &[u8] = b"hello from the bench server\n";
/// Connections opened at once by `hold`.
const HOLD_CONCURRENCY: usize = 128;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Thousands of connections need thousands of descriptors.
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    match Cli::parse().command {
        Command::Echo { listen } => echo(listen).await,
        Command::Http { listen } => http(listen).await,
        Command::Pingpong { to, size, count } => pingpong(to, size, count).await,
        Command::Connrate { to, seconds, concurrency } => connrate(to, seconds, concurrency).await,
        Command::Relay { forwards } => relay(forwards).await,
        Command::Hold { to, count, seconds } => hold(to, count, seconds).await,
        Command::Keepalive { to, connections, seconds, interval_ms } => {
            keepalive(to, connections, seconds, interval_ms).await
        }
        Command::WorkloadSvid { socket } => workload_svid(&socket).await,
        Command::TlsThroughput { megabytes } => tls_throughput(megabytes),
        Command::SequenceServer { listen, bytes } => sequence_server(listen, bytes).await,
        Command::SequenceClient { to, bytes } => sequence_client(to, bytes).await,
        Command::Sink { listen, rcvbuf, hold_ms } => sink(listen, rcvbuf, hold_ms).await,
        Command::Flood { to, sndbuf, seconds } => flood(to, sndbuf, seconds).await,
    }
}

/// The providers this build has, by name.
fn crypto_providers() -> Vec<(&'static str, rustls::crypto::CryptoProvider)> {
    #[allow(unused_mut)]
    let mut providers = vec![("ring", rustls::crypto::ring::default_provider())];
    #[cfg(feature = "aws-lc")]
    providers.push(("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()));
    providers
}

fn tls_throughput(megabytes: usize) -> anyhow::Result<()> {
    use rustls::{
        ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, pki_types::ServerName,
    };
    use std::io::{Read, Write};
    use std::sync::Arc;
    let cert = rcgen::generate_simple_self_signed(vec!["bench.local".to_string()])?;
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut roots = RootCertStore::empty();
    roots.add(der.clone())?;
    let record = vec![0x5au8; 16 * 1024];
    for (name, provider) in crypto_providers() {
        for suite in ["TLS13_AES_128_GCM_SHA256", "TLS13_AES_256_GCM_SHA384"] {
            let mut provider = provider.clone();
            provider.cipher_suites.retain(|s| format!("{:?}", s.suite()) == suite);
            let provider = Arc::new(provider);
            let server = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_no_client_auth()
                .with_single_cert(vec![der.clone()], key.clone_key())?;
            let client = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            let mut client = ClientConnection::new(Arc::new(client), ServerName::try_from("bench.local")?)?;
            let mut server = ServerConnection::new(Arc::new(server))?;
            let mut wire = Vec::new();
            // Handshake, in memory.
            while client.is_handshaking() || server.is_handshaking() {
                wire.clear();
                client.write_tls(&mut wire)?;
                server.read_tls(&mut &wire[..])?;
                server.process_new_packets()?;
                wire.clear();
                server.write_tls(&mut wire)?;
                client.read_tls(&mut &wire[..])?;
                client.process_new_packets()?;
            }
            let mut plain = vec![0u8; record.len()];
            let records = megabytes * 1024 * 1024 / record.len();
            let started = Instant::now();
            for _ in 0..records {
                client.writer().write_all(&record)?;
                wire.clear();
                client.write_tls(&mut wire)?;
                let mut sealed = &wire[..];
                while !sealed.is_empty() {
                    server.read_tls(&mut sealed)?;
                    server.process_new_packets()?;
                }
                server.reader().read_exact(&mut plain)?;
            }
            let seconds = started.elapsed().as_secs_f64();
            let gbytes_per_s = (records * record.len()) as f64 / seconds / 1e9;
            println!(
                "{}",
                serde_json::json!({ "provider": name, "suite": suite, "seal_and_open_gbytes_per_s": gbytes_per_s })
            );
        }
    }
    Ok(())
}

/// Byte `offset` of the pattern: a little-endian count of 8-byte words, so
/// any chunk out of place, lost or repeated shows.
fn pattern_byte(offset: u64) -> u8 {
    (offset / 8).to_le_bytes()[(offset % 8) as usize]
}

fn fill_pattern(buf: &mut [u8], from: u64) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = pattern_byte(from + i as u64);
    }
}

/// Writes `bytes` of the pattern.
async fn write_pattern(writer: &mut (impl AsyncWriteExt + Unpin), bytes: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        fill_pattern(&mut buf[..n], sent);
        writer.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    Ok(())
}

/// Reads to the end, checking the pattern; the count read.
async fn read_pattern(reader: &mut (impl AsyncReadExt + Unpin)) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(read);
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern_byte(read + i as u64)) {
            anyhow::bail!(
                "byte {} out of order: {} where {} belongs",
                read + i as u64,
                buf[i],
                pattern_byte(read + i as u64)
            );
        }
        read += n as u64;
    }
}

async fn sequence_server(listen: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut reader, mut writer) = stream.split();
            let (written, read) = tokio::join!(write_pattern(&mut writer, bytes), read_pattern(&mut reader));
            let report = serde_json::json!({
                "written": written.is_ok(),
                "read": read.as_ref().ok(),
                "error": read.as_ref().err().map(ToString::to_string),
            });
            println!("{report}");
        });
    }
}

async fn sequence_client(to: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(to).await?;
    let (mut reader, mut writer) = stream.split();
    let write = async {
        write_pattern(&mut writer, bytes).await?;
        writer.shutdown().await
    };
    let (written, read) = tokio::join!(write, read_pattern(&mut reader));
    written?;
    let read = read?;
    println!("{}", serde_json::json!({ "written": bytes, "read": read }));
    Ok(())
}

async fn sink(listen: SocketAddr, rcvbuf: usize, hold_ms: u64) -> anyhow::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(listen), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // Set on the listener, so the accepted socket has it from its SYN.
    socket.set_recv_buffer_size(rcvbuf)?;
    socket.bind(&listen.into())?;
    socket.listen(16)?;
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from_std(socket.into())?;
    let (mut stream, _) = listener.accept().await?;
    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    let read = read_pattern(&mut stream).await?;
    println!("{}", serde_json::json!({ "read": read }));
    Ok(())
}

async fn flood(to: SocketAddr, sndbuf: usize, seconds: u64) -> anyhow::Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_send_buffer_size(sndbuf as u32)?;
    let stream = socket.connect(to).await?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut buf = vec![0u8; 64 * 1024];
    let mut taken = 0u64;
    while Instant::now() < deadline {
        fill_pattern(&mut buf, taken);
        match stream.try_write(&buf) {
            Ok(n) => taken += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = tokio::time::timeout(Duration::from_millis(50), stream.writable()).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!("{}", serde_json::json!({ "taken": taken }));
    Ok(())
}

async fn workload_svid(socket: &std::path::Path) -> anyhow::Result<()> {
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", socket.display())).await?;
    let svid = client.fetch_x509_svid().await?;
    let bundles = client.fetch_x509_bundles().await?;
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes())?;
    let trust_domains: Vec<String> = bundles.iter().map(|(td, _)| td.to_string()).collect();
    let report = serde_json::json!({
        "spiffe_id": svid.spiffe_id().to_string(),
        "serial": leaf.raw_serial_as_string().replace(':', ""),
        "chain": svid.cert_chain().len(),
        "trust_domains": trust_domains,
    });
    println!("{report}");
    Ok(())
}

/// One byte there and back.
async fn echo_once(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}

async fn hold(to: SocketAddr, count: usize, seconds: u64) -> anyhow::Result<()> {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(HOLD_CONCURRENCY));
    let opening: Vec<_> = (0..count)
        .map(|_| {
            let semaphore = semaphore.clone();
            tokio::spawn(async move {
                let _permit = semaphore.acquire().await.ok()?;
                let mut stream = TcpStream::connect(to).await.ok()?;
                echo_once(&mut stream).await.ok()?;
                Some(stream)
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(count);
    for task in opening {
        streams.extend(task.await?);
    }
    println!("{{\"opened\": {}, \"refused\": {}}}", streams.len(), count - streams.len());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let mut broken = 0;
    for stream in &mut streams {
        if echo_once(stream).await.is_err() {
            broken += 1;
        }
    }
    println!("{{\"broken\": {broken}}}");
    Ok(())
}

/// One GET on `sender`; whether the answer came back whole.
async fn get(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, to: SocketAddr) -> bool {
    use http_body_util::BodyExt as _;
    let Ok(request) = hyper::Request::get(format!("http://{to}/")).body(Full::new(Bytes::new())) else { return false };
    let Ok(response) = sender.send_request(request).await else { return false };
    response.into_body().collect().await.is_ok_and(|body| body.to_bytes() == HTTP_BODY)
}

async fn keepalive(to: SocketAddr, connections: usize, seconds: u64, interval_ms: u64) -> anyhow::Result<()> {
    // Opened a few at a time, each with one request, before the timed
    // part: a thousand connects at once overflow the server's accept queue,
    // with or without a mesh.
    let opening = std::sync::Arc::new(tokio::sync::Semaphore::new(HOLD_CONCURRENCY));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let clients: Vec<_> = (0..connections)
        .map(|_| {
            let opening = opening.clone();
            tokio::spawn(async move {
                // (opened, requests answered intact, requests failed, whether the connection broke)
                let permit = opening.acquire().await.ok();
                let Ok(stream) = TcpStream::connect(to).await else { return (false, 0, 0, false) };
                let Ok((mut sender, connection)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    return (false, 0, 0, false);
                };
                tokio::spawn(connection);
                if !get(&mut sender, to).await {
                    return (false, 0, 0, false);
                }
                drop(permit);
                let (mut ok, mut failed) = (1u64, 0u64);
                let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
                while Instant::now() < deadline {
                    tick.tick().await;
                    if get(&mut sender, to).await {
                        ok += 1;
                    } else {
                        failed += 1;
                        if sender.is_closed() {
                            return (true, ok, failed, true);
                        }
                    }
                }
                (true, ok, failed, false)
            })
        })
        .collect();
    let (mut opened, mut ok, mut failed, mut broken) = (0, 0, 0, 0);
    for client in clients {
        let (o, answered, f, b) = client.await?;
        opened += u64::from(o);
        ok += answered;
        failed += f;
        broken += u64::from(b);
    }
    println!(
        "{{\"connections\": {connections}, \"opened\": {opened}, \"requests\": {ok}, \"failed\": {failed}, \"broken\": {broken}}}"
    );
    Ok(())
}

async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}

fn parse_forward(value: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, to) = value.split_once('=').ok_or("expected LISTEN=TO, e.g. 127.0.0.1:7000=10.0.0.2:17000")?;
    let parse = |addr: &str| addr.parse::<SocketAddr>().map_err(|e| format!("{addr}: {e}"));
    Ok((parse(listen)?, parse(to)?))
}

/// Copy buffer per direction, as the agent's relay uses.
const RELAY_BUFFER: usize = 64 * 1024;

async fn relay(forwards: Vec<(SocketAddr, SocketAddr)>) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (listen, to) in forwards {
        let listener = TcpListener::bind(listen).await?;
        tasks.spawn(async move {
            loop {
                let (mut inbound, _) = listener.accept().await?;
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(to).await else { return };
                    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut inbound,
                        &mut outbound,
                        RELAY_BUFFER,
                        RELAY_BUFFER,
                    )
                    .await;
                });
            }
        });
    }
    match tasks.join_next().await {
        Some(result) => result?,
        None => Ok(()),
    }
}

async fn http(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_request| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(HTTP_BODY))))
            });
            let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn pingpong(to: SocketAddr, size: usize, count: usize) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    let message = vec![0x5au8; size];
    let mut reply = vec![0u8; size];
    let warmup = count / 10;
    let mut rtts = Vec::with_capacity(count);
    for i in 0..count + warmup {
        let started = Instant::now();
        stream.write_all(&message).await?;
        stream.read_exact(&mut reply).await?;
        if i >= warmup {
            rtts.push(started.elapsed());
        }
    }
    rtts.sort();
    let at = |q: f64| rtts[((rtts.len() as f64 * q) as usize).min(rtts.len() - 1)].as_secs_f64() * 1e6;
    println!(
        "{{\"p50_us\": {:.1}, \"p90_us\": {:.1}, \"p99_us\": {:.1}, \"count\": {}}}",
        at(0.5),
        at(0.9),
        at(0.99),
        rtts.len()
    );
    Ok(())
}

async fn connrate(to: SocketAddr, seconds: u64, concurrency: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(async move {
                let (mut done, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let exchange = async {
                        let mut stream = TcpStream::connect(to).await?;
                        echo_once(&mut stream).await
                    };
                    match exchange.await {
                        Ok(()) => done += 1,
                        Err(_) => failed += 1,
                    }
                }
                (done, failed)
            })
        })
        .collect();
    let (mut done, mut failed) = (0, 0);
    for worker in workers {
        let (d, f) = worker.await?;
        done += d;
        failed += f;
    }
    println!("{{\"connections_per_sec\": {:.1}, \"failed\": {failed}}}", done as f64 / seconds as f64);
    Ok(())
}
