//! [`HeaderCopy`]: the headers of a request a layer may have to send again.
//!
//! A layer that can resend a request (the retry layer, an auth layer re-signing a refused
//! token) keeps a copy of it on every call, and almost every call drops that copy unused. A
//! `HeaderMap` copy allocates twice; most Kling requests carry a few headers, which fit inline.

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
#[derive(Clone, Debug)]
pub struct HeaderCopy<const N: usize = 6> {
    inline: [Option<(HeaderName, HeaderValue)>; N],
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
            *slot = Some((name.clone(), value.clone()));
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
            map.append(name.clone(), value.clone());
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
            map.append(name, value);
        }
        map
    }

    /// The headers as they were copied.
    pub fn into_map(mut self) -> HeaderMap {
        self.take()
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
