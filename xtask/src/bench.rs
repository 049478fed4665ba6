//! `cargo xtask bench`: what the gateway costs, measured against a direct
//! connection (and, for interception, against mitmproxy) in the same run.
//!
//! nginx serves plain HTTP and TLS from its own network namespace, reached
//! over a veth pair. wrk runs directly, under `gateway exec` (inside the
//! cgroup of a static `bench` identity, so every connection goes through
//! the kernel hooks and the proxy) and, for the interception scenarios,
//! inside a cgroup whose traffic iptables redirects into a transparent
//! mitmproxy. Each cell is measured on its own: one that fails shows its
//! error in the table instead of ending the run. Everything set up here is
//! torn down on the way out, also on error or Ctrl-C.

mod lab;
mod mitm;
mod wrk;

use std::{fmt::Write as _, fs, process::Output, thread};

use anyhow::{Error, Result};

use crate::{
    prereqs::{self, Check::Bin, Installer::Apt},
    util::{self, say},
};
use lab::{CARD, DaemonMode, Lab, PORT, TLS_PORT, Via};
use mitm::{Mitm, Upstream};
use wrk::{MIB, Wrk};

#[derive(clap::Args)]
pub struct Args {
    /// Length of each wrk run: `10s`, `1m`, or plain seconds.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: u64,
    /// Run only these scenarios (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Pick>,
}

/// Scenario names for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Pick {
    /// Plain HTTP keep-alive, 1.2 KiB, no L7 rule.
    KeepAlive,
    /// Plain HTTP, a new connection per request.
    Close,
    /// Plain HTTP keep-alive, 1 MiB.
    Large,
    /// Plain HTTP keep-alive with a `methods` rule (every request parsed).
    HttpInspected,
    /// HTTPS keep-alive, intercepted, masking cards and emails.
    TlsMasked,
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

/// What a scenario's result is judged against.
#[derive(Clone, Copy)]
enum Target {
    /// Minimum gateway/direct ratio of requests per second.
    Direct(f64),
    /// Minimum gateway/mitmproxy ratio of requests per second.
    Mitm(f64),
}

struct Scenario {
    pick: Pick,
    name: &'static str,
    path: &'static str,
    tls: bool,
    close: bool,
    /// Runs against the daemon with L7 rules (and against mitmproxy)
    /// instead of the L4 configurations.
    intercept: bool,
    target: Target,
}

const SCENARIOS: [Scenario; 5] = [
    Scenario {
        pick: Pick::KeepAlive,
        name: "keep-alive, 1.2 KiB",
        path: "/small",
        tls: false,
        close: false,
        intercept: false,
        target: Target::Direct(0.85),
    },
    Scenario {
        pick: Pick::Close,
        name: "new connection per request, 1.2 KiB",
        path: "/small",
        tls: false,
        close: true,
        intercept: false,
        target: Target::Direct(0.6),
    },
    Scenario {
        pick: Pick::Large,
        name: "keep-alive, 1 MiB",
        path: "/1m",
        tls: false,
        close: false,
        intercept: false,
        target: Target::Direct(0.9),
    },
    Scenario {
        pick: Pick::HttpInspected,
        name: "HTTP inspected (methods rule), keep-alive, 1.2 KiB",
        path: "/small",
        tls: false,
        close: false,
        intercept: true,
        target: Target::Direct(0.5),
    },
    Scenario {
        pick: Pick::TlsMasked,
        name: "TLS intercepted, masking on, keep-alive, 1.5 KiB JSON",
        path: "/small.json",
        tls: true,
        close: false,
        intercept: true,
        target: Target::Mitm(10.0),
    },
];

/// One measurement.
enum Cell {
    /// Not part of this scenario.
    Skipped,
    Done(Wrk),
    Failed(String),
}

impl Cell {
    fn ok(&self) -> Option<&Wrk> {
        match self {
            Cell::Done(w) => Some(w),
            _ => None,
        }
    }
}

/// Evidence that a proxy really handled the traffic it was measured on.
struct Evidence {
    ok: bool,
    text: String,
}

struct Row {
    s: &'static Scenario,
    direct: Cell,
    gateway: Cell,
    /// L4 scenarios: `fast_path = false`, every connection relayed.
    proxy_only: Cell,
    mitm: Cell,
    gateway_evidence: Option<Evidence>,
    mitm_evidence: Option<Evidence>,
}

