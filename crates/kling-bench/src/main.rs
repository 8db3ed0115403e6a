//! `kling-bench`: runs the sections and prints their tables (Markdown) on stdout.
//!
//! ```text
//! kling-bench [all|overhead|goodput|scale|sockets] [--quick] [--out FILE]
//! kling-bench profile <subject name part> [lives] [tasks]   # one overhead subject, for a profiler
//! kling-bench handover                                      # ns for a line between threads
//! kling-bench instructions [lives]                          # callgrind counts per request
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

use kling_bench::{goodput, instructions, overhead, report, scale, sockets};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let section = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or("all", String::as_str);
    if section == "profile" {
        let name = args.get(1).map_or("", String::as_str);
        let lives = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(20_000);
        let tasks = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1);
        match overhead::profile(name, lives, tasks) {
            Some(sample) => println!("{sample:?}"),
            None => {
                eprintln!("no subject named like `{name}`");
                std::process::exit(2);
            }
        }
        return;
    }
    if section == "instructions" {
        let lives = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(4_000);
        let exe = std::env::current_exe().unwrap_or_else(|e| {
            eprintln!("cannot find this program's own path: {e}");
            std::process::exit(1);
        });
        match instructions::run(&exe, lives, &mut |line| eprintln!("{line}")) {
            Ok(rows) => print!("{}", report::instructions(&rows, lives)),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if section == "handover" {
        println!("{:.0}", kling_bench::cpu::line_handover_ns(20_000));
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1));
    let all = section == "all";
    if !all && !["overhead", "goodput", "scale", "sockets"].contains(&section) {
        eprintln!(
            "usage: kling-bench [all|overhead|goodput|scale|sockets] [--quick] [--out FILE]\n       \
             kling-bench profile <subject> [lives] [tasks] | handover | instructions [lives]"
        );
        std::process::exit(2);
    }
    let mut log = |line: &str| eprintln!("{line}");
    let mut text = format!("{}\n\n", kling_bench::machine());
    if all || section == "overhead" {
        let mut options = overhead::Options::full();
        if quick {
            options.rounds = 3;
            options.lives = 5_000;
        }
        let r = overhead::run(options, &mut log);
        text.push_str(&format!("## Overhead\n\n{}\n", report::overhead(&r)));
    }
    if all || section == "goodput" {
        let mut options = goodput::Options::full();
        if quick {
            options.waves = 20;
        }
        let mut runs = goodput::run(options, &mut log);
        // The negative controls of the cells that claim nothing was refused.
        runs.extend(goodput::controls(options, &mut log));
        text.push_str(&format!("## Goodput\n\n{}\n", report::goodput(&runs)));
    }
    if all || section == "scale" {
        let mut options = scale::Options::full();
        if quick {
            options.waiters = 10_000;
            options.decisions = 50_000;
        }
        let r = scale::run(options, &mut log);
        text.push_str(&format!("## Scale\n\n{}\n", report::scale(&r)));
    }
    if all || section == "sockets" {
        let mut options = sockets::Options::full();
        if quick {
            options.rounds = 5;
            options.lives = 500;
        }
        text.push_str("## Real sockets\n\n");
        for workers in [1, 2] {
            let options = sockets::Options { workers, ..options };
            let rows = sockets::run(options, &mut log);
            text.push_str(&format!("{}\n", report::sockets(&rows, options)));
        }
    }
    print!("{text}");
    if let Some(path) = out
        && let Err(e) = std::fs::write(path, &text)
    {
        eprintln!("cannot write {path}: {e}");
        std::process::exit(1);
    }
}
