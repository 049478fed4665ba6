//! wrk's summary, parsed.

use anyhow::{Context, Result, bail};

pub const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Default, PartialEq)]
pub struct Wrk {
    pub requests_per_sec: f64,
    pub bytes_per_sec: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

impl Wrk {
    /// Non-2xx/3xx answers plus socket errors.
    pub fn errors(&self) -> u64 {
        self.non_2xx + self.socket_errors
    }
}

pub fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut r = Wrk::default();
    let mut have_rate = false;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.requests_per_sec = v.trim().parse().context("Requests/sec")?;
            have_rate = true;
        } else if let Some(v) = line.strip_prefix("Transfer/sec:") {
            r.bytes_per_sec = parse_size(v.trim()).context("Transfer/sec")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("Non-2xx or 3xx responses")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        }
    }
    if !have_rate {
        bail!("no Requests/sec line in wrk's output");
    }
    Ok(r)
}

/// wrk's sizes: `827.00B`, `1.54KB`, `117.19MB`, `1.02GB` (powers of 1024).
fn parse_size(s: &str) -> Result<f64> {
    let s = s.strip_suffix('B').unwrap_or(s);
    let (num, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1024.0),
        Some('M') => (&s[..s.len() - 1], MIB),
        Some('G') => (&s[..s.len() - 1], MIB * 1024.0),
        Some('T') => (&s[..s.len() - 1], MIB * MIB),
        _ => (s, 1.0),
    };
    Ok(num.parse::<f64>().with_context(|| format!("size `{s}`"))? * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://10.200.201.2:8080/small
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   150.21us  300.00us  10.00ms   95.00%
    Req/Sec    50.12k     2.00k   55.00k    70.00%
  997123 requests in 10.00s, 1.40GB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  99712.30
Transfer/sec:    143.36MB
";

    #[test]
    fn wrk_output() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests_per_sec, 99712.30);
        assert!((r.bytes_per_sec - 143.36 * MIB).abs() < 1.0);
        assert_eq!(r.non_2xx, 7);
        assert_eq!(r.socket_errors, 15);
        assert_eq!(r.errors(), 22);
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("827.00B").unwrap(), 827.0);
        assert_eq!(parse_size("2.00KB").unwrap(), 2048.0);
        assert!(parse_size("lots").is_err());
    }
}
