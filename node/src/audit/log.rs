//! The audit log writer: an append-only hash chain of records in segment files under
//! `<state_dir>/audit/`, made durable with group commit.
//!
//! Every request thread appends its record to a shared pending buffer and waits; one of them
//! writes the whole buffer and fsyncs it while the others queue behind, so concurrent queries
//! share one fsync and never interleave. [`AuditLog::append`] returns only after the record is
//! on disk. If a write or fsync fails, the file is cut back to its last durable length, every
//! record of the failed batch is refused (its query is refused: fail closed), and the chain
//! continues from the last durable record.
//!
//! Segments are named after their first record (`audit-000000000001.jsonl`); a new one starts
//! when the current one passes the configured size. Closed segments can be archived elsewhere
//! without breaking the chain: each segment's first record names the last hash of the one
//! before. Documents the records refer to (study approvals, templates) are kept once each, by
//! content hash, in `documents/`.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use fedq_proto::audit_head::{AuditHead, GENESIS_HASH};
use fedq_proto::signing::ExpertSecretKey;
use fedq_proto::wire;

use super::record::{self, Event, Record};

/// The audit folder inside the state directory.
pub const AUDIT_DIR: &str = "audit";
/// The node's audit signing key inside the state directory (kept outside the audit folder, so
/// archiving segments never copies the secret).
pub const KEY_FILE: &str = "audit-key.toml";
/// Default size at which a new segment starts.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Why the audit log cannot take a record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log in {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("cannot write the audit log ({detail})")]
    Write { detail: String },
}

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first_seq: u64,
    pub path: PathBuf,
}

impl Segment {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("audit-{first_seq:012}.jsonl")
}

/// The segments in `dir`, in chain order.
pub fn segments(dir: &Path) -> std::io::Result<Vec<Segment>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let Some(number) = name
            .strip_prefix("audit-")
            .and_then(|rest| rest.strip_suffix(".jsonl"))
        else {
            continue;
        };
        // Exactly the names the writer makes: twelve digits, numbering from 1.
        if number.len() != 12 || !number.bytes().all(|byte| byte.is_ascii_digit()) {
            continue;
        }
        if let Ok(first_seq) = number.parse::<u64>()
            && first_seq >= 1
        {
            found.push(Segment { first_seq, path });
        }
    }
    found.sort_by_key(|segment| segment.first_seq);
    Ok(found)
}

/// The chain's state as the writer sees it.
struct State {
    /// Last record appended (pending or durable) and its hash.
    tip_seq: u64,
    tip_hash: String,
    /// Last record on disk and its hash.
    durable_seq: u64,
    durable_hash: String,
    /// Length of the current segment up to the last durable record.
    durable_len: u64,
    pending: Vec<u8>,
    /// Someone is writing a batch.
    flushing: bool,
    /// Bumped whenever a batch fails.
    generation: u64,
    /// For each failure (indexed by the generation it ended): the last durable record at
    /// that moment and why it failed. A record of an older generation numbered above that
    /// boundary was lost; at or below it, it is on disk.
    failures: Vec<(u64, String)>,
    /// The file cannot be cut back after a failure: refuse everything until a restart.
    broken: Option<String>,
    file: Option<File>,
    segment_first_seq: u64,
}

/// The node's audit log.
pub struct AuditLog {
    dir: PathBuf,
    site_id: String,
    key: ExpertSecretKey,
    segment_bytes: u64,
    state: Mutex<State>,
    written: Condvar,
    /// Documents known to be kept; the lock also serialises writing new ones.
    documents: Mutex<BTreeSet<PathBuf>>,
    /// Held open with an exclusive lock for the log's lifetime: one writer per state directory.
    _lock: File,
}

/// The lock file inside the audit folder.
const LOCK_FILE: &str = ".lock";

/// Takes `file`'s exclusive lock without waiting; false when another process holds it.
fn try_lock(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor the caller owns; no memory is shared.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Takes the audit folder's exclusive lock, or says who holds it.
fn lock_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|err| io_detail(&path, &err))?;
    if try_lock(&file) {
        Ok(file)
    } else {
        Err(format!(
            "another fedq-node process is using this state directory ({} is locked); two nodes must never share one",
            path.display()
        ))
    }
}

