//! The bucket as the upload protocol sees it: the few requests it makes ([`ObjectStore`]), and
//! the one decision taken above them, whether a key already holds the lines being put
//! ([`ObjectStore::put_file`]). S3 answers in production (`s3.rs`); the seeded simulation
//! (`tests/simulation.rs`) answers with a store of its own that loses answers, refuses and goes
//! down, so the protocol it checks is this code, not a copy of it.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;

use super::s3::{ObjectMetadata, PutOutcome, S3Error, StillOurs};

/// One attempt per call; retries, backoff and ownership checks live in the uploader.
pub trait ObjectStore: Send + Sync + 'static {
    /// Whether a put may carry `If-None-Match: *` (`s3.conditional_writes`): where it may, a key
    /// that is already there answers `PreconditionFailed` instead of being overwritten.
    fn conditional_writes(&self) -> bool;

    /// The `x-amz-meta-*` fields of the object at `key`, or `None` if there is none.
    fn head_metadata(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<HashMap<String, String>>, S3Error>> + Send;

    /// One put of the local file `path` (`len` bytes) at `key`, read from a single open file
    /// however many requests it takes; `conditional` asks the store to refuse an existing key.
    fn put_file_once(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        metadata: &ObjectMetadata,
        conditional: bool,
        still_ours: StillOurs<'_>,
    ) -> impl Future<Output = Result<PutOutcome, S3Error>> + Send;

    /// Puts small in-memory bytes (manifests, cutting rules) at `key`.
    fn put_bytes(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> impl Future<Output = Result<(), S3Error>> + Send;

    /// The object at `key`, or `None` if there is none.
    fn get_bytes(&self, key: &str)
        -> impl Future<Output = Result<Option<Vec<u8>>, S3Error>> + Send;

    /// Whether the bucket keeps earlier versions of overwritten objects.
    fn keeps_versions(&self) -> impl Future<Output = Result<bool, S3Error>> + Send {
        async { Ok(false) }
    }

    /// The version ids of `key` other than its current one, on a versioned bucket (`forget`
    /// deletes them: they hold what it rewrote). A store without versions has none.
    fn noncurrent_versions(
        &self,
        _key: &str,
    ) -> impl Future<Output = Result<Vec<String>, S3Error>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Deletes one version of `key` for good.
    fn delete_version(
        &self,
        key: &str,
        _version: &str,
    ) -> impl Future<Output = Result<(), S3Error>> + Send {
        let key = key.to_string();
        async move {
            Err(S3Error {
                operation: "DeleteObject",
                bucket: String::new(),
                key,
                class: crate::retry::ErrorClass::Permanent,
                code: None,
                message: "this store keeps no versions".into(),
            })
        }
    }

    /// Every object under `prefix` with its size, in lexicographic order.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<(String, i64)>, S3Error>> + Send;

    /// Puts the local file `path` at `key`, unless the key already holds the same lines.
    /// `may_exist` (a replayed batch, a retried request) looks first; otherwise a conditional
    /// put, where the store takes one, finds out. An object with the same key but other lines
    /// is left alone (`Conflict`): loaders may have ingested it, and the uploader decides.
    fn put_file(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        metadata: &ObjectMetadata,
        may_exist: bool,
        still_ours: StillOurs<'_>,
    ) -> impl Future<Output = Result<PutOutcome, S3Error>> + Send {
        async move {
            if may_exist {
                match self.compare_present(key, metadata).await? {
                    Present::SameLines => return Ok(PutOutcome::AlreadyPresent),
                    // Known before the put: a store that ignores `If-None-Match` would replace it.
                    Present::OtherLines => return Ok(PutOutcome::Conflict),
                    Present::Nothing => {}
                }
            }
            let put =
                |conditional| self.put_file_once(key, path, len, metadata, conditional, still_ours);
            match put(self.conditional_writes()).await {
                Err(err) if err.code.as_deref() == Some("PreconditionFailed") => {
                    match self.compare_present(key, metadata).await? {
                        Present::SameLines => Ok(PutOutcome::AlreadyPresent),
                        Present::OtherLines | Present::Nothing => Ok(PutOutcome::Conflict),
                    }
                }
                result => result,
            }
        }
    }

    /// What `key` holds, compared with the lines `metadata` describes (record count and
    /// content checksum).
    fn compare_present(
        &self,
        key: &str,
        metadata: &ObjectMetadata,
    ) -> impl Future<Output = Result<Present, S3Error>> + Send {
        async move {
            Ok(match self.head_metadata(key).await? {
                None => Present::Nothing,
                Some(present) if metadata.same_content(&present) => Present::SameLines,
                Some(_) => Present::OtherLines,
            })
        }
    }
}

/// What a key holds, as `put_file` weighs it.
pub enum Present {
    Nothing,
    SameLines,
    OtherLines,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::layout::Codec;

    /// A store that ignores `If-None-Match` (Garage 2.5): a put always overwrites.
    #[derive(Default)]
    struct Overwriting {
        objects: Mutex<HashMap<String, HashMap<String, String>>>,
    }

    impl ObjectStore for Overwriting {
        fn conditional_writes(&self) -> bool {
            false
        }

        async fn head_metadata(
            &self,
            key: &str,
        ) -> Result<Option<HashMap<String, String>>, S3Error> {
            Ok(self.objects.lock().unwrap().get(key).cloned())
        }

        async fn put_file_once(
            &self,
            key: &str,
            _path: &Path,
            _len: u64,
            metadata: &ObjectMetadata,
            _conditional: bool,
            _still_ours: StillOurs<'_>,
        ) -> Result<PutOutcome, S3Error> {
            let fields = HashMap::from([
                ("record-count".into(), metadata.record_count.to_string()),
                (
                    "content-crc32".into(),
                    format!("{:08x}", metadata.content_crc32),
                ),
            ]);
            self.objects.lock().unwrap().insert(key.into(), fields);
            Ok(PutOutcome::Written)
        }

        async fn put_bytes(&self, _: &str, _: Vec<u8>, _: &str) -> Result<(), S3Error> {
            unreachable!("put_file puts files")
        }

        async fn get_bytes(&self, _: &str) -> Result<Option<Vec<u8>>, S3Error> {
            unreachable!("put_file reads no object")
        }

        async fn list(&self, _: &str) -> Result<Vec<(String, i64)>, S3Error> {
            unreachable!("put_file lists nothing")
        }
    }

    fn lines(record_count: u64, content_crc32: u32) -> ObjectMetadata {
        ObjectMetadata {
            topic: "t".into(),
            partition: 0,
            batch_start: 0,
            batch_end: 9,
            first_offset: 0,
            record_count,
            content_crc32,
            codec: Codec::Gzip,
        }
    }

    #[tokio::test]
    async fn a_key_seen_to_hold_other_lines_is_not_put_on_a_store_that_ignores_if_none_match() {
        let store = Overwriting::default();
        let still_ours = || true;
        let path = Path::new("unused");
        let first = store
            .put_file("k", path, 1, &lines(10, 0xaa), false, &still_ours)
            .await
            .unwrap();
        assert_eq!(first, PutOutcome::Written);
        let again = store
            .put_file("k", path, 1, &lines(10, 0xaa), true, &still_ours)
            .await
            .unwrap();
        assert_eq!(again, PutOutcome::AlreadyPresent);
        let other = store
            .put_file("k", path, 1, &lines(7, 0xbb), true, &still_ours)
            .await
            .unwrap();
        assert_eq!(other, PutOutcome::Conflict);
        assert_eq!(
            store.objects.lock().unwrap()["k"]["record-count"],
            "10",
            "the object with other lines was replaced"
        );
    }
}
