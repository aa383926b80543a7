//! An HTTP fault proxy between the archiver and the S3 server: a seeded share of requests is
//! answered `500 InternalError` or `503 SlowDown`, has its connection reset mid-body (the
//! request's, or the answer's), or is delayed; the rest is forwarded unchanged. Requests are
//! parsed (HTTP/1.1 with Content-Length or chunked bodies), so faults hit individual requests on
//! kept-alive connections.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shares of requests to fault, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultRates {
    pub internal_error: f64,
    pub slow_down: f64,
    pub reset: f64,
    pub delay: f64,
    pub delay_ms: u64,
    /// Refuse requests as S3 does for a denied action or an unknown key: `403` with this code
    /// (`AccessDenied`, `InvalidAccessKeyId`), for every request while set.
    pub refuse_with: Option<&'static str>,
    /// Limits `refuse_with` to requests whose start line (method and path) contains this.
    pub refuse_only: Option<&'static str>,
    /// Limits `refuse_with` further to requests of this method (`PUT`: the member may still
    /// look the keys up).
    pub refuse_method: Option<&'static str>,
    /// The first `GET` of each path containing this has its answer cut: the head and half the
    /// body go through, then the connection drops (a download that breaks mid-body).
    pub cut_first_get: Option<&'static str>,
}

#[derive(Debug, Default)]
pub struct FaultCounts {
    pub requests: AtomicU64,
    pub internal_error: AtomicU64,
    pub slow_down: AtomicU64,
    pub reset: AtomicU64,
    pub delayed: AtomicU64,
    /// The requests (start lines) whose answer was cut (`cut_first_get`).
    pub cut: Mutex<HashSet<String>>,
}

impl FaultCounts {
    pub fn faults(&self) -> u64 {
        self.internal_error.load(Ordering::Relaxed)
            + self.slow_down.load(Ordering::Relaxed)
            + self.reset.load(Ordering::Relaxed)
    }
}

pub struct FaultProxy {
    pub port: u16,
    pub counts: Arc<FaultCounts>,
    rates: Arc<Mutex<FaultRates>>,
    stop: Arc<AtomicBool>,
}

