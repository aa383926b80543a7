//! The suppression list in the bucket: `suppress` adds a request ([`submit`]), and each member
//! follows the requests ([`Follower`]), storing each new list with the cutting rules that name
//! it before its buffer workers cut with it (see `crate::suppress`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::s3::S3Error;
use super::store::ObjectStore;
use crate::metrics::Metrics;
use crate::retry::ErrorClass;
use crate::rules::{rules_key, CuttingRules};
use crate::suppress::{list_key, request_key, requests_prefix, CurrentList, Request, Suppression};

/// Adds `ids` to the suppression list: one request object in the bucket, which every member
/// takes up at its next refresh. Answers the request and its key.
pub async fn submit<S: ObjectStore>(
    store: &S,
    prefix: &str,
    ids: &BTreeSet<crate::suppress::IdHash>,
) -> Result<(Request, String), S3Error> {
    let id: String = (0..8)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect();
    submit_named(store, prefix, ids, id).await
}

/// [`submit`] under a name of the caller's (`forget` names its request after its ids, so a
/// rerun finds it).
pub async fn submit_named<S: ObjectStore>(
    store: &S,
    prefix: &str,
    ids: &BTreeSet<crate::suppress::IdHash>,
    id: String,
) -> Result<(Request, String), S3Error> {
    let request = Request::new(id, Utc::now(), ids);
    let key = request_key(prefix, &request);
    store
        .put_bytes(&key, request.to_json(), "application/json")
        .await?;
    Ok((request, key))
}

/// The suppression list as the requests in the bucket add up to now (`restore` leaves its users
/// out); `None` when there is no request.
pub async fn read_list<S: ObjectStore>(
    store: &S,
    prefix: &str,
) -> Result<Option<Suppression>, S3Error> {
    let mut requests = BTreeMap::new();
    read_requests(store, prefix, &mut requests).await?;
    let list = Suppression::new([]).with_requests(requests.values().flatten());
    Ok((!list.is_empty()).then_some(list))
}

/// Adds the requests in the bucket that `known` does not hold yet (`None`: unreadable, said
/// once).
async fn read_requests<S: ObjectStore>(
    store: &S,
    prefix: &str,
    known: &mut BTreeMap<String, Option<Request>>,
) -> Result<(), S3Error> {
    for (key, _) in store.list(&requests_prefix(prefix)).await? {
        if known.contains_key(&key) || !key.ends_with(".json") {
            continue;
        }
        let Some(bytes) = store.get_bytes(&key).await? else {
            continue;
        };
        let request = match Request::parse(&bytes) {
            Ok(request) => Some(request),
            Err(err) => {
                tracing::error!(%key, error = %err, "a suppression request cannot be read: its ids are not suppressed until it is replaced by a readable one");
                None
            }
        };
        known.insert(key, request);
    }
    Ok(())
}

/// Follows the suppression requests in the bucket for one member (see the module doc).
pub struct Follower<S: ObjectStore> {
    store: S,
    prefix: String,
    /// This member's cutting rules without a list: stored again naming each new list.
    rules: CuttingRules,
    current: Arc<CurrentList>,
    metrics: Metrics,
    /// Every request read so far, by key (`None`: unreadable, reported once).
    requests: BTreeMap<String, Option<Request>>,
    /// How many of `requests` the current list was made of: requests are never taken back, so
    /// while none is added the list stands, and is not built again (at 100,000 ids that took a
    /// fifth of a second of CPU every refresh).
    taken_up: Option<usize>,
}

impl<S: ObjectStore> Follower<S> {
    pub fn new(
        store: S,
        prefix: &str,
        rules: CuttingRules,
        current: Arc<CurrentList>,
        metrics: Metrics,
    ) -> Follower<S> {
        Follower {
            store,
            prefix: prefix.to_string(),
            rules,
            current,
            metrics,
            requests: BTreeMap::new(),
            taken_up: None,
        }
    }

