//! The device store: what a device keeps on disk, encrypted at rest.
pub mod seal;
