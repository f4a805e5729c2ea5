//! `ember.*` options (and `ip=`) on the kernel command line (read from /proc/cmdline; the kernel keeps
//! dotted parameters away from init's argv and environment).
//!
//! | option | meaning |
//! |---|---|
//! | `ember.hostname=NAME` | the guest's hostname (default `ember`) |
//! | `ember.test=poweroff` | power off right after the ready line (or after `ember.run`) |
//! | `ember.run="CMD"` | run `/bin/sh -c CMD` on the console once ready, report its status |

/// What the command line asks of init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    pub hostname: String,
    pub poweroff_when_ready: bool,
    pub run: Option<String>,
    /// The value of the kernel's `ip=` option, applied by ember-init.
    pub ip: Option<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            hostname: "ember".into(),
            poweroff_when_ready: false,
            run: None,
            ip: None,
        }
    }
}

/// Splits a kernel command line into arguments the way the kernel does: whitespace
/// separates, double quotes group (and are dropped).
pub fn split_args(cmdline: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_ascii_whitespace() && !quoted => {
                if started {
                    args.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        args.push(current);
    }
    args
}

/// The block root the kernel command line names: `root=`, `rootfstype=`, `ro`/`rw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    pub device: String,
    pub fstype: String,
    pub read_only: bool,
}

impl RootSpec {
    /// The last `root=` wins, as in the kernel; without `rw` the root is mounted read-only.
    pub fn from_args(args: &[String]) -> Option<Self> {
        let args = args.split(|a| a == "--").next().unwrap_or(&[]);
        let value = |key: &str| {
            args.iter()
                .rev()
                .find_map(|a| a.strip_prefix(key))
                .map(str::to_string)
        };
        let device = value("root=").filter(|d| !d.is_empty())?;
        let read_only = args
            .iter()
            .rev()
            .find(|a| *a == "ro" || *a == "rw")
            .is_none_or(|a| a == "ro");
        Some(Self {
            device,
            fstype: value("rootfstype=").unwrap_or_else(|| "ext4".into()),
            read_only,
        })
    }
}

/// The most a hostname may hold (HOST_NAME_MAX).
const HOSTNAME_MAX: usize = 64;

/// Parses the options; unknown `ember.*` options and malformed values are reported as
/// warnings and otherwise ignored, so a typo never stops the guest from booting.
pub fn parse(cmdline: &str) -> (InitOptions, Vec<String>) {
    let mut options = InitOptions::default();
    let mut warnings = Vec::new();
    for word in split_args(cmdline) {
        if word == "--" {
            break;
        }
        if let Some(ip) = word.strip_prefix("ip=") {
            options.ip = Some(ip.into());
            continue;
        }
        let Some(option) = word.strip_prefix("ember.") else {
            continue;
        };
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        match key {
            "hostname" if valid_hostname(value) => options.hostname = value.into(),
            "hostname" => warnings.push(format!("ignoring invalid hostname {value:?}")),
            "test" if value == "poweroff" => options.poweroff_when_ready = true,
            "run" if !value.is_empty() => options.run = Some(value.into()),
            _ => warnings.push(format!("ignoring unknown option {word:?}")),
        }
    }
    (options, warnings)
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= HOSTNAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_options() {
        let (o, w) = parse("console=ttyS0 reboot=k");
        assert_eq!(o, InitOptions::default());
        assert!(w.is_empty());
    }

    #[test]
    fn reads_hostname_and_poweroff() {
        let (o, w) = parse("quiet ember.hostname=box-1 ember.test=poweroff");
        assert_eq!(o.hostname, "box-1");
        assert!(o.poweroff_when_ready);
        assert!(w.is_empty());
    }

    #[test]
    fn quoted_run_command_keeps_its_spaces() {
        let (o, w) = parse(r#"quiet ember.run="echo hi; sync" ember.test=poweroff"#);
        assert_eq!(o.run.as_deref(), Some("echo hi; sync"));
        assert!(o.poweroff_when_ready);
        assert!(w.is_empty());
        assert_eq!(
            split_args(r#"a "b c" d="e f"  g"#),
            ["a", "b c", "d=e f", "g"]
        );
        assert_eq!(parse("-- ember.test=poweroff").0, InitOptions::default());
        let ip = "ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off";
        assert_eq!(parse(ip).0.ip.as_deref(), Some(&ip[3..]));
    }

    #[test]
    fn root_spec_follows_the_kernel() {
        let args = split_args("console=ttyS0 root=/dev/vda rw quiet");
        assert_eq!(
            RootSpec::from_args(&args),
            Some(RootSpec {
                device: "/dev/vda".into(),
                fstype: "ext4".into(),
                read_only: false
            })
        );
        let args = split_args("root=/dev/vda root=PARTUUID=ab-01 rootfstype=ext2");
        let spec = RootSpec::from_args(&args).unwrap();
        assert_eq!(
            (spec.device.as_str(), spec.fstype.as_str(), spec.read_only),
            ("PARTUUID=ab-01", "ext2", true)
        );
        assert_eq!(
            RootSpec::from_args(&split_args("quiet -- root=/dev/vda")),
            None
        );
        assert_eq!(RootSpec::from_args(&split_args("root=")), None);
    }

    #[test]
    fn bad_values_warn_and_keep_defaults() {
        let (o, w) = parse("ember.hostname=a/b ember.test=explode ember.nope ember.run=");
        assert_eq!(o, InitOptions::default());
        assert_eq!(w.len(), 4);
        let long = format!("ember.hostname={}", "a".repeat(65));
        assert_eq!(parse(&long).0.hostname, "ember");
    }
}
