//! When `forget` may rewrite: only batches that can never be replayed (committed) hold what it
//! rewrites, and it must know no batch that could still hold the users' events is open or
//! awaiting a replay. Members read the request within `suppression.refresh_secs`; from the
//! moment every member has (the *baseline*: twice that after the request, when `forget` notes
//! each partition's newest intent), a batch begun later is cut under the list. A partition is
//! clean once a batch sealed after the baseline was cut under a list holding the ids and every
//! batch before it is committed (the one after it began after the baseline, on whichever
//! member), or once it is idle (committed up to its end, or up to offsets that hold no record)
//! after the baseline, so its next record starts a batch cut under the list.

use std::collections::HashMap;
use std::fmt;

/// A partition as `forget` sees it: the group's commit, the log's end, and its newest batch
/// intent in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    pub partition: i32,
    /// Where the group goes on from: its commit, or the log's start when it never committed.
    pub from: i64,
    pub end_offset: i64,
    /// Kafka holds a record from `from` on. Without one the partition is archived to its end
    /// though `from` is below `end_offset`: its last offsets hold no record (a transaction's
    /// commit marker), and the group's commit stays at the last record's next offset.
    pub records_left: bool,
    pub intent: Option<IntentView>,
}

/// A batch intent, and whether the rules it was cut with name a list holding every id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntentView {
    pub start: i64,
    pub end: i64,
    pub cut_under_list: bool,
}

/// What keeps a partition from being clean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// A batch cut before the request is not committed yet (being uploaded, or awaiting a
    /// replay by the partition's next owner).
    BatchBeforeList { start: i64, end: i64 },
    /// Some member may not have read the request yet.
    MembersReading,
    /// No batch sealed since every member read the request yet: the open one may have begun
    /// before, under an earlier list.
    NoBatchSinceBaseline { from: i64 },
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::BatchBeforeList { start, end } => write!(
                f,
                "batch {start}..={end} was cut before the ids were suppressed: waiting until it is uploaded and committed"
            ),
            Waiting::MembersReading => f.write_str(
                "waiting until every member has read the request (suppression.refresh_secs)",
            ),
            Waiting::NoBatchSinceBaseline { from } => write!(
                f,
                "records from offset {from} may be in a batch begun before every member read the request: waiting for a batch sealed since, or the partition to be committed to its end"
            ),
        }
    }
}

/// Each partition's newest intent end at the moment every member had read the request
/// (`None`: it had none): what [`judge`] measures "a batch sealed since" against.
pub type Baseline = HashMap<i32, Option<i64>>;

/// The baseline of `views`, to be taken once every member has read the request.
pub fn baseline_of<T>(views: &[(PartitionView, T)]) -> Baseline {
    views
        .iter()
        .map(|(view, _)| (view.partition, view.intent.map(|intent| intent.end)))
        .collect()
}

/// The partitions of `views` that are not clean yet, and why (`baseline`: `None` until every
/// member has read the request).
pub fn still_waiting<T>(
    views: &[(PartitionView, T)],
    baseline: Option<&Baseline>,
) -> Vec<(i32, Waiting)> {
    views
        .iter()
        .filter_map(|(view, _)| {
            let partition_baseline = baseline.map(|b| b.get(&view.partition).copied().flatten());
            judge(view, partition_baseline)
                .err()
                .map(|waiting| (view.partition, waiting))
        })
        .collect()
}

/// Whether `view`'s partition is clean. `baseline`: `None` until every member has read the
/// request, then the end of the partition's newest intent at that moment (`Some(None)`: it had
/// none).
pub fn judge(view: &PartitionView, baseline: Option<Option<i64>>) -> Result<(), Waiting> {
    let Some(baseline_end) = baseline else {
        return Err(Waiting::MembersReading);
    };
    if view.from >= view.end_offset || !view.records_left {
        return Ok(());
    }
    let sealed_since = |intent: &IntentView| baseline_end.is_none_or(|end| intent.start > end);
    match view.intent {
        Some(intent) if sealed_since(&intent) && intent.cut_under_list => {
            if view.from >= intent.start {
                Ok(())
            } else {
                Err(Waiting::BatchBeforeList {
                    start: view.from,
                    end: intent.start - 1,
                })
            }
        }
        Some(intent) if view.from <= intent.end && !intent.cut_under_list => {
            Err(Waiting::BatchBeforeList {
                start: intent.start.max(view.from),
                end: intent.end,
            })
        }
        _ => Err(Waiting::NoBatchSinceBaseline { from: view.from }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(from: i64, end_offset: i64, intent: Option<(i64, i64, bool)>) -> PartitionView {
        PartitionView {
            partition: 0,
            from,
            end_offset,
            records_left: from < end_offset,
            intent: intent.map(|(start, end, cut_under_list)| IntentView {
                start,
                end,
                cut_under_list,
            }),
        }
    }

    #[test]
    fn a_partition_is_clean_once_a_batch_sealed_after_the_baseline_was_cut_under_the_list() {
        // Before every member has read the request, nothing is clean.
        assert_eq!(
            judge(&view(100, 500, Some((100, 199, true))), None),
            Err(Waiting::MembersReading)
        );
        // Sealed after the baseline (which saw the intent ending at 99), under the list: the
        // batch after it began after the baseline too.
        assert_eq!(
            judge(&view(100, 500, Some((100, 199, true))), Some(Some(99))),
            Ok(())
        );
        assert_eq!(
            judge(&view(250, 500, Some((100, 199, true))), Some(Some(99))),
            Ok(())
        );
        // Under the list but sealed before the baseline: the batch after it may have begun on
        // a member that had not read the list yet.
        assert_eq!(
            judge(&view(200, 500, Some((100, 199, true))), Some(Some(199))),
            Err(Waiting::NoBatchSinceBaseline { from: 200 })
        );
        // A batch cut before the list, open or awaiting a replay.
        assert_eq!(
            judge(&view(100, 500, Some((100, 199, false))), Some(Some(99))),
            Err(Waiting::BatchBeforeList {
                start: 100,
                end: 199
            })
        );
        // The batch under the list's intent is in the bucket, the one before not committed.
        assert_eq!(
            judge(&view(50, 500, Some((100, 199, true))), Some(Some(49))),
            Err(Waiting::BatchBeforeList { start: 50, end: 99 })
        );
    }

    #[test]
    fn an_idle_partition_is_clean_once_every_member_has_read_the_request() {
        assert_eq!(
            judge(&view(200, 200, Some((100, 199, false))), Some(Some(199))),
            Ok(())
        );
        assert_eq!(
            judge(&view(200, 200, None), None),
            Err(Waiting::MembersReading)
        );
        assert_eq!(judge(&view(0, 0, None), Some(None)), Ok(()));
        assert_eq!(
            judge(&view(0, 10, None), Some(None)),
            Err(Waiting::NoBatchSinceBaseline { from: 0 })
        );
        // Committed to its last record, below the end: the offsets after it hold no record (a
        // transaction's commit marker), so no batch can hold more.
        let markers_only = PartitionView {
            records_left: false,
            ..view(200, 201, Some((100, 199, false)))
        };
        assert_eq!(judge(&markers_only, Some(Some(199))), Ok(()));
        assert_eq!(judge(&markers_only, None), Err(Waiting::MembersReading));
    }
}
