//! Label values as `'static` strings where possible, and the metric keys of every combination
//! of them built once, so the common path builds no `String`, no label vector and hashes no
//! label.

use std::borrow::Cow;
use std::sync::OnceLock;

use kling_core::intern::BoundedLabels;
use kling_core::metrics::{
    MODEL_LABEL_MAX_LEN, MODEL_POOL_LABELS, known_model_pool_label, model_pool_label,
    other_model_label,
};
use kling_core::{Code, Product, RequestKind, TaskStatus};
use metrics::{Counter, Histogram, Key, Label, Metadata, SharedString};

use crate::route::PoolRef;

/// The `status` label of a call that ended without an HTTP response.
pub(crate) const NO_STATUS: &str = "error";
/// The `code` label of a call that ended without a Kling envelope (transport error, timeout).
pub(crate) const NO_CODE: &str = "error";
/// The `code` label of a response whose body was not a Kling envelope.
pub(crate) const MALFORMED: &str = "malformed";
/// The `code` label of a call whose caller dropped it before it ended (a timeout around the
/// stack, a cancelled job).
pub(crate) const CANCELLED: &str = "cancelled";
/// The `code` label of a call a layer in this process refused before sending it (a full
/// queue, a local deadline, a spend guard): not [`NO_CODE`], so "we held back" reads apart
/// from "the API or the network failed us".
pub(crate) const REFUSED: &str = "refused";

/// The `status` values with an index (the common HTTP statuses, then [`NO_STATUS`]).
const STATUSES: [&str; 14] = [
    "200", "201", "204", "400", "401", "403", "404", "408", "429", "500", "502", "503", "504",
    NO_STATUS,
];

/// The `code` values with an index (the documented codes, then [`NO_CODE`], [`MALFORMED`],
/// [`CANCELLED`] and [`REFUSED`]).
const CODES: [&str; 26] = [
    "0", "1000", "1001", "1002", "1003", "1004", "1100", "1101", "1102", "1103", "1200", "1201",
    "1202", "1203", "1300", "1301", "1302", "1303", "1304", "5000", "5001", "5002", NO_CODE,
    MALFORMED, CANCELLED, REFUSED,
];

/// The `kind` values with an index, in [`kind_index`] order.
const KINDS: usize = 5;
/// Pool indices taken by no pool and the three products.
const FIXED_POOLS: usize = 4;
/// Then each product's `{product}:other`, for model pools past the named ones.
const OTHER_POOLS: usize = 3;
/// Pools with an index: the fixed ones, the others, then every model pool labelled by name
/// ([`kling_core::metrics::model_pool_label`]).
const POOLS: usize = FIXED_POOLS + OTHER_POOLS + MODEL_POOL_LABELS;

/// A label value: `'static` text with its index in its fixed set, or text built for this call
/// (for a pool, only a model pool not confirmed yet: see [`settle_pool`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Value {
    text: Cow<'static, str>,
    /// Set only for `Cow::Borrowed` text.
    index: Option<u16>,
}

impl Value {
    const fn fixed(text: &'static str, index: usize) -> Value {
        Value {
            text: Cow::Borrowed(text),
            index: Some(index as u16),
        }
    }

    fn built(text: String) -> Value {
        Value {
            text: Cow::Owned(text),
            index: None,
        }
    }

    /// The label text.
    #[cfg(test)]
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The text and index, when the value is one of its fixed set.
    fn indexed(&self) -> Option<(&'static str, usize)> {
        match (&self.text, self.index) {
            (Cow::Borrowed(text), Some(index)) => Some((text, usize::from(index))),
            _ => None,
        }
    }

    /// As a `metrics` label value (no copy of a `'static` text).
    pub(crate) fn to_shared(&self) -> SharedString {
        match &self.text {
            Cow::Borrowed(text) => SharedString::const_str(text),
            Cow::Owned(text) => SharedString::from(text.clone()),
        }
    }
}

/// A call's `status` label: its HTTP status, or none (it ended without a response).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Http(http::StatusCode),
    None,
}

impl Status {
    /// The index in [`STATUSES`], for the common statuses.
    fn index(self) -> Option<usize> {
        let http = match self {
            Status::Http(http) => http,
            Status::None => return Some(13),
        };
        Some(match http.as_u16() {
            200 => 0,
            201 => 1,
            204 => 2,
            400 => 3,
            401 => 4,
            403 => 5,
            404 => 6,
            408 => 7,
            429 => 8,
            500 => 9,
            502 => 10,
            503 => 11,
            504 => 12,
            _ => return None,
        })
    }

