//! Kernel write tracking without a kernel module: the block layer's
//! `block:block_rq_complete` tracepoint, read as text through tracefs.
//!
//! # Design
//! Each [`WriteTracker`] owns a private tracefs *instance*
//! (`<tracefs>/instances/lifeboat-<pid>-<n>`): its own ring buffer, event
//! enables and filters, so several trackers (volumes, agents) and other tracing
//! users never see or disturb each other's events. In that instance it
//! - sizes the per-CPU ring buffer (`buffer_size_kb`),
//! - sets the event filter so the kernel records only this disk's completed
//!   requests that change data: `dev == <dev_t> && nr_sector > 0 && (rwbs ~ "*W*"
//!   || rwbs ~ "*D*" || rwbs ~ "*N*")` — writes (`W`, with any flush/FUA/sync
//!   flags), discards (`D`, `DE`) and write-zeroes, which the kernel prints as `N`
//!   (as it does other rare non-read ops; over-reporting only costs a re-send),
//! - enables the event and opens `trace_pipe` with `O_NONBLOCK`.
//!
//! [`WriteTracker::drain`] reads `trace_pipe` until it returns `EAGAIN`, so every
//! write whose completion was recorded before the call is returned: for an
//! `O_DIRECT` write, `write(2)` returns only after the completion tracepoint has
//! run, and for buffered writes the same holds once `fsync(2)` returned.
//!
//! # Partitions and request-based queues
//! The tracepoint reports the whole disk's `dev_t` and disk-relative sectors.
//! For a partition the filter names the parent disk and the partition's sector
//! window; ranges are then made partition-relative. Bio-based devices
//! (device-mapper, md, zram...) have no `mq` directory in sysfs and never fire
//! `block_rq_complete`: for them [`WriteTracker::start`] returns
//! [`TrackingError::Unavailable`] and the caller falls back to scans.
//!
//! # Lost events
//! Lost events must never mean lost data. A drain reports
//! [`TrackingError::Lost`] (after handing out what it read) when
//! - a CPU's `per_cpu/cpuN/stats` shows `overrun`, `commit overrun` or
//!   `dropped events` grown since the previous drain,
//! - the text contains a `CPU:N [LOST M EVENTS]` marker,
//! - a `block_rq_complete` line cannot be parsed (a write could hide behind it),
//! - a drain had to stop before the pipe was empty (see [`MAX_DRAIN_FACTOR`]).
//!
//! The instance is torn down on drop; instances left behind by a killed agent
//! (their pid is gone) are removed by the next [`WriteTracker::start`].

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Byte range written on the device: (offset, len).
pub type WrittenRange = (u64, u64);

/// Why tracking cannot start or why a drain is incomplete.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// Tracepoints cannot be used here (no tracefs, not root, not a block device,
    /// event missing...); the caller falls back to periodic scans.
    #[error("write tracking unavailable: {0}")]
    Unavailable(String),
    /// Events were lost (ring buffer overrun, dropped or unreadable events); the
    /// caller must rescan the volume.
    #[error("write tracking lost events (overrun {overrun}, dropped {dropped}): rescan needed")]
    Lost {
        /// Events overwritten in the ring buffer before they were read.
        overrun: u64,
        /// Events dropped by the kernel, plus events the tracker could not read.
        dropped: u64,
    },
    /// IO error reading or writing tracefs.
    #[error("tracefs IO error at {path}: {source}")]
    Io {
        /// The tracefs file involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Tunables of a [`WriteTracker`]; `Default` suits production.
#[derive(Debug, Clone, Default)]
pub struct TrackerOptions {
    /// Ring buffer size per CPU in KiB. `None`: 64 MiB spread over the CPUs,
    /// clamped to 1–8 MiB per CPU (an event takes about 60 bytes).
    pub buffer_size_kb: Option<u32>,
}

/// A drain stops (and reports [`TrackingError::Lost`]) after reading this many
/// times the ring buffer's total size in text: the kernel is then producing
/// events faster than they are read, and completeness cannot be promised.
pub const MAX_DRAIN_FACTOR: u64 = 16;

const TRACEFS_MOUNT: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";
const INSTANCE_PREFIX: &str = "lifeboat-";
const EVENT: &str = "block_rq_complete";
const SECTOR: u64 = 512;

static INSTANCE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Tracks completed writes to one block device through a private tracefs instance.
#[derive(Debug)]
pub struct WriteTracker {
    instance: PathBuf,
    target: Target,
    /// `None` only while dropping.
    pipe: Option<File>,
    lines: LineBuffer,
    stats: BTreeMap<String, CpuStats>,
    /// Bytes of ring buffer over all CPUs, bounds one drain.
    buffer_bytes: u64,
}

/// Which kernel device and sector window a tracker reports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// Major and minor of the whole disk, as the tracepoint prints them.
    disk: (u64, u64),
    /// First sector of the tracked device on the disk (0 unless a partition).
    start: u64,
    /// Sectors of the tracked device (`u64::MAX` for a whole disk).
    sectors: u64,
}

