//! The `kling-mock` binary: its first stdout line and its flag errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_kling-mock");

/// Kills the child even when an assertion fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_prints_its_listening_line_first_and_serves() {
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args([
                "--preset",
                "free",
                "--port",
                "0",
                "--speed",
                "60",
                "--retry-after",
                "seconds",
                "--pool-scope",
                "product",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kling-mock"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read line");
    let port: u16 = line
        .trim_end()
        .strip_prefix("listening on http://127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("port");
    assert_ne!(port, 0);
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /__mock/stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("requests_total"));
}

#[test]
fn invalid_flags_are_rejected_naming_the_flag() {
    for (args, flag) in [
        (&["--preset", "gold"][..], "--preset"),
        (&["--bogus"][..], "--bogus"),
        (&["--task-duration", "9..3"][..], "--task-duration"),
        (&["--retry-after", "later"][..], "--retry-after"),
        (
            &["--credit-period-secs", "a day"][..],
            "--credit-period-secs",
        ),
        (&["--costs-per-second", "often"][..], "--costs-per-second"),
        (&["--pool-scope", "account"][..], "--pool-scope"),
        (&["--pool-slots", "video"][..], "--pool-slots"),
    ] {
        let out = Command::new(BIN)
            .args(args)
            .output()
            .expect("run kling-mock");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
