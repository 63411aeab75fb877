//! Process metrics read from `/proc/self` at each scrape: CPU time, resident
//! and virtual memory, open and maximum file descriptors, start time. Names
//! follow the Prometheus client libraries' conventions (`process_*`), so the
//! usual dashboards work unchanged. Anything unreadable (not Linux, a
//! restricted `/proc`) is left out of the scrape rather than reported as 0.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second of the times in `/proc/<pid>/stat`: the kernel's
/// `USER_HZ`, which is 100 on every Linux architecture (it is ABI, unlike
/// the internal `HZ`).
const USER_HZ: f64 = 100.0;

/// Reports the `process_*` metrics on every scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What `/proc/self/stat` says, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatTimes {
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    /// Start time, in seconds since boot.
    pub start_since_boot_seconds: f64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself hold spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn parse_stat(text: &str) -> Option<StatTimes> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0; utime (14) is 11, stime
    // (15) is 12, starttime (22) is 19.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some(StatTimes {
        cpu_seconds: (num(11)? + num(12)?) as f64 / USER_HZ,
        start_since_boot_seconds: num(19)? as f64 / USER_HZ,
    })
}

/// The boot time (`btime`, Unix seconds) from `/proc/stat`.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `Vm*:   1234 kB` line of `/proc/<pid>/status`, in bytes.
pub fn parse_status_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let v = line.split(':').nth(1)?.trim();
    let kib: u64 = v.strip_suffix("kB").unwrap_or(v).trim().parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit of "Max open files" in `/proc/<pid>/limits`.
pub fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let stat = read("/proc/self/stat").and_then(|t| parse_stat(&t));
        if let Some(s) = stat {
            let c = ConstCounter::new(s.cpu_seconds);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
            if let Some(btime) = read("/proc/stat").and_then(|t| parse_btime(&t)) {
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch in seconds",
                    btime as f64 + s.start_since_boot_seconds,
                )?;
            }
        }
        if let Some(status) = read("/proc/self/status") {
            if let Some(rss) = parse_status_kib(&status, "VmRSS") {
                gauge(
                    &mut encoder,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    rss as f64,
                )?;
            }
            if let Some(vm) = parse_status_kib(&status, "VmSize") {
                gauge(
                    &mut encoder,
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    vm as f64,
                )?;
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle being read is one of the entries.
            let open = dir.count().saturating_sub(1);
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                open as f64,
            )?;
        }
        if let Some(max) = read("/proc/self/limits").and_then(|t| parse_max_fds(&t)) {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max as f64,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 2000 0 0 0 \
                    250 150 0 0 20 0 8 0 12345 104857600 2560 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(StatTimes {
                cpu_seconds: 4.0,
                start_since_boot_seconds: 123.45
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        let status = "Name:\tx\nVmSize:\t  20480 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(1 << 20));
        assert_eq!(parse_status_kib(status, "VmSize"), Some(20 << 20));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
    }

    #[test]
    fn this_process_reports_sane_values() {
        let s = parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert!(s.cpu_seconds >= 0.0 && s.start_since_boot_seconds > 0.0);
    }
}
