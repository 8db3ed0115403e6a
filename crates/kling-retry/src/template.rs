//! The copy of a request the retry layer keeps to send again.
//!
//! Every call makes one and almost every call drops it unused, so it is built for that: one
//! allocation (the box, which also keeps the response future small for the layers above to
//! move) instead of `http::HeaderMap`'s two and `http::Extensions`' three, and filled in place
//! in that box. A retry, rare, puts the request back together first ([`Template::request`]).

use http::{Extensions, Method, Request, Uri, Version};
use kling_core::headers::HeaderCopy;
use kling_core::signals::CallSignals;
use tokio::time::Instant;

use crate::body::ReplayBody;
use crate::lookup::Spliced;

/// A request to send again, and the call's start and deadline (kept here rather than in the
/// response future, which every layer above moves): see the [module docs](self).
pub(crate) struct Template<B> {
    pub(crate) started: Instant,
    pub(crate) deadline: Option<Instant>,
    /// Beside `kept`, not in it: written slot by slot in the box, not built aside and moved in.
    headers: HeaderCopy,
    kept: Kept<B>,
}

/// The request, in pieces until a retry needs it whole: an empty `Request` costs its
/// construction and its drop on every call.
enum Kept<B> {
    Parts(Parts<B>),
    Whole(Request<B>),
    /// Only while [`Template::request`] swaps the one for the other.
    Taken,
}

struct Parts<B> {
    method: Method,
    uri: Uri,
    version: Version,
    /// The body as sent, or the caller's body and the generated id the sent one holds.
    body: Result<B, (B, Spliced)>,
    /// The per-call signals to put back, when they were the request's only extension (the
    /// extensions were then not copied); else the extensions copied whole.
    extensions: Result<CallSignals, Extensions>,
}

impl<B: ReplayBody> Template<B> {
    /// A copy of `request`, with the call's start and deadline; `spliced`: the caller's body
    /// and the generated id written into the request's (the body is then not copied).
    ///
    /// When the request's only extension holds the per-call signals (the deadline and attempt
    /// each attempt sets anew, the account, the cached recognition), the copy keeps just them
    /// (no allocation) and a retry puts them back. Any other extension is copied as it is.
    pub(crate) fn new(
        request: &Request<B>,
        started: Instant,
        deadline: Option<Instant>,
        spliced: Option<(B, Spliced)>,
    ) -> Box<Self> {
        let parts = Parts {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            body: match spliced {
                Some(spliced) => Err(spliced),
                None => Ok(request.body().clone()),
            },
            extensions: match CallSignals::if_alone(request.extensions()) {
                Some(signals) => Ok(signals),
                None => Err(request.extensions().clone()),
            },
        };
        let mut template = Box::new(Template {
            started,
            deadline,
            headers: HeaderCopy::EMPTY,
            kept: Kept::Parts(parts),
        });
        // In place: `HeaderCopy::of`'s value would be copied again on its way into the box.
        template.headers.fill(request.headers());
        template
    }
}

impl<B: ReplayBody> Template<B> {
    /// The request as the first attempt sent it (headers, extensions and account back in place).
    pub(crate) fn request(&mut self) -> &mut Request<B> {
        if !matches!(self.kept, Kept::Whole(_)) {
            self.restore();
        }
        match &mut self.kept {
            Kept::Whole(request) => request,
            _ => unreachable!("restored above"),
        }
    }

    #[cold]
    fn restore(&mut self) {
        let Kept::Parts(parts) = std::mem::replace(&mut self.kept, Kept::Taken) else {
            unreachable!("a template is restored once")
        };
        let Parts {
            method,
            uri,
            version,
            body,
            extensions,
        } = parts;
        let body = match body {
            Ok(body) => body,
            Err((original, spliced)) => spliced.body(&original),
        };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = version;
        *request.headers_mut() = self.headers.take();
        match extensions {
            Ok(signals) => signals.restore(&mut request),
            Err(extensions) => *request.extensions_mut() = extensions,
        }
        self.kept = Kept::Whole(request);
    }
}

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
        let mut template = Template::new(&original, Instant::now(), None, None);
        let Kept::Parts(parts) = &template.kept else {
            panic!("kept in parts")
        };
        assert!(parts.extensions.is_ok(), "not copied");
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
        let mut template = Template::new(&sent, Instant::now(), None, Some(spliced));
        let Kept::Parts(parts) = &template.kept else {
            panic!("kept in parts")
        };
        assert!(
            parts.body.is_err(),
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
        let mut template = Template::new(&original, Instant::now(), None, None);
        let restored = template.request();
        assert_same_request(restored, &original);
        assert_eq!(restored.extensions().get::<Foreign>(), Some(&Foreign(7)));
        assert!(Recognized::cached(restored).is_some());

        // Alone, it is copied too (it is no signal).
        let mut original = Request::new(Full::new(Bytes::new()));
        original.extensions_mut().insert(Foreign(8));
        let mut template = Template::new(&original, Instant::now(), None, None);
        assert_eq!(
            template.request().extensions().get::<Foreign>(),
            Some(&Foreign(8))
        );
    }

    #[test]
    fn many_headers_are_copied_as_a_map() {
        let mut original = request();
        for i in 0..6 {
            original
                .headers_mut()
                .append("x-many", HeaderValue::from(i));
        }
        let mut template = Template::new(&original, Instant::now(), None, None);
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
            let mut template = Template::new(&original, Instant::now(), None, None);
            let restored = template.request();
            prop_assert_eq!(restored.headers(), original.headers());
            prop_assert_eq!(restored.method(), original.method());
        }
    }
}
