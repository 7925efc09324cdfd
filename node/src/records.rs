//! Stable record identities for query-set overlap control. Each record of a dataset gets a key
//! that survives restarts and reloads of the same records: a keyed hash (HMAC-SHA-256 with the
//! node's own secret) of its identifying local columns — never the values themselves — and
//! each key gets a dense number from a dictionary kept in the state directory, so record sets
//! can be held as compressed bitmaps.
//!
//! The secret (`state_dir/node-secret`, created at first start) never leaves the node; without
//! it nobody can link a key to a person. Keys and numbers never appear in any answer or log.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The state-directory file holding the node's secret.
pub const SECRET_FILE: &str = "node-secret";
/// The folder of overlap-control state inside the state directory.
pub const OVERLAP_DIR: &str = "overlap";
/// The record-number dictionary inside [`OVERLAP_DIR`].
const DICTIONARY_FILE: &str = "record-ids.bin";

/// Bytes of a record key.
pub const KEY_BYTES: usize = 16;
pub type RecordKey = [u8; KEY_BYTES];

/// Creates a folder (and its parents) readable by the node's user only, whatever the umask.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Creates (or truncates) a file readable by the node's user only, whatever the umask.
pub fn private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The node's secret for keyed hashes.
#[derive(Clone)]
pub struct NodeSecret([u8; 32]);

impl std::fmt::Debug for NodeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeSecret(..)")
    }
}

impl NodeSecret {
    /// Reads the secret from `state_dir`, creating it on first start.
    pub fn open(state_dir: &Path) -> Result<NodeSecret, String> {
        let path = state_dir.join(SECRET_FILE);
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            let bytes: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| {
                    format!(
                        "{} is damaged; restore it from the node's backup (a new secret would make every record look new to overlap control)",
                        path.display()
                    )
                })?;
            return Ok(NodeSecret(bytes));
        }
        create_private_dir(state_dir).map_err(|err| format!("{}: {err}", state_dir.display()))?;
        let secret = NodeSecret(rand::random());
        let temporary = path.with_extension("tmp");
        let written = private_file(&temporary)
            .and_then(|mut file| {
                file.write_all(hex::encode(secret.0).as_bytes())?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&temporary, &path))
            .and_then(|()| File::open(state_dir)?.sync_all());
        written.map_err(|err| format!("{}: {err}", path.display()))?;
        Ok(secret)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// A secret for checks that must not touch the state directory (`fedq-node check`).
    pub fn ephemeral() -> NodeSecret {
        NodeSecret(rand::random())
    }

    /// The keyed hash of one record's identifying values (`None`: missing), for `dataset`.
    pub fn record_key(&self, dataset: &str, values: &[Option<&str>]) -> RecordKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"fedq.record/1\0");
        mac.update(dataset.as_bytes());
        mac.update(&[0]);
        for value in values {
            match value {
                Some(text) => {
                    let text = text.trim();
                    mac.update(&[1]);
                    mac.update(&(text.len() as u64).to_be_bytes());
                    mac.update(text.as_bytes());
                }
                None => mac.update(&[0]),
            }
        }
        let digest = mac.finalize().into_bytes();
        let mut key = [0u8; KEY_BYTES];
        key.copy_from_slice(&digest[..KEY_BYTES]);
        key
    }
}

impl NodeSecret {
    /// The published version of a data snapshot whose content hash is `content`: a keyed hash,
    /// equal for the same data at this node and unlinkable to the file for anyone else.
    pub fn snapshot_version(&self, content: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"fedq.snapshot/1\0");
        mac.update(content.as_bytes());
        format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// The node's secret as it is, if `state_dir` holds one (never creates it).
    pub fn existing(state_dir: &Path) -> Option<NodeSecret> {
        state_dir
            .join(SECRET_FILE)
            .exists()
            .then(|| NodeSecret::open(state_dir).ok())
            .flatten()
    }

