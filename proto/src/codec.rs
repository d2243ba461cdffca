//! The codec every generated client and server uses: prost's, with a small first buffer, and a
//! message that does not decode answered as the caller's mistake.
//!
//! tonic gives each call an encode (and decode) buffer of 8 KiB up front and keeps it for the
//! call's life. For a watch stream that idles for minutes that is most of what the stream costs:
//! ten thousand idle streams would hold 80 MB of empty buffers. Our messages are small (a watch
//! event is a few hundred bytes), and a buffer grows when a message needs more.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};

/// First buffer of a call, in bytes.
const BUFFER: usize = 512;
/// tonic's default: how much a streaming call encodes before it yields to send.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER`]-byte first buffers.
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(PhantomData)
    }
}

/// prost's decoding, with a message that does not decode (a string that is not UTF-8, a
/// truncated field) answered `INVALID_ARGUMENT` naming the field — not `INTERNAL` with the
/// decoder's own words, as tonic's default does.
#[derive(Debug)]
pub struct CheckedDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            let what = e.to_string();
            let what = what
                .strip_prefix("failed to decode Protobuf message: ")
                .unwrap_or(&what);
            Status::invalid_argument(format!("the message does not decode: {what}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER, YIELD_THRESHOLD)
}
