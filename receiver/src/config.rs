//! `receiver.toml`: the receiver's configuration.
//!
//! It lives at `D/receiver.toml` beside `D/pki/` (see [`crate::pki`]); `init` writes
//! it, every other command reads it. Unknown keys are errors (naming the key), so a
//! typo never silently falls back to a default.
//!
//! ```toml
//! listen = "0.0.0.0:7443"             # where `serve` binds (UDP, QUIC)
//! advertise = "dr.example.com:7443"   # host:port written into bundles; default: listen
//! tls_name = "dr.example.com"         # name agents check the receiver cert against; default "localhost"
//! staging_dir = "/srv/lifeboat"       # optional; default D/staging
//! fsync = "always"                    # optional; the only policy for now
//! store = "file:///srv/lifeboat"      # optional PIT store (file:///abs, /abs or s3://bucket/prefix); default D/store
//! pit_interval = "10m"                # optional; scheduled PITs ("0s": at every durable epoch)
//! pit_max_rate = "50MiB/s"            # optional cap on each PIT's reads and uploads
//! max_rate = "200MiB/s"               # optional cap on replication data taken in, all agents together
//! log_level = "info"                  # optional log filter of `serve` (RUST_LOG wins); live on SIGHUP
//! gc_interval = "1h"                  # optional; how often `serve` applies retention and runs gc ("0s": never)
//! metrics_listen = "127.0.0.1:9650"   # optional; where `serve` serves /metrics and the status page (TCP; "off": nowhere)
//!
//! [[volume]]                          # optional: a block device or file as one volume's staging
//! server = "web-1"
//! volume = "root"
//! path = "/dev/vg0/web-1-root"
//!
//! [s3]                                # optional, only with an s3:// store
//! endpoint = "http://127.0.0.1:9000"  # an S3-compatible server (path-style requests); default AWS
//! region = "eu-west-1"                # default AWS_REGION / AWS_DEFAULT_REGION; us-east-1 with an endpoint
//! allow_http = true                   # allow a plain-HTTP endpoint; default AWS_ALLOW_HTTP, else false
//! access_key_id = "AKIA..."           # static credentials: both or neither; default the
//! secret_access_key_file = "s3.secret" #  AWS environment (AWS_ACCESS_KEY_ID, ..., instance role)
//!
//! [retention]                         # optional; these are the defaults (AWS DRS's)
//! keep_last = 1                       # the newest N PITs (at least 1)
//! keep_within = "1h"                  # every PIT younger than this
//! keep_hourly = 24                    # the newest PIT of each of the last N hours holding one
//! keep_daily = 7                      # ... days
//! keep_weekly = 0                     # ... ISO weeks
//! keep_monthly = 0                    # ... months
//!
//! [[retention_override]]              # optional: other rules for one volume; unset keys
//! server = "web-1"                    # come from [retention]
//! volume = "root"
//! keep_daily = 30
//! ```
//!
//! # `[s3]`
//! Settings here win over the `AWS_*` environment (see [`crate::store`]). The
//! secret key is never written in this file, which `init` makes world-readable
//! and operators paste into tickets: `secret_access_key_file` names a file
//! (mode 0600, relative to `D`) holding it; surrounding whitespace is ignored.
//!
//! # Retention
//! See [`crate::retention`] for what the rules mean and [`crate::gc`] for
//! what `gc` does with them.
//!
//! # `tls_name`
//! Agents verify the receiver certificate against `tls_name`, so it must be one of
//! the certificate's subject alternative names. `init` makes that so by putting
//! the `advertise` host into the certificate and writing it as `tls_name`; a file
//! without `tls_name` gets `localhost`, which every receiver certificate carries.
//! Trust rests on the private CA in the bundle (it signs nothing but this
//! receiver's certificate), so the name check is a second line, not the first.
//!
//! Relative paths (`staging_dir`, `[[volume]].path`) are relative to `D`.

use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lifeboat_protocol::{ServerName, VolumeName};
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::retention::RetentionPolicy;
use crate::store::{S3Credentials, S3Settings, Store, StoreUrl};

/// The configuration file's name inside the receiver directory.
pub const CONFIG_FILE: &str = "receiver.toml";

/// The default `tls_name`: every receiver certificate carries it.
pub const DEFAULT_TLS_NAME: &str = "localhost";

/// Errors loading or saving `receiver.toml`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("{} is missing: is {} a receiver directory made by `lifeboat-receiver init`?", path.display(), dir.display())]
    Missing {
        /// The configuration file.
        path: PathBuf,
        /// The receiver directory.
        dir: PathBuf,
    },
    /// `save_new` found a file already there.
    #[error("{} already exists (refusing to overwrite it)", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The configuration file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type...).
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
        /// What is wrong.
        reason: String,
    },
}

/// When the receiver makes applied data durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// `fdatasync` the staging volume and its index before every acknowledgement:
    /// nothing acknowledged to an agent can be lost by a crash or power cut.
    /// The only policy for now; the type leaves room for others.
    #[default]
    Always,
}

/// A `[[volume]]` entry: one source volume's staging on a chosen file or device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeStaging {
    /// The source server.
    pub server: ServerName,
    /// The volume on that server.
    pub volume: VolumeName,
    /// Block device or file used as its staging volume (relative to the receiver directory).
    pub path: PathBuf,
}

/// The `[s3]` table: how to reach an `s3://` store (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint of an S3-compatible server (`http(s)://host:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The bucket's region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Whether a plain-HTTP endpoint is allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_http: Option<bool>,
    /// Access key id of static credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// File holding the secret access key (relative to the receiver directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
}

