//! Arbitrary bytes as a hash-index file: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_protocol::index::HashIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = HashIndex::decode(data) {
        assert_eq!(HashIndex::decode(&index.encode()), Ok(index));
    }
});
