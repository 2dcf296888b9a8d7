//! `loadgen`: the tsmsg benchmark load generator (issue #8).
//!
//! One run = one system, one workload, one mode; the result is one JSON object on stdout
//! (or in `--json FILE`). `bench/run.py` drives it: it starts the servers, pins them and
//! this process to their cores, and collects the JSON into tables and plots.
//!
//! ```text
//! loadgen --system tsmsg --addr 127.0.0.1:7700 --opt secret=... \
//!         --workload fanin --publishers 16 --window 16 --size 100 [--rate 5000] \
//!         [--tls --tls-ca ca.pem]
//! loadgen --system tsmsg --addr ws://127.0.0.1:7780/connect --opt secret=... \
//!         --workload fanout --subscribers 100 --window 16   # over WebSocket (src/link.rs)
//! loadgen --system tsmsg --addr 127.0.0.1:7701 --sub-addr 127.0.0.1:7702,127.0.0.1:7703 \
//!         --server-pid 11,12,13,10 --workload fanout ...   # a cluster: nodes on one Redis
//! ```

mod link;
mod mp;
mod nats;
mod redis;
mod system;
mod tls;
mod tsmsg;
mod workloads;

use std::sync::Arc;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::system::{Config, System};
use crate::workloads::Params;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SystemKind {
    Tsmsg,
    Redis,
    Nats,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Workload {
    /// (a) N publishers into one channel, acked.
    Fanin,
    /// (b) one channel to N subscribers.
    Fanout,
    /// (c) many channels, Zipf traffic, subscribers spread over connections.
    Channels,
    /// (d) sync replay of N entries.
    Replay,
    /// (e) reconnect storm: clients drop, a backlog is written, all resume.
    Reconnect,
    /// (f) idle authenticated connections: server RSS per connection.
    Idle,
}

#[derive(Parser, Debug)]
#[command(version, about = "tsmsg benchmark load generator")]
struct Args {
    #[arg(long, value_enum, default_value = "tsmsg")]
    system: SystemKind,
    /// host:port of the system under test; tsmsg only: several, comma-separated (the nodes
    /// of a cluster), over which publishers (and replay and idle connections) are spread
    /// round robin by connection number; and `ws://host:port[/path]` (path default
    /// `/connect`): a WebSocket, subprotocol tsmsg.v1.msgpack, instead of TCP.
    #[arg(long, default_value = "127.0.0.1:7700", value_delimiter = ',')]
    addr: Vec<String>,
    /// tsmsg only: the nodes subscribers connect to, round robin (default: --addr). With
    /// publishers on other nodes, publish-to-deliver latency is measured across nodes.
    #[arg(long, value_delimiter = ',')]
    sub_addr: Vec<String>,
    /// tsmsg only: connect with TLS, verifying the server's certificate (always).
    #[arg(long)]
    tls: bool,
    /// PEM bundle of the CAs to trust (default: the platform's).
    #[arg(long, value_name = "FILE", requires = "tls")]
    tls_ca: Option<std::path::PathBuf>,
    /// Name the server's certificate must be valid for (default: the host of --addr).
    #[arg(long, value_name = "NAME", requires = "tls")]
    tls_server_name: Option<String>,
    /// A client certificate chain (PEM), for servers that require one.
    #[arg(long, value_name = "FILE", requires = "tls")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (default: in the --tls-cert file).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Adapter options, `key=value` (tsmsg: secret=...; see each adapter).
    #[arg(long = "opt", value_parser = parse_kv)]
    opts: Vec<(String, String)>,
    /// Prefix of this run's channel names and user ids (default: from the clock).
    #[arg(long)]
    run_id: Option<String>,
    #[arg(long, value_enum)]
    workload: Workload,
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Publishes in flight per publisher (flat out), or their cap (open loop).
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Open loop: offered messages/s in total. Absent: flat out.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    #[arg(long, default_value_t = 10_000)]
    channels: usize,
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    #[arg(long, default_value_t = 100_000)]
    entries: u64,
    #[arg(long, default_value_t = 2_000)]
    clients: usize,
    /// Reconnect storm: entries written per channel while the clients are away.
    #[arg(long, default_value_t = 50)]
    backlog: u64,
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Idle: seconds to hold the connections while measuring the server's CPU.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// The server's pid, for its CPU time and RSS (/proc); several (comma-separated or
    /// repeated): CPU summed, and each one's in `cpu.per_pid`; RSS of the first.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<i32>,
    /// Seconds to wait after the window for the last acks and deliveries.
    #[arg(long, default_value_t = 20.0)]
    drain: f64,
    /// Worker threads (1: a current-thread runtime, as pinned to one core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write the JSON here instead of stdout.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_kv(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
        None => bail!("expected key=value, got {s:?}"),
    }
}

async fn run<S: System>(cfg: Config, a: &Args, p: Params) -> Result<serde_json::Value> {
    let sys = Arc::new(S::connect(cfg).await?);
    eprintln!("loadgen: {} {:?}", sys.name(), a.workload);
    match a.workload {
        Workload::Fanin => workloads::fanin(sys, &p).await,
        Workload::Fanout => workloads::fanout(sys, &p).await,
        Workload::Channels => workloads::channels(sys, &p).await,
        Workload::Replay => workloads::replay(sys, &p).await,
        Workload::Reconnect => workloads::reconnect(sys, &p).await,
        Workload::Idle => workloads::idle(sys, &p).await,
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.tls && !matches!(a.system, SystemKind::Tsmsg) {
        bail!("--tls is implemented for --system tsmsg only");
    }
    if (a.addr.len() > 1 || !a.sub_addr.is_empty()) && !matches!(a.system, SystemKind::Tsmsg) {
        bail!("several addresses (--addr A,B, --sub-addr) are for --system tsmsg only");
    }
    let ws = a
        .addr
        .iter()
        .chain(&a.sub_addr)
        .any(|s| s.starts_with("ws://"));
    if ws && !matches!(a.system, SystemKind::Tsmsg) {
        bail!("ws:// addresses are for --system tsmsg only");
    }
    system::epoch();
    let run_id = a.run_id.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("b{t}")
    });
    let cfg = Config {
        addr: a.addr[0].clone(),
        addrs: a.addr.clone(),
        sub_addrs: if a.sub_addr.is_empty() {
            a.addr.clone()
        } else {
            a.sub_addr.clone()
        },
        run_id: run_id.clone(),
        extra: a.opts.clone(),
        tls: a.tls.then(|| tls::TlsArgs {
            ca: a.tls_ca.clone(),
            server_name: a.tls_server_name.clone(),
            cert: a.tls_cert.clone(),
            key: a.tls_key.clone(),
        }),
    };
    let p = Params {
        run_id,
        publishers: a.publishers,
        window: a.window,
        size: a.size.max(17),
        warmup_s: a.warmup,
        duration_s: a.duration,
        rate: a.rate,
        subscribers: a.subscribers,
        channels: a.channels,
        connections: a.connections,
        zipf_s: a.zipf,
        entries: a.entries,
        clients: a.clients,
        backlog: a.backlog,
        idle: a.idle,
        hold_s: a.hold,
        connect_concurrency: a.connect_concurrency,
        server_pids: a.server_pid.clone(),
        drain_s: a.drain,
    };
    let rt = if a.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads)
            .enable_all()
            .build()?
    };
    let result = rt.block_on(async {
        match a.system {
            SystemKind::Tsmsg => run::<tsmsg::Tsmsg>(cfg, &a, p.clone()).await,
            SystemKind::Redis => run::<redis::Redis>(cfg, &a, p.clone()).await,
            SystemKind::Nats => run::<nats::Nats>(cfg, &a, p.clone()).await,
        }
    });
    let mut out = json!({
        "system": format!("{:?}", a.system).to_lowercase(),
        "workload": format!("{:?}", a.workload).to_lowercase(),
        "params": {
            "publishers": a.publishers, "window": a.window, "size": p.size,
            "warmup_s": a.warmup, "duration_s": a.duration, "rate": a.rate,
            "subscribers": a.subscribers, "channels": a.channels,
            "connections": a.connections, "zipf": a.zipf, "entries": a.entries,
            "clients": a.clients, "backlog": a.backlog, "idle": a.idle,
        },
    });
    if a.tls {
        out["tls"] = json!(true);
    }
    if ws {
        out["transport"] = json!("ws");
    }
    out["mode"] = match a.rate {
        Some(_) => json!("open_loop"),
        None => json!("flat_out"),
    };
    let ok = match result {
        Ok(v) => {
            out["result"] = v;
            true
        }
        Err(e) => {
            out["error"] = json!(format!("{e:#}"));
            false
        }
    };
    let text = serde_json::to_string_pretty(&out)?;
    match &a.json {
        Some(path) => std::fs::write(path, text + "\n")?,
        None => println!("{text}"),
    }
    // Don't wait for tasks still blocked on sockets.
    rt.shutdown_background();
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
