//! The HTTPS head: direct-method invocations between modules of this device, as the SDKs send
//! them to their `GatewayHostName` (Python `IoTHubModuleClient.invoke_method`, Node
//! `ModuleClient.invokeMethod`; both dial port 443), on the hub's TLS (the same server
//! certificate as MQTT and AMQP), on `--methods-addr`.
//!
//! | request | answer |
//! |---|---|
//! | `POST /twins/{device}/modules/{module}/methods[?api-version=…]`, body `{"methodName", "payload", "responseTimeoutInSeconds", "connectTimeoutInSeconds"}` | 200 `{"status": <the module's status>, "payload": <the module's JSON>}` |
//! | … no `Authorization: SharedAccessSignature …` of a module of this device that verifies now, or `x-ms-edge-moduleId` not that very `{device}/{module}` | 401 |
//! | … a target on another device | 403 |
//! | … a body that is not an invocation, a timeout out of range, a bad method name | 400 |
//! | … a payload over 128 KiB (or a body over 132 KiB, not read further) | 413 |
//! | … the target's response payload over 128 KiB (not relayed) | 413 |
//! | … a body not received within 30 s ([`BODY_READ_TIMEOUT`]) | 408 |
//! | … the target not connected or not subscribed to its methods (within `connectTimeoutInSeconds`, default 0), or it disconnects before answering | 404 |
//! | … too many requests in flight (32 per target, 256 in all) | 429 |
//! | … no answer within `responseTimeoutInSeconds` (5–300, default 30) | 504 |
//! | … the hub shutting down | 503 |
//! | anything else | 404 (405 for another method on a methods path) |
//!
//! Errors are JSON: `{"errorCode": <IoT Hub's code>, "message": "…"}`. Each connection is
//! admitted into the HTTPS budget (`crate::limits`, as the other heads): it counts as
//! authenticated from its first authorized request on. Memory per request is bounded by the
//! body limit and the requests in flight ([`crate::methods`]).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use router::{DeviceId, ModuleId};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::head::accept::serve_tls_with;
use crate::head::context::HeadContext;
use crate::identity::Identity;
use crate::limits::{Budget, Slot};
use crate::methods::request::MAX_BODY_BYTES;
use crate::methods::{InvokeError, MethodRequest, MethodResponse};

/// How long an authorized caller may take to send its request body (then 408).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The header naming the calling module, `{device}/{module}`.
pub const EDGE_MODULE_ID: &str = "x-ms-edge-moduleId";

const JSON: &str = "application/json; charset=utf-8";

/// Serves direct-method invocations over TLS on `listener` until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<HeadContext>,
    budget: Arc<Budget>,
    shutdown: watch::Receiver<bool>,
) {
    let stop = shutdown.clone();
    serve_tls_with(
        listener,
        acceptor,
        budget,
        shutdown,
        "HTTPS",
        move |tls, peer, slot| {
            let (ctx, stop) = (Arc::clone(&ctx), stop.clone());
            async move { serve_connection(tls, ctx, peer, slot, stop).await }
        },
    )
    .await;
}

/// Serves one connection's requests until it closes or the hub stops.
pub async fn serve_connection<S>(
    stream: S,
    ctx: Arc<HeadContext>,
    peer: String,
    slot: Slot,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let handler = {
        let stop = stop.clone();
        move |req| {
            let (ctx, slot, stop) = (Arc::clone(&ctx), slot.clone(), stop.clone());
            async move { respond(&ctx, &slot, stop, req).await }
        }
    };
    if let Err(e) = crate::http::serve_http1(stream, handler, stop).await {
        tracing::debug!(%peer, error = %e, "HTTPS connection ended with an error");
    }
}

/// A refused request: the status, IoT Hub's error code and why.
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    code: u32,
    message: String,
}

impl Refused {
    fn new(status: u16, code: u32, message: impl Into<String>) -> Refused {
        Refused {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
        }
    }

    fn unauthorized(message: impl Into<String>) -> Refused {
        Refused::new(401, 401_002, message)
    }
}

