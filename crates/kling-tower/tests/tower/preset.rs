use std::collections::HashMap;
use std::time::Duration;

use kling_core::Pool;
use kling_tower::preset::{StackConfig, Tier};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

#[test]
fn each_tier_preset_has_the_published_numbers() {
    let expected = [
        (Tier::Free, 1, Some(10.0), Some(66.0)),
        (Tier::Standard, 3, Some(30.0), None),
        (Tier::Pro, 5, Some(60.0), None),
        (Tier::Enterprise, 10, None, None),
    ];
    for (tier, slots, rate, credits) in expected {
        let c = StackConfig::preset(tier);
        c.validate().unwrap();
        assert_eq!(c.tier(), tier);
        assert_eq!(c.default_slots(), slots, "{tier}");
        assert_eq!(c.account_rate_per_minute(), rate, "{tier}");
        // The rate's own interval plus 15 ms of real time for jitter, no proportional headroom.
        let interval = rate.map(|r| Duration::from_secs_f64(60.0 / r) + Duration::from_millis(15));
        assert_eq!(c.pacing_interval(), interval, "{tier}");
        assert_eq!(c.burst_size(), 1);
        assert_eq!(c.headroom_share(), 0.0);
        assert_eq!(c.jitter_allowance_duration(), Duration::from_millis(15));
        assert_eq!(c.credit_budget(), credits, "{tier}");
        for pool in ["video", "image", "try-on", "video:kling-3.0"] {
            assert_eq!(
                c.slots_for(&Pool::parse(pool).unwrap()),
                slots,
                "{tier} {pool}"
            );
        }
    }
}

#[test]
fn resource_pack_preset_has_slots_per_pool_and_no_rate_cap() {
    let c = StackConfig::preset(Tier::ResourcePack);
    c.validate().unwrap();
    assert_eq!(c.account_rate_per_minute(), None);
    assert_eq!(c.slots_for(&Pool::parse("video").unwrap()), 20);
    assert_eq!(c.slots_for(&Pool::parse("image").unwrap()), 9);
    assert_eq!(c.slots_for(&Pool::parse("image:kling-v2").unwrap()), 9);

    let c = StackConfig::resource_pack([("video", 40), ("image:kling-v2", 3)]);
    assert_eq!(c.slots_for(&Pool::parse("video:kling-3.0").unwrap()), 40);
    assert_eq!(c.slots_for(&Pool::parse("image:kling-v2").unwrap()), 3);
    assert_eq!(c.account_rate_per_minute(), None);

    let c = StackConfig::enterprise(25, Some(300.0));
    assert_eq!(
        (c.default_slots(), c.account_rate_per_minute()),
        (25, Some(300.0))
    );
}

#[test]
fn every_number_can_be_overridden() {
    let c = StackConfig::preset(Tier::Pro)
        .rate_per_minute(120.0)
        .burst(3)
        .headroom(0.1)
        .jitter_allowance(Duration::ZERO)
        .slots(7)
        .pool_slots("image", 2)
        .task_lease(Duration::from_secs(600))
        .retry_max_attempts(3)
        .retry_deadline(Duration::from_secs(60))
        .retry_budget_ratio(0.5)
        .attempt_timeout(Duration::from_secs(10))
        .max_body_bytes(4096)
        .daily_credits(100.0)
        .credit_period(Duration::from_secs(3600));
    c.validate().unwrap();
    assert!((c.pacing_rate_per_minute().unwrap() - 108.0).abs() < 1e-6);
    assert_eq!(c.burst_size(), 3);
    assert_eq!(c.slots_for(&Pool::parse("image").unwrap()), 2);
    assert_eq!(c.slots_for(&Pool::parse("video").unwrap()), 7);
    assert_eq!(c.task_lease_duration(), Duration::from_secs(600));
    assert_eq!(c.max_attempts(), 3);
    assert_eq!(c.retry_deadline_duration(), Duration::from_secs(60));
    assert_eq!(c.retry_budget(), 0.5);
    assert_eq!(c.attempt_timeout_duration(), Duration::from_secs(10));
    assert_eq!(c.body_limit(), 4096);
    assert_eq!(c.credit_budget(), Some(100.0));
    assert_eq!(c.credit_period_duration(), Duration::from_secs(3600));
    assert_eq!(c.no_rate_limit().no_daily_credits().credit_budget(), None);
}

#[test]
fn speed_multiplies_rates_and_divides_durations() {
    let c = StackConfig::preset(Tier::Pro).speed(60.0);
    c.validate().unwrap();
    assert_eq!(c.account_rate_per_minute(), Some(3600.0));
    // The jitter allowance is real time: it does not shrink with the speed factor.
    assert_eq!(
        c.pacing_interval(),
        Some(Duration::from_secs_f64(1.0 / 60.0) + Duration::from_millis(15))
    );
    assert_eq!(c.task_lease_duration(), Duration::from_secs(30));
    assert_eq!(c.attempt_timeout_duration(), Duration::from_millis(500));
    assert_eq!(c.credit_period_duration(), Duration::from_secs(24 * 60));
    // Not cumulative, and slot counts do not scale.
    assert_eq!(c.clone().speed(60.0), c);
    assert_eq!(c.default_slots(), 5);
}

#[test]
fn validation_names_the_field() {
    let cases = [
        (StackConfig::preset(Tier::Pro).speed(0.0), "speed"),
        // With no rate cap to refuse it first, a tiny speed panicked when the stack was built.
        (
            StackConfig::preset(Tier::Enterprise)
                .no_rate_limit()
                .speed(1e-18),
            "speed",
        ),
        (StackConfig::preset(Tier::Pro).speed(1e20), "speed"),
        (StackConfig::preset(Tier::Pro).speed(f64::INFINITY), "speed"),
        (
            StackConfig::preset(Tier::Pro).rate_per_minute(-1.0),
            "rate_per_minute",
        ),
        (
            StackConfig::preset(Tier::Pro).rate_per_minute(f64::NAN),
            "rate_per_minute",
        ),
        (StackConfig::preset(Tier::Pro).burst(0), "burst"),
        (StackConfig::preset(Tier::Pro).headroom(1.0), "headroom"),
        (StackConfig::preset(Tier::Pro).slots(0), "slots"),
        (
            StackConfig::preset(Tier::Pro).pool_slots("audio", 3),
            "pool_slots.audio",
        ),
        (
            StackConfig::preset(Tier::Pro).pool_slots("video", 0),
            "pool_slots.video",
        ),
        (
            StackConfig::preset(Tier::Pro).task_lease(Duration::ZERO),
            "task_lease_secs",
        ),
        (
            StackConfig::preset(Tier::Pro).retry_max_attempts(0),
            "retry_max_attempts",
        ),
        (
            StackConfig::preset(Tier::Pro).max_body_bytes(10),
            "max_body_bytes",
        ),
        (
            StackConfig::preset(Tier::Pro).daily_credits(-5.0),
            "daily_credits",
        ),
        (
            StackConfig::preset(Tier::Pro).task_lease(Duration::from_secs(366 * 24 * 3600)),
            "task_lease_secs",
        ),
    ];
    for (config, field) in cases {
        let err = config.validate().unwrap_err();
        assert_eq!(err.field(), field);
        assert!(err.to_string().contains(field), "{err}");
    }
}

/// A rate whose interval does not fit in a `Duration` (60 / 1e-20 minutes) made
/// `pacing_interval` `None`, which the stack reads as "no cap": the tiny rate meant no limit.
/// A rate must allow a request every 78 hours (the rate limiter's longest interval), at its
/// speed, less its headroom and plus its jitter allowance. Rates between one a year and one
/// every 78 hours passed `validate` and then failed only when the stack was built, with an
/// error naming the rate limiter's `rate_per_minute.quota.rate`.
#[test]
fn a_rate_too_small_to_pace_is_refused_rather_than_read_as_no_cap() {
    use kling_tower::preset::MAX_PACING_INTERVAL;

    let too_small = [
        StackConfig::preset(Tier::Pro).rate_per_minute(1e-20),
        StackConfig::preset(Tier::Pro).rate_per_minute(1e-6),
        // A request every 1,000 minutes, at a thousandth of real time: every 1.9 years.
        StackConfig::preset(Tier::Pro)
            .speed(0.001)
            .rate_per_minute(0.001),
        StackConfig::preset(Tier::Pro)
            .rate_per_minute(3e-6)
            .headroom(0.5),
        // One request a year, a week, or every 79 hours: within a year, beyond 78 hours.
        StackConfig::preset(Tier::Pro).rate_per_minute(1.0 / (365.0 * 24.0 * 60.0)),
        StackConfig::preset(Tier::Pro).rate_per_minute(1.0 / (7.0 * 24.0 * 60.0)),
        StackConfig::preset(Tier::Pro).rate_per_minute(1.0 / (79.0 * 60.0)),
        // One every 100 minutes at a thousandth of real time: every 69 days.
        StackConfig::preset(Tier::Free)
            .speed(0.001)
            .rate_per_minute(0.01)
            .no_daily_credits(),
    ];
    for config in too_small {
        let err = config.validate().unwrap_err();
        assert_eq!(err.field(), "rate_per_minute", "{config:?}");
        assert!(err.reason().contains("every 78 hours"), "{err}");
        let built =
            kling_tower::KlingLayer::new(config, kling_tower::Credentials::api_key("k").unwrap());
        assert_eq!(built.unwrap_err().field(), "rate_per_minute");
    }
    let err = StackConfig::from_lookup(vars(&[("KLING_RATE_PER_MINUTE", "1e-20")])).unwrap_err();
    assert_eq!(err.field(), "KLING_RATE_PER_MINUTE");
    let err = StackConfig::from_lookup(vars(&[
        ("KLING_TIER", "pro"),
        ("KLING_RATE_PER_MINUTE", "0.0001"),
    ]))
    .unwrap_err();
    assert_eq!(err.field(), "KLING_RATE_PER_MINUTE", "{err}");
    let err = StackConfig::from_toml_str("tier = \"pro\"\nrate_per_minute = 0.0001\n").unwrap_err();
    assert_eq!(err.field(), "rate_per_minute", "{err}");

    // One request every 78 hours (the jitter allowance included) is the slowest rate there
    // is, and builds a stack, with the adaptive rate on and off.
    let slowest = 60.0 / (MAX_PACING_INTERVAL - Duration::from_millis(16)).as_secs_f64();
    for adaptive in [true, false] {
        let config = StackConfig::preset(Tier::Pro)
            .rate_per_minute(slowest)
            .adaptive_rate(adaptive);
        config.validate().unwrap();
        assert!(config.pacing_interval().unwrap() <= MAX_PACING_INTERVAL);
        let built =
            kling_tower::KlingLayer::new(config, kling_tower::Credentials::api_key("k").unwrap());
        assert!(built.is_ok(), "{:?}", built.err());
    }
}

