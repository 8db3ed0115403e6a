//! Markdown tables of every section.

use std::fmt::Write as _;

use crate::{goodput, instructions, overhead, scale, sockets};

fn ns(value: f64) -> String {
    format!("{value:.0}")
}

fn signed(value: f64) -> String {
    format!("{value:+.0}")
}

/// The bare service and tower's shareable stack a subject is set against: called the way the
/// subject is (a row cloned per request against those cloned per request too).
fn references(name: &str) -> (&'static str, &'static str) {
    if name.ends_with(overhead::WAITS) {
        (overhead::BARE_WAITS, overhead::TOWER_BUFFERED_WAITS)
    } else if name.ends_with(overhead::CLONED) {
        (overhead::BARE_CLONED, overhead::TOWER_BUFFERED_CLONED)
    } else {
        (overhead::BARE, overhead::TOWER_BUFFERED)
    }
}

/// The overhead tables.
pub fn overhead(report: &overhead::Report) -> String {
    let mut out = String::new();
    let base = |name: Option<&'static str>| name.and_then(|n| report.row(n));
    let _ = writeln!(
        out,
        "Process CPU ns per request (median of {} interleaved rounds; {} create+query lives per \
         subject per round; 2-worker runtime). \"+\" is over the row named in \"over\": the median \
         of the rounds' differences (the subjects take turns within each round, so a change in the \
         machine's load between rounds falls on both sides of a difference). \"× tower\" is the median of the rounds' ratios of \
         the subject's added cost over the bare service to tower's shareable stack's; \
         rows \"cloned per request\" send each request through a clone made for it \
         (`service.clone().oneshot(request)`) and are set against the bare service and tower's \
         stack called that way. A cache line handed between two threads took {:.0} ns before \
         the rounds and {:.0} ns after them (`cpu::line_handover_ns`): where it is several times \
         the usual, every line the 64-task runs share between the workers costs that much \
         more.\n",
        report.rounds, report.lives, report.handover_ns.0, report.handover_ns.1
    );
    let _ = writeln!(
        out,
        "| subject | over | 1 task ns/req | + ns | {t} tasks ns/req | + ns | × tower (1 / {t}) | allocs/req | bytes/req | future B |",
        t = report.tasks
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let against = |row: &overhead::Row| {
        let (bare, tower) = references(&row.name);
        (report.row(bare), report.row(tower))
    };
    let plus = |row: &overhead::Row, over: Option<&overhead::Row>, multi: bool| {
        over.and_then(|o| row.paired_added(o, multi))
            .map_or(String::new(), signed)
    };
    let times_tower = |row: &overhead::Row, multi: bool| {
        let (bare, tower) = against(row);
        bare.zip(tower)
            .and_then(|(bare, tower)| row.paired_ratio(bare, tower, multi))
            .map_or("–".to_owned(), |r| format!("{r:.2}"))
    };
    for row in &report.rows {
        let over = base(row.baseline);
        let plus_single = plus(row, over, false);
        let plus_multi = plus(row, over, true);
        let ratio = if row.baseline.is_some() {
            format!("{} / {}", times_tower(row, false), times_tower(row, true))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {} |",
            row.name,
            row.baseline.unwrap_or(""),
            ns(row.single_ns()),
            plus_single,
            row.multi_ns().map_or("–".to_owned(), ns),
            plus_multi,
            ratio,
            row.allocs,
            row.bytes,
            row.future_bytes
        );
    }
    let _ = writeln!(
        out,
        "| governor `check` alone (per check) | | {} | | {} | | | 0 | 0 | |",
        ns(report.governor.0),
        ns(report.governor.1)
    );
    let _ = writeln!(out, "\nWall-clock ns per request (same runs, median):\n");
    let _ = writeln!(out, "| subject | 1 task | {} tasks |", report.tasks);
    let _ = writeln!(out, "|---|---:|---:|");
    for row in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            row.name,
            ns(row.single_wall()),
            row.multi_wall().map_or("–".to_owned(), ns)
        );
    }
    let _ = writeln!(
        out,
        "\nReading an envelope, CPU ns per parse on one thread (median):\n\n\
         | envelope | plain typed serde_json | `Outcome::parse` (what ClassifyLayer does) |\n\
         |---|---:|---:|\n\
         | create (230 bytes) | {} | {} |\n\
         | query (360 bytes) | {} | {} |",
        ns(report.serde_create),
        ns(report.outcome_create),
        ns(report.serde_query),
        ns(report.outcome_query)
    );
    out
}

