//! Masking compressed response bodies.
//!
//! [`EncodedMasker`] undoes the body's `Content-Encoding` (`gzip`/`x-gzip`,
//! `deflate`, `br`, stacked as in `gzip, br`, `identity` ignored), masks the
//! decoded body with a [`BodyMasker`] and returns it plain: the caller drops
//! `Content-Encoding` and `Content-Length` when [`EncodedMasker::decodes`]
//! says so.
//!
//! Memory: every layer decodes in steps of at most [`STEP`] output bytes
//! into its own scratch buffer; a step is pulled only when the next layer
//! (or the masker) has used up the previous one. So what is held is the
//! compressed input not decoded yet, plus fixed state per layer (the
//! scratch, the deflate window of 32 KiB, a brotli window of up to 16 MiB as
//! the stream declares; the non-standard "large window" brotli is refused),
//! plus what the [`BodyMasker`] holds (its holdback, or a JSON/form body up
//! to its structured cap). [`EncodedMasker::push`] returns everything its
//! chunk decodes to, masked: up to `max_decoded_bytes` for a chunk that
//! expands hugely. [`EncodedMasker::feed`] with
//! [`EncodedMasker::next_output`] hands the same output out in pieces of
//! about one step each, whatever the compression ratio.
//!
//! Decompression bombs: the output of every layer is counted step by step;
//! once one exceeds `max_decoded_bytes` the masker fails with
//! [`EncodingError::TooLarge`], at most one step past the limit.
//!
//! Strictness: an empty body is an empty body whatever the encoding; a gzip
//! member may be followed by further members (RFC 1952), decoded too; after
//! the end of the compressed stream only NUL padding may follow, anything
//! else is [`EncodingError::Corrupt`] (a damaged stream can look like a
//! short complete one followed by garbage). `deflate` is zlib-wrapped
//! (RFC 9110) or, as some servers send it, raw deflate: told apart by the
//! zlib header check.
//!
//! Bodies whose Content-Type is not masked at all ([`BodyKind::Opaque`]:
//! images, archives...), or with an empty spec, are passed through still
//! encoded, whatever the encoding: [`EncodedMasker::decodes`] is false.

use std::sync::Arc;

use brotli_decompressor::{
    BrotliDecoderParameter, BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc,
};
use flate2::{Crc, Decompress, FlushDecompress, Status};

use super::{BodyKind, BodyMasker, Counts, DEFAULT_STRUCTURED_CAP, MaskSpec};

/// Largest output of one decoding step, per layer.
pub const STEP: usize = 64 * 1024;

/// Most content-codings stacked in one Content-Encoding that are decoded.
pub const MAX_LAYERS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    #[error(
        "cannot decode Content-Encoding {0} to mask the response body; the gateway decodes gzip, x-gzip, deflate, br and identity (up to 4 stacked), so have the client offer only those in Accept-Encoding or exempt this destination from masking"
    )]
    Unsupported(String),
    #[error(
        "the response body decodes to more than {limit} bytes, the limit for decoding compressed bodies to mask them; raise the limit or exempt this destination from masking"
    )]
    TooLarge { limit: u64 },
    #[error(
        "corrupt compressed response body: {0}; the origin sent data that does not match its Content-Encoding, so the body was cut off rather than passed on unmasked"
    )]
    Corrupt(String),
}

type Result<T> = std::result::Result<T, EncodingError>;

fn corrupt(msg: impl Into<String>) -> EncodingError {
    EncodingError::Corrupt(msg.into())
}

