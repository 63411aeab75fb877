//! `agent.toml`: the agent's configuration file.
//!
//! `lifeboat-agent install` writes it; `lifeboat-agent run --config FILE` (the
//! packaged systemd unit runs `run --config /etc/lifeboat/agent.toml`) and
//! `sync --config FILE` read it. Unknown keys are errors naming the key and the
//! file, so a typo never silently falls back to a default; so are sizes,
//! rates and durations that do not parse (the error names the key and value).
//!
//! ```toml
//! bundle = "/etc/lifeboat/web-1.bundle"   # from `lifeboat-receiver enroll`
//! state_dir = "/var/lib/lifeboat-agent"   # optional; the agent's indexes and stop records
//! epoch_interval = "500ms"                # optional; durations: 500ms, 30s, 2m, 1h
//! scan_interval = "60s"                   # optional; full-scan period where writes are not tracked
//! lag_threshold = "30s"                   # optional; lag above which the state is BACKLOG
//! stall_after = "60s"                     # optional; dirty without a durable epoch: STALLED
//! scan_only = false                       # optional; periodic scans even where tracepoints work
//! freeze = false                          # optional; FIFREEZE/FITHAW at consistency points
//! resize = false                          # optional; accept a changed volume size, re-seed
//! max_rate = "50MiB/s"                    # optional; cap on data sent per volume (live on SIGHUP)
//! resync_max_rate = "20MiB/s"             # optional; lower cap for initial syncs and rescans (live)
//! block_size = "64KiB"                    # optional; block size of new replicas (4KiB..4MiB)
//! streams = 4                             # optional; QUIC data streams per volume (1..=64)
//! threads = 2                             # optional; hashing threads [default: the cores]
//! compression_level = 1                   # optional; zstd level, -10 (fastest) to 19 (smallest)
//! log_level = "info"                      # optional; a tracing filter (live on SIGHUP)
//! log_format = "text"                     # optional; "text" or "json"
//!
//! [[volume]]                              # one table per volume
//! path = "/dev/vdb"                       # block device or regular file, opened read-only
//! name = "data"                           # its name on the receiver
//! ```
//!
//! Relative paths (`bundle`, `state_dir`, `[[volume]] path`) are relative to
//! the directory holding the file; `install` writes absolute ones.
//!
//! # Precedence
//! A flag given on the command line wins over the file, and the file wins over
//! the built-in default. `--volume`/`--name` on the command line replace the
//! file's whole `[[volume]]` list rather than adding to it (so a one-off run
//! never replicates volumes it was not told about). Boolean flags
//! (`--scan-only`, `--freeze`, `--resize`) can turn a key on but not off. The
//! log filter is taken from `--log-level`, else `RUST_LOG`, else `log_level`,
//! else `info`.
//!
//! # Reloading
//! On SIGHUP `run` reads the file again. `max_rate` and `log_level` apply at
//! once (unless a flag or `RUST_LOG` pins them); any other change is logged as
//! taking effect at the next restart. A file that no longer parses is
//! rejected as a whole, with the error logged, and the running settings stay.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lifeboat_protocol::geometry::{format_size, parse_size};
use lifeboat_protocol::{BlockSize, VolumeName, ZSTD_LEVELS};
use serde::{Deserialize, Serialize};

/// Where `install` writes the configuration, and the packaged unit reads it.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lifeboat/agent.toml";
/// `epoch_interval` when neither flag nor file sets it.
pub const DEFAULT_EPOCH_INTERVAL: Duration = Duration::from_millis(500);
/// `scan_interval` when neither flag nor file sets it.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(60);
/// `lag_threshold` when neither flag nor file sets it.
pub const DEFAULT_LAG_THRESHOLD: Duration = Duration::from_secs(30);
/// `stall_after` when neither flag nor file sets it.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);
/// `streams` when neither flag nor file sets it.
pub const DEFAULT_STREAMS: u16 = 4;
/// Most data streams per volume.
pub const MAX_STREAMS: u16 = 64;
pub use lifeboat_telemetry::logs::DEFAULT_LOG_LEVEL;

/// Errors reading or writing the configuration file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("configuration file {} does not exist (write one with `lifeboat-agent install`)", path.display())]
    Missing {
        /// The configuration file.
        path: PathBuf,
    },
    /// `save` without `replace` found a file already there.
    #[error("{} already exists (give --force to replace it)", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The configuration file (or its temporary file or directory).
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not TOML of this schema (unknown key, wrong type...).
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// The file parses but a value is unusable.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong, naming the key and value.
        reason: String,
    },
}

