"""Differentially private training for PyTorch with per-example clipping fused into backward.

The native API lives here; Opacus' names and module paths live in ``dpfused.opacus``, which this
package never imports (``from dpfused.opacus import PrivacyEngine`` switches Opacus code over).
"""

from dpfused import amp
from dpfused.accounting import PrivacyBudgetExhausted, PrivacyReport
from dpfused.adaptive import AdaptiveClipping
from dpfused.bandmf import BandMF
from dpfused.engine import PrivacyEngine
from dpfused.instrument import detach, explain
from dpfused.layers import DPGRU, DPLSTM, DPRNN
from dpfused.losses import per_example_lm_loss
from dpfused.optimizer import DPOptimizer
from dpfused.secure_random import ChaCha20Generator
from dpfused.step import ClippedStep, LogicalBatch
from dpfused.validate import fix

__all__ = [
    "PrivacyEngine", "DPOptimizer", "AdaptiveClipping", "BandMF", "PrivacyBudgetExhausted",
    "PrivacyReport", "ChaCha20Generator", "ClippedStep", "LogicalBatch", "DPLSTM", "DPGRU", "DPRNN",
    "detach", "explain", "fix", "per_example_lm_loss", "amp",
]
__version__ = "0.1.0"
