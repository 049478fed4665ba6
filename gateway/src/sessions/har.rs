//! HAR 1.2 export of a recording (<http://www.softwareishard.com/blog/har-12-spec/>),
//! which Chromium's and Firefox's devtools import.

use serde_json::{Value, json};

use super::{Body, Exchange, Header, Recording, redact::percent_decode};

/// The whole recording as a HAR 1.2 document: one entry per exchange (a
/// connection that was not intercepted has none; its summary is the
/// comment).
pub fn export(rec: &Recording) -> Value {
    let entries: Vec<Value> = rec.exchanges.iter().map(|e| entry(rec, e)).collect();
    let mut comment = format!(
        "gateway session {}: identity {} ({}), {} {} to {}{}, decision {} (rule {}), outcome {}",
        rec.id,
        rec.identity,
        rec.subject,
        rec.exe,
        rec.pid,
        rec.destination,
        if rec.host.is_empty() {
            String::new()
        } else {
            format!(" ({})", rec.host)
        },
        rec.decision,
        rec.rule,
        rec.outcome
    );
    if rec.exchanges_dropped > 0 {
        comment += &format!("; {} later exchange(s) not recorded", rec.exchanges_dropped);
    }
    json!({
        "log": {
            "version": "1.2",
            "creator": {
                "name": "gateway",
                "version": env!("CARGO_PKG_VERSION"),
            },
            "pages": [],
            "entries": entries,
            "comment": comment,
        }
    })
}

fn headers(h: &[Header]) -> Vec<Value> {
    h.iter()
        .map(|h| json!({"name": h.name, "value": h.value}))
        .collect()
}

fn header<'a>(h: &'a [Header], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|x| x.name.eq_ignore_ascii_case(name))
        .map(|x| x.value.as_str())
}

/// Cookies from (already redacted) Cookie / Set-Cookie headers.
fn cookies(h: &[Header], name: &str) -> Vec<Value> {
    h.iter()
        .filter(|x| x.name.eq_ignore_ascii_case(name))
        .flat_map(|x| {
            let pairs: Vec<&str> = if name == "set-cookie" {
                x.value.split(';').take(1).collect()
            } else {
                x.value.split(';').collect()
            };
            pairs
                .into_iter()
                .filter_map(|p| p.trim().split_once('='))
                .map(|(n, v)| json!({"name": n.trim(), "value": v.trim()}))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn query_string(q: &str) -> Vec<Value> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            json!({"name": percent_decode(n), "value": percent_decode(v)})
        })
        .collect()
}

fn status_text(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

fn truncation(b: &Body) -> Option<String> {
    b.truncated.then(|| {
        format!(
            "body cut at the recording cap: {} of {} bytes kept",
            b.kept, b.size
        )
    })
}

fn entry(rec: &Recording, e: &Exchange) -> Value {
    let req_h = &e.request.headers;
    let mut request = json!({
        "method": e.method,
        "url": e.url,
        "httpVersion": e.http_version,
        "cookies": cookies(req_h, "cookie"),
        "headers": headers(req_h),
        "queryString": query_string(&e.query),
        "headersSize": -1,
        "bodySize": e.request.body.as_ref().map_or(0, |b| b.size as i64),
    });
    if let Some(b) = &e.request.body {
        let mut post = json!({
            "mimeType": header(req_h, "content-type").unwrap_or("application/octet-stream"),
            "text": b.text,
        });
        if b.base64 {
            post["encoding"] = "base64".into();
        }
        if let Some(c) = truncation(b) {
            post["comment"] = c.into();
        }
        request["postData"] = post;
    }

    let response = match &e.response {
        Some(r) => {
            let body = r.body.clone().unwrap_or_default();
            let mut content = json!({
                "size": body.size,
                "mimeType": header(&r.headers, "content-type").unwrap_or("x-unknown"),
                "text": body.text,
            });
            if body.base64 {
                content["encoding"] = "base64".into();
            }
            if let Some(c) = truncation(&body) {
                content["comment"] = c.into();
            }
            json!({
                "status": r.status,
                "statusText": status_text(r.status),
                "httpVersion": e.http_version,
                "cookies": cookies(&r.headers, "set-cookie"),
                "headers": headers(&r.headers),
                "content": content,
                "redirectURL": header(&r.headers, "location").unwrap_or(""),
                "headersSize": -1,
                "bodySize": body.size,
            })
        }
        // No response reached the client: HAR still wants one.
        None => json!({
            "status": 0,
            "statusText": "",
            "httpVersion": e.http_version,
            "cookies": [],
            "headers": [],
            "content": {"size": 0, "mimeType": "x-unknown", "text": ""},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
            "comment": format!("no response: {}", e.outcome),
        }),
    };
    let t = &e.timings;
    let mut comment = format!(
        "request {} decision {} rule {} outcome {}",
        e.request_id, e.decision, e.rule, e.outcome
    );
    if e.masked > 0 {
        comment += &format!("; {} value(s) masked in the response", e.masked);
    }
    if !e.approval_id.is_empty() {
        comment += &format!("; approval {} by {}", e.approval_id, e.approver);
    }
    if !e.injected.is_empty() {
        comment += &format!("; injected {}", e.injected.join(", "));
    }
    let ip = rec
        .destination
        .rsplit_once(':')
        .map_or(rec.destination.as_str(), |(ip, _)| ip)
        .trim_start_matches('[')
        .trim_end_matches(']');
    json!({
        "startedDateTime": e.started,
        "time": t.wait_ms + t.receive_ms,
        "request": request,
        "response": response,
        "cache": {},
        "timings": {
            "blocked": -1,
            "dns": -1,
            "connect": -1,
            "ssl": -1,
            "send": 0,
            "wait": t.wait_ms,
            "receive": t.receive_ms,
        },
        "serverIPAddress": ip,
        "connection": rec.id,
        "comment": comment,
    })
}
