//! Arbitrary bytes into the request-header decoder and the admission rules:
//! no panic; accepted headers re-encode to the same bytes; what is admitted
//! lies inside the export and the payload bound, and a refused write skips
//! exactly its payload.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lifeboat_nbd::proto::{self, RequestHeader, WireError};
use lifeboat_nbd::session::{admit_request, Admission};

fuzz_target!(|data: &[u8]| {
    let header = match RequestHeader::parse(data) {
        Ok(h) => h,
        Err(WireError::Incomplete { needed, have }) => {
            assert!(have < needed);
            return;
        }
        Err(_) => return,
    };
    let mut out = BytesMut::new();
    header.encode(&mut out);
    assert_eq!(&out[..], &data[..proto::REQUEST_HEADER_LEN]);

    let tail = &data[proto::REQUEST_HEADER_LEN..];
    let size = tail
        .first()
        .map_or(1 << 20, |b| u64::from(*b) << (tail.len() % 40));
    let read_only = tail.get(1).is_some_and(|b| b & 1 == 1);
    let max = tail.get(2).map_or(1 << 16, |b| (u32::from(*b) + 1) << 8);
    let inside = |offset: u64, length: u32| {
        offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= size)
    };
    match admit_request(&header, size, read_only, max) {
        Admission::Read { offset, length } => assert!(length <= max && inside(offset, length)),
        Admission::Write { offset, length, .. } => {
            assert!(!read_only && length <= max && inside(offset, length))
        }
        Admission::Trim { offset, length, .. } | Admission::WriteZeroes { offset, length, .. } => {
            assert!(!read_only && inside(offset, length))
        }
        Admission::Reject { discard, .. } => {
            let expected = if header.command == proto::CMD_WRITE {
                header.length
            } else {
                0
            };
            assert_eq!(discard, expected);
        }
        Admission::Flush => assert_eq!(header.command, proto::CMD_FLUSH),
        Admission::Disconnect => assert_eq!(header.command, proto::CMD_DISC),
    }
});
