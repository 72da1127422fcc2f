//! Loopback addressing: the names and 127.0.x.y addresses of the simulated dial-up nodes, the
//! safety check that keeps every target on loopback unless `--allow-remote` is given, and
//! connecting from a chosen source address (an ETRN must come from the node's own address,
//! because `auth = "md5"` nodes get their mail at the address the ETRN came from).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Most dial-up nodes the addressing scheme supports (250 addresses in each of 250 /24s).
pub const MAX_DIALUP: usize = 250 * 250;

/// The domain of node `k` (0-based): `node1.test`, `node2.test`, ... (RFC 2606 `.test`).
pub fn node_name(k: usize) -> String {
    format!("node{}.test", k + 1)
}

/// The loopback address of dial-up node `k`'s receiving server: 127.0.1.1, 127.0.1.2, ...
/// 127.0.1.250, 127.0.2.1, ... (never 127.0.0.x, where the servers under test listen).
pub fn node_ip(k: usize) -> Ipv4Addr {
    assert!(k < MAX_DIALUP, "node index {k} out of the loopback plan");
    Ipv4Addr::new(127, 0, (1 + k / 250) as u8, (1 + k % 250) as u8)
}

/// Source address of ETRN probe connection `j` (127.0.254.1 ..= 127.0.254.250): separate from
/// the nodes' addresses so probes never count against a node's ETRN rate limit.
pub fn probe_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 254, (1 + j % 250) as u8)
}

/// Whether an address is on this machine's loopback (127.0.0.0/8, ::1, or ::ffff:127.x).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Resolves a target `HOST:PORT` and refuses anything off loopback unless `allow_remote`.
pub fn check_target(spec: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = spec
        .to_socket_addrs()
        .map_err(|e| format!("target `{spec}`: {e} (expected HOST:PORT, e.g. 127.0.0.1:2525)"))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(format!("target `{spec}` resolves to no address"));
    };
    if !allow_remote {
        if let Some(bad) = addrs.iter().find(|a| !is_loopback(a.ip())) {
            return Err(format!(
                "refusing target `{spec}` ({bad}): not a loopback address; load tests stay on this \
                 machine unless --allow-remote is given"
            ));
        }
    }
    Ok(first)
}

/// A TCP connection to `dst` from the local address `src` (port chosen by the kernel), handed
/// to glommio. The connect itself is a blocking call with a timeout: on loopback it completes
/// at once, and glommio's own `connect` cannot bind a source address first.
pub fn connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<glommio::net::TcpStream> {
    Ok(glommio::net::TcpStream::from(socket_from(src, dst, timeout)?))
}

/// Like [`connect_from`], a plain blocking `std` stream (for threads without an executor).
pub fn connect_from_blocking(src: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<std::net::TcpStream> {
    Ok(socket_from(src, dst, timeout)?.into())
}

fn socket_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let domain = if dst.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    s.connect_timeout(&SockAddr::from(dst), timeout)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A TCP port that is free on every address in `ips` right now (checked by binding each).
pub fn free_port_on(ips: &[Ipv4Addr]) -> io::Result<u16> {
    'outer: for _ in 0..50 {
        let first = std::net::TcpListener::bind((ips.first().copied().unwrap_or(Ipv4Addr::LOCALHOST), 0))?;
        let port = first.local_addr()?.port();
        let mut held = vec![first];
        for ip in ips.iter().skip(1) {
            match std::net::TcpListener::bind((*ip, port)) {
                Ok(l) => held.push(l),
                Err(_) => continue 'outer,
            }
        }
        return Ok(port);
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "no common free port found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addressing() {
        assert_eq!(node_name(0), "node1.test");
        assert_eq!(node_ip(0), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(node_ip(249), Ipv4Addr::new(127, 0, 1, 250));
        assert_eq!(node_ip(250), Ipv4Addr::new(127, 0, 2, 1));
        assert_eq!(node_ip(MAX_DIALUP - 1), Ipv4Addr::new(127, 0, 250, 250));
        assert!(!(0..MAX_DIALUP).step_by(97).any(|k| node_ip(k) == probe_ip(k)));
    }

    #[test]
    fn loopback_guard() {
        assert!(check_target("127.0.0.1:2525", false).is_ok());
        assert!(check_target("127.9.8.7:25", false).is_ok());
        assert!(check_target("[::1]:25", false).is_ok());
        let e = check_target("192.0.2.1:25", false).unwrap_err();
        assert!(e.contains("--allow-remote"), "{e}");
        assert!(check_target("192.0.2.1:25", true).is_ok());
        assert!(check_target("10.1.2.3:25", false).is_err());
        assert!(check_target("nonsense", false).is_err());
    }
}
