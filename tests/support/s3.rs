//! The S3-API server of a test (moto), read back through awscli.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::*;

/// moto's S3 server, in memory.
pub struct S3Server {
    pub process: Process,
    pub port: u16,
}

impl S3Server {
    pub fn start(dir: &Path) -> S3Server {
        let port = free_port();
        let mut command = Command::new(tool("MOTO_SERVER", "moto_server"));
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut process = Process::spawn(command, dir.join("moto.log"));
        wait_for_port(port, "moto_server", &mut process.child, &process.log);
        let server = S3Server { process, port };
        server.aws(&["s3", "mb", &format!("s3://{BUCKET}")]);
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs awscli against this server.
    pub fn aws(&self, args: &[&str]) -> Output {
        run_ok(
            Command::new(tool("AWS_CLI", "aws"))
                .args(["--endpoint-url", &self.endpoint(), "--region", "us-east-1"])
                .args(args)
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        )
    }

    /// Keeps every overwritten object as a noncurrent version from now on.
    pub fn enable_versioning(&self) {
        self.aws(&[
            "s3api",
            "put-bucket-versioning",
            "--bucket",
            BUCKET,
            "--versioning-configuration",
            "Status=Enabled",
        ]);
    }

    /// The keys that have noncurrent versions, each with how many.
    pub fn noncurrent_versions(&self) -> BTreeMap<String, usize> {
        let output = self.aws(&[
            "s3api",
            "list-object-versions",
            "--bucket",
            BUCKET,
            "--output",
            "json",
        ]);
        let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        let mut noncurrent = BTreeMap::new();
        for version in listing["Versions"].as_array().into_iter().flatten() {
            if version["IsLatest"] == false {
                let key = version["Key"].as_str().unwrap_or_default().to_string();
                *noncurrent.entry(key).or_default() += 1;
            }
        }
        noncurrent
    }

    /// The batch manifests in the bucket, parsed.
    pub fn manifests(&self, dir: &Path) -> Vec<serde_json::Value> {
        let out = dir.join("manifests");
        self.aws(&[
            "s3",
            "sync",
            "--only-show-errors",
            &format!("s3://{BUCKET}/segment-logs/_manifests"),
            out.to_str().unwrap(),
        ]);
        if !out.exists() {
            return Vec::new();
        }
        files_under(&out)
            .values()
            .map(|path| serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
            .collect()
    }

    /// Every key in the bucket.
    pub fn keys(&self) -> Vec<String> {
        self.versions().into_keys().collect()
    }

    /// Every key with its ETag and last-modified time: what changes when an object is
    /// rewritten, even with the same bytes.
    pub fn versions(&self) -> BTreeMap<String, (String, String)> {
        let output = self.aws(&[
            "s3api",
            "list-objects-v2",
            "--bucket",
            BUCKET,
            "--output",
            "json",
        ]);
        let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        listing["Contents"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        let field = |name: &str| i[name].as_str().unwrap_or_default().to_string();
                        (field("Key"), (field("ETag"), field("LastModified")))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `aws s3 sync` of the whole bucket into `dir`.
    /// Downloads the objects under `prefix` into `dir` (keys relative to the prefix).
    pub fn download_prefix(&self, prefix: &str, dir: &Path) {
        self.aws(&[
            "s3",
            "sync",
            "--only-show-errors",
            &format!("s3://{BUCKET}/{prefix}"),
            dir.to_str().unwrap(),
        ]);
    }

    pub fn download(&self, dir: &Path) {
        self.aws(&[
            "s3",
            "sync",
            "--only-show-errors",
            &format!("s3://{BUCKET}"),
            dir.to_str().unwrap(),
        ]);
    }

    pub fn head(&self, key: &str) -> serde_json::Value {
        let output = self.aws(&[
            "s3api",
            "head-object",
            "--bucket",
            BUCKET,
            "--key",
            key,
            "--output",
            "json",
        ]);
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

/// s3s-fs: an S3 API over a directory, which checks CRC32C trailers and `If-None-Match` (moto
/// checks neither). Its buckets are directories and its objects files, read back directly.
pub struct S3sFs {
    pub process: Process,
    pub port: u16,
    pub root: PathBuf,
}

impl S3sFs {
    /// Starts it over `dir/s3s-fs` with the bucket `BUCKET` and the tests' key.
    pub fn start(dir: &Path) -> S3sFs {
        let root = dir.join("s3s-fs");
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = free_port();
        let mut command = Command::new(tool("S3S_FS_BIN", "s3s-fs"));
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "testing", "--secret-key", "testing"])
            .arg(&root);
        let mut process = Process::spawn(command, dir.join("s3s-fs.log"));
        wait_for_port(port, "s3s-fs", &mut process.child, &process.log);
        S3sFs {
            process,
            port,
            root,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The bucket's directory: keys are paths under it.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(BUCKET)
    }
}
