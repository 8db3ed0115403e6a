//! Reliability: kling-tower keeps working and loses nothing under bad input, faults,
//! cancellation and attack, and never shows a secret.
//!
//! - `corpus`: every committed fuzz corpus file, replayed through the fuzz targets' checks;
//! - `secrets`: keys, secrets and JWTs stay out of `Debug`, `Display`, logs, spans, metric
//!   labels and error messages;
//! - `bounds`: every buffer and keyed map has a bound, and each bound is tested;
//! - `faults`: the composed stack over real TCP against `kling-mock` with faults injected
//!   (real time, mock and stack sped up by the same factor);
//! - `cancellation`: 10,000 requests against the in-process mock in paused time, a random share
//!   dropped at random points; afterwards every limiter is idle and the mock agrees.
//!
//! SECURITY.md at the workspace root states each guarantee with the test that checks it.

mod support;

mod bounds;
mod cancellation;
mod corpus;
mod faults;
mod secrets;
