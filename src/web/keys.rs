//! API keys, stored as salted SHA-256 hashes: one key per line, `NAME ROLE SALT HASH` (hex).
//! The key itself is printed once by `keys add` and never written anywhere.
//!
//! A running server reads the file again whenever it changes. A file that is deleted, emptied
//! or no longer parses locks everyone out (with a log line) until it is fixed: a revocation
//! made by editing the file never leaves the old keys working.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{Result, bad_input, usage};

/// What a key may do. Each server knows some of the roles (serve-guard: client, reviewer;
/// annotate: annotator, admin) and refuses a keys file holding others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// serve-guard: calls the OpenAI endpoints.
    Client,
    /// serve-guard: reviews guard decisions (`/review`, `/v1/review/...`), and may call the API too.
    Reviewer,
    /// annotate: answers items.
    Annotator,
    /// annotate: sees everyone's progress and answers, and may annotate too.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Reviewer => "reviewer",
            Role::Annotator => "annotator",
            Role::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        [Role::Client, Role::Reviewer, Role::Annotator, Role::Admin].into_iter().find(|r| r.name() == name)
    }
}

fn role_names(roles: &[Role]) -> String {
    roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    role: Role,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

/// Who a key belongs to. `hash` names the very key, so a session can check that it is still
/// in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    hash: Vec<u8>,
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
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `n` random bytes as hex: keys, salts, session ids and CSRF tokens.
pub(crate) fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    to_hex(&bytes)
}

impl Keys {
    /// The keys of `path`, every one with a role of `roles`.
    pub fn load(path: &Path, roles: &[Role]) -> Result<Self> {
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
                return Err(at("expected `NAME ROLE SALT HASH` (`keys add` writes them)"));
            };
            let role = Role::parse(role).filter(|r| roles.contains(r)).ok_or_else(|| at(&format!("role `{role}`: expected {}", role_names(roles))))?;
            let salt = from_hex(salt).filter(|s| !s.is_empty()).ok_or_else(|| at("the salt is not hex"))?;
            let hash = from_hex(digest).filter(|h| h.len() == 32).ok_or_else(|| at("the hash is not 64 hex digits (SHA-256)"))?;
            entries.push(Entry { name: name.to_string(), role, salt, hash });
        }
        if entries.is_empty() {
            return Err(bad_input(path, "holds no keys (add one with `keys add`)"));
        }
        Ok(Keys { entries })
    }

    /// The caller a key belongs to.
    pub fn check(&self, key: &str) -> Option<Caller> {
        self.entries
            .iter()
            .find(|e| same(&hash(&e.salt, key), &e.hash))
            .map(|e| Caller { name: e.name.clone(), role: e.role, hash: e.hash.clone() })
    }

    /// Whether the key `caller` signed in with is still here.
    pub fn holds(&self, caller: &Caller) -> bool {
        self.entries.iter().any(|e| e.name == caller.name && e.role == caller.role && same(&e.hash, &caller.hash))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What identifies one version of the keys file; `None` when it is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp { modified: meta.modified().ok(), len: meta.len(), inode })
}

struct Loaded {
    stamp: Option<Stamp>,
    keys: Keys,
}

/// A keys file that is read again when it changes, so `keys add` takes effect on a running
/// server and removing a line revokes that key. A missing, empty or unreadable file refuses
/// every key until it is fixed.
pub struct KeyFile {
    path: PathBuf,
    roles: &'static [Role],
    /// For log lines: `serve-guard`, `annotate`.
    server: &'static str,
    current: Mutex<Loaded>,
}

impl KeyFile {
    /// Open the file at start-up: it must hold at least one key, each with a role of `roles`.
    pub fn open(path: &Path, roles: &'static [Role], server: &'static str) -> Result<Self> {
        let stamp = stamp(path);
        let keys = Keys::load(path, roles)?;
        Ok(KeyFile { path: path.to_path_buf(), roles, server, current: Mutex::new(Loaded { stamp, keys }) })
    }

    pub fn check(&self, key: &str) -> Option<Caller> {
        self.current().keys.check(key)
    }

    /// Whether `caller`'s key is still in the file (a session ends when its key goes).
    pub fn holds(&self, caller: &Caller) -> bool {
        self.current().keys.holds(caller)
    }

    /// The keys as the file holds them now.
    fn current(&self) -> MutexGuard<'_, Loaded> {
        let mut loaded = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.path);
        if now != loaded.stamp {
            let was_locked = loaded.keys.is_empty();
            loaded.keys = match &now {
                None => {
                    self.log(format!("{} is gone: every key is refused until it is back", self.path.display()));
                    Keys::default()
                }
                Some(_) => match Keys::load(&self.path, self.roles) {
                    Ok(keys) => {
                        if was_locked {
                            self.log(format!("{}: {} keys read; signing in works again", self.path.display(), keys.len()));
                        }
                        keys
                    }
                    Err(e) => {
                        self.log(format!("{}; every key is refused until the file is fixed", e.one_line()));
                        Keys::default()
                    }
                },
            };
            loaded.stamp = now;
        }
        loaded
    }

    fn log(&self, line: String) {
        crate::progress::line(format!("{}: keys: {line}", self.server));
    }
}

