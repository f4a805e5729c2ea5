//! A small client for Ember's API socket: one HTTP/1.1 request per connection over a Unix
//! socket, framed by [`crate::http`].

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::http::{self, Connection, HttpError};

/// How long connecting and each answer may take: a VMM answers in milliseconds, but
/// InstanceStart in a slow nested test bed can take seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything that can go wrong talking to the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}: {error}; is ember running with --api-sock {path}?")]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot send the request to {path}: {error}")]
    Send {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read the answer from {path}: {error}")]
    Receive { path: PathBuf, error: HttpError },
}

/// An answer: the status and the body (JSON or empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `fault_message` of a failure, or the raw body when it has none.
    pub fn fault_message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
            .unwrap_or_else(|| self.body.clone())
    }
}

/// Where the API socket is.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `method path` with an optional JSON body and returns the answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<ApiResponse, ClientError> {
        let stream = UnixStream::connect(&self.path).map_err(|error| ClientError::Connect {
            path: self.path.clone(),
            error,
        })?;
        let send_err = |error| ClientError::Send {
            path: self.path.clone(),
            error,
        };
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(send_err)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(send_err)?;
        let mut conn = Connection::new(stream);
        http::write_request(conn.stream(), method, path, body).map_err(send_err)?;
        let (status, body) = conn.read_response().map_err(|error| ClientError::Receive {
            path: self.path.clone(),
            error,
        })?;
        Ok(ApiResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
