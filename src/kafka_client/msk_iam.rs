//! AWS MSK IAM authentication: SASL OAUTHBEARER with the token AWS's MSK IAM signers make — a
//! SigV4-presigned `GET https://kafka.{region}.amazonaws.com/?Action=kafka-cluster:Connect`
//! (service `kafka-cluster`, valid 15 minutes), base64url-encoded without padding. Credentials
//! come from the SDK's default chain, as S3's do (IRSA web identity on EKS). librdkafka asks for
//! a fresh token before the current one expires (`ClientContext::generate_oauth_token`); a token
//! never outlives the credentials it was signed with, and the chain's answer is reused until
//! near its end rather than fetched for every token.
//!
//! The token is checked against AWS's reference signer (`aws-msk-iam-sasl-signer-python`) in
//! `tests/msk_iam.rs`: same credentials, region and time give the same signed request.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::{Credentials, ProvideCredentials};
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use base64::Engine as _;
use rdkafka::client::OAuthToken;

/// How long a token is valid, as AWS's signers make them.
const TOKEN_VALIDITY: Duration = Duration::from_secs(900);
/// Identifies this client in the token, as AWS's signers do with theirs.
const USER_AGENT: &str = concat!("kafka-s3-archiver/", env!("CARGO_PKG_VERSION"));

/// The presigned request a token carries.
pub fn presigned_url(
    region: &str,
    credentials: &Credentials,
    time: SystemTime,
) -> Result<String, String> {
    let endpoint = format!("https://kafka.{region}.amazonaws.com/");
    let unsigned = format!("{endpoint}?Action=kafka-cluster%3AConnect");
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_VALIDITY);
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kafka-cluster")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|err| err.to_string())?
        .into();
    let request = SignableRequest::new(
        "GET",
        unsigned.as_str(),
        std::iter::empty(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|err| err.to_string())?;
    let (instructions, _) = sign(request, &params)
        .map_err(|err| err.to_string())?
        .into_parts();
    let (_, query) = instructions.into_parts();
    let mut url = unsigned;
    let user_agent = ("User-Agent", Cow::Borrowed(USER_AGENT));
    for (name, value) in query.iter().chain(std::iter::once(&user_agent)) {
        url.push('&');
        url.push_str(name);
        url.push('=');
        url.push_str(&uri_encode(value));
    }
    Ok(url)
}

/// The SASL token of a presigned URL.
pub fn token_of(url: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url)
}

/// Percent-encodes all but RFC 3986's unreserved characters, as SigV4 wants query values.
fn uri_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// When a token signed at `now` with `credentials` stops working: after its 15 minutes, or
/// when the (temporary) credentials it was signed with expire, whichever comes first.
fn token_expiry(now: SystemTime, credentials: &Credentials) -> SystemTime {
    let signed_for = now + TOKEN_VALIDITY;
    credentials
        .expiry()
        .map_or(signed_for, |expiry| expiry.min(signed_for))
}

/// Credentials without an expiry (static keys) are asked for again after this long, so a
/// rotated key or profile is picked up.
const CREDENTIALS_RECHECK: Duration = Duration::from_secs(3_600);
/// Temporary credentials are replaced this long before they expire: a token signed with them
/// should live a good part of its 15 minutes.
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);

/// What the chain gave last, and when.
#[derive(Debug, Clone)]
struct FetchedCredentials {
    credentials: Credentials,
    at: SystemTime,
}

impl FetchedCredentials {
    fn reusable(&self, now: SystemTime) -> bool {
        match self.credentials.expiry() {
            Some(expiry) => now + CREDENTIALS_MARGIN < expiry,
            None => now < self.at + CREDENTIALS_RECHECK,
        }
    }
}

/// Makes tokens for the clients of one cluster.
#[derive(Debug, Clone)]
pub struct MskIamSigner {
    region: String,
    /// Shared by the clones every client context holds: one chain call serves them all.
    last: Arc<Mutex<Option<FetchedCredentials>>>,
}

impl MskIamSigner {
    pub fn new(region: &str) -> MskIamSigner {
        MskIamSigner {
            region: region.to_string(),
            last: Arc::default(),
        }
    }

