//! Arbitrary bytes, cut at arbitrary points, into the frame decoder: it must
//! never panic, and whatever it accepts must re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lifeboat_protocol::codec::{self, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| (*b as usize).max(1));
    let mut decoder = FrameDecoder::default();
    for piece in data.chunks(split) {
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let mut out = BytesMut::new();
                    codec::encode(&frame, &mut out);
                    let again = codec::parse(out.freeze()).expect("re-encoded frame parses");
                    assert_eq!(format!("{frame:?}"), format!("{again:?}"));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
