use std::net::SocketAddr;

/// Errors returned by [`crate::Server::start`]; everything after start-up is reported as an
/// [`crate::Event`] instead, because the caller is the Postgres main thread.
#[derive(thiserror::Error, Debug)]
pub enum ServerError {
    #[error("invalid realtime.listen_addresses entry \"{0}\": {1}")]
    InvalidListenAddress(String, String),
    #[error("no address to listen on")]
    NoListenAddress,
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the network runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("could not create the wake-up eventfd: {0}")]
    WakeFd(#[source] std::io::Error),
}
