//! Error types shared by the stack.
//!
//! They stay distinguishable after boxing: downcast a [`BoxError`] to these types. The one
//! question every retry rule asks of a failed attempt is [`SendState`]: did the request surely
//! not reach the server (a create may be repeated), or is its outcome unknown?

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::code::Code;
use crate::outcome::Outcome;

/// A type-erased error, as tower uses.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Whether a failed request reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SendState {
    /// The request never left the client (e.g. the connection was refused): a create surely
    /// did not happen and may be repeated.
    NotSent,
    /// The request may have reached the server (timeouts, resets, a lost response): a create
    /// may have happened.
    Unknown,
}

impl SendState {
    /// Reads the send state of any error by walking its source chain.
    ///
    /// [`Transport`], [`NotSent`] and [`RefusedBeforeSending`] markers say it outright (the
    /// stack's local refusals, a limiter's or the drain's, carry the last as their source), and
    /// [`Attempts`] whose create may have made a task says [`SendState::Unknown`] whatever its
    /// last request did; an I/O error of kind
    /// `ConnectionRefused` proves the request never left; with the `hyper-util` feature,
    /// hyper-util's connect errors and its refusals of a request it cannot send
    /// (`refused_version`, [`will_recur`]) do too. Everything else is [`SendState::Unknown`].
    pub fn of(error: &(dyn StdError + 'static)) -> SendState {
        let mut current: Option<&(dyn StdError + 'static)> = Some(error);
        while let Some(err) = current {
            if let Some(transport) = err.downcast_ref::<Transport>() {
                return transport.state;
            }
            if err.is::<NotSent>() || err.is::<RefusedBeforeSending>() {
                return SendState::NotSent;
            }
            // A create among several requests may have made a task, whatever the last one did.
            if err
                .downcast_ref::<Attempts>()
                .is_some_and(Attempts::may_have_created)
            {
                return SendState::Unknown;
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::ConnectionRefused
            {
                return SendState::NotSent;
            }
            #[cfg(feature = "hyper-util")]
            if let Some(client) = err.downcast_ref::<hyper_util::client::legacy::Error>()
                && (client.is_connect() || refused_for_good(client))
            {
                return SendState::NotSent;
            }
            current = next_link(err);
        }
        SendState::Unknown
    }
}

/// hyper-util's `Display` of its refusal of a request whose HTTP version it cannot send
/// (`ErrorKind::UserUnsupportedVersion`), which it has no predicate for.
#[cfg(feature = "hyper-util")]
const UNSUPPORTED_VERSION: &str = "client error (UserUnsupportedVersion)";

/// hyper-util's `Display` of its refusal, in `Client::request` before connecting, of a URI
/// without a scheme and an authority ("client requires absolute-form URIs").
#[cfg(feature = "hyper-util")]
const ABSOLUTE_URI_REQUIRED: &str = "client error (UserAbsoluteUriRequired)";

/// hyper-util's `Display` of its refusal, in `Client::request` before connecting, of a
/// `CONNECT` request as HTTP/1.0.
#[cfg(feature = "hyper-util")]
const UNSUPPORTED_METHOD: &str = "client error (UserUnsupportedRequestMethod)";

/// Whether `error` is one of hyper-util's refusals of the request itself, made before any of
/// it was written and made again for the same request: its version, a relative URI, a
/// `CONNECT` as HTTP/1.0. Read by text, as [`refused_version`] is.
#[cfg(feature = "hyper-util")]
fn refused_for_good(error: &hyper_util::client::legacy::Error) -> bool {
    let text = error.to_string();
    text == UNSUPPORTED_VERSION || text == ABSOLUTE_URI_REQUIRED || text == UNSUPPORTED_METHOD
}

/// Whether the client refused `error`'s request, never sent, for a reason every further
/// attempt of the same request meets again: a retry only spends time and budget.
///
/// Walks the source chain as [`SendState::of`] does. True for a [`NotSent::for_good`] marker
/// (an adapter's own refusal, as kling-tower's clients make) and, with the `hyper-util`
/// feature, for hyper-util's refusals of a request's HTTP version (`refused_version`), of a
/// relative URI ("client requires absolute-form URIs") and of a `CONNECT` as HTTP/1.0; each
/// also reads as [`SendState::NotSent`]. False for any other error: a failed connect or a
/// full pool may pass next time. A refusal by a layer of this process is
/// [`refused_before_sending`]'s question, not this one's.
pub fn will_recur(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(link) = current {
        if link
            .downcast_ref::<NotSent>()
            .is_some_and(NotSent::is_for_good)
        {
            return true;
        }
        #[cfg(feature = "hyper-util")]
        if link
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(refused_for_good)
        {
            return true;
        }
        current = next_link(link);
    }
    false
}

/// Whether `error` is hyper-util's refusal of a request's HTTP version: an HTTP/2 request on
/// an HTTP/1 connection (a client without HTTP/2, a plain `http://` host, a server that did not
/// offer it), or a version it never speaks. hyper-util 0.1 raises it in `Client::request`
/// before connecting, or in `try_send_request` once connected and before the request is handed
/// to the connection: nothing of the request was written. Read by its text: should hyper-util
/// word it otherwise, it reads as maybe sent again (the safe side), never the reverse.
#[cfg(feature = "hyper-util")]
pub fn refused_version(error: &hyper_util::client::legacy::Error) -> bool {
    error.to_string() == UNSUPPORTED_VERSION
}

/// `error` and the errors behind it, as this crate's readers walk them ([`SendState::of`],
/// [`may_have_created`]): each link's source, except that an [`std::io::Error`] or an
/// `Arc<dyn Error>` wrapping an error leads to that error (their own `source` skips it). For a
/// caller that looks for a Kling error behind an adapter's wrapping, as these do.
pub fn chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> + 'a {
    std::iter::successors(Some(error), |link| next_link(*link))
}

/// The next error in `error`'s chain: its source, except that an [`std::io::Error`] or an
/// `Arc<dyn Error>` wrapping an error leads to that error, which their own `source` skips (it
/// returns the wrapped error's source): a connector's `io::Error::other(NotSent::new(..))`
/// must still read as never sent.
fn next_link<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    if let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        return Some(inner);
    }
    if let Some(shared) = error.downcast_ref::<std::sync::Arc<dyn StdError + Send + Sync>>() {
        return Some(&**shared);
    }
    error.source()
}

