//! A scripted stand-in for Kling, driven step by step, and small helpers.

use std::collections::{HashMap, VecDeque};
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_concurrency::{SlotsHandle, Snapshot};
use kling_core::error::{BoxError, NotSent, Transport};
use kling_core::{Pool, Product};
use serde_json::{Value, json};
use tower::Service;

/// What the next create is answered with instead of a new task.
#[derive(Clone, Debug)]
pub(crate) enum Scripted {
    /// An error envelope with this code at this HTTP status.
    Code(i64, u16),
    /// A client error after the request was sent.
    Lost,
    /// A client error before the request was sent.
    Refused,
    /// The task is created, but the answer is `5000` (a "ghost" create).
    Ghost,
    /// The task is created; the answer does not echo the create's external id.
    Unechoed,
}

#[derive(Default)]
struct FakeState {
    next_id: u32,
    /// id → (status, external id, legacy?)
    tasks: HashMap<String, (&'static str, Option<String>, bool)>,
    script: VecDeque<Scripted>,
    creates: u32,
    /// Lookups by external id list every task, as a server that ignores the filter would.
    ignores_filter: bool,
}

/// Answers every request at once: creates make `t1`, `t2`, … (`submitted`), queries report the
/// status the test set with [`Fake::finish`].
#[derive(Clone, Default)]
pub(crate) struct Fake {
    state: Arc<Mutex<FakeState>>,
}

impl Fake {
    pub(crate) fn new() -> Self {
        Fake::default()
    }

    /// Marks a task succeeded (what later queries report).
    pub(crate) fn finish(&self, id: &str) {
        self.state.lock().unwrap().tasks.get_mut(id).unwrap().0 = "succeeded";
    }

    /// The next create gets `answer` instead of a task.
    pub(crate) fn script(&self, answer: Scripted) {
        self.state.lock().unwrap().script.push_back(answer);
    }

    /// From now on, lookups by external id list every task, whatever ids they ask for.
    pub(crate) fn ignore_filters(&self) {
        self.state.lock().unwrap().ignores_filter = true;
    }

    /// Creates that reached the server.
    pub(crate) fn creates(&self) -> u32 {
        self.state.lock().unwrap().creates
    }

    fn task_json(id: &str, status: &str, external: Option<&String>, legacy: bool) -> Value {
        if legacy {
            let status = if status == "succeeded" {
                "succeed"
            } else {
                status
            };
            let mut info = json!({});
            if let Some(ext) = external {
                info["external_task_id"] = json!(ext);
            }
            json!({"task_id": id, "task_status": status, "task_info": info})
        } else {
            let mut task = json!({"id": id, "status": status});
            if let Some(ext) = external {
                task["external_id"] = json!(ext);
            }
            task
        }
    }

    fn answer(&self, req: &Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, BoxError> {
        let mut state = self.state.lock().unwrap();
        let path = req.uri().path().to_owned();
        let legacy = path.starts_with("/v1/");
        let data = if req.method() == Method::POST && path != "/tasks" {
            state.creates += 1;
            let ghost = matches!(state.script.front(), Some(Scripted::Ghost));
            let unechoed = matches!(state.script.front(), Some(Scripted::Unechoed));
            if let Some(answer) = state.script.pop_front().filter(|_| !ghost && !unechoed) {
                return match answer {
                    Scripted::Code(code, status) => Ok(envelope(status, code, &Value::Null)),
                    Scripted::Lost => Err(Box::new(Transport::after_sent("connection reset"))),
                    Scripted::Refused => Err(Box::new(Transport::new(NotSent::new("refused")))),
                    Scripted::Ghost | Scripted::Unechoed => unreachable!("filtered above"),
                };
            }
            let body: Value = serde_json::from_slice(&kling_core::PeekBody::peek_bytes(req.body()))
                .unwrap_or(Value::Null);
            let external = body["external_task_id"]
                .as_str()
                .or(body["external_id"].as_str())
                .map(str::to_owned);
            state.next_id += 1;
            let id = format!("t{}", state.next_id);
            state
                .tasks
                .insert(id.clone(), ("submitted", external.clone(), legacy));
            if ghost {
                return Ok(envelope(500, 5000, &Value::Null));
            }
            let echoed = external.as_ref().filter(|_| !unechoed);
            Fake::task_json(&id, "submitted", echoed, legacy)
        } else if path == "/tasks" {
            let query = req.uri().query().unwrap_or("");
            let tasks: Vec<Value> = if state.ignores_filter {
                state
                    .tasks
                    .iter()
                    .map(|(id, (status, ext, _))| Fake::task_json(id, status, ext.as_ref(), false))
                    .collect()
            } else if let Some(exts) = query.strip_prefix("external_task_ids=") {
                exts.split(',')
                    .filter_map(|ext| {
                        let (id, (status, ext, _)) = state
                            .tasks
                            .iter()
                            .find(|(_, (_, e, _))| e.as_deref() == Some(ext))?;
                        Some(Fake::task_json(id, status, ext.as_ref(), false))
                    })
                    .collect()
            } else {
                let ids = query.strip_prefix("task_ids=").unwrap_or("");
                ids.split(',')
                    .filter_map(|id| {
                        let (status, ext, _) = state.tasks.get(id)?;
                        Some(Fake::task_json(id, status, ext.as_ref(), false))
                    })
                    .collect()
            };
            Value::Array(tasks)
        } else {
            let id = path.rsplit('/').next().unwrap_or("");
            // A legacy query names a task id or an external id.
            let found = state.tasks.get_key_value(id).or_else(|| {
                state
                    .tasks
                    .iter()
                    .find(|(_, (_, ext, _))| ext.as_deref() == Some(id))
            });
            match found {
                Some((id, (status, ext, _))) => Fake::task_json(id, status, ext.as_ref(), true),
                None => return Ok(envelope(404, 1203, &Value::Null)),
            }
        };
        Ok(envelope(200, 0, &data))
    }
}

/// A Kling envelope response.
pub(crate) fn envelope(status: u16, code: i64, data: &Value) -> Response<Full<Bytes>> {
    let message = if code == 0 { "SUCCEED" } else { "refused" };
    let body = json!({"code": code, "message": message, "request_id": "req-1", "data": data});
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

impl Service<Request<Full<Bytes>>> for Fake {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Ready<Result<Response<Full<Bytes>>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        ready(self.answer(&req))
    }
}

/// A legacy video create.
pub(crate) fn create() -> Request<Full<Bytes>> {
    post("/v1/videos/text2video", r#"{"prompt":"a cat"}"#)
}

/// A legacy video create with an external id.
pub(crate) fn create_with_external(external: &str) -> Request<Full<Bytes>> {
    post(
        "/v1/videos/text2video",
        &format!(r#"{{"prompt":"a cat","external_task_id":"{external}"}}"#),
    )
}

/// A POST with a JSON body.
pub(crate) fn post(path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// A GET.
pub(crate) fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

pub(crate) fn video() -> Pool {
    Pool::new(Product::Video)
}

/// The snapshot of one pool of the default account: (in use, believed capacity, waiters).
pub(crate) async fn pool_state<B: kling_concurrency::backend::SlotBackend>(
    handle: &SlotsHandle<B>,
    pool: &Pool,
) -> (u32, u32, usize) {
    let snapshot: Snapshot = handle.snapshot().await.unwrap();
    let p = snapshot
        .get(handle.default_account(), pool)
        .expect("pool used");
    (p.in_use, p.capacity, p.waiters)
}
