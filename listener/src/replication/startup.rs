//! Opening a replication connection: TCP, TLS negotiation, the startup message and
//! authentication (cleartext, MD5 or SCRAM-SHA-256).

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::{log_notice, ConnectOptions, ReplicationConnection};
use crate::error::Error;
use crate::postgres::tls::{SslMode, Transport};

impl ReplicationConnection {
    /// Connects, authenticates (cleartext, MD5 or SCRAM-SHA-256) and waits for ReadyForQuery.
    pub async fn connect(options: &ConnectOptions) -> Result<ReplicationConnection, Error> {
        let addr = format!("{}:{}", options.host, options.port);
        let timeout = options.connect_timeout;
        match tokio::time::timeout(timeout, Self::connect_inner(options, &addr)).await {
            Ok(result) => result,
            Err(_) => Err(Error::ConnectTimeout { addr }),
        }
    }

    async fn connect_inner(
        options: &ConnectOptions,
        addr: &str,
    ) -> Result<ReplicationConnection, Error> {
        let socket = TcpStream::connect(addr)
            .await
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        // Status updates are tiny and must not wait for Nagle.
        socket.set_nodelay(true).map_err(Error::ConnectionLost)?;
        let transport = negotiate_tls(socket, options).await?;
        let mut conn = ReplicationConnection {
            transport,
            inbuf: BytesMut::with_capacity(64 * 1024),
            outbuf: BytesMut::with_capacity(1024),
            streaming: false,
        };
        let params = [
            ("user", options.user.as_str()),
            ("database", options.dbname.as_str()),
            ("replication", "database"),
            ("application_name", options.application_name.as_str()),
            ("client_encoding", "UTF8"),
            // Fixes the text format of timestamptz values in the stream (see event::timestamp).
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
        ];
        frontend::startup_message(params, &mut conn.outbuf).map_err(Error::ConnectionLost)?;
        conn.send().await?;
        conn.authenticate(options).await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, options: &ConnectOptions) -> Result<(), Error> {
        let password = || {
            options
                .password
                .as_deref()
                .ok_or_else(|| Error::PasswordRequired {
                    user: options.user.clone(),
                })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message("authentication").await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.outbuf)
                        .map_err(Error::ConnectionLost)?;
                    self.send().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        options.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.outbuf)
                        .map_err(Error::ConnectionLost)?;
                    self.send().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut offered = Vec::new();
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next().map_err(Error::ConnectionLost)? {
                        offered.push(m.to_string());
                    }
                    if !offered.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                        return Err(Error::Authentication(format!(
                            "the server offers SASL mechanisms {offered:?}; only SCRAM-SHA-256 is \
                             supported (without TLS there is no channel binding)"
                        )));
                    }
                    let state =
                        ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        state.message(),
                        &mut self.outbuf,
                    )
                    .map_err(Error::ConnectionLost)?;
                    scram = Some(state);
                    self.send().await?;
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or_else(|| {
                        Error::Protocol("SASL continue without a SASL exchange".into())
                    })?;
                    state.update(body.data()).map_err(|e| {
                        Error::Authentication(format!("SCRAM exchange failed: {e}"))
                    })?;
                    frontend::sasl_response(state.message(), &mut self.outbuf)
                        .map_err(Error::ConnectionLost)?;
                    self.send().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or_else(|| {
                        Error::Protocol("SASL final without a SASL exchange".into())
                    })?;
                    state.finish(body.data()).map_err(|e| {
                        Error::Authentication(format!(
                            "the server's SCRAM signature is invalid: {e}"
                        ))
                    })?;
                }
                backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential
                | backend::Message::AuthenticationGss
                | backend::Message::AuthenticationGssContinue(_)
                | backend::Message::AuthenticationSspi => {
                    return Err(Error::Authentication(
                        "the server asks for an authentication method other than password, MD5 \
                         or SCRAM-SHA-256"
                            .into(),
                    ))
                }
                backend::Message::ParameterStatus(_) | backend::Message::BackendKeyData(_) => {}
                backend::Message::NoticeResponse(body) => log_notice(body.fields()),
                backend::Message::ReadyForQuery(_) => return Ok(()),
                _ => return Err(Error::Protocol("unexpected message during startup".into())),
            }
        }
    }
}

/// Sends an SSLRequest unless TLS is disabled, and upgrades the socket when the server agrees.
async fn negotiate_tls(
    mut socket: TcpStream,
    options: &ConnectOptions,
) -> Result<Box<dyn Transport>, Error> {
    let Some(connector) = options
        .tls
        .as_ref()
        .filter(|_| options.sslmode != SslMode::Disable)
    else {
        return Ok(Box::new(socket));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    socket
        .write_all(&request)
        .await
        .map_err(Error::ConnectionLost)?;
    let mut answer = [0u8; 1];
    socket
        .read_exact(&mut answer)
        .await
        .map_err(Error::ConnectionLost)?;
    match answer[0] {
        b'S' => {
            crate::postgres::tls::handshake(connector, options.sslmode, &options.host, socket).await
        }
        b'N' if options.sslmode.requires_tls() => Err(Error::Tls(format!(
            "the server at {}:{} does not accept TLS, and sslmode is {}",
            options.host, options.port, options.sslmode
        ))),
        b'N' => Ok(Box::new(socket)),
        other => Err(Error::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}