pub fn bench(args: &Args) -> Result<()> {
    util::require_root("bench")?;
    prereqs::ensure(&prereqs::bench())?;
    // The origin's certificate and the interception checks.
    prereqs::ensure(&[(Bin("openssl"), "openssl", Apt), (Bin("curl"), "curl", Apt)])?;
    util::ensure_bpffs()?;
    crate::build()?;

    util::trap_interrupts();
    let secs = args.duration;
    let mut rows: Vec<Row> = SCENARIOS
        .iter()
        .filter(|s| args.only.is_empty() || args.only.contains(&s.pick))
        .map(|s| Row {
            s,
            direct: Cell::Skipped,
            gateway: Cell::Skipped,
            proxy_only: Cell::Skipped,
            mitm: Cell::Skipped,
            gateway_evidence: None,
            mitm_evidence: None,
        })
        .collect();

    let mut lab = Lab::new()?;
    lab.reuse_time_wait()?;
    lab.start_network()?;
    lab.start_nginx()?;

    // L4: the product as configured by default (allowed flows reuse their
    // decision in the kernel), then every connection through the proxy.
    if rows.iter().any(|r| !r.s.intercept) {
        let started = lab
            .start_daemon(DaemonMode::L4 { fast_path: true })
            .map_err(describe);
        for r in rows.iter_mut().filter(|r| !r.s.intercept) {
            r.direct = measure(&mut lab, r.s, Via::Direct, secs)?;
            r.gateway = measure_if(&started, &mut lab, r.s, Via::Gateway, secs)?;
        }
        let started = lab
            .start_daemon(DaemonMode::L4 { fast_path: false })
            .map_err(describe);
        for r in rows.iter_mut().filter(|r| !r.s.intercept) {
            r.proxy_only = measure_if(&started, &mut lab, r.s, Via::Gateway, secs)?;
        }
    }

    // L7: direct, the daemon with the inspecting and masking rules, then
    // mitmproxy last (its nat rule turns on connection tracking, which
    // would tax every other cell).
    let mut mitm_note = None;
    if rows.iter().any(|r| r.s.intercept) {
        for r in rows.iter_mut().filter(|r| r.s.intercept) {
            r.direct = measure(&mut lab, r.s, Via::Direct, secs)?;
        }
        let started = lab
            .ensure_gateway_ca()
            .and_then(|()| lab.start_daemon(DaemonMode::Intercept))
            .map_err(describe);
        for r in rows.iter_mut().filter(|r| r.s.intercept) {
            r.gateway = measure_if(&started, &mut lab, r.s, Via::Gateway, secs)?;
            if started.is_ok() {
                let mut ev = gateway_evidence(&lab, r.s);
                if !ev.ok
                    && let Some(line) = lab.daemon_complaint()
                {
                    let _ = write!(ev.text, "; the daemon's last log line: {line}");
                }
                r.gateway_evidence = Some(ev);
            }
        }

        let tls = rows.iter().any(|r| r.s.intercept && r.s.tls);
        match start_mitm(&lab, tls) {
            Ok((mut m, note)) => {
                mitm_note = Some(note);
                for r in rows.iter_mut().filter(|r| r.s.intercept) {
                    let before = m.redirected();
                    r.mitm = measure(&mut lab, r.s, Via::Mitm(&m), secs)?;
                    r.mitm_evidence = Some(mitm_evidence(&mut m, before, &r.mitm));
                }
            }
            Err(e) => {
                let e = describe(e);
                for r in rows.iter_mut().filter(|r| r.s.intercept) {
                    r.mitm = Cell::Failed(e.clone());
                }
            }
        }
    }
    drop(lab);

    println!("{}", table(&rows, secs, mitm_note.as_deref()));
    Ok(())
}

/// One wrk run as a cell; only an interrupt ends the benchmark.
fn measure(lab: &mut Lab, s: &Scenario, via: Via, secs: u64) -> Result<Cell> {
    let cell = match lab.wrk(s, via, secs) {
        Ok(w) => Cell::Done(w),
        Err(e) => {
            util::check_interrupted()?;
            say(format!("  failed: {e:#}"));
            Cell::Failed(describe(e))
        }
    };
    util::check_interrupted()?;
    Ok(cell)
}

/// [`measure`] when the daemon came up, its start-up error otherwise.
fn measure_if(
    started: &Result<(), String>,
    lab: &mut Lab,
    s: &Scenario,
    via: Via,
    secs: u64,
) -> Result<Cell> {
    match started {
        Ok(()) => measure(lab, s, via, secs),
        Err(e) => Ok(Cell::Failed(e.clone())),
    }
}

