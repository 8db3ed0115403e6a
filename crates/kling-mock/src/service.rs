//! [`MockKling`]: the mock as an in-process `tower_service::Service`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use serde_json::Value;
use tokio::time::Instant;

use crate::auth::{Accepts, authenticate};
use crate::callbacks::{self, HttpClient};
use crate::config::{ConfigError, MAX_WAIT, MockConfig, Switches};
use crate::error::MockError;
use crate::faults::Fault;
use crate::routes::{self, Route};
use crate::state::{State, SwitchesRefused};
use crate::stats::Stats;
use crate::task::Clock;

/// State shared by every clone of a [`MockKling`] and its callback tasks.
pub(crate) struct Shared {
    pub(crate) config: MockConfig,
    pub(crate) clock: Clock,
    state: Mutex<State>,
    pub(crate) client: OnceLock<HttpClient>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Locks the state; a panic elsewhere never poisons the mock for good.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request body as the mock sees it.
#[derive(Debug)]
pub(crate) enum Body {
    /// Read whole, within [`MockConfig::max_body_bytes`].
    Read(Bytes),
    /// Over the bound (the server stops reading it there).
    TooLarge,
}

/// A request carried out: its fault, and the answer it got.
#[derive(Debug)]
struct Carried {
    fault: Fault,
    resp: Response<Full<Bytes>>,
    /// The answer's code when the fault held it back from being counted by it
    /// ([`State::holding_answer`]).
    code: Option<u32>,
    /// A slow answer's 1102: its account and when it was built ([`State::held_1102`]), for the
    /// client to be counted as having seen it when it is sent.
    late_1102: Option<(String, Instant)>,
}

/// The future returned by [`MockKling`]'s `call`.
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, MockError>> + Send + 'static>>;

/// The Kling API, in process.
///
/// Answers `http::Request<Full<Bytes>>` exactly as the TCP server does (the server calls it), with
/// all time taken from `tokio::time`, so under `#[tokio::test(start_paused = true)]` an hour of
/// traffic runs in milliseconds.
///
/// # Clone
///
/// Clones share one state: tasks, limits, counters. Cloning never creates a second account.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use kling_mock::{MockConfig, MockKling};
/// use tower_service::Service;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut mock = MockKling::new(MockConfig::default()).unwrap();
/// let req = http::Request::post("/v1/videos/text2video")
///     .header("authorization", "Bearer my-key")
///     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))
///     .unwrap();
/// let resp = mock.call(req).await.unwrap();
/// let body = resp.into_body().collect().await.unwrap().to_bytes();
/// let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
/// assert_eq!(json["code"], 0);
/// assert_eq!(json["data"]["task_status"], "submitted");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MockKling {
    shared: Arc<Shared>,
}

