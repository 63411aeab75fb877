//! Lifeboat telemetry, shared by `lifeboat-agent run` and `lifeboat-receiver
//! serve`: Prometheus metrics of replication ([`ReplicationMetrics`]) and of
//! the process ([`process::ProcessCollector`]), and a small, bounded HTTP
//! server ([`http::HttpServer`]) that serves them at `/metrics` beside
//! whatever else a binary routes (the receiver's status page and JSON API).
//!
//! ## Metric names (a contract: dashboards and alerts use them)
//! Per source server and volume (labels `server`, `volume`), in base units,
//! counters ending in `_total`:
//!
//! | name | type | meaning |
//! |------|------|---------|
//! | `lifeboat_replication_lag_seconds` | gauge | age of the oldest write not yet durable on the receiver |
//! | `lifeboat_backlog_bytes` | gauge | dirty bytes not yet acknowledged |
//! | `lifeboat_replicated_bytes_total` | counter | block data made durable (before compression) |
//! | `lifeboat_sent_bytes_total` | counter | block payload on the wire (after compression) |
//! | `lifeboat_initial_sync_ratio` | gauge | progress of the initial sync, 0–1 (1 once done) |
//! | `lifeboat_state` | gauge | one series per `state` label value, 1 for the current state |
//! | `lifeboat_last_pit_timestamp_seconds` | gauge | Unix time of the newest PIT (receiver only) |
//! | `lifeboat_pit_count` | gauge | live PITs in the store (receiver only) |
//! | `lifeboat_rescans_total` | counter | full rescans of a complete replica |
//! | `lifeboat_apply_errors_total` | counter | failures replicating or applying blocks |
//!
//! plus the usual `process_*` metrics read from `/proc/self`.
//!
//! ## Exposition
//! [`ReplicationMetrics::render`] writes the OpenMetrics text format
//! (`# HELP`, `# TYPE`, samples, `# EOF`), which Prometheus scrapes with the
//! content type [`OPENMETRICS_CONTENT_TYPE`]. In that format a counter's
//! family is named without `_total` (`# TYPE lifeboat_rescans counter`) and
//! its sample with it (`lifeboat_rescans_total{...} 3`).
//!
//! ## Concurrency
//! Every metric is an atomic behind an `Arc`; a [`VolumeMetrics`] handle is
//! taken once per volume (one short write lock on each family) and then
//! updated lock-free from the hot paths.
#![deny(unsafe_code)]

pub mod http;
pub mod logs;
pub mod process;

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`ReplicationMetrics::render`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The values of `lifeboat_state`'s `state` label, in the order of the
/// replication state machine.
pub const STATES: [&str; 6] = [
    "INITIAL_SYNC",
    "RESCAN",
    "CONTINUOUS",
    "BACKLOG",
    "STALLED",
    "DISCONNECTED",
];

/// Labels of every per-volume series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    /// The source server (its certificate's name).
    pub server: String,
    /// The volume's name on the receiver.
    pub volume: String,
}

/// Labels of `lifeboat_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    server: String,
    volume: String,
    state: String,
}

type F64Gauge = Gauge<f64, AtomicU64>;

/// The replication metrics of one process and the registry that exposes
/// them (with the process metrics).
#[derive(Debug)]
pub struct ReplicationMetrics {
    registry: Registry,
    lag: Family<VolumeLabels, F64Gauge>,
    backlog: Family<VolumeLabels, Gauge>,
    replicated: Family<VolumeLabels, Counter>,
    sent: Family<VolumeLabels, Counter>,
    ratio: Family<VolumeLabels, F64Gauge>,
    state: Family<StateLabels, Gauge>,
    last_pit: Family<VolumeLabels, F64Gauge>,
    pit_count: Family<VolumeLabels, Gauge>,
    rescans: Family<VolumeLabels, Counter>,
    apply_errors: Family<VolumeLabels, Counter>,
    with_pits: bool,
}

