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
    /// The issuer's rule lets the token go upstream (`forwardOriginalToken`).
    pub forward_token: bool,
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
    #[error(
        "the path contains `{0}`, which applications decode or strip differently; refused (the waypoint's --path-escapes normalize decodes it instead)"
    )]
    Ambiguous(&'static str),
}

/// Why a request's host was refused (answered 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the request has {0} Host headers; a request names one host")]
    Repeated(usize),
    #[error("the Host header `{host}` and the :authority `{authority}` name different hosts")]
    Conflict { host: String, authority: String },
    #[error("the Host header is not visible ASCII")]
    NotText,
}

/// The one host a request names, as policies match it: from its `Host`
/// header or its `:authority` (which must agree when both are present),
/// lowercased, with trailing dots removed (`admin.example.` is
/// `admin.example`, and must not escape rules on it). More than one `Host`
/// is refused: the policy and the application could read different ones.
pub fn request_host(headers: &http::HeaderMap, authority: Option<&str>) -> Result<String, HostError> {
    let hosts: Vec<_> = headers.get_all(http::header::HOST).iter().collect();
    let host = match hosts.as_slice() {
        [] => None,
        [one] => Some(canonical_host(one.to_str().map_err(|_| HostError::NotText)?)),
        many => return Err(HostError::Repeated(many.len())),
    };
    let authority = authority.map(canonical_host);
    match (host, authority) {
        (Some(host), Some(authority)) if host != authority => Err(HostError::Conflict { host, authority }),
        (Some(host), _) => Ok(host),
        (None, authority) => Ok(authority.unwrap_or_default()),
    }
}

/// Lowercase, without the trailing dots of a fully qualified name.
fn canonical_host(raw: &str) -> String {
    let raw = raw.trim().to_ascii_lowercase();
    let (name, port) = match raw.rsplit_once(':') {
        Some((name, port)) if !raw.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => (name, Some(port)),
        _ => (raw.as_str(), None),
    };
    // Every trailing dot: `admin.example..` must not escape a rule either
    // (found by the path_normalization fuzz target).
    let name = name.trim_end_matches('.');
    match port {
        Some(port) => format!("{name}:{port}"),
        None => name.to_string(),
    }
}

/// What to do with path parts that frameworks read differently: escaped
/// slashes and backslashes (`%2F`, `%5C`), `\`, and `;` path parameters.
/// A policy on `/admin` must not be passed by `/admin;x` or `/%2Fadmin`
/// that the application then routes to `/admin`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathEscapes {
    /// Refuse the request (400): the default.
    #[default]
    Reject,
    /// Decode `%2F`, `%5C` and `\` to `/` and drop `;` parameters from each
    /// segment, then normalize; that path is the one forwarded.
    Normalize,
}

/// How [`normalize_path`] treats a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathRules {
    /// Merge runs of `/`.
    pub merge_slashes: bool,
    pub escapes: PathEscapes,
}

