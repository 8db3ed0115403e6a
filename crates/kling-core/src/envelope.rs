//! The Kling response envelope `{code, message, request_id, data}` and the task reports inside.
//!
//! One parse reads everything the stack needs from a response: the business code, the message
//! and request id every error must carry, and the tasks it reports (legacy single task, legacy
//! list, new `/tasks` batch or page): one response can end several tasks, and each ended task
//! frees its slots.
//!
//! Every response is read, so the read is a hand-rolled scanner (`scan`); the typed serde_json
//! parse is its fallback for anything it does not handle exactly alike, and the reference its
//! tests and the `envelope` fuzz target compare it to.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::code::Code;
use crate::request::ApiGeneration;

mod scan;

pub(crate) use scan::{Piece, Reports, scan};

/// A task's status, in either API generation's words.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TaskStatus {
    /// `submitted`: accepted, holds its slot.
    Submitted,
    /// `processing`: running, holds its slot.
    Processing,
    /// `succeed` (legacy) or `succeeded` (new): ended, slot free.
    Succeeded,
    /// `failed`: ended, slot free.
    Failed,
    /// A status Kling has not documented, kept as sent (treated as still running).
    Other(String),
}

impl TaskStatus {
    /// Reads either generation's status word.
    pub fn parse(status: &str) -> TaskStatus {
        match status {
            "submitted" => TaskStatus::Submitted,
            "processing" => TaskStatus::Processing,
            "succeed" | "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            other => TaskStatus::Other(other.to_owned()),
        }
    }

    /// Whether the task has ended (and so no longer holds a slot).
    pub fn is_terminal(&self) -> bool {
        matches!(self, TaskStatus::Succeeded | TaskStatus::Failed)
    }

