//! The hub's node accounts: a name and a one-time password that rotates at every login, behind
//! the [`AccountStore`] trait with an SQLite implementation (the hub's default) and an
//! in-memory one (tests, other crates' tests).
//!
//! # Rotation
//!
//! For each account the store keeps the SHA-256 of its `current` password and, once it has
//! rotated, the SHA-256 of the `previous` one. Passwords themselves are never stored or logged.
//!
//! [`AccountStore::authenticate`] with a password `P`:
//!
//! - `P` matches `current`: `previous := current`, `current := N` (new), and `N` is returned.
//!   The node must persist `N` before it uses the session.
//! - `P` matches `previous` (the node never got `N`, or crashed before saving it):
//!   `current := N'` (new), `previous` unchanged, and `N'` is returned. The unused `N` is void.
//!   A node can recover this way any number of times while it holds the previous password.
//! - anything else, or an unknown name: [`AccountError::Refused`], the same for both.
//!
//! [`AccountStore::confirm_stored`] with the password a login returned (the node's
//! `password_stored`, sent once the password is on its disk): if it is still `current`,
//! `previous := none`. From then on the password used for that login is refused: each password
//! is single use, except in the window between a login and its confirmation, which is what lets
//! a node that crashed before storing `N` log in again. Without a confirmation, the used
//! password is void once its successor is used.
//! Hashes are compared in constant time, and each login reads, compares and updates in one
//! transaction, so two logins racing with the same password cannot both match `current`.
//!
//! # Room
//!
//! A hub open to registration would otherwise keep every account ever made. Each account
//! records when it was last seen (registered, logged in, or its session ended);
//! [`AccountStore::register_in`] keeps at most [`Room::max_accounts`]: at the limit, the account
//! unseen longest gives way to the new one, if it has been unseen for at least
//! [`Room::keep_unseen`] and is not in use (logged in); otherwise the registration gets
//! [`AccountError::Full`]. Ties go to the one registered first.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// Longest account name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Random bytes in a password (it travels as twice as many hex characters).
const PASSWORD_BYTES: usize = 32;

/// A node password: 64 lowercase hex characters (32 random bytes).
///
/// `Debug` prints a placeholder and there is no `Display`: call [`Password::expose`] where the
/// password is really meant to go (the wire, the node's password file).
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// The password text, to send or save.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A fresh random password.
    fn generate() -> Result<Self, AccountError> {
        let mut bytes = [0u8; PASSWORD_BYTES];
        getrandom::fill(&mut bytes)
            .map_err(|e| AccountError::Store(format!("no randomness for a password: {e}")))?;
        Ok(Self(hex::encode(bytes)))
    }

    fn hash(&self) -> Hash {
        hash(&self.0)
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl FromStr for Password {
    type Err = InvalidPassword;

    /// Accepts exactly 64 lowercase hex characters.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_password_text(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidPassword)
        }
    }
}

/// Text that is not a password (see [`Password`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a node password is 64 lowercase hex characters")]
pub struct InvalidPassword;

/// Why an account operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// An account with this name exists already.
    #[error("account name is taken")]
    NameTaken,
    /// The name is not 1 to 64 bytes of `A-Z a-z 0-9 _ . -`.
    #[error("invalid account name: use 1 to 64 of A-Z a-z 0-9 _ . -")]
    InvalidName,
    /// Unknown name or wrong password: one variant, so callers cannot tell which.
    #[error("unknown account or wrong password")]
    Refused,
    /// The store holds [`Room::max_accounts`] and none of them may give way yet.
    #[error("no room for a new account")]
    Full,
    /// The store itself failed (database, randomness). The text is for the log, not for peers.
    #[error("account store: {0}")]
    Store(String),
}

/// How many accounts a store keeps, and which may give way to a new one (module docs).
#[derive(Clone, Copy)]
pub struct Room<'a> {
    /// Accounts at most; a registration at the limit takes the place of one.
    pub max_accounts: usize,
    /// How long an account stays unseen before it may give way.
    pub keep_unseen: Duration,
    /// Whether an account is in use (its node logged in): such an account never gives way.
    pub in_use: &'a (dyn Fn(&str) -> bool + Sync),
}

impl Room<'static> {
    /// No limit: nothing ever gives way.
    pub const UNLIMITED: Room<'static> = Room {
        max_accounts: usize::MAX,
        keep_unseen: Duration::MAX,
        in_use: &never_in_use,
    };
}

impl fmt::Debug for Room<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Room")
            .field("max_accounts", &self.max_accounts)
            .field("keep_unseen", &self.keep_unseen)
            .finish_non_exhaustive()
    }
}

fn never_in_use(_: &str) -> bool {
    false
}

/// A new account: its first password, and the account that gave way to it, if one did.
#[derive(Debug)]
pub struct Registered {
    /// The first password.
    pub password: Password,
    /// The account removed to make room (see [`Room`]).
    pub evicted: Option<String>,
}

