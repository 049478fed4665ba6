//! Issue 5: just-in-time approvals with segregation of duties. A request
//! that an `approve` rule matches is held until an approver — a different
//! identity, proving who they are with an OIDC token and holding one of the
//! rule's approver duties — lets it through, refuses it, or lets it time
//! out; what was asked and who decided lands in the audit.
//!
//! Real parts only: a real OpenID provider (npm `oidc-provider`) issues the
//! requesters' client-credentials tokens and signs the approvers' tokens
//! (good, forged, expired); the requesters are headless Chromium (no proxy
//! or certificate flag) and curl, started by `gateway exec`; the payments
//! origin is a TLS server in a network namespace of its own that records
//! every byte it got; approvers use the real `gateway approvals` command
//! and the HTTP admin API; the webhook receiver is a real HTTP server on
//! loopback. Each test checks what the requester saw, what the origin got,
//! and what the audit recorded.

use gateway_tests::chromium::{Browser, BrowserHome};
use gateway_tests::daemon::{Approvals, Webhook, is_event, num, text};
use gateway_tests::hook::{self, Hook, HookOptions, Reply, sha256_hex};
use gateway_tests::oidc::{AUDIENCE, Client, OidcProvider, Options};
use gateway_tests::tlsca::TestCa;
use gateway_tests::{
    Config, Daemon, DnsOrigin, Origin, Probe, Repl, Rule, TempDir, TestNet, poll, require_root,
    unique,
};
use serde_json::{Value, json};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The payments origin's name (its certificate's, and the DNS answer's).
const PAY: &str = "pay.test";
/// The HTTP approve rule and the L4 one (a ledger service speaking raw TCP).
const RULE: &str = "payments-need-approval";
const L4_RULE: &str = "ledger-needs-approval";
const LEDGER_PORT: u16 = 20001;
/// Requesters hold this duty; approvers the other.
const REQUESTER_DUTY: &str = "browser-executor";
const APPROVER_DUTY: &str = "approval-engine";
/// Identities (client-credentials clients of the provider, `sub` = client id).
const BROWSER: &str = "browser";
const BROWSER_SUB: &str = "ci-browser";
const AGENT: &str = "agent";
const AGENT_SUB: &str = "ci-agent";
/// The approver everybody trusts, and one who holds no approver duty.
const ALICE: &str = "approver-alice";
const MALLORY: &str = "dev-mallory";
const DNS_PORT: u16 = 5300;

const EVENT: Duration = Duration::from_secs(10);
/// Until a held request shows in `gateway approvals list`.
const LISTED: Duration = Duration::from_secs(20);
/// A requester's whole run (curl's own --max-time is 30 s).
const FINISH: Duration = Duration::from_secs(40);
const LOAD: Duration = Duration::from_secs(30);

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_gw-probe"))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The body of a charge: JSON with a card number (the preview must mask it).
fn charge_body(charge: &str) -> String {
    format!(
        r#"{{"charge":"{charge}","amount":4200,"currency":"eur","card":"4111 1111 1111 1111","customer":"cus_42"}}"#
    )
}

fn charge_path(charge: &str) -> String {
    format!("/v1/charges/{charge}")
}

/// The checkout page: starts the charge with `fetch()` and shows the
/// answer (status and body) once there is one. Its title says where it is.
const CHECKOUT_CHARGE: &str = "ch_browser_1";

fn checkout_page() -> String {
    let body = serde_json::to_string(&charge_body(CHECKOUT_CHARGE)).unwrap();
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>loading</title></head>\
         <body><pre id=out></pre><script>\n\
         const out = document.getElementById('out');\n\
         document.title = 'holding';\n\
         fetch('{path}', {{method: 'POST', headers: {{'content-type': 'application/json'}}, body: {body}}})\n\
           .then(async r => {{ out.textContent = r.status + ' ' + (await r.text()); document.title = 'done'; }})\n\
           .catch(e => {{ out.textContent = 'error: ' + e; document.title = 'done'; }});\n\
         </script></body></html>",
        path = charge_path(CHECKOUT_CHARGE)
    )
}

/// What the payments origin answers: the checkout page, and for a charge
/// the hash of the body it got, so the requester can see it arrived whole.
fn payments(req: &hook::Request) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/checkout.html") => Reply::new(200, "text/html; charset=utf-8", checkout_page()),
        ("POST", p) if p.starts_with("/v1/charges/") => Reply::json(
            201,
            &json!({
                "charge": p.rsplit('/').next(),
                "status": "succeeded",
                "body_sha256": sha256_hex(&req.body),
            }),
        ),
        _ => Reply::new(404, "text/plain", "not found\n"),
    }
}

/// Chromium aborts loads (`ERR_NETWORK_CHANGED`) when another test adds
/// network interfaces meanwhile: the browser test runs alone, the others
/// side by side.
static SERIAL: RwLock<()> = RwLock::new(());

enum Serial {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// One test's world. Fields drop in declaration order: the daemon (and its
/// cgroups) first, the namespace, the temp dir and the lock last.
struct World {
    daemon: Daemon,
    provider: OidcProvider,
    pay: Hook,
    ledger: Origin,
    _dns: DnsOrigin,
    net: TestNet,
    tmp: TempDir,
    _serial: Serial,
}

impl World {
    fn new() -> World {
        World::with(false, |c| c)
    }

