//! Just-in-time approvals with segregation of duties.
//!
//! A rule with `action = "approve"` holds an HTTP request (or, for rules
//! without a request part, a connection before its upstream connect) as a
//! **pending approval**: an id, the requester (identity, subject, duties,
//! cgroup, process), the rule and a summary of what is asked (method, host,
//! path, body size and SHA-256, a masked preview of the body).
//!
//! An **approver** proves who they are with an OIDC token from a trusted
//! issuer and must hold one of the rule's `approvers` duties. The approver's
//! subject must differ from the requester's, and no subject bound to the
//! requesting cgroup (its configured identity, any job token enrolled
//! there) may approve. There is no bypass: not for root, not for the admin
//! API.
//!
//! Decisions: approve once, approve for a window (the same identity and
//! rule then pass without asking for that long; windows are kept in the
//! state directory and survive a restart), or deny with a reason. No
//! decision before the timeout means deny; a requester that goes away
//! cancels its approval; a daemon that stops aborts what it holds (and a
//! daemon that starts records what a crashed one held as aborted).
//!
//! Every step is an `approval` audit event carrying both identities.

pub mod api;
pub mod cli;
pub mod webhook;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::{
    config,
    identity::{Identities, Identity},
    mask::{Counts, MaskSpec},
    policy::Policy,
};

/// Who asked, as recorded with the approval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Requester {
    pub identity: String,
    pub subject: String,
    pub duties: Vec<String>,
    pub cgroup: String,
    pub pid: u32,
    pub exe: String,
}

/// What is asked: an HTTP request or a connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    /// `http` or `connection`.
    pub kind: String,
    pub destination: String,
    pub host: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub method: String,
    /// Without the query (which may carry secrets).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_sha256: Option<String>,
    /// The start of the body after masking, as text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub preview: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub preview_truncated: bool,
}

/// A pending approval as `list` / `show` / the webhook present it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Approval {
    pub id: String,
    pub rule: String,
    pub reason: String,
    /// Duties any one of which lets an identity approve.
    pub approvers: Vec<String>,
    pub requester: Requester,
    pub request: Summary,
    pub created_unix: u64,
    pub expires_unix: u64,
}

/// A verified approver.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Approver {
    pub subject: String,
    pub issuer: String,
    pub duties: Vec<String>,
}

/// A granted window: `identity` (with `subject`) passes `rule` until
/// `until_unix` without asking.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Window {
    pub identity: String,
    pub subject: String,
    pub rule: String,
    pub until_unix: u64,
    pub approval_id: String,
    pub approver: String,
}

/// How a held request ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved {
        approver: String,
        window: Option<Duration>,
    },
    /// Passed under a window granted earlier.
    Window(Box<Window>),
    Denied {
        approver: String,
        reason: String,
    },
    TimedOut,
    /// The daemon stopped while it was held.
    Aborted,
    /// Not held at all: too many pending approvals.
    Refused(String),
}

impl Outcome {
    pub fn approved(&self) -> bool {
        matches!(self, Outcome::Approved { .. } | Outcome::Window(_))
    }

    /// For audit records: the approver's subject, if a person decided.
    pub fn approver(&self) -> &str {
        match self {
            Outcome::Approved { approver, .. } | Outcome::Denied { approver, .. } => approver,
            Outcome::Window(w) => &w.approver,
            _ => "",
        }
    }

