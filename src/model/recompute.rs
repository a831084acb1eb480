//! Ops whose backward recomputes their forward, which candle lacks: gradient checkpointing
//! (a decoder layer keeps only its input and recomputes its activations in the backward pass)
//! and chunked losses that never hold the full `[tokens, vocab]` logits.
//!
//! The forward value is computed without a graph and handed to an op whose backward is a
//! closure. A checkpointed layer's parameters are not inputs of that op, so the closure's
//! nested backward leaves their gradients in a side store that [`backward`] merges into the
//! outer one: every trainer calls [`backward`] instead of `Tensor::backward`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, TensorId, bail};

/// Gradients of the inputs from the gradient of the output.
pub type Backward = Arc<dyn Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

thread_local! {
    /// Parameter gradients left by nested backward passes, by tensor id.
    static SIDE_GRADS: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

/// Record a parameter's gradient from a nested backward pass.
pub fn add_side_grad(id: TensorId, grad: Tensor) -> Result<()> {
    SIDE_GRADS.with(|side| {
        let mut side = side.borrow_mut();
        let summed = match side.remove(&id) {
            Some(earlier) => (earlier + grad)?,
            None => grad,
        };
        side.insert(id, summed);
        Ok(())
    })
}

/// `loss.backward()`, with the gradients that recomputing ops found for their parameters.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SIDE_GRADS.with(|side| side.borrow_mut().clear());
    let mut grads = loss.backward()?;
    let side = SIDE_GRADS.with(|side| std::mem::take(&mut *side.borrow_mut()));
    for (id, grad) in side {
        let summed = match grads.get_id(id) {
            Some(earlier) => (earlier + grad)?,
            None => grad,
        };
        grads.insert_id(id, summed);
    }
    Ok(grads)
}

/// A fresh buffer holding exactly `t`'s elements (a view may share a larger one).
fn fresh(t: &Tensor) -> Result<Tensor> {
    t.detach().affine(1.0, 0.0)
}

/// The storage of a fresh contiguous tensor, copied.
fn copy_value(storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
    if layout.start_offset() != 0 || !layout.is_contiguous() {
        bail!("recompute: the precomputed value must be a fresh contiguous tensor")
    }
    Ok((storage.clone(), layout.shape().clone()))
}

struct OneInput(Backward);

impl CustomOp2 for OneInput {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, value: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        copy_value(value, layout)
    }

    fn bwd(&self, input: &Tensor, _value: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut grads = (self.0)(std::slice::from_ref(input), grad)?;
        Ok((grads.drain(..).next().flatten(), None))
    }
}

struct TwoInputs(Backward);

impl CustomOp3 for TwoInputs {
    fn name(&self) -> &'static str {
        "recompute-2"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        value: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_value(value, layout)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _value: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut grads = (self.0)(&[a.clone(), b.clone()], grad)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten(), None))
    }
}

/// `value` (computed from `input` without a graph) as a tensor whose backward is `backward`.
/// CPU only, as the fused kernels: other devices run without recomputation.
pub fn with_backward(input: &Tensor, value: &Tensor, backward: Backward) -> Result<Tensor> {
    input.apply_op2(&fresh(value)?, OneInput(backward))
}

/// As [`with_backward`] for an op of two inputs.
pub fn with_backward2(a: &Tensor, b: &Tensor, value: &Tensor, backward: Backward) -> Result<Tensor> {
    a.apply_op3(b, &fresh(value)?, TwoInputs(backward))
}
