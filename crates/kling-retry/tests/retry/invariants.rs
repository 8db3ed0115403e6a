//! Random scripts against a Kling that makes "ghost" tasks (made, then answered with a 5xx, a
//! timeout or a reset), checking what a user relies on whatever the script: no create sent
//! again once its task exists, none after a final refusal, no request at or past the deadline,
//! none sooner than a `Retry-After` asked (every form), a task that exists never reported as
//! surely not made and always named by its external id, and a retry budget that counts exactly
//! the retries sent, calls dropped at random included.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, StatusCode};
use kling_core::Recognized;
use kling_retry::{Recovered, RetryLayer};
use proptest::prelude::*;
use tower::Layer;
use tower::timeout::TimeoutLayer;

use crate::support::{Reply, code, envelope, html, kling, refused, reset, send, with_header};

#[derive(Clone, Copy, Debug)]
enum Post {
    Ok,
    Ghost(i64),
    Plain(i64),
    TimeoutGhost,
    TimeoutPlain,
    ResetGhost,
    Refused,
    Page503Ghost,
    Gated,
    Dropped,
}

#[derive(Clone, Copy, Debug)]
enum Get {
    Honest,
    Fail(i64),
    Timeout,
    Page404,
    Refused,
}

fn post() -> impl Strategy<Value = Post> {
    prop_oneof![
        Just(Post::Ok),
        prop_oneof![Just(5000i64), Just(5002), Just(5999)].prop_map(Post::Ghost),
        prop_oneof![
            Just(5000i64),
            Just(1302),
            Just(1303),
            Just(5001),
            Just(1201),
            Just(1102),
            Just(1203)
        ]
        .prop_map(Post::Plain),
        Just(Post::TimeoutGhost),
        Just(Post::TimeoutPlain),
        Just(Post::ResetGhost),
        Just(Post::Refused),
        Just(Post::Page503Ghost),
        Just(Post::Gated),
        Just(Post::Dropped),
    ]
}

fn get() -> impl Strategy<Value = Get> {
    prop_oneof![
        4 => Just(Get::Honest),
        1 => prop_oneof![Just(5000i64), Just(1302), Just(5001), Just(1200)].prop_map(Get::Fail),
        1 => Just(Get::Timeout),
        1 => Just(Get::Page404),
        1 => Just(Get::Refused),
    ]
}

#[derive(Default)]
struct World {
    made: HashMap<String, tokio::time::Instant>,
    violations: Vec<String>,
    final_post: bool,
    sends: Vec<(tokio::time::Instant, Method)>,
    /// (answer at, retry-after) of each immediate answer.
    hints: Vec<(usize, tokio::time::Instant, Duration)>,
}

/// One random script: the create, the layer's settings and what the server answers.
#[derive(Clone, Debug)]
struct Script {
    legacy: bool,
    caller_id: bool,
    generate: bool,
    deadline: Option<u64>,
    attempts: u32,
    /// The answers to successive creates (then success).
    posts: Vec<Post>,
    /// The answers to successive lookups (then the truth).
    gets: Vec<Get>,
    /// A `Retry-After` on the answer to request `i` that can carry one: `h / 4` seconds in
    /// form `h % 4` (delta, HTTP-date against `Date`, a decimal with spaces, several fields).
    hints: Vec<Option<u64>>,
    /// How long after it is made a ghost task is found by a lookup (under the settle time).
    lag: u64,
    /// A new-style lookup that finds nothing answers `data: []` (else `1203`).
    empty_list: bool,
}

fn script() -> impl Strategy<Value = Script> {
    (
        (any::<bool>(), any::<bool>(), any::<bool>()),
        prop::option::of(5u64..200),
        1u32..8,
        prop::collection::vec(post(), 0..6),
        prop::collection::vec(get(), 0..6),
        prop::collection::vec(prop::option::of(0u64..120), 0..12),
        0u64..1990,
        any::<bool>(),
    )
        .prop_map(
            |(
                (legacy, caller_id, generate),
                deadline,
                attempts,
                posts,
                gets,
                hints,
                lag,
                empty_list,
            )| {
                Script {
                    legacy,
                    caller_id,
                    generate,
                    deadline,
                    attempts,
                    posts,
                    gets,
                    hints,
                    lag,
                    empty_list,
                }
            },
        )
}

