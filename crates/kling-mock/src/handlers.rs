//! The endpoints: creates, queries, lists, account costs, in the order Kling checks things.
//!
//! Check order for a create: model known, when `known_models` is set (1203) → body JSON (1200)
//! → fields (1201) → model permission (1103) → content policy (1300/1301) → credits latched
//! (1102) → duplicate external id (1201) → credits (1102) → slots (1303) → task. Billing before
//! slots: an empty pack is final, a busy pool is not.
//! Every create (refused or not) first starts or rolls the account's credit period.

use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::config::{MAX_WAIT, PoolScope};
use crate::routes::{LegacyFamily, NEW_IMAGE_PRODUCTS, Route, query_pairs};
use crate::state::{State, external_scope};
use crate::task::{Generation, OutputKind, Phase, Task, task_id, task_seq};

type Resp = Response<Full<Bytes>>;

/// A callback to deliver for a newly created task.
#[derive(Debug, Clone)]
pub(crate) struct CallbackJob {
    pub(crate) url: String,
    pub(crate) task: Task,
}

/// The most ids a batch query or a page may name.
const MAX_PAGE: u64 = 500;

/// The shortest a task lasts (real time, after the speed factor): a create is always answered
/// `submitted`, as Kling's are, and the task ends at a later instant, even when
/// `task_duration(0, 0)` or a huge `speed` scales its life to nothing. A microsecond, so a
/// bench that runs lives of a microsecond (kling-bench's real sockets, at speed 10⁶) still
/// finds each task ended at its query.
pub(crate) const MIN_TASK_DURATION: Duration = Duration::from_micros(1);

/// What a create asks for, after validation.
struct CreateSpec {
    generation: Generation,
    output: OutputKind,
    pool: String,
    weight: u32,
    model: String,
    external_id: Option<String>,
    callback_url: Option<String>,
    video_duration: String,
}

enum BodyError {
    NotJson,
    Invalid(String),
}

fn parse_object(body: &Bytes, empty_ok: bool) -> Result<Map<String, Value>, BodyError> {
    if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(BodyError::Invalid(
            "request body must be a JSON object".into(),
        )),
        Err(_) => Err(BodyError::NotJson),
    }
}

/// The longest identifier-like string field (in bytes) a create or list accepts: `model_name`,
/// `external_task_id`, `external_id`, `callback_url`, `status`, `product_type`; a legacy query's
/// id segment may be as long once decoded. Images and prompts have bounds of their own
/// ([`Bound`]).
pub(crate) const MAX_STRING_BYTES: usize = 4096;

/// The longest `prompt` and `negative_prompt`, in characters (not bytes: a CJK character is
/// three bytes of UTF-8). Kling documents 2,500 characters for both on its video endpoints and
/// publishes no other figure the mock could follow, so every endpoint takes it.
pub(crate) const MAX_PROMPT_CHARS: usize = 2500;

/// How long a string field may be.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// An identifier or URL: at most [`MAX_STRING_BYTES`] bytes.
    Id,
    /// A prompt: at most [`MAX_PROMPT_CHARS`] characters.
    Prompt,
    /// A base64 image or a media URL: bounded only by the body limit
    /// ([`crate::MockConfig::max_body_bytes`]), as real requests carry images of megabytes.
    Media,
}

impl Bound {
    fn check(self, key: &str, s: &str) -> Result<(), String> {
        match self {
            Bound::Id if s.len() > MAX_STRING_BYTES => Err(format!(
                "invalid parameter: {key} must be at most {MAX_STRING_BYTES} bytes"
            )),
            Bound::Prompt if s.chars().count() > MAX_PROMPT_CHARS => Err(format!(
                "invalid parameter: {key} must be at most {MAX_PROMPT_CHARS} characters"
            )),
            _ => Ok(()),
        }
    }
}

/// An optional string field: absent, null or empty → `None` (Kling's own samples send
/// `"callback_url": ""`), a string within `bound` → `Some`, else invalid.
fn opt_string(map: &Map<String, Value>, key: &str, bound: Bound) -> Result<Option<String>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => bound.check(key, s).map(|()| Some(s.clone())),
        Some(_) => Err(format!("invalid parameter: {key}")),
    }
}

fn required_string(map: &Map<String, Value>, key: &str, bound: Bound) -> Result<String, String> {
    match map.get(key) {
        Some(Value::String(s)) if s.is_empty() => Err(format!("invalid parameter: {key}")),
        _ => {
            opt_string(map, key, bound)?.ok_or_else(|| format!("missing required parameter: {key}"))
        }
    }
}

