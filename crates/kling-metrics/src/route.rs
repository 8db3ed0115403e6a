//! A request's kind and pool, as the layer labels a call with them.
//!
//! [`Recognized::of`](kling_core::Recognized::of) also reads a create's body, and caches the
//! result in the request at the price of a few allocations; the layer only needs the kind and
//! the pool, which the path decides. So it reuses a recognition an outer layer or the caller
//! already cached, and otherwise reads the path with [`Route`], kling-core's path rules, which
//! borrows from the path and never allocates (the layers below recognise the request when they
//! need more).

use std::cell::RefCell;

use http::{Method, Request};
use kling_core::{Pool, Product, Recognized, RequestKind, Route};

/// The pool of a recognised request, borrowed from its path or its cached recognition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PoolRef<'a> {
    /// Draws from no pool (not a create).
    None,
    /// A product's pool shared by all models (legacy paths).
    Product(Product),
    /// One model version's pool (new-style paths).
    Model(Product, &'a str),
}

impl<'a> PoolRef<'a> {
    fn of(pool: Option<&'a Pool>) -> PoolRef<'a> {
        match pool {
            None => PoolRef::None,
            Some(pool) => match pool.model() {
                None => PoolRef::Product(pool.product()),
                Some(model) => PoolRef::Model(pool.product(), model),
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

/// The kind and pool [`Route`] finds for `method` and `path`.
pub(crate) fn from_path<'a>(method: &Method, path: &'a str) -> (RequestKind, PoolRef<'a>) {
    let route = Route::of(method, path);
    let pool = match (route.product, route.model) {
        (None, _) => PoolRef::None,
        (Some(product), None) => PoolRef::Product(product),
        (Some(product), Some(model)) => PoolRef::Model(product, model),
    };
    (route.kind, pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words the path rules look at, and filler (kling-core checks the rules themselves).
    const WORDS: [&str; 12] = [
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
        assert_eq!(checked, 3 * (12 + 144 + 1728));
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
                PoolRef::Model(Product::Video, "kling-3.0"),
            ),
            (
                Method::POST,
                "/virtual-try-on/kolors-v1.5",
                RequestKind::Create,
                PoolRef::Model(Product::TryOn, "kolors-v1.5"),
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
                PoolRef::Model(Product::Video, "kling-o1")
            )
        );
    }
}
