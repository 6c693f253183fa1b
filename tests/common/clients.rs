//! Clients in a cgroup: a process joins the cgroup, then opens its socket.

use super::process::{collect, pipe, run_cmd};
use super::servers::Proto;
use super::sockets::to_sockaddr;
use std::fs;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// bash: join the cgroup, open /dev/PROTO/HOST/PORT as fd 3.
const CLIENT_PRELUDE: &str = r#"
echo $$ > "$CG/cgroup.procs" || exit 10
exec 3<>"/dev/$PROTO/$HOST/$PORT" || exit 11
"#;

fn client_cmd(
    cgroup: &Path,
    proto: Proto,
    dst: SocketAddr,
    limit: Duration,
    body: &str,
) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("-s")
        .arg("KILL")
        .arg(format!("{:.3}", limit.as_secs_f64()))
        .arg("bash")
        .arg("-c")
        .arg(format!("{CLIENT_PRELUDE}{body}"))
        .env("CG", cgroup)
        .env("PROTO", proto.name())
        .env("HOST", dst.ip().to_string())
        .env("PORT", dst.port().to_string());
    cmd
}

/// From a new process in `cgroup`: connect to `dst`, send `msg` as a line,
/// read one line back (3 s). Ok(reply) or Err(why).
pub fn exchange(cgroup: &Path, proto: Proto, dst: SocketAddr, msg: &str) -> Result<String, String> {
    exchange_within(cgroup, proto, dst, msg, Duration::from_secs(6))
}

/// Reads one answer from fd 3. bash's `read` takes one byte per read(2),
/// which truncates a UDP datagram to its first byte, so use `head`.
const READ_REPLY: &str = r#"R=$(timeout 3 head -n 1 <&3) || exit 13
[ -n "$R" ] || exit 13
printf '%s\n' "$R"
"#;

/// As [`exchange`], with the whole client bounded by `limit` (use a short
/// one where failure is expected: a dropped TCP SYN makes `connect` retry).
pub fn exchange_within(
    cgroup: &Path,
    proto: Proto,
    dst: SocketAddr,
    msg: &str,
    limit: Duration,
) -> Result<String, String> {
    let body = format!("printf '%s\\n' \"$MSG\" >&3 || exit 12\n{READ_REPLY}");
    let mut cmd = client_cmd(cgroup, proto, dst, limit, &body);
    cmd.env("MSG", msg);
    let f = run_cmd(&mut cmd, limit + Duration::from_secs(5));
    if f.status.success() {
        Ok(f.stdout.trim_end_matches('\n').to_string())
    } else {
        let stage = match f.code() {
            Some(10) => "joining the cgroup",
            Some(11) => "connect",
            Some(12) => "send",
            Some(13) => "no reply within 3 s",
            _ => "killed (time limit) or failed",
        };
        Err(format!("{stage}: exit {:?}: {}", f.code(), f.stderr.trim()))
    }
}

/// How a forked client knows its answer is complete (TCP; over UDP one
/// datagram is the answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Up to the first newline (the line servers of this harness).
    Line,
    /// A 2-byte big-endian length, then that many bytes (DNS over TCP);
    /// the answer handed back is without the prefix.
    LengthPrefixed,
}

/// A client in a forked child: it joins `cgroup` before it opens its socket
/// (so the socket is the cgroup's), optionally sets SO_MARK (needs
/// CAP_NET_ADMIN), connects to `dst` (UDP too: the kernel then takes only
/// answers from that address), sends `out`, and reads one answer (3 s).
/// Between fork and `_exit` it makes only raw system calls on memory
/// prepared by the parent.
pub struct ForkedClient<'a> {
    pub cgroup: &'a Path,
    pub proto: Proto,
    pub dst: SocketAddr,
    pub mark: Option<u32>,
    /// The bytes sent, as they go on the wire.
    pub out: &'a [u8],
    pub framing: Framing,
    /// UDP: send `out` again on the same socket (one conntrack flow, as
    /// resolvers do for A and AAAA); the second answer counts.
    pub udp_twice: bool,
    /// The whole child, past which it is killed.
    pub limit: Duration,
}

/// The stage at which a forked client failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientStage {
    Cgroup,
    Socket,
    Mark,
    Connect,
    Send,
    /// No answer (timed out, refused, or an empty one).
    Recv,
    /// Still running at the time limit, killed.
    TimeLimit,
    /// Any other exit (a signal).
    Other,
}

