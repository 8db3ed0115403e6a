//! The scanner against the serde_json reference: whatever the scanner accepts, the reference
//! accepts and reads the same; `Envelope::parse` and `Outcome` always agree with the reference.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use proptest::prelude::*;

use super::*;
use crate::envelope::Envelope;
use crate::outcome::Outcome;

/// Exact equality, NaN and the sign of zero included (`Debug` prints floats round-trip).
fn same(a: &Envelope, b: &Envelope) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// Checks every reader of `body` against the reference; returns whether the scanner took it.
fn agree(body: &[u8]) -> bool {
    let reference = Envelope::parse_reference(body);
    let mut tasks = Reports::None;
    let scanned = std::str::from_utf8(body)
        .ok()
        .and_then(|text| scan(text, &mut tasks).ok());
    let took = scanned.is_some();
    if let Some(head) = scanned {
        let Ok(reference) = &reference else {
            panic!(
                "the scanner accepts what the reference rejects: {:?}",
                String::from_utf8_lossy(body)
            );
        };
        let fast = head.into_envelope(tasks);
        assert!(
            same(&fast, reference),
            "scanner {fast:?}\nreference {reference:?}\nbody {:?}",
            String::from_utf8_lossy(body)
        );
    }
    match (&reference, Envelope::parse(body)) {
        (Ok(a), Ok(b)) => assert!(same(a, &b), "{a:?} != {b:?}"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("reference {a:?}, parse {b:?}"),
    }
    let now = tokio::time::Instant::now();
    let headers = HeaderMap::new();
    for outcome in [
        Outcome::parse(StatusCode::OK, &headers, body, now),
        Outcome::parse_bytes(StatusCode::OK, &headers, Bytes::copy_from_slice(body), now),
    ] {
        match (&reference, outcome) {
            (Ok(env), Ok(outcome)) => {
                assert_eq!(outcome.code(), env.code);
                assert_eq!(outcome.message(), env.message);
                assert_eq!(outcome.request_id(), env.request_id.as_deref());
                assert_eq!(format!("{:?}", outcome.tasks()), format!("{:?}", env.tasks));
                assert!(same(outcome.envelope(), env));
            }
            (Err(e), Err(malformed)) => {
                let reason = if body.is_empty() {
                    "empty body".to_owned()
                } else {
                    e.to_string()
                };
                assert_eq!(malformed.reason(), reason);
            }
            (a, b) => panic!("reference {a:?}, outcome {b:?}"),
        }
    }
    took
}

const CREATE: &str = r#"{"code":0,"message":"SUCCEED","request_id":"CjMkWmdH6zUAA-00001","data":{"task_id":"860000000000000001","task_status":"submitted","task_info":{"external_task_id":"job-00001"},"created_at":1722769557708,"updated_at":1722769557708}}"#;
const QUERY: &str = r#"{"code":0,"message":"SUCCEED","request_id":"CjMkWmdH6zUAAAAAAJ9ucRxy-00001","data":{"task_id":"860000000000000001","task_status":"succeed","task_result":{"videos":[{"id":"v860000000000000001","url":"https://cdn.klingai.com/bs2/upload/860000000000000001.mp4","duration":"5.1"}]},"final_unit_deduction":"1","created_at":1722769557708,"updated_at":1722769627708}}"#;

#[test]
fn the_bench_envelopes_take_the_fast_path() {
    assert!(agree(CREATE.as_bytes()));
    assert!(agree(QUERY.as_bytes()));
    let mut tasks = Reports::None;
    let env = scan(QUERY, &mut tasks).unwrap().into_envelope(tasks);
    assert_eq!(env.tasks[0].urls.len(), 1);
    assert_eq!(env.tasks[0].cost, Some(1.0));
}

#[test]
fn the_fast_path_reads_every_shape() {
    for body in [
        // Legacy list, new batch with billing, page, nested lists, odd data.
        r#"{"code":0,"data":[{"task_id":"a","task_status":"failed","task_status_msg":"bad"},{"task_id":"b","task_status":"processing"}]}"#,
        r#"{"code":0,"data":[{"id":"a","status":"succeeded","outputs":[{"type":"video","url":"u"},{"url":null}],"billing":[{"amount":1},{"amount":0.5},{"amount":null},{}]},{"id":"b","status":"failed","message":"why","external_id":"e"}]}"#,
        r#"{"code":0,"data":{"tasks":[{"id":"c","status":"submitted"},{"task_id":"d","task_status":"succeed"}],"next_cursor":null}}"#,
        r#"{"code":0,"data":[[{"id":"c","status":"x"}],1,-2.5e3,"s",true,false,null,{}]}"#,
        r#"{"code":0,"data":{"task_id":12,"task_status":"succeed","final_unit_deduction":3,"task_result":{"images":[{"url":"i"}],"videos":[{"url":"v"}]}}}"#,
        r#"{"code":0,"data":{"id":-7,"status":"succeeded","billing":[]}}"#,
        r#"{"code":0,"data":{"task_id":"t","task_status":"succeed","task_result":{"videos":[{"url":"a"},{"url":null},{"url":"b"},{"url":"c"},{"url":"d"},{"url":"e"}]}}}"#,
        r#"{"code":-1,"message":null,"request_id":null,"data":null}"#,
        r#"{"code":1303,"message":"parallel task over resource pack limit","request_id":"x"}"#,
        " \n\t\r{ \"code\" : 0 , \"data\" : [ { \"id\" : \"a\" , \"status\" : \"b\" } ] } \n",
        r#"{"code":0,"message":"caf\u00e9 \"q\" \\ \/ \b\f\n\r\t","request_id":"r\/1"}"#,
        r#"{"code":0,"data":{"id":"\u4e2d","status":"ok","message":"中文 é"}}"#,
        r#"{"code":0,"data":{"task_id":"t","task_status":"succeed","final_unit_deduction":" nan "}}"#,
        r#"{"code":0,"extra":{"deep":[[[{"a":[1,2,{"b":"\ud800"}]}]]],"n":-0.0e-5},"x":"\ud83d"}"#,
        r#"{"code":0,"data":{"id":"a","status":"s","billing":[{"amount":0.1},{"amount":-0}]}}"#,
        // Currencies: one, none, mixed (no cost), one on an item without an amount.
        r#"{"code":0,"data":{"id":"a","status":"s","billing":[{"charge_type":"credits","amount":1,"currency":"credit","package_type":"video"},{"currency":"credit","amount":2}]}}"#,
        r#"{"code":0,"data":{"id":"a","status":"s","billing":[{"amount":1,"currency":"credit"},{"amount":2,"currency":""},{"amount":3,"currency":null},{"amount":4}]}}"#,
        r#"{"code":0,"data":{"id":"a","status":"s","billing":[{"amount":1,"currency":"credit"},{"amount":2,"currency":"USD"}]}}"#,
        r#"{"code":0,"data":{"id":"a","status":"s","billing":[{"amount":1,"currency":"USD"},{"amount":2,"currency":"USDX"}]}}"#,
        r#"{"code":0,"data":{"id":"a","status":"s","billing":[{"amount":1,"currency":"credit"},{"currency":"USD"},{"amount":null,"currency":"USD"}]}}"#,
        // A currency that is not credits, alone; credits in another case.
        r#"{"code":0,"data":{"id":"a","status":"s","billing":[{"amount":0.14,"currency":"USD"}]}}"#,
        r#"{"code":0,"data":[{"id":"a","status":"s","billing":[{"amount":2,"currency":"Credits"},{"amount":1}]},{"id":"b","status":"s","billing":[{"amount":3}]}]}"#,
        r#"{"code":0,"data":{"id":12345678901234567890,"status":"s"}}"#,
        r#"{"code":0,"data":{"id":-9223372036854775808,"status":"s"}}"#,
        r#"{"code":0,"data":{"task_id":"","task_status":"s","id":"","status":"s"}}"#,
        r#"{"code":0,"data":{"task_id":null,"task_status":"s","id":"i","status":"t","task_info":null,"task_result":null,"outputs":null,"billing":null,"tasks":null}}"#,
    ] {
        assert!(agree(body.as_bytes()), "fell back on {body}");
    }
}

#[test]
fn what_the_scanner_leaves_to_the_reference() {
    for body in [
        "",
        " ",
        "[]",
        "null",
        r#"{"code":0}x"#,
        r#"{"code":0,}"#,
        r#"{"code":0}}"#,
        r#"{"code":"0"}"#,
        r#"{"code":-0}"#,
        r#"{"code":1.0}"#,
        r#"{"code":1e2}"#,
        r#"{"code":01}"#,
        r#"{"code":9223372036854775807}"#,
        r#"{"code":99999999999999999999}"#,
        r#"{"message":"no code"}"#,
        r#"{"code":0,"code":0}"#,
        r#"{"code":0,"data":{"id":"a","id":"b","status":"s"}}"#,
        r#"{"co\u0064e":0}"#,
        r#"{"code":0,"message":"\ud83d\ude00"}"#,
        r#"{"code":0,"message":"\ud800"}"#,
        r#"{"code":0,"message":1}"#,
        r#"{"code":0,"data":{"task_id":true,"task_status":"s"}}"#,
        // Task ids that are numbers but no 64-bit integers: the reference's error.
        r#"{"code":0,"data":{"id":1.5,"status":"s"}}"#,
        r#"{"code":0,"data":{"id":-0,"status":"s"}}"#,
        r#"{"code":0,"data":{"id":1e20,"status":"s"}}"#,
        r#"{"code":0,"data":{"task_id":18446744073709551616,"task_status":"s"}}"#,
        r#"{"code":0,"data":{"task_info":["x"]}}"#,
        r#"{"code":0,"data":{"billing":[{"amount":"1"}]}}"#,
        r#"{"code":0,"data":{"billing":[{"amount":1e999}]}}"#,
        r#"{"code":0,"data":{"billing":[{"amount":1,"currency":"cr\u0065dit"}]}}"#,
        r#"{"code":0,"data":{"billing":[{"amount":1,"currency":1}]}}"#,
        r#"{"code":0,"data":{"billing":[{"currency":"a","currency":"a"}]}}"#,
        r#"{"code":0,"data":1e999}"#,
        r#"{"code":0,"data":{"outputs":[null]}}"#,
        "{\"code\":0,\"message\":\"a\u{1}b\"}",
        r#"{"code":0,"message":"\x"}"#,
        r#"{"code":0,"message":"\u12"}"#,
        r#"{"code":0,"x":[1,]}"#,
        r#"{"code":0,"x":tru}"#,
        r#"{"code":0,"x":1.}"#,
        r#"{"code":0,"x":-}"#,
        "{\"code\":0\u{c}}",
    ] {
        assert!(!agree(body.as_bytes()), "the scanner took {body:?}");
    }
    let deep = format!(r#"{{"code":0,"x":{}{}}}"#, "[".repeat(100), "]".repeat(100));
    assert!(!agree(deep.as_bytes()));
    let not_utf8 = b"{\"code\":0,\"message\":\"\xff\"}";
    assert!(!agree(not_utf8));
}

/// Nesting past the scanner's depth and past serde_json's recursion limit (128): the scanner
/// leaves the body to the reference, which keeps an error code wherever it stands (before or
/// after the deep value: the code is read on its own, and serde_json skips what it ignores
/// without recursing), with the texts that read, and no task. A success whose tasks nest past
/// the limit (arrays in `data` are read, element by element) stays malformed, as any success
/// whose task cannot be read; objects in a task's unknown fields are skipped, at any depth.
/// No depth overflows the stack.
#[test]
fn an_error_code_survives_nesting_past_the_recursion_limit() {
    let now = tokio::time::Instant::now();
    for depth in [MAX_DEPTH as usize, 127, 128, 129, 200, 20_000] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        for (deep, read) in [(&arrays, true), (&objects, false)] {
            for code in [1102, 0] {
                for body in [
                    format!(r#"{{"code":{code},"message":"m","request_id":"r","data":{deep}}}"#),
                    format!(r#"{{"data":{deep},"message":"m","request_id":"r","code":{code}}}"#),
                ] {
                    let mut tasks = Reports::None;
                    assert!(scan(body.as_str(), &mut tasks).is_err(), "depth {depth}");
                    agree(body.as_bytes());
                    let outcome =
                        Outcome::parse(StatusCode::OK, &HeaderMap::new(), body.as_bytes(), now);
                    if code == 0 && read && depth >= 127 {
                        let err = outcome.expect_err("a success past the limit is malformed");
                        assert!(err.reason().contains("recursion limit"), "{}", err.reason());
                        continue;
                    }
                    let outcome = outcome.expect("the code is kept");
                    assert_eq!(outcome.code(), Code::from_i64(code), "depth {depth}");
                    assert_eq!(outcome.message(), "m");
                    assert_eq!(outcome.request_id(), Some("r"));
                    assert!(outcome.tasks().is_empty());
                }
            }
        }
    }
}

/// The field names the scanner recognises a word at a time, as keys of every object it reads.
const NAMES: &[&str] = &[
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
    "created_at",
    "updated_at",
    "duration",
];

/// Keys one byte off a field name: shorter, longer, last byte changed, first byte changed.
fn near_misses(name: &str) -> Vec<String> {
    let mut out = vec![
        name[..name.len() - 1].to_owned(),
        format!("{name}x"),
        format!("{name}_"),
        format!("{}X", &name[..name.len() - 1]),
        format!("X{}", &name[1..]),
    ];
    out.retain(|key| !NAMES.contains(&key.as_str()));
    out
}

#[test]
fn keys_next_to_field_names_are_other_keys() {
    for name in NAMES {
        for key in near_misses(name) {
            for body in [
                format!(r#"{{"code":0,"{key}":"v","data":{{"task_id":"t","task_status":"s"}}}}"#),
                format!(r#"{{"code":0,"data":{{"task_id":"t","{key}":1,"task_status":"s"}}}}"#),
                format!(
                    r#"{{"code":0,"data":{{"id":"t","status":"s","{key}":[{{"{key}":"u"}}]}}}}"#
                ),
                format!(
                    r#"{{"code":0,"data":{{"id":"t","status":"s","task_info":{{"{key}":"x"}},"outputs":[{{"{key}":"u"}}],"billing":[{{"{key}":2}}],"task_result":{{"{key}":null}}}}}}"#
                ),
            ] {
                assert!(agree(body.as_bytes()), "fell back on {body}");
            }
        }
    }
}

#[test]
fn keys_at_the_end_of_the_body_are_read_safely() {
    // Cut short after each byte: a key's word compare reads past the end of the body.
    let body = r#"{"code":0,"data":{"id":"t","status":"s","tasks":null,"final_unit_deduction":1,"external_task_id":2}}"#;
    for end in 0..body.len() {
        agree(&body.as_bytes()[..end]);
    }
    for name in NAMES {
        agree(format!(r#"{{"code":0,"{name}"#).as_bytes());
        agree(format!(r#"{{"code":0,"data":{{"{name}""#).as_bytes());
        agree(format!(r#"{{"code":0,"data":{{"{name}":"#).as_bytes());
    }
}

#[test]
fn one_digit_codes_and_the_numbers_that_start_like_them() {
    for body in [
        r#"{"code":7}"#,
        r#"{"code":0,"message":"m"}"#,
        r#"{"code": 5 ,"data":null}"#,
        r#"{"code":12}"#,
        r#"{"code":-3}"#,
    ] {
        assert!(agree(body.as_bytes()), "fell back on {body}");
    }
    for body in [
        r#"{"code":0E1}"#,
        r#"{"code":5.}"#,
        r#"{"code":5.5}"#,
        r#"{"code":00}"#,
        r#"{"code":7x}"#,
        r#"{"code":7"#,
    ] {
        assert!(!agree(body.as_bytes()), "the scanner took {body}");
    }
}

#[test]
fn find_special_and_digits_end_agree_with_byte_loops() {
    let bytes: Vec<u8> = (0..=255).collect();
    for start in 0..bytes.len() {
        for len in 0..40.min(bytes.len() - start) {
            let slice = &bytes[start..start + len];
            let slow = slice
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(len);
            assert_eq!(find_special(slice, 0), slow);
            let slow = slice
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(len);
            assert_eq!(digits_end(slice, 0), slow);
        }
    }
}

/// A JSON value, rendered with optional whitespace; object keys may repeat.
#[derive(Clone, Debug)]
enum Node {
    Raw(String),
    Arr(Vec<Node>),
    Obj(Vec<(String, Node)>),
}

impl Node {
    fn render(&self, ws: &mut impl Iterator<Item = u8>, out: &mut String) {
        fn space(ws: &mut impl Iterator<Item = u8>, out: &mut String) {
            match ws.next().unwrap_or(0) % 16 {
                0 => out.push(' '),
                1 => out.push_str("\n\t"),
                2 => out.push('\r'),
                _ => {}
            }
        }
        match self {
            Node::Raw(text) => out.push_str(text),
            Node::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    space(ws, out);
                    item.render(ws, out);
                    space(ws, out);
                }
                out.push(']');
            }
            Node::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    space(ws, out);
                    out.push('"');
                    out.push_str(key);
                    out.push('"');
                    space(ws, out);
                    out.push(':');
                    space(ws, out);
                    value.render(ws, out);
                }
                space(ws, out);
                out.push('}');
            }
        }
    }
}

fn raw(text: &str) -> Node {
    Node::Raw(text.to_owned())
}

fn string() -> impl Strategy<Value = Node> + Clone {
    prop_oneof![
        4 => "[a-zA-Z0-9 ._:/-]{0,24}".prop_map(|s| Node::Raw(format!("\"{s}\""))),
        1 => proptest::collection::vec(
            prop_oneof![
                Just("a"), Just("\\\""), Just("\\\\"), Just("\\/"), Just("\\n"), Just("\\t"),
                Just("\\u0041"), Just("\\u00e9"), Just("\\u4E2D"), Just("\\ud83d\\ude00"),
                Just("\\ud800"), Just("\\udc00"), Just("\\ude00\\ud83d"), Just("é"), Just("中"), Just("\\b\\f\\r"),
            ],
            0..5,
        )
        .prop_map(|parts| Node::Raw(format!("\"{}\"", parts.concat()))),
    ]
}

fn number() -> impl Strategy<Value = Node> + Clone {
    prop_oneof![
        4 => any::<i32>().prop_map(|n| Node::Raw(n.to_string())),
        1 => prop_oneof![
            Just("0"), Just("-0"), Just("1.5"), Just("-0.0"), Just("1e3"), Just("2E+2"),
            Just("5e-1"), Just("123456789012345678"), Just("1234567890123456789"),
            Just("-9223372036854775808"), Just("18446744073709551615"),
            Just("18446744073709551616"), Just("1e400"), Just("0.1"), Just("1722769557708"),
        ]
        .prop_map(raw),
    ]
}

fn scalar() -> impl Strategy<Value = Node> + Clone {
    prop_oneof![
        Just(raw("null")),
        Just(raw("true")),
        Just(raw("false")),
        number(),
        string(),
    ]
}

/// Any value, its object keys drawn from the names the readers look for.
fn any_value() -> BoxedStrategy<Node> {
    scalar()
        .prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Node::Arr),
                proptest::collection::vec((key(), inner), 0..4).prop_map(Node::Obj),
            ]
        })
        .boxed()
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("task_id"),
        Just("task_status"),
        Just("task_status_msg"),
        Just("task_info"),
        Just("external_task_id"),
        Just("task_result"),
        Just("videos"),
        Just("images"),
        Just("url"),
        Just("final_unit_deduction"),
        Just("id"),
        Just("status"),
        Just("message"),
        Just("external_id"),
        Just("outputs"),
        Just("billing"),
        Just("amount"),
        Just("currency"),
        Just("tasks"),
        Just("code"),
        Just("data"),
        Just("created_at"),
        Just("updated_at"),
        Just("duration"),
        Just("task\\u005fid"),
        Just("x"),
    ]
    .prop_map(str::to_owned)
}

fn opt(value: impl Strategy<Value = Node> + Clone) -> impl Strategy<Value = Option<Node>> + Clone {
    prop_oneof![2 => Just(None), 1 => Just(Some(raw("null"))), 4 => value.prop_map(Some)]
}

fn status() -> impl Strategy<Value = Node> + Clone {
    prop_oneof![
        Just("submitted"),
        Just("processing"),
        Just("succeed"),
        Just("succeeded"),
        Just("failed"),
        Just("queued"),
    ]
    .prop_map(|s| Node::Raw(format!("\"{s}\"")))
}

fn text() -> impl Strategy<Value = Node> + Clone {
    prop_oneof![string(), number()]
}

fn url_list() -> impl Strategy<Value = Node> + Clone {
    proptest::collection::vec(
        (opt(string()), opt(scalar())).prop_map(|(url, other)| {
            let mut fields = Vec::new();
            if let Some(other) = other {
                fields.push(("duration".to_owned(), other));
            }
            if let Some(url) = url {
                fields.push(("url".to_owned(), url));
            }
            Node::Obj(fields)
        }),
        0..3,
    )
    .prop_map(Node::Arr)
}

/// A task object of either generation, well typed, fields in any order.
fn task() -> BoxedStrategy<Node> {
    let amount = prop_oneof![4 => number(), 1 => Just(raw("null"))];
    // Few currencies, so items agree as often as not; an escaped one, a number and an object
    // are the reference's to read.
    let currency = prop_oneof![
        4 => Just(raw("\"credit\"")),
        2 => Just(raw("\"USD\"")),
        1 => Just(raw("\"Credits\"")),
        1 => Just(raw("\"\"")),
        1 => Just(raw("\"cr\\u0065dit\"")),
        1 => Just(raw("7")),
        1 => Just(raw("{}")),
    ];
    let billing = proptest::collection::vec(
        (
            prop_oneof![1 => Just(None), 4 => amount.prop_map(Some)],
            prop_oneof![1 => Just(None), 4 => currency.prop_map(Some)],
            any::<bool>(),
        )
            .prop_map(|(a, c, currency_first)| {
                let mut fields: Vec<(String, Node)> = a
                    .map(|a| ("amount".to_owned(), a))
                    .into_iter()
                    .chain(c.map(|c| ("currency".to_owned(), c)))
                    .collect();
                if currency_first {
                    fields.reverse();
                }
                Node::Obj(fields)
            }),
        0..4,
    )
    .prop_map(Node::Arr);
    let result = (opt(url_list()), opt(url_list())).prop_map(|(v, i)| {
        let mut fields = Vec::new();
        fields.extend(v.map(|v| ("videos".to_owned(), v)));
        fields.extend(i.map(|i| ("images".to_owned(), i)));
        Node::Obj(fields)
    });
    let info = opt(string()).prop_map(|e| {
        Node::Obj(
            e.map(|e| ("external_task_id".to_owned(), e))
                .into_iter()
                .collect(),
        )
    });
    (
        (
            opt(text()),
            opt(status()),
            opt(string()),
            opt(info),
            opt(result),
            opt(text()),
        ),
        (
            opt(text()),
            opt(status()),
            opt(string()),
            opt(string()),
            opt(url_list()),
            opt(billing),
        ),
        opt(any_value()),
        any::<u64>(),
        prop_oneof![4 => Just(None), 1 => any::<usize>().prop_map(Some)],
    )
        .prop_map(|(legacy, new, other, order, dup)| {
            let (task_id, task_status, msg, info, result, deduction) = legacy;
            let (id, status, message, external, outputs, billing) = new;
            let mut fields: Vec<(String, Node)> = [
                ("task_id", task_id),
                ("task_status", task_status),
                ("task_status_msg", msg),
                ("task_info", info),
                ("task_result", result),
                ("final_unit_deduction", deduction),
                ("id", id),
                ("status", status),
                ("message", message),
                ("external_id", external),
                ("outputs", outputs),
                ("billing", billing),
                ("created_at", other),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect();
            // A cheap shuffle driven by `order`.
            let n = fields.len();
            for i in 0..n {
                let j = (order.rotate_left(i as u32 * 7) as usize) % n;
                fields.swap(i, j);
            }
            // A repeated field is serde's "duplicate field" error.
            if let Some(i) = dup.filter(|_| n > 0) {
                fields.push(fields[i % n].clone());
            }
            Node::Obj(fields)
        })
        .boxed()
}

/// `data` in each shape: one task, a list, a page, nested lists, or anything.
fn data() -> BoxedStrategy<Node> {
    prop_oneof![
        3 => task(),
        2 => proptest::collection::vec(task(), 0..4).prop_map(Node::Arr),
        1 => proptest::collection::vec(task(), 0..3)
            .prop_map(|tasks| Node::Obj(vec![("tasks".to_owned(), Node::Arr(tasks))])),
        1 => proptest::collection::vec(prop_oneof![task(), scalar()], 0..3)
            .prop_map(|items| Node::Arr(vec![Node::Arr(items)])),
        1 => any_value(),
    ]
    .boxed()
}

fn envelope() -> impl Strategy<Value = Node> {
    (
        prop_oneof![8 => number(), 1 => scalar()],
        opt(string()),
        opt(string()),
        opt(data()),
        opt(any_value()),
        any::<bool>(),
        prop_oneof![6 => Just(None), 1 => any::<usize>().prop_map(Some)],
    )
        .prop_map(|(code, message, request_id, data, extra, code_last, dup)| {
            let mut fields = vec![("code".to_owned(), code)];
            fields.extend(message.map(|m| ("message".to_owned(), m)));
            fields.extend(request_id.map(|r| ("request_id".to_owned(), r)));
            fields.extend(extra.map(|x| ("extra".to_owned(), x)));
            fields.extend(data.map(|d| ("data".to_owned(), d)));
            if code_last {
                fields.rotate_left(1);
            }
            if let Some(i) = dup {
                fields.push(fields[i % fields.len()].clone());
            }
            Node::Obj(fields)
        })
}

#[derive(Clone, Debug)]
enum Mutation {
    None,
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, &'static str),
    Delete(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => Just(Mutation::None),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (
            any::<usize>(),
            prop_oneof![
                Just(" "), Just("\n"), Just("\\n"), Just("\\u0041"), Just("\""), Just(","),
                Just("}"), Just("]"), Just("\"code\":1,"), Just("\"task_id\":\"x\","),
                Just("\"id\":\"y\","), Just("\"status\":\"failed\","), Just("\\"), Just("-"),
                Just("0"), Just("."), Just("e"), Just("null"), Just("\u{1}"), Just("é"),
            ]
        )
            .prop_map(|(i, s)| Mutation::Insert(i, s)),
        1 => any::<usize>().prop_map(Mutation::Delete),
    ]
}

fn mutate(text: String, mutation: &Mutation) -> Vec<u8> {
    let mut bytes = text.into_bytes();
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    match *mutation {
        Mutation::None => {}
        Mutation::Truncate(i) => bytes.truncate(at(i, bytes.len())),
        Mutation::Flip(i, b) => {
            if !bytes.is_empty() {
                let i = at(i, bytes.len());
                bytes[i] = b;
            }
        }
        Mutation::Insert(i, s) => {
            let i = at(i, bytes.len() + 1);
            bytes.splice(i..i, s.bytes());
        }
        Mutation::Delete(i) => {
            if !bytes.is_empty() {
                let i = at(i, bytes.len());
                bytes.remove(i);
            }
        }
    }
    bytes
}

proptest! {
    #[test]
    fn deduction_reads_as_the_parse(
        text in "[0-9]{0,18}|[ 0-9.eE+-]{0,12}|\\PC{0,8}|[ +-]{0,2}(inf|NaN|1e999)",
    ) {
        // As the reference reads it: a non-finite or negative deduction is no cost (keeping
        // `inf` and `NaN` here failed on `1E310` now and then, the reads being right).
        let parsed: Option<f64> =
            text.trim().parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0);
        prop_assert_eq!(format!("{:?}", deduction(&text)), format!("{parsed:?}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn scanner_agrees_with_the_reference(
        envelope in envelope(),
        ws in proptest::collection::vec(any::<u8>(), 0..64),
        mutation in mutation(),
    ) {
        let mut text = String::new();
        envelope.render(&mut ws.into_iter().chain(std::iter::repeat(9)), &mut text);
        agree(&mutate(text, &mutation));
    }

    #[test]
    fn plain_envelopes_take_the_fast_path(
        tasks in proptest::collection::vec(("[a-z0-9]{1,12}", status(), "[a-z:/.]{0,20}", any::<bool>()), 0..5),
        code in any::<i32>(),
    ) {
        let tasks: Vec<Node> = tasks
            .into_iter()
            .map(|(id, status, url, legacy)| {
                let id = Node::Raw(format!("\"{id}\""));
                let url = Node::Raw(format!("\"{url}\""));
                if legacy {
                    Node::Obj(vec![
                        ("task_id".to_owned(), id),
                        ("task_status".to_owned(), status),
                        ("task_result".to_owned(), Node::Obj(vec![(
                            "videos".to_owned(),
                            Node::Arr(vec![Node::Obj(vec![("url".to_owned(), url)])]),
                        )])),
                    ])
                } else {
                    Node::Obj(vec![
                        ("id".to_owned(), id),
                        ("status".to_owned(), status),
                        ("outputs".to_owned(), Node::Arr(vec![Node::Obj(vec![("url".to_owned(), url)])])),
                    ])
                }
            })
            .collect();
        let n = tasks.len();
        let body = Node::Obj(vec![
            ("code".to_owned(), Node::Raw(code.to_string())),
            ("message".to_owned(), raw("\"ok\"")),
            ("data".to_owned(), Node::Arr(tasks)),
        ]);
        let mut text = String::new();
        body.render(&mut std::iter::empty(), &mut text);
        prop_assert!(agree(text.as_bytes()), "fell back on {}", text);
        let mut tasks = Reports::None;
        scan(&text, &mut tasks).unwrap();
        prop_assert_eq!(tasks.as_slice().len(), n);
    }
}

/// Every committed fuzz corpus file (and, for envelope inputs, the body after the status byte)
/// reads the same through the scanner, `Envelope::parse` and `Outcome` as through the reference.
#[test]
fn fuzz_corpora_agree() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let mut files = 0;
    let mut fast = 0;
    for dir in std::fs::read_dir(&root).expect("the fuzz corpora are committed") {
        let dir = dir.expect("readable corpus directory").path();
        for entry in std::fs::read_dir(&dir).expect("readable corpus directory") {
            let data = std::fs::read(entry.expect("readable corpus entry").path())
                .expect("readable corpus file");
            files += 1;
            fast += usize::from(agree(&data));
            if let Some((_, body)) = data.split_first() {
                fast += usize::from(agree(body));
            }
        }
    }
    assert!(files >= 1000, "only {files} corpus files");
    assert!(fast >= 50, "the scanner took only {fast} corpus inputs");
}

/// What an envelope says, read from a plain `serde_json::Value` by the rules the crate
/// documents (`Envelope`, `TaskReport`), written apart from both readers: a second opinion
/// that the scanner and its serde reference cannot share a mistake with.
#[derive(Debug, PartialEq)]
struct Meaning {
    code: i64,
    message: String,
    request_id: Option<String>,
    /// Each task's id, status, generation, external id, cost and the cost's currency.
    tasks: Vec<TaskMeaning>,
    /// `data` is a list every element of which is itself one task (`Outcome::lists_every_task`).
    lists_every_task: bool,
}

impl Meaning {
    fn of_envelope(envelope: &Envelope) -> Meaning {
        Meaning {
            code: envelope.code.as_i64(),
            message: envelope.message.clone(),
            request_id: envelope.request_id.clone(),
            tasks: envelope
                .tasks
                .iter()
                .map(|t| {
                    let ext = t.external_id.clone();
                    let currency = t.cost_currency.as_ref().map(|c| c.as_str().to_owned());
                    (
                        t.id.clone(),
                        t.status.clone(),
                        t.generation,
                        ext,
                        t.cost,
                        currency,
                    )
                })
                .collect(),
            lists_every_task: envelope.lists_every_task,
        }
    }
}

/// The envelope's meaning, or `None` where the rules say it does not read as a whole: no
/// object, no integer `code`, a text or a task's id, status or page of the wrong type.
fn meaning(envelope: &serde_json::Value) -> Option<Meaning> {
    use serde_json::Value;
    let fields = envelope.as_object()?;
    let text = |key: &str| match fields.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(text)) => Some(Some(text.clone())),
        Some(_) => None,
    };
    Some(Meaning {
        code: fields.get("code")?.as_i64()?,
        message: text("message")?.unwrap_or_default(),
        request_id: text("request_id")?,
        tasks: match fields.get("data") {
            Some(data) => data_meaning(data)?,
            None => Vec::new(),
        },
        lists_every_task: fields
            .get("data")
            .and_then(Value::as_array)
            .is_some_and(|list| list.iter().all(is_one_task)),
    })
}

/// Whether an element of a `data` list is itself one task: an object that names its task and
/// holds no `tasks` key (`null` included), so that no page or list inside it stands in for it.
fn is_one_task(element: &serde_json::Value) -> bool {
    element.as_object().is_some_and(|fields| {
        !fields.contains_key("tasks") && matches!(task_meaning(fields), Some(Some(_)))
    })
}

type TaskMeaning = (
    String,
    TaskStatus,
    ApiGeneration,
    Option<String>,
    Option<f64>,
    Option<String>,
);

/// A number or a number in a string, as a finite `f64` at least zero (`TaskReport::cost`'s
/// deduction); anything else is none.
fn amount_meaning(value: Option<&serde_json::Value>) -> Option<f64> {
    number_meaning(value).filter(|v| *v >= 0.0)
}

/// A number or a number in a string, as a finite `f64`; anything else is none.
fn number_meaning(value: Option<&serde_json::Value>) -> Option<f64> {
    use serde_json::Value;
    match value? {
        Value::String(text) => text.trim().parse::<f64>().ok(),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
    .filter(|v| v.is_finite())
}

/// A new-style task's cost: the sum of its billing items' amounts when those with an amount
/// name at most one currency (a string or a number's text; `""` names none), and that
/// currency, as sent. No cost when `billing` is no list, an element is no object, an amount
/// (not missing, `null` or `""`) is no finite number or is below zero, an item with an amount
/// names a currency that is neither text nor a number, or the sum passes `f64`.
fn billing_meaning(billing: Option<&serde_json::Value>) -> (Option<f64>, Option<String>) {
    use serde_json::Value;
    let Some(billing) = billing else {
        return (None, None);
    };
    let items: Vec<&serde_json::Map<String, Value>> = match billing {
        Value::Array(items) if items.iter().all(Value::is_object) => {
            items.iter().filter_map(Value::as_object).collect()
        }
        _ => return (None, None),
    };
    let amount = |item: &serde_json::Map<String, Value>| match item.get("amount") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        value => number_meaning(value)
            .filter(|v| *v >= 0.0)
            .map(Some)
            .ok_or(()),
    };
    let mut amounts = Vec::new();
    for item in &items {
        let Ok(found) = amount(item) else {
            return (None, None);
        };
        if found.is_some()
            && matches!(
                item.get("currency"),
                Some(Value::Bool(_) | Value::Array(_) | Value::Object(_))
            )
        {
            return (None, None);
        }
        amounts.push(found);
    }
    let mut currencies = items
        .iter()
        .zip(&amounts)
        .filter(|(_, amount)| amount.is_some())
        .filter_map(|(item, _)| match item.get("currency") {
            Some(Value::String(c)) if !c.is_empty() => Some(c.clone()),
            // As the reference's `Loose` prints a number.
            Some(Value::Number(n)) => Some(match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), ..) => u.to_string(),
                (_, Some(i), _) => i.to_string(),
                (.., f) => f.map(|f| f.to_string()).unwrap_or_default(),
            }),
            _ => None,
        });
    let first = currencies.next();
    if let Some(first) = &first
        && currencies.any(|other| other != *first)
    {
        return (None, None);
    }
    let sum: f64 = amounts.iter().flatten().sum();
    if !sum.is_finite() {
        return (None, None);
    }
    (Some(sum), first)
}

