//! The receiver's HTTP side: Prometheus metrics at `/metrics`, a status page
//! at `/` and its JSON API at `/api/status`, served by `serve` on
//! `metrics_listen` (default `127.0.0.1:9650`, see [`crate::config`]).
//!
//! ## Who owns what
//! - [`Telemetry`] is shared by the QUIC sessions and the HTTP server. The
//!   sessions update counters through [`VolumeMetrics`] handles (atomics,
//!   lock-free) and say when a PIT finished ([`Telemetry::pits_changed`]).
//! - One *sampler* task, every [`SAMPLE_INTERVAL`], reads the status files
//!   (the same source as `lifeboat-receiver status`, so both always agree),
//!   sets the gauges from them (state, lag, backlog, initial sync ratio),
//!   works out each volume's throughput from the replicated-bytes counter,
//!   lists the PITs of a volume when one finished or every
//!   [`PIT_REFRESH`] (never more often than [`PIT_MIN_INTERVAL`]), and
//!   publishes an immutable [`StatusSnapshot`].
//! - HTTP requests only read the newest snapshot (an `Arc` clone): no file
//!   or store IO per request, so a busy dashboard costs the store nothing.
//!
//! ## Finding a serving receiver
//! Once bound, `serve` writes the address to `D/http.addr` (removed at a
//! clean stop). `lifeboat-receiver status` reads it, asks `/api/status`, and
//! uses the answer only if it names the same directory; anything else
//! (no file, nothing listening, another receiver, garbage) falls back to
//! reading the status files, as without a server.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use lifeboat_telemetry::http::{with_metrics, Handler, HttpServer, Reply, Request};
use lifeboat_telemetry::{ReplicationMetrics, VolumeMetrics};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::pit::PitSummary;
use crate::status::{human_bytes, read_statuses, rfc3339, unix_ms, StatusRow, VolumeState};
use crate::store::Store;

/// The file in the receiver directory naming the bound HTTP address.
pub const HTTP_ADDR_FILE: &str = "http.addr";
/// How often the sampler refreshes the snapshot.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// A volume's PITs are listed again at least this often.
pub const PIT_REFRESH: Duration = Duration::from_secs(30);
/// …and never more often than this, however many PITs finish.
pub const PIT_MIN_INTERVAL: Duration = Duration::from_secs(3);
/// Longest a PIT listing may take before the sampler moves on.
const PIT_LIST_TIMEOUT: Duration = Duration::from_secs(20);
/// PITs per volume the page and the API show (newest first).
pub const PITS_SHOWN: usize = 50;
/// The page reloads itself this often (seconds).
const PAGE_REFRESH_S: u32 = 5;

/// One volume as the page and the API show it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    /// Source server.
    pub server: String,
    /// Volume.
    pub volume: String,
    /// The status row, exactly as `lifeboat-receiver status --json` prints it.
    pub status: serde_json::Value,
    /// Block data made durable per second, over the last few seconds.
    pub throughput_bytes_per_second: f64,
    /// Block data made durable since `serve` started.
    pub replicated_bytes_total: u64,
    /// Block payload received since `serve` started (after compression).
    pub sent_bytes_total: u64,
    /// Live PITs in the store (`None` until listed).
    pub pit_count: Option<u64>,
    /// The newest PIT.
    pub last_pit: Option<PitSummary>,
    /// The newest [`PITS_SHOWN`] PITs, newest first.
    pub pits: Vec<PitSummary>,
    /// When the PITs were listed, RFC 3339 UTC.
    pub pits_listed_at: Option<String>,
    /// Why the last listing failed, if it did.
    pub pit_error: Option<String>,
    /// The command that restores the newest PIT.
    pub launch_command: Option<String>,
    #[serde(skip)]
    row: Option<StatusRow>,
}

/// What the page and the API serve: built by the sampler, read by requests.
#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    /// About this receiver.
    pub receiver: ReceiverInfo,
    /// Every volume with a status file, sorted by server then volume.
    pub volumes: Vec<VolumeView>,
}

/// The `receiver` object of the API.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiverInfo {
    /// The receiver directory (canonical path).
    pub dir: String,
    /// The PIT store.
    pub store: String,
    /// `lifeboat-receiver` version.
    pub version: String,
    /// When the snapshot was taken, RFC 3339 UTC.
    pub generated_at: String,
    /// The same, in ms since the Unix epoch.
    pub generated_at_unix_ms: u64,
}