    /// The label value: an uncommon status by its number for the first
    /// [`UNCOMMON_STATUS_LABELS`] a process sees, then [`OTHER_STATUS`].
    pub(crate) fn value(self) -> Value {
        match (self.index(), self) {
            (Some(at), _) => Value::fixed(STATUSES[at], at),
            (None, Status::Http(http)) => uncommon_status(http.as_u16()),
            (None, Status::None) => Value::built(NO_STATUS.to_owned()),
        }
    }

    /// The status for a span: its number, also past the labelled ones (a span makes no
    /// series).
    pub(crate) fn span_text(self) -> Cow<'static, str> {
        match (self.index(), self) {
            (None, Status::Http(http)) => Cow::Owned(http.as_u16().to_string()),
            _ => self.value().text,
        }
    }
}

/// Uncommon HTTP statuses (not in [`STATUSES`]) labelled by their number in a process; later
/// ones share [`OTHER_STATUS`]. The status is the upstream's input, as the code is: a proxy or
/// gateway answering statuses at random (any of 100 to 999) must not make new series without
/// end, one per status for each kind, pool and code.
const UNCOMMON_STATUS_LABELS: usize = 32;

/// The `status` label of uncommon statuses past [`UNCOMMON_STATUS_LABELS`].
pub(crate) const OTHER_STATUS: &str = "other";

/// An uncommon status's label: its number, kept for the process (at most
/// [`UNCOMMON_STATUS_LABELS`] of them), or [`OTHER_STATUS`].
#[cold]
#[inline(never)]
fn uncommon_status(status: u16) -> Value {
    static LABELS: BoundedLabels = BoundedLabels::new(UNCOMMON_STATUS_LABELS);
    let text = status.to_string();
    let label = LABELS
        .find_or_keep(|label| label == text, || text.clone())
        .map_or(OTHER_STATUS, |(label, _)| label);
    Value {
        text: Cow::Borrowed(label),
        index: None,
    }
}

/// A call's `code` label: the Kling business code, none (no envelope: a transport error, a
/// timeout), malformed (a body that was no envelope), cancelled (its caller dropped it) or
/// refused (a layer in this process held it back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CodeLabel {
    Kling(Code),
    None,
    Malformed,
    Cancelled,
    /// Refused in this process before it was sent
    /// ([`kling_core::error::RefusedBeforeSending`] in the error's chain).
    Refused,
}

impl CodeLabel {
    /// The index in [`CODES`], for the documented codes.
    fn index(self) -> Option<usize> {
        let code = match self {
            CodeLabel::Kling(code) => code,
            CodeLabel::None => return Some(22),
            CodeLabel::Malformed => return Some(23),
            CodeLabel::Cancelled => return Some(24),
            CodeLabel::Refused => return Some(25),
        };
        Some(match code.as_i64() {
            0 => 0,
            1000 => 1,
            1001 => 2,
            1002 => 3,
            1003 => 4,
            1004 => 5,
            1100 => 6,
            1101 => 7,
            1102 => 8,
            1103 => 9,
            1200 => 10,
            1201 => 11,
            1202 => 12,
            1203 => 13,
            1300 => 14,
            1301 => 15,
            1302 => 16,
            1303 => 17,
            1304 => 18,
            5000 => 19,
            5001 => 20,
            5002 => 21,
            _ => return None,
        })
    }

    /// The label value (built only for a span or an undocumented code).
    pub(crate) fn value(self) -> Value {
        match (self.index(), self) {
            (Some(at), _) => Value::fixed(CODES[at], at),
            (None, CodeLabel::Kling(code)) => undocumented_code(code.as_i64()),
            (None, CodeLabel::None) => Value::built(NO_CODE.to_owned()),
            (None, CodeLabel::Malformed) => Value::built(MALFORMED.to_owned()),
            (None, CodeLabel::Cancelled) => Value::built(CANCELLED.to_owned()),
            (None, CodeLabel::Refused) => Value::built(REFUSED.to_owned()),
        }
    }

    /// The code for a span: its number, also past the labelled ones (a span makes no series).
    pub(crate) fn span_text(self) -> Cow<'static, str> {
        match (self.index(), self) {
            (None, CodeLabel::Kling(code)) => Cow::Owned(code.as_i64().to_string()),
            _ => self.value().text,
        }
    }
}

