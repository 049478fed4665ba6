//! Running `gw-probe`: one-shot (`ProbeRun`) or interactive (`Repl`).

use crate::jsonlog::JsonLines;
use serde_json::Value;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Longer than any timeout inside the probe; only a hung probe hits it.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The probe binary. Integration tests get its path from
/// `env!("CARGO_BIN_EXE_gw-probe")`, which the library cannot see.
#[derive(Clone, Debug)]
pub struct Probe {
    path: PathBuf,
}

impl Probe {
    pub fn new(path: impl Into<PathBuf>) -> Probe {
        Probe { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The probe run directly by the test (outside every tagged cgroup).
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(&self.path);
        c.args(args);
        c
    }

    /// Run directly (untagged) and collect the result.
    pub fn run<I, S>(&self, args: I) -> ProbeRun
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        ProbeRun::of(self.command(args))
    }
}

/// What a finished probe left: exit status, its last JSON line, all output.
#[derive(Debug, Clone)]
pub struct ProbeRun {
    pub status: ExitStatus,
    /// The last stdout line that parsed as a JSON object (`Null` if none).
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl ProbeRun {
    /// Run `cmd` to completion (stdin closed), with a generous watchdog.
    pub fn of(mut cmd: Command) -> ProbeRun {
        let desc = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        let status = crate::poll(RUN_TIMEOUT, || child.try_wait().unwrap());
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {RUN_TIMEOUT:?}");
        };
        let stdout = out.join().unwrap();
        let stderr = err.join().unwrap();
        let json = stdout
            .lines()
            .rev()
            .find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(Value::is_object)
            })
            .unwrap_or(Value::Null);
        ProbeRun {
            status,
            json,
            stdout,
            stderr,
        }
    }

    /// The result's pid field (the probe's own pid).
    pub fn pid(&self) -> u64 {
        self.json["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("probe printed no pid: {self:?}"))
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// A long-lived `gw-probe repl`: one process (one pid, one cgroup) that runs
/// commands sent to it one at a time.
pub struct Repl {
    child: Child,
    stdin: Option<ChildStdin>,
    log: JsonLines,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Repl {
    /// Spawn `cmd`, which must end up running `gw-probe repl`.
    pub fn spawn(mut cmd: Command) -> Repl {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let log = JsonLines::new();
        let reader = Some(log.follow(child.stdout.take().unwrap()));
        Repl {
            child,
            stdin,
            log,
            reader,
        }
    }

    /// The pid of the spawned process (for a repl spawned directly, the
    /// repl itself; under `gateway exec`, the exec wrapper).
    pub fn child_pid(&self) -> u32 {
        self.child.id()
    }

    /// Send one command line and wait for its result line.
    pub fn send(&mut self, line: &str) -> Value {
        let from = self.log.len();
        let stdin = self.stdin.as_mut().expect("repl stdin open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("repl gone before {line:?}: {e}"));
        self.log
            .wait(from, RUN_TIMEOUT, |_| true)
            .unwrap_or_else(|e| {
                panic!(
                    "no answer to {line:?} from repl ({e:?}); output: {}",
                    self.log.tail(20)
                )
            })
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        // EOF on stdin ends the repl; kill only if it does not go.
        drop(self.stdin.take());
        let gone = crate::poll(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        });
        if gone.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
