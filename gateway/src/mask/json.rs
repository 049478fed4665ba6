//! JSON masking: a validating single-pass rewriter that copies the document
//! byte for byte (keys, numbers, whitespace, escapes) except the string or
//! number values it masks. Field selectors are applied first; detectors then
//! run on string values only (never on keys or numbers).
//!
//! Selectors are a JSONPath subset: `$`, then any of `.field`, `['field']`,
//! `[*]` (every element or member) and `[N]`. A selected string or number is
//! replaced by `"[MASKED:json_field]"`; a selected object or array has every
//! string and number inside it masked; booleans and null are kept.

use super::{Counts, JSON_FIELD, MaskSpec, MaskSpecError};

const MAX_DEPTH: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Sel {
    Field(String),
    Index(usize),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    segs: Vec<Sel>,
}

enum Seg {
    Key(String),
    Idx(usize),
}

impl JsonPath {
    pub fn parse(path: &str) -> Result<JsonPath, MaskSpecError> {
        let err = |at: usize, reason: &str| MaskSpecError::InvalidJsonPath {
            path: path.to_string(),
            at,
            reason: reason.to_string(),
        };
        let b = path.as_bytes();
        if b.first() != Some(&b'$') {
            return Err(err(0, "a selector must start with `$`"));
        }
        let mut i = 1;
        let mut segs = Vec::new();
        while i < b.len() {
            match b[i] {
                b'.' => {
                    let start = i + 1;
                    let mut j = start;
                    while j < b.len()
                        && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'-')
                    {
                        j += 1;
                    }
                    if j == start {
                        return Err(err(
                            start,
                            "expected a field name after `.` (letters, digits, _ or -)",
                        ));
                    }
                    segs.push(Sel::Field(path[start..j].to_string()));
                    i = j;
                }
                b'[' => {
                    let close = path[i..]
                        .find(']')
                        .map(|k| i + k)
                        .ok_or_else(|| err(i, "unclosed `[`"))?;
                    let inner = &path[i + 1..close];
                    let sel = if inner == "*" {
                        Sel::Any
                    } else if let Ok(n) = inner.parse::<usize>() {
                        Sel::Index(n)
                    } else if inner.len() >= 2
                        && ((inner.starts_with('\'') && inner.ends_with('\''))
                            || (inner.starts_with('"') && inner.ends_with('"')))
                    {
                        Sel::Field(inner[1..inner.len() - 1].to_string())
                    } else {
                        return Err(err(
                            i + 1,
                            "inside `[...]` use `*`, an index like `0`, or a quoted name like 'field'",
                        ));
                    };
                    segs.push(sel);
                    i = close + 1;
                }
                _ => return Err(err(i, "expected `.field`, `[*]` or `[N]`")),
            }
        }
        Ok(JsonPath { segs })
    }

    fn matches(&self, path: &[Seg]) -> bool {
        self.segs.len() == path.len()
            && self.segs.iter().zip(path).all(|(s, p)| match (s, p) {
                (Sel::Any, _) => true,
                (Sel::Field(f), Seg::Key(k)) => f == k,
                (Sel::Index(n), Seg::Idx(i)) => n == i,
                _ => false,
            })
    }
}

/// Masks a complete JSON document; `None` if it is not valid JSON (the
/// caller then falls back to text scanning). Counts are only added on
/// success.
pub(crate) fn mask_json(spec: &MaskSpec, src: &[u8], counts: &mut Counts) -> Option<Vec<u8>> {
    let mut w = Walker {
        spec,
        src,
        pos: 0,
        out: Vec::with_capacity(src.len()),
        path: Vec::new(),
        counts: Counts::default(),
    };
    w.ws();
    w.value(false, 0)?;
    w.ws();
    if w.pos != src.len() {
        return None;
    }
    counts.merge(&w.counts);
    Some(w.out)
}

struct Walker<'a> {
    spec: &'a MaskSpec,
    src: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    path: Vec<Seg>,
    counts: Counts,
}

