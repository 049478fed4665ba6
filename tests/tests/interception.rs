//! Issue 4: the gateway sees inside HTTP and TLS where the policy asks it
//! to — block, mask, inject — and splices everything else untouched.
//!
//! Real parts only: headless Chromium (Debian) started through `gateway
//! exec` with no proxy flag and no certificate flag, trusting the gateway's
//! CA through its NSS database (`gateway ca trust --nssdb`); origins
//! (`gw-origin`, h2 + HTTP/1.1 + WebSocket) with their own CA in a network
//! namespace; names resolved by the gateway's DNS forwarder; curl for the
//! command-line cases. Each test checks what the client saw, what the
//! origin received, and what the audit recorded.

use gateway_tests::chromium::{Browser, BrowserHome};
use gateway_tests::daemon::{is_event, num, text};
use gateway_tests::web::{WebOptions, WebOrigin};
use gateway_tests::{Config, Daemon, DnsOrigin, Probe, Rule, TestNet, require_root};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const DNS_PORT: u16 = 5300;
const LOAD: Duration = Duration::from_secs(30);
const EVENT: Duration = Duration::from_secs(10);

/// Hosts of the main origin (one certificate, port 443).
const SHOP: &str = "shop.test";
const PROD: &str = "db.prod.test";
const PARTNER: &str = "partner.test";
const OTHER: &str = "other.test";
/// The spliced host: a second origin with a certificate of its own, on
/// another port, so no browser can coalesce it with the intercepted ones.
const PLAIN: &str = "plain.test";
const PLAIN_PORT: u16 = 8443;

const SECRET: &str = "Bearer s3cr3t-partner-token-7f9c2e";

/// What the card, SSN and email of the orders page look like, and the
/// fields that must survive untouched.
const ORDERS: &str = r#"{"orders":[{"id":"ORD-10001","created":"2026-11-22T10:00:00Z","price":"129.99","card":"4111 1111 1111 1111","ssn":"123-45-6789","email":"alice@example.com"},{"id":"ORD-10002","created":"2026-11-22T11:30:00Z","price":"15.00","card":"5500 0000 0000 0004","ssn":"078-05-1120","email":"bob@example.org"}]}"#;

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_gw-probe"))
}

fn origin_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gw-origin"))
}

/// The policy of the browser tests: mask the shop's API, block deletes on
/// prod, inject the partner credential, splice `plain.test`, refuse the rest.
fn policy(cfg: Config, secret_file: &std::path::Path) -> Config {
    cfg.secret("partner-token", secret_file)
        .rule(Rule {
            hosts: vec![SHOP.into()],
            mask: vec![
                "\"credit_card\"".into(),
                "\"us_ssn\"".into(),
                "\"email\"".into(),
            ],
            ..Rule::new("shop-mask", "allow")
        })
        .rule(Rule {
            hosts: vec!["*.prod.test".into()],
            methods: vec!["DELETE".into()],
            ..Rule::new("no-prod-deletes", "block")
        })
        .rule(Rule {
            hosts: vec!["*.prod.test".into()],
            ..Rule::new("prod-read", "allow")
        })
        .rule(Rule {
            hosts: vec![PARTNER.into()],
            inject: Some(("Authorization".into(), "partner-token".into())),
            ..Rule::new("partner-credential", "allow")
        })
        .rule(Rule {
            hosts: vec![OTHER.into()],
            methods: vec!["GET".into(), "HEAD".into()],
            ..Rule::new("other-read", "allow")
        })
        .rule(Rule {
            hosts: vec![PLAIN.into()],
            ..Rule::new("plain-splice", "allow")
        })
}

/// Tests of this file run one at a time: Chromium aborts loads with
/// `ERR_NETWORK_CHANGED` when another test adds network interfaces (each
/// world's namespace and veth pair) while a page is loading.
static SERIAL: Mutex<()> = Mutex::new(());

/// One test's world; fields drop in order: browser, daemon, origins, net,
/// and last the lock.
struct World {
    browser: Option<Browser>,
    home: BrowserHome,
    daemon: Daemon,
    _dns: DnsOrigin,
    origin: WebOrigin,
    plain: WebOrigin,
    net: TestNet,
    _serial: MutexGuard<'static, ()>,
}

impl World {
    fn new() -> World {
        World::with(|c| c)
    }

