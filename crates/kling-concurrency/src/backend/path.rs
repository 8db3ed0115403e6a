//! Legacy create paths read as kling-core reads them ([`kling_core::Route::of`]), so that one
//! create path written two ways (`text2video;jsessionid=1`, `videos//text2video`,
//! `videos%2Ftext2video`, `x/../text2video`) is one [`CreatePath`].

use std::cell::Cell;

use http::Method;
use kling_core::{ApiGeneration, RequestKind, Route};

use super::CreatePath;

/// How long a create path [`remembered`] keeps may be: Kling's legacy create paths
/// (`/v1/videos/avatar/image2video`) with a short prefix.
const REMEMBERED: usize = 48;

/// A create path a thread read last, and its reading.
#[derive(Clone, Copy)]
struct LastRead {
    /// Its length (`usize::MAX`: none yet).
    len: usize,
    path: [u8; REMEMBERED],
    read: CreatePath,
}

thread_local! {
    // Const-initialised and without a destructor: no lazy-initialisation check per read.
    static LAST_READ: Cell<LastRead> = const {
        Cell::new(LastRead {
            len: usize::MAX,
            path: [0; REMEMBERED],
            read: CreatePath::UNKNOWN,
        })
    };
}

/// `read(path)`, kept for the path this thread read last: a process sends its creates to a
/// few create paths, and reading one (its plain check and hash) cost some 200 instructions a
/// create by callgrind, comparing it with the last one read some 30.
#[inline]
pub(super) fn remembered(path: &str, read: impl FnOnce(&str) -> CreatePath) -> CreatePath {
    LAST_READ.with(|last| {
        let known = last.get();
        if known.path.get(..known.len) == Some(path.as_bytes()) {
            return known.read;
        }
        let reading = read(path);
        if let Some(kept) = known.path.get(..path.len()) {
            let mut kept_path = [0; REMEMBERED];
            kept_path[..kept.len()].copy_from_slice(path.as_bytes());
            last.set(LastRead {
                len: path.len(),
                path: kept_path,
                read: reading,
            });
        }
        reading
    })
}

/// Whether `path` (its trailing `/`s trimmed) is read as written: no `;` (parameters), no `%`
/// (escapes), no empty segment (`//`) and no segment starting with a `.` (a dot segment, or
/// a name a plain reading keeps). The common path; checked eight bytes at a time, as
/// kling-core finds its `/`s.
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const ONES: u64 = 0x0101_0101_0101_0101;
const SLASHES: u64 = 0x2f2f_2f2f_2f2f_2f2f;
const PERCENTS: u64 = 0x2525_2525_2525_2525;
const SEMICOLONS: u64 = 0x3b3b_3b3b_3b3b_3b3b;

/// The high bit of every zero byte of `x`, and of a byte 0x01 above a zero byte (a borrow).
#[inline(always)]
fn any_zero(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & !LOW7
}

/// Not zero when the word `word` of a path's bytes holds a `;` or a `%`, or (`pairs`) a `/`
/// followed by a `/` or a `.` (`after`: the byte after the word). A borrow's mark is never
/// one of a path that has none: a `.` marked as a `/` (0x2e is 0x2f ^ 0x01) stands after one,
/// which is itself marked; a byte's next one has its low bit set, so is never marked so.
#[inline(always)]
fn marks(word: u64, after: u8, pairs: bool) -> u64 {
    let mut marks = any_zero(word ^ PERCENTS) | any_zero(word ^ SEMICOLONS);
    if pairs {
        // Each byte's next one, at its place, its low bit set: `.` (0x2e) and `/` (0x2f) are
        // then both `/`.
        let next = ((word >> 8) | (u64::from(after) << 56)) | ONES;
        marks |= any_zero(word ^ SLASHES) & any_zero(next ^ SLASHES);
    }
    marks
}

/// Whether no word of `bytes` has [`marks`], eight bytes at a time (zeros past the end match
/// nothing), as kling-core finds its `/`s.
#[inline(always)]
fn unmarked(bytes: &[u8], pairs: bool) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        at += 8;
        if marks(word, bytes.get(at).copied().unwrap_or(0), pairs) != 0 {
            return false;
        }
    }
    let rest = chunks.remainder().len();
    if rest == 0 {
        return true;
    }
    // The eight bytes that end `bytes`, shifted so that the ones already seen drop out and
    // zeros come in; one shorter than a word is read bytewise.
    let word = match bytes.last_chunk::<8>() {
        Some(last) => u64::from_le_bytes(*last) >> (8 * (8 - rest)),
        None => bytes
            .iter()
            .rev()
            .fold(0, |word, &byte| (word << 8) | u64::from(byte)),
    };
    marks(word, 0, pairs) == 0
}

