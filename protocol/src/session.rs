//! Sans-IO state machines for the control stream of both ends.
//!
//! [`AgentSession`] and [`ReceiverSession`] know the order of frames on the control
//! stream and nothing of sockets, tasks or clocks: the driver decodes frames (see
//! [`crate::codec::FrameDecoder`]) and feeds them in with `now`, and carries out
//! what the machine hands out. Given the same inputs they do the same thing, so
//! `tests/simulation.rs` drives whole sessions with a fake clock.
//!
//! # Driving a machine (as quinn-proto's `Connection`)
//!
//! After anything that may change the machine (`new`, `handle_frame`,
//! `handle_timeout`, or one of the commands such as `flush` or `accept`):
//!
//! 1. drain [`poll_event`](AgentSession::poll_event) and act on each event — in
//!    particular a receiver persists its durable epoch on
//!    [`ReceiverEvent::EpochDurable`] *before* step 2 sends the `Flushed` that
//!    announces it;
//! 2. drain [`poll_transmit`](AgentSession::poll_transmit) and write each frame to
//!    the control stream;
//! 3. arm a timer for [`poll_timeout`](AgentSession::poll_timeout) and call
//!    `handle_timeout` when it fires.
//!
//! An `Err` from `handle_*` ends the session: the machine is `Closed`, and the
//! driver closes the connection (a receiver first sends the queued `Reject`).
//! In `Closed` the machines drop any further input silently, as frames the peer
//! sent before it learned of the close may still arrive.
//!
//! # States
//!
//! ```text
//! Agent:     new ──Hello→── Handshaking ──←Welcome── Established ──goodbye()──→ Closed
//!                               │  ←Reject, 15 s timeout,          │ ←Reject, violation
//!                               └──────────── violation ──→ Closed ←┘
//!
//! Receiver:  new ── Handshaking ──←Hello (event)── Handshaking ──accept()──→ Established
//!                     │ (awaiting Hello)           (awaiting accept)  │  ──Welcome→
//!                     │ 15 s timeout, violation, no common version,   │ ←Goodbye, reject(),
//!                     └──────── reject() ──→ Closed ←──────────────────┘   violation
//! ```
//!
//! In `Established` the agent may send `DigestRequest`, `Flush`, `Status` and
//! finally `Goodbye`; the receiver sends `Digests`, `Durable`, `BlockRejected` and
//! `Flushed`. `Block` frames never travel on the control stream.
//!
//! # Flushes and parallel data streams
//!
//! A `Flush { blocks_sent: n }` asks for an answer once the first `n` block frames
//! the agent sent in this session are durable. The receiver can only count: the
//! driver reports how many block frames of the session are durable
//! ([`ReceiverSession::blocks_durable`]) and the machine answers every pending
//! Flush whose `blocks_sent` that count covers. Block frames on different data
//! streams can overtake each other, so a block sent *after* a Flush may be counted
//! while one sent before it is still in flight. The count is therefore sound only
//! if the agent sends no block frame while a Flush is pending — a barrier the
//! driver keeps with [`AgentSession::flushes_pending`] — or uses a single data
//! stream.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::frame::{
    AgentStatus, BlockFrame, BlockRange, Frame, Hello, PitOutcome, Reject, RejectCode, Welcome,
    DIGEST_BLAKE3, MAX_DIGESTS_PER_FRAME, MAX_RANGES_PER_FRAME, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use crate::geometry::VolumeGeometry;
use crate::hash::BlockHash;
use crate::names::ServerName;

/// How long either end waits for the handshake to complete.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Hello sent or awaited; no blocks may travel yet.
    Handshaking,
    /// Welcome exchanged; blocks, digests and flushes travel.
    Established,
    /// Ended, cleanly or not; nothing more is sent.
    Closed,
}

