//! Servers: the TPROXY listener, the remote server behind a veth pair in a
//! namespace of its own, the server reachable only by a socket mark.

use super::links::{addr_add, route_add, veth};
use super::netns::NsThread;
use super::process::run_ok;
use super::sockets::{bound_socket, recv_origdst};
use super::{PROXY_PORT, REMOTE_PORT, REMOTE_V4, REMOTE_V6};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One line a server received.
#[derive(Clone, Debug)]
pub struct Event {
    pub proto: Proto,
    /// For the TPROXY listener: the original destination.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub data: String,
}

/// A line server on TCP and UDP: every line received is recorded and
/// answered with `TAG:LINE\n`. As the TPROXY listener (`transparent`) it
/// records the original destination and answers UDP from it.
pub struct Server {
    pub tag: String,
    pub addrs: Vec<SocketAddr>,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    main: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds TCP and UDP on each address (in the calling thread's netns).
    pub fn start(tag: &str, addrs: &[SocketAddr], transparent: bool) -> Server {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for a in addrs {
            let t = bound_socket(*a, Proto::Tcp, transparent)
                .unwrap_or_else(|e| panic!("{tag}: tcp {a}: {e}"));
            let u = bound_socket(*a, Proto::Udp, transparent)
                .unwrap_or_else(|e| panic!("{tag}: udp {a}: {e}"));
            tcp.push(TcpListener::from(t));
            udp.push(UdpSocket::from(u));
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let main = {
            let (events, stop, threads, tag) = (
                events.clone(),
                stop.clone(),
                threads.clone(),
                tag.to_string(),
            );
            thread::Builder::new()
                .name(format!("{tag}-server"))
                .spawn(move || serve(&tag, tcp, udp, transparent, &events, &stop, &threads))
                .unwrap()
        };
        Server {
            tag: tag.to_string(),
            addrs: addrs.to_vec(),
            events,
            stop,
            threads,
            main: Some(main),
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The events whose line is `data`.
    pub fn got(&self, data: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.data == data)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(m) = self.main.take() {
            let _ = m.join();
        }
        let ts: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for t in ts {
            let _ = t.join();
        }
    }
}

/// Polls `fds` for input until `stop` is set (checked every 50 ms) and
/// calls `ready` with the index in `fds` of each one that is readable: the
/// loop of every server thread here.
pub fn serve_until(stop: &AtomicBool, fds: &[RawFd], mut ready: impl FnMut(usize)) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: pfds is a live array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for (i, p) in pfds.iter().enumerate() {
            if p.revents != 0 {
                ready(i);
            }
        }
    }
}

fn serve(
    tag: &str,
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
    transparent: bool,
    events: &Arc<Mutex<Vec<Event>>>,
    stop: &Arc<AtomicBool>,
    threads: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let fds: Vec<RawFd> = tcp
        .iter()
        .map(|l| l.as_raw_fd())
        .chain(udp.iter().map(|u| u.as_raw_fd()))
        .collect();
    let mut buf = vec![0u8; 65536];
    serve_until(stop, &fds, |i| {
        if i < tcp.len() {
            if let Ok((stream, peer)) = tcp[i].accept() {
                let (events, stop, tag) = (events.clone(), stop.clone(), tag.to_string());
                let h = thread::spawn(move || serve_tcp(&tag, stream, peer, &events, &stop));
                threads.lock().unwrap().push(h);
            }
        } else {
            let sock = &udp[i - tcp.len()];
            let Ok((n, peer, orig)) = recv_origdst(sock.as_raw_fd(), &mut buf) else {
                return;
            };
            let local = orig.unwrap_or_else(|| sock.local_addr().unwrap());
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let reply_to = |line: &str| -> io::Result<()> {
                let reply = format!("{tag}:{line}\n");
                if transparent {
                    // Answer from the original destination, as a real
                    // TPROXY proxy does.
                    let s = UdpSocket::from(bound_socket(local, Proto::Udp, true)?);
                    s.send_to(reply.as_bytes(), peer)?;
                } else {
                    sock.send_to(reply.as_bytes(), peer)?;
                }
                Ok(())
            };
            for line in text.lines() {
                events.lock().unwrap().push(Event {
                    proto: Proto::Udp,
                    local,
                    peer,
                    data: line.to_string(),
                });
                if let Err(e) = reply_to(line) {
                    eprintln!("{tag}: udp reply to {peer} from {local}: {e}");
                }
            }
        }
    });
}

fn serve_tcp(
    tag: &str,
    mut stream: TcpStream,
    peer: SocketAddr,
    events: &Arc<Mutex<Vec<Event>>>,
    stop: &Arc<AtomicBool>,
) {
    let local = stream.local_addr().unwrap();
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            events.lock().unwrap().push(Event {
                proto: Proto::Tcp,
                local,
                peer,
                data: line.clone(),
            });
            if stream
                .write_all(format!("{tag}:{line}\n").as_bytes())
                .is_err()
            {
                return;
            }
        }
    }
}

