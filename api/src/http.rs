//! HTTP/1.1 framing for the API socket, both ends: request heads and response heads are
//! parsed by `httparse`; this module only frames bodies by `Content-Length`, caps sizes, and
//! writes the few response shapes the API uses. Chunked bodies are refused: the API's
//! clients (curl, Firecracker SDKs, emberctl) send `Content-Length`.

use std::io::{self, Read, Write};

/// The largest request or response head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The largest request body accepted; every API body is a small JSON object.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The largest response body the client accepts (`GET /vm/config` is a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
const MAX_HEADERS: usize = 32;

/// Why a request or response could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("malformed HTTP: {0}")]
    Malformed(String),
    #[error("the message head is over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the body is {0} bytes; the limit is {1} bytes")]
    BodyTooLarge(usize, usize),
    #[error("the peer closed the connection {got} bytes into a {expected}-byte body")]
    TruncatedBody { got: usize, expected: usize },
}

impl HttpError {
    /// True when the peer is gone and nothing should be written back.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            HttpError::Closed | HttpError::Io(_) | HttpError::TruncatedBody { .. }
        )
    }
}

/// A request as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without any query string.
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// A response: a status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
}

impl Response {
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            body: Some(body),
        }
    }

    /// A failure with Firecracker's `{"fault_message": ...}` body.
    pub fn fault(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        Self::json(status, body)
    }

    /// Writes the response; `close` adds `Connection: close`.
    pub fn write_to(&self, out: &mut impl Write, close: bool) -> io::Result<()> {
        let body = self.body.as_deref().unwrap_or("");
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        head += "Server: ember\r\n";
        if self.body.is_some() {
            head += "Content-Type: application/json\r\n";
        }
        if self.status != 204 {
            head += &format!("Content-Length: {}\r\n", body.len());
        }
        if close {
            head += "Connection: close\r\n";
        }
        head += "\r\n";
        out.write_all(head.as_bytes())?;
        out.write_all(body.as_bytes())?;
        out.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// One end of an HTTP connection: the stream and the bytes read past the last message.
pub struct Connection<S> {
    stream: S,
    buffer: Vec<u8>,
}

impl<S: Read + Write> Connection<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buffer: Vec::new(),
        }
    }

    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Reads the next request; [`HttpError::Closed`] when the client hung up between
    /// requests.
    pub fn read_request(&mut self) -> Result<Request, HttpError> {
        let head_len = self.read_head()?;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let status = parsed
            .parse(&self.buffer[..head_len])
            .map_err(|e| HttpError::Malformed(e.to_string()))?;
        if status.is_partial() {
            return Err(HttpError::Malformed("incomplete request head".into()));
        }
        let method = parsed.method.unwrap_or_default().to_string();
        let target = parsed.path.unwrap_or_default();
        let path = target.split('?').next().unwrap_or_default().to_string();
        let framing = Framing::from_headers(parsed.headers)?;
        let close = framing.close || parsed.version == Some(0);
        let body = self.read_body(head_len, framing.length, MAX_BODY_BYTES)?;
        Ok(Request {
            method,
            path,
            body,
            close,
        })
    }

    /// Reads the next response: (status, body).
    pub fn read_response(&mut self) -> Result<(u16, Vec<u8>), HttpError> {
        let head_len = self.read_head()?;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed
            .parse(&self.buffer[..head_len])
            .map_err(|e| HttpError::Malformed(e.to_string()))?;
        let status = parsed.code.unwrap_or_default();
        let framing = Framing::from_headers(parsed.headers)?;
        let body = self.read_body(head_len, framing.length, MAX_RESPONSE_BYTES)?;
        Ok((status, body))
    }

    /// Reads until the buffer holds a whole head; returns its length, CRLFCRLF included.
    fn read_head(&mut self) -> Result<usize, HttpError> {
        loop {
            if let Some(end) = find_head_end(&self.buffer) {
                return Ok(end);
            }
            if self.buffer.len() > MAX_HEAD_BYTES {
                return Err(HttpError::HeadTooLarge);
            }
            if self.fill()? == 0 {
                return Err(if self.buffer.iter().all(u8::is_ascii_whitespace) {
                    HttpError::Closed
                } else {
                    HttpError::Malformed("the connection ended inside a message head".into())
                });
            }
        }
    }

    /// Takes the head and a `length`-byte body out of the buffer, reading what is missing.
    fn read_body(
        &mut self,
        head_len: usize,
        length: usize,
        limit: usize,
    ) -> Result<Vec<u8>, HttpError> {
        self.buffer.drain(..head_len);
        if length > limit {
            return Err(HttpError::BodyTooLarge(length, limit));
        }
        while self.buffer.len() < length {
            if self.fill()? == 0 {
                return Err(HttpError::TruncatedBody {
                    got: self.buffer.len(),
                    expected: length,
                });
            }
        }
        Ok(self.buffer.drain(..length).collect())
    }

    fn fill(&mut self) -> Result<usize, HttpError> {
        let mut chunk = [0u8; 4096];
        let n = loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(HttpError::Io(e)),
            }
        };
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

fn find_head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// What the headers say about the body and the connection.
struct Framing {
    length: usize,
    close: bool,
}

impl Framing {
    fn from_headers(headers: &[httparse::Header]) -> Result<Self, HttpError> {
        let mut framing = Framing {
            length: 0,
            close: false,
        };
        let mut seen_length = false;
        for header in headers {
            let value = std::str::from_utf8(header.value)
                .map_err(|_| HttpError::Malformed(format!("header {} is not text", header.name)))?
                .trim();
            if header.name.eq_ignore_ascii_case("content-length") {
                let length = value.parse().map_err(|_| {
                    HttpError::Malformed(format!("Content-Length {value:?} is not a number"))
                })?;
                if seen_length && length != framing.length {
                    return Err(HttpError::Malformed("conflicting Content-Length".into()));
                }
                framing.length = length;
                seen_length = true;
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(HttpError::Malformed(
                    "Transfer-Encoding is not supported; send Content-Length".into(),
                ));
            } else if header.name.eq_ignore_ascii_case("connection") {
                framing.close = value.eq_ignore_ascii_case("close");
            }
        }
        Ok(framing)
    }
}

/// Writes a request with an optional JSON body.
pub fn write_request(
    out: &mut impl Write,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<()> {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(body) = body {
        head += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head += "\r\n";
    out.write_all(head.as_bytes())?;
    out.write_all(body.unwrap_or("").as_bytes())?;
    out.flush()
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
