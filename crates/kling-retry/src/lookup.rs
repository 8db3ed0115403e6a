//! Looking a create up by its external id before sending it again, and giving creates an
//! external id.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::{HeaderValue, Method, Request, Uri};
use kling_core::signals::SendCounter;
use kling_core::{AccountId, ApiGeneration, Code, Outcome, Recognized, RequestKind, Route};

use crate::body::ReplayBody;
use crate::rng::RandomSource;

/// Response extension: this create's result was recovered by a lookup, not sent by the create.
///
/// A create whose outcome was unknown (a 5xx, a timeout) and that carries an
/// `external_task_id` is looked up by that id before it is sent again. When the lookup finds
/// the task, the caller gets **the lookup's response** in place of the create's: HTTP 200,
/// code 0, the query's JSON body (legacy `GET {create path}/{id}`: `data` is the task object,
/// the same shape as a create's answer; new-style `GET /tasks?external_task_ids=…`: `data` is
/// an array holding the task), its [`Outcome`] in the extensions reporting the existing task
/// (so [`Outcome::task`] gives its id and status, which may already be past `submitted`), and
/// this extension.
///
/// The same holds when, after a lookup found nothing, the create sent again is refused for good
/// (say `1201` "duplicate external task id": the first create landed meanwhile) and the lookup
/// made before returning that refusal finds the task.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovered {
    /// The create's external id.
    pub external_id: String,
    /// The id of the task the lookup found.
    pub task_id: String,
}

/// What an answer to a lookup of a create by its external id says ([`read_lookup`](crate::read_lookup)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lookup {
    /// The create's task exists: its task id.
    Found(String),
    /// No such task: the create may be sent again.
    NotFound,
    /// An error response or an answer that names no task it could read: judge it like any
    /// other attempt (a success that says nothing stops the call with the create unresolved).
    Inconclusive,
}

/// Reads a lookup response: `body` is the response's body, `new_style` whether the lookup
/// was the new-style batch query (`GET /tasks?external_task_ids=…`).
///
/// Only a definite "no such task" is [`Lookup::NotFound`], since it lets the create be sent
/// again: code `1203`, or a new-style answer whose `data` is an empty list read in whole
/// ([`Outcome::lists_every_task`]). A success is [`Lookup::Found`] when a task in it names our
/// id (wherever it stands), or when its only task names none (the server answered the query
/// for ours without echoing the id; on the legacy path, in a `data` object, not a list). Anything
/// else is [`Lookup::Inconclusive`]: another error, a success the layer cannot read a task from
/// (`data` null or missing, a legacy task without `task_status`, a list element without id or
/// status), and an answer about other tasks (tasks of other external ids, several naming none,
/// a legacy list): a server that ignored the query's filter answers so, and its answer says
/// nothing of ours, which may exist.
///
/// Public as [`read_lookup`](crate::read_lookup), so that a caller who looks creates up itself
/// (a batch runner) sends a create again by the same rule.
pub fn read(body: &[u8], outcome: &Outcome, external_id: &str, new_style: bool) -> Lookup {
    if outcome.code() == Code::NotFound {
        return Lookup::NotFound;
    }
    if !outcome.is_success() {
        return Lookup::Inconclusive;
    }
    let tasks = outcome.tasks();
    if let Some(task) = tasks
        .iter()
        .find(|task| task.external_id.as_deref() == Some(external_id))
    {
        return Lookup::Found(task.id.clone());
    }
    match tasks {
        [task] if task.external_id.is_none() && (new_style || data_is_object(body)) => {
            Lookup::Found(task.id.clone())
        }
        [] if new_style && outcome.lists_every_task() => Lookup::NotFound,
        _ => Lookup::Inconclusive,
    }
}

/// Whether the envelope's `data` is a JSON object (a single task's answer), not a list. Reads
/// the body again, for the rare lookup answer whose task names no external id.
fn data_is_object(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|envelope| {
        envelope
            .get("data")
            .is_some_and(serde_json::Value::is_object)
    })
}

/// The query that finds a create by its external id, with the create's account and
/// `Authorization` (the auth layer below sets a fresh one anyway). `None` when the create's URI
/// cannot carry it, or no one path is the lookup wherever a server routes the create
/// ([`lookup_path`]).
pub(crate) fn request<B: ReplayBody>(
    create: &Request<B>,
    recognized: &Recognized,
    external_id: &str,
) -> Option<Request<B>> {
    let uri = create.uri();
    let generation = recognized.generation?;
    let id = encode(external_id);
    let path_and_query = match generation {
        // A path segment of `.` or `..` (or none at all) is taken away by URL normalisation,
        // in a proxy or a client, and the query becomes the list of the account's tasks, whose
        // answer would be read as this create's: such an id is not looked up.
        ApiGeneration::Legacy if matches!(external_id, "" | "." | "..") => return None,
        ApiGeneration::Legacy => lookup_path(uri.path(), generation, &id)?,
        _ => {
            // A batch query cannot name an id with a comma, or with spaces around it (a server
            // splits the list at commas and may trim each id): its "not found" would be about
            // another id, and the create be sent twice. Such an id is not looked up.
            if external_id.contains(',') || external_id.trim() != external_id {
                return None;
            }
            // `{prefix}/{product}/{model}` → `{prefix}/tasks`.
            let path = lookup_path(uri.path(), generation, "tasks")?;
            format!("{path}?external_task_ids={id}")
        }
    };
    let mut builder = Uri::builder();
    if let Some(scheme) = uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = uri.authority() {
        builder = builder.authority(authority.clone());
    }
    let uri = builder.path_and_query(path_and_query).build().ok()?;
    let mut lookup = Request::new(B::empty());
    *lookup.method_mut() = Method::GET;
    *lookup.uri_mut() = uri;
    *lookup.version_mut() = create.version();
    if let Some(auth) = create.headers().get(AUTHORIZATION) {
        lookup.headers_mut().insert(AUTHORIZATION, auth.clone());
    }
    if let Some(account) = AccountId::of(create) {
        AccountId::set_if_absent(&mut lookup, account);
    }
    // The server counts the lookup against the rate as it does any request: a metrics layer
    // above that counts requests as they are sent sees it only through its counter.
    if let Some(counter) = SendCounter::of(create) {
        SendCounter::set(&mut lookup, counter);
    }
    Some(lookup)
}