/// Persistence for node accounts. See the module docs for the rotation rules.
pub trait AccountStore: Send + Sync + fmt::Debug {
    /// New account within `room`: its first password, and the account that gave way to it.
    /// `Err(NameTaken)` if it exists, `Err(InvalidName)` if the name is not valid, `Err(Full)`
    /// at the limit when no account may give way.
    fn register_in(&self, name: &str, room: &Room<'_>) -> Result<Registered, AccountError>;
    /// New account, without a limit; returns its first password.
    fn register(&self, name: &str) -> Result<Password, AccountError> {
        self.register_in(name, &Room::UNLIMITED).map(|r| r.password)
    }
    /// The account's node was seen now (its session ended): it counts as unseen from now on.
    /// An unknown name changes nothing.
    fn seen(&self, name: &str) -> Result<(), AccountError>;
    /// Checks `password` for `name` and rotates: returns the next password. `Err(Refused)` for
    /// an unknown (or invalid) name and for a wrong password alike.
    fn authenticate(&self, name: &str, password: &str) -> Result<Password, AccountError>;
    /// The node stored `password` (the one a login just returned): if it is still the current
    /// one, the previous password is void. A password that is no longer current (a newer login
    /// took over) changes nothing. `Err(Refused)` for an unknown account.
    fn confirm_stored(&self, name: &str, password: &Password) -> Result<(), AccountError>;
    /// Removes the account (used by an admin; logout does NOT delete accounts).
    /// `Err(Refused)` if there is no such account, `Err(InvalidName)` for an invalid name.
    fn remove(&self, name: &str) -> Result<(), AccountError>;
    /// Whether an account with this name exists (`false` for an invalid name).
    fn exists(&self, name: &str) -> Result<bool, AccountError>;
    /// Whether calls may block (disk or network): such stores are called from the blocking
    /// thread pool, the others inline.
    fn blocks(&self) -> bool {
        true
    }
}

/// Whether `name` is a valid account name: 1 to [`MAX_NAME_LEN`] bytes of
/// `A-Z a-z 0-9 _ . -`. Names are case-sensitive.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Accounts kept in memory only.
#[derive(Default)]
pub struct MemoryAccounts(Mutex<Memory>);

#[derive(Default)]
struct Memory {
    accounts: HashMap<String, MemoryEntry>,
    /// Registration order, for ties between accounts last seen in the same second.
    next_seq: u64,
}

struct MemoryEntry {
    hashes: Hashes,
    last_seen: i64,
    seq: u64,
}

impl MemoryAccounts {
    fn login(&self, name: &str, password: &str) -> Result<(Password, Outcome), AccountError> {
        let presented = check_login_input(name, password)?;
        let next = Password::generate()?;
        let mut memory = lock(&self.0);
        let entry = memory.accounts.get_mut(name);
        let stored = entry.as_ref().map(|e| e.hashes);
        let (hashes, outcome) = rotate(stored, &presented, next.hash())?;
        if let Some(e) = entry {
            e.hashes = hashes;
            e.last_seen = now();
        }
        log_login(name, outcome);
        Ok((next, outcome))
    }
}

impl fmt::Debug for MemoryAccounts {
    // Never print hashes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryAccounts")
            .field("accounts", &lock(&self.0).accounts.len())
            .finish()
    }
}

impl AccountStore for MemoryAccounts {
    fn register_in(&self, name: &str, room: &Room<'_>) -> Result<Registered, AccountError> {
        check_name(name)?;
        let password = Password::generate()?;
        let mut memory = lock(&self.0);
        if memory.accounts.contains_key(name) {
            return Err(AccountError::NameTaken);
        }
        let mut evicted = None;
        if memory.accounts.len() >= room.max_accounts {
            let cutoff = unseen_cutoff(room);
            let victim = memory
                .accounts
                .iter()
                .filter(|(n, e)| e.last_seen <= cutoff && !(room.in_use)(n))
                .min_by_key(|(_, e)| (e.last_seen, e.seq))
                .map(|(n, _)| n.clone())
                .ok_or(AccountError::Full)?;
            memory.accounts.remove(&victim);
            evicted = Some(victim);
        }
        let seq = memory.next_seq;
        memory.next_seq += 1;
        memory.accounts.insert(
            name.to_owned(),
            MemoryEntry {
                hashes: Hashes {
                    current: password.hash(),
                    previous: None,
                },
                last_seen: now(),
                seq,
            },
        );
        Ok(Registered { password, evicted })
    }

    fn authenticate(&self, name: &str, password: &str) -> Result<Password, AccountError> {
        self.login(name, password).map(|(p, _)| p)
    }

    fn confirm_stored(&self, name: &str, password: &Password) -> Result<(), AccountError> {
        let mut memory = lock(&self.0);
        let stored = memory.accounts.get_mut(name).ok_or(AccountError::Refused)?;
        if bool::from(stored.hashes.current.ct_eq(&password.hash())) {
            stored.hashes.previous = None;
        }
        Ok(())
    }

