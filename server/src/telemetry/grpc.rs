//! Counts every gRPC call by service, method and status code, and times it
//! from its arrival to its end: a unary call to its reply, a stream to its
//! trailers (or to the client going away, counted as CANCELLED). Placed in
//! front of the auth gate, so refused calls are counted too.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::Frame;
use metrics::{counter, histogram};
use tonic::{Status, body::Body};
use tower_layer::Layer;
use tower_service::Service;

use super::{GRPC_DURATION, GRPC_REQUESTS};
use crate::auth::policy;

/// Puts [`Metered`] in front of a service.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MetricsLayer;

impl<S> Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered { inner }
    }
}

/// A service whose calls are counted and timed.
#[derive(Debug, Clone)]
pub(crate) struct Metered<S> {
    inner: S,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Metered<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = Call::start(request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move { Ok(call.follow(response.await?)) })
    }
}

/// One call being timed.
struct Call {
    service: &'static str,
    method: &'static str,
    started: Instant,
}

impl Call {
    fn start(path: &str) -> Self {
        let (service, method) = policy::method_labels(path);
        Self {
            service,
            method,
            started: Instant::now(),
        }
    }

    /// Records the call now if its head carries the status (trailers-only:
    /// a refusal, an error), else when its body ends.
    fn follow(self, response: http::Response<Body>) -> http::Response<Body> {
        if let Some(code) = status_code(response.headers()) {
            self.end(code);
            return response;
        }
        response.map(|inner| {
            Body::new(MeteredBody {
                inner,
                call: Some(self),
            })
        })
    }

    fn end(self, code: &'static str) {
        let (service, method) = (self.service, self.method);
        counter!(GRPC_REQUESTS, "service" => service, "method" => method, "code" => code)
            .increment(1);
        histogram!(GRPC_DURATION, "service" => service, "method" => method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// A response body that records its call at its trailers.
struct MeteredBody {
    inner: Body,
    call: Option<Call>,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|t| status_code(t).unwrap_or("UNKNOWN")),
            Some(Err(status)) => Some(code_name(status.code() as i32)),
            // Ended without trailers: gRPC would call that a protocol error.
            None => Some("UNKNOWN"),
        };
        if let Some(code) = code
            && let Some(call) = self.call.take()
        {
            call.end(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // The client went away before the call ended.
        if let Some(call) = self.call.take() {
            call.end("CANCELLED");
        }
    }
}

/// The `grpc-status` of `headers`, by name.
fn status_code(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code = value.to_str().ok().and_then(|v| v.parse::<i32>().ok());
    Some(code.map_or("UNKNOWN", code_name))
}

/// gRPC's name of status `code`, as in its specification.
fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|index| NAMES.get(index))
        .copied()
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted as i32),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(
            code_name(tonic::Code::Unauthenticated as i32),
            "UNAUTHENTICATED"
        );
        assert_eq!(code_name(17), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_code(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(status_code(&headers), Some("NOT_FOUND"));
        headers.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(status_code(&headers), Some("UNKNOWN"));
    }
}
