//! `gw-probe`: the client and origin programs of the end-to-end tests.
//!
//! Every client subcommand prints one JSON line with what a user would see
//! (errno and its name, bytes received, getpeername, elapsed time) plus its
//! own pid and cgroup, and exits 0 when the operation succeeded, 1 when it
//! failed, 2 on bad usage. The servers print one JSON line per event.
//!
//! ```text
//! gw-probe tcp ADDR [--send TEXT]
//! gw-probe many --count N ADDR...
//! gw-probe udp ADDR [--connect]
//! gw-probe raw
//! gw-probe dns NAME SERVER:PORT
//! gw-probe netns-connect ADDR [--setns /run/netns/NAME]
//! gw-probe repl                       (commands on stdin, one result per line)
//! gw-probe exit CODE
//! gw-probe serve --bind IP [--bind IP]... --ports A-B
//! gw-probe serve-dns --bind IP:PORT [--answer NAME=IP]...
//! ```

mod client;
mod serve;

use serde_json::{Value, json};
use std::io::Write;

fn usage() -> ! {
    eprintln!(
        "usage: gw-probe tcp|many|udp|raw|dns|netns-connect|repl|exit|serve|serve-dns ... \
         (see tests/src/bin/gw-probe/main.rs)"
    );
    std::process::exit(2)
}

/// Print a result line and flush (stdout may be a pipe).
fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Raise the open-file limit to the hard limit: `many` and `serve` hold
/// hundreds of sockets at once.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The value following `flag`, wherever it is; removes both from `args`.
fn take_opt(args: &mut Vec<String>, flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    if i + 1 >= args.len() {
        usage();
    }
    args.remove(i);
    Some(args.remove(i))
}

fn take_all(args: &mut Vec<String>, flag: &str) -> Vec<String> {
    std::iter::from_fn(|| take_opt(args, flag)).collect()
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    match args.iter().position(|a| a == flag) {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    }
}

fn parse<T: std::str::FromStr>(s: &str) -> T {
    s.parse().unwrap_or_else(|_| {
        eprintln!("gw-probe: cannot parse {s:?}");
        usage()
    })
}

fn main() {
    raise_nofile();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        usage();
    }
    let cmd = args.remove(0);
    let result = match cmd.as_str() {
        "tcp" => {
            let send = take_opt(&mut args, "--send").unwrap_or_default();
            let [addr] = args.as_slice() else { usage() };
            client::tcp(parse(addr), &send)
        }
        "many" => {
            let count: usize = parse(&take_opt(&mut args, "--count").unwrap_or_else(|| usage()));
            if args.is_empty() {
                usage();
            }
            client::many(count, &args.iter().map(|a| parse(a)).collect::<Vec<_>>())
        }
        "udp" => {
            let connect = take_flag(&mut args, "--connect");
            let [addr] = args.as_slice() else { usage() };
            client::udp(parse(addr), connect)
        }
        "raw" => client::raw(),
        "dns" => {
            let [name, server] = args.as_slice() else {
                usage()
            };
            client::dns(name, parse(server))
        }
        "netns-connect" => {
            let setns = take_opt(&mut args, "--setns");
            let [addr] = args.as_slice() else { usage() };
            client::netns_connect(parse(addr), setns.as_deref())
        }
        "repl" => {
            client::repl();
            return;
        }
        "exit" => {
            let [code] = args.as_slice() else { usage() };
            std::process::exit(parse(code));
        }
        "serve" => {
            let binds = take_all(&mut args, "--bind");
            let ports = take_opt(&mut args, "--ports").unwrap_or_else(|| usage());
            let (a, b) = ports.split_once('-').unwrap_or((&ports, &ports));
            if binds.is_empty() || !args.is_empty() {
                usage();
            }
            let binds: Vec<_> = binds.iter().map(|b| parse(b)).collect();
            serve::tcp(&binds, parse(a)..=parse(b))
        }
        "serve-dns" => {
            let binds = take_all(&mut args, "--bind");
            let answers = take_all(&mut args, "--answer");
            if binds.is_empty() || !args.is_empty() {
                usage();
            }
            let answers = answers
                .iter()
                .map(|a| {
                    let (n, ip) = a.split_once('=').unwrap_or_else(|| usage());
                    (n.to_owned(), parse(ip))
                })
                .collect();
            serve::dns(&binds.iter().map(|b| parse(b)).collect::<Vec<_>>(), answers)
        }
        _ => usage(),
    };
    let ok = result["ok"] == json!(true);
    emit(&result);
    std::process::exit(if ok { 0 } else { 1 });
}
