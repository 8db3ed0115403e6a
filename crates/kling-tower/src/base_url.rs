//! [`BaseUrlLayer`]: resolves relative request URIs (`/v1/videos/text2video`) against a base
//! URL — a region, a proxy, or the mock — and keeps requests, with the credentials set above it,
//! at that base.
//!
//! A base with a path (`https://proxy.example/kling`) prefixes it. A base is `https://`;
//! plain `http://` is refused with a [`ConfigError`] naming `base_url`, except to a loopback
//! host (`127.0.0.0/8`, `::1`, `localhost`: the mock, a local proxy), since the API key or
//! token every request carries would otherwise cross the network in cleartext (the real API is
//! HTTPS only).
//!
//! # Requests to another origin
//!
//! A request whose URI is already absolute passes through untouched when it names the base's
//! origin (scheme, host and port, the default port for the scheme when none is written), and
//! is refused before it is sent when it names any other: it fails with [`OtherOrigin`], whose
//! [`source`](std::error::Error::source) is
//! [`RefusedBeforeSending`] (so
//! [`SendState::of`](kling_core::SendState::of) reads it as never sent). The layers above this
//! one (the auth layer's `Authorization`) set the stack's credentials for its base URL, and a
//! result URL on a CDN, or a URL someone else chose, must never receive them. Refused rather
//! than sent without credentials: such a request is a mistake (fetch result files with a
//! client of their own), and an error says so where a stripped header would turn into a
//! puzzling 401 or a download. In [`KlingLayer`](crate::KlingLayer)'s stack this layer is the
//! last before the client, so by the time it refuses, the rate limiter has paced the request
//! and the metrics have counted it: the refusal protects the credentials, not the rate.
//!
//! The refusal's source is [`RefusedBeforeSending`]:
//! the classify step above passes it up as it is, and a retry layer returns it at once rather
//! than trying again.
//!
//! ```
//! use kling_tower::base_url::{BaseUrlLayer, OtherOrigin};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let echo = service_fn(|req: http::Request<()>| async move {
//!     Ok::<_, std::convert::Infallible>(req.uri().to_string())
//! });
//! let service = BaseUrlLayer::new("http://127.0.0.1:8080/kling")?.layer(echo);
//! let uri = service.clone().oneshot(http::Request::get("/tasks?task_ids=a").body(())?).await?;
//! assert_eq!(uri, "http://127.0.0.1:8080/kling/tasks?task_ids=a");
//!
//! let elsewhere = http::Request::get("https://cdn.example/a.mp4").body(())?;
//! let refused = service.oneshot(elsewhere).await.unwrap_err();
//! assert!(refused.is::<OtherOrigin>());
//!
//! let cleartext = BaseUrlLayer::new("http://api-singapore.klingai.com").unwrap_err();
//! assert_eq!(cleartext.field(), "base_url");
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{Request, Uri};
use kling_core::BoxError;
use kling_core::error::RefusedBeforeSending;
use pin_project_lite::pin_project;
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

/// `authority` as static text: Kling's hosts from the binary's text ([`KNOWN_HOSTS`]), any
/// other (a proxy, a mock) interned ([`kling_core::intern`]), once per distinct host.
fn static_authority_text(authority: &Authority) -> &'static str {
    KNOWN_HOSTS
        .iter()
        .find(|host| authority.as_str() == **host)
        .copied()
        .unwrap_or_else(|| kling_core::intern::intern(authority.as_str()))
}

/// Whether plain `http://` to `host` stays on this machine: `127.0.0.0/8`, `::1` (also as
/// `::ffff:127.x.y.z`) or `localhost`.
fn is_loopback(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => bare
            .strip_suffix('.')
            .unwrap_or(bare)
            .eq_ignore_ascii_case("localhost"),
    }
}

/// The port a URI with `scheme` and no written port goes to.
fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else {
        None
    }
}

/// A base URL's origin: scheme, host and port. Static texts, so a copy is a plain copy (the
/// services that hold one are cloned for every call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    https: bool,
    host: &'static str,
    port: u16,
}

impl Origin {
    fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    #[cold]
    #[inline(never)]
    fn same_as(&self, uri: &Uri) -> bool {
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(self.scheme())
            && host.eq_ignore_ascii_case(self.host)
            && uri.port_u16().or_else(|| default_port(scheme)) == Some(self.port)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme(), self.host, self.port)
    }
}

/// A request to another origin (scheme, host or port) than its base URL's, refused before it
/// was sent: the credentials the layers above set are for the base URL alone. See the
/// [module docs](self#requests-to-another-origin).
///
/// Its [`source`](std::error::Error::source) is
/// [`RefusedBeforeSending`]: the request never left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherOrigin {
    origin: String,
    base: String,
}

