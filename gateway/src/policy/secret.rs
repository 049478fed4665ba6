//! Secret values the gateway injects into requests (`[[secret]]` in the
//! config, `inject = { header, secret }` in a rule). The value never
//! reaches a log, `gateway check` or status: `Debug` and `Display` print
//! `<redacted>`, and the inner `HeaderValue` is marked sensitive (HPACK
//! never indexes it, its own `Debug` hides it).

use std::{fmt, sync::Arc};

use http::HeaderValue;

/// A secret header value. Cheap to clone (shared).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Arc<HeaderValue>);

/// Why bytes cannot be a secret header value. Never carries the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretValueError {
    Empty,
    NotAHeaderValue,
}

impl fmt::Display for SecretValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecretValueError::Empty => "the value is empty",
            SecretValueError::NotAHeaderValue => {
                "the value is not a valid HTTP header value (it holds CR, LF, NUL or another control character, or more than one line)"
            }
        })
    }
}

impl SecretValue {
    /// The bytes as read from the file, with one trailing newline (`\n` or
    /// `\r\n`) removed.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<SecretValue, SecretValueError> {
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if bytes.is_empty() {
            return Err(SecretValueError::Empty);
        }
        let mut v =
            HeaderValue::from_bytes(bytes).map_err(|_| SecretValueError::NotAHeaderValue)?;
        v.set_sensitive(true);
        Ok(SecretValue(Arc::new(v)))
    }

    /// The value to put on the wire (marked sensitive).
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
