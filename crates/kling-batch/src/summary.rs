//! The end-of-run summary: jobs by outcome, traffic, and efficiency against the bound the
//! account's limits allow.
//!
//! DESIGN.md's bound: a run can never finish sooner than
//! `max(task-seconds of each pool ÷ its slots, requests it must send ÷ allowed rate)`.
//! Efficiency is that bound divided by the measured makespan (1.0 = as fast as the account
//! allows). The demo takes the task-seconds from the mock's truth; a run against Kling takes
//! them from what it observed (create answer to end noticed), which can only make the bound
//! larger than the truth.
//!
//! ```
//! use std::collections::BTreeMap;
//! use kling_batch::summary::bound_secs;
//!
//! // 100 tasks of 90 s on 5 slots: 1800 s; 100 creates at 1 a second: 99 s.
//! let task_seconds = BTreeMap::from([("video".to_owned(), 9000.0)]);
//! let bound = bound_secs(&task_seconds, |_| 5, 100, Some(1.0));
//! assert_eq!(bound, 1800.0);
//! ```

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::journal::{JobRecord, JobState};
use crate::progress::is_429;
use crate::run::{FOLLOW_DEADLINE, NOT_YET_LISTED, PANICKED};

/// The lower bound on a run's makespan, in seconds: task-seconds of each pool over its slots,
/// and the intervals between the requests that must be sent at the allowed rate (per second;
/// `None` = no cap): the first goes at once, so `n` requests take `(n - 1) / rate`, and a run
/// that sent one create and stopped has no rate bound (its efficiency is `None`, not above 1).
pub fn bound_secs(
    task_seconds: &BTreeMap<String, f64>,
    slots_of: impl Fn(&str) -> u32,
    requests: u64,
    rate_per_sec: Option<f64>,
) -> f64 {
    let slots_bound = task_seconds
        .iter()
        .map(|(pool, secs)| secs / f64::from(slots_of(pool).max(1)))
        .fold(0.0, f64::max);
    let rate_bound = match rate_per_sec {
        Some(rate) if rate > 0.0 => requests.saturating_sub(1) as f64 / rate,
        _ => 0.0,
    };
    slots_bound.max(rate_bound)
}

/// `1101 account in arrears`: a Kling code and what it means.
fn code_reason(code: i64) -> String {
    format!("{code} {}", kling_core::Code::from_i64(code).description())
}

/// The reason of an unfinished job whose follow panicked (a bug): its task exists at Kling,
/// and a run on the same journal follows it.
pub(crate) const PANIC_REASON: &str =
    "kling-batch panicked (a bug); the task exists: run again to follow it";

/// The reason of an unfinished job whose follow passed its deadline (a task that ran long or
/// hung, or queries that failed until then): its task exists at Kling, and a run on the same
/// journal follows it.
pub(crate) const DEADLINE_REASON: &str = "deadline passed; the task exists: run again to follow it";

/// The reason of an unfinished job whose follow stopped on an error without a Kling code
/// (a task id that cannot be queried, say): its task exists at Kling, and a run on the same
/// journal follows it.
pub(crate) const FOLLOW_ERROR_REASON: &str = "an error; the task exists: run again to follow it";

/// The reason of a job of unknown create outcome whose create panicked (a bug): it may have
/// been sent, and a run on the same journal looks it up (the row above says so).
pub(crate) const CREATE_PANIC_REASON: &str = "kling-batch panicked (a bug) during the create";

/// The reason of a job of unknown create outcome that recorded none: its create was sent
/// and the run stopped or was killed before the answer (a lookup by the next run tells).
pub(crate) const UNANSWERED_REASON: &str = "sent, no answer recorded (stopped or killed)";

/// The reason of a job still `queued` when the summary is made: the run ended (it was
/// stopped while it planned, say) before it sent that job's create, and a rerun sends it.
pub(crate) const QUEUED_REASON: &str = "not submitted: the run ended before it reached them";

/// The longest reason the table shows whole; the results file and `--json` keep every reason
/// whole.
const REASON_CHARS: usize = 72;

/// The most reasons a group of jobs (`failed`, `not submitted`, …) is counted under: past
/// them, a run of thousands of distinct messages printed a row each. The reasons of most
/// jobs are kept, the others summed under [`OTHER_REASONS`]; the results file and the
/// journal keep each job's whole.
pub const REASON_ROWS: usize = 10;

/// The reason the jobs of the reasons past [`REASON_ROWS`] are summed under.
pub const OTHER_REASONS: &str = "other reasons";

/// Keeps the `REASON_ROWS - 1` reasons of `by_reason` that hold the most jobs (the first by
/// name among equals) and sums the others' jobs under [`OTHER_REASONS`], when there are
/// more than [`REASON_ROWS`]. Returns how many reasons were summed (0: none).
fn cut_reasons(by_reason: &mut BTreeMap<String, usize>) -> usize {
    if by_reason.len() <= REASON_ROWS {
        return 0;
    }
    // A message that reads `other reasons` is summed with the others, not lost, and the
    // rows kept are the reasons of most jobs besides it.
    let literal = by_reason.remove(OTHER_REASONS);
    let mut by_jobs: Vec<(String, usize)> = std::mem::take(by_reason).into_iter().collect();
    // Stable: equals stay in name order.
    by_jobs.sort_by_key(|(_, jobs)| std::cmp::Reverse(*jobs));
    let rest = by_jobs.split_off(REASON_ROWS - 1);
    let summed = rest.len() + usize::from(literal.is_some());
    let other: usize = rest.iter().map(|(_, n)| n).sum::<usize>() + literal.unwrap_or(0);
    by_reason.extend(by_jobs);
    by_reason.insert(OTHER_REASONS.to_owned(), other);
    summed
}

/// `reason`, cut to [`REASON_CHARS`] with `…` when longer (an error message can be long, and
/// the table's first column is as wide as its longest row).
fn shortened(reason: &str) -> std::borrow::Cow<'_, str> {
    match reason.char_indices().nth(REASON_CHARS) {
        Some((end, _)) => format!("{}…", &reason[..end]).into(),
        None => reason.into(),
    }
}

