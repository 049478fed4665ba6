//! Session recordings: one file per connection under `[sessions] dir`
//! (`<id>.json.gz`), written when the connection ends, holding who (identity,
//! subject, duties, cgroup, pid, executable), where to, the decision, the
//! timings, bytes and outcome and, for intercepted HTTP, every exchange:
//! request line, headers with credentials redacted, bodies as the client
//! sent them and as the client got them (after masking), each up to
//! `body_cap` bytes.
//!
//! Memory stays bounded while a connection is open: at most `body_cap`
//! bytes per body, [`MAX_CONN_BODY_BYTES`] of bodies per connection and
//! [`MAX_EXCHANGES`] exchanges (the rest are counted). Files are written by
//! one writer thread from a bounded queue, never on the data path; a full
//! queue, a full disk or any write error skips that recording (audited) and
//! never touches traffic. The same thread is the janitor: retention by age
//! and by total size, oldest first, every batch audited.
//!
//! Redaction ([`redact`]): Authorization, Proxy-Authorization, Cookie,
//! Set-Cookie and any header whose name looks like a credential (X-Api-Key,
//! X-Auth-Token, …) or that an inject rule set are recorded as
//! `[REDACTED]`; injected secret values and every redacted value (6 bytes
//! or longer) are also scrubbed from bodies, URLs and other headers of the
//! whole connection's recording before it is written.

pub mod cli;
mod har;
mod redact;
mod store;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use serde::{Deserialize, Serialize};

use crate::{
    audit::{ConnRecord, HttpRecord, Outcome},
    config,
    policy::Injection,
};

/// Exchanges kept per connection; later ones are only counted.
pub const MAX_EXCHANGES: usize = 1000;
/// Body bytes kept per connection, all exchanges together.
pub const MAX_CONN_BODY_BYTES: usize = 16 << 20;
/// Recordings waiting for the writer; more are skipped (audited).
const QUEUE: usize = 1024;
/// How often the janitor applies retention besides at start and when a
/// write would pass the size cap.
const JANITOR_PERIOD: Duration = Duration::from_secs(300);
/// The `format` of a recording file.
pub const FORMAT: &str = "gateway-session/1";

// === the recording, as stored ===

/// One connection. Fields the pipeline never reached stay empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Recording {
    pub format: String,
    pub id: String,
    /// The daemon's session number (the audit records' `session`).
    pub session: u64,
    pub identity: String,
    pub subject: String,
    pub duties: Vec<String>,
    pub identity_source: String,
    pub cgroup: String,
    pub pid: u32,
    pub uid: u32,
    pub exe: String,
    pub client: String,
    /// The original destination, `ip:port`.
    pub destination: String,
    pub host: String,
    /// allow, block, inspect, approve (or none, when refused earlier).
    pub decision: String,
    pub rule: String,
    pub approval_id: String,
    pub approver: String,
    pub started: String,
    pub started_unix_ms: u64,
    pub ended: String,
    pub ended_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcome: String,
    pub reason: String,
    pub exchanges: Vec<Exchange>,
    /// Exchanges past [`MAX_EXCHANGES`], not kept.
    pub exchanges_dropped: u64,
}

/// One HTTP exchange (or WebSocket upgrade) on an intercepted connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Exchange {
    pub request_id: String,
    pub started: String,
    pub started_unix_ms: u64,
    pub timings: Timings,
    pub method: String,
    /// `scheme://host[:port]/path?query` (secret-looking query values
    /// redacted).
    pub url: String,
    pub scheme: String,
    pub host: String,
    pub path: String,
    pub query: String,
    pub http_version: String,
    pub request: Request,
    /// None when no response was produced (the client went away first).
    pub response: Option<Response>,
    /// Values masked in the response body, in total and by detector.
    pub masked: u64,
    pub masked_by: BTreeMap<String, u64>,
    /// `header<-secret` names of injected credentials (never values).
    pub injected: Vec<String>,
    pub decision: String,
    pub rule: String,
    pub reason: String,
    pub approval_id: String,
    pub approver: String,
    /// complete, blocked, upstream_error, failed, aborted, ...
    pub outcome: String,
    pub websocket: bool,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Milliseconds: until the response head (`wait`), then the body
