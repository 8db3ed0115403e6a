//! The copy of a request the retry layer keeps to send again.
//!
//! Every call makes one and almost every call drops it unused, so it is built for that: it
//! lives in the response future's one allocation (beside the attempt in flight), with no
//! allocation of its own instead of `http::HeaderMap`'s two and `http::Extensions`' three,
//! written in place there (built aside, it would be copied in whole), and holds only what a
//! resend needs: the request's parts, a few headers inline, the generated id's 16 bytes. What
//! is rare is boxed apart: many headers, an extension method, the request put back together
//! for a retry ([`Template::request`]).
//!
//! It is kept small because that allocation is: glibc's allocator serves a block of up to
//! 1,032 bytes from a per-thread cache, and a larger one from its arena's bins, about 180
//! instructions more per call for the `malloc` and the `free` (and a lock of the arena on each
//! `free`). The Pro stack's allocation (this template, the call's state and the attempt's future)
//! was 1,056 bytes with a 560-byte template.

use bytes::Bytes;
use http::{Method, Request, Uri, Version};
use kling_core::headers::HeaderCopy;
use kling_core::signals::ExtensionsCopy;
use tokio::time::Instant;

use crate::body::ReplayBody;
use crate::lookup::Spliced;

/// A request to send again, and the call's start and deadline: see the [module docs](self).
pub(crate) struct Template<B> {
    pub(crate) started: Instant,
    pub(crate) deadline: Option<Instant>,
    /// The method's index in [`METHODS`] (one byte, where an `http::Method` is 24); unused
    /// for an extension method, which `other_method` holds.
    method: u8,
    other_method: Option<Box<Method>>,
    uri: UriCopy,
    version: Version,
    /// The body as sent, or the caller's body when `spliced` holds the generated id the sent
    /// one has (the rewritten body is then not kept).
    body: B,
    spliced: Option<Spliced>,
    /// The extensions to put back: the per-call signals alone when they were the request's
    /// only extension, else the extensions copied whole.
    extensions: ExtensionsCopy,
    headers: Headers,
    /// The request put back together, at the first retry.
    whole: Option<Box<Request<B>>>,
}

impl<B: ReplayBody> Template<B> {
    /// A copy of `request`, with the call's start and deadline; `spliced`: the caller's body
    /// and the generated id written into the request's (the body is then not copied).
    ///
    /// When the request's only extension holds the per-call signals (the deadline and attempt
    /// each attempt sets anew, the account, the cached recognition), the copy keeps just them
    /// (no allocation) and a retry puts them back. Any other extension is copied as it is.
    ///
    /// Inlined, so it is written where the caller puts it (see
    /// [`ResponseFuture`](crate::future::ResponseFuture)), not built aside and copied there;
    /// the URI and the headers follow with [`copy_in_place`](Self::copy_in_place).
    #[inline(always)]
    pub(crate) fn new(
        request: &Request<B>,
        started: Instant,
        deadline: Option<Instant>,
        spliced: Option<(B, Spliced)>,
    ) -> Self {
        let (body, spliced) = match spliced {
            Some((original, spliced)) => (original, Some(spliced)),
            None => (request.body().clone(), None),
        };
        let (method, other_method) = match METHODS.iter().position(|m| m == request.method()) {
            Some(index) => (index as u8, None),
            None => (0, Some(Box::new(request.method().clone()))),
        };
        Template {
            started,
            deadline,
            method,
            other_method,
            uri: UriCopy::EMPTY,
            version: request.version(),
            body,
            spliced,
            extensions: ExtensionsCopy::of(request.extensions()),
            headers: Headers::empty(),
            whole: None,
        }
    }

    /// Copies the URI and the headers of `request` (the one [`new`](Self::new) copied), in
    /// place: returned by value, the URI's text was copied twice more on its way into the box.
    pub(crate) fn copy_in_place(&mut self, request: &Request<B>) {
        self.uri.fill(request.uri());
        self.headers.fill(request.headers());
    }

