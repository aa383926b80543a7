//! Backpressure: which partitions the poll loop pauses when the local disk budget is used up.
//! Reading stops until uploads free space (never a dropped record); resuming waits until usage
//! falls below 90 % so the partitions do not flap at the limit.
//!
//! A partition replaying an interrupted batch is never paused: its batch can only be sealed,
//! uploaded and freed once every record up to the intent's end was read, so pausing it could
//! hold the very space the pause waits for.

use std::collections::{BTreeSet, HashSet};

/// What to change this round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PauseChange {
    pub pause: Vec<i32>,
    pub resume: Vec<i32>,
}

#[derive(Debug)]
pub struct Backpressure {
    max_disk_bytes: u64,
    /// Whether the budget was exceeded and usage has not yet fallen below 90 % of it.
    over_budget: bool,
    paused: BTreeSet<i32>,
}

impl Backpressure {
    pub fn new(max_disk_bytes: u64) -> Backpressure {
        Backpressure {
            max_disk_bytes,
            over_budget: false,
            paused: BTreeSet::new(),
        }
    }

    pub fn max_disk_bytes(&self) -> u64 {
        self.max_disk_bytes
    }

    pub fn over_budget(&self) -> bool {
        self.over_budget
    }

    pub fn paused(&self) -> usize {
        self.paused.len()
    }

    /// Plans the pauses for `used` bytes on disk, given the partitions assigned now and those
    /// replaying an intent.
    pub fn plan(&mut self, used: u64, assigned: &[i32], replaying: &HashSet<i32>) -> PauseChange {
        self.over_budget = if self.over_budget {
            used >= self.max_disk_bytes / 10 * 9
        } else {
            used >= self.max_disk_bytes
        };
        let wanted: BTreeSet<i32> = if self.over_budget {
            assigned
                .iter()
                .copied()
                .filter(|p| !replaying.contains(p))
                .collect()
        } else {
            BTreeSet::new()
        };
        let change = PauseChange {
            pause: wanted.difference(&self.paused).copied().collect(),
            // A partition revoked meanwhile is not ours to resume; a new owner starts unpaused.
            resume: self
                .paused
                .difference(&wanted)
                .copied()
                .filter(|p| assigned.contains(p))
                .collect(),
        };
        self.paused = wanted;
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_at_the_budget_and_resumes_below_nine_tenths() {
        let mut bp = Backpressure::new(1000);
        let none = HashSet::new();
        assert_eq!(bp.plan(999, &[0, 1], &none), PauseChange::default());
        assert_eq!(
            bp.plan(1000, &[0, 1], &none),
            PauseChange {
                pause: vec![0, 1],
                resume: vec![]
            }
        );
        assert_eq!(bp.plan(950, &[0, 1], &none), PauseChange::default());
        // A partition assigned while over budget is paused too.
        assert_eq!(
            bp.plan(950, &[0, 1, 2], &none),
            PauseChange {
                pause: vec![2],
                resume: vec![]
            }
        );
        // Partition 1 was revoked meanwhile: only the others are resumed.
        assert_eq!(
            bp.plan(899, &[0, 2], &none),
            PauseChange {
                pause: vec![],
                resume: vec![0, 2]
            }
        );
        assert_eq!(bp.paused(), 0);
    }

    #[test]
    fn a_replaying_partition_is_never_paused() {
        let mut bp = Backpressure::new(1000);
        let replaying: HashSet<i32> = [1].into();
        assert_eq!(
            bp.plan(2000, &[0, 1, 2], &replaying),
            PauseChange {
                pause: vec![0, 2],
                resume: vec![]
            }
        );
        // A partition that starts replaying while paused (reassigned with an intent) reads on.
        let replaying: HashSet<i32> = [1, 2].into();
        assert_eq!(
            bp.plan(2000, &[0, 1, 2], &replaying),
            PauseChange {
                pause: vec![],
                resume: vec![2]
            }
        );
    }
}
