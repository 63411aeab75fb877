//! A minimal blocking NBD client (fixed newstyle, `NBD_OPT_EXPORT_NAME`,
//! simple replies) for load tests that need many writers without starting a
//! qemu-io process per write. One request at a time; every call bounded by
//! the socket timeouts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

/// A connection to one export.
#[derive(Debug)]
pub struct NbdClient {
    sock: TcpStream,
    /// The export's size in bytes.
    pub size: u64,
    next_handle: u64,
}

fn io_err(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

impl NbdClient {
    /// Connects to `addr` and opens `export`.
    pub fn connect(addr: &str, export: &str) -> std::io::Result<NbdClient> {
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        sock.set_write_timeout(Some(Duration::from_secs(30)))?;
        sock.set_nodelay(true)?;
        let mut c = NbdClient {
            sock,
            size: 0,
            next_handle: 1,
        };
        let mut greeting = [0u8; 18];
        c.sock.read_exact(&mut greeting)?;
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if u64::from_be_bytes(greeting[0..8].try_into().unwrap()) != NBDMAGIC
            || u64::from_be_bytes(greeting[8..16].try_into().unwrap()) != IHAVEOPT
            || flags & FLAG_FIXED_NEWSTYLE == 0
        {
            return Err(io_err("not a fixed-newstyle NBD server"));
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE)
            | if no_zeroes {
                u32::from(FLAG_NO_ZEROES)
            } else {
                0
            };
        let mut out = Vec::new();
        out.extend_from_slice(&client_flags.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        out.extend_from_slice(&(export.len() as u32).to_be_bytes());
        out.extend_from_slice(export.as_bytes());
        c.sock.write_all(&out)?;
        let mut reply = [0u8; 10];
        c.sock.read_exact(&mut reply)?;
        c.size = u64::from_be_bytes(reply[0..8].try_into().unwrap());
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            c.sock.read_exact(&mut zeroes)?;
        }
        Ok(c)
    }

    fn request(
        &mut self,
        command: u16,
        offset: u64,
        payload: &[u8],
        length: u32,
    ) -> std::io::Result<()> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut out = Vec::with_capacity(28 + payload.len());
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&handle.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(payload);
        self.sock.write_all(&out)?;
        if command == CMD_DISC {
            return Ok(());
        }
        let mut reply = [0u8; 16];
        self.sock.read_exact(&mut reply)?;
        if u32::from_be_bytes(reply[0..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC
            || u64::from_be_bytes(reply[8..16].try_into().unwrap()) != handle
        {
            return Err(io_err("bad NBD reply"));
        }
        match u32::from_be_bytes(reply[4..8].try_into().unwrap()) {
            0 => Ok(()),
            e => Err(io_err(&format!("NBD error {e}"))),
        }
    }

    /// Writes `data` at `offset` (acknowledged once on the export's disk).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(CMD_WRITE, offset, data, data.len() as u32)
    }

    /// FLUSH: closes an epoch on a Lifeboat agent export.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.request(CMD_FLUSH, 0, &[], 0)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let _ = self.request(CMD_DISC, 0, &[], 0);
    }
}
