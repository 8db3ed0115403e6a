//! Goodput in paused time against the in-process `kling_mock::MockKling` (no sockets: hours
//! of traffic take seconds): jobs that create a task and poll it to its end, through the
//! kling-tower stack and through tower's own layers with a simple 429 retry, on the same mock.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::{BoxError, ClassifyLayer, Outcome, retry_after_delay};
use kling_mock::{MockConfig, MockKling, Preset, RetryAfterMode, Switches};
use kling_ratelimit::{Adaptive, GcraLayer, Quota};
use kling_retry::{Recovered, RetryLayer};
use kling_tower::{Credentials, KlingLayer, ServiceBuilderExt, StackConfig, Tier};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::fixtures::{CREATE_BODY, Req, Res};
use crate::tower_client::{SimpleRetry, tower_stack_buffered_with};

/// The account presets compared.
pub const PRESETS: [Preset; 4] = [
    Preset::Free,
    Preset::Standard,
    Preset::Pro,
    Preset::Enterprise,
];

/// A workload and the server it meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scenario {
    /// The preset's limits, known to the client.
    Plain,
    /// 3% of requests answered 5xx, 3% of creates answered 5000 although the task was created
    /// (and billed), 1% of connections dropped before the server saw the request, and 1% of
    /// answers lost after it carried the request out (a create's task made and billed).
    Faults,
    /// Credits run out mid-run (the client is not told the budget): 1102 for every later
    /// create. The budget is 66% of the run's jobs at one credit each, on every preset (Free's
    /// own 66 a day at the published size).
    Credits,
    /// The client's rate is set 50% too high (kling-tower runs in adaptive mode under it);
    /// 1302s carry `Retry-After: <seconds>`, and a 1302 locks the account out for
    /// [`RATE_LOCKOUT`] (every request refused, the header naming the time left).
    RetryAfterSeconds,
    /// As [`Scenario::RetryAfterSeconds`], with an HTTP-date `Retry-After` and a `Date` header.
    RetryAfterDate,
    /// The client's rate is set 50% too high (kling-tower runs in adaptive mode under it) and
    /// the server pushes its window one interval further on every early request.
    Penalty,
    /// Every job polls once a second: together far faster than the rate allows.
    PollFast,
    /// The client does not know the rate: adaptive mode from a ceiling of 4x the real rate.
    Adaptive,
    /// The client does not know the slots: it is told twice the real count (Kling's slot
    /// counts are unconfirmed), so it meets the server's 1303s and must give its extra slots
    /// up.
    UnknownSlots,
    /// The client is told a rate 1.5 times the account's (a preset on an account with a lower
    /// real limit, or a `rate_per_minute` set too high), with nothing else unusual: kling-tower
    /// runs its stack as configured, with its adaptive rate ([`Client::Kling`], the default
    /// under a rate cap) and without it ([`Client::KlingFixedRate`], this cell's negative
    /// control).
    RateTold1_5,
    /// The limits known, and an outage: from [`OUTAGE_START`] into the run, for [`OUTAGE`], the
    /// server answers every request 1302 whatever its pace (kling-mock's `Switches::throttled`:
    /// an overload or a burst lockout; no `Retry-After`, as Kling documents none), then
    /// behaves normally again. A client must come back to the rate it was told once the
    /// refusals end, rather than keep a rate the 1302s took down (kling-tower runs its
    /// adaptive rate there, the default under a rate cap). The bound counts the outage
    /// ([`Run::outage`]).
    Outage,
}

/// When [`Scenario::Outage`]'s outage begins, from the start of the run.
pub const OUTAGE_START: Duration = Duration::from_secs(30 * 60);

/// How long [`Scenario::Outage`]'s outage lasts.
pub const OUTAGE: Duration = Duration::from_secs(20 * 60);

impl Scenario {
    /// Every scenario, in table order.
    pub const ALL: [Scenario; 11] = [
        Scenario::Plain,
        Scenario::Faults,
        Scenario::Credits,
        Scenario::RetryAfterSeconds,
        Scenario::RetryAfterDate,
        Scenario::Penalty,
        Scenario::PollFast,
        Scenario::Adaptive,
        Scenario::UnknownSlots,
        Scenario::RateTold1_5,
        Scenario::Outage,
    ];