    fn with(extra: impl FnOnce(Config) -> Config) -> World {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let net = TestNet::new();
        net.wait_link_local();
        let origin = WebOrigin::start(
            &net,
            WebOptions::new(origin_bin()).names(&[SHOP, PROD, PARTNER, OTHER]),
        );
        let plain = WebOrigin::start(
            &net,
            WebOptions::new(origin_bin())
                .names(&[PLAIN])
                .http_port(0)
                .https_port(PLAIN_PORT),
        );
        let ns = net.ns_v4().into();
        let dns = DnsOrigin::start(
            &net,
            &probe(),
            &[SocketAddr::new(ns, DNS_PORT)],
            &[
                (SHOP, ns),
                (PROD, ns),
                (PARTNER, ns),
                (OTHER, ns),
                (PLAIN, ns),
            ],
        );
        let mut cfg = Config::new();
        let secret_file = cfg.dir().join("partner-token");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        cfg.policy_default = "block".into();
        cfg = cfg
            .dns_upstream(SocketAddr::new(ns, DNS_PORT))
            .interception_ca(origin.ca_pem_path())
            .interception_ca(plain.ca_pem_path());
        let cfg = extra(policy(cfg, &secret_file));
        let daemon = Daemon::start(cfg);
        let home = BrowserHome::new();
        World {
            browser: None,
            home,
            daemon,
            _dns: dns,
            origin,
            plain,
            net,
            _serial: serial,
        }
    }

    /// The gateway's CA certificate (created by the daemon at start).
    fn gateway_ca(&self) -> PathBuf {
        self.daemon.config().state_dir.join("ca").join("cert.pem")
    }

    /// Put the gateway's CA into the browser's NSS database the way a user
    /// would, plus `extra` CAs, then start Chromium through `gateway exec`.
    fn browser(&mut self, trust_gateway: bool, extra: &[(PathBuf, &str)]) -> &mut Browser {
        if trust_gateway {
            let out = self
                .daemon
                .gateway("ca")
                .args(["trust", "--nssdb"])
                .arg(self.home.nssdb())
                .output()
                .expect("run gateway ca trust");
            assert!(
                out.status.success(),
                "gateway ca trust --nssdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for (pem, nick) in extra {
            self.home.trust_ca(pem, nick);
        }
        let daemon = &self.daemon;
        let b = Browser::launch(&self.home, |p, a| daemon.exec("t1", p, a));
        self.browser = Some(b);
        self.browser.as_mut().unwrap()
    }

    /// Wait for the gateway's audit record of one HTTP exchange.
    fn http_event(&self, method: &str, host: &str, path: &str) -> Value {
        self.daemon.wait_event(
            |v| {
                is_event(v, "http")
                    && v["method"] == method
                    && v["host"] == host
                    && v["path"] == path
            },
            EVENT,
        )
    }

    /// The origin's logged requests for `path` on `host` with `method`.
    fn origin_saw(&self, method: &str, host: &str, path: &str) -> Vec<Value> {
        self.origin
            .requests()
            .into_iter()
            .filter(|r| r["method"] == method && r["path"] == path && host_is(r, host))
            .collect()
    }

    /// curl through the gateway (inside the identity's cgroup), trusting the
    /// gateway CA, names pinned to the origin with `--resolve`.
    fn curl(&self, args: &[&str]) -> Output {
        self.curl_with(self.daemon.config_path(), args)
    }

    /// `curl` started by `gateway exec --config <config>`.
    fn curl_with(&self, config: &std::path::Path, args: &[&str]) -> Output {
        let ip = self.net.ns_v4().to_string();
        let mut full: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "--cacert".into(),
            self.gateway_ca().display().to_string(),
        ];
        for host in [SHOP, PROD, PARTNER, OTHER] {
            for port in [80, 443] {
                full.push("--resolve".into());
                full.push(format!("{host}:{port}:{ip}"));
            }
        }
        full.extend(args.iter().map(|s| s.to_string()));
        std::process::Command::new(gateway_tests::gateway_bin())
            .arg("exec")
            .arg("--config")
            .arg(config)
            .args(["--identity", "t1", "--", "curl"])
            .args(&full)
            .output()
            .expect("run curl")
    }
}

