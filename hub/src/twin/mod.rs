//! Module twins, served locally: desired properties from IoT Hub (upstream on) or the
//! deployment manifest, reported properties from the module, kept durably in the data
//! directory (`twins/`) and, upstream on, synced to IoT Hub.
//!
//! Guarantees:
//! - A reported-properties patch is acknowledged ([`Twins::patch_reported`] returns its
//!   `$version`) only after the whole twin is on disk (atomic replace, fdatasync, directory
//!   fsync) **and** this hub still owns the data directory: each module's twin is an
//!   [`OwnedFile`] (`twins/{hex of the module id}.{generation}.json`), so a hub that a newer
//!   one fenced can neither acknowledge a patch nor overwrite the live hub's twin. One module's
//!   patches are applied one at a time, in the order they are taken (a lock per module).
//! - A refused patch (see [`document`] for the rules and statuses) changes nothing, in memory
//!   or on disk.
//! - A twin's desired properties come from IoT Hub once it gave them, when upstream is on
//!   ([`Twins::with_cloud`]: the cloud connection GETs the twin at every connect and takes
//!   IoT Hub's desired patches, [`Twins::cloud_desired_document`],
//!   [`Twins::cloud_desired_patch`]); they are kept with the twin, so a restart while IoT Hub
//!   is away still serves them, with IoT Hub's `$version`. Otherwise they are the manifest's
//!   in force ([`Twins::set_manifest`] on every reload): the manifest's `properties.desired`
//!   of a module are what IoT Hub would hold. The manifest's `$version` is kept if it gives
//!   one; else it goes up by one each time the document served changes, and never goes back
//!   across restarts, because the version is written (with the document) before it is served.
//!   Switching source (IoT Hub's first document) serves IoT Hub's `$version`, which may be
//!   lower than the manifest's was.
//! - Either change reaches connections listening through the same notification
//!   ([`Twins::desired_changes`], [`desired_watch`]): MQTT desired patches and AMQP twin link
//!   notifications.
//! - A twin file is opened on first use; a damaged one is an error naming the file (answered
//!   500), never an empty twin.
//! - Blocking file work runs under `block_in_place` on the multi-thread runtime, as the MQTT
//!   sessions do, so other connections move to another worker meanwhile.
//! - With upstream on, what IoT Hub acknowledged of the reported properties is kept in the twin
//!   ([`document::CloudState`]); the cloud connection sends what it lacks
//!   ([`Twins::reported_to_sync`], `upstream::twin_sync`, whose docs hold the crash argument).
//!   A sync never changes or fails a local patch: it takes the module's lock only to read the
//!   twin and to write what IoT Hub acknowledged or may hold.

pub mod desired_watch;
pub mod document;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use router::ModuleId;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::owned_file::{OwnedFile, OwnedFileError, Ownership};

pub use document::{DesiredGap, PatchError, ReportedSync, Twin};

/// The directory of the twin files inside the data directory.
pub const TWINS_DIR: &str = "twins";

