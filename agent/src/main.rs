//! `lifeboat-agent`: replicate a source server's volumes to a Lifeboat receiver.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lifeboat_agent::scan::ScanOptions;
use lifeboat_agent::state::DEFAULT_STATE_DIR;
use lifeboat_agent::sync::{SyncOptions, SyncSummary};
use lifeboat_protocol::geometry::{format_size, parse_size};
use lifeboat_protocol::{BlockSize, Bundle, VolumeName};

/// Lifeboat agent: block-level replication of this server's volumes to a
/// Lifeboat receiver in the recovery region.
#[derive(Parser, Debug)]
#[command(name = "lifeboat-agent", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one replication pass: scan the volume, send every block the receiver
    /// lacks, and wait until the receiver reports them durable.
    Sync(SyncArgs),
    /// Replicate continuously until stopped (SIGTERM or Ctrl-C stop cleanly):
    /// an initial sync or rescan, then every change, in crash-consistent epochs.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Enrollment bundle written by `lifeboat-receiver enroll`.
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// A volume to replicate (block device or regular file); repeat with a
    /// `--name` for each.
    #[arg(long, value_name = "PATH", required = true)]
    volume: Vec<PathBuf>,
    /// The name of each `--volume` on the receiver, in the same order.
    #[arg(long, required = true)]
    name: Vec<VolumeName>,
    /// Block size of new replicas [default: the last sync's, or 64KiB].
    #[arg(long, value_name = "SIZE")]
    block_size: Option<BlockSize>,
    /// Directory for the agent's indexes and dirty sets.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Close an epoch at least this often while there are changes.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    epoch_interval: Duration,
    /// Interval of full scans where writes cannot be tracked (regular files,
    /// no tracepoint access).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    scan_interval: Duration,
    /// Always use periodic scans, even where tracepoints work.
    #[arg(long)]
    scan_only: bool,
    /// Freeze each volume's mounted filesystem (FIFREEZE/FITHAW) briefly at
    /// every consistency point, so epochs are filesystem-consistent.
    #[arg(long)]
    freeze: bool,
    /// Lag above which the state is BACKLOG.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    lag_threshold: Duration,
    /// Time with changes but no durable epoch after which the state is STALLED.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    stall_after: Duration,
    /// Accept volumes whose size or block size changed, re-seeding their replicas.
    #[arg(long)]
    resize: bool,
    /// Limit the data sent per volume, e.g. 50MiB/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// Parallel QUIC data streams per volume.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: u16,
    /// Threads hashing and compressing during full passes [default: the number of cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Serve Prometheus metrics at http://ADDR/metrics (TCP, e.g.
    /// 127.0.0.1:9651) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: {e} (e.g. 500ms, 1s, 2m)"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be above zero"));
    }
    Ok(d)
}

#[derive(clap::Args, Debug)]
struct SyncArgs {
    /// Enrollment bundle written by `lifeboat-receiver enroll`.
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// The volume to replicate: a block device or a regular file (opened read-only).
    #[arg(long, value_name = "PATH")]
    volume: PathBuf,
    /// Name of the volume on the receiver (letters, digits, '.', '_', '-').
    #[arg(long)]
    name: VolumeName,
    /// Block size, a power of two from 4KiB to 4MiB [default: the last sync's, or 64KiB].
    #[arg(long, value_name = "SIZE")]
    block_size: Option<BlockSize>,
    /// Directory for the agent's hash index.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Accept a volume whose size or block size changed since the last sync, and
    /// re-seed the replica with the new geometry.
    #[arg(long)]
    resize: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Limit the data sent, e.g. 50MiB/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// Parallel QUIC data streams.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: u16,
    /// Attempts to reach the receiver (each connect and reconnect) before giving up.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connect_attempts: u32,
    /// Threads hashing and compressing [default: the number of cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Once the pass is durable, ask the receiver for a point-in-time snapshot
    /// of it, and wait until the PIT is stored (its id is printed).
    #[arg(long)]
    pit: bool,
    /// Label for the PIT (up to 128 characters), e.g. before-upgrade.
    #[arg(long, value_name = "LABEL", requires = "pit", value_parser = parse_pit_label)]
    pit_label: Option<String>,
}

