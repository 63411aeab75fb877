//! `request_header`: the body and its properties are `lifeboat_nbd::fuzzing::request_header`
//! (the `fuzz_smoke` test of `lifeboat-tests` runs the same function on
//! stable Rust).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lifeboat_nbd::fuzzing::request_header(data));
