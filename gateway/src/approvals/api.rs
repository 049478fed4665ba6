//! The HTTP admin API for remote approvers (`[approvals.api] listen`).
//!
//! Every request carries the approver's OIDC token as
//! `Authorization: Bearer <token>`; the same checks as on the admin socket
//! apply (trusted issuer, approver duty, segregation of duties).
//!
//! - `GET  /v1/approvals`              pending approvals and windows
//! - `GET  /v1/approvals/{id}`         one approval
//! - `POST /v1/approvals/{id}/approve` body `{"window_minutes": N}` (optional)
//! - `POST /v1/approvals/{id}/deny`    body `{"reason": "..."}` (optional)
//!
//! Answers are JSON; errors are `{"error": "..."}` with 400 (bad request),
//! 401 (no or bad token), 403 (not allowed to approve this), 404 (no such
//! approval) or 409 (decided meanwhile). Processes inside tagged cgroups
//! never reach this port: their connects go to the proxy, which refuses
//! connections to the gateway itself.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{Refusal, parse_verdict};
use crate::daemon::State;

/// Request bodies are tiny JSON objects.
const MAX_BODY: usize = 16 * 1024;

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "approvals API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state, peer).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Some(std::time::Duration::from_secs(10)));
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, %peer, "approvals API connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn refusal(r: &Refusal) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = reply(status, &json!({ "error": r.message }));
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"gateway-approvals\""),
        );
    }
    resp
}

fn bearer(req: &Request<Incoming>) -> &str {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .unwrap_or("")
}

async fn handle(
    req: Request<Incoming>,
    state: &State,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let approvals = &state.approvals;
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let route = match (req.method(), parts.as_slice()) {
        (&Method::GET, ["v1", "approvals"]) => Route::List,
        (&Method::GET, ["v1", "approvals", id]) => Route::Show((*id).to_string()),
        (&Method::POST, ["v1", "approvals", id, verb @ ("approve" | "deny")]) => {
            Route::Decide((*id).to_string(), (*verb).to_string())
        }
        (_, ["v1", "approvals", ..]) => {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": format!("{} {path} is not an approvals API call; GET /v1/approvals[/ID], POST /v1/approvals/ID/approve|deny", req.method())}),
            );
        }
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("no such endpoint {path}; see GET /v1/approvals")}),
            );
        }
    };
    let approver = match approvals.authenticate(bearer(&req)).await {
        Ok(a) => a,
        Err(r) => {
            if let Route::Decide(id, _) = &route {
                approvals.audit_refused_token(id, &r.message);
            }
            tracing::info!(%peer, reason = %r.message, "approvals API request refused");
            return refusal(&r);
        }
    };
    match route {
        Route::List => match approvals.may_view(&approver, &state.policy()) {
            Ok(()) => reply(
                StatusCode::OK,
                &json!({ "approvals": approvals.list(), "windows": approvals.windows() }),
            ),
            Err(r) => refusal(&r),
        },
        Route::Show(id) => {
            if let Err(r) = approvals.may_view(&approver, &state.policy()) {
                return refusal(&r);
            }
            match approvals.show(&id) {
                Some(a) => reply(StatusCode::OK, &json!({ "approval": a })),
                None => reply(
                    StatusCode::NOT_FOUND,
                    &json!({"error": format!("no pending approval {id}")}),
                ),
            }
        }
        Route::Decide(id, verb) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": format!("reading the request body: {e}")}),
                    );
                }
            };
            let args: Value = if body.iter().all(u8::is_ascii_whitespace) {
                json!({})
            } else {
                match serde_json::from_slice(&body) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        return reply(
                            StatusCode::BAD_REQUEST,
                            &json!({"error": "the body must be a JSON object, e.g. {\"window_minutes\": 30} or {\"reason\": \"...\"}"}),
                        );
                    }
                }
            };
            let verdict = match parse_verdict(
                &verb,
                args.get("window_minutes").and_then(Value::as_u64),
                args.get("reason").and_then(Value::as_str),
            ) {
                Ok(v) => v,
                Err(r) => return refusal(&r),
            };
            match approvals.decide(&id, &approver, verdict) {
                Ok(v) => reply(StatusCode::OK, &v),
                Err(r) => refusal(&r),
            }
        }
    }
}

enum Route {
    List,
    Show(String),
    Decide(String, String),
}
