//! Kling business codes and what a client should do about each.
//!
//! The HTTP status alone says too little: six different codes arrive as HTTP 429 (1100, 1101,
//! 1102, 1302, 1303, 1304) and only two of them are worth retrying. [`Code::disposition`] is
//! the one table every layer reads, so no layer re-invents it.

use std::fmt;

use http::StatusCode;

/// A business code from the `code` field of a Kling response envelope.
///
/// Every code documented by Kling has a variant; any other number is kept in
/// [`Code::Unknown`], so a new code never fails parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// `0`: the request succeeded.
    Success,
    /// `1000`: authentication failed.
    AuthFailed,
    /// `1001`: the `Authorization` header is empty.
    AuthHeaderEmpty,
    /// `1002`: the key is invalid (or belongs to the other region).
    InvalidKey,
    /// `1003`: the token is not yet valid (clock skew).
    TokenNotYetValid,
    /// `1004`: the token has expired.
    TokenExpired,
    /// `1100`: the account is abnormal.
    AccountAbnormal,
    /// `1101`: the account is in arrears.
    AccountInArrears,
    /// `1102`: the resource pack is exhausted or expired.
    ResourcePackExhausted,
    /// `1103`: no permission for this API or model.
    NoPermission,
    /// `1200`: the request is invalid.
    InvalidRequest,
    /// `1201`: a parameter is invalid.
    InvalidParameter,
    /// `1202`: wrong method (or path).
    WrongMethod,
    /// `1203`: the resource or model was not found.
    NotFound,
    /// `1300`: refused by platform policy.
    PlatformPolicy,
    /// `1301`: refused by content security.
    ContentSecurity,
    /// `1302`: requests too fast.
    RateLimited,
    /// `1303`: parallel tasks over the resource-pack limit.
    ParallelTaskLimit,
    /// `1304`: refused by the IP whitelist policy.
    IpWhitelist,
    /// `5000`: internal server error.
    InternalError,
    /// `5001`: temporarily unavailable (maintenance).
    Unavailable,
    /// `5002`: internal timeout (backlog).
    InternalTimeout,
    /// Any code Kling has not documented, kept as sent.
    Unknown(i64),
}

/// Why a retryable response may be retried; each reason has its own backoff base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryKind {
    /// The server throttled the request (`1302`): back off at least a second.
    Throttled,
    /// A transient server fault (`5000`, `5002`, or a 5xx without an envelope).
    Transient,
    /// Maintenance (`5001`): the same as transient, with a longer backoff.
    Maintenance,
}

/// What a client should do with a response, derived from its code (and status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Disposition {
    /// The request succeeded.
    Success,
    /// Try again after a delay.
    Retry(RetryKind),
    /// Sign a fresh token and try once more (`1003`, `1004`).
    Resign,
    /// The account has no free task slot (`1303`): retry once a slot frees.
    WaitForSlot,
    /// Never retry: the same request fails again.
    Fatal,
}

impl Disposition {
    /// Whether any retry (after a delay, a re-sign or a free slot) may succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Disposition::Success | Disposition::Fatal)
    }
}

impl Code {
    /// Every documented code, in numeric order.
    pub const DOCUMENTED: [Code; 22] = [
        Code::Success,
        Code::AuthFailed,
        Code::AuthHeaderEmpty,
        Code::InvalidKey,
        Code::TokenNotYetValid,
        Code::TokenExpired,
        Code::AccountAbnormal,
        Code::AccountInArrears,
        Code::ResourcePackExhausted,
        Code::NoPermission,
        Code::InvalidRequest,
        Code::InvalidParameter,
        Code::WrongMethod,
        Code::NotFound,
        Code::PlatformPolicy,
        Code::ContentSecurity,
        Code::RateLimited,
        Code::ParallelTaskLimit,
        Code::IpWhitelist,
        Code::InternalError,
        Code::Unavailable,
        Code::InternalTimeout,
    ];

    /// The code for a number; undocumented numbers become [`Code::Unknown`].
    pub fn from_i64(code: i64) -> Code {
        match code {
            0 => Code::Success,
            1000 => Code::AuthFailed,
            1001 => Code::AuthHeaderEmpty,
            1002 => Code::InvalidKey,
            1003 => Code::TokenNotYetValid,
            1004 => Code::TokenExpired,
            1100 => Code::AccountAbnormal,
            1101 => Code::AccountInArrears,
            1102 => Code::ResourcePackExhausted,
            1103 => Code::NoPermission,
            1200 => Code::InvalidRequest,
            1201 => Code::InvalidParameter,
            1202 => Code::WrongMethod,
            1203 => Code::NotFound,
            1300 => Code::PlatformPolicy,
            1301 => Code::ContentSecurity,
            1302 => Code::RateLimited,
            1303 => Code::ParallelTaskLimit,
            1304 => Code::IpWhitelist,
            5000 => Code::InternalError,
            5001 => Code::Unavailable,
            5002 => Code::InternalTimeout,
            other => Code::Unknown(other),
        }
    }

