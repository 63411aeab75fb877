//! The decisions of an NBD session, free of IO.
//!
//! The driver ([`crate::server`]) reads bytes and hands parsed messages here;
//! this module decides what to answer and what to do next:
//! - [`answer_option`] turns one option into the option replies to send and the
//!   next step (keep haggling, enter transmission, abort, or end the session);
//! - [`admit_request`] turns a request header into a validated command or a
//!   rejection with the error number to send (and how many payload bytes must
//!   still be read and thrown away to stay in step with the client).
//!
//! # Decisions (with the spec's reasons)
//! - Ranges past the end: `EINVAL` for `READ` and `TRIM`, `ENOSPC` for `WRITE`
//!   and `WRITE_ZEROES` (the spec's "Error values" section asks for `ENOSPC`
//!   on writes beyond the end of the device).
//! - A `READ` or `WRITE` longer than the maximum payload is refused with
//!   `EINVAL` (clients must not send them; the spec asks for `EINVAL` on size
//!   violations). The payload of such a `WRITE`, and of any other refused
//!   `WRITE`, is read and discarded in bounded pieces so the connection stays
//!   usable; nothing is allocated from the client's length.
//! - `TRIM` and `WRITE_ZEROES` carry no payload, so their length is only
//!   checked against the export size (the spec says a server should not
//!   disconnect for an effect length above the maximum payload).
//! - Unknown commands, `CACHE`, `BLOCK_STATUS`, and flags not valid for the
//!   command (or unknown flags) are refused with `EINVAL`. `FUA` is accepted on
//!   every command, as the spec requires once `NBD_FLAG_SEND_FUA` is advertised.
//! - Writes, trims and write-zeroes on a read-only export get `EPERM`.

use std::sync::Arc;

use bytes::BytesMut;

use crate::export::{Export, Exports, ZeroFlags};
use crate::proto::{self, ClientOption, Errno, InfoRequest, OptionError, RequestHeader};

/// What the server advertises for an export: size and transmission flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
}

/// Transmission flags for an export: flush, FUA, trim, write-zeroes and fast
/// zero are always offered; read-only and multi-connection as the export says.
pub fn transmission_flags(read_only: bool, multi_conn: bool) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_SEND_FAST_ZERO;
    if read_only {
        flags |= proto::FLAG_READ_ONLY;
    }
    if multi_conn {
        flags |= proto::FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// What an export advertises, read from the export.
pub fn export_info(export: &dyn Export) -> ExportInfo {
    ExportInfo {
        size: export.size(),
        flags: transmission_flags(export.read_only(), export.multi_conn()),
    }
}

/// Fixed facts of a negotiation the option answers depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NegotiationParams {
    /// The client negotiated `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
    /// Maximum request payload, advertised in `NBD_INFO_BLOCK_SIZE`.
    pub max_payload: u32,
}

/// The step after an option was answered.
pub enum OptionOutcome {
    /// Send the replies and wait for the next option.
    Continue,
    /// Send the replies, then enter transmission on this export.
    Transmission {
        /// Canonical export name.
        name: String,
        /// The export chosen.
        export: Arc<dyn Export>,
    },
    /// Send the replies (an `NBD_REP_ACK`), then close: the client aborted.
    Abort,
    /// Close without a reply: `NBD_OPT_EXPORT_NAME` could not be satisfied and
    /// that option has no way to report an error.
    Refuse(Refusal),
}

impl std::fmt::Debug for OptionOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Continue => f.write_str("Continue"),
            Self::Transmission { name, export } => f
                .debug_struct("Transmission")
                .field("name", name)
                .field("size", &export.size())
                .finish(),
            Self::Abort => f.write_str("Abort"),
            Self::Refuse(r) => f.debug_tuple("Refuse").field(r).finish(),
        }
    }
}

/// Why an `NBD_OPT_EXPORT_NAME` ended the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No export has this name.
    UnknownExport(String),
    /// The name was malformed.
    BadName(OptionError),
    /// The option payload exceeded [`proto::MAX_OPTION_LEN`].
    TooLong(u32),
}

