//! A scripted Kling on tokio time: answers each request with what the test's handler says, and
//! logs what it saw.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::signals::{Attempt, Deadline};
use kling_core::{ClassifyLayer, PeekBody};
use metrics::SharedString;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

pub(crate) type Req = Request<Full<Bytes>>;
pub(crate) type Res = Response<Full<Bytes>>;

/// One request as the scripted server saw it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: http::Method,
    pub(crate) uri: String,
    pub(crate) body: String,
    pub(crate) at: Instant,
    pub(crate) attempt: Option<u32>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) account: Option<String>,
    pub(crate) headers: http::HeaderMap,
}

/// What the scripted server answers.
pub(crate) enum Reply {
    /// A response now.
    Now(Res),
    /// A client error now (it will be wrapped in `Transport` by the classify step).
    Fail(BoxError),
    /// A response after a delay (to trip a per-attempt timeout).
    Later(Duration, Res),
}

#[derive(Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    pub(crate) fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub(crate) fn count(&self, method: &str, path_part: &str) -> usize {
        self.all()
            .iter()
            .filter(|s| s.method == method && s.uri.contains(path_part))
            .count()
    }
}

/// The scripted server under the classify step; `handler` gets each request and its index.
pub(crate) fn kling<H>(
    handler: H,
) -> (
    impl Service<
        Req,
        Response = Res,
        Error = BoxError,
        Future = impl Future<Output = Result<Res, BoxError>> + Send,
    > + Clone
    + Send
    + 'static,
    Log,
)
where
    H: Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
{
    kling_under(ClassifyLayer::new(), handler)
}

/// [`kling`] under the given classify step (a smaller body limit, say).
pub(crate) fn kling_under<H>(
    classify: ClassifyLayer,
    handler: H,
) -> (
    impl Service<
        Req,
        Response = Res,
        Error = BoxError,
        Future = impl Future<Output = Result<Res, BoxError>> + Send,
    > + Clone
    + Send
    + 'static,
    Log,
)
where
    H: Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
{
    let log = Log::default();
    let seen_log = log.clone();
    let handler = Arc::new(handler);
    let server = tower::service_fn(move |req: Req| {
        let seen = Seen {
            method: req.method().clone(),
            uri: req.uri().to_string(),
            body: String::from_utf8_lossy(&req.body().peek_bytes()).into_owned(),
            at: Instant::now(),
            attempt: Attempt::of(&req),
            deadline: Deadline::of(&req),
            account: kling_core::AccountId::of(&req).map(|a| a.as_str().to_owned()),
            headers: req.headers().clone(),
        };
        let index = {
            let mut all = seen_log.0.lock().unwrap();
            all.push(seen.clone());
            all.len() - 1
        };
        let reply = handler(&seen, index);
        async move {
            match reply {
                Reply::Now(res) => Ok(res),
                Reply::Fail(error) => Err(error),
                Reply::Later(delay, res) => {
                    tokio::time::sleep(delay).await;
                    Ok(res)
                }
            }
        }
    });
    (classify.layer(server), log)
}

/// A Kling envelope with the code's documented status.
pub(crate) fn code(code: i64) -> Res {
    let status = kling_core::Code::from_i64(code)
        .documented_status()
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    envelope(status, code, "null")
}

pub(crate) fn envelope(status: StatusCode, code: i64, data: &str) -> Res {
    let body = format!(
        r#"{{"code":{code},"message":"message {code}","request_id":"req-{code}","data":{data}}}"#
    );
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// A legacy task answer (create or query).
pub(crate) fn task(id: &str, external: Option<&str>) -> Res {
    let info = external.map_or(String::new(), |e| {
        format!(r#","task_info":{{"external_task_id":"{e}"}}"#)
    });
    envelope(
        StatusCode::OK,
        0,
        &format!(r#"{{"task_id":"{id}","task_status":"submitted"{info}}}"#),
    )
}

/// A page with no Kling envelope (a proxy's, a gateway's) at `status`.
pub(crate) fn html(status: u16, body: &'static str) -> Res {
    Response::builder()
        .status(status)
        .header("content-type", "text/html")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

pub(crate) fn with_header(mut res: Res, name: &'static str, value: &str) -> Res {
    res.headers_mut().insert(name, value.parse().unwrap());
    res
}

pub(crate) fn get(path: &str) -> Req {
    Request::get(format!("http://kling.test{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

pub(crate) fn create(body: &str) -> Req {
    Request::post("http://kling.test/v1/videos/text2video")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

pub(crate) fn refused() -> BoxError {
    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
}

pub(crate) fn reset() -> BoxError {
    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
}

/// Sends one request through a fresh clone of `service`.
pub(crate) async fn send<S>(service: &S, request: Req) -> Result<Res, BoxError>
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone,
{
    service.clone().oneshot(request).await
}

/// The `WARN` events of this thread while a [`Warnings::capture`] guard lives: each event's
/// message and fields as one line.
#[derive(Clone, Default)]
pub(crate) struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    /// Captures this thread's events until the guard drops (a current-thread runtime polls every
    /// future on it).
    pub(crate) fn capture() -> (Warnings, tracing::subscriber::DefaultGuard) {
        let warnings = Warnings::default();
        let guard = tracing::subscriber::set_default(warnings.clone());
        (warnings, guard)
    }

    pub(crate) fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Line(String);
        impl tracing::field::Visit for Line {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!(" {}={value:?}", field.name()));
            }
        }
        let mut line = Line(String::new());
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The counters recorded on this thread while a [`Counters::capture`] guard lives, each series
/// as `name{label=value,…}` (labels in the order recorded).
#[derive(Clone, Default)]
pub(crate) struct Counters(Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>);

impl Counters {
    /// Records this thread's metrics until the guard drops (a current-thread runtime polls
    /// every future on it).
    pub(crate) fn capture() -> (Counters, metrics::LocalRecorderGuard<'static>) {
        let counters = Counters::default();
        // The guard borrows its recorder for as long as it lives: one small leak per test.
        let recorder: &'static Counters = Box::leak(Box::new(counters.clone()));
        (counters, metrics::set_default_local_recorder(recorder))
    }

    /// Every series of the counter `name` with its value.
    pub(crate) fn series(&self, name: &str) -> BTreeMap<String, u64> {
        let prefix = format!("{name}{{");
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .map(|(key, value)| (key.clone(), value.load(Ordering::Relaxed)))
            .collect()
    }

    /// The sum of every series of the counter `name`.
    pub(crate) fn total(&self, name: &str) -> u64 {
        self.series(name).values().sum()
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        let series = format!("{}{{{}}}", key.name(), labels.join(","));
        let count = self
            .0
            .lock()
            .unwrap()
            .entry(series)
            .or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone();
        // The same series shares one count, however often it is registered.
        metrics::Counter::from_arc(Arc::new(Shared(count)))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A series' count, as a counter handle.
struct Shared(Arc<AtomicU64>);

impl metrics::CounterFn for Shared {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}
