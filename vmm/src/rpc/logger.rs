//! Ember's log lines: to stderr as `ember: <message>` (warnings and errors) until
//! `PUT /logger` or the config file's `logger` section names a file or FIFO, then there,
//! filtered by level, with the level and the origin shown when asked.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use api::models::{LogLevel, LoggerConfig};

/// Errors configuring the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("logger.log_path: cannot open {0} for writing: {1}; give a writable file, or a FIFO with a reader")]
    Open(PathBuf, std::io::Error),
}

struct Logger {
    file: Option<File>,
    level: LogLevel,
    show_level: bool,
    show_origin: bool,
}

static LOGGER: Mutex<Logger> = Mutex::new(Logger {
    file: None,
    level: LogLevel::Warning,
    show_level: false,
    show_origin: false,
});

fn logger() -> std::sync::MutexGuard<'static, Logger> {
    // A thread that panicked while logging left nothing half-done worth refusing over.
    LOGGER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applies `PUT /logger` (or the config file's `logger`). Without `log_path` the lines stay
/// where they went before.
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    let file = match &config.log_path {
        Some(path) => Some(
            OpenOptions::new()
                .append(true)
                .create(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| LoggerError::Open(path.clone(), e))?,
        ),
        None => None,
    };
    let mut logger = logger();
    if file.is_some() {
        logger.file = file;
    }
    logger.level = config.level.unwrap_or(LogLevel::Info);
    logger.show_level = config.show_level.unwrap_or(false);
    logger.show_origin = config.show_log_origin.unwrap_or(false);
    Ok(())
}

/// Logs `message` from `origin` (the part of Ember that speaks) at `level`.
pub fn log(level: LogLevel, origin: &str, message: &str) {
    let mut logger = logger();
    if level > logger.level || level == LogLevel::Off {
        return;
    }
    let line = format_line(&logger, level, origin, message);
    match &mut logger.file {
        // A full FIFO drops the line rather than stalling the VMM.
        Some(file) => {
            let _ = file.write_all(line.as_bytes());
        }
        None => eprint!("{line}"),
    }
}

/// Logs only when a log file is set (for messages already printed on stderr).
pub fn log_to_file(level: LogLevel, origin: &str, message: &str) {
    if logger().file.is_some() {
        log(level, origin, message);
    }
}

fn format_line(logger: &Logger, level: LogLevel, origin: &str, message: &str) -> String {
    let mut line = if logger.file.is_some() {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("{}.{:03} ", ms / 1000, ms % 1000)
    } else {
        "ember: ".to_string()
    };
    if logger.show_level {
        line += &format!("[{level:?}] ");
    }
    if logger.show_origin {
        line += &format!("[{origin}] ");
    }
    line += message;
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;

    #[test]
    fn lines_show_level_and_origin_on_request() {
        let logger = Logger {
            file: None,
            level: LogLevel::Info,
            show_level: true,
            show_origin: true,
        };
        assert_eq!(
            format_line(&logger, LogLevel::Warning, "api", "refused"),
            "ember: [Warning] [api] refused\n"
        );
    }

    #[test]
    fn a_missing_directory_is_named() {
        let config = LoggerConfig {
            log_path: Some("/nonexistent/dir/log".into()),
            level: None,
            show_level: None,
            show_log_origin: None,
            module: None,
        };
        let err = configure(&config).unwrap_err().to_string();
        assert!(
            err.starts_with("logger.log_path: cannot open /nonexistent/dir/log"),
            "{err}"
        );
    }
}
