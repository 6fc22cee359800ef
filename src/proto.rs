//! Code generated from `proto/` by `build.rs`.

/// The Magistrala auth service (only `Identify` is used).
pub mod magistrala {
    tonic::include_proto!("magistrala");
}

/// The message envelope of the Magistrala broker.
pub mod messaging {
    tonic::include_proto!("messaging");
}
