//! Recognising what a request is: a create (which pool, what weight), a query, a list, an
//! account request or something else, for both API generations.
//!
//! Only creates take task slots; an image create takes `n` of them. Every layer that needs to
//! know reads one [`Recognized`], computed once per request and kept in its extensions.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::{Method, Request, Uri};
use serde::Deserialize;

use crate::account::AccountId;
use crate::body::PeekBody;
use crate::route::Route;
use crate::signals::CallContext;

/// Which generation of the Kling API a path belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ApiGeneration {
    /// `/v1/videos/text2video` and friends: `task_id`, `task_status`, `succeed`.
    Legacy,
    /// `/text-to-video/kling-3.0` and `/tasks`: `id`, `status`, `succeeded`.
    New,
}

/// The resource-pack type a create draws its slots from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Product {
    /// Video generation.
    Video,
    /// Image generation (weight `n`).
    Image,
    /// Virtual try-on.
    TryOn,
}

impl Product {
    /// The product's name in pool names and metric labels: `video`, `image`, `try-on`.
    pub fn as_str(self) -> &'static str {
        match self {
            Product::Video => "video",
            Product::Image => "image",
            Product::TryOn => "try-on",
        }
    }
}

/// A concurrency pool: a product, and for new-style paths the model version.
///
/// Displayed as `video`, `image`, `try-on` (legacy paths) or `video:kling-3.0` (new-style), the
/// same names `kling-mock` reports.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pool {
    product: Product,
    model: Option<Arc<str>>,
}

impl Pool {
    /// A pool of a product shared by all models (legacy paths).
    pub fn new(product: Product) -> Self {
        Pool {
            product,
            model: None,
        }
    }

    /// A pool of one model version of a product (new-style paths). An empty model names no
    /// model: the product's pool (`video:` would not parse back as a pool).
    pub fn with_model(product: Product, model: impl Into<Arc<str>>) -> Self {
        let model: Arc<str> = model.into();
        Pool {
            product,
            model: (!model.is_empty()).then_some(model),
        }
    }

    /// The product.
    pub fn product(&self) -> Product {
        self.product
    }

    /// The model version, for new-style paths.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Parses the display form back (`video`, `image:kling-v2`); `None` for unknown products.
    pub fn parse(name: &str) -> Option<Pool> {
        let (product, model) = match name.split_once(':') {
            Some((product, model)) if !model.is_empty() => (product, Some(model)),
            Some(_) => return None,
            None => (name, None),
        };
        let product = match product {
            "video" => Product::Video,
            "image" => Product::Image,
            "try-on" => Product::TryOn,
            _ => return None,
        };
        Some(Pool {
            product,
            model: model.map(Arc::from),
        })
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.model {
            Some(model) => write!(f, "{}:{}", self.product.as_str(), model),
            None => f.write_str(self.product.as_str()),
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pool({self})")
    }
}

/// Which pool a create's slots count in: its model version's (the default) or its product's.
///
/// Kling counts running tasks per resource-pack type (video, image, try-on) and, per its newer
/// pages, per model version; which holds for an account is not documented for certain. With
/// [`PoolScope::Model`] a new-style create counts in `video:kling-3.0`, so tasks of two models
/// run side by side; with [`PoolScope::Product`] every create of a product counts in `video`,
/// legacy and new-style alike, so they share one capacity. Counting too finely is answered
/// with `1303`s (which the slots absorb); too coarsely, with slots left idle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoolScope {
    /// Each model version of a product has its own pool (`video:kling-3.0`); legacy paths
    /// count in their product's (`video`).
    #[default]
    Model,
    /// Every create of a product counts in the product's pool (`video`), whatever its model.
    Product,
}

impl PoolScope {
    /// The pool a create in `pool` counts in under this scope.
    pub fn apply(self, pool: Pool) -> Pool {
        match self {
            PoolScope::Product if pool.model.is_some() => Pool::new(pool.product),
            _ => pool,
        }
    }

    /// The scope's name: `model` or `product`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolScope::Model => "model",
            PoolScope::Product => "product",
        }
    }
}

impl fmt::Display for PoolScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PoolScope {
    type Err = UnknownPoolScope;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "model" => Ok(PoolScope::Model),
            "product" => Ok(PoolScope::Product),
            _ => Err(UnknownPoolScope(())),
        }
    }
}

/// A pool scope name other than `model` or `product`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPoolScope(());

impl fmt::Display for UnknownPoolScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("pool scope must be `model` or `product`")
    }
}

impl std::error::Error for UnknownPoolScope {}

/// What kind of request this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RequestKind {
    /// Creates a generation task: takes slots.
    Create,
    /// Queries one task (legacy) or a batch of tasks (`GET /tasks`).
    Query,
    /// Lists tasks (legacy `GET {create path}`, new `POST /tasks`).
    List,
    /// `/account/costs`: resource-pack information (1 query per second at most).
    Account,
    /// Anything else.
    Other,
}

impl RequestKind {
    /// The kind's name in metric labels and spans.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Create => "create",
            RequestKind::Query => "query",
            RequestKind::List => "list",
            RequestKind::Account => "account",
            RequestKind::Other => "other",
        }
    }
}

/// The image weight range Kling accepts (`n` from 1 to 9).
const MAX_IMAGE_WEIGHT: u32 = 9;

/// What a request is, as far as limits care.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recognized {
    /// The kind of request.
    pub kind: RequestKind,
    /// The API generation of its path, when known.
    pub generation: Option<ApiGeneration>,
    /// The pool a create draws from (`None` for everything else).
    pub pool: Option<Pool>,
    /// Slots a create takes: `n` for images (clamped to 1..=9), else 1; 0 for non-creates.
    pub weight: u32,
    /// The create's own id: `external_task_id` on legacy paths, `external_id` on new-style ones
    /// (each generation's server reads its own field only).
    pub external_id: Option<String>,
    /// Whether the create's body names its generation's own-id field, whatever it holds: a
    /// field written unset (`"external_task_id":null`, or empty) leaves
    /// [`external_id`](Self::external_id) `None`, and a layer that writes an id in must set that
    /// field rather than add a second one.
    pub names_own_id: bool,
    /// Whether the create asks for a callback.
    pub has_callback: bool,
    /// The task ids a query asks about (the path's id, or `task_ids=`), decoded as the server
    /// reads them (in a query, a `+` is a space).
    pub task_ids: Vec<String>,
    /// The external ids a batch query asks about (`external_task_ids=`), decoded likewise.
    pub external_ids: Vec<String>,
    /// Whether the path names one of Kling's endpoints that answer at once with no task
    /// ([`Route::answers_at_once`]): a `POST` there is no create, though its kind is
    /// [`RequestKind::Other`] as an unknown one's is.
    pub answers_at_once: bool,
}

