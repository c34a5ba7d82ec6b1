//! The live dashboard's page and assets, served on the gRPC port under
//! `/dashboard/`, beside the API it calls through grpc-web (tonic-web). The
//! files are built from `dashboard/` (`npm run build`) and embedded at
//! compile time, so the page needs nothing but this process; CI rebuilds
//! them and checks that the committed `dashboard/dist/` matches.
//!
//! Only `GET` and `HEAD` of these few paths are answered here; every other
//! request goes on to the gRPC services (and their auth gate). The page
//! itself is public: it holds no data, and asks for an API key when the
//! server requires one.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::Full;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;

/// Where the page lives.
pub const PATH: &str = "/dashboard/";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: PATH,
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../dashboard/dist/index.html"),
    },
    Asset {
        path: "/dashboard/assets/dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/dist/assets/dashboard.js"),
    },
    Asset {
        path: "/dashboard/assets/dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../dashboard/dist/assets/dashboard.css"),
    },
];

/// The page may load only its own scripts and styles and call only its own
/// origin. uPlot sizes its elements through `style` attributes, hence
/// `'unsafe-inline'` for styles (never for scripts).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Puts [`Dashboard`] in front of a service.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DashboardLayer {
    /// Off: every request goes on (`--dashboard false`, or a role that does
    /// not serve the API).
    pub(crate) enabled: bool,
}

impl<S> Layer<S> for DashboardLayer {
    type Service = Dashboard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Dashboard {
            inner,
            enabled: self.enabled,
        }
    }
}

/// Answers the dashboard's paths; passes everything else to `inner`.
#[derive(Debug, Clone)]
pub(crate) struct Dashboard<S> {
    inner: S,
    enabled: bool,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Dashboard<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.method();
        if self.enabled
            && (method == Method::GET || method == Method::HEAD)
            && let Some(response) = respond(request.uri().path(), method == Method::HEAD)
        {
            return Box::pin(std::future::ready(Ok(response)));
        }
        Box::pin(self.inner.call(request))
    }
}

/// The answer to a `GET` (or `HEAD`) of `path`, if it is the dashboard's.
fn respond(path: &str, head: bool) -> Option<http::Response<Body>> {
    if matches!(path, "/" | "/dashboard" | "/dashboard/index.html") {
        return Some(redirect());
    }
    let asset = ASSETS.iter().find(|asset| asset.path == path)?;
    let body = if head {
        Body::empty()
    } else {
        Body::new(Full::new(Bytes::from_static(asset.body)))
    };
    let mut response = http::Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.body.len()));
    // Fixed names, so revalidate: a new server version serves new files.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(response)
}

fn redirect() -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(PATH));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_assets_are_served_and_nothing_else() {
        let page = respond(PATH, false).expect("the page");
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        for asset in ASSETS {
            assert!(!asset.body.is_empty(), "{} is empty", asset.path);
            // The page refers to its assets by these paths.
            if asset.path != PATH {
                let html = std::str::from_utf8(ASSETS[0].body).expect("UTF-8 page");
                assert!(
                    html.contains(asset.path),
                    "the page does not load {}",
                    asset.path
                );
            }
        }
        for path in ["/", "/dashboard", "/dashboard/index.html"] {
            let moved = respond(path, false).expect("a redirect");
            assert_eq!(moved.status(), StatusCode::PERMANENT_REDIRECT);
            assert_eq!(moved.headers()[header::LOCATION], PATH);
        }
        for path in [
            "/rtap.v1.AnalyticsService/Subscribe",
            "/dashboard/x",
            "/favicon.ico",
        ] {
            assert!(respond(path, false).is_none(), "{path}");
        }
    }
}