fn describe(e: Error) -> String {
    format!("{e:#}")
}

/// mitmproxy verifying the origin against the bench CA; if that breaks
/// the TLS check, once more with `--ssl-insecure`. Returns how it verifies.
fn start_mitm(lab: &Lab, tls: bool) -> Result<(Mitm, String)> {
    let start = |upstream| {
        Mitm::start(
            lab.dir(),
            &lab.id,
            &lab.ns_ip,
            &[PORT, TLS_PORT],
            &lab.origin_ca(),
            upstream,
        )
    };
    let trusted = format!(
        "mitmproxy verifies the origin with `--set ssl_verify_upstream_trusted_ca={}` (the bench CA)",
        lab.origin_ca().display()
    );
    let m = start(Upstream::TrustedCa)?;
    if !tls {
        return Ok((m, trusted));
    }
    let tls_row = SCENARIOS.iter().find(|s| s.tls).expect("a TLS scenario");
    let failure = match lab.curl(Via::Mitm(&m), &["-k"], tls_row) {
        Ok(out) if out.status.success() && stdout(&out).contains(CARD) => return Ok((m, trusted)),
        Ok(out) => format!(
            "{} {}",
            out.status,
            first_line(&(stdout(&out) + &last_lines(&stderr(&out), 1)))
        ),
        Err(e) => describe(e),
    };
    say(format!(
        "mitmproxy with the bench CA as upstream trust failed ({failure}); retrying with --ssl-insecure"
    ));
    drop(m);
    let m = start(Upstream::Insecure)?;
    Ok((
        m,
        format!(
            "mitmproxy runs with `--ssl-insecure`: with `ssl_verify_upstream_trusted_ca` its check \
             request failed ({failure})"
        ),
    ))
}

/// TLS: a curl through the gateway must see the masked body and a
/// certificate not issued by the origin's CA. Plain HTTP: a DELETE (which
/// nginx answers with 405) must be refused by `bench-inspect-probe`.
fn gateway_evidence(lab: &Lab, s: &Scenario) -> Evidence {
    let args: &[&str] = if s.tls {
        &["-k"]
    } else {
        &["-i", "-X", "DELETE"]
    };
    let out = match lab.curl(Via::Gateway, args, s) {
        Ok(out) => out,
        Err(e) => {
            return Evidence {
                ok: false,
                text: format!("check failed: {}", describe(e)),
            };
        }
    };
    let (body, err) = (stdout(&out), stderr(&out));
    if s.tls {
        let issuer = issuer(&err);
        if body.contains("[MASKED:") {
            Evidence {
                ok: true,
                text: format!("curl through the gateway saw a masked body ({issuer})"),
            }
        } else if body.contains(CARD) {
            Evidence {
                ok: false,
                text: format!("NOT INTERCEPTED: the card number came through unmasked ({issuer})"),
            }
        } else {
            Evidence {
                ok: false,
                text: format!(
                    "NOT INTERCEPTED: curl {} and got no masked body ({issuer}): {}",
                    out.status,
                    first_line(&(body + &last_lines(&err, 1)))
                ),
            }
        }
    } else if body.contains("Server: nginx") {
        Evidence {
            ok: false,
            text: format!(
                "NOT INSPECTED: a DELETE reached nginx ({}) although `bench-inspect-probe` blocks it",
                first_line(&body)
            ),
        }
    } else {
        let answer = if body.trim().is_empty() {
            format!("curl {}: {}", out.status, last_lines(&err, 1))
        } else {
            first_line(&body)
        };
        Evidence {
            ok: true,
            text: format!("a DELETE was refused by the gateway ({answer})"),
        }
    }
}

/// The REDIRECT rule must have caught the run's connections.
fn mitm_evidence(m: &mut Mitm, before: Result<u64>, cell: &Cell) -> Evidence {
    if let Err(e) = m.alive() {
        return Evidence {
            ok: false,
            text: describe(e),
        };
    }
    let delta = before.and_then(|b| Ok(m.redirected()? - b));
    match (delta, cell.ok()) {
        (Ok(n), Some(_)) if n >= u64::from(CONNECTIONS) => Evidence {
            ok: true,
            text: format!("iptables redirected {n} connections to mitmproxy"),
        },
        (Ok(n), _) => Evidence {
            ok: false,
            text: format!("NOT REDIRECTED: iptables redirected only {n} connections"),
        },
        (Err(e), _) => Evidence {
            ok: false,
            text: format!("cannot read the iptables counter: {}", describe(e)),
        },
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `issuer: CN=...` from `curl -v`.
fn issuer(verbose: &str) -> String {
    verbose
        .lines()
        .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix("issuer:"))
        .map_or_else(
            || "certificate issuer unknown".to_owned(),
            |i| format!("certificate issuer {}", i.trim()),
        )
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned()
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" ")
}