    /// The clients [`run`] runs in it: kling-tower's stack with its adaptive rate off too in
    /// [`Scenario::RateTold1_5`].
    pub fn clients(self) -> &'static [Client] {
        match self {
            Scenario::RateTold1_5 => &[Client::Kling, Client::KlingFixedRate, Client::Tower],
            _ => &[Client::Kling, Client::Tower],
        }
    }

    /// Its name in the tables.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Plain => "plain",
            Scenario::Faults => "faults",
            Scenario::Credits => "credits run out",
            Scenario::RetryAfterSeconds => "Retry-After seconds",
            Scenario::RetryAfterDate => "Retry-After date",
            Scenario::Penalty => "penalty window",
            Scenario::PollFast => "poll every 1 s",
            Scenario::Adaptive => "unknown rate (adaptive)",
            Scenario::UnknownSlots => "unknown slots (told 2x)",
            Scenario::RateTold1_5 => "rate told 1.5x",
            Scenario::Outage => "outage (1302 for 20 min)",
        }
    }

    /// Whether the client is told the real limits (rate and slots).
    pub fn limits_known(self) -> bool {
        matches!(
            self,
            Scenario::Plain
                | Scenario::Faults
                | Scenario::Credits
                | Scenario::PollFast
                | Scenario::Outage
        )
    }

    /// Whether the server refuses only a client that does not keep to the limits it knows:
    /// where the target is 429s on under 1% of the requests ([`refusal_claims`]). Not in
    /// [`Scenario::Outage`], whose server refuses every request for a while whatever the
    /// client does.
    pub fn refusals_are_the_clients(self) -> bool {
        self.limits_known() && self != Scenario::Outage
    }

    fn applies_to(self, preset: Preset) -> bool {
        let rated = preset.rate_limit().is_some();
        match self {
            Scenario::RetryAfterSeconds
            | Scenario::RetryAfterDate
            | Scenario::Penalty
            | Scenario::PollFast
            | Scenario::Adaptive
            | Scenario::RateTold1_5
            | Scenario::Outage => rated,
            Scenario::Plain | Scenario::Faults | Scenario::Credits | Scenario::UnknownSlots => true,
        }
    }
}

/// Which client ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// kling-tower's stack: `KlingLayer` at the preset where the rate is known (with twice the
    /// slots in [`Scenario::UnknownSlots`]); where it is not, retry + task slots + adaptive
    /// GCRA + auth + classify composed by hand.
    Kling,
    /// kling-tower's `KlingLayer` as [`Client::Kling`], with its adaptive rate turned off
    /// (`StackConfig::adaptive_rate(false)`): the negative control of
    /// [`Scenario::RateTold1_5`], the only scenario that runs it.
    KlingFixedRate,
    /// tower's `Retry` (simple 429/5xx retry, 10 attempts, 1 s apart) over `Buffer` +
    /// `ConcurrencyLimit` + `RateLimit` at the preset's numbers, jobs gated by a semaphore of
    /// the slot count.
    Tower,
    /// The negative control: the same jobs with no limiter and no retry at all
    /// (`ClassifyLayer` over the mock, nothing gating the jobs), on the same mock settings.
    /// Not one of [`run`]'s clients; [`controls`] runs it where the table claims that nothing
    /// was refused, to show that the server there refuses a client that does not keep to its
    /// limits (the runner prints those rows after the others, as "bare (control)").
    Bare,
}

impl Client {
    /// Its name in the tables.
    pub fn name(self) -> &'static str {
        match self {
            Client::Kling => "kling-tower",
            Client::KlingFixedRate => "kling-tower, adaptive rate off",
            Client::Tower => "tower",
            Client::Bare => "bare (control)",
        }
    }
}

/// How big the runs are.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Jobs per slot of the preset (the run has `slots × waves` jobs).
    pub waves: usize,
    /// Seconds between a job's queries (except [`Scenario::PollFast`]).
    pub query_interval: Duration,
}

impl Options {
    /// The published configuration.
    pub fn full() -> Self {
        Options {
            waves: 100,
            query_interval: Duration::from_secs(10),
        }
    }

    /// A smoke test.
    pub fn tiny() -> Self {
        Options {
            waves: 3,
            query_interval: Duration::from_secs(10),
        }
    }
}

