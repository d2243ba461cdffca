//! Server-streaming responses made from a source that produces one message at a time: the
//! stream *is* the source (no task, no queue), so it works only when the client takes a message
//! (HTTP/2 flow control is the backpressure), and an error ends it. A stream opened with a
//! token ends when the token does ([`respond_until`]).

use std::{future::Future, pin::Pin};

use futures_util::Stream;
use tonic::Status;

/// A response stream of `T`.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Produces a stream's messages.
pub trait Source: Send + 'static {
    type Item: Send + 'static;

    /// The next message, an error that ends the stream, or `None` for its end.
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Item, Status>>> + Send;
}

/// `source` as a response stream.
pub fn respond<S: Source>(source: S) -> ResponseStream<S::Item> {
    Box::pin(futures_util::stream::unfold(
        Some(source),
        |source| async move {
            let mut source = source?;
            match source.next().await {
                Some(Ok(message)) => Some((Ok(message), Some(source))),
                Some(Err(status)) => Some((Err(status), None)),
                None => None,
            }
        },
    ))
}

/// `source` as a response stream that ends `UNAUTHENTICATED` at `until` (when the token that
/// opened it expires), holding `held` (a [`crate::limits::Slot`], say) while it lives.
pub fn respond_until<S: Source, H: Send + 'static>(
    source: S,
    until: tokio::time::Instant,
    held: H,
) -> ResponseStream<S::Item> {
    respond(Until {
        source,
        expiry: Box::pin(tokio::time::sleep_until(until)),
        _held: held,
    })
}

struct Until<S, H> {
    source: S,
    /// One timer for the stream's life, not one registered and dropped per message.
    expiry: Pin<Box<tokio::time::Sleep>>,
    _held: H,
}

impl<S: Source, H: Send + 'static> Source for Until<S, H> {
    type Item = S::Item;

    async fn next(&mut self) -> Option<Result<S::Item, Status>> {
        tokio::select! {
            next = self.source.next() => next,
            () = &mut self.expiry => Some(Err(Status::unauthenticated(
                "the token that opened this stream has expired; open it again with a fresh one",
            ))),
        }
    }
}
