//! The admin socket: a Unix stream socket only root can open (mode 0600),
//! one JSON request and one JSON reply per line. `gateway status` is its
//! first client; enrollment and approvals will come through here too.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{daemon::State, kernel};

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A stale socket from a killed daemon: nobody answers on it, replace it.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).with_context(|| {
        format!(
            "binding the admin socket {} (is another daemon running?)",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = session(stream, &state).await {
                tracing::debug!(error = %e, "admin session ended");
            }
        });
    }
}

async fn session(stream: UnixStream, state: &State) -> std::io::Result<()> {
    // Root only, whatever the file mode says.
    let cred = stream.peer_cred()?;
    let refusal = caller_refusal(cred.uid(), cred.pid(), state);
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = if let Some(why) = &refusal {
            json!({"error": why})
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(req) => handle(&req, state).await,
                Err(e) => json!({"error": format!("request is not JSON: {e}")}),
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        w.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

/// Root only, and never a process inside a tagged cgroup: a job must not
/// be able to enroll or change an identity, its own or another's.
fn caller_refusal(uid: u32, pid: Option<i32>, state: &State) -> Option<String> {
    if uid != 0 {
        return Some("the admin socket is for root only".into());
    }
    let Some(pid) = pid else {
        return Some("cannot tell which process is calling; refused".into());
    };
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    state.identities.binding(path).map(|(_, b)| {
        format!(
            "refused: the caller runs inside tagged cgroup {path} (identity {}); the admin socket serves only processes outside enforcement",
            b.config.name
        )
    })
}

async fn handle(req: &Value, state: &State) -> Value {
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => status(state),
        Some("enroll") => enroll(req, state).await,
        Some("approvals_list") => json!({
            "approvals": state.approvals.list(),
            "windows": state.approvals.windows(),
        }),
        Some("approvals_show") => match req.get("id").and_then(Value::as_str) {
            Some(id) => match state.approvals.show(id) {
                Some(a) => json!({ "approval": a }),
                None => {
                    json!({"error": format!("no pending approval {id}; see `gateway approvals list`")})
                }
            },
            None => json!({"error": "approvals_show needs \"id\""}),
        },
        Some("approvals_decide") => approvals_decide(req, state).await,
        Some(other) => json!({"error": format!("unknown command {other:?}")}),
        None => json!({"error": "missing \"cmd\""}),
    }
}

/// `{"cmd":"approvals_decide","id":..,"token":..,"verdict":"approve"|"deny",
/// "window_minutes":N,"reason":".."}`: the approver proves who they are with
/// the token, here as over the HTTP API; root on this socket is no bypass.
async fn approvals_decide(req: &Value, state: &State) -> Value {
    let (Some(id), Some(verdict)) = (
        req.get("id").and_then(Value::as_str),
        req.get("verdict").and_then(Value::as_str),
    ) else {
        return json!({"error": "approvals_decide needs \"id\" and \"verdict\""});
    };
    let token = req.get("token").and_then(Value::as_str).unwrap_or("");
    let verdict = match crate::approvals::parse_verdict(
        verdict,
        req.get("window_minutes").and_then(Value::as_u64),
        req.get("reason").and_then(Value::as_str),
    ) {
        Ok(v) => v,
        Err(r) => return json!({"error": r.message}),
    };
    match state.approvals.authenticate(token).await {
        Ok(approver) => match state.approvals.decide(id, &approver, verdict) {
            Ok(v) => v,
            Err(r) => json!({"error": r.message}),
        },
        Err(r) => {
            state.approvals.audit_refused_token(id, &r.message);
            json!({"error": r.message})
        }
    }
}

async fn enroll(req: &Value, state: &State) -> Value {
    let (Some(cgroup), Some(token)) = (
        req.get("cgroup").and_then(Value::as_str),
        req.get("token").and_then(Value::as_str),
    ) else {
        return json!({"error": "enroll needs \"cgroup\" and \"token\""});
    };
    let cgroup = format!("/{}", cgroup.trim_matches('/'));
    let token = token.trim();
    let dir = state.resolver.mount().join(cgroup.trim_start_matches('/'));
    let result = if dir.is_dir() {
        state.identities.enroll(&cgroup, token).await
    } else {
        Err(format!(
            "cgroup {cgroup} does not exist ({})",
            dir.display()
        ))
    };
    match result {
        Ok(i) => {
            // Decisions cached for the previous identity of this cgroup go.
            state.fast.clear(state);
            let expires = i
                .expires_at
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            tracing::info!(
                target: "gateway::audit",
                event = "enroll",
                cgroup = %cgroup,
                identity = %i.name,
                subject = %i.subject,
                duties = %i.duties.join(","),
                claims = %serde_json::to_string(&i.claims).unwrap_or_default(),
                expires_at_unix = expires,
                outcome = "enrolled",
            );
            json!({"enrolled": cgroup, "identity": i.name, "subject": i.subject, "duties": i.duties, "expires_at_unix": expires})
        }
        Err(reason) => {
            tracing::info!(target: "gateway::audit", event = "enroll", cgroup = %cgroup, outcome = "refused", reason = %reason);
            json!({"error": reason})
        }
    }
}

fn status(state: &State) -> Value {
    let cgroups: Vec<Value> = state
        .attached
        .iter()
        .map(|a| {
            let rel = a
                .path
                .strip_prefix(state.resolver.mount())
                .map(|p| format!("/{}", p.display()))
                .unwrap_or_else(|_| a.path.display().to_string());
            json!({
                "path": rel,
                "id": a.id,
                "identity": state.identities.binding(&rel).map(|(_, b)| b.config.name.clone()),
                "adopted": a.adopted,
                "family_guard": a.family_guard,
            })
        })
        .collect();
    let stats = state.maps.stats();
    let ctl = state.maps.control();
    json!({
        "ready": ctl.is_some_and(|c| c.ready == gateway_common::READY),
        "proxy_port": state.proxy_port,
        "dns_port": state.dns_port,
        "cgroups": cgroups,
        "pins": kernel::pins(&state.pin_dir).iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "connections": state.registry.snapshot(),
        "identities": state.identities.status(),
        "kernel_counters": {
            "tcp_redirected": stats.first(),
            "dns_redirected": stats.get(1),
            "denied_not_ready": stats.get(2),
            "denied_quic": stats.get(3),
            "denied_udp": stats.get(4),
            "denied_netns": stats.get(5),
            "denied_socket": stats.get(6),
            "denied_map_full": stats.get(7),
            "denied_family": stats.get(8),
            "fast_path": stats.get(9),
            "events_lost": stats.get(10),
        },
        "sessions_total": state.registry.total(),
        "approvals_pending": state.approvals.list().iter().map(|a| json!({
            "id": a.id, "rule": a.rule, "identity": a.requester.identity,
            "host": a.request.host, "method": a.request.method, "path": a.request.path,
            "expires_unix": a.expires_unix,
        })).collect::<Vec<_>>(),
    })
}

/// Client side: one request, one reply.
pub async fn request(path: &Path, req: &Value) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to the daemon's admin socket {} (is `gateway run` running?)",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = req.to_string();
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let reply = lines
        .next_line()
        .await?
        .context("the daemon closed the admin connection without a reply")?;
    let v: Value = serde_json::from_str(&reply).context("the daemon's reply is not JSON")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        anyhow::bail!("{e}");
    }
    Ok(v)
}
