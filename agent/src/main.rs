//! `lifeboat-agent`: replicate a source server's volumes to a Lifeboat receiver.
//!
//! Settings come from the flags, then the `--config` file, then built-in
//! defaults (see [`lifeboat_agent::config`] for the file and the precedence).
//! `run` handles SIGTERM and Ctrl-C (stop cleanly, persisting state) and
//! SIGHUP (re-read the file; see [`Reloader`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use lifeboat_agent::config::{
    self, parse_block_size, parse_duration, parse_log_level, parse_rate, AgentConfig, ConfigError,
    LogFormat, VolumeEntry, DEFAULT_CONFIG_PATH,
};
use lifeboat_agent::scan::ScanOptions;
use lifeboat_agent::state::DEFAULT_STATE_DIR;
use lifeboat_agent::sync::{RateCap, SyncOptions, SyncSummary};
use lifeboat_agent::volume::VolumeKind;
use lifeboat_protocol::geometry::format_size;
use lifeboat_protocol::{BlockSize, Bundle, VolumeName, ZSTD_LEVELS};
use lifeboat_telemetry::logs::LogControl;
use tracing::{error, info, warn};

/// Lifeboat agent: block-level replication of this server's volumes to a
/// Lifeboat receiver in the recovery region.
#[derive(Parser, Debug)]
#[command(name = "lifeboat-agent", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr [default: log_format in the --config file, else text].
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. info, debug or lifeboat_agent=debug,info [default:
    /// RUST_LOG, else log_level in the --config file, else info].
    #[arg(long, value_name = "FILTER", global = true, value_parser = parse_log_level)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one replication pass: scan the volume, send every block the receiver
    /// lacks, and wait until the receiver reports them durable.
    Sync(SyncArgs),
    /// Replicate continuously until stopped (SIGTERM or Ctrl-C stop cleanly):
    /// an initial sync or rescan, then every change, in crash-consistent epochs.
    ///
    /// Settings come from the flags, then the --config file, then the defaults.
    /// Every flag below has a key of the same name in the file (with '_' for
    /// '-', e.g. scan_interval), and volumes are [[volume]] tables with path and
    /// name; --volume/--name replace the file's whole list. SIGHUP re-reads the
    /// file: max_rate and log_level apply at once, other keys at the next start.
    Run(RunArgs),
    /// Write the agent's configuration for this server and check it: the
    /// bundle parses, every volume opens read-only, and the receiver answers
    /// (a warning only if it does not). Then print how to start the service.
    ///
    /// The receiver check resolves the bundle's receiver address and makes one
    /// QUIC handshake with the bundle's certificate (mutual TLS), giving up
    /// after 5 s; it opens no replication session. The file is written
    /// atomically with mode 0600, and an existing one only with --force.
    Install(InstallArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Configuration file (TOML; `install` writes one). Flags given here
    /// override its keys; SIGHUP re-reads it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Enrollment bundle written by `lifeboat-receiver enroll`.
    #[arg(long, value_name = "FILE")]
    bundle: Option<PathBuf>,
    /// A volume to replicate (block device or regular file); repeat with a
    /// `--name` for each. Replaces the file's [[volume]] list.
    #[arg(long, value_name = "PATH")]
    volume: Vec<PathBuf>,
    /// The name of each `--volume` on the receiver, in the same order.
    #[arg(long)]
    name: Vec<VolumeName>,
    /// Block size of new replicas [default: the last sync's, or 64KiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
    block_size: Option<BlockSize>,
    /// Directory for the agent's indexes and dirty sets [default: /var/lib/lifeboat-agent].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Close an epoch at least this often while there are changes [default: 500ms].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    epoch_interval: Option<Duration>,
    /// Interval of full scans where writes cannot be tracked (regular files,
    /// no tracepoint access) [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    scan_interval: Option<Duration>,
    /// Always use periodic scans, even where tracepoints work.
    #[arg(long)]
    scan_only: bool,
    /// Freeze each volume's mounted filesystem (FIFREEZE/FITHAW) briefly at
    /// every consistency point, so epochs are filesystem-consistent.
    #[arg(long)]
    freeze: bool,
    /// Lag above which the state is BACKLOG [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    lag_threshold: Option<Duration>,
    /// Time with changes but no durable epoch after which the state is
    /// STALLED [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    stall_after: Option<Duration>,
    /// Accept volumes whose size or block size changed, re-seeding their replicas.
    #[arg(long)]
    resize: bool,
    /// Limit the data sent per volume, e.g. 50MiB/s [default: no limit]. Given
    /// here, it also pins the limit: SIGHUP leaves it alone.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// A lower limit for initial syncs and rescans, e.g. 20MiB/s, so
    /// continuous replication keeps priority [default: --max-rate]. Given
    /// here, SIGHUP leaves it alone.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    resync_max_rate: Option<u64>,
    /// Parallel QUIC data streams per volume [default: 4].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=config::MAX_STREAMS as i64))]
    streams: Option<u16>,
    /// Threads hashing and compressing during full passes [default: the number of cores].
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    threads: Option<usize>,
    /// zstd level for changed blocks, from -10 (fastest, least compression)
    /// to 19 (fewest bytes on the wire, most CPU) [default: 1].
    #[arg(long, value_name = "LEVEL", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(*ZSTD_LEVELS.start() as i64..=*ZSTD_LEVELS.end() as i64))]
    compression_level: Option<i32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (TCP, e.g.
    /// 127.0.0.1:9651) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve every volume (a raw image file) as an NBD export named after
    /// the volume, on HOST:PORT or a Unix socket (unix:/path), and replicate
    /// it in exact write order: each client FLUSH closes an epoch. The agent
    /// must then be the images' only writer. [default: off]
    #[arg(long, value_name = "ADDR")]
    nbd_listen: Option<lifeboat_agent::serve_nbd::NbdListen>,
}

#[derive(clap::Args, Debug)]
struct SyncArgs {
    /// Configuration file (see `run --help`): its bundle, state_dir,
    /// block_size, resize, max_rate, streams and threads apply, and with
    /// --name alone its volume of that name (or its only volume) is synced.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Enrollment bundle written by `lifeboat-receiver enroll`.
    #[arg(long, value_name = "FILE")]
    bundle: Option<PathBuf>,
    /// The volume to replicate: a block device or a regular file (opened read-only).
    #[arg(long, value_name = "PATH", requires = "name")]
    volume: Option<PathBuf>,
    /// Name of the volume on the receiver (letters, digits, '.', '_', '-').
    #[arg(long)]
    name: Option<VolumeName>,
    /// Block size, a power of two from 4KiB to 4MiB [default: the last sync's, or 64KiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
    block_size: Option<BlockSize>,
    /// Directory for the agent's hash index [default: /var/lib/lifeboat-agent].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Accept a volume whose size or block size changed since the last sync, and
    /// re-seed the replica with the new geometry.
    #[arg(long)]
    resize: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Limit the data sent, e.g. 50MiB/s [default: no limit].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// A lower limit when this pass is a full one (the initial sync, or a
    /// rescan) [default: --max-rate].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    resync_max_rate: Option<u64>,
    /// Parallel QUIC data streams [default: 4].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=config::MAX_STREAMS as i64))]
    streams: Option<u16>,
    /// Attempts to reach the receiver (each connect and reconnect) before giving up.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connect_attempts: u32,
    /// Threads hashing and compressing [default: the number of cores].
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    threads: Option<usize>,
    /// zstd level for changed blocks, from -10 (fastest, least compression)
    /// to 19 (fewest bytes on the wire, most CPU) [default: 1].
    #[arg(long, value_name = "LEVEL", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(*ZSTD_LEVELS.start() as i64..=*ZSTD_LEVELS.end() as i64))]
    compression_level: Option<i32>,
    /// Once the pass is durable, ask the receiver for a point-in-time snapshot
    /// of it, and wait until the PIT is stored (its id is printed).
    #[arg(long)]
    pit: bool,
    /// Label for the PIT (up to 128 characters), e.g. before-upgrade.
    #[arg(long, value_name = "LABEL", requires = "pit", value_parser = parse_pit_label)]
    pit_label: Option<String>,
}

#[derive(clap::Args, Debug)]
struct InstallArgs {
    /// Enrollment bundle written by `lifeboat-receiver enroll` for this server.
    /// It holds the server's private key: keep it mode 0600 (a warning says
    /// so if every user can read it).
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// A volume to replicate: a block device or a regular file. It must open
    /// read-only now. Repeat for more volumes.
    #[arg(long, value_name = "PATH", required = true)]
    volume: Vec<PathBuf>,
    /// Name on the receiver of the `--volume` just before it [default: the
    /// device or file name, e.g. vdb for /dev/vdb].
    #[arg(long)]
    name: Vec<VolumeName>,
    /// Where to write the configuration (the packaged unit reads the default).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// State directory written into the configuration.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Replace an existing configuration file.
    #[arg(long)]
    force: bool,
}

fn parse_pit_label(s: &str) -> Result<String, String> {
    lifeboat_protocol::check_pit_label(s).map(|()| s.to_string())
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run_command(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    let config_path = match &cli.command {
        Command::Run(a) => a.config.clone(),
        Command::Sync(a) => a.config.clone(),
        Command::Install(_) => None,
    };
    let file = match &config_path {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    let log = LogControl::init(
        cli.log_format.or(file.log_format) == Some(LogFormat::Json),
        cli.log_level,
        file.log_level.as_deref(),
    );
    match cli.command {
        Command::Sync(args) => run_sync(args, config_path.as_deref(), &file),
        Command::Run(args) => run_continuous(args, config_path, file, log),
        Command::Install(args) => {
            let sub = matches
                .subcommand_matches("install")
                .context("install arguments missing")?;
            let volumes = pair_volume_names(&args, sub)?;
            install(args, volumes)
        }
    }
}

/// Re-reads the configuration file on SIGHUP and applies what can change
/// while volumes replicate: `max_rate` (shared by every volume's sender
/// through a [`RateCap`]) and `log_level`. Other changed keys are logged as
/// taking effect at the next start. A file that no longer loads is rejected
/// with the error (naming the key) logged, and nothing changes.
struct Reloader {
    path: Option<PathBuf>,
    /// The file as last accepted.
    file: AgentConfig,
    rate: RateCap,
    /// `--max-rate` was given: it wins over the file.
    rate_pinned: bool,
    resync_rate: RateCap,
    /// `--resync-max-rate` was given: it wins over the file.
    resync_rate_pinned: bool,
    log: LogControl,
}

fn format_rate(rate: Option<u64>) -> String {
    match rate {
        Some(r) => format!("{}/s", format_size(r)),
        None => "none".into(),
    }
}

impl Reloader {
    fn reload(&mut self) {
        let Some(path) = self.path.clone() else {
            warn!("SIGHUP: run has no --config file to re-read; nothing changed");
            return;
        };
        let new = match AgentConfig::load(&path) {
            Ok(c) => c,
            Err(e) => {
                error!("SIGHUP: configuration rejected, keeping the running settings: {e}");
                return;
            }
        };
        let changed = self.file.changed_keys(&new);
        if changed.is_empty() {
            info!(config = %path.display(), "SIGHUP: configuration re-read; nothing changed");
        }
        for key in changed {
            match key {
                "max_rate" if self.rate_pinned => warn!(
                    "SIGHUP: max_rate changed in {}, but --max-rate was given and wins; keeping {}",
                    path.display(),
                    format_rate(self.rate.get())
                ),
                "max_rate" => {
                    let old = self.rate.get();
                    self.rate.set(new.max_rate);
                    info!(
                        old = %format_rate(old),
                        new = %format_rate(new.max_rate),
                        "SIGHUP: max_rate changed"
                    );
                }
                "resync_max_rate" if self.resync_rate_pinned => warn!(
                    "SIGHUP: resync_max_rate changed in {}, but --resync-max-rate was given and wins; keeping {}",
                    path.display(),
                    format_rate(self.resync_rate.get())
                ),
                "resync_max_rate" => {
                    let old = self.resync_rate.get();
                    self.resync_rate.set(new.resync_max_rate);
                    info!(
                        old = %format_rate(old),
                        new = %format_rate(new.resync_max_rate),
                        "SIGHUP: resync_max_rate changed"
                    );
                }
                "log_level" => self.log.reload(new.log_level.as_deref()),
                other => warn!(
                    "SIGHUP: {other} changed in {}; it takes effect when the agent restarts",
                    path.display()
                ),
            }
        }
        self.file = new;
    }
}

fn run_sync(args: SyncArgs, config_path: Option<&Path>, file: &AgentConfig) -> anyhow::Result<()> {
    let volume = sync_volume(&args, config_path, file)?;
    let bundle = load_bundle(&bundle_path(args.bundle.clone(), file)?)?;
    let scan = scan_options(
        args.threads.or(file.threads),
        args.compression_level.or(file.compression_level),
    );
    let opts = SyncOptions {
        bundle,
        volume_path: volume.path,
        name: volume.name,
        block_size: args.block_size.or(file.block_size),
        state_dir: state_dir(args.state_dir.clone(), file),
        resize: args.resize || file.resize == Some(true),
        max_rate: RateCap::new(args.max_rate.or(file.max_rate)),
        resync_max_rate: RateCap::new(args.resync_max_rate.or(file.resync_max_rate)),
        streams: streams(args.streams, file),
        connect_attempts: args.connect_attempts,
        scan,
        window_bytes: lifeboat_agent::sync::WINDOW_BYTES,
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

/// The volume `sync` replicates: `--volume`/`--name`, else the file's volume
/// named `--name`, else the file's only volume.
fn sync_volume(
    args: &SyncArgs,
    config_path: Option<&Path>,
    file: &AgentConfig,
) -> anyhow::Result<VolumeEntry> {
    match (&args.volume, &args.name, config_path) {
        (Some(path), Some(name), _) => Ok(VolumeEntry {
            path: path.clone(),
            name: name.clone(),
        }),
        (None, Some(name), Some(cfg)) => file
            .volumes
            .iter()
            .find(|v| &v.name == name)
            .cloned()
            .with_context(|| {
                format!(
                    "{} has no [[volume]] named {name}: give --volume PATH too",
                    cfg.display()
                )
            }),
        (None, None, Some(cfg)) => match file.volumes.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!(
                "no volume to sync: {} has no [[volume]]; give --volume PATH --name NAME",
                cfg.display()
            ),
            many => bail!(
                "{} has {} volumes ({}): pick one with --name",
                cfg.display(),
                many.len(),
                many.iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        _ => bail!("no volume to sync: give --volume PATH --name NAME, or --config FILE"),
    }
}

fn bundle_path(flag: Option<PathBuf>, file: &AgentConfig) -> anyhow::Result<PathBuf> {
    flag.or_else(|| file.bundle.clone())
        .context("no enrollment bundle: give --bundle FILE, or --config FILE with bundle = \"...\"")
}

fn state_dir(flag: Option<PathBuf>, file: &AgentConfig) -> PathBuf {
    flag.or_else(|| file.state_dir.clone())
        .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
}

fn streams(flag: Option<u16>, file: &AgentConfig) -> usize {
    flag.or(file.streams).unwrap_or(config::DEFAULT_STREAMS) as usize
}

/// The volumes `run` replicates: the command line's if it names any, else
/// the file's.
fn run_volumes(
    args: &RunArgs,
    config_path: Option<&Path>,
    file: &AgentConfig,
) -> anyhow::Result<Vec<VolumeEntry>> {
    if args.volume.is_empty() && args.name.is_empty() {
        if file.volumes.is_empty() {
            match config_path {
                Some(p) => bail!(
                    "no volume to replicate: {} has no [[volume]] table and no --volume was given \
                     (add [[volume]] path = \"...\" name = \"...\" to the file, or give --volume PATH --name NAME)",
                    p.display()
                ),
                None => bail!(
                    "no volume to replicate: give --volume PATH --name NAME (repeat for more), \
                     or --config FILE with [[volume]] tables"
                ),
            }
        }
        return Ok(file.volumes.clone());
    }
    if args.volume.len() != args.name.len() {
        bail!(
            "{} --volume but {} --name: give one --name for each --volume",
            args.volume.len(),
            args.name.len()
        );
    }
    let mut seen = std::collections::HashSet::new();
    for n in &args.name {
        if !seen.insert(n.clone()) {
            bail!("volume name {n} is given twice");
        }
    }
    Ok(args
        .volume
        .iter()
        .zip(&args.name)
        .map(|(path, name)| VolumeEntry {
            path: path.clone(),
            name: name.clone(),
        })
        .collect())
}

fn run_continuous(
    args: RunArgs,
    config_path: Option<PathBuf>,
    file: AgentConfig,
    log: LogControl,
) -> anyhow::Result<()> {
    let volumes = run_volumes(&args, config_path.as_deref(), &file)?;
    let bundle = load_bundle(&bundle_path(args.bundle.clone(), &file)?)?;
    let scan = scan_options(
        args.threads.or(file.threads),
        args.compression_level.or(file.compression_level),
    );
    let rate = RateCap::new(args.max_rate.or(file.max_rate));
    let resync_rate = RateCap::new(args.resync_max_rate.or(file.resync_max_rate));
    let state_dir = state_dir(args.state_dir.clone(), &file);
    let volumes: Vec<SyncOptions> = volumes
        .into_iter()
        .map(|v| SyncOptions {
            bundle: bundle.clone(),
            volume_path: v.path,
            name: v.name,
            block_size: args.block_size.or(file.block_size),
            state_dir: state_dir.clone(),
            resize: args.resize || file.resize == Some(true),
            max_rate: rate.clone(),
            resync_max_rate: resync_rate.clone(),
            streams: streams(args.streams, &file),
            connect_attempts: u32::MAX,
            scan: scan.clone(),
            window_bytes: lifeboat_agent::sync::WINDOW_BYTES,
            pit: None,
        })
        .collect();
    let ro = lifeboat_agent::run::RunOptions {
        epoch_interval: args
            .epoch_interval
            .or(file.epoch_interval)
            .unwrap_or(config::DEFAULT_EPOCH_INTERVAL),
        scan_interval: args
            .scan_interval
            .or(file.scan_interval)
            .unwrap_or(config::DEFAULT_SCAN_INTERVAL),
        lag_threshold: args
            .lag_threshold
            .or(file.lag_threshold)
            .unwrap_or(config::DEFAULT_LAG_THRESHOLD),
        stall_after: args
            .stall_after
            .or(file.stall_after)
            .unwrap_or(config::DEFAULT_STALL_AFTER),
        force_scan: args.scan_only || file.scan_only == Some(true),
        freeze: args.freeze || file.freeze == Some(true),
        nbd_listen: args.nbd_listen.clone().or(file.nbd_listen.clone()),
    };
    if let Some(path) = &config_path {
        info!(
            config = %path.display(),
            volumes = volumes.len(),
            max_rate = %format_rate(rate.get()),
            "configuration loaded"
        );
    }
    let mut reloader = Reloader {
        path: config_path,
        file,
        rate,
        rate_pinned: args.max_rate.is_some(),
        resync_rate,
        resync_rate_pinned: args.resync_max_rate.is_some(),
        log,
    };
    let runtime = async_runtime()?;
    let metrics_listen = args.metrics_listen;
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed before any volume starts, so an early SIGHUP is handled
        // rather than killing the process (its default action).
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        let metrics = match metrics_listen {
            Some(addr) => Some(serve_metrics(addr).await?),
            None => None,
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                    _ = hup.recv() => reloader.reload(),
                }
            }
            info!("stop requested");
            let _ = tx.send(true);
        });
        lifeboat_agent::run::run_with_metrics(volumes, ro, rx, metrics).await
    })
}

/// Pairs each `--name` of `install` with the `--volume` given just before it;
/// volumes without one get `None` (a name derived from the path).
fn pair_volume_names(
    args: &InstallArgs,
    sub: &ArgMatches,
) -> anyhow::Result<Vec<(PathBuf, Option<VolumeName>)>> {
    let volume_at: Vec<usize> = sub
        .indices_of("volume")
        .map(|i| i.collect())
        .unwrap_or_default();
    let name_at: Vec<usize> = sub
        .indices_of("name")
        .map(|i| i.collect())
        .unwrap_or_default();
    let mut pairs: Vec<(PathBuf, Option<VolumeName>)> =
        args.volume.iter().map(|p| (p.clone(), None)).collect();
    for (name, at) in args.name.iter().zip(name_at) {
        let Some(v) = volume_at.iter().rposition(|&va| va < at) else {
            bail!("--name {name} comes before any --volume: write --volume PATH --name NAME");
        };
        if let Some(first) = &pairs[v].1 {
            bail!(
                "--volume {} has two names ({first} and {name})",
                pairs[v].0.display()
            );
        }
        pairs[v].1 = Some(name.clone());
    }
    Ok(pairs)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))
}

