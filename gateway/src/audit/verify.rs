//! `gateway audit verify`: reads the audit entries back (`journalctl -o
//! json` lines), orders them by `GATEWAY_SEQ`, recomputes every hash and
//! checks every link, and names each record that is missing or altered.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::chain::{self, HASH, PREV_HASH, SEQ};

/// One entry as read back.
#[derive(Debug, Clone)]
pub struct Entry {
    pub cursor: String,
    /// Every field, values as bytes (journalctl shows binary values as
    /// arrays of numbers).
    pub fields: BTreeMap<String, Vec<u8>>,
}

impl Entry {
    fn text(&self, name: &str) -> Option<String> {
        self.fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn seq(&self) -> Option<u64> {
        self.text(SEQ)?.parse().ok()
    }
}

/// Parses `journalctl -o json` output: one JSON object per line.
pub fn parse(text: &str) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("line {}: not a journal entry in JSON ({e})", i + 1))?;
        let Value::Object(map) = v else {
            anyhow::bail!("line {}: not a JSON object", i + 1);
        };
        let mut fields = BTreeMap::new();
        let mut cursor = String::new();
        for (k, v) in map {
            if k == "__CURSOR" {
                cursor = v.as_str().unwrap_or_default().to_string();
                continue;
            }
            let bytes = match v {
                Value::String(s) => s.into_bytes(),
                Value::Array(items) if items.iter().all(|x| x.is_u64()) => items
                    .iter()
                    .map(|x| x.as_u64().unwrap_or(0) as u8)
                    .collect(),
                // A field set more than once, or shown as null (too big for
                // journalctl without --all): kept as its JSON text, so the
                // hash check names the record.
                other => other.to_string().into_bytes(),
            };
            fields.insert(k, bytes);
        }
        out.push(Entry { cursor, fields });
    }
    Ok(out)
}

/// What is wrong with the trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// Records `from..=to` are absent between `after` and `before`.
    Gap {
        from: u64,
        to: u64,
        after: u64,
        before: u64,
    },
    /// The record's hash does not match its fields.
    Altered { seq: u64, cursor: String },
    /// The record's previous hash is not the hash of the record before it.
    BrokenLink { seq: u64, cursor: String },
    /// Two different records claim the same seq.
    Duplicate { seq: u64, cursor: String },
    /// An entry under the audit identifier without a (valid) seq or hash.
    Unchained { cursor: String, why: String },
    /// The daemon's chain is ahead of the newest record read back.
    MissingTail { from: u64, to: u64, last: u64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cursor = |c: &str| {
            if c.is_empty() {
                String::new()
            } else {
                format!(" (cursor {c})")
            }
        };
        match self {
            Problem::Gap {
                from,
                to,
                after,
                before,
            } => {
                if from == to {
                    write!(
                        f,
                        "record {from} is missing: the chain jumps from seq {after} to {before}"
                    )
                } else {
                    write!(
                        f,
                        "records {from}..{to} are missing: the chain jumps from seq {after} to {before}"
                    )
                }
            }
            Problem::Altered { seq, cursor: c } => write!(
                f,
                "record seq {seq}{} was altered: its hash does not match its fields",
                cursor(c)
            ),
            Problem::BrokenLink { seq, cursor: c } => write!(
                f,
                "record seq {seq}{} does not link to record seq {}: its previous hash is not that record's hash",
                cursor(c),
                seq - 1
            ),
            Problem::Duplicate { seq, cursor: c } => write!(
                f,
                "record seq {seq}{} appears twice with different contents",
                cursor(c)
            ),
            Problem::Unchained { cursor: c, why } => {
                write!(f, "entry{} is not part of the chain: {why}", cursor(c))
            }
            Problem::MissingTail { from, to, last } => {
                if from == to {
                    write!(
                        f,
                        "record {from} is missing at the end: the trail ends at seq {last} but the daemon's chain is at seq {to}"
                    )
                } else {
                    write!(
                        f,
                        "records {from}..{to} are missing at the end: the trail ends at seq {last} but the daemon's chain is at seq {to}"
                    )
                }
            }
        }
    }
}

