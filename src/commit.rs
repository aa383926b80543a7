//! Commit: turns "this batch is in S3" into a committed Kafka offset, on the poll thread that
//! owns the consumer.
//!
//! Every assignment of a partition gets a fresh epoch. An upload finished for an older epoch
//! (the partition was revoked, maybe reassigned, meanwhile) is never committed: the new owner
//! replays it. Kafka itself fences members of older group generations; the epoch also fences this
//! member's own stale work, which the broker cannot tell apart.
//!
//! The first intent committed is read back ([`MetadataCheck`]): a broker that drops commit
//! metadata cannot carry the exactly-once protocol.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::ExactlyOnce;
use crate::pipeline::{CommitRequest, CommitResult};
use crate::retry::{Backoff, ErrorClass, NoJitter};

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

    /// The epoch of `partition`'s assignment now, if this member owns it.
    pub fn epoch(&self, partition: i32) -> Option<u64> {
        self.current
            .lock()
            .expect("assignments lock")
            .get(&partition)
            .copied()
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

/// Commits waiting for the broker, per partition. Requests of one partition arrive in batch
/// order, so a later request covers an earlier one that has not gone through yet (the intent of
/// batch N+1 commits the offset that completes batch N).
#[derive(Debug, Default)]
pub struct PendingCommits {
    pending: BTreeMap<i32, Pending>,
}

#[derive(Debug)]
struct Pending {
    partition: i32,
    epoch: u64,
    next_offset: i64,
    metadata: String,
    replies: Vec<tokio::sync::oneshot::Sender<CommitResult>>,
    backoff: Backoff<NoJitter>,
    not_before: Instant,
}

/// Commit retries: 100 ms doubling to 5 s, well inside a session timeout.
fn commit_backoff() -> Backoff<NoJitter> {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5), NoJitter)
}

/// One commit as the poll thread sends it to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitAttempt {
    pub partition: i32,
    pub epoch: u64,
    pub next_offset: i64,
    pub metadata: String,
}

/// What happened to a pending commit in one round.
#[derive(Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed(CommitAttempt),
    Stale(CommitAttempt),
    /// Failed `attempts` times so far, the last with `error`; retried after a backoff.
    Retry {
        attempt: CommitAttempt,
        attempts: u32,
        error: String,
    },
}

fn answer(replies: Vec<tokio::sync::oneshot::Sender<CommitResult>>, result: CommitResult) {
    for reply in replies {
        let _ = reply.send(result.clone());
    }
}

impl PendingCommits {
    pub fn push(&mut self, request: CommitRequest, now: Instant) {
        let CommitRequest {
            partition,
            epoch,
            next_offset,
            metadata,
            reply,
        } = request;
        let pending = self.pending.entry(partition).or_insert_with(|| Pending {
            partition,
            epoch,
            next_offset,
            metadata: metadata.clone(),
            replies: Vec::new(),
            backoff: commit_backoff(),
            not_before: now,
        });
        if pending.epoch != epoch {
            answer(std::mem::take(&mut pending.replies), CommitResult::NotOwner);
            pending.epoch = epoch;
            pending.backoff = commit_backoff();
            pending.not_before = now;
        }
        if next_offset >= pending.next_offset {
            pending.next_offset = next_offset;
            pending.metadata = metadata;
        }
        pending.replies.extend(reply);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Tries every due commit with `commit`; failed ones back off (`commit_backoff`) and
    /// are retried until they go through or the partition is no longer ours.
    pub fn run(
        &mut self,
        now: Instant,
        is_current: impl Fn(i32, u64) -> bool,
        mut commit: impl FnMut(&CommitAttempt) -> Result<(), String>,
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
            let attempt = CommitAttempt {
                partition: pending.partition,
                epoch: pending.epoch,
                next_offset: pending.next_offset,
                metadata: pending.metadata.clone(),
            };
            if !is_current(attempt.partition, attempt.epoch) {
                let pending = self.pending.remove(&partition).expect("due entry");
                answer(pending.replies, CommitResult::NotOwner);
                outcomes.push(CommitOutcome::Stale(attempt));
                continue;
            }
            match commit(&attempt) {
                Ok(()) => {
                    let pending = self.pending.remove(&partition).expect("due entry");
                    answer(pending.replies, CommitResult::Committed);
                    outcomes.push(CommitOutcome::Committed(attempt));
                }
                Err(error) => {
                    let delay = pending.backoff.next_delay(ErrorClass::Transient);
                    pending.not_before = now + delay;
                    outcomes.push(CommitOutcome::Retry {
                        attempt,
                        attempts: pending.backoff.attempts(),
                        error,
                    });
                }
            }
        }
        outcomes
    }
}

/// Whether the broker keeps offset-commit metadata, where intents live, learned once from the
/// first intent read back; until then no upload goes ahead on an intent.
#[derive(Debug)]
pub struct MetadataCheck {
    policy: ExactlyOnce,
    known: bool,
}

/// What the read-back of an intent means for the upload waiting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataVerdict {
    /// The broker keeps intents (or this was settled before): upload.
    Kept,
    /// `best-effort`: the broker drops intents; upload, at least once.
    Degraded,
    /// Not read back this time: retry the commit, upload nothing yet.
    Unknown,
    /// `required` and the broker drops intents: the member stops, with this message.
    Refused(String),
}

