//! Bearer authentication: API keys and the legacy HS256 JWT, checked by hand.
//!
//! The JWT check is written out (split, base64url, HMAC-SHA256) rather than taken from a JWT crate
//! so the mock stays an independent oracle for the client's signer. It asks for what KLING_API.md
//! gives: header `alg` HS256 and `typ` JWT, claims `iss` (the access key), `nbf` and `exp`, with
//! `exp` at most 1800 s (plus 300 s of clock skew) ahead; anything else is 1000, except an `iss`
//! of another key (1002), a token not yet valid (1003) and an expired one (1004). With no keys
//! configured (open mode) a JWT is checked the same way but for its issuer and signature.
//! New-style endpoints take only an API key (KLING_API.md): a JWT there is 1000 whatever it holds.
//! A configured API key is looked up first, so one shaped like a JWT is still a key.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

use crate::config::MockConfig;

/// Who a request is, or why it is refused (a Kling code with its message).
pub(crate) type AuthResult = Result<String, (u32, &'static str)>;

/// Which credentials an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepts {
    /// An API key or the legacy JWT: legacy endpoints (and requests not yet routed).
    KeyOrJwt,
    /// An API key only: KLING_API.md gives it as the only option on new-style endpoints.
    KeyOnly,
}

/// Resolves the `Authorization` header value to an account id.
pub(crate) fn authenticate(
    config: &MockConfig,
    header: Option<&[u8]>,
    accepts: Accepts,
) -> AuthResult {
    let Some(raw) = header else {
        return Err((1001, "authorization header is empty"));
    };
    let Ok(value) = std::str::from_utf8(raw) else {
        return Err((1000, "authentication failed"));
    };
    let value = value.trim();
    if value.is_empty() {
        return Err((1001, "authorization header is empty"));
    }
    // `Bearer ` arrives trimmed to `Bearer` (HTTP parsers strip a header value's edges): a
    // bearer scheme without a token is an empty authorization, 1001, not a failed one.
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err((1000, "authentication failed: expected a Bearer token"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err((1001, "authorization header is empty"));
    }

    // A configured key is that key, whatever its shape: one that reads as a JWT (three
    // base64url parts, two of them JSON objects) is no token to refuse or verify.
    if let Some(key) = config.api_keys.iter().find(|k| k.key == token) {
        return Ok(key.account.clone());
    }
    let jwt = Jwt::parse(token);
    // Refused whatever its claims: a client signing JWTs works on legacy endpoints and fails
    // on these, as against Kling, instead of passing here.
    if accepts == Accepts::KeyOnly && jwt.is_some() {
        return Err((
            1000,
            "authentication failed: new-style endpoints take an API key, not an access-key JWT",
        ));
    }
    if let (Some(access), Some(secret), Some(jwt)) =
        (&config.access_key, &config.secret_key, jwt.as_ref())
    {
        return verify_jwt(config, access, secret, jwt, token);
    }
    if !config.api_keys.is_empty() || config.access_key.is_some() {
        return Err((1002, "invalid api key"));
    }
    // Open mode: any key is its own account. A JWT is keyed by its issuer so that re-signing
    // every 30 minutes does not move the client to a fresh account with fresh limits. With no
    // secret to check its signature against, the rest of it is checked as a keyed mock does:
    // an expired token is 1004 whatever key signed it.
    if let Some(jwt) = jwt {
        let Some(iss) = jwt.claims.get("iss").and_then(|v| v.as_str()) else {
            return Err((1000, "authentication failed: token has no iss"));
        };
        check_header(&jwt)?;
        check_times(config, &jwt)?;
        return Ok(iss.to_owned());
    }
    Ok(token.to_owned())
}

struct Jwt {
    header: serde_json::Value,
    claims: serde_json::Value,
    signature: Vec<u8>,
}

impl Jwt {
    /// Three base64url segments whose first two are JSON objects, or `None`.
    fn parse(token: &str) -> Option<Jwt> {
        let mut parts = token.split('.');
        let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
        let signature = URL_SAFE_NO_PAD.decode(s).ok()?;
        (header.is_object() && claims.is_object()).then_some(Jwt {
            header,
            claims,
            signature,
        })
    }
}

fn verify_jwt(
    config: &MockConfig,
    access: &str,
    secret: &str,
    jwt: &Jwt,
    token: &str,
) -> AuthResult {
    // No `iss` is a malformed token (1000, as in open mode); only another key's is 1002.
    let Some(iss) = jwt.claims.get("iss").and_then(|v| v.as_str()) else {
        return Err((1000, "authentication failed: token has no iss"));
    };
    if iss != access {
        return Err((1002, "invalid access key"));
    }
    check_header(jwt)?;
    let Some(signed_len) = token.rfind('.') else {
        return Err((1000, "authentication failed"));
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return Err((1000, "authentication failed"));
    };
    mac.update(&token.as_bytes()[..signed_len]);
    if mac.verify_slice(&jwt.signature).is_err() {
        return Err((1000, "authentication failed: bad signature"));
    }
    check_times(config, jwt)?;
    // The configured account's name, like an API key's (the access key when none is set).
    Ok(config.default_account())
}

/// The header KLING_API.md gives: `alg` HS256 and `typ` JWT.
fn check_header(jwt: &Jwt) -> Result<(), (u32, &'static str)> {
    if jwt.header.get("alg").and_then(|v| v.as_str()) != Some("HS256") {
        return Err((1000, "authentication failed: unsupported algorithm"));
    }
    if jwt.header.get("typ").and_then(|v| v.as_str()) != Some("JWT") {
        return Err((1000, "authentication failed: header typ must be JWT"));
    }
    Ok(())
}

/// `nbf` and `exp` against the real clock: both present (else 1000), `nbf` passed (else 1003),
/// `exp` not passed (else 1004) and no further ahead than a token's lifetime plus clock skew
/// (else 1000).
fn check_times(config: &MockConfig, jwt: &Jwt) -> Result<(), (u32, &'static str)> {
    let now = now_secs(config.clock_offset_secs);
    let claim = |name: &str| jwt.claims.get(name).and_then(serde_json::Value::as_f64);
    let Some(nbf) = claim("nbf") else {
        return Err((1000, "authentication failed: token has no nbf"));
    };
    let Some(exp) = claim("exp") else {
        return Err((1000, "authentication failed: token has no exp"));
    };
    // Not yet valid first: a server whose clock is behind sees a fresh token as early (1003),
    // which a client fixes by re-signing, rather than as too long-lived.
    if nbf > now {
        return Err((1003, "token is not yet valid"));
    }
    if exp <= now {
        return Err((1004, "token has expired"));
    }
    if exp - now > MAX_LIFETIME_SECS + CLOCK_SKEW_SECS {
        return Err((1000, "authentication failed: exp is too far in the future"));
    }
    Ok(())
}

/// The lifetime KLING_API.md gives a token: `exp` = now + 1800 s.
const MAX_LIFETIME_SECS: f64 = 1800.0;

/// How far ahead of the server's clock a client's may run before its fresh token's `exp` is
/// refused as too far in the future (an `exp` in milliseconds is ~55 000 years out).
const CLOCK_SKEW_SECS: f64 = 300.0;

/// Real Unix time in seconds plus the configured offset: token lifetimes stay real even when the
/// mock's task clock is paused or sped up.
fn now_secs(offset: i64) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    now + offset as f64
}