impl ReplicationMetrics {
    /// A registry with every replication family and the process collector.
    /// `with_pits`: register the PIT families too (only the receiver, which
    /// owns the store, knows them).
    pub fn new(with_pits: bool) -> ReplicationMetrics {
        let m = ReplicationMetrics {
            registry: Registry::default(),
            lag: Family::default(),
            backlog: Family::default(),
            replicated: Family::default(),
            sent: Family::default(),
            ratio: Family::default(),
            state: Family::default(),
            last_pit: Family::default(),
            pit_count: Family::default(),
            rescans: Family::default(),
            apply_errors: Family::default(),
            with_pits,
        };
        let mut r = m.registry;
        r.register(
            "lifeboat_replication_lag_seconds",
            "Age of the oldest write on the source not yet durable on the receiver",
            m.lag.clone(),
        );
        r.register(
            "lifeboat_backlog_bytes",
            "Bytes dirty on the source and not yet acknowledged by the receiver",
            m.backlog.clone(),
        );
        r.register(
            "lifeboat_replicated_bytes",
            "Block data made durable on the receiver, before compression",
            m.replicated.clone(),
        );
        r.register(
            "lifeboat_sent_bytes",
            "Block payload sent over the wire, after compression",
            m.sent.clone(),
        );
        r.register(
            "lifeboat_initial_sync_ratio",
            "Progress of the volume's initial sync, from 0 to 1 (1 once it completed)",
            m.ratio.clone(),
        );
        r.register(
            "lifeboat_state",
            "Replication state: 1 for the current state, 0 for the others",
            m.state.clone(),
        );
        if with_pits {
            r.register(
                "lifeboat_last_pit_timestamp_seconds",
                "Unix time the newest point-in-time snapshot of the volume was taken (0: none)",
                m.last_pit.clone(),
            );
            r.register(
                "lifeboat_pit_count",
                "Point-in-time snapshots of the volume in the store",
                m.pit_count.clone(),
            );
        }
        r.register(
            "lifeboat_rescans",
            "Full rescans of a volume whose replica was already complete",
            m.rescans.clone(),
        );
        r.register(
            "lifeboat_apply_errors",
            "Blocks or epochs that failed to replicate or to apply (rejected, failed, retried)",
            m.apply_errors.clone(),
        );
        r.register_collector(Box::new(process::ProcessCollector));
        ReplicationMetrics { registry: r, ..m }
    }

    /// The handle of one volume's series, creating them (at zero, state
    /// `DISCONNECTED`) if they do not exist yet, so every series is present
    /// from the first scrape on.
    pub fn volume(&self, server: &str, volume: &str) -> VolumeMetrics {
        let labels = VolumeLabels {
            server: server.to_string(),
            volume: volume.to_string(),
        };
        let states = STATES.map(|s| {
            self.state
                .get_or_create(&StateLabels {
                    server: labels.server.clone(),
                    volume: labels.volume.clone(),
                    state: s.to_string(),
                })
                .clone()
        });
        let fresh = states.iter().all(|g| g.get() == 0);
        let v = VolumeMetrics {
            lag: self.lag.get_or_create(&labels).clone(),
            backlog: self.backlog.get_or_create(&labels).clone(),
            replicated: self.replicated.get_or_create(&labels).clone(),
            sent: self.sent.get_or_create(&labels).clone(),
            ratio: self.ratio.get_or_create(&labels).clone(),
            states,
            last_pit: self
                .with_pits
                .then(|| self.last_pit.get_or_create(&labels).clone()),
            pit_count: self
                .with_pits
                .then(|| self.pit_count.get_or_create(&labels).clone()),
            rescans: self.rescans.get_or_create(&labels).clone(),
            apply_errors: self.apply_errors.get_or_create(&labels).clone(),
        };
        if fresh {
            v.set_state("DISCONNECTED");
        }
        v
    }

    /// Every metric in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One volume's series (cheap to clone; updates are atomic stores).
#[derive(Clone, Debug)]
pub struct VolumeMetrics {
    lag: F64Gauge,
    backlog: Gauge,
    replicated: Counter,
    sent: Counter,
    ratio: F64Gauge,
    states: [Gauge; 6],
    last_pit: Option<F64Gauge>,
    pit_count: Option<Gauge>,
    rescans: Counter,
    apply_errors: Counter,
}

impl VolumeMetrics {
    /// Sets the current state (one of [`STATES`]; others are ignored).
    pub fn set_state(&self, state: &str) {
        if !STATES.contains(&state) {
            return;
        }
        for (name, g) in STATES.iter().zip(&self.states) {
            g.set(i64::from(*name == state));
        }
    }

    /// The current state, if one is set.
    pub fn state(&self) -> Option<&'static str> {
        STATES
            .iter()
            .zip(&self.states)
            .find(|(_, g)| g.get() == 1)
            .map(|(n, _)| *n)
    }

    /// Sets the replication lag.
    pub fn set_lag_seconds(&self, seconds: f64) {
        self.lag.set(seconds.max(0.0));
    }

    /// Sets the backlog.
    pub fn set_backlog_bytes(&self, bytes: u64) {
        self.backlog.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Sets the initial sync's progress (clamped to 0–1).
    pub fn set_initial_sync_ratio(&self, ratio: f64) {
        self.ratio.set(if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        });
    }

    /// Counts block data made durable.
    pub fn add_replicated_bytes(&self, bytes: u64) {
        self.replicated.inc_by(bytes);
    }

