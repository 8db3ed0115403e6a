//! `Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.
//!
//! Kling documents no `Retry-After`, but proxies and future versions may send one, and a client
//! that ignores it retries too early. Both forms are parsed; an HTTP-date is read relative to the
//! response's own `Date` header when there is one, so a skewed local clock does not stretch or
//! shrink the wait.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::{DATE, RETRY_AFTER};

/// The longest delay a `Retry-After` can express here; larger values saturate to it.
///
/// A day is far beyond any wait a client honours (layers clamp to their own maximum), and the
/// cap keeps instant arithmetic from overflowing.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// A parsed `Retry-After` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// `Retry-After: 7`: wait this long after the response arrived.
    Delay(Duration),
    /// `Retry-After: Fri, 31 Dec 1999 23:59:59 GMT`: retry at or after this time.
    At(SystemTime),
}

impl RetryAfter {
    /// Parses one header value; garbage (and a negative number) is `None`.
    ///
    /// All three HTTP-date forms are accepted (IMF-fixdate, RFC 850, asctime). A non-negative
    /// decimal (`2.5`, `.5`, `3.`) is no delta-seconds by RFC 9110, but a server that wrote
    /// one asked for at least that long: it is rounded up to whole seconds (`2.5` is 3 s), so
    /// a retry is never early; before, it was ignored and the retry came as soon as the
    /// caller's own backoff allowed.
    pub fn parse(value: &[u8]) -> Option<RetryAfter> {
        let text = std::str::from_utf8(value).ok()?.trim();
        if text.is_empty() {
            return None;
        }
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if digits(whole) && digits(fraction) && whole.len() + fraction.len() > 0 {
            // An absurdly long but valid number saturates rather than being ignored.
            let secs = if whole.is_empty() {
                0
            } else {
                whole.parse::<u64>().unwrap_or(u64::MAX)
            };
            let round_up = fraction.bytes().any(|b| b != b'0');
            let secs = secs.saturating_add(u64::from(round_up));
            let delay = Duration::from_secs(secs).min(MAX_RETRY_AFTER);
            return Some(RetryAfter::Delay(delay));
        }
        httpdate::parse_http_date(text).ok().map(RetryAfter::At)
    }

    /// The `Retry-After` of a response's headers, if present and valid: the first valid one
    /// when there are several (a field that is not one is skipped; fields a proxy joined into
    /// one with commas are read one by one, see [`RetryAfter::parse_list`]).
    pub fn from_headers(headers: &HeaderMap) -> Option<RetryAfter> {
        headers
            .get_all(RETRY_AFTER)
            .iter()
            .find_map(|v| RetryAfter::parse_list(v.as_bytes()).into_iter().next())
    }

    /// Parses a field value that may hold several values joined with commas, as an
    /// intermediary combines repeated fields (`5, 10`, or `Sun, 06 Nov 1994 08:49:37 GMT, 7`):
    /// each valid one, in order. A value that parses whole (an HTTP-date has a comma of its
    /// own) is that one value; elements that are not valid are skipped.
    pub fn parse_list(value: &[u8]) -> Vec<RetryAfter> {
        if let Some(one) = RetryAfter::parse(value) {
            return vec![one];
        }
        let Ok(text) = std::str::from_utf8(value) else {
            return Vec::new();
        };
        let parts: Vec<&str> = text.split(',').collect();
        let mut values = Vec::new();
        let mut i = 0;
        while i < parts.len() {
            // A date's own comma (after its day name) splits it in two: the pair first.
            if let Some(next) = parts.get(i + 1)
                && let Some(date) = RetryAfter::parse(format!("{},{next}", parts[i]).as_bytes())
            {
                values.push(date);
                i += 2;
                continue;
            }
            values.extend(RetryAfter::parse(parts[i].as_bytes()));
            i += 1;
        }
        values
    }

    /// How long to wait counting from when the response was received.
    ///
    /// A date is measured against `date` (the response's `Date` header) when given, else
    /// against `now`; a date in the past is zero.
    pub fn delay(&self, date: Option<SystemTime>, now: SystemTime) -> Duration {
        match *self {
            RetryAfter::Delay(delay) => delay,
            RetryAfter::At(at) => at
                .duration_since(date.unwrap_or(now))
                .unwrap_or(Duration::ZERO)
                .min(MAX_RETRY_AFTER),
        }
    }
}

