//! [`HeaderCopy`]: the headers of a request a layer may have to send again.
//!
//! A layer that can resend a request (the retry layer, an auth layer re-signing a refused
//! token) keeps a copy of it on every call, and almost every call drops that copy unused. A
//! `HeaderMap` copy allocates twice; most Kling requests carry a few headers, which fit inline.
//!
//! Short values are kept as their bytes. A `HeaderValue` made from text (`"application/json"
//! .parse()`, `Request::builder().header(..)`) holds a buffer whose first clone allocates to
//! share it, and every clone of a shared value writes a reference count; a copy of thirty
//! bytes does neither. They become a `HeaderValue` again only when the request is sent again.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

/// A copy of a request's headers, to put back when the request is sent again: up to `N` values
/// inline (no allocation; six by default), more as a `HeaderMap` copy. Repeated names and their
/// order are kept. A layer whose copy is written on every call picks a smaller `N` (each slot
/// is 72 bytes written per call).
///
/// ```
/// use http::HeaderMap;
/// use kling_core::headers::HeaderCopy;
///
/// let mut headers = HeaderMap::new();
/// headers.append("accept", "a".parse().unwrap());
/// headers.append("accept", "b".parse().unwrap());
/// let copy = HeaderCopy::of(&headers);
/// assert!(copy.is_inline());
/// assert_eq!(copy.into_map(), headers);
/// ```
///
/// `Debug` shows the names and their count, never a value (see its impl).
#[derive(Clone)]
pub struct HeaderCopy<const N: usize = 6> {
    inline: [Option<(HeaderName, Value)>; N],
    /// More than `N` values: boxed, as it is rare and a copy's size is moved around.
    map: Option<Box<HeaderMap>>,
}

impl HeaderCopy {
    /// An empty copy, to [`fill`](HeaderCopy::fill) in place (e.g. inside a box, where
    /// [`of`](HeaderCopy::of)'s return value would be copied again on its way in).
    pub const EMPTY: HeaderCopy = HeaderCopy {
        inline: [const { None }; 6],
        map: None,
    };

    /// A copy of `headers`.
    pub fn of(headers: &HeaderMap) -> HeaderCopy {
        let mut copy = HeaderCopy::EMPTY;
        copy.fill(headers);
        copy
    }
}

impl<const N: usize> HeaderCopy<N> {
    /// An empty copy, to [`fill`](HeaderCopy::fill) in place, written slot by slot where it is
    /// put (the [`EMPTY`](HeaderCopy::EMPTY) constant is copied in whole from read-only memory).
    #[inline(always)]
    pub fn empty() -> HeaderCopy<N> {
        HeaderCopy {
            inline: std::array::from_fn(|_| None),
            map: None,
        }
    }

    /// Copies `headers` into `self`, which must be empty (as [`EMPTY`](HeaderCopy::EMPTY), or
    /// after [`take`](HeaderCopy::take)).
    pub fn fill(&mut self, headers: &HeaderMap) {
        debug_assert!(
            self.map.is_none() && self.inline[0].is_none(),
            "fill an empty copy"
        );
        if headers.len() > N {
            self.map = Some(Box::new(headers.clone()));
            return;
        }
        for (slot, (name, value)) in self.inline.iter_mut().zip(headers) {
            *slot = Some((name.clone(), Value::of(value)));
        }
    }

    /// Whether the values are kept inline (the copy allocated nothing).
    pub fn is_inline(&self) -> bool {
        self.map.is_none()
    }

    /// The headers as they were copied, kept (for a layer that may send them more than once).
    pub fn to_map(&self) -> HeaderMap {
        if let Some(map) = &self.map {
            return (**map).clone();
        }
        let mut map = HeaderMap::new();
        for (name, value) in self.inline.iter().map_while(Option::as_ref) {
            map.append(name.clone(), value.to_value());
        }
        map
    }

    /// The headers as they were copied, leaving `self` empty.
    pub fn take(&mut self) -> HeaderMap {
        if let Some(map) = self.map.take() {
            return *map;
        }
        let mut map = HeaderMap::new();
        for (name, value) in self.inline.iter_mut().map_while(Option::take) {
            map.append(name, value.to_value());
        }
        map
    }

    /// The headers as they were copied.
    pub fn into_map(mut self) -> HeaderMap {
        self.take()
    }
}

/// The names (repeated as copied) and their count, never a value: a copy is held by types a
/// caller may log (a layer's future, its resend template), and any header may carry a
/// credential. A list of names to redact is never complete (`authorization` and `x-api-key`,
/// but also a gateway's `api-key`, a `x-auth-token`, a signature) and `set_sensitive` is
/// rarely called, so no value is shown; the request itself is where to read them.
impl<const N: usize> fmt::Debug for HeaderCopy<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderCopy")
            .field("len", &self.names().count())
            .field("inline", &self.is_inline())
            .field("names", &Names(self))
            .finish()
    }
}

impl<const N: usize> HeaderCopy<N> {
    /// The names as copied, repeated names repeated (the map's or the slots': one is empty).
    fn names(&self) -> impl Iterator<Item = &HeaderName> {
        let boxed = self
            .map
            .iter()
            .flat_map(|map| map.iter().map(|(name, _)| name));
        let inline = self.inline.iter().map_while(Option::as_ref);
        boxed.chain(inline.map(|(name, _)| name))
    }
}

