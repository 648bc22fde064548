//! Compiles `proto/identity/v1/*.proto` with `protox` (a pure-Rust protobuf
//! compiler, so no system `protoc` is needed) into Rust types and tonic
//! services, and writes the encoded descriptor set that server reflection
//! serves.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/identity/v1/accounts.proto",
    "proto/identity/v1/audit.proto",
    "proto/identity/v1/tokens.proto",
];

/// Messages that carry a password, a session token or a token secret. prost
/// derives no `Debug` for them; `src/api/redact.rs` writes one that prints
/// `[redacted]` in place of the secret.
const SECRET_BEARING: &[&str] = &[
    ".identity.v1.CreateAccountRequest",
    ".identity.v1.SignInRequest",
    ".identity.v1.SignInResponse",
    ".identity.v1.CreateTokenResponse",
    ".identity.v1.VerifyTokenRequest",
    ".identity.v1.ChangePasswordRequest",
    ".identity.v1.RotateTokenResponse",
    ".identity.v1.RevokeLeakedTokenRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    fs::write(
        out_dir.join("identity_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .skip_debug(SECRET_BEARING.iter().copied())
        // prost's codec, except that a request that does not decode is
        // INVALID_ARGUMENT rather than INTERNAL (see src/api/codec.rs).
        .codec_path("crate::api::codec::Codec")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
