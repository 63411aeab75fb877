//! Progress of a scan: a bar on a terminal, periodic log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

use crate::scan::ScanStats;

/// A progress display that follows [`ScanStats`] until finished.
pub struct Progress {
    bar: Option<ProgressBar>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts showing progress towards `total_bytes` scanned.
    pub fn new(total_bytes: u64, stats: Arc<ScanStats>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_bytes);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} scan [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        });
        let ticker = {
            let bar = bar.clone();
            tokio::spawn(async move {
                let mut last_log = std::time::Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let done = stats.scanned_bytes.load(Ordering::Relaxed);
                    let changed = stats.changed_blocks.load(Ordering::Relaxed);
                    match &bar {
                        Some(bar) => {
                            bar.set_position(done);
                            bar.set_message(format!("{changed} changed"));
                        }
                        None if last_log.elapsed() >= Duration::from_secs(2) => {
                            last_log = std::time::Instant::now();
                            info!(
                                scanned_bytes = done,
                                total_bytes,
                                percent = format!(
                                    "{:.1}",
                                    done as f64 * 100.0 / total_bytes.max(1) as f64
                                ),
                                changed_blocks = changed,
                                "scan progress"
                            );
                        }
                        None => {}
                    }
                }
            })
        };
        Progress { bar, ticker }
    }

    /// Stops the display.
    pub fn finish(&self) {
        self.ticker.abort();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
