//! Where tunnel leases live so they survive a relay restart: a small trait with an embedded
//! SQLite implementation (the default, in the data dir) and an in-memory one (tests, or a relay
//! run without a data dir). A shared backend (Redis) can implement the same trait later.
//!
//! A lease binds a tunnel id to its owner (the JWT subject), its public port and the SHA-256 of
//! its current reconnect token. Tokens themselves are never stored.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// One tunnel's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Tunnel id (UUID text).
    pub tunnel_id: String,
    /// JWT subject that owns it.
    pub subject: String,
    /// The tunnel's name.
    pub name: String,
    /// Public port.
    pub port: u16,
    /// Public endpoint (`host:port`) as last given to the agent.
    pub endpoint: String,
    /// SHA-256 of the current reconnect token.
    pub token_hash: [u8; 32],
    /// Effective allow-list (CIDR strings).
    pub allowed_ips: Vec<String>,
    /// Unix seconds after which the lease may be dropped; `None` while an agent holds it.
    pub expires_at: Option<u64>,
}

/// A store failure (logged by the caller; the relay keeps serving from memory).
#[derive(Debug, thiserror::Error)]
#[error("lease store: {0}")]
pub struct StoreError(String);

/// Persistence for leases.
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    /// Every stored lease.
    fn load(&self) -> Result<Vec<Lease>, StoreError>;
    /// Inserts or replaces a lease.
    fn put(&self, lease: &Lease) -> Result<(), StoreError>;
    /// Deletes a lease.
    fn remove(&self, tunnel_id: &str) -> Result<(), StoreError>;
    /// Whether calls may block (disk or network): such stores are called from the blocking
    /// thread pool, the others inline.
    fn blocks(&self) -> bool {
        true
    }
}

/// Leases kept in memory only.
#[derive(Debug, Default)]
pub struct MemoryStore(Mutex<HashMap<String, Lease>>);

impl LeaseStore for MemoryStore {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        Ok(lock(&self.0).values().cloned().collect())
    }
    fn put(&self, lease: &Lease) -> Result<(), StoreError> {
        lock(&self.0).insert(lease.tunnel_id.clone(), lease.clone());
        Ok(())
    }
    fn remove(&self, tunnel_id: &str) -> Result<(), StoreError> {
        lock(&self.0).remove(tunnel_id);
        Ok(())
    }
    fn blocks(&self) -> bool {
        false
    }
}

/// Leases in an SQLite database file (WAL mode). Each call is one short statement; the
/// connection is used by one caller at a time.
#[derive(Debug)]
pub struct SqliteStore(Mutex<rusqlite::Connection>);

/// File name of the lease database inside the data dir.
pub const LEASE_DB: &str = "relay-leases.sqlite3";

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = rusqlite::Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS leases (
                tunnel_id   TEXT PRIMARY KEY,
                subject     TEXT NOT NULL,
                name        TEXT NOT NULL,
                port        INTEGER NOT NULL,
                endpoint    TEXT NOT NULL,
                token_hash  BLOB NOT NULL,
                allowed_ips TEXT NOT NULL,
                expires_at  INTEGER
            );",
        )
        .map_err(err)?;
        Ok(Self(Mutex::new(conn)))
    }
}

impl LeaseStore for SqliteStore {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        let conn = lock(&self.0);
        let mut stmt = conn
            .prepare(
                "SELECT tunnel_id, subject, name, port, token_hash, allowed_ips, expires_at, endpoint
                 FROM leases",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                let hash: Vec<u8> = r.get(4)?;
                let allowed: String = r.get(5)?;
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u16>(3)?,
                    hash,
                    allowed,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, String>(7)?,
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (tunnel_id, subject, name, port, hash, allowed, expires, endpoint) =
                row.map_err(err)?;
            // A row that does not decode is skipped rather than stopping the relay.
            let Ok(token_hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            out.push(Lease {
                tunnel_id,
                subject,
                name,
                port,
                endpoint,
                token_hash,
                allowed_ips: allowed
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                expires_at: expires.map(|e| e.max(0) as u64),
            });
        }
        Ok(out)
    }

    fn put(&self, l: &Lease) -> Result<(), StoreError> {
        lock(&self.0)
            .execute(
                "INSERT OR REPLACE INTO leases
                 (tunnel_id, subject, name, port, token_hash, allowed_ips, expires_at, endpoint)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                rusqlite::params![
                    l.tunnel_id,
                    l.subject,
                    l.name,
                    l.port,
                    l.token_hash.as_slice(),
                    l.allowed_ips.join(","),
                    l.expires_at.map(|e| e.min(i64::MAX as u64) as i64),
                    l.endpoint,
                ],
            )
            .map(|_| ())
            .map_err(err)
    }

    fn remove(&self, tunnel_id: &str) -> Result<(), StoreError> {
        lock(&self.0)
            .execute("DELETE FROM leases WHERE tunnel_id = ?1", [tunnel_id])
            .map(|_| ())
            .map_err(err)
    }
}

impl StoreError {
    /// A filesystem error around the store.
    pub fn from_io(path: &Path, e: std::io::Error) -> Self {
        StoreError(format!("{}: {e}", path.display()))
    }
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind the lock stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, port: u16) -> Lease {
        Lease {
            tunnel_id: id.into(),
            subject: "alice".into(),
            name: "web".into(),
            port,
            endpoint: format!("relay.example:{port}"),
            token_hash: [7; 32],
            allowed_ips: vec!["10.0.0.0/8".into(), "::1/128".into()],
            expires_at: None,
        }
    }

    #[test]
    fn sqlite_leases_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEASE_DB);
        {
            let s = SqliteStore::open(&path).unwrap();
            s.put(&lease("a", 20001)).unwrap();
            s.put(&lease("b", 20002)).unwrap();
            let mut b = lease("b", 20003);
            b.expires_at = Some(1_800_000_000);
            s.put(&b).unwrap();
            s.remove("a").unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let all = s.load().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].port, 20003);
        assert_eq!(all[0].expires_at, Some(1_800_000_000));
        assert_eq!(all[0].allowed_ips, vec!["10.0.0.0/8", "::1/128"]);
        assert_eq!(all[0].token_hash, [7; 32]);
    }

    #[test]
    fn memory_store_behaves_like_sqlite() {
        let m = MemoryStore::default();
        m.put(&lease("a", 1)).unwrap();
        m.put(&lease("a", 2)).unwrap();
        assert_eq!(m.load().unwrap().len(), 1);
        m.remove("a").unwrap();
        assert!(m.load().unwrap().is_empty());
    }
}
