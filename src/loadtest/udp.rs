//! Batched UDP for the load generator and the plain relay: `recvmmsg` with kernel receive
//! timestamps (`SO_TIMESTAMPNS`, CLOCK_REALTIME), `sendmmsg`, and a small epoll wrapper.
//!
//! Kernel timestamps make the measured latency independent of when the generator gets around to
//! reading: a packet is timed when the kernel queued it on the receiving socket.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use crate::mmsg::sockaddr_to_std;
use std::os::fd::{AsRawFd, RawFd};

/// Largest datagram read.
pub const MAX_DATAGRAM: usize = 2048;
/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 64;
const CTRL_LEN: usize = crate::mmsg::STAMP_CTRL_LEN;

pub use crate::mmsg::realtime_ns;

/// Binds a non-blocking UDP socket with kernel receive timestamps and large buffers.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    crate::mmsg::enable_receive_stamps(s.as_raw_fd())?;
    Ok(s.into())
}

/// Reusable buffers for one `recvmmsg` call.
pub struct RecvBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    addrs: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u8; CTRL_LEN]>,
    lens: Vec<usize>,
    stamps: Vec<u64>,
    from: Vec<Option<SocketAddr>>,
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            bufs: vec![[0; MAX_DATAGRAM]; BATCH],
            // SAFETY: sockaddr_storage is plain data; all-zero is valid.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            ctrl: vec![[0; CTRL_LEN]; BATCH],
            lens: vec![0; BATCH],
            stamps: vec![0; BATCH],
            from: vec![None; BATCH],
            n: 0,
        }
    }
}

impl RecvBatch {
    /// Datagrams read by the last call.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the last call read nothing.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Datagram `i`: its bytes, source and kernel receive time (ns since the epoch; 0 if the
    /// kernel gave none).
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr, u64)> {
        if i >= self.n {
            return None;
        }
        let len = *self.lens.get(i)?;
        let data = self.bufs.get(i)?.get(..len)?;
        Some((data, (*self.from.get(i)?)?, *self.stamps.get(i)?))
    }

    /// Mutable bytes of datagram `i` (the relay rewrites nothing, but decryption in place may).
    pub fn get_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let len = *self.lens.get(i)?;
        self.bufs.get_mut(i)?.get_mut(..len)
    }

    /// Reads up to [`BATCH`] datagrams without blocking. Ok(0) when none are queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.n = 0;
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: MAX_DATAGRAM,
            })
            .collect();
        // SAFETY: mmsghdr is plain data; every pointer field is set below.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            let (Some(addr), Some(iov), Some(ctrl)) =
                (self.addrs.get_mut(i), iovs.get_mut(i), self.ctrl.get_mut(i))
            else {
                continue;
            };
            m.msg_hdr.msg_name = addr as *mut libc::sockaddr_storage as *mut libc::c_void;
            m.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = iov as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_controllen = CTRL_LEN as _;
        }
        // SAFETY: `msgs` holds BATCH headers pointing at buffers that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for (i, m) in msgs.iter().take(n).enumerate() {
            if let Some(l) = self.lens.get_mut(i) {
                *l = (m.msg_len as usize).min(MAX_DATAGRAM);
            }
            if let (Some(f), Some(a)) = (self.from.get_mut(i), self.addrs.get(i)) {
                *f = sockaddr_to_std(a);
            }
            // SAFETY: the kernel just filled this header; its control buffer is self.ctrl[i].
            let ts = unsafe { crate::mmsg::kernel_stamp_ns(&m.msg_hdr) }.unwrap_or(0);
            if let Some(s) = self.stamps.get_mut(i) {
                *s = ts;
            }
        }
        self.n = n;
        Ok(n)
    }
}

/// Sends datagrams with `sendmmsg`. Returns how many went out; a datagram the kernel refuses
/// (e.g. a full buffer) is skipped and counted as not sent.
pub fn send_batch(fd: RawFd, out: &[(SocketAddr, &[u8])]) -> usize {
    crate::mmsg::send_batch(fd, out).0 as usize
}

/// A level-triggered epoll set whose entries carry a `u64` token.
pub struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// A new set.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
        })
    }

    /// Watches `fd` for input, reported with `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid epoll fd, valid event pointer.
        let r = unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: valid epoll fd; a stale fd just fails.
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Waits up to `timeout` for input; returns the ready tokens into `ready` (cleared first).
    pub fn wait(&mut self, timeout: std::time::Duration, ready: &mut Vec<u64>) {
        ready.clear();
        let ms = timeout.as_micros().div_ceil(1000).min(1000) as libc::c_int;
        // SAFETY: the events buffer is valid for its length.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                ms,
            )
        };
        for e in self.events.iter().take(n.max(0) as usize) {
            let token = e.u64;
            ready.push(token);
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_round_trips_with_kernel_timestamps() {
        let a = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 20]).collect();
        let out: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, p.as_slice())).collect();
        let before = realtime_ns();
        assert_eq!(send_batch(a.as_raw_fd(), &out), 100);
        let mut ep = Epoll::new().unwrap();
        ep.add(b.as_raw_fd(), 7).unwrap();
        let mut ready = Vec::new();
        ep.wait(std::time::Duration::from_secs(2), &mut ready);
        assert_eq!(ready, vec![7]);
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < 100 {
            let n = batch.recv(b.as_raw_fd()).unwrap();
            if n == 0 {
                ep.wait(std::time::Duration::from_millis(200), &mut ready);
                assert!(!ready.is_empty(), "all datagrams arrive");
                continue;
            }
            for i in 0..n {
                let (d, from, ts) = batch.get(i).unwrap();
                assert_eq!(from, a.local_addr().unwrap());
                assert!(ts >= before && ts <= realtime_ns(), "kernel timestamp {ts}");
                got.push(d[0]);
            }
        }
        assert_eq!(got, (0..100u8).collect::<Vec<_>>());
        assert_eq!(
            batch.recv(b.as_raw_fd()).unwrap(),
            0,
            "non-blocking when empty"
        );
    }
}