/// What follows the end of a compressed stream: NUL padding only.
fn check_padding(rest: &[u8], what: &str) -> Result<()> {
    if rest.iter().all(|b| *b == 0) {
        Ok(())
    } else {
        Err(corrupt(format!("data after the end of the {what} stream")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    Deflate,
    Brotli,
}

/// The codings to undo, in decoding order (the reverse of the header's).
fn parse_codings(header: &str) -> Result<Vec<Coding>> {
    let mut codings = Vec::new();
    for token in header.split(',') {
        let token = token.trim();
        let coding = match token.to_ascii_lowercase().as_str() {
            "" | "identity" => continue,
            "gzip" | "x-gzip" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            "br" => Coding::Brotli,
            _ => {
                let shown: String = token.chars().take(64).collect();
                return Err(EncodingError::Unsupported(format!("{shown:?}")));
            }
        };
        codings.push(coding);
        if codings.len() > MAX_LAYERS {
            let shown: String = header.chars().take(128).collect();
            return Err(EncodingError::Unsupported(format!(
                "{shown:?} (more than {MAX_LAYERS} stacked codings)"
            )));
        }
    }
    codings.reverse();
    Ok(codings)
}

/// Masks one response body sent with a Content-Encoding; see the module
/// documentation.
pub struct EncodedMasker {
    /// Never empty: a body that is not decoded has one `Identity` layer.
    layers: Vec<Layer>,
    masker: BodyMasker<'static>,
    limit: u64,
    /// Bytes handed to the masker (the decoded body, or the raw one when
    /// nothing is decoded).
    plain: u64,
    state: State,
}

enum State {
    Open,
    Finished,
    Failed(EncodingError),
}

impl EncodedMasker {
    /// `content_encoding`: the raw header value(s) joined by ", ", or None.
    /// Fails for an encoding that cannot be decoded (`zstd`, `compress`...)
    /// when the body would be masked: the caller then fails closed.
    pub fn new(
        spec: Arc<MaskSpec>,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        max_decoded_bytes: u64,
    ) -> Result<EncodedMasker> {
        let passthrough =
            spec.is_empty() || BodyKind::from_content_type(content_type) == BodyKind::Opaque;
        let mut layers: Vec<Layer> = match content_encoding {
            Some(header) if !passthrough => parse_codings(header)?
                .into_iter()
                .map(|c| Layer::new(Decoder::new(c)))
                .collect(),
            _ => Vec::new(),
        };
        if layers.is_empty() {
            layers.push(Layer::new(Decoder::Identity));
        }
        Ok(EncodedMasker {
            layers,
            masker: BodyMasker::shared(spec, content_type, DEFAULT_STRUCTURED_CAP),
            limit: max_decoded_bytes,
            plain: 0,
            state: State::Open,
        })
    }

    /// Feeds compressed bytes; returns masked plain bytes to send now (may
    /// be empty): everything `chunk` decodes to so far, up to
    /// `max_decoded_bytes`. See [`EncodedMasker::next_output`] for output in
    /// bounded pieces.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>> {
        self.feed(chunk)?;
        let mut out = Vec::new();
        while let Some(piece) = self.next_output()? {
            append(&mut out, piece);
        }
        Ok(out)
    }

    /// Queues compressed bytes without decoding them yet: call
    /// [`EncodedMasker::next_output`] until it returns `None` before feeding
    /// more, or they pile up.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        self.check_open()?;
        self.layers[0].queue(chunk);
        Ok(())
    }

    /// The next piece of masked plain output from the queued input, or
    /// `None` once it is used up. A piece is what the masker returns for
    /// one decoding step ([`STEP`] bytes, plus its holdback and the growth
    /// of replacements), or the JSON/form body at `finish`.
    pub fn next_output(&mut self) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        loop {
            let r = pull(&mut self.layers, self.limit);
            let n = self.settle(r)?;
            if n == 0 {
                return Ok(None);
            }
            let Some(last) = self.layers.last() else {
                return Ok(None);
            };
            self.plain += n as u64;
            let out = self.masker.push(&last.scratch[..n]);
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
    }

    /// Ends the body: decodes what is queued, checks every layer's stream
    /// ended properly and flushes the masker. A truncated or corrupt
    /// compressed stream fails here.
    pub fn finish(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(piece) = self.next_output()? {
            append(&mut out, piece);
        }
        let r = self.layers.iter().try_for_each(Layer::end);
        self.settle(r)?;
        append(&mut out, self.masker.finish());
        self.state = State::Finished;
        Ok(out)
    }

    /// Total values masked so far (complete after `finish`).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn masked_count(&self) -> u64 {
        self.masker.masked_count()
    }

    /// Values masked so far, by name (complete after `finish`).
    pub fn counts(&self) -> Counts {
        self.masker.counts()
    }

    /// Whether the body is decoded: the caller then drops Content-Encoding
    /// (and Content-Length). False when there is nothing to decode, and for
    /// bodies passed through untouched (opaque Content-Type, empty spec).
    pub fn decodes(&self) -> bool {
        self.layers
            .iter()
            .any(|l| !matches!(l.decoder, Decoder::Identity))
    }

    /// Decoded bytes so far (the body's plain size once finished).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn decoded_bytes(&self) -> u64 {
        self.plain
    }

    /// Body bytes held between calls: input queued and not decoded yet in
    /// any layer, and the masker's (see [`BodyMasker::buffered`]). Not
    /// counted: the fixed state of each layer (its [`STEP`] scratch and its
    /// window).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn buffered(&self) -> usize {
        self.masker.buffered() + self.layers.iter().map(Layer::pending).sum::<usize>()
    }

    fn check_open(&self) -> Result<()> {
        match &self.state {
            State::Open => Ok(()),
            State::Failed(e) => Err(e.clone()),
            State::Finished => Err(corrupt("body data after its end (masker already finished)")),
        }
    }

    fn settle<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.state = State::Failed(e.clone());
        }
        r
    }
}

