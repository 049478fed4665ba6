//! Issue 3, identity: every connection carries a verified OIDC identity —
//! subject, claims, duties — or it is refused. A real OpenID provider (npm
//! `oidc-provider`, see `tests/oidc`) issues the client-credentials tokens
//! the daemon fetches for itself and signs the job tokens the tests enroll;
//! the daemon attaches to real cgroups and the probes' real sockets go
//! through it to origins in a network namespace of their own.

use gateway_tests::daemon::{Rule, is_event, num, text};
use gateway_tests::oidc::{AUDIENCE, Client, OidcProvider, Options};
use gateway_tests::{
    Config, Daemon, Origin, Probe, ProbeRun, TempDir, TestNet, cgroup, gateway_bin, poll,
    require_root, unique,
};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Barrier;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Origins listen on this range in the test namespace.
const FIRST_PORT: u16 = 20001;
const LAST_PORT: u16 = 20010;
/// The duty the partner rule requires.
const DUTY: &str = "browser-executor";
const SHOP: &str = "acme/shop";

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_gw-probe"))
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A client secret no other test uses, so finding it in output is a leak.
fn secret() -> String {
    format!("secret-{}-{:016x}", unique("cc"), rand::random::<u64>())
}

/// One test's world. Fields drop in declaration order: the daemon (and its
/// cgroups) first, the namespace last.
struct World {
    daemon: Daemon,
    origin: Origin,
    net: TestNet,
    probe: Probe,
    tmp: TempDir,
}

impl World {
    /// An origin on `FIRST_PORT..=LAST_PORT`, a daemon with no static
    /// identity, default block, configured by `config`.
    fn new(config: impl FnOnce(Config, &TestNet) -> Config) -> World {
        require_root();
        let probe = probe();
        let net = TestNet::new();
        let origin = Origin::start(&net, &probe, &[net.ns_v4().into()], FIRST_PORT..=LAST_PORT);
        let mut cfg = Config::new();
        cfg.identities.clear();
        cfg.policy_default = "block".into();
        let daemon = Daemon::start(config(cfg, &net));
        World {
            daemon,
            origin,
            net,
            probe,
            tmp: TempDir::new(),
        }
    }

    fn dst(&self, port: u16) -> String {
        format!("{}:{port}", self.net.ns_v4())
    }

    /// The probe under `gateway exec --identity <identity>`.
    fn run_as(&self, identity: &str, port: u16, send: &str) -> ProbeRun {
        ProbeRun::of(self.daemon.exec(
            identity,
            self.probe.path(),
            ["tcp", &self.dst(port), "--send", send],
        ))
    }

    /// The probe started inside `job`'s cgroup (moved there before exec).
    fn run_in(&self, job: &JobCgroup, port: u16, send: &str) -> ProbeRun {
        ProbeRun::of(job.command(&self.probe.command(["tcp", &self.dst(port), "--send", send])))
    }

    /// `gateway enroll` of `token` for `job`, run from outside every tagged
    /// cgroup.
    fn enroll(&self, job: &JobCgroup, token: &str) -> Output {
        let file = self.token_file(token);
        self.daemon
            .enroll(&job.rel, &file)
            .output()
            .expect("run gateway enroll")
    }

    fn token_file(&self, token: &str) -> PathBuf {
        let file = self.tmp.path().join(unique("token"));
        std::fs::write(&file, token).unwrap();
        file
    }

    /// The daemon's `enroll` audit event for `job`, the `n`th (from 1).
    fn enroll_event(&self, job: &JobCgroup, n: usize) -> Value {
        let cg = job.path();
        self.daemon
            .wait_events(
                n,
                |v| is_event(v, "enroll") && text(v, "cgroup") == cg,
                Duration::from_secs(10),
            )
            .swap_remove(n - 1)
    }

