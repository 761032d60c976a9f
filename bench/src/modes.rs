//! The latency modes: `tcp`, `http`, `sweep` and `reload`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cartscore_core::bundle::BundleMetadata;
use clap::{Args, Subcommand};
use prost::Message;
use serde_json::json;

use crate::http::{HttpTarget, HttpTargetArgs};
use crate::load::{self, LoadArgs, LoadPlan, Observer, Reply, Target};
use crate::report::{self, Summary};
use crate::requests::RequestArgs;
use crate::tcp::{TcpTarget, TcpTargetArgs};

#[derive(Debug, Args)]
pub struct TcpArgs {
    #[command(flatten)]
    pub target: TcpTargetArgs,
    #[command(flatten)]
    pub requests: RequestArgs,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct HttpArgs {
    #[command(flatten)]
    pub target: HttpTargetArgs,
    #[command(flatten)]
    pub requests: RequestArgs,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Subcommand)]
pub enum SweepTarget {
    /// The binary protocol.
    Tcp(TcpTargetArgs),
    /// An HTTP endpoint.
    Http(HttpTargetArgs),
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The p99 bound a rate must meet, in microseconds (from schedule).
    #[arg(long)]
    pub p99_us: f64,
    /// The highest rate tried.
    #[arg(long, default_value_t = 1_000_000.0)]
    pub max_rate: f64,
    /// Each passing rate is multiplied by this for the next step.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Bisection steps between the last passing and the first failing rate.
    #[arg(long, default_value_t = 3)]
    pub refine: u32,
    /// `--rate` is the first rate tried.
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub requests: RequestArgs,
    #[command(subcommand)]
    pub target: SweepTarget,
}

fn tcp_target(target: &TcpTargetArgs, requests: &RequestArgs) -> Result<TcpTarget> {
    Ok(TcpTarget {
        addr: target.addr,
        carts: Arc::new(requests.carts()?),
    })
}

/// One run at the plan's rate, summarised.
fn measure(
    mode: &str,
    target: &dyn Target,
    plan: &LoadPlan,
) -> Result<(Summary, load::LoadResult)> {
    let result = load::run(target, plan, None, Arc::default())?;
    Ok((Summary::new(mode, target.describe(), plan, &result), result))
}

fn single(mode: &str, target: &dyn Target, load: &LoadArgs) -> Result<()> {
    let plan = load.plan()?;
    let (summary, result) = measure(mode, target, &plan)?;
    let label = format!("{mode} {:.0}/s", plan.rate);
    report::emit(
        &load.output,
        &summary.table(),
        &summary,
        &[(label, &result.latency)],
    )
}

pub fn tcp(args: &TcpArgs) -> Result<()> {
    single(
        "tcp",
        &tcp_target(&args.target, &args.requests)?,
        &args.load,
    )
}

pub fn http(args: &HttpArgs) -> Result<()> {
    single(
        "http",
        &HttpTarget::new(&args.target, &args.requests.bodies()?)?,
        &args.load,
    )
}

/// A rate passes when it was delivered, nothing failed and p99 is in bound.
fn passes(summary: &Summary, bound_us: f64) -> bool {
    summary.errors == 0
        && summary.achieved_rate >= 0.98 * summary.asked_rate
        && summary.latency.p99_us <= bound_us
}

pub fn sweep(args: &SweepArgs) -> Result<()> {
    ensure!(
        args.factor > 1.0,
        "--factor must be above 1, got {}",
        args.factor
    );
    ensure!(args.p99_us > 0.0, "--p99-us must be positive");
    let (target, mode): (Box<dyn Target>, &str) = match &args.target {
        SweepTarget::Tcp(tcp) => (Box::new(tcp_target(tcp, &args.requests)?), "tcp"),
        SweepTarget::Http(http) => (
            Box::new(HttpTarget::new(http, &args.requests.bodies()?)?),
            "http",
        ),
    };
    let base = args.load.plan()?;
    let mut steps: Vec<(Summary, load::LoadResult)> = Vec::new();
    let mut run_at = |rate: f64| -> Result<bool> {
        let plan = LoadPlan {
            rate,
            ..base.clone()
        };
        let (summary, result) = measure(mode, target.as_ref(), &plan)?;
        let ok = passes(&summary, args.p99_us);
        println!(
            "{:>10.0}/s asked  {:>10.0}/s achieved  p50 {:>9.1} µs  p99 {:>9.1} µs  p99.9 {:>9.1} µs  errors {:>5}  {}",
            rate,
            summary.achieved_rate,
            summary.latency.p50_us,
            summary.latency.p99_us,
            summary.latency.p999_us,
            summary.errors,
            if ok { "pass" } else { "FAIL" }
        );
        steps.push((summary, result));
        // Let queues from an overloaded step drain before the next one.
        std::thread::sleep(Duration::from_secs(1));
        Ok(ok)
    };
    let mut best: Option<f64> = None;
    let mut failed: Option<f64> = None;
    let mut rate = base.rate;
    while rate <= args.max_rate {
        if run_at(rate)? {
            best = Some(rate);
            rate *= args.factor;
        } else {
            failed = Some(rate);
            break;
        }
    }
    if let (Some(mut low), Some(mut high)) = (best, failed) {
        for _ in 0..args.refine {
            let mid = ((low + high) / 2.0).round();
            if run_at(mid)? {
                low = mid;
                best = Some(mid);
            } else {
                high = mid;
            }
        }
    }
    let verdict = match best {
        Some(rate) => format!(
            "highest rate with p99 <= {} µs, no errors and >= 98% delivered: {rate:.0}/s\n",
            args.p99_us
        ),
        None => format!(
            "no rate met p99 <= {} µs (first: {:.0}/s)\n",
            args.p99_us, base.rate
        ),
    };
    steps.sort_by(|a, b| a.0.asked_rate.total_cmp(&b.0.asked_rate));
    let curves: Vec<(String, &hdrhistogram::Histogram<u64>)> = steps
        .iter()
        .map(|(s, r)| (format!("{:.0}/s", s.asked_rate), &r.latency))
        .collect();
    let summaries: Vec<&Summary> = steps.iter().map(|(s, _)| s).collect();
    report::emit(
        &args.load.output,
        &verdict,
        &json!({"p99_bound_us": args.p99_us, "max_passing_rate": best, "steps": summaries}),
        &curves,
    )
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub target: TcpTargetArgs,
    /// The appliance's model folder (the bench writes bundles into it).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// The bundle to deliver; each copy gets a new model version.
    #[arg(long, default_value = "models/demo/model.onnx")]
    pub bundle: PathBuf,
    /// Deliveries.
    #[arg(long, default_value_t = 20)]
    pub reloads: u32,
    /// Pause after a new version serves, before the next delivery.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// A version not serving after this long fails the run.
    #[arg(long, default_value_t = 30_000)]
    pub swap_timeout_ms: u64,
    /// Delete the delivered bundles afterwards (the appliance then falls
    /// back to the newest remaining bundle).
    #[arg(long)]
    pub remove_after: bool,
    #[command(flatten)]
    pub requests: RequestArgs,
    /// `--duration` is ignored: the load runs until the last swap.
    #[command(flatten)]
    pub load: LoadArgs,
}

