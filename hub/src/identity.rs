//! Module identities and their keys.
//!
//! An [`Identity`] is what a connection authenticated as: the edge device and one of its modules
//! (the MQTT client id `{device}/{module}`). [`Identities`] holds one random 32-byte key per
//! module, kept in `{data_dir}/identities.json` as `{"module": "base64 key", …}`; modules sign
//! SAS tokens with it, and [`Identities::connection_string`] hands it out.
//!
//! Guarantees:
//! - A key never changes once created, except when the user gives one (`--module-key`): loading
//!   adds keys only for modules that lack one, and rewrites a key only with a given one.
//! - The file is replaced atomically (write a temporary file, fdatasync it, rename it over the
//!   old one, fsync the directory), with mode 0600: a crash leaves the old or the new file,
//!   never a torn one.
//! - A corrupt file is an error naming the file, never silently regenerated: new keys would
//!   lock every module out.
//! - A manifest reload changes the declared modules and keys in place
//!   ([`Identities::apply`]): the file is saved first, and logins see the change only once it
//!   is on disk.
//! - Only *declared* modules (the manifest's and `--module`s) have a key through
//!   [`Identities::key`]. Keys of modules no longer declared stay in the file, so declaring a
//!   module again brings back its old key.
//!
//! Not guarded: two processes creating the first key of the same module at the same instant
//! (e.g. `edgehub connection-string` racing `edgehub run` on a fresh data directory); the
//! later rename wins. Run one, then the other.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use router::{DeviceId, ModuleId};

use crate::fsutil::write_atomically;
pub use crate::module_key::{KeyError, ModuleKey, GIVEN_KEY_LEN};
use crate::settings::{check_module_id, Settings};

/// Length of a key the hub generates, in bytes (as IoT Hub's generated symmetric keys).
pub const KEY_LEN: usize = 32;
/// The identities file, in the data directory.
pub const IDENTITIES_FILE: &str = "identities.json";

/// An authenticated module: the edge device and the module on it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    /// The edge device.
    pub device: DeviceId,
    /// The module.
    pub module: ModuleId,
}

impl Identity {
    /// The module `module` on device `device`.
    pub fn new(device: DeviceId, module: ModuleId) -> Self {
        Identity { device, module }
    }
}

impl fmt::Display for Identity {
    /// The MQTT client id form, `{device}/{module}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.device, self.module)
    }
}

/// Why identities could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but cannot be read or written.
    #[error("identities file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid; keys are not regenerated (that would lock modules out).
    #[error(
        "identities file {path} is corrupt: {reason}. It is not regenerated, since new keys \
         would lock every module out: restore it, or delete it to issue new keys to all modules"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The system's random number generator failed.
    #[error("cannot generate a key: the system random number generator failed")]
    Random,
    /// A file of the module keys directory is not a module key.
    #[error("module keys directory: {path}: {reason}")]
    KeysDir {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the key).
        reason: String,
    },
}

/// A module that has no identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown module \"{module}\": declare it in the manifest's $edgeAgent modules or pass \
     --module {module} (known: {})",
    known_list(.known)
)]
pub struct UnknownModule {
    /// The module asked for.
    pub module: ModuleId,
    /// The declared modules.
    pub known: Vec<ModuleId>,
}

fn known_list(known: &[ModuleId]) -> String {
    if known.is_empty() {
        return "none".to_owned();
    }
    known
        .iter()
        .map(ModuleId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The module keys of one edge device. Shared (`Arc`) by the heads and the cloud connection; a
/// manifest reload changes it in place ([`Identities::apply`]).
pub struct Identities {
    device: DeviceId,
    path: PathBuf,
    data_dir: PathBuf,
    state: RwLock<KeyState>,
}

/// The keys on file and the modules declared now.
#[derive(Default)]
struct KeyState {
    keys: BTreeMap<ModuleId, Vec<u8>>,
    declared: BTreeSet<ModuleId>,
}

/// What [`Identities::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityChanges {
    /// Modules declared now that were not before.
    pub added: Vec<ModuleId>,
    /// Modules no longer declared (their keys stay on file).
    pub removed: Vec<ModuleId>,
    /// Modules declared before and now whose key changed (a given key replaced it).
    pub rekeyed: Vec<ModuleId>,
}

impl IdentityChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.rekeyed.is_empty()
    }
}

