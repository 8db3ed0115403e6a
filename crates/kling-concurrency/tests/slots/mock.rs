//! The in-process mock Kling behind the classify step, for paused-time tests of the layer
//! against it.

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use kling_core::ClassifyLayer;
use kling_core::error::BoxError;
use kling_mock::MockKling;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

pub(crate) type Client = BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;

/// The mock behind the classify step, with the API key `key` (so account `key`) on every request.
pub(crate) fn client(mock: &MockKling) -> Client {
    let service = ServiceBuilder::new()
        .map_request(|mut req: Request<Full<Bytes>>| {
            req.headers_mut()
                .insert(AUTHORIZATION, HeaderValue::from_static("Bearer key"));
            req
        })
        .layer(ClassifyLayer::new())
        .service(mock.clone());
    BoxCloneService::new(service)
}

pub(crate) async fn send<S>(svc: &mut S, req: Request<Full<Bytes>>) -> Response<Full<Bytes>>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>,
{
    svc.ready().await.unwrap().call(req).await.unwrap()
}
