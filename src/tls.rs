//! TLS (RFC 3207 STARTTLS) with rustls: the server configuration built from the configured
//! certificate and key, the opportunistic client configuration used towards nodes, and
//! [`MaybeTls`], a stream that starts in plaintext and is upgraded in place.
//!
//! This module owns certificate loading and the TLS stream type. It knows nothing of SMTP: when
//! to upgrade, what to discard and what to reset is the protocol layer's business.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

/// Errors loading the certificate or key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("tls.cert {path}: {reason}")]
    Cert {
        /// File.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The key file could not be read or holds no private key.
    #[error("tls.key {path}: {reason}")]
    Key {
        /// File.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server side from PEM files (certificate chain, private key).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            reason: "no PEM certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// Opportunistic client side (RFC 7435): encrypt when the node offers STARTTLS, without
/// authenticating its certificate (a node's self-signed certificate must not make mail bounce).
/// Signatures are still checked, so the handshake is a real one.
pub fn opportunistic_client_config() -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AcceptAnyCert(provider.clone()));
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(cfg)
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection that is plaintext until STARTTLS, then TLS. Both the server and the client
/// side use it.
pub enum MaybeTls<S> {
    /// Plaintext.
    Plain(S),
    /// Server side after STARTTLS.
    Server(Box<futures_rustls::server::TlsStream<S>>),
    /// Client side after STARTTLS.
    Client(Box<futures_rustls::client::TlsStream<S>>),
    /// Only during the handshake (the stream is moved into the TLS acceptor/connector).
    Upgrading,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MaybeTls<S> {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Server(_) | MaybeTls::Client(_))
    }

    /// Server-side handshake. On error the connection is gone (the caller closes it).
    pub async fn accept(&mut self, cfg: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let MaybeTls::Plain(s) = std::mem::replace(self, MaybeTls::Upgrading) else {
            return Err(io::Error::other("TLS already active"));
        };
        let tls = futures_rustls::TlsAcceptor::from(cfg).accept(s).await?;
        *self = MaybeTls::Server(Box::new(tls));
        Ok(())
    }

    /// Client-side handshake with `server_name` (a host name or an IP address).
    pub async fn connect(&mut self, cfg: Arc<rustls::ClientConfig>, server_name: &str) -> io::Result<()> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let MaybeTls::Plain(s) = std::mem::replace(self, MaybeTls::Upgrading) else {
            return Err(io::Error::other("TLS already active"));
        };
        let tls = futures_rustls::TlsConnector::from(cfg).connect(name, s).await?;
        *self = MaybeTls::Client(Box::new(tls));
        Ok(())
    }
}

fn upgrading() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection lost during the TLS handshake")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_close(cx),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_close(cx),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_close(cx),
            MaybeTls::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec!["relay.test".into()]).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn bad_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = server_config(&missing, &missing).unwrap_err().to_string();
        assert!(e.starts_with("tls.cert"), "{e}");
        let (cert, _) = self_signed(dir.path());
        let e = server_config(&cert, &missing).unwrap_err().to_string();
        assert!(e.starts_with("tls.key"), "{e}");
        std::fs::write(&missing, "not pem").unwrap();
        let e = server_config(&missing, &missing).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn handshake_over_glommio_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let server = server_config(&cert, &key).unwrap();
        glommio::LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .spawn(move || async move {
                let l = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = l.local_addr().unwrap();
                let srv = glommio::spawn_local(async move {
                    let s = l.accept().await.unwrap();
                    let mut m = MaybeTls::Plain(s);
                    m.accept(server).await.unwrap();
                    assert!(m.is_tls());
                    let mut b = [0u8; 5];
                    m.read_exact(&mut b).await.unwrap();
                    m.write_all(&b).await.unwrap();
                    m.flush().await.unwrap();
                    b
                });
                let c = glommio::net::TcpStream::connect(addr).await.unwrap();
                let mut m = MaybeTls::Plain(c);
                m.connect(opportunistic_client_config(), "relay.test").await.unwrap();
                m.write_all(b"hello").await.unwrap();
                m.flush().await.unwrap();
                let mut b = [0u8; 5];
                m.read_exact(&mut b).await.unwrap();
                assert_eq!(&b, b"hello");
                assert_eq!(&srv.await, b"hello");
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
