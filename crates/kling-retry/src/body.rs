//! Request bodies the retry layer can send again.

use bytes::Bytes;
use http_body_util::Full;
use kling_core::PeekBody;

/// A request body the retry layer can send again: in memory, cheap to clone, readable without
/// being consumed, and buildable from bytes (for lookups by external id and for adding a
/// generated `external_task_id`).
///
/// Implemented for [`Full<Bytes>`] (the stack's request body), [`Bytes`], [`String`] and
/// `Vec<u8>`. A streaming body such as hyper's `Incoming` cannot be replayed: buffer it first
/// (e.g. with `http_body_util::BodyExt::collect`) into a `Full<Bytes>`.
#[diagnostic::on_unimplemented(
    message = "the retry layer cannot replay a `{Self}` request body",
    label = "not a replayable body",
    note = "buffer the body first: `Full<Bytes>`, `Bytes`, `String` and `Vec<u8>` can be sent again"
)]
pub trait ReplayBody: PeekBody + Clone + Send + 'static {
    /// An empty body (a lookup's `GET`).
    fn empty() -> Self;

    /// A body holding `bytes` (a create rewritten with an `external_task_id`).
    fn from_bytes(bytes: Bytes) -> Self;
}

impl ReplayBody for Full<Bytes> {
    fn empty() -> Self {
        Full::new(Bytes::new())
    }

    fn from_bytes(bytes: Bytes) -> Self {
        Full::new(bytes)
    }
}

impl ReplayBody for Bytes {
    fn empty() -> Self {
        Bytes::new()
    }

    fn from_bytes(bytes: Bytes) -> Self {
        bytes
    }
}

impl ReplayBody for String {
    fn empty() -> Self {
        String::new()
    }

    fn from_bytes(bytes: Bytes) -> Self {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl ReplayBody for Vec<u8> {
    fn empty() -> Self {
        Vec::new()
    }

    fn from_bytes(bytes: Bytes) -> Self {
        bytes.to_vec()
    }
}
