//! A scripted exchange with the in-process mock; every metric the README table says this crate
//! records is checked against the table (type, label names) and against the script (values).

use std::collections::BTreeMap;
use std::time::Duration;

use kling_core::metrics::{REQUEST_DURATION, RESPONSES, TASK_LIFETIME, TASKS_FINISHED};
use kling_core::{ClassifyLayer, Outcome};
use kling_metrics::catalog::{self, MetricDoc};
use kling_metrics::{MetricsLayer, Monitor};
use kling_mock::{MockConfig, MockKling, Preset};
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt};

use crate::support::{Recording, Series, Value, kind_name, request};

/// The series the script expects, with label names taken from the README table row.
#[derive(Default)]
struct Ledger {
    counters: BTreeMap<Series, u64>,
    histograms: BTreeMap<Series, Vec<f64>>,
}

impl Ledger {
    /// The series of `name` whose label values are `values`, in the table's label order.
    fn series(docs: &[MetricDoc], name: &str, values: &[&str]) -> Series {
        let doc = docs.iter().find(|d| d.name == name).unwrap_or_else(|| {
            panic!("`{name}` is not in the README table as recorded by this layer")
        });
        assert_eq!(
            doc.labels.len(),
            values.len(),
            "`{name}`: the table lists labels {:?}",
            doc.labels
        );
        let mut labels: Vec<(String, String)> = doc
            .labels
            .iter()
            .zip(values)
            .map(|(l, v)| ((*l).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        (name.to_owned(), labels)
    }

    fn count(&mut self, docs: &[MetricDoc], name: &str, values: &[&str]) {
        *self
            .counters
            .entry(Self::series(docs, name, values))
            .or_default() += 1;
    }

    fn sample(&mut self, docs: &[MetricDoc], name: &str, values: &[&str], sample: Option<f64>) {
        let samples = self
            .histograms
            .entry(Self::series(docs, name, values))
            .or_default();
        samples.push(sample.unwrap_or(f64::NAN));
    }

    /// One logical call: a duration sample and a response.
    fn call(&mut self, docs: &[MetricDoc], kind: &str, pool: &str, status: &str, code: &str) {
        self.sample(docs, REQUEST_DURATION, &[kind, pool, status, code], None);
        self.count(docs, RESPONSES, &[kind, code]);
    }

    /// A tracked task ended after `lifetime`.
    fn task_ended(&mut self, docs: &[MetricDoc], pool: &str, status: &str, lifetime: Duration) {
        self.sample(
            docs,
            TASK_LIFETIME,
            &[pool, status],
            Some(lifetime.as_secs_f64()),
        );
        self.count(docs, TASKS_FINISHED, &[pool, status]);
    }
}

/// Sends one request through the stack and checks the mock's answer against the script.
async fn send<S>(
    stack: &mut S,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
    status: u16,
    code: i64,
) -> Outcome
where
    S: Service<
            http::Request<http_body_util::Full<bytes::Bytes>>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = kling_core::error::BoxError,
        >,
{
    let path = req.uri().to_string();
    let response = stack.ready().await.unwrap().call(req).await.unwrap();
    let outcome = Outcome::of(&response).expect("classified").clone();
    assert_eq!(
        (response.status().as_u16(), outcome.code().as_i64()),
        (status, code),
        "{path}: {}",
        outcome.message()
    );
    outcome
}

const KEY: &str = "scripted-key";

#[tokio::test(start_paused = true)]
async fn every_metric_in_the_readme_table_has_the_scripted_value_and_labels() {
    let recording = Recording::start();
    // What the layer records: its own rows, plus the task rows it records with
    // `record_task_metrics` on (for stacks without the slots layer).
    let mut docs = catalog::recorded_by("kling-metrics");
    assert!(!docs.is_empty());
    docs.extend([TASK_LIFETIME, TASKS_FINISHED].map(|name| catalog::find(name).unwrap()));

    // One slot per pool, 10 requests a minute (one per 6 s), 2 credits, 30 s tasks.
    let mock = MockKling::new(
        MockConfig::preset(Preset::Free)
            .rate_per_minute(10.0)
            .credits(2.0)
            .task_duration(Duration::from_secs(30), Duration::from_secs(30))
            .failure_rate(0.5)
            .seed(SEED),
    )
    .unwrap();
    let monitor = Monitor::builder()
        .rate_quota(10, Duration::from_secs(60))
        .record_task_metrics(true)
        .build()
        .unwrap();
    let mut stack =
        MetricsLayer::with_monitor(monitor.clone()).layer(ClassifyLayer::new().layer(mock.clone()));
    let mut ledger = Ledger::default();
    let gap = Duration::from_secs(7);
    let start = Instant::now();

    // A create succeeds.
    let a = send(
        &mut stack,
        request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#, KEY),
        200,
        0,
    )
    .await;
    let a_id = a.task().unwrap().id.clone();
    let a_created = Instant::now();
    ledger.call(&docs, "create", "video", "200", "0");

    // The only video slot is taken: 1303.
    advance(gap).await;
    send(
        &mut stack,
        request("POST", "/v1/videos/text2video", r#"{"prompt":"b"}"#, KEY),
        429,
        1303,
    )
    .await;
    ledger.call(&docs, "create", "video", "429", "1303");

    // Straight after: too fast, 1302; then a cooldown before the next request.
    let query_a = format!("/v1/videos/text2video/{a_id}");
    send(&mut stack, request("GET", &query_a, "", KEY), 429, 1302).await;
    ledger.call(&docs, "query", "", "429", "1302");
    advance(gap).await;

    // Still running.
    let running = send(&mut stack, request("GET", &query_a, "", KEY), 200, 0).await;
    assert!(!running.task().unwrap().status.is_terminal());
    ledger.call(&docs, "query", "", "200", "0");

    // Ended: its lifetime is recorded.
    advance(Duration::from_secs(21)).await;
    let ended = send(&mut stack, request("GET", &query_a, "", KEY), 200, 0).await;
    let a_status = ended.task().unwrap().status.clone();
    assert!(a_status.is_terminal());
    ledger.call(&docs, "query", "", "200", "0");
    ledger.task_ended(&docs, "video", a_status.as_str(), a_created.elapsed());

    // An image create spends the last credit; a list shows it running.
    advance(gap).await;
    let c = send(
        &mut stack,
        request(
            "POST",
            "/v1/images/generations",
            r#"{"prompt":"c","n":1}"#,
            KEY,
        ),
        200,
        0,
    )
    .await;
    let c_id = c.task().unwrap().id.clone();
    let c_created = Instant::now();
    ledger.call(&docs, "create", "image", "200", "0");
    advance(gap).await;
    send(
        &mut stack,
        request(
            "GET",
            "/v1/images/generations?pageNum=1&pageSize=30",
            "",
            KEY,
        ),
        200,
        0,
    )
    .await;
    ledger.call(&docs, "list", "", "200", "0");

    // The image task ends.
    advance(Duration::from_secs(30)).await;
    let ended = send(
        &mut stack,
        request("GET", &format!("/v1/images/generations/{c_id}"), "", KEY),
        200,
        0,
    )
    .await;
    let c_status = ended.task().unwrap().status.clone();
    ledger.call(&docs, "query", "", "200", "0");
    ledger.task_ended(&docs, "image", c_status.as_str(), c_created.elapsed());
    let mut statuses = [a_status.as_str(), c_status.as_str()];
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        ["failed", "succeeded"],
        "the seed gives one task of each end"
    );

    // The pack is empty: 1102.
    advance(gap).await;
    send(
        &mut stack,
        request(
            "POST",
            "/v1/images/generations",
            r#"{"prompt":"d","n":2}"#,
            KEY,
        ),
        429,
        1102,
    )
    .await;
    ledger.call(&docs, "create", "image", "429", "1102");

    // An account request and a request of no known kind.
    advance(gap).await;
    send(
        &mut stack,
        request("GET", "/account/costs", "", KEY),
        200,
        0,
    )
    .await;
    ledger.call(&docs, "account", "", "200", "0");
    advance(gap).await;
    send(
        &mut stack,
        request("POST", "/v1/nothing/here", "{}", KEY),
        404,
        1202,
    )
    .await;
    ledger.call(&docs, "other", "", "404", "1202");
    let elapsed = start.elapsed();

    // The recorded series, checked against the table...
    let recorded = recording.take();
    for ((name, labels), (kind, _)) in &recorded {
        let doc = docs.iter().find(|d| d.name == name).unwrap_or_else(|| {
            panic!("`{name}` is recorded but not in the README table as recorded by this layer")
        });
        assert_eq!(kind_name(*kind), doc.metric_type.as_str(), "`{name}` type");
        let mut names: Vec<&str> = labels.iter().map(|(l, _)| l.as_str()).collect();
        let mut listed = doc.labels.clone();
        names.sort_unstable();
        listed.sort_unstable();
        assert_eq!(names, listed, "`{name}` labels");
    }
    for doc in &docs {
        assert!(
            recorded.keys().any(|(name, _)| name == doc.name),
            "`{}` is in the table but the script recorded none",
            doc.name
        );
    }

    // ...and against the script.
    let counters: BTreeMap<Series, u64> = recorded
        .iter()
        .filter_map(|(s, (_, v))| match v {
            Value::Counter(c) => Some((s.clone(), *c)),
            _ => None,
        })
        .collect();
    assert_eq!(counters, ledger.counters);
    let histograms: BTreeMap<&Series, &Vec<f64>> = recorded
        .iter()
        .filter_map(|(s, (_, v))| match v {
            Value::Histogram(h) => Some((s, h)),
            _ => None,
        })
        .collect();
    assert_eq!(
        histograms.keys().copied().collect::<Vec<_>>(),
        ledger.histograms.keys().collect::<Vec<_>>()
    );
    for (series, expected) in &ledger.histograms {
        let got = histograms[series];
        assert_eq!(got.len(), expected.len(), "{series:?} samples");
        for (g, e) in got.iter().zip(expected) {
            if e.is_nan() {
                // A call's duration: in paused time the mock answers at once.
                assert!((0.0..=elapsed.as_secs_f64()).contains(g), "{series:?}: {g}");
            } else {
                assert_eq!(g, e, "{series:?}");
            }
        }
    }

    // The snapshot agrees: 429s by code, tasks, the failed share.
    let snapshot = monitor.snapshot();
    assert_eq!(
        snapshot.rejections,
        BTreeMap::from([(1102, 1), (1302, 1), (1303, 1)])
    );
    assert_eq!(snapshot.tasks.created, 2);
    assert_eq!(snapshot.tasks.finished, 2);
    assert_eq!(snapshot.tasks.failed, 1);
    assert_eq!(snapshot.tasks.running, 0);
    assert_eq!(snapshot.tasks.failure_share(), Some(0.5));
    // The last minute (t = 41..100 s) held the 6 requests sent from t = 42 s on.
    assert_eq!(elapsed, Duration::from_secs(100));
    assert_eq!(snapshot.rate.requests, 6);
    assert_eq!(snapshot.rate.percent(), Some(60.0));
}

/// The mock's seed: with it, of the two tasks the script creates one fails and one succeeds.
const SEED: u64 = 7;
