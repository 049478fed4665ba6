//! What never goes into a recording: credentials in headers (by name),
//! cookie values, secret-looking query parameters, and any value the
//! gateway injected or redacted, wherever else it shows up (bodies echoing
//! headers, URLs).

/// What a redacted value becomes.
pub const REDACTED: &str = "[REDACTED]";

/// Values shorter than this are redacted in headers but not scrubbed out
/// of bodies and URLs (a short value would hit unrelated bytes).
pub const MIN_SCRUB_LEN: usize = 6;

/// Header names whose values are credentials: exact names, then name
/// fragments (X-Api-Key, X-Auth-Token, X-Session-Id, …).
const NAMES: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "set-cookie2",
    "www-authenticate",
    "proxy-authenticate",
];
const FRAGMENTS: &[&str] = &[
    "auth",
    "token",
    "secret",
    "password",
    "passwd",
    "api-key",
    "apikey",
    "api_key",
    "session",
    "credential",
    "signature",
    "csrf",
    "xsrf",
];

/// Whether a header's value is a credential (case-insensitive name).
pub fn sensitive_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    NAMES.contains(&n.as_str()) || FRAGMENTS.iter().any(|f| n.contains(f))
}

/// A query parameter whose value looks like a credential.
fn sensitive_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(n.as_str(), "key" | "code" | "sig" | "pass" | "pwd")
        || FRAGMENTS.iter().any(|f| n.contains(f))
        || n.ends_with("_key")
        || n.ends_with("-key")
}

/// A header as recorded: `(name, value)` with the value redacted when the
/// name says so; the original value (and, for cookies, each cookie value)
/// is pushed onto `secrets` so it can be scrubbed from everything else.
pub fn header(name: &str, value: &[u8], secrets: &mut Vec<Vec<u8>>) -> (String, String) {
    let lower = name.to_ascii_lowercase();
    let text = String::from_utf8_lossy(value).into_owned();
    if !sensitive_header(&lower) {
        return (lower, text);
    }
    remember(secrets, value);
    let shown = match lower.as_str() {
        "cookie" => cookies(&text, "; ", secrets),
        "set-cookie" | "set-cookie2" => set_cookie(&text, secrets),
        "authorization" | "proxy-authorization" => match text.split_once(' ') {
            // The scheme (Bearer, Basic) is not a secret; what follows is.
            Some((scheme, rest)) if !scheme.is_empty() && !rest.trim().is_empty() => {
                remember(secrets, rest.trim().as_bytes());
                format!("{scheme} {REDACTED}")
            }
            _ => REDACTED.to_string(),
        },
        _ => REDACTED.to_string(),
    };
    (lower, shown)
}

/// `a=1; b=2` → `a=[REDACTED]; b=[REDACTED]`, remembering each value.
fn cookies(text: &str, sep: &str, secrets: &mut Vec<Vec<u8>>) -> String {
    text.split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| match c.split_once('=') {
            Some((n, v)) => {
                remember(secrets, v.trim().trim_matches('"').as_bytes());
                format!("{n}={REDACTED}")
            }
            None => REDACTED.to_string(),
        })
        .collect::<Vec<_>>()
        .join(sep)
}

/// `id=abc; Path=/; HttpOnly` → `id=[REDACTED]; Path=/; HttpOnly`.
fn set_cookie(text: &str, secrets: &mut Vec<Vec<u8>>) -> String {
    let (first, attrs) = match text.split_once(';') {
        Some((f, a)) => (f, Some(a)),
        None => (text, None),
    };
    let first = cookies(first, "; ", secrets);
    match attrs {
        Some(a) => format!("{first};{a}"),
        None => first,
    }
}

/// Keeps `v` for scrubbing (once, and only when long enough to be safe to
/// search for).
pub fn remember(secrets: &mut Vec<Vec<u8>>, v: &[u8]) {
    if v.len() >= MIN_SCRUB_LEN && !secrets.iter().any(|s| s == v) {
        secrets.push(v.to_vec());
    }
}

/// The query string with secret-looking parameter values redacted (the
/// originals are remembered).
pub fn query(q: &str, secrets: &mut Vec<Vec<u8>>) -> String {
    if q.is_empty() {
        return String::new();
    }
    q.split('&')
        .map(|pair| match pair.split_once('=') {
            Some((n, v)) if sensitive_param(&percent_decode(n)) && !v.is_empty() => {
                remember(secrets, v.as_bytes());
                remember(secrets, percent_decode(v).as_bytes());
                format!("{n}={REDACTED}")
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `%XX` and `+` decoded (lossy), for matching names and remembering values.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every occurrence of every secret in `data` replaced by `[REDACTED]`
/// (longest secrets first, so a value and its parts both go).
pub fn scrub_bytes(data: &[u8], secrets: &[Vec<u8>]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut sorted: Vec<&Vec<u8>> = secrets.iter().filter(|s| !s.is_empty()).collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in sorted {
        if out.len() < s.len() {
            continue;
        }
        let mut next = Vec::with_capacity(out.len());
        let mut i = 0;
        let mut hit = false;
        while i < out.len() {
            if out[i..].starts_with(s) {
                next.extend_from_slice(REDACTED.as_bytes());
                i += s.len();
                hit = true;
            } else {
                next.push(out[i]);
                i += 1;
            }
        }
        if hit {
            out = next;
        }
    }
    out
}

/// [`scrub_bytes`] for text.
pub fn scrub(text: &str, secrets: &[Vec<u8>]) -> String {
    if secrets.is_empty() {
        return text.to_string();
    }
    String::from_utf8_lossy(&scrub_bytes(text.as_bytes(), secrets)).into_owned()
}
