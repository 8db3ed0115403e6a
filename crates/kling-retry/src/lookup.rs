//! Looking a create up by its external id before sending it again, and giving creates an
//! external id.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::{HeaderValue, Method, Request, Uri};
use kling_core::{AccountId, ApiGeneration, Code, Outcome, Recognized};

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
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovered {
    /// The create's external id.
    pub external_id: String,
    /// The id of the task the lookup found.
    pub task_id: String,
}

/// What a lookup says.
pub(crate) enum Lookup {
    Found(String),
    NotFound,
    /// An error response or a malformed answer: judge it like any other attempt.
    Inconclusive,
}

/// Reads a lookup response.
pub(crate) fn read(outcome: &Outcome, external_id: &str) -> Lookup {
    if outcome.code() == Code::NotFound {
        return Lookup::NotFound;
    }
    if !outcome.is_success() {
        return Lookup::Inconclusive;
    }
    let found = outcome.tasks().iter().find(|task| {
        task.external_id
            .as_deref()
            .is_none_or(|id| id == external_id)
    });
    match found {
        Some(task) => Lookup::Found(task.id.clone()),
        None => Lookup::NotFound,
    }
}

/// The query that finds a create by its external id, with the create's account and
/// `Authorization` (the auth layer below sets a fresh one anyway). `None` when the create's URI
/// cannot carry it.
pub(crate) fn request<B: ReplayBody>(
    create: &Request<B>,
    recognized: &Recognized,
    external_id: &str,
) -> Option<Request<B>> {
    let uri = create.uri();
    let path = uri.path().trim_end_matches('/');
    let id = encode(external_id);
    let path_and_query = match recognized.generation? {
        ApiGeneration::Legacy => format!("{path}/{id}"),
        _ => {
            // `{prefix}/{product}/{model}` → `{prefix}/tasks`.
            let mut parts = path.rsplitn(3, '/');
            let (_model, _product) = (parts.next()?, parts.next()?);
            let prefix = parts.next().unwrap_or("");
            format!("{prefix}/tasks?external_task_ids={id}")
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
        lookup.extensions_mut().insert(account.clone());
    }
    Some(lookup)
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

/// A fresh external id: `kr-` and 32 hex digits.
pub(crate) fn generate(rng: &dyn RandomSource) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Filled as bytes, then checked once (35 ASCII bytes), instead of 32 `String::push`es.
    let mut id = [0u8; 35];
    id[..3].copy_from_slice(b"kr-");
    for (half, word) in [rng.next_u64(), rng.next_u64()].into_iter().enumerate() {
        for (digit, out) in id[3 + half * 16..][..16].iter_mut().enumerate() {
            *out = HEX[((word >> ((15 - digit) * 4)) & 0xf) as usize];
        }
    }
    String::from_utf8(id.to_vec()).expect("hex digits are ASCII")
}

/// Adds `external_id` to a create's JSON body (`external_task_id` on legacy paths, `external_id`
/// on new-style ones) and refreshes the cached [`Recognized`]. A body that is not a JSON
/// object is left alone (the server will refuse it anyway).
///
/// The field is spliced in after the opening brace, so the body is not parsed again nor
/// re-serialized (the create's bytes, large base64 images included, are copied once).
pub(crate) fn set_external_id<B: ReplayBody>(request: &mut Request<B>, external_id: String) {
    let field = match Recognized::of(request).generation {
        Some(ApiGeneration::Legacy) => "external_task_id",
        Some(_) => "external_id",
        None => return,
    };
    let body = request.body().peek_bytes();
    let Some(rewritten) = splice_field(&body, field, &external_id) else {
        return;
    };
    if request.headers().contains_key(CONTENT_LENGTH) {
        request
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
    }
    *request.body_mut() = B::from_bytes(Bytes::from(rewritten));
    match request.extensions_mut().get_mut::<Recognized>() {
        Some(recognized) => recognized.external_id = Some(external_id),
        None => {
            let refreshed = Recognized::from_request(request);
            request.extensions_mut().insert(refreshed);
        }
    }
}

/// `body` (a JSON object) with `"field":"value",` inserted first; `None` when the body is not
/// an object.
fn splice_field(body: &[u8], field: &str, value: &str) -> Option<Vec<u8>> {
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let open = body.iter().position(|b| !is_space(b))?;
    let close = body.iter().rposition(|b| !is_space(b))?;
    if body[open] != b'{' || body[close] != b'}' || close == open {
        return None;
    }
    let empty = body[open + 1..close].iter().all(is_space);
    // A generated id needs no escaping: quote it in place instead of serializing it.
    let plain = value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    let escaped = if plain {
        None
    } else {
        Some(serde_json::to_string(value).ok()?)
    };
    let quoted_len = escaped.as_ref().map_or(value.len() + 2, String::len);
    let mut out = Vec::with_capacity(body.len() + field.len() + quoted_len + 4);
    out.extend_from_slice(&body[..=open]);
    out.push(b'"');
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\":");
    match &escaped {
        Some(escaped) => out.extend_from_slice(escaped.as_bytes()),
        None => {
            out.push(b'"');
            out.extend_from_slice(value.as_bytes());
            out.push(b'"');
        }
    }
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&body[open + 1..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use kling_core::PeekBody;

    use super::*;

    fn create(uri: &str, body: &'static str) -> Request<Full<Bytes>> {
        let mut request = Request::post(uri)
            .header(AUTHORIZATION, "Bearer k")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        request.extensions_mut().insert(AccountId::new("acct"));
        request
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
    }

    #[test]
    fn an_external_id_is_written_into_the_body() {
        let mut req = create("/v1/videos/text2video", r#"{"prompt":"cat"}"#);
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(16));
        set_external_id(&mut req, "kr-1".to_owned());
        assert_eq!(
            Recognized::of(&mut req).external_id.as_deref(),
            Some("kr-1")
        );
        let body = req.body().peek_bytes();
        assert_eq!(
            req.headers()[CONTENT_LENGTH],
            body.len().to_string().as_str()
        );

        let mut req = create("/text-to-video/kling-3.0", r#"{"prompt":"cat"}"#);
        set_external_id(&mut req, "kr-2".to_owned());
        assert!(
            String::from_utf8_lossy(&req.body().peek_bytes()).contains(r#""external_id":"kr-2""#)
        );
    }

    #[test]
    fn the_spliced_body_is_the_same_json_with_the_id() {
        for (body, expected) in [
            (
                r#"{"prompt":"cat"}"#,
                r#"{"external_task_id":"a\"b","prompt":"cat"}"#,
            ),
            (" { } ", r#" {"external_task_id":"a\"b" } "#),
            ("{}", r#"{"external_task_id":"a\"b"}"#),
        ] {
            let out = splice_field(body.as_bytes(), "external_task_id", "a\"b").unwrap();
            assert_eq!(String::from_utf8(out.clone()).unwrap(), expected);
            let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(value["external_task_id"], "a\"b");
        }
        for value in [
            "kr-0123abcd",
            "caf\u{e9} \u{7f}",
            "tab\there",
            "back\\slash",
        ] {
            let out = splice_field(br#"{"n":1}"#, "external_id", value).unwrap();
            let expected = format!(
                r#"{{"external_id":{},"n":1}}"#,
                serde_json::to_string(value).unwrap()
            );
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
        for not_an_object in ["", "  ", "[1]", "\"x\"", "not json", "{", "}"] {
            assert_eq!(splice_field(not_an_object.as_bytes(), "f", "v"), None);
        }
    }

    #[test]
    fn generated_ids_are_kr_and_32_hex_digits() {
        let rng = crate::rng::SplitMix::seeded(3);
        let id = generate(&rng);
        assert_eq!(id.len(), 35);
        assert!(id.starts_with("kr-"));
        assert!(
            id[3..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let again = crate::rng::SplitMix::seeded(3);
        let (a, b) = (again.next_u64(), again.next_u64());
        assert_eq!(id, format!("kr-{a:016x}{b:016x}"));
    }
}