/// `data`, or an element of it: an object is a task or a page, a list holds such values,
/// anything else reports nothing.
fn data_meaning(data: &serde_json::Value) -> Option<Vec<TaskMeaning>> {
    use serde_json::Value;
    match data {
        Value::Array(items) => {
            let mut all = Vec::new();
            for item in items {
                all.extend(data_meaning(item)?);
            }
            Some(all)
        }
        Value::Object(fields) => {
            let own = task_meaning(fields)?;
            match fields.get("tasks") {
                None | Some(Value::Null) => Some(own.into_iter().collect()),
                Some(Value::Array(page)) => {
                    let mut all = Vec::new();
                    for item in page {
                        // An element that is no object reports nothing.
                        if let Value::Object(item) = item {
                            all.extend(task_meaning(item)?);
                        }
                    }
                    Some(all)
                }
                Some(_) => None,
            }
        }
        _ => Some(Vec::new()),
    }
}

/// A task object's report, if it names its task: an id (a non-empty string or a 64-bit
/// integer) and a status of one generation, legacy first. `None` (outer) when a field read
/// strictly has the wrong type.
fn task_meaning(
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Option<Option<TaskMeaning>> {
    use serde_json::Value;
    // `Some(None)` for no id (missing, `null`, empty), `None` for one of the wrong type.
    let id = |key: &str| match fields.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(id)) => Some(Some(id.clone()).filter(|id| !id.is_empty())),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Some(Some(n.to_string())),
        Some(_) => None,
    };
    let status = |key: &str| match fields.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(status)) => Some(Some(TaskStatus::parse(status))),
        Some(_) => None,
    };
    // An external id: a non-empty string or a 64-bit integer; anything else is none.
    let external = |value: Option<&Value>| match value {
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    };
    let (task_id, task_status, new_id, new_status) = (
        id("task_id")?,
        status("task_status")?,
        id("id")?,
        status("status")?,
    );
    // A page's own page: checked, not read.
    match fields.get("tasks") {
        None | Some(Value::Null) => {}
        Some(Value::Array(page)) => {
            for item in page {
                if let Value::Object(item) = item {
                    task_meaning(item)?;
                }
            }
        }
        Some(_) => return None,
    }
    Some(match (task_id, task_status, new_id, new_status) {
        (Some(id), Some(status), ..) => {
            let info = fields.get("task_info").and_then(Value::as_object);
            let ext = external(info.and_then(|info| info.get("external_task_id")));
            let cost = amount_meaning(fields.get("final_unit_deduction"));
            Some((id, status, ApiGeneration::Legacy, ext, cost, None))
        }
        (.., Some(id), Some(status)) => {
            let ext = external(fields.get("external_id"));
            let (cost, currency) = billing_meaning(fields.get("billing"));
            Some((id, status, ApiGeneration::New, ext, cost, currency))
        }
        _ => None,
    })
}

