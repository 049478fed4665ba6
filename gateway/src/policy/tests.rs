use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};

use super::*;

const SECRET: &[u8] = b"Bearer sk_live_TOPSECRET_4242\n";

fn secrets() -> BTreeMap<String, SecretValue> {
    let mut s = BTreeMap::new();
    s.insert(
        "partner-token".to_string(),
        SecretValue::from_file_bytes(SECRET).unwrap(),
    );
    s.insert(
        "other-token".to_string(),
        SecretValue::from_file_bytes(b"other").unwrap(),
    );
    s
}

#[derive(Deserialize)]
struct W {
    #[serde(default)]
    rule: Vec<RawRule>,
}

fn try_policy(toml_rules: &str, default: Action) -> Result<Policy, PolicyError> {
    let w: W = toml::from_str(toml_rules).expect("test rules parse");
    Policy::build(1, default, w.rule, &secrets())
}

fn policy(toml_rules: &str, default: Action) -> Policy {
    try_policy(toml_rules, default).expect("test rules valid")
}

fn dest<'a>(ip: &str, port: u16, host: &'a str) -> Destination<'a> {
    Destination {
        ip: ip.parse().unwrap(),
        port,
        host,
    }
}

const RULES: &str = r#"
[[rule]]
id = "no-prod"
hosts = ["*.prod.internal"]
action = "block"

[[rule]]
id = "partner"
duties = ["browser-executor"]
hosts = ["api.partner.example"]
ports = [443, "8000-8100"]
action = "allow"

[[rule]]
id = "lab-net"
ips = ["10.20.0.0/16", "fd20::/16"]
claims = { repository = ["acme/shop", "acme/web"] }
action = "allow"

[[rule]]
id = "ops-only"
identities = ["ops"]
ports = [22]
action = "allow"
"#;

#[test]
fn decision_order_table() {
    let p = policy(RULES, Action::Block);
    let none = BTreeMap::new();
    let mut shop = BTreeMap::new();
    shop.insert("repository".to_string(), "acme/shop".to_string());
    let browser = vec!["browser-executor".to_string()];
    let nobody: Vec<String> = vec![];
    struct Case<'a> {
        name: &'a str,
        identity: &'a str,
        duties: &'a [String],
        claims: &'a BTreeMap<String, String>,
        ip: &'a str,
        port: u16,
        host: &'a str,
        action: Action,
        rule: &'a str,
        reason_has: &'a str,
    }
    let cases = [
        Case {
            name: "block wins first even with duty",
            identity: "b",
            duties: &browser,
            claims: &none,
            ip: "10.0.0.1",
            port: 443,
            host: "db.prod.internal",
            action: Action::Block,
            rule: "no-prod",
            reason_has: "rule no-prod matched",
        },
        Case {
            name: "duty allows",
            identity: "b",
            duties: &browser,
            claims: &none,
            ip: "10.0.0.1",
            port: 443,
            host: "api.partner.example",
            action: Action::Allow,
            rule: "partner",
            reason_has: "matched",
        },
        Case {
            name: "port range",
            identity: "b",
            duties: &browser,
            claims: &none,
            ip: "10.0.0.1",
            port: 8050,
            host: "API.Partner.Example.",
            action: Action::Allow,
            rule: "partner",
            reason_has: "matched",
        },
        Case {
            name: "wrong port falls to default",
            identity: "b",
            duties: &browser,
            claims: &none,
            ip: "10.0.0.1",
            port: 80,
            host: "api.partner.example",
            action: Action::Block,
            rule: "default",
            reason_has: "no rule matched",
        },
        Case {
            name: "missing duty named",
            identity: "x",
            duties: &nobody,
            claims: &none,
            ip: "10.0.0.1",
            port: 443,
            host: "api.partner.example",
            action: Action::Block,
            rule: "default",
            reason_has: "holds none of the duties [browser-executor] that rule partner requires",
        },
        Case {
            name: "unknown host never matches host rule",
            identity: "b",
            duties: &browser,
            claims: &none,
            ip: "10.0.0.1",
            port: 443,
            host: "",
            action: Action::Block,
            rule: "default",
            reason_has: "no rule matched",
        },
        Case {
            name: "cidr and claim",
            identity: "x",
            duties: &nobody,
            claims: &shop,
            ip: "10.20.3.4",
            port: 5432,
            host: "",
            action: Action::Allow,
            rule: "lab-net",
            reason_has: "matched",
        },
        Case {
            name: "v4-mapped address in cidr",
            identity: "x",
            duties: &nobody,
            claims: &shop,
            ip: "::ffff:10.20.3.4",
            port: 1,
            host: "",
            action: Action::Allow,
            rule: "lab-net",
            reason_has: "matched",
        },
        Case {
            name: "v6 cidr",
            identity: "x",
            duties: &nobody,
            claims: &shop,
            ip: "fd20::5",
            port: 1,
            host: "",
            action: Action::Allow,
            rule: "lab-net",
            reason_has: "matched",
        },
        Case {
            name: "claim mismatch",
            identity: "x",
            duties: &nobody,
            claims: &none,
            ip: "10.20.3.4",
            port: 5432,
            host: "",
            action: Action::Block,
            rule: "default",
            reason_has: "does not satisfy rule lab-net",
        },
        Case {
            name: "identity name",
            identity: "ops",
            duties: &nobody,
            claims: &none,
            ip: "192.0.2.1",
            port: 22,
            host: "",
            action: Action::Allow,
            rule: "ops-only",
            reason_has: "matched",
        },
        Case {
            name: "wildcard is not the apex",
            identity: "b",
            duties: &browser,
            claims: &none,
            ip: "10.0.0.1",
            port: 443,
            host: "prod.internal",
            action: Action::Block,
            rule: "default",
            reason_has: "no rule matched",
        },
        Case {
            name: "wildcard covers deeper names",
            identity: "b",
            duties: &browser,
            claims: &none,
            ip: "10.0.0.1",
            port: 443,
            host: "a.b.prod.internal",
            action: Action::Block,
            rule: "no-prod",
            reason_has: "rule no-prod matched",
        },
        Case {
            name: "wildcard needs a whole label",
            identity: "b",
            duties: &browser,
            claims: &none,
            ip: "10.0.0.1",
            port: 443,
            host: "xprod.internal",
            action: Action::Block,
            rule: "default",
            reason_has: "no rule matched",
        },
    ];
    for c in cases {
        let who = Subject {
            identity: c.identity,
            duties: c.duties,
            claims: c.claims,
        };
        let to = Destination {
            ip: c.ip.parse().unwrap(),
            port: c.port,
            host: c.host,
        };
        let d = p.decide(&who, &to);
        assert_eq!(d.action, c.action, "{}: {d:?}", c.name);
        assert_eq!(d.rule, c.rule, "{}: {d:?}", c.name);
        assert!(d.reason.contains(c.reason_has), "{}: {}", c.name, d.reason);
        // Without request parts or effects, opaque and TLS agree with decide.
        for t in [Traffic::Opaque, Traffic::Tls, Traffic::Http] {
            assert_eq!(
                p.decide_connection(&who, &to, t),
                ConnDecision::Decided(d.clone()),
                "{} {t:?}",
                c.name
            );
        }
        // And nothing needs the host before the connect: hosts do.
        let plan = p.plan(&who, &to);
        if plan != ConnPlan::Sniff {
            assert_eq!(plan, ConnPlan::Decided(d.clone()), "{}", c.name);
        }
    }
}