/// The delay a response's headers ask for, measured as [`RetryAfter::delay`] does, with its
/// own `Date` header as the reference when present.
///
/// A response with several `Retry-After` fields (a proxy that added its own), or with fields
/// joined into one with commas ([`RetryAfter::parse_list`]), waits for the longest of the valid
/// ones, so that a retry is early for none of them; one that is not valid is skipped.
pub fn retry_after_delay(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let mut values = headers
        .get_all(RETRY_AFTER)
        .iter()
        .flat_map(|v| RetryAfter::parse_list(v.as_bytes()))
        .peekable();
    values.peek()?;
    let date = headers
        .get(DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok());
    values.map(|retry_after| retry_after.delay(date, now)).max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn delta_seconds() {
        assert_eq!(
            RetryAfter::parse(b"7"),
            Some(RetryAfter::Delay(Duration::from_secs(7)))
        );
        assert_eq!(
            RetryAfter::parse(b" 0 "),
            Some(RetryAfter::Delay(Duration::ZERO))
        );
        assert_eq!(
            RetryAfter::parse(b"99999999999999999999999"),
            Some(RetryAfter::Delay(MAX_RETRY_AFTER))
        );
    }

    /// A decimal is rounded up, never down: the wait is never shorter than asked for.
    #[test]
    fn a_decimal_is_rounded_up_to_whole_seconds() {
        for (text, secs) in [
            ("2.5", 3),
            ("1.5", 2),
            ("0.001", 1),
            (".5", 1),
            ("3.", 3),
            ("4.000", 4),
            (" 7.0 ", 7),
            ("0.0", 0),
            ("86399.2", 86_400),
        ] {
            assert_eq!(
                RetryAfter::parse(text.as_bytes()),
                Some(RetryAfter::Delay(Duration::from_secs(secs))),
                "{text}"
            );
        }
        for huge in [
            "86400.5",
            "99999999999999999999999.9",
            "18446744073709551615.5",
        ] {
            assert_eq!(
                RetryAfter::parse(huge.as_bytes()),
                Some(RetryAfter::Delay(MAX_RETRY_AFTER)),
                "{huge}"
            );
        }
    }

    #[test]
    fn garbage_is_none() {
        for bad in [
            &b""[..],
            b"-1",
            b"-1.5",
            b".",
            b"1..5",
            b"1.5.",
            b"1.5s",
            b"+1.5",
            b"1e3",
            b"soon",
            b"7 s",
            b"\xff\xfe",
            b"Fri, 99 Foo",
        ] {
            assert_eq!(RetryAfter::parse(bad), None, "{bad:?}");
        }
    }

    /// Fields a proxy joined with commas are each read, dates (which hold a comma of their
    /// own) included; the delay is the longest. Before, `5, 10` was no value at all and a
    /// retry came as soon as the caller's own backoff allowed.
    #[test]
    fn fields_joined_with_commas_are_read_one_by_one() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let delay = |secs| RetryAfter::Delay(Duration::from_secs(secs));
        assert_eq!(RetryAfter::parse_list(b"5, 10"), [delay(5), delay(10)]);
        assert_eq!(RetryAfter::parse_list(b"5,soon, 2.5"), [delay(5), delay(3)]);
        assert_eq!(
            RetryAfter::parse_list(format!("{date}, 7").as_bytes()),
            [RetryAfter::At(at(784_111_777)), delay(7)]
        );
        assert_eq!(
            RetryAfter::parse_list(format!("7, {date}").as_bytes()),
            [delay(7), RetryAfter::At(at(784_111_777))]
        );
        assert_eq!(
            RetryAfter::parse_list(date.as_bytes()),
            [RetryAfter::At(at(784_111_777))]
        );
        assert!(RetryAfter::parse_list(b"soon, later").is_empty());
        assert!(RetryAfter::parse_list(b",").is_empty());

        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("5, 10"));
        assert_eq!(
            retry_after_delay(&headers, at(0)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(RetryAfter::from_headers(&headers), Some(delay(5)));
        let joined = format!("{date}, 7");
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&joined).unwrap());
        headers.insert(
            DATE,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:27 GMT"),
        );
        assert_eq!(
            retry_after_delay(&headers, at(0)),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn all_three_date_forms() {
        // RFC 9110's own example instant, in each of the three forms it lists.
        let expected = RetryAfter::At(at(784_111_777));
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(RetryAfter::parse(form.as_bytes()), Some(expected), "{form}");
        }
    }

    #[test]
    fn a_date_is_relative_to_the_date_header_and_never_negative() {
        let ra = RetryAfter::At(at(1_000));
        assert_eq!(ra.delay(Some(at(993)), at(0)), Duration::from_secs(7));
        assert_eq!(ra.delay(None, at(990)), Duration::from_secs(10));
        assert_eq!(ra.delay(Some(at(2_000)), at(0)), Duration::ZERO);
        // A date further off than a day saturates, as a delta-seconds value does.
        let far = RetryAfter::At(at(10 * 86_400));
        assert_eq!(far.delay(Some(at(0)), at(0)), MAX_RETRY_AFTER);
    }

    /// Several `Retry-After` fields: one that is not valid hides none that is, and the wait is
    /// the longest one asked for, whatever their order or form.
    #[test]
    fn several_fields_wait_for_the_longest_valid_one() {
        let headers = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                DATE,
                HeaderValue::from_static("Thu, 01 Jan 1970 00:16:40 GMT"),
            );
            for value in values {
                headers.append(RETRY_AFTER, HeaderValue::from_static(value));
            }
            headers
        };
        let now = at(1_000);
        for (values, secs) in [
            (&["soon", "7"][..], 7),
            (&["7", "soon"], 7),
            (&["7", "100"], 100),
            (&["100", "7"], 100),
            (&["3", "Thu, 01 Jan 1970 00:17:00 GMT", "-5"], 20),
            (&["Thu, 01 Jan 1970 00:17:00 GMT", "30"], 30),
        ] {
            assert_eq!(
                retry_after_delay(&headers(values), now),
                Some(Duration::from_secs(secs)),
                "{values:?}"
            );
        }
        assert_eq!(retry_after_delay(&headers(&["soon", "-1"]), now), None);
        assert_eq!(
            RetryAfter::from_headers(&headers(&["soon", "7", "9"])),
            Some(RetryAfter::Delay(Duration::from_secs(7)))
        );
    }

    #[test]
    fn headers_use_their_own_date() {
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:44 GMT"),
        );
        headers.insert(
            DATE,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        // The local clock is a day off; the server's Date keeps the wait right.
        let now = at(784_111_777 + 86_400);
        assert_eq!(
            retry_after_delay(&headers, now),
            Some(Duration::from_secs(7))
        );
    }

    /// No `Retry-After` or `Date` a server may send panics, near-miss dates and numbers of
    /// any length among them, whatever the clock says, and no wait passes the cap: random
    /// edits of valid values, with a fixed seed (xorshift64*), the same on every run.
    #[test]
    fn no_header_value_panics() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut below = |n: usize| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let n = u64::try_from(n).expect("small");
            usize::try_from(state.wrapping_mul(0x9e37_79b9_7f4a_7c15) % n).expect("below n")
        };
        const SEEDS: [&str; 7] = [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "120",
            "18446744073709551616.5",
        ];
        const BYTES: &[u8] = b"0123456789 .,:-+GMTSunNovDec\t\xff";
        let clocks = [
            at(0),
            at(784_111_777),
            at(253_402_300_799),
            at(u64::from(u32::MAX) * 4),
        ];
        for _ in 0..20_000 {
            let mut values = Vec::new();
            for _ in 0..2 {
                let mut value = SEEDS[below(SEEDS.len())].as_bytes().to_vec();
                for _ in 0..below(4) {
                    let place = below(value.len() + 1);
                    match below(3) {
                        0 if place < value.len() => {
                            value.remove(place);
                        }
                        1 if place < value.len() => value[place] = BYTES[below(BYTES.len())],
                        _ => value.insert(place, BYTES[below(BYTES.len())]),
                    }
                }
                values.push(value);
            }
            let _ = RetryAfter::parse(&values[0]);
            let mut headers = HeaderMap::new();
            for (name, value) in [(RETRY_AFTER, &values[0]), (DATE, &values[1])] {
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    headers.append(name, value);
                }
            }
            let now = clocks[below(clocks.len())];
            if let Some(delay) = retry_after_delay(&headers, now) {
                assert!(delay <= MAX_RETRY_AFTER, "{headers:?}: {delay:?}");
            }
        }
    }
}
