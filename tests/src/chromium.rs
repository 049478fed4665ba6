//! Real headless Chromium, driven over the DevTools protocol, for tests that
//! need what a browser really does: resolve names itself, open its own
//! connections, check certificates against its own trust store (the NSS
//! database in `$HOME/.pki/nssdb`), run the page's JavaScript (`fetch()`,
//! WebSocket) and show the result in the DOM.
//!
//! The browser is configured for nothing: no proxy, certificate or resolver
//! flag is ever passed, and [`flags`] is the whole command line. A test
//! gives it a fresh home ([`BrowserHome`], where it may trust a CA) and a way
//! to start it ([`Browser::launch`]'s `wrap`, e.g. `gateway exec` into a
//! tagged cgroup via `Daemon::exec`).
//!
//! Transport: `--remote-debugging-pipe`, the DevTools protocol as
//! NUL-terminated JSON on file descriptors 3 (commands to Chromium) and 4
//! (answers and events). No TCP port is opened, so nothing else can attach
//! and the test's connection cannot be confused with the page's traffic. A
//! wrapper between the test and Chromium (such as `gateway exec`) must pass
//! descriptors 3 and 4 through, as exec does by default.
//!
//! Waiting is deterministic: [`Browser::load`] navigates, waits for the
//! navigation to commit, then polls a page-defined condition (a JavaScript
//! expression, e.g. `document.title === 'done'`) until it holds or the
//! deadline passes. Failures come back as `Err` carrying Chromium's own
//! error (`net::ERR_CERT_AUTHORITY_INVALID`, `net::ERR_CONNECTION_REFUSED`,
//! ...).
//!
//! Chromium runs in a process group of its own; dropping the [`Browser`]
//! closes it over the protocol, kills whatever is left (the group, and
//! crashpad's handlers, which leave the group but name the per-browser
//! profile directory), reaps it and removes the profile directory.

use crate::{TempDir, cgroup};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The Chromium launcher as installed by Debian's `chromium` package.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// From launch to the first DevTools answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// A single DevTools command outside `load`.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// From `Browser.close` until every process of the group is gone.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed load waits for the certificate Chromium refused.
const CERT_STATE_TIMEOUT: Duration = Duration::from_secs(2);

/// The whole command line: headless, as root (`--no-sandbox`), no
/// background traffic of its own, a fresh profile, DevTools over the pipe.
pub fn flags(user_data_dir: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        // Containers often have a tiny /dev/shm.
        "--disable-dev-shm-usage",
        "--remote-debugging-pipe",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        format!("--user-data-dir={}", user_data_dir.display()),
        "about:blank".to_owned(),
    ])
    .collect()
}

/// `wrap` for [`Browser::launch`] that runs Chromium directly.
pub fn direct(program: &str, args: Vec<String>) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// A fresh `$HOME` for Chromium with an empty NSS database in
/// `.pki/nssdb`: the only certificate store Chromium on Linux adds to its
/// built-in roots. Removed on drop.
#[derive(Debug)]
pub struct BrowserHome {
    dir: TempDir,
}

impl BrowserHome {
    pub fn new() -> BrowserHome {
        let home = BrowserHome {
            dir: TempDir::new(),
        };
        let db = home.nssdb();
        std::fs::create_dir_all(&db)
            .unwrap_or_else(|e| panic!("create NSS database dir {}: {e}", db.display()));
        certutil(&["-N", "--empty-password", "-d", &home.sql()]);
        home
    }

    /// The directory to use as `$HOME`.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `$HOME/.pki/nssdb`, e.g. for `gateway ca trust --nssdb`.
    pub fn nssdb(&self) -> PathBuf {
        self.path().join(".pki").join("nssdb")
    }

    fn sql(&self) -> String {
        format!("sql:{}", self.nssdb().display())
    }

    /// Trust the CA certificate in `pem` for TLS servers (`certutil -A -t C,,`).
    /// Chromium reads the database at start: trust before `launch`.
    pub fn trust_ca(&self, pem: &Path, nickname: &str) {
        let pem = pem.to_string_lossy();
        certutil(&[
            "-A",
            "-n",
            nickname,
            "-t",
            "C,,",
            "-i",
            &pem,
            "-d",
            &self.sql(),
        ]);
    }

    /// `certutil -L`: the certificates in the database and their trust.
    pub fn certificates(&self) -> String {
        certutil(&["-L", "-d", &self.sql()])
    }
}