/// The verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub records: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the chain of `entries` (any order).
pub fn verify(entries: Vec<Entry>) -> Report {
    let mut problems = Vec::new();
    let mut chained: Vec<(u64, Entry)> = Vec::new();
    for e in entries {
        let Some(seq) = e.seq() else {
            let why = match e.text(SEQ) {
                None => "it has no GATEWAY_SEQ".to_string(),
                Some(s) => format!("its GATEWAY_SEQ {s:?} is not a number"),
            };
            problems.push(Problem::Unchained {
                cursor: e.cursor.clone(),
                why,
            });
            continue;
        };
        chained.push((seq, e));
    }
    chained.sort_by_key(|(seq, _)| *seq);
    // The same record read twice (identical fields) counts once.
    let mut records: Vec<(u64, Entry)> = Vec::with_capacity(chained.len());
    for (seq, e) in chained {
        if let Some((last_seq, last)) = records.last()
            && *last_seq == seq
        {
            let gw = |x: &Entry| {
                x.fields
                    .iter()
                    .filter(|(k, _)| k.starts_with(chain::PREFIX))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
            };
            if gw(last) != gw(&e) {
                problems.push(Problem::Duplicate {
                    seq,
                    cursor: e.cursor.clone(),
                });
            }
            continue;
        }
        records.push((seq, e));
    }
    let mut prev: Option<(u64, String)> = None;
    for (seq, e) in &records {
        let seq = *seq;
        let hash = e.text(HASH).unwrap_or_default();
        let prev_hash = e.text(PREV_HASH).unwrap_or_default();
        let computed = chain::entry_hash(
            &prev_hash,
            e.fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        );
        if computed != hash {
            problems.push(Problem::Altered {
                seq,
                cursor: e.cursor.clone(),
            });
        }
        match &prev {
            Some((p, p_hash)) if seq == p + 1 && *p_hash != prev_hash => {
                problems.push(Problem::BrokenLink {
                    seq,
                    cursor: e.cursor.clone(),
                });
            }
            Some((p, _)) if seq == p + 1 => {}
            Some((p, _)) => problems.push(Problem::Gap {
                from: p + 1,
                to: seq - 1,
                after: *p,
                before: seq,
            }),
            None if seq == 1 && prev_hash != chain::zero_hash() => {
                problems.push(Problem::BrokenLink {
                    seq,
                    cursor: e.cursor.clone(),
                });
            }
            None => {}
        }
        prev = Some((seq, hash));
    }
    Report {
        records: records.len(),
        first_seq: records.first().map(|(s, _)| *s),
        last_seq: records.last().map(|(s, _)| *s),
        problems,
    }
}

/// Adds the records the daemon has chained past the end of the trail,
/// except those still waiting in its spool.
pub fn check_tail(report: &mut Report, head: u64, spooled: &[u64]) {
    let last = report.last_seq.unwrap_or(0);
    if head <= last {
        return;
    }
    let missing: Vec<u64> = (last + 1..=head).filter(|s| !spooled.contains(s)).collect();
    if let (Some(from), Some(_)) = (missing.first(), missing.last()) {
        report.problems.push(Problem::MissingTail {
            from: *from,
            to: head,
            last,
        });
    }
}

