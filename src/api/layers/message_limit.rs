//! The framing half of what `api::codec` describes: a layer that follows
//! the gRPC framing of every request body, so an oversize message is
//! refused as soon as its length prefix arrives (RESOURCE_EXHAUSTED) and
//! framing no client library produces is INVALID_ARGUMENT, not INTERNAL.
//! It never looks inside a message beyond its length prefix, and no status
//! from here repeats the bytes it was sent.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use http_body::{Frame, SizeHint};
use prost::bytes::Bytes;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::api::status;

/// A tower layer that follows the gRPC framing of every request body: it
/// refuses a message longer than `max_bytes` with RESOURCE_EXHAUSTED as soon
/// as its length prefix arrives, and answers INVALID_ARGUMENT for framing
/// no client library produces (an unknown compression flag, a body that ends
/// inside a message, a unary call without a message), where tonic would
/// answer INTERNAL.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimitLayer {
    max_bytes: usize,
}

impl MessageLimitLayer {
    /// Refuses request messages longer than `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes }
    }
}

impl<S> Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit {
            inner,
            max_bytes: self.max_bytes,
        }
    }
}

/// The service [`MessageLimitLayer`] produces.
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    max_bytes: usize,
}

/// The path prefix of this service's own RPCs, which are all unary (a test
/// below checks the descriptor set): each request carries exactly one
/// message.
const UNARY_PREFIX: &str = "/identity.v1.";

impl<S> Service<http::Request<Body>> for MessageLimit<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let max_bytes = self.max_bytes;
        let unary = request.uri().path().starts_with(UNARY_PREFIX);
        self.inner.call(request.map(|body| {
            Body::new(FramedBody {
                inner: body,
                frames: Frames::new(max_bytes),
                unary,
                failed: false,
            })
        }))
    }
}

/// A request body that fails when its framing does: see
/// [`MessageLimitLayer`]. tonic turns the body's error into the call's
/// status.
struct FramedBody {
    inner: Body,
    frames: Frames,
    /// The call must carry a message.
    unary: bool,
    failed: bool,
}

impl FramedBody {
    /// Why the body may not end here, if it may not.
    fn unfinished(&self) -> Option<&'static str> {
        if self.frames.inside_message() {
            Some("the request ends inside a message")
        } else if self.unary && self.frames.messages == 0 {
            Some("the request holds no message")
        } else {
            None
        }
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.failed = true;
        Poll::Ready(Some(Err(status)))
    }
}

impl http_body::Body for FramedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) if frame.is_trailers() => {
                return this.fail(status::malformed_request(
                    "request trailers are not accepted: send metadata in the request headers",
                ));
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Err(err) = this.frames.scan(data)
                {
                    let status = match err {
                        FramingError::TooLarge(len) => {
                            status::message_too_large(len, this.frames.max_bytes)
                        }
                        FramingError::Flag(flag) => status::undecodable(
                            None,
                            format!("invalid compression flag {flag} (valid flags are 0 and 1)"),
                        ),
                    };
                    return this.fail(status);
                }
                if this.unary && this.frames.messages > 1 {
                    return this.fail(status::malformed_request(
                        "a unary call carries exactly one request message",
                    ));
                }
            }
            None => {
                if let Some(why) = this.unfinished() {
                    return this.fail(status::undecodable(None, why.to_owned()));
                }
            }
            Some(Err(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // An empty body that should not be empty must still be polled, to
        // report why.
        self.failed || (self.inner.is_end_stream() && self.unfinished().is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What [`Frames::scan`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FramingError {
    /// A message announced as this many bytes, over the limit.
    TooLarge(u64),
    /// A compression flag other than 0 or 1.
    Flag(u8),
}

/// Follows the gRPC message framing (a 1-byte compression flag, a 4-byte
/// big-endian length, then that many bytes) across however the body is
/// split into chunks.
#[derive(Debug)]
struct Frames {
    max_bytes: usize,
    /// The prefix of the next message, as far as it has arrived.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    /// Messages whose prefix has arrived.
    messages: u64,
}

impl Frames {
    fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            messages: 0,
        }
    }

    /// Follows `chunk`, refusing the first message with a bad prefix.
    fn scan(&mut self, mut chunk: &[u8]) -> Result<(), FramingError> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                chunk = &chunk[skip..];
                self.remaining -= skip as u64;
                continue;
            }
            let take = (5 - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&chunk[..take]);
            self.prefix_len += take;
            chunk = &chunk[take..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let [flag, a, b, c, d] = self.prefix;
                if flag > 1 {
                    return Err(FramingError::Flag(flag));
                }
                let len = u64::from(u32::from_be_bytes([a, b, c, d]));
                if len > self.max_bytes as u64 {
                    return Err(FramingError::TooLarge(len));
                }
                self.messages += 1;
                self.remaining = len;
            }
        }
        Ok(())
    }

    /// Whether the body so far ends part-way through a message.
    fn inside_message(&self) -> bool {
        self.prefix_len > 0 || self.remaining > 0
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn framed(len: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend(len.to_be_bytes());
        out.extend(std::iter::repeat_n(7, len as usize));
        out
    }

    #[test]
    fn frames_are_followed_across_any_split() {
        let stream = [framed(10), framed(0), framed(100), framed(11)].concat();
        for chunk in [1, 2, 3, 5, 7, 64, stream.len()] {
            let mut frames = Frames::new(100);
            for piece in stream.chunks(chunk) {
                assert_eq!(frames.scan(piece), Ok(()), "chunks of {chunk}");
            }
            assert_eq!(frames.messages, 4);
            assert!(!frames.inside_message());
            let mut frames = Frames::new(99);
            let refused = stream.chunks(chunk).find_map(|p| frames.scan(p).err());
            assert_eq!(
                refused,
                Some(FramingError::TooLarge(100)),
                "chunks of {chunk}"
            );
        }
        let mut frames = Frames::new(usize::MAX);
        assert_eq!(frames.scan(&[0, 0xff, 0xff, 0xff, 0xff]), Ok(()));
    }

    #[test]
    fn truncated_messages_and_bad_flags_are_noticed() {
        let mut frames = Frames::new(100);
        frames.scan(&framed(10)[..8]).expect("a prefix");
        assert!(frames.inside_message());
        let mut frames = Frames::new(100);
        frames.scan(&[0, 0]).expect("part of a prefix");
        assert!(frames.inside_message());
        let mut frames = Frames::new(100);
        assert_eq!(frames.scan(&[2, 0, 0, 0, 0]), Err(FramingError::Flag(2)));
    }

    /// [`UNARY_PREFIX`] holds only unary methods, so a request there
    /// without a message is malformed.
    #[test]
    fn every_identity_method_is_unary() {
        let set = prost_types::FileDescriptorSet::decode(crate::api::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut methods = 0;
        for file in set.file.iter().filter(|f| f.package() == "identity.v1") {
            for service in &file.service {
                for method in &service.method {
                    methods += 1;
                    assert!(
                        !method.client_streaming() && !method.server_streaming(),
                        "{}.{} streams",
                        service.name(),
                        method.name()
                    );
                }
            }
        }
        assert!(methods > 10, "found {methods} methods");
    }
}