/// The reasons of `by_reason` as the table shows them, with their counts: each
/// [`shortened`], but whole where two would read alike (the messages of creates of open
/// outcome share their first hundred characters, and differ in the status at the end).
fn shown(by_reason: &BTreeMap<String, usize>) -> Vec<(std::borrow::Cow<'_, str>, &str, usize)> {
    let short: Vec<_> = by_reason.keys().map(|reason| shortened(reason)).collect();
    let mut readings: BTreeMap<&str, usize> = BTreeMap::new();
    for label in &short {
        *readings.entry(label).or_default() += 1;
    }
    by_reason
        .iter()
        .zip(&short)
        .map(|((reason, n), label)| {
            let label = if readings[label.as_ref()] > 1 {
                reason.as_str().into()
            } else {
                label.clone()
            };
            (label, reason.as_str(), *n)
        })
        .collect()
}

/// `message` as a reason to count jobs under: without the retry layer's tally (`after 6
/// attempts in 132.62ms (34.07ms backing off)`), whose times differ from job to job, nor the
/// create's external id (`(external id kb-…)`), each job's own, so that jobs refused alike
/// share one row, not one each. The results file keeps it whole.
fn reason_of(message: &str) -> String {
    without_external_ids(&without_tally(message))
}

/// `message` without the retry layer's ` (external id …)` (one id, no space in it).
fn without_external_ids(message: &str) -> String {
    const START: &str = " (external id ";
    let mut reason = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(START) {
        let after = &rest[start + START.len()..];
        match after.find(')').filter(|&end| {
            end > 0 && !after[..end].contains(|c: char| c.is_whitespace() || c == '(')
        }) {
            Some(end) => {
                reason.push_str(&rest[..start]);
                rest = &after[end + 1..];
            }
            None => {
                reason.push_str(&rest[..start + START.len()]);
                rest = after;
            }
        }
    }
    reason.push_str(rest);
    reason
}

/// `message` without the retry layer's tally (see [`reason_of`]).
fn without_tally(message: &str) -> String {
    const END: &str = " backing off)";
    let mut reason = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(" after ") {
        let tally = &rest[start..];
        let is_tally = tally[" after ".len()..].starts_with(|c: char| c.is_ascii_digit())
            && tally.contains(" attempt");
        match tally.find(END).filter(|_| is_tally) {
            Some(end) => {
                reason.push_str(&rest[..start]);
                rest = &tally[end + END.len()..];
            }
            None => {
                reason.push_str(&rest[..start + " after ".len()]);
                rest = &tally[" after ".len()..];
            }
        }
    }
    reason.push_str(rest);
    reason
}

/// The Kling code a reason begins with (`1102 resource pack …`), if any.
fn leading_code(reason: &str) -> Option<i64> {
    reason.split(' ').next()?.parse().ok()
}

/// What to do about jobs not submitted for `reason`: a refusal of the account or its
/// credentials comes back on a rerun until it is dealt with, so the table says how.
fn not_submitted_hint(reason: &str) -> &'static str {
    match leading_code(reason) {
        Some(1102) => "top up credits or the resource pack, then run again",
        Some(1100 | 1101) => "settle the account with Kling, then run again",
        Some(1000..=1002) => "check the keys and the --base-url region, then run again",
        Some(1103) => "get access to the model, then run again",
        Some(1304) => "allow this machine's IP for the account, then run again",
        _ => "run again to send",
    }
}

/// What to do about jobs failed for `reason`, when the job itself must change: a rerun does
/// not send a failed job again.
fn failed_hint(reason: &str) -> Option<&'static str> {
    match leading_code(reason) {
        Some(1300 | 1301) => Some("change the prompt or image, under a new id"),
        Some(1200..=1203) => Some("fix the job's fields, under a new id"),
        Some(1103) => Some("get access to the model, then a new id"),
        _ => None,
    }
}

/// What a run did, as the table and `--json` show it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Summary {
    /// Jobs in the file.
    pub jobs: usize,
    /// Lines of the file that were skipped as malformed (bad JSON, not UTF-8, a bad field):
    /// their jobs never ran.
    #[serde(default)]
    pub skipped_lines: usize,
    /// Jobs whose task succeeded with its result URLs.
    pub ok: usize,
    /// Jobs whose task succeeded, but whose report (and a query of it) named no result URL
    /// kling-batch could read: nothing to fetch or report. Not counted in `ok`; a later run
    /// on the same journal asks again.
    #[serde(default)]
    pub no_result_url: usize,
    /// Jobs that failed.
    pub failed: usize,
    /// Failed jobs by reason (`1301 content security check failed`, `task failed`, …).
    pub failed_by_reason: BTreeMap<String, usize>,
    /// Jobs never created (credits ran out, a wrong key, stopped).
    pub not_submitted: usize,
    /// Jobs never created, by reason (`1002 invalid key`, `1102 resource pack exhausted or
    /// expired`, `not submitted: the run was stopped`, …).
    #[serde(default)]
    pub not_submitted_by_reason: BTreeMap<String, usize>,
    /// Jobs created whose task was still running when the run ended (or could not be
    /// followed to its end).
    pub unfinished: usize,
    /// Unfinished jobs whose follow ended with an error, by reason (`1101 account in
    /// arrears`, `deadline passed; the task exists: …`, `kling-batch panicked
    /// (a bug); the task exists: …`): run again to follow them.
    #[serde(default)]
    pub unfinished_by_reason: BTreeMap<String, usize>,
    /// Succeeded jobs with a result file still missing after `--download` (run again to
    /// fetch it): a download that failed, or fewer files recorded than result URLs.
    #[serde(default)]
    pub downloads_missing: usize,
    /// Succeeded jobs with a result file the result server refused for good (`403`, `404`,
    /// `410`: an expired result URL): recorded once, not fetched again.
    #[serde(default)]
    pub downloads_gone: usize,
    /// Jobs whose create outcome is still unknown (looked up again by the next run).
    pub unknown: usize,
    /// Jobs of unknown create outcome whose create Kling refused, by the refusal's code
    /// (`1201 invalid parameter`): a refusal that may be Kling's answer to an id it has, and
    /// the lookup that would tell could not be made. The next run looks them up.
    #[serde(default)]
    pub unknown_by_reason: BTreeMap<String, usize>,
    /// Jobs of unknown create outcome whose create may have made a task (its answer lost, a
    /// `5000`, a timeout, a run stopped or killed while it waited), by what ended it
    /// (`5000 internal error`, `sent, no answer recorded (stopped or killed)`): not refused,
    /// their fate is open. The next run looks them up.
    #[serde(default)]
    pub unknown_open_by_reason: BTreeMap<String, usize>,
    /// How many reasons each `*_by_reason` map above sums under [`OTHER_REASONS`], by the
    /// map's name (`"failed_by_reason": 2991`): each keeps [`REASON_ROWS`] at most. Absent
    /// when no map was cut.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub other_reasons: BTreeMap<String, usize>,
    /// Logical calls through the stack (creates, queries, lookups).
    pub calls: u64,
    /// Requests sent to the server (retries included).
    pub requests: u64,
    /// Requests sent beyond each call's first: retries, re-signs
    /// ([`Counts::retries`](crate::tally::Counts::retries)) and the retry layer's lookups
    /// ([`Counts::extra`](crate::tally::Counts::extra)), so that `requests` is `calls -
    /// unsent_calls + retries`. A call refused before sending sent nothing and counts none
    /// (see `unsent_calls`).
    pub retries: u64,
    /// Logical calls that sent nothing: refused by the stack's own limiters (rate, slots,
    /// drain, budget) or given up at a stop while they waited
    /// ([`Counts::unsent`](crate::tally::Counts::unsent)).
    #[serde(default)]
    pub unsent_calls: u64,
    /// Creates sent.
    pub creates: u64,
    /// Answers by Kling code (`"0"`, `"1302"`, …); `"other"` sums the answers of codes
    /// outside Kling's table past the first 32 such codes.
    pub responses_by_code: BTreeMap<String, u64>,
    /// The HTTP 429 answers among them, by code; `"other"` sums those of codes past the
    /// first 56 such codes, so that the counts add up to every answer sent with 429.
    pub rejections_429: BTreeMap<String, u64>,
    /// Answers that were no Kling envelope (a proxy's, gateway's or WAF's own page), by HTTP
    /// status (`"404"`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pages_by_status: BTreeMap<String, u64>,
    /// From the first create to the last task's end, seconds.
    pub makespan_secs: f64,
    /// The fastest the account's limits allow, seconds.
    pub bound_secs: f64,
    /// Where the task durations of the bound came from (`mock` or `observed`).
    pub bound_basis: String,
    /// `bound_secs / makespan_secs` (1.0 = as fast as allowed); `None` when no task ran to
    /// its end (every create refused, say: the creates' pacing over the whole run is no
    /// measure of its speed).
    pub efficiency: Option<f64>,
    /// Whether the run was stopped before the end.
    pub interrupted: bool,
    /// What the server counted, when the server is the embedded mock (the demo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerTruth>,
}

