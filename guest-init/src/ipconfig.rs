//! The kernel's `ip=` command-line syntax, which ember-init applies itself (the guest kernel
//! has no IP autoconfiguration):
//! `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`.
//! Only static configuration is supported: autoconf must be empty, `off` or `none`.

use std::net::Ipv4Addr;

/// A static IPv4 configuration for one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub netmask: Ipv4Addr,
    pub hostname: Option<String>,
    pub device: String,
    pub dns: Vec<Ipv4Addr>,
}

/// Why an `ip=` value was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpConfigError {
    #[error("ip={0}: the client address {1:?} is not an IPv4 address")]
    Address(String, String),
    #[error("ip={0}: field {1} ({2:?}) is not an IPv4 address")]
    Field(String, &'static str, String),
    #[error("ip={0}: autoconfiguration {1:?} is not supported; use a static address")]
    Autoconf(String, String),
    #[error("ip={0}: device name {1:?} is not valid")]
    Device(String, String),
}

impl IpConfig {
    /// Parses the value of `ip=`. `off`/`none` (no configuration) give `Ok(None)`.
    pub fn parse(value: &str) -> Result<Option<Self>, IpConfigError> {
        if matches!(value, "off" | "none" | "") {
            return Ok(None);
        }
        let fields: Vec<&str> = value.split(':').collect();
        let get = |i: usize| fields.get(i).copied().unwrap_or("");
        let addr = |i: usize, name: &'static str| -> Result<Option<Ipv4Addr>, IpConfigError> {
            match get(i) {
                "" => Ok(None),
                text => text
                    .parse()
                    .map(Some)
                    .map_err(|_| IpConfigError::Field(value.into(), name, text.into())),
            }
        };
        let address: Ipv4Addr = get(0)
            .parse()
            .map_err(|_| IpConfigError::Address(value.into(), get(0).into()))?;
        let netmask = addr(3, "netmask")?.unwrap_or_else(|| default_netmask(address));
        let device = match get(5) {
            "" => "eth0".to_string(),
            d if d.len() < 16
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') =>
            {
                d.into()
            }
            d => return Err(IpConfigError::Device(value.into(), d.into())),
        };
        if !matches!(get(6), "" | "off" | "none") {
            return Err(IpConfigError::Autoconf(value.into(), get(6).into()));
        }
        let dns = [addr(7, "dns0")?, addr(8, "dns1")?]
            .into_iter()
            .flatten()
            .collect();
        let hostname = Some(get(4)).filter(|h| !h.is_empty()).map(str::to_string);
        Ok(Some(Self {
            address,
            gateway: addr(2, "gateway")?,
            netmask,
            hostname,
            device,
            dns,
        }))
    }

    /// The netmask as a prefix length (`255.255.255.0` -> 24).
    pub fn prefix_len(&self) -> u32 {
        u32::from(self.netmask).leading_ones()
    }
}

/// The classful default the kernel uses when no netmask is given.
fn default_netmask(address: Ipv4Addr) -> Ipv4Addr {
    match address.octets()[0] {
        0..=127 => Ipv4Addr::new(255, 0, 0, 0),
        128..=191 => Ipv4Addr::new(255, 255, 0, 0),
        _ => Ipv4Addr::new(255, 255, 255, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_style_static_config() {
        let c = IpConfig::parse("172.16.0.2::172.16.0.1:255.255.255.0::eth0:off")
            .unwrap()
            .unwrap();
        assert_eq!(c.address, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(c.gateway, Some(Ipv4Addr::new(172, 16, 0, 1)));
        assert_eq!(c.prefix_len(), 24);
        assert_eq!(c.device, "eth0");
        assert!(c.hostname.is_none() && c.dns.is_empty());
    }

    #[test]
    fn short_forms_get_defaults() {
        let c = IpConfig::parse("10.1.2.3").unwrap().unwrap();
        assert_eq!(
            (c.netmask, c.gateway, c.device.as_str()),
            (Ipv4Addr::new(255, 0, 0, 0), None, "eth0")
        );
        let c = IpConfig::parse("192.168.7.9:::255.255.0.0:box:eth1::8.8.8.8")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.prefix_len(), c.hostname.as_deref(), c.device.as_str()),
            (16, Some("box"), "eth1")
        );
        assert_eq!(c.dns, vec![Ipv4Addr::new(8, 8, 8, 8)]);
        assert_eq!(IpConfig::parse("off").unwrap(), None);
    }

    #[test]
    fn bad_values_are_named() {
        assert!(matches!(
            IpConfig::parse("dhcp"),
            Err(IpConfigError::Address(..))
        ));
        assert!(matches!(
            IpConfig::parse("10.0.0.2::x"),
            Err(IpConfigError::Field(_, "gateway", _))
        ));
        assert!(matches!(
            IpConfig::parse("10.0.0.2::::::dhcp"),
            Err(IpConfigError::Autoconf(..))
        ));
        assert!(matches!(
            IpConfig::parse("10.0.0.2:::::eth0/x"),
            Err(IpConfigError::Device(..))
        ));
    }
}
