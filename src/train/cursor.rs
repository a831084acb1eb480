//! Where a task is in its data: an epoch and a position in that epoch's plan. A plan (an order of
//! examples, of batches, of packed rows) is a pure function of the seed and the epoch, so a
//! checkpoint needs only the two numbers to continue exactly.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

use crate::error::{Result, failed, usage};

pub struct EpochCursor<T> {
    plan: Box<dyn Fn(u64) -> Vec<T>>,
    units: usize,
    epoch: u64,
    position: usize,
    current: Vec<T>,
}

impl<T: Clone> EpochCursor<T> {
    /// `plan(epoch)` must give the same non-empty list of units every time it is asked.
    pub fn new(plan: impl Fn(u64) -> Vec<T> + 'static) -> Self {
        let current = plan(0);
        assert!(!current.is_empty(), "an epoch plan must hold at least one unit");
        EpochCursor { units: current.len(), plan: Box::new(plan), epoch: 0, position: 0, current }
    }

    pub fn next(&mut self) -> T {
        if self.position == self.current.len() {
            self.epoch += 1;
            self.position = 0;
            self.current = (self.plan)(self.epoch);
        }
        self.position += 1;
        self.current[self.position - 1].clone()
    }

    pub fn take(&mut self, count: usize) -> Vec<T> {
        (0..count).map(|_| self.next()).collect()
    }

    /// Units handed out so far, over all epochs: a counter a resumed run continues exactly.
    pub fn consumed(&self) -> u64 {
        self.epoch * self.units as u64 + self.position as u64
    }

    /// Epochs done, with the fraction of the current one.
    pub fn epochs(&self) -> f64 {
        self.epoch as f64 + self.position as f64 / self.current.len() as f64
    }

    pub fn state(&self) -> Value {
        json!({"epoch": self.epoch, "position": self.position, "units": self.units})
    }

    pub fn restore(&mut self, state: &Value) -> Result<()> {
        let field = |k: &str| state.get(k).and_then(Value::as_u64);
        let (Some(epoch), Some(position), Some(units)) = (field("epoch"), field("position"), field("units")) else {
            return Err(failed(format!("checkpoint data cursor is not readable: {state}")));
        };
        if units as usize != self.units {
            return Err(usage(format!(
                "--resume: the run's data made {units} units per epoch, these inputs and settings make {}; resume with the same data and settings",
                self.units
            )));
        }
        self.epoch = epoch;
        self.current = (self.plan)(epoch);
        self.position = (position as usize).min(self.current.len());
        Ok(())
    }
}

/// `0..n` in an order fixed by the seed and the epoch.
pub fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut epoch_rng(seed, epoch));
    order
}

pub fn epoch_rng(seed: u64, epoch: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_cursor_continues_where_the_first_was() {
        let plan = |epoch| shuffled(5, 7, epoch);
        let mut first = EpochCursor::new(plan);
        let seen: Vec<usize> = first.take(8);
        let state = first.state();
        let rest: Vec<usize> = first.take(6);
        let mut second = EpochCursor::new(plan);
        second.restore(&state).unwrap();
        assert_eq!(second.take(6), rest);
        let mut epoch0 = seen[..5].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, vec![0, 1, 2, 3, 4]);
        assert_ne!(shuffled(50, 7, 0), shuffled(50, 7, 1));
    }
}