impl Target {
    fn kernel_dev(&self) -> u64 {
        (self.disk.0 << 20) | self.disk.1
    }

    /// Clips a disk-relative completion to the device and makes it device-relative bytes.
    fn to_range(&self, sector: u64, nr_sector: u64) -> Option<WrittenRange> {
        let end = sector.saturating_add(nr_sector);
        let dev_end = self.start.saturating_add(self.sectors);
        let lo = sector.max(self.start);
        let hi = end.min(dev_end);
        (hi > lo).then(|| {
            (
                (lo - self.start).saturating_mul(SECTOR),
                (hi - lo).saturating_mul(SECTOR),
            )
        })
    }
}

impl WriteTracker {
    /// Starts tracking completed writes to the block device at `device`. Start it
    /// before scanning the device, so writes made during the scan are caught.
    pub fn start(device: &Path) -> Result<WriteTracker, TrackingError> {
        Self::start_with_options(device, &TrackerOptions::default())
    }

    /// [`WriteTracker::start`] with explicit [`TrackerOptions`].
    pub fn start_with_options(
        device: &Path,
        options: &TrackerOptions,
    ) -> Result<WriteTracker, TrackingError> {
        let target = resolve_target(device)?;
        let tracefs = tracefs_root()?;
        let instances = tracefs.join("instances");
        remove_stale_instances(&instances);
        let instance = create_instance(&instances)?;
        // From here on, dropping `tracker` removes the instance on any error.
        let mut tracker = WriteTracker {
            instance,
            target,
            pipe: None,
            lines: LineBuffer::default(),
            stats: BTreeMap::new(),
            buffer_bytes: 0,
        };
        tracker.configure(options)?;
        tracing::debug!(tracker = %tracker.describe(), "write tracking started");
        Ok(tracker)
    }

    fn configure(&mut self, options: &TrackerOptions) -> Result<(), TrackingError> {
        let event_dir = self.instance.join("events/block").join(EVENT);
        if !event_dir.is_dir() {
            return Err(TrackingError::Unavailable(format!(
                "tracepoint block:{EVENT} missing ({} absent)",
                event_dir.display()
            )));
        }
        let cpus = self.cpu_dirs()?.len().max(1) as u64;
        let per_cpu_kb = options
            .buffer_size_kb
            .map(u64::from)
            .unwrap_or_else(|| (64 * 1024 / cpus).clamp(1024, 8192));
        write_file(
            &self.instance.join("buffer_size_kb"),
            &per_cpu_kb.to_string(),
        )?;
        // The kernel rounds the size up to whole pages; use what it kept.
        let kept_kb = read_file(&self.instance.join("buffer_size_kb"))?
            .trim()
            .parse::<u64>()
            .unwrap_or(per_cpu_kb);
        self.buffer_bytes = kept_kb * 1024 * cpus;

        let dev = self.target.kernel_dev();
        let mut window = String::new();
        if self.target.sectors != u64::MAX {
            let end = self.target.start.saturating_add(self.target.sectors);
            // A request never straddles a partition boundary: its start decides.
            window = format!(" && sector >= {} && sector < {end}", self.target.start);
        }
        let filter_path = event_dir.join("filter");
        let full = format!(
            "dev == {dev}{window} && nr_sector > 0 && (rwbs ~ \"*W*\" || rwbs ~ \"*D*\" || rwbs ~ \"*N*\")"
        );
        if let Err(e) = write_file(&filter_path, &full) {
            // Kernels without glob matching still filter on the device; the parser
            // then drops reads itself.
            tracing::debug!(error = %e, "full filter refused, falling back to a device filter");
            write_file(&filter_path, &format!("dev == {dev}{window}"))
                .map_err(|e| TrackingError::Unavailable(format!("event filter refused: {e}")))?;
        }
        write_file(&event_dir.join("enable"), "1")?;
        write_file(&self.instance.join("tracing_on"), "1")?;

        let pipe_path = self.instance.join("trace_pipe");
        let pipe = OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&pipe_path)
            .map_err(|source| TrackingError::Io {
                path: pipe_path,
                source,
            })?;
        self.pipe = Some(pipe);
        self.stats = self.read_stats()?;
        Ok(())
    }

    /// Appends every write completed since the previous call (or since start) to
    /// `out`, reading until the kernel buffer is empty. Returns
    /// [`TrackingError::Lost`] if any event may have been lost since the previous
    /// call; the ranges read are still appended and the tracker keeps working.
    pub fn drain(&mut self, out: &mut Vec<WrittenRange>) -> Result<(), TrackingError> {
        let mut lost_dropped = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let budget = self
            .buffer_bytes
            .max(1 << 20)
            .saturating_mul(MAX_DRAIN_FACTOR);
        let mut read_total = 0u64;
        let pipe_path = self.instance.join("trace_pipe");
        let Some(pipe) = self.pipe.as_mut() else {
            return Err(TrackingError::Unavailable("tracker is closed".into()));
        };
        loop {
            if read_total >= budget {
                tracing::warn!(read_total, "drain stopped before trace_pipe emptied");
                lost_dropped += 1;
                break;
            }
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    read_total += n as u64;
                    self.lines.push(&buf[..n]);
                    while let Some(line) = self.lines.next_line() {
                        lost_dropped += apply_line(&line, &self.target, out);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(TrackingError::Io {
                        path: pipe_path,
                        source,
                    })
                }
            }
        }
        // The kernel emits whole lines per read; a leftover partial line is kept
        // for the next drain rather than guessed at.
        let now = self.read_stats()?;
        let (mut overrun, mut dropped) = (0u64, lost_dropped);
        for (cpu, new) in &now {
            let old = self.stats.get(cpu).copied().unwrap_or_default();
            overrun += new.overrun.saturating_sub(old.overrun);
            overrun += new.commit_overrun.saturating_sub(old.commit_overrun);
            dropped += new.dropped.saturating_sub(old.dropped);
        }
        self.stats = now;
        if overrun > 0 || dropped > 0 {
            tracing::warn!(overrun, dropped, tracker = %self.describe(), "write tracking lost events");
            return Err(TrackingError::Lost { overrun, dropped });
        }
        Ok(())
    }

    /// A one-line description for logs and status.
    pub fn describe(&self) -> String {
        let name = self
            .instance
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("tracepoints (tracefs instance {name}, event block:{EVENT})")
    }

    /// The tracefs instance directory this tracker owns.
    pub fn instance_dir(&self) -> &Path {
        &self.instance
    }

    fn cpu_dirs(&self) -> Result<Vec<(String, PathBuf)>, TrackingError> {
        let per_cpu = self.instance.join("per_cpu");
        let entries = fs::read_dir(&per_cpu).map_err(|source| TrackingError::Io {
            path: per_cpu.clone(),
            source,
        })?;
        let mut cpus = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("cpu") {
                cpus.push((name, entry.path()));
            }
        }
        Ok(cpus)
    }

    fn read_stats(&self) -> Result<BTreeMap<String, CpuStats>, TrackingError> {
        let mut all = BTreeMap::new();
        for (cpu, dir) in self.cpu_dirs()? {
            let text = read_file(&dir.join("stats"))?;
            all.insert(cpu, CpuStats::parse(&text));
        }
        Ok(all)
    }
}

