//! The one retry policy of the archiver — S3 requests, offset commits, reads of the committed
//! offsets: exponential backoff, with full jitter where many clients fail together, and the split
//! between transient errors (throttling, 5xx, timeouts, resets: retry soon) and permanent ones
//! (denied, missing bucket, bad credentials: an operator must act, so retry slowly and say why).
//! Uploads never give up: a batch that cannot be uploaded stays on disk with its offsets
//! uncommitted.
//!
//! The random source is injected, so delays are tested without sleeping.

use std::time::Duration;

/// Whether retrying soon can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// Source of randomness for jitter: a value in `[0, 1)`.
pub trait Jitter: Send {
    fn unit(&mut self) -> f64;
}

impl Jitter for fastrand::Rng {
    fn unit(&mut self) -> f64 {
        self.f64()
    }
}

/// Always the top of the range: for retries of one client on one thread (offset commits, reads
/// of the committed offsets), which no other client's retries line up with.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoJitter;

impl Jitter for NoJitter {
    fn unit(&mut self) -> f64 {
        1.0
    }
}

/// Delays between attempts: attempt `n` waits a uniform random time in
/// `[0, min(max, initial * 2^n)]` ("full jitter"), so clients that failed together do not retry
/// together. Permanent errors wait the maximum: there is no point hammering a denied bucket.
#[derive(Debug)]
pub struct Backoff<J: Jitter> {
    initial: Duration,
    max: Duration,
    attempt: u32,
    jitter: J,
}

impl<J: Jitter> Backoff<J> {
    pub fn new(initial: Duration, max: Duration, jitter: J) -> Backoff<J> {
        Backoff {
            initial,
            max,
            attempt: 0,
            jitter,
        }
    }

    /// Attempts failed so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt after an error of `class`.
    pub fn next_delay(&mut self, class: ErrorClass) -> Duration {
        let ceiling = match class {
            ErrorClass::Permanent => self.max,
            ErrorClass::Transient => {
                let factor = 2u32.saturating_pow(self.attempt.min(30));
                self.initial.saturating_mul(factor).min(self.max)
            }
        };
        self.attempt += 1;
        ceiling.mul_f64(self.jitter.unit())
    }
}

/// Runs `attempt` until it succeeds, fails with a permanent error (`class` says which: an
/// operator must act, and says so at once), or failed `attempts` times in a row; between
/// attempts it waits as `backoff` says, on tokio's clock (a test pauses it). For the one-shot
/// commands (`restore`), which stop with an error a rerun gets past, where an upload never
/// gives up.
pub async fn bounded<T, E, J, F, Fut>(
    attempts: u32,
    mut backoff: Backoff<J>,
    class: impl Fn(&E) -> ErrorClass,
    mut attempt: F,
) -> Result<T, E>
where
    J: Jitter,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) if class(&err) == ErrorClass::Permanent => return Err(err),
            Err(err) => {
                let delay = backoff.next_delay(ErrorClass::Transient);
                if backoff.attempts() >= attempts {
                    return Err(err);
                }
                tracing::warn!(error = %err, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounded_retries_transient_errors_up_to_its_attempts_and_permanent_ones_never() {
        let backoff = || Backoff::new(Duration::from_millis(100), Duration::from_secs(1), Top);
        let class = |err: &&str| {
            if err.starts_with("denied") {
                ErrorClass::Permanent
            } else {
                ErrorClass::Transient
            }
        };
        // Two resets, then an answer: it waited 0.1 s and 0.2 s in between.
        let started = tokio::time::Instant::now();
        let mut calls = 0;
        let answer = bounded(5, backoff(), class, || {
            calls += 1;
            let result = if calls <= 2 { Err("reset") } else { Ok(calls) };
            async move { result }
        })
        .await;
        assert_eq!(answer, Ok(3));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(298) && waited < Duration::from_millis(310),
            "{waited:?}"
        );

        // Resets for ever: the fifth attempt's error is the answer.
        let mut calls = 0;
        let answer: Result<(), _> = bounded(5, backoff(), class, || {
            calls += 1;
            async { Err("reset") }
        })
        .await;
        assert_eq!((answer, calls), (Err("reset"), 5));

        // Denied: no second attempt.
        let mut calls = 0;
        let answer: Result<(), _> = bounded(5, backoff(), class, || {
            calls += 1;
            async { Err("denied") }
        })
        .await;
        assert_eq!((answer, calls), (Err("denied"), 1));
    }

    /// Always the top of the range, to check the ceilings.
    struct Top;
    impl Jitter for Top {
        fn unit(&mut self) -> f64 {
            0.999_999
        }
    }

    #[test]
    fn transient_delays_double_up_to_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), Top);
        let delays: Vec<u64> = (0..6)
            .map(|_| backoff.next_delay(ErrorClass::Transient).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![99, 199, 399, 799, 999, 999]);
        assert_eq!(backoff.attempts(), 6);
    }

    #[test]
    fn permanent_errors_wait_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30), Top);
        assert!(backoff.next_delay(ErrorClass::Permanent) > Duration::from_secs(29));
    }

    #[test]
    fn jitter_spreads_delays_and_is_reproducible_with_a_seed() {
        let delays = |seed| {
            let mut backoff = Backoff::new(
                Duration::from_millis(1000),
                Duration::from_secs(60),
                fastrand::Rng::with_seed(seed),
            );
            (0..20)
                .map(|_| backoff.next_delay(ErrorClass::Transient))
                .collect::<Vec<_>>()
        };
        assert_eq!(delays(7), delays(7));
        assert_ne!(delays(7), delays(8));
        let first: Vec<Duration> = (0..200).map(|s| delays(s)[0]).collect();
        assert!(first.iter().all(|d| *d <= Duration::from_millis(1000)));
        assert!(first.iter().any(|d| *d < Duration::from_millis(300)));
        assert!(first.iter().any(|d| *d > Duration::from_millis(700)));
    }
}