    /// Two requester identities (both `browser-executor`), the payments
    /// origin behind `payments-need-approval`, the ledger behind the L4
    /// approve rule; default block. `extra` adjusts the config.
    fn with(alone: bool, extra: impl FnOnce(Config) -> Config) -> World {
        require_root();
        let serial = if alone {
            Serial::Alone(SERIAL.write().unwrap_or_else(|p| p.into_inner()))
        } else {
            Serial::Shared(SERIAL.read().unwrap_or_else(|p| p.into_inner()))
        };
        let tmp = TempDir::new();
        let net = TestNet::new();
        let ns = net.ns_v4();
        let ca_dir = tmp.path().join("pay-ca");
        std::fs::create_dir(&ca_dir).unwrap();
        let mut ca = TestCa::new(&ca_dir, "gateway-tests payments CA");
        let (cert, key) = ca.issue(&[PAY], &[ns.into()]);
        let pay = Hook::start(
            HookOptions::new()
                .netns(&net)
                .bind(SocketAddr::new(ns.into(), 443))
                .tls(&cert, &key)
                .handler(payments),
        );
        let probe = probe();
        let ledger = Origin::start(&net, &probe, &[ns.into()], LEDGER_PORT..=LEDGER_PORT);
        let dns = DnsOrigin::start(
            &net,
            &probe,
            &[SocketAddr::new(ns.into(), DNS_PORT)],
            &[(PAY, ns.into())],
        );
        let secrets = [secret(), secret()];
        let provider = OidcProvider::start(
            &[
                Client::new(BROWSER_SUB, &secrets[0], &[REQUESTER_DUTY]),
                Client::new(AGENT_SUB, &secrets[1], &[REQUESTER_DUTY]),
            ],
            Options::default(),
        );
        let mut cfg = Config::new();
        cfg.identities.clear();
        cfg.policy_default = "block".into();
        let mut cfg = cfg
            .client_credentials_identity(
                BROWSER,
                provider.issuer(),
                BROWSER_SUB,
                &secrets[0],
                Some(AUDIENCE),
            )
            .client_credentials_identity(
                AGENT,
                provider.issuer(),
                AGENT_SUB,
                &secrets[1],
                Some(AUDIENCE),
            )
            .trusted_issuer(provider.issuer(), &[AUDIENCE])
            .dns_upstream(SocketAddr::new(ns.into(), DNS_PORT))
            .interception_ca(ca.pem_path())
            .rule(Rule {
                duties: vec![REQUESTER_DUTY.into()],
                ips: vec![format!("{ns}/32")],
                ports: vec![LEDGER_PORT.to_string()],
                approvers: vec![APPROVER_DUTY.into()],
                ..Rule::new(L4_RULE, "approve")
            })
            .rule(Rule {
                duties: vec![REQUESTER_DUTY.into()],
                hosts: vec![PAY.into()],
                methods: vec!["POST".into()],
                paths: vec!["/v1/charges/**".into()],
                approvers: vec![APPROVER_DUTY.into()],
                ..Rule::new(RULE, "approve")
            })
            .rule(Rule {
                duties: vec![REQUESTER_DUTY.into()],
                hosts: vec![PAY.into()],
                ..Rule::new("payments-read", "allow")
            });
        cfg.approvals = Some(Approvals::default());
        let daemon = Daemon::start(extra(cfg));
        for identity in [BROWSER, AGENT] {
            daemon.wait_event(
                |v| is_event(v, "identity_token") && text(v, "identity") == identity,
                Duration::from_secs(20),
            );
        }
        if alone {
            net.wait_link_local();
        }
        World {
            daemon,
            provider,
            pay,
            ledger,
            _dns: dns,
            net,
            tmp,
            _serial: serial,
        }
    }

    /// The gateway's interception CA (created by the daemon at start).
    fn gateway_ca(&self) -> PathBuf {
        self.daemon.config().state_dir.join("ca").join("cert.pem")
    }

    /// curl POSTing charge `charge` to the payments origin as `identity`,
    /// over TLS intercepted by the gateway; `extra` goes before the URL.
    fn charge(&self, identity: &str, charge: &str, extra: &[&str]) -> Running {
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "-i".into(),
            "--max-time".into(),
            "30".into(),
            "--cacert".into(),
            self.gateway_ca().display().to_string(),
            "--resolve".into(),
            format!("{PAY}:443:{}", self.net.ns_v4()),
            "-H".into(),
            "content-type: application/json".into(),
            "--data-binary".into(),
            charge_body(charge),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("https://{PAY}{}", charge_path(charge)));
        Running::spawn(self.daemon.exec(identity, "curl", args))
    }

    /// `gateway approvals <args>` against this daemon.
    fn approvals(&self, args: &[&str]) -> Output {
        self.daemon
            .gateway("approvals")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run gateway approvals")
    }