    /// `approved`, `approved_by_window`, `denied`, `timeout`, `aborted`,
    /// `refused`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Approved { .. } => "approved",
            Outcome::Window(_) => "approved_by_window",
            Outcome::Denied { .. } => "denied",
            Outcome::TimedOut => "timeout",
            Outcome::Aborted => "aborted",
            Outcome::Refused(_) => "refused",
        }
    }

    /// Writes this outcome's approval id (a window's granting one) and
    /// approver into a request's audit fields, and returns what the client
    /// and the audit reason are told: `approval ID: outcome`.
    pub fn settle(
        &self,
        approval_id: &mut String,
        approver: &mut String,
        timeout: Duration,
    ) -> String {
        if let Outcome::Window(w) = self {
            approval_id.clone_from(&w.approval_id);
        }
        *approver = self.approver().to_string();
        format!(
            "approval {}: {}",
            if approval_id.is_empty() {
                "-"
            } else {
                approval_id.as_str()
            },
            self.describe(timeout)
        )
    }

    /// What the waiting client is told (after "approval ID").
    pub fn describe(&self, timeout: Duration) -> String {
        match self {
            Outcome::Approved { approver, window } => match window {
                Some(w) => format!(
                    "approved by {approver} for a window of {} minutes",
                    w.as_secs() / 60
                ),
                None => format!("approved by {approver}"),
            },
            Outcome::Window(w) => format!(
                "approved under the window {} granted by {} (until unix {})",
                w.approval_id, w.approver, w.until_unix
            ),
            Outcome::Denied { approver, reason } => {
                format!("denied by {approver}: {reason}")
            }
            Outcome::TimedOut => format!(
                "timed out: no approver decided within {} s, which counts as a denial",
                timeout.as_secs()
            ),
            Outcome::Aborted => "aborted: the gateway stopped while the request was held".into(),
            Outcome::Refused(why) => format!("refused: {why}"),
        }
    }
}

/// Why an approver's decision (or look) was refused; `status` is the HTTP
/// status the admin API answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// An approver's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Approve { window: Option<Duration> },
    Deny { reason: String },
}

/// What the data path hands over to be held.
#[derive(Debug, Clone)]
pub struct Ask {
    pub rule: String,
    pub reason: String,
    pub approvers: Vec<String>,
    pub requester: Requester,
    pub request: Summary,
}

