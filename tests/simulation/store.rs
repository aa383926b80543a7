//! The simulation's S3: a bucket in memory behind the archiver's own `ObjectStore` interface,
//! with conditional writes, HEAD and listing, and faults drawn from the run's seed: requests
//! refused (`InternalError`), answers lost after the write took effect, and outages. It keeps
//! every object's history, so a key that was ever given other lines is caught, except by an
//! operator's `forget` taking out exactly the lines of the users it forgets.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use kafka_s3_archiver::retry::ErrorClass;
use kafka_s3_archiver::upload::s3::{ObjectMetadata, PutOutcome, S3Error, StillOurs};
use kafka_s3_archiver::upload::store::ObjectStore;

#[derive(Debug, Clone)]
pub struct Object {
    pub body: Vec<u8>,
    pub metadata: HashMap<String, String>,
}

/// How the store misbehaves now; the schedule changes it as the run goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Every request fails.
    pub down: bool,
    /// Chance that a request fails before it takes effect.
    pub refuse: f64,
    /// Chance that a write takes effect and its answer is lost.
    pub lose_answer: f64,
}

#[derive(Debug)]
pub struct Bucket {
    pub objects: BTreeMap<String, Object>,
    /// Keys whose object was overwritten with other lines: never allowed, but for `forget`
    /// taking out the lines of users in `forgotten`.
    pub replaced: Vec<String>,
    /// What marks a line of a user an operator asked to forget (`"userId":"u3"`).
    pub forgotten: Vec<String>,
    pub faults: Faults,
    rng: fastrand::Rng,
}

/// Cheap to clone: every member of the run and the checks share one bucket.
#[derive(Debug, Clone)]
pub struct SimStore {
    pub bucket: Arc<Mutex<Bucket>>,
    /// Answers every request: for the lookups an assignment makes, which retry in real time
    /// (`fetch_until_known`) and would only slow the run down.
    faultless: bool,
    /// An operator's `forget`: requests it makes before it is killed (`kill -9`: every request
    /// after fails), and rewrites it may make.
    forget: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl SimStore {
    pub fn new(seed: u64) -> SimStore {
        SimStore {
            bucket: Arc::new(Mutex::new(Bucket {
                objects: BTreeMap::new(),
                replaced: Vec::new(),
                forgotten: Vec::new(),
                faults: Faults::default(),
                rng: fastrand::Rng::with_seed(seed),
            })),
            faultless: false,
            forget: None,
        }
    }

    /// The same bucket, without faults.
    pub fn faultless(&self) -> SimStore {
        SimStore {
            bucket: Arc::clone(&self.bucket),
            faultless: true,
            forget: None,
        }
    }

    /// The same bucket, without faults, for a `forget` killed after `requests` requests.
    pub fn for_forget(&self, requests: usize) -> SimStore {
        SimStore {
            bucket: Arc::clone(&self.bucket),
            faultless: true,
            forget: Some(Arc::new(std::sync::atomic::AtomicUsize::new(requests))),
        }
    }

    pub fn set_faults(&self, faults: Faults) {
        self.bucket.lock().unwrap().faults = faults;
    }

    /// Refuses the request if the faults say so.
    fn admit(&self, operation: &'static str, key: &str) -> Result<(), S3Error> {
        let mut bucket = self.bucket.lock().unwrap();
        if let Some(left) = &self.forget {
            let before = left.load(std::sync::atomic::Ordering::Relaxed);
            if before == 0 {
                return Err(S3Error {
                    class: ErrorClass::Permanent,
                    ..error(operation, key, "Killed")
                });
            }
            left.store(before - 1, std::sync::atomic::Ordering::Relaxed);
        }
        if self.faultless {
            return Ok(());
        }
        let refuse = bucket.faults.refuse;
        if bucket.faults.down || bucket.rng.f64() < refuse {
            return Err(error(operation, key, "InternalError"));
        }
        Ok(())
    }

    /// Stores `object` at `key`: `Err` with the write done when the answer is lost.
    fn write(&self, operation: &'static str, key: &str, object: Object) -> Result<(), S3Error> {
        let mut bucket = self.bucket.lock().unwrap();
        // Manifests and rules are checked on their own; event objects must never change lines.
        if let Some(present) = bucket.objects.get(key).filter(|_| !key.ends_with(".json")) {
            let lines = lines_of(&object.body);
            if present.body != object.body && lines_of(&present.body) != lines {
                let forgetting = lines_of(&present.body)
                    .split_inclusive(|&b| b == b'\n')
                    .filter(|line| {
                        !bucket
                            .forgotten
                            .iter()
                            .any(|user| line.windows(user.len()).any(|w| w == user.as_bytes()))
                    })
                    .flatten()
                    .copied()
                    .collect::<Vec<u8>>();
                if self.forget.is_none() || forgetting != lines {
                    bucket.replaced.push(key.to_string());
                }
            }
        }
        bucket.objects.insert(key.to_string(), object);
        let lose = bucket.faults.lose_answer;
        if !self.faultless && bucket.rng.f64() < lose {
            return Err(error(operation, key, "InternalError"));
        }
        Ok(())
    }
}

/// The uncompressed lines of an object (bytes of other formats compare as themselves).
pub fn lines_of(body: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut lines = Vec::new();
    match flate2::read::MultiGzDecoder::new(body).read_to_end(&mut lines) {
        Ok(_) => lines,
        Err(_) => body.to_vec(),
    }
}

fn error(operation: &'static str, key: &str, code: &str) -> S3Error {
    S3Error {
        operation,
        bucket: "simulated".into(),
        key: key.to_string(),
        class: if code == "PreconditionFailed" {
            ErrorClass::Permanent
        } else {
            ErrorClass::Transient
        },
        code: Some(code.to_string()),
        message: format!("simulated {code}"),
    }
}

impl ObjectStore for SimStore {
    fn conditional_writes(&self) -> bool {
        true
    }