/// The path of the lookup of a create sent to `create_path` (of `generation`): legacy
/// `{create path}/{last}` (`last` the encoded external id), new-style `{prefix}/{last}` (`last`
/// being `tasks`) for a create at `{prefix}/{product}/{model}`; `None` when no path is the
/// lookup wherever a server routes the create.
///
/// Servers read a path in different ways (kling-core's [`Route::of`](kling_core::Route::of)
/// takes a create wherever one of them finds one): with each segment's `;` parameters removed
/// (Tomcat, Spring) or kept, a `%2F` a separator (a decoding proxy) or data, and dot segments
/// removed as RFC 3986 does it, after merging `//`s (nginx), or not at all. A lookup built at
/// the wrong base path asks about another resource, and its "not found" sends the create again:
/// a duplicate billed task. So the path is checked under every such reading in which the
/// create is one (of this generation): it must read as that reading's create path (legacy), or
/// base path (new-style), with `last` after it. The path as written is tried first (each
/// server reads its own way what the create's path shares with it), then each reading's own
/// path written plainly; when none fits every reading, or the readings disagree on the
/// generation, there is no lookup (the create's outcome stays unknown: it is never resent).
fn lookup_path(create_path: &str, generation: ApiGeneration, last: &str) -> Option<String> {
    let path = create_path.trim_end_matches('/');
    let legacy = generation == ApiGeneration::Legacy;
    // What each reading in which the path is a create needs the lookup to read as.
    let mut wanted = Vec::new();
    for reading in Reading::ALL {
        let mut segments = reading.segments(path)?;
        let (kind, read_as) = kind_of(&segments);
        if kind != RequestKind::Create {
            continue;
        }
        if read_as != Some(generation) {
            return None;
        }
        if !legacy {
            // `{prefix}/{product}/{model}`: a create has both.
            segments.truncate(segments.len().checked_sub(2)?);
        }
        segments.push(last.to_owned());
        wanted.push((reading, segments));
    }
    if wanted.is_empty() {
        return None;
    }
    let fits = |lookup: &str| {
        #[cfg(test)]
        tests::TRIED.with(|tried| tried.set(tried.get() + 1));
        wanted
            .iter()
            .all(|(reading, segments)| reading.segments(lookup).as_ref() == Some(segments))
    };
    // As written: the whole create path (legacy), or the path before one of its last
    // `WRITTEN_CUTS` `/`s or `%2F`s (new-style), the last first, each made only when tried.
    let whole = legacy.then(|| format!("{path}/{last}"));
    let bytes = path.as_bytes();
    let cuts = (0..=bytes.len())
        .rev()
        .filter(|&at| at == 0 || matches!(bytes[at..], [b'/', ..] | [b'%', b'2', b'F' | b'f', ..]))
        .take(if legacy { 0 } else { WRITTEN_CUTS })
        .map(|at| format!("{}/{last}", path[..at].trim_end_matches('/')));
    let plain = wanted
        .iter()
        .map(|(_, segments)| format!("/{}", segments.join("/")));
    whole
        .into_iter()
        .chain(cuts)
        .chain(plain)
        .find(|lookup| fits(lookup))
}

/// The most cuts of a new-style create's path tried as written (see [`lookup_path`]). The one
/// that fits drops the product and the model, the last segments but for a tail of dot
/// segments, parameters or `//`s; every cut of a long path, each read a dozen ways, took time
/// quadratic in its length (minutes for 60 KB). Past these, only the plain paths are tried: a
/// create none fits is not looked up, never looked up in the wrong place.
const WRITTEN_CUTS: usize = 16;

/// A way a server reads a path before it routes it (see [`lookup_path`]).
#[derive(Clone, Copy, Debug)]
struct Reading {
    /// Each segment's `;` parameters removed (Tomcat), or kept as data.
    strip_params: bool,
    /// A `%2F` (or `%2f`) a separator, or data.
    decode_slashes: bool,
    /// How it normalizes.
    dots: Dots,
}

/// How a [`Reading`] normalizes a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dots {
    /// Not at all: escapes and dot segments are names.
    Kept,
    /// RFC 3986: escapes of unreserved characters decoded, dot segments removed, an empty
    /// segment one that a `..` removes.
    Rfc,
    /// Escapes of unreserved characters decoded, `//`s merged, then dot segments removed.
    Merged,
}

impl Reading {
    /// Every reading.
    const ALL: [Reading; 12] = {
        let mut all = [Reading {
            strip_params: false,
            decode_slashes: false,
            dots: Dots::Kept,
        }; 12];
        let mut at = 0;
        while at < 12 {
            all[at] = Reading {
                strip_params: at & 1 == 1,
                decode_slashes: at & 2 == 2,
                dots: match at / 4 {
                    0 => Dots::Kept,
                    1 => Dots::Rfc,
                    _ => Dots::Merged,
                },
            };
            at += 1;
        }
        all
    };