fn ratio(a: &Cell, b: &Cell) -> Option<f64> {
    let (a, b) = (a.ok()?, b.ok()?);
    (b.requests_per_sec > 0.0).then(|| a.requests_per_sec / b.requests_per_sec)
}

/// Cells in the table; failures get a footnote number (one per distinct
/// message, naming every cell that had it).
struct Notes(Vec<(Vec<String>, String)>);

impl Notes {
    fn rate(&mut self, c: &Cell, what: &str) -> String {
        match c {
            Cell::Skipped => "—".to_owned(),
            Cell::Done(w) => format!("{:.0}", w.requests_per_sec),
            Cell::Failed(e) => {
                let n = match self.0.iter().position(|(_, m)| m == e) {
                    Some(i) => {
                        self.0[i].0.push(what.to_owned());
                        i + 1
                    }
                    None => {
                        self.0.push((vec![what.to_owned()], e.clone()));
                        self.0.len()
                    }
                };
                let mut short = first_line(e);
                if short.chars().count() > 90 {
                    short = short.chars().take(87).collect::<String>() + "...";
                }
                format!("error [{n}]: {}", short.replace('|', "/"))
            }
        }
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "—".to_owned(), |r| format!("{r:.2}"))
}

fn errors(c: &Cell) -> String {
    c.ok()
        .map_or_else(|| "—".to_owned(), |w| w.errors().to_string())
}

fn result(r: &Row) -> String {
    if let Cell::Failed(_) = r.gateway {
        return "error".to_owned();
    }
    if let Some(ev) = &r.gateway_evidence
        && !ev.ok
    {
        return if r.s.tls {
            "NOT INTERCEPTED"
        } else {
            "NOT INSPECTED"
        }
        .to_owned();
    }
    if r.gateway.ok().is_some_and(|w| w.non_2xx > 0) {
        return "miss (non-2xx)".to_owned();
    }
    let (got, min) = match r.s.target {
        Target::Direct(t) => (ratio(&r.gateway, &r.direct), t),
        Target::Mitm(t) => {
            if r.mitm_evidence.as_ref().is_some_and(|e| !e.ok)
                || r.mitm.ok().is_some_and(|w| w.non_2xx > 0)
            {
                return "n/a (mitmproxy run invalid)".to_owned();
            }
            (ratio(&r.gateway, &r.mitm), t)
        }
    };
    match got {
        None => "n/a".to_owned(),
        Some(g) if g >= min => "pass".to_owned(),
        Some(_) => "miss".to_owned(),
    }
}

