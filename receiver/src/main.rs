//! `lifeboat-receiver`: create a receiver, enroll source servers, serve agents.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use lifeboat_protocol::bundle::BUNDLE_FORMAT_V1;
use lifeboat_protocol::{Bundle, ServerName, VolumeName};
use lifeboat_receiver::config::{split_host_port, ConfigError, ReceiverConfig};
use lifeboat_receiver::fsutil;
use lifeboat_receiver::pki::Pki;
use lifeboat_receiver::serve_pit::{self, HydrateOutcome, NbdListen, ServePitOptions};
use lifeboat_receiver::store::{Store, StoreUrl};
use lifeboat_receiver::verify::RepairOutcome;
use lifeboat_receiver::{launch, pit};
use lifeboat_telemetry::logs::LogControl;

/// Lifeboat receiver: accepts block-level replication from Lifeboat agents into
/// crash-consistent staging volumes in the recovery region.
///
/// All state lives in one directory (`--dir`): `receiver.toml`, the receiver's
/// own certificate authority under `pki/`, and the staging volumes.
#[derive(Parser, Debug)]
#[command(name = "lifeboat-receiver", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default "info").
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
    /// Create a receiver: its directory, certificate authority, receiver
    /// certificate and receiver.toml. Refuses to touch an existing receiver.
    Init(InitArgs),
    /// Enroll a source server: issue it a client certificate and write the one
    /// bundle file its agent needs.
    Enroll(EnrollArgs),
    /// Accept agents and apply their blocks to staging volumes.
    Serve(ServeArgs),
    /// Show the replication status of every volume: state, progress, lag,
    /// backlog, last durable epoch, last contact. Asks the receiver serving
    /// DIR (its JSON API, address in DIR/http.addr) if one answers, else reads
    /// the status files under DIR/state, so it works whether `serve` runs or
    /// not; both give the same rows. An unreadable
    /// status file shows as a row in state UNKNOWN naming the file (and a
    /// warning on stderr); the exit code stays 0.
    Status(StatusArgs),
    /// List the point-in-time snapshots (PITs) of one volume, oldest first.
    /// Reads the store directly; no `serve` needed.
    Pits(PitsArgs),
    /// Restore one PIT of a volume into a file or block device: resolves the
    /// manifest chain, fetches and verifies every block, writes the volume
    /// (sparse for a file) beside FILE, fsyncs and renames it into place.
    /// Reads the store directly; no `serve` needed.
    Launch(LaunchArgs),
    /// Serve one PIT of a volume as an NBD export at once, before any of it
    /// is copied (instant recovery). The export is named after the volume
    /// (and is the default export). Reads fetch blocks from the store on
    /// demand, verified, through a memory cache with read-ahead; a missing or
    /// corrupt chunk fails that read with EIO and is logged with the block,
    /// digest and PIT. Writes go to a local overlay (a sparse file and a
    /// bitmap); the PIT is never modified. FLUSH makes the overlay durable,
    /// but the overlay is scratch space: it is DISCARDED when serve-pit
    /// starts, unless --keep-overlay is given. With --hydrate, the whole PIT
    /// is copied to a file in the background; once complete, reads of blocks
    /// not written through the export come from that copy (the copy stays
    /// exactly the PIT; writes stay in the overlay). Prints "nbd on ADDR" once
    /// listening; SIGINT/SIGTERM stop it cleanly (connections end, the
    /// overlay is synced). Reads the store directly; no `serve` needed.
    ServePit(ServePitArgs),
    /// Apply retention and collect garbage in the PIT store: retire the PITs
    /// the rules of receiver.toml's [retention] (and [[retention_override]])
    /// no longer keep, delete the manifests no live PIT needs, and delete the
    /// chunks no live PIT references that are older than --grace. Never
    /// deletes a chunk a PIT being taken may need. Reads the store directly;
    /// no `serve` needed (one gc at a time: a second fails naming the lock).
    Gc(GcArgs),
    /// Revoke a source server's client certificates: every certificate ever
    /// issued to it stops working at once. A running `serve` refuses its new
    /// connections and closes its live ones within a second. `enroll --force`
    /// afterwards issues a new certificate (a new bundle) that works.
    Revoke(RevokeArgs),
    /// Check by BLAKE3 digest that the staging volume (or, with --pit, a
    /// PIT's chunks in the store) holds what the receiver acknowledged, and
    /// name every block that does not. Reads only; safe while `serve` runs.
    /// Exit status 0: all match; 2: mismatches found; 1: could not check
    /// (a missing or corrupt index, a manifest that does not resolve, or a
    /// journal damaged before its end — named with the byte offset, as
    /// `serve` then re-hashes the staging volume when it next opens it).
    Verify(VerifyArgs),
}