/// Undocumented codes labelled by their number in a process; later ones share
/// [`OTHER_CODE`]. The code is the server's (or a proxy's) input: a recorder keeps every
/// series it was given for good, so an upstream answering codes at random must not make new
/// ones without end. Kling documents two dozen codes and adds a few at a time.
const UNDOCUMENTED_CODE_LABELS: usize = 32;

/// The `code` label of undocumented codes past [`UNDOCUMENTED_CODE_LABELS`].
pub(crate) const OTHER_CODE: &str = "other";

/// An undocumented code's label: its number, kept for the process (at most
/// [`UNDOCUMENTED_CODE_LABELS`] of them), or [`OTHER_CODE`].
fn undocumented_code(code: i64) -> Value {
    static LABELS: BoundedLabels = BoundedLabels::new(UNDOCUMENTED_CODE_LABELS);
    let text = code.to_string();
    let label = LABELS
        .find_or_keep(|label| label == text, || text.clone())
        .map_or(OTHER_CODE, |(label, _)| label);
    Value {
        text: Cow::Borrowed(label),
        index: None,
    }
}

/// A task status as a label value, `'static` for the known ones.
pub(crate) fn task_status(status: &TaskStatus) -> SharedString {
    // The same words as `TaskStatus::as_str`, without copying them.
    let text = match status {
        TaskStatus::Submitted => "submitted",
        TaskStatus::Processing => "processing",
        TaskStatus::Succeeded => "succeeded",
        TaskStatus::Failed => "failed",
        other => return SharedString::from(other.as_str().to_owned()),
    };
    debug_assert_eq!(text, status.as_str());
    SharedString::const_str(text)
}

/// The status label of a task that stopped being tracked when its lease ran out (the word
/// the task slots use for the same end).
pub(crate) const TASK_EXPIRED: SharedString = SharedString::const_str("expired");

/// The pool label of a request that draws from no pool.
pub(crate) const NO_POOL: Value = Value::fixed("", 0);

/// A pool as a label value: empty for requests that draw from no pool, `video:kling-3.0` for a
/// model's pool (the `Display` of [`kling_core::Pool`]), or `{product}:other` (see
/// [`model_pool`]). A model pool no answer has shown yet is unconfirmed until the call's
/// answer settles it ([`settle_pool`]).
pub(crate) fn pool(pool: &PoolRef<'_>) -> Value {
    match pool {
        PoolRef::None => NO_POOL,
        PoolRef::Product(product) => match *product {
            Product::Video => Value::fixed(Product::Video.as_str(), 1),
            Product::Image => Value::fixed(Product::Image.as_str(), 2),
            Product::TryOn => Value::fixed(Product::TryOn.as_str(), 3),
            other => Value {
                text: Cow::Borrowed(other.as_str()),
                index: None,
            },
        },
        PoolRef::Model(product, model) => model_pool(*product, model),
    }
}

/// A model pool's label when the call starts: its name if it has a place in
/// [`model_pool_label`]'s table (given when an answer of this layer showed the pool exists, or
/// by the task slots when they granted a create its slots), else the pool unconfirmed until
/// its answer ([`settle_pool`]; the only case that allocates). A create's model is in its path,
/// caller input: a place is taken only for a pool an answer showed to exist, so mistyped models
/// answered 1203 (or refused in this process) do not take the places of real ones for the
/// process's life, in this crate's series and in the slot gauges'.
fn model_pool(product: Product, model: &str) -> Value {
    // A model named `other` is the overflow (see `model_pool_label`).
    if model.len() > MODEL_LABEL_MAX_LEN || model == "other" {
        return other_model_pool(product);
    }
    match known_model_pool_label(product, model) {
        Some((label, at)) => named(label, at),
        None => unconfirmed_pool(product, model),
    }
}

/// A model pool's label at its place `at` in [`model_pool_label`]'s table.
fn named(label: &'static str, at: usize) -> Value {
    Value::fixed(label, FIXED_POOLS + OTHER_POOLS + at)
}

#[cold]
#[inline(never)]
fn unconfirmed_pool(product: Product, model: &str) -> Value {
    Value::built(format!("{}:{model}", product.as_str()))
}

