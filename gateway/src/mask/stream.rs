//! Streaming text masker with bounded memory.
//!
//! The masker keeps about `holdback` not-yet-emitted bytes between pushes
//! (default [`DEFAULT_HOLDBACK`] = 4096 bytes, comfortably more than the
//! longest built-in match, [`super::detectors::MAX_BUILTIN_MATCH`]), plus
//! [`CONTEXT_BYTES`] already-emitted bytes used only as look-behind context.
//! Once it holds more than `holdback * 5 / 4` pending bytes (so tiny chunks
//! cost no repeated rescans), it scans what it holds, emits everything up to
//! `len - holdback`, moving that cut forward past any match (valid or not)
//! that straddles it, and keeps the rest. Because every built-in match is
//! shorter than the holdback, the output and counts are identical however
//! the body is split into chunks. Custom regexes whose matches can be longer
//! than `holdback - MAX_BUILTIN_MATCH` lose that guarantee.
//!
//! Patterns are byte regexes: invalid UTF-8 never matches an ASCII pattern
//! and is passed through untouched.

use super::detectors::{CONTEXT_BYTES, MAX_BUILTIN_MATCH};
use super::{Counts, MaskSpec, SpecRef, replacement, scan};

pub const DEFAULT_HOLDBACK: usize = 4096;

pub struct StreamMasker<'a> {
    spec: SpecRef<'a>,
    holdback: usize,
    /// `buf[..ctx]` is already emitted (look-behind context only);
    /// `buf[ctx..]` is pending.
    buf: Vec<u8>,
    ctx: usize,
    counts: Counts,
    raw: Vec<(usize, usize)>,
}

impl<'a> StreamMasker<'a> {
    pub fn new(spec: &'a MaskSpec) -> StreamMasker<'a> {
        StreamMasker::with_holdback(spec, DEFAULT_HOLDBACK)
    }

    /// A smaller holdback saves memory but only catches split matches up to
    /// about `holdback / 2` bytes long. Values below 64 are raised to 64.
    pub fn with_holdback(spec: &'a MaskSpec, holdback: usize) -> StreamMasker<'a> {
        StreamMasker::from_ref(SpecRef::Borrowed(spec), holdback)
    }

    pub(crate) fn from_ref(spec: SpecRef<'a>, holdback: usize) -> StreamMasker<'a> {
        StreamMasker {
            spec,
            holdback: holdback.max(64),
            buf: Vec::new(),
            ctx: 0,
            counts: Counts::default(),
            raw: Vec::new(),
        }
    }

    /// Feeds a chunk; returns the masked bytes that are now final.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.buf.extend_from_slice(chunk);
        // Scanning only once a quarter-holdback of new bytes has arrived
        // keeps tiny chunks from rescanning the held tail on every push.
        if self.buffered() <= self.holdback + self.holdback / 4 {
            return Vec::new();
        }
        self.process(false)
    }

    /// Ends the body; returns the remaining masked bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        let out = self.process(true);
        self.buf.clear();
        self.ctx = 0;
        out
    }

    /// Pending (not yet emitted) bytes held right now: at most
    /// `holdback * 5 / 4` between pushes, plus one chunk during a push.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.ctx
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn holdback(&self) -> usize {
        self.holdback
    }

    /// Total values masked so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn masked_count(&self) -> u64 {
        self.counts.total()
    }

    /// Values masked so far, by detector name.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    fn process(&mut self, last: bool) -> Vec<u8> {
        let len = self.buf.len();
        let mut hits = Vec::new();
        self.raw.clear();
        scan(&self.spec, &self.buf, self.ctx, &mut self.raw, &mut hits);
        let mut cut = if last { len } else { len - self.holdback };
        if !last {
            // Never cut inside a regex match: the next scan restarts at the
            // cut, so a straddling match (even a rejected one) would be seen
            // differently than in a single pass.
            let limit = len.saturating_sub(MAX_BUILTIN_MATCH.min(self.holdback / 2));
            loop {
                let mut moved = false;
                for &(s, e) in &self.raw {
                    if s < cut && cut < e && e <= limit.max(cut) {
                        cut = e;
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
            // Never emit part of a value to be masked, even on a forced cut.
            if let Some(h) = hits.iter().find(|h| h.start < cut && cut < h.end) {
                cut = h.end;
            }
        }
        let mut out = Vec::with_capacity(cut - self.ctx + 64);
        let mut pos = self.ctx;
        for h in hits.iter().filter(|h| h.end <= cut) {
            out.extend_from_slice(&self.buf[pos..h.start]);
            let rule = &self.spec.rules[h.rule];
            out.extend_from_slice(replacement(rule, &self.buf[h.start..h.end]).as_bytes());
            self.counts.add(&rule.name);
            pos = h.end;
        }
        if pos < cut {
            out.extend_from_slice(&self.buf[pos..cut]);
        }
        let keep_from = cut.saturating_sub(CONTEXT_BYTES);
        self.buf.drain(..keep_from);
        self.ctx = cut - keep_from;
        out
    }
}
