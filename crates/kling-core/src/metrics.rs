//! The names of every metric the stack records, in one place, so layers and dashboards agree.
//!
//! Names follow OpenTelemetry's HTTP-client conventions in their Prometheus-safe form
//! (`http_client_request_duration_seconds` for `http.client.request.duration`). Labels use the
//! `LABEL_*` names. Nothing here records anything: each layer records through the `metrics`
//! facade with these names, and `kling-metrics` documents them in one table.

use crate::intern::BoundedLabels;
use crate::{Pool, Product};

/// Histogram, seconds: one logical request, including waits and retries.
/// Labels: `kind`, `pool`, `status`, `code`.
pub const REQUEST_DURATION: &str = "http_client_request_duration_seconds";
/// Counter: responses by Kling code. Labels: `kind`, `code`.
pub const RESPONSES: &str = "kling_responses_total";
/// Counter: retries by reason. Labels: `kind`, `reason`.
pub const RETRIES: &str = "kling_retries_total";
/// Counter: retries refused because the retry budget was spent. Labels: `kind`.
pub const RETRY_BUDGET_EXHAUSTED: &str = "kling_retry_budget_exhausted_total";
/// Counter: key-wide pauses started after a 1302 or a `Retry-After`. Labels: `account`.
pub const COOLDOWNS: &str = "kling_ratelimit_cooldowns_total";
/// Histogram, seconds: time spent waiting for the rate limiter. Labels: `kind`.
pub const RATELIMIT_WAIT: &str = "kling_ratelimit_wait_seconds";
/// Gauge: requests queued at the rate limiter. Labels: `account`.
pub const RATELIMIT_QUEUE_DEPTH: &str = "kling_ratelimit_queue_depth";
/// Histogram, seconds: time a create waited for task slots. Labels: `pool`.
pub const SLOTS_WAIT: &str = "kling_slots_wait_seconds";
/// Gauge: slots held by running tasks. Labels: `account`, `pool`.
pub const SLOTS_IN_USE: &str = "kling_slots_in_use";
/// Gauge: the slots a pool is believed to have now. Labels: `account`, `pool`.
pub const SLOTS_CAPACITY: &str = "kling_slots_capacity";
/// Gauge: creates waiting for slots. Labels: `account`, `pool`.
pub const SLOTS_WAITERS: &str = "kling_slots_waiters";
/// Histogram, seconds: a task's life from create to its terminal status. Labels: `pool`, `status`.
pub const TASK_LIFETIME: &str = "kling_task_lifetime_seconds";
/// Counter: tasks that reached a terminal status. Labels: `pool`, `status`.
pub const TASKS_FINISHED: &str = "kling_tasks_finished_total";

/// Label: request kind (`create`, `query`, `list`, `account`, `other`).
pub const LABEL_KIND: &str = "kind";
/// Label: pool name (`video`, `image:kling-v2`, …; empty for non-creates): [`pool_label`].
pub const LABEL_POOL: &str = "pool";
/// Label: HTTP status code.
pub const LABEL_STATUS: &str = "status";
/// Label: Kling business code.
pub const LABEL_CODE: &str = "code";
/// Label: retry reason.
pub const LABEL_REASON: &str = "reason";
/// Label: account id (never a key or token): [`account_label`].
pub const LABEL_ACCOUNT: &str = "account";

/// How many accounts a process labels by name. An account can come with each request (an
/// [`AccountId`](crate::AccountId) extension a multi-tenant caller sets), and a recorder keeps
/// every series for good: the first this many distinct accounts keep their name, later ones
/// share [`OTHER_ACCOUNT_LABEL`] (a gateway has a few accounts, each with its own key).
pub const ACCOUNT_LABELS: usize = 64;

/// The longest account id labelled by name; a longer one is labelled [`OTHER_ACCOUNT_LABEL`].
pub const ACCOUNT_LABEL_MAX_LEN: usize = 64;

/// The `account` label of every account past [`ACCOUNT_LABELS`].
pub const OTHER_ACCOUNT_LABEL: &str = "other";

/// The `account` label of an account: its id while fewer than [`ACCOUNT_LABELS`] accounts have
/// a label of their own in this process, else [`OTHER_ACCOUNT_LABEL`]. A label, once given,
/// stays the same for the process's life, so every layer and every series agrees on it.
pub fn account_label(account: &str) -> &'static str {
    static LABELS: BoundedLabels = BoundedLabels::new(ACCOUNT_LABELS);
    // An account named `other` is labelled as the overflow is, without taking a place.
    if account.len() > ACCOUNT_LABEL_MAX_LEN || account == OTHER_ACCOUNT_LABEL {
        return OTHER_ACCOUNT_LABEL;
    }
    LABELS
        .find_or_keep(|label| label == account, || account.to_owned())
        .map_or(OTHER_ACCOUNT_LABEL, |(label, _)| label)
}