/// Whether any object in `node` names a key twice (after unescaping): serde's typed read
/// refuses some of those, where a `Value` keeps the last.
fn has_duplicate_keys(node: &Node) -> bool {
    match node {
        Node::Raw(_) => false,
        Node::Arr(items) => items.iter().any(has_duplicate_keys),
        Node::Obj(fields) => {
            let mut keys: Vec<String> = fields
                .iter()
                .map(|(key, _)| serde_json::from_str(&format!("\"{key}\"")).unwrap())
                .collect();
            keys.sort();
            keys.windows(2).any(|pair| pair[0] == pair[1])
                || fields.iter().any(|(_, value)| has_duplicate_keys(value))
        }
    }
}

/// How a body compared with its `Value` reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compared {
    /// Not compared: no `Value` reading (a lone surrogate, a number out of `f64`'s range).
    Skipped,
    /// The rules say it does not read as a whole, and no reader took a task from it.
    Unreadable,
    /// Read alike, with this many tasks, the scanner itself taking it or not, and whether
    /// `data` was a list read in whole.
    Read {
        tasks: usize,
        scanner: bool,
        whole: bool,
    },
}

/// Checks every reader of `body` against its `Value` reading.
fn agree_with_value(body: &[u8]) -> Compared {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Compared::Skipped;
    };
    let shown = || String::from_utf8_lossy(body).into_owned();
    let mut tasks = Reports::None;
    let scanned = std::str::from_utf8(body)
        .ok()
        .and_then(|text| scan(text, &mut tasks).ok())
        .map(|head| head.into_envelope(tasks));
    let outcome = Outcome::parse(
        StatusCode::OK,
        &HeaderMap::new(),
        body,
        tokio::time::Instant::now(),
    );
    let parsed = Envelope::parse(body);
    match meaning(&value) {
        Some(expected) => {
            let parsed = parsed.unwrap_or_else(|e| panic!("{e}: {}", shown()));
            assert_eq!(Meaning::of_envelope(&parsed), expected, "{}", shown());
            if let Some(scanned) = &scanned {
                assert_eq!(Meaning::of_envelope(scanned), expected, "{}", shown());
            }
            let outcome = outcome.unwrap_or_else(|e| panic!("{e}: {}", shown()));
            assert_eq!(
                Meaning::of_envelope(outcome.envelope()),
                expected,
                "{}",
                shown()
            );
            Compared::Read {
                tasks: expected.tasks.len(),
                scanner: scanned.is_some(),
                whole: expected.lists_every_task,
            }
        }
        None => {
            // At most an error code is kept: never a task, never a success.
            for envelope in [
                parsed.ok(),
                scanned,
                outcome.ok().map(|o| o.envelope().clone()),
            ]
            .into_iter()
            .flatten()
            {
                assert!(envelope.tasks.is_empty(), "{envelope:?}: {}", shown());
                assert_ne!(envelope.code, crate::code::Code::Success, "{}", shown());
            }
            Compared::Unreadable
        }
    }
}

