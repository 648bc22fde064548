//! Compiles `proto/identity/v1/*.proto` with `protox` (a pure-Rust protobuf
//! compiler, so no system `protoc` is needed) into Rust types and tonic
//! services, and writes the encoded descriptor set that server reflection
//! serves.

use std::{env, fs, path::PathBuf, process::Command};

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
    println!("cargo:rustc-env=IDENTITY_BUILD_COMMIT={}", build_commit());

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

/// The commit being built, for the start-up log and `identity_build_info`:
/// `GIT_COMMIT` if set (an image build without `.git`), else
/// what git says, else `unknown`. Re-run when HEAD moves, watching only
/// files that exist (a missing one would re-run this script every build).
fn build_commit() -> String {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    if let Ok(commit) = env::var("GIT_COMMIT")
        && !commit.is_empty()
    {
        return commit;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|out| out.trim().to_owned())
            .filter(|out| !out.is_empty())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let mut watched = vec!["HEAD".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name])
            && fs::metadata(&path).is_ok()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    commit
}
