//! The benchmark's fixtures: a network namespace with nginx (plain HTTP and
//! TLS, the latter with a certificate from a CA made for the run), the
//! gateway daemon in one of its configurations, and the wrk and curl runs
//! against them. Each part is recorded as soon as it exists so that `Drop`
//! removes exactly what is there.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{
    CONNECTIONS, Scenario, THREADS,
    mitm::Mitm,
    wrk::{self, MIB, Wrk},
};
use crate::util::{self, SIGKILL, SIGTERM, say};

/// nginx's plain HTTP port.
pub const PORT: u16 = 8080;
/// nginx's TLS port (http/1.1 and h2).
pub const TLS_PORT: u16 = 8443;
const SMALL_BYTES: usize = 1200;
const LARGE_BYTES: usize = 1 << 20;

/// How a client reaches the origin.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    Direct,
    /// Under `gateway exec`, in the cgroup of the `bench` identity.
    Gateway,
    /// In mitmproxy's client cgroup, whose traffic iptables redirects.
    Mitm(&'a Mitm),
}

impl Via<'_> {
    fn label(&self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Gateway => "gateway",
            Via::Mitm(_) => "mitmproxy",
        }
    }
}

/// Which configuration the daemon runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonMode {
    /// Default policy allow, no rules.
    L4 { fast_path: bool },
    /// L7 rules on the origin: methods on the plain port, masking on the
    /// TLS port; `[interception]` trusts the origin's CA.
    Intercept,
}

pub struct Lab {
    pub id: String,
    dir: PathBuf,
    /// The daemon's current configuration.
    config: PathBuf,
    /// The L4 configuration, kept for `gateway ca init` and `detach` (which
    /// must parse whatever the current daemon's config contains).
    base_config: PathBuf,
    gateway: PathBuf,
    pin_dir: PathBuf,
    cgroup: PathBuf,
    netns: String,
    veth_host: String,
    veth_ns: String,
    pub ns_ip: String,
    host_ip: String,
    netns_created: bool,
    veth_created: bool,
    cgroup_created: bool,
    daemon_spawned: bool,
    nginx: Option<Child>,
    daemon: Option<Child>,
    /// `net.ipv4.tcp_tw_reuse` before the run, restored on the way out.
    saved_tw_reuse: Option<String>,
    /// Length of `daemon.log` when the daemon was ready.
    ready_offset: usize,
}