/// PITs of one volume as last listed.
#[derive(Debug, Default)]
struct PitCache {
    pits: Option<Vec<PitSummary>>,
    listed: Option<Instant>,
    listed_unix_ms: u64,
    error: Option<String>,
}

/// Throughput of one volume.
#[derive(Debug)]
struct Rate {
    at: Instant,
    bytes: u64,
    per_second: f64,
}

/// Metrics and status shared by the sessions and the HTTP server.
pub struct Telemetry {
    dir: PathBuf,
    store: Store,
    metrics: Arc<ReplicationMetrics>,
    handles: Mutex<HashMap<(String, String), VolumeMetrics>>,
    pits_changed: Mutex<HashSet<(String, String)>>,
    snapshot: Mutex<Arc<StatusSnapshot>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Keeps the HTTP server and the sampler running; stopping them (drop)
/// removes `D/http.addr`.
#[derive(Debug)]
pub struct HttpGuard {
    addr_file: PathBuf,
    addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HttpGuard {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpGuard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Only our own file: a newer `serve` of the same directory may have
        // replaced it.
        if std::fs::read_to_string(&self.addr_file)
            .is_ok_and(|s| s.trim() == connectable(self.addr).to_string())
        {
            let _ = std::fs::remove_file(&self.addr_file);
        }
    }
}

/// The address a client on this host connects to for a bound `addr`
/// (loopback for a wildcard).
fn connectable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

impl Telemetry {
    /// Telemetry of the receiver in `dir` with PITs in `store`.
    pub fn new(dir: &Path, store: Store) -> Arc<Telemetry> {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let info = ReceiverInfo {
            dir: dir.display().to_string(),
            store: store.url().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generated_at: rfc3339(0),
            generated_at_unix_ms: 0,
        };
        Arc::new(Telemetry {
            dir,
            store,
            metrics: Arc::new(ReplicationMetrics::new(true)),
            handles: Mutex::new(HashMap::new()),
            pits_changed: Mutex::new(HashSet::new()),
            snapshot: Mutex::new(Arc::new(StatusSnapshot {
                receiver: info,
                volumes: Vec::new(),
            })),
        })
    }

    /// The metric handles of one volume.
    pub fn volume(&self, server: &str, volume: &str) -> VolumeMetrics {
        let key = (server.to_string(), volume.to_string());
        let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        h.entry(key)
            .or_insert_with(|| self.metrics.volume(server, volume))
            .clone()
    }

    /// A PIT of the volume finished (taken or failed): list its PITs again soon.
    pub fn pits_changed(&self, server: &str, volume: &str) {
        self.pits_changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((server.to_string(), volume.to_string()));
    }

