//! Issue 6, systemd and install: the units pass `systemd-analyze verify`,
//! `cargo xtask install` stages exactly the expected files and never
//! overwrites a config, the shipped config is valid, and the capability set
//! in `systemd/gateway.service` is exactly enough: the real daemon, started
//! with that set (parsed from the unit, so the two cannot drift), becomes
//! ready and enforces, and with any one of its capabilities less it fails
//! loudly (or, for CAP_SYS_PTRACE, loses the process's executable).

use gateway_tests::daemon::{is_event, num, text};
use gateway_tests::jsonlog::WaitError;
use gateway_tests::{
    Config, JsonLines, Origin, Probe, ProbeRun, TempDir, TestNet, cgroup, gateway_bin, poll,
    require_root,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const ORIGIN_PORT: u16 = 20001;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn unit_text() -> String {
    let path = workspace().join("systemd/gateway.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_gw-probe"))
}

fn show(out: &Output) -> String {
    format!(
        "({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The values of an active (uncommented) `Key=` line of a unit, split on
/// whitespace; panics if the key is missing or repeated.
fn unit_list(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    let lines: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&prefix))
        .collect();
    assert_eq!(lines.len(), 1, "exactly one {key}= line in the unit");
    lines[0][prefix.len()..]
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `CapabilityBoundingSet=` of the unit, e.g. `["CAP_BPF", ...]`; checks
/// that `AmbientCapabilities=` is the same set (the daemon runs as root, so
/// the bounding set is what it gets; the ambient set keeps it working under
/// a `User=` too).
fn unit_caps() -> Vec<String> {
    let unit = unit_text();
    let bounding = unit_list(&unit, "CapabilityBoundingSet");
    let ambient = unit_list(&unit, "AmbientCapabilities");
    assert!(!bounding.is_empty(), "the unit names its capabilities");
    assert_eq!(
        bounding.iter().collect::<BTreeSet<_>>(),
        ambient.iter().collect::<BTreeSet<_>>(),
        "CapabilityBoundingSet= and AmbientCapabilities= must agree"
    );
    assert!(
        bounding.iter().all(|c| c.starts_with("CAP_")),
        "{bounding:?}"
    );
    assert_eq!(
        unit_list(&unit, "NoNewPrivileges"),
        ["yes"],
        "the unit sets NoNewPrivileges=yes (the test mirrors it)"
    );
    bounding
}

/// `setpriv` arguments granting exactly `caps` (`CAP_BPF` → `+bpf`), the
/// way systemd starts a root service with that bounding and ambient set.
fn setpriv(caps: &[String]) -> Command {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = format!("-all{list}");
    let mut c = Command::new("setpriv");
    c.arg("--no-new-privs")
        .arg(format!("--bounding-set={set}"))
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg("--");
    c
}

/// The bit of each capability in the kernel's masks (`CapEff:` in
/// /proc/PID/status).
fn cap_bit(name: &str) -> u32 {
    match name {
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("cap_bit: add {other}"),
    }
}

/// `gateway run` started by `setpriv` with a given capability set, on a
/// harness config (unique cgroup, pin dir, state and sockets). Drop kills
/// it, detaches, and removes the cgroup and the pins.
struct CappedDaemon {
    cfg: Config,
    cfg_path: PathBuf,
    child: Option<Child>,
    log: JsonLines,
    reader: Option<std::thread::JoinHandle<()>>,
    stderr_path: PathBuf,
}

impl CappedDaemon {
    fn spawn(cfg: Config, caps: &[String]) -> CappedDaemon {
        // systemd has created the slice's cgroup by the time the daemon
        // starts (the unit wants the slice); the cgroup2 root is 0555, and
        // the daemon has no CAP_DAC_OVERRIDE to mkdir there.
        let root = cgroup::cgroup2_mount();
        for (_, cg) in cfg.cgroups() {
            std::fs::create_dir_all(root.join(cg)).expect("create the identity cgroup");
        }
        let cfg_path = cfg.dir().join("gateway.toml");
        std::fs::write(&cfg_path, cfg.to_toml()).expect("write daemon config");
        let stderr_path = cfg.dir().join("daemon.stderr");
        let stderr = File::create(&stderr_path).expect("create daemon stderr file");
        let mut child = setpriv(caps)
            .arg(gateway_bin())
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn setpriv gateway run");
        let log = JsonLines::new();
        let reader = Some(log.follow(child.stdout.take().unwrap()));
        CappedDaemon {
            cfg,
            cfg_path,
            child: Some(child),
            log,
            reader,
            stderr_path,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- daemon stderr ---\n{}\n--- daemon stdout (last 30) ---\n{}",
            self.stderr(),
            self.log.tail(30)
        )
    }

    /// The ready event, or why there is none.
    fn wait_ready(&self) -> Result<Value, WaitError> {
        self.log.wait(0, READY_TIMEOUT, |v| is_event(v, "ready"))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Waits for the daemon to exit (it must, within the deadline).
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("daemon started");
        let status = poll(READY_TIMEOUT, || child.try_wait().unwrap());
        status.unwrap_or_else(|| {
            panic!(
                "the daemon neither became ready nor exited\n{}",
                self.diagnostics()
            )
        })
    }

    fn gateway(&self, sub: &str) -> Command {
        let mut c = Command::new(gateway_bin());
        c.arg(sub).arg("--config").arg(&self.cfg_path);
        c
    }

    /// A probe run in the identity's cgroup through `gateway exec`.
    fn tagged(&self, probe: &Probe, args: &[&str]) -> ProbeRun {
        let mut c = self.gateway("exec");
        c.args(["--identity", "t1", "--"])
            .arg(probe.path())
            .args(args);
        ProbeRun::of(c)
    }

    fn wait_connection(&self, pid: u64, port: u16) -> Value {
        self.log
            .wait(0, Duration::from_secs(10), |v| {
                is_event(v, "connection")
                    && num(v, "pid") == Some(pid)
                    && text(v, "orig_dst").ends_with(&format!(":{port}"))
            })
            .unwrap_or_else(|e| {
                panic!(
                    "no connection event for pid {pid} ({e:?})\n{}",
                    self.diagnostics()
                )
            })
    }
}

impl Drop for CappedDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let _ = self.gateway("detach").stdin(Stdio::null()).output();
        if let Some(root) = cgroup::try_cgroup2_mount() {
            for (_, cg) in self.cfg.cgroups() {
                cgroup::remove_tree(&root.join(cg));
            }
        }
        let _ = std::fs::remove_dir_all(&self.cfg.pin_dir);
    }
}