/// Format of the log lines on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// A `[[volume]]` table: one volume to replicate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeEntry {
    /// Block device or regular file, opened read-only.
    pub path: PathBuf,
    /// Its name on the receiver.
    pub name: VolumeName,
}

/// The parsed file: every key is optional, so flags and defaults can fill in
/// what it leaves out (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// `bundle`: the enrollment bundle.
    pub bundle: Option<PathBuf>,
    /// `state_dir`: the agent's state directory.
    pub state_dir: Option<PathBuf>,
    /// `[[volume]]`: the volumes to replicate.
    pub volumes: Vec<VolumeEntry>,
    /// `block_size` of new replicas.
    pub block_size: Option<BlockSize>,
    /// `max_rate`, bytes per second per volume.
    pub max_rate: Option<u64>,
    /// `resync_max_rate`: a lower cap for full passes (initial sync, rescan),
    /// so continuous replication of other volumes keeps priority.
    pub resync_max_rate: Option<u64>,
    /// `streams`: QUIC data streams per volume.
    pub streams: Option<u16>,
    /// `threads` hashing and compressing in full passes.
    pub threads: Option<usize>,
    /// `compression_level`: the zstd level for changed blocks.
    pub compression_level: Option<i32>,
    /// `epoch_interval`.
    pub epoch_interval: Option<Duration>,
    /// `scan_interval`.
    pub scan_interval: Option<Duration>,
    /// `lag_threshold`.
    pub lag_threshold: Option<Duration>,
    /// `stall_after`.
    pub stall_after: Option<Duration>,
    /// `scan_only`.
    pub scan_only: Option<bool>,
    /// `freeze`.
    pub freeze: Option<bool>,
    /// `resize`.
    pub resize: Option<bool>,
    /// `log_level`: a tracing filter such as `info` or `lifeboat_agent=debug,info`.
    pub log_level: Option<String>,
    /// `log_format`.
    pub log_format: Option<LogFormat>,
    /// `nbd_listen`: serve the volumes (image files) as NBD exports here and
    /// replicate them in write order.
    pub nbd_listen: Option<crate::serve_nbd::NbdListen>,
}

/// The file as written: values as text, checked into [`AgentConfig`].
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scan_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lag_threshold: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stall_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scan_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    freeze: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resize: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resync_max_rate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    streams: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compression_level: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbd_listen: Option<String>,
    #[serde(default, rename = "volume", skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<VolumeEntry>,
}

/// Parses a duration such as `500ms`, `30s`, `2m`: above zero. The grammar of
/// both the flags and the file.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e} (e.g. \"500ms\", \"30s\", \"2m\")"))?;
    if d.is_zero() {
        return Err("must be above zero".into());
    }
    Ok(d)
}

/// Parses a data rate such as `50MiB/s` (or `50MiB`; binary units, `K` =
/// `KB` = `KiB`): above zero.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    match parse_size(t) {
        Ok(0) => Err("must be above zero".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("not a rate (e.g. \"50MiB/s\", \"512KiB/s\")".into()),
    }
}

/// Parses a block size such as `64KiB`: a power of two from 4KiB to 4MiB.
pub fn parse_block_size(text: &str) -> Result<BlockSize, String> {
    let bytes =
        parse_size(text).map_err(|_| "not a size (e.g. \"64KiB\", \"1MiB\")".to_string())?;
    BlockSize::new(bytes).map_err(|e| e.to_string())
}

/// Checks a tracing filter such as `info` or `lifeboat_agent=debug,warn`.
pub fn parse_log_level(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(text.trim())
        .map(|_| text.trim().to_string())
        .map_err(|e| format!("{e} (e.g. \"info\", \"debug\", \"lifeboat_agent=debug,info\")"))
}

/// Formats a duration the way [`parse_duration`] reads it back.
fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// Parses `key = "text"` with `parse`, naming the key and value on error.
fn checked<T>(
    key: &str,
    text: &Option<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    text.as_deref()
        .map(|t| parse(t).map_err(|e| format!("{key} = {t:?}: {e}")))
        .transpose()
}

