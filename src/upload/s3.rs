//! The S3 client and request building: one object from a local file (a single PUT, read whole
//! when small or streamed from disk, or multipart above a threshold, each read from the one file
//! opened for it), with checksum, metadata and the operator's object options. One attempt per
//! call; the retry policy lives in the uploader.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectCannedAcl,
    ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use base64::Engine as _;

use crate::config::{ChecksumMode, ContentLabel, S3Config};
use crate::layout::Codec;
use crate::retry::ErrorClass;

use super::store::ObjectStore;

/// Applies the operator's object options (storage class, encryption, canned ACL) and, with
/// `labels`, the metadata and content labels, to a PutObject or CreateMultipartUpload builder:
/// the two builders share these method names but no trait.
macro_rules! with_object_options {
    ($request:expr, $config:expr) => {{
        let mut request = $request;
        if let Some(class) = $config.storage_class.as_s3() {
            request = request.storage_class(StorageClass::from(class));
        }
        if let Some(encryption) = $config.server_side_encryption.as_s3() {
            request = request.server_side_encryption(ServerSideEncryption::from(encryption));
        }
        if !$config.sse_kms_key_id.is_empty() {
            request = request.ssekms_key_id(&$config.sse_kms_key_id);
        }
        if let Some(acl) = $config.acl.as_s3() {
            request = request.acl(ObjectCannedAcl::from(acl));
        }
        request
    }};
    ($request:expr, $config:expr, $metadata:expr) => {{
        let mut request = with_object_options!($request, $config);
        for (name, value) in $metadata.pairs() {
            request = request.metadata(name, value);
        }
        match ($metadata.codec, $config.content_label) {
            (Codec::Zstd, _) => request.content_type("application/zstd"),
            (Codec::Gzip, ContentLabel::Segment) => {
                request.content_type("text/plain").content_encoding("gzip")
            }
            (Codec::Gzip, ContentLabel::Gzip) => request.content_type("application/gzip"),
        }
    }};
}

/// One failed S3 request, classified for the retry policy.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation} s3://{bucket}/{key} failed ({}): {message}", class.as_str())]
pub struct S3Error {
    pub operation: &'static str,
    pub bucket: String,
    pub key: String,
    pub class: ErrorClass,
    /// The S3 error code when the service answered (`AccessDenied`, `NoSuchBucket`, ...).
    pub code: Option<String>,
    pub message: String,
}

/// `x-amz-meta-*` fields every object carries, so an object explains itself without the
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMetadata {
    pub topic: String,
    pub partition: i32,
    pub batch_start: i64,
    pub batch_end: i64,
    pub first_offset: i64,
    pub record_count: u64,
    /// CRC32 of the uncompressed lines (the gzip trailer's): with `record_count`, what makes two
    /// objects under one key the same content whatever bytes the compressor produced.
    pub content_crc32: u32,
    /// zstd objects are labelled `application/zstd` whatever `s3.content_label` says.
    pub codec: Codec,
}

/// Version of the object layout and metadata, bumped on incompatible changes.
pub const FORMAT_VERSION: &str = "1";

impl ObjectMetadata {
    fn pairs(&self) -> [(&'static str, String); 8] {
        [
            ("topic", self.topic.clone()),
            ("partition", self.partition.to_string()),
            ("batch-start", self.batch_start.to_string()),
            ("batch-end", self.batch_end.to_string()),
            ("first-offset", self.first_offset.to_string()),
            ("record-count", self.record_count.to_string()),
            ("content-crc32", format!("{:08x}", self.content_crc32)),
            ("format-version", FORMAT_VERSION.to_string()),
        ]
    }

    /// Whether an object's `x-amz-meta-*` say it holds the same lines as this one.
    pub(super) fn same_content(&self, present: &std::collections::HashMap<String, String>) -> bool {
        present.get("record-count") == Some(&self.record_count.to_string())
            && present.get("content-crc32") == Some(&format!("{:08x}", self.content_crc32))
    }
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Written,
    /// The key already held the same lines (an earlier upload of a replayed or retried batch):
    /// left alone, so the bucket's change notifications do not fire a second time.
    AlreadyPresent,
    /// The partition stopped being this member's during a multipart upload, which was aborted
    /// before it could complete: the new owner uploads the object.
    Abandoned,
    /// The key holds an object with other lines, which is never replaced: another attempt of
    /// the batch put it (a replay Kafka deleted the head of, or a zombie still uploading).
    Conflict,
}

/// Asked between the parts of a multipart upload and before completing it.
pub type StillOurs<'a> = &'a (dyn Fn() -> bool + Send + Sync);

/// The bucket the archive writes to.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    config: S3Config,
}

