//! Schedule: when batches are sealed for upload — every `interval` aligned to UTC midnight plus
//! an offset (hourly at minute 40 by default, as Segment copies its logs) — and the clock it
//! reads, injectable so the schedule is tested without sleeping. An operator can also ask for an
//! upload now (SIGUSR1 in the binary), ahead of the schedule. [`Cadence`] turns both, and the
//! checkpoint interval, into what falls due on each turn of the poll loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};

use crate::pipeline::SealTrigger;

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

/// What falls due on the poll thread, for every buffer worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Seal(SealTrigger),
    Checkpoint,
}

/// The timed work of the poll loop: the scheduled seal (wall clock, injectable), a seal an
/// operator asked for, and the checkpoint every `checkpoint_interval` (monotonic time, passed in).
pub struct Cadence {
    schedule: Schedule,
    clock: Arc<dyn Clock>,
    upload_now: Arc<UploadNow>,
    checkpoint_interval: Duration,
    next_seal: DateTime<Utc>,
    next_checkpoint: Instant,
}

impl Cadence {
    pub fn new(
        schedule: Schedule,
        clock: Arc<dyn Clock>,
        upload_now: Arc<UploadNow>,
        checkpoint_interval: Duration,
        started: Instant,
    ) -> Cadence {
        Cadence {
            next_seal: schedule.next_after(clock.now()),
            next_checkpoint: started + checkpoint_interval,
            schedule,
            clock,
            upload_now,
            checkpoint_interval,
        }
    }

    /// When the next scheduled seal is.
    pub fn next_seal(&self) -> DateTime<Utc> {
        self.next_seal
    }

    /// What is due at monotonic time `now`, in the order to send it: a seal goes before the
    /// checkpoint, so the checkpoint records the sealed batch.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let mut due = Vec::new();
        let wall = self.clock.now();
        if wall >= self.next_seal {
            due.push(Due::Seal(SealTrigger::Schedule));
            self.next_seal = self.schedule.next_after(wall);
        }
        if self.upload_now.take() {
            tracing::info!("upload requested: sealing every open batch");
            due.push(Due::Seal(SealTrigger::Requested));
        }
        if now >= self.next_checkpoint {
            due.push(Due::Checkpoint);
            self.next_checkpoint = now + self.checkpoint_interval;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wall clock the test moves.
    struct Manual(std::sync::Mutex<DateTime<Utc>>);
    impl Clock for Manual {
        fn now(&self) -> DateTime<Utc> {
            *self.0.lock().unwrap()
        }
    }

    #[test]
    fn the_cadence_seals_on_schedule_on_request_and_checkpoints_on_its_interval() {
        let clock = Arc::new(Manual(std::sync::Mutex::new(at("2026-11-25T10:39:58Z"))));
        let upload_now = Arc::new(UploadNow::default());
        let start = Instant::now();
        let mut cadence = Cadence::new(
            Schedule::new(3600, 2400),
            clock.clone(),
            upload_now.clone(),
            Duration::from_secs(10),
            start,
        );
        assert_eq!(cadence.next_seal(), at("2026-11-25T10:40:00Z"));
        assert_eq!(cadence.due(start), vec![]);
        *clock.0.lock().unwrap() = at("2026-11-25T10:40:00Z");
        assert_eq!(
            cadence.due(start + Duration::from_secs(10)),
            vec![Due::Seal(SealTrigger::Schedule), Due::Checkpoint]
        );
        assert_eq!(cadence.next_seal(), at("2026-11-25T11:40:00Z"));
        // Nothing again until the next slot and the next interval.
        assert_eq!(cadence.due(start + Duration::from_secs(19)), vec![]);
        upload_now.request();
        assert_eq!(
            cadence.due(start + Duration::from_secs(20)),
            vec![Due::Seal(SealTrigger::Requested), Due::Checkpoint]
        );
        // A clock that jumped hours ahead seals once, then waits for the next slot after it.
        *clock.0.lock().unwrap() = at("2026-11-25T15:00:00Z");
        assert_eq!(
            cadence.due(start + Duration::from_secs(21)),
            vec![Due::Seal(SealTrigger::Schedule)]
        );
        assert_eq!(cadence.next_seal(), at("2026-11-25T15:40:00Z"));
    }

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
