//! The metrics the retry, rate-limit and task-slots layers record inside the whole stack,
//! checked against the kling-metrics README table (`kling_metrics::catalog`), with a
//! debugging recorder, in paused time against the in-process mock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_metrics::catalog::{self, MetricType};
use kling_mock::{MockConfig, MockKling, Preset};
use kling_tower::{Credentials, KlingLayer, StackConfig, TaskRef, Tier};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshot};
use metrics_util::{CompositeKey, MetricKind};
use tower::{Layer, Service, ServiceExt};

use crate::support::{legacy_create, new_style_create, pro_stack_on_a_key_pair, request};

type Series = (String, MetricKind, BTreeSet<String>);

/// Runs `f` on a current-thread runtime with paused time, recording into a fresh debugging
/// recorder; returns what it recorded.
fn snapshot_of(f: impl std::future::Future<Output = ()>) -> Snapshot {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(f);
    });
    snapshotter.snapshot()
}

/// [`snapshot_of`] as the key of every series recorded.
fn keys_recorded(f: impl std::future::Future<Output = ()>) -> Vec<CompositeKey> {
    snapshot_of(f)
        .into_vec()
        .into_iter()
        .map(|(key, _, _, _)| key)
        .collect()
}

/// [`keys_recorded`] as (name, kind, label names).
fn recorded(f: impl std::future::Future<Output = ()>) -> BTreeSet<Series> {
    keys_recorded(f)
        .into_iter()
        .map(|key| {
            let kind = key.kind();
            let key = key.key();
            let labels = key.labels().map(|l| l.key().to_owned()).collect();
            (key.name().to_owned(), kind, labels)
        })
        .collect()
}

async fn call<S>(service: &S, req: http::Request<Full<Bytes>>)
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = kling_core::BoxError,
        > + Clone,
{
    // Errors are part of the script (a spent retry budget); only the metrics matter here.
    let _ = service.clone().oneshot(req).await;
}

/// Pro numbers in the stack over a mock with fewer slots (2: 1303s), half the rate (1302s) and
/// some 5xx: retries of every kind, cooldowns, rate-limit and slot waits, tasks that end.
async fn busy_account() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .slots(2)
            .rate_per_minute(30.0)
            .fault_rate(0.1)
            .task_duration(Duration::from_secs(20), Duration::from_secs(30))
            .seed(7),
    )
    .unwrap();
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("k").unwrap(),
    )
    .seed(7)
    .build()
    .unwrap();
    let service = kling.layer(mock);
    let follower = kling
        .follower(service.clone(), kling.follow_policy())
        .unwrap();
    let jobs: Vec<_> = (0..8)
        .map(|i| {
            let service = service.clone();
            let follower = follower.clone();
            tokio::spawn(async move {
                let created = service
                    .oneshot(request(
                        "POST",
                        "/v1/videos/text2video",
                        &format!(r#"{{"prompt":"{i}"}}"#),
                    ))
                    .await;
                if let Ok(created) = created
                    && let Some(task) = kling_core::Outcome::of(&created).and_then(|o| o.task())
                {
                    let _ = follower
                        .follow(TaskRef::from_report("/v1/videos/text2video", task))
                        .await;
                }
            })
        })
        .collect();
    for job in jobs {
        job.await.unwrap();
    }
    let _ = kling.snapshot();
}

/// An account with no rate cap and no retry budget beyond its floor, against a failing API:
/// the budget runs out.
async fn failing_account() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .no_rate_limit()
            .fault_rate(1.0),
    )
    .unwrap();
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Enterprise).retry_budget_ratio(0.0),
        Credentials::api_key("k").unwrap(),
    )
    .seed(7)
    .build()
    .unwrap();
    let service = kling.layer(mock);
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                call(
                    &service,
                    request("GET", &format!("/v1/videos/text2video/t{i}"), ""),
                )
                .await;
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
}

fn kind_of(t: MetricType) -> MetricKind {
    match t {
        MetricType::Counter => MetricKind::Counter,
        MetricType::Gauge => MetricKind::Gauge,
        MetricType::Histogram => MetricKind::Histogram,
        other => panic!("unknown metric type {other:?}"),
    }
}