/// The scanner, `Envelope::parse` and `Outcome` against a plain `serde_json::Value` reading of
/// generated envelopes of every shape (both generations, lists, pages, odd types, empty and
/// numeric ids, escapes, whitespace): what they read is what the documented rules say.
#[test]
fn the_readers_agree_with_a_plain_value_reading() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 3000,
        failure_persistence: None,
        ..Config::default()
    });
    let counts = std::cell::RefCell::new(std::collections::BTreeMap::<&str, usize>::new());
    let strategy = (envelope(), proptest::collection::vec(any::<u8>(), 0..64));
    runner
        .run(&strategy, |(envelope, ws)| {
            if has_duplicate_keys(&envelope) {
                return Ok(());
            }
            let mut text = String::new();
            envelope.render(&mut ws.into_iter().chain(std::iter::repeat(9)), &mut text);
            let kind = match agree_with_value(text.as_bytes()) {
                Compared::Skipped => "skipped",
                Compared::Unreadable => "unreadable",
                Compared::Read { tasks: 0, .. } => "no task",
                Compared::Read { scanner: true, .. } => "tasks, scanned",
                Compared::Read { scanner: false, .. } => "tasks, reference",
            };
            *counts.borrow_mut().entry(kind).or_default() += 1;
            Ok(())
        })
        .unwrap();
    // Every kind of case came up often enough for the comparison to mean something (about
    // 400, 1200, 150 and 35 of each in 3000).
    let counts = counts.into_inner();
    for (kind, least) in [
        ("unreadable", 100),
        ("no task", 300),
        ("tasks, scanned", 50),
        ("tasks, reference", 10),
    ] {
        let n = counts.get(kind).copied().unwrap_or(0);
        assert!(n >= least, "only {n} cases of {kind}: {counts:?}");
    }
}

