//! Sending one query to the nameservers over glommio sockets: UDP first, TCP when the
//! answer is truncated, a timeout on every attempt, and retries across the servers.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpStream, UdpSocket};
use glommio::GlommioError;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use super::wire::{build_query, parse_response};
use super::DnsError;

/// Receive buffer for UDP answers; plain DNS answers are at most 512 bytes, but some
/// servers send more.
const UDP_BUFFER: usize = 4096;

/// Asks `servers` for `(name, rtype)` until one gives a NOERROR or NXDOMAIN answer.
///
/// Each of `attempts` rounds tries every server in order; every try is bounded by
/// `timeout` (plus `timeout` again for the TCP retry of a truncated answer). A server that
/// times out, fails on the network, sends a truncated answer whose TCP retry fails, or
/// answers SERVFAIL, REFUSED or any other error code makes the next one be tried. When all
/// have failed the result is [`DnsError::Temporary`].
pub(crate) async fn exchange(
    servers: &[SocketAddr],
    timeout: Duration,
    attempts: u32,
    name: &Name,
    rtype: RecordType,
) -> Result<Message, DnsError> {
    let mut last = String::from("no nameserver configured");
    for _ in 0..attempts.max(1) {
        for &server in servers {
            match query_server(server, timeout, name, rtype).await {
                Ok(msg) => match msg.response_code() {
                    ResponseCode::NoError | ResponseCode::NXDomain => return Ok(msg),
                    rc => last = format!("{server}: {rc}"),
                },
                Err(e) => last = format!("{server}: {e}"),
            }
            tracing::debug!(%name, %rtype, error = %last, "DNS attempt failed");
        }
    }
    Err(DnsError::Temporary(format!("{name} {rtype}: {last}")))
}

/// One try against one server: UDP, then TCP if the UDP answer has the TC bit.
async fn query_server(
    server: SocketAddr,
    timeout: Duration,
    name: &Name,
    rtype: RecordType,
) -> Result<Message, String> {
    let id = fastrand::u16(..);
    let query = build_query(id, name, rtype).map_err(|e| e.to_string())?;
    let msg = with_timeout(timeout, udp(server, &query, id, name, rtype)).await?;
    if !msg.truncated() {
        return Ok(msg);
    }
    tracing::debug!(%name, %rtype, %server, "truncated answer, retrying over TCP");
    let msg = with_timeout(timeout, tcp(server, &query, id, name, rtype)).await?;
    if msg.truncated() {
        return Err("truncated answer over TCP".to_owned());
    }
    Ok(msg)
}