/// One run's figures.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// The preset.
    pub preset: String,
    /// The scenario.
    pub scenario: String,
    /// The client.
    pub client: String,
    /// Whether the client knew the limits.
    pub limits_known: bool,
    /// Jobs started.
    pub jobs: usize,
    /// Jobs the account's credits pay for: all of them but in [`Scenario::Credits`], where the
    /// budget covers 66% ([`credit_budget`]). Only the others may end refused: a job refused
    /// while the credits still paid for it was refused by the client, not the server.
    pub paid: usize,
    /// Jobs whose task ended (succeeded or failed on the server).
    pub completed: usize,
    /// Jobs refused for good by the server (1102 and other fatal codes): not a give-up.
    pub refused: usize,
    /// Jobs the client gave up on (retries exhausted, deadline).
    pub lost: usize,
    /// First job start to last job end, seconds.
    pub makespan: f64,
    /// A lower bound on the makespan from the limits, the query interval and the lives of the
    /// tasks of the jobs that completed (refused and lost jobs are not counted), seconds: the
    /// larger of the slots' bound (each task's life rounded up to the next poll, plus one rate
    /// interval before a slot's next create, over the slots) and the rate's (the requests
    /// those jobs need, less the first, over the rate). In [`Scenario::PollFast`] the rate's
    /// bound counts one poll per job, the least any client sends: see
    /// [`Run::judged_by_efficiency`]. With an outage ([`Run::outage`]), no request succeeds
    /// during it: the rate's bound grows by the outage less one rate interval (the gap across
    /// it replaces one interval), and each slot's by the outage less the longest time one
    /// completed task counts for (the task a slot held when the outage began may run through
    /// part of it, but no poll sees its end and no create starts another before it is over).
    pub bound: f64,
    /// How long the server refused every request whatever the pace ([`Scenario::Outage`]),
    /// seconds; 0 elsewhere, and in a run that ended before the outage did. Counted in
    /// [`Run::bound`], so the efficiency judges what the client lost around the outage (the
    /// pauses that outlast it, a rate slow to come back), not the outage itself.
    pub outage: f64,
    /// The server's request rate, per second (`None`: no rate cap).
    pub rate_per_s: Option<f64>,
    /// Requests the server received.
    pub requests: u64,
    /// HTTP 429 answers by code.
    pub rejections: BTreeMap<String, u64>,
    /// Creates sent to the server after its first 1102 had reached the client (the run has
    /// one account), counted by a wrapper of the mock where the jobs reach it. Creates only:
    /// the queries of tasks still running must go on after a 1102. In process nothing is on
    /// its way, so no grace: `kling_mock::Stats::creates_after_1102`, which allows 100 ms of
    /// API time for the network, would not see a stack that halts its creates late by less.
    pub after_1102: u64,
    /// Answers that carried a `Retry-After` (kling-mock gives one on a 1302 and a 1303 in the
    /// Retry-After scenarios only).
    pub retry_afters: u64,
    /// Requests sent before a `Retry-After` they fall under had passed, counted where the jobs
    /// reach the mock (in process nothing is on its way): after a 1302's, any request before
    /// the furthest instant one named (the server's rate counts every request of the account);
    /// after a 1303's, creates only (its slots refuse no query). Read as a client reads it:
    /// from the answer's arrival, an HTTP-date against the answer's `Date`.
    pub early: u64,
    /// The longest wait a `Retry-After` asked for, read as [`Run::early`] reads it, seconds (0
    /// without one). A client that keeps to a pace whose interval is at least this long sends
    /// no early request whether it reads the header or not: such a cell cannot tell the two
    /// apart.
    pub longest_retry_after: f64,
    /// Tasks the server created beyond one per job that ended on a task of its own (billed
    /// twice or never used): the mock's count of tasks created less the distinct tasks the
    /// completed jobs ended on.
    pub duplicates: u64,
    /// Completed jobs that ended on a task another completed job ended on too (a lookup that
    /// found the wrong job's task): each is a job whose own task, if any, went unused.
    pub shared_tasks: u64,
    /// Requests whose connection the server's fault injector dropped before carrying them
    /// out: counted in [`Run::requests`], but never past the rate check.
    pub dropped: u64,
}

impl Run {
    /// bound ÷ makespan.
    pub fn efficiency(&self) -> f64 {
        if self.makespan > 0.0 {
            self.bound / self.makespan
        } else {
            0.0
        }
    }

    /// The share of the makespan the rate was busy: `(carried - 1) / rate ÷ makespan`, where
    /// `carried` is the requests the server's rate let through ([`Run::rate_carried`]), so no
    /// run reads over 100% (`None` without a rate cap). It grows with the requests a client
    /// sends, so it judges only a run whose demand is over the rate ([`Scenario::PollFast`]):
    /// there a client can do no better than keep the rate busy to the end.
    pub fn rate_use(&self) -> Option<f64> {
        let rate = self.rate_per_s?;
        (self.makespan > 0.0)
            .then(|| self.rate_carried().saturating_sub(1) as f64 / rate / self.makespan)
    }

    /// The requests the server's rate let through: all less those it refused as too fast
    /// (1302: they use none of the rate, so counting them let a client that sends too fast
    /// read as keeping the rate busy, up to 555%) and those dropped before it saw them. The
    /// 5xx answers the fault injector gives in the server's place are still in ("faults", not
    /// judged by rate use).
    pub fn rate_carried(&self) -> u64 {
        let too_fast = self.rejections.get("1302").copied().unwrap_or(0);
        self.requests
            .saturating_sub(too_fast)
            .saturating_sub(self.dropped)
    }

    /// Whether the efficiency target applies. Not in [`Scenario::PollFast`]: polling every
    /// running task each second asks for several times what the rate carries, so the polls
    /// are spent on tasks that have not ended, and no bound that does not depend on the
    /// client's own choice of which polls to skip is within 2% of what a client can reach.
    /// Its efficiency (against the bound with one poll per job) is reported; its target is
    /// [`Run::rate_use`] instead.
    pub fn judged_by_efficiency(&self) -> bool {
        self.scenario != Scenario::PollFast.name()
    }

