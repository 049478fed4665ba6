//! `gateway run`: attach, listen, tell the kernel we are ready, serve, and
//! on the way out tell it we are not (fail closed). The shared `State` is
//! what every data-path task reads.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use gateway_common::{Control, FLAG_ALLOW_FOREIGN_NETNS, READY, UdpAllowKey};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    admin,
    cgroup::{self, Resolver},
    config::{Action, Config},
    dns::{self, Names},
    fast::{self, FastPath},
    identity::Identities,
    kernel::{self, Attached, Maps},
    policy::Policy,
    proxy::{self, Exes, Registry, ip_to_words},
};

/// `SO_MARK` on the gateway's own sockets; the hooks never touch them.
pub const SOCKET_MARK: u32 = 0x4757_0001;

/// What the data path shares.
#[derive(Debug)]
pub struct State {
    pub maps: Maps,
    pub resolver: Resolver,
    pub registry: Registry,
    pub exes: Exes,
    pub dns: Names,
    pub dns_upstreams: Vec<SocketAddr>,
    pub mark: u32,
    pub proxy_port: u16,
    pub dns_port: u16,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub attached: Vec<Attached>,
    /// Identities are fixed for the daemon's lifetime (their token tasks
    /// run from start); a reload swaps the policy.
    pub identities: Arc<Identities>,
    pub fast: FastPath,
    /// Whether allowed L4 flows may use the kernel fast path.
    pub fast_path: bool,
    pub pin_dir: PathBuf,
    /// The CA, upstream trust and limits of HTTP/TLS interception.
    pub interception: crate::intercept::Interception,
    /// Requests held for approval, and the windows granted.
    pub approvals: Arc<crate::approvals::Approvals>,
    /// The approvals API's address: tagged processes never reach it.
    pub api_addr: Option<SocketAddr>,
    /// Session recordings (and their writer/janitor thread).
    pub sessions: crate::sessions::Recorder,
    config: RwLock<Arc<Live>>,
}

/// The parts of the config a reload (SIGHUP) may swap.
#[derive(Debug)]
struct Live {
    policy: Arc<Policy>,
    origin: String,
}

impl Live {
    fn new(cfg: &Config) -> Arc<Live> {
        Arc::new(Live {
            policy: Arc::new(cfg.policy.clone()),
            origin: cfg.origin.clone(),
        })
    }
}

impl State {
    pub fn policy(&self) -> Arc<Policy> {
        // A poisoned lock means a reload panicked; refuse rather than guess.
        self.config.read().map_or_else(
            |_| Arc::new(Policy::default_only(Action::Block)),
            |l| l.policy.clone(),
        )
    }
}