/// The TPROXY listener of the ruleset: TCP and UDP on 127.0.0.1 and ::1,
/// port 7893, transparent. Call from the test thread.
pub fn start_proxy() -> Server {
    Server::start(
        "proxy",
        &[
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PROXY_PORT),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), PROXY_PORT),
        ],
        true,
    )
}

/// A second network namespace joined to the test's by a veth pair, holding
/// a real server on 198.18.1.2 and 2001:db8:1::2, port 9000, TCP and UDP.
pub struct Remote {
    pub server: Server,
    pub ns: NsThread,
}

impl Remote {
    /// Call from the test thread (its namespace gets the other veth end).
    pub fn start() -> Remote {
        let ns = NsThread::new("remote-ns");
        veth(
            &ns,
            ("cgtv0", &["198.18.0.1/24", "2001:db8::1/64"]),
            ("cgtv1", &["198.18.0.2/24", "2001:db8::2/64"]),
        );
        ns.run(|| {
            addr_add("lo", "198.18.1.2/32");
            addr_add("lo", "2001:db8:1::2/128");
        });
        route_add("198.18.1.0/24", "198.18.0.2");
        route_add("2001:db8:1::/64", "2001:db8::2");
        let server = ns.run(|| {
            Server::start(
                "remote",
                &[
                    SocketAddr::new(REMOTE_V4.into(), REMOTE_PORT),
                    SocketAddr::new(REMOTE_V6.into(), REMOTE_PORT),
                ],
                false,
            )
        });
        Remote { server, ns }
    }

    pub fn v4() -> SocketAddr {
        SocketAddr::new(REMOTE_V4.into(), REMOTE_PORT)
    }

    pub fn v6() -> SocketAddr {
        SocketAddr::new(REMOTE_V6.into(), REMOTE_PORT)
    }
}

/// The socket mark that routes to the "marked" server.
pub const SOCKET_MARK: u32 = 0x77;
pub const SOCKET_MARK_TABLE: &str = "77";

/// A server reachable only by the socket mark: 198.18.9.2 and
/// 2001:db8:9::2 (port 9000, TCP and UDP) in the remote namespace. In the
/// test namespace the main table black-holes them, and
/// `fwmark 0x77 lookup 77` routes them over the veth pair. Neither range is
/// in the ruleset's bypass sets, so traffic to them goes through the lookup.
pub fn marked_server(remote: &Remote) -> (Server, [SocketAddr; 2]) {
    let v4: SocketAddr = "198.18.9.2:9000".parse().unwrap();
    let v6: SocketAddr = "[2001:db8:9::2]:9000".parse().unwrap();
    let server = remote.ns.run(move || {
        addr_add("lo", "198.18.9.2/32");
        addr_add("lo", "2001:db8:9::2/128");
        Server::start("marked", &[v4, v6], false)
    });
    // Replies come back from an address the main table black-holes: no
    // reverse-path filter (IPv4 inherits the host's setting).
    for conf in ["all", "default", "cgtv0"] {
        let _ = fs::write(format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter"), "0");
    }
    let mark = format!("{SOCKET_MARK:#x}");
    for (fam, net, via) in [
        ("-4", "198.18.9.0/24", "198.18.0.2"),
        ("-6", "2001:db8:9::/48", "2001:db8::2"),
    ] {
        run_ok("ip", &[fam, "route", "add", "blackhole", net]);
        run_ok(
            "ip",
            &[
                fam,
                "route",
                "add",
                net,
                "via",
                via,
                "table",
                SOCKET_MARK_TABLE,
            ],
        );
        run_ok(
            "ip",
            &[
                fam,
                "rule",
                "add",
                "fwmark",
                &mark,
                "lookup",
                SOCKET_MARK_TABLE,
            ],
        );
    }
    (server, [v4, v6])
}
