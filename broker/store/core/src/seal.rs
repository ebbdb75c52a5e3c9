//! Envelope encryption of secrets at rest.
//!
//! A 256-bit key-encryption key (the *master key*) comes from a 0600 file or the
//! `SIGIL_MASTER_KEY` environment variable (base64). Two keys are derived from it with
//! HKDF-SHA256: one seals private keys with AES-256-GCM (random 96-bit nonce per seal; the
//! record's table and id are the associated data, so a ciphertext moved to another slot does
//! not open), the other keys the HMAC chain of the audit log.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use aws_lc_rs::{hkdf, hmac};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sigil_pki::{SecretBytes, SecretString, ids};

/// Environment variable holding the base64 master key.
pub const MASTER_KEY_ENV: &str = "SIGIL_MASTER_KEY";

const SEAL_VERSION: &[u8; 2] = b"S1";
const NONCE_LEN: usize = 12;

/// Why a master key could not be loaded or a sealed value could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The key file could not be read or written.
    #[error("master key file {path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The cause (part of the message, not a separate `source`, so it is said once).
        cause: std::io::Error,
    },
    /// The key file can be read by others, or by its group when the broker's own user owns it.
    #[error(
        "master key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` (a root-owned file may be 0640, e.g. a Kubernetes Secret mounted with fsGroup)"
    )]
    InsecurePermissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Not 32 bytes of base64.
    #[error("master key from {source_name} is not valid: expected 32 bytes, base64-encoded")]
    BadKey {
        /// Where it came from (a path or the environment variable).
        source_name: String,
    },
    /// Authentication failed: wrong key, tampered data, or data moved to another slot.
    #[error(
        "sealed value {slot} does not open with this master key (wrong key, or the data was altered)"
    )]
    OpenFailed {
        /// table/id.
        slot: String,
    },
}