    /// The number Kling sends for this code.
    pub fn as_i64(self) -> i64 {
        match self {
            Code::Success => 0,
            Code::AuthFailed => 1000,
            Code::AuthHeaderEmpty => 1001,
            Code::InvalidKey => 1002,
            Code::TokenNotYetValid => 1003,
            Code::TokenExpired => 1004,
            Code::AccountAbnormal => 1100,
            Code::AccountInArrears => 1101,
            Code::ResourcePackExhausted => 1102,
            Code::NoPermission => 1103,
            Code::InvalidRequest => 1200,
            Code::InvalidParameter => 1201,
            Code::WrongMethod => 1202,
            Code::NotFound => 1203,
            Code::PlatformPolicy => 1300,
            Code::ContentSecurity => 1301,
            Code::RateLimited => 1302,
            Code::ParallelTaskLimit => 1303,
            Code::IpWhitelist => 1304,
            Code::InternalError => 5000,
            Code::Unavailable => 5001,
            Code::InternalTimeout => 5002,
            Code::Unknown(other) => other,
        }
    }

    /// The HTTP status Kling documents for this code (`None` for unknown codes).
    pub fn documented_status(self) -> Option<StatusCode> {
        let status = match self {
            Code::Success => StatusCode::OK,
            Code::AuthFailed
            | Code::AuthHeaderEmpty
            | Code::InvalidKey
            | Code::TokenNotYetValid
            | Code::TokenExpired => StatusCode::UNAUTHORIZED,
            Code::AccountAbnormal
            | Code::AccountInArrears
            | Code::ResourcePackExhausted
            | Code::RateLimited
            | Code::ParallelTaskLimit
            | Code::IpWhitelist => StatusCode::TOO_MANY_REQUESTS,
            Code::NoPermission => StatusCode::FORBIDDEN,
            Code::InvalidRequest
            | Code::InvalidParameter
            | Code::PlatformPolicy
            | Code::ContentSecurity => StatusCode::BAD_REQUEST,
            Code::WrongMethod | Code::NotFound => StatusCode::NOT_FOUND,
            Code::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::InternalTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::Unknown(_) => return None,
        };
        Some(status)
    }

    /// What a client does about this code, per Kling's error-code table.
    ///
    /// An unknown code is judged by the HTTP status it came with: 5xx is transient, anything
    /// else is fatal (retrying what is not understood could repeat a billed create).
    pub fn disposition(self, status: StatusCode) -> Disposition {
        match self {
            Code::Success => Disposition::Success,
            Code::TokenNotYetValid | Code::TokenExpired => Disposition::Resign,
            Code::RateLimited => Disposition::Retry(RetryKind::Throttled),
            Code::ParallelTaskLimit => Disposition::WaitForSlot,
            Code::InternalError | Code::InternalTimeout => Disposition::Retry(RetryKind::Transient),
            Code::Unavailable => Disposition::Retry(RetryKind::Maintenance),
            // A non-zero code is never a success, whatever the status says (code 0 is).
            Code::Unknown(_) => match status_disposition(status) {
                Disposition::Success => Disposition::Fatal,
                other => other,
            },
            Code::AuthFailed
            | Code::AuthHeaderEmpty
            | Code::InvalidKey
            | Code::AccountAbnormal
            | Code::AccountInArrears
            | Code::ResourcePackExhausted
            | Code::NoPermission
            | Code::InvalidRequest
            | Code::InvalidParameter
            | Code::WrongMethod
            | Code::NotFound
            | Code::PlatformPolicy
            | Code::ContentSecurity
            | Code::IpWhitelist => Disposition::Fatal,
        }
    }

    /// Whether a create answered with this code may nevertheless have created a billed task,
    /// whatever the HTTP status ([`Code::may_have_created_under`] reads the status too).
    ///
    /// Kling documents this for internal errors and timeouts; an unknown code is assumed to
    /// have done so, since nothing proves otherwise.
    pub fn may_have_created(self) -> bool {
        matches!(
            self,
            Code::InternalError | Code::InternalTimeout | Code::Unknown(_)
        )
    }

