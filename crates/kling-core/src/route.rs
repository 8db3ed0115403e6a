//! What a request's method and path alone say it is: the path rules of [`Recognized`], once.
//!
//! A path is read as a server that normalizes URIs reads it (escapes of unreserved characters
//! decoded, `.` and `..` segments removed), so that no create written another way escapes the
//! slots and the retry layer's guard; see [`Route::of`].
//!
//! [`Recognized`] adds what a create's body and a batch query's query string say, and owns
//! its strings; a layer that only needs the kind and the pool (a metrics label) reads a
//! [`Route`] instead, which borrows from the path and never allocates.
//!
//! [`Recognized`]: crate::Recognized

use std::borrow::Cow;

use http::Method;

use crate::request::{ApiGeneration, Pool, Product, RequestKind};

/// What a request's method and path say it is, borrowed from the path (no allocation).
///
/// [`Recognized::from_parts`](crate::Recognized::from_parts) starts from this.
///
/// ```
/// use http::Method;
/// use kling_core::{ApiGeneration, Product, RequestKind, Route};
///
/// let route = Route::of(&Method::POST, "/text-to-video/kling-3.0");
/// assert_eq!(route.kind, RequestKind::Create);
/// assert_eq!(route.generation, Some(ApiGeneration::New));
/// assert_eq!((route.product, route.model), (Some(Product::Video), Some("kling-3.0")));
///
/// let route = Route::of(&Method::GET, "/v1/videos/text2video/abc");
/// assert_eq!((route.kind, route.task_id), (RequestKind::Query, Some("abc")));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Route<'a> {
    /// The kind of request.
    pub kind: RequestKind,
    /// The API generation of the path, when known.
    pub generation: Option<ApiGeneration>,
    /// The product of the pool a create draws from (`None` for everything else).
    pub product: Option<Product>,
    /// The model version of a new-style create's pool (`kling-3.0`), as written in the path
    /// up to any `;` parameters (escapes kept: [`Route::pool`] decodes them).
    pub model: Option<&'a str>,
    /// The task id a legacy query names as its last segment, as written in the path up to any
    /// `;` parameters.
    pub task_id: Option<&'a str>,
    /// Whether the path names one of Kling's endpoints that answer at once with no task
    /// (`/v1/videos/identify-face`, `/v1/videos/image-recognize`), whatever the method, as
    /// [`Route::of`] reads the path: the one list of them, so that a layer that tells such a
    /// `POST` from an unknown one (a possible create) follows when this router learns another.
    /// A path with more segments after the endpoint names none.
    pub answers_at_once: bool,
}

impl Route<'_> {
    /// Whether `path` is written plainly: no `//`, `%`, `;` or dot segment (trailing `/`s
    /// aside). A path written otherwise may be read by a server or proxy otherwise than
    /// [`Route::of`] reads it, so a layer that lets a `POST` [`answers_at_once`](Self::answers_at_once)
    /// through as no create (the retry layer's resend, the drain gate) asks this first.
    ///
    /// ```
    /// use kling_core::Route;
    ///
    /// assert!(Route::written_plainly("/v1/videos/identify-face/"));
    /// assert!(!Route::written_plainly("/v1/videos//identify-face"));
    /// assert!(!Route::written_plainly("/v1/videos/x/../identify-face"));
    /// assert!(!Route::written_plainly("/v1/videos/identify%2Dface"));
    /// ```
    pub fn written_plainly(path: &str) -> bool {
        let path = path.trim_end_matches('/');
        !path.contains("//")
            && !path.contains(['%', ';'])
            && !path.split('/').any(|segment| matches!(segment, "." | ".."))
    }
}

