//! [`LayerSet`]: which layers' hidden states a forward step captures.

/// The most layers a [`LayerSet`] can name.
pub const MAX_LAYERS: usize = 128;

/// A set of decoder layers (0-based; layer `L` is the residual stream after block `L`, before
/// the final norm: HF `hidden_states[L + 1]`). A bitset: copying and testing cost nothing, and
/// outputs store the captured layers in ascending order, so [`LayerSet::rank`] gives a layer's
/// slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LayerSet(u128);

impl LayerSet {
    /// No layer: a step then computes and copies no hidden state.
    pub const NONE: Self = Self(0);

    /// Layers `0..n`.
    pub fn all(n: usize) -> Self {
        assert!(
            n <= MAX_LAYERS,
            "a LayerSet holds at most {MAX_LAYERS} layers"
        );
        if n == MAX_LAYERS {
            Self(u128::MAX)
        } else {
            Self((1u128 << n) - 1)
        }
    }

    pub fn single(layer: usize) -> Self {
        Self::NONE.with(layer)
    }

    /// This set plus `layer`.
    pub fn with(self, layer: usize) -> Self {
        assert!(layer < MAX_LAYERS, "layer {layer} ≥ {MAX_LAYERS}");
        Self(self.0 | (1u128 << layer))
    }

    pub fn contains(self, layer: usize) -> bool {
        layer < MAX_LAYERS && self.0 & (1u128 << layer) != 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The slot of `layer` among the captured layers (ascending), if captured.
    pub fn rank(self, layer: usize) -> Option<usize> {
        self.contains(layer)
            .then(|| (self.0 & ((1u128 << layer) - 1)).count_ones() as usize)
    }

    /// One past the highest layer, 0 when empty.
    pub fn end(self) -> usize {
        MAX_LAYERS - self.0.leading_zeros() as usize
    }

    /// The layers, ascending.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..self.end()).filter(move |&l| self.contains(l))
    }
}

impl FromIterator<usize> for LayerSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        iter.into_iter().fold(Self::NONE, Self::with)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_follow_ascending_order() {
        let s: LayerSet = [29, 3, 0, 17].into_iter().collect();
        assert_eq!(s.len(), 4);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 3, 17, 29]);
        assert_eq!(s.rank(0), Some(0));
        assert_eq!(s.rank(17), Some(2));
        assert_eq!(s.rank(29), Some(3));
        assert_eq!(s.rank(4), None);
        assert_eq!(s.end(), 30);
        assert_eq!(LayerSet::all(30).len(), 30);
        assert_eq!(LayerSet::all(MAX_LAYERS).len(), MAX_LAYERS);
        assert!(LayerSet::NONE.is_empty());
        assert_eq!(LayerSet::NONE.end(), 0);
        assert!(!LayerSet::all(3).contains(3));
    }
}