impl AgentConfig {
    /// Reads and checks the file at `path`; relative paths in it are made
    /// relative to its directory.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let mut config = Self::from_toml(&text).map_err(|e| match e {
            ParseError::Syntax(message) => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            ParseError::Invalid(reason) => ConfigError::Invalid {
                path: path.to_path_buf(),
                reason,
            },
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Some(b) = config.bundle.take() {
            config.bundle = Some(base.join(b));
        }
        if let Some(s) = config.state_dir.take() {
            config.state_dir = Some(base.join(s));
        }
        for v in &mut config.volumes {
            v.path = base.join(&v.path);
        }
        Ok(config)
    }

    pub(crate) fn from_toml(text: &str) -> Result<AgentConfig, ParseError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ParseError::Syntax(e.to_string().trim().into()))?;
        Self::from_raw(raw).map_err(ParseError::Invalid)
    }

    fn from_raw(raw: RawConfig) -> Result<AgentConfig, String> {
        let config = AgentConfig {
            epoch_interval: checked("epoch_interval", &raw.epoch_interval, parse_duration)?,
            scan_interval: checked("scan_interval", &raw.scan_interval, parse_duration)?,
            lag_threshold: checked("lag_threshold", &raw.lag_threshold, parse_duration)?,
            stall_after: checked("stall_after", &raw.stall_after, parse_duration)?,
            max_rate: checked("max_rate", &raw.max_rate, parse_rate)?,
            resync_max_rate: checked("resync_max_rate", &raw.resync_max_rate, parse_rate)?,
            block_size: checked("block_size", &raw.block_size, parse_block_size)?,
            log_level: checked("log_level", &raw.log_level, parse_log_level)?,
            nbd_listen: checked("nbd_listen", &raw.nbd_listen, |s| s.parse())?,
            bundle: raw.bundle,
            state_dir: raw.state_dir,
            volumes: raw.volumes,
            streams: raw.streams,
            threads: raw.threads,
            compression_level: raw.compression_level,
            scan_only: raw.scan_only,
            freeze: raw.freeze,
            resize: raw.resize,
            log_format: raw.log_format,
        };
        if let Some(s) = config.streams {
            if !(1..=MAX_STREAMS).contains(&s) {
                return Err(format!("streams = {s}: must be from 1 to {MAX_STREAMS}"));
            }
        }
        if config.threads == Some(0) {
            return Err("threads = 0: must be at least 1".into());
        }
        if let Some(level) = config.compression_level {
            if !ZSTD_LEVELS.contains(&level) {
                return Err(format!(
                    "compression_level = {level}: must be from {} to {}",
                    ZSTD_LEVELS.start(),
                    ZSTD_LEVELS.end()
                ));
            }
        }
        for (key, p) in [("bundle", &config.bundle), ("state_dir", &config.state_dir)] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(format!("{key} is empty"));
            }
        }
        check_volumes(&config.volumes)?;
        Ok(config)
    }

    /// The keys whose values differ between `self` and `other`, in file order
    /// (`volume` for any change to the `[[volume]]` list).
    pub fn changed_keys(&self, other: &AgentConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut diff = |key, differs: bool| {
            if differs {
                keys.push(key);
            }
        };
        diff("bundle", self.bundle != other.bundle);
        diff("state_dir", self.state_dir != other.state_dir);
        diff(
            "epoch_interval",
            self.epoch_interval != other.epoch_interval,
        );
        diff("scan_interval", self.scan_interval != other.scan_interval);
        diff("lag_threshold", self.lag_threshold != other.lag_threshold);
        diff("stall_after", self.stall_after != other.stall_after);
        diff("scan_only", self.scan_only != other.scan_only);
        diff("freeze", self.freeze != other.freeze);
        diff("resize", self.resize != other.resize);
        diff("max_rate", self.max_rate != other.max_rate);
        diff(
            "resync_max_rate",
            self.resync_max_rate != other.resync_max_rate,
        );
        diff("block_size", self.block_size != other.block_size);
        diff("streams", self.streams != other.streams);
        diff("threads", self.threads != other.threads);
        diff(
            "compression_level",
            self.compression_level != other.compression_level,
        );
        diff("log_level", self.log_level != other.log_level);
        diff("log_format", self.log_format != other.log_format);
        diff("nbd_listen", self.nbd_listen != other.nbd_listen);
        diff("volume", self.volumes != other.volumes);
        keys
    }

    fn to_raw(&self) -> RawConfig {
        RawConfig {
            bundle: self.bundle.clone(),
            state_dir: self.state_dir.clone(),
            epoch_interval: self.epoch_interval.map(format_duration),
            scan_interval: self.scan_interval.map(format_duration),
            lag_threshold: self.lag_threshold.map(format_duration),
            stall_after: self.stall_after.map(format_duration),
            scan_only: self.scan_only,
            freeze: self.freeze,
            resize: self.resize,
            max_rate: self.max_rate.map(|r| format!("{}/s", format_size(r))),
            resync_max_rate: self
                .resync_max_rate
                .map(|r| format!("{}/s", format_size(r))),
            block_size: self.block_size.map(|b| b.to_string()),
            streams: self.streams,
            threads: self.threads,
            compression_level: self.compression_level,
            log_level: self.log_level.clone(),
            log_format: self.log_format,
            nbd_listen: self.nbd_listen.as_ref().map(|l| l.to_string()),
            volumes: self.volumes.clone(),
        }
    }

    /// The file's text: a comment header listing the optional keys, then the
    /// keys that are set.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(&self.to_raw()).expect("config fields all serialize to TOML");
        format!(
            "# Lifeboat agent configuration, read by `lifeboat-agent run --config FILE`.\n\
             # Unknown keys are errors. Flags given on the command line override these keys.\n\
             # Optional keys (defaults shown):\n\
             #   epoch_interval = \"500ms\"   scan_interval = \"60s\"   lag_threshold = \"30s\"\n\
             #   stall_after = \"60s\"   scan_only = false   freeze = false   resize = false\n\
             #   max_rate = \"50MiB/s\" (default: no cap)   block_size = \"64KiB\"   streams = 4\n\
             #   threads = 2 (default: the cores)   log_level = \"info\"   log_format = \"text\"\n\
             #   compression_level = 1 (zstd, -10 fastest to 19 smallest)\n\
             #   resync_max_rate = \"20MiB/s\" (initial sync and rescans; default: max_rate)\n\
             #   nbd_listen = \"127.0.0.1:10809\" (serve the image files over NBD; default: off)\n\
             # SIGHUP makes the agent re-read max_rate, resync_max_rate and log_level; other\n\
             # keys need a restart.\n\
             {body}"
        )
    }

    /// Writes the file durably (temporary file created with mode 0600,
    /// `sync_all`, rename, fsync of the directory), creating its directory if
    /// needed. Without `replace`, an existing file is an error and is left as
    /// it was.
    pub fn save(&self, path: &Path, replace: bool) -> Result<(), ConfigError> {
        let text = self.to_toml();
        // What is written must read back as what was meant.
        if let Err(e) = Self::from_toml(&text) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                reason: format!("the configuration would not read back: {e:?}"),
            });
        }
        write_durable(path, text.as_bytes(), replace)
    }
}

