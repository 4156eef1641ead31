//! The chunked transfer coding (RFC 9112 §7.1): a decoder that works on
//! whatever part of the body has been read so far, and the size line.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// A size line (with extensions) or a trailer field longer than this is refused.
const MAX_LINE: usize = 8 * 1024;
/// Trailer section size limit.
const MAX_TRAILERS: usize = 64 * 1024;

/// Appends the hexadecimal size line of a chunk of `len` bytes.
pub fn encode_size(len: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// What the decoder found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// Body data (taken out of the buffer).
    Data(Bytes),
    /// The last chunk and the trailer section have been read.
    End(Option<HeaderMap>),
    /// The buffer holds no complete next piece: read more.
    NeedMore,
}

#[derive(Debug, Default)]
pub struct Decoder {
    state: State,
    trailers: Option<HeaderMap>,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum State {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl Decoder {
    /// Takes the next piece of the body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        loop {
            match self.state {
                State::Size => {
                    let Some(line) = take_line(buf)? else { return Ok(Decoded::NeedMore) };
                    let size = parse_size(&line)?;
                    self.state = if size == 0 { State::Trailers } else { State::Data(size) };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let rest = left - n as u64;
                    self.state = if rest == 0 { State::DataEnd } else { State::Data(rest) };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    let Some(line) = take_line(buf)? else { return Ok(Decoded::NeedMore) };
                    if line.is_empty() {
                        self.state = State::Done;
                        return Ok(Decoded::End(self.trailers.take()));
                    }
                    self.trailer_bytes += line.len();
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err("trailer section too large");
                    }
                    let (name, value) = parse_field(&line)?;
                    self.trailers.get_or_insert_with(HeaderMap::new).append(name, value);
                }
                State::Done => return Ok(Decoded::End(None)),
            }
        }
    }
}

/// A line without its CRLF, taken out of `buf` when complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, &'static str> {
    match memchr::memchr(b'\n', buf) {
        Some(end) => {
            if end == 0 || buf[end - 1] != b'\r' {
                return Err("line not ended by CRLF");
            }
            let mut line = buf.split_to(end + 1);
            line.truncate(end - 1);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("line too long"),
        None => Ok(None),
    }
}

/// The size in a chunk-size line, extensions ignored.
fn parse_size(line: &[u8]) -> Result<u64, &'static str> {
    let end = line.iter().position(|&b| b == b';' || b == b' ' || b == b'\t').unwrap_or(line.len());
    let hex = &line[..end];
    if hex.is_empty() || hex.len() > 15 {
        return Err("invalid chunk size");
    }
    let mut size = 0u64;
    for &b in hex {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err("invalid chunk size"),
        };
        size = (size << 4) | u64::from(digit);
    }
    Ok(size)
}

fn parse_field(line: &[u8]) -> Result<(HeaderName, HeaderValue), &'static str> {
    let colon = line.iter().position(|&b| b == b':').ok_or("trailer field without a colon")?;
    let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| "trailer field name")?;
    let value = line[colon + 1..].trim_ascii();
    let value = HeaderValue::from_bytes(value).map_err(|_| "trailer field value")?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split_every: usize) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let mut decoder = Decoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut pieces = input.chunks(split_every);
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::End(t) => return Ok((body, t)),
                Decoded::NeedMore => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err("ran out"),
                },
            }
        }
    }

    #[test]
    fn decodes_chunks_whatever_the_read_boundaries() {
        let input = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\n\r\n";
        for split in [1, 2, 3, 7, 64, input.len()] {
            let (body, trailers) = decode_all(input, split).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "split {split}");
            assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");
        }
    }

    #[test]
    fn refuses_broken_framing() {
        // Refused by the decoder, not merely cut short.
        let refused = |input: &[u8]| matches!(decode_all(input, 64), Err(e) if e != "ran out");
        assert!(refused(b"zz\r\n"));
        assert!(refused(b"5\r\nhelloXX0\r\n\r\n"), "no CRLF after data");
        assert!(refused(b"5\nhello\r\n"), "bare LF");
        assert!(refused(b"1000000000000000\r\n"), "size overflow");
        assert_eq!(decode_all(b"0\r\n\r\n", 1).unwrap().0, b"");
    }

    #[test]
    fn size_lines_round_trip() {
        for n in [1usize, 9, 10, 255, 4096, 1 << 40] {
            let mut out = Vec::new();
            encode_size(n, &mut out);
            let line = &out[..out.len() - 2];
            assert_eq!(parse_size(line).unwrap(), n as u64);
        }
    }
}