/// Why a session ended abnormally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer sent a frame not valid in this state or direction.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The handshake did not complete within [`HANDSHAKE_TIMEOUT`].
    #[error("handshake timed out after {}s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
    /// The receiver refused or ended the session.
    #[error("rejected by the receiver: {0}")]
    Rejected(Reject),
}

/// What the agent's machine tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The receiver accepted the session; block frames may now be sent.
    Established(Welcome),
    /// The receiver refused or ended the session (also returned as an error).
    Rejected(Reject),
    /// An answer to [`AgentSession::request_digests`].
    Digests {
        /// Index of the first digest's block.
        start: u64,
        /// One digest per block.
        digests: Vec<BlockHash>,
    },
    /// These blocks are on the receiver's stable storage.
    Durable {
        /// The receiver's generation of the volume.
        generation: u64,
        /// The durable blocks.
        ranges: Vec<BlockRange>,
    },
    /// The receiver refused a block frame; the block must be resent.
    BlockRejected {
        /// The refused block.
        index: u64,
        /// The receiver's reason.
        reason: String,
    },
    /// The answer to [`AgentSession::request_pit`].
    PitTaken {
        /// The epoch of the request.
        epoch: u64,
        /// The PIT's id, or why there is none.
        outcome: PitOutcome,
    },
    /// A [`AgentSession::flush`] completed.
    Flushed {
        /// The flush's sequence number.
        seq: u64,
        /// The receiver's generation of the volume.
        generation: u64,
        /// Latest epoch durable on the receiver.
        durable_epoch: u64,
    },
}

/// What the receiver's machine tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// An agent asks to replicate a volume (a common version exists); answer with
    /// [`ReceiverSession::accept`] or [`ReceiverSession::reject`].
    Hello(Hello),
    /// Answer with [`ReceiverSession::send_digests`] (bounds already checked).
    DigestRequest {
        /// First block index.
        start: u64,
        /// Number of blocks.
        count: u32,
    },
    /// The agent asks for a Flushed once `blocks_sent` blocks are durable; the
    /// machine answers it from [`ReceiverSession::blocks_durable`].
    FlushRequested {
        /// The flush's sequence number.
        seq: u64,
        /// Block frames the agent had sent in this session.
        blocks_sent: u64,
        /// The epoch this flush closes, if any.
        close_epoch: Option<u64>,
    },
    /// The agent asked for a PIT of `epoch`, which is durable now (the
    /// [`ReceiverEvent::EpochDurable`] of the same epoch follows): take it, then
    /// answer with [`ReceiverSession::pit_taken`].
    PitDue {
        /// The epoch the PIT must hold.
        epoch: u64,
        /// Label for the PIT.
        label: Option<String>,
    },
    /// This epoch is now durable: persist it before sending the queued Flushed.
    EpochDurable(u64),
    /// The agent reported how replication is going.
    Status(AgentStatus),
    /// The agent ended the session cleanly.
    Goodbye,
}

fn check_ranges(
    ranges: &[BlockRange],
    geometry: &VolumeGeometry,
    kind: &str,
) -> Result<(), String> {
    let count = geometry.block_count();
    match ranges
        .iter()
        .find(|r| r.start.checked_add(r.len as u64).is_none_or(|e| e > count))
    {
        Some(r) => Err(format!(
            "{kind} frame names blocks {}..{} beyond the volume's {count} blocks",
            r.start,
            r.start as u128 + r.len as u128
        )),
        None => Ok(()),
    }
}

// ------------------------------------------------------------------ agent

/// The agent's end of a session's control stream.
#[derive(Debug)]
pub struct AgentSession {
    state: SessionState,
    hello: Hello,
    welcome: Option<Welcome>,
    deadline: Option<Instant>,
    transmit: VecDeque<Frame>,
    /// Commands issued before the Welcome, sent once it arrives.
    deferred: Vec<Frame>,
    events: VecDeque<AgentEvent>,
    blocks_sent: u64,
    next_seq: u64,
    /// The epoch of the PIT request awaiting its PitTaken.
    pit_pending: Option<u64>,
    /// Flush sequence numbers sent and not yet answered, oldest first.
    pending_flushes: VecDeque<u64>,
    /// Digest requests sent and not yet answered.
    pending_digests: Vec<(u64, u32)>,
}