fn host_is(req: &Value, host: &str) -> bool {
    let h = req["host"].as_str().unwrap_or_default();
    h == host || h.split(':').next() == Some(host)
}

fn page(script: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>loading</title></head>\
         <body><pre id=out></pre><script>\n\
         const out = document.getElementById('out');\n\
         function done(v) {{ out.textContent = v; document.title = 'done'; }}\n\
         (async () => {{ {script} }})().catch(e => done('error: ' + e));\n\
         </script></body></html>"
    )
}

const DONE: &str = "document.title === 'done'";

fn out_of(dom: &str) -> String {
    let start = dom.find("<pre id=\"out\">").map(|i| i + 14).unwrap_or(0);
    let end = dom[start..].find("</pre>").map_or(dom.len(), |i| start + i);
    dom[start..end]
        .replace("&amp;", "&")
        .replace("&quot;", "\"")
}

#[test]
fn chromium_sees_masked_json_with_ids_and_prices_untouched() {
    let mut w = World::new();
    w.origin.write(
        "orders.html",
        page("const r = await fetch('/orders.json'); done(await r.text());"),
    );
    // Served gzip-compressed: the gateway decodes, masks, sends it plain.
    w.origin.write("orders.json", ORDERS);
    w.origin
        .write_precompressed("orders.json", ORDERS.as_bytes());
    let url = format!("https://{SHOP}/orders.html");
    let b = w.browser(true, &[]);
    let dom = b.load(&url, DONE, LOAD).expect("the page loads");
    let out = out_of(&dom);
    for raw in [
        "4111 1111 1111 1111",
        "5500 0000 0000 0004",
        "123-45-6789",
        "078-05-1120",
        "alice@example.com",
        "bob@example.org",
    ] {
        assert!(!out.contains(raw), "{raw} reached the page: {out}");
    }
    for kept in [
        "ORD-10001",
        "ORD-10002",
        "2026-11-22T10:00:00Z",
        "2026-11-22T11:30:00Z",
        "129.99",
        "15.00",
        "[MASKED:credit_card:****1111]",
        "[MASKED:credit_card:****0004]",
        "[MASKED:us_ssn]",
        "[MASKED:email]",
    ] {
        assert!(out.contains(kept), "{kept} missing from the page: {out}");
    }
    let parsed: Value = serde_json::from_str(&out).expect("the masked body is still JSON");
    assert_eq!(parsed["orders"][1]["price"], "15.00");

    // The origin really sent it compressed; the audit counted six values.
    let req = &w.origin_saw("GET", SHOP, "/orders.json")[0];
    let ae = req["headers"]["accept-encoding"][0].as_str().unwrap_or("");
    assert!(ae.contains("gzip") && !ae.contains("zstd"), "{ae}");
    let ev = w.http_event("GET", SHOP, "/orders.json");
    assert_eq!(text(&ev, "decision"), "allow");
    assert_eq!(text(&ev, "rule"), "shop-mask");
    assert_eq!(num(&ev, "masked"), Some(6), "{ev}");
    assert_eq!(num(&ev, "status"), Some(200));
    assert_eq!(text(&ev, "outcome"), "complete");
    assert_eq!(text(&ev, "identity"), "t1");
    // The browser saw the gateway's certificate for an inspected host.
    let issuer = w.browser.as_ref().unwrap().main_cert_issuer();
    assert!(
        issuer
            .as_deref()
            .unwrap_or("")
            .contains("gateway interception CA"),
        "{issuer:?}"
    );
}

#[test]
fn chromium_delete_to_blocked_host_gets_403_and_origin_never_sees_it() {
    let mut w = World::new();
    w.origin.write(
        "admin.html",
        page(
            "const r = await fetch('/v1/items/7', {method: 'DELETE'});\n\
             done(r.status + ' ' + (await r.text()));",
        ),
    );
    let url = format!("https://{PROD}/admin.html");
    let b = w.browser(true, &[]);
    let dom = b.load(&url, DONE, LOAD).expect("the page loads");
    let out = out_of(&dom);
    assert!(out.starts_with("403 "), "{out}");
    assert!(out.contains("no-prod-deletes"), "{out}");
    let ev = w.http_event("DELETE", PROD, "/v1/items/7");
    let id = text(&ev, "request_id");
    assert!(
        !id.is_empty() && out.contains(&id),
        "request id {id} not in {out}"
    );
    assert_eq!(text(&ev, "decision"), "block");
    assert_eq!(text(&ev, "rule"), "no-prod-deletes");
    assert_eq!(num(&ev, "status"), Some(403));
    // The page itself came from the origin; the DELETE never did.
    assert_eq!(w.origin_saw("GET", PROD, "/admin.html").len(), 1);
    assert!(
        w.origin.requests().iter().all(|r| r["method"] != "DELETE"),
        "the origin saw a DELETE: {:?}",
        w.origin.requests()
    );
}