/// One origin in a namespace of its own, for proving enforcement.
struct Lab {
    origin: Origin,
    net: TestNet,
    probe: Probe,
}

impl Lab {
    fn new() -> Lab {
        let probe = probe();
        let net = TestNet::new();
        let origin = Origin::start(
            &net,
            &probe,
            &[net.ns_v4().into()],
            ORIGIN_PORT..=ORIGIN_PORT,
        );
        Lab { origin, net, probe }
    }

    fn target(&self) -> SocketAddr {
        SocketAddr::new(self.net.ns_v4().into(), ORIGIN_PORT)
    }

    fn probe_exe(&self) -> String {
        std::fs::canonicalize(self.probe.path())
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// A tagged client reaches the origin through the gateway: the bytes
    /// arrive, getpeername shows the origin, the origin saw the connection,
    /// and the daemon audited it. Returns the audit event.
    fn tagged_connection_is_redirected_and_audited(&self, d: &CappedDaemon) -> Value {
        let target = self.target();
        let mark = self.origin.mark();
        let run = d.tagged(&self.probe, &["tcp", &target.to_string(), "--send", "hi"]);
        assert_eq!(run.status.code(), Some(0), "tagged client failed: {run:?}");
        assert_eq!(
            text(&run.json, "received"),
            format!("port={ORIGIN_PORT}\nhi"),
            "{run:?}"
        );
        assert_eq!(text(&run.json, "peer"), target.to_string(), "{run:?}");
        self.origin
            .wait_accepted(mark, |v| v["accepted"] == ORIGIN_PORT);
        let ev = d.wait_connection(run.pid(), ORIGIN_PORT);
        assert_eq!(text(&ev, "identity"), "t1", "{ev}");
        assert_eq!(text(&ev, "orig_dst"), target.to_string(), "{ev}");
        assert_eq!(text(&ev, "decision"), "allow", "{ev}");
        assert_eq!(text(&ev, "outcome"), "closed", "{ev}");
        ev
    }
}

/// `cargo xtask install --destdir DIR --binary $GATEWAY_BIN`, run the way an
/// operator runs it (the nested cargo only builds xtask itself).
fn xtask_install(destdir: &Path) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args(["xtask", "install", "--destdir"])
        .arg(destdir)
        .arg("--binary")
        .arg(gateway_bin())
        .stdin(Stdio::null())
        .output()
        .expect("run cargo xtask install");
    assert!(out.status.success(), "cargo xtask install {}", show(&out));
    out
}