fn append(out: &mut Vec<u8>, more: Vec<u8>) {
    if out.is_empty() {
        *out = more;
    } else {
        out.extend_from_slice(&more);
    }
}

/// A decoder that neither consumes nor produces although this much input
/// is waiting is stuck (they wait for at most 8 bytes: a gzip trailer).
const STUCK: usize = 64;

/// Decodes one step out of the last layer into its scratch, pulling input
/// from the layers before it as needed. Returns the bytes produced; 0 when
/// nothing more can be decoded from the input queued so far.
fn pull(layers: &mut [Layer], limit: u64) -> Result<usize> {
    let Some((last, before)) = layers.split_last_mut() else {
        return Ok(0);
    };
    loop {
        if last.pos < last.input.len() || last.more {
            if last.scratch.is_empty() {
                last.scratch = vec![0; STEP];
            }
            let input = &last.input[last.pos..];
            let (used, made) = last.decoder.step(input, &mut last.scratch)?;
            let (used, made) = (used.min(input.len()), made.min(last.scratch.len()));
            last.pos += used;
            last.more = made > 0;
            if made > 0 {
                last.produced += made as u64;
                if last.produced > limit && !matches!(last.decoder, Decoder::Identity) {
                    return Err(EncodingError::TooLarge { limit });
                }
                return Ok(made);
            }
            if used > 0 {
                continue;
            }
            if last.pending() > STUCK {
                return Err(corrupt(format!(
                    "the {} decoder made no progress",
                    last.decoder.name()
                )));
            }
        }
        // Everything decodable here is decoded: refill from upstream.
        let n = pull(before, limit)?;
        let Some(prev) = before.last() else {
            return Ok(0);
        };
        if n == 0 {
            return Ok(0);
        }
        last.queue(&prev.scratch[..n]);
    }
}

/// One content-coding to undo: its decoder, the input not decoded yet,
/// the scratch its steps decode into, and its output count.
struct Layer {
    decoder: Decoder,
    input: Vec<u8>,
    pos: usize,
    scratch: Vec<u8>,
    /// The last step produced output: the decoder may have more even
    /// without input.
    more: bool,
    produced: u64,
}

impl Layer {
    fn new(decoder: Decoder) -> Layer {
        Layer {
            decoder,
            input: Vec::new(),
            pos: 0,
            scratch: Vec::new(),
            more: false,
            produced: 0,
        }
    }

    fn queue(&mut self, bytes: &[u8]) {
        if self.pos == self.input.len() {
            self.input.clear();
        } else {
            self.input.drain(..self.pos);
        }
        self.pos = 0;
        self.input.extend_from_slice(bytes);
    }

    fn pending(&self) -> usize {
        self.input.len() - self.pos
    }

    /// The body ended: the stream must have too.
    fn end(&self) -> Result<()> {
        self.decoder.end(&self.input[self.pos..])
    }
}

enum Decoder {
    /// Nothing to decode: bytes go through as they are.
    Identity,
    Gzip(Box<GzipDecoder>),
    Deflate(DeflateDecoder),
    Brotli(Box<BrotliDecoder>),
}