struct Pending {
    approval: Approval,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Inner {
    pending: BTreeMap<String, Pending>,
    windows: Vec<Window>,
}

/// The approvals of one daemon.
pub struct Approvals {
    cfg: config::Approvals,
    identities: Arc<Identities>,
    /// `<state_dir>/approvals`: `windows.json`, `pending/<id>.json`.
    dir: PathBuf,
    webhook: Option<webhook::Webhook>,
    /// Masks body previews: every built-in detector.
    preview_mask: Option<MaskSpec>,
    inner: Mutex<Inner>,
    /// Tickets alive (requests held or just released and being answered).
    held: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.lock().map_or(0, |i| i.pending.len());
        write!(f, "Approvals({n} pending)")
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id() -> String {
    let bytes: [u8; 6] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("apr-{hex}")
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// crash leaves the old or the new content, never half of it.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Approvals {
    /// Loads the windows granted before (dropping expired ones) and records
    /// what a previous daemon held when it died as aborted.
    pub fn new(
        cfg: &config::Approvals,
        identities: Arc<Identities>,
        state_dir: &Path,
    ) -> anyhow::Result<Approvals> {
        use anyhow::Context as _;
        let dir = state_dir.join("approvals");
        std::fs::create_dir_all(dir.join("pending"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let now = now_unix();
        let windows_path = dir.join("windows.json");
        let windows: Vec<Window> = match std::fs::read(&windows_path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Window>>(&bytes) {
                Ok(w) => w,
                Err(e) => {
                    // Unreadable windows grant nothing: everyone asks again.
                    tracing::warn!(path = %windows_path.display(), error = %e, "approval windows file is unreadable; starting without windows");
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", windows_path.display()));
            }
        };
        let windows: Vec<Window> = windows.into_iter().filter(|w| w.until_unix > now).collect();
        for w in &windows {
            tracing::info!(
                target: "gateway::audit",
                event = "approval",
                outcome = "window_restored",
                approval_id = %w.approval_id,
                rule = %w.rule,
                identity = %w.identity,
                subject = %w.subject,
                approver = %w.approver,
                until_unix = w.until_unix,
            );
        }
        let approvals = Approvals {
            preview_mask: {
                let names: Vec<&str> = crate::mask::detectors::BUILTINS
                    .iter()
                    .map(|b| b.name)
                    .collect();
                MaskSpec::from_names(&names).ok()
            },
            cfg: cfg.clone(),
            identities,
            dir,
            webhook: cfg.webhook.clone().map(webhook::Webhook::spawn),
            inner: Mutex::new(Inner {
                pending: BTreeMap::new(),
                windows,
            }),
            held: std::sync::atomic::AtomicUsize::new(0),
        };
        approvals.save_windows();
        approvals.abort_leftovers();
        Ok(approvals)
    }

    pub fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    /// Requests held by a daemon that died: recorded as aborted, once.
    fn abort_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("pending")) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(bytes) = std::fs::read(&path)
                && let Ok(a) = serde_json::from_slice::<Approval>(&bytes)
            {
                audit(
                    &a,
                    "aborted",
                    None,
                    "the gateway stopped while the request was held (found at start)",
                );
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    fn save_windows(&self) {
        let Ok(inner) = self.inner.lock() else {
            return;
        };
        let path = self.dir.join("windows.json");
        let bytes = serde_json::to_vec_pretty(&inner.windows).unwrap_or_default();
        if let Err(e) = write_atomic(&path, &bytes) {
            tracing::error!(path = %path.display(), error = %e, "cannot save approval windows; they last until the daemon stops");
        }
    }

    /// A summary of a request body: size, SHA-256 and a masked preview.
    pub fn summarize_body(&self, body: &[u8], summary: &mut Summary) {
        summary.body_bytes = Some(body.len() as u64);
        summary.body_sha256 = Some(
            Sha256::digest(body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        );
        if body.is_empty() {
            return;
        }
        // Mask a little more than is shown, so a value cut by the preview
        // limit is still recognised.
        let take = body.len().min(self.cfg.preview_bytes.saturating_add(256));
        let masked = match &self.preview_mask {
            Some(spec) => spec.mask_text(&body[..take], &mut Counts::default()),
            None => b"[preview unavailable]".to_vec(),
        };
        let mut text = String::from_utf8_lossy(&masked).into_owned();
        let mut truncated = take < body.len();
        if text.len() > self.cfg.preview_bytes {
            let mut cut = self.cfg.preview_bytes;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            truncated = true;
        }
        summary.preview = Some(text);
        summary.preview_truncated = truncated;
    }

    /// Holds a request: `Err(outcome)` when it need not (or cannot) wait —
    /// a window covers it, or too many are pending — else a ticket to wait
    /// on. Dropping the ticket before it resolves cancels the approval.
    pub fn ask(self: &Arc<Self>, ask: Ask) -> Result<Ticket, Outcome> {
        let now = now_unix();
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Outcome::Refused("approval state is poisoned".into()))?;
        inner.windows.retain(|w| w.until_unix > now);
        if let Some(w) = inner.windows.iter().find(|w| {
            w.rule == ask.rule
                && w.identity == ask.requester.identity
                && w.subject == ask.requester.subject
        }) {
            let w = w.clone();
            drop(inner);
            self.audit_window_pass(ask, &w, now);
            return Err(Outcome::Window(Box::new(w)));
        }
        if inner.pending.len() >= self.cfg.max_pending {
            return Err(Outcome::Refused(format!(
                "{} approvals are already pending (approvals.max_pending)",
                inner.pending.len()
            )));
        }
        let approval = Approval {
            id: new_id(),
            rule: ask.rule,
            reason: ask.reason,
            approvers: ask.approvers,
            requester: ask.requester,
            request: ask.request,
            created_unix: now,
            expires_unix: now + self.cfg.timeout.as_secs(),
        };
        let (tx, rx) = oneshot::channel();
        let id = approval.id.clone();
        inner.pending.insert(
            id.clone(),
            Pending {
                approval: approval.clone(),
                tx,
            },
        );
        drop(inner);
        let record = self.pending_path(&id);
        if let Err(e) = write_atomic(&record, &serde_json::to_vec(&approval).unwrap_or_default()) {
            tracing::warn!(path = %record.display(), error = %e, "cannot record the pending approval on disk; a crash now would not be recorded as aborted");
        }
        audit(&approval, "pending", None, &approval.reason);
        if let Some(hook) = &self.webhook {
            hook.notify(&id, webhook_payload(&approval));
        }
        self.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Ticket {
            approvals: self.clone(),
            approval,
            rx: Some(rx),
        })
    }

    /// A request that passed under window `w`: audited like a decision,
    /// under the id of the approval that granted the window, naming who
    /// granted it.
    fn audit_window_pass(&self, ask: Ask, w: &Window, now: u64) {
        let passed = Approval {
            id: w.approval_id.clone(),
            rule: ask.rule,
            reason: ask.reason,
            approvers: ask.approvers,
            requester: ask.requester,
            request: ask.request,
            created_unix: now,
            expires_unix: w.until_unix,
        };
        let granted_by = Approver {
            subject: w.approver.clone(),
            issuer: String::new(),
            duties: Vec::new(),
        };
        let outcome = Outcome::Window(Box::new(w.clone()));
        audit(
            &passed,
            outcome.as_str(),
            Some(&granted_by),
            &outcome.describe(self.cfg.timeout),
        );
    }

    /// Where a pending approval is recorded until it resolves.
    fn pending_path(&self, id: &str) -> PathBuf {
        self.dir.join("pending").join(format!("{id}.json"))
    }

    /// Removes a pending approval (and its file); `None` if it is gone.
    fn take(&self, id: &str) -> Option<Pending> {
        let p = self.inner.lock().ok()?.pending.remove(id);
        if p.is_some() {
            let _ = std::fs::remove_file(self.pending_path(id));
        }
        p
    }

    pub fn list(&self) -> Vec<Approval> {
        self.inner
            .lock()
            .map(|i| i.pending.values().map(|p| p.approval.clone()).collect())
            .unwrap_or_default()
    }

    pub fn show(&self, id: &str) -> Option<Approval> {
        self.inner
            .lock()
            .ok()?
            .pending
            .get(id)
            .map(|p| p.approval.clone())
    }

    pub fn windows(&self) -> Vec<Window> {
        let now = now_unix();
        self.inner
            .lock()
            .map(|i| {
                i.windows
                    .iter()
                    .filter(|w| w.until_unix > now)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Verifies an approver's token: trusted issuer (and one of
    /// `approvals.issuers` when set), signature, expiry, audience; duties
    /// from `approvals.groups_claim`.
    pub async fn authenticate(&self, token: &str) -> Result<Approver, Refusal> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Refusal::new(
                401,
                "no approver token: pass --token-file FILE or set GATEWAY_TOKEN (HTTP: Authorization: Bearer TOKEN)",
            ));
        }
        let claims = self.identities.verifier.verify(token).await.map_err(|e| {
            Refusal::new(401, format!("approver token refused ({}): {e}", e.code()))
        })?;
        if !self.cfg.issuers.is_empty() && !self.cfg.issuers.contains(&claims.iss) {
            return Err(Refusal::new(
                401,
                format!(
                    "approver token refused (issuer_not_allowed): issuer {} may not vouch for approvers (approvals.issuers)",
                    claims.iss
                ),
            ));
        }
        if claims.sub.is_empty() {
            return Err(Refusal::new(
                401,
                "approver token refused: it has no subject",
            ));
        }
        Ok(Approver {
            duties: claims.duties(&self.cfg.groups_claim, &self.cfg.duty_mapping),
            subject: claims.sub,
            issuer: claims.iss,
        })
    }

    /// Whether `approver` may look at pending approvals at all: they hold a
    /// duty some approve rule of `policy` names.
    pub fn may_view(&self, approver: &Approver, policy: &Policy) -> Result<(), Refusal> {
        let duties = policy.approver_duties();
        if approver.duties.iter().any(|d| duties.contains(d)) {
            Ok(())
        } else {
            Err(Refusal::new(
                403,
                format!(
                    "{} holds none of the approver duties [{}]; only approvers may see pending approvals",
                    approver.subject,
                    duties.join(", ")
                ),
            ))
        }
    }

    /// Checks `approver` against approval `id` and, if allowed, decides it.
    /// Every refusal is audited.
    pub fn decide(
        &self,
        id: &str,
        approver: &Approver,
        verdict: Verdict,
    ) -> Result<Value, Refusal> {
        let approval = self.show(id).ok_or_else(|| {
            Refusal::new(
                404,
                format!("no pending approval {id} (it was decided, timed out, or cancelled, or the id is wrong); see `gateway approvals list`"),
            )
        })?;
        if let Err(r) = self.check(&approval, approver, &verdict) {
            audit(&approval, "approver_refused", Some(approver), &r.message);
            return Err(r);
        }
        let Some(pending) = self.take(id) else {
            return Err(Refusal::new(
                409,
                format!("approval {id} was resolved while this decision was checked"),
            ));
        };
        let a = pending.approval;
        let (outcome, reply) = match verdict {
            Verdict::Approve { window } => {
                if let Some(w) = window {
                    let win = Window {
                        identity: a.requester.identity.clone(),
                        subject: a.requester.subject.clone(),
                        rule: a.rule.clone(),
                        until_unix: now_unix() + w.as_secs(),
                        approval_id: a.id.clone(),
                        approver: approver.subject.clone(),
                    };
                    if let Ok(mut inner) = self.inner.lock() {
                        inner.windows.push(win);
                    }
                    self.save_windows();
                }
                let reply = json!({
                    "approved": a.id,
                    "window_minutes": window.map(|w| w.as_secs() / 60),
                    "rule": a.rule,
                    "requester": a.requester.subject,
                    "approver": approver.subject,
                });
                (
                    Outcome::Approved {
                        approver: approver.subject.clone(),
                        window,
                    },
                    reply,
                )
            }
            Verdict::Deny { reason } => {
                let reply = json!({
                    "denied": a.id,
                    "reason": reason,
                    "rule": a.rule,
                    "requester": a.requester.subject,
                    "approver": approver.subject,
                });
                (
                    Outcome::Denied {
                        approver: approver.subject.clone(),
                        reason,
                    },
                    reply,
                )
            }
        };
        let detail = outcome.describe(self.cfg.timeout);
        audit_decision(&a, &outcome, Some(approver), &detail);
        // The requester may have gone in the meantime; the decision stands
        // in the audit either way.
        let _ = pending.tx.send(outcome);
        Ok(reply)
    }

    /// Segregation of duties, in this order: the approver holds a duty the
    /// rule names; is not the requester; is no identity bound to the
    /// requesting cgroup. Then the window limit.
    fn check(&self, a: &Approval, approver: &Approver, verdict: &Verdict) -> Result<(), Refusal> {
        if !approver.duties.iter().any(|d| a.approvers.contains(d)) {
            return Err(Refusal::new(
                403,
                format!(
                    "refused: {} holds none of the approver duties [{}] that rule {} requires (their duties: [{}])",
                    approver.subject,
                    a.approvers.join(", "),
                    a.rule,
                    approver.duties.join(", ")
                ),
            ));
        }
        if approver.subject == a.requester.subject {
            return Err(Refusal::new(
                403,
                format!(
                    "refused: self-approval — {} is the requester of {} (identity {}); segregation of duties needs a different identity",
                    approver.subject, a.id, a.requester.identity
                ),
            ));
        }
        if self
            .identities
            .subjects_bound_to(&a.requester.cgroup)
            .contains(&approver.subject)
        {
            return Err(Refusal::new(
                403,
                format!(
                    "refused: {} is bound to the requesting cgroup {}; no identity of the requester's own cgroup may approve",
                    approver.subject, a.requester.cgroup
                ),
            ));
        }
        if let Verdict::Approve { window: Some(w) } = verdict {
            if w.is_zero() {
                return Err(Refusal::new(400, "a window must be at least one minute"));
            }
            if *w > self.cfg.max_window {
                return Err(Refusal::new(
                    400,
                    format!(
                        "a window of {} minutes is longer than approvals.max_window_minutes ({})",
                        w.as_secs() / 60,
                        self.cfg.max_window.as_secs() / 60
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An attempt to decide `id` with a token that did not verify.
    pub fn audit_refused_token(&self, id: &str, why: &str) {
        match self.show(id) {
            Some(a) => audit(&a, "approver_refused", None, why),
            None => tracing::info!(
                target: "gateway::audit",
                event = "approval",
                outcome = "approver_refused",
                approval_id = %id,
                reason = %why,
            ),
        }
    }

    /// How many requests are held, or released and not yet answered.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The daemon stops: every held request is released as aborted.
    pub fn abort_all(&self) {
        let held: Vec<String> = self
            .inner
            .lock()
            .map(|i| i.pending.keys().cloned().collect())
            .unwrap_or_default();
        for id in held {
            if let Some(p) = self.take(&id) {
                audit(&p.approval, "aborted", None, "the gateway is stopping");
                let _ = p.tx.send(Outcome::Aborted);
            }
        }
    }
}

/// A verdict from its wire form (CLI, admin socket, HTTP API).
pub fn parse_verdict(
    verdict: &str,
    window_minutes: Option<u64>,
    reason: Option<&str>,
) -> Result<Verdict, Refusal> {
    match verdict {
        "approve" => Ok(Verdict::Approve {
            window: window_minutes.map(|m| Duration::from_secs(m.saturating_mul(60))),
        }),
        "deny" => Ok(Verdict::Deny {
            reason: reason
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .unwrap_or("no reason given")
                .chars()
                .take(500)
                .collect(),
        }),
        other => Err(Refusal::new(
            400,
            format!("verdict {other:?} is neither \"approve\" nor \"deny\""),
        )),
    }
}

/// A held request's claim on its decision. Dropped before it resolves
/// (the client went away): the approval is cancelled and audited.
pub struct Ticket {
    approvals: Arc<Approvals>,
    approval: Approval,
    rx: Option<oneshot::Receiver<Outcome>>,
}

impl Ticket {
    pub fn id(&self) -> &str {
        &self.approval.id
    }

    /// Waits for a decision, or the timeout (a denial).
    pub async fn wait(mut self) -> Outcome {
        let Some(rx) = self.rx.as_mut() else {
            return Outcome::Aborted;
        };
        let outcome = match tokio::time::timeout(self.approvals.cfg.timeout, &mut *rx).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => Outcome::Aborted,
            Err(_) => match self.approvals.take(&self.approval.id) {
                Some(_) => {
                    let o = Outcome::TimedOut;
                    audit_decision(
                        &self.approval,
                        &o,
                        None,
                        &o.describe(self.approvals.cfg.timeout),
                    );
                    o
                }
                // Decided just as the timer fired: the decision wins.
                None => rx.try_recv().unwrap_or(Outcome::TimedOut),
            },
        };
        self.rx = None;
        outcome
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.approvals
            .held
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if self.rx.is_some() && self.approvals.take(&self.approval.id).is_some() {
            audit(
                &self.approval,
                "cancelled",
                None,
                "the requester went away while the request was held",
            );
        }
    }
}

fn audit_decision(a: &Approval, outcome: &Outcome, approver: Option<&Approver>, detail: &str) {
    audit(a, outcome.as_str(), approver, detail);
}

/// One `approval` audit event: the approval, the requester and (when one
/// acted) the approver.
fn audit(a: &Approval, outcome: &str, approver: Option<&Approver>, reason: &str) {
    tracing::info!(
        target: "gateway::audit",
        event = "approval",
        outcome = outcome,
        approval_id = %a.id,
        rule = %a.rule,
        identity = %a.requester.identity,
        subject = %a.requester.subject,
        duties = %a.requester.duties.join(","),
        cgroup = %a.requester.cgroup,
        pid = a.requester.pid,
        exe = %a.requester.exe,
        kind = %a.request.kind,
        orig_dst = %a.request.destination,
        host = %a.request.host,
        method = %a.request.method,
        path = %a.request.path,
        body_bytes = a.request.body_bytes.unwrap_or(0),
        body_sha256 = %a.request.body_sha256.as_deref().unwrap_or(""),
        approver = %approver.map_or("", |p| p.subject.as_str()),
        approver_issuer = %approver.map_or("", |p| p.issuer.as_str()),
        approver_duties = %approver.map(|p| p.duties.join(",")).unwrap_or_default(),
        expires_unix = a.expires_unix,
        reason = %reason,
    );
}

/// The webhook body: the approval, and a Slack-compatible `text`.
pub fn webhook_payload(a: &Approval) -> Value {
    let what = if a.request.kind == "http" {
        format!("{} {}{}", a.request.method, a.request.host, a.request.path)
    } else {
        format!(
            "a connection to {} ({})",
            a.request.host, a.request.destination
        )
    };
    let text = format!(
        "Approval {} needed: {} (subject {}) asks for {what} under rule {}. Approvers: [{}]. Expires at unix {}. `gateway approvals approve {}` or `deny {}`.",
        a.id,
        a.requester.identity,
        a.requester.subject,
        a.rule,
        a.approvers.join(", "),
        a.expires_unix,
        a.id,
        a.id
    );
    json!({ "text": text, "event": "approval_pending", "approval": a })
}

/// From an identity and where its request came from.
pub fn requester(identity: &Identity, cgroup: &str, pid: u32, exe: &str) -> Requester {
    Requester {
        identity: identity.name.clone(),
        subject: identity.subject.clone(),
        duties: identity.duties.clone(),
        cgroup: cgroup.to_string(),
        pid,
        exe: exe.to_string(),
    }
}

#[cfg(test)]
mod tests;
