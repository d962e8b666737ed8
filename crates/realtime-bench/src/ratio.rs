//! `ratio`: one figure of our JSON report divided by the same figure of a peer's, measured in
//! the same run (these machines are noisy, so only same-run ratios mean much).

use serde_json::Value;

use super::args::Args;
use super::stats::round2;

fn figure(path: &str, key: &str) -> Result<f64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    // `latency.p99_us` walks into nested objects.
    key.split('.')
        .try_fold(&json, |v, k| v.get(k))
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("{path}: no number at {key}"))
}

pub fn run(args: &Args) -> Result<(), String> {
    let name = args.string("name", "ratio");
    let ours = args.opt("ours").ok_or("--ours FILE")?;
    let peer = args.opt("peer").ok_or("--peer FILE")?;
    let key = args.opt("key").ok_or("--key NAME")?;
    let peer_key = args.opt("peer-key").unwrap_or_else(|| key.clone());
    args.finish()?;
    let (a, b) = (figure(&ours, &key)?, figure(&peer, &peer_key)?);
    let ratio = if b != 0.0 { round2(a / b) } else { f64::NAN };
    println!("{name}: {key} ours {a} / peer {b} = {ratio}");
    Ok(())
}