    /// `gateway approvals list --json`, parsed.
    fn list(&self) -> Value {
        let out = self.approvals(&["list", "--json"]);
        assert!(
            out.status.success(),
            "`gateway approvals list --json` failed: {}",
            stderr(&out)
        );
        serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|e| panic!("`approvals list --json` printed no JSON ({e}): {out:?}"))
    }

    fn listed(&self) -> Vec<Value> {
        self.list()["approvals"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Poll the list until an approval for `path` shows; returns it.
    fn wait_listed(&self, path: &str) -> Value {
        self.wait_listed_by(|a| a["request"]["path"] == path)
    }

    fn wait_listed_by(&self, pred: impl Fn(&Value) -> bool) -> Value {
        poll(LISTED, || self.listed().into_iter().find(|a| pred(a))).unwrap_or_else(|| {
            panic!(
                "no matching pending approval within {LISTED:?}; list: {}\ndaemon:\n{}",
                self.list(),
                self.daemon.log().tail(30)
            )
        })
    }

    /// Poll the list until approval `id` is gone from it.
    fn wait_unlisted(&self, id: &str) {
        let gone = poll(EVENT, || {
            (!self.listed().iter().any(|a| a["id"] == id)).then_some(())
        });
        assert!(gone.is_some(), "{id} is still listed: {}", self.list());
    }

    /// A token file with `token` in it.
    fn token_file(&self, token: &str) -> PathBuf {
        let file = self.tmp.path().join(unique("token"));
        std::fs::write(&file, token).unwrap();
        file
    }

    /// An approver token signed by the provider: `sub`, our audience,
    /// `groups`.
    fn token(&self, sub: &str, groups: &[&str]) -> PathBuf {
        self.token_file(&self.raw_token(sub, groups))
    }

    fn raw_token(&self, sub: &str, groups: &[&str]) -> String {
        self.provider
            .mint(&json!({"claims": {"sub": sub, "aud": AUDIENCE, "groups": groups}}))
    }

    fn approve(&self, id: &str, token: &Path, window: Option<u64>) -> Output {
        let token = token.display().to_string();
        let mut args = vec!["approve", id, "--token-file", &token];
        let minutes = window.map(|w| w.to_string());
        if let Some(m) = &minutes {
            args.extend(["--window", m]);
        }
        self.approvals(&args)
    }

    fn deny(&self, id: &str, token: &Path, reason: &str) -> Output {
        let token = token.display().to_string();
        self.approvals(&["deny", id, "--token-file", &token, "--reason", reason])
    }

    /// The `approval` audit event of approval `id` with this outcome.
    fn approval_event(&self, id: &str, outcome: &str) -> Value {
        self.daemon.wait_event(
            |v| is_event(v, "approval") && v["approval_id"] == id && v["outcome"] == outcome,
            EVENT,
        )
    }

    /// `approval` audit events of this run matching `pred`, now.
    fn approval_events(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.daemon
            .events()
            .into_iter()
            .filter(|v| is_event(v, "approval") && pred(v))
            .collect()
    }

    /// The `http` audit record of the POST to `path`.
    fn http_event(&self, path: &str) -> Value {
        self.daemon.wait_event(
            |v| is_event(v, "http") && v["method"] == "POST" && v["path"] == path,
            EVENT,
        )
    }

    /// The POSTs the payments origin received at `path`.
    fn origin_posts(&self, path: &str) -> Vec<Value> {
        self.pay
            .requests()
            .into_iter()
            .filter(|r| r["method"] == "POST" && r["path"] == path)
            .collect()
    }
}

/// A client secret no other run uses.
fn secret() -> String {
    format!("secret-{}-{:016x}", unique("cc"), rand::random::<u64>())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `gateway approvals` call that must fail with `needle` in its message.
#[track_caller]
fn assert_refused(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a refusal ({needle}), got success: {}{err}",
        stdout(out)
    );
    assert!(
        err.starts_with("gateway: ") && err.contains(needle),
        "the message must say {needle:?}: {err}"
    );
}

#[track_caller]
fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "`gateway approvals` failed ({}): {}{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// A process started in the background (a requester whose request is
/// held); killed on drop if still running.
struct Running {
    child: Option<Child>,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
    what: String,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        Running {
            child: Some(child),
            out: Some(out),
            err: Some(err),
            what,
        }
    }

    /// Whether it has exited (without reaping it).
    fn exited(&mut self) -> bool {
        let c = self.child.as_mut().unwrap();
        matches!(c.try_wait(), Ok(Some(_)))
    }

    /// Wait (with a deadline) for it to exit; its output.
    fn finish(mut self) -> Output {
        let mut child = self.child.take().unwrap();
        let status: Option<ExitStatus> = poll(FINISH, || child.try_wait().ok().flatten());
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not finish within {FINISH:?}", self.what);
        };
        Output {
            status,
            stdout: self.out.take().unwrap().join().unwrap(),
            stderr: self.err.take().unwrap().join().unwrap(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What curl `-i` printed: the final status, its headers, the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    raw: String,
}

impl Answer {
    fn of(out: &Output) -> Answer {
        let raw = stdout(out);
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| {
            panic!(
                "curl printed no response ({}): {raw}{}",
                out.status,
                stderr(out)
            )
        });
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {raw}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Answer {
            status,
            headers,
            body: body.to_owned(),
            raw: raw.clone(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The origin's answer to a charge reached the client: 201, and the hash
/// of the body the origin got is the hash of the body sent.
#[track_caller]
fn assert_charged(a: &Answer, charge: &str) {
    assert_eq!(a.status, 201, "{}", a.raw);
    let v: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.raw));
    assert_eq!(v["charge"], charge, "{}", a.raw);
    assert_eq!(v["body_sha256"], sha256_hex(charge_body(charge).as_bytes()));
}

/// The gateway's refusal of a held request: 403, naming the approval (in
/// the body and `x-gateway-approval-id`) and the outcome.
#[track_caller]
fn assert_refused_answer(a: &Answer, id: &str, outcome: &str) {
    assert_eq!(a.status, 403, "{}", a.raw);
    assert!(a.body.contains(&format!("Approval id: {id}")), "{}", a.raw);
    assert!(a.body.contains(outcome), "{outcome:?} not in {}", a.raw);
    assert_eq!(a.header("x-gateway-approval-id"), Some(id), "{}", a.raw);
}

#[test]
fn chromium_payment_waits_for_a_different_identity_with_the_approver_duty() {
    let w = World::with(true, |c| c);
    let home = BrowserHome::new();
    let trust = w
        .daemon
        .gateway("ca")
        .args(["trust", "--nssdb"])
        .arg(home.nssdb())
        .output()
        .expect("run gateway ca trust");
    assert!(trust.status.success(), "{}", stderr(&trust));
    let mut b = Browser::launch(&home, |p, a| w.daemon.exec(BROWSER, p, a));
    let dom = b
        .load(
            &format!("https://{PAY}/checkout.html"),
            "document.title === 'holding'",
            LOAD,
        )
        .expect("the checkout page loads");
    assert!(dom.contains("<pre id=\"out\"></pre>"), "{dom}");

    // Held: listed with who asks and exactly what.
    let path = charge_path(CHECKOUT_CHARGE);
    let body = charge_body(CHECKOUT_CHARGE);
    let a = w.wait_listed(&path);
    let id = a["id"].as_str().unwrap().to_owned();
    assert!(
        id.len() == 16 && id.starts_with("apr-") && id[4..].bytes().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(a["rule"], RULE, "{a}");
    assert_eq!(a["approvers"], json!([APPROVER_DUTY]), "{a}");
    let who = &a["requester"];
    assert_eq!(who["identity"], BROWSER, "{a}");
    assert_eq!(who["subject"], BROWSER_SUB, "{a}");
    assert_eq!(who["duties"], json!([REQUESTER_DUTY]), "{a}");
    assert_eq!(who["cgroup"], b.cgroup(), "{a}");
    assert!(who["exe"].as_str().unwrap_or("").contains("chrom"), "{a}");
    let r = &a["request"];
    assert_eq!(r["kind"], "http", "{a}");
    assert_eq!(r["method"], "POST", "{a}");
    assert_eq!(r["host"], PAY, "{a}");
    assert_eq!(r["path"], path.as_str(), "{a}");
    assert_eq!(r["body_bytes"], body.len(), "{a}");
    assert_eq!(r["body_sha256"], sha256_hex(body.as_bytes()), "{a}");
    let preview = r["preview"].as_str().unwrap_or_default();
    assert!(preview.contains("cus_42"), "{a}");
    assert!(
        !preview.contains("4111 1111 1111 1111") && preview.contains("MASKED:credit_card"),
        "the preview must mask the card: {a}"
    );
    assert!(a["expires_unix"].as_u64().unwrap() > now_unix(), "{a}");
    let shown = assert_ok(&w.approvals(&["show", &id]));
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown, a, "show and list disagree");
    let pending = w.approval_event(&id, "pending");
    assert_eq!(text(&pending, "rule"), RULE);
    assert_eq!(text(&pending, "identity"), BROWSER);
    assert_eq!(text(&pending, "subject"), BROWSER_SUB);
    assert_eq!(text(&pending, "cgroup"), b.cgroup());
    assert_eq!(text(&pending, "method"), "POST");
    assert_eq!(text(&pending, "host"), PAY);
    assert_eq!(text(&pending, "path"), path);
    assert_eq!(num(&pending, "body_bytes"), Some(body.len() as u64));
    assert_eq!(text(&pending, "body_sha256"), sha256_hex(body.as_bytes()));

    // Nobody but a different identity with the approver duty decides.
    let now = now_unix() as i64;
    let refusals = [
        (
            "self-approval",
            w.token(BROWSER_SUB, &[APPROVER_DUTY]),
            "self-approval",
        ),
        (
            "no approver duty",
            w.token(MALLORY, &[REQUESTER_DUTY]),
            "holds none of the approver duties",
        ),
        (
            "forged",
            w.token_file(&w.provider.mint(&json!({
                "claims": {"sub": ALICE, "aud": AUDIENCE, "groups": [APPROVER_DUTY]},
                "foreign_key": true,
            }))),
            "approver token refused (bad_signature)",
        ),
        (
            "expired",
            w.token_file(&w.provider.mint(&json!({
                "claims": {"sub": ALICE, "aud": AUDIENCE, "groups": [APPROVER_DUTY],
                           "iat": now - 900, "exp": now - 600},
            }))),
            "approver token refused (expired)",
        ),
    ];
    for (what, token, needle) in &refusals {
        let out = w.approve(&id, token, None);
        assert_refused(&out, needle);
        if !w.listed().iter().any(|l| l["id"] == id.as_str()) {
            panic!(
                "{what}: the approval must still be pending; the page's failed requests: {:?}",
                b.failed_requests()
            );
        }
    }
    assert!(
        w.origin_posts(&path).is_empty(),
        "the origin got the charge before anyone approved it"
    );
    assert_eq!(b.eval("document.title").unwrap(), "holding");
    let refused = w.daemon.wait_events(
        refusals.len(),
        |v| {
            is_event(v, "approval")
                && v["approval_id"] == id.as_str()
                && v["outcome"] == "approver_refused"
        },
        EVENT,
    );
    for (ev, (_, _, needle)) in refused.iter().zip(&refusals) {
        assert_eq!(text(ev, "identity"), BROWSER, "{ev}");
        assert_eq!(text(ev, "subject"), BROWSER_SUB, "{ev}");
        assert!(text(ev, "reason").contains(needle), "{ev}");
    }
    assert_eq!(text(&refused[0], "approver"), BROWSER_SUB);
    assert_eq!(text(&refused[1], "approver"), MALLORY);
    assert_eq!(text(&refused[1], "approver_duties"), REQUESTER_DUTY);

    // The approver approves; the page gets the origin's answer.
    let out = w.approve(&id, &w.token(ALICE, &[APPROVER_DUTY]), None);
    let said = assert_ok(&out);
    assert!(said.contains(&id) && said.contains(BROWSER_SUB), "{said}");
    let done = poll(LOAD, || {
        (b.eval("document.title").ok()? == "done").then_some(())
    });
    assert!(
        done.is_some(),
        "the page never got an answer: {:?}",
        b.console()
    );
    let shown = b
        .eval("document.getElementById('out').textContent")
        .unwrap();
    let shown = shown.as_str().unwrap_or_default();
    let (status, answer) = shown.split_once(' ').unwrap_or_default();
    assert_eq!(status, "201", "{shown}");
    let answer: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {shown}"));
    assert_eq!(answer["charge"], CHECKOUT_CHARGE, "{shown}");
    assert_eq!(
        answer["body_sha256"],
        sha256_hex(body.as_bytes()),
        "{shown}"
    );
    let posts = w.origin_posts(&path);
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["body"], body.as_str());

    let approved = w.approval_event(&id, "approved");
    assert_eq!(text(&approved, "identity"), BROWSER, "{approved}");
    assert_eq!(text(&approved, "subject"), BROWSER_SUB, "{approved}");
    assert_eq!(text(&approved, "approver"), ALICE, "{approved}");
    assert_eq!(
        text(&approved, "approver_issuer"),
        w.provider.issuer(),
        "{approved}"
    );
    assert_eq!(
        text(&approved, "approver_duties"),
        APPROVER_DUTY,
        "{approved}"
    );
    let http = w.http_event(&path);
    assert_eq!(text(&http, "approval_id"), id, "{http}");
    assert_eq!(text(&http, "approver"), ALICE, "{http}");
    assert_eq!(text(&http, "rule"), RULE, "{http}");
    assert_eq!(text(&http, "identity"), BROWSER, "{http}");
    assert_eq!(num(&http, "status"), Some(201), "{http}");
    assert_eq!(text(&http, "outcome"), "complete", "{http}");

    // Decided: gone from the list; a second decision finds nothing.
    w.wait_unlisted(&id);
    let again = w.approve(&id, &w.token(ALICE, &[APPROVER_DUTY]), None);
    assert_refused(&again, "no pending approval");
}

#[test]
fn denied_and_timed_out_requests_get_a_403_naming_the_approval() {
    let w = World::with(false, |mut c| {
        c.approvals = Some(Approvals {
            timeout_secs: Some(4),
            ..Approvals::default()
        });
        c
    });
    let alice = w.token(ALICE, &[APPROVER_DUTY]);

    // Denied, with a reason.
    let mut held = w.charge(BROWSER, "ch_deny", &[]);
    let path = charge_path("ch_deny");
    let id = w.wait_listed(&path)["id"].as_str().unwrap().to_owned();
    assert!(!held.exited(), "curl must still be waiting");
    let said = assert_ok(&w.deny(&id, &alice, "card on the fraud list"));
    assert!(said.contains(&id), "{said}");
    let a = Answer::of(&held.finish());
    assert_refused_answer(
        &a,
        &id,
        &format!("denied by {ALICE}: card on the fraud list"),
    );
    assert!(
        w.origin_posts(&path).is_empty(),
        "a denied charge reached the origin"
    );
    let ev = w.approval_event(&id, "denied");
    assert_eq!(text(&ev, "approver"), ALICE, "{ev}");
    assert_eq!(text(&ev, "identity"), BROWSER, "{ev}");
    assert!(
        text(&ev, "reason").contains("card on the fraud list"),
        "{ev}"
    );
    let http = w.http_event(&path);
    assert_eq!(num(&http, "status"), Some(403), "{http}");
    assert_eq!(text(&http, "approval_id"), id, "{http}");
    assert_eq!(text(&http, "approver"), ALICE, "{http}");

    // Nobody decides: denied at the timeout.
    let held = w.charge(AGENT, "ch_timeout", &[]);
    let path = charge_path("ch_timeout");
    let id = w.wait_listed(&path)["id"].as_str().unwrap().to_owned();
    let a = Answer::of(&held.finish());
    assert_refused_answer(&a, &id, "timed out");
    let ev = w.approval_event(&id, "timeout");
    assert_eq!(text(&ev, "identity"), AGENT, "{ev}");
    assert_eq!(text(&ev, "approver"), "", "{ev}");
    assert!(!w.listed().iter().any(|l| l["id"] == id.as_str()));
    assert!(w.origin_posts(&path).is_empty());
    let http = w.http_event(&path);
    assert_eq!(num(&http, "status"), Some(403), "{http}");
    assert_eq!(text(&http, "approval_id"), id, "{http}");
    // Too late to approve it now.
    assert_refused(&w.approve(&id, &alice, None), "no pending approval");
}

#[test]
fn a_window_lets_the_same_identity_pass_and_no_other() {
    let w = World::new();
    let alice = w.token(ALICE, &[APPROVER_DUTY]);
    let held = w.charge(BROWSER, "ch_first", &[]);
    let id = w.wait_listed(&charge_path("ch_first"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let said = assert_ok(&w.approve(&id, &alice, Some(10)));
    assert!(said.contains("window of 10 minutes"), "{said}");
    assert_charged(&Answer::of(&held.finish()), "ch_first");
    let windows = w.list()["windows"].clone();
    let win = windows
        .as_array()
        .and_then(|l| l.iter().find(|x| x["approval_id"] == id.as_str()))
        .unwrap_or_else(|| panic!("no window for {id}: {windows}"));
    assert_eq!(win["identity"], BROWSER, "{win}");
    assert_eq!(win["subject"], BROWSER_SUB, "{win}");
    assert_eq!(win["rule"], RULE, "{win}");
    assert_eq!(win["approver"], ALICE, "{win}");
    let until = win["until_unix"].as_u64().unwrap();
    let now = now_unix();
    assert!(until > now + 540 && until <= now + 600, "{win}");

    // The same identity again: straight through, no new approval.
    let again = w.charge(BROWSER, "ch_second", &[]);
    assert_charged(&Answer::of(&again.finish()), "ch_second");
    let http = w.http_event(&charge_path("ch_second"));
    assert_eq!(text(&http, "approval_id"), id, "{http}");
    assert_eq!(text(&http, "approver"), ALICE, "{http}");
    let by_window = w.approval_event(&id, "approved_by_window");
    assert_eq!(text(&by_window, "identity"), BROWSER, "{by_window}");
    assert_eq!(
        text(&by_window, "path"),
        charge_path("ch_second"),
        "{by_window}"
    );
    assert_eq!(text(&by_window, "approver"), ALICE, "{by_window}");
    let pendings = w.approval_events(|v| v["outcome"] == "pending");
    assert_eq!(pendings.len(), 1, "{pendings:?}");

    // Another identity with the same duty still waits.
    let other = w.charge(AGENT, "ch_other", &[]);
    let a = w.wait_listed(&charge_path("ch_other"));
    assert_eq!(a["requester"]["identity"], AGENT, "{a}");
    let other_id = a["id"].as_str().unwrap().to_owned();
    assert_ne!(other_id, id);
    assert!(w.origin_posts(&charge_path("ch_other")).is_empty());
    assert_ok(&w.deny(&other_id, &alice, "not covered by the window"));
    assert_refused_answer(&Answer::of(&other.finish()), &other_id, "denied");
}

#[test]
fn webhook_gets_each_pending_approval_with_its_id_and_a_text() {
    let hook = Hook::start(HookOptions::new());
    let url = hook.url("/hook");
    let w = World::with(false, |mut c| {
        c.approvals = Some(Approvals {
            webhook: Some(Webhook {
                url,
                timeout_ms: Some(5000),
                retries: Some(3),
            }),
            ..Approvals::default()
        });
        c
    });
    let held = w.charge(BROWSER, "ch_hook", &[]);
    let id = w.wait_listed(&charge_path("ch_hook"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let got = hook.wait_request(|r| r["path"] == "/hook", EVENT);
    assert_eq!(got["method"], "POST", "{got}");
    assert_eq!(
        got["headers"]["x-gateway-approval-id"][0],
        id.as_str(),
        "{got}"
    );
    assert!(
        got["headers"]["content-type"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("application/json"),
        "{got}"
    );
    let payload: Value = serde_json::from_str(got["body"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("the webhook body is not JSON ({e}): {got}"));
    assert_eq!(payload["event"], "approval_pending", "{payload}");
    let said = payload["text"].as_str().unwrap_or_default();
    assert!(
        said.contains(&format!("Approval {id} needed")) && said.contains(BROWSER_SUB),
        "{payload}"
    );
    assert_eq!(payload["approval"]["id"], id.as_str(), "{payload}");
    assert_eq!(payload["approval"]["rule"], RULE, "{payload}");
    assert_eq!(payload["approval"]["requester"]["subject"], BROWSER_SUB);
    assert_eq!(
        payload["approval"]["request"]["path"],
        charge_path("ch_hook")
    );
    let delivered = w.daemon.wait_event(
        |v| is_event(v, "webhook") && v["approval_id"] == id.as_str(),
        EVENT,
    );
    assert_eq!(text(&delivered, "outcome"), "delivered", "{delivered}");
    assert_eq!(hook.requests().len(), 1, "delivered once, not retried");
    assert_ok(&w.deny(&id, &w.token(ALICE, &[APPROVER_DUTY]), "test over"));
    assert_refused_answer(&Answer::of(&held.finish()), &id, "denied");
}

#[test]
fn a_webhook_that_never_answers_does_not_hold_up_the_request() {
    let hook = Hook::start(HookOptions::new().hang());
    let url = hook.url("/hook");
    let w = World::with(false, |mut c| {
        c.approvals = Some(Approvals {
            webhook: Some(Webhook {
                url,
                timeout_ms: Some(60_000),
                retries: Some(0),
            }),
            ..Approvals::default()
        });
        c
    });
    let held = w.charge(BROWSER, "ch_hang", &[]);
    let id = w.wait_listed(&charge_path("ch_hang"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The receiver has the notification and keeps the gateway waiting.
    let got = hook.wait_request(|r| r["path"] == "/hook", EVENT);
    assert_eq!(
        got["headers"]["x-gateway-approval-id"][0],
        id.as_str(),
        "{got}"
    );
    let conn = got["conn"].as_u64().unwrap();
    assert!(
        poll(EVENT, || hook.hanging().contains(&conn).then_some(())).is_some(),
        "{}",
        hook.log().tail(10)
    );
    assert_ok(&w.approve(&id, &w.token(ALICE, &[APPROVER_DUTY]), None));
    assert_charged(&Answer::of(&held.finish()), "ch_hang");
    w.approval_event(&id, "approved");
    // ... while the webhook delivery is still waiting for its answer.
    assert!(
        hook.hanging().contains(&conn),
        "the webhook connection was given up: {}",
        hook.log().tail(10)
    );
    let webhook_events: Vec<Value> = w
        .daemon
        .events()
        .into_iter()
        .filter(|v| is_event(v, "webhook"))
        .collect();
    assert!(webhook_events.is_empty(), "{webhook_events:?}");
}

#[test]
fn a_client_that_goes_away_cancels_its_approval() {
    let w = World::new();
    let gone = w.charge(BROWSER, "ch_gone", &["--max-time", "3"]);
    let path = charge_path("ch_gone");
    let id = w.wait_listed(&path)["id"].as_str().unwrap().to_owned();
    let out = gone.finish();
    assert_eq!(
        out.status.code(),
        Some(28),
        "curl must give up (timeout): {out:?}"
    );
    w.wait_unlisted(&id);
    let ev = w.approval_event(&id, "cancelled");
    assert_eq!(text(&ev, "identity"), BROWSER, "{ev}");
    assert_eq!(text(&ev, "path"), path, "{ev}");
    assert_refused(
        &w.approve(&id, &w.token(ALICE, &[APPROVER_DUTY]), None),
        "no pending approval",
    );
    assert!(w.origin_posts(&path).is_empty());
}

#[test]
fn http_admin_api_needs_an_approver_token_and_decides() {
    let w = World::with(false, |mut c| {
        c.approvals = Some(Approvals {
            api_listen: Some("127.0.0.1:0".into()),
            ..Approvals::default()
        });
        c
    });
    let api: SocketAddr = text(
        &w.daemon.wait_event(|v| is_event(v, "approvals_api"), EVENT),
        "listen",
    )
    .parse()
    .expect("approvals_api event with the bound address");
    let held = w.charge(BROWSER, "ch_api", &[]);
    let path = charge_path("ch_api");
    let id = w.wait_listed(&path)["id"].as_str().unwrap().to_owned();
    let call = |method: &str, url: &str, token: Option<&str>, body: &str| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        hook::request(api, method, url, &headers, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    };
    let forged = w.provider.mint(&json!({
        "claims": {"sub": ALICE, "aud": AUDIENCE, "groups": [APPROVER_DUTY]},
        "foreign_key": true,
    }));
    let alice = w.raw_token(ALICE, &[APPROVER_DUTY]);
    let mallory = w.raw_token(MALLORY, &[REQUESTER_DUTY]);
    let own = w.raw_token(BROWSER_SUB, &[APPROVER_DUTY]);

    let r = call("GET", "/v1/approvals", None, "");
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer")),
        "{r:?}"
    );
    let r = call("GET", "/v1/approvals", Some(&forged), "");
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("bad_signature"),
        "{r:?}"
    );
    let r = call("GET", "/v1/approvals", Some(&mallory), "");
    assert_eq!(r.status, 403, "{r:?}");
    let r = call(
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        Some(&mallory),
        "{}",
    );
    assert_eq!(r.status, 403, "{r:?}");
    let r = call(
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        Some(&forged),
        "{}",
    );
    assert_eq!(r.status, 401, "{r:?}");

    let r = call("GET", "/v1/approvals", Some(&alice), "");
    assert_eq!(r.status, 200, "{r:?}");
    let listed = r.json()["approvals"].clone();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id.as_str()),
        "{r:?}"
    );
    let r = call("GET", &format!("/v1/approvals/{id}"), Some(&alice), "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["approval"]["request"]["path"],
        path.as_str(),
        "{r:?}"
    );
    let r = call("GET", "/v1/approvals/apr-000000000000", Some(&alice), "");
    assert_eq!(r.status, 404, "{r:?}");

    // Self-approval over HTTP is refused like on the command line.
    let r = call(
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        Some(&own),
        "{}",
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("self-approval"), "{r:?}");
    assert!(w.origin_posts(&path).is_empty());

    let r = call(
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        Some(&alice),
        r#"{"window_minutes": 5}"#,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["approved"], id.as_str(), "{r:?}");
    assert_eq!(r.json()["window_minutes"], 5, "{r:?}");
    assert_charged(&Answer::of(&held.finish()), "ch_api");
    let ev = w.approval_event(&id, "approved");
    assert_eq!(text(&ev, "approver"), ALICE, "{ev}");
    let r = call(
        "POST",
        &format!("/v1/approvals/{id}/deny"),
        Some(&alice),
        "{}",
    );
    assert_eq!(r.status, 404, "{r:?}");
    // Refusals over HTTP are audited too.
    let refused = w
        .approval_events(|v| v["approval_id"] == id.as_str() && v["outcome"] == "approver_refused");
    assert_eq!(refused.len(), 3, "{refused:?}");
}

#[test]
fn windows_survive_a_restart_and_a_crash_aborts_what_was_held() {
    let mut w = World::new();
    let alice = w.token(ALICE, &[APPROVER_DUTY]);
    let held = w.charge(BROWSER, "ch_before", &[]);
    let id = w.wait_listed(&charge_path("ch_before"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ok(&w.approve(&id, &alice, Some(30)));
    assert_charged(&Answer::of(&held.finish()), "ch_before");

    // Held when the daemon dies.
    let doomed = w.charge(AGENT, "ch_crash", &[]);
    let doomed_id = w.wait_listed(&charge_path("ch_crash"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    w.daemon.kill9();
    let out = doomed.finish();
    assert!(!out.status.success(), "{out:?}");
    w.daemon.start_again();
    for identity in [BROWSER, AGENT] {
        w.daemon.wait_event(
            |v| is_event(v, "identity_token") && text(v, "identity") == identity,
            Duration::from_secs(20),
        );
    }
    let aborted = w.approval_event(&doomed_id, "aborted");
    assert_eq!(text(&aborted, "identity"), AGENT, "{aborted}");
    assert_eq!(text(&aborted, "path"), charge_path("ch_crash"), "{aborted}");
    assert!(w.origin_posts(&charge_path("ch_crash")).is_empty());
    assert!(w.listed().is_empty(), "{}", w.list());
    let restored = w.approval_event(&id, "window_restored");
    assert_eq!(text(&restored, "identity"), BROWSER, "{restored}");
    assert_eq!(text(&restored, "approver"), ALICE, "{restored}");

    // The window still lets the same identity through.
    let after = w.charge(BROWSER, "ch_after", &[]);
    assert_charged(&Answer::of(&after.finish()), "ch_after");
    let http = w.http_event(&charge_path("ch_after"));
    assert_eq!(text(&http, "approval_id"), id, "{http}");

    // A clean stop (SIGTERM) aborts what is held too.
    let stopped = w.charge(AGENT, "ch_stop", &[]);
    let stopped_id = w.wait_listed(&charge_path("ch_stop"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = w.daemon.terminate();
    assert!(status.success(), "{status:?}");
    let ev = w.approval_event(&stopped_id, "aborted");
    assert_eq!(text(&ev, "identity"), AGENT, "{ev}");
    // The stopping daemon answers the held client before it goes: a 403
    // naming the approval and saying it was aborted.
    let out = stopped.finish();
    let answer = Answer::of(&out);
    assert_eq!(answer.status, 403, "{out:?}");
    assert!(
        answer.body.contains(&stopped_id) && answer.body.contains("aborted"),
        "{out:?}"
    );
    assert!(w.origin_posts(&charge_path("ch_stop")).is_empty());
}

#[test]
fn l4_approve_rule_holds_the_connection_before_the_upstream_connect() {
    let w = World::new();
    let target = format!("{}:{LEDGER_PORT}", w.net.ns_v4());
    let mut repl = Repl::spawn(w.daemon.exec(BROWSER, probe().path(), ["repl"]));
    let mark = w.ledger.mark();
    let opener = {
        let target = target.clone();
        std::thread::spawn(move || {
            let v = repl.send(&format!("open {target}"));
            (repl, v)
        })
    };
    let a = w.wait_listed_by(|a| a["request"]["destination"] == target.as_str());
    let id = a["id"].as_str().unwrap().to_owned();
    assert_eq!(a["rule"], L4_RULE, "{a}");
    assert_eq!(a["request"]["kind"], "connection", "{a}");
    assert_eq!(a["requester"]["identity"], BROWSER, "{a}");
    // Held before the upstream connect: the ledger has seen nobody.
    w.ledger.assert_nothing_since(mark, LEDGER_PORT);
    assert!(!opener.is_finished());

    assert_ok(&w.approve(&id, &w.token(ALICE, &[APPROVER_DUTY]), Some(10)));
    let (mut repl, opened) = opener.join().unwrap();
    assert_eq!(opened["ok"], true, "{opened}");
    assert_eq!(
        opened["greeting"],
        format!("port={LEDGER_PORT}"),
        "{opened}"
    );
    // Under the window a second connection goes straight through, both
    // ways.
    let echoed = repl.send(&format!("tcp {target} hello-ledger"));
    assert_eq!(
        echoed["received"],
        format!("port={LEDGER_PORT}\nhello-ledger"),
        "{echoed}"
    );
    repl.send("close");
    drop(repl);

    let approved = w.approval_event(&id, "approved");
    assert_eq!(text(&approved, "kind"), "connection", "{approved}");
    assert_eq!(text(&approved, "approver"), ALICE, "{approved}");
    let conns = w.daemon.wait_events(
        2,
        |v| is_event(v, "connection") && v["orig_dst"] == target.as_str(),
        EVENT,
    );
    for c in &conns {
        assert_eq!(text(c, "rule"), L4_RULE, "{c}");
        assert_eq!(text(c, "approval_id"), id, "{c}");
        assert_eq!(text(c, "approver"), ALICE, "{c}");
        assert!(num(c, "bytes_down").unwrap_or(0) > 0, "{c}");
    }
    let by_window = w.approval_event(&id, "approved_by_window");
    assert_eq!(text(&by_window, "kind"), "connection", "{by_window}");
    assert_eq!(text(&by_window, "approver"), ALICE, "{by_window}");
    let pendings = w.approval_events(|v| v["outcome"] == "pending");
    assert_eq!(pendings.len(), 1, "{pendings:?}");
}
