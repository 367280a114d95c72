//! What an L7 proxy (a waypoint) knows about an HTTP request, for the L7
//! fields of AuthorizationPolicy: host, method, normalized path, headers,
//! and the authenticated end user of a validated JWT.
//!
//! Paths are normalized before any policy sees them, and the normalized
//! path is what travels upstream, so the policy and the application always
//! agree on which resource was asked for.

/// One HTTP request, as policies see it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub method: String,
    /// The `Host` header or `:authority`, lowercased.
    pub host: String,
    /// The normalized path, without the query.
    pub path: String,
    pub headers: http::HeaderMap,
    /// The end user, when a JWT was presented and validated.
    pub auth: Option<RequestAuth>,
}

/// A validated JWT's identity and claims.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestAuth {
    /// `iss/sub`, Istio's request principal.
    pub principal: String,
    pub audiences: Vec<String>,
    /// The `azp` claim.
    pub presenter: Option<String>,
    pub claims: serde_json::Value,
}

impl Request {
    /// The host without a port, for matching `hosts` written without one.
    pub fn host_without_port(&self) -> &str {
        if self.host.starts_with('[') {
            // An IPv6 literal: the port, if any, follows the `]`.
            return match self.host.find(']') {
                Some(end) => &self.host[..=end],
                None => &self.host,
            };
        }
        match self.host.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => &self.host,
        }
    }

    /// The values of a claim at `path` (nested objects), as strings: a list
    /// gives each element, and OAuth's space-delimited `scope` and `scp`
    /// give each scope (RFC 8693).
    pub fn claim(&self, path: &[String]) -> Option<Vec<String>> {
        let mut value = &self.auth.as_ref()?.claims;
        for key in path {
            value = value.get(key)?;
        }
        match value {
            serde_json::Value::String(s) if matches!(path.last().map(String::as_str), Some("scope" | "scp")) => {
                Some(s.split_whitespace().map(str::to_string).collect())
            }
            serde_json::Value::String(s) => Some(vec![s.clone()]),
            serde_json::Value::Array(items) => {
                Some(items.iter().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).collect())
            }
            serde_json::Value::Null | serde_json::Value::Object(_) => None,
            other => Some(vec![other.to_string()]),
        }
    }
}

/// Why a request path was refused (answered 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("the path has an invalid percent-encoding at byte {0}")]
    BadEscape(usize),
    #[error("the path contains an encoded NUL (%00)")]
    Nul,
    #[error("the path contains a control character or a space")]
    Control,
}

/// Normalizes a request path (the part before `?`) as Istio's BASE
/// normalization does, plus optional slash merging: percent-encodings of
/// unreserved characters are decoded and the others uppercased, `\` becomes
/// `/`, `.` and `..` segments are resolved (never above the root), and with
/// `merge_slashes` runs of `/` collapse. `%2F` stays encoded: it is data in a
/// segment, not a separator.
pub fn normalize_path(raw: &str, merge_slashes: bool) -> Result<String, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') && !path.starts_with('\\') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                // Two hex digits, nothing else (from_str_radix alone would take "+F").
                let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                let value = hex
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(PathError::BadEscape(i))?;
                if value == 0 {
                    return Err(PathError::Nul);
                }
                if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                    decoded.push(value as char);
                } else {
                    decoded.push_str(&format!("%{value:02X}"));
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            c if c.is_ascii_control() || c == b' ' => return Err(PathError::Control),
            _ => {
                // Multi-byte UTF-8 is copied as is.
                let ch = path[i..].chars().next().expect("in bounds");
                decoded.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    for (index, segment) in parts.iter().enumerate() {
        match *segment {
            "." => {
                if index == last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if index == last {
                    segments.push("");
                }
            }
            "" if merge_slashes && index != last => {}
            other => segments.push(other),
        }
    }
    Ok(format!("/{}", segments.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_normalization_cases() {
        let cases: [(&str, bool, Result<&str, PathError>); 19] = [
            ("/v1/charge", false, Ok("/v1/charge")),
            ("/v1/%63harge", false, Ok("/v1/charge")),
            ("/v1/%7Echarge%2d", false, Ok("/v1/~charge-")),
            ("/v1//charge", false, Ok("/v1//charge")),
            ("/v1//charge", true, Ok("/v1/charge")),
            ("/v1/./charge", false, Ok("/v1/charge")),
            ("/v1/x/../charge", false, Ok("/v1/charge")),
            ("/../../etc/passwd", false, Ok("/etc/passwd")),
            ("/v1/..%2fadmin", false, Ok("/v1/..%2Fadmin")),
            ("/v1/%2e%2e/admin", false, Ok("/admin")),
            ("\\v1\\charge", false, Ok("/v1/charge")),
            ("/v1/charge?x=/../admin", false, Ok("/v1/charge")),
            ("/v1/.", false, Ok("/v1/")),
            ("/v1/%00", false, Err(PathError::Nul)),
            ("/v1/%zz", false, Err(PathError::BadEscape(4))),
            ("/v1/%4", false, Err(PathError::BadEscape(4))),
            ("/v1/%+F", false, Err(PathError::BadEscape(4))),
            ("/v1/%-1", false, Err(PathError::BadEscape(4))),
            ("v1/charge", false, Err(PathError::NotAbsolute)),
        ];
        for (raw, merge, want) in cases {
            assert_eq!(normalize_path(raw, merge), want.map(str::to_string), "{raw} merge={merge}");
        }
    }

    #[test]
    fn hosts_and_claims() {
        let mut request = Request { host: "api.example:8443".into(), ..Default::default() };
        assert_eq!(request.host_without_port(), "api.example");
        request.host = "[::1]:80".into();
        assert_eq!(request.host_without_port(), "[::1]");
        request.auth = Some(RequestAuth {
            claims: serde_json::json!({"scope": "payments:charge read", "groups": ["a", "b"], "org": {"team": "pay"}, "n": 3}),
            ..Default::default()
        });
        let claim = |path: &[&str]| request.claim(&path.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(claim(&["groups"]), Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(claim(&["scope"]), Some(vec!["payments:charge".to_string(), "read".to_string()]));
        assert_eq!(claim(&["org", "team"]), Some(vec!["pay".to_string()]));
        assert_eq!(claim(&["n"]), Some(vec!["3".to_string()]));
        assert_eq!(claim(&["org"]), None);
        assert_eq!(claim(&["missing"]), None);
    }
}
