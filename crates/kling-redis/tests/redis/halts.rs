//! A `1102` in one process reaches the creates another process granted already, through the
//! fleet's halt broadcast (`PREFIX:halted`), without that process asking Redis again; a reset
//! reaches them the same way (`PREFIX:unhalted`). Two `TaskSlotsLayer` stacks on one Redis, a
//! create held below the slots (as in a rate limiter's queue) until the test lets it go, real
//! time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_concurrency::backend::SlotBackend;
use kling_concurrency::error::Halted;
use kling_concurrency::{SlotsConfig, SlotsHandle, TaskSlots, TaskSlotsLayer};
use kling_core::error::BoxError;
use kling_core::lanes::Lanes;
use kling_core::signals::HaltGate;
use kling_core::{AccountId, Classify, ClassifyLayer, Code, SendState};
use kling_redis::RedisSlots;
use kling_redis::testing::{Clients, RedisServer, kill_clients, miss_halt_broadcasts};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use crate::support::{connect, raw, redis, subscribed};

type Reply = Result<Response<Full<Bytes>>, BoxError>;

/// The server: counts the creates that reach it, and answers each with `code` (0: a task).
#[derive(Clone)]
struct Server {
    code: i64,
    creates: Arc<AtomicU32>,
}

impl Server {
    fn new(code: i64) -> Self {
        Server {
            code,
            creates: Arc::new(AtomicU32::new(0)),
        }
    }

    fn creates(&self) -> u32 {
        self.creates.load(Ordering::SeqCst)
    }
}

impl Service<Request<Full<Bytes>>> for Server {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Reply>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        let n = self.creates.fetch_add(1, Ordering::SeqCst) + 1;
        let (status, body) = if self.code == 0 {
            let body = serde_json::json!({
                "code": 0, "message": "SUCCEED", "request_id": format!("ok-{n}"),
                "data": {"task_id": format!("t{n}"), "task_status": "submitted"},
            });
            (200, body)
        } else {
            let body = serde_json::json!({
                "code": self.code, "message": "resource pack exhausted", "request_id": "r-9",
            });
            (429, body)
        };
        std::future::ready(Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()))
    }
}

/// Holds every request below the slots until the test adds a permit, as a rate limiter's
/// queue does.
#[derive(Clone)]
struct HoldBelow<S> {
    inner: S,
    gate: Arc<Semaphore>,
}

impl<S> Service<Request<Full<Bytes>>> for HoldBelow<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let mut inner = self.inner.clone();
        let gate = Arc::clone(&self.gate);
        Box::pin(async move {
            gate.acquire().await?.forget();
            inner.ready().await?.call(req).await
        })
    }
}

type Stack = TaskSlots<HoldBelow<Classify<Server>>, RedisSlots>;

/// One process: its slots in Redis, a hold below them (open unless `held`), the classify step
/// and a server answering `code`. Its maintenance pass and polling are a minute away: only an
/// ask or the broadcast can tell it of another process's halt.
async fn process(
    server: &RedisServer,
    code: i64,
    held: bool,
) -> (
    Stack,
    SlotsHandle<RedisSlots>,
    RedisSlots,
    Server,
    Arc<Semaphore>,
) {
    let config = SlotsConfig::new(5);
    let slots = RedisSlots::new(connect(server).await, config.clone())
        .unwrap()
        .poll_every(Duration::from_secs(60))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    let layer = TaskSlotsLayer::with_backend(&config, slots.clone()).unwrap();
    let handle = layer.handle();
    let api = Server::new(code);
    let gate = Arc::new(Semaphore::new(if held {
        0
    } else {
        Semaphore::MAX_PERMITS
    }));
    let below = HoldBelow {
        inner: ClassifyLayer::new().layer(api.clone()),
        gate: Arc::clone(&gate),
    };
    (layer.layer(below), handle, slots, api, gate)
}