/// Checks the prompts every create may carry: `prompt` (required where `prompt_required`) and
/// `negative_prompt`.
fn check_prompts(map: &Map<String, Value>, prompt_required: bool) -> Result<(), String> {
    if prompt_required {
        required_string(map, "prompt", Bound::Prompt)?;
    } else {
        opt_string(map, "prompt", Bound::Prompt)?;
    }
    opt_string(map, "negative_prompt", Bound::Prompt)?;
    Ok(())
}

impl State {
    /// Dispatches a recognised, authenticated, rate-checked request.
    pub(crate) fn dispatch(
        &mut self,
        account: &str,
        route: &Route,
        query: Option<&str>,
        body: &Bytes,
        now: Instant,
    ) -> (Resp, Option<CallbackJob>) {
        self.forget_expired(now);
        match route {
            Route::LegacyCreate { .. } | Route::NewCreate { .. } => {
                self.create(account, route, body, now)
            }
            Route::LegacyQuery { endpoint, id } => (
                self.legacy_query(account, endpoint, id.as_deref(), now),
                None,
            ),
            Route::LegacyList { endpoint } => {
                (self.legacy_list(account, endpoint, query, now), None)
            }
            Route::NewBatchQuery => (self.new_batch(account, query, now), None),
            Route::NewList => (self.new_list(account, body, now), None),
            Route::AccountCosts => (self.account_costs(account, query, now), None),
            Route::AnsweredAtOnce { kind } => (self.answered_at_once(kind, body, now), None),
        }
    }

