//! Shared fixtures: a recording `metrics` backend, a capturing `tracing` subscriber, requests.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// One recorded series: metric name and its labels, sorted by label name.
pub(crate) type Series = (String, Vec<(String, String)>);

/// What one series recorded.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

/// A `metrics` debugging recorder installed for the current thread.
pub(crate) struct Recording {
    recorder: &'static DebuggingRecorder,
    snapshotter: Snapshotter,
    _guard: metrics::LocalRecorderGuard<'static>,
}

impl Recording {
    /// Installs a fresh debugging recorder as this thread's recorder (a `current_thread`
    /// tokio test runs every task on this thread).
    pub(crate) fn start() -> Recording {
        let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
        let snapshotter = recorder.snapshotter();
        let guard = metrics::set_default_local_recorder(recorder);
        Recording {
            recorder,
            snapshotter,
            _guard: guard,
        }
    }

    /// Every series recorded since the last `take` (counters and histograms are drained by
    /// the read; series with nothing new are left out).
    pub(crate) fn take(&self) -> BTreeMap<Series, (metrics_util::MetricKind, Value)> {
        let _ = self.recorder;
        self.snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(_, _, _, value)| match value {
                DebugValue::Counter(c) => *c > 0,
                DebugValue::Histogram(h) => !h.is_empty(),
                DebugValue::Gauge(_) => true,
            })
            .map(|(key, _unit, _description, value)| {
                let kind = key.kind();
                let key = key.key();
                let mut labels: Vec<(String, String)> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                let value = match value {
                    DebugValue::Counter(c) => Value::Counter(c),
                    DebugValue::Gauge(g) => Value::Gauge(g.into_inner()),
                    DebugValue::Histogram(h) => {
                        Value::Histogram(h.into_iter().map(|v| v.into_inner()).collect())
                    }
                };
                ((key.name().to_owned(), labels), (kind, value))
            })
            .collect()
    }
}

/// The name of a `metrics_util` kind in the README table's words.
pub(crate) fn kind_name(kind: MetricKind) -> &'static str {
    match kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Histogram => "histogram",
    }
}

/// One span or event as a subscriber saw it: every field formatted as text.
#[derive(Clone, Debug, Default)]
pub(crate) struct Captured {
    pub(crate) name: String,
    pub(crate) target: String,
    pub(crate) level: String,
    pub(crate) fields: Vec<(String, String)>,
}

impl Captured {
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A `tracing` subscriber that keeps every span (with later `record`s) and every event.
#[derive(Clone)]
pub(crate) struct Capture {
    inner: Arc<Mutex<CaptureState>>,
}

impl Default for Capture {
    fn default() -> Self {
        // While at most one dispatcher exists, tracing-core computes a callsite's interest
        // from the dispatcher of the thread that first hits it: a callsite first hit by a test
        // without a subscriber while this capture is set would be cached as "never", and the
        // capture would miss it. A second, process-wide dispatcher makes tracing-core ask every
        // dispatcher ("sometimes"), so each thread's own decides.
        static SECOND: OnceLock<tracing::Dispatch> = OnceLock::new();
        SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::new()));
        Capture {
            inner: Arc::default(),
        }
    }
}

#[derive(Default)]
struct CaptureState {
    spans: Vec<Captured>,
    events: Vec<Captured>,
}

impl Capture {
    pub(crate) fn spans(&self) -> Vec<Captured> {
        self.inner.lock().unwrap().spans.clone()
    }

    pub(crate) fn events(&self) -> Vec<Captured> {
        self.inner.lock().unwrap().events.clone()
    }

    /// Everything captured, as one text to search.
    pub(crate) fn all_text(&self) -> String {
        let state = self.inner.lock().unwrap();
        let mut text = String::new();
        for item in state.spans.iter().chain(&state.events) {
            text.push_str(&format!("{} {} {} ", item.name, item.target, item.level));
            for (name, value) in &item.fields {
                text.push_str(&format!("{name}={value} "));
            }
            text.push('\n');
        }
        text
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

fn describe(metadata: &Metadata<'_>) -> Captured {
    Captured {
        name: metadata.name().to_owned(),
        target: metadata.target().to_owned(),
        level: metadata.level().to_string(),
        fields: Vec::new(),
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _metadata: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        let mut span = describe(attributes.metadata());
        attributes.record(&mut Fields(&mut span.fields));
        let mut state = self.inner.lock().unwrap();
        state.spans.push(span);
        Id::from_u64(state.spans.len() as u64)
    }

    fn record(&self, id: &Id, values: &Record<'_>) {
        let mut state = self.inner.lock().unwrap();
        let span = &mut state.spans[id.into_u64() as usize - 1];
        values.record(&mut Fields(&mut span.fields));
    }

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut captured = describe(event.metadata());
        event.record(&mut Fields(&mut captured.fields));
        self.inner.lock().unwrap().events.push(captured);
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// A request with a JSON body and a bearer token.
pub(crate) fn request(
    method: &str,
    uri: &str,
    body: &str,
    bearer: &str,
) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {bearer}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

type Reply = Result<http::Response<Full<Bytes>>, kling_core::error::BoxError>;

/// A client that answers every request with this status and envelope.
pub(crate) fn answering(
    status: u16,
    body: &'static str,
) -> impl tower::Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = kling_core::error::BoxError,
    Future = std::future::Ready<Reply>,
> + Clone {
    tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let response = http::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .map_err(Into::into);
        std::future::ready(response)
    })
}
