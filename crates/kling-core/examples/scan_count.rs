//! Reads the bench's create and query envelopes N times through [`Outcome::parse_bytes`] (the
//! public path of what `ClassifyLayer` does), for counting instructions per envelope:
//!
//! ```text
//! cargo build --release -p kling-core --example scan_count
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null <exe> 20000 [create|query|both]
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null <exe> 40000 [create|query|both]
//! ```
//!
//! The difference of the two totals over 20,000 is the count per envelope (or per pair). The
//! envelopes are `kling-bench`'s fixtures for task 0 (`crates/kling-bench/src/fixtures.rs`).

use std::hint::black_box;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use kling_core::Outcome;
use tokio::time::Instant;

/// The bench's create answer for task 0 (230 bytes).
const CREATE: &str = r#"{"code":0,"message":"SUCCEED","request_id":"CjMkWmdH6zUAA-00000","data":{"task_id":"860000000000000000","task_status":"submitted","task_info":{"external_task_id":"job-00000"},"created_at":1722769557708,"updated_at":1722769557708}}"#;

/// The bench's query answer for task 0, ended with one video (360 bytes).
const QUERY: &str = r#"{"code":0,"message":"SUCCEED","request_id":"CjMkWmdH6zUAAAAAAJ9ucRxy-00000","data":{"task_id":"860000000000000000","task_status":"succeed","task_result":{"videos":[{"id":"v860000000000000000","url":"https://cdn.klingai.com/bs2/upload/860000000000000000.mp4","duration":"5.1"}]},"final_unit_deduction":"1","created_at":1722769557708,"updated_at":1722769627708}}"#;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|n| n.parse().ok())
        .expect("usage: scan_count N [create|query|both]");
    let which = args.next().unwrap_or_else(|| "both".to_owned());
    let (create, query) = match which.as_str() {
        "create" => (true, false),
        "query" => (false, true),
        "both" => (true, true),
        other => panic!("create, query or both, not {other}"),
    };
    let headers = HeaderMap::new();
    let now = Instant::now();
    // Static bytes: a clone is a copy of the handle, no reference count.
    let bodies = [
        Bytes::from_static(CREATE.as_bytes()),
        Bytes::from_static(QUERY.as_bytes()),
    ];
    for _ in 0..n {
        for (read, body) in [create, query].into_iter().zip(&bodies) {
            if read {
                let outcome = Outcome::parse_bytes(
                    StatusCode::OK,
                    black_box(&headers),
                    black_box(body.clone()),
                    now,
                )
                .expect("a well-formed envelope");
                black_box(&outcome);
            }
        }
    }
}
