//! Origin servers (`gw-probe serve` / `serve-dns`) running inside a
//! `TestNet`, with their per-connection logs.

use crate::jsonlog::JsonLines;
use crate::net::TestNet;
use crate::probe::Probe;
use serde_json::Value;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::ops::RangeInclusive;
use std::process::{Child, Stdio};
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A server process in the namespace and its JSON log.
struct Server {
    child: Child,
    log: JsonLines,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(net: &TestNet, probe: &Probe, args: Vec<String>) -> Server {
        let mut cmd = probe.command(&args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = net.spawn_in_ns(cmd);
        let log = JsonLines::new();
        let reader = Some(log.follow(child.stdout.take().unwrap()));
        let server = Server { child, log, reader };
        let ready = server.log.wait(0, START_TIMEOUT, |v| {
            v.get("listening").is_some() || v["ok"] == false
        });
        match ready {
            Ok(v) if v.get("listening").is_some() => server,
            other => panic!(
                "origin `gw-probe {}` did not start: {other:?}",
                args.join(" ")
            ),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// TCP origins on a range of ports: each connection gets `port=<P>\n` and
/// then an echo of what it sends.
pub struct Origin {
    server: Server,
    v4: Option<IpAddr>,
    first_port: u16,
}

impl Origin {
    pub fn start(
        net: &TestNet,
        probe: &Probe,
        binds: &[IpAddr],
        ports: RangeInclusive<u16>,
    ) -> Origin {
        let mut args = vec!["serve".to_owned()];
        for b in binds {
            args.extend(["--bind".to_owned(), b.to_string()]);
        }
        args.extend([
            "--ports".to_owned(),
            format!("{}-{}", ports.start(), ports.end()),
        ]);
        Origin {
            server: Server::start(net, probe, args),
            v4: binds.iter().copied().find(IpAddr::is_ipv4),
            first_port: *ports.start(),
        }
    }

    pub fn log(&self) -> &JsonLines {
        &self.server.log
    }

    /// A position in the log, for `accepted_since` / `assert_nothing_since`:
    /// everything the origin logged before the call lies before it. Lines
    /// travel through a pipe and a reader thread, so the log's length alone
    /// could lag; a control connection made now and waited for is the
    /// barrier.
    pub fn mark(&self) -> usize {
        let from = self.server.log.len();
        self.control(from, self.first_port).0 + 1
    }

    /// Accepted-connection lines after `mark`.
    pub fn accepted_since(&self, mark: usize) -> Vec<Value> {
        self.server.log.values()[mark..]
            .iter()
            .filter(|v| v.get("accepted").is_some())
            .cloned()
            .collect()
    }

    /// Wait for an accepted connection (after `mark`) matching `pred`.
    pub fn wait_accepted(&self, mark: usize, pred: impl Fn(&Value) -> bool) -> Value {
        self.server
            .log
            .wait(mark, Duration::from_secs(10), |v| {
                v.get("accepted").is_some() && pred(v)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "origin saw no matching connection ({e:?}); its log: {}",
                    self.server.log.tail(30)
                )
            })
    }

    /// Assert that no connection reached `port` since `mark`, other than a
    /// control connection made now, directly from the test process. The
    /// control's arrival is the barrier: the listener accepts in order, so
    /// anything sent before it would have been logged first.
    pub fn assert_nothing_since(&self, mark: usize, port: u16) {
        let (_, local) = self.control(mark, port);
        let others: Vec<Value> = self
            .accepted_since(mark)
            .into_iter()
            .filter(|v| v["peer"] != local.as_str())
            .collect();
        assert!(
            others.is_empty(),
            "the origin must have seen nothing, but it accepted: {others:?}"
        );
    }

    /// Connect directly from the test process (outside every tagged
    /// cgroup), wait until the origin logged it, close it. Returns the
    /// index of its line in the log and its client address.
    fn control(&self, from: usize, port: u16) -> (usize, String) {
        let ip = self.v4.expect("origin has an IPv4 bind");
        let mut control =
            TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(5))
                .unwrap_or_else(|e| {
                    panic!("control connection to the origin {ip}:{port} failed: {e}")
                });
        let local = control.local_addr().unwrap().to_string();
        // A connection is its (client, destination) pair: the kernel may have
        // used the same source port earlier towards another origin port, so
        // match both, and only among lines logged since `from`.
        let is_control = |v: &Value| {
            v.get("accepted").is_some() && v["peer"] == local.as_str() && v["accepted"] == port
        };
        self.wait_accepted(from, is_control);
        let index = from
            + self.server.log.values()[from..]
                .iter()
                .position(is_control)
                .unwrap();
        let _ = control.shutdown(std::net::Shutdown::Write);
        let _ = control.read_to_end(&mut Vec::new());
        (index, local)
    }
}

/// A DNS server answering A queries for fixed names.
pub struct DnsOrigin {
    server: Server,
}

impl DnsOrigin {
    pub fn start(
        net: &TestNet,
        probe: &Probe,
        binds: &[SocketAddr],
        answers: &[(&str, IpAddr)],
    ) -> DnsOrigin {
        let mut args = vec!["serve-dns".to_owned()];
        for b in binds {
            args.extend(["--bind".to_owned(), b.to_string()]);
        }
        for (name, ip) in answers {
            args.extend(["--answer".to_owned(), format!("{name}={ip}")]);
        }
        DnsOrigin {
            server: Server::start(net, probe, args),
        }
    }

    pub fn log(&self) -> &JsonLines {
        &self.server.log
    }

    /// Wait for a logged query matching `pred`.
    pub fn wait_query(&self, pred: impl Fn(&Value) -> bool) -> Value {
        self.server
            .log
            .wait(0, Duration::from_secs(10), |v| {
                v.get("query").is_some() && pred(v)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "DNS origin saw no matching query ({e:?}); its log: {}",
                    self.server.log.tail(30)
                )
            })
    }

    /// Query lines logged so far.
    pub fn queries(&self) -> Vec<Value> {
        self.server
            .log
            .values()
            .into_iter()
            .filter(|v| v.get("query").is_some())
            .collect()
    }
}