fn answer_info(
    option: u32,
    req: &InfoRequest,
    exports: &dyn Exports,
    params: NegotiationParams,
    out: &mut BytesMut,
) -> Option<(String, Arc<dyn Export>)> {
    let Some((name, export)) = exports.lookup(&req.name) else {
        proto::encode_option_reply(out, option, proto::REP_ERR_UNKNOWN, b"unknown export");
        return None;
    };
    let info = export_info(export.as_ref());
    proto::encode_info_export(out, option, info.size, info.flags);
    if req.wants(proto::INFO_BLOCK_SIZE) {
        proto::encode_info_block_size(
            out,
            option,
            proto::MIN_BLOCK_SIZE,
            proto::PREFERRED_BLOCK_SIZE,
            params.max_payload.max(proto::PREFERRED_BLOCK_SIZE),
        );
    }
    if req.wants(proto::INFO_NAME) {
        proto::encode_info_string(out, option, proto::INFO_NAME, &name);
    }
    if req.wants(proto::INFO_DESCRIPTION) {
        if let Some(d) = export.description() {
            let d = truncate_str(&d, proto::MAX_STRING_LEN);
            proto::encode_info_string(out, option, proto::INFO_DESCRIPTION, d);
        }
    }
    proto::encode_option_reply(out, option, proto::REP_ACK, b"");
    Some((name, export))
}

fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// Answers one option whose payload was read in full (`parsed` is the result of
/// [`ClientOption::parse`] for option number `option`), appending the replies
/// to `out`.
pub fn answer_option(
    option: u32,
    parsed: Result<ClientOption, OptionError>,
    exports: &dyn Exports,
    params: NegotiationParams,
    out: &mut BytesMut,
) -> OptionOutcome {
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) if option == proto::OPT_EXPORT_NAME => {
            return OptionOutcome::Refuse(Refusal::BadName(e))
        }
        Err(e) => {
            let msg = e.to_string();
            let msg = truncate_str(&msg, proto::MAX_STRING_LEN);
            proto::encode_option_reply(out, option, proto::REP_ERR_INVALID, msg.as_bytes());
            return OptionOutcome::Continue;
        }
    };
    match parsed {
        ClientOption::ExportName(name) => match exports.lookup(&name) {
            Some((name, export)) => {
                let info = export_info(export.as_ref());
                proto::encode_export_name_reply(out, info.size, info.flags, params.no_zeroes);
                OptionOutcome::Transmission { name, export }
            }
            None => OptionOutcome::Refuse(Refusal::UnknownExport(name)),
        },
        ClientOption::Abort => {
            proto::encode_option_reply(out, option, proto::REP_ACK, b"");
            OptionOutcome::Abort
        }
        ClientOption::List => {
            for (name, description) in exports.list() {
                let description = description
                    .as_deref()
                    .map(|d| truncate_str(d, proto::MAX_STRING_LEN));
                proto::encode_rep_server(out, &name, description);
            }
            proto::encode_option_reply(out, option, proto::REP_ACK, b"");
            OptionOutcome::Continue
        }
        ClientOption::Info(req) => {
            answer_info(option, &req, exports, params, out);
            OptionOutcome::Continue
        }
        ClientOption::Go(req) => match answer_info(option, &req, exports, params, out) {
            Some((name, export)) => OptionOutcome::Transmission { name, export },
            None => OptionOutcome::Continue,
        },
        ClientOption::StructuredReply | ClientOption::Unknown(_) => {
            proto::encode_option_reply(out, option, proto::REP_ERR_UNSUP, b"");
            OptionOutcome::Continue
        }
    }
}

/// Answers an option whose payload exceeded [`proto::MAX_OPTION_LEN`] (the
/// driver skips the payload first): `NBD_REP_ERR_TOO_BIG`, or the end of the
/// session for `NBD_OPT_EXPORT_NAME`.
pub fn answer_oversize_option(option: u32, length: u32, out: &mut BytesMut) -> OptionOutcome {
    if option == proto::OPT_EXPORT_NAME {
        return OptionOutcome::Refuse(Refusal::TooLong(length));
    }
    proto::encode_option_reply(out, option, proto::REP_ERR_TOO_BIG, b"option too large");
    OptionOutcome::Continue
}