enum Fault {
    None,
    InternalError,
    SlowDown,
    Reset,
    Refuse(&'static str),
}

impl FaultProxy {
    pub fn start(upstream_port: u16, rates: FaultRates, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(FaultCounts::default());
        let rates = Arc::new(Mutex::new(rates));
        let stop = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
        {
            let (counts, rates, stop) = (counts.clone(), rates.clone(), stop.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let (counts, rates, rng) = (counts.clone(), rates.clone(), rng.clone());
                    std::thread::spawn(move || {
                        let _ = serve(client, upstream_port, &counts, &rates, &rng);
                    });
                }
            });
        }
        FaultProxy {
            port,
            counts,
            rates,
            stop,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_rates(&self, rates: FaultRates) {
        *self.rates.lock().unwrap() = rates;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One HTTP message head: the start line and headers, raw, plus what the body looks like.
struct Head {
    raw: Vec<u8>,
    start_line: String,
    content_length: Option<usize>,
    chunked: bool,
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut start_line = String::new();
    let (mut content_length, mut chunked) = (None, false);
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if start_line.is_empty() {
            start_line = text;
            continue;
        }
        if text.is_empty() {
            break;
        }
        if let Some((name, value)) = text.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                content_length = value.parse().ok();
            } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    Ok(Some(Head {
        raw,
        start_line,
        content_length,
        chunked,
    }))
}

/// Reads a message body as it is on the wire (chunk framing kept), so it can be relayed.
fn read_body(reader: &mut impl BufRead, head: &Head) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.chunked {
        loop {
            let mut size_line = Vec::new();
            reader.read_until(b'\n', &mut size_line)?;
            body.extend_from_slice(&size_line);
            let size_text = String::from_utf8_lossy(&size_line);
            let size = usize::from_str_radix(size_text.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut line = Vec::new();
                    reader.read_until(b'\n', &mut line)?;
                    body.extend_from_slice(&line);
                    if line == b"\r\n" || line.is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
        }
    } else if let Some(length) = head.content_length {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    }
    Ok(body)
}

fn serve(
    client: TcpStream,
    upstream_port: u16,
    counts: &FaultCounts,
    rates: &Mutex<FaultRates>,
    rng: &Mutex<fastrand::Rng>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client_out = client;
    let upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    let mut upstream_reader = BufReader::new(upstream.try_clone()?);
    let mut upstream_out = upstream;
    while let Some(request) = read_head(&mut reader)? {
        counts.requests.fetch_add(1, Ordering::Relaxed);
        let is_head = request.start_line.starts_with("HEAD ");
        let rates = *rates.lock().unwrap();
        let (fault, delay, cut) = {
            let mut rng = rng.lock().unwrap();
            let roll = rng.f64();
            let refused = rates.refuse_with.filter(|_| {
                rates
                    .refuse_only
                    .is_none_or(|p| request.start_line.contains(p))
                    && rates
                        .refuse_method
                        .is_none_or(|m| request.start_line.starts_with(&format!("{m} ")))
            });
            let fault = if let Some(code) = refused {
                Fault::Refuse(code)
            } else if roll < rates.internal_error {
                Fault::InternalError
            } else if roll < rates.internal_error + rates.slow_down {
                Fault::SlowDown
            } else if roll < rates.internal_error + rates.slow_down + rates.reset {
                Fault::Reset
            } else {
                Fault::None
            };
            let cut = request.start_line.starts_with("GET ")
                && rates
                    .cut_first_get
                    .is_some_and(|p| request.start_line.contains(p))
                && counts
                    .cut
                    .lock()
                    .unwrap()
                    .insert(request.start_line.clone());
            (fault, rng.f64() < rates.delay, cut)
        };
        if delay {
            counts.delayed.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(rates.delay_ms));
        }
        match fault {
            Fault::Reset => {
                counts.reset.fetch_add(1, Ordering::Relaxed);
                // Take part of the body, then drop the connection without an answer.
                let mut half = vec![0; request.content_length.unwrap_or(0) / 2];
                let _ = reader.read_exact(&mut half);
                let _ = client_out.shutdown(Shutdown::Both);
                return Ok(());
            }
            Fault::InternalError | Fault::SlowDown | Fault::Refuse(_) => {
                read_body(&mut reader, &request)?;
                let (status, code) = match fault {
                    Fault::InternalError => {
                        counts.internal_error.fetch_add(1, Ordering::Relaxed);
                        ("500 Internal Server Error", "InternalError")
                    }
                    Fault::Refuse(code) => ("403 Forbidden", code),
                    _ => {
                        counts.slow_down.fetch_add(1, Ordering::Relaxed);
                        ("503 Slow Down", "SlowDown")
                    }
                };
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message><RequestId>proxy</RequestId></Error>"
                );
                write!(
                    client_out,
                    "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                continue;
            }
            Fault::None => {}
        }
        let body = read_body(&mut reader, &request)?;
        upstream_out.write_all(&request.raw)?;
        upstream_out.write_all(&body)?;
        let Some(response) = read_head(&mut upstream_reader)? else {
            return Ok(());
        };
        let no_body = is_head
            || response.start_line.contains(" 204 ")
            || response.start_line.contains(" 304 ");
        if !no_body && response.content_length.is_none() && !response.chunked {
            // A body delimited by the end of the connection: relay it and end this one too.
            let mut rest = Vec::new();
            upstream_reader.read_to_end(&mut rest)?;
            client_out.write_all(&response.raw)?;
            client_out.write_all(&rest)?;
            return Ok(());
        }
        let response_body = if no_body {
            Vec::new()
        } else {
            read_body(&mut upstream_reader, &response)?
        };
        if cut && response.start_line.contains(" 200 ") && response_body.len() > 1 {
            client_out.write_all(&response.raw)?;
            client_out.write_all(&response_body[..response_body.len() / 2])?;
            client_out.flush()?;
            let _ = client_out.shutdown(Shutdown::Both);
            return Ok(());
        }
        client_out.write_all(&response.raw)?;
        client_out.write_all(&response_body)?;
    }
    Ok(())
}