impl<'a> Route<'a> {
    /// Recognises a request from its method and URI path (without the query string).
    ///
    /// Legacy paths end in `v1/{videos|images}/{endpoint}[/{id}]` (after the last `v1`
    /// before `videos` or `images`, so an id may be `v1`), where the endpoint is one segment or,
    /// in a group, two (`images/editing/expand`, `videos/avatar/image2video`); a POST to an
    /// endpoint that answers at once with no task (`videos/identify-face`,
    /// `videos/image-recognize`) is no create. New-style paths end in `tasks` or
    /// `{product}/{model}`; `account/costs` is the account request. Empty segments and
    /// trailing `/`s are ignored, and any prefix (a proxy's base path) is allowed.
    ///
    /// A path is read as a server that normalizes it (RFC 3986 §6.2.2) reads it: an escape of
    /// an unreserved character (a letter, a digit, `-`, `.`, `_`, `~`; hex digits of either
    /// case) is that character, so `/v1/%76ideos/text2video` is a create, and `.` and `..`
    /// segments are removed (`/v1/images/../videos/text2video` is a video create), an escaped
    /// dot (`%2E`) too. Where a server that merges `//` before removing dot segments reads
    /// such a path otherwise (`/a//..`), it is a create if either reading is one: a create
    /// counted that is none only holds a slot until its answer, one not counted can overrun the
    /// account's limit (1303s) or be sent again unguarded. An escape of any other character
    /// (`%2F`, `%3A`) stays as written, data and no separator, as RFC 3986 says, except that
    /// whether a path with a `%2F` is a create is decided with its `%2F`s read as `/`s, as a
    /// server or proxy that decodes them before routing reads it (nginx passing its normalized
    /// URI on, Envoy's `UNESCAPE_AND_FORWARD`): `/v1/videos%2Ftext2video` is a create, and
    /// `/v1/videos/identify-face%2F` none (no server makes a task there: one that keeps the
    /// escape knows no endpoint of that name). [`model`] and [`task_id`] are given as written
    /// in the path, and [`Route::pool`] decodes the model.
    /// Paths are compared case-sensitively, as RFC 3986 and Kling's server do: Kling's paths
    /// are lowercase, so `/V1/VIDEOS/TEXT2VIDEO` is no Kling path (the server answers it with
    /// a 404 and makes no task), and it is [`RequestKind::Other`].
    ///
    /// A path that is no Kling path as written but is one with its `%2F`s read as `/`s is
    /// read so too: `/account%2Fcosts` is the account request (held to its class quota), and
    /// `GET /v1%2Fvideos%2Ftext2video/abc` a lookup.
    ///
    /// A `;` starts a segment's parameters, which Tomcat (and so Spring) removes before it
    /// routes: `/v1/videos;jsessionid=1/text2video` is a create there, and
    /// `/account/costs;jsessionid=1` the account request. A path is read so, its parameters
    /// removed (the model and task id given without them: `kling-3.0` of `kling-3.0;v=2`). A
    /// server that keeps them as data knows no Kling name that holds a `;`, so it makes no
    /// task where this reading finds none; and a create found where it makes none (it
    /// answers 404) holds a slot only until that answer.
    ///
    /// An ordinary path (no `%`, no `;`, no dot segment) is read as before in one pass,
    /// without allocating; only one with a `%`, a `;` or a dot segment takes a second,
    /// allocating pass.
    ///
    /// [`model`]: Route::model
    /// [`task_id`]: Route::task_id
    ///
    /// Inlined across crates so that a caller that reads only some fields (a metrics label)
    /// does not pay for the rest.
    #[inline]
    pub fn of(method: &Method, path: &'a str) -> Route<'a> {
        // `/` is ASCII, so trimming bytes keeps `path` on a character boundary.
        let mut trimmed = path.len();
        while trimmed > 0 && path.as_bytes()[trimmed - 1] == b'/' {
            trimmed -= 1;
        }
        let path = &path[..trimmed];
        // The non-empty segments, as byte ranges, on the stack, and the index of the one after
        // the last `v1` (`usize::MAX` for no `v1`: a plain index keeps it in a register).
        let bytes = path.as_bytes();
        let mut on_stack = [(0, 0); ON_STACK];
        let mut count = 0;
        let mut after_v1 = usize::MAX;
        // A `v1` counts only before `videos` or `images`: a task id or external id may be
        // `v1` itself (`/v1/videos/text2video/v1`).
        let mut after_any_v1 = usize::MAX;
        let mut dot_segment = false;
        let marked = each_segment(bytes, |(from, to)| {
            let segment = &bytes[from..to];
            dot_segment |= matches!(segment, b"." | b"..");
            if after_any_v1 == count && (segment == b"videos" || segment == b"images") {
                after_v1 = count;
            }
            if segment == b"v1" {
                after_any_v1 = count + 1;
            }
            if count < ON_STACK {
                on_stack[count] = (from, to);
            }
            count += 1;
        });
        if marked | dot_segment {
            return Route::of_unusual(method, path);
        }
        if count > ON_STACK {
            return Route::of_long(method, path, after_v1);
        }
        Route::by_rules(method, path, &on_stack[..count], after_v1)
    }

    /// [`Route::of`] of a trimmed path with more than `ON_STACK` segments: rare, so kept out
    /// of the common path.
    #[cold]
    #[inline(never)]
    fn of_long(method: &Method, path: &'a str, after_v1: usize) -> Route<'a> {
        let mut all = Vec::new();
        each_segment(path.as_bytes(), |segment| all.push(segment));
        Route::by_rules(method, path, &all, after_v1)
    }

    /// [`Route::of`] of a trimmed path with a `%`, a `;` or a `.` or `..` segment: its
    /// segments' `;` parameters removed, normalized as RFC 3986 does it and as a server that
    /// merges slashes first does it, the latter taken only when it is a create and the former
    /// is not (see [`Route::of`]); with a `%2F`, as a server that decodes it to a `/` reads
    /// it, when either reading is a create or the first is [`RequestKind::Other`]. Rare, so
    /// kept out of the common path; allocates.
    #[cold]
    #[inline(never)]
    fn of_unusual(method: &Method, path: &'a str) -> Route<'a> {
        let route = Route::normalized(method, path, false);
        if !has_escaped_slash(path) {
            return route;
        }
        let unescaped = Route::normalized(method, path, true);
        // A create as written that is none with its `%2F`s read as `/`s needs a `%2F` in a
        // name (`identify-face%2F`, `multi-elements%2Finit-selection`, a model): no Kling name
        // holds a `/`, so a server that keeps the escape finds no endpoint or model there, and
        // one that decodes it answers what it routes to, which may name no task and would
        // hold the slot for the whole task lease. A path that is nothing as written is what
        // it is with its `%2F`s read: the account request (held to its class quota), a lookup
        // (whose answer frees slots).
        if unescaped.kind == RequestKind::Create
            || route.kind == RequestKind::Create
            || route.kind == RequestKind::Other
        {
            return unescaped;
        }
        route
    }

    /// [`Route::of_unusual`]'s readings of `path` with its `%2F`s kept as data or, when
    /// `unescape_slashes`, read as `/`s: RFC 3986's, or the one that merges slashes first when
    /// only that one is a create. Each segment's `;` parameters are removed, as Tomcat (which
    /// Spring routes on) removes them before it decodes or removes dot segments:
    /// `text2video;jsessionid=1` is `text2video`, `..;x` a `..` (after the `%2F`s are read, as
    /// a server behind a proxy that decodes them reads it: Tomcat alone refuses a `%2F`).
    fn normalized(method: &Method, path: &'a str, unescape_slashes: bool) -> Route<'a> {
        let segments = split_segments(path, unescape_slashes);
        let is_dot = |text: &str| matches!(text, "." | "..");
        let normalizes = segments
            .iter()
            .any(|(_, text)| matches!(text, Cow::Owned(_)) || is_dot(text));
        // As written: every segment but the empty ones, undecoded.
        let as_written: Vec<usize> = (0..segments.len())
            .filter(|&at| !segments[at].1.is_empty())
            .collect();
        if !normalizes {
            // Only escapes of reserved characters (`%3A` in a lookup's id), or malformed ones:
            // the server reads the path as written.
            return Route::read(method, path, &segments, &as_written, false);
        }
        let remove_dots =
            |indexes: &mut dyn Iterator<Item = usize>| without_dot_segments(&segments, indexes);
        // RFC 3986: an empty segment is one, and a `..` after it removes it.
        let rfc = remove_dots(&mut (0..segments.len()));
        // Slashes merged first (nginx's `merge_slashes`): a `..` removes the segment before.
        let merged = remove_dots(&mut as_written.iter().copied());
        let rfc_route = Route::read(method, path, &segments, &rfc, true);
        if rfc_route.kind == RequestKind::Create || rfc == merged {
            return rfc_route;
        }
        let merged_route = Route::read(method, path, &segments, &merged, true);
        if merged_route.kind == RequestKind::Create {
            return merged_route;
        }
        rfc_route
    }

    /// The rules applied to the path made of `segments[at]` for each `at` of `indexes`
    /// (decoded when `decoded`), with the model and task id it names given as written in
    /// `path`.
    fn read(
        method: &Method,
        path: &'a str,
        segments: &[(Range, Cow<'a, str>)],
        indexes: &[usize],
        decoded: bool,
    ) -> Route<'a> {
        let mut text = String::with_capacity(path.len());
        let mut ranges = Vec::with_capacity(indexes.len());
        for &at in indexes {
            let ((from, to), decoded_text) = &segments[at];
            text.push('/');
            let start = text.len();
            text.push_str(if decoded {
                decoded_text
            } else {
                &path[*from..*to]
            });
            ranges.push((start, text.len()));
        }
        let after_v1 = ranges
            .windows(2)
            .rposition(|pair| {
                let [(a, b), (c, d)] = [pair[0], pair[1]];
                &text[a..b] == "v1" && matches!(&text[c..d], "videos" | "images")
            })
            .map_or(usize::MAX, |v1| v1 + 1);
        let route = Route::by_rules(method, &text, &ranges, after_v1);
        // A segment of `text`, as written in `path`.
        let as_written = |found: &str| {
            let start = found.as_ptr() as usize - text.as_ptr() as usize;
            let at = ranges.iter().position(|&(from, _)| from == start)?;
            let (from, to) = segments[indexes[at]].0;
            path.get(from..to)
        };
        Route {
            kind: route.kind,
            generation: route.generation,
            product: route.product,
            model: route.model.and_then(as_written),
            task_id: route.task_id.and_then(as_written),
            answers_at_once: route.answers_at_once,
        }
    }

    /// The rules, given the trimmed path's non-empty `segments` and the index of the one after
    /// the last `v1` among them (`usize::MAX` for no `v1`).
    #[inline(always)]
    fn by_rules(method: &Method, path: &'a str, segments: &[Range], after_v1: usize) -> Route<'a> {
        let mut route = Route::other(RequestKind::Other);
        // Compared as bytes: slicing the `str` would check character boundaries each time. A
        // segment is always on them (it ends at a `/` or the end); `get` cannot panic, so a
        // caller that ignores `task_id` or `model` does not pay for the check once inlined.
        let raw = |(from, to): Range| &path.as_bytes()[from..to];
        let text = |(from, to): Range| path.get(from..to).unwrap_or_default();

        // The account request: its last two segments (empty ones are none), before the other
        // rules (`/v1/videos/account/costs` too). Checked on the segments, not on the path's
        // text before the scan: that check did not see past a `//` between the two words, and
        // any check there made the scan's loop a few instructions dearer.
        if let [.., account, costs] = segments
            && raw(*costs) == b"costs"
            && raw(*account) == b"account"
        {
            return Route::other(RequestKind::Account);
        }

        // Legacy: .../v1/{videos|images}/{endpoint}[/{id}], the endpoint one or two segments.
        if let Some(rest) = segments.get(after_v1..) {
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
                route.generation = Some(ApiGeneration::Legacy);
                // The endpoint's own segments: one, or two under a group (`editing/expand`).
                let (grouped, answered_at_once) = match rest {
                    [first, second, ..] => (
                        is_endpoint_group(raw(*first), raw(*second)),
                        answers_at_once(raw(*first), raw(*second)),
                    ),
                    _ => (false, false),
                };
                let endpoint = if grouped { 3 } else { 2 };
                match (rest.len().checked_sub(endpoint), method) {
                    (Some(0), _) if answered_at_once => route.answers_at_once = true,
                    _ if answered_at_once => {}
                    (Some(0), &Method::POST) => {
                        route.kind = RequestKind::Create;
                        route.product = Some(product);
                    }
                    (Some(0), &Method::GET) => route.kind = RequestKind::List,
                    (Some(1), &Method::GET) => {
                        route.kind = RequestKind::Query;
                        route.task_id = Some(text(rest[endpoint]));
                    }
                    _ => {}
                }
                return route;
            }
        }

        // New: /tasks (batch query or list) and /{product}/{model} (create).
        match segments {
            [.., last] if raw(*last) == b"tasks" => {
                route.generation = Some(ApiGeneration::New);
                if method == Method::GET {
                    route.kind = RequestKind::Query;
                } else if method == Method::POST {
                    route.kind = RequestKind::List;
                }
            }
            [.., product, model] if method == Method::POST => {
                if let Some(product) = new_style_product(text(*product)) {
                    route.generation = Some(ApiGeneration::New);
                    route.kind = RequestKind::Create;
                    route.product = Some(product);
                    route.model = Some(text(*model));
                }
            }
            _ => {}
        }
        route
    }

    /// The text of one of the readings [`Route::of`] makes of a path it does not read as
    /// written (one with a `%`, a `;` or a dot segment): the path's segments, split at its `/`s
    /// and, when `unescape_slashes`, its `%2F`s (as a decoding proxy reads them), each up to
    /// its `;` parameters (as Tomcat removes them) and with its escapes of unreserved
    /// characters decoded ([`Route::decode_unreserved`]); then `.` and `..` segments removed
    /// as RFC 3986 §5.2.4 does it (an empty segment is one, which a `..` removes) or, when
    /// `merge_first`, after merging `//`s (nginx); then empty segments. Joined by `/`, with a
    /// leading `/` when `path` has one, so that a path with none of these (and no `//` or
    /// trailing `/`) is its own reading.
    ///
    /// [`Route::of`] takes a `%2F` as a `/`, or the reading that merges `//`s first, only where
    /// that reading is a create (see there); a caller that keys creates by path takes the
    /// reading in which its path is one.
    ///
    /// ```
    /// use kling_core::Route;
    ///
    /// let path = "/v1;a=b/videos/x/../%74ext2video%2F";
    /// assert_eq!(Route::read_path(path, false, false), "/v1/videos/text2video%2F");
    /// assert_eq!(Route::read_path(path, true, false), "/v1/videos/text2video");
    /// assert_eq!(Route::read_path("/a//../b", false, false), "/a/b");
    /// assert_eq!(Route::read_path("/a//../b", false, true), "/b");
    /// ```
    pub fn read_path(path: &str, unescape_slashes: bool, merge_first: bool) -> String {
        let segments = split_segments(path, unescape_slashes);
        let kept = if merge_first {
            let mut non_empty = (0..segments.len()).filter(|&at| !segments[at].1.is_empty());
            without_dot_segments(&segments, &mut non_empty)
        } else {
            without_dot_segments(&segments, &mut (0..segments.len()))
        };
        let mut text = String::with_capacity(path.len());
        for (nth, &at) in kept.iter().enumerate() {
            if nth > 0 || path.starts_with('/') {
                text.push('/');
            }
            text.push_str(&segments[at].1);
        }
        text
    }

    /// `text` with each escape of an unreserved character (RFC 3986 §2.3: a letter, a digit,
    /// `-`, `.`, `_`, `~`; hex digits of either case) decoded, as RFC 3986 §6.2.2.2 normalizes
    /// a path and [`Route::of`] reads it; every other escape (`%2F`, `%25`) and every malformed
    /// one is kept as written. Borrowed when nothing is decoded.
    ///
    /// ```
    /// use kling_core::Route;
    ///
    /// assert_eq!(Route::decode_unreserved("kling%2D3.0%2F%zz"), "kling-3.0%2F%zz");
    /// ```
    pub fn decode_unreserved(text: &str) -> Cow<'_, str> {
        unreserved_decoded(text)
    }

    /// A route of `kind` with nothing else known.
    fn other(kind: RequestKind) -> Route<'a> {
        Route {
            kind,
            generation: None,
            product: None,
            model: None,
            task_id: None,
            answers_at_once: false,
        }
    }

    /// The pool a create draws from (`None` for everything else); allocates the model's name,
    /// with its escapes of unreserved characters decoded as the server reads it.
    pub fn pool(&self) -> Option<Pool> {
        let product = self.product?;
        Some(match self.model {
            None => Pool::new(product),
            // As the server reads it: `kling%2D3.0` is `kling-3.0`.
            Some(model) if !model.as_bytes().contains(&b'%') => Pool::with_model(product, model),
            Some(model) => Pool::with_model(product, &*unreserved_decoded(model)),
        })
    }
}

/// A segment of a path, as byte offsets (from, to).
type Range = (usize, usize);

/// Segments kept on the stack; Kling paths have two to four, and a longer path takes
/// `Route::of_long`.
const ON_STACK: usize = 8;

/// Calls `segment` with the byte range of each non-empty `/`-separated segment, in order,
/// finding the `/`s eight bytes at a time (a byte loop or `split` costs several times more on
/// paths this short), and returns whether `bytes` hold a `%` or a `;` (found in the same words).
/// Always inlined: its callback is then inlined too.
#[inline(always)]
fn each_segment(bytes: &[u8], mut segment: impl FnMut(Range)) -> bool {
    let mut start = 0;
    let mut marks = 0;
    let mut chunks = bytes.chunks_exact(8);
    let mut base = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        scan_word(word, base, &mut start, &mut marks, &mut segment);
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
        scan_word(word, base, &mut start, &mut marks, &mut segment);
    }
    if bytes.len() > start {
        segment((start, bytes.len()));
    }
    marks != 0
}

/// One word of [`each_segment`]'s scan: `word` holds `bytes[base..]` little-endian (byte
/// `base + i` in bits `8 * i..`); calls `segment` for each segment a `/` in it ends, and notes
/// its `%`s and `;`s in `marks`. A function, not a closure, so that it is always inlined (a
/// closure that captured the `%`s as well was called out of line, some 200 instructions a
/// request).
#[inline(always)]
fn scan_word(
    word: u64,
    base: usize,
    start: &mut usize,
    marks: &mut u64,
    segment: &mut impl FnMut(Range),
) {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const SLASHES: u64 = 0x2f2f_2f2f_2f2f_2f2f;
    const PERCENTS: u64 = 0x2525_2525_2525_2525;
    const SEMICOLONS: u64 = 0x3b3b_3b3b_3b3b_3b3b;
    const ONES: u64 = 0x0101_0101_0101_0101;
    // The high bit of exactly the zero bytes of `x` (no carry crosses a byte).
    let zeros = |x: u64| !(((x & LOW7) + LOW7) | x | LOW7);
    // Not zero exactly when `x` has a zero byte (a borrow may set a bit above one): fewer
    // steps than `zeros`, and the `%`s and `;`s are only counted.
    let any_zero = |x: u64| x.wrapping_sub(ONES) & !x;
    *marks |= (any_zero(word ^ PERCENTS) | any_zero(word ^ SEMICOLONS)) & !LOW7;
    // The `/`s.
    let mut found = zeros(word ^ SLASHES);
    while found != 0 {
        let at = base + found.trailing_zeros() as usize / 8;
        found &= found - 1;
        if at > *start {
            segment((*start, at));
        }
        *start = at + 1;
    }
}

/// `text` with each escape of an unreserved character (RFC 3986 §2.3: a letter, a digit, `-`,
/// `.`, `_`, `~`) decoded, its hex digits in either case, as RFC 3986 §6.2.2.2 normalizes a
/// path; every other escape (`%2F`, `%25`) and every malformed one is kept as written.
/// Borrowed when nothing is decoded. Out of line: only a path written with escapes comes here.
#[cold]
#[inline(never)]
fn unreserved_decoded(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let hex = |at: usize| bytes.get(at).and_then(|&b| char::from(b).to_digit(16));
    let unreserved = |at: usize| {
        let byte = hex(at + 1)? * 16 + hex(at + 2)?;
        u8::try_from(byte)
            .ok()
            .filter(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    };
    let Some(first) = (0..bytes.len()).find(|&at| bytes[at] == b'%' && unreserved(at).is_some())
    else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first]);
    let mut at = first;
    while at < bytes.len() {
        match unreserved(at).filter(|_| bytes[at] == b'%') {
            Some(byte) => {
                out.push(char::from(byte));
                at += 3;
            }
            None => {
                // Up to the next `%` after this one. `at` is on a character boundary (at a `%`
                // or after an escape), and may start a character of several bytes (`%41é`):
                // only a `%` is skipped by its one byte.
                let from = at + usize::from(bytes[at] == b'%');
                let next = text[from..].find('%').map_or(text.len(), |n| from + n);
                out.push_str(&text[at..next]);
                at = next;
            }
        }
    }
    Cow::Owned(out)
}

/// Every segment of `path`, empty ones too (RFC 3986 removes dot segments before anything merges
/// slashes) but not the empty one before a leading `/`, split at its `/`s and, when
/// `unescape_slashes`, its `%2F`s: each one's range up to its `;` parameters, and that text
/// with its escapes of unreserved characters decoded.
fn split_segments(path: &str, unescape_slashes: bool) -> Vec<(Range, Cow<'_, str>)> {
    let mut segments = Vec::new();
    let bytes = path.as_bytes();
    let mut from = 0;
    let mut at = 0;
    while at <= bytes.len() {
        // The length of the separator at `at` (the end of the path counts as one).
        let separator = match bytes.get(at) {
            None | Some(b'/') => 1,
            Some(b'%') if unescape_slashes && is_escaped_slash(&bytes[at..]) => 3,
            Some(_) => 0,
        };
        if separator == 0 {
            at += 1;
            continue;
        }
        // `at` is the end or an ASCII byte, so on a character boundary.
        let piece = &path[from..at];
        if from > 0 || !piece.is_empty() {
            // Up to its parameters (`;` is ASCII, so on a character boundary).
            let end = piece.find(';').map_or(at, |params| from + params);
            segments.push(((from, end), unreserved_decoded(&path[from..end])));
        }
        at += separator;
        from = at;
    }
    segments
}

/// The `indexes` of `segments` (as [`split_segments`] gives them) left when dot segments are
/// removed as RFC 3986 §5.2.4 removes them (a `..` removes the index before it), then empty
/// ones.
fn without_dot_segments(
    segments: &[(Range, Cow<'_, str>)],
    indexes: &mut dyn Iterator<Item = usize>,
) -> Vec<usize> {
    let mut kept = Vec::new();
    for at in indexes {
        match &*segments[at].1 {
            "." => {}
            ".." => {
                kept.pop();
            }
            _ => kept.push(at),
        }
    }
    kept.retain(|&at| !segments[at].1.is_empty());
    kept
}

/// Whether `path` holds a `%2F` (or `%2f`), an escaped `/`.
fn has_escaped_slash(path: &str) -> bool {
    let bytes = path.as_bytes();
    (0..bytes.len()).any(|at| is_escaped_slash(&bytes[at..]))
}

/// Whether `bytes` start with `%2F` (or `%2f`).
fn is_escaped_slash(bytes: &[u8]) -> bool {
    matches!(bytes, [b'%', b'2', b'F' | b'f', ..])
}

/// Whether a legacy product's segment and the one after it open a group of endpoints, each named
/// by one more segment: `images/editing/expand` (image expansion) and `videos/avatar/image2video`
/// (the avatar). Their creates, lists and queries sit one segment deeper than the others'.
#[inline(always)]
fn is_endpoint_group(product: &[u8], group: &[u8]) -> bool {
    (product == b"images" && group == b"editing") || (product == b"videos" && group == b"avatar")
}

/// Whether a legacy endpoint answers at once, with no task: `videos/identify-face` (the faces of a
/// video, for advanced lip-sync) and `videos/image-recognize`. A POST there is no create: it takes
/// no slot (its answer names no task that could ever give one back) and gets no external id.
#[inline(always)]
fn answers_at_once(product: &[u8], endpoint: &[u8]) -> bool {
    product == b"videos" && (endpoint == b"identify-face" || endpoint == b"image-recognize")
}

/// The product of a new-style create path's first segment (`text-to-video`, `omni-video`, …).
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

    /// The rules as first written: split the path into its segments, then match on them.
    fn reference<'a>(method: &Method, path: &'a str) -> Route<'a> {
        let mut route = Route {
            kind: RequestKind::Other,
            generation: None,
            product: None,
            model: None,
            task_id: None,
            answers_at_once: false,
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if let [.., "account", "costs"] = segments[..] {
            route.kind = RequestKind::Account;
            return route;
        }
        if let Some(v1) = segments
            .windows(2)
            .rposition(|w| w[0] == "v1" && matches!(w[1], "videos" | "images"))
        {
            let rest = &segments[v1 + 1..];
            let product = match rest {
                ["videos", ..] => Some(Product::Video),
                ["images", "kolors-virtual-try-on", ..] => Some(Product::TryOn),
                ["images", ..] => Some(Product::Image),
                _ => None,
            };
            if let Some(product) = product {
                route.generation = Some(ApiGeneration::Legacy);
                let grouped = matches!(rest, ["images", "editing", ..] | ["videos", "avatar", ..]);
                let endpoint = if grouped { 3 } else { 2 };
                let at_once = matches!(rest, ["videos", "identify-face" | "image-recognize", ..]);
                route.answers_at_once = at_once && rest.len() == endpoint;
                let id = rest.get(endpoint..).filter(|_| !at_once);
                match (id, method) {
                    (Some([]), &Method::POST) => {
                        route.kind = RequestKind::Create;
                        route.product = Some(product);
                    }
                    (Some([]), &Method::GET) => route.kind = RequestKind::List,
                    (Some([id]), &Method::GET) => {
                        route.kind = RequestKind::Query;
                        route.task_id = Some(id);
                    }
                    _ => {}
                }
                return route;
            }
        }
        match segments[..] {
            [.., "tasks"] => {
                route.generation = Some(ApiGeneration::New);
                if method == Method::GET {
                    route.kind = RequestKind::Query;
                } else if method == Method::POST {
                    route.kind = RequestKind::List;
                }
            }
            [.., product, model] if method == Method::POST => {
                if let Some(product) = new_style_product(product) {
                    route.generation = Some(ApiGeneration::New);
                    route.kind = RequestKind::Create;
                    route.product = Some(product);
                    route.model = Some(model);
                }
            }
            _ => {}
        }
        route
    }

    /// Every word a rule looks at, a near miss of each, and filler.
    const WORDS: [&str; 24] = [
        "v1",
        "videos",
        "images",
        "kolors-virtual-try-on",
        "editing",
        "avatar",
        "identify-face",
        "image-recognize",
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
        assert_eq!(
            Route::of(method, uri.path()),
            reference(method, uri.path()),
            "{method} {path}"
        );
    }

    #[test]
    fn every_path_of_up_to_four_words_is_recognised_as_the_reference_does() {
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
                // Empty segments in front and between the words.
                format!("/api//{}?task_ids=1,2", path.join("//")),
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

    /// Empty segments are ignored in every request, the account request's too: written with a
    /// `//` (or more) between its two words it is still held to its class quota and labelled
    /// so, as it already was with a `;` parameter or a `.` segment there. The reference reads
    /// it so too, so the exhaustive comparison holds it.
    #[test]
    fn the_account_request_with_an_empty_segment_between_its_words_is_the_account_request() {
        let account = |method: &Method, path: &str| {
            assert_eq!(
                Route::of(method, path).kind,
                RequestKind::Account,
                "{method} {path}"
            );
        };
        for path in [
            "/account//costs",
            "/account///costs/",
            "//account//costs//",
            "account//costs",
            "/proxy/account//costs",
            "/v1/videos/account//costs",
        ] {
            for method in [Method::GET, Method::POST] {
                account(&method, path);
                assert_eq!(Route::of(&method, path), reference(&method, path), "{path}");
            }
        }
        for path in [
            "/account//costs;x",
            "/account/.//costs",
            "/account//%63osts",
        ] {
            account(&Method::GET, path);
        }
        for path in [
            "/xaccount//costs",
            "/account//xcosts",
            "/accountcosts",
            "/account/costs/x",
            "/account//",
            "//costs",
            "costs",
        ] {
            assert_eq!(
                Route::of(&Method::GET, path).kind,
                RequestKind::Other,
                "{path}"
            );
            assert_eq!(
                Route::of(&Method::GET, path),
                reference(&Method::GET, path),
                "{path}"
            );
        }
    }

    /// Every path of up to four words, written with an empty segment (`//`) anywhere, a `;p=1`
    /// after one of its segments, or a `/.` in front or behind, is read as it is written
    /// plainly: the whole family of spellings a server reads as the same path.
    #[test]
    fn every_spelling_of_a_path_reads_as_the_plain_path() {
        // Words the rules look at (a group, an endpoint that answers at once, an id), and the
        // empty one (a `//` where it stands): a few seconds in a debug build.
        const TOKENS: [&str; 12] = [
            "",
            "v1",
            "videos",
            "images",
            "avatar",
            "identify-face",
            "text2video",
            "tasks",
            "account",
            "costs",
            "text-to-video",
            "kling-3.0",
        ];
        let mut paths: Vec<Vec<&str>> = vec![vec![]];
        let mut checked = 0;
        for _ in 0..4 {
            paths = paths
                .iter()
                .flat_map(|p| TOKENS.iter().map(move |w| [p.as_slice(), &[*w]].concat()))
                .collect();
            for path in &paths {
                let words: Vec<&str> = path.iter().copied().filter(|w| !w.is_empty()).collect();
                let plain = format!("/{}", words.join("/"));
                let mut spellings = vec![
                    format!("/{}", path.join("/")),
                    format!("{plain}/."),
                    format!("/.{plain}"),
                ];
                for at in 0..words.len() {
                    let mut with = words.clone();
                    let parameter = format!("{};p=1", words[at]);
                    with[at] = &parameter;
                    spellings.push(format!("/{}", with.join("/")));
                }
                for method in [Method::GET, Method::POST] {
                    let expected = Route::of(&method, &plain);
                    for spelling in &spellings {
                        assert_eq!(
                            Route::of(&method, spelling),
                            expected,
                            "{method} {spelling} (plainly {plain})"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 250_000, "{checked}");
    }

    #[test]
    fn endpoints_in_a_group_sit_one_segment_deeper() {
        for (create, product) in [
            ("/v1/images/editing/expand", Product::Image),
            ("/v1/videos/avatar/image2video", Product::Video),
        ] {
            let route = Route::of(&Method::POST, create);
            assert_eq!(
                (route.kind, route.product, route.generation),
                (
                    RequestKind::Create,
                    Some(product),
                    Some(ApiGeneration::Legacy)
                ),
                "{create}"
            );
            assert_eq!(Route::of(&Method::GET, create).kind, RequestKind::List);
            let query = format!("/proxy{create}/task-1/");
            let route = Route::of(&Method::GET, &query);
            assert_eq!(
                (route.kind, route.task_id),
                (RequestKind::Query, Some("task-1"))
            );
            for other in [format!("{create}/task-1/more"), format!("{create}/task-1")] {
                assert_eq!(Route::of(&Method::POST, &other).kind, RequestKind::Other);
            }
            agrees(&Method::GET, &query);
        }
        // The group alone names no endpoint.
        for method in [Method::GET, Method::POST] {
            for path in ["/v1/images/editing", "/v1/videos/avatar"] {
                assert_eq!(Route::of(&method, path).kind, RequestKind::Other, "{path}");
            }
        }
        // Not groups: an image generation's query, a multi-element edit's selection step.
        let route = Route::of(&Method::GET, "/v1/images/generations/editing");
        assert_eq!(
            (route.kind, route.task_id),
            (RequestKind::Query, Some("editing"))
        );
        let selection = Route::of(&Method::POST, "/v1/videos/multi-elements/init-selection");
        assert_eq!(selection.kind, RequestKind::Other);
        assert_eq!(
            Route::of(&Method::POST, "/v1/videos/multi-elements").kind,
            RequestKind::Create
        );
    }

    #[test]
    fn endpoints_that_answer_at_once_make_no_task() {
        for path in ["/v1/videos/identify-face", "/v1/videos/image-recognize"] {
            let route = Route::of(&Method::POST, path);
            assert_eq!(
                (route.kind, route.product, route.pool()),
                (RequestKind::Other, None, None),
                "{path}"
            );
            assert!(route.answers_at_once, "{path}");
            let route = Route::of(&Method::GET, path);
            assert_eq!(
                (route.kind, route.answers_at_once),
                (RequestKind::Other, true)
            );
            // More segments after the endpoint name none of Kling's endpoints.
            let longer = format!("{path}/x");
            let route = Route::of(&Method::GET, &longer);
            assert_eq!(
                (route.kind, route.answers_at_once),
                (RequestKind::Other, false)
            );
            // Written another way, as the router reads the path.
            for other in [
                format!("/proxy{path}/"),
                path.replace("/videos/", "//videos/./"),
                path.replace("/videos/", "/videos%2F"),
                format!("{path};v=2"),
            ] {
                let route = Route::of(&Method::POST, &other);
                assert_eq!(
                    (route.kind, route.answers_at_once),
                    (RequestKind::Other, true),
                    "{other}"
                );
            }
        }
        for (method, path) in [
            (Method::POST, "/v1/videos/text2video"),
            (Method::POST, "/v1/images/identify-face"),
            (Method::POST, "/v1/videos/avatar/identify-face"),
            (Method::GET, "/v1/videos/text2video/identify-face"),
            (Method::POST, "/identify-face/kling-3.0"),
            (Method::GET, "/tasks"),
        ] {
            assert!(!Route::of(&method, path).answers_at_once, "{method} {path}");
        }
        // The names are no ids: a task may still be called so.
        let route = Route::of(&Method::GET, "/v1/videos/text2video/identify-face");
        assert_eq!(route.task_id, Some("identify-face"));
    }

    #[test]
    fn long_paths_are_recognised_as_the_reference_does() {
        let deep = format!("/{}", ["a"; ON_STACK].join("/"));
        for path in [
            format!("{deep}/v1/videos/text2video"),
            format!("{deep}/v1/videos/text2video/1"),
            format!("/v1/videos{deep}"),
            format!("/v1/images/kolors-virtual-try-on{deep}"),
            format!("/v1/images/v1{deep}/v1/images/generations"),
            format!("{deep}/text-to-video/kling-3.0"),
            format!("{deep}/tasks"),
            format!("//v1//videos/text2video//abc//{deep}/"),
        ] {
            for method in [Method::GET, Method::POST] {
                agrees(&method, &path);
            }
        }
        let create = format!("{deep}/v1/images/generations");
        let route = Route::of(&Method::POST, &create);
        assert_eq!(
            (route.kind, route.product),
            (RequestKind::Create, Some(Product::Image))
        );
        let route = Route::of(&Method::GET, "//v1//videos/text2video//abc//");
        assert_eq!(route.task_id, Some("abc"));
    }

    /// A task or external id may be `v1`: a lookup of it is still a query, so its 1203 ends
    /// the slots' holding.
    #[test]
    fn an_id_that_is_v1_is_still_a_query() {
        for (path, product) in [
            ("/v1/videos/text2video/v1", Product::Video),
            ("/v1/images/generations/v1", Product::Image),
            (
                "/proxy/v1/v1/images/kolors-virtual-try-on/v1/",
                Product::TryOn,
            ),
        ] {
            let route = Route::of(&Method::GET, path);
            assert_eq!(
                (route.kind, route.generation, route.task_id),
                (RequestKind::Query, Some(ApiGeneration::Legacy), Some("v1")),
                "{path}"
            );
            agrees(&Method::GET, path);
            let create = path.trim_end_matches('/').trim_end_matches("/v1");
            let route = Route::of(&Method::POST, create);
            assert_eq!(
                (route.kind, route.product),
                (RequestKind::Create, Some(product)),
                "{create}"
            );
        }
    }

    #[test]
    fn segments_are_found_in_every_short_string() {
        // Every string of up to 8 symbols over `/`, `a`, a two-byte character, `%` and `;`:
        // every length around the 8-byte words, every position of a `/`, a `%` and a `;`.
        let symbols = ["/", "a", "é", "%", ";"];
        let mut strings = vec![String::new()];
        let mut checked = 0;
        for _ in 0..8 {
            strings = strings
                .iter()
                .flat_map(|s| symbols.iter().map(move |c| format!("{s}{c}")))
                .collect();
            for s in &strings {
                let expected: Vec<&str> = s.split('/').filter(|s| !s.is_empty()).collect();
                let mut found = Vec::new();
                let marked = each_segment(s.as_bytes(), |(from, to)| found.push(&s[from..to]));
                assert_eq!(found, expected, "{s:?}");
                assert_eq!(marked, s.contains(['%', ';']), "{s:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, (1..=8).map(|n| 5usize.pow(n)).sum::<usize>());
    }

    #[test]
    fn the_documented_paths_are_recognised() {
        let create = |product, model| Route {
            kind: RequestKind::Create,
            product: Some(product),
            model,
            ..Route::of(&Method::GET, "/")
        };
        let legacy = |route: Route<'static>| Route {
            generation: Some(ApiGeneration::Legacy),
            ..route
        };
        let new = |route: Route<'static>| Route {
            generation: Some(ApiGeneration::New),
            ..route
        };
        let kind = |kind| Route {
            kind,
            ..Route::of(&Method::GET, "/")
        };
        let cases = [
            (
                Method::POST,
                "/v1/videos/text2video",
                legacy(create(Product::Video, None)),
            ),
            (
                Method::POST,
                "/v1/images/kolors-virtual-try-on",
                legacy(create(Product::TryOn, None)),
            ),
            (
                Method::POST,
                "/v1/images/generations",
                legacy(create(Product::Image, None)),
            ),
            (
                Method::GET,
                "/v1/videos/text2video/abc",
                Route {
                    task_id: Some("abc"),
                    ..legacy(kind(RequestKind::Query))
                },
            ),
            (
                Method::GET,
                "/v1/videos/text2video",
                legacy(kind(RequestKind::List)),
            ),
            (
                Method::DELETE,
                "/v1/videos/text2video",
                legacy(kind(RequestKind::Other)),
            ),
            (
                Method::POST,
                "/text-to-video/kling-3.0",
                new(create(Product::Video, Some("kling-3.0"))),
            ),
            (
                Method::POST,
                "/virtual-try-on/kolors-v1.5",
                new(create(Product::TryOn, Some("kolors-v1.5"))),
            ),
            (Method::GET, "/tasks", new(kind(RequestKind::Query))),
            (Method::POST, "/tasks/", new(kind(RequestKind::List))),
            (Method::GET, "/account/costs", kind(RequestKind::Account)),
            (Method::GET, "/", kind(RequestKind::Other)),
        ];
        for (method, path, expected) in cases {
            assert_eq!(Route::of(&method, path), expected, "{method} {path}");
            agrees(&method, path);
        }
        assert_eq!(kind(RequestKind::Other).generation, None);
    }

    /// A path a server that normalizes URIs (RFC 3986 §6.2.2) reads as Kling's is recognised
    /// as that: an escape of an unreserved character decoded (either case of hex), `.` and `..`
    /// segments removed (an escaped dot too), empty segments ignored.
    #[test]
    fn a_path_is_recognised_as_a_normalizing_server_reads_it() {
        fn create(path: &str, product: Product) -> Route<'_> {
            let route = Route::of(&Method::POST, path);
            assert_eq!(
                (route.kind, route.product),
                (RequestKind::Create, Some(product)),
                "POST {path}"
            );
            route
        }
        for path in [
            "/v1/%76ideos/text2video",
            "/v1/%76%69%64%65%6F%73/text2video",
            "/v1/videos/%74ext2video",
            "/%761/videos/text2video",
            "/v1/images/../videos/text2video",
            "/v1/./videos/text2video",
            "/v1//videos/text2video",
            "/v1/videos/text2video/.",
            "/v1/videos/text2video/x/..",
            "/v1/videos/text2video/x/%2e%2E/",
            "/v1/videos/%2E/text2video",
            "/../v1/videos/text2video",
            "/proxy/a/../../v1/videos/text2video",
            "/v1/videos/avatar/../text2video",
            // Read with its empty segment (RFC 3986) the `..` removes it and leaves a create;
            // with slashes merged first (nginx) it removes `videos`: a create either way.
            "/v1/videos//../text2video",
            "/v1/videos/text2video//..",
        ] {
            assert_eq!(
                create(path, Product::Video).generation,
                Some(ApiGeneration::Legacy)
            );
        }
        // A create only with slashes merged first: so read.
        create("/v1/videos/text2video/x//..", Product::Video);
        create("/v1/videos/a//../../images/generations", Product::Image);
        // A create both ways: RFC 3986's.
        let route = create("/text-to-video/text-to-image//../kling-v2", Product::Image);
        assert_eq!(route.model, Some("kling-v2"));
        create("/v1/%69mages/generations", Product::Image);
        create("/v1/videos/%2E%2E/images/generations", Product::Image);
        create("/v1/images/kolors%2Dvirtual%2Dtry%2Don", Product::TryOn);
        let route = create("/%74ext-to-video/kling-3.0", Product::Video);
        assert_eq!(route.model, Some("kling-3.0"));
        // The model as written, and its pool as the server names it.
        let route = create("/text-to-video/kling%2D3.0", Product::Video);
        assert_eq!(route.model, Some("kling%2D3.0"));
        assert_eq!(
            route.pool(),
            Some(Pool::with_model(Product::Video, "kling-3.0"))
        );
        // An escape of a reserved character stays one.
        let route = create("/text-to-video/kling%3A3", Product::Video);
        assert_eq!(
            route.pool(),
            Some(Pool::with_model(Product::Video, "kling%3A3"))
        );
        let route = create("/text-to-video/x/../kling-3.0", Product::Video);
        assert_eq!(route.model, Some("kling-3.0"));

        fn query(path: &str) -> (RequestKind, Option<&str>) {
            let route = Route::of(&Method::GET, path);
            (route.kind, route.task_id)
        }
        assert_eq!(
            query("/v1/videos/text2video/./abc"),
            (RequestKind::Query, Some("abc"))
        );
        assert_eq!(
            query("/v1/%76ideos/text2video/abc"),
            (RequestKind::Query, Some("abc"))
        );
        assert_eq!(
            query("/v1/videos/text2video/a%62c"),
            (RequestKind::Query, Some("a%62c"))
        );
        assert_eq!(
            query("/v1/videos/text2video/abc/.."),
            (RequestKind::List, None)
        );
        // Read as RFC 3986 reads it when no reading is a create: the `..` removes the empty
        // segment.
        assert_eq!(
            query("/v1/videos/text2video/abc//.."),
            (RequestKind::Query, Some("abc"))
        );
        assert_eq!(query("/t%61sks"), (RequestKind::Query, None));
        assert_eq!(query("/account/%63osts"), (RequestKind::Account, None));
        assert_eq!(query("/account/costs/x/.."), (RequestKind::Account, None));
        // An escape of a reserved character is data, not a separator: the id of a lookup.
        assert_eq!(
            query("/v1/videos/text2video/batch%3A42"),
            (RequestKind::Query, Some("batch%3A42"))
        );
        for path in [
            // Reserved or not an escape: left as written (`%2F` is the next test's).
            "/v1/%2576ideos/text2video",
            "/v1/%7videos/text2video",
            "/v1/videos%/text2video",
            // Paths are case-sensitive; an escape decodes to the letter it names.
            "/v1/%56ideos/text2video",
            "/V1/VIDEOS/TEXT2VIDEO",
            // Normalized, no create.
            "/v1/videos/text2video/..",
            "/v1/videos/text2video/%2E%2E",
            "/text-to-video/%2E%2E",
            "/text-to-video/.",
            "/v1/videos/text2video/x/../y",
        ] {
            assert_eq!(
                Route::of(&Method::POST, path).kind,
                RequestKind::Other,
                "POST {path}"
            );
        }
    }

    /// A `%2F` is data to RFC 3986, but a server or proxy that decodes it before routing reads a
    /// `/`: whether a path is a create is decided so, with its product and model; a path that
    /// is no create keeps RFC 3986's reading (a lookup's id keeps its escape).
    #[test]
    fn an_escaped_slash_is_read_as_a_server_that_decodes_it_reads_it() {
        for (path, product, model) in [
            ("/v1/videos%2Ftext2video", Product::Video, None),
            ("/v1%2Fvideos%2Ftext2video", Product::Video, None),
            ("/v1%2fimages%2fgenerations", Product::Image, None),
            ("%2Fv1%2Fimages/kolors-virtual-try-on", Product::TryOn, None),
            ("/proxy/v1/images/editing%2Fexpand/", Product::Image, None),
            ("/v1/videos/avatar%2F%69mage2video", Product::Video, None),
            ("/v1/videos/x%2F..%2Ftext2video", Product::Video, None),
            ("/v1/videos/text2video/x%2F%2E%2E", Product::Video, None),
            (
                "/text-to-video%2Fkling-3.0",
                Product::Video,
                Some("kling-3.0"),
            ),
            (
                "/text-to-image%2Fkling%2Dv2",
                Product::Image,
                Some("kling%2Dv2"),
            ),
        ] {
            let route = Route::of(&Method::POST, path);
            assert_eq!(
                (route.kind, route.product, route.model),
                (RequestKind::Create, Some(product), model),
                "POST {path}"
            );
        }
        let route = Route::of(&Method::POST, "/text-to-image%2Fkling%2Dv2");
        assert_eq!(
            route.pool(),
            Some(Pool::with_model(Product::Image, "kling-v2"))
        );
        // A `%2F` in a name: no create as written (no Kling name holds a `/`), and none read
        // with a `/` either; an endpoint that answers at once would hold a slot for the lease.
        for path in [
            "/v1/videos/identify-face%2F",
            "/v1/videos/image-recognize%2F.",
            "/v1/videos/multi-elements%2Finit-selection",
            "/v1/videos/text2video%2Fabc",
            "/omni-video/kling%2Fo1",
        ] {
            let route = Route::of(&Method::POST, path);
            assert_eq!(
                (route.kind, route.pool()),
                (RequestKind::Other, None),
                "POST {path}"
            );
        }
        // No create either way: as RFC 3986 reads it; an escaped `%` is no escape.
        for (method, path, kind, task_id) in [
            (
                Method::GET,
                "/v1/videos/text2video/a%2Fb",
                RequestKind::Query,
                Some("a%2Fb"),
            ),
            (
                Method::GET,
                "/v1/videos/text2video%2Fabc",
                RequestKind::List,
                None,
            ),
            (
                Method::POST,
                "/v1/videos/text2video/a%2Fb",
                RequestKind::Other,
                None,
            ),
            (
                Method::POST,
                "/v1/videos%2Fidentify-face",
                RequestKind::Other,
                None,
            ),
            (
                Method::POST,
                "/text-to-video%252Fkling-3.0",
                RequestKind::Other,
                None,
            ),
            (
                Method::POST,
                "/v1%252Fvideos%252Ftext2video",
                RequestKind::Other,
                None,
            ),
        ] {
            let route = Route::of(&method, path);
            assert_eq!(
                (route.kind, route.task_id),
                (kind, task_id),
                "{method} {path}"
            );
        }
    }

    /// A segment's `;` parameters are removed, as Tomcat (and so Spring) removes them before
    /// it routes: a create written with them takes its slot in its pool, one that is none
    /// there (an endpoint that answers at once) takes none, and the account request and a
    /// lookup are what they are.
    #[test]
    fn path_parameters_are_read_as_tomcat_reads_them() {
        for (path, product, model) in [
            ("/v1/videos/text2video;jsessionid=x", Product::Video, None),
            ("/v1;a=b/videos/text2video", Product::Video, None),
            ("/v1/videos;x/text2video/", Product::Video, None),
            ("/v1/images/editing;v=1/expand", Product::Image, None),
            ("/v1/videos/avatar;x/image2video", Product::Video, None),
            ("/v1/images/kolors-virtual-try-on;x", Product::TryOn, None),
            ("/v1/videos/x/..;/text2video", Product::Video, None),
            ("/v1/videos/x/..;a=b/;c/text2video", Product::Video, None),
            ("/proxy;p/v1/%69mages;x/generations", Product::Image, None),
            (
                "/text-to-video;x/kling-3.0",
                Product::Video,
                Some("kling-3.0"),
            ),
            (
                "/text-to-video/kling-3.0;jsessionid=x",
                Product::Video,
                Some("kling-3.0"),
            ),
            (
                "/omni-video/kling%2Do1;v=2",
                Product::Video,
                Some("kling%2Do1"),
            ),
            ("/v1%2Fvideos;x%2Ftext2video", Product::Video, None),
        ] {
            let route = Route::of(&Method::POST, path);
            assert_eq!(
                (route.kind, route.product, route.model),
                (RequestKind::Create, Some(product), model),
                "POST {path}"
            );
        }
        assert_eq!(
            Route::of(&Method::POST, "/omni-video/kling%2Do1;v=2").pool(),
            Some(Pool::with_model(Product::Video, "kling-o1"))
        );
        for (method, path, kind, task_id) in [
            // An endpoint that answers at once makes no task, nor one with an id after it.
            (
                Method::POST,
                "/v1/videos/identify-face;v=2",
                RequestKind::Other,
                None,
            ),
            (
                Method::POST,
                "/v1/videos/text2video;x/abc",
                RequestKind::Other,
                None,
            ),
            (
                Method::GET,
                "/account/costs;jsessionid=x",
                RequestKind::Account,
                None,
            ),
            (Method::GET, "/account;x/costs", RequestKind::Account, None),
            (Method::GET, "/tasks;jsessionid=x", RequestKind::Query, None),
            (Method::POST, "/tasks;x", RequestKind::List, None),
            (
                Method::GET,
                "/v1/videos;x/text2video/abc",
                RequestKind::Query,
                Some("abc"),
            ),
            (
                Method::GET,
                "/v1/videos/text2video/abc;x",
                RequestKind::Query,
                Some("abc"),
            ),
            (Method::GET, "/v1/videos;p/tasks", RequestKind::List, None),
            // An escaped `;` is data, as Tomcat reads it (it removes parameters first).
            (
                Method::POST,
                "/v1/videos%3Bx/text2video",
                RequestKind::Other,
                None,
            ),
        ] {
            let route = Route::of(&method, path);
            assert_eq!(
                (route.kind, route.task_id),
                (kind, task_id),
                "{method} {path}"
            );
        }
    }

    /// A path that is no Kling path as written and one with its `%2F`s read as `/`s (as nginx
    /// and Envoy read it before routing) is read so: the account request is held to its class
    /// quota, a lookup's answer frees slots.
    #[test]
    fn a_path_that_is_one_only_with_its_escaped_slashes_read_is_read_so() {
        for path in [
            "/account%2Fcosts",
            "/account%2fcosts/",
            "/proxy/v1%2Faccount%2Fcosts",
            "/account%2F%63osts",
        ] {
            for method in [Method::GET, Method::POST] {
                assert_eq!(
                    Route::of(&method, path).kind,
                    RequestKind::Account,
                    "{method} {path}"
                );
            }
        }
        let route = Route::of(&Method::GET, "/v1%2Fvideos%2Ftext2video/abc");
        assert_eq!(
            (route.kind, route.task_id),
            (RequestKind::Query, Some("abc"))
        );
        let route = Route::of(&Method::GET, "/v1%2Fvideos%2Ftext2video");
        assert_eq!(route.kind, RequestKind::List);
        assert_eq!(
            Route::of(&Method::GET, "/x%2Ftasks").kind,
            RequestKind::Query
        );
        // Something as written stays that: an id that holds a `%2F`, a list.
        let route = Route::of(&Method::GET, "/v1/videos/text2video/a%2Fb");
        assert_eq!(
            (route.kind, route.task_id),
            (RequestKind::Query, Some("a%2Fb"))
        );
        assert_eq!(
            Route::of(&Method::GET, "/v1/videos/text2video%2Fabc").kind,
            RequestKind::List
        );
    }

    /// Writing a path another way that a normalizing server reads as the same (a `.` or
    /// `x/..` segment anywhere, an escaped letter or digit in either case) never changes what
    /// it is, for every path of up to three words.
    #[test]
    fn a_path_written_another_way_is_recognised_as_the_same() {
        type Seen = (
            RequestKind,
            Option<ApiGeneration>,
            Option<Product>,
            Option<Pool>,
            Option<String>,
            bool,
        );
        fn seen(method: &Method, path: &str) -> Seen {
            let route = Route::of(method, path);
            let task_id = route.task_id.map(|id| unreserved_decoded(id).into_owned());
            (
                route.kind,
                route.generation,
                route.product,
                route.pool(),
                task_id,
                route.answers_at_once,
            )
        }
        let mut paths: Vec<Vec<&str>> = vec![vec![]];
        let mut checked = 0;
        for _ in 0..3 {
            paths = paths
                .iter()
                .flat_map(|p| WORDS.iter().map(move |w| [p.clone(), vec![*w]].concat()))
                .collect();
            for path in &paths {
                let mut others = Vec::new();
                for at in 0..=path.len() {
                    for inserted in [".", "x/..", "%2e", "%2E/", "a/%2E%2e", ";", "x/..;p"] {
                        let mut other = path.clone();
                        other.insert(at, inserted);
                        others.push(other.join("/"));
                    }
                }
                for at in 0..path.len() {
                    for hex in [
                        format!("%{:x}", path[at].as_bytes()[0]),
                        format!("%{:X}", path[at].as_bytes()[0]),
                    ] {
                        let mut other: Vec<String> = path.iter().map(|w| w.to_string()).collect();
                        other[at] = format!("{hex}{}", &path[at][1..]);
                        others.push(other.join("/"));
                    }
                    // Parameters after a segment, which Tomcat removes.
                    for params in [";jsessionid=1", ";", ";a=b;c"] {
                        let mut other: Vec<String> = path.iter().map(|w| w.to_string()).collect();
                        other[at].push_str(params);
                        others.push(other.join("/"));
                    }
                }
                let written = format!("/{}", path.join("/"));
                for method in [Method::GET, Method::POST] {
                    let expected = seen(&method, &written);
                    for other in &others {
                        assert_eq!(
                            seen(&method, &format!("/{other}")),
                            expected,
                            "{method} /{other}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 300_000, "{checked}");
    }

    /// A small deterministic generator (xorshift64*) for the fuzz-like tests: the same cases
    /// on every run.
    struct Xorshift(u64);

    impl Xorshift {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let n = u64::try_from(n).expect("small");
            usize::try_from(self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n).expect("below n")
        }
    }

    /// No path panics, whatever its escapes, dots, parameters and characters of several bytes
    /// (an escaped letter before one, `%41é`, did), and the model and task id are parts of it.
    #[test]
    fn no_path_panics() {
        const PIECES: [&str; 36] = [
            "/",
            "//",
            "%",
            "%2F",
            "%2f",
            "%41",
            "%4",
            "%é",
            "%2E",
            "%2e%2E",
            ".",
            "..",
            ";",
            ";x=1",
            "é",
            "你",
            "\u{1F600}",
            "v1",
            "videos",
            "images",
            "text2video",
            "editing",
            "avatar",
            "expand",
            "tasks",
            "account",
            "costs",
            "text-to-video",
            "kling-3.0",
            "identify-face",
            "%E4%BD%A0",
            "a",
            "1",
            "%25",
            "%3B",
            "~",
        ];
        let mut random = Xorshift(0x9e37_79b9_7f4a_7c15);
        let check = |path: &str| {
            for method in [Method::GET, Method::POST] {
                let route = Route::of(&method, path);
                let _ = route.pool();
                let range = path.as_ptr() as usize..=path.as_ptr() as usize + path.len();
                for part in [route.model, route.task_id].into_iter().flatten() {
                    assert!(range.contains(&(part.as_ptr() as usize)), "{path:?}");
                }
            }
        };
        check("/v1/%41é");
        check("/v1/videos/text2video/%41%42你");
        for _ in 0..20_000 {
            let mut path = String::from("/");
            for _ in 0..random.below(12) {
                path.push_str(PIECES[random.below(PIECES.len())]);
            }
            check(&path);
            // Random bytes, read as a path is (a `Uri`'s path is UTF-8).
            const BYTES: &[u8] = b"/%;.2Fa\xc3\xa9";
            let bytes: Vec<u8> = (0..random.below(24))
                .map(|_| BYTES[random.below(BYTES.len())])
                .collect();
            check(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn read_path_gives_each_reading_as_text() {
        let readings = |path| {
            [(false, false), (false, true), (true, false), (true, true)]
                .map(|(unescape, merge)| Route::read_path(path, unescape, merge))
        };
        // A path read as written is its own reading, with or without a leading `/`.
        for path in ["/v1/videos/text2video", "v1/videos/x", "/a.b/%3A/é", ""] {
            assert_eq!(readings(path), [path; 4].map(String::from), "{path}");
        }
        for (path, expected) in [
            (
                "/v1;a=b/videos;c/text2video;d/",
                ["/v1/videos/text2video"; 4],
            ),
            ("//v1//videos///text2video//", ["/v1/videos/text2video"; 4]),
            (
                "v1/%76ideos/./x/../text2vide%6F",
                ["v1/videos/text2video"; 4],
            ),
            ("/v1/videos/x/..;/%zz%4é", ["/v1/videos/%zz%4é"; 4]),
            (
                "/v1/videos%2Ftext2video%2f",
                [
                    "/v1/videos%2Ftext2video%2f",
                    "/v1/videos%2Ftext2video%2f",
                    "/v1/videos/text2video",
                    "/v1/videos/text2video",
                ],
            ),
            // RFC 3986 removes the empty segment before a `..`; merging `//`s first, the one
            // before that.
            ("/a/b//../c", ["/a/b/c", "/a/c", "/a/b/c", "/a/c"]),
            (
                "/a/b%2F%2F%2E%2E/c",
                ["/a/b%2F%2F../c", "/a/b%2F%2F../c", "/a/b/c", "/a/c"],
            ),
            ("/..;x/../..", [""; 4]),
        ] {
            assert_eq!(readings(path), expected.map(String::from), "{path}");
        }
    }

    /// Whatever [`Route::of`] reads a path with a `%`, a `;` or dot segments as (a create or a
    /// query), one of [`Route::read_path`]'s readings of it is read so too, with the model and
    /// task id it gives decoded: callers that key a create by its path (the slots) take that
    /// text.
    #[test]
    fn route_of_takes_one_of_the_readings_read_path_gives() {
        // Kling paths with other separators, parameters, escapes and dot segments in them. No
        // lone `%` before an escape: a reading's text would decode again (`%%374` is `%74`
        // read once and `t` read twice).
        const PATHS: [&[&str]; 6] = [
            &["v1", "videos", "text2video"],
            &["p", "v1", "videos", "text2video", "abc"],
            &["v1", "videos", "avatar", "image2video", "v1"],
            &["v1", "videos", "identify-face"],
            &["k", "text-to-video", "kling-3.0"],
            &["v1", "images", "kolors-virtual-try-on"],
        ];
        const SEPARATORS: [&str; 12] = [
            "/",
            "/",
            "/",
            "//",
            "%2F",
            "%2f",
            "/./",
            "/x/../",
            "/%2e/",
            "/a/%2E%2e/",
            "//../",
            "/..;/",
        ];
        const SUFFIXES: [&str; 8] = ["", "", "", ";x=1", ";", "%2F", "%3B", "%25"];
        let mut random = Xorshift(0x2545_f491_4f6c_dd1d);
        let mut checked = 0;
        for _ in 0..20_000 {
            let mut path = String::new();
            for segment in PATHS[random.below(PATHS.len())] {
                path.push_str(SEPARATORS[random.below(SEPARATORS.len())]);
                if random.below(4) == 0 {
                    // Its first letter escaped.
                    path.push_str(&format!("%{:X}", segment.as_bytes()[0]));
                    path.push_str(&segment[1..]);
                } else {
                    path.push_str(segment);
                }
                path.push_str(SUFFIXES[random.below(SUFFIXES.len())]);
            }
            for method in [Method::GET, Method::POST] {
                let route = Route::of(&method, &path);
                if !matches!(route.kind, RequestKind::Create | RequestKind::Query) {
                    continue;
                }
                let decoded = |part: Option<&str>| part.map(|p| unreserved_decoded(p).into_owned());
                let expected = (
                    route.kind,
                    route.generation,
                    route.product,
                    decoded(route.model),
                    decoded(route.task_id),
                );
                let found = [(false, false), (false, true), (true, false), (true, true)]
                    .into_iter()
                    .any(|(unescape, merge)| {
                        let text = Route::read_path(&path, unescape, merge);
                        let read = Route::of(&method, &text);
                        let read = (
                            read.kind,
                            read.generation,
                            read.product,
                            read.model.map(String::from),
                            read.task_id.map(String::from),
                        );
                        read == expected
                    });
                assert!(found, "{method} {path}: {expected:?}");
                checked += 1;
            }
        }
        assert!(checked > 5_000, "{checked}");
    }

    #[test]
    fn only_a_create_has_a_pool() {
        let pool = |method, path| Route::of(&method, path).pool().map(|p| p.to_string());
        assert_eq!(
            pool(Method::POST, "/v1/images/generations").as_deref(),
            Some("image")
        );
        assert_eq!(
            pool(Method::POST, "/omni-video/kling-o1").as_deref(),
            Some("video:kling-o1")
        );
        assert_eq!(pool(Method::GET, "/v1/images/generations"), None);
        assert_eq!(pool(Method::POST, "/tasks"), None);
    }
}