/// A request, validated against the export and the server's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Read `length` bytes at `offset`.
    Read {
        /// Offset into the export.
        offset: u64,
        /// Bytes to read (at most the maximum payload).
        length: u32,
    },
    /// Read `length` payload bytes and write them at `offset`.
    Write {
        /// Offset into the export.
        offset: u64,
        /// Payload length (at most the maximum payload).
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Trim a range.
    Trim {
        /// Offset into the export.
        offset: u64,
        /// Range length.
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Offset into the export.
        offset: u64,
        /// Range length.
        length: u32,
        /// How to zero.
        flags: ZeroFlags,
    },
    /// The client disconnects: no reply, close.
    Disconnect,
    /// Refuse: discard `discard` payload bytes, then reply with `errno`.
    Reject {
        /// Error to send.
        errno: Errno,
        /// Payload bytes that follow the header and must be skipped.
        discard: u32,
    },
}

fn in_range(offset: u64, length: u32, size: u64) -> bool {
    offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= size)
}

/// Validates a request header against an export of `size` bytes and the
/// server's maximum payload. See the module docs for the rules.
pub fn admit_request(
    header: &RequestHeader,
    size: u64,
    read_only: bool,
    max_payload: u32,
) -> Admission {
    let RequestHeader {
        flags,
        command,
        offset,
        length,
        ..
    } = *header;
    let fua = flags & proto::CMD_FLAG_FUA != 0;
    let allowed = match command {
        proto::CMD_WRITE_ZEROES => {
            proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO
        }
        _ => proto::CMD_FLAG_FUA,
    };
    let payload = if command == proto::CMD_WRITE {
        length
    } else {
        0
    };
    let reject = |errno| Admission::Reject {
        errno,
        discard: payload,
    };
    if command == proto::CMD_DISC {
        return Admission::Disconnect;
    }
    if flags & !allowed != 0 {
        return reject(Errno::Inval);
    }
    match command {
        proto::CMD_READ => {
            if length > max_payload || !in_range(offset, length, size) {
                reject(Errno::Inval)
            } else {
                Admission::Read { offset, length }
            }
        }
        proto::CMD_WRITE => {
            if read_only {
                reject(Errno::Perm)
            } else if length > max_payload {
                reject(Errno::Inval)
            } else if !in_range(offset, length, size) {
                reject(Errno::NoSpc)
            } else {
                Admission::Write {
                    offset,
                    length,
                    fua,
                }
            }
        }
        proto::CMD_FLUSH => Admission::Flush,
        proto::CMD_TRIM => {
            if read_only {
                reject(Errno::Perm)
            } else if !in_range(offset, length, size) {
                reject(Errno::Inval)
            } else {
                Admission::Trim {
                    offset,
                    length,
                    fua,
                }
            }
        }
        proto::CMD_WRITE_ZEROES => {
            if read_only {
                reject(Errno::Perm)
            } else if !in_range(offset, length, size) {
                reject(Errno::NoSpc)
            } else {
                Admission::WriteZeroes {
                    offset,
                    length,
                    flags: ZeroFlags {
                        fua,
                        no_hole: flags & proto::CMD_FLAG_NO_HOLE != 0,
                        fast: flags & proto::CMD_FLAG_FAST_ZERO != 0,
                    },
                }
            }
        }
        _ => reject(Errno::Inval),
    }
}