fn check_volumes(volumes: &[VolumeEntry]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    let mut paths = std::collections::HashSet::new();
    for v in volumes {
        if v.path.as_os_str().is_empty() {
            return Err(format!(
                "[[volume]] name = {:?}: path is empty",
                v.name.as_str()
            ));
        }
        if !names.insert(&v.name) {
            return Err(format!(
                "[[volume]] name = {:?} appears twice",
                v.name.as_str()
            ));
        }
        if !paths.insert(&v.path) {
            return Err(format!(
                "[[volume]] path = {:?} is given for two volumes",
                v.path
            ));
        }
    }
    Ok(())
}

/// Why [`AgentConfig::from_toml`] refused a text (before a path is known).
#[derive(Debug)]
pub(crate) enum ParseError {
    /// Not TOML of this schema: the parser's message.
    Syntax(String),
    /// A value is unusable: what is wrong, naming the key and value.
    Invalid(String),
}

/// Writes `bytes` to `path` durably with mode 0600 (see [`AgentConfig::save`]).
fn write_durable(path: &Path, bytes: &[u8], replace: bool) -> Result<(), ConfigError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfigError::Io { path, source }
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| ConfigError::Invalid {
        path: path.to_path_buf(),
        reason: "not a file path".into(),
    })?;
    if !replace && path.exists() {
        return Err(ConfigError::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = fs::remove_file(&tmp);
    let written = (|| -> Result<(), ConfigError> {
        // Created 0600 (the file names the bundle, which holds a private key):
        // it is never readable by others, not even before the rename.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(io(&tmp))?;
        drop(f);
        if replace {
            fs::rename(&tmp, path).map_err(io(path))
        } else {
            // A hard link never replaces an existing file: a file that
            // appeared since the check above is kept, and reported.
            match fs::hard_link(&tmp, path) {
                Ok(()) => {
                    let _ = fs::remove_file(&tmp);
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Err(ConfigError::AlreadyExists {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) => Err(io(path)(e)),
            }
        }
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ParseError> {
        AgentConfig::from_toml(text)
    }

    fn invalid(text: &str) -> String {
        match parse(text) {
            Err(ParseError::Invalid(reason)) => reason,
            other => panic!("{text:?} must be rejected as invalid, got {other:?}"),
        }
    }

    fn syntax(text: &str) -> String {
        match parse(text) {
            Err(ParseError::Syntax(message)) => message,
            other => panic!("{text:?} must be rejected as a syntax error, got {other:?}"),
        }
    }

    const FULL: &str = r#"
bundle = "/etc/lifeboat/web-1.bundle"
state_dir = "/var/lib/lifeboat-agent"
epoch_interval = "250ms"
scan_interval = "2m"
lag_threshold = "45s"
stall_after = "90s"
scan_only = true
freeze = true
resize = false
max_rate = "64KB/s"
block_size = "1MiB"
streams = 8
threads = 3
compression_level = -4
log_level = "lifeboat_agent=debug,info"
log_format = "json"

[[volume]]
path = "/dev/vdb"
name = "data"

[[volume]]
path = "/srv/disk.img"
name = "disk.img"
"#;

    #[test]
    fn parses_every_key() {
        let c = parse(FULL).expect("parses");
        assert_eq!(
            c.bundle.as_deref(),
            Some(Path::new("/etc/lifeboat/web-1.bundle"))
        );
        assert_eq!(c.epoch_interval, Some(Duration::from_millis(250)));
        assert_eq!(c.scan_interval, Some(Duration::from_secs(120)));
        assert_eq!(c.lag_threshold, Some(Duration::from_secs(45)));
        assert_eq!(c.stall_after, Some(Duration::from_secs(90)));
        assert_eq!(
            (c.scan_only, c.freeze, c.resize),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!(c.max_rate, Some(64 << 10));
        assert_eq!(c.block_size, Some(BlockSize::new(1 << 20).unwrap()));
        assert_eq!((c.streams, c.threads), (Some(8), Some(3)));
        assert_eq!(c.compression_level, Some(-4));
        assert_eq!(c.log_level.as_deref(), Some("lifeboat_agent=debug,info"));
        assert_eq!(c.log_format, Some(LogFormat::Json));
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.volumes[1].name.as_str(), "disk.img");
    }

    #[test]
    fn empty_file_sets_nothing() {
        assert_eq!(parse("").expect("parses"), AgentConfig::default());
    }

    #[test]
    fn round_trips_through_to_toml() {
        let c = parse(FULL).expect("parses");
        let text = c.to_toml();
        assert!(text.starts_with("# Lifeboat agent configuration"), "{text}");
        assert_eq!(parse(&text).expect("reads back"), c, "{text}");
        assert!(text.contains("max_rate = \"64KiB/s\""), "{text}");
        assert!(text.contains("epoch_interval = \"250ms\""), "{text}");
        assert!(text.contains("scan_interval = \"2m\""), "{text}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let m = syntax("bundle = \"/b\"\nmax_rtae = \"1MiB/s\"\n");
        assert!(m.contains("max_rtae"), "{m}");
        let m = syntax("[[volume]]\npath = \"/dev/vdb\"\nname = \"data\"\nsize = 3\n");
        assert!(m.contains("size"), "{m}");
        let m = syntax("[volumes]\npath = \"/dev/vdb\"\n");
        assert!(m.contains("volumes"), "{m}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        for (text, key, value) in [
            ("max_rate = \"64XB/s\"", "max_rate", "64XB/s"),
            ("max_rate = \"0MiB/s\"", "max_rate", "0MiB/s"),
            ("max_rate = \"fast\"", "max_rate", "fast"),
            ("block_size = \"3KiB\"", "block_size", "3KiB"),
            ("block_size = \"64 parsecs\"", "block_size", "64 parsecs"),
            ("block_size = \"8MiB\"", "block_size", "8MiB"),
            ("epoch_interval = \"soon\"", "epoch_interval", "soon"),
            ("scan_interval = \"0s\"", "scan_interval", "0s"),
            ("lag_threshold = \"30\"", "lag_threshold", "30"),
            (
                "stall_after = \"1 fortnight\"",
                "stall_after",
                "1 fortnight",
            ),
            ("log_level = \"lifeboat=[\"", "log_level", "lifeboat=["),
        ] {
            let reason = invalid(text);
            assert!(
                reason.contains(key) && reason.contains(value),
                "{text}: {reason}"
            );
        }
        let reason = invalid("streams = 0");
        assert!(reason.contains("streams = 0"), "{reason}");
        let reason = invalid("streams = 65");
        assert!(reason.contains("streams = 65"), "{reason}");
        let reason = invalid("threads = 0");
        assert!(reason.contains("threads"), "{reason}");
        for level in ["compression_level = 20", "compression_level = -11"] {
            let reason = invalid(level);
            assert!(
                reason.contains(level) && reason.contains("-10 to 19"),
                "{reason}"
            );
        }
        // Wrong types and bad names are the parser's errors, naming the key.
        let m = syntax("streams = \"four\"");
        assert!(m.contains("streams"), "{m}");
        let m = syntax("log_format = \"xml\"");
        assert!(m.contains("log_format") || m.contains("xml"), "{m}");
        let m = syntax("[[volume]]\npath = \"/dev/vdb\"\nname = \"../etc\"\n");
        assert!(m.contains("../etc"), "{m}");
        let m = syntax("[[volume]]\npath = \"/dev/vdb\"\n");
        assert!(m.contains("name"), "{m}");
    }

    #[test]
    fn volumes_must_be_distinct() {
        let r = invalid(
            "[[volume]]\npath = \"/a\"\nname = \"x\"\n[[volume]]\npath = \"/b\"\nname = \"x\"\n",
        );
        assert!(r.contains("\"x\" appears twice"), "{r}");
        let r = invalid(
            "[[volume]]\npath = \"/a\"\nname = \"x\"\n[[volume]]\npath = \"/a\"\nname = \"y\"\n",
        );
        assert!(r.contains("\"/a\""), "{r}");
    }

    #[test]
    fn changed_keys_lists_what_differs() {
        let a = parse(FULL).expect("parses");
        assert!(a.changed_keys(&a).is_empty());
        let b = parse(
            &FULL
                .replace("64KB/s", "1MiB/s")
                .replace("name = \"data\"", "name = \"d2\""),
        )
        .expect("parses");
        assert_eq!(a.changed_keys(&b), vec!["max_rate", "volume"]);
        let c = parse(&FULL.replace("lifeboat_agent=debug,info", "warn")).expect("parses");
        assert_eq!(a.changed_keys(&c), vec!["log_level"]);
    }

    #[test]
    fn load_names_the_file_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let e = AgentConfig::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Missing { .. }), "{e:?}");

        fs::write(&path, "bundle = \"web-1.bundle\"\nbogus = 1\n").unwrap();
        let e = AgentConfig::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("bogus") && msg.contains(&path.display().to_string()),
            "{msg}"
        );

        fs::write(&path, "scan_interval = \"never\"\n").unwrap();
        let msg = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            msg.contains("scan_interval = \"never\"") && msg.contains("agent.toml"),
            "{msg}"
        );

        fs::write(
            &path,
            "bundle = \"web-1.bundle\"\nstate_dir = \"/abs/state\"\n\
             [[volume]]\npath = \"disk.img\"\nname = \"disk\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(&path).expect("loads");
        assert_eq!(c.bundle, Some(dir.path().join("web-1.bundle")));
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("/abs/state")));
        assert_eq!(c.volumes[0].path, dir.path().join("disk.img"));
    }

    #[test]
    fn save_is_0600_and_refuses_to_overwrite_unless_asked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc").join("agent.toml");
        let mut c = AgentConfig {
            bundle: Some("/etc/lifeboat/web-1.bundle".into()),
            ..Default::default()
        };
        c.save(&path, false).expect("saves");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(AgentConfig::load(&path).expect("loads"), c);

        c.max_rate = Some(1 << 20);
        let e = c.save(&path, false).unwrap_err();
        assert!(matches!(e, ConfigError::AlreadyExists { .. }), "{e:?}");
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(AgentConfig::load(&path).unwrap().max_rate, None);

        c.save(&path, true).expect("replaces");
        assert_eq!(AgentConfig::load(&path).unwrap().max_rate, Some(1 << 20));
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("agent.toml")],
            "no temp file left"
        );
    }

    #[test]
    fn flag_grammar_matches_the_file() {
        assert_eq!(parse_rate("50MiB/s"), Ok(50 << 20));
        assert_eq!(parse_rate("512K"), Ok(512 << 10));
        assert!(parse_rate("0/s").is_err());
        assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0ms").is_err());
        assert_eq!(parse_block_size("4KiB").map(BlockSize::get), Ok(4096));
        assert!(parse_log_level("debug").is_ok());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
    }
}