#[test]
fn the_other_layers_record_every_metric_of_their_rows_with_its_type_and_labels() {
    let mut series = recorded(busy_account());
    series.extend(recorded(failing_account()));

    let mut rows = Vec::new();
    for krate in ["kling-retry", "kling-ratelimit", "kling-concurrency"] {
        let docs = catalog::recorded_by(krate);
        assert!(!docs.is_empty(), "{krate} has rows in the table");
        rows.extend(docs);
    }
    let by_name: BTreeMap<&str, _> = rows.iter().map(|d| (d.name, d)).collect();

    // Every row is recorded …
    for doc in &rows {
        assert!(
            series.iter().any(|(name, _, _)| name == doc.name),
            "{} ({}) was never recorded; recorded: {series:#?}",
            doc.name,
            doc.recorded_by
        );
    }
    // … and every series of those rows has the row's type and label names.
    for (name, kind, labels) in &series {
        let Some(doc) = by_name.get(name.as_str()) else {
            continue;
        };
        assert_eq!(*kind, kind_of(doc.metric_type), "{name}");
        let expected: BTreeSet<String> = doc.labels.iter().map(|l| (*l).to_owned()).collect();
        assert_eq!(labels, &expected, "{name}");
    }
    // Every name recorded by anyone is in the table (no undocumented metric).
    for (name, _, _) in &series {
        assert!(catalog::find(name).is_some(), "{name} is not in the table");
    }
}

/// Creates naming 150 models (a gateway passing its users' model names through): every layer
/// labels their pools from one bounded set, so the recorder keeps a bounded number of series.
#[test]
fn many_model_names_make_a_bounded_set_of_pool_labels() {
    const MODELS: usize = 150;
    let keys = keys_recorded(async {
        let mock = MockKling::new(MockConfig::preset(Preset::Enterprise).no_rate_limit()).unwrap();
        let kling = KlingLayer::new(
            StackConfig::preset(Tier::Enterprise),
            Credentials::api_key("k").unwrap(),
        )
        .unwrap();
        let service = kling.layer(mock);
        for n in 0..MODELS {
            let path = format!("/text-to-video/model-{n}");
            let created = service
                .clone()
                .oneshot(request("POST", &path, r#"{"prompt":"p"}"#))
                .await
                .unwrap();
            assert_eq!(created.status(), 200, "{path}");
        }
    });
    let mut pools: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for key in keys {
        let key = key.key();
        if let Some(pool) = key.labels().find(|l| l.key() == "pool") {
            pools
                .entry(key.name().to_owned())
                .or_default()
                .insert(pool.value().to_owned());
        }
    }
    // The duration histogram (kling-metrics) and the slot gauges (kling-concurrency) each
    // label at most the named models and `video:other`.
    for name in [
        kling_core::metrics::REQUEST_DURATION,
        kling_core::metrics::SLOTS_IN_USE,
        kling_core::metrics::SLOTS_CAPACITY,
    ] {
        let labels = pools.get(name).unwrap_or_else(|| panic!("{name} recorded"));
        assert!(
            labels.len() <= kling_core::metrics::MODEL_POOL_LABELS + 1,
            "{name}: {} pool labels for {MODELS} models",
            labels.len()
        );
        assert!(labels.contains("video:other"), "{name}: {labels:?}");
        assert!(labels.contains("video:model-0"), "{name}: {labels:?}");
    }
}

/// A request the stack refuses at its gate because the credentials cannot be sent on its
/// endpoint (an access key pair's JWT on a new-style create) is counted as any local refusal
/// is: `code="refused"` on `kling_responses_total` and the duration histogram, once. Refused
/// ahead of the metrics layer, it left no trace in the metrics (nor their `WARN` log), where
/// the same refusal made below the rate limiter was counted. The control: a legacy create by
/// the same pair is counted under Kling's code `0`, not `refused`.
#[test]
fn a_jwt_new_style_create_refused_at_the_gate_is_counted_as_refused() {
    let snapshot = snapshot_of(async {
        let (mock, kling) = pro_stack_on_a_key_pair();
        let service = kling.layer(mock.clone());
        let refused = service
            .clone()
            .oneshot(new_style_create("p"))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("takes an API key"),
            "{refused}"
        );
        let created = service.oneshot(legacy_create("p")).await.unwrap();
        assert_eq!(created.status(), 200);
        assert_eq!(
            mock.stats().requests_total,
            1,
            "the refused one was not sent"
        );
    });
    let mut responses: BTreeMap<String, u64> = BTreeMap::new();
    let mut timed: BTreeMap<String, usize> = BTreeMap::new();
    for (key, _, _, value) in snapshot.into_vec() {
        let key = key.key();
        let Some(code) = key.labels().find(|l| l.key() == "code") else {
            continue;
        };
        let code = code.value().to_owned();
        match value {
            DebugValue::Counter(n) if key.name() == kling_core::metrics::RESPONSES => {
                *responses.entry(code).or_default() += n;
            }
            DebugValue::Histogram(samples)
                if key.name() == kling_core::metrics::REQUEST_DURATION =>
            {
                *timed.entry(code).or_default() += samples.len();
            }
            _ => {}
        }
    }
    let expected = BTreeMap::from([("0".to_owned(), 1), ("refused".to_owned(), 1)]);
    assert_eq!(responses, expected, "kling_responses_total by code");
    let expected = BTreeMap::from([("0".to_owned(), 1), ("refused".to_owned(), 1)]);
    assert_eq!(timed, expected, "durations by code");
}