#[derive(clap::Args, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Check this PIT (`latest`, an id or an RFC 3339 time) in the store
    /// instead of the staging volume.
    #[arg(long, value_name = "WHEN")]
    pit: Option<String>,
    /// Print the report as JSON (target, blocks, checked, unchecked,
    /// mismatched: [{block, expected, found}]).
    #[arg(long)]
    json: bool,
    /// Mark the mismatched blocks of the staging volume for resync: their
    /// digests are forgotten and the generation moves, so the agent fetches
    /// the digests again and resends exactly those blocks from the source.
    /// While `serve` runs, the request goes to it (a file in the replica's
    /// state directory): it applies it within a second if an agent session
    /// holds the volume, ends that session so the agent resends the blocks,
    /// and otherwise when the replica is next opened; verify waits up to
    /// --wait for it. With `serve` stopped, verify applies it itself. Exit
    /// status 0 once the repair is applied (the blocks were mismatched but
    /// are now on their way), 2 if it is still pending after --wait.
    #[arg(long, conflicts_with = "pit")]
    repair: bool,
    /// How long --repair waits for a running `serve` to apply the request.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    wait: std::time::Duration,
}

#[derive(clap::Args, Debug)]
struct RevokeArgs {
    /// Receiver directory (made by `init`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The source server whose certificates to revoke.
    #[arg(long, value_name = "NAME")]
    server: ServerName,
}

#[derive(clap::Args, Debug)]
struct StoreArgs {
    /// Receiver directory (its receiver.toml may name the store).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The configuration file (it may name the store) [default: DIR/receiver.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The PIT store (file:///abs/path, /abs/path or s3://bucket/prefix)
    /// [default: receiver.toml's `store`, else DIR/store].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The source server.
    #[arg(long, value_name = "NAME")]
    server: ServerName,
    /// The volume on that server.
    #[arg(long, value_name = "NAME")]
    volume: VolumeName,
}

#[derive(clap::Args, Debug)]
struct PitsArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print a JSON array, oldest first (id, time, epoch, label, blocks_changed, ...).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct LaunchArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Which PIT: `latest`, a PIT id, or an RFC 3339 time (the newest PIT at or
    /// before it).
    #[arg(long, value_name = "WHEN", default_value = "latest")]
    at: String,
    /// The file or block device to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Overwrite a non-empty file; required to write a block device in place.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct ServePitArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Which PIT: `latest`, a PIT id, or an RFC 3339 time (the newest PIT at or
    /// before it).
    #[arg(long, value_name = "WHEN", default_value = "latest")]
    at: String,
    /// Serve NBD on HOST:PORT (port 0 picks a free port; the address is
    /// printed) or on a Unix socket (unix:/path).
    #[arg(long, value_name = "ADDR")]
    nbd_listen: NbdListen,
    /// The overlay's data file; its bitmap is FILE.bitmap [default:
    /// DIR/serve-pit/SERVER/VOLUME/PIT-ID/overlay.img].
    #[arg(long, value_name = "FILE")]
    overlay: Option<PathBuf>,
    /// Keep the overlay left by an earlier serve-pit of the same PIT (its
    /// writes up to its last FLUSH) instead of discarding it.
    #[arg(long)]
    keep_overlay: bool,
    /// Copy the whole PIT into FILE in the background (sparse, verified,
    /// written beside it and renamed into place when complete, like
    /// `launch`); then serve reads from it.
    #[arg(long, value_name = "FILE")]
    hydrate: Option<PathBuf>,
    /// With --hydrate: overwrite a non-empty FILE; required for a block device.
    #[arg(long, requires = "hydrate")]
    force: bool,
    /// Memory for blocks fetched from the store (least recently used are
    /// dropped first).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size_arg)]
    cache_size: u64,
    /// How far ahead of a sequential reader to fetch blocks, 0 for none (at
    /// most a quarter of --cache-size).
    #[arg(long, value_name = "SIZE", default_value = "2MiB", value_parser = parse_size_arg)]
    read_ahead: u64,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    lifeboat_protocol::geometry::parse_size(s).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug)]
