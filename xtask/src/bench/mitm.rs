//! The benchmark's peer: `mitmdump --mode transparent` on loopback, fed by
//! an iptables `nat OUTPUT` REDIRECT rule that matches only processes in a
//! cgroup made for its client (so mitmproxy's own upstream connections,
//! from xtask's cgroup, go straight to the origin). Everything here is
//! undone by `Drop`: the rule, the nat table if this created it, the
//! process, the cgroup.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::lab::{last_line, quietly, remove_cgroup_tree, stop, tail};
use crate::util::{self, say};

/// How mitmproxy checks the origin's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// `--set ssl_verify_upstream_trusted_ca=<bench CA>`.
    TrustedCa,
    /// `--ssl-insecure`.
    Insecure,
}

pub struct Mitm {
    cgroup: PathBuf,
    cgroup_created: bool,
    child: Option<Child>,
    log: PathBuf,
    /// The iptables rule (what follows `-A OUTPUT`) once it is in.
    rule: Option<Vec<String>>,
    comment: String,
    /// Whether this added the nf_tables `ip nat` table (then it goes too).
    created_nat_table: bool,
}

impl Mitm {
    /// Starts mitmdump and redirects the client cgroup's TCP traffic to
    /// `origin:ports` into it.
    pub fn start(
        lab_dir: &Path,
        id: &str,
        origin: &str,
        ports: &[u16],
        origin_ca: &Path,
        upstream: Upstream,
    ) -> Result<Mitm> {
        let name = format!("gateway-bench-{id}-mitm");
        let mut m = Mitm {
            cgroup: util::cgroup2_mount()?.join(&name),
            cgroup_created: false,
            child: None,
            log: lab_dir.join(format!("mitmdump-{upstream:?}.log")),
            rule: None,
            comment: name.clone(),
            created_nat_table: false,
        };
        fs::create_dir(&m.cgroup)
            .with_context(|| format!("create cgroup {}", m.cgroup.display()))?;
        m.cgroup_created = true;

        // Its CA and state stay out of ~/.mitmproxy.
        let confdir = lab_dir.join("mitmproxy");
        fs::create_dir_all(&confdir)?;
        let port = free_port()?;
        let mut cmd = Command::new("mitmdump");
        cmd.args(["--mode", "transparent", "--listen-host", "127.0.0.1"])
            .arg("--listen-port")
            .arg(port.to_string())
            .arg("--set")
            .arg(format!("confdir={}", confdir.display()))
            // No per-flow output: the terminal would be the bottleneck.
            .arg("--quiet");
        match upstream {
            Upstream::TrustedCa => {
                cmd.arg("--set").arg(format!(
                    "ssl_verify_upstream_trusted_ca={}",
                    origin_ca.display()
                ));
            }
            Upstream::Insecure => {
                cmd.arg("--ssl-insecure");
            }
        }
        let log = fs::File::create(&m.log)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0);
        say(format!("$ {}", util::show(&cmd)));
        m.child = Some(cmd.spawn().context("start mitmdump")?);

        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        util::poll(
            &format!("mitmdump on {addr}"),
            Duration::from_secs(30),
            || {
                let child = m.child.as_mut().expect("just started");
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "mitmdump exited ({status}): {}\n{}",
                        last_line(&m.log),
                        tail(&m.log)
                    );
                }
                Ok(
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                        .is_ok()
                        .then_some(()),
                )
            },
        )?;

        m.created_nat_table = nf_tables() && !nat_table_exists();
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let rule: Vec<String> = [
            "-p",
            "tcp",
            "-d",
            origin,
            "-m",
            "multiport",
            "--dports",
            &ports.join(","),
            "-m",
            "cgroup",
            "--path",
            &name,
            "-m",
            "comment",
            "--comment",
            &m.comment,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port.to_string(),
        ]
        .map(str::to_owned)
        .into();
        let mut add = iptables();
        add.args(["-t", "nat", "-A", "OUTPUT"]).args(&rule);
        // Recorded first: a rule that half-went-in is still worth a -D.
        m.rule = Some(rule);
        util::run(&mut add)?;
        say(format!(
            "mitmproxy listens on {addr}; iptables redirects {origin}:{} from cgroup {name}",
            ports.join(",")
        ));
        Ok(m)
    }

    /// `program` started inside the client cgroup (whose traffic to the
    /// origin goes to mitmproxy); the caller adds its arguments.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
            .arg(self.cgroup.join("cgroup.procs"))
            .arg(program);
        cmd
    }

    /// Packets that matched the REDIRECT rule: one per redirected
    /// connection (nat only sees a connection's first packet).
    pub fn redirected(&self) -> Result<u64> {
        let listing =
            util::output(iptables().args(["-t", "nat", "-L", "OUTPUT", "-n", "-v", "-x"]))?;
        let tag = format!("/* {} */", self.comment);
        let line = listing
            .lines()
            .find(|l| l.contains(&tag))
            .with_context(|| format!("no rule tagged {tag} in:\n{listing}"))?;
        line.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no packet count in `{line}`"))
    }

    pub fn alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("mitmdump is not running");
        };
        if let Some(status) = child.try_wait()? {
            bail!("mitmdump exited ({status}): {}", last_line(&self.log));
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        if let Some(rule) = self.rule.take() {
            let mut del = iptables();
            del.args(["-t", "nat", "-D", "OUTPUT"]).args(&rule);
            quietly(&mut del);
        }
        if self.created_nat_table {
            // Empty now unless someone else added rules meanwhile; an empty
            // nat table would keep connection tracking on for every later
            // run on this host.
            let rules = util::output(iptables().args(["-t", "nat", "-S"])).unwrap_or_default();
            if rules.lines().any(|l| l.starts_with("-A ")) {
                say("warning: leaving the nat table (it holds rules this did not add)");
            } else {
                quietly(Command::new("nft").args(["delete", "table", "ip", "nat"]));
            }
        }
        if let Some(mut child) = self.child.take() {
            stop(&mut child, "mitmdump", Duration::from_secs(5));
        }
        if self.cgroup_created || self.cgroup.exists() {
            remove_cgroup_tree(&self.cgroup);
        }
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn iptables() -> Command {
    let mut cmd = Command::new("iptables");
    cmd.args(["-w", "5"]);
    cmd
}

/// Whether iptables is the nf_tables flavour (whose tables `nft` manages).
fn nf_tables() -> bool {
    util::which("nft").is_some()
        && util::output(Command::new("iptables").arg("--version"))
            .is_ok_and(|v| v.contains("nf_tables"))
}

fn nat_table_exists() -> bool {
    Command::new("nft")
        .args(["list", "table", "ip", "nat"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
