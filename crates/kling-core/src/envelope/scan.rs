//! A single-pass reader for the envelopes Kling sends, standing in for the typed serde_json
//! parse ([`Envelope::parse_reference`](super::Envelope::parse_reference)): no visitor
//! machinery, no owned copy of what the stack only looks at, SWAR searches through strings and
//! digits.
//!
//! Every response is read, so the hot path is kept short: the read position is passed and
//! returned by value (a register, not a field behind `&mut self`), a field name is recognised
//! by a few word compares, a task's texts are kept as spans of the body until its report is
//! built, and what is rare (whitespace, escapes, other numbers, containers to skip) sits in
//! functions of its own.
//!
//! It reads exactly what the reference reads (top-level `code`, `message`, `request_id`,
//! `data`, and in `data` the task fields of both generations) and skips every other value with
//! a validating skipper. Whatever it does not handle exactly as serde_json does (escaped keys,
//! duplicate known fields, surrogate escapes in a string serde_json would check, numbers other
//! than short integers where the value is read, arrays where a struct is expected, nesting
//! beyond [`MAX_DEPTH`], any syntax error) makes it give up with [`Fallback`], and the caller
//! runs the reference instead. So it never accepts what the reference rejects, and what it
//! accepts reads the same (the property tests in `tests.rs` and the fuzz target check both).

use std::borrow::Cow;
use std::ops::Range;

use super::{Currency, DataShape, Envelope, TaskReport, TaskStatus};
use crate::code::Code;
use crate::request::ApiGeneration;

#[cfg(test)]
mod tests;

/// Containers nested deeper than this are left to serde_json (whose own limit is 128), which
/// also bounds the scanner's recursion. Past serde_json's limit an error code still counts,
/// wherever it stands in the envelope: the reference reads the code on its own, and serde_json
/// skips the fields it ignores without recursing. A success whose tasks nest past the limit is
/// malformed, as any whose task cannot be read. The test
/// `an_error_code_survives_nesting_past_the_recursion_limit` holds both.
const MAX_DEPTH: u32 = 64;

/// The scanner met something it leaves to the serde_json reference (including every error, so
/// error messages stay serde_json's).
#[derive(Debug)]
pub(crate) struct Fallback;

type Scan<T> = Result<T, Fallback>;

/// A string value as read: a range of the body when it has no escape, else unescaped.
#[derive(Debug)]
pub(crate) enum Piece<'a> {
    /// Unescaped text at `range` of the body (the whole body: sliced only when the text is
    /// wanted, as `Outcome` mostly keeps the range alone).
    Raw(&'a str, Range<usize>),
    /// Text that had escapes, unescaped.
    Unescaped(String),
}

impl Piece<'_> {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            // The range lies between two quotes the scanner found: always a `str` boundary.
            Piece::Raw(body, range) => body.get(range.clone()).unwrap_or_default(),
            Piece::Unescaped(text) => text,
        }
    }

    /// Where the text is in the body, if it is there as is (no escapes).
    pub(crate) fn range(&self) -> Option<Range<usize>> {
        match self {
            Piece::Raw(_, range) => Some(range.clone()),
            Piece::Unescaped(_) => None,
        }
    }

    pub(crate) fn into_string(self) -> String {
        match self {
            Piece::Raw(..) => self.as_str().to_owned(),
            Piece::Unescaped(text) => text,
        }
    }
}

/// The tasks a response reports, without a `Vec` for the usual single task.
#[derive(Clone, Debug, Default)]
pub(crate) enum Reports {
    /// No task.
    #[default]
    None,
    /// One task (a create or a single query).
    One(TaskReport),
    /// Several (lists, batches, pages).
    Many(Vec<TaskReport>),
}

impl Reports {
    #[inline(always)]
    fn push(&mut self, report: TaskReport) {
        match self {
            Reports::None => *self = Reports::One(report),
            Reports::Many(all) => all.push(report),
            Reports::One(_) => {
                if let Reports::One(first) = std::mem::take(self) {
                    *self = Reports::Many(vec![first, report]);
                }
            }
        }
    }

    pub(crate) fn as_slice(&self) -> &[TaskReport] {
        match self {
            Reports::None => &[],
            Reports::One(report) => std::slice::from_ref(report),
            Reports::Many(all) => all,
        }
    }

    pub(crate) fn into_vec(self) -> Vec<TaskReport> {
        match self {
            Reports::None => Vec::new(),
            Reports::One(report) => vec![report],
            Reports::Many(all) => all,
        }
    }
}

impl From<Vec<TaskReport>> for Reports {
    fn from(mut all: Vec<TaskReport>) -> Reports {
        match all.len() {
            0 => Reports::None,
            1 => all.pop().map_or(Reports::None, Reports::One),
            _ => Reports::Many(all),
        }
    }
}

/// What the scanner read of an envelope besides its tasks.
#[derive(Debug)]
pub(crate) struct Head<'a> {
    pub(crate) code: i64,
    pub(crate) message: Option<Piece<'a>>,
    pub(crate) request_id: Option<Piece<'a>>,
    /// `data` was a list every element of which was read as one task.
    pub(crate) lists_every_task: bool,
}

impl Head<'_> {
    /// The owned envelope, as the reference builds it.
    pub(crate) fn into_envelope(self, tasks: Reports) -> Envelope {
        Envelope {
            code: Code::from_i64(self.code),
            message: self.message.map(Piece::into_string).unwrap_or_default(),
            request_id: self.request_id.map(Piece::into_string),
            tasks: tasks.into_vec(),
            lists_every_task: self.lists_every_task,
        }
    }
}

/// Reads an envelope, its tasks into `tasks`, or gives up ([`Fallback`]) where the reference
/// must decide (`tasks` then holds any part).
///
/// A body that is not UTF-8 goes to the reference. (One check of the whole body, a word at a
/// time for ASCII, costs less than checking each string the scanner returns: safe code gets
/// a `&str` only from a check, and each call has its own start-up cost.)
pub(crate) fn scan<'a, B: AsRef<[u8]> + ?Sized>(
    body: &'a B,
    tasks: &mut Reports,
) -> Scan<Head<'a>> {
    let text = std::str::from_utf8(body.as_ref()).map_err(|_| Fallback)?;
    // Spans keep `u32` offsets.
    if u32::try_from(text.len()).is_err() {
        return Err(Fallback);
    }
    let s = Scanner {
        text,
        bytes: text.as_bytes(),
    };
    let (envelope, end) = s.envelope(tasks)?;
    // A body that ends at the envelope's `}` (the usual one) needs no look for whitespace.
    if end == s.bytes.len() || ws(s.bytes, end) == s.bytes.len() {
        Ok(envelope)
    } else {
        Err(Fallback)
    }
}

