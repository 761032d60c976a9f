//! The human-readable twin of report.json.

use std::fmt::Write;

use serde_json::Value;

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.4}"),
        _ => "n/a".into(),
    }
}

pub fn text(report: &Value) -> String {
    let mut out = String::new();
    let r = report;
    let _ = writeln!(out, "cartscore training report");
    let _ = writeln!(
        out,
        "model version      {}",
        r["model_version"].as_str().unwrap_or("")
    );
    let _ = writeln!(out, "contract version   {}", r["contract_version"]);
    let _ = writeln!(
        out,
        "data fingerprint   {}",
        r["data_fingerprint"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        out,
        "input              {} rows, {} valid, {} invalid {}",
        r["input"]["rows"],
        r["input"]["valid"],
        r["input"]["invalid"],
        r["input"]["invalid_by_reason"]
    );
    let _ = writeln!(
        out,
        "replay             {} events, {} cart examples",
        r["replay"]["events"], r["replay"]["cart_examples"]
    );
    let _ = writeln!(out, "\nwindows (by time)");
    for name in ["train", "validation", "test"] {
        let w = &r["windows"][name];
        let _ = writeln!(
            out,
            "  {name:<11} {:>8} rows {:>7} positive   {} .. {}",
            w["rows"],
            w["positives"],
            w["from"].as_str().unwrap_or(""),
            w["to"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        out,
        "\ntest window          ROC-AUC  PR-AUC  log-loss  Brier"
    );
    let mut line = |name: &str, s: &Value| {
        let _ = writeln!(
            out,
            "  {name:<18} {:>7}  {:>6}  {:>8}  {:>6}",
            num(&s["roc_auc"]),
            num(&s["pr_auc"]),
            num(&s["log_loss"]),
            num(&s["brier"])
        );
    };
    line("model", &r["test"]);
    line("original stack", &r["baselines"]["original_stack"]);
    line("base rate", &r["baselines"]["base_rate"]);
    if !r["oracle"].is_null() {
        line("oracle", &r["oracle"]);
        let _ = writeln!(
            out,
            "  model AUC / oracle AUC = {}",
            num(&r["auc_vs_oracle"])
        );
    }
    let _ = writeln!(out, "\ncalibration (test)   predicted  observed   count");
    for bin in r["test"]["calibration"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  [{:.1}, {:.1})        {:>8}  {:>8}  {:>6}",
            bin["lower"].as_f64().unwrap_or(0.0),
            bin["upper"].as_f64().unwrap_or(0.0),
            num(&bin["mean_predicted"]),
            num(&bin["observed_rate"]),
            bin["count"]
        );
    }
    let t = &r["tuning"];
    let _ = writeln!(
        out,
        "\ntuning             {} random trials in {:.1} s; best #{} validation AUC {} with {} trees",
        t["trials"].as_array().map_or(0, |a| a.len()),
        t["seconds"].as_f64().unwrap_or(0.0),
        t["best"]["index"],
        num(&t["best"]["validation_auc"]),
        t["best"]["iterations"]
    );
    let _ = writeln!(out, "best params        {}", t["best"]["params"]);
    let p = &r["parity"];
    let _ = writeln!(
        out,
        "tract parity       {} rows ({} on split edges), max |diff| {:e}",
        p["rows"],
        p["edge_rows"],
        p["max_abs_diff"].as_f64().unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        out,
        "total time         {:.1} s",
        r["timings"]["total_seconds"].as_f64().unwrap_or(0.0)
    );
    out
}
