//! [`BaseUrlLayer`]: resolves relative request URIs (`/v1/videos/text2video`) against a base
//! URL — a region, a proxy, or the mock.
//!
//! Requests that already carry a scheme and host pass through untouched. A base with a path
//! (`https://proxy.example/kling`) prefixes it.
//!
//! ```
//! use kling_tower::base_url::BaseUrlLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let echo = service_fn(|req: http::Request<()>| async move {
//!     Ok::<_, std::convert::Infallible>(req.uri().to_string())
//! });
//! let service = BaseUrlLayer::new("http://127.0.0.1:8080/kling")?.layer(echo);
//! let uri = service.oneshot(http::Request::get("/tasks?task_ids=a").body(())?).await?;
//! assert_eq!(uri, "http://127.0.0.1:8080/kling/tasks?task_ids=a");
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::ConfigError;

/// Kling's global API host.
pub const GLOBAL: &str = "https://api-singapore.klingai.com";
/// Kling's China API host.
pub const CHINA: &str = "https://api-beijing.klingai.com";

/// Applies [`BaseUrl`] to a service. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct BaseUrlLayer {
    base: Base,
}

#[derive(Clone, Debug)]
struct Base {
    scheme: Scheme,
    authority: Authority,
    /// The base's path without its trailing slash; empty for none. Shared: the service is
    /// cloned for every call by the layers above it, and a clone must not allocate.
    prefix: Arc<str>,
}

impl BaseUrlLayer {
    /// A base URL such as `https://api-singapore.klingai.com` or `http://127.0.0.1:PORT`; it
    /// needs a scheme (`http` or `https`) and a host, and carries no query.
    pub fn new(base: &str) -> Result<BaseUrlLayer, ConfigError> {
        let uri: Uri = base
            .trim()
            .parse()
            .map_err(|e| ConfigError::new("base_url", format!("is not a URL: {e}")))?;
        let scheme = uri
            .scheme()
            .filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS)
            .cloned()
            .ok_or_else(|| ConfigError::new("base_url", "needs an http:// or https:// scheme"))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| ConfigError::new("base_url", "needs a host"))?;
        if uri.query().is_some() {
            return Err(ConfigError::new("base_url", "must not have a query"));
        }
        let prefix = Arc::from(uri.path().trim_end_matches('/'));
        Ok(BaseUrlLayer {
            base: Base {
                scheme,
                authority,
                prefix,
            },
        })
    }

    /// Kling's global host, [`GLOBAL`].
    pub fn global() -> BaseUrlLayer {
        BaseUrlLayer::new(GLOBAL).expect("the global host is a valid URL")
    }

    /// Kling's China host, [`CHINA`].
    pub fn china() -> BaseUrlLayer {
        BaseUrlLayer::new(CHINA).expect("the China host is a valid URL")
    }
}

impl<S> Layer<S> for BaseUrlLayer {
    type Service = BaseUrl<S>;

    fn layer(&self, inner: S) -> BaseUrl<S> {
        BaseUrl {
            inner,
            base: self.base.clone(),
        }
    }
}

/// Resolves relative request URIs against a base URL. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct BaseUrl<S> {
    inner: S,
    base: Base,
}

impl<S> BaseUrl<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl Base {
    /// Resolves a relative URI in place; absolute ones are left alone.
    fn resolve(&self, uri: &mut Uri) {
        if uri.scheme().is_some() || uri.authority().is_some() {
            return;
        }
        let mut parts = std::mem::take(uri).into_parts();
        if !self.prefix.is_empty() {
            let joined = match parts.path_and_query.as_ref() {
                Some(pq) if pq.as_str().starts_with('/') => format!("{}{}", self.prefix, pq),
                Some(pq) => format!("{}/{}", self.prefix, pq),
                None => self.prefix.to_string(),
            };
            match PathAndQuery::try_from(joined) {
                Ok(pq) => parts.path_and_query = Some(pq),
                Err(_) => {
                    *uri = Uri::from_parts(parts).unwrap_or_default();
                    return;
                }
            }
        } else if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        // Valid parts make a valid URI; the fallback only keeps the type checker happy.
        *uri = Uri::from_parts(parts).unwrap_or_default();
    }
}

impl<S, B> Service<Request<B>> for BaseUrl<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        self.base.resolve(request.uri_mut());
        self.inner.call(request)
    }
}