/// The PRODUCT.md sketch (without the approval rule), plus rules that
/// exercise paths and headers.
const HTTP_RULES: &str = r#"
[[rule]]
id = "partner-read"
duties = ["browser-executor"]
hosts = ["api.partner.example", "*.cdn.partner.example"]
methods = ["get", "HEAD"]
action = "allow"
mask = ["credit_card", "us_ssn", "email", { json = "$.customer.tax_id" }]

[[rule]]
id = "no-prod-deletes"
hosts = ["*.prod.internal"]
methods = ["DELETE"]
action = "block"

[[rule]]
id = "charges"
hosts = ["pay.example"]
methods = ["POST"]
paths = ["/v1/charges/**", "/api/*/items", "/exact"]
action = "allow"

[[rule]]
id = "prod-env-only"
hosts = ["pay.example"]
headers = { "X-Env" = "prod*", "authorization" = "*" }
action = "allow"
mask = ["email"]

[[rule]]
id = "pay-block"
hosts = ["pay.example"]
action = "block"

[[rule]]
id = "partner-credential"
hosts = ["api.partner.example"]
action = "allow"
inject = { header = "Authorization", secret = "partner-token" }

[[rule]]
id = "partner-extra"
hosts = ["api.partner.example"]
action = "allow"
mask = ["phone"]
inject = [
  { header = "authorization", secret = "other-token" },
  { header = "X-Partner", secret = "other-token" },
]
"#;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[test]
fn request_decision_table() {
    let p = policy(HTTP_RULES, Action::Block);
    let none = BTreeMap::new();
    let browser = vec!["browser-executor".to_string()];
    let nobody: Vec<String> = vec![];
    struct Case<'a> {
        name: &'a str,
        duties: &'a [String],
        host: &'a str,
        method: &'a str,
        path: &'a str,
        headers: &'a [(&'a str, &'a str)],
        action: Action,
        rule: &'a str,
        reason_has: &'a str,
        /// Rules whose masks apply.
        mask: &'a [&'a str],
        /// (header, secret, rule) injected.
        inject: &'a [(&'a str, &'a str, &'a str)],
    }
    let cases = [
        Case {
            name: "partner GET: mask from the decider, inject from later allow rules",
            duties: &browser,
            host: "api.partner.example",
            method: "GET",
            path: "/customers/1?x=y",
            headers: &[],
            action: Action::Allow,
            rule: "partner-read",
            reason_has: "rule partner-read matched: allow (GET /customers/1 on api.partner.example); mask from partner-read, partner-extra; inject authorization from partner-credential, x-partner from partner-extra",
            mask: &["partner-read", "partner-extra"],
            inject: &[
                ("authorization", "partner-token", "partner-credential"),
                ("x-partner", "other-token", "partner-extra"),
            ],
        },
        Case {
            name: "partner POST: the credential rule decides, still gets later effects",
            duties: &browser,
            host: "api.partner.example",
            method: "POST",
            path: "/customers",
            headers: &[],
            action: Action::Allow,
            rule: "partner-credential",
            reason_has: "rule partner-credential matched: allow",
            mask: &["partner-extra"],
            inject: &[
                ("authorization", "partner-token", "partner-credential"),
                ("x-partner", "other-token", "partner-extra"),
            ],
        },
        Case {
            name: "methods are case-sensitive on the request side",
            duties: &browser,
            host: "api.partner.example",
            method: "get",
            path: "/",
            headers: &[],
            action: Action::Allow,
            rule: "partner-credential",
            reason_has: "matched",
            mask: &["partner-extra"],
            inject: &[
                ("authorization", "partner-token", "partner-credential"),
                ("x-partner", "other-token", "partner-extra"),
            ],
        },
        Case {
            name: "cdn wildcard, no credential there",
            duties: &browser,
            host: "img.cdn.partner.example",
            method: "HEAD",
            path: "/a.png",
            headers: &[],
            action: Action::Allow,
            rule: "partner-read",
            reason_has: "matched",
            mask: &["partner-read"],
            inject: &[],
        },
        Case {
            name: "lacking duty on a GET: the credential rule still allows",
            duties: &nobody,
            host: "api.partner.example",
            method: "GET",
            path: "/",
            headers: &[],
            action: Action::Allow,
            rule: "partner-credential",
            reason_has: "matched",
            mask: &["partner-extra"],
            inject: &[
                ("authorization", "partner-token", "partner-credential"),
                ("x-partner", "other-token", "partner-extra"),
            ],
        },
        Case {
            name: "lacking duty on the cdn: reason names the duty",
            duties: &nobody,
            host: "img.cdn.partner.example",
            method: "GET",
            path: "/a.png",
            headers: &[],
            action: Action::Block,
            rule: "default",
            reason_has: "identity x holds none of the duties [browser-executor] that rule partner-read requires for GET /a.png on img.cdn.partner.example; default block",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "prod delete blocked with a readable reason",
            duties: &browser,
            host: "db.prod.internal",
            method: "DELETE",
            path: "/v1/x",
            headers: &[],
            action: Action::Block,
            rule: "no-prod-deletes",
            reason_has: "rule no-prod-deletes matched: block (DELETE /v1/x on db.prod.internal)",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "prod GET falls to the default",
            duties: &browser,
            host: "db.prod.internal",
            method: "GET",
            path: "/v1/x",
            headers: &[],
            action: Action::Block,
            rule: "default",
            reason_has: "no rule matched GET /v1/x on db.prod.internal; default block",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "path ** matches zero segments",
            duties: &nobody,
            host: "pay.example",
            method: "POST",
            path: "/v1/charges",
            headers: &[],
            action: Action::Allow,
            rule: "charges",
            reason_has: "matched",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "path ** matches deep",
            duties: &nobody,
            host: "pay.example",
            method: "POST",
            path: "/v1/charges/ch_1/refunds",
            headers: &[],
            action: Action::Allow,
            rule: "charges",
            reason_has: "matched",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "path * is one segment",
            duties: &nobody,
            host: "pay.example",
            method: "POST",
            path: "/api/7/items",
            headers: &[],
            action: Action::Allow,
            rule: "charges",
            reason_has: "matched",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "path * does not cross a slash",
            duties: &nobody,
            host: "pay.example",
            method: "POST",
            path: "/api/7/8/items",
            headers: &[],
            action: Action::Block,
            rule: "pay-block",
            reason_has: "rule pay-block matched: block (POST /api/7/8/items on pay.example)",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "dot segments cannot step around a path",
            duties: &nobody,
            host: "pay.example",
            method: "POST",
            path: "/v1/charges/../../admin",
            headers: &[],
            action: Action::Block,
            rule: "pay-block",
            reason_has: "POST /admin on pay.example",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "encoded unreserved characters are decoded",
            duties: &nobody,
            host: "pay.example",
            method: "POST",
            path: "/%65xact",
            headers: &[],
            action: Action::Allow,
            rule: "charges",
            reason_has: "matched",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "exact path only",
            duties: &nobody,
            host: "pay.example",
            method: "POST",
            path: "/exact/",
            headers: &[],
            action: Action::Block,
            rule: "pay-block",
            reason_has: "matched",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "wrong method",
            duties: &nobody,
            host: "pay.example",
            method: "PUT",
            path: "/v1/charges",
            headers: &[],
            action: Action::Block,
            rule: "pay-block",
            reason_has: "matched",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "headers: all must match, any value of a repeated header",
            duties: &nobody,
            host: "pay.example",
            method: "GET",
            path: "/",
            headers: &[
                ("x-env", "staging"),
                ("X-Env", "production"),
                ("Authorization", ""),
            ],
            action: Action::Allow,
            rule: "prod-env-only",
            reason_has: "matched",
            mask: &["prod-env-only"],
            inject: &[],
        },
        Case {
            name: "headers: one missing",
            duties: &nobody,
            host: "pay.example",
            method: "GET",
            path: "/",
            headers: &[("x-env", "prod")],
            action: Action::Block,
            rule: "pay-block",
            reason_has: "matched",
            mask: &[],
            inject: &[],
        },
        Case {
            name: "headers: value glob is case-sensitive",
            duties: &nobody,
            host: "pay.example",
            method: "GET",
            path: "/",
            headers: &[("x-env", "PROD"), ("authorization", "x")],
            action: Action::Block,
            rule: "pay-block",
            reason_has: "matched",
            mask: &[],
            inject: &[],
        },
    ];
    for c in cases {
        let who = Subject {
            identity: "x",
            duties: c.duties,
            claims: &none,
        };
        let h = headers(c.headers);
        let r = p.decide_request(
            &who,
            &dest("10.0.0.1", 443, c.host),
            &Request {
                method: c.method,
                path: c.path,
                headers: &h,
            },
        );
        let d = &r.decision;
        assert_eq!(d.action, c.action, "{}: {d:?}", c.name);
        assert_eq!(d.rule, c.rule, "{}: {d:?}", c.name);
        assert!(d.reason.contains(c.reason_has), "{}: {}", c.name, d.reason);
        let inject: Vec<(&str, &str, &str)> = r
            .inject
            .iter()
            .map(|i| (i.header.as_str(), i.secret.as_str(), i.rule.as_str()))
            .collect();
        assert_eq!(inject, c.inject, "{}", c.name);
        assert_eq!(r.mask.is_some(), !c.mask.is_empty(), "{}", c.name);
        if let [one] = c.mask {
            let own = p.rules.iter().find(|x| x.id == *one).unwrap();
            assert!(
                Arc::ptr_eq(r.mask.as_ref().unwrap(), own.mask.as_ref().unwrap()),
                "{}: a single masking rule shares its own spec",
                c.name
            );
        }
    }
}

