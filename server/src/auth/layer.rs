//! The gate every call passes before routing: it finds who calls (the
//! `authorization: Bearer <key>` metadata) and whether their role allows
//! the method, and refuses the call before any handler runs.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::{
    TryFutureExt,
    future::{Either, MapOk, Ready, ready},
};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;
use tracing::{Instrument, instrument::Instrumented};

use super::{
    Caller, Principal,
    cache::{KeyCache, Refusal},
    limits::{Limits, exhausted},
    policy::{self, AccessRole, Need, OpenService},
};

/// What the gate checks.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The live keys; `None` when authentication is off (`--auth none`).
    keys: Option<Arc<KeyCache>>,
    /// Services normally open that need a key (`--auth-also`).
    closed: Vec<OpenService>,
    /// How often each caller may call.
    limits: Arc<Limits>,
}

/// Who a call is from, once admitted.
struct Admitted {
    caller: Caller,
    principal: Option<Principal>,
}

impl Gate {
    /// A gate checking `keys` (none: anyone may call) and `limits`.
    pub(crate) fn new(
        keys: Option<Arc<KeyCache>>,
        closed: Vec<OpenService>,
        limits: Arc<Limits>,
    ) -> Self {
        Self {
            keys,
            closed,
            limits,
        }
    }

    /// Who may make this call, or the status that refuses it. `Ok(None)`:
    /// an open method (health, reflection), which no limit counts.
    fn admit<B>(&self, request: &http::Request<B>) -> Result<Option<Admitted>, Status> {
        let path = request.uri().path();
        let needed = match policy::need(path, &self.closed) {
            Need::Open => return Ok(None),
            Need::AnyKey => None,
            Need::Role(role) => Some(role),
        };
        let principal = match &self.keys {
            Some(keys) => Some(authenticate(keys, request.headers(), path, needed)?),
            None => None,
        };
        let caller = Caller {
            id: match &principal {
                Some(principal) => principal.caller_id.clone(),
                None => format!("ip:{}", peer_ip(request.extensions())).into(),
            },
        };
        if let Some(calls) = &self.limits.calls {
            calls
                .take(&caller.id, 1)
                .map_err(|wait| exhausted("too many calls from this caller", wait))?;
        }
        if path == TRACK
            && let Some(events) = &self.limits.events
        {
            events
                .take(&caller.id, 1)
                .map_err(|wait| exhausted("too many events tracked by this caller", wait))?;
        }
        Ok(Some(Admitted { caller, principal }))
    }
}

/// The unary ingest method, which the events limit counts too (a
/// `TrackStream` counts its events as it reads them).
const TRACK: &str = "/rtap.v1.IngestService/Track";

/// The principal of the key in `headers`, if its role allows `needed`.
fn authenticate(
    keys: &KeyCache,
    headers: &http::HeaderMap,
    path: &str,
    needed: Option<AccessRole>,
) -> Result<Principal, Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(Status::unauthenticated(
            "missing API key: send the metadata `authorization: Bearer <key>` \
             (an administrator creates keys with `rtap-server keys create`)",
        ));
    };
    let text = bearer(value).ok_or_else(|| {
        Status::unauthenticated("malformed authorization metadata: expected `Bearer <key>`")
    })?;
    let principal = keys.verify(text).map_err(|refusal| match refusal {
        Refusal::Malformed => {
            Status::unauthenticated("malformed API key: RTAP keys look like `rtap_<id>_<secret>`")
        }
        Refusal::Invalid => Status::unauthenticated("invalid API key: unknown or revoked"),
        Refusal::NotLoaded => Status::unavailable(
            "API keys are not loaded yet (PostgreSQL unreachable or its schema not migrated); retry",
        ),
    })?;
    if let Some(needed) = needed
        && !principal.role.allows(needed)
    {
        return Err(Status::permission_denied(format!(
            "the key `{}` has the role `{}`; {} needs `{needed}`",
            principal.name,
            principal.role,
            path.trim_start_matches('/'),
        )));
    }
    Ok(principal)
}

/// The client's IP address, from what tonic records of the connection.
fn peer_ip(extensions: &http::Extensions) -> String {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
        .map_or_else(|| "unknown".to_owned(), |addr| addr.ip().to_string())
}

/// The key of an `authorization` value `Bearer <key>` (the scheme is
/// case-insensitive, as HTTP says).
fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let (scheme, key) = text.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|key| !key.is_empty())
}

/// Puts the [`Gate`] in front of a service.
#[derive(Debug, Clone)]
pub(crate) struct AuthLayer {
    gate: Arc<Gate>,
}

impl AuthLayer {
    /// A layer checking calls at `gate`.
    pub(crate) fn new(gate: Gate) -> Self {
        Self {
            gate: Arc::new(gate),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// A service whose calls pass the gate first.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Authenticated<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<
        Ready<Result<S::Response, S::Error>>,
        MapOk<Instrumented<S::Future>, fn(S::Response) -> S::Response>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        match self.gate.admit(&request) {
            Ok(Some(Admitted { caller, principal })) => {
                // Every log line of the call names who made it (never the key).
                let span = tracing::info_span!(
                    "rpc",
                    caller = %caller.id,
                    method = request.uri().path()
                );
                request.extensions_mut().insert(caller);
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                Either::Right(
                    self.inner
                        .call(request)
                        .instrument(span)
                        .map_ok(too_large_is_exhausted as fn(_) -> _),
                )
            }
            Ok(None) => Either::Right(
                self.inner
                    .call(request)
                    .instrument(tracing::Span::none())
                    .map_ok(too_large_is_exhausted as fn(_) -> _),
            ),
            Err(status) => {
                tracing::debug!(
                    method = request.uri().path(),
                    code = ?status.code(),
                    reason = status.message(),
                    "call refused"
                );
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

/// What tonic says of a request message over `--max-message-bytes`, as
/// `grpc-message` carries it: spaces raw or percent-encoded.
const TOO_LARGE: [&str; 2] = [
    "Error, decoded message length too large",
    "Error,%20decoded%20message%20length%20too%20large",
];

/// A request message over the size limit is RESOURCE_EXHAUSTED, as gRPC
/// says (tonic's decoder reports OUT_OF_RANGE): rewritten in the reply's
/// trailers-only head.
fn too_large_is_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|code| code == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| TOO_LARGE.iter().any(|prefix| m.starts_with(prefix)));
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}
