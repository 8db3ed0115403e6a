use kling_bench::goodput::{self, Client, Run, Scenario};
use kling_bench::{overhead, scale};

use crate::alone;

/// The targets of issue 10 a goodput run must meet, as BENCHMARKS.md states them: the ones
/// it misses, by name (empty: all met).
fn missed(run: &Run) -> Vec<&'static str> {
    let mut missed = Vec::new();
    // Every job completes or is refused for good by the server (a 1102): none lost to a
    // give-up, and none refused while the credits still paid for it (`Run::paid`: a stack
    // that halted creates for no reason ends its jobs refused, not lost).
    if run.lost > 0 || run.completed + run.refused != run.jobs || run.completed < run.paid {
        missed.push("every job completes");
    }
    if run.after_1102 > 0 {
        missed.push("no create after a 1102");
    }
    if run.duplicates > 0 {
        missed.push("no duplicate create");
    }
    // Counted by the tasks the jobs ended on, not by how many ended: a job that ended on
    // another job's task (a lookup that found the wrong one) is no job done.
    if run.shared_tasks > 0 {
        missed.push("each job its own task");
    }
    // Judged wherever the server gives a `Retry-After` (the Retry-After cells), limits known
    // or not: 429s are not judged there, so this is what shows whether the wait was kept.
    if run.early > 0 {
        missed.push(EARLY);
    }
    // Not in "outage", whose server refuses every request for a while whatever the client
    // does (`Scenario::refusals_are_the_clients`).
    let refusals_judged = Scenario::ALL
        .into_iter()
        .find(|s| s.name() == run.scenario)
        .map_or(run.limits_known, Scenario::refusals_are_the_clients);
    if refusals_judged && run.rejected() as f64 >= 0.01 * run.requests as f64 {
        missed.push("429s under 1% with the limits known");
    }
    // Polling every second asks for more than the rate carries: no client-independent bound
    // is within reach there (`Run::judged_by_efficiency`), so the target is that the client
    // keeps the rate busy to the end instead.
    if run.judged_by_efficiency() && run.efficiency() < 0.98 {
        missed.push("efficiency within 2% of the bound");
    }
    if !run.judged_by_efficiency() && run.rate_use().is_some_and(|u| u < 0.98) {
        missed.push("rate kept busy");
    }
    // A bound is a bound: no run beats it.
    if run.efficiency() > 1.0 {
        missed.push("makespan at or above the bound");
    }
    // The server's rate carries one request an interval: no run keeps it busier than that
    // (a rate use counting the requests it refused as too fast read up to 555%).
    if run.rate_use().is_some_and(|u| u > 1.0 + RATE_USE_ROUNDING) {
        missed.push("rate use at most 100%");
    }
    missed
}

/// The target on `Retry-After`: no request sent before a wait it falls under had passed
/// (`Run::early`).
const EARLY: &str = "no request before its Retry-After";

/// A rate kept exactly busy reads 1.0 give or take a rounding (the bare client polling every
/// second does, on Free).
const RATE_USE_ROUNDING: f64 = 1e-9;

/// What a client told twice the slots it has must still do ("unknown slots (told 2x)"),
/// beside the targets of [`missed`]: finish within 2% of the makespan it reaches when told the
/// true slots (`told`, the same preset's "plain" run: the same jobs and task lives), and meet
/// a 1303 on under 3% of its requests (a slots limiter that keeps probing past the slots it
/// was refused at meets one after about every ended task). The misses, by name.
fn unknown_slots_misses(run: &Run, told: &Run) -> Vec<&'static str> {
    let mut missed = Vec::new();
    if run.makespan > told.makespan * 1.02 {
        missed.push("makespan within 2% of the slots told right");
    }
    let refused = run.rejections.get("1303").copied().unwrap_or(0);
    if refused as f64 >= 0.03 * run.requests as f64 {
        missed.push("1303s under 3% with the slots unknown");
    }
    missed
}

/// The share of a run's requests the server refused with 1302 (requests too fast).
fn told_rate_share(run: &Run) -> f64 {
    let refused = run.rejections.get("1302").copied().unwrap_or(0);
    refused as f64 / run.requests.max(1) as f64
}