/// Every file below `dir`, relative, with its mode.
fn tree(dir: &Path) -> Vec<(String, u32)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, u32)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                walk(base, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(base).unwrap().to_owned();
                out.push((
                    rel.to_string_lossy().into_owned(),
                    meta.permissions().mode() & 0o7777,
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn install_stages_exactly_the_expected_files_and_never_overwrites_the_config() {
    require_root();
    let tmp = TempDir::new();
    let dest = tmp.path().join("root");
    let out = xtask_install(&dest);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();

    let expected: Vec<(String, u32)> = [
        ("etc/gateway/gateway.toml", 0o644),
        ("etc/systemd/system/gateway-runners.slice", 0o644),
        ("etc/systemd/system/gateway.service", 0o644),
        ("usr/local/bin/gateway", 0o755),
        ("usr/local/share/gateway/examples/gateway.toml", 0o644),
        (
            "usr/local/share/gateway/examples/github-actions-runner.conf",
            0o644,
        ),
        ("usr/local/share/gateway/examples/gitlab-runner.conf", 0o644),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), *m))
    .collect();
    assert_eq!(tree(&dest), expected, "{said}");
    for (path, _) in &expected {
        assert!(
            said.contains(&dest.join(path).display().to_string()),
            "install names where it put {path}: {said}"
        );
    }
    assert!(said.contains("systemd not reloaded"), "{said}");
    assert_eq!(
        std::fs::read(dest.join("usr/local/bin/gateway")).unwrap(),
        std::fs::read(gateway_bin()).unwrap(),
        "the installed binary is the built one"
    );
    let unit = std::fs::read_to_string(dest.join("etc/systemd/system/gateway.service")).unwrap();
    assert!(
        unit.contains(
            "\nExecStart=/usr/local/bin/gateway run --config /etc/gateway/gateway.toml\n"
        ),
        "ExecStart names the installed binary (not the DESTDIR path): {unit}"
    );

    // A second install keeps an operator's config, and says so.
    let config = dest.join("etc/gateway/gateway.toml");
    let mine = "# the operator's own\n[policy]\nversion = 1\ndefault = \"block\"\n";
    std::fs::write(&config, mine).unwrap();
    let again = xtask_install(&dest);
    let said = String::from_utf8_lossy(&again.stderr);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), mine, "{said}");
    assert!(
        said.contains("not overwritten"),
        "install says it kept the config: {said}"
    );
    assert_eq!(tree(&dest), expected, "no stray files after a reinstall");
}

#[test]
fn the_installed_default_config_passes_gateway_check() {
    require_root();
    let tmp = TempDir::new();
    let dest = tmp.path().join("root");
    xtask_install(&dest);
    for config in [
        "etc/gateway/gateway.toml",
        "usr/local/share/gateway/examples/gateway.toml",
    ] {
        let out = Command::new(gateway_bin())
            .arg("check")
            .arg("--config")
            .arg(dest.join(config))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gateway check {config} {}",
            show(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("gateway-runners.slice"),
            "the default config binds the runners' slice: {stdout}"
        );
    }
}

