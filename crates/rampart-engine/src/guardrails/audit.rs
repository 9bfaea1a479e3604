//! The audit log: every decision and every rule change, appended to a local file whose entries
//! are hash-chained, so that `rampart audit verify` detects an edited, removed or reordered
//! entry.
//!
//! One entry per line:
//!
//! ```text
//! {"seq":7,"time":"2026-11-22T10:00:00Z","instance":"rampart-1","kind":"decision","prev":"<hash of entry 6>","entry":{...},"hash":"<hex>"}
//! ```
//!
//! `instance` (the service instance that wrote the entry, absent for a replay) names which of
//! a group's instances decided what.
//!
//! `hash` is the SHA-256 of the line's bytes before `,"hash":` (so of `seq`, `time`, `kind`,
//! `prev` and `entry` exactly as written). The first entry's `prev` is 64 zeros. Cutting
//! entries off the end leaves a valid shorter chain: keep the head hash `verify` prints (or the
//! `rampart_audit_entries` metric) somewhere else to detect that too.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_FIELD: &str = ",\"hash\":\"";

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A decision as published.
    Decision,
    /// A detector, table or pipeline file added, changed or removed.
    Rule,
    /// An operator's action: revocation, re-arming.
    Admin,
}

/// A rule change: what changed, its old and new version hash, who and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleChange {
    /// Who made the change take effect (user@host, or the admin client's address).
    pub who: String,
    /// How: `start`, `reload (SIGHUP)`, `reload (file change)`, `reload (admin)`.
    pub via: String,
    /// The detector id, or the file (`pipeline.toml`, `tables/plans.csv`).
    pub what: String,
    /// `added`, `changed` or `removed`.
    pub change: String,
    /// Version before (absent when added).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_version: Option<String>,
    /// Version after (absent when removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_version: Option<String>,
}

#[derive(Serialize)]
struct Body<'a, T: Serialize> {
    seq: u64,
    time: &'a str,
    /// The service instance that wrote it (absent for a replay).
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
    kind: Kind,
    prev: &'a str,
    entry: &'a T,
}

#[derive(Deserialize)]
struct ParsedBody {
    seq: u64,
    prev: String,
}

/// An open audit log, appending.
pub struct AuditLog {
    path: PathBuf,
    file: BufWriter<File>,
    seq: u64,
    head: String,
    instance: Option<String>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("seq", &self.seq)
            .finish()
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, continuing the chain from its last entry. A last
    /// line without its line end (a process killed while appending) is cut off first: entries
    /// are on disk for good only once synced, before a checkpoint, and what came after that
    /// checkpoint is decided and recorded again.
    pub fn open(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        cut_torn_tail(&mut file, path)?;
        let (seq, head) = match last_line(&mut file)? {
            None => (0, GENESIS.to_string()),
            Some(line) => {
                let (body, hash) = split(&line).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: the last line is not an audit entry", path.display()),
                    )
                })?;
                let parsed: ParsedBody = serde_json::from_str(&format!("{body}}}")).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: the last entry does not parse: {e}", path.display()),
                    )
                })?;
                (parsed.seq + 1, hash.to_string())
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            file: BufWriter::new(file),
            seq,
            head,
            instance: None,
        })
    }

    /// Names the instance that writes the entries from now on (in each entry's `instance`):
    /// with many instances in a group, which of them decided what.
    pub fn set_instance(&mut self, instance: &str) {
        self.instance = Some(instance.to_string());
    }

    /// [`Self::open`], then [`Self::record_rules`]: a log that starts with the changes since
    /// the rules it last recorded.
    pub fn open_recording(
        path: &Path,
        rules: &BTreeMap<String, String>,
        who: &str,
        via: &str,
    ) -> io::Result<Self> {
        let mut log = Self::open(path)?;
        log.record_rules(rules, who, via)?;
        Ok(log)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries written so far (the next entry's sequence number).
    pub fn entries(&self) -> u64 {
        self.seq
    }

    /// Appends one entry (buffered; see [`Self::sync`]).
    pub fn append(&mut self, kind: Kind, entry: &impl Serialize) -> io::Result<()> {
        let time = rampart_core::time::now();
        let body = serde_json::to_string(&Body {
            seq: self.seq,
            time: &time,
            instance: self.instance.as_deref(),
            kind,
            prev: &self.head,
            entry,
        })
        .map_err(io::Error::other)?;
        let body = &body[..body.len() - 1];
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        writeln!(self.file, "{body}{HASH_FIELD}{hash}\"}}")?;
        self.seq += 1;
        self.head = hash;
        Ok(())
    }

    /// Writes buffered entries to the OS.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    /// Writes buffered entries and waits until they are on disk.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }

    /// Records the changes between the rule versions last recorded beside the log (in
    /// `<log>.rules`) and `current` (name → version), then remembers `current`.
    pub fn record_rules(
        &mut self,
        current: &BTreeMap<String, String>,
        who: &str,
        via: &str,
    ) -> io::Result<usize> {
        let sidecar = rules_path(&self.path);
        let known: BTreeMap<String, String> = match std::fs::read(&sidecar) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        let mut changes = Vec::new();
        for (what, version) in current {
            match known.get(what) {
                Some(old) if old == version => {}
                old => changes.push(RuleChange {
                    who: who.into(),
                    via: via.into(),
                    what: what.clone(),
                    change: if old.is_some() { "changed" } else { "added" }.into(),
                    old_version: old.cloned(),
                    new_version: Some(version.clone()),
                }),
            }
        }
        for (what, old) in &known {
            if !current.contains_key(what) {
                changes.push(RuleChange {
                    who: who.into(),
                    via: via.into(),
                    what: what.clone(),
                    change: "removed".into(),
                    old_version: Some(old.clone()),
                    new_version: None,
                });
            }
        }
        for change in &changes {
            self.append(Kind::Rule, change)?;
        }
        self.sync()?;
        let tmp = sidecar.with_extension("rules.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(current).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &sidecar)?;
        Ok(changes.len())
    }
}

fn rules_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".rules");
    log.with_file_name(name)
}