/// Append a new key for `name` with `role` to the keys file (created if missing) and return
/// the key, which is stored only as a salted hash. `roles`: the roles the file may hold.
pub fn add(path: &Path, name: &str, role: Role, roles: &[Role]) -> Result<String> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(usage(format!("key name `{name}`: must be one word")));
    }
    if !roles.contains(&role) {
        return Err(usage(format!("role `{}`: expected {}", role.name(), role_names(roles))));
    }
    if path.exists() {
        let blank = std::fs::read_to_string(path).is_ok_and(|t| t.lines().all(|l| l.trim().is_empty() || l.trim().starts_with('#')));
        let keys = if blank { Keys::default() } else { Keys::load(path, roles)? };
        if keys.entries.iter().any(|e| e.name == name) {
            return Err(usage(format!("{}: a key named `{name}` exists already", path.display())));
        }
    }
    let key = format!("{KEY_PREFIX}{}", random_hex(24));
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

/// The role names one server's `keys add --role` takes (its own subset of [`Role`]).
pub trait ServerRole: clap::ValueEnum + Clone + Copy + Default + Send + Sync + serde::Serialize + Into<Role> + 'static {}

impl<R: clap::ValueEnum + Clone + Copy + Default + Send + Sync + serde::Serialize + Into<Role> + 'static> ServerRole for R {}

/// `keys add`, as serve-guard and annotate take it.
#[derive(clap::Args, serde::Serialize)]
pub struct KeysAddArgs<R: ServerRole> {
    /// The keys file (created if missing).
    #[arg(long, value_name = "FILE")]
    pub keys: std::path::PathBuf,
    /// Who the key is for (one word).
    #[arg(long)]
    pub name: String,
    #[arg(long, value_enum, default_value_t = R::default())]
    pub role: R,
    #[command(flatten)]
    #[serde(flatten)]
    pub common: crate::cli::CommonArgs,
}

impl<R: ServerRole> KeysAddArgs<R> {
    /// Add the key and print it on standard output, once; `server` names the binary in the
    /// note on standard error and `roles` are the ones its keys file may hold.
    pub fn run(&self, server: &str, roles: &[Role]) -> Result<()> {
        let role: Role = self.role.into();
        let key = add(&self.keys, &self.name, role, roles)?;
        println!("{key}");
        if !self.common.quiet {
            crate::progress::line(format!("{server}: added {} key `{}` to {}; it is shown only this once", role.name(), self.name, self.keys.display()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVE: &[Role] = &[Role::Client, Role::Reviewer];

    #[test]
    fn keys_round_trip_and_refuse_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let client = add(&path, "app", Role::Client, SERVE).unwrap();
        let reviewer = add(&path, "ana", Role::Reviewer, SERVE).unwrap();
        assert!(add(&path, "app", Role::Client, SERVE).is_err());
        assert!(add(&path, "bo", Role::Admin, SERVE).is_err(), "a role this server does not know");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&client) && !text.contains(&reviewer), "keys are stored hashed");
        let keys = Keys::load(&path, SERVE).unwrap();
        assert_eq!(keys.check(&client).unwrap().role, Role::Client);
        assert_eq!(keys.check(&reviewer).unwrap().name, "ana");
        assert!(keys.check("sk-lathe-wrong").is_none());
        let e = Keys::load(&path, &[Role::Annotator, Role::Admin]).unwrap_err().to_string();
        assert!(e.contains("line 1: role `client`: expected annotator, admin"), "{e}");
        std::fs::write(&path, "app client zz 00\n").unwrap();
        assert!(Keys::load(&path, SERVE).unwrap_err().to_string().contains("line 1"));
    }

    /// Issue 18 item 8: emptying, deleting or breaking the keys file revokes every key; a
    /// removed line revokes that key; a fixed file works again.
    #[test]
    fn a_changed_keys_file_revokes_what_it_no_longer_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let ana = add(&path, "ana", Role::Client, SERVE).unwrap();
        let bo = add(&path, "bo", Role::Client, SERVE).unwrap();
        let file = KeyFile::open(&path, SERVE, "test").unwrap();
        let ana_caller = file.check(&ana).unwrap();
        assert!(file.check(&bo).is_some() && file.holds(&ana_caller));

        // Remove bo's line (an editor writes a new file).
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: String = text.lines().filter(|l| l.starts_with("ana ")).map(|l| format!("{l}\n")).collect();
        std::fs::write(path.with_extension("new"), &kept).unwrap();
        std::fs::rename(path.with_extension("new"), &path).unwrap();
        assert!(file.check(&bo).is_none(), "a removed line revokes its key");
        assert!(file.check(&ana).is_some());

        std::fs::write(&path, "").unwrap();
        assert!(file.check(&ana).is_none(), "an emptied file revokes every key");
        assert!(!file.holds(&ana_caller), "and every session");
        std::fs::write(&path, &kept).unwrap();
        assert!(file.check(&ana).is_some(), "a fixed file works again");
        std::fs::remove_file(&path).unwrap();
        assert!(file.check(&ana).is_none(), "a deleted file revokes every key");
        std::fs::write(&path, "ana client nothex 00\n").unwrap();
        assert!(file.check(&ana).is_none(), "a file that does not parse revokes every key");
    }
}
