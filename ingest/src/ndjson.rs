//! SHELL with a PURE core. Reading a request body under the route's limits as it arrives
//! (issue 12): the byte limit, and for the bulk NDJSON route (`/v1/usage`) the record and line
//! limits, are enforced chunk by chunk, so a call over any of them is refused as soon as the
//! offending byte arrives, never after buffering the rest.
//!
//! Memory per call is then the body (at most the byte limit, allocated once when
//! `Content-Length` says how much) plus at most `max_records` line slices in the handler: one
//! 32 MiB body of 16.7 million one-byte lines used to cost ~400 MiB of line index before its 413.

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;

/// The NDJSON limits of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineLimits {
    /// Most records (non-blank lines).
    pub max_records: usize,
    /// Most bytes in one line.
    pub max_line_bytes: usize,
}

/// Why a body was not read whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// More bytes than the route allows.
    #[error("the request body is over this route's limit of {limit} bytes (see docs/api.md); split the call")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// More records than the route allows.
    #[error(
        "more than {limit} records (line {line} is one too many); at most {limit} per bulk request, split the call"
    )]
    TooManyRecords {
        /// The limit.
        limit: usize,
        /// The line that went over.
        line: usize,
    },
    /// One line longer than a record may be.
    #[error("line {line} is longer than {limit} bytes; one record per line, each at most {limit} bytes")]
    LineTooLong {
        /// The line.
        line: usize,
        /// The limit.
        limit: usize,
    },
    /// The transport failed (the client went away, or sent a broken chunked encoding).
    #[error("the request body could not be read: {0}")]
    Read(String),
}

/// PURE. Counts lines and records of NDJSON as its chunks arrive.
///
/// A record is a line with any byte other than ASCII whitespace; the handler skips lines that
/// are blank after trimming, so it never sees more records than this counts.
#[derive(Debug, Clone)]
pub struct LineCounter {
    limits: LineLimits,
    /// 1-based number of the line being read.
    line: usize,
    /// Bytes of that line so far.
    line_bytes: usize,
    /// Whether that line has a non-whitespace byte yet.
    line_has_data: bool,
    /// Records (non-blank lines) seen, the current one included once it has data.
    records: usize,
}

impl LineCounter {
    /// A counter at the start of a body.
    pub fn new(limits: LineLimits) -> Self {
        LineCounter { limits, line: 1, line_bytes: 0, line_has_data: false, records: 0 }
    }

    /// Records seen so far.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Takes the next chunk; the first limit it breaks is the error.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        for &b in chunk {
            if b == b'\n' {
                self.line += 1;
                self.line_bytes = 0;
                self.line_has_data = false;
                continue;
            }
            self.line_bytes += 1;
            if self.line_bytes > self.limits.max_line_bytes {
                return Err(BodyError::LineTooLong { line: self.line, limit: self.limits.max_line_bytes });
            }
            if !self.line_has_data && !b.is_ascii_whitespace() {
                self.line_has_data = true;
                self.records += 1;
                if self.records > self.limits.max_records {
                    return Err(BodyError::TooManyRecords { limit: self.limits.max_records, line: self.line });
                }
            }
        }
        Ok(())
    }
}

/// Reads `body` whole, refusing it as soon as it exceeds `max_bytes` or, with `lines`, the
/// NDJSON limits. `declared` is the request's `Content-Length` (already checked against
/// `max_bytes`): the buffer is then allocated once, at its size.
pub async fn read_limited(
    body: Body,
    max_bytes: usize,
    declared: Option<usize>,
    lines: Option<LineLimits>,
) -> Result<Bytes, BodyError> {
    let mut body = body;
    // Without a declared length, start small and grow (never past the limit).
    let mut buf: Vec<u8> = Vec::with_capacity(declared.unwrap_or(16 * 1024).min(max_bytes));
    let mut counter = lines.map(LineCounter::new);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if buf.len() + chunk.len() > max_bytes {
            return Err(BodyError::TooLarge { limit: max_bytes });
        }
        if let Some(c) = counter.as_mut() {
            c.feed(&chunk)?;
        }
        if buf.capacity() - buf.len() < chunk.len() {
            let want = (buf.capacity() * 2).max(buf.len() + chunk.len()).min(max_bytes);
            buf.reserve_exact(want - buf.len());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: LineLimits = LineLimits { max_records: 3, max_line_bytes: 8 };

    #[test]
    fn records_are_non_blank_lines_counted_across_chunks() {
        let mut c = LineCounter::new(LIMITS);
        c.feed(b"{\"a\"").unwrap();
        c.feed(b":1}\n\n  \r\n{}").unwrap();
        assert_eq!(c.records(), 2, "blank and whitespace-only lines are not records");
        c.feed(b"\n{}").unwrap();
        assert_eq!(c.feed(b"\n\n{"), Err(BodyError::TooManyRecords { limit: 3, line: 7 }));
    }

    #[test]
    fn a_long_line_is_refused_at_its_first_byte_over() {
        let mut c = LineCounter::new(LIMITS);
        c.feed(b"12345678\n").unwrap();
        c.feed(b"1234").unwrap();
        assert_eq!(c.feed(b"56789"), Err(BodyError::LineTooLong { line: 2, limit: 8 }));
    }

    #[tokio::test]
    async fn a_body_is_read_whole_or_refused_at_the_limit() {
        let ok = read_limited(Body::from("{}\n{}\n"), 6, Some(6), Some(LIMITS)).await.unwrap();
        assert_eq!(&ok[..], b"{}\n{}\n");
        assert_eq!(read_limited(Body::from("1234567"), 6, None, None).await, Err(BodyError::TooLarge { limit: 6 }));
        let many = "x\n".repeat(1000);
        assert_eq!(
            read_limited(Body::from(many), 1 << 20, None, Some(LIMITS)).await,
            Err(BodyError::TooManyRecords { limit: 3, line: 4 })
        );
    }
}
