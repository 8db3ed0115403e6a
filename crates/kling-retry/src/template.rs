//! The copy of a request the retry layer keeps to send again.
//!
//! Every call makes one and almost every call drops it unused, so it is built for that: one
//! allocation (the box, which also keeps the response future small for the layers above to
//! move) instead of `http::HeaderMap`'s two and `http::Extensions`' three. A retry, rare, puts
//! the request back together first ([`Template::request`]).

use http::{HeaderName, HeaderValue, Request};
use kling_core::signals::CallSignals;

/// Most header values kept inline; a request with more keeps a `HeaderMap` copy.
const INLINE_HEADERS: usize = 6;

/// A request to send again: see the [module docs](self).
pub(crate) struct Template<B> {
    /// Method, URI, version, body; the headers and the account once [`restore`](Self::restore)d.
    request: Request<B>,
    /// The header values in `HeaderMap::iter` order, until restored.
    headers: [Option<(HeaderName, HeaderValue)>; INLINE_HEADERS],
    /// The per-call signals to put back, when they were the request's only extension (the
    /// extensions were then not copied).
    signals: Option<CallSignals>,
    restored: bool,
}

impl<B: Clone> Template<B> {
    /// A copy of `request`.
    ///
    /// When the request's only extension holds the per-call signals (the deadline and attempt
    /// each attempt sets anew, the account, the cached recognition), the copy keeps just them
    /// (no allocation) and a retry puts them back. Any other extension is copied as it is.
    pub(crate) fn new(request: &Request<B>) -> Box<Self> {
        // Filled in place: built on the stack and moved, it would be copied into the box.
        let mut template = Box::new(Template {
            request: Request::new(request.body().clone()),
            headers: [const { None }; INLINE_HEADERS],
            signals: None,
            restored: false,
        });
        let copy = &mut template.request;
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        if request.headers().len() <= INLINE_HEADERS {
            for (slot, (name, value)) in template.headers.iter_mut().zip(request.headers()) {
                *slot = Some((name.clone(), value.clone()));
            }
        } else {
            *copy.headers_mut() = request.headers().clone();
        }
        match CallSignals::if_alone(request.extensions()) {
            Some(signals) => template.signals = Some(signals),
            None => *template.request.extensions_mut() = request.extensions().clone(),
        }
        template
    }
}

impl<B> Template<B> {
    /// The request as the caller sent it (headers, extensions and account back in place).
    pub(crate) fn request(&mut self) -> &mut Request<B> {
        if !self.restored {
            self.restore();
        }
        &mut self.request
    }

    #[cold]
    fn restore(&mut self) {
        self.restored = true;
        for (name, value) in self.headers.iter_mut().map_while(Option::take) {
            self.request.headers_mut().append(name, value);
        }
        if let Some(signals) = self.signals.take() {
            signals.restore(&mut self.request);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::header::{ACCEPT, CONTENT_TYPE};
    use http::{Method, Version};
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
            .header("x-custom", "c")
            .body(Full::new(Bytes::from_static(br#"{"prompt":"cat"}"#)))
            .unwrap();
        AccountId::set_if_absent(&mut request, &AccountId::new("acct"));
        Recognized::of(&mut request);
        request
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
        let mut template = Template::new(&original);
        assert!(template.request.extensions().is_empty(), "not copied");
        assert!(template.request.headers().is_empty(), "kept inline");
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
    fn a_foreign_extension_is_copied_with_the_signals() {
        let mut original = request();
        original.extensions_mut().insert(Foreign(7));
        let mut template = Template::new(&original);
        let restored = template.request();
        assert_same_request(restored, &original);
        assert_eq!(restored.extensions().get::<Foreign>(), Some(&Foreign(7)));
        assert!(Recognized::cached(restored).is_some());

        // Alone, it is copied too (it is no signal).
        let mut original = Request::new(Full::new(Bytes::new()));
        original.extensions_mut().insert(Foreign(8));
        let mut template = Template::new(&original);
        assert_eq!(
            template.request().extensions().get::<Foreign>(),
            Some(&Foreign(8))
        );
    }

    #[test]
    fn many_headers_are_copied_as_a_map() {
        let mut original = request();
        for i in 0..INLINE_HEADERS {
            original
                .headers_mut()
                .append("x-many", HeaderValue::from(i));
        }
        let mut template = Template::new(&original);
        assert_eq!(template.request.headers(), original.headers());
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
            let mut template = Template::new(&original);
            let restored = template.request();
            prop_assert_eq!(restored.headers(), original.headers());
            prop_assert_eq!(restored.method(), original.method());
        }
    }
}