impl Decoder {
    fn new(coding: Coding) -> Decoder {
        match coding {
            Coding::Gzip => Decoder::Gzip(Box::new(GzipDecoder::new())),
            Coding::Deflate => Decoder::Deflate(DeflateDecoder::Detect),
            Coding::Brotli => Decoder::Brotli(BrotliDecoder::new()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Decoder::Identity => "identity",
            Decoder::Gzip(_) => "gzip",
            Decoder::Deflate(_) => "deflate",
            Decoder::Brotli(_) => "brotli",
        }
    }

    /// Decodes at most `out.len()` bytes from `input`; returns the bytes of
    /// input used and of output made. (0, 0): more input is needed.
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize)> {
        match self {
            Decoder::Identity => {
                let n = input.len().min(out.len());
                out[..n].copy_from_slice(&input[..n]);
                Ok((n, n))
            }
            Decoder::Gzip(d) => d.step(input, out),
            Decoder::Deflate(d) => d.step(input, out),
            Decoder::Brotli(d) => d.step(input, out),
        }
    }

    /// The body ended, with `rest` not decoded.
    fn end(&self, rest: &[u8]) -> Result<()> {
        match self {
            Decoder::Identity => Ok(()),
            Decoder::Gzip(d) => d.end(rest),
            Decoder::Deflate(d) => d.end(rest),
            Decoder::Brotli(d) => d.end(),
        }
    }
}

/// A deflate stream (zlib-wrapped or raw).
struct Inflater {
    d: Decompress,
    done: bool,
}

impl Inflater {
    fn new(zlib: bool) -> Inflater {
        Inflater {
            d: Decompress::new(zlib),
            done: false,
        }
    }

    fn step(&mut self, input: &[u8], out: &mut [u8], what: &str) -> Result<(usize, usize)> {
        let (in0, out0) = (self.d.total_in(), self.d.total_out());
        let status = self
            .d
            .decompress(input, out, FlushDecompress::None)
            .map_err(|e| corrupt(format!("invalid {what} data ({e})")))?;
        if status == Status::StreamEnd {
            self.done = true;
        }
        let used = usize::try_from(self.d.total_in() - in0).unwrap_or(usize::MAX);
        let made = usize::try_from(self.d.total_out() - out0).unwrap_or(usize::MAX);
        Ok((used.min(input.len()), made.min(out.len())))
    }
}

/// `Content-Encoding: deflate`.
enum DeflateDecoder {
    /// Waiting for the two bytes that tell zlib from raw deflate.
    Detect,
    Body(Box<Inflater>),
}

/// RFC 1950 header check: method 8 (deflate), window at most 32 KiB, and
/// the header a multiple of 31. A raw deflate stream passes it only if it
/// starts with a non-final stored block whose padding bits are not zero,
/// which encoders do not write.
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && ((u16::from(cmf) << 8) | u16::from(flg)) % 31 == 0
}

impl DeflateDecoder {
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize)> {
        if let DeflateDecoder::Detect = self {
            let [cmf, flg, ..] = *input else {
                return Ok((0, 0));
            };
            *self = DeflateDecoder::Body(Box::new(Inflater::new(is_zlib_header(cmf, flg))));
        }
        match self {
            DeflateDecoder::Detect => Ok((0, 0)),
            DeflateDecoder::Body(inf) if inf.done => {
                check_padding(input, "deflate")?;
                Ok((input.len(), 0))
            }
            DeflateDecoder::Body(inf) => inf.step(input, out, "deflate"),
        }
    }

    fn end(&self, rest: &[u8]) -> Result<()> {
        match self {
            DeflateDecoder::Detect if rest.is_empty() => Ok(()),
            DeflateDecoder::Detect => Err(corrupt("deflate body of a single byte")),
            DeflateDecoder::Body(inf) if inf.done => check_padding(rest, "deflate"),
            DeflateDecoder::Body(_) => Err(corrupt("truncated deflate stream")),
        }
    }
}

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderPart {
    Fixed,
    ExtraLen,
    Extra,
    Name,
    Comment,
    HeaderCrc,
    Done,
}

/// An RFC 1952 member header, parsed as it arrives; nothing but two
/// length/CRC bytes is kept of the optional fields.
struct GzHeader {
    part: HeaderPart,
    flags: u8,
    /// Bytes seen of the current part.
    seen: usize,
    extra_len: usize,
    crc16: [u8; 2],
    crc: Crc,
}

enum HeaderEnd {
    /// Consumed all input, header not complete yet.
    More,
    /// Header complete after this many bytes.
    Complete(usize),
    /// Not a gzip member (bad magic).
    NotGzip,
}

