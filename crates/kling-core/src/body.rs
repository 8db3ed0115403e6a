//! Reading a replayable request or buffered response body without consuming it.
//!
//! Layers must look inside bodies (an image create's `n`, a create's `external_task_id`) and
//! the retry layer must send them again, so the stack works on bodies that are already in memory
//! and clone cheaply.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Body;
use http_body_util::{Empty, Full};

/// A body whose bytes are in memory and can be read without consuming it.
///
/// Implemented for [`Full<Bytes>`] (the stack's request and response body), [`Bytes`],
/// [`String`], `Vec<u8>`, `&'static str` and [`Empty<Bytes>`].
pub trait PeekBody {
    /// The whole body; cheap for [`Full<Bytes>`] and [`Bytes`] (a reference count).
    fn peek_bytes(&self) -> Bytes;
}

impl PeekBody for Full<Bytes> {
    fn peek_bytes(&self) -> Bytes {
        // `Full` keeps its data private; polling a clone is always ready and hands the
        // (reference-counted) bytes over without copying.
        let mut clone = self.clone();
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut clone).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
            _ => Bytes::new(),
        }
    }
}

impl PeekBody for Bytes {
    fn peek_bytes(&self) -> Bytes {
        self.clone()
    }
}

impl PeekBody for String {
    fn peek_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }
}

impl PeekBody for Vec<u8> {
    fn peek_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

impl PeekBody for &'static str {
    fn peek_bytes(&self) -> Bytes {
        Bytes::from_static(self.as_bytes())
    }
}

impl PeekBody for Empty<Bytes> {
    fn peek_bytes(&self) -> Bytes {
        Bytes::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeking_a_full_body_leaves_it_intact() {
        let body = Full::new(Bytes::from_static(b"{\"n\":4}"));
        assert_eq!(body.peek_bytes(), Bytes::from_static(b"{\"n\":4}"));
        assert_eq!(body.peek_bytes(), Bytes::from_static(b"{\"n\":4}"));
        assert_eq!(Full::new(Bytes::new()).peek_bytes(), Bytes::new());
    }
}
