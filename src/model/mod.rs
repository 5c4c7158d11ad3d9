//! The conversation data model on Automerge documents. Sans-IO.
pub mod hlc;
