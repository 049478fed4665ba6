//! Where audit events go: a tracing layer turns every `gateway::audit`
//! event into one chained journald entry; while journald is unreachable the
//! entries wait in `<state_dir>/audit/spool.jsonl` and a background thread
//! delivers them, in order, once it answers again, followed by an
//! `audit_spooled` event saying what happened.

use std::{
    fs::File,
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing_subscriber::{Layer, layer::Context};

use super::{
    chain::{self, Chain},
    journal::{JournalSocket, valid_field_name},
};
use crate::config::{self, JournalMode};

/// The target of audit events.
pub const TARGET: &str = "gateway::audit";
/// `SYSLOG_IDENTIFIER` of audit entries.
pub const IDENTIFIER: &str = "gateway-audit";
/// A value longer than this is cut (and says so). journalctl's JSON output
/// shows fields of 4096 bytes and more as `null` unless `--all`, so values
/// stay below that and a plain `journalctl -o json` export still verifies.
pub const VALUE_CAP: usize = 4000;
/// All values of one entry together stay below this.
pub const ENTRY_CAP: usize = 64 * 1024;
/// How often the spool is retried.
const RETRY: Duration = Duration::from_secs(1);

/// Fields every connection and HTTP entry carries, empty when the event
/// has no value for them (PRODUCT.md's list).
pub const DOCUMENTED: &[&str] = &[
    "event",
    "session",
    "identity",
    "subject",
    "duties",
    "cgroup",
    "pid",
    "exe",
    "orig_dst",
    "host",
    "method",
    "path",
    "status",
    "decision",
    "rule",
    "reason",
    "approval_id",
    "approver",
    "bytes_up",
    "bytes_down",
    "masked",
    "duration_ms",
];

static SINK: OnceLock<Arc<Sink>> = OnceLock::new();
static STDERR: AtomicBool = AtomicBool::new(true);

/// The tracing layer: hands audit events to the sink once it is started.
pub struct JournalLayer;

impl<S: tracing::Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let Some(sink) = SINK.get() else { return };
        let mut v = Collect::default();
        event.record(&mut v);
        sink.record(v.0);
    }
}

/// Whether the operational log (stdout/stderr) shows audit events.
pub fn log_shows(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() != TARGET || STDERR.load(Ordering::Relaxed)
}

/// Event fields as strings, in the order they were written.
#[derive(Default)]
struct Collect(Vec<(String, String)>);

impl Visit for Collect {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
}

/// `GATEWAY_<NAME>`: uppercased, anything outside `A-Z0-9_` becomes `_`;
/// names the chain uses for itself get an `X_` in front.
pub fn field_name(name: &str) -> String {
    let mut n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if matches!(n.as_str(), "SEQ" | "PREV_HASH" | "HASH") {
        n.insert_str(0, "X_");
    }
    let mut full = format!("{}{n}", chain::PREFIX);
    full.truncate(64);
    debug_assert!(valid_field_name(&full), "{full}");
    full
}

/// Cuts `value` to `cap` bytes (on a character boundary), saying so.
pub fn cap_value(value: &mut String, cap: usize) {
    if value.len() <= cap {
        return;
    }
    let total = value.len();
    let marker = format!("…[truncated, {total} bytes]");
    let mut end = cap.saturating_sub(marker.len());
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value.truncate(end);
    value.push_str(&marker);
}

/// The journal entry of an audit event, without the chain fields.
pub fn entry(event_fields: Vec<(String, String)>, now: SystemTime) -> Vec<(String, String)> {
    let mut gw: Vec<(String, String)> = Vec::with_capacity(event_fields.len() + 8);
    let mut message = String::new();
    for (name, value) in event_fields {
        if name == "message" {
            message = value.clone();
        }
        gw.push((field_name(&name), value));
    }
    let event = gw
        .iter()
        .find(|(k, _)| k == "GATEWAY_EVENT")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if matches!(event.as_str(), "connection" | "http" | "websocket") {
        for name in DOCUMENTED {
            let full = field_name(name);
            if !gw.iter().any(|(k, _)| *k == full) {
                gw.push((full, String::new()));
            }
        }
    }
    for (_, v) in gw.iter_mut() {
        cap_value(v, VALUE_CAP);
    }
    // The whole entry stays bounded: the longest values are cut further.
    while gw.iter().map(|(_, v)| v.len()).sum::<usize>() > ENTRY_CAP {
        let Some((_, v)) = gw.iter_mut().max_by_key(|(_, v)| v.len()) else {
            break;
        };
        let cap = v.len() / 2;
        cap_value(v, cap.max(64));
        if v.len() <= 64 {
            break;
        }
    }
    let mut summary = summary(&event, &gw, &message);
    cap_value(&mut summary, VALUE_CAP);
    let usec = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let mut fields = vec![
        ("SYSLOG_IDENTIFIER".to_string(), IDENTIFIER.to_string()),
        ("MESSAGE".to_string(), summary),
        ("PRIORITY".to_string(), "6".to_string()),
        ("SOURCE_REALTIME_TIMESTAMP".to_string(), usec.to_string()),
    ];
    fields.extend(gw);
    fields
}

