//! Measured acceptance against the verifier's alpha.

use super::*;

// ------------------------------------------------------------------------------------------------------------
// Measured acceptance against alpha.

#[test]
fn measured_acceptance_matches_alpha() {
    let started = std::time::Instant::now();
    let (mut sum_i, mut sum_a, mut var, mut n) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for (i, prompt) in [
        "Write a short poem about the sea.",
        "Explain what a hash map is.",
        "Tell me about the history of Rome.",
        "Describe a forest at night.",
    ]
    .iter()
    .enumerate()
    {
        let trace = generate(
            model(),
            spec(
                "speculative",
                prompt,
                speculative_params("layer-skip", lossless_sampling()),
                64,
                i as u64,
            ),
        )
        .unwrap();
        for step in &trace.steps {
            let Some(StepPayload::Speculative(p)) = &step.payload else {
                continue;
            };
            // alpha[d] is the acceptance probability of the draft tested at depth d + 1.
            let tested =
                p.accepted_path.len() + usize::from(!p.rejection.as_ref().is_some_and(|r| r.bonus));
            for (d, &a) in p.alpha.iter().enumerate().take(tested) {
                let accepted = d < p.accepted_path.len();
                sum_i += f64::from(u8::from(accepted));
                sum_a += f64::from(a);
                var += f64::from(a) * (1.0 - f64::from(a));
                n += 1;
            }
        }
    }
    let z = (sum_i - sum_a) / var.sqrt();
    eprintln!(
        "acceptance {:.3} vs mean alpha {:.3} over {n} draft positions (z = {z:.2}); {:.1} s",
        sum_i / n as f64,
        sum_a / n as f64,
        started.elapsed().as_secs_f64()
    );
    assert!(n >= 200, "only {n} draft positions");
    assert!(
        z.abs() < 3.5,
        "measured acceptance disagrees with alpha (z = {z})"
    );
}
