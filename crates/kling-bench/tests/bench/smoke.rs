use kling_bench::{goodput, instructions, overhead, report, scale, sockets};

use crate::alone;

#[test]
fn overhead_measures_every_subject_in_one_run() {
    let _alone = alone();
    let r = overhead::run(overhead::Options::tiny(), &mut |_| {});
    for name in [
        overhead::BARE,
        overhead::CLASSIFY,
        overhead::PASS_THROUGH,
        overhead::PRO_STACK,
        overhead::TOWER,
        overhead::TOWER_BUFFERED,
    ] {
        let row = r.row(name).unwrap_or_else(|| panic!("no row {name}"));
        assert!(row.single_ns() > 0.0, "{name}");
    }
    assert!(r.row(overhead::TOWER).unwrap().multi.is_none());
    assert!(r.row(overhead::PRO_STACK).unwrap().multi_ns().unwrap() > 0.0);
    // The classify step allocates for what it parses; the bare service does not parse.
    let bare = r.row(overhead::BARE).unwrap();
    let classify = r.row(overhead::CLASSIFY).unwrap();
    assert!(classify.allocs > bare.allocs);
    assert!(r.serde_create > 0.0 && r.outcome_create > 0.0);
    assert!(r.handover_ns.0 > 0.0 && r.handover_ns.1 > 0.0);
    let table = report::overhead(&r);
    assert!(table.contains(overhead::PRO_STACK));
}

#[test]
fn goodput_judges_the_stack_by_the_mock() {
    let _alone = alone();
    let options = goodput::Options::tiny();
    let plain = goodput::run_one(
        kling_mock::Preset::Pro,
        goodput::Scenario::Plain,
        goodput::Client::Kling,
        options,
    );
    assert_eq!(plain.completed, plain.jobs);
    assert_eq!(plain.rejected(), 0);
    assert_eq!(plain.duplicates, 0);
    assert!(
        plain.efficiency() > 0.5 && plain.efficiency() <= 1.0,
        "{plain:?}"
    );

    let credits = |client| {
        goodput::run_one(
            kling_mock::Preset::Free,
            goodput::Scenario::Credits,
            client,
            goodput::Options {
                waves: 80,
                ..options
            },
        )
    };
    let ours = credits(goodput::Client::Kling);
    assert!(ours.refused > 0, "the credits ran out: {ours:?}");
    assert_eq!(ours.after_1102, 0);
    assert_eq!(ours.lost, 0);
    // The negative control: tower's simple 429 retry keeps creating after the 1102.
    let tower = credits(goodput::Client::Tower);
    assert!(tower.after_1102 > 0, "{tower:?}");
}

#[test]
fn scale_serves_waiters_in_arrival_order() {
    let _alone = alone();
    let r = scale::run(scale::Options::tiny(), &mut |_| {});
    assert_eq!(r.waiters.len(), 2);
    for w in &r.waiters {
        assert_eq!(w.out_of_order, 0, "{w:?}");
        assert!(w.bytes_per_waiter > 0.0, "{w:?}");
    }
    assert_eq!(r.followed.0, scale::Options::tiny().tasks);
    let [shared, apart] = r.follower;
    assert_eq!((shared.0, apart.0), (20, 20), "{:?}", r.follower);
    // Twenty calls on one follower's clones share batch queries; a follower each does not.
    assert!(shared.2 * 4 <= apart.2, "{:?}", r.follower);
    // The GCRA decision at 1 key and at the options' most (50): both timed, by the thread's
    // exact CPU clock (`cpu::thread`), so even the tiny run's millisecond of decisions shows.
    let counts: Vec<usize> = r.keys.iter().map(|&(keys, _)| keys).collect();
    assert_eq!(counts, [1, scale::Options::tiny().keys]);
    assert!(
        r.keys.iter().all(|&(_, ns)| ns.is_finite() && ns > 0.0),
        "{:?}",
        r.keys
    );
    assert!(report::scale(&r).contains("GcraLayer"));
    // The control the table prints: the LIFO gate's waiters are served out of order.
    assert_eq!(r.lifo_control.1, scale::Options::tiny().waiters);
    assert!(
        r.lifo_control.0 >= r.lifo_control.1 - 1,
        "{:?}",
        r.lifo_control
    );
    // And the bytes check's: the ballast is seen, to the byte.
    let (with, without) = r.bytes_control;
    assert!(
        (with - without - scale::BALLAST as f64).abs() < 0.5,
        "{:?}",
        r.bytes_control
    );
    assert!(report::scale(&r).contains("bytes of ballast"));
}

/// The order check can fail: the same driver finds the requests a deliberately
/// last-in-first-out gate lets through out of arrival order (all of them but perhaps the
/// middle one), and none through the same gate first-in-first-out.
#[test]
fn the_order_check_fails_for_an_unfair_gate() {
    let _alone = alone();
    assert!(scale::arrival_order_control(200, true) >= 199);
    assert_eq!(scale::arrival_order_control(200, false), 0);
}

#[test]
fn sockets_compare_each_client_with_itself_bare() {
    let _alone = alone();
    let mut log = Vec::new();
    let rows = sockets::run(sockets::Options::tiny(), &mut |line| {
        log.push(line.to_owned())
    });
    assert_eq!(rows.len(), 4);
    for row in &rows {
        assert!(row.rps() > 0.0, "{row:?}");
        assert!(!row.latencies.is_empty());
    }
    // Each life's query saw its task end, so the stacks hold no slot, as a real client's
    // would not after following its tasks.
    assert!(
        log.iter()
            .any(|line| line.starts_with("sockets: slots the stacks still hold: 0 ")),
        "{log:?}"
    );
}

/// Each subject's instructions are counted under callgrind, through the binary itself: the
/// stack does more per request than the classify step alone, which does more than the bare
/// service. (valgrind is on every machine of this kind and `scripts/test` installs it where it
/// is missing; under `CI=true` its absence fails the test.)
#[test]
fn instructions_are_counted_per_request_under_callgrind() {
    let _alone = alone();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_kling-bench"));
    let names = [overhead::BARE, overhead::CLASSIFY, overhead::PRO_STACK];
    let rows = match instructions::run_subjects(exe, &names, 20, &mut |_| {}) {
        Err(instructions::Error::Valgrind(e)) if !crate::on_ci() => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("skipping: cannot start valgrind ({e}); on CI this fails");
            }
            return;
        }
        rows => rows.expect("each subject counted"),
    };
    let count = |name: &str| {
        rows.iter()
            .find(|row| row.name == name)
            .unwrap_or_else(|| panic!("no row {name}"))
            .per_request
    };
    let (bare, classify, stack) = (
        count(overhead::BARE),
        count(overhead::CLASSIFY),
        count(overhead::PRO_STACK),
    );
    assert!(bare > 0.0, "{rows:?}");
    assert!(classify > bare && stack > classify, "{rows:?}");
    assert_eq!(
        rows.iter()
            .find(|r| r.name == overhead::CLASSIFY)
            .unwrap()
            .baseline,
        Some(overhead::BARE)
    );
    assert!(report::instructions(&rows, 20).contains(overhead::PRO_STACK));
}

/// A name no subject has is an error that names it, not a count of nothing.
#[test]
fn an_unknown_subject_is_not_counted() {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_kling-bench"));
    match instructions::run_subjects(exe, &["no such subject"], 1, &mut |_| {}) {
        Err(instructions::Error::Valgrind(_)) if !crate::on_ci() => {}
        Err(e @ instructions::Error::Failed { .. }) => {
            assert!(e.to_string().contains("no such subject"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}