    fn seen(&self, name: &str) -> Result<(), AccountError> {
        if let Some(e) = lock(&self.0).accounts.get_mut(name) {
            e.last_seen = now();
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), AccountError> {
        check_name(name)?;
        match lock(&self.0).accounts.remove(name) {
            Some(_) => Ok(()),
            None => Err(AccountError::Refused),
        }
    }

    fn exists(&self, name: &str) -> Result<bool, AccountError> {
        Ok(is_valid_name(name) && lock(&self.0).accounts.contains_key(name))
    }

    fn blocks(&self) -> bool {
        false
    }
}

/// Accounts in an SQLite database file (WAL mode, `synchronous = FULL`: a rotation the hub has
/// answered must survive a power cut, or the node would hold a password the hub forgot).
/// Each login is one immediate transaction, so it is atomic across connections and processes
/// sharing the file too.
pub struct SqliteAccounts {
    conn: Mutex<rusqlite::Connection>,
    path: PathBuf,
}

impl SqliteAccounts {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, AccountError> {
        let conn = rusqlite::Connection::open(path).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS accounts (
                name       TEXT PRIMARY KEY,
                current    BLOB NOT NULL,
                previous   BLOB,
                created_at INTEGER,
                rotated_at INTEGER,
                last_seen  INTEGER
            );",
        )
        .map_err(db)?;
        // Files from before `last_seen` get the column, filled from what they knew.
        let has_last_seen = conn
            .prepare("SELECT 1 FROM pragma_table_info('accounts') WHERE name = 'last_seen'")
            .and_then(|mut q| q.exists([]))
            .map_err(db)?;
        if !has_last_seen {
            conn.execute_batch(
                "ALTER TABLE accounts ADD COLUMN last_seen INTEGER;
                 UPDATE accounts SET last_seen = COALESCE(rotated_at, created_at, 0);",
            )
            .map_err(db)?;
        }
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS accounts_last_seen ON accounts (last_seen);",
        )
        .map_err(db)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    fn login(&self, name: &str, password: &str) -> Result<(Password, Outcome), AccountError> {
        let presented = check_login_input(name, password)?;
        let next = Password::generate()?;
        let mut conn = lock(&self.conn);
        // IMMEDIATE takes the write lock before the read, so no other login can slip in
        // between our compare and our update.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let row: Option<(Vec<u8>, Option<Vec<u8>>)> = tx
            .query_row(
                "SELECT current, previous FROM accounts WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        let stored = match row {
            None => None,
            Some((current, previous)) => Some(Hashes {
                current: to_hash(&current)?,
                previous: previous.as_deref().map(to_hash).transpose()?,
            }),
        };
        // On refusal `tx` is dropped, which rolls back (nothing was written).
        let (hashes, outcome) = rotate(stored, &presented, next.hash())?;
        tx.execute(
            "UPDATE accounts SET current = ?2, previous = ?3, rotated_at = ?4, last_seen = ?4
             WHERE name = ?1",
            rusqlite::params![
                name,
                hashes.current.as_slice(),
                hashes.previous.as_ref().map(|h| h.as_slice()),
                now(),
            ],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        log_login(name, outcome);
        Ok((next, outcome))
    }
}

/// One account as an operator sees it (never its hashes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    /// The node's name.
    pub name: String,
    /// Unix seconds of its `register`, if recorded.
    pub created_at: Option<i64>,
    /// Unix seconds its node was last seen (see [`Room`]), if recorded.
    pub last_seen: Option<i64>,
}

impl SqliteAccounts {
    /// Every account, by name.
    pub fn list(&self) -> Result<Vec<AccountInfo>, AccountError> {
        let conn = lock(&self.conn);
        let mut q = conn
            .prepare("SELECT name, created_at, last_seen FROM accounts ORDER BY name")
            .map_err(db)?;
        let rows = q
            .query_map([], |r| {
                Ok(AccountInfo {
                    name: r.get(0)?,
                    created_at: r.get(1)?,
                    last_seen: r.get(2)?,
                })
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }
}

impl fmt::Debug for SqliteAccounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteAccounts")
            .field("path", &self.path)
            .finish()
    }
}