pub async fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = Config::load(config_path.as_deref())?;
    tracing::info!(event = "config_loaded", origin = %cfg.origin);
    // Audit delivery (journald, chain, spool) before anything is audited.
    crate::audit::sink::start(&cfg.audit, &cfg.daemon.state_dir)
        .context("starting audit delivery ([audit])")?;
    let mount = cgroup::mount().context("finding the cgroup2 mount")?;

    let mut cgroups = Vec::new();
    for (rel, identity) in cfg.bindings() {
        let path = mount.join(rel);
        std::fs::create_dir_all(&path).with_context(|| {
            format!(
                "creating cgroup {} for identity {}",
                path.display(),
                identity.name
            )
        })?;
        cgroups.push(path);
    }
    let (maps, events, attached) =
        kernel::attach(&cfg.daemon.pin_dir, &cgroups).with_context(|| {
            format!(
                "attaching the kernel programs (pins under {})",
                cfg.daemon.pin_dir.display()
            )
        })?;
    for a in &attached {
        tracing::info!(
            event = "attached",
            cgroup = %a.path.display(),
            cgroup_id = a.id,
            adopted = a.adopted,
            family_guard = a.family_guard,
        );
    }

    let (tcp4, tcp6, proxy_port) =
        proxy::bind_pair_tcp(cfg.daemon.proxy_port).with_context(|| {
            format!(
                "binding the proxy on 127.0.0.1/::1 port {}",
                cfg.daemon.proxy_port
            )
        })?;
    let (udp4, udp6, dns_port) = dns::bind_pair_udp(cfg.daemon.dns_port).with_context(|| {
        format!(
            "binding the DNS forwarder on 127.0.0.1/::1 port {}",
            cfg.daemon.dns_port
        )
    })?;

    let dns_upstreams = if cfg.daemon.dns_upstreams.is_empty() {
        dns::resolv_conf_upstreams()
    } else {
        cfg.daemon.dns_upstreams.clone()
    };
    if dns_upstreams.is_empty() {
        tracing::warn!(
            "no DNS upstream: none configured and none in /etc/resolv.conf; lookups from tagged cgroups will fail"
        );
    }
    let udp_allow: Vec<UdpAllowKey> = cfg
        .daemon
        .udp_allow
        .iter()
        .map(|a| UdpAllowKey {
            addr: ip_to_words(a.ip()),
            port: a.port(),
            _pad: 0,
        })
        .collect();
    maps.set_udp_allow(&udp_allow)
        .context("writing the UDP allow-list")?;

    let roots = cfg
        .identities
        .iter()
        .flat_map(|i| i.cgroups.clone())
        .collect();
    let interception =
        crate::intercept::Interception::new(&cfg.interception, &cfg.daemon.state_dir)
            .context("preparing HTTP/TLS interception (CA and upstream trust)")?;
    let identities = Arc::new(Identities::from_config(&cfg));
    identities.spawn_refreshers();
    let api = match cfg.approvals.api_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the approvals API on {addr}"))?;
            tracing::info!(event = "approvals_api", listen = %l.local_addr().unwrap_or(addr));
            Some(l)
        }
        None => None,
    };
    let api_addr = api.as_ref().and_then(|l| l.local_addr().ok());
    let approvals = Arc::new(
        crate::approvals::Approvals::new(&cfg.approvals, identities.clone(), &cfg.daemon.state_dir)
            .context("preparing approvals (state directory)")?,
    );
    let state = Arc::new(State {
        maps,
        resolver: Resolver::new(mount, roots),
        registry: Registry::default(),
        exes: Exes::default(),
        dns: Names::default(),
        dns_upstreams,
        mark: SOCKET_MARK,
        proxy_port,
        dns_port,
        connect_timeout: cfg.daemon.connect_timeout,
        idle_timeout: cfg.daemon.idle_timeout,
        attached,
        identities: identities.clone(),
        fast: FastPath::default(),
        fast_path: cfg.daemon.fast_path,
        pin_dir: cfg.daemon.pin_dir.clone(),
        interception,
        approvals,
        api_addr,
        // Starts the recordings' writer, which applies retention now and
        // then periodically.
        sessions: crate::sessions::Recorder::start(&cfg.sessions),
        config: RwLock::new(Live::new(&cfg)),
    });
    if let Some(listener) = api {
        tokio::spawn(crate::approvals::api::serve(listener, state.clone()));
    }

    let admin = admin::bind(&cfg.daemon.admin_socket)?;
    tokio::spawn(admin::serve(admin, state.clone()));
    tokio::spawn(proxy::serve(tcp4, state.clone()));
    if let Some(l) = tcp6 {
        tokio::spawn(proxy::serve(l, state.clone()));
    }
    tokio::spawn(dns::serve(udp4, state.clone()));
    if let Some(s) = udp6 {
        tokio::spawn(dns::serve(s, state.clone()));
    }
    tokio::spawn(janitor(state.clone()));
    tokio::spawn(fast::read_events(events, state.clone()));
    // Decisions cached by a previous daemon are not ours to vouch for.
    state.fast.clear(&state);
    tokio::spawn(enrollment_janitor(state.clone()));

    // Only now may the kernel send traffic our way.
    let control = Control {
        ready: READY,
        mark: SOCKET_MARK,
        netns_cookie: kernel::own_netns_cookie().context("reading our network namespace cookie")?,
        proxy_port,
        dns_port,
        flags: if cfg.daemon.allow_foreign_netns {
            FLAG_ALLOW_FOREIGN_NETNS
        } else {
            0
        },
    };
    state
        .maps
        .set_control(&control)
        .context("writing the control map")?;
    tracing::info!(
        event = "ready",
        proxy_port,
        dns_port,
        pin_dir = %cfg.daemon.pin_dir.display(),
        admin_socket = %cfg.daemon.admin_socket.display(),
    );
    for (name, cg) in cfg
        .identities
        .iter()
        .flat_map(|i| i.cgroups.iter().map(move |c| (&i.name, c)))
    {
        tracing::info!(
            "try it: gateway exec{} --identity {name} -- curl -sI http://example.com/   (cgroup {cg})",
            config_path
                .as_ref()
                .map(|p| format!(" --config {}", p.display()))
                .unwrap_or_default()
        );
    }

    crate::notify::notify(&format!(
        "READY=1\nSTATUS=enforcing {} cgroup(s); proxy on port {proxy_port}",
        state.attached.len()
    ));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::notify::reloading();
                reload(&state, config_path.as_deref());
                crate::notify::notify("READY=1");
            }
        }
    }
    crate::notify::notify("STOPPING=1");
    // Held requests do not outlive the daemon: their clients get a refusal
    // and the audit says so.
    state.approvals.abort_all();
    // Fail closed: tagged connects are refused until a daemon is ready again.
    let not_ready = Control {
        ready: 0,
        ..control
    };
    if let Err(e) = state.maps.set_control(&not_ready) {
        tracing::error!(error = %e, "could not mark the gateway not-ready; connects will be refused by the closed port instead");
    }
    // Give the released requests a moment to answer their clients (a 403
    // naming the approval); bounded, so a stop never hangs on them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while state.approvals.held() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if state.approvals.held() == 0 {
        // The 403s are produced; let the connection tasks write them.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&cfg.daemon.admin_socket);
    tracing::info!(
        event = "stopped",
        "enforcement stays attached; `gateway detach` removes it"
    );
    Ok(())
}

/// SIGHUP: re-read the config; a bad one keeps the old in force.
fn reload(state: &State, path: Option<&std::path::Path>) {
    match Config::load(path) {
        Ok(cfg) => {
            let live = Live::new(&cfg);
            if let Ok(mut l) = state.config.write() {
                *l = live;
            }
            state.fast.clear(state);
            tracing::info!(event = "reloaded", origin = %cfg.origin, "policy reloaded; identity changes take effect at the next start");
        }
        Err(e) => {
            let origin = state
                .config
                .read()
                .map(|l| l.origin.clone())
                .unwrap_or_default();
            tracing::error!(event = "reload_failed", error = %e, kept = %origin, "reload failed; the previous configuration stays in force");
        }
    }
}

/// Ends enrollments whose token expired or whose cgroup went away.
async fn enrollment_janitor(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        for (cgroup, why) in state.identities.sweep(state.resolver.mount()) {
            tracing::info!(target: "gateway::audit", event = "enrollment_ended", cgroup = %cgroup, reason = %why);
        }
    }
}

/// Removes tuple records of connects that never reached `accept` (the
/// client gave up or was reset before we saw it).
async fn janitor(state: Arc<State>) {
    const MAX_AGE: Duration = Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let removed = state
            .maps
            .sweep_tuples(kernel::monotonic_ns(), MAX_AGE.as_nanos() as u64);
        if removed > 0 {
            tracing::debug!(removed, "swept stale tuple records");
        }
    }
}
