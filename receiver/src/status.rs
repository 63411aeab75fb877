//! Per-volume replication status: what `lifeboat-receiver status` shows.
//!
//! ## The status file
//! Each session writes `state/<server>/<volume>.status.json` (one JSON object,
//! [`VolumeStatus`]) with [`fsutil::write_atomic`]: at session start, at most
//! once per second while something changed, at least every
//! [`HEARTBEAT`] while connected (so a live session never looks stale), and at
//! session end (`connected: false`, state `DISCONNECTED`). Only the session
//! that holds the volume writes it, and `status` only reads: it works whether
//! `serve` runs or not, and never needs a lock.
//!
//! ## Where the fields come from
//! - From the agent's [`Frame::Status`](lifeboat_protocol::Frame::Status)
//!   reports: `state`, `progress`, `lag_seconds`, `backlog_bytes`, `tracking`,
//!   `scan_interval_s` (`reported_by_agent: true` once one arrived).
//! - From the receiver itself: `epoch` (the replica's durable epoch),
//!   `generation`, geometry, staging path, `connected`, `last_contact` (the
//!   last frame from the agent, control or data stream).
//! - Sessions whose agent sends no reports (`lifeboat-agent sync`): the state
//!   is `INITIAL_SYNC` while the replica has never had an epoch closed,
//!   `RESCAN` for later passes (a pass is a scan + digest compare), with
//!   progress 0; once the pass's closing flush made an epoch durable the state
//!   is `CONTINUOUS` with progress 1 (the replica is consistent as of that
//!   epoch). Lag and backlog are 0 (the receiver cannot know them) and tracking
//!   is `one-shot`.
//!
//! ## Stale files
//! A file still saying `connected: true` whose newest of `last_contact` and
//! `updated_at` is older than [`STALE_AFTER`] belongs to a receiver that was
//! killed: [`VolumeStatus::as_seen_at`] shows it `DISCONNECTED`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lifeboat_protocol::frame::{AgentStatus, ReplicationState, TrackingMode, PROGRESS_PPM_MAX};
use lifeboat_protocol::{ServerName, VolumeGeometry, VolumeName};
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// Least time between two writes of a volume's status file.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest time between two writes while a session is connected.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A connected status not refreshed for this long is shown `DISCONNECTED`.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
/// Suffix of status files in `state/<server>/`.
pub const STATUS_SUFFIX: &str = ".status.json";

/// Replication state as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VolumeState {
    /// First full pass running.
    InitialSync,
    /// A later full scan running.
    Rescan,
    /// Replicating continuously (or, for a one-shot pass, consistent and done).
    Continuous,
    /// Continuous with lag above the agent's threshold.
    Backlog,
    /// Dirty blocks but no progress for a while.
    Stalled,
    /// No session.
    Disconnected,
}

impl VolumeState {
    /// The upper-case name.
    pub fn name(self) -> &'static str {
        match self {
            VolumeState::InitialSync => "INITIAL_SYNC",
            VolumeState::Rescan => "RESCAN",
            VolumeState::Continuous => "CONTINUOUS",
            VolumeState::Backlog => "BACKLOG",
            VolumeState::Stalled => "STALLED",
            VolumeState::Disconnected => "DISCONNECTED",
        }
    }
}

impl From<ReplicationState> for VolumeState {
    fn from(s: ReplicationState) -> Self {
        match s {
            ReplicationState::InitialSync => VolumeState::InitialSync,
            ReplicationState::Rescan => VolumeState::Rescan,
            ReplicationState::Continuous => VolumeState::Continuous,
            ReplicationState::Backlog => VolumeState::Backlog,
            ReplicationState::Stalled => VolumeState::Stalled,
        }
    }
}

/// How the agent tracks changes, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tracking {
    /// One pass, no tracking.
    OneShot,
    /// Block-layer tracepoints.
    Tracepoints,
    /// Periodic full scans.
    PeriodicScan,
    /// Writes seen in order through the agent's NBD export.
    NbdWriteOrder,
}

impl Tracking {
    /// The name (`one-shot`, `tracepoints`, `periodic-scan`, `nbd-write-order`).
    pub fn name(self) -> &'static str {
        match self {
            Tracking::OneShot => "one-shot",
            Tracking::Tracepoints => "tracepoints",
            Tracking::PeriodicScan => "periodic-scan",
            Tracking::NbdWriteOrder => "nbd-write-order",
        }
    }
}

impl From<TrackingMode> for Tracking {
    fn from(t: TrackingMode) -> Self {
        match t {
            TrackingMode::OneShot => Tracking::OneShot,
            TrackingMode::Tracepoints => Tracking::Tracepoints,
            TrackingMode::PeriodicScan => Tracking::PeriodicScan,
            TrackingMode::NbdWriteOrder => Tracking::NbdWriteOrder,
        }
    }
}