fn run(script: Script) -> Result<(), TestCaseError> {
    let Script {
        legacy,
        caller_id,
        generate,
        deadline,
        attempts,
        posts,
        gets,
        hints,
        lag,
        empty_list,
    } = script;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let world = Arc::new(Mutex::new(World::default()));
        let w = world.clone();
        let (np, ng) = (Arc::new(Mutex::new(0usize)), Arc::new(Mutex::new(0usize)));
        let (server, _log) = kling(move |seen, i| {
            let mut w = w.lock().unwrap();
            w.sends.push((seen.at, seen.method.clone()));
            let hint = hints.get(i).copied().flatten();
            let add = |mut res: crate::support::Res, w: &mut World| match hint {
                Some(h) => {
                    let form = h % 4;
                    let h = h / 4;
                    let wait = Duration::from_secs(h + u64::from(form == 2));
                    w.hints.push((i, seen.at, wait));
                    let base = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
                    match form {
                        0 => with_header(res, "retry-after", &h.to_string()),
                        1 => {
                            res.headers_mut().insert("date", httpdate::fmt_http_date(base).parse().unwrap());
                            with_header(res, "retry-after", &httpdate::fmt_http_date(base + Duration::from_secs(h)))
                        }
                        2 => with_header(res, "retry-after", &format!(" {h}.5\t")),
                        _ => {
                            res.headers_mut().append("retry-after", (h / 2).to_string().parse().unwrap());
                            res.headers_mut().append("retry-after", "-3".parse().unwrap());
                            res.headers_mut().append("retry-after", h.to_string().parse().unwrap());
                            res
                        }
                    }
                }
                None => res,
            };
            if seen.method == Method::POST {
                let recognized = Recognized::from_parts(
                    &seen.method,
                    &seen.uri.parse().unwrap(),
                    seen.body.as_bytes(),
                );
                let ext = recognized.external_id.unwrap_or_else(|| "<none>".into());
                if w.final_post {
                    w.violations.push(format!("POST {i} after a final refusal"));
                }
                if w.made.contains_key(&ext) {
                    w.violations.push(format!("POST {i} after {ext} was made"));
                    return Reply::Now(code(1201));
                }
                let mut n = np.lock().unwrap();
                let choice = posts.get(*n).copied().unwrap_or(Post::Ok);
                *n += 1;
                let visible = seen.at + Duration::from_millis(lag);
                let make = |w: &mut World| {
                    w.made.insert(ext.clone(), visible);
                };
                let task = |ext: &str| {
                    if legacy {
                        envelope(
                            StatusCode::OK,
                            0,
                            &format!(r#"{{"task_id":"t1","task_status":"submitted","task_info":{{"external_task_id":"{ext}"}}}}"#),
                        )
                    } else {
                        envelope(
                            StatusCode::OK,
                            0,
                            &format!(r#"{{"id":"t1","status":"submitted","external_id":"{ext}"}}"#),
                        )
                    }
                };
                match choice {
                    Post::Ok => {
                        make(&mut w);
                        Reply::Now(task(&ext))
                    }
                    Post::Ghost(c) => {
                        make(&mut w);
                        Reply::Now(add(code(c), &mut w))
                    }
                    Post::Plain(c) if matches!(c, 1201 | 1102 | 1203) => {
                        w.final_post = true;
                        Reply::Now(code(c))
                    }
                    Post::Plain(c) => Reply::Now(add(code(c), &mut w)),
                    Post::TimeoutGhost => {
                        make(&mut w);
                        Reply::Later(Duration::from_secs(3600), task(&ext))
                    }
                    Post::TimeoutPlain => Reply::Later(Duration::from_secs(3600), code(5000)),
                    Post::ResetGhost => {
                        make(&mut w);
                        Reply::Fail(reset())
                    }
                    Post::Refused => Reply::Fail(refused()),
                    Post::Gated => {
                        let mut res = add(code(1303), &mut w);
                        res.extensions_mut().insert(kling_core::signals::SlotGated);
                        Reply::Now(res)
                    }
                    Post::Dropped => {
                        let mut res = code(1004);
                        res.extensions_mut().insert(kling_retry::TokenDropped);
                        Reply::Now(res)
                    }
                    Post::Page503Ghost => {
                        make(&mut w);
                        Reply::Now(add(html(503, "<html>down</html>"), &mut w))
                    }
                }
            } else {
                let mut n = ng.lock().unwrap();
                let choice = gets.get(*n).copied().unwrap_or(Get::Honest);
                *n += 1;
                let ext = if legacy {
                    seen.uri.rsplit('/').next().unwrap().to_owned()
                } else {
                    seen.uri.rsplit('=').next().unwrap().to_owned()
                };
                match choice {
                    Get::Honest => {
                        let found = w.made.get(&ext).is_some_and(|v| *v <= seen.at);
                        Reply::Now(match (legacy, found) {
                            (false, false) if empty_list => envelope(StatusCode::OK, 0, "[]"),
                            (_, false) => code(1203),
                            (true, true) => envelope(
                                StatusCode::OK,
                                0,
                                &format!(r#"{{"task_id":"t1","task_status":"submitted","task_info":{{"external_task_id":"{ext}"}}}}"#),
                            ),
                            (false, true) => envelope(
                                StatusCode::OK,
                                0,
                                &format!(r#"[{{"id":"t1","status":"submitted","external_id":"{ext}"}}]"#),
                            ),
                        })
                    }
                    Get::Fail(1200) => Reply::Now(code(1200)),
                    Get::Fail(c) => Reply::Now(add(code(c), &mut w)),
                    Get::Timeout => Reply::Later(Duration::from_secs(3600), code(1203)),
                    Get::Page404 => Reply::Now(html(404, "<html>nf</html>")),
                    Get::Refused => Reply::Fail(refused()),
                }
            }
        });
        let mut builder = RetryLayer::builder()
            .seed(3)
            .max_attempts(attempts)
            .generate_external_ids(generate)
            .budget(kling_retry::RetryBudget::unlimited());
        builder = match deadline { Some(d) => builder.deadline(Duration::from_secs(d)), None => builder.no_deadline() };
        let client = builder
            .build()
            .unwrap()
            .layer(TimeoutLayer::new(Duration::from_secs(10)).layer(server));
        let start = tokio::time::Instant::now();
        let (uri, field) = if legacy {
            ("http://kling.test/v1/videos/text2video", "external_task_id")
        } else {
            ("http://kling.test/text-to-video/kling-3.0", "external_id")
        };
        let body = if caller_id {
            format!(r#"{{"prompt":"cat","{field}":"job-1"}}"#)
        } else {
            r#"{"prompt":"cat"}"#.to_owned()
        };
        let request = http::Request::post(uri)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let result = send(&client, request).await;
        let end = tokio::time::Instant::now();
        if let Some(d) = deadline {
            prop_assert!(end <= start + Duration::from_secs(d.max(10)) + Duration::from_millis(1), "ended at {:?}", end - start);
        }
        let w = world.lock().unwrap();
        prop_assert!(w.violations.is_empty(), "{:?} {:?}", w.violations, result.as_ref().map(|_| ()));
        if let Some(d) = deadline {
            for (at, m) in &w.sends {
                prop_assert!(*at < start + Duration::from_secs(d), "{m} sent at {:?}", *at - start);
            }
        }
        // Every request after a hinted answer waits at least the hint.
        for (i, at, h) in &w.hints {
            if let Some((next, _)) = w.sends.get(i + 1) {
                prop_assert!(*next >= *at + *h, "request {} at {:?}, hint {h:?} at {:?}", i + 1, *next - start, *at - start);
            }
        }
        let made = !w.made.is_empty();
        match &result {
            Ok(response) => {
                let recovered = response.extensions().get::<Recovered>().is_some();
                let outcome = kling_core::Outcome::of(response).unwrap();
                prop_assert!(outcome.is_success());
                prop_assert!(made, "success but nothing made (recovered {recovered})");
            }
            Err(error) => {
                if made {
                    prop_assert!(
                        kling_core::error::may_have_created(&**error),
                        "task made but the error says not: {error}"
                    );
                    let key = w.made.keys().next().unwrap().clone();
                    if key != "<none>" {
                        let named = if let Some(f) = error.downcast_ref::<kling_retry::error::Failed>() {
                            f.external_id().map(str::to_owned)
                        } else if let Some(d) = error.downcast_ref::<kling_retry::error::DeadlineExceeded>() {
                            d.external_id().map(str::to_owned)
                        } else {
                            None
                        };
                        prop_assert_eq!(named, Some(key), "{}", error);
                    }
                }
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    /// A create through any script of answers: see the module docs.
    #[test]
    fn a_create_through_any_script_keeps_every_promise(script in script()) {
        run(script)?;
    }
}

fn budget_run(
    plan: Vec<(u8, Option<u64>, Option<u64>)>,
    ratio: u32,
    deadline: Option<u64>,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let refusals: Arc<HashMap<String, (u8, Option<u64>)>> = Arc::new(
            plan.iter()
                .enumerate()
                .map(|(n, (k, hint, _))| (format!("/v1/videos/text2video/t{n}"), (*k, *hint)))
                .collect(),
        );
        let counts = Arc::new(Mutex::new(HashMap::<String, u8>::new()));
        let (server, log) = kling(move |seen, _| {
            let path = seen.uri.trim_start_matches("http://kling.test").to_owned();
            let mut counts = counts.lock().unwrap();
            let n = counts.entry(path.clone()).or_default();
            *n += 1;
            let (k, hint) = refusals[&path];
            if *n <= k {
                let res = code(if n.is_multiple_of(2) { 5000 } else { 1302 });
                Reply::Now(match hint {
                    Some(h) => with_header(res, "retry-after", &h.to_string()),
                    None => res,
                })
            } else {
                Reply::Now(crate::support::task("t", None))
            }
        });
        let budget =
            kling_retry::RetryBudget::new(Duration::from_secs(100_000), 0, f64::from(ratio) / 4.0)
                .unwrap();
        let builder = RetryLayer::builder()
            .seed(9)
            .max_attempts(4)
            .budget(budget.clone());
        let builder = match deadline {
            Some(d) => builder.deadline(Duration::from_secs(d)),
            None => builder.no_deadline(),
        };
        let client = builder.build().unwrap().layer(server);
        let calls: Vec<_> = plan
            .iter()
            .enumerate()
            .map(|(n, (_, _, drop_after))| {
                let client = client.clone();
                let drop_after = *drop_after;
                tokio::spawn(async move {
                    let call = send(
                        &client,
                        crate::support::get(&format!("/v1/videos/text2video/t{n}")),
                    );
                    match drop_after {
                        Some(ms) => {
                            let _ = tokio::time::timeout(Duration::from_millis(ms), call).await;
                        }
                        None => {
                            let _ = call.await;
                        }
                    }
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
        let retries = log.len() - plan.len();
        let allowance = (f64::from(ratio) / 4.0 * plan.len() as f64).floor() as usize;
        prop_assert_eq!(
            budget.remaining() as usize,
            allowance - retries,
            "retries sent {}",
            retries
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    /// Queries refused `1302`/`5000` a few times each, some dropped at random times: the budget
    /// spent is exactly the retries that went out.
    #[test]
    fn the_budget_counts_exactly_the_query_retries_sent(
        plan in prop::collection::vec((0u8..6, prop::option::of(0u64..4), prop::option::of(0u64..8000)), 1..30),
        ratio in 0u32..12,
        deadline in prop::option::of(1u64..20),
    ) {
        budget_run(plan, ratio, deadline)?;
    }
}

fn create_budget_run(
    plan: Vec<(Vec<u8>, Option<u64>)>,
    ratio: u32,
    deadline: Option<u64>,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let scripts: Arc<Vec<Vec<u8>>> = Arc::new(plan.iter().map(|(s, _)| s.clone()).collect());
        let state = Arc::new(Mutex::new(HashMap::<usize, (usize, Vec<Method>)>::new()));
        let st = state.clone();
        let (server, log) = kling(move |seen, _| {
            let job: usize = if seen.method == Method::POST {
                let r = Recognized::from_parts(
                    &seen.method,
                    &seen.uri.parse().unwrap(),
                    seen.body.as_bytes(),
                );
                r.external_id.unwrap()[4..].parse().unwrap()
            } else {
                seen.uri.rsplit('/').next().unwrap()[4..].parse().unwrap()
            };
            let mut st = st.lock().unwrap();
            let entry = st.entry(job).or_default();
            entry.1.push(seen.method.clone());
            let n = entry.0;
            entry.0 += 1;
            let choice = scripts[job].get(n).copied().unwrap_or(0);
            Reply::Now(match choice % 6 {
                0 if seen.method == Method::POST => crate::support::task("t", Some("x")),
                0 => code(1203),
                1 => code(5000),
                2 => code(1302),
                3 => code(5002),
                4 => code(1203),
                _ => code(5001),
            })
        });
        let budget =
            kling_retry::RetryBudget::new(Duration::from_secs(100_000), 0, f64::from(ratio) / 4.0)
                .unwrap();
        let builder = RetryLayer::builder()
            .seed(9)
            .max_attempts(6)
            .budget(budget.clone());
        let builder = match deadline {
            Some(d) => builder.deadline(Duration::from_secs(d)),
            None => builder.no_deadline(),
        };
        let client = builder.build().unwrap().layer(server);
        let calls: Vec<_> = plan
            .iter()
            .enumerate()
            .map(|(n, (_, drop_after))| {
                let client = client.clone();
                let drop_after = *drop_after;
                tokio::spawn(async move {
                    let call = send(
                        &client,
                        crate::support::create(&format!(r#"{{"external_task_id":"job-{n}"}}"#)),
                    );
                    match drop_after {
                        Some(ms) => {
                            let _ = tokio::time::timeout(Duration::from_millis(ms), call).await;
                        }
                        None => {
                            let _ = call.await;
                        }
                    }
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
        let st = state.lock().unwrap();
        let mut drawn = 0;
        for (_, (_, methods)) in st.iter() {
            for pair in methods.windows(2) {
                // A first lookup (a GET right after a POST) draws nothing.
                if !(pair[0] == Method::POST && pair[1] == Method::GET) {
                    drawn += 1;
                }
            }
        }
        let allowance = (f64::from(ratio) / 4.0 * plan.len() as f64).floor() as usize;
        prop_assert_eq!(
            budget.remaining() as usize,
            allowance - drawn,
            "requests {}",
            log.len()
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    /// Creates answered `5000`/`5002`/`1302`/`5001`, looked up, sent again, some dropped at
    /// random times: the budget spent is exactly the retries that went out, each create's first
    /// lookup free.
    #[test]
    fn the_budget_counts_exactly_the_create_retries_sent(
        plan in prop::collection::vec((prop::collection::vec(0u8..6, 0..8), prop::option::of(0u64..20000)), 1..20),
        ratio in 0u32..16,
        deadline in prop::option::of(1u64..40),
    ) {
        create_budget_run(plan, ratio, deadline)?;
    }
}
