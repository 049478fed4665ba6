//! The Chromium driver's own tests: real headless Chromium, started through
//! `gateway exec` in a tagged cgroup with the daemon in L4 mode, resolves a
//! name itself (UDP to the resolv.conf nameserver, which the hook hands to
//! the gateway's DNS forwarder), loads a page from nginx in a test network
//! namespace, runs the page's `fetch()`, and the driver reads the DOM back.
//! The browser is configured for nothing: no proxy, resolver or certificate
//! flag.

use gateway_tests::chromium::{Browser, BrowserHome};
use gateway_tests::daemon::{Rule, is_event, num, text};
use gateway_tests::{
    Config, Daemon, DnsOrigin, Probe, TempDir, TestNet, cgroup, poll, require_root, unique,
};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HTTP_PORT: u16 = 20080;
const HTTPS_PORT: u16 = 20443;
const DNS_UPSTREAM_PORT: u16 = 5300;
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The test page sets its title when its fetch() settled, either way.
const SETTLED: &str = "document.title === 'done' || document.title === 'failed'";

/// The page: fetches `/data.json` and writes what it got into `#result`.
const INDEX_HTML: &str = r#"<!doctype html>
<html><head><title>loading</title></head>
<body><div id="result">pending</div>
<script>
fetch('/data.json')
  .then(r => r.json())
  .then(j => {
    document.getElementById('result').textContent = 'fetched:' + j.value;
    document.title = 'done';
  })
  .catch(e => {
    document.getElementById('result').textContent = 'failed:' + e;
    document.title = 'failed';
  });
</script>
</body></html>
"#;

/// nginx in the test namespace, one process (`master_process off`), serving
/// `www/` over HTTP and HTTPS (a leaf for `host` signed by a test CA made
/// with the openssl CLI). No keep-alive: every request is one connection
/// and so one audit event, emitted as soon as the response is sent.
struct Nginx {
    child: Child,
    dir: TempDir,
}

