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
