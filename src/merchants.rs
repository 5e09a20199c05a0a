//! Merchants and their API keys: registration, listing, revocation and authentication.
//!
//! A key is `hvk_<merchant id>_<secret>` with a 256-bit random secret. It is shown once; only
//! its SHA-256 is stored (a fast hash is right for a high-entropy secret). Authentication
//! reads the merchant from the store on every call, so a revocation applies at once, and
//! compares hashes in constant time.

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::Timestamp;
use crate::model::{Merchant, MerchantId};
use crate::store::{Store, StoreError, WriteOp};

const KEY_PREFIX: &str = "hvk_";

/// Why a merchant operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MerchantError {
    #[error("missing or invalid API key")]
    Unauthenticated,
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no such merchant")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A freshly generated API key and the hash that is stored.
pub fn new_api_key(id: MerchantId) -> (String, [u8; 32]) {
    let secret: [u8; 32] = rand::random();
    let key = format!(
        "{KEY_PREFIX}{}_{}",
        id.simple(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let hash = hash_key(&key);
    (key, hash)
}

fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The merchant id a key claims to belong to, if it is well-formed.
fn claimed_id(key: &str) -> Option<MerchantId> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if secret.len() != 43 {
        return None;
    }
    MerchantId::try_parse(id).ok()
}

/// Registers a merchant at `cells`; returns it and its API key (shown once).
pub async fn add(
    store: &Store,
    name: &str,
    cells: Vec<u64>,
    max_resolution: u8,
    now: Timestamp,
) -> Result<(Merchant, String), MerchantError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(MerchantError::Invalid {
            field: "name",
            message: "must be 1-100 printable characters".into(),
        });
    }
    if cells.is_empty() {
        return Err(MerchantError::Invalid {
            field: "cell",
            message: "at least one location cell is required".into(),
        });
    }
    for c in &cells {
        let cell = h3o::CellIndex::try_from(*c).map_err(|_| MerchantError::Invalid {
            field: "cell",
            message: format!("{c:x} is not a valid H3 cell"),
        })?;
        if u8::from(cell.resolution()) > max_resolution {
            return Err(MerchantError::Invalid {
                field: "cell",
                message: format!(
                    "{c:x} has resolution {}, finer than location.max_resolution ({max_resolution}); devices never report such cells",
                    u8::from(cell.resolution())
                ),
            });
        }
    }
    let merchant_id = uuid::Uuid::new_v4();
    let (key, key_hash) = new_api_key(merchant_id);
    let merchant = Merchant {
        merchant_id,
        name: name.to_string(),
        key_hash,
        cells,
        created_at: now,
        revoked_at: None,
    };
    store.write(WriteOp::PutMerchant(merchant.clone())).await?;
    Ok((merchant, key))
}

/// Revokes a merchant's key.
pub async fn revoke(store: &Store, id: MerchantId, now: Timestamp) -> Result<(), MerchantError> {
    let n = store
        .write_count(WriteOp::RevokeMerchant {
            merchant_id: id,
            at: now,
        })
        .await?;
    if n == 0 {
        return Err(MerchantError::NotFound);
    }
    Ok(())
}

/// The active merchant owning `key`, or [`MerchantError::Unauthenticated`].
pub async fn authenticate(store: &Store, key: &str) -> Result<Merchant, MerchantError> {
    let id = claimed_id(key).ok_or(MerchantError::Unauthenticated)?;
    let merchant = store
        .merchant(id)
        .await?
        .ok_or(MerchantError::Unauthenticated)?;
    let matches: bool = hash_key(key).ct_eq(&merchant.key_hash).into();
    if !matches || merchant.revoked_at.is_some() {
        return Err(MerchantError::Unauthenticated);
    }
    Ok(merchant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_parse_back_to_their_merchant() {
        let id = uuid::Uuid::new_v4();
        let (a, ha) = new_api_key(id);
        let (b, hb) = new_api_key(id);
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert_eq!(claimed_id(&a), Some(id));
        assert_eq!(claimed_id("hvk_nope"), None);
        assert_eq!(claimed_id(&a[..a.len() - 1]), None);
    }
}
