//! `agent_config`: the body and its properties are `lifeboat_agent::fuzzing::agent_config`
//! (the `fuzz_smoke` test of `lifeboat-tests` runs the same function on
//! stable Rust).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lifeboat_agent::fuzzing::agent_config(data));