/// Whether a running node holds the state directory's audit lock (the directory is in use).
/// Creates nothing; the lock, if this takes it, is released at once.
pub fn in_use(state_dir: &Path) -> bool {
    File::open(state_dir.join(AUDIT_DIR).join(LOCK_FILE)).is_ok_and(|file| !try_lock(&file))
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .field("key_id", &self.key.key_id())
            .finish_non_exhaustive()
    }
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn io_detail(path: &Path, err: &std::io::Error) -> String {
    format!("{}: {err}", path.display())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the node's audit key, or creates one. Returns the key and whether it is new.
fn open_key(state_dir: &Path, site_id: &str) -> Result<(ExpertSecretKey, bool), AuditError> {
    let path = state_dir.join(KEY_FILE);
    let failed = |detail: String| AuditError::Open {
        path: path.display().to_string(),
        detail,
    };
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|err| failed(err.to_string()))?;
        let key = ExpertSecretKey::from_toml(&text, &path.display().to_string())
            .map_err(|err| failed(err.to_string()))?;
        return Ok((key, false));
    }
    let key = ExpertSecretKey::generate(site_id);
    write_durably(&path, key.to_toml().as_bytes()).map_err(|err| failed(err.to_string()))?;
    Ok((key, true))
}

/// Writes a whole file atomically: temporary file, fsync, rename, fsync of the folder.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    {
        let mut file = crate::records::private_file(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The last complete record of a segment, after cutting off an incomplete last line.
/// Returns (last record and hash if any, durable length, bytes discarded).
type SegmentTail = (Option<(Record, String)>, u64, u64);

fn recover_tail(path: &Path) -> Result<SegmentTail, String> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|err| io_detail(path, &err))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|err| io_detail(path, &err))?;
    let complete = bytes
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |at| at + 1);
    let discarded = (bytes.len() - complete) as u64;
    if discarded > 0 {
        // The cut bytes are kept beside the log as evidence, then removed from it.
        let evidence = path.with_extension(format!(
            "discarded-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        ));
        std::fs::write(&evidence, &bytes[complete..])
            .and_then(|()| file.set_len(complete as u64))
            .and_then(|()| file.sync_all())
            .map_err(|err| io_detail(path, &err))?;
    }
    let last = bytes[..complete]
        .split(|byte| *byte == b'\n')
        .rfind(|line| !line.is_empty());
    let last = match last {
        Some(line) => Some(record::decode(line).map_err(|problem| {
            format!(
                "the last record of {} is not valid ({problem:?}); run `fedq-node audit verify` and restore the log from a backup",
                path.display()
            )
        })?),
        None => None,
    };
    Ok((last, complete as u64, discarded))
}

impl AuditLog {
    /// Opens the log in `state_dir` (creating it on first start), discards an incomplete last
    /// line left by a crash (recording that it did), and continues the chain.
    pub fn open(
        state_dir: &Path,
        site_id: &str,
        segment_bytes: u64,
    ) -> Result<AuditLog, AuditError> {
        let dir = state_dir.join(AUDIT_DIR);
        let shown = dir.display().to_string();
        let failed = |detail: String| AuditError::Open {
            path: shown.clone(),
            detail,
        };
        std::fs::create_dir_all(dir.join(DOCUMENTS_DIR))
            .map_err(|err| failed(io_detail(&dir, &err)))?;
        let lock = lock_dir(&dir).map_err(failed)?;
        let (key, new_key) = open_key(state_dir, site_id)?;
        let mut existing = segments(&dir).map_err(|err| failed(io_detail(&dir, &err)))?;
        if existing.is_empty() {
            let path = dir.join(segment_name(1));
            File::create(&path)
                .and_then(|file| file.sync_all())
                .and_then(|()| sync_dir(&dir))
                .map_err(|err| failed(io_detail(&path, &err)))?;
            existing.push(Segment { first_seq: 1, path });
        }
        let current = existing.last().cloned().expect("at least one segment");
        let (mut last, durable_len, discarded) = recover_tail(&current.path).map_err(failed)?;
        let mut torn = Vec::new();
        if discarded > 0 {
            torn.push((current.name(), discarded));
        }
        // An empty newest segment continues from the one before it.
        if last.is_none() && existing.len() > 1 {
            let before = &existing[existing.len() - 2];
            let (before_last, _, before_discarded) = recover_tail(&before.path).map_err(failed)?;
            if before_discarded > 0 {
                torn.push((before.name(), before_discarded));
            }
            last = before_last;
        }
        let (tip_seq, tip_hash) = match last {
            Some((record, hash)) => (record.seq, hash),
            None => (current.first_seq - 1, GENESIS_HASH.to_string()),
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&current.path)
            .map_err(|err| failed(io_detail(&current.path, &err)))?;
        let log = AuditLog {
            dir,
            site_id: site_id.to_string(),
            key,
            segment_bytes: segment_bytes.max(1),
            state: Mutex::new(State {
                tip_seq,
                tip_hash: tip_hash.clone(),
                durable_seq: tip_seq,
                durable_hash: tip_hash,
                durable_len,
                pending: Vec::new(),
                flushing: false,
                generation: 0,
                failures: Vec::new(),
                broken: None,
                file: Some(file),
                segment_first_seq: current.first_seq,
            }),
            written: Condvar::new(),
            documents: Mutex::new(BTreeSet::new()),
            _lock: lock,
        };
        for (segment, bytes) in torn {
            tracing::warn!(%segment, bytes, "cut an incomplete last audit record (kept beside the log as .discarded-*); if its query had been answered, `audit verify --heads` will show the mismatch");
            log.append(Event::TornTailDiscarded { segment, bytes })
                .map_err(|err| failed(err.to_string()))?;
        }
        if new_key {
            log.append(Event::AuditKeyCreated {
                key_id: log.key.key_id(),
            })
            .map_err(|err| failed(err.to_string()))?;
        }
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key id of the node's audit signing key.
    pub fn key_id(&self) -> String {
        self.key.key_id()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent fields (every update is a plain
        // assignment after the I/O), so the state stays usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends one record and returns once it is on disk, with the signed head that includes
    /// it. Fails when the record could not be made durable.
    pub fn append(&self, event: Event) -> Result<wire::SignedAuditHead, AuditError> {
        let mut state = self.lock();
        if let Some(reason) = &state.broken {
            return Err(AuditError::Write {
                detail: reason.clone(),
            });
        }
        let record = Record {
            seq: state.tip_seq + 1,
            time: now_text(),
            prev: state.tip_hash.clone(),
            event,
            salt: Some(record::new_salt()),
        };
        let (line, hash) = record::encode(&record);
        state.pending.extend_from_slice(&line);
        state.tip_seq = record.seq;
        state.tip_hash = hash.clone();
        let generation = state.generation;
        loop {
            if state.generation != generation {
                // The first failure after this record was appended decides its fate.
                let (boundary, detail) = state.failures[generation as usize].clone();
                if record.seq > boundary {
                    return Err(AuditError::Write { detail });
                }
                drop(state);
                return Ok(self.sign_head(record.seq, hash));
            }
            if state.durable_seq >= record.seq {
                drop(state);
                return Ok(self.sign_head(record.seq, hash));
            }
            if state.flushing {
                state = self
                    .written
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            state = self.flush(state);
        }
    }

    /// Writes and fsyncs everything pending; called with the lock held, releases it during
    /// the I/O and returns it re-acquired.
    fn flush<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.flushing = true;
        let batch = std::mem::take(&mut state.pending);
        let (batch_seq, batch_hash) = (state.tip_seq, state.tip_hash.clone());
        let mut file = state.file.take();
        drop(state);
        let written = match file.as_mut() {
            Some(file) => file.write_all(&batch).and_then(|()| file.sync_data()),
            None => Err(std::io::Error::other("no open segment")),
        };
        let mut state = self.lock();
        state.file = file;
        state.flushing = false;
        match written {
            Ok(()) => {
                state.durable_seq = batch_seq;
                state.durable_hash = batch_hash;
                state.durable_len += batch.len() as u64;
                if state.durable_len >= self.segment_bytes && state.pending.is_empty() {
                    self.start_segment(&mut state);
                }
            }
            Err(err) => self.fail_batch(&mut state, &err),
        }
        self.written.notify_all();
        state
    }

    /// Drops the failed batch (and anything chained onto it), cuts the file back to its last
    /// durable length and continues from the last durable record.
    fn fail_batch(&self, state: &mut State, err: &std::io::Error) {
        tracing::error!(error = %err, durable_records = state.durable_seq, "audit write failed; the affected queries are refused");
        state.failures.push((state.durable_seq, err.to_string()));
        state.generation += 1;
        state.pending.clear();
        state.tip_seq = state.durable_seq;
        state.tip_hash = state.durable_hash.clone();
        let durable_len = state.durable_len;
        let cut = match state.file.as_mut() {
            Some(file) => file.set_len(durable_len).and_then(|()| file.sync_all()),
            None => Err(std::io::Error::other("no open segment")),
        };
        if let Err(cut_err) = cut {
            tracing::error!(error = %cut_err, "cannot cut the audit log back after a failed write; refusing every query until the node restarts");
            state.broken = Some(format!(
                "{err}; the log could not be cut back ({cut_err}), so the node refuses every query until it is restarted"
            ));
        }
    }

    /// Starts a new segment after the current one passed its size. On failure the current
    /// segment simply keeps growing.
    fn start_segment(&self, state: &mut State) {
        let first_seq = state.durable_seq + 1;
        let path = self.dir.join(segment_name(first_seq));
        let opened = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .and_then(|file| {
                file.sync_all()?;
                sync_dir(&self.dir)?;
                Ok(file)
            });
        match opened {
            Ok(file) => {
                state.file = Some(file);
                state.durable_len = 0;
                state.segment_first_seq = first_seq;
                tracing::info!(segment = %path.display(), "started a new audit segment");
            }
            Err(err) => {
                tracing::warn!(error = %err, segment = %path.display(), "cannot start a new audit segment; continuing the current one");
            }
        }
    }

    fn sign_head(&self, count: u64, hash: String) -> wire::SignedAuditHead {
        AuditHead {
            site_id: self.site_id.clone(),
            count,
            hash,
            signed_at: now_text(),
        }
        .sign(&self.key)
    }

    /// The signed head of everything on disk now.
    pub fn head(&self) -> wire::SignedAuditHead {
        let state = self.lock();
        let (count, hash) = (state.durable_seq, state.durable_hash.clone());
        drop(state);
        self.sign_head(count, hash)
    }

    /// Keeps a signed document's canonical bytes once, by content hash, so the log's records
    /// can be read later in full (the transparency register needs the study's public fields).
    pub fn keep_document(
        &self,
        kind: &str,
        content_hash: &str,
        canonical: &[u8],
    ) -> Result<(), AuditError> {
        let path = document_path(&self.dir, kind, content_hash);
        let mut known = self
            .documents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if known.contains(&path) {
            return Ok(());
        }
        if !path.exists() {
            write_durably(&path, canonical).map_err(|err| AuditError::Write {
                detail: io_detail(&path, &err),
            })?;
        }
        known.insert(path);
        Ok(())
    }

    /// The first sequence number of the segment being written (for tests and status).
    pub fn current_segment_first_seq(&self) -> u64 {
        self.lock().segment_first_seq
    }
}

/// The documents folder inside the audit folder.
pub const DOCUMENTS_DIR: &str = "documents";

/// Where a kept document lives: `documents/<kind>-<hex of its hash>.json`.
pub fn document_path(audit_dir: &Path, kind: &str, content_hash: &str) -> PathBuf {
    let hex: String = content_hash
        .trim_start_matches("sha256:")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    audit_dir
        .join(DOCUMENTS_DIR)
        .join(format!("{kind}-{hex}.json"))
}

/// Reads the complete lines of a segment (an incomplete last line is returned separately).
pub fn read_segment(path: &Path) -> std::io::Result<(Vec<Vec<u8>>, usize)> {
    let bytes = std::fs::read(path)?;
    let complete = bytes
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |at| at + 1);
    // Every line, empty ones included: an inserted blank line is damage, not nothing.
    let lines = if complete == 0 {
        Vec::new()
    } else {
        bytes[..complete - 1]
            .split(|byte| *byte == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    };
    Ok((lines, bytes.len() - complete))
}
