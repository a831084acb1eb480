//! API keys, stored as salted SHA-256 hashes: one key per line, `NAME ROLE SALT HASH` (hex).
//! The key itself is printed once by `serve-guard keys add` and never written anywhere.

use std::io::Write;
use std::path::Path;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{Result, bad_input, usage};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Calls the OpenAI endpoints.
    Client,
    /// Reviews guard decisions (`/review`, `/v1/review/...`), and may call the API too.
    Reviewer,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Reviewer => "reviewer",
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    role: Role,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

/// Who a key belongs to.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

#[derive(Clone, Debug, Default)]
pub struct Keys {
    entries: Vec<Entry>,
}

const KEY_PREFIX: &str = "sk-lathe-";

fn hash(salt: &[u8], key: &str) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(key.as_bytes());
    hasher.finalize().to_vec()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// Equal bytes, in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| bad_input(path, format!("cannot read the keys file: {e}")))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |what: &str| bad_input(path, format!("line {}: {what}", n + 1));
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, salt, digest] = fields[..] else {
                return Err(at("expected `NAME ROLE SALT HASH` (serve-guard keys add writes them)"));
            };
            let role = match role {
                "client" => Role::Client,
                "reviewer" => Role::Reviewer,
                other => return Err(at(&format!("role `{other}`: expected client or reviewer"))),
            };
            let salt = from_hex(salt).filter(|s| !s.is_empty()).ok_or_else(|| at("the salt is not hex"))?;
            let hash = from_hex(digest).filter(|h| h.len() == 32).ok_or_else(|| at("the hash is not 64 hex digits (SHA-256)"))?;
            entries.push(Entry { name: name.to_string(), role, salt, hash });
        }
        if entries.is_empty() {
            return Err(bad_input(path, "holds no keys (add one with `serve-guard keys add`)"));
        }
        Ok(Keys { entries })
    }

    /// The caller a key belongs to.
    pub fn check(&self, key: &str) -> Option<Caller> {
        self.entries
            .iter()
            .find(|e| same(&hash(&e.salt, key), &e.hash))
            .map(|e| Caller { name: e.name.clone(), role: e.role })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A keys file that is read again when it changes, so `keys add` takes effect on a running
/// server. A file that turns bad keeps the keys read before.
pub struct KeyFile {
    path: std::path::PathBuf,
    current: std::sync::Mutex<(Option<std::time::SystemTime>, Keys)>,
}

impl KeyFile {
    pub fn open(path: &Path) -> Result<Self> {
        let keys = Keys::load(path)?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(KeyFile { path: path.to_path_buf(), current: std::sync::Mutex::new((modified, keys)) })
    }

    pub fn check(&self, key: &str) -> Option<Caller> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != current.0 {
            if let Ok(keys) = Keys::load(&self.path) {
                *current = (modified, keys);
            }
        }
        current.1.check(key)
    }
}

/// Append a new key for `name` to the keys file (created if missing) and return the key,
/// which is stored only as a salted hash.
pub fn add(path: &Path, name: &str, role: Role) -> Result<String> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace()) {
        return Err(usage(format!("key name `{name}`: must be one word")));
    }
    if path.exists() {
        let keys = Keys::load(path).or_else(|e| if std::fs::read_to_string(path).is_ok_and(|t| t.trim().is_empty()) { Ok(Keys::default()) } else { Err(e) })?;
        if keys.entries.iter().any(|e| e.name == name) {
            return Err(usage(format!("{}: a key named `{name}` exists already", path.display())));
        }
    }
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    let key = format!("{KEY_PREFIX}{}", to_hex(&secret));
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let line = format!("{name} {} {} {}\n", role.name(), to_hex(&salt), to_hex(&hash(&salt, &key)));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| bad_input(path, format!("cannot write the keys file: {e}")))?;
    file.write_all(line.as_bytes())?;
    file.sync_all()?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let client = add(&path, "app", Role::Client).unwrap();
        let reviewer = add(&path, "ana", Role::Reviewer).unwrap();
        assert!(add(&path, "app", Role::Client).is_err());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&client) && !text.contains(&reviewer), "keys are stored hashed");
        let keys = Keys::load(&path).unwrap();
        assert_eq!(keys.check(&client).unwrap().role, Role::Client);
        assert_eq!(keys.check(&reviewer).unwrap().name, "ana");
        assert!(keys.check("sk-lathe-wrong").is_none());
        std::fs::write(&path, "app client zz 00\n").unwrap();
        assert!(Keys::load(&path).unwrap_err().to_string().contains("line 1"));
    }
}
