//! Bodies on the intercepted path: request bodies pass through counted;
//! response bodies pass through the masker (when the rule asks for it) and
//! carry the exchange's audit record, emitted once when the body ends, fails
//! or is dropped because the client went away.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

use super::io::BoxError;
use crate::{audit::HttpRecord, mask::EncodedMasker};

pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body made by the gateway (403 pages, 502 reasons).
pub fn full(text: impl Into<Bytes>) -> BoxBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Counts the bytes of a body as they pass.
pub struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, counter: Arc<AtomicU64>) -> Counted<B> {
        Counted { inner, counter }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|f| {
            let f = f.map_err(Into::into)?;
            if let Some(d) = f.data_ref() {
                self.counter.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            Ok(f)
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where an exchange's body ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Running,
    Complete,
    Failed,
}

/// The response body sent to the client: masked when `masker` is set,
/// counted, and audited exactly once.
pub struct ResponseBody {
    inner: BoxBody,
    masker: Option<EncodedMasker>,
    end: End,
    record: Option<HttpRecord>,
    /// The request body's counter (the client may still be sending).
    up: Arc<AtomicU64>,
    down: u64,
    started: Instant,
    outcome_on_complete: &'static str,
    /// The session recording's copy of this exchange.
    capture: Option<crate::sessions::Capture>,
}

impl ResponseBody {
    pub fn new(
        inner: BoxBody,
        masker: Option<EncodedMasker>,
        record: HttpRecord,
        up: Arc<AtomicU64>,
        started: Instant,
    ) -> ResponseBody {
        ResponseBody {
            inner,
            masker,
            end: End::Running,
            record: Some(record),
            up,
            down: 0,
            started,
            outcome_on_complete: "complete",
            capture: None,
        }
    }

    /// An empty body with no record of its own (a WebSocket 101, audited
    /// when the session ends).
    pub fn untracked() -> ResponseBody {
        ResponseBody {
            inner: full(Bytes::new()),
            masker: None,
            end: End::Running,
            record: None,
            up: Arc::default(),
            down: 0,
            started: Instant::now(),
            outcome_on_complete: "complete",
            capture: None,
        }
    }

    /// A body made by the gateway itself (block pages, errors): audited
    /// with `outcome` once sent.
    pub fn gateway(
        text: String,
        record: HttpRecord,
        up: Arc<AtomicU64>,
        started: Instant,
        outcome: &'static str,
    ) -> ResponseBody {
        let mut b = ResponseBody::new(full(text), None, record, up, started);
        b.outcome_on_complete = outcome;
        b
    }

    /// Copies what the client gets into the session recording.
    pub fn with_capture(mut self, capture: crate::sessions::Capture) -> ResponseBody {
        self.capture = Some(capture);
        self
    }

    fn fail(&mut self, why: String) {
        self.end = End::Failed;
        if let Some(r) = &mut self.record {
            if !r.reason.is_empty() {
                r.reason.push_str("; ");
            }
            r.reason.push_str(&why);
        }
    }

    fn emit(&mut self) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        if let Some(m) = &self.masker {
            let counts = m.counts();
            r.masked = counts.total();
            r.masked_by = counts.by_name().clone();
        }
        r.bytes_up = self.up.load(Ordering::Relaxed);
        r.bytes_down = self.down;
        r.duration = self.started.elapsed();
        let outcome = match self.end {
            End::Complete => self.outcome_on_complete,
            End::Failed => "failed",
            End::Running => "aborted",
        };
        if self.end == End::Running {
            r.reason
                .push_str("; the client went away before the response body ended");
        }
        if let Some(c) = self.capture.take() {
            c.finish(&r, outcome);
        }
        r.emit(outcome);
    }

    /// Ends the body with an error the client sees as a cut-off response;
    /// the audit record says why.
    fn abort(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.fail(why.clone());
        self.emit();
        Poll::Ready(Some(Err(why.into())))
    }

    fn data(&mut self, bytes: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.down += bytes.len() as u64;
        if let Some(c) = &self.capture {
            c.response_data(&bytes);
        }
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.end != End::Running {
                return Poll::Ready(None);
            }
            // Masked output is handed out in bounded pieces: a small
            // compressed chunk may decode to a lot.
            if let Some(m) = &mut this.masker {
                match m.next_output() {
                    Ok(Some(v)) if v.is_empty() => continue,
                    Ok(Some(v)) => return this.data(Bytes::from(v)),
                    Ok(None) => {}
                    Err(e) => {
                        return this.abort(format!("response body cannot be masked: {e}"));
                    }
                }
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(trailers) => {
                            // Trailers cannot follow a masked body whose
                            // remainder is still held; they are dropped then.
                            if this.masker.is_some() {
                                continue;
                            }
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                    };
                    match &mut this.masker {
                        None if data.is_empty() => continue,
                        None => return this.data(data),
                        Some(m) => {
                            if let Err(e) = m.feed(&data) {
                                return this.abort(format!("response body cannot be masked: {e}"));
                            }
                            continue;
                        }
                    }
                }
                Some(Err(e)) => {
                    return this.abort(format!("upstream failed mid-body: {e}"));
                }
                None => {
                    let tail = match &mut this.masker {
                        None => Ok(Vec::new()),
                        Some(m) => m.finish(),
                    };
                    match tail {
                        Ok(tail) => {
                            this.end = End::Complete;
                            let done = if tail.is_empty() {
                                Poll::Ready(None)
                            } else {
                                this.data(Bytes::from(tail))
                            };
                            this.emit();
                            return done;
                        }
                        Err(e) => {
                            return this.abort(format!("response body cannot be masked: {e}"));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.end != End::Running || (self.masker.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.masker.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // An empty body hyper never polled is complete, not aborted.
        if self.end == End::Running && self.masker.is_none() && self.inner.is_end_stream() {
            self.end = End::Complete;
        }
        self.emit();
    }
}