    async fn head_metadata(&self, key: &str) -> Result<Option<HashMap<String, String>>, S3Error> {
        self.admit("HeadObject", key)?;
        let bucket = self.bucket.lock().unwrap();
        Ok(bucket.objects.get(key).map(|o| o.metadata.clone()))
    }

    async fn put_file_once(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        metadata: &ObjectMetadata,
        conditional: bool,
        _still_ours: StillOurs<'_>,
    ) -> Result<PutOutcome, S3Error> {
        self.admit("PutObject", key)?;
        if conditional && self.bucket.lock().unwrap().objects.contains_key(key) {
            return Err(error("PutObject", key, "PreconditionFailed"));
        }
        let mut body = std::fs::read(path).map_err(|err| S3Error {
            operation: "ReadLocalFile",
            bucket: "simulated".into(),
            key: key.to_string(),
            class: ErrorClass::Permanent,
            code: None,
            message: format!("{}: {err}", path.display()),
        })?;
        body.truncate(len as usize);
        let metadata = HashMap::from([
            (
                "record-count".to_string(),
                metadata.record_count.to_string(),
            ),
            (
                "content-crc32".to_string(),
                format!("{:08x}", metadata.content_crc32),
            ),
            ("batch-start".to_string(), metadata.batch_start.to_string()),
            ("batch-end".to_string(), metadata.batch_end.to_string()),
        ]);
        self.write("PutObject", key, Object { body, metadata })?;
        Ok(PutOutcome::Written)
    }

    async fn put_bytes(
        &self,
        key: &str,
        bytes: Vec<u8>,
        _content_type: &str,
    ) -> Result<(), S3Error> {
        self.admit("PutObject", key)?;
        let object = Object {
            body: bytes,
            metadata: HashMap::new(),
        };
        self.write("PutObject", key, object)
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        self.admit("GetObject", key)?;
        let bucket = self.bucket.lock().unwrap();
        Ok(bucket.objects.get(key).map(|o| o.body.clone()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>, S3Error> {
        self.admit("ListObjectsV2", prefix)?;
        let bucket = self.bucket.lock().unwrap();
        Ok(bucket
            .objects
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, object)| (key.clone(), object.body.len() as i64))
            .collect())
    }
}
