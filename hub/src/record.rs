//! What a data directory remembers about the hub it belongs to: `{data_dir}/hub.json`.
//!
//! Module keys alone (`identities.json`) do not make a working connection string: the SAS
//! audience also names the IoT Hub host name and the device id, and the SDK dials the gateway
//! host name. So `edgehub run` records them, with the extra certificate names (`--hostname`)
//! and every module the hub gives an identity, and `edgehub connection-string --data-dir D M`
//! and `edgehub ca-path --data-dir D` answer for that hub with no other flag.
//!
//! Guarantees:
//! - A flag not given takes the recorded value, then the built-in default ([`HubRecord::apply`]).
//! - A flag (or its `EDGEHUB_*` variable) that contradicts the record for the IoT Hub host name,
//!   the device id or the gateway host name is refused ([`RecordError::Conflict`], naming both
//!   values and `--reconfigure`), unless the caller was told to change them: a hub never
//!   silently starts as another device on the same keys and queues.
//! - A data directory without a record (from before this file existed) is adopted with the
//!   values given or the defaults.
//! - The file is replaced atomically ([`crate::fsutil::write_atomically`]); a corrupt file is
//!   an error naming the file, never silently replaced.
//! - [`save_modules`] is how a running hub (live reload) keeps the module list current.

use std::path::{Path, PathBuf};

use router::{DeviceId, ModuleId};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomically;
use crate::settings::{check_hostname, check_id, check_module_id, RawSettings};

/// The record file, in the data directory.
pub const RECORD_FILE: &str = "hub.json";

/// What the hub is: its identity towards modules and IoT Hub, and its modules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubRecord {
    /// IoT Hub host name (connection strings, MQTT usernames, SAS audiences).
    pub iothub_hostname: String,
    /// The edge device id.
    pub device_id: DeviceId,
    /// The host name modules connect to (`GatewayHostName`).
    pub gateway_hostname: String,
    /// Extra names of the server certificate (`--hostname`).
    pub hostnames: Vec<String>,
    /// Every module the hub gives an identity, sorted, no duplicates.
    pub modules: Vec<ModuleId>,
}

/// The file's JSON form.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    #[serde(rename = "iotHubHostName")]
    iothub_hostname: String,
    #[serde(rename = "deviceId")]
    device_id: String,
    #[serde(rename = "gatewayHostName")]
    gateway_hostname: String,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    modules: Vec<String>,
}

/// A setting given on the command line (or in its variable) that differs from the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The flag, e.g. `--device-id`.
    pub flag: &'static str,
    /// Its environment variable, e.g. `EDGEHUB_DEVICE_ID`.
    pub env: &'static str,
    /// The value in the record.
    pub recorded: String,
    /// The value given.
    pub given: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} was given (flag or {}), but the data directory belongs to {:?}",
            self.flag, self.given, self.env, self.recorded
        )
    }
}

/// Why the record could not be read, written or applied.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file exists but cannot be read or written.
    #[error("hub record {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error(
        "hub record {path} is corrupt: {reason}. Fix it, or delete it and start the hub with \
         --iothub-hostname, --device-id and --gateway-hostname to record them again"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Settings given contradict the record.
    #[error(
        "{}; pass --reconfigure to `edgehub run` to change the recorded value (module \
         connection strings change with it), or leave the flag out to keep it (recorded in {})",
        .conflicts.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        .path.display()
    )]
    Conflict {
        /// The record file.
        path: PathBuf,
        /// Every contradicting setting.
        conflicts: Vec<Conflict>,
    },
    /// [`save_modules`] on a data directory that has no record yet.
    #[error("hub record {path} does not exist: it is written when the hub starts")]
    Missing {
        /// The file.
        path: PathBuf,
    },
}

