//! [`SmallId`]: a task id or external id kept without a heap allocation when short.

use std::fmt;

/// Ids up to this many bytes are kept inline: Kling task ids are 19 digits, the retry layer's
/// generated external ids 35 bytes.
const INLINE: usize = 38;

/// A task id or external id, copied from a `&str` without allocating when it is short: the
/// create path keeps two per task, which as `String`s were an allocation and a free each.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum SmallId {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl SmallId {
    /// A copy of `text`.
    #[inline]
    pub(crate) fn new(text: &str) -> Self {
        let (src, len) = (text.as_bytes(), text.len());
        if len <= INLINE {
            // Whole words, then the last word again (overlapping) or, under a word, one word
            // built from the bytes: fixed-size copies kept inline, where a copy of the
            // variable length is a call to `memcpy` (three ids are copied per create and
            // query). The bytes after `len` stay zero: equality compares them.
            let mut bytes = [0; INLINE];
            if len >= 8 {
                let mut at = 0;
                while at + 8 <= len {
                    bytes[at..at + 8].copy_from_slice(&src[at..at + 8]);
                    at += 8;
                }
                if at < len {
                    bytes[len - 8..len].copy_from_slice(&src[len - 8..]);
                }
            } else {
                let word = src
                    .iter()
                    .rev()
                    .fold(0, |acc, &b| (acc << 8) | u64::from(b));
                bytes[..8].copy_from_slice(&word.to_le_bytes());
            }
            SmallId::Inline {
                len: len as u8,
                bytes,
            }
        } else {
            SmallId::Heap(text.into())
        }
    }

    /// `text`, kept inline when short (its allocation is then freed), else moved.
    pub(crate) fn from_string(text: String) -> Self {
        if text.len() <= INLINE {
            SmallId::new(&text)
        } else {
            SmallId::Heap(text.into_boxed_str())
        }
    }

    /// The id's bytes (what lookups compare: no UTF-8 check).
    #[inline]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            SmallId::Inline { len, bytes } => &bytes[..usize::from(*len)],
            SmallId::Heap(text) => text.as_bytes(),
        }
    }

    /// The id as text.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            SmallId::Inline { .. } => {
                std::str::from_utf8(self.as_bytes()).expect("copied whole from a str")
            }
            SmallId::Heap(text) => text,
        }
    }
}

impl fmt::Debug for SmallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_ids_are_inline_and_long_ones_on_the_heap() {
        assert!(matches!(
            SmallId::new("8600000000000000001"),
            SmallId::Inline { .. }
        ));
        assert!(matches!(
            SmallId::new(&"x".repeat(INLINE)),
            SmallId::Inline { .. }
        ));
        assert!(matches!(
            SmallId::new(&"x".repeat(INLINE + 1)),
            SmallId::Heap(_)
        ));
        assert!(matches!(
            SmallId::from_string("x".repeat(INLINE + 1)),
            SmallId::Heap(_)
        ));
    }

    proptest! {
        #[test]
        fn an_id_reads_back_as_the_text_it_was_made_of(text in "\\PC{0,60}") {
            let id = SmallId::new(&text);
            prop_assert_eq!(id.as_str(), text.as_str());
            prop_assert_eq!(id.as_bytes(), text.as_bytes());
            prop_assert_eq!(&SmallId::from_string(text.clone()), &id);
            // As a plain copy into a zeroed buffer makes it (equality reads the whole buffer).
            if text.len() <= INLINE {
                let mut bytes = [0; INLINE];
                bytes[..text.len()].copy_from_slice(text.as_bytes());
                let plain = SmallId::Inline { len: text.len() as u8, bytes };
                prop_assert_eq!(&id, &plain);
            }
        }
    }
}
