//! A demo app server with sessions in its own memory, the classic "local
//! session" app that needs sticky sessions: `GET /` counts the visits of a
//! session kept under the `demo_sid` cookie *in this process only*, so when
//! this backend dies its sessions are gone. `GET /healthz` answers 200.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub const SESSION_COOKIE: &str = "demo_sid";

/// One demo backend's in-memory state.
#[derive(Debug)]
pub struct DemoApp {
    name: String,
    sessions: Mutex<HashMap<String, u64>>,
    minted: AtomicU64,
    salt: RandomState,
}

impl DemoApp {
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(DemoApp {
            name: name.into(),
            sessions: Mutex::new(HashMap::new()),
            minted: AtomicU64::new(0),
            salt: RandomState::new(),
        })
    }

    /// Sessions this process holds (lost if it dies).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/healthz" {
            return text(StatusCode::OK, "ok\n".to_string());
        }
        let sid = crate::select::cookie_values(req.headers(), SESSION_COOKIE).next().map(str::to_string);
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let (sid, visits, fresh) = match sid.and_then(|s| sessions.get_mut(&s).map(|v| (s, v))) {
            Some((sid, visits)) => {
                *visits += 1;
                (sid, *visits, false)
            }
            None => {
                let n = self.minted.fetch_add(1, Ordering::Relaxed);
                let sid = format!("{:016x}", self.salt.hash_one((n, &self.name)));
                sessions.insert(sid.clone(), 1);
                (sid, 1, true)
            }
        };
        drop(sessions);
        let lost = req.headers().get("tether-affinity").is_some_and(|v| v == "reassigned");
        let note = if lost { " (your previous backend is gone: new session)" } else { "" };
        let mut resp = text(StatusCode::OK, format!("{}: visit {visits} of session {sid}{note}\n", self.name));
        if let Ok(v) = HeaderValue::from_str(&self.name) {
            resp.headers_mut().insert("x-backend", v);
        }
        if let Ok(v) = HeaderValue::from_str(&visits.to_string()) {
            resp.headers_mut().insert("x-visits", v);
        }
        if fresh && let Ok(v) = HeaderValue::from_str(&format!("{SESSION_COOKIE}={sid}; Path=/; HttpOnly")) {
            resp.headers_mut().insert(http::header::SET_COOKIE, v);
        }
        resp
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Serves the demo app on `listener` until the task is dropped or aborted.
/// Connections are owned by this task, so aborting it kills them too, as a
/// crashed process would.
pub async fn serve(app: Arc<DemoApp>, listener: TcpListener) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (tcp, _) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "demo backend accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let builder = builder.clone();
        connections.spawn(async move {
            let svc = service_fn(move |req| {
                let resp = app.respond(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}
