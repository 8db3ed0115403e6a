//! [`MockServer`]: the mock over real TCP on 127.0.0.1 (hyper, HTTP/1.1, keep-alive).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::MockConfig;
use crate::error::MockError;
use crate::service::{Body, MockKling};
use crate::stats::Stats;

/// A running mock server. Dropping it stops the server and closes its connections.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use kling_mock::{MockConfig, MockServer, Preset};
/// let server = MockServer::start(MockConfig::preset(Preset::Free).speed(60.0)).await?;
/// assert!(server.base_url().starts_with("http://127.0.0.1:"));
/// server.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    mock: MockKling,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `127.0.0.1:{config.port}` (0 = a free port) and starts serving.
    ///
    /// An invalid configuration is an [`io::ErrorKind::InvalidInput`] error naming the field.
    ///
    /// Result URLs point at the server itself (`GET /__mock/files/{task_id}/{index}.{ext}`
    /// answers small deterministic bytes, [`file_bytes`](crate::file_bytes)) unless
    /// [`MockConfig::files_base_url`] is set.
    pub async fn start(mut config: MockConfig) -> io::Result<MockServer> {
        config.validate()?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, config.port)).await?;
        let addr = listener.local_addr()?;
        if config.files_base_url.is_none() {
            config.files_base_url = Some(format!("http://{addr}/__mock/files"));
        }
        let mock = MockKling::new(config)?;
        Ok(Self::serve_on(listener, mock))
    }

    /// Serves an existing mock (its state shared with the caller's clones) on `127.0.0.1:port`.
    pub async fn serve(mock: MockKling, port: u16) -> io::Result<MockServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        Ok(Self::serve_on(listener, mock))
    }

    fn serve_on(listener: TcpListener, mock: MockKling) -> MockServer {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, mock.clone(), stopped));
        MockServer {
            addr,
            mock,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The mock behind the server, for stats and runtime control.
    pub fn mock(&self) -> &MockKling {
        &self.mock
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.mock.stats()
    }

    /// Stops accepting, closes every connection and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, mock: MockKling, mut stopped: oneshot::Receiver<()>) {
    // Connections live in the set: when the loop ends the set is dropped and aborts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let mock = mock.clone();
                connections.spawn(async move {
                    let timeout = mock.config().header_read_timeout;
                    let service = service_fn(move |req| serve_one(mock.clone(), req));
                    // An error here is a client gone away, a header not sent in time or a
                    // dropped-connection fault.
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Reads the body up to the configured bound, then hands the request to the mock. An error
/// (the dropped-connection fault, a body not sent in time) makes hyper close the connection
/// without a response.
async fn serve_one(
    mock: MockKling,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, MockError> {
    let (parts, body) = req.into_parts();
    let limit = mock.config().max_body_bytes;
    let read = Limited::new(body, limit).collect();
    // The body gets as long as the header did: a client that stops halfway through it holds
    // no connection (nor its buffer) for good.
    let read = match mock.config().header_read_timeout {
        Some(timeout) => tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| MockError::dropped())?,
        None => read.await,
    };
    let body = match read {
        Ok(collected) => Body::Read(collected.to_bytes()),
        // Answered 1200 by the mock, after the fault draw every request meets.
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Body::TooLarge
        }
        Err(_) => return Err(MockError::dropped()),
    };
    mock.answer(parts, body).await
}