    /// Whether a create answered with this code and HTTP `status` may have created a billed
    /// task: as [`Code::may_have_created`], except that an unknown code that came with a 4xx
    /// status did not. Every 4xx code Kling documents is a refusal, and the layers must agree
    /// on the answer: the retry layer reports such a create as final and not created
    /// ([`Disposition::Fatal`]), so the task slots and a spend guard give back what it held.
    pub fn may_have_created_under(self, status: StatusCode) -> bool {
        self.may_have_created() && !(matches!(self, Code::Unknown(_)) && status.is_client_error())
    }

    /// Whether this code means no further create can succeed for the account (`1102`, and the
    /// account-level refusals `1100`/`1101`), so creates should stop until a person acts.
    pub fn halts_creates(self) -> bool {
        matches!(
            self,
            Code::ResourcePackExhausted | Code::AccountAbnormal | Code::AccountInArrears
        )
    }

    /// A short description, as in Kling's error-code table.
    pub fn description(self) -> &'static str {
        match self {
            Code::Success => "success",
            Code::AuthFailed => "authentication failed",
            Code::AuthHeaderEmpty => "authorization header is empty",
            Code::InvalidKey => "invalid key",
            Code::TokenNotYetValid => "token not yet valid",
            Code::TokenExpired => "token expired",
            Code::AccountAbnormal => "account abnormal",
            Code::AccountInArrears => "account in arrears",
            Code::ResourcePackExhausted => "resource pack exhausted or expired",
            Code::NoPermission => "no permission for this api or model",
            Code::InvalidRequest => "invalid request",
            Code::InvalidParameter => "invalid parameter",
            Code::WrongMethod => "wrong method",
            Code::NotFound => "resource or model not found",
            Code::PlatformPolicy => "refused by platform policy",
            Code::ContentSecurity => "refused by content security",
            Code::RateLimited => "requests too fast",
            Code::ParallelTaskLimit => "parallel tasks over resource pack limit",
            Code::IpWhitelist => "refused by ip whitelist policy",
            Code::InternalError => "internal error",
            Code::Unavailable => "temporarily unavailable",
            Code::InternalTimeout => "internal timeout",
            Code::Unknown(_) => "undocumented code",
        }
    }
}

/// The disposition of a response that carries no known code: judged by its status.
pub fn status_disposition(status: StatusCode) -> Disposition {
    match status.as_u16() {
        200..=299 => Disposition::Success,
        503 => Disposition::Retry(RetryKind::Maintenance),
        500..=599 => Disposition::Retry(RetryKind::Transient),
        _ => Disposition::Fatal,
    }
}

impl From<i64> for Code {
    fn from(code: i64) -> Self {
        Code::from_i64(code)
    }
}

