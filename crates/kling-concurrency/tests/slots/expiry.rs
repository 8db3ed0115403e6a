//! A task held to its lease's end: its slots go back, and the user hears of it.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::Outcome;
use tokio::time::advance;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::support::*;

/// Every event at WARN or above, its fields written out (`name=value`, space-separated).
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, "{}={} ", field.name(), value);
    }
}

impl Subscriber for Warnings {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::WARN
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// A task no query, callback or listing mentions again is released when its lease ends, and a
/// warning names it (its pool, account and task id): the task may still be running on the
/// server, and the slot it frees may meet a `1303`. A task a query reports ended is released
/// without one (the negative control).
#[tokio::test(start_paused = true)]
async fn a_lease_that_runs_out_is_logged_with_the_task_it_held() {
    let warnings = Warnings::default();
    let _guard = tracing::subscriber::set_default(warnings.clone());
    let lease = Duration::from_secs(600);
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1).lease(lease)).unwrap();
    let mut svc = layer.layer(fake.clone());

    // Followed to its end: released, no warning.
    let answer = svc.ready().await.unwrap().call(create()).await.unwrap();
    let followed = Outcome::of(&answer).unwrap().task().unwrap().id.clone();
    fake.finish(&followed);
    let query = get(&format!("/v1/videos/text2video/{followed}"));
    svc.ready().await.unwrap().call(query).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
    assert_eq!(warnings.taken(), Vec::<String>::new(), "a task that ended");

    // Never heard of again: its lease ends while a create waits for the slot.
    let answer = svc.ready().await.unwrap().call(create()).await.unwrap();
    let forgotten = Outcome::of(&answer).unwrap().task().unwrap().id.clone();
    let mut waiting = spawn(svc.ready().await.unwrap().call(create()));
    assert_pending!(waiting.poll());
    advance(lease).await;
    assert_ready_ok!(waiting.poll());
    let warnings = warnings.taken();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning = &warnings[0];
    for part in [
        format!("task_id={forgotten}"),
        "pool=video".to_owned(),
        "weight=1".to_owned(),
        "held_secs=600".to_owned(),
        "lease".to_owned(),
    ] {
        assert!(warning.contains(&part), "{part:?} in {warning}");
    }
}
