//! The MQTT 3.1.1 head: what modules written with the official Azure IoT SDKs speak.

pub mod connection;
pub mod listener;
pub mod session_state;
pub mod sessions;
pub mod topics;
pub mod twin;
pub mod username;
