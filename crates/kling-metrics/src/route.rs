//! A request's kind and pool from its method and path alone: what the layer labels a call with.
//!
//! [`Recognized::of`](kling_core::Recognized::of) also reads a create's body, and caches the
//! result in the request at the price of a few allocations; the layer only needs the kind and
//! the pool, which the path decides. So it reuses a recognition an outer layer or the caller
//! already cached, and otherwise reads the path here, without allocating (the layers below
//! recognise the request when they need more). The rules are those of
//! `Recognized::from_parts`; a test checks both agree on every path built from the words the
//! rules look at.

use http::{Method, Request};
use kling_core::{Pool, Product, Recognized, RequestKind};

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

/// A segment of a path, as byte offsets (from, to).
type Range = (usize, usize);

/// The kind and pool `Recognized::from_parts` finds for `method` and `path`.
pub(crate) fn from_path<'a>(method: &Method, path: &'a str) -> (RequestKind, PoolRef<'a>) {
    // `/` is ASCII, so trimming bytes keeps `path` on a character boundary.
    let mut trimmed = path.len();
    while trimmed > 0 && path.as_bytes()[trimmed - 1] == b'/' {
        trimmed -= 1;
    }
    let path = &path[..trimmed];
    if path.ends_with("/account/costs") || path == "account/costs" {
        return (RequestKind::Account, PoolRef::None);
    }
    // The non-empty segments, as byte ranges (on the stack, unless the path has more than
    // `ON_STACK` of them), and which is the last `v1`.
    let bytes = path.as_bytes();
    let mut on_stack = [(0, 0); ON_STACK];
    let mut count = 0;
    let mut v1 = None;
    each_segment(bytes, |(from, to)| {
        if to - from == 2 && bytes[from..to] == *b"v1" {
            v1 = Some(count);
        }
        if count < ON_STACK {
            on_stack[count] = (from, to);
        }
        count += 1;
    });
    let spilled: Vec<Range>;
    let segments: &[Range] = if count <= ON_STACK {
        &on_stack[..count]
    } else {
        spilled = {
            let mut all = Vec::with_capacity(count);
            each_segment(bytes, |segment| all.push(segment));
            all
        };
        &spilled
    };
    // Compared as bytes: slicing the `str` would check character boundaries each time.
    let raw = |(from, to): Range| &bytes[from..to];
    let text = |(from, to): Range| &path[from..to];

    // Legacy: .../v1/{videos|images}/{endpoint}[/{id}]
    if let Some(v1) = v1 {
        let rest = &segments[v1 + 1..];
        let product = match rest {
            [first, ..] if raw(*first) == b"videos" => Some(Product::Video),
            [first, second, ..]
                if raw(*first) == b"images" && raw(*second) == b"kolors-virtual-try-on" =>
            {
                Some(Product::TryOn)
            }
            [first, ..] if raw(*first) == b"images" => Some(Product::Image),
            _ => None,
        };
        if let Some(product) = product {
            let kind = match (rest.len(), method) {
                (2, &Method::POST) => return (RequestKind::Create, PoolRef::Product(product)),
                (2, &Method::GET) => RequestKind::List,
                (3, &Method::GET) => RequestKind::Query,
                _ => RequestKind::Other,
            };
            return (kind, PoolRef::None);
        }
    }

    // New: /tasks (batch query or list) and /{product}/{model} (create).
    match segments {
        [.., last] if raw(*last) == b"tasks" => {
            let kind = if method == Method::GET {
                RequestKind::Query
            } else if method == Method::POST {
                RequestKind::List
            } else {
                RequestKind::Other
            };
            (kind, PoolRef::None)
        }
        [.., product, model] if method == Method::POST => match new_style_product(text(*product)) {
            Some(product) => (RequestKind::Create, PoolRef::Model(product, text(*model))),
            None => (RequestKind::Other, PoolRef::None),
        },
        _ => (RequestKind::Other, PoolRef::None),
    }
}

/// Segments kept on the stack; Kling paths have two to four.
const ON_STACK: usize = 8;

