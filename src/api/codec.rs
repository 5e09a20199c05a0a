//! The protobuf codec of every `hexveil.v1` service: prost's, except that a message that
//! cannot be decoded is the client's fault — INVALID_ARGUMENT, as the README promises — where
//! tonic-prost answers INTERNAL. The generated services name this type (`build.rs` sets
//! `codec_path`), so unary and streaming calls alike go through it.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors mapped to INVALID_ARGUMENT.
#[derive(Debug)]
pub struct HexveilCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for HexveilCodec<T, U> {
    fn default() -> Self {
        HexveilCodec {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for HexveilCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder {
            inner: self.inner.decoder(),
            _message: PhantomData,
        }
    }
}

/// Decodes like prost; an undecodable message is INVALID_ARGUMENT naming what was wrong.
#[derive(Debug)]
pub struct InvalidArgumentDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<fn() -> U>,
}

impl<U: Message + Default> Decoder for InvalidArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's only error is a DecodeError (tonic-prost turns it into INTERNAL); its text
        // says which field failed and why, and holds nothing but what the client sent.
        self.inner
            .decode(buf)
            .map_err(|s| Status::invalid_argument(s.message().to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
