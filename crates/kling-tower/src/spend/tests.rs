//! The ledger's memory bounds: accounts with nothing to remember are forgotten, long external
//! ids and task ids are kept as digests. Unit tests, as what they look at (the ledger's
//! entries) is private.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::Full;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;

/// A legacy create (a video: `video` credits; an image of `n` 1: `image` credits) for
/// `account`, with `external` as its `external_task_id`, and `prompt` telling
/// [`client`] how to answer it.
fn create(
    account: &str,
    image: bool,
    prompt: &str,
    external: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut body = serde_json::json!({ "prompt": prompt });
    if let Some(external) = external {
        body["external_task_id"] = external.into();
    }
    let path = if image {
        "/v1/images/generations"
    } else {
        "/v1/videos/text2video"
    };
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    request.extensions_mut().insert(AccountId::new(account));
    request
}

/// A client answering a create by its prompt: `refuse` with `1303` (no task made), `lose`
/// with `5000` (its outcome unknown), `task:<id>` with task `<id>` (a server, or a proxy, that
/// names its tasks as it likes), anything else with a new task `t<n>`.
fn client()
-> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError> + Clone {
    let made = Arc::new(AtomicUsize::new(0));
    service_fn(move |request: Request<Full<Bytes>>| {
        let made = made.clone();
        async move {
            let body = http_body_util::BodyExt::collect(request.into_body()).await?;
            let body: serde_json::Value = serde_json::from_slice(&body.to_bytes())?;
            let (status, answer) = match body["prompt"].as_str() {
                Some("refuse") => (
                    429,
                    r#"{"code":1303,"message":"parallel task over resource pack limit","request_id":"r"}"#
                        .to_owned(),
                ),
                Some("lose") => (
                    500,
                    r#"{"code":5000,"message":"internal error","request_id":"r"}"#.to_owned(),
                ),
                Some(prompt) if prompt.starts_with("task:") => (
                    200,
                    serde_json::json!({
                        "code": 0,
                        "message": "ok",
                        "request_id": "r",
                        "data": { "task_id": &prompt[5..], "task_status": "submitted" },
                    })
                    .to_string(),
                ),
                _ => {
                    let n = made.fetch_add(1, Ordering::Relaxed);
                    (
                        200,
                        format!(
                            r#"{{"code":0,"message":"ok","request_id":"r","data":{{"task_id":"t{n}","task_status":"submitted"}}}}"#
                        ),
                    )
                }
            };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from(answer)))
                    .unwrap(),
            )
        }
    })
}

