//! Arbitrary block payloads into the block decoder: errors, never panics, and
//! never returns a block of another length than declared.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_protocol::block::{BlockDecoder, Encoding};

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let Ok(encoding) = Encoding::try_from(data[0] % 3) else { return };
    let raw_len = u32::from_le_bytes([data[1], data[2], data[3], 0]);
    let mut decoder = BlockDecoder::new();
    if let Ok(block) = decoder.decode(encoding, raw_len, &data[4..], 1 << 20) {
        assert_eq!(block.len(), raw_len as usize);
    }
});