/// A marker an HTTP client adapter wraps around errors that prove the request was never sent
/// (a failed connect, a refused connection, a full pool).
#[derive(Debug)]
pub struct NotSent {
    source: BoxError,
    /// The client refused the request itself ([`NotSent::for_good`]): see [`will_recur`].
    for_good: bool,
}

impl NotSent {
    /// Marks `source` as an error before the request was sent.
    pub fn new(source: impl Into<BoxError>) -> Self {
        NotSent {
            source: source.into(),
            for_good: false,
        }
    }

    /// Marks `source` as the client's refusal of the request itself, before sending it, for a
    /// reason every attempt of the same request meets again (a relative URI, an HTTP version
    /// or a scheme it does not speak): [`will_recur`] reads it, so a retry layer returns it at
    /// once instead of spending its attempts.
    pub fn for_good(source: impl Into<BoxError>) -> Self {
        NotSent {
            source: source.into(),
            for_good: true,
        }
    }

    /// Whether the client refused the request itself ([`NotSent::for_good`]).
    pub fn is_for_good(&self) -> bool {
        self.for_good
    }
}

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request was never sent: {}", self.source)
    }
}

impl StdError for NotSent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Whether a create that failed with `error` may nevertheless have made a billed task: the rule
/// the task slots (keep the slot or give it back) and a spend guard (keep the credit) share
/// with the retry layer (send the create again only when it made nothing).
///
/// Walks the source chain to the first link that says:
/// - a layer's account of several requests ([`Attempts`], a retry layer's): its answer;
/// - never sent ([`SendState::NotSent`]: a refused connection, [`NotSent`],
///   [`RefusedBeforeSending`]): no;
/// - a Kling error: [`ApiError::may_have_created`];
/// - an answer that is no Kling envelope ([`MalformedResponse`], [`BodyTooLarge`]) with a 4xx
///   status: no (a proxy's or a gateway's refusal: 403, 404, 413, a 429 page); any other
///   status: yes;
/// - anything else (a reset, a timeout after sending): yes.
pub fn may_have_created(error: &(dyn StdError + 'static)) -> bool {
    if SendState::of(error) == SendState::NotSent {
        return false;
    }
    let mut current = Some(error);
    while let Some(link) = current {
        if let Some(attempts) = link.downcast_ref::<Attempts>() {
            return attempts.may_have_created();
        }
        if let Some(api) = link.downcast_ref::<ApiError>() {
            return api.may_have_created();
        }
        if let Some(page) = link.downcast_ref::<MalformedResponse>() {
            return !page.status().is_client_error();
        }
        if let Some(large) = link.downcast_ref::<BodyTooLarge>() {
            return !large.status().is_client_error();
        }
        current = next_link(link);
    }
    true
}

/// The requests a layer that sends a call more than once (the retry layer) made for it, as the
/// [`source`](StdError::source) of the error the call ends with; its own source is the last
/// failure.
///
/// The layers above and callers that cannot name that layer's error types read it here:
/// [`SendState::of`] and [`may_have_created`] stop at it when a create among the requests may
/// have made a task (the last one may have been refused before sending, yet an earlier one
/// reached Kling), and a monitor counts [`sent`](Attempts::sent) against the rate.
#[derive(Debug)]
pub struct Attempts {
    sent: u32,
    may_have_created: bool,
    last: BoxError,
}

impl Attempts {
    /// `sent` requests, the last failing with `last`; `may_have_created` when a create among
    /// them may have made a task that nothing has ruled out.
    pub fn new(sent: u32, may_have_created: bool, last: impl Into<BoxError>) -> Self {
        Attempts {
            sent,
            may_have_created,
            last: last.into(),
        }
    }

    /// How many requests the layer sent for the call (each reached the client; the last may
    /// have been refused below).
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// Whether a create among the requests may have made a billed task that no lookup ruled
    /// out.
    pub fn may_have_created(&self) -> bool {
        self.may_have_created
    }

    /// The last failure.
    pub fn last(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.last
    }
}

impl fmt::Display for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.sent == 1 { "" } else { "s" };
        write!(f, "{} request{plural} sent", self.sent)?;
        if self.may_have_created {
            f.write_str(", a create among them may have made a task")?;
        }
        Ok(())
    }
}

