//! The load generators: wrk (HTTP/1.1, cleartext or TLS) and h2load (HTTP/2 over TLS), each
//! run for a fixed time and parsed into one [`Sample`].

use std::{
    net::SocketAddrV4,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::procs::Proc;

/// Prints one machine-readable line when wrk is done.
pub const WRK_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_WRK %f %f %f %f %f %f\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"#;

/// Which client drives a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// wrk, HTTP/1.1 keep-alive; `tls`: over TLS (https).
    Wrk { tls: bool },
    /// h2load, HTTP/2 over TLS (ALPN h2), one stream in flight per connection.
    H2load,
}

/// How one row is driven.
#[derive(Clone, Debug)]
pub struct Load {
    pub client: Client,
    pub addr: SocketAddrV4,
    /// Sent as `Cookie:` on every request.
    pub cookie: Option<String>,
    pub connections: u32,
    pub threads: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Socket errors and timeouts.
    pub errors: f64,
    /// Responses other than 2xx/3xx.
    pub bad_status: f64,
    pub requests: f64,
    /// CPU time (user + system) the proxy process used per request; NaN: no proxy.
    pub proxy_cpu_us: f64,
}

/// Runs `load` for `secs` seconds. `scratch` holds wrk's script and the output files.
pub fn run(load: &Load, scratch: &Path, secs: u64) -> Result<Sample, String> {
    match load.client {
        Client::Wrk { tls } => wrk(load, tls, scratch, secs),
        Client::H2load => h2load(load, scratch, secs),
    }
}

/// Runs `cmd` (stdout to `out_path`) for at most `secs` + 30 s; returns its output.
fn run_to_file(
    name: &str,
    cmd: &mut Command,
    out_path: &Path,
    secs: u64,
) -> Result<String, String> {
    let out = std::fs::File::create(out_path).map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::inherit());
    let mut p = Proc::spawn(name, cmd)?;
    p.wait_for(Duration::from_secs(secs + 30))?;
    let status = p.exited().unwrap_or_default();
    let text = std::fs::read_to_string(out_path).unwrap_or_default();
    let _ = std::fs::remove_file(out_path);
    if text.is_empty() {
        return Err(format!("{name} ({status}) printed nothing"));
    }
    Ok(text)
}

fn wrk(load: &Load, tls: bool, scratch: &Path, secs: u64) -> Result<Sample, String> {
    let script = scratch.join("report.lua");
    if !script.is_file() {
        std::fs::write(&script, WRK_LUA).map_err(|e| format!("writing the wrk script: {e}"))?;
    }
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", &load.threads.to_string()])
        .args(["-c", &load.connections.to_string()])
        .args(["-d", &format!("{secs}s")])
        .args(["--timeout", "5s", "-s"])
        .arg(&script);
    if let Some(c) = &load.cookie {
        cmd.args(["-H", &format!("Cookie: {c}")]);
    }
    let scheme = if tls { "https" } else { "http" };
    cmd.arg(format!("{scheme}://{}/", load.addr));
    let text = run_to_file("wrk", &mut cmd, &scratch.join("wrk.out"), secs)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_WRK "))
        .ok_or_else(|| format!("wrk printed no summary:\n{text}"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect();
    if v.len() != 6 || v[1] <= 0.0 {
        return Err(format!("wrk: bad summary {line:?}"));
    }
    Ok(Sample {
        rps: v[0] / (v[1] / 1e6),
        p50_us: v[2],
        p99_us: v[3],
        errors: v[4],
        bad_status: v[5],
        requests: v[0],
        proxy_cpu_us: f64::NAN,
    })
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The number before `what` in h2load's `a total, b started, c done, ...` lines.
fn count_before(line: &str, what: &str) -> Option<f64> {
    line.split(',').map(str::trim).find_map(|part| {
        part.strip_suffix(what)?
            .trim()
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    })
}

fn h2load(load: &Load, scratch: &Path, secs: u64) -> Result<Sample, String> {
    // Per-request log (start µs, status, duration µs): h2load prints no percentiles.
    let log = scratch.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new("h2load");
    cmd.args(["-c", &load.connections.to_string()])
        .args(["-t", &load.threads.to_string()])
        .args(["-m", "1", "-D", &secs.to_string()])
        .arg(format!("--log-file={}", log.display()));
    if let Some(c) = &load.cookie {
        cmd.args(["-H", &format!("cookie: {c}")]);
    }
    cmd.arg(format!("https://{}/", load.addr));
    let text = run_to_file("h2load", &mut cmd, &scratch.join("h2load.out"), secs)?;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    // "finished in 5.00s, 12345.67 req/s, 1.23MB/s"
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|f| f.trim().strip_suffix(" req/s")?.parse::<f64>().ok())
        .ok_or_else(|| format!("h2load printed no rate:\n{text}"))?;
    // "requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, 0 errored, 0 timeout"
    let req_line = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .ok_or_else(|| format!("h2load printed no request counts:\n{text}"))?;
    let succeeded = count_before(req_line, "succeeded").unwrap_or(f64::NAN);
    let errors = count_before(req_line, "errored").unwrap_or(0.0)
        + count_before(req_line, "timeout").unwrap_or(0.0);
    let failed = count_before(req_line, "failed").unwrap_or(0.0);
    let mut durations: Vec<f64> = log_text
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    durations.sort_by(f64::total_cmp);
    Ok(Sample {
        rps,
        p50_us: quantile(&durations, 0.50),
        p99_us: quantile(&durations, 0.99),
        errors,
        // h2load counts a non-2xx/3xx response as failed (errors are counted apart).
        bad_status: (failed - errors).max(0.0),
        requests: succeeded,
        proxy_cpu_us: f64::NAN,
    })
}
