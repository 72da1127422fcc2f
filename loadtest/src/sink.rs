//! The dial-up nodes' receiving servers: one SMTP listener per node on the node's own loopback
//! address (every executor listens on every address with SO_REUSEPORT, so the kernel spreads
//! the relay's delivery connections over the generator cores).
//!
//! A sink answers like a plain MTA (PIPELINING, 8BITMIME, SIZE; replies to a pipelined batch in
//! one write), reads DATA up to `<CRLF>.<CRLF>`, removes the dot-stuffing, verifies the
//! message's checksum and records it in the ledger: intact, duplicate, damaged, misrouted (it
//! arrived at another node's address than its recipient's), or from another run.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::ledger::Hists;
use crate::msg::{self, Verdict};
use crate::net::node_ip;
use crate::pool::{Local, Shared};

const EHLO_REPLY: &[u8] =
    b"250-sink.loadtest.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE\r\n250 ENHANCEDSTATUSCODES\r\n";

/// Binds the listeners of dial-up nodes `0..dialup` on `port` and starts their accept loops.
pub fn start(sh: &Arc<Shared>, local: &Rc<Local>) -> io::Result<()> {
    for k in 0..sh.ledger.dialup {
        let addr = SocketAddr::from((node_ip(k), sh.cfg.sink_port));
        let lfd = bind_listener(addr).map_err(|e| io::Error::new(e.kind(), format!("sink {addr}: {e}")))?;
        // SAFETY: a bound, listening socket we just created and hand over.
        let listener = unsafe { TcpListener::from_raw_fd(lfd) };
        let (sh, local) = (sh.clone(), local.clone());
        local.fds.borrow_mut().insert(lfd);
        glommio::spawn_local(async move {
            while !local.stopping.get() {
                match listener.accept().await {
                    Ok(s) => {
                        let (sh, local) = (sh.clone(), local.clone());
                        glommio::spawn_local(async move {
                            let fd = s.as_raw_fd();
                            local.fds.borrow_mut().insert(fd);
                            let _ = serve(s, k, &sh, &local).await;
                            local.fds.borrow_mut().remove(&fd);
                        })
                        .detach();
                    }
                    Err(_) if local.stopping.get() => break,
                    Err(_) => glommio::timer::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
            drop(listener);
            local.fds.borrow_mut().remove(&lfd);
        })
        .detach();
    }
    Ok(())
}

/// A listening socket with SO_REUSEPORT (every executor listens on every sink address).
fn bind_listener(addr: SocketAddr) -> io::Result<RawFd> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    Ok(s.into_raw_fd())
}

fn verb(line: &[u8]) -> [u8; 4] {
    let mut v = [0u8; 4];
    for (i, b) in line.iter().take(4).enumerate() {
        v[i] = b.to_ascii_uppercase();
    }
    v
}

/// Records one received message (data without the terminator line, still dot-stuffed).
fn deliver(sh: &Shared, local: &Local, node: usize, data: &[u8]) {
    let m = msg::unstuff(data);
    let ledger = &sh.ledger;
    match msg::verify(&m) {
        Verdict::Intact { nonce, id, t_ns } => {
            if ledger.receive(nonce, id, node, m.len()) {
                let us = ledger.now_ns().saturating_sub(t_ns) / 1000;
                Hists::record(&mut local.hists.borrow_mut().e2e, us);
            }
        }
        Verdict::Corrupt { nonce, id } => ledger.corrupt(nonce, id),
        Verdict::Unrecognized => {
            ledger.unrecognized.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let first = String::from_utf8_lossy(&m[..m.len().min(120)]).replace("\r\n", " | ");
            ledger.sample(&format!("unrecognized message at node {}: {first}", node + 1));
        }
    }
}

/// One SMTP server connection.
async fn serve(mut s: TcpStream, node: usize, sh: &Shared, local: &Local) -> io::Result<()> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
    let _ = s.set_nodelay(true);
    s.write_all(b"220 sink.loadtest.test ESMTP etrn-loadtest sink\r\n")
        .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut data: Vec<u8> = Vec::new();
    let mut in_data = false;
    let mut scan_from = 0usize;
    loop {
        // process everything complete in the buffer
        loop {
            if in_data {
                data.extend_from_slice(&buf[start..end]);
                start = end;
                let term = if data.starts_with(b".\r\n") {
                    Some((0, 3))
                } else {
                    memchr::memmem::find(&data[scan_from..], b"\r\n.\r\n")
                        .map(|p| (scan_from + p + 2, scan_from + p + 5))
                };
                match term {
                    Some((msg_end, rest)) => {
                        deliver(sh, local, node, &data[..msg_end]);
                        out.extend_from_slice(b"250 2.0.0 Ok: received\r\n");
                        let left = data.len() - rest;
                        buf[..left].copy_from_slice(&data[rest..]);
                        start = 0;
                        end = left;
                        data.clear();
                        in_data = false;
                        scan_from = 0;
                        continue;
                    }
                    None => {
                        scan_from = data.len().saturating_sub(4);
                        break;
                    }
                }
            }
            let Some(i) = memchr::memchr(b'\n', &buf[start..end]) else {
                break;
            };
            let line = &buf[start..start + i];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            start += i + 1;
            match &verb(line) {
                b"EHLO" => out.extend_from_slice(EHLO_REPLY),
                b"HELO" => out.extend_from_slice(b"250 sink.loadtest.test\r\n"),
                b"MAIL" => out.extend_from_slice(b"250 2.1.0 Ok\r\n"),
                b"RCPT" => out.extend_from_slice(b"250 2.1.5 Ok\r\n"),
                b"DATA" => {
                    out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                    s.write_all(&out).await?;
                    out.clear();
                    in_data = true;
                }
                b"RSET" | b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                b"QUIT" => {
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    s.write_all(&out).await?;
                    return Ok(());
                }
                _ => out.extend_from_slice(b"502 5.5.2 Command not implemented\r\n"),
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if start == end {
            start = 0;
            end = 0;
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if end == buf.len() {
            // a command line longer than the buffer: not SMTP
            s.write_all(b"500 5.5.6 Line too long\r\n").await?;
            return Ok(());
        }
        let n = s.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}
