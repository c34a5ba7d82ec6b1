//! The gate every call passes before routing: it finds who calls (the
//! `authorization: Bearer <key>` metadata) and whether their role allows
//! the method, and refuses the call before any handler runs.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{Either, Ready, ready};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;
use tracing::{Instrument, instrument::Instrumented};

use super::{
    Principal,
    cache::{KeyCache, Refusal},
    policy::{self, Need, OpenService},
};

/// What the gate checks.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The live keys; `None` when authentication is off (`--auth none`).
    keys: Option<Arc<KeyCache>>,
    /// Services normally open that need a key (`--auth-also`).
    closed: Vec<OpenService>,
}

impl Gate {
    /// A gate checking `keys` (none: every call passes).
    pub(crate) fn new(keys: Option<Arc<KeyCache>>, closed: Vec<OpenService>) -> Self {
        Self { keys, closed }
    }

    /// Who may make this call to `path`, or the status that refuses it.
    /// `Ok(None)`: an open method, or authentication is off.
    fn admit(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Principal>, Status> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let needed = match policy::need(path, &self.closed) {
            Need::Open => return Ok(None),
            Need::AnyKey => None,
            Need::Role(role) => Some(role),
        };
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
            Refusal::Malformed => Status::unauthenticated(
                "malformed API key: RTAP keys look like `rtap_<id>_<secret>`",
            ),
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
        Ok(Some(principal))
    }
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
    type Future = Either<Ready<Result<S::Response, S::Error>>, Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        match self.gate.admit(request.uri().path(), request.headers()) {
            Ok(Some(principal)) => {
                // Every log line of the call names who made it (never the key).
                let span = tracing::info_span!(
                    "rpc",
                    principal = %principal.name,
                    method = request.uri().path()
                );
                request.extensions_mut().insert(principal);
                Either::Right(self.inner.call(request).instrument(span))
            }
            Ok(None) => Either::Right(self.inner.call(request).instrument(tracing::Span::none())),
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