    /// The status word for labels and logs (`succeeded` for both generations).
    pub fn as_str(&self) -> &str {
        match self {
            TaskStatus::Submitted => "submitted",
            TaskStatus::Processing => "processing",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Other(other) => other,
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One task as a response reports it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TaskReport {
    /// The task id (`task_id` or `id`).
    pub id: String,
    /// The task's status.
    pub status: TaskStatus,
    /// Which generation's field names the report used.
    pub generation: ApiGeneration,
    /// The caller's own id (`task_info.external_task_id` or `external_id`).
    pub external_id: Option<String>,
    /// Why the task failed (`task_status_msg` or `message`).
    pub failure: Option<String>,
    /// Result URLs (`task_result.videos[].url`, `task_result.images[].url`, `outputs[].url`).
    pub urls: Vec<String>,
    /// What the finished task cost (`final_unit_deduction`, or the sum of `billing[].amount`).
    pub cost: Option<f64>,
}

/// A parsed envelope: what the stack reads of every response body.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Envelope {
    /// The business code.
    pub code: Code,
    /// The server's message.
    pub message: String,
    /// The server's request id, to quote to Kling support.
    pub request_id: Option<String>,
    /// The tasks the response reports (none for errors and non-task responses).
    pub tasks: Vec<TaskReport>,
}

impl Envelope {
    /// Parses an envelope; a body that is not JSON or has no numeric `code` is an error.
    ///
    /// A hand-rolled single-pass scanner reads the usual envelopes; whatever it does not
    /// handle exactly as serde_json does (and every error) goes to
    /// [`Envelope::parse_reference`], so the result is always the reference's.
    pub fn parse(body: &[u8]) -> Result<Envelope, serde_json::Error> {
        let mut tasks = Reports::None;
        if let Ok(head) = scan::scan(body, &mut tasks) {
            return Ok(head.into_envelope(tasks));
        }
        Envelope::parse_reference(body)
    }

    /// The typed serde_json parse that [`Envelope::parse`] must agree with: its fallback, and
    /// the reference the property tests and the `envelope` fuzz target compare it to.
    #[doc(hidden)]
    pub fn parse_reference(body: &[u8]) -> Result<Envelope, serde_json::Error> {
        // A byte-order mark a proxy put in front is not part of the JSON.
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        // An envelope is an object: serde's derive would also fill the struct from an array,
        // by position (`[1303,"m"]`).
        if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return Err(de::Error::custom(
                "an envelope must be a JSON object, not an array",
            ));
        }
        let raw = match parse_raw::<RawEnvelope<'_>>(body) {
            Ok(raw) => raw,
            // An error code with a field of an odd type elsewhere (`"data":{"status":429}`, a
            // numeric `request_id`): its code is what the layers act on, so it is kept, with no
            // task. A success is not: its task is what the caller asked for, and a create whose
            // answer cannot be read must stay one of unknown outcome.
            Err(e) => {
                return match parse_raw::<RawErrorHead<'_>>(body) {
                    Ok(head) if head.code != 0 => Ok(Envelope {
                        code: Code::from_i64(head.code),
                        message: head.message.0.map(Cow::into_owned).unwrap_or_default(),
                        request_id: head.request_id.0.map(Cow::into_owned),
                        tasks: Vec::new(),
                    }),
                    _ => Err(e),
                };
            }
        };
        Ok(Envelope {
            code: Code::from_i64(raw.code),
            message: raw.message.map(Cow::into_owned).unwrap_or_default(),
            request_id: raw.request_id.map(Cow::into_owned),
            tasks: raw.data.0,
        })
    }

    /// The tasks a callback body reports: the bare task object Kling posts (either
    /// generation), or a whole `{code, data}` envelope. A body that reports no task is `Ok`
    /// with none; one that is not JSON is the parse error.
    pub fn parse_callback(body: &[u8]) -> Result<Vec<TaskReport>, serde_json::Error> {
        if let Ok(envelope) = Envelope::parse(body)
            && !envelope.tasks.is_empty()
        {
            return Ok(envelope.tasks);
        }
        // A bare task object has no `code`: read it as the `data` of a success envelope, once
        // the body is known to be one JSON value (spliced in as it is, `{..},"x":0` would
        // close the object early and still read).
        serde_json::from_slice::<serde::de::IgnoredAny>(body)?;
        let mut wrapped = Vec::with_capacity(body.len() + 20);
        wrapped.extend_from_slice(br#"{"code":0,"data":"#);
        wrapped.extend_from_slice(body);
        wrapped.push(b'}');
        Envelope::parse(&wrapped).map(|envelope| envelope.tasks)
    }
}

/// One UTF-8 check of the whole body (a word at a time for ASCII) instead of one per string,
/// which is what `from_slice` does; a body that is not UTF-8 still goes through `from_slice`,
/// so it fails where and how it did.
fn parse_raw<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

/// An error envelope's code and texts, read when the whole envelope cannot be: every other
/// field is skipped, and a message or request id of another type than text is left out.
#[derive(Deserialize)]
struct RawErrorHead<'a> {
    code: i64,
    #[serde(default, borrow)]
    message: Loose<'a>,
    #[serde(default, borrow)]
    request_id: Loose<'a>,
}

