//! [`BlockManager`]: the KV-cache budget, accounted per token in fixed-size blocks (vLLM's block
//! space manager, mistral.rs `BlockEngine`).
//!
//! A sequence holds `ceil(tokens / block_size)` blocks and grows one block at a time as tokens
//! are appended: nothing is reserved for `max_new_tokens` up front, so running out of blocks is
//! what triggers memory preemption. Blocks go back to the pool when their sequence is freed
//! (finished, aborted or preempted). The runner keeps a contiguous cache per sequence, so the
//! block ids here are bookkeeping; they are real ids all the same, so conservation and
//! exclusivity can be checked.

use std::collections::HashMap;

use crate::error::BlockError;
use crate::sequence::SeqId;

/// Whether a request of some size can be given blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocStatus {
    /// Enough free blocks now.
    Ok,
    /// Not now; it would fit in an empty pool.
    Later,
    /// Larger than the whole pool.
    Never,
}

/// Index of a block in the pool.
pub type BlockId = u32;

/// The pool of KV blocks and the block table of every sequence.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    free: Vec<BlockId>,
    tables: HashMap<SeqId, Vec<BlockId>>,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, BlockError> {
        if block_size == 0 {
            return Err(BlockError::ZeroBlockSize);
        }
        if num_blocks == 0 {
            return Err(BlockError::EmptyPool);
        }
        let num_blocks_u32 =
            BlockId::try_from(num_blocks).map_err(|_| BlockError::PoolTooLarge(num_blocks))?;
        Ok(Self {
            block_size,
            total: num_blocks,
            // Pop from the end: hand out low ids first.
            free: (0..num_blocks_u32).rev().collect(),
            tables: HashMap::new(),
        })
    }

    /// A pool holding `budget_tokens` tokens (rounded down to whole blocks).
    pub fn from_tokens(budget_tokens: usize, block_size: usize) -> Result<Self, BlockError> {
        if block_size == 0 {
            return Err(BlockError::ZeroBlockSize);
        }
        Self::new(budget_tokens / block_size, block_size)
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.total - self.free.len()
    }

    /// Tokens the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.total * self.block_size
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Blocks held by `seq` (0 when it holds none).
    pub fn blocks_of(&self, seq: SeqId) -> usize {
        self.tables.get(&seq).map_or(0, Vec::len)
    }

    /// The block ids held by `seq`.
    pub fn table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }

    /// Tokens `seq` can hold without a new block.
    pub fn slots_of(&self, seq: SeqId) -> usize {
        self.blocks_of(seq) * self.block_size
    }

    /// Number of sequences holding blocks.
    pub fn num_sequences(&self) -> usize {
        self.tables.len()
    }

    /// Whether a new sequence of `tokens` tokens could be given blocks.
    pub fn can_allocate(&self, tokens: usize) -> AllocStatus {
        let need = self.blocks_for(tokens);
        if need > self.total {
            AllocStatus::Never
        } else if need <= self.free.len() {
            AllocStatus::Ok
        } else {
            AllocStatus::Later
        }
    }

    /// Extra blocks `seq` needs to hold `tokens` tokens in all.
    pub fn extra_blocks_for(&self, seq: SeqId, tokens: usize) -> usize {
        self.blocks_for(tokens).saturating_sub(self.blocks_of(seq))
    }

    /// The most tokens `seq` could hold in all, using its blocks and every free block.
    pub fn max_tokens_for(&self, seq: SeqId) -> usize {
        (self.blocks_of(seq) + self.free.len()) * self.block_size
    }

    /// Gives a new sequence blocks for `tokens` tokens.
    pub fn allocate(&mut self, seq: SeqId, tokens: usize) -> Result<(), BlockError> {
        if self.tables.contains_key(&seq) {
            return Err(BlockError::AlreadyAllocated(seq));
        }
        let need = self.blocks_for(tokens);
        if need > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                needed: need,
                free: self.free.len(),
            });
        }
        let blocks = self.free.split_off(self.free.len() - need);
        self.tables.insert(seq, blocks);
        Ok(())
    }

    /// Grows `seq` so it holds `tokens` tokens in all (a new sequence starts empty). Fails, with
    /// nothing changed, when the pool lacks the blocks: memory pressure.
    pub fn append_slots(&mut self, seq: SeqId, tokens: usize) -> Result<(), BlockError> {
        let need = self.extra_blocks_for(seq, tokens);
        if need > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                needed: need,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - need;
        let fresh = self.free.split_off(at);
        self.tables.entry(seq).or_default().extend(fresh);
        Ok(())
    }

    /// Returns every block of `seq` to the pool; returns how many.
    pub fn free(&mut self, seq: SeqId) -> usize {
        match self.tables.remove(&seq) {
            Some(blocks) => {
                let n = blocks.len();
                self.free.extend(blocks.into_iter().rev());
                n
            }
            None => 0,
        }
    }

    /// Checks the pool's invariants: every block is either free or held by exactly one
    /// sequence. Used by tests; cheap enough for debug assertions.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![false; self.total];
        let held = self.tables.values().flatten();
        for &b in self.free.iter().chain(held) {
            let i = b as usize;
            if i >= self.total {
                return Err(format!("block {b} outside the pool of {}", self.total));
            }
            if seen[i] {
                return Err(format!("block {b} is held twice"));
            }
            seen[i] = true;
        }
        match seen.iter().position(|s| !s) {
            Some(lost) => Err(format!("block {lost} is lost")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_in_tokens_rounds_down_to_blocks() {
        let m = BlockManager::from_tokens(100, 16).unwrap();
        assert_eq!(m.total_blocks(), 6);
        assert_eq!(m.capacity_tokens(), 96);
        assert!(matches!(
            BlockManager::from_tokens(10, 16),
            Err(BlockError::EmptyPool)
        ));
        assert!(matches!(
            BlockManager::new(4, 0),
            Err(BlockError::ZeroBlockSize)
        ));
    }

    #[test]
    fn blocks_grow_per_token_and_return_on_free() {
        let mut m = BlockManager::new(4, 16).unwrap();
        assert_eq!(m.can_allocate(64), AllocStatus::Ok);
        assert_eq!(m.can_allocate(65), AllocStatus::Never);
        m.allocate(1, 17).unwrap();
        assert_eq!(m.blocks_of(1), 2);
        assert_eq!(m.slots_of(1), 32);
        m.append_slots(1, 32).unwrap();
        assert_eq!(m.blocks_of(1), 2, "32 tokens still fit in two blocks");
        m.append_slots(1, 33).unwrap();
        assert_eq!(m.blocks_of(1), 3);
        assert_eq!(m.used_blocks() + m.free_blocks(), 4);
        assert_eq!(m.can_allocate(32), AllocStatus::Later);
        m.append_slots(2, 16).unwrap();
        let err = m.append_slots(2, 17).unwrap_err();
        assert_eq!(err, BlockError::OutOfBlocks { needed: 1, free: 0 });
        assert_eq!(m.blocks_of(2), 1, "a failed append changes nothing");
        m.check().unwrap();
        assert_eq!(m.free(1), 3);
        assert_eq!(m.free(1), 0);
        assert_eq!(m.free(2), 1);
        assert_eq!(m.used_blocks(), 0);
        assert_eq!(m.num_sequences(), 0);
        m.check().unwrap();
    }

    #[test]
    fn tables_are_disjoint() {
        let mut m = BlockManager::new(8, 4).unwrap();
        m.allocate(1, 9).unwrap();
        m.allocate(2, 8).unwrap();
        assert!(matches!(
            m.allocate(1, 1),
            Err(BlockError::AlreadyAllocated(1))
        ));
        let a: Vec<_> = m.table(1).to_vec();
        assert!(m.table(2).iter().all(|b| !a.contains(b)));
        m.check().unwrap();
    }
}