/// Two gateway entries on one Kling account (the same credentials) gave the account two sets
/// of limits: 10 slots and 120 requests a minute against Pro's 5 and 60, the excess answered
/// with 1303 and 1302. The build refuses them, naming the second entry and the first.
#[test]
fn two_gateway_accounts_with_the_same_credentials_are_refused() {
    use kling_tower::gateway::GatewayLayer;
    use kling_tower::{AuthLayer, Credentials, KlingLayer};

    let pro =
        |credentials: Credentials| KlingLayer::builder(StackConfig::preset(Tier::Pro), credentials);
    let api_key = |key: &str| Credentials::api_key(key).unwrap();
    let access_key = |ak: &str, sk: &str| Credentials::access_key(ak, sk).unwrap();

    let err = GatewayLayer::builder()
        .account("team-a", pro(api_key("k")))
        .account("team-b", pro(api_key("k")))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "accounts.team-b");
    assert_eq!(
        err.to_string(),
        "invalid kling-tower configuration: `accounts.team-b` uses the same credentials as accounts.team-a"
    );

    // The same access key is the same account, whatever the secret.
    let err = GatewayLayer::builder()
        .account("team-a", pro(access_key("ak", "sk")))
        .account("team-b", pro(api_key("other")))
        .account("team-c", pro(access_key("ak", "sk-2")))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "accounts.team-c");
    assert!(err.reason().contains("accounts.team-a"), "{err}");

    // A stack with its own `AuthLayer` is compared by the credentials it signs with, which
    // must be its builder's: another account's are refused, naming the entry's `auth`.
    let err = GatewayLayer::builder()
        .account("team-a", pro(api_key("k")))
        .account(
            "team-b",
            pro(api_key("k")).auth(AuthLayer::new(api_key("k"))),
        )
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "accounts.team-b");
    let err = GatewayLayer::builder()
        .account("team-a", pro(api_key("k")))
        .account(
            "team-b",
            pro(api_key("unused")).auth(AuthLayer::new(api_key("k"))),
        )
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "accounts.team-b.auth");

    // One name twice is still "configured twice"; different credentials build.
    let err = GatewayLayer::builder()
        .account("team-a", pro(api_key("k")))
        .account("team-a", pro(api_key("k")))
        .build()
        .unwrap_err();
    assert_eq!(
        (err.field(), err.reason()),
        ("accounts.team-a", "is configured twice")
    );
    let gateway = GatewayLayer::builder()
        .account("team-a", pro(api_key("k")))
        .account("team-b", pro(api_key("k2")))
        .account("team-c", pro(access_key("ak", "sk")))
        .build()
        .unwrap();
    assert_eq!(gateway.accounts().count(), 3);
}

#[test]
fn env_variables_pick_the_tier_and_override_numbers() {
    let c = StackConfig::from_lookup(vars(&[
        ("KLING_TIER", "standard"),
        ("KLING_SPEED", "10"),
        ("KLING_RATE_PER_MINUTE", "45"),
        ("KLING_POOL_SLOTS", "video=4, image:kling-v2=2"),
        ("KLING_DAILY_CREDITS", "500"),
        ("KLING_ATTEMPT_TIMEOUT_SECS", "20"),
        ("KLING_JITTER_ALLOWANCE_MS", "2.5"),
        ("KLING_SLOT_QUEUE", "7"),
    ]))
    .unwrap();
    assert_eq!(c.slot_queue_limit(), Some(7));
    assert_eq!(c.slot_pool_scope(), kling_core::PoolScope::Model);
    assert_eq!(c.jitter_allowance_duration(), Duration::from_micros(2500));
    assert_eq!(c.tier(), Tier::Standard);
    assert_eq!(c.account_rate_per_minute(), Some(450.0));
    assert_eq!(c.default_slots(), 3);
    assert_eq!(c.slots_for(&Pool::parse("video").unwrap()), 4);
    assert_eq!(c.slots_for(&Pool::parse("image:kling-v2").unwrap()), 2);
    assert_eq!(c.credit_budget(), Some(500.0));
    assert_eq!(c.attempt_timeout_duration(), Duration::from_secs(2));

    // Nothing set: the Free tier.
    assert_eq!(
        StackConfig::from_lookup(vars(&[])).unwrap(),
        StackConfig::preset(Tier::Free)
    );
    // `none` lifts a cap.
    let c = StackConfig::from_lookup(vars(&[
        ("KLING_TIER", "free"),
        ("KLING_DAILY_CREDITS", "none"),
        ("KLING_SLOT_QUEUE", "none"),
    ]))
    .unwrap();
    assert_eq!(c.credit_budget(), None);
    assert_eq!(c.slot_queue_limit(), None);
    let c = StackConfig::from_lookup(vars(&[
        ("KLING_POOL_SCOPE", "product"),
        ("KLING_POOL_SLOTS", "video=4"),
    ]))
    .unwrap();
    assert_eq!(c.slot_pool_scope(), kling_core::PoolScope::Product);
}

#[test]
fn bad_env_values_are_rejected_naming_the_variable() {
    let cases: [(&[(&str, &str)], &str); 11] = [
        (&[("KLING_POOL_SCOPE", "account")], "KLING_POOL_SCOPE"),
        (&[("KLING_SLOT_QUEUE", "-1")], "KLING_SLOT_QUEUE"),
        (&[("KLING_SLOT_QUEUE", "a few")], "KLING_SLOT_QUEUE"),
        (&[("KLING_TIER", "platinum")], "KLING_TIER"),
        (&[("KLING_BURST", "many")], "KLING_BURST"),
        (&[("KLING_BURST", "0")], "KLING_BURST"),
        (&[("KLING_HEADROOM", "1.5")], "KLING_HEADROOM"),
        (
            &[("KLING_JITTER_ALLOWANCE_MS", "-1")],
            "KLING_JITTER_ALLOWANCE_MS",
        ),
        (
            &[("KLING_JITTER_ALLOWANCE_MS", "60000")],
            "KLING_JITTER_ALLOWANCE_MS",
        ),
        (&[("KLING_POOL_SLOTS", "video")], "KLING_POOL_SLOTS"),
        (&[("KLING_TASK_LEASE_SECS", "-3")], "KLING_TASK_LEASE_SECS"),
    ];
    for (pairs, var) in cases {
        let err = StackConfig::from_lookup(vars(pairs)).unwrap_err();
        assert!(err.field().starts_with(var), "{pairs:?}: {err}");
    }
    let err = StackConfig::from_lookup(vars(&[
        ("KLING_POOL_SCOPE", "product"),
        ("KLING_POOL_SLOTS", "video:kling-3.0=3"),
    ]))
    .unwrap_err();
    assert!(err.field().contains("video:kling-3.0"), "{err}");
    let err = StackConfig::from_lookup(vars(&[("KLING_POOL_SLOTS", "audio=3")])).unwrap_err();
    assert!(err.field().contains("KLING_POOL_SLOTS"), "{err}");
    assert!(err.field().contains("audio"), "{err}");
    // A count that is no number names its pool too, among several (it named the variable
    // alone, "`` is not a valid number here", leaving the entry to guess).
    for (value, pool) in [
        ("video=2,image=", "pool_slots.image"),
        ("video=-1,image=2", "pool_slots.video"),
        ("video=2, image = many", "pool_slots.image"),
        ("video=2,video:kling-3.0=1.5", "pool_slots.video:kling-3.0"),
    ] {
        let err = StackConfig::from_lookup(vars(&[("KLING_POOL_SLOTS", value)])).unwrap_err();
        assert_eq!(
            err.field(),
            format!("KLING_POOL_SLOTS ({pool})"),
            "{value}: {err}"
        );
    }
}

const TOML: &str = r#"
tier = "pro"
speed = 2.0
rate_per_minute = 60
burst = 2
headroom = 0.1
jitter_allowance_ms = 0
task_lease_secs = 900
retry_max_attempts = 4
daily_credits = 250
slot_queue = 0

[pool_slots]
video = 4
"image:kling-v2" = 2
"#;

