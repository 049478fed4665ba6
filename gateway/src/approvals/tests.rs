//! The approval engine on its own: segregation of duties, windows (and
//! their persistence), timeout, cancellation, abort, body summaries. Token
//! verification is covered against the real OpenID provider in
//! `oidc::provider_tests` and end to end in `tests/tests/approvals.rs`.

use super::*;
use crate::config::{Config, LoadEnv};

/// A state directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "gateway-approvals-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CONFIG: &str = r#"
[[identity]]
name = "job"
cgroups = ["t/job"]
static = { subject = "job-sub", duties = ["browser-executor"] }

[[identity]]
name = "ops"
cgroups = ["t/ops"]
static = { subject = "ops-sub", duties = ["approval-engine"] }

[approvals]
timeout_secs = 1
max_window_minutes = 60
"#;

fn engine(dir: &Dir) -> Arc<Approvals> {
    let cfg = Config::parse_with(CONFIG, "t", &LoadEnv::default()).unwrap();
    let ids = Arc::new(Identities::from_config(&cfg));
    Arc::new(Approvals::new(&cfg.approvals, ids, &dir.0).unwrap())
}

fn ask(cgroup: &str, identity: &str, subject: &str) -> Ask {
    Ask {
        rule: "payments".into(),
        reason: "rule payments matched: approve".into(),
        approvers: vec!["approval-engine".into()],
        requester: Requester {
            identity: identity.into(),
            subject: subject.into(),
            duties: vec!["browser-executor".into()],
            cgroup: cgroup.into(),
            pid: 42,
            exe: "/usr/bin/curl".into(),
        },
        request: Summary {
            kind: "http".into(),
            destination: "192.0.2.1:443".into(),
            host: "pay.example".into(),
            method: "POST".into(),
            path: "/v1/charges".into(),
            body_bytes: None,
            body_sha256: None,
            preview: None,
            preview_truncated: false,
        },
    }
}

fn approver(subject: &str, duties: &[&str]) -> Approver {
    Approver {
        subject: subject.into(),
        issuer: "https://idp.example".into(),
        duties: duties.iter().map(|d| (*d).to_string()).collect(),
    }
}

fn approve_once() -> Verdict {
    Verdict::Approve { window: None }
}