#[test]
fn chromium_origin_gets_injected_credential_the_page_never_had() {
    let mut w = World::new();
    w.origin.write(
        "partner.html",
        page(
            "const a = await fetch('/echo', {headers: {'Authorization': 'Bearer from-the-page'}});\n\
             const j = await a.json();\n\
             const b = await fetch('https://other.test/echo');\n\
             done(JSON.stringify({status: a.status, other: b.status, sawAuth: 'authorization' in j.headers}));",
        ),
    );
    let url = format!("https://{PARTNER}/partner.html");
    let b = w.browser(true, &[]);
    let dom = b.load(&url, DONE, LOAD).expect("the page loads");
    let out = out_of(&dom);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["status"], 200, "{out}");
    assert_eq!(v["other"], 200, "{out}");

    // The partner origin got the secret, and only the secret, every time.
    let echoes = w.origin_saw("GET", PARTNER, "/echo");
    assert_eq!(echoes.len(), 1, "{echoes:?}");
    assert_eq!(
        echoes[0]["headers"]["authorization"],
        serde_json::json!([SECRET]),
        "{:?}",
        echoes[0]
    );
    let page_req = &w.origin_saw("GET", PARTNER, "/partner.html")[0];
    assert_eq!(page_req["headers"]["authorization"][0], SECRET);
    // Another destination never gets it.
    let other = w.origin_saw("GET", OTHER, "/echo");
    assert_eq!(other.len(), 1, "{other:?}");
    assert!(
        other[0]["headers"].get("authorization").is_none(),
        "{other:?}"
    );

    let ev = w.http_event("GET", PARTNER, "/echo");
    assert_eq!(text(&ev, "injected"), "authorization<-partner-token");
    // The page could only learn it from the origin's echo; the audit, the
    // logs and the browser's own DOM never carry it.
    let logs = w.daemon.all_output();
    assert!(!logs.contains("s3cr3t"), "the secret leaked into the logs");
    assert!(!dom.contains("s3cr3t"), "the secret reached the DOM");
}

#[test]
fn chromium_h2_and_websocket_work_through_the_gateway() {
    let mut w = World::new();
    w.origin.write(
        "live.html",
        page(
            "const proto = performance.getEntriesByType('navigation')[0].nextHopProtocol;\n\
             const echo = await new Promise((ok, fail) => {\n\
               const ws = new WebSocket('wss://' + location.host + '/ws');\n\
               ws.onopen = () => ws.send('hello over the gateway');\n\
               ws.onmessage = e => { ok(e.data); ws.close(); };\n\
               ws.onerror = () => fail('websocket error');\n\
             });\n\
             done(proto + ' | ' + echo);",
        ),
    );
    let url = format!("https://{SHOP}/live.html");
    let b = w.browser(true, &[]);
    let dom = b.load(&url, DONE, LOAD).expect("the page loads");
    let out = out_of(&dom);
    assert_eq!(out, "h2 | hello over the gateway", "{dom}");
    let page_req = &w.origin_saw("GET", SHOP, "/live.html")[0];
    assert_eq!(page_req["version"], "HTTP/2.0", "{page_req}");
    w.origin
        .wait_ws(|v| v["text"] == "hello over the gateway", EVENT);
    let ev = w.http_event("GET", SHOP, "/live.html");
    assert_eq!(text(&ev, "version"), "HTTP/2");
    let ws = w
        .daemon
        .wait_event(|v| is_event(v, "websocket") && v["path"] == "/ws", EVENT);
    assert_eq!(num(&ws, "status"), Some(101));
    assert!(num(&ws, "bytes_up").unwrap_or(0) > 0, "{ws}");
}

