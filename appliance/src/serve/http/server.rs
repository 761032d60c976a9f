//! The HTTP listener. It holds at most `http.max_connections` connections
//! (one more is accepted and closed at once, counted); a connection whose
//! next request's headers do not arrive within `http.header_read_timeout_ms`
//! is closed (slowloris, and idle keep-alive connections); a request whose
//! body and handling take longer than `http.request_timeout_ms` is answered
//! `408` (see `track`). Every close for cause is counted by reason in
//! `cartscore_connections_closed_total{api="http",reason}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::HttpConfig;
use crate::ops::metrics::{ConnectionLabels, Metrics};

/// Why a connection ended other than by the client's close.
fn close_reason(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            return if hyper.is_timeout() {
                "header_timeout"
            } else if hyper.is_parse() || hyper.is_parse_too_large() {
                "malformed_request"
            } else if hyper.is_incomplete_message() || hyper.is_closed() {
                "client_gone"
            } else {
                "protocol_error"
            };
        }
        if error.downcast_ref::<std::io::Error>().is_some() {
            return "io_error";
        }
        source = error.source();
    }
    "protocol_error"
}

/// Serves `router` on `listener` until `drained` fires, then waits for the
/// connections to finish what they hold (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    metrics: Arc<Metrics>,
    drained: tokio::sync::oneshot::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(config.max_connections.get()));
    // HTTP/1.1 only: the clients (and a TLS front) speak it, and the header
    // timeout runs from the first byte awaited (a protocol sniffer waiting
    // for a first byte that never comes would hold an idle connection).
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms));
    let graceful = GracefulShutdown::new();
    let refused = metrics
        .connections_refused
        .get_or_create(&ConnectionLabels {
            api: "http",
            reason: "max_connections",
        })
        .clone();
    let mut drained = std::pin::pin!(drained);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut drained => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refused.inc();
            drop(stream);
            continue;
        };
        // Without TCP_NODELAY a response written in two segments waits for
        // the client's delayed ACK: latency then tracks the gap between
        // requests (up to 40 ms), which the bench's HTTP mode showed.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "failed to set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            metrics.http_connections.inc();
            if let Err(error) = connection.await {
                let reason = close_reason(&error);
                tracing::debug!(%error, reason, "HTTP connection closed");
                if reason != "client_gone" {
                    metrics
                        .connections_closed
                        .get_or_create(&ConnectionLabels {
                            api: "http",
                            reason,
                        })
                        .inc();
                }
            }
            metrics.http_connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
