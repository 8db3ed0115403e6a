//! A single-pass reader for the envelopes Kling sends, standing in for the typed serde_json
//! parse ([`Envelope::parse_reference`](super::Envelope::parse_reference)): no visitor
//! machinery, no owned copy of what the stack only looks at, SWAR searches through strings and
//! digits.
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

use super::{Envelope, TaskReport, TaskStatus};
use crate::code::Code;
use crate::request::ApiGeneration;

#[cfg(test)]
mod tests;

/// Containers nested deeper than this are left to serde_json (whose own limit is 128).
const MAX_DEPTH: u32 = 64;

/// The scanner met something it leaves to the serde_json reference (including every error, so
/// error messages stay serde_json's).
#[derive(Debug)]
pub(crate) struct Fallback;

type Scan<T> = Result<T, Fallback>;

/// A string value as read: a range of the body when it has no escape, else unescaped.
#[derive(Debug)]
pub(crate) enum Piece<'a> {
    /// Unescaped text at `range` of the body.
    Raw(&'a str, Range<usize>),
    /// Text that had escapes, unescaped.
    Unescaped(String),
}

impl Piece<'_> {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Piece::Raw(text, _) => text,
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
            Piece::Raw(text, _) => text.to_owned(),
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
}

impl Head<'_> {
    /// The owned envelope, as the reference builds it.
    pub(crate) fn into_envelope(self, tasks: Reports) -> Envelope {
        Envelope {
            code: Code::from_i64(self.code),
            message: self.message.map(Piece::into_string).unwrap_or_default(),
            request_id: self.request_id.map(Piece::into_string),
            tasks: tasks.into_vec(),
        }
    }
}

/// Reads an envelope, its tasks into `tasks`, or gives up ([`Fallback`]) where the reference
/// must decide (`tasks` then holds any part).
pub(crate) fn scan<'a>(text: &'a str, tasks: &mut Reports) -> Scan<Head<'a>> {
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    let envelope = s.envelope(tasks)?;
    match s.peek() {
        None => Ok(envelope),
        Some(_) => Err(Fallback),
    }
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

/// A number as written: its text, and whether it is a short plain integer (at most 18 digits,
/// no fraction or exponent, not `-0`), which reads the same as an `i64`, `u64` or `f64`.
struct Number<'a> {
    text: &'a str,
    plain: bool,
}

