//! Label values as `'static` strings where possible, so the common path builds no `String`.

use kling_core::{Code, Pool};
use metrics::SharedString;

/// The `status` label of a call that ended without an HTTP response.
pub(crate) const NO_STATUS: &str = "error";
/// The `code` label of a call that ended without a Kling envelope (transport error, timeout).
pub(crate) const NO_CODE: &str = "error";
/// The `code` label of a response whose body was not a Kling envelope.
pub(crate) const MALFORMED: &str = "malformed";

/// An HTTP status as a label value.
pub(crate) fn status(status: http::StatusCode) -> SharedString {
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
        other => return SharedString::from(other.to_string()),
    };
    SharedString::const_str(text)
}

/// A Kling business code as a label value.
pub(crate) fn code(code: Code) -> SharedString {
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
        other => return SharedString::from(other.to_string()),
    };
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
