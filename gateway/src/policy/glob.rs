//! The globs of the request part of a rule: `paths` (per path segment) and
//! `headers` (per header value).
//!
//! Matching is the classic two-pointer wildcard algorithm with a single
//! backtrack point, applied twice for paths (segments, then characters
//! inside a segment): O(pattern × text) in the worst case, no recursion, no
//! exponential blow-up whatever the pattern.

use std::{borrow::Cow, fmt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// `*`: any run of characters (never `/` inside a path segment, since
    /// segments have none).
    Star,
    /// `?`: exactly one character.
    One,
    Byte(u8),
}

fn compile(pattern: &str) -> Vec<Tok> {
    let mut toks: Vec<Tok> = Vec::with_capacity(pattern.len());
    for b in pattern.bytes() {
        let t = match b {
            b'*' => Tok::Star,
            b'?' => Tok::One,
            b => Tok::Byte(b),
        };
        // `**` inside a value glob is the same as `*`.
        if !(t == Tok::Star && toks.last() == Some(&Tok::Star)) {
            toks.push(t);
        }
    }
    toks
}

/// Length of the (UTF-8) character starting at `i`: the lead byte plus its
/// continuation bytes. Always at least 1, so matching always progresses,
/// also on bytes that are not UTF-8.
fn char_len(text: &[u8], i: usize) -> usize {
    1 + text
        .get(i + 1..)
        .unwrap_or_default()
        .iter()
        .take_while(|b| (0x80..0xC0).contains(*b))
        .count()
}

fn matches_toks(toks: &[Tok], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // (pattern index after the last `*`, text index it is tried from)
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match toks.get(p) {
            Some(Tok::Star) => {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(Tok::One) => {
                p += 1;
                t += char_len(text, t);
                continue;
            }
            Some(Tok::Byte(b)) if *b == text[t] => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                let next = st + char_len(text, st);
                star = Some((sp, next));
                p = sp;
                t = next;
            }
            None => return false,
        }
    }
    toks[p.min(toks.len())..].iter().all(|t| *t == Tok::Star)
}

/// A glob on a header value: `*` any run of characters, `?` one; `"*"`
/// alone means "the header is present". Case-sensitive.
#[derive(Clone, PartialEq, Eq)]
pub struct ValueGlob {
    source: String,
    toks: Vec<Tok>,
}

impl ValueGlob {
    pub fn parse(pattern: &str) -> Result<ValueGlob, String> {
        if pattern
            .bytes()
            .any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(format!(
                "header value glob {pattern:?} contains a control character; header values never do"
            ));
        }
        Ok(ValueGlob {
            source: pattern.to_string(),
            toks: compile(pattern),
        })
    }

    pub fn matches(&self, value: &[u8]) -> bool {
        matches_toks(&self.toks, value)
    }
}

impl fmt::Display for ValueGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for ValueGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    /// `**`: any number of whole segments, including none.
    AnyDepth,
    Glob(Vec<Tok>),
}

/// A glob on a request path: `/`-separated segments; `*` matches within
/// one segment, `?` one character of a segment, `**` (a whole segment)
/// any number of segments including zero.
#[derive(Clone, PartialEq, Eq)]
pub struct PathGlob {
    source: String,
    segs: Vec<Seg>,
}

impl PathGlob {
    pub fn parse(pattern: &str) -> Result<PathGlob, String> {
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(format!(
                "path {pattern:?} must start with '/'; write e.g. \"/v1/charges/**\""
            ));
        };
        if let Some(c) = pattern
            .chars()
            .find(|c| c.is_control() || c.is_whitespace() || *c == '#')
        {
            return Err(format!(
                "path {pattern:?} contains {c:?}, which never appears in a request path; percent-encode it (%20) or leave it out"
            ));
        }
        let mut segs: Vec<Seg> = Vec::new();
        for seg in rest.split('/') {
            if seg == "**" {
                if segs.last() != Some(&Seg::AnyDepth) {
                    segs.push(Seg::AnyDepth);
                }
            } else if seg.contains("**") {
                return Err(format!(
                    "path {pattern:?}: `**` must be a whole segment (\"/a/**/b\"); use `*` to match within a segment"
                ));
            } else {
                segs.push(Seg::Glob(compile(seg)));
            }
        }
        Ok(PathGlob {
            source: pattern.to_string(),
            segs,
        })
    }

    /// `path` as [`normalize_path`] returns it (no query, starts with `/`).
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let text: Vec<&[u8]> = rest.split('/').map(str::as_bytes).collect();
        let segs = &self.segs;
        let (mut p, mut s) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while s < text.len() {
            match segs.get(p) {
                Some(Seg::AnyDepth) => {
                    star = Some((p + 1, s));
                    p += 1;
                    continue;
                }
                Some(Seg::Glob(toks)) if matches_toks(toks, text[s]) => {
                    p += 1;
                    s += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                Some((sp, ss)) => {
                    star = Some((sp, ss + 1));
                    p = sp;
                    s = ss + 1;
                }
                None => return false,
            }
        }
        segs[p.min(segs.len())..]
            .iter()
            .all(|s| *s == Seg::AnyDepth)
    }
}

impl fmt::Display for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

/// The form of a request path that `paths` globs are matched against, so
/// that spelling a path differently does not step around a rule:
/// the query (`?…`) and fragment are cut off, `%XX` escapes of unreserved
/// characters (letters, digits, `-._~`) are decoded, other escapes get
/// upper-case hex, empty segments (`//`) are dropped and `.`/`..` segments
/// are resolved (never above the root). A trailing `/` is kept. A target
/// that does not start with `/` (`*`, absolute form) is returned as it is
/// and matches no `paths` glob.
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut n = String::with_capacity(decoded.len());
    for seg in &out {
        n.push('/');
        n.push_str(seg);
    }
    if trailing || out.is_empty() {
        n.push('/');
    }
    if n == raw {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(n)
    }
}

fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(b[i + 1].to_ascii_uppercase() as char);
                    out.push(b[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        // Copy one whole character (the input is a str).
        let len = char_len(b, i);
        out.push_str(&path[i..i + len]);
        i += len;
    }
    Cow::Owned(out)
}