impl AccountStore for SqliteAccounts {
    fn register_in(&self, name: &str, room: &Room<'_>) -> Result<Registered, AccountError> {
        check_name(name)?;
        let password = Password::generate()?;
        let mut conn = lock(&self.conn);
        // One immediate transaction: the count, the eviction and the insert stand or fall
        // together, and no other registration slips in between.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let taken = tx
            .query_row("SELECT 1 FROM accounts WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map_err(db)?
            .is_some();
        if taken {
            return Err(AccountError::NameTaken);
        }
        let mut evicted = None;
        let count: i64 = tx
            .query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))
            .map_err(db)?;
        if usize::try_from(count).unwrap_or(usize::MAX) >= room.max_accounts {
            let victim = {
                let mut oldest = tx
                    .prepare(
                        "SELECT name FROM accounts WHERE last_seen <= ?1
                         ORDER BY last_seen, rowid",
                    )
                    .map_err(db)?;
                let mut rows = oldest.query([unseen_cutoff(room)]).map_err(db)?;
                let mut victim = None;
                while let Some(row) = rows.next().map_err(db)? {
                    let candidate: String = row.get(0).map_err(db)?;
                    if !(room.in_use)(&candidate) {
                        victim = Some(candidate);
                        break;
                    }
                }
                victim.ok_or(AccountError::Full)?
            };
            tx.execute("DELETE FROM accounts WHERE name = ?1", [&victim])
                .map_err(db)?;
            evicted = Some(victim);
        }
        tx.execute(
            "INSERT INTO accounts (name, current, previous, created_at, rotated_at, last_seen)
             VALUES (?1, ?2, NULL, ?3, NULL, ?3)",
            rusqlite::params![name, password.hash().as_slice(), now()],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Registered { password, evicted })
    }

    fn seen(&self, name: &str) -> Result<(), AccountError> {
        lock(&self.conn)
            .execute(
                "UPDATE accounts SET last_seen = ?2 WHERE name = ?1",
                rusqlite::params![name, now()],
            )
            .map_err(db)?;
        Ok(())
    }

    fn authenticate(&self, name: &str, password: &str) -> Result<Password, AccountError> {
        self.login(name, password).map(|(p, _)| p)
    }

    fn confirm_stored(&self, name: &str, password: &Password) -> Result<(), AccountError> {
        let conn = lock(&self.conn);
        let cleared = conn
            .execute(
                "UPDATE accounts SET previous = NULL WHERE name = ?1 AND current = ?2",
                rusqlite::params![name, password.hash().as_slice()],
            )
            .map_err(db)?;
        if cleared == 0 {
            let exists = conn
                .query_row("SELECT 1 FROM accounts WHERE name = ?1", [name], |_| Ok(()))
                .optional()
                .map_err(db)?
                .is_some();
            if !exists {
                return Err(AccountError::Refused);
            }
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), AccountError> {
        check_name(name)?;
        let removed = lock(&self.conn)
            .execute("DELETE FROM accounts WHERE name = ?1", [name])
            .map_err(db)?;
        if removed == 0 {
            return Err(AccountError::Refused);
        }
        Ok(())
    }

    fn exists(&self, name: &str) -> Result<bool, AccountError> {
        if !is_valid_name(name) {
            return Ok(false);
        }
        lock(&self.conn)
            .query_row("SELECT 1 FROM accounts WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map(|row| row.is_some())
            .map_err(db)
    }
}

type Hash = [u8; 32];

/// What the store keeps per account.
#[derive(Clone, Copy)]
struct Hashes {
    current: Hash,
    previous: Option<Hash>,
}

/// Which password a successful login used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The current one: it is now `previous`.
    Rotated,
    /// The previous one: the last rotation was lost and is now void.
    Recovered,
}

/// The rotation rule (module docs), shared by both stores: the new hashes, or `Refused`.
fn rotate(
    stored: Option<Hashes>,
    presented: &Hash,
    next: Hash,
) -> Result<(Hashes, Outcome), AccountError> {
    // No effort to make an unknown name as slow as a wrong password: `register` answers
    // `NameTaken` anyway, so whether a name exists is no secret.
    let Some(stored) = stored else {
        return Err(AccountError::Refused);
    };
    let current = stored.current.ct_eq(presented);
    let previous = match &stored.previous {
        Some(p) => p.ct_eq(presented),
        None => Choice::from(0),
    };
    if bool::from(current) {
        Ok((
            Hashes {
                current: next,
                previous: Some(stored.current),
            },
            Outcome::Rotated,
        ))
    } else if bool::from(previous) {
        Ok((
            Hashes {
                current: next,
                previous: stored.previous,
            },
            Outcome::Recovered,
        ))
    } else {
        Err(AccountError::Refused)
    }
}

/// Checks a login's input before any lookup: neither an invalid name nor malformed password
/// text can match an account, so both are refused like any other miss.
fn check_login_input(name: &str, password: &str) -> Result<Hash, AccountError> {
    if !is_valid_name(name) || !is_password_text(password) {
        return Err(AccountError::Refused);
    }
    Ok(hash(password))
}

fn log_login(name: &str, outcome: Outcome) {
    match outcome {
        Outcome::Rotated => tracing::debug!(account = name, "password rotated"),
        Outcome::Recovered => tracing::info!(
            account = name,
            "login with the previous password; the unsaved rotation is void"
        ),
    }
}

fn check_name(name: &str) -> Result<(), AccountError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(AccountError::InvalidName)
    }
}

