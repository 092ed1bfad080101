//! Module keys: the symmetric keys modules sign their SAS tokens with.
//!
//! Each `$edgeAgent` module's key comes, in this order, from:
//! 1. `spec.device.keysSecret` (the keys IoT Hub issued), under the module's name;
//! 2. the Secret `D-module-keys` the controller wrote before (so a key is minted only once);
//! 3. 32 fresh random bytes, base64.
//!
//! The hub mounts `D-module-keys` (all keys, one file per module, as `--module-keys-dir`
//! reads them); each module sees only its own `D-module-M` connection string.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;

use crate::agent::ModuleName;

/// A module's key: base64 text of at least 16 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ModuleKey(String);

impl fmt::Debug for ModuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ModuleKey(..)")
    }
}

impl ModuleKey {
    /// Takes a key as IoT Hub or a Secret holds it; `None` when it is not base64 of at least
    /// 16 bytes.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?;
        (bytes.len() >= 16).then(|| Self(text.to_owned()))
    }

    /// A placeholder for `render`.
    pub fn placeholder(module: &ModuleName) -> Self {
        Self(format!("<generated: key of {module}>"))
    }

    /// 32 random bytes, base64.
    pub fn mint() -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| KeyError::Random)?;
        Ok(Self(
            base64::engine::general_purpose::STANDARD.encode(bytes),
        ))
    }

    /// The base64 text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why keys could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The system's random source failed.
    #[error("random source failed")]
    Random,
    /// A key in `spec.device.keysSecret` is not a base64 key.
    #[error("Secret {secret:?}, key {module:?}: not a base64 key of at least 16 bytes")]
    BadIssuedKey {
        /// The Secret.
        secret: String,
        /// The module.
        module: String,
    },
}

/// Where each module's key came from (for logs and events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// `spec.device.keysSecret`.
    Issued,
    /// The controller's own `D-module-keys`.
    Kept,
    /// Minted now.
    Minted,
}

/// Resolves every module's key (see the module docs). `issued` is the data of
/// `spec.device.keysSecret` (named `issued_secret`), `kept` that of `D-module-keys`.
pub fn resolve(
    modules: &[ModuleName],
    issued_secret: &str,
    issued: &BTreeMap<String, Vec<u8>>,
    kept: &BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<ModuleName, (ModuleKey, KeyOrigin)>, KeyError> {
    let text = |b: &Vec<u8>| String::from_utf8(b.clone()).unwrap_or_default();
    let mut out = BTreeMap::new();
    for m in modules {
        let key = if let Some(raw) = issued.get(m.as_str()) {
            let key = ModuleKey::parse(&text(raw)).ok_or_else(|| KeyError::BadIssuedKey {
                secret: issued_secret.to_owned(),
                module: m.to_string(),
            })?;
            (key, KeyOrigin::Issued)
        } else if let Some(key) = kept
            .get(m.as_str())
            .and_then(|raw| ModuleKey::parse(&text(raw)))
        {
            (key, KeyOrigin::Kept)
        } else {
            (ModuleKey::mint()?, KeyOrigin::Minted)
        };
        out.insert(m.clone(), key);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_beats_kept_beats_minted_and_minting_happens_once() {
        let mods = [
            ModuleName::new("a"),
            ModuleName::new("b"),
            ModuleName::new("c"),
        ];
        let issued_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let kept_key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        let issued = BTreeMap::from([("a".to_owned(), issued_key.clone().into_bytes())]);
        let kept = BTreeMap::from([
            ("a".to_owned(), kept_key.clone().into_bytes()),
            ("b".to_owned(), kept_key.clone().into_bytes()),
        ]);
        let keys = resolve(&mods, "iothub-keys", &issued, &kept).expect("keys");
        assert_eq!(keys[&mods[0]], (ModuleKey(issued_key), KeyOrigin::Issued));
        assert_eq!(keys[&mods[1]], (ModuleKey(kept_key), KeyOrigin::Kept));
        let (minted, origin) = &keys[&mods[2]];
        assert_eq!(*origin, KeyOrigin::Minted);
        assert!(ModuleKey::parse(minted.as_str()).is_some());

        let kept_now: BTreeMap<String, Vec<u8>> = keys
            .iter()
            .map(|(m, (k, _))| (m.to_string(), k.as_str().as_bytes().to_vec()))
            .collect();
        let again = resolve(&mods, "iothub-keys", &issued, &kept_now).expect("keys");
        assert_eq!(again[&mods[2]], (minted.clone(), KeyOrigin::Kept));
    }

    #[test]
    fn a_bad_issued_key_is_an_error_naming_secret_and_module() {
        let issued = BTreeMap::from([("a".to_owned(), b"not base64!".to_vec())]);
        let err = resolve(
            &[ModuleName::new("a")],
            "iothub-keys",
            &issued,
            &BTreeMap::new(),
        )
        .expect_err("bad");
        assert!(
            err.to_string().contains("\"iothub-keys\", key \"a\""),
            "{err}"
        );
    }
}