fn install(args: InstallArgs, volumes: Vec<(PathBuf, Option<VolumeName>)>) -> anyhow::Result<()> {
    use lifeboat_agent::install::{check_bundle, check_volume, default_volume_name};
    let config_path = absolute(&args.config)?;
    // The package ships a template with every key commented out: replacing
    // that loses nothing, so it needs no --force.
    let template = config_path.exists()
        && AgentConfig::load(&config_path).is_ok_and(|c| c == AgentConfig::default());
    let replace = args.force || template;
    // Before any check, so a second install does not probe for nothing.
    if !replace && config_path.exists() {
        return Err(ConfigError::AlreadyExists { path: config_path }.into());
    }
    let bundle_path = absolute(&args.bundle)?;
    let checked = check_bundle(&bundle_path)?;
    let bundle = &checked.bundle;
    println!(
        "bundle {}: server {}, receiver {}",
        bundle_path.display(),
        bundle.server,
        bundle.receiver
    );
    if checked.world_readable() {
        eprintln!(
            "warning: bundle {} is readable by every user (mode {:04o}) and holds this server's \
             private key: chmod 600 {}",
            bundle_path.display(),
            checked.mode,
            bundle_path.display()
        );
    }
    let mut entries: Vec<VolumeEntry> = Vec::new();
    for (path, name) in volumes {
        let path = absolute(&path)?;
        let v = check_volume(&path)?;
        let name = match name {
            Some(n) => n,
            None => default_volume_name(&path)?,
        };
        if let Some(other) = entries.iter().find(|e| e.name == name) {
            bail!(
                "volumes {} and {} would both be named {name}: give each a --name",
                other.path.display(),
                path.display()
            );
        }
        if entries.iter().any(|e| e.path == path) {
            bail!("volume {} is given twice", path.display());
        }
        let kind = match v.kind {
            VolumeKind::BlockDevice => "block device",
            VolumeKind::File => "regular file",
        };
        println!(
            "volume {}: {kind}, {} bytes, readable; name {name}",
            path.display(),
            v.size
        );
        entries.push(VolumeEntry { path, name });
    }
    let runtime = async_runtime()?;
    match runtime.block_on(lifeboat_agent::install::probe_receiver(bundle)) {
        Ok(addr) => println!(
            "receiver {} ({addr}) answered a QUIC handshake with this bundle's certificate",
            bundle.receiver
        ),
        Err(e) => eprintln!(
            "warning: receiver {} is not reachable now ({e:#}); the agent keeps trying once started",
            bundle.receiver
        ),
    }
    let config = AgentConfig {
        bundle: Some(bundle_path),
        state_dir: Some(absolute(&args.state_dir)?),
        volumes: entries,
        ..AgentConfig::default()
    };
    config.save(&config_path, replace)?;
    println!("wrote {} (mode 0600)", config_path.display());
    if config_path != Path::new(DEFAULT_CONFIG_PATH) {
        println!(
            "note: the lifeboat-agent service reads {DEFAULT_CONFIG_PATH}; this file is used by \
             `lifeboat-agent run --config {}`",
            config_path.display()
        );
    }
    println!("start the agent with:");
    println!("  systemctl daemon-reload");
    println!("  systemctl enable --now lifeboat-agent");
    println!("(if it is already running: systemctl restart lifeboat-agent)");
    Ok(())
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

fn load_bundle(path: &Path) -> anyhow::Result<Bundle> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read bundle {}", path.display()))?;
    Bundle::from_toml(&text).with_context(|| format!("bundle {} is unusable", path.display()))
}

fn scan_options(threads: Option<usize>, compression_level: Option<i32>) -> ScanOptions {
    let mut scan = ScanOptions::default();
    if let Some(t) = threads {
        scan.threads = t.max(1);
    }
    if let Some(level) = compression_level {
        scan.zstd_level = level;
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
