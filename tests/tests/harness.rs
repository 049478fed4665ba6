//! The harness itself, without the daemon: namespaces, origins and the probe
//! must work directly, or the foundation tests prove nothing.

use gateway_tests::{DnsOrigin, Origin, Probe, TestNet, require_root};
use std::collections::BTreeSet;
use std::net::SocketAddr;

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_gw-probe"))
}

#[test]
fn concurrent_test_nets_get_distinct_subnets_and_names() {
    require_root();
    let nets: Vec<TestNet> = (0..3).map(|_| TestNet::new()).collect();
    let v4: BTreeSet<_> = nets.iter().map(|n| n.ns_v4()).collect();
    let v6: BTreeSet<_> = nets.iter().map(|n| n.ns_v6()).collect();
    let names: BTreeSet<_> = nets.iter().map(|n| n.name().to_owned()).collect();
    assert_eq!((v4.len(), v6.len(), names.len()), (3, 3, 3));
    let ns = nets[0].name().to_owned();
    drop(nets);
    assert!(
        !std::path::Path::new(&format!("/run/netns/{ns}")).exists(),
        "netns removed on drop"
    );
}

#[test]
fn origins_answer_directly_over_ipv4_and_ipv6() {
    require_root();
    let probe = probe();
    let net = TestNet::new();
    let origin = Origin::start(
        &net,
        &probe,
        &[net.ns_v4().into(), net.ns_v6().into()],
        20001..=20003,
    );
    for target in [
        SocketAddr::new(net.ns_v4().into(), 20002),
        SocketAddr::new(net.ns_v6().into(), 20003),
    ] {
        let mark = origin.mark();
        let run = probe.run(["tcp", &target.to_string(), "--send", "x"]);
        assert_eq!(run.status.code(), Some(0), "{run:?}");
        assert_eq!(run.json["received"], format!("port={}\nx", target.port()));
        assert_eq!(run.json["peer"], target.to_string());
        let acc = origin.wait_accepted(mark, |v| v["accepted"] == target.port());
        assert_eq!(acc["peer"], run.json["local"]);
    }
    let mut args = vec!["many".to_owned(), "--count".into(), "60".into()];
    args.extend((20001..=20003).map(|p| SocketAddr::new(net.ns_v4().into(), p).to_string()));
    let many = probe.run(&args);
    assert_eq!(many.json["ok_count"], 60, "{:?}", many.json);
    let mark = origin.mark();
    origin.assert_nothing_since(mark, 20001);
}

#[test]
fn dns_origin_answers_a_queries() {
    require_root();
    let probe = probe();
    let net = TestNet::new();
    let server = SocketAddr::new(net.ns_v4().into(), 5300);
    let dns = DnsOrigin::start(
        &net,
        &probe,
        &[server],
        &[("origin.test", net.ns_v4().into())],
    );
    let r = probe.run(["dns", "origin.test", &server.to_string()]).json;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["from"], server.to_string());
    assert_eq!(r["answers"], serde_json::json!([net.ns_v4().to_string()]));
    let nx = probe.run(["dns", "nope.test", &server.to_string()]).json;
    assert_eq!(nx["rcode"], 3, "{nx}");
    dns.wait_query(|q| q["query"] == "nope.test");
    assert_eq!(dns.queries().len(), 2);
}

#[test]
fn probe_reports_errno_names() {
    require_root();
    // Nothing listens on this loopback port: ECONNREFUSED, at once.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let r = probe().run(["tcp", &addr.to_string()]);
    assert_eq!(r.status.code(), Some(1));
    assert_eq!(r.json["error"], "ECONNREFUSED", "{:?}", r.json);
    assert_eq!(r.json["stage"], "connect");
}
