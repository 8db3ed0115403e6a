//! What the call's answer is: the response the server sent for the attempt that ended the call,
//! untouched but for `Attempt(n)` (a call that took more than one request) and [`Recovered`] (a
//! lookup's answer), whichever path led to it; and a future that has answered is done.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Waker};
use std::time::Duration;

use http::{Method, StatusCode};
use kling_core::Outcome;
use kling_core::signals::Attempt;
use kling_retry::{Recovered, RetryLayer, TokenDropped};
use tower::{Layer, Service, ServiceExt};

use crate::support::{
    Reply, Res, Seen, Warnings, code, create, get, kling, send, task, with_header,
};

fn layer() -> RetryLayer {
    RetryLayer::builder().seed(1).build().unwrap()
}

/// The server's answer `n` (from 0), told apart by a header the retry layer never writes.
fn marked(response: Res, n: usize) -> Res {
    with_header(response, "x-answer", &n.to_string())
}

fn answer_mark(response: &Res) -> &str {
    response.headers()["x-answer"].to_str().unwrap()
}

fn task_id(response: &Res) -> String {
    Outcome::of(response).unwrap().task().unwrap().id.clone()
}

/// Negative control for the tests below: a call answered by its first request carries no
/// `Attempt`, so one found on a retried call's answer was put there by the retry.
#[tokio::test(start_paused = true)]
async fn a_call_answered_at_once_carries_no_attempt_count() {
    let (server, log) = kling(|_, i| Reply::Now(marked(task("t1", None), i)));
    let client = layer().layer(server);
    let response = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(answer_mark(&response), "0");
    assert_eq!(task_id(&response), "t1");
    assert_eq!(response.extensions().get::<Attempt>(), None);
    assert!(response.extensions().get::<Recovered>().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_call_answered_after_retries_says_how_many_requests_it_took() {
    let (server, log) = kling(|_, i| {
        Reply::Now(marked(
            match i {
                0 => code(1302),
                1 => code(5000),
                _ => task("t3", None),
            },
            i,
        ))
    });
    let client = layer().layer(server);
    let response = send(&client, get("/v1/videos/text2video/t3"))
        .await
        .unwrap();
    assert_eq!(log.len(), 3);
    // The third answer itself, not an earlier one.
    assert_eq!(answer_mark(&response), "2");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(task_id(&response), "t3");
    assert_eq!(response.extensions().get::<Attempt>(), Some(&Attempt(3)));
    assert!(response.extensions().get::<Recovered>().is_none());
}

/// A create that failed with a 5xx and was found by its lookup: the lookup's answer, marked
/// [`Recovered`], counts both requests.
#[tokio::test(start_paused = true)]
async fn a_lookups_answer_is_recovered_and_counts_the_create() {
    let (server, log) = kling(|seen, i| {
        Reply::Now(marked(
            if seen.method == Method::POST {
                code(5000)
            } else {
                task("t7", Some("job-7"))
            },
            i,
        ))
    });
    let client = layer().layer(server);
    let response = send(&client, create(r#"{"external_task_id":"job-7"}"#))
        .await
        .unwrap();
    assert_eq!(log.count("POST", "text2video"), 1);
    assert_eq!(log.count("GET", "text2video/job-7"), 1);
    assert_eq!(answer_mark(&response), "1");
    assert_eq!(task_id(&response), "t7");
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.external_id, "job-7");
    assert_eq!(recovered.task_id, "t7");
    assert_eq!(response.extensions().get::<Attempt>(), Some(&Attempt(2)));
}

/// A token the auth layer below dropped (1004) is re-signed and sent again at once: the answer
/// is the second request's, and says there were two.
#[tokio::test(start_paused = true)]
async fn an_answer_after_a_resign_counts_the_refused_request() {
    let (server, log) = kling(|_, i| {
        Reply::Now(marked(
            if i == 0 {
                let mut refused = code(1004);
                refused.extensions_mut().insert(TokenDropped);
                refused
            } else {
                task("t2", None)
            },
            i,
        ))
    });
    let client = layer().layer(server);
    let response = send(&client, create(r#"{"prompt":"cat"}"#)).await.unwrap();
    assert_eq!(log.count("POST", "text2video"), 2);
    assert_eq!(answer_mark(&response), "1");
    assert_eq!(task_id(&response), "t2");
    assert!(response.extensions().get::<TokenDropped>().is_none());
    assert_eq!(response.extensions().get::<Attempt>(), Some(&Attempt(2)));
}

/// A retry answered at the deadline's very instant is the call's answer: the answer is read
/// before the deadline is.
#[tokio::test(start_paused = true)]
async fn a_retry_answered_at_the_deadline_is_the_calls_answer() {
    let (server, log) = kling(|seen, i| {
        if i == 0 {
            return Reply::Now(marked(code(5000), i));
        }
        let deadline = seen.deadline.expect("the retry carries the deadline");
        Reply::Later(deadline - seen.at, marked(task("t4", None), i))
    });
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap()
        .layer(server);
    let started = tokio::time::Instant::now();
    let response = send(&client, get("/v1/videos/text2video/t4"))
        .await
        .unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        tokio::time::Instant::now(),
        started + Duration::from_secs(30)
    );
    assert_eq!(answer_mark(&response), "1");
    assert_eq!(response.extensions().get::<Attempt>(), Some(&Attempt(2)));
}

/// Polls `future` once more after it answered: the panic's message, if it panicked.
fn poll_again<F: Future + Unpin>(future: &mut F) -> Option<String> {
    let mut cx = Context::from_waker(Waker::noop());
    let panic = catch_unwind(AssertUnwindSafe(|| {
        let _ = Pin::new(&mut *future).poll(&mut cx);
    }))
    .err()?;
    panic
        .downcast_ref::<&str>()
        .map(|message| (*message).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
}

/// A scripted Kling's answers.
type Script = fn(&Seen, usize) -> Reply;

/// One way a call ends: what the server answers, the create sent, whether it ends answered.
struct Ending {
    name: &'static str,
    script: Script,
    body: &'static str,
    answered: bool,
}

/// Whatever path ended the call (an answer at once, after a retry, a lookup's, an error), the
/// future is done: polled again it says so instead of polling a finished attempt, and dropped it
/// warns of nothing (a create it answered is no create dropped in flight).
#[tokio::test(start_paused = true)]
async fn a_future_that_answered_is_done_whichever_path_ended_it() {
    let (warnings, _guard) = Warnings::capture();
    let endings = [
        Ending {
            name: "at once",
            script: |_, _| Reply::Now(task("t1", None)),
            body: r#"{"prompt":"cat"}"#,
            answered: true,
        },
        Ending {
            name: "after a retry",
            script: |_, i| Reply::Now(if i == 0 { code(1302) } else { task("t1", None) }),
            body: r#"{"prompt":"cat"}"#,
            answered: true,
        },
        Ending {
            name: "a lookup's answer",
            script: |seen, _| {
                Reply::Now(if seen.method == Method::POST {
                    code(5000)
                } else {
                    task("t1", Some("job-1"))
                })
            },
            body: r#"{"external_task_id":"job-1"}"#,
            answered: true,
        },
        Ending {
            name: "an error",
            script: |_, _| Reply::Now(code(1102)),
            body: r#"{"prompt":"cat"}"#,
            answered: false,
        },
    ];
    for ending in endings {
        let (server, _log) = kling(ending.script);
        let mut client = RetryLayer::builder()
            .seed(1)
            .generate_external_ids(true)
            .build()
            .unwrap()
            .layer(server);
        let name = ending.name;
        let mut future = client.ready().await.unwrap().call(create(ending.body));
        let output = (&mut future).await;
        assert_eq!(output.is_ok(), ending.answered, "{name}: {output:?}");
        let message = poll_again(&mut future);
        assert_eq!(
            message.as_deref(),
            Some("kling-retry ResponseFuture polled after completion"),
            "{name}"
        );
        drop(future);
        assert_eq!(warnings.all(), Vec::<String>::new(), "{name}");
    }
}
