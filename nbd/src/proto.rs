//! The NBD wire format, free of IO.
//!
//! Everything here works on byte slices and [`BytesMut`] buffers: constants
//! (magics, flags, option, reply, command and error numbers), check-then-parse
//! decoders for what a client sends (client flags, option headers and payloads,
//! request headers) and encoders for what the server sends (greeting, option
//! replies, `NBD_OPT_EXPORT_NAME` reply, simple replies).
//!
//! Decoders never allocate from a length they have not bounded: an option header
//! is checked against [`MAX_OPTION_LEN`] before its payload is read, and a
//! request's length is checked against the configured maximum payload by
//! [`crate::session::admit_request`] before a write payload is read.
//!
//! Only the fixed newstyle handshake and simple replies are spoken; structured
//! replies, metadata contexts, TLS and extended headers are not negotiated.

use bytes::{BufMut, BytesMut};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after [`NBD_MAGIC`] and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the medium is rotational (never set here).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported (never set: no structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may share the export safely.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is supported (never set here).
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: choose an export and enter transmission (cannot fail gracefully).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation (soft disconnect).
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (not supported here).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: ask for structured replies (answered with `NBD_REP_ERR_UNSUP`).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: success, or end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of information about an export.
pub const REP_INFO: u32 = 3;
/// Bit 31 marks an option reply as an error.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: the option is unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: policy forbids the option.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: the option is malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option error: the option needs something this platform lacks.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option error: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: the named export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option error: the client must ask for block sizes first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option error: the request or reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information type: size and transmission flags (always sent on `INFO`/`GO` success).
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (the only command followed by a payload).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush to stable storage.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard a range (a hint).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch (not supported here).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (not supported here).
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (persist before replying).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: `WRITE_ZEROES` must not leave a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment (structured replies only; rejected here).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent per context (block status only; rejected here).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: `WRITE_ZEROES` must fail fast with `ENOTSUP` unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Length of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of the client flags field.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Length of an option header: `IHAVEOPT`, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Largest option payload read into memory. Longer payloads are skipped and
/// answered with `NBD_REP_ERR_TOO_BIG` (an `NBD_OPT_EXPORT_NAME` that long ends
/// the session, since that option cannot be answered with an error).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or other string accepted (the spec's hard limit).
pub const MAX_STRING_LEN: usize = 4096;
/// Default maximum request payload: 32 MiB, the size every server should accept.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Minimum block size advertised in `NBD_INFO_BLOCK_SIZE` (any alignment works).
pub const MIN_BLOCK_SIZE: u32 = 1;

/// Error numbers sent in simple replies, as the spec restricts them.
///
/// The spec defines a closed list of values; backends' `io::Error`s are mapped
/// onto it by [`crate::export::errno_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory.
    NoMem = 12,
    /// Invalid argument (bad range, flags or command).
    Inval = 22,
    /// No space left on device (write beyond the end).
    NoSpc = 28,
    /// Value too large.
    Overflow = 75,
    /// Operation not supported (only for `NBD_CMD_FLAG_FAST_ZERO`).
    NotSup = 95,
    /// Server is shutting down.
    Shutdown = 108,
}

impl Errno {
    /// The number put on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Why bytes from a client were refused by a decoder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not enough bytes yet; read more and call again.
    #[error("need {needed} bytes, have {have}")]
    Incomplete {
        /// Bytes the message needs in total.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The client flags carry a bit this server does not know or did not offer.
    #[error("client flags {flags:#010x} carry unknown bits")]
    UnknownClientFlags {
        /// The client flags as received.
        flags: u32,
    },
    /// The client does not speak fixed newstyle.
    #[error("client flags {flags:#010x} lack NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle {
        /// The client flags as received.
        flags: u32,
    },
    /// An option header did not start with `IHAVEOPT`.
    #[error("option magic {magic:#018x} is not IHAVEOPT")]
    BadOptionMagic {
        /// The magic as received.
        magic: u64,
    },
    /// A request header did not start with the request magic.
    #[error("request magic {magic:#010x} is not {REQUEST_MAGIC:#010x}")]
    BadRequestMagic {
        /// The magic as received.
        magic: u32,
    },
}

