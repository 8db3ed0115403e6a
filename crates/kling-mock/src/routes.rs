//! Recognising Kling paths: which endpoint, which pool, which generation.
//!
//! Parsing is pure and happens before authentication so that the mock can count creates (for
//! `creates_after_1102`) even when it refuses them for another reason.

use http::Method;

use crate::handlers::MAX_STRING_BYTES;

/// The legacy video endpoints (`/v1/videos/{kind}`).
pub(crate) const LEGACY_VIDEO_KINDS: &[&str] = &[
    "text2video",
    "image2video",
    "multi-image2video",
    "video-extend",
    "lip-sync",
    "advanced-lip-sync",
    "motion-control",
    "multi-elements",
    "effects",
];

/// Legacy endpoints one segment deeper, in a group (`/v1/{product}/{group}/{endpoint}`):
/// image expansion and the avatar. Their creates, lists and queries work as the others'.
pub(crate) const LEGACY_GROUPED: &[(&str, &str, &str)] = &[
    ("images", "editing", "expand"),
    ("videos", "avatar", "image2video"),
];

/// Legacy video endpoints that answer at once with a result and make no task (the faces of a
/// video, for advanced lip-sync; what an image shows): no slot, no task to query.
pub(crate) const ANSWERED_AT_ONCE: &[&str] = &["identify-face", "image-recognize"];

/// The legacy image endpoints besides the try-on (`/v1/images/{kind}`): KLING_API.md's
/// `generations`, and the multi-image and omni image endpoints of Kling's API pages. Any other
/// segment is 404 code 1202, so a typo (`generation`) is refused rather than billed.
pub(crate) const LEGACY_IMAGE_KINDS: &[&str] = &["generations", "multi-image2image", "omni-image"];

/// New-style video products (`/{product}/{model}`, pool `video:{model}`).
pub(crate) const NEW_VIDEO_PRODUCTS: &[&str] = &[
    "text-to-video",
    "image-to-video",
    "omni-video",
    "motion-control",
];

/// New-style image products (`/{product}/{model}`, pool `image:{model}`).
pub(crate) const NEW_IMAGE_PRODUCTS: &[&str] = &["text-to-image", "image-to-image"];

/// The legacy try-on endpoint's last segment.
pub(crate) const TRY_ON: &str = "kolors-virtual-try-on";

/// Which pool family a legacy endpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LegacyFamily {
    Video,
    Image,
    TryOn,
}

/// A recognised request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    LegacyCreate {
        endpoint: String,
        kind: String,
        family: LegacyFamily,
    },
    LegacyQuery {
        endpoint: String,
        /// The decoded `task_id` or `external_task_id`; `None` when the decoded bytes are not
        /// UTF-8 (no task can have such an id: 1203, never a lossy match).
        id: Option<String>,
    },
    LegacyList {
        endpoint: String,
    },
    NewCreate {
        product: String,
        model: String,
    },
    NewBatchQuery,
    NewList,
    AccountCosts,
    /// A POST to an endpoint of [`ANSWERED_AT_ONCE`] (its last segment).
    AnsweredAtOnce {
        kind: String,
    },
}

impl Route {
    pub(crate) fn is_create(&self) -> bool {
        matches!(self, Route::LegacyCreate { .. } | Route::NewCreate { .. })
    }

    /// A new-style endpoint (`/{product}/{model}`, `/tasks`), which takes only an API key.
    pub(crate) fn is_new_style(&self) -> bool {
        matches!(
            self,
            Route::NewCreate { .. } | Route::NewBatchQuery | Route::NewList
        )
    }
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%'))
}

