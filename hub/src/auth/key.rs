//! A module's symmetric key as someone gives it to the hub (from IoT Hub): the secret its SAS
//! tokens are signed with. A value type; settings, identities and reloads all take it.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// Lengths IoT Hub accepts for a symmetric key someone gives the hub (`--module-key`).
pub const GIVEN_KEY_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// A module key given by the user (from IoT Hub), never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ModuleKey(Vec<u8>);

impl ModuleKey {
    /// Decodes a base64 key of [`GIVEN_KEY_LEN`] bytes.
    pub fn from_base64(text: &str) -> Result<ModuleKey, String> {
        let bytes = BASE64
            .decode(text.trim().as_bytes())
            .map_err(|e| format!("not base64: {e}"))?;
        if !GIVEN_KEY_LEN.contains(&bytes.len()) {
            return Err(format!(
                "{} bytes; IoT Hub keys are {} to {} bytes",
                bytes.len(),
                GIVEN_KEY_LEN.start(),
                GIVEN_KEY_LEN.end()
            ));
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
