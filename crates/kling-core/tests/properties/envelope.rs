use kling_core::{Code, Envelope, TaskStatus};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "[a-z_]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("task_id".to_owned()),
                    Just("task_status".to_owned()),
                    Just("id".to_owned()),
                    Just("status".to_owned()),
                    Just("tasks".to_owned()),
                    Just("task_result".to_owned()),
                    Just("outputs".to_owned()),
                    Just("billing".to_owned()),
                    Just("url".to_owned()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Envelope::parse(&bytes);
    }

    #[test]
    fn any_json_data_never_panics(code in any::<i64>(), data in json_value()) {
        let body = serde_json::json!({"code": code, "message": "m", "request_id": "r", "data": data});
        let env = Envelope::parse(body.to_string().as_bytes());
        prop_assert!(env.is_ok() || !body["data"].is_null());
        match env {
            Ok(env) => prop_assert_eq!(env.code, Code::from_i64(code)),
            // Only `data` can be wrong here: the error names the field in it that was.
            Err(e) => prop_assert!(
                e.to_string().contains("`data"),
                "{} for {}", e, body
            ),
        }
    }

    /// A success envelope that is JSON with one field of a type no reader takes, at any of
    /// the places a task sits: the error names that field by its path, says what came, and
    /// still says where.
    #[test]
    fn one_wrong_typed_field_is_named_by_its_path(
        (field, wrong) in wrong_typed_field(),
        place in 0..4usize,
        legacy in any::<bool>(),
    ) {
        let (id, status) = if legacy { ("task_id", "task_status") } else { ("id", "status") };
        let mut task = serde_json::json!({id: "t", status: "submitted"});
        let (path, body) = match field {
            Field::Code => ("code".to_owned(), serde_json::json!({"code": wrong, "data": task})),
            Field::Message | Field::RequestId => {
                let name = if field == Field::Message { "message" } else { "request_id" };
                (name.to_owned(), serde_json::json!({"code": 0, name: wrong, "data": task}))
            }
            Field::Tasks => (
                "data.tasks".to_owned(),
                serde_json::json!({"code": 0, "data": {"tasks": wrong}}),
            ),
            Field::Id | Field::Status => {
                let name = if field == Field::Id { id } else { status };
                task[name] = wrong;
                let fine = serde_json::json!({id: "a", status: "failed"});
                match place {
                    0 => (format!("data.{name}"), serde_json::json!({"code": 0, "data": task})),
                    1 => (
                        format!("data[1].{name}"),
                        serde_json::json!({"code": 0, "data": [fine, task]}),
                    ),
                    2 => (
                        format!("data.tasks[1].{name}"),
                        serde_json::json!({"code": 0, "data": {"tasks": [fine, task]}}),
                    ),
                    _ => (
                        format!("data[0][1].{name}"),
                        serde_json::json!({"code": 0, "data": [[fine, task]]}),
                    ),
                }
            }
        };
        for text in [body.to_string(), serde_json::to_string_pretty(&body).unwrap()] {
            let e = Envelope::parse(text.as_bytes()).unwrap_err().to_string();
            prop_assert!(e.contains(&format!(" at `{path}`: ")), "{} for {}", e, text);
            prop_assert!(e.contains(", expected "), "{}", e);
            prop_assert!(e.contains(" at line "), "{}", e);
        }
    }

    #[test]
    fn generated_tasks_are_reported(
        ids in proptest::collection::vec("[A-Za-z0-9]{1,16}", 1..20),
        statuses in proptest::collection::vec(
            prop_oneof![Just("submitted"), Just("processing"), Just("succeeded"), Just("failed")],
            20,
        ),
        legacy in any::<bool>(),
    ) {
        let tasks: Vec<serde_json::Value> = ids
            .iter()
            .zip(&statuses)
            .map(|(id, status)| {
                if legacy {
                    let status = if *status == "succeeded" { "succeed" } else { status };
                    serde_json::json!({"task_id": id, "task_status": status})
                } else {
                    serde_json::json!({"id": id, "status": status})
                }
            })
            .collect();
        let body = serde_json::json!({"code": 0, "message": "SUCCEED", "request_id": "r", "data": tasks});
        let env = Envelope::parse(body.to_string().as_bytes()).unwrap();
        prop_assert_eq!(env.tasks.len(), ids.len());
        for ((task, id), status) in env.tasks.iter().zip(&ids).zip(&statuses) {
            prop_assert_eq!(&task.id, id);
            prop_assert_eq!(task.status.is_terminal(), matches!(*status, "succeeded" | "failed"));
            // Each word is read as the status it names, not kept as an unknown one.
            let expected = match *status {
                "submitted" => TaskStatus::Submitted,
                "processing" => TaskStatus::Processing,
                "succeeded" => TaskStatus::Succeeded,
                _ => TaskStatus::Failed,
            };
            prop_assert_eq!(&task.status, &expected);
        }
    }
}

/// A field the strict readers read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Field {
    Code,
    Message,
    RequestId,
    Id,
    Status,
    Tasks,
}

/// A field and a value of a JSON type it never takes (a `code` as a number-like string is
/// read, as a proxy writes it, so only other kinds are wrong for it).
fn wrong_typed_field() -> impl Strategy<Value = (Field, serde_json::Value)> {
    let object = || json_value().prop_map(|v| serde_json::json!({"v": v}));
    let array = || json_value().prop_map(|v| serde_json::json!([v]));
    let boolean = || any::<bool>().prop_map(serde_json::Value::from);
    let fraction = || {
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from)
    };
    let integer = || any::<i64>().prop_map(serde_json::Value::from);
    let word = || "[a-z_]{0,12}".prop_map(serde_json::Value::from);
    prop_oneof![
        prop_oneof![
            object(),
            array(),
            boolean(),
            Just(serde_json::Value::Null),
            word()
        ]
        .prop_map(|v| (Field::Code, v)),
        prop_oneof![object(), array(), boolean(), integer(), fraction()]
            .prop_map(|v| (Field::Message, v)),
        prop_oneof![object(), array(), boolean(), integer(), fraction()]
            .prop_map(|v| (Field::RequestId, v)),
        prop_oneof![object(), array(), boolean(), fraction()].prop_map(|v| (Field::Id, v)),
        prop_oneof![object(), array(), boolean(), integer(), fraction()]
            .prop_map(|v| (Field::Status, v)),
        prop_oneof![object(), boolean(), integer(), fraction(), word()]
            .prop_map(|v| (Field::Tasks, v)),
    ]
}