impl AgentSession {
    /// Starts a session: queues `hello` and starts the handshake timer.
    pub fn new(hello: Hello, now: Instant) -> Self {
        AgentSession {
            state: SessionState::Handshaking,
            transmit: VecDeque::from([Frame::Hello(hello.clone())]),
            hello,
            welcome: None,
            deadline: Some(now + HANDSHAKE_TIMEOUT),
            deferred: Vec::new(),
            events: VecDeque::new(),
            blocks_sent: 0,
            next_seq: 1,
            pit_pending: None,
            pending_flushes: VecDeque::new(),
            pending_digests: Vec::new(),
        }
    }

    fn violation(&mut self, msg: String) -> Result<(), SessionError> {
        self.close();
        Err(SessionError::Protocol(msg))
    }

    fn close(&mut self) {
        self.state = SessionState::Closed;
        self.deadline = None;
        self.deferred.clear();
    }

    /// Feeds a frame read from the control stream.
    pub fn handle_frame(&mut self, frame: Frame, _now: Instant) -> Result<(), SessionError> {
        let state = self.state;
        let kind = frame.kind();
        match (state, frame) {
            (SessionState::Closed, _) => Ok(()),
            (_, Frame::Reject(r)) => {
                self.close();
                self.events.push_back(AgentEvent::Rejected(r.clone()));
                Err(SessionError::Rejected(r))
            }
            (_, Frame::Block(_)) => self.violation("Block frame on the control stream".into()),
            (
                _,
                Frame::Hello(_)
                | Frame::DigestRequest { .. }
                | Frame::Flush { .. }
                | Frame::Goodbye
                | Frame::Status(_)
                | Frame::PitRequest { .. },
            ) => self.violation(format!("{kind} frame is not sent to an agent")),
            (SessionState::Handshaking, Frame::Welcome(w)) => {
                if w.version < self.hello.min_version || w.version > self.hello.max_version {
                    return self.violation(format!(
                        "Welcome frame chose version {} outside the offered {}..={}",
                        w.version, self.hello.min_version, self.hello.max_version
                    ));
                }
                if w.geometry != self.hello.geometry {
                    return self.violation(format!(
                        "Welcome frame geometry ({}) differs from Hello geometry ({})",
                        w.geometry, self.hello.geometry
                    ));
                }
                self.state = SessionState::Established;
                self.deadline = None;
                self.transmit.extend(self.deferred.drain(..));
                self.events.push_back(AgentEvent::Established(w.clone()));
                self.welcome = Some(w);
                Ok(())
            }
            (SessionState::Handshaking, _) => {
                self.violation(format!("{kind} frame before Welcome"))
            }
            (SessionState::Established, Frame::Welcome(_)) => {
                self.violation("second Welcome frame".into())
            }
            (SessionState::Established, Frame::Digests { start, digests }) => {
                let Some(i) = self
                    .pending_digests
                    .iter()
                    .position(|&(s, c)| s == start && c as usize == digests.len())
                else {
                    return self.violation(format!(
                        "Digests frame for {} blocks from {start} answers no DigestRequest",
                        digests.len()
                    ));
                };
                self.pending_digests.swap_remove(i);
                self.events
                    .push_back(AgentEvent::Digests { start, digests });
                Ok(())
            }
            (SessionState::Established, Frame::Durable { generation, ranges }) => {
                if let Err(m) = check_ranges(&ranges, &self.hello.geometry, kind) {
                    return self.violation(m);
                }
                self.events
                    .push_back(AgentEvent::Durable { generation, ranges });
                Ok(())
            }
            (SessionState::Established, Frame::BlockRejected { index, reason }) => {
                if !self.hello.geometry.contains(index) {
                    return self.violation(format!(
                        "BlockRejected frame names block {index} beyond the volume's {} blocks",
                        self.hello.geometry.block_count()
                    ));
                }
                self.events
                    .push_back(AgentEvent::BlockRejected { index, reason });
                Ok(())
            }
            (SessionState::Established, Frame::PitTaken { epoch, outcome }) => {
                if self.pit_pending != Some(epoch) {
                    return self.violation(format!(
                        "PitTaken frame for epoch {epoch} but the PIT requested is {:?}",
                        self.pit_pending
                    ));
                }
                self.pit_pending = None;
                self.events
                    .push_back(AgentEvent::PitTaken { epoch, outcome });
                Ok(())
            }
            (
                SessionState::Established,
                Frame::Flushed {
                    seq,
                    generation,
                    durable_epoch,
                },
            ) => {
                if self.pending_flushes.front() != Some(&seq) {
                    return self.violation(format!(
                        "Flushed frame for seq {seq} but the oldest pending Flush is {:?}",
                        self.pending_flushes.front()
                    ));
                }
                self.pending_flushes.pop_front();
                self.events.push_back(AgentEvent::Flushed {
                    seq,
                    generation,
                    durable_epoch,
                });
                Ok(())
            }
        }
    }