impl S3Store {
    /// Builds the client from the SDK's default credential chain (environment, profile, IRSA web
    /// identity, instance metadata), optionally assuming a role on top of it.
    pub async fn connect(config: &S3Config) -> S3Store {
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .load()
            .await;
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(config.force_path_style)
            // Our own retry loop owns backoff, metrics and the never-give-up rule.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(config.request_timeout_secs))
                    .build(),
            );
        if !config.endpoint_url.is_empty() {
            builder = builder.endpoint_url(&config.endpoint_url);
        }
        if config.checksum == ChecksumMode::ContentMd5 {
            // Content-MD5 only: the SDK adds no checksum of its own to any request.
            builder =
                builder.request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        }
        if !config.assume_role_arn.is_empty() {
            let mut role = aws_config::sts::AssumeRoleProvider::builder(&config.assume_role_arn)
                .session_name("kafka-s3-archiver")
                .region(Region::new(config.region.clone()));
            if !config.assume_role_external_id.is_empty() {
                role = role.external_id(&config.assume_role_external_id);
            }
            let provider = role.configure(&sdk).build().await;
            builder = builder.credentials_provider(provider);
        }
        S3Store {
            client: Client::from_conf(builder.build()),
            config: config.clone(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The `x-amz-meta-*` fields of the object at `key`, or `None` if there is none.
    pub async fn head_metadata(
        &self,
        key: &str,
    ) -> Result<Option<std::collections::HashMap<String, String>>, S3Error> {
        match self
            .client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(head.metadata().cloned().unwrap_or_default())),
            Err(SdkError::ServiceError(service)) if service.raw().status().as_u16() == 404 => {
                Ok(None)
            }
            Err(err) => Err(self.error("HeadObject", key, err)),
        }
    }

    /// One put of a local file: a single PUT (read whole when small, else streamed from disk),
    /// or multipart from one open file above the threshold.
    pub async fn put_file_once(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        metadata: &ObjectMetadata,
        conditional: bool,
        still_ours: StillOurs<'_>,
    ) -> Result<PutOutcome, S3Error> {
        if len >= self.config.multipart_threshold_bytes {
            return self
                .put_multipart(key, path, len, metadata, conditional, still_ours)
                .await;
        }
        // Opened before ownership is asked: a partition still ours after the open means this is
        // the file that was sealed, whatever takes the path later (revoked and assigned again,
        // the batch directory is re-created while a stale upload may still run).
        let (body, checksum) = if len <= WHOLE_BODY_BYTES {
            let (bytes, checksum) = self.read_whole(key, path, len).await?;
            if !still_ours() {
                return Ok(PutOutcome::Abandoned);
            }
            (ByteStream::from(bytes), checksum)
        } else {
            let file = self.open_sealed(key, path).await?;
            if !still_ours() {
                return Ok(PutOutcome::Abandoned);
            }
            let checksum = self.checksum(key, path, &file, len).await?;
            (self.body(key, path, &file, len).await?, checksum)
        };
        let mut request = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .content_length(len as i64)
            .body(body);
        if conditional {
            request = request.if_none_match("*");
        }
        let mut request = with_object_options!(request, self.config, metadata);
        // A checksum the request carries as a header: the SDK then computes none and sends the
        // body as it is, without the aws-chunked framing and trailer that Garage refuses, and
        // whose second `Content-Encoding` line s3s-fs refuses beside Segment's `gzip`.
        request = match checksum {
            FileChecksum::Crc32c(crc) => request.checksum_crc32_c(crc),
            FileChecksum::Md5(md5) => request.content_md5(md5),
        };
        request
            .customize()
            // The checksum header covers the body, as it does a body streamed from the file
            // (which the SDK cannot hash before sending): hashing it again for the signature
            // would only spend CPU.
            .disable_payload_signing()
            .send()
            .await
            .map_err(|err| self.error("PutObject", key, err))?;
        Ok(PutOutcome::Written)
    }

