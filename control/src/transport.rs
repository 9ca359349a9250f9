//! Frames on QUIC streams: the I/O half of [`crate::wire`].

use quinn::{RecvStream, SendStream};
use serde::{Serialize, de::DeserializeOwned};

use crate::wire::{self, WireError};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("reading from the stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("writing to the stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

pub async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, TransportError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await?;
    let len = wire::frame_len(header)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await?;
    Ok(wire::decode(&payload)?)
}

pub async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), TransportError> {
    send.write_all(&wire::encode(msg)?).await?;
    Ok(())
}