fn need(buf: &[u8], needed: usize) -> Result<(), WireError> {
    if buf.len() < needed {
        Err(WireError::Incomplete {
            needed,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn be_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn be_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Appends the server greeting (newstyle, with [`SERVER_HANDSHAKE_FLAGS`]).
pub fn encode_greeting(buf: &mut BytesMut) {
    buf.put_u64(NBD_MAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(SERVER_HANDSHAKE_FLAGS);
}

/// What the client agreed to in its flags field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client asked the server to omit the 124 zero bytes.
    pub no_zeroes: bool,
}

/// Parses the 4-byte client flags. Fixed newstyle is required; any bit that is
/// unknown or was not offered is refused (the spec makes the server drop such
/// clients).
pub fn parse_client_flags(buf: &[u8]) -> Result<ClientFlags, WireError> {
    need(buf, CLIENT_FLAGS_LEN)?;
    let flags = be_u32(buf, 0).ok_or(WireError::Incomplete {
        needed: CLIENT_FLAGS_LEN,
        have: buf.len(),
    })?;
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(WireError::UnknownClientFlags { flags });
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(WireError::NotFixedNewstyle { flags });
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Encodes client flags (for tests and client-side tooling).
pub fn encode_client_flags(buf: &mut BytesMut, flags: u32) {
    buf.put_u32(flags);
}

/// The fixed part of an option sent by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the payload that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Tells whether `buf` starts with a complete, well-formed option header.
    pub fn check(buf: &[u8]) -> Result<(), WireError> {
        need(buf, OPTION_HEADER_LEN)?;
        match be_u64(buf, 0) {
            Some(IHAVEOPT) => Ok(()),
            Some(magic) => Err(WireError::BadOptionMagic { magic }),
            None => Err(WireError::Incomplete {
                needed: OPTION_HEADER_LEN,
                have: buf.len(),
            }),
        }
    }

    /// Parses an option header; call [`OptionHeader::check`] first or rely on
    /// this repeating it.
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        Self::check(buf)?;
        let incomplete = WireError::Incomplete {
            needed: OPTION_HEADER_LEN,
            have: buf.len(),
        };
        let option = be_u32(buf, 8).ok_or(incomplete.clone())?;
        let length = be_u32(buf, 12).ok_or(incomplete)?;
        Ok(Self { option, length })
    }

    /// Whether the payload is small enough to be read into memory.
    pub fn payload_fits(&self) -> bool {
        self.length <= MAX_OPTION_LEN
    }

    /// Appends the header (for tests and client-side tooling).
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(IHAVEOPT);
        buf.put_u32(self.option);
        buf.put_u32(self.length);
    }
}

/// An `NBD_OPT_INFO` or `NBD_OPT_GO` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name; empty means the default export.
    pub name: String,
    /// Information types asked for, in the client's order.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Whether the client asked for this information type.
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }

    /// Appends the option payload (for tests and client-side tooling).
    pub fn encode_payload(&self, buf: &mut BytesMut) {
        buf.put_u32(self.name.len() as u32);
        buf.put_slice(self.name.as_bytes());
        buf.put_u16(self.requests.len() as u16);
        for r in &self.requests {
            buf.put_u16(*r);
        }
    }
}

/// An option the client sent, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission on this export.
    ExportName(String),
    /// `NBD_OPT_ABORT`: the client ends the session.
    Abort,
    /// `NBD_OPT_LIST`: list exports.
    List,
    /// `NBD_OPT_INFO`: describe an export.
    Info(InfoRequest),
    /// `NBD_OPT_GO`: describe an export and enter transmission.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// Any other option number.
    Unknown(u32),
}

/// Why an option's payload was refused (answered with `NBD_REP_ERR_INVALID`,
/// or, for `NBD_OPT_EXPORT_NAME`, by ending the session).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The payload does not have the layout the option requires.
    #[error("option {option}: malformed payload of {length} bytes: {reason}")]
    Malformed {
        /// Option number.
        option: u32,
        /// Payload length.
        length: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A string is not valid UTF-8, contains NUL or is longer than 4096 bytes.
    #[error("option {option}: bad string: {reason}")]
    BadString {
        /// Option number.
        option: u32,
        /// What is wrong.
        reason: &'static str,
    },
}