impl MockKling {
    /// A mock with this configuration; the clock starts now (call it inside the runtime whose
    /// time the tests control).
    pub fn new(config: MockConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let clock = Clock::new();
        Ok(MockKling {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new(config.clone(), clock)),
                config,
                clock,
                client: OnceLock::new(),
            }),
        })
    }

    /// The configuration the mock was built with.
    pub fn config(&self) -> &MockConfig {
        &self.shared.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().snapshot(Instant::now())
    }

    /// Zeroes the counters (tasks, limits and credits are kept).
    pub fn reset_stats(&self) {
        self.shared.lock().reset_stats(Instant::now());
    }

    /// The mock-wide account-state switches now in force (not those set for one account).
    pub fn switches(&self) -> Switches {
        self.shared.lock().switches
    }

    /// Replaces the mock-wide switches (1100 / 1101 / 1304 / 1302 for every request of every
    /// account while on).
    pub fn set_switches(&self, switches: Switches) {
        self.shared.lock().switches = switches;
    }

    /// The switches set for one account with [`MockKling::set_account_switches`] (all off
    /// unless set; the mock-wide ones are not included).
    pub fn account_switches(&self, account: &str) -> Switches {
        self.shared
            .lock()
            .accounts
            .get(account)
            .map(|a| a.switches)
            .unwrap_or_default()
    }

    /// Replaces one account's own switches: its requests get 1100 / 1101 / 1304 / 1302 while
    /// one is on (here or mock-wide), other accounts' are untouched, as Kling's account states
    /// are each account's own. Makes the account if the mock holds none yet (unbounded: for a
    /// test's own few names; `POST /__mock/switches` keeps within what requests could make).
    pub fn set_account_switches(&self, account: &str, switches: Switches) {
        self.shared.lock().account(account).switches = switches;
    }

    /// Holds `slots` of `pool` in `account` for `duration` of API time (divided by the speed), as
    /// if another tenant of the account had created tasks.
    pub fn occupy(&self, account: &str, pool: &str, slots: u32, duration: Duration) {
        let now = Instant::now();
        let until = now + self.shared.config.scaled(duration).min(MAX_WAIT);
        self.shared.lock().occupy(account, pool, slots, until, now);
    }

    /// Slots of `pool` the account holds now (its tasks plus occupations).
    pub fn in_use(&self, account: &str, pool: &str) -> u32 {
        let mut state = self.shared.lock();
        state.settle(account, Instant::now());
        state.in_use(account, pool)
    }

    /// Credits the account has left (`None` when credits are unlimited).
    pub fn remaining_credits(&self, account: &str) -> Option<f64> {
        let mut state = self.shared.lock();
        state.settle(account, Instant::now());
        state.remaining(account)
    }

    /// Answers one request; the body of the TCP server and of the `Service` impl.
    pub(crate) async fn handle(
        self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Full<Bytes>>, MockError> {
        let (parts, body) = req.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body = if body.len() > self.shared.config.max_body_bytes {
            Body::TooLarge
        } else {
            Body::Read(body)
        };
        self.answer(parts, body).await
    }

    /// Answers one request whose body is read, or known to be over the bound: both paths (the
    /// server stops reading at the bound) draw and count faults the same way.
    pub(crate) async fn answer(
        self,
        parts: http::request::Parts,
        body: Body,
    ) -> Result<Response<Full<Bytes>>, MockError> {
        let path = parts.uri.path().to_owned();
        if let Some(control) = path.strip_prefix("/__mock/") {
            return Ok(match body {
                Body::Read(body) => self.control(&parts.method, control, &body),
                // Not counted, as no control request is.
                Body::TooLarge => {
                    let mut resp = Response::new(Full::new(Bytes::from(
                        serde_json::json!({"code": 1200, "message": "request body too large"})
                            .to_string(),
                    )));
                    *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    resp
                }
            });
        }
        let body = match body {
            Body::Read(body) => Some(body),
            Body::TooLarge => None,
        };
        // Carried out now, whatever the fault does to the answer: a client that goes away
        // before it (a timeout; hyper drops this future when the socket closes) undoes nothing.
        let Carried {
            fault,
            resp,
            code,
            late_1102,
        } = self.carry_out(&parts, &path, body.as_ref())?;
        match fault {
            Fault::LostAnswer => Err(MockError::dropped()),
            Fault::Malformed => Ok(garble(resp).await),
            Fault::Slow(delay) => {
                // Only the answer waits; it is counted by its code when it goes out, and not
                // at all if the client has gone away by then (this future is dropped). An 1102
                // is seen by the client then too, not when it was built.
                tokio::time::sleep(delay).await;
                if code.is_some() || late_1102.is_some() {
                    let mut state = self.shared.lock();
                    if let Some(code) = code {
                        state.count_sent(code);
                    }
                    if let Some((account, built)) = late_1102 {
                        state.saw_late_1102(&account, built, Instant::now());
                    }
                }
                Ok(resp)
            }
            Fault::None | Fault::Drop | Fault::ServerError(_) => Ok(resp),
        }
    }

    /// Draws the fault of one request and carries the request out, under one lock, as it
    /// arrives: whatever the fault then does to the answer (loses it, garbles it, sends it
    /// late), the request has had its effect, as on a real server. `Err`: the drop fault (the
    /// request lost on its way, nothing done).
    fn carry_out(
        &self,
        parts: &http::request::Parts,
        path: &str,
        body: Option<&Bytes>,
    ) -> Result<Carried, MockError> {
        let mut state = self.shared.lock();
        state.stats.requests_total += 1;
        let fault = state.draw_fault();
        // A refusal is an answer too, and is lost, garbled or late like any other: every
        // request that draws one of those faults meets it, so its configured rate is the rate
        // clients see. Such an answer is not counted by its code as it is built. Both fields
        // are set on every request, so a panic while an answer was held leaves no later one
        // uncounted.
        state.holding_answer =
            matches!(fault, Fault::LostAnswer | Fault::Malformed | Fault::Slow(_));
        state.held_code = None;
        state.held_1102 = None;
        match fault {
            Fault::Drop => {
                state.stats.connections_dropped += 1;
                return Err(MockError::dropped());
            }
            Fault::ServerError(code) => {
                let msg = match code {
                    5001 => "service temporarily unavailable",
                    5002 => "internal timeout",
                    _ => "internal error",
                };
                return Ok(Carried {
                    fault,
                    resp: state.error(code, msg, Instant::now(), None),
                    code: None,
                    late_1102: None,
                });
            }
            Fault::None | Fault::LostAnswer | Fault::Slow(_) | Fault::Malformed => {}
        }

        let (resp, job) = 'answer: {
            let now = Instant::now();
            let Some(body) = body else {
                break 'answer (state.error(1200, "request body too large", now, None), None);
            };
            let route = routes::parse(&parts.method, path);
            let auth = parts
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            let accepts = if route.as_ref().is_some_and(Route::is_new_style) {
                Accepts::KeyOnly
            } else {
                Accepts::KeyOrJwt
            };
            let account = match authenticate(&self.shared.config, auth, accepts) {
                Ok(account) => account,
                Err((code, msg)) => break 'answer (state.error(code, msg, now, None), None),
            };
            if state.admit(&account, now).is_err() {
                let msg = format!(
                    "mock open-mode account limit reached: {} accounts, none idle; retry later",
                    self.shared.config.max_open_accounts
                );
                break 'answer (state.error(5001, &msg, now, None), None);
            }
            let switches = state.switches_for(&account);
            let refused = if switches.abnormal {
                Some((1100, "account abnormal"))
            } else if switches.arrears {
                Some((1101, "account in arrears"))
            } else if switches.ip_denied {
                Some((1304, "ip whitelist policy"))
            } else {
                None
            };
            if let Some((code, msg)) = refused {
                break 'answer (state.error(code, msg, now, None), None);
            }
            if route.as_ref().is_some_and(Route::is_create) {
                // Counted from the first 1102 the client could read (sent as built, or a slow
                // one when it went out; never a lost or garbled one), not from the latch: a
                // create sent before any 1102 reached the client is not one after it. Creates
                // already on their way when it went out are not counted either: 100 ms of API
                // time, but at least 20 ms of real time, as that part is network time (at 100×
                // the scaled 1 ms is less than a loaded machine's round trip).
                let grace = Duration::from_millis(20)
                    .max(self.shared.config.scaled(Duration::from_millis(100)));
                if state
                    .seen_1102(&account, now)
                    .is_some_and(|first| now > first + grace)
                {
                    state.stats.creates_after_1102 += 1;
                }
            }
            let costs = matches!(route, Some(Route::AccountCosts));
            if switches.throttled {
                // Whatever the pace: the rate limit's state is not touched. The wait is one
                // interval, or the time until the rate check would let the request in when
                // longer (a lockout a 1302 started, a penalty-pushed limit): a client that
                // waits as told is not refused by them next.
                let wait = self
                    .shared
                    .config
                    .rate_limit
                    .map_or(self.shared.config.scaled(Duration::from_secs(1)), |limit| {
                        self.shared.config.scaled_secs(60.0 / limit.per_minute)
                    })
                    .max(state.admission_wait(&account, costs, now));
                break 'answer (
                    state.error(1302, "request rate over limit", now, Some(wait)),
                    None,
                );
            }
            if let Err(wait) = state.rate_check(&account, costs, now) {
                break 'answer (
                    state.error(1302, "request rate over limit", now, Some(wait)),
                    None,
                );
            }
            let Some(route) = route else {
                break 'answer (state.error(1202, "wrong method or path", now, None), None);
            };
            state.dispatch(&account, &route, parts.uri.query(), body, now)
        };
        state.holding_answer = false;
        let code = state.held_code.take();
        // Only a slow answer is ever read: a lost or garbled 1102 is never seen.
        let late_1102 = state
            .held_1102
            .take()
            .filter(|_| matches!(fault, Fault::Slow(_)));
        // Counted under the lock the request was carried out under, not by its code: a lost
        // answer is never sent, a garbled one carries no code a client can read.
        match fault {
            Fault::LostAnswer => state.stats.answers_lost += 1,
            Fault::Malformed => state.stats.malformed_responses += 1,
            _ => {}
        }
        drop(state);
        if let Some(job) = job {
            callbacks::spawn(self.shared.clone(), job);
        }
        Ok(Carried {
            fault,
            resp,
            code,
            late_1102,
        })
    }

    /// `/__mock/...`: stats and runtime control, without auth, limits or faults.
    fn control(&self, method: &Method, path: &str, body: &Bytes) -> Response<Full<Bytes>> {
        let json = |value: Value| {
            let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        };
        let stats_json = |stats: Stats| serde_json::to_value(stats).unwrap_or(Value::Null);
        match (method, path) {
            (&Method::GET, "stats") => json(stats_json(self.stats())),
            (&Method::GET, file) if file.starts_with("files/") => {
                let name = &file["files/".len()..];
                if !self.shared.lock().serves_file(name, Instant::now()) {
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"not found")));
                    *resp.status_mut() = http::StatusCode::NOT_FOUND;
                    return resp;
                }
                let mut resp = Response::new(Full::new(crate::file_bytes(name)));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/octet-stream"),
                );
                resp
            }
            (&Method::POST, "reset-stats") => {
                self.reset_stats();
                json(stats_json(self.stats()))
            }
            (&Method::POST, "switches") => {
                let v: Value = match switches_request(body) {
                    Ok(v) => v,
                    // Refused, naming what was wrong, and nothing changed: read as all off,
                    // a misspelt switch turned every switch off without a word.
                    Err(message) => {
                        let mut resp = json(serde_json::json!({"code": 1201, "message": message}));
                        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                        return resp;
                    }
                };
                let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
                let switches = Switches::new()
                    .abnormal(flag("abnormal"))
                    .arrears(flag("arrears"))
                    .ip_denied(flag("ip_denied"))
                    .throttled(flag("throttled"));
                let mut answer = serde_json::json!({
                    "abnormal": switches.abnormal,
                    "arrears": switches.arrears,
                    "ip_denied": switches.ip_denied,
                    "throttled": switches.throttled,
                });
                // With `"account"`, that account's own switches; without, the mock-wide ones.
                match v.get("account").and_then(Value::as_str) {
                    Some(account) => {
                        let set =
                            self.shared
                                .lock()
                                .set_switches_of(account, switches, Instant::now());
                        let refused = match set {
                            Ok(()) => None,
                            Err(SwitchesRefused::UnknownAccount) => Some((
                                http::StatusCode::BAD_REQUEST,
                                1201,
                                "no configured key is of that account".to_owned(),
                            )),
                            Err(SwitchesRefused::NoRoom) => Some((
                                http::StatusCode::SERVICE_UNAVAILABLE,
                                5001,
                                format!(
                                    "mock open-mode account limit reached: {} accounts, none \
                                     idle; retry later",
                                    self.shared.config.max_open_accounts
                                ),
                            )),
                        };
                        // Nothing set, and no account made: a name per request grew the
                        // accounts without bound.
                        if let Some((status, code, message)) = refused {
                            let mut resp =
                                json(serde_json::json!({"code": code, "message": message}));
                            *resp.status_mut() = status;
                            return resp;
                        }
                        answer["account"] = Value::String(account.to_owned());
                    }
                    None => self.set_switches(switches),
                }
                json(answer)
            }
            _ => {
                let mut resp = json(
                    serde_json::json!({"code": 1202, "message": "unknown mock control endpoint"}),
                );
                *resp.status_mut() = http::StatusCode::NOT_FOUND;
                resp
            }
        }
    }
}