/// The text report.
pub fn render(report: &Report) -> String {
    let range = match (report.first_seq, report.last_seq) {
        (Some(a), Some(b)) => format!("seq {a}..{b}"),
        _ => "no records".to_string(),
    };
    if report.ok() && report.records == 0 {
        "OK: no audit records (nothing to verify)\n".to_string()
    } else if report.ok() {
        let mut s = format!(
            "OK: {} audit records, {range}, every hash and link verified\n",
            report.records
        );
        if let Some(first) = report.first_seq
            && first > 1
        {
            s += &format!(
                "note: the trail starts at seq {first}; earlier records are no longer in the journal (rotated or vacuumed)\n"
            );
        }
        s
    } else {
        let mut s = format!(
            "FAILED: {} problem(s) in {} audit records ({range}):\n",
            report.problems.len(),
            report.records
        );
        for p in &report.problems {
            s += &format!("  - {p}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::Chain;

    /// A trail of `n` chained entries as journalctl JSON lines.
    fn trail(n: u64) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!(
            "gw-verify-unit-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut chain = Chain::open(&dir.join("chain")).unwrap();
        let lines = (1..=n)
            .map(|i| {
                let mut fields = vec![
                    ("SYSLOG_IDENTIFIER".to_string(), "gateway-audit".to_string()),
                    ("MESSAGE".to_string(), format!("event {i}")),
                    ("GATEWAY_EVENT".to_string(), "http".to_string()),
                    ("GATEWAY_PATH".to_string(), format!("/p/{i}\nsecond line")),
                ];
                chain.link(&mut fields).unwrap();
                let mut obj = serde_json::Map::new();
                obj.insert("__CURSOR".into(), format!("s=abc;i={i}").into());
                for (k, v) in fields {
                    obj.insert(k, v.into());
                }
                Value::Object(obj).to_string()
            })
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        lines
    }

    fn check(lines: &[String]) -> Report {
        verify(parse(&lines.join("\n")).unwrap())
    }

    #[test]
    fn an_untouched_trail_verifies_in_any_order() {
        let mut lines = trail(5);
        lines.reverse();
        let r = check(&lines);
        assert!(r.ok(), "{}", render(&r));
        assert_eq!((r.records, r.first_seq, r.last_seq), (5, Some(1), Some(5)));
        assert!(render(&r).starts_with("OK: 5 audit records, seq 1..5"));
    }

    #[test]
    fn a_removed_record_is_a_named_gap() {
        let mut lines = trail(6);
        lines.remove(2);
        lines.remove(2);
        let r = check(&lines);
        assert_eq!(
            r.problems,
            vec![Problem::Gap {
                from: 3,
                to: 4,
                after: 2,
                before: 5
            }]
        );
        assert!(
            render(&r).contains("records 3..4 are missing: the chain jumps from seq 2 to 5"),
            "{}",
            render(&r)
        );
    }

    #[test]
    fn an_altered_field_names_the_record() {
        let mut lines = trail(4);
        lines[2] = lines[2].replace("\"http\"", "\"dns\"");
        let r = check(&lines);
        assert_eq!(
            r.problems,
            vec![Problem::Altered {
                seq: 3,
                cursor: "s=abc;i=3".into()
            }]
        );
        assert!(render(&r).contains("record seq 3 (cursor s=abc;i=3) was altered"));
    }

    #[test]
    fn a_rehashed_record_breaks_the_next_link() {
        let lines = trail(3);
        let mut entries = parse(&lines.join("\n")).unwrap();
        let e = &mut entries[1];
        e.fields.insert("GATEWAY_EVENT".into(), b"dns".to_vec());
        let prev = String::from_utf8(e.fields[PREV_HASH].clone()).unwrap();
        let h = chain::entry_hash(
            &prev,
            e.fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        );
        e.fields.insert(HASH.into(), h.into_bytes());
        let r = verify(entries);
        assert_eq!(
            r.problems,
            vec![Problem::BrokenLink {
                seq: 3,
                cursor: "s=abc;i=3".into()
            }]
        );
    }

    #[test]
    fn binary_values_duplicates_and_strays() {
        let lines = trail(2);
        // journalctl shows values with control characters as byte arrays.
        let mut v: Value = serde_json::from_str(&lines[1]).unwrap();
        let path = v["GATEWAY_PATH"].as_str().unwrap().as_bytes().to_vec();
        v["GATEWAY_PATH"] = Value::Array(path.into_iter().map(Value::from).collect());
        let mut all = vec![lines[0].clone(), v.to_string(), lines[0].clone()];
        all.push(
            r#"{"__CURSOR":"s=x","SYSLOG_IDENTIFIER":"gateway-audit","MESSAGE":"forged"}"#.into(),
        );
        let r = check(&all);
        assert_eq!(
            r.problems,
            vec![Problem::Unchained {
                cursor: "s=x".into(),
                why: "it has no GATEWAY_SEQ".into()
            }]
        );
        assert_eq!(r.records, 2);
    }

    #[test]
    fn a_missing_tail_is_named_unless_spooled() {
        let lines = trail(3);
        let mut r = check(&lines);
        check_tail(&mut r, 3, &[]);
        assert!(r.ok());
        check_tail(&mut r, 6, &[6]);
        assert_eq!(
            r.problems,
            vec![Problem::MissingTail {
                from: 4,
                to: 6,
                last: 3
            }]
        );
        let mut r = check(&lines);
        check_tail(&mut r, 5, &[4, 5]);
        assert!(r.ok());
    }
}
