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

use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{Request, Uri};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::ConfigError;

/// Kling's global API host.
pub const GLOBAL: &str = "https://api-singapore.klingai.com";
/// Kling's China API host.
pub const CHINA: &str = "https://api-beijing.klingai.com";

/// Kling's hosts, as `'static` authorities: every resolved URI clones the base's authority,
/// and a static one is cloned without touching a reference count shared by every request.
static KNOWN_HOSTS: [&str; 2] = ["api-singapore.klingai.com", "api-beijing.klingai.com"];

/// `authority` as a static one: Kling's hosts from the binary's text ([`KNOWN_HOSTS`]), any
/// other (a proxy, a mock) interned ([`kling_core::intern`]), once per distinct host.
fn static_authority(authority: &Authority) -> Authority {
    let text = KNOWN_HOSTS
        .iter()
        .find(|host| authority.as_str() == **host)
        .copied()
        .unwrap_or_else(|| kling_core::intern::intern(authority.as_str()));
    // The same text parsed again, so it cannot fail; the parsed copy is the fallback anyway.
    Authority::from_maybe_shared(Bytes::from_static(text.as_bytes()))
        .unwrap_or_else(|_| authority.clone())
}

/// Applies [`BaseUrl`] to a service. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct BaseUrlLayer {
    base: Base,
}

#[derive(Clone, Debug)]
struct Base {
    scheme: Scheme,
    authority: Authority,
    /// The base's path without its trailing slash; empty for none. Interned: the service is
    /// cloned for every call by the layers above it, and a clone must neither allocate nor
    /// write a shared reference count.
    prefix: &'static str,
}

impl BaseUrlLayer {
    /// A base URL such as `https://api-singapore.klingai.com` or `http://127.0.0.1:PORT`; it
    /// needs a scheme (`http` or `https`) and a host, and carries no query.
    pub fn new(base: &str) -> Result<BaseUrlLayer, ConfigError> {
        let base = base.trim();
        let uri: Uri = base
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
        let prefix = kling_core::intern::intern(uri.path().trim_end_matches('/'));
        Ok(BaseUrlLayer {
            base: Base {
                scheme,
                authority: static_authority(&authority),
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
    /// Resolves a relative URI in place; absolute ones are left alone. A splice of the base's
    /// parsed scheme and authority with the request's own path and query: nothing is parsed
    /// again unless the base has a path.
    #[inline]
    fn resolve(&self, uri: &mut Uri) {
        if uri.scheme().is_some() || uri.authority().is_some() {
            return;
        }
        let mut parts = std::mem::take(uri).into_parts();
        if !self.prefix.is_empty() {
            if !self.prefix_path(&mut parts) {
                // Left relative, as it came.
                *uri = Uri::from_parts(parts).unwrap_or_default();
                return;
            }
        } else if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        // A scheme, an authority and a path make a valid URI; the fallback only keeps the type
        // checker happy.
        *uri = Uri::from_parts(parts).unwrap_or_default();
    }

    /// Puts the base's path before the relative path; `false` when the joined path is not a
    /// valid one (the parts are then left as they were).
    #[cold]
    #[inline(never)]
    fn prefix_path(&self, parts: &mut Parts) -> bool {
        let joined = match parts.path_and_query.as_ref() {
            Some(pq) if pq.as_str().starts_with('/') => format!("{}{}", self.prefix, pq),
            Some(pq) => format!("{}/{}", self.prefix, pq),
            None => self.prefix.to_string(),
        };
        match PathAndQuery::try_from(joined) {
            Ok(pq) => {
                parts.path_and_query = Some(pq);
                true
            }
            Err(_) => false,
        }
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

    #[inline]
    fn call(&mut self, mut request: Request<B>) -> S::Future {
        self.base.resolve(request.uri_mut());
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(base: &str, uri: &str) -> Uri {
        let layer = BaseUrlLayer::new(base).unwrap();
        let mut uri: Uri = uri.parse().unwrap();
        layer.base.resolve(&mut uri);
        uri
    }

    /// The splice agrees with parsing the joined text, for every base and relative URI here.
    #[test]
    fn the_splice_agrees_with_parsing_the_joined_text() {
        let bases = [
            GLOBAL,
            CHINA,
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "https://proxy.example/kling",
            "https://proxy.example/kling/",
            "http://user@proxy.example:9/a/b/",
        ];
        let relatives = [
            "/",
            "/v1/videos/text2video",
            "/v1/videos/text2video/abc-123",
            "/v1/tasks?task_ids=a,b",
            "/v1/images/generations?pageNum=1&pageSize=30",
            "/%7Euser/x?q=%20",
        ];
        for base in bases {
            let layer = BaseUrlLayer::new(base).unwrap();
            let prefix = layer.base.prefix.to_string();
            let origin = format!("{}://{}", layer.base.scheme, layer.base.authority);
            for relative in relatives {
                let uri = resolved(base, relative);
                let pq = relative.parse::<Uri>().unwrap();
                let pq = pq.path_and_query().unwrap().as_str();
                let expected = match (prefix.is_empty(), pq.starts_with('/')) {
                    (true, true) => format!("{origin}{pq}"),
                    (true, false) => format!("{origin}/{pq}"),
                    (false, true) => format!("{origin}{prefix}{pq}"),
                    (false, false) => format!("{origin}{prefix}/{pq}"),
                };
                let expected: Uri = expected.parse().unwrap();
                assert_eq!(uri, expected, "{base} + {relative}");
                assert_eq!(uri.to_string(), expected.to_string(), "{base} + {relative}");
            }
        }
    }

    #[test]
    fn absolute_uris_are_left_alone() {
        for absolute in ["http://127.0.0.1:9/v1/x", "https://other.example/?q=1"] {
            assert_eq!(resolved(GLOBAL, absolute), absolute.parse::<Uri>().unwrap());
        }
    }

    #[test]
    fn kling_hosts_are_kept_as_static_authorities() {
        for (base, host) in [GLOBAL, CHINA].into_iter().zip(&KNOWN_HOSTS) {
            let layer = BaseUrlLayer::new(base).unwrap();
            assert_eq!(layer.base.authority.as_str(), *host);
            // A static authority points into the binary's text, not a parsed copy.
            assert!(std::ptr::eq(
                layer.base.authority.as_str().as_ptr(),
                host.as_ptr()
            ));
        }
    }

    /// Any other host is interned: two layers on one host share one static text.
    #[test]
    fn other_hosts_are_interned() {
        for base in [
            "https://proxy.example:8080/kling",
            "https://api-singapore.klingai.com:443",
            "http://user@127.0.0.1:9",
        ] {
            let (a, b) = (
                BaseUrlLayer::new(base).unwrap(),
                BaseUrlLayer::new(base).unwrap(),
            );
            let expected: Uri = base.parse().unwrap();
            assert_eq!(Some(&a.base.authority), expected.authority());
            assert!(std::ptr::eq(
                a.base.authority.as_str().as_ptr(),
                b.base.authority.as_str().as_ptr()
            ));
        }
    }
}