/// Hand-picked bodies for the `Value` reading, the adversarial ones a server or proxy could
/// send: duplicate-free escapes, odd types, empty and numeric ids, deep nesting, texts at the
/// size where an outcome stops keeping the body.
#[test]
fn adversarial_bodies_agree_with_a_plain_value_reading() {
    let mut bodies: Vec<String> = [
        r#"{"code":0,"data":{"task_id":"t\"1\\","task_status":"succ\u0065ed"}}"#,
        r#"{"code":0,"data":{"task\u005fid":"t","task_status":"submitted"}}"#,
        r#"{"code":0,"data":{"task_id":"\u4e2d\ud83d\ude00","task_status":"failed"}}"#,
        r#"{"code":0,"message":"\u00e9\n","request_id":"r\/\u0031","data":null}"#,
        r#"{"code":"0","data":{"task_id":"t","task_status":"submitted"}}"#,
        r#"{"code":"1303","data":{"task_id":"t","task_status":"submitted"}}"#,
        r#"{"code":0,"data":{"task_id":860000000000000001,"task_status":"submitted"}}"#,
        r#"{"code":0,"data":{"task_id":86000000000000000012345,"task_status":"submitted"}}"#,
        r#"{"code":0,"data":{"task_id":"","task_status":"submitted"}}"#,
        r#"{"code":0,"data":{"task_id":"t","task_status":7}}"#,
        r#"{"code":0,"data":{"task_id":"t","task_status":"succeed","task_result":{"videos":{"tasks":[]}}}}"#,
        r#"{"code":0,"data":{"tasks":{"task_id":"t","task_status":"succeed"}}}"#,
        r#"{"code":0,"data":{"tasks":[["t","succeed"]]}}"#,
        r#"{"code":0,"data":[null,[],{},"x",1,{"id":"a","status":"failed"}]}"#,
        r#"{"code":0,"data":{"task_id":"t","task_status":"submitted","tasks":null}}"#,
        r#"{"code":0,"data":{"task_id":"t","task_status":"submitted","tasks":[]}}"#,
        r#"{"code":0} "#,
        r#"{"code":0}x"#,
        r#"{"code":0,"data":{"id":"a","status":"failed"}}{"code":1}"#,
    ]
    .map(str::to_owned)
    .to_vec();
    for depth in [10, 62, 63, 64, 65, 120, 127, 128, 200] {
        let open = "[".repeat(depth);
        let close = "]".repeat(depth);
        bodies.push(format!(
            r#"{{"code":0,"data":{open}{{"id":"a","status":"failed"}}{close}}}"#
        ));
        let open = r#"{"tasks":["#.repeat(depth);
        let close = "]}".repeat(depth);
        bodies.push(format!(
            r#"{{"code":0,"data":{open}{{"id":"a","status":"failed"}}{close}}}"#
        ));
    }
    // Around the size up to which an outcome keeps the body for its texts.
    for len in [4090_usize, 4095, 4096, 4097, 4100, 2 * 1024 * 1024] {
        let head = r#"{"code":1303,"message":"m","request_id":""#;
        let pad = len.saturating_sub(head.len() + 2);
        bodies.push(format!(r#"{head}{}"}}"#, "r".repeat(pad)));
    }
    for body in &bodies {
        let compared = agree_with_value(body.as_bytes());
        // The same bytes as a shared body (kept by the outcome when small).
        let outcome = Outcome::parse_bytes(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::copy_from_slice(body.as_bytes()),
            tokio::time::Instant::now(),
        );
        if let (Compared::Read { .. }, Ok(outcome)) = (compared, outcome) {
            let reference = Envelope::parse_reference(body.as_bytes()).unwrap();
            assert_eq!(outcome.message(), reference.message);
            assert_eq!(outcome.request_id(), reference.request_id.as_deref());
        }
    }
    // Bodies that are not JSON: malformed, never a panic.
    for body in [
        &b"\xff{"[..],
        b"{\"code\":0,\"message\":\"\xc3\"}",
        b"\0",
        b"",
    ] {
        assert_eq!(agree_with_value(body), Compared::Skipped);
        let err = Outcome::parse(
            StatusCode::OK,
            &HeaderMap::new(),
            body,
            tokio::time::Instant::now(),
        )
        .unwrap_err();
        assert!(!err.reason().is_empty());
    }
}

/// An element of a `data` list: mostly a task that names itself (either generation, a text
/// or a number for id, any status word), else a shape that is no task of a list's: one that
/// also holds a `tasks` key (a page, `[]`, `null`), one without id or status or with an empty
/// id, a list holding a task, an empty object, a scalar (one every reader reads).
fn list_element() -> BoxedStrategy<Node> {
    let id = prop_oneof![
        3 => "[a-z0-9]{1,8}".prop_map(|id| Node::Raw(format!("\"{id}\""))),
        1 => (0..1_000_000_u32).prop_map(|id| Node::Raw(id.to_string())),
    ];
    let named = (any::<bool>(), id, status(), any::<bool>())
        .prop_map(|(legacy, id, status, external)| {
            let (id_key, status_key) = if legacy {
                ("task_id", "task_status")
            } else {
                ("id", "status")
            };
            let mut fields = vec![(id_key.to_owned(), id), (status_key.to_owned(), status)];
            if external {
                fields.push(match legacy {
                    true => (
                        "task_info".to_owned(),
                        Node::Obj(vec![("external_task_id".to_owned(), raw("\"e\""))]),
                    ),
                    false => ("external_id".to_owned(), raw("\"e\"")),
                });
            }
            Node::Obj(fields)
        })
        .boxed();
    let page = prop_oneof![
        Just(raw("null")),
        Just(Node::Arr(Vec::new())),
        named.clone().prop_map(|task| Node::Arr(vec![task])),
    ];
    let with_a_page = (named.clone(), page).prop_map(|(task, page)| match task {
        Node::Obj(mut fields) => {
            fields.push(("tasks".to_owned(), page));
            Node::Obj(fields)
        }
        other => other,
    });
    let unnamed = named.clone().prop_map(|task| match task {
        // Without its status, or with an empty id.
        Node::Obj(mut fields) if fields.len() > 2 => {
            fields[0].1 = raw("\"\"");
            Node::Obj(fields)
        }
        Node::Obj(mut fields) => {
            fields.truncate(1);
            Node::Obj(fields)
        }
        other => other,
    });
    prop_oneof![
        12 => named.clone(),
        2 => with_a_page,
        1 => unnamed,
        1 => named.prop_map(|task| Node::Arr(vec![task])),
        1 => Just(Node::Obj(Vec::new())),
        1 => prop_oneof![
            Just(raw("null")),
            Just(raw("true")),
            Just(raw("7")),
            Just(raw("\"t1\"")),
        ],
    ]
    .boxed()
}

/// `lists_every_task` on generated `data` lists, on both paths (the scanner, and its fallback
/// beside an escaped key): every reader agrees with the reference and with the `Value`
/// reading, which says whole only when each element is itself a task. The generator of
/// `the_readers_agree_with_a_plain_value_reading` seldom makes such a list, and never one with
/// an element that holds a page.
#[test]
fn a_list_is_whole_alike_in_every_reader() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 1000,
        failure_persistence: None,
        ..Config::default()
    });
    let counts = std::cell::RefCell::new(std::collections::BTreeMap::<(bool, bool), usize>::new());
    let strategy = (
        proptest::collection::vec(list_element(), 0..5),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..16),
    );
    runner
        .run(&strategy, |(list, escaped, ws)| {
            let mut fields = vec![("code".to_owned(), raw("0"))];
            if escaped {
                fields.push(("\\u0078".to_owned(), raw("1")));
            }
            fields.push(("data".to_owned(), Node::Arr(list)));
            let mut text = String::new();
            Node::Obj(fields).render(&mut ws.into_iter().chain(std::iter::repeat(9)), &mut text);
            let took = agree(text.as_bytes());
            let Compared::Read { scanner, whole, .. } = agree_with_value(text.as_bytes()) else {
                panic!("not read: {text}");
            };
            prop_assert_eq!(took, scanner);
            *counts.borrow_mut().entry((scanner, whole)).or_default() += 1;
            Ok(())
        })
        .unwrap();
    // Both answers on both paths, often enough to mean something.
    let counts = counts.into_inner();
    for scanner in [true, false] {
        for whole in [true, false] {
            let n = counts.get(&(scanner, whole)).copied().unwrap_or(0);
            assert!(
                n >= 100,
                "only {n} cases of scanner {scanner}, whole {whole}: {counts:?}"
            );
        }
    }
}