/// The goodput tables.
pub fn goodput(runs: &[goodput::Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\"bound\" is a lower bound on the makespan from the limits and the lives of the tasks \
         of the jobs that completed (refused and lost jobs are not in it, though the makespan \
         covers them): the larger of the slots' bound (each life rounded up to the next poll, \
         plus one rate interval before a slot's next create; unrounded for a task the client \
         learned of from a lookup by its external id, which it polls off that grid; with the \
         slots unknown, the lives alone, since a client that creates blind can take a slot \
         before any poll sees it free) \
         and the rate's ((requests those \
         jobs need − 1) ÷ rate). With an outage, no request succeeds during it: the rate's \
         bound grows by the outage less one rate interval, and each slot's by the outage less \
         the longest time one completed task counts for (the task a slot held when the outage \
         began may run through it), so the efficiency judges what the client lost around the \
         outage, not the outage itself. \"efficiency\" is bound ÷ makespan; since the bound counts \
         only completed jobs, a client that gives jobs up can score well on it, so \"completed/h\" \
         (completed jobs per hour of makespan) sets the clients side by side. \"rate use\" is \
         (requests the rate let through − 1) ÷ rate ÷ makespan: requests refused as too fast \
         (1302) and connections dropped before the server saw them use none of the rate. \
         \"duplicate creates\" are the tasks the server created less the distinct tasks the \
         completed jobs ended on. † Polling every second asks for more than the rate \
         carries: the bound counts one poll per job (the least any client sends), so the \
         efficiency is shown but not judged, and the target there is the rate kept busy \
         (rate use). \"creates after a 1102\" counts creates (not queries, which must go on for \
         the tasks still running) sent to the server after the account's first 1102 had come \
         back to the client (in process nothing is on its way, so no grace). The rows \
         \"bare (control)\" send the same jobs with no limiter and no retry to the same mock, \
         in each cell with the limits known (where the target \
         is 429s on under 1% of the requests): the server there refuses a client that does not \
         keep to the limits, so a client's 0% is its own doing. \
         \"early requests\" counts the requests sent before a `Retry-After` they fall under had \
         passed, counted where the jobs reach the mock and read as a client reads it (from \
         the answer's arrival, an HTTP-date against the answer's `Date`): after a 1302's, any \
         request (the server's rate counts every request of the account, so a query sent \
         during a create's pause is refused too); after a 1303's, creates only. In brackets, \
         the answers that carried one and the longest wait one asked for (\"–\": none did); a \
         client that keeps to a pace slower than that wait sends no early request whether it \
         reads the header or not.\n"
    );
    let _ = writeln!(
        out,
        "| preset | scenario | client | limits known | jobs | completed | refused (fatal) | lost (gave up) | makespan s | bound s | efficiency | completed/h | rate use | requests | 429s by code | 429 share | creates after a 1102 | duplicate creates | early requests (Retry-Afters; longest wait) |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    );
    for r in runs {
        let codes = if r.rejections.is_empty() {
            "–".to_owned()
        } else {
            r.rejections
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.1}%{} | {:.0} | {} | {} | {} | {:.2}% | {} | {} | {} |",
            r.preset,
            r.scenario,
            r.client,
            if r.limits_known { "yes" } else { "no" },
            r.jobs,
            r.completed,
            r.refused,
            r.lost,
            r.makespan,
            r.bound,
            r.efficiency() * 100.0,
            if r.judged_by_efficiency() { "" } else { " †" },
            r.completed as f64 * 3600.0 / r.makespan.max(f64::MIN_POSITIVE),
            r.rate_use()
                .map_or("–".to_owned(), |u| format!("{:.1}%", u * 100.0)),
            r.requests,
            codes,
            r.rejected() as f64 * 100.0 / r.requests.max(1) as f64,
            r.after_1102,
            r.duplicates,
            if r.retry_afters == 0 {
                "–".to_owned()
            } else {
                format!(
                    "{} ({}; ≤ {:.1} s)",
                    r.early, r.retry_afters, r.longest_retry_after
                )
            }
        );
    }
    out
}

