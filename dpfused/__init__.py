"""Differentially private training for PyTorch with per-example clipping fused into backward."""

from dpfused import amp
from dpfused.accounting import PrivacyBudgetExhausted, PrivacyReport
from dpfused.adaptive import AdaptiveClipping
from dpfused.bandmf import BandMF
from dpfused.batch_memory import BatchMemoryManager
from dpfused.engine import PrivacyEngine
from dpfused.instrument import detach, explain
from dpfused.layers import DPGRU, DPLSTM, DPRNN
from dpfused.losses import per_example_lm_loss
from dpfused.opacus import get_noise_multiplier
from dpfused.optimizer import DPOptimizer
from dpfused.secure_random import ChaCha20Generator
from dpfused.step import ClippedStep, LogicalBatch
from dpfused.validate import ModuleValidator, fix

__all__ = [
    "PrivacyEngine", "DPOptimizer", "AdaptiveClipping", "BandMF", "BatchMemoryManager", "ModuleValidator",
    "PrivacyBudgetExhausted", "PrivacyReport", "ChaCha20Generator", "ClippedStep", "LogicalBatch",
    "DPLSTM", "DPGRU", "DPRNN", "detach", "explain", "fix", "get_noise_multiplier",
    "per_example_lm_loss", "amp",
]
__version__ = "0.1.0"