impl fmt::Debug for Identities {
    /// Never prints keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identities")
            .field("device", &self.device)
            .field("path", &self.path)
            .field("declared", &self.read().declared)
            .finish_non_exhaustive()
    }
}

impl Identities {
    /// The identities file of a data directory.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(IDENTITIES_FILE)
    }

    /// Loads the keys from `{data_dir}/identities.json` (creating the directory and the file if
    /// needed), adds a new random key for each of `modules` that has none, and saves the file
    /// if anything was added. `modules` become the declared modules.
    pub fn load_or_create(
        data_dir: &Path,
        device: &DeviceId,
        modules: &[ModuleId],
    ) -> Result<Identities, IdentityError> {
        Self::load_with_keys(data_dir, device, modules, &[])
    }

    /// [`Identities::load_or_create`], after setting the keys in `given` (keys IoT Hub issued,
    /// from `--module-key` or `--module-keys-dir`): a given key replaces the one on file (and
    /// is saved), and its module is declared.
    pub fn load_with_keys(
        data_dir: &Path,
        device: &DeviceId,
        modules: &[ModuleId],
        given: &[(ModuleId, ModuleKey)],
    ) -> Result<Identities, IdentityError> {
        let path = Self::path(data_dir);
        let keys = read_keys(&path)?;
        let identities = Identities {
            device: device.clone(),
            path,
            data_dir: data_dir.to_path_buf(),
            state: RwLock::new(KeyState {
                keys,
                declared: BTreeSet::new(),
            }),
        };
        identities.apply(modules, given)?;
        Ok(identities)
    }

    /// Loads (and creates) the identities `settings` call for: the `--module`s plus
    /// `manifest_modules`, with the keys of `--module-key` and of `--module-keys-dir`.
    pub fn for_settings(
        settings: &Settings,
        manifest_modules: &[ModuleId],
    ) -> Result<Identities, IdentityError> {
        let given = given_keys(settings)?;
        Self::load_with_keys(
            settings.data_dir(),
            settings.device_id(),
            &settings.all_modules(manifest_modules),
            &given,
        )
    }

    /// Makes `modules` plus the modules of `given` the declared modules: sets every given key
    /// (replacing the one on file), mints a key for each declared module that has none, and
    /// saves the file (atomically) if a key was added or replaced. Nothing changes in memory
    /// unless the file was saved. Returns what changed for connections: modules added,
    /// removed, and declared modules whose key changed.
    pub fn apply(
        &self,
        modules: &[ModuleId],
        given: &[(ModuleId, ModuleKey)],
    ) -> Result<IdentityChanges, IdentityError> {
        let mut state = self.write();
        let mut keys = state.keys.clone();
        let mut declared: BTreeSet<ModuleId> = modules.iter().cloned().collect();
        let mut rekeyed = Vec::new();
        let mut dirty = false;
        for (module, key) in given {
            match keys.get(module) {
                Some(k) if k.as_slice() == key.as_bytes() => {}
                old => {
                    if old.is_some() && state.declared.contains(module) {
                        rekeyed.push(module.clone());
                    }
                    keys.insert(module.clone(), key.as_bytes().to_vec());
                    dirty = true;
                    tracing::info!(%module, "module key set from a given key");
                }
            }
            declared.insert(module.clone());
        }
        let rng = ring::rand::SystemRandom::new();
        for module in &declared {
            if !keys.contains_key(module) {
                let mut key = [0u8; KEY_LEN];
                ring::rand::SecureRandom::fill(&rng, &mut key)
                    .map_err(|_| IdentityError::Random)?;
                keys.insert(module.clone(), key.to_vec());
                dirty = true;
            }
        }
        if dirty {
            std::fs::create_dir_all(&self.data_dir).map_err(|source| IdentityError::Io {
                path: self.data_dir.clone(),
                source,
            })?;
            let text = encode_keys(&keys);
            write_atomically(&self.path, text.as_bytes(), 0o600).map_err(|source| {
                IdentityError::Io {
                    path: self.path.clone(),
                    source,
                }
            })?;
            tracing::info!(path = %self.path.display(), "module identities saved");
        }
        let changes = IdentityChanges {
            added: declared.difference(&state.declared).cloned().collect(),
            removed: state.declared.difference(&declared).cloned().collect(),
            rekeyed,
        };
        state.keys = keys;
        state.declared = declared;
        Ok(changes)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KeyState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The edge device.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// The file the keys live in.
    pub fn file(&self) -> &Path {
        &self.path
    }

    /// The declared modules, sorted.
    pub fn modules(&self) -> Vec<ModuleId> {
        self.read().declared.iter().cloned().collect()
    }

    /// The identity of a declared module on this device.
    pub fn identity(&self, module: &ModuleId) -> Result<Identity, UnknownModule> {
        let state = self.read();
        if state.declared.contains(module) {
            Ok(Identity::new(self.device.clone(), module.clone()))
        } else {
            Err(UnknownModule {
                module: module.clone(),
                known: state.declared.iter().cloned().collect(),
            })
        }
    }

    /// The key of `identity`, if it is a declared module of this device (now: a reload may
    /// remove the module or change its key).
    pub fn key(&self, identity: &Identity) -> Option<Vec<u8>> {
        let state = self.read();
        if identity.device != self.device || !state.declared.contains(&identity.module) {
            return None;
        }
        state.keys.get(&identity.module).cloned()
    }

    /// The key on file for `identity`, declared or not: for sending upstream, *as* a module,
    /// messages it sent while it was declared (a module removed from the deployment may still
    /// have messages waiting for the cloud). Never for authenticating a connection: that is
    /// [`Identities::key`].
    pub fn stored_key(&self, identity: &Identity) -> Option<Vec<u8>> {
        if identity.device != self.device {
            return None;
        }
        self.read().keys.get(&identity.module).cloned()
    }

    /// `HostName=…;DeviceId=…;ModuleId=…;SharedAccessKey=…;GatewayHostName=…` for a declared
    /// module, as the Azure IoT SDKs' `create_from_connection_string` expects.
    pub fn connection_string(
        &self,
        module: &ModuleId,
        settings: &Settings,
    ) -> Result<String, UnknownModule> {
        let identity = self.identity(module)?;
        let key = self.key(&identity).ok_or_else(|| UnknownModule {
            module: module.clone(),
            known: self.modules(),
        })?;
        Ok(format!(
            "HostName={};DeviceId={};ModuleId={};SharedAccessKey={};GatewayHostName={}",
            settings.iothub_hostname(),
            identity.device,
            identity.module,
            BASE64.encode(key),
            settings.gateway_hostname(),
        ))
    }
}