fn parse_pit_label(s: &str) -> Result<String, String> {
    lifeboat_protocol::check_pit_label(s).map(|()| s.to_string())
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    match parse_size(t) {
        Ok(0) => Err("rate must be above zero".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Sync(args) => run_sync(args),
        Command::Run(args) => run_continuous(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run_sync(args: SyncArgs) -> anyhow::Result<()> {
    let bundle = load_bundle(&args.bundle)?;
    let scan = scan_options(args.threads);
    let opts = SyncOptions {
        bundle,
        volume_path: args.volume,
        name: args.name,
        block_size: args.block_size,
        state_dir: args.state_dir,
        resize: args.resize,
        max_rate: args.max_rate,
        streams: args.streams as usize,
        connect_attempts: args.connect_attempts,
        scan,
        window_bytes: 64 << 20,
        pit: args.pit.then(|| lifeboat_agent::sync::PitAsk {
            label: args.pit_label.clone(),
        }),
    };
    let runtime = async_runtime()?;
    let summary = runtime.block_on(lifeboat_agent::sync::sync(opts))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn run_continuous(args: RunArgs) -> anyhow::Result<()> {
    if args.volume.len() != args.name.len() {
        anyhow::bail!(
            "{} --volume but {} --name: give one --name for each --volume",
            args.volume.len(),
            args.name.len()
        );
    }
    let mut seen = std::collections::HashSet::new();
    for n in &args.name {
        if !seen.insert(n.clone()) {
            anyhow::bail!("volume name {n} is given twice");
        }
    }
    let bundle = load_bundle(&args.bundle)?;
    let scan = scan_options(args.threads);
    let volumes = args
        .volume
        .iter()
        .zip(&args.name)
        .map(|(v, n)| SyncOptions {
            bundle: bundle.clone(),
            volume_path: v.clone(),
            name: n.clone(),
            block_size: args.block_size,
            state_dir: args.state_dir.clone(),
            resize: args.resize,
            max_rate: args.max_rate,
            streams: args.streams as usize,
            connect_attempts: u32::MAX,
            scan: scan.clone(),
            window_bytes: 64 << 20,
            pit: None,
        })
        .collect();
    let ro = lifeboat_agent::run::RunOptions {
        epoch_interval: args.epoch_interval,
        scan_interval: args.scan_interval,
        lag_threshold: args.lag_threshold,
        stall_after: args.stall_after,
        force_scan: args.scan_only,
        freeze: args.freeze,
    };
    let runtime = async_runtime()?;
    let metrics_listen = args.metrics_listen;
    runtime.block_on(async move {
        let metrics = match metrics_listen {
            Some(addr) => Some(serve_metrics(addr).await?),
            None => None,
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!("cannot listen for SIGTERM: {e}");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stop requested");
            let _ = tx.send(true);
        });
        lifeboat_agent::run::run_with_metrics(volumes, ro, rx, metrics).await
    })
}

/// Binds `addr` and serves the agent's metrics there for the life of the
/// process.
async fn serve_metrics(
    addr: std::net::SocketAddr,
) -> anyhow::Result<std::sync::Arc<lifeboat_telemetry::ReplicationMetrics>> {
    use lifeboat_telemetry::http::{with_metrics, HttpServer};
    let metrics = std::sync::Arc::new(lifeboat_telemetry::ReplicationMetrics::new(false));
    let server = HttpServer::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics (--metrics-listen)"))?;
    let local = server.local_addr();
    server.spawn(with_metrics(metrics.clone(), None));
    tracing::info!(listen = %local, "metrics at /metrics");
    // Scripts and tests read the bound port from this line.
    println!("metrics on http://{local}/metrics");
    Ok(metrics)
}

fn load_bundle(path: &std::path::Path) -> anyhow::Result<Bundle> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read bundle {}", path.display()))?;
    Bundle::from_toml(&text).with_context(|| format!("bundle {} is unusable", path.display()))
}

fn scan_options(threads: Option<usize>) -> ScanOptions {
    let mut scan = ScanOptions::default();
    if let Some(t) = threads {
        scan.threads = t.max(1);
    }
    scan
}

fn async_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn print_summary(s: &SyncSummary) {
    println!(
        "synced {}/{}: {} in {} blocks of {}",
        s.server,
        s.volume,
        format_size(s.volume_bytes),
        s.blocks,
        format_size(s.block_size as u64)
    );
    println!(
        "  changed {} blocks ({} bytes), {} zero blocks in the source",
        s.changed_blocks, s.changed_bytes, s.zero_blocks
    );
    println!(
        "  sent {} blocks, {} bytes after compression ({} resent after reconnects)",
        s.sent_blocks, s.sent_bytes, s.resent_blocks
    );
    println!(
        "  all durable on the receiver (generation {}) in {:.2}s",
        s.generation, s.duration_s
    );
    if let Some(pit) = &s.pit {
        match &pit.label {
            Some(label) => println!(
                "  PIT {} taken at epoch {} (label {label:?})",
                pit.id, pit.epoch
            ),
            None => println!("  PIT {} taken at epoch {}", pit.id, pit.epoch),
        }
    }
}
