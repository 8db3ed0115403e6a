//! HTTP clients under the stack: an HTTPS hyper-util client (feature `hyper`) and a
//! `reqwest::Client` adapter (feature `reqwest`), both on rustls with the `ring` provider.
//!
//! Kling's API is HTTPS only. The whole workspace uses one rustls crypto provider, `ring`;
//! `install_ring_provider` (features `hyper` or `reqwest`) makes it the process default:
//! reqwest, built without a provider of its own, needs one before a client is built.
//!
//! The two trust different roots. `https_client` trusts Mozilla's, built in (webpki-roots),
//! and not the system's: a private CA (a company's TLS proxy, an internal gateway) needs a
//! hyper-util client of your own (`HttpsClient::new`). reqwest's client trusts the system's
//! (rustls-platform-verifier: on Linux the CA bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR`),
//! and fails to build where the system has none (a `scratch` image), for `http://` too.

#[cfg(feature = "hyper")]
mod hyper;
#[cfg(feature = "reqwest")]
mod reqwest;

#[cfg(feature = "hyper")]
pub use self::hyper::{
    ConnectTimeout, HttpsClient, HttpsResponseFuture, HyperClient, https_client,
    https_client_with_connect_timeout,
};
#[cfg(feature = "reqwest")]
pub use self::reqwest::{ReqwestService, ResponseFuture as ReqwestFuture};

/// How long the clients built here let a connection take to open, TCP and TLS together: well
/// inside the stack's default 30 s attempt timeout, so a host that never answers fails as a
/// connect error (never sent: a create may be repeated) rather than as a timed-out attempt
/// (sent, outcome unknown: a create must be looked up first). A stack with a shorter attempt
/// timeout needs a shorter one: [`StackConfig::connect_timeout_duration`](crate::StackConfig::connect_timeout_duration).
#[cfg(any(feature = "hyper", feature = "reqwest"))]
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Makes rustls' `ring` provider the process default, if no default is installed yet.
///
/// Idempotent; returns whether this call installed it.
#[cfg(any(feature = "hyper", feature = "reqwest"))]
pub fn install_ring_provider() -> bool {
    rustls::crypto::ring::default_provider()
        .install_default()
        .is_ok()
}
