//! The host side's opening line: a program that connects to the device's Unix socket first
//! writes `CONNECT <port>\n` to name the guest port it wants.
//!
//! The line is read one byte at a time so that nothing after the newline (the connection's
//! first bytes) is consumed here. It is at most [`MAX_LINE`] bytes; anything else (a longer
//! line, another word, a port that is not a decimal u32) closes the client's socket.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Longest opening line, newline included (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_LINE: usize = 32;

/// Why an opening line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("the line is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the line is not `CONNECT <port>`")]
    NotConnect,
    #[error("the port is not a number from 0 to 4294967295")]
    BadPort,
}

/// Parses a line without its newline: `CONNECT <port>`, port in decimal.
pub fn parse_connect(line: &[u8]) -> Result<u32, LineError> {
    if line.len() >= MAX_LINE {
        return Err(LineError::TooLong);
    }
    let port = line
        .strip_prefix(b"CONNECT ")
        .ok_or(LineError::NotConnect)?;
    if port.is_empty() || port.len() > 10 || !port.iter().all(u8::is_ascii_digit) {
        return Err(LineError::BadPort);
    }
    // Ten ASCII digits at most: the text parses as u64 and only the range can fail.
    let value: u64 = std::str::from_utf8(port)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(LineError::BadPort)?;
    u32::try_from(value).map_err(|_| LineError::BadPort)
}

/// Where a client's handshake stands after reading what it sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// The line is not complete yet.
    Waiting,
    /// The client asked for this guest port.
    Connect(u32),
    /// The client closed, failed, or sent a bad line; drop it.
    Failed,
}

/// A host client that has connected but not yet sent its line.
#[derive(Debug)]
pub struct PendingClient {
    pub stream: UnixStream,
    pub deadline: Instant,
    line: [u8; MAX_LINE],
    len: usize,
}

impl PendingClient {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            deadline,
            line: [0; MAX_LINE],
            len: 0,
        }
    }

    /// Reads what the client sent so far, up to the end of its line.
    pub fn read_line(&mut self) -> Progress {
        loop {
            if self.len == MAX_LINE {
                return Progress::Failed;
            }
            let mut byte = [0u8; 1];
            match (&self.stream).read(&mut byte) {
                Ok(0) => return Progress::Failed,
                Ok(_) if byte[0] == b'\n' => {
                    return match parse_connect(&self.line[..self.len]) {
                        Ok(port) => Progress::Connect(port),
                        Err(_) => Progress::Failed,
                    }
                }
                Ok(_) => {
                    self.line[self.len] = byte[0];
                    self.len += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Waiting,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Failed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Ok(1234));
        assert_eq!(parse_connect(b"CONNECT 0"), Ok(0));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Ok(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 0001024"), Ok(1024));
        let bad = [
            (&b"CONNECT 4294967296"[..], LineError::BadPort),
            (b"CONNECT 99999999999", LineError::BadPort),
            (b"CONNECT -1", LineError::BadPort),
            (b"CONNECT +1", LineError::BadPort),
            (b"CONNECT ", LineError::BadPort),
            (b"CONNECT 12 34", LineError::BadPort),
            (b"CONNECT 1234\r", LineError::BadPort),
            (b"CONNECT  1234", LineError::BadPort),
            (b"connect 1234", LineError::NotConnect),
            (b"CONNECT", LineError::NotConnect),
            (b"GET / HTTP/1.1", LineError::NotConnect),
            (b"\xff\xfe garbage", LineError::NotConnect),
            (b"", LineError::NotConnect),
            (&[b'A'; MAX_LINE][..], LineError::TooLong),
        ];
        for (line, expected) in bad {
            assert_eq!(
                parse_connect(line),
                Err(expected),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    fn client() -> (PendingClient, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (PendingClient::new(ours, Instant::now()), theirs)
    }

    #[test]
    fn line_in_pieces_and_data_after_it_stays_in_the_socket() {
        let (mut c, mut peer) = client();
        assert_eq!(c.read_line(), Progress::Waiting);
        peer.write_all(b"CONN").unwrap();
        assert_eq!(c.read_line(), Progress::Waiting);
        peer.write_all(b"ECT 1024\nfirst bytes").unwrap();
        assert_eq!(c.read_line(), Progress::Connect(1024));
        let mut rest = [0u8; 11];
        (&c.stream).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"first bytes");
    }

    #[test]
    fn garbage_long_lines_and_early_close_fail() {
        let (mut c, mut peer) = client();
        peer.write_all(b"HELLO\n").unwrap();
        assert_eq!(c.read_line(), Progress::Failed);
        let (mut c, mut peer) = client();
        peer.write_all(&[b'7'; 100]).unwrap();
        assert_eq!(
            c.read_line(),
            Progress::Failed,
            "no newline within the limit"
        );
        let (mut c, peer) = client();
        drop(peer);
        assert_eq!(c.read_line(), Progress::Failed);
    }
}
