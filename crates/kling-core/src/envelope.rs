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
///
/// A task object is reported only when it names its task: an id that is a non-empty string or
/// a 64-bit integer, and a status, of the same generation (`task_id` and `task_status`, else
/// `id` and `status`). One with an empty id (`"task_id":""`) names no task and is left out, as
/// one with no id is; an id that is some other number makes the envelope unreadable.
///
/// Its `Debug` shows each result URL without its query, fragment or user info: a result URL
/// is often a signed download link, valid for days, and `Debug` output ends up in logs.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct TaskReport {
    /// The task id (`task_id` or `id`): never empty.
    pub id: String,
    /// The task's status.
    pub status: TaskStatus,
    /// Which generation's field names the report used.
    pub generation: ApiGeneration,
    /// The caller's own id (`task_info.external_task_id` or `external_id`); an empty one is
    /// none (answers may echo `""` for a task created without one).
    pub external_id: Option<String>,
    /// Why the task failed (`task_status_msg` or `message`).
    pub failure: Option<String>,
    /// Result URLs (`task_result.videos[].url`, `task_result.images[].url`, `outputs[].url`).
    pub urls: Vec<String>,
    /// What the finished task cost: `final_unit_deduction` (units), or the sum of
    /// `billing[].amount` when the items with an amount name at most one `currency` (compared
    /// exactly; one naming none — missing, `null`, `""` — counts in the others'). Items in two
    /// currencies give `None`: credits plus dollars is no figure. So does what cannot be read
    /// as a cost, rather than a smaller one: a negative deduction or amount, `billing` that is
    /// no list of objects, an amount that is no number (`"1,5"`, `true`), a `currency` beside
    /// an amount that is neither text nor a number (an object: an unknown unit, never
    /// credits), a sum past `f64`. Its currency is [`cost_currency`](Self::cost_currency);
    /// only [`cost_in_credits`](Self::cost_in_credits) may be added to credits.
    pub cost: Option<f64>,
    /// The currency `billing` named for [`cost`](Self::cost), as sent; `None` when none was
    /// named (`final_unit_deduction`, billing items without one) or there is no cost.
    pub cost_currency: Option<Currency>,
}

impl TaskReport {
    /// [`cost`](Self::cost) when it is in credits, the unit of `final_unit_deduction`: no
    /// currency named, or one that [reads as credits](Currency::is_credits). A cost in another
    /// currency (`"USD"`) is `None`: booked as credits, 0.14 dollars would under-count a
    /// credit budget.
    pub fn cost_in_credits(&self) -> Option<f64> {
        self.cost
            .filter(|_| self.cost_currency.as_ref().is_none_or(Currency::is_credits))
    }
}

/// The currency a task's `billing` items named for their amounts, as sent (`"credit"`,
/// `"USD"`).
///
/// Kept as a `&'static str` for the usual spellings of credits: reading one copies nothing.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Currency(Cow<'static, str>);

/// Currency names that read as credits ([`Currency::is_credits`]), in their usual spellings.
const CREDIT_NAMES: [&str; 4] = ["credit", "credits", "unit", "units"];

impl Currency {
    /// `name` as a currency (a usual spelling of credits is not copied).
    pub(crate) fn new(name: Cow<'_, str>) -> Currency {
        match CREDIT_NAMES.iter().find(|known| **known == name) {
            Some(known) => Currency(Cow::Borrowed(known)),
            None => Currency(Cow::Owned(name.into_owned())),
        }
    }

    /// The name as the server sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name reads as credits, the unit of legacy `final_unit_deduction` and of a
    /// credit budget: `credit`, `credits`, `unit` or `units`, in any ASCII case (Kling's
    /// resource packs count in credits and its mock writes `"credit"`). Any other name (`USD`,
    /// `CNY`, `points`) is not: a cost in it cannot be added to credits, and taken for them
    /// it would under-count a budget, where an unknown name left out only keeps an estimate.
    pub fn is_credits(&self) -> bool {
        CREDIT_NAMES
            .iter()
            .any(|known| known.eq_ignore_ascii_case(&self.0))
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TaskReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<ShownUrl<'_>> = self.urls.iter().map(|url| ShownUrl(url)).collect();
        f.debug_struct("TaskReport")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("generation", &self.generation)
            .field("external_id", &self.external_id)
            .field("failure", &self.failure)
            .field("urls", &urls)
            .field("cost", &self.cost)
            .field("cost_currency", &self.cost_currency)
            .finish()
    }
}

/// A URL as `Debug` shows it: without its user info (`user:password@`), query or fragment,
/// where a signature, a token or a password sits; `…` marks what was cut.
struct ShownUrl<'a>(&'a str);

impl fmt::Debug for ShownUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.0;
        let kept = url.find(['?', '#']).map_or(url, |end| &url[..end]);
        // User info sits between `://` and an `@` before the path.
        let (scheme, rest) = match kept.find("://") {
            Some(at) => kept.split_at(at + 3),
            None => ("", kept),
        };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (rest, user_cut) = match rest[..authority_end].rfind('@') {
            Some(at) => (&rest[at + 1..], true),
            None => (rest, false),
        };
        let user = if user_cut { "…@" } else { "" };
        let tail = if kept.len() == url.len() { "" } else { "?…" };
        fmt::Debug::fmt(&format!("{scheme}{user}{rest}{tail}"), f)
    }
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
    /// Whether `data` was a list every element of which was read as one task (see
    /// [`Outcome::lists_every_task`](crate::Outcome::lists_every_task)). Kept from the one
    /// read: a second read of the body to learn it cost thousands of instructions.
    pub(crate) lists_every_task: bool,
}

/// What `data`, or an element of a `data` list, turned out to be, as both readers record it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum DataShape {
    /// One task object that reported a task (no page: it holds no `tasks` key).
    Task,
    /// A list, `whole` when every element of it was a [`DataShape::Task`].
    List {
        /// Every element was read as one task (`[]` included).
        whole: bool,
    },
    /// Anything else: a page, an object that reports no task, `null`, a scalar.
    #[default]
    Other,
}

impl DataShape {
    /// Whether this `data` makes the tasks read the whole list.
    pub(crate) fn lists_every_task(self) -> bool {
        self == DataShape::List { whole: true }
    }
}

impl Envelope {
    /// Parses an envelope; a body that is not JSON or has no numeric `code` is an error. An
    /// error envelope whose fields do not all read keeps its code (even one written as
    /// `"1102"` or `1102.0`, twice alike, or beside a text JSON forbids: a raw control
    /// character, an escape that is none), and a task's optional fields of an odd type are
    /// left out. The error says what was wrong and where (the field's path, such as
    /// `data.tasks[0].status`, the kind of its value, the type expected, the line and column),
    /// never quoting a value from the body: a gateway's page may echo the request's credential.
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
            return Err(de::Error::custom(NOT_AN_OBJECT));
        }
        let raw = match parse_raw::<RawEnvelope<'_>>(body) {
            Ok(raw) => raw,
            // An error code with a field of an odd type elsewhere (`"data":{"status":429}`, a
            // numeric `request_id`): its code is what the layers act on, so it is kept, with no
            // task. A success is not: its task is what the caller asked for, and a create whose
            // answer cannot be read must stay one of unknown outcome.
            // The code is read on its own first, so that texts it cannot read (a lone
            // surrogate, a key written twice) do not hide it; the texts are kept when they read.
            Err(e) => return error_envelope(body).ok_or_else(|| without_values(e, body)),
        };
        Ok(Envelope {
            code: Code::from_i64(raw.code),
            message: raw.message.map(Cow::into_owned).unwrap_or_default(),
            request_id: raw.request_id.map(Cow::into_owned),
            lists_every_task: raw.data.shape.lists_every_task(),
            tasks: raw.data.reports,
        })
    }

    /// The tasks a callback body reports, as [`Envelope::parse_callback`] reads them; a body
    /// that reports none is an error that says why (see [`CallbackError`]), for a callback
    /// route to log.
    ///
    /// ```
    /// use kling_core::Envelope;
    ///
    /// let tasks = Envelope::read_callback(br#"{"task_id":"t1","task_status":"succeed"}"#);
    /// assert_eq!(tasks.unwrap()[0].id, "t1");
    /// let error = Envelope::read_callback(br#"{"task_id":"","task_status":"succeed"}"#);
    /// assert!(error.unwrap_err().to_string().contains("has an empty `task_id`"));
    /// ```
    pub fn read_callback(body: &[u8]) -> Result<Vec<TaskReport>, CallbackError> {
        match Envelope::parse_callback(body) {
            Ok(tasks) if !tasks.is_empty() => Ok(tasks),
            // Not one JSON value: the parse error says where.
            Err(e) if !e.is_data() => Err(CallbackError {
                reason: "the callback body is not one JSON value".into(),
                json: Some(e),
            }),
            read => Err(CallbackError {
                reason: match why_no_task(body) {
                    Some(reason) => format!("the callback reports no task: {reason}"),
                    None => match read {
                        Err(e) => format!("the callback reports no task: {e}"),
                        Ok(_) => "the callback reports no task".into(),
                    },
                },
                json: None,
            }),
        }
    }

    /// The tasks a callback body reports: the bare task object Kling posts (either
    /// generation), or a whole `{code, data}` envelope. A body that reports no task is `Ok`
    /// with none; one that is not JSON is the parse error, and one whose task cannot be read
    /// (a `task_id` of 20 digits) an error that names the field, never quoting a value. A
    /// byte-order mark in front is no part of the JSON, as for [`Envelope::parse`], and an
    /// error's place is counted after it. [`Envelope::read_callback`] also says why a body
    /// reports no task.
    pub fn parse_callback(body: &[u8]) -> Result<Vec<TaskReport>, serde_json::Error> {
        if let Ok(envelope) = Envelope::parse(body)
            && !envelope.tasks.is_empty()
        {
            return Ok(envelope.tasks);
        }
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        // A bare task object has no `code`: read it as the `data` of a success envelope, once
        // the body is known to be one JSON value (spliced in as it is, `{..},"x":0` would
        // close the object early and still read).
        serde_json::from_slice::<serde::de::IgnoredAny>(body)?;
        let mut wrapped = Vec::with_capacity(body.len() + 20);
        wrapped.extend_from_slice(WRAPPING);
        wrapped.extend_from_slice(body);
        wrapped.push(b'}');
        // The error's place would be in the wrapped body, not in the one sent: the reason
        // instead. Where none can be found (the body nests past serde_json's limit, or holds a
        // text it cannot read elsewhere), the error is no serde message, which may quote the
        // value (`invalid type: string "…"`), but says where, in the body as sent.
        Envelope::parse(&wrapped)
            .map(|envelope| envelope.tasks)
            .map_err(|e| {
                let reason = why_no_task(body).unwrap_or_else(|| {
                    // The wrapping added `{"code":0,"data":` to the first line only.
                    let column = match e.line() {
                        1 => e.column().saturating_sub(WRAPPING.len()),
                        _ => e.column(),
                    };
                    format!(
                        "a field is of a type no task has, at line {} column {column}",
                        e.line()
                    )
                });
                de::Error::custom(reason)
            })
    }
}