/// A legacy query's last segment, decoded: any non-empty run of RFC 3986 `pchar`s (unreserved,
/// `%XX`, sub-delims, `:`, `@`; `+` is a plus) whose decoded bytes fit the longest
/// `external_task_id` a create accepts. `None`: not such a segment (404 code 1202).
fn id_segment(s: &str) -> Option<Vec<u8>> {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (hi, lo) = (hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?);
                out.push(hi << 4 | lo);
                i += 3;
            }
            b if b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                ) =>
            {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
        if out.len() > MAX_STRING_BYTES {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Recognises a path; `None` means 404 code 1202 (wrong method or path).
pub(crate) fn parse(method: &Method, path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    match segments.as_slice() {
        ["v1", "videos", kind] if post && ANSWERED_AT_ONCE.contains(kind) => {
            Some(Route::AnsweredAtOnce {
                kind: (*kind).to_owned(),
            })
        }
        ["v1", group @ ("videos" | "images"), parent, kind, rest @ ..]
            if LEGACY_GROUPED.contains(&(*group, *parent, *kind)) =>
        {
            let family = if *group == "videos" {
                LegacyFamily::Video
            } else {
                LegacyFamily::Image
            };
            legacy(
                format!("/v1/{group}/{parent}/{kind}"),
                kind,
                family,
                rest,
                method,
            )
        }
        ["v1", group @ ("videos" | "images"), kind, rest @ ..] => {
            let family = if *group == "videos" {
                if !LEGACY_VIDEO_KINDS.contains(kind) {
                    return None;
                }
                LegacyFamily::Video
            } else if *kind == TRY_ON {
                LegacyFamily::TryOn
            } else if LEGACY_IMAGE_KINDS.contains(kind) {
                LegacyFamily::Image
            } else {
                return None;
            };
            legacy(format!("/v1/{group}/{kind}"), kind, family, rest, method)
        }
        ["tasks"] if get => Some(Route::NewBatchQuery),
        ["tasks"] if post => Some(Route::NewList),
        ["account", "costs"] if get => Some(Route::AccountCosts),
        [product, model]
            if post
                && (NEW_VIDEO_PRODUCTS.contains(product)
                    || NEW_IMAGE_PRODUCTS.contains(product))
                && segment_ok(model) =>
        {
            let model = percent_decode(model);
            model_ok(&model).then(|| Route::NewCreate {
                product: (*product).to_owned(),
                model,
            })
        }
        _ => None,
    }
}

/// Whether a new-style create's decoded model can name one: not a dot segment (`.`, `..`, or
/// escaped as `%2E`), which a server normalizing its paths removes before routing, and no
/// `/` (`%2F`), which one decoding it routes as a separator. Either way Kling has no model
/// there (404), and clients (kling-core's router) read no create, nor a new-style endpoint
/// that takes only an API key, there.
fn model_ok(model: &str) -> bool {
    !matches!(model, "." | "..") && !model.contains('/')
}

/// A legacy endpoint's create, list or query, by what follows the endpoint (`rest`).
fn legacy(
    endpoint: String,
    kind: &str,
    family: LegacyFamily,
    rest: &[&str],
    method: &Method,
) -> Option<Route> {
    match rest {
        [] if method == Method::POST => Some(Route::LegacyCreate {
            endpoint,
            kind: kind.to_owned(),
            family,
        }),
        [] if method == Method::GET => Some(Route::LegacyList { endpoint }),
        [id] if method == Method::GET => id_segment(id).map(|id| Route::LegacyQuery {
            endpoint,
            id: String::from_utf8(id).ok(),
        }),
        _ => None,
    }
}

/// Decodes `%XX` escapes and `+` (query strings); invalid escapes are kept as they are.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                // Exactly two hex digits: `u8::from_str_radix` would also take `+1` (a sign).
                let hex = |j: usize| bytes.get(j).and_then(|&b| char::from(b).to_digit(16));
                if let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) {
                    out.push((hi << 4 | lo) as u8);
                    i += 3;
                } else {
                    out.push(b'%');
                    i += 1;
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded `key=value` pairs of a query string.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mock keeps its own list of endpoints that answer at once (it is the server), and
    /// kling-core's router its own (`Route::answers_at_once`, which keeps clients from holding
    /// a slot for them): every path the mock answers at once is one the router flags, and every
    /// path the mock knows (each endpoint name under each group and parent, one segment longer,
    /// new-style, and Kling's own names below) that the router flags is one the mock answers
    /// at once, so the two cannot drift unnoticed. kling-core exposes no list, so a name the
    /// router learns is probed only once it is among these.
    #[test]
    fn endpoints_answered_at_once_are_the_ones_the_router_flags() {
        let router =
            |method: &Method, path: &str| kling_core::Route::of(method, path).answers_at_once;
        assert!(!ANSWERED_AT_ONCE.is_empty());
        for kind in ANSWERED_AT_ONCE {
            let path = format!("/v1/videos/{kind}");
            assert!(
                matches!(
                    parse(&Method::POST, &path),
                    Some(Route::AnsweredAtOnce { .. })
                ),
                "{path}"
            );
            assert!(
                router(&Method::POST, &path),
                "the router does not flag {path}"
            );
        }
        let names: Vec<&str> = LEGACY_VIDEO_KINDS
            .iter()
            .chain(LEGACY_IMAGE_KINDS)
            .chain(ANSWERED_AT_ONCE)
            .chain(NEW_VIDEO_PRODUCTS)
            .chain(NEW_IMAGE_PRODUCTS)
            .chain(LEGACY_GROUPED.iter().map(|(_, _, kind)| kind))
            .chain([&TRY_ON, &"tasks"])
            // Kling's endpoints that answer at once, as its API pages name them: probed even
            // when the mock's list above leaves one out.
            .chain(&["identify-face", "image-recognize"])
            .copied()
            .collect();
        let mut paths = Vec::new();
        for name in &names {
            for group in ["videos", "images"] {
                paths.push(format!("/v1/{group}/{name}"));
                paths.push(format!("/v1/{group}/{name}/x"));
                for (_, parent, _) in LEGACY_GROUPED {
                    paths.push(format!("/v1/{group}/{parent}/{name}"));
                }
            }
            paths.push(format!("/{name}/kling-3.0"));
            for product in NEW_VIDEO_PRODUCTS.iter().chain(NEW_IMAGE_PRODUCTS) {
                paths.push(format!("/{product}/{name}"));
            }
        }
        paths.sort();
        paths.dedup();
        let mut flagged = 0;
        for path in &paths {
            let answered = matches!(
                parse(&Method::POST, path),
                Some(Route::AnsweredAtOnce { .. })
            );
            flagged += usize::from(answered);
            // The router flags the path whatever the method; the mock answers it to a POST.
            for method in [Method::POST, Method::GET] {
                assert_eq!(router(&method, path), answered, "{method} {path}");
            }
        }
        assert_eq!(flagged, ANSWERED_AT_ONCE.len());
    }

    /// The mock refuses a JWT on the requests it routes as new-style (they take only an API
    /// key); a client that signs JWTs refuses, before sending, those kling-core's router reads
    /// as a new-style create, query or list. Every request the mock takes as new-style must be
    /// one the router does, or a JWT client sends what the mock refuses with 401 1000 on a
    /// path the client thinks no endpoint: dot segments and `%2F`s in a model, which a server
    /// normalizes or splits before routing, are none. (The router reads more as new-style
    /// than the mock routes, `;` parameters and proxy prefixes: the mock answers those 404.)
    #[test]
    fn what_the_mock_takes_as_new_style_the_router_does() {
        let models = [
            "kling-3.0",
            "%6Bling-3.0",
            "kling_v2~x",
            "a%",
            "%zz",
            "kling%253.0",
            ".",
            "..",
            "%2E",
            "%2e%2E",
            ".%2E",
            "kling%2F3.0",
            "kling%2f3.0",
            "%2F",
            "..%2F",
        ];
        let mut paths: Vec<String> = vec!["/tasks".into(), "/tasks/".into(), "/%74asks".into()];
        for product in NEW_VIDEO_PRODUCTS.iter().chain(NEW_IMAGE_PRODUCTS) {
            for model in models {
                paths.push(format!("/{product}/{model}"));
            }
        }
        let mut new_style = 0;
        for path in &paths {
            for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
                if !parse(&method, path).is_some_and(|route| route.is_new_style()) {
                    continue;
                }
                new_style += 1;
                let route = kling_core::Route::of(&method, path);
                assert_eq!(
                    route.generation,
                    Some(kling_core::ApiGeneration::New),
                    "{method} {path}"
                );
                assert!(
                    matches!(
                        route.kind,
                        kling_core::RequestKind::Create
                            | kling_core::RequestKind::Query
                            | kling_core::RequestKind::List
                    ),
                    "{method} {path}: {:?}",
                    route.kind
                );
            }
        }
        // `GET` and `POST /tasks`, and the first six models of each product.
        let products = NEW_VIDEO_PRODUCTS.len() + NEW_IMAGE_PRODUCTS.len();
        assert_eq!(new_style, 2 + 6 * products);
    }

    #[test]
    fn legacy_and_new_paths_are_recognised() {
        assert!(matches!(
            parse(&Method::POST, "/v1/videos/text2video"),
            Some(Route::LegacyCreate {
                family: LegacyFamily::Video,
                ..
            })
        ));
        assert!(matches!(
            parse(&Method::GET, "/v1/images/generations/abc"),
            Some(Route::LegacyQuery { .. })
        ));
        assert!(matches!(
            parse(&Method::POST, "/v1/images/kolors-virtual-try-on"),
            Some(Route::LegacyCreate {
                family: LegacyFamily::TryOn,
                ..
            })
        ));
        assert!(matches!(
            parse(&Method::POST, "/text-to-video/kling-3.0"),
            Some(Route::NewCreate { .. })
        ));
        assert_eq!(parse(&Method::GET, "/text-to-video/kling-3.0"), None);
        assert_eq!(parse(&Method::POST, "/v1/videos/nope"), None);
        assert_eq!(parse(&Method::POST, "/v1/images/generation"), None);
        assert_eq!(parse(&Method::GET, "/v1/images/generation/abc"), None);
        assert!(matches!(
            parse(&Method::GET, "/v1/images/editing/expand/abc"),
            Some(Route::LegacyQuery { endpoint, .. }) if endpoint == "/v1/images/editing/expand"
        ));
        assert!(matches!(
            parse(&Method::POST, "/v1/videos/identify-face"),
            Some(Route::AnsweredAtOnce { .. })
        ));
        assert_eq!(parse(&Method::GET, "/v1/videos/identify-face"), None);
        assert_eq!(parse(&Method::DELETE, "/tasks"), None);
        assert_eq!(parse(&Method::GET, ""), None);
        assert_eq!(parse(&Method::GET, "//"), None);
    }

    #[test]
    fn percent_decoding_never_panics() {
        assert_eq!(percent_decode("a%2Cb"), "a,b");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%e2%82"), "\u{fffd}");
    }

    #[test]
    fn percent_escapes_take_exactly_two_hex_digits() {
        // A sign is not a hex digit: `%+1` stays as it is (its `+` a space, as in a query).
        assert_eq!(percent_decode("%+1"), "% 1");
        assert_eq!(percent_decode("%-1"), "%-1");
        assert_eq!(percent_decode("a%+f"), "a% f");
        // At the end of the string: a complete escape decodes, a cut one is kept.
        assert_eq!(percent_decode("a%41"), "aA");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("%%41"), "%A");
        assert_eq!(
            query_pairs(Some("task_ids=%+1")),
            [("task_ids".to_owned(), "% 1".to_owned())]
        );
    }
}