    /// A fresh token, valid for 15 minutes (less when the credentials expire sooner), signed
    /// with what the SDK's default credential chain (environment, profile, IRSA web identity,
    /// instance metadata) gave, reused until near its end.
    pub fn token(&self) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        let now = SystemTime::now();
        let credentials = self.credentials(now)?;
        let url = presigned_url(&self.region, &credentials, now)
            .map_err(|err| format!("msk iam: cannot sign the token: {err}"))?;
        let lifetime_ms = token_expiry(now, &credentials)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Ok(OAuthToken {
            token: token_of(&url),
            principal_name: credentials.access_key_id().to_string(),
            lifetime_ms,
        })
    }

    fn credentials(&self, now: SystemTime) -> Result<Credentials, String> {
        let mut last = self.last.lock().expect("credentials lock");
        if let Some(fetched) = last.as_ref().filter(|fetched| fetched.reusable(now)) {
            return Ok(fetched.credentials.clone());
        }
        let credentials = self.ask_the_chain()?;
        *last = Some(FetchedCredentials {
            credentials: credentials.clone(),
            at: now,
        });
        Ok(credentials)
    }

    /// librdkafka asks for tokens from its own threads: the chain runs on a thread of its own,
    /// with a runtime of its own, so that no caller's async executor is ever blocked or
    /// re-entered.
    fn ask_the_chain(&self) -> Result<Credentials, String> {
        let region = self.region.clone();
        std::thread::Builder::new()
            .name("msk-iam-credentials".into())
            .spawn(move || -> Result<Credentials, String> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|err| err.to_string())?;
                runtime.block_on(async {
                    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                        .region(aws_sdk_s3::config::Region::new(region))
                        .load()
                        .await;
                    let chain = sdk
                        .credentials_provider()
                        .ok_or("the aws sdk found no source of credentials")?;
                    chain
                        .provide_credentials()
                        .await
                        .map_err(|err| err.to_string())
                })
            })
            .map_err(|err| format!("msk iam: cannot start the credentials thread: {err}"))?
            .join()
            .map_err(|_| "msk iam: the credentials thread panicked".to_string())?
            .map_err(|err| format!("msk iam: no aws credentials: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_the_presigned_connect_request_in_base64url() {
        let credentials = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600);
        let url = presigned_url("eu-west-1", &credentials, time).unwrap();
        assert!(
            url.starts_with(
                "https://kafka.eu-west-1.amazonaws.com/?Action=kafka-cluster%3AConnect&"
            ),
            "{url}"
        );
        for part in [
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Credential=AKIDEXAMPLE%2F20251202%2Feu-west-1%2Fkafka-cluster%2Faws4_request",
            "X-Amz-Date=20251202T000000Z",
            "X-Amz-Expires=900",
            "X-Amz-SignedHeaders=host",
            "X-Amz-Signature=",
            "User-Agent=kafka-s3-archiver%2F",
        ] {
            assert!(url.contains(part), "{part} missing from {url}");
        }
        // The same inputs sign the same; another second signs otherwise.
        assert_eq!(url, presigned_url("eu-west-1", &credentials, time).unwrap());
        assert_ne!(
            url,
            presigned_url("eu-west-1", &credentials, time + Duration::from_secs(1)).unwrap()
        );
        let token = token_of(&url);
        assert!(!token.contains('=') && !token.contains('+') && !token.contains('/'));
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&token)
            .unwrap();
        assert_eq!(decoded, url.as_bytes());
    }

    /// A token signed with credentials that expire before its 15 minutes must not outlive
    /// them: librdkafka refreshes at 80 % of the lifetime it is told, so it asks again in time.
    #[test]
    fn a_token_expires_no_later_than_its_credentials() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600);
        let lasting = Credentials::new("AKID", "secret", None, None, "test");
        assert_eq!(token_expiry(now, &lasting), now + TOKEN_VALIDITY);
        let short = Credentials::new(
            "AKID",
            "secret",
            Some("session".into()),
            Some(now + Duration::from_secs(300)),
            "test",
        );
        assert_eq!(token_expiry(now, &short), now + Duration::from_secs(300));
    }

    /// The chain (an STS or instance-metadata call) runs when the credentials it gave last are
    /// near their end, not for every token.
    #[test]
    fn credentials_are_reused_until_near_their_end() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600);
        let session = |expiry: SystemTime| {
            Credentials::new("AKID", "secret", Some("s".into()), Some(expiry), "test")
        };
        let fetched = |credentials: Credentials| FetchedCredentials {
            credentials,
            at: now,
        };
        let hours = fetched(session(now + Duration::from_secs(3_600)));
        assert!(hours.reusable(now + Duration::from_secs(600)));
        assert!(!hours.reusable(now + Duration::from_secs(3_600 - 60)));
        let no_expiry = fetched(Credentials::new("AKID", "secret", None, None, "test"));
        assert!(no_expiry.reusable(now + Duration::from_secs(1_800)));
        assert!(!no_expiry.reusable(now + CREDENTIALS_RECHECK + Duration::from_secs(1)));
    }
}
