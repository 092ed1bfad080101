//! Authentication: SAS tokens (Azure IoT Hub's shared access signatures).

pub mod credentials;
pub mod sas;