    /// Block data made durable so far.
    pub fn replicated_bytes(&self) -> u64 {
        self.replicated.get()
    }

    /// Counts payload bytes on the wire.
    pub fn add_sent_bytes(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    /// Payload bytes on the wire so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.get()
    }

    /// Counts a rescan.
    pub fn rescan(&self) {
        self.rescans.inc();
    }

    /// Counts an apply (or replication) error.
    pub fn apply_error(&self) {
        self.apply_errors.inc();
    }

    /// Sets the PIT series: how many PITs the store holds and when the newest
    /// was taken (ms since the Unix epoch). No-op without PIT families.
    pub fn set_pits(&self, count: u64, newest_unix_ms: Option<u64>) {
        if let Some(g) = &self.pit_count {
            g.set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        if let Some(g) = &self.last_pit {
            g.set(newest_unix_ms.map_or(0.0, |ms| ms as f64 / 1000.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` whose name is `name`.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .collect()
    }

    #[test]
    fn renders_every_family_with_help_type_and_labels() {
        let m = ReplicationMetrics::new(true);
        let v = m.volume("web-1", "root");
        v.set_state("CONTINUOUS");
        v.set_lag_seconds(1.5);
        v.set_backlog_bytes(4096);
        v.add_replicated_bytes(1 << 20);
        v.add_sent_bytes(1000);
        v.set_initial_sync_ratio(2.0);
        v.rescan();
        v.apply_error();
        v.set_pits(3, Some(1_700_000_000_500));
        let text = m.render();
        for (family, kind) in [
            ("lifeboat_replication_lag_seconds", "gauge"),
            ("lifeboat_backlog_bytes", "gauge"),
            ("lifeboat_replicated_bytes", "counter"),
            ("lifeboat_sent_bytes", "counter"),
            ("lifeboat_initial_sync_ratio", "gauge"),
            ("lifeboat_state", "gauge"),
            ("lifeboat_last_pit_timestamp_seconds", "gauge"),
            ("lifeboat_pit_count", "gauge"),
            ("lifeboat_rescans", "counter"),
            ("lifeboat_apply_errors", "counter"),
            ("process_cpu_seconds", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_start_time_seconds", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{family}: {text}"
            );
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family}: {text}"
            );
        }
        let l = r#"{server="web-1",volume="root"}"#;
        for line in [
            format!("lifeboat_replication_lag_seconds{l} 1.5"),
            format!("lifeboat_backlog_bytes{l} 4096"),
            format!("lifeboat_replicated_bytes_total{l} 1048576"),
            format!("lifeboat_sent_bytes_total{l} 1000"),
            format!("lifeboat_initial_sync_ratio{l} 1.0"),
            format!("lifeboat_last_pit_timestamp_seconds{l} 1700000000.5"),
            format!("lifeboat_pit_count{l} 3"),
            format!("lifeboat_rescans_total{l} 1"),
            format!("lifeboat_apply_errors_total{l} 1"),
        ] {
            assert!(text.lines().any(|x| x == line), "{line}: {text}");
        }
        let states = samples(&text, "lifeboat_state");
        assert_eq!(states.len(), STATES.len(), "{text}");
        for s in STATES {
            let want = if s == "CONTINUOUS" { 1 } else { 0 };
            let line =
                format!(r#"lifeboat_state{{server="web-1",volume="root",state="{s}"}} {want}"#);
            assert!(states.contains(&line.as_str()), "{line}: {states:?}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(samples(&text, "process_cpu_seconds_total").len(), 1);
    }

    #[test]
    fn a_new_volume_is_disconnected_and_handles_share_series() {
        let m = ReplicationMetrics::new(false);
        let a = m.volume("s", "v");
        assert_eq!(a.state(), Some("DISCONNECTED"));
        a.set_state("RESCAN");
        a.set_state("NOT_A_STATE");
        let b = m.volume("s", "v");
        assert_eq!(
            b.state(),
            Some("RESCAN"),
            "an existing volume keeps its state"
        );
        b.add_replicated_bytes(7);
        assert_eq!(a.replicated_bytes(), 7);
        let text = m.render();
        assert!(!text.contains("lifeboat_pit_count"), "{text}");
        b.set_pits(1, Some(5)); // no PIT families: ignored
    }

    #[test]
    fn label_values_are_escaped() {
        let m = ReplicationMetrics::new(false);
        m.volume("a\"b", "c\\d\ne").rescan();
        let text = m.render();
        assert!(
            text.contains(r#"lifeboat_rescans_total{server="a\"b",volume="c\\d\ne"} 1"#),
            "{text}"
        );
    }
}