impl Nginx {
    fn start(net: &TestNet, host: &str, ca_cn: &str, token: &str) -> Nginx {
        let dir = TempDir::new();
        let d = dir.path();
        let www = d.join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        std::fs::write(www.join("index.html"), INDEX_HTML).unwrap();
        std::fs::write(
            www.join("data.json"),
            serde_json::json!({ "value": token }).to_string(),
        )
        .unwrap();
        make_certs(d, host, ca_cn);
        let ip = net.ns_v4();
        let dd = d.display();
        let conf = format!(
            r#"master_process off;
daemon off;
pid {dd}/nginx.pid;
error_log {dd}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {dd}/access.log;
    keepalive_timeout 0;
    types {{ text/html html; application/json json; }}
    client_body_temp_path {dd}/tmp/body;
    proxy_temp_path {dd}/tmp/proxy;
    fastcgi_temp_path {dd}/tmp/fastcgi;
    uwsgi_temp_path {dd}/tmp/uwsgi;
    scgi_temp_path {dd}/tmp/scgi;
    server {{
        listen {ip}:{HTTP_PORT};
        root {dd}/www;
    }}
    server {{
        listen {ip}:{HTTPS_PORT} ssl;
        ssl_certificate {dd}/leaf.pem;
        ssl_certificate_key {dd}/leaf.key;
        root {dd}/www;
    }}
}}
"#
        );
        let conf_path = d.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(d)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("nginx.stderr")).unwrap());
        let mut nginx = Nginx {
            child: net.spawn_in_ns(cmd),
            dir,
        };
        let http = SocketAddr::new(ip.into(), HTTP_PORT);
        let up = poll(Duration::from_secs(10), || {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}): {}", nginx.logs());
            }
            http_get_ok(http).then_some(())
        });
        assert!(
            up.is_some(),
            "nginx did not answer on {http}: {}",
            nginx.logs()
        );
        nginx
    }

    fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!(
            "\n--- nginx stderr ---\n{}\n--- nginx error.log ---\n{}",
            read("nginx.stderr"),
            read("error.log")
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get_ok(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}); it comes with ca-certificates"));
    assert!(
        out.status.success(),
        "`openssl {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ca.pem` (CN `ca_cn`) and `leaf.pem`/`leaf.key` for `host`, in `dir`.
fn make_certs(dir: &Path, host: &str, ca_cn: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca_subj = format!("/CN={ca_cn}");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        &ca_subj,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(dir, &args);
    let leaf_subj = format!("/CN={host}");
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", &leaf_subj,
    ]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("leaf.ext"),
        format!("subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
}

/// One test's world. Fields drop in declaration order: the daemon (and its
/// cgroups) first, the namespace last.
struct World {
    daemon: Daemon,
    dns: DnsOrigin,
    nginx: Nginx,
    net: TestNet,
    /// Allowed by the policy; resolves to the namespace.
    shop: String,
    /// Not allowed (default block); resolves to the same address.
    blocked: String,
    /// What `/data.json` holds.
    token: String,
    ca_cn: String,
}

impl World {
    fn new() -> World {
        require_root();
        let probe = Probe::new(env!("CARGO_BIN_EXE_gw-probe"));
        let net = TestNet::new();
        net.wait_link_local();
        let u = unique("site");
        let shop = format!("shop.{u}.test");
        let blocked = format!("blocked.{u}.test");
        let token = unique("token");
        let ca_cn = format!("Chromium selftest CA {u}");
        let nginx = Nginx::start(&net, &shop, &ca_cn, &token);
        let upstream = SocketAddr::new(net.ns_v4().into(), DNS_UPSTREAM_PORT);
        let ns: IpAddr = net.ns_v4().into();
        let dns = DnsOrigin::start(&net, &probe, &[upstream], &[(&shop, ns), (&blocked, ns)]);
        let mut cfg = Config::new().dns_upstream(upstream).rule(Rule {
            hosts: vec![shop.clone()],
            ..Rule::new("shop", "allow")
        });
        cfg.policy_default = "block".into();
        let daemon = Daemon::start(cfg);
        World {
            daemon,
            dns,
            nginx,
            net,
            shop,
            blocked,
            token,
            ca_cn,
        }
    }

    /// Chromium in identity `t1`'s cgroup, via `gateway exec`.
    fn browser(&self, home: &BrowserHome) -> Browser {
        Browser::launch(home, |program, args| self.daemon.exec("t1", program, args))
    }

    fn identity_cgroup(&self) -> String {
        format!("/{}", self.daemon.config().identities[0].cgroups[0])
    }

    /// Every audit event (connection or dns) from `cgroup`, for reports.
    fn events_of(&self, cgroup: &str) -> Vec<Value> {
        self.daemon
            .log()
            .values()
            .into_iter()
            .filter(|v| {
                (is_event(v, "connection") || is_event(v, "dns")) && text(v, "cgroup") == cgroup
            })
            .collect()
    }
}

fn elapsed_ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

#[test]
fn chromium_in_the_cgroup_loads_a_page_and_its_fetch_through_the_gateway() {
    let w = World::new();
    let home = BrowserHome::new();
    let t = Instant::now();
    let mut b = w.browser(&home);
    let launched = elapsed_ms(t);
    let url = format!("http://{}:{HTTP_PORT}/", w.shop);
    let t = Instant::now();
    let dom = b
        .load(&url, SETTLED, LOAD_TIMEOUT)
        .unwrap_or_else(|e| panic!("loading {url} through the gateway: {e}"));
    eprintln!(
        "chromium selftest: launch {launched} ms, load with fetch() {} ms",
        elapsed_ms(t)
    );
    assert!(
        dom.contains(&format!("<div id=\"result\">fetched:{}</div>", w.token)),
        "the DOM must show the value the page fetched: {dom}"
    );
    let main = b.main_response().cloned().unwrap_or_default();
    assert_eq!(main["status"], 200, "{main}");
    assert_eq!(
        text(&main, "remoteIPAddress"),
        w.net.ns_v4().to_string(),
        "Chromium must believe it talked to the origin itself: {main}"
    );

    let cg = b.cgroup();
    assert!(
        cg.starts_with(&format!("{}/", w.identity_cgroup())),
        "Chromium must run under the identity's cgroup, not {cg}"
    );
    let exe = b.exe().to_string_lossy().into_owned();
    let net_pid = u64::from(b.network_pid().unwrap());

    // Chromium resolved the name itself, through the gateway's forwarder.
    let dns = w.daemon.wait_event(
        |v| is_event(v, "dns") && text(v, "name").trim_end_matches('.') == w.shop,
        Duration::from_secs(10),
    );
    assert_eq!(text(&dns, "identity"), "t1", "{dns}");
    assert_eq!(text(&dns, "cgroup"), cg, "{dns}");
    assert!(
        text(&dns, "answers").contains(&w.net.ns_v4().to_string()),
        "{dns}"
    );
    w.dns
        .wait_query(|q| text(q, "query").trim_end_matches('.') == w.shop);

    // The page and its fetch() went through the gateway: one connection each
    // (the origin keeps none alive), from the browser's network service.
    let origin = SocketAddr::new(w.net.ns_v4().into(), HTTP_PORT).to_string();
    let conns = w.daemon.wait_events(
        2,
        |v| is_event(v, "connection") && text(v, "cgroup") == cg && text(v, "orig_dst") == origin,
        Duration::from_secs(10),
    );
    for ev in &conns {
        assert_eq!(text(ev, "identity"), "t1", "{ev}");
        assert_eq!(text(ev, "host"), w.shop, "{ev}");
        assert_eq!(text(ev, "decision"), "allow", "{ev}");
        assert_eq!(text(ev, "rule"), "shop", "{ev}");
        assert_eq!(text(ev, "exe"), exe, "{ev}");
        assert_eq!(
            num(ev, "pid"),
            Some(net_pid),
            "the network service connects: {ev}"
        );
        assert!(num(ev, "bytes_down").unwrap_or(0) > 0, "{ev}");
    }
    // Closing the browser ends every process of it, so `gateway exec`
    // returns and removes the cgroup it made.
    drop(b);
    let exec_cgroup = cgroup::cgroup2_mount().join(cg.trim_start_matches('/'));
    assert!(
        !exec_cgroup.exists(),
        "{} must be gone once the browser is closed",
        exec_cgroup.display()
    );
    eprintln!(
        "chromium selftest: audit events of the browser's cgroup:\n{}",
        w.events_of(&cg)
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_host_the_policy_blocks_gets_the_gateways_403_page() {
    let w = World::new();
    let home = BrowserHome::new();
    let mut b = w.browser(&home);
    let url = format!("http://{}:{HTTP_PORT}/", w.blocked);
    // Plain HTTP refused at connection level still gets a page it can
    // show: 403, naming the rule and a request id. Nothing reached nginx.
    let dom = b
        .load(
            &url,
            "document.body && document.body.innerText.includes('Blocked by the gateway')",
            LOAD_TIMEOUT,
        )
        .expect("the gateway's refusal page loads");
    assert!(dom.contains("Request id"), "{dom}");
    assert_eq!(
        b.main_response().and_then(|r| r["status"].as_u64()),
        Some(403)
    );
    let cg = b.cgroup();
    let ev = w.daemon.wait_event(
        |v| is_event(v, "connection") && text(v, "cgroup") == cg && text(v, "host") == w.blocked,
        Duration::from_secs(10),
    );
    assert_eq!(text(&ev, "decision"), "block", "{ev}");
    assert_eq!(text(&ev, "outcome"), "refused", "{ev}");
    assert!(dom.contains(&text(&ev, "rule")), "{dom}");
}

#[test]
fn the_browser_refuses_an_untrusted_certificate_and_accepts_it_once_trusted() {
    let w = World::new();
    let url = format!("https://{}:{HTTPS_PORT}/", w.shop);

    // An empty NSS database: the test CA is unknown.
    let home = BrowserHome::new();
    let mut b = w.browser(&home);
    let err = b
        .load(&url, SETTLED, LOAD_TIMEOUT)
        .expect_err("a certificate from an unknown CA must be refused");
    assert!(
        err.starts_with("net::ERR_CERT_AUTHORITY_INVALID"),
        "the browser must refuse the certificate: {err}"
    );
    assert_eq!(
        b.main_cert_issuer().as_deref(),
        Some(w.ca_cn.as_str()),
        "{err}"
    );
    assert_eq!(
        b.main_cert_subject().as_deref(),
        Some(w.shop.as_str()),
        "{err}"
    );
    drop(b);

    // The same CA in the browser's own store: the page and its fetch load.
    let trusting = BrowserHome::new();
    trusting.trust_ca(&w.nginx.ca_pem(), "selftest");
    assert!(trusting.certificates().contains("selftest"));
    let mut b = w.browser(&trusting);
    let dom = b
        .load(&url, SETTLED, LOAD_TIMEOUT)
        .unwrap_or_else(|e| panic!("loading {url} with the CA trusted: {e}"));
    assert!(
        dom.contains(&format!("fetched:{}", w.token)),
        "the DOM must show the fetched value: {dom}"
    );
    assert_eq!(b.main_cert_issuer().as_deref(), Some(w.ca_cn.as_str()));
    let sec = b.main_security().cloned().unwrap_or_default();
    assert_eq!(
        sec["sanList"],
        serde_json::json!([w.shop]),
        "the certificate Chromium saw: {sec}"
    );
}