/// One volume's status file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// Source server.
    pub server: String,
    /// Volume name.
    pub volume: String,
    /// Replication state.
    pub state: VolumeState,
    /// Progress of the running pass, 0–1.
    pub progress: f64,
    /// Age of the oldest write not yet durable here, in seconds (agent's view).
    pub lag_seconds: f64,
    /// Bytes dirty on the source and not yet acknowledged (agent's view).
    pub backlog_bytes: u64,
    /// Last durable epoch of the replica.
    pub epoch: u64,
    /// Last frame from the agent, RFC 3339 UTC.
    pub last_contact: String,
    /// The same, in ms since the Unix epoch.
    pub last_contact_unix_ms: u64,
    /// How the agent tracks changes.
    pub tracking: Tracking,
    /// Interval of the agent's periodic scans, seconds (0 unless periodic-scan).
    pub scan_interval_s: u32,
    /// Whether a session is connected.
    pub connected: bool,
    /// Whether state, progress, lag and backlog come from the agent's reports
    /// (false: derived by the receiver, see the module docs).
    pub reported_by_agent: bool,
    /// The replica's generation.
    pub generation: u64,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// The staging volume.
    pub staging: String,
    /// When the receiver wrote this file, RFC 3339 UTC.
    pub updated_at: String,
    /// The same, in ms since the Unix epoch.
    pub updated_at_unix_ms: u64,
    /// The last error that stopped replication of this volume here (e.g. the
    /// staging filesystem full), until an epoch becomes durable again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it happened, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
}

