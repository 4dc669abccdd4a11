//! TLS for Petrel's servers and cluster links (rustls through tonic), with
//! certificates re-read from their files when they change.
//!
//! ```text
//!  TcpListener ──accept──▶ handshake with the current ServerConfig ──▶ tonic
//!                              ▲ (files re-read when their mtime moves)
//!  channel cache ──ClientTls::current()──▶ (generation, ClientTlsConfig)
//!                 a new generation: new channels dial with the new files
//! ```
//!
//! - A broker serves only peers with a certificate of the cluster CA
//!   ([`ClientAuth::Required`]): a client without one cannot speak Raft or
//!   write the cluster map.
//! - A proxy serves clients over TLS and may verify client certificates
//!   ([`ClientAuth::Optional`]): one may stand in for a signed access key.
//! - A reload never touches an open connection; a bad file is logged and
//!   the running certificates stay.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// Files are looked at (mtime) at most this often.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate chain and key (PEM), and the CA (PEM) peers are checked
/// against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut v = vec![self.cert.as_path(), self.key.as_path()];
        v.extend(self.ca.as_deref());
        v
    }

    fn mtimes(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// Whether a server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Verified against the CA when presented; optional.
    Optional,
    /// Required, and verified against the CA.
    Required,
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))
}

fn certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(p)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", p.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", p.display()));
    }
    Ok(certs)
}

fn key(p: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(p)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{}: {e}", p.display()))?
        .ok_or_else(|| format!("{}: no PEM private key", p.display()))
}