    /// Fires the handshake timer if `now` has passed it.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        match self.deadline {
            Some(d) if now >= d && self.state == SessionState::Handshaking => {
                self.close();
                Err(SessionError::Timeout)
            }
            _ => Ok(()),
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// The next frame to write to the control stream.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    fn queue(&mut self, frame: Frame) {
        match self.state {
            SessionState::Handshaking => self.deferred.push(frame),
            SessionState::Established => self.transmit.push_back(frame),
            SessionState::Closed => {}
        }
    }

    /// Asks for the receiver's digests of `count` blocks from `start`, in requests
    /// of at most [`MAX_DIGESTS_PER_FRAME`]; answers arrive as
    /// [`AgentEvent::Digests`]. Before the Welcome the requests wait for it.
    pub fn request_digests(&mut self, start: u64, count: u32) {
        let mut s = start;
        let mut left = count;
        while left > 0 {
            let n = left.min(MAX_DIGESTS_PER_FRAME);
            self.pending_digests.push((s, n));
            self.queue(Frame::DigestRequest { start: s, count: n });
            s = s.saturating_add(n as u64);
            left -= n;
        }
    }

    /// Counts one block frame written to a data stream; returns the session total.
    pub fn note_block_sent(&mut self) -> u64 {
        self.blocks_sent += 1;
        self.blocks_sent
    }

    /// Block frames sent in this session so far.
    pub fn blocks_sent(&self) -> u64 {
        self.blocks_sent
    }

    /// Queues a Flush covering every block frame sent so far, closing
    /// `close_epoch` if given; returns its sequence number, echoed by
    /// [`AgentEvent::Flushed`]. See the module docs on the send barrier.
    pub fn flush(&mut self, close_epoch: Option<u64>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.state != SessionState::Closed {
            self.pending_flushes.push_back(seq);
        }
        self.queue(Frame::Flush {
            seq,
            blocks_sent: self.blocks_sent,
            close_epoch,
        });
        seq
    }

    /// Asks for a PIT once `epoch` is durable: call it right before the
    /// [`flush`](Self::flush) that closes `epoch`. The answer arrives as
    /// [`AgentEvent::PitTaken`], after the flush's `Flushed`. One request at a
    /// time: a second one before the answer is refused (returns `false`).
    pub fn request_pit(&mut self, epoch: u64, label: Option<String>) -> bool {
        if self.pit_pending.is_some() || self.state == SessionState::Closed {
            return false;
        }
        self.pit_pending = Some(epoch);
        self.queue(Frame::PitRequest { epoch, label });
        true
    }

    /// The epoch of a PIT request not yet answered.
    pub fn pit_pending(&self) -> Option<u64> {
        self.pit_pending
    }

    /// Queues a [`Frame::Status`] report for the receiver. Before the Welcome
    /// only the latest report waits for it (an older one would be stale by then);
    /// after `goodbye` it is dropped.
    pub fn report_status(&mut self, status: AgentStatus) {
        if self.state == SessionState::Handshaking {
            self.deferred.retain(|f| !matches!(f, Frame::Status(_)));
        }
        self.queue(Frame::Status(status));
    }

    /// Flushes sent and not yet answered.
    pub fn flushes_pending(&self) -> usize {
        self.pending_flushes.len()
    }

    /// Queues a Goodbye and closes the session.
    pub fn goodbye(&mut self) {
        if self.state != SessionState::Closed {
            self.transmit.push_back(Frame::Goodbye);
            self.close();
        }
    }

    /// Where the session is.
    pub fn state(&self) -> SessionState {
        self.state
    }

    /// The receiver's Welcome, once established.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// The Hello this session started with.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }
}