fn is_password_text(s: &str) -> bool {
    s.len() == 2 * PASSWORD_BYTES && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hash(password: &str) -> Hash {
    Sha256::digest(password.as_bytes()).into()
}

fn to_hash(bytes: &[u8]) -> Result<Hash, AccountError> {
    Hash::try_from(bytes).map_err(|_| AccountError::Store("corrupt account row".into()))
}

#[cfg(test)]
thread_local! {
    /// The time `now` gives on this thread, when a test set it.
    static TEST_NOW: std::cell::Cell<Option<i64>> = const { std::cell::Cell::new(None) };
}

/// Seconds since the Unix epoch.
fn now() -> i64 {
    #[cfg(test)]
    if let Some(t) = TEST_NOW.with(|c| c.get()) {
        return t;
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// The latest `last_seen` (seconds) an account may have to give way under `room`.
fn unseen_cutoff(room: &Room<'_>) -> i64 {
    let keep = i64::try_from(room.keep_unseen.as_secs()).unwrap_or(i64::MAX);
    now().saturating_sub(keep)
}

fn db(e: rusqlite::Error) -> AccountError {
    AccountError::Store(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section leaves the data consistent, even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Barrier};

    fn sqlite() -> (tempfile::TempDir, SqliteAccounts) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteAccounts::open(&dir.path().join("accounts.sqlite3")).unwrap();
        (dir, store)
    }

    /// Runs `check` against both stores.
    fn both(check: impl Fn(&dyn AccountStore)) {
        check(&MemoryAccounts::default());
        let (_dir, s) = sqlite();
        check(&s);
    }

    fn auth(s: &dyn AccountStore, name: &str, p: &Password) -> Result<Password, AccountError> {
        s.authenticate(name, p.expose())
    }

    /// Sets the store's clock on this thread to `secs`.
    fn at(secs: i64) {
        TEST_NOW.with(|c| c.set(Some(secs)));
    }

    fn room<'a>(
        max_accounts: usize,
        keep_secs: u64,
        in_use: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> Room<'a> {
        Room {
            max_accounts,
            keep_unseen: Duration::from_secs(keep_secs),
            in_use,
        }
    }

    /// Registers "a" at 1,000 s and "b" at 2,000 s; returns their passwords.
    fn a_then_b(s: &dyn AccountStore) -> (Password, Password) {
        at(1_000);
        let a = s.register("a").unwrap();
        at(2_000);
        (a, s.register("b").unwrap())
    }

    #[test]
    fn at_the_limit_the_account_unseen_longest_gives_way() {
        both(|s| {
            let nobody = |_: &str| false;
            let (pa, pb) = a_then_b(s);
            // a logs in later than b registered: b is now the one unseen longest.
            at(3_000);
            let pa = auth(s, "a", &pa).unwrap();
            let c = s.register_in("c", &room(2, 0, &nobody)).unwrap();
            assert_eq!(c.evicted.as_deref(), Some("b"));
            assert!(!s.exists("b").unwrap());
            assert_eq!(auth(s, "b", &pb).unwrap_err(), AccountError::Refused);
            // Below the limit nothing gives way.
            let d = s.register_in("d", &room(4, 0, &nobody)).unwrap();
            assert_eq!(d.evicted, None);
            assert!(auth(s, "a", &pa).is_ok());
            assert!(auth(s, "c", &c.password).is_ok());
        });
    }

    #[test]
    fn a_session_that_ends_counts_as_seen_then() {
        both(|s| {
            let nobody = |_: &str| false;
            a_then_b(s);
            at(3_000);
            s.seen("a").unwrap();
            s.seen("nobody").unwrap();
            let c = s.register_in("c", &room(2, 0, &nobody)).unwrap();
            assert_eq!(c.evicted.as_deref(), Some("b"));
        });
    }

    #[test]
    fn accounts_in_use_or_seen_lately_never_give_way() {
        both(|s| {
            let nobody = |_: &str| false;
            a_then_b(s);
            // Seen within the last 1,500 s: b (2,000) at 3,000; a (1,000) is older, but in use.
            at(3_000);
            let a_in_use = |n: &str| n == "a";
            let err = s.register_in("c", &room(2, 1_500, &a_in_use)).unwrap_err();
            assert_eq!(err, AccountError::Full);
            // Both in use: full whatever their age.
            let both_in_use = |n: &str| n == "a" || n == "b";
            let err = s.register_in("c", &room(2, 0, &both_in_use)).unwrap_err();
            assert_eq!(err, AccountError::Full);
            assert!(!s.exists("c").unwrap());
            // a no longer in use and unseen for 2,000 s: it gives way, not b.
            let c = s.register_in("c", &room(2, 1_500, &nobody)).unwrap();
            assert_eq!(c.evicted.as_deref(), Some("a"));
            // Ties (the same second) go to the one registered first.
            at(4_000);
            s.register_in("d", &room(3, 0, &nobody)).unwrap();
            s.seen("b").unwrap();
            s.seen("c").unwrap();
            let e = s.register_in("e", &room(3, 0, &nobody)).unwrap();
            assert_eq!(e.evicted.as_deref(), Some("b"));
        });
    }

    #[test]
    fn a_taken_name_at_the_limit_evicts_nothing() {
        both(|s| {
            let nobody = |_: &str| false;
            at(1_000);
            let pa = s.register_in("a", &room(1, 0, &nobody)).unwrap().password;
            assert_eq!(
                s.register_in("a", &room(1, 0, &nobody)).unwrap_err(),
                AccountError::NameTaken
            );
            assert!(auth(s, "a", &pa).is_ok());
        });
    }

    #[test]
    fn sqlite_lists_accounts_by_name_with_their_times() {
        let (_dir, s) = sqlite();
        at(2_000);
        s.register("zed").unwrap();
        at(1_000);
        let a = s.register("alpha").unwrap();
        at(3_000);
        auth(&s, "alpha", &a).unwrap();
        let list = s.list().unwrap();
        let row = |name: &str, created: i64, seen: i64| AccountInfo {
            name: name.into(),
            created_at: Some(created),
            last_seen: Some(seen),
        };
        assert_eq!(
            list,
            vec![row("alpha", 1_000, 3_000), row("zed", 2_000, 2_000)]
        );
        s.remove("zed").unwrap();
        assert_eq!(s.list().unwrap(), vec![row("alpha", 1_000, 3_000)]);
    }

    #[test]
    fn an_account_file_from_before_last_seen_gets_it_from_its_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.sqlite3");
        let (old, older) = (Password::generate().unwrap(), Password::generate().unwrap());
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE accounts (
                    name       TEXT PRIMARY KEY,
                    current    BLOB NOT NULL,
                    previous   BLOB,
                    created_at INTEGER,
                    rotated_at INTEGER
                );",
            )
            .unwrap();
            // "old" registered at 100 and logged in at 5,000; "older" registered at 200 only.
            for (name, p, created, rotated) in [
                ("old", &old, 100, Some(5_000)),
                ("older", &older, 200, None),
            ] {
                conn.execute(
                    "INSERT INTO accounts VALUES (?1, ?2, NULL, ?3, ?4)",
                    rusqlite::params![name, p.hash().as_slice(), created, rotated],
                )
                .unwrap();
            }
        }
        let s = SqliteAccounts::open(&path).unwrap();
        // Opening twice migrates once.
        drop(s);
        let s = SqliteAccounts::open(&path).unwrap();
        at(6_000);
        let nobody = |_: &str| false;
        let new = s.register_in("new", &room(2, 0, &nobody)).unwrap();
        assert_eq!(new.evicted.as_deref(), Some("older"));
        assert!(auth(&s, "old", &old).is_ok());
    }

    #[test]
    fn ten_rotations_each_password_single_use() {
        both(|s| {
            let mut used: Vec<Password> = vec![s.register("node-1").unwrap()];
            for _ in 0..10 {
                let next = auth(s, "node-1", used.last().unwrap()).unwrap();
                assert!(is_password_text(next.expose()));
                // The password before the one just used is refused now its successor was used.
                if used.len() >= 2 {
                    let older = &used[used.len() - 2];
                    assert_eq!(auth(s, "node-1", older).unwrap_err(), AccountError::Refused);
                }
                used.push(next);
            }
            let distinct: HashSet<&str> = used.iter().map(Password::expose).collect();
            assert_eq!(distinct.len(), 11);
            // Every password older than the last one used is refused.
            for old in &used[..9] {
                assert_eq!(auth(s, "node-1", old).unwrap_err(), AccountError::Refused);
            }
            assert!(auth(s, "node-1", used.last().unwrap()).is_ok());
        });
    }

    #[test]
    fn a_confirmed_password_voids_the_one_it_replaced_at_once() {
        both(|s| {
            let p1 = s.register("n").unwrap();
            s.confirm_stored("n", &p1).unwrap();
            let p2 = auth(s, "n", &p1).unwrap();
            s.confirm_stored("n", &p2).unwrap();
            // p1 was used once and its successor is stored: p1 is refused on second use.
            assert_eq!(auth(s, "n", &p1).unwrap_err(), AccountError::Refused);
            let p3 = auth(s, "n", &p2).unwrap();
            // Unconfirmed (the node crashed before storing p3): p2 still recovers, once.
            let p4 = auth(s, "n", &p2).unwrap();
            assert_eq!(auth(s, "n", &p3).unwrap_err(), AccountError::Refused);
            // A stale confirmation (p3 is no longer current) changes nothing: p2 still works.
            s.confirm_stored("n", &p3).unwrap();
            let p5 = auth(s, "n", &p2).unwrap();
            s.confirm_stored("n", &p5).unwrap();
            assert_eq!(auth(s, "n", &p2).unwrap_err(), AccountError::Refused);
            assert_eq!(auth(s, "n", &p4).unwrap_err(), AccountError::Refused);
            assert!(auth(s, "n", &p5).is_ok());
            assert_eq!(
                s.confirm_stored("nobody", &p5).unwrap_err(),
                AccountError::Refused
            );
        });
    }

    #[test]
    fn recovery_after_a_lost_rotation() {
        both(|s| {
            let p1 = s.register("n").unwrap();
            let p2 = auth(s, "n", &p1).unwrap();
            // The node "crashes" before saving p2 and logs in with p1 again, twice.
            let lost = auth(s, "n", &p1).unwrap();
            let p3 = auth(s, "n", &p1).unwrap();
            assert_eq!(auth(s, "n", &p2).unwrap_err(), AccountError::Refused);
            assert_eq!(auth(s, "n", &lost).unwrap_err(), AccountError::Refused);
            let p4 = auth(s, "n", &p3).unwrap();
            assert_eq!(auth(s, "n", &p1).unwrap_err(), AccountError::Refused);
            assert_eq!(auth(s, "n", &p2).unwrap_err(), AccountError::Refused);
            // p3 is now `previous`: still good for one more recovery.
            let p5 = auth(s, "n", &p3).unwrap();
            assert_eq!(auth(s, "n", &p4).unwrap_err(), AccountError::Refused);
            assert!(auth(s, "n", &p5).is_ok());
        });
    }

    #[test]
    fn unknown_name_and_wrong_password_look_the_same() {
        both(|s| {
            let p = s.register("alice").unwrap();
            let other = Password::generate().unwrap();
            let unknown = s.authenticate("bob", p.expose()).unwrap_err();
            let wrong = s.authenticate("alice", other.expose()).unwrap_err();
            assert_eq!(unknown, AccountError::Refused);
            assert_eq!(unknown, wrong);
            assert_eq!(unknown.to_string(), wrong.to_string());
            for junk in [
                "",
                "x",
                &p.expose().to_uppercase(),
                &format!("{}0", p.expose()),
            ] {
                assert_eq!(
                    s.authenticate("alice", junk).unwrap_err(),
                    AccountError::Refused
                );
            }
            assert_eq!(
                s.authenticate("al ice", p.expose()).unwrap_err(),
                AccountError::Refused
            );
            // Refusals changed nothing.
            assert!(auth(s, "alice", &p).is_ok());
        });
    }

    #[test]
    fn names_are_checked() {
        let long = "a".repeat(MAX_NAME_LEN);
        let too_long = "a".repeat(MAX_NAME_LEN + 1);
        both(|s| {
            for bad in [
                "",
                too_long.as_str(),
                "a b",
                "a/b",
                "ä",
                "a\0",
                "a:b",
                "a\n",
            ] {
                assert_eq!(
                    s.register(bad).unwrap_err(),
                    AccountError::InvalidName,
                    "{bad:?}"
                );
                assert_eq!(s.remove(bad).unwrap_err(), AccountError::InvalidName);
                assert!(!s.exists(bad).unwrap());
            }
            for good in [long.as_str(), "node-1.a_B", "0", "..", "-"] {
                s.register(good).unwrap();
                assert!(s.exists(good).unwrap());
            }
            assert_eq!(
                s.register("node-1.a_B").unwrap_err(),
                AccountError::NameTaken
            );
            // Case-sensitive.
            s.register("NODE-1.A_B").unwrap();
        });
    }

    #[test]
    fn remove_and_register_again() {
        both(|s| {
            let old = s.register("n").unwrap();
            assert!(s.exists("n").unwrap());
            s.remove("n").unwrap();
            assert!(!s.exists("n").unwrap());
            assert_eq!(s.remove("n").unwrap_err(), AccountError::Refused);
            assert_eq!(auth(s, "n", &old).unwrap_err(), AccountError::Refused);
            let new = s.register("n").unwrap();
            assert_eq!(auth(s, "n", &old).unwrap_err(), AccountError::Refused);
            assert!(auth(s, "n", &new).is_ok());
        });
    }

    #[test]
    fn sqlite_reopen_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.sqlite3");
        let (p1, p2) = {
            let s = SqliteAccounts::open(&path).unwrap();
            let p1 = s.register("a").unwrap();
            s.register("gone").unwrap();
            s.remove("gone").unwrap();
            let p2 = s.authenticate("a", p1.expose()).unwrap();
            (p1, p2)
        };
        let s = SqliteAccounts::open(&path).unwrap();
        assert!(s.exists("a").unwrap());
        assert!(!s.exists("gone").unwrap());
        assert_eq!(s.register("a").unwrap_err(), AccountError::NameTaken);
        // `previous` survived too: recovery works after a restart.
        let p3 = s.authenticate("a", p1.expose()).unwrap();
        assert_eq!(
            s.authenticate("a", p2.expose()).unwrap_err(),
            AccountError::Refused
        );
        drop(s);
        let s = SqliteAccounts::open(&path).unwrap();
        s.authenticate("a", p3.expose()).unwrap();
        assert_eq!(
            s.authenticate("a", p1.expose()).unwrap_err(),
            AccountError::Refused
        );
    }

    #[test]
    fn sqlite_stores_hashes_only() {
        let (dir, s) = sqlite();
        let p1 = s.register("a").unwrap();
        let p2 = s.authenticate("a", p1.expose()).unwrap();
        drop(s);
        let conn = rusqlite::Connection::open(dir.path().join("accounts.sqlite3")).unwrap();
        let (cur, prev, created, rotated): (Vec<u8>, Vec<u8>, i64, i64) = conn
            .query_row(
                "SELECT current, previous, created_at, rotated_at FROM accounts",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(cur, hash(p2.expose()));
        assert_eq!(prev, hash(p1.expose()));
        assert!(created > 0 && rotated >= created);
    }

    #[test]
    fn password_debug_is_redacted_and_parsing_is_strict() {
        let p = Password::generate().unwrap();
        assert_eq!(format!("{p:?}"), "Password(<redacted>)");
        assert_eq!(format!("{:?}", Some(&p)), "Some(Password(<redacted>))");
        assert!(is_password_text(p.expose()));
        let parsed: Password = p.expose().parse().unwrap();
        assert_eq!(parsed.expose(), p.expose());
        for bad in [
            "",
            "ab",
            &p.expose().to_uppercase(),
            &p.expose()[1..],
            &format!("{p:?}"),
        ] {
            assert_eq!(bad.parse::<Password>().unwrap_err(), InvalidPassword);
        }
        let g = "g".repeat(64);
        assert!(g.parse::<Password>().is_err());
    }

    #[test]
    fn store_debug_shows_no_hashes() {
        let m = MemoryAccounts::default();
        let p = m.register("a").unwrap();
        let h = hex::encode(hash(p.expose()));
        let shown = format!("{m:?}");
        assert!(
            !shown.contains(&h) && !shown.contains(p.expose()),
            "{shown}"
        );
        let (_dir, s) = sqlite();
        s.register("a").unwrap();
        assert!(format!("{s:?}").contains("accounts.sqlite3"));
    }

    /// Logs in from `threads` threads at once, all with `password`, thread `i` using
    /// `login(i, ...)`; returns each thread's result.
    fn race(
        threads: usize,
        password: &Password,
        login: impl Fn(usize, &str) -> Result<(Password, Outcome), AccountError> + Send + Sync,
    ) -> Vec<Result<(Password, Outcome), AccountError>> {
        let barrier = Barrier::new(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let (barrier, login) = (&barrier, &login);
                    scope.spawn(move || {
                        barrier.wait();
                        login(i, password.expose())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// `n` threads log in with the same password: exactly one may use it as `current`; the
    /// others can only take the recovery path, and exactly one of the handed-out passwords
    /// (the last written) works afterwards.
    fn check_same_password_race(
        store: &dyn AccountStore,
        name: &str,
        results: Vec<Result<(Password, Outcome), AccountError>>,
    ) {
        let ok: Vec<(Password, Outcome)> = results.into_iter().map(Result::unwrap).collect();
        let rotated = ok.iter().filter(|(_, o)| *o == Outcome::Rotated).count();
        assert_eq!(rotated, 1, "a password was accepted twice as current");
        let working = ok
            .iter()
            .filter(|(p, _)| store.authenticate(name, p.expose()).is_ok())
            .count();
        assert_eq!(working, 1);
    }

    #[test]
    fn concurrent_logins_with_one_password_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.sqlite3");
        // Separate connections, as separate processes would have: only the transaction
        // keeps them apart, not our mutex.
        let stores: Vec<SqliteAccounts> = (0..4)
            .map(|_| SqliteAccounts::open(&path).unwrap())
            .collect();
        for round in 0..10 {
            let name = format!("n{round}");
            let p1 = stores[0].register(&name).unwrap();
            let results = race(4, &p1, |i, pw| stores[i].login(&name, pw));
            check_same_password_race(&stores[1], &name, results);
        }
    }

    #[test]
    fn concurrent_logins_with_one_password_memory() {
        let store = Arc::new(MemoryAccounts::default());
        for round in 0..10 {
            let name = format!("n{round}");
            let p1 = store.register(&name).unwrap();
            // Start from a rotated account so `previous` is set too.
            let p2 = store.authenticate(&name, p1.expose()).unwrap();
            let results = race(8, &p2, |_, pw| store.login(&name, pw));
            check_same_password_race(store.as_ref(), &name, results);
        }
    }

    #[test]
    fn current_and_previous_racing_exactly_one_wins() {
        // With `previous = P1, current = P2`, a login with P2 and one with P1 exclude each
        // other whichever goes first; both succeeding would mean they read the same state.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.sqlite3");
        let a = SqliteAccounts::open(&path).unwrap();
        let b = SqliteAccounts::open(&path).unwrap();
        for round in 0..20 {
            let name = format!("n{round}");
            let p1 = a.register(&name).unwrap();
            let p2 = a.authenticate(&name, p1.expose()).unwrap();
            let barrier = Barrier::new(2);
            let (ra, rb) = std::thread::scope(|scope| {
                let ha = scope.spawn(|| {
                    barrier.wait();
                    a.authenticate(&name, p2.expose())
                });
                let hb = scope.spawn(|| {
                    barrier.wait();
                    b.authenticate(&name, p1.expose())
                });
                (ha.join().unwrap(), hb.join().unwrap())
            });
            assert!(ra.is_ok() != rb.is_ok(), "round {round}: {ra:?} {rb:?}");
        }
    }
}