impl S3Config {
    fn check(&self) -> Result<(), String> {
        if let Some(e) = &self.endpoint {
            let rest = e
                .strip_prefix("https://")
                .or_else(|| e.strip_prefix("http://"))
                .ok_or_else(|| {
                    format!("[s3] endpoint = {e:?}: expected http://host:port or https://host")
                })?;
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("[s3] endpoint = {e:?} has no host"));
            }
        }
        if let Some(r) = &self.region {
            if r.is_empty() || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!("[s3] region = {r:?}: expected e.g. \"eu-west-1\""));
            }
        }
        match (&self.access_key_id, &self.secret_access_key_file) {
            (Some(id), Some(_)) if id.trim().is_empty() => {
                Err("[s3] access_key_id is empty".to_string())
            }
            (Some(_), None) => Err(
                "[s3] access_key_id needs secret_access_key_file (a file holding the secret key)"
                    .to_string(),
            ),
            (None, Some(_)) => Err("[s3] secret_access_key_file needs access_key_id".to_string()),
            _ => Ok(()),
        }
    }

    /// The store settings, reading the secret key file (relative to `dir`).
    pub fn settings(&self, dir: &Path) -> Result<S3Settings, ConfigError> {
        let credentials = match (&self.access_key_id, &self.secret_access_key_file) {
            (Some(id), Some(file)) => {
                let path = dir.join(file);
                let text = fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                    path: path.clone(),
                    source,
                })?;
                let secret = text.trim();
                if secret.is_empty() {
                    return Err(ConfigError::Invalid {
                        path,
                        reason: "the secret access key file is empty".to_string(),
                    });
                }
                Some(S3Credentials {
                    access_key_id: id.trim().to_string(),
                    secret_access_key: secret.to_string(),
                })
            }
            _ => None,
        };
        Ok(S3Settings {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            allow_http: self.allow_http,
            credentials,
        })
    }
}

/// Retention keys, as in `[retention]` and `[[retention_override]]`: each
/// unset key falls back to the next level (override → `[retention]` →
/// [`RetentionPolicy::default`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRules {
    /// The newest N PITs (at least 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Every PIT younger than this duration ("1h", "90m"; "0s": off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
    /// The newest PIT of each of the last N hours holding one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// The newest PIT of each of the last N days holding one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// The newest PIT of each of the last N ISO weeks holding one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// The newest PIT of each of the last N months holding one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
}

impl RetentionRules {
    fn is_empty(&self) -> bool {
        *self == RetentionRules::default()
    }

    /// `base` with the keys set here replaced; the error names the key.
    pub fn apply_to(&self, base: &RetentionPolicy) -> Result<RetentionPolicy, String> {
        let keep_within = match &self.keep_within {
            None => base.keep_within,
            Some(text) => humantime::parse_duration(text.trim())
                .map_err(|e| format!("keep_within = {text:?}: {e} (e.g. \"1h\", \"90m\")"))?,
        };
        let policy = RetentionPolicy {
            keep_last: self.keep_last.unwrap_or(base.keep_last),
            keep_within,
            keep_hourly: self.keep_hourly.unwrap_or(base.keep_hourly),
            keep_daily: self.keep_daily.unwrap_or(base.keep_daily),
            keep_weekly: self.keep_weekly.unwrap_or(base.keep_weekly),
            keep_monthly: self.keep_monthly.unwrap_or(base.keep_monthly),
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// A `[[retention_override]]` entry: other retention rules for one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionOverride {
    /// The source server.
    pub server: ServerName,
    /// The volume on that server.
    pub volume: VolumeName,
    /// See [`RetentionRules::keep_last`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// See [`RetentionRules::keep_within`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
    /// See [`RetentionRules::keep_hourly`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// See [`RetentionRules::keep_daily`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// See [`RetentionRules::keep_weekly`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// See [`RetentionRules::keep_monthly`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
}

impl RetentionOverride {
    /// The keys this override sets.
    pub fn rules(&self) -> RetentionRules {
        RetentionRules {
            keep_last: self.keep_last,
            keep_within: self.keep_within.clone(),
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
        }
    }
}

/// The parsed `receiver.toml` (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReceiverConfig {
    /// Where `serve` binds.
    pub listen: SocketAddr,
    /// `host:port` written into bundles; agents connect there.
    pub advertise: String,
    /// The name agents verify the receiver certificate against.
    pub tls_name: String,
    /// Where staging volumes live, instead of `D/staging`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging_dir: Option<PathBuf>,
    /// The durability policy.
    pub fsync: FsyncPolicy,
    /// Where PITs are stored (`file:///abs`, `/abs` or `s3://bucket/prefix`),
    /// instead of `D/store`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// How often a PIT is taken of each volume, at the first durable epoch
    /// after the interval (e.g. "10m", DRS's default; "0s": at every durable
    /// epoch). `None` means the default, [`DEFAULT_PIT_INTERVAL`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pit_interval: Option<String>,
    /// Cap on the rate at which a PIT reads blocks and uploads them to the
    /// store (bytes of block data per second, e.g. "50MiB/s"), so snapshots do
    /// not starve the link to the store or the staging disk; `None`: no cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pit_max_rate: Option<String>,
    /// Cap on the replication data this receiver takes in, all agents together
    /// (bytes of block frames per second, e.g. "200MiB/s"); agents are slowed
    /// down by QUIC flow control. `None`: no cap. Reloaded on SIGHUP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<String>,
    /// The log filter of `serve` (e.g. "info", "lifeboat_receiver=debug,info")
    /// unless RUST_LOG sets one; reloaded on SIGHUP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// How to reach an `s3://` store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
    /// How often `serve` applies retention and collects garbage (e.g. "1h";
    /// "0s": never, run `lifeboat-receiver gc` yourself). `None` means the
    /// default, [`DEFAULT_GC_INTERVAL`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc_interval: Option<String>,
    /// Where `serve` serves `/metrics`, the status page and its JSON API
    /// (TCP `host:port`, or `"off"`). `None` means the default,
    /// [`DEFAULT_METRICS_LISTEN`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// `[limits]`: caps that keep one peer from harming the others.
    #[serde(skip_serializing_if = "Limits::is_default")]
    pub limits: Limits,
    /// Per-volume staging overrides.
    #[serde(rename = "volume", skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeStaging>,
    /// `[retention]`: the rules for every volume without an override.
    #[serde(skip_serializing_if = "RetentionRules::is_empty")]
    pub retention: RetentionRules,
    /// `[[retention_override]]`: per-volume rules.
    #[serde(rename = "retention_override", skip_serializing_if = "Vec::is_empty")]
    pub retention_overrides: Vec<RetentionOverride>,
}

/// The file as written, before defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    advertise: Option<String>,
    tls_name: Option<String>,
    staging_dir: Option<PathBuf>,
    #[serde(default)]
    fsync: FsyncPolicy,
    store: Option<String>,
    pit_interval: Option<String>,
    pit_max_rate: Option<String>,
    max_rate: Option<String>,
    log_level: Option<String>,
    s3: Option<S3Config>,
    gc_interval: Option<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    limits: Limits,
    #[serde(default, rename = "volume")]
    volumes: Vec<VolumeStaging>,
    #[serde(default)]
    retention: RetentionRules,
    #[serde(default, rename = "retention_override")]
    retention_overrides: Vec<RetentionOverride>,
}