/// A string or number as text; anything else (an object, an array, `true`, `null`) as none.
#[derive(Default)]
struct Loose<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LooseVisitor;
        impl<'de> Visitor<'de> for LooseVisitor {
            type Value = Loose<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Loose<'de>, E> {
                Ok(Loose(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose<'de>, E> {
                Ok(Loose(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose<'de>, E> {
                Ok(Loose(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose<'de>, E> {
                Ok(Loose(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose<'de>, E> {
                Ok(Loose(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose<'de>, E> {
                Ok(Loose(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose<'de>, E> {
                Ok(Loose(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Loose<'de>, E> {
                Ok(Loose(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Loose<'de>, D::Error> {
                d.deserialize_any(LooseVisitor)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose<'de>, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose<'de>, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Loose(None))
            }
        }
        deserializer.deserialize_any(LooseVisitor)
    }
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    code: i64,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    request_id: Option<Cow<'a, str>>,
    #[serde(default)]
    data: Tasks,
}

/// The tasks inside `data`, whatever its shape: one task object, an array of them, or a page
/// `{"tasks": [...]}`; anything else reports no task.
#[derive(Default)]
struct Tasks(Vec<TaskReport>);

impl<'de> Deserialize<'de> for Tasks {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TasksVisitor)
    }
}

struct TasksVisitor;

impl<'de> Visitor<'de> for TasksVisitor {
    type Value = Tasks;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("task data")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tasks, A::Error> {
        let mut tasks = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(512));
        // Each element is read like `data` itself, so an odd element reports nothing
        // instead of failing the whole envelope.
        while let Some(Tasks(found)) = seq.next_element::<Tasks>()? {
            tasks.extend(found);
        }
        Ok(Tasks(tasks))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Tasks, A::Error> {
        let task = RawTask::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let mut tasks = Vec::new();
        if let Some(page) = task.tasks {
            tasks.extend(page.into_iter().filter_map(RawTask::into_report));
        } else {
            tasks.extend(task.into_report());
        }
        Ok(Tasks(tasks))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Tasks, E> {
        Ok(Tasks::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<Tasks, E> {
        Ok(Tasks::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Tasks, E> {
        Ok(Tasks::default())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Tasks, E> {
        Ok(Tasks::default())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Tasks, E> {
        Ok(Tasks::default())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Tasks, E> {
        Ok(Tasks::default())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Tasks, E> {
        Ok(Tasks::default())
    }
}

/// A task object of either generation (or a page holding them). Fields of the other shape are
/// absent; unknown fields are skipped.
#[derive(Deserialize)]
struct RawTask<'a> {
    #[serde(default, borrow)]
    task_id: Option<Text<'a>>,
    #[serde(default, borrow)]
    task_status: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    task_status_msg: Option<Cow<'a, str>>,
    #[serde(default)]
    task_info: Option<TaskInfo<'a>>,
    #[serde(default)]
    task_result: Option<TaskResult<'a>>,
    #[serde(default, borrow)]
    final_unit_deduction: Option<Text<'a>>,
    #[serde(default, borrow)]
    id: Option<Text<'a>>,
    #[serde(default, borrow)]
    status: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    external_id: Option<Cow<'a, str>>,
    #[serde(default)]
    outputs: Option<Vec<Output<'a>>>,
    #[serde(default)]
    billing: Option<Vec<Billing>>,
    #[serde(default)]
    tasks: Option<Vec<RawTask<'a>>>,
}

impl RawTask<'_> {
    fn into_report(self) -> Option<TaskReport> {
        if let (Some(id), Some(status)) = (&self.task_id, &self.task_status) {
            let mut urls = Vec::new();
            if let Some(result) = self.task_result {
                urls.extend(result.videos.into_iter().flatten().filter_map(|m| m.url));
                urls.extend(result.images.into_iter().flatten().filter_map(|m| m.url));
            }
            return Some(TaskReport {
                id: String::from(&*id.0),
                status: TaskStatus::parse(status),
                generation: ApiGeneration::Legacy,
                external_id: self
                    .task_info
                    .and_then(|info| info.external_task_id)
                    .map(Cow::into_owned),
                failure: self.task_status_msg.map(Cow::into_owned),
                urls: urls.into_iter().map(Cow::into_owned).collect(),
                cost: self
                    .final_unit_deduction
                    .and_then(|d| d.0.trim().parse().ok()),
            });
        }
        let (Some(id), Some(status)) = (&self.id, &self.status) else {
            return None;
        };
        Some(TaskReport {
            id: String::from(&*id.0),
            status: TaskStatus::parse(status),
            generation: ApiGeneration::New,
            external_id: self.external_id.map(Cow::into_owned),
            failure: self.message.map(Cow::into_owned),
            urls: self
                .outputs
                .into_iter()
                .flatten()
                .filter_map(|o| o.url.map(Cow::into_owned))
                .collect(),
            cost: self
                .billing
                .map(|b| b.iter().filter_map(|item| item.amount).sum()),
        })
    }
}

#[derive(Deserialize)]
struct TaskInfo<'a> {
    #[serde(default, borrow)]
    external_task_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct TaskResult<'a> {
    #[serde(default, borrow)]
    videos: Option<Vec<Media<'a>>>,
    #[serde(default, borrow)]
    images: Option<Vec<Media<'a>>>,
}

#[derive(Deserialize)]
struct Media<'a> {
    #[serde(default, borrow)]
    url: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Output<'a> {
    #[serde(default, borrow)]
    url: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Billing {
    #[serde(default)]
    amount: Option<f64>,
}

/// A string or a number, kept as text (ids and deductions arrive as either).
struct Text<'a>(Cow<'a, str>);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error envelope with a field of an odd type elsewhere keeps its code and texts: a 1102
    /// read as malformed would be retried as a throttled 429.
    #[test]
    fn an_error_code_survives_an_odd_field_elsewhere() {
        let bodies: [&[u8]; 3] = [
            br#"{"code":1102,"message":"resource pack exhausted","request_id":"r","data":{"status":429}}"#,
            br#"{"code":1102,"message":"resource pack exhausted","request_id":12345}"#,
            br#"{"code":1102,"message":{"zh":"x"},"request_id":null,"data":{"task_id":[1]}}"#,
        ];
        for body in bodies {
            let env = Envelope::parse(body).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(env.code, Code::from_i64(1102));
            assert!(env.tasks.is_empty());
            assert_eq!(Envelope::parse_reference(body).unwrap(), env);
        }
        let env = Envelope::parse(bodies[1]).unwrap();
        assert_eq!(env.request_id.as_deref(), Some("12345"));
        assert_eq!(env.message, "resource pack exhausted");
        assert_eq!(Envelope::parse(bodies[2]).unwrap().message, "");
        // A success whose task cannot be read stays malformed: the create's outcome is unknown.
        let success = br#"{"code":0,"message":"ok","data":{"task_id":"t","task_status":7}}"#;
        assert!(Envelope::parse(success).is_err());
    }

    #[test]
    fn an_array_is_no_envelope() {
        for body in [&b"[0]"[..], br#" [1303,"m","r"]"#] {
            let err = Envelope::parse(body).unwrap_err();
            assert!(err.to_string().contains("JSON object"), "{err}");
        }
    }

    #[test]
    fn a_byte_order_mark_in_front_is_skipped() {
        let body = "\u{feff}{\"code\":1303,\"message\":\"m\"}";
        let env = Envelope::parse(body.as_bytes()).unwrap();
        assert_eq!(env.code, Code::from_i64(1303));
        assert_eq!(env.message, "m");
    }

    #[test]
    fn legacy_query_response() {
        let body = br#"{"code":0,"message":"SUCCEED","request_id":"r-1","data":{
            "task_id":"t1","task_status":"succeed","task_info":{"external_task_id":"job-7"},
            "task_result":{"videos":[{"id":"v","url":"https://cdn/v.mp4","duration":"5"}]},
            "final_unit_deduction":"1.5","created_at":1,"updated_at":2}}"#;
        let env = Envelope::parse(body).unwrap();
        assert_eq!(env.code, Code::Success);
        assert_eq!(env.request_id.as_deref(), Some("r-1"));
        let task = &env.tasks[0];
        assert_eq!(task.id, "t1");
        assert_eq!(task.status, TaskStatus::Succeeded);
        assert_eq!(task.generation, ApiGeneration::Legacy);
        assert_eq!(task.external_id.as_deref(), Some("job-7"));
        assert_eq!(task.urls, vec!["https://cdn/v.mp4"]);
        assert_eq!(task.cost, Some(1.5));
    }

    #[test]
    fn legacy_list_and_new_batch_and_page() {
        let list = br#"{"code":0,"message":"ok","request_id":"r","data":[
            {"task_id":"a","task_status":"failed","task_status_msg":"bad"},
            {"task_id":"b","task_status":"processing"}]}"#;
        let env = Envelope::parse(list).unwrap();
        assert_eq!(env.tasks.len(), 2);
        assert_eq!(env.tasks[0].failure.as_deref(), Some("bad"));
        assert!(env.tasks[0].status.is_terminal());
        assert!(!env.tasks[1].status.is_terminal());

        let batch = br#"{"code":0,"message":"ok","request_id":"r","data":[
            {"id":"a","status":"succeeded","outputs":[{"type":"video","url":"u"}],
             "billing":[{"charge_type":"credits","amount":1,"currency":"credit"},{"amount":0.5}]},
            {"id":"b","status":"failed","message":"why","external_id":"e"}]}"#;
        let env = Envelope::parse(batch).unwrap();
        assert_eq!(env.tasks[0].generation, ApiGeneration::New);
        assert_eq!(env.tasks[0].urls, vec!["u"]);
        assert_eq!(env.tasks[0].cost, Some(1.5));
        assert_eq!(env.tasks[1].external_id.as_deref(), Some("e"));

        let page = br#"{"code":0,"message":"ok","request_id":"r","data":{
            "tasks":[{"id":"c","status":"submitted"}],"next_cursor":null}}"#;
        let env = Envelope::parse(page).unwrap();
        assert_eq!(env.tasks[0].id, "c");
    }

    #[test]
    fn errors_and_odd_data() {
        let env = Envelope::parse(
            br#"{"code":1303,"message":"parallel task over resource pack limit","request_id":"x"}"#,
        )
        .unwrap();
        assert_eq!(env.code, Code::ParallelTaskLimit);
        assert!(env.tasks.is_empty());
        for body in [
            &br#"{"code":0,"data":null}"#[..],
            br#"{"code":0,"data":"text"}"#,
            br#"{"code":0,"data":{"resource_pack_subscribe_infos":[]}}"#,
            br#"{"code":0,"data":[1,2]}"#,
        ] {
            assert!(
                Envelope::parse(body).is_ok(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(Envelope::parse(b"<html>502</html>").is_err());
        assert!(Envelope::parse(br#"{"message":"no code"}"#).is_err());
        assert!(Envelope::parse(br#"{"code":"0"}"#).is_err());
    }

    #[test]
    fn callback_bodies_are_bare_tasks_or_envelopes() {
        let legacy = Envelope::parse_callback(br#"{"task_id":"t1","task_status":"succeed"}"#);
        assert_eq!(legacy.unwrap()[0].id, "t1");
        let new = Envelope::parse_callback(br#"{"id":"n","status":"failed","message":"m"}"#);
        assert_eq!(new.unwrap()[0].failure.as_deref(), Some("m"));
        let wrapped =
            Envelope::parse_callback(br#"{"code":0,"data":{"id":"w","status":"succeeded"}}"#);
        assert_eq!(wrapped.unwrap()[0].id, "w");
        assert!(Envelope::parse_callback(b"{}").unwrap().is_empty());
        assert!(Envelope::parse_callback(b"not json").is_err());
        // Not one JSON value, though it would read once spliced into an envelope.
        for spliced in [
            &br#"{"task_id":"t1","task_status":"succeed"},"x":0"#[..],
            br#"{"task_id":"t1","task_status":"succeed"},"code":1"#,
        ] {
            assert!(
                Envelope::parse_callback(spliced).is_err(),
                "{}",
                String::from_utf8_lossy(spliced)
            );
        }
    }

    #[test]
    fn escaped_strings_are_read() {
        let body = br#"{"code":0,"message":"a\"b","request_id":"r\/1","data":{"task_id":"t\/1","task_status":"submitted"}}"#;
        let env = Envelope::parse(body).unwrap();
        assert_eq!(env.message, "a\"b");
        assert_eq!(env.tasks[0].id, "t/1");
    }
}
