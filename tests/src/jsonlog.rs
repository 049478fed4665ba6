//! A growing log of JSON lines read from a child's stdout by a thread, with a
//! condition variable so tests can wait for a line matching a predicate until
//! a deadline (never a bare sleep).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default, Debug)]
struct State {
    /// Every line parsed as JSON, in arrival order.
    values: Vec<Value>,
    /// Every line as read (including ones that are not JSON).
    raw: Vec<String>,
    /// The writer closed its end (the child exited).
    closed: bool,
}

#[derive(Clone, Default, Debug)]
pub struct JsonLines {
    inner: Arc<(Mutex<State>, Condvar)>,
}

/// Why a wait ended without a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    TimedOut,
    /// The stream ended (the process exited) before a match.
    Closed,
}

impl JsonLines {
    pub fn new() -> JsonLines {
        JsonLines::default()
    }

    /// Start a thread that appends every line of `reader` until EOF.
    pub fn follow(&self, reader: impl Read + Send + 'static) -> JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => me.push(line.trim_end()),
                }
            }
            let (m, cv) = &*me.inner;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        })
    }

    pub fn push(&self, line: &str) {
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        st.raw.push(line.to_owned());
        if let Ok(v) = serde_json::from_str::<Value>(line)
            && v.is_object()
        {
            st.values.push(v);
        }
        cv.notify_all();
    }

    pub fn values(&self) -> Vec<Value> {
        self.inner.0.lock().unwrap().values.clone()
    }

    pub fn len(&self) -> usize {
        self.inner.0.lock().unwrap().values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closed(&self) -> bool {
        self.inner.0.lock().unwrap().closed
    }

    /// The last `n` raw lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let st = self.inner.0.lock().unwrap();
        let start = st.raw.len().saturating_sub(n);
        st.raw[start..].join("\n")
    }

    /// Wait until `want` values at index `from` or later match `pred`;
    /// returns those values.
    pub fn wait_count(
        &self,
        from: usize,
        want: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>, (WaitError, Vec<Value>)> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        loop {
            let found: Vec<Value> = st
                .values
                .iter()
                .skip(from)
                .filter(|v| pred(v))
                .cloned()
                .collect();
            if found.len() >= want {
                return Ok(found);
            }
            if st.closed {
                return Err((WaitError::Closed, found));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err((WaitError::TimedOut, found));
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Wait for the first value at index `from` or later matching `pred`.
    pub fn wait(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, WaitError> {
        self.wait_count(from, 1, timeout, pred)
            .map(|mut v| v.swap_remove(0))
            .map_err(|(e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_matching_line_and_sees_eof() {
        let log = JsonLines::new();
        let (r, mut w) = std::io::pipe().unwrap();
        let t = log.follow(r);
        use std::io::Write;
        writeln!(w, "not json").unwrap();
        writeln!(w, "{{\"event\":\"ready\",\"proxy_port\":1}}").unwrap();
        let v = log
            .wait(0, Duration::from_secs(5), |v| v["event"] == "ready")
            .unwrap();
        assert_eq!(v["proxy_port"], 1);
        drop(w);
        assert_eq!(
            log.wait(0, Duration::from_secs(5), |v| v["event"] == "never"),
            Err(WaitError::Closed)
        );
        t.join().unwrap();
        assert_eq!(log.len(), 1);
        assert!(log.tail(5).contains("not json"));
    }
}