impl Lab {
    pub fn new() -> Result<Self> {
        let id = format!("{:08x}", util::random_u64()? as u32);
        let gateway = util::gateway_bin();
        if !gateway.is_file() {
            bail!("{} is missing after the build", gateway.display());
        }
        let dir = std::env::temp_dir().join(format!("gateway-bench-{id}"));
        fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let cgroup = util::cgroup2_mount()?.join(format!("gateway-bench-{id}"));
        Ok(Lab {
            config: dir.join("gateway.toml"),
            base_config: dir.join("gateway-l4.toml"),
            dir,
            gateway,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/gateway-bench-{id}")),
            cgroup,
            netns: format!("gwb-{id}"),
            // Interface names are at most 15 bytes.
            veth_host: format!("gwbh{id}"),
            veth_ns: format!("gwbn{id}"),
            id,
            ns_ip: String::new(),
            host_ip: String::new(),
            netns_created: false,
            veth_created: false,
            cgroup_created: false,
            daemon_spawned: false,
            nginx: None,
            daemon: None,
            saved_tw_reuse: None,
            ready_offset: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificate of the CA that signed the TLS origin's certificate.
    pub fn origin_ca(&self) -> PathBuf {
        self.dir.join("origin-ca/ca.pem")
    }

    fn cgroup_name(&self) -> String {
        self.cgroup
            .file_name()
            .expect("named above")
            .to_string_lossy()
            .into_owned()
    }

    /// A namespace with `10.a.b.2/30`, reached from the host's `10.a.b.1`.
    pub fn start_network(&mut self) -> Result<()> {
        let (a, b) = free_subnet()?;
        self.host_ip = format!("10.{a}.{b}.1");
        self.ns_ip = format!("10.{a}.{b}.2");
        let (ns, host, peer) = (
            self.netns.clone(),
            self.veth_host.clone(),
            self.veth_ns.clone(),
        );

        util::run(ip().args(["netns", "add", &ns]))?;
        self.netns_created = true;
        util::run(ip().args(["link", "add", &host, "type", "veth", "peer", "name", &peer]))?;
        self.veth_created = true;
        util::run(ip().args(["link", "set", &peer, "netns", &ns]))?;
        let host_cidr = format!("{}/30", self.host_ip);
        util::run(ip().args(["addr", "add", &host_cidr, "dev", &host]))?;
        util::run(ip().args(["link", "set", &host, "up"]))?;
        let ns_cidr = format!("{}/30", self.ns_ip);
        util::run(ip().args(["-n", &ns, "addr", "add", &ns_cidr, "dev", &peer]))?;
        util::run(ip().args(["-n", &ns, "link", "set", &peer, "up"]))?;
        util::run(ip().args(["-n", &ns, "link", "set", "lo", "up"]))?;
        Ok(())
    }

    /// A CA for the run and a certificate for `ns_ip` signed by it (P-256,
    /// IP subject alternative name), with the openssl CLI.
    fn make_origin_certificate(&self) -> Result<()> {
        let dir = self.dir.join("origin-ca");
        fs::create_dir_all(&dir)?;
        // Space-separated arguments; the subjects are added on their own.
        let openssl = |args: &str| {
            let mut cmd = Command::new("openssl");
            cmd.current_dir(&dir).args(args.split(' '));
            cmd
        };
        const P256: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        util::output(
            openssl(&format!(
                "req -x509 -new {P256} -keyout ca.key -out ca.pem -days 7 \
                 -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign"
            ))
            .args(["-subj", "/CN=gateway bench origin CA"]),
        )?;
        util::output(
            openssl(&format!(
                "req -new {P256} -keyout origin.key -out origin.csr"
            ))
            .args(["-subj", &format!("/CN={}", self.ns_ip)]),
        )?;
        fs::write(
            dir.join("origin.ext"),
            format!(
                "subjectAltName = IP:{}\n\
                 basicConstraints = critical, CA:FALSE\n\
                 keyUsage = critical, digitalSignature\n\
                 extendedKeyUsage = serverAuth\n\
                 subjectKeyIdentifier = hash\n\
                 authorityKeyIdentifier = keyid, issuer\n",
                self.ns_ip
            ),
        )?;
        util::output(&mut openssl(
            "x509 -req -in origin.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -out origin.pem -days 7 -extfile origin.ext",
        ))?;
        say(format!(
            "origin certificate for {} signed by the bench CA {}",
            self.ns_ip,
            self.origin_ca().display()
        ));
        Ok(())
    }

    pub fn start_nginx(&mut self) -> Result<()> {
        let www = self.dir.join("www");
        fs::create_dir_all(&www)?;
        fs::create_dir_all(self.dir.join("tmp"))?;
        fs::write(www.join("small"), pattern(SMALL_BYTES))?;
        fs::write(www.join("1m"), pattern(LARGE_BYTES))?;
        fs::write(www.join("small.json"), small_json())?;
        self.make_origin_certificate()?;
        let conf = self.dir.join("nginx.conf");
        fs::write(&conf, nginx_conf(&self.dir, &self.ns_ip))?;

        let error_log = self.dir.join("nginx-error.log");
        let mut cmd = ip();
        cmd.args(["netns", "exec", &self.netns, "nginx", "-c"])
            .arg(&conf)
            .arg("-p")
            .arg(&self.dir)
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(
                self.dir.join("nginx.stderr"),
            )?))
            // Its own process group: Ctrl-C reaches xtask, which stops it.
            .process_group(0);
        say(format!("$ {}", util::show(&cmd)));
        self.nginx = Some(cmd.spawn().context("start nginx")?);

        let addr: SocketAddr = format!("{}:{PORT}", self.ns_ip).parse()?;
        util::poll(&format!("nginx on {addr}"), Duration::from_secs(15), || {
            let nginx = self.nginx.as_mut().expect("just started");
            if let Some(status) = nginx.try_wait()? {
                bail!(
                    "nginx exited ({status}):\n{}{}",
                    tail(&self.dir.join("nginx.stderr")),
                    tail(&error_log)
                );
            }
            Ok(http_ok(addr, "/small").then_some(()))
        })?;
        say(format!("nginx answers on {addr}"));

        // The TLS origin, verified against the bench CA over h2 and
        // http/1.1: a broken certificate here would make the intercepting
        // proxies fail rather than the fixture.
        for version in ["--http2", "--http1.1"] {
            let mut cmd = Command::new("curl");
            cmd.args(["-sS", "--max-time", "10", version, "--cacert"])
                .arg(self.origin_ca())
                .arg(format!("https://{}:{TLS_PORT}/small.json", self.ns_ip));
            let body = util::output(&mut cmd)?;
            if !body.contains(CARD) {
                bail!("`{}` did not return small.json:\n{body}", util::show(&cmd));
            }
        }
        say(format!(
            "nginx answers on https://{}:{TLS_PORT} (h2 and http/1.1, certificate verified)",
            self.ns_ip
        ));
        Ok(())
    }

    /// `gateway ca init` unless `gateway ca show` finds the interception
    /// CA (a daemon with `[interception]` may also create it on its first
    /// start; this makes sure it exists either way).
    pub fn ensure_gateway_ca(&self) -> Result<()> {
        fs::write(
            &self.base_config,
            self.daemon_config(DaemonMode::L4 { fast_path: true }),
        )?;
        let ca = |sub: &str| {
            let mut cmd = Command::new(&self.gateway);
            cmd.args(["ca", sub, "--config"]).arg(&self.base_config);
            util::output(&mut cmd)
        };
        let shown = match ca("show") {
            Ok(shown) => shown,
            Err(_) => ca("init")?,
        };
        for line in shown
            .lines()
            .filter(|l| l.starts_with("sha256:") || l.starts_with("certificate:"))
        {
            say(format!("gateway CA {}", line.trim()));
        }
        Ok(())
    }

    /// Stops the daemon if one runs, then starts it in `mode` (it adopts
    /// its own pinned programs; the cgroup stays).
    pub fn start_daemon(&mut self, mode: DaemonMode) -> Result<()> {
        if let Some(mut daemon) = self.daemon.take() {
            stop(&mut daemon, "the gateway daemon", Duration::from_secs(10));
        }
        if !self.cgroup_created {
            fs::create_dir(&self.cgroup)
                .with_context(|| format!("create cgroup {}", self.cgroup.display()))?;
            self.cgroup_created = true;
        }
        fs::write(
            &self.base_config,
            self.daemon_config(DaemonMode::L4 { fast_path: true }),
        )?;
        fs::write(&self.config, self.daemon_config(mode))?;

        let stdout_log = self.dir.join("daemon.log");
        let stderr_log = self.dir.join("daemon.stderr");
        let mut cmd = Command::new(&self.gateway);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(fs::File::create(&stderr_log)?))
            .process_group(0);
        say(format!("$ {}  # {mode:?}", util::show(&cmd)));
        let mut child = cmd.spawn().context("start the gateway daemon")?;
        self.daemon_spawned = true;

        // Every stdout line goes to a file (the pipe must never fill up and
        // stall the daemon); the ready event is also handed over.
        let stdout = child.stdout.take().expect("piped");
        self.daemon = Some(child);
        let mut log = fs::File::create(&stdout_log)?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if is_ready(&line) {
                    let _ = tx.send(line);
                }
            }
        });

        let ready = util::poll("the gateway's ready event", Duration::from_secs(60), || {
            if let Ok(line) = rx.try_recv() {
                return Ok(Some(line));
            }
            let daemon = self.daemon.as_mut().expect("just started");
            if let Some(status) = daemon.try_wait()? {
                bail!(
                    "the gateway daemon exited ({status}) before it was ready: {}\n{}{}",
                    last_line(&stderr_log),
                    tail(&stdout_log),
                    tail(&stderr_log)
                );
            }
            Ok(None)
        })?;
        // The reader thread wrote the ready line before handing it over.
        self.ready_offset = fs::metadata(&stdout_log).map_or(0, |m| m.len() as usize);
        say(format!("gateway ready: {ready}"));
        Ok(())
    }

    fn daemon_config(&self, mode: DaemonMode) -> String {
        let fast_path = match mode {
            DaemonMode::L4 { fast_path } => fast_path,
            // The product's default; L7 rules must keep their flows on
            // the proxy by themselves.
            DaemonMode::Intercept => true,
        };
        let mut out = format!(
            r#"# Written by `cargo xtask bench` ({mode:?}).
[daemon]
proxy_port = 0
dns_port = 0
pin_dir = {pin_dir}
state_dir = {state_dir}
admin_socket = {admin_socket}
dns_upstreams = ["127.0.0.1:53"]
fast_path = {fast_path}

[[identity]]
name = "bench"
cgroups = [{cgroup}]
static = {{ subject = "bench@localhost", duties = ["bench"] }}
"#,
            pin_dir = toml_str(&self.pin_dir.to_string_lossy()),
            state_dir = toml_str(&self.dir.join("state").to_string_lossy()),
            admin_socket = toml_str(&self.dir.join("admin.sock").to_string_lossy()),
            cgroup = toml_str(&self.cgroup_name()),
        );
        if mode == DaemonMode::Intercept {
            let _ = write!(
                out,
                "\n[interception]\nupstream_ca_files = [{}]\n",
                toml_str(&self.origin_ca().to_string_lossy())
            );
        }
        out.push_str("\n[policy]\nversion = 1\ndefault = \"allow\"\n");
        if mode == DaemonMode::Intercept {
            let ip = toml_str(&self.ns_ip);
            // The measured rules come first, so every measured request is
            // decided by them; `bench-inspect-probe` only exists for the
            // check that requests are parsed (a DELETE the origin would
            // answer with 405 must be refused by the gateway instead).
            let _ = write!(
                out,
                r#"
[[policy.rule]]
id = "bench-inspect"
ips = [{ip}]
ports = [{PORT}]
methods = ["GET"]
action = "allow"

[[policy.rule]]
id = "bench-mask"
ips = [{ip}]
ports = [{TLS_PORT}]
mask = ["credit_card", "email"]
action = "allow"

[[policy.rule]]
id = "bench-inspect-probe"
ips = [{ip}]
ports = [{PORT}]
methods = ["DELETE"]
action = "block"
"#
            );
        }
        out
    }

    /// A command started the way `via` says: directly, under `gateway exec`,
    /// or in mitmproxy's client cgroup.
    fn command(&self, via: Via, program: &str) -> Command {
        match via {
            Via::Direct => Command::new(program),
            Via::Gateway => {
                let mut c = Command::new(&self.gateway);
                c.arg("exec").arg("--config").arg(&self.config).args([
                    "--identity",
                    "bench",
                    "--",
                    program,
                ]);
                c
            }
            Via::Mitm(m) => m.command(program),
        }
    }

    /// One wrk run.
    pub fn wrk(&mut self, s: &Scenario, via: Via, secs: u64) -> Result<Wrk> {
        let mut cmd = self.command(via, "wrk");
        cmd.args([
            format!("-t{THREADS}"),
            format!("-c{CONNECTIONS}"),
            format!("-d{secs}s"),
            "--timeout".to_owned(),
            "5s".to_owned(),
        ]);
        if s.close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(self.url(s)).stdin(Stdio::null());
        say(format!(
            "{} ({}): $ {}",
            s.name,
            via.label(),
            util::show(&cmd)
        ));
        let out = cmd
            .output()
            .with_context(|| format!("start `{}`", util::show(&cmd)))?;
        util::check_interrupted()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}\n{stdout}",
                util::show(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if matches!(via, Via::Gateway) {
            self.check_daemon_alive()?;
        }
        let r = wrk::parse_wrk(&stdout).with_context(|| format!("wrk printed:\n{stdout}"))?;
        say(format!(
            "  {:.0} req/s, {:.1} MiB/s, {} non-2xx, {} socket errors",
            r.requests_per_sec,
            r.bytes_per_sec / MIB,
            r.non_2xx,
            r.socket_errors
        ));
        Ok(r)
    }

    fn check_daemon_alive(&mut self) -> Result<()> {
        let Some(daemon) = self.daemon.as_mut() else {
            bail!("the gateway daemon is not running");
        };
        if let Some(status) = daemon.try_wait()? {
            bail!(
                "the gateway daemon exited ({status}) during the run: {}\n{}",
                last_line(&self.dir.join("daemon.stderr")),
                tail(&self.dir.join("daemon.stderr"))
            );
        }
        Ok(())
    }

    /// The daemon's last warning or error since it was ready (else its
    /// last log line, usually the check's audit record), to explain a
    /// failed check.
    pub fn daemon_complaint(&self) -> Option<String> {
        let log = fs::read(self.dir.join("daemon.log")).ok()?;
        let since_ready = String::from_utf8_lossy(log.get(self.ready_offset..)?);
        let mut lines = since_ready.lines().rev().filter(|l| !l.trim().is_empty());
        let line = lines
            .clone()
            .find(|l| {
                let compact: String = l.chars().filter(|c| !c.is_whitespace()).collect();
                compact.contains(r#""level":"WARN""#) || compact.contains(r#""level":"ERROR""#)
            })
            .or_else(|| lines.next())?;
        Some(if line.chars().count() > 600 {
            line.chars().take(597).collect::<String>() + "..."
        } else {
            line.to_owned()
        })
    }

    fn url(&self, s: &Scenario) -> String {
        if s.tls {
            format!("https://{}:{TLS_PORT}{}", self.ns_ip, s.path)
        } else {
            format!("http://{}:{PORT}{}", self.ns_ip, s.path)
        }
    }

    /// One curl through `via` (`-v`: the certificate's issuer is on stderr).
    pub fn curl(&self, via: Via, args: &[&str], s: &Scenario) -> Result<Output> {
        let mut cmd = self.command(via, "curl");
        cmd.args(["-sS", "-v", "--max-time", "10"])
            .args(args)
            .arg(self.url(s))
            .stdin(Stdio::null());
        say(format!("check ({}): $ {}", via.label(), util::show(&cmd)));
        cmd.output()
            .with_context(|| format!("start `{}`", util::show(&cmd)))
    }

    /// A new connection per request at thousands per second runs a client
    /// out of ephemeral ports held in TIME_WAIT towards the origin, which
    /// hits direct clients (and gateway fast-path ones) but not the
    /// proxy's loopback hop, where Linux already reuses TIME_WAIT. Reuse
    /// everywhere for the run, so both sides measure connection cost and
    /// not port exhaustion; the old value comes back afterwards.
    pub fn reuse_time_wait(&mut self) -> Result<()> {
        const KEY: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
        let old = fs::read_to_string(KEY).with_context(|| format!("read {KEY}"))?;
        fs::write(KEY, "1").with_context(|| format!("write {KEY}"))?;
        say(format!(
            "net.ipv4.tcp_tw_reuse = 1 for the run (was {})",
            old.trim()
        ));
        self.saved_tw_reuse = Some(old);
        Ok(())
    }

    fn cleanup(&mut self) {
        say("cleaning up the benchmark");
        if let Some(old) = self.saved_tw_reuse.take() {
            let _ = fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", old.trim());
        }
        if let Some(mut daemon) = self.daemon.take() {
            stop(&mut daemon, "the gateway daemon", Duration::from_secs(10));
        }
        if self.daemon_spawned {
            // Pinned programs outlive the daemon on purpose; this removes
            // them. The L4 configuration names the same pin directory and
            // parses whatever the daemon understands.
            let mut cmd = Command::new(&self.gateway);
            cmd.arg("detach").arg("--config").arg(&self.base_config);
            quietly(&mut cmd);
            if self.pin_dir.exists() {
                say(format!(
                    "warning: {} is still there after detach; removing it",
                    self.pin_dir.display()
                ));
                if let Err(e) = fs::remove_dir_all(&self.pin_dir) {
                    say(format!("warning: remove {}: {e}", self.pin_dir.display()));
                }
            }
        }
        if self.cgroup_created || self.cgroup.exists() {
            remove_cgroup_tree(&self.cgroup);
        }
        if let Some(mut nginx) = self.nginx.take() {
            stop(&mut nginx, "nginx", Duration::from_secs(5));
        }
        if self.netns_created {
            // Whatever still lives in the namespace (nginx workers whose
            // master was killed, say) would keep it alive after `netns del`.
            if let Ok(pids) = util::output(ip().args(["netns", "pids", &self.netns])) {
                for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                    util::send_signal(pid, SIGKILL);
                }
            }
        }
        if self.veth_created {
            // Gone already if its peer made it into the namespace and that
            // went first; deleting the host end covers the other case.
            let _ = ip()
                .args(["link", "del", &self.veth_host])
                .stderr(Stdio::null())
                .status();
        }
        if self.netns_created {
            quietly(ip().args(["netns", "del", &self.netns]));
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            say(format!("warning: remove {}: {e}", self.dir.display()));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn ip() -> Command {
    Command::new("ip")
}

/// Runs a cleanup command, reporting (not failing on) errors.
pub fn quietly(cmd: &mut Command) {
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => say(format!(
            "warning: `{}` failed ({}): {}",
            util::show(cmd),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => say(format!("warning: cannot run `{}`: {e}", util::show(cmd))),
    }
}

/// SIGTERM, a grace period, then SIGKILL.
pub fn stop(child: &mut Child, name: &str, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    util::send_signal(child.id(), SIGTERM);
    if !util::wait_until(grace, || matches!(child.try_wait(), Ok(Some(_)))) {
        say(format!(
            "warning: {name} ignored SIGTERM for {grace:?}; killing it"
        ));
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Removes a cgroup and its children (deepest first), killing anything
/// still inside.
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
            util::send_signal(pid, SIGKILL);
        }
    }
    // rmdir fails with EBUSY until killed members are gone.
    let gone = util::wait_until(Duration::from_secs(5), || {
        fs::remove_dir(dir).is_ok() || !dir.exists()
    });
    if !gone {
        say(format!("warning: cannot remove cgroup {}", dir.display()));
    }
}

/// A random `10.a.b.0/30` (a, b in 200..=250) no address or route on the
/// host mentions.
fn free_subnet() -> Result<(u8, u8)> {
    let used = util::output(ip().args(["-4", "-o", "addr", "show"]))?
        + &util::output(ip().args(["-4", "route", "show", "table", "all"]))?;
    for _ in 0..100 {
        let r = util::random_u64()?;
        let a = 200 + (r % 51) as u8;
        let b = 200 + ((r >> 8) % 51) as u8;
        if !used.contains(&format!("10.{a}.{b}.")) {
            return Ok((a, b));
        }
    }
    bail!("no free 10.x.y.0/30 subnet with x, y in 200..=250")
}

fn nginx_conf(dir: &Path, ip: &str) -> String {
    let d = dir.display();
    format!(
        r#"# Written by `cargo xtask bench`.
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    types {{
        application/json json;
    }}
    default_type application/octet-stream;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;

    server {{
        listen {ip}:{PORT};
        root {d}/www;
        location / {{
        }}
    }}

    server {{
        listen {ip}:{TLS_PORT} ssl http2;
        ssl_certificate {d}/origin-ca/origin.pem;
        ssl_certificate_key {d}/origin-ca/origin.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:1m;
        http2_max_requests 1000000;
        root {d}/www;
        location / {{
        }}
    }}
}}
"#
    )
}

