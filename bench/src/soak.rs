//! `soak`: a long run against a running appliance, to show that nothing it
//! holds grows without bound. For `--duration` it scores at fixed rates over
//! TCP and HTTP, streams events through `POST /v1/events` with event time
//! running `--time-scale` times faster than the clock (so sessions expire
//! and the sweep deletes them), and delivers a new bundle every
//! `--reload-every` seconds. Every `--sample-every` seconds it samples the
//! process (RSS, open file descriptors, threads, from /proc), the store
//! (the LMDB file's size, the bytes in use from `/metrics`) and the
//! latency of the last interval (p99, TCP and HTTP). It fails when a
//! request fails or when a resource still grows over the run's second half:
//! a least-squares slope that, carried over the whole run, would add more
//! than `--growth-tolerance` of its level (and more than a floor per
//! resource, so noise on a small figure does not fail it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cartscore_core::bundle::BundleMetadata;
use clap::Args;
use prost::Message;
use serde::Serialize;

use crate::http::{HttpTarget, HttpTargetArgs};
use crate::load::{self, LoadPlan};
use crate::report::Percentiles;
use crate::requests::RequestArgs;
use crate::tcp::TcpTarget;

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// The appliance's process id (its /proc is sampled).
    #[arg(long)]
    pub pid: u32,
    /// The binary protocol's address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub tcp: SocketAddr,
    /// The appliance's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// The appliance's model folder (new bundles are delivered into it).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// The bundle to deliver again under new versions.
    #[arg(long, default_value = "models/demo/model.onnx")]
    pub bundle: PathBuf,
    /// The appliance's store folder (its data.mdb is sampled).
    #[arg(long)]
    pub store: PathBuf,
    /// Seconds the soak runs.
    #[arg(long, default_value_t = 1_800.0)]
    pub duration: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60.0)]
    pub sample_every: f64,
    /// Seconds between bundle deliveries.
    #[arg(long, default_value_t = 60.0)]
    pub reload_every: f64,
    /// Scores per second over TCP and over HTTP.
    #[arg(long, default_value_t = 2_000.0)]
    pub tcp_rate: f64,
    #[arg(long, default_value_t = 500.0)]
    pub http_rate: f64,
    /// Events per second streamed in.
    #[arg(long, default_value_t = 2_000.0)]
    pub events_rate: f64,
    /// Event time runs this many times faster than the clock (at 60 a
    /// session idle for its 2 h expiry does so in 2 minutes).
    #[arg(long, default_value_t = 60.0)]
    pub time_scale: f64,
    /// Largest growth over the run, as a share of a resource's level, that
    /// a second-half slope may project.
    #[arg(long, default_value_t = 0.10)]
    pub growth_tolerance: f64,
    /// The cart events scored (the data set).
    #[command(flatten)]
    pub requests: RequestArgs,
    /// Write the samples and the verdict as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One sample of the appliance.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_seconds: f64,
    pub rss_kib: f64,
    pub open_fds: f64,
    pub threads: f64,
    pub store_file_bytes: f64,
    pub store_used_bytes: f64,
    pub live_sessions: f64,
    /// p99 of the interval before the sample, µs (from schedule).
    pub tcp_p99_us: f64,
    pub http_p99_us: f64,
    pub events_applied: u64,
    pub reloads: u64,
}

/// A resource's trend over the second half.
#[derive(Debug, Clone, Serialize)]
pub struct Trend {
    pub resource: &'static str,
    pub first: f64,
    pub last: f64,
    /// Per hour, from a least-squares fit over the second half.
    pub slope_per_hour: f64,
    /// What the slope adds over the whole run.
    pub projected_growth: f64,
    pub allowed_growth: f64,
    pub bounded: bool,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub duration_seconds: f64,
    pub samples: Vec<Sample>,
    pub trends: Vec<Trend>,
    pub tcp_requests: u64,
    pub http_requests: u64,
    pub failed_requests: u64,
    pub events_sent: u64,
    pub reloads: u64,
    pub passed: bool,
}

/// Least-squares slope of `ys` over `xs`.
pub fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut cov, mut var) = (0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        cov += (x - mx) * (y - my);
        var += (x - mx) * (x - mx);
    }
    if var > 0.0 { cov / var } else { 0.0 }
}

