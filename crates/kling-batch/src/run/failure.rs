//! What a failed create or query says about itself: its Kling code, whether it halts the
//! run, whether it may have made a billed task.

use kling_core::Code;
use kling_core::error::ApiError;

use crate::journal::ErrorInfo;

/// What a failed create says about itself.
#[derive(Clone, Debug)]
pub(super) struct Failure {
    pub(super) info: ErrorInfo,
    pub(super) code: Option<Code>,
    /// Surely not created, and sending it again would fail the same way. Never with
    /// `may_have_created`: a refusal that no retry changes may be Kling's answer to a resend
    /// of a create that made a task (`1201` for the external id it already has).
    pub(super) final_refusal: bool,
    /// The account can create nothing more: [`halts_run`] (1000–1002, 1100–1102, 1304),
    /// [`refuses_account`] (a final refusal under 429), a spent budget, the access key pair
    /// on a new-style endpoint (`ApiKeyRequired`).
    pub(super) halts: bool,
    /// The stack's drain gate refused it (never sent).
    pub(super) draining: bool,
    /// This call may have made a billed task (the retry layer's word when it gave one:
    /// [`Failed::may_have_created`](kling_retry::error::Failed::may_have_created)).
    pub(super) may_have_created: bool,
}

/// Whether a Kling code refuses the account or its credentials rather than the request, so
/// that every further create (and query) of the run would be refused the same way: the
/// account-level refusals ([`Code::halts_creates`]: 1100, 1101, 1102), and the configuration
/// errors KLING_API.md says never to retry — authentication (1000, 1001, 1002: a wrong key,
/// or a key of the other region) and the IP whitelist (1304).
pub(super) fn halts_run(code: Code) -> bool {
    code.halts_creates()
        || matches!(
            code,
            Code::AuthFailed | Code::AuthHeaderEmpty | Code::InvalidKey | Code::IpWhitelist
        )
}

/// Whether a refusal that no retry can change came with HTTP `429`. Every code Kling sends
/// with `429` is about the account (its standing, its credits, the IP whitelist) or its rate
/// and slots (`1302`, `1303`, which are retried), never about the request: so is any other
/// final refusal under `429` (an undocumented code, or `1103` sent with `429`), and each
/// further create would meet it too; but a code Kling documents as a refusal of the request
/// itself (`1200`–`1203`, `1300`, `1301`) stays the job's, whatever its status. Such a
/// refusal made nothing (kling-core's [`Code::may_have_created_under`]).
pub(super) fn refuses_account(code: Code, status: http::StatusCode) -> bool {
    let of_the_request = matches!(
        code,
        Code::InvalidRequest
            | Code::InvalidParameter
            | Code::WrongMethod
            | Code::NotFound
            | Code::PlatformPolicy
            | Code::ContentSecurity
    );
    status == http::StatusCode::TOO_MANY_REQUESTS
        && code.disposition(status) == kling_core::Disposition::Fatal
        && !of_the_request
}

impl Failure {
    pub(super) fn unknown(message: impl Into<String>) -> Self {
        Failure {
            info: ErrorInfo::new(0, message, None),
            code: None,
            final_refusal: false,
            halts: false,
            draining: false,
            may_have_created: true,
        }
    }

    pub(super) fn from_api(error: &ApiError) -> Self {
        let code = error.code();
        Failure {
            info: ErrorInfo::new(
                code.as_i64(),
                error.message(),
                error.request_id().map(str::to_owned),
            ),
            code: Some(code),
            // One rule with `may_have_created`: an undocumented code with a 4xx status made
            // nothing (kling-core's `Code::may_have_created_under`), and is as final a refusal.
            final_refusal: !error.may_have_created()
                && !code.disposition(error.status()).is_retryable(),
            halts: halts_run(code) || refuses_account(code, error.status()),
            draining: false,
            may_have_created: error.may_have_created(),
        }
    }

    /// Whether the create surely made nothing and no lookup could say otherwise: refused for
    /// the account or its credentials, or stopped without any answer from Kling (a proxy's
    /// page, never sent). A Kling refusal of the request itself (`1201`, say) may be its answer
    /// to an external id it already has, so that one is looked up.
    pub(super) fn made_nothing(&self) -> bool {
        !self.may_have_created && (self.halts || self.code.is_none())
    }
}