/// Who is running this process, as `user@host`.
pub fn local_user() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", host_name())
}

/// This machine's (or container's, or pod's) name.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A line's body (before `,"hash":"`) and hash.
fn split(line: &str) -> Option<(&str, &str)> {
    let at = line.rfind(HASH_FIELD)?;
    let hash = line[at + HASH_FIELD.len()..].strip_suffix("\"}")?;
    Some((&line[..at], hash))
}

/// Cuts a last line left without its line end off the log (see [`AuditLog::open`]).
fn cut_torn_tail(file: &mut File, path: &Path) -> io::Result<()> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 || byte_at(file, len - 1)? == b'\n' {
        return Ok(());
    }
    let keep = line_start(file, len)?;
    file.set_len(keep)?;
    tracing::warn!(
        path = %path.display(),
        bytes = len - keep,
        "the audit log ended with an unfinished entry (a process stopped while writing it): cut off"
    );
    Ok(())
}

fn last_line(file: &mut File) -> io::Result<Option<String>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    // Without the line ends it finishes with.
    let mut end = len;
    while end > 0 && byte_at(file, end - 1)? == b'\n' {
        end -= 1;
    }
    let start = line_start(file, end)?;
    let mut line = vec![0; (end - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    io::Read::read_exact(file, &mut line)?;
    String::from_utf8(line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn byte_at(file: &mut File, at: u64) -> io::Result<u8> {
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(at))?;
    io::Read::read_exact(file, &mut byte)?;
    Ok(byte[0])
}

/// Where the line holding the byte before `end` starts: just past the last line end before
/// `end`, else 0. Read back in growing windows (entries are small).
fn line_start(file: &mut File, end: u64) -> io::Result<u64> {
    let mut window = 64 * 1024u64;
    loop {
        let start = end.saturating_sub(window);
        let mut tail = vec![0; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        io::Read::read_exact(file, &mut tail)?;
        if let Some(nl) = tail.iter().rposition(|b| *b == b'\n') {
            return Ok(start + nl as u64 + 1);
        }
        if start == 0 {
            return Ok(0);
        }
        window *= 4;
    }
}

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries in the chain.
    pub entries: u64,
    /// The last entry's hash (64 zeros for an empty log).
    pub head: String,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct Broken {
    /// The log.
    pub path: String,
    /// 1-based line of the first bad entry.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Checks every entry's hash and its link to the one before.
pub fn verify(path: &Path) -> io::Result<Result<Verified, Broken>> {
    let reader = BufReader::new(File::open(path)?);
    let mut prev = GENESIS.to_string();
    let mut entries = 0u64;
    let broken = |line: u64, reason: String| Broken {
        path: path.display().to_string(),
        line,
        reason,
    };
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        let n = i as u64 + 1;
        let Some((body, hash)) = split(&line) else {
            return Ok(Err(broken(n, "not an audit entry (no hash)".into())));
        };
        let actual = hex::encode(Sha256::digest(body.as_bytes()));
        if actual != hash {
            return Ok(Err(broken(
                n,
                "the entry was edited: its content does not match its hash".into(),
            )));
        }
        let parsed: ParsedBody = match serde_json::from_str(&format!("{body}}}")) {
            Ok(p) => p,
            Err(e) => return Ok(Err(broken(n, format!("the entry does not parse: {e}")))),
        };
        if parsed.seq != entries {
            return Ok(Err(broken(
                n,
                format!(
                    "entry number {} where {entries} was expected: entries were removed or reordered",
                    parsed.seq
                ),
            )));
        }
        if parsed.prev != prev {
            return Ok(Err(broken(
                n,
                "the entry does not link to the one before it: entries were removed or reordered".into(),
            )));
        }
        prev = hash.to_string();
        entries += 1;
    }
    Ok(Ok(Verified { entries, head: prev }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(String::from)
            .collect()
    }

    fn write(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").expect("write");
    }

    #[test]
    fn an_entry_cut_short_by_a_crash_is_dropped_and_the_chain_goes_on() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("audit.log");
        let mut log = AuditLog::open(&path).expect("open");
        for i in 0..2 {
            log.append(Kind::Decision, &serde_json::json!({"n": i}))
                .expect("append");
        }
        log.sync().expect("sync");
        drop(log);
        let whole = std::fs::read_to_string(&path).expect("read");
        // Killed while appending the third: half of it reached the file.
        let mut torn = whole.clone();
        torn.push_str(&lines(&path)[1][..40]);
        std::fs::write(&path, &torn).expect("write");
        let mut log = AuditLog::open(&path).expect("reopens");
        assert_eq!(log.entries(), 2);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), whole);
        log.append(Kind::Decision, &serde_json::json!({"n": 2}))
            .expect("append");
        log.sync().expect("sync");
        assert_eq!(verify(&path).expect("read").expect("valid").entries, 3);
        // A whole last line that is not an entry is still refused.
        std::fs::write(&path, whole + "not an entry\n").expect("write");
        assert!(AuditLog::open(&path).is_err());
    }

    #[test]
    fn a_chain_verifies_and_continues_across_opens_and_any_tampering_is_found() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("audit.log");
        let mut log = AuditLog::open(&path).expect("open");
        for i in 0..3 {
            log.append(Kind::Decision, &serde_json::json!({"n": i, "actor": "mallory"}))
                .expect("append");
        }
        log.sync().expect("sync");
        drop(log);
        // Continued by another instance (a state partition that moved): its entries name it.
        let mut log = AuditLog::open(&path).expect("reopen");
        log.set_instance("rampart-1");
        assert_eq!(log.entries(), 3);
        log.append(Kind::Admin, &serde_json::json!({"action": "rearm"}))
            .expect("append");
        log.sync().expect("sync");
        let ok = verify(&path).expect("read").expect("valid");
        assert_eq!(ok.entries, 4);

        let good = lines(&path);
        assert!(!good[2].contains("\"instance\""), "{}", good[2]);
        assert!(good[3].contains(",\"instance\":\"rampart-1\","), "{}", good[3]);
        let mut edited = good.clone();
        edited[1] = edited[1].replace("mallory", "alice");
        write(&path, &edited);
        let e = verify(&path).expect("read").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("edited"), "{e}");
        let mut renamed = good.clone();
        renamed[3] = renamed[3].replace("rampart-1", "rampart-2");
        write(&path, &renamed);
        let e = verify(&path).expect("read").unwrap_err();
        assert_eq!(e.line, 4);

        let mut removed = good.clone();
        removed.remove(1);
        write(&path, &removed);
        let e = verify(&path).expect("read").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("removed or reordered"), "{e}");

        let mut reordered = good.clone();
        reordered.swap(1, 2);
        write(&path, &reordered);
        let e = verify(&path).expect("read").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("removed or reordered"), "{e}");
    }

    #[test]
    fn rule_changes_are_recorded_against_the_last_known_versions() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("audit.log");
        let mut log = AuditLog::open(&path).expect("open");
        let v1: BTreeMap<String, String> = [("a".into(), "1".into()), ("b".into(), "1".into())].into();
        assert_eq!(log.record_rules(&v1, "me@here", "start").expect("rules"), 2);
        assert_eq!(log.record_rules(&v1, "me@here", "start").expect("rules"), 0);
        let v2: BTreeMap<String, String> = [("a".into(), "2".into()), ("c".into(), "1".into())].into();
        assert_eq!(
            log.record_rules(&v2, "me@here", "reload (SIGHUP)")
                .expect("rules"),
            3
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains(r#""what":"a","change":"changed","old_version":"1","new_version":"2""#),
            "{text}"
        );
        assert!(
            text.contains(r#""what":"b","change":"removed","old_version":"1""#),
            "{text}"
        );
        assert_eq!(verify(&path).expect("read").expect("valid").entries, 5);
    }
}
