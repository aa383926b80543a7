//! When `forget` may rewrite: only batches that can never be replayed (committed) hold what it
//! rewrites, and it must know no batch that could still hold the users' events is open or
//! awaiting a replay. A partition is clean once every batch cut before the ids went on the
//! suppression list is committed: its newest intent was cut under a list holding them, or
//! it is idle (committed up to its end) long enough after the request for every member to have
//! read it (`suppression.refresh_secs`), so its next record starts a batch cut under the list.

use std::fmt;

/// A partition as `forget` sees it: the group's commit, the log's end, and its newest batch
/// intent in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    pub partition: i32,
    /// Where the group goes on from: its commit, or the log's start when it never committed.
    pub from: i64,
    pub end_offset: i64,
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
    /// Records from `from` are buffered and may be cut under an earlier list.
    Buffered { from: i64 },
    /// Idle, but some member may not have read the request yet.
    MembersReading,
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::BatchBeforeList { start, end } => write!(
                f,
                "batch {start}..={end} was cut before the ids were suppressed: waiting until it is uploaded and committed"
            ),
            Waiting::Buffered { from } => write!(
                f,
                "records from offset {from} are buffered and may be cut under an earlier list: waiting for the next batch's intent, or the partition to be committed to its end"
            ),
            Waiting::MembersReading => f.write_str(
                "idle: waiting until every member has read the request (suppression.refresh_secs)",
            ),
        }
    }
}

/// Whether `view`'s partition is clean; `members_read` says the request is older than a
/// member's refresh period (with margin).
pub fn judge(view: &PartitionView, members_read: bool) -> Result<(), Waiting> {
    if let Some(intent) = view.intent {
        // Every batch before the intent is committed when the group is past its start.
        let before_committed = view.from >= intent.start;
        if intent.cut_under_list && before_committed {
            return Ok(());
        }
        if !before_committed {
            return Err(Waiting::BatchBeforeList {
                start: view.from,
                end: intent.start - 1,
            });
        }
        if view.from <= intent.end {
            return Err(Waiting::BatchBeforeList {
                start: intent.start,
                end: intent.end,
            });
        }
    }
    if view.from < view.end_offset {
        return Err(Waiting::Buffered { from: view.from });
    }
    if members_read {
        Ok(())
    } else {
        Err(Waiting::MembersReading)
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
            intent: intent.map(|(start, end, cut_under_list)| IntentView {
                start,
                end,
                cut_under_list,
            }),
        }
    }

    #[test]
    fn a_partition_is_clean_once_its_batches_before_the_list_are_committed() {
        // The open batch was cut under the list: everything before it is committed.
        assert_eq!(
            judge(&view(100, 500, Some((100, 199, true))), false),
            Ok(())
        );
        // A batch cut before the list, open or awaiting a replay.
        assert_eq!(
            judge(&view(100, 500, Some((100, 199, false))), true),
            Err(Waiting::BatchBeforeList {
                start: 100,
                end: 199
            })
        );
        // Committed, and records after it buffered by a member that may not have the list.
        assert_eq!(
            judge(&view(200, 500, Some((100, 199, false))), true),
            Err(Waiting::Buffered { from: 200 })
        );
        // The batch under the list's intent is in the bucket, the one before not committed.
        assert_eq!(
            judge(&view(50, 500, Some((100, 199, true))), true),
            Err(Waiting::BatchBeforeList { start: 50, end: 99 })
        );
    }

    #[test]
    fn an_idle_partition_is_clean_once_every_member_has_read_the_request() {
        assert_eq!(
            judge(&view(200, 200, Some((100, 199, false))), true),
            Ok(())
        );
        assert_eq!(
            judge(&view(200, 200, None), false),
            Err(Waiting::MembersReading)
        );
        assert_eq!(judge(&view(0, 0, None), true), Ok(()));
        assert_eq!(
            judge(&view(0, 10, None), true),
            Err(Waiting::Buffered { from: 0 })
        );
    }
}