#[tokio::test]
async fn segregation_of_duties_is_enforced_before_any_decision() {
    let dir = Dir::new("sod");
    let a = engine(&dir);
    let ticket = a.ask(ask("/t/job", "job", "job-sub")).ok().unwrap();
    let id = ticket.id().to_string();
    let refusals = [
        (approver("job-sub", &["approval-engine"]), "self-approval"),
        (
            approver("someone", &["browser-executor"]),
            "holds none of the approver duties [approval-engine]",
        ),
    ];
    for (who, want) in refusals {
        let r = a.decide(&id, &who, approve_once()).unwrap_err();
        assert_eq!(r.status, 403);
        assert!(r.message.contains(want), "{r}");
    }
    // Still pending after every refusal.
    assert_eq!(a.list().len(), 1);
    let r = a
        .decide(
            "apr-000000000000",
            &approver("ops-sub", &["approval-engine"]),
            approve_once(),
        )
        .unwrap_err();
    assert_eq!(r.status, 404);
    let reply = a
        .decide(
            &id,
            &approver("ops-sub", &["approval-engine"]),
            approve_once(),
        )
        .unwrap();
    assert_eq!(reply["approved"], id.as_str());
    assert_eq!(
        ticket.wait().await,
        Outcome::Approved {
            approver: "ops-sub".into(),
            window: None
        }
    );
    assert!(a.list().is_empty());
    // Decided once: a second decision finds nothing.
    let r = a
        .decide(
            &id,
            &approver("ops-sub", &["approval-engine"]),
            approve_once(),
        )
        .unwrap_err();
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn no_subject_bound_to_the_requesting_cgroup_may_approve() {
    let dir = Dir::new("bound");
    let a = engine(&dir);
    // The request comes from a child of the job's cgroup but claims another
    // subject (an enrolled token, say): the cgroup's own identity still may
    // not approve it.
    let t = a.ask(ask("/t/job/run-7", "job", "run-7-sub")).ok().unwrap();
    let r = a
        .decide(
            t.id(),
            &approver("job-sub", &["approval-engine"]),
            approve_once(),
        )
        .unwrap_err();
    assert!(r.message.contains("bound to the requesting cgroup"), "{r}");
    assert_eq!(a.list().len(), 1);
}

#[tokio::test]
async fn deny_carries_the_reason_and_windows_are_bounded() {
    let dir = Dir::new("deny");
    let a = engine(&dir);
    let t = a.ask(ask("/t/job", "job", "job-sub")).ok().unwrap();
    let ops = approver("ops-sub", &["approval-engine"]);
    let r = a
        .decide(
            t.id(),
            &ops,
            Verdict::Approve {
                window: Some(Duration::from_secs(61 * 60)),
            },
        )
        .unwrap_err();
    assert!(
        r.message
            .contains("longer than approvals.max_window_minutes (60)"),
        "{r}"
    );
    let verdict = parse_verdict("deny", None, Some("  not this week ")).unwrap();
    a.decide(t.id(), &ops, verdict).unwrap();
    let o = t.wait().await;
    assert_eq!(
        o,
        Outcome::Denied {
            approver: "ops-sub".into(),
            reason: "not this week".into()
        }
    );
    assert!(!o.approved());
    assert!(
        o.describe(Duration::from_secs(1))
            .contains("denied by ops-sub: not this week")
    );
    assert!(parse_verdict("maybe", None, None).is_err());
}

#[tokio::test]
async fn no_decision_means_denied_at_the_timeout() {
    let dir = Dir::new("timeout");
    let a = engine(&dir);
    let t = a.ask(ask("/t/job", "job", "job-sub")).ok().unwrap();
    let id = t.id().to_string();
    let o = t.wait().await;
    assert_eq!(o, Outcome::TimedOut);
    assert!(o.describe(a.timeout()).contains("timed out"));
    assert!(a.show(&id).is_none());
    assert!(
        !dir.0
            .join("approvals/pending")
            .join(format!("{id}.json"))
            .exists()
    );
}

#[tokio::test]
async fn a_requester_that_goes_away_cancels_its_approval() {
    let dir = Dir::new("cancel");
    let a = engine(&dir);
    let t = a.ask(ask("/t/job", "job", "job-sub")).ok().unwrap();
    let id = t.id().to_string();
    assert!(a.show(&id).is_some());
    drop(t);
    assert!(a.show(&id).is_none());
    let r = a
        .decide(
            &id,
            &approver("ops-sub", &["approval-engine"]),
            approve_once(),
        )
        .unwrap_err();
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn windows_pass_the_same_identity_and_rule_and_survive_a_restart() {
    let dir = Dir::new("window");
    let a = engine(&dir);
    let t = a.ask(ask("/t/job", "job", "job-sub")).ok().unwrap();
    a.decide(
        t.id(),
        &approver("ops-sub", &["approval-engine"]),
        Verdict::Approve {
            window: Some(Duration::from_secs(600)),
        },
    )
    .unwrap();
    assert!(t.wait().await.approved());
    let passes = |a: &Arc<Approvals>| match a.ask(ask("/t/job", "job", "job-sub")) {
        Err(Outcome::Window(w)) => Some(w),
        Err(other) => panic!("unexpected {other:?}"),
        Ok(_) => None,
    };
    let w = passes(&a).expect("the window covers the same identity and rule");
    assert_eq!(w.approver, "ops-sub");
    // Another identity, or another rule, still asks.
    assert!(a.ask(ask("/t/other", "other", "other-sub")).is_ok());
    let mut other_rule = ask("/t/job", "job", "job-sub");
    other_rule.rule = "prod-writes".into();
    assert!(a.ask(other_rule).is_ok());
    // A new daemon on the same state directory keeps the window.
    drop(a);
    let b = engine(&dir);
    assert_eq!(b.windows().len(), 1);
    assert!(passes(&b).is_some());
}

#[tokio::test]
async fn stopping_aborts_what_is_held_and_a_crash_is_found_at_start() {
    let dir = Dir::new("abort");
    let a = engine(&dir);
    let t = a.ask(ask("/t/job", "job", "job-sub")).ok().unwrap();
    a.abort_all();
    assert_eq!(t.wait().await, Outcome::Aborted);
    assert!(a.list().is_empty());
    // A daemon that dies holding a request leaves its record behind; the
    // next one records it as aborted and clears it.
    let t = a.ask(ask("/t/job", "job", "job-sub")).ok().unwrap();
    let record = dir
        .0
        .join("approvals/pending")
        .join(format!("{}.json", t.id()));
    assert!(record.exists());
    std::mem::forget(t);
    let _b = engine(&dir);
    assert!(!record.exists());
}

#[tokio::test]
async fn too_many_pending_are_refused_not_held() {
    let dir = Dir::new("max");
    let cfg = Config::parse_with(
        &format!("{CONFIG}max_pending = 1\n"),
        "t",
        &LoadEnv::default(),
    )
    .unwrap();
    let ids = Arc::new(Identities::from_config(&cfg));
    let a = Arc::new(Approvals::new(&cfg.approvals, ids, &dir.0).unwrap());
    let _first = a.ask(ask("/t/job", "job", "job-sub")).ok().unwrap();
    match a.ask(ask("/t/job", "job", "job-sub")) {
        Err(Outcome::Refused(why)) => assert!(why.contains("max_pending"), "{why}"),
        Err(other) => panic!("unexpected {other:?}"),
        Ok(_) => panic!("a second approval was held"),
    }
}

#[tokio::test]
async fn body_summary_has_size_digest_and_a_masked_bounded_preview() {
    let dir = Dir::new("summary");
    let a = engine(&dir);
    let body = format!(
        "{{\"amount\":1999,\"card\":\"4111 1111 1111 1111\",\"email\":\"pay@example.com\",\"note\":\"{}\"}}",
        "x".repeat(5000)
    );
    let mut s = ask("/t/job", "job", "job-sub").request;
    a.summarize_body(body.as_bytes(), &mut s);
    assert_eq!(s.body_bytes, Some(body.len() as u64));
    let digest: String = Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(s.body_sha256.as_deref(), Some(digest.as_str()));
    let preview = s.preview.unwrap();
    assert!(preview.len() <= 1024, "{}", preview.len());
    assert!(s.preview_truncated);
    assert!(preview.contains("\"amount\":1999"), "{preview}");
    assert!(!preview.contains("4111 1111 1111 1111"), "{preview}");
    assert!(!preview.contains("pay@example.com"), "{preview}");
    // Multi-byte text is cut on a character boundary, never mid-character.
    let mut s = ask("/t/job", "job", "job-sub").request;
    a.summarize_body("é".repeat(2000).as_bytes(), &mut s);
    assert!(s.preview.unwrap().chars().all(|c| c == 'é'));
}

#[test]
fn webhook_payload_has_slack_text_and_the_approval() {
    let a = Approval {
        id: "apr-0123456789ab".into(),
        rule: "payments".into(),
        reason: "r".into(),
        approvers: vec!["approval-engine".into()],
        requester: ask("/t/job", "job", "job-sub").requester,
        request: ask("/t/job", "job", "job-sub").request,
        created_unix: 1,
        expires_unix: 301,
    };
    let v = webhook_payload(&a);
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("apr-0123456789ab") && text.contains("POST pay.example/v1/charges"));
    assert_eq!(v["approval"]["requester"]["subject"], "job-sub");
    assert_eq!(v["event"], "approval_pending");
}