/// Whether `path` (its trailing `/`s trimmed) is read as written: no `;` (parameters), no `%`
/// (escapes), no empty segment (`//`) and no segment starting with a `.` (a dot segment, or
/// a name a plain reading keeps). The common path.
#[inline]
pub(super) fn is_plain(path: &[u8]) -> bool {
    path.first() != Some(&b'.') && unmarked(path, true)
}

/// The text of a (trimmed, not plain) legacy create path as kling-core reads it
/// ([`Route::read_path`]): each segment's `;` parameters removed (as Tomcat and Spring remove
/// them), escapes of unreserved characters decoded, dot segments and empty segments removed,
/// a `%2F` a `/` where that reading is a create (kling-core takes it then), RFC 3986's removal
/// of dot segments before the one that merges `//`s first. Segments joined by `/`, with a
/// leading `/` when the path has one, so that a plain path is its own reading.
#[cold]
#[inline(never)]
pub(super) fn normalized(path: &str) -> String {
    let mut first = None;
    for (unescape_slashes, merge_first) in
        [(true, false), (true, true), (false, false), (false, true)]
    {
        let text = Route::read_path(path, unescape_slashes, merge_first);
        let route = Route::of(&Method::POST, &text);
        if route.kind == RequestKind::Create && route.generation == Some(ApiGeneration::Legacy) {
            return text;
        }
        first.get_or_insert(text);
    }
    first.expect("four readings")
}

