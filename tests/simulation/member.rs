//! One archiver process of the simulation, built from the archiver's own parts: the assignment
//! set-up of the rebalance callback (`ArchiverContext::assignment_commands`, then
//! `commit_first_contacts` once the assignment is applied), a buffer `Worker`
//! on a real directory (its volume), the `Uploader` on a single-threaded runtime whose clock
//! only moves when the simulation says, and the poll thread's `PendingCommits`. What stands in
//! for librdkafka is the forwarding: records read from the simulated log at this member's
//! position (reset to the log start when it fell below it, as `auto.offset.reset = earliest`
//! does), handed to the worker as the poll loop hands them.
//!
//! A kill -9 is dropping the member: the runtime and its tasks go with it, nothing is flushed
//! or checkpointed on the way out beyond what the files' own buffers hold.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_s3_archiver::buffer::{DiskUsage, Worker};
use kafka_s3_archiver::commit::{Assignments, CommitOutcome, PendingCommits};
use kafka_s3_archiver::config::Config;
use kafka_s3_archiver::consume::committed::CommittedEntry;
use kafka_s3_archiver::consume::context::GroupClient;
use kafka_s3_archiver::consume::replay_rules::RulesSource;
use kafka_s3_archiver::consume::ArchiverContext;
use kafka_s3_archiver::metrics::Metrics;
use kafka_s3_archiver::pipeline::{CommitRequest, Fatal, SealTrigger, WorkerCommand};
use kafka_s3_archiver::rules::{rules_key, CuttingRules};
use kafka_s3_archiver::suppress::{list_key, CurrentList, IdHash};
use kafka_s3_archiver::upload::store::ObjectStore;
use kafka_s3_archiver::upload::suppression::Follower;
use kafka_s3_archiver::upload::{archive_end, planned_files, Uploader};
use tokio_util::sync::CancellationToken;

use super::kafka::Cluster;
use super::store::SimStore;

pub struct Member {
    worker: Worker,
    context: ArchiverContext,
    assignments: Arc<Assignments>,
    /// The uploader's runtime: paused, so its clock moves only in `run_uploads`.
    runtime: tokio::runtime::Runtime,
    commits: Receiver<CommitRequest>,
    pending: PendingCommits,
    /// The next offset to read of each partition (librdkafka's position).
    positions: BTreeMap<i32, i64>,
    /// Not reading (the disk budget's backpressure, a slow member).
    pub paused: bool,
    /// Stands in for `Instant::now()` of the poll thread: the start plus the simulated time.
    clock_base: Instant,
    pub elapsed: Duration,
    /// The group generation it joined: its commits are refused once another member joined.
    generation: u64,
    /// Reads the suppression requests in the bucket (runs that suppress users only).
    follower: Option<Follower<SimStore>>,
    /// The suppression list the member cuts its next batches under.
    list: Arc<CurrentList>,
}

/// The group while a member's assignment is set up: the cluster as it stands, and the positions
/// the member commits meanwhile (the coordinator takes them at once; they land in the cluster
/// when the assignment is done).
struct AssigningGroup<'a> {
    cluster: &'a Cluster,
    positions: RefCell<Vec<(i32, i64)>>,
    /// The coordinator refuses commits made during the assignment (a rebalance still in
    /// progress, as librdkafka's mock cluster and real brokers answer when members come and go).
    refuse_commits: bool,
}

impl GroupClient for AssigningGroup<'_> {
    fn committed_entries(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<CommittedEntry>, String> {
        assert_eq!(topic, self.cluster.topic);
        Ok(partitions
            .iter()
            .map(|&partition| {
                let committed = self.cluster.committed.get(&partition);
                CommittedEntry {
                    partition,
                    offset: committed.map(|(offset, _)| *offset),
                    metadata: committed.map(|(_, m)| m.clone()).unwrap_or_default(),
                    error: None,
                }
            })
            .collect())
    }

    fn log_start(&self, topic: &str, partition: i32) -> Result<Option<i64>, String> {
        assert_eq!(topic, self.cluster.topic);
        Ok(self.cluster.logs.get(&partition).map(|log| log.start))
    }

    fn commit_positions(&self, topic: &str, positions: &[(i32, i64)]) -> Result<(), String> {
        assert_eq!(topic, self.cluster.topic);
        if self.refuse_commits {
            return Err("simulated REBALANCE_IN_PROGRESS".into());
        }
        self.positions.borrow_mut().extend_from_slice(positions);
        Ok(())
    }
}