/// Reading, writing or changing a twin failed.
#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    /// The patch was refused (the module's fault).
    #[error(transparent)]
    Patch(#[from] PatchError),
    /// The twin file could not be read or written, or this hub no longer owns the data
    /// directory.
    #[error("twin store: {0}")]
    File(#[from] OwnedFileError),
    /// The twin file is not what this program writes.
    #[error("{path} is damaged ({reason}); restore it or remove it (the module's reported properties are then lost)")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl TwinError {
    /// The status to answer the module, or `None` when nothing may be answered (a newer hub
    /// owns the data directory: the live hub serves the module).
    pub fn status(&self) -> Option<u16> {
        match self {
            TwinError::Patch(e) => Some(e.status()),
            TwinError::File(OwnedFileError::Fenced { .. }) => None,
            TwinError::File(_) | TwinError::Damaged { .. } => Some(500),
        }
    }
}

/// A twin file that could not be read: where, and why.
#[derive(Clone, Debug)]
struct Damage {
    path: PathBuf,
    reason: String,
}

impl From<Damage> for TwinError {
    fn from(d: Damage) -> Self {
        TwinError::Damaged {
            path: d.path,
            reason: d.reason,
        }
    }
}

/// A module's twin as first opened: its slot, or why its file could not be read.
type Opened = Result<Arc<Mutex<Slot>>, Damage>;

/// One module's twin and its file.
struct Slot {
    file: OwnedFile,
    twin: Twin,
}

/// The twins of every module of the hub.
pub struct Twins {
    dir: PathBuf,
    owner: Arc<dyn Ownership>,
    /// Desired properties per module, as the manifest in force gives them.
    manifest: Mutex<BTreeMap<ModuleId, Map<String, Value>>>,
    /// Twins opened so far, or why one could not be read (kept: opening again would find the
    /// damaged content already moved to this owner's copy, which an open does not read).
    slots: Mutex<HashMap<ModuleId, Opened>>,
    /// Bumped whenever the manifest's desired properties change (a connection then asks for
    /// its module's, [`Twins::desired`], and sends the difference).
    desired_changed: watch::Sender<u64>,
    /// Bumped after every accepted reported-properties patch (the cloud sync sends it on).
    reported_changed: watch::Sender<u64>,
    /// Whether IoT Hub's desired properties, once given, are served instead of the manifest's
    /// (upstream on).
    cloud: bool,
    /// Modules whose twin a head served (a GET, or a connection listening to desired
    /// patches): the cloud sync keeps their connection to IoT Hub, for desired properties.
    served: Mutex<HashSet<ModuleId>>,
    /// Bumped when a module joins `served`.
    served_changed: watch::Sender<u64>,
}

/// What a desired patch from IoT Hub did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloudPatch {
    /// Applied; connections listening were told.
    Applied,
    /// A version held already, or an older one: nothing changed.
    Old,
    /// It does not follow the version held: read the twin from IoT Hub again.
    Gap(DesiredGap),
}