impl OtherOrigin {
    pub(crate) fn new(uri: &Uri, base: &Origin) -> OtherOrigin {
        // Scheme, host and port only: a URI's user info, path and query may hold secrets
        // (a signed download URL), and this error goes into logs.
        let origin = match (uri.scheme_str(), uri.host()) {
            (Some(scheme), Some(host)) => match uri.port_u16().or_else(|| default_port(scheme)) {
                Some(port) => format!("{scheme}://{host}:{port}"),
                None => format!("{scheme}://{host}"),
            },
            (None, Some(host)) => match uri.port_u16() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            },
            _ => "an unnamed origin".to_owned(),
        };
        OtherOrigin {
            origin,
            base: base.to_string(),
        }
    }

    /// The refused request's origin, `scheme://host:port` (no user info, path or query).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The base URL's origin, `scheme://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }
}

impl fmt::Display for OtherOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused a request to {}: the stack sends to its base url {} only, never with its credentials elsewhere",
            self.origin, self.base
        )
    }
}

impl std::error::Error for OtherOrigin {
    /// [`RefusedBeforeSending`]: the request was not sent.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&RefusedBeforeSending)
    }
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
    origin: Origin,
    /// The base's path without its trailing slash; empty for none. Interned: the service is
    /// cloned for every call by the layers above it, and a clone must neither allocate nor
    /// write a shared reference count.
    prefix: &'static str,
}