/// The `malformed_rate` fault's answer: the answer the request really got (status and headers
/// kept) with its body cut to its first half, so never JSON (every answer's body is one JSON
/// object, whose proper prefixes are not JSON).
async fn garble(resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let (parts, body) = resp.into_parts();
    // A `Full` is ready at once, and cannot fail.
    let Ok(whole) = http_body_util::BodyExt::collect(body).await;
    let whole = whole.to_bytes();
    Response::from_parts(parts, Full::new(whole.slice(..whole.len() / 2)))
}

/// The switches a `POST /__mock/switches` names: a JSON object of booleans `abnormal`,
/// `arrears`, `ip_denied`, `throttled` (absent = off) and an optional string `account` (null
/// = absent); else what is wrong with it.
fn switches_request(body: &Bytes) -> Result<Value, String> {
    const SWITCHES: [&str; 4] = ["abnormal", "arrears", "ip_denied", "throttled"];
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return Err("the body must be a JSON object of switches".to_owned());
    };
    for (key, value) in &map {
        let ok = match key.as_str() {
            "account" => value.is_string() || value.is_null(),
            k if SWITCHES.contains(&k) => value.is_boolean(),
            _ => {
                return Err(format!(
                    "unknown switch `{key}` (expected abnormal, arrears, ip_denied, throttled \
                     or account)"
                ));
            }
        };
        if !ok {
            let want = if key == "account" {
                "a string"
            } else {
                "true or false"
            };
            return Err(format!("`{key}` must be {want}"));
        }
    }
    Ok(Value::Object(map))
}

