//! Retention: which PITs of a volume to keep, as a pure function of their
//! times, a [`RetentionPolicy`] and `now`. No IO; [`crate::gc`] carries out
//! what [`plan`] decides.
//!
//! ## Rules
//! A PIT is kept if any rule keeps it; every rule is applied on its own, so a
//! PIT can be kept for several reasons ([`Decision::reasons`]).
//! - `keep_last` (at least 1): the newest N PITs in listing order (by epoch,
//!   as [`crate::pit::list_pits`] returns them). The newest PIT is therefore
//!   never expired, which matters: it is the parent a PIT in progress builds
//!   on.
//! - `keep_within`: every PIT younger than this, relative to `now` (age
//!   strictly below; `0s` turns the rule off).
//! - `keep_hourly`, `keep_daily`, `keep_weekly`, `keep_monthly`: walking the
//!   PITs from newest to oldest, the newest PIT of each UTC hour / day / ISO
//!   week (Monday to Sunday) / calendar month not yet seen, until N such
//!   buckets were kept. The rules count *buckets that hold a PIT*, not
//!   calendar time: a source that was offline for three weeks still keeps its
//!   last 7 daily PITs instead of losing every one of them.
//! - A PIT whose time is after `now` (a clock that jumped) is kept, and takes
//!   no bucket: a bad clock does not push real PITs out.
//!
//! Times that go backwards in listing order (a corrected clock) are handled:
//! each bucket keeps at most one PIT, the first met walking newest → oldest.
//!
//! The defaults are AWS DRS's: every PIT of the last hour (PITs come every 10
//! minutes), one per hour for 24 hours, one per day for 7 days.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// How many PITs of a volume to keep (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetentionPolicy {
    /// The newest N PITs (at least 1).
    pub keep_last: u32,
    /// Every PIT younger than this.
    #[serde(serialize_with = "serialize_duration")]
    pub keep_within: Duration,
    /// The newest PIT of each of the last N hours that hold one.
    pub keep_hourly: u32,
    /// The newest PIT of each of the last N days that hold one.
    pub keep_daily: u32,
    /// The newest PIT of each of the last N ISO weeks that hold one.
    pub keep_weekly: u32,
    /// The newest PIT of each of the last N months that hold one.
    pub keep_monthly: u32,
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

impl Default for RetentionPolicy {
    /// DRS's default: everything of the last hour, hourly for a day, daily
    /// for a week.
    fn default() -> Self {
        RetentionPolicy {
            keep_last: 1,
            keep_within: Duration::from_secs(3600),
            keep_hourly: 24,
            keep_daily: 7,
            keep_weekly: 0,
            keep_monthly: 0,
        }
    }
}

impl RetentionPolicy {
    /// Checks the policy; the error names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_last < 1 {
            return Err(format!(
                "keep_last = {}: at least 1 (the newest PIT is the parent of the next one)",
                self.keep_last
            ));
        }
        Ok(())
    }
}

impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "keep_last {}, keep_within {}, keep_hourly {}, keep_daily {}, keep_weekly {}, keep_monthly {}",
            self.keep_last,
            humantime::format_duration(self.keep_within),
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly
        )
    }
}

/// A calendar bucket of a count-based rule (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    /// A clock hour.
    Hour,
    /// A day.
    Day,
    /// An ISO week, Monday to Sunday.
    Week,
    /// A calendar month.
    Month,
}

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// 1970-01-01 was a Thursday: day 0 is the fourth day (index 3) of its week.
const EPOCH_WEEKDAY_FROM_MONDAY: u64 = 3;

impl Period {
    /// All periods, in the order rules are applied and reasons listed.
    pub const ALL: [Period; 4] = [Period::Hour, Period::Day, Period::Week, Period::Month];

