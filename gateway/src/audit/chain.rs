//! The tamper-evident chain: every audit entry carries `GATEWAY_SEQ` (one
//! more than the entry before it), `GATEWAY_PREV_HASH` (the previous entry's
//! `GATEWAY_HASH`; zeros for the first) and `GATEWAY_HASH`, the SHA-256 of
//! the previous hash and of every `GATEWAY_*` field of the entry but
//! `GATEWAY_HASH` itself, sorted by name, each as
//! `NAME=` + value length (u64, little endian) + value + `\n`.
//!
//! The last seq and hash live in `<state_dir>/audit/chain`, so a restarted
//! daemon continues the chain.

use std::{
    fs::File,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use sha2::{Digest, Sha256};

pub const SEQ: &str = "GATEWAY_SEQ";
pub const PREV_HASH: &str = "GATEWAY_PREV_HASH";
pub const HASH: &str = "GATEWAY_HASH";
pub const PREFIX: &str = "GATEWAY_";

/// The previous hash of the first entry.
pub fn zero_hash() -> String {
    "0".repeat(64)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `GATEWAY_HASH` of an entry given its fields (any order; fields without
/// the `GATEWAY_` prefix and `GATEWAY_HASH` itself are ignored).
pub fn entry_hash<'a>(
    prev_hash: &str,
    fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> String {
    let mut chained: Vec<(&str, &[u8])> = fields
        .into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX) && *k != HASH)
        .collect();
    chained.sort();
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    for (name, value) in chained {
        h.update(name.as_bytes());
        h.update(b"=");
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// The chain's head, persisted after every entry.
#[derive(Debug)]
pub struct Chain {
    /// The last seq handed out (0: none yet).
    seq: u64,
    hash: String,
    path: PathBuf,
    file: File,
}

/// Seq 20 digits, a space, 64 hex digits, a newline: fixed size, so the
/// head is rewritten in place with one `pwrite`.
const RECORD: usize = 20 + 1 + 64 + 1;

impl Chain {
    /// Opens (or starts) the chain at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Chain> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let (seq, hash) = match text {
            None => (0, zero_hash()),
            Some(t) => parse(&t).with_context(|| {
                format!(
                    "{} is damaged ({:?}); the audit chain cannot continue from it: \
                     move it away to start a new chain (`gateway audit verify` will show the break)",
                    path.display(),
                    t.trim()
                )
            })?,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let chain = Chain {
            seq,
            hash,
            path: path.to_path_buf(),
            file,
        };
        chain.persist()?;
        Ok(chain)
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Adds `GATEWAY_SEQ`, `GATEWAY_PREV_HASH` and `GATEWAY_HASH` to the
    /// entry, advances the head and persists it. Returns the seq.
    pub fn link(&mut self, fields: &mut Vec<(String, String)>) -> anyhow::Result<u64> {
        let seq = self.seq + 1;
        fields.push((SEQ.into(), seq.to_string()));
        fields.push((PREV_HASH.into(), self.hash.clone()));
        let hash = entry_hash(
            &self.hash,
            fields.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
        );
        fields.push((HASH.into(), hash.clone()));
        self.seq = seq;
        self.hash = hash;
        self.persist()?;
        Ok(seq)
    }

    fn persist(&self) -> anyhow::Result<()> {
        let line = format!("{:020} {}\n", self.seq, self.hash);
        debug_assert_eq!(line.len(), RECORD);
        self.file
            .write_all_at(line.as_bytes(), 0)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The head as `(seq, hash)` from the chain file's text.
pub fn parse(text: &str) -> Option<(u64, String)> {
    let (seq, hash) = text.trim().split_once(' ')?;
    let seq = seq.parse().ok()?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (seq, hash.to_string()))
}

/// The head persisted at `path`, if any.
pub fn read_head(path: &Path) -> Option<(u64, String)> {
    parse(&std::fs::read_to_string(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gw-chain-unit-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn hash_covers_gateway_fields_in_name_order_only() {
        let a = entry_hash(
            &zero_hash(),
            [
                ("GATEWAY_A", &b"1"[..]),
                ("GATEWAY_B", b"2"),
                ("MESSAGE", b"x"),
            ],
        );
        let b = entry_hash(
            &zero_hash(),
            [
                ("MESSAGE", &b"other"[..]),
                ("GATEWAY_B", b"2"),
                ("GATEWAY_A", b"1"),
            ],
        );
        assert_eq!(a, b, "order and non-GATEWAY fields do not count");
        let c = entry_hash(
            &zero_hash(),
            [("GATEWAY_A", &b"1"[..]), ("GATEWAY_B", b"3")],
        );
        assert_ne!(a, c);
        let d = entry_hash(
            &"1".repeat(64),
            [("GATEWAY_A", &b"1"[..]), ("GATEWAY_B", b"2")],
        );
        assert_ne!(a, d, "the previous hash counts");
        // Lengths make the serialisation unambiguous.
        let e = entry_hash(&zero_hash(), [("GATEWAY_A", &b"1\nGATEWAY_B=2"[..])]);
        assert_ne!(a, e);
        // GATEWAY_HASH itself is left out.
        let f = entry_hash(
            &zero_hash(),
            [
                ("GATEWAY_A", &b"1"[..]),
                ("GATEWAY_B", b"2"),
                ("GATEWAY_HASH", b"zz"),
            ],
        );
        assert_eq!(a, f);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn entries_link_and_the_chain_continues_after_reopening() {
        let d = dir();
        let path = d.join("chain");
        let mut chain = Chain::open(&path).unwrap();
        let mut e1 = fields(&[("GATEWAY_EVENT", "a")]);
        assert_eq!(chain.link(&mut e1).unwrap(), 1);
        let get = |e: &[(String, String)], k: &str| {
            e.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get(&e1, PREV_HASH), zero_hash());
        let h1 = get(&e1, HASH);
        assert_eq!(
            h1,
            entry_hash(
                &zero_hash(),
                e1.iter().map(|(k, v)| (k.as_str(), v.as_bytes()))
            )
        );
        drop(chain);
        let mut chain = Chain::open(&path).unwrap();
        assert_eq!(chain.seq(), 1);
        let mut e2 = fields(&[("GATEWAY_EVENT", "b")]);
        assert_eq!(chain.link(&mut e2).unwrap(), 2);
        assert_eq!(get(&e2, PREV_HASH), h1);
        assert_eq!(read_head(&path), Some((2, get(&e2, HASH))));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_chain_file_is_an_error_not_a_silent_restart() {
        let d = dir();
        let path = d.join("chain");
        std::fs::write(&path, "garbage").unwrap();
        let e = Chain::open(&path).unwrap_err();
        assert!(format!("{e:#}").contains("damaged"), "{e:#}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
