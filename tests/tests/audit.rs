//! Issue 6, journald: audit events reach a real systemd-journald (one the
//! test starts, in its own journal namespace) through the native protocol,
//! as `SYSLOG_IDENTIFIER=gateway-audit` entries with every documented
//! `GATEWAY_*` field, chained for tamper evidence; `gateway audit verify`
//! checks the chain and names what was altered or removed; secrets never
//! reach the journal; and while journald is down nothing is lost.
//!
//! Traffic is real: curl started through `gateway exec` in the identity's
//! cgroup, to `gw-origin` in a network namespace of the test's own.

use gateway_tests::daemon::{is_event, text};
use gateway_tests::journal::Journal;
use gateway_tests::oidc::{AUDIENCE, OidcProvider, Options};
use gateway_tests::web::{WebOptions, WebOrigin};
use gateway_tests::{Config, Daemon, Rule, TestNet, poll, require_root};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Spliced at L4 (no rule reads its requests).
const PLAIN: &str = "plain.test";
/// Intercepted: deletes are blocked.
const API: &str = "api.test";
/// Intercepted: the credential is injected.
const PARTNER: &str = "partner.test";

const SECRET: &str = "Bearer s3cr3t-audit-token-51d0c4";
const COOKIE: &str = "c00kie-value-8e2b7a";

/// The fields PRODUCT.md documents for connection and HTTP entries, plus
/// the chain.
const DOCUMENTED: &[&str] = &[
    "GATEWAY_EVENT",
    "GATEWAY_SESSION",
    "GATEWAY_IDENTITY",
    "GATEWAY_SUBJECT",
    "GATEWAY_DUTIES",
    "GATEWAY_CGROUP",
    "GATEWAY_PID",
    "GATEWAY_EXE",
    "GATEWAY_ORIG_DST",
    "GATEWAY_HOST",
    "GATEWAY_METHOD",
    "GATEWAY_PATH",
    "GATEWAY_STATUS",
    "GATEWAY_DECISION",
    "GATEWAY_RULE",
    "GATEWAY_REASON",
    "GATEWAY_APPROVAL_ID",
    "GATEWAY_APPROVER",
    "GATEWAY_BYTES_UP",
    "GATEWAY_BYTES_DOWN",
    "GATEWAY_MASKED",
    "GATEWAY_DURATION_MS",
    "GATEWAY_SEQ",
    "GATEWAY_PREV_HASH",
    "GATEWAY_HASH",
];

fn origin_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gw-origin"))
}

/// One test's world; drops in order: daemon, origin, net, journal.
struct World {
    daemon: Daemon,
    origin: WebOrigin,
    net: TestNet,
    journal: Journal,
}

impl World {
    fn new() -> World {
        World::with(|c| c)
    }

    fn with(extra: impl FnOnce(Config) -> Config) -> World {
        require_root();
        let journal = Journal::start();
        let net = TestNet::new();
        let origin = WebOrigin::start(
            &net,
            WebOptions::new(origin_bin()).names(&[PLAIN, API, PARTNER]),
        );
        let cfg = Config::new()
            .journal(journal.socket())
            .secret_value("partner-token", &format!("{SECRET}\n"))
            .rule(Rule {
                hosts: vec![API.into()],
                methods: vec!["DELETE".into()],
                ..Rule::new("no-deletes", "block")
            })
            .rule(Rule {
                hosts: vec![PARTNER.into()],
                inject: Some(("Authorization".into(), "partner-token".into())),
                ..Rule::new("partner-credential", "allow")
            });
        let daemon = Daemon::start(extra(cfg));
        World {
            daemon,
            origin,
            net,
            journal,
        }
    }

    /// curl through the gateway, names pinned to the origin.
    fn curl(&self, args: &[&str]) -> Output {
        let ip = self.net.ns_v4().to_string();
        let mut full: Vec<String> = vec!["-sS".into(), "--max-time".into(), "20".into()];
        for host in [PLAIN, API, PARTNER] {
            full.push("--resolve".into());
            full.push(format!("{host}:80:{ip}"));
        }
        full.extend(args.iter().map(|s| s.to_string()));
        self.daemon
            .exec("t1", "curl", &full)
            .output()
            .expect("run curl through gateway exec")
    }

    fn get_ok(&self, url: &str) {
        let out = self.curl(&["-o", "/dev/null", "-w", "%{http_code}", url]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "GET {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spool(&self) -> PathBuf {
        self.daemon
            .config()
            .state_dir
            .join("audit")
            .join("spool.jsonl")
    }

    /// `gateway audit verify <args>` with the daemon's config.
    fn verify(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .daemon
            .gateway("audit")
            .arg("verify")
            .args(args)
            .output()
            .expect("run gateway audit verify");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), all)
    }
}