impl Recognized {
    /// Recognises a request from its method, URI and (for creates) JSON body.
    ///
    /// The body is only parsed for creates; a body that is not JSON leaves the defaults
    /// (weight 1, no external id) and the server will reject it.
    pub fn from_parts(method: &Method, uri: &Uri, body: &[u8]) -> Recognized {
        // The path decides the kind, generation and pool; the body and the query the rest.
        let route = Route::of(method, uri.path());
        let mut recognized = Recognized {
            kind: route.kind,
            generation: route.generation,
            pool: route.pool(),
            weight: 0,
            external_id: None,
            names_own_id: false,
            has_callback: false,
            task_ids: Vec::new(),
            external_ids: Vec::new(),
            answers_at_once: route.answers_at_once,
        };
        match (route.kind, route.generation, route.product) {
            (RequestKind::Create, Some(generation), Some(product)) => {
                recognized.read_create_body(product, generation, body);
            }
            (RequestKind::Query, _, _) => match route.task_id {
                Some(id) => recognized.task_ids.push(percent_decoded(id).into_owned()),
                None => recognized.read_batch_query(uri.query().unwrap_or("")),
            },
            _ => {}
        }
        recognized
    }

    /// Recognises a request, using (or filling) the copy cached in its extensions.
    ///
    /// The copy is kept in the request's one combined signal extension
    /// ([`signals`](crate::signals)) behind an `Arc`, so a retry layer's copy of the request
    /// shares it; a `Recognized` extension the caller inserted is used as is.
    pub fn of<B: PeekBody>(request: &mut Request<B>) -> &Recognized {
        // A standalone extension is looked for only when the map holds something besides the
        // combined one, and a new copy is returned from where it was put: two lookups where a
        // request is recognised, not four.
        let (call, others) = CallContext::with_others(request);
        if call.is_some_and(|call| call.recognized.is_some())
            || CallContext::standalone::<B, Recognized>(request, others).is_some()
        {
            return Recognized::cached(request).expect("cached");
        }
        let recognized = Arc::new(Recognized::from_request(request));
        CallContext::of_mut(request).recognized.insert(recognized)
    }