/// A minimal runner service of the kind the drop-ins are written for.
const RUNNER: &str = "[Unit]\nDescription=example CI runner\n\n[Service]\nExecStart=/bin/sleep infinity\n\n[Install]\nWantedBy=multi-user.target\n";

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    require_root();
    let tmp = TempDir::new();
    let dest = tmp.path().join("root");
    xtask_install(&dest);

    // The installed units, in one directory systemd-analyze searches; only
    // ExecStart= is pointed at the staged binary (verify needs it to exist).
    let units = tmp.path().join("units");
    std::fs::create_dir(&units).unwrap();
    let bin = dest.join("usr/local/bin/gateway");
    let unit = std::fs::read_to_string(dest.join("etc/systemd/system/gateway.service")).unwrap();
    let unit = unit.replace(
        "ExecStart=/usr/local/bin/gateway ",
        &format!("ExecStart={} ", bin.display()),
    );
    assert!(unit.contains(&format!("ExecStart={} ", bin.display())));
    std::fs::write(units.join("gateway.service"), unit).unwrap();
    std::fs::copy(
        dest.join("etc/systemd/system/gateway-runners.slice"),
        units.join("gateway-runners.slice"),
    )
    .unwrap();
    // The example drop-ins, each on a runner service.
    let examples = dest.join("usr/local/share/gateway/examples");
    let runners = [
        (
            "actions.runner.acme-shop.runner1.service",
            "github-actions-runner.conf",
        ),
        ("gitlab-runner.service", "gitlab-runner.conf"),
    ];
    for (service, dropin) in runners {
        std::fs::write(units.join(service), RUNNER).unwrap();
        let d = units.join(format!("{service}.d"));
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(examples.join(dropin), d.join("gateway.conf")).unwrap();
    }

    let verify = |names: &[&str]| {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(names.iter().map(|n| units.join(n)))
            .output()
            .expect("run systemd-analyze");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out,
        )
    };
    let all = [
        "gateway.service",
        "gateway-runners.slice",
        runners[0].0,
        runners[1].0,
    ];
    let (ok, stderr, out) = verify(&all);
    assert!(ok, "systemd-analyze verify {}", show(&out));
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify printed warnings: {stderr}"
    );

    // The drop-ins really are read (a bad line in one is reported), so the
    // clean pass above covers them.
    let probe_dropin = units.join(format!("{}.d/zz-probe.conf", runners[1].0));
    std::fs::write(&probe_dropin, "[Service]\nNotAGatewayKey=1\n").unwrap();
    let (_, stderr, _) = verify(&[runners[1].0]);
    assert!(
        stderr.contains("NotAGatewayKey"),
        "systemd-analyze reads drop-ins next to the unit: {stderr}"
    );
}

#[test]
fn the_units_capability_set_is_enough_to_attach_and_enforce() {
    require_root();
    let caps = unit_caps();
    let lab = Lab::new();
    let d = CappedDaemon::spawn(Config::new(), &caps);
    if let Err(e) = d.wait_ready() {
        panic!(
            "the daemon with exactly {caps:?} did not become ready ({e:?})\n{}",
            d.diagnostics()
        );
    }

    // It really runs with that set, no more.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let want = caps.iter().fold(0u64, |m, c| m | 1 << cap_bit(c));
    assert_eq!(
        eff, want,
        "effective capabilities {eff:#x}, unit says {caps:?}"
    );

    let ev = lab.tagged_connection_is_redirected_and_audited(&d);
    assert_eq!(
        text(&ev, "exe"),
        lab.probe_exe(),
        "the audit names the executable (CAP_SYS_PTRACE): {ev}"
    );
}

#[test]
fn without_cap_bpf_net_admin_or_perfmon_the_daemon_refuses_to_start() {
    require_root();
    let caps = unit_caps();
    for missing in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"] {
        assert!(caps.iter().any(|c| c == missing), "{missing} in {caps:?}");
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let mut d = CappedDaemon::spawn(Config::new(), &fewer);
        let status = d.wait_exit();
        assert!(
            !status.success(),
            "without {missing} the daemon must fail ({status})\n{}",
            d.diagnostics()
        );
        assert!(
            !d.log.values().iter().any(|v| is_event(v, "ready")),
            "without {missing} it must never report ready\n{}",
            d.diagnostics()
        );
        let err = d.stderr();
        assert!(
            err.contains("attaching the kernel programs")
                && (err.contains("Operation not permitted") || err.contains("Permission denied")),
            "without {missing}: a clear error naming the failed step: {err}"
        );
    }
}

#[test]
fn without_cap_sys_ptrace_the_audit_loses_the_executable() {
    require_root();
    let caps = unit_caps();
    assert!(caps.iter().any(|c| c == "CAP_SYS_PTRACE"), "{caps:?}");
    let fewer: Vec<String> = caps
        .iter()
        .filter(|c| *c != "CAP_SYS_PTRACE")
        .cloned()
        .collect();
    let lab = Lab::new();
    let d = CappedDaemon::spawn(Config::new(), &fewer);
    if let Err(e) = d.wait_ready() {
        panic!("not ready ({e:?})\n{}", d.diagnostics());
    }
    let ev = lab.tagged_connection_is_redirected_and_audited(&d);
    assert_eq!(
        text(&ev, "exe"),
        "",
        "without CAP_SYS_PTRACE /proc/PID/exe of a client holding more capabilities is unreadable; \
         if this now passes, the unit may not need CAP_SYS_PTRACE: {ev}"
    );
}
