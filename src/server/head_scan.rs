//! A pre-parse of HTTP/1.1 request framing on the raw bytes, before hyper
//! parses them (RFC 9112 §6.1, request smuggling).
//!
//! hyper normalises what it parses: it drops `Content-Length` when
//! `Transfer-Encoding` is present and keeps one of two equal
//! `Content-Length`s, so tether cannot see those ambiguities in the parsed
//! request. [`HeadScanner`] sees every byte hyper will parse, in place (no
//! copy, no allocation), and tracks message boundaries the way hyper's
//! decoder does: it reads each head, skips `Content-Length` bodies in one
//! step and walks chunked framing, so every head of a keep-alive or
//! pipelined connection is checked.
//!
//! A head is rejected for: both `Content-Length` and `Transfer-Encoding`,
//! more than one `Content-Length` (equal or not) or `Transfer-Encoding`, a
//! `Content-Length` that is not 1 to 18 digits, a `Transfer-Encoding` other
//! than exactly `chunked`, or obsolete line folding. The scanner then says
//! where to cut the bytes and which few bytes to put instead: they turn
//! what hyper already holds of that head into a harmless complete head
//! (a framing header renamed, or a valid value finished), which the
//! connection's dispatcher answers with 400 and `Connection: close`. hyper
//! never sees the offending framing, and the request never reaches a backend.
//!
//! Only the headers that decide framing are examined; any other malformed
//! head is left to hyper, which rejects it (400, connection closed). After a
//! head that asks for an upgrade (`Upgrade`, `CONNECT`) or a chunked body
//! hyper would reject, the scanner stops: hyper either hands the connection
//! over (101) or closes it; the dispatcher makes sure it is never reused.

use memchr::memchr;

/// Why a request head was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Violation {
    ContentLengthAndTransferEncoding = 1,
    DuplicateContentLength,
    InvalidContentLength,
    DuplicateTransferEncoding,
    TransferEncodingNotChunked,
    ObsoleteLineFolding,
}

impl Violation {
    pub fn as_str(self) -> &'static str {
        match self {
            Violation::ContentLengthAndTransferEncoding => "both Content-Length and Transfer-Encoding",
            Violation::DuplicateContentLength => "more than one Content-Length",
            Violation::InvalidContentLength => "invalid Content-Length",
            Violation::DuplicateTransferEncoding => "more than one Transfer-Encoding",
            Violation::TransferEncodingNotChunked => "Transfer-Encoding other than chunked",
            Violation::ObsoleteLineFolding => "obsolete line folding",
        }
    }

    pub fn from_u8(v: u8) -> Option<Violation> {
        use Violation::*;
        [
            ContentLengthAndTransferEncoding,
            DuplicateContentLength,
            InvalidContentLength,
            DuplicateTransferEncoding,
            TransferEncodingNotChunked,
            ObsoleteLineFolding,
        ]
        .into_iter()
        .find(|x| *x as u8 == v)
    }
}

/// What to do with the bytes just scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand them all to the parser.
    Pass,
    /// Hand the parser `bytes[..at]`, then `completion`, then nothing more.
    Reject { at: usize, violation: Violation, completion: &'static [u8] },
}

/// Where the connection is, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Between requests: no byte of the next head yet.
    Idle,
    /// Part of a head has arrived.
    Head,
    /// Inside a request body.
    Body,
    /// No longer scanned (upgrade, or framing hyper rejects).
    Opaque,
}

/// Header names that decide framing, lower case.
const NAMES: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"upgrade"];
const CONTENT_LENGTH: u8 = 0;
const TRANSFER_ENCODING: u8 = 1;
const UPGRADE: u8 = 2;
/// Appended to a framing header's name when a second one arrives: the line
/// becomes an unknown header and the head ends.
const RENAME: &[u8] = b"x: 1\r\n\r\n";
/// Suffixes of this finish a `Transfer-Encoding` value as `chunked`.
const CHUNKED: &[u8] = b"chunked\r\n\r\n";
const CONNECT: &[u8] = b"CONNECT ";
/// Longest accepted `Content-Length` (18 digits stay below hyper's limit).
const MAX_LENGTH_DIGITS: u8 = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a request line; empty lines are skipped, as hyper does.
    Start,
    /// In the request line; `matched` bytes of `CONNECT ` so far.
    RequestLine {
        matched: u8,
    },
    /// At the first byte of a header line, or of the empty line ending the head.
    LineStart,
    /// A CR at a line start: LF ends the head.
    EndCr,
    /// Matching a header name against [`NAMES`].
    Name {
        name: u8,
        matched: u8,
    },
    /// The rest of a line that needs no attention.
    SkipLine,
    ContentLength {
        digits: u8,
        value: u64,
        trailing: bool,
    },
    TransferEncoding {
        matched: u8,
        trailing: bool,
    },
    /// Body bytes left of a `Content-Length` body.
    Length(u64),
    Chunked(Chunk),
    Opaque,
}

/// Chunked framing, exactly as hyper's decoder accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    SizeSpace(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk's line: CR ends the trailers, anything else starts one.
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

