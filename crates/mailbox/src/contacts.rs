//! The client's correspondents (`contacts.json` in its data dir): each one's certificate and
//! address, the nonces of the verification-code exchange, and the ids of the messages already
//! received from it (to detect replays). Written privately and atomically after every change.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crypto;

/// File name in the data dir.
pub const CONTACTS_FILE: &str = "contacts.json";

/// Message ids remembered per contact for replay detection.
const SEEN: usize = 4096;

/// Contacts kept at most.
const MAX_CONTACTS: usize = 10_000;

/// One correspondent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Contact {
    /// Their address (`<fingerprint>@<peer>`), as they last gave it.
    pub address: String,
    /// Their certificate, hex DER (its SHA-256 is the key of this entry).
    pub cert: String,
    /// Our nonce for the code with them (hex), committed to in our first message.
    my_nonce: String,
    /// Whether we have revealed our nonce to them.
    revealed: bool,
    /// Their commitment (hex), from their first message.
    their_commit: Option<String>,
    /// Their nonce (hex), once revealed and checked against the commitment.
    their_nonce: Option<String>,
    /// A revealed nonce did not match its commitment: someone tampered; no code is shown.
    pub tampered: bool,
    /// Ids (hex) of the last messages received from them.
    seen: VecDeque<String>,
}

/// What goes into an outgoing message for the code exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeFields {
    /// commit(our nonce), hex.
    pub commit: Option<String>,
    /// Our nonce, hex, once their value is fixed.
    pub nonce: Option<String>,
}

/// Why the contacts file failed.
#[derive(Debug, thiserror::Error)]
pub enum ContactsError {
    /// Reading or writing the file.
    #[error("contacts file {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("contacts file {}: {message}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Too many contacts.
    #[error("contact limit ({MAX_CONTACTS}) reached")]
    Full,
}

/// The contact list, loaded from and saved to the data dir.
#[derive(Debug)]
pub struct Contacts {
    path: PathBuf,
    map: BTreeMap<String, Contact>,
}