    /// The non-empty segments `path` is read as in this reading: kling-core's
    /// [`Route::read_path`] (which splits at `/`s, and at `%2F`s when it decodes them, removes
    /// each segment's `;` parameters, decodes escapes of unreserved characters and removes dot
    /// segments, RFC-style or after merging `//`s) of the path with what this reading keeps as
    /// data hidden from it: its `;`s where parameters are kept, and where it does not
    /// normalize its escapes (but a `%2F` it splits at) and its dots. So every reading follows
    /// kling-core's rules, changed or not, in what it shares with them. `None` for a path that
    /// holds a character used to hide them (no URI's path does).
    fn segments(self, path: &str) -> Option<Vec<String>> {
        if path.contains(HIDDEN) {
            return None;
        }
        let bytes = path.as_bytes();
        let kept = self.dots == Dots::Kept;
        let mut hidden = String::with_capacity(path.len());
        for (at, ch) in path.char_indices() {
            hidden.push(match ch {
                ';' if !self.strip_params => HIDDEN[0],
                '%' if kept
                    && !(self.decode_slashes
                        && matches!(bytes[at..], [b'%', b'2', b'F' | b'f', ..])) =>
                {
                    HIDDEN[1]
                }
                '.' if kept => HIDDEN[2],
                _ => ch,
            });
        }
        let read = Route::read_path(&hidden, self.decode_slashes, self.dots == Dots::Merged);
        let shown = |segment: &str| -> String {
            segment
                .chars()
                .map(|ch| match HIDDEN.iter().position(|&h| h == ch) {
                    Some(0) => ';',
                    Some(1) => '%',
                    Some(_) => '.',
                    None => ch,
                })
                .collect()
        };
        Some(
            read.split('/')
                .filter(|segment| !segment.is_empty())
                .map(shown)
                .collect(),
        )
    }
}

/// What [`Reading::segments`] hides from kling-core's reading, for `;`, `%` and `.`: control
/// characters, which no URI's path holds, and which kling-core reads as plain data.
const HIDDEN: [char; 3] = ['\u{1}', '\u{2}', '\u{3}'];

/// What a POST to the path of `segments` (as a reading gives them) is by Kling's path rules,
/// and its generation. A segment holding a `;`, a `%` or a dot segment names nothing Kling
/// knows, and is read as a plain name (it may be a model's), not read again.
fn kind_of(segments: &[String]) -> (RequestKind, Option<ApiGeneration>) {
    let mut path = String::new();
    for segment in segments {
        path.push('/');
        let plain = !segment.contains([';', '%']) && !matches!(segment.as_str(), "." | "..");
        path.push_str(if plain { segment } else { "x" });
    }
    let route = Route::of(&Method::POST, &path);
    (route.kind, route.generation)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Length of a generated external id: `kr-` and 32 hex digits.
const ID_LEN: usize = 35;

/// Every byte as two lowercase hex digits, so an id is written a byte (not a nibble) at a time.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = [HEX[byte >> 4], HEX[byte & 0xf]];
        byte += 1;
    }
    table
};

/// A fresh external id, `kr-` and 32 hex digits, made on the stack: it is spliced into the body
/// and copied once into [`Recognized::external_id`], with no intermediate `String`.
/// Word-aligned, so checking it is UTF-8 takes the fast path.
#[repr(align(8))]
struct GeneratedId([u8; ID_LEN]);

impl GeneratedId {
    /// The id of 16 random bytes.
    fn of(bytes: [u8; 16]) -> Self {
        let mut id = [0; ID_LEN];
        id[..3].copy_from_slice(b"kr-");
        for (out, byte) in id[3..].chunks_exact_mut(2).zip(bytes) {
            out.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
        }
        GeneratedId(id)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

/// A generated id written into a create's body: enough to write it into the original body
/// again, for a retry. The id's 16 random bytes, not its 35 digits, and the field as one byte,
/// not a `&str`: every create's retry template keeps one (18 bytes, not 40), and a retry (rare)
/// writes the digits again.
pub(crate) struct Spliced {
    field: IdField,
    bits: [u8; 16],
    /// The body named the field already (unset): it is set, not spliced in.
    rewrite: bool,
}

/// The body field that names a create's external id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IdField {
    /// `external_task_id`, on legacy paths.
    ExternalTaskId,
    /// `external_id`, on new-style ones.
    ExternalId,
}

impl IdField {
    fn name(self) -> &'static str {
        match self {
            IdField::ExternalTaskId => "external_task_id",
            IdField::ExternalId => "external_id",
        }
    }
}

impl Spliced {
    /// The generated id, as written into the body.
    pub(crate) fn id(&self) -> String {
        GeneratedId::of(self.bits).as_str().to_owned()
    }

    /// `original` with the id written in, byte for byte the body the first attempt sent.
    pub(crate) fn body<B: ReplayBody>(&self, original: &B) -> B {
        let id = GeneratedId::of(self.bits);
        let rewritten = write_field(
            &original.peek_bytes(),
            self.field.name(),
            id.as_bytes(),
            self.rewrite,
        )
        .expect("the body took the id once, and takes it the same way again");
        B::from_bytes(Bytes::from(rewritten))
    }
}

/// Gives a create that has no external id a generated one (`external_task_id` on legacy paths,
/// `external_id` on new-style ones), in its body and in its cached [`Recognized`]. Anything
/// else, and a create whose body is not a JSON object (the server will refuse it anyway), is
/// left alone.
///
/// The field is spliced in after the opening brace, so the body is neither parsed nor
/// re-serialized (the create's bytes, large base64 images included, are copied once; only a
/// body that names the field already, null or empty, is rewritten: [`write_field`]), and the
/// cached recognition is updated, not recognised again from the rewritten body.
///
/// Returns the original body and the id when it wrote one: the retry layer keeps those, not a
/// clone of the rewritten body (a `Bytes` made from a `Vec` allocates again when first cloned),
/// and writes the id in again only for a retry.
pub(crate) fn add_generated_id<B: ReplayBody>(
    request: &mut Request<B>,
    rng: &dyn RandomSource,
) -> Option<(B, Spliced)> {
    // One lookup where a layer above recognised the request (the stack's case).
    let recognized = match Recognized::cached(request) {
        Some(recognized) => recognized,
        None => Recognized::of(request),
    };
    if !recognized.is_create() || recognized.external_id.is_some() {
        return None;
    }
    let field = field_name(recognized)?;
    let rewrite = recognized.names_own_id;
    // One draw of 128 bits: one atomic step of the shared `SplitMix`, not two.
    let bits = rng.next_u128().to_be_bytes();
    let id = GeneratedId::of(bits);
    let original = splice_into_body(request, field.name(), id.as_bytes(), rewrite)?;
    Recognized::set_external_id(request, Some(id.as_str().to_owned()));
    Some((
        original,
        Spliced {
            field,
            bits,
            rewrite,
        },
    ))
}

