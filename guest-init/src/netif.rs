//! Network interfaces: `lo` up, and the interface named by `ip=` configured with its
//! address, netmask and default route, through the classic socket ioctls (no netlink
//! needed for one static address).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use guest_init::ipconfig::IpConfig;

/// Brings `lo` up; then, with a configuration, its interface and default route.
pub fn configure(config: Option<&IpConfig>) -> Result<()> {
    let sock = inet_socket().context("cannot open a control socket")?;
    set_up(&sock, "lo").context("cannot bring lo up")?;
    let Some(c) = config else { return Ok(()) };
    let dev = c.device.as_str();
    set_address(&sock, dev, libc::SIOCSIFADDR, c.address)
        .with_context(|| format!("cannot set the address of {dev}"))?;
    set_address(&sock, dev, libc::SIOCSIFNETMASK, c.netmask)
        .with_context(|| format!("cannot set the netmask of {dev}"))?;
    set_up(&sock, dev).with_context(|| format!("cannot bring {dev} up"))?;
    if let Some(gateway) = c.gateway {
        add_default_route(&sock, gateway)
            .with_context(|| format!("cannot add the default route via {gateway}"))?;
    }
    if !c.dns.is_empty() {
        let text: String = c.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        // /etc may be read-only; a guest without resolv.conf still has its address.
        let _ = std::fs::write("/etc/resolv.conf", text);
    }
    Ok(())
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory effects; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(sock: &OwnedFd, request: libc::Ioctl, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: callers pass a request with the matching, live argument structure.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )
}

fn sockaddr_in(address: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it by family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_address(
    sock: &OwnedFd,
    name: &str,
    request: libc::Ioctl,
    address: Ipv4Addr,
) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(address);
    ioctl(sock, request, (&mut req as *mut libc::ifreq).cast())
}

fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(
        sock,
        libc::SIOCADDRT,
        (&mut route as *mut libc::rtentry).cast(),
    )
}

/// Interface names the kernel knows, for error messages.
pub fn interface_names() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
