//! A blocking client for the binary protocol. `score` is one round trip;
//! `send` + `flush` + `recv` pipeline many requests on one connection
//! (responses come back in request order). `into_split` gives a writer and a
//! reader half for two threads, which is how an open-loop load generator
//! keeps sending on schedule while responses are still in flight.
//! [`ShardedClient`] sends each cart to the shard that owns its user.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use cartscore_core::Event;
use cartscore_core::shard::partition_of_user;
use thiserror::Error;

use crate::{
    Kind, Redirect, ResponseError, ScoreResponse, Status, encode_request_of, parse_response,
};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error(transparent)]
    Response(#[from] ResponseError),
    #[error("no shard address to ask")]
    NoShards,
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
        self.send_kind(Kind::Score, cart)
    }

    /// Queues a request of `kind` and returns its request id.
    pub fn send_kind(&mut self, kind: Kind, cart: &Event) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        encode_request_of(&mut self.outgoing, kind, id, cart);
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

    /// Scores `cart` and explains the score: with status ok the response
    /// carries each feature's contribution (`ScoreResponse::explanation`).
    pub fn explain(&mut self, cart: &Event) -> Result<ScoreResponse, ClientError> {
        self.writer.send_kind(Kind::Explain, cart);
        self.flush()?;
        self.recv()
    }

    /// The two halves, for a writer thread and a reader thread.
    pub fn into_split(self) -> (RequestWriter, ResponseReader) {
        (self.writer, self.reader)
    }
}

/// How many `NotOwner` answers one score follows before giving up.
const MAX_REDIRECTS: usize = 3;
/// How often one score asks again while its owner is unknown (a group
/// rebalancing), and how long it waits between.
const OWNER_UNKNOWN_RETRIES: usize = 50;
const OWNER_UNKNOWN_PAUSE: Duration = Duration::from_millis(100);

/// Scores against a group of shards (`kafka.mode = shard`), sending each
/// cart to the shard that owns its user. It learns the group from the
/// shards themselves: a `NotOwner` answer names the owner and the partition
/// count, after which carts of users on known partitions go straight to
/// their owner (placed with the producers' partitioner,
/// `cartscore_core::shard::partition_of_user`). A shard that cannot be
/// reached is forgotten and the next seed is asked.
#[derive(Debug)]
pub struct ShardedClient {
    seeds: Vec<String>,
    next_seed: usize,
    connections: std::collections::HashMap<String, TcpClient>,
    partitions: u32,
    /// The owner's binary-protocol address, by partition.
    owners: Vec<Option<String>>,
    timeout: Option<Duration>,
    /// `NotOwner` answers followed so far.
    pub redirects: u64,
}

impl ShardedClient {
    /// `seeds`: binary-protocol addresses of any shards of the group.
    pub fn new(seeds: &[String], timeout: Option<Duration>) -> Self {
        Self {
            seeds: seeds.to_vec(),
            next_seed: 0,
            connections: std::collections::HashMap::new(),
            partitions: 0,
            owners: Vec::new(),
            timeout,
            redirects: 0,
        }
    }

    /// The owner this client would send `user_id`'s carts to, if known.
    pub fn owner_of(&self, user_id: u64) -> Option<&str> {
        if self.partitions == 0 {
            return None;
        }
        let partition = partition_of_user(user_id, self.partitions) as usize;
        self.owners.get(partition)?.as_deref()
    }

    fn learn(&mut self, redirect: &Redirect) {
        if redirect.partitions != self.partitions {
            self.partitions = redirect.partitions;
            self.owners = vec![None; redirect.partitions as usize];
        }
        self.owners[redirect.partition as usize] = redirect.tcp.clone();
    }

    fn forget(&mut self, addr: &str) {
        self.connections.remove(addr);
        for owner in &mut self.owners {
            if owner.as_deref() == Some(addr) {
                *owner = None;
            }
        }
    }

    fn seed(&mut self) -> Option<String> {
        if self.seeds.is_empty() {
            return None;
        }
        let seed = self.seeds[self.next_seed % self.seeds.len()].clone();
        self.next_seed += 1;
        Some(seed)
    }

    fn send_to(&mut self, addr: &str, cart: &Event) -> Result<ScoreResponse, ClientError> {
        if !self.connections.contains_key(addr) {
            let client = TcpClient::connect(addr)?;
            client.set_timeout(self.timeout)?;
            self.connections.insert(addr.to_owned(), client);
        }
        let Some(client) = self.connections.get_mut(addr) else {
            return Err(ClientError::Closed);
        };
        client.score(cart)
    }

    /// One cart, answered by its owner (or the last answer when redirects
    /// run out, or the owner stays unknown).
    pub fn score(&mut self, cart: &Event) -> Result<ScoreResponse, ClientError> {
        let mut redirects = 0;
        let mut unknown = 0;
        let mut failures = 0;
        let mut addr = match self.owner_of(cart.user_id) {
            Some(owner) => owner.to_owned(),
            None => self.seed().ok_or(ClientError::NoShards)?,
        };
        loop {
            let response = match self.send_to(&addr, cart) {
                Ok(response) => response,
                Err(error @ (ClientError::Io(_) | ClientError::Closed)) => {
                    self.forget(&addr);
                    failures += 1;
                    if failures > self.seeds.len() {
                        return Err(error);
                    }
                    addr = self.seed().ok_or(ClientError::NoShards)?;
                    continue;
                }
                Err(error) => return Err(error),
            };
            match response.status {
                Status::NotOwner if redirects < MAX_REDIRECTS => {
                    let Some(redirect) = Redirect::parse(&response.message) else {
                        return Ok(response);
                    };
                    self.learn(&redirect);
                    let Some(owner) = redirect.tcp else {
                        return Ok(response);
                    };
                    redirects += 1;
                    self.redirects += 1;
                    addr = owner;
                }
                Status::OwnerUnknown if unknown < OWNER_UNKNOWN_RETRIES => {
                    unknown += 1;
                    std::thread::sleep(OWNER_UNKNOWN_PAUSE);
                }
                _ => return Ok(response),
            }
        }
    }
}
