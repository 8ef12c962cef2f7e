//! Token choice from logits: greedy (the default, for labels that replay exactly) or seeded
//! temperature + nucleus (top-p) sampling, in the manner of candle-transformers'
//! `LogitsProcessor` but with its own small, fixed RNG so a seed replays on every platform.

/// How to pick the next token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Sampling {
    /// Highest logit, lowest id on ties.
    #[default]
    Greedy,
    /// Softmax at `temperature`, restricted to the smallest set of most likely tokens whose
    /// mass reaches `top_p`, drawn with a SplitMix64 stream seeded by `seed`.
    TopP {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

impl Sampling {
    /// `temperature <= 0` means greedy; `top_p` defaults to 1 (no truncation).
    pub fn new(temperature: f64, top_p: Option<f64>, seed: u64) -> Self {
        if temperature <= 0.0 {
            Self::Greedy
        } else {
            Self::TopP {
                temperature,
                top_p: top_p.unwrap_or(1.0).clamp(0.0, 1.0),
                seed,
            }
        }
    }
}

/// Greedy token: highest logit, lowest id on ties (NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// A sampler with its RNG state; one per sequence.
#[derive(Clone, Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: SplitMix64,
}

/// SplitMix64 (Steele et al. 2014): a tiny, portable, seedable generator, the same stream on
/// every platform. Drives sampling and the batch generator's position sampling.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 53 bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2⁻³² for the n used here).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        let state = match sampling {
            Sampling::TopP { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Self {
            sampling,
            rng: SplitMix64(state),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let (temperature, top_p) = match self.sampling {
            Sampling::Greedy => return argmax(logits),
            Sampling::TopP {
                temperature, top_p, ..
            } => (temperature, top_p),
        };
        let max = logits[argmax(logits) as usize] as f64;
        let probs: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        let u = self.rng.uniform();
        if top_p >= 1.0 {
            let mut target = u * total;
            for (i, &p) in probs.iter().enumerate() {
                target -= p;
                if target < 0.0 {
                    return i as u32;
                }
            }
            return argmax(logits);
        }
        let mut order: Vec<u32> = (0..probs.len() as u32).collect();
        order.sort_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        let mut kept = 0;
        let mut mass = 0.0;
        for &i in &order {
            mass += probs[i as usize];
            kept += 1;
            if mass >= top_p * total {
                break;
            }
        }
        let mut target = u * mass;
        for &i in &order[..kept] {
            target -= probs[i as usize];
            if target < 0.0 {
                return i;
            }
        }
        order[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_lowest_id_among_ties() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(Sampler::new(Sampling::Greedy).sample(&[0.5, -1.0, 2.0]), 2);
        assert_eq!(Sampling::new(0.0, Some(0.9), 7), Sampling::Greedy);
    }

    #[test]
    fn seeded_sampling_replays_and_respects_top_p() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.5).collect();
        let draw = |seed| {
            let mut s = Sampler::new(Sampling::new(1.0, Some(0.9), seed));
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        // a tiny nucleus keeps only the most likely token (the lowest id among the maxima).
        let mut s = Sampler::new(Sampling::new(1.0, Some(1e-9), 1));
        assert!((0..50).all(|_| s.sample(&logits) == 6));
        // the whole distribution is used with top_p = 1: many distinct tokens appear.
        let mut all = draw(5);
        all.sort();
        all.dedup();
        assert!(all.len() > 10, "{all:?}");
    }
}
