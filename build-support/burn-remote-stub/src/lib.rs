//! Never built: see Cargo.toml.
compile_error!("burn-remote is a resolver stand-in in this build environment; Burn's `remote` features are unsupported here");
