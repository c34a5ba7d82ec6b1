//! Generates events without producing them, to profile the model:
//! `cargo run --release -p rtap-simulator --example generate -- 1000000`.

use chrono::Utc;
use rtap_simulator::model::{Generator, ModelParams, Population};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let mut generator = Generator::new(
        ModelParams::default(),
        Population::synthetic(1_000_000, 1_000),
        1,
        Utc::now(),
        1000.0,
    )?;
    let started = std::time::Instant::now();
    let mut bytes = 0;
    for _ in 0..count {
        bytes += generator.next_emission().value.len();
    }
    let elapsed = started.elapsed();
    println!(
        "{count} events, {bytes} bytes, {:.0} events/s",
        count as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
