//! Arbitrary option numbers and payloads into the option parser: no panic, and
//! a parsed INFO/GO request re-encodes to the same payload.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lifeboat_nbd::proto::{ClientOption, OPT_GO, OPT_INFO};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    // Mostly the known options, sometimes any number.
    let option = if selector < 16 {
        u32::from(selector)
    } else {
        u32::from(selector) << 8
    };
    if let Ok(ClientOption::Info(req) | ClientOption::Go(req)) =
        ClientOption::parse(option, payload)
    {
        assert!(option == OPT_INFO || option == OPT_GO);
        let mut out = BytesMut::new();
        req.encode_payload(&mut out);
        assert_eq!(&out[..], payload);
    }
});