/// The mock server's own counts, the truth a demo is judged by.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServerTruth {
    /// Tasks the server created.
    pub tasks_created: u64,
    /// Creates refused because their external id was used before (a duplicate create).
    pub duplicate_external_ids: u64,
    /// Creates received after the account's first 1102.
    pub creates_after_1102: u64,
    /// Pool → most slots one account held at once.
    pub max_concurrent: BTreeMap<String, u32>,
    /// Answers by Kling code.
    pub responses_by_code: BTreeMap<String, u64>,
    /// Pool → the created tasks' durations, seconds (the bound's input).
    pub task_seconds: BTreeMap<String, f64>,
}

impl ServerTruth {
    /// The truth in a mock's stats.
    pub fn from_stats(stats: &kling_mock::Stats) -> Self {
        ServerTruth {
            tasks_created: stats.tasks_created,
            duplicate_external_ids: stats.duplicate_external_ids,
            creates_after_1102: stats.creates_after_1102,
            max_concurrent: stats.max_concurrent.clone(),
            responses_by_code: stats.responses_by_code.clone(),
            task_seconds: stats.task_seconds.clone(),
        }
    }
}

impl Summary {
    /// Counts the jobs of `records` by state and reason.
    pub fn count_jobs(&mut self, records: &[JobRecord]) {
        self.jobs = records.len();
        for record in records {
            match record.state {
                JobState::Succeeded if record.urls.is_empty() => self.no_result_url += 1,
                JobState::Succeeded => {
                    self.ok += 1;
                    match &record.download_error {
                        Some(e) if e.message.starts_with(crate::download::GONE) => {
                            self.downloads_gone += 1;
                        }
                        Some(_) => self.downloads_missing += 1,
                        None => {}
                    }
                }
                JobState::Failed => {
                    self.failed += 1;
                    let reason = match &record.error {
                        Some(e) if e.code != 0 => code_reason(e.code),
                        Some(e) if e.message.starts_with("task failed") => "task failed".to_owned(),
                        Some(e) => reason_of(&e.message),
                        None => "unknown".to_owned(),
                    };
                    *self.failed_by_reason.entry(reason).or_default() += 1;
                }
                // Never reached by the run that ended (an earlier run's error, if any, is
                // stale: it was queued again).
                JobState::Queued => {
                    self.not_submitted += 1;
                    *self
                        .not_submitted_by_reason
                        .entry(QUEUED_REASON.to_owned())
                        .or_default() += 1;
                }
                JobState::NotSubmitted => {
                    self.not_submitted += 1;
                    if let Some(e) = &record.error {
                        let reason = if e.code != 0 {
                            code_reason(e.code)
                        } else {
                            reason_of(&e.message)
                        };
                        *self.not_submitted_by_reason.entry(reason).or_default() += 1;
                    }
                }
                JobState::Created => {
                    self.unfinished += 1;
                    let reason = match &record.error {
                        Some(e) if e.code != 0 => Some(code_reason(e.code)),
                        // The task exists (and may be billed): say so, and what to do.
                        Some(e) if e.message.starts_with(PANICKED) => Some(PANIC_REASON.to_owned()),
                        Some(e) if e.message.starts_with(FOLLOW_DEADLINE) => {
                            Some(DEADLINE_REASON.to_owned())
                        }
                        Some(_) => Some(FOLLOW_ERROR_REASON.to_owned()),
                        None => None,
                    };
                    if let Some(reason) = reason {
                        *self.unfinished_by_reason.entry(reason).or_default() += 1;
                    }
                }
                JobState::Creating => {
                    self.unknown += 1;
                    // A refusal stays one; any other end (a lost answer, a 5000, a timeout)
                    // may have made a task, and is not called refused.
                    let (refused, reason) = match &record.error {
                        Some(e) => match e.message.strip_prefix(NOT_YET_LISTED) {
                            Some(cause) => {
                                let cause = cause.trim_start_matches(": ");
                                let reason = match e.code {
                                    0 => reason_of(cause),
                                    code => code_reason(code),
                                };
                                (false, reason)
                            }
                            None if e.message.starts_with(PANICKED) => {
                                (false, CREATE_PANIC_REASON.to_owned())
                            }
                            None if e.code == 0 => (false, reason_of(&e.message)),
                            None => (
                                !kling_core::Code::from_i64(e.code).may_have_created(),
                                code_reason(e.code),
                            ),
                        },
                        None => (false, UNANSWERED_REASON.to_owned()),
                    };
                    let by_reason = if refused {
                        &mut self.unknown_by_reason
                    } else {
                        &mut self.unknown_open_by_reason
                    };
                    *by_reason.entry(reason).or_default() += 1;
                }
            }
        }
        for (name, by_reason) in [
            ("failed_by_reason", &mut self.failed_by_reason),
            ("not_submitted_by_reason", &mut self.not_submitted_by_reason),
            ("unfinished_by_reason", &mut self.unfinished_by_reason),
            ("unknown_by_reason", &mut self.unknown_by_reason),
            ("unknown_open_by_reason", &mut self.unknown_open_by_reason),
        ] {
            match cut_reasons(by_reason) {
                0 => {}
                summed => {
                    self.other_reasons.insert(name.to_owned(), summed);
                }
            }
        }
    }