impl Drop for WriteTracker {
    fn drop(&mut self) {
        let enable = self
            .instance
            .join("events/block")
            .join(EVENT)
            .join("enable");
        if let Err(e) = write_file(&enable, "0") {
            tracing::debug!(error = %e, "disabling tracepoint failed");
        }
        // An open trace_pipe keeps the instance busy: close it before rmdir.
        self.pipe.take();
        for attempt in 0..20 {
            match fs::remove_dir(&self.instance) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if attempt < 19 => {
                    tracing::debug!(error = %e, "tracefs instance busy, retrying rmdir");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    instance = %self.instance.display(),
                    "cannot remove tracefs instance"
                ),
            }
        }
    }
}

/// Loss counters of one CPU's ring buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CpuStats {
    overrun: u64,
    commit_overrun: u64,
    dropped: u64,
}

impl CpuStats {
    fn parse(text: &str) -> CpuStats {
        let mut stats = CpuStats::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<u64>() else {
                continue;
            };
            match key.trim() {
                "overrun" => stats.overrun = value,
                "commit overrun" => stats.commit_overrun = value,
                "dropped events" => stats.dropped = value,
                _ => {}
            }
        }
        stats
    }
}

/// Splits a byte stream into lines, keeping a partial last line across reads.
#[derive(Debug, Default)]
struct LineBuffer {
    pending: Vec<u8>,
    start: usize,
}

impl LineBuffer {
    fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.pending.drain(..self.start);
            self.start = 0;
        }
        self.pending.extend_from_slice(bytes);
    }

    fn next_line(&mut self) -> Option<String> {
        let rest = &self.pending[self.start..];
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let line = String::from_utf8_lossy(&rest[..nl]).into_owned();
        self.start += nl + 1;
        Some(line)
    }
}

/// One line of `trace_pipe` text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TraceLine {
    /// A completed request.
    Complete {
        /// Major and minor of the disk.
        dev: (u64, u64),
        /// Whether it changed data (write, discard, write-zeroes) with sectors.
        changes_data: bool,
        sector: u64,
        nr_sector: u64,
    },
    /// `CPU:N [LOST M EVENTS]` (`None` when the kernel did not count them).
    Lost(Option<u64>),
    /// A `block_rq_complete` line whose fields could not be read.
    Malformed,
    /// Anything else (blank lines, other events).
    Other,
}

