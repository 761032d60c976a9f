//! The drain mode: read every partition of a topic from its start up to the
//! end it had when the run began, as fast as the broker serves it, and
//! report the rate. It shows what a consumer that fell behind can catch up
//! at, for a given `fetch.wait.max.ms`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::kafka;

#[derive(Debug, Args)]
pub struct DrainArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(long, default_value = "tracking.raw_user_behavior")]
    pub topic: String,
    /// fetch.wait.max.ms of the consumer (the appliance's default).
    #[arg(long, default_value_t = 50)]
    pub fetch_wait_ms: u32,
    /// Stop after this long, drained or not.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// A librdkafka consumer setting, `key=value` (repeatable).
    #[arg(short = 'X', value_parser = crate::kafka::property)]
    pub consumer_property: Vec<(String, String)>,
}

/// What a drain printed as JSON.
#[derive(Debug, Serialize)]
struct DrainSummary<'a> {
    topic: &'a str,
    fetch_wait_ms: u32,
    /// Records between each partition's start and its end at the start.
    backlog: u64,
    read: u64,
    seconds: f64,
    events_per_second: f64,
    drained: bool,
}

pub fn run(args: &DrainArgs) -> Result<()> {
    let consumer = kafka::plain_consumer(
        &args.brokers,
        "cartscore-drain",
        args.fetch_wait_ms,
        &args.consumer_property,
    )?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    let mut backlog = 0;
    for (partition, low, high) in kafka::partition_ends(&consumer, &args.topic)? {
        assignment
            .add_partition_offset(&args.topic, partition, Offset::Offset(low))
            .context("failed to list a partition")?;
        backlog += (high - low).max(0) as u64;
        // 0: nothing (more) to read in this partition.
        ends.push((partition, if high > low { high } else { 0 }));
    }
    consumer
        .assign(&assignment)
        .context("failed to assign the partitions")?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut read = 0u64;
    let mut last = start;
    let behind = |ends: &[(i32, i64)]| ends.iter().any(|&(_, end)| end > 0);
    while behind(&ends) && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.context("failed to consume")?;
        for (partition, end) in &mut ends {
            if *partition == message.partition() && message.offset() + 1 >= *end {
                // This partition is read up to its end at the start.
                *end = 0;
            }
        }
        read += 1;
        last = Instant::now();
    }
    let seconds = last.duration_since(start).as_secs_f64();
    let summary = DrainSummary {
        topic: &args.topic,
        fetch_wait_ms: args.fetch_wait_ms,
        backlog,
        read,
        seconds,
        events_per_second: if seconds > 0.0 {
            read as f64 / seconds
        } else {
            0.0
        },
        drained: !behind(&ends),
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