impl Contacts {
    /// Loads `contacts.json` from `dir` (empty if it does not exist).
    pub fn load(dir: &Path) -> Result<Self, ContactsError> {
        let path = dir.join(CONTACTS_FILE);
        let map = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ContactsError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(ContactsError::Io { path, source }),
        };
        Ok(Self { path, map })
    }

    fn save(&self) -> Result<(), ContactsError> {
        let bytes = serde_json::to_vec_pretty(&self.map).map_err(|e| ContactsError::Invalid {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        tube_net::files::write_private_atomic(&self.path, &bytes).map_err(|source| {
            ContactsError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Every contact, by fingerprint (hex).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Contact)> {
        self.map.iter()
    }

    /// The contact with this fingerprint.
    pub fn get(&self, fp: &[u8; 32]) -> Option<&Contact> {
        self.map.get(&hex::encode(fp))
    }

    /// Adds or updates a contact (its certificate and latest address); saved.
    pub fn upsert(&mut self, cert: &[u8], address: &str) -> Result<(), ContactsError> {
        let key = hex::encode(crypto::fingerprint(cert));
        if !self.map.contains_key(&key) && self.map.len() >= MAX_CONTACTS {
            return Err(ContactsError::Full);
        }
        let entry = self.map.entry(key).or_insert_with(|| Contact {
            address: address.to_owned(),
            cert: hex::encode(cert),
            my_nonce: hex::encode(crypto::new_nonce()),
            revealed: false,
            their_commit: None,
            their_nonce: None,
            tampered: false,
            seen: VecDeque::new(),
        });
        entry.address = address.to_owned();
        self.save()
    }

    /// The code fields for our next message to `fp`: always our commitment; our nonce once
    /// their value is fixed (they committed or revealed). Saved when the nonce goes out.
    pub fn outgoing(&mut self, fp: &[u8; 32]) -> Result<CodeFields, ContactsError> {
        let Some(c) = self.map.get_mut(&hex::encode(fp)) else {
            return Ok(CodeFields::default());
        };
        let nonce = decode32(&c.my_nonce).unwrap_or_default();
        let mut fields = CodeFields {
            commit: Some(hex::encode(crypto::commit(&nonce))),
            nonce: None,
        };
        if c.their_commit.is_some() || c.their_nonce.is_some() {
            fields.nonce = Some(c.my_nonce.clone());
            if !c.revealed {
                c.revealed = true;
                self.save()?;
            }
        }
        Ok(fields)
    }

    /// Whether message `id` from `fp` was already recorded (a replay).
    pub fn seen(&self, fp: &[u8; 32], id: &[u8; 16]) -> bool {
        self.map
            .get(&hex::encode(fp))
            .is_some_and(|c| c.seen.contains(&hex::encode(id)))
    }

    /// Records a message `id` from `fp` with its code fields. `Ok(false)`: a replay (already
    /// seen), to be dropped. A nonce that does not match the commitment marks the contact
    /// tampered.
    pub fn incoming(
        &mut self,
        fp: &[u8; 32],
        id: &[u8; 16],
        fields: &CodeFields,
    ) -> Result<bool, ContactsError> {
        let Some(c) = self.map.get_mut(&hex::encode(fp)) else {
            return Ok(true);
        };
        let id = hex::encode(id);
        if c.seen.contains(&id) {
            return Ok(false);
        }
        if c.seen.len() >= SEEN {
            c.seen.pop_front();
        }
        c.seen.push_back(id);
        if c.their_commit.is_none()
            && c.their_nonce.is_none()
            && let Some(commit) = &fields.commit
        {
            c.their_commit = Some(commit.clone());
        }
        if c.their_nonce.is_none()
            && let Some(nonce) = &fields.nonce
        {
            let ok = match (&c.their_commit, decode32(nonce)) {
                (Some(commit), Some(n)) => {
                    decode32(commit).is_some_and(|cm| crypto::check_commit(&cm, &n))
                }
                // A nonce without any commitment before it: they revealed first (we committed
                // first, so our value was fixed before theirs).
                (None, Some(_)) => true,
                (_, None) => false,
            };
            if ok {
                c.their_nonce = Some(nonce.clone());
            } else {
                c.tampered = true;
            }
        }
        self.save()?;
        Ok(true)
    }

    /// The 6-digit code with `fp`, once both nonces are known. `my_fp` is our fingerprint.
    pub fn code(&self, my_fp: &[u8; 32], fp: &[u8; 32]) -> Option<String> {
        let c = self.map.get(&hex::encode(fp))?;
        if c.tampered {
            return None;
        }
        let mine = decode32(&c.my_nonce)?;
        let theirs = decode32(c.their_nonce.as_deref()?)?;
        if !c.revealed {
            return None;
        }
        Some(crypto::verification_code(my_fp, &mine, fp, &theirs))
    }
}

fn decode32(h: &str) -> Option<[u8; 32]> {
    hex::decode(h).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Identity;

    struct Side {
        id: Identity,
        contacts: Contacts,
        _dir: tempfile::TempDir,
    }

    fn side() -> Side {
        let dir = tempfile::tempdir().unwrap();
        Side {
            id: Identity::generate().unwrap(),
            contacts: Contacts::load(dir.path()).unwrap(),
            _dir: dir,
        }
    }

    /// `from` writes message `n` to `to`: its code fields travel, `to` records them.
    fn write(from: &mut Side, to: &mut Side, n: u8) -> bool {
        from.contacts.upsert(to.id.cert(), "to").unwrap();
        let fields = from.contacts.outgoing(&to.id.fingerprint()).unwrap();
        to.contacts.upsert(from.id.cert(), "from").unwrap();
        to.contacts
            .incoming(&from.id.fingerprint(), &[n; 16], &fields)
            .unwrap()
    }

    fn code(s: &Side, other: &Side) -> Option<String> {
        s.contacts
            .code(&s.id.fingerprint(), &other.id.fingerprint())
    }

    #[test]
    fn the_code_appears_after_commit_reply_reveal_and_matches() {
        let (mut a, mut b) = (side(), side());
        // a writes first: only a commitment goes out.
        let first = a.contacts.outgoing(&b.id.fingerprint()).unwrap();
        assert_eq!(first, CodeFields::default(), "not a contact yet: nothing");
        assert!(write(&mut a, &mut b, 1));
        assert_eq!((code(&a, &b), code(&b, &a)), (None, None));
        // b answers and reveals (a's value is fixed by its commitment).
        assert!(write(&mut b, &mut a, 2));
        assert_eq!(code(&b, &a), None, "b's nonce is out, a's is not yet");
        assert_eq!(code(&a, &b), None, "a has not revealed its nonce yet");
        // a's next message reveals its nonce, checked against its commitment.
        assert!(write(&mut a, &mut b, 3));
        let (ca, cb) = (code(&a, &b).unwrap(), code(&b, &a).unwrap());
        assert_eq!(ca, cb);
        assert_eq!(ca.len(), 6);
        // Kept across a reload.
        let reloaded = Contacts::load(a._dir.path()).unwrap();
        assert_eq!(
            reloaded.code(&a.id.fingerprint(), &b.id.fingerprint()),
            Some(ca)
        );
    }

    #[test]
    fn a_replayed_id_is_refused_and_a_nonce_that_breaks_its_commitment_is_flagged() {
        let (mut a, mut b) = (side(), side());
        assert!(write(&mut a, &mut b, 1));
        assert!(!write(&mut a, &mut b, 1), "same id again: a replay");
        // Someone reveals a nonce that is not the one a committed to.
        let forged = CodeFields {
            commit: None,
            nonce: Some(hex::encode([7u8; 32])),
        };
        assert!(
            b.contacts
                .incoming(&a.id.fingerprint(), &[2; 16], &forged)
                .unwrap()
        );
        assert!(b.contacts.get(&a.id.fingerprint()).unwrap().tampered);
        assert_eq!(code(&b, &a), None, "no code once tampered");
    }
}
