//! MSK IAM tokens against AWS's reference signer (`aws-msk-iam-sasl-signer-python` from PyPI,
//! `OPS_PYTHON`, installed by `scripts/test.sh`): with the same credentials, region and time,
//! the archiver's token decodes to the same signed request.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::Credentials;
use base64::Engine as _;
use kafka_s3_archiver::kafka_client::msk_iam::{presigned_url, token_of};

/// The reference signer's token for these credentials, decoded.
fn reference_url(region: &str, key: &str, secret: &str, session: Option<&str>) -> String {
    let script = format!(
        "import base64\nfrom aws_msk_iam_sasl_signer import MSKAuthTokenProvider\n\
         token, _ = MSKAuthTokenProvider.generate_auth_token({region:?})\n\
         print(base64.urlsafe_b64decode(token + '=' * (-len(token) % 4)).decode())"
    );
    let home = tempfile::tempdir().unwrap();
    let mut command =
        Command::new(std::env::var("OPS_PYTHON").unwrap_or_else(|_| "python3".into()));
    command
        .args(["-c", &script])
        .env_clear()
        .env("HOME", home.path())
        .env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    if let Some(session) = session {
        command.env("AWS_SESSION_TOKEN", session);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "reference signer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// A presigned URL's endpoint and query parameters (decoded), the signer's own `User-Agent`
/// left out.
fn request_of(url: &str) -> (String, BTreeMap<String, String>) {
    let (endpoint, query) = url.split_once('?').unwrap();
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    let params = query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap())
        .filter(|(name, _)| *name != "User-Agent")
        .map(|(name, value)| (decode(name), decode(value)))
        .collect();
    (endpoint.to_string(), params)
}

/// X-Amz-Date (`20261202T010845Z`) as a time.
fn signing_time(params: &BTreeMap<String, String>) -> SystemTime {
    let date = chrono::NaiveDateTime::parse_from_str(&params["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        .unwrap()
        .and_utc();
    SystemTime::UNIX_EPOCH + Duration::from_secs(date.timestamp() as u64)
}

#[test]
fn tokens_decode_to_the_request_the_reference_signer_makes() {
    for (region, session) in [
        ("us-east-1", None),
        ("eu-west-1", Some("IQoJb3JpZ2luX2VjE/session+token==")),
    ] {
        let (key, secret) = (
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        );
        let reference = reference_url(region, key, secret, session);
        let (endpoint, params) = request_of(&reference);
        let credentials = Credentials::new(key, secret, session.map(str::to_string), None, "test");
        let ours = presigned_url(region, &credentials, signing_time(&params)).unwrap();
        assert_eq!(request_of(&ours), (endpoint, params), "{ours}\n{reference}");
        let token = token_of(&ours);
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), ours);
    }
}