#[test]
fn toml_loads_every_key() {
    let c = StackConfig::from_toml_str(TOML).unwrap();
    assert_eq!(c.tier(), Tier::Pro);
    assert_eq!(c.account_rate_per_minute(), Some(120.0));
    assert!((c.pacing_rate_per_minute().unwrap() - 108.0).abs() < 1e-6);
    assert_eq!(c.burst_size(), 2);
    assert_eq!(c.task_lease_duration(), Duration::from_secs(450));
    assert_eq!(c.max_attempts(), 4);
    assert_eq!(c.credit_budget(), Some(250.0));
    assert_eq!(c.slot_queue_limit(), Some(0));
    assert_eq!(c.slots_for(&Pool::parse("video").unwrap()), 4);
    assert_eq!(c.slots_for(&Pool::parse("image:kling-v2").unwrap()), 2);
    assert_eq!(c.slots_for(&Pool::parse("try-on").unwrap()), 5);

    let c =
        StackConfig::from_toml_str("tier = \"resource-pack\"\nrate_per_minute = \"none\"").unwrap();
    assert_eq!(c.account_rate_per_minute(), None);
    let c = StackConfig::from_toml_str("slot_queue = \"none\"").unwrap();
    assert_eq!(c.slot_queue_limit(), None);
    let c = StackConfig::from_toml_str("pool_scope = \"product\"").unwrap();
    assert_eq!(c.slot_pool_scope(), kling_core::PoolScope::Product);
    assert_eq!(
        StackConfig::from_toml_str("").unwrap(),
        StackConfig::preset(Tier::Free)
    );
}

#[test]
fn bad_toml_is_rejected_naming_the_key() {
    let cases = [
        ("burst = 0", "burst"),
        ("headroom = -0.1", "headroom"),
        ("jitter_allowance_ms = -1", "jitter_allowance_ms"),
        ("jitter_allowance_ms = 20000", "jitter_allowance_ms"),
        ("tier = \"gold\"", "tier"),
        ("rate_per_minute = \"fast\"", "rate_per_minute"),
        ("task_lease_secs = -1", "task_lease_secs"),
        ("[pool_slots]\naudio = 2", "pool_slots.audio"),
        ("slot_queue = -1", "slot_queue"),
        ("slot_queue = 2.5", "slot_queue"),
        ("slot_queue = \"all\"", "slot_queue"),
        ("pool_scope = \"models\"", "pool_scope"),
        (
            "pool_scope = \"product\"\n[pool_slots]\n\"video:kling-3.0\" = 2",
            "pool_slots.video:kling-3.0",
        ),
    ];
    for (text, field) in cases {
        let err = StackConfig::from_toml_str(text).unwrap_err();
        assert_eq!(err.field(), field, "{text}: {err}");
    }
    // Unknown keys: the parser's message names the key.
    let err = StackConfig::from_toml_str("rate_per_minut = 60").unwrap_err();
    assert_eq!(err.field(), "toml");
    assert!(err.reason().contains("rate_per_minut"), "{err}");
    let err = StackConfig::from_toml_str("burst = = 2").unwrap_err();
    assert_eq!(err.field(), "toml");
}

/// A value of the wrong type or out of its type's range is refused naming its key: the
/// parser's message ("invalid type: string \"two\", expected u32") names none, and the error
/// said `toml`.
#[test]
fn a_toml_value_of_the_wrong_type_is_refused_naming_the_key() {
    let cases = [
        ("burst = \"two\"", "burst"),
        ("burst = -1", "burst"),
        ("burst = 5000000000", "burst"),
        ("slots = 0.5", "slots"),
        ("speed = \"fast\"", "speed"),
        ("tier = 3", "tier"),
        ("max_body_bytes = -1", "max_body_bytes"),
        (
            "tier = \"pro\"\nretry_max_attempts = 4.5",
            "retry_max_attempts",
        ),
        ("[pool_slots]\nvideo = 4\nimage = -2", "pool_slots.image"),
        ("pool_slots = 3", "pool_slots"),
    ];
    for (text, field) in cases {
        let err = StackConfig::from_toml_str(text).unwrap_err();
        assert_eq!(err.field(), field, "{text}: {err}");
        assert!(err.reason().contains("expected"), "{text}: {err}");
    }
}

/// A gateway entry's name is its stack's account: a stack given another one of its own is
/// refused, naming the field, rather than silently renamed; the same name is accepted.
#[test]
fn a_gateway_entry_whose_stack_names_another_account_is_refused() {
    use kling_core::AccountId;
    use kling_tower::gateway::GatewayLayer;
    use kling_tower::{Credentials, KlingLayer};

    let pro = || {
        KlingLayer::builder(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("k").unwrap(),
        )
    };
    let err = GatewayLayer::builder()
        .account("team-a", pro().account(AccountId::new("acct-7")))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "accounts.team-a.account");
    assert!(err.reason().contains("acct-7"), "{err}");
    GatewayLayer::builder()
        .account("team-a", pro().account(AccountId::new("team-a")))
        .build()
        .unwrap();
}

/// A duration divided by the speed factor can round to nothing: `speed = 4` with
/// `attempt_timeout_secs = 1e-9` made an attempt timeout of 0, which validation let through
/// (it checked the duration as written). Each scaled duration must be above 0, and the error
/// names the key and what the value comes to at that speed.
#[test]
fn a_duration_that_scales_to_zero_is_refused_naming_the_key_and_the_scaled_value() {
    let pro = || StackConfig::preset(Tier::Pro);
    let tiny = Duration::from_nanos(1);
    let cases = [
        (
            pro().speed(4.0).attempt_timeout(tiny),
            "attempt_timeout_secs",
        ),
        (pro().speed(4.0).task_lease(tiny), "task_lease_secs"),
        (pro().speed(4.0).retry_deadline(tiny), "retry_deadline_secs"),
        (pro().speed(4.0).credit_period(tiny), "credit_period_secs"),
    ];
    for (config, field) in cases {
        let err = config.validate().unwrap_err();
        assert_eq!(err.field(), field, "{err}");
        assert!(err.reason().contains("comes to 0ns at speed 4"), "{err}");
        // The stack refuses it too, rather than timing every attempt out at once.
        let built =
            kling_tower::KlingLayer::new(config, kling_tower::Credentials::api_key("k").unwrap());
        assert_eq!(built.unwrap_err().field(), field);
    }
    // The loaders. At speed 2, 1e-9 s comes to 1 ns, whose third (the connect timeout) is 0.
    let err = StackConfig::from_toml_str("speed = 2\nattempt_timeout_secs = 1e-9").unwrap_err();
    assert_eq!(err.field(), "attempt_timeout_secs", "{err}");
    assert!(err.reason().contains("0ns"), "{err}");
    let err = StackConfig::from_lookup(vars(&[
        ("KLING_SPEED", "4"),
        ("KLING_TASK_LEASE_SECS", "1e-9"),
    ]))
    .unwrap_err();
    assert_eq!(err.field(), "KLING_TASK_LEASE_SECS", "{err}");
    assert!(err.reason().contains("0ns"), "{err}");

    // The connect timeout, a third of the attempt timeout, must not be 0 either.
    let err = pro()
        .attempt_timeout(Duration::from_nanos(2))
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "attempt_timeout_secs", "{err}");
    assert!(err.reason().contains("connect timeout, to 0ns"), "{err}");

    // A nanosecond at speed 1, three for the attempt timeout, is not 0.
    pro().task_lease(tiny).validate().unwrap();
    let shortest = pro().attempt_timeout(Duration::from_nanos(3));
    shortest.validate().unwrap();
    assert_eq!(shortest.connect_timeout_duration(), tiny);
}

/// With no jitter allowance, a rate whose interval is under a nanosecond at its speed paced at
/// an interval of 0: validation let it through and the stack's rate limiter refused it. It is
/// refused as too large, with the largest rate; with the jitter allowance, the allowance
/// alone paces it.
#[test]
fn a_rate_too_large_to_pace_without_a_jitter_allowance_is_refused_as_too_large() {
    let huge = StackConfig::preset(Tier::Pro)
        .jitter_allowance(Duration::ZERO)
        .speed(2.0)
        .rate_per_minute(1e300);
    let err = huge.validate().unwrap_err();
    assert_eq!(err.field(), "rate_per_minute", "{err}");
    assert!(err.reason().contains("too large"), "{err}");
    assert!(err.reason().contains("every 0ns"), "{err}");
    assert!(err.reason().contains("at most 30000000000.0"), "{err}");
    let built = kling_tower::KlingLayer::new(huge, kling_tower::Credentials::api_key("k").unwrap());
    assert_eq!(built.unwrap_err().field(), "rate_per_minute");

    let fastest = StackConfig::preset(Tier::Pro)
        .jitter_allowance(Duration::ZERO)
        .speed(2.0)
        .rate_per_minute(3e10);
    fastest.validate().unwrap();
    assert_eq!(fastest.pacing_interval(), Some(Duration::from_nanos(1)));
    StackConfig::preset(Tier::Pro)
        .speed(2.0)
        .rate_per_minute(1e300)
        .validate()
        .unwrap();
}

/// A burst beyond the rate limiter's largest (65535) passed validation and failed building the
/// stack; it is refused as too large.
#[test]
fn a_burst_beyond_the_rate_limiters_largest_is_refused_as_too_large() {
    let err = StackConfig::preset(Tier::Pro)
        .burst(70_000)
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "burst");
    assert!(
        err.reason().contains("too large: must be at most 65535"),
        "{err}"
    );
    let largest = StackConfig::preset(Tier::Pro).burst(65_535);
    largest.validate().unwrap();
    kling_tower::KlingLayer::new(largest, kling_tower::Credentials::api_key("k").unwrap()).unwrap();
}