    /// With `--download`: also counts under `downloads_missing` each succeeded job that
    /// records fewer files than result URLs without a `download_error` (its download was cut
    /// short before it was recorded, say), so such a run does not pass for complete.
    pub fn count_missing_files(&mut self, records: &[JobRecord]) {
        self.downloads_missing += records
            .iter()
            .filter(|r| {
                r.state == JobState::Succeeded
                    && r.download_error.is_none()
                    && r.files.len() < r.urls.len()
            })
            .count();
    }

    /// Sets the traffic counts from answers by code, and `other_codes` answers not counted by
    /// code. The retries are [`set_retries`](Self::set_retries)'s: `requests - calls` is no
    /// count of them, each call refused before sending hiding one.
    pub fn set_traffic(
        &mut self,
        calls: u64,
        requests: u64,
        by_code: &BTreeMap<i64, u64>,
        other_codes: u64,
    ) {
        self.calls = calls;
        self.requests = requests;
        self.responses_by_code = by_code.iter().map(|(c, n)| (c.to_string(), *n)).collect();
        if other_codes > 0 {
            self.responses_by_code
                .insert("other".to_owned(), other_codes);
        }
        self.rejections_429 = by_code
            .iter()
            .filter(|(c, _)| is_429(**c))
            .map(|(c, n)| (c.to_string(), *n))
            .collect();
    }

    /// Sets the HTTP 429 answers by code from what was sent with that status
    /// ([`Counts::rejections_429`](crate::tally::Counts::rejections_429)), in place of
    /// [`set_traffic`](Self::set_traffic)'s reading of the codes Kling's table sends with it,
    /// which left out an undocumented code under 429.
    /// `other`: the answers of codes past those kept by code
    /// ([`Counts::other_rejections_429`](crate::tally::Counts::other_rejections_429)), under
    /// `"other"`.
    pub fn set_rejections_429(&mut self, by_code: &BTreeMap<i64, u64>, other: u64) {
        self.rejections_429 = by_code
            .iter()
            .map(|(code, n)| (code.to_string(), *n))
            .collect();
        if other > 0 {
            self.rejections_429.insert("other".to_owned(), other);
        }
    }

    /// Sets the requests sent beyond each call's first (see [`retries`](Self::retries)) and
    /// the calls that sent nothing
    /// ([`Counts::unsent`](crate::tally::Counts::unsent)).
    pub fn set_retries(&mut self, retries: u64, unsent_calls: u64) {
        self.retries = retries;
        self.unsent_calls = unsent_calls;
    }

    /// Sets the answers that were no Kling envelope, by HTTP status.
    pub fn set_pages(&mut self, by_status: &BTreeMap<u16, u64>) {
        self.pages_by_status = by_status
            .iter()
            .map(|(status, n)| (status.to_string(), *n))
            .collect();
    }

    /// Sets the makespan and the bound, and the efficiency from them.
    pub fn set_timing(&mut self, makespan_secs: f64, bound_secs: f64, basis: &str) {
        self.makespan_secs = makespan_secs;
        self.bound_secs = bound_secs;
        self.bound_basis = basis.to_owned();
        self.efficiency =
            (makespan_secs > 0.0 && bound_secs > 0.0).then(|| bound_secs / makespan_secs);
    }

    /// The 429 answers of one code.
    pub fn rejections_of(&self, code: i64) -> u64 {
        self.rejections_429
            .get(&code.to_string())
            .copied()
            .unwrap_or(0)
    }
}

impl Summary {
    /// The table's rows of one group's reasons (`by_reason`, named `name` in `--json`): each
    /// reason as [`shown`], after `prefix`, with its jobs and what to do (`hint`); the jobs
    /// summed under [`OTHER_REASONS`] last, with how many reasons they hold.
    fn reason_rows(
        &self,
        rows: &mut Vec<(String, String)>,
        name: &str,
        by_reason: &BTreeMap<String, usize>,
        prefix: &str,
        hint: impl Fn(&str) -> Option<&'static str>,
    ) {
        let summed = self.other_reasons.get(name).copied();
        let mut other = None;
        for (label, reason, n) in shown(by_reason) {
            if summed.is_some() && reason == OTHER_REASONS {
                other = Some(n);
                continue;
            }
            rows.push((
                format!("  {prefix}{label}"),
                match hint(reason) {
                    Some(hint) => format!("{n} ({hint})"),
                    None => n.to_string(),
                },
            ));
        }
        if let (Some(n), Some(summed)) = (other, summed) {
            rows.push((
                format!("  {prefix}{OTHER_REASONS}"),
                format!("{n} ({summed} reasons; each job's is in the results file)"),
            ));
        }
    }
}

