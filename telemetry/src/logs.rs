//! The log filter both binaries install, and its reload on SIGHUP.
//!
//! The filter comes from a flag (`--log-level`), else `RUST_LOG`, else the
//! configuration file's `log_level`, else [`DEFAULT_LOG_LEVEL`]; only one that
//! came from the file follows the file on SIGHUP.

use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The log filter when nothing sets one.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Where the log filter came from; SIGHUP changes it only if from the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LevelSource {
    Flag,
    Env,
    File,
}

/// The installed log filter and a handle to replace it.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    source: LevelSource,
    level: String,
}

impl LogControl {
    /// Installs the subscriber: the filter from `--log-level`, else
    /// `RUST_LOG`, else the file's `log_level`, else [`DEFAULT_LOG_LEVEL`].
    pub fn init(json: bool, flag: Option<String>, file: Option<&str>) -> LogControl {
        let env = std::env::var("RUST_LOG")
            .ok()
            .filter(|v| EnvFilter::try_new(v).is_ok());
        let (source, level) = match (flag, env) {
            (Some(f), _) => (LevelSource::Flag, f),
            (None, Some(e)) => (LevelSource::Env, e),
            (None, None) => (
                LevelSource::File,
                file.unwrap_or(DEFAULT_LOG_LEVEL).to_string(),
            ),
        };
        let filter =
            EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_LEVEL));
        let (filter, handle) = reload::Layer::new(filter);
        let registry = tracing_subscriber::registry().with(filter);
        let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        if json {
            registry.with(stderr.json()).init();
        } else {
            registry.with(stderr).init();
        }
        LogControl {
            handle,
            source,
            level,
        }
    }

    /// Applies the file's new `log_level` unless a flag or `RUST_LOG` set
    /// the filter.
    pub fn reload(&mut self, file: Option<&str>) {
        let pinned_by = match self.source {
            LevelSource::Flag => Some("--log-level"),
            LevelSource::Env => Some("RUST_LOG"),
            LevelSource::File => None,
        };
        if let Some(by) = pinned_by {
            warn!(
                "SIGHUP: log_level changed in the file, but {by} sets the log filter; keeping {:?}",
                self.level
            );
            return;
        }
        let new = file.unwrap_or(DEFAULT_LOG_LEVEL).to_string();
        // Said before the switch, so a quieter filter does not hide it.
        info!(old = %self.level, new = %new, "SIGHUP: log_level changed");
        match EnvFilter::try_new(&new)
            .map_err(|e| e.to_string())
            .and_then(|f| self.handle.reload(f).map_err(|e| e.to_string()))
        {
            Ok(()) => self.level = new,
            Err(e) => error!(
                "SIGHUP: cannot apply log_level = {new:?} ({e}); keeping {:?}",
                self.level
            ),
        }
    }
}
