//! `gateway sessions list | show ID | export ID --har | prune`: read the
//! recordings directory directly (no daemon needed).

use std::{
    io::Write as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use serde_json::json;

use super::{Recording, days_from_civil, har, store, unix_ms};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Recorded sessions, oldest first.
    List {
        /// Only this identity (its name).
        #[arg(long, value_name = "NAME")]
        identity: Option<String>,
        /// Only sessions started since: a duration ago (`90m`, `2h`, `7d`),
        /// an RFC 3339 time (`2026-11-22T10:00:00Z`) or unix seconds.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Only sessions with this decision (the connection's, or any of
        /// its requests').
        #[arg(long)]
        decision: Option<Decision>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One session: who, where to, the decision and every exchange.
    Show {
        id: String,
        /// The whole recording as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export a session for other tools.
    Export {
        id: String,
        /// As HAR 1.2 (devtools: Network → Import HAR file).
        #[arg(long, required = true)]
        har: bool,
        /// Write here instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Apply retention now (max_age_days, max_total_mb) and say what went.
    Prune,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Decision {
    Allow,
    Block,
    Inspect,
    Approve,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Block => "block",
            Decision::Inspect => "inspect",
            Decision::Approve => "approve",
        }
    }
}

pub fn run(cfg: &Config, cmd: Cmd) -> anyhow::Result<ExitCode> {
    let dir = &cfg.sessions.dir;
    match cmd {
        Cmd::List {
            identity,
            since,
            decision,
            json,
        } => {
            let since = since
                .as_deref()
                .map(|s| parse_since(s, SystemTime::now()))
                .transpose()?;
            let mut out = Vec::new();
            for e in store::scan(dir).with_context(|| format!("reading {}", dir.display()))? {
                let rec = match store::read_file(&e.path) {
                    Ok(r) => r,
                    Err(err) => {
                        eprintln!("gateway: skipping {}: {err:#}", e.path.display());
                        continue;
                    }
                };
                if identity.as_ref().is_some_and(|i| *i != rec.identity)
                    || since.is_some_and(|s| rec.started_unix_ms < s)
                    || decision.is_some_and(|d| !has_decision(&rec, d.as_str()))
                {
                    continue;
                }
                out.push((rec, e.bytes));
            }
            if json {
                let v: Vec<_> = out.iter().map(|(r, b)| summary(r, *b)).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if out.is_empty() {
                println!("no recordings in {}", dir.display());
            } else {
                for (r, _) in &out {
                    println!("{}", line(r));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { id, json } => {
            let rec = store::load(dir, &id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            } else {
                print!("{}", readable(&rec));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Export { id, har: _, output } => {
            let rec = store::load(dir, &id)?;
            let doc = serde_json::to_string_pretty(&har::export(&rec))?;
            match output {
                Some(p) => std::fs::write(&p, doc + "\n")
                    .with_context(|| format!("writing {}", p.display()))?,
                None => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(doc.as_bytes())?;
                    o.write_all(b"\n")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prune => {
            let s = &cfg.sessions;
            let (batches, left) =
                store::prune(dir, s.max_age, s.max_total_bytes, SystemTime::now())
                    .with_context(|| format!("pruning {}", dir.display()))?;
            let mut n = 0;
            for b in &batches {
                b.audit(dir);
                for e in &b.entries {
                    n += 1;
                    println!("removed {} ({} bytes, {})", e.id, e.bytes, b.reason);
                }
            }
            println!(
                "{n} recording(s) removed; {left} bytes left in {} (cap {} bytes, max age {} days)",
                dir.display(),
                s.max_total_bytes,
                s.max_age.as_secs() / 86_400
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn has_decision(r: &Recording, d: &str) -> bool {
    r.decision == d || r.exchanges.iter().any(|e| e.decision == d)
}

fn summary(r: &Recording, bytes: u64) -> serde_json::Value {
    json!({
        "id": r.id,
        "session": r.session,
        "started": r.started,
        "started_unix_ms": r.started_unix_ms,
        "ended": r.ended,
        "duration_ms": r.duration_ms,
        "identity": r.identity,
        "subject": r.subject,
        "cgroup": r.cgroup,
        "pid": r.pid,
        "exe": r.exe,
        "destination": r.destination,
        "host": r.host,
        "decision": r.decision,
        "rule": r.rule,
        "outcome": r.outcome,
        "exchanges": r.exchanges.len() as u64 + r.exchanges_dropped,
        "bytes_up": r.bytes_up,
        "bytes_down": r.bytes_down,
        "file_bytes": bytes,
    })
}

fn line(r: &Recording) -> String {
    format!(
        "{}  {}  {}  {} {} → {}{}  {} ({})  {} exchange(s)  {}",
        r.id,
        r.started,
        if r.identity.is_empty() {
            "-"
        } else {
            &r.identity
        },
        r.exe.rsplit('/').next().unwrap_or(""),
        r.pid,
        r.destination,
        if r.host.is_empty() {
            String::new()
        } else {
            format!(" {}", r.host)
        },
        r.decision,
        r.rule,
        r.exchanges.len() as u64 + r.exchanges_dropped,
        r.outcome
    )
}

/// A body for a terminal: text up to 2 KiB, or its size.
fn show_body(b: &super::Body) -> String {
    if b.base64 {
        return format!(
            "({} bytes, binary{})",
            b.size,
            if b.truncated { ", cut" } else { "" }
        );
    }
    let mut t: String = b.text.chars().take(2048).collect();
    if t.len() < b.text.len() || b.truncated {
        t += &format!(" … ({} of {} bytes recorded)", b.kept, b.size);
    }
    t
}

fn readable(r: &Recording) -> String {
    let mut s = String::new();
    s += &format!("session   {} (daemon session {})\n", r.id, r.session);
    s += &format!(
        "identity  {} ({}) duties [{}] {}\n",
        r.identity,
        r.subject,
        r.duties.join(", "),
        r.identity_source
    );
    s += &format!(
        "process   pid {} uid {} {}  cgroup {}\n",
        r.pid, r.uid, r.exe, r.cgroup
    );
    s += &format!(
        "to        {}{}  from {}\n",
        r.destination,
        if r.host.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.host)
        },
        r.client
    );
    s += &format!("decision  {} (rule {})", r.decision, r.rule);
    if !r.approval_id.is_empty() {
        s += &format!("  approval {} by {}", r.approval_id, r.approver);
    }
    s += "\n";
    s += &format!(
        "time      {} → {} ({} ms)\n",
        r.started, r.ended, r.duration_ms
    );
    s += &format!("bytes     up {} down {}\n", r.bytes_up, r.bytes_down);
    s += &format!("outcome   {}: {}\n", r.outcome, r.reason);
    s += &format!(
        "exchanges {}{}\n",
        r.exchanges.len(),
        if r.exchanges_dropped > 0 {
            format!(" (+{} not recorded)", r.exchanges_dropped)
        } else {
            String::new()
        }
    );
    for e in &r.exchanges {
        s += &format!(
            "\n[{}] {} {} {} {}",
            e.request_id, e.started, e.method, e.url, e.http_version
        );
        match &e.response {
            Some(resp) => s += &format!(" → {}", resp.status),
            None => s += " → no response",
        }
        s += &format!(
            " ({:.1} ms) {} rule {} {}",
            e.timings.total_ms, e.decision, e.rule, e.outcome
        );
        if e.masked > 0 {
            s += &format!(" masked {}", e.masked);
        }
        if !e.approval_id.is_empty() {
            s += &format!(" approval {}", e.approval_id);
        }
        s += "\n";
        for h in &e.request.headers {
            s += &format!("  > {}: {}\n", h.name, h.value);
        }
        if let Some(b) = &e.request.body {
            s += &format!("  > body: {}\n", show_body(b));
        }
        if let Some(resp) = &e.response {
            for h in &resp.headers {
                s += &format!("  < {}: {}\n", h.name, h.value);
            }
            if let Some(b) = &resp.body {
                s += &format!("  < body: {}\n", show_body(b));
            }
        }
    }
    s
}

/// `--since`: `90m`/`2h`/`7d`/`1h30m` ago, RFC 3339, or unix seconds.
/// Returns unix milliseconds.
pub fn parse_since(s: &str, now: SystemTime) -> anyhow::Result<u64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = s.parse()?;
        // Unix seconds; a 13-digit number is milliseconds.
        return Ok(if n >= 100_000_000_000 { n } else { n * 1000 });
    }
    if let Some(d) = parse_duration(s) {
        return Ok(unix_ms(now).saturating_sub(d.as_millis() as u64));
    }
    parse_rfc3339(s).ok_or_else(|| {
        anyhow::anyhow!(
            "--since {s:?}: give a duration (90m, 2h, 7d), an RFC 3339 time (2026-11-22T10:00:00Z) or unix seconds"
        )
    })
}

/// `1h30m`, `90s`, `7d`, `2w`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        any = true;
    }
    (any && num.is_empty()).then(|| Duration::from_secs(total))
}

/// `YYYY-MM-DD[(T| )HH:MM[:SS[.fff]]][Z|±HH:MM]` → unix ms (no zone: UTC).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(i64::from(y), mo, d) * 86_400;
    let mut ms: i64 = 0;
    let mut i = 10;
    if i < b.len() && (b[i] == b'T' || b[i] == b't' || b[i] == b' ') {
        let (h, mi) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
        if b.get(i + 3) != Some(&b':') || h > 23 || mi > 59 {
            return None;
        }
        secs += i64::from(h) * 3600 + i64::from(mi) * 60;
        i += 6;
        if b.get(i) == Some(&b':') {
            let sec = num(i + 1..i + 3)?;
            if sec > 60 {
                return None;
            }
            secs += i64::from(sec);
            i += 3;
            if b.get(i) == Some(&b'.') {
                let start = i + 1;
                let mut end = start;
                while end < b.len() && b[end].is_ascii_digit() {
                    end += 1;
                }
                if end == start {
                    return None;
                }
                let frac = &s[start..end.min(start + 3)];
                ms = format!("{frac:0<3}").parse().ok()?;
                i = end;
            }
        }
    }
    match b.get(i) {
        None => {}
        Some(b'Z' | b'z') if i + 1 == b.len() => {}
        Some(&sign @ (b'+' | b'-')) if b.len() == i + 6 && b[i + 3] == b':' => {
            let off = i64::from(num(i + 1..i + 3)?) * 3600 + i64::from(num(i + 4..i + 6)?) * 60;
            secs -= if sign == b'+' { off } else { -off };
        }
        _ => return None,
    }
    u64::try_from(secs * 1000 + ms).ok()
}
