//! `handshake_agent`: the body and its properties are
//! `lifeboat_protocol::fuzzing::agent_session` (the `fuzz_smoke` test of
//! `lifeboat-tests` runs the same function on stable Rust).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lifeboat_protocol::fuzzing::agent_session(data));
