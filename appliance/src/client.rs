//! A blocking client for the binary protocol. `score` is one round trip;
//! `send` + `flush` + `recv` pipeline many requests on one connection
//! (responses come back in request order).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use cartscore_core::Event;
use thiserror::Error;

use crate::protocol::{self, ResponseError, ScoreResponse};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error(transparent)]
    Response(#[from] ResponseError),
}

#[derive(Debug)]
pub struct TcpClient {
    stream: TcpStream,
    outgoing: Vec<u8>,
    incoming: Vec<u8>,
    read_pos: usize,
    next_id: u64,
}

impl TcpClient {
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            outgoing: Vec::with_capacity(64 * 1024),
            incoming: Vec::with_capacity(64 * 1024),
            read_pos: 0,
            next_id: 1,
        })
    }

    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Queues a score request and returns its request id.
    pub fn send(&mut self, cart: &Event) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        protocol::encode_request(&mut self.outgoing, id, cart);
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

    /// The next response, in request order.
    pub fn recv(&mut self) -> Result<ScoreResponse, ClientError> {
        loop {
            if let Some((response, used)) =
                protocol::parse_response(&self.incoming[self.read_pos..])?
            {
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

    /// One request, one response.
    pub fn score(&mut self, cart: &Event) -> Result<ScoreResponse, ClientError> {
        self.send(cart);
        self.flush()?;
        self.recv()
    }
}