/// The body being read. The read position is not kept here but passed along by value (and
/// returned past what was read), so it stays in a register instead of going through memory
/// at every byte.
#[derive(Clone, Copy)]
struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
}

/// A number as written: its text, and whether it is a short plain integer (at most 18 digits,
/// no fraction or exponent, not `-0`), which reads the same as an `i64`, `u64` or `f64`.
struct Number<'a> {
    text: &'a str,
    plain: bool,
}

impl Number<'_> {
    /// serde_json's value of the number, as the reference's `Text` prints it; a number that
    /// serde_json reads as no 64-bit integer is the reference's error.
    fn to_text(&self) -> Scan<Cow<'_, str>> {
        if self.plain {
            return Ok(Cow::Borrowed(self.text));
        }
        let n: serde_json::Number = self.text.parse().map_err(|_| Fallback)?;
        Ok(Cow::Owned(if let Some(u) = n.as_u64() {
            u.to_string()
        } else {
            n.as_i64().ok_or(Fallback)?.to_string()
        }))
    }

    /// serde_json's value of the number as an `f64`.
    fn to_f64(&self) -> Scan<f64> {
        if self.plain {
            // A plain integer: serde_json visits it as `u64` or `i64` and serde casts.
            return if self.text.starts_with('-') {
                self.text
                    .parse::<i64>()
                    .map(|i| i as f64)
                    .map_err(|_| Fallback)
            } else {
                self.text
                    .parse::<u64>()
                    .map(|u| u as f64)
                    .map_err(|_| Fallback)
            };
        }
        let n: serde_json::Number = self.text.parse().map_err(|_| Fallback)?;
        n.as_f64().ok_or(Fallback)
    }
}

/// Where a text value the scanner read sits in the body, and how to read it there; the
/// owned copy is made only for what the report keeps.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u32,
    end: u32,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A string without escapes: the text as is.
    Raw,
    /// A string with (checked) escapes, to unescape.
    Escaped,
    /// A plain number (see [`Number`]): the text as is.
    Plain,
    /// Any other number (checked when read): serde_json's value of it, as text.
    Number,
}

/// A task object of either generation (or a page), as read before deciding what it reports;
/// the scanner's `RawTask`. Texts are spans of the body (no drop, no copy until reported).
#[derive(Default)]
struct RawTask {
    task_id: Option<Span>,
    task_status: Option<Span>,
    task_status_msg: Option<Span>,
    external_task_id: Option<Span>,
    final_unit_deduction: Option<Span>,
    id: Option<Span>,
    status: Option<Span>,
    message: Option<Span>,
    external_id: Option<Span>,
    /// `task_result` was present: its video and image URLs.
    videos: Vec<String>,
    images: Vec<String>,
    outputs: Vec<String>,
    billing: Option<f64>,
    /// The one currency the billing items with an amount named (a string without escapes).
    currency: Option<Span>,
    page: Option<Vec<TaskReport>>,
    /// A `tasks` key was there (a page, or `null`): the object is no task of a list's, as the
    /// reference's [`DataShape`] has it.
    has_tasks_key: bool,
}

