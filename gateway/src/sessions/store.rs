//! The directory of recordings: `<id>.json.gz` files (mode 0600, in a 0700
//! directory), written whole through a temporary name and renamed, read by
//! `gateway sessions`, and pruned oldest first (by modification time, which
//! is when the connection ended) by age and by total size.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use flate2::{Compression, read::GzDecoder, write::GzEncoder};

use super::Recording;

pub const SUFFIX: &str = ".json.gz";

/// One recording file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub mtime: SystemTime,
}

/// What one pass of retention removed for one reason.
#[derive(Debug, Clone)]
pub struct Removed {
    /// `age` or `size`.
    pub reason: &'static str,
    pub entries: Vec<Entry>,
}

impl Removed {
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// The audit event of this batch.
    pub fn audit(&self, dir: &Path) {
        let ids: Vec<&str> = self
            .entries
            .iter()
            .map(|e| e.id.as_str())
            .take(50)
            .collect();
        tracing::info!(
            target: "gateway::audit",
            event = "sessions_pruned",
            removed = self.entries.len() as u64,
            bytes = self.bytes(),
            reason = self.reason,
            dir = %dir.display(),
            oldest = %self.entries.first().map_or("", |e| e.id.as_str()),
            newest = %self.entries.last().map_or("", |e| e.id.as_str()),
            ids = %ids.join(","),
        );
    }
}

/// A recording id is what the daemon makes (`<ms>-<n>`): digits, letters and
/// dashes only, so it never names a path outside the directory.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn path_of(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}{SUFFIX}"))
}

/// Sort key: modification time, then the id's numbers (daemon start, then
/// session), so recordings ending in the same instant keep their order.
fn order_key(e: &Entry) -> (SystemTime, Vec<u64>, String) {
    let nums = e.id.split('-').filter_map(|p| p.parse().ok()).collect();
    (e.mtime, nums, e.id.clone())
}

/// Every recording in `dir`, oldest first. A missing directory is empty.
/// Temporary files of a write that never finished (a crash) are removed
/// when older than an hour.
pub fn scan(dir: &Path) -> io::Result<Vec<Entry>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Ok(md) = ent.metadata() else { continue };
        if !md.is_file() {
            continue;
        }
        let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if name.starts_with('.') && name.ends_with(".tmp") {
            if now.duration_since(mtime).unwrap_or_default() > Duration::from_secs(3600) {
                let _ = fs::remove_file(ent.path());
            }
            continue;
        }
        let Some(id) = name.strip_suffix(SUFFIX) else {
            continue;
        };
        if !valid_id(id) {
            continue;
        }
        out.push(Entry {
            id: id.to_string(),
            path: ent.path(),
            bytes: md.len(),
            mtime,
        });
    }
    out.sort_by_key(order_key);
    Ok(out)
}

/// Retention: removes recordings older than `max_age` (by modification
/// time), then the oldest until the rest fit in `keep_under` bytes.
/// Returns the batches removed (at most one per reason) and the bytes left.
pub fn prune(
    dir: &Path,
    max_age: Duration,
    keep_under: u64,
    now: SystemTime,
) -> io::Result<(Vec<Removed>, u64)> {
    let entries = scan(dir)?;
    let mut age = Removed {
        reason: "age",
        entries: Vec::new(),
    };
    let mut size = Removed {
        reason: "size",
        entries: Vec::new(),
    };
    let mut kept = Vec::new();
    for e in entries {
        if now.duration_since(e.mtime).unwrap_or_default() > max_age {
            if remove(&e.path) {
                age.entries.push(e);
            }
        } else {
            kept.push(e);
        }
    }
    let mut total: u64 = kept.iter().map(|e| e.bytes).sum();
    for e in kept {
        if total <= keep_under {
            break;
        }
        if remove(&e.path) {
            total = total.saturating_sub(e.bytes);
            size.entries.push(e);
        }
    }
    let batches = [age, size]
        .into_iter()
        .filter(|b| !b.entries.is_empty())
        .collect();
    Ok((batches, total))
}

/// Whether the file is gone now (someone else removing it counts).
fn remove(p: &Path) -> bool {
    match fs::remove_file(p) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(file = %p.display(), error = %e, "cannot remove a session recording");
            false
        }
    }
}

/// The recording as stored: gzip'd JSON.
pub fn encode(rec: &Recording) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(rec).map_err(io::Error::other)?;
    let mut gz = GzEncoder::new(Vec::with_capacity(json.len() / 4 + 64), Compression::new(5));
    gz.write_all(&json)?;
    gz.finish()
}

pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `data` as recording `id`, whole or not at all.
pub fn write(dir: &Path, id: &str, data: &[u8]) -> io::Result<()> {
    ensure_dir(dir)?;
    let tmp = dir.join(format!(".{id}.tmp"));
    let res = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        drop(f);
        fs::rename(&tmp, path_of(dir, id))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Reads and decodes one recording file.
pub fn read_file(path: &Path) -> anyhow::Result<Recording> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // A recording is bounded (caps on bodies and exchanges); so is this.
    let mut json = Vec::new();
    GzDecoder::new(f)
        .take(1 << 30)
        .read_to_end(&mut json)
        .with_context(|| format!("decompressing {}", path.display()))?;
    serde_json::from_slice(&json).with_context(|| format!("parsing {}", path.display()))
}

/// Recording `id` from `dir`, with an error that says where it looked.
pub fn load(dir: &Path, id: &str) -> anyhow::Result<Recording> {
    let id = id.trim().trim_end_matches(SUFFIX);
    anyhow::ensure!(
        valid_id(id),
        "{id:?} is not a recording id (ids look like 1764000000000-12; `gateway sessions list` shows them)"
    );
    let path = path_of(dir, id);
    if !path.exists() {
        anyhow::bail!(
            "no recording {id} in {} (pruned, or never recorded: `gateway sessions list` shows what is there)",
            dir.display()
        );
    }
    read_file(&path)
}
