//! What every layer's errors keep as their cause.

/// The error a failure came from, kept as the `source()` of the layer's own error.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;