impl GzHeader {
    fn new() -> GzHeader {
        GzHeader {
            part: HeaderPart::Fixed,
            flags: 0,
            seen: 0,
            extra_len: 0,
            crc16: [0; 2],
            crc: Crc::new(),
        }
    }

    fn next_part(&self, after: HeaderPart) -> HeaderPart {
        let order = [
            (HeaderPart::ExtraLen, FEXTRA),
            (HeaderPart::Name, FNAME),
            (HeaderPart::Comment, FCOMMENT),
            (HeaderPart::HeaderCrc, FHCRC),
        ];
        let start = order
            .iter()
            .position(|(p, _)| *p == after)
            .map_or(0, |i| i + 1);
        order[start..]
            .iter()
            .find(|(_, flag)| self.flags & flag != 0)
            .map_or(HeaderPart::Done, |(p, _)| *p)
    }

    fn advance(&mut self, after: HeaderPart) {
        self.part = self.next_part(after);
        self.seen = 0;
    }

    fn feed(&mut self, input: &[u8]) -> Result<HeaderEnd> {
        for (i, &b) in input.iter().enumerate() {
            if self.part != HeaderPart::HeaderCrc {
                self.crc.update(&[b]);
            }
            match self.part {
                HeaderPart::Fixed => {
                    match (self.seen, b) {
                        (0, 0x1f) | (1, 0x8b) | (2, 8) => {}
                        (0 | 1, _) => return Ok(HeaderEnd::NotGzip),
                        (2, m) => {
                            return Err(corrupt(format!(
                                "gzip compression method {m} (only 8, deflate, exists)"
                            )));
                        }
                        (3, f) if f & FRESERVED != 0 => {
                            return Err(corrupt("gzip header with reserved flags set"));
                        }
                        (3, f) => self.flags = f,
                        _ => {}
                    }
                    self.seen += 1;
                    if self.seen == 10 {
                        self.advance(HeaderPart::Fixed);
                    }
                }
                HeaderPart::ExtraLen => {
                    self.extra_len |= usize::from(b) << (8 * self.seen);
                    self.seen += 1;
                    if self.seen == 2 {
                        if self.extra_len == 0 {
                            self.advance(HeaderPart::ExtraLen);
                        } else {
                            self.part = HeaderPart::Extra;
                            self.seen = 0;
                        }
                    }
                }
                HeaderPart::Extra => {
                    self.seen += 1;
                    if self.seen == self.extra_len {
                        self.advance(HeaderPart::ExtraLen);
                    }
                }
                HeaderPart::Name | HeaderPart::Comment => {
                    if b == 0 {
                        self.advance(self.part);
                    }
                }
                HeaderPart::HeaderCrc => {
                    self.crc16[self.seen] = b;
                    self.seen += 1;
                    if self.seen == 2 {
                        if u32::from(u16::from_le_bytes(self.crc16)) != self.crc.sum() & 0xffff {
                            return Err(corrupt("gzip header checksum mismatch"));
                        }
                        self.part = HeaderPart::Done;
                    }
                }
                HeaderPart::Done => return Ok(HeaderEnd::Complete(i)),
            }
            if self.part == HeaderPart::Done {
                return Ok(HeaderEnd::Complete(i + 1));
            }
        }
        Ok(HeaderEnd::More)
    }

    /// Nothing of this header seen yet.
    fn fresh(&self) -> bool {
        self.part == HeaderPart::Fixed && self.seen == 0
    }
}

enum GzState {
    Header(Box<GzHeader>),
    Body {
        inf: Box<Inflater>,
        crc: Crc,
    },
    /// Waiting for the 8 trailer bytes.
    Trailer {
        crc: u32,
        len: u32,
    },
    /// NUL padding after the last member.
    Padding,
}

/// `Content-Encoding: gzip`: one or more members.
struct GzipDecoder {
    state: GzState,
    members: u64,
    /// A deflate decoder to reuse for the next member.
    spare: Option<Box<Inflater>>,
}