    /// The body of the object at `key`, to read as it arrives (never whole in memory).
    pub async fn get_stream(&self, key: &str) -> Result<ByteStream, S3Error> {
        let object = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
            .map_err(|err| self.error("GetObject", key, err))?;
        Ok(object.body)
    }

    /// The object at `key`, or `None` if there is none.
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let object = match self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(object) => object,
            Err(SdkError::ServiceError(service)) if service.raw().status().as_u16() == 404 => {
                return Ok(None)
            }
            Err(err) => return Err(self.error("GetObject", key, err)),
        };
        let body = object.body.collect().await.map_err(|err| S3Error {
            operation: "GetObject",
            bucket: self.config.bucket.clone(),
            key: key.to_string(),
            class: ErrorClass::Transient,
            code: None,
            message: err.to_string(),
        })?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    /// Every object under `prefix` with its size, in S3's (lexicographic) order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>, S3Error> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.config.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| self.error("ListObjectsV2", prefix, err))?;
            objects.extend(page.contents().iter().filter_map(|object| {
                let key = object.key()?.to_string();
                Some((key, object.size().unwrap_or_default()))
            }));
        }
        Ok(objects)
    }

    /// Whether the bucket keeps earlier versions of overwritten objects (versioning enabled, or
    /// suspended after it was: the versions made meanwhile stay).
    pub async fn keeps_versions(&self) -> Result<bool, S3Error> {
        let answer = self
            .client
            .get_bucket_versioning()
            .bucket(&self.config.bucket)
            .send()
            .await
            .map_err(|err| self.error("GetBucketVersioning", "", err))?;
        Ok(answer.status().is_some())
    }

    /// The version ids of `key` that are not its current one (a versioned bucket keeps each
    /// overwritten object as one; `null` for one written before versioning was enabled).
    pub async fn noncurrent_versions(&self, key: &str) -> Result<Vec<String>, S3Error> {
        let mut versions = Vec::new();
        let (mut key_marker, mut version_marker) = (None, None);
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.config.bucket)
                .prefix(key)
                .set_key_marker(key_marker)
                .set_version_id_marker(version_marker)
                .send()
                .await
                .map_err(|err| self.error("ListObjectVersions", key, err))?;
            versions.extend(
                page.versions()
                    .iter()
                    .filter(|v| v.key() == Some(key) && v.is_latest() != Some(true))
                    .filter_map(|v| v.version_id().map(str::to_string)),
            );
            if page.is_truncated() != Some(true) {
                return Ok(versions);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
        }
    }

    /// Deletes one version of `key` for good.
    pub async fn delete_version(&self, key: &str, version: &str) -> Result<(), S3Error> {
        self.client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(key)
            .version_id(version)
            .send()
            .await
            .map_err(|err| self.error("DeleteObject", key, err))?;
        Ok(())
    }

    /// Puts small in-memory bytes (manifests, probes) at `key`.
    pub async fn put_bytes(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), S3Error> {
        let request = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .content_type(content_type);
        let mut request = with_object_options!(request, self.config);
        request = match self.config.checksum {
            ChecksumMode::Crc32c => request.checksum_algorithm(ChecksumAlgorithm::Crc32C),
            ChecksumMode::ContentMd5 => request.content_md5(md5_base64(&bytes)),
        };
        request
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|err| self.error("PutObject", key, err))?;
        Ok(())
    }

    async fn put_multipart(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        metadata: &ObjectMetadata,
        conditional: bool,
        still_ours: StillOurs<'_>,
    ) -> Result<PutOutcome, S3Error> {
        // One open file for every part: should the path be replaced meanwhile (the partition
        // revoked and assigned again re-creates its batch directory), the parts still come
        // from the file that was sealed.
        let file = self.open_sealed(key, path).await?;
        let create = self
            .client
            .create_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key);
        let mut create = with_object_options!(create, self.config, metadata);
        if self.config.checksum == ChecksumMode::Crc32c {
            create = create.checksum_algorithm(ChecksumAlgorithm::Crc32C);
        }
        let upload = create
            .send()
            .await
            .map_err(|err| self.error("CreateMultipartUpload", key, err))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();

        let result = self
            .upload_parts(key, path, &file, len, &upload_id, still_ours)
            .await;
        let parts = match result {
            // Completing after the partition moved would let a zombie publish an object the new
            // owner may be writing too.
            Ok(Some(parts)) if still_ours() => parts,
            Ok(_) => {
                self.abort_multipart(key, &upload_id).await;
                return Ok(PutOutcome::Abandoned);
            }
            Err(err) => {
                self.abort_multipart(key, &upload_id).await;
                return Err(err);
            }
        };
        let mut complete = self
            .client
            .complete_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        if conditional {
            complete = complete.if_none_match("*");
        }
        if let Err(err) = complete.send().await {
            let err = self.error("CompleteMultipartUpload", key, err);
            self.abort_multipart(key, &upload_id).await;
            return Err(err);
        }
        Ok(PutOutcome::Written)
    }

    /// Best effort: an aborted upload leaves no billable parts behind. The next attempt starts
    /// a new upload, so one that failed to complete is never left open; a lifecycle rule on
    /// incomplete uploads covers the case where the abort fails too (README).
    async fn abort_multipart(&self, key: &str, upload_id: &str) {
        if let Err(err) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            let err = self.error("AbortMultipartUpload", key, err);
            tracing::warn!(error = %err, "cannot abort a multipart upload; a lifecycle rule on incomplete uploads removes its parts");
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        path: &Path,
        file: &std::sync::Arc<std::fs::File>,
        len: u64,
        upload_id: &str,
        still_ours: StillOurs<'_>,
    ) -> Result<Option<Vec<CompletedPart>>, S3Error> {
        let part_size = self.config.multipart_part_bytes;
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 1;
        while offset < len {
            if !still_ours() {
                return Ok(None);
            }
            let size = part_size.min(len - offset);
            let (body, md5) = self.read_part(key, path, file, offset, size).await?;
            let mut request = self
                .client
                .upload_part()
                .bucket(&self.config.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(size as i64)
                .body(ByteStream::from(body));
            request = match md5 {
                None => request.checksum_algorithm(ChecksumAlgorithm::Crc32C),
                Some(md5) => request.content_md5(md5),
            };
            let output = request
                .send()
                .await
                .map_err(|err| self.error("UploadPart", key, err))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(output.e_tag().map(str::to_string))
                    .set_checksum_crc32_c(output.checksum_crc32_c().map(str::to_string))
                    .build(),
            );
            offset += size;
            number += 1;
        }
        Ok(Some(parts))
    }

    /// One part of an open file, read into memory on a blocking thread (a part in flight costs
    /// its size in memory: at most `s3.concurrency` × `s3.multipart_part_bytes`), with its MD5
    /// when that is the checksum mode. In memory, the SDK can sign and resend it; a stream from
    /// an open file could not be rewound.
    async fn read_part(
        &self,
        key: &str,
        path: &Path,
        file: &std::sync::Arc<std::fs::File>,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<u8>, Option<String>), S3Error> {
        use std::os::unix::fs::FileExt as _;
        let file = file.clone();
        let with_md5 = self.config.checksum == ChecksumMode::ContentMd5;
        self.read_local(key, path, move || {
            let mut part = vec![0; len as usize];
            file.read_exact_at(&mut part, offset)?;
            let md5 = with_md5.then(|| md5_base64(&part));
            Ok((part, md5))
        })
        .await
    }

    /// Opens the sealed file an upload reads from, on a blocking thread.
    async fn open_sealed(
        &self,
        key: &str,
        path: &Path,
    ) -> Result<std::sync::Arc<std::fs::File>, S3Error> {
        let opened = path.to_path_buf();
        self.read_local(key, path, move || {
            std::fs::File::open(opened).map(std::sync::Arc::new)
        })
        .await
    }

    /// The first `len` bytes of the open file, streamed as the request goes.
    async fn body(
        &self,
        key: &str,
        path: &Path,
        file: &std::sync::Arc<std::fs::File>,
        len: u64,
    ) -> Result<ByteStream, S3Error> {
        let file = file
            .try_clone()
            .map_err(|err| self.local_error(key, path, err))?;
        ByteStream::read_from()
            .file(tokio::fs::File::from_std(file))
            .offset(0)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|err| self.local_error(key, path, err))
    }

    /// The first `len` bytes of the sealed file and their checksum, read in one go on a blocking
    /// thread (a small object: see [`WHOLE_BODY_BYTES`]).
    async fn read_whole(
        &self,
        key: &str,
        path: &Path,
        len: u64,
    ) -> Result<(Vec<u8>, FileChecksum), S3Error> {
        let (opened, mode) = (path.to_path_buf(), self.config.checksum);
        self.read_local(key, path, move || {
            use std::os::unix::fs::FileExt as _;
            let mut bytes = vec![0u8; len as usize];
            std::fs::File::open(opened)?.read_exact_at(&mut bytes, 0)?;
            let mut checksum = Checksummer::new(mode);
            checksum.update(&bytes);
            Ok((bytes, checksum.finish()))
        })
        .await
    }

    /// The checksum `s3.checksum` asks for, of the first `len` bytes of the open file, computed
    /// on a blocking thread (positioned reads: the body's stream keeps its own offset). The
    /// store checks the body it receives against it, so a file that changed between this read
    /// and the body's is refused, never stored.
    async fn checksum(
        &self,
        key: &str,
        path: &Path,
        file: &std::sync::Arc<std::fs::File>,
        len: u64,
    ) -> Result<FileChecksum, S3Error> {
        let file = std::sync::Arc::clone(file);
        let mode = self.config.checksum;
        self.read_local(key, path, move || file_checksum(&file, len, mode))
            .await
    }

    /// Runs `read`, file I/O for the upload of `path` to `key`, on a blocking thread; its
    /// failure is the local file's ([`Self::local_error`]).
    async fn read_local<T: Send + 'static>(
        &self,
        key: &str,
        path: &Path,
        read: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, S3Error> {
        tokio::task::spawn_blocking(read)
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|err| self.local_error(key, path, err))
    }

    /// The local file of an upload cannot be read: not the store's fault, and not worth a retry.
    fn local_error(&self, key: &str, path: &Path, err: impl std::fmt::Display) -> S3Error {
        S3Error {
            operation: "ReadLocalFile",
            bucket: self.config.bucket.clone(),
            key: key.to_string(),
            class: ErrorClass::Permanent,
            code: None,
            message: format!("{}: {err}", path.display()),
        }
    }

    fn error<E>(&self, operation: &'static str, key: &str, err: SdkError<E>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let (class, code) = classify(&err);
        S3Error {
            operation,
            bucket: self.config.bucket.clone(),
            key: key.to_string(),
            class,
            code,
            message: DisplayErrorContext(&err).to_string(),
        }
    }
}