/// `{product}:other`.
fn other_model_pool(product: Product) -> Value {
    let label = other_model_label(product);
    match product {
        Product::Video => Value::fixed(label, FIXED_POOLS),
        Product::Image => Value::fixed(label, FIXED_POOLS + 1),
        Product::TryOn => Value::fixed(label, FIXED_POOLS + 2),
        _ => Value {
            text: Cow::Borrowed(label),
            index: None,
        },
    }
}

/// Settles a call's pool label once its answer is known: a model pool unconfirmed when the
/// call started ([`pool`]) gets its own label when `shown` (the answer shows the pool exists:
/// see `Call::settle_pool`), a place being taken for it if one is free; else the place another
/// layer gave it meanwhile, if any; else `{product}:other`. Any other label is left as it is.
#[inline]
pub(crate) fn settle_pool(pool: &mut Value, shown: impl FnOnce() -> bool) {
    // Only an unconfirmed model pool's label is built text.
    if let Cow::Owned(text) = &pool.text {
        *pool = settled_pool(text, shown());
    }
}

#[cold]
#[inline(never)]
fn settled_pool(text: &str, shown: bool) -> Value {
    let Some((product, model)) = [Product::Video, Product::Image, Product::TryOn]
        .into_iter()
        .find_map(|product| {
            let model = text.strip_prefix(product.as_str())?.strip_prefix(':')?;
            Some((product, model))
        })
    else {
        return Value::built(text.to_owned());
    };
    // Not shown: a place given before (by the task slots, say) is its label, as the slot
    // gauges'; a model nobody gave one takes none here.
    let place = if shown {
        match model_pool_label(product, model) {
            (label, Some(at)) => Some((label, at)),
            (_, None) => None,
        }
    } else {
        known_model_pool_label(product, model)
    };
    match place {
        Some((label, at)) => named(label, at),
        None => other_model_pool(product),
    }
}

/// The index of a request kind in the key table.
fn kind_index(kind: RequestKind) -> Option<usize> {
    match kind {
        RequestKind::Create => Some(0),
        RequestKind::Query => Some(1),
        RequestKind::List => Some(2),
        RequestKind::Account => Some(3),
        RequestKind::Other => Some(4),
        _ => None,
    }
}

/// The metric keys of one finished call whose labels are all indexed: the
/// [`REQUEST_DURATION`](kling_core::metrics::REQUEST_DURATION) histogram's and the
/// [`RESPONSES`](kling_core::metrics::RESPONSES) counter's.
#[derive(Debug)]
pub(crate) struct CallKeys {
    pub(crate) duration: Key,
    pub(crate) responses: Key,
    /// The handles of both from the global recorder, registered on first use (see
    /// [`crate::recorder`]: only the global recorder's handles are kept).
    global: OnceLock<(Histogram, Counter)>,
}

impl CallKeys {
    /// The duration histogram and response counter of the global recorder, which must be the
    /// current recorder ([`Target::Global`](crate::recorder::Target::Global)).
    pub(crate) fn global_handles(&self) -> &(Histogram, Counter) {
        self.global.get_or_init(|| {
            metrics::with_recorder(|recorder| {
                (
                    recorder.register_histogram(&self.duration, &METADATA),
                    recorder.register_counter(&self.responses, &METADATA),
                )
            })
        })
    }
}

/// The metadata the call metrics are registered with.
pub(crate) static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Per (kind, pool), the call keys per (status, code), each built on first use, so a call
/// finds its keys by index: no lock, no hash, no clone. Handles are kept only for the global
/// recorder, which never changes once installed; any other recorder (a thread-local one in a
/// test) registers from the keys on each call.
///
/// The label arrays are leaked to get the `'static` slices a [`Key`] borrows; the combinations
/// are finite (5 kinds × 67 pools × 14 statuses × 25 codes at the very most), so the leak is
/// bounded.
static CALL_KEYS: [OnceLock<Box<[OnceLock<CallKeys>]>>; KINDS * POOLS] =
    [const { OnceLock::new() }; KINDS * POOLS];

/// The call keys of a combination of label values, when every one is indexed.
pub(crate) fn call_keys(
    kind: RequestKind,
    pool: &Value,
    status: Status,
    code: CodeLabel,
) -> Option<&'static CallKeys> {
    let kind_at = kind_index(kind)?;
    let (pool, pool_at) = pool.indexed()?;
    let status_at = status.index()?;
    let code_at = code.index()?;
    let table = CALL_KEYS[kind_at * POOLS + pool_at].get_or_init(|| {
        (0..STATUSES.len() * CODES.len())
            .map(|_| OnceLock::new())
            .collect()
    });
    let keys = table[status_at * CODES.len() + code_at]
        .get_or_init(|| build_keys(kind.as_str(), pool, STATUSES[status_at], CODES[code_at]));
    Some(keys)
}