fn parse_string(option: u32, bytes: &[u8]) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionError::BadString {
            option,
            reason: "longer than 4096 bytes",
        });
    }
    if bytes.contains(&0) {
        return Err(OptionError::BadString {
            option,
            reason: "contains NUL",
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(OptionError::BadString {
            option,
            reason: "not UTF-8",
        }),
    }
}

fn parse_info_request(option: u32, payload: &[u8]) -> Result<InfoRequest, OptionError> {
    let malformed = |reason| OptionError::Malformed {
        option,
        length: payload.len(),
        reason,
    };
    let name_len = be_u32(payload, 0).ok_or(malformed("shorter than 6 bytes"))?;
    let name_len = usize::try_from(name_len).map_err(|_| malformed("name length overflows"))?;
    let name_end = name_len
        .checked_add(4)
        .ok_or(malformed("name length overflows"))?;
    let name_bytes = payload
        .get(4..name_end)
        .ok_or(malformed("name length exceeds payload"))?;
    let count = be_u16(payload, name_end).ok_or(malformed("no information request count"))?;
    let list = payload
        .get(name_end + 2..)
        .ok_or(malformed("no information request count"))?;
    if list.len() != usize::from(count) * 2 {
        return Err(malformed(
            "information request count does not match payload",
        ));
    }
    let name = parse_string(option, name_bytes)?;
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

impl ClientOption {
    /// Parses an option from its number and complete payload (already bounded
    /// by [`MAX_OPTION_LEN`]).
    pub fn parse(option: u32, payload: &[u8]) -> Result<Self, OptionError> {
        match option {
            OPT_EXPORT_NAME => Ok(Self::ExportName(parse_string(option, payload)?)),
            // The spec asks servers to ignore data sent with ABORT.
            OPT_ABORT => Ok(Self::Abort),
            OPT_LIST if payload.is_empty() => Ok(Self::List),
            OPT_LIST => Err(OptionError::Malformed {
                option,
                length: payload.len(),
                reason: "NBD_OPT_LIST carries no data",
            }),
            OPT_INFO => Ok(Self::Info(parse_info_request(option, payload)?)),
            OPT_GO => Ok(Self::Go(parse_info_request(option, payload)?)),
            OPT_STRUCTURED_REPLY => Ok(Self::StructuredReply),
            other => Ok(Self::Unknown(other)),
        }
    }
}

/// Appends one option reply: magic, option, reply type, length, payload.
pub fn encode_option_reply(buf: &mut BytesMut, option: u32, reply: u32, payload: &[u8]) {
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
}

/// Appends an `NBD_REP_SERVER` reply describing one export for `NBD_OPT_LIST`.
pub fn encode_rep_server(buf: &mut BytesMut, name: &str, description: Option<&str>) {
    let mut payload = BytesMut::with_capacity(4 + name.len());
    payload.put_u32(name.len() as u32);
    payload.put_slice(name.as_bytes());
    if let Some(d) = description {
        payload.put_slice(d.as_bytes());
    }
    encode_option_reply(buf, OPT_LIST, REP_SERVER, &payload);
}

/// Appends an `NBD_REP_INFO` reply of type `NBD_INFO_EXPORT`.
pub fn encode_info_export(buf: &mut BytesMut, option: u32, size: u64, flags: u16) {
    let mut payload = [0u8; 12];
    payload[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    payload[2..10].copy_from_slice(&size.to_be_bytes());
    payload[10..].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(buf, option, REP_INFO, &payload);
}

/// Appends an `NBD_REP_INFO` reply of type `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(
    buf: &mut BytesMut,
    option: u32,
    minimum: u32,
    preferred: u32,
    maximum: u32,
) {
    let mut payload = [0u8; 14];
    payload[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    payload[2..6].copy_from_slice(&minimum.to_be_bytes());
    payload[6..10].copy_from_slice(&preferred.to_be_bytes());
    payload[10..].copy_from_slice(&maximum.to_be_bytes());
    encode_option_reply(buf, option, REP_INFO, &payload);
}

/// Appends an `NBD_REP_INFO` reply carrying a string (`NBD_INFO_NAME` or
/// `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(buf: &mut BytesMut, option: u32, info: u16, text: &str) {
    let mut payload = BytesMut::with_capacity(2 + text.len());
    payload.put_u16(info);
    payload.put_slice(text.as_bytes());
    encode_option_reply(buf, option, REP_INFO, &payload);
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and,
/// unless the client negotiated `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes.
pub fn encode_export_name_reply(buf: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, 124);
    }
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`), possibly unknown.
    pub command: u16,
    /// Opaque handle (cookie) echoed in the reply.
    pub handle: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length of the range (and of the payload, for `NBD_CMD_WRITE`).
    pub length: u32,
}

impl RequestHeader {
    /// Tells whether `buf` starts with a complete request header with the right magic.
    pub fn check(buf: &[u8]) -> Result<(), WireError> {
        need(buf, REQUEST_HEADER_LEN)?;
        match be_u32(buf, 0) {
            Some(REQUEST_MAGIC) => Ok(()),
            Some(magic) => Err(WireError::BadRequestMagic { magic }),
            None => Err(WireError::Incomplete {
                needed: REQUEST_HEADER_LEN,
                have: buf.len(),
            }),
        }
    }

    /// Parses a request header (repeating [`RequestHeader::check`]).
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        Self::check(buf)?;
        let incomplete = || WireError::Incomplete {
            needed: REQUEST_HEADER_LEN,
            have: buf.len(),
        };
        Ok(Self {
            flags: be_u16(buf, 4).ok_or_else(incomplete)?,
            command: be_u16(buf, 6).ok_or_else(incomplete)?,
            handle: be_u64(buf, 8).ok_or_else(incomplete)?,
            offset: be_u64(buf, 16).ok_or_else(incomplete)?,
            length: be_u32(buf, 24).ok_or_else(incomplete)?,
        })
    }

    /// Appends the header (for tests and client-side tooling).
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u32(REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.command);
        buf.put_u64(self.handle);
        buf.put_u64(self.offset);
        buf.put_u32(self.length);
    }
}

/// Appends a simple reply header; `error` is 0 on success. A successful read
/// reply is followed by the data, which the caller writes.
pub fn encode_simple_reply(buf: &mut BytesMut, error: u32, handle: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(handle);
}

/// A simple reply header, parsed (for tests and client-side tooling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error number, 0 on success.
    pub error: u32,
    /// Handle of the request answered.
    pub handle: u64,
}

impl SimpleReply {
    /// Parses a simple reply header; `None` if too short or the magic is wrong.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        if be_u32(buf, 0)? != SIMPLE_REPLY_MAGIC {
            return None;
        }
        Some(Self {
            error: be_u32(buf, 4)?,
            handle: be_u64(buf, 8)?,
        })
    }
}

/// An option reply header, parsed (for tests and client-side tooling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// Reply type (`NBD_REP_*`).
    pub reply: u32,
    /// Payload length that follows.
    pub length: u32,
}

/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

impl OptionReplyHeader {
    /// Parses an option reply header; `None` if too short or the magic is wrong.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        if be_u64(buf, 0)? != OPTION_REPLY_MAGIC {
            return None;
        }
        Some(Self {
            option: be_u32(buf, 8)?,
            reply: be_u32(buf, 12)?,
            length: be_u32(buf, 16)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let mut b = BytesMut::new();
        encode_greeting(&mut b);
        assert_eq!(b.len(), GREETING_LEN);
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(&b[16..], &[0, 3]);
    }

    #[test]
    fn client_flags_bounds() {
        assert!(matches!(
            parse_client_flags(&[0, 0, 0]),
            Err(WireError::Incomplete { needed: 4, have: 3 })
        ));
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 1]),
            Ok(ClientFlags { no_zeroes: false })
        );
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 3]),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert!(matches!(
            parse_client_flags(&[0, 0, 0, 0]),
            Err(WireError::NotFixedNewstyle { flags: 0 })
        ));
        assert!(matches!(
            parse_client_flags(&[0, 0, 0, 2]),
            Err(WireError::NotFixedNewstyle { flags: 2 })
        ));
        assert!(matches!(
            parse_client_flags(&[0, 0, 0, 5]),
            Err(WireError::UnknownClientFlags { flags: 5 })
        ));
        assert!(matches!(
            parse_client_flags(&[0x80, 0, 0, 1]),
            Err(WireError::UnknownClientFlags { .. })
        ));
    }

    #[test]
    fn option_header_round_trip_and_bounds() {
        let h = OptionHeader {
            option: OPT_GO,
            length: 1234,
        };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        assert_eq!(b.len(), OPTION_HEADER_LEN);
        assert_eq!(OptionHeader::parse(&b), Ok(h));
        for cut in 0..OPTION_HEADER_LEN {
            assert!(matches!(
                OptionHeader::check(&b[..cut]),
                Err(WireError::Incomplete { .. })
            ));
        }
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(WireError::BadOptionMagic { .. })
        ));
        assert!(OptionHeader {
            option: 1,
            length: MAX_OPTION_LEN
        }
        .payload_fits());
        assert!(!OptionHeader {
            option: 1,
            length: MAX_OPTION_LEN + 1
        }
        .payload_fits());
    }

    #[test]
    fn info_request_round_trip() {
        let req = InfoRequest {
            name: "disk0".into(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let mut b = BytesMut::new();
        req.encode_payload(&mut b);
        assert_eq!(
            ClientOption::parse(OPT_GO, &b),
            Ok(ClientOption::Go(req.clone()))
        );
        assert_eq!(
            ClientOption::parse(OPT_INFO, &b),
            Ok(ClientOption::Info(req))
        );
    }

    #[test]
    fn info_request_every_bound() {
        let good = {
            let mut b = BytesMut::new();
            InfoRequest {
                name: "ab".into(),
                requests: vec![3],
            }
            .encode_payload(&mut b);
            b
        };
        // Every truncation and every extension is malformed.
        for cut in 0..good.len() {
            assert!(matches!(
                ClientOption::parse(OPT_GO, &good[..cut]),
                Err(OptionError::Malformed { .. })
            ));
        }
        let mut longer = good.clone();
        longer.put_u8(0);
        assert!(matches!(
            ClientOption::parse(OPT_GO, &longer),
            Err(OptionError::Malformed { .. })
        ));
        // A name length past the payload (and one that would overflow) is malformed.
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        huge.put_u16(0);
        assert!(matches!(
            ClientOption::parse(OPT_INFO, &huge),
            Err(OptionError::Malformed { .. })
        ));
        // Empty name and empty list are fine.
        let mut empty = BytesMut::new();
        empty.put_u32(0);
        empty.put_u16(0);
        assert_eq!(
            ClientOption::parse(OPT_GO, &empty),
            Ok(ClientOption::Go(InfoRequest {
                name: String::new(),
                requests: vec![]
            }))
        );
    }

    #[test]
    fn strings_are_checked() {
        assert!(matches!(
            ClientOption::parse(OPT_EXPORT_NAME, b"a\0b"),
            Err(OptionError::BadString { .. })
        ));
        assert!(matches!(
            ClientOption::parse(OPT_EXPORT_NAME, &[0xff, 0xfe]),
            Err(OptionError::BadString { .. })
        ));
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        assert!(matches!(
            ClientOption::parse(OPT_EXPORT_NAME, &long),
            Err(OptionError::BadString { .. })
        ));
        let max = vec![b'a'; MAX_STRING_LEN];
        assert!(matches!(
            ClientOption::parse(OPT_EXPORT_NAME, &max),
            Ok(ClientOption::ExportName(n)) if n.len() == MAX_STRING_LEN
        ));
    }

    #[test]
    fn other_options() {
        assert_eq!(
            ClientOption::parse(OPT_ABORT, b"x"),
            Ok(ClientOption::Abort)
        );
        assert_eq!(ClientOption::parse(OPT_LIST, b""), Ok(ClientOption::List));
        assert!(matches!(
            ClientOption::parse(OPT_LIST, b"x"),
            Err(OptionError::Malformed { .. })
        ));
        assert_eq!(
            ClientOption::parse(OPT_STRUCTURED_REPLY, b""),
            Ok(ClientOption::StructuredReply)
        );
        assert_eq!(
            ClientOption::parse(OPT_STARTTLS, b""),
            Ok(ClientOption::Unknown(OPT_STARTTLS))
        );
        assert_eq!(
            ClientOption::parse(999, b"zz"),
            Ok(ClientOption::Unknown(999))
        );
    }

    #[test]
    fn request_header_round_trip_and_bounds() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: u64::MAX - 1,
            length: u32::MAX,
        };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        assert_eq!(b.len(), REQUEST_HEADER_LEN);
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::parse(&b), Ok(h));
        for cut in 0..REQUEST_HEADER_LEN {
            assert!(matches!(
                RequestHeader::parse(&b[..cut]),
                Err(WireError::Incomplete { needed: 28, .. })
            ));
        }
        let mut bad = b.clone();
        bad[3] = 0x14;
        assert!(matches!(
            RequestHeader::parse(&bad),
            Err(WireError::BadRequestMagic { magic: 0x2560_9514 })
        ));
    }

    #[test]
    fn reply_encoders_round_trip() {
        let mut b = BytesMut::new();
        encode_simple_reply(&mut b, Errno::Inval.code(), 77);
        assert_eq!(b.len(), SIMPLE_REPLY_LEN);
        assert_eq!(
            SimpleReply::parse(&b),
            Some(SimpleReply {
                error: 22,
                handle: 77
            })
        );
        assert_eq!(SimpleReply::parse(&b[..15]), None);

        let mut b = BytesMut::new();
        encode_info_export(&mut b, OPT_GO, 1 << 40, 0x1234);
        let h = OptionReplyHeader::parse(&b).expect("header");
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_GO,
                reply: REP_INFO,
                length: 12
            }
        );
        assert_eq!(&b[20..22], &[0, 0]);
        assert_eq!(&b[22..30], &(1u64 << 40).to_be_bytes());
        assert_eq!(&b[30..32], &[0x12, 0x34]);

        let mut b = BytesMut::new();
        encode_info_block_size(&mut b, OPT_INFO, 1, 4096, 1 << 25);
        assert_eq!(b.len(), OPTION_REPLY_HEADER_LEN + 14);
        assert_eq!(&b[20..22], &[0, 3]);
        assert_eq!(&b[30..34], &(1u32 << 25).to_be_bytes());

        let mut b = BytesMut::new();
        encode_rep_server(&mut b, "disk", Some("desc"));
        let h = OptionReplyHeader::parse(&b).expect("header");
        assert_eq!(h.reply, REP_SERVER);
        assert_eq!(h.length, 4 + 4 + 4);
        assert_eq!(&b[20..24], &[0, 0, 0, 4]);
        assert_eq!(&b[24..], b"diskdesc");

        let mut b = BytesMut::new();
        encode_export_name_reply(&mut b, 512, 3, false);
        assert_eq!(b.len(), 8 + 2 + 124);
        let mut b = BytesMut::new();
        encode_export_name_reply(&mut b, 512, 3, true);
        assert_eq!(b.len(), 10);

        let mut b = BytesMut::new();
        encode_option_reply(&mut b, 42, REP_ERR_UNSUP, b"");
        assert_eq!(
            OptionReplyHeader::parse(&b),
            Some(OptionReplyHeader {
                option: 42,
                reply: 0x8000_0001,
                length: 0
            })
        );
    }

    #[test]
    fn reply_numbers_match_the_spec() {
        assert_eq!(REP_ERR_UNSUP, (1 << 31) + 1);
        assert_eq!(REP_ERR_UNKNOWN, (1 << 31) + 6);
        assert_eq!(REP_ERR_TOO_BIG, (1 << 31) + 9);
        assert_eq!(Errno::Perm.code(), 1);
        assert_eq!(Errno::NotSup.code(), 95);
        assert_eq!(Errno::Shutdown.code(), 108);
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    }
}
