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
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = if cred.uid() != 0 {
            json!({"error": "the admin socket is for root only"})
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(req) => handle(&req, state),
                Err(e) => json!({"error": format!("request is not JSON: {e}")}),
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        w.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

fn handle(req: &Value, state: &State) -> Value {
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => status(state),
        Some(other) => json!({"error": format!("unknown command {other:?}")}),
        None => json!({"error": "missing \"cmd\""}),
    }
}

fn status(state: &State) -> Value {
    let bindings = state.bindings();
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
                "identity": bindings.lookup(&rel).map(|i| i.name.clone()),
                "adopted": a.adopted,
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
        },
        "sessions_total": state.registry.total(),
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