/// An error envelope's code and texts, read when the whole envelope cannot be; `None` for a
/// success (code 0) or a body with no code that reads. Texts that JSON forbids (a raw control
/// character, an escape that is none) are read as a lenient parser reads them
/// ([`lenient_texts`]): they hid the code with the whole body, and a 429's 1102 was retried
/// as throttling.
#[cold]
#[inline(never)]
fn error_envelope(body: &[u8]) -> Option<Envelope> {
    let read = |body: &[u8]| {
        let head = parse_raw::<RawErrorCode>(body)
            .ok()
            .filter(|head| head.code.0 != 0)?;
        let message = parse_raw::<RawErrorMessage<'_>>(body).ok();
        let request_id = parse_raw::<RawErrorRequestId<'_>>(body).ok();
        Some(Envelope {
            code: Code::from_i64(head.code.0),
            message: message
                .and_then(|m| m.message.0)
                .map(Cow::into_owned)
                .unwrap_or_default(),
            request_id: request_id.and_then(|r| r.request_id.0).map(Cow::into_owned),
            tasks: Vec::new(),
            // `data` was not read.
            lists_every_task: false,
        })
    };
    read(body).or_else(|| read(&lenient_texts(body, true)?))
}

/// `body` with what JSON forbids inside its strings written as JSON allows, read as a lenient
/// parser reads it, or `None` when there is none: a control character as its `\u00XX` escape
/// (the same text) and, when `escapes`, the `\` of an escape that is none (`\d` of a Windows
/// path, `\u12zz`, a `\` before a control character) as `\\` (kept as written); without
/// `escapes`, such an escape is `None`: rewriting only the control character after a `\`
/// would make a valid `\\` of the pair, and `e\<LF>` be read as the id `e\u000a`. Only
/// strings change, and a key keeps the character or `\` that made it odd, so no key becomes
/// another and no number changes. One pass, at most six bytes out for one in.
pub(crate) fn lenient_texts(body: &[u8], escapes: bool) -> Option<Vec<u8>> {
    let mut text = Vec::with_capacity(body.len() + 16);
    let mut changed = false;
    let mut in_string = false;
    let mut at = 0;
    while let Some(&byte) = body.get(at) {
        let mut step = 1;
        match byte {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                step = match body.get(at + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 2,
                    Some(b'u')
                        if body
                            .get(at + 2..at + 6)
                            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) =>
                    {
                        6
                    }
                    _ if escapes => {
                        text.push(b'\\');
                        changed = true;
                        1
                    }
                    _ => return None,
                };
            }
            0x00..=0x1F if in_string => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let escape = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0xF)],
                ];
                text.extend_from_slice(&escape);
                changed = true;
                at += 1;
                continue;
            }
            _ => {}
        }
        text.extend_from_slice(&body[at..(at + step).min(body.len())]);
        at += step;
    }
    changed.then_some(text)
}

/// What [`Envelope::parse_callback`] puts before a bare task object to read it as an envelope.
const WRAPPING: &[u8] = br#"{"code":0,"data":"#;

/// Why a callback body reports no task ([`Envelope::read_callback`]): it is not one JSON
/// value ([`is_json`](CallbackError::is_json), the parse error its
/// [`source`](std::error::Error::source)), or it names no task, and the message says what is
/// missing or of the wrong type ("the callback reports no task: the task object has an empty
/// `task_id`"). It names fields and types, never a value from the body.
#[derive(Debug)]
pub struct CallbackError {
    reason: String,
    json: Option<serde_json::Error>,
}

impl CallbackError {
    /// Whether the body is not one JSON value (rather than JSON that names no task).
    pub fn is_json(&self) -> bool {
        self.json.is_some()
    }
}

impl fmt::Display for CallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.json {
            Some(e) => write!(f, "{}: {e}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for CallbackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.json.as_ref().map(|e| e as _)
    }
}

/// Why a callback body that is JSON reports no task, in words: `None` when it is no JSON (or a
/// reason cannot be found).
fn why_no_task(body: &[u8]) -> Option<String> {
    use serde_json::{Map, Value};

    fn kind(value: &Value) -> &'static str {
        match value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
    /// Why a task object names no task, as `RawTask::into_report` reads it.
    fn task(map: &Map<String, Value>) -> String {
        let legacy = map.contains_key("task_id") || map.contains_key("task_status");
        if !legacy && !map.contains_key("id") && !map.contains_key("status") {
            return "names no task: no `task_id` or `id`".into();
        }
        let (id, status) = if legacy {
            ("task_id", "task_status")
        } else {
            ("id", "status")
        };
        match map.get(id) {
            None | Some(Value::Null) => format!("has no `{id}`"),
            Some(Value::String(text)) if text.is_empty() => format!("has an empty `{id}`"),
            Some(Value::Number(n)) if !n.is_i64() && !n.is_u64() => {
                format!("is unreadable: `{id}` is a number but no 64-bit integer")
            }
            Some(Value::String(_) | Value::Number(_)) => match map.get(status) {
                None | Some(Value::Null) => format!("has no `{status}`"),
                Some(other) => {
                    format!("is unreadable: `{status}` is {}, not a string", kind(other))
                }
            },
            Some(other) => format!(
                "is unreadable: `{id}` is {}, not a string or an integer",
                kind(other)
            ),
        }
    }
    /// Why a list of tasks (`name`) names none.
    fn list(name: &str, value: &Value) -> String {
        match value {
            Value::Array(items) => match items.first() {
                None => format!("{name} is an empty list"),
                Some(Value::Object(first)) => {
                    format!(
                        "no element of {name} names a task; the first {}",
                        task(first)
                    )
                }
                Some(first) => format!(
                    "no element of {name} names a task; the first is {}",
                    kind(first)
                ),
            },
            other => format!("{name} is {}, not a list", kind(other)),
        }
    }

    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let value = serde_json::from_slice::<Value>(body).ok()?;
    let Value::Object(map) = &value else {
        return Some(format!(
            "the body is {}, not a task object or an envelope",
            kind(&value)
        ));
    };
    let Some(code) = map.get("code") else {
        return Some(match map.get("tasks") {
            Some(tasks) => list("`tasks`", tasks),
            None => format!("the task object {}", task(map)),
        });
    };
    Some(match (code.as_i64(), map.get("data")) {
        (Some(0), None | Some(Value::Null)) => "the envelope has no `data`".into(),
        (Some(0), Some(Value::Object(data))) => match data.get("tasks") {
            Some(tasks) => list("the envelope's `data.tasks`", tasks),
            None => format!("the envelope's `data` task object {}", task(data)),
        },
        (Some(0), Some(data @ Value::Array(_))) => list("the envelope's `data`", data),
        (Some(0), Some(data)) => {
            format!("the envelope's `data` is {}, not a task object", kind(data))
        }
        (Some(code), _) => format!("the body is an error envelope (code {code})"),
        (None, _) => format!("the envelope's `code` is {}, not an integer", kind(code)),
    })
}

/// The error of an envelope that is a JSON array.
const NOT_AN_OBJECT: &str = "an envelope must be a JSON object, not an array";

/// The error of a task id that is a number but no 64-bit integer.
const TASK_ID_NOT_AN_INTEGER: &str =
    "a task id that is a number must be an integer of at most 64 bits";

/// `error` as a log may carry it, naming the field it is about and placed where it was.
///
/// serde_json's data errors quote the value they could not read (`invalid type: string
/// "Bearer ak-…", expected i64`), and a body may hold anything: a gateway's page that echoes the
/// request's `Authorization` in its `code`, say. Here the value gives way to its kind, and a
/// message of any other form, which might quote one, gives way to one that names none. Nor do
/// they name the field, so a log could not tell what the server sent wrong without the body:
/// its path is read from `body`, the text that was parsed (``invalid type at
/// `data.tasks[0].status`: a number, expected a string at line 1 column 45``). A syntax or
/// end-of-input error names no value (its words are serde_json's own) and is returned as it
/// is. Only errors come here: a body that reads costs nothing more.
#[cold]
#[inline(never)]
fn without_values(error: serde_json::Error, body: &[u8]) -> serde_json::Error {
    if !error.is_data() {
        return error;
    }
    let text = error.to_string();
    let place = format!(" at line {} column {}", error.line(), error.column());
    let message = text.strip_suffix(&place).unwrap_or(&text);
    let path = field_path(body, error.line(), error.column());
    let told = value_free(message, path.as_deref());
    if error.line() == 0 {
        de::Error::custom(told)
    } else {
        de::Error::custom(format_args!("{told}{place}"))
    }
}

/// A data error's message with no value from the body in it (see [`without_values`]), naming
/// the field at `path` when it is known.
fn value_free<'m>(message: &'m str, path: Option<&str>) -> Cow<'m, str> {
    // A kind for each of serde's `Unexpected`s a JSON value can be, by how it is written.
    fn kind(unexpected: &str) -> &'static str {
        const KINDS: [(&str, &str); 8] = [
            ("string ", "a string"),
            ("integer ", "an integer"),
            ("floating point ", "a number"),
            ("boolean ", "a boolean"),
            ("null", "null"),
            ("map", "an object"),
            ("sequence", "an array"),
            ("unit", "null"),
        ];
        KINDS
            .iter()
            .find(|(written, _)| unexpected.starts_with(written))
            .map_or("a value", |&(_, kind)| kind)
    }
    // serde's names for the types this crate reads, in JSON's words.
    fn expectation(expected: &str) -> &str {
        match expected {
            "i64" => "a 64-bit integer",
            "a sequence" => "an array",
            "struct RawEnvelope" => "an envelope object",
            other => other,
        }
    }
    let at = path.map_or_else(String::new, |path| format!(" at `{path}`"));
    if message == TASK_ID_NOT_AN_INTEGER {
        return Cow::Owned(format!(
            "invalid value{at}: a number, expected a task id that is a string or an integer \
             of at most 64 bits"
        ));
    }
    if message == NOT_AN_OBJECT {
        return Cow::Borrowed(message);
    }
    for lead in ["invalid type", "invalid value"] {
        // The expectation comes last, in serde's or this crate's words (none of which holds
        // `, expected `): the value before it may hold anything.
        if let Some((unexpected, expected)) = message
            .strip_prefix(lead)
            .and_then(|rest| rest.strip_prefix(": "))
            .and_then(|rest| rest.rsplit_once(", expected "))
        {
            return Cow::Owned(format!(
                "{lead}{at}: {}, expected {}",
                kind(unexpected),
                expectation(expected)
            ));
        }
    }
    // A field's name in serde's derive is this crate's (`missing field `code``): kept when it
    // reads as one, after the path of its object.
    for lead in ["missing field `", "duplicate field `"] {
        if let Some(name) = message
            .strip_prefix(lead)
            .and_then(|rest| rest.strip_suffix('`'))
            && !name.is_empty()
            && name.len() <= 32
            && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            // A duplicate is placed after its key, so the path ends in it; a missing field is
            // placed at its object's end, so the path is the object's.
            return match path {
                Some(path) if path == name || path.ends_with(&format!(".{name}")) => {
                    Cow::Owned(format!("{lead}{path}`"))
                }
                Some(path) => Cow::Owned(format!("{lead}{path}.{name}`")),
                None => Cow::Borrowed(message),
            };
        }
    }
    Cow::Owned(format!("a value{at} is of a type or form no envelope has"))
}