impl Walker<'_> {
    fn ws(&mut self) {
        let start = self.pos;
        while self.pos < self.src.len()
            && matches!(self.src[self.pos], b' ' | b'\t' | b'\n' | b'\r')
        {
            self.pos += 1;
        }
        self.out.extend_from_slice(&self.src[start..self.pos]);
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn copy_byte(&mut self, want: u8) -> Option<()> {
        if self.peek()? != want {
            return None;
        }
        self.out.push(want);
        self.pos += 1;
        Some(())
    }

    fn masked_field(&mut self) {
        self.out
            .extend_from_slice(format!("\"[MASKED:{JSON_FIELD}]\"").as_bytes());
        self.counts.add(JSON_FIELD);
    }

    /// Returns the span of a string literal at `pos` and its decoded value.
    fn string_literal(&mut self) -> Option<(usize, usize, String)> {
        let start = self.pos;
        if self.peek()? != b'"' {
            return None;
        }
        let mut i = start + 1;
        loop {
            match *self.src.get(i)? {
                b'"' => break,
                b'\\' => i += 2,
                c if c < 0x20 => return None,
                _ => i += 1,
            }
        }
        let end = i + 1;
        let s: String = serde_json::from_slice(&self.src[start..end]).ok()?;
        self.pos = end;
        Some((start, end, s))
    }

    fn value(&mut self, selected: bool, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let selected = selected || self.spec.selectors.iter().any(|s| s.matches(&self.path));
        match self.peek()? {
            b'{' => {
                self.copy_byte(b'{')?;
                self.ws();
                if self.peek()? == b'}' {
                    return self.copy_byte(b'}');
                }
                loop {
                    let (s, e, key) = self.string_literal()?;
                    self.out.extend_from_slice(&self.src[s..e]);
                    self.ws();
                    self.copy_byte(b':')?;
                    self.ws();
                    self.path.push(Seg::Key(key));
                    self.value(selected, depth + 1)?;
                    self.path.pop();
                    self.ws();
                    if self.peek()? == b',' {
                        self.copy_byte(b',')?;
                        self.ws();
                    } else {
                        return self.copy_byte(b'}');
                    }
                }
            }
            b'[' => {
                self.copy_byte(b'[')?;
                self.ws();
                if self.peek()? == b']' {
                    return self.copy_byte(b']');
                }
                let mut idx = 0;
                loop {
                    self.path.push(Seg::Idx(idx));
                    self.value(selected, depth + 1)?;
                    self.path.pop();
                    idx += 1;
                    self.ws();
                    if self.peek()? == b',' {
                        self.copy_byte(b',')?;
                        self.ws();
                    } else {
                        return self.copy_byte(b']');
                    }
                }
            }
            b'"' => {
                let (s, e, text) = self.string_literal()?;
                if selected {
                    self.masked_field();
                    return Some(());
                }
                let mut local = Counts::default();
                let masked = self.spec.mask_text(text.as_bytes(), &mut local);
                if local.total() == 0 {
                    self.out.extend_from_slice(&self.src[s..e]);
                } else {
                    self.counts.merge(&local);
                    let masked = String::from_utf8_lossy(&masked);
                    self.out
                        .extend_from_slice(serde_json::to_string(&masked).ok()?.as_bytes());
                }
                Some(())
            }
            b't' | b'f' | b'n' => {
                for lit in [&b"true"[..], b"false", b"null"] {
                    if self.src[self.pos..].starts_with(lit) {
                        self.out.extend_from_slice(lit);
                        self.pos += lit.len();
                        return Some(());
                    }
                }
                None
            }
            b'-' | b'0'..=b'9' => {
                let start = self.pos;
                self.number()?;
                if selected {
                    self.masked_field();
                } else {
                    self.out.extend_from_slice(&self.src[start..self.pos]);
                }
                Some(())
            }
            _ => None,
        }
    }

    /// Advances over a JSON number (strict grammar) without copying it.
    fn number(&mut self) -> Option<()> {
        let digits = |w: &mut Self| {
            let s = w.pos;
            while w.peek().is_some_and(|b| b.is_ascii_digit()) {
                w.pos += 1;
            }
            w.pos - s
        };
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => {
                digits(self);
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return None;
            }
        }
        Some(())
    }
}