    /// The newest snapshot.
    pub fn snapshot(&self) -> Arc<StatusSnapshot> {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts the HTTP server on `listen` (nothing for `None`) and the
    /// sampler. A failure to bind is an error if the address was asked for
    /// (`explicit`), else (the default address, e.g. taken by another
    /// receiver on this host) a warning.
    pub async fn start(
        self: &Arc<Self>,
        listen: Option<SocketAddr>,
        explicit: bool,
    ) -> anyhow::Result<Option<HttpGuard>> {
        let Some(addr) = listen else {
            info!("metrics and status page are off (metrics_listen = \"off\")");
            return Ok(None);
        };
        let server = match HttpServer::bind(addr).await {
            Ok(s) => s,
            Err(e) if !explicit => {
                warn!(%addr, "cannot serve metrics and the status page on the default address ({e}); set metrics_listen or --metrics-listen");
                return Ok(None);
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot listen on {addr} for metrics and the status page"
                )))
            }
        };
        let local = server.local_addr();
        let addr_file = self.dir.join(HTTP_ADDR_FILE);
        crate::fsutil::write_atomic(
            &addr_file,
            format!("{}\n", connectable(local)).as_bytes(),
            0o644,
        )
        .with_context(|| format!("cannot write {}", addr_file.display()))?;
        let http = server.spawn(self.handler());
        let sampler = tokio::spawn(self.clone().sample_forever());
        info!(listen = %local, "metrics at /metrics, status page at /");
        // Scripts and tests read the bound port from this line.
        println!("metrics and status page on http://{local}/");
        Ok(Some(HttpGuard {
            addr_file,
            addr: local,
            tasks: vec![http, sampler],
        }))
    }

    fn handler(self: &Arc<Self>) -> Handler {
        let me = self.clone();
        let pages: Handler = Arc::new(move |req: Request| {
            let snap = me.snapshot();
            Box::pin(async move {
                match req.path.as_str() {
                    "/" | "/index.html" => {
                        Reply::ok("text/html; charset=utf-8", render_page(&snap))
                    }
                    "/api/status" => match serde_json::to_vec_pretty(&*snap) {
                        Ok(body) => Reply::ok("application/json", body),
                        Err(e) => Reply::text(500, format!("cannot encode the status: {e}\n")),
                    },
                    _ => Reply::not_found(),
                }
            })
        });
        with_metrics(self.metrics.clone(), Some(pages))
    }

    async fn sample_forever(self: Arc<Self>) {
        let mut rates: HashMap<(String, String), Rate> = HashMap::new();
        let mut pits: HashMap<(String, String), PitCache> = HashMap::new();
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample(&mut rates, &mut pits).await;
        }
    }

    /// One round of the sampler (see the module docs).
    async fn sample(
        &self,
        rates: &mut HashMap<(String, String), Rate>,
        pits: &mut HashMap<(String, String), PitCache>,
    ) {
        let dir = self.dir.clone();
        let now_ms = unix_ms(SystemTime::now());
        let rows = match tokio::task::spawn_blocking(move || read_statuses(&dir, now_ms)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                debug!("cannot read the status files: {e}");
                return;
            }
            Err(_) => return,
        };
        let changed: HashSet<(String, String)> =
            std::mem::take(&mut *self.pits_changed.lock().unwrap_or_else(|e| e.into_inner()));
        let mut views = Vec::with_capacity(rows.len());
        for row in rows {
            let StatusRow::Volume(v) = &row else {
                views.push(view_of_unreadable(row));
                continue;
            };
            let key = (v.server.clone(), v.volume.clone());
            let m = self.volume(&v.server, &v.volume);
            m.set_state(v.state.name());
            m.set_lag_seconds(v.lag_seconds);
            m.set_backlog_bytes(v.backlog_bytes);
            m.set_initial_sync_ratio(initial_sync_ratio(v.state, v.progress, v.epoch));

            let now = Instant::now();
            let bytes = m.replicated_bytes();
            let rate = rates.entry(key.clone()).or_insert(Rate {
                at: now,
                bytes,
                per_second: 0.0,
            });
            let dt = now.saturating_duration_since(rate.at).as_secs_f64();
            if dt >= 0.5 {
                let instant = bytes.saturating_sub(rate.bytes) as f64 / dt;
                // Smooths over about three samples.
                rate.per_second = 0.6 * rate.per_second + 0.4 * instant;
                if rate.per_second < 1.0 {
                    rate.per_second = 0.0;
                }
                rate.at = now;
                rate.bytes = bytes;
            }

            let cache = pits.entry(key.clone()).or_default();
            let due = match cache.listed {
                None => true,
                Some(t) => {
                    let age = now.saturating_duration_since(t);
                    (changed.contains(&key) && age >= PIT_MIN_INTERVAL) || age >= PIT_REFRESH
                }
            };
            if changed.contains(&key) && !due {
                // Not yet: keep the change for a later round.
                self.pits_changed(&key.0, &key.1);
            }
            if due {
                let listed = tokio::time::timeout(
                    PIT_LIST_TIMEOUT,
                    crate::pit::list_pits(&self.store, &v.server, &v.volume),
                )
                .await;
                cache.listed = Some(Instant::now());
                cache.listed_unix_ms = unix_ms(SystemTime::now());
                match listed {
                    Ok(Ok(list)) => {
                        m.set_pits(list.len() as u64, list.last().map(|p| p.time_unix_ms));
                        cache.pits = Some(list);
                        cache.error = None;
                    }
                    Ok(Err(e)) => cache.error = Some(format!("cannot list PITs: {e}")),
                    Err(_) => {
                        cache.error = Some(format!(
                            "listing PITs took longer than {PIT_LIST_TIMEOUT:?}"
                        ))
                    }
                }
            }
            views.push(VolumeView {
                server: v.server.clone(),
                volume: v.volume.clone(),
                status: row.to_json(),
                throughput_bytes_per_second: rate.per_second,
                replicated_bytes_total: bytes,
                sent_bytes_total: m.sent_bytes(),
                pit_count: cache.pits.as_ref().map(|p| p.len() as u64),
                last_pit: cache.pits.as_ref().and_then(|p| p.last().cloned()),
                pits: cache
                    .pits
                    .as_ref()
                    .map(|p| p.iter().rev().take(PITS_SHOWN).cloned().collect())
                    .unwrap_or_default(),
                pits_listed_at: cache.listed.map(|_| rfc3339(cache.listed_unix_ms)),
                pit_error: cache.error.clone(),
                launch_command: cache
                    .pits
                    .as_ref()
                    .and_then(|p| p.last())
                    .map(|p| launch_command(&self.dir, &v.server, &v.volume, &p.id)),
                row: Some(row.clone()),
            });
        }
        let now_ms = unix_ms(SystemTime::now());
        let mut snap = (*self.snapshot()).clone();
        snap.receiver.generated_at = rfc3339(now_ms);
        snap.receiver.generated_at_unix_ms = now_ms;
        snap.volumes = views;
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
    }
}

