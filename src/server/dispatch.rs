//! The service of one client connection: the checks that belong to the
//! connection rather than to proxying (a head the scanner rejected, a URI
//! too long, a stalled body), then the listener's handler.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::client_io::ConnShared;
use super::head_scan::Violation;
use crate::Runtime;
use crate::proxy::{ConnInfo, plain_response};
use crate::redirect::Redirect;
use crate::upstream::Body;

/// What a connection's requests are answered by.
#[derive(Clone)]
pub(super) enum Handler {
    Proxy,
    Admin,
    Redirect(Arc<Redirect>),
}

/// Everything a connection's requests share; one `Arc` clone per request.
pub(super) struct Dispatch {
    pub handler: Handler,
    pub runtime: Arc<Runtime>,
    pub info: Arc<ConnInfo>,
    pub shared: Arc<ConnShared>,
    pub max_uri_bytes: usize,
}

/// Streams a client may reset before tether answers, beyond which (and
/// beyond the number it let finish) its connection is closed: the HTTP/2
/// rapid-reset attack costs tether a task and often a backend request per
/// stream, and resets free the stream slots `max_concurrent_streams` counts.
const MAX_CANCELED_STREAMS: u64 = 100;

pub(super) async fn call(d: Arc<Dispatch>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let shared = &d.shared;
    let number = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let http1 = req.version() <= Version::HTTP_11;
    if http1 && shared.rejected_head.load(Ordering::Relaxed) == number {
        let violation = Violation::from_u8(shared.violation.load(Ordering::Relaxed));
        tracing::debug!(
            peer = %d.info.peer,
            reason = violation.map_or("framing", Violation::as_str),
            "request rejected: ambiguous framing (RFC 9112 §6.1)"
        );
        return Ok(refuse(&d, &req, StatusCode::BAD_REQUEST, message(violation), true));
    }
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > d.max_uri_bytes {
        return Ok(refuse(&d, &req, StatusCode::URI_TOO_LONG, "URI too long\n", http1));
    }
    // Without a 101, a request that asked to upgrade leaves the connection
    // unscanned (see head_scan): it must not carry another request.
    let upgrade = http1 && (req.method() == Method::CONNECT || req.headers().contains_key(http::header::UPGRADE));

    let guard = InFlight::start(shared);
    let mut resp = match d.handler.clone() {
        Handler::Proxy => crate::proxy::handle(d.runtime.clone(), d.info.clone(), req).await,
        Handler::Admin => crate::admin::handle(d.runtime.clone(), d.info.clone(), req).await,
        Handler::Redirect(r) => crate::redirect::handle(d.runtime.clone(), d.info.clone(), r, req).await,
    }
    .unwrap_or_else(|never| match never {});
    guard.finish();

    if http1 && shared.body_timed_out.load(Ordering::Relaxed) {
        resp = plain_response(StatusCode::REQUEST_TIMEOUT, "request body timeout\n");
        close(&mut resp);
    } else if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        shared.upgraded.store(true, Ordering::Relaxed);
    } else if upgrade {
        close(&mut resp);
    }
    Ok(resp)
}

fn message(violation: Option<Violation>) -> &'static str {
    match violation {
        Some(Violation::ContentLengthAndTransferEncoding) => "bad request: both Content-Length and Transfer-Encoding\n",
        Some(Violation::DuplicateContentLength) => "bad request: more than one Content-Length\n",
        Some(Violation::InvalidContentLength) => "bad request: invalid Content-Length\n",
        Some(Violation::DuplicateTransferEncoding) => "bad request: more than one Transfer-Encoding\n",
        Some(Violation::TransferEncodingNotChunked) => "bad request: Transfer-Encoding other than chunked\n",
        Some(Violation::ObsoleteLineFolding) => "bad request: obsolete line folding\n",
        None => "bad request\n",
    }
}

/// Answers without the handler, and writes the access log line the handler
/// would have.
fn refuse(
    d: &Dispatch,
    req: &Request<Incoming>,
    status: StatusCode,
    text: &'static str,
    close_it: bool,
) -> Response<Body> {
    let mut resp = crate::proxy::refused(&d.runtime, &d.info, req, status, text);
    if close_it {
        close(&mut resp);
    }
    resp
}

/// HTTP/1.1 only: hyper closes the connection after this response.
fn close(resp: &mut Response<Body>) {
    resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
}

/// Counts a request's handler as running, and a handler dropped before it
/// finished (the client went away or reset the stream) as canceled.
struct InFlight<'a> {
    shared: &'a ConnShared,
    finished: bool,
}

impl<'a> InFlight<'a> {
    fn start(shared: &'a ConnShared) -> Self {
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { shared, finished: false }
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let s = self.shared;
        s.request_ended();
        if self.finished {
            s.completed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let canceled = s.canceled.fetch_add(1, Ordering::Relaxed) + 1;
        if too_many_canceled(canceled, s.completed.load(Ordering::Relaxed)) {
            s.abort.notify_one();
        }
    }
}

fn too_many_canceled(canceled: u64, completed: u64) -> bool {
    canceled > MAX_CANCELED_STREAMS && canceled > completed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_cancellations_or_many_among_more_completions_are_tolerated() {
        assert!(!too_many_canceled(MAX_CANCELED_STREAMS, 0));
        assert!(!too_many_canceled(5000, 10_000), "a long-lived browser connection cancels now and then");
        assert!(too_many_canceled(MAX_CANCELED_STREAMS + 1, 0));
        assert!(too_many_canceled(5000, 4999));
    }
}
