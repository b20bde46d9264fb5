"""EfficientQAT phase 1, Block-AP: train each decoder block's weights *and* its step sizes / zero
points so that the quantized block reproduces the full-precision block (MSE), then fix it to integers.

For block i (default ``input_mode="quant"``): input = the outputs of the already-quantized blocks
0..i-1; target = the fp block i applied to the fp chain's input. Trained by default, as in the
reference: every quantized linear's weight (lr_weight), step size and zero point (lr_quant), and the
block's norm weights (lr_weight; biases stay fixed). Starts from RTN min-max grids. After training the
block is packed in place and its quantized outputs become the next block's inputs.

Nothing depends on the model's weight or activation scale:
- the loss is the block's squared error divided by the energy of the block's own contribution
  ``‖fp_out − fp_in‖²`` (a relative error: the same number for a model whose hidden states are 1000x larger);
- weight and step-size updates are measured in the layer's mean initial group range (max − min), so a
  learning rate means "fraction of a group's range per step" on every model (``RelativeAdamW``; every group
  of a layer moves by the same amount, as with the reference's absolute rates);
- a block whose trained validation error is not below its RTN error is retrained once at a tenth of the
  rates and otherwise falls back to its RTN grid: Block-AP never ends a block worse than RTN.

The package, by role: ``config`` (the settings and their rate / epoch rules), ``optim`` (the block loss and
``RelativeAdamW``), ``caches`` (the activation caches and chains), ``sharding`` (data-parallel samples),
``block`` (training one block: fake-quantize, train with the guard, pack), ``state`` (the work folder: finished
blocks, summary, chain snapshots; what ``resume=True`` continues from) and ``driver`` (``quantize_block_ap``,
which runs the blocks through the sequential-block pipeline of ``model/sequential.py``).

Resume: after every finished block its packed tensors are written to ``work_dir``, and (when that costs at
most a tenth of the time since the last one) the two chains' activations for the next block; a resumed run
restarts there without replaying finished blocks, and ends bit for bit where an uninterrupted run ends.
"""

from qatlm.methods.block_ap.config import MIN_STEPS, PAPER_STEPS, BlockAPConfig
from qatlm.methods.block_ap.driver import quantize_block_ap, run
from qatlm.methods.block_ap.optim import CAP, RelativeAdamW, block_loss

__all__ = ["BlockAPConfig", "CAP", "MIN_STEPS", "PAPER_STEPS", "RelativeAdamW", "block_loss", "quantize_block_ap", "run"]