    /// Reads the requests not read yet and, when the list they add up to is new, stores it and
    /// the rules naming it, then makes it current. Answers whether it did.
    pub async fn refresh(&mut self) -> Result<bool, S3Error> {
        read_requests(&self.store, &self.prefix, &mut self.requests).await?;
        if self.taken_up == Some(self.requests.len()) {
            return Ok(false);
        }
        let list = Suppression::new([]).with_requests(self.requests.values().flatten());
        let current = self.current.get();
        if list.is_empty() || current.as_ref().is_some_and(|c| c.hash() == list.hash()) {
            self.taken_up = Some(self.requests.len());
            return Ok(false);
        }
        // Both before any batch is cut with them: a replay fetches them by hash.
        self.store
            .put_bytes(
                &list_key(&self.prefix, list.hash()),
                list.to_json(),
                "application/json",
            )
            .await?;
        let rules = self.rules.clone().with_suppression(Some(&list));
        self.store
            .put_bytes(
                &rules_key(&self.prefix, &rules.hash()),
                rules.to_json(),
                "application/json",
            )
            .await?;
        let (hash, ids) = (list.hash().to_string(), list.len());
        self.metrics.suppression_ids.set(ids as i64);
        self.current.set(Arc::new(list));
        self.taken_up = Some(self.requests.len());
        tracing::info!(
            list = hash,
            ids,
            rules = %rules.hash(),
            "suppression list taken up: each partition's next batch leaves out these users' events"
        );
        Ok(true)
    }