/// A number too large for its key got the wrong reason: `credit_period_secs = 1e300` was "must
/// be a number of seconds, 0 or more", `KLING_BURST=5000000000` "is not a valid number here".
/// They say the value is too large, and the largest value.
#[test]
fn a_number_too_large_is_refused_as_too_large_naming_the_largest() {
    let toml_cases = [
        (
            "credit_period_secs = 1e300",
            "credit_period_secs",
            "at most 31536000",
        ),
        (
            "attempt_timeout_secs = inf",
            "attempt_timeout_secs",
            "at most 31536000",
        ),
        (
            "task_lease_secs = 40000000",
            "task_lease_secs",
            "at most a year",
        ),
        (
            "jitter_allowance_ms = 1e300",
            "jitter_allowance_ms",
            "at most 10000",
        ),
        ("burst = 5000000000", "burst", "at most 4294967295"),
        (
            "[pool_slots]\nvideo = 5000000000",
            "pool_slots.video",
            "at most 4294967295",
        ),
        ("slot_queue = 5e9", "slot_queue", "at most 4294967295"),
    ];
    for (text, field, max) in toml_cases {
        let err = StackConfig::from_toml_str(text).unwrap_err();
        assert_eq!(err.field(), field, "{text}: {err}");
        assert!(err.reason().contains("too large"), "{text}: {err}");
        assert!(err.reason().contains(max), "{text}: {err}");
    }
    let env_cases = [
        ("KLING_CREDIT_PERIOD_SECS", "1e300", "at most 31536000"),
        (
            "KLING_RETRY_DEADLINE_SECS",
            "1e400",
            "at most 31536000 seconds (a year)",
        ),
        ("KLING_TASK_LEASE_SECS", "40000000", "at most a year"),
        ("KLING_JITTER_ALLOWANCE_MS", "1e300", "at most 10000"),
        ("KLING_JITTER_ALLOWANCE_MS", "20000", "at most 10000"),
        ("KLING_BURST", "5000000000", "at most 4294967295"),
        ("KLING_SLOTS", "99999999999", "at most 4294967295"),
        (
            "KLING_RETRY_MAX_ATTEMPTS",
            "5000000000",
            "at most 4294967295",
        ),
        ("KLING_POOL_SLOTS", "video=5000000000", "at most 4294967295"),
        ("KLING_MAX_BODY_BYTES", "1e30", "at most"),
        ("KLING_SLOT_QUEUE", "1e30", "at most"),
        ("KLING_DAILY_CREDITS", "1e400", "at most"),
        ("KLING_RETRY_BUDGET_RATIO", "1e400", "at most"),
    ];
    for (var, value, max) in env_cases {
        let err = StackConfig::from_lookup(vars(&[(var, value)])).unwrap_err();
        // A pool's count is named with its pool, as validation names it.
        let field = match var {
            "KLING_POOL_SLOTS" => "KLING_POOL_SLOTS (pool_slots.video)",
            var => var,
        };
        assert_eq!(err.field(), field, "{var}={value}: {err}");
        assert!(err.reason().contains("too large"), "{var}={value}: {err}");
        assert!(err.reason().contains(max), "{var}={value}: {err}");
    }
    // Other numbers a key does not take keep their own reasons.
    let other = [
        ("KLING_BURST", "-1", "below 0"),
        ("KLING_BURST", "2.5", "not a whole number"),
        ("KLING_BURST", "many", "not a valid number"),
        ("KLING_CREDIT_PERIOD_SECS", "-1", "0 or more"),
        ("KLING_CREDIT_PERIOD_SECS", "-1e400", "0 or more"),
        ("KLING_SLOTS", "-1e400", "below 0"),
    ];
    for (var, value, reason) in other {
        let err = StackConfig::from_lookup(vars(&[(var, value)])).unwrap_err();
        assert!(err.reason().contains(reason), "{var}={value}: {err}");
        assert!(!err.reason().contains("too large"), "{var}={value}: {err}");
    }
    let err = StackConfig::from_toml_str("credit_period_secs = -1").unwrap_err();
    assert!(err.reason().contains("0 or more"), "{err}");
}

/// `KLING_SLOT_QUEUE` takes what TOML's `slot_queue` takes, at most 4294967295 (`u32::MAX`),
/// and refuses one more naming the variable: it took anything up to `usize::MAX`.
#[test]
fn the_slot_queue_variable_and_key_share_one_bound() {
    let from_env = |value: &str| StackConfig::from_lookup(vars(&[("KLING_SLOT_QUEUE", value)]));
    let from_toml = |value: &str| StackConfig::from_toml_str(&format!("slot_queue = {value}"));
    for largest in [from_env("4294967295"), from_toml("4294967295")] {
        assert_eq!(largest.unwrap().slot_queue_limit(), Some(4294967295));
    }
    for value in ["4294967296", "18446744073709551615"] {
        let err = from_env(value).unwrap_err();
        assert_eq!(err.field(), "KLING_SLOT_QUEUE", "{err}");
        assert!(err.reason().contains("too large"), "{err}");
        assert!(err.reason().contains("at most 4294967295"), "{err}");
        let err = from_toml(value).unwrap_err();
        assert_eq!(err.field(), "slot_queue", "{err}");
        assert!(err.reason().contains("at most 4294967295"), "{err}");
    }
}

/// Every variable `StackConfig::from_lookup` reads, written out here apart from the crate's own
/// list, so a test sees a name the crate adds or drops.
const READ_VARS: [&str; 20] = [
    "KLING_TIER",
    "KLING_BASE_URL",
    "KLING_SPEED",
    "KLING_RATE_PER_MINUTE",
    "KLING_ADAPTIVE_RATE",
    "KLING_BURST",
    "KLING_HEADROOM",
    "KLING_JITTER_ALLOWANCE_MS",
    "KLING_SLOTS",
    "KLING_POOL_SLOTS",
    "KLING_SLOT_QUEUE",
    "KLING_POOL_SCOPE",
    "KLING_TASK_LEASE_SECS",
    "KLING_RETRY_MAX_ATTEMPTS",
    "KLING_RETRY_DEADLINE_SECS",
    "KLING_RETRY_BUDGET_RATIO",
    "KLING_ATTEMPT_TIMEOUT_SECS",
    "KLING_MAX_BODY_BYTES",
    "KLING_DAILY_CREDITS",
    "KLING_CREDIT_PERIOD_SECS",
];

/// A blank preset variable (`KLING_TIER=` in a `.env` file, a compose file's `${KLING_TIER}`
/// where it is unset) was an error naming it, where a blank `KLING_API_KEY` counts as unset.
/// Blank counts as unset for every variable.
#[test]
fn blank_preset_variables_count_as_unset() {
    for blank in ["", "  "] {
        let pairs: Vec<(&str, &str)> = READ_VARS.iter().map(|var| (*var, blank)).collect();
        assert_eq!(
            StackConfig::from_lookup(vars(&pairs)).unwrap(),
            StackConfig::preset(Tier::Free),
            "{blank:?}"
        );
        for var in READ_VARS {
            let config = StackConfig::from_lookup(vars(&[(var, blank)]))
                .unwrap_or_else(|e| panic!("{var}={blank:?}: {e}"));
            assert_eq!(config, StackConfig::preset(Tier::Free), "{var}");
        }
    }
    let c = StackConfig::from_lookup(vars(&[("KLING_TIER", ""), ("KLING_SLOTS", "3")])).unwrap();
    assert_eq!(c, StackConfig::preset(Tier::Free).slots(3));
    let c = StackConfig::preset(Tier::Pro)
        .with_lookup(vars(&[("KLING_SLOTS", " ")]))
        .unwrap();
    assert_eq!(c, StackConfig::preset(Tier::Pro));
}

/// Every speed `validate` accepts builds a stack. Above 1000, the retry budget's window (10 s
/// divided by the speed) was under its 10 ms least, and above 20000 the monitor's rate window
/// (a minute divided by the speed) under its 3 ms: `KlingLayer::new` failed with
/// `retry.budget.window` or `monitor.rate_quota` for a configuration that had passed. Below 1,
/// a duration the speed makes longer than a year passed and the spend guard refused it; it is
/// refused by `validate`, naming the key and what it comes to.
#[test]
fn every_speed_validation_accepts_builds_a_stack() {
    use kling_tower::preset::{MAX_SPEED, MIN_SPEED};

    let slowest_free = StackConfig::preset(Tier::Free).speed(MIN_SPEED);
    let err = slowest_free.validate().unwrap_err();
    assert_eq!(err.field(), "credit_period_secs", "{err}");
    assert!(
        err.reason().contains("86400000.0 seconds at speed 0.001"),
        "{err}"
    );
    for tier in [Tier::Free, Tier::Pro, Tier::Enterprise] {
        for speed in [MIN_SPEED, 0.5, 1.0, 1000.0, 2000.0, 30_000.0, MAX_SPEED] {
            let config = StackConfig::preset(tier).speed(speed);
            let config = if tier == Tier::Free && speed < 1.0 {
                config.credit_period(Duration::from_secs(3600))
            } else {
                config
            };
            // Past speed 40,000 the 15 ms (real-time) jitter allowance fills the scaled
            // 600 s deadline: a rate-capped tier needs a smaller one.
            let config = if speed >= 40_000.0 && config.account_rate_per_minute().is_some() {
                let err = config.validate().unwrap_err();
                assert_eq!(
                    err.field(),
                    "jitter_allowance_ms",
                    "{tier} at {speed}: {err}"
                );
                config.jitter_allowance(Duration::ZERO)
            } else {
                config
            };
            config.validate().unwrap();
            let built = kling_tower::KlingLayer::new(
                config,
                kling_tower::Credentials::api_key("k").unwrap(),
            );
            assert!(built.is_ok(), "{tier} at {speed}: {:?}", built.err());
        }
    }
}

