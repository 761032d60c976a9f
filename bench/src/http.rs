//! Any HTTP/1.1 endpoint as a load target. Requests are pre-encoded and
//! written on raw keep-alive connections, pipelined up to the plan's depth,
//! so the client costs a `write` per request and the figures are the
//! server's, not an HTTP library's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::load::{Reply, ReplySource, RequestSink, Target};

#[derive(Debug, Clone, Args)]
pub struct HttpTargetArgs {
    /// The endpoint, `http://host:port/path` (e.g. the appliance's
    /// `/v1/score` or `/v2/models/cartscore/infer`, or another server).
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/score")]
    pub url: String,
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// Extra request headers, `Name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
}

#[derive(Debug)]
pub struct HttpTarget {
    url: String,
    addr: SocketAddr,
    /// Whole requests, head and body, one per variant.
    requests: Arc<Vec<Vec<u8>>>,
}

impl HttpTarget {
    pub fn new(args: &HttpTargetArgs, bodies: &[Vec<u8>]) -> Result<Self> {
        let uri: http::Uri = args
            .url
            .parse()
            .with_context(|| format!("--url {} is not a URL", args.url))?;
        ensure!(
            uri.scheme_str() == Some("http"),
            "--url {}: only http:// is supported (the bench measures the server, not TLS)",
            args.url
        );
        let authority = uri
            .authority()
            .with_context(|| format!("--url {} has no host", args.url))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = (authority.host(), port)
            .to_socket_addrs()
            .with_context(|| format!("failed to resolve {}", authority.host()))?
            .next()
            .with_context(|| format!("{} resolves to no address", authority.host()))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut extra = String::new();
        for header in &args.headers {
            let Some((name, value)) = header.split_once(':') else {
                bail!("--header {header:?} is not `Name: value`");
            };
            extra.push_str(&format!("{}: {}\r\n", name.trim(), value.trim()));
        }
        let requests = bodies
            .iter()
            .map(|body| {
                let mut request = format!(
                    "{} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n",
                    args.method,
                    body.len()
                )
                .into_bytes();
                request.extend_from_slice(body);
                request
            })
            .collect();
        Ok(Self {
            url: args.url.clone(),
            addr,
            requests: Arc::new(requests),
        })
    }
}

struct Sink {
    stream: TcpStream,
    requests: Arc<Vec<Vec<u8>>>,
    outgoing: Vec<u8>,
}

impl RequestSink for Sink {
    fn queue(&mut self, seq: u64) {
        let request = &self.requests[(seq % self.requests.len() as u64) as usize];
        self.outgoing.extend_from_slice(request);
    }

    fn flush(&mut self) -> Result<()> {
        self.stream
            .write_all(&self.outgoing)
            .context("failed to send requests")?;
        self.outgoing.clear();
        Ok(())
    }
}

struct Source {
    stream: TcpStream,
    buffer: Vec<u8>,
    start: usize,
}

impl ReplySource for Source {
    fn recv(&mut self) -> Result<Reply> {
        loop {
            if let Some((status, used)) = parse_response(&self.buffer[self.start..])? {
                self.start += used;
                if self.start == self.buffer.len() {
                    self.buffer.clear();
                    self.start = 0;
                }
                return Ok(if (200..300).contains(&status) {
                    Reply::Ok { version: None }
                } else {
                    Reply::Failed(format!("http_{status}"))
                });
            }
            if self.start > 0 {
                self.buffer.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self
                .stream
                .read(&mut chunk)
                .context("failed to read a response")?;
            ensure!(n > 0, "the server closed the connection");
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The status and length of one complete response at the start of `buf`.
fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf).context("malformed HTTP response")? {
        httparse::Status::Complete(head) => head,
        httparse::Status::Partial => return Ok(None),
    };
    let mut length = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(header.value).unwrap_or("");
            length = Some(
                text.trim()
                    .parse::<usize>()
                    .with_context(|| format!("bad Content-Length {text:?}"))?,
            );
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("chunked responses are not supported: the server must send Content-Length");
        }
    }
    let status = response.code.unwrap_or(0);
    let total = head + length.unwrap_or(0);
    Ok((buf.len() >= total).then_some((status, total)))
}

impl Target for HttpTarget {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn connect(&self, timeout: Duration) -> Result<(Box<dyn RequestSink>, Box<dyn ReplySource>)> {
        let stream = TcpStream::connect(self.addr)
            .with_context(|| format!("failed to connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok((
            Box::new(Sink {
                stream: stream.try_clone()?,
                requests: Arc::clone(&self.requests),
                outgoing: Vec::with_capacity(64 * 1024),
            }),
            Box::new(Source {
                stream,
                buffer: Vec::with_capacity(64 * 1024),
                start: 0,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_split_at_their_content_length() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 0\r\n\r\n";
        let (status, used) = parse_response(two).unwrap().unwrap();
        assert_eq!((status, used), (200, 40));
        assert_eq!(parse_response(&two[used..]).unwrap().unwrap().0, 422);
        assert!(parse_response(&two[..30]).unwrap().is_none());
        assert!(parse_response(&two[..39]).unwrap().is_none());
    }

    #[test]
    fn only_plain_http_urls_are_taken() {
        let args = |url: &str| HttpTargetArgs {
            url: url.into(),
            method: "POST".into(),
            headers: vec![],
        };
        assert!(HttpTarget::new(&args("https://127.0.0.1:1/x"), &[]).is_err());
        let target = HttpTarget::new(
            &args("http://127.0.0.1:9/v1/score?explain=true"),
            &[b"{}".to_vec()],
        )
        .unwrap();
        let request = String::from_utf8(target.requests[0].clone()).unwrap();
        assert!(
            request.starts_with("POST /v1/score?explain=true HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"),
            "{request}"
        );
        assert!(request.ends_with("Content-Length: 2\r\n\r\n{}"));
    }
}
