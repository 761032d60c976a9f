//! The appliance's binary protocol as a load target, through
//! `cartscore-protocol`'s client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cartscore_core::Event;
use cartscore_protocol::Status;
use cartscore_protocol::client::{RequestWriter, ResponseReader, TcpClient};
use clap::Args;

use crate::load::{Reply, ReplySource, RequestSink, Target};

#[derive(Debug, Clone, Args)]
pub struct TcpTargetArgs {
    /// The appliance's binary-protocol address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub addr: SocketAddr,
}

#[derive(Debug)]
pub struct TcpTarget {
    pub addr: SocketAddr,
    pub carts: Arc<Vec<Event>>,
}

struct Sink {
    writer: RequestWriter,
    carts: Arc<Vec<Event>>,
}

impl RequestSink for Sink {
    fn queue(&mut self, seq: u64) {
        self.writer
            .send(&self.carts[(seq % self.carts.len() as u64) as usize]);
    }

    fn flush(&mut self) -> Result<()> {
        self.writer.flush().context("failed to send requests")
    }
}

struct Source(ResponseReader);

impl ReplySource for Source {
    fn recv(&mut self) -> Result<Reply> {
        let response = self.0.recv().context("failed to read a response")?;
        Ok(match response.status {
            Status::Ok => Reply::Ok {
                version: Some(response.model_version),
            },
            other => Reply::Failed(other.label().to_owned()),
        })
    }
}

impl Target for TcpTarget {
    fn describe(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    fn connect(&self, timeout: Duration) -> Result<(Box<dyn RequestSink>, Box<dyn ReplySource>)> {
        let client = TcpClient::connect(self.addr)
            .with_context(|| format!("failed to connect to {}", self.addr))?;
        client
            .set_timeout(Some(timeout))
            .context("failed to set the socket timeout")?;
        let (writer, reader) = client.into_split();
        Ok((
            Box::new(Sink {
                writer,
                carts: Arc::clone(&self.carts),
            }),
            Box::new(Source(reader)),
        ))
    }
}