#[test]
fn chromium_host_without_l7_rule_is_spliced_with_the_origins_certificate() {
    let mut w = World::new();
    w.plain
        .write("index.html", page("done('spliced page ran');"));
    let plain_ca = w.plain.ca_pem_path().to_path_buf();
    let url = format!("https://{PLAIN}:{PLAIN_PORT}/index.html");
    let b = w.browser(true, &[(plain_ca, "plain-origin-ca")]);
    let dom = b.load(&url, DONE, LOAD).expect("the spliced page loads");
    assert_eq!(out_of(&dom), "spliced page ran");
    let issuer = b.main_cert_issuer().unwrap_or_default();
    assert_eq!(
        issuer, "gateway-tests origin CA",
        "the browser saw {issuer}"
    );
    // At connection level only: allowed by the host rule, no HTTP record.
    let conn = w.daemon.wait_event(
        |v| is_event(v, "connection") && v["host"] == PLAIN && v["decision"] == "allow",
        EVENT,
    );
    assert_eq!(text(&conn, "rule"), "plain-splice");
    assert!(
        w.daemon
            .events()
            .iter()
            .all(|v| !(is_event(v, "http") && v["host"] == PLAIN)),
        "a spliced host was inspected"
    );
    // The origin terminated TLS itself, for its own name.
    let req = w.plain.wait_request(|r| r["path"] == "/index.html", EVENT);
    assert_eq!(req["sni"], PLAIN);
}

#[test]
fn curl_plain_http_is_inspected_and_blocked_per_request() {
    let w = World::new();
    let url = format!("http://{PROD}/v1/items/9");
    let del = w.curl(&["-X", "DELETE", "-i", &url]);
    let body = String::from_utf8_lossy(&del.stdout);
    assert!(body.starts_with("HTTP/1.1 403"), "{body}");
    assert!(body.contains("no-prod-deletes"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("x-gateway-request-id"),
        "{body}"
    );
    let get = w.curl(&["-i", &format!("http://{PROD}/echo?x=1")]);
    let body = String::from_utf8_lossy(&get.stdout);
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert_eq!(w.origin_saw("GET", PROD, "/echo").len(), 1);
    assert!(w.origin.requests().iter().all(|r| r["method"] != "DELETE"));
    let ev = w.http_event("DELETE", PROD, "/v1/items/9");
    assert_eq!(text(&ev, "tls"), "false");
    assert_eq!(text(&ev, "decision"), "block");
}

#[test]
fn upstream_certificate_errors_fail_the_request_and_are_audited() {
    // The daemon trusts neither origin CA this time.
    let w = World::with(|mut c| {
        c.interception_cas.clear();
        c
    });
    let out = w.curl(&["-i", &format!("https://{SHOP}/orders.json")]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.starts_with("HTTP/2 502") || body.starts_with("HTTP/1.1 502"),
        "{body}"
    );
    assert!(body.contains("certificate"), "{body}");
    let ev = w.http_event("GET", SHOP, "/orders.json");
    assert_eq!(text(&ev, "outcome"), "upstream_error");
    assert!(text(&ev, "reason").contains("UnknownIssuer"), "{ev}");
    assert!(w.origin_saw("GET", SHOP, "/orders.json").is_empty());
}

#[test]
fn decompression_bomb_is_cut_off_and_the_daemon_keeps_serving() {
    let w = World::with(|mut c| {
        c.max_decoded_bytes = Some(1 << 20);
        c
    });
    // 64 MiB of zeros, about 64 KiB gzipped.
    let zeros = vec![b'0'; 64 << 20];
    w.origin.write("bomb.txt", b"small");
    w.origin.write_precompressed("bomb.txt", &zeros);
    let out = w.curl(&[
        "--compressed",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("https://{SHOP}/bomb.txt"),
    ]);
    let got: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(got <= 2 << 20, "the client got {got} bytes past the cap");
    let ev = w.http_event("GET", SHOP, "/bomb.txt");
    assert_eq!(text(&ev, "outcome"), "failed", "{ev}");
    assert!(text(&ev, "reason").contains("limit"), "{ev}");
    // Still serving.
    let ok = w.curl(&["-i", &format!("https://{SHOP}/echo")]);
    assert!(String::from_utf8_lossy(&ok.stdout).contains(" 200"));
}

#[test]
fn opaque_connection_to_a_masked_destination_is_refused_before_upstream() {
    let w = World::with(|c| {
        let ip = c.dns_upstreams[0]
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        let mut c = c;
        c.rules.insert(
            0,
            Rule {
                ips: vec![ip],
                ports: vec!["80".into()],
                mask: vec!["\"email\"".into()],
                ..Rule::new("mask-by-ip", "allow")
            },
        );
        c
    });
    // Not TLS, not HTTP: an SSH-looking greeting to the origin's port 80.
    let target = format!("{}:80", w.net.ns_v4());
    let run = w
        .daemon
        .exec(
            "t1",
            probe().path(),
            ["tcp", "--send", "SSH-2.0-probe\r\n", target.as_str()],
        )
        .output()
        .expect("probe");
    let v: Value = serde_json::from_slice(&run.stdout).unwrap_or_default();
    assert_eq!(v["received"], "", "{v}");
    let ev = w.daemon.wait_event(
        |v| is_event(v, "connection") && v["orig_dst"] == target.as_str(),
        EVENT,
    );
    assert_eq!(text(&ev, "decision"), "block", "{ev}");
    assert_eq!(text(&ev, "rule"), "mask-by-ip", "{ev}");
    assert!(
        text(&ev, "reason").contains("needs HTTP inspection"),
        "{ev}"
    );
    assert!(w.origin.requests().is_empty());
    // The same destination speaking HTTP is inspected and served.
    let ok = w.curl(&["-i", &format!("http://{}/echo", w.net.ns_v4())]);
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("HTTP/1.1 200"));
}

