//! Why a connection ended badly.

use std::io;
use std::time::Duration;

use crate::proto::WireError;
use crate::session::Refusal;

/// Why a connection ended with an error. Backend failures are not here: they are
/// answered to the client with an error number and the connection goes on.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("socket error while {during}")]
    Io {
        /// What the server was doing.
        during: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The client closed the connection in the middle of a message.
    #[error("client closed the connection in the middle of {during}")]
    Truncated {
        /// The message being read.
        during: &'static str,
    },
    /// The client sent bytes that break the protocol (bad magic, bad client flags);
    /// the connection is dropped without a reply, as the spec allows.
    #[error("protocol violation in {during}")]
    Protocol {
        /// The message being read.
        during: &'static str,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// `NBD_OPT_EXPORT_NAME` could not be satisfied; that option has no error
    /// reply, so the session ends.
    #[error("NBD_OPT_EXPORT_NAME refused: {refusal:?}")]
    ExportNameRefused {
        /// Why.
        refusal: Refusal,
    },
    /// The handshake did not finish in time.
    #[error("handshake not finished after {after:?}")]
    HandshakeTimeout {
        /// The configured limit.
        after: Duration,
    },
    /// The client sent more options than allowed in one handshake.
    #[error("more than {limit} options in one handshake")]
    TooManyOptions {
        /// The configured limit.
        limit: u32,
    },
}
