//! The [`Classify`](super::Classify) response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::Response;
use http::header::CONTENT_LENGTH;
use http::response::Parts;
use http_body::Body;
use http_body_util::Full;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::error::{BodyTooLarge, BoxError, Transport};
use crate::outcome::Outcome;

pin_project! {
    /// Calls the client, reads the body up to the limit and attaches the outcome.
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        limit: usize,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Calling { #[pin] future: F },
        Reading { parts: Option<Parts>, #[pin] body: B, buffer: Buffer },
        Done,
    }
}

/// Collected body data: one chunk is kept as is (the usual case), more are copied together.
#[derive(Default)]
enum Buffer {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Buffer {
    fn len(&self) -> usize {
        match self {
            Buffer::Empty => 0,
            Buffer::One(bytes) => bytes.len(),
            Buffer::Many(bytes) => bytes.len(),
        }
    }

    fn push(&mut self, mut data: impl Buf) {
        match self {
            Buffer::Empty => *self = Buffer::One(data.copy_to_bytes(data.remaining())),
            Buffer::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + data.remaining());
                all.extend_from_slice(first);
                while data.has_remaining() {
                    let chunk = data.chunk();
                    all.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
                *self = Buffer::Many(all);
            }
            Buffer::Many(all) => {
                while data.has_remaining() {
                    let chunk = data.chunk();
                    all.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Buffer::Empty => Bytes::new(),
            Buffer::One(bytes) => bytes,
            Buffer::Many(bytes) => bytes.freeze(),
        }
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(future: F, limit: usize) -> Self {
        ResponseFuture {
            state: State::Calling { future },
            limit,
        }
    }
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Full<Bytes>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(e) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Box::new(Transport::new(e))));
                        }
                    };
                    let (parts, body) = response.into_parts();
                    let declared = parts
                        .headers
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    if declared.is_some_and(|len| len > *this.limit as u64) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Box::new(BodyTooLarge::new(
                            parts.status,
                            *this.limit,
                        ))));
                    }
                    this.state.set(State::Reading {
                        parts: Some(parts),
                        body,
                        buffer: Buffer::Empty,
                    });
                }
                StateProj::Reading {
                    parts,
                    mut body,
                    buffer,
                } => {
                    loop {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                if let Ok(data) = frame.into_data() {
                                    if buffer.len() + data.remaining() > *this.limit {
                                        let status = parts.as_ref().map(|p| p.status);
                                        this.state.set(State::Done);
                                        return Poll::Ready(Err(Box::new(BodyTooLarge::new(
                                            status.unwrap_or_default(),
                                            *this.limit,
                                        ))));
                                    }
                                    buffer.push(data);
                                }
                            }
                            Some(Err(e)) => {
                                this.state.set(State::Done);
                                // The response had started: the request was sent.
                                return Poll::Ready(Err(Box::new(Transport::after_sent(e))));
                            }
                            None => break,
                        }
                    }
                    let parts = parts.take().expect("parts are taken once");
                    let bytes = std::mem::take(buffer).into_bytes();
                    this.state.set(State::Done);
                    let outcome = match Outcome::parse_bytes(
                        parts.status,
                        &parts.headers,
                        bytes.clone(),
                        Instant::now(),
                    ) {
                        Ok(outcome) => outcome,
                        Err(malformed) => return Poll::Ready(Err(Box::new(malformed))),
                    };
                    let mut response = Response::from_parts(parts, Full::new(bytes));
                    response.extensions_mut().insert(outcome);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