async fn respond(
    ctx: &HeadContext,
    slot: &Slot,
    stop: watch::Receiver<bool>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match invoke(ctx, slot, stop, req).await {
        Ok(response) => {
            let body = json!({
                "status": response.status,
                "payload": payload_json(&response.payload),
            });
            reply(StatusCode::OK, body.to_string())
        }
        Err(refused) => {
            if refused.status == StatusCode::UNAUTHORIZED {
                tracing::warn!(error = %refused.message, "direct method call refused");
            } else {
                tracing::debug!(status = refused.status.as_u16(), error = %refused.message, "direct method call failed");
            }
            let body = json!({"errorCode": refused.code, "message": refused.message});
            reply(refused.status, body.to_string())
        }
    }
}

/// The steps of one request: route, authorize, read, invoke.
async fn invoke(
    ctx: &HeadContext,
    slot: &Slot,
    mut stop: watch::Receiver<bool>,
    req: Request<Incoming>,
) -> Result<MethodResponse, Refused> {
    let target = target_of(req.uri().path())
        .ok_or_else(|| Refused::new(404, 404_001, "no such resource"))?;
    if req.method() != Method::POST {
        return Err(Refused::new(
            405,
            405_000,
            "direct methods are invoked with POST",
        ));
    }
    let caller = authorize(ctx, &req)?;
    if let Err(e) = slot.authenticated() {
        return Err(Refused::new(
            503,
            503_000,
            format!("the hub is at its connection limit: {e}"),
        ));
    }
    if target.device != caller.device {
        return Err(Refused::new(
            403,
            403_000,
            format!(
                "{caller} may call only modules of its own device, not of {}",
                target.device
            ),
        ));
    }
    if ctx.identities.key(&target).is_none() {
        // Not a module of this deployment: it can never connect (and the metrics' labels stay
        // bounded by the declared modules).
        return Err(Refused::new(
            404,
            404_001,
            format!("module {target} is not declared"),
        ));
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = read_body(declared, req.into_body()).await?;
    let request = MethodRequest::parse(&body).map_err(|e| {
        let status = e.status();
        Refused::new(
            status,
            if status == 413 { 413_001 } else { 400_004 },
            e.to_string(),
        )
    })?;
    let started = Instant::now();
    let outcome = tokio::select! {
        r = ctx.methods.invoke(&target, &request) => r,
        () = crate::http::stopped(&mut stop) => {
            return Err(Refused::new(503, 503_000, "the hub is shutting down"));
        }
    };
    if outcome.is_err() && *stop.borrow() {
        // The target's connection closed because the hub stops: say that, not "disconnected".
        return Err(Refused::new(503, 503_000, "the hub is shutting down"));
    }
    ctx.metrics
        .direct_method(&caller, &target, started.elapsed());
    tracing::debug!(%caller, %target, method = %request.name, ok = outcome.is_ok(), "direct method call");
    outcome.map_err(|e| {
        let code = match &e {
            InvokeError::NotConnected(_) => 404_103,
            InvokeError::Disconnected(_) => 404_104,
            InvokeError::Busy(_) => 429_001,
            InvokeError::Timeout(_) => 504_101,
            InvokeError::ResponseTooLarge(..) => 413_001,
        };
        Refused::new(e.status(), code, e.to_string())
    })
}

/// The target of `/twins/{device}/modules/{module}/methods` (segments percent-decoded).
fn target_of(path: &str) -> Option<Identity> {
    let rest = path.strip_prefix("/twins/")?;
    let mut parts = rest.split('/');
    let (device, modules, module, methods) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if modules != "modules" || methods != "methods" || parts.next().is_some() {
        return None;
    }
    let decode = |s: &str| -> Option<String> {
        let s = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
        (!s.is_empty()).then(|| s.into_owned())
    };
    Some(Identity::new(
        DeviceId::new(decode(device)?),
        ModuleId::new(decode(module)?),
    ))
}

/// The calling module: its `x-ms-edge-moduleId` names a module of this device whose SAS token
/// (`Authorization`) verifies now; else 401.
fn authorize(ctx: &HeadContext, req: &Request<Incoming>) -> Result<Identity, Refused> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let token = header(AUTHORIZATION.as_str())
        .ok_or_else(|| Refused::unauthorized("no Authorization header (a module's SAS token)"))?;
    let caller = header(EDGE_MODULE_ID)
        .ok_or_else(|| Refused::unauthorized(format!("no {EDGE_MODULE_ID} header")))?;
    let (device, module) = caller
        .split_once('/')
        .filter(|(d, m)| !d.is_empty() && !m.is_empty() && !m.contains('/'))
        .ok_or_else(|| {
            Refused::unauthorized(format!("{EDGE_MODULE_ID} {caller:?} is not device/module"))
        })?;
    let caller = Identity::new(DeviceId::new(device), ModuleId::new(module));
    let key = ctx
        .identities
        .key(&caller)
        .ok_or_else(|| Refused::unauthorized(format!("unknown module {caller}")))?;
    // The token must be the caller's own: its audience names that very module.
    ctx.verify_token(token, &key, &caller)
        .map_err(|e| Refused::unauthorized(format!("{caller}: {e}")))?;
    Ok(caller)
}