impl GzipDecoder {
    fn new() -> GzipDecoder {
        GzipDecoder {
            state: GzState::Header(Box::new(GzHeader::new())),
            members: 0,
            spare: None,
        }
    }

    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize)> {
        match &mut self.state {
            GzState::Header(h) if self.members > 0 && h.fresh() && input.first() == Some(&0) => {
                self.state = GzState::Padding;
                check_padding(input, "gzip")?;
                Ok((input.len(), 0))
            }
            GzState::Header(h) => match h.feed(input)? {
                HeaderEnd::More => Ok((input.len(), 0)),
                HeaderEnd::NotGzip if self.members == 0 => Err(corrupt(
                    "not gzip data (the body does not start with 1f 8b)",
                )),
                HeaderEnd::NotGzip => Err(corrupt("data after the end of the gzip stream")),
                HeaderEnd::Complete(used) => {
                    let inf = match self.spare.take() {
                        Some(mut inf) => {
                            inf.d.reset(false);
                            inf.done = false;
                            inf
                        }
                        None => Box::new(Inflater::new(false)),
                    };
                    self.state = GzState::Body {
                        inf,
                        crc: Crc::new(),
                    };
                    Ok((used, 0))
                }
            },
            GzState::Body { inf, crc } => {
                let (used, made) = inf.step(input, out, "gzip")?;
                crc.update(&out[..made]);
                if inf.done {
                    let trailer = GzState::Trailer {
                        crc: crc.sum(),
                        len: crc.amount(),
                    };
                    if let GzState::Body { inf, .. } = std::mem::replace(&mut self.state, trailer) {
                        self.spare = Some(inf);
                    }
                }
                Ok((used, made))
            }
            GzState::Trailer { crc, len } => {
                let Some(t) = input.get(..8) else {
                    return Ok((0, 0));
                };
                if u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != *crc {
                    return Err(corrupt("gzip CRC-32 mismatch"));
                }
                if u32::from_le_bytes([t[4], t[5], t[6], t[7]]) != *len {
                    return Err(corrupt("gzip length mismatch"));
                }
                self.members += 1;
                self.state = GzState::Header(Box::new(GzHeader::new()));
                Ok((8, 0))
            }
            GzState::Padding => {
                check_padding(input, "gzip")?;
                Ok((input.len(), 0))
            }
        }
    }

    fn end(&self, rest: &[u8]) -> Result<()> {
        match &self.state {
            GzState::Padding => check_padding(rest, "gzip"),
            // Nothing at all (an empty body), or nothing after a member.
            GzState::Header(h) if h.fresh() && rest.is_empty() => Ok(()),
            GzState::Header(_) => Err(corrupt("truncated gzip header")),
            GzState::Body { .. } => Err(corrupt("truncated gzip stream")),
            GzState::Trailer { .. } => Err(corrupt("truncated gzip trailer")),
        }
    }
}

type BrotliStateStd = BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>;

/// `Content-Encoding: br`.
struct BrotliDecoder {
    state: BrotliStateStd,
    started: bool,
    done: bool,
}

impl BrotliDecoder {
    fn new() -> Box<BrotliDecoder> {
        let mut state = BrotliStateStd::new(
            StandardAlloc::default(),
            StandardAlloc::default(),
            StandardAlloc::default(),
        );
        // RFC 7932 windows only (at most 16 MiB), not the 1 GiB extension.
        state.set_parameter(BrotliDecoderParameter::BROTLI_DECODER_PARAM_LARGE_WINDOW, 0);
        Box::new(BrotliDecoder {
            state,
            started: false,
            done: false,
        })
    }

    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize)> {
        if self.done {
            check_padding(input, "brotli")?;
            return Ok((input.len(), 0));
        }
        self.started |= !input.is_empty();
        let mut avail_in = input.len();
        let mut in_off = 0;
        let mut avail_out = out.len();
        let mut out_off = 0;
        let mut total_out = 0;
        let r = BrotliDecompressStream(
            &mut avail_in,
            &mut in_off,
            input,
            &mut avail_out,
            &mut out_off,
            out,
            &mut total_out,
            &mut self.state,
        );
        match r {
            BrotliResult::ResultSuccess => self.done = true,
            BrotliResult::NeedsMoreInput | BrotliResult::NeedsMoreOutput => {}
            BrotliResult::ResultFailure => {
                return Err(corrupt(format!(
                    "invalid brotli data ({:?})",
                    self.state.error_code
                )));
            }
        }
        Ok((in_off.min(input.len()), out_off.min(out.len())))
    }

    fn end(&self) -> Result<()> {
        if self.done || !self.started {
            Ok(())
        } else {
            Err(corrupt("truncated brotli stream"))
        }
    }
}

#[cfg(test)]
#[path = "encoding_tests.rs"]
mod tests;