/// Runs `fut` for at most `dur`.
async fn with_timeout<T>(dur: Duration, fut: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    match glommio::timer::timeout(dur, async { Ok(fut.await) }).await {
        Ok(r) => r,
        Err(GlommioError::TimedOut(_)) => Err(format!("timed out after {dur:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends `query` from a fresh connected UDP socket (random source port) and waits for a
/// datagram that answers it; anything else (wrong id or question, garbage) is ignored.
async fn udp(server: SocketAddr, query: &[u8], id: u16, name: &Name, rtype: RecordType) -> Result<Message, String> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
    sock.connect(server).await.map_err(|e| format!("connect: {e}"))?;
    sock.send(query).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|e| format!("recv: {e}"))?;
        match parse_response(&buf[..n], id, name, rtype) {
            Ok(msg) => return Ok(msg),
            Err(why) => tracing::debug!(%server, %why, "ignoring UDP datagram"),
        }
    }
}

/// Sends `query` over a new TCP connection (RFC 1035 4.2.2 length prefix) and reads one
/// answer, which must answer the query.
async fn tcp(server: SocketAddr, query: &[u8], id: u16, name: &Name, rtype: RecordType) -> Result<Message, String> {
    let len = u16::try_from(query.len()).map_err(|_| "query too long".to_owned())?;
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(|e| format!("TCP connect: {e}"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(|e| format!("TCP write: {e}"))?;
    stream.flush().await.map_err(|e| format!("TCP flush: {e}"))?;
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| format!("TCP read: {e}"))?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("TCP read: {e}"))?;
    parse_response(&body, id, name, rtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::tests::{a, mx, n, response};
    use glommio::net::TcpListener;
    use std::time::Instant;

    fn run<F, Fut>(f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    /// The id and question of a query datagram.
    fn query_of(bytes: &[u8]) -> (u16, Name, RecordType) {
        let m = Message::from_vec(bytes).unwrap();
        let q = &m.queries()[0];
        (m.id(), q.name().clone(), q.query_type())
    }

    #[test]
    fn ignores_mismatched_datagrams_then_falls_back_to_tcp() {
        run(|| async {
            // A UDP and a TCP socket on the same loopback port.
            let (udp, tcp) = loop {
                let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
                let port = udp.local_addr().unwrap().port();
                if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                    break (udp, l);
                }
            };
            let addr = udp.local_addr().unwrap();
            let server = glommio::spawn_local(async move {
                let mut buf = vec![0u8; 512];
                let (len, peer) = udp.recv_from(&mut buf).await.unwrap();
                let (id, qname, qtype) = query_of(&buf[..len]);
                let qs = qname.to_ascii();
                // Wrong id, then wrong question, then garbage: all ignored.
                let r = response(id.wrapping_add(1), &qs, qtype, ResponseCode::NoError);
                udp.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
                let r = response(id, "other.example.", qtype, ResponseCode::NoError);
                udp.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
                udp.send_to(&[0xff; 7], peer).await.unwrap();
                // The right answer, truncated.
                let mut r = response(id, &qs, qtype, ResponseCode::NoError);
                r.set_truncated(true);
                udp.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
                // The full answer over TCP.
                let mut s = tcp.accept().await.unwrap();
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await.unwrap();
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut q).await.unwrap();
                let (id, qname, qtype) = query_of(&q);
                let mut r = response(id, &qname.to_ascii(), qtype, ResponseCode::NoError);
                for i in 0..40u16 {
                    r.add_answer(mx(&qname.to_ascii(), 60, i, &format!("mx{i}.example.")));
                }
                let body = r.to_vec().unwrap();
                assert!(body.len() > 512);
                let mut framed = (body.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&body);
                s.write_all(&framed).await.unwrap();
                s.flush().await.unwrap();
            });
            let msg = exchange(&[addr], Duration::from_secs(2), 1, &n("big.example."), RecordType::MX)
                .await
                .unwrap();
            assert_eq!(msg.answers().len(), 40);
            server.await;
        });
    }

    #[test]
    fn servfail_tries_next_server_and_silence_times_out() {
        run(|| async {
            let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
            let failing = UdpSocket::bind("127.0.0.1:0").unwrap();
            let good = UdpSocket::bind("127.0.0.1:0").unwrap();
            let servers = [
                silent.local_addr().unwrap(),
                failing.local_addr().unwrap(),
                good.local_addr().unwrap(),
            ];
            let fail_task = glommio::spawn_local(async move {
                let mut buf = vec![0u8; 512];
                let (len, peer) = failing.recv_from(&mut buf).await.unwrap();
                let (id, qname, qtype) = query_of(&buf[..len]);
                let r = response(id, &qname.to_ascii(), qtype, ResponseCode::ServFail);
                failing.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
            });
            let good_task = glommio::spawn_local(async move {
                let mut buf = vec![0u8; 512];
                let (len, peer) = good.recv_from(&mut buf).await.unwrap();
                let (id, qname, qtype) = query_of(&buf[..len]);
                let mut r = response(id, &qname.to_ascii(), qtype, ResponseCode::NoError);
                r.add_answer(a(&qname.to_ascii(), 60, "192.0.2.1"));
                good.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
            });
            let t0 = Instant::now();
            let timeout = Duration::from_millis(200);
            let msg = exchange(&servers, timeout, 2, &n("h.example."), RecordType::A)
                .await
                .unwrap();
            assert_eq!(msg.answers().len(), 1);
            let took = t0.elapsed();
            assert!(took >= timeout, "{took:?}");
            assert!(took < timeout + Duration::from_millis(1500), "{took:?}");
            fail_task.await;
            good_task.await;

            // Only the silent server: every attempt times out.
            let t0 = Instant::now();
            let err = exchange(&servers[..1], timeout, 2, &n("h.example."), RecordType::A)
                .await
                .unwrap_err();
            assert!(matches!(err, DnsError::Temporary(_)), "{err}");
            let took = t0.elapsed();
            assert!(took >= timeout * 2, "{took:?}");
            assert!(took < timeout * 2 + Duration::from_millis(1500), "{took:?}");
            drop(silent);
        });
    }

    #[test]
    fn no_servers_is_temporary() {
        run(|| async {
            let err = exchange(&[], Duration::from_millis(10), 2, &n("x."), RecordType::A)
                .await
                .unwrap_err();
            assert!(matches!(err, DnsError::Temporary(_)));
        });
    }
}