    /// All 429s.
    pub fn rejected(&self) -> u64 {
        self.rejections.values().sum()
    }
}

/// What one job ended with.
enum JobEnd {
    /// The task ended: its id, its life on the server (ms), how long after the create's answer the
    /// poll that saw it end came (ms), and whether the client learned of the task from a
    /// lookup by its external id (the create's answer was lost, or a 5000 that made it) rather
    /// than from the create's answer.
    Done {
        task: String,
        life_ms: u64,
        seen_ms: u64,
        looked_up: bool,
    },
    /// The server refused the create for good.
    Refused,
    /// The client gave up.
    Lost,
}

fn create_request(auth: bool) -> Req {
    let mut request = Request::post("/v1/videos/text2video")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(CREATE_BODY.as_bytes())))
        .expect("a valid request");
    if auth {
        request
            .headers_mut()
            .insert(AUTHORIZATION, HeaderValue::from_static("Bearer bench-key"));
    }
    request
}

fn query_request(task: &str, auth: bool) -> Req {
    let mut request = Request::get(format!("/v1/videos/text2video/{task}"))
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    if auth {
        request
            .headers_mut()
            .insert(AUTHORIZATION, HeaderValue::from_static("Bearer bench-key"));
    }
    request
}

/// The task's life on the server from a terminal query answer: `updated_at - created_at`.
fn life_ms(body: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let data = &value["data"];
    Some(data["updated_at"].as_u64()? - data["created_at"].as_u64()?)
}

/// Whether an error says the server refused for good (a fatal Kling code such as 1102, or the
/// slots layer refusing creates after one): the job is refused, not given up on.
fn refused_for_good(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(err) = current {
        if err.is::<kling_concurrency::error::Halted>() {
            return true;
        }
        if let Some(api) = err.downcast_ref::<kling_core::error::ApiError>() {
            return api.code().disposition(api.status()) == kling_core::Disposition::Fatal;
        }
        current = err.source();
    }
    false
}

/// Creates a task and polls it every `interval` (on a grid from the create's answer) until it
/// ends (or the client gives up).
async fn job<S>(service: S, interval: Duration, auth: bool, give_up: Instant) -> JobEnd
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: Into<BoxError>,
{
    let (task, looked_up) = match service.clone().oneshot(create_request(auth)).await {
        Err(error) => {
            let error: BoxError = error.into();
            return if refused_for_good(&*error) {
                JobEnd::Refused
            } else {
                JobEnd::Lost
            };
        }
        Ok(mut response) => match Outcome::ensure(&mut response) {
            Ok(outcome) if outcome.is_success() => match outcome.task() {
                Some(task) => (
                    task.id.clone(),
                    response.extensions().get::<Recovered>().is_some(),
                ),
                None => return JobEnd::Lost,
            },
            Ok(outcome) if outcome.disposition() == kling_core::Disposition::Fatal => {
                return JobEnd::Refused;
            }
            _ => return JobEnd::Lost,
        },
    };
    let answered_at = Instant::now();
    // Polls on a grid from the create's answer, as `tokio::time::interval` does (a poll held
    // back by a retry or the rate limiter does not move the polls after it): the grid the
    // bound rounds each task's life up to.
    let mut polls = tokio::time::interval_at(answered_at + interval, interval);
    loop {
        polls.tick().await;
        if Instant::now() > give_up {
            return JobEnd::Lost;
        }
        let Ok(mut response) = service.clone().oneshot(query_request(&task, auth)).await else {
            continue;
        };
        let Ok(outcome) = Outcome::ensure(&mut response) else {
            continue;
        };
        if let Some(report) = outcome.task()
            && report.status.is_terminal()
        {
            // A life the bench cannot read would loosen the bound unseen: it is the mock's own
            // answer, so that is a bug to stop on.
            let life = life_ms(&response.body().clone_bytes())
                .expect("the mock's terminal answer has created_at and updated_at");
            return JobEnd::Done {
                task,
                life_ms: life,
                seen_ms: answered_at.elapsed().as_millis() as u64,
                looked_up,
            };
        }
    }
}

trait CloneBytes {
    fn clone_bytes(&self) -> Bytes;
}

impl CloneBytes for Full<Bytes> {
    fn clone_bytes(&self) -> Bytes {
        kling_core::PeekBody::peek_bytes(self)
    }
}

fn tier(preset: Preset) -> Tier {
    match preset {
        Preset::Free => Tier::Free,
        Preset::Standard => Tier::Standard,
        Preset::Pro => Tier::Pro,
        _ => Tier::Enterprise,
    }
}

