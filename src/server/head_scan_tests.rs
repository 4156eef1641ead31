#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// What scanning a whole input gave, independent of how it was split.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    /// Absolute cut position, violation and completion of a rejection.
    reject: Option<(usize, Violation, &'static [u8])>,
    heads: u64,
    phase: Phase,
}

fn scan_in(input: &[u8], cuts: &[usize]) -> Outcome {
    let mut s = HeadScanner::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        if let Verdict::Reject { at, violation, completion } = s.scan(&input[start..end]) {
            return Outcome { reject: Some((start + at, violation, completion)), heads: s.heads(), phase: s.phase() };
        }
        start = end;
    }
    Outcome { reject: None, heads: s.heads(), phase: s.phase() }
}

/// Scans `input` whole, split in two at every point, and byte by byte;
/// every way must agree. Returns the outcome.
fn scan(input: &[u8]) -> Outcome {
    let whole = scan_in(input, &[]);
    for cut in 1..input.len() {
        assert_eq!(scan_in(input, &[cut]), whole, "split at {cut} of {:?}", String::from_utf8_lossy(input));
    }
    let every: Vec<usize> = (1..input.len()).collect();
    assert_eq!(scan_in(input, &every), whole, "byte by byte: {:?}", String::from_utf8_lossy(input));
    whole
}

/// The head hyper would see after a rejection: the bytes before the cut
/// (from the start of the rejected head) plus the completion. It must be one
/// complete head that httparse accepts, with unambiguous framing.
fn assert_completion_is_a_harmless_head(input: &[u8], head_start: usize) -> Outcome {
    let out = scan(input);
    let (at, _, completion) = out.reject.expect("rejected");
    let mut seen = input[head_start..at].to_vec();
    seen.extend_from_slice(completion);
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(&seen).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&seen)));
    assert_eq!(status, httparse::Status::Complete(seen.len()), "{:?}", String::from_utf8_lossy(&seen));
    let values = |name: &str| -> Vec<String> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_string())
            .collect()
    };
    let (cl, te) = (values("content-length"), values("transfer-encoding"));
    assert!(cl.len() <= 1 && te.len() <= 1, "one framing header at most: {cl:?} {te:?}");
    assert!(cl.is_empty() || te.is_empty(), "never both: {cl:?} {te:?}");
    assert!(te.iter().all(|v| v.eq_ignore_ascii_case("chunked")), "{te:?}");
    assert!(cl.iter().all(|v| !v.is_empty() && v.len() <= 18 && v.bytes().all(|b| b.is_ascii_digit())), "{cl:?}");
    out
}

fn rejected(input: &str) -> Violation {
    let out = assert_completion_is_a_harmless_head(input.as_bytes(), 0);
    out.reject.unwrap().1
}

