use std::time::{Duration, SystemTime};

use kling_core::{MAX_RETRY_AFTER, RetryAfter};
use proptest::prelude::*;

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = RetryAfter::parse(&bytes);
    }

    #[test]
    fn delta_seconds_parse_to_themselves(secs in 0u64..=86_400, pad in "[ \t]{0,2}") {
        let text = format!("{pad}{secs}{pad}");
        prop_assert_eq!(
            RetryAfter::parse(text.as_bytes()),
            Some(RetryAfter::Delay(Duration::from_secs(secs)))
        );
    }

    #[test]
    fn any_delay_is_capped(digits in "[0-9]{1,40}") {
        let Some(RetryAfter::Delay(delay)) = RetryAfter::parse(digits.as_bytes()) else {
            return Err(TestCaseError::fail("digits must parse"));
        };
        prop_assert!(delay <= MAX_RETRY_AFTER);
    }

    #[test]
    fn http_dates_round_trip_and_measure_from_the_date_header(
        at in 0u64..4_000_000_000,
        date in 0u64..4_000_000_000,
    ) {
        let at_time = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
        let date_time = SystemTime::UNIX_EPOCH + Duration::from_secs(date);
        let text = httpdate::fmt_http_date(at_time);
        let parsed = RetryAfter::parse(text.as_bytes()).expect("an IMF-fixdate parses");
        prop_assert_eq!(parsed, RetryAfter::At(at_time));
        let delay = parsed.delay(Some(date_time), SystemTime::UNIX_EPOCH);
        prop_assert_eq!(delay, Duration::from_secs(at.saturating_sub(date)).min(MAX_RETRY_AFTER));
    }
}
