//! Recognising Kling paths: which endpoint, which pool, which generation.
//!
//! Parsing is pure and happens before authentication so that the mock can count creates (for
//! `creates_after_1102`) even when it refuses them for another reason.

use http::Method;

/// The legacy video endpoints (`/v1/videos/{kind}`).
pub(crate) const LEGACY_VIDEO_KINDS: &[&str] = &[
    "text2video",
    "image2video",
    "multi-image2video",
    "video-extend",
    "lip-sync",
    "effects",
];

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
        id: String,
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
}

impl Route {
    pub(crate) fn is_create(&self) -> bool {
        matches!(self, Route::LegacyCreate { .. } | Route::NewCreate { .. })
    }
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%'))
}

/// Recognises a path; `None` means 404 code 1202 (wrong method or path).
pub(crate) fn parse(method: &Method, path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    match segments.as_slice() {
        ["v1", group @ ("videos" | "images"), kind, rest @ ..] => {
            let family = if *group == "videos" {
                if !LEGACY_VIDEO_KINDS.contains(kind) {
                    return None;
                }
                LegacyFamily::Video
            } else if *kind == TRY_ON {
                LegacyFamily::TryOn
            } else if segment_ok(kind) {
                LegacyFamily::Image
            } else {
                return None;
            };
            let endpoint = format!("/v1/{group}/{kind}");
            match rest {
                [] if post => Some(Route::LegacyCreate {
                    endpoint,
                    kind: (*kind).to_owned(),
                    family,
                }),
                [] if get => Some(Route::LegacyList { endpoint }),
                [id] if get && segment_ok(id) => Some(Route::LegacyQuery {
                    endpoint,
                    id: percent_decode(id),
                }),
                _ => None,
            }
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
            Some(Route::NewCreate {
                product: (*product).to_owned(),
                model: percent_decode(model),
            })
        }
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
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
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
}