/// A readable one-line summary for `MESSAGE`.
fn summary(event: &str, gw: &[(String, String)], message: &str) -> String {
    let get = |k: &str| {
        gw.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    let mut s = if event.is_empty() {
        "audit".to_string()
    } else {
        event.to_string()
    };
    let identity = get("GATEWAY_IDENTITY");
    if !identity.is_empty() {
        s += &format!(" {identity}");
    }
    let method = get("GATEWAY_METHOD");
    let host = get("GATEWAY_HOST");
    let path = get("GATEWAY_PATH");
    let dst = get("GATEWAY_ORIG_DST");
    if !method.is_empty() {
        s += &format!(" {method} {host}{path}");
    } else if !host.is_empty() {
        s += &format!(" {host}");
    }
    if !dst.is_empty() {
        s += &format!(" ({dst})");
    }
    for (label, key) in [
        ("decision", "GATEWAY_DECISION"),
        ("rule", "GATEWAY_RULE"),
        ("status", "GATEWAY_STATUS"),
        ("outcome", "GATEWAY_OUTCOME"),
        ("reason", "GATEWAY_REASON"),
    ] {
        let v = get(key);
        if !v.is_empty() && v != "0" {
            s += &format!(" {label}={v}");
        }
    }
    if !message.is_empty() {
        s += &format!(": {message}");
    }
    s.replace('\n', " ")
}

/// One spooled entry: the whole journal entry as it will be sent.
#[derive(Debug, Serialize, Deserialize)]
struct Spooled {
    /// When the event happened (µs since the epoch).
    ts: u64,
    seq: u64,
    fields: Vec<(String, String)>,
}

/// What the current outage has spooled so far.
#[derive(Debug, Default)]
struct Outage {
    spooled: u64,
    dropped: u64,
    unreadable: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    dropped_first: Option<u64>,
    dropped_last: Option<u64>,
    /// µs since the epoch of the first entry that could not be delivered.
    since: Option<u64>,
    why: String,
}

#[derive(Debug)]
struct Inner {
    chain: Chain,
    journal: JournalSocket,
    spool_path: PathBuf,
    spool: File,
    spool_bytes: u64,
    spool_max: u64,
    /// Some while entries wait in the spool (or were dropped).
    outage: Option<Outage>,
}

/// The audit sink of this process.
#[derive(Debug)]
pub struct Sink {
    inner: Mutex<Inner>,
}

/// `<state_dir>/audit`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("audit")
}

