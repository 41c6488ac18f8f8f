//! What the HTTP clients share: one client builder, and reading the "not before" time out of an answer.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use super::ProviderError;

/// A reqwest client with the project's user agent and the given request timeout.
pub(crate) fn client(
    provider: &'static str,
    timeout: Duration,
) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .user_agent(concat!("upload-pipeline/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            ProviderError::permanent(provider, format!("cannot build the HTTP client: {e}"))
        })
}

/// Classifies a failed send or body read: all of them (timeouts, refused or reset connections) are transient.
pub(crate) fn send_error(provider: &'static str, url: &str, e: &reqwest::Error) -> ProviderError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    // The URL is logged without its query string (Azure keys never go there, but api-version noise does).
    let url = url.split('?').next().unwrap_or(url);
    ProviderError::transient(provider, format!("request to {url} {what}: {e}"))
}

/// A 429: retry at the time the answer names, if any.
pub(crate) fn rate_limited(
    provider: &'static str,
    headers: &HeaderMap,
    message: String,
) -> ProviderError {
    ProviderError::RateLimited {
        provider,
        retry_after: retry_after(headers, &message),
        message,
    }
}

/// When the provider wants to hear from us again: `retry-after-ms`, `retry-after` in seconds or as an HTTP
/// date, the rate-limit reset headers (Go durations such as `1s`, `6m0s`, `12ms`), or "try again in 2.5s" /
/// "retry after 55 seconds" in the message. Garbage and absurd values are ignored. At most one hour.
pub fn retry_after(headers: &HeaderMap, message: &str) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let cap = |d: Duration| (!d.is_zero() && d <= Duration::from_secs(3600)).then_some(d);
    if let Some(ms) = header("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms > 0.0)
    {
        return cap(Duration::from_secs_f64(ms / 1000.0));
    }
    if let Some(v) = header("retry-after") {
        match v.parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => return cap(Duration::from_secs_f64(s)),
            Ok(_) => {}
            Err(_) => {
                if let Ok(at) = httpdate::parse_http_date(v) {
                    return at
                        .duration_since(SystemTime::now())
                        .ok()
                        .and_then(cap)
                        .or(Some(Duration::from_secs(1)));
                }
            }
        }
    }
    let resets = ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .into_iter()
        .filter_map(|h| header(h).and_then(go_duration))
        .filter_map(cap)
        .max();
    if resets.is_some() {
        return resets;
    }
    from_message(message).and_then(cap)
}

/// `1s`, `6m0s`, `12ms`, `1h2m3.5s`, `250us`.
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..u] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[u..];
    }
    total.is_finite().then(|| Duration::from_secs_f64(total))
}

/// "Please try again in 2.812s", "try again in 120ms", "retry after 55 seconds".
fn from_message(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    let (at, len) = ["try again in ", "retry after "]
        .iter()
        .find_map(|p| lower.find(p).map(|i| (i, p.len())))?;
    let rest = &lower[at + len..];
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let value: f64 = num.parse().ok()?;
    let unit = rest[num.len()..].trim_start();
    Some(if unit.starts_with("ms") {
        Duration::from_secs_f64(value / 1000.0)
    } else if unit.starts_with('m') && !unit.starts_with("ms") && unit.starts_with("min") {
        Duration::from_secs_f64(value * 60.0)
    } else {
        Duration::from_secs_f64(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_after_reads_every_form_and_ignores_garbage() {
        let none = HeaderMap::new();
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500")]), ""),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), ""),
            Some(Duration::from_secs(7))
        );
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let d = retry_after(&headers(&[("retry-after", &soon)]), "").unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(
            retry_after(
                &headers(&[
                    ("x-ratelimit-reset-requests", "6m0s"),
                    ("x-ratelimit-reset-tokens", "12ms")
                ]),
                ""
            ),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset-tokens", "1.5s")]), ""),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&none, "Please try again in 2.812s."),
            Some(Duration::from_millis(2812))
        );
        assert_eq!(
            retry_after(&none, "try again in 120ms"),
            Some(Duration::from_millis(120))
        );
        assert_eq!(
            retry_after(
                &none,
                "Requests to the Embeddings_Create Operation have exceeded call rate limit. Please retry after 55 seconds."
            ),
            Some(Duration::from_secs(55))
        );
        assert_eq!(
            retry_after(
                &headers(&[
                    ("retry-after", "soon"),
                    ("x-ratelimit-reset-requests", "-1"),
                    ("retry-after-ms", "NaN")
                ]),
                "no hint"
            ),
            None
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "999999")]), ""),
            None
        );
        assert_eq!(retry_after(&none, ""), None);
        // A zero or negative Retry-After says nothing; the reset headers or the message still may.
        let d = retry_after(
            &headers(&[("retry-after", "0"), ("x-ratelimit-reset-tokens", "250us")]),
            "",
        );
        assert!(
            d.is_some_and(|d| (249..=250).contains(&d.as_micros())),
            "{d:?}"
        );
        assert_eq!(
            retry_after(
                &headers(&[
                    ("x-ratelimit-reset-requests", " "),
                    ("x-ratelimit-reset-tokens", "5 fortnights")
                ]),
                "Please retry after 2 minutes."
            ),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        let ns = go_duration("1500ns").unwrap().as_nanos();
        assert!((1499..=1500).contains(&ns), "{ns}");
        assert_eq!(go_duration("3d"), None);
    }
}