    /// The request as the first attempt sent it (headers, extensions and account back in place).
    /// Whether the create's external id is one this layer generated (fresh for the call: no
    /// earlier call can have used it).
    pub(crate) fn generated_id(&self) -> bool {
        self.spliced.is_some()
    }

    pub(crate) fn request(&mut self) -> &mut Request<B> {
        if self.whole.is_none() {
            self.whole = Some(Box::new(self.restore()));
        }
        self.whole.as_deref_mut().expect("restored above")
    }

    #[cold]
    fn restore(&self) -> Request<B> {
        let body = match &self.spliced {
            None => self.body.clone(),
            Some(spliced) => spliced.body(&self.body),
        };
        let mut request = Request::new(body);
        *request.method_mut() = match &self.other_method {
            Some(method) => Method::clone(method),
            None => METHODS[usize::from(self.method)].clone(),
        };
        *request.uri_mut() = self.uri.to_uri();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.to_map();
        self.extensions.restore(&mut request);
        request
    }
}

impl<B> Template<B> {
    /// The watch the request carried when copied ([`SendWatch`](kling_core::signals::SendWatch)):
    /// for a create given a generated id, the service puts one in first.
    pub(crate) fn send_watch(&self) -> Option<&kling_core::signals::SendWatch> {
        self.extensions.send_watch()
    }

    /// The external id this layer generated for the create, if it did.
    pub(crate) fn generated_external_id(&self) -> Option<String> {
        self.spliced.as_ref().map(Spliced::id)
    }
}

/// The methods a template keeps as their index: the standard ones (every method Kling's API
/// uses among them), the commonest first.
static METHODS: [Method; 9] = [
    Method::POST,
    Method::GET,
    Method::DELETE,
    Method::PUT,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];

/// The longest relative URI kept as its text.
const SHORT_URI: usize = 80;

/// The request's URI as copied: a short relative one (a path and query, as the stack's
/// callers send) as its text, any other as the URI. A URI parsed from text (which
/// `Request::get("/v1/…")` does too) holds a buffer whose first clone allocates to share it,
/// and a shared one's every clone writes a reference count: a copy of its text does neither,
/// and is parsed again only for a retry.
enum UriCopy {
    Short { len: u8, text: [u8; SHORT_URI] },
    Whole(Uri),
}

impl UriCopy {
    /// An empty copy, to [`fill`](Self::fill) in place.
    const EMPTY: UriCopy = UriCopy::Short {
        len: 0,
        text: [0; SHORT_URI],
    };

    /// Copies `uri` into `self`, which must be [`EMPTY`](Self::EMPTY).
    #[inline]
    fn fill(&mut self, uri: &Uri) {
        if uri.scheme().is_none() && uri.authority().is_none() {
            let text = uri.path_and_query().map_or("", |pq| pq.as_str()).as_bytes();
            // Only origin-form text ("/…") is sure to parse back as the same path and query
            // (not "*", say): others whole.
            if text.first() == Some(&b'/')
                && text.len() <= SHORT_URI
                && let UriCopy::Short { len, text: copy } = self
            {
                copy[..text.len()].copy_from_slice(text);
                *len = text.len() as u8;
                return;
            }
        }
        *self = UriCopy::Whole(uri.clone());
    }

    fn to_uri(&self) -> Uri {
        match self {
            UriCopy::Whole(uri) => uri.clone(),
            UriCopy::Short { len, text } => {
                Uri::from_maybe_shared(Bytes::copy_from_slice(&text[..usize::from(*len)]))
                    .expect("the text of a URI parses back")
            }
        }
    }
}

/// The most header values kept inline: a Kling request at the retry layer carries one to three
/// (`Content-Type`, perhaps `Authorization` and one of the caller's), and every slot is 72 bytes
/// of the template written on every call.
const INLINE: usize = 3;