impl Default for BrowserHome {
    fn default() -> Self {
        Self::new()
    }
}

fn certutil(args: &[&str]) -> String {
    let out = Command::new("certutil")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run certutil ({e}); install it with `apt-get install libnss3-tools`")
        });
    assert!(
        out.status.success(),
        "`certutil {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A request of the current page that did not complete
/// (`Network.loadingFailed`).
#[derive(Debug, Clone)]
pub struct FailedRequest {
    pub url: String,
    /// Chromium's error, e.g. `net::ERR_CONNECTION_RESET`.
    pub error: String,
    /// The resource type: `Document`, `Fetch`, `WebSocket`, `Image`, ...
    pub kind: String,
    request_id: String,
}

/// What the browser reported about the page since the last navigation.
#[derive(Debug, Default)]
struct PageState {
    /// Main-frame navigations that committed, by loader id.
    committed: HashSet<String>,
    /// `Document` responses by request id (the main one's is its loader id).
    documents: HashMap<String, Value>,
    /// Request URLs by request id.
    requests: HashMap<String, String>,
    failed: Vec<FailedRequest>,
    /// The `certificateSecurityState` of a certificate Chromium refused.
    security: Option<Value>,
    console: Vec<String>,
    crashed: Option<String>,
}

/// Result of one `Runtime.evaluate`: the outer error is the transport (the
/// browser is gone or silent), the inner one the page's exception.
type Evaluated = Result<Result<Value, String>, String>;

/// A headless Chromium with one page attached over the DevTools protocol.
pub struct Browser {
    child: Child,
    /// The process group: the launched program's pid.
    pgid: i32,
    to_browser: Option<File>,
    from_browser: Receiver<Value>,
    reader: Option<JoinHandle<()>>,
    next_id: u64,
    session: String,
    browser_pid: u32,
    /// Loader id of the current navigation.
    loader: Option<String>,
    page: PageState,
    log_path: PathBuf,
    /// User-data dir and Chromium's output; removed after the processes.
    profile: TempDir,
}

impl Browser {
    /// Start Chromium with `home` as `$HOME`. `wrap` gets the program and
    /// its arguments and returns the command to run: [`direct`], or
    /// `|p, a| daemon.exec("t1", p, a)` to start it in a tagged cgroup.
    /// Panics (after cleaning up) when Chromium does not come up.
    pub fn launch(home: &BrowserHome, wrap: impl FnOnce(&str, Vec<String>) -> Command) -> Browser {
        let profile = TempDir::new();
        let log_path = profile.path().join("chromium.log");
        let mut cmd = wrap(CHROMIUM, flags(&profile.path().join("user-data")));
        // HOME for the NSS database; the XDG dirs (where crashpad keeps its
        // database) per browser, so its processes can be told apart.
        let p = profile.path();
        cmd.env("HOME", home.path())
            .env("XDG_CONFIG_HOME", p.join("config"))
            .env("XDG_CACHE_HOME", p.join("cache"))
            .env("XDG_DATA_HOME", p.join("data"));
        let log = File::create(&log_path).expect("create chromium log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup chromium log"))
            .stderr(log)
            .process_group(0);

        let (to_read, to_write) = cloexec_pipe();
        let (from_read, from_write) = cloexec_pipe();
        // The child's ends, numbered above 4 so that moving them to 3 and 4
        // cannot overwrite one with the other.
        let child_in = dup_above(&to_read, 10);
        let child_out = dup_above(&from_write, 10);
        drop((to_read, from_write));
        let (fd_in, fd_out) = (child_in.as_raw_fd(), child_out.as_raw_fd());
        // SAFETY: dup2 is async-signal-safe; both descriptors stay open in
        // the parent until spawn returns. dup2 leaves the copies without
        // CLOEXEC, so they survive exec (and any wrapper's exec).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd_in, 3) < 0 || libc::dup2(fd_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        drop((child_in, child_out));

        let (tx, rx) = mpsc::channel();
        let from = File::from(from_read);
        let reader = std::thread::spawn(move || read_messages(from, tx));
        let mut b = Browser {
            pgid: child.id() as i32,
            child,
            to_browser: Some(File::from(to_write)),
            from_browser: rx,
            reader: Some(reader),
            next_id: 0,
            session: String::new(),
            browser_pid: 0,
            loader: None,
            page: PageState::default(),
            log_path,
            profile,
        };
        if let Err(e) = b.attach() {
            panic!("Chromium did not come up: {e}{}", b.log_tail());
        }
        b
    }

    fn attach(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let info = self.call(false, "SystemInfo.getProcessInfo", json!({}), deadline)?;
        self.browser_pid =
            process_of(&info, "browser").ok_or_else(|| format!("no browser process in {info}"))?;
        let target = self.call(
            false,
            "Target.createTarget",
            json!({"url": "about:blank"}),
            deadline,
        )?;
        let attached = self.call(
            false,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
            deadline,
        )?;
        self.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session id in {attached}"))?
            .to_owned();
        for domain in ["Inspector", "Page", "Network", "Runtime", "Security"] {
            self.call(true, &format!("{domain}.enable"), json!({}), deadline)?;
        }
        Ok(())
    }

    /// Navigate to `url` and wait until `done_when` (a JavaScript
    /// expression evaluated in the page) is truthy; then return the DOM
    /// (`document.documentElement.outerHTML`). `Err` when the navigation
    /// fails (the message starts with Chromium's `net::ERR_...`), when
    /// Chromium shows its error page, or when the deadline passes; the
    /// message then also says what the page did (failed requests, console,
    /// exceptions).
    pub fn load(
        &mut self,
        url: &str,
        done_when: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        self.drain();
        self.page = PageState::default();
        self.loader = None;
        let nav = self.call(true, "Page.navigate", json!({"url": url}), deadline)?;
        self.loader = nav["loaderId"].as_str().map(str::to_owned);
        if let Some(err) = nav["errorText"].as_str().filter(|e| !e.is_empty()) {
            if err.contains("CERT") || err.contains("SSL") {
                // The refused certificate arrives as a security-state event
                // right after: wait for it, so `main_cert_issuer` can tell.
                let until = deadline.min(Instant::now() + CERT_STATE_TIMEOUT);
                self.pump_until(until, |p| p.security.is_some());
            }
            return Err(format!("{err} loading {url}{}", self.report()));
        }
        if let Some(loader) = self.loader.clone()
            && !self.pump_until(deadline, |p| p.committed.contains(&loader))
        {
            return Err(format!(
                "the navigation to {url} did not commit within {timeout:?}{}",
                self.report()
            ));
        }
        let check = format!(
            "(() => {{ if (location.protocol === 'chrome-error:') return 'error'; \
             return ({done_when}) ? 'done' : 'waiting'; }})()"
        );
        let mut pause = Duration::from_millis(1);
        loop {
            let evaluated = self.evaluate(&check, deadline).map_err(|e| {
                if Instant::now() >= deadline {
                    format!("timed out after {timeout:?} waiting for `{done_when}` on {url}: {e}")
                } else {
                    e
                }
            });
            let last = match evaluated? {
                Ok(v) if v == "done" => break,
                Ok(v) if v == "error" => {
                    let err = self
                        .document_error()
                        .unwrap_or_else(|| "net::ERR_FAILED".to_owned());
                    return Err(format!(
                        "{err} loading {url} (Chromium shows its error page){}",
                        self.report()
                    ));
                }
                Ok(v) => v.to_string(),
                Err(exception) => exception,
            };
            if let Some(crash) = self.page.crashed.clone() {
                return Err(format!("{crash} while loading {url}{}", self.report()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for `{done_when}` on {url} \
                     (last check: {last}){}",
                    self.report()
                ));
            }
            // Handle events while waiting for the next check.
            let until = deadline.min(Instant::now() + pause);
            self.pump_until(until, |p| p.crashed.is_some());
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        match self.eval("document.documentElement.outerHTML")? {
            Value::String(html) => Ok(html),
            other => Err(format!("outerHTML is not a string: {other}")),
        }
    }

    /// The value of a JavaScript expression in the page (promises are
    /// awaited); `Err` for an exception or when the browser is gone.
    pub fn eval(&mut self, expr: &str) -> Result<Value, String> {
        self.evaluate(expr, Instant::now() + CALL_TIMEOUT)?
    }

    fn evaluate(&mut self, expr: &str, deadline: Instant) -> Evaluated {
        let r = self.call(
            true,
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            deadline,
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            let what = ex["exception"]["description"]
                .as_str()
                .or(ex["text"].as_str())
                .unwrap_or("exception");
            return Ok(Err(format!("`{expr}` threw: {what}")));
        }
        Ok(Ok(r["result"].get("value").cloned().unwrap_or(Value::Null)))
    }

    /// The main document's response (`Network.Response`: `status`,
    /// `remoteIPAddress`, `remotePort`, `securityDetails`, ...), once the
    /// current page has one.
    pub fn main_response(&self) -> Option<&Value> {
        self.page.documents.get(self.loader.as_ref()?)
    }

    /// The certificate Chromium got for the main document: the response's
    /// `securityDetails` (`subjectName`, `issuer`, `sanList`, `protocol`,
    /// ...), or for a refused certificate the page's security state, which
    /// has the same fields plus `certificateNetworkError`.
    pub fn main_security(&self) -> Option<&Value> {
        self.main_response()
            .and_then(|r| r.get("securityDetails"))
            .or(self.page.security.as_ref())
    }

    /// Common name of the issuer of the main document's certificate.
    pub fn main_cert_issuer(&self) -> Option<String> {
        self.main_security()?["issuer"].as_str().map(str::to_owned)
    }

    /// Subject common name of the main document's certificate.
    pub fn main_cert_subject(&self) -> Option<String> {
        self.main_security()?["subjectName"]
            .as_str()
            .map(str::to_owned)
    }

    /// Requests of the current page that failed, so far.
    pub fn failed_requests(&mut self) -> Vec<FailedRequest> {
        self.drain();
        self.page.failed.clone()
    }

    /// Console messages and uncaught exceptions of the current page, so far.
    pub fn console(&mut self) -> Vec<String> {
        self.drain();
        self.page.console.clone()
    }

    /// The browser process (the one `Browser.close` ends).
    pub fn pid(&self) -> u32 {
        self.browser_pid
    }

    /// `(type, pid)` of every Chromium process: `browser`, `renderer`,
    /// `GPU`, `network.mojom.NetworkService`, ...
    pub fn processes(&mut self) -> Result<Vec<(String, u32)>, String> {
        let info = self.call(
            false,
            "SystemInfo.getProcessInfo",
            json!({}),
            Instant::now() + CALL_TIMEOUT,
        )?;
        Ok(info["processInfo"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["type"].as_str()?.to_owned(), p["id"].as_u64()? as u32)))
            .collect())
    }

    /// The network service process: the one whose sockets carry the page's
    /// traffic (and its DNS queries).
    pub fn network_pid(&mut self) -> Result<u32, String> {
        let all = self.processes()?;
        all.iter()
            .find(|(t, _)| t == "network.mojom.NetworkService")
            .map(|(_, pid)| *pid)
            .ok_or_else(|| format!("no network service among {all:?}"))
    }

    /// The browser's executable, resolved (`/proc/<pid>/exe`).
    pub fn exe(&self) -> PathBuf {
        std::fs::read_link(format!("/proc/{}/exe", self.browser_pid))
            .unwrap_or_else(|e| panic!("read /proc/{}/exe: {e}", self.browser_pid))
    }

    /// The browser's cgroup as the kernel names it (`/a/b`).
    pub fn cgroup(&self) -> String {
        cgroup::cgroup_of(self.browser_pid)
            .unwrap_or_else(|| panic!("no cgroup for Chromium pid {}", self.browser_pid))
    }

    /// Chromium's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("dbus")).collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n  ");
        format!("\n  chromium output (last lines, dbus noise left out):\n  {tail}")
    }

    /// What the page did, for error messages.
    fn report(&mut self) -> String {
        self.drain();
        let mut s = String::new();
        if let Some(r) = self.main_response() {
            s += &format!(
                "\n  main document: HTTP {} from {}:{}",
                r["status"], r["remoteIPAddress"], r["remotePort"]
            );
        }
        if let Some(sec) = self.main_security() {
            s += &format!(
                "\n  certificate: subject {} issuer {} {}",
                sec["subjectName"], sec["issuer"], sec["certificateNetworkError"]
            );
        }
        for f in &self.page.failed {
            s += &format!("\n  failed {} {}: {}", f.kind, f.url, f.error);
        }
        for c in &self.page.console {
            s += &format!("\n  console: {c}");
        }
        s + &self.log_tail()
    }

    /// Chromium's error for the current main document, if it failed.
    fn document_error(&self) -> Option<String> {
        let loader = self.loader.as_deref();
        self.page
            .failed
            .iter()
            .rev()
            .find(|f| Some(f.request_id.as_str()) == loader)
            .or_else(|| self.page.failed.iter().rev().find(|f| f.kind == "Document"))
            .map(|f| f.error.clone())
    }

    /// Send one command and wait for its answer, handling the events that
    /// arrive meanwhile.
    fn call(
        &mut self,
        in_session: bool,
        method: &str,
        params: Value,
        deadline: Instant,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if in_session {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("serialize DevTools command");
        bytes.push(0);
        let Some(pipe) = self.to_browser.as_mut() else {
            return Err("the DevTools pipe is closed".into());
        };
        if let Err(e) = pipe.write_all(&bytes) {
            return Err(format!(
                "cannot send {method} to Chromium ({e}): {}",
                self.exit_state()
            ));
        }
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(wait) {
                Ok(m) if m["id"] == id => {
                    return match m.get("error") {
                        Some(err) => Err(format!("{method} failed: {err}")),
                        None => Ok(m["result"].clone()),
                    };
                }
                Ok(m) => self.on_message(m),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("Chromium did not answer {method} in time"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "Chromium closed the DevTools pipe while {method} was pending: {}",
                        self.exit_state()
                    ));
                }
            }
        }
    }

    fn exit_state(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(status)) => format!("the launched command exited ({status})"),
            _ => "the launched command still runs".to_owned(),
        }
    }

    /// Handle events until `done` holds or the deadline passes; returns
    /// whether `done` holds.
    fn pump_until(&mut self, deadline: Instant, done: impl Fn(&PageState) -> bool) -> bool {
        loop {
            if done(&self.page) {
                return true;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(wait) {
                Ok(m) => self.on_message(m),
                Err(_) => return done(&self.page),
            }
        }
    }

    /// Handle the events already received.
    fn drain(&mut self) {
        while let Ok(m) = self.from_browser.try_recv() {
            self.on_message(m);
        }
    }

    fn on_message(&mut self, m: Value) {
        // Answers to commands whose wait was given up.
        let Some(method) = m["method"].as_str() else {
            return;
        };
        if m.get("sessionId").is_some() && m["sessionId"] != self.session.as_str() {
            return;
        }
        let p = &m["params"];
        let page = &mut self.page;
        match method {
            "Page.frameNavigated" => {
                let frame = &p["frame"];
                if frame.get("parentId").is_none()
                    && let Some(loader) = frame["loaderId"].as_str()
                {
                    page.committed.insert(loader.to_owned());
                }
            }
            "Network.requestWillBeSent" => {
                if let (Some(id), Some(url)) =
                    (p["requestId"].as_str(), p["request"]["url"].as_str())
                {
                    page.requests.insert(id.to_owned(), url.to_owned());
                }
            }
            "Network.responseReceived" => {
                if p["type"] == "Document"
                    && let Some(id) = p["requestId"].as_str()
                {
                    page.documents.insert(id.to_owned(), p["response"].clone());
                }
            }
            "Network.loadingFailed" => {
                let id = p["requestId"].as_str().unwrap_or_default().to_owned();
                let mut error = p["errorText"].as_str().unwrap_or_default().to_owned();
                if let Some(why) = p["blockedReason"].as_str() {
                    error += &format!(" (blocked: {why})");
                }
                page.failed.push(FailedRequest {
                    url: page.requests.get(&id).cloned().unwrap_or_default(),
                    error,
                    kind: p["type"].as_str().unwrap_or_default().to_owned(),
                    request_id: id,
                });
            }
            "Security.visibleSecurityStateChanged" => {
                // Only a refused certificate: an accepted one comes with the
                // response, and a late event of the previous page must not
                // pass for this one's.
                if let Some(cert) = p["visibleSecurityState"].get("certificateSecurityState")
                    && cert.get("certificateNetworkError").is_some()
                {
                    page.security = Some(cert.clone());
                }
            }
            "Runtime.consoleAPICalled" => {
                let args: Vec<String> = p["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| match (&a["value"], a["description"].as_str()) {
                        (Value::String(s), _) => s.clone(),
                        (Value::Null, Some(d)) => d.to_owned(),
                        (v, _) => v.to_string(),
                    })
                    .collect();
                page.console.push(format!(
                    "{}: {}",
                    p["type"].as_str().unwrap_or("log"),
                    args.join(" ")
                ));
            }
            "Runtime.exceptionThrown" => {
                let ex = &p["exceptionDetails"];
                let what = ex["exception"]["description"]
                    .as_str()
                    .or(ex["text"].as_str())
                    .unwrap_or("exception");
                page.console.push(format!("uncaught: {what}"));
            }
            "Inspector.targetCrashed" => {
                page.crashed = Some("the page's renderer crashed".to_owned());
            }
            "Inspector.detached" => {
                page.crashed = Some(format!(
                    "DevTools was detached from the page ({})",
                    p["reason"].as_str().unwrap_or("no reason given")
                ));
            }
            _ => {}
        }
    }

    /// Live (not zombie) processes of this browser: its process group, and
    /// whatever left the group (crashpad's handlers call `setsid`) but names
    /// the profile directory on its command line.
    fn processes_left(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| match proc_state(pid) {
                Some((state, pgrp)) if state != "Z" && state != "X" => {
                    pgrp == self.pgid || self.names_profile(pid)
                }
                _ => false,
            })
            .collect()
    }

    fn names_profile(&self, pid: u32) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let profile = self.profile.path().as_os_str().as_encoded_bytes();
        cmdline.windows(profile.len()).any(|w| w == profile)
    }

    /// SIGKILL what is left: the group, and each straggler outside it
    /// through a pidfd, after checking (on the pidfd's process) that it
    /// still names the profile.
    fn kill_left(&self) {
        // SAFETY: plain kill(2); the group id is held by the unreaped
        // leader or by live members.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        for pid in self.processes_left() {
            // SAFETY: pidfd_open and pidfd_send_signal on a pid we just saw;
            // the fd pins the process, so the check below is about it.
            unsafe {
                let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
                if fd < 0 {
                    continue;
                }
                if self.names_profile(pid) {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd,
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
                libc::close(fd);
            }
        }
    }

    /// Whether the launched command has exited, without reaping it: while
    /// it is an unreaped zombie its pid, the group id, cannot be reused, so
    /// signalling the group cannot hit a stranger.
    fn leader_exited(&self) -> bool {
        // SAFETY: waitid writes into the zeroed siginfo we own.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.pgid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r != 0 || info.si_pid() != 0
        }
    }

    fn all_gone(&self) -> bool {
        self.leader_exited() && self.processes_left().is_empty()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask Chromium to quit: it ends its children, and a wrapper such as
        // `gateway exec` then cleans up after it.
        if self.to_browser.is_some() && !self.leader_exited() {
            let _ = self.call(
                false,
                "Browser.close",
                json!({}),
                Instant::now() + CLOSE_TIMEOUT,
            );
        }
        let gone = || self.all_gone().then_some(());
        if crate::poll(CLOSE_TIMEOUT, gone).is_none() {
            self.kill_left();
            if crate::poll(CLOSE_TIMEOUT, gone).is_none() {
                eprintln!(
                    "gateway-tests: Chromium processes {:?} survived SIGKILL",
                    self.processes_left()
                );
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Every writer of the answer pipe is gone: the reader sees EOF.
        self.to_browser = None;
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        loop {
            match self
                .from_browser
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    if let Some(r) = self.reader.take() {
                        let _ = r.join();
                    }
                    break;
                }
                Err(RecvTimeoutError::Timeout) => {
                    eprintln!("gateway-tests: Chromium's DevTools pipe did not close");
                    break;
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- chromium output ({}) ---\n{}",
                self.profile.path().display(),
                self.log()
            );
        }
    }
}

