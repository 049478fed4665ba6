//! Webhook notifications of new pending approvals.
//!
//! [`Webhook::notify`] only puts the notification on a bounded queue and
//! returns; a dispatcher task takes it from there and spawns one delivery
//! task per notification, at most [`CONCURRENCY`] at a time. A delivery POSTs
//! the payload as JSON, each attempt bounded by the configured timeout, and
//! retries failures with a capped exponential backoff. A webhook that never
//! answers therefore costs only its own task, for at most timeout × attempts
//! plus the backoffs in between.
//!
//! Every notification ends in exactly one audit event (`event = "webhook"`):
//! `delivered`, `failed` (after the last attempt) or `dropped` (the queue
//! was full).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use reqwest::{
    Client, Url,
    header::{CONTENT_TYPE, HeaderValue},
};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};

use crate::config;

/// Notifications waiting for a delivery slot; more are dropped.
const QUEUE: usize = 256;
/// Deliveries in flight at once.
const CONCURRENCY: usize = 16;
/// The wait before the first retry; doubled for each further retry.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Carries the approval's id, so a receiver can deduplicate retries.
const APPROVAL_ID_HEADER: &str = "x-gateway-approval-id";

/// Sends notifications of new pending approvals to the configured URL in the
/// background; never blocks its caller.
#[derive(Debug, Clone)]
pub struct Webhook {
    queue: mpsc::Sender<Job>,
    capacity: usize,
    reporter: Reporter,
}

impl Webhook {
    /// Starts the dispatcher task (call inside a tokio runtime).
    pub fn spawn(cfg: config::Webhook) -> Webhook {
        Self::with_limits(
            cfg,
            Limits {
                queue: QUEUE,
                concurrency: CONCURRENCY,
                backoff_first: BACKOFF_FIRST,
            },
            None,
        )
    }

    /// `spawn` with explicit limits, and a tap that also receives every
    /// report (for tests).
    fn with_limits(
        cfg: config::Webhook,
        limits: Limits,
        tap: Option<mpsc::UnboundedSender<Report>>,
    ) -> Webhook {
        let capacity = limits.queue.max(1);
        let (queue, rx) = mpsc::channel(capacity);
        let reporter = Reporter {
            url: shown_url(&cfg.url).into(),
            tap,
        };
        let target = Arc::new(Target {
            endpoint: endpoint(&cfg),
            timeout: cfg.timeout,
            retries: cfg.retries,
            backoff_first: limits.backoff_first,
            reporter: reporter.clone(),
        });
        tokio::spawn(dispatch(rx, target, limits.concurrency.max(1)));
        Webhook {
            queue,
            capacity,
            reporter,
        }
    }

    /// Queues `payload` for delivery and returns at once. When the queue is
    /// full the notification is dropped (and audited as such).
    pub fn notify(&self, approval_id: &str, payload: Value) {
        let job = Job {
            approval_id: approval_id.to_owned(),
            payload,
        };
        let reason = match self.queue.try_send(job) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                format!("queue full ({} pending)", self.capacity)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => "the dispatcher has stopped".to_owned(),
        };
        self.reporter
            .report(Report::new(approval_id, Outcome::Dropped, 0, 0, reason));
    }
}

/// Sizes of the delivery machinery.
#[derive(Debug, Clone, Copy)]
struct Limits {
    queue: usize,
    concurrency: usize,
    backoff_first: Duration,
}

/// One notification on its way.
#[derive(Debug)]
struct Job {
    approval_id: String,
    payload: Value,
}

/// How a notification ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A 2xx answer.
    Delivered,
    /// Every attempt failed, or the notification could not be sent at all.
    Failed,
    /// The queue was full.
    Dropped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
        }
    }
}

/// The final word on one notification.
#[derive(Debug, Clone)]
struct Report {
    approval_id: String,
    outcome: Outcome,
    attempts: u32,
    /// The last attempt's HTTP status, 0 if it got none.
    status: u16,
    /// Why it was not delivered (the last attempt's error); empty if it was.
    reason: String,
}