/// Normalizes a request path (the part before `?`) as Istio's BASE
/// normalization does: percent-encodings of unreserved characters are
/// decoded and the others uppercased, `.` and `..` segments are resolved
/// (never above the root), and with `merge_slashes` runs of `/` collapse.
/// Escaped slashes, backslashes and `;` parameters are refused or decoded,
/// as `rules.escapes` says.
pub fn normalize_path(raw: &str, rules: PathRules) -> Result<String, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') && !path.starts_with('\\') {
        return Err(PathError::NotAbsolute);
    }
    let normalize = rules.escapes == PathEscapes::Normalize;
    let ambiguous = |what| if normalize { Ok(()) } else { Err(PathError::Ambiguous(what)) };
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
                } else if value == b'/' || value == b'\\' {
                    ambiguous(if value == b'/' { "%2F" } else { "%5C" })?;
                    decoded.push('/');
                } else {
                    decoded.push_str(&format!("%{value:02X}"));
                }
                i += 3;
            }
            b'\\' => {
                ambiguous("\\")?;
                decoded.push('/');
                i += 1;
            }
            b';' => {
                ambiguous(";")?;
                // A path parameter runs to the end of its segment.
                while i < bytes.len() && bytes[i] != b'/' && bytes[i] != b'\\' {
                    i += 1;
                }
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
            "" if rules.merge_slashes && index != last => {}
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
        let (reject, merge) = (PathRules::default(), PathRules { merge_slashes: true, ..Default::default() });
        let decode = PathRules { escapes: PathEscapes::Normalize, ..Default::default() };
        let cases: [(&str, PathRules, Result<&str, PathError>); 27] = [
            ("/v1/charge", reject, Ok("/v1/charge")),
            ("/v1/%63harge", reject, Ok("/v1/charge")),
            ("/v1/%7Echarge%2d", reject, Ok("/v1/~charge-")),
            ("/v1//charge", reject, Ok("/v1//charge")),
            ("/v1//charge", merge, Ok("/v1/charge")),
            ("/v1/./charge", reject, Ok("/v1/charge")),
            ("/v1/x/../charge", reject, Ok("/v1/charge")),
            ("/../../etc/passwd", reject, Ok("/etc/passwd")),
            ("/v1/%2e%2e/admin", reject, Ok("/admin")),
            ("/v1/charge?x=/../admin;y", reject, Ok("/v1/charge")),
            ("/v1/.", reject, Ok("/v1/")),
            ("/v1/%3Fx", reject, Ok("/v1/%3Fx")),
            // Read differently by different frameworks: refused by default.
            ("/v1/..%2fadmin", reject, Err(PathError::Ambiguous("%2F"))),
            ("/%2Fadmin", reject, Err(PathError::Ambiguous("%2F"))),
            ("/v1%5cadmin", reject, Err(PathError::Ambiguous("%5C"))),
            ("\\v1\\charge", reject, Err(PathError::Ambiguous("\\"))),
            ("/admin;x=1", reject, Err(PathError::Ambiguous(";"))),
            // ... or decoded, and the decoded path is what is forwarded.
            ("/v1/..%2fadmin", decode, Ok("/admin")),
            ("/v1%5Cadmin", decode, Ok("/v1/admin")),
            ("\\v1\\charge", decode, Ok("/v1/charge")),
            ("/admin;x=1/users;y", decode, Ok("/admin/users")),
            ("/a;/../admin", decode, Ok("/admin")),
            ("/v1/%00", reject, Err(PathError::Nul)),
            ("/v1/%zz", reject, Err(PathError::BadEscape(4))),
            ("/v1/%4", reject, Err(PathError::BadEscape(4))),
            ("/v1/%+F", reject, Err(PathError::BadEscape(4))),
            ("v1/charge", reject, Err(PathError::NotAbsolute)),
        ];
        for (raw, rules, want) in cases {
            assert_eq!(normalize_path(raw, rules), want.map(str::to_string), "{raw} {rules:?}");
        }
    }

    #[test]
    fn one_host_per_request_without_trailing_dot() {
        use http::{HeaderMap, HeaderValue, header::HOST};
        let headers = |hosts: &[&str]| {
            let mut map = HeaderMap::new();
            for host in hosts {
                map.append(HOST, HeaderValue::from_str(host).unwrap());
            }
            map
        };
        type Case<'a> = (&'a [&'a str], Option<&'a str>, Result<&'a str, HostError>);
        let cases: [Case; 9] = [
            (&["Admin.Example"], None, Ok("admin.example")),
            (&["admin.example."], None, Ok("admin.example")),
            (&["admin.example.."], None, Ok("admin.example")),
            (&["admin.example.:8080"], None, Ok("admin.example:8080")),
            (&[], Some("admin.example."), Ok("admin.example")),
            (&["admin.example"], Some("ADMIN.example."), Ok("admin.example")),
            (&["[::1]:80"], None, Ok("[::1]:80")),
            (&["public.example", "admin.example"], None, Err(HostError::Repeated(2))),
            (
                &["public.example"],
                Some("admin.example"),
                Err(HostError::Conflict { host: "public.example".into(), authority: "admin.example".into() }),
            ),
        ];
        for (hosts, authority, want) in cases {
            assert_eq!(request_host(&headers(hosts), authority), want.map(str::to_string), "{hosts:?} {authority:?}");
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
