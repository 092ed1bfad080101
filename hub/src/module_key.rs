//! A module's symmetric key as someone gives it to the hub (from IoT Hub): the secret its SAS
//! tokens are signed with. A value type; settings, identities and reloads all take it.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// Lengths IoT Hub accepts for a symmetric key someone gives the hub (`--module-key`).
pub const GIVEN_KEY_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// Why a given module key is not usable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not base64.
    #[error("not base64: {0}")]
    NotBase64(#[from] base64::DecodeError),
    /// The key has this many bytes, outside [`GIVEN_KEY_LEN`].
    #[error(
        "{0} bytes; IoT Hub keys are {min} to {max} bytes",
        min = GIVEN_KEY_LEN.start(),
        max = GIVEN_KEY_LEN.end()
    )]
    Length(usize),
}

/// A module key given by the user (from IoT Hub), never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ModuleKey(Vec<u8>);

impl ModuleKey {
    /// Decodes a base64 key of [`GIVEN_KEY_LEN`] bytes.
    pub fn from_base64(text: &str) -> Result<ModuleKey, KeyError> {
        let bytes = BASE64.decode(text.trim().as_bytes())?;
        if !GIVEN_KEY_LEN.contains(&bytes.len()) {
            return Err(KeyError::Length(bytes.len()));
        }
        Ok(ModuleKey(bytes))
    }

    /// The raw key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The raw key, taken.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for ModuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ModuleKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_errors_read_as_before_and_keep_their_cause() {
        let short = ModuleKey::from_base64(&BASE64.encode([1u8; 3])).err();
        assert_eq!(
            short.map(|e| e.to_string()).as_deref(),
            Some("3 bytes; IoT Hub keys are 16 to 64 bytes")
        );
        let Err(bad) = ModuleKey::from_base64("not base64!") else {
            panic!("accepted a key that is not base64");
        };
        assert!(bad.to_string().starts_with("not base64: "), "{bad}");
        assert!(std::error::Error::source(&bad).is_some());
    }
}