/// Creates refused at once, for accounts `r<from>`… `r<from + 999>`: accounts with nothing to
/// remember, filling the ledger.
async fn refused<S>(service: &mut S, from: usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>,
{
    for n in from..from + 1000 {
        send(service, create(&format!("r{n}"), true, "refuse", None)).await;
    }
}

/// Sends `request`, returning the id of the task its answer names, if any.
async fn send<S>(service: &mut S, request: Request<Full<Bytes>>) -> Option<String>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>,
{
    let mut response = service.ready().await.unwrap().call(request).await.unwrap();
    let outcome = kling_core::Outcome::ensure(&mut response).unwrap();
    outcome.task().map(|task| task.id.clone())
}

/// A callback reporting task `id`, finished and billed `cost`, that echoes `external`.
fn finished(id: &str, external: &str, cost: f64) -> TaskReport {
    let body = serde_json::json!({
        "task_id": id,
        "task_status": "succeed",
        "final_unit_deduction": cost.to_string(),
        "task_info": { "external_task_id": external },
    });
    kling_core::Envelope::read_callback(body.to_string().as_bytes())
        .unwrap()
        .remove(0)
}

/// A count the guard's `Debug` shows, as `name: <count>`.
fn shown(guard: &SpendGuardLayer, name: &str) -> usize {
    let debug = format!("{guard:?}");
    let at = debug.find(&format!(" {name}: ")).expect(name) + name.len() + 3;
    let digits: String = debug[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect(name)
}

/// The bytes of external ids the ledger holds (creates out, creates kept with an unknown
/// outcome).
fn external_id_bytes(guard: &SpendGuardLayer) -> usize {
    let accounts = guard.ledger.lock();
    accounts
        .map
        .values()
        .map(|account| {
            let sending: usize = account.sending.0.keys().map(String::len).sum();
            let counted: usize = account.unknown.counts.0.keys().map(String::len).sum();
            let kept: usize = account.unknown.order.iter().map(|(id, _)| id.len()).sum();
            sending + counted + kept
        })
        .sum()
}

/// The bytes of task ids the ledger holds (tasks awaiting their cost, tasks charged).
fn task_id_bytes(guard: &SpendGuardLayer) -> usize {
    let accounts = guard.ledger.lock();
    accounts
        .map
        .values()
        .map(|account| {
            let awaited: usize = account.tasks.keys().map(String::len).sum();
            let ordered: usize = account.charged.order.iter().map(String::len).sum();
            let charged: usize = account.charged.ids.iter().map(String::len).sum();
            awaited + ordered + charged
        })
        .sum()
}

/// A gateway routing 10,000 accounts through one guard, a hundred a period, each charged one
/// task: an account whose period has ended with nothing out is forgotten, so the ledger holds
/// about the accounts of a period or two. Every account stayed, for good.
#[tokio::test(start_paused = true)]
async fn accounts_with_nothing_left_to_remember_are_forgotten() {
    let period = Duration::from_secs(60);
    let guard = SpendGuardLayer::with_period(10.0, period, CostTable::new().video(3.0)).unwrap();
    let mut service = guard.layer(client());
    for n in 0..10_000 {
        if n % 100 == 0 {
            tokio::time::advance(period).await;
        }
        send(&mut service, create(&format!("a{n}"), false, "go", None)).await;
    }
    let accounts = shown(&guard, "accounts");
    assert!(accounts <= 200, "{accounts} accounts kept");
    // The tasks of the accounts forgotten no longer count as awaited.
    assert_eq!(
        shown(&guard, "awaited"),
        shown(&guard, "awaited_tasks") + shown(&guard, "unknown_creates")
    );
    // The current period's accounts keep their charges.
    let last = AccountId::new("a9999");
    assert_eq!(guard.committed(Some(&last)), 3.0);
}

/// What would change a later decision keeps an account through sweeps: a charge in its
/// period, a task awaiting its cost and a create of unknown outcome (even estimated at 0), a
/// create out (even one estimated at 0, for its external id), across the period's end.
#[tokio::test(start_paused = true)]
async fn an_account_that_still_holds_something_is_never_forgotten() {
    let period = Duration::from_secs(60);
    // A video costs nothing, an image 1.
    let costs = CostTable::new().video(0.0).image_per_image(1.0);
    let guard = SpendGuardLayer::with_period(10.0, period, costs).unwrap();
    let mut service = guard.layer(client());
    let account = |name: &str| AccountId::new(name);

    // Billed, its cost known: a charge in the period, nothing awaited.
    let spent = send(&mut service, create("spent", true, "go", None)).await;
    guard.report(Some(&account("spent")), &finished(&spent.unwrap(), "", 2.0));
    let zero = send(&mut service, create("zero", false, "go", None)).await;
    send(&mut service, create("lost", false, "lose", Some("lost-1"))).await;
    let out = service
        .ready()
        .await
        .unwrap()
        .call(create("out", true, "go", None));
    let free = service
        .ready()
        .await
        .unwrap()
        .call(create("free", false, "go", Some("free-1")));
    refused(&mut service, 0).await;
    assert!(shown(&guard, "accounts") < 1000, "the ledger was swept");
    assert_eq!(guard.committed(Some(&account("spent"))), 2.0);
    // The task made at 0 credits is billed 2.
    let zero = zero.expect("a task");
    guard.report(Some(&account("zero")), &finished(&zero, "", 2.0));
    assert_eq!(guard.committed(Some(&account("zero"))), 2.0);
    // The task of the create lost at 0 credits turns up, billed 2.
    guard.report(Some(&account("lost")), &finished("t-lost", "lost-1", 2.0));
    assert_eq!(guard.committed(Some(&account("lost"))), 2.0);

    // The period ends; the creates still out are carried into the next one.
    tokio::time::advance(period).await;
    refused(&mut service, 1000).await;
    assert_eq!(shown(&guard, "sending"), 1, "free-1 is still out");
    assert_eq!(guard.committed(Some(&account("out"))), 1.0);
    out.await.unwrap();
    free.await.unwrap();
    assert_eq!(
        guard.committed(Some(&account("out"))),
        1.0,
        "its task counts in the period it was carried into"
    );
    assert_eq!(shown(&guard, "sending"), 0);
}

/// A caller's external id is stored however long it is: a megabyte-long one was kept whole
/// while its create was out, and again once its outcome was unknown. Kept as a digest, it
/// still finds its task.
#[tokio::test(start_paused = true)]
async fn a_long_external_id_is_kept_in_a_few_bytes() {
    let guard = SpendGuardLayer::new(10.0, CostTable::new().video(3.0)).unwrap();
    let mut service = guard.layer(client());
    let long = "x".repeat(1 << 20);
    let lost = service
        .ready()
        .await
        .unwrap()
        .call(create("a", false, "lose", Some(&long)));
    let out = external_id_bytes(&guard);
    assert!(out <= 64, "{out} bytes while out");
    lost.await.unwrap();
    let kept = external_id_bytes(&guard);
    assert!(kept <= 2 * 64, "{kept} bytes kept");

    let account = AccountId::new("a");
    assert_eq!(guard.committed(Some(&account)), 3.0);
    guard.report(Some(&account), &finished("t-long", &long, 1.0));
    assert_eq!(guard.committed(Some(&account)), 1.0, "its task is found");
}

/// Kept as digests, long external ids still match exactly: a report names an unknown create's
/// task only with that create's own id, not with one sharing its first bytes, nor with a
/// short id spelled as its digest (kept as a digest of its own), and not while a resend with
/// that id is out.
#[tokio::test(start_paused = true)]
async fn long_external_ids_match_only_themselves() {
    let guard = SpendGuardLayer::new(100.0, CostTable::new().video(3.0)).unwrap();
    let mut service = guard.layer(client());
    let long = "y".repeat(ID_KEPT_BYTES + 1);
    let same_start = format!("{}z", &long[..ID_KEPT_BYTES]);
    let posing = digest(&long);
    assert!(posing.len() <= ID_KEPT_BYTES);
    let (a, b) = (AccountId::new("a"), AccountId::new("b"));
    send(&mut service, create("a", false, "lose", Some(&long))).await;
    send(&mut service, create("b", false, "lose", Some(&posing))).await;

    let others = [same_start.as_str(), &long[..ID_KEPT_BYTES], &posing];
    for (n, other) in others.into_iter().enumerate() {
        guard.report(Some(&a), &finished(&format!("a{n}"), other, 1.0));
    }
    guard.report(Some(&b), &finished("b0", &long, 1.0));
    assert_eq!(guard.committed(Some(&a)), 3.0, "no other id finds a's task");
    assert_eq!(guard.committed(Some(&b)), 3.0, "nor b's");

    // A resend is out: the task reported may be its.
    let resend = service
        .ready()
        .await
        .unwrap()
        .call(create("a", false, "go", Some(&long)));
    guard.report(Some(&a), &finished("a-resent", &long, 1.0));
    assert_eq!(guard.committed(Some(&a)), 6.0);
    resend.await.unwrap();
    assert_eq!(guard.committed(Some(&a)), 6.0, "the resend made a task");

    guard.report(Some(&a), &finished("a-lost", &long, 1.0));
    guard.report(Some(&b), &finished("b-lost", &posing, 1.0));
    assert_eq!(guard.committed(Some(&a)), 4.0, "its own id finds a's task");
    assert_eq!(guard.committed(Some(&b)), 1.0, "and b's");
}

/// Through the stack, a create with a long external id of its own left unresolved by the retry
/// layer below (a `5000`, then a lookup refused for good) is kept by the id that layer's error
/// names, as the guard keeps it: the task a report then names by that id takes its estimate.
#[tokio::test(start_paused = true)]
async fn through_the_stack_a_long_id_named_by_the_retry_layer_finds_its_task() {
    type Client =
        tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;
    let client = Client::new(service_fn(|request: Request<Full<Bytes>>| {
        let (status, body) = if request.method() == Method::POST {
            (
                500,
                r#"{"code":5000,"message":"internal","request_id":"r"}"#,
            )
        } else {
            (429, r#"{"code":1101,"message":"arrears","request_id":"r"}"#)
        };
        let response = Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        async move { Ok::<_, BoxError>(response) }
    }));
    let kling = crate::KlingLayer::builder(
        crate::preset::StackConfig::preset(crate::preset::Tier::Free),
        crate::Credentials::api_key("key").unwrap(),
    )
    .seed(7)
    .build()
    .unwrap();
    let service = kling.layer(client);
    let guard = kling.spend_guard().unwrap().clone();
    let account = Some(kling.account_id());
    let long = "z".repeat(ID_KEPT_BYTES + 44);

    let mut create = create("ignored", false, "lose", Some(&long));
    create.extensions_mut().clear();
    let error = service.oneshot(create).await.unwrap_err();
    let failed = error
        .downcast_ref::<kling_retry::error::Failed>()
        .expect("the retry layer's error");
    assert_eq!(failed.external_id(), Some(long.as_str()));
    assert_eq!(guard.committed(account), 1.0);
    guard.report(account, &finished("t-long", &long, 0.5));
    assert_eq!(
        guard.committed(account),
        0.5,
        "the task's cost replaces the estimate"
    );
}

/// A server's task id is stored however long it is, as an external id was: a server (or a
/// proxy, or the mock told to) answering with a megabyte-long one made the ledger keep it
/// whole while its cost was awaited, and again once charged. Kept as a digest, it still names
/// its task exactly: a resend answered with it is charged once, a report of it replaces the
/// estimate, and an id sharing its first bytes is another task.
#[tokio::test(start_paused = true)]
async fn a_long_task_id_is_kept_in_a_few_bytes_and_matches_only_itself() {
    let guard = SpendGuardLayer::new(100.0, CostTable::new().video(3.0)).unwrap();
    let mut service = guard.layer(client());
    let account = AccountId::new("a");
    let long = "T".repeat(1 << 20);
    let same_start = format!("{}U", &long[..ID_KEPT_BYTES]);
    let answered = |id: &str| create("a", false, &format!("task:{id}"), None);

    let task = send(&mut service, answered(&long)).await;
    assert_eq!(task.as_deref(), Some(long.as_str()));
    let awaited = task_id_bytes(&guard);
    assert!(awaited <= 64, "{awaited} bytes while its cost is awaited");
    assert_eq!(guard.committed(Some(&account)), 3.0);
    // The same task again (a resend Kling answered with it): charged once.
    send(&mut service, answered(&long)).await;
    assert_eq!(
        guard.committed(Some(&account)),
        3.0,
        "one task, charged once"
    );

    // A report of another task sharing its first bytes changes nothing.
    guard.report(Some(&account), &finished(&same_start, "", 1.0));
    assert_eq!(guard.committed(Some(&account)), 3.0, "another task");
    guard.report(Some(&account), &finished(&long, "", 1.0));
    assert_eq!(
        guard.committed(Some(&account)),
        1.0,
        "its cost replaces the estimate"
    );
    let charged = task_id_bytes(&guard);
    assert!(charged <= 2 * 64, "{charged} bytes once charged");
    // Charged already: a create answered with it owes nothing.
    send(&mut service, answered(&long)).await;
    assert_eq!(guard.committed(Some(&account)), 1.0, "still charged once");

    // The task of a create of unknown outcome, turned up by its external id with a long task
    // id, is kept as short.
    send(&mut service, create("a", false, "lose", Some("lost-1"))).await;
    let turned_up = "V".repeat(1 << 20);
    let mut running = finished(&turned_up, "lost-1", 1.0);
    running.status = kling_core::TaskStatus::Processing;
    guard.report(Some(&account), &running);
    let kept = task_id_bytes(&guard);
    assert!(
        kept <= 3 * 64,
        "{kept} bytes with the unknown create's task"
    );
    guard.report(Some(&account), &finished(&turned_up, "lost-1", 2.0));
    assert_eq!(
        guard.committed(Some(&account)),
        3.0,
        "its cost replaces the estimate"
    );
}