impl MetadataCheck {
    pub fn new(policy: ExactlyOnce) -> MetadataCheck {
        MetadataCheck {
            policy,
            known: false,
        }
    }

    /// Whether the next intent must be read back.
    pub fn needed(&self) -> bool {
        !self.known
    }

    /// Judges what the broker answered for the intent `written`.
    pub fn judge(
        &mut self,
        written: &str,
        read_back: Result<Option<String>, String>,
    ) -> MetadataVerdict {
        let read_back = match read_back {
            Ok(read_back) => read_back,
            Err(error) => {
                tracing::warn!(%error, "cannot read the intent back yet; will retry");
                return MetadataVerdict::Unknown;
            }
        };
        if read_back.as_deref() == Some(written) {
            self.known = true;
            tracing::info!("the broker keeps offset-commit metadata: exactly-once batches are on");
            return MetadataVerdict::Kept;
        }
        match self.policy {
            ExactlyOnce::Required => MetadataVerdict::Refused(
                "the kafka broker dropped the metadata of an offset commit (read back empty), so \
                 batch intents cannot be recorded and exactly-once delivery is impossible with it; \
                 use a broker that keeps commit metadata, or set kafka.exactly_once = \"best-effort\" \
                 to run at-least-once"
                    .into(),
            ),
            ExactlyOnce::BestEffort => {
                self.known = true;
                MetadataVerdict::Degraded
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_intent_read_back_decides_whether_exactly_once_holds() {
        let mut check = MetadataCheck::new(ExactlyOnce::Required);
        assert!(check.needed());
        assert_eq!(
            check.judge("intent", Err("coordinator loading".into())),
            MetadataVerdict::Unknown
        );
        assert!(check.needed());
        assert_eq!(
            check.judge("intent", Ok(Some("intent".into()))),
            MetadataVerdict::Kept
        );
        assert!(!check.needed());

        let mut check = MetadataCheck::new(ExactlyOnce::Required);
        let MetadataVerdict::Refused(message) = check.judge("intent", Ok(Some(String::new())))
        else {
            panic!("a broker that drops intents is refused under `required`");
        };
        assert!(message.contains("kafka.exactly_once"), "{message}");
        assert!(check.needed());

        let mut check = MetadataCheck::new(ExactlyOnce::BestEffort);
        assert_eq!(check.judge("intent", Ok(None)), MetadataVerdict::Degraded);
        assert!(!check.needed());
    }

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

    fn request(partition: i32, epoch: u64, next_offset: i64) -> CommitRequest {
        CommitRequest {
            partition,
            epoch,
            next_offset,
            metadata: String::new(),
            reply: None,
        }
    }

    fn attempt(partition: i32, epoch: u64, next_offset: i64, metadata: &str) -> CommitAttempt {
        CommitAttempt {
            partition,
            epoch,
            next_offset,
            metadata: metadata.to_string(),
        }
    }

    #[test]
    fn later_requests_cover_earlier_ones_and_stale_ones_are_dropped() {
        let now = Instant::now();
        let mut pending = PendingCommits::default();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        pending.push(
            CommitRequest {
                metadata: "intent".into(),
                reply: Some(tx),
                ..request(0, 1, 100)
            },
            now,
        );
        pending.push(request(0, 1, 200), now);
        let (stale_tx, mut stale_rx) = tokio::sync::oneshot::channel();
        pending.push(
            CommitRequest {
                reply: Some(stale_tx),
                ..request(1, 5, 50)
            },
            now,
        );
        let mut committed = Vec::new();
        let outcomes = pending.run(
            now,
            |_, epoch| epoch == 1,
            |a| {
                committed.push(a.clone());
                Ok(())
            },
        );
        assert_eq!(committed, vec![attempt(0, 1, 200, "")]);
        assert_eq!(
            outcomes,
            vec![
                CommitOutcome::Committed(attempt(0, 1, 200, "")),
                CommitOutcome::Stale(attempt(1, 5, 50, ""))
            ]
        );
        assert_eq!(rx.try_recv().unwrap(), CommitResult::Committed);
        assert_eq!(stale_rx.try_recv().unwrap(), CommitResult::NotOwner);
        assert!(pending.is_empty());
    }

    #[test]
    fn failed_commits_back_off_and_retry() {
        let now = Instant::now();
        let mut pending = PendingCommits::default();
        pending.push(request(0, 1, 10), now);
        let fail = |_: &CommitAttempt| Err("REBALANCE_IN_PROGRESS".to_string());
        assert_eq!(
            pending.run(now, |_, _| true, fail),
            vec![CommitOutcome::Retry {
                attempt: attempt(0, 1, 10, ""),
                attempts: 1,
                error: "REBALANCE_IN_PROGRESS".into()
            }]
        );
        // Not due again right away.
        assert_eq!(pending.run(now, |_, _| true, fail), vec![]);
        let later = now + Duration::from_secs(1);
        assert_eq!(
            pending.run(later, |_, _| true, |_| Ok(())),
            vec![CommitOutcome::Committed(attempt(0, 1, 10, ""))]
        );
    }
}
