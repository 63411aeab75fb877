//! `lifeboat-agent`: replicate a source server's volumes to a Lifeboat receiver.

use std::path::PathBuf;
use std::process::ExitCode;

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
    let text = std::fs::read_to_string(&args.bundle)
        .with_context(|| format!("cannot read bundle {}", args.bundle.display()))?;
    let bundle = Bundle::from_toml(&text)
        .with_context(|| format!("bundle {} is unusable", args.bundle.display()))?;
    let mut scan = ScanOptions::default();
    if let Some(t) = args.threads {
        scan.threads = t.max(1);
    }
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
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = runtime.block_on(lifeboat_agent::sync::sync(opts))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
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
}
