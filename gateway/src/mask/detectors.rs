//! Built-in detectors: a bounded regex per detector plus a validator that
//! rejects look-alikes (Luhn, SSN ranges, IBAN mod-97, JWT JSON headers, ...).
//!
//! Every built-in pattern is ASCII-only (`(?-u)`) and bounded in length, so
//! a match never exceeds [`MAX_BUILTIN_MATCH`] bytes; the stream masker relies
//! on that to catch matches split across chunk boundaries. Validators may look
//! at up to [`CONTEXT_BYTES`] bytes before and after a match.

use base64::Engine;

/// Longest match any built-in detector can produce (the JWT pattern).
pub const MAX_BUILTIN_MATCH: usize = 3100;
/// How many bytes around a match validators may inspect.
pub const CONTEXT_BYTES: usize = 8;

/// Decides whether a regex match (masked span `start..end` within `hay`) is a
/// real secret rather than a look-alike.
pub type Validator = fn(hay: &[u8], start: usize, end: usize) -> bool;

pub struct Builtin {
    pub name: &'static str,
    pub pattern: &'static str,
    /// Capture group holding the part to mask; `None` masks the whole match.
    pub group: Option<usize>,
    pub validate: Validator,
}

/// All built-in detectors, in the order used to break ties between
/// overlapping matches of equal start and length.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "jwt",
        pattern: r"(?-u)\beyJ[A-Za-z0-9_-]{5,1000}\.eyJ[A-Za-z0-9_-]{5,1000}\.[A-Za-z0-9_-]{0,1000}",
        group: None,
        validate: valid_jwt,
    },
    Builtin {
        name: "aws_access_key_id",
        pattern: r"(?-u)\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",
        group: None,
        validate: always,
    },
    Builtin {
        name: "github_token",
        pattern: r"(?-u)\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})\b",
        group: None,
        validate: always,
    },
    Builtin {
        name: "slack_token",
        pattern: r"(?-u)\bxox[abposr]-[A-Za-z0-9]{1,60}(?:-[A-Za-z0-9]{1,80}){1,6}\b",
        group: None,
        validate: always,
    },
    Builtin {
        name: "bearer",
        pattern: r"(?-u)\b(?i:bearer) +([A-Za-z0-9._~+/-]{8,1024}=*)",
        group: Some(1),
        validate: valid_bearer,
    },
    Builtin {
        name: "credit_card",
        pattern: r"(?-u)\b[0-9](?:[ -]?[0-9]){12,18}\b",
        group: None,
        validate: valid_card,
    },
    Builtin {
        name: "us_ssn",
        pattern: r"(?-u)\b([0-9]{3})-([0-9]{2})-([0-9]{4})\b",
        group: None,
        validate: valid_ssn,
    },
    Builtin {
        name: "iban",
        pattern: r"(?-u)\b[A-Z]{2}[0-9]{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)\b",
        group: None,
        validate: valid_iban,
    },
    Builtin {
        name: "email",
        pattern: r"(?-u)[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b",
        group: None,
        validate: valid_email,
    },
    Builtin {
        name: "phone",
        pattern: r"(?-u)\+[1-9][0-9]{7,14}\b|\([2-9][0-9]{2}\) ?[0-9]{3}-[0-9]{4}\b|\b[2-9][0-9]{2}-[0-9]{3}-[0-9]{4}\b",
        group: None,
        validate: valid_phone,
    },
];

pub fn builtin(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS.iter().map(|b| b.name).collect()
}

fn always(_: &[u8], _: usize, _: usize) -> bool {
    true
}

fn before(hay: &[u8], start: usize) -> Option<u8> {
    start.checked_sub(1).map(|i| hay[i])
}

fn after(hay: &[u8], end: usize, n: usize) -> Option<u8> {
    hay.get(end + n).copied()
}

