//! The HTTP surface operators and Kubernetes use: `/metrics`, `/healthz`, `/readyz`.
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | 200, OpenMetrics text ([`HubMetrics::render`]) |
//! | `GET /healthz` | 200 `ok` while the store accepts writes; 503 with the reason once it halted (poisoned or fenced): restart the process (a fenced hub also stops by itself, exit status 3) |
//! | `GET /manifest` | 200, JSON: the manifest in force (source, generation, routes, modules, store TTL) and the last reload (`lastReload`: time, trigger, `result` success or failure, the changes, every error with its location) |
//! | `GET /readyz` | 200 `ready` once the server marked itself ready ([`Readiness::set_ready`], after its listeners are up) and the store accepts writes; 503 otherwise |
//! | anything else | 404 (405 for another method on a known path) |
//!
//! `HEAD` is answered like `GET` without a body.
//!
//! Guarantees: [`serve`] stops accepting when `shutdown` completes, lets every open connection
//! finish its current request, and returns only once all of them have ended. A client that
//! never finishes its request headers is dropped after [`HEADER_READ_TIMEOUT`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use router::RouterMetrics;
use store::{Clock, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::HubMetrics;

/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// Whether the hub is ready for traffic. Cheap to clone; every clone is the same flag.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A flag that starts "not ready".
    pub fn new() -> Self {
        Self::default()
    }

    /// The listeners are up.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// The hub is shutting down (or not ready again for another reason).
    pub fn set_not_ready(&self) {
        self.0.store(false, Ordering::Release);
    }

    /// Whether [`set_ready`](Self::set_ready) was called last.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A source of routing counters (usually `move || dispatcher.metrics()`).
pub type RouterMetricsFn = Arc<dyn Fn() -> RouterMetrics + Send + Sync>;

/// What the HTTP server reads.
#[derive(Clone)]
pub struct HttpState {
    /// The metrics to render.
    pub metrics: Arc<HubMetrics>,
    /// The store: health and queue state.
    pub store: Store,
    /// The routing counters.
    pub router_metrics: RouterMetricsFn,
    /// Set by the server once its listeners are up.
    pub readiness: Readiness,
    /// The manifest in force and the last reload's outcome.
    pub manifest: Arc<crate::reload::ManifestStatus>,
    /// The hub's wall clock: oldest-message ages are measured by it.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("store", &self.store)
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` completes, then waits for open connections
/// to finish their current request.
pub async fn serve(listener: TcpListener, state: HttpState, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    let mut backoff = crate::limits::AcceptBackoff::default();
    let mut failures = crate::limits::LogLimiter::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    backoff.on_success();
                    connections.spawn(serve_connection(tcp, state.clone(), stop_rx.clone()));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning, and log
                    // once per interval.
                    let pause = backoff.on_error();
                    if let Some(not_logged) = failures.hit(tokio::time::Instant::now()) {
                        tracing::warn!(error = %e, failures_not_logged = not_logged, "HTTP accept failed");
                    }
                    tokio::time::sleep(pause).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    state: HttpState,
    stop: watch::Receiver<bool>,
) {
    let handler = move |req: Request<Incoming>| {
        let state = state.clone();
        async move { respond(&state, &req).await }
    };
    if let Err(e) = serve_http1(tcp, handler, stop).await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Serves one HTTP/1.1 connection with `handler` until the client closes it. A client that
/// never finishes its request headers is dropped after [`HEADER_READ_TIMEOUT`]; once `stop`
/// turns true the request in progress is finished and the connection closed (hyper's graceful
/// shutdown). Both HTTP surfaces (this one, and `crate::https`) serve their connections so.
pub(crate) async fn serve_http1<S, H, Fut>(
    stream: S,
    handler: H,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    H: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let answer = handler(req);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Completes once the stop flag is true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn respond(state: &HttpState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if !matches!(
        req.uri().path(),
        "/metrics" | "/healthz" | "/readyz" | "/manifest"
    ) {
        return reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into(), head);
    }
    if req.method() != Method::GET && !head {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
            head,
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let text = render_metrics(state).await;
            reply(StatusCode::OK, OPENMETRICS, text, head)
        }
        "/manifest" => reply(StatusCode::OK, JSON, state.manifest.to_json(), head),
        "/healthz" => match state.store.halted_reason() {
            None => reply(StatusCode::OK, TEXT, "ok\n".into(), head),
            Some(reason) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("store halted: {reason}\n"),
                head,
            ),
        },
        _ => match (state.readiness.is_ready(), state.store.halted_reason()) {
            (_, Some(reason)) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("store halted: {reason}\n"),
                head,
            ),
            (false, None) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not ready\n".into(),
                head,
            ),
            (true, None) => reply(StatusCode::OK, TEXT, "ready\n".into(), head),
        },
    }
}

/// Renders on the blocking pool: a scrape reads one message per non-empty queue from disk.
async fn render_metrics(state: &HttpState) -> String {
    let state = state.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let router = (state.router_metrics)();
        state
            .metrics
            .render_at(&state.store, &router, state.clock.now())
    })
    .await;
    rendered.unwrap_or_else(|e| {
        tracing::error!(error = %e, "metrics rendering panicked");
        String::from("# EOF\n")
    })
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: String,
    head: bool,
) -> Response<Full<Bytes>> {
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::StoreOptions;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Server {
        addr: std::net::SocketAddr,
        readiness: Readiness,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    fn open_store(dir: &std::path::Path, epoch: u64) -> Store {
        let opts = StoreOptions {
            epoch: store::Epoch::new(epoch),
            reserve_bytes: 0,
            preallocate: false,
            segment_bytes: 1 << 20,
            ..StoreOptions::default()
        };
        Store::open(dir, opts).expect("store")
    }

    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path(), 0);
        start_with(dir, store).await
    }

    async fn start_with(dir: tempfile::TempDir, store: Store) -> Server {
        let readiness = Readiness::new();
        let state = HttpState {
            metrics: Arc::new(HubMetrics::new("edgehub.local", "edge-device")),
            store,
            router_metrics: Arc::new(|| RouterMetrics {
                unrouted: 7,
                ..RouterMetrics::default()
            }),
            readiness: readiness.clone(),
            manifest: Arc::default(),
            clock: Arc::new(store::SystemClock),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            readiness,
            stop: Some(tx),
            task,
            _dir: dir,
        }
    }

    /// Sends one request and returns (status, headers and body as text).
    async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.expect("write");
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.expect("read");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        (status, response)
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_text() {
        let server = start().await;
        let (status, response) = request(server.addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{response}");
        assert!(
            response.contains("application/openmetrics-text"),
            "{response}"
        );
        assert!(
            response.contains("edgehub_messages_dropped_total{")
                && response.contains("reason=\"no_route\"} 7"),
            "{response}"
        );
        assert!(response.trim_end().ends_with("# EOF"), "{response}");
    }

    #[tokio::test]
    async fn healthz_is_ok_while_the_store_accepts_writes() {
        let server = start().await;
        let (status, response) = request(server.addr, "GET", "/healthz").await;
        assert_eq!(status, 200, "{response}");
        assert!(response.ends_with("ok\n"), "{response}");
    }

    #[tokio::test]
    async fn a_halted_store_makes_healthz_and_readyz_503_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = open_store(dir.path(), 0);
        let _newer = open_store(dir.path(), 1);
        let queue = store::QueueName::new("q").expect("name");
        let refused = old.append(&[queue], Bytes::from_static(b"x"), None).await;
        assert!(refused.is_err(), "a fenced store refuses writes");
        let server = start_with(dir, old).await;
        server.readiness.set_ready();
        for path in ["/healthz", "/readyz"] {
            let (status, response) = request(server.addr, "GET", path).await;
            assert_eq!(status, 503, "{response}");
            assert!(response.contains("store halted: fenced"), "{response}");
        }
    }

    #[tokio::test]
    async fn readyz_follows_the_readiness_flag() {
        let server = start().await;
        let (status, response) = request(server.addr, "GET", "/readyz").await;
        assert_eq!(status, 503, "{response}");
        server.readiness.set_ready();
        let (status, _) = request(server.addr, "GET", "/readyz").await;
        assert_eq!(status, 200);
        server.readiness.set_not_ready();
        let (status, _) = request(server.addr, "GET", "/readyz").await;
        assert_eq!(status, 503);
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_other_methods_405() {
        let server = start().await;
        assert_eq!(request(server.addr, "GET", "/nope").await.0, 404);
        assert_eq!(request(server.addr, "POST", "/metrics").await.0, 405);
        let (status, response) = request(server.addr, "HEAD", "/healthz").await;
        assert_eq!(status, 200);
        assert!(!response.ends_with("ok\n"), "{response}");
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_waits_for_open_connections() {
        let mut server = start().await;
        // An idle keep-alive connection must not hold shutdown up.
        let mut idle = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let n = idle.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        if let Some(stop) = server.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut server.task)
            .await
            .expect("serve returns promptly")
            .expect("no panic");
        assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
    }
}
