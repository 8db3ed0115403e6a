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
        if let Ok(env) = env {
            prop_assert_eq!(env.code, Code::from_i64(code));
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
