//! A blocking client for the binary protocol. `score` is one round trip;
//! `send` + `flush` + `recv` pipeline many requests on one connection
//! (responses come back in request order). `into_split` gives a writer and a
//! reader half for two threads, which is how an open-loop load generator
//! keeps sending on schedule while responses are still in flight.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use cartscore_core::Event;
use thiserror::Error;

use crate::{ResponseError, ScoreResponse, encode_request, parse_response};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error(transparent)]
    Response(#[from] ResponseError),
}

/// The sending half: encodes requests and writes them.
#[derive(Debug)]
pub struct RequestWriter {
    stream: TcpStream,
    outgoing: Vec<u8>,
    next_id: u64,
}

impl RequestWriter {
    /// Queues a score request and returns its request id.
    pub fn send(&mut self, cart: &Event) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        encode_request(&mut self.outgoing, id, cart);
        id
    }

    /// Queues raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.outgoing.extend_from_slice(bytes);
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&self.outgoing)?;
        self.outgoing.clear();
        Ok(())
    }
}

/// The receiving half: reads responses in request order.
#[derive(Debug)]
pub struct ResponseReader {
    stream: TcpStream,
    incoming: Vec<u8>,
    read_pos: usize,
}

impl ResponseReader {
    /// The next response, in request order.
    pub fn recv(&mut self) -> Result<ScoreResponse, ClientError> {
        loop {
            if let Some((response, used)) = parse_response(&self.incoming[self.read_pos..])? {
                self.read_pos += used;
                if self.read_pos == self.incoming.len() {
                    self.incoming.clear();
                    self.read_pos = 0;
                }
                return Ok(response);
            }
            if self.read_pos > 0 {
                self.incoming.drain(..self.read_pos);
                self.read_pos = 0;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.incoming.extend_from_slice(&chunk[..n]);
        }
    }
}

#[derive(Debug)]
pub struct TcpClient {
    writer: RequestWriter,
    reader: ResponseReader,
}

impl TcpClient {
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Self {
            writer: RequestWriter {
                stream: stream.try_clone()?,
                outgoing: Vec::with_capacity(64 * 1024),
                next_id: 1,
            },
            reader: ResponseReader {
                stream,
                incoming: Vec::with_capacity(64 * 1024),
                read_pos: 0,
            },
        })
    }

    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.reader.stream.set_read_timeout(timeout)?;
        self.reader.stream.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Queues a score request and returns its request id.
    pub fn send(&mut self, cart: &Event) -> u64 {
        self.writer.send(cart)
    }

    /// Queues raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.send_raw(bytes);
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.writer.flush()
    }

    /// The next response, in request order.
    pub fn recv(&mut self) -> Result<ScoreResponse, ClientError> {
        self.reader.recv()
    }

    /// One request, one response.
    pub fn score(&mut self, cart: &Event) -> Result<ScoreResponse, ClientError> {
        self.send(cart);
        self.flush()?;
        self.recv()
    }

    /// The two halves, for a writer thread and a reader thread.
    pub fn into_split(self) -> (RequestWriter, ResponseReader) {
        (self.writer, self.reader)
    }
}