impl Report {
    fn new(
        approval_id: &str,
        outcome: Outcome,
        attempts: u32,
        status: u16,
        reason: String,
    ) -> Report {
        Report {
            approval_id: approval_id.to_owned(),
            outcome,
            attempts,
            status,
            reason,
        }
    }
}

/// Turns reports into audit events.
#[derive(Debug, Clone)]
struct Reporter {
    /// The URL without userinfo, query or fragment.
    url: Arc<str>,
    tap: Option<mpsc::UnboundedSender<Report>>,
}

impl Reporter {
    fn report(&self, r: Report) {
        tracing::info!(
            target: "gateway::audit",
            event = "webhook",
            approval_id = %r.approval_id,
            url = %self.url,
            attempts = r.attempts,
            status = r.status,
            outcome = r.outcome.as_str(),
            reason = %r.reason,
        );
        if let Some(tap) = &self.tap {
            let _ = tap.send(r);
        }
    }
}

/// `url` as safe to log.
fn shown_url(url: &str) -> String {
    let Ok(u) = Url::parse(url) else {
        return "(unparsable URL)".to_owned();
    };
    // Only scheme, host and port: userinfo, query and even the path can
    // carry the webhook's secret (Slack puts its token in the path).
    let host = u.host_str().unwrap_or("");
    match u.port() {
        Some(p) => format!("{}://{host}:{p}/…", u.scheme()),
        None => format!("{}://{host}/…", u.scheme()),
    }
}

/// The client and URL to deliver with, or why there are none.
fn endpoint(cfg: &config::Webhook) -> Result<(Client, Url), String> {
    let url = Url::parse(&cfg.url).map_err(|e| format!("invalid webhook URL: {e}"))?;
    let client = Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(cfg.timeout)
        .user_agent(concat!("gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))?;
    Ok((client, url))
}

/// Takes notifications off the queue and starts a delivery task for each,
/// waiting for a free slot first so that at most `concurrency` run at once
/// (and the queue, not the task count, absorbs a burst).
async fn dispatch(mut rx: mpsc::Receiver<Job>, target: Arc<Target>, concurrency: usize) {
    let slots = Arc::new(Semaphore::new(concurrency));
    while let Some(job) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break; // never closed
        };
        let target = target.clone();
        tokio::spawn(async move {
            let report = target.deliver(&job).await;
            drop(slot);
            target.reporter.report(report);
        });
    }
}

/// Where and how notifications are delivered.
#[derive(Debug)]
struct Target {
    endpoint: Result<(Client, Url), String>,
    /// Per attempt: connect plus response headers.
    timeout: Duration,
    /// Attempts after the first.
    retries: u32,
    backoff_first: Duration,
    reporter: Reporter,
}

/// Why one attempt failed.
#[derive(Debug)]
struct Failure {
    status: u16,
    reason: String,
}

impl Target {
    /// Delivers one notification, retrying as configured.
    async fn deliver(&self, job: &Job) -> Report {
        let fail = |attempts, status, reason| {
            Report::new(&job.approval_id, Outcome::Failed, attempts, status, reason)
        };
        let (client, url) = match &self.endpoint {
            Ok(e) => e,
            Err(reason) => return fail(0, 0, reason.clone()),
        };
        let Ok(id) = HeaderValue::from_str(&job.approval_id) else {
            return fail(
                0,
                0,
                "the approval id is not a valid HTTP header value".into(),
            );
        };
        let body = match serde_json::to_vec(&job.payload) {
            Ok(b) => Bytes::from(b),
            Err(e) => return fail(0, 0, format!("cannot serialize the payload: {e}")),
        };
        let attempts = self.retries.saturating_add(1);
        let mut last = Failure {
            status: 0,
            reason: String::new(),
        };
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(backoff(self.backoff_first, attempt - 2)).await;
            }
            match self.attempt(client, url, &id, &body).await {
                Ok(status) => {
                    let id = &job.approval_id;
                    return Report::new(id, Outcome::Delivered, attempt, status, String::new());
                }
                Err(f) => last = f,
            }
        }
        fail(attempts, last.status, last.reason)
    }

    /// One POST; `Ok` with the status if it was 2xx.
    async fn attempt(
        &self,
        client: &Client,
        url: &Url,
        id: &HeaderValue,
        body: &Bytes,
    ) -> Result<u16, Failure> {
        let request = client
            .post(url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(APPROVAL_ID_HEADER, id.clone())
            .body(body.clone())
            .send();
        let response = match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Err(Failure {
                    status: 0,
                    reason: error_chain(&e.without_url()),
                });
            }
            Err(_) => {
                return Err(Failure {
                    status: 0,
                    reason: format!("timed out after {} ms", self.timeout.as_millis()),
                });
            }
        };
        let status = response.status();
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err(Failure {
                status: status.as_u16(),
                reason: format!("HTTP {}", status.as_u16()),
            })
        }
    }
}

