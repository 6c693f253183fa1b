//! Raw sockets: socket addresses, transparent binds, the original
//! destination of a datagram.

use super::servers::Proto;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub fn cvt(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: passing a pointer to a local int with its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r, what).map(|_| ())
}

pub fn to_sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Reads a sockaddr_in/in6 from `p` (at most `len` bytes, any alignment).
///
/// # Safety
/// `p` points to `len` readable bytes.
unsafe fn from_sockaddr(p: *const u8, len: usize) -> Option<SocketAddr> {
    // SAFETY: zeroed storage, then copy at most its size from p.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = len.min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: the caller guarantees p points to len readable bytes.
    unsafe { std::ptr::copy_nonoverlapping(p, (&mut ss as *mut libc::sockaddr_storage).cast(), n) };
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: family says sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: family says sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// A socket bound to `addr`; `transparent` sets IP(V6)_TRANSPARENT, and for
/// UDP the original-destination cmsg is enabled.
pub fn bound_socket(addr: SocketAddr, proto: Proto, transparent: bool) -> io::Result<OwnedFd> {
    let (family, v6) = match addr {
        SocketAddr::V4(_) => (libc::AF_INET, false),
        SocketAddr::V6(_) => (libc::AF_INET6, true),
    };
    let ty = match proto {
        Proto::Tcp => libc::SOCK_STREAM,
        Proto::Udp => libc::SOCK_DGRAM,
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = cvt(
        unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    if v6 {
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1, "IPV6_V6ONLY")?;
    }
    if transparent {
        if v6 {
            setsockopt_int(
                raw,
                libc::SOL_IPV6,
                libc::IPV6_TRANSPARENT,
                1,
                "IPV6_TRANSPARENT",
            )?;
        } else {
            setsockopt_int(raw, libc::SOL_IP, libc::IP_TRANSPARENT, 1, "IP_TRANSPARENT")?;
        }
    }
    if proto == Proto::Udp {
        if v6 {
            setsockopt_int(
                raw,
                libc::SOL_IPV6,
                libc::IPV6_RECVORIGDSTADDR,
                1,
                "IPV6_RECVORIGDSTADDR",
            )?;
        } else {
            setsockopt_int(
                raw,
                libc::SOL_IP,
                libc::IP_RECVORIGDSTADDR,
                1,
                "IP_RECVORIGDSTADDR",
            )?;
        }
    }
    let (ss, len) = to_sockaddr(&addr);
    // SAFETY: ss/len describe a valid sockaddr.
    cvt(
        unsafe { libc::bind(raw, (&ss as *const libc::sockaddr_storage).cast(), len) },
        &format!("bind {addr}"),
    )?;
    if proto == Proto::Tcp {
        // SAFETY: listen on our socket.
        cvt(unsafe { libc::listen(raw, 64) }, "listen")?;
    }
    Ok(fd)
}

/// recvmsg with the original destination (IP(V6)_ORIGDSTADDR) when present.
pub fn recv_origdst(
    fd: RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    // SAFETY: all-zero is valid for these plain C structs.
    let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 64];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut peer as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points to live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: peer is a live sockaddr_storage; the kernel's length is at most its size.
    let peer = unsafe {
        from_sockaddr(
            (&peer as *const libc::sockaddr_storage).cast(),
            msg.msg_namelen as usize,
        )
    }
    .ok_or_else(|| io::Error::other("recvmsg: no peer address"))?;
    let mut orig = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if (h.cmsg_level == libc::SOL_IP && h.cmsg_type == libc::IP_ORIGDSTADDR)
                || (h.cmsg_level == libc::SOL_IPV6 && h.cmsg_type == libc::IPV6_ORIGDSTADDR)
            {
                let data_len = h.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                orig = from_sockaddr(libc::CMSG_DATA(c), data_len);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, peer, orig))
}