struct GcArgs {
    /// Receiver directory (its receiver.toml gives the store and the
    /// retention rules; without one, the defaults and DIR/store).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The configuration file (store and retention rules) [default: DIR/receiver.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The PIT store (file:///abs/path, /abs/path or s3://bucket/prefix)
    /// [default: receiver.toml's `store`, else DIR/store].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Print what would be retired and deleted, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Evaluate retention as of this RFC 3339 time instead of now, for
    /// what-if planning and tests. Locks, leases and --grace use the real
    /// clock.
    #[arg(long, value_name = "RFC3339")]
    now: Option<String>,
    /// Keep unreferenced chunks younger than this (e.g. 1h, 30m, 0s).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
    /// Print one JSON object (volumes, PIT decisions, deleted keys) instead
    /// of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// Receiver directory (made by `init`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Print a JSON array, one object per volume, sorted by server and volume.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct InitArgs {
    /// Receiver directory to create (mode 0700).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Address `serve` binds (UDP), e.g. 0.0.0.0:7443.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Extra name for the receiver certificate: an IP address or DNS name
    /// (repeatable). localhost, 127.0.0.1 and ::1 are always included.
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
    /// Address agents connect to, written into bundles [default: --listen].
    /// Required when --listen is a wildcard address or port 0. Its host is added
    /// to the receiver certificate and becomes tls_name.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
}

#[derive(clap::Args, Debug)]
struct EnrollArgs {
    /// Receiver directory (made by `init`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Name of the source server (letters, digits, '.', '_', '-'); it becomes the
    /// certificate's CN, which is how the receiver identifies the agent.
    #[arg(long, value_name = "NAME")]
    server: ServerName,
    /// Where to write the bundle (mode 0600: it holds a private key).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Receiver directory (made by `init`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The configuration file read at start and on SIGHUP; flags override
    /// it [default: DIR/receiver.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Bind here instead of receiver.toml's `listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at /metrics, the status page at / and its
    /// JSON API at /api/status on this TCP address, or `off` [default:
    /// receiver.toml's `metrics_listen`, else 127.0.0.1:9650].
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_listen_arg)]
    metrics_listen: Option<String>,
}

impl ServeArgs {
    fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| ReceiverConfig::path(&self.dir))
    }
}