fn table(rows: &[Row], secs: u64, mitm_note: Option<&str>) -> String {
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
        "| scenario | direct req/s | gateway req/s | gateway / direct | proxy-only req/s \
         | proxy-only / direct | mitmproxy req/s | mitmproxy / direct | gateway / mitmproxy \
         | target | result | direct / gateway MiB/s | errors direct / gateway / proxy-only / mitmproxy |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|\n");
    let mut notes = Notes(Vec::new());
    for r in rows {
        let target = match r.s.target {
            Target::Direct(t) => format!("≥{t:.2}× direct"),
            Target::Mitm(t) => format!("≥{t:.0}× mitmproxy"),
        };
        let mib = |c: &Cell| {
            c.ok().map_or_else(
                || "—".to_owned(),
                |w| format!("{:.1}", w.bytes_per_sec / MIB),
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {target} | {} | {} / {} | {} / {} / {} / {} |",
            r.s.name,
            notes.rate(&r.direct, &format!("{}, direct", r.s.name)),
            notes.rate(&r.gateway, &format!("{}, gateway", r.s.name)),
            fmt_ratio(ratio(&r.gateway, &r.direct)),
            notes.rate(&r.proxy_only, &format!("{}, proxy-only", r.s.name)),
            fmt_ratio(ratio(&r.proxy_only, &r.direct)),
            notes.rate(&r.mitm, &format!("{}, mitmproxy", r.s.name)),
            fmt_ratio(ratio(&r.mitm, &r.direct)),
            fmt_ratio(ratio(&r.gateway, &r.mitm)),
            result(r),
            mib(&r.direct),
            mib(&r.gateway),
            errors(&r.direct),
            errors(&r.gateway),
            errors(&r.proxy_only),
            errors(&r.mitm),
        );
    }
    out.push('\n');
    if rows.iter().any(|r| !r.s.intercept) {
        out.push_str(
            "\"gateway\" on the plain rows: the default configuration, where a flow the proxy \
             allowed at L4 connects direct (still audited) for 30 s; \"proxy-only\": \
             `fast_path = false`, every connection relayed by the proxy.\n",
        );
    }
    if rows.iter().any(|r| r.s.intercept) {
        let _ = writeln!(
            out,
            "\"gateway\" on the interception rows: rules `bench-inspect` (port {PORT}, \
             methods = [\"GET\"]) and `bench-mask` (port {TLS_PORT}, mask = [\"credit_card\", \
             \"email\"]), then `bench-inspect-probe` (port {PORT}, methods = [\"DELETE\"], \
             block) for the inspection check only; `[interception] upstream_ca_files` = the \
             bench CA. \"mitmproxy\": mitmdump 8.1 --mode transparent behind an iptables nat \
             OUTPUT REDIRECT matching wrk's cgroup; its upstream connections are not redirected."
        );
        if let Some(note) = mitm_note {
            let _ = writeln!(out, "{note}.");
        }
    }
    for r in rows {
        for (who, ev) in [
            ("gateway", &r.gateway_evidence),
            ("mitmproxy", &r.mitm_evidence),
        ] {
            if let Some(ev) = ev {
                let _ = writeln!(out, "- {}, {who}: {}", r.s.name, ev.text);
            }
        }
    }
    for (i, (cells, message)) in notes.0.iter().enumerate() {
        let _ = writeln!(out, "\n[{}] {}: {message}", i + 1, cells.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(10));
        assert_eq!(parse_duration("2m"), Ok(120));
        assert_eq!(parse_duration("7"), Ok(7));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
    }

    fn done(rps: f64, non_2xx: u64) -> Cell {
        Cell::Done(Wrk {
            requests_per_sec: rps,
            bytes_per_sec: 0.0,
            non_2xx,
            socket_errors: 0,
        })
    }

    fn row(s: &'static Scenario) -> Row {
        Row {
            s,
            direct: Cell::Skipped,
            gateway: Cell::Skipped,
            proxy_only: Cell::Skipped,
            mitm: Cell::Skipped,
            gateway_evidence: None,
            mitm_evidence: None,
        }
    }

    #[test]
    fn results() {
        let tls = &SCENARIOS[4];
        let mut r = row(tls);
        r.direct = done(20000.0, 0);
        r.gateway = done(8000.0, 0);
        r.mitm = done(500.0, 0);
        assert_eq!(result(&r), "pass");
        r.mitm = done(900.0, 0);
        assert_eq!(result(&r), "miss");
        r.gateway_evidence = Some(Evidence {
            ok: false,
            text: String::new(),
        });
        assert_eq!(result(&r), "NOT INTERCEPTED");
        r.gateway = Cell::Failed("unknown field `interception`".into());
        assert_eq!(result(&r), "error");

        let mut r = row(&SCENARIOS[3]);
        r.direct = done(20000.0, 0);
        r.gateway = done(9000.0, 0);
        assert_eq!(result(&r), "miss");
        r.gateway = done(11000.0, 3);
        assert_eq!(result(&r), "miss (non-2xx)");
    }

    #[test]
    fn failed_cells_get_footnotes() {
        let mut r = row(&SCENARIOS[4]);
        r.direct = done(20000.0, 0);
        r.gateway = Cell::Failed("the daemon exited: unknown field | `mask`\nmore".into());
        r.mitm = Cell::Failed("the daemon exited: unknown field | `mask`\nmore".into());
        let t = table(&[r], 3, None);
        assert!(t.contains("| error [1]: the daemon exited: unknown field / `mask` |"));
        assert!(!t.contains("[2]"));
        assert!(
            t.contains("[1] TLS intercepted, masking on, keep-alive, 1.5 KiB JSON, gateway; TLS")
        );
        assert!(t.contains("\nmore"));
    }

    #[test]
    fn curl_issuer() {
        let v = "*  subject: CN=10.1.2.3\n*  issuer: CN=mitmproxy; O=mitmproxy\n";
        assert_eq!(issuer(v), "certificate issuer CN=mitmproxy; O=mitmproxy");
        assert_eq!(issuer(""), "certificate issuer unknown");
    }
}
