//! File transfers: uploads from any `Read`, downloads into any `Write`, in DATA frames, with
//! a progress callback.

use std::io::{self, Read, Write};

use guest_init::proto::{
    self, FrameKind, ReadFileResponse, Request, WriteFileRequest, WriteFileResponse, DATA_CHUNK,
};

use super::{expect_kind, AgentClient, AgentError, Result};

/// How `write_file` creates the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits (default 0o644).
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub mkdirs: bool,
}

/// What a download brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Download {
    /// Bytes received (what the file held when read).
    pub bytes: u64,
    /// The size the guest announced (files in /proc announce 0).
    pub size: u64,
    /// The file's permission bits in the guest.
    pub mode: u32,
}

impl AgentClient {
    /// Uploads `source` to `path` in the guest; the file appears whole or not at all.
    /// `progress` gets the number of bytes sent so far. Returns the bytes written.
    pub fn write_file(
        &self,
        path: &str,
        mut source: impl Read,
        options: WriteOptions,
        mut progress: impl FnMut(u64),
    ) -> Result<u64> {
        const OP: &str = "write_file";
        let request = Request::WriteFile(WriteFileRequest {
            path: path.into(),
            mode: options.mode,
            mkdirs: options.mkdirs,
        });
        let mut conn = self.send_request(OP, &request)?;
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut sent = 0u64;
        loop {
            let n = read_some(&mut source, &mut buf).map_err(|error| AgentError::Local {
                what: format!("cannot read the data for {path}"),
                error,
            })?;
            if let Err(e) = proto::write_frame(&mut conn, FrameKind::Data, &buf[..n]) {
                return Err(self.failure_after_send(&mut conn, OP, e));
            }
            if n == 0 {
                break;
            }
            sent += n as u64;
            progress(sent);
        }
        let reply: WriteFileResponse = self.expect_response(&mut conn, OP)?;
        Ok(reply.written)
    }

    /// Downloads `path` from the guest into `dest`. `progress` gets the bytes received so
    /// far and the size the guest announced.
    pub fn read_file(
        &self,
        path: &str,
        mut dest: impl Write,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Download> {
        const OP: &str = "read_file";
        let request = Request::ReadFile(proto::PathRequest { path: path.into() });
        let mut conn = self.send_request(OP, &request)?;
        let header: ReadFileResponse = self.expect_response(&mut conn, OP)?;
        let mut bytes = 0u64;
        loop {
            let frame = self.read_reply(&mut conn, OP)?;
            expect_kind(&frame, FrameKind::Data, OP)?;
            if frame.payload.is_empty() {
                break;
            }
            dest.write_all(&frame.payload)
                .map_err(|error| AgentError::Local {
                    what: format!("cannot store the contents of {path}"),
                    error,
                })?;
            bytes += frame.payload.len() as u64;
            progress(bytes, header.size);
        }
        dest.flush().map_err(|error| AgentError::Local {
            what: format!("cannot store the contents of {path}"),
            error,
        })?;
        Ok(Download {
            bytes,
            size: header.size,
            mode: header.mode,
        })
    }
}

/// One read, retried on EINTR; 0 is the end of the source.
fn read_some(source: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match source.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}