/// The scale tables.
pub fn scale(report: &scale::Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| limiter | queued waiters | limiter bytes per waiter | response future (caller's) bytes | CPU s to queue all | CPU s to serve all | served out of order | CPU s for all to give up, in random order |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for w in &report.waiters {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {} | {:.3} | {:.3} | {} | {:.3} |",
            w.limiter,
            w.count,
            w.bytes_per_waiter,
            w.future_bytes,
            w.queue_cpu_s,
            w.serve_cpu_s,
            w.out_of_order,
            w.give_up_cpu_s
        );
    }
    let _ = writeln!(
        out,
        "\nThe waiters are served all at once, each a task of its own spawned newest first; the \
         inner service counts the requests it sees out of arrival order. Control: through a \
         deliberately last-in-first-out gate, {} of {} waiters are served out of order. \
         Control of the bytes: the same driver measures {:.1} bytes per waiter through a gate \
         whose waiters each hold {} bytes of ballast, and {:.1} through it without.",
        report.lifo_control.0,
        report.lifo_control.1,
        report.bytes_control.0,
        scale::BALLAST,
        report.bytes_control.1
    );
    let _ = writeln!(
        out,
        "\n| GCRA decision (GcraLayer over classify, one thread; keys round robin, requests built outside the timing) | CPU ns per request | + over 1 key |\n|---|---:|---:|"
    );
    let one = report.keys.first().map_or(0.0, |&(_, ns)| ns);
    for &(keys, cost) in &report.keys {
        let _ = writeln!(
            out,
            "| {keys} key{} | {} | {} |",
            if keys == 1 { "" } else { "s" },
            ns(cost),
            signed(cost - one)
        );
    }
    let (tasks, makespan, requests, cpu, peak) = report.followed;
    let _ = writeln!(
        out,
        "\n| concurrent tasks followed to the end (paused time, Enterprise, whole stack + in-process mock) | |\n|---|---:|\n| tasks completed | {tasks} |\n| makespan (simulated) | {makespan:.0} s |\n| requests | {requests} |\n| CPU time, stack + mock | {:.3} s ({:.1} µs per request) |\n| peak heap growth during the run (allocator high-water mark, from after the stack and mock were built) | {:.1} MiB |",
        cpu,
        cpu * 1e6 / requests.max(1) as f64,
        peak as f64 / (1024.0 * 1024.0)
    );
    let [shared, apart] = report.follower;
    let _ = writeln!(
        out,
        "\n| new-style tasks, one `Follower::follow` call each (paused time, Enterprise, whole stack + in-process mock, the preset's follow policy) | clones of one follower | a follower each (control) |\n|---|---:|---:|\n| tasks completed | {} | {} |\n| makespan (simulated) | {:.0} s | {:.0} s |\n| queries | {} | {} |\n| CPU time, stack + follower + mock | {:.3} s | {:.3} s |",
        shared.0, apart.0, shared.1, apart.1, shared.2, apart.2, shared.3, apart.3
    );
    out
}

/// The real-socket table.
pub fn sockets(rows: &[sockets::Row], options: sockets::Options) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "**{} client worker thread{}.** {} interleaved rounds × {} create+query lives, {} concurrent \
         tasks; client CPU is the client runtime's threads only (the mock runs on its own thread).\n",
        options.workers,
        if options.workers == 1 { "" } else { "s" },
        options.rounds,
        options.lives,
        options.concurrency
    );
    let _ = writeln!(
        out,
        "| client | client CPU µs/request (median) | + over bare (median of the rounds' differences) | requests/s (median) | p50 µs | p99 µs |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for (i, row) in rows.iter().enumerate() {
        let plus = if i % 2 == 1 {
            format!("{:+.2}", row.cpu_over(&rows[i - 1]))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {:.0} | {:.0} | {:.0} |",
            row.name,
            row.cpu(),
            plus,
            row.rps(),
            row.latency(0.5),
            row.latency(0.99)
        );
    }
    out
}

/// The instruction counts' table.
pub fn instructions(rows: &[instructions::Row], lives: usize) -> String {
    let mut out = String::new();
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let _ = writeln!(
        out,
        "Instructions per request (`valgrind --tool=callgrind`; the difference between runs of {} \
         and {} create+query lives, one driver task). \"+\" is over the row named in \"over\"; \
         \"× tower\" is the subject's added count over the bare service divided by tower's \
         shareable stack's (rows cloned per request: over the same called that way). Counts are \
         blind to cache misses and to the kernel, where most of the cost of tower's `Buffer` \
         (a hand-over to another thread) lies: the overhead section's times compare the stacks.\n",
        lives,
        2 * lives
    );
    let _ = writeln!(out, "| subject | over | instructions/req | + | × tower |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|");
    for row in rows {
        let over = row.baseline.and_then(find);
        let plus = over.map_or(String::new(), |o| signed(row.per_request - o.per_request));
        let (bare, tower) = references(&row.name);
        let (bare, tower) = (find(bare), find(tower));
        let ratio = match (bare, tower) {
            (Some(bare), Some(tower)) if row.baseline.is_some() => {
                let theirs = tower.per_request - bare.per_request;
                format!("{:.2}", (row.per_request - bare.per_request) / theirs)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.name,
            row.baseline.unwrap_or(""),
            ns(row.per_request),
            plus,
            ratio
        );
    }
    out
}
