//! `cargo xtask bench`: what the gateway costs, measured against a direct
//! connection in the same run.
//!
//! nginx serves two files from its own network namespace, reached over a
//! veth pair; wrk runs once directly and once under `gateway exec` (inside
//! the cgroup of a static `bench` identity, so every connection goes through
//! the kernel hooks and the proxy). Everything set up here is torn down on
//! the way out, also on error or Ctrl-C.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    prereqs,
    util::{self, SIGKILL, SIGTERM, say},
};

#[derive(clap::Args)]
pub struct Args {
    /// Length of each wrk run: `10s`, `1m`, or plain seconds.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: u64,
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, mult) = if let Some(n) = s.strip_suffix('s') {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60)
    } else {
        (s, 1)
    };
    match num.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n * mult),
        _ => Err(format!("`{s}` is not a duration like 10s, 1m or 30")),
    }
}

const THREADS: u32 = 2;
const CONNECTIONS: u32 = 16;
const PORT: u16 = 8080;
const SMALL_BYTES: usize = 1200;
const LARGE_BYTES: usize = 1 << 20;

struct Scenario {
    name: &'static str,
    path: &'static str,
    close: bool,
    /// Minimum gateway/direct ratio of requests per second.
    target: f64,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "keep-alive, 1.2 KiB",
        path: "/small",
        close: false,
        target: 0.85,
    },
    Scenario {
        name: "new connection per request, 1.2 KiB",
        path: "/small",
        close: true,
        target: 0.6,
    },
    Scenario {
        name: "keep-alive, 1 MiB",
        path: "/1m",
        close: false,
        target: 0.9,
    },
];

#[derive(Debug, Default, PartialEq)]
struct Wrk {
    requests_per_sec: f64,
    bytes_per_sec: f64,
    non_2xx: u64,
    socket_errors: u64,
}

pub fn bench(args: &Args) -> Result<()> {
    util::require_root("bench")?;
    prereqs::ensure(&prereqs::bench())?;
    util::ensure_bpffs()?;
    crate::build()?;

    util::trap_interrupts();
    let mut lab = Lab::new()?;
    lab.reuse_time_wait()?;
    lab.start_network()?;
    lab.start_nginx()?;
    lab.start_daemon()?;

    // The product as configured by default (allowed L4 flows reuse their
    // decision in the kernel), then every connection through the proxy.
    let mut rows = Vec::new();
    for s in &SCENARIOS {
        let direct = lab.wrk(s, false, args.duration)?;
        let gateway = lab.wrk(s, true, args.duration)?;
        rows.push((s, direct, gateway));
    }
    lab.restart_daemon(false)?;
    let mut proxied = Vec::new();
    for s in &SCENARIOS {
        proxied.push(lab.wrk(s, true, args.duration)?);
    }
    drop(lab);
    let rows: Vec<_> = rows
        .into_iter()
        .zip(proxied)
        .map(|((s, d, g), p)| (s, d, g, p))
        .collect();

    println!("{}", table(&rows, args.duration));
    Ok(())
}

/// Everything the benchmark sets up, each part recorded as soon as it
/// exists so that `Drop` removes exactly what is there.
struct Lab {
    dir: PathBuf,
    config: PathBuf,
    gateway: PathBuf,
    pin_dir: PathBuf,
    cgroup: PathBuf,
    netns: String,
    veth_host: String,
    veth_ns: String,
    ns_ip: String,
    host_ip: String,
    netns_created: bool,
    veth_created: bool,
    cgroup_created: bool,
    daemon_spawned: bool,
    nginx: Option<Child>,
    daemon: Option<Child>,
    /// `net.ipv4.tcp_tw_reuse` before the run, restored on the way out.
    saved_tw_reuse: Option<String>,
    /// The daemon's `fast_path` setting for the current runs.
    fast_path: bool,
}