/// The jobs the credits pay for in [`Scenario::Credits`] (one credit a create): two thirds.
pub fn credit_budget(jobs: usize) -> usize {
    jobs * 66 / 100
}

/// The mock's lockout after a 1302 in the Retry-After scenarios (kling-mock's `rate_lockout`:
/// every request refused until it ends, each `Retry-After` naming the time left). Without
/// it the header asks for about one rate interval, which a client's own pause after a 1302
/// already covers, so a stack that ignored the header still sent no early request. 6 s is
/// the shortest whole-second lockout that outlasts kling-tower's own pause on every preset
/// (checked by stripping the header before the stack sees it: at 5 s Free's seconds cell
/// still saw none early, as the stack's own gap after a 1302 there, at the 4 s interval it
/// is told, is over 5 s), and it outlasts the pace tower's client is told on every preset.
pub const RATE_LOCKOUT: Duration = Duration::from_secs(6);

fn mock_config(preset: Preset, scenario: Scenario, jobs: usize) -> MockConfig {
    let mut config = MockConfig::preset(preset).seed(0x5eed);
    config = if scenario == Scenario::Credits {
        // A create costs one credit here: two thirds of the jobs get a task.
        config.credits(credit_budget(jobs) as f64)
    } else {
        config.unlimited_credits()
    };
    match scenario {
        Scenario::Faults => {
            config = config
                .fault_rate(0.03)
                .ghost_create_rate(0.03)
                .drop_rate(0.01)
                .lost_answer_rate(0.01);
        }
        Scenario::RetryAfterSeconds => {
            config = config
                .retry_after(RetryAfterMode::Seconds)
                .rate_lockout(RATE_LOCKOUT);
        }
        Scenario::RetryAfterDate => {
            config = config
                .retry_after(RetryAfterMode::Date)
                .rate_lockout(RATE_LOCKOUT);
        }
        Scenario::Penalty => config = config.penalty(true),
        _ => {}
    }
    config
}

/// The rate the client is configured with, per minute (`None`: no cap).
fn client_rate(preset: Preset, scenario: Scenario) -> Option<f64> {
    let real = preset.rate_limit().map(|r| r.per_minute)?;
    Some(match scenario {
        Scenario::RetryAfterSeconds
        | Scenario::RetryAfterDate
        | Scenario::Penalty
        | Scenario::RateTold1_5 => real * 1.5,
        Scenario::Adaptive => real * 4.0,
        _ => real,
    })
}

/// The slots the client is told.
fn client_slots(preset: Preset, scenario: Scenario) -> u32 {
    match scenario {
        Scenario::UnknownSlots => preset.slots() * 2,
        _ => preset.slots(),
    }
}

fn kling_config(preset: Preset, scenario: Scenario) -> StackConfig {
    let mut config = StackConfig::preset(tier(preset)).no_daily_credits();
    if preset == Preset::Enterprise {
        config = StackConfig::enterprise(preset.slots(), None);
    }
    config = config.slots(client_slots(preset, scenario));
    if let Some(rate) = client_rate(preset, scenario) {
        config = config.rate_per_minute(rate);
    }
    // Every job is queued at once: the whole run may wait, so no call gives up on a deadline.
    config.retry_deadline(JOB_DEADLINE)
}

/// The mock as the jobs reach it, counting the creates sent to it once a create's 1102 has
/// come back ([`Run::after_1102`]) and the requests sent before a `Retry-After` it gave had
/// passed ([`Run::early`]). Its own answers and counts are the mock's.
#[derive(Clone)]
struct Watched {
    mock: MockKling,
    watch: Arc<Watch>,
}

#[derive(Default)]
struct Watch {
    /// A create's 1102 has come back out of the mock.
    refused: AtomicBool,
    /// Creates called after that.
    creates_after: AtomicU64,
    /// The waits the mock's `Retry-After`s asked for.
    pause: Mutex<Pause>,
}

/// The waits the account was told (the run has one account) and the requests sent within them.
/// kling-mock gives a `Retry-After` on a 1302 and a 1303 only, and each covers what the server's
/// own rule refuses until then: its rate counts every request of the account (a query sent
/// during a create's 1302 pause is refused too), its slots only creates (of the pool, and the
/// bench's creates all go to one).
#[derive(Default)]
struct Pause {
    /// No request before this: the furthest a 1302's `Retry-After` named.
    requests: Option<Instant>,
    /// No create before this: the furthest a 1303's `Retry-After` named.
    creates: Option<Instant>,
    /// Answers that carried a `Retry-After`.
    given: u64,
    /// The longest wait one asked for.
    longest: Duration,
    /// Requests sent before a wait they fall under had passed.
    early: u64,
}