#[test]
fn a_plain_get_passes_and_returns_to_idle() {
    let out = scan(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(out, Outcome { reject: None, heads: 1, phase: Phase::Idle });
}

#[test]
fn a_partial_head_is_in_the_head_phase() {
    assert_eq!(scan(b"GET / HTTP/1.1\r\nHost: a\r\n").phase, Phase::Head);
    assert_eq!(scan(b"\r\n\r\n").phase, Phase::Idle, "empty lines before a request are skipped");
}

#[test]
fn bare_lf_line_ends_are_followed_like_hyper() {
    assert_eq!(scan(b"GET / HTTP/1.1\nHost: a\n\nGET / HTTP/1.1\n\n").heads, 2);
}

#[test]
fn pipelined_requests_are_each_seen() {
    let out = scan(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n");
    assert_eq!((out.heads, out.phase), (3, Phase::Idle));
}

#[test]
fn a_content_length_body_is_skipped_even_when_it_looks_like_a_head() {
    let body = "\r\n\r\nTransfer-Encoding: x\r\n\r\n";
    let input = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n", body.len());
    assert_eq!(scan(input.as_bytes()), Outcome { reject: None, heads: 2, phase: Phase::Idle });
    let unfinished = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\nabc", body.len());
    assert_eq!(scan(unfinished.as_bytes()).phase, Phase::Body);
}

#[test]
fn a_chunked_body_with_extensions_and_trailers_is_followed_to_its_end() {
    let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;name=value\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n\
        GET / HTTP/1.1\r\n\r\n";
    assert_eq!(scan(input), Outcome { reject: None, heads: 2, phase: Phase::Idle });
    let body_like_a_head = b"POST / HTTP/1.1\r\ntransfer-encoding: CHUNKED\r\n\r\n\
        1a\r\nContent-Length: 1\r\n\r\nGET x\r\n0\r\n\r\n";
    assert_eq!(scan(body_like_a_head), Outcome { reject: None, heads: 1, phase: Phase::Idle });
    assert_eq!(scan(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel").phase, Phase::Body);
}

#[test]
fn chunked_framing_hyper_rejects_stops_the_scan() {
    for bad in ["zz\r\n", "5\nhello", "5\r\nhelloX", "5;a\nb", "FFFFFFFFFFFFFFFFF\r\n"] {
        let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{bad}Content-Length: 1\r\n");
        assert_eq!(scan(input.as_bytes()).phase, Phase::Opaque, "{bad:?}");
    }
}

#[test]
fn upgrade_and_connect_stop_the_scan_after_their_head() {
    let ws = scan(b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nContent-Length: 1\r\n");
    assert_eq!((ws.reject, ws.heads, ws.phase), (None, 1, Phase::Opaque));
    let connect = scan(b"CONNECT a:443 HTTP/1.1\r\n\r\n\x00\x01binary");
    assert_eq!((connect.reject, connect.phase), (None, Phase::Opaque));
    assert_eq!(scan(b"CONNECTX / HTTP/1.1\r\n\r\n").phase, Phase::Idle, "only the CONNECT method");
}

#[test]
fn framing_header_names_are_case_insensitive_and_exact() {
    let input = b"POST / HTTP/1.1\r\nCONTENT-LENGTH: 3\r\nContent-Type: a\r\nContent-Lengthy: 9\r\nTE: trailers\r\n\
        Transfer-Encodings: x\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
    assert_eq!(scan(input), Outcome { reject: None, heads: 2, phase: Phase::Idle });
}

#[test]
fn content_length_and_transfer_encoding_together_are_rejected_in_either_order() {
    assert_eq!(
        rejected("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Violation::ContentLengthAndTransferEncoding
    );
    assert_eq!(
        rejected("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
        Violation::ContentLengthAndTransferEncoding
    );
}

#[test]
fn a_second_content_length_is_rejected_even_with_the_same_value() {
    assert_eq!(
        rejected("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        Violation::DuplicateContentLength
    );
    assert_eq!(
        rejected("POST / HTTP/1.1\r\ncontent-length: 5\r\nContent-Length: 6\r\n\r\nhello"),
        Violation::DuplicateContentLength
    );
}

#[test]
fn invalid_content_lengths_are_rejected() {
    for value in ["", " ", "abc", "5, 5", "+5", "-1", "1 2", "0x10", "5a", "1234567890123456789", "５"] {
        let input = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
        assert_eq!(rejected(&input), Violation::InvalidContentLength, "{value:?}");
    }
    for value in ["0", "007", " 5 ", "\t42\t", "123456789012345678"] {
        let input = format!("POST / HTTP/1.1\r\nContent-Length:{value}\r\n\r\n");
        assert_eq!(scan(input.as_bytes()).reject, None, "{value:?}");
    }
}

#[test]
fn transfer_encodings_other_than_exactly_chunked_are_rejected() {
    for value in ["xchunked", "chunked, identity", "identity, chunked", "identity", "", "chunk", "chunked x", "gzip"] {
        let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {value}\r\n\r\n");
        assert_eq!(rejected(&input), Violation::TransferEncodingNotChunked, "{value:?}");
    }
    for value in ["chunked", "Chunked", " CHUNKED ", "chunked\t"] {
        let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding:{value}\r\n\r\n0\r\n\r\n");
        assert_eq!(scan(input.as_bytes()), Outcome { reject: None, heads: 1, phase: Phase::Idle }, "{value:?}");
    }
}

#[test]
fn a_second_transfer_encoding_is_rejected() {
    assert_eq!(
        rejected("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Violation::DuplicateTransferEncoding
    );
}

#[test]
fn obsolete_line_folding_is_rejected_with_a_space_or_a_tab() {
    assert_eq!(rejected("GET / HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n"), Violation::ObsoleteLineFolding);
    assert_eq!(rejected("GET / HTTP/1.1\r\n\tTransfer-Encoding: chunked\r\n\r\n"), Violation::ObsoleteLineFolding);
    assert_eq!(
        rejected("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n , identity\r\n\r\n"),
        Violation::ObsoleteLineFolding
    );
}

#[test]
fn a_bad_head_after_good_pipelined_requests_is_cut_at_its_own_bytes() {
    let good = "POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\n\r\n";
    let input = format!("{good}POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx");
    let out = assert_completion_is_a_harmless_head(input.as_bytes(), good.len());
    assert_eq!(out.heads, 2, "two heads passed before the rejected one");
    assert_eq!(out.reject.unwrap().1, Violation::DuplicateContentLength);
}

#[test]
fn violations_are_numbered_for_atomics() {
    for v in [
        Violation::ContentLengthAndTransferEncoding,
        Violation::DuplicateContentLength,
        Violation::InvalidContentLength,
        Violation::DuplicateTransferEncoding,
        Violation::TransferEncodingNotChunked,
        Violation::ObsoleteLineFolding,
    ] {
        assert_eq!(Violation::from_u8(v as u8), Some(v));
    }
    assert_eq!(Violation::from_u8(0), None);
}