/// Sets up audit delivery for `gateway run`: journald per `[audit]`, the
/// chain and the spool in the state directory. Call once, before anything
/// is audited.
pub fn start(cfg: &config::Audit, state_dir: &Path) -> anyhow::Result<()> {
    STDERR.store(cfg.stderr, Ordering::Relaxed);
    let use_journal = match cfg.journal {
        JournalMode::Off => false,
        JournalMode::On => true,
        JournalMode::Auto => cfg.journal_socket.exists(),
    };
    if !use_journal {
        if cfg.stderr {
            tracing::info!(
                event = "audit_sink",
                journal = false,
                socket = %cfg.journal_socket.display(),
                "audit events go to the log only (journal {:?}; socket {})",
                cfg.journal,
                if cfg.journal_socket.exists() { "present" } else { "absent" }
            );
        } else {
            tracing::warn!(
                event = "audit_sink",
                journal = false,
                "audit events go nowhere: [audit] journal is off and stderr = false"
            );
        }
        return Ok(());
    }
    let dir = dir(state_dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the audit directory {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    let chain = Chain::open(&dir.join("chain"))?;
    let journal = JournalSocket::new(&cfg.journal_socket)
        .context("creating a socket for journald's native protocol")?;
    let spool_path = dir.join("spool.jsonl");
    let (outage, bytes) = scan_spool(&spool_path)?;
    let spool = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spool_path)
        .with_context(|| format!("opening the audit spool {}", spool_path.display()))?;
    tracing::info!(
        event = "audit_sink",
        journal = true,
        socket = %cfg.journal_socket.display(),
        chain_seq = chain.seq(),
        spooled = outage.as_ref().map_or(0, |o| o.spooled),
        "audit events go to journald as {IDENTIFIER}"
    );
    let sink = Arc::new(Sink {
        inner: Mutex::new(Inner {
            chain,
            journal,
            spool_path,
            spool,
            spool_bytes: bytes,
            spool_max: cfg.spool_max_bytes,
            outage,
        }),
    });
    if SINK.set(sink.clone()).is_err() {
        anyhow::bail!("the audit sink was started twice");
    }
    std::thread::Builder::new()
        .name("audit-spool".into())
        .spawn(move || {
            loop {
                sink.retry();
                std::thread::sleep(RETRY);
            }
        })
        .context("starting the audit spool thread")?;
    Ok(())
}

/// The spool left by an earlier run: its outage and size.
fn scan_spool(path: &Path) -> anyhow::Result<(Option<Outage>, u64)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, 0)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut o = Outage {
        why: "journald was unreachable before the daemon restarted".into(),
        ..Outage::default()
    };
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Spooled>(&line) {
            Ok(s) => o.add(&s),
            Err(_) => o.unreadable += 1,
        }
    }
    Ok(((o.spooled > 0 || o.unreadable > 0).then_some(o), bytes))
}

impl Outage {
    fn add(&mut self, s: &Spooled) {
        self.spooled += 1;
        self.first_seq.get_or_insert(s.seq);
        self.last_seq = Some(s.seq);
        self.since.get_or_insert(s.ts);
    }
}

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Sink {
    /// Chains one event and delivers it (or spools it).
    fn record(&self, event_fields: Vec<(String, String)>) {
        let now = SystemTime::now();
        let mut fields = entry(event_fields, now);
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let seq = match inner.chain.link(&mut fields) {
            Ok(seq) => seq,
            Err(e) => {
                // Cannot persist the head: deliver anyway (a restart would
                // show the break), and say so on the operational log.
                eprintln!("gateway: audit chain: {e:#}");
                inner.chain.seq()
            }
        };
        let ts = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        if inner.outage.is_none() {
            match inner.journal.send(&fields) {
                Ok(()) => return,
                Err(e) => {
                    inner.outage = Some(Outage {
                        since: Some(ts),
                        why: e.to_string(),
                        ..Outage::default()
                    });
                }
            }
        }
        inner.spool(Spooled { ts, seq, fields });
    }

    /// Delivers the spool if journald answers; then audits the outage.
    fn retry(&self) {
        let done = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            if inner.outage.is_none() {
                return;
            }
            match inner.flush() {
                Ok(true) => inner.outage.take(),
                Ok(false) => None,
                Err(e) => {
                    eprintln!("gateway: audit spool: {e:#}");
                    None
                }
            }
        };
        if let Some(o) = done {
            let now = now_usec();
            let since = o.since.unwrap_or(now);
            let range = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => format!("{a}..{b}"),
                _ => String::new(),
            };
            tracing::info!(
                target: TARGET,
                event = "audit_spooled",
                spooled = o.spooled,
                spooled_seqs = %range(o.first_seq, o.last_seq),
                dropped = o.dropped,
                dropped_seqs = %range(o.dropped_first, o.dropped_last),
                unreadable = o.unreadable,
                unreachable_since_usec = since,
                unreachable_ms = now.saturating_sub(since) / 1000,
                reason = %o.why,
                "journald was unreachable; {} audit records were spooled and are now delivered{}",
                o.spooled,
                if o.dropped > 0 {
                    format!(", {} were dropped (the spool was full)", o.dropped)
                } else {
                    String::new()
                }
            );
        }
    }
}

