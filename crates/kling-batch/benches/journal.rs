//! Opening and closing a journal of 100 000 jobs. The open writes a mark into the main file
//! (a commit and a checkpoint) and the close clears it, so that a copy of a journal left
//! open, without its `-wal`, is refused: this measures what that costs each run.

use criterion::{Criterion, criterion_group, criterion_main};
use kling_batch::jobs::parse_jobs;
use kling_batch::journal::Journal;

/// As many jobs as a large batch holds.
const JOBS: usize = 100_000;

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("kb-bench-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    let path = dir.join("journal.sqlite");
    let text: String = (0..JOBS)
        .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"shot {i}\"}}\n"))
        .collect();
    let (jobs, _) = parse_jobs(&text);
    Journal::open(&path)
        .and_then(|journal| journal.register(&jobs).map(|_| ()))
        .expect("a journal of 100 000 jobs");

    let mut group = c.benchmark_group("journal_100k");
    group.sample_size(20);
    group.bench_function("open_and_close", |b| {
        b.iter(|| drop(Journal::open(&path).expect("the journal opens")))
    });
    // The file opened and closed as the journal opens it, with neither the mark nor the
    // tables' check: the difference is what the journal adds.
    group.bench_function("sqlite_open_and_close", |b| {
        b.iter(|| {
            let conn = rusqlite::Connection::open(&path).expect("the file opens");
            for (pragma, value) in [
                ("locking_mode", "EXCLUSIVE"),
                ("journal_mode", "WAL"),
                ("synchronous", "FULL"),
            ] {
                conn.pragma_update(None, pragma, value).expect("a pragma");
            }
            conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
                .expect("the lock");
            drop(conn);
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