    /// `identities[name]` of `gateway status --json`.
    fn status_identity(&self, name: &str) -> Value {
        let status = self.daemon.status_json();
        status["identities"]
            .as_array()
            .unwrap_or_else(|| panic!("status has no identities list: {status}"))
            .iter()
            .find(|i| i["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("status lists no identity {name}: {status}"))
    }

    /// The client-credentials identity's first `identity_token` event.
    fn wait_token(&self, identity: &str) -> Value {
        self.daemon.wait_event(
            |v| is_event(v, "identity_token") && text(v, "identity") == identity,
            Duration::from_secs(20),
        )
    }

    /// The probe got the origin's greeting and its own bytes back, and the
    /// daemon audited an allowed, relayed connection. Returns the event.
    fn assert_allowed(&self, run: &ProbeRun, port: u16, sent: &str) -> Value {
        let r = &run.json;
        assert_eq!(
            text(r, "received"),
            format!("port={port}\n{sent}"),
            "the connection must go through to the origin: {run:?}"
        );
        assert_eq!(run.status.code(), Some(0), "{run:?}");
        let ev = self.daemon.wait_connection(run.pid(), port);
        assert_eq!(text(&ev, "decision"), "allow", "{ev}");
        assert_eq!(text(&ev, "outcome"), "closed", "{ev}");
        assert_eq!(num(&ev, "bytes_up"), Some(sent.len() as u64), "{ev}");
        ev
    }

    /// The probe got nothing and the daemon audited a refusal. Returns the
    /// event.
    fn assert_refused(&self, run: &ProbeRun, port: u16) -> Value {
        assert_eq!(
            text(&run.json, "received"),
            "",
            "a refused connection must get no bytes: {run:?}"
        );
        let ev = self.daemon.wait_connection(run.pid(), port);
        assert_eq!(text(&ev, "outcome"), "refused", "{ev}");
        assert_eq!(num(&ev, "bytes_up"), Some(0), "{ev}");
        assert_eq!(num(&ev, "bytes_down"), Some(0), "{ev}");
        ev
    }

    /// None of `secrets` appears in anything the daemon wrote or in status.
    fn assert_never_shown(&self, secrets: &[&str]) {
        let status = self.daemon.status_json().to_string();
        let output = self.daemon.all_output();
        for s in secrets {
            assert!(s.len() >= 16, "too short to search for: {s:?}");
            assert!(
                !output.contains(s),
                "a secret or token appears in the daemon's output: {s}"
            );
            assert!(
                !status.contains(s),
                "a secret or token appears in `gateway status`: {s}"
            );
        }
    }
}

/// A job's cgroup below an identity's cgroup, removed on drop.
struct JobCgroup {
    dir: PathBuf,
    /// Relative to the cgroup2 mount, no leading `/` (what `enroll` takes).
    rel: String,
}

impl JobCgroup {
    fn new(daemon: &Daemon, identity: &str) -> JobCgroup {
        let dir = daemon.identity_cgroup(identity).join(unique("job"));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
        let rel = dir
            .strip_prefix(cgroup::cgroup2_mount())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        JobCgroup { dir, rel }
    }

    /// As the kernel and the daemon name it: `/<rel>`.
    fn path(&self) -> String {
        format!("/{}", self.rel)
    }

    /// `cmd` moved into this cgroup between fork and exec (the way a CI
    /// runner starts a job step), so every socket it opens is the job's.
    fn command(&self, cmd: &Command) -> Command {
        let mut c = Command::new(cmd.get_program());
        c.args(cmd.get_args());
        let procs = CString::new(self.dir.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        // SAFETY: the closure only makes async-signal-safe calls (open,
        // write, close) on memory allocated before the fork.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n == 1 { Ok(()) } else { Err(err) }
            });
        }
        c
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        cgroup::remove_tree(&self.dir);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A JSON object logged as a string (`claims`).
fn claims_of(ev: &Value) -> Value {
    let s = text(ev, "claims");
    let v: Value = serde_json::from_str(&s)
        .unwrap_or_else(|e| panic!("claims {s:?} is not a JSON object ({e}): {ev}"));
    assert!(v.is_object(), "claims must be a JSON object: {ev}");
    v
}

/// The JOSE header of a JWT, unverified.
fn header_of(token: &str) -> Value {
    // Reuse the driver's decoder on a token whose payload is the header.
    let head = token.split('.').next().unwrap();
    gateway_tests::oidc::peek_claims(&format!("x.{head}.x"))
}

/// A rule: `duties` may reach the test namespace on `port`.
fn duty_rule(id: &str, net: &TestNet, port: u16, duties: &[&str]) -> Rule {
    Rule {
        duties: duties.iter().map(|d| d.to_string()).collect(),
        ips: vec![format!("{}/32", net.ns_v4())],
        ports: vec![port.to_string()],
        ..Rule::new(id, "allow")
    }
}

/// A rule: jobs of repository `repo` may reach the namespace on `port`.
fn repo_rule(id: &str, net: &TestNet, port: u16, repo: &str) -> Rule {
    Rule {
        identities: vec!["jobs".into()],
        claims: vec![("repository".into(), vec![repo.into()])],
        ips: vec![format!("{}/32", net.ns_v4())],
        ports: vec![port.to_string()],
        ..Rule::new(id, "allow")
    }
}

/// GitHub-Actions-style claims of a job token for `repo`.
fn job_claims(audience: &str, repo: &str) -> Value {
    json!({
        "sub": format!("repo:{repo}:ref:refs/heads/main"),
        "aud": audience,
        "repository": repo,
        "ref": "refs/heads/main",
        "workflow": "e2e",
        "actor": "octocat",
        "run_id": "4711",
    })
}

#[test]
fn client_credentials_identity_is_allowed_where_its_duty_permits_and_refused_elsewhere() {
    require_root();
    let secret = secret();
    let p = OidcProvider::start(
        &[Client::new("ci-browser", &secret, &[DUTY])],
        Options::default(),
    );
    let w = World::new(|c, net| {
        c.client_credentials_identity("browser", p.issuer(), "ci-browser", &secret, Some(AUDIENCE))
            .rule(duty_rule("partner", net, FIRST_PORT, &[DUTY]))
            .rule(duty_rule("admin-api", net, FIRST_PORT + 1, &["admin"]))
    });
    let tok = w.wait_token("browser");
    assert_eq!(text(&tok, "subject"), "ci-browser", "{tok}");
    assert_eq!(text(&tok, "duties"), DUTY, "{tok}");

    let st = w.status_identity("browser");
    assert_eq!(st["source"], "client_credentials", "{st}");
    assert_eq!(st["identity"]["subject"], "ci-browser", "{st}");
    assert_eq!(st["identity"]["duties"], json!([DUTY]), "{st}");
    let exp = st["identity"]["expires_at_unix"].as_f64().unwrap_or(0.0);
    assert!(exp > now_unix(), "the token must be valid now: {st}");

    // Allowed by the duty rule.
    let run = w.run_as("browser", FIRST_PORT, "to the partner");
    let ev = w.assert_allowed(&run, FIRST_PORT, "to the partner");
    assert_eq!(text(&ev, "identity"), "browser", "{ev}");
    assert_eq!(text(&ev, "subject"), "ci-browser", "{ev}");
    assert_eq!(text(&ev, "duties"), DUTY, "{ev}");
    assert_eq!(text(&ev, "identity_source"), "client_credentials", "{ev}");
    assert_eq!(text(&ev, "rule"), "partner", "{ev}");
    assert_eq!(claims_of(&ev)["sub"], "ci-browser", "{ev}");

    // Refused: a rule covers the destination but wants a duty it lacks, and
    // a destination no rule covers. Nothing reaches the origin.
    let mark = w.origin.mark();
    let run = w.run_as("browser", FIRST_PORT + 1, "to the admin api");
    let ev = w.assert_refused(&run, FIRST_PORT + 1);
    assert_eq!(text(&ev, "decision"), "block", "{ev}");
    assert_eq!(text(&ev, "rule"), "default", "{ev}");
    assert_eq!(text(&ev, "subject"), "ci-browser", "{ev}");
    assert_eq!(text(&ev, "identity_source"), "client_credentials", "{ev}");
    assert!(
        text(&ev, "reason").contains(
            "identity browser holds none of the duties [admin] that rule admin-api requires"
        ),
        "the reason must name the missing duty: {ev}"
    );
    w.origin.assert_nothing_since(mark, FIRST_PORT + 1);
    let mark = w.origin.mark();
    let run = w.run_as("browser", FIRST_PORT + 2, "anywhere else");
    let ev = w.assert_refused(&run, FIRST_PORT + 2);
    assert_eq!(text(&ev, "decision"), "block", "{ev}");
    assert!(
        text(&ev, "reason").contains("default block"),
        "the reason must say the default blocked it: {ev}"
    );
    w.origin.assert_nothing_since(mark, FIRST_PORT + 2);

    w.assert_never_shown(&[&secret]);
}

#[test]
fn enrolled_job_token_is_accepted_and_bad_tokens_are_refused_with_distinct_reasons() {
    require_root();
    // A second, real provider the gateway does not trust, started alongside.
    let untrusted = std::thread::spawn(|| OidcProvider::start(&[], Options::default()));
    let p = OidcProvider::start(&[], Options::default());
    let w = World::new(|c, net| {
        c.trusted_issuer(p.issuer(), &[AUDIENCE])
            .enrolled_identity("jobs", &[])
            .rule(repo_rule("shop-deploy", net, FIRST_PORT, SHOP))
    });
    let untrusted = untrusted.join().expect("second provider");
    assert_ne!(untrusted.issuer(), p.issuer());

    // Not enrolled yet: refused.
    let job = JobCgroup::new(&w.daemon, "jobs");
    let run = w.run_in(&job, FIRST_PORT, "too early");
    assert_eq!(text(&run.json, "cgroup"), job.path(), "{run:?}");
    let ev = w.assert_refused(&run, FIRST_PORT);
    assert!(
        text(&ev, "reason").contains(&format!(
            "no job token is enrolled for cgroup {}",
            job.path()
        )),
        "{ev}"
    );

    // Enrolled with a good job token: allowed by the claims rule.
    let good = p.mint_job_token(AUDIENCE, SHOP, 300);
    let out = w.enroll(&job, &good);
    assert!(
        out.status.success() && stdout(&out).contains("enrolled"),
        "enrolling a good token must succeed: {out:?}"
    );
    let ev = w.enroll_event(&job, 1);
    assert_eq!(text(&ev, "outcome"), "enrolled", "{ev}");
    assert_eq!(text(&ev, "identity"), "jobs", "{ev}");
    assert_eq!(
        text(&ev, "subject"),
        format!("repo:{SHOP}:ref:refs/heads/main"),
        "{ev}"
    );
    let claims = claims_of(&ev);
    for (k, v) in [
        ("repository", SHOP),
        ("ref", "refs/heads/main"),
        ("workflow", "e2e"),
        ("actor", "octocat"),
        ("run_id", "4711"),
    ] {
        assert_eq!(claims[k], v, "enroll event claim {k}: {ev}");
    }
    let run = w.run_in(&job, FIRST_PORT, "deploy");
    let ev = w.assert_allowed(&run, FIRST_PORT, "deploy");
    assert_eq!(text(&ev, "identity"), "jobs", "{ev}");
    assert_eq!(text(&ev, "identity_source"), "enrolled", "{ev}");
    assert_eq!(text(&ev, "rule"), "shop-deploy", "{ev}");
    assert_eq!(text(&ev, "cgroup"), job.path(), "{ev}");
    assert_eq!(claims_of(&ev)["repository"], SHOP, "{ev}");
    assert_eq!(claims_of(&ev)["run_id"], "4711", "{ev}");
    let st = w.status_identity("jobs");
    let enrolled = st["enrolled"].as_array().cloned().unwrap_or_default();
    assert!(
        enrolled
            .iter()
            .any(|e| e["cgroup"] == job.path().as_str() && e["subject"] == text(&ev, "subject")),
        "status must list the enrollment: {st}"
    );

    // A valid token of another repository: enrolled, but the claims rule
    // does not let it through.
    let other_job = JobCgroup::new(&w.daemon, "jobs");
    let other = p.mint_job_token(AUDIENCE, "acme/other", 300);
    let out = w.enroll(&other_job, &other);
    assert!(out.status.success(), "{out:?}");
    let run = w.run_in(&other_job, FIRST_PORT, "not my repo");
    let ev = w.assert_refused(&run, FIRST_PORT);
    assert_eq!(claims_of(&ev)["repository"], "acme/other", "{ev}");
    assert!(
        text(&ev, "reason").contains("rule shop-deploy"),
        "the reason must name the rule it failed: {ev}"
    );

    // Bad tokens: each refused with its own code and reason.
    let now = now_unix() as i64;
    let mut expired_claims = job_claims(AUDIENCE, SHOP);
    expired_claims["iat"] = json!(now - 600);
    expired_claims["exp"] = json!(now - 120);
    let bad = [
        (
            "expired",
            p.mint(&json!({ "claims": expired_claims })),
            "token expired at",
        ),
        (
            "wrong_audience",
            p.mint_job_token("https://other.test", SHOP, 300),
            "https://other.test",
        ),
        (
            "bad_signature",
            p.mint(&json!({ "claims": job_claims(AUDIENCE, SHOP), "foreign_key": true })),
            "signature does not verify",
        ),
        (
            "alg_not_allowed",
            p.mint(&json!({ "claims": job_claims(AUDIENCE, SHOP), "alg": "none" })),
            "`none`",
        ),
        (
            "untrusted_issuer",
            untrusted.mint_job_token(AUDIENCE, SHOP, 300),
            untrusted.issuer(),
        ),
    ];
    let mut reasons = BTreeSet::new();
    let mark = w.origin.mark();
    let mut jobs = Vec::new();
    for (code, token, why) in &bad {
        let job = JobCgroup::new(&w.daemon, "jobs");
        let out = w.enroll(&job, token);
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "enrolling a {code} token must fail: {out:?}"
        );
        assert!(
            err.contains(&format!("gateway: token refused ({code}): ")) && err.contains(why),
            "enroll of a {code} token must say `token refused ({code})` and {why:?}: {err}"
        );
        assert!(
            !err.contains(token.as_str()),
            "the error must not echo the token: {err}"
        );
        let ev = w.enroll_event(&job, 1);
        assert_eq!(text(&ev, "outcome"), "refused", "{code}: {ev}");
        assert!(
            text(&ev, "reason").contains(&format!("({code})")),
            "the audit must carry the code {code}: {ev}"
        );
        reasons.insert(text(&ev, "reason"));
        let run = w.run_in(&job, FIRST_PORT, "with a bad token");
        let ev = w.assert_refused(&run, FIRST_PORT);
        assert!(
            text(&ev, "reason").contains("no job token is enrolled"),
            "{code}: traffic must stay refused: {ev}"
        );
        jobs.push(job);
    }
    assert_eq!(reasons.len(), bad.len(), "reasons must differ: {reasons:?}");
    w.origin.assert_nothing_since(mark, FIRST_PORT);
    let st = w.status_identity("jobs");
    for job in &jobs {
        assert!(
            !st.to_string().contains(&job.path()),
            "a refused token must not be listed as enrolled: {st}"
        );
    }

    let mut tokens: Vec<&str> = vec![&good, &other];
    tokens.extend(bad.iter().map(|(_, t, _)| t.as_str()));
    // The signature alone is a leak too (`none` has none).
    let sigs: Vec<&str> = tokens
        .iter()
        .filter_map(|t| t.rsplit('.').next())
        .filter(|s| !s.is_empty())
        .collect();
    tokens.extend(sigs);
    w.assert_never_shown(&tokens);
}

#[test]
fn key_rotation_at_the_provider_is_picked_up_without_restart() {
    require_root();
    let p = OidcProvider::start(&[], Options::default());
    let w = World::new(|mut c, net| {
        c.jwks_min_refetch_secs = Some(1);
        c.trusted_issuer(p.issuer(), &[AUDIENCE])
            .enrolled_identity("jobs", &[])
            .rule(repo_rule("shop-deploy", net, FIRST_PORT, SHOP))
    });

    let before = p.kids();
    let first = JobCgroup::new(&w.daemon, "jobs");
    let token_a = p.mint_job_token(AUDIENCE, SHOP, 300);
    let kid_a = header_of(&token_a)["kid"].as_str().unwrap().to_owned();
    assert!(before.contains(&kid_a), "{kid_a} vs {before:?}");
    let out = w.enroll(&first, &token_a);
    assert!(out.status.success(), "enroll with key A: {out:?}");

    // New keys at the provider, first in its JWKS; the next token uses one.
    let after = p.rotate_keys();
    let token_b = p.mint_job_token(AUDIENCE, SHOP, 300);
    let kid_b = header_of(&token_b)["kid"].as_str().unwrap().to_owned();
    assert!(
        after.contains(&kid_b) && !before.contains(&kid_b),
        "the new token must be signed by a new key: {kid_b}, before {before:?}, after {after:?}"
    );

    // The daemon refetches the JWKS for the unknown kid (at most once per
    // second, so the first attempt may be rate-limited).
    let second = JobCgroup::new(&w.daemon, "jobs");
    let mut refusals = Vec::new();
    let enrolled = poll(Duration::from_secs(10), || {
        let out = w.enroll(&second, &token_b);
        if out.status.success() {
            return Some(out);
        }
        refusals.push(stderr(&out));
        None
    });
    assert!(
        enrolled.is_some(),
        "a token signed by the rotated key must enroll without a restart; refusals: {refusals:?}"
    );
    for r in &refusals {
        assert!(
            r.contains("(unknown_key)") && r.contains(&kid_b),
            "only the refetch rate limit may delay it: {r}"
        );
    }
    // Rate-limited: the refusals above did not each refetch the JWKS (one
    // fetch at the first enrollment, one for the new kid).
    let fetches = w
        .daemon
        .events()
        .iter()
        .filter(|v| text(v, "message").contains("signing keys") && text(v, "issuer") == p.issuer())
        .count();
    assert!(
        fetches <= 2,
        "{fetches} JWKS fetches for {} enroll attempts",
        refusals.len() + 2
    );
    let run = w.run_in(&second, FIRST_PORT, "after rotation");
    let ev = w.assert_allowed(&run, FIRST_PORT, "after rotation");
    assert_eq!(text(&ev, "identity_source"), "enrolled", "{ev}");
    assert_eq!(text(&ev, "cgroup"), second.path(), "{ev}");
    assert_eq!(
        w.daemon
            .events()
            .iter()
            .filter(|v| is_event(v, "ready"))
            .count(),
        1,
        "the daemon must not have restarted"
    );
}

#[test]
fn provider_stopped_after_issuing_a_token_traffic_works_until_it_expires() {
    const TTL: u64 = 8;
    require_root();
    let secret = secret();
    let mut p = OidcProvider::start(
        &[Client::new("ci-short", &secret, &[DUTY]).ttl(TTL)],
        Options::default(),
    );
    let w = World::new(|c, net| {
        c.client_credentials_identity("browser", p.issuer(), "ci-short", &secret, Some(AUDIENCE))
            .rule(duty_rule("partner", net, FIRST_PORT, &[DUTY]))
    });
    w.wait_token("browser");
    let run = w.run_as("browser", FIRST_PORT, "before the outage");
    w.assert_allowed(&run, FIRST_PORT, "before the outage");

    p.stop();
    let st = w.status_identity("browser");
    let exp = st["identity"]["expires_at_unix"]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no token expiry: {st}"));
    let left = exp as f64 - now_unix();
    assert!(
        left > 1.0 && left <= TTL as f64 + 1.0,
        "the {TTL} s token must still be valid for a while: {left:.1} s left ({st})"
    );

    // Probe until refused: every probe that finished before the expiry must
    // have gone through; the first refusal names the expiry.
    let mut ok_after_stop = 0;
    let mut ok_after_failed_refresh = 0;
    let mut refused = None;
    let deadline = exp as f64 + 10.0;
    while refused.is_none() && now_unix() < deadline {
        let refresh_failed = w
            .daemon
            .events()
            .iter()
            .any(|v| is_event(v, "identity_token_failed") && text(v, "identity") == "browser");
        let sent = format!("during the outage {ok_after_stop}");
        let run = w.run_as("browser", FIRST_PORT, &sent);
        let ended = now_unix();
        let received = text(&run.json, "received");
        if received == format!("port={FIRST_PORT}\n{sent}") {
            ok_after_stop += 1;
            if refresh_failed {
                ok_after_failed_refresh += 1;
            }
        } else {
            assert!(
                ended >= exp as f64,
                "refused at {ended:.3}, before the token's expiry {exp}: {run:?}"
            );
            refused = Some(w.assert_refused(&run, FIRST_PORT));
        }
        // Pace the probes; each one's outcome is what is checked.
        std::thread::sleep(Duration::from_millis(100));
    }
    let ev = refused.unwrap_or_else(|| panic!("still allowed 10 s after the expiry {exp}"));
    assert!(
        ok_after_stop > 0,
        "traffic must work after the provider stopped"
    );
    assert!(
        ok_after_failed_refresh > 0,
        "traffic must work after a refresh failed and before the expiry ({ok_after_stop} ok)"
    );
    // And it stays refused for that reason, also once the daemon has
    // retried the provider (in vain) after the expiry.
    let is_failure =
        |v: &Value| is_event(v, "identity_token_failed") && text(v, "identity") == "browser";
    let failures = w.daemon.events().iter().filter(|v| is_failure(v)).count();
    w.daemon
        .wait_events(failures + 1, is_failure, Duration::from_secs(40));
    let run = w.run_as("browser", FIRST_PORT, "still expired");
    let later = w.assert_refused(&run, FIRST_PORT);
    let expired = format!("the token of identity browser (subject ci-short) expired at {exp}");
    for (when, ev) in [
        ("first refusal", &ev),
        ("after a later failed refresh", &later),
    ] {
        assert!(
            text(ev, "reason").contains(&expired),
            "{when}: the refusal must name the expiry ({expired:?}): {ev}"
        );
        assert_eq!(text(ev, "identity"), "browser", "{ev}");
    }
    w.assert_never_shown(&[&secret]);
}

#[test]
fn two_cgroups_with_different_duties_get_different_outcomes_concurrently() {
    const COUNT: usize = 20;
    require_root();
    let (browser_secret, reader_secret) = (secret(), secret());
    let p = OidcProvider::start(
        &[
            Client::new("ci-browser", &browser_secret, &[DUTY]),
            Client::new("ci-reader", &reader_secret, &["reader"]),
        ],
        Options::default(),
    );
    let w = World::new(|c, net| {
        c.client_credentials_identity(
            "browser",
            p.issuer(),
            "ci-browser",
            &browser_secret,
            Some(AUDIENCE),
        )
        .client_credentials_identity(
            "reader",
            p.issuer(),
            "ci-reader",
            &reader_secret,
            Some(AUDIENCE),
        )
        .rule(duty_rule("partner", net, FIRST_PORT, &[DUTY]))
    });
    assert_eq!(text(&w.wait_token("browser"), "duties"), DUTY);
    assert_eq!(text(&w.wait_token("reader"), "duties"), "reader");

    // Both at once, to the same destination: COUNT connections each, all
    // open together inside each process, both processes started together.
    let mark = w.origin.mark();
    let dst = w.dst(FIRST_PORT);
    let start = Barrier::new(2);
    let run = |identity: &str| {
        let cmd = w.daemon.exec(
            identity,
            w.probe.path(),
            ["many", "--count", &COUNT.to_string(), &dst],
        );
        start.wait();
        ProbeRun::of(cmd)
    };
    let (browser, reader) = std::thread::scope(|s| {
        let b = s.spawn(|| run("browser"));
        let r = s.spawn(|| run("reader"));
        (b.join().unwrap(), r.join().unwrap())
    });
    assert_eq!(
        num(&browser.json, "ok_count"),
        Some(COUNT as u64),
        "every browser connection must go through: {browser:?}"
    );
    assert_eq!(
        num(&reader.json, "ok_count"),
        Some(0),
        "no reader connection may go through: {reader:?}"
    );

    let events = |pid: u64| {
        w.daemon.wait_events(
            COUNT,
            |v| is_event(v, "connection") && num(v, "pid") == Some(pid),
            Duration::from_secs(10),
        )
    };
    for ev in events(browser.pid()) {
        assert_eq!(text(&ev, "identity"), "browser", "{ev}");
        assert_eq!(text(&ev, "subject"), "ci-browser", "{ev}");
        assert_eq!(text(&ev, "decision"), "allow", "{ev}");
        assert_eq!(text(&ev, "rule"), "partner", "{ev}");
        assert_eq!(text(&ev, "outcome"), "closed", "{ev}");
    }
    for ev in events(reader.pid()) {
        assert_eq!(text(&ev, "identity"), "reader", "{ev}");
        assert_eq!(text(&ev, "subject"), "ci-reader", "{ev}");
        assert_eq!(text(&ev, "identity_source"), "client_credentials", "{ev}");
        assert_eq!(text(&ev, "decision"), "block", "{ev}");
        assert_eq!(text(&ev, "outcome"), "refused", "{ev}");
        assert!(
            text(&ev, "reason").contains(&format!(
                "identity reader holds none of the duties [{DUTY}] that rule partner requires"
            )),
            "{ev}"
        );
    }
    // Exactly the browser's connections reached the origin: count what it
    // accepted between two control connections.
    let end = w.origin.mark();
    let reached = w.origin.accepted_since(mark).len() - w.origin.accepted_since(end).len() - 1;
    assert_eq!(
        reached, COUNT,
        "the origin must have seen the browser's connections and none of the reader's"
    );
    w.assert_never_shown(&[&browser_secret, &reader_secret]);
}

#[test]
fn enroll_from_inside_a_tagged_cgroup_is_refused_and_changes_nothing() {
    require_root();
    let p = OidcProvider::start(&[], Options::default());
    let w = World::new(|c, net| {
        c.trusted_issuer(p.issuer(), &[AUDIENCE])
            .enrolled_identity("jobs", &[])
            .rule(repo_rule("shop-deploy", net, FIRST_PORT, SHOP))
    });
    let job = JobCgroup::new(&w.daemon, "jobs");
    let good = p.mint_job_token(AUDIENCE, SHOP, 300);
    let out = w.enroll(&job, &good);
    assert!(out.status.success(), "{out:?}");
    let subject = text(&w.enroll_event(&job, 1), "subject");

    // 1. Through `gateway exec` (a fresh cgroup under the identity): try to
    //    enroll a sibling job with a perfectly valid token.
    let sibling = JobCgroup::new(&w.daemon, "jobs");
    let file = w.token_file(&good);
    let cfg = w.daemon.config_path().to_owned();
    let enroll_args = |job: &JobCgroup, file: &Path| -> Vec<String> {
        vec![
            "enroll".into(),
            "--config".into(),
            cfg.to_string_lossy().into_owned(),
            "--cgroup".into(),
            job.rel.clone(),
            "--token-file".into(),
            file.to_string_lossy().into_owned(),
        ]
    };
    let out = w
        .daemon
        .exec("jobs", gateway_bin(), enroll_args(&sibling, &file))
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && stderr(&out).contains("refused: the caller runs inside tagged cgroup"),
        "enroll from `gateway exec` must be refused: {out:?}"
    );

