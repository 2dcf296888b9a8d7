#![no_main]

use libfuzzer_sys::fuzz_target;
use tsmsg_fuzz::checks;

#[global_allocator]
static ALLOC: checks::Tracking = checks::Tracking;

fuzz_target!(|data: &[u8]| checks::jws(data));
