//! The device store: what a device keeps on disk, encrypted at rest. This is shell code (it does
//! IO); the model stays sans-IO and hands the store opaque bytes.
pub mod db;
pub mod replica;
pub mod seal;
pub mod summary;

pub use db::{Durability, Store, StoreError, StoreTx, StoredDoc};
pub use replica::{ReplicaStoreError, StoreConfig, StoredReplica};
pub use seal::{SealError, StorageKey};