#[test]
fn injected_value_is_the_secret_and_first_rule_wins() {
    let p = policy(HTTP_RULES, Action::Block);
    let none = BTreeMap::new();
    let who = Subject {
        identity: "x",
        duties: &[],
        claims: &none,
    };
    let h = HeaderMap::new();
    let r = p.decide_request(
        &who,
        &dest("10.0.0.1", 443, "api.partner.example"),
        &Request {
            method: "GET",
            path: "/",
            headers: &h,
        },
    );
    let auth = r
        .inject
        .iter()
        .find(|i| i.header == http::header::AUTHORIZATION)
        .unwrap();
    assert_eq!(
        auth.value.header_value().as_bytes(),
        b"Bearer sk_live_TOPSECRET_4242"
    );
    assert!(auth.value.header_value().is_sensitive());
    assert_eq!(auth.rule, "partner-credential");
}

#[test]
fn merged_masks_are_compiled_once_per_set() {
    let p = policy(HTTP_RULES, Action::Block);
    let none = BTreeMap::new();
    let browser = vec!["browser-executor".to_string()];
    let who = Subject {
        identity: "x",
        duties: &browser,
        claims: &none,
    };
    let h = HeaderMap::new();
    let ask = |path| {
        p.decide_request(
            &who,
            &dest("10.0.0.1", 443, "api.partner.example"),
            &Request {
                method: "GET",
                path,
                headers: &h,
            },
        )
        .mask
        .unwrap()
    };
    let a = ask("/a");
    let b = ask("/b");
    assert!(Arc::ptr_eq(&a, &b));
    // The merged spec masks what either rule asks for.
    let mut counts = crate::mask::Counts::default();
    let out = a.mask_text(b"mail a@b.example or call +14155552671 now", &mut counts);
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("[MASKED:email]"), "{out}");
    assert!(out.contains("[MASKED:phone]"), "{out}");
    // A clone of the policy shares nothing it must not: same answers.
    let q = p.clone();
    assert_eq!(format!("{q}"), format!("{p}"));
}