impl std::fmt::Debug for Twins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Twins")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The file stem of a module's twin: its id in lowercase hex (ids may hold `$`, `.`, `%`, …).
pub fn file_stem(module: &ModuleId) -> String {
    module
        .as_str()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Twins {
    /// The twins kept in `{data_dir}/twins` by `owner` (this hub's store), with the desired
    /// properties of `manifest`. Creates the directory; opens no twin yet.
    pub fn new(
        data_dir: &Path,
        owner: Arc<dyn Ownership>,
        manifest: BTreeMap<ModuleId, Map<String, Value>>,
    ) -> Result<Twins, TwinError> {
        let dir = data_dir.join(TWINS_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| OwnedFileError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(Twins {
            dir,
            owner,
            manifest: Mutex::new(manifest),
            slots: Mutex::new(HashMap::new()),
            desired_changed: watch::channel(0).0,
            reported_changed: watch::channel(0).0,
            cloud: false,
            served: Mutex::new(HashSet::new()),
            served_changed: watch::channel(0).0,
        })
    }

    /// These twins with IoT Hub as the source of desired properties (upstream on): once IoT
    /// Hub gave a module's desired document ([`Twins::cloud_desired_document`]), it is served,
    /// with IoT Hub's `$version`, instead of the manifest's, restarts included.
    pub fn with_cloud(mut self) -> Twins {
        self.cloud = true;
        self
    }

    /// Takes the desired properties of a new manifest; connections hear of it if they changed.
    pub fn set_manifest(&self, manifest: BTreeMap<ModuleId, Map<String, Value>>) {
        let changed = {
            let mut current = lock(&self.manifest);
            let changed = *current != manifest;
            *current = manifest;
            changed
        };
        if changed {
            self.desired_changed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Changes whenever the manifest's desired properties change.
    pub fn desired_changes(&self) -> watch::Receiver<u64> {
        self.desired_changed.subscribe()
    }

    /// The twin of `module` as a GET answers it (desired properties brought up to the
    /// manifest in force first, durably).
    pub fn get(&self, module: &ModuleId) -> Result<Twin, TwinError> {
        self.note_served(module);
        self.with_slot(module, |slot, desired| {
            sync_desired(slot, desired, self.cloud)?;
            slot.file.check_owner()?;
            Ok(slot.twin.clone())
        })
    }

    /// The desired properties of `module` and their version, brought up to the manifest in
    /// force (durably) first.
    pub fn desired(&self, module: &ModuleId) -> Result<(u64, Map<String, Value>), TwinError> {
        self.note_served(module);
        self.with_slot(module, |slot, desired| {
            sync_desired(slot, desired, self.cloud)?;
            Ok((slot.twin.desired_version, slot.twin.desired.clone()))
        })
    }

    /// Applies a reported-properties patch (JSON) to `module`'s twin, durably; returns the new
    /// reported `$version`. On any error nothing changed.
    pub fn patch_reported(&self, module: &ModuleId, payload: &[u8]) -> Result<u64, TwinError> {
        self.with_slot(module, |slot, _| {
            let next = slot.twin.with_reported_patch(payload)?;
            write(&slot.file, &next)?;
            slot.twin = next;
            Ok(slot.twin.reported_version)
        })
        .inspect(|_| {
            self.reported_changed
                .send_modify(|g| *g = g.wrapping_add(1))
        })
    }

    /// Changes after every accepted reported-properties patch, of any module.
    pub fn reported_changes(&self) -> watch::Receiver<u64> {
        self.reported_changed.subscribe()
    }

    /// What IoT Hub lacks of `module`'s reported properties, or `None` when it has them all.
    pub fn reported_to_sync(&self, module: &ModuleId) -> Result<Option<ReportedSync>, TwinError> {
        self.with_slot(module, |slot, _| Ok(slot.twin.reported_to_sync()))
    }

    /// `sync`'s patch is about to go to IoT Hub: its document is kept durably among those IoT
    /// Hub may hold (until a 204), so a later patch is right whether or not IoT Hub applied
    /// it, across a kill -9 too. Send it only once this returned `Ok`.
    pub fn reported_sending(
        &self,
        module: &ModuleId,
        sync: &ReportedSync,
    ) -> Result<(), TwinError> {
        self.with_slot(module, |slot, _| {
            if let Some(next) = slot.twin.with_reported_sending(sync) {
                write(&slot.file, &next)?;
                slot.twin = next;
            }
            Ok(())
        })
    }

    /// IoT Hub acknowledged `sync` (answered 204 to its patch): kept durably with the twin, so
    /// it is never sent again, restarts included. An older acknowledgement changes nothing.
    pub fn reported_synced(&self, module: &ModuleId, sync: &ReportedSync) -> Result<(), TwinError> {
        self.with_slot(module, |slot, _| {
            if let Some(next) = slot.twin.with_reported_synced(&sync.reported, sync.version) {
                write(&slot.file, &next)?;
                slot.twin = next;
            }
            Ok(())
        })
    }

    /// The modules whose twin was opened so far.
    pub fn opened(&self) -> Vec<ModuleId> {
        lock(&self.slots).keys().cloned().collect()
    }

    /// Whether a head served `module`'s twin since the hub started.
    pub fn was_served(&self, module: &ModuleId) -> bool {
        lock(&self.served).contains(module)
    }

    /// Changes when a head serves a module's twin for the first time.
    pub fn served_changes(&self) -> watch::Receiver<u64> {
        self.served_changed.subscribe()
    }

    fn note_served(&self, module: &ModuleId) {
        if lock(&self.served).insert(module.clone()) {
            self.served_changed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// IoT Hub's whole desired document of `module` (a twin GET: `properties` without
    /// `$version`), kept durably; connections listening are told if what they serve changed.
    pub fn cloud_desired_document(
        &self,
        module: &ModuleId,
        properties: &Map<String, Value>,
        version: u64,
    ) -> Result<(), TwinError> {
        let changed = self.with_slot(module, |slot, _| {
            let Some(next) = slot.twin.with_cloud_desired_document(properties, version) else {
                return Ok(false);
            };
            write(&slot.file, &next)?;
            slot.twin = next;
            Ok(true)
        })?;
        if changed && self.cloud {
            self.desired_changed.send_modify(|g| *g = g.wrapping_add(1));
        }
        Ok(())
    }

    /// A desired patch of IoT Hub's for `module` (`$version` left out of `patch`), kept durably
    /// if it follows the version held.
    pub fn cloud_desired_patch(
        &self,
        module: &ModuleId,
        patch: &Map<String, Value>,
        version: u64,
    ) -> Result<CloudPatch, TwinError> {
        let outcome = self.with_slot(module, |slot, _| {
            match slot.twin.with_cloud_desired_patch(patch, version) {
                Ok(Some(next)) => {
                    write(&slot.file, &next)?;
                    slot.twin = next;
                    Ok(CloudPatch::Applied)
                }
                Ok(None) => Ok(CloudPatch::Old),
                Err(gap) => Ok(CloudPatch::Gap(gap)),
            }
        })?;
        if outcome == CloudPatch::Applied && self.cloud {
            self.desired_changed.send_modify(|g| *g = g.wrapping_add(1));
        }
        Ok(outcome)
    }

    /// Runs `work` on `module`'s twin (opened on first use) with the manifest's desired
    /// properties for it, holding the module's lock; blocking work under `block_in_place`.
    fn with_slot<T>(
        &self,
        module: &ModuleId,
        work: impl FnOnce(&mut Slot, &Map<String, Value>) -> Result<T, TwinError>,
    ) -> Result<T, TwinError> {
        let run = || {
            let slot = self.slot(module)?;
            let desired = lock(&self.manifest)
                .get(module)
                .cloned()
                .unwrap_or_default();
            let mut slot = lock(&slot);
            work(&mut slot, &desired)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        }
    }

    /// `module`'s slot, opening its file on first use.
    fn slot(&self, module: &ModuleId) -> Result<Arc<Mutex<Slot>>, TwinError> {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(module) {
            return slot.clone().map_err(TwinError::from);
        }
        let (file, content) =
            OwnedFile::open(&self.dir, &file_stem(module), Arc::clone(&self.owner))?;
        let twin = match content {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Damage {
                path: file.path().to_owned(),
                reason: e.to_string(),
            }),
            None => Ok(Twin::default()),
        };
        let slot = twin.map(|twin| Arc::new(Mutex::new(Slot { file, twin })));
        slots.insert(module.clone(), slot.clone());
        slot.map_err(TwinError::from)
    }
}

/// Brings `slot`'s desired properties to their source (IoT Hub's if `cloud` and it gave them,
/// else `from_manifest`), writing the new version before it is served.
fn sync_desired(
    slot: &mut Slot,
    from_manifest: &Map<String, Value>,
    cloud: bool,
) -> Result<(), TwinError> {
    let source = slot.twin.desired_source(from_manifest, cloud);
    if let Some(change) = slot.twin.with_desired(&source) {
        write(&slot.file, &change.twin)?;
        slot.twin = change.twin;
    }
    Ok(())
}

fn write(file: &OwnedFile, twin: &Twin) -> Result<(), TwinError> {
    let bytes = serde_json::to_vec(twin).map_err(|e| TwinError::Damaged {
        path: file.path().to_owned(),
        reason: e.to_string(),
    })?;
    Ok(file.write(&bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn open(dir: &Path, manifest: Value) -> (store::Store, Twins) {
        let store = store::Store::open(dir.join("store"), store::StoreOptions::default()).unwrap();
        let manifest = match manifest {
            Value::Object(m) => m
                .into_iter()
                .map(|(k, v)| match v {
                    Value::Object(d) => (ModuleId::new(k), d),
                    other => panic!("{other}"),
                })
                .collect(),
            other => panic!("{other}"),
        };
        let twins = Twins::new(dir, Arc::new(store.clone()), manifest).unwrap();
        (store, twins)
    }

    #[test]
    fn reported_properties_survive_a_restart_and_desired_versions_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let m = ModuleId::new("$odd.id%");
        let (_store, twins) = open(dir.path(), json!({"$odd.id%": {"rate": 5}}));
        let first = twins.get(&m).unwrap();
        assert_eq!(first.desired_version, 2);
        assert_eq!(twins.patch_reported(&m, br#"{"a": 1}"#).unwrap(), 2);
        assert!(twins.patch_reported(&m, b"{oops").is_err());
        drop(twins);
        // The manifest changed (no $version) while the hub was down.
        let (_store, again) = open(dir.path(), json!({"$odd.id%": {"rate": 6}}));
        let twin = again.get(&m).unwrap();
        assert_eq!(Value::Object(twin.reported), json!({"a": 1}));
        assert_eq!(twin.reported_version, 2);
        assert_eq!(twin.desired_version, 3);
        assert!(dir.path().join("twins").read_dir().unwrap().all(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.starts_with(&file_stem(&m)) && !name.contains('$')
        }));
    }

    #[test]
    fn a_reload_is_heard_and_the_desired_properties_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = ModuleId::new("m");
        let (_store, twins) = open(dir.path(), json!({"m": {"rate": 5}}));
        let mut changes = twins.desired_changes();
        assert_eq!(twins.desired(&m).unwrap().0, 2);
        twins.set_manifest(BTreeMap::from([(
            m.clone(),
            serde_json::from_value(json!({"rate": 6})).unwrap(),
        )]));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let (version, desired) = twins.desired(&m).unwrap();
        assert_eq!((version, Value::Object(desired)), (3, json!({"rate": 6})));
        // The same manifest again is no change.
        twins.set_manifest(BTreeMap::from([(
            m.clone(),
            serde_json::from_value(json!({"rate": 6})).unwrap(),
        )]));
        assert!(!changes.has_changed().unwrap());
    }

    /// With upstream on, IoT Hub's desired document wins over the manifest's once given (and
    /// tells listening connections), patches follow it in version order, a reload of the
    /// manifest no longer changes it, and it is still served after a restart; with upstream
    /// off, the manifest's is served.
    #[test]
    fn iot_hub_desired_properties_win_over_the_manifest_and_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let m = ModuleId::new("m");
        let obj = |v: Value| match v {
            Value::Object(o) => o,
            other => panic!("{other}"),
        };
        let (store, twins) = open(dir.path(), json!({"m": {"rate": 5}}));
        let twins = twins.with_cloud();
        let mut changes = twins.desired_changes();
        assert!(!twins.was_served(&m));
        assert_eq!(twins.desired(&m).unwrap(), (2, obj(json!({"rate": 5}))));
        assert!(twins.was_served(&m), "a head asked");
        twins
            .cloud_desired_document(&m, &obj(json!({"rate": 7, "x": 1})), 1)
            .unwrap();
        assert!(changes.has_changed().unwrap(), "listeners are told");
        changes.mark_unchanged();
        assert_eq!(
            twins.desired(&m).unwrap(),
            (1, obj(json!({"rate": 7, "x": 1})))
        );
        assert_eq!(
            twins
                .cloud_desired_patch(&m, &obj(json!({"x": null})), 3)
                .unwrap(),
            CloudPatch::Gap(DesiredGap {
                held: Some(1),
                got: 3
            })
        );
        assert!(!changes.has_changed().unwrap());
        assert_eq!(
            twins
                .cloud_desired_patch(&m, &obj(json!({"x": null})), 2)
                .unwrap(),
            CloudPatch::Applied
        );
        assert!(changes.has_changed().unwrap());
        twins.set_manifest(BTreeMap::from([(m.clone(), obj(json!({"rate": 6})))]));
        assert_eq!(twins.desired(&m).unwrap(), (2, obj(json!({"rate": 7}))));
        drop((twins, store));
        let (store, again) = open(dir.path(), json!({"m": {"rate": 6}}));
        let again = again.with_cloud();
        assert_eq!(again.get(&m).unwrap().desired, obj(json!({"rate": 7})));
        drop((again, store));
        let (_store, off) = open(dir.path(), json!({"m": {"rate": 6}}));
        assert_eq!(
            off.desired(&m).unwrap().1,
            obj(json!({"rate": 6})),
            "upstream off"
        );
    }

    /// A hub that a newer hub fenced, before it noticed, acknowledges no patch, and the live
    /// hub's twin is not overwritten.
    #[test]
    fn a_fenced_hub_acknowledges_no_patch() {
        let dir = tempfile::tempdir().unwrap();
        let m = ModuleId::new("m");
        let (_old_store, old) = open(dir.path(), json!({}));
        assert_eq!(old.patch_reported(&m, br#"{"a": 1}"#).unwrap(), 2);
        let (_store, live) = open(dir.path(), json!({}));
        assert_eq!(live.patch_reported(&m, br#"{"b": 2}"#).unwrap(), 3);
        let err = old.patch_reported(&m, br#"{"c": 3}"#).unwrap_err();
        assert!(err.to_string().contains("fenced"), "{err}");
        assert_eq!(err.status(), None, "nothing is answered");
        assert!(old.get(&m).is_err(), "a fenced hub serves no GET either");
        drop(live);
        let (_store, next) = open(dir.path(), json!({}));
        let twin = next.get(&m).unwrap();
        assert_eq!(Value::Object(twin.reported), json!({"a": 1, "b": 2}));
    }

    #[test]
    fn a_damaged_twin_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = ModuleId::new("m");
        std::fs::create_dir_all(dir.path().join("twins")).unwrap();
        std::fs::write(
            dir.path()
                .join("twins")
                .join(format!("{}.json", file_stem(&m))),
            b"{not json",
        )
        .unwrap();
        let (_store, twins) = open(dir.path(), json!({}));
        for _ in 0..2 {
            // Asked again, still the error: never an empty twin.
            let err = twins.get(&m).unwrap_err();
            assert_eq!(err.status(), Some(500));
            assert!(err.to_string().contains("twins/6d."), "{err}");
            assert!(twins.patch_reported(&m, br#"{"a": 1}"#).is_err());
        }
    }
}
