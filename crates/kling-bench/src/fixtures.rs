//! Realistic Kling traffic for the overhead runs: create and query requests, the envelopes a
//! real account answers them with, and an always-ready in-memory Kling.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName};
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body_util::Full;
use tower_service::Service;

/// The request type every layer takes.
pub type Req = Request<Full<Bytes>>;
/// The response type above the classify step.
pub type Res = Response<Full<Bytes>>;

/// Task ids in flight at once per driver task; a driver cycles through this many.
pub const LIVE: usize = 64;
/// Task ids in the table: 64 drivers × [`LIVE`].
pub const TASKS: usize = 64 * LIVE;

/// The header carrying the fixture index from the driver to [`EchoKling`] (so the in-memory
/// Kling answers a query about the task a create made without parsing anything). A constant
/// name, as a careful caller's would be: a name given as text is parsed and copied into a new
/// buffer on every insert, and the first copy a layer keeps of that buffer allocates.
pub const TASK_HEADER: HeaderName = HeaderName::from_static("x-bench-task");

/// A create body as a user sends it (no `external_task_id`: the stack adds one).
pub const CREATE_BODY: &str = r#"{"model_name":"kling-v2-master","prompt":"a red fox running through fresh snow at dawn","duration":"5","mode":"std"}"#;

fn task_id(index: usize) -> String {
    format!("8600000000000{index:05}")
}

/// The create answer for task `index`: 230 bytes, as Kling sends it.
pub fn create_envelope(index: usize) -> String {
    let id = task_id(index);
    format!(
        r#"{{"code":0,"message":"SUCCEED","request_id":"CjMkWmdH6zUAA-{index:05}","data":{{"task_id":"{id}","task_status":"submitted","task_info":{{"external_task_id":"job-{index:05}"}},"created_at":1722769557708,"updated_at":1722769557708}}}}"#
    )
}

/// The query answer for task `index`, ended with one video: 360 bytes.
pub fn query_envelope(index: usize) -> String {
    let id = task_id(index);
    format!(
        r#"{{"code":0,"message":"SUCCEED","request_id":"CjMkWmdH6zUAAAAAAJ9ucRxy-{index:05}","data":{{"task_id":"{id}","task_status":"succeed","task_result":{{"videos":[{{"id":"v{id}","url":"https://cdn.klingai.com/bs2/upload/{id}.mp4","duration":"5.1"}}]}},"final_unit_deduction":"1","created_at":1722769557708,"updated_at":1722769627708}}}}"#
    )
}

/// Pre-built pieces of every request and answer, shared by the drivers and the in-memory Kling.
#[derive(Debug)]
pub struct Fixtures {
    create_uri: Uri,
    query_uris: Vec<Uri>,
    indices: Vec<HeaderValue>,
    creates: Vec<Bytes>,
    queries: Vec<Bytes>,
    create_body: Bytes,
    json: HeaderValue,
}

impl Fixtures {
    /// Builds the tables.
    pub fn new() -> Arc<Fixtures> {
        Arc::new(Fixtures {
            create_uri: Uri::from_static("/v1/videos/text2video"),
            query_uris: (0..TASKS)
                .map(|i| {
                    format!("/v1/videos/text2video/{}", task_id(i))
                        .parse()
                        .expect("a valid uri")
                })
                .collect(),
            indices: (0..TASKS)
                .map(|i| HeaderValue::from_str(&format!("{i:05}")).expect("digits"))
                .collect(),
            creates: (0..TASKS)
                .map(|i| Bytes::from(create_envelope(i)))
                .collect(),
            queries: (0..TASKS).map(|i| Bytes::from(query_envelope(i))).collect(),
            create_body: Bytes::from_static(CREATE_BODY.as_bytes()),
            json: HeaderValue::from_static("application/json"),
        })
    }

    fn request(&self, method: Method, uri: &Uri, body: Bytes, index: usize) -> Req {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, self.json.clone());
        headers.insert(TASK_HEADER, self.indices[index].clone());
        request
    }

    /// A create of task `index` (a text-to-video, legacy endpoint).
    pub fn create(&self, index: usize) -> Req {
        self.request(
            Method::POST,
            &self.create_uri,
            self.create_body.clone(),
            index,
        )
    }

    /// A query of task `index`.
    pub fn query(&self, index: usize) -> Req {
        self.request(Method::GET, &self.query_uris[index], Bytes::new(), index)
    }
}

/// An always-ready in-memory Kling: answers a create with the 230-byte create envelope and a
/// query with the 360-byte "succeed" envelope of the task the driver named, unparsed (the
/// layers above read it).
///
/// # Clone
///
/// Clones share the fixtures.
#[derive(Clone, Debug)]
pub struct EchoKling {
    fixtures: Arc<Fixtures>,
}

impl EchoKling {
    /// An in-memory Kling over `fixtures`.
    pub fn new(fixtures: Arc<Fixtures>) -> Self {
        EchoKling { fixtures }
    }
}

fn index_of(request: &Req) -> usize {
    request.headers().get(TASK_HEADER).map_or(0, |v| {
        v.as_bytes()
            .iter()
            .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'))
    })
}

impl Service<Req> for EchoKling {
    type Response = Res;
    type Error = Infallible;
    type Future = Ready<Result<Res, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let index = index_of(&request);
        let body = if request.method() == Method::POST {
            self.fixtures.creates[index].clone()
        } else {
            self.fixtures.queries[index].clone()
        };
        let mut response = Response::new(Full::new(body));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, self.fixtures.json.clone());
        ready(Ok(response))
    }
}

/// [`EchoKling`] whose every answer comes after one wait: its future is pending once (and wakes
/// itself at once), as any real client's is while the request is on the wire. Layers that
/// arm a timer only when the call below waits (the per-attempt timeout) pay for it here.
#[derive(Clone, Debug)]
pub struct WaitingKling(pub EchoKling);

/// The answer [`WaitingKling`] gives after one wait.
#[derive(Debug)]
pub struct AfterOneWait {
    answer: Option<Result<Res, Infallible>>,
    waited: bool,
}

impl std::future::Future for AfterOneWait {
    type Output = Result<Res, Infallible>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.waited {
            self.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.answer.take().expect("polled after its answer"))
    }
}

impl Service<Req> for WaitingKling {
    type Response = Res;
    type Error = Infallible;
    type Future = AfterOneWait;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        AfterOneWait {
            answer: Some(self.0.call(request).into_inner()),
            waited: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_have_the_sizes_the_issue_names() {
        assert_eq!(create_envelope(7).len(), 230);
        assert_eq!(query_envelope(7).len(), 360);
    }
}