/// Marks field `bit` seen; a second sighting is serde's "duplicate field" error.
#[inline(always)]
fn first_sighting(seen: &mut u16, bit: u16) -> Scan<()> {
    if *seen & bit != 0 {
        return Err(Fallback);
    }
    *seen |= bit;
    Ok(())
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The index of the first `"`, `\` or control character at or after `i` (or the end).
#[inline(always)]
pub(crate) fn find_special(bytes: &[u8], mut i: usize) -> usize {
    // Sixteen bytes at a time, written so the compiler turns it into a few SSE2 compares:
    // each byte becomes 0xFF where special. The loop only asks whether any byte is (an OR of
    // the flags compiles to one mask move and a test); the lowest set byte of the flags as a
    // word, the first hit, is worked out once, on the way out.
    while let Some(chunk) = bytes.get(i..i + 16) {
        let mut flags = [0u8; 16];
        for (flag, &b) in flags.iter_mut().zip(chunk) {
            *flag = if (b == b'"') | (b == b'\\') | (b < 0x20) {
                0xFF
            } else {
                0
            };
        }
        if flags.iter().fold(0, |any, &flag| any | flag) != 0 {
            return i + (u128::from_le_bytes(flags).trailing_zeros() / 8) as usize;
        }
        i += 16;
    }
    // Then eight bytes at a time: a byte is flagged when it equals `"` or `\`, or is below
    // 0x20. Borrows only flag bytes above a true hit, so the lowest flag is the first hit.
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let quote = w ^ (LO * u64::from(b'"'));
        let backslash = w ^ (LO * u64::from(b'\\'));
        let flags = (quote.wrapping_sub(LO) & !quote)
            | (backslash.wrapping_sub(LO) & !backslash)
            | (w.wrapping_sub(LO * 0x20) & !w);
        let flags = flags & HI;
        if flags != 0 {
            return i + (flags.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&b) = bytes.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

/// The index of the first byte at or after `i` that is not an ASCII digit (or the end).
#[inline(always)]
fn digits_end(bytes: &[u8], mut i: usize) -> usize {
    // Eight bytes at a time: XOR with '0' leaves a digit as 0..=9 in its low nibble with a
    // clear high nibble; no carry crosses bytes, so every flag is exact. The last word is read
    // zero-padded (a zero is no digit), so a number's tail costs one more word, not a byte
    // loop: the 13-digit timestamps Kling sends end in their second word.
    loop {
        let x = word(bytes, i) ^ (LO * u64::from(b'0'));
        let not_digit = (x & (LO * 0xF0)) | (((x & (LO * 0x0F)) + LO * 0x06) & (LO * 0x10));
        if not_digit != 0 {
            return i + (not_digit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
}

fn hex_digit(b: u8) -> Option<u32> {
    match b {
        b'0'..=b'9' => Some(u32::from(b - b'0')),
        b'a'..=b'f' => Some(u32::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u32::from(b - b'A' + 10)),
        _ => None,
    }
}

/// The four hex digits at `bytes[i..i + 4]`.
fn hex4(bytes: &[u8], i: usize) -> Scan<u32> {
    let digits = bytes.get(i..i + 4).ok_or(Fallback)?;
    digits.iter().try_fold(0, |acc, &b| {
        hex_digit(b).map(|d| (acc << 4) | d).ok_or(Fallback)
    })
}

/// Unescapes string content whose escapes [`string_rest`] checked (strictly: no surrogate).
fn unescape(raw: &str) -> Scan<String> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while let Some(offset) = raw[i..].find('\\') {
        out.push_str(&raw[i..i + offset]);
        i += offset + 1;
        let c = match bytes.get(i).ok_or(Fallback)? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let c = char::from_u32(hex4(bytes, i + 1)?).ok_or(Fallback)?;
                i += 4;
                c
            }
            _ => return Err(Fallback),
        };
        out.push(c);
        i += 1;
    }
    out.push_str(&raw[i..]);
    Ok(out)
}

/// The byte at `i`, if any.
#[inline(always)]
fn at(bytes: &[u8], i: usize) -> Option<u8> {
    bytes.get(i).copied()
}

/// The index of the first byte at or after `i` that is not JSON whitespace.
#[inline(always)]
fn ws(bytes: &[u8], i: usize) -> usize {
    // Kling sends compact JSON: one compare in the usual case.
    match bytes.get(i) {
        Some(&b) if b > b' ' => i,
        _ => ws_slow(bytes, i),
    }
}

#[cold]
#[inline(never)]
fn ws_slow(bytes: &[u8], mut i: usize) -> usize {
    while matches!(bytes.get(i), Some(b' ' | b'\n' | b'\t' | b'\r')) {
        i += 1;
    }
    i
}

/// Past `b` (after whitespace) at `i`.
#[inline(always)]
fn eat(bytes: &[u8], i: usize, b: u8) -> Scan<usize> {
    // `b` is never whitespace: one compare when there is none.
    if at(bytes, i) == Some(b) {
        return Ok(i + 1);
    }
    eat_after_whitespace(bytes, i, b)
}

#[cold]
#[inline(never)]
fn eat_after_whitespace(bytes: &[u8], i: usize, b: u8) -> Scan<usize> {
    let i = ws(bytes, i);
    if at(bytes, i) == Some(b) {
        Ok(i + 1)
    } else {
        Err(Fallback)
    }
}

/// After a value inside a container: past the closing `close` (`true`) or past a comma
/// (`false`).
#[inline(always)]
fn next_or_close(bytes: &[u8], i: usize, close: u8) -> Scan<(bool, usize)> {
    match at(bytes, i) {
        Some(b',') => Ok((false, i + 1)),
        Some(b) if b == close => Ok((true, i + 1)),
        _ => next_or_close_after_whitespace(bytes, i, close),
    }
}

#[cold]
#[inline(never)]
fn next_or_close_after_whitespace(bytes: &[u8], i: usize, close: u8) -> Scan<(bool, usize)> {
    let i = ws(bytes, i);
    match at(bytes, i) {
        Some(b',') => Ok((false, i + 1)),
        Some(b) if b == close => Ok((true, i + 1)),
        _ => Err(Fallback),
    }
}

/// Past the `open` at `i` (after whitespace); `true` (and past `close` too) when the container
/// is empty.
#[inline(always)]
fn open(bytes: &[u8], i: usize, open: u8, close: u8) -> Scan<(bool, usize)> {
    let i = ws(bytes, eat(bytes, i, open)?);
    if at(bytes, i) == Some(close) {
        Ok((true, i + 1))
    } else {
        Ok((false, i))
    }
}

/// The rest of a string from `i` (after its opening quote): the index of its closing quote
/// and whether there were escapes. `strict` refuses surrogate escapes, which serde_json checks
/// in a string it reads (lone ones are errors) but not in one it skips.
#[inline(always)]
fn string_rest(bytes: &[u8], i: usize, strict: bool) -> Scan<(usize, bool)> {
    let end = find_special(bytes, i);
    if at(bytes, end) == Some(b'"') {
        return Ok((end, false));
    }
    string_escaped(bytes, end, strict).map(|end| (end, true))
}

/// [`string_rest`] from the first `\\` or control character at `i`: the closing quote's index.
#[cold]
#[inline(never)]
fn string_escaped(bytes: &[u8], mut i: usize, strict: bool) -> Scan<usize> {
    loop {
        match bytes.get(i) {
            Some(b'"') => return Ok(i),
            Some(b'\\') => {
                match bytes.get(i + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                    Some(b'u') => {
                        let unit = hex4(bytes, i + 2)?;
                        if strict && (0xD800..0xE000).contains(&unit) {
                            return Err(Fallback);
                        }
                        i += 6;
                    }
                    _ => return Err(Fallback),
                }
                i = find_special(bytes, i);
            }
            _ => return Err(Fallback),
        }
    }
}

/// Past a number at `i`, checking JSON's grammar; whether it is plain (see [`Number`]).
#[inline(always)]
fn number_end(bytes: &[u8], mut i: usize) -> Scan<(usize, bool)> {
    let negative = at(bytes, i) == Some(b'-');
    if negative {
        i += 1;
    }
    let int_start = i;
    match at(bytes, i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits_end(bytes, i + 1),
        _ => return Err(Fallback),
    }
    let mut plain = i - int_start <= 18 && !(negative && bytes[int_start] == b'0');
    if matches!(at(bytes, i), Some(b'.' | b'e' | b'E')) {
        plain = false;
        i = number_tail(bytes, i)?;
    }
    Ok((i, plain))
}

/// Past a number's fraction and exponent (rare in what the scanner reads).
#[inline(never)]
fn number_tail(bytes: &[u8], mut i: usize) -> Scan<usize> {
    if at(bytes, i) == Some(b'.') {
        let digits = i + 1;
        i = digits_end(bytes, digits);
        if i == digits {
            return Err(Fallback);
        }
    }
    if matches!(at(bytes, i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(at(bytes, i), Some(b'+' | b'-')) {
            i += 1;
        }
        let digits = i;
        i = digits_end(bytes, digits);
        if i == digits {
            return Err(Fallback);
        }
    }
    Ok(i)
}

/// Past `word` (`null`, `true` or `false`) at `i`.
#[inline(always)]
fn literal(bytes: &[u8], i: usize, word: &[u8]) -> Scan<usize> {
    if bytes.get(i..i + word.len()) == Some(word) {
        Ok(i + word.len())
    } else {
        Err(Fallback)
    }
}

/// Whether the value at `i` is `null`, and where the scan goes on (past the `null`, or at the
/// value after whitespace): serde reads `null` as `None`.
#[inline(always)]
fn null(bytes: &[u8], i: usize) -> Scan<(bool, usize)> {
    let i = ws(bytes, i);
    if at(bytes, i) == Some(b'n') {
        return literal(bytes, i, b"null").map(|i| (true, i));
    }
    Ok((false, i))
}

/// Where serde expects a struct: an object at `i` (after whitespace). (serde_json would also
/// take an array, by position; that is left to the reference.)
#[inline(always)]
fn struct_start(bytes: &[u8], i: usize) -> Scan<usize> {
    let i = ws(bytes, i);
    if at(bytes, i) == Some(b'{') {
        Ok(i)
    } else {
        Err(Fallback)
    }
}

/// Skips any value at `i`, checking it as serde_json's `ignore_value` does (or more
/// strictly).
#[inline(always)]
fn skip(bytes: &[u8], i: usize, depth: u32) -> Scan<usize> {
    let i = ws(bytes, i);
    match at(bytes, i) {
        Some(b'"') => string_rest(bytes, i + 1, false).map(|(end, _)| end + 1),
        Some(b'-' | b'0'..=b'9') => number_end(bytes, i).map(|(end, _)| end),
        _ => skip_other(bytes, i, depth),
    }
}

/// [`skip`] of a literal, an array or an object.
#[inline(never)]
fn skip_other(bytes: &[u8], i: usize, depth: u32) -> Scan<usize> {
    match at(bytes, i) {
        Some(b'n') => literal(bytes, i, b"null"),
        Some(b't') => literal(bytes, i, b"true"),
        Some(b'f') => literal(bytes, i, b"false"),
        Some(b'[') => {
            let depth = deeper(depth)?;
            let (mut done, mut i) = open(bytes, i, b'[', b']')?;
            while !done {
                i = skip(bytes, i, depth)?;
                (done, i) = next_or_close(bytes, i, b']')?;
            }
            Ok(i)
        }
        Some(b'{') => {
            let depth = deeper(depth)?;
            let (mut done, mut i) = open(bytes, i, b'{', b'}')?;
            while !done {
                let (end, _) = string_rest(bytes, eat(bytes, i, b'"')?, false)?;
                i = skip(bytes, eat(bytes, end + 1, b':')?, depth)?;
                (done, i) = next_or_close(bytes, i, b'}')?;
            }
            Ok(i)
        }
        _ => Err(Fallback),
    }
}

/// The eight bytes at `i` as a little-endian word, zero past the end.
#[inline(always)]
fn word(bytes: &[u8], i: usize) -> u64 {
    match bytes.get(i..i + 8) {
        Some(chunk) => {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            u64::from_le_bytes(word)
        }
        None => word_tail(bytes, i),
    }
}

/// [`word`] within eight bytes of the end (where the number a body ends with is read).
#[cold]
#[inline(never)]
fn word_tail(bytes: &[u8], i: usize) -> u64 {
    let tail = bytes.get(i..).unwrap_or_default();
    if tail.is_empty() {
        return 0;
    }
    // The body's last eight bytes, shifted down to start at `i`: zeros come in past the end.
    if tail.len() < 8
        && let Some(last) = bytes
            .len()
            .checked_sub(8)
            .and_then(|start| bytes.get(start..))
    {
        let mut word = [0; 8];
        word.copy_from_slice(last);
        return u64::from_le_bytes(word) >> (8 * (8 - tail.len()));
    }
    let mut word = [0; 8];
    for (to, from) in word.iter_mut().zip(tail) {
        *to = *from;
    }
    u64::from_le_bytes(word)
}

/// The low `n` bytes of a word.
const fn mask(n: usize) -> u64 {
    if n >= 8 { u64::MAX } else { (1 << (8 * n)) - 1 }
}

/// A field name with its closing quote, as words, so a key is recognised by a few word
/// compares instead of a search for its end and a byte compare.
struct Name {
    words: [u64; 3],
    len: usize,
}

impl Name {
    const fn new(name: &[u8]) -> Name {
        let mut words = [0; 3];
        let mut k = 0;
        while k < name.len() {
            words[k / 8] |= (name[k] as u64) << (8 * (k % 8));
            k += 1;
        }
        words[k / 8] |= (b'"' as u64) << (8 * (k % 8));
        Name {
            words,
            len: name.len() + 1,
        }
    }

    /// Whether the key at `start` (`first` its first word) is this name, closing quote
    /// included.
    #[inline(always)]
    fn is_at(&self, bytes: &[u8], start: usize, first: u64) -> bool {
        if self.len <= 8 {
            return first & mask(self.len) == self.words[0];
        }
        if first != self.words[0] {
            return false;
        }
        let second = word(bytes, start + 8);
        if self.len <= 16 {
            return second & mask(self.len - 8) == self.words[1];
        }
        second == self.words[1] && word(bytes, start + 16) & mask(self.len - 16) == self.words[2]
    }
}

/// An object key at `i` (after whitespace) and its colon: the index of the name it is in
/// `names` (`N` for any other) and where its value starts. Escaped keys (and control
/// characters) are left to the reference: serde matches field names after unescaping.
#[inline(always)]
fn key<const N: usize>(bytes: &[u8], i: usize, names: &[Name; N]) -> Scan<(usize, usize)> {
    let start = eat(bytes, i, b'"')?;
    let first = word(bytes, start);
    for (index, name) in names.iter().enumerate() {
        if name.is_at(bytes, start, first) {
            return Ok((index, eat(bytes, start + name.len, b':')?));
        }
    }
    Ok((N, other_key(bytes, start)?))
}

/// Past the colon of a key that is no field the reader wants, from `start` (after its quote).
#[inline(always)]
fn other_key(bytes: &[u8], start: usize) -> Scan<usize> {
    let (end, escaped) = string_rest(bytes, start, true)?;
    if escaped {
        return Err(Fallback);
    }
    eat(bytes, end + 1, b':')
}

const CODE: Name = Name::new(b"code");
const MESSAGE: Name = Name::new(b"message");
const REQUEST_ID: Name = Name::new(b"request_id");
const DATA: Name = Name::new(b"data");
const TASK_ID: Name = Name::new(b"task_id");
const TASK_STATUS: Name = Name::new(b"task_status");
const TASK_STATUS_MSG: Name = Name::new(b"task_status_msg");
const TASK_INFO: Name = Name::new(b"task_info");
const TASK_RESULT: Name = Name::new(b"task_result");
const FINAL_UNIT_DEDUCTION: Name = Name::new(b"final_unit_deduction");
const ID: Name = Name::new(b"id");
const STATUS: Name = Name::new(b"status");
const EXTERNAL_ID: Name = Name::new(b"external_id");
const OUTPUTS: Name = Name::new(b"outputs");
const BILLING: Name = Name::new(b"billing");
const TASKS: Name = Name::new(b"tasks");
const EXTERNAL_TASK_ID: Name = Name::new(b"external_task_id");
const VIDEOS: Name = Name::new(b"videos");
const IMAGES: Name = Name::new(b"images");
const URL: Name = Name::new(b"url");
const AMOUNT: Name = Name::new(b"amount");
const CURRENCY: Name = Name::new(b"currency");
const CREATED_AT: Name = Name::new(b"created_at");
const UPDATED_AT: Name = Name::new(b"updated_at");
const DURATION: Name = Name::new(b"duration");

/// A span of the body (which [`scan`] checked fits `u32` offsets).
#[inline(always)]
fn span(start: usize, end: usize, kind: Kind) -> Span {
    Span {
        start: start as u32,
        end: end as u32,
        kind,
    }
}

/// A field of the reference's `RawTask`.
#[derive(Clone, Copy)]
enum Field {
    TaskId,
    TaskStatus,
    TaskStatusMsg,
    TaskInfo,
    TaskResult,
    FinalUnitDeduction,
    Id,
    Status,
    Message,
    ExternalId,
    Outputs,
    Billing,
    Tasks,
    Other,
}

/// A task object's key at `i` and its colon: the field it names (told apart by its first
/// byte, then compared a word at a time) and where its value starts.
#[inline(always)]
fn task_key(bytes: &[u8], i: usize) -> Scan<(Field, usize)> {
    let start = eat(bytes, i, b'"')?;
    let first = word(bytes, start);
    // Each name is a constant: the compares fold into immediate word compares.
    macro_rules! try_names {
        ($(($field:expr, $name:expr)),+) => {{
            $(
                if $name.is_at(bytes, start, first) {
                    return Ok(($field, eat(bytes, start + $name.len, b':')?));
                }
            )+
        }};
    }
    match first as u8 {
        b't' => try_names!(
            (Field::TaskId, TASK_ID),
            (Field::TaskStatus, TASK_STATUS),
            (Field::TaskInfo, TASK_INFO),
            (Field::TaskResult, TASK_RESULT),
            (Field::TaskStatusMsg, TASK_STATUS_MSG),
            (Field::Tasks, TASKS)
        ),
        b'f' => try_names!((Field::FinalUnitDeduction, FINAL_UNIT_DEDUCTION)),
        b'i' => try_names!((Field::Id, ID)),
        b's' => try_names!((Field::Status, STATUS)),
        b'm' => try_names!((Field::Message, MESSAGE)),
        b'e' => try_names!((Field::ExternalId, EXTERNAL_ID)),
        b'o' => try_names!((Field::Outputs, OUTPUTS)),
        b'b' => try_names!((Field::Billing, BILLING)),
        // Not read, but in every task Kling reports: a word compare costs less than the
        // search for the end of a key.
        b'c' => try_names!((Field::Other, CREATED_AT)),
        b'u' => try_names!((Field::Other, UPDATED_AT)),
        _ => {}
    }
    Ok((Field::Other, other_key(bytes, start)?))
}

/// The `code` at `start` (after whitespace): a plain integer (see [`Number`]), else left to
/// the reference.
#[inline(never)]
fn code_value(bytes: &[u8], start: usize) -> Scan<(i64, usize)> {
    if !matches!(at(bytes, start), Some(b'-' | b'0'..=b'9')) {
        return Err(Fallback);
    }
    let (end, plain) = number_end(bytes, start)?;
    if !plain {
        return Err(Fallback);
    }
    Ok((plain_i64(bytes.get(start..end).ok_or(Fallback)?), end))
}

/// A `final_unit_deduction` as the reference reads it (`trim` then `f64` parse, a non-finite
/// or negative value as none), with a short path for what Kling sends: a few digits, which
/// `f64` holds exactly.
#[inline(always)]
fn deduction(text: &str) -> Option<f64> {
    let digits = text.as_bytes();
    if !digits.is_empty() && digits.len() <= 15 && digits.iter().all(u8::is_ascii_digit) {
        let n = digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        // At most 15 digits: below 2^53, so exact, as the parse of the same text is.
        return Some(n as f64);
    }
    text.trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
}

/// A plain integer's value (at most 18 digits: no overflow).
#[inline(always)]
fn plain_i64(text: &[u8]) -> i64 {
    let (negative, digits) = match text.split_first() {
        Some((b'-', digits)) => (true, digits),
        _ => (false, text),
    };
    let n = digits
        .iter()
        .fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
    if negative { -n } else { n }
}

impl<'a> Scanner<'a> {
    /// The text of `range` (ASCII-bounded: a string's content or a number).
    #[inline(always)]
    fn slice(&self, range: Range<usize>) -> Scan<&'a str> {
        self.text.get(range).ok_or(Fallback)
    }

    /// A string value the reference reads (a `Cow<str>`), at `i` (its opening quote).
    #[inline(always)]
    fn piece(&self, i: usize) -> Scan<(Piece<'a>, usize)> {
        let start = i + 1;
        let (end, escaped) = string_rest(self.bytes, start, true)?;
        let piece = if escaped {
            Piece::Unescaped(unescape(self.slice(start..end)?)?)
        } else {
            Piece::Raw(self.text, start..end)
        };
        Ok((piece, end + 1))
    }

    /// An `Option<Cow<str>>` value: `null` or a string.
    #[inline(always)]
    fn opt_piece(&self, i: usize) -> Scan<(Option<Piece<'a>>, usize)> {
        let i = ws(self.bytes, i);
        match at(self.bytes, i) {
            Some(b'"') => self.piece(i).map(|(piece, i)| (Some(piece), i)),
            Some(b'n') => literal(self.bytes, i, b"null").map(|i| (None, i)),
            _ => Err(Fallback),
        }
    }

    /// A number at `i` (after whitespace), checked against JSON's grammar.
    #[inline(always)]
    fn number(&self, i: usize) -> Scan<(Number<'a>, usize)> {
        let (end, plain) = number_end(self.bytes, i)?;
        Ok((
            Number {
                text: self.slice(i..end)?,
                plain,
            },
            end,
        ))
    }

    /// An `Option<Cow<str>>` value of a task: `null` or a string, as a span.
    #[inline(always)]
    fn opt_string(&self, i: usize) -> Scan<(Option<Span>, usize)> {
        let i = ws(self.bytes, i);
        match at(self.bytes, i) {
            Some(b'"') => self.string_span(i + 1).map(|(span, end)| (Some(span), end)),
            Some(b'n') => literal(self.bytes, i, b"null").map(|i| (None, i)),
            _ => Err(Fallback),
        }
    }

    /// A string read as a span, from `start` (after its opening quote).
    #[inline(always)]
    fn string_span(&self, start: usize) -> Scan<(Span, usize)> {
        let (end, escaped) = string_rest(self.bytes, start, true)?;
        let kind = if escaped { Kind::Escaped } else { Kind::Raw };
        Ok((span(start, end, kind), end + 1))
    }

    /// An `Option<Text>` value: `null`, a string, or a number kept as text, as a span.
    #[inline(always)]
    fn opt_text(&self, i: usize) -> Scan<(Option<Span>, usize)> {
        let i = ws(self.bytes, i);
        match at(self.bytes, i) {
            Some(b'"') => self.string_span(i + 1).map(|(span, end)| (Some(span), end)),
            _ => self.opt_text_other(i),
        }
    }

    /// [`Scanner::opt_text`] of anything but a string.
    #[inline(never)]
    fn opt_text_other(&self, i: usize) -> Scan<(Option<Span>, usize)> {
        match at(self.bytes, i) {
            Some(b'n') => literal(self.bytes, i, b"null").map(|i| (None, i)),
            Some(b'-' | b'0'..=b'9') => {
                let (n, end) = self.number(i)?;
                let kind = if n.plain {
                    Kind::Plain
                } else {
                    // Checked now: a number serde_json cannot read, or reads as no 64-bit
                    // integer (which the reference refuses as an id), fails the envelope even
                    // when the task reports nothing.
                    n.to_text()?;
                    Kind::Number
                };
                Ok((Some(span(i, end, kind)), end))
            }
            _ => Err(Fallback),
        }
    }

    /// The top-level object.
    fn envelope(&self, tasks: &mut Reports) -> Scan<(Head<'a>, usize)> {
        let bytes = self.bytes;
        let mut seen = 0;
        let mut code = None;
        let mut message = None;
        let mut request_id = None;
        let mut data = DataShape::Other;
        let depth = deeper(0)?;
        let (mut done, mut i) = open(bytes, 0, b'{', b'}')?;
        while !done {
            let (name, at_value) = key(bytes, i, &[CODE, MESSAGE, REQUEST_ID, DATA])?;
            i = match name {
                0 => {
                    first_sighting(&mut seen, 1)?;
                    let start = ws(bytes, at_value);
                    // The usual code: one digit (`0` for success), nothing of a number after.
                    if let Some(digit @ b'0'..=b'9') = at(bytes, start)
                        && !matches!(at(bytes, start + 1), Some(b'0'..=b'9' | b'.' | b'e' | b'E'))
                    {
                        code = Some(i64::from(digit - b'0'));
                        start + 1
                    } else {
                        let (value, end) = code_value(bytes, start)?;
                        code = Some(value);
                        end
                    }
                }
                1 => {
                    first_sighting(&mut seen, 2)?;
                    let (piece, end) = self.opt_piece(at_value)?;
                    message = piece;
                    end
                }
                2 => {
                    first_sighting(&mut seen, 4)?;
                    let (piece, end) = self.opt_piece(at_value)?;
                    request_id = piece;
                    end
                }
                3 => {
                    first_sighting(&mut seen, 8)?;
                    let end;
                    (end, data) = self.data(at_value, depth, tasks)?;
                    end
                }
                _ => skip(bytes, at_value, depth)?,
            };
            (done, i) = next_or_close(bytes, i, b'}')?;
        }
        let head = Head {
            code: code.ok_or(Fallback)?,
            message,
            request_id,
            lists_every_task: data.lists_every_task(),
        };
        Ok((head, i))
    }

    /// `data`, or an element of it, at `i`: what the reference's `TasksVisitor` reads with
    /// `deserialize_any` (so strings and numbers are checked as read, not as skipped), and
    /// its shape as the reference records it.
    #[inline(always)]
    fn data(&self, i: usize, depth: u32, tasks: &mut Reports) -> Scan<(usize, DataShape)> {
        let i = ws(self.bytes, i);
        if at(self.bytes, i) == Some(b'{') {
            let mut task = RawTask::default();
            let i = self.task(i, depth, &mut task)?;
            if let Some(page) = task.page.take() {
                for report in page {
                    tasks.push(report);
                }
                return Ok((i, DataShape::Other));
            }
            let reported = self.report(&mut task, |report| tasks.push(report))?;
            let shape = if reported && !task.has_tasks_key {
                DataShape::Task
            } else {
                DataShape::Other
            };
            return Ok((i, shape));
        }
        self.data_other(i, depth, tasks)
    }

    /// [`Scanner::data`] of anything but an object.
    #[inline(never)]
    fn data_other(&self, i: usize, depth: u32, tasks: &mut Reports) -> Scan<(usize, DataShape)> {
        let bytes = self.bytes;
        let end = match at(bytes, i) {
            Some(b'[') => {
                let depth = deeper(depth)?;
                let mut whole = true;
                let (mut done, mut i) = open(bytes, i, b'[', b']')?;
                while !done {
                    let shape;
                    (i, shape) = self.data(i, depth, tasks)?;
                    whole &= shape == DataShape::Task;
                    (done, i) = next_or_close(bytes, i, b']')?;
                }
                return Ok((i, DataShape::List { whole }));
            }
            Some(b'"') => string_rest(bytes, i + 1, true).map(|(end, _)| end + 1),
            Some(b'-' | b'0'..=b'9') => {
                let (n, i) = self.number(i)?;
                n.to_f64()?;
                Ok(i)
            }
            Some(b'n') => literal(bytes, i, b"null"),
            Some(b't') => literal(bytes, i, b"true"),
            Some(b'f') => literal(bytes, i, b"false"),
            _ => Err(Fallback),
        }?;
        Ok((end, DataShape::Other))
    }

    /// A task object at `i` (its `{`), with the reference's `RawTask` fields.
    fn task(&self, i: usize, depth: u32, t: &mut RawTask) -> Scan<usize> {
        let bytes = self.bytes;
        // The fields seen, for serde's "duplicate field" (a local: kept in a register).
        let mut seen = 0;
        let depth = deeper(depth)?;
        let (mut done, mut i) = open(bytes, i, b'{', b'}')?;
        while !done {
            let (field, at_value) = task_key(bytes, i)?;
            i = match field {
                Field::TaskId => {
                    first_sighting(&mut seen, 1)?;
                    let (text, end) = self.opt_text(at_value)?;
                    t.task_id = text;
                    end
                }
                Field::TaskStatus => {
                    first_sighting(&mut seen, 1 << 1)?;
                    let (span, end) = self.opt_string(at_value)?;
                    t.task_status = span;
                    end
                }
                Field::TaskStatusMsg => {
                    first_sighting(&mut seen, 1 << 2)?;
                    let (span, end) = self.opt_string(at_value)?;
                    t.task_status_msg = span;
                    end
                }
                Field::TaskInfo => {
                    first_sighting(&mut seen, 1 << 3)?;
                    self.task_info(at_value, depth, t)?
                }
                Field::TaskResult => {
                    first_sighting(&mut seen, 1 << 4)?;
                    self.task_result(at_value, depth, t)?
                }
                Field::FinalUnitDeduction => {
                    first_sighting(&mut seen, 1 << 5)?;
                    let (text, end) = self.opt_text(at_value)?;
                    t.final_unit_deduction = text;
                    end
                }
                Field::Id => {
                    first_sighting(&mut seen, 1 << 6)?;
                    let (text, end) = self.opt_text(at_value)?;
                    t.id = text;
                    end
                }
                Field::Status => {
                    first_sighting(&mut seen, 1 << 7)?;
                    let (span, end) = self.opt_string(at_value)?;
                    t.status = span;
                    end
                }
                Field::Message => {
                    first_sighting(&mut seen, 1 << 8)?;
                    let (span, end) = self.opt_string(at_value)?;
                    t.message = span;
                    end
                }
                Field::ExternalId => {
                    first_sighting(&mut seen, 1 << 9)?;
                    let (span, end) = self.opt_string(at_value)?;
                    t.external_id = span;
                    end
                }
                Field::Outputs => {
                    first_sighting(&mut seen, 1 << 10)?;
                    self.urls(at_value, depth, &mut t.outputs)?
                }
                Field::Billing => {
                    first_sighting(&mut seen, 1 << 11)?;
                    self.billing(at_value, depth, t)?
                }
                Field::Tasks => {
                    first_sighting(&mut seen, 1 << 12)?;
                    t.has_tasks_key = true;
                    self.page(at_value, depth, t)?
                }
                Field::Other => skip(bytes, at_value, depth)?,
            };
            (done, i) = next_or_close(bytes, i, b'}')?;
        }
        Ok(i)
    }

    /// The report of a task, with the reference's rules: legacy when `task_id` and
    /// `task_status` are both there, else new when `id` and `status` are, else none.
    ///
    /// Takes the task by reference and moves its lists out: a `RawTask` passed by value
    /// is a copy of over 200 bytes per task.
    ///
    /// The report goes to `sink` (which puts it in its place) rather than being returned: an
    /// `Option<TaskReport>` returned is one more copy of it. Returns whether there was one.
    #[inline(never)]
    fn report(&self, t: &mut RawTask, sink: impl FnOnce(TaskReport)) -> Scan<bool> {
        // An empty id names no task, as a missing or `null` one (only an unescaped string can
        // be empty).
        let named = |id: &Span| id.start != id.end;
        if let (Some(id), Some(status)) = (t.task_id.filter(named), t.task_status) {
            let mut urls = std::mem::take(&mut t.videos);
            let mut images = std::mem::take(&mut t.images);
            if urls.is_empty() {
                urls = images;
            } else {
                urls.append(&mut images);
            }
            let cost = match t.final_unit_deduction {
                Some(d) => deduction(&self.text(d)?),
                None => None,
            };
            sink(TaskReport {
                id: self.owned(id)?,
                status: self.status(status)?,
                generation: ApiGeneration::Legacy,
                external_id: self
                    .opt_owned(t.external_task_id)?
                    .filter(|e| !e.is_empty()),
                failure: self.opt_owned(t.task_status_msg)?,
                urls,
                cost,
                cost_currency: None,
            });
            return Ok(true);
        }
        let (Some(id), Some(status)) = (t.id.filter(named), t.status) else {
            return Ok(false);
        };
        sink(TaskReport {
            id: self.owned(id)?,
            status: self.status(status)?,
            generation: ApiGeneration::New,
            external_id: self.opt_owned(t.external_id)?.filter(|e| !e.is_empty()),
            failure: self.opt_owned(t.message)?,
            urls: std::mem::take(&mut t.outputs),
            cost: t.billing,
            cost_currency: match t.currency {
                Some(span) => Some(Currency::new(self.text(span)?)),
                None => None,
            },
        });
        Ok(true)
    }

    /// A task status: the documented words are told from the body's bytes (no `str` slice);
    /// anything else, or escaped, as [`TaskStatus::parse`] reads its text.
    #[inline(always)]
    fn status(&self, span: Span) -> Scan<TaskStatus> {
        if span.kind == Kind::Raw {
            let word = self
                .bytes
                .get(span.start as usize..span.end as usize)
                .ok_or(Fallback)?;
            match word {
                b"submitted" => return Ok(TaskStatus::Submitted),
                b"processing" => return Ok(TaskStatus::Processing),
                b"succeed" | b"succeeded" => return Ok(TaskStatus::Succeeded),
                b"failed" => return Ok(TaskStatus::Failed),
                _ => {}
            }
        }
        Ok(TaskStatus::parse(&self.text(span)?))
    }

    /// The text a span stands for, as the reference reads it.
    #[inline(always)]
    fn text(&self, span: Span) -> Scan<Cow<'a, str>> {
        let text = self.slice(span.start as usize..span.end as usize)?;
        match span.kind {
            Kind::Raw | Kind::Plain => Ok(Cow::Borrowed(text)),
            _ => self.text_slow(text, span.kind),
        }
    }

    #[cold]
    #[inline(never)]
    fn text_slow(&self, text: &'a str, kind: Kind) -> Scan<Cow<'a, str>> {
        match kind {
            Kind::Escaped => unescape(text).map(Cow::Owned),
            _ => Number { text, plain: false }
                .to_text()
                .map(|text| Cow::Owned(text.into_owned())),
        }
    }

    /// [`Scanner::text`], owned.
    #[inline(always)]
    fn owned(&self, span: Span) -> Scan<String> {
        self.text(span).map(Cow::into_owned)
    }

    #[inline(always)]
    fn opt_owned(&self, span: Option<Span>) -> Scan<Option<String>> {
        span.map(|span| self.owned(span)).transpose()
    }

    /// `task_info`: `null` or `{external_task_id}`.
    #[inline(always)]
    fn task_info(&self, i: usize, depth: u32, t: &mut RawTask) -> Scan<usize> {
        let bytes = self.bytes;
        let (is_null, i) = null(bytes, i)?;
        if is_null {
            return Ok(i);
        }
        let depth = deeper(depth)?;
        let mut seen = 0;
        let (mut done, mut i) = open(bytes, struct_start(bytes, i)?, b'{', b'}')?;
        while !done {
            let (name, at_value) = key(bytes, i, &[EXTERNAL_TASK_ID])?;
            i = if name == 0 {
                first_sighting(&mut seen, 1)?;
                let (span, end) = self.opt_string(at_value)?;
                t.external_task_id = span;
                end
            } else {
                skip(bytes, at_value, depth)?
            };
            (done, i) = next_or_close(bytes, i, b'}')?;
        }
        Ok(i)
    }

    /// `task_result`: `null` or `{videos, images}`.
    #[inline(never)]
    fn task_result(&self, i: usize, depth: u32, t: &mut RawTask) -> Scan<usize> {
        let bytes = self.bytes;
        let (is_null, i) = null(bytes, i)?;
        if is_null {
            return Ok(i);
        }
        let depth = deeper(depth)?;
        let mut seen = 0;
        let (mut done, mut i) = open(bytes, struct_start(bytes, i)?, b'{', b'}')?;
        while !done {
            let (name, at_value) = key(bytes, i, &[VIDEOS, IMAGES])?;
            i = match name {
                0 => {
                    first_sighting(&mut seen, 1)?;
                    self.urls(at_value, depth, &mut t.videos)?
                }
                1 => {
                    first_sighting(&mut seen, 2)?;
                    self.urls(at_value, depth, &mut t.images)?
                }
                _ => skip(bytes, at_value, depth)?,
            };
            (done, i) = next_or_close(bytes, i, b'}')?;
        }
        Ok(i)
    }

    /// `billing`: `null` or `[{amount, currency}]`, summed when the items with an amount name
    /// at most one currency, else none (the reference's `billing_cost`). Currencies are
    /// compared as ranges of the body: no copy; the one named is kept as its span.
    #[inline(never)]
    fn billing(&self, i: usize, depth: u32, t: &mut RawTask) -> Scan<usize> {
        let bytes = self.bytes;
        let (is_null, i) = null(bytes, i)?;
        if is_null {
            return Ok(i);
        }
        // `Sum for f64` starts from its own zero: start where it does.
        let mut sum: f64 = std::iter::empty::<f64>().sum();
        // The first currency an item with an amount names, and whether another differs.
        let mut currency: Option<(&[u8], Span)> = None;
        let mut mixed = false;
        let depth = deeper(depth)?;
        let (mut done, mut i) = open(bytes, i, b'[', b']')?;
        while !done {
            let item_depth = deeper(depth)?;
            let mut seen = 0;
            let mut amount = None;
            let mut named: Option<(&[u8], Span)> = None;
            let (mut item_done, mut j) = open(bytes, struct_start(bytes, i)?, b'{', b'}')?;
            while !item_done {
                let (name, at_value) = key(bytes, j, &[AMOUNT, CURRENCY])?;
                j = match name {
                    0 => {
                        first_sighting(&mut seen, 1)?;
                        let (is_null, at_value) = null(bytes, at_value)?;
                        if is_null {
                            at_value
                        } else {
                            if !matches!(at(bytes, at_value), Some(b'-' | b'0'..=b'9')) {
                                return Err(Fallback);
                            }
                            let (n, end) = self.number(at_value)?;
                            let n = n.to_f64()?;
                            // An amount below zero is no cost: the reference's to say.
                            if n < 0.0 {
                                return Err(Fallback);
                            }
                            amount = Some(n);
                            end
                        }
                    }
                    1 => {
                        first_sighting(&mut seen, 2)?;
                        // A string without escapes, or `null`; any other (an escaped text,
                        // a number read as text) is left to the reference.
                        let (span, end) = self.opt_string(at_value)?;
                        if let Some(span) = span {
                            if span.kind != Kind::Raw {
                                return Err(Fallback);
                            }
                            named = bytes
                                .get(span.start as usize..span.end as usize)
                                .map(|name| (name, span));
                        }
                        end
                    }
                    _ => skip(bytes, at_value, item_depth)?,
                };
                (item_done, j) = next_or_close(bytes, j, b'}')?;
            }
            if let Some(amount) = amount {
                sum += amount;
                if let Some(named) = named.filter(|(c, _)| !c.is_empty()) {
                    match currency {
                        None => currency = Some(named),
                        Some((first, _)) => mixed |= first != named.0,
                    }
                }
            }
            (done, i) = next_or_close(bytes, j, b']')?;
        }
        // A sum past `f64` is no cost: the reference's to say.
        if !sum.is_finite() {
            return Err(Fallback);
        }
        (t.billing, t.currency) = if mixed {
            (None, None)
        } else {
            (Some(sum), currency.map(|(_, span)| span))
        };
        Ok(i)
    }

    /// `tasks` (a page): `null` or an array of task objects.
    #[inline(never)]
    fn page(&self, i: usize, depth: u32, t: &mut RawTask) -> Scan<usize> {
        let bytes = self.bytes;
        let (is_null, i) = null(bytes, i)?;
        if is_null {
            return Ok(i);
        }
        let mut page = Vec::new();
        let depth = deeper(depth)?;
        let (mut done, mut i) = open(bytes, i, b'[', b']')?;
        while !done {
            let mut task = RawTask::default();
            i = self.task(struct_start(bytes, i)?, depth, &mut task)?;
            self.report(&mut task, |report| page.push(report))?;
            (done, i) = next_or_close(bytes, i, b']')?;
        }
        t.page = Some(page);
        Ok(i)
    }

    /// An `Option<Vec<{url: Option<Cow<str>>}>>` value: pushes each `url` to `urls`.
    #[inline(never)]
    fn urls(&self, i: usize, depth: u32, urls: &mut Vec<String>) -> Scan<usize> {
        let bytes = self.bytes;
        let (is_null, i) = null(bytes, i)?;
        if is_null {
            return Ok(i);
        }
        let depth = deeper(depth)?;
        let (mut done, mut i) = open(bytes, i, b'[', b']')?;
        while !done {
            let item_depth = deeper(depth)?;
            let mut seen = 0;
            let (mut item_done, mut j) = open(bytes, struct_start(bytes, i)?, b'{', b'}')?;
            while !item_done {
                // `id` and `duration` (in every video Kling reports) are skipped, but known by
                // a word compare instead of the search for the end of a key.
                let (name, at_value) = key(bytes, j, &[URL, ID, DURATION])?;
                j = if name == 0 {
                    first_sighting(&mut seen, 1)?;
                    let (piece, end) = self.opt_piece(at_value)?;
                    if let Some(url) = piece {
                        let url = url.into_string();
                        if urls.is_empty() {
                            // Most tasks report one URL: a list of just it is one allocation
                            // of its size, not a push's growth path (room for four).
                            *urls = vec![url];
                        } else {
                            urls.push(url);
                        }
                    }
                    end
                } else {
                    skip(bytes, at_value, item_depth)?
                };
                (item_done, j) = next_or_close(bytes, j, b'}')?;
            }
            (done, i) = next_or_close(bytes, j, b']')?;
        }
        Ok(i)
    }
}

/// One level deeper, unless that is beyond [`MAX_DEPTH`].
fn deeper(depth: u32) -> Scan<u32> {
    if depth >= MAX_DEPTH {
        Err(Fallback)
    } else {
        Ok(depth + 1)
    }
}