/// The trend of one resource; `floor` is the growth always allowed.
pub fn trend(
    resource: &'static str,
    samples: &[Sample],
    value: impl Fn(&Sample) -> f64,
    tolerance: f64,
    floor: f64,
    duration: f64,
) -> Trend {
    let half = &samples[samples.len() / 2..];
    let xs: Vec<f64> = half.iter().map(|s| s.at_seconds).collect();
    let ys: Vec<f64> = half.iter().map(&value).collect();
    let per_second = slope(&xs, &ys);
    let level = ys.iter().sum::<f64>() / ys.len().max(1) as f64;
    let projected = per_second * duration;
    let allowed = (level * tolerance).max(floor);
    Trend {
        resource,
        first: samples.first().map_or(0.0, &value),
        last: samples.last().map_or(0.0, &value),
        slope_per_hour: per_second * 3600.0,
        projected_growth: projected,
        allowed_growth: allowed,
        bounded: projected <= allowed,
    }
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
fn call(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut stream =
        TcpStream::connect(addr).with_context(|| format!("failed to connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no HTTP status in the answer"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// The value of a sample line `name value` in `/metrics`.
fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn proc_status(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_ascii_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Events of `users` users in sessions of a few minutes of event time,
/// moving forward `scale` times faster than the clock.
struct EventSource {
    started: Instant,
    scale: f64,
    seq: u64,
}

impl EventSource {
    /// 2019-10-01 00:00:00 UTC in µs.
    const START_MICROS: i64 = 1_569_888_000_000_000;

    fn batch(&mut self, count: usize) -> String {
        let now =
            Self::START_MICROS + (self.started.elapsed().as_secs_f64() * self.scale * 1e6) as i64;
        let mut events = Vec::with_capacity(count);
        for _ in 0..count {
            self.seq += 1;
            let seq = self.seq;
            let user = 1 + seq % 20_000;
            // A user's session lasts 10 event minutes, then another begins.
            let session = now / 600_000_000;
            let kind = match seq % 50 {
                0 => "cart",
                1 => "purchase",
                _ => "view",
            };
            events.push(format!(
                r#"{{"event_time":{now},"event_type":"{kind}","product_id":{},"category_id":2053013555631882655,"category_code":"electronics.smartphone","brand":"samsung","price":{}.5,"user_id":{user},"user_session":"soak-{user}-{session}"}}"#,
                1 + seq % 5_000,
                10 + seq % 490
            ));
        }
        format!("[{}]", events.join(","))
    }
}

/// Delivers `proto` under a new version into `dir`, removing the previous
/// delivery (the folder stays the same size).
fn deliver(
    dir: &Path,
    proto: &cartscore_core::onnx::ModelProto,
    metadata: &BundleMetadata,
    i: u64,
    previous: &mut Option<PathBuf>,
) -> Result<()> {
    let mut edited = metadata.clone();
    edited.model_version = format!("{}-soak-{i}", metadata.model_version);
    let mut bundle = proto.clone();
    bundle.metadata_props = edited.to_metadata_props();
    let temp = dir.join(format!(".soak-{i}.onnx.tmp"));
    let path = dir.join(format!("soak-{i:05}.onnx"));
    std::fs::write(&temp, bundle.encode_to_vec())
        .with_context(|| format!("failed to write {}", temp.display()))?;
    std::fs::rename(&temp, &path)
        .with_context(|| format!("failed to rename into {}", path.display()))?;
    if let Some(old) = previous.replace(path) {
        // The new one is the newest: removing the old changes nothing served.
        std::thread::sleep(Duration::from_secs(2));
        let _ = std::fs::remove_file(old);
    }
    Ok(())
}

pub fn soak(args: &SoakArgs) -> Result<()> {
    ensure!(args.duration >= 10.0, "--duration must be at least 10 s");
    ensure!(
        args.sample_every > 0.0 && args.sample_every * 4.0 <= args.duration,
        "--sample-every must leave at least 4 samples"
    );
    let (proto, metadata) = BundleMetadata::read_file(&args.bundle)
        .with_context(|| format!("failed to read the bundle {}", args.bundle.display()))?;
    let tcp_target = TcpTarget {
        addr: args.tcp,
        carts: Arc::new(args.requests.carts()?),
    };
    let http_target = HttpTarget::new(
        &HttpTargetArgs {
            url: format!("http://{}/v1/score", args.http),
            method: "POST".into(),
            headers: Vec::new(),
        },
        &args.requests.bodies()?,
    )?;
    let interval = Duration::from_secs_f64(args.sample_every);
    let stop = Arc::new(AtomicBool::new(false));
    let events_sent = Arc::new(AtomicU64::new(0));
    let reloads = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.duration);

    let events = {
        let (stop, sent, http, rate, scale) = (
            Arc::clone(&stop),
            Arc::clone(&events_sent),
            args.http,
            args.events_rate,
            args.time_scale,
        );
        std::thread::Builder::new()
            .name("soak-events".into())
            .spawn(move || -> Result<()> {
                let mut source = EventSource {
                    started: Instant::now(),
                    scale,
                    seq: 0,
                };
                let per_tick = ((rate / 10.0).round() as usize).max(1);
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = call(
                        http,
                        "POST",
                        "/v1/events",
                        source.batch(per_tick).as_bytes(),
                    )?;
                    ensure!(status == 200, "POST /v1/events answered {status}: {body}");
                    sent.fetch_add(per_tick as u64, Ordering::Relaxed);
                    next += Duration::from_millis(100);
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                Ok(())
            })?
    };
    let reloader = {
        let (stop, count, dir, every) = (
            Arc::clone(&stop),
            Arc::clone(&reloads),
            args.model_dir.clone(),
            Duration::from_secs_f64(args.reload_every),
        );
        std::thread::Builder::new()
            .name("soak-reload".into())
            .spawn(move || -> Result<()> {
                let mut previous = None;
                let mut next = Instant::now() + every;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        i += 1;
                        deliver(&dir, &proto, &metadata, i, &mut previous)?;
                        count.fetch_add(1, Ordering::Relaxed);
                        next += every;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Some(last) = previous {
                    let _ = std::fs::remove_file(last);
                }
                Ok(())
            })?
    };

    // The load runs in intervals, each with its own histogram: one
    // interval's p99 per sample.
    let plan = |rate: f64| LoadPlan {
        rate,
        warmup: Duration::ZERO,
        duration: Some(interval),
        connections: 1,
        pipeline: 16,
        timeout: Duration::from_secs(5),
    };
    let mut samples = Vec::new();
    let (mut tcp_requests, mut http_requests, mut failed) = (0u64, 0u64, 0u64);
    let data_file = args.store.join("data.mdb");
    let outcome = (|| -> Result<()> {
        while Instant::now() + interval <= end + Duration::from_millis(500) {
            let (tcp_plan, http_plan) = (plan(args.tcp_rate), plan(args.http_rate));
            let (tcp_result, http_result) = std::thread::scope(|scope| {
                let tcp = scope.spawn(|| load::run(&tcp_target, &tcp_plan, None, Arc::default()));
                let http =
                    scope.spawn(|| load::run(&http_target, &http_plan, None, Arc::default()));
                (tcp.join(), http.join())
            });
            let tcp_result = tcp_result.map_err(|_| anyhow::anyhow!("the TCP load panicked"))??;
            let http_result =
                http_result.map_err(|_| anyhow::anyhow!("the HTTP load panicked"))??;
            tcp_requests += tcp_result.completed();
            http_requests += http_result.completed();
            failed += tcp_result.error_count() + http_result.error_count();
            let (status, metrics) = call(args.http, "GET", "/metrics", b"")?;
            ensure!(status == 200, "GET /metrics answered {status}");
            let fds = std::fs::read_dir(format!("/proc/{}/fd", args.pid))
                .with_context(|| format!("cannot list the descriptors of process {}", args.pid))?
                .count();
            let sample = Sample {
                at_seconds: started.elapsed().as_secs_f64(),
                rss_kib: proc_status(args.pid, "VmRSS:")?,
                open_fds: fds as f64,
                threads: proc_status(args.pid, "Threads:")?,
                store_file_bytes: std::fs::metadata(&data_file)
                    .map_or(f64::NAN, |m| m.len() as f64),
                store_used_bytes: metric(&metrics, "cartscore_store_used_bytes"),
                live_sessions: metric(&metrics, "cartscore_live_sessions"),
                tcp_p99_us: Percentiles::of(&tcp_result.latency).p99_us,
                http_p99_us: Percentiles::of(&http_result.latency).p99_us,
                events_applied: events_sent.load(Ordering::Relaxed),
                reloads: reloads.load(Ordering::Relaxed),
            };
            println!(
                "{:>7.0} s  rss {:>8.0} KiB  fds {:>4.0}  threads {:>3.0}  store file {:>6.1} MiB used {:>6.1} MiB  sessions {:>7.0}  p99 tcp {:>7.0} µs http {:>7.0} µs  events {:>9}  reloads {:>3}  failed {}",
                sample.at_seconds,
                sample.rss_kib,
                sample.open_fds,
                sample.threads,
                sample.store_file_bytes / 1048576.0,
                sample.store_used_bytes / 1048576.0,
                sample.live_sessions,
                sample.tcp_p99_us,
                sample.http_p99_us,
                sample.events_applied,
                sample.reloads,
                failed
            );
            samples.push(sample);
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let events_result = events
        .join()
        .map_err(|_| anyhow::anyhow!("the event thread panicked"))?;
    let reload_result = reloader
        .join()
        .map_err(|_| anyhow::anyhow!("the reload thread panicked"))?;
    outcome?;
    events_result.context("streaming events failed")?;
    reload_result.context("delivering bundles failed")?;
    ensure!(samples.len() >= 4, "only {} samples", samples.len());

    let d = args.duration;
    let t = args.growth_tolerance;
    let trends = vec![
        trend("rss_kib", &samples, |s| s.rss_kib, t, 16_384.0, d),
        trend("open_fds", &samples, |s| s.open_fds, t, 8.0, d),
        trend("threads", &samples, |s| s.threads, t, 2.0, d),
        trend(
            "store_file_bytes",
            &samples,
            |s| s.store_file_bytes,
            t,
            16.0 * 1048576.0,
            d,
        ),
        trend(
            "store_used_bytes",
            &samples,
            |s| s.store_used_bytes,
            t,
            16.0 * 1048576.0,
            d,
        ),
        trend(
            "live_sessions",
            &samples,
            |s| s.live_sessions,
            t,
            5_000.0,
            d,
        ),
    ];
    let unbounded: Vec<&Trend> = trends.iter().filter(|t| !t.bounded).collect();
    let report = SoakReport {
        duration_seconds: started.elapsed().as_secs_f64(),
        samples,
        trends: trends.clone(),
        tcp_requests,
        http_requests,
        failed_requests: failed,
        events_sent: events_sent.load(Ordering::Relaxed),
        reloads: reloads.load(Ordering::Relaxed),
        passed: failed == 0 && unbounded.is_empty(),
    };
    println!("\nover the second half (a least-squares slope, projected over the whole run):");
    for t in &trends {
        println!(
            "  {:<17} first {:>14.0}  last {:>14.0}  slope {:>12.1}/h  projects {:>12.0} (allowed {:>10.0})  {}",
            t.resource,
            t.first,
            t.last,
            t.slope_per_hour,
            t.projected_growth,
            t.allowed_growth,
            if t.bounded { "bounded" } else { "GROWS" }
        );
    }
    println!(
        "{} TCP and {} HTTP scores, {} failed; {} events streamed; {} bundles delivered",
        report.tcp_requests,
        report.http_requests,
        report.failed_requests,
        report.events_sent,
        report.reloads
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    if !unbounded.is_empty() {
        let names: Vec<&str> = unbounded.iter().map(|t| t.resource).collect();
        bail!("still growing over the second half: {}", names.join(", "));
    }
    println!("soak passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(values: &[f64]) -> Vec<Sample> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| Sample {
                at_seconds: i as f64 * 60.0,
                rss_kib: v,
                open_fds: 10.0,
                threads: 10.0,
                store_file_bytes: 0.0,
                store_used_bytes: 0.0,
                live_sessions: 0.0,
                tcp_p99_us: 0.0,
                http_p99_us: 0.0,
                events_applied: 0,
                reloads: 0,
            })
            .collect()
    }

    #[test]
    fn a_plateau_is_bounded_and_a_leak_is_not() {
        let duration = 600.0;
        // Warms up, then flat with noise.
        let flat = samples(&[50e3, 80e3, 90e3, 91e3, 90e3, 92e3, 91e3, 90e3, 91e3, 92e3]);
        assert!(trend("rss_kib", &flat, |s| s.rss_kib, 0.1, 16_384.0, duration).bounded);
        // 20 MiB a minute, all the way.
        let leak: Vec<f64> = (0..10).map(|i| 50e3 + 20e3 * i as f64).collect();
        let leak = samples(&leak);
        let t = trend("rss_kib", &leak, |s| s.rss_kib, 0.1, 16_384.0, duration);
        assert!(!t.bounded, "{t:?}");
        assert!((t.slope_per_hour - 20e3 * 60.0).abs() < 1e-6);
        assert_eq!(slope(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]), 2.0);
    }
}