/// The create path part of a (trimmed, not plain) legacy single-task query path, as
/// kling-core reads the query: everything before the task id it finds (`None` when it reads
/// no legacy query there).
#[cold]
#[inline(never)]
pub(super) fn query_create_path(path: &str) -> Option<&str> {
    let route = Route::of(&Method::GET, path);
    if route.kind != RequestKind::Query || route.generation != Some(ApiGeneration::Legacy) {
        return None;
    }
    // The task id is a part of `path` (kling-core gives it as written).
    let id = route.task_id?;
    let start = (id.as_ptr() as usize).checked_sub(path.as_ptr() as usize)?;
    path.get(..start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_is_exactly_no_parameter_escape_empty_or_dot_led_segment() {
        // Every string of up to 6 symbols over `/`, `a`, `.`, `%`, `;`, and `$` and `:` (one
        // above `%` and `;`, which a borrow marks): every position around the 8-byte words
        // (with a prefix to shift them).
        let symbols = ["/", "a", ".", "%", ";", "$", ":"];
        let mut strings = vec![String::new()];
        for _ in 0..6 {
            strings = strings
                .iter()
                .flat_map(|s| symbols.iter().map(move |c| format!("{s}{c}")))
                .collect();
            for s in &strings {
                for prefix in ["", "/abcdef", "/abcdefg"] {
                    let path = format!("{prefix}{s}");
                    let expected = !path.contains([';', '%'])
                        && !path.contains("//")
                        && !path.contains("/.")
                        && !path.starts_with('.');
                    assert_eq!(is_plain(path.as_bytes()), expected, "{path:?}");
                }
            }
        }
    }

    /// A path read just before on the same thread is not read again; any other path is (only
    /// the last one is kept, and none longer than [`REMEMBERED`] bytes), also one as long as
    /// it, and the empty path is not taken for the "none yet" it starts with.
    #[test]
    fn only_the_path_read_last_is_remembered() {
        std::thread::spawn(|| {
            let reads = Cell::new(0);
            let read = |path: &str| {
                reads.set(reads.get() + 1);
                CreatePath::hashed(path)
            };
            let long = format!("/{}", "x".repeat(REMEMBERED));
            let text2video = "/v1/videos/text2video";
            for (path, read_again) in [
                ("", true),
                ("", false),
                (text2video, true),
                (text2video, false),
                ("/v1/videos/text2vide", true),
                (text2video, true),
                // As long as the last one, another byte first or last: another path.
                ("/v1/videos/text2videx", true),
                ("_v1/videos/text2videx", true),
                (text2video, true),
                ("/v1/videos/text2video/", true),
                (&long[..REMEMBERED], true),
                (&long[..REMEMBERED], false),
                (&long, true),
                (&long, true),
            ] {
                let before = reads.get();
                assert_eq!(remembered(path, read), CreatePath::hashed(path), "{path:?}");
                assert_eq!(reads.get() > before, read_again, "{path:?}");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_plain_path_is_its_own_reading() {
        for path in [
            "/v1/videos/text2video",
            "/a.b/v1/images/generations",
            "v1/videos/x",
            "",
        ] {
            assert!(is_plain(path.as_bytes()), "{path}");
            assert_eq!(normalized(path), path);
        }
    }

    /// One legacy create path written every way kling-core reads as it is one [`CreatePath`],
    /// and the create path of a query of it written every such way too; other endpoints and
    /// base paths are others.
    #[test]
    fn a_create_path_written_another_way_is_the_same() {
        use super::super::CreatePath;

        let text2video = CreatePath::legacy("/v1/videos/text2video");
        for path in [
            "/v1/videos/text2video/",
            "/v1/videos/text2video;jsessionid=1",
            "/v1;a=b/videos;c/text2video;d/",
            "/v1/videos/text2video/;x",
            "//v1//videos///text2video//",
            "/v1/videos%2Ftext2video",
            "/v1%2fvideos%2Ftext2video%2F",
            "/v1/%76ideos/text2vide%6F",
            "/v1/videos/x/../text2video",
            "/v1/videos/x/..;/text2video",
            "/v1/videos/./text2video/.",
            "/v1/images/../videos/text2video",
        ] {
            assert_eq!(CreatePath::legacy(path), text2video, "{path}");
        }
        for query in [
            "/v1/videos/text2video/abc",
            "/v1/videos/text2video/abc/",
            "/v1/videos/text2video;jsessionid=1/abc",
            "/v1/videos/text2video/abc;jsessionid=1",
            "/v1/videos/text2video/abc/;x",
            "/v1/videos/text2video//abc",
            "/v1//videos/text2video/abc",
            "/v1%2Fvideos%2Ftext2video/abc",
            "/v1/videos/x/..;/text2video/abc",
            "/v1/videos/text2video/./abc",
        ] {
            assert_eq!(CreatePath::of_legacy_query(query), text2video, "{query}");
        }
        for other in [
            "/v1/videos/image2video",
            "/v1/videos/image2video;x",
            "/proxy/v1/videos/text2video",
            "/proxy;p/v1/videos/text2video",
            "/v1/videos/text2video%3Bx",
        ] {
            assert_ne!(CreatePath::legacy(other), text2video, "{other}");
        }
        // A path kling-core reads as no legacy query names no create path.
        for query in [
            "/v1/videos/text2video;x",
            "/tasks;x",
            "/v1/videos/text2video/a/b;x",
        ] {
            assert_eq!(
                CreatePath::of_legacy_query(query),
                CreatePath::UNKNOWN,
                "{query}"
            );
        }
    }

    /// The query path's fast reading (the create path before its last `/`, for a plain one
    /// and an id that is no dot segment and has no parameters) agrees with kling-core's
    /// reading of every query: the create path before the task id it finds.
    #[test]
    fn a_query_is_of_the_create_path_kling_core_reads_before_its_id() {
        use super::super::CreatePath;

        let symbols = ["a", ".", ";", "/", "%2F", "%2E", "%61", "=", "é", "..;"];
        let mut tails = vec![String::new()];
        let mut checked = 0;
        for _ in 0..4 {
            tails = tails
                .iter()
                .flat_map(|s| symbols.iter().map(move |c| format!("{s}{c}")))
                .collect();
            for tail in &tails {
                for prefix in [
                    "/v1/videos/text2video",
                    "/p/v1/images/generations",
                    "/v1/videos/avatar/image2video",
                    "/v1;x/videos/text2video",
                    "/v1//videos/text2video",
                ] {
                    let path = format!("{prefix}/{tail}");
                    let route = Route::of(&Method::GET, &path);
                    let Some(id) = route.task_id else {
                        continue;
                    };
                    let start = id.as_ptr() as usize - path.as_ptr() as usize;
                    assert_eq!(
                        CreatePath::of_legacy_query(&path),
                        CreatePath::legacy(&path[..start]),
                        "{path}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000, "{checked}");
    }
}