/// `[limits]` of receiver.toml: what one peer may take (defaults in the
/// `DEFAULT_*` constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections served at once, all agents together; more are refused
    /// during the QUIC handshake.
    pub max_connections: u32,
    /// Connections one source server (one certificate name) may hold at once
    /// (an agent uses one per volume); more are closed at once.
    pub max_connections_per_server: u32,
    /// Volumes one source server may create on this receiver; a Hello for a
    /// new volume beyond it is rejected (existing volumes keep working).
    pub max_volumes_per_server: u32,
}

/// Default [`Limits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Default [`Limits::max_connections_per_server`].
pub const DEFAULT_MAX_CONNECTIONS_PER_SERVER: u32 = 64;
/// Default [`Limits::max_volumes_per_server`].
pub const DEFAULT_MAX_VOLUMES_PER_SERVER: u32 = 256;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_server: DEFAULT_MAX_CONNECTIONS_PER_SERVER,
            max_volumes_per_server: DEFAULT_MAX_VOLUMES_PER_SERVER,
        }
    }
}

impl Limits {
    fn is_default(&self) -> bool {
        *self == Limits::default()
    }

    fn check(&self) -> Result<(), String> {
        for (key, v) in [
            ("max_connections", self.max_connections),
            (
                "max_connections_per_server",
                self.max_connections_per_server,
            ),
            ("max_volumes_per_server", self.max_volumes_per_server),
        ] {
            if v == 0 {
                return Err(format!("[limits] {key} = 0: must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Parses a data rate such as `50MiB/s` (or `50MiB`): above zero.
fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    match lifeboat_protocol::geometry::parse_size(t) {
        Ok(0) => Err("the rate must be above zero".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("not a rate (e.g. \"50MiB/s\")".into()),
    }
}

/// Where `serve` serves metrics and the status page by default: loopback
/// only, so nothing is exposed unless an operator says so.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9650";

/// Parses a `metrics_listen` value: a socket address, or `off` (`None`).
pub fn parse_metrics_listen(text: &str) -> Result<Option<SocketAddr>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    t.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("{t:?} is not host:port with an IP address (e.g. \"127.0.0.1:9650\") nor \"off\"")
    })
}

/// DRS's default PIT interval: ten minutes.
pub const DEFAULT_PIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// How often `serve` runs retention and gc by default: hourly.
pub const DEFAULT_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Splits `host:port` (IPv6 hosts in brackets); `None` if it is not of that form.
/// The host comes back without brackets.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty()).then_some((host, port))
}

impl ReceiverConfig {
    /// A configuration with defaults: `advertise` = `listen`, `tls_name` =
    /// [`DEFAULT_TLS_NAME`], staging under `D/staging`, fsync always.
    pub fn new(listen: SocketAddr) -> ReceiverConfig {
        ReceiverConfig {
            listen,
            advertise: listen.to_string(),
            tls_name: DEFAULT_TLS_NAME.to_string(),
            staging_dir: None,
            fsync: FsyncPolicy::Always,
            store: None,
            pit_interval: None,
            pit_max_rate: None,
            max_rate: None,
            log_level: None,
            s3: None,
            gc_interval: None,
            metrics_listen: None,
            volumes: Vec::new(),
            retention: RetentionRules::default(),
            retention_overrides: Vec::new(),
            limits: Limits::default(),
        }
    }

    /// `D/receiver.toml`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(CONFIG_FILE)
    }

    /// Reads and checks `D/receiver.toml`.
    pub fn load(dir: &Path) -> Result<ReceiverConfig, ConfigError> {
        Self::load_file(&Self::path(dir), dir)
    }

    /// Reads and checks the configuration at `path` (`--config`; usually
    /// `D/receiver.toml`) for the receiver directory `dir`.
    pub fn load_file(path: &Path, dir: &Path) -> Result<ReceiverConfig, ConfigError> {
        let path = path.to_path_buf();
        let text = fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::Missing {
                    path: path.clone(),
                    dir: dir.to_path_buf(),
                }
            } else {
                ConfigError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ParseError::Syntax(message) => ConfigError::Syntax { path, message },
            ParseError::Invalid(reason) => ConfigError::Invalid { path, reason },
        })
    }

    pub(crate) fn from_toml(text: &str) -> Result<ReceiverConfig, ParseError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ParseError::Syntax(e.to_string().trim().into()))?;
        let config = ReceiverConfig {
            listen: raw.listen,
            advertise: raw.advertise.unwrap_or_else(|| raw.listen.to_string()),
            tls_name: raw.tls_name.unwrap_or_else(|| DEFAULT_TLS_NAME.into()),
            staging_dir: raw.staging_dir,
            fsync: raw.fsync,
            store: raw.store,
            pit_interval: raw.pit_interval,
            pit_max_rate: raw.pit_max_rate,
            max_rate: raw.max_rate,
            log_level: raw.log_level,
            s3: raw.s3,
            gc_interval: raw.gc_interval,
            metrics_listen: raw.metrics_listen,
            volumes: raw.volumes,
            retention: raw.retention,
            retention_overrides: raw.retention_overrides,
            limits: raw.limits,
        };
        config.check().map_err(ParseError::Invalid)?;
        Ok(config)
    }

    /// Checks what serde cannot (`advertise` is `host:port` with a port other than
    /// 0, `tls_name` is a DNS name or IP, no volume or path appears twice); errors
    /// name `D/receiver.toml`.
    pub fn validate(&self, dir: &Path) -> Result<(), ConfigError> {
        self.check().map_err(|reason| ConfigError::Invalid {
            path: Self::path(dir),
            reason,
        })
    }

    fn check(&self) -> Result<(), String> {
        self.limits.check()?;
        match split_host_port(&self.advertise) {
            Some((_, 0)) => {
                return Err(format!(
                    "advertise = {:?}: port 0 cannot be reached by agents",
                    self.advertise
                ))
            }
            Some(_) => {}
            None => {
                return Err(format!(
                    "advertise = {:?} is not host:port (write IPv6 as [addr]:port)",
                    self.advertise
                ))
            }
        }
        if rustls::pki_types::ServerName::try_from(self.tls_name.as_str()).is_err() {
            return Err(format!(
                "tls_name = {:?} is neither a DNS name nor an IP address",
                self.tls_name
            ));
        }
        if let Some(text) = &self.pit_interval {
            humantime::parse_duration(text.trim())
                .map_err(|e| format!("pit_interval = {text:?}: {e} (e.g. \"10m\", \"1h\")"))?;
        }
        if let Some(text) = &self.pit_max_rate {
            parse_rate(text).map_err(|e| format!("pit_max_rate = {text:?}: {e}"))?;
        }
        if let Some(text) = &self.max_rate {
            parse_rate(text).map_err(|e| format!("max_rate = {text:?}: {e}"))?;
        }
        if let Some(text) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(text.trim()).map_err(|e| {
                format!(
                    "log_level = {text:?}: {e} (e.g. \"info\", \"lifeboat_receiver=debug,info\")"
                )
            })?;
        }
        if let Some(text) = &self.gc_interval {
            humantime::parse_duration(text.trim()).map_err(|e| {
                format!("gc_interval = {text:?}: {e} (e.g. \"1h\", \"0s\" for never)")
            })?;
        }
        if let Some(text) = &self.metrics_listen {
            parse_metrics_listen(text).map_err(|e| format!("metrics_listen = {e}"))?;
        }
        let base = self
            .retention
            .apply_to(&RetentionPolicy::default())
            .map_err(|e| format!("[retention] {e}"))?;
        let mut overridden = HashSet::new();
        for o in &self.retention_overrides {
            let (s, v) = (o.server.as_str(), o.volume.as_str());
            if !overridden.insert((&o.server, &o.volume)) {
                return Err(format!(
                    "[[retention_override]] server = {s:?}, volume = {v:?} appears twice"
                ));
            }
            o.rules().apply_to(&base).map_err(|e| {
                format!("[[retention_override]] server = {s:?}, volume = {v:?}: {e}")
            })?;
        }
        if let Some(store) = &self.store {
            crate::store::StoreUrl::parse(store).map_err(|e| format!("store = {store:?}: {e}"))?;
        }
        if let Some(s3) = &self.s3 {
            s3.check()?;
            let is_s3 = self
                .store
                .as_deref()
                .is_some_and(|s| s.starts_with("s3://"));
            if !is_s3 {
                return Err(format!(
                    "[s3] is set but the PIT store is {}: set store = \"s3://bucket/prefix\" or remove [s3]",
                    match &self.store {
                        Some(s) => format!("{s:?}"),
                        None => "the local default (D/store)".to_string(),
                    }
                ));
            }
        }
        let mut ids = HashSet::new();
        let mut paths = HashSet::new();
        for v in &self.volumes {
            if !ids.insert((&v.server, &v.volume)) {
                return Err(format!(
                    "[[volume]] server = {:?}, volume = {:?} appears twice",
                    v.server.as_str(),
                    v.volume.as_str()
                ));
            }
            if !paths.insert(&v.path) {
                return Err(format!(
                    "[[volume]] path = {:?} is used by two volumes",
                    v.path
                ));
            }
        }
        Ok(())
    }

    /// The file's text: a comment header, then the settings.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("config fields all serialize to TOML");
        format!(
            "# Lifeboat receiver configuration (unknown keys are errors).\n\
             # listen: where `serve` binds. advertise: host:port written into enrollment bundles.\n\
             # tls_name: the name agents check the receiver certificate against; it must be a\n\
             #   subjectAltName of pki/server.pem. Optional: staging_dir = \"/path\" (default: staging/\n\
             #   here); [[volume]] tables with server, volume, path to put one volume's staging on a\n\
             #   block device or file. fsync = \"always\": fdatasync staging and index before every\n\
             #   acknowledgement. [retention] (keep_last, keep_within, keep_hourly, keep_daily,\n\
             #   keep_weekly, keep_monthly) and [[retention_override]] (server, volume, keys) say\n\
             #   which PITs gc keeps; gc_interval how often serve runs it.\n\
             {body}"
        )
    }

    /// Writes `D/receiver.toml` durably, refusing to overwrite an existing file.
    pub fn save_new(&self, dir: &Path) -> Result<(), ConfigError> {
        self.validate(dir)?;
        let path = Self::path(dir);
        fsutil::create_new(&path, self.to_toml().as_bytes(), 0o644).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                ConfigError::AlreadyExists { path: path.clone() }
            } else {
                ConfigError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })
    }

    /// The staging volume of `server`/`volume`: its `[[volume]]` path if one is
    /// configured, else `<staging_dir or D/staging>/<server>/<volume>.img`.
    /// Relative paths are taken relative to `dir`.
    pub fn staging_path(&self, dir: &Path, server: &ServerName, volume: &VolumeName) -> PathBuf {
        if let Some(v) = self
            .volumes
            .iter()
            .find(|v| &v.server == server && &v.volume == volume)
        {
            return dir.join(&v.path);
        }
        let base = match &self.staging_dir {
            Some(s) => dir.join(s),
            None => dir.join("staging"),
        };
        base.join(server.as_str())
            .join(format!("{}.img", volume.as_str()))
    }
}