/// `text` with each character inside its strings (keys included) that `picks` chooses written as
/// a `\u` escape, in either case of hex: the same JSON to serde_json, spelled another way.
fn escape_in_strings(text: &str, picks: &[u8]) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    // `verbatim`: characters of an escape still to copy as written (`\"`, `\u0041`).
    let (mut in_string, mut verbatim) = (false, 0);
    let mut picks = picks.iter().cycle();
    for c in text.chars() {
        if verbatim > 0 {
            verbatim -= 1;
            if c == 'u' && verbatim == 0 {
                verbatim = 4;
            }
            out.push(c);
            continue;
        }
        if in_string && c != '"' && c != '\\' && u32::from(c) < 0x1_0000 {
            match picks.next().copied().unwrap_or(0) % 4 {
                0 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
                1 => out.push_str(&format!("\\u{:04X}", u32::from(c))),
                _ => out.push(c),
            }
            continue;
        }
        out.push(c);
        if in_string && c == '\\' {
            verbatim = 1;
        } else if c == '"' {
            in_string = !in_string;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Every name and text written with escapes anywhere (`"co\u0064e"`, `"succe\u0065d"`,
    /// `"\u0074asks"`) reads as the reference and a plain `Value` reading read it.
    #[test]
    fn names_and_texts_written_with_escapes_agree(
        envelope in envelope(),
        ws in proptest::collection::vec(any::<u8>(), 0..64),
        picks in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let mut text = String::new();
        envelope.render(&mut ws.into_iter().chain(std::iter::repeat(9)), &mut text);
        let escaped = escape_in_strings(&text, &picks);
        prop_assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).ok(),
            serde_json::from_str::<serde_json::Value>(&escaped).ok()
        );
        agree(escaped.as_bytes());
        if !has_duplicate_keys(&envelope) {
            agree_with_value(escaped.as_bytes());
        }
    }
}