impl ObjectStore for S3Store {
    fn conditional_writes(&self) -> bool {
        self.config.conditional_writes
    }

    async fn head_metadata(
        &self,
        key: &str,
    ) -> Result<Option<std::collections::HashMap<String, String>>, S3Error> {
        S3Store::head_metadata(self, key).await
    }

    async fn put_file_once(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        metadata: &ObjectMetadata,
        conditional: bool,
        still_ours: StillOurs<'_>,
    ) -> Result<PutOutcome, S3Error> {
        S3Store::put_file_once(self, key, path, len, metadata, conditional, still_ours).await
    }

    async fn put_bytes(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), S3Error> {
        S3Store::put_bytes(self, key, bytes, content_type).await
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        S3Store::get_bytes(self, key).await
    }

    async fn keeps_versions(&self) -> Result<bool, S3Error> {
        S3Store::keeps_versions(self).await
    }

    async fn noncurrent_versions(&self, key: &str) -> Result<Vec<String>, S3Error> {
        S3Store::noncurrent_versions(self, key).await
    }

    async fn delete_version(&self, key: &str, version: &str) -> Result<(), S3Error> {
        S3Store::delete_version(self, key, version).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>, S3Error> {
        S3Store::list(self, prefix).await
    }
}

/// A single PUT's checksum header, base64 as S3 spells both.
#[derive(Debug, PartialEq, Eq)]
enum FileChecksum {
    Md5(String),
    Crc32c(String),
}

/// Objects up to this size are read whole into memory and put from there: one blocking read
/// instead of an open, a checksum pass and the body's reads, each a hop to the blocking pool
/// and back (most of an object's cost on the async threads when objects are small). Uploads
/// then hold at most `s3.concurrency` x this in memory.
const WHOLE_BODY_BYTES: u64 = 256 << 10;

/// The checksum `mode` asks for, fed as the bytes are read.
struct Checksummer {
    mode: ChecksumMode,
    md5: md5::Md5,
    crc32c: crc_fast::Digest,
}

impl Checksummer {
    fn new(mode: ChecksumMode) -> Checksummer {
        use md5::Digest as _;
        Checksummer {
            mode,
            md5: md5::Md5::new(),
            crc32c: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        use md5::Digest as _;
        match self.mode {
            ChecksumMode::ContentMd5 => self.md5.update(bytes),
            ChecksumMode::Crc32c => self.crc32c.update(bytes),
        }
    }

    fn finish(self) -> FileChecksum {
        use md5::Digest as _;
        let base64 = &base64::engine::general_purpose::STANDARD;
        match self.mode {
            ChecksumMode::ContentMd5 => FileChecksum::Md5(base64.encode(self.md5.finalize())),
            ChecksumMode::Crc32c => {
                FileChecksum::Crc32c(base64.encode((self.crc32c.finalize() as u32).to_be_bytes()))
            }
        }
    }
}

/// The checksum `mode` asks for of the first `len` bytes of `file`, read at positions.
fn file_checksum(
    file: &std::fs::File,
    len: u64,
    mode: ChecksumMode,
) -> std::io::Result<FileChecksum> {
    use std::os::unix::fs::FileExt as _;
    let mut checksum = Checksummer::new(mode);
    let mut buf = vec![0u8; (1 << 16).min(len as usize)];
    let mut offset = 0;
    while offset < len {
        let want = buf.len().min((len - offset) as usize);
        let n = file.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        checksum.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(checksum.finish())
}

fn md5_base64(bytes: &[u8]) -> String {
    use md5::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(bytes))
}

/// Throttling, server errors, timeouts and broken connections are worth retrying soon;
/// anything the service refused for a reason (denied, missing bucket, bad request) is not.
pub fn classify<E>(err: &SdkError<E>) -> (ErrorClass, Option<String>)
where
    E: ProvideErrorMetadata,
{
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            (ErrorClass::Transient, None)
        }
        SdkError::ServiceError(service) => {
            let code = service.err().code().map(str::to_string);
            let status = service.raw().status().as_u16();
            let transient = status >= 500
                || status == 429
                || matches!(
                    code.as_deref(),
                    Some(
                        "SlowDown"
                            | "RequestTimeout"
                            | "RequestTimeTooSkewed"
                            | "InternalError"
                            | "ServiceUnavailable"
                            | "Throttling"
                            | "ThrottlingException"
                            | "RequestLimitExceeded"
                            | "OperationAborted"
                    )
                );
            (
                if transient {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Permanent
                },
                code,
            )
        }
        _ => (ErrorClass::Permanent, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header values are those S3 defines: base64 of the big-endian CRC32C (Castagnoli,
    /// check value 0xE3069283 for "123456789") and of the MD5 digest, of the first `len` bytes.
    #[test]
    fn a_files_checksum_is_the_header_s3_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        std::fs::write(&path, b"123456789 and bytes past the object's length").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        assert_eq!(
            file_checksum(&file, 9, ChecksumMode::Crc32c).unwrap(),
            FileChecksum::Crc32c(encode(&0xE306_9283u32.to_be_bytes()))
        );
        assert_eq!(
            file_checksum(&file, 9, ChecksumMode::ContentMd5).unwrap(),
            FileChecksum::Md5(md5_base64(b"123456789"))
        );
        assert!(file_checksum(&file, 1 << 20, ChecksumMode::Crc32c).is_err());

        // Longer than one read: the digest runs over every read.
        let long: Vec<u8> = (0..200_000u32).map(|n| (n % 251) as u8).collect();
        std::fs::write(&path, &long).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        assert_eq!(
            file_checksum(&file, long.len() as u64, ChecksumMode::ContentMd5).unwrap(),
            FileChecksum::Md5(md5_base64(&long))
        );
    }
}