/// `(state, process group)` from `/proc/<pid>/stat`.
fn proc_state(pid: u32) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state ppid pgrp ...
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

fn process_of(info: &Value, kind: &str) -> Option<u32> {
    info["processInfo"]
        .as_array()?
        .iter()
        .find(|p| p["type"] == kind)?["id"]
        .as_u64()
        .map(|pid| pid as u32)
}

/// Split the answer stream into NUL-terminated JSON messages until EOF.
fn read_messages(mut pipe: File, tx: mpsc::Sender<Value>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut scanned = 0;
    loop {
        let n = match pipe.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf[scanned..].iter().position(|&b| b == 0) {
            let end = scanned + end;
            if let Ok(v) = serde_json::from_slice::<Value>(&buf[..end])
                && tx.send(v).is_err()
            {
                return;
            }
            buf.drain(..=end);
            scanned = 0;
        }
        scanned = buf.len();
    }
}

fn cloexec_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A close-on-exec duplicate numbered `min` or above.
fn dup_above(fd: &OwnedFd, min: i32) -> OwnedFd {
    // SAFETY: fcntl on a descriptor we own; the result is fresh.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    assert!(
        r >= 0,
        "fcntl(F_DUPFD_CLOEXEC): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: r is a fresh descriptor.
    unsafe { OwnedFd::from_raw_fd(r) }
}