    /// The rule's name in `receiver.toml`'s words.
    pub fn rule(self) -> &'static str {
        match self {
            Period::Hour => "hourly",
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
        }
    }

    /// The bucket holding `unix_ms`: equal numbers mean the same bucket.
    pub fn bucket(self, unix_ms: u64) -> u64 {
        let day = unix_ms / DAY_MS;
        match self {
            Period::Hour => unix_ms / HOUR_MS,
            Period::Day => day,
            Period::Week => (day + EPOCH_WEEKDAY_FROM_MONDAY) / 7,
            Period::Month => match utc(unix_ms) {
                Some(t) => (t.year() as u64) * 12 + (u8::from(t.month()) as u64 - 1),
                // Past year 9999: a bucket per day, far from any real month.
                None => (1 << 40) + day,
            },
        }
    }

    /// The bucket of `unix_ms` for people: `2025-01-10T11Z`, `2025-01-10`,
    /// `2025-W02`, `2025-01`.
    pub fn label(self, unix_ms: u64) -> String {
        let Some(t) = utc(unix_ms) else {
            return format!("{} #{}", self.rule(), self.bucket(unix_ms));
        };
        let (y, m, d) = (t.year(), u8::from(t.month()), t.day());
        match self {
            Period::Hour => format!("{y:04}-{m:02}-{d:02}T{:02}Z", t.hour()),
            Period::Day => format!("{y:04}-{m:02}-{d:02}"),
            Period::Week => {
                let (iy, w, _) = t.date().to_iso_week_date();
                format!("{iy:04}-W{w:02}")
            }
            Period::Month => format!("{y:04}-{m:02}"),
        }
    }
}

fn utc(unix_ms: u64) -> Option<time::OffsetDateTime> {
    let nanos = i128::from(unix_ms).checked_mul(1_000_000)?;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// Why a PIT is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// Among the newest `keep_last` (1 = the newest).
    Last {
        /// Its rank, 1 for the newest.
        rank: u32,
    },
    /// Younger than `keep_within`.
    Within(Duration),
    /// Its time is after `now`.
    Future,
    /// The newest PIT of a bucket of a count-based rule.
    Bucket {
        /// Which rule.
        period: Period,
        /// The bucket, for people.
        label: String,
    },
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Last { rank: 1 } => f.write_str("newest"),
            KeepReason::Last { rank } => write!(f, "last {rank}"),
            KeepReason::Within(d) => write!(f, "within {}", humantime::format_duration(*d)),
            KeepReason::Future => f.write_str("in the future"),
            KeepReason::Bucket { period, label } => write!(f, "{} {label}", period.rule()),
        }
    }
}

impl Serialize for KeepReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What [`plan`] decided for one PIT.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the PIT is kept.
    pub keep: bool,
    /// Every rule that keeps it (empty when it expires).
    pub reasons: Vec<KeepReason>,
}

