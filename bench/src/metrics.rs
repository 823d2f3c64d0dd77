//! Reads a server's Prometheus endpoint (uturn's `--http ADDR`, `/metrics`) for the soak and
//! for operators: one plain HTTP/1.1 GET, the text format parsed into samples, sums over
//! label filters, and a bounded poll until a sum reaches a value (allocations drained).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thiserror::Error;

/// One sample of the text format: `name{label="value",...} number`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// Failures reading the endpoint.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Connecting, sending or reading failed.
    #[error("GET http://{addr}{path}: {source}")]
    Io {
        /// The HTTP endpoint.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The answer was not a 200 with a body.
    #[error("GET http://{addr}{path}: {what}")]
    Http {
        /// The HTTP endpoint.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// What was wrong.
        what: String,
    },
    /// The sum did not reach the value before the deadline.
    #[error("{name} is {last} after {waited:?}, expected {want}")]
    Timeout {
        /// The metric.
        name: String,
        /// Its last sum.
        last: f64,
        /// The value waited for.
        want: f64,
        /// How long it waited.
        waited: Duration,
    },
}

/// Largest answer read: uturn's page is a few kilobytes, a per-allocation page a few megabytes.
const BODY_MAX: u64 = 64 << 20;
/// Pause between two reads while polling.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// The body of `GET path` on `addr`, within `timeout` for each of connect and read.
pub fn fetch(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, MetricsError> {
    let io = |source| MetricsError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut response = Vec::new();
    stream
        .take(BODY_MAX)
        .read_to_end(&mut response)
        .map_err(io)?;
    let http = |what: String| MetricsError::Http {
        addr,
        path: path.to_owned(),
        what,
    };
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| http("no end of headers in the answer".to_owned()))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(http(format!(
            "status {status:?}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_owned())
}

/// The samples of a text-format page; comments, blank and unparsable lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (&line[..=close], &line[close + 1..])
        }
        None => line.split_at(line.find(char::is_whitespace)?),
    };
    // A timestamp may follow the value; only the value counts.
    let value = parse_value(rest.split_whitespace().next()?)?;
    let (name, labels) = match series.split_once('{') {
        Some((name, inner)) => (name, parse_labels(inner.strip_suffix('}')?)?),
        None => (series, Vec::new()),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// `a="x",b="y"` (escapes `\"`, `\\`, `\n` inside values).
fn parse_labels(inner: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim();
    }
    Some(labels)
}

/// Sum of every sample named `name` that carries all of `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
        .sum()
}

/// Polls `GET path` until the sum of `name` over `labels` equals `want`, at most `timeout`;
/// returns how long that took. A failed read counts as not there yet until the deadline.
pub fn wait_for(
    addr: SocketAddr,
    path: &str,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    timeout: Duration,
) -> Result<Duration, MetricsError> {
    let start = Instant::now();
    let deadline = crate::instant_after(start, timeout);
    let mut last = f64::NAN;
    loop {
        let read_timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(POLL_EVERY);
        if let Ok(body) = fetch(addr, path, read_timeout) {
            last = sum(&parse(&body), name, labels);
            if last == want {
                return Ok(start.elapsed());
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(MetricsError::Timeout {
                name: name.to_owned(),
                last,
                want,
                waited: now - start,
            });
        }
        std::thread::sleep(POLL_EVERY.min(deadline - now));
    }
}

/// One sample as a line of the text format (labels in their order), as `metrics` prints it.
pub fn render(sample: &Sample) -> String {
    if sample.labels.is_empty() {
        return format!("{} {}", sample.name, sample.value);
    }
    let labels: Vec<String> = sample
        .labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    format!("{}{{{}}} {}", sample.name, labels.join(","), sample.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const PAGE: &str = "# HELP uturn_allocations Allocations.\n\
        # TYPE uturn_allocations gauge\n\
        uturn_allocations 3\n\
        uturn_dropped_packets_total{reason=\"malformed\"} 2\n\
        uturn_dropped_packets_total{reason=\"no_allocation\"} 40\n\
        uturn_requests_total{method=\"allocate\",code=\"401\"} 7 1700000000000\n\
        uturn_requests_total{method=\"refresh\",code=\"401\"} 1\n\
        uturn_requests_total{method=\"allocate\",code=\"200\"} 5\n\
        odd{path=\"a\\\"b,c\"} 1.5e3\n\
        \n\
        not a sample\n";

    #[test]
    fn the_text_format_parses_into_samples() {
        let s = parse(PAGE);
        assert_eq!(s.len(), 7);
        assert_eq!(
            s[0],
            Sample {
                name: "uturn_allocations".into(),
                labels: vec![],
                value: 3.0
            }
        );
        assert_eq!(
            s[3].labels,
            vec![
                ("method".to_owned(), "allocate".to_owned()),
                ("code".to_owned(), "401".to_owned())
            ]
        );
        assert_eq!(s[3].value, 7.0, "the timestamp is not the value");
        assert_eq!(s[6].labels, vec![("path".to_owned(), "a\"b,c".to_owned())]);
        assert_eq!(s[6].value, 1500.0);
    }

    #[test]
    fn sums_filter_on_every_label_given() {
        let s = parse(PAGE);
        assert_eq!(sum(&s, "uturn_requests_total", &[("code", "401")]), 8.0);
        assert_eq!(
            sum(
                &s,
                "uturn_requests_total",
                &[("code", "401"), ("method", "refresh")]
            ),
            1.0
        );
        assert_eq!(sum(&s, "uturn_requests_total", &[]), 13.0);
        assert_eq!(sum(&s, "uturn_allocations", &[]), 3.0);
        assert_eq!(sum(&s, "missing", &[]), 0.0);
    }

    #[test]
    fn a_rendered_sample_parses_back_to_itself() {
        for sample in parse(PAGE) {
            assert_eq!(parse_line(&render(&sample)), Some(sample));
        }
    }

    /// Answers each connection with the next canned response, then stops.
    fn serve(responses: Vec<String>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for response in responses {
                let Ok((mut conn, _)) = listener.accept() else {
                    return;
                };
                let mut request = [0u8; 1024];
                let _ = conn.read(&mut request);
                let _ = conn.write_all(response.as_bytes());
            }
        });
        addr
    }

    fn ok(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn fetch_returns_the_body_and_names_a_bad_status() {
        let addr = serve(vec![
            ok("uturn_allocations 1\n"),
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
        ]);
        let t = Duration::from_secs(3);
        assert_eq!(fetch(addr, "/metrics", t).unwrap(), "uturn_allocations 1\n");
        let err = fetch(addr, "/metrics", t).unwrap_err().to_string();
        assert!(err.contains("404"), "{err}");
    }

    #[test]
    fn wait_for_polls_until_the_value_and_times_out_otherwise() {
        let addr = serve(vec![
            ok("uturn_allocations 2\n"),
            ok("uturn_allocations 1\n"),
            ok("uturn_allocations 0\n"),
        ]);
        let t = Duration::from_secs(10);
        assert!(wait_for(addr, "/metrics", "uturn_allocations", &[], 0.0, t).is_ok());
        let addr = serve(vec![ok("uturn_allocations 2\n")]);
        let err = wait_for(
            addr,
            "/metrics",
            "uturn_allocations",
            &[],
            0.0,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            matches!(err, MetricsError::Timeout { last, .. } if last == 2.0),
            "{err}"
        );
    }
}