/// Reads a stack error: the Kling code it carries, whether it halts creates, whether the
/// drain gate refused it, whether it may have made a task.
///
/// Whether it may have made a task is kling-core's rule, which reads the retry layer's own
/// account of its attempts ([`kling_core::error::Attempts`]) when there is one; a call that
/// may have made a task is no final refusal, whatever its last answer.
pub(super) fn failure_of(error: &(dyn std::error::Error + 'static)) -> Failure {
    let mut failure = read_failure(error);
    failure.may_have_created = kling_core::error::may_have_created(error);
    // The last code alone made it final (a resend refused `1201`, say), while an earlier
    // attempt may have made the task that the refusal is about.
    failure.final_refusal &= !failure.may_have_created;
    failure
}

fn read_failure(error: &(dyn std::error::Error + 'static)) -> Failure {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(failed) = err.downcast_ref::<kling_retry::error::Failed>()
            && let Some(api) = failed.api_error()
        {
            return Failure::from_api(api);
        }
        if let Some(api) = err.downcast_ref::<ApiError>() {
            return Failure::from_api(api);
        }
        if let Some(halted) = err.downcast_ref::<kling_concurrency::error::Halted>() {
            let mut failure = Failure::from_api(halted.cause());
            failure.halts = true;
            return failure;
        }
        if err.is::<kling_tower::error::Draining>() {
            let mut failure = Failure::unknown(err.to_string());
            failure.draining = true;
            return failure;
        }
        // The auth layer's refusal of the access key pair on a new-style endpoint, made
        // before sending: every request there meets it again, as a refusal of the
        // credentials from Kling would be (1000), so the run stops.
        if err.is::<kling_tower::error::ApiKeyRequired>() {
            let mut failure = Failure::unknown(err.to_string());
            failure.halts = true;
            failure.final_refusal = true;
            return failure;
        }
        if err.is::<kling_tower::error::BudgetExceeded>() {
            let mut failure = Failure::unknown(err.to_string());
            failure.halts = true;
            failure.final_refusal = true;
            return failure;
        }
        if err.is::<kling_core::error::MalformedResponse>()
            || err.is::<kling_core::error::BodyTooLarge>()
        {
            return Failure::unknown(format!(
                "answered by something other than Kling (a proxy's or gateway's page? check \
                 --base-url): {error}"
            ));
        }
        current = err.source();
    }
    Failure::unknown(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrapper such as a layer above the auth layer puts around its error.
    #[derive(Debug)]
    struct Wrapped(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "call failed: {}", self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    /// The auth layer's local refusal of an access key pair's JWT on a new-style endpoint
    /// (`ApiKeyRequired`), read alone or under a wrapper, stops the run as a refusal of the
    /// credentials that no job can get past, named, and made nothing: it read as an unknown
    /// failure that did not halt, so each further job met it again.
    #[test]
    fn an_api_key_required_refusal_halts_the_run_and_is_named() {
        let layer =
            kling_tower::AuthLayer::new(kling_tower::Credentials::access_key("ak", "sk").unwrap());
        let request = http::Request::post("/text-to-video/kling-3.0")
            .body(())
            .unwrap();
        let refused = layer.check_endpoint(&request).unwrap_err();
        let wrapped = Wrapped(Box::new(refused.clone()));
        for error in [
            &refused as &(dyn std::error::Error + 'static),
            &wrapped as &(dyn std::error::Error + 'static),
        ] {
            let failure = failure_of(error);
            assert!(failure.halts, "{error}");
            assert!(failure.final_refusal, "{error}");
            assert!(!failure.may_have_created, "{error}");
            assert!(failure.made_nothing(), "{error}");
            assert!(
                failure.info.message.contains("/text-to-video/kling-3.0")
                    && failure.info.message.contains("KLING_API_KEY"),
                "{:?}",
                failure.info
            );
        }
        // Negative control: another local failure under the same wrapper does not halt.
        let other = Wrapped(Box::new(std::io::Error::other("connection reset")));
        assert!(!failure_of(&other).halts);
    }
}