/// The body field that names a create's external id, by API generation.
fn field_name(recognized: &Recognized) -> Option<IdField> {
    match recognized.generation? {
        ApiGeneration::Legacy => Some(IdField::ExternalTaskId),
        _ => Some(IdField::ExternalId),
    }
}

/// Writes `"field":"id"` first into the request's JSON-object body and fixes its
/// `Content-Length`; the original body, or `None` (and the request untouched) when the body is
/// not an object.
fn splice_into_body<B: ReplayBody>(
    request: &mut Request<B>,
    field: &str,
    id: &[u8],
    rewrite: bool,
) -> Option<B> {
    let body = request.body().peek_bytes();
    let rewritten = write_field(&body, field, id, rewrite)?;
    drop(body);
    if request.headers().contains_key(CONTENT_LENGTH) {
        request
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
    }
    Some(std::mem::replace(
        request.body_mut(),
        B::from_bytes(Bytes::from(rewritten)),
    ))
}

/// `body` (a JSON object) with the field set to `id`: spliced in first, or, when the body
/// names the field already (`rewrite`: `"external_task_id":null`, as serializers write an unset
/// optional field), the body parsed and written again with the field set, rather than given a
/// second key (which of two keys a server reads is up to its parser, most read the last, and a
/// create whose id it does not read cannot be looked up, so it would be sent twice). `None`
/// when the body is not an object. Either way the same body gives the same bytes, as
/// [`Spliced::body`] needs.
fn write_field(body: &[u8], field: &str, id: &[u8], rewrite: bool) -> Option<Vec<u8>> {
    if rewrite {
        set_field(body, field, id)
    } else {
        splice_field(body, field, id)
    }
}

/// `body` (a JSON object) with `"field":"id",` inserted first; `None` when the body is not an
/// object. `id` is written as it is: a generated id needs no JSON escaping.
fn splice_field(body: &[u8], field: &str, id: &[u8]) -> Option<Vec<u8>> {
    debug_assert!(
        id.iter()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\'))
    );
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let open = body.iter().position(|b| !is_space(b))?;
    let close = body.iter().rposition(|b| !is_space(b))?;
    if body[open] != b'{' || body[close] != b'}' || close == open {
        return None;
    }
    let empty = body[open + 1..close].iter().all(is_space);
    // Exactly the final length, so `Bytes::from` keeps the buffer as it is.
    let len = body.len() + field.len() + id.len() + 5 + usize::from(!empty);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&body[..=open]);
    out.push(b'"');
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\":\"");
    out.extend_from_slice(id);
    out.push(b'"');
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&body[open + 1..]);
    debug_assert_eq!(out.len(), len);
    Some(out)
}