/// The key-encryption key. Zeroized on drop; never printed.
#[derive(Clone)]
pub struct MasterKey(SecretBytes);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        MasterKey(SecretBytes::new(ids::random_bytes::<32>().to_vec()))
    }

    /// Parses base64 (standard alphabet, surrounding whitespace ignored).
    pub fn from_base64(text: &str, source_name: &str) -> Result<Self, SealError> {
        let bytes = B64.decode(text.trim()).map_err(|_| SealError::BadKey {
            source_name: source_name.into(),
        })?;
        if bytes.len() != 32 {
            return Err(SealError::BadKey {
                source_name: source_name.into(),
            });
        }
        Ok(MasterKey(SecretBytes::new(bytes)))
    }

    /// The key from `SIGIL_MASTER_KEY`, if set.
    pub fn from_env() -> Result<Option<Self>, SealError> {
        match std::env::var(MASTER_KEY_ENV) {
            Ok(v) => {
                let key = Self::from_base64(&v, MASTER_KEY_ENV)?;
                Ok(Some(key))
            }
            Err(_) => Ok(None),
        }
    }

    /// Loads a key file, refusing one that others can read, or that its group can read while
    /// it is not owned by root. PostgreSQL's rule for its key files: 0600 when the server's
    /// user owns the file, 0640 when root does, so that a group the administrator controls
    /// (a Kubernetes Secret volume with `fsGroup`, a `sigil` group) may hand it over.
    pub fn load_file(path: &Path) -> Result<Self, SealError> {
        use std::os::unix::fs::MetadataExt as _;
        let io = |cause| SealError::Io {
            path: path.display().to_string(),
            cause,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if !key_file_mode_ok(mode, meta.uid()) {
            return Err(SealError::InsecurePermissions {
                path: path.display().to_string(),
                mode,
            });
        }
        let text = SecretString::new(fs::read_to_string(path).map_err(io)?);
        Self::from_base64(text.expose_secret(), &path.display().to_string())
    }

    /// Writes the key to a new file created with mode 0600. Refuses to overwrite.
    pub fn write_new_file(&self, path: &Path) -> Result<(), SealError> {
        let io = |cause| SealError::Io {
            path: path.display().to_string(),
            cause,
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let text = SecretString::new(B64.encode(self.0.expose_secret()));
        f.write_all(text.expose_secret().as_bytes()).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        // The new directory entry too: a crash right after must not lose the key.
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }

    /// The key as base64, for `SIGIL_MASTER_KEY`.
    pub fn to_base64(&self) -> SecretString {
        SecretString::new(B64.encode(self.0.expose_secret()))
    }
}

/// The slot and text of the key check (see [`Sealer::key_check`]).
const KEY_CHECK_TABLE: &str = "meta";
const KEY_CHECK_ID: &str = "key_check";
/// Stores made before the audit chain's end was anchored.
const KEY_CHECK_V1: &[u8] = b"sigil master key check v1";
/// Stores whose audit chain's end is anchored: a missing anchor means it was removed. (An
/// attacker without the key cannot turn this back into v1.)
const KEY_CHECK_V2: &[u8] = b"sigil master key check v2: audit end anchored";
/// The shortest key check: a shorter one was torn, whatever the key.
pub const KEY_CHECK_LEN: usize = 2 + NONCE_LEN + KEY_CHECK_V1.len() + 16;

/// Seals and opens secrets, and keys the audit chain. Built from a [`MasterKey`].
pub struct Sealer {
    aead: Aes256Gcm,
    audit_key: hmac::Key,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

fn derive(master: &MasterKey, info: &[u8]) -> SecretBytes {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"sigil/kdf/v1");
    let prk = salt.extract(master.0.expose_secret());
    let mut out = vec![0u8; 32];
    let infos = [info];
    // Expanding 32 bytes from SHA-256 HKDF cannot fail (the limit is 255 * 32).
    #[allow(clippy::expect_used)]
    prk.expand(&infos, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF expand of 32 bytes");
    SecretBytes::new(out)
}

fn aad(table: &str, id: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(16 + table.len() + id.len());
    a.extend_from_slice(b"sigil/seal/v1\0");
    a.extend_from_slice(table.as_bytes());
    a.push(0);
    a.extend_from_slice(id.as_bytes());
    a
}

impl Sealer {
    /// Derives the sealing and audit keys from `master`.
    pub fn new(master: &MasterKey) -> Self {
        let seal_key = derive(master, b"seal");
        let audit_key = derive(master, b"audit-chain");
        // A 32-byte slice is always a valid AES-256 key.
        #[allow(clippy::expect_used)]
        let aead = Aes256Gcm::new_from_slice(seal_key.expose_secret()).expect("32-byte AES key");
        Sealer {
            aead,
            audit_key: hmac::Key::new(hmac::HMAC_SHA256, audit_key.expose_secret()),
        }
    }

    /// Encrypts `plaintext` for the slot `table`/`id`.
    pub fn seal(&self, table: &str, id: &str, plaintext: &[u8]) -> Vec<u8> {
        let nonce_bytes = ids::random_bytes::<NONCE_LEN>();
        let nonce = Nonce::from(nonce_bytes);
        let aad = aad(table, id);
        // AES-GCM encryption of a small in-memory buffer has no failure mode.
        #[allow(clippy::expect_used)]
        let ct = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM seal");
        let mut out = Vec::with_capacity(2 + NONCE_LEN + ct.len());
        out.extend_from_slice(SEAL_VERSION);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts a value sealed for the slot `table`/`id`.
    pub fn open(&self, table: &str, id: &str, blob: &[u8]) -> Result<SecretBytes, SealError> {
        let fail = || SealError::OpenFailed {
            slot: format!("{table}/{id}"),
        };
        if blob.len() < 2 + NONCE_LEN + 16 || &blob[..2] != SEAL_VERSION {
            return Err(fail());
        }
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&blob[2..2 + NONCE_LEN]);
        let aad = aad(table, id);
        let pt = self
            .aead
            .decrypt(
                &Nonce::from(n),
                Payload {
                    msg: &blob[2 + NONCE_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| fail())?;
        Ok(SecretBytes::new(pt))
    }

    /// A new key check: a known text sealed under this key, kept in every store (and backup)
    /// so that a wrong master key is refused before anything is opened for writing.
    pub fn key_check(&self) -> Vec<u8> {
        self.seal(KEY_CHECK_TABLE, KEY_CHECK_ID, KEY_CHECK_V2)
    }

    /// Whether `check` was made by [`Sealer::key_check`] (of this or an earlier release)
    /// under this key.
    pub fn opens_key_check(&self, check: &[u8]) -> bool {
        self.open(KEY_CHECK_TABLE, KEY_CHECK_ID, check)
            .is_ok_and(|pt| [KEY_CHECK_V1, KEY_CHECK_V2].contains(&pt.expose_secret()))
    }

    /// Whether `check` (opened with this key) says the store anchors its audit chain's end;
    /// `false` for stores made before anchoring, which get their first anchor when opened.
    pub fn key_check_anchored(&self, check: &[u8]) -> bool {
        self.open(KEY_CHECK_TABLE, KEY_CHECK_ID, check)
            .is_ok_and(|pt| pt.expose_secret() == KEY_CHECK_V2)
    }

    /// HMAC-SHA256 of `data` under the audit-chain key.
    pub fn audit_mac(&self, data: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.audit_key, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// Whether a master key file with permission bits `mode` owned by `uid` may be used: 0600 or
/// stricter, or 0640 or stricter when root owns it.
fn key_file_mode_ok(mode: u32, uid: u32) -> bool {
    mode & 0o077 == 0 || (uid == 0 && mode & 0o037 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_follow_postgresqls_rule() {
        for (mode, uid, ok) in [
            (0o600, 1000, true),
            (0o400, 1000, true),
            (0o640, 1000, false),
            (0o440, 1000, false),
            (0o604, 1000, false),
            (0o640, 0, true),
            (0o440, 0, true),
            (0o660, 0, false),
            (0o644, 0, false),
            (0o604, 0, false),
        ] {
            assert_eq!(key_file_mode_ok(mode, uid), ok, "mode {mode:o} uid {uid}");
        }
    }

    #[test]
    fn sealed_values_open_only_in_their_slot_and_with_their_key() {
        let k = MasterKey::generate();
        let s = Sealer::new(&k);
        let blob = s.seal("keys", "root-1", b"private key bytes");
        assert_eq!(
            s.open("keys", "root-1", &blob).unwrap().expose_secret(),
            b"private key bytes"
        );
        // Moved to another slot.
        assert!(matches!(
            s.open("keys", "root-2", &blob),
            Err(SealError::OpenFailed { .. })
        ));
        assert!(s.open("other", "root-1", &blob).is_err());
        // Another key.
        let s2 = Sealer::new(&MasterKey::generate());
        assert!(s2.open("keys", "root-1", &blob).is_err());
        // Tampered.
        let mut t = blob.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert!(s.open("keys", "root-1", &t).is_err());
        // Nonces are random: sealing twice differs.
        assert_ne!(
            s.seal("keys", "root-1", b"x"),
            s.seal("keys", "root-1", b"x")
        );
    }

    #[test]
    fn key_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let k = MasterKey::generate();
        k.write_new_file(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k2 = MasterKey::load_file(&p).unwrap();
        assert_eq!(k.to_base64(), k2.to_base64());
        assert!(k.write_new_file(&p).is_err(), "must not overwrite");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = MasterKey::load_file(&p).unwrap_err();
        assert!(
            e.to_string()
                .contains("readable by group or others (mode 644)"),
            "{e}"
        );
        // Group-readable: only when root owns the file (a Secret volume with fsGroup).
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        let root_owned = fs::metadata(&p).unwrap().uid() == 0;
        assert_eq!(MasterKey::load_file(&p).is_ok(), root_owned);
    }

    #[test]
    fn bad_keys_are_named_and_never_printed() {
        assert!(
            MasterKey::from_base64("c2hvcnQ=", "SIGIL_MASTER_KEY")
                .unwrap_err()
                .to_string()
                .contains("SIGIL_MASTER_KEY")
        );
        let k = MasterKey::generate();
        let b64 = k.to_base64();
        assert!(!format!("{k:?}").contains(b64.expose_secret()));
        assert!(!format!("{:?}", Sealer::new(&k)).contains(b64.expose_secret()));
    }
}
