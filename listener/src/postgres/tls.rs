//! TLS for both connections, with libpq's `sslmode` semantics.

use std::path::Path;
use std::pin::Pin;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::error::Error;

/// Whether and how to use TLS, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without certificate checks; plain otherwise.
    #[default]
    Prefer,
    /// TLS or fail; no certificate checks (protects against eavesdropping only).
    Require,
    /// TLS with a certificate signed by a trusted CA (`sslrootcert` or the system store).
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host.
    VerifyFull,
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

impl SslMode {
    /// Whether a server without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// A byte stream, plain or encrypted.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// The OpenSSL connector for `mode` (`None` for `disable`).
pub fn connector(mode: SslMode, rootcert: Option<&Path>) -> Result<Option<SslConnector>, Error> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let tls = |what: &str, e: openssl::error::ErrorStack| Error::Tls(format!("{what}: {e}"));
    let mut builder =
        SslConnector::builder(SslMethod::tls_client()).map_err(|e| tls("cannot set up TLS", e))?;
    match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            if let Some(path) = rootcert {
                builder
                    .set_ca_file(path)
                    .map_err(|e| tls(&format!("cannot read sslrootcert {}", path.display()), e))?;
            }
            builder.set_verify(SslVerifyMode::PEER);
        }
        _ => builder.set_verify(SslVerifyMode::NONE),
    }
    Ok(Some(builder.build()))
}

/// Upgrades `tcp` after the server accepted an SSLRequest.
pub async fn handshake(
    connector: &SslConnector,
    mode: SslMode,
    host: &str,
    tcp: TcpStream,
) -> Result<Box<dyn Transport>, Error> {
    let mut config = connector
        .configure()
        .map_err(|e| Error::Tls(format!("cannot configure TLS: {e}")))?;
    // libpq checks the host name in verify-full only.
    config.set_verify_hostname(mode == SslMode::VerifyFull);
    let ssl = config
        .into_ssl(host)
        .map_err(|e| Error::Tls(format!("cannot configure TLS for {host}: {e}")))?;
    let mut stream =
        SslStream::new(ssl, tcp).map_err(|e| Error::Tls(format!("cannot start TLS: {e}")))?;
    match Pin::new(&mut stream).connect().await {
        Ok(()) => Ok(Box::new(stream)),
        Err(e) => match e.into_io_error() {
            // The connection broke mid-handshake: worth a retry.
            Ok(io) => Err(Error::ConnectionLost(io)),
            // Certificate or protocol failures will fail again.
            Err(e) => Err(Error::Tls(format!("TLS handshake with {host} failed: {e}"))),
        },
    }
}
