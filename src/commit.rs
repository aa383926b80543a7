//! Commit: turns "this batch is in S3" into a committed Kafka offset, on the poll thread that
//! owns the consumer.
//!
//! Every assignment of a partition gets a fresh epoch. An upload finished for an older epoch
//! (the partition was revoked, maybe reassigned, meanwhile) is never committed: the new owner
//! replays it. Kafka itself fences members of older group generations; the epoch also fences this
//! member's own stale work, which the broker cannot tell apart.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Which partitions this member owns right now, and since which assignment.
#[derive(Debug, Default)]
pub struct Assignments {
    current: Mutex<HashMap<i32, u64>>,
    next_epoch: AtomicU64,
}

impl Assignments {
    /// Records a new assignment and returns its epoch.
    pub fn assign(&self, partition: i32) -> u64 {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        self.current
            .lock()
            .expect("assignments lock")
            .insert(partition, epoch);
        epoch
    }

    pub fn revoke(&self, partition: i32) {
        self.current
            .lock()
            .expect("assignments lock")
            .remove(&partition);
    }

    /// Whether work started under `epoch` still belongs to this member.
    pub fn is_current(&self, partition: i32, epoch: u64) -> bool {
        self.current
            .lock()
            .expect("assignments lock")
            .get(&partition)
            == Some(&epoch)
    }

    pub fn partitions(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self
            .current
            .lock()
            .expect("assignments lock")
            .keys()
            .copied()
            .collect();
        partitions.sort_unstable();
        partitions
    }
}

/// "Every file of the batch ending before `next_offset` is in S3": commit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitRequest {
    pub partition: i32,
    pub epoch: u64,
    pub next_offset: i64,
}

/// Commits waiting for the broker, per partition. Requests of one partition arrive in batch
/// order, so a later request covers an earlier one that has not gone through yet.
#[derive(Debug, Default)]
pub struct PendingCommits {
    pending: BTreeMap<i32, Pending>,
}

#[derive(Debug)]
struct Pending {
    request: CommitRequest,
    attempts: u32,
    not_before: Instant,
}

/// What to do with a pending commit after one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed(CommitRequest),
    /// The partition is no longer ours under that epoch: dropped, the new owner replays it.
    Stale(CommitRequest),
    Retry,
}

impl PendingCommits {
    pub fn push(&mut self, request: CommitRequest, now: Instant) {
        let entry = self.pending.entry(request.partition);
        match entry {
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                let pending = slot.get_mut();
                if request.epoch != pending.request.epoch
                    || request.next_offset >= pending.request.next_offset
                {
                    pending.request = request;
                }
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(Pending {
                    request,
                    attempts: 0,
                    not_before: now,
                });
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Tries every due commit with `commit`; failed ones back off (100 ms doubling to 5 s).
    pub fn run(
        &mut self,
        now: Instant,
        is_current: impl Fn(&CommitRequest) -> bool,
        mut commit: impl FnMut(&CommitRequest) -> Result<(), String>,
    ) -> Vec<CommitOutcome> {
        let mut outcomes = Vec::new();
        let due: Vec<i32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.not_before <= now)
            .map(|(&partition, _)| partition)
            .collect();
        for partition in due {
            let pending = self.pending.get_mut(&partition).expect("due entry");
            let request = pending.request;
            if !is_current(&request) {
                self.pending.remove(&partition);
                outcomes.push(CommitOutcome::Stale(request));
                continue;
            }
            match commit(&request) {
                Ok(()) => {
                    self.pending.remove(&partition);
                    outcomes.push(CommitOutcome::Committed(request));
                }
                Err(error) => {
                    pending.attempts += 1;
                    let delay = Duration::from_millis(100)
                        .saturating_mul(2u32.saturating_pow(pending.attempts.min(6)))
                        .min(Duration::from_secs(5));
                    pending.not_before = now + delay;
                    tracing::warn!(
                        partition,
                        next_offset = request.next_offset,
                        attempts = pending.attempts,
                        %error,
                        "offset commit failed, will retry"
                    );
                    outcomes.push(CommitOutcome::Retry);
                }
            }
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_fence_work_of_an_earlier_assignment() {
        let assignments = Assignments::default();
        let first = assignments.assign(3);
        assert!(assignments.is_current(3, first));
        assignments.revoke(3);
        assert!(!assignments.is_current(3, first));
        let second = assignments.assign(3);
        assert_ne!(first, second);
        assert!(!assignments.is_current(3, first));
        assert!(assignments.is_current(3, second));
        assert_eq!(assignments.partitions(), vec![3]);
    }

    #[test]
    fn later_requests_cover_earlier_ones_and_stale_ones_are_dropped() {
        let now = Instant::now();
        let mut pending = PendingCommits::default();
        let req = |partition, epoch, next_offset| CommitRequest {
            partition,
            epoch,
            next_offset,
        };
        pending.push(req(0, 1, 100), now);
        pending.push(req(0, 1, 200), now);
        pending.push(req(1, 5, 50), now);
        let mut committed = Vec::new();
        let outcomes = pending.run(
            now,
            |r| r.epoch == 1,
            |r| {
                committed.push(*r);
                Ok(())
            },
        );
        assert_eq!(committed, vec![req(0, 1, 200)]);
        assert_eq!(
            outcomes,
            vec![
                CommitOutcome::Committed(req(0, 1, 200)),
                CommitOutcome::Stale(req(1, 5, 50))
            ]
        );
        assert!(pending.is_empty());
    }

    #[test]
    fn failed_commits_back_off_and_retry() {
        let now = Instant::now();
        let mut pending = PendingCommits::default();
        let request = CommitRequest {
            partition: 0,
            epoch: 1,
            next_offset: 10,
        };
        pending.push(request, now);
        let fail = |_: &CommitRequest| Err("REBALANCE_IN_PROGRESS".to_string());
        assert_eq!(pending.run(now, |_| true, fail), vec![CommitOutcome::Retry]);
        // Not due again right away.
        assert_eq!(pending.run(now, |_| true, fail), vec![]);
        let later = now + Duration::from_secs(1);
        assert_eq!(
            pending.run(later, |_| true, |_| Ok(())),
            vec![CommitOutcome::Committed(request)]
        );
    }
}