    /// The key of the `occurrence`-th row (from 2) sharing `key`.
    pub fn occurrence_key(&self, key: &RecordKey, occurrence: u32) -> RecordKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"fedq.record-occurrence/1\0");
        mac.update(key);
        mac.update(&occurrence.to_be_bytes());
        let digest = mac.finalize().into_bytes();
        let mut derived = [0u8; KEY_BYTES];
        derived.copy_from_slice(&digest[..KEY_BYTES]);
        derived
    }
}

/// The record-key setup file inside [`OVERLAP_DIR`].
const KEY_SETUP_FILE: &str = "record-keys.json";

/// Checks that each dataset's record-key columns are the ones the overlap memory was built
/// with (recording them on first start). Changed keys would give every record a new number and
/// silently empty the memory of what was released.
pub fn check_key_setup(
    state_dir: &Path,
    setup: &std::collections::BTreeMap<String, Vec<String>>,
) -> Result<(), String> {
    compare_key_setup(state_dir, setup)?;
    let path = state_dir.join(OVERLAP_DIR).join(KEY_SETUP_FILE);
    let text = serde_json::to_string_pretty(setup).map_err(|err| err.to_string())?;
    std::fs::create_dir_all(state_dir.join(OVERLAP_DIR))
        .and_then(|()| std::fs::write(&path, text))
        .map_err(|err| format!("{}: {err}", path.display()))
}