/// The path (`data.tasks[0].status`) of the field at an error's place in `body`: the keys and
/// indexes of the objects and arrays open there, each object's by the last key read in it.
///
/// serde_json places a data error just after the value it could not read, or at or just after
/// the `{` or `[` that opened it (after its `}` or `]` when it is empty), or after a key written
/// twice, or after the `}` of an object missing a field: each reads as the field's path (the
/// last as its object's). The body is JSON up to there (serde_json read it), so a plain walk
/// of its tokens is enough. `None` without a place or at the top level; a key that is none of
/// the envelope's field names (escapes read) is shown as `?`, so the path quotes nothing from
/// the body but this crate's field names.
fn field_path(body: &[u8], line: usize, column: usize) -> Option<String> {
    enum Open {
        Object {
            key: Option<&'static str>,
            in_key: bool,
        },
        /// `begun` once the element at `index` has started: an array just opened, at whose
        /// `[` serde_json placed an error about the array itself, adds no index.
        Array { index: usize, begun: bool },
    }
    if line == 0 {
        return None;
    }
    // serde_json counts lines by `\n` and a column as the bytes before the place in its line.
    let line_start = if line == 1 {
        0
    } else {
        body.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'\n')
            .nth(line - 2)
            .map(|(at, _)| at + 1)?
    };
    let end = line_start.saturating_add(column).min(body.len());
    let mut open: Vec<Open> = Vec::new();
    let mut at = 0;
    while at < end {
        let byte = body[at];
        if !matches!(
            byte,
            b'}' | b']' | b',' | b':' | b' ' | b'\t' | b'\n' | b'\r'
        ) && let Some(Open::Array { begun, .. }) = open.last_mut()
        {
            *begun = true;
        }
        match byte {
            b'{' => open.push(Open::Object {
                key: None,
                in_key: true,
            }),
            b'[' => open.push(Open::Array {
                index: 0,
                begun: false,
            }),
            b'}' | b']' => {
                open.pop();
            }
            b',' => match open.last_mut() {
                Some(Open::Object { in_key, .. }) => *in_key = true,
                Some(Open::Array { index, begun }) => {
                    *index += 1;
                    *begun = false;
                }
                None => {}
            },
            b':' => {
                if let Some(Open::Object { in_key, .. }) = open.last_mut() {
                    *in_key = false;
                }
            }
            b'"' => {
                let start = at;
                at += 1;
                while at < body.len() && body[at] != b'"' {
                    at += if body[at] == b'\\' { 2 } else { 1 };
                }
                if let Some(Open::Object { key, in_key: true }) = open.last_mut() {
                    let written = body.get(start..=at).unwrap_or_default();
                    *key = Some(key_name(written));
                }
            }
            _ => {}
        }
        at += 1;
    }
    let mut path = String::new();
    for step in &open {
        match step {
            Open::Object { key: Some(key), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Open::Object { key: None, .. } | Open::Array { begun: false, .. } => {}
            Open::Array { index, .. } => path.push_str(&format!("[{index}]")),
        }
    }
    (!path.is_empty()).then_some(path)
}

/// A key as a path shows it: its name when it is one of the envelope's field names
/// ([`FIELD_NAMES`], escapes read), else `?`. Any other key is the server's (one inside a
/// task's free-form `task_info`, say) and may be a token: a key from the body is never quoted.
fn key_name(written: &[u8]) -> &'static str {
    let known = |name: &[u8]| {
        FIELD_NAMES
            .iter()
            .copied()
            .find(|field| field.as_bytes() == name)
    };
    // `written` is the key with its quotes; only one with an escape needs reading.
    let inner = written
        .get(1..written.len().saturating_sub(1))
        .unwrap_or_default();
    let name = if inner.contains(&b'\\') {
        serde_json::from_slice::<String>(written)
            .ok()
            .and_then(|name| known(name.as_bytes()))
    } else {
        known(inner)
    };
    name.unwrap_or("?")
}

/// Every field name the envelope's readers (`RawEnvelope`, `RawTask` and the structs of a
/// task's optional fields) read: the only keys [`field_path`] shows.
const FIELD_NAMES: [&str; 22] = [
    "code",
    "message",
    "request_id",
    "data",
    "task_id",
    "task_status",
    "task_status_msg",
    "task_info",
    "task_result",
    "final_unit_deduction",
    "id",
    "status",
    "external_id",
    "outputs",
    "billing",
    "tasks",
    "external_task_id",
    "videos",
    "images",
    "url",
    "amount",
    "currency",
];

/// One UTF-8 check of the whole body (a word at a time for ASCII) instead of one per string,
/// which is what `from_slice` does; a body that is not UTF-8 still goes through `from_slice`,
/// so it fails where and how it did.
fn parse_raw<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

/// An error envelope's code, read when the whole envelope cannot be: every other field is
/// skipped (the texts included: each is read on its own, so one that does not read loses
/// only itself). A `code` written twice with one value is that value (the typed parse
/// refuses the duplicate; parsers that take the last value read the same code); two
/// different values are serde's "duplicate field".
struct RawErrorCode {
    code: LooseCode,
}

impl<'de> Deserialize<'de> for RawErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Whether an object key is `code` (escapes read).
        struct IsCode(bool);
        impl<'de> Deserialize<'de> for IsCode {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct KeyVisitor;
                impl Visitor<'_> for KeyVisitor {
                    type Value = IsCode;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<IsCode, E> {
                        Ok(IsCode(v == "code"))
                    }
                }
                deserializer.deserialize_identifier(KeyVisitor)
            }
        }
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = RawErrorCode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an envelope object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawErrorCode, A::Error> {
                let mut code = None;
                while let Some(IsCode(is_code)) = map.next_key()? {
                    if !is_code {
                        map.next_value::<de::IgnoredAny>()?;
                        continue;
                    }
                    let LooseCode(value) = map.next_value()?;
                    if code.is_some_and(|first| first != value) {
                        return Err(de::Error::duplicate_field("code"));
                    }
                    code = Some(value);
                }
                code.map(|code| RawErrorCode {
                    code: LooseCode(code),
                })
                .ok_or_else(|| de::Error::missing_field("code"))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// An error envelope's message, when it reads (text or a number; any other type is none).
#[derive(Deserialize)]
struct RawErrorMessage<'a> {
    #[serde(default, borrow)]
    message: Loose<'a>,
}

/// An error envelope's request id, when it reads (text or a number; any other type is none).
#[derive(Deserialize)]
struct RawErrorRequestId<'a> {
    #[serde(default, borrow)]
    request_id: Loose<'a>,
}

/// An error code however a proxy or gateway wrote it: an integer, an integral float
/// (`1102.0`) or an integer in a string (`"1102"`). Only read once the envelope as a whole
/// cannot be, where a code missed would turn a never-retry refusal (1102) into a malformed 429
/// that is retried.
struct LooseCode(i64);

impl<'de> Deserialize<'de> for LooseCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CodeVisitor;
        impl Visitor<'_> for CodeVisitor {
            type Value = LooseCode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer code")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LooseCode, E> {
                Ok(LooseCode(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LooseCode, E> {
                i64::try_from(v)
                    .map(LooseCode)
                    .map_err(|_| E::custom("code out of range"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<LooseCode, E> {
                #[allow(clippy::cast_possible_truncation, clippy::float_cmp)]
                let code = v as i64;
                #[allow(clippy::cast_precision_loss, clippy::float_cmp)]
                if v.is_finite() && code as f64 == v && code.unsigned_abs() < 1 << 52 {
                    Ok(LooseCode(code))
                } else {
                    Err(E::custom("code is not an integer"))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LooseCode, E> {
                v.trim()
                    .parse()
                    .map(LooseCode)
                    .map_err(|_| E::custom("code is not an integer"))
            }
        }
        deserializer.deserialize_any(CodeVisitor)
    }
}

/// A string or number as text; anything else (an object, an array, `true`, `null`) as none.
/// With `FRACTIONS` false (a `LooseId`), so is a number that serde_json reads as no 64-bit
/// integer: its `f64` text can be another id.
#[derive(Default)]
struct Loose<'a, const FRACTIONS: bool = true>(Option<Cow<'a, str>>);

/// An external id: a string or an integer (in 64 bits) as text; anything else as none.
type LooseId<'a> = Loose<'a, false>;

impl<'de: 'a, 'a, const FRACTIONS: bool> Deserialize<'de> for Loose<'a, FRACTIONS> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LooseVisitor<const FRACTIONS: bool>;
        impl<'de, const FRACTIONS: bool> Visitor<'de> for LooseVisitor<FRACTIONS> {
            type Value = Loose<'de, FRACTIONS>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Loose(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Loose(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Loose(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Loose(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Loose(FRACTIONS.then(|| Cow::Owned(v.to_string()))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Loose(None))
            }
        }
        deserializer.deserialize_any(LooseVisitor::<FRACTIONS>)
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
struct Tasks {
    reports: Vec<TaskReport>,
    shape: DataShape,
}

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
        let mut whole = true;
        // Each element is read like `data` itself, so an odd element reports nothing
        // instead of failing the whole envelope.
        while let Some(found) = seq.next_element::<Tasks>()? {
            whole &= found.shape == DataShape::Task;
            tasks.extend(found.reports);
        }
        Ok(Tasks {
            reports: tasks,
            shape: DataShape::List { whole },
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Tasks, A::Error> {
        let task = RawTask::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let mut tasks = Vec::new();
        let mut shape = DataShape::Other;
        match task.tasks {
            Some(Some(page)) => tasks.extend(
                page.into_iter()
                    .filter_map(|item| item.0)
                    .filter_map(RawTask::into_report),
            ),
            // `"tasks": null` reads as no page, but an object with the key is still no task
            // of a list's (the scanner's rule too).
            Some(None) => tasks.extend(task.into_report()),
            None => {
                tasks.extend(task.into_report());
                if !tasks.is_empty() {
                    shape = DataShape::Task;
                }
            }
        }
        Ok(Tasks {
            reports: tasks,
            shape,
        })
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
    task_status_msg: Loose<'a>,
    #[serde(default, borrow)]
    task_info: LooseItem<TaskInfo<'a>>,
    #[serde(default, borrow)]
    task_result: LooseItem<TaskResult<'a>>,
    #[serde(default, borrow)]
    final_unit_deduction: Loose<'a>,
    #[serde(default, borrow)]
    id: Option<Text<'a>>,
    #[serde(default, borrow)]
    status: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Loose<'a>,
    #[serde(default, borrow)]
    external_id: LooseId<'a>,
    #[serde(default, borrow)]
    outputs: Option<LooseList<Output<'a>>>,
    #[serde(default, borrow)]
    billing: Option<BillingList<'a>>,
    /// A page's tasks; an element that is no object reports nothing (serde's derive would read
    /// an array as a task, its fields by position). `Some(None)` is a `"tasks": null`: no
    /// page, yet no plain task either, for [`DataShape`].
    #[serde(default, borrow, deserialize_with = "present")]
    tasks: Option<Option<Vec<LooseItem<RawTask<'a>>>>>,
}

/// A field's value, read only when the key is there: `Some(None)` tells a `null` written from
/// a key left out (serde's `Option` reads both as `None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

impl RawTask<'_> {
    fn into_report(self) -> Option<TaskReport> {
        // An empty id names no task, as a missing or `null` one.
        let task_id = self.task_id.as_ref().filter(|id| !id.0.is_empty());
        if let (Some(id), Some(status)) = (task_id, &self.task_status) {
            let mut urls = Vec::new();
            if let Some(result) = self.task_result.0 {
                urls.extend(result.videos.0.into_iter().filter_map(|m| m.url.0));
                urls.extend(result.images.0.into_iter().filter_map(|m| m.url.0));
            }
            return Some(TaskReport {
                id: String::from(&*id.0),
                status: TaskStatus::parse(status),
                generation: ApiGeneration::Legacy,
                external_id: self
                    .task_info
                    .0
                    .and_then(|info| info.external_task_id.0)
                    .filter(|e| !e.is_empty())
                    .map(Cow::into_owned),
                failure: self.task_status_msg.0.map(Cow::into_owned),
                urls: urls.into_iter().map(Cow::into_owned).collect(),
                cost: self
                    .final_unit_deduction
                    .0
                    .and_then(|d| d.trim().parse::<f64>().ok())
                    .filter(|v| v.is_finite() && *v >= 0.0),
                cost_currency: None,
            });
        }
        let id = self.id.as_ref().filter(|id| !id.0.is_empty());
        let (Some(id), Some(status)) = (id, &self.status) else {
            return None;
        };
        let (cost, cost_currency) = self.billing.map_or((None, None), |b| billing_cost(b.0));
        Some(TaskReport {
            id: String::from(&*id.0),
            status: TaskStatus::parse(status),
            generation: ApiGeneration::New,
            external_id: self
                .external_id
                .0
                .filter(|e| !e.is_empty())
                .map(Cow::into_owned),
            failure: self.message.0.map(Cow::into_owned),
            urls: self
                .outputs
                .into_iter()
                .flat_map(|o| o.0)
                .filter_map(|o| o.url.0.map(Cow::into_owned))
                .collect(),
            cost,
            cost_currency,
        })
    }
}

/// The sum of the items' amounts and the currency they name, when those with an amount name
/// at most one (see [`TaskReport::cost`]); the scanner's `billing` keeps the same rule. Billing
/// that cannot be read (`None`: no list, an element that is no object), an amount that is no
/// number or below zero, a currency of no readable kind beside an amount, or a sum past `f64`
/// is no cost: summed as nothing, it read as a cheaper or free task to a spend guard.
fn billing_cost(items: Option<Vec<Billing<'_>>>) -> (Option<f64>, Option<Currency>) {
    let Some(items) = items else {
        return (None, None);
    };
    let unreadable = items.iter().any(|item| match item.amount {
        Amount::Unreadable => true,
        Amount::Value(amount) => amount < 0.0 || matches!(item.currency, Named::Unreadable),
        Amount::Absent => false,
    });
    if unreadable {
        return (None, None);
    }
    let sum: f64 = items.iter().filter_map(|item| item.amount.value()).sum();
    if !sum.is_finite() {
        return (None, None);
    }
    let mut named = items
        .into_iter()
        .filter(|item| item.amount.value().is_some())
        .filter_map(|item| match item.currency {
            Named::Text(c) if !c.is_empty() => Some(c),
            _ => None,
        });
    let Some(first) = named.next() else {
        return (Some(sum), None);
    };
    if named.any(|other| other != first) {
        return (None, None);
    }
    (Some(sum), Some(Currency::new(first)))
}

// A task's optional fields read loosely: one of an odd type (a deduction as an object, a URL
// that is a number, a billing list that is not a list) is left out, where failing would make
// the whole answer unreadable — for a batch query, every task in it, so none would free its
// slot. The task's id and status stay strict: without them there is no task to report.

#[derive(Deserialize)]
struct TaskInfo<'a> {
    #[serde(default, borrow)]
    external_task_id: LooseId<'a>,
}

#[derive(Deserialize)]
struct TaskResult<'a> {
    #[serde(default, borrow)]
    videos: LooseList<Media<'a>>,
    #[serde(default, borrow)]
    images: LooseList<Media<'a>>,
}

#[derive(Deserialize)]
struct Media<'a> {
    #[serde(default, borrow)]
    url: Loose<'a>,
}

