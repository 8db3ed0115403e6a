//! Smoke tests of the runner with tiny sizes: every section runs, and what it measures holds
//! the properties the published tables rely on. (Timings are not asserted: this is a test,
//! not a benchmark.)

mod smoke;
