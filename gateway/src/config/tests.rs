use super::*;

#[test]
fn embedded_default_is_valid() {
    let c = Config::parse(EMBEDDED_DEFAULT, "<embedded default>").expect("valid");
    assert_eq!(c.identities.len(), 1);
    assert_eq!(c.identities[0].cgroups, vec!["gateway.demo".to_string()]);
    assert_eq!(c.policy.default, Action::Allow);
}

#[test]
fn unknown_field_names_line_and_column() {
    let text = "[daemon]\nproxy_port = 1\nproxy_prot = 2\n";
    let err = Config::parse(text, "g.toml").unwrap_err().to_string();
    assert!(err.starts_with("g.toml:3:1:"), "{err}");
    assert!(err.contains("proxy_prot"), "{err}");
}

#[test]
fn broken_inputs_are_refused_with_a_reason() {
    let cases = [
        (
            "root cgroup",
            "[[identity]]\nname='a'\ncgroups=['/']\nstatic={subject='s'}\n",
            "cgroup root",
        ),
        (
            "dotdot",
            "[[identity]]\nname='a'\ncgroups=['a/../b']\nstatic={subject='s'}\n",
            "'..'",
        ),
        (
            "no source",
            "[[identity]]\nname='a'\ncgroups=['a']\n",
            "has no source",
        ),
        (
            "dup cgroup",
            "[[identity]]\nname='a'\ncgroups=['x']\nstatic={subject='s'}\n[[identity]]\nname='b'\ncgroups=['/x/']\nstatic={subject='t'}\n",
            "more than one identity",
        ),
        ("bad udp", "[daemon]\nudp_allow=['nope']\n", "udp_allow"),
        (
            "bad version",
            "[policy]\nversion=2\ndefault='allow'\n",
            "version",
        ),
        (
            "bad action",
            "[policy]\nversion=1\ndefault='maybe'\n",
            "maybe",
        ),
        (
            "same ports",
            "[daemon]\nproxy_port=5\ndns_port=5\n",
            "own port",
        ),
    ];
    for (name, text, want) in cases {
        let err = Config::parse(text, "t.toml").expect_err(name).to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
}

#[test]
fn upstream_without_port_defaults_to_53() {
    let c = Config::parse(
        "[daemon]\ndns_upstreams=['10.0.0.1','[fd00::1]:5300']\n",
        "t",
    )
    .unwrap();
    assert_eq!(c.daemon.dns_upstreams[0].to_string(), "10.0.0.1:53");
    assert_eq!(c.daemon.dns_upstreams[1].to_string(), "[fd00::1]:5300");
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "gateway-config-test-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn write(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SECRET_VALUE: &str = "Bearer pt_TOPSECRET_value_7731";

fn no_env() -> LoadEnv {
    LoadEnv::default()
}

/// `(line, column, rest)` of a `file:line:column: message` error.
fn position(err: &ConfigError) -> (usize, usize, String) {
    match err {
        ConfigError::Syntax {
            line,
            column,
            message,
            ..
        } => (*line, *column, message.clone()),
        other => panic!("expected a positioned error, got {other}"),
    }
}

#[test]
fn interception_defaults() {
    let c = Config::parse_with("", "t", &no_env()).unwrap();
    let i = &c.interception;
    assert!(i.system_roots);
    assert!(i.upstream_cas.is_empty() && i.upstream_ca_files.is_empty());
    assert_eq!(i.sniff_timeout, Duration::from_millis(1000));
    assert_eq!(i.max_decoded_bytes, 67_108_864);
    let c = Config::parse_with(
        "[interception]\nsystem_roots = true\nsniff_timeout_ms = 250\nmax_decoded_bytes = 1024\n",
        "t",
        &no_env(),
    )
    .unwrap();
    assert_eq!(c.interception.sniff_timeout, Duration::from_millis(250));
    assert_eq!(c.interception.max_decoded_bytes, 1024);
}

#[test]
fn secrets_load_from_a_file_and_from_the_credentials_directory() {
    let t = TempDir::new("secrets");
    let file = t.write("partner.token", format!("{SECRET_VALUE}\n").as_bytes());
    let creds = TempDir::new("creds");
    creds.write("api-key", b"k-123\r\n");
    let text = format!(
        r#"
[[secret]]
name = "partner-token"
file = {file:?}

[[secret]]
name = "api-key"
credential = "api-key"

[policy]
version = 1
default = "block"

[[policy.rule]]
id = "partner-credential"
hosts = ["api.partner.example"]
action = "allow"
inject = [
  {{ header = "Authorization", secret = "partner-token" }},
  {{ header = "X-Api-Key", secret = "api-key" }},
]
"#
    );
    let env = LoadEnv {
        credentials_directory: Some(creds.0.clone()),
    };
    let c = Config::parse_with(&text, "g.toml", &env).unwrap();
    assert_eq!(c.secrets.len(), 2);
    assert_eq!(c.secrets[0].source, SecretSource::File(file.clone()));
    assert_eq!(
        c.secrets[1].source,
        SecretSource::Credential("api-key".into())
    );
    assert_eq!(c.secrets[1].path, creds.0.join("api-key"));

    let none = BTreeMap::new();
    let who = crate::policy::Subject {
        identity: "x",
        duties: &[],
        claims: &none,
    };
    let h = http::HeaderMap::new();
    let r = c.policy.decide_request(
        &who,
        &crate::policy::Destination {
            ip: "192.0.2.1".parse().unwrap(),
            port: 443,
            host: "api.partner.example",
        },
        &crate::policy::Request {
            method: "GET",
            path: "/",
            headers: &h,
        },
    );
    let values: Vec<(&str, &[u8])> = r
        .inject
        .iter()
        .map(|i| (i.header.as_str(), i.value.header_value().as_bytes()))
        .collect();
    assert_eq!(
        values,
        vec![
            ("authorization", SECRET_VALUE.as_bytes()),
            ("x-api-key", b"k-123".as_slice())
        ]
    );

    // Never in Debug, never in what `gateway check` prints.
    let debug = format!("{c:?}");
    let report = c.policy_report();
    for shown in [&debug, &report] {
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        assert!(!shown.contains("k-123"), "{shown}");
    }
    assert!(report.contains("secret partner-token: file "), "{report}");
    assert!(
        report.contains(
            "inject authorization ← secret partner-token; inject x-api-key ← secret api-key"
        ),
        "{report}"
    );

    // A reload reads the files again.
    std::fs::write(&file, "Bearer rotated\n").unwrap();
    let c = Config::parse_with(&text, "g.toml", &env).unwrap();
    let r = c.policy.decide_request(
        &who,
        &crate::policy::Destination {
            ip: "192.0.2.1".parse().unwrap(),
            port: 443,
            host: "api.partner.example",
        },
        &crate::policy::Request {
            method: "GET",
            path: "/",
            headers: &h,
        },
    );
    assert_eq!(
        r.inject[0].value.header_value().as_bytes(),
        b"Bearer rotated"
    );
}

#[test]
fn secret_errors_point_at_the_value_and_never_show_it() {
    let t = TempDir::new("secret-errors");
    let two_lines = t.write("two-lines", format!("{SECRET_VALUE}\nsecond\n").as_bytes());
    let missing = t.0.join("missing");
    let good = t.write("good", b"fine\n");
    let huge = t.write("huge", &vec![b'a'; 70 * 1024]);
    /// (name, config, environment, (line, column), message parts)
    type Case<'a> = (&'a str, String, LoadEnv, (usize, usize), Vec<String>);
    let cases: Vec<Case> = vec![
        (
            "missing file",
            format!("[[secret]]\nname = \"tok\"\nfile = {missing:?}\n"),
            no_env(),
            (3, 8),
            vec![
                "secret \"tok\": cannot read".into(),
                missing.display().to_string(),
            ],
        ),
        (
            "not a header value",
            format!("[[secret]]\nname = \"tok\"\nfile = {two_lines:?}\n"),
            no_env(),
            (3, 8),
            vec![
                "secret \"tok\"".into(),
                two_lines.display().to_string(),
                "not a valid HTTP header value".into(),
            ],
        ),
        (
            "too large",
            format!("[[secret]]\nname = \"tok\"\nfile = {huge:?}\n"),
            no_env(),
            (3, 8),
            vec!["larger than 65536 bytes".into()],
        ),
        (
            "no credentials directory",
            "[[secret]]\nname = \"tok\"\ncredential = \"tok\"\n".into(),
            no_env(),
            (3, 14),
            vec!["$CREDENTIALS_DIRECTORY is not set".into()],
        ),
        (
            "credential missing in the directory",
            "[[secret]]\nname = \"tok\"\ncredential = \"tok\"\n".into(),
            LoadEnv {
                credentials_directory: Some(t.0.clone()),
            },
            (3, 14),
            vec![
                "cannot read credential \"tok\"".into(),
                t.0.join("tok").display().to_string(),
            ],
        ),
        (
            "credential name with a slash",
            "[[secret]]\nname = \"tok\"\ncredential = \"../tok\"\n".into(),
            LoadEnv {
                credentials_directory: Some(t.0.clone()),
            },
            (3, 14),
            vec!["no '/'".into()],
        ),
        (
            "both sources",
            "[[secret]]\nname = \"tok\"\nfile = \"/x\"\ncredential = \"tok\"\n".into(),
            no_env(),
            (2, 8),
            vec!["exactly one of file".into()],
        ),
        (
            "twice",
            format!(
                "[[secret]]\nname = \"tok\"\nfile = {good:?}\n[[secret]]\n  name = \"tok\"\nfile = {good:?}\n"
            ),
            no_env(),
            (5, 10),
            vec!["secret \"tok\" is defined twice".into()],
        ),
        (
            "unknown secret in a rule",
            "[policy]\nversion = 1\ndefault = \"block\"\n[[policy.rule]]\nid = \"r\"\naction = \"allow\"\ninject = { header = \"Authorization\", secret = \"partner-tokn\" }\n".into(),
            no_env(),
            (7, 47),
            vec![
                "policy: rule \"r\": inject names secret \"partner-tokn\", which is not defined; add [[secret]]".into(),
            ],
        ),
    ];
    for (name, text, env, (line, column), wants) in cases {
        let err = Config::parse_with(&text, "g.toml", &env).expect_err(name);
        let shown = err.to_string();
        assert!(!shown.contains("TOPSECRET"), "{name}: {shown}");
        assert!(
            shown.starts_with(&format!("g.toml:{line}:{column}: ")),
            "{name}: {shown}"
        );
        let (l, c, message) = position(&err);
        assert_eq!((l, c), (line, column), "{name}: {message}");
        for want in wants {
            assert!(message.contains(&want), "{name}: {want:?} in {message}");
        }
    }
}

#[test]
fn policy_errors_point_at_the_value() {
    let head = "[policy]\nversion = 1\ndefault = \"block\"\n\n[[policy.rule]]\nid = \"r\"\n";
    let cases = [
        (
            "bad host",
            "hosts = [\"ok.example\", \"api.*.example\"]\naction = \"allow\"\n",
            (7, 24),
            "host \"api.*.example\" is not a host name or a leading-label wildcard; write \"api.example.com\" or \"*.example.com\"",
        ),
        (
            "bad glob",
            "action = \"allow\"\npaths = [\"/v1/**\", \"/v1/x**\"]\n",
            (8, 20),
            "`**` must be a whole segment",
        ),
        (
            "relative glob",
            "paths = [\"v1\"]\naction = \"allow\"\n",
            (7, 10),
            "must start with '/'",
        ),
        (
            "unknown detector",
            "action = \"allow\"\nmask = [\n  \"email\",\n  \"credit_crad\",\n]\n",
            (10, 3),
            "unknown mask detector \"credit_crad\"; use one of:",
        ),
        (
            "bad method",
            "methods = [\"GET\", \"GE T\"]\naction = \"allow\"\n",
            (7, 19),
            "method \"GE T\" is not an HTTP method",
        ),
        (
            "bad header",
            "headers = { \"x-env\" = \"prod\", \"bad name\" = \"*\" }\naction = \"allow\"\n",
            (7, 31),
            "\"bad name\" is not an HTTP header name",
        ),
        (
            "dup id",
            "action = \"allow\"\n[[policy.rule]]\nid = \"r\"\naction = \"block\"\n",
            (9, 6),
            "rule id \"r\" is used twice",
        ),
    ];
    for (name, rest, (line, column), want) in cases {
        let text = format!("{head}{rest}");
        let err = Config::parse_with(&text, "g.toml", &no_env()).expect_err(name);
        let (l, c, message) = position(&err);
        assert_eq!((l, c), (line, column), "{name}: {message}");
        assert!(message.contains(want), "{name}: {message}");
        assert!(
            err.to_string()
                .starts_with(&format!("g.toml:{line}:{column}: policy: ")),
            "{name}: {err}"
        );
    }
}

#[test]
fn upstream_ca_files_are_read_and_checked() {
    let t = TempDir::new("cas");
    let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
    let good = t.write("ca.pem", ca.cert.pem().as_bytes());
    let garbage = t.write("garbage.pem", b"not a certificate\n");
    let broken = t.write(
        "broken.pem",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let missing = t.0.join("missing.pem");

    let c = Config::parse_with(
        &format!("[interception]\nupstream_ca_files = [{good:?}]\nsystem_roots = false\n"),
        "t",
        &no_env(),
    )
    .unwrap();
    assert_eq!(c.interception.upstream_ca_files, vec![good.clone()]);
    assert_eq!(c.interception.upstream_cas.len(), 1);
    assert_eq!(
        c.interception.upstream_cas[0].as_ref(),
        ca.cert.der().as_ref()
    );
    assert!(!c.interception.system_roots);
    assert!(
        c.policy_report().contains("no system roots + ["),
        "{}",
        c.policy_report()
    );

    let cases = [
        ("garbage", &garbage, "holds no certificate"),
        ("broken", &broken, "not a valid X.509 certificate"),
        ("missing", &missing, "No such file"),
    ];
    for (name, path, want) in cases {
        let text = format!("[interception]\nupstream_ca_files = [{good:?}, {path:?}]\n");
        let err = Config::parse_with(&text, "g.toml", &no_env()).expect_err(name);
        let (l, c, message) = position(&err);
        let column = "upstream_ca_files = [".len() + format!("{good:?}, ").len() + 1;
        assert_eq!((l, c), (2, column), "{name}: {message}");
        assert!(
            message.contains(&path.display().to_string()),
            "{name}: {message}"
        );
        assert!(message.contains(want), "{name}: {message}");
    }

    let err = Config::parse_with(
        "[interception]\nsniff_timeout_ms = 0\n",
        "g.toml",
        &no_env(),
    )
    .unwrap_err();
    assert_eq!(position(&err).0, 2);
    let err = Config::parse_with("[interception]\nsystem_roots = false\n", "g", &no_env())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no upstream could be verified"), "{err}");
    let err = Config::parse_with("[interception]\nsniff_timeout = 5\n", "g", &no_env())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("g:2:1: unknown field `sniff_timeout`"),
        "{err}"
    );
}

#[test]
fn client_secret_reads_through_the_same_credential_code() {
    let creds = TempDir::new("cc");
    creds.write("oidc", b"s3cret\n");
    let text = "[[identity]]\nname = \"ci\"\ncgroups = [\"ci\"]\nclient_credentials = { issuer = \"https://idp.example\", client_id = \"gw\", client_secret_credential = \"oidc\" }\n";
    let env = LoadEnv {
        credentials_directory: Some(creds.0.clone()),
    };
    let c = Config::parse_with(text, "t", &env).unwrap();
    match &c.identities[0].source {
        IdentitySource::ClientCredentials(cc) => assert_eq!(cc.client_secret.expose(), "s3cret"),
        other => panic!("{other:?}"),
    }
    let err = Config::parse_with(text, "t", &no_env())
        .unwrap_err()
        .to_string();
    assert!(err.contains("$CREDENTIALS_DIRECTORY is not set"), "{err}");
}

#[test]
fn approvals_section_defaults_and_values() {
    let c = Config::parse_with("", "t", &no_env()).unwrap();
    let a = &c.approvals;
    assert_eq!(a.timeout, Duration::from_secs(300));
    assert_eq!(a.max_window, Duration::from_secs(8 * 3600));
    assert_eq!(a.groups_claim, "groups");
    assert!(a.api_listen.is_none() && a.webhook.is_none() && a.issuers.is_empty());
    let text = r#"
[[trusted_issuer]]
issuer = "https://idp.example"
audiences = ["gateway"]

[approvals]
timeout_secs = 90
max_window_minutes = 30
issuers = ["https://idp.example"]
groups_claim = "roles"
duty_mapping = { "finance-approvers" = ["approval-engine"] }
preview_bytes = 64

[approvals.api]
listen = "127.0.0.1:8787"

[approvals.webhook]
url = "https://hooks.example/approvals"
timeout_ms = 1500
retries = 2
"#;
    let c = Config::parse_with(text, "t", &no_env()).unwrap();
    let a = &c.approvals;
    assert_eq!(a.timeout, Duration::from_secs(90));
    assert_eq!(a.max_window, Duration::from_secs(30 * 60));
    assert_eq!(a.issuers, vec!["https://idp.example".to_string()]);
    assert_eq!(a.groups_claim, "roles");
    assert_eq!(a.duty_mapping["finance-approvers"], vec!["approval-engine"]);
    assert_eq!(a.preview_bytes, 64);
    assert_eq!(a.api_listen, Some("127.0.0.1:8787".parse().unwrap()));
    let w = a.webhook.as_ref().unwrap();
    assert_eq!(w.url, "https://hooks.example/approvals");
    assert_eq!((w.timeout, w.retries), (Duration::from_millis(1500), 2));
}

#[test]
fn approvals_errors_point_at_the_value() {
    let cases = [
        ("[approvals]\ntimeout_secs = 0\n", 2, 16, "greater than 0"),
        (
            "[approvals]\nissuers = [\"https://nobody.example\"]\n",
            2,
            12,
            "not a [[trusted_issuer]]",
        ),
        (
            "[approvals.api]\nlisten = \"localhost\"\n",
            2,
            10,
            "not an address with a port",
        ),
        (
            "[approvals.webhook]\nurl = \"ftp://x\"\n",
            2,
            7,
            "http:// or https://",
        ),
        ("[approvals]\nsurprise = 1\n", 2, 1, "unknown field"),
    ];
    for (text, line, column, want) in cases {
        let err = Config::parse_with(text, "g.toml", &no_env()).unwrap_err();
        let (l, c, message) = position(&err);
        assert_eq!((l, c), (line, column), "{text}: {err}");
        assert!(message.contains(want), "{text}: {err}");
    }
    let err = Config::parse_with(
        "[policy]\nversion = 1\ndefault = \"approve\"\n",
        "g.toml",
        &no_env(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not possible"), "{err}");
}