impl fmt::Display for Summary {
    /// The summary table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows: Vec<(String, String)> = vec![("jobs".into(), self.jobs.to_string())];
        if self.skipped_lines > 0 {
            rows.push((
                "lines skipped".into(),
                format!("{} (malformed: not run)", self.skipped_lines),
            ));
        }
        rows.push(("ok".into(), self.ok.to_string()));
        if self.no_result_url > 0 {
            rows.push((
                "succeeded, no result URL".into(),
                format!("{} (run again to ask for them)", self.no_result_url),
            ));
        }
        rows.push((
            "failed".into(),
            if self.failed > 0 {
                format!(
                    "{} (not sent again by a rerun: to try one again, give it a new id)",
                    self.failed
                )
            } else {
                "0".into()
            },
        ));
        self.reason_rows(
            &mut rows,
            "failed_by_reason",
            &self.failed_by_reason,
            "",
            failed_hint,
        );
        rows.push((
            "not submitted".into(),
            if self.not_submitted > 0 {
                format!("{} (never created: a rerun sends them)", self.not_submitted)
            } else {
                "0".into()
            },
        ));
        self.reason_rows(
            &mut rows,
            "not_submitted_by_reason",
            &self.not_submitted_by_reason,
            "",
            |reason| Some(not_submitted_hint(reason)),
        );
        if self.unfinished > 0 {
            rows.push((
                "still running".into(),
                format!("{} (run again to follow)", self.unfinished),
            ));
            self.reason_rows(
                &mut rows,
                "unfinished_by_reason",
                &self.unfinished_by_reason,
                "not followed: ",
                |_| None,
            );
        }
        if self.downloads_missing > 0 {
            rows.push((
                "downloads missing".into(),
                format!("{} (run again to fetch)", self.downloads_missing),
            ));
        }
        if self.downloads_gone > 0 {
            rows.push((
                "downloads gone".into(),
                format!(
                    "{} (result URLs refused for good, expired: not fetched again; \
                     --refetch-gone to try)",
                    self.downloads_gone
                ),
            ));
        }
        if self.unknown > 0 {
            rows.push((
                "create outcome unknown".into(),
                format!("{} (run again to look up)", self.unknown),
            ));
            self.reason_rows(
                &mut rows,
                "unknown_by_reason",
                &self.unknown_by_reason,
                "create refused: ",
                |_| None,
            );
            self.reason_rows(
                &mut rows,
                "unknown_open_by_reason",
                &self.unknown_open_by_reason,
                "create outcome unknown: ",
                |_| None,
            );
        }
        rows.push((
            "requests".into(),
            format!("{} ({} creates)", self.requests, self.creates),
        ));
        rows.push(("retries".into(), self.retries.to_string()));
        if self.unsent_calls > 0 {
            rows.push((
                "calls not sent".into(),
                format!(
                    "{} (refused by the stack's own limits, or stopped)",
                    self.unsent_calls
                ),
            ));
        }
        let mut rejections = String::new();
        for (code, n) in &self.rejections_429 {
            let _ = write!(
                rejections,
                "{}{code}×{n}",
                if rejections.is_empty() { "" } else { " " }
            );
        }
        rows.push((
            "429s by code".into(),
            if rejections.is_empty() {
                "none".into()
            } else {
                rejections
            },
        ));
        if !self.pages_by_status.is_empty() {
            let pages: Vec<String> = self
                .pages_by_status
                .iter()
                .map(|(status, n)| format!("http {status}×{n}"))
                .collect();
            rows.push(("not Kling answers".into(), pages.join(" ")));
        }
        rows.push(("makespan".into(), format!("{:.2} s", self.makespan_secs)));
        rows.push((
            "bound".into(),
            format!(
                "{:.2} s ({} task durations)",
                self.bound_secs, self.bound_basis
            ),
        ));
        rows.push((
            "efficiency".into(),
            self.efficiency.map_or_else(
                || "n/a (no task ran)".to_owned(),
                |e| format!("{:.1}%", e * 100.0),
            ),
        ));
        if self.interrupted {
            rows.push(("interrupted".into(), "yes: run again to resume".into()));
        }
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        for (key, value) in rows {
            writeln!(f, "{key:<width$}  {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A job's record in `state` with nothing else known, for a test to fill in what it needs.
    fn blank(state: JobState) -> JobRecord {
        JobRecord {
            job_id: String::new(),
            line: 0,
            endpoint: String::new(),
            external_id: String::new(),
            state,
            task_id: None,
            status: None,
            urls: Vec::new(),
            files: Vec::new(),
            error: None,
            download_error: None,
        }
    }

    proptest! {
        #[test]
        fn the_bound_is_never_below_either_limit(
            secs in proptest::collection::btree_map("[a-z]{1,6}", 0.0f64..1e6, 0..5),
            slots in 1u32..50,
            requests in 0u64..100_000,
            rate in 0.01f64..1e4,
        ) {
            let bound = bound_secs(&secs, |_| slots, requests, Some(rate));
            prop_assert!(bound >= requests.saturating_sub(1) as f64 / rate - 1e-9);
            for s in secs.values() {
                prop_assert!(bound >= s / f64::from(slots) - 1e-9);
            }
            let no_cap = bound_secs(&secs, |_| slots, requests, None);
            prop_assert!(no_cap <= bound);
        }
    }

    /// The first request goes at once: one create that was refused (a wrong key, say) sets no
    /// bound, so the run's efficiency cannot pass 1.
    #[test]
    fn the_rate_bound_counts_the_intervals_between_requests() {
        let none = BTreeMap::new();
        assert_eq!(bound_secs(&none, |_| 1, 1, Some(0.5)), 0.0);
        assert_eq!(bound_secs(&none, |_| 1, 3, Some(0.5)), 4.0);
        let mut s = Summary::default();
        s.set_timing(0.02, bound_secs(&none, |_| 1, 1, Some(0.5)), "observed");
        assert_eq!(s.efficiency, None);
    }

    #[test]
    fn jobs_not_submitted_are_counted_by_reason_and_long_reasons_are_cut_in_the_table() {
        use crate::journal::ErrorInfo;

        let record = |state, error: Option<ErrorInfo>| JobRecord {
            error,
            ..blank(state)
        };
        let page = format!(
            "answered by something other than Kling: {}",
            "x".repeat(100)
        );
        let records = [
            record(
                JobState::NotSubmitted,
                Some(ErrorInfo::new(1002, "invalid api key", None)),
            ),
            record(
                JobState::NotSubmitted,
                Some(ErrorInfo::new(1002, "not submitted: creates stopped", None)),
            ),
            record(JobState::NotSubmitted, Some(ErrorInfo::new(0, &page, None))),
            // Queued again by this run and never reached: an earlier run's error is stale.
            record(
                JobState::Queued,
                Some(ErrorInfo::new(1102, "earlier run", None)),
            ),
        ];
        let mut s = Summary::default();
        s.count_jobs(&records);
        assert_eq!(s.not_submitted, 4);
        assert_eq!(
            s.not_submitted_by_reason,
            BTreeMap::from([
                ("1002 invalid key".to_owned(), 2),
                (page.clone(), 1),
                (QUEUED_REASON.to_owned(), 1),
            ])
        );
        let table = s.to_string();
        assert!(table.contains("  1002 invalid key"), "{table}");
        assert!(!table.contains(&page), "{table}");
        assert!(
            table.contains(&format!("{}…", &page[..REASON_CHARS])),
            "{table}"
        );
    }

    /// A job still `queued` when the summary is made (its run was stopped before it reached
    /// it) is counted under a reason, and its row says what to do: it was counted under
    /// `not submitted` alone, with no row saying why it did not run.
    #[test]
    fn a_job_still_queued_is_counted_under_a_reason_that_says_to_run_again() {
        use crate::journal::ErrorInfo;

        let stopped = JobRecord {
            error: Some(ErrorInfo::new(
                0,
                "not submitted: the run was stopped",
                None,
            )),
            ..blank(JobState::NotSubmitted)
        };
        let records = [blank(JobState::Queued), blank(JobState::Queued), stopped];
        let mut s = Summary::default();
        s.count_jobs(&records);
        assert_eq!(s.not_submitted, 3);
        assert_eq!(
            s.not_submitted_by_reason.values().sum::<usize>(),
            s.not_submitted,
            "every job not submitted is under a reason: {s:?}"
        );
        assert_eq!(
            s.not_submitted_by_reason.get(QUEUED_REASON),
            Some(&2),
            "{s:?}"
        );
        let table = s.to_string();
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("  {QUEUED_REASON}  "))
                    && l.ends_with("2 (run again to send)")),
            "{table}"
        );
    }

    /// Thousands of failures of distinct messages: every group of reasons keeps
    /// [`REASON_ROWS`] at most, those of the most jobs, and sums the others' jobs in one row
    /// that says how many reasons it holds; `--json` the same. The failed rows were never
    /// cut (one row a message) while those of jobs not submitted were cut in length only.
    #[test]
    fn every_group_of_reasons_is_cut_to_the_rows_of_most_jobs_and_sums_the_rest() {
        use crate::journal::ErrorInfo;

        let distinct = 3000;
        let record = |state, code, message: String| JobRecord {
            error: Some(ErrorInfo::new(code, message, None)),
            ..blank(state)
        };
        let mut records: Vec<JobRecord> = (0..distinct)
            .map(|i| record(JobState::Failed, 0, format!("cannot read frame {i:04}")))
            .collect();
        records.extend((0..5).map(|_| record(JobState::Failed, 1301, "unsafe".to_owned())));
        records.extend(
            (0..distinct).map(|i| record(JobState::NotSubmitted, 0, format!("page {i:04}"))),
        );
        records.extend((0..2).map(|_| blank(JobState::Queued)));
        let mut s = Summary::default();
        s.count_jobs(&records);
        for (name, by_reason, jobs) in [
            ("failed_by_reason", &s.failed_by_reason, s.failed),
            (
                "not_submitted_by_reason",
                &s.not_submitted_by_reason,
                s.not_submitted,
            ),
        ] {
            assert_eq!(by_reason.len(), REASON_ROWS, "{name}");
            assert_eq!(by_reason.values().sum::<usize>(), jobs, "{name}");
            // The reason of most jobs is kept, then the first by name.
            let kept = REASON_ROWS - 2;
            assert_eq!(
                s.other_reasons.get(name),
                Some(&(distinct - kept)),
                "{name}"
            );
            assert_eq!(by_reason[OTHER_REASONS], distinct - kept, "{name}");
        }
        assert_eq!(s.failed_by_reason["1301 refused by content security"], 5);
        assert!(s.failed_by_reason.contains_key("cannot read frame 0000"));
        assert!(!s.failed_by_reason.contains_key("cannot read frame 2999"));
        assert_eq!(s.not_submitted_by_reason[QUEUED_REASON], 2);
        let table = s.to_string();
        assert!(table.lines().count() < 40, "{table}");
        let other = format!(
            "{} reasons; each job's is in the results file",
            distinct - 8
        );
        assert_eq!(table.matches(&other).count(), 2, "{table}");
        assert!(table.contains("change the prompt"), "{table}");
        let json: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(json, s);
        // Ten reasons or fewer: none cut.
        let mut few = Summary::default();
        few.count_jobs(&records[..REASON_ROWS]);
        assert_eq!(few.failed_by_reason.len(), REASON_ROWS);
        assert!(few.other_reasons.is_empty());
        assert!(!few.to_string().contains(OTHER_REASONS));
    }

    /// A message that reads `other reasons`, among the reasons of most jobs of a group that
    /// is cut, is summed on that row and counted among the reasons it holds, and the group
    /// keeps its ten rows: the row said one reason fewer than it summed, and the group
    /// showed nine.
    #[test]
    fn a_reason_that_reads_other_reasons_is_counted_among_those_summed() {
        use crate::journal::ErrorInfo;

        let record = |message: &str| JobRecord {
            error: Some(ErrorInfo::new(0, message, None)),
            ..blank(JobState::Failed)
        };
        let mut records: Vec<JobRecord> = (0..5).map(|_| record(OTHER_REASONS)).collect();
        records.extend((0..REASON_ROWS + 2).map(|i| record(&format!("frame {i:02}"))));
        let mut s = Summary::default();
        s.count_jobs(&records);
        assert_eq!(s.failed_by_reason.len(), REASON_ROWS);
        assert_eq!(s.failed_by_reason.values().sum::<usize>(), s.failed);
        // Kept: `frame 00` to `frame 08`; summed: `other reasons` and `frame 09` to `frame 11`.
        assert!(s.failed_by_reason.contains_key("frame 08"), "{s:?}");
        assert_eq!(s.failed_by_reason[OTHER_REASONS], 5 + 3);
        assert_eq!(s.other_reasons.get("failed_by_reason"), Some(&4), "{s:?}");
    }

    /// A failure's reason is cut in the table past [`REASON_CHARS`], as the other groups'
    /// are: a failed job showed a long message whole.
    #[test]
    fn a_long_failure_reason_is_cut_in_the_table() {
        use crate::journal::ErrorInfo;

        let message = format!("decoder said: {}", "y".repeat(200));
        let records = [JobRecord {
            error: Some(ErrorInfo::new(0, &message, None)),
            ..blank(JobState::Failed)
        }];
        let mut s = Summary::default();
        s.count_jobs(&records);
        assert_eq!(
            s.failed_by_reason[&message], 1,
            "the summary keeps it whole"
        );
        let table = s.to_string();
        assert!(!table.contains(&message), "{table}");
        assert!(
            table.contains(&format!("{}…", &message[..REASON_CHARS])),
            "{table}"
        );
    }

    /// Every job left `created` by a follow that ended with an error is counted under a
    /// reason: one whose error had no Kling code (a deadline, a task id that cannot be
    /// queried) had none, and showed under `still running` alone.
    #[test]
    fn every_job_left_created_by_an_error_is_counted_under_a_reason() {
        use crate::journal::ErrorInfo;

        let record = |error: Option<ErrorInfo>| JobRecord {
            task_id: Some("860000000000000001".to_owned()),
            error,
            ..blank(JobState::Created)
        };
        let error = |code, message: &str| Some(ErrorInfo::new(code, message, None));
        let records = [
            record(error(1101, "task 8600 not followed to its end: arrears")),
            record(error(0, &format!("{PANICKED} during the follow: boom"))),
            record(error(
                0,
                &format!("{FOLLOW_DEADLINE}: task 8600 did not end"),
            )),
            record(error(0, "cannot follow task \"8 6\": not a task id")),
            record(None),
        ];
        let mut s = Summary::default();
        s.count_jobs(&records);
        assert_eq!(s.unfinished, 5);
        assert_eq!(
            s.unfinished_by_reason,
            BTreeMap::from([
                ("1101 account in arrears".to_owned(), 1),
                (PANIC_REASON.to_owned(), 1),
                (DEADLINE_REASON.to_owned(), 1),
                (FOLLOW_ERROR_REASON.to_owned(), 1),
            ])
        );
    }

    /// A job of unknown create outcome whose create Kling refused is counted under the
    /// refusal's code, and the table says what to do: such jobs showed as a bare count. One
    /// whose create may have made a task (a 5000, a timeout, no answer) is not called
    /// refused: a 5000 showed as `create refused: 5000 internal error`.
    #[test]
    fn jobs_of_unknown_outcome_are_counted_by_the_refusal_of_their_create() {
        use crate::journal::ErrorInfo;

        let record = |error: Option<ErrorInfo>| JobRecord {
            error,
            ..blank(JobState::Creating)
        };
        let records = [
            record(Some(ErrorInfo::new(1103, "no permission", None))),
            record(Some(ErrorInfo::new(1103, "no permission", None))),
            record(Some(ErrorInfo::new(
                0,
                "attempt timed out after 30 s",
                None,
            ))),
            record(None),
            // A 5000 whose lookup failed, and one whose lookup found nothing yet: neither
            // was refused, either may have made a task.
            record(Some(ErrorInfo::new(5000, "internal error", None))),
            record(Some(ErrorInfo::new(
                5000,
                format!("{NOT_YET_LISTED}: internal error"),
                None,
            ))),
            record(Some(ErrorInfo::new(
                0,
                format!("{NOT_YET_LISTED}: attempt timed out after 30 s"),
                None,
            ))),
        ];
        let mut s = Summary::default();
        s.count_jobs(&records);
        assert_eq!(s.unknown, 7);
        let reason = "1103 no permission for this api or model";
        assert_eq!(
            s.unknown_by_reason,
            BTreeMap::from([(reason.to_owned(), 2)])
        );
        assert_eq!(
            s.unknown_open_by_reason,
            BTreeMap::from([
                ("5000 internal error".to_owned(), 2),
                ("attempt timed out after 30 s".to_owned(), 2),
                (UNANSWERED_REASON.to_owned(), 1),
            ])
        );
        // Every job of unknown outcome is under one reason.
        assert_eq!(
            s.unknown_by_reason.values().sum::<usize>()
                + s.unknown_open_by_reason.values().sum::<usize>(),
            s.unknown
        );
        let table = s.to_string();
        let has_row = |key: &str, value: &str| {
            table.lines().any(|l| {
                l.len() >= key.len() + value.len() + 2
                    && l.starts_with(key)
                    && l.ends_with(value)
                    && l[key.len()..l.len() - value.len()].trim().is_empty()
            })
        };
        assert!(
            has_row("create outcome unknown", "7 (run again to look up)"),
            "{table}"
        );
        assert!(
            has_row(&format!("  create refused: {reason}"), "2"),
            "{table}"
        );
        assert!(
            has_row("  create outcome unknown: 5000 internal error", "2"),
            "{table}"
        );
        assert!(!table.contains("create refused: 5000"), "{table}");
        assert!(
            has_row(
                &format!("  create outcome unknown: {UNANSWERED_REASON}"),
                "1"
            ),
            "{table}"
        );
    }

    /// A run with every kind of ending: the table's counts add up to the jobs in the file,
    /// each row of jobs left undone says what to do, and no row shows a result URL. Jobs
    /// refused for the account's credits (`1102`) read as a bare count, with nothing saying
    /// to top up before running again, and failed ones as if a rerun would send them.
    #[test]
    fn every_row_of_a_run_with_every_ending_adds_up_and_says_what_to_do() {
        use crate::journal::ErrorInfo;

        let record = |state, urls: &[&str], error: Option<ErrorInfo>, download| JobRecord {
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            error,
            download_error: download,
            ..blank(state)
        };
        let error = |code, message: &str| Some(ErrorInfo::new(code, message, None));
        let signed = ["https://cdn.example/0.mp4?sig=s3cr3t"];
        let records = [
            record(JobState::Succeeded, &signed, None, None),
            record(
                JobState::Succeeded,
                &signed,
                None,
                error(0, "download of https://cdn.example/0.mp4: timed out"),
            ),
            record(
                JobState::Failed,
                &[],
                error(0, "task failed: bad frame"),
                None,
            ),
            record(JobState::Failed, &[], error(1301, "unsafe"), None),
            record(JobState::NotSubmitted, &[], error(1102, "exhausted"), None),
            record(
                JobState::NotSubmitted,
                &[],
                error(1103, "no permission"),
                None,
            ),
            record(
                JobState::NotSubmitted,
                &[],
                error(0, "not submitted: the run was stopped"),
                None,
            ),
            record(
                JobState::Creating,
                &[],
                error(5000, &format!("{NOT_YET_LISTED}: internal error")),
                None,
            ),
            record(JobState::Created, &[], None, None),
        ];
        let mut s = Summary::default();
        s.count_jobs(&records);
        assert_eq!(
            s.ok + s.no_result_url + s.failed + s.not_submitted + s.unfinished + s.unknown,
            s.jobs
        );
        assert_eq!(s.jobs, records.len());
        let table = s.to_string();
        let row = |key: &str| {
            table
                .lines()
                .find(|l| l.starts_with(&format!("{key}  ")))
                .unwrap_or_else(|| panic!("no row {key:?}: {table}"))
                .to_owned()
        };
        assert!(row("  1102 resource pack exhausted or expired").contains("top up credits"));
        assert!(row("  1102 resource pack exhausted or expired").contains("run again"));
        assert!(row("  1103 no permission for this api or model").contains("access"));
        assert!(row("  not submitted: the run was stopped").contains("run again"));
        assert!(row("not submitted").contains("rerun sends them"), "{table}");
        assert!(row("failed").contains("new id"), "{table}");
        assert!(row("  1301 refused by content security").contains("change the prompt"));
        assert!(row("still running").contains("run again"), "{table}");
        assert!(row("downloads missing").contains("run again"), "{table}");
        assert!(
            row("create outcome unknown").contains("run again"),
            "{table}"
        );
        assert!(!table.contains("cdn.example"), "{table}");
        assert!(!table.contains("s3cr3t"), "{table}");
    }

    /// Reasons that differ only past the length the table shows are shown whole: a gateway's
    /// `502` and `504` to creates of open outcome read as two rows alike, the status cut.
    #[test]
    fn reasons_that_differ_past_the_cut_are_shown_whole() {
        use crate::journal::ErrorInfo;

        let record = |state, status: u16| JobRecord {
            error: Some(ErrorInfo::new(
                0,
                format!(
                    "answered by something other than Kling (a proxy's or gateway's page? check \
                     --base-url): create may have made a task that no lookup by its external id \
                     has ruled out: malformed kling response (http {status}): expected value"
                ),
                None,
            )),
            ..blank(state)
        };
        let records = [
            record(JobState::Creating, 502),
            record(JobState::Creating, 504),
            record(JobState::NotSubmitted, 403),
            record(JobState::NotSubmitted, 404),
        ];
        let mut s = Summary::default();
        s.count_jobs(&records);
        let table = s.to_string();
        for status in [502, 504, 403, 404] {
            assert!(table.contains(&format!("(http {status})")), "{table}");
        }
        // A reason alone past the cut is still cut.
        let mut one = Summary::default();
        one.count_jobs(&records[..1]);
        assert!(!one.to_string().contains("(http 502)"), "{one}");
    }

    /// Jobs refused alike are counted under one reason: the retry layer's tally in their
    /// messages (`after 6 attempts in 132.6ms (34.0ms backing off)`) differs from job to job,
    /// and a run against a server that did not answer listed each of its jobs on a row of
    /// its own.
    #[test]
    fn jobs_refused_alike_share_a_reason_whatever_their_retry_timings() {
        use crate::journal::ErrorInfo;

        let record = |state, message: String| JobRecord {
            error: Some(ErrorInfo::new(0, message, None)),
            ..blank(state)
        };
        let refused = |ms: u32, attempts: u32| {
            format!(
                "attempts exhausted after {attempts} attempts in {ms}.62ms ({ms}.07ms backing \
                 off): request was never sent: client error (Connect)"
            )
        };
        let mut records: Vec<JobRecord> = (0..5)
            .map(|i| record(JobState::NotSubmitted, refused(130 + i, 6)))
            .collect();
        records.push(record(JobState::Failed, refused(7, 1)));
        records.push(record(JobState::Failed, refused(9, 1)));
        records.push(record(
            JobState::Creating,
            format!("{NOT_YET_LISTED}: {}", refused(1, 2)),
        ));
        records.push(record(JobState::Creating, refused(3, 2)));
        let mut s = Summary::default();
        s.count_jobs(&records);
        let reason =
            "attempts exhausted: request was never sent: client error (Connect)".to_owned();
        assert_eq!(
            s.not_submitted_by_reason,
            BTreeMap::from([(reason.clone(), 5)])
        );
        assert_eq!(s.failed_by_reason, BTreeMap::from([(reason.clone(), 2)]));
        assert_eq!(s.unknown_open_by_reason, BTreeMap::from([(reason, 2)]));
        // Nor does the external id each create has of its own split them.
        assert_eq!(
            reason_of(
                "create may have made a task that no lookup by its external id has ruled out \
                 (external id kb-9f2442ab) after 6 attempts in 87.7ms (9.8ms backing off): \
                 malformed kling response (http 502)"
            ),
            "create may have made a task that no lookup by its external id has ruled out: \
             malformed kling response (http 502)"
        );
        // Text that is no tally or id is kept.
        assert_eq!(
            reason_of("x (external id of the job) y"),
            "x (external id of the job) y"
        );
        assert_eq!(reason_of("gave up after a while"), "gave up after a while");
        assert_eq!(reason_of("after 3 attempts"), "after 3 attempts");
    }

    #[test]
    fn a_succeeded_job_with_fewer_files_than_urls_is_a_missing_download() {
        use crate::journal::ErrorInfo;

        let record = |files: usize, download_error: Option<ErrorInfo>| JobRecord {
            urls: vec!["http://h/0.mp4".to_owned(), "http://h/1.mp4".to_owned()],
            files: vec!["f".to_owned(); files],
            download_error,
            ..blank(JobState::Succeeded)
        };
        let records = [
            record(2, None),
            record(1, None),
            record(0, None),
            record(1, Some(ErrorInfo::new(0, "timed out", None))),
        ];
        let mut s = Summary::default();
        s.count_jobs(&records);
        assert_eq!(
            s.downloads_missing, 1,
            "without --download: the recorded failure"
        );
        s.count_missing_files(&records);
        assert_eq!(s.downloads_missing, 3, "each job counted once");
        assert!(s.to_string().contains("downloads missing  3"), "{s}");
    }

    #[test]
    fn efficiency_is_bound_over_makespan() {
        let mut s = Summary::default();
        s.set_timing(40.0, 36.0, "mock");
        assert_eq!(s.efficiency, Some(0.9));
        s.set_timing(0.0, 36.0, "mock");
        assert_eq!(s.efficiency, None);
        let mut by_code = BTreeMap::new();
        by_code.insert(0, 10);
        by_code.insert(1302, 2);
        s.set_traffic(10, 12, &by_code, 0);
        s.set_retries(2, 0);
        assert_eq!(s.retries, 2);
        assert_eq!(s.rejections_of(1302), 2);
        assert_eq!(s.rejections_of(1303), 0);
        let table = s.to_string();
        assert!(table.contains("429s by code"), "{table}");
        assert!(!table.contains("not Kling answers"), "{table}");
        s.set_pages(&BTreeMap::from([(404, 2), (413, 1)]));
        let table = s.to_string();
        assert!(table.contains("http 404×2 http 413×1"), "{table}");
    }
}
