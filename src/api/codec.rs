//! How request bytes become messages, and what a client hears when they
//! cannot. Three things can go wrong before a handler runs, all of them the
//! client's doing, so none may surface as INTERNAL:
//!
//! - **The message is larger than the server accepts**
//!   (`IDENTITY_MAX_MESSAGE_BYTES`). [`MessageLimitLayer`](super::layers::message_limit::MessageLimitLayer) reads the length
//!   prefix of each gRPC message as it arrives and refuses an oversize one
//!   at once with RESOURCE_EXHAUSTED (reason `ERROR_REASON_MESSAGE_TOO_LARGE`),
//!   as the gRPC specification asks, before its body is buffered. (tonic's
//!   own check, configured to the same limit in `app/stack.rs` as a second line,
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

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb;

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
