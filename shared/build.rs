//! `sqlx::migrate!` embeds `../migrations` at compile time, but cargo only recompiles for changed sources: without
//! this, a new migration file would be missing from an incremental build until something else changed.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