impl tower_service::Service<Request<Full<Bytes>>> for MockKling {
    type Response = Response<Full<Bytes>>;
    type Error = MockError;
    type Future = ResponseFuture;

    /// Always ready: the mock refuses with Kling codes, it never applies backpressure.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        Box::pin(self.clone().handle(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-running open-mode mock fed a fresh token per request keeps at most
    /// `max_open_accounts` accounts (it kept one per token, for good).
    #[tokio::test(start_paused = true)]
    async fn open_mode_accounts_stay_within_the_cap_however_many_tokens() {
        let mut mock = MockKling::new(MockConfig::default().max_open_accounts(10)).unwrap();
        for i in 0..1000 {
            let req = Request::get("/v1/videos/text2video")
                .header("authorization", format!("Bearer token-{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = tower_service::Service::call(&mut mock, req).await.unwrap();
            assert_eq!(resp.status(), 200, "token {i}");
            // Past the Pro rate interval, so the account just used is at rest.
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let state = mock.shared.lock();
        assert_eq!(state.accounts.len(), 10);
        assert_eq!(state.seen.len(), 10);
    }

    /// A mock run over four retention windows keeps one window of tasks: the store, the expiry
    /// queue, the account's list and its external ids (it kept every task for good).
    #[tokio::test(start_paused = true)]
    async fn the_tasks_kept_stay_within_one_retention_window() {
        let config = MockConfig::default()
            .no_rate_limit()
            .task_duration(Duration::from_secs(100), Duration::from_secs(100));
        let mut mock = MockKling::new(config).unwrap();
        // Four tasks every 6 hours for 120 days; a window (30 days and a task's 100 s) holds
        // 121 rounds of them.
        let mut most = 0;
        for round in 0..480 {
            for (path, ext) in [
                ("/v1/videos/text2video", "external_task_id"),
                ("/v1/images/generations", "external_task_id"),
                ("/text-to-video/kling-3.0", "external_id"),
                ("/text-to-image/kling-3.0", "external_id"),
            ] {
                let req = Request::post(path)
                    .header("authorization", "Bearer key")
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"prompt":"x","{ext}":"{path}-{round}"}}"#
                    ))))
                    .unwrap();
                let resp = tower_service::Service::call(&mut mock, req).await.unwrap();
                assert_eq!(resp.status(), 200, "{path}");
            }
            {
                let state = mock.shared.lock();
                let acct = &state.accounts["key"];
                let kept = state.tasks.len();
                assert_eq!(state.expiry.len(), kept);
                assert_eq!(acct.tasks.len(), kept);
                assert_eq!(acct.external.len(), kept);
                most = most.max(kept);
            }
            tokio::time::advance(Duration::from_secs(6 * 3600)).await;
        }
        assert_eq!(most, 4 * 121);
        assert_eq!(mock.stats().tasks_created, 4 * 480);
    }
}