/// The goodput section at its published size (paused time: the same on any machine): the
/// stack meets every target in every scenario of every preset, and tower's client, judged by
/// the same checks, misses them where BENCHMARKS.md says it does (the checks can fail).
#[test]
fn goodput_meets_every_target_in_every_scenario() {
    let _alone = alone();
    let runs = goodput::run(goodput::Options::full(), &mut |_| {});
    let name = |run: &Run| format!("{} / {} / {}", run.preset, run.scenario, run.client);
    let ours: Vec<&Run> = runs
        .iter()
        .filter(|r| r.client == Client::Kling.name())
        .collect();
    let fixed_rate: Vec<&Run> = runs
        .iter()
        .filter(|r| r.client == Client::KlingFixedRate.name())
        .collect();
    assert_eq!(
        ours.len(),
        runs.len() - ours.len() - fixed_rate.len(),
        "one run per client"
    );
    // A bound is a bound for every client, not only the stack: tower's client and the stack
    // with its adaptive rate off run on the same mock, and one beating the bound would mean
    // the bound, and so every efficiency of the table, is wrong.
    for run in &runs {
        assert!(
            run.efficiency() <= 1.0,
            "{}: beats the bound\n{run:?}",
            name(run)
        );
        // Nor the rate: what it carried fits in the makespan, whoever sent too fast.
        assert!(
            run.rate_use().is_none_or(|u| u <= 1.0 + RATE_USE_ROUNDING),
            "{}: rate use {:?}\n{run:?}",
            name(run),
            run.rate_use()
        );
    }
    // Eleven scenarios on each of the three rated presets, four on Enterprise (no rate cap):
    // a scenario that stopped running would otherwise pass unseen.
    assert_eq!(ours.len(), 37, "every cell of the published table");
    // Through a 20-minute outage (every request refused with 1302, whatever the pace) the
    // stack meets every target of `missed` (checked with the other cells below): every job
    // completes, within 2% of a bound that counts the outage (`Run::bound`), so it came back
    // to the rate it was told once the outage ended. (When each 1302 of the outage lowered
    // the adaptive rate, it ended near the floor and stayed there: 33-47% efficiency.) The
    // outage did refuse, and the bound counts it.
    for run in ours
        .iter()
        .filter(|r| r.scenario == Scenario::Outage.name())
    {
        assert!(
            run.rejections.get("1302").is_some_and(|n| *n > 0)
                && run.outage == goodput::OUTAGE.as_secs_f64(),
            "{}\n{run:?}",
            name(run)
        );
    }
    // "rate told 1.5x" with the adaptive rate off too, on each rated preset.
    assert_eq!(fixed_rate.len(), 3);
    let told = |runs: &[&Run]| -> Vec<Run> {
        runs.iter()
            .filter(|r| r.scenario == Scenario::RateTold1_5.name())
            .map(|r| (*r).clone())
            .collect()
    };
    for (adaptive, fixed) in told(&ours).iter().zip(told(&fixed_rate)) {
        assert_eq!(adaptive.preset, fixed.preset);
        // Told a rate 1.5 times the account's, the stack (adaptive rate on, the default)
        // meets every target of `missed`, and 1302s on under 4% of its requests: not under the
        // 1% of the cells with the limits known, because it learns the account's rate from
        // 1302s (a few while it slows from the rate it was told) and keeps probing above it
        // (about one 1302 in forty requests at the limit, kling-ratelimit's `Adaptive`).
        let misses = missed(adaptive);
        assert!(
            misses.is_empty(),
            "{}: {misses:?}\n{adaptive:?}",
            name(adaptive)
        );
        assert!(
            told_rate_share(adaptive) < 0.04,
            "{}: 1302s on {:.2}% of the requests\n{adaptive:?}",
            name(adaptive),
            told_rate_share(adaptive) * 100.0
        );
        // The negative control: the same stack with its adaptive rate off still completes
        // every job (a 1302 is retried), but meets 1302s on at least 5% of its requests, and
        // more than twice the adaptive rate's share (each 1302 pauses the account, the next
        // request succeeds, and the stack goes back to the rate it was told).
        assert_eq!(
            (fixed.lost, fixed.completed),
            (0, fixed.jobs),
            "{}\n{fixed:?}",
            name(&fixed)
        );
        assert!(
            told_rate_share(&fixed) >= 0.05
                && told_rate_share(&fixed) > 2.0 * told_rate_share(adaptive),
            "{}: 1302s on {:.2}% of the requests, against {:.2}% adaptive\n{fixed:?}",
            name(&fixed),
            told_rate_share(&fixed) * 100.0,
            told_rate_share(adaptive) * 100.0
        );
    }
    for run in &ours {
        // Told twice the slots it has, the stack completes every job (a 1303 the slots layer
        // holds is no attempt used), but its makespan is 6-12% over the server's own floor
        // (the tasks' lives over the slots, which a client that learns of a task's end by
        // polling cannot reach): a known miss, listed in BENCHMARKS.md. Any other miss fails,
        // and so does a known miss that is met now (BENCHMARKS.md's "Targets not reached"
        // would be wrong).
        let efficiency = "efficiency within 2% of the bound";
        let known: &[&str] = if run.scenario == Scenario::UnknownSlots.name() {
            &[efficiency]
        } else {
            &[]
        };
        for miss in known {
            assert!(
                missed(run).contains(miss),
                "{}: `{miss}` is met now: update BENCHMARKS.md and this list\n{run:?}",
                name(run)
            );
        }
        if run.scenario == Scenario::UnknownSlots.name() {
            // What it does meet there: as fast as when told the true slots, without
            // hammering the server with creates it refuses.
            let told = ours
                .iter()
                .find(|r| r.preset == run.preset && r.scenario == Scenario::Plain.name())
                .expect("a plain run of each preset");
            let unknown_slots = unknown_slots_misses(run, told);
            assert!(
                unknown_slots.is_empty(),
                "{}: {unknown_slots:?}\n{run:?}",
                name(run)
            );
        }
        let unexpected: Vec<_> = missed(run)
            .into_iter()
            .filter(|m| !known.contains(m))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{}: {unexpected:?}\n{run:?}",
            name(run)
        );
    }
    // The negative control: tower's simple 429 retry loses jobs and creates twice under
    // faults (where, with the limits known, its jobs also meet more than 1% 1303s: the 429
    // check can fail, though tower's client meets none on "plain"), keeps creating after a
    // 1102, and gives up in the penalty window.
    let tower = |preset: &str, scenario: Scenario| {
        runs.iter()
            .find(|r| {
                r.client == Client::Tower.name()
                    && r.preset == preset
                    && r.scenario == scenario.name()
            })
            .unwrap_or_else(|| panic!("no tower run {preset} / {}", scenario.name()))
    };
    let faults = missed(tower("pro", Scenario::Faults));
    assert!(faults.contains(&"every job completes"), "{faults:?}");
    assert!(faults.contains(&"no duplicate create"), "{faults:?}");
    assert!(
        faults.contains(&"429s under 1% with the limits known"),
        "{faults:?}"
    );
    // Credits run out on every preset: tower's client keeps creating after the 1102 on each,
    // Enterprise's ten slots with no rate cap included (where ours creates none).
    for preset in ["free", "standard", "pro", "enterprise"] {
        let credits = missed(tower(preset, Scenario::Credits));
        assert!(
            credits.contains(&"no create after a 1102"),
            "{preset}: {credits:?}"
        );
    }
    // Told twice the slots, tower's client (a semaphore of the slots it was told) meets a
    // wall of 1303s on every preset.
    for preset in ["free", "standard", "pro", "enterprise"] {
        let told = tower(preset, Scenario::Plain);
        let unknown = unknown_slots_misses(tower(preset, Scenario::UnknownSlots), told);
        assert!(
            unknown.contains(&"1303s under 3% with the slots unknown"),
            "{preset}: {unknown:?}"
        );
    }
    // The Retry-After cells give waits (the 1302s, and so the stack's zero early requests, are
    // not for want of one), and tower's client, which ignores the header, sends requests
    // before them, in every cell where the header asks for more than one interval of the pace
    // it was told (1.5 times the account's rate): it keeps to that pace, so where no wait is
    // longer, no request of it can be early, and neither could one of a stack that ignored
    // the header but kept its pace (`Run::longest_retry_after`). The mock's lockout after a
    // 1302 (`goodput::RATE_LOCKOUT`, 6 s) outlasts that pace on every preset (Free's is 4 s),
    // so every cell is judged.
    let mut judged = Vec::new();
    for preset in ["free", "standard", "pro"] {
        for scenario in [Scenario::RetryAfterSeconds, Scenario::RetryAfterDate] {
            let cell = format!("{preset} / {}", scenario.name());
            let stack = ours
                .iter()
                .find(|r| r.preset == preset && r.scenario == scenario.name())
                .unwrap_or_else(|| panic!("no kling-tower run {cell}"));
            assert!(stack.retry_afters > 0, "{cell}: no Retry-After\n{stack:?}");
            let control = tower(preset, scenario);
            let told_interval = 1.0 / (1.5 * control.rate_per_s.expect("a rated preset"));
            let can_be_early = control.longest_retry_after > told_interval;
            assert_eq!(
                missed(control).contains(&EARLY),
                can_be_early,
                "{cell}: tower's client sent {} early requests, the longest wait {:.2} s against \
                 {told_interval:.2} s told\n{control:?}",
                control.early,
                control.longest_retry_after
            );
            if can_be_early {
                judged.push(cell);
            }
        }
    }
    assert_eq!(
        judged,
        [
            "free / Retry-After seconds",
            "free / Retry-After date",
            "standard / Retry-After seconds",
            "standard / Retry-After date",
            "pro / Retry-After seconds",
            "pro / Retry-After date"
        ],
        "the cells where a Retry-After can be broken at the pace told: update BENCHMARKS.md"
    );
    let penalty = missed(tower("pro", Scenario::Penalty));
    assert!(
        penalty.contains(&"efficiency within 2% of the bound"),
        "{penalty:?}"
    );
    // The rate-use check can fail: a run whose demand is under the rate ("plain", polling
    // every 10 s) leaves it idle much of the time.
    for run in ours.iter().filter(|r| r.scenario == Scenario::Plain.name()) {
        assert!(run.rate_use().is_none_or(|u| u < 0.98), "{run:?}");
    }
}

