//! A request's kind and pool, as the layer labels a call with them.
//!
//! [`Recognized::of`](kling_core::Recognized::of) also reads a create's body, and caches the
//! result in the request at the price of a few allocations; the layer only needs the kind and
//! the pool, which the path decides. So it reuses a recognition an outer layer or the caller
//! already cached, and otherwise reads the path with [`Route`], kling-core's path rules, which
//! borrows from the path and never allocates (the layers below recognise the request when they
//! need more).

use std::borrow::Cow;
use std::cell::RefCell;

use http::{Method, Request};
use kling_core::{Pool, Product, Recognized, RequestKind, Route};

/// The pool of a recognised request, borrowed from its path or its cached recognition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PoolRef<'a> {
    /// Draws from no pool (not a create).
    None,
    /// A product's pool shared by all models (legacy paths).
    Product(Product),
    /// One model version's pool (new-style paths), named as the server reads it: borrowed
    /// from the path, or decoded from one that escapes a character of the name
    /// (`kling%2D3.0` is `kling-3.0`, see [`from_path`]).
    Model(Product, Cow<'a, str>),
}

impl<'a> PoolRef<'a> {
    fn of(pool: Option<&'a Pool>) -> PoolRef<'a> {
        match pool {
            None => PoolRef::None,
            Some(pool) => match pool.model() {
                None => PoolRef::Product(pool.product()),
                Some(model) => PoolRef::Model(pool.product(), Cow::Borrowed(model)),
            },
        }
    }
}

/// The pool's own name (`video:kling-3.0`), for a span: a label may stand for many
/// ([`kling_core::metrics::pool_label`]).
impl std::fmt::Display for PoolRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolRef::None => Ok(()),
            PoolRef::Product(product) => f.write_str(product.as_str()),
            PoolRef::Model(product, model) => write!(f, "{}:{model}", product.as_str()),
        }
    }
}

/// The kind and pool of a request: its cached recognition when there is one, else its path.
pub(crate) fn of<B>(request: &Request<B>) -> (RequestKind, PoolRef<'_>) {
    // No extension, no cached recognition: skip the two lookups.
    if request.extensions().is_empty() {
        return from_path(request.method(), request.uri().path());
    }
    match Recognized::cached(request) {
        Some(recognized) => (recognized.kind, PoolRef::of(recognized.pool.as_ref())),
        None => from_path(request.method(), request.uri().path()),
    }
}

/// The longest path [`kind_of_post`] remembers.
const REMEMBERED_PATH: usize = 64;

thread_local! {
    /// The last POST path this thread routed, and its kind: creates repeat their path.
    static LAST_POST: RefCell<Option<([u8; REMEMBERED_PATH], usize, RequestKind)>> =
        const { RefCell::new(None) };
}

/// The kind of a POST request (whether it is a create): its cached recognition, else this
/// thread's last POST path when it is the same text (a comparison instead of the path rules),
/// else its path.
pub(crate) fn kind_of_post<B>(request: &Request<B>) -> RequestKind {
    if !request.extensions().is_empty()
        && let Some(recognized) = Recognized::cached(request)
    {
        return recognized.kind;
    }
    let path = request.uri().path();
    let bytes = path.as_bytes();
    LAST_POST.with_borrow_mut(|last| {
        if let Some((text, len, kind)) = last
            && text[..*len] == *bytes
        {
            return *kind;
        }
        let kind = Route::of(&Method::POST, path).kind;
        if bytes.len() <= REMEMBERED_PATH {
            let mut text = [0; REMEMBERED_PATH];
            text[..bytes.len()].copy_from_slice(bytes);
            *last = Some((text, bytes.len(), kind));
        }
        kind
    })
}