/// How many model pools a process labels by name. A new-style create names its model in its
/// path, which is caller input: a gateway passing its users' model names through would
/// otherwise make a new series in the recorder for every name ever sent, and a recorder keeps
/// its series for good. The first this many distinct `{product}:{model}` pools the process
/// labels keep their name; later ones share `{product}:other` (Kling has a few dozen models).
pub const MODEL_POOL_LABELS: usize = 60;

/// The longest model name labelled by name; a longer one is labelled `{product}:other`.
pub const MODEL_LABEL_MAX_LEN: usize = 64;

/// The `pool` label of every model pool of `product` past [`MODEL_POOL_LABELS`].
pub fn other_model_label(product: Product) -> &'static str {
    match product {
        Product::Video => "video:other",
        Product::Image => "image:other",
        Product::TryOn => "try-on:other",
    }
}

/// The `pool` label of a pool: `""` for none, the product for a product's pool, and for a
/// model's pool [`model_pool_label`].
pub fn pool_label(pool: Option<&Pool>) -> &'static str {
    match pool {
        None => "",
        Some(pool) => match pool.model() {
            None => pool.product().as_str(),
            Some(model) => model_pool_label(pool.product(), model).0,
        },
    }
}

/// The `pool` label of a model's pool, and its place among the labelled models (`None` for
/// [`other_model_label`]): `video:kling-3.0` while fewer than [`MODEL_POOL_LABELS`] models
/// have a label of their own in this process. A label, once given, stays the same for the
/// process's life, so every layer and every series agrees on it.
pub fn model_pool_label(product: Product, model: &str) -> (&'static str, Option<usize>) {
    // A model named `other` would get a named place whose label is the overflow's, and two
    // places (with their gauges' shares) would write one series: it is the overflow.
    if !may_have_a_model_place(model) {
        return (other_model_label(product), None);
    }
    let product_name = product.as_str();
    let is_label = |label: &str| is_model_pool_label(label, product, model);
    match MODEL_POOL_LABEL_TABLE.find_or_keep(is_label, || format!("{product_name}:{model}")) {
        Some((label, at)) => (label, Some(at)),
        None => (other_model_label(product), None),
    }
}

/// The `pool` label of a model's pool and its place among the labelled models, if
/// [`model_pool_label`] gave it one before; `None` for a model without a place (never asked
/// for, asked for once the table was full, or one that is always the overflow). Unlike
/// [`model_pool_label`] it never gives a place, and takes only a read lock: a layer can tell a
/// model known to exist from one it has not seen without using up a place.
///
/// ```
/// use kling_core::Product;
/// use kling_core::metrics::{known_model_pool_label, model_pool_label};
///
/// assert_eq!(known_model_pool_label(Product::Video, "kling-3.0"), None);
/// let (label, at) = model_pool_label(Product::Video, "kling-3.0");
/// let known = known_model_pool_label(Product::Video, "kling-3.0");
/// assert_eq!(known, Some((label, at.unwrap())));
/// assert_eq!(known_model_pool_label(Product::Image, "kling-3.0"), None);
/// ```
pub fn known_model_pool_label(product: Product, model: &str) -> Option<(&'static str, usize)> {
    if !may_have_a_model_place(model) {
        return None;
    }
    MODEL_POOL_LABEL_TABLE.find(|label| is_model_pool_label(label, product, model))
}

/// The table [`model_pool_label`] gives places in, and [`known_model_pool_label`] reads.
static MODEL_POOL_LABEL_TABLE: BoundedLabels = BoundedLabels::new(MODEL_POOL_LABELS);

/// Whether a model may have a place of its own: not too long, and not named as the overflow.
fn may_have_a_model_place(model: &str) -> bool {
    model.len() <= MODEL_LABEL_MAX_LEN && model != "other"
}

/// Whether `label` is the model pool label `{product}:{model}`, compared without building it.
pub fn is_model_pool_label(label: &str, product: Product, model: &str) -> bool {
    let product = product.as_str();
    label.len() == product.len() + 1 + model.len()
        && label.starts_with(product)
        && label.as_bytes()[product.len()] == b':'
        && label.ends_with(model)
}

/// Runs `record`, a call into the metrics recorder; whether it completed. While the thread
/// unwinds (a release in a drop during a panic) a panic of the recorder's is caught, as one
/// escaping a drop then aborts the process; otherwise it goes on as any panic. The layers'
/// gauges, moved in drops, go through it.
#[inline]
pub fn call_recorder(record: impl FnOnce()) -> bool {
    if std::thread::panicking() {
        return caught(record);
    }
    record();
    true
}

#[cold]
fn caught(record: impl FnOnce()) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(record)).is_ok()
}