impl ReceiverConfig {
    /// The interval between scheduled PITs.
    pub fn pit_interval(&self) -> std::time::Duration {
        self.pit_interval
            .as_deref()
            .and_then(|t| humantime::parse_duration(t.trim()).ok())
            .unwrap_or(DEFAULT_PIT_INTERVAL)
    }

    /// The receiver-wide cap on replication data, in bytes per second, if any.
    pub fn max_rate(&self) -> Option<u64> {
        self.max_rate.as_deref().and_then(|t| parse_rate(t).ok())
    }

    /// The cap on PIT upload rate, in bytes per second, if any.
    pub fn pit_max_rate(&self) -> Option<u64> {
        self.pit_max_rate
            .as_deref()
            .and_then(|t| parse_rate(t).ok())
    }

    /// Where `serve` serves metrics and the status page; `None` for "off".
    pub fn metrics_listen(&self) -> Option<SocketAddr> {
        parse_metrics_listen(
            self.metrics_listen
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )
        .unwrap_or(None)
    }

    /// How often `serve` runs retention and gc; `None` for "0s" (never).
    pub fn gc_interval(&self) -> Option<std::time::Duration> {
        let d = self
            .gc_interval
            .as_deref()
            .and_then(|t| humantime::parse_duration(t.trim()).ok())
            .unwrap_or(DEFAULT_GC_INTERVAL);
        (!d.is_zero()).then_some(d)
    }