impl Lab {
    fn new() -> Result<Self> {
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
            dir,
            gateway,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/gateway-bench-{id}")),
            cgroup,
            netns: format!("gwb-{id}"),
            // Interface names are at most 15 bytes.
            veth_host: format!("gwbh{id}"),
            veth_ns: format!("gwbn{id}"),
            ns_ip: String::new(),
            host_ip: String::new(),
            netns_created: false,
            veth_created: false,
            cgroup_created: false,
            daemon_spawned: false,
            nginx: None,
            daemon: None,
            saved_tw_reuse: None,
            fast_path: true,
        })
    }

    fn cgroup_name(&self) -> String {
        self.cgroup
            .file_name()
            .expect("named above")
            .to_string_lossy()
            .into_owned()
    }

    /// A namespace with `10.a.b.2/30`, reached from the host's `10.a.b.1`.
    fn start_network(&mut self) -> Result<()> {
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

    fn start_nginx(&mut self) -> Result<()> {
        let www = self.dir.join("www");
        fs::create_dir_all(&www)?;
        fs::create_dir_all(self.dir.join("tmp"))?;
        fs::write(www.join("small"), pattern(SMALL_BYTES))?;
        fs::write(www.join("1m"), pattern(LARGE_BYTES))?;
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
        Ok(())
    }

    fn start_daemon(&mut self) -> Result<()> {
        if !self.cgroup_created {
            fs::create_dir(&self.cgroup)
                .with_context(|| format!("create cgroup {}", self.cgroup.display()))?;
            self.cgroup_created = true;
        }
        fs::write(&self.config, self.daemon_config())?;

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
        say(format!("$ {}", util::show(&cmd)));
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
                    "the gateway daemon exited ({status}) before it was ready:\n{}{}",
                    tail(&stdout_log),
                    tail(&stderr_log)
                );
            }
            Ok(None)
        })?;
        say(format!("gateway ready: {ready}"));
        Ok(())
    }

    fn daemon_config(&self) -> String {
        format!(
            r#"# Written by `cargo xtask bench`.
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

[policy]
version = 1
default = "allow"
"#,
            fast_path = self.fast_path,
            pin_dir = toml_str(&self.pin_dir.to_string_lossy()),
            state_dir = toml_str(&self.dir.join("state").to_string_lossy()),
            admin_socket = toml_str(&self.dir.join("admin.sock").to_string_lossy()),
            cgroup = toml_str(&self.cgroup_name()),
        )
    }

    /// Restarts the daemon with another `fast_path` setting (it adopts its
    /// own pinned programs; the cgroup stays).
    fn restart_daemon(&mut self, fast_path: bool) -> Result<()> {
        if let Some(mut daemon) = self.daemon.take() {
            stop(&mut daemon, "the gateway daemon", Duration::from_secs(10));
        }
        self.fast_path = fast_path;
        self.start_daemon()
    }

    /// One wrk run, direct or under `gateway exec`.
    fn wrk(&mut self, s: &Scenario, through_gateway: bool, secs: u64) -> Result<Wrk> {
        let mut args = vec![
            format!("-t{THREADS}"),
            format!("-c{CONNECTIONS}"),
            format!("-d{secs}s"),
            "--timeout".to_owned(),
            "5s".to_owned(),
        ];
        if s.close {
            args.extend(["-H".to_owned(), "Connection: close".to_owned()]);
        }
        args.push(format!("http://{}:{PORT}{}", self.ns_ip, s.path));

        let mut cmd = if through_gateway {
            let mut c = Command::new(&self.gateway);
            c.arg("exec").arg("--config").arg(&self.config).args([
                "--identity",
                "bench",
                "--",
                "wrk",
            ]);
            c
        } else {
            Command::new("wrk")
        };
        cmd.args(&args).stdin(Stdio::null());
        let how = if through_gateway { "gateway" } else { "direct" };
        say(format!("{} ({how}): $ {}", s.name, util::show(&cmd)));
        let out = cmd
            .output()
            .with_context(|| format!("start `{}`", util::show(&cmd)))?;
        util::check_interrupted()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "`{}` failed ({}):\n{stdout}{}",
                util::show(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if through_gateway
            && let Some(status) = self.daemon.as_mut().expect("started").try_wait()?
        {
            bail!(
                "the gateway daemon exited ({status}) during the run:\n{}",
                tail(&self.dir.join("daemon.stderr"))
            );
        }
        let r = parse_wrk(&stdout).with_context(|| format!("wrk printed:\n{stdout}"))?;
        say(format!(
            "  {:.0} req/s, {:.1} MiB/s, {} non-2xx, {} socket errors",
            r.requests_per_sec,
            r.bytes_per_sec / MIB,
            r.non_2xx,
            r.socket_errors
        ));
        Ok(r)
    }

    /// A new connection per request at thousands per second runs a client
    /// out of ephemeral ports held in TIME_WAIT towards the origin, which
    /// hits direct clients (and gateway fast-path ones) but not the
    /// proxy's loopback hop, where Linux already reuses TIME_WAIT. Reuse
    /// everywhere for the run, so both sides measure connection cost and
    /// not port exhaustion; the old value comes back afterwards.
    fn reuse_time_wait(&mut self) -> Result<()> {
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
            // Pinned programs outlive the daemon on purpose; this removes them.
            let mut cmd = Command::new(&self.gateway);
            cmd.arg("detach").arg("--config").arg(&self.config);
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
fn quietly(cmd: &mut Command) {
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
fn stop(child: &mut Child, name: &str, grace: Duration) {
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
fn remove_cgroup_tree(dir: &Path) {
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
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(20);
    let mut out = String::new();
    for line in &lines[start..] {
        let _ = writeln!(out, "  {}: {line}", path.display());
    }
    out
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

const MIB: f64 = 1024.0 * 1024.0;

fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut r = Wrk::default();
    let mut have_rate = false;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.requests_per_sec = v.trim().parse().context("Requests/sec")?;
            have_rate = true;
        } else if let Some(v) = line.strip_prefix("Transfer/sec:") {
            r.bytes_per_sec = parse_size(v.trim()).context("Transfer/sec")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("Non-2xx or 3xx responses")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        }
    }
    if !have_rate {
        bail!("no Requests/sec line in wrk's output");
    }
    Ok(r)
}

/// wrk's sizes: `827.00B`, `1.54KB`, `117.19MB`, `1.02GB` (powers of 1024).
fn parse_size(s: &str) -> Result<f64> {
    let s = s.strip_suffix('B').unwrap_or(s);
    let (num, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1024.0),
        Some('M') => (&s[..s.len() - 1], MIB),
        Some('G') => (&s[..s.len() - 1], MIB * 1024.0),
        Some('T') => (&s[..s.len() - 1], MIB * MIB),
        _ => (s, 1.0),
    };
    Ok(num.parse::<f64>().with_context(|| format!("size `{s}`"))? * mult)
}

fn table(rows: &[(&Scenario, Wrk, Wrk, Wrk)], secs: u64) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nwrk -t{THREADS} -c{CONNECTIONS} -d{secs}s per cell; nginx (1 worker) in a network \
         namespace over veth; kernel {}, {cpus} CPUs\n",
        kernel.trim()
    );
    out.push_str(
        "| scenario | direct req/s | gateway req/s | ratio | target | result \
         | direct MiB/s | gateway MiB/s | errors direct / gateway \
         | proxy-only req/s | proxy-only ratio |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n");
    for (s, direct, gateway, proxied) in rows {
        let ratio_of = |w: &Wrk| {
            if direct.requests_per_sec > 0.0 {
                w.requests_per_sec / direct.requests_per_sec
            } else {
                0.0
            }
        };
        let ratio = ratio_of(gateway);
        let result = if gateway.non_2xx > 0 {
            "miss (non-2xx)"
        } else if ratio >= s.target {
            "pass"
        } else {
            "miss"
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {ratio:.2} | ≥{:.2} | {result} | {:.1} | {:.1} | {} / {} | {:.0} | {:.2} |",
            s.name,
            direct.requests_per_sec,
            gateway.requests_per_sec,
            s.target,
            direct.bytes_per_sec / MIB,
            gateway.bytes_per_sec / MIB,
            direct.non_2xx + direct.socket_errors,
            gateway.non_2xx + gateway.socket_errors,
            proxied.requests_per_sec,
            ratio_of(proxied),
        );
    }
    out.push_str(
        "\n\"gateway\": the default configuration, where a flow the proxy allowed at L4 \
         connects direct (still audited) for 30 s; \"proxy-only\": `fast_path = false`, \
         every connection relayed by the proxy.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://10.200.201.2:8080/small
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   150.21us  300.00us  10.00ms   95.00%
    Req/Sec    50.12k     2.00k   55.00k    70.00%
  997123 requests in 10.00s, 1.40GB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  99712.30
Transfer/sec:    143.36MB
";

    #[test]
    fn wrk_output() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests_per_sec, 99712.30);
        assert!((r.bytes_per_sec - 143.36 * MIB).abs() < 1.0);
        assert_eq!(r.non_2xx, 7);
        assert_eq!(r.socket_errors, 15);
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("827.00B").unwrap(), 827.0);
        assert_eq!(parse_size("2.00KB").unwrap(), 2048.0);
        assert_eq!(parse_duration("10s"), Ok(10));
        assert_eq!(parse_duration("2m"), Ok(120));
        assert_eq!(parse_duration("7"), Ok(7));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn ready_event() {
        assert!(is_ready(
            r#"{"timestamp":"x","level":"INFO","event":"ready","proxy_port":4711}"#
        ));
        assert!(is_ready(r#"{"event": "ready"}"#));
        assert!(!is_ready(r#"{"event":"starting"}"#));
    }
}