pub fn reload(args: &ReloadArgs) -> Result<()> {
    ensure!(args.reloads > 0, "--reloads must be positive");
    let (proto, metadata) = BundleMetadata::read_file(&args.bundle)
        .with_context(|| format!("failed to read the bundle {}", args.bundle.display()))?;
    let target = tcp_target(&args.target, &args.requests)?;
    let plan = LoadPlan {
        duration: None,
        ..args.load.plan()?
    };
    // Every reply passes here: a shared read lock, and the write lock only
    // for the first reply of each version.
    let first_seen: Arc<RwLock<HashMap<String, Instant>>> = Arc::default();
    let observer: Observer = {
        let first_seen = Arc::clone(&first_seen);
        Arc::new(move |reply: &Reply, at: Instant| {
            if let Reply::Ok {
                version: Some(version),
            } = reply
                && first_seen
                    .read()
                    .is_ok_and(|seen| !seen.contains_key(version))
                && let Ok(mut seen) = first_seen.write()
            {
                seen.entry(version.clone()).or_insert(at);
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, plan) = (Arc::clone(&stop), plan.clone());
        std::thread::Builder::new()
            .name("reload-load".into())
            .spawn(move || load::run(&target, &plan, Some(observer), stop))
            .context("failed to start the load")?
    };
    std::thread::sleep(Duration::from_secs_f64(args.load.warmup) + Duration::from_millis(200));
    let run = load::run_id();
    let mut swaps = Vec::new();
    let mut delivered = Vec::new();
    let mut failure = None;
    for i in 1..=args.reloads {
        let version = format!("{}-reload-{run}-{i}", metadata.model_version);
        let mut edited = metadata.clone();
        edited.model_version = version.clone();
        let mut bundle = proto.clone();
        bundle.metadata_props = edited.to_metadata_props();
        let temp = args.model_dir.join(format!(".bench-{run}-{i}.onnx.tmp"));
        let path = args.model_dir.join(format!("bench-{run}-{i:02}.onnx"));
        std::fs::write(&temp, bundle.encode_to_vec())
            .with_context(|| format!("failed to write {}", temp.display()))?;
        let at = Instant::now();
        std::fs::rename(&temp, &path)
            .with_context(|| format!("failed to rename into {}", path.display()))?;
        delivered.push(path);
        let deadline = at + Duration::from_millis(args.swap_timeout_ms);
        let serving = loop {
            if let Some(seen) = first_seen
                .read()
                .ok()
                .and_then(|s| s.get(&version).copied())
            {
                break Some(seen);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        match serving {
            Some(seen) => {
                let ms = seen.saturating_duration_since(at).as_secs_f64() * 1e3;
                println!("reload {i:>3}: version {version} serving after {ms:.1} ms");
                swaps.push(ms);
            }
            None => {
                failure = Some(format!(
                    "version {version} was not serving after {} ms",
                    args.swap_timeout_ms
                ));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    stop.store(true, Ordering::Relaxed);
    let result = load
        .join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    if args.remove_after {
        for path in &delivered {
            let _ = std::fs::remove_file(path);
        }
    }
    let mut sorted = swaps.clone();
    sorted.sort_by(f64::total_cmp);
    let mut summary = Summary::new(
        "reload",
        format!("tcp://{}", args.target.addr),
        &plan,
        &result,
    );
    summary.extra = json!({
        "reloads": args.reloads,
        "swapped": swaps.len(),
        "failed_requests": result.error_count(),
        "swap_ms": swaps,
        "swap_ms_max": sorted.last(),
        "swap_ms_median": sorted.get(sorted.len() / 2),
    });
    let table = format!(
        "{}reloads {}/{} swapped; time to serve: median {:.1} ms, max {:.1} ms; failed requests {}\n",
        summary.table(),
        swaps.len(),
        args.reloads,
        sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        sorted.last().copied().unwrap_or(f64::NAN),
        result.error_count()
    );
    report::emit(
        &args.load.output,
        &table,
        &summary,
        &[("during reloads".into(), &result.latency)],
    )?;
    if let Some(failure) = failure {
        anyhow::bail!(failure);
    }
    ensure!(
        result.error_count() == 0,
        "{} requests failed during the reloads",
        result.error_count()
    );
    Ok(())
}