// --------------------------------------------------------------- receiver

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitAccept,
    Established,
    Closed,
}

/// A Flush received and not yet answered.
#[derive(Debug, Clone, Copy)]
struct PendingFlush {
    seq: u64,
    blocks_sent: u64,
    close_epoch: Option<u64>,
}

/// The receiver's end of a session's control stream.
#[derive(Debug)]
pub struct ReceiverSession {
    server: ServerName,
    phase: Phase,
    min_version: u16,
    max_version: u16,
    hello: Option<Hello>,
    version: u16,
    geometry: Option<VolumeGeometry>,
    durable_epoch: u64,
    deadline: Option<Instant>,
    transmit: VecDeque<Frame>,
    events: VecDeque<ReceiverEvent>,
    blocks_received: u64,
    durable_count: u64,
    pending_flushes: VecDeque<PendingFlush>,
    last_flush: Option<(u64, u64)>,
    last_close_epoch: Option<u64>,
    /// A PIT requested for an epoch not yet durable: (epoch, label).
    pit_request: Option<(u64, Option<String>)>,
    /// A PIT due (its epoch durable) whose PitTaken is not yet queued.
    pit_due: Option<u64>,
}

impl ReceiverSession {
    /// A session with an agent authenticated as `server`, speaking protocol
    /// versions [`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`].
    pub fn new(server: ServerName, now: Instant) -> Self {
        Self::with_versions(server, now, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
    }

    /// As [`new`](Self::new), speaking versions `min..=max` (for tests of
    /// negotiation between builds).
    pub fn with_versions(server: ServerName, now: Instant, min: u16, max: u16) -> Self {
        ReceiverSession {
            server,
            phase: Phase::AwaitHello,
            min_version: min,
            max_version: max,
            hello: None,
            version: 0,
            geometry: None,
            durable_epoch: 0,
            deadline: Some(now + HANDSHAKE_TIMEOUT),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            blocks_received: 0,
            durable_count: 0,
            pending_flushes: VecDeque::new(),
            last_flush: None,
            last_close_epoch: None,
            pit_request: None,
            pit_due: None,
        }
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.deadline = None;
        self.pending_flushes.clear();
    }

    fn refuse(&mut self, code: RejectCode, message: String) {
        self.transmit
            .push_back(Frame::Reject(Reject { code, message }));
        self.close();
    }

    /// Ends the session for a violation: queues a Reject naming it, returns the error.
    fn violation(&mut self, msg: String) -> Result<(), SessionError> {
        self.refuse(RejectCode::Protocol, msg.clone());
        Err(SessionError::Protocol(msg))
    }

    /// Feeds a frame read from the control stream.
    pub fn handle_frame(&mut self, frame: Frame, _now: Instant) -> Result<(), SessionError> {
        let kind = frame.kind();
        match (self.phase, frame) {
            (Phase::Closed, _) => Ok(()),
            (_, Frame::Block(_)) => self.violation("Block frame on the control stream".into()),
            (
                _,
                Frame::Welcome(_)
                | Frame::Reject(_)
                | Frame::Digests { .. }
                | Frame::Durable { .. }
                | Frame::BlockRejected { .. }
                | Frame::Flushed { .. }
                | Frame::PitTaken { .. },
            ) => self.violation(format!("{kind} frame is not sent to a receiver")),
            (Phase::AwaitHello, Frame::Hello(h)) => self.on_hello(h),
            (Phase::AwaitHello, _) => self.violation(format!("{kind} frame before Hello")),
            (_, Frame::Hello(_)) => self.violation("second Hello frame".into()),
            (_, Frame::Goodbye) => {
                self.close();
                self.events.push_back(ReceiverEvent::Goodbye);
                Ok(())
            }
            (Phase::AwaitAccept, _) => self.violation(format!("{kind} frame before Welcome")),
            (Phase::Established, Frame::PitRequest { epoch, label }) => {
                if let Some(e) = self.pit_request.as_ref().map(|r| r.0).or(self.pit_due) {
                    return self.violation(format!(
                        "PitRequest frame for epoch {epoch} while the PIT of epoch {e} is outstanding"
                    ));
                }
                let closed = self.last_close_epoch.unwrap_or(0).max(self.durable_epoch);
                if epoch <= closed {
                    return self.violation(format!(
                        "PitRequest frame for epoch {epoch}, but epoch {closed} is already closed"
                    ));
                }
                self.pit_request = Some((epoch, label));
                Ok(())
            }
            (Phase::Established, Frame::Status(st)) => {
                self.events.push_back(ReceiverEvent::Status(st));
                Ok(())
            }
            (Phase::Established, Frame::DigestRequest { start, count }) => {
                let blocks = self.geometry.map_or(0, |g| g.block_count());
                if count > MAX_DIGESTS_PER_FRAME
                    || start
                        .checked_add(count as u64)
                        .is_none_or(|end| end > blocks)
                {
                    return self.violation(format!(
                        "DigestRequest frame for {count} blocks from {start} exceeds the volume's {blocks} blocks"
                    ));
                }
                self.events
                    .push_back(ReceiverEvent::DigestRequest { start, count });
                Ok(())
            }
            (
                Phase::Established,
                Frame::Flush {
                    seq,
                    blocks_sent,
                    close_epoch,
                },
            ) => {
                if let Some((last_seq, last_sent)) = self.last_flush {
                    if seq <= last_seq || blocks_sent < last_sent {
                        return self.violation(format!(
                            "Flush frame seq {seq} blocks_sent {blocks_sent} after seq {last_seq} blocks_sent {last_sent}"
                        ));
                    }
                }
                if let (Some(e), Some(last)) = (close_epoch, self.last_close_epoch) {
                    if e <= last {
                        return self
                            .violation(format!("Flush frame closes epoch {e} after epoch {last}"));
                    }
                }
                if let (Some(e), Some((r, _))) = (close_epoch, &self.pit_request) {
                    if e != *r {
                        return self.violation(format!(
                            "Flush frame closes epoch {e}, but a PIT was requested for epoch {r}"
                        ));
                    }
                }
                self.last_flush = Some((seq, blocks_sent));
                if close_epoch.is_some() {
                    self.last_close_epoch = close_epoch;
                }
                self.pending_flushes.push_back(PendingFlush {
                    seq,
                    blocks_sent,
                    close_epoch,
                });
                self.events.push_back(ReceiverEvent::FlushRequested {
                    seq,
                    blocks_sent,
                    close_epoch,
                });
                Ok(())
            }
        }
    }

    fn on_hello(&mut self, h: Hello) -> Result<(), SessionError> {
        if h.min_version > h.max_version {
            return self.violation(format!(
                "Hello frame offers an empty version range {}..={}",
                h.min_version, h.max_version
            ));
        }
        let lo = h.min_version.max(self.min_version);
        let hi = h.max_version.min(self.max_version);
        if lo > hi {
            self.refuse(
                RejectCode::UnsupportedVersion,
                format!(
                    "agent speaks protocol versions {}..={}, this receiver {}..={}",
                    h.min_version, h.max_version, self.min_version, self.max_version
                ),
            );
            return Ok(());
        }
        if h.digest_algorithm != DIGEST_BLAKE3 {
            self.refuse(
                RejectCode::Protocol,
                format!(
                    "digest algorithm {} is not supported (1 = BLAKE3)",
                    h.digest_algorithm
                ),
            );
            return Ok(());
        }
        self.version = hi;
        self.phase = Phase::AwaitAccept;
        self.hello = Some(h.clone());
        self.events.push_back(ReceiverEvent::Hello(h));
        Ok(())
    }

    /// Fires the handshake timer if `now` has passed it.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        match self.deadline {
            Some(d) if now >= d && self.state() == SessionState::Handshaking => {
                self.close();
                Err(SessionError::Timeout)
            }
            _ => Ok(()),
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// The next frame to write to the control stream.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// Accepts the Hello: queues a Welcome with the negotiated version.
    ///
    /// `geometry` must equal the Hello's (after a resize, the new one); if it does
    /// not, the machine queues `Reject(GeometryMismatch)` instead and closes. Does
    /// nothing unless a Hello awaits an answer.
    pub fn accept(
        &mut self,
        volume_id: [u8; 16],
        generation: u64,
        durable_epoch: u64,
        geometry: VolumeGeometry,
    ) {
        if self.phase != Phase::AwaitAccept {
            return;
        }
        let Some(hello) = &self.hello else { return };
        if hello.geometry != geometry {
            let msg = format!(
                "volume {} is {} here but {} on the agent",
                hello.volume, geometry, hello.geometry
            );
            self.refuse(RejectCode::GeometryMismatch, msg);
            return;
        }
        self.phase = Phase::Established;
        self.deadline = None;
        self.geometry = Some(geometry);
        self.durable_epoch = durable_epoch;
        self.transmit.push_back(Frame::Welcome(Welcome {
            version: self.version,
            server: self.server.clone(),
            volume_id,
            generation,
            durable_epoch,
            geometry,
        }));
    }

    /// Queues a Reject and closes the session.
    pub fn reject(&mut self, code: RejectCode, message: impl Into<String>) {
        if self.phase != Phase::Closed {
            self.refuse(code, message.into());
        }
    }

    /// Answers a [`ReceiverEvent::DigestRequest`], in frames of at most
    /// [`MAX_DIGESTS_PER_FRAME`] digests.
    pub fn send_digests(&mut self, start: u64, digests: Vec<BlockHash>) {
        if self.phase != Phase::Established {
            return;
        }
        if digests.len() <= MAX_DIGESTS_PER_FRAME as usize {
            self.transmit.push_back(Frame::Digests { start, digests });
            return;
        }
        for (i, chunk) in digests.chunks(MAX_DIGESTS_PER_FRAME as usize).enumerate() {
            self.transmit.push_back(Frame::Digests {
                start: start.saturating_add(i as u64 * MAX_DIGESTS_PER_FRAME as u64),
                digests: chunk.to_vec(),
            });
        }
    }

    /// Checks a Block frame read from a data stream against the session: the
    /// session is established, the index lies in the volume, and `raw_len` is the
    /// block's length there. Does not change the machine.
    pub fn validate_block(&self, block: &BlockFrame) -> Result<(), SessionError> {
        let Some(g) = self.geometry.filter(|_| self.phase == Phase::Established) else {
            return Err(SessionError::Protocol(format!(
                "Block frame for block {} before Welcome",
                block.index
            )));
        };
        if !g.contains(block.index) {
            return Err(SessionError::Protocol(format!(
                "Block frame for block {} beyond the volume's {} blocks",
                block.index,
                g.block_count()
            )));
        }
        if block.raw_len != g.block_len(block.index) {
            return Err(SessionError::Protocol(format!(
                "Block frame for block {}: raw_len {} but the block is {} bytes",
                block.index,
                block.raw_len,
                g.block_len(block.index)
            )));
        }
        Ok(())
    }

    /// Counts one valid Block frame read from any data stream; returns the
    /// session total.
    pub fn block_received(&mut self, _index: u64) -> u64 {
        self.blocks_received += 1;
        self.blocks_received
    }

    /// Block frames counted by [`block_received`](Self::block_received).
    pub fn blocks_received(&self) -> u64 {
        self.blocks_received
    }

    /// Reports that `ranges` are on stable storage and that `durable_count` block
    /// frames of this session are now durable.
    ///
    /// Queues `Durable` frames (at most [`MAX_RANGES_PER_FRAME`] ranges each), then
    /// answers, oldest first, every pending Flush with `blocks_sent <=
    /// durable_count`. A Flush closing epoch `e` raises the durable epoch to `e`
    /// and emits [`ReceiverEvent::EpochDurable`] before its Flushed is queued.
    /// Call it with no ranges to answer flushes covered by earlier ones.
    pub fn blocks_durable(&mut self, generation: u64, ranges: Vec<BlockRange>, durable_count: u64) {
        if self.phase != Phase::Established {
            return;
        }
        for chunk in ranges.chunks(MAX_RANGES_PER_FRAME as usize) {
            self.transmit.push_back(Frame::Durable {
                generation,
                ranges: chunk.to_vec(),
            });
        }
        self.durable_count = self.durable_count.max(durable_count);
        while let Some(f) = self.pending_flushes.front().copied() {
            if f.blocks_sent > self.durable_count {
                break;
            }
            self.pending_flushes.pop_front();
            if let Some(e) = f.close_epoch {
                if e > self.durable_epoch {
                    self.durable_epoch = e;
                    if self.pit_request.as_ref().is_some_and(|r| r.0 == e) {
                        let (epoch, label) = self.pit_request.take().expect("checked");
                        self.pit_due = Some(epoch);
                        self.events
                            .push_back(ReceiverEvent::PitDue { epoch, label });
                    }
                    self.events.push_back(ReceiverEvent::EpochDurable(e));
                }
            }
            self.transmit.push_back(Frame::Flushed {
                seq: f.seq,
                generation,
                durable_epoch: self.durable_epoch,
            });
        }
    }

    /// Answers the [`ReceiverEvent::PitDue`] of `epoch` (ignored for any other
    /// epoch, e.g. after the session was closed).
    pub fn pit_taken(&mut self, epoch: u64, outcome: PitOutcome) {
        if self.phase == Phase::Established && self.pit_due == Some(epoch) {
            self.pit_due = None;
            self.transmit.push_back(Frame::PitTaken { epoch, outcome });
        }
    }

    /// The epoch of a PIT due and not yet answered.
    pub fn pit_due(&self) -> Option<u64> {
        self.pit_due
    }

    /// Queues a BlockRejected naming `index`, so the agent resends it.
    pub fn block_rejected(&mut self, index: u64, reason: String) {
        if self.phase == Phase::Established {
            self.transmit
                .push_back(Frame::BlockRejected { index, reason });
        }
    }

    /// Where the session is.
    pub fn state(&self) -> SessionState {
        match self.phase {
            Phase::AwaitHello | Phase::AwaitAccept => SessionState::Handshaking,
            Phase::Established => SessionState::Established,
            Phase::Closed => SessionState::Closed,
        }
    }

    /// The agent's Hello, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// The negotiated protocol version, once a Hello was accepted.
    pub fn version(&self) -> Option<u16> {
        (self.hello.is_some()).then_some(self.version)
    }

    /// Latest epoch known durable (from `accept`, raised by closing flushes).
    pub fn durable_epoch(&self) -> u64 {
        self.durable_epoch
    }
}