/// Why a forked client failed: the stage and the child's exit code (-1:
/// killed by a signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFailure {
    pub stage: ClientStage,
    pub code: i32,
}

/// What the child needs, prepared before the fork (it must not allocate).
struct ChildPlan<'a> {
    procs: std::ffi::CString,
    family: libc::c_int,
    ty: libc::c_int,
    dst: (libc::sockaddr_storage, libc::socklen_t),
    mark: Option<u32>,
    out: &'a [u8],
    tcp: bool,
    framing: Framing,
    udp_twice: bool,
    pipe: RawFd,
}

/// Exit codes of the forked client, by stage.
const C_CGROUP: i32 = 10;
const C_SOCKET: i32 = 11;
const C_MARK: i32 = 12;
const C_CONNECT: i32 = 13;
const C_SEND: i32 = 14;
const C_RECV: i32 = 15;

/// The child: join the cgroup, socket, SO_MARK, connect, send, read one
/// answer into the pipe. Only raw system calls on memory prepared by the
/// parent.
fn client_child(p: &ChildPlan<'_>) -> i32 {
    // SAFETY: plain system calls on buffers that live in this frame or in
    // `p`; no allocation, no locks (this runs between fork and _exit).
    unsafe {
        let fd = libc::open(p.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return C_CGROUP;
        }
        libc::close(fd);
        let s = libc::socket(p.family, p.ty | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return C_SOCKET;
        }
        if let Some(mark) = p.mark {
            let v = mark as libc::c_int;
            if libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return C_MARK;
            }
        }
        let tv = libc::timeval {
            tv_sec: 3,
            tv_usec: 0,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        if libc::connect(
            s,
            (&p.dst.0 as *const libc::sockaddr_storage).cast(),
            p.dst.1,
        ) != 0
        {
            return C_CONNECT;
        }
        if libc::send(s, p.out.as_ptr().cast(), p.out.len(), 0) != p.out.len() as isize {
            return C_SEND;
        }
        let mut buf = [0u8; 4096];
        let mut got = 0usize;
        while got < buf.len() {
            let n = libc::recv(s, buf.as_mut_ptr().add(got).cast(), buf.len() - got, 0);
            if n <= 0 {
                break;
            }
            got += n as usize;
            if !p.tcp {
                break;
            }
            let done = match p.framing {
                Framing::Line => buf[..got].contains(&b'\n'),
                Framing::LengthPrefixed => {
                    got >= 2 && got >= 2 + u16::from_be_bytes([buf[0], buf[1]]) as usize
                }
            };
            if done {
                break;
            }
        }
        let start = if p.tcp && p.framing == Framing::LengthPrefixed {
            2
        } else {
            0
        };
        if got <= start {
            return C_RECV;
        }
        if !p.tcp && p.udp_twice {
            if libc::send(s, p.out.as_ptr().cast(), p.out.len(), 0) != p.out.len() as isize {
                return C_SEND;
            }
            let n = libc::recv(s, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n <= 0 {
                return C_RECV;
            }
            got = n as usize;
        }
        libc::write(p.pipe, buf.as_ptr().add(start).cast(), got - start);
        0
    }
}

impl ForkedClient<'_> {
    /// Forks the client and waits for it (killed past `limit`). Ok(the
    /// answer's bytes) or the stage at which it failed.
    pub fn run(&self) -> Result<Vec<u8>, ClientFailure> {
        use std::os::unix::ffi::OsStrExt;
        let (r, w) = pipe();
        let tcp = self.proto == Proto::Tcp;
        let plan = ChildPlan {
            procs: std::ffi::CString::new(self.cgroup.join("cgroup.procs").as_os_str().as_bytes())
                .unwrap(),
            family: if self.dst.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            },
            ty: if tcp {
                libc::SOCK_STREAM
            } else {
                libc::SOCK_DGRAM
            },
            dst: to_sockaddr(&self.dst),
            mark: self.mark,
            out: self.out,
            tcp,
            framing: self.framing,
            udp_twice: self.udp_twice,
            pipe: w.as_raw_fd(),
        };
        // SAFETY: the child runs only `client_child` (raw system calls on
        // memory prepared above) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = client_child(&plan);
            // SAFETY: leaving the child without running anything of the parent's.
            unsafe { libc::_exit(code) };
        }
        drop(w);
        let deadline = Instant::now() + self.limit;
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child.
            let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if rc == pid {
                break;
            }
            if Instant::now() >= deadline {
                // SAFETY: kill and reap our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return Err(ClientFailure {
                    stage: ClientStage::TimeLimit,
                    code: -1,
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
        let mut answer = Vec::new();
        fs::File::from(r).read_to_end(&mut answer).unwrap();
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        };
        let stage = match code {
            0 => return Ok(answer),
            C_CGROUP => ClientStage::Cgroup,
            C_SOCKET => ClientStage::Socket,
            C_MARK => ClientStage::Mark,
            C_CONNECT => ClientStage::Connect,
            C_SEND => ClientStage::Send,
            C_RECV => ClientStage::Recv,
            _ => ClientStage::Other,
        };
        Err(ClientFailure { stage, code })
    }
}

