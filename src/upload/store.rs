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
            if may_exist && self.holds_same_content(key, metadata).await? {
                return Ok(PutOutcome::AlreadyPresent);
            }
            let put =
                |conditional| self.put_file_once(key, path, len, metadata, conditional, still_ours);
            match put(self.conditional_writes()).await {
                Err(err) if err.code.as_deref() == Some("PreconditionFailed") => {
                    if self.holds_same_content(key, metadata).await? {
                        return Ok(PutOutcome::AlreadyPresent);
                    }
                    Ok(PutOutcome::Conflict)
                }
                result => result,
            }
        }
    }

    /// Whether `key` exists with the same record count and content checksum.
    fn holds_same_content(
        &self,
        key: &str,
        metadata: &ObjectMetadata,
    ) -> impl Future<Output = Result<bool, S3Error>> + Send {
        async move {
            Ok(self
                .head_metadata(key)
                .await?
                .is_some_and(|present| metadata.same_content(&present)))
        }
    }
}