    /// The retention policy of one volume: its `[[retention_override]]` over
    /// `[retention]` over the defaults. A file that failed validation falls
    /// back key by key to the level below (`load` refuses such files).
    pub fn retention_policy(&self, server: &ServerName, volume: &VolumeName) -> RetentionPolicy {
        let base = self
            .retention
            .apply_to(&RetentionPolicy::default())
            .unwrap_or_default();
        match self
            .retention_overrides
            .iter()
            .find(|o| &o.server == server && &o.volume == volume)
        {
            Some(o) => o.rules().apply_to(&base).unwrap_or(base),
            None => base,
        }
    }

    /// The PIT store's URL: `store` if set, else `D/store` (`D` made absolute).
    pub fn store_url(&self, dir: &Path) -> Result<crate::store::StoreUrl, String> {
        let text = match &self.store {
            Some(s) => s.clone(),
            None => {
                let abs = std::path::absolute(dir)
                    .map_err(|e| format!("cannot make {} absolute: {e}", dir.display()))?;
                format!("file://{}", abs.join("store").display())
            }
        };
        crate::store::StoreUrl::parse(&text).map_err(|e| e.to_string())
    }

    /// Opens the PIT store this file names ([`Self::store_url`]), with its
    /// `[s3]` settings. Every command that reads or writes PITs opens the
    /// store here.
    pub fn open_store(&self, dir: &Path) -> Result<Store, ConfigError> {
        let url = self.store_url(dir).map_err(|reason| ConfigError::Invalid {
            path: Self::path(dir),
            reason,
        })?;
        self.open_store_at(dir, &url)
    }