fn parse_line(line: &str) -> TraceLine {
    let marker = "block_rq_complete: ";
    // The task name comes first and could contain anything; the fields come last.
    let Some(pos) = line.rfind(marker) else {
        if line.contains("[LOST") && line.contains("EVENTS]") {
            let count = line
                .split_once("[LOST ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok());
            return TraceLine::Lost(count);
        }
        return TraceLine::Other;
    };
    parse_fields(&line[pos + marker.len()..]).unwrap_or(TraceLine::Malformed)
}

/// Parses `7,0 WS () 2048 + 128 be,0,4 [0]` (the ioprio field is absent before Linux 6.9).
fn parse_fields(fields: &str) -> Option<TraceLine> {
    let (dev, rest) = fields.trim_start().split_once(' ')?;
    let (major, minor) = dev.split_once(',')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    let (rwbs, rest) = rest.trim_start().split_once(' ')?;
    // `(cmd)`: empty for ordinary requests; skip to its closing parenthesis.
    let rest = rest.trim_start().strip_prefix('(')?;
    let (_, rest) = rest.split_once(')')?;
    let mut tokens = rest.split_whitespace();
    let sector = tokens.next()?.parse().ok()?;
    if tokens.next()? != "+" {
        return None;
    }
    let nr_sector = tokens.next()?.parse().ok()?;
    let changes_data = nr_sector > 0 && rwbs.chars().any(|c| matches!(c, 'W' | 'D' | 'N'));
    Some(TraceLine::Complete {
        dev,
        changes_data,
        sector,
        nr_sector,
    })
}

/// Applies one line; returns how many events it shows lost (0 for a good line).
fn apply_line(line: &str, target: &Target, out: &mut Vec<WrittenRange>) -> u64 {
    match parse_line(line) {
        TraceLine::Complete {
            dev,
            changes_data,
            sector,
            nr_sector,
        } => {
            if changes_data && dev == target.disk {
                out.extend(target.to_range(sector, nr_sector));
            }
            0
        }
        TraceLine::Lost(n) => {
            tracing::debug!(line, "ring buffer lost events");
            n.unwrap_or(1).max(1)
        }
        TraceLine::Malformed => {
            tracing::warn!(line, "unparseable block_rq_complete line, counting it lost");
            1
        }
        TraceLine::Other => {
            if !line.trim().is_empty() {
                tracing::debug!(line, "ignoring trace line");
            }
            0
        }
    }
}

/// Resolves `device` to its disk's major:minor and sector window, checking that
/// the disk is request-based (only those fire `block_rq_complete`).
fn resolve_target(device: &Path) -> Result<Target, TrackingError> {
    let real = fs::canonicalize(device).map_err(|e| {
        TrackingError::Unavailable(format!("cannot resolve {}: {e}", device.display()))
    })?;
    let meta = fs::metadata(&real)
        .map_err(|e| TrackingError::Unavailable(format!("cannot stat {}: {e}", real.display())))?;
    if !meta.file_type().is_block_device() {
        return Err(TrackingError::Unavailable(format!(
            "{} is not a block device",
            real.display()
        )));
    }
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let (disk_sys, start, sectors) = if sys.join("partition").exists() {
        let start = read_u64(&sys.join("start"))?;
        let size = read_u64(&sys.join("size"))?;
        (sys.join(".."), start, size)
    } else {
        (sys.clone(), 0, u64::MAX)
    };
    let disk_dev = read_file(&disk_sys.join("dev"))?;
    let disk = disk_dev
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| {
            TrackingError::Unavailable(format!("odd sysfs dev entry {:?}", disk_dev.trim()))
        })?;
    if !disk_sys.join("mq").is_dir() {
        return Err(TrackingError::Unavailable(format!(
            "{} is bio-based (no blk-mq queue), block:{EVENT} does not fire for it",
            real.display()
        )));
    }
    Ok(Target {
        disk,
        start,
        sectors,
    })
}

/// Finds a tracefs with instances, mounting it at /sys/kernel/tracing if needed.
fn tracefs_root() -> Result<PathBuf, TrackingError> {
    for root in [TRACEFS_MOUNT, DEBUGFS_TRACING] {
        let root = PathBuf::from(root);
        if root.join("instances").is_dir() {
            return Ok(root);
        }
    }
    let root = PathBuf::from(TRACEFS_MOUNT);
    nix::mount::mount(
        Some("nodev"),
        &root,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| {
        TrackingError::Unavailable(format!("cannot mount tracefs at {TRACEFS_MOUNT}: {e}"))
    })?;
    if root.join("instances").is_dir() {
        tracing::info!("mounted tracefs at {TRACEFS_MOUNT}");
        Ok(root)
    } else {
        Err(TrackingError::Unavailable(format!(
            "tracefs at {TRACEFS_MOUNT} has no instances directory"
        )))
    }
}