impl Decision {
    /// The reasons joined for people: `newest, within 1h, hourly 2025-01-10T11Z`,
    /// or `expired`.
    pub fn explain(&self) -> String {
        if self.reasons.is_empty() {
            return "expired".to_string();
        }
        self.reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Decides which PITs to keep. `times_unix_ms` are the times of one volume's
/// live PITs, oldest first as [`crate::pit::list_pits`] lists them; the
/// result has one [`Decision`] per PIT, in the same order.
pub fn plan(times_unix_ms: &[u64], policy: &RetentionPolicy, now_unix_ms: u64) -> Vec<Decision> {
    let mut out = vec![Decision::default(); times_unix_ms.len()];
    let within_ms = u64::try_from(policy.keep_within.as_millis()).unwrap_or(u64::MAX);
    let mut left = [
        policy.keep_hourly,
        policy.keep_daily,
        policy.keep_weekly,
        policy.keep_monthly,
    ];
    let mut seen: [HashSet<u64>; 4] = Default::default();
    // The keep_last rule needs at least one, whatever the caller passed.
    let keep_last = policy.keep_last.max(1) as usize;
    for (rank, (t, d)) in times_unix_ms.iter().zip(out.iter_mut()).rev().enumerate() {
        let t = *t;
        if rank < keep_last {
            d.reasons.push(KeepReason::Last {
                rank: rank as u32 + 1,
            });
        }
        if t > now_unix_ms {
            d.reasons.push(KeepReason::Future);
        } else {
            if now_unix_ms - t < within_ms {
                d.reasons.push(KeepReason::Within(policy.keep_within));
            }
            for (k, period) in Period::ALL.into_iter().enumerate() {
                if left[k] > 0 && seen[k].insert(period.bucket(t)) {
                    left[k] -= 1;
                    d.reasons.push(KeepReason::Bucket {
                        period,
                        label: period.label(t),
                    });
                }
            }
        }
        d.keep = !d.reasons.is_empty();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-01-06T00:00:00Z, a Monday.
    const MON: u64 = 1_736_121_600_000;
    const MIN: u64 = 60_000;

    fn at(day: u64, hour: u64, minute: u64) -> u64 {
        MON + day * DAY_MS + hour * HOUR_MS + minute * MIN
    }

    fn kept(times: &[u64], policy: &RetentionPolicy, now: u64) -> Vec<usize> {
        plan(times, policy, now)
            .iter()
            .enumerate()
            .filter(|(_, d)| d.keep)
            .map(|(i, _)| i)
            .collect()
    }

    fn only(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy {
            keep_last: 1,
            keep_within: Duration::ZERO,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        };
        f(&mut p);
        p
    }

    #[test]
    fn the_calendar_is_utc_and_weeks_start_on_monday() {
        assert_eq!(Period::Day.label(MON), "2025-01-06");
        assert_eq!(Period::Week.label(MON), "2025-W02");
        // Sunday 23:59:59.999 and the Monday after are different weeks.
        assert_ne!(
            Period::Week.bucket(MON - 1),
            Period::Week.bucket(MON),
            "a week starts on Monday"
        );
        assert_eq!(Period::Week.bucket(MON), Period::Week.bucket(at(6, 23, 59)));
        assert_eq!(Period::Week.label(MON - 1), "2025-W01");
        // 1970-01-01 (Thursday) and 1969-12-29 (Monday) share a week; the
        // Monday after starts the next.
        assert_eq!(Period::Week.bucket(0), Period::Week.bucket(3 * DAY_MS + 1));
        assert_eq!(Period::Week.bucket(4 * DAY_MS), 1);
        assert_eq!(Period::Week.bucket(4 * DAY_MS - 1), 0);
        // Hour and day edges are exact.
        assert_ne!(
            Period::Hour.bucket(at(0, 1, 0) - 1),
            Period::Hour.bucket(at(0, 1, 0))
        );
        assert_eq!(Period::Hour.label(at(0, 13, 59)), "2025-01-06T13Z");
        assert_ne!(Period::Day.bucket(MON - 1), Period::Day.bucket(MON));
        // Months: January 31st and February 1st differ; a year wraps.
        let feb1 = 1_738_368_000_000; // 2025-02-01T00:00:00Z
        assert_eq!(Period::Month.label(feb1 - 1), "2025-01");
        assert_eq!(Period::Month.label(feb1), "2025-02");
        assert_eq!(
            Period::Month.bucket(feb1) - Period::Month.bucket(feb1 - 1),
            1
        );
        let jan1_2025 = 1_735_689_600_000;
        assert_eq!(
            Period::Month.bucket(jan1_2025) - Period::Month.bucket(jan1_2025 - 1),
            1
        );
        // Absurd times still bucket and label without panicking.
        assert!(Period::Month.label(u64::MAX).contains("monthly"));
        assert_ne!(
            Period::Month.bucket(u64::MAX),
            Period::Month.bucket(u64::MAX - DAY_MS)
        );
    }

    #[test]
    fn defaults_reproduce_drs() {
        let p = RetentionPolicy::default();
        assert_eq!(p.keep_last, 1);
        assert_eq!(p.keep_within, Duration::from_secs(3600));
        assert_eq!((p.keep_hourly, p.keep_daily, p.keep_weekly), (24, 7, 0));
        // A PIT every 10 minutes for 10 days; now = the last PIT.
        let times: Vec<u64> = (0..10 * 144).map(|i| MON + i * 10 * MIN).collect();
        let now = *times.last().expect("pits");
        let decisions = plan(&times, &p, now);
        let keep: Vec<u64> = times
            .iter()
            .zip(&decisions)
            .filter(|(_, d)| d.keep)
            .map(|(t, _)| *t)
            .collect();
        let mut want = Vec::new();
        // Daily: 23:50 of days 3..=8 (day 9 is in the hourly set).
        want.extend((3..9).map(|d| at(d, 23, 50)));
        // Hourly: :50 of every hour of day 9 but the last.
        want.extend((0..23).map(|h| at(9, h, 50)));
        // The last hour: 23:00 .. 23:50 of day 9.
        want.extend((0..6).map(|m| at(9, 23, m * 10)));
        assert_eq!(keep, want);
        assert_eq!(keep.len(), 6 + 23 + 6);
        let last = decisions.last().expect("last");
        assert_eq!(
            last.explain(),
            "newest, within 1h, hourly 2025-01-15T23Z, daily 2025-01-15"
        );
        let i = times.iter().position(|t| *t == at(9, 22, 50)).expect("t");
        assert_eq!(decisions[i].explain(), "hourly 2025-01-15T22Z");
        assert_eq!(decisions[i - 1].explain(), "expired");
        assert!(decisions[i - 1].reasons.is_empty() && !decisions[i - 1].keep);
    }

    #[test]
    fn keep_within_is_strictly_younger_and_relative_to_now() {
        let times: Vec<u64> = (0..12).map(|i| at(0, 0, i * 10)).collect();
        let p = only(|p| p.keep_within = Duration::from_secs(3600));
        // now = 01:50: ages 0..110 min; under 60 min: 01:00(50) .. 01:50(0).
        assert_eq!(kept(&times, &p, at(0, 1, 50)), vec![6, 7, 8, 9, 10, 11]);
        // One ms later, 00:50 is exactly an hour old and goes.
        assert_eq!(kept(&times, &p, at(0, 1, 50) + 1), vec![6, 7, 8, 9, 10, 11]);
        assert_eq!(
            kept(&times, &p, at(0, 1, 50) - 1),
            vec![5, 6, 7, 8, 9, 10, 11]
        );
        // Long after: only the newest survives (keep_last = 1).
        assert_eq!(kept(&times, &p, at(5, 0, 0)), vec![11]);
        // 0s turns the rule off.
        assert_eq!(kept(&times, &only(|_| {}), at(0, 1, 50)), vec![11]);
    }

    #[test]
    fn keep_last_counts_in_listing_order_and_is_at_least_one() {
        let times: Vec<u64> = (0..5).map(|i| at(0, 0, i)).collect();
        assert_eq!(
            kept(&times, &only(|p| p.keep_last = 3), at(9, 0, 0)),
            vec![2, 3, 4]
        );
        assert_eq!(
            kept(&times, &only(|p| p.keep_last = 0), at(9, 0, 0)),
            vec![4],
            "the newest is always kept"
        );
        assert!(only(|p| p.keep_last = 0)
            .validate()
            .expect_err("0")
            .contains("keep_last"));
        assert!(RetentionPolicy::default().validate().is_ok());
        // The newest in listing order, even when a clock made it look older.
        let jumped = [at(0, 5, 0), at(0, 1, 0)];
        assert_eq!(kept(&jumped, &only(|_| {}), at(9, 0, 0)), vec![1]);
        assert!(plan(&[], &RetentionPolicy::default(), 0).is_empty());
    }

    #[test]
    fn buckets_count_pits_not_calendar_time() {
        // Daily PITs with a three-week gap: keep_daily 7 still keeps 7.
        let mut times: Vec<u64> = (0..5).map(|d| at(d, 12, 0)).collect();
        times.extend((26..30).map(|d| at(d, 12, 0)));
        let p = only(|p| p.keep_daily = 7);
        assert_eq!(kept(&times, &p, at(40, 0, 0)), vec![2, 3, 4, 5, 6, 7, 8]);
        // Several PITs a day: only the newest of each day counts.
        let times = [at(0, 1, 0), at(0, 23, 0), at(1, 0, 0), at(1, 5, 0)];
        assert_eq!(kept(&times, &p, at(9, 0, 0)), vec![1, 3]);
        // An empty rule keeps nothing extra.
        assert_eq!(kept(&times, &only(|_| {}), at(9, 0, 0)), vec![3]);
    }

    #[test]
    fn weekly_and_monthly_rules() {
        // One PIT a day for 10 weeks, Monday first.
        let times: Vec<u64> = (0..70).map(|d| at(d, 6, 0)).collect();
        let p = only(|p| p.keep_weekly = 3);
        // The Sunday of each of the last three weeks.
        assert_eq!(kept(&times, &p, at(80, 0, 0)), vec![55, 62, 69]);
        let d = plan(&times, &p, at(80, 0, 0));
        assert_eq!(d[62].explain(), "weekly 2025-W10");
        let p = only(|p| p.keep_monthly = 2);
        // Days 0..70 from 2025-01-06 end on 2025-03-16: the last PITs of
        // February (day 53) and of March (day 69).
        assert_eq!(kept(&times, &p, at(80, 0, 0)), vec![53, 69]);
        assert_eq!(
            plan(&times, &p, at(80, 0, 0))[53].explain(),
            "monthly 2025-02"
        );
    }

    #[test]
    fn future_pits_are_kept_and_take_no_bucket() {
        let now = at(3, 0, 0);
        // The newest two are "tomorrow" (a clock that jumped ahead).
        let times = [
            at(0, 12, 0),
            at(1, 12, 0),
            at(2, 12, 0),
            at(4, 0, 0),
            at(5, 0, 0),
        ];
        let p = only(|p| p.keep_daily = 2);
        let d = plan(&times, &p, now);
        assert_eq!(
            d.iter().map(|d| d.keep).collect::<Vec<_>>(),
            [false, true, true, true, true]
        );
        assert_eq!(d[3].explain(), "in the future");
        assert_eq!(d[4].explain(), "newest, in the future");
        assert_eq!(d[2].explain(), "daily 2025-01-08");
    }

    #[test]
    fn a_clock_that_went_back_keeps_one_pit_per_bucket() {
        // Listing order (epochs) disagrees with time: the clock was set back
        // an hour between the second and third PIT.
        let times = [at(0, 10, 0), at(0, 10, 30), at(0, 9, 40), at(0, 10, 10)];
        let p = only(|p| p.keep_hourly = 5);
        let d = plan(&times, &p, at(1, 0, 0));
        // Newest → oldest: 10:10 takes hour 10, 9:40 takes hour 9; 10:30 and
        // 10:00 find hour 10 taken.
        assert_eq!(
            d.iter().map(|d| d.keep).collect::<Vec<_>>(),
            [false, false, true, true]
        );
    }

    #[test]
    fn reasons_serialize_as_text() {
        let d = plan(&[at(0, 0, 0)], &RetentionPolicy::default(), at(0, 0, 30));
        let json = serde_json::to_value(&d[0]).expect("json");
        assert_eq!(json["keep"], true);
        assert_eq!(json["reasons"][0], "newest");
        assert_eq!(json["reasons"][1], "within 1h");
        assert_eq!(
            RetentionPolicy::default().to_string(),
            "keep_last 1, keep_within 1h, keep_hourly 24, keep_daily 7, keep_weekly 0, keep_monthly 0"
        );
    }
}
