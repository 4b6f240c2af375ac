//! The node's side of its password: the file holding the password for its next login.
//!
//! The node replaces the file with each password the hub hands out, before using the session
//! that came with it. Writes are private (mode 0600) and atomic (write, fsync, rename), so a
//! crash leaves either the old password or the new one, never half of one; if the new one was
//! lost, the old one still logs in once more (see [`crate::accounts`]).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use crate::accounts::Password;

/// Longest file read; a password file is 65 bytes.
const MAX_FILE_LEN: u64 = 1024;

/// Reads the password saved at `path`: `Ok(None)` if there is no file (the node has not
/// registered yet), an `InvalidData` error if the file does not hold a password (surrounding
/// whitespace is allowed).
pub fn load(path: &Path) -> io::Result<Option<Password>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes)?;
    // The error names the file, never its content.
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: not a node password (64 lowercase hex characters)",
                path.display()
            ),
        )
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid())?;
    text.trim_ascii()
        .parse::<Password>()
        .map(Some)
        .map_err(|_| invalid())
}

/// Replaces the file at `path` with `password` (and a newline), readable by the owner only.
/// A crash leaves either the old file or the new one.
pub fn store(path: &Path, password: &Password) -> io::Result<()> {
    let mut text = String::with_capacity(password.expose().len() + 1);
    text.push_str(password.expose());
    text.push('\n');
    tube_net::files::write_private_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::{AccountStore, MemoryAccounts};

    fn password() -> Password {
        MemoryAccounts::default().register("n").unwrap()
    }

    #[test]
    fn round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-password");
        let (p1, p2) = (password(), password());
        store(&path, &p1).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().expose(), p1.expose());
        store(&path, &p2).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().expose(), p2.expose());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-password");
        store(&path, &password()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&dir.path().join("absent")).unwrap().is_none());
    }

    #[test]
    fn hand_written_file_with_whitespace_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        let p = password();
        std::fs::write(&path, format!("  {}\r\n\n", p.expose())).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().expose(), p.expose());
    }

    #[test]
    fn garbage_is_invalid_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        let p = password();
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"hello".to_vec(),
            vec![0xff, 0xfe, 0x00],
            p.expose().to_uppercase().into_bytes(),
            format!("{} {}", p.expose(), p.expose()).into_bytes(),
            "a".repeat(5000).into_bytes(),
        ];
        for bytes in cases {
            std::fs::write(&path, bytes).unwrap();
            let e = load(&path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(!e.to_string().contains(p.expose()));
        }
    }
}
