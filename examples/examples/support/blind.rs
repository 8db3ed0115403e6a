//! The negative control of the examples' "no 1303": the same creates, sent by a client that
//! only signs them (no rate, slot or retry layer), to a fresh mock with the same settings. It
//! must meet the slot wall, or the example's own check could not fail.
//!
//! The creates go out one and a half of the tier's request intervals apart, so that the rate
//! limit refuses none of them (a burst would meet 1302 first): a 1303 here is the slots alone.
//!
//! Not an example itself: each example's tests include it with `#[path]`.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::error::BoxError;
use std::time::Duration;

use kling_mock::{MockConfig, MockServer, Preset, Stats};
use kling_tower::{BaseUrlLayer, Credentials, ServiceBuilderExt};
use tower::{ServiceBuilder, ServiceExt};

/// One create: the account's credentials, the path and the JSON body.
pub(crate) struct Create {
    pub(crate) credentials: Credentials,
    pub(crate) path: &'static str,
    pub(crate) body: String,
}

/// Sends `creates` blind, paced for `preset`'s rate at `speed`, to a mock started from `config`
/// (the example's, on that preset), and returns what the mock saw once every answer is in.
pub(crate) fn blind_creates(
    config: MockConfig,
    preset: Preset,
    speed: f64,
    creates: Vec<Create>,
) -> Result<Stats, BoxError> {
    let interval = preset.rate_limit().map_or(Duration::ZERO, |limit| {
        Duration::from_secs_f64(60.0 / limit.per_minute)
    });
    let spacing = interval.mul_f64(1.5).div_f64(speed);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let mock = MockServer::start(config).await?;
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let sends: Vec<_> = creates
                .into_iter()
                .enumerate()
                .map(|(n, create)| {
                    let signed = ServiceBuilder::new()
                        .kling_auth(create.credentials)
                        .classify()
                        .base_url(BaseUrlLayer::new(&mock.base_url())?)
                        .service(client.clone());
                    let request = http::Request::post(create.path)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(create.body)))?;
                    let at = spacing * u32::try_from(n)?;
                    Ok::<_, BoxError>(tokio::spawn(async move {
                        tokio::time::sleep(at).await;
                        signed.oneshot(request).await
                    }))
                })
                .collect::<Result<_, _>>()?;
            for send in sends {
                send.await??;
            }
            let stats = mock.stats();
            mock.shutdown().await;
            Ok(stats)
        })
}
