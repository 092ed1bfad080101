//! Authentication: SAS tokens (Azure IoT Hub's shared access signatures) and why a credential
//! is refused. The keys tokens are signed with are `crate::module_key`'s.

pub mod credentials;
pub mod sas;