impl HubRecord {
    /// The record file of a data directory.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(RECORD_FILE)
    }

    /// Reads the record; `None` if the data directory has none.
    pub fn load(data_dir: &Path) -> Result<Option<HubRecord>, RecordError> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        let corrupt = |reason: String| RecordError::Corrupt {
            path: path.clone(),
            reason,
        };
        let disk: OnDisk = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        check_hostname("iotHubHostName", &disk.iothub_hostname)
            .map_err(|e| corrupt(e.to_string()))?;
        check_id("deviceId", &disk.device_id).map_err(|e| corrupt(e.to_string()))?;
        check_hostname("gatewayHostName", &disk.gateway_hostname)
            .map_err(|e| corrupt(e.to_string()))?;
        for h in &disk.hostnames {
            check_hostname("hostnames", h).map_err(|e| corrupt(e.to_string()))?;
        }
        let mut modules = Vec::with_capacity(disk.modules.len());
        for m in disk.modules {
            check_module_id("modules", &m).map_err(|e| corrupt(e.to_string()))?;
            modules.push(ModuleId::new(m));
        }
        modules.sort();
        modules.dedup();
        Ok(Some(HubRecord {
            iothub_hostname: disk.iothub_hostname,
            device_id: DeviceId::new(disk.device_id),
            gateway_hostname: disk.gateway_hostname,
            hostnames: disk.hostnames,
            modules,
        }))
    }

    /// Replaces the record atomically (creating the data directory if needed).
    pub fn save(&self, data_dir: &Path) -> Result<(), RecordError> {
        let path = Self::path(data_dir);
        let io = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let mut modules: Vec<String> = self.modules.iter().map(|m| m.as_str().to_owned()).collect();
        modules.sort();
        modules.dedup();
        let disk = OnDisk {
            iothub_hostname: self.iothub_hostname.clone(),
            device_id: self.device_id.as_str().to_owned(),
            gateway_hostname: self.gateway_hostname.clone(),
            hostnames: self.hostnames.clone(),
            modules,
        };
        let mut text = serde_json::to_string_pretty(&disk).map_err(|e| RecordError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        text.push('\n');
        write_atomically(&path, text.as_bytes(), 0o600).map_err(io)
    }

    /// Fills what `raw` leaves out (IoT Hub host name, device id, gateway host name, extra
    /// certificate names) from `record`. A given IoT Hub host name, device id or gateway host
    /// name that differs from the record is a [`RecordError::Conflict`] unless `reconfigure`.
    /// Host names compare without regard to case. `data_dir` only names the file in errors.
    pub fn apply(
        record: Option<&HubRecord>,
        raw: &mut RawSettings,
        reconfigure: bool,
        data_dir: &Path,
    ) -> Result<(), RecordError> {
        let Some(record) = record else {
            return Ok(());
        };
        let mut conflicts = Vec::new();
        let mut field = |given: &mut Option<String>,
                         recorded: &str,
                         same: fn(&str, &str) -> bool,
                         flag: &'static str,
                         env: &'static str| {
            match given {
                None => *given = Some(recorded.to_owned()),
                Some(g) if same(g, recorded) || reconfigure => {}
                Some(g) => conflicts.push(Conflict {
                    flag,
                    env,
                    recorded: recorded.to_owned(),
                    given: g.clone(),
                }),
            }
        };
        let host_eq: fn(&str, &str) -> bool = |a, b| a.eq_ignore_ascii_case(b);
        let id_eq: fn(&str, &str) -> bool = |a, b| a == b;
        field(
            &mut raw.iothub_hostname,
            &record.iothub_hostname,
            host_eq,
            "--iothub-hostname",
            "EDGEHUB_IOTHUB_HOSTNAME",
        );
        field(
            &mut raw.device_id,
            record.device_id.as_str(),
            id_eq,
            "--device-id",
            "EDGEHUB_DEVICE_ID",
        );
        field(
            &mut raw.gateway_hostname,
            &record.gateway_hostname,
            host_eq,
            "--gateway-hostname",
            "EDGEHUB_GATEWAY_HOSTNAME",
        );
        if raw.hostnames.is_empty() {
            raw.hostnames = record.hostnames.clone();
        }
        if conflicts.is_empty() {
            Ok(())
        } else {
            Err(RecordError::Conflict {
                path: Self::path(data_dir),
                conflicts,
            })
        }
    }
}