impl Pause {
    fn sent(&mut self, create: bool, now: Instant) {
        let within = |until: Option<Instant>| until.is_some_and(|until| now < until);
        if within(self.requests) || (create && within(self.creates)) {
            self.early += 1;
        }
    }

    /// Notes an answer's `Retry-After`, read as a client reads it: counted from the answer's
    /// arrival, an HTTP-date against the answer's own `Date`.
    fn answered(&mut self, response: &Res, now: Instant) {
        let Some(wait) = retry_after_delay(response.headers(), SystemTime::now()) else {
            return;
        };
        self.given += 1;
        self.longest = self.longest.max(wait);
        let until = now + wait;
        let code = serde_json::from_slice::<serde_json::Value>(&response.body().clone_bytes())
            .ok()
            .and_then(|body| body["code"].as_u64());
        // Any other code with a wait (the mock gives none) is taken as the account's.
        let slot = if code == Some(1303) {
            &mut self.creates
        } else {
            &mut self.requests
        };
        *slot = Some(slot.map_or(until, |t| t.max(until)));
    }
}

impl Watched {
    fn new(mock: &MockKling) -> Self {
        Watched {
            mock: mock.clone(),
            watch: Arc::default(),
        }
    }

    fn creates_after_1102(&self) -> u64 {
        self.watch.creates_after.load(Ordering::Relaxed)
    }

    /// (answers with a `Retry-After`, requests sent before theirs had passed, the longest wait
    /// one asked for).
    fn early(&self) -> (u64, u64, Duration) {
        let pause = self.pause();
        (pause.given, pause.early, pause.longest)
    }

    fn pause(&self) -> std::sync::MutexGuard<'_, Pause> {
        // Nothing panics while holding it; a poisoned count is still the count.
        self.watch
            .pause
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Service<Req> for Watched {
    type Response = Res;
    type Error = kling_mock::MockError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Res, kling_mock::MockError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.mock.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        // Every POST of the bench is a create (lookups and queries are GETs).
        let create = request.method() == Method::POST;
        if create && self.watch.refused.load(Ordering::Relaxed) {
            self.watch.creates_after.fetch_add(1, Ordering::Relaxed);
        }
        self.pause().sent(create, Instant::now());
        let answer = self.mock.call(request);
        let watched = self.clone();
        Box::pin(async move {
            let answer = answer.await;
            if let Ok(response) = &answer {
                watched.pause().answered(response, Instant::now());
            }
            let watch = &watched.watch;
            if create
                && let Ok(response) = &answer
                && response.status() == StatusCode::TOO_MANY_REQUESTS
                && serde_json::from_slice::<serde_json::Value>(&response.body().clone_bytes())
                    .is_ok_and(|body| body["code"] == 1102)
            {
                watch.refused.store(true, Ordering::Relaxed);
            }
            answer
        })
    }
}

/// How long a job may take before the client gives up on it.
const JOB_DEADLINE: Duration = Duration::from_secs(48 * 3600);

/// Runs the jobs through `service` on a paused clock and collects the figures.
async fn drive<S>(
    service: S,
    mock: &MockKling,
    jobs: usize,
    interval: Duration,
    auth: bool,
    gate: Option<Arc<Semaphore>>,
) -> (Vec<JobEnd>, f64)
where
    S: Service<Req, Response = Res> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    let start = Instant::now();
    let give_up = start + JOB_DEADLINE;
    let mut handles = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let service = service.clone();
        let gate = gate.clone();
        handles.push(tokio::spawn(async move {
            let _permit = match &gate {
                Some(gate) => Some(gate.acquire().await.expect("never closed")),
                None => None,
            };
            let end = job(service, interval, auth, give_up).await;
            (end, Instant::now())
        }));
    }
    let mut ends = Vec::with_capacity(jobs);
    let mut last = start;
    for handle in handles {
        let (end, at) = handle.await.expect("a job never panics");
        last = last.max(at);
        ends.push(end);
    }
    let _ = mock;
    (ends, last.duration_since(start).as_secs_f64())
}