    /// The first refresh, before the member consumes anything (so that a restart never cuts a
    /// batch without the list it had): a transient failure is retried until it succeeds;
    /// `Ok(false)` if `stop` fired first. A permanent one (access denied, no such bucket) is
    /// the error: waiting would not get past it.
    pub async fn first_refresh(&mut self, stop: &CancellationToken) -> Result<bool, S3Error> {
        let mut delay = Duration::from_millis(500);
        loop {
            match self.refresh().await {
                Ok(_) => return Ok(true),
                Err(err) if err.class == ErrorClass::Permanent => return Err(err),
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot read the suppression requests in the bucket yet; not consuming until they are read");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Refreshes every `every` until `stop` fires; a failed refresh is retried at the next.
    pub async fn run(mut self, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(err) = self.refresh().await {
                tracing::warn!(error = %err, "cannot read the suppression requests in the bucket; the list in use stays");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suppress::{hash_id, parse_ids};
    use chrono::DateTime;

    /// A bucket of small objects, as the follower uses one.
    #[derive(Default, Clone)]
    struct Bucket(
        Arc<std::sync::Mutex<BTreeMap<String, Vec<u8>>>>,
        /// How the next listings fail, in order.
        Arc<std::sync::Mutex<Vec<ErrorClass>>>,
    );

    impl ObjectStore for Bucket {
        fn conditional_writes(&self) -> bool {
            true
        }
        async fn head_metadata(
            &self,
            _: &str,
        ) -> Result<Option<std::collections::HashMap<String, String>>, S3Error> {
            unreachable!("the follower heads nothing")
        }
        async fn put_file_once(
            &self,
            _: &str,
            _: &std::path::Path,
            _: u64,
            _: &crate::upload::s3::ObjectMetadata,
            _: bool,
            _: crate::upload::s3::StillOurs<'_>,
        ) -> Result<crate::upload::s3::PutOutcome, S3Error> {
            unreachable!("the follower puts no file")
        }
        async fn put_bytes(&self, key: &str, bytes: Vec<u8>, _: &str) -> Result<(), S3Error> {
            self.0.lock().unwrap().insert(key.into(), bytes);
            Ok(())
        }
        async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
            Ok(self.0.lock().unwrap().get(key).cloned())
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>, S3Error> {
            if let Some(class) = self.1.lock().unwrap().pop() {
                return Err(S3Error {
                    operation: "ListObjectsV2",
                    bucket: "b".into(),
                    key: prefix.into(),
                    class,
                    code: None,
                    message: "simulated".into(),
                });
            }
            let objects = self.0.lock().unwrap();
            Ok(objects
                .iter()
                .filter(|(key, _)| key.starts_with(prefix))
                .map(|(key, bytes)| (key.clone(), bytes.len() as i64))
                .collect())
        }
    }

    #[tokio::test]
    async fn a_member_takes_up_each_new_list_after_storing_it_and_the_rules_naming_it() {
        let bucket = Bucket::default();
        let add = |name: &str, secs: i64, ids: &[&str]| {
            let request = Request::new(
                name.into(),
                DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap(),
                &ids.iter().map(|id| hash_id(id)).collect(),
            );
            let key = request_key("p/", &request);
            bucket.0.lock().unwrap().insert(key, request.to_json());
        };
        let current = Arc::new(CurrentList::default());
        let rules = CuttingRules::of(&crate::config::Config::default());
        let metrics = Metrics::new();
        let mut follower = Follower::new(
            bucket.clone(),
            "p/",
            rules.clone(),
            Arc::clone(&current),
            metrics.clone(),
        );
        assert!(!follower.refresh().await.unwrap(), "no request, no list");
        assert!(current.get().is_none());

        add("r1", 0, &["user-1", "user-2"]);
        bucket
            .0
            .lock()
            .unwrap()
            .insert(format!("{}bad.json", requests_prefix("p/")), b"{".to_vec());
        assert!(follower.refresh().await.unwrap());
        let list = current.get().unwrap();
        assert!(list.matches("user-1") && list.matches("user-2") && list.len() == 2);
        assert_eq!(metrics.suppression_ids.get(), 2);
        let stored = bucket.0.lock().unwrap().clone();
        assert_eq!(
            Suppression::parse(&stored[&list_key("p/", list.hash())], list.hash()).unwrap(),
            *list
        );
        let named = rules.clone().with_suppression(Some(&list));
        assert_eq!(named.suppression.as_deref(), Some(list.hash()));
        assert_eq!(
            CuttingRules::parse_reproducible(&stored[&rules_key("p/", &named.hash())]).unwrap(),
            named
        );
        assert!(stored
            .values()
            .all(|bytes| !String::from_utf8_lossy(bytes).contains("user-1")));

        assert!(!follower.refresh().await.unwrap(), "nothing new");
        add("r2", 5, &["user-3", "user-1"]);
        assert!(follower.refresh().await.unwrap());
        let grown = current.get().unwrap();
        assert_eq!(grown.len(), 3);
        assert_ne!(grown.hash(), list.hash());
    }

    /// A member does not consume before it read the list: a bucket that fails for a while is
    /// waited for; one that denies access is the member's error.
    #[tokio::test(start_paused = true)]
    async fn the_first_read_waits_out_transient_failures_and_stops_on_a_permanent_one() {
        let bucket = Bucket::default();
        let request = Request::new(
            "r1".into(),
            Utc::now(),
            &BTreeSet::from([hash_id("user-1")]),
        );
        let key = request_key("", &request);
        bucket.0.lock().unwrap().insert(key, request.to_json());
        let current = Arc::new(CurrentList::default());
        let rules = CuttingRules::of(&crate::config::Config::default());
        let follower = |bucket: &Bucket| {
            Follower::new(
                bucket.clone(),
                "",
                rules.clone(),
                Arc::clone(&current),
                Metrics::new(),
            )
        };
        *bucket.1.lock().unwrap() = vec![ErrorClass::Transient; 3];
        let stop = CancellationToken::new();
        assert!(follower(&bucket).first_refresh(&stop).await.unwrap());
        assert!(current.get().is_some_and(|list| list.matches("user-1")));

        *bucket.1.lock().unwrap() = vec![ErrorClass::Permanent, ErrorClass::Transient];
        let err = follower(&bucket).first_refresh(&stop).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Permanent);

        *bucket.1.lock().unwrap() = vec![ErrorClass::Transient; 100];
        stop.cancel();
        assert!(!follower(&bucket).first_refresh(&stop).await.unwrap());
    }

    #[tokio::test]
    async fn a_request_is_one_object_holding_hashes() {
        let ids = parse_ids(["user-1", "user-2"]);
        let bucket = Bucket::default();
        let (request, key) = submit(&bucket, "p/", &ids).await.unwrap();
        assert!(key.starts_with(&requests_prefix("p/")));
        let stored = Request::parse(&bucket.0.lock().unwrap()[&key]).unwrap();
        assert_eq!(stored, request);
        assert_eq!(stored.ids.len(), 2);
        assert!(!String::from_utf8_lossy(&bucket.0.lock().unwrap()[&key]).contains("user-"));
    }
}
