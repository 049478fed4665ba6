use super::*;

fn policy(toml_rules: &str, default: Action) -> Policy {
    #[derive(Deserialize)]
    struct W {
        #[serde(default)]
        rule: Vec<RawRule>,
    }
    let w: W = toml::from_str(toml_rules).expect("test rules parse");
    Policy::build(1, default, w.rule).expect("test rules valid")
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
    ];
    for c in cases {
        let d = p.decide(
            &Subject {
                identity: c.identity,
                duties: c.duties,
                claims: c.claims,
            },
            &Destination {
                ip: c.ip.parse().unwrap(),
                port: c.port,
                host: c.host,
            },
        );
        assert_eq!(d.action, c.action, "{}: {d:?}", c.name);
        assert_eq!(d.rule, c.rule, "{}: {d:?}", c.name);
        assert!(d.reason.contains(c.reason_has), "{}: {}", c.name, d.reason);
    }
}

#[test]
fn broken_rules_are_refused_with_a_hint() {
    let cases = [
        (
            "bare star",
            r#"[[rule]]
id="a"
hosts=["*"]
action="allow""#,
            "leading-label wildcard",
        ),
        (
            "mid wildcard",
            r#"[[rule]]
id="a"
hosts=["api.*.com"]
action="allow""#,
            "leading-label wildcard",
        ),
        (
            "bad cidr",
            r#"[[rule]]
id="a"
ips=["10.0.0.0/33"]
action="allow""#,
            "prefix must be",
        ),
        (
            "bad range",
            r#"[[rule]]
id="a"
ports=["90-80"]
action="allow""#,
            "range like",
        ),
        (
            "dup id",
            r#"[[rule]]
id="a"
action="allow"
[[rule]]
id="a"
action="block""#,
            "used twice",
        ),
    ];
    #[derive(Deserialize)]
    struct W {
        rule: Vec<RawRule>,
    }
    for (name, text, want) in cases {
        let w: W = toml::from_str(text).expect(name);
        let err = Policy::build(1, Action::Block, w.rule).expect_err(name);
        assert!(err.contains(want), "{name}: {err}");
    }
}
