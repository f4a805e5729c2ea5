//! Agent protocol: a byte stream from either peer (a host client talking to the agent, or
//! a guest answering the host client) through `read_frame`, delivered in chunks of any
//! size, and each frame's JSON payload through the message type its kind carries.
#![no_main]

use std::io::{self, Read};

use guest_init::proto::{
    read_frame, write_frame, ErrorBody, ExecResponse, FileStat, FrameKind, ListResponse,
    PingResponse, ReadFileResponse, Ready, Request, SignalRequest, WriteFileResponse, MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;

/// A stream that hands out at most `chunk` bytes per read, as a socket may.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Parses a payload the way the receiving side would for this kind.
fn parse_payload(frame: &guest_init::proto::Frame) {
    match frame.kind {
        FrameKind::Request => {
            if let Ok(request) = frame.json::<Request>() {
                let _ = request.op();
            }
        }
        FrameKind::Signal => {
            let _ = frame.json::<SignalRequest>();
        }
        FrameKind::Response => {
            if let Ok(ExecResponse::Exit(status)) = frame.json::<ExecResponse>() {
                let _ = (status.success(), status.shell_code());
            }
            let _ = frame.json::<PingResponse>();
            let _ = frame.json::<WriteFileResponse>();
            let _ = frame.json::<ReadFileResponse>();
            let _ = frame.json::<FileStat>();
            let _ = frame.json::<ListResponse>();
        }
        FrameKind::Error => {
            if let Ok(body) = frame.json::<ErrorBody>() {
                let _ = body.code.to_string();
            }
        }
        FrameKind::Ready => {
            let _ = frame.json::<Ready>();
        }
        FrameKind::Stdin | FrameKind::Stdout | FrameKind::Stderr | FrameKind::Data => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut reader = Chunked {
        data: stream,
        chunk: usize::from(chunk).max(1),
    };
    while let Ok(Some(frame)) = read_frame(&mut reader) {
        assert!(frame.payload.len() <= MAX_PAYLOAD);
        parse_payload(&frame);
        // What was read writes back to the same bytes and reads back to the same frame.
        let mut wire = Vec::new();
        write_frame(&mut wire, frame.kind, &frame.payload).expect("a frame that was read fits");
        let again = read_frame(&mut wire.as_slice()).expect("rereads");
        assert_eq!(again.as_ref(), Some(&frame));
    }
});