/// Records `modules` as the hub's modules (replacing the list), keeping everything else: for a
/// running hub whose modules changed (live reload). Fails with [`RecordError::Missing`] if the
/// data directory has no record yet.
pub fn save_modules(data_dir: &Path, modules: &[ModuleId]) -> Result<(), RecordError> {
    let mut record = HubRecord::load(data_dir)?.ok_or_else(|| RecordError::Missing {
        path: HubRecord::path(data_dir),
    })?;
    let mut modules = modules.to_vec();
    modules.sort();
    modules.dedup();
    if record.modules == modules {
        return Ok(());
    }
    record.modules = modules;
    record.save(data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> HubRecord {
        HubRecord {
            iothub_hostname: "myhub.example".into(),
            device_id: DeviceId::new("dev7"),
            gateway_hostname: "gw.example".into(),
            hostnames: vec!["10.0.0.5".into()],
            modules: vec![ModuleId::new("a"), ModuleId::new("p0")],
        }
    }

    #[test]
    fn a_record_survives_a_save_and_load_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(HubRecord::load(dir.path()).expect("load"), None);
        record().save(dir.path()).expect("save");
        assert_eq!(HubRecord::load(dir.path()).expect("load"), Some(record()));
    }

    #[test]
    fn flags_not_given_take_the_recorded_values() {
        let mut raw = RawSettings::default();
        HubRecord::apply(Some(&record()), &mut raw, false, Path::new("D")).expect("no conflict");
        assert_eq!(raw.iothub_hostname.as_deref(), Some("myhub.example"));
        assert_eq!(raw.device_id.as_deref(), Some("dev7"));
        assert_eq!(raw.gateway_hostname.as_deref(), Some("gw.example"));
        assert_eq!(raw.hostnames, ["10.0.0.5"]);
    }

    #[test]
    fn contradicting_flags_are_refused_naming_both_values_unless_reconfiguring() {
        let given = || RawSettings {
            iothub_hostname: Some("MYHUB.example".into()),
            device_id: Some("dev8".into()),
            gateway_hostname: Some("other.example".into()),
            ..RawSettings::default()
        };
        let mut raw = given();
        let err = HubRecord::apply(Some(&record()), &mut raw, false, Path::new("D"))
            .expect_err("conflict");
        let RecordError::Conflict { conflicts, .. } = &err else {
            panic!("{err}");
        };
        let flags: Vec<&str> = conflicts.iter().map(|c| c.flag).collect();
        assert_eq!(flags, ["--device-id", "--gateway-hostname"], "{err}");
        let text = err.to_string();
        for needle in [
            "dev7",
            "dev8",
            "--reconfigure",
            "gw.example",
            "other.example",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        let mut raw = given();
        HubRecord::apply(Some(&record()), &mut raw, true, Path::new("D")).expect("reconfigure");
        assert_eq!(raw.device_id.as_deref(), Some("dev8"));
    }

    #[test]
    fn without_a_record_the_given_values_stand() {
        let mut raw = RawSettings {
            device_id: Some("dev8".into()),
            ..RawSettings::default()
        };
        HubRecord::apply(None, &mut raw, false, Path::new("D")).expect("adopted");
        assert_eq!(raw.device_id.as_deref(), Some("dev8"));
        assert_eq!(raw.iothub_hostname, None);
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(RECORD_FILE), "{\"deviceId\": 7}").expect("write");
        let err = HubRecord::load(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains(RECORD_FILE), "{err}");
        std::fs::write(
            dir.path().join(RECORD_FILE),
            r#"{"iotHubHostName":"h","deviceId":"a/b","gatewayHostName":"g"}"#,
        )
        .expect("write");
        assert!(matches!(
            HubRecord::load(dir.path()),
            Err(RecordError::Corrupt { .. })
        ));
    }

    #[test]
    fn save_modules_replaces_only_the_module_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            save_modules(dir.path(), &[ModuleId::new("x")]),
            Err(RecordError::Missing { .. })
        ));
        record().save(dir.path()).expect("save");
        save_modules(dir.path(), &[ModuleId::new("z"), ModuleId::new("b")]).expect("saved");
        let got = HubRecord::load(dir.path()).expect("load").expect("some");
        assert_eq!(got.modules, [ModuleId::new("b"), ModuleId::new("z")]);
        assert_eq!(got.device_id, record().device_id);
    }
}
