//! Where an assigned partition stands in the group: its committed offset and the batch intent
//! the commit's metadata holds, read from the broker before recovery is planned. A partition the
//! broker cannot answer for is asked again, never guessed: "nothing committed" in place of an
//! unknown offset would ignore a recorded intent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::checkpoint::Committed;
use crate::pipeline::BatchIntent;
use crate::retry::{Backoff, ErrorClass, NoJitter};

/// One partition of an OffsetFetch answer, as the broker gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEntry {
    pub partition: i32,
    /// `None`: the group has no commit for the partition.
    pub offset: Option<i64>,
    pub metadata: String,
    /// The broker's per-partition error, if it could not say.
    pub error: Option<String>,
}

/// What the group committed for each partition, with the intent its metadata holds.
pub type CommittedOffsets = HashMap<i32, (Committed, Option<BatchIntent>)>;

/// Reads an OffsetFetch answer. A partition the broker could not answer for fails the whole
/// read: recovery planned on "nothing committed" would ignore a recorded intent and re-cut the
/// batch differently (duplicates), so an unknown offset is never taken for an absent one.
pub fn read_committed(
    requested: &[i32],
    entries: impl IntoIterator<Item = CommittedEntry>,
) -> Result<CommittedOffsets, String> {
    let mut offsets = HashMap::new();
    let mut errors = Vec::new();
    for entry in entries {
        if let Some(error) = entry.error {
            errors.push(format!("partition {}: {error}", entry.partition));
            continue;
        }
        let committed = entry.offset.map_or(Committed::Nothing, Committed::Offset);
        offsets.insert(
            entry.partition,
            (committed, BatchIntent::decode(&entry.metadata)),
        );
    }
    for partition in requested {
        if !offsets.contains_key(partition)
            && !errors
                .iter()
                .any(|e| e.starts_with(&format!("partition {partition}:")))
        {
            errors.push(format!(
                "partition {partition}: missing from the broker's answer"
            ));
        }
    }
    if errors.is_empty() {
        Ok(offsets)
    } else {
        Err(errors.join("; "))
    }
}

/// Asks `fetch` until it answers, backing off between attempts (100 ms doubling to 5 s), for at
/// most `patience`. The error names the last cause: the caller stops the member rather than
/// guess where a partition stands.
pub fn fetch_until_known<T>(
    what: &str,
    patience: Duration,
    now: impl Fn() -> Instant,
    mut sleep: impl FnMut(Duration),
    mut fetch: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = now() + patience;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), NoJitter);
    loop {
        let error = match fetch() {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let attempts = backoff.attempts() + 1;
        let left = deadline.saturating_duration_since(now());
        if left.is_zero() {
            return Err(format!("{error} (after {attempts} attempts)"));
        }
        tracing::warn!(attempts, %error, "cannot read {what} yet, retrying");
        sleep(backoff.next_delay(ErrorClass::Transient).min(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(partition: i32, offset: Option<i64>, metadata: &str) -> CommittedEntry {
        CommittedEntry {
            partition,
            offset,
            metadata: metadata.into(),
            error: None,
        }
    }

    #[test]
    fn an_unanswered_partition_is_not_taken_for_an_uncommitted_one() {
        let intent = BatchIntent::new(100, 199, "abc".into());
        let read = read_committed(
            &[0, 1],
            [entry(0, Some(100), &intent.encode()), entry(1, None, "")],
        )
        .unwrap();
        assert_eq!(read[&0], (Committed::Offset(100), Some(intent.clone())));
        assert_eq!(read[&1], (Committed::Nothing, None));
        let err = read_committed(
            &[0, 1],
            [
                entry(0, Some(100), &intent.encode()),
                CommittedEntry {
                    error: Some("Broker: Coordinator load in progress".into()),
                    ..entry(1, None, "")
                },
            ],
        )
        .unwrap_err();
        assert!(
            err.contains("partition 1: Broker: Coordinator load in progress"),
            "{err}"
        );
        let err =
            read_committed(&[0, 1, 2], [entry(0, Some(7), ""), entry(1, None, "")]).unwrap_err();
        assert_eq!(err, "partition 2: missing from the broker's answer");
    }

    #[test]
    fn committed_offsets_are_fetched_until_known() {
        let clock = std::cell::Cell::new(Instant::now());
        let start = clock.get();
        let mut calls = 0;
        // A coordinator that fails five times (today's three tries would give up), then answers.
        let value = fetch_until_known(
            "the committed offsets",
            Duration::from_secs(60),
            || clock.get(),
            |d| clock.set(clock.get() + d),
            || {
                calls += 1;
                if calls <= 5 {
                    Err("coordinator load in progress".to_string())
                } else {
                    Ok(42)
                }
            },
        );
        assert_eq!(value, Ok(42));
        assert_eq!(calls, 6);
        assert_eq!(clock.get() - start, Duration::from_millis(3_100));

        // One that never answers: an error naming the cause once the patience is spent.
        let clock = std::cell::Cell::new(start);
        let err = fetch_until_known(
            "the committed offsets",
            Duration::from_secs(60),
            || clock.get(),
            |d| clock.set(clock.get() + d),
            || Err::<(), _>("Broker: Not coordinator".to_string()),
        )
        .unwrap_err();
        assert!(err.starts_with("Broker: Not coordinator (after "), "{err}");
        assert_eq!(clock.get() - start, Duration::from_secs(60));
    }
}
