//! `InFlightLayer`: one FIFO limit shared by every service it makes.

use kling_concurrency::InFlightLayer;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service};

#[tokio::test(start_paused = true)]
async fn in_flight_limit_is_shared_by_services_and_clones_and_served_in_order() {
    let (mock, mut server) = tower_test::mock::pair::<u32, u32>();
    let layer = InFlightLayer::new(1).unwrap();
    let mut a = spawn(layer.layer(mock.clone()));
    let mut b = spawn(layer.layer(mock.clone()).clone());
    let mut c = spawn(layer.layer(mock));

    assert_ready_ok!(a.enter(|cx, mut s| s.as_mut().get_mut().poll_ready(cx)));
    assert_eq!(layer.in_flight(), 1);
    // The others queue, in order.
    assert_pending!(b.enter(|cx, mut s| s.as_mut().get_mut().poll_ready(cx)));
    assert_pending!(c.enter(|cx, mut s| s.as_mut().get_mut().poll_ready(cx)));

    let response = a.call(1);
    let (req, respond) = server.next_request().await.unwrap();
    assert_eq!(req, 1);
    respond.send_response(10);
    assert_eq!(response.await.unwrap(), 10);

    // b asked first, so b gets the freed permit; c still waits.
    assert!(b.is_woken());
    assert_ready_ok!(b.enter(|cx, mut s| s.as_mut().get_mut().poll_ready(cx)));
    assert_pending!(c.enter(|cx, mut s| s.as_mut().get_mut().poll_ready(cx)));
    let dropped = b.call(2);
    drop(dropped);
    assert!(c.is_woken(), "a dropped response future frees its permit");
    assert_ready_ok!(c.enter(|cx, mut s| s.as_mut().get_mut().poll_ready(cx)));
    assert_eq!(layer.in_flight(), 1);
    assert!(InFlightLayer::new(0).is_err());
}