/// A copy's header names, shown as a list.
struct Names<'a, const N: usize>(&'a HeaderCopy<N>);

impl<const N: usize> fmt::Debug for Names<'_, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.names()).finish()
    }
}

/// The longest value kept as its bytes.
const SHORT: usize = 30;

/// A header value as copied: see the [module docs](self).
#[derive(Clone)]
enum Value {
    Short {
        len: u8,
        bytes: [u8; SHORT],
        sensitive: bool,
    },
    Whole(HeaderValue),
}

impl Value {
    #[inline]
    fn of(value: &HeaderValue) -> Value {
        let text = value.as_bytes();
        if text.len() <= SHORT {
            // Padded with spaces (a byte values accept) to 32, so the check below runs over a
            // fixed-size array: a few vector compares instead of a loop per byte.
            let mut padded = [b' '; 32];
            padded[..text.len()].copy_from_slice(text);
            // The bytes `HeaderValue::from_bytes` accepts, so that they make a value again
            // (one made without the check may hold others: it is kept whole).
            let refused = padded.iter().fold(0u8, |refused, &b| {
                refused | (u8::from(b < b' ') & u8::from(b != b'\t')) | u8::from(b == 0x7f)
            });
            if refused == 0 {
                let mut bytes = [0; SHORT];
                bytes.copy_from_slice(&padded[..SHORT]);
                return Value::Short {
                    len: text.len() as u8,
                    bytes,
                    sensitive: value.is_sensitive(),
                };
            }
        }
        Value::Whole(value.clone())
    }

    fn to_value(&self) -> HeaderValue {
        match self {
            Value::Whole(value) => value.clone(),
            Value::Short {
                len,
                bytes,
                sensitive,
            } => {
                let mut value = HeaderValue::from_bytes(&bytes[..usize::from(*len)])
                    .expect("only bytes a header value accepts are kept");
                value.set_sensitive(*sensitive);
                value
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// `Debug` of a copy shows no header value: a caller's credential nobody marked sensitive
    /// (`Authorization`, `x-api-key`, a cookie), short or long, inline or boxed, is not in it;
    /// the names and their count are.
    #[test]
    fn debug_shows_no_credential_inline_or_boxed() {
        let mut headers = HeaderMap::new();
        headers.append("authorization", "Bearer s3cret".parse().unwrap());
        headers.append("x-api-key", "s3cret-key".parse().unwrap());
        headers.append("cookie", "session=s3cret".parse().unwrap());
        let long = format!("Bearer s3cret{}", "x".repeat(40));
        headers.append("proxy-authorization", long.parse().unwrap());
        headers.append("content-type", "application/json".parse().unwrap());
        let inline = HeaderCopy::of(&headers);
        assert!(inline.is_inline());
        let mut boxed = HeaderCopy::<3>::empty();
        boxed.fill(&headers);
        assert!(!boxed.is_inline());
        for shown in [format!("{inline:?}"), format!("{boxed:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(
                !shown.contains("application/json"),
                "no value at all: {shown}"
            );
            assert!(shown.contains("\"authorization\""), "{shown}");
            assert!(shown.contains("\"content-type\""), "{shown}");
            assert!(shown.contains("len: 5"), "{shown}");
        }
        assert_eq!(
            format!("{:?}", HeaderCopy::EMPTY),
            "HeaderCopy { len: 0, inline: true, names: [] }"
        );
    }

    proptest! {
        /// Any value a `HeaderValue` may hold comes back equal and as sensitive, short or not.
        #[test]
        fn a_value_comes_back_the_same(
            text in prop::collection::vec(any::<u8>(), 0..40),
            sensitive in any::<bool>(),
        ) {
            let Ok(mut value) = HeaderValue::from_bytes(&text) else {
                return Ok(());
            };
            value.set_sensitive(sensitive);
            let copy = Value::of(&value);
            prop_assert_eq!(matches!(copy, Value::Short { .. }), text.len() <= SHORT);
            let back = copy.to_value();
            prop_assert_eq!(&back, &value);
            prop_assert_eq!(back.is_sensitive(), sensitive);
        }

        /// Whatever the headers (repeated names, any count), the copy gives back the same.
        #[test]
        fn a_copy_gives_back_the_same_headers(
            values in prop::collection::vec(
                (prop::sample::select(vec!["accept", "x-a", "x-b", "content-type"]), 0u32..4),
                0..10,
            ),
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in values {
                headers.append(name, HeaderValue::from(value));
            }
            let copy = HeaderCopy::of(&headers);
            prop_assert_eq!(copy.is_inline(), headers.len() <= 6);
            prop_assert_eq!(copy.to_map(), headers.clone());
            prop_assert_eq!(copy.into_map(), headers.clone());
            // Three inline, filled in place, taken, and filled again: the same.
            let mut copy = HeaderCopy::<3>::empty();
            copy.fill(&headers);
            prop_assert_eq!(copy.is_inline(), headers.len() <= 3);
            prop_assert_eq!(copy.to_map(), headers.clone());
            prop_assert_eq!(copy.take(), headers.clone());
            let mut copy = HeaderCopy::EMPTY;
            copy.fill(&headers);
            prop_assert_eq!(copy.take(), headers.clone());
            prop_assert_eq!(copy.take(), HeaderMap::new());
            copy.fill(&headers);
            prop_assert_eq!(copy.take(), headers);
        }
    }
}