const CONN_RULES: &str = r#"
[[rule]]
id = "ssh-block"
ports = [22]
action = "block"

[[rule]]
id = "db"
ips = ["10.9.0.0/16"]
action = "allow"

[[rule]]
id = "api-get"
hosts = ["api.example"]
methods = ["GET"]
action = "allow"

[[rule]]
id = "api-block"
hosts = ["api.example"]
action = "block"

[[rule]]
id = "masked"
hosts = ["masked.example"]
action = "allow"
mask = ["email"]

[[rule]]
id = "plain"
hosts = ["plain.example", "cred.example"]
action = "allow"

[[rule]]
id = "cred"
hosts = ["cred.example"]
action = "allow"
inject = { header = "X-Key", secret = "other-token" }

[[rule]]
id = "forbidden"
hosts = ["forbidden.example"]
action = "block"
"#;

#[test]
fn connection_decision_table() {
    let p = policy(CONN_RULES, Action::Allow);
    let none = BTreeMap::new();
    let who = Subject {
        identity: "x",
        duties: &[],
        claims: &none,
    };
    use ConnDecision::{Decided, Inspect};
    // (name, ip, port, host, traffic, expected: None = Inspect, Some((action, rule, reason)))
    type Want<'a> = Option<(Action, &'a str, &'a str)>;
    let cases: [(&str, &str, u16, &str, Traffic, Want); 17] = [
        (
            "L4 block",
            "10.9.0.1",
            22,
            "api.example",
            Traffic::Tls,
            Some((Action::Block, "ssh-block", "rule ssh-block matched: block")),
        ),
        (
            "L4 allow",
            "10.9.0.1",
            443,
            "api.example",
            Traffic::Tls,
            Some((Action::Allow, "db", "rule db matched: allow")),
        ),
        (
            "request part → inspect (tls)",
            "192.0.2.1",
            443,
            "api.example",
            Traffic::Tls,
            None,
        ),
        (
            "request part → inspect (http)",
            "192.0.2.1",
            80,
            "api.example",
            Traffic::Http,
            None,
        ),
        (
            "request part skipped on opaque",
            "192.0.2.1",
            443,
            "api.example",
            Traffic::Opaque,
            Some((Action::Block, "api-block", "rule api-block matched: block")),
        ),
        (
            "mask → inspect",
            "192.0.2.1",
            443,
            "masked.example",
            Traffic::Tls,
            None,
        ),
        (
            "mask on opaque → refused",
            "192.0.2.1",
            443,
            "masked.example",
            Traffic::Opaque,
            Some((
                Action::Block,
                "masked",
                "rule masked needs HTTP inspection (mask/inject) but this connection is not HTTP",
            )),
        ),
        (
            "plain allow, no effects",
            "192.0.2.1",
            443,
            "plain.example",
            Traffic::Tls,
            Some((Action::Allow, "plain", "rule plain matched: allow")),
        ),
        (
            "plain allow on opaque",
            "192.0.2.1",
            443,
            "plain.example",
            Traffic::Opaque,
            Some((Action::Allow, "plain", "rule plain matched: allow")),
        ),
        (
            "later allow with inject → inspect",
            "192.0.2.1",
            443,
            "cred.example",
            Traffic::Tls,
            None,
        ),
        (
            "later allow with inject on http",
            "192.0.2.1",
            80,
            "cred.example",
            Traffic::Http,
            None,
        ),
        (
            "later inject on opaque → refused",
            "192.0.2.1",
            443,
            "cred.example",
            Traffic::Opaque,
            Some((Action::Block, "cred", "rule cred needs HTTP inspection")),
        ),
        (
            "block at L4 by host",
            "192.0.2.1",
            443,
            "forbidden.example",
            Traffic::Tls,
            Some((Action::Block, "forbidden", "rule forbidden matched: block")),
        ),
        (
            "default",
            "192.0.2.1",
            443,
            "other.example",
            Traffic::Tls,
            Some((Action::Allow, "default", "no rule matched; default allow")),
        ),
        (
            "default opaque",
            "192.0.2.1",
            443,
            "other.example",
            Traffic::Opaque,
            Some((Action::Allow, "default", "no rule matched; default allow")),
        ),
        (
            "no host",
            "192.0.2.1",
            443,
            "",
            Traffic::Tls,
            Some((Action::Allow, "default", "no rule matched")),
        ),
        (
            "L4 block beats a later request rule",
            "10.1.0.1",
            22,
            "api.example",
            Traffic::Http,
            Some((Action::Block, "ssh-block", "matched")),
        ),
    ];
    for (name, ip, port, host, traffic, want) in cases {
        let got = p.decide_connection(&who, &dest(ip, port, host), traffic);
        match (want, &got) {
            (None, Inspect) => {}
            (Some((action, rule, reason)), Decided(d)) => {
                assert_eq!(d.action, action, "{name}: {d:?}");
                assert_eq!(d.rule, rule, "{name}: {d:?}");
                assert!(d.reason.contains(reason), "{name}: {}", d.reason);
            }
            _ => panic!("{name}: got {got:?}, want {want:?}"),
        }
        if traffic == Traffic::Opaque {
            assert_eq!(
                got,
                Decided(p.decide(&who, &dest(ip, port, host))),
                "{name}: decide is the opaque decision"
            );
        }
    }
}

