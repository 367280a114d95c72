//! The HBONE CONNECT request a peer sends: its authority (where to) and
//! its `forwarded` header (who for), as the destination tunnel reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (authority, forwarded) = input;
    let Ok(request) =
        http::Request::builder().method(http::Method::CONNECT).uri(authority).header("forwarded", forwarded).body(())
    else {
        return;
    };
    if let Some(target) = ambit_hbone::server::connect_target(&request) {
        assert_eq!(target.to_string().parse(), Ok(target));
    }
    let _ = ambit_hbone::server::forwarded_for(request.headers());
});