/// True when the match continues a larger number-like token: `.5`, `-7`, `,3`.
fn glued_to_number(hay: &[u8], start: usize, end: usize) -> bool {
    let joined_before = matches!(before(hay, start), Some(b'.' | b'-' | b',' | b'/' | b':'))
        && start >= 2
        && hay[start - 2].is_ascii_digit();
    let joined_after = matches!(after(hay, end, 0), Some(b'.' | b'-' | b',' | b'/' | b':'))
        && after(hay, end, 1).is_some_and(|b| b.is_ascii_digit());
    joined_before || joined_after
}

pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

fn valid_card(hay: &[u8], start: usize, end: usize) -> bool {
    let m = &hay[start..end];
    if glued_to_number(hay, start, end) {
        return false;
    }
    // One kind of separator at most, and never two in a row (the regex
    // already forbids doubles).
    let seps: Vec<u8> = m.iter().copied().filter(|b| !b.is_ascii_digit()).collect();
    if seps.windows(2).any(|w| w[0] != w[1]) {
        return false;
    }
    let digits: Vec<u8> = m.iter().copied().filter(u8::is_ascii_digit).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    // Issuer prefixes: 2 (Mastercard 2-series), 3 (Amex, Diners, JCB),
    // 4 (Visa), 5 (Mastercard), 6 (Discover, UnionPay). Rules out epoch
    // timestamps (1…) and zero-padded ids; 13 digits exist only for Visa.
    if !(b'2'..=b'6').contains(&digits[0]) || (digits.len() == 13 && digits[0] != b'4') {
        return false;
    }
    luhn(&digits)
}

fn valid_ssn(hay: &[u8], start: usize, end: usize) -> bool {
    let m = &hay[start..end];
    if glued_to_number(hay, start, end) {
        return false;
    }
    let num = |r: std::ops::Range<usize>| -> u32 {
        m[r].iter().fold(0, |a, d| a * 10 + u32::from(d - b'0'))
    };
    let (area, group, serial) = (num(0..3), num(4..6), num(7..11));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn valid_iban(hay: &[u8], start: usize, end: usize) -> bool {
    let s: Vec<u8> = hay[start..end]
        .iter()
        .copied()
        .filter(|b| *b != b' ')
        .collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let rearranged = s[4..].iter().chain(&s[..4]);
    let mut rem: u32 = 0;
    for &c in rearranged {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn json_object_segment(seg: &[u8]) -> bool {
    let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(seg) else {
        return false;
    };
    matches!(
        serde_json::from_slice::<serde_json::Value>(&raw),
        Ok(serde_json::Value::Object(_))
    )
}

fn valid_jwt(hay: &[u8], start: usize, end: usize) -> bool {
    // The signature must not run on into more base64url text.
    if after(hay, end, 0).is_some_and(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return false;
    }
    let m = &hay[start..end];
    let mut parts = m.split(|b| *b == b'.');
    let (Some(h), Some(p)) = (parts.next(), parts.next()) else {
        return false;
    };
    json_object_segment(h) && json_object_segment(p)
}

fn valid_bearer(hay: &[u8], start: usize, end: usize) -> bool {
    // A bearer value is an opaque token: it has at least one digit or mixed
    // case, so "Bearer authentication" in prose is not masked.
    let m = &hay[start..end];
    let has_digit = m.iter().any(u8::is_ascii_digit);
    let has_upper = m.iter().any(u8::is_ascii_uppercase);
    let has_lower = m.iter().any(u8::is_ascii_lowercase);
    has_digit || (has_upper && has_lower)
}

fn valid_email(hay: &[u8], start: usize, end: usize) -> bool {
    // The local part must start at a token boundary, not mid-word.
    let m = &hay[start..end];
    if m[0] == b'.' || m.windows(2).any(|w| w == b"..") {
        return false;
    }
    !before(hay, start).is_some_and(|b| b.is_ascii_alphanumeric() || b"._%+-".contains(&b))
}

fn valid_phone(hay: &[u8], start: usize, end: usize) -> bool {
    if before(hay, start).is_some_and(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'_') {
        return false;
    }
    !glued_to_number(hay, start, end)
}