impl BaseUrlLayer {
    /// A base URL such as `https://api-singapore.klingai.com`; it needs a scheme and a host
    /// (and a port, if written, from 1 to 65535: `http` reads `:84430` as no port), and
    /// carries no user info, query, fragment (`#…`, which is never sent), IPv6 zone id
    /// (`[fe80::1%25eth0]`, which the clients refuse) nor empty path segment (`//`). The
    /// scheme is `https`, or `http` to a loopback host only (`http://127.0.0.1:PORT`,
    /// `http://[::1]:PORT`, `http://localhost:PORT`: the mock, a local proxy); plain `http` to
    /// any other host is refused, since every request's credentials would cross the network
    /// in cleartext. Spaces around the text are dropped.
    ///
    /// The error names what is wrong, and quotes nothing of a text with an `@`, `?` or `#`
    /// anywhere, which may carry a password or a signature: it is refused for that before
    /// anything else is read. A `/`, `?` or `#` in a password ends the host there, so
    /// `https://kb:pa/ss@proxy` reads as host `kb` and port `pa` (and `https://kb:443/x@proxy`
    /// as host `kb`, port 443 and path `/x@proxy`).
    pub fn new(base: &str) -> Result<BaseUrlLayer, ConfigError> {
        let base = base.trim();
        // Refused before anything is parsed, so no refusal below can quote a piece of a secret:
        // every later check sees a text with none of `@`, `?` and `#`.
        //
        // User info would be printed wherever the base is (`Debug`, the builder's logs), and
        // reqwest would turn it into an `Authorization` header beside the stack's. An `@`
        // anywhere: where a password holds a `/`, `?` or `#`, the user info is read as a host
        // and a port, or as a host (the user name) and a path (`https://token/x@proxy` had
        // host `token`, and would have been sent the stack's credentials).
        if base.contains('@') {
            return Err(ConfigError::new(
                "base_url",
                "must not carry user info (`user:password@`), and is not quoted: with an `@` \
                 it may hold a password (a `/`, `?` or `#` in one ends the host there; an `@` \
                 in a path is written `%40`); the stack signs every request with its own \
                 credentials",
            ));
        }
        match base.chars().find(|c| matches!(c, '?' | '#')) {
            Some('?') => {
                return Err(ConfigError::new(
                    "base_url",
                    "must not have a query (`?…`; not quoted: it may hold a signature)",
                ));
            }
            // `http` drops a fragment as it parses, so the base was kept without it.
            Some(_) => {
                return Err(ConfigError::new(
                    "base_url",
                    "must not have a fragment (`#…`; not quoted): a fragment is never sent, \
                     so requests would go to the URL without it",
                ));
            }
            None => {}
        }
        let uri: Uri = base
            .parse()
            .map_err(|e| ConfigError::new("base_url", format!("is not a URL: {e}")))?;
        let scheme = uri
            .scheme()
            .filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS)
            .cloned()
            .ok_or_else(|| ConfigError::new("base_url", "needs an https:// scheme"))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| ConfigError::new("base_url", "needs a host"))?;
        // `http` takes `https://:443` (no host) and `https://h:99999` (a port it reads as none,
        // so the origin kept the scheme's default): each built, and then failed every request.
        let host = authority.host();
        if host.is_empty() {
            return Err(ConfigError::new("base_url", "needs a host"));
        }
        // `http` takes any text between brackets (`[]`) and after them (`[::1]x:80`).
        if let Some(literal) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            // A zone id (`[fe80::1%25eth0]`) too, which no client of the stack can reach:
            // reqwest's `url` refuses it (every request a builder error), hyper's connector
            // looks it up as a host name and fails.
            if let Some((_, zone)) = literal.split_once('%') {
                return Err(ConfigError::new(
                    "base_url",
                    format!(
                        "has host `{host}` with a zone id (`%{zone}`), which the HTTP clients \
                         refuse: name the address without it, or a host name"
                    ),
                ));
            }
            if literal.parse::<Ipv6Addr>().is_err() {
                return Err(ConfigError::new(
                    "base_url",
                    format!("has host `{host}`: not an IPv6 address"),
                ));
            }
        }
        // With no user info (refused above) the authority is the host, then `:port` if written.
        let port = match authority.as_str().strip_prefix(host) {
            Some("") => None,
            Some(rest) if rest.starts_with(':') => Some(&rest[1..]),
            _ => {
                return Err(ConfigError::new(
                    "base_url",
                    format!("has `{authority}` for a host and port"),
                ));
            }
        };
        // Digits only: `u16::from_str` also takes a sign (`+443`, which reqwest refuses).
        if let Some(port) = port
            && !port.is_empty()
            && !(port.bytes().all(|b| b.is_ascii_digit()) && matches!(port.parse::<u16>(), Ok(1..)))
        {
            return Err(ConfigError::new(
                "base_url",
                format!("has port `{port}`: must be from 1 to 65535"),
            ));
        }
        let https = scheme == Scheme::HTTPS;
        if !https && !is_loopback(authority.host()) {
            return Err(ConfigError::new(
                "base_url",
                "must be https:// (plain http:// only to a loopback host: 127.0.0.1, [::1] or \
                 localhost), or every request's credentials cross the network in cleartext",
            ));
        }
        // Trailing slashes are dropped; an empty segment inside (`https://proxy//kling`, a
        // proxy's path joined to a host ending in `/`) would be sent as written, a path that
        // servers merge or redirect (an error to a POST) and a proxy's routes miss.
        let path = uri.path().trim_end_matches('/');
        if path.contains("//") {
            return Err(ConfigError::new(
                "base_url",
                "has an empty path segment (`//`): write the path with single slashes",
            ));
        }
        let prefix = kling_core::intern::intern(path);
        let text = static_authority_text(&authority);
        let origin = Origin {
            https,
            host: kling_core::intern::intern(authority.host()),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        };
        // The same text parsed again, so it cannot fail; the parsed copy is the fallback anyway.
        let authority =
            Authority::from_maybe_shared(Bytes::from_static(text.as_bytes())).unwrap_or(authority);
        Ok(BaseUrlLayer {
            base: Base {
                scheme,
                authority,
                origin,
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

/// Resolves relative request URIs against a base URL and refuses requests to another origin.
/// See the [module docs](self).
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
    /// Resolves a relative URI in place and says `true`; an absolute one is left alone, `true`
    /// when it names the base's origin and `false` when it names another (the call refuses
    /// it). A splice of the base's parsed scheme and authority with the request's own path and
    /// query: nothing is parsed again unless the base has a path.
    #[inline]
    fn resolves(&self, uri: &mut Uri) -> bool {
        if uri.scheme().is_some() || uri.authority().is_some() {
            return self.origin.same_as(uri);
        }
        let mut parts = std::mem::take(uri).into_parts();
        if !self.prefix.is_empty() {
            if !self.prefix_path(&mut parts) {
                // Left relative, as it came.
                *uri = Uri::from_parts(parts).unwrap_or_default();
                return true;
            }
        } else if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        // A scheme, an authority and a path make a valid URI; the fallback only keeps the type
        // checker happy.
        *uri = Uri::from_parts(parts).unwrap_or_default();
        true
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
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if !self.base.resolves(request.uri_mut()) {
            return ResponseFuture::refused(request.uri(), &self.base.origin);
        }
        ResponseFuture {
            state: State::Sent {
                future: self.inner.call(request),
            },
        }
    }
}

pin_project! {
    /// The [`BaseUrl`] response future: the inner service's, or a request to another origin
    /// refused ([`OtherOrigin`]).
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Sent { #[pin] future: F },
        Refused { error: Option<BoxError> },
    }
}

impl<F> ResponseFuture<F> {
    #[cold]
    #[inline(never)]
    fn refused(uri: &Uri, base: &Origin) -> Self {
        ResponseFuture {
            state: State::Refused {
                error: Some(Box::new(OtherOrigin::new(uri, base))),
            },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("refused", &matches!(self.state, State::Refused { .. }))
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sent { future } => future.poll(cx).map_err(Into::into),
            StateProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Base {
        /// [`Base::resolves`], with the refusal the call makes.
        fn resolve(&self, uri: &mut Uri) -> Result<(), OtherOrigin> {
            if self.resolves(uri) {
                Ok(())
            } else {
                Err(OtherOrigin::new(uri, &self.origin))
            }
        }
    }

    fn resolved(base: &str, uri: &str) -> Uri {
        let layer = BaseUrlLayer::new(base).unwrap();
        let mut uri: Uri = uri.parse().unwrap();
        layer.base.resolve(&mut uri).unwrap();
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
            "https://proxy.example:9/a/b/",
            "http://[::1]:9/a",
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
    fn absolute_uris_to_the_base_origin_are_left_alone() {
        for absolute in [
            "https://api-singapore.klingai.com/v1/x",
            "HTTPS://API-Singapore.KlingAI.com:443/?q=1",
        ] {
            assert_eq!(resolved(GLOBAL, absolute), absolute.parse::<Uri>().unwrap());
        }
        assert_eq!(
            resolved("http://127.0.0.1:80/kling", "http://127.0.0.1/v1/x"),
            "http://127.0.0.1/v1/x".parse::<Uri>().unwrap()
        );
    }

    #[test]
    fn absolute_uris_to_another_origin_are_refused() {
        let layer = BaseUrlLayer::new(GLOBAL).unwrap();
        for (absolute, origin) in [
            (
                "http://api-singapore.klingai.com/v1/x",
                "http://api-singapore.klingai.com:80",
            ),
            (
                "https://api-singapore.klingai.com:8443/",
                "https://api-singapore.klingai.com:8443",
            ),
            (
                "https://api-beijing.klingai.com/v1/x",
                "https://api-beijing.klingai.com:443",
            ),
            (
                "https://user:pw@cdn.example/a.mp4?sig=s",
                "https://cdn.example:443",
            ),
            (
                "api-singapore.klingai.com:443",
                "api-singapore.klingai.com:443",
            ),
        ] {
            let mut uri: Uri = absolute.parse().unwrap();
            let refused = layer.base.resolve(&mut uri).unwrap_err();
            assert_eq!(refused.origin(), origin, "{absolute}");
            assert_eq!(refused.base(), "https://api-singapore.klingai.com:443");
            assert_eq!(uri, absolute.parse::<Uri>().unwrap(), "left as it came");
            let text = refused.to_string();
            assert!(!text.contains("pw") && !text.contains("sig"), "{text}");
        }
    }

    #[test]
    fn plain_http_is_refused_except_to_loopback() {
        for base in [
            "http://127.0.0.1:9",
            "http://127.8.9.10",
            "http://[::1]:9/kling",
            "http://[::ffff:127.0.0.1]:9",
            "http://localhost:9",
            "http://LocalHost.",
        ] {
            let layer = BaseUrlLayer::new(base).unwrap_or_else(|e| panic!("{base}: {e}"));
            assert!(!layer.base.origin.https, "{base}");
        }
        for base in [
            "http://api-singapore.klingai.com",
            "http://10.0.0.1:8080",
            "http://0.0.0.0:9",
            "http://[::2]:9",
            "http://localhost.example",
            "http://127.0.0.1.example",
        ] {
            let refused = BaseUrlLayer::new(base).unwrap_err();
            assert_eq!(refused.field(), "base_url", "{base}");
            assert!(refused.reason().contains("https://"), "{refused}");
        }
    }

    /// The host an origin keeps is the one `http` reads from the authority; an authority with
    /// user info is refused, however it is written.
    #[test]
    fn the_host_is_read_as_http_reads_it() {
        for authority in [
            "api-singapore.klingai.com",
            "h:1",
            "[::1]",
            "[::1]:9",
            "127.0.0.1:8080",
        ] {
            let parsed: Authority = authority.parse().unwrap();
            let layer = BaseUrlLayer::new(&format!("https://{authority}")).unwrap();
            assert_eq!(layer.base.origin.host, parsed.host(), "{authority}");
        }
        for authority in [
            "user@h:1",
            "u:p@h",
            "u@[::1]:9",
            "@h",
            "http://user@127.0.0.1:9",
        ] {
            let base = if authority.contains("://") {
                authority.to_owned()
            } else {
                format!("https://{authority}")
            };
            let refused = BaseUrlLayer::new(&base).unwrap_err();
            assert!(refused.reason().contains("user info"), "{base}: {refused}");
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
            "http://127.0.0.1:9",
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