/// Runs one preset × scenario × client.
pub fn run_one(preset: Preset, scenario: Scenario, client: Client, options: Options) -> Run {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let slots = preset.slots() as usize;
        let jobs = slots * options.waves;
        let mock = MockKling::new(mock_config(preset, scenario, jobs)).expect("a valid mock");
        let told = client_slots(preset, scenario) as usize;
        let interval = if scenario == Scenario::PollFast {
            Duration::from_secs(1)
        } else {
            options.query_interval
        };
        if scenario == Scenario::Outage {
            let mock = mock.clone();
            tokio::spawn(async move {
                tokio::time::sleep(OUTAGE_START).await;
                mock.set_switches(Switches::new().throttled(true));
                tokio::time::sleep(OUTAGE).await;
                mock.set_switches(Switches::new());
            });
        }
        let watched = Watched::new(&mock);
        let (ends, makespan) = match client {
            // The rate unknown: adaptive GCRA, composed by hand. `KlingLayer`'s adaptive rate
            // starts at the rate it is told; this one starts at a quarter of it, the real rate
            // at 4x (`Adaptive::new`). Through `KlingLayer` these cells met 1302s on up to 6.7%
            // of the requests and Free's fell to 93.8-96.8% efficiency ("penalty window",
            // "unknown rate"), under the 98% target.
            Client::Kling
                if !scenario.limits_known()
                    && !matches!(scenario, Scenario::UnknownSlots | Scenario::RateTold1_5) =>
            {
                let (slots_layer, _) =
                    TaskSlotsLayer::pair(SlotsConfig::new(preset.slots())).expect("valid");
                let ceiling = client_rate(preset, scenario).expect("a rated preset");
                let gcra = GcraLayer::builder(Quota::per_minute(ceiling))
                    .adaptive(Adaptive::new())
                    .build()
                    .expect("valid");
                let service = ServiceBuilder::new()
                    .kling_retry(
                        RetryLayer::builder()
                            .deadline(JOB_DEADLINE)
                            .generate_external_ids(true)
                            // Jitter and ids alike: the same table on every machine.
                            .rng(kling_retry::SplitMix::seeded(7))
                            .build()
                            .expect("valid"),
                    )
                    .task_slots(slots_layer)
                    .gcra(gcra)
                    .kling_auth(Credentials::api_key("bench-key").expect("a key"))
                    .classify()
                    .service(watched.clone());
                drive(service, &mock, jobs, interval, false, None).await
            }
            Client::Kling | Client::KlingFixedRate => {
                let mut config = kling_config(preset, scenario);
                if client == Client::KlingFixedRate {
                    config = config.adaptive_rate(false);
                }
                let kling =
                    KlingLayer::builder(config, Credentials::api_key("bench-key").expect("a key"))
                        .replay_seed(7)
                        .build()
                        .expect("a valid stack");
                let service = kling.layer(watched.clone());
                drive(service, &mock, jobs, interval, false, None).await
            }
            Client::Tower => {
                let rate = client_rate(preset, scenario).unwrap_or(6e9);
                let service = tower_stack_buffered_with(
                    ClassifyLayer::new().layer(watched.clone()),
                    told,
                    rate,
                    1,
                    jobs + 16,
                    SimpleRetry::new(10, Duration::from_secs(1)),
                );
                let gate = Arc::new(Semaphore::new(told));
                drive(service, &mock, jobs, interval, true, Some(gate)).await
            }
            Client::Bare => {
                let service = ClassifyLayer::new().layer(watched.clone());
                drive(service, &mock, jobs, interval, true, None).await
            }
        };
        let stats = mock.stats();
        let mut run = Run {
            preset: preset.to_string(),
            scenario: scenario.name().to_owned(),
            client: client.name().to_owned(),
            limits_known: scenario.limits_known(),
            jobs,
            paid: if scenario == Scenario::Credits {
                credit_budget(jobs)
            } else {
                jobs
            },
            makespan,
            requests: stats.requests_total,
            after_1102: watched.creates_after_1102(),
            retry_afters: watched.early().0,
            early: watched.early().1,
            longest_retry_after: watched.early().2.as_secs_f64(),
            dropped: stats.connections_dropped,
            ..Run::default()
        };
        let q = interval.as_millis() as u64;
        // The create that reuses a slot follows the poll that found the slot free, and under a
        // rate with a burst of 1 no request follows another sooner than one interval: that gap
        // is part of the best any client can do, whatever the number of slots.
        let create_gap_ms = match preset.rate_limit() {
            Some(limit) => (60_000.0 / limit.per_minute) as u64,
            None => 0,
        };
        // What the limits force on the jobs that completed (refused and lost jobs are left
        // out, though the makespan covers them: their requests are no work the limits owe).
        // Every completed job needs its create and the polls that find its task ended: at an
        // interval `q`, the first poll after the task's end is `ceil(life / q)` intervals in.
        // Polling every second asks for more than the rate carries, so the client is bound to
        // skip polls it wanted: there only the one poll that sees the end is counted, the
        // least any client sends whatever its own count (a bound that does not grow with the
        // requests the client chose to send).
        let poll_fast = scenario == Scenario::PollFast;
        // Told more slots than it has, a client creates without having seen a slot free, and
        // a create the server takes the moment a task ends beats the poll that would see it
        // end: there the slots' bound is the tasks' lives themselves, with no poll rounding and
        // no rate interval before the next create (the server's own floor).
        let blind = scenario == Scenario::UnknownSlots;
        // A task the client learned of from a lookup (its create's answer was lost, or came
        // back 5000 though it made the task) is polled from the lookup on, off the grid that
        // starts at its creation: its first poll after the end can come sooner than `ceil(life
        // / q)` intervals after the creation, so its life counts unrounded (the next create
        // still follows the poll that saw it end). A poll held back (by the rate limiter, a
        // retry's backoff) moves the grid of the polls after it, which may then see an end
        // sooner than the grid from the creation would: such a task counts for the time its
        // client took to see it end (never less than its life), so the bound stays a bound.
        let (mut slot_ms, mut needed) = (0u64, 0u64);
        // The distinct tasks the completed jobs ended on: two jobs on one task are one task
        // used (and one job's own task, if it has one, never used), not two.
        let mut tasks = std::collections::BTreeSet::new();
        // The longest time one completed task counts for in its slot's bound, ms.
        let mut longest_ms = 0u64;
        for end in &ends {
            match end {
                JobEnd::Done {
                    task,
                    life_ms,
                    seen_ms,
                    looked_up,
                } => {
                    run.completed += 1;
                    tasks.insert(task.as_str());
                    let polls = life_ms.div_ceil(q).max(1);
                    let counted = if blind {
                        *life_ms
                    } else if *looked_up {
                        life_ms + create_gap_ms
                    } else {
                        (polls * q).min((*seen_ms).max(*life_ms)) + create_gap_ms
                    };
                    slot_ms += counted;
                    longest_ms = longest_ms.max(counted);
                    needed += 1 + if poll_fast { 1 } else { polls };
                }
                JobEnd::Refused => run.refused += 1,
                JobEnd::Lost => run.lost += 1,
            }
        }
        let with_task = tasks.len() as u64;
        run.shared_tasks = run.completed as u64 - with_task;
        run.duplicates = stats.tasks_created.saturating_sub(with_task);
        // Only a slot's later tasks wait for a poll: its first create goes at the start.
        if !blind {
            slot_ms =
                slot_ms.saturating_sub((run.completed as u64).min(slots as u64) * create_gap_ms);
        }
        let mut slot_bound = slot_ms as f64 / 1000.0 / slots as f64;
        // `needed` requests under a rate with a burst of 1 take `needed - 1` intervals: the
        // first goes at once.
        run.rate_per_s = preset.rate_limit().map(|limit| limit.per_minute / 60.0);
        let mut rate_bound = match run.rate_per_s {
            Some(per_s) => needed.saturating_sub(1) as f64 / per_s,
            None => 0.0,
        };
        // A run that ended before the outage did (a small one) owes it nothing.
        if scenario == Scenario::Outage && makespan > (OUTAGE_START + OUTAGE).as_secs_f64() {
            run.outage = OUTAGE.as_secs_f64();
            slot_bound += (run.outage - longest_ms as f64 / 1000.0).max(0.0);
            if let Some(per_s) = run.rate_per_s {
                rate_bound += run.outage - 1.0 / per_s;
            }
        }
        run.bound = slot_bound.max(rate_bound);
        for (code, n) in &stats.responses_by_code {
            if matches!(
                code.as_str(),
                "1100" | "1101" | "1102" | "1302" | "1303" | "1304"
            ) {
                run.rejections.insert(code.clone(), *n);
            }
        }
        run
    })
}