/// (`receive`), and in all.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Timings {
    pub wait_ms: f64,
    pub receive_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Request {
    pub headers: Vec<Header>,
    pub body: Option<Body>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<Header>,
    /// As sent to the client: after masking.
    pub body: Option<Body>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A body: its full size and the first bytes kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Body {
    /// Bytes that passed, all of them.
    pub size: u64,
    /// Bytes kept (at most the cap).
    pub kept: u64,
    /// `kept < size`: cut at the cap.
    pub truncated: bool,
    /// `text` is base64 (the kept bytes are not UTF-8).
    pub base64: bool,
    pub text: String,
}

impl Body {
    /// The kept bytes (base64 decoded).
    #[cfg(test)]
    pub fn bytes(&self) -> Vec<u8> {
        use base64::Engine;
        if self.base64 {
            base64::engine::general_purpose::STANDARD
                .decode(&self.text)
                .unwrap_or_default()
        } else {
            self.text.as_bytes().to_vec()
        }
    }

    /// `raw`: the kept bytes (scrubbed); `size`: all bytes that passed;
    /// `cut`: fewer were kept than passed.
    fn from_raw(raw: &[u8], size: u64, cut: bool) -> Body {
        use base64::Engine;
        // A cut in the middle of a UTF-8 character does not make text
        // binary.
        let text = match std::str::from_utf8(raw) {
            Ok(t) => Some(t.to_string()),
            Err(e) if e.error_len().is_none() && cut => {
                Some(String::from_utf8_lossy(&raw[..e.valid_up_to()]).into_owned())
            }
            Err(_) => None,
        };
        match text {
            Some(t) if !t.contains('\0') => Body {
                size,
                kept: t.len() as u64,
                truncated: cut,
                base64: false,
                text: t,
            },
            _ => Body {
                size,
                kept: raw.len() as u64,
                truncated: cut,
                base64: true,
                text: base64::engine::general_purpose::STANDARD.encode(raw),
            },
        }
    }
}

// === time ===

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Days since 1970-01-01 → (year, month, day) (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-22T10:00:00.123Z` (ISO 8601 / RFC 3339, UTC).
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

fn ms_f(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

// === capture while the connection is open ===

/// Bytes of one body, kept up to the cap.
#[derive(Debug, Default)]
struct BodyBuf {
    seen: bool,
    bytes: Vec<u8>,
    size: u64,
}

impl BodyBuf {
    fn push(&mut self, data: &[u8], cap: usize, budget: &AtomicUsize) {
        self.seen = true;
        self.size += data.len() as u64;
        let want = cap.saturating_sub(self.bytes.len()).min(data.len());
        if want == 0 {
            return;
        }
        let got = match budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some(b.saturating_sub(want))
        }) {
            Ok(before) | Err(before) => before.min(want),
        };
        self.bytes.extend_from_slice(&data[..got]);
    }

    fn finish(&self, secrets: &[Vec<u8>]) -> Option<Body> {
        if !self.seen {
            return None;
        }
        let cut = (self.bytes.len() as u64) < self.size;
        let raw = redact::scrub_bytes(&self.bytes, secrets);
        Some(Body::from_raw(&raw, self.size, cut))
    }
}

/// An exchange being captured: the recorded parts plus raw bodies (scrubbed
/// when the connection's recording is written).
#[derive(Debug)]
struct ExRaw {
    ex: Exchange,
    started: Instant,
    response_at: Option<Instant>,
    ended: Option<Instant>,
    req: BodyBuf,
    resp: BodyBuf,
    /// Names of headers an inject rule set (lower case).
    injected_names: Vec<String>,
}

/// The exchanges of one open connection.
#[derive(Debug, Default)]
struct ConnDraft {
    budget: AtomicUsize,
    inner: Mutex<ConnInner>,
}

#[derive(Debug, Default)]
struct ConnInner {
    exchanges: Vec<ExRaw>,
    dropped: u64,
    /// Values to scrub from the whole recording.
    secrets: Vec<Vec<u8>>,
}

impl ConnDraft {
    fn new() -> ConnDraft {
        ConnDraft {
            budget: AtomicUsize::new(MAX_CONN_BODY_BYTES),
            inner: Mutex::default(),
        }
    }
}

/// The capture of one HTTP exchange, carried in the request's extensions
/// and by the response body. Cheap to clone; a no-op when recordings are
/// off. The exchange is committed to its connection by [`Capture::finish`],
/// or, if that never comes (a held request whose client went away), when
/// the last clone is dropped.
#[derive(Clone, Default)]
pub struct Capture(Option<Arc<Live>>);

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Capture(on)"
        } else {
            "Capture(off)"
        })
    }
}

struct Live {
    conn: Arc<ConnDraft>,
    cap: usize,
    ex: Mutex<Option<ExRaw>>,
    secrets: Mutex<Vec<Vec<u8>>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.commit(None, "aborted");
    }
}

impl Live {
    fn with<R>(&self, f: impl FnOnce(&mut ExRaw, &mut Vec<Vec<u8>>) -> R) -> Option<R> {
        let mut ex = self.ex.lock().ok()?;
        let ex = ex.as_mut()?;
        let mut secrets = self.secrets.lock().ok()?;
        Some(f(ex, &mut secrets))
    }

    /// Moves the exchange into its connection (once).
    fn commit(&self, rec: Option<&HttpRecord>, outcome: &str) {
        let Some(mut raw) = self.ex.lock().ok().and_then(|mut e| e.take()) else {
            return;
        };
        let secrets = self
            .secrets
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let now = Instant::now();
        raw.ended = Some(now);
        let ex = &mut raw.ex;
        ex.outcome = outcome.to_string();
        if let Some(r) = rec {
            ex.request_id.clone_from(&r.request_id);
            ex.masked = r.masked;
            ex.masked_by.clone_from(&r.masked_by);
            ex.injected.clone_from(&r.injected);
            ex.decision = r.decision.to_string();
            ex.rule.clone_from(&r.rule);
            ex.reason.clone_from(&r.reason);
            ex.approval_id.clone_from(&r.approval_id);
            ex.approver.clone_from(&r.approver);
            ex.websocket = r.websocket;
            ex.bytes_up = r.bytes_up;
            ex.bytes_down = r.bytes_down;
        } else {
            ex.bytes_up = raw.req.size;
            ex.bytes_down = raw.resp.size;
            if ex.response.as_ref().is_some_and(|r| r.status == 101) {
                ex.websocket = true;
                ex.outcome = "upgraded".into();
            }
        }
        let Ok(mut conn) = self.conn.inner.lock() else {
            return;
        };
        for s in secrets {
            if !conn.secrets.contains(&s) {
                conn.secrets.push(s);
            }
        }
        if conn.exchanges.len() >= MAX_EXCHANGES {
            conn.dropped += 1;
            // Its kept bytes go back to the connection's budget.
            self.conn.budget.fetch_add(
                raw.req.bytes.len() + raw.resp.bytes.len(),
                Ordering::Relaxed,
            );
        } else {
            conn.exchanges.push(raw);
        }
    }
}

impl Capture {
    /// The capture a request carries (off when it carries none).
    pub fn of(ext: &http::Extensions) -> Capture {
        ext.get::<Capture>().cloned().unwrap_or_default()
    }

    /// A request body passing through is kept up to the cap.
    pub fn tee<B>(&self, body: B) -> Tee<B> {
        Tee {
            inner: body,
            capture: self.clone(),
        }
    }

    /// A request body read whole (held for approval).
    pub fn request_body(&self, data: &[u8]) {
        if let Some(l) = &self.0 {
            l.with(|ex, _| ex.req.push(data, l.cap, &l.conn.budget));
        }
    }

    /// Credentials the gateway injected into the upstream request: their
    /// header names are redacted in the recording, their values scrubbed
    /// from all of it.
    pub fn injected(&self, inject: &[Injection]) {
        let Some(l) = &self.0 else { return };
        l.with(|ex, secrets| {
            for inj in inject {
                let name = inj.header.as_str().to_ascii_lowercase();
                for h in &mut ex.ex.request.headers {
                    if h.name == name && h.value != redact::REDACTED {
                        redact::remember(secrets, h.value.as_bytes());
                        h.value = redact::REDACTED.into();
                    }
                }
                ex.injected_names.push(name);
                redact::remember(secrets, inj.value.header_value().as_bytes());
                // The credential after its scheme, too (`Bearer <token>`).
                let v = inj.value.header_value().as_bytes();
                if let Some(pos) = v.iter().position(|b| *b == b' ') {
                    redact::remember(secrets, v[pos + 1..].trim_ascii());
                }
            }
        });
    }

    /// The response head as sent to the client.
    pub fn response(&self, status: StatusCode, headers: &HeaderMap) {
        let Some(l) = &self.0 else { return };
        l.with(|ex, secrets| {
            ex.response_at = Some(Instant::now());
            let headers = record_headers(headers, &ex.injected_names, secrets);
            ex.ex.response = Some(Response {
                status: status.as_u16(),
                headers,
                body: None,
            });
        });
    }

    /// Response body bytes as sent to the client (after masking).
    pub fn response_data(&self, data: &[u8]) {
        if let Some(l) = &self.0 {
            l.with(|ex, _| ex.resp.push(data, l.cap, &l.conn.budget));
        }
    }

    fn request_data(&self, data: &[u8]) {
        if let Some(l) = &self.0 {
            l.with(|ex, _| ex.req.push(data, l.cap, &l.conn.budget));
        }
    }

    /// The exchange is over; `rec` is its audit record.
    pub fn finish(&self, rec: &HttpRecord, outcome: &str) {
        if let Some(l) = &self.0 {
            l.commit(Some(rec), outcome);
        }
    }
}

/// A request body passing through, copied into the capture up to the cap.
pub struct Tee<B> {
    inner: B,
    capture: Capture,
}

impl<B> HttpBody for Tee<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
        {
            self.capture.request_data(d);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn record_headers(h: &HeaderMap, injected: &[String], secrets: &mut Vec<Vec<u8>>) -> Vec<Header> {
    h.iter()
        .map(|(name, value)| {
            let (name, mut value) = redact::header(name.as_str(), value.as_bytes(), secrets);
            if injected.contains(&name) && value != redact::REDACTED {
                value = redact::REDACTED.into();
            }
            Header { name, value }
        })
        .collect()
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

// === the recorder ===

/// A connection's recording, waiting for the writer.
struct Pending {
    rec: Recording,
    raw: Vec<ExRaw>,
    secrets: Vec<Vec<u8>>,
}

/// Records sessions: captures exchanges while connections are open, hands
/// finished connections to the writer thread.
pub struct Recorder {
    enabled: bool,
    dir: PathBuf,
    body_cap: usize,
    /// The daemon's start (unix ms): ids stay unique across restarts.
    prefix: u64,
    open: Mutex<HashMap<u64, Arc<ConnDraft>>>,
    tx: Option<SyncSender<Pending>>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("enabled", &self.enabled)
            .field("dir", &self.dir)
            .field("body_cap", &self.body_cap)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Starts the writer/janitor thread (when recordings are on), which
    /// applies retention right away.
    pub fn start(cfg: &config::Sessions) -> Recorder {
        let prefix = unix_ms(SystemTime::now());
        let tx = if cfg.enabled {
            if let Err(e) = store::ensure_dir(&cfg.dir) {
                tracing::error!(event = "sessions_dir", dir = %cfg.dir.display(), error = %e, "cannot create the session recordings directory; recordings are skipped until it can be written");
            }
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            let writer = Writer {
                dir: cfg.dir.clone(),
                max_age: cfg.max_age,
                max_total: cfg.max_total_bytes,
                total: 0,
            };
            match std::thread::Builder::new()
                .name("gateway-sessions".into())
                .spawn(move || writer.run(rx))
            {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the session recordings writer; recordings are off");
                    None
                }
            }
        } else {
            None
        };
        Recorder {
            enabled: tx.is_some(),
            dir: cfg.dir.clone(),
            body_cap: cfg.body_cap,
            prefix,
            open: Mutex::default(),
            tx,
        }
    }

    pub fn id_of(&self, session: u64) -> String {
        format!("{}-{session}", self.prefix)
    }

    /// An intercepted connection begins: its exchanges are captured.
    pub fn open(&self, session: u64) {
        if !self.enabled {
            return;
        }
        if let Ok(mut m) = self.open.lock() {
            m.insert(session, Arc::new(ConnDraft::new()));
        }
    }

    /// Starts capturing one request of an open connection.
    pub fn capture<B>(
        &self,
        session: u64,
        req: &http::Request<B>,
        tls: bool,
        fallback_host: &str,
    ) -> Capture {
        if !self.enabled {
            return Capture::default();
        }
        let Some(conn) = self.open.lock().ok().and_then(|m| m.get(&session).cloned()) else {
            return Capture::default();
        };
        let now = SystemTime::now();
        let mut secrets = Vec::new();
        let uri = req.uri();
        let scheme = uri
            .scheme_str()
            .unwrap_or(if tls { "https" } else { "http" })
            .to_string();
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| fallback_host.to_string());
        // userinfo never goes into a recording
        let authority = authority
            .rsplit_once('@')
            .map_or(authority.clone(), |(_, h)| h.to_string());
        let host = authority
            .strip_prefix('[')
            .and_then(|r| r.split_once(']').map(|(h, _)| h.to_string()))
            .unwrap_or_else(|| {
                authority
                    .rsplit_once(':')
                    .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
                    .map_or(authority.clone(), |(h, _)| h.to_string())
            });
        let query = redact::query(uri.query().unwrap_or(""), &mut secrets);
        let path = uri.path().to_string();
        let url = format!(
            "{scheme}://{authority}{path}{}{query}",
            if query.is_empty() { "" } else { "?" }
        );
        let headers = record_headers(req.headers(), &[], &mut secrets);
        let ex = Exchange {
            started: rfc3339(unix_ms(now)),
            started_unix_ms: unix_ms(now),
            method: req.method().to_string(),
            url,
            scheme,
            host: host.to_ascii_lowercase(),
            path,
            query,
            http_version: version_str(req.version()).into(),
            request: Request {
                headers,
                body: None,
            },
            ..Exchange::default()
        };
        Capture(Some(Arc::new(Live {
            conn,
            cap: self.body_cap,
            ex: Mutex::new(Some(ExRaw {
                ex,
                started: Instant::now(),
                response_at: None,
                ended: None,
                req: BodyBuf::default(),
                resp: BodyBuf::default(),
                injected_names: Vec::new(),
            })),
            secrets: Mutex::new(secrets),
        })))
    }

    /// The connection ended: its recording goes to the writer. Returns the
    /// recording id for the audit record, or "" when nothing is recorded
    /// (recordings off, not a redirected connection, or the writer's queue
    /// full — which is audited).
    pub fn record(&self, c: &ConnRecord, outcome: Outcome, reason: &str) -> String {
        let draft = self.open.lock().ok().and_then(|mut m| m.remove(&c.session));
        let Some(tx) = &self.tx else {
            return String::new();
        };
        let Some(dst) = c.orig_dst else {
            return String::new();
        };
        let (raw, dropped, secrets) = match draft {
            Some(d) => match d.inner.lock() {
                Ok(mut i) => (
                    std::mem::take(&mut i.exchanges),
                    i.dropped,
                    std::mem::take(&mut i.secrets),
                ),
                Err(_) => Default::default(),
            },
            None => Default::default(),
        };
        let ended = unix_ms(SystemTime::now());
        let started = ended.saturating_sub(c.duration.as_millis() as u64);
        let id = self.id_of(c.session);
        let rec = Recording {
            format: FORMAT.into(),
            id: id.clone(),
            session: c.session,
            identity: c.identity.clone(),
            subject: c.subject.clone(),
            duties: c.duties.clone(),
            identity_source: c.identity_source.to_string(),
            cgroup: c.cgroup.clone(),
            pid: c.pid,
            uid: c.uid,
            exe: c.exe.clone(),
            client: c.client.map(|a| a.to_string()).unwrap_or_default(),
            destination: dst.to_string(),
            host: c.host.clone(),
            decision: c.decision.to_string(),
            rule: c.rule.clone(),
            approval_id: c.approval_id.clone(),
            approver: c.approver.clone(),
            started: rfc3339(started),
            started_unix_ms: started,
            ended: rfc3339(ended),
            ended_unix_ms: ended,
            duration_ms: c.duration.as_millis() as u64,
            bytes_up: c.bytes_up,
            bytes_down: c.bytes_down,
            outcome: outcome.as_str().into(),
            reason: reason.to_string(),
            exchanges: Vec::new(),
            exchanges_dropped: dropped,
        };
        match tx.try_send(Pending { rec, raw, secrets }) {
            Ok(()) => id,
            Err(e) => {
                let why = match e {
                    TrySendError::Full(_) => "the recordings writer is behind (queue full)",
                    TrySendError::Disconnected(_) => "the recordings writer stopped",
                };
                tracing::warn!(target: "gateway::audit", event = "session_recording_skipped", session = c.session, recording = %id, reason = why);
                String::new()
            }
        }
    }
}

/// Builds the stored form: exchanges in the order they started, every
/// remembered secret scrubbed from everything recorded.
fn assemble(p: Pending) -> Recording {
    let Pending {
        mut rec,
        mut raw,
        secrets,
    } = p;
    raw.sort_by_key(|r| r.started);
    rec.exchanges = raw
        .into_iter()
        .map(|r| {
            let mut ex = r.ex;
            let end = r.ended.unwrap_or(r.started);
            let head = r.response_at.unwrap_or(end);
            ex.timings = Timings {
                wait_ms: ms_f(head.saturating_duration_since(r.started)),
                receive_ms: ms_f(end.saturating_duration_since(head)),
                total_ms: ms_f(end.saturating_duration_since(r.started)),
            };
            if !secrets.is_empty() {
                ex.url = redact::scrub(&ex.url, &secrets);
                ex.query = redact::scrub(&ex.query, &secrets);
                ex.path = redact::scrub(&ex.path, &secrets);
                ex.reason = redact::scrub(&ex.reason, &secrets);
                for h in &mut ex.request.headers {
                    h.value = redact::scrub(&h.value, &secrets);
                }
                if let Some(resp) = &mut ex.response {
                    for h in &mut resp.headers {
                        h.value = redact::scrub(&h.value, &secrets);
                    }
                }
            }
            ex.request.body = r.req.finish(&secrets);
            if let Some(resp) = &mut ex.response {
                resp.body = r.resp.finish(&secrets);
            }
            ex
        })
        .collect();
    rec
}

/// The writer thread: writes recordings as connections end and keeps the
/// store within its limits.
struct Writer {
    dir: PathBuf,
    max_age: Duration,
    max_total: u64,
    /// Bytes in the store, as of the last scan plus what was written since.
    total: u64,
}

impl Writer {
    fn run(mut self, rx: Receiver<Pending>) {
        self.retention();
        loop {
            match rx.recv_timeout(JANITOR_PERIOD) {
                Ok(p) => self.write(p),
                Err(RecvTimeoutError::Timeout) => self.retention(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Age and size, now.
    fn retention(&mut self) {
        self.prune_to(self.max_total);
    }

    fn prune_to(&mut self, keep_under: u64) {
        match store::prune(&self.dir, self.max_age, keep_under, SystemTime::now()) {
            Ok((batches, total)) => {
                for b in &batches {
                    b.audit(&self.dir);
                }
                self.total = total;
            }
            Err(e) => {
                tracing::warn!(event = "sessions_prune_failed", dir = %self.dir.display(), error = %e);
            }
        }
    }

    fn write(&mut self, p: Pending) {
        let rec = assemble(p);
        let (id, session) = (rec.id.clone(), rec.session);
        let fail = |why: String| {
            tracing::warn!(target: "gateway::audit", event = "session_recording_skipped", session, recording = %id, reason = %why);
        };
        let data = match store::encode(&rec) {
            Ok(d) => d,
            Err(e) => return fail(format!("encoding failed: {e}")),
        };
        let size = data.len() as u64;
        if size > self.max_total {
            return fail(format!(
                "the recording ({size} bytes) is larger than the whole store may be ({} bytes)",
                self.max_total
            ));
        }
        if self.total + size > self.max_total {
            // Room for this one and some after it, so the directory is not
            // rescanned at every write once the store is full.
            self.prune_to((self.max_total / 10 * 9).saturating_sub(size));
            if self.total + size > self.max_total {
                return fail(format!(
                    "no room in the store ({} of {} bytes used)",
                    self.total, self.max_total
                ));
            }
        }
        match store::write(&self.dir, &id, &data) {
            Ok(()) => self.total += size,
            Err(e) => fail(format!("writing to {} failed: {e}", self.dir.display())),
        }
    }
}