/// As [`exchange_within`], from a [`ForkedClient`] whose socket carries
/// the firewall mark `mark` (SO_MARK) when given: send `msg` as a line,
/// read one line back (3 s). Ok(reply) or Err(why).
pub fn exchange_marked(
    cgroup: &Path,
    proto: Proto,
    dst: SocketAddr,
    msg: &str,
    mark: Option<u32>,
    limit: Duration,
) -> Result<String, String> {
    let line = format!("{msg}\n").into_bytes();
    let client = ForkedClient {
        cgroup,
        proto,
        dst,
        mark,
        out: &line,
        framing: Framing::Line,
        udp_twice: false,
        limit,
    };
    let ClientFailure { stage, code } = match client.run() {
        Ok(answer) => {
            let text = String::from_utf8_lossy(&answer);
            return Ok(text.split('\n').next().unwrap_or_default().to_string());
        }
        Err(f) => f,
    };
    let stage = match stage {
        ClientStage::TimeLimit => return Err(format!("killed (time limit {limit:?})")),
        ClientStage::Cgroup => "joining the cgroup",
        ClientStage::Socket => "socket",
        ClientStage::Mark => "setsockopt SO_MARK",
        ClientStage::Connect => "connect",
        ClientStage::Send => "send",
        ClientStage::Recv => "no reply within 3 s",
        ClientStage::Other => "killed or failed",
    };
    Err(format!("{stage} (exit {code})"))
}

/// A long-lived client connection from a process in a cgroup: each `send`
/// writes a line on the same socket and reads one line back.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: JoinHandle<String>,
}

impl Session {
    pub fn open(cgroup: &Path, proto: Proto, dst: SocketAddr) -> Session {
        let body = format!(
            "echo open\nwhile IFS= read -r L; do\nprintf '%s\\n' \"$L\" >&3 || exit 12\n{READ_REPLY}done\n"
        );
        let mut child = client_cmd(cgroup, proto, dst, Duration::from_secs(60), &body)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn client");
        let stdout = child.stdout.take().unwrap();
        let stderr = collect(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut r = io::BufReader::new(stdout);
            let mut line = String::new();
            while io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) > 0 {
                if tx.send(line.trim_end_matches('\n').to_string()).is_err() {
                    break;
                }
                line.clear();
            }
        });
        let stdin = child.stdin.take();
        let mut s = Session {
            child,
            stdin,
            lines: rx,
            stderr,
        };
        match s.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(l) if l == "open" => s,
            other => {
                let why = s.finish();
                panic!("client session to {dst} ({proto:?}) did not open: {other:?}; {why}");
            }
        }
    }

    /// Sends `msg` and waits (5 s) for the answer line.
    pub fn send(&mut self, msg: &str) -> Result<String, String> {
        let w = self.stdin.as_mut().unwrap();
        if let Err(e) = w
            .write_all(format!("{msg}\n").as_bytes())
            .and_then(|_| w.flush())
        {
            return Err(format!("client gone: {e}; {}", self.finish()));
        }
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(l) => Ok(l),
            Err(_) => Err(format!("no answer; {}", self.finish())),
        }
    }

    fn finish(&mut self) -> String {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let st = self.child.wait();
        let err = std::mem::replace(&mut self.stderr, thread::spawn(String::new));
        format!(
            "client exit {:?}, stderr: {}",
            st.ok().and_then(|s| s.code()),
            err.join().unwrap_or_default().trim()
        )
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