/// The negative controls of the "nothing was refused" claims (429s under 1% with the limits
/// known, which the stack meets with none but the one 1102 of "credits run out"): the same
/// jobs through a bare client, no limiter and no retry, on the same mock settings, meet 429s on
/// at least 1% of their requests in every one of those cells, so the server there does refuse
/// a client that does not keep to the limits (the stack's zero is the stack's doing).
#[test]
fn the_server_refuses_a_bare_client_wherever_the_stack_meets_no_refusal() {
    let _alone = alone();
    let controls = goodput::controls(goodput::Options::full(), &mut |_| {});
    // Plain, faults and credits on four presets, polling every second on the three rated ones.
    assert_eq!(controls.len(), 15);
    for run in &controls {
        assert_eq!(run.client, Client::Bare.name());
        // The bound holds for a client that keeps to no limit too, and the rate use counts
        // only what the rate carried (these runs send most of their requests too fast).
        assert!(run.efficiency() <= 1.0, "{run:?}");
        assert!(
            run.rate_use().is_none_or(|u| u <= 1.0 + RATE_USE_ROUNDING),
            "{run:?}"
        );
        assert!(
            missed(run).contains(&"429s under 1% with the limits known"),
            "{} / {}: the server refused the bare client too little to judge by\n{run:?}",
            run.preset,
            run.scenario
        );
    }
}

