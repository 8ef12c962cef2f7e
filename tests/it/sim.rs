//! Closed forms (trail_eval::theory) against the discrete-event simulator (trail_eval::des):
//! every policy at loads 0.5 and 0.7 must agree within 2 % of the simulated mean, with the
//! simulation's 95 % interval narrower than ±1 %.

use trail_eval::{
    CappedMixture, Joint, Policy, Predictions, SimConfig, Sizes, mean_response, simulate,
};

fn check(joint: &Joint, policies: &[Policy], seed: u64) {
    let mut failures = Vec::new();
    for &load in &[0.5, 0.7] {
        for (i, &policy) in policies.iter().enumerate() {
            let jobs = if load > 0.6 { 4_000_000 } else { 2_000_000 };
            let cfg = SimConfig {
                load,
                jobs,
                warmup: 50_000,
                batches: 40,
                seed: seed + i as u64,
            };
            let sim = simulate(joint, policy, &cfg, &mut |_| {}).unwrap();
            let theory = mean_response(joint, policy, load).unwrap();
            let rel = (theory - sim.mean).abs() / sim.mean;
            eprintln!(
                "{} load {load}: closed form {theory:.4}, simulated {:.4} ± {:.4} ({:.2} %), rel error {:.3} %",
                policy.name(),
                sim.mean,
                sim.ci95,
                100.0 * sim.rel_ci95(),
                100.0 * rel
            );
            if rel > 0.02 || sim.rel_ci95() >= 0.01 {
                failures.push(format!(
                    "{} at {load}: theory {theory}, sim {sim:?}",
                    policy.name()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn theory_matches_simulation_with_noisy_predictions() {
    let joint = Joint::model(
        Sizes::exponential(1.0).unwrap(),
        Predictions::LogNormal { sigma: 0.5 },
    )
    .unwrap();
    check(
        &joint,
        &[
            Policy::Fcfs,
            Policy::Srpt,
            Policy::Sprpt,
            Policy::SprptLimited { c: 0.5 },
            Policy::SjfPredicted,
        ],
        1,
    );
}

#[test]
fn theory_matches_simulation_with_a_length_cap_atom() {
    // 27 % of jobs share the size 512 exactly: ties decide the SRPT formula.
    let joint = Joint::model(
        Sizes::Capped(CappedMixture::alpaca_like()),
        Predictions::Exact,
    )
    .unwrap();
    check(
        &joint,
        &[Policy::Fcfs, Policy::Srpt, Policy::SprptLimited { c: 0.5 }],
        100,
    );
}

#[test]
fn simulation_is_reproducible() {
    let joint = Joint::model(
        Sizes::exponential(1.0).unwrap(),
        Predictions::LogNormal { sigma: 1.0 },
    )
    .unwrap();
    let cfg = SimConfig {
        load: 0.6,
        jobs: 20_000,
        warmup: 1_000,
        batches: 10,
        seed: 7,
    };
    let a = simulate(&joint, Policy::Sprpt, &cfg, &mut |_| {}).unwrap();
    let b = simulate(&joint, Policy::Sprpt, &cfg, &mut |_| {}).unwrap();
    assert_eq!(a, b);
    let c = simulate(
        &joint,
        Policy::Sprpt,
        &SimConfig { seed: 8, ..cfg },
        &mut |_| {},
    )
    .unwrap();
    assert_ne!(a.mean, c.mean);
}

#[test]
fn simulator_rejects_bad_parameters() {
    let joint = Joint::model(Sizes::exponential(1.0).unwrap(), Predictions::Exact).unwrap();
    let cfg = SimConfig {
        load: 1.0,
        jobs: 1_000,
        warmup: 0,
        batches: 10,
        seed: 0,
    };
    assert!(matches!(
        simulate(&joint, Policy::Fcfs, &cfg, &mut |_| {}),
        Err(trail_eval::Error::BadLoad(_))
    ));
    let cfg = SimConfig { load: 0.5, ..cfg };
    assert!(simulate(&joint, Policy::SprptLimited { c: -1.0 }, &cfg, &mut |_| {}).is_err());
}