impl VolumeStatus {
    /// The status as it should be shown at `now_unix_ms`: a connected status
    /// not refreshed for [`STALE_AFTER`] (the receiver was killed) becomes
    /// disconnected.
    pub fn as_seen_at(mut self, now_unix_ms: u64) -> VolumeStatus {
        let fresh = self.last_contact_unix_ms.max(self.updated_at_unix_ms);
        if self.connected && now_unix_ms.saturating_sub(fresh) > STALE_AFTER.as_millis() as u64 {
            self.connected = false;
            self.state = VolumeState::Disconnected;
        }
        self
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, e.g. `2025-01-31T12:00:00.250Z`.
pub fn rfc3339(unix_ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// Keeps one session's view of its volume's status and writes it (owned by the
/// session driver; not shared).
#[derive(Debug)]
pub struct StatusRecorder {
    path: PathBuf,
    status: VolumeStatus,
    dirty: bool,
    last_write: Option<Instant>,
}

impl StatusRecorder {
    /// A connected session's status for a replica with `durable_epoch` and
    /// `generation`; state as derived for an agent that sends no reports.
    pub fn new(
        path: PathBuf,
        server: &ServerName,
        volume: &VolumeName,
        geometry: VolumeGeometry,
        staging: &Path,
        durable_epoch: u64,
        generation: u64,
    ) -> StatusRecorder {
        let now = unix_ms(SystemTime::now());
        StatusRecorder {
            path,
            status: VolumeStatus {
                server: server.to_string(),
                volume: volume.to_string(),
                state: if durable_epoch == 0 {
                    VolumeState::InitialSync
                } else {
                    VolumeState::Rescan
                },
                progress: 0.0,
                lag_seconds: 0.0,
                backlog_bytes: 0,
                epoch: durable_epoch,
                last_contact: rfc3339(now),
                last_contact_unix_ms: now,
                tracking: Tracking::OneShot,
                scan_interval_s: 0,
                connected: true,
                reported_by_agent: false,
                generation,
                volume_bytes: geometry.volume_bytes,
                block_size: geometry.block_size.get(),
                staging: staging.display().to_string(),
                updated_at: String::new(),
                updated_at_unix_ms: 0,
                // An error that ended an earlier session stays shown until
                // replication works again.
                last_error: None,
                last_error_at: None,
            },
            dirty: true,
            last_write: None,
        }
        .keeping_error()
    }

    /// Carries over the error of the status file already at `path`.
    fn keeping_error(mut self) -> StatusRecorder {
        if let Some(old) = std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice::<VolumeStatus>(&b).ok())
        {
            self.status.last_error = old.last_error;
            self.status.last_error_at = old.last_error_at;
        }
        self
    }

    /// Replication of the volume failed here: shown until an epoch is durable.
    pub fn error(&mut self, message: &str) {
        self.status.last_error = Some(message.to_string());
        self.status.last_error_at = Some(rfc3339(unix_ms(SystemTime::now())));
        self.dirty = true;
    }

    fn clear_error(&mut self) {
        if self.status.last_error.is_some() {
            self.status.last_error = None;
            self.status.last_error_at = None;
            self.dirty = true;
        }
    }

    /// The current status.
    pub fn status(&self) -> &VolumeStatus {
        &self.status
    }

    /// A frame from the agent arrived now.
    pub fn contact(&mut self) {
        let now = unix_ms(SystemTime::now());
        self.status.last_contact_unix_ms = now;
        self.status.last_contact = rfc3339(now);
        self.dirty = true;
    }

    /// The agent reported its view.
    pub fn agent_report(&mut self, s: &AgentStatus) {
        self.status.state = s.state.into();
        self.status.progress = s.progress_ppm.min(PROGRESS_PPM_MAX) as f64 / 1e6;
        self.status.lag_seconds = s.lag_ms as f64 / 1000.0;
        self.status.backlog_bytes = s.backlog_bytes;
        self.status.tracking = s.tracking.into();
        self.status.scan_interval_s = s.scan_interval_s;
        self.status.reported_by_agent = true;
        self.dirty = true;
    }

    /// The replica's generation changed.
    pub fn generation(&mut self, generation: u64) {
        if self.status.generation != generation {
            self.status.generation = generation;
            self.dirty = true;
        }
    }

    /// An epoch became durable. Without agent reports this ends the pass.
    pub fn epoch_durable(&mut self, epoch: u64) {
        self.clear_error();
        self.status.epoch = self.status.epoch.max(epoch);
        if !self.status.reported_by_agent {
            self.status.state = VolumeState::Continuous;
            self.status.progress = 1.0;
        }
        self.dirty = true;
    }

    /// The session ended.
    pub fn disconnected(&mut self) {
        self.status.connected = false;
        self.status.state = VolumeState::Disconnected;
        self.dirty = true;
    }

    /// Whether [`write`](Self::write) is due at `now`: something changed and
    /// the last write is [`MIN_WRITE_INTERVAL`] old, or a heartbeat is due.
    pub fn due(&self, now: Instant) -> bool {
        match self.last_write {
            None => true,
            Some(t) => {
                let age = now.saturating_duration_since(t);
                (self.dirty && age >= MIN_WRITE_INTERVAL) || age >= HEARTBEAT
            }
        }
    }

    /// Writes the status file now (atomically; blocking IO).
    pub fn write(&mut self, now: Instant) -> std::io::Result<()> {
        let ms = unix_ms(SystemTime::now());
        self.status.updated_at_unix_ms = ms;
        self.status.updated_at = rfc3339(ms);
        let mut json = serde_json::to_vec_pretty(&self.status).map_err(std::io::Error::other)?;
        json.push(b'\n');
        fsutil::write_atomic(&self.path, &json, 0o644)?;
        self.dirty = false;
        self.last_write = Some(now);
        Ok(())
    }
}

/// One row of `status`: a volume's status, or why its file is unusable.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusRow {
    /// A readable status file.
    Volume(VolumeStatus),
    /// A status file that cannot be read or parsed.
    Unreadable {
        /// Server (its directory name).
        server: String,
        /// Volume (the file name without the suffix).
        volume: String,
        /// What went wrong, naming the file.
        error: String,
    },
}

impl StatusRow {
    fn key(&self) -> (&str, &str) {
        match self {
            StatusRow::Volume(v) => (&v.server, &v.volume),
            StatusRow::Unreadable { server, volume, .. } => (server, volume),
        }
    }

    /// The row as JSON: the status object, or `{server, volume, state:
    /// "UNKNOWN", error}`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            StatusRow::Volume(v) => serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
            StatusRow::Unreadable {
                server,
                volume,
                error,
            } => serde_json::json!({
                "server": server, "volume": volume, "state": "UNKNOWN", "error": error,
            }),
        }
    }
}

impl StatusRow {
    /// The inverse of [`to_json`](Self::to_json), for rows that came over the
    /// JSON API: `None` if the value is neither form.
    pub fn from_json(v: &serde_json::Value) -> Option<StatusRow> {
        if let Some(error) = v.get("error").and_then(|e| e.as_str()) {
            return Some(StatusRow::Unreadable {
                server: v.get("server")?.as_str()?.to_string(),
                volume: v.get("volume")?.as_str()?.to_string(),
                error: error.to_string(),
            });
        }
        serde_json::from_value::<VolumeStatus>(v.clone())
            .ok()
            .map(StatusRow::Volume)
    }
}