/// Scans the request heads of one HTTP/1.1 connection. See the module doc.
#[derive(Debug, Clone)]
pub struct HeadScanner {
    state: State,
    /// Heads seen whole.
    heads: u64,
    content_length: Option<u64>,
    chunked: bool,
    upgrade: bool,
}

impl Default for HeadScanner {
    fn default() -> Self {
        HeadScanner::new()
    }
}

impl HeadScanner {
    pub fn new() -> Self {
        HeadScanner { state: State::Start, heads: 0, content_length: None, chunked: false, upgrade: false }
    }

    /// Request heads seen whole so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::Start => Phase::Idle,
            State::Length(_) | State::Chunked(_) => Phase::Body,
            State::Opaque => Phase::Opaque,
            _ => Phase::Head,
        }
    }

    /// Scans the next bytes of the connection, in order. After a
    /// [`Verdict::Reject`] the scanner must not be given more bytes.
    pub fn scan(&mut self, bytes: &[u8]) -> Verdict {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Opaque => return Verdict::Pass,
                State::Length(left) => {
                    let n = left.min((bytes.len() - i) as u64);
                    i += n as usize;
                    self.state = if n == left { State::Start } else { State::Length(left - n) };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let n = left.min((bytes.len() - i) as u64);
                    i += n as usize;
                    self.state = State::Chunked(if n == left { Chunk::DataCr } else { Chunk::Data(left - n) });
                }
                // Fast path for a header line whose name is all at hand:
                // compare the whole name instead of stepping through it.
                State::LineStart
                    if bytes.len() - i > NAMES[TRANSFER_ENCODING as usize].len()
                        && !matches!(bytes[i], b'\r' | b'\n' | b' ' | b'\t') =>
                {
                    let name = match bytes[i].to_ascii_lowercase() {
                        b'c' => CONTENT_LENGTH,
                        b't' => TRANSFER_ENCODING,
                        b'u' => UPGRADE,
                        _ => {
                            self.state = State::SkipLine;
                            continue;
                        }
                    };
                    let full = NAMES[name as usize];
                    if bytes[i..i + full.len()].eq_ignore_ascii_case(full) && bytes[i + full.len()] == b':' {
                        // The `:` is stepped next, as if matched byte by byte.
                        i += full.len();
                        self.state = State::Name { name, matched: full.len() as u8 };
                    } else {
                        self.state = State::SkipLine;
                    }
                }
                State::SkipLine => match memchr(b'\n', &bytes[i..]) {
                    Some(p) => {
                        i += p + 1;
                        self.state = State::LineStart;
                    }
                    None => return Verdict::Pass,
                },
                _ => {
                    if let Err((violation, completion)) = self.step(bytes[i]) {
                        return Verdict::Reject { at: i, violation, completion };
                    }
                    i += 1;
                }
            }
        }
        Verdict::Pass
    }

    /// One byte of a head or of chunked framing.
    fn step(&mut self, b: u8) -> Result<(), (Violation, &'static [u8])> {
        self.state = match self.state {
            State::Start => match b {
                b'\r' | b'\n' => State::Start,
                _ => {
                    self.state = State::RequestLine { matched: 0 };
                    return self.request_line(b);
                }
            },
            State::RequestLine { .. } => return self.request_line(b),
            State::LineStart => match b {
                b'\r' => State::EndCr,
                b'\n' => self.end_head(),
                b' ' | b'\t' => return Err((Violation::ObsoleteLineFolding, b"\r\n")),
                _ => match b.to_ascii_lowercase() {
                    b'c' => State::Name { name: CONTENT_LENGTH, matched: 1 },
                    b't' => State::Name { name: TRANSFER_ENCODING, matched: 1 },
                    b'u' => State::Name { name: UPGRADE, matched: 1 },
                    _ => State::SkipLine,
                },
            },
            // A CR not followed by LF is an error hyper reports itself.
            State::EndCr => {
                if b == b'\n' {
                    self.end_head()
                } else {
                    State::SkipLine
                }
            }
            State::Name { name, matched } => {
                let full = NAMES[name as usize];
                if (matched as usize) < full.len() {
                    if b.to_ascii_lowercase() == full[matched as usize] {
                        State::Name { name, matched: matched + 1 }
                    } else {
                        skip_line(b)
                    }
                } else if b == b':' {
                    self.header(name)?
                } else {
                    skip_line(b)
                }
            }
            State::ContentLength { digits, value, trailing } => match b {
                b' ' | b'\t' => State::ContentLength { digits, value, trailing: digits > 0 },
                b'0'..=b'9' if !trailing && digits < MAX_LENGTH_DIGITS => {
                    State::ContentLength { digits: digits + 1, value: value * 10 + u64::from(b - b'0'), trailing }
                }
                b'\r' | b'\n' if digits > 0 => {
                    self.content_length = Some(value);
                    skip_line(b)
                }
                _ => {
                    let completion: &[u8] = if digits == 0 { b"0\r\n\r\n" } else { b"\r\n\r\n" };
                    return Err((Violation::InvalidContentLength, completion));
                }
            },
            State::TransferEncoding { matched, trailing } => {
                let m = matched as usize;
                match b {
                    b' ' | b'\t' if m == 0 || m == 7 => State::TransferEncoding { matched, trailing: m == 7 },
                    b'\r' | b'\n' if m == 7 => {
                        self.chunked = true;
                        skip_line(b)
                    }
                    _ if m < 7 && !trailing && b.to_ascii_lowercase() == CHUNKED[m] => {
                        State::TransferEncoding { matched: matched + 1, trailing }
                    }
                    _ => return Err((Violation::TransferEncodingNotChunked, &CHUNKED[m..])),
                }
            }
            State::Chunked(chunk) => self.chunk(chunk, b),
            // Handled in `scan` without stepping byte by byte.
            state @ (State::SkipLine | State::Length(_) | State::Opaque) => state,
        };
        Ok(())
    }

    fn request_line(&mut self, b: u8) -> Result<(), (Violation, &'static [u8])> {
        let State::RequestLine { matched } = self.state else { return Ok(()) };
        let m = matched as usize;
        self.state = if b == b'\n' {
            State::LineStart
        } else if m < CONNECT.len() && b == CONNECT[m] {
            if m + 1 == CONNECT.len() {
                self.upgrade = true;
                State::SkipLine
            } else {
                State::RequestLine { matched: matched + 1 }
            }
        } else {
            State::SkipLine
        };
        Ok(())
    }

    /// A framing header's name is complete (its `:` is at hand).
    fn header(&mut self, name: u8) -> Result<State, (Violation, &'static [u8])> {
        // A `Transfer-Encoding` seen earlier in this head was `chunked`
        // (anything else was rejected at its value).
        let seen_te = self.chunked;
        Ok(match name {
            CONTENT_LENGTH => {
                if seen_te {
                    return Err((Violation::ContentLengthAndTransferEncoding, RENAME));
                }
                if self.content_length.is_some() {
                    return Err((Violation::DuplicateContentLength, RENAME));
                }
                State::ContentLength { digits: 0, value: 0, trailing: false }
            }
            TRANSFER_ENCODING => {
                if self.content_length.is_some() {
                    return Err((Violation::ContentLengthAndTransferEncoding, RENAME));
                }
                if seen_te {
                    return Err((Violation::DuplicateTransferEncoding, RENAME));
                }
                State::TransferEncoding { matched: 0, trailing: false }
            }
            _ => {
                self.upgrade = true;
                State::SkipLine
            }
        })
    }

    /// The empty line after the headers: what follows is the body, if any.
    fn end_head(&mut self) -> State {
        self.heads += 1;
        let next = if self.upgrade {
            State::Opaque
        } else if self.chunked {
            State::Chunked(Chunk::Start)
        } else {
            match self.content_length {
                Some(n) if n > 0 => State::Length(n),
                _ => State::Start,
            }
        };
        self.content_length = None;
        self.chunked = false;
        self.upgrade = false;
        next
    }

    /// Mirrors hyper's chunked decoder; where hyper would fail (and close
    /// the connection), scanning stops.
    fn chunk(&self, chunk: Chunk, b: u8) -> State {
        let next = match (chunk, b) {
            (Chunk::Start, _) => hex(b).map(|d| Chunk::Size(u64::from(d))),
            (Chunk::Size(n), _) => match hex(b) {
                Some(d) => n.checked_mul(16).and_then(|n| n.checked_add(u64::from(d))).map(Chunk::Size),
                None => after_size(n, b),
            },
            (Chunk::SizeSpace(n), _) => after_size(n, b),
            (Chunk::Extension(n), b'\r') => Some(Chunk::SizeLf(n)),
            (Chunk::Extension(_), b'\n') => None,
            (Chunk::Extension(n), _) => Some(Chunk::Extension(n)),
            (Chunk::SizeLf(0), b'\n') => Some(Chunk::EndCr),
            (Chunk::SizeLf(n), b'\n') => Some(Chunk::Data(n)),
            (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
            (Chunk::DataLf, b'\n') => Some(Chunk::Start),
            (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
            (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
            (Chunk::EndCr | Chunk::Trailer, _) => Some(Chunk::Trailer),
            (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
            (Chunk::EndLf, b'\n') => return State::Start,
            _ => None,
        };
        next.map_or(State::Opaque, State::Chunked)
    }
}

/// After a chunk size's digits: spaces, an extension, or the line's end.
fn after_size(n: u64, b: u8) -> Option<Chunk> {
    match b {
        b' ' | b'\t' => Some(Chunk::SizeSpace(n)),
        b';' => Some(Chunk::Extension(n)),
        b'\r' => Some(Chunk::SizeLf(n)),
        _ => None,
    }
}

fn skip_line(b: u8) -> State {
    if b == b'\n' { State::LineStart } else { State::SkipLine }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[path = "head_scan_tests.rs"]
mod tests;