fn view_of_unreadable(row: StatusRow) -> VolumeView {
    let (server, volume) = match &row {
        StatusRow::Volume(v) => (v.server.clone(), v.volume.clone()),
        StatusRow::Unreadable { server, volume, .. } => (server.clone(), volume.clone()),
    };
    VolumeView {
        server,
        volume,
        status: row.to_json(),
        throughput_bytes_per_second: 0.0,
        replicated_bytes_total: 0,
        sent_bytes_total: 0,
        pit_count: None,
        last_pit: None,
        pits: Vec::new(),
        pits_listed_at: None,
        pit_error: None,
        launch_command: None,
        row: Some(row),
    }
}

/// `lifeboat_initial_sync_ratio`: the pass's progress during the initial
/// sync, 1 once the replica has had an epoch closed, else 0.
pub fn initial_sync_ratio(state: VolumeState, progress: f64, epoch: u64) -> f64 {
    match state {
        VolumeState::InitialSync => progress,
        _ if epoch > 0 => 1.0,
        _ => 0.0,
    }
}

/// A word the shell takes as it is, else single-quoted.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@,".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command that restores PIT `id` of a volume into `recovered.img`.
pub fn launch_command(dir: &Path, server: &str, volume: &str, id: &str) -> String {
    format!(
        "lifeboat-receiver launch --dir {} --server {} --volume {} --at {} --out recovered.img",
        shell_word(&dir.display().to_string()),
        shell_word(server),
        shell_word(volume),
        shell_word(id)
    )
}

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const PAGE_STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .2em}.meta{color:#666;font-size:.9em;margin-bottom:1em}\
table{border-collapse:collapse;background:#fff;margin-bottom:1.5em}\
th,td{border:1px solid #ddd;padding:.35em .6em;text-align:left;font-size:.92em;white-space:nowrap}\
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.state{font-weight:600;padding:.1em .45em;border-radius:.3em}\
.s-CONTINUOUS{background:#cfeccf}.s-INITIAL_SYNC,.s-RESCAN{background:#d6e6fa}\
.s-BACKLOG{background:#fde9b8}.s-STALLED,.s-UNKNOWN{background:#f7c6c6}.s-DISCONNECTED{background:#e2e2e2}\
section{background:#fff;border:1px solid #ddd;padding:.6em 1em;margin-bottom:1em}\
h2{font-size:1.1em;margin:.2em 0 .5em}code,pre{font-family:ui-monospace,monospace;font-size:.9em}\
pre{background:#f2f2f2;padding:.5em;overflow-x:auto;display:inline-block;margin:.2em .5em .2em 0}\
.err{color:#a00}";

/// The status page: every volume with its state, lag, backlog, throughput
/// and last PIT, then per volume the PIT list and the launch command. Plain
/// HTML with inline style, reloading itself every few seconds; the only
/// script is the optional copy button.
pub fn render_page(snap: &StatusSnapshot) -> String {
    let r = &snap.receiver;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_S}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>Lifeboat receiver — {n} volumes</title><style>{PAGE_STYLE}</style></head><body>\n\
         <h1>Lifeboat receiver</h1><div class=\"meta\">directory <code>{dir}</code> · store <code>{store}</code> · \
         version {ver} · as of <span id=\"generated-at\">{at}</span> · refreshes every {PAGE_REFRESH_S}s · \
         <a href=\"/api/status\">JSON</a> · <a href=\"/metrics\">metrics</a></div>\n",
        n = snap.volumes.len(),
        dir = esc(&r.dir),
        store = esc(&r.store),
        ver = esc(&r.version),
        at = esc(&r.generated_at),
    );
    if snap.volumes.is_empty() {
        h.push_str("<p id=\"no-volumes\">No volumes yet: enroll a source server and start its agent.</p>\n");
    } else {
        h.push_str(
            "<table id=\"volumes\"><thead><tr><th>Server</th><th>Volume</th><th>State</th>\
             <th>Progress</th><th>Lag</th><th>Backlog</th><th>Throughput</th><th>Epoch</th>\
             <th>Last contact</th><th>Last PIT</th><th>PITs</th></tr></thead><tbody>\n",
        );
        for v in &snap.volumes {
            let (state, cells) = match &v.row {
                Some(StatusRow::Volume(s)) => (
                    s.state.name().to_string(),
                    format!(
                        "<td class=\"num\">{:.1}%</td><td class=\"num\">{:.1}s</td><td class=\"num\">{}</td>\
                         <td class=\"num\">{}/s</td><td class=\"num\">{}</td><td>{}</td>",
                        s.progress * 100.0,
                        s.lag_seconds,
                        human_bytes(s.backlog_bytes),
                        human_bytes(v.throughput_bytes_per_second as u64),
                        s.epoch,
                        esc(&s.last_contact),
                    ),
                ),
                Some(StatusRow::Unreadable { error, .. }) => (
                    "UNKNOWN".to_string(),
                    format!("<td colspan=\"6\" class=\"err\">{}</td>", esc(error)),
                ),
                None => ("UNKNOWN".to_string(), "<td colspan=\"6\"></td>".to_string()),
            };
            let last = match &v.last_pit {
                Some(p) => format!("<code>{}</code> {}", esc(&p.id), esc(&p.time)),
                None if v.pit_count.is_some() => "none".to_string(),
                None => "…".to_string(),
            };
            let _ = writeln!(
                h,
                "<tr class=\"volume\" data-server=\"{s}\" data-volume=\"{vol}\" data-state=\"{st}\">\
                 <td class=\"server\">{s}</td><td class=\"volume-name\">{vol}</td>\
                 <td><span class=\"state s-{st}\">{st}</span></td>{cells}<td>{last}</td><td class=\"num\">{n}</td></tr>",
                s = esc(&v.server),
                vol = esc(&v.volume),
                st = esc(&state),
                n = v.pit_count.map_or("…".to_string(), |n| n.to_string()),
            );
        }
        h.push_str("</tbody></table>\n");
    }
    for v in &snap.volumes {
        let _ = write!(
            h,
            "<section class=\"pits\" data-server=\"{s}\" data-volume=\"{vol}\"><h2>{s} / {vol}</h2>",
            s = esc(&v.server),
            vol = esc(&v.volume)
        );
        if let Some(cmd) = &v.launch_command {
            let _ = write!(
                h,
                "<div>Restore the newest PIT:<br><pre class=\"launch\">{}</pre>\
                 <button type=\"button\" onclick=\"copyCmd(this)\">Copy</button></div>",
                esc(cmd)
            );
        }
        if let Some(e) = &v.pit_error {
            let _ = write!(h, "<p class=\"err\">{}</p>", esc(e));
        }
        match v.pit_count {
            None => h.push_str("<p>PITs not listed yet.</p>"),
            Some(0) => h.push_str("<p>No PITs yet.</p>"),
            Some(n) => {
                let _ = write!(
                    h,
                    "<details{open}><summary>{n} PITs{more}</summary><table class=\"pit-list\">\
                     <thead><tr><th>Id</th><th>Time</th><th>Epoch</th><th>Label</th>\
                     <th>Blocks changed</th><th>Full</th></tr></thead><tbody>",
                    open = if n <= 10 { " open" } else { "" },
                    more = if n as usize > PITS_SHOWN {
                        format!(" (newest {PITS_SHOWN} shown)")
                    } else {
                        String::new()
                    },
                );
                for p in &v.pits {
                    let _ = write!(
                        h,
                        "<tr><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td>{}</td>\
                         <td class=\"num\">{}</td><td>{}</td></tr>",
                        esc(&p.id),
                        esc(&p.time),
                        p.epoch,
                        esc(p.label.as_deref().unwrap_or("")),
                        p.blocks_changed,
                        if p.full { "yes" } else { "no" }
                    );
                }
                h.push_str("</tbody></table></details>");
            }
        }
        h.push_str("</section>\n");
    }
    h.push_str(
        "<script>function copyCmd(b){var t=b.previousElementSibling.textContent;\
         if(navigator.clipboard){navigator.clipboard.writeText(t).then(function(){b.textContent='Copied';});}}</script>\n\
         </body></html>\n",
    );
    h
}

/// Plain HTTP GET of `path` on `addr` (loopback, no keep-alive): the body of
/// a `200` answer, at most `limit` bytes, within `timeout` per step.
fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    limit: u64,
) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(limit).read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let status_line = raw[..split]
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    if !status_line.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("not a 200 answer"));
    }
    Ok(raw[split + 4..].to_vec())
}

/// The status rows from the receiver serving `dir`, if one answers
/// (see the module docs); `None` means: read the status files.
pub fn query_status(dir: &Path) -> Option<Vec<StatusRow>> {
    let text = std::fs::read_to_string(dir.join(HTTP_ADDR_FILE)).ok()?;
    let addr: SocketAddr = text.trim().parse().ok()?;
    let body = http_get(addr, "/api/status", Duration::from_secs(3), 64 << 20).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let want = std::fs::canonicalize(dir).ok()?;
    if v["receiver"]["dir"].as_str() != Some(want.to_str()?) {
        return None;
    }
    // A snapshot not refreshed for a while belongs to a wedged sampler: the
    // files know better.
    let age =
        unix_ms(SystemTime::now()).saturating_sub(v["receiver"]["generated_at_unix_ms"].as_u64()?);
    if age > 10_000 {
        return None;
    }
    v["volumes"]
        .as_array()?
        .iter()
        .map(|x| StatusRow::from_json(&x["status"]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Tracking, VolumeStatus};

    fn status(server: &str, volume: &str, state: VolumeState) -> VolumeStatus {
        VolumeStatus {
            server: server.into(),
            volume: volume.into(),
            state,
            progress: 1.0,
            lag_seconds: 0.25,
            backlog_bytes: 2048,
            epoch: 7,
            last_contact: rfc3339(1_700_000_000_000),
            last_contact_unix_ms: 1_700_000_000_000,
            tracking: Tracking::Tracepoints,
            scan_interval_s: 0,
            connected: true,
            reported_by_agent: true,
            generation: 1,
            volume_bytes: 1 << 30,
            block_size: 65536,
            staging: "/s/x.img".into(),
            updated_at: rfc3339(1_700_000_000_000),
            updated_at_unix_ms: 1_700_000_000_000,
            last_error: None,
            last_error_at: None,
        }
    }

    fn pit(id: &str, ms: u64) -> PitSummary {
        PitSummary {
            id: id.into(),
            time: rfc3339(ms),
            time_unix_ms: ms,
            epoch: 3,
            label: Some("<b>".into()),
            blocks_changed: 10,
            full: true,
            parent: None,
            volume_bytes: 1 << 30,
            key: String::new(),
        }
    }

    fn snapshot() -> StatusSnapshot {
        let row = StatusRow::Volume(status("web-1", "root", VolumeState::Continuous));
        let bad = StatusRow::Unreadable {
            server: "web-<2>".into(),
            volume: "data".into(),
            error: "cannot read status file x: <oops>".into(),
        };
        let pits = [pit("a1", 1_700_000_000_000), pit("b2", 1_700_000_060_000)];
        StatusSnapshot {
            receiver: ReceiverInfo {
                dir: "/srv/lifeboat".into(),
                store: "file:///srv/lifeboat/store".into(),
                version: "0.1.0".into(),
                generated_at: rfc3339(1_700_000_001_000),
                generated_at_unix_ms: 1_700_000_001_000,
            },
            volumes: vec![
                VolumeView {
                    server: "web-1".into(),
                    volume: "root".into(),
                    status: row.to_json(),
                    throughput_bytes_per_second: 3.0 * 1048576.0,
                    replicated_bytes_total: 100,
                    sent_bytes_total: 60,
                    pit_count: Some(2),
                    last_pit: pits.last().cloned(),
                    pits: pits.iter().rev().cloned().collect(),
                    pits_listed_at: Some(rfc3339(1_700_000_000_500)),
                    pit_error: None,
                    launch_command: Some(launch_command(
                        Path::new("/srv/lifeboat"),
                        "web-1",
                        "root",
                        "b2",
                    )),
                    row: Some(row),
                },
                view_of_unreadable(bad),
            ],
        }
    }

    #[test]
    fn api_shape_keeps_the_status_rows_verbatim() {
        let snap = snapshot();
        let v: serde_json::Value = serde_json::to_value(&snap).unwrap();
        for key in [
            "dir",
            "store",
            "version",
            "generated_at",
            "generated_at_unix_ms",
        ] {
            assert!(!v["receiver"][key].is_null(), "{key}: {v}");
        }
        let vols = v["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 2);
        let a = &vols[0];
        for key in [
            "server",
            "volume",
            "status",
            "throughput_bytes_per_second",
            "replicated_bytes_total",
            "sent_bytes_total",
            "pit_count",
            "last_pit",
            "pits",
            "pits_listed_at",
            "pit_error",
            "launch_command",
        ] {
            assert!(a.get(key).is_some(), "{key}: {a}");
        }
        assert!(a.get("row").is_none(), "{a}");
        assert_eq!(a["pits"][0]["id"], "b2", "newest first");
        assert_eq!(a["last_pit"]["id"], "b2");
        assert_eq!(
            a["launch_command"],
            "lifeboat-receiver launch --dir /srv/lifeboat --server web-1 --volume root --at b2 --out recovered.img"
        );
        // `status` reads the rows back exactly as the files give them.
        let rows: Vec<StatusRow> = vols
            .iter()
            .map(|x| StatusRow::from_json(&x["status"]).unwrap())
            .collect();
        assert_eq!(Some(&rows[0]), snap.volumes[0].row.as_ref());
        assert!(matches!(&rows[1], StatusRow::Unreadable { server, .. } if server == "web-<2>"));
        assert_eq!(vols[1]["status"]["state"], "UNKNOWN");
    }

    #[test]
    fn page_lists_volumes_escaped_and_reloads() {
        let page = render_page(&snapshot());
        assert!(page.contains("http-equiv=\"refresh\""), "{page}");
        assert!(
            page.contains("data-server=\"web-1\" data-volume=\"root\" data-state=\"CONTINUOUS\""),
            "{page}"
        );
        assert!(page.contains("3.0 MiB/s"), "{page}");
        assert!(page.contains("--at b2 --out recovered.img"), "{page}");
        assert!(
            page.contains("web-&lt;2&gt;") && !page.contains("web-<2>"),
            "{page}"
        );
        assert!(
            page.contains("&lt;oops&gt;") && page.contains("&lt;b&gt;"),
            "{page}"
        );
        assert!(
            !page.contains("src=") && !page.contains("href=\"http"),
            "no external assets"
        );
        let empty = StatusSnapshot {
            volumes: vec![],
            ..snapshot()
        };
        assert!(render_page(&empty).contains("no-volumes"));
    }

    #[test]
    fn launch_command_quotes_for_the_shell() {
        assert_eq!(
            launch_command(Path::new("/srv/my dir"), "s", "v", "id"),
            "lifeboat-receiver launch --dir '/srv/my dir' --server s --volume v --at id --out recovered.img"
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(initial_sync_ratio(VolumeState::InitialSync, 0.5, 0), 0.5);
        assert_eq!(initial_sync_ratio(VolumeState::Disconnected, 0.0, 3), 1.0);
        assert_eq!(initial_sync_ratio(VolumeState::Disconnected, 0.3, 0), 0.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_the_api_that_status_queries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &crate::store::StoreUrl::parse(dir.path().join("store").to_str().unwrap()).unwrap(),
            &Default::default(),
        )
        .unwrap();
        let t = Telemetry::new(dir.path(), store);
        assert_eq!(query_status(dir.path()), None, "nothing serving");
        let guard = t
            .start(Some("127.0.0.1:0".parse().unwrap()), true)
            .await
            .unwrap()
            .unwrap();
        t.volume("web-1", "root").add_sent_bytes(9);
        let d = dir.path().to_path_buf();
        let rows = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(rows) = query_status(&d) {
                    return rows;
                }
                assert!(Instant::now() < deadline, "no answer");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
        .unwrap();
        assert_eq!(rows, vec![]);
        let addr = guard.local_addr();
        let body = tokio::task::spawn_blocking(move || {
            http_get(addr, "/metrics", Duration::from_secs(3), 1 << 20).unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains(r#"lifeboat_sent_bytes_total{server="web-1",volume="root"} 9"#),
            "{text}"
        );
        drop(guard);
        assert!(!dir.path().join(HTTP_ADDR_FILE).exists());
    }
}