    /// An endpoint that answers with its result and makes no task: the body is checked as a
    /// create's would be (a JSON object with the field the endpoint needs), and the answer's
    /// `data` carries no `task_id`.
    fn answered_at_once(&mut self, kind: &str, body: &Bytes, now: Instant) -> Resp {
        let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
            return self.error(
                1200,
                "invalid request: body must be a JSON object",
                now,
                None,
            );
        };
        let data = if kind == "identify-face" {
            let video = opt_string(&map, "video_id", Bound::Id).and_then(|id| {
                match (id, opt_string(&map, "video_url", Bound::Media)?) {
                    (Some(_), Some(_)) | (None, None) => {
                        Err("invalid parameter: give one of video_id and video_url".to_owned())
                    }
                    _ => Ok(()),
                }
            });
            if let Err(message) = video {
                return self.error(1201, &message, now, None);
            }
            json!({
                "session_id": format!("session-{}", self.stats.requests_total),
                "final_unit_deduction": "0",
                "face_data": [{
                    "face_id": "0",
                    "face_image": "https://mock.klingai.invalid/outputs/face/0.png",
                    "start_time": 0,
                    "end_time": 5000,
                }],
            })
        } else {
            if let Err(message) = required_string(&map, "image", Bound::Media) {
                return self.error(1201, &message, now, None);
            }
            json!({
                "final_unit_deduction": "0",
                "task_result": {"images": [{
                    "type": "object_seg",
                    "is_contain": true,
                    "url": "https://mock.klingai.invalid/outputs/recognized/0.png",
                }]},
            })
        };
        self.ok(data, now)
    }

    fn create_spec(&self, route: &Route, map: &Map<String, Value>) -> Result<CreateSpec, String> {
        let n_weight = |map: &Map<String, Value>| -> Result<u32, String> {
            match map.get("n") {
                None | Some(Value::Null) => Ok(1),
                Some(v) => v
                    .as_u64()
                    .filter(|n| (1..=9).contains(n))
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        "invalid parameter: n must be an integer from 1 to 9".to_owned()
                    }),
            }
        };
        let video_duration = match map.get("duration") {
            Some(Value::String(s)) if s.parse::<f64>().is_ok_and(|d| d.is_finite() && d > 0.0) => {
                s.clone()
            }
            Some(Value::Number(n)) if n.as_f64().is_some_and(|d| d > 0.0) => n.to_string(),
            None | Some(Value::Null) => "5".to_owned(),
            Some(_) => return Err("invalid parameter: duration".into()),
        };
        match route {
            Route::LegacyCreate {
                endpoint,
                kind,
                family,
            } => {
                let model =
                    opt_string(map, "model_name", Bound::Id)?.unwrap_or_else(|| "kling-v1".into());
                let (output, pool, weight) = match family {
                    LegacyFamily::Video => (OutputKind::Video, "video", 1),
                    LegacyFamily::TryOn => (OutputKind::Image, "try-on", 1),
                    LegacyFamily::Image => (OutputKind::Image, "image", n_weight(map)?),
                };
                match (family, kind.as_str()) {
                    (LegacyFamily::Video, "text2video") | (LegacyFamily::Image, "generations") => {
                        check_prompts(map, true)?;
                    }
                    (LegacyFamily::TryOn, _) => {
                        required_string(map, "human_image", Bound::Media)?;
                        required_string(map, "cloth_image", Bound::Media)?;
                    }
                    _ => check_prompts(map, false)?,
                }
                Ok(CreateSpec {
                    generation: Generation::Legacy {
                        endpoint: endpoint.clone(),
                    },
                    output,
                    pool: pool.to_owned(),
                    weight,
                    model,
                    external_id: opt_string(map, "external_task_id", Bound::Id)?,
                    callback_url: opt_string(map, "callback_url", Bound::Id)?,
                    video_duration,
                })
            }
            Route::NewCreate { product, model } => {
                let image = NEW_IMAGE_PRODUCTS.contains(&product.as_str());
                check_prompts(
                    map,
                    matches!(product.as_str(), "text-to-video" | "text-to-image"),
                )?;
                let callback_url = match map.get("options") {
                    None | Some(Value::Null) => None,
                    Some(Value::Object(options)) => opt_string(options, "callback_url", Bound::Id)?,
                    Some(_) => return Err("invalid parameter: options".into()),
                };
                let (output, pack, weight) = if image {
                    (OutputKind::Image, "image", n_weight(map)?)
                } else {
                    (OutputKind::Video, "video", 1)
                };
                let pool = match self.config.pool_scope {
                    PoolScope::Model => format!("{pack}:{model}"),
                    PoolScope::Product => pack.to_owned(),
                };
                Ok(CreateSpec {
                    generation: Generation::New {
                        product: product.clone(),
                    },
                    output,
                    pool,
                    weight,
                    model: model.clone(),
                    external_id: opt_string(map, "external_id", Bound::Id)?,
                    callback_url,
                    video_duration,
                })
            }
            _ => Err("not a create".into()),
        }
    }

    fn create(
        &mut self,
        account: &str,
        route: &Route,
        body: &Bytes,
        now: Instant,
    ) -> (Resp, Option<CallbackJob>) {
        // Any create starts the account's credit period, as a client's daily budget starts at
        // its first create.
        self.start_credit_period(account, now);
        if let Route::NewCreate { model, .. } = route
            && let Some(known) = &self.config.known_models
            && !known.contains(model)
        {
            let msg = format!("model not found: {model}");
            return (self.error(1203, &msg, now, None), None);
        }
        let map = match parse_object(body, false) {
            Ok(map) => map,
            Err(BodyError::NotJson) => {
                return (
                    self.error(1200, "request body is not valid JSON", now, None),
                    None,
                );
            }
            Err(BodyError::Invalid(m)) => return (self.error(1200, &m, now, None), None),
        };
        let spec = match self.create_spec(route, &map) {
            Ok(spec) => spec,
            Err(m) => return (self.error(1201, &m, now, None), None),
        };
        if self.config.forbidden_models.contains(&spec.model) {
            let msg = format!("no permission for model {}", spec.model);
            return (self.error(1103, &msg, now, None), None);
        }
        let prompts = ["prompt", "negative_prompt"]
            .iter()
            .filter_map(|k| map.get(*k).and_then(Value::as_str))
            .collect::<Vec<_>>();
        if prompts.iter().any(|p| p.contains("__policy__")) {
            return (
                self.error(1300, "request violates platform policy", now, None),
                None,
            );
        }
        if prompts.iter().any(|p| p.contains("__unsafe__")) {
            return (
                self.error(1301, "content security check failed", now, None),
                None,
            );
        }
        self.settle(account, now);
        if self.first_1102(account, now).is_some() {
            return (self.refuse_1102(account, now), None);
        }
        if let Some(ext) = &spec.external_id
            && self
                .account(account)
                .external
                .contains_key(&(external_scope(&spec.generation).to_owned(), ext.clone()))
        {
            self.stats.duplicate_external_ids += 1;
            return (
                self.error(1201, "duplicate external task id", now, None),
                None,
            );
        }
        let cost = spec.weight;
        if let Some(left) = self.remaining(account)
            && left < f64::from(cost)
        {
            self.latch_1102(account, now);
            return (self.refuse_1102(account, now), None);
        }
        let capacity = self.config.capacity(&spec.pool);
        if self.in_use(account, &spec.pool).saturating_add(spec.weight) > capacity {
            let wait = self.slot_wait(account, &spec.pool, spec.weight, now);
            return (
                self.error(1303, "parallel task over resource pack limit", now, wait),
                None,
            );
        }

        // Accepted: draw the task's life.
        let (min, max) = (
            self.config.task_duration_min.as_secs_f64(),
            self.config.task_duration_max.as_secs_f64(),
        );
        let api_secs = min + (max - min) * self.draw();
        let duration = self
            .config
            .scaled_secs(api_secs)
            .clamp(MIN_TASK_DURATION, MAX_WAIT);
        let fails = self.chance(self.config.failure_rate);
        let seq = self.next_seq();
        let task = Task {
            seq,
            id: task_id(seq),
            account: account.to_owned(),
            generation: spec.generation,
            output: spec.output,
            pool: spec.pool.clone(),
            weight: spec.weight,
            cost,
            outputs: if spec.output == OutputKind::Image {
                spec.weight
            } else {
                1
            },
            video_duration: spec.video_duration,
            external_id: spec.external_id,
            files_base: self
                .config
                .files_base_url
                .as_deref()
                .map(std::sync::Arc::from),
            created: now,
            processing_at: now + duration / 10,
            end: now + duration,
            fails,
        };
        let data = task.to_json(&self.clock, now);
        let job = spec.callback_url.map(|url| CallbackJob {
            url,
            task: task.clone(),
        });
        self.add_task(task);
        self.charge(account, cost);
        self.stats.tasks_created += 1;
        self.note_usage(account, &spec.pool);
        // The key `note_usage` just gave the pool.
        let key = self.stats_pool(&spec.pool);
        *self.stats.task_seconds.entry(key).or_default() += duration.as_secs_f64();

        if self.chance(self.config.faults.ghost_create_rate) {
            // Both codes Kling documents as "a create may have happened", in turn by task (no
            // draw of the seeded generator, so a seeded run's other faults stay where they were).
            let answer = if seq % 2 == 1 {
                self.error(5000, "internal error", now, None)
            } else {
                self.error(5002, "internal timeout", now, None)
            };
            return (answer, job);
        }
        (self.ok(data, now), job)
    }

    fn find_legacy(&self, account: &str, endpoint: &str, id: &str) -> Option<&Task> {
        let by_id = task_seq(id);
        let by_ext = self.accounts.get(account).and_then(|a| {
            a.external
                .get(&(endpoint.to_owned(), id.to_owned()))
                .copied()
        });
        [by_id, by_ext]
            .into_iter()
            .flatten()
            .filter_map(|i| self.tasks.get(&i))
            .find(|t| {
                t.account == account
                    && matches!(&t.generation, Generation::Legacy { endpoint: e } if e == endpoint)
            })
    }

    /// `id` is `None` when the segment decoded to bytes that are not UTF-8: no task has it.
    fn legacy_query(
        &mut self,
        account: &str,
        endpoint: &str,
        id: Option<&str>,
        now: Instant,
    ) -> Resp {
        let data = id
            .and_then(|id| self.find_legacy(account, endpoint, id))
            .map(|t| t.legacy_json(&self.clock, now));
        match data {
            Some(data) => self.ok(data, now),
            None => self.error(1203, "task not found", now, None),
        }
    }

    fn legacy_list(
        &mut self,
        account: &str,
        endpoint: &str,
        query: Option<&str>,
        now: Instant,
    ) -> Resp {
        let mut page_num = 1u64;
        let mut page_size = 30u64;
        for (k, v) in query_pairs(query) {
            let target = match k.as_str() {
                "pageNum" => &mut page_num,
                "pageSize" => &mut page_size,
                _ => continue,
            };
            match v.parse::<u64>() {
                Ok(n) => *target = n,
                Err(_) => return self.error(1201, &format!("invalid parameter: {k}"), now, None),
            }
        }
        if page_num == 0 {
            return self.error(
                1201,
                "invalid parameter: pageNum must be at least 1",
                now,
                None,
            );
        }
        if page_size == 0 || page_size > MAX_PAGE {
            return self.error(
                1201,
                "invalid parameter: pageSize must be from 1 to 500",
                now,
                None,
            );
        }
        let skip = usize::try_from((page_num - 1).saturating_mul(page_size)).unwrap_or(usize::MAX);
        let data: Vec<Value> = self
            .accounts
            .get(account)
            .into_iter()
            .flat_map(|a| a.tasks.iter().rev())
            .filter_map(|i| self.tasks.get(i))
            .filter(
                |t| matches!(&t.generation, Generation::Legacy { endpoint: e } if e == endpoint),
            )
            .skip(skip)
            .take(page_size as usize)
            .map(|t| t.legacy_json(&self.clock, now))
            .collect();
        self.ok(Value::Array(data), now)
    }

    fn new_batch(&mut self, account: &str, query: Option<&str>, now: Instant) -> Resp {
        let mut task_ids: Option<String> = None;
        let mut external_ids: Option<String> = None;
        for (k, v) in query_pairs(query) {
            match k.as_str() {
                "task_ids" => task_ids = Some(v),
                "external_task_ids" => external_ids = Some(v),
                _ => {}
            }
        }
        let (list, external) = match (task_ids, external_ids) {
            (Some(_), Some(_)) => {
                return self.error(
                    1201,
                    "task_ids and external_task_ids cannot be mixed",
                    now,
                    None,
                );
            }
            (Some(ids), None) => (ids, false),
            (None, Some(ids)) => (ids, true),
            (None, None) => {
                return self.error(
                    1201,
                    "missing required parameter: task_ids or external_task_ids",
                    now,
                    None,
                );
            }
        };
        let ids: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if ids.is_empty() || ids.len() as u64 > MAX_PAGE {
            return self.error(1201, "invalid parameter: between 1 and 500 ids", now, None);
        }
        // Each task once, where its id is first named: the answer is the tasks the ids name.
        let mut seen = std::collections::HashSet::new();
        let found: Vec<Value> = ids
            .iter()
            .filter_map(|id| {
                if external {
                    let key = (String::new(), (*id).to_owned());
                    self.accounts.get(account)?.external.get(&key).copied()
                } else {
                    task_seq(id)
                }
            })
            .filter(|&i| seen.insert(i))
            .filter_map(|i| self.tasks.get(&i))
            .filter(|t| t.account == account && matches!(t.generation, Generation::New { .. }))
            .map(|t| t.new_json(&self.clock, now))
            .collect();
        if found.is_empty() {
            return self.error(1203, "task not found", now, None);
        }
        self.ok(Value::Array(found), now)
    }

    fn new_list(&mut self, account: &str, body: &Bytes, now: Instant) -> Resp {
        let map = match parse_object(body, true) {
            Ok(map) => map,
            Err(BodyError::NotJson) => {
                return self.error(1200, "request body is not valid JSON", now, None);
            }
            Err(BodyError::Invalid(m)) => return self.error(1200, &m, now, None),
        };
        let limit = match map.get("limit") {
            None | Some(Value::Null) => 30,
            Some(v) => match v.as_u64().filter(|n| (1..=MAX_PAGE).contains(n)) {
                Some(n) => n as usize,
                None => {
                    return self.error(
                        1201,
                        "invalid parameter: limit must be from 1 to 500",
                        now,
                        None,
                    );
                }
            },
        };
        let before = match map.get("cursor") {
            None | Some(Value::Null) => u64::MAX,
            Some(Value::String(s)) if s.is_empty() => u64::MAX,
            Some(Value::String(s)) => match s.parse::<u64>() {
                Ok(n) => n,
                Err(_) => return self.error(1201, "invalid parameter: cursor", now, None),
            },
            Some(_) => return self.error(1201, "invalid parameter: cursor", now, None),
        };
        let status = match opt_string(&map, "status", Bound::Id) {
            Ok(None) => None,
            Ok(Some(s)) => match s.as_str() {
                "submitted" => Some(Phase::Submitted),
                "processing" => Some(Phase::Processing),
                "succeeded" => Some(Phase::Succeeded),
                "failed" => Some(Phase::Failed),
                _ => return self.error(1201, "invalid parameter: status", now, None),
            },
            Err(m) => return self.error(1201, &m, now, None),
        };
        let product = match opt_string(&map, "product_type", Bound::Id) {
            Ok(p) => p,
            Err(m) => return self.error(1201, &m, now, None),
        };
        // The cursor is a task number, not a position: forgetting older tasks moves no page.
        let mut page: Vec<&Task> = self
            .accounts
            .get(account)
            .into_iter()
            .flat_map(|a| a.tasks.range(..before).rev())
            .filter_map(|i| self.tasks.get(i))
            .filter(|t| match &t.generation {
                Generation::New { product: p } => product.as_ref().is_none_or(|want| want == p),
                Generation::Legacy { .. } => false,
            })
            .filter(|t| status.is_none_or(|s| t.phase(now) == s))
            .take(limit + 1)
            .collect();
        let next_cursor = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|t| Value::String(t.seq.to_string()))
        } else {
            None
        };
        let tasks: Vec<Value> = page.iter().map(|t| t.new_json(&self.clock, now)).collect();
        self.ok(
            json!({"tasks": tasks, "next_cursor": next_cursor.unwrap_or(Value::Null)}),
            now,
        )
    }

    /// `GET /account/costs[?start_time=&end_time=&resource_pack_name=]`: the account's pack,
    /// listed when its purchase time falls in the window (Unix milliseconds, each end
    /// included; an end not given is open) and its name is the one asked for, if any.
    fn account_costs(&mut self, account: &str, query: Option<&str>, now: Instant) -> Resp {
        let mut window = (0u64, u64::MAX);
        let mut name: Option<String> = None;
        for (k, v) in query_pairs(query) {
            let bound = match k.as_str() {
                "start_time" => &mut window.0,
                "end_time" => &mut window.1,
                // Empty is absent, as empty optional fields of a create are.
                "resource_pack_name" => {
                    name = Some(v).filter(|n| !n.is_empty());
                    continue;
                }
                _ => continue,
            };
            match v.parse::<u64>() {
                Ok(ms) => *bound = ms,
                Err(_) => {
                    let msg = format!("invalid parameter: {k} must be Unix milliseconds");
                    return self.error(1201, &msg, now, None);
                }
            }
        }
        if window.0 > window.1 {
            return self.error(
                1201,
                "invalid parameter: start_time must not be after end_time",
                now,
                None,
            );
        }
        self.settle(account, now);
        const UNLIMITED: f64 = 1_000_000_000.0;
        let total = self.config.credits.unwrap_or(UNLIMITED);
        let remaining = self
            .remaining(account)
            .unwrap_or_else(|| UNLIMITED - self.net_charged(account) as f64);
        // An account answered 1102 refuses every create until the period ends, whatever is
        // left: the pack says so, or a client that re-reads it would create into 1102s.
        let latched = self.first_1102(account, now).is_some();
        // Every account's pack was bought when the mock started. One that comes back every
        // credit period is valid for the current period (before the account's first create,
        // the period a create now would start); any other lasts as long as the mock can run.
        // Fixed times, as a real pack's are, and the query always inside them.
        let bought = self.clock.started();
        let (start, end) = match (
            self.credit_period(account),
            self.config.scaled_credit_period(),
        ) {
            (Some((start, end)), _) => (start, end),
            (None, Some(period)) => (now, now + period),
            (None, None) => (bought, bought + MAX_WAIT),
        };
        let bought = self.clock.millis(bought);
        let (start, end) = (self.clock.millis(start), self.clock.millis(end));
        let pack_name = if self.config.credits.is_some() {
            "mock resource pack"
        } else {
            "mock unlimited pack"
        };
        // Kling documents the window, not what it selects; its clients report the purchase
        // time (a pack bought before the window is not listed, however long it stays valid).
        let listed = (window.0..=window.1).contains(&bought)
            && name.as_deref().is_none_or(|n| n == pack_name);
        let packs = if listed {
            vec![json!({
                "resource_pack_name": pack_name,
                "resource_pack_id": "mock-pack-1",
                "resource_pack_type": "decreasing_total",
                "total_quantity": total,
                "remaining_quantity": remaining.max(0.0),
                "purchase_time": bought,
                "effective_time": start,
                "invalid_time": end,
                // Kling's values: `toBeOnline`, `online`, `expired`, `runOut`.
                "status": if remaining >= 1.0 && !latched { "online" } else { "runOut" },
            })]
        } else {
            Vec::new()
        };
        let data = json!({
            "code": 0,
            "msg": "SUCCEED",
            "resource_pack_subscribe_infos": packs,
        });
        self.ok(data, now)
    }
}