impl Number<'_> {
    /// serde_json's value of the number, as the reference's `Text` would print it.
    fn to_text(&self) -> Scan<Cow<'_, str>> {
        if self.plain {
            return Ok(Cow::Borrowed(self.text));
        }
        let n: serde_json::Number = self.text.parse().map_err(|_| Fallback)?;
        Ok(Cow::Owned(if let Some(u) = n.as_u64() {
            u.to_string()
        } else if let Some(i) = n.as_i64() {
            i.to_string()
        } else {
            n.as_f64().ok_or(Fallback)?.to_string()
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

/// A task object of either generation (or a page), as read before deciding what it reports;
/// the scanner's `RawTask`.
#[derive(Default)]
struct RawTask<'a> {
    seen: u16,
    task_id: Option<Cow<'a, str>>,
    task_status: Option<Piece<'a>>,
    task_status_msg: Option<Piece<'a>>,
    external_task_id: Option<Piece<'a>>,
    /// `task_result` was present: its video and image URLs.
    videos: Vec<String>,
    images: Vec<String>,
    final_unit_deduction: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
    status: Option<Piece<'a>>,
    message: Option<Piece<'a>>,
    external_id: Option<Piece<'a>>,
    outputs: Vec<String>,
    billing: Option<f64>,
    page: Option<Vec<TaskReport>>,
}

impl RawTask<'_> {
    /// The report, with the reference's rules: legacy when `task_id` and `task_status` are
    /// both there, else new when `id` and `status` are, else none.
    #[inline(always)]
    fn take_report(&mut self) -> Option<TaskReport> {
        if self.task_id.is_some() && self.task_status.is_some() {
            let (Some(id), Some(status)) = (self.task_id.take(), &self.task_status) else {
                return None;
            };
            let mut urls = std::mem::take(&mut self.videos);
            if urls.is_empty() {
                urls = std::mem::take(&mut self.images);
            } else {
                urls.append(&mut self.images);
            }
            return Some(TaskReport {
                id: id.into_owned(),
                status: TaskStatus::parse(status.as_str()),
                generation: ApiGeneration::Legacy,
                external_id: self.external_task_id.take().map(Piece::into_string),
                failure: self.task_status_msg.take().map(Piece::into_string),
                urls,
                cost: self
                    .final_unit_deduction
                    .as_deref()
                    .and_then(|d| d.trim().parse().ok()),
            });
        }
        let (Some(id), Some(status)) = (self.id.take(), &self.status) else {
            return None;
        };
        Some(TaskReport {
            id: id.into_owned(),
            status: TaskStatus::parse(status.as_str()),
            generation: ApiGeneration::New,
            external_id: self.external_id.take().map(Piece::into_string),
            failure: self.message.take().map(Piece::into_string),
            urls: std::mem::take(&mut self.outputs),
            cost: self.billing,
        })
    }
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
    // Eight bytes at a time: a byte is flagged when it equals `"` or `\`, or is below 0x20.
    // Borrows only flag bytes above a true hit, so the lowest flag is the first hit.
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
    // clear high nibble; no carry crosses bytes, so every flag is exact.
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ (LO * u64::from(b'0'));
        let not_digit = (x & (LO * 0xF0)) | (((x & (LO * 0x0F)) + LO * 0x06) & (LO * 0x10));
        if not_digit != 0 {
            return i + (not_digit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while bytes.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
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

/// Unescapes string content whose escapes [`Scanner::string`] checked (strictly: no surrogate).
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

impl<'a> Scanner<'a> {
    /// The next byte after JSON whitespace, not consumed.
    #[inline]
    fn peek(&mut self) -> Option<u8> {
        match self.bytes.get(self.pos) {
            Some(&b) if b > b' ' => Some(b),
            _ => self.peek_after_whitespace(),
        }
    }

    #[cold]
    fn peek_after_whitespace(&mut self) -> Option<u8> {
        while let Some(&b) = self.bytes.get(self.pos) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    /// Consumes `b` (after whitespace).
    #[inline(always)]
    fn eat(&mut self, b: u8) -> Scan<()> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(Fallback)
        }
    }

    /// After a value inside a container: `true` at the closing `close` (consumed), `false`
    /// after a comma (consumed).
    #[inline(always)]
    fn next_or_close(&mut self, close: u8) -> Scan<bool> {
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok(false)
            }
            Some(b) if b == close => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(Fallback),
        }
    }

    /// Consumes `open` and tells whether the container is empty (its `close` then consumed
    /// too).
    #[inline(always)]
    fn open(&mut self, open: u8, close: u8) -> Scan<bool> {
        self.eat(open)?;
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// A string at the cursor (whitespace skipped): its content range and whether it has
    /// escapes. `strict` refuses surrogate escapes, which serde_json checks in a string it
    /// reads (lone ones are errors) but not in one it skips.
    #[inline(always)]
    fn string(&mut self, strict: bool) -> Scan<(Range<usize>, bool)> {
        self.eat(b'"')?;
        let start = self.pos;
        let escaped = self.string_rest(strict)?;
        Ok((start..self.pos - 1, escaped))
    }

    /// The rest of a string after its opening quote: moves past the closing quote and tells
    /// whether there were escapes.
    #[inline(always)]
    fn string_rest(&mut self, strict: bool) -> Scan<bool> {
        let i = find_special(self.bytes, self.pos);
        if self.bytes.get(i) == Some(&b'"') {
            self.pos = i + 1;
            return Ok(false);
        }
        self.string_escaped(i, strict).map(|()| true)
    }

    /// [`Scanner::string_rest`] from the first `\\` or control character at `i`.
    #[cold]
    #[inline(never)]
    fn string_escaped(&mut self, mut i: usize, strict: bool) -> Scan<()> {
        let bytes = self.bytes;
        loop {
            match bytes.get(i) {
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(());
                }
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

    /// A string value the reference reads (a `Cow<str>`).
    #[inline(always)]
    fn piece(&mut self) -> Scan<Piece<'a>> {
        let (range, escaped) = self.string(true)?;
        let text = &self.text[range.clone()];
        Ok(if escaped {
            Piece::Unescaped(unescape(text)?)
        } else {
            Piece::Raw(text, range)
        })
    }

    /// An object key and its colon: its index in `known`, or past the end for any other key.
    /// A known key is recognised by its bytes and closing quote, without a scan; escaped keys
    /// are left to the reference (serde matches field names after unescaping).
    #[inline(always)]
    fn key(&mut self, known: &[&[u8]]) -> Scan<usize> {
        self.eat(b'"')?;
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        let mut index = known.len();
        for (i, name) in known.iter().enumerate() {
            if rest.first() == name.first()
                && rest.get(name.len()) == Some(&b'"')
                && rest.starts_with(name)
            {
                index = i;
                break;
            }
        }
        if let Some(name) = known.get(index) {
            self.pos += name.len() + 1;
        } else if self.string_rest(true)? {
            return Err(Fallback);
        }
        self.eat(b':')?;
        Ok(index)
    }

    /// A number at the cursor (whitespace skipped), checked against JSON's grammar.
    #[inline(always)]
    fn number(&mut self) -> Scan<Number<'a>> {
        let start = self.pos;
        let plain = self.number_end()?;
        Ok(Number {
            text: self.text.get(start..self.pos).ok_or(Fallback)?,
            plain,
        })
    }

    /// Moves past a number at the cursor, checking JSON's grammar; tells whether it is plain
    /// (see [`Number`]).
    #[inline(always)]
    fn number_end(&mut self) -> Scan<bool> {
        let bytes = self.bytes;
        let mut i = self.pos;
        let negative = bytes.get(i) == Some(&b'-');
        if negative {
            i += 1;
        }
        let int_start = i;
        match bytes.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits_end(bytes, i + 1),
            _ => return Err(Fallback),
        }
        let mut plain = i - int_start <= 18 && !(negative && bytes[int_start] == b'0');
        if bytes.get(i) == Some(&b'.') {
            plain = false;
            let digits = i + 1;
            i = digits_end(bytes, digits);
            if i == digits {
                return Err(Fallback);
            }
        }
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            plain = false;
            i += 1;
            if matches!(bytes.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let digits = i;
            i = digits_end(bytes, digits);
            if i == digits {
                return Err(Fallback);
            }
        }
        self.pos = i;
        Ok(plain)
    }

    /// `null`, `true` or `false` at the cursor.
    #[inline(always)]
    fn literal(&mut self, word: &[u8]) -> Scan<()> {
        if self.bytes.get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Fallback)
        }
    }

    /// Whether the next value is `null` (consumed if so): serde reads `null` as `None`.
    #[inline(always)]
    fn null(&mut self) -> Scan<bool> {
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Skips any value, checking it as serde_json's `ignore_value` does (or more strictly).
    #[inline(always)]
    fn skip(&mut self, depth: u32) -> Scan<()> {
        match self.peek().ok_or(Fallback)? {
            b'"' => {
                self.pos += 1;
                self.string_rest(false).map(drop)
            }
            b'-' | b'0'..=b'9' => self.number_end().map(drop),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            _ => self.skip_container(depth),
        }
    }

    /// [`Scanner::skip`] of an array or object.
    #[inline(never)]
    fn skip_container(&mut self, depth: u32) -> Scan<()> {
        match self.peek().ok_or(Fallback)? {
            b'[' => {
                let depth = deeper(depth)?;
                if self.open(b'[', b']')? {
                    return Ok(());
                }
                loop {
                    self.skip(depth)?;
                    if self.next_or_close(b']')? {
                        return Ok(());
                    }
                }
            }
            b'{' => {
                let depth = deeper(depth)?;
                if self.open(b'{', b'}')? {
                    return Ok(());
                }
                loop {
                    self.eat(b'"')?;
                    self.string_rest(false)?;
                    self.eat(b':')?;
                    self.skip(depth)?;
                    if self.next_or_close(b'}')? {
                        return Ok(());
                    }
                }
            }
            _ => Err(Fallback),
        }
    }

    /// Runs `field` for each key of an object (the cursor at its `{`), with the key's index in
    /// `known`, or past the end for any other key.
    #[inline(always)]
    fn object(
        &mut self,
        depth: u32,
        known: &[&[u8]],
        mut field: impl FnMut(&mut Self, usize, u32) -> Scan<()>,
    ) -> Scan<()> {
        let depth = deeper(depth)?;
        if self.open(b'{', b'}')? {
            return Ok(());
        }
        loop {
            let key = self.key(known)?;
            field(self, key, depth)?;
            if self.next_or_close(b'}')? {
                return Ok(());
            }
        }
    }

    /// Runs `element` for each element of an array (the cursor at its `[`).
    #[inline(always)]
    fn array(
        &mut self,
        depth: u32,
        mut element: impl FnMut(&mut Self, u32) -> Scan<()>,
    ) -> Scan<()> {
        let depth = deeper(depth)?;
        if self.open(b'[', b']')? {
            return Ok(());
        }
        loop {
            element(self, depth)?;
            if self.next_or_close(b']')? {
                return Ok(());
            }
        }
    }

    /// The top-level object.
    fn envelope(&mut self, tasks: &mut Reports) -> Scan<Head<'a>> {
        let mut seen = 0;
        let mut code = None;
        let mut message = None;
        let mut request_id = None;
        const KEYS: &[&[u8]] = &[b"code", b"message", b"request_id", b"data"];
        self.object(0, KEYS, |s, key, depth| match key {
            0 => {
                first_sighting(&mut seen, 1)?;
                if !matches!(s.peek(), Some(b'-' | b'0'..=b'9')) {
                    return Err(Fallback);
                }
                let n = s.number()?;
                if !n.plain {
                    return Err(Fallback);
                }
                code = Some(n.text.parse::<i64>().map_err(|_| Fallback)?);
                Ok(())
            }
            1 => {
                first_sighting(&mut seen, 2)?;
                message = s.opt_piece()?;
                Ok(())
            }
            2 => {
                first_sighting(&mut seen, 4)?;
                request_id = s.opt_piece()?;
                Ok(())
            }
            3 => {
                first_sighting(&mut seen, 8)?;
                s.data(depth, tasks)
            }
            _ => s.skip(depth),
        })?;
        Ok(Head {
            code: code.ok_or(Fallback)?,
            message,
            request_id,
        })
    }

    /// An `Option<Cow<str>>` value: `null` or a string.
    #[inline(always)]
    fn opt_piece(&mut self) -> Scan<Option<Piece<'a>>> {
        if self.null()? {
            return Ok(None);
        }
        self.piece().map(Some)
    }

    /// An `Option<Text>` value: `null`, a string, or a number kept as text.
    #[inline(always)]
    fn opt_text(&mut self) -> Scan<Option<Cow<'a, str>>> {
        match self.peek() {
            Some(b'n') => self.literal(b"null").map(|()| None),
            Some(b'"') => Ok(Some(match self.piece()? {
                Piece::Raw(text, _) => Cow::Borrowed(text),
                Piece::Unescaped(text) => Cow::Owned(text),
            })),
            Some(b'-' | b'0'..=b'9') => {
                let n = self.number()?;
                Ok(Some(match n.to_text()? {
                    Cow::Borrowed(_) => Cow::Borrowed(n.text),
                    Cow::Owned(text) => Cow::Owned(text),
                }))
            }
            _ => Err(Fallback),
        }
    }

    /// `data`, or an element of it: what the reference's `TasksVisitor` reads with
    /// `deserialize_any` (so strings and numbers are checked as read, not as skipped).
    fn data(&mut self, depth: u32, tasks: &mut Reports) -> Scan<()> {
        match self.peek().ok_or(Fallback)? {
            b'{' => {
                let mut task = RawTask::default();
                self.task(depth, &mut task)?;
                if let Some(page) = task.page.take() {
                    for report in page {
                        tasks.push(report);
                    }
                } else if let Some(report) = task.take_report() {
                    tasks.push(report);
                }
                Ok(())
            }
            b'[' => self.array(depth, |s, depth| s.data(depth, tasks)),
            b'"' => {
                self.pos += 1;
                self.string_rest(true).map(drop)
            }
            b'-' | b'0'..=b'9' => self.number()?.to_f64().map(drop),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            _ => Err(Fallback),
        }
    }

    /// A task object (the cursor at its `{`), with the reference's `RawTask` fields.
    fn task(&mut self, depth: u32, t: &mut RawTask<'a>) -> Scan<()> {
        // The reference's `RawTask` fields, in the order of the `match` below.
        const KEYS: &[&[u8]] = &[
            b"task_id",
            b"task_status",
            b"task_status_msg",
            b"task_info",
            b"task_result",
            b"final_unit_deduction",
            b"id",
            b"status",
            b"message",
            b"external_id",
            b"outputs",
            b"billing",
            b"tasks",
        ];
        self.object(depth, KEYS, |s, key, depth| {
            match key {
                0 => {
                    first_sighting(&mut t.seen, 1)?;
                    t.task_id = s.opt_text()?;
                }
                1 => {
                    first_sighting(&mut t.seen, 1 << 1)?;
                    t.task_status = s.opt_piece()?;
                }
                2 => {
                    first_sighting(&mut t.seen, 1 << 2)?;
                    t.task_status_msg = s.opt_piece()?;
                }
                3 => {
                    first_sighting(&mut t.seen, 1 << 3)?;
                    if !s.null()? {
                        s.struct_start()?;
                        let mut seen = 0;
                        s.object(depth, &[b"external_task_id"], |s, key, depth| match key {
                            0 => {
                                first_sighting(&mut seen, 1)?;
                                t.external_task_id = s.opt_piece()?;
                                Ok(())
                            }
                            _ => s.skip(depth),
                        })?;
                    }
                }
                4 => {
                    first_sighting(&mut t.seen, 1 << 4)?;
                    if !s.null()? {
                        s.struct_start()?;
                        let mut seen = 0;
                        s.object(depth, &[b"videos", b"images"], |s, key, depth| match key {
                            0 => {
                                first_sighting(&mut seen, 1)?;
                                s.urls(depth, &mut t.videos)
                            }
                            1 => {
                                first_sighting(&mut seen, 2)?;
                                s.urls(depth, &mut t.images)
                            }
                            _ => s.skip(depth),
                        })?;
                    }
                }
                5 => {
                    first_sighting(&mut t.seen, 1 << 5)?;
                    t.final_unit_deduction = s.opt_text()?;
                }
                6 => {
                    first_sighting(&mut t.seen, 1 << 6)?;
                    t.id = s.opt_text()?;
                }
                7 => {
                    first_sighting(&mut t.seen, 1 << 7)?;
                    t.status = s.opt_piece()?;
                }
                8 => {
                    first_sighting(&mut t.seen, 1 << 8)?;
                    t.message = s.opt_piece()?;
                }
                9 => {
                    first_sighting(&mut t.seen, 1 << 9)?;
                    t.external_id = s.opt_piece()?;
                }
                10 => {
                    first_sighting(&mut t.seen, 1 << 10)?;
                    s.urls(depth, &mut t.outputs)?;
                }
                11 => {
                    first_sighting(&mut t.seen, 1 << 11)?;
                    if !s.null()? {
                        // `Sum for f64` starts from its own zero: start where it does.
                        let mut sum: f64 = std::iter::empty::<f64>().sum();
                        s.array(depth, |s, depth| {
                            s.struct_start()?;
                            let mut seen = 0;
                            s.object(depth, &[b"amount"], |s, key, depth| match key {
                                0 => {
                                    first_sighting(&mut seen, 1)?;
                                    if s.null()? {
                                        return Ok(());
                                    }
                                    if !matches!(s.peek(), Some(b'-' | b'0'..=b'9')) {
                                        return Err(Fallback);
                                    }
                                    sum += s.number()?.to_f64()?;
                                    Ok(())
                                }
                                _ => s.skip(depth),
                            })
                        })?;
                        t.billing = Some(sum);
                    }
                }
                12 => {
                    first_sighting(&mut t.seen, 1 << 12)?;
                    if !s.null()? {
                        let mut page = Vec::new();
                        s.array(depth, |s, depth| {
                            s.struct_start()?;
                            let mut task = RawTask::default();
                            s.task(depth, &mut task)?;
                            page.extend(task.take_report());
                            Ok(())
                        })?;
                        t.page = Some(page);
                    }
                }
                _ => s.skip(depth)?,
            }
            Ok(())
        })
    }

    /// Where serde expects a struct: an object. (serde_json would also take an array, by
    /// position; that is left to the reference.)
    #[inline(always)]
    fn struct_start(&mut self) -> Scan<()> {
        if self.peek() == Some(b'{') {
            Ok(())
        } else {
            Err(Fallback)
        }
    }

    /// An `Option<Vec<{url: Option<Cow<str>>}>>` value: pushes each `url` to `urls`.
    #[inline(always)]
    fn urls(&mut self, depth: u32, urls: &mut Vec<String>) -> Scan<()> {
        if self.null()? {
            return Ok(());
        }
        self.array(depth, |s, depth| {
            s.struct_start()?;
            let mut seen = 0;
            s.object(depth, &[b"url"], |s, key, depth| match key {
                0 => {
                    first_sighting(&mut seen, 1)?;
                    if let Some(url) = s.opt_piece()? {
                        urls.push(url.into_string());
                    }
                    Ok(())
                }
                _ => s.skip(depth),
            })
        })
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