impl Member {
    /// Starts a member on `volume` and assigns it every partition of the topic;
    /// `refuse_first_contacts`: the coordinator refuses the commits made during the assignment.
    pub fn start(
        volume: PathBuf,
        config: &Config,
        store: &SimStore,
        cluster: &mut Cluster,
        seed: u64,
        refuse_first_contacts: bool,
        suppressing: bool,
    ) -> Member {
        let mut config = config.clone();
        config.buffer.data_dir = volume.clone();
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let assignments = Arc::new(Assignments::default());
        let (upload_tx, upload_rx) = tokio::sync::mpsc::unbounded_channel();
        let (commit_tx, commits) = std::sync::mpsc::channel();
        std::fs::create_dir_all(&volume).unwrap();
        let suppression = Arc::new(CurrentList::default());
        let list = Arc::clone(&suppression);
        let worker = Worker::new(
            Arc::clone(&config),
            1,
            upload_tx,
            metrics.clone(),
            Arc::new(DiskUsage::default()),
            cluster.log_starts(),
        )
        .with_suppression(Arc::clone(&suppression));
        // The member reads the list before it consumes anything (`app::run` waits for the
        // bucket to answer: here it answers at once).
        let follower = suppressing.then(|| {
            let mut follower = Follower::new(
                store.faultless(),
                &config.s3.prefix,
                CuttingRules::of(&config),
                suppression,
                metrics.clone(),
            );
            poll_ready(follower.refresh()).expect("the faultless bucket answers");
            follower
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let uploader = Uploader {
            store: store.clone(),
            prefix: config.s3.prefix.clone(),
            assignments: Arc::clone(&assignments),
            commits: commit_tx.clone(),
            metrics: metrics.clone(),
            concurrency: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            rules: CuttingRules::of(&config),
            jitter_seed: seed,
        };
        runtime.spawn(uploader.run(upload_rx, CancellationToken::new()));
        let (worker_tx, _) = std::sync::mpsc::sync_channel(1);
        let lookup_store = store.faultless();
        let (prefix, topic) = (config.s3.prefix.clone(), config.kafka.topic.clone());
        let context = ArchiverContext::new(
            topic.clone(),
            vec![worker_tx],
            commit_tx,
            Arc::clone(&assignments),
            metrics,
            Arc::new(Fatal::default()),
        )
        .with_bucket_position({
            let (store, prefix, topic) = (lookup_store.clone(), prefix.clone(), topic.clone());
            Box::new(move |partition| {
                let lookup = archive_end(&store, &prefix, &topic, partition);
                poll_ready(lookup).map_err(|err| err.to_string())
            })
        })
        .with_rules_source({
            let (store, prefix) = (lookup_store.clone(), prefix.clone());
            let (lists, list_prefix) = (lookup_store.clone(), prefix.clone());
            RulesSource::new(
                &config,
                Box::new(move |hash| {
                    let key = rules_key(&prefix, hash);
                    poll_ready(store.get_bytes(&key)).map_err(|err| err.to_string())
                }),
            )
            .with_lists(Box::new(move |hash| {
                let key = list_key(&list_prefix, hash);
                poll_ready(lists.get_bytes(&key)).map_err(|err| err.to_string())
            }))
        })
        .with_kept_intents(Box::new(move |partition, intent| {
            let lookup = planned_files(&lookup_store, &prefix, &topic, partition, intent);
            poll_ready(lookup).map_err(|err| err.to_string())
        }));
        let mut member = Member {
            worker,
            context,
            assignments,
            runtime,
            commits,
            pending: PendingCommits::default(),
            positions: BTreeMap::new(),
            paused: false,
            clock_base: Instant::now(),
            elapsed: Duration::ZERO,
            list,
            generation: cluster.generation,
            follower,
        };
        member.assign(cluster, refuse_first_contacts);
        member
    }

    /// The rebalance callback's work for every partition, then librdkafka's start: the offset
    /// the worker answered, else the committed one, else the log's start.
    fn assign(&mut self, cluster: &mut Cluster, refuse_commits: bool) {
        let partitions: Vec<i32> = cluster.logs.keys().copied().collect();
        let group = AssigningGroup {
            cluster,
            positions: RefCell::default(),
            refuse_commits,
        };
        let commands = self.context.assignment_commands(&group, &partitions);
        assert_eq!(commands.len(), partitions.len(), "every partition set up");
        let mut first_contacts = Vec::new();
        for (partition, command, answer) in commands {
            self.worker.handle(command).expect("assign");
            let assigned = answer.recv().unwrap().expect("assign answered");
            let log = &cluster.logs[&partition];
            let start = assigned
                .read_from
                .or_else(|| cluster.committed.get(&partition).map(|(o, _)| *o))
                .unwrap_or(log.start);
            self.positions.insert(partition, start);
            first_contacts.extend(assigned.first_contact.map(|offset| (partition, offset)));
        }
        self.context.commit_first_contacts(&group, &first_contacts);
        for (partition, offset) in group.positions.into_inner() {
            cluster.committed.insert(partition, (offset, String::new()));
        }
    }

    /// One poll round: up to `max` records of each partition to the worker. Says what it read:
    /// per partition read, the offsets looked at and whether the position had to be reset.
    pub fn poll(&mut self, cluster: &Cluster, max: usize) -> Vec<(i32, String)> {
        let mut read = Vec::new();
        if self.paused {
            return read;
        }
        for (&partition, position) in self.positions.iter_mut() {
            if self.context.awaits_first_contact(partition) {
                // Paused until the group holds where its archive starts.
                continue;
            }
            let log = &cluster.logs[&partition];
            let mut reset = String::new();
            if *position < log.start || *position > log.end() {
                // OFFSET_OUT_OF_RANGE: librdkafka resets on its own (auto.offset.reset).
                reset = format!(" (reset from {position} to the log start)");
                *position = log.start;
            }
            let from = *position;
            let (records, next) = log.read(from, max);
            *position = next;
            if next > from {
                read.push((partition, format!("p{partition} [{from}, {next}){reset}")));
            }
            if !records.is_empty() {
                self.worker
                    .handle(WorkerCommand::Records { partition, records })
                    .expect("records");
            }
        }
        read
    }

    /// The schedule fires: every open batch is sealed and goes to the uploader.
    pub fn seal(&mut self) {
        let trigger = SealTrigger::Schedule;
        self.worker
            .handle(WorkerCommand::SealAll { trigger })
            .expect("seal");
    }

    pub fn checkpoint(&mut self) {
        self.worker
            .handle(WorkerCommand::Checkpoint)
            .expect("checkpoint");
    }

    /// Lets the uploader work for `time` of simulated time.
    pub fn run_uploads(&mut self, time: Duration) {
        self.runtime
            .block_on(async move { tokio::time::sleep(time).await });
        self.elapsed += time;
    }

    /// The poll thread's commit round: what the uploader asked, to the group, and what went
    /// through, to the worker. `refuse` fails this round's commits (coordinator moving).
    pub fn commit(&mut self, cluster: &mut Cluster, refuse: bool) {
        let now = self.clock_base + self.elapsed;
        while let Ok(request) = self.commits.try_recv() {
            self.pending.push(request, now);
        }
        let assignments = Arc::clone(&self.assignments);
        let generation = self.generation;
        let outcomes = self.pending.run(
            now,
            |partition, epoch| assignments.is_current(partition, epoch),
            |attempt| {
                if refuse {
                    return Err("simulated COORDINATOR_NOT_AVAILABLE".into());
                }
                if generation != cluster.generation {
                    return Err("simulated ILLEGAL_GENERATION".into());
                }
                cluster.committed.insert(
                    attempt.partition,
                    (attempt.next_offset, attempt.metadata.clone()),
                );
                Ok(())
            },
        );
        for outcome in outcomes {
            if let CommitOutcome::Committed(attempt) = outcome {
                // The poll loop resumes a partition that waited for its first contact.
                self.context
                    .note_committed(attempt.partition, attempt.next_offset);
                self.worker
                    .handle(WorkerCommand::Committed {
                        partition: attempt.partition,
                        next_offset: attempt.next_offset,
                    })
                    .expect("committed");
            }
        }
        // The uploader may have been waiting on an intent's answer.
        self.runtime.block_on(tokio::task::yield_now());
    }
}

impl Member {
    /// A zombie learns it lost its partitions (the rebalance callback's revocation): its
    /// in-flight work for them is dropped, and what waited on the group is told "not owner".
    pub fn revoke_all(&mut self, cluster: &mut Cluster) {
        for &partition in self.positions.keys() {
            self.assignments.revoke(partition);
            let (reply, answer) = std::sync::mpsc::sync_channel(1);
            let command = WorkerCommand::Revoke {
                partition,
                keep_local: false,
                reply,
            };
            self.worker.handle(command).expect("revoke");
            answer.recv().unwrap();
        }
        self.positions.clear();
        self.commit(cluster, false);
        self.run_uploads(Duration::from_secs(10));
    }
}

/// Runs a future the simulated store answers at once (its requests never wait).
impl Member {
    /// The member's periodic read of the suppression requests: a new list is cut with from each
    /// partition's next batch.
    pub fn refresh_suppression(&mut self) -> bool {
        self.follower
            .as_mut()
            .is_some_and(|follower| poll_ready(follower.refresh()).unwrap_or(false))
    }
}

impl Member {
    /// Whether the list the member cuts its next batches under holds `id`.
    pub fn list_holds(&self, id: &IdHash) -> bool {
        self.list.get().is_some_and(|list| list.holds(id))
    }
}

fn poll_ready<F: std::future::Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(future)
}