impl From<Code> for i64 {
    fn from(code: Code) -> Self {
        code.as_i64()
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_i64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_code_round_trips_through_its_number() {
        for code in Code::DOCUMENTED {
            assert_eq!(Code::from_i64(code.as_i64()), code);
            assert!(code.documented_status().is_some());
        }
        assert_eq!(Code::from_i64(4242), Code::Unknown(4242));
        assert_eq!(Code::Unknown(4242).as_i64(), 4242);
    }

    #[test]
    fn only_two_of_the_six_429_codes_are_worth_retrying() {
        let status = StatusCode::TOO_MANY_REQUESTS;
        let all: Vec<i64> = Code::DOCUMENTED
            .iter()
            .filter(|c| c.documented_status() == Some(status))
            .map(|c| c.as_i64())
            .collect();
        assert_eq!(all, vec![1100, 1101, 1102, 1302, 1303, 1304]);
        let retryable: Vec<i64> = Code::DOCUMENTED
            .iter()
            .filter(|c| c.documented_status() == Some(status))
            .filter(|c| c.disposition(status).is_retryable())
            .map(|c| c.as_i64())
            .collect();
        assert_eq!(retryable, vec![1302, 1303]);
    }

    #[test]
    fn the_table_matches_kling_api_md() {
        let s = StatusCode::OK;
        for n in [
            1000, 1001, 1002, 1100, 1101, 1102, 1103, 1200, 1201, 1202, 1203, 1300, 1301, 1304,
        ] {
            assert_eq!(Code::from_i64(n).disposition(s), Disposition::Fatal, "{n}");
        }
        assert_eq!(Code::from_i64(1003).disposition(s), Disposition::Resign);
        assert_eq!(Code::from_i64(1004).disposition(s), Disposition::Resign);
        assert_eq!(
            Code::from_i64(1302).disposition(s),
            Disposition::Retry(RetryKind::Throttled)
        );
        assert_eq!(
            Code::from_i64(1303).disposition(s),
            Disposition::WaitForSlot
        );
        assert_eq!(
            Code::from_i64(5000).disposition(s),
            Disposition::Retry(RetryKind::Transient)
        );
        assert_eq!(
            Code::from_i64(5001).disposition(s),
            Disposition::Retry(RetryKind::Maintenance)
        );
        assert_eq!(
            Code::from_i64(5002).disposition(s),
            Disposition::Retry(RetryKind::Transient)
        );
        assert!(Code::InternalError.may_have_created());
        assert!(Code::InternalTimeout.may_have_created());
        assert!(!Code::RateLimited.may_have_created());
        assert!(!Code::ParallelTaskLimit.may_have_created());
        // An undocumented code: only a 4xx status rules a task out.
        let unknown = Code::from_i64(1299);
        assert!(!unknown.may_have_created_under(StatusCode::BAD_REQUEST));
        assert!(unknown.may_have_created_under(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(unknown.may_have_created_under(StatusCode::OK));
        assert!(Code::InternalError.may_have_created_under(StatusCode::BAD_REQUEST));
        assert!(Code::ResourcePackExhausted.halts_creates());
    }

    #[test]
    fn unknown_codes_are_judged_by_status() {
        let unknown = Code::Unknown(9999);
        assert_eq!(
            unknown.disposition(StatusCode::BAD_GATEWAY),
            Disposition::Retry(RetryKind::Transient)
        );
        assert_eq!(
            unknown.disposition(StatusCode::TOO_MANY_REQUESTS),
            Disposition::Fatal
        );
        // Found by the `envelope` fuzz target: an undocumented non-zero code under HTTP 200
        // was a success, against this method's own documentation.
        assert_eq!(
            Code::Unknown(1).disposition(StatusCode::OK),
            Disposition::Fatal
        );
        // A 503 is maintenance (the longer backoff), not an ordinary transient fault.
        assert_eq!(
            unknown.disposition(StatusCode::SERVICE_UNAVAILABLE),
            Disposition::Retry(RetryKind::Maintenance)
        );
    }

    /// A response without a known code is judged by its status alone: any 2xx succeeded, a
    /// 503 is maintenance, another 5xx is transient, and everything else is final.
    #[test]
    fn a_status_alone_decides_by_its_class() {
        let judge = |status: u16| status_disposition(StatusCode::from_u16(status).unwrap());
        for ok in [200, 201, 204, 299] {
            assert_eq!(judge(ok), Disposition::Success, "{ok}");
        }
        assert_eq!(judge(503), Disposition::Retry(RetryKind::Maintenance));
        for transient in [500, 502, 504, 599] {
            assert_eq!(
                judge(transient),
                Disposition::Retry(RetryKind::Transient),
                "{transient}"
            );
        }
        for fatal in [100, 301, 400, 404, 429, 600] {
            assert_eq!(judge(fatal), Disposition::Fatal, "{fatal}");
        }
    }

    /// Only the account-level refusals stop creates: halting on a throttle, a full slot or a
    /// server fault would stop a healthy account until a person acts.
    #[test]
    fn only_account_refusals_halt_creates() {
        let halting: Vec<i64> = Code::DOCUMENTED
            .iter()
            .filter(|c| c.halts_creates())
            .map(|c| c.as_i64())
            .collect();
        assert_eq!(halting, vec![1100, 1101, 1102]);
        assert!(!Code::Unknown(1105).halts_creates());
    }

    /// Only an internal error or timeout may have made a task behind a refusal: every other
    /// documented code (`5001` maintenance included) refused before any work, so a create
    /// answered with one is sent again, and a slot or a credit it held is given back.
    #[test]
    fn only_internal_errors_and_timeouts_may_have_created_a_task() {
        let maybe: Vec<i64> = Code::DOCUMENTED
            .iter()
            .filter(|c| c.may_have_created())
            .map(|c| c.as_i64())
            .collect();
        assert_eq!(maybe, vec![5000, 5002]);
        for code in Code::DOCUMENTED {
            for status in [400, 429, 500, 503] {
                let status = StatusCode::from_u16(status).unwrap();
                assert_eq!(
                    code.may_have_created_under(status),
                    code.may_have_created(),
                    "{code} under {status}"
                );
            }
        }
    }

    #[test]
    fn a_code_converts_to_and_from_its_number() {
        for code in Code::DOCUMENTED {
            assert_eq!(i64::from(code), code.as_i64());
            assert_eq!(Code::from(code.as_i64()), code);
            assert_eq!(code.to_string(), code.as_i64().to_string());
        }
        assert_eq!(i64::from(Code::Unknown(-7)), -7);
    }
}