/// A body of `len` printable bytes.
fn pattern(len: usize) -> Vec<u8> {
    b"gateway bench body 0123456789abcdefghijklmnopqrstuvwxyz\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// The test card number the TLS origin serves (Visa's, Luhn-valid).
pub const CARD: &str = "4111 1111 1111 1111";

/// About 1.5 KiB of JSON with two card numbers and three email addresses
/// among ordinary fields, for the masking scenario.
fn small_json() -> String {
    let orders = [
        (1001, "alice@example.com", CARD, "paid"),
        (1002, "bob.jones@example.org", "5555 5555 5555 4444", "paid"),
        (1003, "carol@example.net", "", "pending"),
        (1004, "", "", "shipped"),
        (1005, "", "", "delivered"),
    ];
    let mut items = Vec::new();
    for (id, email, card, status) in orders {
        let mut item = format!(
            r#"    {{"id": {id}, "status": "{status}", "currency": "EUR", "total": "{}.{:02}", "#,
            id % 97 + 10,
            id % 100
        );
        if !email.is_empty() {
            let _ = write!(item, r#""email": "{email}", "#);
        }
        if !card.is_empty() {
            let _ = write!(item, r#""card": "{card}", "#);
        }
        let _ = write!(
            item,
            r#""items": [{{"sku": "SKU-{id}-A", "qty": 2, "name": "bench widget, large"}}, {{"sku": "SKU-{id}-B", "qty": 1, "name": "bench gadget"}}], "note": "leave at the door"}}"#
        );
        items.push(item);
    }
    format!(
        "{{\n  \"page\": 1,\n  \"orders\": [\n{}\n  ]\n}}\n",
        items.join(",\n")
    )
}

/// Whether `GET path` on `addr` answers 200.
fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

fn is_ready(line: &str) -> bool {
    let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    compact.contains(r#""event":"ready""#)
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(20);
    let mut out = String::new();
    for line in &lines[start..] {
        let _ = writeln!(out, "  {}: {line}", path.display());
    }
    out
}

/// The last non-empty line of a log file (usually the error), or a note
/// that it is empty.
pub fn last_line(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map_or_else(
            || format!("({} is empty)", path.display()),
            |l| l.trim().to_owned(),
        )
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_event() {
        assert!(is_ready(
            r#"{"timestamp":"x","level":"INFO","event":"ready","proxy_port":4711}"#
        ));
        assert!(is_ready(r#"{"event": "ready"}"#));
        assert!(!is_ready(r#"{"event":"starting"}"#));
    }

    #[test]
    fn json_body() {
        let body = small_json();
        assert!((1024..=2048).contains(&body.len()), "{} bytes", body.len());
        assert_eq!(body.matches(CARD).count(), 1);
        assert!(body.contains("5555 5555 5555 4444"));
        assert_eq!(body.matches('@').count(), 3);
    }
}