impl StdError for Attempts {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.last)
    }
}

/// Whether `error`'s source chain names [`RefusedBeforeSending`]: a layer in this process
/// refused the request, and would refuse it again.
pub fn refused_before_sending(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(link) = current {
        if link.is::<RefusedBeforeSending>() {
            return true;
        }
        current = next_link(link);
    }
    false
}

/// The [`source`](StdError::source) of every refusal a layer makes before the request leaves
/// the process: a limiter with no slot or no rate in time, a full queue, creates halted after a
/// `1102`, a draining stack, a spent budget.
///
/// Layers meet each other's refusals without knowing their types (DESIGN.md: a layer crate
/// depends on none of the others), yet must tell them from a request that was sent: the task
/// slots give a slot back at once, a spend guard gives a credit back, the monitor counts no
/// request. A refusal error keeps its own type (callers downcast to it) and names this marker
/// as its source, so [`SendState::of`] reads it as [`SendState::NotSent`]:
///
/// ```
/// use std::error::Error;
/// use std::fmt;
/// use kling_core::error::RefusedBeforeSending;
/// use kling_core::SendState;
///
/// #[derive(Debug)]
/// struct NoRoom;
///
/// impl fmt::Display for NoRoom {
///     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
///         f.write_str("no room to wait")
///     }
/// }
///
/// impl Error for NoRoom {
///     fn source(&self) -> Option<&(dyn Error + 'static)> {
///         Some(&RefusedBeforeSending)
///     }
/// }
///
/// assert_eq!(SendState::of(&NoRoom), SendState::NotSent);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusedBeforeSending;

impl fmt::Display for RefusedBeforeSending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("refused before the request was sent")
    }
}

impl StdError for RefusedBeforeSending {}

/// A failure of the HTTP client under the classify step, with whether the request was sent.
#[derive(Debug)]
pub struct Transport {
    state: SendState,
    source: BoxError,
}

impl Transport {
    /// An error from below the classify step, as the classify step returns it: wrapped in a
    /// [`Transport`], unless it already says what happened (a [`Transport`], a
    /// [`MalformedResponse`] or a [`BodyTooLarge`], or a refusal whose chain names
    /// [`RefusedBeforeSending`]), which passes as it is.
    pub fn from_below(error: impl Into<BoxError>) -> BoxError {
        let error = error.into();
        if error.is::<Transport>()
            || error.is::<MalformedResponse>()
            || error.is::<BodyTooLarge>()
            || refused_before_sending(&*error)
        {
            return error;
        }
        Box::new(Transport::new(error))
    }

