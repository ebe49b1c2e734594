//! Batched UDP syscalls shared by the media plane (`sfu::net`) and the load generator
//! (`loadtest::udp`): `sendmmsg` of many datagrams in few calls, the conversion of the source
//! addresses `recvmmsg` fills in, and kernel receive timestamps (`SO_TIMESTAMPNS`).

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per `sendmmsg` call.
const CHUNK: usize = 64;

/// Room for one `SCM_TIMESTAMPNS` control message per datagram.
pub(crate) const STAMP_CTRL_LEN: usize = 64;

/// Asks the kernel to stamp every datagram `fd` receives with its arrival time (`SO_TIMESTAMPNS`,
/// CLOCK_REALTIME), read back with [`kernel_stamp_ns`].
pub(crate) fn enable_receive_stamps(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to an int of the stated size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's receive time of the datagram `hdr` describes (ns since the epoch), if its control
/// buffer holds one.
///
/// # Safety
/// `hdr` must be a header `recvmsg`/`recvmmsg` just filled in, whose `msg_control` points at a
/// buffer of `msg_controllen` bytes that is still alive.
pub(crate) unsafe fn kernel_stamp_ns(hdr: &libc::msghdr) -> Option<u64> {
    let mut stamp = None;
    // SAFETY: per the caller's contract, the CMSG macros walk the kernel-filled control buffer
    // within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let t = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                stamp = Some((t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    stamp
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME, the clock `SO_TIMESTAMPNS` uses).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A source address as `recvmmsg` wrote it, or `None` for a family other than IPv4 and IPv6.
pub(crate) fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: family AF_INET means the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: family AF_INET6 means the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Sends every datagram in `out` on `fd` with as few `sendmmsg` calls as possible. Returns how
/// many datagrams and bytes went out. A datagram the kernel refuses (a full buffer, an
/// unreachable peer) is skipped and not counted, not retried.
pub(crate) fn send_batch<B: AsRef<[u8]>>(fd: RawFd, out: &[(SocketAddr, B)]) -> (u64, u64) {
    let mut sent = 0u64;
    let mut bytes = 0u64;
    for chunk in out.chunks(CHUNK) {
        let mut addrs: Vec<socket2::SockAddr> = chunk.iter().map(|(a, _)| (*a).into()).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, d)| libc::iovec {
                iov_base: d.as_ref().as_ptr() as *mut libc::c_void,
                iov_len: d.as_ref().len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; the pointer fields are set below.
        let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for ((m, a), iov) in msgs.iter_mut().zip(addrs.iter_mut()).zip(iovs.iter_mut()) {
            m.msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = a.len();
            m.msg_hdr.msg_iov = iov as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut start = 0usize;
        while start < msgs.len() {
            // SAFETY: msgs[start..] are initialized headers whose buffers outlive the call.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs.as_mut_ptr().add(start),
                    (msgs.len() - start) as libc::c_uint,
                    0,
                )
            };
            if n <= 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Skip the datagram that failed and go on with the rest.
                tracing::trace!(error = %err, "sendmmsg failed");
                start += 1;
                continue;
            }
            let n = n as usize;
            for (_, d) in chunk.iter().skip(start).take(n) {
                bytes += d.as_ref().len() as u64;
            }
            sent += n as u64;
            start += n;
        }
    }
    (sent, bytes)
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::*;

    #[test]
    fn sendmmsg_delivers_more_than_one_chunk_in_order_on_loopback() {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let to = b.local_addr().expect("addr");
        let out: Vec<(SocketAddr, Vec<u8>)> = (0..100u8).map(|i| (to, vec![i; 10])).collect();
        assert_eq!(send_batch(a.as_raw_fd(), &out), (100, 1000));
        let mut buf = [0u8; 64];
        for i in 0..100u8 {
            let (len, from) = b.recv_from(&mut buf).expect("receives");
            assert_eq!((len, buf[0], from), (10, i, a.local_addr().expect("addr")));
        }
    }

    #[test]
    fn a_datagram_the_kernel_refuses_is_skipped_and_the_rest_go_out() {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let to = b.local_addr().expect("addr");
        // An IPv6 destination on an IPv4 socket is refused (EAFNOSUPPORT / EINVAL).
        let v6: SocketAddr = "[::1]:9".parse().expect("addr");
        let out: Vec<(SocketAddr, &[u8])> = vec![(to, b"one"), (v6, b"bad"), (to, b"two")];
        assert_eq!(send_batch(a.as_raw_fd(), &out), (2, 6));
        let mut buf = [0u8; 16];
        for want in [&b"one"[..], b"two"] {
            let (len, _) = b.recv_from(&mut buf).expect("receives");
            assert_eq!(&buf[..len], want);
        }
    }

    #[test]
    fn ipv4_and_ipv6_source_addresses_convert_back() {
        for addr in ["127.0.0.1:5004", "[::1]:5004"] {
            let a: SocketAddr = addr.parse().expect("addr");
            let sa: socket2::SockAddr = a.into();
            // SAFETY: sockaddr_storage is plain data; SockAddr holds one.
            let ss: libc::sockaddr_storage =
                unsafe { *(sa.as_ptr() as *const libc::sockaddr_storage) };
            assert_eq!(sockaddr_to_std(&ss), Some(a));
        }
        // SAFETY: zeroed sockaddr_storage is a valid value (family AF_UNSPEC).
        let unspec: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        assert_eq!(sockaddr_to_std(&unspec), None);
    }
}