/// Every given key of `settings`: `--module-key`, then the files of `--module-keys-dir` (a
/// module in both takes the directory's key: the directory is the one that is kept current).
pub fn given_keys(settings: &Settings) -> Result<Vec<(ModuleId, ModuleKey)>, IdentityError> {
    let mut given: Vec<(ModuleId, ModuleKey)> = settings.module_keys().to_vec();
    if let Some(dir) = settings.module_keys_dir() {
        for (module, key) in read_keys_dir(dir)? {
            given.retain(|(m, _)| *m != module);
            given.push((module, key));
        }
    }
    Ok(given)
}

/// Reads a directory of module keys as a Kubernetes Secret is mounted: one regular file (or
/// symlink to one) per module, named after the module, holding its base64 key (surrounding
/// whitespace ignored). Names starting with `.` (the Secret's `..data` and timestamped
/// directories) and directories are skipped. A bad name or key is an error naming the file;
/// the key itself is never printed. Sorted by module.
pub fn read_keys_dir(dir: &Path) -> Result<Vec<(ModuleId, ModuleKey)>, IdentityError> {
    let bad = |path: &Path, reason: String| IdentityError::KeysDir {
        path: path.to_path_buf(),
        reason,
    };
    let io = |path: &Path, e: std::io::Error| IdentityError::KeysDir {
        path: path.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    };
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(bad(&path, "the file name is not UTF-8".into()));
        };
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks (a Secret's files are links into `..data`).
        let meta = std::fs::metadata(&path).map_err(|e| io(&path, e))?;
        if meta.is_dir() {
            continue;
        }
        check_module_id("module", name).map_err(|e| {
            bad(
                &path,
                format!("the file name is not a module id: {}", e.reason),
            )
        })?;
        // A key file is tiny: refuse to read anything large into memory.
        if meta.len() > 1024 {
            return Err(bad(
                &path,
                format!(
                    "{} bytes; a module key file holds one base64 key",
                    meta.len()
                ),
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let key = ModuleKey::from_base64(text.trim())
            .map_err(|why| bad(&path, format!("the key is {why}")))?;
        keys.push((ModuleId::new(name), key));
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

fn read_keys(path: &Path) -> Result<BTreeMap<ModuleId, Vec<u8>>, IdentityError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(IdentityError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let corrupt = |reason: String| IdentityError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let raw: BTreeMap<String, String> = serde_json::from_str(&text)
        .map_err(|e| corrupt(format!("expected {{\"module\": \"base64 key\"}}: {e}")))?;
    let mut keys = BTreeMap::new();
    for (module, key) in raw {
        check_module_id("module", &module).map_err(|e| corrupt(e.to_string()))?;
        let key =
            ModuleKey::from_base64(&key).map_err(|e| corrupt(format!("key of {module:?}: {e}")))?;
        keys.insert(ModuleId::new(module), key.into_bytes());
    }
    Ok(keys)
}

fn encode_keys(keys: &BTreeMap<ModuleId, Vec<u8>>) -> String {
    let map: BTreeMap<&str, String> = keys
        .iter()
        .map(|(m, k)| (m.as_str(), BASE64.encode(k)))
        .collect();
    let mut text = serde_json::to_string_pretty(&map).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::RawSettings;

    fn m(name: &str) -> ModuleId {
        ModuleId::new(name)
    }

    fn dev() -> DeviceId {
        DeviceId::new("edge-device")
    }

    #[test]
    fn keys_are_created_once_and_survive_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first =
            Identities::load_or_create(dir.path(), &dev(), &[m("a"), m("b")]).expect("created");
        let a = Identity::new(dev(), m("a"));
        let key_a = first.key(&a).expect("key");
        assert_eq!(key_a.len(), KEY_LEN);
        assert_ne!(
            Some(key_a.clone()),
            first.key(&Identity::new(dev(), m("b")))
        );
        let again =
            Identities::load_or_create(dir.path(), &dev(), &[m("a"), m("c")]).expect("reloaded");
        assert_eq!(again.key(&a), Some(key_a));
        assert!(again.key(&Identity::new(dev(), m("c"))).is_some());
    }

    #[test]
    fn a_given_key_replaces_the_generated_one_persists_and_declares_its_module() {
        let dir = tempfile::tempdir().expect("tempdir");
        Identities::load_or_create(dir.path(), &dev(), &[m("a")]).expect("created");
        let issued = BASE64.encode([7u8; 64]);
        let given = vec![
            (m("a"), ModuleKey::from_base64(&issued).expect("64 bytes")),
            (
                m("z"),
                ModuleKey::from_base64(&BASE64.encode([9u8; 16])).expect("16"),
            ),
        ];
        let ids = Identities::load_with_keys(dir.path(), &dev(), &[], &given).expect("set");
        assert_eq!(ids.key(&Identity::new(dev(), m("a"))), Some(vec![7u8; 64]));
        assert_eq!(ids.key(&Identity::new(dev(), m("z"))), Some(vec![9u8; 16]));
        // Saved: a later load without --module-key still has them.
        let again = Identities::load_or_create(dir.path(), &dev(), &[m("a")]).expect("loaded");
        assert_eq!(
            again.key(&Identity::new(dev(), m("a"))),
            Some(vec![7u8; 64])
        );
        assert!(
            !format!("{:?}", given[0].1).contains("Bwc"),
            "keys are never printed"
        );
    }

    #[test]
    fn given_keys_must_have_a_length_iot_hub_accepts() {
        for bad in [
            BASE64.encode([1u8; 15]),
            BASE64.encode([1u8; 65]),
            "not base64!".into(),
        ] {
            assert!(ModuleKey::from_base64(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_declared_modules_of_this_device_have_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        Identities::load_or_create(dir.path(), &dev(), &[m("a"), m("b")]).expect("created");
        let ids = Identities::load_or_create(dir.path(), &dev(), &[m("a")]).expect("loaded");
        assert!(ids.key(&Identity::new(dev(), m("b"))).is_none());
        // Still on file, for sending upstream what b sent while it was declared.
        assert!(ids.stored_key(&Identity::new(dev(), m("b"))).is_some());
        assert!(ids
            .stored_key(&Identity::new(DeviceId::new("other"), m("b")))
            .is_none());
        assert!(ids.stored_key(&Identity::new(dev(), m("never"))).is_none());
        assert!(ids
            .key(&Identity::new(DeviceId::new("other"), m("a")))
            .is_none());
        let back =
            Identities::load_or_create(dir.path(), &dev(), &[m("a"), m("b")]).expect("loaded");
        assert!(back.key(&Identity::new(dev(), m("b"))).is_some());
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_the_file_and_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = Identities::path(dir.path());
        for bad in [
            "not json",
            r#"{"a": "%%%"}"#,
            r#"{"a": "AAAA"}"#,
            r#"{"$edgeHub": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#,
        ] {
            std::fs::write(&path, bad).expect("write");
            let err =
                Identities::load_or_create(dir.path(), &dev(), &[m("a")]).expect_err("corrupt");
            assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
            assert_eq!(std::fs::read_to_string(&path).expect("read"), bad);
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_private_and_no_temporary_file_is_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        Identities::load_or_create(dir.path(), &dev(), &[m("a")]).expect("created");
        let meta = std::fs::metadata(Identities::path(dir.path())).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(IDENTITIES_FILE)]);
    }

    #[test]
    fn the_connection_string_has_every_field_and_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = RawSettings {
            data_dir: Some(dir.path().to_path_buf()),
            gateway_hostname: Some("gw.example".into()),
            modules: vec!["sender".into()],
            ..RawSettings::default()
        }
        .validate(None)
        .expect("settings");
        let ids = Identities::for_settings(&settings, &[]).expect("ids");
        let cs = ids
            .connection_string(&m("sender"), &settings)
            .expect("known module");
        let key = BASE64.encode(ids.key(&Identity::new(dev(), m("sender"))).expect("key"));
        assert_eq!(
            cs,
            format!(
                "HostName=edgehub.local;DeviceId=edge-device;ModuleId=sender;\
                 SharedAccessKey={key};GatewayHostName=gw.example"
            )
        );
        let err = ids
            .connection_string(&m("nope"), &settings)
            .expect_err("unknown");
        assert!(err.to_string().contains("unknown module \"nope\""), "{err}");
        assert!(err.to_string().contains("known: sender"), "{err}");
    }

    #[test]
    fn apply_adds_removes_and_rekeys_and_saves_only_what_it_keeps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = Identities::load_or_create(dir.path(), &dev(), &[m("a"), m("b")]).expect("ids");
        let a = Identity::new(dev(), m("a"));
        let b = Identity::new(dev(), m("b"));
        let b_key = ids.key(&b).expect("b");
        let given = ModuleKey::from_base64(&BASE64.encode([3u8; 32])).expect("key");
        let changes = ids
            .apply(&[m("b"), m("c")], &[(m("b"), given.clone())])
            .expect("applied");
        assert_eq!(
            changes,
            IdentityChanges {
                added: vec![m("c")],
                removed: vec![m("a")],
                rekeyed: vec![m("b")],
            }
        );
        assert_eq!(ids.key(&a), None, "a removed: no login");
        assert!(ids.stored_key(&a).is_some(), "a's key stays on file");
        assert_eq!(ids.key(&b), Some(vec![3u8; 32]));
        assert_ne!(ids.key(&b), Some(b_key));
        assert!(ids.key(&Identity::new(dev(), m("c"))).is_some());
        // Saved: a fresh load sees the new key of b and the minted key of c.
        let again = Identities::load_or_create(dir.path(), &dev(), &[m("b"), m("c")]).expect("ids");
        assert_eq!(again.key(&b), Some(vec![3u8; 32]));
        assert_eq!(
            again.key(&Identity::new(dev(), m("c"))),
            ids.key(&Identity::new(dev(), m("c")))
        );
        // The same again changes nothing.
        let none = ids
            .apply(&[m("b"), m("c")], &[(m("b"), given)])
            .expect("applied");
        assert!(none.is_empty(), "{none:?}");
    }

    #[test]
    fn the_keys_directory_reads_a_mounted_secret_and_skips_its_dot_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // As the kubelet lays a Secret out: files are links into ..data -> ..<timestamp>/.
        let stamp = d.join("..2026_12_06_21_00_00.000000001");
        std::fs::create_dir(&stamp).expect("mkdir");
        std::fs::write(
            stamp.join("modA"),
            format!("{}\n", BASE64.encode([1u8; 32])),
        )
        .expect("w");
        std::fs::write(
            stamp.join("mod-b"),
            format!("  {}  ", BASE64.encode([2u8; 16])),
        )
        .expect("w");
        std::os::unix::fs::symlink(stamp.file_name().expect("name"), d.join("..data")).expect("ln");
        std::os::unix::fs::symlink("..data/modA", d.join("modA")).expect("ln");
        std::os::unix::fs::symlink("..data/mod-b", d.join("mod-b")).expect("ln");
        std::fs::create_dir(d.join("subdir")).expect("mkdir");
        std::fs::write(d.join(".hidden"), "not a key").expect("w");
        let keys = read_keys_dir(d).expect("valid");
        let names: Vec<&str> = keys.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(names, ["mod-b", "modA"]);
        assert_eq!(keys[0].1.as_bytes(), &[2u8; 16]);
        assert_eq!(keys[1].1.as_bytes(), &[1u8; 32]);
    }

    #[test]
    fn a_bad_key_file_is_an_error_naming_the_file_never_the_key() {
        let key = BASE64.encode([1u8; 32]);
        let short = BASE64.encode([1u8; 8]);
        for (name, content) in [
            ("bad name", key.as_str()),
            ("$edgeHub", key.as_str()),
            ("modA", short.as_str()),
            ("modA", "not base64!"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("ok"), &key).expect("w");
            std::fs::write(dir.path().join(name), content).expect("w");
            let err = read_keys_dir(dir.path()).expect_err(name);
            let text = err.to_string();
            assert!(matches!(err, IdentityError::KeysDir { .. }), "{text}");
            assert!(
                text.contains(&dir.path().join(name).display().to_string()),
                "{text}"
            );
            assert!(!text.contains(content), "{text}");
        }
        let err = read_keys_dir(Path::new("/nonexistent/keys")).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "module keys directory: /nonexistent/keys: cannot read it: No such file or directory \
             (os error 2)"
        );
    }

    #[test]
    fn an_identity_displays_as_the_mqtt_client_id() {
        assert_eq!(Identity::new(dev(), m("a")).to_string(), "edge-device/a");
    }
}
