//! Browser sessions and the sign-in throttle.
//!
//! Signing in with a key gives the browser a random session id (never the key) in an
//! HttpOnly, SameSite=Strict cookie that expires; the server keeps, per id, who signed in and
//! the CSRF token its forms carry. Sessions live in memory: a restarted server asks people to
//! sign in again. Failed sign-ins are counted per client address and throttled.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::keys::{Caller, random_hex};

/// One signed-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    pub caller: Caller,
    /// What every form of this session must carry back.
    pub csrf: String,
    expires: Instant,
}

/// Sessions by id, each valid for `lifetime` from sign-in.
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
    lifetime: Duration,
    /// The cookie's name: each server its own, since browsers share cookies across ports.
    pub cookie: &'static str,
}

/// Sessions kept at most; past it the one closest to expiry goes first.
const MOST_SESSIONS: usize = 10_000;

impl Sessions {
    pub fn new(cookie: &'static str, lifetime: Duration) -> Self {
        Sessions { by_id: Mutex::new(HashMap::new()), lifetime, cookie }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for `caller`: its id and the `Set-Cookie` value that hands it over.
    pub fn start(&self, caller: Caller) -> (String, String) {
        let id = random_hex(32);
        let now = Instant::now();
        let mut sessions = self.lock();
        if sessions.len() >= MOST_SESSIONS {
            sessions.retain(|_, s| s.expires > now);
            if sessions.len() >= MOST_SESSIONS {
                if let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.expires).map(|(id, _)| id.clone()) {
                    sessions.remove(&oldest);
                }
            }
        }
        sessions.insert(id.clone(), Session { caller, csrf: random_hex(32), expires: now + self.lifetime });
        let cookie = format!("{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}", self.cookie, self.lifetime.as_secs());
        (id, cookie)
    }

    /// The live session `id` names; an expired one is forgotten.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut sessions = self.lock();
        match sessions.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The `Set-Cookie` value that removes the cookie.
    pub fn clear_cookie(&self) -> String {
        format!("{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0", self.cookie)
    }
}

/// Failed sign-ins allowed per address in a burst, and how fast the allowance comes back.
#[derive(Clone, Copy, Debug)]
pub struct ThrottleRate {
    pub burst: f64,
    pub per_minute: f64,
}

impl Default for ThrottleRate {
    fn default() -> Self {
        ThrottleRate { burst: 5.0, per_minute: 5.0 }
    }
}

struct Allowance {
    left: f64,
    at: Instant,
}

/// Failed sign-ins per client address, as a token bucket: each failure spends one; an
/// address with none left is refused before its key is even looked at.
pub struct LoginThrottle {
    rate: ThrottleRate,
    by_address: Mutex<HashMap<IpAddr, Allowance>>,
}

/// Addresses remembered at most (the fullest buckets are forgotten first).
const MOST_ADDRESSES: usize = 10_000;

impl LoginThrottle {
    pub fn new(rate: ThrottleRate) -> Self {
        LoginThrottle { rate, by_address: Mutex::new(HashMap::new()) }
    }

    fn refilled(&self, allowance: &mut Allowance, now: Instant) {
        let minutes = now.duration_since(allowance.at).as_secs_f64() / 60.0;
        allowance.left = (allowance.left + minutes * self.rate.per_minute).min(self.rate.burst);
        allowance.at = now;
    }

    /// `Err(seconds to wait)` when `address` has used up its failed attempts.
    pub fn check(&self, address: IpAddr) -> Result<(), u64> {
        let mut all = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let Some(allowance) = all.get_mut(&address) else { return Ok(()) };
        self.refilled(allowance, Instant::now());
        if allowance.left >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - allowance.left) * 60.0 / self.rate.per_minute;
        Err(wait.ceil().max(1.0) as u64)
    }

    pub fn failed(&self, address: IpAddr) {
        let now = Instant::now();
        let mut all = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= MOST_ADDRESSES && !all.contains_key(&address) {
            let burst = self.rate.burst;
            all.retain(|_, a| a.left < burst);
        }
        let allowance = all.entry(address).or_insert(Allowance { left: self.rate.burst, at: now });
        self.refilled(allowance, now);
        allowance.left = (allowance.left - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::keys::{Keys, Role, add};

    fn caller(dir: &std::path::Path, name: &str) -> Caller {
        let path = dir.join("keys");
        let key = add(&path, name, Role::Reviewer, &[Role::Reviewer]).unwrap();
        Keys::load(&path, &[Role::Reviewer]).unwrap().check(&key).unwrap()
    }

    #[test]
    fn sessions_are_random_ids_that_expire() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = Sessions::new("test_session", Duration::from_millis(200));
        let (id, cookie) = sessions.start(caller(dir.path(), "ana"));
        let (other, _) = sessions.start(caller(dir.path(), "bo"));
        assert_ne!(id, other);
        assert_eq!(id.len(), 64);
        assert!(cookie.starts_with(&format!("test_session={id};")) && cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        assert!(!cookie.contains("sk-lathe-"), "the cookie never carries the key");
        let session = sessions.get(&id).unwrap();
        assert_eq!(session.caller.name, "ana");
        assert_ne!(session.csrf, sessions.get(&other).unwrap().csrf);
        assert!(sessions.get("not-an-id").is_none());
        sessions.end(&other);
        assert!(sessions.get(&other).is_none());
        std::thread::sleep(Duration::from_millis(250));
        assert!(sessions.get(&id).is_none(), "expired");
    }

    #[test]
    fn failed_sign_ins_are_throttled_per_address() {
        let throttle = LoginThrottle::new(ThrottleRate { burst: 3.0, per_minute: 60.0 });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(throttle.check(a).is_ok());
            throttle.failed(a);
        }
        assert_eq!(throttle.check(a), Err(1), "a fourth attempt waits (one comes back each second)");
        assert!(throttle.check(b).is_ok(), "another address is not held back");
        std::thread::sleep(Duration::from_millis(1100));
        assert!(throttle.check(a).is_ok());
    }
}