    /// What [`AccountId::set_if_absent`] then [`Recognized::of`] do, for a stack's entry: a
    /// request that carries no extension yet (the usual case) gets both with one insert
    /// instead of four lookups.
    pub fn of_with_account<'r, B: PeekBody>(
        request: &'r mut Request<B>,
        account: &AccountId,
    ) -> &'r Recognized {
        if request.extensions().is_empty() {
            let recognized = Arc::new(Recognized::from_request(request));
            let call = CallContext::of_mut(request);
            call.account = Some(account.clone());
            return call.recognized.insert(recognized);
        }
        AccountId::set_if_absent(request, account);
        Recognized::of(request)
    }

    /// The recognition cached in a request by [`Recognized::of`], if any (never computes it).
    pub fn cached<B>(request: &Request<B>) -> Option<&Recognized> {
        let (call, others) = CallContext::with_others(request);
        call.and_then(|call| call.recognized.as_deref())
            .or_else(|| CallContext::standalone(request, others))
    }

    /// [`Recognized::cached`] and [`AccountId::of`] together, with one lookup of the combined
    /// extension instead of two (a layer that routes by both, like the task slots).
    pub fn cached_with_account<B>(
        request: &Request<B>,
    ) -> (Option<&Recognized>, Option<&AccountId>) {
        let (call, others) = CallContext::with_others(request);
        let recognized = call
            .and_then(|call| call.recognized.as_deref())
            .or_else(|| CallContext::standalone(request, others));
        let account = call
            .and_then(|call| call.account.as_ref())
            .or_else(|| CallContext::standalone(request, others));
        (recognized, account)
    }

    /// Sets the cached recognition's external id, as `Recognized::of_mut(request).external_id =
    /// id` does, with one lookup instead of two when the request is recognised already (a layer
    /// that wrote an id into a create's body); an id set marks the field named
    /// ([`names_own_id`](Self::names_own_id)), as a fresh recognition of that body would.
    pub fn set_external_id<B: PeekBody>(request: &mut Request<B>, id: Option<String>) {
        let cached = request
            .extensions_mut()
            .get_mut::<CallContext>()
            .and_then(|call| call.recognized.as_mut());
        let recognized = match cached {
            Some(recognized) => Arc::make_mut(recognized),
            None => Recognized::of_mut(request),
        };
        // A body that now holds an id names the field.
        recognized.names_own_id |= id.is_some();
        recognized.external_id = id;
    }

    /// The cached recognition, to change after a layer rewrote the request (e.g. added an
    /// external id to a create's body); recognised first when not cached yet.
    pub fn of_mut<B: PeekBody>(request: &mut Request<B>) -> &mut Recognized {
        let cached = CallContext::of(request).is_some_and(|call| call.recognized.is_some());
        if !cached && request.extensions().get::<Recognized>().is_some() {
            return request
                .extensions_mut()
                .get_mut::<Recognized>()
                .expect("checked");
        }
        if !cached {
            let recognized = Arc::new(Recognized::from_request(request));
            CallContext::of_mut(request).recognized = Some(recognized);
        }
        let call = CallContext::of_mut(request);
        let recognized = call.recognized.as_mut().expect("cached above");
        // Copied on write only while a retry copy of the request still shares it.
        Arc::make_mut(recognized)
    }

    /// Recognises a request afresh, ignoring any cached copy (after a layer rewrote the body).
    pub fn from_request<B: PeekBody>(request: &Request<B>) -> Recognized {
        let needs_body = request.method() == Method::POST;
        let body = if needs_body {
            request.body().peek_bytes()
        } else {
            bytes::Bytes::new()
        };
        Recognized::from_parts(request.method(), request.uri(), &body)
    }

    /// Whether this request creates a task.
    pub fn is_create(&self) -> bool {
        self.kind == RequestKind::Create
    }

    fn read_create_body(&mut self, product: Product, generation: ApiGeneration, body: &[u8]) {
        self.weight = 1;
        if may_name_a_create_field(body, product == Product::Image) {
            self.parse_create_body(product, generation, body);
        }
        // Otherwise, parsed or not, the body leaves the defaults: no parse.
    }

    fn parse_create_body(&mut self, product: Product, generation: ApiGeneration, body: &[u8]) {
        let Ok(fields) = serde_json::from_slice::<CreateFields<'_>>(body) else {
            // A field written twice, or of a type the server would ignore (`"options":"x"` on a
            // legacy path): the server may still read the id, so it is read key by key.
            self.read_create_keys(product, generation, body);
            return;
        };
        if product == Product::Image
            && let Some(n) = fields.n.as_ref().and_then(image_count)
        {
            self.weight = n;
        }
        // Each generation's own field only: a new-style server reads `external_id` and ignores
        // `external_task_id`, so a create carrying only the latter has no id there, and must
        // not be looked up by it (a lookup would find nothing, and the create be sent twice).
        let own = match generation {
            ApiGeneration::Legacy => fields.external_task_id,
            ApiGeneration::New => fields.external_id,
        };
        self.names_own_id = own.is_some();
        self.external_id = own.flatten().filter(|id| !id.is_empty());
        self.has_callback = match generation {
            ApiGeneration::Legacy => fields.callback_url.is_some_and(|u| !u.is_empty()),
            ApiGeneration::New => fields
                .options
                .and_then(|o| o.callback_url)
                .is_some_and(|u| !u.is_empty()),
        };
    }

    /// [`parse_create_body`](Self::parse_create_body) for a body its typed read refused, one
    /// top-level key at a time: the own-id field is named if it appears at all, and its id is
    /// taken only from a single non-empty string (written twice, which one a server reads is
    /// not known: no id, so a layer that writes one in sets the field once, and looks up what
    /// it wrote); `n` counts at its largest; a callback is a non-empty string where the
    /// generation reads it. A body that is no JSON object leaves the defaults.
    ///
    /// A body serde_json refuses is read as a lenient server reads it when that reading is
    /// plain: a byte-order mark in front is none of the JSON, and a control character in a
    /// string is that character (an escape that is none, a `\` before a control character
    /// too, leaves the body unread). Counted as nothing, its image `n` held slots the limiter
    /// did not know of, and its external id went unseen (a second one was spliced in beside
    /// it).
    fn read_create_keys(&mut self, product: Product, generation: ApiGeneration, body: &[u8]) {
        let keys = serde_json::from_slice::<CreateKeys>(body).or_else(|refused| {
            let unmarked = body.strip_prefix(b"\xEF\xBB\xBF");
            let body = unmarked.unwrap_or(body);
            match crate::envelope::lenient_texts(body, false) {
                Some(lenient) => serde_json::from_slice(&lenient),
                None if unmarked.is_some() => serde_json::from_slice(body),
                None => Err(refused),
            }
        });
        let Ok(CreateKeys(keys)) = keys else {
            return;
        };
        let own_name = match generation {
            ApiGeneration::Legacy => "external_task_id",
            ApiGeneration::New => "external_id",
        };
        let own: Vec<&serde_json::Value> = keys
            .iter()
            .filter(|(k, _)| k == own_name)
            .map(|(_, v)| v)
            .collect();
        self.names_own_id = !own.is_empty();
        self.external_id = match own.as_slice() {
            [serde_json::Value::String(id)] if !id.is_empty() => Some(id.clone()),
            _ => None,
        };
        if product == Product::Image
            && let Some(n) = keys
                .iter()
                .filter(|(k, _)| k == "n")
                .filter_map(|(_, v)| image_count(v))
                .max()
        {
            self.weight = n;
        }
        let non_empty = |v: &serde_json::Value| v.as_str().is_some_and(|u| !u.is_empty());
        self.has_callback = keys.iter().any(|(k, v)| match generation {
            ApiGeneration::Legacy => k == "callback_url" && non_empty(v),
            ApiGeneration::New => k == "options" && v.get("callback_url").is_some_and(non_empty),
        });
    }

    /// The ids a batch query names, as the server reads them: the value decoded (a `+` is a
    /// space, as form encoding has it), then split at its commas (an encoded one, `%2C`,
    /// separates ids too). A lookup percent-encodes an id like `batch:42`, and the slots
    /// compare what it asked about with the ids they hold.
    fn read_batch_query(&mut self, query: &str) {
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let target = match &*query_decoded(name) {
                "task_ids" => &mut self.task_ids,
                "external_task_ids" => &mut self.external_ids,
                _ => continue,
            };
            target.extend(
                query_decoded(value)
                    .split(',')
                    .filter(|id| !id.is_empty())
                    .map(String::from),
            );
        }
    }
}

/// The slots an image create's `n` takes, clamped to `1..=9`: an integer as written, and, read
/// the way a lenient server might, a number with a fraction or a string holding a number
/// (`4.0`, `"4"`), rounded up. KLING_API.md does not say whether Kling accepts those forms; a
/// create it refuses gives its slots back at once, while one it accepted and was counted as 1
/// would hold slots the limiter does not know of, so the larger count is the safe one. `None`
/// (the default weight, 1) for anything else.
fn image_count(n: &serde_json::Value) -> Option<u32> {
    let number = match n {
        serde_json::Value::Number(n) => n.as_u64().map_or_else(|| n.as_f64(), |n| Some(n as f64)),
        serde_json::Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    // `NaN` and infinities are no count; the clamp keeps the rest in range.
    number
        .is_finite()
        .then(|| number.ceil().clamp(1.0, f64::from(MAX_IMAGE_WEIGHT)) as u32)
}

/// A query string's name or value as servers read it (form encoding): a `+` is a space, then
/// [`percent_decoded`] (so a `%2B` is a `+`).
fn query_decoded(text: &str) -> Cow<'_, str> {
    if !text.contains('+') {
        return percent_decoded(text);
    }
    Cow::Owned(percent_decoded(&text.replace('+', " ")).into_owned())
}

