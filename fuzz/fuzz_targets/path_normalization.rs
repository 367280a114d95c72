//! A request path, as a waypoint normalizes it before policy, in both
//! `--path-escapes` modes, and a request's hosts. Normalizing twice gives
//! the same path, and in the default mode nothing that frameworks read
//! differently survives.
#![no_main]

use ambit_authz::request::{PathEscapes, PathRules, normalize_path, request_host};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str, &str)| {
    let (raw, host, authority) = input;
    for merge_slashes in [false, true] {
        for escapes in [PathEscapes::Reject, PathEscapes::Normalize] {
            let rules = PathRules { merge_slashes, escapes };
            let Ok(path) = normalize_path(raw, rules) else { continue };
            assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
            assert_eq!(normalize_path(&path, rules).as_ref(), Ok(&path), "{raw:?} -> {path:?} is not stable");
            assert!(!path.split('/').any(|segment| segment == ".." || segment == "."), "{raw:?} -> {path:?}");
            if escapes == PathEscapes::Reject {
                let upper = path.to_ascii_uppercase();
                assert!(!upper.contains("%2F") && !upper.contains("%5C") && !path.contains(';'), "{raw:?} -> {path:?}");
            }
        }
    }
    let Ok(value) = http::HeaderValue::from_str(host) else { return };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, value);
    if let Ok(host) = request_host(&headers, Some(authority)) {
        assert!(!host.ends_with('.'), "{host:?}");
    }
});
