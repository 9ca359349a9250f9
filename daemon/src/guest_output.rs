//! What a component guest writes to its stdout and stderr: lines in the node's log (journald
//! under systemd), tagged with the function and the stream, at a rate the function's guests
//! share.
//!
//! A component's stdout is not its HTTP response (that is `wasi:http`'s), so both streams are
//! diagnostics: a middleware logging each path, a panic message. Guests are hostile, so a
//! line is cut at [`MAX_LINE`] bytes, control characters are escaped (a guest cannot forge log
//! lines or terminal sequences), and a function gets [`BURST`] lines at once and
//! [`LINES_PER_SECOND`] after that; what is over is counted and reported, not written.
//!
//! WASI p1 commands keep their own pipes (stdout is the CGI response); what a failed command
//! wrote to stderr goes through the same cut, escaping and budget
//! ([`GuestOutput::failed_command_stderr`], called by `runtime::command`).
//!
//! The line splitting and the budget are sans-IO ([`LineSplitter`], [`LineBudget`]: fed bytes
//! and time); [`GuestOutput`] is the shell wasmtime-wasi writes into.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line written to the log; the rest of a longer line is counted, not written.
pub const MAX_LINE: usize = 2048;
/// Lines a function's guests may write at once.
pub const BURST: f64 = 200.0;
/// Lines per second a function's guests may write after their burst.
pub const LINES_PER_SECOND: f64 = 50.0;

/// Splits written bytes into lines of at most `max` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    pending: Vec<u8>,
    /// Bytes of the pending line beyond `max`, dropped.
    cut: usize,
}

/// One line of guest output, ready for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// The line without its newline, lossily decoded, control characters escaped.
    pub text: String,
    /// Bytes cut from its end for being over the limit.
    pub cut: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            max,
            pending: Vec::new(),
            cut: 0,
        }
    }

    /// Takes `bytes` and returns the lines they complete.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        while !bytes.is_empty() {
            let (part, ends_line) = match bytes.iter().position(|&b| b == b'\n') {
                Some(at) => (&bytes[..at], true),
                None => (bytes, false),
            };
            let room = self.max - self.pending.len();
            let kept = part.len().min(room);
            self.pending.extend_from_slice(&part[..kept]);
            self.cut += part.len() - kept;
            bytes = &bytes[part.len() + usize::from(ends_line)..];
            if ends_line {
                lines.push(self.take());
            }
        }
        lines
    }

    /// The unfinished last line, if any (the writer is closing).
    pub fn finish(&mut self) -> Option<Line> {
        (!self.pending.is_empty() || self.cut > 0).then(|| self.take())
    }

    fn take(&mut self) -> Line {
        let raw = std::mem::take(&mut self.pending);
        let text = String::from_utf8_lossy(&raw)
            .trim_end_matches('\r')
            .chars()
            .flat_map(|c| {
                let escape = c.is_control() && c != '\t';
                let escaped: Box<dyn Iterator<Item = char>> = if escape {
                    Box::new(c.escape_default())
                } else {
                    Box::new(std::iter::once(c))
                };
                escaped
            })
            .collect();
        Line {
            text,
            cut: std::mem::take(&mut self.cut),
        }
    }
}

/// A token bucket of log lines: `burst` at once, refilled at `per_second`.
#[derive(Debug)]
pub struct LineBudget {
    burst: f64,
    per_second: f64,
    tokens: f64,
    refilled: Instant,
    /// Lines refused since the last one admitted.
    dropped: u64,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write it; `dropped_before` lines were refused since the last one written.
    Write { dropped_before: u64 },
    /// Over the budget: count it, write nothing.
    Drop,
}

impl LineBudget {
    pub fn new(burst: f64, per_second: f64, now: Instant) -> LineBudget {
        LineBudget {
            burst,
            per_second,
            tokens: burst,
            refilled: now,
            dropped: 0,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Write {
                dropped_before: std::mem::take(&mut self.dropped),
            }
        } else {
            self.dropped += 1;
            Admit::Drop
        }
    }
}

/// Which of a guest's streams.
#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The log a function's guests write to: cloned into each instance's WASI context, one budget
/// for all of them.
#[derive(Clone, Debug)]
pub struct GuestOutput {
    function: Arc<str>,
    budget: Arc<Mutex<LineBudget>>,
}

impl GuestOutput {
    pub fn new(function: &str) -> GuestOutput {
        GuestOutput {
            function: function.into(),
            budget: Arc::new(Mutex::new(LineBudget::new(
                BURST,
                LINES_PER_SECOND,
                Instant::now(),
            ))),
        }
    }

