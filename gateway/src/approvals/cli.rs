//! `gateway approvals list | show ID | approve ID | deny ID`: the approver's
//! side, over the admin socket. Deciding needs the approver's OIDC token
//! (`--token-file FILE`, `-` for stdin, or `GATEWAY_TOKEN`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::admin;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Pending approvals (and the windows in force).
    List {
        #[arg(long)]
        json: bool,
    },
    /// One pending approval in full: requester, rule, request summary.
    Show { id: String },
    /// Let the held request through, once or for a window.
    Approve {
        id: String,
        /// Also let this identity pass this rule without asking for MINUTES.
        #[arg(long, value_name = "MINUTES")]
        window: Option<u64>,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Refuse the held request (the client gets a 403 naming the approval).
    Deny {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        token: TokenArg,
    },
}

#[derive(Debug, clap::Args)]
pub struct TokenArg {
    /// The approver's OIDC token (a JWT); `-` reads stdin. Default: $GATEWAY_TOKEN.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl TokenArg {
    fn read(&self) -> anyhow::Result<String> {
        let token = match &self.token_file {
            Some(p) if p.as_os_str() == "-" => {
                std::io::read_to_string(std::io::stdin()).context("reading the token from stdin")?
            }
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("reading the token file {}", p.display()))?,
            None => std::env::var("GATEWAY_TOKEN").map_err(|_| {
                anyhow::anyhow!(
                    "an approver proves who they are with an OIDC token: pass --token-file FILE or set GATEWAY_TOKEN"
                )
            })?,
        };
        Ok(token.trim().to_string())
    }
}

pub fn run(socket: &Path, cmd: Cmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ask = |req: Value| rt.block_on(admin::request(socket, &req));
    match cmd {
        Cmd::List { json } => {
            let reply = ask(json!({"cmd": "approvals_list"}))?;
            if json {
                println!("{reply}");
            } else {
                print_list(&reply);
            }
        }
        Cmd::Show { id } => {
            let reply = ask(json!({"cmd": "approvals_show", "id": id}))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&reply["approval"]).unwrap_or_default()
            );
        }
        Cmd::Approve { id, window, token } => {
            let reply = ask(json!({
                "cmd": "approvals_decide", "id": id, "verdict": "approve",
                "window_minutes": window, "token": token.read()?,
            }))?;
            match reply["window_minutes"].as_u64() {
                Some(m) => println!(
                    "approved {id} for a window of {m} minutes: {} may pass rule {} without asking until then",
                    text(&reply["requester"]),
                    text(&reply["rule"])
                ),
                None => println!(
                    "approved {id} (once): the request of {} under rule {} goes ahead",
                    text(&reply["requester"]),
                    text(&reply["rule"])
                ),
            }
        }
        Cmd::Deny { id, reason, token } => {
            let reply = ask(json!({
                "cmd": "approvals_decide", "id": id, "verdict": "deny",
                "reason": reason, "token": token.read()?,
            }))?;
            println!(
                "denied {id}: {} gets a 403 ({})",
                text(&reply["requester"]),
                text(&reply["reason"])
            );
        }
    }
    Ok(())
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn print_list(reply: &Value) {
    let empty = Vec::new();
    let list = reply["approvals"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        println!("no pending approvals");
    }
    for a in list {
        let r = &a["request"];
        let what = if text(&r["kind"]) == "http" {
            format!(
                "{} {}{}",
                text(&r["method"]),
                text(&r["host"]),
                text(&r["path"])
            )
        } else {
            format!("connect {} ({})", text(&r["host"]), text(&r["destination"]))
        };
        println!(
            "{}  rule {}  {} ({})  {}  expires {}",
            text(&a["id"]),
            text(&a["rule"]),
            text(&a["requester"]["identity"]),
            text(&a["requester"]["subject"]),
            what,
            a["expires_unix"]
        );
    }
    for w in reply["windows"].as_array().unwrap_or(&empty) {
        println!(
            "window {}: {} ({}) may pass rule {} until {} (granted by {})",
            text(&w["approval_id"]),
            text(&w["identity"]),
            text(&w["subject"]),
            text(&w["rule"]),
            w["until_unix"],
            text(&w["approver"])
        );
    }
}