/// The adaptive rate is on wherever there is a rate cap (its ceiling) unless turned off, and
/// off without one; `adaptive_rate` in TOML and `KLING_ADAPTIVE_RATE` set it as the builder
/// method does.
#[test]
fn the_adaptive_rate_is_on_under_a_rate_cap_and_loads_from_toml_and_env() {
    for tier in [Tier::Free, Tier::Standard, Tier::Pro] {
        assert!(StackConfig::preset(tier).adapts_rate(), "{tier}");
        assert!(!StackConfig::preset(tier).adaptive_rate(false).adapts_rate());
    }
    for tier in [Tier::Enterprise, Tier::ResourcePack] {
        assert!(!StackConfig::preset(tier).adapts_rate(), "{tier}");
    }
    assert!(StackConfig::enterprise(10, Some(600.0)).adapts_rate());
    // A cap lifted from a preset lifts its adaptive rate with it, and stays valid.
    let uncapped = StackConfig::preset(Tier::Pro).no_rate_limit();
    assert!(!uncapped.adapts_rate());
    uncapped.validate().unwrap();

    let off = StackConfig::preset(Tier::Pro).adaptive_rate(false);
    assert_eq!(
        StackConfig::from_toml_str("tier = \"pro\"\nadaptive_rate = false").unwrap(),
        off
    );
    assert_eq!(
        StackConfig::from_toml_str("tier = \"pro\"\nadaptive_rate = true").unwrap(),
        StackConfig::preset(Tier::Pro).adaptive_rate(true)
    );
    let on = StackConfig::enterprise(10, Some(600.0)).adaptive_rate(true);
    let toml = "tier = \"enterprise\"\nrate_per_minute = 600\nadaptive_rate = true";
    assert_eq!(StackConfig::from_toml_str(toml).unwrap(), on);
    for value in ["false", "FALSE", "off", "0", " Off "] {
        let c = StackConfig::from_lookup(vars(&[
            ("KLING_TIER", "pro"),
            ("KLING_ADAPTIVE_RATE", value),
        ]))
        .unwrap();
        assert_eq!(c, off, "{value}");
    }
    for value in ["true", "True", "on", "1"] {
        let c = StackConfig::from_lookup(vars(&[
            ("KLING_TIER", "enterprise"),
            ("KLING_RATE_PER_MINUTE", "600"),
            ("KLING_ADAPTIVE_RATE", value),
        ]))
        .unwrap();
        assert_eq!(c, on, "{value}");
    }
}

/// A value that is no switch, or the adaptive rate turned on with no rate cap to be its
/// ceiling, is refused naming the key or the variable.
#[test]
fn a_bad_adaptive_rate_is_refused_naming_the_key() {
    for (text, field) in [
        ("tier = \"pro\"\nadaptive_rate = \"yes\"", "adaptive_rate"),
        ("tier = \"pro\"\nadaptive_rate = 1", "adaptive_rate"),
        (
            "tier = \"enterprise\"\nadaptive_rate = true",
            "adaptive_rate",
        ),
        (
            "tier = \"pro\"\nrate_per_minute = \"none\"\nadaptive_rate = true",
            "adaptive_rate",
        ),
    ] {
        let err = StackConfig::from_toml_str(text).unwrap_err();
        assert_eq!(err.field(), field, "{text}: {err}");
    }
    for pairs in [
        &[("KLING_TIER", "pro"), ("KLING_ADAPTIVE_RATE", "maybe")][..],
        &[("KLING_TIER", "pro"), ("KLING_ADAPTIVE_RATE", "2")][..],
        &[("KLING_TIER", "enterprise"), ("KLING_ADAPTIVE_RATE", "on")][..],
    ] {
        let err = StackConfig::from_lookup(vars(pairs)).unwrap_err();
        assert_eq!(err.field(), "KLING_ADAPTIVE_RATE", "{pairs:?}: {err}");
    }
    let err = StackConfig::preset(Tier::Enterprise)
        .adaptive_rate(true)
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "adaptive_rate");
    assert!(err.reason().contains("rate cap"), "{err}");
    // Turned off without a cap is fine: there is nothing to adapt.
    StackConfig::preset(Tier::Enterprise)
        .adaptive_rate(false)
        .validate()
        .unwrap();
}

/// A number no variable set, made impossible by one that is, keeps its field's name: the Free
/// tier's day-long credit period at a thousandth of real time is 1000 days. It named
/// `KLING_CREDIT_PERIOD_SECS`, a variable nobody had set; a TOML's own field likewise.
#[test]
fn a_validation_error_names_a_variable_only_where_it_is_set() {
    let err = StackConfig::from_lookup(vars(&[("KLING_SPEED", "0.001")])).unwrap_err();
    assert_eq!(err.field(), "credit_period_secs", "{err}");
    assert!(err.reason().contains("at speed 0.001"), "{err}");
    let err = StackConfig::from_lookup(vars(&[
        ("KLING_SPEED", "0.001"),
        ("KLING_CREDIT_PERIOD_SECS", "86400"),
    ]))
    .unwrap_err();
    assert_eq!(err.field(), "KLING_CREDIT_PERIOD_SECS", "{err}");
    let toml = StackConfig::from_toml_str("tier = \"pro\"\nrate_per_minute = \"none\"").unwrap();
    let err = toml
        .with_lookup(vars(&[("KLING_ADAPTIVE_RATE", "true")]))
        .unwrap_err();
    assert_eq!(err.field(), "KLING_ADAPTIVE_RATE", "{err}");
    let toml = StackConfig::from_toml_str("tier = \"pro\"\nadaptive_rate = true").unwrap();
    let err = toml
        .with_lookup(vars(&[("KLING_RATE_PER_MINUTE", "none")]))
        .unwrap_err();
    assert_eq!(
        err.field(),
        "adaptive_rate",
        "the TOML's, not a variable: {err}"
    );
}

/// `max_body_bytes` had no upper bound: any `usize` passed (`KLING_MAX_BODY_BYTES`, TOML, the
/// setter), and the classify step then buffered a response body that large, for every
/// response in flight. It is at most `preset::MAX_BODY_BYTES` (64 MiB), refused beyond that
/// naming the setting and the limit, wherever it was set.
#[test]
fn a_body_limit_beyond_the_largest_is_refused_naming_the_setting_and_the_limit() {
    use kling_tower::preset::MAX_BODY_BYTES;

    assert_eq!(MAX_BODY_BYTES, 64 * 1024 * 1024);
    let largest = StackConfig::preset(Tier::Pro).max_body_bytes(MAX_BODY_BYTES);
    largest.validate().unwrap();
    assert_eq!(largest.body_limit(), MAX_BODY_BYTES);
    let limit = MAX_BODY_BYTES.to_string();
    for bytes in [MAX_BODY_BYTES + 1, usize::MAX] {
        let config = StackConfig::preset(Tier::Pro).max_body_bytes(bytes);
        let err = config.clone().validate().unwrap_err();
        assert_eq!(err.field(), "max_body_bytes", "{err}");
        assert!(err.reason().contains("too large"), "{err}");
        assert!(err.reason().contains(&format!("at most {limit}")), "{err}");
        let built =
            kling_tower::KlingLayer::new(config, kling_tower::Credentials::api_key("k").unwrap());
        assert_eq!(built.unwrap_err().field(), "max_body_bytes");
        let err = StackConfig::from_lookup(vars(&[("KLING_MAX_BODY_BYTES", &bytes.to_string())]))
            .unwrap_err();
        assert_eq!(err.field(), "KLING_MAX_BODY_BYTES", "{err}");
        assert!(err.reason().contains(&format!("at most {limit}")), "{err}");
    }
    let err = StackConfig::from_toml_str("max_body_bytes = 1000000000").unwrap_err();
    assert_eq!(err.field(), "max_body_bytes", "{err}");
    assert!(err.reason().contains(&format!("at most {limit}")), "{err}");
    let loaded = StackConfig::from_lookup(vars(&[("KLING_MAX_BODY_BYTES", &limit)])).unwrap();
    assert_eq!(loaded.body_limit(), MAX_BODY_BYTES);
}

/// A headroom near 1 leaves almost none of the rate: Pro's 60 a minute, less a headroom of
/// 0.9999999, is one request every 278 hours, beyond the rate limiter's longest interval. It
/// was refused as `rate_per_minute` (a rate nobody set, the preset's, or
/// `KLING_RATE_PER_MINUTE` though only `KLING_HEADROOM` was set). Where the rate alone would
/// pace, the headroom is named; a rate too small on its own is still named itself.
#[test]
fn a_headroom_that_leaves_too_little_of_the_rate_is_refused_naming_the_headroom() {
    let near_one = [
        StackConfig::preset(Tier::Pro).headroom(0.9999999),
        StackConfig::preset(Tier::Pro).headroom(1.0 - f64::EPSILON / 2.0),
        // 40 hours, less a headroom of a half: 80 hours.
        StackConfig::preset(Tier::Pro)
            .rate_per_minute(1.0 / (40.0 * 60.0))
            .headroom(0.5),
    ];
    for config in near_one {
        config.clone().headroom(0.0).validate().unwrap();
        let err = config.clone().validate().unwrap_err();
        assert_eq!(err.field(), "headroom", "{config:?}: {err}");
        assert!(err.reason().contains("every 78 hours"), "{err}");
        let built =
            kling_tower::KlingLayer::new(config, kling_tower::Credentials::api_key("k").unwrap());
        assert_eq!(built.unwrap_err().field(), "headroom");
    }
    let err = StackConfig::from_lookup(vars(&[
        ("KLING_TIER", "pro"),
        ("KLING_HEADROOM", "0.9999999"),
    ]))
    .unwrap_err();
    assert_eq!(err.field(), "KLING_HEADROOM", "{err}");
    let err = StackConfig::from_toml_str("tier = \"pro\"\nheadroom = 0.9999999\n").unwrap_err();
    assert_eq!(err.field(), "headroom", "{err}");
    // A rate that is too small with no headroom at all stays the rate's fault.
    let err = StackConfig::preset(Tier::Pro)
        .rate_per_minute(3e-6)
        .headroom(0.5)
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "rate_per_minute", "{err}");
}

