//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod harness;
pub mod mssql;
pub mod served;
pub mod store_fixtures;
