//! Who may use the coordinator: named users with a role, each authenticated by a personal API
//! token. The coordinator stores only a slow (argon2id) hash of each token; a token is shown
//! once, when it is created (`fedq users token`). A verified token is remembered in memory by
//! its SHA-256, so the slow hash is paid once per token and process.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::CoordinatorError;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs queries under the studies that name them as study lead.
    StudyLead,
    /// Reads the catalogue and sites to review and check templates.
    Expert,
    /// Operates the alliance; reads everything, runs no queries.
    Administrator,
}

/// A user as configured (`[[users]]` in the coordinator configuration).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// The name studies use for their study lead.
    pub name: String,
    pub role: Role,
    /// argon2id PHC string of the user's token.
    pub token_hash: String,
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub role: Role,
}

/// The configured users and the tokens already verified.
#[derive(Debug)]
pub struct Users {
    entries: Vec<UserEntry>,
    verified: Mutex<HashMap<[u8; 32], usize>>,
}

impl Users {
    /// Checks every entry's hash parses.
    pub fn new(entries: Vec<UserEntry>) -> Result<Users, CoordinatorError> {
        let mut problems = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            if PasswordHash::new(&entry.token_hash).is_err() {
                problems.push(format!(
                    "users: '{}': token_hash is not an argon2 hash; create one with `fedq users token`",
                    entry.name
                ));
            }
            if entries[..index]
                .iter()
                .any(|earlier| earlier.name == entry.name)
            {
                problems.push(format!("users: '{}' is listed twice", entry.name));
            }
        }
        if !problems.is_empty() {
            return Err(CoordinatorError::Config(problems));
        }
        Ok(Users {
            entries,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// The user a token belongs to, if any. Malformed tokens are refused before any slow hash
    /// is computed.
    pub fn authenticate(&self, token: &str) -> Option<User> {
        let well_formed = token.strip_prefix("fedq_").is_some_and(|secret| {
            secret.len() == 48 && secret.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !well_formed {
            return None;
        }
        let fingerprint: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let remembered = self.verified.lock().ok()?.get(&fingerprint).copied();
        let index = match remembered {
            Some(index) => index,
            None => {
                let index = self.entries.iter().position(|entry| {
                    PasswordHash::new(&entry.token_hash).is_ok_and(|hash| {
                        Argon2::default()
                            .verify_password(token.as_bytes(), &hash)
                            .is_ok()
                    })
                })?;
                self.verified.lock().ok()?.insert(fingerprint, index);
                index
            }
        };
        let entry = &self.entries[index];
        Some(User {
            name: entry.name.clone(),
            role: entry.role,
        })
    }
}

/// A new random token and its argon2id hash (for the configuration).
pub fn new_token() -> Result<(String, String), CoordinatorError> {
    let token = format!("fedq_{}", hex_token());
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes)
        .map_err(|err| CoordinatorError::Client(format!("cannot make a salt: {err}")))?;
    let hash = Argon2::default()
        .hash_password(token.as_bytes(), &salt)
        .map_err(|err| CoordinatorError::Client(format!("cannot hash the token: {err}")))?
        .to_string();
    Ok((token, hash))
}

fn hex_token() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_authenticates_its_user_only_and_is_stored_as_a_slow_hash() {
        let (token, hash) = new_token().unwrap();
        assert!(hash.starts_with("$argon2id$") && !hash.contains(&token));
        let (other_token, other_hash) = new_token().unwrap();
        let users = Users::new(vec![
            UserEntry {
                name: "Dr. Lead".into(),
                role: Role::StudyLead,
                token_hash: hash,
            },
            UserEntry {
                name: "Admin".into(),
                role: Role::Administrator,
                token_hash: other_hash,
            },
        ])
        .unwrap();
        assert_eq!(users.authenticate(&token).unwrap().name, "Dr. Lead");
        assert_eq!(users.authenticate(&token).unwrap().role, Role::StudyLead);
        assert_eq!(
            users.authenticate(&other_token).unwrap().role,
            Role::Administrator
        );
        assert!(users.authenticate("fedq_wrong").is_none());
        assert!(
            users
                .authenticate(&format!("fedq_{}", "0".repeat(48)))
                .is_none()
        );
    }

    #[test]
    fn unparseable_hash_is_a_configuration_error() {
        let err = Users::new(vec![UserEntry {
            name: "x".into(),
            role: Role::Expert,
            token_hash: "plain".into(),
        }])
        .unwrap_err()
        .to_string();
        assert!(err.contains("not an argon2 hash"), "{err}");
    }
}