/// The body (`declared`: its Content-Length), at most [`MAX_BODY_BYTES`] (a larger one is not
/// read further: 413).
async fn read_body<B>(declared: Option<u64>, body: B) -> Result<Bytes, Refused>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        Refused::new(
            413,
            413_001,
            format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    };
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let reading = Limited::new(body, MAX_BODY_BYTES).collect();
    let Ok(read) = tokio::time::timeout(BODY_READ_TIMEOUT, reading).await else {
        return Err(Refused::new(
            408,
            408_000,
            format!(
                "the request body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        ));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Refused::new(
            400,
            400_004,
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// The module's payload as JSON: as sent if it is JSON, `null` if empty, else a JSON string of
/// its text (invalid UTF-8 replaced).
fn payload_json(payload: &[u8]) -> Value {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_comes_from_the_path_decoded() {
        assert_eq!(
            target_of("/twins/edge-device/modules/modB/methods"),
            Some(Identity::new(
                DeviceId::new("edge-device"),
                ModuleId::new("modB")
            ))
        );
        assert_eq!(
            target_of("/twins/d%2D1/modules/m%40x/methods"),
            Some(Identity::new(DeviceId::new("d-1"), ModuleId::new("m@x")))
        );
        for p in [
            "/twins/d/methods",
            "/twins/d/modules/m/methods/",
            "/twins/d/modules//methods",
            "/twins/d/modules/m",
            "/twins//modules/m/methods",
            "/devices/d/modules/m/methods",
            "/twins/d/modules/m/methods/x",
        ] {
            assert_eq!(target_of(p), None, "{p}");
        }
    }

    /// A body that never comes.
    struct Stalled;

    impl hyper::body::Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>>
        {
            std::task::Poll::Pending
        }
    }

    /// A caller (authenticated: the body is read only after) that never sends the body it
    /// announced holds its connection at most [`BODY_READ_TIMEOUT`], then gets 408.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_comes_is_408_after_the_read_timeout() {
        let start = tokio::time::Instant::now();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            read_body(Some(10), Stalled),
        )
        .await
        .expect("answered before the hour-long failure bound");
        let refused = read.expect_err("no body");
        assert_eq!(refused.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(start.elapsed(), BODY_READ_TIMEOUT);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413_declared_or_not() {
        let over = Full::new(Bytes::from(vec![b' '; MAX_BODY_BYTES + 1]));
        let refused = read_body(None, over).await.expect_err("too large");
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
        let refused = read_body(Some(MAX_BODY_BYTES as u64 + 1), Stalled)
            .await
            .expect_err("refused without reading");
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
        let at = Full::new(Bytes::from(vec![b' '; MAX_BODY_BYTES]));
        assert_eq!(read_body(None, at).await.unwrap().len(), MAX_BODY_BYTES);
    }

    #[test]
    fn payloads_become_json_whatever_the_module_sent() {
        assert_eq!(payload_json(br#"{"a":1}"#), json!({"a":1}));
        assert_eq!(payload_json(b""), Value::Null);
        assert_eq!(payload_json(b"not json"), json!("not json"));
        assert_eq!(payload_json(b"42"), json!(42));
    }
}