proptest! {
    /// Billing lists as Kling writes them (amounts as numbers, a few currencies, `""`,
    /// `null`, fields in any order): the scanner takes each, and its cost is the reference's
    /// and the plain `Value` reading's (summed in one currency, none across two).
    #[test]
    fn billing_lists_take_the_fast_path_and_cost_alike(
        items in proptest::collection::vec(
            (
                proptest::option::of(prop_oneof![
                    (0u32..100_000).prop_map(|n| raw(&n.to_string())),
                    (0u32..10_000, 0u32..100).prop_map(|(n, c)| raw(&format!("{n}.{c:02}"))),
                    Just(raw("-0")),
                    Just(raw("null")),
                ]),
                proptest::option::of(prop_oneof![
                    Just("\"credit\""), Just("\"USD\""), Just("\"\""), Just("null"),
                    Just("\"CREDIT\""),
                ]),
                any::<bool>(),
            ),
            0..5,
        ),
    ) {
        let items: Vec<Node> = items
            .into_iter()
            .map(|(amount, currency, currency_first)| {
                let mut fields: Vec<(String, Node)> = amount
                    .map(|a| ("amount".to_owned(), a))
                    .into_iter()
                    .chain(currency.map(|c| ("currency".to_owned(), raw(c))))
                    .collect();
                if currency_first {
                    fields.reverse();
                }
                fields.push(("package_type".to_owned(), raw("\"video\"")));
                Node::Obj(fields)
            })
            .collect();
        let task = Node::Obj(vec![
            ("id".to_owned(), raw("\"t\"")),
            ("status".to_owned(), raw("\"succeeded\"")),
            ("billing".to_owned(), Node::Arr(items)),
        ]);
        let body = Node::Obj(vec![
            ("code".to_owned(), raw("0")),
            ("data".to_owned(), task),
        ]);
        let mut text = String::new();
        body.render(&mut std::iter::empty(), &mut text);
        prop_assert!(agree(text.as_bytes()), "fell back on {}", text);
        let compared = agree_with_value(text.as_bytes());
        prop_assert!(
            matches!(compared, Compared::Read { tasks: 1, scanner: true, .. } | Compared::Skipped),
            "{:?} {}",
            compared,
            text
        );
    }
}