/// The error number to send for a failed backend call: `ENOTSUP` is only
/// allowed for a fast-zero request (the spec reserves it for that), anything
/// else that maps to it becomes `EINVAL`.
pub fn reply_errno(err: &std::io::Error, fast_zero: bool) -> Errno {
    match crate::export::errno_for(err) {
        Errno::NotSup if !fast_zero => Errno::Inval,
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExportMap, MemExport};

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 1,
            offset,
            length,
        }
    }

    const MAX: u32 = 1 << 16;

    #[test]
    fn admits_in_range_commands() {
        let size = 1 << 20;
        assert_eq!(
            admit_request(&req(proto::CMD_READ, 0, 0, MAX), size, false, MAX),
            Admission::Read {
                offset: 0,
                length: MAX
            }
        );
        assert_eq!(
            admit_request(
                &req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, size - 1, 1),
                size,
                false,
                MAX
            ),
            Admission::Write {
                offset: size - 1,
                length: 1,
                fua: true
            }
        );
        assert_eq!(
            admit_request(
                &req(proto::CMD_FLUSH, proto::CMD_FLAG_FUA, 0, 0),
                size,
                true,
                MAX
            ),
            Admission::Flush
        );
        assert_eq!(
            admit_request(&req(proto::CMD_DISC, 0xffff, 5, 5), size, true, MAX),
            Admission::Disconnect
        );
        // TRIM and WRITE_ZEROES may exceed the maximum payload.
        assert_eq!(
            admit_request(&req(proto::CMD_TRIM, 0, 0, 1 << 20), size, false, MAX),
            Admission::Trim {
                offset: 0,
                length: 1 << 20,
                fua: false
            }
        );
        let all = proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO;
        assert_eq!(
            admit_request(
                &req(proto::CMD_WRITE_ZEROES, all, 0, 1 << 20),
                size,
                false,
                MAX
            ),
            Admission::WriteZeroes {
                offset: 0,
                length: 1 << 20,
                flags: ZeroFlags {
                    fua: true,
                    no_hole: true,
                    fast: true
                }
            }
        );
    }

    #[test]
    fn rejects_out_of_range_and_oversize() {
        let size = 1 << 20;
        let rej = |errno, discard| Admission::Reject { errno, discard };
        assert_eq!(
            admit_request(&req(proto::CMD_READ, 0, size, 1), size, false, MAX),
            rej(Errno::Inval, 0)
        );
        assert_eq!(
            admit_request(&req(proto::CMD_READ, 0, u64::MAX, 2), size, false, MAX),
            rej(Errno::Inval, 0)
        );
        assert_eq!(
            admit_request(&req(proto::CMD_READ, 0, 0, MAX + 1), size, false, MAX),
            rej(Errno::Inval, 0)
        );
        assert_eq!(
            admit_request(&req(proto::CMD_WRITE, 0, size, 10), size, false, MAX),
            rej(Errno::NoSpc, 10)
        );
        assert_eq!(
            admit_request(&req(proto::CMD_WRITE, 0, 0, MAX + 1), size, false, MAX),
            rej(Errno::Inval, MAX + 1)
        );
        assert_eq!(
            admit_request(&req(proto::CMD_WRITE, 0, 0, 10), size, true, MAX),
            rej(Errno::Perm, 10)
        );
        assert_eq!(
            admit_request(&req(proto::CMD_TRIM, 0, size, 1), size, false, MAX),
            rej(Errno::Inval, 0)
        );
        assert_eq!(
            admit_request(&req(proto::CMD_TRIM, 0, 0, 1), size, true, MAX),
            rej(Errno::Perm, 0)
        );
        assert_eq!(
            admit_request(
                &req(proto::CMD_WRITE_ZEROES, 0, size - 1, 2),
                size,
                false,
                MAX
            ),
            rej(Errno::NoSpc, 0)
        );
        assert_eq!(
            admit_request(&req(proto::CMD_WRITE_ZEROES, 0, 0, 1), size, true, MAX),
            rej(Errno::Perm, 0)
        );
    }

    #[test]
    fn rejects_bad_flags_and_commands() {
        let size = 4096;
        let rej = |errno, discard| Admission::Reject { errno, discard };
        assert_eq!(
            admit_request(
                &req(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 1),
                size,
                false,
                MAX
            ),
            rej(Errno::Inval, 0)
        );
        assert_eq!(
            admit_request(
                &req(proto::CMD_WRITE, proto::CMD_FLAG_NO_HOLE, 0, 7),
                size,
                false,
                MAX
            ),
            rej(Errno::Inval, 7)
        );
        assert_eq!(
            admit_request(
                &req(proto::CMD_WRITE_ZEROES, 1 << 9, 0, 1),
                size,
                false,
                MAX
            ),
            rej(Errno::Inval, 0)
        );
        for cmd in [proto::CMD_CACHE, proto::CMD_BLOCK_STATUS, 8, 0xffff] {
            assert_eq!(
                admit_request(&req(cmd, 0, 0, 1), size, false, MAX),
                rej(Errno::Inval, 0)
            );
        }
    }

    #[test]
    fn reply_errno_keeps_enotsup_for_fast_zero_only() {
        let e = std::io::Error::from(std::io::ErrorKind::Unsupported);
        assert_eq!(reply_errno(&e, true), Errno::NotSup);
        assert_eq!(reply_errno(&e, false), Errno::Inval);
    }

    fn params() -> NegotiationParams {
        NegotiationParams {
            no_zeroes: false,
            max_payload: MAX,
        }
    }

    #[test]
    fn go_answers_info_and_enters_transmission() {
        let map = ExportMap::new().with("d", Arc::new(MemExport::new(8192)));
        let mut out = BytesMut::new();
        let req = InfoRequest {
            name: "d".into(),
            requests: vec![
                proto::INFO_BLOCK_SIZE,
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                99,
            ],
        };
        let outcome = answer_option(
            proto::OPT_GO,
            Ok(ClientOption::Go(req)),
            &map,
            params(),
            &mut out,
        );
        assert!(matches!(outcome, OptionOutcome::Transmission { ref name, .. } if name == "d"));
        // INFO_EXPORT (20+12) + BLOCK_SIZE (20+14) + NAME (20+3) + ACK (20); no description.
        assert_eq!(out.len(), 32 + 34 + 23 + 20);
    }

    #[test]
    fn unknown_export_and_unknown_option() {
        let map = ExportMap::new();
        let mut out = BytesMut::new();
        let req = InfoRequest {
            name: "nope".into(),
            requests: vec![],
        };
        let outcome = answer_option(
            proto::OPT_INFO,
            Ok(ClientOption::Info(req)),
            &map,
            params(),
            &mut out,
        );
        assert!(matches!(outcome, OptionOutcome::Continue));
        let h = proto::OptionReplyHeader::parse(&out).expect("reply");
        assert_eq!(h.reply, proto::REP_ERR_UNKNOWN);

        let outcome = answer_option(
            proto::OPT_EXPORT_NAME,
            Ok(ClientOption::ExportName("nope".into())),
            &map,
            params(),
            &mut BytesMut::new(),
        );
        assert!(
            matches!(outcome, OptionOutcome::Refuse(Refusal::UnknownExport(ref n)) if n == "nope")
        );

        let mut out = BytesMut::new();
        let outcome = answer_option(77, Ok(ClientOption::Unknown(77)), &map, params(), &mut out);
        assert!(matches!(outcome, OptionOutcome::Continue));
        let h = proto::OptionReplyHeader::parse(&out).expect("reply");
        assert_eq!((h.option, h.reply), (77, proto::REP_ERR_UNSUP));

        let mut out = BytesMut::new();
        let outcome = answer_oversize_option(proto::OPT_INFO, MAX * 4, &mut out);
        assert!(matches!(outcome, OptionOutcome::Continue));
        let h = proto::OptionReplyHeader::parse(&out).expect("reply");
        assert_eq!(h.reply, proto::REP_ERR_TOO_BIG);
        assert!(matches!(
            answer_oversize_option(proto::OPT_EXPORT_NAME, MAX * 4, &mut out),
            OptionOutcome::Refuse(Refusal::TooLong(_))
        ));
    }

    #[test]
    fn malformed_option_is_invalid() {
        let map = ExportMap::new();
        let mut out = BytesMut::new();
        let parsed = ClientOption::parse(proto::OPT_LIST, b"x");
        let outcome = answer_option(proto::OPT_LIST, parsed, &map, params(), &mut out);
        assert!(matches!(outcome, OptionOutcome::Continue));
        let h = proto::OptionReplyHeader::parse(&out).expect("reply");
        assert_eq!(h.reply, proto::REP_ERR_INVALID);
    }

    #[test]
    fn flags_follow_the_export() {
        let f = transmission_flags(false, false);
        assert_eq!(f & proto::FLAG_READ_ONLY, 0);
        assert_eq!(f & proto::FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(f & proto::FLAG_HAS_FLAGS, 0);
        assert_ne!(f & proto::FLAG_SEND_WRITE_ZEROES, 0);
        let f = transmission_flags(true, true);
        assert_ne!(f & proto::FLAG_READ_ONLY, 0);
        assert_ne!(f & proto::FLAG_CAN_MULTI_CONN, 0);
        assert_eq!(f & proto::FLAG_SEND_DF, 0);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("abc", 5), "abc");
    }
}