/// The template's copy of the request's headers.
type Headers = HeaderCopy<INLINE>;

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::header::{ACCEPT, CONTENT_TYPE};
    use http::{HeaderValue, Method, Version};
    use http_body_util::Full;
    use kling_core::PeekBody;
    use proptest::prelude::*;

    use kling_core::{AccountId, Recognized};

    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Foreign(u32);

    fn request() -> Request<Full<Bytes>> {
        let mut request = Request::post("https://h/v1/videos/text2video?x=1")
            .version(Version::HTTP_2)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "a")
            .header(ACCEPT, "b")
            .body(Full::new(Bytes::from_static(br#"{"prompt":"cat"}"#)))
            .unwrap();
        AccountId::set_if_absent(&mut request, &AccountId::new("acct"));
        Recognized::of(&mut request);
        request
    }

    /// A template as `Retry::call` makes it: the parts, then the headers.
    fn copy(
        request: &Request<Full<Bytes>>,
        spliced: Option<(Full<Bytes>, Spliced)>,
    ) -> Template<Full<Bytes>> {
        let mut template = Template::new(request, Instant::now(), None, spliced);
        template.copy_in_place(request);
        template
    }

    fn assert_same_request(copy: &Request<Full<Bytes>>, original: &Request<Full<Bytes>>) {
        assert_eq!(copy.method(), original.method());
        assert_eq!(copy.uri(), original.uri());
        assert_eq!(copy.version(), original.version());
        assert_eq!(copy.headers(), original.headers());
        assert_eq!(copy.body().peek_bytes(), original.body().peek_bytes());
        assert_eq!(AccountId::of(copy), AccountId::of(original));
    }

    #[test]
    fn a_request_with_only_signals_is_restored_with_its_account_and_no_copied_extension() {
        let original = request();
        let mut template = copy(&original, None);
        assert!(template.extensions.signals_only(), "not copied");
        assert!(template.headers.is_inline(), "kept inline");
        let restored = template.request();
        assert_same_request(restored, &original);
        assert_eq!(
            Recognized::of(restored),
            Recognized::cached(&original).unwrap()
        );
        // Restoring twice changes nothing.
        let again = template.request().clone();
        assert_same_request(&again, &original);
    }

    #[test]
    fn a_create_given_an_id_is_restored_with_the_body_it_sent() {
        let mut sent = request();
        let rng = crate::rng::SplitMix::seeded(5);
        let spliced = crate::lookup::add_generated_id(&mut sent, &rng).expect("an id");
        let mut template = copy(&sent, Some(spliced));
        assert!(template.spliced.is_some());
        assert_eq!(
            template.body.peek_bytes(),
            br#"{"prompt":"cat"}"#.as_slice(),
            "the caller's body kept, not the rewritten one"
        );
        let restored = template.request();
        assert_same_request(restored, &sent);
        assert!(
            String::from_utf8_lossy(&restored.body().peek_bytes())
                .starts_with(r#"{"external_task_id":"kr-"#)
        );
        assert_eq!(
            Recognized::of(restored).external_id,
            Recognized::cached(&sent).unwrap().external_id
        );
    }

    #[test]
    fn a_foreign_extension_is_copied_with_the_signals() {
        let mut original = request();
        original.extensions_mut().insert(Foreign(7));
        let mut template = copy(&original, None);
        let restored = template.request();
        assert_same_request(restored, &original);
        assert_eq!(restored.extensions().get::<Foreign>(), Some(&Foreign(7)));
        assert!(Recognized::cached(restored).is_some());

        // Alone, it is copied too (it is no signal).
        let mut original = Request::new(Full::new(Bytes::new()));
        original.extensions_mut().insert(Foreign(8));
        let mut template = copy(&original, None);
        assert_eq!(
            template.request().extensions().get::<Foreign>(),
            Some(&Foreign(8))
        );
    }

    proptest! {
        /// A relative URI comes back equal, however it was kept.
        #[test]
        fn a_uri_comes_back_the_same(
            path in "(/[a-zA-Z0-9_.~%-]{0,30}){1,4}",
            query in proptest::option::of("[a-z_]{1,12}=[a-zA-Z0-9,%]{0,60}"),
        ) {
            let text = match &query {
                Some(query) => format!("{path}?{query}"),
                None => path.clone(),
            };
            let uri: Uri = text.parse().unwrap();
            let mut copy = UriCopy::EMPTY;
            copy.fill(&uri);
            prop_assert_eq!(matches!(copy, UriCopy::Short { .. }), text.len() <= SHORT_URI);
            prop_assert_eq!(copy.to_uri(), uri);
        }
    }

    #[test]
    fn absolute_and_odd_uris_are_kept_whole() {
        for text in ["https://h/api/tasks?task_ids=a", "*", "http://h:9"] {
            let uri: Uri = text.parse().unwrap();
            let mut copy = UriCopy::EMPTY;
            copy.fill(&uri);
            assert!(matches!(copy, UriCopy::Whole(_)), "{text}");
            assert_eq!(copy.to_uri(), uri);
        }
    }

    #[test]
    fn the_template_stays_small() {
        // Written on every call: the parts, three header slots, the signals (was 736 bytes;
        // 528 since the signals carry the metrics layer's send counter, 560 since they carry
        // the task slots' halt gate; 520 with the method and the generated id's field as a
        // byte each). The Pro stack's call allocation holds it: see the module docs.
        let size = std::mem::size_of::<Template<Full<Bytes>>>();
        assert!(size <= 520, "{size} bytes");
    }

    #[test]
    fn every_method_comes_back_the_same() {
        let extensions = [
            Method::from_bytes(b"PURGE").unwrap(),
            Method::from_bytes(b"A-LONG-EXTENSION-METHOD").unwrap(),
        ];
        for method in METHODS.iter().chain(&extensions) {
            let mut original = request();
            *original.method_mut() = method.clone();
            let mut template = copy(&original, None);
            assert_eq!(
                template.other_method.is_some(),
                extensions.contains(method),
                "{method}"
            );
            assert_same_request(template.request(), &original);
        }
    }

    #[test]
    fn three_headers_are_kept_inline_and_a_fourth_as_a_map() {
        let mut original = request();
        assert_eq!(original.headers().len(), INLINE);
        let mut template = copy(&original, None);
        assert!(template.headers.is_inline());
        assert_same_request(template.request(), &original);

        original
            .headers_mut()
            .insert("x-custom", HeaderValue::from_static("c"));
        let mut template = copy(&original, None);
        assert!(!template.headers.is_inline());
        assert_same_request(template.request(), &original);
    }

    #[test]
    fn many_headers_are_copied_as_a_map() {
        let mut original = request();
        for i in 0..6 {
            original
                .headers_mut()
                .append("x-many", HeaderValue::from(i));
        }
        let mut template = copy(&original, None);
        assert!(!template.headers.is_inline());
        assert_same_request(template.request(), &original);
    }

    proptest! {
        /// Whatever the headers (repeated names, any count), the restored copy has the same.
        #[test]
        fn the_restored_headers_equal_the_original(
            headers in prop::collection::vec(
                (prop::sample::select(vec!["accept", "x-a", "x-b", "content-type"]), 0u32..4),
                0..10,
            ),
            method in prop::sample::select(vec![Method::GET, Method::POST]),
        ) {
            let mut original = Request::new(Full::new(Bytes::from_static(b"{}")));
            *original.method_mut() = method;
            for (name, value) in headers {
                original.headers_mut().append(name, HeaderValue::from(value));
            }
            let mut template = copy(&original, None);
            let restored = template.request();
            prop_assert_eq!(restored.headers(), original.headers());
            prop_assert_eq!(restored.method(), original.method());
        }
    }
}
