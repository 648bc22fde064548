//! How request bytes become messages, and what a client hears when they
//! cannot. Three things can go wrong before a handler runs, all of them the
//! client's doing, so none may surface as INTERNAL:
//!
//! - **The message is larger than the server accepts**
//!   (`IDENTITY_MAX_MESSAGE_BYTES`). [`MessageLimitLayer`] reads the length
//!   prefix of each gRPC message as it arrives and refuses an oversize one
//!   at once with RESOURCE_EXHAUSTED (reason `ERROR_REASON_MESSAGE_TOO_LARGE`),
//!   as the gRPC specification asks, before its body is buffered. (tonic's
//!   own check, configured to the same limit in `app.rs` as a second line,
//!   would answer OUT_OF_RANGE.)
//! - **The body is not a sequence of gRPC messages**: a compression flag
//!   other than 0 or 1, a body that ends inside a message, a unary call with
//!   no message at all. The same layer answers INVALID_ARGUMENT, where tonic
//!   would answer INTERNAL. (A message flagged compressed without a
//!   `grpc-encoding` stays INTERNAL, as the gRPC specification demands.)
//! - **The request has a shape gRPC does not allow**: trailers after the
//!   body (gRPC clients end a request with the last DATA frame), or a
//!   second message on a unary call. Both are INVALID_ARGUMENT. tonic would
//!   merge request trailers into the metadata, replacing header values: an
//!   `authorization` in a trailer would override the one in the headers,
//!   so the credential acted on would not be the one proxies and logs saw.
//!   Refused here, metadata is the request headers and nothing else.
//! - **The bytes are not a valid message of the method's request type**:
//!   invalid UTF-8 in a `string`, a truncated varint, a wrong wire type.
//!   [`Codec`], the codec of every generated service (see `build.rs`), is
//!   prost's with one change: such a request is INVALID_ARGUMENT naming the
//!   field where decoding failed, where tonic-prost would answer INTERNAL.
//!
//! The layer never looks inside a message beyond its length prefix, and no
//! status from here repeats the bytes it was sent.

use std::{
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http_body::{Frame, SizeHint};
use prost::{Message, bytes::Bytes};
use tonic::{
    Status,
    body::Body,
    codec::{DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;
use tower::{Layer, Service};

use super::status;

/// The largest response message the server sends. It is the receive limit
/// gRPC clients have by default (4 MiB), and it holds the largest response
/// the API can produce: a page of 1000 tokens, each with a 100-character
/// name, 32 scopes of 64 characters and 16 resources of 16 characters (the
/// most their 256-character total allows; about 3.1 MB; a test below checks
/// it).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// The codec of every `identity.v1` service: prost encoding and decoding,
/// with decoding failures reported as the client's mistake
/// (INVALID_ARGUMENT). Generated clients use it too; for them a response
/// that does not decode also reads INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

/// Decodes one message of type `U`; see [`Codec`].
#[derive(Debug, Clone, Copy)]
pub struct MessageDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|err| {
            let (field, description) = locate(&err);
            status::undecodable(field.as_deref(), description)
        })
    }
}

/// Splits a prost decoding error into the path of the field where decoding
/// failed (such as `expire_time.seconds`), when it names one, and the
/// description of what was wrong.
///
/// prost keeps the path private and only prints it, innermost first:
/// `failed to decode Protobuf message: Timestamp.seconds:
/// CreateTokenRequest.expire_time: invalid varint`. Should that format
/// change, the error still reads INVALID_ARGUMENT, without a field.
fn locate(err: &prost::DecodeError) -> (Option<String>, String) {
    let text = err.to_string();
    let rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let mut fields = Vec::new();
    let mut description = rest;
    while let Some((segment, after)) = description.split_once(": ") {
        match segment.split_once('.') {
            Some((message, field)) if is_identifier(message) && is_identifier(field) => {
                fields.push(field);
                description = after;
            }
            _ => break,
        }
    }
    fields.reverse();
    let path = (!fields.is_empty()).then(|| fields.join("."));
    (path, description.to_owned())
}

fn is_identifier(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

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
    use super::*;
    use crate::api::pb;

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

    #[test]
    fn decoding_errors_name_the_field_path() {
        let err = pb::CreateTokenRequest::decode(&[0x22, 0x02, 0x08, 0xff][..]).expect_err("bad");
        let (field, description) = locate(&err);
        assert_eq!(field.as_deref(), Some("expire_time.seconds"), "{err}");
        assert!(!description.contains("expire_time"), "{description}");

        let err = pb::SignInRequest::decode(&[0x0a, 0x01, 0xff][..]).expect_err("bad");
        let (field, description) = locate(&err);
        assert_eq!(field.as_deref(), Some("username"));
        assert_eq!(
            description,
            "invalid string value: data is not UTF-8 encoded"
        );

        let err = pb::SignInRequest::decode(&[0x00, 0x00][..]).expect_err("bad");
        assert_eq!(locate(&err), (None, "invalid tag value: 0".to_owned()));
    }

    /// The largest response the API can produce fits in
    /// [`MAX_RESPONSE_BYTES`] with room to spare.
    #[test]
    fn the_largest_responses_fit_the_response_limit() {
        let id = uuid::Uuid::now_v7().to_string();
        let ts = Some(prost_types::Timestamp {
            seconds: 253_402_300_799,
            nanos: 999_999_999,
        });
        let token = pb::Token {
            token_id: id.clone(),
            account_id: id.clone(),
            name: "\u{10ffff}".repeat(100),
            scopes: (0..32).map(|i| format!("{i:0>64}")).collect(),
            resources: (0..16).map(|i| format!("{i:0>16}")).collect(),
            create_time: ts,
            expire_time: ts,
            revoke_time: ts,
            state: pb::TokenState::Exhausted as i32,
            max_uses: Some(i64::MAX),
            uses_remaining: Some(i64::MAX),
            last_used_time: ts,
            last_used_address: "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%4294967295]:65535"
                .to_owned(),
            family_id: id.clone(),
            replaced_by_token_id: id.clone(),
        };
        let page_token = "f".repeat(512);
        let tokens = pb::ListTokensResponse {
            tokens: vec![token; crate::domain::page::MAX_PAGE_SIZE as usize],
            next_page_token: page_token.clone(),
        };
        let account = pb::Account {
            account_id: id.clone(),
            username: "a".repeat(39),
            email: "\u{10ffff}".repeat(254),
            kind: 2,
            role: 2,
            create_time: ts,
            disabled: true,
            disable_time: ts,
        };
        let accounts = pb::ListAccountsResponse {
            accounts: vec![account; crate::domain::page::MAX_PAGE_SIZE as usize],
            next_page_token: page_token,
        };
        for (what, len) in [
            ("tokens", tokens.encoded_len()),
            ("accounts", accounts.encoded_len()),
        ] {
            assert!(
                len < MAX_RESPONSE_BYTES * 3 / 4,
                "a full page of {what} is {len} bytes"
            );
        }
    }
}