/// The scenarios whose published claim is that the server refused (almost) nothing: those
/// with the limits known (but [`Scenario::Outage`]), where the target is 429s on under 1% of
/// the requests.
pub fn refusal_claims() -> impl Iterator<Item = Scenario> {
    Scenario::ALL
        .into_iter()
        .filter(|s| s.refusals_are_the_clients())
}

/// The negative controls of the "nothing was refused" claims: every preset × scenario of
/// [`refusal_claims`] that applies to it, through [`Client::Bare`] on the same mock settings.
/// Each of these runs must meet 429s on at least 1% of its requests, or the claim that the
/// stack met none there says nothing about the stack.
pub fn controls(options: Options, log: &mut dyn FnMut(&str)) -> Vec<Run> {
    let mut runs = Vec::new();
    for preset in PRESETS {
        for scenario in refusal_claims().filter(|s| s.applies_to(preset)) {
            log(&format!(
                "goodput control: {preset} / {} / bare",
                scenario.name()
            ));
            runs.push(run_one(preset, scenario, Client::Bare, options));
        }
    }
    runs
}

/// Runs every preset × applicable scenario × each of its [clients](Scenario::clients).
pub fn run(options: Options, log: &mut dyn FnMut(&str)) -> Vec<Run> {
    let mut runs = Vec::new();
    for preset in PRESETS {
        for scenario in Scenario::ALL {
            if !scenario.applies_to(preset) {
                continue;
            }
            for &client in scenario.clients() {
                log(&format!(
                    "goodput: {preset} / {} / {client:?}",
                    scenario.name()
                ));
                runs.push(run_one(preset, scenario, client, options));
            }
        }
    }
    runs
}