/// Calls `segment` with the byte range of each non-empty `/`-separated segment, in order,
/// finding the `/`s eight bytes at a time (a byte loop or `split` costs several times more on
/// paths this short).
fn each_segment(bytes: &[u8], mut segment: impl FnMut(Range)) {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const SLASHES: u64 = 0x2f2f_2f2f_2f2f_2f2f;
    let mut start = 0;
    // `word` holds `bytes[base..]` little-endian (byte `base + i` in bits `8 * i..`).
    let mut scan = |word: u64, base: usize| {
        let x = word ^ SLASHES;
        // The high bit of exactly the zero bytes of `x`, i.e. the `/`s (no carry crosses a
        // byte).
        let mut found = !(((x & LOW7) + LOW7) | x | LOW7);
        while found != 0 {
            let at = base + found.trailing_zeros() as usize / 8;
            found &= found - 1;
            if at > start {
                segment((start, at));
            }
            start = at + 1;
        }
    };
    let mut chunks = bytes.chunks_exact(8);
    let mut base = 0;
    for chunk in &mut chunks {
        scan(u64::from_le_bytes(chunk.try_into().expect("8 bytes")), base);
        base += 8;
    }
    let rest = chunks.remainder().len();
    if rest > 0 {
        // The eight bytes that end the string, shifted so that the ones already seen drop out
        // and zeros (no `/`) come in; a string shorter than a word is read bytewise.
        let word = match bytes.last_chunk::<8>() {
            Some(last) => u64::from_le_bytes(*last) >> (8 * (8 - rest)),
            None => bytes
                .iter()
                .rev()
                .fold(0, |word, &byte| (word << 8) | u64::from(byte)),
        };
        scan(word, base);
    }
    if bytes.len() > start {
        segment((start, bytes.len()));
    }
}

/// The product of a new-style create path's first segment (kling-core's rule).
fn new_style_product(segment: &str) -> Option<Product> {
    match segment {
        "text-to-video" | "image-to-video" | "omni-video" | "motion-control" => {
            Some(Product::Video)
        }
        "text-to-image" | "image-to-image" => Some(Product::Image),
        s if s.contains("try-on") => Some(Product::TryOn),
        s if s.ends_with("-video") => Some(Product::Video),
        s if s.ends_with("-image") => Some(Product::Image),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every word a rule of `Recognized::from_parts` looks at, a near miss of each, and filler.
    const WORDS: [&str; 20] = [
        "v1",
        "videos",
        "images",
        "kolors-virtual-try-on",
        "text2video",
        "tasks",
        "account",
        "costs",
        "text-to-video",
        "motion-control",
        "text-to-image",
        "my-video",
        "an-image",
        "virtual-try-on",
        "kling-3.0",
        "V1",
        "task",
        "myaccount",
        "123",
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
    fn every_path_of_up_to_four_words_is_recognised_as_kling_core_does() {
        let methods = [Method::GET, Method::POST, Method::DELETE];
        let mut checked = 0;
        let mut words: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..4 {
            let longer: Vec<Vec<&str>> = words
                .iter()
                .filter(|w| w.len() == words.last().map_or(0, Vec::len))
                .flat_map(|w| {
                    WORDS.iter().map(move |word| {
                        let mut w = w.clone();
                        w.push(*word);
                        w
                    })
                })
                .collect();
            words.extend(longer);
        }
        for path in &words {
            let joined = path.join("/");
            for variant in [
                format!("/{joined}"),
                format!("/{joined}/"),
                format!("/api//{joined}?task_ids=1,2"),
                format!("https://api.example.com/x/{joined}"),
            ] {
                for method in &methods {
                    agrees(method, &variant);
                    checked += 1;
                }
            }
        }
        assert!(checked > 1_000_000, "{checked}");
    }

    #[test]
    fn segments_are_found_in_every_short_string() {
        // Every string of up to 9 symbols over `/`, `a` and a two-byte character: every
        // length around the 8-byte words, every position of a `/`.
        let symbols = ["/", "a", "é"];
        let mut strings = vec![String::new()];
        let mut checked = 0;
        for _ in 0..9 {
            strings = strings
                .iter()
                .flat_map(|s| symbols.iter().map(move |c| format!("{s}{c}")))
                .collect();
            for s in &strings {
                let expected: Vec<&str> = s.split('/').filter(|s| !s.is_empty()).collect();
                let mut found = Vec::new();
                each_segment(s.as_bytes(), |(from, to)| found.push(&s[from..to]));
                assert_eq!(found, expected, "{s:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, (1..=9).map(|n| 3usize.pow(n)).sum::<usize>());
    }

    #[test]
    fn paths_of_more_segments_than_kept_on_the_stack_are_recognised() {
        let deep = format!("/{}", ["a"; ON_STACK].join("/"));
        for path in [
            format!("{deep}/v1/videos/text2video"),
            format!("{deep}/v1/videos/text2video/1"),
            format!("/v1/videos{deep}"),
            format!("{deep}/text-to-video/kling-3.0"),
            format!("{deep}/tasks"),
        ] {
            for method in [Method::GET, Method::POST] {
                agrees(&method, &path);
            }
        }
        assert_eq!(
            from_path(&Method::POST, &format!("{deep}/v1/videos/text2video")),
            (RequestKind::Create, PoolRef::Product(Product::Video))
        );
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