/// The kind and pool [`Route`] finds for `method` and `path`. A model name written with
/// escapes (`/text-to-video/kling%2D3.0`) is decoded as [`Route::pool`] decodes it, as the
/// server reads it and as a cached [`Recognized`] and the task slots name the pool: one model
/// is one label however its path was written.
pub(crate) fn from_path<'a>(method: &Method, path: &'a str) -> (RequestKind, PoolRef<'a>) {
    let route = Route::of(method, path);
    let pool = match (route.product, route.model) {
        (None, _) => PoolRef::None,
        (Some(product), None) => PoolRef::Product(product),
        (Some(product), Some(model)) if !model.as_bytes().contains(&b'%') => {
            PoolRef::Model(product, Cow::Borrowed(model))
        }
        (Some(product), Some(_)) => decoded_model(&route, product),
    };
    (route.kind, pool)
}

/// The pool of a route whose model is written with escapes, its name decoded by
/// [`Route::pool`]. Out of line: only such a path comes here (and allocates).
#[cold]
#[inline(never)]
fn decoded_model<'a>(route: &Route<'_>, product: Product) -> PoolRef<'a> {
    match route.pool().as_ref().and_then(Pool::model) {
        Some(model) => PoolRef::Model(product, Cow::Owned(model.to_owned())),
        None => PoolRef::Product(product),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words the path rules look at, and filler (kling-core checks the rules themselves); a
    /// model written with escapes, as a server decodes it (`kling%2D3.0` is `kling-3.0`).
    const WORDS: [&str; 13] = [
        "v1",
        "videos",
        "images",
        "kolors-virtual-try-on",
        "text2video",
        "tasks",
        "account",
        "costs",
        "text-to-video",
        "virtual-try-on",
        "kling-3.0",
        "kling%2D3%2e0",
        "x",
    ];

    fn agrees(method: &Method, path: &str) {
        let uri: http::Uri = path.parse().unwrap();
        let slow = Recognized::from_parts(method, &uri, b"");
        let fast = from_path(method, uri.path());
        assert_eq!(
            fast,
            (slow.kind, PoolRef::of(slow.pool.as_ref())),
            "{method} {path}"
        );
    }

    #[test]
    fn the_label_is_the_recognised_kind_and_pool_for_every_path_of_up_to_three_words() {
        let mut checked = 0;
        let mut paths = vec![String::new()];
        for _ in 0..3 {
            paths = paths
                .iter()
                .flat_map(|path| WORDS.iter().map(move |word| format!("{path}/{word}")))
                .collect();
            for path in &paths {
                for method in [Method::GET, Method::POST, Method::DELETE] {
                    agrees(&method, path);
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 3 * (13 + 169 + 2197));
    }

    /// The remembered POST path gives the kind the path rules give, over runs of paths that
    /// repeat, share prefixes, or are too long to remember.
    #[test]
    fn the_kind_of_a_post_is_its_routes_whatever_came_before() {
        let long = format!("/v1/videos/{}", "x".repeat(REMEMBERED_PATH));
        let paths = [
            "/v1/videos/text2video",
            "/v1/videos/text2video",
            "/v1/videos/text2vide",
            "/v1/videos/text2video/",
            "/v1/videos/text2video/abc",
            "/tasks",
            "/text-to-video/kling-3.0",
            "/text-to-video/kling-3.0",
            "/v1/images/generations",
            long.as_str(),
            long.as_str(),
            "/v1/videos",
            "",
            "/",
        ];
        for round in 0..3 {
            // In order, then by steps of 3 and 5 (coprime with the 14 paths).
            for n in 0..paths.len() {
                let path = paths[(n * (2 * round + 1)) % paths.len()];
                let uri = if path.is_empty() { "/" } else { path };
                let request = Request::post(uri).body(()).unwrap();
                assert_eq!(
                    kind_of_post(&request),
                    Route::of(&Method::POST, request.uri().path()).kind,
                    "{path}"
                );
            }
        }
        // A cached recognition wins, as in `of`.
        let mut request = Request::post("/v1/videos/text2video").body(()).unwrap();
        let mut recognized = Recognized::from_parts(&Method::POST, request.uri(), b"");
        recognized.kind = RequestKind::Other;
        request.extensions_mut().insert(recognized);
        assert_eq!(kind_of_post(&request), RequestKind::Other);
    }

    #[test]
    fn the_documented_paths_are_recognised() {
        let cases: [(Method, &str, RequestKind, PoolRef<'_>); 11] = [
            (
                Method::POST,
                "/v1/videos/text2video",
                RequestKind::Create,
                PoolRef::Product(Product::Video),
            ),
            (
                Method::POST,
                "/v1/images/kolors-virtual-try-on",
                RequestKind::Create,
                PoolRef::Product(Product::TryOn),
            ),
            (
                Method::POST,
                "/v1/images/generations",
                RequestKind::Create,
                PoolRef::Product(Product::Image),
            ),
            (
                Method::GET,
                "/v1/videos/text2video/abc",
                RequestKind::Query,
                PoolRef::None,
            ),
            (
                Method::GET,
                "/v1/videos/text2video",
                RequestKind::List,
                PoolRef::None,
            ),
            (
                Method::POST,
                "/text-to-video/kling-3.0",
                RequestKind::Create,
                PoolRef::Model(Product::Video, "kling-3.0".into()),
            ),
            (
                Method::POST,
                "/virtual-try-on/kolors-v1.5",
                RequestKind::Create,
                PoolRef::Model(Product::TryOn, "kolors-v1.5".into()),
            ),
            (Method::GET, "/tasks", RequestKind::Query, PoolRef::None),
            (Method::POST, "/tasks/", RequestKind::List, PoolRef::None),
            (
                Method::GET,
                "/account/costs",
                RequestKind::Account,
                PoolRef::None,
            ),
            (Method::GET, "/", RequestKind::Other, PoolRef::None),
        ];
        for (method, path, kind, pool) in cases {
            assert_eq!(from_path(&method, path), (kind, pool), "{method} {path}");
            agrees(&method, path);
        }
    }

    /// A model named with escapes of unreserved characters is the model a server reads (and
    /// the task slots label): decoded, whichever characters are escaped and in either case of
    /// hex; an escape of any other character stays as written, as kling-core keeps it.
    #[test]
    fn an_escaped_model_is_the_model_the_server_reads() {
        for path in [
            "/text-to-video/kling%2D3.0",
            "/text-to-video/kling-3%2e0",
            "/text-to-video/%6B%6c%69%6E%67%2D%33%2E%30",
            "/v1/../text-to-video/kling%2d3.0/",
        ] {
            assert_eq!(
                from_path(&Method::POST, path),
                (
                    RequestKind::Create,
                    PoolRef::Model(Product::Video, "kling-3.0".into())
                ),
                "{path}"
            );
            agrees(&Method::POST, path);
        }
        assert_eq!(
            from_path(&Method::POST, "/image-to-video/kling%3A3").1,
            PoolRef::Model(Product::Video, "kling%3A3".into())
        );
        agrees(&Method::POST, "/image-to-video/kling%3A3");
        let escaped = Request::post("/text-to-video/kling%2D3.0")
            .body(())
            .unwrap();
        assert_eq!(
            of(&escaped).1.to_string(),
            "video:kling-3.0",
            "the span's pool"
        );
    }

    #[test]
    fn a_cached_recognition_wins_over_the_path() {
        let mut request = Request::post("/v1/videos/text2video").body(()).unwrap();
        assert_eq!(
            of(&request),
            (RequestKind::Create, PoolRef::Product(Product::Video))
        );
        // Another extension, no recognition: still the path.
        kling_core::signals::Attempt::set(&mut request, 2);
        assert_eq!(
            of(&request),
            (RequestKind::Create, PoolRef::Product(Product::Video))
        );
        let mut recognized =
            Recognized::from_parts(&Method::POST, &"/omni-video/kling-o1".parse().unwrap(), b"");
        assert_eq!(recognized.kind, RequestKind::Create);
        recognized.kind = RequestKind::Other;
        request.extensions_mut().insert(recognized);
        assert_eq!(
            of(&request),
            (
                RequestKind::Other,
                PoolRef::Model(Product::Video, "kling-o1".into())
            )
        );
    }
}