    // 2. From inside the enrolled job itself: try to swap its identity for
    //    another repository's.
    let evil = p.mint_job_token(AUDIENCE, "evil/repo", 300);
    let file = w.token_file(&evil);
    let mut cmd = Command::new(gateway_bin());
    cmd.args(enroll_args(&job, &file));
    let out = job.command(&cmd).output().unwrap();
    assert!(
        !out.status.success()
            && stderr(&out).contains(&format!(
                "refused: the caller runs inside tagged cgroup {}",
                job.path()
            )),
        "enroll from inside the job must be refused: {out:?}"
    );

    // Nothing changed: the job keeps its identity, the sibling has none.
    let st = w.status_identity("jobs");
    let enrolled = st["enrolled"].as_array().cloned().unwrap_or_default();
    assert_eq!(enrolled.len(), 1, "{st}");
    assert_eq!(enrolled[0]["cgroup"], job.path().as_str(), "{st}");
    assert_eq!(enrolled[0]["subject"], subject.as_str(), "{st}");
    assert!(
        !w.daemon.events().iter().any(|v| is_event(v, "enroll")
            && text(v, "outcome") == "enrolled"
            && { text(v, "cgroup") == sibling.path() || text(v, "subject").contains("evil") }),
        "no enrollment may have happened"
    );
    let run = w.run_in(&job, FIRST_PORT, "still the shop");
    let ev = w.assert_allowed(&run, FIRST_PORT, "still the shop");
    assert_eq!(claims_of(&ev)["repository"], SHOP, "{ev}");
    let run = w.run_in(&sibling, FIRST_PORT, "never enrolled");
    let ev = w.assert_refused(&run, FIRST_PORT);
    assert!(
        text(&ev, "reason").contains("no job token is enrolled"),
        "{ev}"
    );
}