/// The wait before retry number `retry` (0 for the first): `first` doubled
/// `retry` times, at most [`BACKOFF_MAX`].
fn backoff(first: Duration, retry: u32) -> Duration {
    let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(BACKOFF_MAX)
}

/// An error and its sources, `: `-separated, skipping a source whose text
/// its parent already shows.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::SocketAddr,
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Instant,
    };

    use serde_json::json;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// Long enough for anything local; reached only when a test fails.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// One request as a test receiver saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        /// Lowercased names.
        headers: BTreeMap<String, String>,
        body: Vec<u8>,
    }

    /// What a receiver does with a request: answer with a status, or hold
    /// the connection open without answering (`None`).
    type Script = Arc<dyn Fn(usize, &Seen) -> Option<u16> + Send + Sync>;

    /// A local HTTP/1.1 receiver on 127.0.0.1.
    struct Receiver {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        /// Unanswered connections the client has since closed.
        abandoned: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Receiver {
        async fn start(
            script: impl Fn(usize, &Seen) -> Option<u16> + Send + Sync + 'static,
        ) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let connections = Arc::new(AtomicUsize::new(0));
            let abandoned = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let script: Script = Arc::new(script);
            let (c, a, s) = (connections.clone(), abandoned.clone(), seen.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(stream, script.clone(), a.clone(), s.clone()));
                }
            });
            Receiver {
                addr,
                connections,
                abandoned,
                seen,
            }
        }

        fn url(&self, rest: &str) -> String {
            format!("http://{}{rest}", self.addr)
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        fn abandoned(&self) -> usize {
            self.abandoned.load(Ordering::SeqCst)
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("lock").clone()
        }
    }

    /// Reads one request, records it, and answers as the script says.
    async fn serve(
        mut stream: TcpStream,
        script: Script,
        abandoned: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<Seen>>>,
    ) {
        let Some(request) = read_request(&mut stream).await else {
            return;
        };
        let index = {
            let mut seen = seen.lock().expect("lock");
            seen.push(request.clone());
            seen.len() - 1
        };
        match script(index, &request) {
            Some(code) => {
                let response = format!(
                    "HTTP/1.1 {code} Scripted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
            None => {
                // Hold the connection until the client gives up.
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                abandoned.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    async fn read_request(stream: &mut TcpStream) -> Option<Seen> {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
        let mut lines = head.split("\r\n");
        let mut start = lines.next()?.split(' ');
        let (method, path) = (start.next()?.to_owned(), start.next()?.to_owned());
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers.get("content-length")?.parse().ok()?;
        let mut body = buf[head_end..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(Seen {
            method,
            path,
            headers,
            body,
        })
    }

    fn cfg(url: String, timeout_ms: u64, retries: u32) -> config::Webhook {
        config::Webhook {
            url,
            timeout: Duration::from_millis(timeout_ms),
            retries,
        }
    }

    /// A webhook with fast retries whose reports also arrive on the returned
    /// receiver.
    fn webhook(
        cfg: config::Webhook,
        queue: usize,
        concurrency: usize,
    ) -> (Webhook, mpsc::UnboundedReceiver<Report>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let limits = Limits {
            queue,
            concurrency,
            backoff_first: Duration::from_millis(10),
        };
        (Webhook::with_limits(cfg, limits, Some(tx)), rx)
    }

    async fn next_report(rx: &mut mpsc::UnboundedReceiver<Report>) -> Report {
        tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("a report before the deadline")
            .expect("the report channel is open")
    }

    /// Polls `cond` until it holds, failing the test at the deadline.
    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn payload() -> Value {
        json!({
            "text": "Approval needed: ci-runner → POST https://api.example.com/deploy",
            "approval_id": "ap-1",
            "nested": {"list": [1, 2.5, null, true], "unicode": "é ✓"},
        })
    }

    #[tokio::test]
    async fn delivers_exact_json_body_and_approval_id_header() {
        let receiver = Receiver::start(|_, _| Some(204)).await;
        let (hook, mut reports) = webhook(cfg(receiver.url("/hook?token=s3cret"), 2000, 0), 8, 4);

        hook.notify("ap-1", payload());

        let r = next_report(&mut reports).await;
        assert_eq!(r.outcome, Outcome::Delivered, "{r:?}");
        assert_eq!(
            (r.approval_id.as_str(), r.attempts, r.status),
            ("ap-1", 1, 204)
        );
        assert_eq!(r.reason, "");
        let seen = receiver.seen();
        assert_eq!(seen.len(), 1);
        let req = &seen[0];
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/hook?token=s3cret")
        );
        assert_eq!(
            req.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(
            req.headers.get("x-gateway-approval-id").map(String::as_str),
            Some("ap-1")
        );
        assert_eq!(req.body, serde_json::to_vec(&payload()).expect("serialize"));
        let body: Value = serde_json::from_slice(&req.body).expect("JSON body");
        assert_eq!(body, payload());
        // The audit names the receiver, never its path (it may hold a token).
        assert_eq!(&*hook.reporter.url, receiver.url("/…").as_str());
    }

    #[tokio::test]
    async fn retries_server_errors_until_delivered() {
        let receiver = Receiver::start(|i, _| Some(if i < 2 { 500 } else { 200 })).await;
        let (hook, mut reports) = webhook(cfg(receiver.url("/"), 2000, 3), 8, 4);

        hook.notify("ap-2", json!({"text": "hi"}));

        let r = next_report(&mut reports).await;
        assert_eq!(r.outcome, Outcome::Delivered, "{r:?}");
        assert_eq!((r.attempts, r.status), (3, 200));
        let seen = receiver.seen();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|s| s.body == br#"{"text":"hi"}"#));
    }

    #[tokio::test]
    async fn gives_up_after_the_last_retry_with_the_last_error() {
        let receiver = Receiver::start(|_, _| Some(503)).await;
        let (hook, mut reports) = webhook(cfg(receiver.url("/"), 2000, 2), 8, 4);

        hook.notify("ap-3", json!({"text": "hi"}));

        let r = next_report(&mut reports).await;
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert_eq!(
            (r.attempts, r.status, r.reason.as_str()),
            (3, 503, "HTTP 503")
        );
        assert_eq!(receiver.seen().len(), 3);
    }

    #[tokio::test]
    async fn a_silent_receiver_only_costs_its_own_delivery() {
        // Requests for "hang" are accepted and never answered; others get 200.
        let receiver = Receiver::start(|_, seen| {
            let id = seen.headers.get("x-gateway-approval-id");
            if id.is_some_and(|id| id == "hang") {
                None
            } else {
                Some(200)
            }
        })
        .await;
        let (hook, mut reports) = webhook(cfg(receiver.url("/"), 10_000, 0), 8, 4);

        let started = Instant::now();
        hook.notify("hang", json!({"text": "first"}));
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "notify returned at once"
        );
        wait_until("the silent receiver has the request", || {
            receiver.seen().len() == 1
        })
        .await;

        hook.notify("ok", json!({"text": "second"}));

        let r = next_report(&mut reports).await;
        assert_eq!(
            (r.approval_id.as_str(), r.outcome),
            ("ok", Outcome::Delivered),
            "{r:?}"
        );
        assert!(
            reports.try_recv().is_err(),
            "the first is still waiting for its answer"
        );
        assert_eq!(receiver.connections(), 2);
    }

    #[tokio::test]
    async fn each_attempt_times_out_and_the_reason_says_so() {
        let receiver = Receiver::start(|_, _| None).await;
        let (hook, mut reports) = webhook(cfg(receiver.url("/"), 200, 1), 8, 4);

        let started = Instant::now();
        hook.notify("ap-5", json!({"text": "hi"}));

        let r = next_report(&mut reports).await;
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert_eq!((r.attempts, r.status), (2, 0));
        assert_eq!(r.reason, "timed out after 200 ms");
        assert_eq!(receiver.connections(), 2);
        assert!(started.elapsed() >= Duration::from_millis(400));
        wait_until("both timed-out connections are closed", || {
            receiver.abandoned() == 2
        })
        .await;
    }

    #[tokio::test]
    async fn a_full_queue_drops_without_blocking() {
        let receiver = Receiver::start(|_, _| None).await;
        let (hook, mut reports) = webhook(cfg(receiver.url("/"), 10_000, 0), 1, 1);

        // The only delivery slot hangs on the silent receiver...
        hook.notify("busy", json!({}));
        wait_until("the first delivery is under way", || {
            receiver.seen().len() == 1
        })
        .await;
        // ...so one more fits in the queue and the rest are dropped.
        let started = Instant::now();
        for i in 0..10 {
            hook.notify(&format!("ap-{i}"), json!({}));
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "notify never waits"
        );

        let mut dropped = Vec::new();
        while let Ok(r) = reports.try_recv() {
            assert_eq!(r.outcome, Outcome::Dropped, "{r:?}");
            assert_eq!((r.attempts, r.status), (0, 0));
            assert_eq!(r.reason, "queue full (1 pending)");
            dropped.push(r.approval_id);
        }
        let expected: Vec<String> = (1..10).map(|i| format!("ap-{i}")).collect();
        assert_eq!(dropped, expected);
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_then_failed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let (hook, mut reports) = webhook(cfg(format!("http://{addr}/"), 2000, 1), 8, 4);

        hook.notify("ap-7", json!({}));

        let r = next_report(&mut reports).await;
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert_eq!((r.attempts, r.status), (2, 0));
        assert!(r.reason.contains("onnect"), "{r:?}");
        assert!(
            !r.reason.contains(&addr.to_string()),
            "no URL in the reason: {r:?}"
        );
    }

    #[tokio::test]
    async fn an_id_that_cannot_be_a_header_fails_without_sending() {
        let receiver = Receiver::start(|_, _| Some(200)).await;
        let (hook, mut reports) = webhook(cfg(receiver.url("/"), 2000, 3), 8, 4);

        hook.notify("bad\r\nid", json!({}));

        let r = next_report(&mut reports).await;
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert_eq!((r.attempts, r.status), (0, 0));
        assert!(r.reason.contains("header"), "{r:?}");
        assert_eq!(receiver.connections(), 0);
    }

    #[test]
    fn shown_url_keeps_only_scheme_host_and_port() {
        assert_eq!(
            shown_url("https://user:pw@hooks.example.com:8443/a/b?token=x#frag"),
            "https://hooks.example.com:8443/…"
        );
        assert_eq!(
            shown_url("https://hooks.slack.com/services/T000/B000/XXXXSECRET"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(shown_url("not a url"), "(unparsable URL)");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let ms = |r| backoff(BACKOFF_FIRST, r).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(4), ms(5)],
            [250, 500, 1000, 2000, 4000, 5000]
        );
        assert_eq!(ms(31), 5000);
        assert_eq!(ms(u32::MAX), 5000);
    }
}
