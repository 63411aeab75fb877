//! Point-in-time snapshots through the real binaries, on the local store:
//! PITs asked for with `sync --pit`, listed with `pits`, restored with
//! `launch`; a time before the first PIT and a corrupt chunk are errors that
//! name what was wrong. (`s3.rs` runs the same scenario against a real
//! S3-compatible server.)

use lifeboat_tests::{pits_are_taken_listed_and_launched_exactly, PitStore};

#[test]
fn pits_are_taken_listed_and_launched_exactly_on_the_local_store() {
    pits_are_taken_listed_and_launched_exactly(PitStore::Local);
}