/// `text` with its `%XX` escapes decoded (either case; a `%` not followed by two hex digits is
/// kept); as it is when the bytes decoded are not UTF-8.
fn percent_decoded(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = (bytes.get(i + 1).copied().and_then(hex))
                .zip(bytes.get(i + 2).copied().and_then(hex));
            if let Some((high, low)) = pair {
                // Two hex digits: at most 255.
                out.push((high * 16 + low) as u8);
                i += 3;
            } else {
                out.push(b'%');
                i += 1;
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_or(Cow::Borrowed(text), Cow::Owned)
}

/// Whether a create body may hold a field [`Recognized`] reads (`external_task_id`,
/// `external_id`, `callback_url` at either level, and `n` when `image`). A key can only spell one
/// of them as written (`"external_…`, `"callback_url`, `"n"`) or with an escape, so a body with
/// none of those and no `\` leaves the defaults whatever it holds, valid JSON or not (a body that
/// is not UTF-8 fails the parse and leaves them too): the common create (no external id, no
/// callback) costs one pass over its bytes instead of a parse.
///
/// The pass looks at sixteen bytes at a time for a `\`, or a `"` followed by the first letter of
/// one of those names (`e`, `c`, `n`), and compares names only there: stopping at every quote
/// (sixteen in the bench's create body) cost about three times as much.
fn may_name_a_create_field(body: &[u8], image: bool) -> bool {
    // Without `image`, `n` is not a candidate: test `e` twice instead.
    let third = if image { b'n' } else { b'e' };
    // The last position has no byte after it: only a `\` there counts.
    let Some(last) = body.len().checked_sub(1) else {
        return false;
    };
    if body[last] == b'\\' {
        return true;
    }
    if last < 16 {
        return names_a_field_in(body, 0..last, image);
    }
    let mut i = 0;
    while i + 16 <= last {
        if block_names_a_field(body, i, third, image) {
            return true;
        }
        i += 16;
    }
    // The positions left, in one more block that overlaps the last one (looking twice at a
    // position changes nothing).
    i < last && block_names_a_field(body, last - 16, third, image)
}

/// [`may_name_a_create_field`]'s test of positions `at..at + 16`: each byte and the one after it
/// compared sixteen at a time, in a few SSE2 compares and one mask test, and the names compared
/// only where one may start. A function, not a closure, so that it is always inlined: the
/// closure it replaces was called out of line, with its bounds checks and constants, for every
/// sixteen bytes (about 150 instructions a create in the bench).
#[inline(always)]
fn block_names_a_field(body: &[u8], at: usize, third: u8, image: bool) -> bool {
    // The sixteen positions and the byte after the last of them.
    let Some(window) = body.get(at..).and_then(<[u8]>::first_chunk::<17>) else {
        return false;
    };
    let mut flags = [0u8; 16];
    for k in 0..16 {
        let (b, next) = (window[k], window[k + 1]);
        let candidate =
            (b == b'\\') | ((b == b'"') & ((next == b'e') | (next == b'c') | (next == third)));
        flags[k] = if candidate { 0xFF } else { 0 };
    }
    flags.iter().fold(0, |any, &flag| any | flag) != 0 && names_a_field_in(body, at..at + 16, image)
}

/// Whether a position in `range` starts a `\`, or a `"` that opens one of the names
/// [`may_name_a_create_field`] looks for.
#[inline(never)]
fn names_a_field_in(body: &[u8], range: std::ops::Range<usize>, image: bool) -> bool {
    range.into_iter().any(|at| {
        let rest = &body[at + 1..];
        match body[at] {
            b'\\' => true,
            b'"' => {
                rest.starts_with(b"external_")
                    || rest.starts_with(b"callback_url")
                    || (image && rest.starts_with(b"n\""))
            }
            _ => false,
        }
    })
}

/// The fields of a create body the limits care about; everything else is skipped unread.
#[derive(Deserialize)]
struct CreateFields<'a> {
    #[serde(default)]
    n: Option<serde_json::Value>,
    /// `Some(None)` when written `null`: present, unset.
    #[serde(default, deserialize_with = "present")]
    external_task_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    external_id: Option<Option<String>>,
    #[serde(default, borrow)]
    callback_url: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    options: Option<CreateOptions<'a>>,
}

/// A field that is there: `Some` of its string, or `Some(None)` for any other value (`null`, a
/// number: named, but no id the server could look up); a missing one is `None`
/// (`#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Ok(Some(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(id) => Some(id),
        _ => None,
    }))
}

/// A create body's top-level keys that [`Recognized`] reads, with their values, each as often as
/// it is written (every other key skipped unread).
struct CreateKeys(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for CreateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> serde::de::Visitor<'de> for KeysVisitor {
            type Value = CreateKeys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<CreateKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if matches!(
                        &*key,
                        "n" | "external_task_id" | "external_id" | "callback_url" | "options"
                    ) {
                        keys.push((key.into_owned(), map.next_value()?));
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(CreateKeys(keys))
            }
        }
        d.deserialize_map(KeysVisitor)
    }
}