/// [`write_field`] for a body that names the field already: parsed as a JSON object, the field
/// set to `id` (whatever it held, however often it was written), written out again; `None`
/// when it is not an object. Every other value is written back as its own bytes (a number
/// past what an `f64` holds, a seed, keeps its digits).
#[cold]
fn set_field(body: &[u8], field: &str, id: &[u8]) -> Option<Vec<u8>> {
    use serde_json::value::RawValue;

    let mut object: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(body).ok()?;
    let id = std::str::from_utf8(id).ok()?;
    let id = RawValue::from_string(serde_json::to_string(id).ok()?).ok()?;
    object.insert(field.to_owned(), id);
    serde_json::to_vec(&object).ok()
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use kling_core::PeekBody;
    use proptest::prelude::*;

    use super::*;

    thread_local! {
        /// The candidate lookups [`lookup_path`] tried on this thread.
        pub(super) static TRIED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A long create path (a gateway forwarding its callers' paths) tries at most the last
    /// [`WRITTEN_CUTS`] cuts as written, then the plain paths: every cut was tried, each read
    /// a dozen ways, in time quadratic in the path (minutes for 60 KB). The lookup found is the
    /// same where one of those fits.
    #[test]
    fn a_long_path_tries_a_bounded_number_of_lookups() {
        let prefix = "/a".repeat(6000);
        let most = WRITTEN_CUTS + Reading::ALL.len();
        for (tail, expected) in [
            ("/text-to-video/text-to-video/m/x//../..", None),
            ("/text-to-video/kling-3.0", Some(format!("{prefix}/tasks"))),
        ] {
            TRIED.with(|tried| tried.set(0));
            let found = lookup_path(&format!("{prefix}{tail}"), ApiGeneration::New, "tasks");
            assert_eq!(found, expected, "{tail}");
            let tried = TRIED.with(std::cell::Cell::get);
            assert!(
                tried <= most,
                "{tail}: tried {tried} lookups, at most {most} expected"
            );
        }
    }

    fn create(uri: &str, body: &str) -> Request<Full<Bytes>> {
        let mut request = Request::post(uri)
            .header(AUTHORIZATION, "Bearer k")
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .unwrap();
        request.extensions_mut().insert(AccountId::new("acct"));
        request
    }

    fn read_answer(status: u16, body: &str, new_style: bool) -> &'static str {
        let status = http::StatusCode::from_u16(status).unwrap();
        let outcome = Outcome::parse(
            status,
            &http::HeaderMap::new(),
            body.as_bytes(),
            tokio::time::Instant::now(),
        )
        .unwrap();
        match read(body.as_bytes(), &outcome, "job", new_style) {
            Lookup::Found(id) => {
                assert_eq!(id, "t1", "{body}");
                "found"
            }
            Lookup::NotFound => "not found",
            Lookup::Inconclusive => "inconclusive",
        }
    }

    #[test]
    fn only_1203_or_an_empty_new_style_list_is_not_found() {
        let ok = |data: &str| format!(r#"{{"code":0,"message":"SUCCEED","data":{data}}}"#);
        for (status, body, new_style, expected) in [
            (
                404,
                r#"{"code":1203,"message":"task not found"}"#.to_owned(),
                false,
                "not found",
            ),
            (
                404,
                r#"{"code":1203,"message":"task not found"}"#.to_owned(),
                true,
                "not found",
            ),
            (200, ok("[]"), true, "not found"),
            (
                200,
                ok(r#"{"task_id":"t1","task_status":"submitted"}"#),
                false,
                "found",
            ),
            (
                200,
                ok(
                    r#"{"task_id":"t1","task_status":"submitted","task_info":{"external_task_id":"job"}}"#,
                ),
                false,
                "found",
            ),
            (
                200,
                ok(r#"[{"id":"t1","status":"submitted","external_id":"job"}]"#),
                true,
                "found",
            ),
            // Code 0 with no task the layer can read: the create may exist.
            (200, ok("[]"), false, "inconclusive"),
            (200, ok("null"), false, "inconclusive"),
            (200, ok("null"), true, "inconclusive"),
            (
                200,
                r#"{"code":0,"message":"SUCCEED"}"#.to_owned(),
                true,
                "inconclusive",
            ),
            (200, ok(r#"{"task_id":"t1"}"#), false, "inconclusive"),
            (200, ok(r#"{"tasks":[]}"#), true, "inconclusive"),
            (200, ok(r#"[{"id":"t1"}]"#), true, "inconclusive"),
            // A list of other ids' tasks is no answer about ours (a filter the server
            // ignored, a page of the account's tasks): the create may exist.
            (
                200,
                ok(r#"[{"id":"t2","status":"submitted","external_id":"other"}]"#),
                true,
                "inconclusive",
            ),
            // Ours is the one that names our id, wherever it stands.
            (
                200,
                ok(
                    r#"[{"id":"t9","status":"succeeded"},{"id":"t1","status":"submitted","external_id":"job"}]"#,
                ),
                true,
                "found",
            ),
            (
                200,
                ok(
                    r#"[{"id":"t2","status":"submitted","external_id":"other"},{"id":"t1","status":"submitted","external_id":"job"}]"#,
                ),
                true,
                "found",
            ),
            // A task naming no id is ours only when it is the whole answer: one of several is
            // a page of the account's tasks, and a legacy list is no single task's answer.
            (
                200,
                ok(r#"[{"id":"t1","status":"submitted"}]"#),
                true,
                "found",
            ),
            (
                200,
                ok(r#"[{"id":"t9","status":"succeeded"},{"id":"t8","status":"failed"}]"#),
                true,
                "inconclusive",
            ),
            (
                200,
                ok(
                    r#"[{"task_id":"t9","task_status":"succeed"},{"task_id":"t8","task_status":"failed"}]"#,
                ),
                false,
                "inconclusive",
            ),
            (
                200,
                ok(r#"[{"task_id":"t9","task_status":"succeed"}]"#),
                false,
                "inconclusive",
            ),
            // Other errors.
            (
                500,
                r#"{"code":5000,"message":"internal error"}"#.to_owned(),
                true,
                "inconclusive",
            ),
            (
                403,
                r#"{"code":1103,"message":"no permission"}"#.to_owned(),
                false,
                "inconclusive",
            ),
        ] {
            assert_eq!(
                read_answer(status, &body, new_style),
                expected,
                "{body} new: {new_style}"
            );
        }
    }

    #[test]
    fn legacy_lookups_query_the_create_path() {
        let mut req = create(
            "http://127.0.0.1:9/v1/videos/text2video",
            r#"{"external_task_id":"job 1"}"#,
        );
        let recognized = Recognized::of(&mut req).clone();
        let lookup = request(&req, &recognized, "job 1").unwrap();
        assert_eq!(lookup.method(), Method::GET);
        assert_eq!(
            lookup.uri().to_string(),
            "http://127.0.0.1:9/v1/videos/text2video/job%201"
        );
        assert_eq!(lookup.headers()[AUTHORIZATION], "Bearer k");
        assert_eq!(AccountId::of(&lookup).unwrap().as_str(), "acct");
        // Ids URL normalisation would take away (the query then lists the account's tasks):
        // not looked up. Dots inside an id stay.
        for id in ["", ".", ".."] {
            assert!(request(&req, &recognized, id).is_none(), "{id:?}");
        }
        let lookup = request(&req, &recognized, "..a").unwrap();
        assert_eq!(lookup.uri().path(), "/v1/videos/text2video/..a");
    }

    /// The server counts a lookup against the rate: it carries the create's send counter, so
    /// a metrics layer that counts requests as they are sent sees it.
    #[test]
    fn a_lookup_carries_the_creates_send_counter() {
        struct Counted;
        impl kling_core::signals::CountSent for Counted {
            fn attached(&self) {}
            fn sent(&self, _: tokio::time::Instant) {}
        }
        let counted = std::sync::Arc::new(Counted);
        let mut req = create(
            "http://127.0.0.1:9/v1/videos/text2video",
            r#"{"external_task_id":"job 1"}"#,
        );
        SendCounter::set(&mut req, SendCounter::new(counted.clone()));
        let recognized = Recognized::of(&mut req).clone();
        assert_eq!(std::sync::Arc::strong_count(&counted), 2);
        let lookup = request(&req, &recognized, "job 1").unwrap();
        assert!(SendCounter::of(&lookup).is_some());
        assert_eq!(
            std::sync::Arc::strong_count(&counted),
            3,
            "the lookup holds the counter"
        );
        assert_eq!(AccountId::of(&lookup).unwrap().as_str(), "acct");
        // A create without a counter makes a lookup without one.
        let mut bare = create(
            "http://127.0.0.1:9/v1/videos/text2video",
            r#"{"external_task_id":"job 1"}"#,
        );
        let recognized = Recognized::of(&mut bare).clone();
        assert!(SendCounter::of(&request(&bare, &recognized, "job 1").unwrap()).is_none());
    }

    #[test]
    fn new_style_lookups_query_tasks_under_the_same_prefix() {
        let mut req = create(
            "https://h/api/text-to-video/kling-3.0",
            r#"{"external_id":"e"}"#,
        );
        let recognized = Recognized::of(&mut req).clone();
        let lookup = request(&req, &recognized, "e").unwrap();
        assert_eq!(
            lookup.uri().to_string(),
            "https://h/api/tasks?external_task_ids=e"
        );
        let mut req = create("/text-to-video/kling-3.0", r#"{"external_id":"e"}"#);
        let recognized = Recognized::of(&mut req).clone();
        let lookup = request(&req, &recognized, "e").unwrap();
        assert_eq!(lookup.uri().to_string(), "/tasks?external_task_ids=e");
        // Ids a comma-separated list cannot carry as they are: not looked up.
        for id in ["a,b", " e", "e "] {
            assert!(request(&req, &recognized, id).is_none(), "{id:?}");
        }
    }

    /// Every shape of a create's path gets the lookup each server that routes it as a create
    /// routes to that create's lookup, or none; the mismatches are gathered, so that a run
    /// names each shape that is wrong.
    #[test]
    fn lookups_are_built_where_every_reading_of_the_create_routes_them() {
        let mut wrong = Vec::new();
        for (path, id, expected) in [
            // New-style: the base path as each reading reads it.
            (
                "/k/text-to-video/kling-3.0",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k/text-to-video/x/..;/kling-3.0",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k/text-to-video/kling-3.0/;x",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k/text-to-video/kling-3.0;v=2",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k/text-to-video/kling-3.0/x/..;a",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k/text-to-video/kling-3.0/.",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k/text-to-video/kling-3.0/x/%2e%2E",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k/text-to-video/%2E/kling-3.0",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/text-to-video/x/..;/kling-3.0",
                "e",
                Some("/tasks?external_task_ids=e"),
            ),
            (
                "/k%2Ftext-to-video/kling-3.0",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k/text-to-video%2Fkling-3.0",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            (
                "/k//text-to-video//kling-3.0//",
                "e",
                Some("/k/tasks?external_task_ids=e"),
            ),
            // Kept as written where each reading reads its own base path in it.
            (
                "/k;p/text-to-video/kling-3.0",
                "e",
                Some("/k;p/tasks?external_task_ids=e"),
            ),
            (
                "/a%2Fb/text-to-video/kling-3.0",
                "e",
                Some("/a%2Fb/tasks?external_task_ids=e"),
            ),
            (
                "/k/x//../text-to-video/kling-3.0",
                "e",
                Some("/k/x//../tasks?external_task_ids=e"),
            ),
            // Readings that route the create to two base paths no one lookup is under.
            ("/text-to-video/text-to-video/m/x//../..", "e", None),
            // Legacy: `{create path}/{id}`, written as the create's path is.
            (
                "/v1;a=b/videos/text2video",
                "j",
                Some("/v1;a=b/videos/text2video/j"),
            ),
            (
                "/v1/videos/text2video/;x",
                "j",
                Some("/v1/videos/text2video/;x/j"),
            ),
            (
                "/v1/videos/x/..;/text2video",
                "j",
                Some("/v1/videos/x/..;/text2video/j"),
            ),
            (
                "/v1/videos/text2video/x/..",
                "j",
                Some("/v1/videos/text2video/x/../j"),
            ),
            (
                "/v1%2Fvideos%2Ftext2video",
                "j",
                Some("/v1%2Fvideos%2Ftext2video/j"),
            ),
            (
                "/v1/videos/text2video",
                "a;b",
                Some("/v1/videos/text2video/a%3Bb"),
            ),
            // An id a decoding proxy splits at its `%2F`, or that normalization removes.
            ("/v1/videos/text2video", "a/b", None),
            ("/v1/videos/text2video", "..", None),
        ] {
            let mut req = create(&format!("https://h{path}"), "{}");
            let recognized = Recognized::of(&mut req).clone();
            assert!(recognized.is_create(), "{path}");
            let built = request(&req, &recognized, id).map(|lookup| {
                let uri = lookup.uri();
                assert_eq!(uri.authority().unwrap().as_str(), "h");
                uri.path_and_query().unwrap().to_string()
            });
            if built.as_deref() != expected {
                wrong.push(format!("{path} ({id}): {built:?}, not {expected:?}"));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// A create only a server that reads its `%2F`s as `/`s, removes `;` parameters and
    /// decodes escapes routes (kling-core's own reading) is looked up where that reading
    /// routes the lookup.
    #[test]
    fn a_create_only_kling_cores_reading_routes_is_looked_up_there() {
        for (path, id, expected) in [
            (
                "/k/%74ext-to-video;a%2Fkling-3.0",
                "e",
                "/k/tasks?external_task_ids=e",
            ),
            (
                "/v1/%76ideos;a%2Ftext2video",
                "j",
                "/v1/%76ideos;a%2Ftext2video/j",
            ),
        ] {
            let mut req = create(&format!("https://h{path}"), "{}");
            let recognized = Recognized::of(&mut req).clone();
            assert!(recognized.is_create(), "{path}");
            let built = request(&req, &recognized, id)
                .map(|lookup| lookup.uri().path_and_query().unwrap().to_string());
            assert_eq!(built.as_deref(), Some(expected), "{path}");
        }
    }

    /// Each reading is kling-core's reading of the path but for what it keeps as written:
    /// parameters (kept, not removed), escapes and dot segments (kept, not normalized).
    #[test]
    fn every_reading_reads_a_path_as_kling_core_does_but_what_it_keeps() {
        let path = "/v1;a/x//..;b/%2e%2E/%74ext2video%2Fj/./k";
        let expected: [&[&str]; 12] = [
            &["v1;a", "x", "..;b", "%2e%2E", "%74ext2video%2Fj", ".", "k"],
            &["v1", "x", "..", "%2e%2E", "%74ext2video%2Fj", ".", "k"],
            &["v1;a", "x", "..;b", "%2e%2E", "%74ext2video", "j", ".", "k"],
            &["v1", "x", "..", "%2e%2E", "%74ext2video", "j", ".", "k"],
            &["v1;a", "x", "text2video%2Fj", "k"],
            &["v1", "text2video%2Fj", "k"],
            &["v1;a", "x", "text2video", "j", "k"],
            &["v1", "text2video", "j", "k"],
            &["v1;a", "x", "text2video%2Fj", "k"],
            &["text2video%2Fj", "k"],
            &["v1;a", "x", "text2video", "j", "k"],
            &["text2video", "j", "k"],
        ];
        for (reading, expected) in Reading::ALL.into_iter().zip(expected) {
            let read = reading.segments(path).expect("a URI's path");
            assert_eq!(read, expected, "{reading:?}");
            if reading.strip_params && reading.dots != Dots::Kept {
                // kling-core's own reading, as it gives it.
                let core =
                    Route::read_path(path, reading.decode_slashes, reading.dots == Dots::Merged);
                let core: Vec<&str> = core.split('/').filter(|s| !s.is_empty()).collect();
                assert_eq!(read, core, "{reading:?}");
            }
        }
        // A path holding a character a reading hides others behind is read by none.
        assert_eq!(Reading::ALL[0].segments("/v1/\u{1}"), None);
    }

    fn generated_id(seed: u64) -> String {
        let rng = crate::rng::SplitMix::seeded(seed);
        format!("kr-{:016x}{:016x}", rng.next_u64(), rng.next_u64())
    }

    #[test]
    fn a_generated_id_is_written_into_the_body_and_the_cached_recognition() {
        let rng = crate::rng::SplitMix::seeded(1);
        let mut req = create("/v1/videos/text2video", r#"{"prompt":"cat"}"#);
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(16));
        let (original, spliced) = add_generated_id(&mut req, &rng).expect("an id was written");
        let id = generated_id(1);
        let body = req.body().peek_bytes();
        assert_eq!(original.peek_bytes(), r#"{"prompt":"cat"}"#.as_bytes());
        assert_eq!(
            spliced.body(&original).peek_bytes(),
            body,
            "written again the same"
        );
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!(r#"{{"external_task_id":"{id}","prompt":"cat"}}"#)
        );
        assert_eq!(
            req.headers()[CONTENT_LENGTH],
            body.len().to_string().as_str()
        );
        let cached = Recognized::cached(&req).expect("recognised once, and kept");
        assert_eq!(cached.external_id.as_deref(), Some(id.as_str()));
        assert_eq!(*cached, Recognized::from_request(&req));

        let rng = crate::rng::SplitMix::seeded(2);
        let mut req = create("/text-to-video/kling-3.0", r#"{"prompt":"cat"}"#);
        add_generated_id(&mut req, &rng);
        let id = generated_id(2);
        assert!(
            String::from_utf8_lossy(&req.body().peek_bytes())
                .starts_with(&format!(r#"{{"external_id":"{id}","#))
        );
        assert_eq!(
            Recognized::cached(&req).unwrap().external_id.as_deref(),
            Some(id.as_str())
        );
        assert!(!req.headers().contains_key(CONTENT_LENGTH));
    }

    #[test]
    fn only_creates_without_an_id_and_with_an_object_body_get_one() {
        let rng = crate::rng::SplitMix::seeded(1);
        for (method, uri, body) in [
            (
                Method::POST,
                "/v1/videos/text2video",
                r#"{"external_task_id":"mine"}"#,
            ),
            (
                Method::POST,
                "/text-to-video/kling-3.0",
                r#"{"external_id":"mine"}"#,
            ),
            (Method::POST, "/v1/videos/text2video", "[1]"),
            (Method::POST, "/v1/videos/text2video", "not json"),
            (Method::GET, "/v1/videos/text2video/t1", ""),
            (Method::POST, "/account/costs", "{}"),
        ] {
            let mut req = create(uri, body);
            *req.method_mut() = method;
            assert!(add_generated_id(&mut req, &rng).is_none(), "{uri} {body}");
            assert_eq!(req.body().peek_bytes(), body.as_bytes(), "{uri} {body}");
            let cached = Recognized::cached(&req).expect("recognised");
            assert_eq!(*cached, Recognized::from_request(&req), "{uri} {body}");
            assert!(
                cached.external_id.as_deref().is_none_or(|id| id == "mine"),
                "{uri} {body}"
            );
        }
    }

    proptest! {
        /// The cached recognition updated in place agrees with recognising the rewritten
        /// request afresh, and the body is the caller's JSON plus the id.
        #[test]
        fn the_updated_recognition_matches_a_fresh_one(
            legacy in any::<bool>(),
            fields in prop::collection::btree_map(
                prop_oneof![
                    Just("n".to_owned()),
                    Just("callback_url".to_owned()),
                    Just("prompt".to_owned()),
                    "[a-z_]{1,12}",
                ],
                prop_oneof![
                    Just(serde_json::Value::Null),
                    (0u32..20).prop_map(serde_json::Value::from),
                    ".{0,16}".prop_map(serde_json::Value::from),
                ],
                0..5,
            ),
            space in "[ \t\r\n]{0,2}",
            seed in any::<u64>(),
        ) {
            let field = if legacy { "external_task_id" } else { "external_id" };
            let mut object: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .filter(|(key, _)| key != "external_task_id" && key != "external_id")
                // A `callback_url` or `options` of the wrong type fails the typed parse of the
                // whole body (so a fresh recognition finds no id); Kling refuses such a body.
                .filter(|(key, value)| match key.as_str() {
                    "callback_url" => value.is_null() || value.is_string(),
                    "options" => value.is_null(),
                    _ => true,
                })
                .collect();
            let body = format!("{space}{}{space}", serde_json::Value::Object(object.clone()));
            let uri = if legacy { "/v1/images/generations" } else { "/text-to-image/kling-3.0" };
            let mut req = Request::post(uri)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let (original, spliced) = add_generated_id(&mut req, &crate::rng::SplitMix::seeded(seed))
                .expect("an object body takes an id");
            prop_assert_eq!(spliced.body(&original).peek_bytes(), req.body().peek_bytes());
            let id = generated_id(seed);
            let cached = Recognized::cached(&req).expect("recognised").clone();
            prop_assert_eq!(cached.external_id.as_deref(), Some(id.as_str()));
            prop_assert_eq!(&cached, &Recognized::from_request(&req));
            let sent: serde_json::Value = serde_json::from_slice(&req.body().peek_bytes()).unwrap();
            object.insert(field.to_owned(), id.into());
            prop_assert_eq!(sent, serde_json::Value::Object(object));
        }
    }

    #[test]
    fn the_spliced_body_is_the_same_json_with_the_id() {
        for (body, expected) in [
            (
                r#"{"prompt":"cat"}"#,
                r#"{"external_task_id":"kr-1","prompt":"cat"}"#,
            ),
            (" { } ", r#" {"external_task_id":"kr-1" } "#),
            ("{}", r#"{"external_task_id":"kr-1"}"#),
            (
                "\n{\"n\":1}\t",
                "\n{\"external_task_id\":\"kr-1\",\"n\":1}\t",
            ),
        ] {
            let out = splice_field(body.as_bytes(), "external_task_id", b"kr-1").unwrap();
            assert_eq!(String::from_utf8(out.clone()).unwrap(), expected);
            let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(value["external_task_id"], "kr-1");
        }
        for not_an_object in ["", "  ", "[1]", "\"x\"", "not json", "{", "}"] {
            assert_eq!(splice_field(not_an_object.as_bytes(), "f", b"1"), None);
        }
    }

    /// A body that names the field already (unset, empty, or spelled with an escape) gets it
    /// set, not a second key that a server reading the last would ignore; a retry writes the
    /// same bytes again.
    #[test]
    fn a_body_that_names_the_field_already_gets_it_set_not_twice() {
        for body in [
            r#"{"prompt":"cat","external_task_id":null}"#,
            r#"{"external_task_id":"","prompt":"cat"}"#,
            r#"{"prompt":"cat","\u0065xternal_task_id":null}"#,
            // Written twice: which one a server reads is not known, so neither is taken.
            r#"{"external_task_id":null,"prompt":"cat","external_task_id":"job-1"}"#,
            r#"{"external_task_id":"job-1","prompt":"cat","external_task_id":"job-1"}"#,
        ] {
            let mut req = create("/v1/videos/text2video", body);
            let rng = crate::rng::SplitMix::seeded(4);
            let (original, spliced) = add_generated_id(&mut req, &rng).expect("an id");
            let sent = req.body().peek_bytes();
            let text = String::from_utf8(sent.to_vec()).unwrap();
            assert_eq!(text.matches("external_task_id").count(), 1, "{text}");
            let value: serde_json::Value = serde_json::from_slice(&sent).unwrap();
            assert_eq!(
                value["external_task_id"],
                generated_id(4).as_str(),
                "{body}"
            );
            assert_eq!(value["prompt"], "cat", "{body}");
            assert_eq!(spliced.body(&original).peek_bytes(), sent, "{body}");
        }
    }

    /// The rewrite keeps every other value's bytes: a number past an `f64`'s precision (a seed)
    /// is sent as the caller wrote it.
    #[test]
    fn a_rewritten_body_keeps_other_values_as_written() {
        let body = r#"{"external_task_id":null,"seed":18446744073709551616,"cfg":0.10000000000000000001,"prompt":"c\u00e4t"}"#;
        let mut req = create("/v1/videos/text2video", body);
        let rng = crate::rng::SplitMix::seeded(4);
        add_generated_id(&mut req, &rng).expect("an id");
        let text = String::from_utf8(req.body().peek_bytes().to_vec()).unwrap();
        assert!(text.contains(r#""seed":18446744073709551616"#), "{text}");
        assert!(text.contains(r#""cfg":0.10000000000000000001"#), "{text}");
        assert!(text.contains(r#""prompt":"c\u00e4t""#), "{text}");
        assert_eq!(text.matches("external_task_id").count(), 1, "{text}");
    }

    #[test]
    fn generated_ids_are_kr_and_32_hex_digits() {
        let rng = crate::rng::SplitMix::seeded(3);
        let generated = GeneratedId::of(rng.next_u128().to_be_bytes());
        let id = generated.as_str();
        assert_eq!(id.len(), 35);
        assert!(id.starts_with("kr-"));
        assert!(
            id[3..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(id, generated_id(3));
        assert_eq!(generated.as_bytes(), id.as_bytes());
        // Every byte value maps to its two digits.
        for byte in 0..=255u8 {
            assert_eq!(
                HEX_PAIRS[usize::from(byte)],
                *format!("{byte:02x}").as_bytes()
            );
        }
    }
}