    /// Opens the store at `url` (e.g. a `--store` flag) with this file's
    /// `[s3]` settings if it is an S3 store; a local store ignores them.
    pub fn open_store_at(&self, dir: &Path, url: &StoreUrl) -> Result<Store, ConfigError> {
        let settings = match (url, &self.s3) {
            (StoreUrl::S3 { .. }, Some(s3)) => s3.settings(dir)?,
            _ => S3Settings::default(),
        };
        Store::open(url, &settings).map_err(|e| ConfigError::Invalid {
            path: Self::path(dir),
            reason: format!("cannot open the PIT store: {e}"),
        })
    }
}

/// Why [`ReceiverConfig::from_toml`] refused a text (before a path is known).
#[derive(Debug)]
pub(crate) enum ParseError {
    /// Not TOML of this schema: the parser's message.
    Syntax(String),
    /// A value is unusable: what is wrong, naming the key.
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) {
        fs::write(dir.join(CONFIG_FILE), text).unwrap();
    }

    #[test]
    fn round_trips_and_applies_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ReceiverConfig::new("127.0.0.1:7443".parse().unwrap());
        c.volumes.push(VolumeStaging {
            server: ServerName::new("web-1").unwrap(),
            volume: VolumeName::new("root").unwrap(),
            path: "/dev/vg0/web1-root".into(),
        });
        c.save_new(dir.path()).unwrap();
        assert_eq!(ReceiverConfig::load(dir.path()).unwrap(), c);

        write(dir.path(), "listen = \"[::]:7443\"\n");
        let c = ReceiverConfig::load(dir.path()).unwrap();
        assert_eq!(c.advertise, "[::]:7443");
        assert_eq!(c.tls_name, "localhost");
        assert_eq!(c.fsync, FsyncPolicy::Always);
    }

    #[test]
    fn metrics_listen_defaults_to_loopback_and_is_checked() {
        let listen = "listen = \"127.0.0.1:7443\"\n";
        let c = ReceiverConfig::from_toml(listen).expect("parses");
        assert_eq!(c.metrics_listen(), Some("127.0.0.1:9650".parse().unwrap()));
        let c = ReceiverConfig::from_toml(&format!("{listen}metrics_listen = \"[::1]:0\"\n"))
            .expect("parses");
        assert_eq!(c.metrics_listen(), Some("[::1]:0".parse().unwrap()));
        let c = ReceiverConfig::from_toml(&format!("{listen}metrics_listen = \"off\"\n"))
            .expect("parses");
        assert_eq!(c.metrics_listen(), None);
        match ReceiverConfig::from_toml(&format!("{listen}metrics_listen = \"localhost\"\n")) {
            Err(ParseError::Invalid(m)) => assert!(m.contains("metrics_listen"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn save_new_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let c = ReceiverConfig::new("127.0.0.1:7443".parse().unwrap());
        c.save_new(dir.path()).unwrap();
        let e = c.save_new(dir.path()).unwrap_err();
        assert!(matches!(e, ConfigError::AlreadyExists { .. }), "{e:?}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "listen = \"127.0.0.1:7443\"\nfsync_policy = \"never\"\n",
        );
        let e = ReceiverConfig::load(dir.path()).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("fsync_policy"), "{msg}");
        assert!(msg.contains(CONFIG_FILE), "{msg}");

        write(
            dir.path(),
            "listen = \"127.0.0.1:7443\"\n[[volume]]\nserver = \"a\"\nvolume = \"b\"\npath = \"/x\"\nsize = 3\n",
        );
        let msg = ReceiverConfig::load(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("size"), "{msg}");

        write(
            dir.path(),
            "listen = \"127.0.0.1:7443\"\nfsync = \"never\"\n",
        );
        let msg = ReceiverConfig::load(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("never"), "{msg}");
    }

    #[test]
    fn rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let e = ReceiverConfig::load(dir.path()).unwrap_err();
        assert!(matches!(e, ConfigError::Missing { .. }), "{e:?}");

        for text in [
            "listen = \"127.0.0.1:7443\"\nadvertise = \"nohost\"\n",
            "listen = \"127.0.0.1:7443\"\nadvertise = \"h:0\"\n",
            "listen = \"127.0.0.1:7443\"\ntls_name = \"bad name\"\n",
            "listen = \"127.0.0.1:7443\"\n[[volume]]\nserver = \"a\"\nvolume = \"b\"\npath = \"/x\"\n\
             [[volume]]\nserver = \"a\"\nvolume = \"b\"\npath = \"/y\"\n",
            "listen = \"127.0.0.1:7443\"\n[[volume]]\nserver = \"a\"\nvolume = \"b\"\npath = \"/x\"\n\
             [[volume]]\nserver = \"a\"\nvolume = \"c\"\npath = \"/x\"\n",
        ] {
            write(dir.path(), text);
            let e = ReceiverConfig::load(dir.path()).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{text}: {e:?}");
        }
        write(
            dir.path(),
            "listen = \"127.0.0.1:7443\"\n[[volume]]\nserver = \"../etc\"\nvolume = \"b\"\npath = \"/x\"\n",
        );
        let e = ReceiverConfig::load(dir.path()).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
    }

    #[test]
    fn staging_paths() {
        let d = Path::new("/var/lib/lifeboat");
        let s = ServerName::new("web-1").unwrap();
        let root = VolumeName::new("root").unwrap();
        let data = VolumeName::new("data").unwrap();
        let mut c = ReceiverConfig::new("127.0.0.1:7443".parse().unwrap());
        assert_eq!(
            c.staging_path(d, &s, &root),
            Path::new("/var/lib/lifeboat/staging/web-1/root.img")
        );
        c.staging_dir = Some("/srv/stage".into());
        c.volumes.push(VolumeStaging {
            server: s.clone(),
            volume: data.clone(),
            path: "/dev/vg0/web1-data".into(),
        });
        assert_eq!(
            c.staging_path(d, &s, &root),
            Path::new("/srv/stage/web-1/root.img")
        );
        assert_eq!(
            c.staging_path(d, &s, &data),
            Path::new("/dev/vg0/web1-data")
        );
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("a.b:1"), Some(("a.b", 1)));
        assert_eq!(split_host_port("[::1]:7443"), Some(("::1", 7443)));
        assert_eq!(split_host_port("::1:7443"), None);
        assert_eq!(split_host_port(":7443"), None);
        assert_eq!(split_host_port("host"), None);
    }

    #[test]
    fn pit_max_rate_is_optional_and_checked() {
        let listen = "listen = \"127.0.0.1:7443\"\n";
        let c = ReceiverConfig::from_toml(listen).expect("parse");
        assert_eq!(c.pit_max_rate(), None);
        let c = ReceiverConfig::from_toml(&format!("{listen}pit_max_rate = \"16MiB/s\"\n"))
            .expect("parse");
        assert_eq!(c.pit_max_rate(), Some(16 << 20));
        assert!(c.to_toml().contains("pit_max_rate = \"16MiB/s\""));
        assert_eq!(c.max_rate(), None);
        let c = ReceiverConfig::from_toml(&format!("{listen}max_rate = \"200MiB/s\"\n"))
            .expect("parse");
        assert_eq!(c.max_rate(), Some(200 << 20));
        match ReceiverConfig::from_toml(&format!("{listen}log_level = \"lifeboat=[\"\n")) {
            Err(ParseError::Invalid(reason)) => assert!(reason.contains("log_level"), "{reason}"),
            _ => panic!("a bad log_level must be rejected"),
        }
        match ReceiverConfig::from_toml(&format!("{listen}max_rate = \"lots\"\n")) {
            Err(ParseError::Invalid(reason)) => assert!(reason.contains("max_rate"), "{reason}"),
            _ => panic!("max_rate = \"lots\" must be rejected"),
        }
        for bad in ["0MiB/s", "fast", "-1"] {
            match ReceiverConfig::from_toml(&format!("{listen}pit_max_rate = \"{bad}\"\n")) {
                Err(ParseError::Invalid(reason)) => {
                    assert!(reason.contains("pit_max_rate"), "{reason}")
                }
                _ => panic!("pit_max_rate = {bad:?} must be rejected"),
            }
        }
    }

    #[test]
    fn store_key_is_optional_checked_and_defaults_under_dir() {
        let listen = "listen = \"127.0.0.1:7443\"\n";
        let c = ReceiverConfig::from_toml(listen).expect("parses");
        assert_eq!(c.store, None);
        assert_eq!(
            c.store_url(Path::new("/var/lib/lb")).expect("url"),
            crate::store::StoreUrl::Local {
                root: "/var/lib/lb/store".into()
            }
        );
        let c = ReceiverConfig::from_toml(&format!("{listen}store = \"file:///srv/pits\"\n"))
            .expect("parses");
        assert_eq!(c.store.as_deref(), Some("file:///srv/pits"));
        assert!(c.to_toml().contains("store = \"file:///srv/pits\""));
        assert_eq!(
            c.store_url(Path::new("/x")).expect("url"),
            crate::store::StoreUrl::Local {
                root: "/srv/pits".into()
            }
        );
        match ReceiverConfig::from_toml(&format!("{listen}store = \"relative/path\"\n")) {
            Err(ParseError::Invalid(reason)) => assert!(reason.contains("store"), "{reason}"),
            _ => panic!("a relative store must be rejected"),
        }
    }

    #[test]
    fn s3_table_parses_round_trips_and_reads_the_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = "listen = \"127.0.0.1:7443\"\nstore = \"s3://dr-bucket/prod\"\n\
                    [s3]\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"eu-west-1\"\n\
                    allow_http = true\naccess_key_id = \"AKID\"\n\
                    secret_access_key_file = \"s3.secret\"\n";
        write(dir.path(), text);
        let c = ReceiverConfig::load(dir.path()).unwrap();
        let s3 = c.s3.clone().expect("[s3]");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s3.allow_http, Some(true));
        assert_eq!(
            ReceiverConfig::from_toml(&c.to_toml()).ok(),
            Some(c.clone())
        );

        // The secret file is read relative to D, trimmed; missing is an error naming it.
        let e = s3.settings(dir.path()).unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("s3.secret"), "{e}");
        fs::write(dir.path().join("s3.secret"), "  s3cr3t\n").unwrap();
        let settings = s3.settings(dir.path()).unwrap();
        let creds = settings.credentials.clone().expect("credentials");
        assert_eq!(creds.access_key_id, "AKID");
        assert_eq!(creds.secret_access_key, "s3cr3t");
        assert!(
            !format!("{settings:?}").contains("s3cr3t"),
            "Debug shows the secret"
        );
        fs::write(dir.path().join("s3.secret"), "\n").unwrap();
        let e = s3.settings(dir.path()).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");

        // Opens without network IO; a local --store ignores [s3].
        fs::write(dir.path().join("s3.secret"), "s3cr3t").unwrap();
        let store = c.open_store(dir.path()).unwrap();
        assert_eq!(store.url(), "s3://dr-bucket/prod");
        assert_eq!(store.via(), " (endpoint http://127.0.0.1:9000)");
        let local = StoreUrl::parse(&dir.path().join("pits").display().to_string()).unwrap();
        let store = c.open_store_at(dir.path(), &local).unwrap();
        assert!(store.url().starts_with("file://"), "{}", store.url());
        assert_eq!(store.via(), "");
    }

    #[test]
    fn s3_table_errors_name_the_key() {
        let s3_store = "listen = \"127.0.0.1:7443\"\nstore = \"s3://dr-bucket/prod\"\n";
        // Unknown keys, including an inline secret.
        for key in ["secret_access_key", "endpiont"] {
            match ReceiverConfig::from_toml(&format!("{s3_store}[s3]\n{key} = \"x\"\n")) {
                Err(ParseError::Syntax(m)) => assert!(m.contains(key), "{m}"),
                _ => panic!("[s3] {key} must be rejected"),
            }
        }
        for (text, needle) in [
            (
                "listen = \"127.0.0.1:7443\"\n[s3]\nregion = \"eu-west-1\"\n".to_string(),
                "local default",
            ),
            (
                "listen = \"127.0.0.1:7443\"\nstore = \"file:///srv/x\"\n[s3]\n".to_string(),
                "file:///srv/x",
            ),
            (
                format!("{s3_store}[s3]\nendpoint = \"127.0.0.1:9000\"\n"),
                "endpoint",
            ),
            (
                format!("{s3_store}[s3]\nendpoint = \"http://\"\n"),
                "no host",
            ),
            (format!("{s3_store}[s3]\nregion = \"eu west\"\n"), "region"),
            (
                format!("{s3_store}[s3]\naccess_key_id = \"AKID\"\n"),
                "secret_access_key_file",
            ),
            (
                format!("{s3_store}[s3]\nsecret_access_key_file = \"f\"\n"),
                "access_key_id",
            ),
        ] {
            match ReceiverConfig::from_toml(&text) {
                Err(ParseError::Invalid(reason)) => {
                    assert!(reason.contains("[s3]"), "{text}: {reason}");
                    assert!(reason.contains(needle), "{text}: {reason}");
                }
                _ => panic!("{text}: must be rejected"),
            }
        }
    }

    #[test]
    fn retention_defaults_overrides_and_errors() {
        let listen = "listen = \"127.0.0.1:7443\"\n";
        let (web, data, root) = (
            ServerName::new("web-1").unwrap(),
            VolumeName::new("data").unwrap(),
            VolumeName::new("root").unwrap(),
        );
        let c = ReceiverConfig::from_toml(listen).expect("parses");
        assert_eq!(c.retention_policy(&web, &data), RetentionPolicy::default());
        assert_eq!(c.gc_interval(), Some(DEFAULT_GC_INTERVAL));
        let text = c.to_toml();
        assert!(
            !text
                .lines()
                .any(|l| l.contains("retention") && !l.starts_with('#')),
            "{text}"
        );

        let text = format!(
            "{listen}gc_interval = \"0s\"\n\
             [retention]\nkeep_within = \"2h\"\nkeep_daily = 14\nkeep_weekly = 4\n\
             [[retention_override]]\nserver = \"web-1\"\nvolume = \"data\"\nkeep_daily = 30\nkeep_last = 3\n"
        );
        let c = ReceiverConfig::from_toml(&text).expect("parses");
        assert_eq!(c.gc_interval(), None);
        let base = c.retention_policy(&web, &root);
        assert_eq!(base.keep_within, std::time::Duration::from_secs(7200));
        assert_eq!(
            (
                base.keep_last,
                base.keep_hourly,
                base.keep_daily,
                base.keep_weekly
            ),
            (1, 24, 14, 4)
        );
        let over = c.retention_policy(&web, &data);
        assert_eq!(
            (over.keep_last, over.keep_daily, over.keep_weekly),
            (3, 30, 4)
        );
        assert_eq!(over.keep_within, base.keep_within);
        // It survives a round trip through the file.
        let dir = tempfile::tempdir().unwrap();
        c.save_new(dir.path()).unwrap();
        assert_eq!(ReceiverConfig::load(dir.path()).unwrap(), c);

        let bad = |extra: &str, needle: &str| {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), &format!("{listen}{extra}"));
            let msg = ReceiverConfig::load(dir.path()).unwrap_err().to_string();
            assert!(msg.contains(needle), "{extra}: {msg}");
        };
        bad("[retention]\nkeep_yearly = 3\n", "keep_yearly");
        bad("[retention]\nkeep_last = 0\n", "keep_last");
        bad("[retention]\nkeep_within = \"soon\"\n", "keep_within");
        bad("[retention]\nkeep_daily = -1\n", "keep_daily");
        bad("gc_interval = \"hourly\"\n", "gc_interval");
        bad(
            "[[retention_override]]\nserver = \"a\"\nvolume = \"b\"\nkeep_hours = 1\n",
            "keep_hours",
        );
        bad(
            "[[retention_override]]\nserver = \"a\"\nvolume = \"b\"\nkeep_last = 0\n",
            "server = \"a\", volume = \"b\": keep_last",
        );
        bad(
            "[[retention_override]]\nserver = \"a\"\nvolume = \"b\"\n\
             [[retention_override]]\nserver = \"a\"\nvolume = \"b\"\n",
            "appears twice",
        );
    }
}