    /// The guest's stdout, for `WasiCtxBuilder::stdout`.
    pub fn stdout(&self) -> impl StdoutStream + 'static {
        GuestStream {
            output: self.clone(),
            stream: Stream::Stdout,
        }
    }

    /// The guest's stderr, for `WasiCtxBuilder::stderr`.
    pub fn stderr(&self) -> impl StdoutStream + 'static {
        GuestStream {
            output: self.clone(),
            stream: Stream::Stderr,
        }
    }

    /// What a WASI p1 command wrote to stderr before it failed (its pipe is captured, not
    /// streamed): logged through the same line cut, escaping and budget as every other guest
    /// output, so a failing command cannot forge node log lines or send terminal sequences.
    pub fn failed_command_stderr(&self, captured: &[u8]) {
        let mut lines = LineSplitter::new(MAX_LINE);
        for line in lines.push(captured).into_iter().chain(lines.finish()) {
            self.write(Stream::Stderr, line);
        }
    }

    fn write(&self, stream: Stream, line: Line) {
        let admit = self
            .budget
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .admit(Instant::now());
        let Admit::Write { dropped_before } = admit else {
            return;
        };
        let function = &*self.function;
        let stream = stream.name();
        if dropped_before > 0 {
            tracing::warn!(
                target: "edged::guest",
                function,
                dropped = dropped_before,
                "guest output over {LINES_PER_SECOND} lines/s: {dropped_before} lines not logged"
            );
        }
        if line.cut > 0 {
            tracing::info!(target: "edged::guest", function, stream, cut_bytes = line.cut, "{}", line.text);
        } else {
            tracing::info!(target: "edged::guest", function, stream, "{}", line.text);
        }
    }
}

/// One stream of one guest, as wasmtime-wasi sees it.
struct GuestStream {
    output: GuestOutput,
    stream: Stream,
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            output: self.output.clone(),
            stream: self.stream,
            lines: LineSplitter::new(MAX_LINE),
        })
    }
}

/// A writer wasmtime-wasi hands the guest's writes to (one per stream the guest opens). Never
/// blocks the guest: a line is logged or counted as it completes.
struct LineWriter {
    output: GuestOutput,
    stream: Stream,
    lines: LineSplitter,
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        for line in this.lines.push(bytes) {
            this.output.write(this.stream, line);
        }
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if let Some(line) = self.lines.finish() {
            self.output.write(self.stream, line);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn texts(lines: Vec<Line>) -> Vec<String> {
        lines.into_iter().map(|l| l.text).collect()
    }

    #[test]
    fn lines_complete_across_writes_and_the_last_one_on_finish() {
        let mut split = LineSplitter::new(64);
        assert!(split.push(b"GET ").is_empty());
        assert_eq!(
            texts(split.push(b"/chain\r\nsecond\nthi")),
            ["GET /chain", "second"]
        );
        assert_eq!(split.finish().unwrap().text, "thi");
        assert_eq!(split.finish(), None);
        assert_eq!(texts(split.push(b"\n\n")), ["", ""]);
    }

    #[test]
    fn long_lines_are_cut_and_the_cut_counted() {
        let mut split = LineSplitter::new(4);
        let lines = split.push(b"abcdefg\nhi\n");
        assert_eq!(
            lines,
            [
                Line {
                    text: "abcd".into(),
                    cut: 3
                },
                Line {
                    text: "hi".into(),
                    cut: 0
                }
            ]
        );
        assert!(split.push(b"xxxxxx").is_empty());
        assert_eq!(split.finish().unwrap().cut, 2);
    }

    #[test]
    fn control_characters_cannot_forge_lines_or_terminal_sequences() {
        let mut split = LineSplitter::new(64);
        let lines = split.push(b"a\x1b[31mred\rINFO fake\tok \xff\n");
        assert_eq!(texts(lines), ["a\\u{1b}[31mred\\rINFO fake\tok \u{fffd}"]);
    }

    #[test]
    fn the_budget_admits_a_burst_then_its_rate_and_reports_what_it_dropped() {
        let start = Instant::now();
        let mut budget = LineBudget::new(3.0, 10.0, start);
        for _ in 0..3 {
            assert_eq!(budget.admit(start), Admit::Write { dropped_before: 0 });
        }
        assert_eq!(budget.admit(start), Admit::Drop);
        assert_eq!(budget.admit(start), Admit::Drop);
        // A tenth of a second buys one line, which reports the two dropped before it.
        let later = start + Duration::from_millis(100);
        assert_eq!(budget.admit(later), Admit::Write { dropped_before: 2 });
        assert_eq!(budget.admit(later), Admit::Drop);
        // Idle time refills no more than the burst.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(matches!(budget.admit(much_later), Admit::Write { .. }));
        }
        assert_eq!(budget.admit(much_later), Admit::Drop);
    }
}