/// Runs `each` on every item, all of them even when one panics (a metrics recorder's, as one
/// answer ends several tasks and each gives its slots back or is counted), then resumes the
/// first panic.
pub fn each_completing<I: ExactSizeIterator>(items: I, mut each: impl FnMut(I::Item)) {
    if items.len() <= 1 {
        // (The usual query: nothing after it to complete, no landing pad.)
        items.for_each(each);
        return;
    }
    let mut first = None;
    for item in items {
        let run = std::panic::AssertUnwindSafe(|| each(item));
        if let Err(panic) = std::panic::catch_unwind(run) {
            first.get_or_insert(panic);
        }
    }
    if let Some(panic) = first {
        std::panic::resume_unwind(panic);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn accounts_keep_their_name_up_to_the_limit_then_share_other() {
        // The process-wide table is shared with other tests: only this test's names count.
        let first = account_label("account-label-test-0");
        assert_eq!(first, "account-label-test-0");
        assert_eq!(
            account_label(&"x".repeat(ACCOUNT_LABEL_MAX_LEN + 1)),
            OTHER_ACCOUNT_LABEL
        );
        assert_eq!(account_label(OTHER_ACCOUNT_LABEL), OTHER_ACCOUNT_LABEL);
        let mut named = 1;
        for n in 1..=ACCOUNT_LABELS {
            let name = format!("account-label-test-{n}");
            if account_label(&name) == name {
                named += 1;
            }
        }
        assert!(named <= ACCOUNT_LABELS, "{named}");
        assert_eq!(
            account_label("account-label-test-past"),
            OTHER_ACCOUNT_LABEL
        );
        // A label given before the table filled keeps its name, the same text.
        let again = account_label("account-label-test-0");
        assert_eq!(again.as_ptr(), first.as_ptr());
    }

    #[test]
    fn model_pools_keep_their_name_up_to_the_limit_then_share_other() {
        // Looked up before it has a place: none, and looking gives none (a place given here
        // would show in the count of places below, and in `label-test-past` having one).
        for product in [Product::Image, Product::TryOn] {
            for model in ["label-test-0", "label-test-past"] {
                assert_eq!(known_model_pool_label(product, model), None);
            }
        }
        let (label, first) = model_pool_label(Product::Image, "label-test-0");
        assert_eq!(label, "image:label-test-0");
        let first = first.expect("a place among the named");
        // Found now, as the same text; the same model of another product is another pool.
        let known = known_model_pool_label(Product::Image, "label-test-0");
        assert_eq!(known, Some(("image:label-test-0", first)));
        assert_eq!(known.unwrap().0.as_ptr(), label.as_ptr());
        assert_eq!(known_model_pool_label(Product::Video, "label-test-0"), None);
        // The same model of another product is another pool; the same one again is the same.
        let (label, second) = model_pool_label(Product::Video, "label-test-0");
        assert_eq!((label, second), ("video:label-test-0", Some(first + 1)));
        assert_eq!(
            model_pool_label(Product::Image, "label-test-0"),
            ("image:label-test-0", Some(first))
        );
        let long = "m".repeat(MODEL_LABEL_MAX_LEN + 1);
        assert_eq!(
            model_pool_label(Product::Video, &long),
            ("video:other", None)
        );
        // A model named `other` is the overflow, not a named place with the overflow's label.
        assert_eq!(
            model_pool_label(Product::Video, "other"),
            ("video:other", None)
        );
        for model in ["other", long.as_str()] {
            assert_eq!(known_model_pool_label(Product::Video, model), None);
        }
        // New names keep theirs until the table is full (other tests of this process may
        // have named some already).
        let mut named = first + 2;
        for n in 1.. {
            let name = format!("label-test-{n}");
            match model_pool_label(Product::TryOn, &name) {
                (label, Some(at)) => {
                    assert_eq!((label, at), (&*format!("try-on:{name}"), named));
                    named += 1;
                }
                (label, None) => {
                    assert_eq!(label, "try-on:other");
                    break;
                }
            }
        }
        assert_eq!(named, MODEL_POOL_LABELS);
        for product in [Product::Video, Product::Image, Product::TryOn] {
            assert_eq!(
                model_pool_label(product, "label-test-past"),
                (other_model_label(product), None),
                "the table is full"
            );
        }
        // Labels given before the table filled keep their name, and are found by the lookup;
        // a model asked for once the table was full has no place to find.
        assert_eq!(
            model_pool_label(Product::Image, "label-test-0"),
            ("image:label-test-0", Some(first))
        );
        assert_eq!(
            known_model_pool_label(Product::Image, "label-test-0"),
            Some(("image:label-test-0", first))
        );
        assert_eq!(
            known_model_pool_label(Product::Video, "label-test-past"),
            None
        );
        let pool = Pool::with_model(Product::TryOn, Arc::<str>::from("label-test-7"));
        assert_eq!(pool_label(Some(&pool)), "try-on:label-test-7");
        let past = Pool::with_model(Product::Image, Arc::<str>::from("label-test-past"));
        assert_eq!(pool_label(Some(&past)), "image:other");
        assert_eq!(pool_label(Some(&Pool::new(Product::Video))), "video");
        assert_eq!(pool_label(None), "");
    }
}
