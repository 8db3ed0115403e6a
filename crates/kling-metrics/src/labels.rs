//! Label values as `'static` strings where possible, so the common path builds no `String`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::RwLock;

use kling_core::{Code, Pool, TaskStatus};
use metrics::{Key, Label, SharedString};

/// The `status` label of a call that ended without an HTTP response.
pub(crate) const NO_STATUS: &str = "error";
/// The `code` label of a call that ended without a Kling envelope (transport error, timeout).
pub(crate) const NO_CODE: &str = "error";
/// The `code` label of a response whose body was not a Kling envelope.
pub(crate) const MALFORMED: &str = "malformed";

/// An HTTP status as a label value, `'static` for the common ones.
pub(crate) fn status(status: http::StatusCode) -> Cow<'static, str> {
    let text = match status.as_u16() {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return Cow::Owned(other.to_string()),
    };
    Cow::Borrowed(text)
}

/// A Kling business code as a label value, `'static` for the documented ones.
pub(crate) fn code(code: Code) -> Cow<'static, str> {
    let text = match code.as_i64() {
        0 => "0",
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1003 => "1003",
        1004 => "1004",
        1100 => "1100",
        1101 => "1101",
        1102 => "1102",
        1103 => "1103",
        1200 => "1200",
        1201 => "1201",
        1202 => "1202",
        1203 => "1203",
        1300 => "1300",
        1301 => "1301",
        1302 => "1302",
        1303 => "1303",
        1304 => "1304",
        5000 => "5000",
        5001 => "5001",
        5002 => "5002",
        other => return Cow::Owned(other.to_string()),
    };
    Cow::Borrowed(text)
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

/// A pool as a label value: empty for requests that draw from no pool.
pub(crate) fn pool(pool: Option<&Pool>) -> SharedString {
    match pool {
        None => SharedString::const_str(""),
        Some(pool) if pool.model().is_none() => SharedString::const_str(pool.product().as_str()),
        Some(pool) => SharedString::from(pool.to_string()),
    }
}

/// A pool as a `'static` label value, when it has one (no pool, or a legacy pool).
pub(crate) fn pool_static(pool: Option<&Pool>) -> Option<&'static str> {
    match pool {
        None => Some(""),
        Some(pool) if pool.model().is_none() => Some(pool.product().as_str()),
        Some(_) => None,
    }
}

/// The metric keys of one finished call whose labels are all `'static`: the
/// [`REQUEST_DURATION`](kling_core::metrics::REQUEST_DURATION) histogram's and the
/// [`RESPONSES`](kling_core::metrics::RESPONSES) counter's.
#[derive(Clone, Debug)]
pub(crate) struct CallKeys {
    pub(crate) duration: Key,
    pub(crate) responses: Key,
}

/// Identifies a combination of `'static` label values by their addresses and lengths: equal
/// ones are equal strings (two addresses of one string only make two equal entries).
type ComboId = [(usize, usize); 4];

/// Call keys by label combination, built once per combination so that a call builds no label
/// vector and hashes no label. Only keys are cached, never metric handles: the recorder a
/// handle comes from may change (a thread-local recorder in a test), a key does not.
///
/// The label arrays are leaked to get the `'static` slices a cheaply cloned [`Key`] needs; the
/// combinations of `'static` values are finite (5 kinds × 4 pools × 13 statuses × 23 codes at
/// the very most), so the leak is bounded.
static CALL_KEYS: RwLock<HashMap<ComboId, CallKeys, BuildHasherDefault<ComboHasher>>> =
    RwLock::new(HashMap::with_hasher(BuildHasherDefault::new()));

/// The call keys of a combination of `'static` label values.
pub(crate) fn call_keys(
    kind: &'static str,
    pool: &'static str,
    status: &'static str,
    code: &'static str,
) -> CallKeys {
    use kling_core::metrics::{
        LABEL_CODE, LABEL_KIND, LABEL_POOL, LABEL_STATUS, REQUEST_DURATION, RESPONSES,
    };
    let id = [kind, pool, status, code].map(|s| (s.as_ptr() as usize, s.len()));
    if let Some(keys) = CALL_KEYS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(&id)
    {
        return keys.clone();
    }
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
    let keys = CallKeys {
        duration: Key::from_static_parts(REQUEST_DURATION, duration),
        responses: Key::from_static_parts(RESPONSES, responses),
    };
    CALL_KEYS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(id)
        .or_insert(keys)
        .clone()
}

/// A multiplicative hasher for [`ComboId`]s (four machine words; no hostile input).
#[derive(Default)]
struct ComboHasher(u64);

impl Hasher for ComboHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kling_core::Product;

    #[test]
    fn label_values_read_as_numbers_and_names() {
        for documented in Code::DOCUMENTED {
            assert_eq!(&*code(documented), documented.as_i64().to_string());
        }
        assert_eq!(&*code(Code::from_i64(4242)), "4242");
        for s in [
            200u16, 201, 204, 400, 401, 403, 404, 408, 418, 429, 500, 502, 503, 504,
        ] {
            let status = http::StatusCode::from_u16(s).unwrap();
            assert_eq!(&*super::status(status), s.to_string());
        }
        assert_eq!(&*pool(None), "");
        assert_eq!(&*pool(Some(&Pool::new(Product::TryOn))), "try-on");
        assert_eq!(
            &*pool(Some(&Pool::with_model(Product::Video, "kling-3.0"))),
            "video:kling-3.0"
        );
    }
}
