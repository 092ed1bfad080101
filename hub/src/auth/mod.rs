//! Authentication: SAS tokens (Azure IoT Hub's shared access signatures) and the module keys
//! they are signed with.

pub mod credentials;
pub mod key;
pub mod sas;
