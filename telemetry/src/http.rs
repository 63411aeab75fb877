//! A small HTTP/1.1 server for read-only endpoints: `/metrics`, and whatever
//! a binary routes beside it (the receiver's status page and JSON API).
//!
//! ## Bounds (it may face any client that can reach the address)
//! - It binds only the address it is given (`127.0.0.1:9650` by default in
//!   the receiver; off by default in the agent).
//! - `GET` and `HEAD` only; a request body is never read. Any other method
//!   gets `405`.
//! - Request line and headers: at most [`MAX_HEADER_BYTES`] and
//!   [`MAX_HEADERS`] headers, read within [`HEADER_TIMEOUT`]; a connection
//!   lives at most [`CONNECTION_LIFETIME`] (keep-alive included), and at most
//!   [`MAX_CONNECTIONS`] are served at once (the accept loop waits for a
//!   slot, so a flood queues in the kernel backlog instead of in memory).
//! - Garbage on the socket is a parse error for hyper, which closes that
//!   connection; nothing panics and other connections carry on.
//!
//! Handlers are async closures from a [`Request`] (path and query only) to a
//! [`Reply`]; they must not block (do file or store IO in the background and
//! serve what it cached).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info_span, Instrument};

/// Most bytes of request line and headers (hyper's minimum buffer).
pub const MAX_HEADER_BYTES: usize = 8192;
/// Most request headers.
pub const MAX_HEADERS: usize = 32;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// What a handler sees of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The path, e.g. `/metrics`.
    pub path: String,
    /// The query string without `?`, if any.
    pub query: Option<String>,
}

/// A handler's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// `200` with a body.
    pub fn ok(content_type: &'static str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status: 200,
            content_type,
            body: body.into(),
        }
    }

    /// A plain-text reply with any status.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(body.into()),
        }
    }

    /// `404`.
    pub fn not_found() -> Reply {
        Reply::text(404, "not found\n")
    }
}

/// A boxed handler future.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Routes requests to replies.
pub type Handler = Arc<dyn Fn(Request) -> ReplyFuture + Send + Sync>;

/// A bound, not yet serving, HTTP server.
#[derive(Debug)]
pub struct HttpServer {
    listener: TcpListener,
    local: SocketAddr,
}

impl HttpServer {
    /// Binds `addr` (TCP).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok(HttpServer { listener, local })
    }

    /// The bound address (the port chosen for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves `handler` until the returned task is aborted or the runtime
    /// ends. Accept errors (e.g. out of file descriptors) are logged and
    /// retried after a pause.
    pub fn spawn(self, handler: Handler) -> tokio::task::JoinHandle<()> {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match self.listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!("http accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let handler = handler.clone();
                tokio::spawn(
                    async move {
                        serve_connection(stream, handler).await;
                        drop(permit);
                    }
                    .instrument(info_span!("http", %peer)),
                );
            }
        })
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, handler: Handler) {
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(respond(req, &handler).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("http connection: {e}"),
        Err(_) => debug!("http connection closed after {CONNECTION_LIFETIME:?}"),
    }
}

async fn respond(req: hyper::Request<Incoming>, handler: &Handler) -> hyper::Response<Full<Bytes>> {
    let reply = if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = Reply::text(405, "only GET and HEAD\n");
        r.status = 405;
        r
    } else {
        let request = Request {
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
        };
        handler(request).await
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = hyper::Response::new(Full::new(reply.body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

/// A handler serving `metrics` at `/metrics` and passing everything else to
/// `rest`.
pub fn with_metrics(metrics: Arc<crate::ReplicationMetrics>, rest: Option<Handler>) -> Handler {
    Arc::new(move |req: Request| {
        if req.path == "/metrics" {
            let body = metrics.render();
            return Box::pin(async move { Reply::ok(crate::OPENMETRICS_CONTENT_TYPE, body) });
        }
        match &rest {
            Some(h) => h(req),
            None if req.path == "/" => Box::pin(async {
                Reply::ok(
                    "text/plain; charset=utf-8",
                    "Lifeboat: metrics at /metrics\n",
                )
            }),
            None => Box::pin(async { Reply::not_found() }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_metrics_and_survives_garbage() {
        let metrics = Arc::new(crate::ReplicationMetrics::new(false));
        metrics.volume("web-1", "root").add_sent_bytes(5);
        let server = HttpServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr();
        let task = server.spawn(with_metrics(metrics, None));

        let r = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("application/openmetrics-text"), "{r}");
        assert!(
            r.contains(r#"lifeboat_sent_bytes_total{server="web-1",volume="root"} 5"#),
            "{r}"
        );
        let r = exchange(
            addr,
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        // Garbage, then an oversized header: the connection is refused or
        // closed, the server lives on.
        let r = exchange(addr, b"\x00\x01\x02 garbage\r\n\r\n").await;
        assert!(!r.contains("200 OK"), "{r}");
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 64 << 10));
        big.extend(b"\r\n\r\n");
        let r = exchange(addr, &big).await;
        assert!(!r.contains("200 OK"), "{r}");
        let r = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        task.abort();
    }
}