    /// Wraps a client error, reading its [`SendState`] from its source chain.
    pub fn new(source: impl Into<BoxError>) -> Self {
        let source = source.into();
        let state = SendState::of(&*source);
        Transport { state, source }
    }

    /// Wraps an error that happened after the request left (e.g. the response body broke off).
    pub fn after_sent(source: impl Into<BoxError>) -> Self {
        Transport {
            state: SendState::Unknown,
            source: source.into(),
        }
    }

    /// Whether the request reached the server.
    pub fn send_state(&self) -> SendState {
        self.state
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            // A `NotSent` marker says it already.
            SendState::NotSent if self.source.is::<NotSent>() => write!(f, "{}", self.source),
            SendState::NotSent => write!(f, "request was never sent: {}", self.source),
            SendState::Unknown => write!(f, "request failed after it was sent: {}", self.source),
        }
    }
}

impl StdError for Transport {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// A response body longer than the configured limit; it was not read further.
///
/// Its headers were read: a `Retry-After` it sent ([`retry_after`](Self::retry_after)) says
/// when to come back, so a proxy's 429 or 503 page too long to read is honoured like one that
/// is not ([`MalformedResponse::retry_after`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyTooLarge {
    status: StatusCode,
    limit: usize,
    retry_after: Option<Duration>,
    received_at: Option<Instant>,
}

impl BodyTooLarge {
    pub(crate) fn new(status: StatusCode, limit: usize) -> Self {
        BodyTooLarge {
            status,
            limit,
            retry_after: None,
            received_at: None,
        }
    }

    /// The same error, with the response's `Retry-After` (already read as a delay) and when
    /// the response arrived.
    pub(crate) fn with_retry_after(
        mut self,
        retry_after: Option<Duration>,
        received_at: Instant,
    ) -> Self {
        self.retry_after = retry_after;
        self.received_at = Some(received_at);
        self
    }

    /// The HTTP status of the oversize response.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The limit in bytes that was exceeded.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The response's `Retry-After`, either form, as a delay from
    /// [`received_at`](Self::received_at) (read as [`MalformedResponse::retry_after`] reads
    /// it); `None` without one or when it could not be read.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// When the classify step gave the body up (tokio time); `None` for an error built
    /// elsewhere.
    pub fn received_at(&self) -> Option<Instant> {
        self.received_at
    }

    /// The instant the `Retry-After` allows the next request, when both are known.
    pub fn resume_at(&self) -> Option<Instant> {
        self.received_at?.checked_add(self.retry_after?)
    }
}

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kling response body (http {}) is larger than the {}-byte limit",
            self.status.as_u16(),
            self.limit
        )
    }
}

impl StdError for BodyTooLarge {}

/// A response whose body is not a Kling envelope (not JSON, or no numeric `code`).
///
/// A gateway's HTML error page lands here; its status tells whether a retry may help, and a
/// `Retry-After` it sent ([`retry_after`](Self::retry_after)) when: a proxy's 503 or 429 is
/// honoured like Kling's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedResponse {
    status: StatusCode,
    reason: String,
    retry_after: Option<Duration>,
    received_at: Option<Instant>,
}

impl MalformedResponse {
    pub(crate) fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        MalformedResponse {
            status,
            reason: reason.into(),
            retry_after: None,
            received_at: None,
        }
    }

    /// The same error, with the response's `Retry-After` (already read as a delay) and when
    /// the response arrived.
    pub(crate) fn with_retry_after(
        mut self,
        retry_after: Option<Duration>,
        received_at: Instant,
    ) -> Self {
        self.retry_after = retry_after;
        self.received_at = Some(received_at);
        self
    }

    /// The HTTP status of the response.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Why the body could not be read as an envelope, and where: the path of the field that
    /// was wrong (`data.task_status`), the kind of its value and the type expected, a line and
    /// column, never a value from the body (a gateway's page may echo the request's
    /// `Authorization`), so that it may go to a log.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The response's `Retry-After`, either form, as a delay from
    /// [`received_at`](Self::received_at) (as [`Outcome::retry_after`](crate::Outcome::retry_after)
    /// reads it); `None` without one or when it could not be read.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// When the response arrived (tokio time), when the error came from a parse that was told
    /// ([`Outcome::parse`](crate::Outcome::parse) and the classify step are).
    pub fn received_at(&self) -> Option<Instant> {
        self.received_at
    }

    /// The instant the `Retry-After` allows the next request, when both are known.
    pub fn resume_at(&self) -> Option<Instant> {
        self.received_at?.checked_add(self.retry_after?)
    }
}