/// A tiny rate with a jitter allowance far too large is refused naming the allowance: the sum
/// of the two intervals overflowed a `Duration` and panicked, from TOML and the environment.
#[test]
fn a_tiny_rate_with_a_huge_jitter_allowance_is_refused_not_a_panic() {
    let toml = "rate_per_minute = 1e-15\njitter_allowance_ms = 1.84e22\n";
    let err = StackConfig::from_toml_str(toml).unwrap_err();
    assert_eq!(err.field(), "jitter_allowance_ms", "{err}");
    let err = StackConfig::from_lookup(vars(&[
        ("KLING_RATE_PER_MINUTE", "1e-15"),
        ("KLING_JITTER_ALLOWANCE_MS", "1.84e22"),
    ]))
    .unwrap_err();
    assert_eq!(err.field(), "KLING_JITTER_ALLOWANCE_MS", "{err}");
    // Unvalidated, the getter saturates rather than panics.
    let config = StackConfig::preset(Tier::Free)
        .rate_per_minute(1e-15)
        .jitter_allowance(Duration::MAX);
    assert_eq!(config.pacing_interval(), Some(Duration::MAX));
    assert_eq!(
        config.validate().unwrap_err().field(),
        "jitter_allowance_ms"
    );
}

/// The jitter allowance is real time and the retry deadline is divided by the speed: at speed
/// 50,000 the default deadline (600 s) is 12 ms, under the default 15 ms allowance, and every
/// request the rate limiter queued failed as "would pass the request's deadline". Refused,
/// naming the allowance; below that speed, or with no allowance, accepted.
#[test]
fn a_jitter_allowance_that_fills_the_scaled_deadline_is_refused() {
    let config = |speed: f64, jitter_ms: u64| {
        StackConfig::preset(Tier::Free)
            .rate_per_minute(60.0)
            .speed(speed)
            .jitter_allowance(Duration::from_millis(jitter_ms))
    };
    let err = config(50_000.0, 15).validate().unwrap_err();
    assert_eq!(err.field(), "jitter_allowance_ms", "{err}");
    assert!(err.to_string().contains("retry deadline"), "{err}");
    config(30_000.0, 15).validate().unwrap();
    config(50_000.0, 0).validate().unwrap();
    config(50_000.0, 11).validate().unwrap();
    // With no rate cap there is no pacing, and no allowance is spent.
    let uncapped = StackConfig::enterprise(5, None).speed(50_000.0);
    assert_eq!(uncapped.account_rate_per_minute(), None);
    uncapped.validate().unwrap();
}

/// A burst whose window (the pacing interval times the burst) passes the rate limiter's
/// longest, about 146 years, passed validation and then failed building the stack, as
/// `rate_per_minute.quota.burst`, no key of the configuration. It is refused by `validate`,
/// naming `burst` (and `KLING_BURST` where that variable set it); the same burst under a rate
/// whose window fits still builds.
#[test]
fn a_burst_whose_window_passes_the_rate_limiters_longest_is_refused_naming_the_burst() {
    // One request every 100 minutes, 65535 of them: about 12 years fits; at one every 2000
    // minutes (33 hours, within the 78 hours a rate may ask for), about 250 years does not.
    let fits = StackConfig::preset(Tier::Pro)
        .rate_per_minute(0.01)
        .jitter_allowance(Duration::ZERO)
        .burst(65_535);
    fits.validate().unwrap();
    kling_tower::KlingLayer::new(fits, kling_tower::Credentials::api_key("k").unwrap()).unwrap();

    let too_long = StackConfig::preset(Tier::Pro)
        .rate_per_minute(0.0005)
        .burst(65_535);
    let err = too_long.validate().unwrap_err();
    assert_eq!(err.field(), "burst", "{err}");
    assert!(err.reason().contains("146 years"), "{err}");
    let built =
        kling_tower::KlingLayer::new(too_long, kling_tower::Credentials::api_key("k").unwrap());
    assert_eq!(built.unwrap_err().field(), "burst");

    let err = StackConfig::from_lookup(vars(&[
        ("KLING_RATE_PER_MINUTE", "0.0005"),
        ("KLING_BURST", "65535"),
    ]))
    .unwrap_err();
    assert_eq!(err.field(), "KLING_BURST", "{err}");
    let err = StackConfig::from_toml_str("rate_per_minute = 0.0005\nburst = 65535").unwrap_err();
    assert_eq!(err.field(), "burst", "{err}");
}

/// A variable named as one `from_lookup` reads in another form (another case, another unit or
/// none) is refused, naming it and the one meant. Read by name alone, it was left unread
/// without a word and the preset's number used: `KLING_ATTEMPT_TIMEOUT_MS=500` left the
/// attempt timeout at 30 s. (TOML refuses an unknown key.)
#[test]
fn a_variable_named_in_another_form_is_refused_naming_the_one_meant() {
    for (name, meant) in [
        (
            "KLING_ATTEMPT_TIMEOUT_MS",
            "KLING_ATTEMPT_TIMEOUT_SECS (seconds)",
        ),
        ("KLING_TASK_LEASE", "KLING_TASK_LEASE_SECS (seconds)"),
        (
            "KLING_RETRY_DEADLINE_MINUTES",
            "KLING_RETRY_DEADLINE_SECS (seconds)",
        ),
        (
            "KLING_JITTER_ALLOWANCE_SECS",
            "KLING_JITTER_ALLOWANCE_MS (milliseconds)",
        ),
        // Another case (Windows reads names in any case: there, these are read).
        ("kling_tier", "KLING_TIER"),
        ("Kling_Daily_Credits", "KLING_DAILY_CREDITS"),
    ] {
        if cfg!(windows) && name.eq_ignore_ascii_case(meant) {
            continue;
        }
        let err = StackConfig::check_env_names(["PATH", "KLING_API_KEY", name, "KLING_TIER"])
            .unwrap_err();
        assert_eq!(err.field(), name);
        assert!(
            err.reason().contains(&format!("did you mean {meant}?")),
            "{err}"
        );
    }
    // The control: the names read, the credentials', and other programs' (this workspace's
    // own among them), also when close to one read but not a slip of it.
    let read = READ_VARS;
    let others = [
        "KLING_API_KEY",
        "KLING_ACCESS_KEY",
        "KLING_SECRET_KEY",
        "KLING_WEBHOOK_SECRET",
        "KLING_REDIS_URL",
        "KLING_REDIS_SERVER",
        "KLING_BENCH_CLIENTS",
        "KLING_FLEET_WORKER",
        "KLING_OTHER",
        "KLING_API_BASE_URL",
        "KLING_MODEL",
        "KLING_SPEEDUP",
        "TIER",
        "PATH",
        "",
    ];
    let names = || read.iter().chain(&others);
    StackConfig::check_env_names(names()).unwrap();
    assert_eq!(StackConfig::env_name_slips(names()), []);
    // Every name read is one `from_lookup` asks for.
    let asked = std::cell::RefCell::new(Vec::new());
    StackConfig::from_lookup(|name| {
        asked.borrow_mut().push(name.to_owned());
        None
    })
    .unwrap();
    let mut asked = asked.into_inner();
    asked.sort();
    asked.dedup();
    let mut read = read.map(str::to_owned).to_vec();
    read.sort();
    assert_eq!(asked, read);
}

/// A variable named with another unit than those of durations in seconds or milliseconds is
/// refused as another form too: hours or days of a duration, the rate per second or hour, the
/// body limit in KiB or MB. Each passed without a word, and the preset's number was used:
/// `KLING_CREDIT_PERIOD_DAYS=30` beside a budget meant for a month left it a budget a day.
#[test]
fn a_variable_named_with_a_unit_of_hours_days_a_rate_or_a_size_is_refused() {
    let seconds = |var: &str| format!("{var} (seconds)");
    for (name, meant) in [
        (
            "KLING_CREDIT_PERIOD_DAYS",
            seconds("KLING_CREDIT_PERIOD_SECS"),
        ),
        ("KLING_TASK_LEASE_HOURS", seconds("KLING_TASK_LEASE_SECS")),
        ("KLING_TASK_LEASE_H", seconds("KLING_TASK_LEASE_SECS")),
        (
            "KLING_RETRY_DEADLINE_MINUTE",
            seconds("KLING_RETRY_DEADLINE_SECS"),
        ),
        (
            "KLING_ATTEMPT_TIMEOUT_SECOND",
            seconds("KLING_ATTEMPT_TIMEOUT_SECS"),
        ),
        ("KLING_RATE_PER_SECOND", "KLING_RATE_PER_MINUTE".to_owned()),
        ("KLING_RATE_PER_MIN", "KLING_RATE_PER_MINUTE".to_owned()),
        ("KLING_RATE_PER_HOUR", "KLING_RATE_PER_MINUTE".to_owned()),
        ("KLING_RATE", "KLING_RATE_PER_MINUTE".to_owned()),
        ("KLING_MAX_BODY_KB", "KLING_MAX_BODY_BYTES".to_owned()),
        ("KLING_MAX_BODY_MIB", "KLING_MAX_BODY_BYTES".to_owned()),
        ("KLING_MAX_BODY", "KLING_MAX_BODY_BYTES".to_owned()),
    ] {
        let err = StackConfig::check_env_names(["PATH", name]).unwrap_err();
        assert_eq!(err.field(), name);
        assert!(
            err.reason().contains(&format!("did you mean {meant}?")),
            "{err}"
        );
    }
    assert_eq!(
        from_env_in_a_child("KLING_CREDIT_PERIOD_DAYS", "30"),
        "refused KLING_CREDIT_PERIOD_DAYS: is not read: did you mean \
         KLING_CREDIT_PERIOD_SECS (seconds)? (rename it, or unset it)"
    );
    // The control: the names read pass, and an `S` more or less on the unit of one read is
    // still a slip, warned of (`SLIPS`).
    StackConfig::check_env_names(READ_VARS).unwrap();
    for name in ["KLING_RATE_PER_MINUTES", "KLING_MAX_BODY_BYTE"] {
        StackConfig::check_env_names([name]).unwrap();
        assert_eq!(StackConfig::env_name_slips([name]).len(), 1, "{name}");
    }
}