fn create() -> Request<Full<Bytes>> {
    Request::post("/v1/videos/text2video")
        .body(Full::new(Bytes::from_static(br#"{"prompt":"a cat"}"#)))
        .unwrap()
}

/// Sends a create through `svc` in a task of its own.
fn spawn_create(svc: &Stack) -> tokio::task::JoinHandle<Reply> {
    let svc = svc.clone();
    tokio::spawn(async move { svc.oneshot(create()).await })
}

/// Waits until `slots` has granted `n` slots (its creates now held below).
async fn granted(slots: &RedisSlots, n: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while slots.held_here() < n {
        assert!(tokio::time::Instant::now() < deadline, "not granted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits up to `within` for `gate` to refuse (`refused`) or pass; how long it took.
async fn until(gate: &HaltGate, refused: bool, within: Duration) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    while gate.refusal().is_some() != refused {
        if start.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Some(start.elapsed())
}

/// Process `b`'s create, granted and held below its slots when process `a` met a 1102: what
/// `b`'s classify step did with it once let go, and how many creates reached `b`'s server.
/// With `miss`, `b` ignores the broadcast (the control).
async fn a_create_held_in_b_when_a_meets_a_1102(miss: bool) -> (Reply, u32, Option<Duration>) {
    let server = redis().expect("checked by the caller");
    let (a, _, _, a_api, _) = process(&server, 1102, false).await;
    let (b, b_handle, b_slots, b_api, b_gate) = process(&server, 0, true).await;
    miss_halt_broadcasts(&b_slots, miss);
    let account = b_handle.default_account().clone();
    let gate = HaltGate::new(
        Lanes::new(b_slots.create_halts().unwrap()).lane(),
        account.clone(),
    );
    let held = spawn_create(&b);
    granted(&b_slots, 1).await;
    subscribed(&server, "halted", 1).await;

    let halting = a.clone().oneshot(create()).await.unwrap();
    assert_eq!(halting.status(), 429);
    assert_eq!(a_api.creates(), 1);
    // The broadcast arrives within milliseconds; the control waits as long and learns nothing.
    let learnt = until(&gate, true, Duration::from_secs(2)).await;

    b_gate.add_permits(1);
    let reply = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held create ends")
        .unwrap();
    (reply, b_api.creates(), learnt)
}

fn assert_refused_unsent(reply: &Reply) {
    let err = reply.as_ref().expect_err("refused");
    let halted = err
        .downcast_ref::<Halted>()
        .unwrap_or_else(|| panic!("the slots layer's Halted: {err}"));
    assert_eq!(halted.code(), Code::ResourcePackExhausted);
    assert_eq!(halted.request_id(), Some("r-9"), "the 1102 that caused it");
    assert_eq!(SendState::of(&**err), SendState::NotSent);
}

/// Process `b` granted a create and holds it below its slots (a rate limiter's queue) when
/// process `a` meets a 1102: `b` learns of the halt from the broadcast, without asking Redis,
/// and its classify step refuses the create, unsent. The control, `b` deaf to the broadcast,
/// sends it: a request after a 1102.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1102_in_one_process_stops_a_create_another_process_granted_and_still_holds() {
    if redis().is_none() {
        return;
    }
    let (reply, sent, learnt) = a_create_held_in_b_when_a_meets_a_1102(false).await;
    let learnt = learnt.expect("process b learnt the halt from the broadcast");
    #[allow(clippy::print_stdout)]
    {
        println!("process b learnt the halt {learnt:?} after process a's halting create returned");
    }
    assert_refused_unsent(&reply);
    assert_eq!(sent, 0, "never reached the server");

    // The control: the same, but process b misses the broadcast.
    let (reply, sent, learnt) = a_create_held_in_b_when_a_meets_a_1102(true).await;
    assert_eq!(learnt, None, "nothing else told process b");
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(sent, 1, "sent after the 1102");
}

/// A halt then a reset in process `a` while process `b` holds a create it granted before:
/// both reach `b` at once (`b` refuses, then passes, the create without asking Redis), and
/// the create goes out once let go, the account having credit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_in_one_process_reaches_the_creates_another_process_holds() {
    let Some(server) = redis() else { return };
    let (a, a_handle, _, _, _) = process(&server, 1102, false).await;
    let (b, b_handle, b_slots, b_api, b_gate) = process(&server, 0, true).await;
    let account = b_handle.default_account().clone();
    let gate = HaltGate::new(
        Lanes::new(b_slots.create_halts().unwrap()).lane(),
        account.clone(),
    );
    let held = spawn_create(&b);
    granted(&b_slots, 1).await;
    subscribed(&server, "halted", 1).await;
    subscribed(&server, "unhalted", 1).await;

    assert_eq!(a.clone().oneshot(create()).await.unwrap().status(), 429);
    until(&gate, true, Duration::from_secs(2))
        .await
        .expect("the halt reached process b");
    assert!(a_handle.reset_halt(&account).await.unwrap());
    let reset = until(&gate, false, Duration::from_secs(2))
        .await
        .expect("the reset reached process b");
    #[allow(clippy::print_stdout)]
    {
        println!("process b learnt the reset {reset:?} after it was made");
    }

    b_gate.add_permits(1);
    let reply = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held create ends")
        .unwrap();
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(b_api.creates(), 1);
}

/// A halt broadcast while process `b` was not listening (here: ignored, as if its subscription
/// were down) is read by `b` when it subscribes again: its pub/sub connection killed, `b`
/// reconnects, reads the halts of its accounts, and refuses the create it holds, unsent.
/// Until then it did not know (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_broadcast_while_a_process_was_not_listening_is_read_when_it_subscribes_again() {
    let Some(server) = redis() else { return };
    let (a, _, _, _, _) = process(&server, 1102, false).await;
    let (b, b_handle, b_slots, b_api, b_gate) = process(&server, 0, true).await;
    let gate = HaltGate::new(
        Lanes::new(b_slots.create_halts().unwrap()).lane(),
        b_handle.default_account().clone(),
    );
    let held = spawn_create(&b);
    granted(&b_slots, 1).await;
    subscribed(&server, "halted", 1).await;
    miss_halt_broadcasts(&b_slots, true);

    assert_eq!(a.clone().oneshot(create()).await.unwrap().status(), 429);
    assert_eq!(
        until(&gate, true, Duration::from_millis(300)).await,
        None,
        "missed"
    );
    miss_halt_broadcasts(&b_slots, false);
    kill_clients(&mut raw(&server).await, Clients::PubSub)
        .await
        .unwrap();
    until(&gate, true, Duration::from_secs(3))
        .await
        .expect("read after subscribing again");

    b_gate.add_permits(1);
    let reply = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held create ends")
        .unwrap();
    assert_refused_unsent(&reply);
    assert_eq!(b_api.creates(), 0);
}

/// Messages on the halt channels that are not this crate's are ignored (logged), and the
/// subscription goes on: a real halt after them still reaches the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_halt_broadcasts_are_ignored_and_the_subscription_goes_on() {
    let Some(server) = redis() else { return };
    let (a, _, _, _, _) = process(&server, 1102, false).await;
    let (b, b_handle, b_slots, _, _) = process(&server, 0, true).await;
    let account: AccountId = b_handle.default_account().clone();
    let gate = HaltGate::new(
        Lanes::new(b_slots.create_halts().unwrap()).lane(),
        account.clone(),
    );
    let _held = spawn_create(&b);
    granted(&b_slots, 1).await;
    subscribed(&server, "halted", 1).await;
    let key = format!("test:halt:{}.{}", account.as_str().len(), account.as_str());
    let mut conn = raw(&server).await;
    for (channel, payload) in [
        ("test:halted", "junk".to_owned()),
        ("test:halted", format!("1\n{key}\nnot a 1102")),
        ("test:halted", format!("1\n{key}")),
        ("test:unhalted", "junk".to_owned()),
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: i64 = redis::cmd("PUBLISH")
        .arg("test:halted")
        .arg(&[0xff_u8, 0xfe][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        until(&gate, true, Duration::from_millis(200)).await,
        None,
        "nothing learnt from junk"
    );
    assert_eq!(a.clone().oneshot(create()).await.unwrap().status(), 429);
    until(&gate, true, Duration::from_secs(2))
        .await
        .expect("the real halt still reaches process b");
}

/// How many clients listen on the `test` prefix's `channel` now.
async fn listening(server: &RedisServer, channel: &str) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("test:{channel}"))
        .query_async(&mut raw(server).await)
        .await
        .unwrap();
    n
}

/// The subscription is the backend's: dropped (every clone, the layer's included), its task
/// ends and its connection closes, so a process that builds backends again and again keeps
/// none of the old ones listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_ends_when_the_backend_is_dropped() {
    let Some(server) = redis() else { return };
    for _ in 0..3 {
        let (b, _, b_slots, _, b_gate) = process(&server, 0, false).await;
        b.clone().oneshot(create()).await.unwrap();
        subscribed(&server, "halted", 1).await;
        drop((b, b_slots, b_gate));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while listening(&server, "halted").await > 0 {
            assert!(tokio::time::Instant::now() < deadline, "still subscribed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn cause(request_id: &str) -> kling_core::error::ApiError {
    let body = format!(
        r#"{{"code":1102,"message":"resource pack exhausted","request_id":"{request_id}"}}"#
    );
    let outcome = kling_core::Outcome::parse(
        http::StatusCode::TOO_MANY_REQUESTS,
        &http::HeaderMap::new(),
        body.as_bytes(),
        tokio::time::Instant::now(),
    )
    .unwrap();
    kling_core::error::ApiError::from_outcome(&outcome)
}

fn request_id(gate: &HaltGate) -> Option<String> {
    let refusal = gate.refusal()?;
    let halted = refusal.downcast_ref::<Halted>()?;
    halted.request_id().map(str::to_owned)
}

/// Two `1102`s of one account in two processes, the second replacing the first in Redis: the
/// first process takes the second as the halt Redis has, so the reset of it (which names the
/// halt it deleted) ends the halt there too, at once, not at its next maintenance pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_a_later_1102_reaches_the_process_whose_1102_it_replaced() {
    use kling_concurrency::backend::{SlotKey, SlotOp};
    let Some(server) = redis() else { return };
    let (_, handle, x, _, _) = process(&server, 0, false).await;
    let (_, _, y, _, _) = process(&server, 0, false).await;
    let key = SlotKey::new(
        handle.default_account().clone(),
        kling_core::Pool::new(kling_core::Product::Video),
    );
    let gate = HaltGate::new(
        Lanes::new(x.create_halts().unwrap()).lane(),
        key.account.clone(),
    );
    let rx = x.acquire(key.clone(), 1).await.unwrap();
    let ry = y.acquire(key.clone(), 1).await.unwrap();
    subscribed(&server, "halted", 2).await;
    x.apply(SlotOp::Halt {
        reservation: rx,
        cause: cause("first"),
    })
    .await
    .unwrap();
    assert_eq!(request_id(&gate).as_deref(), Some("first"));
    y.apply(SlotOp::Halt {
        reservation: ry,
        cause: cause("second"),
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while request_id(&gate).as_deref() != Some("second") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            request_id(&gate)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        y.apply(SlotOp::ResetHalt(key.account.clone()))
            .await
            .unwrap()
            .changed
    );
    until(&gate, false, Duration::from_secs(2))
        .await
        .expect("the reset reached the first process");
}

/// A halt broadcast of another generation than Redis's now (one delivered after Redis lost
/// its state, or one of another database under the same prefix: pub/sub ignores databases)
/// names a halt Redis does not have: the process checks with Redis instead of taking it, so
/// it does not refuse the account's creates without asking, past every maintenance pass, a
/// halt no reset can reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_broadcast_of_another_generation_is_checked_with_redis() {
    use kling_concurrency::backend::SlotKey;
    let Some(server) = redis() else { return };
    let (b, b_handle, b_slots, b_api, _) = process(&server, 0, false).await;
    let account: AccountId = b_handle.default_account().clone();
    b.clone().oneshot(create()).await.unwrap();
    subscribed(&server, "halted", 1).await;
    let gate = HaltGate::new(
        Lanes::new(b_slots.create_halts().unwrap()).lane(),
        account.clone(),
    );
    let key = format!("test:halt:{}.{}", account.as_str().len(), account.as_str());
    let cause = r#"429
{"code":1102,"message":"resource pack exhausted","request_id":"elsewhere"}"#;
    let mut conn = raw(&server).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("test:halted")
        .arg(format!("1\n{key}\n{cause}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    // Handled by then (a check with Redis takes a round trip).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let learnt = request_id(&gate);
    b_slots.maintain().await.unwrap();
    let pool = kling_core::Pool::new(kling_core::Product::Video);
    let granted = b_slots.acquire(SlotKey::new(account, pool), 1).await;
    assert!(granted.is_ok(), "{:?}", granted.err());
    assert_eq!(learnt, None, "not a halt Redis has");
    assert_eq!(b_api.creates(), 1);
}

/// A subscription the server drops as soon as it is made (here killed again and again; in
/// production a subscriber too slow for its output buffer) is made again after a backoff, not
/// at once: each one wakes every waiting head and reads the halts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_dropped_at_once_is_made_again_after_a_backoff() {
    let Some(server) = redis() else { return };
    let (b, _, _b_slots, _, _) = process(&server, 0, false).await;
    b.clone().oneshot(create()).await.unwrap();
    subscribed(&server, "halted", 1).await;
    let mut conn = raw(&server).await;
    let mut killed = 0;
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        killed += kill_clients(&mut conn, Clients::PubSub).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // 100, 200, 400, 800 ms between them: five at most in 1.5 s.
    assert!(killed <= 6, "{killed} subscriptions in 1.5 s");
}