/// Like [`check_key_setup`] without recording anything (for `fedq-node check`).
pub fn compare_key_setup(
    state_dir: &Path,
    setup: &std::collections::BTreeMap<String, Vec<String>>,
) -> Result<(), String> {
    let path = state_dir.join(OVERLAP_DIR).join(KEY_SETUP_FILE);
    if path.exists() {
        let text =
            std::fs::read_to_string(&path).map_err(|err| format!("{}: {err}", path.display()))?;
        let recorded: std::collections::BTreeMap<String, Vec<String>> = serde_json::from_str(&text)
            .map_err(|err| {
                format!(
                    "{} is damaged ({err}); restore it from the node's backup",
                    path.display()
                )
            })?;
        for (dataset, columns) in setup {
            if let Some(before) = recorded.get(dataset)
                && before != columns
            {
                return Err(format!(
                    "dataset '{dataset}': record_key is now [{}] but the overlap memory was built with [{}]; every record would get a new number and overlap control would forget what was released. Restore the old record_key, or archive the overlap memory deliberately (README, \"Overlap memory\") and delete {}",
                    columns.join(", "),
                    before.join(", "),
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

/// Record keys → dense record numbers, kept in `state_dir/overlap/record-ids.bin` (the keys
/// in number order; append-only, fsynced before any number is used).
#[derive(Debug)]
pub struct RecordNumbers {
    path: PathBuf,
    numbers: HashMap<RecordKey, u32>,
}

impl RecordNumbers {
    /// Opens the dictionary in `state_dir`. A damaged (cut) last entry — the node stopped while
    /// adding keys, before any query used them — is dropped.
    pub fn open(state_dir: &Path) -> Result<RecordNumbers, String> {
        let dir = state_dir.join(OVERLAP_DIR);
        std::fs::create_dir_all(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        let path = dir.join(DICTIONARY_FILE);
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path)
                .and_then(|mut file| file.read_to_end(&mut bytes))
                .map_err(|err| format!("{}: {err}", path.display()))?;
        }
        let whole = bytes.len() - bytes.len() % KEY_BYTES;
        if whole != bytes.len() {
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|file| {
                    file.set_len(whole as u64)?;
                    file.sync_all()
                })
                .map_err(|err| format!("{}: {err}", path.display()))?;
        }
        let mut numbers = HashMap::with_capacity(whole / KEY_BYTES);
        for (number, chunk) in bytes[..whole].chunks_exact(KEY_BYTES).enumerate() {
            let mut key = [0u8; KEY_BYTES];
            key.copy_from_slice(chunk);
            numbers.insert(key, number as u32);
        }
        Ok(RecordNumbers { path, numbers })
    }

    /// The number of each key, giving new keys the next numbers (written durably first).
    pub fn number(&mut self, keys: &[RecordKey]) -> Result<Vec<u32>, String> {
        let mut added = Vec::new();
        let mut result = Vec::with_capacity(keys.len());
        for key in keys {
            let next = self.numbers.len();
            let number = *self.numbers.entry(*key).or_insert_with(|| {
                added.extend_from_slice(key);
                next as u32
            });
            result.push(number);
        }
        if self.numbers.len() > u32::MAX as usize {
            return Err(
                "more than 4 billion distinct records: overlap control cannot number them".into(),
            );
        }
        if !added.is_empty() {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .and_then(|mut file| {
                    file.write_all(&added)?;
                    file.sync_data()
                })
                .map_err(|err| format!("{}: {err}", self.path.display()))?;
        }
        Ok(result)
    }

    pub fn len(&self) -> usize {
        self.numbers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.numbers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_values_give_the_same_key_and_other_secrets_other_keys() {
        let state = tempfile::tempdir().unwrap();
        let secret = NodeSecret::open(state.path()).unwrap();
        let again = NodeSecret::open(state.path()).unwrap();
        let key = secret.record_key("d", &[Some("4711"), None]);
        assert_eq!(key, again.record_key("d", &[Some("4711"), None]));
        assert_ne!(key, secret.record_key("d", &[Some("4712"), None]));
        assert_ne!(key, secret.record_key("other", &[Some("4711"), None]));
        assert_ne!(
            key,
            NodeSecret::ephemeral().record_key("d", &[Some("4711"), None])
        );
        // Value boundaries matter: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            secret.record_key("d", &[Some("ab"), Some("c")]),
            secret.record_key("d", &[Some("a"), Some("bc")])
        );
    }

    #[test]
    fn numbers_are_dense_stable_across_reopening_and_new_keys_are_appended() {
        let state = tempfile::tempdir().unwrap();
        let keys: Vec<RecordKey> = (0..5u8).map(|byte| [byte; KEY_BYTES]).collect();
        {
            let mut numbers = RecordNumbers::open(state.path()).unwrap();
            assert_eq!(numbers.number(&keys[..3]).unwrap(), [0, 1, 2]);
        }
        let mut numbers = RecordNumbers::open(state.path()).unwrap();
        assert_eq!(numbers.len(), 3);
        assert_eq!(
            numbers.number(&[keys[4], keys[1], keys[3]]).unwrap(),
            [3, 1, 4]
        );
    }

    #[test]
    fn a_changed_record_key_is_refused_and_an_unchanged_one_passes() {
        let state = tempfile::tempdir().unwrap();
        let setup = |columns: &[&str]| {
            std::collections::BTreeMap::from([(
                "d".to_string(),
                columns.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            )])
        };
        check_key_setup(state.path(), &setup(&["CASE_NO"])).unwrap();
        check_key_setup(state.path(), &setup(&["CASE_NO"])).unwrap();
        let err = check_key_setup(state.path(), &setup(&["ID_CARD"])).unwrap_err();
        assert!(err.contains("record_key is now [ID_CARD]"), "{err}");
    }

    #[test]
    fn rows_sharing_a_key_get_distinct_stable_occurrence_keys() {
        let secret = NodeSecret::ephemeral();
        let key = secret.record_key("d", &[Some("4711")]);
        let second = secret.occurrence_key(&key, 2);
        assert_ne!(second, key);
        assert_ne!(second, secret.occurrence_key(&key, 3));
        assert_eq!(second, secret.occurrence_key(&key, 2));
    }

    #[test]
    fn a_cut_last_entry_is_dropped_at_open() {
        let state = tempfile::tempdir().unwrap();
        {
            let mut numbers = RecordNumbers::open(state.path()).unwrap();
            numbers.number(&[[1; KEY_BYTES], [2; KEY_BYTES]]).unwrap();
        }
        let path = state.path().join(OVERLAP_DIR).join(DICTIONARY_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[9; 5]).unwrap();
        drop(file);
        let numbers = RecordNumbers::open(state.path()).unwrap();
        assert_eq!(numbers.len(), 2);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            2 * KEY_BYTES as u64
        );
    }
}