/// Creates a fresh `lifeboat-<pid>-<n>` instance; a name left behind by an
/// earlier process with our pid is skipped.
fn create_instance(instances: &Path) -> Result<PathBuf, TrackingError> {
    let mut last_error = None;
    for _ in 0..64 {
        let n = INSTANCE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let instance = instances.join(format!("{INSTANCE_PREFIX}{}-{n}", std::process::id()));
        match fs::create_dir(&instance) {
            Ok(()) => return Ok(instance),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => {
                return Err(TrackingError::Unavailable(format!(
                    "cannot create tracefs instance {}: {e}",
                    instance.display()
                )))
            }
        }
    }
    Err(TrackingError::Unavailable(format!(
        "cannot create a tracefs instance in {}: {last_error:?}",
        instances.display()
    )))
}

/// Removes `lifeboat-<pid>-<n>` instances whose process is gone (agent killed).
fn remove_stale_instances(instances: &Path) {
    let Ok(entries) = fs::read_dir(instances) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(INSTANCE_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match fs::remove_dir(entry.path()) {
            Ok(()) => tracing::info!(instance = name, "removed stale tracefs instance"),
            Err(e) => tracing::debug!(instance = name, error = %e, "stale instance not removed"),
        }
    }
}

fn read_file(path: &Path) -> Result<String, TrackingError> {
    fs::read_to_string(path).map_err(|source| TrackingError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64, TrackingError> {
    let text = read_file(path)?;
    text.trim().parse().map_err(|_| {
        TrackingError::Unavailable(format!(
            "{}: not a number: {:?}",
            path.display(),
            text.trim()
        ))
    })
}

/// Writes a tracefs control file in one `write(2)`, as tracefs expects.
fn write_file(path: &Path, value: &str) -> Result<(), TrackingError> {
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|source| TrackingError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    file.write_all(value.as_bytes())
        .map_err(|source| TrackingError::Io {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    const MIB: u64 = 1024 * 1024;

    fn target(disk: (u64, u64)) -> Target {
        Target {
            disk,
            start: 0,
            sectors: u64::MAX,
        }
    }

    #[test]
    fn parses_completion_lines() {
        let new = "     ksoftirqd/0-14      [000] ..s..  3079.878867: block_rq_complete: 7,0 WS () 2048 + 128 be,0,4 [0]";
        assert_eq!(
            parse_line(new),
            TraceLine::Complete {
                dev: (7, 0),
                changes_data: true,
                sector: 2048,
                nr_sector: 128
            }
        );
        let old = "  dd-1234 [001] ..... 123.456: block_rq_complete: 259,3 FWFS () 8 + 8 [0]";
        assert_eq!(
            parse_line(old),
            TraceLine::Complete {
                dev: (259, 3),
                changes_data: true,
                sector: 8,
                nr_sector: 8
            }
        );
        // Reads and flush-only requests change nothing.
        for line in [
            "  x-1 [000] ..... 1.0: block_rq_complete: 7,0 RA () 16 + 8 [0]",
            "  x-1 [000] ..... 1.0: block_rq_complete: 7,0 FF () 0 + 0 [0]",
            "  x-1 [000] ..... 1.0: block_rq_complete: 7,0 WS () 18446744073709551615 + 0 [0]",
        ] {
            assert!(
                matches!(
                    parse_line(line),
                    TraceLine::Complete {
                        changes_data: false,
                        ..
                    }
                ),
                "{line}"
            );
        }
        // Discard and write-zeroes (printed as N) change data.
        for line in [
            "  x-1 [000] ..... 1.0: block_rq_complete: 7,0 DS () 2048 + 128 be,0,4 [0]",
            "  x-1 [000] ..... 1.0: block_rq_complete: 7,0 NS () 4096 + 128 be,0,4 [0]",
            // A failed write may still have changed some sectors.
            "  x-1 [000] ..... 1.0: block_rq_complete: 7,0 W () 1 + 1 [-5]",
            // A task name containing the marker itself.
            "  block_rq_complete: -1 [000] ..... 1.0: block_rq_complete: 7,0 W (12 ab) 1 + 1 [0]",
        ] {
            assert!(
                matches!(
                    parse_line(line),
                    TraceLine::Complete {
                        changes_data: true,
                        ..
                    }
                ),
                "{line}"
            );
        }
    }

    #[test]
    fn parses_markers_and_garbage() {
        assert_eq!(
            parse_line("CPU:1 [LOST 1872 EVENTS]"),
            TraceLine::Lost(Some(1872))
        );
        assert_eq!(parse_line("CPU:0 [LOST EVENTS]"), TraceLine::Lost(None));
        assert_eq!(parse_line(""), TraceLine::Other);
        assert_eq!(parse_line("\u{fffd}\u{fffd} garbage"), TraceLine::Other);
        assert_eq!(
            parse_line("  x-1 [000] ..... 1.0: tracing_mark_write: hello"),
            TraceLine::Other
        );
        for bad in [
            "x: block_rq_complete: ",
            "x: block_rq_complete: 7,0",
            "x: block_rq_complete: 7;0 W () 1 + 1 [0]",
            "x: block_rq_complete: 7,0 W 1 + 1 [0]",
            "x: block_rq_complete: 7,0 W () 1 - 1 [0]",
            "x: block_rq_complete: 7,0 W () 1 + [0]",
            "x: block_rq_complete: 7,0 W () 99999999999999999999999 + 1 [0]",
            "x: block_rq_complete: 7,0 W (",
        ] {
            assert_eq!(parse_line(bad), TraceLine::Malformed, "{bad}");
        }
        let mut out = Vec::new();
        let t = target((7, 0));
        assert_eq!(apply_line("CPU:0 [LOST 3 EVENTS]", &t, &mut out), 3);
        assert_eq!(apply_line("CPU:0 [LOST EVENTS]", &t, &mut out), 1);
        assert_eq!(apply_line("x: block_rq_complete: 7,0 W (", &t, &mut out), 1);
        assert_eq!(apply_line("junk", &t, &mut out), 0);
        // Another disk's line is not ours.
        let other = "x-1 [000] ..... 1.0: block_rq_complete: 7,1 W () 8 + 8 [0]";
        assert_eq!(apply_line(other, &t, &mut out), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn line_buffer_keeps_partial_lines() {
        let mut lines = LineBuffer::default();
        lines.push(b"first line\nsec");
        assert_eq!(lines.next_line().as_deref(), Some("first line"));
        assert_eq!(lines.next_line(), None);
        lines.push(b"ond\n\nthird");
        assert_eq!(lines.next_line().as_deref(), Some("second"));
        assert_eq!(lines.next_line().as_deref(), Some(""));
        assert_eq!(lines.next_line(), None);
        lines.push(b"\n");
        assert_eq!(lines.next_line().as_deref(), Some("third"));
        assert_eq!(lines.next_line(), None);
        lines.push(b"\xff\xfe\n");
        assert!(lines.next_line().is_some());
    }

    #[test]
    fn partition_window_clips_and_rebases() {
        let part = Target {
            disk: (259, 0),
            start: 2048,
            sectors: 1000,
        };
        assert_eq!(part.kernel_dev(), (259 << 20));
        assert_eq!(part.to_range(2048, 8), Some((0, 4096)));
        assert_eq!(part.to_range(2040, 16), Some((0, 4096)));
        assert_eq!(part.to_range(3040, 16), Some((992 * 512, 8 * 512)));
        assert_eq!(part.to_range(0, 8), None);
        assert_eq!(part.to_range(4000, 8), None);
        // Absurd sectors must not overflow.
        assert_eq!(
            target((7, 0)).to_range(u64::MAX - 1, 8),
            Some((u64::MAX, 512))
        );
    }

    #[test]
    fn stats_parse() {
        let text = "entries: 109\noverrun: 1872\ncommit overrun: 2\nbytes: 0\noldest event ts:     0.000000\nnow ts:  3071.373173\ndropped events: 5\nread events: 0\n";
        assert_eq!(
            CpuStats::parse(text),
            CpuStats {
                overrun: 1872,
                commit_overrun: 2,
                dropped: 5
            }
        );
        assert_eq!(CpuStats::parse("garbage\n:\n"), CpuStats::default());
    }

    // ---- Tests against the real kernel: loop devices and tracefs. ----

    /// A loop device over a temporary file, detached on drop.
    struct LoopDevice {
        path: PathBuf,
        _file: tempfile::NamedTempFile,
    }

    impl LoopDevice {
        fn new(size: u64) -> Result<LoopDevice, String> {
            let file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
            file.as_file().set_len(size).map_err(|e| e.to_string())?;
            let out = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(file.path())
                .output()
                .map_err(|e| format!("losetup: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            Ok(LoopDevice { path, _file: file })
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
    }

    /// Sets up a loop device and a tracker, or says why the test must skip.
    fn setup(name: &str, options: &TrackerOptions) -> Option<(LoopDevice, WriteTracker)> {
        if fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
            println!("SKIP {name}: not root");
            return None;
        }
        let dev = match LoopDevice::new(64 * MIB) {
            Ok(dev) => dev,
            Err(e) => {
                println!("SKIP {name}: no loop device: {e}");
                return None;
            }
        };
        match WriteTracker::start_with_options(&dev.path, options) {
            Ok(tracker) => Some((dev, tracker)),
            Err(e) => {
                println!("SKIP {name}: {e}");
                None
            }
        }
    }

    fn open_direct(path: &Path) -> File {
        OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path)
            .expect("open O_DIRECT")
    }

    /// Writes `len` bytes at `offset` with O_DIRECT from a 4 KiB-aligned buffer.
    fn write_direct(file: &File, offset: u64, len: usize) {
        let mut buf = vec![0xa5u8; len + 4096];
        let skip = buf.as_ptr().align_offset(4096);
        file.write_all_at(&buf[skip..skip + len], offset)
            .expect("O_DIRECT write");
        buf.clear();
    }

    /// Sorts and merges touching ranges.
    fn merged(mut ranges: Vec<WrittenRange>) -> Vec<WrittenRange> {
        ranges.sort_unstable();
        let mut out: Vec<WrittenRange> = Vec::new();
        for (off, len) in ranges {
            match out.last_mut() {
                Some((o, l)) if *o + *l >= off => *l = (*l).max(off + len - *o),
                _ => out.push((off, len)),
            }
        }
        out
    }

    fn covers(ranges: &[WrittenRange], (off, len): WrittenRange) -> bool {
        ranges.iter().any(|&(o, l)| o <= off && off + len <= o + l)
    }

    #[test]
    fn direct_writes_reported_exactly() {
        let Some((dev, mut tracker)) = setup("direct_writes_reported_exactly", &Default::default())
        else {
            return;
        };
        assert!(tracker
            .describe()
            .starts_with("tracepoints (tracefs instance lifeboat-"));
        let file = open_direct(&dev.path);
        write_direct(&file, MIB, 64 * 1024);
        write_direct(&file, 10 * MIB + 4096, 4096);
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain");
        assert_eq!(merged(out), vec![(MIB, 64 * 1024), (10 * MIB + 4096, 4096)]);
        // Reads are not reported, and a second drain starts empty.
        let mut buf = vec![0u8; 8192];
        fs::File::open(&dev.path)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain");
        assert_eq!(out, vec![]);
        // Every write is visible to the drain that follows its return.
        for i in 0..200u64 {
            write_direct(&file, 20 * MIB + i * 8192, 4096);
            let mut out = Vec::new();
            tracker.drain(&mut out).expect("drain");
            assert_eq!(out, vec![(20 * MIB + i * 8192, 4096)], "write {i}");
        }
    }

    #[test]
    fn other_device_not_reported() {
        let Some((dev, mut tracker)) = setup("other_device_not_reported", &Default::default())
        else {
            return;
        };
        let other = match LoopDevice::new(64 * MIB) {
            Ok(other) => other,
            Err(e) => {
                println!("SKIP other_device_not_reported: {e}");
                return;
            }
        };
        let other_file = open_direct(&other.path);
        write_direct(&other_file, 0, 64 * 1024);
        write_direct(&other_file, 3 * MIB, 4096);
        let file = open_direct(&dev.path);
        write_direct(&file, 5 * MIB, 8192);
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain");
        assert_eq!(merged(out), vec![(5 * MIB, 8192)]);
    }

    #[test]
    fn buffered_writes_reported_after_fsync() {
        let Some((dev, mut tracker)) =
            setup("buffered_writes_reported_after_fsync", &Default::default())
        else {
            return;
        };
        let file = OpenOptions::new().write(true).open(&dev.path).unwrap();
        file.write_all_at(&[7u8; 8192], 20 * MIB).unwrap();
        file.write_all_at(&[9u8; 100], 30 * MIB + 10).unwrap();
        file.sync_all().unwrap();
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain");
        let ranges = merged(out);
        assert!(covers(&ranges, (20 * MIB, 8192)), "{ranges:?}");
        assert!(covers(&ranges, (30 * MIB + 10, 100)), "{ranges:?}");
        // Nothing far from the writes (page-granular writeback at most).
        for &(off, len) in &ranges {
            assert!(
                (20 * MIB..20 * MIB + 8192).contains(&off)
                    || (30 * MIB..30 * MIB + 4096).contains(&off),
                "unexpected range {off}+{len}"
            );
        }
    }

    #[test]
    fn discard_reported() {
        let Some((dev, mut tracker)) = setup("discard_reported", &Default::default()) else {
            return;
        };
        let status = Command::new("blkdiscard")
            .args(["-o", "1048576", "-l", "65536"])
            .arg(&dev.path)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            println!("SKIP discard_reported: blkdiscard unavailable: {status:?}");
            return;
        }
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain");
        assert_eq!(merged(out), vec![(MIB, 65536)]);
    }

    #[test]
    fn overrun_reported_as_lost() {
        let options = TrackerOptions {
            buffer_size_kb: Some(4),
        };
        let Some((dev, mut tracker)) = setup("overrun_reported_as_lost", &options) else {
            return;
        };
        let file = open_direct(&dev.path);
        // About 150 events fit in a 4 KiB (rounded up to 7 KiB) per-CPU buffer.
        for i in 0..3000u64 {
            write_direct(&file, (i % 8000) * 4096, 4096);
        }
        let mut out = Vec::new();
        let result = tracker.drain(&mut out);
        assert!(
            matches!(result, Err(TrackingError::Lost { overrun, .. }) if overrun > 0),
            "{result:?}"
        );
        assert!(!out.is_empty());
        // The tracker keeps working, and the loss is reported once.
        write_direct(&file, 40 * MIB, 4096);
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain after loss");
        assert_eq!(out, vec![(40 * MIB, 4096)]);
    }

    #[test]
    fn drop_removes_instance() {
        let Some((_dev, tracker)) = setup("drop_removes_instance", &Default::default()) else {
            return;
        };
        let dir = tracker.instance_dir().to_path_buf();
        assert!(dir.is_dir());
        drop(tracker);
        assert!(!dir.exists(), "{} still exists", dir.display());
    }

    /// Unmounts on drop.
    struct Mount(PathBuf);

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn ext4_file_writes_reported() {
        let name = "ext4_file_writes_reported";
        let Some((dev, tracker)) = setup(name, &Default::default()) else {
            return;
        };
        // setup() only proved tracking works; the tracker under test starts after
        // mkfs and mount, so what it reports is the file's writeback and journal.
        drop(tracker);
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&dev.path)
            .status();
        if !matches!(mkfs, Ok(s) if s.success()) {
            println!("SKIP {name}: mkfs.ext4 failed: {mkfs:?}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mount = Command::new("mount")
            .arg(&dev.path)
            .arg(dir.path())
            .status();
        if !matches!(mount, Ok(s) if s.success()) {
            println!("SKIP {name}: mount failed: {mount:?}");
            return;
        }
        let mounted = Mount(dir.path().to_path_buf());
        let mut tracker = WriteTracker::start(&dev.path).expect("tracker");
        let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 13) as u8).collect();
        {
            let mut file = File::create(mounted.0.join("data")).unwrap();
            for _ in 0..64 {
                file.write_all(&block).unwrap();
            }
            file.sync_all().unwrap();
        }
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain");
        let ranges = merged(out);
        // Every device block now holding the file's data was reported.
        // O_DIRECT: the block device's page cache does not see the filesystem's writes.
        let mut buf = vec![0u8; (64 * MIB) as usize + 4096];
        let skip = buf.as_ptr().align_offset(4096);
        let image = &mut buf[skip..skip + (64 * MIB) as usize];
        OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(&dev.path)
            .unwrap()
            .read_exact_at(image, 0)
            .unwrap();
        let mut found = 0;
        for (i, chunk) in image.chunks(4096).enumerate() {
            if chunk == block.as_slice() {
                found += 1;
                assert!(
                    covers(&ranges, (i as u64 * 4096, 4096)),
                    "block {i}: {ranges:?}"
                );
            }
        }
        assert!(found >= 64, "file data found in {found} blocks");
        drop(mounted);
    }

    /// Writes a one-partition MBR (partition 1: sectors 2048..2048+`sectors`).
    fn write_mbr(path: &Path, sectors: u32) {
        let mut mbr = [0u8; 512];
        let entry = &mut mbr[446..462];
        entry[4] = 0x83;
        entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
        entry[12..16].copy_from_slice(&sectors.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(&mbr, 0)
            .unwrap();
    }

    #[test]
    fn partition_writes_rebased() {
        let name = "partition_writes_rebased";
        if fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
            println!("SKIP {name}: not root");
            return;
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(64 * MIB).unwrap();
        write_mbr(file.path(), 32 * 2048);
        let out = Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(file.path())
            .output();
        let Ok(out) = out.as_ref().map_err(|e| e.to_string()).and_then(|o| {
            o.status
                .success()
                .then_some(o)
                .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
        }) else {
            println!("SKIP {name}: losetup -P failed: {out:?}");
            return;
        };
        let disk = LoopDevice {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            _file: file,
        };
        let part = PathBuf::from(format!("{}p1", disk.path.display()));
        // udev is not guaranteed: wait a bounded time for the node.
        for _ in 0..50 {
            if part.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !part.exists() {
            println!(
                "SKIP {name}: {} did not appear (kernel without MBR partition support?)",
                part.display()
            );
            return;
        }
        let mut tracker = match WriteTracker::start(&part) {
            Ok(t) => t,
            Err(e) => {
                println!("SKIP {name}: {e}");
                return;
            }
        };
        write_direct(&open_direct(&part), MIB, 8192);
        // Outside the partition: before it and after it, through the whole disk.
        let whole = open_direct(&disk.path);
        write_direct(&whole, 4096, 4096);
        write_direct(&whole, 40 * MIB, 4096);
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain");
        assert_eq!(merged(out), vec![(MIB, 8192)]);
        // A write through the disk inside the partition counts, partition-relative.
        write_direct(&whole, MIB + 2 * MIB, 4096);
        let mut out = Vec::new();
        tracker.drain(&mut out).expect("drain");
        assert_eq!(out, vec![(2 * MIB, 4096)]);
    }

    #[test]
    fn not_a_block_device_unavailable() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let result = WriteTracker::start(file.path());
        assert!(
            matches!(result, Err(TrackingError::Unavailable(_))),
            "{result:?}"
        );
        let result = WriteTracker::start(Path::new("/nonexistent/lifeboat-dev"));
        assert!(
            matches!(result, Err(TrackingError::Unavailable(_))),
            "{result:?}"
        );
    }
}
