//! Device pseudonyms: the raw device token never passes the API layer; everything below it
//! sees only [`DeviceId`], a keyed hash (HMAC-SHA-256, truncated to 128 bits) of the token.
//!
//! The key comes from `HEXVEIL_DEVICE_KEY` or is generated once into `<data_dir>/device.key`
//! (mode 0600). Without the key, a stored id cannot be linked back to a token, and ids from
//! two deployments with different keys cannot be joined.

use std::fmt;
use std::io::Write;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Environment variable holding the pseudonym key (at least 32 characters).
pub const DEVICE_KEY_ENV: &str = "HEXVEIL_DEVICE_KEY";
/// File name of the generated key inside the data dir.
pub const DEVICE_KEY_FILE: &str = "device.key";

/// A pseudonymous device id: 128 bits of HMAC-SHA-256(key, token).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; 16]);

impl DeviceId {
    /// Lowercase hex, as shown to the device in receipts and GetMyData.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.to_hex())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Errors loading or creating the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{DEVICE_KEY_ENV} must be at least 32 characters")]
    EnvTooShort,
    #[error("device key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device key file {0} is corrupt (expected 64 hex characters)")]
    Corrupt(String),
}

/// Turns device tokens into [`DeviceId`]s. `Debug` never shows the key.
#[derive(Clone)]
pub struct Pseudonymizer {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pseudonymizer { key: <redacted> }")
    }
}

impl Pseudonymizer {
    /// A pseudonymizer with an explicit key.
    pub fn new(key: &[u8]) -> Self {
        // Unwrap safety: HMAC accepts keys of any length.
        let mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        Pseudonymizer { mac }
    }

    /// The key from `env_value` (the `HEXVEIL_DEVICE_KEY` value, if set), else from
    /// `<data_dir>/device.key`, generating that file (mode 0600) on first start.
    pub fn load_or_create(env_value: Option<&str>, data_dir: &Path) -> Result<Self, KeyError> {
        if let Some(v) = env_value {
            if v.len() < 32 {
                return Err(KeyError::EnvTooShort);
            }
            return Ok(Pseudonymizer::new(v.as_bytes()));
        }
        let path = data_dir.join(DEVICE_KEY_FILE);
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let key = decode_hex(text.trim())
                    .filter(|k| k.len() == 32)
                    .ok_or_else(|| KeyError::Corrupt(path.display().to_string()))?;
                Ok(Pseudonymizer::new(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir).map_err(io)?;
                let key: [u8; 32] = rand::random();
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                let mut file = opts.open(&path).map_err(io)?;
                file.write_all(hex.as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(Pseudonymizer::new(&key))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The pseudonym of `token`.
    pub fn device_id(&self, token: &str) -> DeviceId {
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        DeviceId(id)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_token_same_id_different_key_different_id() {
        let a = Pseudonymizer::new(b"key-a-key-a-key-a-key-a-key-a-ke");
        let b = Pseudonymizer::new(b"key-b-key-b-key-b-key-b-key-b-ke");
        assert_eq!(a.device_id("device-0001"), a.device_id("device-0001"));
        assert_ne!(a.device_id("device-0001"), a.device_id("device-0002"));
        assert_ne!(a.device_id("device-0001"), b.device_id("device-0001"));
        assert!(!format!("{a:?}").contains("key-a"));
    }

    #[test]
    fn generated_key_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let first = Pseudonymizer::load_or_create(None, dir.path()).unwrap();
        let again = Pseudonymizer::load_or_create(None, dir.path()).unwrap();
        assert_eq!(first.device_id("tok"), again.device_id("tok"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(DEVICE_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn short_env_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Pseudonymizer::load_or_create(Some("short"), dir.path()),
            Err(KeyError::EnvTooShort)
        ));
    }
}
