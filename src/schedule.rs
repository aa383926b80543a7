//! Schedule: when batches are sealed for upload — every `interval` aligned to UTC midnight plus
//! an offset (hourly at minute 40 by default, as Segment copies its logs) — and the clock it
//! reads, injectable so the schedule is tested without sleeping. An operator can also ask for an
//! upload now (SIGUSR1 in the binary), ahead of the schedule.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, TimeZone, Utc};

/// A request to seal and upload every open batch now rather than at the next scheduled time:
/// before draining a node, to check a pipeline end to end without waiting for the hour, or to
/// time a backlog (`scripts/bench.sh`). Requests made before the poll loop sees one merge.
#[derive(Debug, Default)]
pub struct UploadNow(AtomicBool);

impl UploadNow {
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a request is pending; answering clears it.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// Source of the current time.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Upload times: every `interval_secs` seconds at `offset_secs` past each aligned slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    interval_secs: i64,
    offset_secs: i64,
}

impl Schedule {
    /// `interval_secs` divides a day and `offset_secs < interval_secs` (checked by the config),
    /// so slots counted from the epoch are aligned to every UTC midnight.
    pub fn new(interval_secs: u64, offset_secs: u64) -> Schedule {
        Schedule {
            interval_secs: interval_secs.max(1) as i64,
            offset_secs: offset_secs as i64,
        }
    }

    /// The first upload time strictly after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let seconds = now.timestamp() - self.offset_secs;
        let slot = seconds.div_euclid(self.interval_secs) + 1;
        Utc.timestamp_opt(slot * self.interval_secs + self.offset_secs, 0)
            .single()
            .expect("in range")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_requests_merge_until_taken() {
        let now = UploadNow::default();
        assert!(!now.take());
        now.request();
        now.request();
        assert!(now.take());
        assert!(
            !now.take(),
            "two requests before the loop looked are one upload"
        );
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn hourly_at_minute_forty_by_default() {
        let schedule = Schedule::new(3600, 2400);
        assert_eq!(
            schedule.next_after(at("2026-11-25T10:00:00Z")),
            at("2026-11-25T10:40:00Z")
        );
        assert_eq!(
            schedule.next_after(at("2026-11-25T10:39:59.9Z")),
            at("2026-11-25T10:40:00Z")
        );
        assert_eq!(
            schedule.next_after(at("2026-11-25T10:40:00Z")),
            at("2026-11-25T11:40:00Z")
        );
        assert_eq!(
            schedule.next_after(at("2026-11-25T23:41:00Z")),
            at("2026-11-26T00:40:00Z")
        );
    }

    #[test]
    fn short_intervals_for_tests() {
        let schedule = Schedule::new(5, 0);
        assert_eq!(
            schedule.next_after(at("2026-11-25T10:00:03Z")),
            at("2026-11-25T10:00:05Z")
        );
        assert_eq!(
            schedule.next_after(at("2026-11-25T10:00:05Z")),
            at("2026-11-25T10:00:10Z")
        );
    }

    #[test]
    fn a_manual_clock_drives_the_schedule() {
        struct Fixed(DateTime<Utc>);
        impl Clock for Fixed {
            fn now(&self) -> DateTime<Utc> {
                self.0
            }
        }
        let clock = Fixed(at("2026-11-25T00:39:00Z"));
        let schedule = Schedule::new(900, 600);
        assert_eq!(schedule.next_after(clock.now()), at("2026-11-25T00:40:00Z"));
    }
}
