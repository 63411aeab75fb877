//! `pit_manifest`: the body and its properties are `lifeboat_receiver::fuzzing::pit_manifest`
//! (the `fuzz_smoke` test of `lifeboat-tests` runs the same function on
//! stable Rust).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lifeboat_receiver::fuzzing::pit_manifest(data));