impl Inner {
    fn spool(&mut self, s: Spooled) {
        let seq = s.seq;
        let mut line = serde_json::to_vec(&s).unwrap_or_default();
        line.push(b'\n');
        let o = self.outage.get_or_insert_with(Outage::default);
        if self.spool_bytes + line.len() as u64 > self.spool_max {
            o.dropped += 1;
            o.dropped_first.get_or_insert(seq);
            o.dropped_last = Some(seq);
            return;
        }
        match self.spool.write_all(&line) {
            Ok(()) => {
                self.spool_bytes += line.len() as u64;
                o.add(&s);
            }
            Err(e) => {
                eprintln!(
                    "gateway: audit spool {}: {e}; record seq {seq} dropped",
                    self.spool_path.display()
                );
                o.dropped += 1;
                o.dropped_first.get_or_insert(seq);
                o.dropped_last = Some(seq);
            }
        }
    }

    /// Sends the spool in order. `Ok(true)`: all delivered (the spool is
    /// empty again); `Ok(false)`: journald is still away (what was sent is
    /// removed from the spool).
    fn flush(&mut self) -> anyhow::Result<bool> {
        let data = std::fs::read(&self.spool_path)
            .with_context(|| format!("reading {}", self.spool_path.display()))?;
        let mut sent = 0usize;
        for line in data.split_inclusive(|b| *b == b'\n') {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            if !body.is_empty()
                && let Ok(s) = serde_json::from_slice::<Spooled>(body)
                && let Err(e) = self.journal.send(&s.fields)
            {
                if let Some(o) = self.outage.as_mut() {
                    o.why = e.to_string();
                }
                break;
            }
            sent += line.len();
        }
        if sent == 0 && !data.is_empty() {
            return Ok(false);
        }
        if data.is_empty() {
            // Only drops to report: wait until journald is back.
            if let Err(e) = self.journal.reachable() {
                if let Some(o) = self.outage.as_mut() {
                    o.why = e.to_string();
                }
                return Ok(false);
            }
        }
        let rest = &data[sent..];
        // Rewrite the spool with what is left (nothing, usually).
        let tmp = self.spool_path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, rest).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.spool_path)
            .with_context(|| format!("replacing {}", self.spool_path.display()))?;
        self.spool = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.spool_path)
            .with_context(|| format!("reopening {}", self.spool_path.display()))?;
        self.spool_bytes = rest.len() as u64;
        Ok(rest.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_prefixed_uppercased_and_valid() {
        assert_eq!(field_name("bytes_up"), "GATEWAY_BYTES_UP");
        assert_eq!(field_name("approval-id.x"), "GATEWAY_APPROVAL_ID_X");
        assert_eq!(field_name("seq"), "GATEWAY_X_SEQ");
        assert_eq!(field_name("hash"), "GATEWAY_X_HASH");
        assert_eq!(field_name(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn long_values_are_cut_and_marked() {
        let mut v = "é".repeat(5000);
        cap_value(&mut v, VALUE_CAP);
        assert!(v.len() <= VALUE_CAP, "{}", v.len());
        assert!(
            v.ends_with("…[truncated, 10000 bytes]"),
            "{}",
            &v[v.len() - 40..]
        );
        let mut short = "abc".to_string();
        cap_value(&mut short, 10);
        assert_eq!(short, "abc");
    }

    #[test]
    fn connection_entries_carry_every_documented_field() {
        let fields = entry(
            vec![
                ("event".into(), "connection".into()),
                ("identity".into(), "t1".into()),
                ("decision".into(), "allow".into()),
                ("path".into(), "x".repeat(10_000)),
            ],
            SystemTime::now(),
        );
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some(IDENTIFIER));
        assert_eq!(get("PRIORITY"), Some("6"));
        for name in DOCUMENTED {
            assert!(get(&field_name(name)).is_some(), "{name} missing");
        }
        assert_eq!(get("GATEWAY_METHOD"), Some(""));
        assert!(get("GATEWAY_PATH").unwrap().len() <= VALUE_CAP);
        let msg = get("MESSAGE").unwrap();
        assert!(msg.starts_with("connection t1"), "{msg}");
        assert!(msg.contains("decision=allow"), "{msg}");
        for (k, _) in &fields {
            assert!(valid_field_name(k), "{k}");
        }
    }

    #[test]
    fn an_entry_stays_bounded_whatever_its_fields() {
        let many: Vec<(String, String)> = (0..100)
            .map(|i| (format!("f{i}"), "y".repeat(3000)))
            .collect();
        let fields = entry(many, SystemTime::now());
        let total: usize = fields.iter().map(|(_, v)| v.len()).sum();
        assert!(total <= ENTRY_CAP + 8 * 1024, "{total}");
    }
}
