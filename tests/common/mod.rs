pub mod store_fixtures;