/// The names a typing slip away from one read (an `S` more or less, two letters swapped, in a
/// long name a letter wrong, missing or added) and what `env_name_slips` says each was meant.
const SLIPS: [(&str, &str); 12] = [
    ("KLING_RATE_PER_MINUTES", "KLING_RATE_PER_MINUTE"),
    ("KLING_RATE_PER_MINUT", "KLING_RATE_PER_MINUTE"),
    ("KLING_RETRY_MAX_ATTEMPT", "KLING_RETRY_MAX_ATTEMPTS"),
    ("KLING_MAX_BODY_BYTE", "KLING_MAX_BODY_BYTES"),
    ("KLING_TEIR", "KLING_TIER"),
    ("KLING_SLOT", "KLING_SLOTS"),
    ("KLING_BRUST", "KLING_BURST"),
    ("KLING_TIERS", "KLING_TIER"),
    ("KLING_SPEEDS", "KLING_SPEED"),
    ("KLING_HEADROMO", "KLING_HEADROOM"),
    ("KLING_POOL_SLOT", "KLING_POOL_SLOTS"),
    ("KLING_DAILY_CREDITZ", "KLING_DAILY_CREDITS"),
];

/// A name a typing slip away from one read is warned of, naming it and the one meant, but
/// not refused: a user's own name may be one too (`KLING_POOL_SCORE` beside
/// `KLING_POOL_SCOPE`, `KLING_TIRE` beside `KLING_TIER`, `KLING_SLOT` for a deployment slot),
/// and each such name stopped the program. No rule on the letters tells them apart: `TIRE` is
/// `TIER` with its last two letters swapped as `HEADROMO` is `HEADROOM`.
#[test]
fn a_variable_named_with_a_typing_slip_is_warned_of_not_refused() {
    for (name, meant) in SLIPS.into_iter().chain([
        ("KLING_POOL_SCORE", "KLING_POOL_SCOPE"),
        ("KLING_TIRE", "KLING_TIER"),
    ]) {
        let (checked, warnings) =
            warnings_of(|| StackConfig::check_env_names(["PATH", name, "KLING_TIER"]));
        assert!(checked.is_ok(), "{name}: {checked:?}");
        let [warning] = &warnings[..] else {
            panic!("{name}: one warning, not {warnings:?}")
        };
        assert!(
            warning.contains(name) && warning.contains(&format!("did you mean {meant}?")),
            "{name}: {warning}"
        );
        let slips = StackConfig::env_name_slips(["PATH", name, "KLING_TIER"]);
        assert_eq!(slips.len(), 1, "{name}: {slips:?}");
        assert_eq!((slips[0].name(), slips[0].meant()), (name, meant));
        assert_eq!(
            slips[0].to_string(),
            format!("{name} is not read: did you mean {meant}?")
        );
    }
    // The control: a name read, or of its own, is not warned of.
    let (checked, warnings) =
        warnings_of(|| StackConfig::check_env_names(["KLING_TIER", "KLING_SEED", "PATH"]));
    assert!(checked.is_ok() && warnings.is_empty(), "{warnings:?}");
}

/// A name a program plausibly sets for itself passes, though a letter from one read: one
/// letter more, less or changed in a short name is often another word (`KLING_SEED` is not
/// `KLING_SPEED`, nor `KLING_TIMER` `KLING_TIER`), and a number marks a name of its own
/// (`KLING_SLOTS2`). Each was refused, and with it the program's whole configuration; they are
/// not even warned of.
#[test]
fn a_name_of_its_own_a_letter_from_one_read_passes() {
    for name in [
        "KLING_SEED",
        "KLING_SPEND",
        "KLING_TIMER",
        "KLING_TIGER",
        "KLING_SPOTS",
        "KLING_SLOTS2",
        "KLING_POOL_SLOTS2",
        "KLING_ADAPTIVE_RATIO",
        "kling_seed",
        // The control: never refused.
        "KLING_DAILY_CREDITS_EU",
        "KLING_MODE",
        "KLING_HOST",
        "KLING_PORT",
        "KLING_DEBUG",
    ] {
        let checked = StackConfig::check_env_names([name]);
        assert!(checked.is_ok(), "{name}: {checked:?}");
        assert_eq!(StackConfig::env_name_slips([name]), [], "{name}");
    }
    // The control: slips are still named, of a short name as of a long one.
    for (name, meant) in SLIPS {
        let slips = StackConfig::env_name_slips([name]);
        assert_eq!(slips.len(), 1, "{name}: {slips:?}");
        assert_eq!(slips[0].meant(), meant, "{name}");
    }
}

/// The `WARN` events logged on this thread while `f` runs, each as its fields' values, and
/// what `f` returned.
fn warnings_of<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    use std::sync::{Arc, Mutex};

    struct Capture(Arc<Mutex<Vec<String>>>);

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            if *event.metadata().level() != tracing::Level::WARN {
                return;
            }
            let mut text = String::new();
            event.record(
                &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                    text.push_str(&format!("{}={value:?} ", field.name()));
                },
            );
            self.0.lock().unwrap().push(text);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    let events = Arc::new(Mutex::new(Vec::new()));
    let out = tracing::subscriber::with_default(Capture(events.clone()), f);
    let events = events.lock().unwrap().clone();
    (out, events)
}

