//! [`HeaderCopy`]: the headers of a request a layer may have to send again.
//!
//! A layer that can resend a request (the retry layer, an auth layer re-signing a refused
//! token) keeps a copy of it on every call, and almost every call drops that copy unused. A
//! `HeaderMap` copy allocates twice; most Kling requests carry a few headers, which fit inline.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The most header values kept inline.
const INLINE: usize = 6;

/// A copy of a request's headers, to put back when the request is sent again: up to six values
/// inline (no allocation), more as a `HeaderMap` copy. Repeated names and their order are kept.
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
#[derive(Clone, Debug)]
pub struct HeaderCopy(Kept);

// Inline values are the point: the map variant is the rare one.
#[expect(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum Kept {
    /// The values in `HeaderMap::iter` order.
    Inline([Option<(HeaderName, HeaderValue)>; INLINE]),
    Map(HeaderMap),
}

impl HeaderCopy {
    /// A copy of `headers`.
    pub fn of(headers: &HeaderMap) -> HeaderCopy {
        if headers.len() > INLINE {
            return HeaderCopy(Kept::Map(headers.clone()));
        }
        let mut slots = [const { None }; INLINE];
        for (slot, (name, value)) in slots.iter_mut().zip(headers) {
            *slot = Some((name.clone(), value.clone()));
        }
        HeaderCopy(Kept::Inline(slots))
    }

    /// Whether the values are kept inline (the copy allocated nothing).
    pub fn is_inline(&self) -> bool {
        matches!(self.0, Kept::Inline(_))
    }

    /// The headers as they were copied.
    pub fn into_map(self) -> HeaderMap {
        match self.0 {
            Kept::Map(map) => map,
            Kept::Inline(slots) => {
                let mut map = HeaderMap::new();
                for (name, value) in slots.into_iter().map_while(|slot| slot) {
                    map.append(name, value);
                }
                map
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
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
            prop_assert_eq!(copy.is_inline(), headers.len() <= INLINE);
            prop_assert_eq!(copy.into_map(), headers);
        }
    }
}
