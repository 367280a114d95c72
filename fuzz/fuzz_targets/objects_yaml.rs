//! A configuration file, as the agent, the waypoint and the CA parse it:
//! every object kind, and AuthorizationPolicy's fail-closed stand-in.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (objects, errors) = ambit_model::parse_documents(std::path::Path::new("fuzz.yaml"), text);
    for object in &objects {
        if let ambit_model::Object::AuthorizationPolicy(policy) = object {
            // A stand-in exists only for a document that failed.
            assert!(policy.broken.is_none() || !errors.is_empty());
        }
    }
});
