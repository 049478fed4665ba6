//! `gateway`: the daemon and its command-line tools.

mod admin;
mod approvals;
mod audit;
mod cgroup;
mod config;
mod daemon;
mod dns;
mod exec;
mod fast;
mod identity;
mod intercept;
mod kernel;
mod mask;
mod notify;
mod oidc;
mod policy;
mod proxy;
mod relay;
mod sessions;
mod sockdiag;
mod tls;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

/// Transparent, identity-aware egress enforcer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Run {
        /// Config file (default /etc/gateway/gateway.toml, else the embedded default).
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate the config and print the effective settings.
    Check {
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a command under enforcement as IDENTITY, in a fresh child cgroup.
    Exec {
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        identity: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Bind a CI job's OIDC token to its cgroup (verified against the issuer's JWKS).
    Enroll {
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: Option<PathBuf>,
        /// The job's cgroup, relative to the cgroup2 mount or absolute.
        #[arg(long)]
        cgroup: String,
        /// File holding the job's JWT (`-` for stdin).
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Attached cgroups, pins and open connections.
    Status {
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove every pinned program, link and map: the only way to end enforcement.
    Detach {
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Held requests: list them, look at one, approve or deny (with an approver's OIDC token).
    Approvals {
        #[arg(long, env = "GATEWAY_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: approvals::cli::Cmd,
    },
    /// The audit trail: verify its tamper-evident chain.
    Audit {
        #[arg(long, env = "GATEWAY_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: audit::cli::Cmd,
    },
    /// Session recordings: list, show, export as HAR, prune.
    Sessions {
        #[arg(long, env = "GATEWAY_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: sessions::cli::Cmd,
    },
    /// The TLS interception CA: create it, show it, install it where clients look.
    Ca {
        #[arg(long, env = "GATEWAY_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// Create the CA (ECDSA P-256) in <state_dir>/ca; the key is readable by root only.
    Init {
        /// Replace an existing CA (clients must then trust the new one).
        #[arg(long)]
        force: bool,
    },
    /// Subject, SHA-256 fingerprint, validity and paths of the CA.
    Show,
    /// Install the CA certificate into an NSS database and/or the system store.
    #[command(group(clap::ArgGroup::new("target").required(true).multiple(true).args(["nssdb", "system"])))]
    Trust {
        /// NSS database directory (Chromium on Linux: ~/.pki/nssdb); created if missing.
        #[arg(long, value_name = "DIR")]
        nssdb: Option<PathBuf>,
        /// Copy to /usr/local/share/ca-certificates and run update-ca-certificates.
        #[arg(long)]
        system: bool,
    },
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{
        Layer as _,
        filter::{FilterExt as _, filter_fn},
        prelude::*,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
    };
    // Every audit event to journald whatever GATEWAY_LOG says (first, so an
    // event is chained and delivered or spooled before the log shows it),
    // then the operational log (with audit events unless `[audit] stderr =
    // false`).
    tracing_subscriber::registry()
        .with(
            audit::sink::JournalLayer.with_filter(filter_fn(|m| m.target() == audit::sink::TARGET)),
        )
        // One combined filter: nested per-layer filters leave callsites
        // that both reject (hyper's and h2's debug spans) enabled, and every
        // request then paid for span bookkeeping.
        .with(log.with_filter(filter.and(filter_fn(audit::sink::log_shows))))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Run { config, log_format } => {
            init_tracing(log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            if let Err(e) = rt.block_on(daemon::run(config)) {
                tracing::error!(event = "fatal", error = %format!("{e:#}"));
                return Err(e);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { config } => {
            let cfg = config::Config::load(config.as_deref())?;
            print_effective(&cfg);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec {
            config,
            identity,
            command,
        } => {
            let cfg = config::Config::load(config.as_deref())?;
            let code = exec::run(&cfg, &identity, &command)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        Cmd::Ca { config, cmd } => {
            let cfg = config::Config::load(config.as_deref())?;
            let dir = tls::ca::dir(&cfg.daemon.state_dir);
            match cmd {
                CaCmd::Init { force } => tls::ca::init(&dir, force)?,
                CaCmd::Show => tls::ca::show(&dir)?,
                CaCmd::Trust { nssdb, system } => tls::ca::trust(&dir, nssdb.as_deref(), system)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Audit { config, cmd } => {
            let cfg = config::Config::load(config.as_deref())?;
            audit::cli::run(&cfg, cmd)
        }
        Cmd::Sessions { config, cmd } => {
            let cfg = config::Config::load(config.as_deref())?;
            sessions::cli::run(&cfg, cmd)
        }
        Cmd::Approvals { config, cmd } => {
            let cfg = config::Config::load(config.as_deref())?;
            approvals::cli::run(&cfg.daemon.admin_socket, cmd)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { config, json } => {
            let cfg = config::Config::load(config.as_deref())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let status = match rt.block_on(admin::request(
                &cfg.daemon.admin_socket,
                &json!({"cmd": "status"}),
            )) {
                Ok(v) => v,
                Err(e) => {
                    // The daemon is down: say so, and show what still enforces.
                    let pins: Vec<_> = kernel::pins(&cfg.daemon.pin_dir)
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    json!({"daemon": format!("not reachable: {e:#}"), "ready": false, "pins": pins, "cgroups": [], "connections": []})
                }
            };
            if json {
                println!("{status}");
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Enroll {
            config,
            cgroup,
            token_file,
        } => {
            let cfg = config::Config::load(config.as_deref())?;
            let token = if token_file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading the token from stdin")?
            } else {
                std::fs::read_to_string(&token_file)
                    .with_context(|| format!("reading the token file {}", token_file.display()))?
            };
            let mount = cgroup::mount()?;
            let rel = std::path::Path::new(&cgroup)
                .strip_prefix(&mount)
                .map(|p| p.display().to_string())
                .unwrap_or(cgroup.clone());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let reply = rt.block_on(admin::request(
                &cfg.daemon.admin_socket,
                &json!({"cmd": "enroll", "cgroup": rel, "token": token.trim()}),
            ))?;
            println!(
                "enrolled {}: identity {} subject {} duties [{}] until {} (unix)",
                reply["enrolled"].as_str().unwrap_or_default(),
                reply["identity"].as_str().unwrap_or_default(),
                reply["subject"].as_str().unwrap_or_default(),
                reply["duties"]
                    .as_array()
                    .map(|d| d
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default(),
                reply["expires_at_unix"]
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Detach { config } => {
            let cfg = config::Config::load(config.as_deref())?;
            let removed = kernel::detach(&cfg.daemon.pin_dir)
                .with_context(|| format!("detaching {}", cfg.daemon.pin_dir.display()))?;
            println!(
                "detached: removed {} pins under {}; tagged cgroups are no longer enforced",
                removed.len(),
                cfg.daemon.pin_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_effective(cfg: &config::Config) {
    let d = &cfg.daemon;
    println!("config: {} (valid)", cfg.origin);
    println!(
        "proxy: 127.0.0.1/::1 port {}  dns: port {}",
        d.proxy_port, d.dns_port
    );
    println!(
        "pins: {}  state: {}  admin: {}",
        d.pin_dir.display(),
        d.state_dir.display(),
        d.admin_socket.display()
    );
    for t in &cfg.trusted_issuers {
        println!(
            "trusted issuer {}: audiences [{}], algorithms [{}]",
            t.issuer,
            t.audiences.join(", "),
            t.algorithms
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for i in &cfg.identities {
        let source = match &i.source {
            config::IdentitySource::Static { subject, duties } => {
                format!("static subject {subject}, duties [{}]", duties.join(", "))
            }
            config::IdentitySource::ClientCredentials(cc) => format!(
                "client credentials {} at {}, groups claim {:?}",
                cc.client_id, cc.issuer, i.groups_claim
            ),
            config::IdentitySource::Enrolled { issuers } => format!(
                "enrolled job tokens from {}, groups claim {:?}",
                if issuers.is_empty() {
                    "any trusted issuer".to_string()
                } else {
                    issuers.join(", ")
                },
                i.groups_claim
            ),
        };
        println!(
            "identity {}: cgroups [{}], {source}",
            i.name,
            i.cgroups.join(", ")
        );
        for (value, duties) in &i.duty_mapping {
            println!(
                "  claim value {value:?} grants duties [{}]",
                duties.join(", ")
            );
        }
    }
    print!("{}", cfg.policy_report());
}

fn print_status(s: &serde_json::Value) {
    if let Some(d) = s.get("daemon").and_then(|v| v.as_str()) {
        println!("daemon: {d}");
    } else {
        println!(
            "daemon: ready={}  proxy port {}  dns port {}  sessions {}",
            s["ready"], s["proxy_port"], s["dns_port"], s["sessions_total"]
        );
    }
    for c in s["cgroups"].as_array().into_iter().flatten() {
        println!(
            "cgroup {}  id {}  identity {}",
            c["path"], c["id"], c["identity"]
        );
    }
    for i in s["identities"].as_array().into_iter().flatten() {
        let who = &i["identity"];
        println!(
            "identity {} ({}): subject {} duties {} expires {}{}",
            i["name"],
            i["source"].as_str().unwrap_or_default(),
            who["subject"],
            who["duties"],
            who["expires_at_unix"],
            i["error"]
                .as_str()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
        for j in i["enrolled"].as_array().into_iter().flatten() {
            println!(
                "  enrolled {} subject {} duties {} expires {}",
                j["cgroup"], j["subject"], j["duties"], j["expires_at_unix"]
            );
        }
    }
    for p in s["pins"].as_array().into_iter().flatten() {
        println!("pin {}", p.as_str().unwrap_or_default());
    }
    for a in s["approvals_pending"].as_array().into_iter().flatten() {
        println!(
            "approval {} rule {} {} {} {}{} expires {}",
            a["id"].as_str().unwrap_or_default(),
            a["rule"].as_str().unwrap_or_default(),
            a["identity"].as_str().unwrap_or_default(),
            a["method"].as_str().unwrap_or_default(),
            a["host"].as_str().unwrap_or_default(),
            a["path"].as_str().unwrap_or_default(),
            a["expires_unix"]
        );
    }
    for c in s["connections"].as_array().into_iter().flatten() {
        println!(
            "conn {} {} pid {} {} -> {} ({}) up {} down {}",
            c["session"],
            c["identity"],
            c["pid"],
            c["exe"],
            c["orig_dst"],
            c["host"],
            c["bytes_up"],
            c["bytes_down"]
        );
    }
}