#[derive(Deserialize)]
struct Output<'a> {
    #[serde(default, borrow)]
    url: Loose<'a>,
}

#[derive(Deserialize)]
struct Billing<'a> {
    #[serde(default)]
    amount: Amount,
    #[serde(default, borrow)]
    currency: Named<'a>,
}

/// `billing` as read: its items, or `None` when it is no list or holds an element that is no
/// object (read as nothing, it was a cost of zero).
struct BillingList<'a>(Option<Vec<Billing<'a>>>);

impl<'de: 'a, 'a> Deserialize<'de> for BillingList<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = BillingList<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Some(Vec::new());
                // Every element is read (a malformed one still fails the envelope), even
                // after one that is no object.
                while let Some(LooseItem(item)) = seq.next_element::<LooseItem<Billing<'de>>>()? {
                    match (item, items.as_mut()) {
                        (Some(item), Some(items)) => items.push(item),
                        (None, _) => items = None,
                        (Some(_), None) => {}
                    }
                }
                Ok(BillingList(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(BillingList(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(BillingList(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(BillingList(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(BillingList(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(BillingList(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(BillingList(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(BillingList(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(BillingList(None))
            }
        }
        deserializer.deserialize_any(ListVisitor)
    }
}

/// A billing amount: a number or a number in a string (the legacy API sends money as text);
/// missing, `null` or `""` is none, any other value (`true`, `"1,5"`, one past `f64`) one
/// that cannot be read.
#[derive(Default)]
enum Amount {
    #[default]
    Absent,
    Value(f64),
    Unreadable,
}

impl Amount {
    fn value(&self) -> Option<f64> {
        match self {
            Amount::Value(v) => Some(*v),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `Named` reads `null` as absent and other kinds as unreadable, as an amount is.
        let text = match Named::deserialize(deserializer)? {
            Named::Text(text) if !text.is_empty() => text,
            Named::Text(_) | Named::Absent => return Ok(Amount::Absent),
            Named::Unreadable => return Ok(Amount::Unreadable),
        };
        Ok(text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map_or(Amount::Unreadable, Amount::Value))
    }
}

/// A billing currency: a string, or a number as its text; missing or `null` is none, and any
/// other value (an object, a list, a boolean) one that cannot be read, which is no currency
/// named (that was credits to a spend guard).
#[derive(Default)]
enum Named<'a> {
    #[default]
    Absent,
    Text(Cow<'a, str>),
    Unreadable,
}

impl<'de: 'a, 'a> Deserialize<'de> for Named<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamedVisitor;
        impl<'de> Visitor<'de> for NamedVisitor {
            type Value = Named<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Named::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Named::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Named::Text(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Named::Text(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Named::Text(Cow::Owned(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Named::Unreadable)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Named::Absent)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Named::Absent)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Named::Unreadable)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Named::Unreadable)
            }
        }
        deserializer.deserialize_any(NamedVisitor)
    }
}

/// An object read as `T`; any other value (a string, a list, `null`) as none.
struct LooseItem<T>(Option<T>);

impl<T> Default for LooseItem<T> {
    fn default() -> Self {
        LooseItem(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for LooseItem<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ItemVisitor<T> {
            type Value = LooseItem<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LooseItem<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| LooseItem(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LooseItem<T>, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(LooseItem(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<LooseItem<T>, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_none<E: de::Error>(self) -> Result<LooseItem<T>, E> {
                Ok(LooseItem(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<LooseItem<T>, E> {
                Ok(LooseItem(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LooseItem<T>, E> {
                Ok(LooseItem(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<LooseItem<T>, E> {
                Ok(LooseItem(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<LooseItem<T>, E> {
                Ok(LooseItem(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<LooseItem<T>, E> {
                Ok(LooseItem(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LooseItem<T>, E> {
                Ok(LooseItem(None))
            }
        }
        deserializer.deserialize_any(ItemVisitor(std::marker::PhantomData))
    }
}

/// A list whose object elements are read as `T` (others left out); any value that is not a
/// list as an empty one.
struct LooseList<T>(Vec<T>);

impl<T> Default for LooseList<T> {
    fn default() -> Self {
        LooseList(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for LooseList<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = LooseList<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LooseList<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(LooseItem(item)) = seq.next_element::<LooseItem<T>>()? {
                    items.extend(item);
                }
                Ok(LooseList(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LooseList<T>, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(LooseList(Vec::new()))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<LooseList<T>, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_none<E: de::Error>(self) -> Result<LooseList<T>, E> {
                Ok(LooseList(Vec::new()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<LooseList<T>, E> {
                Ok(LooseList(Vec::new()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LooseList<T>, E> {
                Ok(LooseList(Vec::new()))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<LooseList<T>, E> {
                Ok(LooseList(Vec::new()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<LooseList<T>, E> {
                Ok(LooseList(Vec::new()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<LooseList<T>, E> {
                Ok(LooseList(Vec::new()))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LooseList<T>, E> {
                Ok(LooseList(Vec::new()))
            }
        }
        deserializer.deserialize_any(ListVisitor(std::marker::PhantomData))
    }
}

/// A task id: a string, or an integer (in 64 bits) kept as its text. Any other number (a
/// fraction, an exponent, an integer past 64 bits) is an error: serde_json reads it as an `f64`,
/// whose text can be another id (`86000000000000000012345` and `…012346` both read
/// `86000000000000000000000`), and a wrong id would end or look up another task.
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
                f.write_str("a string or an integer")
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
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text<'de>, E> {
                Err(E::custom(TASK_ID_NOT_AN_INTEGER))
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

    /// An error code that a proxy wrote oddly, or beside texts that do not read, is still the
    /// code: read as malformed, a 429's 1102 would be retried as throttling.
    #[test]
    fn an_error_code_survives_texts_that_do_not_read_and_odd_spellings() {
        let bodies: [&[u8]; 5] = [
            br#"{"code":1102,"message":"\ud83d","request_id":"r"}"#,
            br#"{"code":1102,"message":"a","message":"b"}"#,
            br#"{"code":"1102","message":"m"}"#,
            br#"{"code":1102.0}"#,
            br#"{"code":" 1102 ","request_id":"r","request_id":"s"}"#,
        ];
        for body in bodies {
            let env = Envelope::parse(body)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
            assert_eq!(
                env.code,
                Code::from_i64(1102),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(env.tasks.is_empty());
        }
        assert_eq!(
            Envelope::parse(bodies[0]).unwrap().request_id.as_deref(),
            Some("r")
        );
        assert_eq!(Envelope::parse(bodies[2]).unwrap().message, "m");
        // Not an integer, or a success: still malformed.
        for body in [
            &br#"{"code":1102.5}"#[..],
            br#"{"code":"x1102"}"#,
            br#"{"code":"0","message":"\ud83d"}"#,
            br#"{"code":1e300}"#,
        ] {
            assert!(
                Envelope::parse(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// A text JSON forbids — a raw line break or control character, an escape that is none
    /// (`\d` of a Windows path) — hides no error code, wherever it stands: the code was lost
    /// with the whole body, and a 429's 1102 was retried as throttling. The texts are kept as
    /// a lenient parser reads them.
    #[test]
    fn an_error_code_survives_a_text_json_forbids() {
        let bodies: [&[u8]; 6] = [
            b"{\"code\":1102,\"message\":\"resource pack\nexhausted\",\"request_id\":\"r\"}",
            b"{\"code\":1102,\"message\":\"tab\there\",\"request_id\":\"r\"}",
            b"{\"code\":1102,\"message\":\"nul\x00\x1f\",\"request_id\":\"r\"}",
            br#"{"code":1102,"message":"at C:\data\x","request_id":"r"}"#,
            br#"{"request_id":"r","message":"bad \u12zz","code":1102}"#,
            b"{\"code\":1102,\"data\":{\"detail\":\"a\rb\",\"k\\q\":1},\"request_id\":\"r\"}",
        ];
        for body in bodies {
            let shown = String::from_utf8_lossy(body);
            for env in both(body) {
                let env = env.unwrap_or_else(|e| panic!("{e}: {shown}"));
                assert_eq!(env.code, Code::from_i64(1102), "{shown}");
                assert_eq!(env.request_id.as_deref(), Some("r"), "{shown}");
                assert!(env.tasks.is_empty(), "{shown}");
            }
            let outcome = crate::Outcome::parse(
                http::StatusCode::TOO_MANY_REQUESTS,
                &http::HeaderMap::new(),
                body,
                tokio::time::Instant::now(),
            )
            .unwrap_or_else(|e| panic!("{e}: {shown}"));
            assert_eq!(outcome.disposition(), crate::Disposition::Fatal, "{shown}");
        }
        let message = |body: &[u8]| Envelope::parse(body).unwrap().message;
        assert_eq!(message(bodies[0]), "resource pack\nexhausted");
        assert_eq!(message(bodies[1]), "tab\there");
        assert_eq!(message(bodies[2]), "nul\u{0}\u{1f}");
        assert_eq!(message(bodies[3]), r"at C:\data\x");
        assert_eq!(message(bodies[4]), r"bad \u12zz");
        // A success stays malformed, with serde_json's own error: its task is what was asked.
        let success = b"{\"code\":0,\"message\":\"a\nb\"}";
        assert_eq!(
            Envelope::parse(success).unwrap_err().to_string(),
            "control character (\\u0000-\\u001F) found while parsing a string at line 2 column 0"
        );
        // The key `co\de` is no `code`, nor is `code` with a control character.
        for body in [
            &br#"{"co\de":1102}"#[..],
            b"{\"code\x01\":1102}",
            b"{\"code\":1102\x01}",
        ] {
            assert!(
                Envelope::parse(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// A `\"` is an escaped quote in the lenient reading as in JSON, so the texts around it
    /// end where the server ended them: a `code` inside a text is never read, and a success
    /// whose text hides `"code":1102` stays malformed.
    #[test]
    fn a_lenient_reading_ends_texts_where_json_does() {
        let body =
            b"{\"code\":1102,\"message\":\"say \\\"hi\\\"\tC:\\dir\\\\\",\"request_id\":\"r\"}";
        for env in both(body) {
            let env = env.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(env.code, Code::from_i64(1102));
            assert_eq!(env.message, "say \"hi\"\tC:\\dir\\");
            assert_eq!(env.request_id.as_deref(), Some("r"));
        }
        for body in [
            &b"{\"code\":0,\"message\":\"a\\\",\\\"code\\\":1102,\\\"x\\\":\\\"\n\"}"[..],
            br#"{"message":"a\","code":1102,"x":"\d"}"#,
        ] {
            for env in both(body) {
                assert!(env.is_err(), "{}", String::from_utf8_lossy(body));
            }
        }
    }

    /// A `code` written twice with one value is that code (JSON parsers that take the last
    /// value, as serde_json's `Value` does, read it so too); two different values are no code.
    #[test]
    fn an_error_code_written_twice_alike_is_read() {
        for body in [
            &br#"{"code":1102,"message":"m","code":1102,"request_id":"r"}"#[..],
            br#"{"code":1102,"message":"m","c\u006fde":"1102","request_id":"r"}"#,
        ] {
            for env in both(body) {
                let env = env.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(env.code, Code::from_i64(1102));
                assert_eq!(
                    (env.message.as_str(), env.request_id.as_deref()),
                    ("m", Some("r"))
                );
            }
        }
        for body in [
            &br#"{"code":1102,"code":1303}"#[..],
            br#"{"code":0,"code":1102}"#,
            br#"{"code":1102,"code":0}"#,
            br#"{"code":0,"code":0}"#,
        ] {
            assert_eq!(
                Envelope::parse(body).unwrap_err().to_string(),
                format!(
                    "duplicate field `code` at line 1 column {}",
                    body.iter().rposition(|&b| b == b':').unwrap()
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// A task's optional field of an odd type is left out: failing would hide every task of a
    /// batch answer, and none of them would free its slot. Billing with an odd amount or
    /// element is no cost (not the sum of the rest: `billing_that_cannot_be_read_is_no_cost`).
    #[test]
    fn a_tasks_odd_optional_field_is_left_out() {
        let batch = br#"{"code":0,"message":"SUCCEED","request_id":"r","data":[
            {"id":"a","status":"succeeded","billing":[{"amount":"1.5"},{"amount":{"v":1}},7]},
            {"id":"b","status":"failed","message":{"zh":"x"},"outputs":{"url":"u"}},
            {"id":"c","status":"succeeded","external_id":12,"outputs":[{"url":3},"x",{"url":"u"}]}]}"#;
        let env = Envelope::parse(batch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(env.tasks.len(), 3);
        assert_eq!(env.tasks[0].cost, None);
        assert_eq!(env.tasks[1].status, TaskStatus::Failed);
        assert_eq!(env.tasks[1].failure, None);
        assert!(env.tasks[1].urls.is_empty());
        assert_eq!(env.tasks[2].external_id.as_deref(), Some("12"));
        assert_eq!(env.tasks[2].urls, vec!["3", "u"]);
        let legacy = br#"{"code":0,"data":{"task_id":"t","task_status":"succeed",
            "task_status_msg":["x"],"task_info":"job","final_unit_deduction":{"n":1},
            "task_result":{"videos":{"url":"v"},"images":[{"url":"i"}]}}}"#;
        let env = Envelope::parse(legacy).unwrap_or_else(|e| panic!("{e}"));
        let task = &env.tasks[0];
        assert_eq!(task.status, TaskStatus::Succeeded);
        assert_eq!(
            (
                task.failure.as_deref(),
                task.external_id.as_deref(),
                task.cost
            ),
            (None, None, None)
        );
        assert_eq!(task.urls, vec!["i"]);
        // A callback carrying such a task reports it.
        let callback = br#"{"id":"a","status":"succeeded","billing":[{"amount":"2"}]}"#;
        assert_eq!(
            Envelope::parse_callback(callback).unwrap()[0].cost,
            Some(2.0)
        );
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

    /// An external id echoed empty (`""`, for a task created without one) is none, in both
    /// generations and from both readers: kept as `Some("")`, every such task looked like "the
    /// same create" to the layers that file tasks by their external id.
    #[test]
    fn an_empty_external_id_is_none() {
        let legacy = br#"{"code":0,"message":"ok","request_id":"r","data":[
            {"task_id":"a","task_status":"submitted","task_info":{"external_task_id":""}},
            {"task_id":"b","task_status":"submitted","task_info":{"external_task_id":"x"}}]}"#;
        let new = br#"{"code":0,"message":"ok","request_id":"r","data":[
            {"id":"a","status":"submitted","external_id":""},
            {"id":"b","status":"submitted","external_id":"x"}]}"#;
        for body in [&legacy[..], &new[..]] {
            for env in [
                Envelope::parse(body).unwrap(),
                Envelope::parse_reference(body).unwrap(),
            ] {
                let ids: Vec<_> = env.tasks.iter().map(|t| t.external_id.as_deref()).collect();
                assert_eq!(ids, [None, Some("x")]);
            }
        }
    }

    /// A `final_unit_deduction` that reads as no finite number (`NaN`, `inf`, `1e999`) is no
    /// cost, from both readers, as a `billing` amount is: a spend guard adding it up would
    /// make the account's whole ledger `NaN`.
    #[test]
    fn a_non_finite_deduction_is_no_cost() {
        for text in ["NaN", "inf", "-inf", "1e999", " infinity "] {
            let body = format!(
                r#"{{"code":0,"message":"ok","request_id":"r","data":{{"task_id":"t",
                "task_status":"succeed","final_unit_deduction":"{text}"}}}}"#
            );
            for env in both(body.as_bytes()) {
                assert_eq!(env.unwrap().tasks[0].cost, None, "{text}");
            }
        }
        let body = br#"{"code":0,"message":"ok","request_id":"r","data":{"task_id":"t",
            "task_status":"succeed","final_unit_deduction":" 2.5 "}}"#;
        for env in both(body) {
            assert_eq!(env.unwrap().tasks[0].cost, Some(2.5));
        }
    }

    /// `billing` amounts are added only in one currency: items naming two make the cost
    /// none, from both readers (summed, credits plus dollars read as credits to a spend
    /// guard). An item naming none counts in the others' currency; one without an amount
    /// names nothing.
    #[test]
    fn billing_in_two_currencies_is_no_cost() {
        for (billing, cost) in [
            (
                r#"[{"amount":1,"currency":"credit"},{"amount":0.5,"currency":"USD"}]"#,
                None,
            ),
            (
                r#"[{"amount":1,"currency":"USD"},{"amount":2,"currency":"usd"}]"#,
                None,
            ),
            (
                r#"[{"currency":"USD","amount":"1"},{"amount":2,"currency":"credit"}]"#,
                None,
            ),
            (
                r#"[{"amount":2,"currency":"c\u0072edit"},{"amount":1,"currency":"USD"}]"#,
                None,
            ),
            (
                r#"[{"amount":1,"currency":"credit"},{"amount":0.5,"currency":"credit"}]"#,
                Some(1.5),
            ),
            (
                r#"[{"amount":1,"currency":"credit"},{"amount":2},{"amount":3,"currency":""}]"#,
                Some(6.0),
            ),
            (
                r#"[{"amount":1,"currency":"credit"},{"amount":2,"currency":null}]"#,
                Some(3.0),
            ),
            (
                r#"[{"amount":1,"currency":"credit"},{"currency":"USD"},{"amount":null,"currency":"x"}]"#,
                Some(1.0),
            ),
            (
                r#"[{"amount":2,"currency":"c\u0072edit"},{"amount":1,"currency":"credit"}]"#,
                Some(3.0),
            ),
            // A currency that is no text nor number names one no one can read: no figure.
            (
                r#"[{"amount":1,"currency":"credit"},{"amount":1,"currency":{"code":"USD"}}]"#,
                None,
            ),
            (r#"[]"#, Some(0.0)),
        ] {
            let body = format!(
                r#"{{"code":0,"message":"ok","request_id":"r","data":{{"id":"t","status":"succeeded","billing":{billing}}}}}"#
            );
            for env in both(body.as_bytes()) {
                assert_eq!(env.unwrap().tasks[0].cost, cost, "{billing}");
            }
        }
    }

    /// A cost keeps the currency its billing named, from both readers: without it, 0.14
    /// dollars read as 0.14 credits to a spend guard, which then let the account overspend.
    /// Only credits (no currency named, or credits in any case) give a figure in credits.
    #[test]
    fn a_cost_keeps_its_currency_and_only_credits_count_as_credits() {
        for (billing, cost, currency, credits) in [
            (
                r#"[{"charge_type":"money","amount":0.14,"currency":"USD"}]"#,
                Some(0.14),
                Some("USD"),
                None,
            ),
            (
                r#"[{"amount":1,"currency":"CNY"},{"amount":2}]"#,
                Some(3.0),
                Some("CNY"),
                None,
            ),
            (
                r#"[{"amount":2,"currency":"c\u0072edit"}]"#,
                Some(2.0),
                Some("credit"),
                Some(2.0),
            ),
            (
                r#"[{"amount":2,"currency":"Credits"}]"#,
                Some(2.0),
                Some("Credits"),
                Some(2.0),
            ),
            (
                r#"[{"amount":2,"currency":"UNIT"}]"#,
                Some(2.0),
                Some("UNIT"),
                Some(2.0),
            ),
            (
                r#"[{"amount":2,"currency":"creditz"}]"#,
                Some(2.0),
                Some("creditz"),
                None,
            ),
            (r#"[{"amount":2,"currency":7}]"#, Some(2.0), Some("7"), None),
            (
                r#"[{"amount":2},{"amount":1,"currency":""}]"#,
                Some(3.0),
                None,
                Some(3.0),
            ),
            (
                r#"[{"amount":1,"currency":"credit"},{"amount":1,"currency":"USD"}]"#,
                None,
                None,
                None,
            ),
        ] {
            let body = format!(
                r#"{{"code":0,"message":"ok","request_id":"r","data":{{"id":"t","status":"succeeded","billing":{billing}}}}}"#
            );
            for env in both(body.as_bytes()) {
                let task = env.unwrap().tasks.remove(0);
                let named = task.cost_currency.as_ref().map(Currency::as_str);
                assert_eq!((task.cost, named), (cost, currency), "{billing}");
                assert_eq!(task.cost_in_credits(), credits, "{billing}");
            }
        }
        // A legacy deduction is in units: credits.
        let legacy = br#"{"code":0,"data":{"task_id":"t","task_status":"succeed","final_unit_deduction":"2"}}"#;
        for env in both(legacy) {
            let task = env.unwrap().tasks.remove(0);
            assert_eq!(
                (task.cost_in_credits(), task.cost_currency),
                (Some(2.0), None)
            );
        }
    }

    /// A billing `currency` that is neither text nor a number (an object, a list, a boolean)
    /// names a currency no one can read: the cost is none, from both readers, never credits.
    /// It counted as no currency named, so `{"amount":0.14,"currency":{"code":"USD"}}` read as
    /// 0.14 credits to a spend guard. An item without an amount still names nothing.
    #[test]
    fn a_currency_that_is_not_text_is_unknown_not_credits() {
        for (billing, cost) in [
            (r#"[{"amount":0.14,"currency":{"code":"USD"}}]"#, None),
            (r#"[{"amount":2,"currency":["USD"]}]"#, None),
            (r#"[{"amount":2,"currency":true}]"#, None),
            (r#"[{"amount":2},{"currency":false,"amount":1}]"#, None),
            (
                r#"[{"amount":2,"currency":"credit"},{"currency":{}}]"#,
                Some(2.0),
            ),
            (
                r#"[{"amount":2,"currency":"credit"},{"amount":null,"currency":[]}]"#,
                Some(2.0),
            ),
        ] {
            let body = format!(
                r#"{{"code":0,"data":{{"id":"t","status":"succeeded","billing":{billing}}}}}"#
            );
            for env in both(body.as_bytes()) {
                let task = env.unwrap().tasks.remove(0);
                assert_eq!(
                    (task.cost, task.cost_in_credits()),
                    (cost, cost),
                    "{billing}"
                );
            }
        }
    }

    /// A cost below zero is no cost, from both readers: a negative deduction or billing amount
    /// (a refund line, perhaps: undocumented) gave a negative cost, or a sum net of it, that a
    /// spend guard took as credits given back or a cheaper task. Zero and fractions still read.
    #[test]
    fn a_negative_cost_is_no_cost() {
        for deduction in [r#""-5""#, "-5", r#"" -0.5 ""#, "-1e2"] {
            let body = format!(
                r#"{{"code":0,"data":{{"task_id":"t","task_status":"succeed","final_unit_deduction":{deduction}}}}}"#
            );
            for env in both(body.as_bytes()) {
                let task = env.unwrap().tasks.remove(0);
                assert_eq!(
                    (task.cost, task.cost_in_credits()),
                    (None, None),
                    "{deduction}"
                );
            }
        }
        for billing in [
            r#"[{"amount":-3}]"#,
            r#"[{"amount":5},{"amount":-3}]"#,
            r#"[{"amount":"-1","currency":"credit"},{"amount":2,"currency":"credit"}]"#,
        ] {
            let body = format!(
                r#"{{"code":0,"data":{{"id":"t","status":"succeeded","billing":{billing}}}}}"#
            );
            for env in both(body.as_bytes()) {
                let task = env.unwrap().tasks.remove(0);
                assert_eq!(
                    (task.cost, task.cost_in_credits()),
                    (None, None),
                    "{billing}"
                );
            }
        }
        for (deduction, cost) in [(r#""0""#, 0.0), ("0", 0.0), (r#""0.5""#, 0.5), ("2.5", 2.5)] {
            let body = format!(
                r#"{{"code":0,"data":{{"task_id":"t","task_status":"succeed","final_unit_deduction":{deduction}}}}}"#
            );
            for env in both(body.as_bytes()) {
                assert_eq!(env.unwrap().tasks[0].cost, Some(cost), "{deduction}");
            }
        }
    }

    /// Billing that is there but cannot be read as amounts is no cost, from both readers, not
    /// a cost of zero: `billing` that is no list, an element that is no object, or an amount
    /// that is no number (`"1,5"`, `true`, an object, one past `f64`). Each summed as nothing,
    /// so a task billed `[{"amount":"1,5"}]` read as free to a spend guard; and amounts whose
    /// sum passes `f64` gave an infinite cost. An amount missing, `null` or `""` is none, and
    /// `[]` (nothing billed) is zero, as before.
    #[test]
    fn billing_that_cannot_be_read_is_no_cost() {
        for billing in [
            r#"{"amount":5}"#,
            r#""5""#,
            "5",
            "true",
            "[5]",
            r#"[{"amount":1},"x"]"#,
            r#"[{"amount":1},[]]"#,
            r#"[{"amount":"1,5"}]"#,
            r#"[{"amount":1},{"amount":true}]"#,
            r#"[{"amount":{"value":1}}]"#,
            r#"[{"amount":[1]}]"#,
            r#"[{"amount":"1e400"}]"#,
            r#"[{"amount":"NaN"}]"#,
            r#"[{"amount":1e308},{"amount":1e308}]"#,
        ] {
            let body = format!(
                r#"{{"code":0,"data":{{"id":"t","status":"succeeded","billing":{billing}}}}}"#
            );
            for env in both(body.as_bytes()) {
                let task = env.unwrap().tasks.remove(0);
                assert_eq!(
                    (task.cost, task.cost_in_credits()),
                    (None, None),
                    "{billing}"
                );
            }
        }
        for (billing, cost) in [
            ("[]", Some(0.0)),
            ("null", None),
            (
                r#"[{"amount":1},{"amount":null},{"amount":""},{"currency":"x"}]"#,
                Some(1.0),
            ),
            (r#"[{"amount":" 1.5 "},{"amount":1e2}]"#, Some(101.5)),
        ] {
            let body = format!(
                r#"{{"code":0,"data":{{"id":"t","status":"succeeded","billing":{billing}}}}}"#
            );
            for env in both(body.as_bytes()) {
                assert_eq!(env.unwrap().tasks[0].cost, cost, "{billing}");
            }
        }
    }

    /// A report's `Debug` (which ends up in logs) shows its result URLs without the query,
    /// fragment or user info a signed download link carries; the URLs themselves are whole.
    #[test]
    fn a_reports_debug_hides_the_signature_of_its_urls() {
        let body = br#"{"code":0,"message":"ok","request_id":"r","data":{"task_id":"t",
            "task_status":"succeed","task_result":{"videos":[
            {"url":"https://u:pw@cdn.example/v/0.mp4?X-Sig=SECRET1&exp=9"},
            {"url":"https://cdn.example/v/1.mp4#SECRET2"},
            {"url":"https://cdn.example/v/2.mp4"},
            {"url":"not a url ?SECRET3"}]}}}"#;
        for env in both(body) {
            let task = &env.unwrap().tasks[0];
            let shown = format!("{task:?}");
            for secret in ["SECRET", "pw", "u:"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(
                shown.contains(r#""https://…@cdn.example/v/0.mp4?…""#),
                "{shown}"
            );
            assert!(
                shown.contains(r#""https://cdn.example/v/1.mp4?…""#),
                "{shown}"
            );
            assert!(
                shown.contains(r#""https://cdn.example/v/2.mp4""#),
                "{shown}"
            );
            assert!(task.urls[0].ends_with("X-Sig=SECRET1&exp=9"), "kept whole");
        }
    }

    /// Both readers, on a body each reads (the scanner, else the reference it falls back to).
    fn both(body: &[u8]) -> [Result<Envelope, serde_json::Error>; 2] {
        [Envelope::parse(body), Envelope::parse_reference(body)]
    }

    /// A task id written empty names no task, as a missing or `null` one, in both generations
    /// and from both readers: read as a task `""`, every such report was "the same task" to the
    /// layers that file tasks by id, and a create answered so was taken as made under that id.
    #[test]
    fn an_empty_task_id_names_no_task() {
        let bodies: [&[u8]; 4] = [
            br#"{"code":0,"message":"ok","request_id":"r","data":{"task_id":"","task_status":"submitted"}}"#,
            br#"{"code":0,"message":"ok","request_id":"r","data":{"id":"","status":"succeeded","external_id":"e1"}}"#,
            br#"{"code":0,"data":{"tasks":[{"task_id":"","task_status":"failed","task_info":{"external_task_id":"e2"}}]}}"#,
            br#"{"code":0,"data":{"task_id":"","task_status":"succeed"},"request_id":"r\/1"}"#,
        ];
        for body in bodies {
            for env in both(body) {
                let env = env.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(env.tasks, [], "{}", String::from_utf8_lossy(body));
            }
            let outcome = crate::Outcome::parse(
                http::StatusCode::OK,
                &http::HeaderMap::new(),
                body,
                tokio::time::Instant::now(),
            )
            .unwrap();
            assert_eq!(outcome.task(), None);
            assert!(Envelope::parse_callback(body).unwrap().is_empty());
        }
        // Among others, only the named tasks are reported; an object whose legacy id is empty
        // still reports its new-style task.
        let list = br#"{"code":0,"data":[{"id":"","status":"submitted","external_id":"e1"},
            {"id":"b","status":"submitted"},{"task_id":"","task_status":"s","id":"c","status":"failed"}]}"#;
        for env in both(list) {
            let ids: Vec<_> = env.unwrap().tasks.into_iter().map(|t| t.id).collect();
            assert_eq!(ids, ["b", "c"]);
        }
        // A lookup's list with such an element is not read in whole: no "no such task".
        let outcome = crate::Outcome::parse(
            http::StatusCode::OK,
            &http::HeaderMap::new(),
            list,
            tokio::time::Instant::now(),
        )
        .unwrap();
        assert!(!outcome.lists_every_task());
        for callback in [
            &br#"{"task_id":"","task_status":"succeed"}"#[..],
            br#"{"id":"","status":"failed"}"#,
        ] {
            assert!(Envelope::parse_callback(callback).unwrap().is_empty());
        }
    }

    /// A task id that is a number but no 64-bit integer makes the envelope unreadable (as an id
    /// of any other odd type does): serde_json reads it as an `f64`, and two tasks of one answer
    /// (`86000000000000000012345`, `…012346`) were both reported as `86000000000000000000000`.
    #[test]
    fn a_task_id_number_that_is_no_64_bit_integer_is_an_error() {
        for id in [
            "86000000000000000012345",
            "18446744073709551616",
            "-9223372036854775809",
            "1.5",
            "1e3",
            "1.0",
            "-0",
        ] {
            for body in [
                format!(r#"{{"code":0,"data":{{"task_id":{id},"task_status":"succeed"}}}}"#),
                format!(
                    r#"{{"code":0,"data":[{{"id":"a","status":"failed"}},{{"id":{id},"status":"failed"}}]}}"#
                ),
            ] {
                for env in both(body.as_bytes()) {
                    let err = env.expect_err(&body).to_string();
                    assert!(err.contains("integer of at most 64 bits"), "{err}: {body}");
                }
                let malformed = crate::Outcome::parse(
                    http::StatusCode::OK,
                    &http::HeaderMap::new(),
                    body.as_bytes(),
                    tokio::time::Instant::now(),
                )
                .unwrap_err();
                assert!(malformed.reason().contains("task id"), "{malformed}");
            }
            // An error code is still read, with no task.
            let error =
                format!(r#"{{"code":1102,"data":{{"task_id":{id},"task_status":"failed"}}}}"#);
            for env in both(error.as_bytes()) {
                let env = env.unwrap();
                assert_eq!((env.code, env.tasks.len()), (Code::from_i64(1102), 0));
            }
        }
        // Integers of 64 bits read as written.
        for id in ["18446744073709551615", "-9223372036854775808", "0", "7"] {
            let body = format!(r#"{{"code":0,"data":{{"id":{id},"status":"submitted"}}}}"#);
            for env in both(body.as_bytes()) {
                assert_eq!(env.unwrap().tasks[0].id, id);
            }
        }
    }

    /// An external id that is a number but no 64-bit integer is none: its `f64` text could be
    /// another job's id, and a lookup by it would take that job's task, or find none of ours.
    #[test]
    fn an_external_id_number_that_is_no_integer_is_none() {
        for ext in ["86000000000000000012345", "1.5", "1e3"] {
            for body in [
                format!(
                    r#"{{"code":0,"data":{{"id":"t","status":"submitted","external_id":{ext}}}}}"#
                ),
                format!(
                    r#"{{"code":0,"data":{{"task_id":"t","task_status":"submitted","task_info":{{"external_task_id":{ext}}}}}}}"#
                ),
            ] {
                for env in both(body.as_bytes()) {
                    let task = env.unwrap().tasks.remove(0);
                    assert_eq!((&*task.id, task.external_id), ("t", None), "{body}");
                }
            }
        }
        let body = br#"{"code":0,"data":{"id":"t","status":"submitted","external_id":18446744073709551615}}"#;
        for env in both(body) {
            assert_eq!(
                env.unwrap().tasks[0].external_id.as_deref(),
                Some("18446744073709551615")
            );
        }
    }

    /// A page's element that is no object reports nothing: serde's derive read an array as a
    /// task, its fields by position, so `["t1","succeed"]` ended task `t1`.
    #[test]
    fn a_page_element_that_is_no_object_reports_nothing() {
        let body = br#"{"code":0,"data":{"tasks":[["t1","succeed"],"t2",null,7,{"id":"t3","status":"failed"}]}}"#;
        for env in both(body) {
            let ids: Vec<_> = env.unwrap().tasks.into_iter().map(|t| t.id).collect();
            assert_eq!(ids, ["t3"]);
        }
        let callback = br#"{"tasks":[["t1","succeed"]]}"#;
        assert!(Envelope::parse_callback(callback).unwrap().is_empty());
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

    /// A callback body that reports no task says why, in words a log can carry: the field
    /// that is missing or of the wrong type, never a value the body holds.
    #[test]
    fn a_callback_that_reports_no_task_says_why() {
        let why = |body: &[u8]| match Envelope::read_callback(body) {
            Ok(tasks) => panic!("{}: {tasks:?}", String::from_utf8_lossy(body)),
            Err(e) => e,
        };
        for (body, reason) in [
            (&br#"{"task_status":"succeed"}"#[..], "has no `task_id`"),
            (
                br#"{"task_id":null,"task_status":"succeed"}"#,
                "has no `task_id`",
            ),
            (
                br#"{"task_id":"","task_status":"succeed"}"#,
                "has an empty `task_id`",
            ),
            (br#"{"task_id":"t"}"#, "has no `task_status`"),
            (br#"{"id":"t","status":null}"#, "has no `status`"),
            (br#"{"status":"failed"}"#, "has no `id`"),
            (br#"{"id":""}"#, "has an empty `id`"),
            (br#"{}"#, "names no task: no `task_id` or `id`"),
            (br#"{"taskId":"t"}"#, "names no task: no `task_id` or `id`"),
            (
                br#"{"task_id":123456789012345678901234,"task_status":"succeed"}"#,
                "`task_id` is a number but no 64-bit integer",
            ),
            (
                br#"{"task_id":1.5,"task_status":"succeed"}"#,
                "`task_id` is a number but no 64-bit integer",
            ),
            (
                br#"{"task_id":{"a":1},"task_status":"succeed"}"#,
                "`task_id` is an object, not a string or an integer",
            ),
            (
                br#"{"id":"t","status":5}"#,
                "`status` is a number, not a string",
            ),
            (
                br#""task t1 succeeded""#,
                "the body is a string, not a task object",
            ),
            (
                br#"[{"task_id":"t"}]"#,
                "the body is an array, not a task object",
            ),
            (
                br#"{"code":1303,"message":"secret-ish text"}"#,
                "an error envelope (code 1303)",
            ),
            (br#"{"code":0,"data":null}"#, "the envelope has no `data`"),
            (br#"{"code":0}"#, "the envelope has no `data`"),
            (
                br#"{"code":0,"data":"x"}"#,
                "the envelope's `data` is a string, not a task object",
            ),
            (
                br#"{"code":0,"data":[]}"#,
                "the envelope's `data` is an empty list",
            ),
            (
                br#"{"code":0,"data":[{"task_id":""}]}"#,
                "no element of the envelope's `data` names a task; the first has an empty `task_id`",
            ),
            (
                br#"{"code":0,"data":{"task_id":1e30,"task_status":"succeed"}}"#,
                "the envelope's `data` task object is unreadable: `task_id` is a number but no 64-bit integer",
            ),
            (
                br#"{"code":0,"data":{"tasks":[]}}"#,
                "the envelope's `data.tasks` is an empty list",
            ),
            (br#"{"tasks":"x"}"#, "`tasks` is a string, not a list"),
        ] {
            let e = why(body);
            let text = e.to_string();
            assert!(
                text.contains(reason),
                "{}: {text}",
                String::from_utf8_lossy(body)
            );
            assert!(!e.is_json(), "{text}");
            assert!(!text.contains("secret"), "{text}");
        }
        // Not JSON: the parse error, placed in the body as sent.
        let e = why(br#"{"task_id":"t1","task_status":"succeed"},"x":0"#);
        assert!(e.is_json());
        assert!(e.to_string().contains("not one JSON value"), "{e}");
        assert!(e.to_string().contains("column 41"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        // `parse_callback` keeps what it returned, its errors placed in the body as sent.
        let e = Envelope::parse_callback(br#"{"task_id":1.5,"task_status":"succeed"}"#);
        let text = e.unwrap_err().to_string();
        assert!(
            text.contains("`task_id` is a number but no 64-bit integer"),
            "{text}"
        );
        assert!(!text.contains("column 31"), "{text}");
        assert!(Envelope::parse_callback(b"{}").unwrap().is_empty());
        // A body that reports a task reads as `parse_callback` reads it.
        let tasks = Envelope::read_callback(br#"{"task_id":"t1","task_status":"succeed"}"#);
        assert_eq!(tasks.unwrap()[0].id, "t1");
    }

    /// A callback body whose reason cannot be read as a JSON value (it nests past serde_json's
    /// limit, or holds a lone surrogate or a byte that is no UTF-8 in a field no task reads)
    /// still gets an error that quotes nothing from it, placed in the body as sent.
    #[test]
    fn a_callback_error_never_quotes_the_body() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        for tail in [deep.as_bytes(), br#""\ud800""#, b"\"\xff\""] {
            for head in [
                &br#"{"tasks":"secret-value","x":"#[..],
                br#"{"task_id":"t","task_status":["secret-value"],"x":"#,
                br#"{"id":"t","status":{"secret-value":1},"x":"#,
                br#"{"code":0,"message":"m","data":{"tasks":"secret-value"},"x":"#,
            ] {
                bodies.push([head, tail, b"}"].concat());
            }
        }
        for body in &bodies {
            let shown = String::from_utf8_lossy(body);
            let e = Envelope::read_callback(body).unwrap_err();
            let text = e.to_string();
            assert!(!text.contains("secret"), "{shown}: {text}");
            assert!(!e.is_json(), "{shown}: {text}");
            // An envelope whose `data` cannot be read reports no task here, with no error.
            match Envelope::parse_callback(body) {
                Err(e) => assert!(!e.to_string().contains("secret"), "{shown}: {e}"),
                Ok(tasks) => assert!(body.starts_with(br#"{"code""#), "{shown}: {tasks:?}"),
            }
        }
        // Where: the column of the value in the body as sent, not in the wrapped one.
        let e = Envelope::parse_callback(&bodies[0])
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("at line 1 column 23"), "{e}");
    }

    /// A bare task object behind a byte-order mark reads as an envelope behind one does.
    #[test]
    fn a_callback_behind_a_byte_order_mark_is_read() {
        for body in [
            &br#"{"task_id":"t1","task_status":"succeed"}"#[..],
            br#"{"id":"t1","status":"succeeded"}"#,
            br#"{"code":0,"data":{"task_id":"t1","task_status":"succeed"}}"#,
        ] {
            let marked = [&b"\xEF\xBB\xBF"[..], body].concat();
            let tasks = Envelope::read_callback(&marked).unwrap();
            assert_eq!(tasks, Envelope::read_callback(body).unwrap());
            assert_eq!(tasks[0].id, "t1");
        }
        let e = Envelope::read_callback(b"\xEF\xBB\xBF{\"task_id\":\"\"}").unwrap_err();
        assert!(e.to_string().contains("has an empty `task_id`"), "{e}");
        let e = Envelope::read_callback(b"\xEF\xBB\xBF{\"task_id\"}").unwrap_err();
        assert!(e.to_string().ends_with("line 1 column 11"), "{e}");
    }

    #[test]
    fn escaped_strings_are_read() {
        let body = br#"{"code":0,"message":"a\"b","request_id":"r\/1","data":{"task_id":"t\/1","task_status":"submitted"}}"#;
        let env = Envelope::parse(body).unwrap();
        assert_eq!(env.message, "a\"b");
        assert_eq!(env.tasks[0].id, "t/1");
    }

    /// Why `body` is no envelope, as `Envelope::parse` says and as the layers' error (the
    /// reason of `Outcome::parse`'s `MalformedResponse`) says it, which must be the same.
    fn failure(body: &[u8]) -> String {
        let shown = String::from_utf8_lossy(body);
        let parsed = Envelope::parse(body)
            .map(|env| panic!("{shown} read as {env:?}"))
            .unwrap_err();
        let malformed = crate::Outcome::parse(
            http::StatusCode::OK,
            &http::HeaderMap::new(),
            body,
            tokio::time::Instant::now(),
        )
        .map(|_| panic!("{shown} read as an outcome"))
        .unwrap_err();
        assert_eq!(malformed.reason(), parsed.to_string(), "{shown}");
        parsed.to_string()
    }

    /// Asserts each body's error is `expected`, in whole.
    fn fails_as(cases: &[(&str, &str)]) {
        for (body, expected) in cases {
            assert_eq!(failure(body.as_bytes()), *expected, "{body}");
        }
    }

    /// A `code` of the wrong type is named, with what came and what was expected: the error
    /// said only "invalid type: a string, expected i64", and a log could not tell which field.
    #[test]
    fn a_wrong_typed_code_is_named() {
        fails_as(&[
            (
                r#"{"code":"0"}"#,
                "invalid type at `code`: a string, expected a 64-bit integer at line 1 column 11",
            ),
            (
                r#"{"code":{"v":0},"message":"m"}"#,
                "invalid type at `code`: an object, expected a 64-bit integer at line 1 column 8",
            ),
            (
                r#"{"message":"m","code":[0]}"#,
                "invalid type at `code`: an array, expected a 64-bit integer at line 1 column 22",
            ),
            (
                r#"{"code":true}"#,
                "invalid type at `code`: a boolean, expected a 64-bit integer at line 1 column 12",
            ),
            (
                r#"{"code":18446744073709551616}"#,
                "invalid type at `code`: a number, expected a 64-bit integer at line 1 column 28",
            ),
            (
                r#"{"code":9223372036854775808}"#,
                "invalid value at `code`: an integer, expected a 64-bit integer at line 1 column 27",
            ),
        ]);
    }

    /// A `message` or `request_id` of the wrong type is named by its field.
    #[test]
    fn a_wrong_typed_text_is_named() {
        fails_as(&[
            (
                r#"{"code":0,"message":5}"#,
                "invalid type at `message`: an integer, expected a string at line 1 column 21",
            ),
            (
                r#"{"code":0,"message":"m","request_id":{"id":"r"}}"#,
                "invalid type at `request_id`: an object, expected a string at line 1 column 37",
            ),
        ]);
    }

    /// A task id of the wrong type is named by its path, in each shape `data` takes (one
    /// task, a list, a page, a list of lists) and for a number that is no 64-bit integer.
    #[test]
    fn a_wrong_typed_task_id_is_named_by_its_path() {
        fails_as(&[
            (
                r#"{"code":0,"data":{"task_id":true,"task_status":"submitted"}}"#,
                "invalid type at `data.task_id`: a boolean, expected a string or an integer at line 1 column 32",
            ),
            (
                r#"{"code":0,"data":[{"id":"a","status":"failed"},{"id":["b"],"status":"failed"}]}"#,
                "invalid type at `data[1].id`: an array, expected a string or an integer at line 1 column 54",
            ),
            (
                r#"{"code":0,"data":{"tasks":[{"id":{},"status":"failed"}]}}"#,
                "invalid type at `data.tasks[0].id`: an object, expected a string or an integer at line 1 column 35",
            ),
            (
                r#"{"code":0,"data":{"task_id":1.5,"task_status":"submitted"}}"#,
                "invalid value at `data.task_id`: a number, expected a task id that is a string or an integer of at most 64 bits at line 1 column 31",
            ),
        ]);
    }

    /// A task status of the wrong type is named by its path, however deep.
    #[test]
    fn a_wrong_typed_task_status_is_named_by_its_path() {
        fails_as(&[
            (
                r#"{"code":0,"data":{"task_id":"t","task_status":5}}"#,
                "invalid type at `data.task_status`: an integer, expected a string at line 1 column 47",
            ),
            (
                r#"{"code":0,"data":{"tasks":[{"id":"a","status":"failed"},{"id":"b","status":[1]}]}}"#,
                "invalid type at `data.tasks[1].status`: an array, expected a string at line 1 column 75",
            ),
            (
                r#"{"code":0,"data":[[{"id":"a","status":"s"}],[{"id":"b","status":null},{"id":"c","status":7.5}]]}"#,
                "invalid type at `data[1][1].status`: a number, expected a string at line 1 column 92",
            ),
        ]);
    }

    /// A page's `tasks` that is no list is named by its path.
    #[test]
    fn a_page_whose_tasks_is_no_list_is_named() {
        fails_as(&[(
            r#"{"code":0,"data":{"tasks":{"id":"t","status":"failed"}}}"#,
            "invalid type at `data.tasks`: an object, expected an array at line 1 column 26",
        )]);
    }

    /// A field written twice is named by its path (a missing `code` is the top level's).
    #[test]
    fn a_field_written_twice_is_named_by_its_path() {
        fails_as(&[
            (
                r#"{"code":0,"data":{"task_id":"a","task_id":"b","task_status":"failed"}}"#,
                "duplicate field `data.task_id` at line 1 column 41",
            ),
            (
                r#"{"code":0,"message":"m","code":0}"#,
                "duplicate field `code` at line 1 column 30",
            ),
            (
                r#"{"code":0,"data":{"id":"t","status":"s","billing":[{"amount":1},{"amount":1,"amount":2}]}}"#,
                "duplicate field `data.billing[1].amount` at line 1 column 84",
            ),
            (
                r#"{"message":"m"}"#,
                "missing field `code` at line 1 column 15",
            ),
        ]);
    }

    /// The path is the field's in the body as sent: over several lines, behind a byte-order
    /// mark, its keys written with escapes; a key that is no field name of ours is never
    /// quoted.
    #[test]
    fn the_path_is_read_in_the_body_as_sent() {
        fails_as(&[
            (
                "{\"code\":0,\n \"data\":\n  {\"status\":\"x\",\n   \"id\":[]}}",
                "invalid type at `data.id`: an array, expected a string or an integer at line 4 column 10",
            ),
            (
                "\u{feff}{\"code\":0,\"data\":{\"id\":\"t\",\"status\":false}}",
                "invalid type at `data.status`: a boolean, expected a string at line 1 column 41",
            ),
            (
                r#"{"code":0,"d\u0061ta":{"t\u0061sks":[{"id":"a","status":{}}]}}"#,
                "invalid type at `data.tasks[0].status`: an object, expected a string at line 1 column 56",
            ),
        ]);
        assert_eq!(
            field_path(br#"{"Bearer ak-1":{"x":"#, 1, 20).as_deref(),
            Some("?.?")
        );
        assert_eq!(field_path(br#"{"code":0}"#, 0, 0), None);
        assert_eq!(field_path(br#"{"code":0}"#, 3, 1), None);
    }

    /// A key from the body is shown only when it is one of the envelope's field names: a
    /// server's own key (inside `task_info`, say) can be a token in lowercase hex, which a
    /// path that showed every plain-looking key would put in a log.
    #[test]
    fn a_path_shows_no_key_but_the_envelopes_field_names() {
        let body = br#"{"code":0,"data":{"task_info":{"a3f9c2d1e8b74f60":{"sk_live_4242":{"x":"#;
        assert_eq!(
            field_path(body, 1, body.len()).as_deref(),
            Some("data.task_info.?.?.?")
        );
        let body = br#"{"code":0,"data":{"tasks":[{"t\u0061sk_result":{"videos":[{"url":"#;
        assert_eq!(
            field_path(body, 1, body.len()).as_deref(),
            Some("data.tasks[0].task_result.videos[0].url")
        );
    }

    /// serde_json's column counts bytes (multi-byte text before the place, `\r\n` line ends)
    /// and stops where serde_json stopped (after the spaces before an empty `[ ]`'s end, at an
    /// object opened on a new line): the path is the field's in each of these places.
    #[test]
    fn the_path_is_found_whatever_the_spacing_and_text_before_it() {
        fails_as(&[
            (
                "{\"code\":0,\r\n\"data\":{\"id\":\"t\",\r\n\"status\":5}}",
                "invalid type at `data.status`: an integer, expected a string at line 3 column 10",
            ),
            (
                r#"{"code":0,"message":"héllo wörld ✓","data":{"id":"t","status":5}}"#,
                "invalid type at `data.status`: an integer, expected a string at line 1 column 67",
            ),
            (
                r#"{"code":0,"message":"a\"b\\","data":{"id":"t","status":[1]}}"#,
                "invalid type at `data.status`: an array, expected a string at line 1 column 55",
            ),
            (
                r#"{"code":0,"data":{"id":"t" , "id" : "u"}}"#,
                "duplicate field `data.id` at line 1 column 34",
            ),
            (
                r#"{"code":0,"data":{"id":[ ],"status":"s"}}"#,
                "invalid type at `data.id`: an array, expected a string or an integer at line 1 column 26",
            ),
            (
                r#"{"code":0,"data":{"id":{ "k":1},"status":"s"}}"#,
                "invalid type at `data.id`: an object, expected a string or an integer at line 1 column 25",
            ),
            (
                "{\"code\":0,\"data\":{\"status\":\n{\"a\":1}}}",
                "invalid type at `data.status`: an object, expected a string at line 2 column 0",
            ),
            (
                r#"{"code":0,"data":[[],[{"id":"a","status":"s"},{"id":true}]]}"#,
                "invalid type at `data[1][1].id`: a boolean, expected a string or an integer at line 1 column 56",
            ),
        ]);
    }

    /// [`FIELD_NAMES`] is every field name the readers' derives read, and no other: a field
    /// added to a reader and not to the list would be shown as `?` in a path, and a duplicate
    /// of it named wrong.
    #[test]
    fn the_names_a_path_shows_are_the_readers_fields() {
        /// The field names serde's derive gives `T`: the `fields` it calls
        /// `deserialize_struct` with, carried out in the error.
        fn derived<T: Deserialize<'static>>() -> Vec<String> {
            struct Fields;
            impl<'de> Deserializer<'de> for Fields {
                type Error = de::value::Error;
                fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                    Err(de::Error::custom("not a struct"))
                }
                fn deserialize_struct<V: Visitor<'de>>(
                    self,
                    _: &'static str,
                    fields: &'static [&'static str],
                    _: V,
                ) -> Result<V::Value, Self::Error> {
                    Err(de::Error::custom(fields.join(",")))
                }
                serde::forward_to_deserialize_any! {
                    bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                    bytes byte_buf option unit unit_struct newtype_struct seq tuple
                    tuple_struct map enum identifier ignored_any
                }
            }
            let Err(fields) = T::deserialize(Fields) else {
                panic!("read from no struct");
            };
            fields.to_string().split(',').map(str::to_owned).collect()
        }
        let mut read: Vec<String> = [
            derived::<RawEnvelope<'static>>(),
            derived::<RawTask<'static>>(),
            derived::<TaskInfo<'static>>(),
            derived::<TaskResult<'static>>(),
            derived::<Media<'static>>(),
            derived::<Output<'static>>(),
            derived::<Billing<'static>>(),
        ]
        .concat();
        read.sort();
        read.dedup();
        let mut listed = FIELD_NAMES.map(str::to_owned).to_vec();
        listed.sort();
        assert_eq!(listed, read);
    }

    proptest::proptest! {
        /// The walk reads any bytes at any place without a panic: only a data error's body is
        /// JSON up to its place, and a wrong place must still give some answer.
        #[test]
        fn the_path_walk_never_panics(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
            line in 0..4usize,
            column in 0..200usize,
        ) {
            let _ = field_path(&body, line, column);
        }
    }

    /// Fields read loosely stay no error, so they have no path to name: a task id that is an
    /// integer, a field no reader reads (`created_at`), `task_result.videos` that is an
    /// object, a billing amount of the wrong type (no cost, not an unreadable answer).
    #[test]
    fn loosely_read_fields_of_another_type_are_no_error() {
        for body in [
            &br#"{"code":0,"data":{"task_id":123,"task_status":"submitted"}}"#[..],
            br#"{"code":0,"data":{"task_id":"t","task_status":"succeed","created_at":"x"}}"#,
            br#"{"code":0,"data":{"task_id":"t","task_status":"succeed","task_result":{"videos":{"url":"u"}}}}"#,
            br#"{"code":0,"data":{"id":"t","status":"succeeded","billing":[{"amount":true}]}}"#,
        ] {
            for env in both(body) {
                let task = env.unwrap_or_else(|e| panic!("{e}")).tasks.remove(0);
                assert!(task.urls.is_empty() && task.cost.is_none(), "{task:?}");
            }
        }
    }
}