fn field(v: &Value, name: &str) -> String {
    text(v, name)
}

fn seq(v: &Value) -> u64 {
    field(v, "GATEWAY_SEQ")
        .parse()
        .unwrap_or_else(|_| panic!("entry without a numeric GATEWAY_SEQ: {v}"))
}

fn has_all_documented(v: &Value) {
    for name in DOCUMENTED {
        assert!(
            v.get(*name).is_some(),
            "{name} missing from the journal entry {v:#}"
        );
    }
    assert_eq!(field(v, "SYSLOG_IDENTIFIER"), "gateway-audit");
    assert_eq!(field(v, "PRIORITY"), "6");
    assert!(!field(v, "MESSAGE").is_empty(), "{v}");
    assert_eq!(field(v, "GATEWAY_HASH").len(), 64, "{v}");
    assert_eq!(field(v, "GATEWAY_PREV_HASH").len(), 64, "{v}");
}

fn is_request(v: &Value, method: &str, host: &str) -> bool {
    v["GATEWAY_EVENT"] == "http" && v["GATEWAY_METHOD"] == method && v["GATEWAY_HOST"] == host
}

#[test]
fn traffic_yields_journal_entries_with_every_documented_field() {
    let w = World::new();
    w.get_ok(&format!("http://{PLAIN}/echo"));
    let del = w.curl(&["-X", "DELETE", "-i", &format!("http://{API}/v1/items/9")]);
    let body = String::from_utf8_lossy(&del.stdout);
    assert!(body.starts_with("HTTP/1.1 403"), "{body}");

    let conn = w.journal.wait_entries(
        1,
        |v| v["GATEWAY_EVENT"] == "connection" && v["GATEWAY_HOST"] == PLAIN,
        WAIT,
    );
    let c = &conn[0];
    has_all_documented(c);
    assert_eq!(field(c, "GATEWAY_IDENTITY"), "t1");
    assert_eq!(field(c, "GATEWAY_SUBJECT"), "t1@localhost");
    assert_eq!(field(c, "GATEWAY_DUTIES"), "tester");
    assert_eq!(field(c, "GATEWAY_DECISION"), "allow");
    assert!(field(c, "GATEWAY_EXE").ends_with("curl"), "{c}");
    assert!(field(c, "GATEWAY_PID").parse::<u32>().unwrap() > 0, "{c}");
    let cg = format!("/{}", w.daemon.config().identities[0].cgroups[0]);
    assert!(field(c, "GATEWAY_CGROUP").starts_with(&cg), "{c}");
    assert!(
        field(c, "GATEWAY_ORIG_DST").ends_with(":80"),
        "{}",
        field(c, "GATEWAY_ORIG_DST")
    );
    assert!(
        field(c, "GATEWAY_BYTES_DOWN").parse::<u64>().unwrap() > 0,
        "{c}"
    );

    let req = w
        .journal
        .wait_entries(1, |v| is_request(v, "DELETE", API), WAIT);
    let r = &req[0];
    has_all_documented(r);
    assert_eq!(field(r, "GATEWAY_DECISION"), "block");
    assert_eq!(field(r, "GATEWAY_RULE"), "no-deletes");
    assert_eq!(field(r, "GATEWAY_STATUS"), "403");
    assert_eq!(field(r, "GATEWAY_PATH"), "/v1/items/9");
    assert!(
        field(r, "MESSAGE").contains("DELETE api.test/v1/items/9"),
        "{}",
        field(r, "MESSAGE")
    );

    // The same events are still on the operational log (stdout).
    w.daemon
        .wait_event(|v| is_event(v, "http") && v["method"] == "DELETE", WAIT);
    // Only audit events are under gateway-audit, every one chained; the
    // daemon's operational lines are not in it.
    let entries = w.journal.entries();
    for e in &entries {
        seq(e);
        let ev = field(e, "GATEWAY_EVENT");
        assert!(
            !["ready", "config_loaded", "attached", "audit_sink", ""].contains(&ev.as_str()),
            "an operational line is under gateway-audit: {e}"
        );
    }
    for e in w.journal.all_entries() {
        if field(&e, "SYSLOG_IDENTIFIER") != "gateway-audit" {
            assert!(e.get("GATEWAY_EVENT").is_none(), "{e}");
        }
    }
    let mut seqs: Vec<u64> = entries.iter().map(seq).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn with_stderr_off_audit_events_go_to_the_journal_only() {
    let w = World::with(|c| c.audit_stderr(false));
    w.get_ok(&format!("http://{PLAIN}/echo"));
    w.journal.wait_entries(
        1,
        |v| v["GATEWAY_EVENT"] == "connection" && v["GATEWAY_HOST"] == PLAIN,
        WAIT,
    );
    let log = w.daemon.events();
    assert!(log.iter().any(|v| is_event(v, "ready")));
    assert!(
        !log.iter().any(|v| is_event(v, "connection")),
        "an audit event is on the operational log: {log:?}"
    );
}

#[test]
fn secrets_and_cookies_never_reach_the_journal() {
    let w = World::new();
    let out = w.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Cookie: session={COOKIE}"),
        &format!("http://{PARTNER}/echo?probe=1"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    // The origin got the injected credential and the cookie…
    let req = w.origin.wait_request(|r| r["path"] == "/echo", WAIT);
    assert_eq!(req["headers"]["authorization"][0], SECRET, "{req}");
    assert!(req.to_string().contains(COOKIE), "{req}");
    // …the journal names the injection, never the values.
    let e = w
        .journal
        .wait_entries(1, |v| is_request(v, "GET", PARTNER), WAIT);
    assert_eq!(
        field(&e[0], "GATEWAY_INJECTED"),
        "authorization<-partner-token"
    );
    w.journal.wait_entries(
        1,
        |v| v["GATEWAY_EVENT"] == "connection" && v["GATEWAY_HOST"] == PARTNER,
        WAIT,
    );

    let exported = serde_json::to_string(&w.journal.all_entries()).unwrap();
    let raw = w.journal.raw_bytes();
    // The search works: what the audit does record is in the raw files.
    assert!(contains(&raw, PARTNER.as_bytes()), "no journal files found");
    assert!(contains(&raw, b"authorization<-partner-token"));
    for needle in [SECRET, "s3cr3t-audit-token", COOKIE] {
        assert!(
            !exported.contains(needle),
            "{needle:?} is in journalctl's output"
        );
        assert!(
            !contains(&raw, needle.as_bytes()),
            "{needle:?} is in the raw journal files"
        );
    }
}

#[test]
fn an_enrolled_job_token_never_reaches_the_journal() {
    require_root();
    let provider = OidcProvider::start(&[], Options::default());
    let w = World::with(|c| {
        c.trusted_issuer(provider.issuer(), &[AUDIENCE])
            .enrolled_identity("jobs", &[])
    });
    let job = w
        .daemon
        .identity_cgroup("jobs")
        .join(gateway_tests::unique("job"));
    std::fs::create_dir(&job).unwrap();
    let rel = job
        .strip_prefix(gateway_tests::cgroup2_mount())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let token = provider.mint_job_token(AUDIENCE, "acme/shop", 300);
    let file = w.daemon.config().dir().join("job-token");
    std::fs::write(&file, &token).unwrap();
    let out = w.daemon.enroll(&rel, &file).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // A token of the wrong audience is refused, and audited too.
    let wrong = provider.mint_job_token("https://elsewhere.test", "acme/shop", 300);
    let wrong_file = w.daemon.config().dir().join("wrong-token");
    std::fs::write(&wrong_file, &wrong).unwrap();
    let out = w.daemon.enroll(&rel, &wrong_file).output().unwrap();
    assert!(!out.status.success(), "{out:?}");

    let events = w
        .journal
        .wait_entries(2, |v| v["GATEWAY_EVENT"] == "enroll", WAIT);
    assert!(
        events
            .iter()
            .any(|e| field(e, "GATEWAY_OUTCOME") == "enrolled"),
        "{events:?}"
    );
    let exported = serde_json::to_string(&w.journal.all_entries()).unwrap();
    let raw = w.journal.raw_bytes();
    assert!(contains(&raw, rel.as_bytes()), "no journal files found");
    for t in [&token, &wrong] {
        // The whole token, and its signature alone.
        let sig = t.rsplit('.').next().unwrap();
        for needle in [t.as_str(), sig] {
            assert!(
                !exported.contains(needle),
                "a job token is in journalctl's output"
            );
            assert!(
                !contains(&raw, needle.as_bytes()),
                "a job token is in the raw journal files"
            );
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn verify_passes_on_the_trail_and_names_altered_and_removed_records() {
    let mut w = World::new();
    w.get_ok(&format!("http://{PLAIN}/echo"));
    let del = w.curl(&["-X", "DELETE", &format!("http://{API}/v1/items/1")]);
    assert!(del.status.success());
    // A restart continues the chain: no gap.
    w.daemon.terminate();
    w.daemon.start_again();
    w.get_ok(&format!("http://{PLAIN}/echo?after=restart"));
    // Two connections before the restart, one after.
    w.journal
        .wait_entries(3, |v| v["GATEWAY_EVENT"] == "connection", WAIT);
    let ns = w.journal.namespace().to_string();
    let (ok, out) = w.verify(&["--namespace", &ns]);
    assert!(ok, "verify failed on an untouched trail:\n{out}");
    assert!(out.starts_with("OK: "), "{out}");

    // Export, alter one field of one record.
    let export = w.journal.export();
    let lines: Vec<&str> = export.lines().collect();
    assert!(lines.len() >= 4, "{export}");
    let dir = w.daemon.config().dir().to_path_buf();
    let target = lines
        .iter()
        .position(|l| l.contains("\"GATEWAY_STATUS\":\"403\""))
        .expect("the blocked DELETE is in the export");
    let target_seq = seq(&serde_json::from_str(lines[target]).unwrap());
    let mut altered: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    altered[target] =
        altered[target].replace("\"GATEWAY_STATUS\":\"403\"", "\"GATEWAY_STATUS\":\"200\"");
    let f = dir.join("altered.json");
    std::fs::write(&f, altered.join("\n")).unwrap();
    let (ok, out) = w.verify(&["--file", f.to_str().unwrap()]);
    assert!(!ok, "an altered record passed:\n{out}");
    assert!(
        out.contains(&format!("record seq {target_seq} (cursor")) && out.contains("was altered"),
        "{out}"
    );

    // Remove one record in the middle.
    let mut by_seq: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| (seq(&serde_json::from_str(l).unwrap()), *l))
        .collect();
    by_seq.sort();
    let (gone, _) = by_seq[1];
    let kept: Vec<&str> = by_seq
        .iter()
        .filter(|(s, _)| *s != gone)
        .map(|(_, l)| *l)
        .collect();
    let f = dir.join("removed.json");
    std::fs::write(&f, kept.join("\n")).unwrap();
    let (ok, out) = w.verify(&["--file", f.to_str().unwrap(), "--json"]);
    assert!(!ok, "a removed record passed:\n{out}");
    let report: Value = serde_json::from_str(out.trim()).expect("--json prints JSON");
    assert_eq!(report["ok"], false);
    assert_eq!(report["problems"][0]["kind"], "gap", "{report}");
    assert_eq!(report["problems"][0]["from"], gone, "{report}");
    let (_, text_out) = w.verify(&["--file", f.to_str().unwrap()]);
    assert!(
        text_out.contains(&format!(
            "record {gone} is missing: the chain jumps from seq {} to {}",
            gone - 1,
            gone + 1
        )),
        "{text_out}"
    );
}

#[test]
fn journald_down_mid_run_spools_and_delivers_when_back() {
    let mut w = World::new();
    w.get_ok(&format!("http://{PLAIN}/echo?before=1"));
    w.journal.wait_entries(
        1,
        |v| v["GATEWAY_EVENT"] == "connection" && v["GATEWAY_HOST"] == PLAIN,
        WAIT,
    );

    w.journal.stop();
    w.get_ok(&format!("http://{PLAIN}/echo?during=1"));
    let del = w.curl(&["-X", "DELETE", &format!("http://{API}/v1/items/2")]);
    assert!(del.status.success());
    w.daemon
        .wait_event(|v| is_event(v, "http") && v["method"] == "DELETE", WAIT);
    // Spooled, not lost.
    let spool = w.spool();
    let spooled: Vec<Value> = poll(WAIT, || {
        let lines: Vec<Value> = std::fs::read_to_string(&spool)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let has_delete = lines
            .iter()
            .any(|l| l.to_string().contains("\"GATEWAY_METHOD\",\"DELETE\""));
        has_delete.then_some(lines)
    })
    .unwrap_or_else(|| panic!("the DELETE was not spooled in {}", spool.display()));
    let seqs: Vec<u64> = spooled.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(!seqs.is_empty());

    w.journal.start_again();
    // Every spooled record arrives with its seq, then the outage is audited.
    let notice = w
        .journal
        .wait_entries(1, |v| v["GATEWAY_EVENT"] == "audit_spooled", WAIT);
    let n = &notice[0];
    let count: u64 = field(n, "GATEWAY_SPOOLED").parse().unwrap();
    assert!(count >= seqs.len() as u64, "{n}");
    assert_eq!(field(n, "GATEWAY_DROPPED"), "0", "{n}");
    assert!(
        field(n, "GATEWAY_SPOOLED_SEQS").starts_with(&format!("{}..", seqs[0])),
        "{n}"
    );
    assert!(
        field(n, "GATEWAY_UNREACHABLE_MS").parse::<u64>().is_ok(),
        "{n}"
    );
    let entries = w.journal.entries();
    for s in &seqs {
        assert!(
            entries.iter().any(|e| seq(e) == *s),
            "spooled record seq {s} never reached the journal"
        );
    }
    assert!(entries.iter().any(|e| is_request(e, "DELETE", API)));
    assert!(seq(n) > *seqs.last().unwrap());
    assert_eq!(
        std::fs::metadata(&spool).map(|m| m.len()).unwrap_or(0),
        0,
        "the spool is emptied once delivered"
    );
    w.daemon.wait_event(|v| is_event(v, "audit_spooled"), WAIT);

    let ns = w.journal.namespace().to_string();
    let (ok, out) = w.verify(&["--namespace", &ns]);
    assert!(ok, "the trail does not verify after the outage:\n{out}");
}

#[test]
fn a_spool_left_by_a_stopped_daemon_is_delivered_after_the_next_start() {
    let mut w = World::new();
    w.get_ok(&format!("http://{PLAIN}/echo?before=1"));
    w.journal
        .wait_entries(1, |v| v["GATEWAY_EVENT"] == "connection", WAIT);
    w.journal.stop();
    w.get_ok(&format!("http://{PLAIN}/echo?during=1"));
    w.daemon.wait_events(2, |v| is_event(v, "connection"), WAIT);
    let spool = w.spool();
    poll(WAIT, || {
        (std::fs::metadata(&spool).map(|m| m.len()).unwrap_or(0) > 0).then_some(())
    })
    .expect("the connection was spooled");
    w.daemon.terminate();
    w.journal.start_again();
    w.daemon.start_again();
    let notice = w
        .journal
        .wait_entries(1, |v| v["GATEWAY_EVENT"] == "audit_spooled", WAIT);
    assert!(
        field(&notice[0], "GATEWAY_SPOOLED").parse::<u64>().unwrap() >= 1,
        "{}",
        notice[0]
    );
    // Both connections are in the journal, and the chain holds.
    w.journal
        .wait_entries(2, |v| v["GATEWAY_EVENT"] == "connection", WAIT);
    let ns = w.journal.namespace().to_string();
    let (ok, out) = w.verify(&["--namespace", &ns]);
    assert!(ok, "{out}");
}

#[test]
fn a_full_spool_counts_what_it_dropped_and_verify_names_the_gap() {
    // Room for no entry at all: everything during the outage is dropped.
    let mut w = World::with(|c| c.spool_max_bytes(1));
    w.get_ok(&format!("http://{PLAIN}/echo?before=1"));
    let before = w
        .journal
        .wait_entries(1, |v| v["GATEWAY_EVENT"] == "connection", WAIT);
    let last_before = seq(&before[0]);
    w.journal.stop();
    w.get_ok(&format!("http://{PLAIN}/echo?during=1"));
    w.daemon.wait_events(2, |v| is_event(v, "connection"), WAIT);
    w.journal.start_again();
    let notice = w
        .journal
        .wait_entries(1, |v| v["GATEWAY_EVENT"] == "audit_spooled", WAIT);
    let n = &notice[0];
    let dropped: u64 = field(n, "GATEWAY_DROPPED").parse().unwrap();
    assert!(dropped >= 1, "{n}");
    assert_eq!(field(n, "GATEWAY_SPOOLED"), "0", "{n}");
    let dropped_seqs = field(n, "GATEWAY_DROPPED_SEQS");
    let (from, to) = dropped_seqs.split_once("..").expect("a seq range");
    let (from, to): (u64, u64) = (from.parse().unwrap(), to.parse().unwrap());
    assert!(from > last_before && to >= from, "{n}");
    assert_eq!(seq(n), to + 1, "{n}");
    let ns = w.journal.namespace().to_string();
    let (ok, out) = w.verify(&["--namespace", &ns]);
    assert!(!ok, "dropped records must show as a gap:\n{out}");
    assert!(
        out.contains(&format!(
            "the chain jumps from seq {} to {}",
            from - 1,
            to + 1
        )),
        "{out}"
    );
}