impl fmt::Display for MalformedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed kling response (http {}): {}",
            self.status.as_u16(),
            self.reason
        )
    }
}

impl StdError for MalformedResponse {}

/// A Kling error response, with everything support needs: code, message and request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: Code,
    message: String,
    request_id: Option<String>,
    retry_after: Option<Duration>,
}

impl ApiError {
    /// The error an outcome describes.
    pub fn from_outcome(outcome: &Outcome) -> Self {
        ApiError {
            status: outcome.status(),
            code: outcome.code(),
            message: outcome.message().to_owned(),
            request_id: outcome.request_id().map(str::to_owned),
            retry_after: outcome.retry_after(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The Kling business code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The server's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The server's request id.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// The wait the response's `Retry-After` asked for, if it had one: a caller that gives up
    /// (a retry layer out of attempts, a batch run that stops) sends again no sooner.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether a create refused so may still have created a billed task
    /// ([`Code::may_have_created_under`]).
    pub fn may_have_created(&self) -> bool {
        self.code.may_have_created_under(self.status)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kling error {} ({}), http {}: {}",
            self.code,
            self.code.description(),
            self.status.as_u16(),
            self.message
        )?;
        if let Some(id) = &self.request_id {
            write!(f, " (request_id {id})")?;
        }
        Ok(())
    }
}

impl StdError for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_state_walks_the_chain() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Transport::new(refused).send_state(), SendState::NotSent);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(Transport::new(reset).send_state(), SendState::Unknown);
        let marked = NotSent::new("pool closed");
        assert_eq!(Transport::new(marked).send_state(), SendState::NotSent);
        let nested: BoxError = Box::new(Transport::new(NotSent::new("x")));
        assert_eq!(SendState::of(&*nested), SendState::NotSent);
        // Said once, not twice.
        assert_eq!(nested.to_string(), "request was never sent: x");
    }

    /// Only a client's refusal of the request itself recurs (an adapter's marker; hyper-util's,
    /// tested through its client in kling-retry): a failed connect, a plain marker, a local
    /// refusal may pass next time.
    #[test]
    fn only_a_refusal_for_good_recurs() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!will_recur(&Transport::new(refused)));
        assert!(!will_recur(&NotSent::new("pool closed")));
        // An adapter's own refusal of the request itself recurs, also wrapped.
        let for_good = NotSent::for_good("relative URI");
        assert!(will_recur(&for_good));
        assert_eq!(SendState::of(&for_good), SendState::NotSent);
        assert!(will_recur(&std::io::Error::other(NotSent::for_good("x"))));
        assert!(!will_recur(&RefusedBeforeSending));
        let wrapped = std::io::Error::other(Attempts::new(1, false, "client error"));
        assert!(!will_recur(&wrapped));
    }

    /// An `io::Error` or an `Arc<dyn Error>` wrapping a marker: their `source` skips the
    /// error they wrap, and a connector that wraps its `NotSent` in an `io::Error` made a create
    /// never sent read as one that may have made a task.
    #[test]
    fn markers_inside_io_errors_and_arcs_are_found() {
        let in_io = std::io::Error::other(NotSent::new("connect failed"));
        assert_eq!(SendState::of(&in_io), SendState::NotSent);
        assert!(!may_have_created(&in_io));
        let refused = std::io::Error::other(RefusedBeforeSending);
        assert!(refused_before_sending(&refused));
        assert_eq!(SendState::of(&refused), SendState::NotSent);
        let doubly =
            std::io::Error::other(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(Transport::new(doubly).send_state(), SendState::NotSent);
        let shared: std::sync::Arc<dyn StdError + Send + Sync> =
            std::sync::Arc::new(NotSent::new("shared"));
        let boxed: BoxError = Box::new(shared);
        assert_eq!(SendState::of(&*boxed), SendState::NotSent);
        // Nothing wrapped: the chain ends where it did.
        let bare = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(SendState::of(&bare), SendState::Unknown);
        assert!(may_have_created(&bare));
    }

    /// The classify step wraps a client's error in a `Transport`, and passes up as it is an
    /// error that already says what happened: a second classify step below, a local refusal.
    #[test]
    fn errors_from_below_are_wrapped_unless_they_say_what_happened() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(Transport::from_below(reset).is::<Transport>());
        let page = MalformedResponse::new(StatusCode::NOT_FOUND, "html");
        assert!(Transport::from_below(page).is::<MalformedResponse>());
        assert!(Transport::from_below(BodyTooLarge::new(StatusCode::OK, 1)).is::<BodyTooLarge>());
        let inner = Transport::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let passed = Transport::from_below(inner);
        assert!(
            passed.source().is_some_and(|s| !s.is::<Transport>()),
            "not wrapped twice"
        );
        assert!(Transport::from_below(RefusedBeforeSending).is::<RefusedBeforeSending>());
    }

    #[test]
    fn a_create_may_have_made_a_task_unless_an_error_says_otherwise() {
        let page =
            |status: u16| MalformedResponse::new(StatusCode::from_u16(status).unwrap(), "html");
        // A proxy's refusals made nothing; a page in place of a 5xx or 2xx answer may hide one.
        for status in [403, 404, 413, 429] {
            assert!(!may_have_created(&page(status)), "{status}");
            let nested: BoxError = Box::new(page(status));
            assert!(!may_have_created(&*nested), "{status}");
        }
        for status in [200, 500, 502] {
            assert!(may_have_created(&page(status)), "{status}");
        }
        assert!(!may_have_created(&BodyTooLarge::new(
            StatusCode::FORBIDDEN,
            10
        )));
        assert!(may_have_created(&BodyTooLarge::new(StatusCode::OK, 10)));
        // Never sent, refused before sending, reset after sending.
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!may_have_created(&Transport::new(refused)));
        assert!(!may_have_created(&RefusedBeforeSending));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(may_have_created(&Transport::new(reset)));
    }

    /// A retry layer's account of a call: when a create among its requests may have made a task,
    /// the call may have made one even though its last request was refused before sending;
    /// when none did, the last failure decides.
    #[test]
    fn attempts_decide_for_the_call_and_else_defer_to_the_last_failure() {
        let reached = Attempts::new(3, true, RefusedBeforeSending);
        assert_eq!(reached.sent(), 3);
        assert!(reached.may_have_created());
        assert_eq!(SendState::of(&reached), SendState::Unknown);
        assert!(may_have_created(&reached));
        let boxed: BoxError = Box::new(Attempts::new(2, true, NotSent::new("pool closed")));
        assert_eq!(SendState::of(&*boxed), SendState::Unknown);
        assert!(may_have_created(&*boxed));

        // Nothing may have been made: the last failure is read through the source chain.
        let refused = Attempts::new(1, false, NotSent::new("connect failed"));
        assert!(!refused.may_have_created());
        assert_eq!(SendState::of(&refused), SendState::NotSent);
        assert!(!may_have_created(&refused));
        assert!(refused.source().is_some_and(|s| s.is::<NotSent>()));
        assert!(refused.last().is::<NotSent>());
        // An error that would say "may have made a task" on its own is overruled by the account.
        let page = MalformedResponse::new(StatusCode::BAD_GATEWAY, "html");
        assert!(!may_have_created(&Attempts::new(2, false, page)));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            SendState::of(&Attempts::new(2, false, reset)),
            SendState::Unknown
        );

        assert_eq!(Attempts::new(1, false, "x").to_string(), "1 request sent");
        assert_eq!(
            reached.to_string(),
            "3 requests sent, a create among them may have made a task"
        );
    }

    /// A Kling error keeps what support needs and answers the create question as the code
    /// table does under its status.
    #[test]
    fn an_api_error_keeps_the_response_and_judges_a_create_by_code_and_status() {
        let error = |status: StatusCode, code: i64| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::RETRY_AFTER, "9".parse().unwrap());
            let body = format!(r#"{{"code":{code},"message":"boom","request_id":"req-1"}}"#);
            let outcome =
                Outcome::parse(status, &headers, body.as_bytes(), Instant::now()).unwrap();
            ApiError::from_outcome(&outcome)
        };
        let internal = error(StatusCode::INTERNAL_SERVER_ERROR, 5000);
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(internal.code(), Code::InternalError);
        assert_eq!(internal.message(), "boom");
        assert_eq!(internal.request_id(), Some("req-1"));
        assert_eq!(internal.retry_after(), Some(Duration::from_secs(9)));
        assert!(internal.may_have_created());
        assert!(may_have_created(&internal));

        let throttled = error(StatusCode::TOO_MANY_REQUESTS, 1302);
        assert!(!throttled.may_have_created());
        assert!(!may_have_created(&throttled));
        // An undocumented code: a 4xx refused, a 5xx may have made a task.
        assert!(!error(StatusCode::BAD_REQUEST, 1299).may_have_created());
        assert!(error(StatusCode::BAD_GATEWAY, 1299).may_have_created());
        let nested = Transport::after_sent(error(StatusCode::BAD_REQUEST, 1201));
        assert!(!may_have_created(&nested));
    }

    #[test]
    fn markers_and_pages_say_what_happened() {
        let not_sent = NotSent::new("connect failed");
        assert_eq!(
            not_sent.to_string(),
            "request was never sent: connect failed"
        );
        assert_eq!(
            not_sent.source().map(ToString::to_string).as_deref(),
            Some("connect failed")
        );
        assert_eq!(
            RefusedBeforeSending.to_string(),
            "refused before the request was sent"
        );
        let large = BodyTooLarge::new(StatusCode::BAD_GATEWAY, 4096);
        assert_eq!(large.limit(), 4096);
        assert_eq!(
            large.to_string(),
            "kling response body (http 502) is larger than the 4096-byte limit"
        );
        let page = MalformedResponse::new(StatusCode::BAD_GATEWAY, "not json");
        assert_eq!(
            page.to_string(),
            "malformed kling response (http 502): not json"
        );
    }

    /// A body that is no envelope because a value is of the wrong type, wherever the value
    /// sits and whatever its kind: the reason, the error's `Display` and `Debug` and the
    /// parser's own error say what was wrong and where, never the value (a gateway's page may
    /// echo the request's `Authorization` in its `code`).
    #[test]
    fn a_malformed_response_never_quotes_the_body() {
        const SECRET: &str = "ak-live-9f8e7d6c5b4a3928";
        const DIGITS: &str = "8675309867530986";
        let bearer = format!("Bearer {SECRET}");
        let bodies = [
            format!(r#"{{"code":"{bearer}","message":"unauthorized"}}"#),
            format!(r#"{{"code":"a, expected {SECRET}","message":"m"}}"#),
            format!(r#"{{"code":"a \"{SECRET}\" b"}}"#),
            format!(r#""{bearer}""#),
            format!(r#"{{"code":0,"message":"ok","data":{{"tasks":"{bearer}"}}}}"#),
            format!(r#"{{"code":0,"data":{{"task_id":"t","task_status":{{"{SECRET}":1}}}}}}"#),
            format!(r#"{{"code":0,"request_id":{DIGITS}}}"#),
            format!(r#"{{"code":0,"message":{DIGITS}.5}}"#),
            format!(r#"{{"code":1{DIGITS}000}}"#),
            format!(r#"{{"code":0,"data":{{"id":true,"status":"{bearer}"}}}}"#),
        ];
        // Header values are read as delays, never kept as text: in any position, a
        // credential there reaches no error either (nor does one of an oversize body).
        let mut headers = http::HeaderMap::new();
        for name in [
            http::header::RETRY_AFTER,
            http::header::DATE,
            http::header::CONTENT_TYPE,
        ] {
            headers.append(name, bearer.parse().unwrap());
        }
        headers.append(http::header::RETRY_AFTER, "7".parse().unwrap());
        let delay = crate::retry_after::retry_after_delay(&headers, std::time::SystemTime::now());
        let large = BodyTooLarge::new(StatusCode::TOO_MANY_REQUESTS, 10)
            .with_retry_after(delay, Instant::now());
        assert_eq!(large.retry_after(), Some(Duration::from_secs(7)));
        for body in &bodies {
            let err = Outcome::parse(
                StatusCode::UNAUTHORIZED,
                &headers,
                body.as_bytes(),
                Instant::now(),
            )
            .unwrap_err();
            assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
            let parsed = crate::Envelope::parse(body.as_bytes()).unwrap_err();
            for text in [
                err.reason().to_owned(),
                err.to_string(),
                format!("{err:?}"),
                parsed.to_string(),
                format!("{parsed:?}"),
                large.to_string(),
                format!("{large:?}"),
            ] {
                assert!(!text.contains(SECRET), "{body}: {text}");
                assert!(!text.contains(DIGITS), "{body}: {text}");
                assert!(!text.contains("Bearer"), "{body}: {text}");
            }
            // What was wrong, in which field, and where.
            assert!(err.reason().contains(" at line 1 column "), "{body}: {err}");
            assert!(
                err.reason().contains(" at `") || !body.starts_with('{'),
                "{body}: {err}"
            );
            assert!(err.reason().contains("expected"), "{body}: {err}");
            assert_eq!(parsed.line(), 1, "{body}: {parsed}");
        }
        let err = |body: &str| {
            Outcome::parse(
                StatusCode::UNAUTHORIZED,
                &http::HeaderMap::new(),
                body.as_bytes(),
                Instant::now(),
            )
            .unwrap_err()
            .reason()
            .to_owned()
        };
        assert_eq!(
            err(&bodies[0]),
            format!(
                "invalid type at `code`: a string, expected a 64-bit integer at line 1 column {}",
                9 + bearer.len() + 1
            )
        );
        assert_eq!(
            err(&bodies[6]),
            "invalid type at `request_id`: an integer, expected a string at line 1 column 39"
        );
        assert_eq!(
            err(&bodies[3]),
            "invalid type: a string, expected an envelope object at line 1 column 33"
        );
        // A field's name is this crate's, and kept; a syntax error names no value.
        assert_eq!(
            err(r#"{"message":"x"}"#),
            "missing field `code` at line 1 column 15"
        );
        assert_eq!(
            err(r#"{"code":0,"message":"x"#),
            "EOF while parsing a string at line 1 column 22"
        );
    }

    /// The same, over random edits of a create's and a query's answer with a credential put
    /// in (as a value, a key, a number), with a fixed seed (xorshift64*): whatever the parse
    /// fails on, its reason never holds the credential.
    #[test]
    fn no_reason_quotes_a_credential_put_anywhere_in_a_body() {
        const SECRET: &str = "ak-live-9f8e7d6c5b4a3928";
        const BODIES: [&str; 2] = [
            r#"{"code":0,"message":"SUCCEED","request_id":"r-1","data":{"task_id":"86","task_status":"submitted","task_info":{"external_task_id":"job-1"}}}"#,
            r#"{"code":0,"data":[{"id":"a","status":"succeeded","external_id":"e","outputs":[{"url":"u"}],"billing":[{"amount":"1.5"}]}]}"#,
        ];
        let planted = [
            format!("\"Bearer {SECRET}\""),
            format!("\"{SECRET}\":"),
            format!("[\"{SECRET}\"]"),
            "8675309867530986".to_owned(),
            format!("{{\"{SECRET}\":1}}"),
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut below = |n: usize| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let n = u64::try_from(n).expect("small");
            usize::try_from(state.wrapping_mul(0x9e37_79b9_7f4a_7c15) % n).expect("below n")
        };
        let mut failed = 0;
        for _ in 0..20_000 {
            let mut body = BODIES[below(BODIES.len())].as_bytes().to_vec();
            for _ in 0..=below(3) {
                let place = below(body.len() + 1);
                match below(4) {
                    0 if place < body.len() => {
                        body.remove(place);
                    }
                    1 if place < body.len() => body[place] = b"\":,{}[]0a"[below(9)],
                    _ => {
                        let text = &planted[below(planted.len())];
                        body.splice(place..place, text.bytes());
                    }
                }
            }
            let Err(err) = Outcome::parse(
                StatusCode::BAD_GATEWAY,
                &http::HeaderMap::new(),
                &body,
                Instant::now(),
            ) else {
                continue;
            };
            failed += 1;
            let text = format!("{err} {err:?}");
            assert!(
                !text.contains(SECRET) && !text.contains("8675309867530986"),
                "{}: {text}",
                String::from_utf8_lossy(&body)
            );
        }
        // Most edits break the envelope: the check ran.
        assert!(failed > 10_000, "{failed}");
    }

    #[test]
    fn display_is_one_lowercase_line() {
        let err = Transport::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let text = err.to_string();
        assert!(
            text.starts_with("request failed after it was sent"),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }
}