fn roots(p: &Path) -> Result<RootCertStore, String> {
    let mut r = RootCertStore::empty();
    for c in certs(p)? {
        r.add(c).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(r)
}

fn server_config(
    files: &TlsFiles,
    auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, String> {
    let b = ServerConfig::builder();
    let b = match &files.ca {
        None if auth == ClientAuth::Required => {
            return Err("a CA is needed to verify client certificates".into())
        }
        None => b.with_no_client_auth(),
        Some(ca) => {
            let v = WebPkiClientVerifier::builder(Arc::new(roots(ca)?));
            let v = match auth {
                ClientAuth::Optional => v.allow_unauthenticated(),
                ClientAuth::Required => v,
            };
            b.with_client_cert_verifier(v.build().map_err(|e| e.to_string())?)
        }
    };
    let mut cfg = b
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Something reloaded from files when they change.
struct Reloading<T> {
    files: TlsFiles,
    current: RwLock<(Vec<Option<SystemTime>>, T)>,
    /// Milliseconds since `epoch` of the last look at the files.
    checked_ms: AtomicU64,
    epoch: Instant,
}

impl<T: Clone> Reloading<T> {
    fn new(
        files: TlsFiles,
        build: impl Fn(&TlsFiles) -> Result<T, String>,
    ) -> Result<Self, String> {
        let v = build(&files)?;
        Ok(Reloading {
            current: RwLock::new((files.mtimes(), v)),
            files,
            checked_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Re-builds the value if a file changed (looked at once a second at
    /// most, without a lock in between); `true` when this call reloaded.
    fn refresh(&self, what: &str, build: impl Fn(&TlsFiles) -> Result<T, String>) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.checked_ms.load(Ordering::Relaxed);
        if now < last + CHECK_EVERY.as_millis() as u64
            || self
                .checked_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        let m = self.files.mtimes();
        if self.current.read().unwrap_or_else(|e| e.into_inner()).0 == m {
            return false;
        }
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        // Either way, do not retry until the files move again.
        cur.0 = m;
        match build(&self.files) {
            Ok(v) => {
                cur.1 = v;
                tracing::info!("{what}: certificates reloaded");
                metrics::counter!("petrel_tls_reloads_total", "what" => what.to_string())
                    .increment(1);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "{what}: new certificates rejected; keeping the running ones");
                metrics::counter!("petrel_tls_reload_errors_total", "what" => what.to_string())
                    .increment(1);
                false
            }
        }
    }

    fn value(&self) -> T {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

/// A server's TLS: certificates re-read when they change.
pub struct ServerTls {
    auth: ClientAuth,
    /// ALPN protocols offered: `h2` for gRPC, `http/1.1` for the admin
    /// endpoint.
    alpn: &'static [&'static [u8]],
    inner: Reloading<Arc<ServerConfig>>,
}

impl ServerTls {
    /// A gRPC server's TLS (HTTP/2).
    pub fn load(files: TlsFiles, auth: ClientAuth) -> Result<Arc<ServerTls>, String> {
        Self::load_for(files, auth, &[b"h2"])
    }

    /// The admin HTTP endpoint's TLS (HTTP/1.1, no client certificates).
    pub fn load_http1(cert: PathBuf, key: PathBuf) -> Result<Arc<ServerTls>, String> {
        let files = TlsFiles {
            cert,
            key,
            ca: None,
        };
        Self::load_for(files, ClientAuth::Optional, &[b"http/1.1"])
    }

    fn load_for(
        files: TlsFiles,
        auth: ClientAuth,
        alpn: &'static [&'static [u8]],
    ) -> Result<Arc<ServerTls>, String> {
        Ok(Arc::new(ServerTls {
            auth,
            alpn,
            inner: Reloading::new(files, |f| server_config(f, auth, alpn).map(Arc::new))?,
        }))
    }

    fn config(&self) -> Arc<ServerConfig> {
        let (auth, alpn) = (self.auth, self.alpn);
        self.inner
            .refresh("server", |f| server_config(f, auth, alpn).map(Arc::new));
        self.inner.value()
    }

    /// An acceptor with the current certificates (re-read if they changed).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config())
    }

    /// Accepts connections on `listener` and yields those whose TLS
    /// handshake succeeds (TCP_NODELAY set, see `transport`), until the
    /// stream is dropped. Failed handshakes are counted in
    /// `{prefix}_tls_handshake_errors_total`.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        prefix: &'static str,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        metrics::counter!(format!("{prefix}_tls_handshake_errors_total")).increment(0);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let tcp = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors and the like: back off a bit.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send(Ok(s)).await;
                        }
                        Ok(Err(e)) => {
                            metrics::counter!(format!("{prefix}_tls_handshake_errors_total"))
                                .increment(1);
                            tracing::debug!(error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!(format!("{prefix}_tls_handshake_errors_total"))
                                .increment(1);
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn client_config(files: &TlsFiles) -> Result<tonic::transport::ClientTlsConfig, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut c =
        ClientTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    // Checked here, so a bad file fails at start, not at the first dial.
    certs(&files.cert)?;
    key(&files.key)?;
    if let Some(ca) = &files.ca {
        roots(ca)?;
        c = c.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    Ok(c)
}

/// A cluster link's client TLS (a proxy or broker dialing brokers): its
/// certificate and the cluster CA, re-read when they change.
pub struct ClientTls {
    inner: Reloading<tonic::transport::ClientTlsConfig>,
    generation: AtomicU64,
}

impl ClientTls {
    pub fn load(files: TlsFiles) -> Result<Arc<ClientTls>, String> {
        Ok(Arc::new(ClientTls {
            inner: Reloading::new(files, client_config)?,
            generation: Default::default(),
        }))
    }

    /// The settings' generation (cheap: no copy, no lock): a channel made
    /// with an older one should be made again with [`ClientTls::config`]
    /// (its open connections keep working meanwhile).
    pub fn generation(&self) -> u64 {
        if self.inner.refresh("client", client_config) {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.generation.load(Ordering::Acquire)
    }

    /// The current settings, to make a channel with.
    pub fn config(&self) -> tonic::transport::ClientTlsConfig {
        self.inner.value()
    }
}

/// A connection tonic can serve: a plain TCP stream or a TLS one (what
/// the broker's and the proxy's serve loops take).
pub trait ServerIo:
    tokio::io::AsyncRead
    + tokio::io::AsyncWrite
    + tonic::transport::server::Connected
    + Unpin
    + Send
    + 'static
{
}

impl<T> ServerIo for T where
    T: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static
{
}

/// The URI to dial `addr` (HOST:PORT, or a URI) at: `https` with TLS.
pub fn uri(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}