/// Reads every status file under `<dir>/state/*/`, as seen at `now_unix_ms`,
/// sorted by server then volume. A missing `state` directory means no volumes;
/// a missing `dir` is an error.
pub fn read_statuses(dir: &Path, now_unix_ms: u64) -> std::io::Result<Vec<StatusRow>> {
    std::fs::metadata(dir).map_err(|e| fsutil::with_path(dir, e))?;
    let state = dir.join("state");
    let servers = match std::fs::read_dir(&state) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(fsutil::with_path(&state, e)),
    };
    let mut rows = Vec::new();
    for server in servers {
        let server = server.map_err(|e| fsutil::with_path(&state, e))?;
        if !server.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let server_name = server.file_name().to_string_lossy().into_owned();
        let files =
            std::fs::read_dir(server.path()).map_err(|e| fsutil::with_path(&server.path(), e))?;
        for f in files {
            let f = f.map_err(|e| fsutil::with_path(&server.path(), e))?;
            let name = f.file_name().to_string_lossy().into_owned();
            let Some(volume) = name.strip_suffix(STATUS_SUFFIX) else {
                continue;
            };
            if volume.starts_with('.') {
                continue; // a write_atomic temporary file
            }
            let path = f.path();
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<VolumeStatus>(&b).map_err(|e| e.to_string())
                });
            rows.push(match parsed {
                Ok(v) => StatusRow::Volume(v.as_seen_at(now_unix_ms)),
                Err(e) => StatusRow::Unreadable {
                    server: server_name.clone(),
                    volume: volume.to_string(),
                    error: format!("cannot read status file {}: {e}", path.display()),
                },
            });
        }
    }
    rows.sort_by(|a, b| a.key().cmp(&b.key()));
    Ok(rows)
}