fn build_keys(
    kind: &'static str,
    pool: &'static str,
    status: &'static str,
    code: &'static str,
) -> CallKeys {
    use kling_core::metrics::{
        LABEL_CODE, LABEL_KIND, LABEL_POOL, LABEL_STATUS, REQUEST_DURATION, RESPONSES,
    };
    let duration: &'static [Label] = Box::leak(Box::new([
        Label::from_static_parts(LABEL_KIND, kind),
        Label::from_static_parts(LABEL_POOL, pool),
        Label::from_static_parts(LABEL_STATUS, status),
        Label::from_static_parts(LABEL_CODE, code),
    ]));
    let responses: &'static [Label] = Box::leak(Box::new([
        Label::from_static_parts(LABEL_KIND, kind),
        Label::from_static_parts(LABEL_CODE, code),
    ]));
    CallKeys {
        duration: Key::from_static_parts(REQUEST_DURATION, duration),
        responses: Key::from_static_parts(RESPONSES, responses),
        global: OnceLock::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_read_as_numbers_and_names() {
        for documented in Code::DOCUMENTED {
            let value = CodeLabel::Kling(documented).value();
            assert_eq!(value.as_str(), documented.as_i64().to_string());
            assert!(value.indexed().is_some(), "{documented:?}");
        }
        // The code the next test keeps first: the table of undocumented codes is the
        // process's, and that test fills it (a code of its own here read `other` after it).
        assert_eq!(
            CodeLabel::Kling(Code::from_i64(-7_001)).value(),
            Value::built("-7001".into())
        );
        assert_eq!(CodeLabel::None.value().as_str(), NO_CODE);
        assert_eq!(CodeLabel::Malformed.value().as_str(), MALFORMED);
        assert_eq!(CodeLabel::Cancelled.value().as_str(), CANCELLED);
        assert_eq!(CodeLabel::Refused.value().as_str(), REFUSED);
        for s in [
            200u16, 201, 204, 400, 401, 403, 404, 408, 418, 429, 500, 502, 503, 504,
        ] {
            let status = http::StatusCode::from_u16(s).unwrap();
            assert_eq!(Status::Http(status).value().as_str(), s.to_string());
        }
        assert_eq!(Status::Http(http::StatusCode::IM_A_TEAPOT).index(), None);
        assert_eq!(Status::None.value().as_str(), NO_STATUS);
        assert_eq!(pool(&PoolRef::None).as_str(), "");
        assert_eq!(pool(&PoolRef::Product(Product::TryOn)).as_str(), "try-on");
        assert_eq!(
            pool(&PoolRef::Model(Product::Video, "kling-3.0".into())).as_str(),
            "video:kling-3.0"
        );
    }

    #[test]
    fn every_indexed_value_is_its_table_entry() {
        let statuses = (100..600).filter_map(|s| http::StatusCode::from_u16(s).ok());
        let mut indexed = 0;
        for label in statuses.map(Status::Http).chain([Status::None]) {
            if let Some(at) = label.index() {
                assert_eq!(label.value().indexed(), Some((STATUSES[at], at)));
                indexed += 1;
            }
        }
        assert_eq!(indexed, STATUSES.len(), "every status has one index");
        let mut indexed = 0;
        for label in Code::DOCUMENTED.into_iter().map(CodeLabel::Kling).chain([
            CodeLabel::None,
            CodeLabel::Malformed,
            CodeLabel::Cancelled,
            CodeLabel::Refused,
        ]) {
            let at = label.index().expect("indexed");
            assert_eq!(label.value().indexed(), Some((CODES[at], at)));
            indexed += 1;
        }
        assert_eq!(indexed, CODES.len(), "every code has one index");
    }

    #[test]
    fn undocumented_codes_keep_their_number_up_to_the_limit_then_share_other() {
        let first = CodeLabel::Kling(Code::from_i64(-7_001)).value();
        assert_eq!((first.as_str(), first.indexed()), ("-7001", None));
        let mut named = 0;
        for n in 0..2 * UNDOCUMENTED_CODE_LABELS as i64 {
            let value = CodeLabel::Kling(Code::from_i64(-8_000 - n)).value();
            if value.as_str() == OTHER_CODE {
                break;
            }
            assert_eq!(value.as_str(), (-8_000 - n).to_string());
            named += 1;
        }
        assert!(named < UNDOCUMENTED_CODE_LABELS, "{named} named");
        assert_eq!(
            CodeLabel::Kling(Code::from_i64(-9_999)).value().as_str(),
            OTHER_CODE
        );
        // A code labelled before the table filled keeps its number.
        assert_eq!(
            CodeLabel::Kling(Code::from_i64(-7_001)).value().as_str(),
            "-7001"
        );
    }

    /// A model pool is unconfirmed until an answer settles it: shown, it is labelled by name
    /// (and known to later calls); not shown, its call shares `{product}:other`. (Filling the
    /// table is tested in `tests/model_pool_labels.rs`, a binary of its own: it is global.)
    #[test]
    fn a_model_pool_is_named_only_once_an_answer_shows_it() {
        let mut first = pool(&PoolRef::Model(Product::Image, "settle-test-0".into()));
        assert_eq!(first.as_str(), "image:settle-test-0");
        assert_eq!(first.indexed(), None, "unconfirmed");
        let mut refused = first.clone();
        settle_pool(&mut refused, || false);
        assert_eq!(refused.indexed(), Some(("image:other", FIXED_POOLS + 1)));
        settle_pool(&mut first, || true);
        let (text, at) = first.indexed().expect("indexed");
        assert_eq!(text, "image:settle-test-0");
        assert!((FIXED_POOLS + OTHER_POOLS..POOLS).contains(&at));
        // Known at the next call, settled by nothing.
        let mut again = pool(&PoolRef::Model(Product::Image, "settle-test-0".into()));
        assert_eq!(again, first);
        settle_pool(&mut again, || unreachable!());
        assert_eq!(again, first);
        // The same model of another product is another pool.
        let mut other = pool(&PoolRef::Model(Product::Video, "settle-test-0".into()));
        settle_pool(&mut other, || true);
        assert_eq!(other.as_str(), "video:settle-test-0");
        assert_ne!(other.indexed(), first.indexed());
        let long = "m".repeat(kling_core::metrics::MODEL_LABEL_MAX_LEN + 1);
        let video_other = pool(&PoolRef::Model(Product::Video, long.as_str().into()));
        assert_eq!(video_other.indexed(), Some(("video:other", FIXED_POOLS)));
        // Other labels are left as they are.
        let mut product = pool(&PoolRef::Product(Product::TryOn));
        settle_pool(&mut product, || unreachable!());
        assert_eq!(product.indexed(), Some(("try-on", 3)));
    }

    #[test]
    fn call_keys_carry_the_label_values_and_are_built_once() {
        let video = pool(&PoolRef::Product(Product::Video));
        let ok = Status::Http(http::StatusCode::OK);
        let success = CodeLabel::Kling(Code::Success);
        let keys = call_keys(RequestKind::Create, &video, ok, success).unwrap();
        let labels: Vec<_> = keys
            .duration
            .labels()
            .map(|l| (l.key(), l.value()))
            .collect();
        assert_eq!(
            labels,
            [
                ("kind", "create"),
                ("pool", "video"),
                ("status", "200"),
                ("code", "0")
            ]
        );
        assert_eq!(keys.duration.name(), kling_core::metrics::REQUEST_DURATION);
        assert_eq!(keys.responses.name(), kling_core::metrics::RESPONSES);
        let labels: Vec<_> = keys
            .responses
            .labels()
            .map(|l| (l.key(), l.value()))
            .collect();
        assert_eq!(labels, [("kind", "create"), ("code", "0")]);
        let again = call_keys(RequestKind::Create, &video, ok, success).unwrap();
        assert!(std::ptr::eq(keys, again));
        let query = call_keys(
            RequestKind::Query,
            &pool(&PoolRef::None),
            Status::None,
            CodeLabel::None,
        );
        let labels: Vec<_> = query
            .unwrap()
            .duration
            .labels()
            .map(|l| l.value())
            .collect();
        assert_eq!(labels, ["query", "", "error", "error"]);
        let teapot = Status::Http(http::StatusCode::IM_A_TEAPOT);
        assert!(call_keys(RequestKind::Query, &video, teapot, CodeLabel::Malformed).is_none());
        let unknown = CodeLabel::Kling(Code::from_i64(4242));
        assert!(call_keys(RequestKind::Query, &video, ok, unknown).is_none());
    }
}