#[derive(Deserialize)]
struct CreateOptions<'a> {
    #[serde(default, borrow)]
    callback_url: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recognize(method: &Method, uri: &str, body: &str) -> Recognized {
        Recognized::from_parts(method, &uri.parse().unwrap(), body.as_bytes())
    }

    /// A create body that serde_json refuses but a lenient server reads — a byte-order mark in
    /// front, a raw line break or control character in a text — is read as that server reads
    /// it. Its image `n` was counted as 1 (slots the limiter did not know of), and its
    /// external id was unseen, so the retry layer spliced a generated one in beside it and
    /// looked the create up by an id the server never kept.
    #[test]
    fn a_create_body_a_lenient_server_reads_is_read_so() {
        let legacy = "{\"prompt\":\"line one\nline two\",\"n\":9,\"external_task_id\":\"e\t1\",\"callback_url\":\"https://cb\"}";
        let r = recognize(&Method::POST, "/v1/images/generations", legacy);
        assert_eq!((r.weight, r.external_id.as_deref()), (9, Some("e\t1")));
        assert!(r.names_own_id && r.has_callback);
        let marked = "\u{feff}{\"n\":4,\"external_task_id\":\"e2\"}";
        let r = recognize(&Method::POST, "/v1/images/generations", marked);
        assert_eq!((r.weight, r.external_id.as_deref()), (4, Some("e2")));
        let new = "{\"prompt\":\"a\u{1}b\",\"n\":3,\"external_id\":\"x\",\"options\":{\"callback_url\":\"u\"}}";
        let r = recognize(&Method::POST, "/text-to-image/kling-v2", new);
        assert_eq!((r.weight, r.external_id.as_deref()), (3, Some("x")));
        assert!(r.names_own_id && r.has_callback);
        // What no parser reads alike stays unread: an escape that is none, a body cut short,
        // a control character outside a string.
        for body in [
            r#"{"n":9,"prompt":"C:\data"}"#,
            r#"{"n":9,"#,
            "{\"n\":9\u{1}}",
        ] {
            let r = recognize(&Method::POST, "/v1/images/generations", body);
            assert_eq!((r.weight, r.names_own_id), (1, false), "{body:?}");
        }
    }

    /// A `\` before a raw control character is an escape that is none, like `\d`: no reading,
    /// even though the character alone would be read. Rewriting only the character gave
    /// `\\u000a`, a valid escaped `\` and the letters `u000a`, so an id the server never
    /// kept (`e\u000a1`) was looked up, and the create sent again.
    #[test]
    fn a_backslash_before_a_control_character_is_no_reading() {
        for (path, body, id) in [
            (
                "/v1/images/generations",
                "{\"n\":9,\"external_task_id\":\"e\\\n1\"}",
                Some("e\n1"),
            ),
            (
                "/text-to-image/kling-v2",
                "{\"n\":9,\"external_id\":\"e\\\t1\"}",
                Some("e\t1"),
            ),
            (
                "/v1/images/generations",
                "{\"prompt\":\"a\\\u{1}\",\"n\":9}",
                None,
            ),
        ] {
            let r = recognize(&Method::POST, path, body);
            assert_eq!(
                (r.weight, r.names_own_id, r.external_id.as_deref()),
                (1, false, None),
                "{body:?}"
            );
            // Negative control: the same body without its `\` is read.
            let plain = body.replacen('\\', "", 1);
            let r = recognize(&Method::POST, path, &plain);
            assert_eq!((r.weight, r.external_id.as_deref()), (9, id), "{plain:?}");
        }
    }

    /// Every escape form before a raw control character, read as JSON reads the escape: a
    /// `\\` is a valid escape, so the control character after it is text and the id is read
    /// (`e\` then a line break); a `\u` short of four hex digits before it, a `\` cut off
    /// by the body's end, and a third `\` before it are escapes that are none: no reading.
    #[test]
    fn each_escape_form_before_a_control_character_is_read_as_json_reads_the_escape() {
        let path = "/v1/images/generations";
        let r = recognize(
            &Method::POST,
            path,
            "{\"n\":9,\"external_task_id\":\"e\\\\\n1\"}",
        );
        assert_eq!((r.weight, r.external_id.as_deref()), (9, Some("e\\\n1")));
        let r = recognize(
            &Method::POST,
            path,
            "{\"n\":9,\"external_task_id\":\"e\\u0041\t1\"}",
        );
        assert_eq!((r.weight, r.external_id.as_deref()), (9, Some("eA\t1")));
        for body in [
            "{\"n\":9,\"external_task_id\":\"e\\u1\n1\"}",
            "{\"n\":9,\"external_task_id\":\"e\\u00a\n\"}",
            "{\"n\":9,\"external_task_id\":\"e\\\\\\\n1\"}",
            "{\"n\":9,\"prompt\":\"a\n\",\"external_task_id\":\"e\\",
        ] {
            let r = recognize(&Method::POST, path, body);
            assert_eq!(
                (r.weight, r.names_own_id, r.external_id.as_deref()),
                (1, false, None),
                "{body:?}"
            );
        }
    }

    #[test]
    fn legacy_paths() {
        let r = recognize(
            &Method::POST,
            "https://api-singapore.klingai.com/v1/videos/text2video",
            r#"{"prompt":"a cat","external_task_id":"job-1","callback_url":"http://x"}"#,
        );
        assert_eq!(r.kind, RequestKind::Create);
        assert_eq!(r.generation, Some(ApiGeneration::Legacy));
        assert_eq!(r.pool.as_ref().unwrap().to_string(), "video");
        assert_eq!(r.weight, 1);
        assert_eq!(r.external_id.as_deref(), Some("job-1"));
        assert!(r.has_callback);

        let r = recognize(&Method::POST, "/v1/images/generations", r#"{"n":4}"#);
        assert_eq!((r.pool.unwrap().to_string(), r.weight), ("image".into(), 4));
        let r = recognize(&Method::POST, "/v1/images/generations", r#"{"n":40}"#);
        assert_eq!(r.weight, 9);
        let r = recognize(&Method::POST, "/v1/images/generations", "not json");
        assert_eq!(r.weight, 1);
        // A lenient server may read these as 4 images: counted as 4, never as 1.
        for n in ["4.0", "3.5", r#""4""#, r#"" 4 ""#] {
            let body = format!(r#"{{"n":{n}}}"#);
            let r = recognize(&Method::POST, "/v1/images/generations", &body);
            assert_eq!(r.weight, 4, "{body}");
            // The key-by-key read (a field written twice) counts them the same way.
            let body = format!(r#"{{"n":{n},"n":1}}"#);
            let r = recognize(&Method::POST, "/v1/images/generations", &body);
            assert_eq!(r.weight, 4, "{body}");
        }
        for (n, weight) in [
            ("0.5", 1),
            ("-3", 1),
            ("1e9", 9),
            (r#""NaN""#, 1),
            (r#""x""#, 1),
        ] {
            let body = format!(r#"{{"n":{n}}}"#);
            let r = recognize(&Method::POST, "/v1/images/generations", &body);
            assert_eq!(r.weight, weight, "{body}");
        }
        let r = recognize(
            &Method::POST,
            "/v1/images/kolors-virtual-try-on",
            r#"{"n":3}"#,
        );
        assert_eq!(
            (r.pool.unwrap().to_string(), r.weight),
            ("try-on".into(), 1)
        );

        let r = recognize(&Method::GET, "/v1/videos/text2video/abc123", "");
        assert_eq!(r.kind, RequestKind::Query);
        assert_eq!(r.task_ids, vec!["abc123"]);
        let r = recognize(
            &Method::GET,
            "/v1/videos/text2video?pageNum=1&pageSize=30",
            "",
        );
        assert_eq!(r.kind, RequestKind::List);
        assert_eq!(
            recognize(&Method::GET, "/account/costs", "").kind,
            RequestKind::Account
        );
        assert_eq!(
            recognize(&Method::GET, "/healthz", "").kind,
            RequestKind::Other
        );
    }

    #[test]
    fn new_style_paths() {
        let r = recognize(
            &Method::POST,
            "/text-to-video/kling-3.0",
            r#"{"prompt":"x","external_id":"e1","options":{"callback_url":"http://cb"}}"#,
        );
        assert_eq!(r.kind, RequestKind::Create);
        assert_eq!(r.generation, Some(ApiGeneration::New));
        assert_eq!(r.pool.as_ref().unwrap().to_string(), "video:kling-3.0");
        assert_eq!(r.external_id.as_deref(), Some("e1"));
        assert!(r.has_callback);
        // The legacy field is not a new-style create's id: its server reads `external_id` only.
        let r = recognize(
            &Method::POST,
            "/text-to-video/kling-3.0",
            r#"{"prompt":"x","external_task_id":"t1"}"#,
        );
        assert_eq!(r.external_id, None);
        assert!(!r.names_own_id, "the other generation's field");
        // A body the typed read refuses (a field of a type the server ignores, a field written
        // twice) is read key by key: the id is the caller's when written once.
        let r = recognize(
            &Method::POST,
            "/v1/videos/text2video",
            r#"{"prompt":"x","external_task_id":"job-1","options":"x","callback_url":"https://h/cb"}"#,
        );
        assert_eq!(
            (r.external_id.as_deref(), r.names_own_id, r.has_callback),
            (Some("job-1"), true, true)
        );
        let r = recognize(
            &Method::POST,
            "/v1/videos/text2video",
            r#"{"external_task_id":null,"prompt":"x","external_task_id":"job-1"}"#,
        );
        assert_eq!((r.external_id.as_deref(), r.names_own_id), (None, true));
        let r = recognize(
            &Method::POST,
            "/text-to-image/kling-v2",
            r#"{"n":2,"n":5,"external_id":"e","callback_url":7,"options":{"callback_url":"u"}}"#,
        );
        assert_eq!(
            (r.external_id.as_deref(), r.weight, r.has_callback),
            (Some("e"), 5, true)
        );
        // Its own field written unset: named, without an id.
        for body in [
            r#"{"prompt":"x","external_id":null}"#,
            r#"{"prompt":"x","external_id":""}"#,
        ] {
            let r = recognize(&Method::POST, "/text-to-video/kling-3.0", body);
            assert_eq!(
                (r.external_id.as_deref(), r.names_own_id),
                (None, true),
                "{body}"
            );
        }
        for body in [
            r#"{"\u0065xternal_task_id":null}"#,
            r#"{"external_task_id":0}"#,
            r#"{"external_task_id":{"x":1}}"#,
        ] {
            let r = recognize(&Method::POST, "/v1/videos/text2video", body);
            assert_eq!(
                (r.external_id.as_deref(), r.names_own_id),
                (None, true),
                "{body}"
            );
        }

        let r = recognize(&Method::GET, "/tasks?task_ids=a,b,c", "");
        assert_eq!(r.kind, RequestKind::Query);
        assert_eq!(r.task_ids, vec!["a", "b", "c"]);
        let r = recognize(&Method::GET, "/tasks?external_task_ids=x%2Cy", "");
        assert_eq!(r.external_ids, vec!["x", "y"]);
        // Decoded as a server reads them (a lookup encodes every reserved byte of an id), an
        // encoded comma of either case separating ids; a malformed escape is left as it is.
        let r = recognize(
            &Method::GET,
            "/tasks?external_task_ids=a%2cb,job%201,batch%3A42,%E4%BD%A0,50%",
            "",
        );
        assert_eq!(
            r.external_ids,
            vec!["a", "b", "job 1", "batch:42", "你", "50%"]
        );
        let r = recognize(&Method::GET, "/tasks?task%5Fids=1,2", "");
        assert_eq!(r.task_ids, vec!["1", "2"]);
        let r = recognize(&Method::GET, "/v1/videos/text2video/batch%3A42", "");
        assert_eq!(r.task_ids, vec!["batch:42"]);
        assert_eq!(
            recognize(&Method::POST, "/tasks", "{}").kind,
            RequestKind::List
        );
        assert_eq!(
            recognize(&Method::POST, "/foo/bar", "{}").kind,
            RequestKind::Other
        );
    }

    #[test]
    fn skipping_the_parse_never_changes_what_is_read() {
        let bodies = [
            "",
            "not json",
            "{}",
            "[]",
            r#"{"prompt":"a cat"}"#,
            r#"{"prompt":"a \"cat\"\n","duration":"5"}"#,
            r#"{"prompt":"x","external_task_id":"job-1"}"#,
            r#"{"prompt":"x","external_task_id":""}"#,
            r#"{"prompt":"x","external_task_id":null,"external_id":null}"#,
            r#"{"prompt":"x","external_id":"e1","external_task_id":"t1"}"#,
            r#"{"prompt":"x","callback_url":"http://cb"}"#,
            r#"{"options":{"callback_url":"http://cb"}}"#,
            r#"{"\u0065xternal_task_id":"escaped"}"#,
            r#"{"\u006e":3}"#,
            r#"{"n":3}"#,
            r#"{"n":3,"n":4}"#,
            r#"{"n":"three"}"#,
            r#"{"n":12,"prompt":"x"} trailing"#,
            r#"{"prompt":"n","mode":"std"}"#,
            r#"{"external_task_id":7}"#,
            r#"{"prompt":"has \\u in it"}"#,
        ];
        for body in bodies {
            for product in [Product::Video, Product::Image, Product::TryOn] {
                for generation in [ApiGeneration::Legacy, ApiGeneration::New] {
                    let blank = || recognize(&Method::GET, "/healthz", "");
                    let (mut fast, mut parsed) = (blank(), blank());
                    fast.read_create_body(product, generation, body.as_bytes());
                    parsed.weight = 1;
                    parsed.parse_create_body(product, generation, body.as_bytes());
                    assert_eq!(fast, parsed, "{body} as {product:?} {generation:?}");
                }
            }
        }
    }

    /// [`may_name_a_create_field`] as first written: stop at every quote and backslash.
    fn may_name_slow(body: &[u8], image: bool) -> bool {
        (0..body.len()).any(|at| {
            let rest = &body[at + 1..];
            body[at] == b'\\'
                || (body[at] == b'"'
                    && (rest.starts_with(b"external_")
                        || rest.starts_with(b"callback_url")
                        || (image && rest.starts_with(b"n\""))))
        })
    }

    #[test]
    fn the_blockwise_field_search_finds_names_at_every_position() {
        for name in [
            "\"external_id",
            "\"callback_url",
            "\"n\"",
            "\\",
            "\"cat",
            "\"n",
            "\"e",
        ] {
            for len in 0..50 {
                for at in 0..=len {
                    let mut body = vec![b'x'; len];
                    body.splice(at..at, name.bytes());
                    for image in [false, true] {
                        assert_eq!(
                            may_name_a_create_field(&body, image),
                            may_name_slow(&body, image),
                            "{:?} image {image}",
                            String::from_utf8_lossy(&body)
                        );
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn the_blockwise_field_search_agrees_with_the_byte_loop(
            body in proptest::collection::vec(
                proptest::sample::select(b"\"\\encxal_k{}:, ".to_vec()),
                0..80,
            ),
            image: bool,
        ) {
            proptest::prop_assert_eq!(
                may_name_a_create_field(&body, image),
                may_name_slow(&body, image)
            );
        }
    }

    /// `json` with each character inside its strings (keys included) that `picks` chooses
    /// written as a `\u` escape: the same body to the server.
    fn escape_in_strings(json: &str, picks: &[u8]) -> String {
        let mut out = String::with_capacity(json.len() * 2);
        // `verbatim`: characters of an escape still to copy as written (`\"`, `\u0041`).
        let (mut in_string, mut verbatim) = (false, 0);
        let mut picks = picks.iter().cycle();
        for c in json.chars() {
            if verbatim > 0 {
                verbatim -= 1;
                if c == 'u' && verbatim == 0 {
                    verbatim = 4;
                }
                out.push(c);
            } else if in_string && c != '"' && c != '\\' && picks.next().is_some_and(|p| p % 3 == 0)
            {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            } else {
                out.push(c);
                if in_string && c == '\\' {
                    verbatim = 1;
                } else if c == '"' {
                    in_string = !in_string;
                }
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

        /// A create body's fields, of any type and with escapes anywhere, read as a plain
        /// `Value` reading of the same body says: the generation's own id (a non-empty string),
        /// whether it is named, the callback where the generation reads it, an image's weight.
        #[test]
        fn create_bodies_read_as_a_plain_value_reading_says(
            fields in proptest::collection::vec((
                proptest::sample::select(vec![
                    "n", "external_task_id", "external_id", "callback_url", "options", "prompt",
                ]),
                proptest::sample::select(vec![
                    serde_json::Value::Null,
                    serde_json::json!(""),
                    serde_json::json!("job-1"),
                    serde_json::json!("\"é\\"),
                    serde_json::json!(3),
                    serde_json::json!(4.5),
                    serde_json::json!("7"),
                    serde_json::json!(true),
                    serde_json::json!([2]),
                    serde_json::json!({"callback_url": "http://cb"}),
                    serde_json::json!({"callback_url": ""}),
                ]),
            ), 0..6),
            picks in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..32),
            path in proptest::sample::select(vec![
                "/v1/images/generations", "/text-to-image/m", "/v1/videos/text2video",
                "/text-to-video/m",
            ]),
        ) {
            let fields: serde_json::Map<String, serde_json::Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let body = serde_json::Value::Object(fields.clone()).to_string();
            let body = escape_in_strings(&body, &picks);
            let r = recognize(&Method::POST, path, &body);
            let legacy = path.starts_with("/v1/");
            let own = if legacy { "external_task_id" } else { "external_id" };
            let text = |v: Option<&serde_json::Value>| {
                v.and_then(serde_json::Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
            };
            let callback = if legacy {
                fields.get("callback_url")
            } else {
                fields.get("options").and_then(|o| o.get("callback_url"))
            };
            let weight = match path.contains("image") {
                true => fields.get("n").and_then(image_count).unwrap_or(1),
                false => 1,
            };
            proptest::prop_assert_eq!(r.external_id, text(fields.get(own)), "{}", body);
            proptest::prop_assert_eq!(r.names_own_id, fields.contains_key(own), "{}", body);
            proptest::prop_assert_eq!(r.has_callback, text(callback).is_some(), "{}", body);
            proptest::prop_assert_eq!(r.weight, weight, "{}", body);
        }
    }

    /// A create written as a normalizing server reads it the same takes its slots all the
    /// same (its pool and weight), and a query its id.
    #[test]
    fn a_path_written_another_way_is_recognised_as_the_server_reads_it() {
        let r = recognize(&Method::POST, "/v1/%69mages/./generations", r#"{"n":4}"#);
        assert_eq!((r.kind, r.weight), (RequestKind::Create, 4));
        assert_eq!(r.pool.unwrap().to_string(), "image");
        let r = recognize(
            &Method::POST,
            "/v1/images/../videos/text2video",
            r#"{"external_task_id":"job-1"}"#,
        );
        assert_eq!(
            (r.kind, r.external_id.as_deref()),
            (RequestKind::Create, Some("job-1"))
        );
        let r = recognize(&Method::POST, "/text-to-video/kling%2d3.0", "{}");
        assert_eq!(r.pool.unwrap().to_string(), "video:kling-3.0");
        let r = recognize(&Method::GET, "/v1/videos/./text2video/job%2D1", "");
        assert_eq!(
            (r.kind, r.task_ids),
            (RequestKind::Query, vec!["job-1".to_owned()])
        );
    }

    #[test]
    fn long_and_doubled_slash_paths_are_recognised() {
        let deep = format!("{}/v1/images/generations", "/x".repeat(20));
        let r = recognize(&Method::POST, &deep, r#"{"n":2}"#);
        assert_eq!((r.kind, r.weight), (RequestKind::Create, 2));
        let r = recognize(&Method::GET, "//v1//videos/text2video//abc//", "");
        assert_eq!(r.task_ids, vec!["abc"]);
    }

    /// A create's path however a caller or a gateway writes it (a query string, trailing or
    /// doubled slashes, a base path in front, an id percent-encoded) is still a create when
    /// POSTed and never one when read; a query's path is still that query when read and never
    /// a create or a query when POSTed.
    #[test]
    fn a_create_is_never_taken_for_a_query_nor_a_query_for_a_create() {
        let variants = |path: &str| {
            let doubled = path.replace('/', "//");
            vec![
                path.to_owned(),
                format!("{path}/"),
                format!("{path}//"),
                format!("{path}?pageNum=1&task_ids=x"),
                format!("{path}/?x=%2F"),
                doubled,
                format!("https://gw.example{path}"),
                format!("https://gw.example/kling{path}"),
                format!("https://gw.example/kling/v1{path}"),
                format!("https://gw.example/kling/v1/tasks/x{path}"),
            ]
        };
        for (create, pool) in [
            ("/v1/videos/text2video", "video"),
            ("/v1/videos/image2video", "video"),
            ("/v1/images/generations", "image"),
            ("/v1/images/kolors-virtual-try-on", "try-on"),
            ("/v1/images/editing/expand", "image"),
            ("/text-to-video/kling-3.0", "video:kling-3.0"),
            ("/image-to-video/kling-v2.1", "video:kling-v2.1"),
            ("/text-to-image/kling-v2", "image:kling-v2"),
        ] {
            for uri in variants(create) {
                let r = recognize(&Method::POST, &uri, "{}");
                assert_eq!(r.kind, RequestKind::Create, "POST {uri}");
                assert_eq!(
                    r.pool.map(|p| p.to_string()).as_deref(),
                    Some(pool),
                    "{uri}"
                );
                let r = recognize(&Method::GET, &uri, "");
                assert!(
                    !matches!(r.kind, RequestKind::Create | RequestKind::Query),
                    "GET {uri}: {:?}",
                    r.kind
                );
            }
        }
        for (query, ids) in [
            ("/v1/videos/text2video/t1", ["t1"]),
            (
                "/v1/images/generations/860000000000000001",
                ["860000000000000001"],
            ),
            ("/v1/images/editing/expand/t1", ["t1"]),
            ("/v1/videos/text2video/t%2D1", ["t-1"]),
            ("/v1/videos/text2video/text2video", ["text2video"]),
            ("/v1/videos/text2video/tasks", ["tasks"]),
        ] {
            for uri in variants(query) {
                let r = recognize(&Method::GET, &uri, "");
                assert_eq!(r.kind, RequestKind::Query, "GET {uri}");
                assert_eq!(r.task_ids, ids, "{uri}");
                let r = recognize(&Method::POST, &uri, "{}");
                assert_eq!(r.kind, RequestKind::Other, "POST {uri}");
            }
        }
        for uri in variants("/tasks") {
            let uri = format!("{}?task_ids=t1", uri.split('?').next().unwrap_or_default());
            let r = recognize(&Method::GET, &uri, "");
            assert_eq!(r.kind, RequestKind::Query, "GET {uri}");
            assert_eq!(r.task_ids, ["t1"], "{uri}");
            let r = recognize(&Method::POST, &uri, "{}");
            assert_eq!(r.kind, RequestKind::List, "POST {uri}");
        }
        // Written in capitals, no path is Kling's (its paths are case-sensitive): neither.
        for uri in [
            "/V1/VIDEOS/TEXT2VIDEO",
            "/TEXT-TO-VIDEO/KLING-3.0",
            "/TASKS",
        ] {
            for method in [Method::GET, Method::POST] {
                let kind = recognize(&method, uri, "{}").kind;
                assert_eq!(kind, RequestKind::Other, "{method} {uri}");
            }
        }
    }

    #[test]
    fn pool_scope_maps_model_pools_to_their_product_only_when_asked() {
        let model = Pool::with_model(Product::Video, "kling-3.0");
        assert_eq!(PoolScope::Model.apply(model.clone()), model);
        assert_eq!(PoolScope::Product.apply(model), Pool::new(Product::Video));
        let legacy = Pool::new(Product::Image);
        assert_eq!(PoolScope::Product.apply(legacy.clone()), legacy);
        for scope in [PoolScope::Model, PoolScope::Product] {
            assert_eq!(scope.to_string().parse::<PoolScope>(), Ok(scope));
        }
        assert_eq!(PoolScope::default(), PoolScope::Model);
        let err = "models".parse::<PoolScope>().unwrap_err();
        assert!(err.to_string().contains("`model` or `product`"));
    }

    #[test]
    fn pool_names_round_trip() {
        for name in ["video", "image", "try-on", "video:kling-3.0"] {
            assert_eq!(Pool::parse(name).unwrap().to_string(), name);
        }
        assert_eq!(Pool::parse("audio"), None);
        assert_eq!(Pool::parse("video:"), None);
    }

    /// An empty model is the product's pool, which parses back from its name (`video:` does
    /// not, and a Redis fleet lost the releases of such a pool in its process's record).
    #[test]
    fn a_pool_with_an_empty_model_is_the_products_pool() {
        let pool = Pool::with_model(Product::Video, "");
        assert_eq!(pool, Pool::new(Product::Video));
        assert_eq!(Pool::parse(&pool.to_string()), Some(pool));
    }

    /// A query string's `+` is a space to the servers that read it (form encoding: Go's
    /// `ParseQuery`, servlets, kling-mock), while a `%2B` is a `+`. Read as a `+`, a
    /// hand-written `external_task_ids=a+b` asked about "a+b" where the server answered about
    /// "a b", and its `data: []` ended the slot of the running task "a+b". A path keeps its `+`.
    #[test]
    fn a_batch_query_reads_a_plus_as_a_space_as_servers_do() {
        let r = recognize(
            &Method::GET,
            "/tasks?external_task_ids=a+b,c%2Bd&task+ids=x",
            "",
        );
        assert_eq!(r.external_ids, vec!["a b", "c+d"]);
        assert!(r.task_ids.is_empty(), "`task ids` is no parameter it reads");
        let r = recognize(&Method::GET, "/tasks?task%5fids=1+2,%2B3", "");
        assert_eq!(r.task_ids, vec!["1 2", "+3"]);
        let r = recognize(&Method::GET, "/v1/videos/text2video/a+b", "");
        assert_eq!(r.task_ids, vec!["a+b"]);
    }

    #[test]
    fn recognition_is_cached_in_the_request() {
        let mut req = Request::post("/v1/images/generations")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"n\":2}",
            )))
            .unwrap();
        assert_eq!(Recognized::of(&mut req).weight, 2);
        assert!(Recognized::cached(&req).is_some());
    }

    /// No request a caller may build panics the recognition: random paths and query strings
    /// (escapes, parameters, characters of several bytes) and random create bodies, with a
    /// fixed seed (xorshift64*), the same on every run.
    #[test]
    fn no_request_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut below = |n: usize| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let n = u64::try_from(n).expect("small");
            usize::try_from(state.wrapping_mul(0x2545_f491_4f6c_dd1d) % n).expect("below n")
        };
        const PATHS: [&str; 16] = [
            "/v1/videos/text2video",
            "/v1/images/generations",
            "/text-to-video/kling-3.0",
            "/tasks",
            "/account/costs",
            "/v1/videos/text2video/",
            "%41",
            "%2F",
            "%",
            ";x",
            "é",
            "/..",
            "?task_ids=",
            "&external_task_ids=a%2Cb,%E4%BD",
            "%é,",
            "=",
        ];
        const BODY: &[&str] = &[
            "{",
            "}",
            "\"external_task_id\"",
            "\"external_id\"",
            "\"n\"",
            ":",
            ",",
            "null",
            "\"job-1\"",
            "4",
            "1e400",
            "\"callback_url\"",
            "\"\\u0065",
            "[",
            "]",
            "é",
            "\"options\"",
            "{\"n\":",
        ];
        for _ in 0..10_000 {
            let mut uri = String::new();
            for _ in 0..=below(6) {
                uri.push_str(PATHS[below(PATHS.len())]);
            }
            let mut body = String::new();
            for _ in 0..below(12) {
                body.push_str(BODY[below(BODY.len())]);
            }
            let Ok(uri) = format!("/{uri}").parse::<http::Uri>() else {
                continue;
            };
            for method in [Method::GET, Method::POST] {
                let _ = Recognized::from_parts(&method, &uri, body.as_bytes());
            }
        }
    }
}
