//! The "Service": a small TCP forwarder listening where the modules dial. New connections go
//! to the pod the simulation designates (held until there is one, as a connection waits while
//! no endpoint is ready); when the designated pod changes, every connection to the old one is
//! closed, so modules reconnect and land on the new one, as endpoints follow the live pod.
//! It counts the bytes a node sends to modules after it was marked stale (after its
//! successor opened the volume): a stale instance's PUBACK or delivery would be among them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::error::SimError;

/// How long an accepted connection waits for a designated pod before it is closed.
const HOLD: Duration = Duration::from_secs(60);

/// A pod the Service can send to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// "a" or "b".
    pub node: String,
    /// Its hub's MQTT listener.
    pub addr: SocketAddr,
}

#[derive(Debug, Default)]
struct Stats {
    stale: Mutex<Vec<String>>,
    stale_bytes: AtomicU64,
    /// Connections forwarded, per node.
    connections: Mutex<BTreeMap<String, u64>>,
    /// Connections accepted, per listener.
    accepted: Mutex<BTreeMap<String, u64>>,
    /// When each node first sent a byte to each module (listener label, node).
    first_byte: Mutex<BTreeMap<(String, String), Instant>>,
}

/// The forwarder and its runtime (two worker threads).
#[derive(Debug)]
pub struct Forwarder {
    rt: tokio::runtime::Runtime,
    target: watch::Sender<Option<Backend>>,
    stats: Arc<Stats>,
}

impl Forwarder {
    /// A forwarder with no listener and no designated pod yet.
    pub fn new() -> Result<Forwarder, SimError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| SimError::io("start the forwarder's runtime", e))?;
        let (target, _) = watch::channel(None);
        Ok(Forwarder {
            rt,
            target,
            stats: Arc::new(Stats::default()),
        })
    }

    /// Listens on `addr` (a module's link, port 8883) for the module `label`.
    pub fn listen(&self, label: &str, addr: SocketAddr) -> Result<(), SimError> {
        let label = label.to_owned();
        let listener = self
            .rt
            .block_on(TcpListener::bind(addr))
            .map_err(|e| SimError::io(format!("forwarder: bind {addr}"), e))?;
        let target = self.target.clone();
        let stats = Arc::clone(&self.stats);
        self.rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if let Ok(mut a) = stats.accepted.lock() {
                    *a.entry(label.clone()).or_insert(0) += 1;
                }
                let rx = target.subscribe();
                tokio::spawn(serve(client, label.clone(), rx, Arc::clone(&stats)));
            }
        });
        Ok(())
    }

    /// Designates the pod new connections go to (None: no ready endpoint); connections to any
    /// other pod are closed.
    pub fn designate(&self, backend: Option<Backend>) {
        self.target.send_replace(backend);
    }

    /// The pod designated now.
    pub fn designated(&self) -> Option<Backend> {
        self.target.borrow().clone()
    }

    /// From now on, bytes `node` sends to modules are counted as stale.
    pub fn mark_stale(&self, node: &str) {
        if let Ok(mut s) = self.stats.stale.lock() {
            s.push(node.to_owned());
        }
    }

    /// Bytes stale nodes sent to modules after they were marked.
    pub fn stale_bytes(&self) -> u64 {
        self.stats.stale_bytes.load(Ordering::Relaxed)
    }

    /// Connections accepted from module `label` so far.
    pub fn accepted(&self, label: &str) -> u64 {
        self.stats
            .accepted
            .lock()
            .map(|a| a.get(label).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// When `node` first sent a byte to module `label` (its CONNACK, on the first
    /// connection): anything that module reports after this can have come from `node`.
    pub fn first_byte(&self, label: &str, node: &str) -> Option<Instant> {
        self.stats
            .first_byte
            .lock()
            .ok()
            .and_then(|f| f.get(&(label.to_owned(), node.to_owned())).copied())
    }

    /// Connections forwarded to each node.
    pub fn connections(&self) -> BTreeMap<String, u64> {
        self.stats
            .connections
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }
}

async fn serve(
    mut client: TcpStream,
    label: String,
    mut rx: watch::Receiver<Option<Backend>>,
    stats: Arc<Stats>,
) {
    let backend = tokio::time::timeout(HOLD, async {
        loop {
            if let Some(b) = rx.borrow_and_update().clone() {
                return Some(b);
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    })
    .await;
    let Ok(Some(backend)) = backend else {
        return;
    };
    let Ok(Ok(mut server)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(backend.addr)).await
    else {
        return;
    };
    if let Ok(mut c) = stats.connections.lock() {
        *c.entry(backend.node.clone()).or_insert(0) += 1;
    }
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let node = backend.node.clone();
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Ok(mut f) = stats.first_byte.lock() {
                        f.entry((label.clone(), node.clone()))
                            .or_insert_with(Instant::now);
                    }
                    let stale = stats
                        .stale
                        .lock()
                        .map(|s| s.contains(&node))
                        .unwrap_or(false);
                    if stale {
                        stats.stale_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let moved = async {
        loop {
            if rx.changed().await.is_err() {
                return;
            }
            if rx.borrow_and_update().as_ref() != Some(&backend) {
                return;
            }
        }
    };
    // Whichever ends first closes both sides (dropping the streams).
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = moved => {}
    }
}
