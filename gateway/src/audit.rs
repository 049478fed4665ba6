//! Audit records: one structured event per connection, per HTTP exchange
//! and per DNS answer, emitted under the `gateway::audit` target with fixed
//! field names. [`sink`] turns each into a chained journald entry
//! (`GATEWAY_<FIELD>`, `SYSLOG_IDENTIFIER=gateway-audit`); `gateway audit
//! verify` ([`verify`]) checks the chain.

pub mod chain;
pub mod cli;
pub mod journal;
pub mod sink;
pub mod verify;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed and closed normally (by either side).
    Closed,
    /// Refused by the gateway before anything went upstream.
    Refused,
    /// The upstream could not be reached or failed mid-stream.
    UpstreamError,
    /// No bytes either way for longer than the idle timeout.
    IdleTimeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Refused => "refused",
            Outcome::UpstreamError => "upstream_error",
            Outcome::IdleTimeout => "idle_timeout",
        }
    }
}

/// Everything known about one connection when it ends. Fields the pipeline
/// never reached stay empty, so every path (errors included) is audited.
#[derive(Debug, Default, Clone)]
pub struct ConnRecord {
    pub session: u64,
    pub identity: String,
    pub subject: String,
    pub duties: Vec<String>,
    pub identity_source: &'static str,
    /// Scalar claims of the identity's token (sub, repository, ref, …).
    pub claims: BTreeMap<String, String>,
    pub cgroup: String,
    pub pid: u32,
    pub uid: u32,
    pub exe: String,
    pub client: Option<SocketAddr>,
    pub orig_dst: Option<SocketAddr>,
    pub host: String,
    pub decision: &'static str,
    /// The rule that decided, or `default`.
    pub rule: String,
    /// The approval that held this connection, and who decided it.
    pub approval_id: String,
    pub approver: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
    /// The session recording's id (`gateway sessions show ID`), or empty.
    pub recording: String,
}

impl ConnRecord {
    pub fn emit(&self, outcome: Outcome, reason: &str) {
        let client = self.client.map(|a| a.to_string()).unwrap_or_default();
        let orig_dst = self.orig_dst.map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            target: "gateway::audit",
            event = "connection",
            session = self.session,
            identity = %self.identity,
            subject = %self.subject,
            duties = %self.duties.join(","),
            identity_source = self.identity_source,
            claims = %serde_json::to_string(&self.claims).unwrap_or_default(),
            cgroup = %self.cgroup,
            pid = self.pid,
            uid = self.uid,
            exe = %self.exe,
            client = %client,
            orig_dst = %orig_dst,
            host = %self.host,
            decision = self.decision,
            rule = %self.rule,
            approval_id = %self.approval_id,
            approver = %self.approver,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.duration.as_millis() as u64,
            outcome = outcome.as_str(),
            reason = %reason,
            recording = %self.recording,
        );
    }
}

/// One DNS query answered (or refused) by the forwarder.
#[derive(Debug, Default, Clone)]
pub struct DnsRecord {
    pub identity: String,
    pub cgroup: String,
    pub pid: u32,
    pub client: Option<SocketAddr>,
    pub server: Option<SocketAddr>,
    pub name: String,
    pub answers: Vec<String>,
    pub upstream: String,
}

impl DnsRecord {
    pub fn emit(&self, outcome: &str, reason: &str) {
        let client = self.client.map(|a| a.to_string()).unwrap_or_default();
        let server = self.server.map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            target: "gateway::audit",
            event = "dns",
            identity = %self.identity,
            cgroup = %self.cgroup,
            pid = self.pid,
            client = %client,
            server = %server,
            name = %self.name,
            answers = ?self.answers,
            upstream = %self.upstream,
            outcome = outcome,
            reason = %reason,
        );
    }
}

/// One HTTP exchange (or WebSocket session) on an intercepted connection.
/// Emitted when the response body ends, fails, or the client goes away, so
/// byte and masking counts are final.
#[derive(Debug, Default, Clone)]
pub struct HttpRecord {
    pub session: u64,
    pub request_id: String,
    pub identity: String,
    pub subject: String,
    pub duties: Vec<String>,
    pub cgroup: String,
    pub pid: u32,
    pub exe: String,
    pub orig_dst: Option<SocketAddr>,
    pub host: String,
    pub tls: bool,
    pub version: &'static str,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub decision: &'static str,
    pub rule: String,
    pub reason: String,
    /// Values masked in the response body, in total and by detector.
    pub masked: u64,
    pub masked_by: BTreeMap<String, u64>,
    /// `header←secret` names of injected credentials (never values).
    pub injected: Vec<String>,
    pub websocket: bool,
    /// The approval that held this request, and who decided it.
    pub approval_id: String,
    pub approver: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
}

impl HttpRecord {
    /// `outcome`: complete, blocked, upstream_error, aborted, ...
    pub fn emit(&self, outcome: &str) {
        let orig_dst = self.orig_dst.map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            target: "gateway::audit",
            event = if self.websocket { "websocket" } else { "http" },
            session = self.session,
            request_id = %self.request_id,
            identity = %self.identity,
            subject = %self.subject,
            duties = %self.duties.join(","),
            cgroup = %self.cgroup,
            pid = self.pid,
            exe = %self.exe,
            orig_dst = %orig_dst,
            host = %self.host,
            tls = self.tls,
            version = self.version,
            method = %self.method,
            path = %self.path,
            status = self.status,
            decision = self.decision,
            rule = %self.rule,
            masked = self.masked,
            masked_by = %serde_json::to_string(&self.masked_by).unwrap_or_default(),
            injected = %self.injected.join(","),
            approval_id = %self.approval_id,
            approver = %self.approver,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.duration.as_millis() as u64,
            outcome = outcome,
            reason = %self.reason,
        );
    }
}
