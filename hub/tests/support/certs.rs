//! Certificate files for tests of `--tls-cert`, `--tls-key` and `--tls-ca`, laid out as a
//! Kubernetes Secret volume lays them out, and rotated the way the kubelet rotates them.
//!
//! ```ignore
//! #[path = "support/certs.rs"] mod certs;
//! let ca = certs::Ca::new("test CA");
//! let dir = certs::SecretDir::new(tempdir.path().join("tls"));
//! dir.publish(&ca.issue(&["localhost"]).files(&ca));   // tls.crt, tls.key, ca.crt
//! // ... run the hub with dir.cert(), dir.key(), dir.ca() ...
//! dir.publish(&ca.issue(&["localhost"]).files(&ca));   // rotated: one atomic ..data swap
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A CA of the test's own.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A server certificate and its key.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its key, PEM.
    pub key_pem: String,
    /// The certificate, DER (what a client sees in the handshake).
    pub der: Vec<u8>,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (host names or IP addresses), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Issued {
        let key = KeyPair::generate().expect("server key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "edgehub test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("server certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

impl Issued {
    /// The three files of a `D-hub-tls` Secret as the hub mounts them.
    pub fn files(&self, ca: &Ca) -> Vec<(&'static str, String)> {
        vec![
            ("tls.crt", self.cert_pem.clone()),
            ("tls.key", self.key_pem.clone()),
            ("ca.crt", ca.pem()),
        ]
    }
}

/// A directory as the kubelet writes a Secret volume: the files live in a timestamped
/// directory, `..data` links to it, and each file name links through `..data`. Publishing
/// new content writes a new directory and renames a new `..data` link over the old one (one
/// atomic step), then removes the old directory.
pub struct SecretDir {
    dir: PathBuf,
    generation: std::cell::Cell<u32>,
}

impl SecretDir {
    /// An empty directory at `dir` (created, readable by everyone: a container's non-root
    /// user reads it too).
    pub fn new(dir: PathBuf) -> SecretDir {
        std::fs::create_dir_all(&dir).expect("secret dir");
        set_mode(&dir, 0o755);
        SecretDir {
            dir,
            generation: std::cell::Cell::new(0),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `tls.crt`'s path.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    /// `tls.key`'s path.
    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    /// `ca.crt`'s path.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Replaces the content with `files` as the kubelet does (see the type's docs). Files are
    /// mode 0644 so a container's non-root user can read them (the kubelet makes them readable
    /// to the pod's fsGroup).
    pub fn publish(&self, files: &[(&str, String)]) {
        let n = self.generation.get() + 1;
        self.generation.set(n);
        let name = format!("..2026_01_01_00_00_{n:02}.{n}");
        let new = self.dir.join(&name);
        std::fs::create_dir(&new).expect("timestamped dir");
        set_mode(&new, 0o755);
        for (file, text) in files {
            let path = new.join(file);
            std::fs::write(&path, text).expect("write secret file");
            set_mode(&path, 0o644);
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).expect("..data_tmp link");
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
        for (file, _) in files {
            let link = self.dir.join(file);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(file), &link)
                    .expect("file link");
            }
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