/// Bytes in binary units, e.g. `1.5 MiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The `status` table: a header and one line per row, columns aligned.
pub fn render_table(rows: &[StatusRow]) -> String {
    let header = [
        "SERVER",
        "VOLUME",
        "STATE",
        "PROGRESS",
        "LAG",
        "BACKLOG",
        "EPOCH",
        "LAST-CONTACT",
        "TRACKING",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for row in rows {
        lines.push(match row {
            StatusRow::Volume(v) => vec![
                v.server.clone(),
                v.volume.clone(),
                v.state.name().into(),
                format!("{:.1}%", v.progress * 100.0),
                format!("{:.1}s", v.lag_seconds),
                human_bytes(v.backlog_bytes),
                v.epoch.to_string(),
                v.last_contact.clone(),
                v.tracking.name().into(),
            ],
            StatusRow::Unreadable {
                server,
                volume,
                error,
            } => vec![
                server.clone(),
                volume.clone(),
                "UNKNOWN".into(),
                format!("error: {error}"),
            ],
        });
    }
    let cols = header.len();
    let mut width = vec![0usize; cols];
    for l in &lines {
        // An error message runs to the end of the line; it sets no width.
        if l.len() == cols {
            for (w, c) in width.iter_mut().zip(l) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    for l in &lines {
        let mut line = String::new();
        for (i, c) in l.iter().enumerate() {
            if i + 1 == l.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_protocol::BlockSize;

    fn recorder(dir: &Path, server: &str, volume: &str, epoch: u64) -> StatusRecorder {
        let g = VolumeGeometry::new(1 << 20, BlockSize::DEFAULT).unwrap();
        let state = dir.join("state").join(server);
        std::fs::create_dir_all(&state).unwrap();
        StatusRecorder::new(
            state.join(format!("{volume}{STATUS_SUFFIX}")),
            &ServerName::new(server).unwrap(),
            &VolumeName::new(volume).unwrap(),
            g,
            Path::new("/staging/x.img"),
            epoch,
            3,
        )
    }

    #[test]
    fn rfc3339_is_utc_with_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_250), "2023-11-14T22:13:20.250Z");
    }

    #[test]
    fn derived_states_for_sessions_without_reports() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = recorder(dir.path(), "web-1", "data", 0);
        assert_eq!(r.status().state, VolumeState::InitialSync);
        r.epoch_durable(1);
        assert_eq!(r.status().state, VolumeState::Continuous);
        assert_eq!((r.status().epoch, r.status().progress), (1, 1.0));
        let r = recorder(dir.path(), "web-1", "data", 4);
        assert_eq!(r.status().state, VolumeState::Rescan);
    }

    #[test]
    fn agent_reports_win_and_writes_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = recorder(dir.path(), "web-1", "data", 2);
        let t0 = Instant::now();
        assert!(r.due(t0));
        r.write(t0).unwrap();
        assert!(!r.due(t0), "nothing changed");
        r.agent_report(&AgentStatus {
            state: ReplicationState::Backlog,
            progress_ppm: 500_000,
            lag_ms: 2500,
            backlog_bytes: 3 << 20,
            tracking: TrackingMode::PeriodicScan,
            scan_interval_s: 30,
            sent_at_unix_ms: 0,
        });
        assert!(!r.due(t0 + Duration::from_millis(500)), "within a second");
        assert!(r.due(t0 + MIN_WRITE_INTERVAL));
        r.epoch_durable(3);
        assert_eq!(r.status().state, VolumeState::Backlog, "reports win");
        r.write(t0 + MIN_WRITE_INTERVAL).unwrap();
        assert!(r.due(t0 + MIN_WRITE_INTERVAL + HEARTBEAT), "heartbeat");

        let rows = read_statuses(dir.path(), unix_ms(SystemTime::now())).unwrap();
        let [StatusRow::Volume(v)] = &rows[..] else {
            panic!("{rows:?}")
        };
        assert_eq!(v.state, VolumeState::Backlog);
        assert_eq!(
            (v.progress, v.lag_seconds, v.backlog_bytes),
            (0.5, 2.5, 3 << 20)
        );
        assert_eq!(
            (v.tracking, v.scan_interval_s, v.epoch),
            (Tracking::PeriodicScan, 30, 3)
        );
        let j = rows[0].to_json();
        assert_eq!(j["state"], "BACKLOG");
        assert_eq!(j["tracking"], "periodic-scan");
        let table = render_table(&rows);
        assert!(table.starts_with("SERVER"), "{table}");
        assert!(
            table
                .lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                == [
                    "web-1",
                    "data",
                    "BACKLOG",
                    "50.0%",
                    "2.5s",
                    "3.0",
                    "MiB",
                    "3",
                    &v.last_contact,
                    "periodic-scan"
                ],
            "{table}"
        );
    }

    #[test]
    fn stale_connected_status_shows_disconnected_and_end_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = recorder(dir.path(), "web-1", "data", 1);
        r.write(Instant::now()).unwrap();
        let written = r.status().updated_at_unix_ms;
        let now = written + 1000;
        let rows = read_statuses(dir.path(), now).unwrap();
        assert!(
            matches!(&rows[0], StatusRow::Volume(v) if v.connected && v.state == VolumeState::Rescan)
        );
        let later = written + STALE_AFTER.as_millis() as u64 + 1;
        let rows = read_statuses(dir.path(), later).unwrap();
        assert!(
            matches!(&rows[0], StatusRow::Volume(v) if !v.connected && v.state == VolumeState::Disconnected)
        );
        r.disconnected();
        r.write(Instant::now()).unwrap();
        let rows = read_statuses(dir.path(), now).unwrap();
        assert!(
            matches!(&rows[0], StatusRow::Volume(v) if !v.connected && v.state == VolumeState::Disconnected)
        );
    }

    #[test]
    fn rows_are_sorted_and_corrupt_files_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_statuses(dir.path(), 0).unwrap(), vec![]);
        assert_eq!(render_table(&[]).lines().count(), 1);
        assert!(read_statuses(&dir.path().join("missing"), 0).is_err());
        recorder(dir.path(), "web-2", "a", 1)
            .write(Instant::now())
            .unwrap();
        recorder(dir.path(), "web-1", "b", 1)
            .write(Instant::now())
            .unwrap();
        recorder(dir.path(), "web-1", "a", 1)
            .write(Instant::now())
            .unwrap();
        let bad = dir.path().join("state/web-1/c.status.json");
        std::fs::write(&bad, b"{not json").unwrap();
        std::fs::write(dir.path().join("state/web-1/a.index"), b"x").unwrap();
        let rows = read_statuses(dir.path(), 0).unwrap();
        let keys: Vec<_> = rows.iter().map(|r| r.key()).collect();
        assert_eq!(
            keys,
            [
                ("web-1", "a"),
                ("web-1", "b"),
                ("web-1", "c"),
                ("web-2", "a")
            ]
        );
        let StatusRow::Unreadable { error, .. } = &rows[2] else {
            panic!("{rows:?}")
        };
        assert!(error.contains(&bad.display().to_string()), "{error}");
        let table = render_table(&rows);
        assert!(table.contains("c.status.json"), "{table}");
        assert_eq!(rows[2].to_json()["state"], "UNKNOWN");
        // Rows survive the JSON API unchanged.
        for row in &rows {
            assert_eq!(StatusRow::from_json(&row.to_json()).as_ref(), Some(row));
        }
        assert_eq!(StatusRow::from_json(&serde_json::json!({"x": 1})), None);
    }
}