#[test]
fn plan_sniffs_only_when_needed() {
    let none = BTreeMap::new();
    let ops = vec!["ops".to_string()];
    let who = Subject {
        identity: "x",
        duties: &[],
        claims: &none,
    };
    let op = Subject {
        identity: "o",
        duties: &ops,
        claims: &none,
    };
    let p = policy(
        r#"
[[rule]]
id = "ssh-block"
ports = [22]
action = "block"

[[rule]]
id = "ops-hosts"
duties = ["ops"]
hosts = ["ops.example"]
action = "allow"

[[rule]]
id = "db"
ips = ["10.9.0.0/16"]
action = "allow"

[[rule]]
id = "db-masked"
ips = ["10.9.5.0/24"]
ports = [8443]
action = "allow"
mask = ["email"]

[[rule]]
id = "web-get"
ports = [80, 443]
methods = ["GET"]
action = "allow"

[[rule]]
id = "masked-net"
ips = ["10.7.0.0/16"]
action = "allow"
mask = ["email"]
"#,
        Action::Block,
    );
    use ConnPlan::{Decided, Sniff};
    let cases: [(&str, &Subject, &str, u16, Option<&str>); 9] = [
        (
            "pure L4 block first",
            &who,
            "10.9.0.1",
            22,
            Some("ssh-block"),
        ),
        (
            "pure L4 allow, no later effects",
            &who,
            "10.9.0.1",
            5432,
            Some("db"),
        ),
        (
            "pure L4 allow, a later matching rule masks",
            &who,
            "10.9.5.1",
            8443,
            None,
        ),
        (
            "the masking rule is for another port",
            &who,
            "10.9.5.1",
            5432,
            Some("db"),
        ),
        ("a rule with hosts could apply", &op, "10.9.0.1", 5432, None),
        (
            "hosts rule is not for this subject",
            &who,
            "192.0.2.1",
            5432,
            Some("default"),
        ),
        ("a request rule could apply", &who, "192.0.2.1", 443, None),
        ("pure L4 allow that masks", &who, "10.7.0.1", 5432, None),
        (
            "nothing could apply",
            &who,
            "192.0.2.1",
            5432,
            Some("default"),
        ),
    ];
    for (name, subject, ip, port, want) in cases {
        let to = dest(ip, port, "");
        let got = p.plan(subject, &to);
        match (want, &got) {
            (None, Sniff) => {}
            (Some(rule), Decided(d)) => {
                assert_eq!(d.rule, rule, "{name}: {d:?}");
                assert_eq!(*d, p.decide(subject, &to), "{name}");
            }
            _ => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn path_glob_table() {
    let cases: &[(&str, &str, bool)] = &[
        ("/v1/**", "/v1", true),
        ("/v1/**", "/v1/", true),
        ("/v1/**", "/v1/a/b", true),
        ("/v1/**", "/v1x", false),
        ("/v1/**", "/v2/v1", false),
        ("/**", "/", true),
        ("/**", "/a/b/c", true),
        ("/**/a", "/a", true),
        ("/**/a", "/x/y/a", true),
        ("/**/a", "/x/y/a/b", false),
        ("/a/**/b", "/a/b", true),
        ("/a/**/b", "/a/x/y/b", true),
        ("/a/**/b", "/a/x/y/c", false),
        ("/api/*/items", "/api/7/items", true),
        ("/api/*/items", "/api//items", true),
        ("/api/*/items", "/api/7/8/items", false),
        ("/api/*", "/api/x", true),
        ("/api/*", "/api/x/", false),
        ("/f?o", "/foo", true),
        ("/f?o", "/fo", false),
        ("/f?o", "/f/o", false),
        ("/f?o", "/fäo", true),
        ("/*.json", "/a.json", true),
        ("/*.json", "/.json", true),
        ("/*.json", "/a/b.json", false),
        ("/a*b*c", "/aXbYc", true),
        ("/a*b*c", "/aXbY", false),
        ("/exact", "/exact", true),
        ("/exact", "/exact/", false),
        ("/exact", "/Exact", false),
        ("/", "/", true),
        ("/", "/a", false),
        ("/x", "x", false),
    ];
    for (pattern, path, want) in cases {
        let g = PathGlob::parse(pattern).unwrap();
        assert_eq!(g.matches(path), *want, "{pattern} vs {path}");
    }
}

#[test]
fn value_glob_table() {
    let cases: &[(&str, &[u8], bool)] = &[
        ("*", b"", true),
        ("*", b"anything at all", true),
        ("prod*", b"prod", true),
        ("prod*", b"production", true),
        ("prod*", b"preprod", false),
        ("*prod", b"preprod", true),
        ("Bearer *", b"Bearer abc/def", true),
        ("Bearer *", b"bearer abc", false),
        ("v?", b"v1", true),
        ("v?", b"v12", false),
        ("a*b*c", b"a-b-b-c", true),
        ("", b"", true),
        ("", b"x", false),
        ("*ä*", "xäy".as_bytes(), true),
        ("?", b"\xff", true),
    ];
    for (pattern, value, want) in cases {
        let g = ValueGlob::parse(pattern).unwrap();
        assert_eq!(g.matches(value), *want, "{pattern:?} vs {value:?}");
    }
}

#[test]
fn normalize_path_table() {
    let cases = [
        ("/", "/"),
        ("", ""),
        ("*", "*"),
        ("/a/b", "/a/b"),
        ("/a/b?x=1", "/a/b"),
        ("/a/b#f", "/a/b"),
        ("/a//b", "/a/b"),
        ("//a", "/a"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../../b", "/b"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/a/", "/a/"),
        ("/%61dmin", "/admin"),
        ("/%2e%2E/x", "/x"),
        ("/a%2fb", "/a%2Fb"),
        ("/a%zz", "/a%zz"),
        ("/a%4", "/a%4"),
        ("/ä/%7e", "/ä/~"),
    ];
    for (raw, want) in cases {
        assert_eq!(glob::normalize_path(raw), want, "{raw:?}");
    }
}

#[test]
fn pathological_globs_finish_fast() {
    let start = Instant::now();
    let long_path = format!("{}/b", "/a".repeat(5000));
    let g = PathGlob::parse("/**/**/**/a").unwrap();
    assert!(!g.matches(&long_path));
    let g = PathGlob::parse("/**/a/**/a/**/a/**/c").unwrap();
    assert!(!g.matches(&long_path));
    let seg = format!("/{}", "a".repeat(20_000));
    let g = PathGlob::parse("/*a*a*a*a*a*a*a*a*b").unwrap();
    assert!(!g.matches(&seg));
    let v = ValueGlob::parse("*a*a*a*a*a*a*a*a*a*a*b").unwrap();
    assert!(!v.matches("a".repeat(20_000).as_bytes()));
    // Generous bound: exponential backtracking would take far longer.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn broken_rules_are_refused_with_a_hint() {
    let cases = [
        (
            "bare star",
            "[[rule]]\nid=\"a\"\nhosts=[\"*\"]\naction=\"allow\"",
            "leading-label wildcard",
            "*",
        ),
        (
            "mid wildcard",
            "[[rule]]\nid=\"a\"\nhosts=[\"api.*.com\"]\naction=\"allow\"",
            "leading-label wildcard",
            "api.*.com",
        ),
        (
            "bad cidr",
            "[[rule]]\nid=\"a\"\nips=[\"10.0.0.0/33\"]\naction=\"allow\"",
            "prefix must be",
            "10.0.0.0/33",
        ),
        (
            "bad range",
            "[[rule]]\nid=\"a\"\nports=[\"90-80\"]\naction=\"allow\"",
            "range like",
            "90-80",
        ),
        (
            "dup id",
            "[[rule]]\nid=\"a\"\naction=\"allow\"\n[[rule]]\nid=\"a\"\naction=\"block\"",
            "used twice",
            "a",
        ),
        (
            "bad method",
            "[[rule]]\nid=\"a\"\nmethods=[\"GET \"]\naction=\"allow\"",
            "not an HTTP method",
            "GET ",
        ),
        (
            "relative path",
            "[[rule]]\nid=\"a\"\npaths=[\"v1/**\"]\naction=\"allow\"",
            "must start with '/'",
            "v1/**",
        ),
        (
            "** inside a segment",
            "[[rule]]\nid=\"a\"\npaths=[\"/v1/a**\"]\naction=\"allow\"",
            "whole segment",
            "/v1/a**",
        ),
        (
            "bad header name",
            "[[rule]]\nid=\"a\"\nheaders={ \"x env\" = \"*\" }\naction=\"allow\"",
            "not an HTTP header name",
            "x env",
        ),
        (
            "header twice",
            "[[rule]]\nid=\"a\"\nheaders={ \"X-Env\" = \"*\", \"x-env\" = \"p\" }\naction=\"allow\"",
            "listed twice",
            "x-env",
        ),
        (
            "unknown detector",
            "[[rule]]\nid=\"a\"\nmask=[\"email\", \"credit_crad\"]\naction=\"allow\"",
            "unknown mask detector \"credit_crad\"",
            "credit_crad",
        ),
        (
            "bad json selector",
            "[[rule]]\nid=\"a\"\nmask=[{ json = \"customer\" }]\naction=\"allow\"",
            "invalid JSON selector",
            "{ json = \"customer\" }",
        ),
        (
            "mask on block",
            "[[rule]]\nid=\"a\"\nmask=[\"email\"]\naction=\"block\"",
            "only applies to allow and approve rules",
            "[\"email\"]",
        ),
        (
            "unknown secret",
            "[[rule]]\nid=\"a\"\ninject={ header = \"Authorization\", secret = \"nope\" }\naction=\"allow\"",
            "secret \"nope\", which is not defined; add [[secret]]",
            "nope",
        ),
        (
            "framing header",
            "[[rule]]\nid=\"a\"\ninject={ header = \"Content-Length\", secret = \"other-token\" }\naction=\"allow\"",
            "cannot be injected",
            "Content-Length",
        ),
        (
            "same header twice",
            "[[rule]]\nid=\"a\"\ninject=[{ header = \"X-A\", secret = \"other-token\" }, { header = \"x-a\", secret = \"partner-token\" }]\naction=\"allow\"",
            "twice",
            "x-a",
        ),
        (
            "inject on block",
            "[[rule]]\nid=\"a\"\ninject={ header = \"X-A\", secret = \"other-token\" }\naction=\"block\"",
            "only applies to allow and approve rules",
            "{ header",
        ),
        (
            "approve without approvers",
            "[[rule]]\nid=\"a\"\nmethods=[\"POST\"]\naction=\"approve\"",
            "needs approvers",
            "approve",
        ),
        (
            "empty approvers",
            "[[rule]]\nid=\"a\"\napprovers=[]\naction=\"approve\"",
            "at least one duty",
            "[]",
        ),
        (
            "approvers on allow",
            "[[rule]]\nid=\"a\"\napprovers=[\"x\"]\naction=\"allow\"",
            "only apply to action = \"approve\"",
            "[\"x\"]",
        ),
    ];
    for (name, text, want, spanned) in cases {
        let err = try_policy(text, Action::Block).expect_err(name);
        assert!(err.message.contains(want), "{name}: {err}");
        assert!(
            err.message.contains("\"a\""),
            "{name}: names the rule: {err}"
        );
        // The span points at the offending value.
        let span = err.span.clone().expect(name);
        let at = &text[span.clone()];
        assert!(
            at.trim_matches('"').starts_with(spanned),
            "{name}: span {span:?} is {at:?}"
        );
    }
}

#[test]
fn secrets_never_show() {
    let p = policy(HTTP_RULES, Action::Block);
    let needle = "TOPSECRET";
    let debug = format!("{p:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(!debug.contains(needle));
    let shown = format!("{p}");
    assert!(
        shown.contains("inject authorization ← secret partner-token"),
        "{shown}"
    );
    assert!(!shown.contains(needle));
    let none = BTreeMap::new();
    let who = Subject {
        identity: "x",
        duties: &[],
        claims: &none,
    };
    let h = HeaderMap::new();
    let r = p.decide_request(
        &who,
        &dest("10.0.0.1", 443, "api.partner.example"),
        &Request {
            method: "GET",
            path: "/",
            headers: &h,
        },
    );
    assert!(!r.inject.is_empty());
    let debug = format!("{r:?} {}", r.inject[0].value);
    assert!(!debug.contains(needle), "{debug}");
    assert!(!r.decision.reason.contains(needle));
}

#[test]
fn secret_values_are_checked() {
    assert!(SecretValue::from_file_bytes(b"abc\r\n").is_ok());
    assert_eq!(
        SecretValue::from_file_bytes(b"abc\n")
            .unwrap()
            .header_value()
            .as_bytes(),
        b"abc"
    );
    // Only one trailing newline is trimmed; the rest is refused.
    assert_eq!(
        SecretValue::from_file_bytes(b"abc\n\n"),
        Err(secret::SecretValueError::NotAHeaderValue)
    );
    assert_eq!(
        SecretValue::from_file_bytes(b"a\nb"),
        Err(secret::SecretValueError::NotAHeaderValue)
    );
    assert_eq!(
        SecretValue::from_file_bytes(b"a\0b"),
        Err(secret::SecretValueError::NotAHeaderValue)
    );
    assert_eq!(
        SecretValue::from_file_bytes(b"\n"),
        Err(secret::SecretValueError::Empty)
    );
}

#[test]
fn check_output_shows_the_new_fields() {
    let p = policy(HTTP_RULES, Action::Block);
    let shown = format!("{p}");
    for want in [
        "policy v1: 7 rules, first match decides, else default block",
        "mask and inject add up",
        "rule partner-read → allow; duties [browser-executor]; hosts [api.partner.example, *.cdn.partner.example]; methods [GET, HEAD]; mask [credit_card, us_ssn, email, json $.customer.tax_id]",
        "paths [/v1/charges/**, /api/*/items, /exact]",
        "header authorization ~ \"*\"; header x-env ~ \"prod*\"",
        "inject authorization ← secret other-token; inject x-partner ← secret other-token",
    ] {
        assert!(shown.contains(want), "missing {want:?} in\n{shown}");
    }
}

const APPROVE_RULES: &str = r#"
[[rule]]
id = "db-connect"
ports = [5432]
action = "approve"
approvers = ["dba"]

[[rule]]
id = "payments"
duties = ["browser-executor"]
hosts = ["pay.example"]
methods = ["POST"]
paths = ["/v1/charges/**"]
action = "approve"
approvers = ["approval-engine", "finance"]

[[rule]]
id = "pay-read"
hosts = ["pay.example"]
action = "allow"
inject = { header = "Authorization", secret = "partner-token" }
"#;

#[test]
fn approve_rules_decide_like_allow_rules_but_hold() {
    let p = policy(APPROVE_RULES, Action::Block);
    let none = BTreeMap::new();
    let browser = vec!["browser-executor".to_string()];
    let job = Subject {
        identity: "ci",
        duties: &browser,
        claims: &none,
    };
    let to = dest("192.0.2.10", 443, "pay.example");
    let h = headers(&[]);
    let post = Request {
        method: "POST",
        path: "/v1/charges/ch_1",
        headers: &h,
    };
    // The payment is held, and once approved carries the later rule's
    // credential.
    let rd = p.decide_request(&job, &to, &post);
    assert_eq!(rd.decision.action, Action::Approve);
    assert_eq!(rd.decision.rule, "payments");
    assert_eq!(rd.inject.len(), 1, "{:?}", rd.decision);
    assert_eq!(
        p.approvers_of("payments"),
        vec!["approval-engine".to_string(), "finance".to_string()]
    );
    assert!(p.approvers_of("pay-read").is_empty());
    assert_eq!(
        p.approver_duties(),
        vec!["approval-engine", "dba", "finance"]
    );
    // A GET is not held; a dot-segment cannot step around the hold.
    let get = Request {
        method: "GET",
        ..post
    };
    assert_eq!(
        p.decide_request(&job, &to, &get).decision.action,
        Action::Allow
    );
    let sneaky = Request {
        path: "/v1/x/../charges/ch_1",
        ..post
    };
    assert_eq!(
        p.decide_request(&job, &to, &sneaky).decision.action,
        Action::Approve
    );
    // The connection to pay.example is inspected (the hold is per request).
    assert_eq!(
        p.decide_connection(&job, &to, Traffic::Tls),
        ConnDecision::Inspect
    );
    // Without the duty the payment rule does not apply: the next rule does.
    let other = Subject {
        identity: "other",
        duties: &[],
        claims: &none,
    };
    assert_eq!(
        p.decide_request(&other, &to, &post).decision.rule,
        "pay-read"
    );
    // An L4 approve rule holds the connection itself, whatever it speaks.
    let db = dest("192.0.2.20", 5432, "db.internal");
    for traffic in [Traffic::Opaque, Traffic::Tls, Traffic::Http] {
        match p.decide_connection(&job, &db, traffic) {
            ConnDecision::Decided(d) => {
                assert_eq!(d.action, Action::Approve, "{traffic:?}");
                assert_eq!(d.rule, "db-connect");
            }
            other => panic!("{traffic:?}: expected a decision, got {other:?}"),
        }
    }
    assert_eq!(p.decide(&job, &db).action, Action::Approve);
    // Alone, it is decided before a byte is read (and an approve decision
    // is never cached by the proxy's fast path).
    let alone = policy(
        "[[rule]]\nid=\"db\"\nports=[5432]\naction=\"approve\"\napprovers=[\"dba\"]",
        Action::Block,
    );
    assert!(matches!(
        alone.plan(&job, &db),
        ConnPlan::Decided(Decision {
            action: Action::Approve,
            ..
        })
    ));
    assert!(
        p.to_string()
            .contains("approvers [approval-engine, finance]")
    );
}
