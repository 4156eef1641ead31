//! WebSocket backends and clients for the tunnel tests.
//!
//! A [`ws_backend`] answers plain HTTP requests with `x-backend: NAME`, and
//! upgrades `Upgrade: websocket` requests (101 with `x-backend` too). On a
//! socket it echoes text and binary messages unchanged, and:
//! - `"whoami"` → its name;
//! - a pong from the client → `"pong:PAYLOAD"` (pings are answered by
//!   tungstenite itself, with the same payload);
//! - `"close-me"` → a close frame (4000, `"bye"`), then the connection ends;
//! - `"drop-me"` → the connection is dropped without a close frame;
//! - a close frame from the client is recorded in [`WsEvents`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{self, Message};

use super::servers::TestServer;
use super::{BackendBody, Handler, full};

/// Close frames the backend received, as `CODE:REASON`.
pub type WsEvents = Arc<Mutex<Vec<String>>>;

/// A client socket through tether.
pub type Socket = WebSocketStream<TcpStream>;

/// Any async handler as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<BackendBody>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// A WebSocket echo backend named `name`, and the close frames it receives.
pub async fn ws_backend(name: &str) -> (TestServer, WsEvents) {
    let (handler, events) = ws_handler(name);
    (TestServer::plain(handler).await, events)
}

/// The handler of [`ws_backend`] (for a TLS [`TestServer`]), and its events.
pub fn ws_handler(name: &str) -> (Handler, WsEvents) {
    let events: WsEvents = Arc::default();
    let (name, ev) = (name.to_string(), events.clone());
    let handler = handler(move |req| {
        let (name, ev) = (name.clone(), ev.clone());
        async move { ws_response(name, ev, req) }
    });
    (handler, events)
}

fn ws_response(name: String, events: WsEvents, mut req: Request<Incoming>) -> Response<BackendBody> {
    let key = req.headers().get("sec-websocket-key").map(|k| derive_accept_key(k.as_bytes()));
    let wants_ws = req.headers().get("upgrade").is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let mut resp = Response::new(full(""));
    resp.headers_mut().insert("x-backend", HeaderValue::from_str(&name).unwrap());
    let (Some(accept), true) = (key, wants_ws) else {
        return resp; // a plain request
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        echo(ws, &name, &events).await;
    });
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert("sec-websocket-accept", HeaderValue::from_str(&accept).unwrap());
    resp
}

async fn echo<S>(mut ws: WebSocketStream<S>, name: &str, events: &WsEvents)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(t) if t.as_str() == "whoami" => Message::text(name),
            Message::Text(t) if t.as_str() == "drop-me" => return,
            Message::Text(t) if t.as_str() == "close-me" => {
                let frame = CloseFrame { code: CloseCode::Library(4000), reason: "bye".into() };
                let _ = ws.close(Some(frame)).await;
                continue; // until the client's close reply ends the stream
            }
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Pong(p) => Message::text(format!("pong:{}", String::from_utf8_lossy(&p))),
            Message::Close(frame) => {
                let text = frame.map_or("none".to_string(), |f| format!("{}:{}", u16::from(f.code), f.reason));
                events.lock().unwrap().push(text);
                continue; // tungstenite answers the close itself
            }
            Message::Ping(_) | Message::Frame(_) => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

/// Opens a socket to `ws://addr{path}` with `cookie` (a `Cookie` header
/// value) if given; returns it with the 101 response.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
    cookie: Option<&HeaderValue>,
) -> Result<(Socket, tungstenite::handshake::client::Response), tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    if let Some(c) = cookie {
        request.headers_mut().insert("cookie", c.clone());
    }
    let tcp = TcpStream::connect(addr).await.map_err(tungstenite::Error::Io)?;
    tokio_tungstenite::client_async(request, tcp).await
}

/// The next message that is not a ping or pong answered by tungstenite,
/// within [`super::WAIT_TIMEOUT`]; `None` when the socket ended.
pub async fn next(ws: &mut Socket) -> Option<Result<Message, tungstenite::Error>> {
    tokio::time::timeout(super::WAIT_TIMEOUT, ws.next()).await.expect("a message or the end of the socket in time")
}

/// Sends text and returns the text reply.
pub async fn ask(ws: &mut Socket, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    match next(ws).await {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected a text reply to `{text}`, got {other:?}"),
    }
}