/// `StackConfig::from_env` in a process whose environment holds the one variable
/// `PRESET_CHILD_VAR` names, set to `PRESET_CHILD_VALUE`: what it read, or its error.
fn from_env_in_a_child(var: &str, value: &str) -> String {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "preset::from_env_child_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env_clear()
        .env(var, value)
        .env("PRESET_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("FROM-ENV "))
        .unwrap_or_else(|| {
            panic!(
                "no answer: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .to_owned()
}

/// Not a test: the child process of `from_env_refuses_a_variable_named_with_a_slip`.
#[test]
#[ignore = "a child process of a preset test"]
fn from_env_child_process() {
    if std::env::var_os("PRESET_CHILD").is_none() {
        return;
    }
    let answer = match StackConfig::from_env() {
        Ok(config) => format!("ok {:?}", config.attempt_timeout_duration()),
        Err(e) => format!("refused {}: {}", e.field(), e.reason()),
    };
    #[allow(clippy::print_stdout)]
    {
        println!("FROM-ENV {answer}");
    }
}

/// `from_env` reads the environment's names: `KLING_ATTEMPT_TIMEOUT_MS=500` is refused (it
/// left the attempt timeout at 30 s); the control, `KLING_ATTEMPT_TIMEOUT_SECS=5`, is read.
#[test]
fn from_env_refuses_a_variable_named_with_a_slip() {
    assert_eq!(
        from_env_in_a_child("KLING_ATTEMPT_TIMEOUT_MS", "500"),
        "refused KLING_ATTEMPT_TIMEOUT_MS: is not read: did you mean \
         KLING_ATTEMPT_TIMEOUT_SECS (seconds)? (rename it, or unset it)"
    );
    assert_eq!(
        from_env_in_a_child("KLING_ATTEMPT_TIMEOUT_SECS", "5"),
        "ok 5s"
    );
    // A program's own name a typing slip from one read is warned of, and the program goes on
    // (`KLING_TIRE=summer` was refused as a slip of `KLING_TIER`).
    assert_eq!(from_env_in_a_child("KLING_TIRE", "summer"), "ok 30s");
}

/// A pool named twice in `KLING_POOL_SLOTS` is refused naming the variable and the pool: the
/// last value was kept without a word (`video=20,video=5` ran video at 5).
#[test]
fn a_pool_named_twice_in_the_variable_is_refused_naming_it() {
    for (value, pool) in [
        ("video=20,video=5", "video"),
        (
            "image=2, video:kling-3.0=4 ,video:kling-3.0=4",
            "video:kling-3.0",
        ),
    ] {
        let err = StackConfig::from_lookup(vars(&[("KLING_POOL_SLOTS", value)])).unwrap_err();
        assert_eq!(err.field(), "KLING_POOL_SLOTS", "{value}: {err}");
        assert!(
            err.reason().contains(&format!("`{pool}`")) && err.reason().contains("twice"),
            "{value}: {err}"
        );
    }
    // The control: each pool once, a preset's own pool (resource-pack's video) overridden.
    let lookup = vars(&[
        ("KLING_TIER", "resource-pack"),
        ("KLING_POOL_SLOTS", "video=5,video:kling-3.0=2"),
    ]);
    let config = StackConfig::from_lookup(lookup).unwrap();
    assert_eq!(config.slots_for(&Pool::parse("video").unwrap()), 5);
    assert_eq!(
        config.slots_for(&Pool::parse("video:kling-3.0").unwrap()),
        2
    );
    // TOML's parser refuses a key written twice, naming it.
    let err = StackConfig::from_toml_str("[pool_slots]\nvideo = 20\n\"video\" = 5").unwrap_err();
    assert!(err.reason().contains("`\"video\"` is given twice"), "{err}");
}

/// A pool key no create's route can give is refused naming the entry: a model with spaces
/// (`video: kling-3.0`), in capitals (Kling's model names are lowercase and its paths compared
/// as written), escaped (`kling%2D3.0`, which the router reads as `kling-3.0`), with `;`
/// parameters or a dot segment the router removes. Each was accepted and then matched no
/// create, so its slot count did nothing.
#[test]
fn a_pool_key_no_create_can_give_is_refused_naming_it() {
    for (key, hint) in [
        ("video: kling-3.0", "space"),
        ("video:kling 3.0", "space"),
        ("video:kling-3.0 ", "space"),
        ("video:\tkling-3.0", "space"),
        ("video:Kling-3.0", "`video:kling-3.0`"),
        ("image:KLING-V2", "`image:kling-v2`"),
        ("video:kling%2D3.0", "`video:kling-3.0`"),
        ("video:kling-3.0;v=2", "counts in `video:kling-3.0`"),
        ("video:..", "never"),
        ("video:kling/3.0", "never"),
        ("video:kling?x", "counts in `video:kling`"),
        ("video:kling\u{1}", "never"),
        ("Video", "not a pool"),
        ("audio:kling-3.0", "not a pool"),
    ] {
        let err = StackConfig::preset(Tier::Pro)
            .pool_slots(key, 3)
            .validate()
            .unwrap_err();
        assert_eq!(err.field(), format!("pool_slots.{key}"), "{key}: {err}");
        assert!(err.reason().contains(hint), "{key}: {err}");
    }
    // Through the variable (trimmed around the entry, not inside it) and TOML alike.
    let err =
        StackConfig::from_lookup(vars(&[("KLING_POOL_SLOTS", "video: kling-3.0=3")])).unwrap_err();
    assert_eq!(
        err.field(),
        "KLING_POOL_SLOTS (pool_slots.video: kling-3.0)"
    );
    let err = StackConfig::from_toml_str("[pool_slots]\n\"video:Kling-3.0\" = 3").unwrap_err();
    assert_eq!(err.field(), "pool_slots.video:Kling-3.0");
}

/// The control of the above: the pool every real create path gives, legacy and new-style,
/// is accepted as a key, and a create on that path then counts under its slots.
#[test]
fn the_pool_of_every_real_create_path_is_accepted_as_a_key() {
    use kling_core::Route;

    for path in [
        "/v1/videos/text2video",
        "/v1/videos/image2video",
        "/v1/images/generations",
        "/v1/images/kolors-virtual-try-on",
        "/text-to-video/kling-3.0",
        "/image-to-video/kling-v2-1-master",
        "/omni-video/kling-o1",
        "/motion-control/kling-v2.6",
        "/text-to-image/kling-v2",
        "/virtual-try-on/kolors-virtual-try-on-v1-5",
        "/text-to-video/kling%2D3.0",
        "/text-to-video/kling:3",
        "/text-to-video/kling%3A3",
        "/text-to-video/kling_3~0",
    ] {
        let uri: http::Uri = path.parse().unwrap();
        let pool = Route::of(&http::Method::POST, uri.path()).pool().unwrap();
        let key = pool.to_string();
        let config = StackConfig::preset(Tier::Pro).pool_slots(key.as_str(), 7);
        config
            .validate()
            .unwrap_or_else(|e| panic!("{path} gives `{key}`: {e}"));
        assert_eq!(config.slots_for(&pool), 7, "{path}");
    }
}

/// `KLING_BASE_URL` (TOML `base_url`) sets where the stack sends: an environment-only
/// deployment reaches the China host, a proxy or the mock without code. The stack built from
/// the configuration sends there; a builder's own `base_url` still wins.
#[tokio::test(start_paused = true)]
async fn the_base_url_variable_and_key_set_where_the_stack_sends() {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::Full;
    use kling_tower::base_url::CHINA;
    use kling_tower::{Credentials, KlingLayer};
    use tower::{Layer, ServiceExt, service_fn};

    /// The URI a lookup through the stack of `config` (and a builder base, if any) is sent to.
    async fn sent_to(config: StackConfig, builder_base: Option<&str>) -> String {
        let seen = Arc::new(Mutex::new(String::new()));
        let record = Arc::clone(&seen);
        let server = service_fn(move |req: http::Request<_>| {
            *record.lock().unwrap() = req.uri().to_string();
            let body = r#"{"code":0,"message":"ok","request_id":"r","data":{"task_id":"t","task_status":"processing"}}"#;
            async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            }
        });
        let mut builder = KlingLayer::builder(config, Credentials::api_key("k").unwrap());
        if let Some(base) = builder_base {
            builder = builder.base_url(base);
        }
        let stack = builder.build().unwrap();
        let lookup = http::Request::get("/v1/videos/text2video/t")
            .body(Full::new(Bytes::new()))
            .unwrap();
        stack.layer(server).oneshot(lookup).await.unwrap();
        seen.lock().unwrap().clone()
    }

    let config = StackConfig::from_lookup(vars(&[("KLING_BASE_URL", CHINA)])).unwrap();
    assert_eq!(config.configured_base_url(), Some(CHINA));
    let china = format!("{CHINA}/v1/videos/text2video/t");
    assert_eq!(sent_to(config.clone(), None).await, china);
    let mock = "http://127.0.0.1:9/kling";
    assert_eq!(
        sent_to(config, Some(mock)).await,
        format!("{mock}/v1/videos/text2video/t")
    );
    let config = StackConfig::from_toml_str(&format!("base_url = \"{CHINA}\"")).unwrap();
    assert_eq!(sent_to(config, None).await, china);
    // The control: unset, the stack sends to the global host.
    let config = StackConfig::from_lookup(vars(&[])).unwrap();
    assert_eq!(config.configured_base_url(), None);
    assert!(
        sent_to(config, None)
            .await
            .starts_with("https://api-singapore.klingai.com/")
    );
}

/// A base URL the builder would refuse is refused by the loaders as the builder refuses it,
/// naming the variable or key, and neither the error nor the configuration's `Debug` repeats
/// user info or a query (a URL may carry a password or a signature).
#[test]
fn a_bad_base_url_is_refused_naming_the_variable_without_echoing_secrets() {
    for (base, reason) in [
        ("http://api-beijing.klingai.com", "https://"),
        ("api-beijing.klingai.com", "https://"),
        ("ftp://host", "https://"),
        ("https://user:s3cret@proxy.internal/kling", "user info"),
        ("https://proxy.internal/kling?sig=s3cret", "query"),
        ("https://proxy.internal:99999", "port"),
        ("not a url", "not a URL"),
    ] {
        let err = StackConfig::from_lookup(vars(&[("KLING_BASE_URL", base)])).unwrap_err();
        assert_eq!(err.field(), "KLING_BASE_URL", "{base}: {err}");
        assert!(err.reason().contains(reason), "{base}: {err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = StackConfig::from_toml_str(&format!("base_url = \"{base}\"")).unwrap_err();
        assert_eq!(err.field(), "base_url", "{base}: {err}");
        let config = StackConfig::preset(Tier::Pro).base_url(base);
        assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
        assert_eq!(config.validate().unwrap_err().field(), "base_url");
    }
    // The control: https anywhere, plain http to loopback, as the builder takes them.
    for base in [
        "https://api-beijing.klingai.com",
        "https://proxy.internal:8443/kling",
        "http://127.0.0.1:8080",
        "http://localhost:9/kling",
    ] {
        let config = StackConfig::from_lookup(vars(&[("KLING_BASE_URL", base)])).unwrap();
        assert_eq!(config.configured_base_url(), Some(base));
    }
}

/// A password with a `/`, `?` or `#` in it (a base64 one: `ab/cd+ef==`) ends the URL's host
/// there, so the parser reads the rest of the user info as a port (`https://kling:s3cret/x@…`
/// has "port" `s3cret`): the refusal must not quote it, through the variable, TOML, `validate`
/// or a builder's `Debug` (the builder starts from the configuration's base URL).
#[test]
fn a_base_url_whose_password_ends_its_host_early_is_refused_without_quoting_it() {
    use kling_tower::{Credentials, KlingLayer};

    for base in [
        "https://kling:s3cret/x+y==@proxy.internal/kling",
        "https://kling:s3cret#@proxy.internal",
        "https://kling:443s3cret/@proxy.internal",
    ] {
        let err = StackConfig::from_lookup(vars(&[("KLING_BASE_URL", base)])).unwrap_err();
        assert_eq!(err.field(), "KLING_BASE_URL", "{base}: {err}");
        assert!(err.reason().contains("not quoted"), "{base}: {err}");
        assert!(!format!("{err} {err:?}").contains("s3cret"), "{err:?}");
        let err = StackConfig::from_toml_str(&format!("base_url = \"{base}\"")).unwrap_err();
        assert_eq!(err.field(), "base_url", "{base}: {err}");
        assert!(!format!("{err} {err:?}").contains("s3cret"), "{err:?}");
        let config = StackConfig::preset(Tier::Pro).base_url(base);
        let err = config.validate().unwrap_err();
        assert!(!format!("{err} {err:?}").contains("s3cret"), "{err:?}");
        let builder = KlingLayer::builder(config, Credentials::api_key("k").unwrap());
        assert!(!format!("{builder:?}").contains("s3cret"), "{builder:?}");
        let err = builder.build().unwrap_err();
        assert!(!format!("{err} {err:?}").contains("s3cret"), "{err:?}");
    }
    // The control: a base URL holding nothing secret is still quoted where it is wrong.
    let err = StackConfig::from_lookup(vars(&[("KLING_BASE_URL", "https://proxy.internal:99999")]))
        .unwrap_err();
    assert!(err.reason().contains("`99999`"), "{err}");
}

/// Where a pool key is refused with the key to set instead, that key is one `validate` takes:
/// an escaped capital (`Kling%2D3.0`, `%4Bling`) was sent to `video:Kling-3.0`, which the
/// capitals rule then refused.
#[test]
fn the_pool_a_refusal_says_to_set_is_one_validate_takes() {
    for (key, meant) in [
        ("video:Kling%2D3.0", "video:kling-3.0"),
        ("video:%4Bling", "video:kling"),
        ("video:Kling-3.0", "video:kling-3.0"),
        ("video:kling%2D3.0", "video:kling-3.0"),
        ("video:kling-3.0;v=2", "video:kling-3.0"),
        ("image:KLING-V2;x", "image:kling-v2"),
    ] {
        let err = StackConfig::preset(Tier::Pro)
            .pool_slots(key, 3)
            .validate()
            .unwrap_err();
        assert!(
            err.reason().ends_with(&format!("set `{meant}`")),
            "{key}: {err}"
        );
        StackConfig::preset(Tier::Pro)
            .pool_slots(meant, 3)
            .validate()
            .unwrap_or_else(|e| panic!("{key} names {meant}: {e}"));
    }
}