#[test]
fn reload_with_a_broken_policy_keeps_the_old_one() {
    let w = World::new();
    let url = format!("http://{PROD}/v1/items/1");
    // `gateway exec` reads the config too: while the daemon's file is
    // broken, start curl with an intact copy.
    let path = w.daemon.config_path().to_path_buf();
    let good = std::fs::read_to_string(&path).unwrap();
    let copy = path.with_file_name("exec-copy.toml");
    std::fs::write(&copy, &good).unwrap();
    let blocked = || {
        let out = w.curl_with(
            &copy,
            &[
                "-X",
                "DELETE",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(blocked(), "403");
    // A rule with a path glob that is not a path: the reload must fail,
    // naming the place, and the old policy stays in force.
    let broken = good.replacen(
        "id = \"no-prod-deletes\"\n",
        "id = \"no-prod-deletes\"\npaths = [\"v1/**\"]\n",
        1,
    );
    assert_ne!(broken, good);
    std::fs::write(&path, &broken).unwrap();
    w.daemon.reload();
    let failed = w.daemon.wait_event(|v| is_event(v, "reload_failed"), EVENT);
    let err = text(&failed, "error");
    let line = broken
        .lines()
        .position(|l| l.starts_with("paths = "))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("gateway.toml:{line}:")),
        "the error does not point at line {line}: {err}"
    );
    assert_eq!(blocked(), "403", "the broken reload replaced the policy");
    // `gateway check` says the same, with a non-zero exit.
    let check = w.daemon.gateway("check").output().unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains(&format!("gateway.toml:{line}:")));
    // A good edit applies: deletes are no longer blocked (the origin's 405).
    std::fs::write(&path, good.replacen("\"DELETE\"", "\"PURGE\"", 1)).unwrap();
    w.daemon.reload();
    w.daemon.wait_event(|v| is_event(v, "reloaded"), EVENT);
    assert_eq!(blocked(), "405");
}

#[test]
fn upstream_dying_mid_body_ends_the_response_and_is_audited() {
    let w = World::new();
    // Masked (shop) and unmasked-but-inspected (other) responses alike.
    for host in [SHOP, OTHER] {
        let out = w.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("https://{host}/slow-close"),
        ]);
        assert!(
            !out.status.success(),
            "curl took a cut-off body as complete ({host})"
        );
        let got: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert!(got <= 32768, "{host}: {got} bytes");
        let ev = w.http_event("GET", host, "/slow-close");
        assert_eq!(text(&ev, "outcome"), "failed", "{ev}");
        assert!(text(&ev, "reason").contains("mid-body"), "{ev}");
    }
    // The daemon carries on.
    let ok = w.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("https://{OTHER}/echo"),
    ]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "200");
}