/// Queued waiters cost each limiter at most 256 bytes of its own bookkeeping, and are served
/// in arrival order: 100,000 of them, as published.
#[test]
fn queued_waiters_cost_at_most_256_bytes_and_are_served_in_order() {
    let _alone = alone();
    let options = scale::Options {
        waiters: 100_000,
        ..scale::Options::tiny()
    };
    let report = scale::run(options, &mut |_| {});
    assert_eq!(report.waiters.len(), 2);
    for waiters in &report.waiters {
        assert_eq!(waiters.count, 100_000, "{waiters:?}");
        // All but the first, which each limiter lets through at once, waited: the bytes and
        // the order are those of 99,999 queued waiters, not of requests that passed.
        assert_eq!(waiters.queued, 99_999, "{waiters:?}");
        assert_eq!(waiters.out_of_order, 0, "{waiters:?}");
        assert!(
            waiters.bytes_per_waiter > 0.0 && waiters.bytes_per_waiter <= 256.0,
            "{waiters:?}"
        );
    }
    // The check can fail: the same measurement sees every byte a waiter holds. Through a gate
    // whose waiters each hold 256 bytes more, it finds 256 more a waiter.
    let (with, without) = scale::bytes_control(10_000, scale::BALLAST);
    let seen = with - without;
    assert!(
        (seen - scale::BALLAST as f64).abs() < 0.5,
        "{seen} bytes a waiter seen of {} ({with} against {without})",
        scale::BALLAST
    );
    assert!(with > 256.0, "{with}");
}