fn parse_metrics_listen_arg(s: &str) -> Result<String, String> {
    lifeboat_receiver::config::parse_metrics_listen(s).map(|_| s.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` takes its log filter from receiver.toml's `log_level` (unless
    // RUST_LOG sets one) and follows it on SIGHUP.
    let file_level = match &cli.command {
        Command::Serve(args) => ReceiverConfig::load_file(&args.config_path(), &args.dir)
            .ok()
            .and_then(|c| c.log_level),
        _ => None,
    };
    let log = LogControl::init(
        matches!(cli.log_format, LogFormat::Json),
        None,
        file_level.as_deref(),
    );
    let result = match cli.command {
        Command::Init(args) => init(&args),
        Command::Enroll(args) => enroll(&args),
        Command::Serve(args) => serve(&args, log),
        Command::Status(args) => status(&args),
        Command::Pits(args) => pits(&args),
        Command::Launch(args) => launch(&args),
        Command::ServePit(args) => serve_pit(&args),
        Command::Gc(args) => gc(&args),
        Command::Revoke(args) => revoke(&args),
        Command::Verify(args) => match verify(&args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(2),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `init`: everything is checked before anything is written; the PKI appears
/// atomically, then receiver.toml (refusing to overwrite).
fn init(args: &InitArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    for existing in [ReceiverConfig::path(dir), dir.join("pki")] {
        if existing.symlink_metadata().is_ok() {
            bail!(
                "{} already exists: {} already holds a receiver (refusing to overwrite it)",
                existing.display(),
                dir.display()
            );
        }
    }

    let mut config = ReceiverConfig::new(args.listen);
    match &args.advertise {
        Some(a) => config.advertise = a.clone(),
        None if args.listen.ip().is_unspecified() => bail!(
            "--listen {} is a wildcard address agents cannot connect to; \
             pass --advertise HOST:PORT with the address they should use",
            args.listen
        ),
        None if args.listen.port() == 0 => bail!(
            "--listen {} has port 0, which agents cannot connect to; \
             pass a fixed port or --advertise HOST:PORT",
            args.listen
        ),
        None => {}
    }
    let (host, _) = split_host_port(&config.advertise).with_context(|| {
        format!(
            "--advertise {:?} is not HOST:PORT (write IPv6 as [addr]:port)",
            config.advertise
        )
    })?;
    // The advertised host goes into the certificate, so agents can verify the
    // receiver under the very name they connect to.
    config.tls_name = host.to_string();
    let mut sans = args.sans.clone();
    sans.push(host.to_string());
    config
        .validate(dir)
        .context("the receiver configuration would be invalid")?;

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot stat {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "receiver directory is accessible to other users; consider chmod 700"
        );
    }

    let pki = Pki::create(dir, &sans)?;
    config.save_new(dir)?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    fsutil::fsync_dir(parent.unwrap_or(Path::new(".")))?;

    let names = pki.server_names()?.join(", ");
    let d = dir.display();
    println!("Created Lifeboat receiver in {d}:");
    println!(
        "  {d}/receiver.toml    listen {}, advertise {}, tls_name {}",
        config.listen, config.advertise, config.tls_name
    );
    println!("  {d}/pki/ca.pem       receiver CA certificate");
    println!("  {d}/pki/ca.key       CA private key (0600; whoever holds it can enroll servers)");
    println!("  {d}/pki/server.pem   receiver certificate for: {names}");
    println!("  {d}/pki/server.key   its private key (0600)");
    println!();
    println!("Next, enroll each source server:");
    println!("  lifeboat-receiver enroll --dir {d} --server NAME --out NAME.bundle");
    Ok(())
}

/// `tls_name` in the form `Pki::server_names` lists names.
fn normalize_name(name: &str) -> String {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => name.to_ascii_lowercase(),
    }
}

/// `enroll`: nothing is issued unless the bundle can be written.
fn enroll(args: &EnrollArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    let out = &args.out;
    let config = ReceiverConfig::load(dir)?;
    let pki = Pki::open(dir)?;

    if !args.force && out.symlink_metadata().is_ok() {
        bail!(
            "{} already exists (pass --force to replace it)",
            out.display()
        );
    }
    let names = pki.server_names()?;
    if !names.contains(&normalize_name(&config.tls_name)) {
        bail!(
            "tls_name {:?} in {} is not a name of the receiver certificate {} ({}); \
             agents would reject the receiver",
            config.tls_name,
            ReceiverConfig::path(dir).display(),
            pki.server_pem_path().display(),
            names.join(", ")
        );
    }

    let server = &args.server;
    let re_enrolled = pki.issued_path(server).exists();
    let issued = pki.issue_client(server)?;
    let bundle = Bundle {
        format: BUNDLE_FORMAT_V1.to_string(),
        server: server.clone(),
        receiver: config.advertise.clone(),
        tls_name: config.tls_name.clone(),
        ca_cert: pki.ca_cert_pem()?,
        client_cert: issued.cert_pem,
        client_key: issued.key_pem,
    };
    let text = bundle.to_toml();
    Bundle::from_toml(&text).context("internal error: the new bundle does not parse")?;

    let written = if args.force {
        fsutil::write_atomic(out, text.as_bytes(), 0o600)
    } else {
        fsutil::create_new_private(out, text.as_bytes())
    };
    written.with_context(|| format!("cannot write the bundle to {}", out.display()))?;

    if re_enrolled {
        eprintln!(
            "note: {server} was enrolled before; its earlier certificate stays valid until it \
             expires (Lifeboat has no revocation yet)"
        );
    }
    println!(
        "Wrote the enrollment bundle for {server} to {} (mode 0600: it holds {server}'s private key).",
        out.display()
    );
    println!("Agents will connect to {}.", config.advertise);
    println!("Copy it to {server} only, then run there:");
    println!(
        "  lifeboat-agent sync --bundle {} --volume /dev/DEVICE --name VOLUME",
        out.display()
    );
    Ok(())
}

/// `status`: reads the status files; stale connected sessions show as
/// DISCONNECTED (see `lifeboat_receiver::status`).
fn status(args: &StatusArgs) -> anyhow::Result<()> {
    use lifeboat_receiver::status::{read_statuses, render_table, unix_ms, StatusRow};
    let now = unix_ms(std::time::SystemTime::now());
    let rows = match lifeboat_receiver::web::query_status(&args.dir) {
        Some(rows) => rows,
        None => read_statuses(&args.dir, now)
            .with_context(|| format!("cannot read the status of {}", args.dir.display()))?,
    };
    for row in &rows {
        if let StatusRow::Unreadable { error, .. } = row {
            eprintln!("warning: {error}");
        }
    }
    if args.json {
        let all: Vec<serde_json::Value> = rows.iter().map(StatusRow::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print!("{}", render_table(&rows));
        for row in &rows {
            if let StatusRow::Volume(v) = row {
                if let Some(e) = &v.last_error {
                    println!(
                        "error: {}/{} since {}: {e}",
                        v.server,
                        v.volume,
                        v.last_error_at.as_deref().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(())
}

/// Opens the store named by `--store`, else receiver.toml's `store`, else
/// `DIR/store` (also when DIR has no receiver.toml: a recovery region may
/// hold only the store), with receiver.toml's `[s3]` settings. Every command
/// that reads the store opens it here.
fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    open_store_in(&args.dir, args.config.as_deref(), args.store.as_deref())
}

/// `--config FILE` (which must exist), else DIR/receiver.toml, else the
/// defaults when DIR has none.
fn config_or_default(dir: &Path, config: Option<&Path>) -> anyhow::Result<ReceiverConfig> {
    if let Some(path) = config {
        return Ok(ReceiverConfig::load_file(path, dir)?);
    }
    match ReceiverConfig::load(dir) {
        Ok(c) => Ok(c),
        Err(ConfigError::Missing { .. }) => Ok(ReceiverConfig::new(SocketAddr::from((
            [127, 0, 0, 1],
            7443,
        )))),
        Err(e) => Err(e.into()),
    }
}

/// [`open_store`] for a directory and an optional `--store`.
fn open_store_in(dir: &Path, config: Option<&Path>, store: Option<&str>) -> anyhow::Result<Store> {
    let config = config_or_default(dir, config)?;
    let url = match store {
        Some(s) => StoreUrl::parse(s).context("--store")?,
        None => config.store_url(dir).map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    Ok(config.open_store_at(dir, &url)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `pits`: one volume's PITs, oldest first.
fn pits(args: &PitsArgs) -> anyhow::Result<()> {
    let store = open_store(&args.store)?;
    let (server, volume) = (args.store.server.as_str(), args.store.volume.as_str());
    let list = runtime()?
        .block_on(pit::list_pits(&store, server, volume))
        .with_context(|| {
            format!(
                "cannot list the PITs of {server}/{volume} in {}",
                store.url()
            )
        })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no PITs of {server}/{volume} in {}", store.url());
        return Ok(());
    }
    println!(
        "{:<20}  {:<24}  {:>8}  {:>14}  {:<4}  LABEL",
        "ID", "TIME", "EPOCH", "BLOCKS_CHANGED", "FULL"
    );
    for p in &list {
        println!(
            "{:<20}  {:<24}  {:>8}  {:>14}  {:<4}  {}",
            p.id,
            p.time,
            p.epoch,
            p.blocks_changed,
            if p.full { "yes" } else { "no" },
            p.label.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// `launch`: restore a PIT into a file or device.
fn launch(args: &LaunchArgs) -> anyhow::Result<()> {
    let at = launch::parse_at(&args.at).map_err(|e| anyhow::anyhow!("--at: {e}"))?;
    let store = open_store(&args.store)?;
    let opts = launch::LaunchOptions {
        at,
        out: args.out.clone(),
        force: args.force,
    };
    let (server, volume) = (args.store.server.as_str(), args.store.volume.as_str());
    let r = runtime()?.block_on(launch::launch(&store, server, volume, &opts))?;
    println!(
        "launched PIT {} of {server}/{volume} (taken {}, epoch {}{}) into {}: {} bytes, \
         {} blocks fetched and verified, {} zero blocks, in {:.2?}",
        r.pit.id,
        r.pit.time,
        r.pit.epoch,
        r.pit
            .label
            .as_deref()
            .map(|l| format!(", label {l:?}"))
            .unwrap_or_default(),
        args.out.display(),
        r.volume_bytes,
        r.blocks_fetched,
        r.blocks_zero,
        r.elapsed
    );
    Ok(())
}

/// `verify`: whether everything matched.
fn verify(args: &VerifyArgs) -> anyhow::Result<bool> {
    use lifeboat_receiver::verify::{render, verify_pit, verify_staging};
    let s = &args.store;
    let report = match &args.pit {
        Some(when) => {
            let at = launch::parse_at(when).map_err(|e| anyhow::anyhow!("--pit: {e}"))?;
            let store = open_store(s)?;
            runtime()?.block_on(verify_pit(
                &store,
                s.server.as_str(),
                s.volume.as_str(),
                &at,
            ))?
        }
        None => {
            let config = config_or_default(&s.dir, s.config.as_deref())?;
            let staging = config.staging_path(&s.dir, &s.server, &s.volume);
            let paths = lifeboat_receiver::replica::ReplicaPaths::new(
                &s.dir, &s.server, &s.volume, staging,
            );
            if !paths.index.exists() {
                bail!(
                    "{}/{}: no replica on this receiver ({} is missing)",
                    s.server,
                    s.volume,
                    paths.index.display()
                );
            }
            let mut report = verify_staging(&paths)?;
            if args.repair && !report.mismatched.is_empty() {
                report.repair = Some(repair(s, &paths, &report, args.wait)?);
            }
            report
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(report.mismatched.is_empty() || report.repair == Some(RepairOutcome::Applied))
}

/// `verify --repair`: hands the mismatched blocks to whoever holds the
/// replica (see `replica::request_repair`) and says what became of them.
fn repair(
    s: &StoreArgs,
    paths: &lifeboat_receiver::replica::ReplicaPaths,
    report: &lifeboat_receiver::verify::VerifyReport,
    wait: std::time::Duration,
) -> anyhow::Result<RepairOutcome> {
    use lifeboat_receiver::replica::{acknowledged_digests, request_repair, Replica};
    let blocks: Vec<u64> = report.mismatched.iter().map(|m| m.block).collect();
    request_repair(paths, &blocks)
        .with_context(|| format!("cannot write the repair request {}", paths.repair.display()))?;
    if lifeboat_receiver::web::query_status(&s.dir).is_none() {
        // No serve: open the replica here; open applies the request.
        let ack = acknowledged_digests(paths)?;
        let replica = Replica::open(
            s.server.clone(),
            s.volume.clone(),
            paths.clone(),
            ack.geometry,
            false,
        )?;
        eprintln!(
            "marked {} blocks for resync (generation {}): the agent resends them at its next session",
            blocks.len(),
            replica.generation()
        );
        return Ok(RepairOutcome::Applied);
    }
    eprintln!(
        "serve is running: asked it to repair {} blocks ({}); waiting up to {}",
        blocks.len(),
        paths.repair.display(),
        humantime::format_duration(wait)
    );
    let deadline = std::time::Instant::now() + wait;
    let taken = paths.repair_taken();
    loop {
        if !paths.repair.exists() && !taken.exists() {
            eprintln!(
                "serve repaired {} blocks: their digests are forgotten and the agent's session was ended, so it fetches the digests and resends them from the source",
                blocks.len()
            );
            return Ok(RepairOutcome::Applied);
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "serve did not take the repair request within {}: no agent session holds {}/{} now. \
                 The request stays in {} and is applied when serve next opens the replica (the agent's next connection)",
                humantime::format_duration(wait),
                s.server,
                s.volume,
                paths.repair.display()
            );
            return Ok(RepairOutcome::Pending);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `revoke`: adds every certificate of the server to the revocation list.
fn revoke(args: &RevokeArgs) -> anyhow::Result<()> {
    let pki = Pki::open(&args.dir)?;
    let added = pki.revoke(&args.server)?;
    if added.is_empty() {
        println!(
            "every certificate issued to {} was already revoked",
            args.server
        );
    } else {
        for serial in &added {
            println!("revoked certificate {serial} of {}", args.server);
        }
    }
    println!(
        "A running serve refuses them from now on and closes their connections within a second.\n\
         To let {} replicate again: lifeboat-receiver enroll --dir {} --server {} --out FILE --force",
        args.server,
        args.dir.display(),
        args.server
    );
    Ok(())
}

/// `serve-pit`: serve a PIT over NBD until SIGINT or SIGTERM.
fn serve_pit(args: &ServePitArgs) -> anyhow::Result<()> {
    let at = launch::parse_at(&args.at).map_err(|e| anyhow::anyhow!("--at: {e}"))?;
    let store = open_store(&args.store)?;
    let (server, volume) = (args.store.server.as_str(), args.store.volume.as_str());
    let opts = ServePitOptions {
        overlay: args.overlay.clone(),
        keep_overlay: args.keep_overlay,
        hydrate: args.hydrate.clone(),
        force: args.force,
        cache_bytes: args.cache_size,
        read_ahead_bytes: args.read_ahead,
        ..ServePitOptions::new(at, args.nbd_listen.clone())
    };
    runtime()?.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed before serving: a signal from now on stops cleanly.
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let serving = serve_pit::start(store, server, volume, &args.store.dir, opts).await?;
        // Scripts and tests read the bound address from this line.
        println!("nbd on {}", serving.listening());
        let signal = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal, "stopping");
        let report = serving.stop().await?;
        if let Some(HydrateOutcome::Failed(e)) = &report.hydration {
            // The export was served; the copy asked for was not made.
            anyhow::bail!("--hydrate failed: {e}");
        }
        Ok(())
    })
}

/// `gc`: retention and garbage collection over the store.
fn gc(args: &GcArgs) -> anyhow::Result<()> {
    use lifeboat_receiver::gc::{run_gc, GcOptions, SystemClock};
    let retention_now_unix_ms = match &args.now {
        None => None,
        Some(s) => match launch::parse_at(s).map_err(|e| anyhow::anyhow!("--now: {e}"))? {
            pit::At::Time(ms) if ms >= 0 => Some(ms as u64),
            _ => bail!(
                "--now {s:?}: expected an RFC 3339 time after 1970, e.g. 2026-11-25T10:20:00Z"
            ),
        },
    };
    let config = config_or_default(&args.dir, args.config.as_deref())?;
    let store = open_store_in(&args.dir, args.config.as_deref(), args.store.as_deref())?;
    let opts = GcOptions {
        retention_now_unix_ms,
        grace: args.grace,
        dry_run: args.dry_run,
        progress: !args.json,
    };
    let policy = |s: &ServerName, v: &VolumeName| config.retention_policy(s, v);
    let report = runtime()?
        .block_on(run_gc(&store, &policy, &opts, &SystemClock))
        .with_context(|| format!("gc of {}", store.url()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_gc_report(&report);
    }
    if !report.errors.is_empty() {
        bail!(
            "gc of {} is incomplete: {}",
            report.store,
            report.errors.join("; ")
        );
    }
    Ok(())
}

fn print_gc_report(r: &lifeboat_receiver::gc::GcReport) {
    let dry = r.dry_run;
    let would = |done: &str, maybe: &str| {
        if dry {
            maybe.to_string()
        } else {
            done.to_string()
        }
    };
    println!(
        "gc of {}: retention as of {}, grace {}{}",
        r.store,
        r.retention_now,
        r.grace,
        if dry {
            " (dry run: nothing is changed)"
        } else {
            ""
        }
    );
    for v in &r.volumes {
        let kept = v.pits.iter().filter(|p| p.decision.keep).count();
        println!(
            "{}/{}: {} live PITs, {kept} kept, {} {} ({})",
            v.server,
            v.volume,
            v.pits.len(),
            v.retired.len(),
            would("retired", "would be retired"),
            v.policy
        );
        for p in &v.pits {
            let verb = match (p.decision.keep, dry) {
                (true, _) => "keep        ",
                (false, false) => "retired     ",
                (false, true) => "would retire",
            };
            println!("  {verb}  {}  {}  {}", p.id, p.time, p.decision.explain());
        }
        for id in &v.manifests_deleted {
            println!("  {} manifest of {id}", would("deleted", "would delete"));
        }
        if !v.manifests_kept_for_chains.is_empty() {
            println!(
                "  {} retired manifests kept: kept PITs' chains pass through them ({})",
                v.manifests_kept_for_chains.len(),
                v.manifests_kept_for_chains.join(", ")
            );
        }
        if v.orphan_markers_deleted > 0 {
            println!(
                "  {} {} leftover retired markers",
                would("deleted", "would delete"),
                v.orphan_markers_deleted
            );
        }
    }
    if r.volumes.is_empty() {
        println!("no PITs in the store");
    }
    let c = &r.chunks;
    println!(
        "chunks: {} listed, {} referenced by live PITs, {} unreferenced but younger than {} (kept)",
        c.listed, c.referenced, c.young, r.grace
    );
    if dry {
        for key in &c.deleted {
            println!("  would delete chunk {key}");
        }
    }
    println!(
        "chunks {}: {} ({} bytes)",
        would("deleted", "that would be deleted"),
        c.deleted.len(),
        c.deleted_bytes
    );
    if let Some(why) = &c.not_collected {
        println!("chunks not collected: {why}");
    }
    for e in &r.errors {
        eprintln!("error: {e}");
    }
}

fn serve(args: &ServeArgs, log: LogControl) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(lifeboat_receiver::server::serve(
        &args.dir,
        &args.config_path(),
        args.listen,
        args.metrics_listen.as_deref(),
        log,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::fs;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "lifeboat-receiver",
            "--log-format",
            "json",
            "init",
            "--dir",
            "/tmp/x",
            "--listen",
            "0.0.0.0:7443",
            "--san",
            "a.example",
            "--san",
            "10.0.0.1",
        ])
        .unwrap();
        assert!(matches!(cli.log_format, LogFormat::Json));
        assert!(matches!(cli.command, Command::Init(InitArgs { ref sans, .. }) if sans.len() == 2));
        // A bad server name is a usage error, before any work.
        let cli =
            Cli::try_parse_from(["lifeboat-receiver", "status", "--dir", "d", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status(StatusArgs { json: true, .. })
        ));
        let cli = Cli::try_parse_from([
            "lifeboat-receiver",
            "gc",
            "--dir",
            "d",
            "--dry-run",
            "--now",
            "2025-03-12T12:05:00Z",
            "--grace",
            "0s",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Gc(GcArgs { dry_run: true, json: false, grace, now: Some(_), .. })
                if grace.is_zero()
        ));
        let cli = Cli::try_parse_from([
            "lifeboat-receiver",
            "serve",
            "--dir",
            "d",
            "--metrics-listen",
            "off",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Serve(ServeArgs { metrics_listen: Some(ref m), .. }) if m == "off"
        ));
        assert!(Cli::try_parse_from([
            "lifeboat-receiver",
            "serve",
            "--dir",
            "d",
            "--metrics-listen",
            "9650",
        ])
        .is_err());
        let serve_pit = |extra: &[&str]| {
            let mut args = vec![
                "lifeboat-receiver",
                "serve-pit",
                "--dir",
                "d",
                "--server",
                "web-1",
                "--volume",
                "vm1",
            ];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        let cli = serve_pit(&["--nbd-listen", "unix:/run/x.sock", "--cache-size", "8MiB"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::ServePit(ServePitArgs {
                cache_size: 8388608,
                read_ahead: 2097152,
                nbd_listen: NbdListen::Unix(_),
                keep_overlay: false,
                ..
            })
        ));
        assert!(serve_pit(&[]).is_err(), "--nbd-listen is required");
        assert!(
            serve_pit(&["--nbd-listen", "127.0.0.1:0", "--force"]).is_err(),
            "--force needs --hydrate"
        );
        assert!(serve_pit(&["--nbd-listen", "127.0.0.1:0", "--cache-size", "lots"]).is_err());
        let cli = Cli::try_parse_from(["lifeboat-receiver", "gc", "--dir", "d"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Gc(GcArgs { dry_run: false, grace, now: None, .. })
                if grace == lifeboat_receiver::gc::DEFAULT_GRACE
        ));
        assert!(Cli::try_parse_from([
            "lifeboat-receiver",
            "enroll",
            "--dir",
            "d",
            "--server",
            "../etc",
            "--out",
            "x",
        ])
        .is_err());
    }

    fn init_args(dir: &Path) -> InitArgs {
        InitArgs {
            dir: dir.to_path_buf(),
            listen: "127.0.0.1:7443".parse().unwrap(),
            sans: vec![],
            advertise: None,
        }
    }

    fn enroll_args(dir: &Path, server: &str, out: &Path, force: bool) -> EnrollArgs {
        EnrollArgs {
            dir: dir.to_path_buf(),
            server: ServerName::new(server).unwrap(),
            out: out.to_path_buf(),
            force,
        }
    }

    #[test]
    fn init_creates_a_receiver_and_refuses_to_overwrite_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("recv");
        init(&init_args(&dir)).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let config = ReceiverConfig::load(&dir).unwrap();
        assert_eq!(config.advertise, "127.0.0.1:7443");
        assert_eq!(config.tls_name, "127.0.0.1");
        let before = fs::read(dir.join("pki/ca.pem")).unwrap();

        let e = format!("{:#}", init(&init_args(&dir)).unwrap_err());
        assert!(e.contains("already exists"), "{e}");
        // Only the PKI left (config removed): still refused, CA untouched.
        fs::remove_file(dir.join("receiver.toml")).unwrap();
        let e = format!("{:#}", init(&init_args(&dir)).unwrap_err());
        assert!(e.contains("pki"), "{e}");
        assert_eq!(fs::read(dir.join("pki/ca.pem")).unwrap(), before);
    }

    #[test]
    fn init_needs_a_reachable_advertise_address() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("recv");
        let mut args = init_args(&dir);
        args.listen = "0.0.0.0:7443".parse().unwrap();
        let e = format!("{:#}", init(&args).unwrap_err());
        assert!(e.contains("--advertise"), "{e}");
        assert!(!dir.exists(), "nothing is created on a usage error");

        args.advertise = Some("DR.example.com:7443".into());
        init(&args).unwrap();
        let config = ReceiverConfig::load(&dir).unwrap();
        assert_eq!(config.tls_name, "DR.example.com");
        let pki = Pki::open(&dir).unwrap();
        assert!(pki
            .server_names()
            .unwrap()
            .contains(&"dr.example.com".into()));
    }

    #[test]
    fn enroll_writes_a_private_bundle_and_refuses_to_overwrite_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("recv");
        init(&init_args(&dir)).unwrap();
        let out = tmp.path().join("web-1.bundle");

        enroll(&enroll_args(&dir, "web-1", &out, false)).unwrap();
        let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = fs::read_to_string(&out).unwrap();
        let bundle = Bundle::from_toml(&first).unwrap();
        assert_eq!(bundle.server.as_str(), "web-1");
        assert_eq!(bundle.receiver, "127.0.0.1:7443");
        assert_eq!(bundle.tls_name, "127.0.0.1");
        lifeboat_agent::tls::client_tls_config(&bundle).unwrap();

        let e = format!(
            "{:#}",
            enroll(&enroll_args(&dir, "web-1", &out, false)).unwrap_err()
        );
        assert!(e.contains("--force"), "{e}");
        assert_eq!(fs::read_to_string(&out).unwrap(), first);

        enroll(&enroll_args(&dir, "web-1", &out, true)).unwrap();
        let second = fs::read_to_string(&out).unwrap();
        assert_ne!(second, first);
        let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn enroll_names_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("b");
        let e = format!(
            "{:#}",
            enroll(&enroll_args(tmp.path(), "web-1", &out, false)).unwrap_err()
        );
        assert!(e.contains("receiver.toml"), "{e}");
        assert!(!out.exists());
    }
}