/// Allocations per request on the success path beyond the bare service's, as BENCHMARKS.md
/// gives them (`allocs/req`: 18.0 against 4.0; 17.5 until each create carried a send watch the
/// task slots read if the caller drops it, `b899530`): the layers' overhead targets hinge on them
/// (each costs some 140 instructions with its free), and unlike a timing they are the same on
/// any machine, so a change that adds one fails here instead of hiding in a slow machine's
/// noise. A change that removes one fails here too, until it lowers these constants (and the
/// table) with it: the figures BENCHMARKS.md gives stay the ones the code has.
const PRO_STACK_EXTRA_ALLOCS: f64 = 14.0;
/// The envelope read's share of them (`ClassifyLayer` alone: 10.5 against 4.0).
const CLASSIFY_EXTRA_ALLOCS: f64 = 6.5;
/// Room for what the runtime or a layer allocates now and then (a table growing: a few in
/// 4,000 requests), well under one allocation on every create or every query (0.5 a request).
const SLACK: f64 = 0.1;

/// Each row of the key series times the key table it names: with enough decisions that the
/// limiter's sweep of idle keys runs (every 1,024) while a row is warmed up and timed, the
/// table still holds all of the row's keys (`scale::keys` asserts it), not what a sweep left.
#[test]
fn each_key_row_times_as_many_keys_as_it_names() {
    let _alone = alone();
    let options = scale::Options {
        keys: 1_000,
        decisions: 20_000,
        ..scale::Options::tiny()
    };
    let report = scale::run(options, &mut |_| {});
    let counts: Vec<usize> = report.keys.iter().map(|&(keys, _)| keys).collect();
    assert_eq!(counts, [1, 100, 1_000]);
}

#[test]
fn the_stack_allocates_no_more_per_request_than_benchmarks_says() {
    let _alone = alone();
    // As many lives as the overhead section counts.
    let allocs = |name: &str| {
        overhead::allocations_per_request(name, 2_000)
            .expect("a subject")
            .0
    };
    let bare = allocs(overhead::BARE);
    for (name, extra) in [
        (overhead::PRO_STACK, PRO_STACK_EXTRA_ALLOCS),
        (overhead::CLASSIFY, CLASSIFY_EXTRA_ALLOCS),
    ] {
        let added = allocs(name) - bare;
        assert!(
            (added - extra).abs() <= SLACK,
            "{name}: {added:.3} allocations per request over the bare service, not {extra}"
        );
    }
}

/// No allocation on the Pro stack's success path is too large for glibc's per-thread cache
/// (`alloc::THREAD_CACHE_MAX_BYTES`): the retry layer's call (its template, state and the
/// attempt's future, one block) was 1,056 bytes until `8df0c9c`, and each request paid about
/// 180 instructions more for that `malloc` and its `free`. A layer below the retry layer whose
/// future grows pushes the block over again without a change of the retry layer's: this
/// names it. (A rare large one, a table growing, is allowed: under one in a thousand requests.)
#[test]
fn no_allocation_per_request_is_too_large_for_the_allocators_thread_cache() {
    let _alone = alone();
    let large =
        overhead::large_allocations_per_request(overhead::PRO_STACK, 2_000).expect("a subject");
    assert!(
        large < 0.001,
        "{}: {large:.3} allocations per request of more than {} bytes",
        overhead::PRO_STACK,
        kling_bench::alloc::THREAD_CACHE_MAX_BYTES
    );
}

/// The allocations counted per request are the requests' alone: the same over 100 lives as
/// over 2,000. When the count took in the building of the service and the timing's own reads
/// of `/proc` (the warm-up ran on another instance), 100 lives read about 0.5 allocations a
/// request more than 2,000 did, and every row of the column carried a share of its build.
#[test]
fn allocations_per_request_do_not_depend_on_how_many_are_counted() {
    let _alone = alone();
    for name in [overhead::BARE, overhead::CLASSIFY, overhead::PRO_STACK] {
        let (few, few_bytes) = overhead::allocations_per_request(name, 100).expect("a subject");
        let (many, many_bytes) = overhead::allocations_per_request(name, 2_000).expect("a subject");
        assert!(
            (few - many).abs() < 0.02 && (few_bytes - many_bytes).abs() < 16.0,
            "{name}: {few:.3} allocations ({few_bytes:.0} bytes) a request over 100 lives, \
             {many:.3} ({many_bytes:.0}) over 2,000"
        );
    }
}
